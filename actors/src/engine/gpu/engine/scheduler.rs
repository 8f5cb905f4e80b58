//! [`Scheduler`]: continuous batching of [`Seq`]s over a paged KV cache with prefix reuse; one
//! [`Scheduler::step`] packs a step, runs it through a [`StepRunner`] and hands out the tokens.
//!
//! Every step: sequences whose consumer left give their blocks back; waiting sequences are admitted
//! while slots and blocks last (their cached prompt prefix is taken from the cache, not recomputed);
//! the step runs every decoding sequence's next token, then prompt chunks up to
//! `max_batched_tokens`; each sequence that finished its prompt or decoded samples one token. Blocks
//! that filled are registered in the prefix cache under the KV events' hashes and announced to the
//! router. When a decoding sequence needs a block and none is free, the newest running sequence is
//! preempted (its blocks released; it is recomputed when readmitted).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{GpuLoad, StepRunner};
use crate::engine::gpu::batch::{PlanItem, SampleRow, StepPlan};
use crate::engine::gpu::{GpuEngineConfig, GpuError};
use crate::engine::model::sampler::Sampler;
use crate::engine::model::{finish_after, Emission};
use crate::error::{ApiError, ErrorClass};
use crate::kv::blocks::{BlockHashes, BlockId, KvManager};
use crate::kv::hashing::{chain, local_block_hash, SequenceHash};
use crate::kv::protocol::KvCacheEventData;
use crate::protocol::engine::{EngineOutput, EngineRequest, SamplingOptions, TokenLogprob};

/// One sequence.
pub struct Seq {
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose KV is in the cache.
    computed: usize,
    blocks: Vec<BlockId>,
    /// Hashes of the full blocks registered so far (their count is how many are registered).
    hashes: Vec<BlockHashes>,
    sampler: Sampler,
    device_sampling: bool,
    options: SamplingOptions,
    seed: u64,
    generated: u32,
    max_new: u32,
    stop_ids: Vec<u32>,
    min_tokens: u32,
    out: mpsc::UnboundedSender<Emission>,
}

impl Seq {
    /// A sequence for `request`, writing to `out`. `max_new` is already capped by the context.
    pub fn new(request: EngineRequest, max_new: u32, out: mpsc::UnboundedSender<Emission>) -> Self {
        let o = &request.sampling;
        let device_sampling = o.logit_bias.is_empty()
            && o.repetition_penalty.is_none_or(|r| r == 1.0)
            && o.frequency_penalty.is_none_or(|f| f == 0.0)
            && o.presence_penalty.is_none_or(|p| p == 0.0)
            && o.logprobs.is_none_or(|n| n == 0);
        Seq {
            sampler: Sampler::new(request.sampling.clone(), &request.token_ids),
            device_sampling,
            seed: o.seed.unwrap_or_else(rand::random),
            options: request.sampling,
            tokens: request.token_ids,
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            generated: 0,
            max_new,
            stop_ids: request.stop.stop_token_ids,
            min_tokens: request.stop.min_tokens,
            out,
        }
    }

    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }

    fn sample_row(&self) -> SampleRow<'_> {
        let o = &self.options;
        let greedy = o.greedy || o.temperature.is_some_and(|t| t <= 0.0) || o.top_k == Some(1);
        SampleRow {
            temperature: if greedy {
                0.0
            } else {
                o.temperature.unwrap_or(1.0)
            },
            top_p: o.top_p.unwrap_or(1.0),
            min_p: o.min_p.unwrap_or(0.0),
            top_k: o.top_k.unwrap_or(0),
            seed: self.seed,
            step: self.generated,
            banned: if self.generated < self.min_tokens {
                &self.stop_ids
            } else {
                &[]
            },
        }
    }
}

/// Continuous batching over a paged KV cache; see the module docs.
pub struct Scheduler {
    config: GpuEngineConfig,
    kv: KvManager,
    vocab: usize,
    context_length: usize,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    load: Arc<GpuLoad>,
    /// Set when a failed step left the device unusable ([`StepRunner::fault`]).
    fault: Option<String>,
}

impl Scheduler {
    /// A scheduler over `kv_blocks` blocks for a model of `vocab` tokens and `context_length`.
    pub fn new(
        config: GpuEngineConfig,
        kv_blocks: usize,
        vocab: usize,
        context_length: usize,
        load: Arc<GpuLoad>,
    ) -> Self {
        load.kv_blocks_total.store(kv_blocks, Ordering::Relaxed);
        Scheduler {
            kv: KvManager::new(kv_blocks, config.prefix_caching, config.prefix_caching),
            config,
            vocab,
            context_length,
            waiting: VecDeque::new(),
            fault: None,
            running: Vec::new(),
            load,
        }
    }

    /// Queue a sequence.
    pub fn push(&mut self, seq: Seq) {
        self.waiting.push_back(seq);
        self.publish();
    }

