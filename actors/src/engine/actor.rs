//! [`EngineActor`]: hosts one [`Engine`] on its own Arbiter thread and drives each admitted
//! request's generation future on that thread.

use std::sync::Arc;

use actix::prelude::*;
use futures_util::FutureExt;
use serde_json::json;
use tokio::sync::mpsc;

use super::{
    build_engine, AdmissionSlot, Engine, EngineLoad, EngineSpec, RequestProgress, RequestStage,
    TokenSink,
};
use crate::error::ApiError;
use crate::faults::FaultInjector;
use crate::kv::protocol::{KvCacheEvent, KvCacheEventData, RouterEvent};
use crate::protocol::engine::{EngineEvent, EngineRequest};
use crate::supervision::{
    catch_panic, panic_message, ActorKind, RestartTracker, SupervisionConfig, SupervisorEvent,
    SupervisorEvents, Verdict,
};

/// Start generating `request`, writing its output into `output`. Fire-and-forget: the sender has
/// already reserved the request's admission slot ([`EngineLoad::try_admit`]), so there is nothing
/// to reply; the tokens (or the channel closing) are the answer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Generate {
    /// The validated request.
    pub request: EngineRequest,
    /// The bounded channel to the consumer.
    pub output: mpsc::Sender<EngineEvent>,
    /// The admission slot, held until generation ends.
    pub admission: AdmissionSlot,
}

/// An engine that can start a request on the thread that routes it, without a mailbox hop: the
/// frontend's remote engines, whose work is request-plane I/O that any serving thread can drive on
/// its own connections. Every other engine has an actor and a thread of its own.
pub trait StartHere: Send + Sync {
    /// Whether the calling thread can run a request of this engine (it is an actix arbiter, and
    /// the engine's transport has per-thread connections); if not, the router sends the request
    /// to the engine's mailbox.
    fn can_start_here(&self) -> bool;
    /// Start `msg` on the calling thread (after [`StartHere::can_start_here`] said it can).
    fn start_here(&self, msg: Generate);
}

/// The 529 error for an engine whose admission slots are all taken, naming the engine.
pub fn overloaded(id: u64, device: &str, capacity: usize) -> ApiError {
    ApiError::overloaded(json!({
        "engine_id": id,
        "device": device,
        "admission_capacity": capacity,
    }))
}

/// Who an [`EngineActor`] reports to, set once the router exists (the router is started after the
/// engines, which it routes to).
pub type ProgressSink = Arc<std::sync::OnceLock<Arc<crate::router::Router>>>;

/// One engine on one device, supervised: a panic while generating stops the actor and its supervisor
/// restarts it with a freshly built engine (fresh KV state) on the same thread and mailbox. Every
/// request running on it at that moment loses its stream, which the serving path sees as a migratable
/// failure. Past the restart budget the engine gives up and asks the root supervisor to take it out of
/// routing.
pub struct EngineActor {
    /// Stable id (the instance id used by routing overrides).
    id: u64,
    device: String,
    engine: Box<dyn Engine>,
    /// How to build the engine again after a restart.
    spec: EngineSpec,
    /// Requests admitted at once; the admission queue's capacity (enforced by the router's
    /// reservations; sizes the mailbox here).
    capacity: usize,
    /// Shared with the router and `/health`.
    load: Arc<EngineLoad>,
    /// Told when a request's first output is delivered and when it ends (the router's load
    /// tracking); unset when nobody tracks load.
    progress: ProgressSink,
    faults: Arc<FaultInjector>,
    /// Restart budget, the failure being restarted from, whether the engine was given up on (then
    /// it is out of service and refuses work), and the reports to the root.
    supervision: RestartTracker,
}

impl EngineActor {
    /// An actor for the engine `spec` describes on `device` (builds the engine: call on its thread).
    pub fn new(
        id: u64,
        device: String,
        spec: EngineSpec,
        capacity: usize,
        load: Arc<EngineLoad>,
    ) -> Self {
        EngineActor {
            id,
            device,
            engine: build_engine(spec.clone()),
            spec,
            capacity,
            load,
            progress: ProgressSink::default(),
            faults: FaultInjector::disabled(),
            supervision: RestartTracker::new(ActorKind::Engine, id.to_string())
                .with_budget(&SupervisionConfig::default()),
        }
    }

    /// Reports request progress to whoever `progress` is set to.
    pub fn with_progress(mut self, progress: ProgressSink) -> Self {
        self.progress = progress;
        self
    }

