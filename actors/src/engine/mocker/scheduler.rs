//! The mocker's continuous-batching scheduler (runtime spec §4.3, vLLM v1 style): a pure state machine
//! over simulated time. [`Scheduler::step`] plans and "runs" one forward pass and reports its duration and
//! the tokens it produced; the engine's driver sleeps for that duration before delivering them, so the
//! scheduler itself never waits and tests can drive it step by step.
//!
//! One token budget (`max_num_batched_tokens`) per step is spent on running requests first (oldest
//! first: a decode costs 1 token, a prefill its next chunk), then on waiting requests in FIFO order.
//! A request's progress is `computed` tokens out of its prompt plus generated tokens; a step that
//! brings `computed` to the end samples one new token. So the first token comes at the end of the step
//! in which the prefill completes, and a preempted request recomputes prompt and output (keeping the
//! tokens it already emitted) when readmitted.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::perf_model::{decode_ms, prefill_ms};
use super::MockerConfig;
use crate::kv::blocks::{BlockHashes, BlockId, KvManager};
use crate::kv::hashing::{chain, local_block_hash, local_block_hashes, sequence_hashes};
use crate::kv::protocol::KvCacheEventData;

/// The scheduler's handle on one request.
pub(crate) type RequestKey = u64;

/// How many admissions the prefix hit rate averages over (Dynamo keeps a ring of 1000).
const HIT_RATE_WINDOW: usize = 1000;

/// Why a request cannot be served by this mocker at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MockerError {
    /// Nothing to prefill: the engine cannot produce a first token.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Prompt plus output can never fit in the KV cache, even alone.
    #[error(
        "prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) needs {needed_blocks} KV blocks; \
         the engine has {capacity} (num_gpu_blocks)"
    )]
    TooLong {
        /// Prompt length.
        prompt_tokens: usize,
        /// Tokens to generate.
        max_tokens: usize,
        /// Blocks the whole sequence needs.
        needed_blocks: usize,
        /// `num_gpu_blocks`.
        capacity: usize,
    },
}

/// One token produced for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Emission {
    /// The request.
    pub(crate) key: RequestKey,
    /// The generated token id.
    pub(crate) token: u32,
    /// Whether this was the request's last token (`max_tokens` reached).
    pub(crate) finished: bool,
    /// On the request's first token: prompt tokens its prefix cache held.
    pub(crate) cached_tokens: Option<usize>,
}

/// What one [`Scheduler::step`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct StepReport {
    /// Requests that computed tokens in this step.
    pub(crate) scheduled: usize,
    /// Uncached prompt (or recomputed) tokens computed in this step.
    pub(crate) prefill_tokens: usize,
    /// Requests that decoded one token in this step.
    pub(crate) decode_requests: usize,
    /// Predicted prefill time (ms, before speedup).
    pub(crate) prefill_ms: f64,
    /// Predicted decode time (ms, before speedup).
    pub(crate) decode_ms: f64,
    /// Wall time the step takes after the speedup ratios (ms).
    pub(crate) duration_ms: f64,
    /// Simulated clock at the end of the step (ms since the scheduler was created).
    pub(crate) end_ms: f64,
    /// Requests preempted in this step (most recent last).
    pub(crate) preempted: Vec<RequestKey>,
    /// Tokens produced at the end of the step.
    pub(crate) emissions: Vec<Emission>,
}

/// One request's state.
#[derive(Debug)]
struct Sequence {
    key: RequestKey,
    /// Prompt followed by the tokens generated so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    /// Leading tokens whose KV is in the cache.
    computed: usize,
    /// Blocks held, in token order.
    blocks: Vec<BlockId>,
    /// Hashes of every full block of `tokens`.
    hashes: Vec<BlockHashes>,
    /// Leading blocks already offered to the prefix cache.
    registered: usize,
    /// Prompt tokens found in the prefix cache at the first admission.
    cached: Option<usize>,
    rng: SmallRng,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn remaining(&self) -> usize {
        self.tokens.len().saturating_sub(self.computed)
    }

    /// Feeding back the last sampled token, as opposed to (re)computing a prompt.
    fn is_decoding(&self) -> bool {
        self.generated() > 0 && self.remaining() == 1
    }

    /// Append a sampled token, hashing the block it completes.
    fn push_token(&mut self, token: u32, block_size: usize) {
        self.tokens.push(token);
        // A new full block that is not hashed yet (phrased so it needs no newer-than-MSRV API).
        if self.tokens.len() / block_size > self.hashes.len() {
            let start = self.tokens.len() - block_size;
            let local = local_block_hash(&self.tokens[start..]);
            let sequence = chain(self.hashes.last().map(|h| h.sequence), local);
            self.hashes.push(BlockHashes { sequence, local });
        }
    }
}

