//! [`EngineActor`]: hosts one [`Engine`] on its own Arbiter thread, admits requests up to its capacity and
//! drives each admitted request's generation future on that thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use futures_util::FutureExt;
use serde_json::json;
use tokio::sync::mpsc;

use super::{Engine, EngineLoad, TokenSink};
use crate::error::ApiError;
use crate::protocol::engine::{EngineEvent, EngineRequest};

/// Start generating `request`, writing its output into `output`. Replies once the request is admitted
/// (or rejected as overloaded); the tokens arrive on the channel.
#[derive(Message)]
#[rtype(result = "Result<(), ApiError>")]
pub struct Generate {
    /// The validated request.
    pub request: EngineRequest,
    /// The bounded channel to the consumer.
    pub output: mpsc::Sender<EngineEvent>,
}

/// One engine on one device.
pub struct EngineActor {
    /// Stable id (the instance id used by routing overrides).
    id: u64,
    device: String,
    engine: Box<dyn Engine>,
    /// Requests admitted at once; the admission queue's capacity.
    capacity: usize,
    /// Shared with the router and `/health`, written only here.
    load: Arc<EngineLoad>,
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
        }
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
    type Result = Result<(), ApiError>;

    fn handle(&mut self, msg: Generate, ctx: &mut Self::Context) -> Self::Result {
        if self.load.active() >= self.capacity {
            return Err(ApiError::overloaded(json!({
                "engine_id": self.id,
                "device": self.device,
                "admission_capacity": self.capacity,
            })));
        }
        self.load.active.fetch_add(1, Ordering::Relaxed);
        let request_id = msg.request.request_id.clone();
        let sink = TokenSink::new(msg.output, self.load.clone());
        // A panic inside an engine must not take the actor (and its mailbox) down with it: it ends this
        // request's stream (the consumer sees the channel close early and reports an error).
        let run =
            std::panic::AssertUnwindSafe(self.engine.generate(msg.request, sink)).catch_unwind();
        let load = self.load.clone();
        ctx.spawn(actix::fut::wrap_future::<_, Self>(run).map(move |result, act, _| {
            load.active.fetch_sub(1, Ordering::Relaxed);
            if result.is_err() {
                tracing::error!(engine = act.engine.name(), %request_id, "engine panicked while generating");
            }
        }));
        Ok(())
    }
}
