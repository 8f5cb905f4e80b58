//! [`EngineActor`]: hosts one [`Engine`] on its own Arbiter thread and drives each admitted
//! request's generation future on that thread.

use std::sync::Arc;

use actix::prelude::*;
use futures_util::FutureExt;
use serde_json::json;
use tokio::sync::mpsc;

use super::{AdmissionSlot, Engine, EngineLoad, RequestProgress, RequestStage, TokenSink};
use crate::error::ApiError;
use crate::protocol::engine::{EngineEvent, EngineRequest};

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

/// The 529 error for an engine whose admission slots are all taken, naming the engine.
pub fn overloaded(id: u64, device: &str, capacity: usize) -> ApiError {
    ApiError::overloaded(json!({
        "engine_id": id,
        "device": device,
        "admission_capacity": capacity,
    }))
}

/// One engine on one device.
pub struct EngineActor {
    /// Stable id (the instance id used by routing overrides).
    id: u64,
    device: String,
    engine: Box<dyn Engine>,
    /// Requests admitted at once; the admission queue's capacity (enforced by the router's
    /// reservations; sizes the mailbox here).
    capacity: usize,
    /// Shared with the router and `/health`.
    load: Arc<EngineLoad>,
    /// Told when a request's first output is delivered and when it ends (the router's load
    /// tracking); `None` when nobody tracks load.
    progress: Option<Recipient<RequestProgress>>,
}

impl EngineActor {
    /// An actor for `engine` on `device`.
    pub fn new(
        id: u64,
        device: String,
        engine: Box<dyn Engine>,
        capacity: usize,
        load: Arc<EngineLoad>,
    ) -> Self {
        EngineActor {
            id,
            device,
            engine,
            capacity,
            load,
            progress: None,
        }
    }

    /// Reports request progress to `progress`.
    pub fn with_progress(mut self, progress: Recipient<RequestProgress>) -> Self {
        self.progress = Some(progress);
        self
    }
}

impl Actor for EngineActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.capacity.max(16));
        tracing::info!(engine = self.engine.name(), id = self.id, device = %self.device, "engine started");
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
        let request_id = request.request_id.clone();
        let mut sink = TokenSink::new(output, self.load.clone());
        if let Some(progress) = self.progress.clone() {
            let first = RequestProgress {
                engine_id: self.id,
                request_id: request_id.clone(),
                stage: RequestStage::FirstToken,
            };
            sink = sink.on_first_output(move || progress.do_send(first));
        }
        // A panic inside an engine must not take the actor (and its mailbox) down with it: it ends this
        // request's stream (the consumer sees the channel close early and reports an error).
        let run = std::panic::AssertUnwindSafe(self.engine.generate(request, sink)).catch_unwind();
        ctx.spawn(actix::fut::wrap_future::<_, Self>(run).map(move |result, act, _| {
            drop(admission);
            if result.is_err() {
                tracing::error!(engine = act.engine.name(), %request_id, "engine panicked while generating");
            }
            if let Some(progress) = &act.progress {
                progress.do_send(RequestProgress {
                    engine_id: act.id,
                    request_id,
                    stage: RequestStage::Finished,
                });
            }
        }));
    }
}
