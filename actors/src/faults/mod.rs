//! Fault injection for supervisor-driven fault testing (`[faults]`, `POST /admin/faults`, `dynamix drill`).
//!
//! One [`FaultInjector`] per process, shared by the hooks that fire faults:
//! - engines, through their [`TokenSink`](crate::engine::TokenSink): after each delivered output the sink
//!   asks [`FaultInjector::on_engine_output`] whether to panic, stall, fail or slow down;
//! - the router's `Route` handler ([`FaultInjector::on_route`]) and the validator's handlers
//!   ([`FaultInjector::on_validate`]) ask whether to panic.
//!
//! Faults come from three places: armed one-shot specs (config `faults.inject` or the admin endpoint),
//! a per-output probability, and a timer that arms one random fault every `every_ms`. Random choices use
//! one seeded generator, so a run with the same seed and the same request order injects the same faults.
//! When injection is off every hook is one relaxed atomic load.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What a fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The engine panics while generating (its actor is stopped and restarted).
    EnginePanic,
    /// The engine stops producing output for `duration_ms` (a stall past the migration timeout).
    EngineStall,
    /// The engine ends the request with an engine-shutdown error (migratable).
    EngineError,
    /// The engine waits `duration_ms` before each of its next `tokens` outputs.
    EngineSlow,
    /// The router panics while routing a request.
    RouterPanic,
    /// A validator thread panics while validating a request.
    ValidatorPanic,
    /// An HTTP handler panics while accepting a request.
    HttpPanic,
    /// The embedding engine panics in a forward pass (its actor is stopped and restarted).
    EmbeddingsPanic,
    /// The KV indexer panics while applying an event (it restarts from an empty index and the
    /// engines send their blocks again).
    IndexerPanic,
    /// The in-process memory service panics while handling a request (that request fails; the
    /// service resumes with its tables).
    MemoryServicePanic,
    /// A worker's request plane panics while relaying an output: the stream ends without
    /// `complete_final` and the frontend migrates the request, as for a killed worker.
    RequestPlanePanic,
}

impl FaultKind {
    /// The name as written in configs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::EnginePanic => "engine_panic",
            FaultKind::EngineStall => "engine_stall",
            FaultKind::EngineError => "engine_error",
            FaultKind::EngineSlow => "engine_slow",
            FaultKind::RouterPanic => "router_panic",
            FaultKind::ValidatorPanic => "validator_panic",
            FaultKind::HttpPanic => "http_panic",
            FaultKind::EmbeddingsPanic => "embeddings_panic",
            FaultKind::IndexerPanic => "indexer_panic",
            FaultKind::MemoryServicePanic => "memory_service_panic",
            FaultKind::RequestPlanePanic => "request_plane_panic",
        }
    }

    /// Every kind, in declaration order.
    pub const ALL: [FaultKind; 11] = [
        FaultKind::EnginePanic,
        FaultKind::EngineStall,
        FaultKind::EngineError,
        FaultKind::EngineSlow,
        FaultKind::RouterPanic,
        FaultKind::ValidatorPanic,
        FaultKind::HttpPanic,
        FaultKind::EmbeddingsPanic,
        FaultKind::IndexerPanic,
        FaultKind::MemoryServicePanic,
        FaultKind::RequestPlanePanic,
    ];

    /// The actor a fault of this kind hits.
    pub fn actor(self) -> crate::supervision::ActorKind {
        use crate::supervision::ActorKind;
        match self {
            FaultKind::EnginePanic
            | FaultKind::EngineStall
            | FaultKind::EngineError
            | FaultKind::EngineSlow => ActorKind::Engine,
            FaultKind::RouterPanic => ActorKind::Router,
            FaultKind::ValidatorPanic => ActorKind::Validator,
            FaultKind::HttpPanic => ActorKind::Http,
            FaultKind::EmbeddingsPanic => ActorKind::Embeddings,
            FaultKind::IndexerPanic => ActorKind::Indexer,
            FaultKind::MemoryServicePanic => ActorKind::MemoryService,
            FaultKind::RequestPlanePanic => ActorKind::RequestPlane,
        }
    }

    fn is_engine(self) -> bool {
        matches!(
            self,
            FaultKind::EnginePanic
                | FaultKind::EngineStall
                | FaultKind::EngineError
                | FaultKind::EngineSlow
        )
    }
}

fn one() -> u32 {
    1
}

