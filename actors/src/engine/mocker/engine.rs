//! [`MockerEngine`]: the [`Engine`] face of the simulated worker.
//!
//! All requests of one engine share one [`Scheduler`] (`Rc<RefCell<..>>`: the engine lives on a single
//! Arbiter thread). A driver task, spawned with `tokio::task::spawn_local` when a request arrives and no
//! driver is running, repeats: step the scheduler, sleep for the step's simulated duration, publish the
//! KV events, hand each produced token to its request's future. It exits when no request is left, so an
//! idle engine costs nothing. Each request's future forwards its tokens into its [`TokenSink`]; when the
//! consumer goes away, or the future is dropped, the request leaves the scheduler and frees its blocks.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::scheduler::{Emission, RequestKey, Scheduler, StepReport};
use super::{KvEventSender, MockerConfig, MockerLoad};
use crate::engine::{Engine, TokenSink};
use crate::error::ApiError;
use crate::kv::blocks::KvEventPublisher;
use crate::kv::protocol::KvCacheEventData;
use crate::protocol::engine::{EngineOutput, EngineRequest};
use crate::protocol::FinishReason;

/// How long the driver waits before trying again when requests are queued but none could be scheduled
/// (Dynamo's 1 ms scheduling tick).
const SCHEDULE_TICK: Duration = Duration::from_millis(1);

/// How far the driver may fall behind its simulated timeline before it stops catching up. Sleeps are
/// aimed at cumulative deadlines so the timer's 1 ms granularity does not add up over many short
/// steps; past this lag (a stalled thread) it restarts the timeline from now instead of bursting.
const MAX_LAG: Duration = Duration::from_millis(50);

/// A simulated vLLM worker; see the module docs of [`crate::engine::mocker`].
pub struct MockerEngine {
    shared: Rc<Shared>,
}

/// What the engine, its driver and its request futures share (one thread).
struct Shared {
    scheduler: RefCell<Scheduler>,
    /// Each queued request's token channel. Unbounded so the scheduler never waits on one slow
    /// consumer; a request's backlog is bounded by its token count.
    outputs: RefCell<HashMap<RequestKey, mpsc::UnboundedSender<Emission>>>,
    /// Cancellations that arrived while the scheduler was borrowed; applied before the next step.
    deferred_cancels: RefCell<Vec<RequestKey>>,
    /// Whether a driver task is alive.
    driver_running: Cell<bool>,
    default_max_tokens: u32,
    events: KvEventPublisher,
    load: Arc<MockerLoad>,
}

impl MockerEngine {
    /// A mocker publishing KV events as `worker_id` into `events` (none when `None` or with prefix
    /// caching off) and its load into `load`, generating tokens drawn from `output_tokens` (real
    /// vocabulary ids; token 0 if the list is empty). An invalid `config` is not an error here: each
    /// bad field is replaced by the nearest valid value (call [`MockerConfig::validate`] first).
    pub fn new(
        config: MockerConfig,
        worker_id: u64,
        output_tokens: Arc<[u32]>,
        events: Option<KvEventSender>,
        load: Arc<MockerLoad>,
    ) -> Self {
        if let Err(problem) = config.validate() {
            tracing::warn!(%problem, "invalid mocker config; using the nearest valid values");
        }
        let config = config.sanitized();
        let default_max_tokens = config.default_max_tokens;
        let scheduler = Scheduler::new(config, output_tokens, events.is_some());
        MockerEngine {
            shared: Rc::new(Shared {
                scheduler: RefCell::new(scheduler),
                outputs: RefCell::new(HashMap::new()),
                deferred_cancels: RefCell::new(Vec::new()),
                driver_running: Cell::new(false),
                default_max_tokens,
                events: KvEventPublisher::new(worker_id, events),
                load,
            }),
        }
    }
}

impl Engine for MockerEngine {
    fn name(&self) -> &'static str {
        "mocker"
    }

    fn generate(&mut self, request: EngineRequest, sink: TokenSink) -> LocalBoxFuture<'static, ()> {
        run_request(self.shared.clone(), request, sink).boxed_local()
    }

    fn resync_kv(&mut self) -> usize {
        // What happened before the snapshot goes out first, so nothing older follows it.
        self.shared.publish_events();
        let snapshot = match self.shared.scheduler.try_borrow() {
            Ok(scheduler) => scheduler.kv_snapshot(),
            Err(_) => return 0,
        };
        let blocks = snapshot.len();
        self.shared.send_events(snapshot);
        blocks
    }
}