/// Blocks needed to hold `tokens` tokens.
fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// The simulated worker: KV cache, queues and clock.
#[derive(Debug)]
pub(crate) struct Scheduler {
    config: MockerConfig,
    kv: KvManager,
    /// FIFO; preempted requests go back to the front.
    waiting: VecDeque<Sequence>,
    /// In admission order: the last one is the most recently admitted (the preemption victim).
    running: Vec<Sequence>,
    output_tokens: Arc<[u32]>,
    next_key: RequestKey,
    clock_ms: f64,
    hit_rates: VecDeque<f64>,
    /// Their sum, kept as they come and go (the load is published every step; summing the window
    /// each time cost 2% of a one-process server's CPU). Summed afresh once per window to drop
    /// rounding drift.
    hit_rate_sum: f64,
    /// Admissions since start (when to sum the window afresh).
    admissions: u64,
    /// Prompt tokens of every admission since start (a preempted request counts again when re-admitted).
    admitted_prompt_tokens: u64,
    /// Of those, tokens found in the prefix cache.
    cached_prompt_tokens: u64,
    preemptions: u64,
}

impl Scheduler {
    /// A scheduler for a valid `config` (see [`MockerConfig::validate`]) drawing generated tokens from
    /// `output_tokens` (token 0 when empty); `record_events` keeps KV events for [`Self::take_events`].
    pub(crate) fn new(
        config: MockerConfig,
        output_tokens: Arc<[u32]>,
        record_events: bool,
    ) -> Self {
        let kv = KvManager::new(
            config.num_gpu_blocks,
            config.enable_prefix_caching,
            record_events,
        );
        Scheduler {
            config,
            kv,
            waiting: VecDeque::new(),
            running: Vec::new(),
            output_tokens,
            next_key: 0,
            clock_ms: 0.0,
            hit_rates: VecDeque::new(),
            hit_rate_sum: 0.0,
            admissions: 0,
            admitted_prompt_tokens: 0,
            cached_prompt_tokens: 0,
            preemptions: 0,
        }
    }

    /// Queue a request that generates `max_tokens` tokens (at least 1) after `prompt`, with its
    /// tokens drawn from a generator seeded by `seed`.
    pub(crate) fn enqueue(
        &mut self,
        seed: u64,
        prompt: Vec<u32>,
        max_tokens: usize,
    ) -> Result<RequestKey, MockerError> {
        if prompt.is_empty() {
            return Err(MockerError::EmptyPrompt);
        }
        let block_size = self.config.block_size;
        let max_tokens = max_tokens.max(1);
        let needed_blocks = blocks_for(prompt.len().saturating_add(max_tokens), block_size);
        if needed_blocks > self.config.num_gpu_blocks {
            return Err(MockerError::TooLong {
                prompt_tokens: prompt.len(),
                max_tokens,
                needed_blocks,
                capacity: self.config.num_gpu_blocks,
            });
        }
        let locals = local_block_hashes(&prompt, block_size);
        let hashes = sequence_hashes(&locals)
            .into_iter()
            .zip(locals)
            .map(|(sequence, local)| BlockHashes { sequence, local })
            .collect();
        let key = self.next_key;
        self.next_key += 1;
        self.waiting.push_back(Sequence {
            key,
            prompt_len: prompt.len(),
            tokens: prompt,
            max_tokens,
            computed: 0,
            blocks: Vec::new(),
            hashes,
            registered: 0,
            cached: None,
            rng: SmallRng::seed_from_u64(seed),
        });
        Ok(key)
    }

    /// Remove a request wherever it is, freeing its blocks. False when it is not here (finished).
    pub(crate) fn cancel(&mut self, key: RequestKey) -> bool {
        if let Some(at) = self.waiting.iter().position(|s| s.key == key) {
            if let Some(seq) = self.waiting.remove(at) {
                self.kv.release(&seq.blocks);
            }
            return true;
        }
        if let Some(at) = self.running.iter().position(|s| s.key == key) {
            let seq = self.running.remove(at);
            self.kv.release(&seq.blocks);
            return true;
        }
        false
    }

    /// No request waiting or running.
    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Requests waiting for admission.
    pub(crate) fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Requests admitted (prefilling or decoding).
    pub(crate) fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Blocks held by requests.
    pub(crate) fn active_blocks(&self) -> usize {
        self.kv.active_blocks()
    }

    /// Cached blocks that no request holds.
    pub(crate) fn inactive_blocks(&self) -> usize {
        self.kv.inactive_blocks()
    }

    /// Tokens still to prefill: all of every waiting request, the rest of every running one that is
    /// not decoding.
    pub(crate) fn pending_prefill_tokens(&self) -> usize {
        let waiting: usize = self.waiting.iter().map(|s| s.tokens.len()).sum();
        let running: usize = self
            .running
            .iter()
            .filter(|s| !s.is_decoding())
            .map(Sequence::remaining)
            .sum();
        waiting + running
    }

