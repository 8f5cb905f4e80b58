//! The mocker engine (runtime spec §4): a GPU-free simulated vLLM worker. It keeps a paged KV cache with
//! prefix caching, schedules requests with continuous batching (watermark admission, chunked prefill,
//! lifo preemption), sleeps for the time Dynamo's polynomial perf model predicts for each forward pass,
//! publishes KV events for the KV router and emits one real vocabulary token per decode step. Under the
//! real frontend and router it behaves like a loaded GPU worker: a cached prefix really does shorten
//! TTFT, and a full cache really does queue and preempt.
//!
//! Layout:
//! - `mod.rs`: [`MockerConfig`] (`[mocker]`), [`MockerLoad`] (live load for `/health` and routing),
//!   [`KvEventSender`].
//! - `engine`: [`MockerEngine`], the [`Engine`](crate::engine::Engine) face: one shared scheduler per
//!   engine, its driver task, and the per-request futures that forward tokens into the sinks.
//! - `scheduler`: the waiting/running queues and the step function, over simulated time.
//! - the block pools and KV events live in `kv::blocks` (shared with the GPU engine).
//! - `perf_model`: prefill and decode times.

mod engine;
mod perf_model;
mod scheduler;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use engine::MockerEngine;

use crate::kv::protocol::RouterEvent;
use crate::setting::InvalidSetting;

/// Where a mocker publishes its KV events (worker → router). Unbounded because the scheduler must never
/// wait on the router; the events of one step are few and bounded by the blocks it touches.
pub type KvEventSender = mpsc::UnboundedSender<RouterEvent>;

/// `[mocker]`: the simulated worker. Defaults are Dynamo's `MockEngineArgs` (runtime spec §4.2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockerConfig {
    /// KV cache capacity in blocks (`--num-gpu-blocks-override`).
    pub num_gpu_blocks: usize,
    /// Tokens per KV block; also the block size of the KV events, so it must match the router's.
    pub block_size: usize,
    /// Most requests admitted (prefilling or decoding) at once.
    pub max_num_seqs: usize,
    /// Token budget of one forward pass (prefill chunks plus one per decode).
    pub max_num_batched_tokens: usize,
    /// Share of the KV cache kept free when admitting new requests, so running ones can grow.
    pub watermark: f64,
    /// Divides every simulated duration (2.0 runs twice as fast as the perf model predicts).
    pub speedup_ratio: f64,
    /// Further divides decode time only.
    pub decode_speedup_ratio: f64,
    /// Reuse cached full blocks across requests and publish KV events.
    pub enable_prefix_caching: bool,
    /// Prefill long prompts over several steps within the token budget.
    pub enable_chunked_prefill: bool,
    /// Tokens generated when a request sets no `max_tokens` (the mocker never stops on EOS, so every
    /// request runs to its token count).
    pub default_max_tokens: u32,
}

impl Default for MockerConfig {
    fn default() -> Self {
        MockerConfig {
            num_gpu_blocks: 16384,
            block_size: 64,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            watermark: 0.01,
            speedup_ratio: 1.0,
            decode_speedup_ratio: 1.0,
            enable_prefix_caching: true,
            enable_chunked_prefill: true,
            default_max_tokens: 16,
        }
    }
}

