//! One step on the device: [`Forward`] holds the activation buffers and the KV pool of one engine,
//! sizes them, and runs a [`StepPlan`] (upload its arrays, queue its kernels or replay a graph,
//! read the sampled tokens back).
//!
//! Per layer: RMSNorm → QKV GEMM → RoPE + paged KV write → paged attention (partitioned over the
//! keys when the batch is too small to fill the GPU; the last block of each token combines) →
//! output GEMM accumulated into the residual (beta = 1) → RMSNorm → gate·up GEMM → SiLU·up → down
//! GEMM into the residual. Then the final norm of the logits rows only, the output-head GEMM, and
//! one sampling block per row. In a decode step (one token per sequence) attention does the RoPE
//! and the KV write itself, and the step replays a CUDA graph: 8 launches per layer become one
//! graph launch per step.
//!
//! Beside it:
//! - `layers`: the kernel launches of a step, layer by layer ([`STEP_OPS`]).
//! - `graphs`: decode steps captured and replayed as CUDA graphs.
//! - `profile`: GPU time of a step and of each operation alone, for the benchmark.

mod graphs;
mod layers;
mod profile;

use super::batch::StepPlan;
use super::device::{DeviceMemory, GpuDevice};
use super::weights::GpuWeights;
use super::GpuError;
use graphs::{table_width, Graphs};

#[cfg(test)]
pub(crate) use graphs::graph_key;
pub use layers::STEP_OPS;

/// Attention blocks to aim for when splitting keys across blocks (about two per SM on an H200).
const ATTENTION_TARGET_BLOCKS: usize = 264;
/// Partial-softmax entries (token × KV head × partition) the scratch buffer holds.
const PARTIAL_CAP: usize = 16_384;

/// Key partitions for attention over `pairs` (token, KV head) pairs of at most `max_context`
/// positions: the keys are split across blocks only when the pairs alone leave the GPU idle.
pub(super) fn attention_parts(pairs: usize, max_context: usize) -> usize {
    if pairs == 0 || pairs >= ATTENTION_TARGET_BLOCKS {
        return 1;
    }
    ATTENTION_TARGET_BLOCKS
        .div_ceil(pairs)
        .min(max_context.div_ceil(32))
        .min(PARTIAL_CAP / pairs)
        .max(1)
}

/// The KV cache pool: `blocks` blocks of `block_size` tokens for every layer.
pub struct KvPool {
    /// Blocks per layer.
    pub blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    keys: DeviceMemory,
    values: DeviceMemory,
    /// Bytes of one layer's key (or value) pool.
    layer_bytes: usize,
}

impl KvPool {
    /// Bytes one block takes across all layers, keys and values.
    pub fn block_bytes(weights: &GpuWeights, block_size: usize) -> usize {
        let s = &weights.shape;
        2 * s.layers * block_size * s.kv_width() * 2
    }

    /// Capacity in tokens.
    pub fn tokens(&self) -> usize {
        self.blocks * self.block_size
    }
}

/// Activation buffers and the KV pool of one engine.
pub struct Forward {
    max_tokens: usize,
    max_rows: usize,
    x: DeviceMemory,
    act: DeviceMemory,
    qkv: DeviceMemory,
    gate_up: DeviceMemory,
    logits: DeviceMemory,
    partials: DeviceMemory,
    /// Per (token, KV head): attention blocks of a partitioned token done so far (zero between
    /// launches: the last block resets it).
    counters: DeviceMemory,
    out: DeviceMemory,
    plan: Option<DeviceMemory>,
    /// Blocks per sequence at the model's context length.
    max_width: usize,
    graphs: Option<Graphs>,
    /// The KV cache.
    pub kv: KvPool,
}

/// One sampled row: the token and its log-probability.
pub type Sampled = (u32, f32);

