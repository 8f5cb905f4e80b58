//! Every environment variable the configuration reads, declared once: Dynamo's names and the keys
//! they set, the deprecated ones and their warnings, and how a raw value is read. The generic nested
//! form `DYN_<SECTION>__<KEY>` and `ETCD_ENDPOINTS` are handled by [`super::load`].

use toml::{Table, Value};

/// The folder of the memory service's default sockets: `model_engine.gms_socket_dir` for an
/// engine, and `dynamix gms`'s own setting.
pub const GMS_SOCKET_DIR_ENV: &str = "GMS_SOCKET_DIR";
/// `dynamix gms`: the VMM allocation granularity in bytes (its `--granularity` wins).
pub const GMS_GRANULARITY_ENV: &str = "DYN_GMS_VMM_GRANULARITY";

/// Dynamo's environment names and the keys they set.
pub(super) const DYNAMO_ENV: &[(&str, &str)] = &[
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
    ("DYN_TCP_MAX_MESSAGE_SIZE", "distributed.max_message_size"),
    (GMS_SOCKET_DIR_ENV, "model_engine.gms_socket_dir"),
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
    ("DYN_MODEL_PATH", "model.path"),
    ("DYN_SYSTEM_PORT", "distributed.system_port"),
    ("DYN_SYSTEM_HOST", "distributed.system_host"),
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

/// Parse an environment value: TOML literal when it is one (numbers, arrays, booleans), else a string.
pub(super) fn env_value(raw: &str) -> Value {
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
pub(super) fn env_alternatives(raw: &str) -> Vec<Value> {
    let mut alternatives = vec![Value::String(raw.to_string())];
    match raw.trim() {
        "1" => alternatives.push(Value::Boolean(true)),
        "0" => alternatives.push(Value::Boolean(false)),
        _ => {}
    }
    alternatives
}