    /// Mean share of the prompt served from the prefix cache over the last admissions (0 before any).
    pub(crate) fn prefix_hit_rate(&self) -> f64 {
        if self.hit_rates.is_empty() {
            return 0.0;
        }
        (self.hit_rate_sum / self.hit_rates.len() as f64).clamp(0.0, 1.0)
    }

    /// Prompt tokens admitted since start and how many of them the prefix cache served.
    pub(crate) fn prompt_token_totals(&self) -> (u64, u64) {
        (self.admitted_prompt_tokens, self.cached_prompt_tokens)
    }

    /// Requests preempted since start.
    pub(crate) fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// The simulated clock (ms).
    #[cfg(test)]
    pub(crate) fn clock_ms(&self) -> f64 {
        self.clock_ms
    }

    /// KV events recorded since the last call.
    pub(crate) fn take_events(&mut self) -> Vec<KvCacheEventData> {
        self.kv.take_events()
    }

    /// Every cached block as `stored` events, parents first (see `KvManager::snapshot`).
    pub(crate) fn kv_snapshot(&self) -> Vec<KvCacheEventData> {
        self.kv.snapshot()
    }

    /// Plan and run one forward pass.
    pub(crate) fn step(&mut self) -> StepReport {
        let mut report = StepReport::default();
        let block_size = self.config.block_size;
        let chunked = self.config.enable_chunked_prefill;
        let mut budget = self.config.max_num_batched_tokens;
        // (index into running, tokens computed this step).
        let mut work: Vec<(usize, usize)> = Vec::new();

        // Running requests first, oldest first.
        let mut index = 0;
        while index < self.running.len() && budget > 0 {
            let remaining = self.running[index].remaining();
            let Some(tokens) = Self::chunk(remaining, budget, chunked, work.is_empty()) else {
                index += 1;
                continue;
            };
            if !self.grow(index, tokens, &mut report.preempted) {
                // It preempted itself: it was the last running request.
                break;
            }
            work.push((index, tokens));
            budget = budget.saturating_sub(tokens);
            index += 1;
        }

        // Then waiting requests, unless memory ran short this step (vLLM skips admission then).
        while report.preempted.is_empty()
            && budget > 0
            && self.running.len() < self.config.max_num_seqs
        {
            let Some(tokens) = self.admit_front(budget, work.is_empty()) else {
                break;
            };
            work.push((self.running.len() - 1, tokens));
            budget = budget.saturating_sub(tokens);
        }

        // Price the pass.
        for &(index, tokens) in &work {
            if self.running[index].is_decoding() {
                report.decode_requests += 1;
            } else {
                report.prefill_tokens += tokens;
            }
        }
        report.scheduled = work.len();
        report.prefill_ms = prefill_ms(report.prefill_tokens);
        if report.decode_requests > 0 {
            let total = self.config.num_gpu_blocks.max(1) as f64;
            report.decode_ms = decode_ms(self.kv.active_blocks() as f64 / total);
        }
        report.duration_ms = report.prefill_ms / self.config.speedup_ratio
            + report.decode_ms / (self.config.speedup_ratio * self.config.decode_speedup_ratio);
        if !report.duration_ms.is_finite() {
            report.duration_ms = 0.0;
        }
        self.clock_ms += report.duration_ms;
        report.end_ms = self.clock_ms;

        // Run it: advance progress, cache filled blocks, sample tokens.
        for &(index, tokens) in &work {
            let seq = &mut self.running[index];
            seq.computed = (seq.computed + tokens).min(seq.tokens.len());
            let full = (seq.computed / block_size)
                .min(seq.blocks.len())
                .min(seq.hashes.len());
            if full > seq.registered {
                let parent = seq
                    .registered
                    .checked_sub(1)
                    .and_then(|i| seq.hashes.get(i))
                    .map(|h| h.sequence);
                self.kv.register_run(
                    &seq.blocks[seq.registered..full],
                    &seq.hashes[seq.registered..full],
                    parent,
                );
                seq.registered = full;
            }
            if seq.computed == seq.tokens.len() {
                let token = match self.output_tokens.len() {
                    0 => 0,
                    n => self.output_tokens[seq.rng.gen_range(0..n)],
                };
                seq.push_token(token, block_size);
                report.emissions.push(Emission {
                    key: seq.key,
                    token,
                    finished: seq.generated() >= seq.max_tokens,
                    cached_tokens: (seq.generated() == 1).then(|| seq.cached.unwrap_or(0)),
                });
            }
        }

        // Finished requests leave; their blocks stay cached in the inactive pool.
        let kv = &mut self.kv;
        self.running.retain(|seq| {
            let done = seq.generated() >= seq.max_tokens;
            if done {
                kv.release(&seq.blocks);
            }
            !done
        });
        report
    }

