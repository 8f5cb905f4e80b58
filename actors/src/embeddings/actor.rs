//! [`EmbeddingActor`]: owns the model and the [`BatchQueue`] on its own Arbiter thread.
//!
//! Batching falls out of actix's scheduling: an [`Embed`] only queues its rows and, if no pass is
//! pending, schedules one ([`RunBatch`], through `ctx.notify`). A forward pass blocks this thread, so
//! requests that arrive meanwhile wait in the mailbox; actix drains the whole mailbox before it runs
//! the next scheduled pass, so they are all queued by then and go through the model together.
//!
//! Supervision follows the engines': a panic in a forward pass is caught and the actor stops so that
//! its actix `Supervisor` restarts it on the same thread and mailbox. The queue survives the restart
//! (it is part of the actor value), so requests still waiting are served afterwards, and the rows of
//! the failed pass are computed again: embedding is a pure function of the input, so this is the
//! engine's migration, with nothing produced twice. A request whose rows were in
//! [`PASS_RETRIES`] + 1 failed passes gets a retryable error instead (an input that panics the model
//! every time must not restart it forever). Past the restart budget the engine refuses work.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::batch::{Batch, BatchLimits, BatchQueue};
use super::error::EmbedError;
use super::model::Embedder;
use crate::faults::FaultInjector;
use crate::supervision::{
    catch_panic, ActorKind, RestartTracker, SupervisionConfig, SupervisorEvents, Verdict,
};

/// Failed (panicked) forward passes a request's rows are computed again after; like the router's
/// restart retries, whatever `migration.limit` says: nothing was produced and no engine is left.
pub const PASS_RETRIES: u32 = 2;

/// Embed already validated and tokenized inputs; replies with one unit vector per input, in order.
#[derive(Message)]
#[rtype(result = "Result<Vec<Vec<f32>>, EmbedError>")]
pub struct Embed {
    /// Token ids, one row per input.
    pub inputs: Vec<Vec<u32>>,
}

/// Run one forward pass over the front of the queue (sent to itself).
#[derive(Message)]
#[rtype(result = "()")]
struct RunBatch;

/// The embedding engine.
pub struct EmbeddingActor {
    model: Arc<dyn Embedder>,
    queue: BatchQueue,
    /// What one forward pass may take (`embeddings.max_batch_size`, `max_batch_tokens`).
    limits: BatchLimits,
    /// A [`RunBatch`] is pending: later arrivals join the queue instead of scheduling another.
    scheduled: bool,
    /// Restart budget, the failure being restarted from, and why it was given up on (then every
    /// later request is refused with that reason).
    supervision: RestartTracker,
    faults: Arc<FaultInjector>,
}

impl EmbeddingActor {
    /// An engine computing with `model`, forward passes within `limits`.
    pub fn new(model: Arc<dyn Embedder>, limits: BatchLimits) -> Self {
        EmbeddingActor {
            model,
            queue: BatchQueue::default(),
            limits,
            scheduled: false,
            supervision: RestartTracker::new(ActorKind::Embeddings, "0")
                .with_budget(&SupervisionConfig::default()),
            faults: FaultInjector::disabled(),
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

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if !self.scheduled && !self.queue.is_empty() {
            self.scheduled = true;
            ctx.notify(RunBatch);
        }
    }

    /// A forward pass panicked: within budget, queue its rows again (or fail the requests out of
    /// retries) and restart; past it, fail everything waiting and refuse all work from now on.
    fn fault(&mut self, batch: Batch, reason: String, ctx: &mut Context<Self>) {
        tracing::error!(%reason, "embedding engine panicked");
        let failures = match self.supervision.on_failure(reason.clone()) {
            Verdict::Restart => {
                self.queue.retry(batch, PASS_RETRIES, EmbedError::Restarted);
                ctx.stop();
                return;
            }
            // Already stopping for an earlier failure: this pass is retried like the others.
            Verdict::AlreadyHandled => {
                self.queue.retry(batch, PASS_RETRIES, EmbedError::Restarted);
                return;
            }
            Verdict::GiveUp { failures } => failures,
        };
        let reason = format!(
            "The embedding engine failed {failures} times within its restart window and was taken out of service; last failure: {reason}"
        );
        tracing::error!("{reason}");
        self.queue
            .fail_all(EmbedError::OutOfService(reason.clone()));
        self.supervision.give_up(reason);
    }
}

impl Actor for EmbeddingActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Room for a full batch of single-input requests to wait while a pass computes; more wait
        // in their senders (backpressure), not in an unbounded queue.
        ctx.set_mailbox_capacity(self.limits.max_rows.max(16));
        // After a restart: requests that were waiting are still queued.
        self.schedule(ctx);
    }
}

