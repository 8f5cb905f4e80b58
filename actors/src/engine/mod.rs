//! Engines: the [`Engine`] trait (the seam between the serving path and whatever produces tokens), the
//! [`EngineActor`] that hosts one engine on its own Arbiter thread, and the engines of this build.
//!
//! Layout:
//! - `mod.rs`: [`Engine`], [`TokenSink`], [`EngineLoad`], [`EngineConfig`].
//! - [`actor`]: [`EngineActor`] and its messages ([`Generate`]).
//! - [`echo`]: Dynamo's `echo_full` / `echo_core` engines.
//! - [`mocker`]: the simulated vLLM worker (`out=mocker`).

pub mod actor;
pub mod echo;
pub mod gpu;
pub mod mocker;
pub mod model;
pub mod registry;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use actor::{overloaded, EngineActor, Generate, ProgressSink, ResyncKv, StartHere};
pub use mocker::{MockerConfig, MockerLoad};
pub use model::{LlamaModel, ModelEngineConfig, ModelLoad};

use crate::faults::{EngineFault, FaultInjector};
use crate::protocol::engine::{EngineEvent, EngineOutput, EngineRequest};

/// Which engine an [`EngineActor`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// Same as `echo_full`.
    Echo,
    /// Echo the last user message (or prompt) text, one character per step.
    EchoFull,
    /// Echo the templated prompt's token ids, one per step.
    EchoCore,
    /// Simulated vLLM worker: paged KV cache with prefix caching, scheduler, timing model, KV events.
    Mocker,
    /// The real model (SmolLM2 on CPU with candle), continuous batching.
    Model,
}

impl EngineKind {
    /// Parse an `out=` value.
    pub fn from_out(value: &str) -> Option<Self> {
        match value {
            "echo" => Some(EngineKind::Echo),
            "echo_full" => Some(EngineKind::EchoFull),
            "echo_core" => Some(EngineKind::EchoCore),
            "mocker" => Some(EngineKind::Mocker),
            "model" => Some(EngineKind::Model),
            _ => None,
        }
    }

    /// Name as written in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Echo => "echo",
            EngineKind::EchoFull => "echo_full",
            EngineKind::EchoCore => "echo_core",
            EngineKind::Mocker => "mocker",
            EngineKind::Model => "model",
        }
    }
}

/// `[engine]`: which engine runs and on which devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Engine kind (`echo`, `echo_full`, `echo_core`, `mocker`, `model`).
    pub kind: EngineKind,
    /// One EngineActor per device, each pinned to its own Arbiter thread: `cpu:N`, or `cuda:N` for
    /// the model engine on GPU N. `"auto"` (alone, or as an entry) takes every visible GPU for the
    /// model engine and falls back to `cpu:0` when there is none.
    #[serde(deserialize_with = "devices_or_auto")]
    pub devices: Vec<String>,
    /// Requests one engine accepts at once; beyond this the request is rejected as overloaded (529),
    /// so a saturated engine sheds load instead of queueing without bound.
    pub admission_capacity: usize,
    /// Capacity of each request's token channel (engine → HTTP); a slow client back-pressures the engine.
    pub stream_buffer: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kind: EngineKind::Echo,
            devices: vec!["cpu:0".into()],
            admission_capacity: 256,
            stream_buffer: 64,
        }
    }
}

/// `devices = "auto"` or `devices = ["cuda:0", ...]`.
fn devices_or_auto<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Devices {
        One(String),
        Many(Vec<String>),
    }
    match Devices::deserialize(d)? {
        Devices::One(one) => Ok(vec![one]),
        Devices::Many(many) => Ok(many),
    }
}

/// `[echo]`: settings of the echo engines.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EchoConfig {
    /// Delay before each emitted token (`DYN_TOKEN_ECHO_DELAY_MS`, default 10).
    pub token_delay_ms: u64,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig { token_delay_ms: 10 }
    }
}

/// Live load of one engine, shared so readers (router, health, metrics) never queue on its mailbox.
#[derive(Debug, Default)]
pub struct EngineLoad {
    /// Requests currently admitted.
    pub active: AtomicUsize,
    /// Tokens emitted since start.
    pub generated_tokens: AtomicU64,
    /// Requests that stopped early because their consumer went away.
    pub cancelled: AtomicU64,
    /// The engine was taken out of service; it no longer appears in `/health` as an instance.
    pub retired: std::sync::atomic::AtomicBool,
    /// Times its supervisor restarted it after a panic.
    pub restarts: AtomicU64,
    /// Why it was given up on (restart budget spent), for `/health`; `None` while it is serving.
    pub failure: std::sync::Mutex<Option<String>>,
}