impl MockerConfig {
    /// Check every field; the error names the field (`mocker.<field>`), the value given and the rule.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let refuse = |key: &str, value: &dyn std::fmt::Display, rule: &str| {
            Err(InvalidSetting::new(format!("mocker.{key}"), value, rule))
        };
        if self.block_size <= 1 {
            return refuse("block_size", &self.block_size, "must be greater than 1");
        }
        if self.num_gpu_blocks < 1 {
            return refuse("num_gpu_blocks", &self.num_gpu_blocks, "must be at least 1");
        }
        if self.max_num_seqs < 1 {
            return refuse("max_num_seqs", &self.max_num_seqs, "must be at least 1");
        }
        if self.max_num_batched_tokens < self.block_size {
            return refuse(
                "max_num_batched_tokens",
                &self.max_num_batched_tokens,
                &format!("must be at least block_size ({})", self.block_size),
            );
        }
        if !(0.0..1.0).contains(&self.watermark) {
            return refuse("watermark", &self.watermark, "must be in [0, 1)");
        }
        for (name, value) in [
            ("speedup_ratio", self.speedup_ratio),
            ("decode_speedup_ratio", self.decode_speedup_ratio),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return refuse(name, &value, "must be a finite number greater than 0");
            }
        }
        if self.default_max_tokens < 1 {
            return refuse(
                "default_max_tokens",
                &self.default_max_tokens,
                "must be at least 1",
            );
        }
        Ok(())
    }

    /// The nearest valid config: what [`MockerEngine::new`] runs when handed an invalid one.
    fn sanitized(&self) -> MockerConfig {
        let defaults = MockerConfig::default();
        let ratio = |value: f64| {
            if value.is_finite() && value > 0.0 {
                value
            } else {
                1.0
            }
        };
        let block_size = self.block_size.max(2);
        MockerConfig {
            num_gpu_blocks: self.num_gpu_blocks.max(1),
            block_size,
            max_num_seqs: self.max_num_seqs.max(1),
            max_num_batched_tokens: self.max_num_batched_tokens.max(block_size),
            watermark: if (0.0..1.0).contains(&self.watermark) {
                self.watermark
            } else {
                defaults.watermark
            },
            speedup_ratio: ratio(self.speedup_ratio),
            decode_speedup_ratio: ratio(self.decode_speedup_ratio),
            enable_prefix_caching: self.enable_prefix_caching,
            enable_chunked_prefill: self.enable_chunked_prefill,
            default_max_tokens: self.default_max_tokens.max(1),
        }
    }
}

/// Live load of one mocker, written by its scheduler after every step (and on cancellation) and read
/// from any thread without queueing on the engine (Dynamo's `ForwardPassMetrics` / `ActiveLoad`).
#[derive(Debug, Default)]
pub struct MockerLoad {
    /// KV blocks held by admitted requests (Dynamo's active decode blocks, used for busy detection).
    pub active_decode_blocks: AtomicU64,
    /// Requests queued for admission.
    pub waiting_requests: AtomicUsize,
    /// Requests admitted (prefilling or decoding).
    pub running_requests: AtomicUsize,
    /// Prompt tokens still to prefill across waiting and prefilling requests.
    pub prefill_tokens: AtomicU64,
    /// Cached full blocks that no request holds (evictable).
    pub inactive_blocks: AtomicU64,
    /// Requests preempted since start.
    pub preemptions: AtomicU64,
    /// Mean prefix-cache hit rate over the last 1000 admissions, as `f64` bits.
    prefix_hit_rate_bits: AtomicU64,
    /// Prompt tokens admitted since start (re-admissions after preemption count again).
    pub admitted_prompt_tokens: AtomicU64,
    /// Of those, tokens served from the prefix cache.
    pub cached_prompt_tokens: AtomicU64,
}

impl MockerLoad {
    /// KV blocks held by admitted requests.
    pub fn active_decode_blocks(&self) -> u64 {
        self.active_decode_blocks.load(Ordering::Relaxed)
    }

    /// Requests queued for admission.
    pub fn waiting_requests(&self) -> usize {
        self.waiting_requests.load(Ordering::Relaxed)
    }

    /// Requests admitted.
    pub fn running_requests(&self) -> usize {
        self.running_requests.load(Ordering::Relaxed)
    }

    /// Prompt tokens still to prefill.
    pub fn prefill_tokens(&self) -> u64 {
        self.prefill_tokens.load(Ordering::Relaxed)
    }

    /// Cached blocks no request holds.
    pub fn inactive_blocks(&self) -> u64 {
        self.inactive_blocks.load(Ordering::Relaxed)
    }

    /// Requests preempted since start.
    pub fn preemptions(&self) -> u64 {
        self.preemptions.load(Ordering::Relaxed)
    }

    /// Mean share of admitted prompts served from the prefix cache (last 1000 admissions; 0 before any).
    pub fn prefix_hit_rate(&self) -> f64 {
        f64::from_bits(self.prefix_hit_rate_bits.load(Ordering::Relaxed))
    }

    /// Prompt tokens admitted since start.
    pub fn admitted_prompt_tokens(&self) -> u64 {
        self.admitted_prompt_tokens.load(Ordering::Relaxed)
    }

    /// Prompt tokens served from the prefix cache since start.
    pub fn cached_prompt_tokens(&self) -> u64 {
        self.cached_prompt_tokens.load(Ordering::Relaxed)
    }

