//! [`StepRunner`], the seam between the scheduler and the device, and [`DeviceRunner`], the GPU
//! behind it: opening a device, putting the weights on it (or re-attaching the ones this process
//! already put there) and sizing the workspace and the KV pool.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::GpuLoad;
use crate::engine::gpu::batch::StepPlan;
use crate::engine::gpu::device::GpuDevice;
use crate::engine::gpu::forward::{Forward, Sampled};
use crate::engine::gpu::weights::GpuWeights;
use crate::engine::gpu::{GpuEngineConfig, GpuError};

/// Runs one planned step (the GPU, or a stand-in in the scheduler's tests).
pub trait StepRunner {
    /// Run `plan`; one `(token, logprob)` per sampled row, plus the logits of `host_rows`.
    fn run(
        &mut self,
        plan: &StepPlan,
        host_rows: &[usize],
    ) -> Result<(Vec<Sampled>, Vec<Vec<f32>>), GpuError>;

    /// After a failed step: why the device is left unusable (a sticky CUDA error such as an illegal
    /// address, after which every call in the context fails until it is reset), or `None` when
    /// later steps can still run.
    fn fault(&mut self) -> Option<String> {
        None
    }
}

/// The GPU as a [`StepRunner`].
pub struct DeviceRunner {
    /// The device.
    pub device: GpuDevice,
    /// Its weights.
    pub weights: Arc<GpuWeights>,
    /// Buffers and KV pool.
    pub forward: Forward,
}

impl DeviceRunner {
    /// Open GPU `ordinal`, put the model at `path` on it (or re-attach the weights this process
    /// already put there), and allocate the workspace and the KV pool. Returns the runner and the
    /// pool's size in blocks.
    pub fn open(
        path: &Path,
        ordinal: usize,
        config: &GpuEngineConfig,
        load: &GpuLoad,
    ) -> Result<(DeviceRunner, usize), GpuError> {
        config.validate()?;
        crate::engine::gpu::device::preload(&config.cuda_lib_dirs);
        let (shape, _) = crate::engine::model::LlamaModel::plan(path)
            .map_err(|e| GpuError::Model(e.to_string()))?;
        let _context = match crate::engine::gpu::device::check_context(ordinal) {
            Ok(context) => context,
            Err(fault) => {
                // An earlier engine left the context unusable: its weights go with it, then a
                // reset, and this engine opens a fresh context.
                tracing::warn!(ordinal, %fault, "the GPU's context is unusable; resetting it");
                WEIGHTS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|((_, o), _)| *o != ordinal);
                crate::engine::gpu::device::reset_context(ordinal)?;
                None
            }
        };
        let device = GpuDevice::open(ordinal, &shape)?;
        let key = (path.to_path_buf(), ordinal);
        let cached = WEIGHTS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, w)| w.clone());
        let weights = match cached {
            Some(weights) => {
                load.load_ms.store(0, Ordering::Relaxed);
                weights
            }
            None => {
                let weights = Arc::new(GpuWeights::load(&device, path)?);
                load.load_ms
                    .store(weights.load_time.as_millis() as u64, Ordering::Relaxed);
                WEIGHTS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((key, weights.clone()));
                weights
            }
        };
        let max_rows = config.max_num_seqs;
        let workspace = Forward::workspace_bytes(
            &weights,
            config.max_batched_tokens,
            max_rows,
            config.block_size,
        );
        let blocks = Forward::kv_blocks_that_fit(
            &device,
            &weights,
            workspace,
            config.block_size,
            config.gpu_memory_utilization,
            config.max_kv_tokens,
        )?;
        let forward = Forward::new(
            &device,
            &weights,
            config.max_batched_tokens,
            max_rows,
            config.block_size,
            blocks,
            if config.enforce_eager {
                0
            } else {
                config.cuda_graph_max_batch
            },
        )?;
        let (free, total) = device.memory()?;
        *load.device.lock().unwrap_or_else(|e| e.into_inner()) = device.info.name.clone();
        load.memory_total.store(total as u64, Ordering::Relaxed);
        load.memory_used
            .store(total.saturating_sub(free) as u64, Ordering::Relaxed);
        Ok((
            DeviceRunner {
                device,
                weights,
                forward,
            },
            blocks,
        ))
    }

    /// Forget the weights this process put on GPUs (the next open reads the file again).
    pub fn forget_weights() {
        WEIGHTS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl StepRunner for DeviceRunner {
    fn run(
        &mut self,
        plan: &StepPlan,
        host_rows: &[usize],
    ) -> Result<(Vec<Sampled>, Vec<Vec<f32>>), GpuError> {
        self.device.bind()?;
        self.forward
            .step(&self.device, &self.weights, plan, host_rows)
    }

    fn fault(&mut self) -> Option<String> {
        // A sticky error comes back from every later call; an ordinary failure leaves the stream
        // working.
        self.device
            .bind()
            .and_then(|()| self.device.synchronize())
            .err()
            .map(|e| e.to_string())
    }
}

/// Weights already on a GPU, by (file, ordinal): a restarted engine re-attaches them instead of
/// reading the file again. They live as long as the process.
type WeightCache = Mutex<Vec<((std::path::PathBuf, usize), Arc<GpuWeights>)>>;
static WEIGHTS: WeightCache = Mutex::new(Vec::new());
