//! One GPU as the engine uses it: the CUDA libraries (loaded at run time), a context and stream, the
//! compiled kernels, cuBLAS, and raw device allocations.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{
    result, sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaStream, LaunchConfig,
    PushKernelArg,
};

use super::{kernels, GpuError};
use crate::engine::model::ModelShape;

/// One GPU as the probe sees it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GpuInfo {
    /// CUDA ordinal (`cuda:N`).
    pub ordinal: usize,
    /// Marketing name (`NVIDIA H200`).
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: u64,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
}

/// Library handles opened from `gpu_engine.cuda_lib_dirs`, kept for the life of the process.
static PRELOADED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

/// Load the CUDA libraries found in `dirs` by absolute path, dependencies first, so that cudarc's
/// later lookups by name (`libnvrtc.so.12`, `libcublas.so.13`, ...) find them already loaded.
/// Returns the files loaded.
pub fn preload(dirs: &[PathBuf]) -> Vec<PathBuf> {
    const ORDER: &[&str] = &["libnvrtc-builtins", "libnvrtc", "libcublasLt", "libcublas"];
    let mut loaded = Vec::new();
    let mut held = PRELOADED.lock().unwrap_or_else(|e| e.into_inner());
    for prefix in ORDER {
        for dir in dirs {
            for path in matching(dir, prefix) {
                // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's CUDA
                // libraries, loaded the same way cudarc loads them.
                match unsafe { libloading::Library::new(&path) } {
                    Ok(lib) => {
                        held.push(lib);
                        loaded.push(path);
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), %e, "cannot load CUDA library")
                    }
                }
            }
        }
    }
    loaded
}

/// `dir`'s files named `{prefix}.so*` (not `.alt.` variants), sorted.
fn matching(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{prefix}.so")) && !n.contains(".alt."))
        })
        .collect();
    found.sort();
    found
}

/// Whether NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The GPUs of this machine, or why there are none usable. Checks every library before touching
/// cudarc's loaders (which panic when a library is missing). The answer is computed once per
/// process.
pub fn probe() -> Result<Vec<GpuInfo>, GpuError> {
    static PROBED: OnceLock<Result<Vec<GpuInfo>, String>> = OnceLock::new();
    PROBED
        .get_or_init(|| probe_now().map_err(|e| e.to_string()))
        .clone()
        .map_err(GpuError::Unavailable)
}

fn probe_now() -> Result<Vec<GpuInfo>, String> {
    // SAFETY: these only try to dlopen each library by its candidate names.
    let (driver, nvrtc, cublas) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err("no NVIDIA driver (libcuda.so) on this machine".into());
    }
    result::init().map_err(|e| format!("the NVIDIA driver did not initialise: {e}"))?;
    let count =
        result::device::get_count().map_err(|e| format!("cannot count CUDA devices: {e}"))?;
    if count <= 0 {
        return Err("the NVIDIA driver reports no CUDA devices".into());
    }
    if !nvrtc {
        return Err("NVRTC (libnvrtc.so) was not found: install the CUDA toolkit or pip's nvidia-cuda-nvrtc, or name its lib directory in gpu_engine.cuda_lib_dirs".into());
    }
    if !cublas {
        return Err("cuBLAS (libcublas.so) was not found: install the CUDA toolkit or pip's nvidia-cublas, or name its lib directory in gpu_engine.cuda_lib_dirs".into());
    }
    let mut gpus = Vec::new();
    for ordinal in 0..count {
        let dev = result::device::get(ordinal).map_err(|e| format!("cuda:{ordinal}: {e}"))?;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown".into());
        // SAFETY: `dev` is a valid device handle from the driver.
        let (total, major, minor) = unsafe {
            (
                result::device::total_mem(dev).unwrap_or(0),
                result::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                )
                .unwrap_or(0),
                result::device::get_attribute(
                    dev,
                    sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                )
                .unwrap_or(0),
            )
        };
        gpus.push(GpuInfo {
            ordinal: ordinal as usize,
            name,
            total_memory: total as u64,
            compute_capability: (major, minor),
        });
    }
    Ok(gpus)
}

/// GPU `ordinal`'s primary context, held (so that opening an engine does not create it twice), or
/// why it is unusable: a sticky error, such as an earlier engine's illegal address, after which
/// every call in the context fails until it is reset. `Ok(None)` when there is no such context to
/// check (opening the device reports why).
pub fn check_context(ordinal: usize) -> Result<Option<Arc<CudaContext>>, String> {
    let Ok(ctx) = CudaContext::new(ordinal) else {
        return Ok(None);
    };
    match ctx.synchronize() {
        Ok(()) => Ok(Some(ctx)),
        Err(e) => Err(e.to_string()),
    }
}

