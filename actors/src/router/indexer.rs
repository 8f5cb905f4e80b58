//! [`KvIndexerActor`]: the one writer of the shared prefix index. Engines send their KV events on
//! an unbounded channel (they must never block on the router); this actor applies them in order and
//! purges engines that leave. Request paths read the same index directly
//! ([`SharedKvIndex::find_matches`]), so a burst of events never queues a routing decision.
//!
//! Supervised: a panic while applying an event stops the actor and its supervisor restarts it with
//! an empty index (a half-applied event cannot be trusted); the root then asks the engines to send
//! their current blocks again (the `kv` subtree is rest-for-one). Events keep flowing meanwhile: the
//! channel outlives the restart. Past its restart budget the failure escalates to the root.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::mpsc;

use crate::faults::FaultInjector;
use crate::kv::indexer::SharedKvIndex;
use crate::kv::protocol::{RouterEvent, WorkerId};
use crate::supervision::{
    catch_panic, ActorKind, RestartTracker, SupervisionConfig, SupervisorEvents, Verdict,
};

/// Applies KV events to the shared index.
pub struct KvIndexerActor {
    index: SharedKvIndex,
    /// Shared with the stream reading it, so a restarted actor reads on from where it stopped.
    events: Rc<RefCell<mpsc::UnboundedReceiver<RouterEvent>>>,
    applied: u64,
    dropped: u64,
    faults: Arc<FaultInjector>,
    supervision: RestartTracker,
}

impl KvIndexerActor {
    /// An indexer writing `index`, fed by `events`. Build it on its own thread.
    pub fn new(index: SharedKvIndex, events: mpsc::UnboundedReceiver<RouterEvent>) -> Self {
        KvIndexerActor {
            index,
            events: Rc::new(RefCell::new(events)),
            applied: 0,
            dropped: 0,
            faults: FaultInjector::disabled(),
            supervision: RestartTracker::new(ActorKind::Indexer, "0")
                .with_budget(&SupervisionConfig::default()),
        }
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

    fn apply(&mut self, event: &RouterEvent) -> Result<(), String> {
        let (index, faults) = (&self.index, &self.faults);
        let applied = catch_panic(|| {
            if faults.on_index() {
                panic!("injected fault: indexer panic");
            }
            index.apply(event)
        })?;
        match applied {
            Ok(()) => self.applied += 1,
            Err(e) => {
                // An unknown parent means we missed part of that engine's history: drop the event,
                // as upstream does; its blocks arrive again when the engine stores them anew.
                self.dropped += 1;
                tracing::warn!(worker = event.worker_id, event_id = event.event.event_id, error = %e, "KV event dropped");
            }
        }
        Ok(())
    }
}

impl Actor for KvIndexerActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let events = self.events.clone();
        ctx.add_stream(futures_util::stream::poll_fn(move |cx| {
            events.borrow_mut().poll_recv(cx)
        }));
    }
}

impl Supervised for KvIndexerActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        let Some(reason) = self.supervision.on_restart() else {
            return;
        };
        self.index.clear();
        tracing::warn!(%reason, "KV indexer restarted with an empty index");
        self.supervision.report_restarted(reason);
    }
}

impl StreamHandler<RouterEvent> for KvIndexerActor {
    fn handle(&mut self, event: RouterEvent, ctx: &mut Self::Context) {
        if self.supervision.given_up().is_some() {
            return;
        }
        let Err(reason) = self.apply(&event) else {
            return;
        };
        tracing::error!(%reason, "KV indexer panicked");
        match self.supervision.on_failure(reason.clone()) {
            Verdict::Restart => ctx.stop(),
            Verdict::GiveUp { failures } => {
                self.supervision.escalate(failures, reason);
            }
            Verdict::AlreadyHandled => {}
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