impl EngineLoad {
    /// Requests currently admitted.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Why the engine was given up on, if it was.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records that the engine was given up on.
    pub fn set_failure(&self, reason: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    /// Reserves one of `capacity` admission slots, or `None` when all are taken. The router
    /// reserves before it hands a request over, so it learns of overload without a round trip
    /// through the engine's mailbox; the slot is released when the [`AdmissionSlot`] drops (the
    /// request finished, or the message carrying it was dropped with a dead engine's mailbox).
    pub fn try_admit(self: &Arc<Self>, capacity: usize) -> Option<AdmissionSlot> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |active| {
                (active < capacity).then_some(active + 1)
            })
            .ok()?;
        Some(AdmissionSlot { load: self.clone() })
    }
}

/// One reserved admission slot on an engine; see [`EngineLoad::try_admit`].
#[derive(Debug)]
pub struct AdmissionSlot {
    load: Arc<EngineLoad>,
}

impl Drop for AdmissionSlot {
    fn drop(&mut self) {
        self.load.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A point in a request's life on an engine that load tracking cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestStage {
    /// The first output reached the consumer's channel: prefill is done.
    FirstToken,
    /// Generation ended (finished, failed, cancelled or panicked).
    Finished,
}

/// What an engine reports to whoever tracks load (the router) as its requests progress.
#[derive(Clone, Debug)]
pub struct RequestProgress {
    /// The engine's instance id.
    pub engine_id: u64,
    /// The request.
    pub request_id: String,
    /// What happened.
    pub stage: RequestStage,
}

/// The consumer went away; generation should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

/// Where an engine writes one request's output: the bounded channel to the HTTP side.
pub struct TokenSink {
    sender: mpsc::Sender<EngineEvent>,
    load: Arc<EngineLoad>,
    /// Runs once, after the first output is delivered.
    on_first_output: std::cell::Cell<Option<Box<dyn FnOnce()>>>,
    /// Fault injection: the injector and this engine's instance id.
    faults: Option<(Arc<FaultInjector>, u64)>,
    /// Outputs delivered so far.
    delivered: std::cell::Cell<u32>,
}

impl TokenSink {
    /// A sink writing to `sender`, accounting into `load`.
    pub fn new(sender: mpsc::Sender<EngineEvent>, load: Arc<EngineLoad>) -> Self {
        TokenSink {
            sender,
            load,
            on_first_output: std::cell::Cell::new(None),
            faults: None,
            delivered: std::cell::Cell::new(0),
        }
    }

    /// Consults `faults` (as engine `engine_id`) after every delivered output.
    pub fn with_faults(mut self, faults: Arc<FaultInjector>, engine_id: u64) -> Self {
        if faults.is_enabled() {
            self.faults = Some((faults, engine_id));
        }
        self
    }

    /// Calls `hook` once, right after the first output has been delivered.
    pub fn on_first_output(self, hook: impl FnOnce() + 'static) -> Self {
        self.on_first_output.set(Some(Box::new(hook)));
        self
    }

    /// Send one output; waits for room (back-pressure). `Err(Cancelled)` when the consumer is gone.
    pub async fn send(&self, output: EngineOutput) -> Result<(), Cancelled> {
        let tokens = output
            .token_ids
            .len()
            .max(usize::from(output.text.is_some())) as u64;
        self.sender
            .send(Ok(output))
            .await
            .map_err(|_| self.cancelled_now())?;
        self.load
            .generated_tokens
            .fetch_add(tokens, Ordering::Relaxed);
        if let Some(hook) = self.on_first_output.take() {
            hook();
        }
        self.delivered.set(self.delivered.get().saturating_add(1));
        if let Some((faults, engine)) = &self.faults {
            if let Some(fault) = faults.on_engine_output(*engine, self.delivered.get()) {
                return self.inject(fault, *engine).await;
            }
        }
        Ok(())
    }

    /// Acts out an injected fault after a delivered output.
    async fn inject(&self, fault: EngineFault, engine: u64) -> Result<(), Cancelled> {
        match fault {
            EngineFault::Panic => panic!(
                "injected fault: engine {engine} panics after {} outputs",
                self.delivered.get()
            ),
            EngineFault::Stall(delay) | EngineFault::Slow(delay) => self.pause(delay).await,
            EngineFault::Error => {
                let error = crate::error::ApiError::new(
                    crate::error::ErrorClass::Unavailable,
                    format!("Engine {engine} shut down (injected fault)"),
                );
                let _ = self.sender.send(Err(error)).await;
                Err(Cancelled)
            }
        }
    }

    /// Send an error as the last event of the stream.
    pub async fn fail(&self, error: crate::error::ApiError) {
        let _ = self.sender.send(Err(error)).await;
    }

    /// Resolves when the consumer has gone away.
    pub async fn closed(&self) {
        self.sender.closed().await
    }

    /// Whether the consumer is gone.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    fn cancelled_now(&self) -> Cancelled {
        self.load.cancelled.fetch_add(1, Ordering::Relaxed);
        Cancelled
    }