/// One fault to inject (a `[[faults.inject]]` entry or an admin request body).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// What happens.
    pub kind: FaultKind,
    /// Engine faults: the engine instance it hits (unset: the first engine to produce output).
    #[serde(default)]
    pub engine: Option<u64>,
    /// Engine faults: fire once a request has delivered this many outputs (0: at its next output).
    #[serde(default)]
    pub after_tokens: u32,
    /// Stall length, or the per-output delay of a slow engine (default `faults.stall_ms` /
    /// `faults.slow_ms`).
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// Slow engine: how many outputs are slowed (default `faults.slow_tokens`).
    #[serde(default)]
    pub tokens: Option<u32>,
    /// How many times it fires.
    #[serde(default = "one")]
    pub count: u32,
}

impl FaultSpec {
    /// A one-shot fault of `kind`.
    pub fn new(kind: FaultKind) -> Self {
        FaultSpec {
            kind,
            engine: None,
            after_tokens: 0,
            duration_ms: None,
            tokens: None,
            count: 1,
        }
    }

    fn validate(&self) -> Result<(), FaultError> {
        if self.count == 0 {
            return Err(FaultError::ZeroCount);
        }
        if !self.kind.is_engine() && (self.engine.is_some() || self.after_tokens > 0) {
            return Err(FaultError::EngineFieldsOn(self.kind.as_str()));
        }
        if self.duration_ms == Some(0) {
            return Err(FaultError::ZeroDuration);
        }
        Ok(())
    }
}

/// Why a fault setting or an armed fault was refused; the message names the field.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum FaultError {
    /// `count` = 0.
    #[error("count must be at least 1")]
    ZeroCount,
    /// `engine` or `after_tokens` on a fault that does not hit an engine.
    #[error("`engine` and `after_tokens` apply to engine faults, not to {0}")]
    EngineFieldsOn(&'static str),
    /// `duration_ms` = 0.
    #[error("duration_ms must be positive")]
    ZeroDuration,
    /// `faults.probability` outside [0, 1].
    #[error("faults.probability = {0} must be between 0 and 1")]
    Probability(f64),
    /// Random faults with nothing to draw from.
    #[error("faults.kinds must list at least one kind for random faults")]
    NoKinds,
    /// The admin endpoint without injection.
    #[error("faults.admin_endpoint needs faults.enabled = true")]
    AdminWithoutInjection,
    /// A zero default stall, slowdown or slowed-token count.
    #[error("faults.stall_ms, faults.slow_ms and faults.slow_tokens must be positive")]
    ZeroDefaults,
    /// A fault of `faults.inject`.
    #[error("faults.inject[{index}]: {problem}")]
    Inject {
        /// Its position in the list.
        index: usize,
        /// What is wrong with it.
        problem: Box<FaultError>,
    },
    /// Arming while injection is off.
    #[error("fault injection is off (faults.enabled = false)")]
    Off,
}

impl From<FaultError> for crate::error::ApiError {
    fn from(error: FaultError) -> Self {
        crate::error::ApiError::validation(error.to_string())
    }
}

/// `[faults]`: off unless enabled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsConfig {
    /// Injection on: the hooks consult the injector. Off, no fault fires and the admin endpoint is absent.
    pub enabled: bool,
    /// Serve `GET`/`POST /admin/faults` (needs `enabled`).
    pub admin_endpoint: bool,
    /// Seed for every random choice (reproducible runs).
    pub seed: u64,
    /// Chance, per engine output, of a random engine fault (0 = none).
    pub probability: f64,
    /// Arm one random fault every this many milliseconds (0 = none).
    pub every_ms: u64,
    /// The kinds random faults are drawn from.
    pub kinds: Vec<FaultKind>,
    /// Default stall length (ms).
    pub stall_ms: u64,
    /// Default per-output delay of a slow engine (ms).
    pub slow_ms: u64,
    /// Default number of outputs a slow engine slows.
    pub slow_tokens: u32,
    /// Faults armed at start.
    pub inject: Vec<FaultSpec>,
}

impl Default for FaultsConfig {
    fn default() -> Self {
        FaultsConfig {
            enabled: false,
            admin_endpoint: false,
            seed: 0,
            probability: 0.0,
            every_ms: 0,
            kinds: vec![
                FaultKind::EnginePanic,
                FaultKind::EngineError,
                FaultKind::EngineStall,
            ],
            stall_ms: 2000,
            slow_ms: 20,
            slow_tokens: 50,
            inject: Vec::new(),
        }
    }
}

