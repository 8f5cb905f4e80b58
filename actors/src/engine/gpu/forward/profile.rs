//! [`Forward::profile`]: GPU time of one step and of each of its operations alone, each captured
//! into a graph and replayed so launch costs are a graph node's. For the benchmark.

use super::{Forward, STEP_OPS};
use crate::engine::gpu::batch::StepPlan;
use crate::engine::gpu::device::GpuDevice;
use crate::engine::gpu::weights::GpuWeights;
use crate::engine::gpu::GpuError;

impl Forward {
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
}
