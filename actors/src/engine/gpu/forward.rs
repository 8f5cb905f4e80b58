//! One step on the device: the batched forward pass over a [`StepPlan`] and device sampling.
//!
//! Per layer: RMSNorm → QKV GEMM → RoPE + paged KV write → paged attention (partitioned over the
//! keys when the batch is too small to fill the GPU; the last block of each token combines) →
//! output GEMM accumulated into the residual (beta = 1) → RMSNorm → gate·up GEMM → SiLU·up → down
//! GEMM into the residual. Then the final norm of the logits rows only, the output-head GEMM, and
//! one sampling block per row. In a decode step (one token per sequence) attention does the RoPE
//! and the KV write itself, and the step replays a CUDA graph: 8 launches per layer become one
//! graph launch per step.

use super::batch::{Offsets, StepPlan};
use super::device::{grid, Arg, DeviceMemory, GpuDevice};
use super::kernels::SAMPLE_THREADS;
use super::weights::GpuWeights;
use super::GpuError;

/// Attention blocks to aim for when splitting keys across blocks (about two per SM on an H200).
const ATTENTION_TARGET_BLOCKS: usize = 264;
/// Partial-softmax entries (token × KV head × partition) the scratch buffer holds.
const PARTIAL_CAP: usize = 16_384;

/// Batch sizes decode graphs are captured for; a step of n sequences replays the first bucket of at
/// least n, its extra rows padding (past 256: the next multiple of 64).
const GRAPH_BATCHES: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];
/// `i32`s of banned ids (stop tokens before `min_tokens`) a graph step can carry; a step with more
/// launches without a graph.
const GRAPH_BANNED_CAP: usize = 16_384;

/// The operations of a step, in order, as [`Forward::profile`] times them.
pub const STEP_OPS: &[&str] = &[
    "embed",
    "attn_norm",
    "qkv_gemm",
    "rope_kv",
    "attention",
    "o_gemm",
    "ffn_norm",
    "gate_up_gemm",
    "silu_mul",
    "down_gemm",
    "final_norm",
    "head_gemm",
    "sample",
];

/// Key partitions for attention over `pairs` (token, KV head) pairs of at most `max_context`
/// positions: the keys are split across blocks only when the pairs alone leave the GPU idle.
fn attention_parts(pairs: usize, max_context: usize) -> usize {
    if pairs == 0 || pairs >= ATTENTION_TARGET_BLOCKS {
        return 1;
    }
    ATTENTION_TARGET_BLOCKS
        .div_ceil(pairs)
        .min(max_context.div_ceil(32))
        .min(PARTIAL_CAP / pairs)
        .max(1)
}

/// Decode steps captured as CUDA graphs, one per (batch-size bucket, block-table width): a step's
/// ~250 launches become one.
struct Graphs {
    /// Largest batch a graph is captured for.
    max_batch: usize,
    /// Widest block table: blocks per sequence at the model's context length.
    max_width: usize,
    /// The step arrays every graph reads: a fixed address, rewritten before each replay.
    plan: DeviceMemory,
    /// Instantiated graphs by (batch, width).
    execs: std::collections::HashMap<(usize, usize), cudarc::driver::CudaGraph>,
    /// Time spent capturing and instantiating them.
    capture_time: std::time::Duration,
}

/// The block-table width a step with tables `max_blocks` wide is laid out at: the next power of
/// two, at least 4, at most `max_width`. Attention is partitioned for this width's context, so a
/// step splits its keys the same way with or without a graph.
fn table_width(max_blocks: usize, max_width: usize) -> usize {
    max_blocks
        .next_power_of_two()
        .max(4)
        .min(max_width)
        .max(max_blocks)
}

/// The graph a step of `seqs` decode sequences with tables `max_blocks` wide replays: (batch
/// rounded up to a bucket, [`table_width`]). `None` past `max_batch`.
pub(crate) fn graph_key(
    seqs: usize,
    max_blocks: usize,
    max_batch: usize,
    max_width: usize,
) -> Option<(usize, usize)> {
    if seqs == 0 || seqs > max_batch || max_blocks > max_width {
        return None;
    }
    let batch = GRAPH_BATCHES
        .iter()
        .copied()
        .find(|&b| b >= seqs)
        .unwrap_or(seqs.next_multiple_of(64))
        .min(max_batch);
    Some((batch, table_width(max_blocks, max_width)))
}