    /// Copy the scheduler's counters.
    fn publish(&self, scheduler: &scheduler::Scheduler) {
        let relaxed = Ordering::Relaxed;
        self.active_decode_blocks
            .store(scheduler.active_blocks() as u64, relaxed);
        self.waiting_requests
            .store(scheduler.waiting_len(), relaxed);
        self.running_requests
            .store(scheduler.running_len(), relaxed);
        self.prefill_tokens
            .store(scheduler.pending_prefill_tokens() as u64, relaxed);
        self.inactive_blocks
            .store(scheduler.inactive_blocks() as u64, relaxed);
        self.preemptions.store(scheduler.preemptions(), relaxed);
        self.prefix_hit_rate_bits
            .store(scheduler.prefix_hit_rate().to_bits(), relaxed);
        let (admitted, cached) = scheduler.prompt_token_totals();
        self.admitted_prompt_tokens.store(admitted, relaxed);
        self.cached_prompt_tokens.store(cached, relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_dynamos() {
        let config = MockerConfig::default();
        assert_eq!(config.num_gpu_blocks, 16384);
        assert_eq!(config.block_size, 64);
        assert_eq!(config.max_num_seqs, 256);
        assert_eq!(config.max_num_batched_tokens, 8192);
        assert_eq!(config.watermark, 0.01);
        assert_eq!(config.speedup_ratio, 1.0);
        assert_eq!(config.decode_speedup_ratio, 1.0);
        assert!(config.enable_prefix_caching && config.enable_chunked_prefill);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn validation_names_the_field_and_the_value() {
        let bad = |edit: fn(&mut MockerConfig)| {
            let mut config = MockerConfig::default();
            edit(&mut config);
            config.validate().unwrap_err().to_string()
        };
        assert_eq!(
            bad(|c| c.block_size = 1),
            "mocker.block_size = 1 must be greater than 1"
        );
        assert_eq!(
            bad(|c| c.num_gpu_blocks = 0),
            "mocker.num_gpu_blocks = 0 must be at least 1"
        );
        assert_eq!(
            bad(|c| c.max_num_seqs = 0),
            "mocker.max_num_seqs = 0 must be at least 1"
        );
        assert_eq!(
            bad(|c| c.max_num_batched_tokens = 32),
            "mocker.max_num_batched_tokens = 32 must be at least block_size (64)"
        );
        assert_eq!(
            bad(|c| c.watermark = 1.0),
            "mocker.watermark = 1 must be in [0, 1)"
        );
        assert_eq!(
            bad(|c| c.watermark = -0.5),
            "mocker.watermark = -0.5 must be in [0, 1)"
        );
        assert_eq!(
            bad(|c| c.speedup_ratio = 0.0),
            "mocker.speedup_ratio = 0 must be a finite number greater than 0"
        );
        assert_eq!(
            bad(|c| c.decode_speedup_ratio = f64::INFINITY),
            "mocker.decode_speedup_ratio = inf must be a finite number greater than 0"
        );
        assert_eq!(
            bad(|c| c.speedup_ratio = f64::NAN),
            "mocker.speedup_ratio = NaN must be a finite number greater than 0"
        );
        assert_eq!(
            bad(|c| c.default_max_tokens = 0),
            "mocker.default_max_tokens = 0 must be at least 1"
        );
    }

    #[test]
    fn sanitizing_makes_any_config_valid() {
        let wild = MockerConfig {
            num_gpu_blocks: 0,
            block_size: 0,
            max_num_seqs: 0,
            max_num_batched_tokens: 0,
            watermark: f64::NAN,
            speedup_ratio: -1.0,
            decode_speedup_ratio: f64::NAN,
            enable_prefix_caching: true,
            enable_chunked_prefill: false,
            default_max_tokens: 0,
        };
        assert_eq!(wild.sanitized().validate(), Ok(()));
        let fine = MockerConfig::default();
        assert_eq!(fine.sanitized(), fine);
    }

    #[test]
    fn config_reads_partial_toml_like_json_and_rejects_unknown_keys() {
        let config: MockerConfig =
            serde_json::from_str(r#"{"block_size": 16, "speedup_ratio": 10.0}"#).unwrap();
        assert_eq!(config.block_size, 16);
        assert_eq!(config.speedup_ratio, 10.0);
        assert_eq!(config.num_gpu_blocks, 16384);
        assert!(serde_json::from_str::<MockerConfig>(r#"{"blocksize": 16}"#).is_err());
    }
}