impl Supervised for EmbeddingActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        // The scheduled pass was dropped with the old context.
        self.scheduled = false;
        let Some(reason) = self.supervision.on_restart() else {
            return;
        };
        // The model's weights are immutable and a failed pass leaves nothing behind in it, so the
        // restart keeps them (reloading 90 MB would only delay the requests still waiting).
        tracing::warn!(%reason, waiting = self.queue.len(), "embedding engine restarted");
        self.supervision.report_restarted(reason);
    }
}

impl Handler<Embed> for EmbeddingActor {
    type Result = ResponseFuture<Result<Vec<Vec<f32>>, EmbedError>>;

    fn handle(&mut self, msg: Embed, ctx: &mut Self::Context) -> Self::Result {
        if let Some(reason) = self.supervision.given_up() {
            let error = EmbedError::OutOfService(reason.to_string());
            return Box::pin(async move { Err(error) });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue.push(msg.inputs, reply);
        self.schedule(ctx);
        Box::pin(async move { answer.await.unwrap_or(Err(EmbedError::Stopped)) })
    }
}

impl Handler<RunBatch> for EmbeddingActor {
    type Result = ();

    fn handle(&mut self, _msg: RunBatch, ctx: &mut Self::Context) {
        self.scheduled = false;
        let Some(batch) = self.queue.next_batch(self.limits) else {
            return;
        };
        let (model, faults) = (&self.model, &self.faults);
        let rows = &batch.rows;
        let started = Instant::now();
        let pass = || {
            if faults.on_embed() {
                panic!("injected fault: the embedding forward pass panics");
            }
            model.embed(rows)
        };
        match catch_panic(pass) {
            Ok(Ok(vectors)) => {
                tracing::trace!(
                    rows = rows.len(),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "embedding pass"
                );
                self.queue.complete(batch, vectors);
            }
            Ok(Err(error)) => self.queue.fail(batch, error),
            Err(reason) => return self.fault(batch, reason, ctx),
        }
        self.schedule(ctx);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::supervision::SupervisorEvent;

    /// A model whose vector is `[first id, row length]`; token 666 panics, token 777 panics the
    /// first time it is seen, token 13 fails; records the size of every pass.
    #[derive(Default)]
    struct FakeModel {
        passes: std::sync::Mutex<Vec<usize>>,
        delay_ms: u64,
        calls: AtomicUsize,
        seen_777: std::sync::atomic::AtomicBool,
    }

    impl Embedder for FakeModel {
        fn dimensions(&self) -> usize {
            2
        }
        fn max_tokens(&self) -> usize {
            8
        }
        fn embed(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut passes) = self.passes.lock() {
                passes.push(rows.len());
            }
            std::thread::sleep(Duration::from_millis(self.delay_ms));
            if rows.iter().any(|r| r.contains(&666)) {
                panic!("injected: forward pass panics");
            }
            if rows.iter().any(|r| r.contains(&777)) && !self.seen_777.swap(true, Ordering::SeqCst)
            {
                panic!("injected: forward pass panics once");
            }
            if rows.iter().any(|r| r.contains(&13)) {
                return Err(EmbedError::Model("unlucky".into()));
            }
            Ok(rows
                .iter()
                .map(|r| vec![r[0] as f32, r.len() as f32])
                .collect())
        }
    }

