//! The layers of a configuration: one merged TOML table that remembers which layer (file,
//! environment variable, flag) set each key, and its one deserialization into [`Config`] with errors
//! that name the key and its layer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::{Table, Value};

use super::env::env_alternatives;
use super::{Config, ConfigError};

/// Where a value came from.
#[derive(Clone, Debug)]
pub(super) enum Source {
    File(PathBuf),
    Env(String, String),
    Flag(String),
}

impl Source {
    pub(super) fn describe(&self) -> String {
        match self {
            Source::File(p) => format!("in {}", p.display()),
            Source::Env(name, raw) => format!("from environment variable {name}={raw:?}"),
            Source::Flag(flag) => format!("from flag {flag}"),
        }
    }
}

/// The merged table plus where each key came from.
#[derive(Default)]
pub(super) struct Layers {
    pub(super) table: Table,
    sources: BTreeMap<String, (Source, Option<String>)>,
}

impl Layers {
    pub(super) fn set(
        &mut self,
        path: &str,
        value: Value,
        source: Source,
        raw: Option<String>,
    ) -> Result<(), ConfigError> {
        let parts: Vec<&str> = path.split('.').collect();
        let mut table = &mut self.table;
        for part in &parts[..parts.len() - 1] {
            let entry = table
                .entry(part.to_string())
                .or_insert_with(|| Value::Table(Table::new()));
            table = match entry {
                Value::Table(t) => t,
                other => {
                    return Err(ConfigError::Layer(format!(
                        "config key `{part}` {} must be a table (section), got {other}",
                        source.describe()
                    )))
                }
            };
        }
        table.insert(parts[parts.len() - 1].to_string(), value);
        self.sources.insert(path.to_string(), (source, raw));
        Ok(())
    }

    pub(super) fn merge_file(&mut self, file: Table, path: &Path) -> Result<(), ConfigError> {
        fn walk(
            layers: &mut Layers,
            prefix: &str,
            table: Table,
            path: &Path,
        ) -> Result<(), ConfigError> {
            for (key, value) in table {
                let full = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match value {
                    Value::Table(t) => walk(layers, &full, t, path)?,
                    v => layers.set(&full, v, Source::File(path.to_path_buf()), None)?,
                }
            }
            Ok(())
        }
        walk(self, "", file, path)
    }
}

/// Deserialize the merged table; when a value from the environment does not fit its key's type, retry
/// with the value's other readings (a numeric-looking name is still a string) before reporting.
pub(super) fn deserialize(layers: &mut Layers) -> Result<Config, ConfigError> {
    let mut tried: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let value = Value::Table(layers.table.clone());
        let error = match serde_path_to_error::deserialize::<_, Config>(value) {
            Ok(config) => return Ok(config),
            Err(e) => e,
        };
        let path = error.path().to_string();
        let inner = error.into_inner().to_string();
        if let Some((Source::Env(name, raw), Some(_))) = layers.sources.get(&path).cloned() {
            let attempt = tried.entry(path.clone()).or_insert(0);
            if let Some(next) = env_alternatives(&raw).get(*attempt).cloned() {
                *attempt += 1;
                layers.set(&path, next, Source::Env(name, raw.clone()), Some(raw))?;
                continue;
            }
        }
        return Err(ConfigError::Layer(describe_error(layers, &path, &inner)));
    }
}

fn describe_error(layers: &Layers, path: &str, inner: &str) -> String {
    // An unknown key may be reported at its parent's path; find the full key and the layer that set it.
    let unknown = inner
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    let full = match (unknown, path) {
        (Some(field), "." | "") => field.to_string(),
        (Some(field), p) if !p.ends_with(field) => format!("{p}.{field}"),
        (_, p) => p.to_string(),
    };
    let source = layers
        .sources
        .iter()
        .find(|(k, _)| **k == full || k.starts_with(&format!("{full}.")))
        .map(|(_, (s, _))| format!(" ({})", s.describe()))
        .unwrap_or_default();
    let value = lookup(&layers.table, &full)
        .map(|v| format!(" = {v}"))
        .unwrap_or_default();
    format!("invalid config key `{full}`{value}{source}: {inner}")
}

fn lookup<'a>(table: &'a Table, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}
