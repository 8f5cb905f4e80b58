//! [`KvIndexerActor`]: the one writer of the shared prefix index. Engines send their KV events on
//! an unbounded channel (they must never block on the router); this actor applies them in order and
//! purges engines that leave. Request paths read the same index directly
//! ([`SharedKvIndex::find_matches`]), so a burst of events never queues a routing decision.

use actix::prelude::*;
use tokio::sync::mpsc;

use crate::kv::indexer::SharedKvIndex;
use crate::kv::protocol::{RouterEvent, WorkerId};

/// Applies KV events to the shared index.
pub struct KvIndexerActor {
    index: SharedKvIndex,
    events: Option<mpsc::UnboundedReceiver<RouterEvent>>,
    applied: u64,
    dropped: u64,
}

impl KvIndexerActor {
    /// An indexer writing `index`, fed by `events`.
    pub fn new(index: SharedKvIndex, events: mpsc::UnboundedReceiver<RouterEvent>) -> Self {
        KvIndexerActor {
            index,
            events: Some(events),
            applied: 0,
            dropped: 0,
        }
    }
}

impl Actor for KvIndexerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(mut events) = self.events.take() {
            ctx.add_stream(futures_util::stream::poll_fn(move |cx| {
                events.poll_recv(cx)
            }));
        }
    }
}

impl StreamHandler<RouterEvent> for KvIndexerActor {
    fn handle(&mut self, event: RouterEvent, _ctx: &mut Self::Context) {
        match self.index.apply(&event) {
            Ok(()) => self.applied += 1,
            Err(e) => {
                // An unknown parent means we missed part of that engine's history: drop the event,
                // as upstream does; its blocks arrive again when the engine stores them anew.
                self.dropped += 1;
                tracing::warn!(worker = event.worker_id, event_id = event.event.event_id, error = %e, "KV event dropped");
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {
        tracing::debug!(
            applied = self.applied,
            dropped = self.dropped,
            "KV event stream closed"
        );
    }
}

/// Forget every block of an engine that left.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoveWorker(pub WorkerId);

impl Handler<RemoveWorker> for KvIndexerActor {
    type Result = ();

    fn handle(&mut self, msg: RemoveWorker, _ctx: &mut Self::Context) {
        self.index.remove_worker(msg.0);
    }
}

/// How many events were applied and dropped so far.
#[derive(Message)]
#[rtype(result = "(u64, u64)")]
pub struct EventCounts;

impl Handler<EventCounts> for KvIndexerActor {
    type Result = MessageResult<EventCounts>;

    fn handle(&mut self, _msg: EventCounts, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult((self.applied, self.dropped))
    }
}