impl Forward {
    /// Buffers for steps of up to `max_tokens` tokens and `max_rows` sampled rows, and a KV pool of
    /// `kv_blocks` blocks (from [`Forward::kv_blocks_that_fit`]) plus one scratch block that the
    /// padding rows of graph steps write to. Decode steps of up to `graph_max_batch` sequences
    /// replay CUDA graphs (0: never).
    pub fn new(
        device: &GpuDevice,
        weights: &GpuWeights,
        max_tokens: usize,
        max_rows: usize,
        block_size: usize,
        kv_blocks: usize,
        graph_max_batch: usize,
    ) -> Result<Forward, GpuError> {
        let s = &weights.shape;
        let (h, kvw, ffn) = (s.hidden, s.kv_width(), s.ffn);
        let group = s.heads / s.kv_heads;
        let layer_bytes = (kv_blocks + 1) * block_size * kvw * 2;
        let graph_max_batch = graph_max_batch.min(max_rows).min(max_tokens);
        let max_width = s.context_length.div_ceil(block_size).max(1);
        let graphs = if graph_max_batch > 0 {
            Some(Graphs {
                max_batch: graph_max_batch,
                max_width,
                plan: device.alloc(
                    Graphs::plan_bytes(graph_max_batch, max_width),
                    "graph step plan",
                )?,
                execs: std::collections::HashMap::new(),
                capture_time: std::time::Duration::ZERO,
            })
        } else {
            None
        };
        let kv = KvPool {
            blocks: kv_blocks,
            block_size,
            keys: device.alloc(layer_bytes * s.layers, "KV cache keys")?,
            values: device.alloc(layer_bytes * s.layers, "KV cache values")?,
            layer_bytes,
        };
        Ok(Forward {
            max_tokens,
            max_rows,
            x: device.alloc(max_tokens * h * 4, "residual stream")?,
            act: device.alloc(max_tokens * h.max(ffn) * 2, "activations")?,
            qkv: device.alloc(max_tokens * (h + 2 * kvw) * 4, "QKV")?,
            gate_up: device.alloc(max_tokens * 2 * ffn * 4, "gate/up")?,
            logits: device.alloc(max_rows * s.vocab * 4, "logits")?,
            partials: device.alloc(
                PARTIAL_CAP * group * (s.head_dim + 2) * 4,
                "attention partials",
            )?,
            counters: {
                let counters = device.alloc(max_tokens * s.kv_heads * 4, "attention counters")?;
                device.zero(counters.ptr(), counters.bytes())?;
                counters
            },
            out: device.alloc(max_rows * 8, "sampled tokens")?,
            plan: None,
            max_width,
            graphs,
            kv,
        })
    }

    /// Activation bytes [`Forward::new`] allocates besides the KV pool.
    pub fn workspace_bytes(
        weights: &GpuWeights,
        max_tokens: usize,
        max_rows: usize,
        block_size: usize,
    ) -> usize {
        let s = &weights.shape;
        let (h, kvw, ffn) = (s.hidden, s.kv_width(), s.ffn);
        let group = s.heads / s.kv_heads;
        let graph_batch = max_rows.min(max_tokens);
        let max_width = s.context_length.div_ceil(block_size.max(1)).max(1);
        max_tokens * (h * 4 + h.max(ffn) * 2 + (h + 2 * kvw) * 4 + 2 * ffn * 4)
            + max_rows * (s.vocab * 4 + 8)
            + PARTIAL_CAP * group * (s.head_dim + 2) * 4
            + max_tokens * s.kv_heads * 4
            + Graphs::plan_bytes(graph_batch, max_width)
    }

