//! The engine's CUDA C sources (`kernels/*.cu`, read as CUDA C and compiled by NVRTC at start) and
//! the options they are compiled with.

use super::GpuError;
use crate::engine::model::ModelShape;

/// Helpers every kernel file uses.
pub const COMMON: &str = include_str!("kernels/common.cuh");
/// GGUF block dequantization to bf16.
pub const WEIGHTS: &str = include_str!("kernels/weights.cu");
/// Embedding, RMSNorm, RoPE + paged KV write, paged attention, SiLU·up.
pub const LAYERS: &str = include_str!("kernels/layers.cu");
/// Device sampling.
pub const SAMPLE: &str = include_str!("kernels/sample.cu");

/// Threads of one sampling block (must match `SAMPLE_THREADS` in sample.cu).
pub const SAMPLE_THREADS: usize = 1024;
/// Ints of sampling parameters per row (must match `SAMPLE_PARAMS` in sample.cu).
pub const SAMPLE_PARAMS: usize = 9;

/// Every kernel the engine launches.
pub const KERNEL_NAMES: &[&str] = &[
    "dequant_q8_0",
    "dequant_q4_0",
    "dequant_q4_1",
    "f16_to_bf16",
    "f32_to_bf16",
    "embed",
    "rms_norm",
    "rope_kv",
    "attention",
    "silu_mul",
    "sample",
];

/// The whole program: one translation unit, so NVRTC runs once.
pub fn source() -> String {
    [COMMON, WEIGHTS, LAYERS, SAMPLE].join("\n")
}

/// Shapes the kernels are specialised for; a model outside them gets a clear error.
pub fn check_shape(shape: &ModelShape) -> Result<(), GpuError> {
    let unsupported = |what: String| {
        Err(GpuError::Model(format!(
            "the GPU engine does not support this model: {what}"
        )))
    };
    if !shape.head_dim.is_multiple_of(8) || shape.head_dim < 8 || shape.head_dim > 256 {
        return unsupported(format!(
            "head size {} (must be a multiple of 8 up to 256)",
            shape.head_dim
        ));
    }
    // attention's shared memory holds (2048 / head_dim) partial states of GROUP heads: 8 KiB per
    // query head of the group, within the 48 KiB a block may take statically.
    if shape.kv_heads == 0
        || !shape.heads.is_multiple_of(shape.kv_heads)
        || shape.heads / shape.kv_heads > 5
    {
        return unsupported(format!(
            "{} query heads over {} KV heads (at most 5 per KV head)",
            shape.heads, shape.kv_heads
        ));
    }
    if shape.vocab == 0 || shape.vocab > 262_144 {
        return unsupported(format!("vocabulary of {} tokens", shape.vocab));
    }
    Ok(())
}

/// NVRTC options for `shape` on a device of compute capability `arch` (`(9, 0)` for Hopper).
pub fn options(shape: &ModelShape, arch: (i32, i32)) -> Vec<String> {
    vec![
        format!("--gpu-architecture=compute_{}{}", arch.0, arch.1),
        format!("-DHEAD_DIM={}", shape.head_dim),
        format!("-DGROUP={}", shape.heads / shape.kv_heads),
        format!("-DKV_HEADS={}", shape.kv_heads),
        format!(
            "-DVOCAB_PER_THREAD={}",
            shape.vocab.div_ceil(SAMPLE_THREADS)
        ),
        "--std=c++17".into(),
    ]
}

/// Compile the program to PTX for `shape` on `arch`. Needs only NVRTC (no GPU, no driver).
pub fn compile(shape: &ModelShape, arch: (i32, i32)) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    check_shape(shape)?;
    if !super::device::nvrtc_present() {
        return Err(GpuError::Unavailable(
            "NVRTC (libnvrtc.so) was not found: install the CUDA toolkit or pip's nvidia-cuda-nvrtc-cu12, and name its lib directory in gpu_engine.cuda_lib_dirs".into(),
        ));
    }
    let options = cudarc::nvrtc::CompileOptions {
        options: options(shape, arch),
        name: Some("dynamix_engine.cu".into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source(), options).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            GpuError::Compile(log.to_string_lossy().into_owned())
        }
        other => GpuError::Compile(format!("{other:?}")),
    })
}