    /// Whether anything is queued or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// KV events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<KvCacheEventData> {
        self.kv.take_events()
    }

    /// Every cached block as `stored` events (the router lost its index).
    pub fn snapshot(&self) -> Vec<KvCacheEventData> {
        self.kv.snapshot()
    }

    /// Blocks held by running sequences.
    pub fn blocks_in_use(&self) -> usize {
        self.kv.active_blocks()
    }

    /// Why the device became unusable, once (the engine must be rebuilt). Its sequences were
    /// dropped without a last word, so the requests move to the rebuilt engine.
    pub fn take_fault(&mut self) -> Option<String> {
        self.fault.take()
    }

    /// Drop every sequence (a failed step), telling each consumer why.
    pub fn fail_all(&mut self, error: &ApiError) {
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            self.kv.release(&seq.blocks);
            let _ = seq.out.send(Emission::Failed(error.clone()));
        }
        self.publish();
    }

    fn publish(&self) {
        self.load.tick();
        self.load
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.load
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        self.load
            .kv_blocks_used
            .store(self.kv.active_blocks(), Ordering::Relaxed);
    }

    fn block_size(&self) -> usize {
        self.config.block_size
    }

    /// Hashes of the full blocks of `tokens[..upto]`, chained from the start.
    fn block_hashes(
        tokens: &[u32],
        block_size: usize,
        from: usize,
        upto: usize,
        mut parent: Option<SequenceHash>,
    ) -> Vec<BlockHashes> {
        (from..upto)
            .map(|b| {
                let local = local_block_hash(&tokens[b * block_size..(b + 1) * block_size]);
                let sequence = chain(parent, local);
                parent = Some(sequence);
                BlockHashes { sequence, local }
            })
            .collect()
    }

    /// Admit waiting sequences while there are slots and blocks for their prompts.
    fn admit(&mut self) {
        let bs = self.block_size();
        while self.running.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let full = seq.tokens.len() / bs;
            // Reuse the cached prefix, but always compute at least the last token (its logits).
            let hashes = Self::block_hashes(&seq.tokens, bs, 0, full, None);
            let mut cached = self.kv.cached_prefix(&hashes);
            cached = cached.min(seq.tokens.len().saturating_sub(1) / bs);
            let mut blocks = Vec::with_capacity(seq.tokens.len().div_ceil(bs) + 1);
            for h in &hashes[..cached] {
                match self.kv.acquire_cached(h.sequence) {
                    Some(id) => blocks.push(id),
                    None => break,
                }
            }
            let cached = blocks.len();
            let needed = seq.tokens.len().div_ceil(bs) - cached;
            if seq.tokens.len().div_ceil(bs) > self.kv.capacity() {
                // It would wait forever: not even an empty cache holds it.
                self.kv.release(&blocks);
                let error = ApiError::new(
                    ErrorClass::Unavailable,
                    format!(
                        "The sequence of {} tokens needs {} KV blocks, but this GPU's KV cache holds {} blocks of {bs} tokens",
                        seq.tokens.len(),
                        seq.tokens.len().div_ceil(bs),
                        self.kv.capacity()
                    ),
                );
                let _ = seq.out.send(Emission::Failed(error));
                continue;
            }
            match self.kv.allocate(needed) {
                Some(fresh) => blocks.extend(fresh),
                None => {
                    self.kv.release(&blocks);
                    self.waiting.push_front(seq);
                    break;
                }
            }
            seq.blocks = blocks;
            seq.hashes = hashes[..cached].to_vec();
            seq.computed = cached * bs;
            self.load
                .cached_tokens
                .fetch_add(seq.computed as u64, Ordering::Relaxed);
            self.running.push(seq);
        }
    }

    /// Give the newest running sequence's blocks back and queue it first (recomputed later).
    fn preempt_newest(&mut self) -> bool {
        let Some(mut seq) = self.running.pop() else {
            return false;
        };
        self.kv.release(&seq.blocks);
        seq.blocks.clear();
        seq.hashes.clear();
        seq.computed = 0;
        self.load.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(seq);
        true
    }

    /// One step. Returns whether work is left.
    pub fn step(&mut self, runner: &mut dyn StepRunner) -> bool {
        let bs = self.block_size();
        // Consumers that went away free their blocks at once.
        let kv = &mut self.kv;
        self.running.retain(|s| {
            let keep = !s.out.is_closed();
            if !keep {
                kv.release(&s.blocks);
            }
            keep
        });
        self.waiting.retain(|s| !s.out.is_closed());
        self.admit();
        // Every decoding sequence needs room for one more token.
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            let need = (s.computed + s.pending()).div_ceil(bs);
            if need > s.blocks.len() {
                match self.kv.allocate(need - s.blocks.len()) {
                    Some(fresh) => self.running[i].blocks.extend(fresh),
                    None => {
                        if self.running.len() == 1 || !self.preempt_newest() {
                            let error = ApiError::new(
                                ErrorClass::Unavailable,
                                "the GPU's KV cache is too small for this sequence",
                            );
                            let seq = self.running.remove(i);
                            self.kv.release(&seq.blocks);
                            let _ = seq.out.send(Emission::Failed(error));
                        }
                        continue;
                    }
                }
            }
            i += 1;
        }
        if self.running.is_empty() {
            self.publish();
            return !self.waiting.is_empty();
        }
        // Decode tokens first, then prompt chunks in arrival order.
        let mut budget = self.config.max_batched_tokens;
        let mut take = vec![0usize; self.running.len()];
        for (n, s) in self.running.iter().enumerate() {
            if s.pending() == 1 && budget > 0 {
                take[n] = 1;
                budget -= 1;
            }
        }
        for (n, s) in self.running.iter().enumerate() {
            if s.pending() > 1 && budget > 0 {
                take[n] = s.pending().min(budget);
                budget -= take[n];
            }
        }
        let mut items = Vec::new();
        let mut host_rows = Vec::new();
        let mut members = Vec::new();
        let mut prefilled = 0u64;
        for (n, s) in self.running.iter().enumerate() {
            if take[n] == 0 {
                continue;
            }
            let samples = s.computed + take[n] == s.tokens.len();
            if samples && !s.device_sampling {
                host_rows.push(
                    items
                        .iter()
                        .filter(|i: &&PlanItem<'_>| i.sample.is_some())
                        .count(),
                );
            }
            if s.generated == 0 {
                prefilled += take[n] as u64;
            }
            items.push(PlanItem {
                tokens: &s.tokens[s.computed..s.computed + take[n]],
                start: s.computed,
                blocks: &s.blocks,
                sample: samples.then(|| s.sample_row()),
            });
            members.push(n);
        }
        let ran = StepPlan::build(&items, bs)
            .map_err(|e| GpuError::Model(format!("scheduler produced a bad step: {e}")))
            .and_then(|plan| runner.run(&plan, &host_rows));
        drop(items);
        self.load.steps.fetch_add(1, Ordering::Relaxed);
        self.load
            .prefill_tokens
            .fetch_add(prefilled, Ordering::Relaxed);
        let (sampled, mut host_logits) = match ran {
            Ok(out) => out,
            Err(e) => {
                tracing::error!(%e, "GPU step failed");
                if let Some(fault) = runner.fault() {
                    // Nothing more can run on this context: drop the sequences without a word (their
                    // requests migrate when the engine is rebuilt) and say why.
                    for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
                        self.kv.release(&seq.blocks);
                    }
                    self.publish();
                    self.fault = Some(format!("{e} (the device is left unusable: {fault})"));
                    return false;
                }
                self.fail_all(&ApiError::new(
                    ErrorClass::Internal,
                    format!("GPU step failed: {e}"),
                ));
                return false;
            }
        };
        let mut sampled = sampled.into_iter();
        let mut host_logits = host_logits.drain(..);
        let mut finished = Vec::new();
        for &n in &members {
            let s = &mut self.running[n];
            s.computed += take[n];
            if s.computed < s.tokens.len() {
                continue;
            }
            let Some((device_token, device_logprob)) = sampled.next() else {
                break;
            };
            let (token, logprob) = if s.device_sampling {
                let logprob = s.options.logprobs.map(|_| TokenLogprob {
                    token_id: device_token,
                    logprob: device_logprob,
                    top: Vec::new(),
                });
                (device_token, logprob)
            } else {
                let Some(mut logits) = host_logits.next() else {
                    break;
                };
                let banned: &[u32] = if s.generated < s.min_tokens {
                    &s.stop_ids
                } else {
                    &[]
                };
                s.sampler.sample(&mut logits, banned)
            };
            let token = token.min(self.vocab.saturating_sub(1) as u32);
            s.generated += 1;
            s.tokens.push(token);
            let finish = finish_after(
                token,
                &s.stop_ids,
                s.generated,
                s.min_tokens,
                s.max_new,
                s.tokens.len(),
                self.context_length,
            );
            let output = EngineOutput {
                token_ids: vec![token],
                finish_reason: finish,
                logprobs: logprob.into_iter().collect(),
                ..Default::default()
            };
            if s.out.send(Emission::Output(output)).is_err() || finish.is_some() {
                finished.push(n);
            }
            self.load.decode_tokens.fetch_add(1, Ordering::Relaxed);
        }
        // Register the blocks that filled (prompt and generated tokens alike).
        for &n in &members {
            let s = &mut self.running[n];
            let full = s.computed / bs;
            let registered = s.hashes.len();
            if full > registered {
                let parent = s.hashes.last().map(|h| h.sequence);
                let fresh = Self::block_hashes(&s.tokens, bs, registered, full, parent);
                self.kv
                    .register_run(&s.blocks[registered..full], &fresh, parent);
                s.hashes.extend(fresh);
            }
        }
        let mut n = 0;
        let kv = &mut self.kv;
        self.running.retain(|s| {
            let keep = !finished.contains(&n);
            if !keep {
                kv.release(&s.blocks);
            }
            n += 1;
            keep
        });
        self.publish();
        !self.is_idle()
    }
}