    /// Wait `delay`, or return `Err(Cancelled)` as soon as the consumer goes away.
    pub async fn pause(&self, delay: std::time::Duration) -> Result<(), Cancelled> {
        if delay.is_zero() {
            return if self.is_closed() {
                Err(self.cancelled_now())
            } else {
                Ok(())
            };
        }
        tokio::select! {
            _ = self.sender.closed() => Err(self.cancelled_now()),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }
}

/// The seam between the serving path and a token producer. An engine lives on its EngineActor's thread;
/// `generate` returns a future that the actor drives there until the request finishes or is cancelled
/// (the sink reports the consumer going away).
pub trait Engine: 'static {
    /// Short name for logs and `/health` (`echo_full`, ...).
    fn name(&self) -> &'static str;
    /// Start generating `request` into `sink`.
    fn generate(&mut self, request: EngineRequest, sink: TokenSink) -> LocalBoxFuture<'static, ()>;

    /// Send every cached KV block again as `stored` events (the router's index was rebuilt);
    /// returns how many. Engines that publish no KV events send nothing.
    fn resync_kv(&mut self) -> usize {
        0
    }
}

/// Everything needed to build one engine on its own thread (sent there, hence `Send`).
#[derive(Clone)]
pub struct EngineSpec {
    /// Which engine.
    pub kind: EngineKind,
    /// The engine's instance id (also its KV-event worker id).
    pub instance_id: u64,
    /// Echo engine settings.
    pub echo: EchoConfig,
    /// Mocker settings.
    pub mocker: mocker::MockerConfig,
    /// Vocabulary ids the mocker draws generated tokens from (real words, so responses read as text).
    pub output_tokens: Arc<[u32]>,
    /// Where the mocker publishes KV events (`None`: no events).
    pub kv_events: Option<mocker::KvEventSender>,
    /// The mocker's live load, shared with `/health`.
    pub mocker_load: Arc<mocker::MockerLoad>,
    /// The model engine's weights, loaded once per process and shared by its engines and their
    /// restarts (`None` unless the kind is `model`).
    pub model: Option<Arc<model::LlamaModel>>,
    /// Model engine settings.
    pub model_engine: model::ModelEngineConfig,
    /// The model engine's live state, shared with `/health`.
    pub model_load: Arc<model::ModelLoad>,
    /// The device this engine runs on (`cpu:0`, `cuda:1`; `auto` is resolved before engines start).
    pub device: String,
    /// GPU engine settings.
    pub gpu_engine: gpu::GpuEngineConfig,
    /// The GPU engine's live state, shared with `/health` and `/metrics`.
    pub gpu_load: Arc<gpu::GpuLoad>,
}

/// Build the engine described by `spec`. Runs on the engine's own thread.
pub fn build_engine(spec: EngineSpec) -> Box<dyn Engine> {
    let delay = std::time::Duration::from_millis(spec.echo.token_delay_ms);
    match spec.kind {
        EngineKind::Echo | EngineKind::EchoFull => Box::new(echo::EchoFull::new(delay)),
        EngineKind::EchoCore => Box::new(echo::EchoCore::new(delay)),
        EngineKind::Mocker => Box::new(mocker::MockerEngine::new(
            spec.mocker,
            spec.instance_id,
            spec.output_tokens,
            spec.kv_events,
            spec.mocker_load,
        )),
        EngineKind::Model => match (spec.model, gpu::DeviceSpec::parse(&spec.device)) {
            (Some(weights), Ok(gpu::DeviceSpec::Cuda(ordinal))) => match gpu::GpuEngine::open(
                &weights.path,
                ordinal,
                spec.gpu_engine,
                spec.gpu_load,
                spec.instance_id,
                spec.kv_events,
            ) {
                Ok(engine) => Box::new(engine),
                Err(e) => {
                    tracing::error!(device = %spec.device, error = %e, "GPU engine failed to start");
                    Box::new(Unavailable(format!(
                        "the engine on {} failed to start: {e}",
                        spec.device
                    )))
                }
            },
            (Some(weights), _) => Box::new(model::ModelEngine::new(
                weights,
                spec.model_engine,
                spec.model_load,
            )),
            (None, _) => Box::new(Unavailable(
                "engine kind `model` started without model weights".into(),
            )),
        },
    }
}

/// An engine that fails every request with `reason`.
pub(crate) fn unavailable(reason: String) -> Box<dyn Engine> {
    Box::new(Unavailable(reason))
}

/// An engine that cannot serve (it was built without what it needs): every request fails with the
/// reason. Startup checks make this unreachable in practice; it keeps `build_engine` infallible.
struct Unavailable(String);

impl Engine for Unavailable {
    fn name(&self) -> &'static str {
        "unavailable"
    }

    fn generate(
        &mut self,
        _request: EngineRequest,
        sink: TokenSink,
    ) -> LocalBoxFuture<'static, ()> {
        let reason = self.0.clone();
        Box::pin(async move { sink.fail(crate::error::ApiError::internal(reason)).await })
    }
}
