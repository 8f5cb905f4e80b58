//! [`ModelEngine`]: the [`Engine`] face of the model, its scheduler and the driver task.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::LocalBoxFuture;
use futures_util::FutureExt;
use tokio::sync::mpsc;

use super::forward::{forward, BatchItem, SeqCache};
use super::sampler::Sampler;
use super::{Emission, LlamaModel, ModelEngineConfig};
use crate::engine::{Engine, TokenSink};
use crate::error::{ApiError, ErrorClass};
use crate::protocol::engine::{EngineOutput, EngineRequest};

/// Live state of one model engine, shared with `/health`.
#[derive(Debug, Default)]
pub struct ModelLoad {
    /// Sequences waiting for a slot.
    pub waiting: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Tokens held by the running sequences' KV caches.
    pub kv_tokens: AtomicUsize,
    /// Forward passes run.
    pub steps: AtomicU64,
    /// Prompt tokens prefilled.
    pub prefill_tokens: AtomicU64,
    /// Tokens sampled.
    pub decode_tokens: AtomicU64,
}

/// One sequence in the scheduler.
struct Seq {
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    cache: SeqCache,
    sampler: Sampler,
    generated: u32,
    max_new: u32,
    stop_ids: Vec<u32>,
    min_tokens: u32,
    out: mpsc::UnboundedSender<Emission>,
}

impl Seq {
    /// Tokens not yet in the cache.
    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
}

struct Shared {
    model: Arc<LlamaModel>,
    config: ModelEngineConfig,
    state: RefCell<State>,
    driver_running: Cell<bool>,
    /// Set when a step panicked: the request futures re-raise it so the engine's supervisor restarts
    /// the engine with fresh state.
    poisoned: RefCell<Option<String>>,
    load: Arc<ModelLoad>,
}

/// The model engine; see the module docs of [`crate::engine::model`].
pub struct ModelEngine {
    shared: Rc<Shared>,
}

impl ModelEngine {
    /// An engine over `model` (shared with other engines), publishing its state into `load`.
    pub fn new(model: Arc<LlamaModel>, config: ModelEngineConfig, load: Arc<ModelLoad>) -> Self {
        if let Err(problem) = config.validate() {
            tracing::warn!(%problem, "invalid model_engine config; using defaults");
        }
        let config = if config.validate().is_ok() {
            config
        } else {
            ModelEngineConfig::default()
        };
        ModelEngine {
            shared: Rc::new(Shared {
                model,
                config,
                state: RefCell::new(State::default()),
                driver_running: Cell::new(false),
                poisoned: RefCell::new(None),
                load,
            }),
        }
    }
}

impl Engine for ModelEngine {
    fn name(&self) -> &'static str {
        "model"
    }

    fn generate(&mut self, request: EngineRequest, sink: TokenSink) -> LocalBoxFuture<'static, ()> {
        run_request(self.shared.clone(), request, sink).boxed_local()
    }
}

/// One request's life: check it, queue it, forward its outputs until a finish or the consumer leaves.
async fn run_request(shared: Rc<Shared>, request: EngineRequest, sink: TokenSink) {
    let shape = &shared.model.shape;
    let max_new = match super::admit_request(&request, shape.vocab, shape.context_length) {
        Ok(max_new) => max_new,
        Err(error) => return sink.fail(error).await,
    };
    let (out, outputs) = mpsc::unbounded_channel();
    let seq = Seq {
        sampler: Sampler::new(request.sampling.clone(), &request.token_ids),
        cache: SeqCache::new(shape.layers),
        tokens: request.token_ids,
        generated: 0,
        max_new,
        stop_ids: request.stop.stop_token_ids,
        min_tokens: request.stop.min_tokens,
        out,
    };
    match shared.state.try_borrow_mut() {
        Ok(mut state) => state.waiting.push_back(seq),
        Err(_) => {
            sink.fail(ApiError::internal("model scheduler busy at enqueue"))
                .await;
            return;
        }
    }
    shared.load.waiting.fetch_add(1, Ordering::Relaxed);
    if !shared.driver_running.replace(true) {
        tokio::task::spawn_local(drive(shared.clone()));
    }
    if super::relay(outputs, &sink).await {
        return;
    }
    // The driver dropped this sequence without finishing it: only a panicked step does that.
    if let Some(reason) = shared.poisoned.borrow().clone() {
        panic!("model engine step panicked: {reason}");
    }
}