    /// KV blocks that fit in `utilization` of the device's memory after the workspace, capped at
    /// `max_tokens` tokens when given.
    pub fn kv_blocks_that_fit(
        device: &GpuDevice,
        weights: &GpuWeights,
        workspace: usize,
        block_size: usize,
        utilization: f64,
        max_tokens: Option<usize>,
    ) -> Result<usize, GpuError> {
        let (free, total) = device.memory()?;
        let used = total.saturating_sub(free);
        let budget = (total as f64 * utilization) as usize;
        let left = budget.saturating_sub(used).saturating_sub(workspace);
        let per_block = KvPool::block_bytes(weights, block_size);
        // One block is the scratch block of graph steps' padding rows.
        let mut blocks = (left / per_block).saturating_sub(1);
        if let Some(cap) = max_tokens {
            blocks = blocks.min(cap.div_ceil(block_size));
        }
        if blocks < 2 {
            return Err(GpuError::Memory(format!(
                "{} MiB of {} MiB are free and gpu_engine.gpu_memory_utilization allows {} MiB: no room for a KV cache after the weights and {} MiB of activations",
                free >> 20,
                total >> 20,
                budget >> 20,
                workspace >> 20
            )));
        }
        Ok(blocks)
    }

    /// Run `plan`: every token through the model, then sample each logits row. Returns one
    /// `(token, logprob)` per row, and the logits of the rows in `host_rows` (sampled on the host).
    /// A decode step replays a CUDA graph captured for its batch-size bucket and block-table width
    /// (captured the first time that pair is seen); any other step launches its kernels one by one.
    pub fn step(
        &mut self,
        device: &GpuDevice,
        w: &GpuWeights,
        plan: &StepPlan,
        host_rows: &[usize],
    ) -> Result<(Vec<Sampled>, Vec<Vec<f32>>), GpuError> {
        let (t, r) = (plan.tokens, plan.rows);
        if t == 0 || t > self.max_tokens || r > self.max_rows {
            return Err(GpuError::Model(format!(
                "a step of {t} tokens and {r} sampled rows exceeds the engine's buffers ({} tokens, {} rows)",
                self.max_tokens, self.max_rows
            )));
        }
        let padded_rows = match self.replay(device, w, plan)? {
            Some(rows) => rows,
            None => {
                let (base, parts) = self.upload_plan(device, w, plan)?;
                self.enqueue(device, w, plan, base, parts)?;
                r
            }
        };
        if r == 0 {
            device.synchronize()?;
            return Ok((Vec::new(), Vec::new()));
        }
        let mut out = vec![0u32; 2 * padded_rows];
        device.download(self.out.ptr(), &mut out)?;
        let sampled = (0..r)
            .map(|i| (out[i], f32::from_bits(out[padded_rows + i])))
            .collect();
        let vocab = w.shape.vocab;
        let mut host = Vec::with_capacity(host_rows.len());
        for &row in host_rows {
            let mut logits = vec![0f32; vocab];
            device.download(self.logits.at(row * vocab * 4), &mut logits)?;
            host.push(logits);
        }
        Ok((sampled, host))
    }

    /// Put `plan`'s arrays in the (growable) buffer of steps that run without a graph. Returns their
    /// device address and the attention partitions for the step.
    pub(super) fn upload_plan(
        &mut self,
        device: &GpuDevice,
        w: &GpuWeights,
        plan: &StepPlan,
    ) -> Result<(u64, usize), GpuError> {
        if self
            .plan
            .as_ref()
            .is_none_or(|p| p.bytes() < plan.data.len() * 4)
        {
            device.synchronize()?;
            self.plan = Some(device.alloc(plan.data.len() * 4 * 2, "step plan")?);
        }
        let base = self.plan.as_ref().map(|p| p.ptr()).unwrap_or(0);
        device.upload(base, &plan.data)?;
        let width = table_width(plan.max_blocks, self.max_width);
        let parts = attention_parts(plan.tokens * w.shape.kv_heads, width * plan.block_size);
        Ok((base, parts))
    }

    /// Logits of the last step's row `row` (for tests comparing against the CPU engine).
    pub fn logits(
        &self,
        device: &GpuDevice,
        vocab: usize,
        row: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let mut logits = vec![0f32; vocab];
        device.download(self.logits.at(row * vocab * 4), &mut logits)?;
        Ok(logits)
    }
}