impl FaultsConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), FaultError> {
        if !(0.0..=1.0).contains(&self.probability) {
            return Err(FaultError::Probability(self.probability));
        }
        if (self.probability > 0.0 || self.every_ms > 0) && self.kinds.is_empty() {
            return Err(FaultError::NoKinds);
        }
        if self.admin_endpoint && !self.enabled {
            return Err(FaultError::AdminWithoutInjection);
        }
        if self.stall_ms == 0 || self.slow_ms == 0 || self.slow_tokens == 0 {
            return Err(FaultError::ZeroDefaults);
        }
        for (index, spec) in self.inject.iter().enumerate() {
            spec.validate().map_err(|problem| FaultError::Inject {
                index,
                problem: Box::new(problem),
            })?;
        }
        Ok(())
    }
}

/// What an engine must do after delivering an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineFault {
    /// Panic now.
    Panic,
    /// Stop producing output for this long.
    Stall(Duration),
    /// End the request with an engine-shutdown error.
    Error,
    /// Wait this long before the next output.
    Slow(Duration),
}

#[derive(Debug)]
struct Armed {
    spec: FaultSpec,
    remaining: u32,
}

#[derive(Debug)]
struct State {
    armed: Vec<Armed>,
    rng: StdRng,
    injected: BTreeMap<FaultKind, u64>,
    /// Engines slowed down: (engine, outputs left, delay).
    slowed: Vec<(u64, u32, Duration)>,
    /// Random faults of this kind only, instead of `faults.kinds` (a drill phase per kind).
    only: Option<FaultKind>,
}

/// The process's fault injector; see the module docs.
#[derive(Debug)]
pub struct FaultInjector {
    enabled: AtomicBool,
    config: FaultsConfig,
    state: Mutex<State>,
}

impl FaultInjector {
    /// An injector that never fires.
    pub fn disabled() -> Arc<Self> {
        Self::new(FaultsConfig::default())
    }

    /// An injector for `config` (with its `inject` list armed).
    pub fn new(config: FaultsConfig) -> Arc<Self> {
        let armed = config
            .inject
            .iter()
            .map(|spec| Armed {
                spec: spec.clone(),
                remaining: spec.count,
            })
            .collect();
        Arc::new(FaultInjector {
            enabled: AtomicBool::new(config.enabled),
            state: Mutex::new(State {
                armed,
                rng: StdRng::seed_from_u64(config.seed),
                injected: BTreeMap::new(),
                slowed: Vec::new(),
                only: None,
            }),
            config,
        })
    }