/// Steps while there is work, yielding between steps; exits when idle.
async fn drive(shared: Rc<Shared>) {
    loop {
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| step(&shared)));
        match stepped {
            Ok(true) => {}
            Ok(false) => break,
            Err(payload) => {
                let reason = crate::supervision::panic_message(&*payload);
                tracing::error!(%reason, "model engine step panicked");
                *shared.poisoned.borrow_mut() = Some(reason);
                if let Ok(mut state) = shared.state.try_borrow_mut() {
                    *state = State::default();
                }
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    shared.driver_running.set(false);
    publish(&shared, &State::default());
}

fn publish(shared: &Shared, state: &State) {
    let load = &shared.load;
    load.waiting.store(state.waiting.len(), Ordering::Relaxed);
    load.running.store(state.running.len(), Ordering::Relaxed);
    load.kv_tokens.store(
        state.running.iter().map(|s| s.cache.len()).sum(),
        Ordering::Relaxed,
    );
}

/// One scheduling step. Returns whether any work is left.
fn step(shared: &Shared) -> bool {
    let mut state = shared.state.borrow_mut();
    let config = &shared.config;
    // Consumers that went away.
    state.running.retain(|s| !s.out.is_closed());
    state.waiting.retain(|s| !s.out.is_closed());
    // Admission.
    let mut kv: usize = state.running.iter().map(|s| s.tokens.len()).sum();
    while state.running.len() < config.max_num_seqs {
        let need = match state.waiting.front() {
            Some(next) => next.tokens.len(),
            None => break,
        };
        if !state.running.is_empty() && kv + need > config.max_kv_tokens {
            break;
        }
        let Some(seq) = state.waiting.pop_front() else {
            break;
        };
        kv += need;
        state.running.push(seq);
    }
    if state.running.is_empty() {
        publish(shared, &state);
        return !state.waiting.is_empty();
    }
    // The batch: every decoding sequence's token first, then prompt chunks in arrival order.
    let mut budget = config.max_batched_tokens;
    let mut plan: Vec<(usize, usize)> = Vec::new(); // (running index, tokens this step)
    for (i, s) in state.running.iter().enumerate() {
        if s.pending() == 1 && budget > 0 {
            plan.push((i, 1));
            budget -= 1;
        }
    }
    for (i, s) in state.running.iter().enumerate() {
        let pending = s.pending();
        if pending > 1 && budget > 0 {
            let n = pending.min(budget);
            plan.push((i, n));
            budget -= n;
        }
    }
    plan.sort_unstable();
    let mut prefilled = 0u64;
    let logits = {
        let mut chosen = plan.iter().peekable();
        let mut items = Vec::with_capacity(plan.len());
        for (i, s) in state.running.iter_mut().enumerate() {
            let Some(&&(_, n)) = chosen.peek().filter(|(idx, _)| *idx == i) else {
                continue;
            };
            chosen.next();
            let start = s.cache.len();
            if n > 1 || s.generated == 0 {
                prefilled += n as u64;
            }
            items.push(BatchItem {
                tokens: &s.tokens[start..start + n],
                want_logits: start + n == s.tokens.len(),
                cache: &mut s.cache,
            });
        }
        forward(&shared.model, &mut items)
    };
    shared.load.steps.fetch_add(1, Ordering::Relaxed);
    shared
        .load
        .prefill_tokens
        .fetch_add(prefilled, Ordering::Relaxed);
    let logits = match logits {
        Ok(logits) => logits,
        Err(e) => {
            // A failed pass leaves the batch's caches inconsistent: fail those sequences.
            let error = ApiError::new(
                ErrorClass::Internal,
                format!("model forward pass failed: {e}"),
            );
            tracing::error!(%e, "model forward pass failed");
            let failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
            let mut i = 0;
            state.running.retain(|s| {
                let keep = !failed.contains(&i);
                if !keep {
                    let _ = s.out.send(Emission::Failed(error.clone()));
                }
                i += 1;
                keep
            });
            publish(shared, &state);
            return true;
        }
    };
    let context = shared.model.shape.context_length;
    let mut finished = Vec::new();
    for (&(i, _), logits) in plan.iter().zip(logits) {
        let Some(mut logits) = logits else { continue };
        let s = &mut state.running[i];
        let banned: &[u32] = if s.generated < s.min_tokens {
            &s.stop_ids
        } else {
            &[]
        };
        let (token, logprob) = s.sampler.sample(&mut logits, banned);
        s.generated += 1;
        s.tokens.push(token);
        let finish = super::finish_after(
            token,
            &s.stop_ids,
            s.generated,
            s.min_tokens,
            s.max_new,
            s.tokens.len(),
            context,
        );
        let output = EngineOutput {
            token_ids: vec![token],
            finish_reason: finish,
            logprobs: logprob.into_iter().collect(),
            ..Default::default()
        };
        if s.out.send(Emission::Output(output)).is_err() || finish.is_some() {
            finished.push(i);
        }
        shared.load.decode_tokens.fetch_add(1, Ordering::Relaxed);
    }
    let mut i = 0;
    state.running.retain(|_| {
        let keep = !finished.contains(&i);
        i += 1;
        keep
    });
    publish(shared, &state);
    !state.running.is_empty() || !state.waiting.is_empty()
}
