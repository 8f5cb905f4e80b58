//! The model engine on NVIDIA GPUs (`engine.kind = "model"` with `devices = ["cuda:0", ...]` or
//! `"auto"`): one [`GpuEngine`] per GPU, on its EngineActor's thread, with its own CUDA context and
//! stream.
//!
//! CUDA is loaded at run time through cudarc (driver, NVRTC, cuBLAS): the build needs no toolkit and
//! a machine without a driver gets a clear "unavailable" instead of cudarc's panic ([`probe`] checks
//! `is_culib_present` first).
//!
//! The forward pass: weights dequantized from the GGUF to bf16 on the device at load; every matrix
//! product through cuBLAS (bf16 inputs, f32 accumulation and output, so a batched decode step is one
//! GEMM per projection for the whole batch and the residual adds ride on the GEMM's beta); every
//! other op a CUDA C kernel from `kernels/*.cu` that NVRTC compiles at start, specialised to the
//! model's head size and grouping. The KV cache is paged (blocks of `block_size` tokens, a pool sized
//! from free memory) with prefix reuse under the same block hashes the KV events carry; sampling runs
//! on the device unless a request needs penalties, `logit_bias` or top-n logprobs, whose rows take
//! the CPU engine's sampler.
//!
//! Layout:
//! - `device`: libraries, the context, kernels and cuBLAS of one GPU ([`GpuDevice`], [`probe`]).
//! - `weights`: the GGUF's tensors on the device ([`GpuWeights`]).
//! - `batch`: host side of one step, the packed arrays the kernels read ([`StepPlan`]).
//! - `forward/`: the step on the device ([`Forward`]): buffers and the step (`mod`), the kernel
//!   launches layer by layer (`layers`), decode CUDA graphs (`graphs`), per-op timing (`profile`).
//! - `engine/`: [`GpuEngine`], the actor-facing engine (`mod`); its continuous-batching scheduler,
//!   block tables and KV events (`scheduler`); the device behind the `StepRunner` seam (`runner`);
//!   the live counters (`load`).
//! - `kernels`: the CUDA C sources NVRTC compiles; `check`: the GPU engine against the CPU engine.

pub mod batch;
pub mod check;
pub mod device;
pub mod engine;
pub mod forward;
pub mod kernels;
pub mod weights;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use crate::setting::InvalidSetting;
use serde::{Deserialize, Serialize};

pub use device::{probe, GpuDevice, GpuInfo};
pub use engine::{GpuEngine, GpuLoad};
pub use forward::Forward;
pub use weights::GpuWeights;

/// Why the GPU engine cannot run or a GPU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No usable NVIDIA driver or CUDA library on this machine.
    #[error("the GPU engine is unavailable: {0}")]
    Unavailable(String),
    /// `cuda:N` names a GPU this machine does not have.
    #[error("device cuda:{ordinal} does not exist: this machine has {count} CUDA device(s)")]
    NoSuchDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A `[gpu_engine]` setting out of its range.
    #[error("{0}")]
    Setting(#[from] InvalidSetting),
    /// A CUDA driver call failed.
    #[error("CUDA driver error during {during}: {source}")]
    Driver {
        /// What was being done.
        during: String,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error during {during}: {source}")]
    Blas {
        /// What was being done.
        during: String,
        /// cuBLAS's error.
        source: cudarc::cublas::result::CublasError,
    },
    /// NVRTC could not compile the kernels.
    #[error("NVRTC could not compile the GPU kernels: {0}")]
    Compile(String),
    /// The model file could not be read or has a shape the kernels do not support.
    #[error("{0}")]
    Model(String),
    /// The device has too little memory for the weights and a minimal KV cache.
    #[error("out of GPU memory: {0}")]
    Memory(String),
}

impl GpuError {
    pub(crate) fn driver(
        during: impl Into<String>,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        let during = during.into();
        move |source| GpuError::Driver { during, source }
    }

    pub(crate) fn blas(
        during: impl Into<String>,
    ) -> impl FnOnce(cudarc::cublas::result::CublasError) -> Self {
        let during = during.into();
        move |source| GpuError::Blas { during, source }
    }
}

/// `[gpu_engine]`: settings of the model engine on GPUs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpuEngineConfig {
    /// Sequences in the running batch at most.
    pub max_num_seqs: usize,
    /// Tokens one step runs at most (decode tokens first, then prompt chunks): a longer prompt is
    /// prefilled in chunks so running sequences keep decoding.
    pub max_batched_tokens: usize,
    /// Share of the GPU's total memory the engine may fill (weights, activations, KV cache).
    pub gpu_memory_utilization: f64,
    /// Tokens per KV block; the KV events' block hashes are over blocks of this size.
    pub block_size: usize,
    /// Reuse cached prompt-prefix blocks across requests (and publish KV events for the router).
    pub prefix_caching: bool,
    /// Cap on the KV cache in tokens (`None`: as much as `gpu_memory_utilization` leaves).
    pub max_kv_tokens: Option<usize>,
    /// Directories whose CUDA libraries (`libnvrtc`, `libcublas`, ...) are loaded before the
    /// system's, for CUDA installs outside the loader's path (pip's `nvidia-*` wheels, a toolkit
    /// in `/usr/local/cuda/lib64`).
    pub cuda_lib_dirs: Vec<PathBuf>,
    /// Launch every kernel of every step one by one (vLLM's `enforce_eager`): no CUDA graphs.
    pub enforce_eager: bool,
    /// Decode steps of up to this many sequences replay CUDA graphs, captured once per batch-size
    /// bucket and block-table width.
    pub cuda_graph_max_batch: usize,
}

