//! [`GpuEngine`]: the [`Engine`] face of one GPU. Requests are queued on its [`Scheduler`] and a
//! driver task steps it while work is left; a panicked step or a device left unusable turns into a
//! panic of the next request, so the supervisor rebuilds the engine.
//!
//! Beside it:
//! - `scheduler`: [`Scheduler`] and [`Seq`], continuous batching over the paged KV cache.
//! - `runner`: [`StepRunner`], the seam to the device, and [`DeviceRunner`], the GPU behind it.
//! - `load`: [`GpuLoad`], the live counters `/health` and `/metrics` read.

mod load;
mod runner;
mod scheduler;

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use tokio::sync::mpsc;

use super::GpuEngineConfig;
use super::GpuError;
use crate::engine::mocker::KvEventSender;
pub use crate::engine::model::Emission;
use crate::engine::model::{admit_request, relay};
use crate::engine::{Engine, TokenSink};
use crate::error::ApiError;
use crate::kv::blocks::KvEventPublisher;
use crate::kv::protocol::KvCacheEventData;
use crate::protocol::engine::EngineRequest;

pub use load::GpuLoad;
pub use runner::{DeviceRunner, StepRunner};
pub use scheduler::{Scheduler, Seq};

struct Shared {
    scheduler: RefCell<Scheduler>,
    runner: RefCell<Box<dyn StepRunner>>,
    driver_running: Cell<bool>,
    poisoned: RefCell<Option<String>>,
    /// Why the device became unusable: every request from now on panics, so that the supervisor
    /// rebuilds the engine.
    fault: RefCell<Option<String>>,
    events: KvEventPublisher,
    vocab: usize,
    context_length: usize,
}

/// The model engine on one GPU; see the module docs.
pub struct GpuEngine {
    shared: Rc<Shared>,
}

impl GpuEngine {
    /// Open GPU `ordinal`, put the model at `path` on it (or re-attach weights this process already
    /// put there) and size the KV pool. Runs on the engine's thread.
    pub fn open(
        path: &Path,
        ordinal: usize,
        config: GpuEngineConfig,
        load: Arc<GpuLoad>,
        worker_id: u64,
        events: Option<KvEventSender>,
    ) -> Result<GpuEngine, GpuError> {
        let (runner, blocks) = DeviceRunner::open(path, ordinal, &config, &load)?;
        let shape = runner.weights.shape.clone();
        tracing::info!(
            device = %runner.device.info.name,
            ordinal,
            kv_blocks = blocks,
            kv_tokens = blocks * config.block_size,
            weights_load_ms = load.load_ms.load(Ordering::Relaxed),
            "GPU engine ready"
        );
        let (vocab, context_length) = (shape.vocab, shape.context_length);
        let scheduler = Scheduler::new(config, blocks, vocab, context_length, load);
        Ok(GpuEngine::with_runner(
            scheduler,
            Box::new(runner),
            worker_id,
            events,
            vocab,
            context_length,
        ))
    }

    /// An engine over `scheduler` and `runner` (the scheduler's tests pass a stand-in runner).
    pub fn with_runner(
        scheduler: Scheduler,
        runner: Box<dyn StepRunner>,
        worker_id: u64,
        events: Option<KvEventSender>,
        vocab: usize,
        context_length: usize,
    ) -> GpuEngine {
        GpuEngine {
            shared: Rc::new(Shared {
                scheduler: RefCell::new(scheduler),
                runner: RefCell::new(runner),
                driver_running: Cell::new(false),
                poisoned: RefCell::new(None),
                fault: RefCell::new(None),
                events: KvEventPublisher::new(worker_id, events),
                vocab,
                context_length,
            }),
        }
    }
}

impl Shared {
    fn send_events(&self, events: Vec<KvCacheEventData>) {
        self.events.send(events);
    }
}

impl Engine for GpuEngine {
    fn name(&self) -> &'static str {
        "model"
    }

    fn generate(&mut self, request: EngineRequest, sink: TokenSink) -> LocalBoxFuture<'static, ()> {
        run_request(self.shared.clone(), request, sink).boxed_local()
    }

    fn resync_kv(&mut self) -> usize {
        let events = match self.shared.scheduler.try_borrow() {
            Ok(s) => s.snapshot(),
            Err(_) => return 0,
        };
        let n = events.len();
        self.shared.send_events(events);
        n
    }
}

async fn run_request(shared: Rc<Shared>, request: EngineRequest, sink: TokenSink) {
    if let Some(fault) = shared.fault.borrow().clone() {
        // The supervisor rebuilds the engine (resetting the GPU's context) and retries the request.
        panic!("GPU engine unusable: {fault}");
    }
    let max_new = match admit_request(&request, shared.vocab, shared.context_length) {
        Ok(max_new) => max_new,
        Err(error) => return sink.fail(error).await,
    };
    let (out, outputs) = mpsc::unbounded_channel();
    match shared.scheduler.try_borrow_mut() {
        Ok(mut s) => s.push(Seq::new(request, max_new, out)),
        Err(_) => {
            sink.fail(ApiError::internal("GPU scheduler busy at enqueue"))
                .await;
            return;
        }
    }
    if !shared.driver_running.replace(true) {
        tokio::task::spawn_local(drive(shared.clone()));
    }
    if relay(outputs, &sink).await {
        return;
    }
    if let Some(fault) = shared.fault.borrow().clone() {
        panic!("GPU engine unusable: {fault}");
    }
    if let Some(reason) = shared.poisoned.borrow().clone() {
        panic!("GPU engine step panicked: {reason}");
    }
}

async fn drive(shared: Rc<Shared>) {
    loop {
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut scheduler = shared.scheduler.borrow_mut();
            let mut runner = shared.runner.borrow_mut();
            let more = scheduler.step(runner.as_mut());
            (more, scheduler.take_events(), scheduler.take_fault())
        }));
        match stepped {
            Ok((more, events, fault)) => {
                shared.send_events(events);
                if let Some(fault) = fault {
                    tracing::error!(%fault, "GPU engine unusable; it is rebuilt at its next request");
                    *shared.fault.borrow_mut() = Some(fault);
                    break;
                }
                if !more {
                    break;
                }
            }
            Err(payload) => {
                let reason = crate::supervision::panic_message(&*payload);
                tracing::error!(%reason, "GPU engine step panicked");
                *shared.poisoned.borrow_mut() = Some(reason);
                if let Ok(mut s) = shared.scheduler.try_borrow_mut() {
                    s.fail_all(&ApiError::internal("GPU engine step panicked"));
                }
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    shared.driver_running.set(false);
}