    fn start(
        model: Arc<FakeModel>,
        max_batch_size: usize,
        max_restarts: u32,
    ) -> (
        Addr<EmbeddingActor>,
        Arbiter,
        tokio::sync::mpsc::UnboundedReceiver<SupervisorEvent>,
    ) {
        let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let arbiter = Arbiter::new();
        let supervision = SupervisionConfig {
            max_restarts,
            restart_window_secs: 60.0,
        };
        let addr = actix::Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
            let limits = BatchLimits {
                max_rows: max_batch_size,
                max_tokens: usize::MAX,
            };
            EmbeddingActor::new(model, limits).supervised(
                &supervision,
                events,
                FaultInjector::disabled(),
            )
        });
        (addr, arbiter, events_rx)
    }

    fn embed(
        addr: &Addr<EmbeddingActor>,
        rows: &[&[u32]],
    ) -> impl std::future::Future<Output = Result<Vec<Vec<f32>>, EmbedError>> {
        let request = addr.send(Embed {
            inputs: rows.iter().map(|r| r.to_vec()).collect(),
        });
        async move { request.await.unwrap_or(Err(EmbedError::Stopped)) }
    }

    #[actix_rt::test]
    async fn requests_arriving_during_a_pass_share_the_next_one() {
        let model = Arc::new(FakeModel {
            delay_ms: 50,
            ..FakeModel::default()
        });
        let (addr, arbiter, _events) = start(model.clone(), 32, 5);
        let requests: Vec<_> = (0..9u32)
            .map(|i| embed(&addr, &[&[i, 1, 2][..(1 + i as usize % 3)]]))
            .collect();
        let answers = futures_util::future::join_all(requests).await;
        for (i, answer) in answers.into_iter().enumerate() {
            let expected = vec![vec![i as f32, (1 + i % 3) as f32]];
            assert_eq!(answer, Ok(expected), "request {i}");
        }
        let passes = model.passes.lock().map(|p| p.clone()).unwrap_or_default();
        assert_eq!(passes.iter().sum::<usize>(), 9);
        assert!(passes.len() < 9, "no batching happened: passes {passes:?}");
        arbiter.stop();
    }

    #[actix_rt::test]
    async fn the_batch_size_caps_rows_per_pass() {
        let model = Arc::new(FakeModel::default());
        let (addr, arbiter, _events) = start(model.clone(), 3, 5);
        let rows: Vec<Vec<u32>> = (0..8).map(|i| vec![i]).collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let answer = embed(&addr, &refs).await.expect("embeds");
        assert_eq!(
            answer.iter().map(|v| v[0]).collect::<Vec<_>>(),
            (0..8).map(|i| i as f32).collect::<Vec<_>>()
        );
        let passes = model.passes.lock().map(|p| p.clone()).unwrap_or_default();
        assert_eq!(passes, vec![3, 3, 2]);
        arbiter.stop();
    }

    #[actix_rt::test]
    async fn a_pass_that_panicked_once_is_computed_again_after_the_restart() {
        let model = Arc::new(FakeModel::default());
        let (addr, arbiter, mut events) = start(model.clone(), 32, 5);
        let (a, b) = (embed(&addr, &[&[777], &[3]]), embed(&addr, &[&[4]]));
        let (a, b) = futures_util::future::join(a, b).await;
        assert_eq!(a, Ok(vec![vec![777.0, 1.0], vec![3.0, 1.0]]));
        assert_eq!(b, Ok(vec![vec![4.0, 1.0]]));
        let restarted = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
        assert!(
            matches!(restarted, Ok(Some(SupervisorEvent::Restarted { .. }))),
            "{restarted:?}"
        );
        arbiter.stop();
    }

    #[actix_rt::test]
    async fn a_pass_that_always_panics_fails_its_requests_after_retries_and_keeps_serving() {
        let model = Arc::new(FakeModel::default());
        let (addr, arbiter, mut events) = start(model.clone(), 32, 5);
        assert_eq!(embed(&addr, &[&[666]]).await, Err(EmbedError::Restarted));
        assert_eq!(
            model.calls.load(Ordering::SeqCst),
            1 + PASS_RETRIES as usize,
            "computed once and retried PASS_RETRIES times"
        );
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Some(SupervisorEvent::Restarted { actor, reason, .. })) => {
                assert_eq!(actor, crate::supervision::ActorKind::Embeddings);
                assert!(reason.contains("injected"), "{reason}");
            }
            other => panic!("expected a restart event, got {other:?}"),
        }
        assert_eq!(embed(&addr, &[&[7, 7]]).await, Ok(vec![vec![7.0, 2.0]]));
        assert_eq!(
            embed(&addr, &[&[13]]).await,
            Err(EmbedError::Model("unlucky".into())),
            "a model error fails the request without a restart"
        );
        assert_eq!(embed(&addr, &[&[5]]).await, Ok(vec![vec![5.0, 1.0]]));
        arbiter.stop();
    }

    #[actix_rt::test]
    async fn past_the_budget_it_refuses_work() {
        let model = Arc::new(FakeModel::default());
        let (addr, arbiter, _events) = start(model.clone(), 32, 1);
        // The first panic restarts the engine, the retry's panic spends the budget.
        for rows in [&[666u32][..], &[666][..], &[1][..]] {
            let refused = embed(&addr, &[rows]).await;
            assert!(
                matches!(&refused, Err(EmbedError::OutOfService(reason)) if reason.contains("taken out of service")),
                "{refused:?}"
            );
        }
        arbiter.stop();
    }
}