/// Reset GPU `ordinal`'s primary context: everything allocated in it is gone, and the next engine
/// opens a fresh one. Whoever held memory in it must have dropped it first.
pub fn reset_context(ordinal: usize) -> Result<(), GpuError> {
    let dev = result::device::get(ordinal as i32)
        .map_err(GpuError::driver(format!("finding cuda:{ordinal}")))?;
    // SAFETY: `dev` is a valid device handle; the caller has dropped every object of the context.
    unsafe { sys::cuDevicePrimaryCtxReset_v2(dev) }
        .result()
        .map_err(GpuError::driver(format!(
            "resetting cuda:{ordinal}'s context"
        )))
}

/// A raw device allocation, freed on drop.
pub struct DeviceMemory {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DeviceMemory {
    /// Device address of byte `offset`.
    pub fn at(&self, offset: usize) -> u64 {
        self.ptr + offset as u64
    }

    /// Device address of the start.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// The compiled kernels, by name.
pub struct Kernels {
    _module: Arc<CudaModule>,
    functions: std::collections::HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    /// The kernel `name` (one of [`kernels::KERNEL_NAMES`], all loaded at start).
    pub fn get(&self, name: &str) -> Result<&CudaFunction, GpuError> {
        self.functions.get(name).ok_or_else(|| {
            GpuError::Compile(format!("kernel {name} is not in the compiled program"))
        })
    }
}

/// cuBLAS's workspace: set explicitly, so that no GEMM allocates while a graph is being captured.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// One GPU: context, stream, kernels and cuBLAS.
pub struct GpuDevice {
    /// Its probe entry.
    pub info: GpuInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    _blas_workspace: Option<DeviceMemory>,
}

impl GpuDevice {
    /// Open GPU `ordinal` on this thread and compile the kernels for `shape`.
    pub fn open(ordinal: usize, shape: &ModelShape) -> Result<Self, GpuError> {
        let gpus = probe()?;
        let info = gpus.get(ordinal).cloned().ok_or(GpuError::NoSuchDevice {
            ordinal,
            count: gpus.len(),
        })?;
        let ctx = CudaContext::new(ordinal).map_err(GpuError::driver("creating the context"))?;
        // One stream per engine: ordering on it is all the synchronisation the engine needs, and
        // cudarc's per-allocation events would only add launches (and break graph capture).
        // SAFETY: every buffer of this engine is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(GpuError::driver("creating a stream"))?;
        let ptx = kernels::compile(shape, info.compute_capability)?;
        let module = ctx
            .load_module(ptx)
            .map_err(GpuError::driver("loading the kernels"))?;
        let mut functions = std::collections::HashMap::new();
        for &name in kernels::KERNEL_NAMES {
            let f = module
                .load_function(name)
                .map_err(GpuError::driver(format!("loading kernel {name}")))?;
            functions.insert(name, f);
        }
        let blas = CudaBlas::new(stream.clone()).map_err(GpuError::blas("creating the handle"))?;
        let mut device = GpuDevice {
            info,
            ctx,
            stream,
            blas,
            kernels: Kernels {
                _module: module,
                functions,
            },
            _blas_workspace: None,
        };
        let workspace = device.alloc(BLAS_WORKSPACE_BYTES, "cuBLAS workspace")?;
        // SAFETY: the workspace is a live allocation of the stated size, kept as long as the handle.
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                *device.blas.handle(),
                workspace.ptr() as *mut std::ffi::c_void,
                workspace.bytes(),
            )
        }
        .result()
        .map_err(GpuError::blas("setting the workspace"))?;
        device._blas_workspace = Some(workspace);
        Ok(device)
    }