/// One request's life: queue it, forward its tokens, leave the scheduler when done or abandoned.
async fn run_request(shared: Rc<Shared>, request: EngineRequest, sink: TokenSink) {
    let max_tokens = request
        .stop
        .max_tokens
        .unwrap_or(shared.default_max_tokens)
        .max(1);
    let seed = xxhash_rust::xxh3::xxh3_64(request.request_id.as_bytes());
    let (sender, mut tokens) = mpsc::unbounded_channel();
    let queued = {
        let Ok(mut scheduler) = shared.scheduler.try_borrow_mut() else {
            sink.fail(ApiError::internal("mocker scheduler busy at enqueue"))
                .await;
            return;
        };
        let queued = scheduler.enqueue(seed, request.token_ids, max_tokens as usize);
        shared.load.publish(&scheduler);
        queued
    };
    let key = match queued {
        Ok(key) => key,
        Err(problem) => {
            sink.fail(ApiError::validation(problem)).await;
            return;
        }
    };
    shared.outputs.borrow_mut().insert(key, sender);
    let _membership = Membership {
        shared: shared.clone(),
        key,
    };
    start_driver(&shared);

    loop {
        let emission = tokio::select! {
            biased;
            emission = tokens.recv() => emission,
            _ = sink.closed() => {
                // Counts the cancellation in the engine load.
                let _ = sink.pause(Duration::ZERO).await;
                return;
            }
        };
        let Some(emission) = emission else {
            // The engine dropped the request's channel: it no longer exists there.
            sink.fail(ApiError::internal("mocker dropped a running request"))
                .await;
            return;
        };
        let output = EngineOutput {
            token_ids: vec![emission.token],
            finish_reason: emission.finished.then_some(FinishReason::Length),
            cached_tokens: emission
                .cached_tokens
                .map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
            ..Default::default()
        };
        if sink.send(output).await.is_err() || emission.finished {
            return;
        }
    }
}

/// A request's place in the scheduler; leaving (finished, cancelled, or the future dropped) frees it.
struct Membership {
    shared: Rc<Shared>,
    key: RequestKey,
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Ok(mut outputs) = self.shared.outputs.try_borrow_mut() {
            outputs.remove(&self.key);
        }
        match self.shared.scheduler.try_borrow_mut() {
            Ok(mut scheduler) => {
                scheduler.cancel(self.key);
                self.shared.load.publish(&scheduler);
            }
            Err(_) => self.shared.deferred_cancels.borrow_mut().push(self.key),
        }
    }
}

/// Spawn the driver unless one is alive. Must run inside a `LocalSet` (an actix Arbiter or System).
fn start_driver(shared: &Rc<Shared>) {
    if shared.driver_running.replace(true) {
        return;
    }
    tokio::task::spawn_local(drive(shared.clone()));
}

/// Resets the running flag however the driver ends (idle, or its runtime shutting down).
struct DriverAlive(Rc<Shared>);

impl Drop for DriverAlive {
    fn drop(&mut self) {
        self.0.driver_running.set(false);
    }
}

/// Step, sleep, deliver; until no request is left.
async fn drive(shared: Rc<Shared>) {
    let _alive = DriverAlive(shared.clone());
    let mut deadline = Instant::now();
    loop {
        let report = shared.step();
        if report.scheduled == 0 && shared.is_idle() {
            shared.publish_events();
            return;
        }
        let wall = if report.scheduled == 0 {
            SCHEDULE_TICK
        } else {
            Duration::try_from_secs_f64(report.duration_ms / 1000.0).unwrap_or(Duration::ZERO)
        };
        let now = Instant::now();
        if deadline + MAX_LAG < now {
            deadline = now;
        }
        deadline += wall;
        if deadline > now {
            tokio::time::sleep_until(deadline).await;
        } else {
            // Behind schedule: catch up, but let the token consumers run between steps.
            tokio::task::yield_now().await;
        }
        shared.publish_events();
        shared.deliver(report.emissions);
        if shared.is_idle() {
            return;
        }
    }
}

impl Shared {
    fn step(&self) -> StepReport {
        let Ok(mut scheduler) = self.scheduler.try_borrow_mut() else {
            return StepReport::default();
        };
        for key in self.deferred_cancels.borrow_mut().drain(..) {
            scheduler.cancel(key);
        }
        let report = scheduler.step();
        self.load.publish(&scheduler);
        report
    }

    fn is_idle(&self) -> bool {
        self.scheduler
            .try_borrow()
            .is_ok_and(|scheduler| scheduler.is_idle())
    }

    fn deliver(&self, emissions: Vec<Emission>) {
        let mut outputs = self.outputs.borrow_mut();
        for emission in emissions {
            if let Some(sender) = outputs.get(&emission.key) {
                let _ = sender.send(emission);
            }
            if emission.finished {
                outputs.remove(&emission.key);
            }
        }
    }

    fn publish_events(&self) {
        let Ok(mut scheduler) = self.scheduler.try_borrow_mut() else {
            return;
        };
        let events = scheduler.take_events();
        drop(scheduler);
        self.send_events(events);
    }

    fn send_events(&self, events: Vec<KvCacheEventData>) {
        self.events.send(events);
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