impl Graphs {
    /// The graph `plan` replays, if it is a decode step a graph can take.
    fn key(&self, plan: &StepPlan) -> Option<(usize, usize)> {
        if !plan.is_decode() {
            return None;
        }
        graph_key(plan.seqs, plan.max_blocks, self.max_batch, self.max_width)
    }

    /// Bytes of the largest step arrays a graph reads.
    fn plan_bytes(max_batch: usize, max_width: usize) -> usize {
        let at = Offsets::layout(max_batch, max_batch, max_batch, max_width);
        (at.banned + GRAPH_BANNED_CAP) * 4
    }
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
    fn upload_plan(
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

    /// Replay (capturing first if needed) the graph for this decode step. Returns the rows the
    /// graph sampled (this plan's, then padding), or `None` when the step runs without a graph.
    fn replay(
        &mut self,
        device: &GpuDevice,
        w: &GpuWeights,
        plan: &StepPlan,
    ) -> Result<Option<usize>, GpuError> {
        let Some(graphs) = self.graphs.as_mut() else {
            return Ok(None);
        };
        let Some(key) = graphs.key(plan) else {
            return Ok(None);
        };
        let Some(padded) = plan.padded(key.0, key.1, self.kv.blocks) else {
            return Ok(None);
        };
        if padded.data.len() * 4 > graphs.plan.bytes() {
            return Ok(None);
        }
        let base = graphs.plan.ptr();
        device.upload(base, &padded.data)?;
        if !graphs.execs.contains_key(&key) {
            let parts = attention_parts(key.0 * w.shape.kv_heads, padded.max_context);
            let started = std::time::Instant::now();
            let captured = device.begin_capture().and_then(|()| {
                let recorded = self.enqueue(device, w, &padded, base, parts);
                let ended = device.end_capture();
                recorded.and(ended)?.ok_or_else(|| {
                    GpuError::Model("the CUDA graph capture recorded nothing".into())
                })
            });
            let graph = match captured {
                Ok(graph) => graph,
                Err(e) => {
                    // Graphs off for this engine; the step runs as plain launches.
                    tracing::warn!(error = %e, batch = key.0, width = key.1, "cannot capture a CUDA graph; decode steps launch their kernels one by one from now on");
                    self.graphs = None;
                    return Ok(None);
                }
            };
            let graphs = self.graphs.as_mut().ok_or_else(|| {
                GpuError::Model("the CUDA graphs went away during a capture".into())
            })?;
            graphs.execs.insert(key, graph);
            graphs.capture_time += started.elapsed();
        }
        let graphs = self
            .graphs
            .as_ref()
            .ok_or_else(|| GpuError::Model("the CUDA graphs went away during a capture".into()))?;
        graphs
            .execs
            .get(&key)
            .ok_or_else(|| GpuError::Model("a captured CUDA graph went missing".into()))?
            .launch()
            .map_err(GpuError::driver("replaying a decode step's CUDA graph"))?;
        Ok(Some(key.0))
    }

    /// Queue every kernel of `plan` (whose arrays are at device address `base`) on the stream,
    /// splitting attention over `parts` key partitions. Nothing here waits or allocates, so a
    /// graph capture records it whole.
    fn enqueue(
        &self,
        device: &GpuDevice,
        w: &GpuWeights,
        plan: &StepPlan,
        base: u64,
        parts: usize,
    ) -> Result<(), GpuError> {
        self.enqueue_ops(device, w, plan, base, parts, None)
    }

    /// [`enqueue`](Self::enqueue), or only the operations named `only` (one of [`STEP_OPS`]), for
    /// timing them alone.
    fn enqueue_ops(
        &self,
        device: &GpuDevice,
        w: &GpuWeights,
        plan: &StepPlan,
        base: u64,
        parts: usize,
        only: Option<&str>,
    ) -> Result<(), GpuError> {
        let on = |name: &str| only.is_none_or(|o| o == name);
        let s = &w.shape;
        let (t, r) = (plan.tokens, plan.rows);
        let at = |offset: usize| base + offset as u64 * 4;
        let (h, kvw, ffn, heads) = (s.hidden, s.kv_width(), s.ffn, s.heads);
        let kvh = s.kv_heads;
        let tt = t as u32;
        if on("embed") {
            device.launch(
                "embed",
                grid((tt, 1, 1), 256),
                &[
                    Arg::Ptr(w.embedding.ptr()),
                    Arg::Ptr(at(plan.at.ids)),
                    Arg::Ptr(self.x.ptr()),
                    Arg::I32(h as i32),
                ],
            )?;
        }
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        for (l, layer) in w.layers.iter().enumerate() {
            let kc = self.kv.keys.at(l * self.kv.layer_bytes);
            let vc = self.kv.values.at(l * self.kv.layer_bytes);
            if on("attn_norm") {
                self.rms_norm(device, layer.attn_norm.ptr(), t, 0, h, s.rms_eps)?;
            }
            if on("qkv_gemm") {
                device.gemm(
                    t,
                    h + 2 * kvw,
                    h,
                    layer.wqkv.ptr(),
                    self.act.ptr(),
                    self.qkv.ptr(),
                    0.0,
                )?;
            }
            // A decode step (one token per sequence) rotates and writes its keys inside attention.
            let fused = plan.is_decode();
            if !fused && on("rope_kv") {
                device.launch(
                    "rope_kv",
                    grid((tt, 1, 1), 128),
                    &[
                        Arg::Ptr(self.qkv.ptr()),
                        Arg::Ptr(kc),
                        Arg::Ptr(vc),
                        Arg::Ptr(at(plan.at.pos)),
                        Arg::Ptr(at(plan.at.slots)),
                        Arg::Ptr(w.rope_cos.ptr()),
                        Arg::Ptr(w.rope_sin.ptr()),
                        Arg::I32(heads as i32),
                    ],
                )?;
            }
            if on("attention") {
                device.launch(
                    "attention",
                    grid((tt, kvh as u32, parts as u32), 256),
                    &[
                        Arg::Ptr(self.qkv.ptr()),
                        Arg::Ptr(kc),
                        Arg::Ptr(vc),
                        Arg::Ptr(at(plan.at.seq)),
                        Arg::Ptr(at(plan.at.pos)),
                        Arg::Ptr(at(plan.at.tables)),
                        Arg::I32(plan.max_blocks as i32),
                        Arg::I32(plan.block_size as i32),
                        Arg::I32(heads as i32),
                        Arg::F32(scale),
                        Arg::Ptr(self.act.ptr()),
                        Arg::Ptr(self.partials.ptr()),
                        Arg::Ptr(self.counters.ptr()),
                        Arg::I32(i32::from(fused)),
                        Arg::Ptr(at(plan.at.slots)),
                        Arg::Ptr(w.rope_cos.ptr()),
                        Arg::Ptr(w.rope_sin.ptr()),
                    ],
                )?;
            }
            if on("o_gemm") {
                device.gemm(t, h, h, layer.wo.ptr(), self.act.ptr(), self.x.ptr(), 1.0)?;
            }
            if on("ffn_norm") {
                self.rms_norm(device, layer.ffn_norm.ptr(), t, 0, h, s.rms_eps)?;
            }
            if on("gate_up_gemm") {
                device.gemm(
                    t,
                    2 * ffn,
                    h,
                    layer.w_gate_up.ptr(),
                    self.act.ptr(),
                    self.gate_up.ptr(),
                    0.0,
                )?;
            }
            if on("silu_mul") {
                device.launch(
                    "silu_mul",
                    grid((tt, ffn.div_ceil(256) as u32, 1), 256),
                    &[
                        Arg::Ptr(self.gate_up.ptr()),
                        Arg::Ptr(self.act.ptr()),
                        Arg::I32(ffn as i32),
                    ],
                )?;
            }
            if on("down_gemm") {
                device.gemm(
                    t,
                    h,
                    ffn,
                    layer.w_down.ptr(),
                    self.act.ptr(),
                    self.x.ptr(),
                    1.0,
                )?;
            }
        }
        if r == 0 {
            return Ok(());
        }
        if on("final_norm") {
            self.rms_norm(
                device,
                w.final_norm.ptr(),
                r,
                at(plan.at.rows),
                h,
                s.rms_eps,
            )?;
        }
        if on("head_gemm") {
            device.gemm(
                r,
                s.vocab,
                h,
                w.output_head(),
                self.act.ptr(),
                self.logits.ptr(),
                0.0,
            )?;
        }
        if on("sample") {
            device.launch(
                "sample",
                grid((r as u32, 1, 1), SAMPLE_THREADS as u32),
                &[
                    Arg::Ptr(self.logits.ptr()),
                    Arg::I32(s.vocab as i32),
                    Arg::Ptr(at(plan.at.params)),
                    Arg::Ptr(at(plan.at.banned)),
                    Arg::Ptr(self.out.ptr()),
                    Arg::Ptr(self.out.at(r * 4)),
                ],
            )?;
        }
        Ok(())
    }

    /// Decode graphs captured so far and the time their capture took (`None`: graphs are off).
    pub fn graph_stats(&self) -> Option<(usize, std::time::Duration)> {
        self.graphs
            .as_ref()
            .map(|g| (g.execs.len(), g.capture_time))
    }

    /// GPU time of one step of `plan` (a step that ran before, so its buffers hold real values):
    /// first the whole step, then each of [`STEP_OPS`] alone (every layer's instance), each
    /// captured `repeat` times into one graph and replayed, so launch costs are a graph node's.
    /// Microseconds per step. For the benchmark.
    pub fn profile(
        &mut self,
        device: &GpuDevice,
        w: &GpuWeights,
        plan: &StepPlan,
        repeat: usize,
    ) -> Result<Vec<(&'static str, f64)>, GpuError> {
        let (base, parts) = self.upload_plan(device, w, plan)?;
        let mut out = Vec::new();
        for only in std::iter::once(None).chain(STEP_OPS.iter().map(|&o| Some(o))) {
            device.begin_capture()?;
            let mut recorded = Ok(());
            for _ in 0..repeat.max(1) {
                recorded =
                    recorded.and_then(|()| self.enqueue_ops(device, w, plan, base, parts, only));
            }
            let Some(graph) = recorded.and(device.end_capture())? else {
                // Not part of this step (the norms when the products fold them in).
                out.push((only.unwrap_or("whole step"), 0.0));
                continue;
            };
            graph
                .launch()
                .map_err(GpuError::driver("replaying a profile graph"))?;
            device.synchronize()?;
            let started = std::time::Instant::now();
            const REPLAYS: usize = 5;
            for _ in 0..REPLAYS {
                graph
                    .launch()
                    .map_err(GpuError::driver("replaying a profile graph"))?;
            }
            device.synchronize()?;
            let us = started.elapsed().as_secs_f64() * 1e6 / (REPLAYS * repeat.max(1)) as f64;
            out.push((only.unwrap_or("whole step"), us));
        }
        Ok(out)
    }

    /// `act[i] = bf16(RMSNorm(x[rows[i]]) · weight)` for `count` rows (`rows` 0: rows 0..count).
    fn rms_norm(
        &self,
        device: &GpuDevice,
        weight: u64,
        count: usize,
        rows: u64,
        hidden: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        device.launch(
            "rms_norm",
            grid((count as u32, 1, 1), 256),
            &[
                Arg::Ptr(self.x.ptr()),
                Arg::Ptr(weight),
                Arg::Ptr(self.act.ptr()),
                Arg::Ptr(rows),
                Arg::I32(hidden as i32),
                Arg::F32(eps),
            ],
        )
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
