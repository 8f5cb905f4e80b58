//! Engines: the [`Engine`] trait (the seam between the serving path and whatever produces tokens), the
//! [`EngineActor`] that hosts one engine on its own Arbiter thread, and the engines of this build.
//!
//! Layout:
//! - `mod.rs`: [`Engine`], [`TokenSink`], [`EngineLoad`], [`EngineConfig`].
//! - [`actor`]: [`EngineActor`] and its messages ([`Generate`]).
//! - [`echo`]: Dynamo's `echo_full` / `echo_core` engines.

pub mod actor;
pub mod echo;
pub mod mocker;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use actor::{overloaded, EngineActor, Generate};

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
}

impl EngineKind {
    /// Parse an `out=` value.
    pub fn from_out(value: &str) -> Option<Self> {
        match value {
            "echo" => Some(EngineKind::Echo),
            "echo_full" => Some(EngineKind::EchoFull),
            "echo_core" => Some(EngineKind::EchoCore),
            _ => None,
        }
    }

    /// Name as written in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Echo => "echo",
            EngineKind::EchoFull => "echo_full",
            EngineKind::EchoCore => "echo_core",
        }
    }
}

/// `[engine]`: which engine runs and on which devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Engine kind (`echo`, `echo_full`, `echo_core`).
    pub kind: EngineKind,
    /// One EngineActor per device, each pinned to its own Arbiter thread (`cpu:0`, `cpu:1`, ...).
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
}

impl EngineLoad {
    /// Requests currently admitted.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
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

/// The consumer went away; generation should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

/// Where an engine writes one request's output: the bounded channel to the HTTP side.
pub struct TokenSink {
    sender: mpsc::Sender<EngineEvent>,
    load: Arc<EngineLoad>,
}

impl TokenSink {
    /// A sink writing to `sender`, accounting into `load`.
    pub fn new(sender: mpsc::Sender<EngineEvent>, load: Arc<EngineLoad>) -> Self {
        TokenSink { sender, load }
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
        Ok(())
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
}

/// Build the engine of `kind`.
pub fn build_engine(kind: EngineKind, echo: &EchoConfig) -> Box<dyn Engine> {
    let delay = std::time::Duration::from_millis(echo.token_delay_ms);
    match kind {
        EngineKind::Echo | EngineKind::EchoFull => Box::new(echo::EchoFull::new(delay)),
        EngineKind::EchoCore => Box::new(echo::EchoCore::new(delay)),
    }
}