    /// Tokens to compute for a request with `remaining` tokens left and `budget` left in the step, or
    /// `None` to skip it. Without chunked prefill a prompt is computed whole; one larger than the
    /// whole budget still runs when it is the step's first work, or it could never run.
    fn chunk(remaining: usize, budget: usize, chunked: bool, first: bool) -> Option<usize> {
        if remaining == 0 {
            None
        } else if chunked {
            Some(remaining.min(budget))
        } else if remaining <= budget || first {
            Some(remaining)
        } else {
            None
        }
    }

    /// Make running request `index` hold blocks for `tokens` more tokens, preempting the most recently
    /// admitted requests while blocks run out. False when it had to preempt itself.
    fn grow(&mut self, index: usize, tokens: usize, preempted: &mut Vec<RequestKey>) -> bool {
        let block_size = self.config.block_size;
        loop {
            let seq = &self.running[index];
            let needed =
                blocks_for(seq.computed + tokens, block_size).saturating_sub(seq.blocks.len());
            if needed == 0 {
                return true;
            }
            if let Some(ids) = self.kv.allocate(needed) {
                self.running[index].blocks.extend(ids);
                return true;
            }
            let victim = self.running.len() - 1;
            preempted.push(self.running[victim].key);
            self.preempt(victim);
            if victim == index {
                return false;
            }
        }
    }

    /// Free a running request's blocks, reset its progress and put it at the front of waiting.
    fn preempt(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        self.kv.release(&seq.blocks);
        seq.blocks.clear();
        seq.computed = 0;
        seq.registered = 0;
        self.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Admit the head of waiting if it fits this step's token budget, the watermark and the free
    /// blocks; returns the tokens it computes this step. Head-of-line: when the head does not fit,
    /// nothing behind it is admitted.
    fn admit_front(&mut self, budget: usize, first: bool) -> Option<usize> {
        let block_size = self.config.block_size;
        let seq = self.waiting.front()?;
        // At least one token must be computed to sample from, so a fully cached prompt recomputes
        // its last block.
        let limit = ((seq.tokens.len() - 1) / block_size).min(seq.hashes.len());
        let hits = self.kv.cached_prefix(&seq.hashes[..limit]);
        let cached_tokens = hits * block_size;
        let uncached = seq.tokens.len() - cached_tokens;
        let tokens = Self::chunk(uncached, budget, self.config.enable_chunked_prefill, first)?;
        let new_blocks = blocks_for(cached_tokens + tokens, block_size) - hits;
        let reactivated = seq.hashes[..hits]
            .iter()
            .filter(|h| self.kv.is_inactive(h.sequence))
            .count();
        // The watermark keeps headroom for running requests to grow into; with none running it
        // would only stall the queue.
        let would_be_active = self.kv.active_blocks() + reactivated + new_blocks;
        let ceiling = (1.0 - self.config.watermark) * self.config.num_gpu_blocks as f64;
        if !self.running.is_empty() && would_be_active as f64 > ceiling {
            return None;
        }
        // Reactivated hits leave the evictable pool.
        let evictable = self.kv.inactive_blocks() - reactivated;
        if self.kv.free_blocks() + evictable < new_blocks {
            return None;
        }

        let mut seq = self.waiting.pop_front()?;
        for hash in &seq.hashes[..hits] {
            if let Some(id) = self.kv.acquire_cached(hash.sequence) {
                seq.blocks.push(id);
            }
        }
        match self.kv.allocate(new_blocks) {
            Some(ids) => seq.blocks.extend(ids),
            None => {
                // Unreachable after the check above; undo rather than run without memory.
                self.kv.release(&seq.blocks);
                seq.blocks.clear();
                self.waiting.push_front(seq);
                return None;
            }
        }
        seq.computed = cached_tokens;
        seq.registered = hits;
        seq.cached.get_or_insert(cached_tokens);
        if self.hit_rates.len() == HIT_RATE_WINDOW {
            self.hit_rate_sum -= self.hit_rates.pop_front().unwrap_or(0.0);
        }
        let rate = cached_tokens as f64 / seq.tokens.len() as f64;
        self.hit_rates.push_back(rate);
        self.hit_rate_sum += rate;
        self.admissions += 1;
        if self.admissions.is_multiple_of(HIT_RATE_WINDOW as u64) {
            self.hit_rate_sum = self.hit_rates.iter().sum();
        }
        self.admitted_prompt_tokens += seq.tokens.len() as u64;
        self.cached_prompt_tokens += cached_tokens as u64;
        self.running.push(seq);
        Some(tokens)
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