    /// Supervision: restart budget, where to report restarts, and the fault injector.
    pub fn supervised(
        mut self,
        config: &SupervisionConfig,
        events: SupervisorEvents,
        faults: Arc<FaultInjector>,
    ) -> Self {
        self.supervision.supervise(config, events);
        self.faults = faults;
        self
    }

    /// A panic was caught: restart within budget, otherwise give up.
    fn fault(&mut self, reason: String, ctx: &mut Context<Self>) {
        let verdict = self.supervision.on_failure(reason.clone());
        if verdict == Verdict::AlreadyHandled {
            return;
        }
        tracing::error!(engine = self.id, device = %self.device, %reason, "engine panicked");
        if let Verdict::GiveUp { failures } = verdict {
            let reason = format!(
                "engine {} ({}) failed {failures} times within its restart window and was taken out of service; last failure: {reason}",
                self.id,
                self.device,
            );
            self.supervision.give_up(reason.clone());
            self.load.set_failure(reason.clone());
            self.supervision.report(SupervisorEvent::EngineFailed {
                engine_id: self.id,
                reason,
            });
        }
        // Stopping drops every request future spawned on this context: their streams end, and the
        // serving path migrates them.
        ctx.stop();
    }
}

impl Actor for EngineActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.capacity.max(16));
        tracing::info!(engine = self.engine.name(), id = self.id, device = %self.device, "engine started");
    }
}

impl Supervised for EngineActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // `None` for a stop that followed no failure.
        let Some(reason) = self.supervision.on_restart() else {
            return;
        };
        // Rebuilt from scratch: a fresh KV cache. The router's index forgets what the old one held.
        // The old engine goes first, so a GPU engine's KV pool is freed before the new one sizes its
        // own from the free memory.
        self.engine = super::unavailable("the engine is restarting".into());
        self.engine = build_engine(self.spec.clone());
        if let Some(kv_events) = &self.spec.kv_events {
            let _ = kv_events.send(RouterEvent {
                worker_id: self.id,
                event: KvCacheEvent {
                    event_id: 0,
                    data: KvCacheEventData::Cleared,
                    dp_rank: 0,
                },
            });
        }
        self.load
            .restarts
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(engine = self.id, device = %self.device, %reason, "engine restarted");
        self.supervision.report_restarted(reason);
    }
}

impl Handler<Generate> for EngineActor {
    type Result = ();

    fn handle(&mut self, msg: Generate, ctx: &mut Self::Context) -> Self::Result {
        let Generate {
            request,
            output,
            admission,
        } = msg;
        if self.supervision.given_up().is_some() {
            // Out of service: dropping the output channel ends the request's stream (migratable).
            return;
        }
        let request_id = request.request_id.clone();
        let mut sink =
            TokenSink::new(output, self.load.clone()).with_faults(self.faults.clone(), self.id);
        if let Some(progress) = self.progress.get().cloned() {
            let first = RequestProgress {
                engine_id: self.id,
                request_id: request_id.clone(),
                stage: RequestStage::FirstToken,
            };
            sink = sink.on_first_output(move || progress.progress(&first));
        }
        // A panic inside an engine — building the request's future or running it — is a fault to
        // supervise: the actor stops and restarts (see `fault`).
        let engine = &mut self.engine;
        let run = match catch_panic(|| engine.generate(request, sink)) {
            Ok(run) => run,
            Err(reason) => {
                drop(admission);
                self.fault(reason, ctx);
                return;
            }
        };
        let run = std::panic::AssertUnwindSafe(run).catch_unwind();
        ctx.spawn(
            actix::fut::wrap_future::<_, Self>(run).map(move |result, act, ctx| {
                drop(admission);
                if let Some(progress) = act.progress.get() {
                    progress.progress(&RequestProgress {
                        engine_id: act.id,
                        request_id,
                        stage: RequestStage::Finished,
                    });
                }
                if let Err(payload) = result {
                    act.fault(panic_message(&*payload), ctx);
                }
            }),
        );
    }
}

/// The router's index was rebuilt (its writer restarted): send every cached KV block again.
/// Replies with how many blocks were sent.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct ResyncKv;

impl Handler<ResyncKv> for EngineActor {
    type Result = usize;

    fn handle(&mut self, _msg: ResyncKv, ctx: &mut Self::Context) -> usize {
        if self.supervision.given_up().is_some() {
            return 0;
        }
        let engine = &mut self.engine;
        let blocks = match catch_panic(|| engine.resync_kv()) {
            Ok(blocks) => blocks,
            Err(reason) => {
                self.fault(reason, ctx);
                return 0;
            }
        };
        tracing::info!(
            engine = self.id,
            blocks,
            "KV blocks sent again for the rebuilt index"
        );
        blocks
    }
}
