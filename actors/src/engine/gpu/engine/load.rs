//! [`GpuLoad`]: the live counters of one GPU engine, read by `/health` and `/metrics` without a
//! mailbox hop; the scheduler is their one writer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Live state of one GPU engine, shared with `/health` and `/metrics`.
#[derive(Debug, Default)]
pub struct GpuLoad {
    /// Device name (`NVIDIA H200`), set once the engine is up.
    pub device: Mutex<String>,
    /// Device memory in bytes (total).
    pub memory_total: AtomicU64,
    /// Device memory in use when the engine came up (weights, workspace, KV pool), bytes.
    pub memory_used: AtomicU64,
    /// KV blocks in the pool.
    pub kv_blocks_total: AtomicUsize,
    /// KV blocks held by running sequences.
    pub kv_blocks_used: AtomicUsize,
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Sequences waiting.
    pub waiting: AtomicUsize,
    /// Steps run.
    pub steps: AtomicU64,
    /// Tokens sampled.
    pub decode_tokens: AtomicU64,
    /// Prompt tokens computed (not taken from the prefix cache).
    pub prefill_tokens: AtomicU64,
    /// Prompt tokens taken from the prefix cache.
    pub cached_tokens: AtomicU64,
    /// Sequences preempted for lack of blocks.
    pub preemptions: AtomicU64,
    /// Loading the weights took this long (ms); 0 when they were re-attached.
    pub load_ms: AtomicU64,
    /// Sampled tokens per second over the last window of about a second.
    rate: Mutex<Rate>,
}

/// A tokens/s window.
#[derive(Debug)]
struct Rate {
    since: std::time::Instant,
    tokens_then: u64,
    per_second: f64,
}

impl Default for Rate {
    fn default() -> Self {
        Rate {
            since: std::time::Instant::now(),
            tokens_then: 0,
            per_second: 0.0,
        }
    }
}

impl GpuLoad {
    /// Sampled tokens per second, over the last second or so (0 when idle for longer).
    pub fn tokens_per_second(&self) -> f64 {
        let rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        if rate.since.elapsed().as_secs_f64() > 3.0 {
            0.0
        } else {
            rate.per_second
        }
    }

    /// Close the rate window once it is a second old.
    pub(super) fn tick(&self) {
        let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = rate.since.elapsed().as_secs_f64();
        if elapsed >= 1.0 {
            let now = self.decode_tokens.load(Ordering::Relaxed);
            rate.per_second = (now - rate.tokens_then.min(now)) as f64 / elapsed;
            rate.tokens_then = now;
            rate.since = std::time::Instant::now();
        }
    }

    /// The device name.
    pub fn device_name(&self) -> String {
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
