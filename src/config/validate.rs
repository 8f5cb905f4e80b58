//! The range and consistency checks that the types cannot express: the loader's last step.

use super::{Config, ConfigError};
use dynamix_actors::engine::EngineKind;
use dynamix_actors::router::RouterMode;

fn out_of_range(key: &str, value: impl std::fmt::Display, allowed: &'static str) -> ConfigError {
    ConfigError::OutOfRange {
        key: key.to_string(),
        value: value.to_string(),
        allowed,
    }
}

impl Config {
    /// Range and consistency checks that types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_as(false)
    }

    /// [`Self::validate`]; a `frontend`'s engines are remote, so `router.mode = "kv"` is not
    /// checked against `engine.kind` (its workers may be Dynamo's, which publish KV events).
    pub fn validate_as(&self, frontend: bool) -> Result<(), ConfigError> {
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
                return Err(ConfigError::Conflict {
                    key: "router.kv_cache_block_size",
                    value: size.to_string(),
                    why: format!(
                        "the engines use blocks of {} tokens (mocker.block_size); the router's block size must match",
                        self.mocker.block_size
                    ),
                });
            }
        }
        self.mocker.validate()?;
        self.model_engine.validate()?;
        self.gpu_engine.validate()?;
        // Devices name engines; for the model engine they also say where it runs.
        for device in self
            .engine
            .devices
            .iter()
            .filter(|_| self.engine.kind == EngineKind::Model)
        {
            if device != "auto" {
                if let Err(message) = dynamix_actors::engine::gpu::DeviceSpec::parse(device) {
                    return Err(ConfigError::Layer(format!(
                        "invalid config key `engine.devices`: {message}"
                    )));
                }
            }
        }
        self.migration.validate()?;
        self.supervisor.validate()?;
        self.faults.validate()?;
        self.embeddings.validate()?;
        self.distributed.validate()?;
        let gpu_model = self.engine.kind == EngineKind::Model
            && self
                .engine
                .devices
                .iter()
                .any(|d| d == "auto" || d.starts_with("cuda"));
        if r.mode == RouterMode::Kv
            && r.use_kv_events
            && !frontend
            && self.engine.kind != EngineKind::Mocker
            && !gpu_model
        {
            return Err(ConfigError::Conflict {
                key: "router.mode",
                value: "\"kv\"".into(),
                why: format!(
                    "with router.use_kv_events = true: engine.kind = \"{}\" emits no KV events; use engine.kind = \"mocker\" (out=mocker), or approximate mode (--no-kv-events)",
                    self.engine.kind.as_str()
                ),
            });
        }
        Ok(())
    }
}