impl Default for GpuEngineConfig {
    fn default() -> Self {
        GpuEngineConfig {
            max_num_seqs: 256,
            max_batched_tokens: 8192,
            gpu_memory_utilization: 0.9,
            block_size: 16,
            prefix_caching: true,
            max_kv_tokens: None,
            cuda_lib_dirs: Vec::new(),
            enforce_eager: false,
            cuda_graph_max_batch: 256,
        }
    }
}

impl GpuEngineConfig {
    /// A description of the first bad value, if any.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.max_num_seqs == 0 {
            return Err(InvalidSetting::new(
                "gpu_engine.max_num_seqs",
                0,
                "must be at least 1",
            ));
        }
        if self.max_batched_tokens < self.max_num_seqs {
            return Err(InvalidSetting::new(
                "gpu_engine.max_batched_tokens",
                self.max_batched_tokens,
                format!(
                    "must be at least max_num_seqs ({}): every running sequence decodes one token per step",
                    self.max_num_seqs
                ),
            ));
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return Err(InvalidSetting::new(
                "gpu_engine.gpu_memory_utilization",
                self.gpu_memory_utilization,
                "must be in (0, 1]",
            ));
        }
        if self.block_size == 0 || self.block_size > 1024 {
            return Err(InvalidSetting::new(
                "gpu_engine.block_size",
                self.block_size,
                "must be between 1 and 1024 tokens",
            ));
        }
        if self.max_kv_tokens == Some(0) {
            return Err(InvalidSetting::new(
                "gpu_engine.max_kv_tokens",
                0,
                "must be at least 1 when set",
            ));
        }
        Ok(())
    }
}

/// Why an `engine.devices` entry is not a device.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceSpecError {
    /// The part after `:` is not a number.
    #[error("device `{text}`: `{number}` is not a device number (expected cpu:N or cuda:N)")]
    BadNumber {
        /// The entry as given.
        text: String,
        /// The part after `:`.
        number: String,
    },
    /// Neither `cpu` nor `cuda`.
    #[error("device `{text}` is not cpu:N or cuda:N (or \"auto\" for every visible GPU)")]
    UnknownKind {
        /// The entry as given.
        text: String,
    },
}

/// Where an engine runs, parsed from an `engine.devices` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `cpu:N`: the CPU engine (N only names the engine).
    Cpu(usize),
    /// `cuda:N`: GPU number N.
    Cuda(usize),
}

impl DeviceSpec {
    /// Parse `cpu:N` or `cuda:N` (a bare `cpu` or `cuda` is number 0).
    pub fn parse(text: &str) -> Result<Self, DeviceSpecError> {
        let (kind, number) = match text.split_once(':') {
            Some((kind, number)) => (kind, Some(number)),
            None => (text, None),
        };
        let number = match number {
            None => 0,
            Some(n) => n.parse::<usize>().map_err(|_| DeviceSpecError::BadNumber {
                text: text.into(),
                number: n.into(),
            })?,
        };
        match kind {
            "cpu" => Ok(DeviceSpec::Cpu(number)),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(number)),
            _ => Err(DeviceSpecError::UnknownKind { text: text.into() }),
        }
    }
}
