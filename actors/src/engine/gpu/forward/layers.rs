//! The kernels of a step in order: `Forward::enqueue` queues every launch and GEMM of a
//! [`StepPlan`] on the stream without waiting or allocating, so a graph capture can record it
//! whole; [`STEP_OPS`] names the operations so they can be timed one by one.

use super::Forward;
use crate::engine::gpu::batch::StepPlan;
use crate::engine::gpu::device::{grid, Arg, GpuDevice};
use crate::engine::gpu::kernels::SAMPLE_THREADS;
use crate::engine::gpu::weights::GpuWeights;
use crate::engine::gpu::GpuError;

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

impl Forward {
    /// Queue every kernel of `plan` (whose arrays are at device address `base`) on the stream,
    /// splitting attention over `parts` key partitions. Nothing here waits or allocates, so a
    /// graph capture records it whole.
    pub(super) fn enqueue(
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
    pub(super) fn enqueue_ops(
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
}