    /// Whether injection is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turns injection on or off at run time (the drill's fault-free baseline). Armed faults stay armed.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled
            .store(enabled && self.config.enabled, Ordering::Relaxed);
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &FaultsConfig {
        &self.config
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock (impossible by construction: no code here panics) must not
        // disable fault injection for the rest of the run.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Arms `spec`. Fails when injection is off or the spec is invalid.
    pub fn arm(&self, spec: FaultSpec) -> Result<(), FaultError> {
        if !self.is_enabled() {
            return Err(FaultError::Off);
        }
        spec.validate()?;
        let remaining = spec.count;
        self.state().armed.push(Armed { spec, remaining });
        Ok(())
    }

    /// Draws random faults (timer and per-output probability) of `kind` only, or again from
    /// `faults.kinds` with `None`; either way, faults armed and not yet fired are dropped.
    pub fn restrict(&self, kind: Option<FaultKind>) {
        let mut state = self.state();
        state.only = kind;
        state.armed.clear();
        state.slowed.clear();
    }

    /// The kinds random faults are drawn from.
    fn random_kinds(&self, state: &State) -> Vec<FaultKind> {
        match state.only {
            Some(kind) => vec![kind],
            None => self.config.kinds.clone(),
        }
    }

    /// Arms one fault of a kind drawn from `faults.kinds` (the `every_ms` timer).
    pub fn arm_random(&self) {
        if !self.is_enabled() {
            return;
        }
        let mut state = self.state();
        let kinds = self.random_kinds(&state);
        if kinds.is_empty() {
            return;
        }
        let kind = kinds[state.rng.gen_range(0..kinds.len())];
        state.armed.push(Armed {
            spec: FaultSpec::new(kind),
            remaining: 1,
        });
    }

    fn take(state: &mut State, pick: impl Fn(&FaultSpec) -> bool) -> Option<FaultSpec> {
        let index = state.armed.iter().position(|a| pick(&a.spec))?;
        let armed = &mut state.armed[index];
        armed.remaining -= 1;
        let spec = armed.spec.clone();
        if armed.remaining == 0 {
            state.armed.remove(index);
        }
        *state.injected.entry(spec.kind).or_default() += 1;
        Some(spec)
    }

    /// Called by engine `engine` after delivering output number `delivered` (1-based) of a request.
    pub fn on_engine_output(&self, engine: u64, delivered: u32) -> Option<EngineFault> {
        if !self.is_enabled() {
            return None;
        }
        let mut state = self.state();
        if let Some(slow) = state.slowed.iter_mut().find(|s| s.0 == engine) {
            slow.1 -= 1;
            let delay = slow.2;
            state.slowed.retain(|s| s.1 > 0);
            return Some(EngineFault::Slow(delay));
        }
        let mut spec = Self::take(&mut state, |s| {
            s.kind.is_engine()
                && !matches!(s.engine, Some(e) if e != engine)
                && delivered >= s.after_tokens.max(1)
        });
        if spec.is_none()
            && self.config.probability > 0.0
            && state.rng.gen_bool(self.config.probability)
        {
            let engine_kinds: Vec<FaultKind> = self
                .random_kinds(&state)
                .into_iter()
                .filter(|k| k.is_engine())
                .collect();
            if !engine_kinds.is_empty() {
                let kind = engine_kinds[state.rng.gen_range(0..engine_kinds.len())];
                *state.injected.entry(kind).or_default() += 1;
                spec = Some(FaultSpec::new(kind));
            }
        }
        let spec = spec?;
        let stall = Duration::from_millis(spec.duration_ms.unwrap_or(self.config.stall_ms));
        let slow = Duration::from_millis(spec.duration_ms.unwrap_or(self.config.slow_ms));
        Some(match spec.kind {
            FaultKind::EnginePanic => EngineFault::Panic,
            FaultKind::EngineStall => EngineFault::Stall(stall),
            FaultKind::EngineError => EngineFault::Error,
            FaultKind::EngineSlow => {
                let tokens = spec.tokens.unwrap_or(self.config.slow_tokens);
                if tokens > 1 {
                    state.slowed.push((engine, tokens - 1, slow));
                }
                EngineFault::Slow(slow)
            }
            FaultKind::RouterPanic
            | FaultKind::ValidatorPanic
            | FaultKind::HttpPanic
            | FaultKind::EmbeddingsPanic
            | FaultKind::IndexerPanic
            | FaultKind::MemoryServicePanic
            | FaultKind::RequestPlanePanic => return None,
        })
    }

    /// Called by the router for each request: true = panic now.
    pub fn on_route(&self) -> bool {
        self.is_enabled()
            && Self::take(&mut self.state(), |s| s.kind == FaultKind::RouterPanic).is_some()
    }

    /// Called by a validator for each request: true = panic now.
    pub fn on_validate(&self) -> bool {
        self.is_enabled()
            && Self::take(&mut self.state(), |s| s.kind == FaultKind::ValidatorPanic).is_some()
    }

    /// Called by the HTTP handlers for each inference request: true = panic now.
    pub fn on_http(&self) -> bool {
        self.is_enabled()
            && Self::take(&mut self.state(), |s| s.kind == FaultKind::HttpPanic).is_some()
    }

    /// Called by the KV indexer for each event: true = panic now.
    pub fn on_index(&self) -> bool {
        self.is_enabled()
            && Self::take(&mut self.state(), |s| s.kind == FaultKind::IndexerPanic).is_some()
    }

    /// Called by a worker's request plane for each output it relays: true = panic now.
    pub fn on_request_plane(&self) -> bool {
        self.is_enabled()
            && Self::take(&mut self.state(), |s| {
                s.kind == FaultKind::RequestPlanePanic
            })
            .is_some()
    }

    /// Called by the memory service for each request: true = panic now.
    pub fn on_memory(&self) -> bool {
        self.is_enabled()
            && Self::take(&mut self.state(), |s| {
                s.kind == FaultKind::MemoryServicePanic
            })
            .is_some()
    }

    /// Called by the embedding engine before each forward pass: true = panic now.
    pub fn on_embed(&self) -> bool {
        self.is_enabled()
            && Self::take(&mut self.state(), |s| s.kind == FaultKind::EmbeddingsPanic).is_some()
    }

    /// Faults injected so far, per kind.
    pub fn injected(&self) -> BTreeMap<FaultKind, u64> {
        self.state().injected.clone()
    }

    /// Total faults injected so far.
    pub fn injected_total(&self) -> u64 {
        self.state().injected.values().sum()
    }

    /// `GET /admin/faults`: what is armed and what has fired.
    pub fn status(&self) -> Value {
        let state = self.state();
        json!({
            "enabled": self.is_enabled(),
            "seed": self.config.seed,
            "probability": self.config.probability,
            "every_ms": self.config.every_ms,
            "armed": state.armed.iter().map(|a| json!({
                "spec": a.spec,
                "remaining": a.remaining,
            })).collect::<Vec<_>>(),
            "injected": state.injected.iter().map(|(k, v)| (k.as_str().to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

#[cfg(test)]
mod tests;