    /// Start recording this engine's stream into a graph: what is queued until
    /// [`end_capture`](Self::end_capture) is recorded, not run.
    pub fn begin_capture(&self) -> Result<(), GpuError> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(GpuError::driver("starting a CUDA graph capture"))
    }

    /// Stop recording and instantiate the graph, ready to replay with `launch` (`None` when
    /// nothing was recorded).
    pub fn end_capture(&self) -> Result<Option<CudaGraph>, GpuError> {
        self.stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(GpuError::driver("ending a CUDA graph capture"))
    }

    /// Per kernel: registers per thread, local (spilled) bytes per thread and static shared bytes per
    /// block, as the driver compiled them for this GPU.
    pub fn kernel_resources(&self) -> Vec<(&'static str, i32, i32, i32)> {
        use sys::CUfunction_attribute as A;
        kernels::KERNEL_NAMES
            .iter()
            .filter_map(|&name| {
                let f = self.kernels.get(name).ok()?.cu_function();
                // SAFETY: `f` belongs to the module this device holds.
                let read = |attribute| {
                    unsafe { result::function::get_function_attribute(f, attribute) }.unwrap_or(-1)
                };
                Some((
                    name,
                    read(A::CU_FUNC_ATTRIBUTE_NUM_REGS),
                    read(A::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES),
                    read(A::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES),
                ))
            })
            .collect()
    }

    /// The stream every operation of this engine runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernels.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Make this GPU's context current on the calling thread.
    pub fn bind(&self) -> Result<(), GpuError> {
        self.ctx
            .bind_to_thread()
            .map_err(GpuError::driver("binding the context"))
    }

    /// (free, total) bytes of device memory.
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        self.ctx
            .mem_get_info()
            .map_err(GpuError::driver("reading free memory"))
    }

    /// Allocate `bytes` (rounded up to 256) of device memory.
    pub fn alloc(&self, bytes: usize, what: &str) -> Result<DeviceMemory, GpuError> {
        self.bind()?;
        let bytes = bytes.max(1).div_ceil(256) * 256;
        // SAFETY: plain cuMemAlloc in the current context.
        let ptr = unsafe { result::malloc_sync(bytes) }
            .map_err(|e| GpuError::Memory(format!("{what}: cannot allocate {bytes} bytes: {e}")))?;
        Ok(DeviceMemory {
            ctx: self.ctx.clone(),
            ptr,
            bytes,
        })
    }

    /// Copy `data` to device address `dst` (ordered on the stream).
    pub fn upload<T: Copy>(&self, dst: u64, data: &[T]) -> Result<(), GpuError> {
        // SAFETY: the caller passes an address inside a live allocation with room for `data`; the
        // copy from pageable memory completes before this returns.
        unsafe { result::memcpy_htod_async(dst, data, self.stream.cu_stream()) }
            .map_err(GpuError::driver("copying to the device"))
    }

    /// Copy from device address `src` into `out`, waiting for everything queued before.
    pub fn download<T: Copy>(&self, src: u64, out: &mut [T]) -> Result<(), GpuError> {
        // SAFETY: `src` points into a live allocation holding at least `out.len()` values.
        unsafe { result::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }
            .map_err(GpuError::driver("copying from the device"))?;
        self.synchronize()
    }

    /// Wait for the stream.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream
            .synchronize()
            .map_err(GpuError::driver("synchronising"))
    }

    /// Zero `bytes` at `dst`.
    pub fn zero(&self, dst: u64, bytes: usize) -> Result<(), GpuError> {
        // SAFETY: the caller passes a range inside a live allocation.
        unsafe { result::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }
            .map_err(GpuError::driver("zeroing device memory"))
    }

    /// `y[rows, n] (f32) = x[rows, k] (bf16) · w[n, k]ᵀ (bf16) + beta · y`, row-major, through
    /// cuBLAS with f32 accumulation.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        rows: usize,
        n: usize,
        k: usize,
        w: u64,
        x: u64,
        y: u64,
        beta: f32,
    ) -> Result<(), GpuError> {
        let alpha = 1.0f32;
        // Column-major view: yᵀ (n × rows) = wᵀ-as-stored (k × n, transposed) · xᵀ (k × rows).
        // SAFETY: w, x and y point to device buffers of at least n·k, rows·k and rows·n elements.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                rows as i32,
                k as i32,
                (&alpha as *const f32).cast(),
                w as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x as *const std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                (&beta as *const f32).cast(),
                y as *mut std::ffi::c_void,
                blas_sys::cudaDataType::CUDA_R_32F,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(GpuError::blas(format!("gemm {rows}x{n}x{k}")))
    }

    /// Launch kernel `name` on the stream.
    pub fn launch(&self, name: &str, config: LaunchConfig, args: &[Arg]) -> Result<(), GpuError> {
        let f = self.kernels.get(name)?;
        let mut builder = self.stream.launch_builder(f);
        for arg in args {
            match arg {
                Arg::Ptr(p) => builder.arg(p),
                Arg::I32(v) => builder.arg(v),
                Arg::I64(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: each kernel's argument list is written out next to its launch in forward.rs and
        // weights.rs to match its CUDA signature; the pointers are live device allocations.
        unsafe { builder.launch(config) }
            .map(|_| ())
            .map_err(GpuError::driver(format!("launching {name}")))
    }
}

/// One kernel argument.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device address (a pointer parameter).
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
}

/// A launch of `grid` blocks of `block` threads.
pub fn grid(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}
