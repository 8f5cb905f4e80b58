//! Decode steps as CUDA graphs: one captured per (batch-size bucket, block-table width) the first
//! time a decode step of that shape runs, then replayed with the step's arrays rewritten in place,
//! so a step's ~250 launches become one. A capture that fails turns graphs off for the engine.

use super::{attention_parts, Forward};
use crate::engine::gpu::batch::{Offsets, StepPlan};
use crate::engine::gpu::device::{DeviceMemory, GpuDevice};
use crate::engine::gpu::weights::GpuWeights;
use crate::engine::gpu::GpuError;

/// Batch sizes decode graphs are captured for; a step of n sequences replays the first bucket of at
/// least n, its extra rows padding (past 256: the next multiple of 64).
const GRAPH_BATCHES: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];
/// `i32`s of banned ids (stop tokens before `min_tokens`) a graph step can carry; a step with more
/// launches without a graph.
const GRAPH_BANNED_CAP: usize = 16_384;

/// Decode steps captured as CUDA graphs, one per (batch-size bucket, block-table width): a step's
/// ~250 launches become one.
pub(super) struct Graphs {
    /// Largest batch a graph is captured for.
    pub(super) max_batch: usize,
    /// Widest block table: blocks per sequence at the model's context length.
    pub(super) max_width: usize,
    /// The step arrays every graph reads: a fixed address, rewritten before each replay.
    pub(super) plan: DeviceMemory,
    /// Instantiated graphs by (batch, width).
    pub(super) execs: std::collections::HashMap<(usize, usize), cudarc::driver::CudaGraph>,
    /// Time spent capturing and instantiating them.
    pub(super) capture_time: std::time::Duration,
}

/// The block-table width a step with tables `max_blocks` wide is laid out at: the next power of
/// two, at least 4, at most `max_width`. Attention is partitioned for this width's context, so a
/// step splits its keys the same way with or without a graph.
pub(super) fn table_width(max_blocks: usize, max_width: usize) -> usize {
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
    pub(super) fn plan_bytes(max_batch: usize, max_width: usize) -> usize {
        let at = Offsets::layout(max_batch, max_batch, max_batch, max_width);
        (at.banned + GRAPH_BANNED_CAP) * 4
    }
}

impl Forward {
    /// Replay (capturing first if needed) the graph for this decode step. Returns the rows the
    /// graph sampled (this plan's, then padding), or `None` when the step runs without a graph.
    pub(super) fn replay(
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

    /// Decode graphs captured so far and the time their capture took (`None`: graphs are off).
    pub fn graph_stats(&self) -> Option<(usize, std::time::Duration)> {
        self.graphs
            .as_ref()
            .map(|g| (g.execs.len(), g.capture_time))
    }
}
