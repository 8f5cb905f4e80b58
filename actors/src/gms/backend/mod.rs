//! Where allocations come from: the [`MemoryBackend`] seam between the GPU memory actor and the memory.
//!
//! - [`host`]: memfd-backed allocations (the default; what CI tests). Clients `mmap` the exported fd.
//! - [`cuda`]: `cuMemCreate` handles exported as POSIX fds; clients import,
//!   reserve, map and set access.
//!
//! The server side ([`MemoryBackend`], [`PhysicalMemory`]) only creates, exports and releases; it never
//! maps. The client side ([`map_exported`]) maps an exported fd into the caller's address space.

pub mod host;

pub mod cuda;

use std::fmt;
use std::os::fd::OwnedFd;
use std::str::FromStr;

/// Allocation granularity used when the backend does not dictate one (the usual CUDA value).
pub const DEFAULT_GRANULARITY: u64 = 2 << 20;

/// Which backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// memfd on the host.
    Host,
    /// CUDA virtual memory management.
    Cuda,
}

impl BackendKind {
    /// `host` or `cuda`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Host => "host",
            BackendKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(BackendKind::Host),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(format!("unknown backend `{other}`: expected host or cuda")),
        }
    }
}

/// Why a backend call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The device is out of memory right now; the caller may wait and retry.
    #[error("out of memory")]
    OutOfMemory,
    /// The backend cannot run on this machine (no driver, no GPU, feature not built).
    #[error("{0}")]
    Unavailable(String),
    /// Any other failure of the underlying API.
    #[error("{0}")]
    Failed(String),
}

/// Server side: creates physical memory that can be exported.
pub trait MemoryBackend: Send {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;
    /// Allocation sizes are rounded up to a multiple of this.
    fn granularity(&self) -> u64;
    /// A stable name of the device for socket paths (`GPU-<uuid>` for CUDA).
    fn device_identity(&self) -> String;
    /// Create `aligned_size` bytes (already a multiple of the granularity).
    fn create(&self, aligned_size: u64) -> Result<Box<dyn PhysicalMemory>, BackendError>;
}

/// One server-owned allocation; dropping it releases the server's handle.
pub trait PhysicalMemory: Send {
    /// A new descriptor for a client (the server closes its copy after sending).
    fn export(&self) -> Result<OwnedFd, BackendError>;
}

/// Client side: an exported allocation mapped into this process.
pub trait MappedAllocation {
    /// Bytes mapped.
    fn len(&self) -> u64;
    /// Whether nothing is mapped.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy `data` in at `offset` (writers).
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError>;
    /// Copy `out.len()` bytes out from `offset`.
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError>;
}

/// Open the server side of `kind` for `device`. `granularity` overrides the backend's own (it must be a
/// multiple of it).
pub fn open(
    kind: BackendKind,
    device: u32,
    granularity: Option<u64>,
) -> Result<Box<dyn MemoryBackend>, BackendError> {
    match kind {
        BackendKind::Host => Ok(Box::new(host::HostBackend::new(device, granularity)?)),
        BackendKind::Cuda => open_cuda(device, granularity),
    }
}

fn open_cuda(
    device: u32,
    granularity: Option<u64>,
) -> Result<Box<dyn MemoryBackend>, BackendError> {
    Ok(Box::new(cuda::CudaBackend::new(device, granularity)?))
}

/// Map an exported allocation (`fd` from an export) of `aligned_size` bytes into this process.
pub fn map_exported(
    kind: BackendKind,
    device: u32,
    fd: OwnedFd,
    aligned_size: u64,
    writable: bool,
) -> Result<Box<dyn MappedAllocation>, BackendError> {
    match kind {
        BackendKind::Host => Ok(Box::new(host::HostMapping::map(
            fd,
            aligned_size,
            writable,
        )?)),
        BackendKind::Cuda => map_cuda(device, fd, aligned_size, writable),
    }
}

fn map_cuda(
    device: u32,
    fd: OwnedFd,
    aligned_size: u64,
    writable: bool,
) -> Result<Box<dyn MappedAllocation>, BackendError> {
    Ok(Box::new(cuda::CudaMapping::import(
        device,
        fd,
        aligned_size,
        writable,
    )?))
}

/// Round `size` up to a multiple of `granularity` (None on overflow).
pub fn align_up(size: u64, granularity: u64) -> Option<u64> {
    if granularity == 0 {
        return None;
    }
    size.div_ceil(granularity).checked_mul(granularity)
}
