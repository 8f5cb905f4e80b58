//! CUDA backend (cargo feature `cuda`): CUDA virtual memory management through cudarc's raw driver
//! bindings, loaded at run time.
//!
//! Server side: `cuMemCreate` (pinned device memory, POSIX-fd shareable) and
//! `cuMemExportToShareableHandle`; it never maps. Client side: `cuMemImportFromShareableHandle`,
//! `cuMemAddressReserve`, `cuMemMap`, `cuMemSetAccess` (read-write for writers, read for readers).
//!
//! cudarc panics when the driver library is missing, so every entry point first checks
//! `is_culib_present()` and then treats a context-creation error as "no usable GPU".

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use super::{BackendError, BackendKind, MappedAllocation, MemoryBackend, PhysicalMemory};

/// Open the primary context of `device`, or say clearly why not.
pub fn context(device: u32) -> Result<Arc<CudaContext>, BackendError> {
    // SAFETY: only probes whether the driver library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err(BackendError::Unavailable(
            "the cuda backend needs an NVIDIA GPU and driver, but the CUDA driver library (libcuda.so) \
             was not found on this machine; use --backend host"
                .into(),
        ));
    }
    let context = CudaContext::new(device as usize).map_err(|e| {
        BackendError::Unavailable(format!(
            "cannot open CUDA device {device} ({e:?}); is there an NVIDIA GPU with that index?"
        ))
    })?;
    context
        .bind_to_thread()
        .map_err(|e| BackendError::Failed(format!("cuCtxSetCurrent: {e:?}")))?;
    Ok(context)
}

fn check(result: sys::CUresult, call: &str) -> Result<(), BackendError> {
    match result {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(BackendError::OutOfMemory),
        other => Err(BackendError::Failed(format!("{call} failed: {other:?}"))),
    }
}

fn allocation_prop(device: u32) -> sys::CUmemAllocationProp {
    // SAFETY: the struct is plain data for which all-zero is the documented "unset" value.
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes =
        sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device as i32;
    prop
}

fn minimum_granularity(device: u32) -> Result<u64, BackendError> {
    let prop = allocation_prop(device);
    let mut granularity = 0usize;
    // SAFETY: valid out-pointer and property struct.
    check(
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut granularity,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        },
        "cuMemGetAllocationGranularity",
    )?;
    Ok(granularity as u64)
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, as NVML prints it.
fn device_uuid(context: &CudaContext) -> Result<String, BackendError> {
    // SAFETY: CUuuid is plain bytes.
    let mut uuid: sys::CUuuid = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer and a device handle from a live context.
    check(
        unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, context.cu_device()) },
        "cuDeviceGetUuid",
    )?;
    let hex: Vec<String> = uuid
        .bytes
        .iter()
        .map(|b| format!("{:02x}", *b as u8))
        .collect();
    Ok(format!(
        "GPU-{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    ))
}

/// Server side of the CUDA backend for one device.
pub struct CudaBackend {
    /// Kept so the primary context stays retained while allocations exist.
    context: Arc<CudaContext>,
    device: u32,
    granularity: u64,
    identity: String,
}

impl CudaBackend {
    /// Open `device`; `granularity` overrides the device minimum and must be a multiple of it.
    pub fn new(device: u32, granularity: Option<u64>) -> Result<Self, BackendError> {
        let context = context(device)?;
        let minimum = minimum_granularity(device)?;
        let granularity = match granularity {
            None => minimum,
            Some(g) if g > 0 && minimum > 0 && g.is_multiple_of(minimum) => g,
            Some(g) => {
                return Err(BackendError::Failed(format!(
                    "granularity must be a positive multiple of the device minimum ({minimum} bytes), got {g}"
                )))
            }
        };
        let identity = device_uuid(&context)?;
        Ok(CudaBackend {
            context,
            device,
            granularity,
            identity,
        })
    }
}

impl MemoryBackend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn granularity(&self) -> u64 {
        self.granularity
    }

    fn device_identity(&self) -> String {
        self.identity.clone()
    }

    fn create(&self, aligned_size: u64) -> Result<Box<dyn PhysicalMemory>, BackendError> {
        self.context
            .bind_to_thread()
            .map_err(|e| BackendError::Failed(format!("cuCtxSetCurrent: {e:?}")))?;
        let prop = allocation_prop(self.device);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer and property struct; the size is a multiple of the granularity.
        check(
            unsafe { sys::cuMemCreate(&mut handle, aligned_size as usize, &prop, 0) },
            "cuMemCreate",
        )?;
        Ok(Box::new(CudaMemory {
            context: self.context.clone(),
            handle,
        }))
    }
}

/// One `cuMemCreate` handle; released on drop.
struct CudaMemory {
    context: Arc<CudaContext>,
    handle: sys::CUmemGenericAllocationHandle,
}

impl PhysicalMemory for CudaMemory {
    fn export(&self) -> Result<OwnedFd, BackendError> {
        let mut fd: libc::c_int = -1;
        // SAFETY: for POSIX_FILE_DESCRIPTOR the shareable handle is an int written through the pointer.
        check(
            unsafe {
                sys::cuMemExportToShareableHandle(
                    (&mut fd as *mut libc::c_int).cast(),
                    self.handle,
                    sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                    0,
                )
            },
            "cuMemExportToShareableHandle",
        )?;
        if fd < 0 {
            return Err(BackendError::Failed(
                "cuMemExportToShareableHandle returned no descriptor".into(),
            ));
        }
        // SAFETY: the driver handed us a new descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

impl Drop for CudaMemory {
    fn drop(&mut self) {
        let _ = self.context.bind_to_thread();
        // SAFETY: the handle came from cuMemCreate and is released once. Clients that imported it keep
        // their own reference.
        let result = unsafe { sys::cuMemRelease(self.handle) };
        if result != sys::CUresult::CUDA_SUCCESS {
            tracing::error!("cuMemRelease failed: {result:?}");
        }
    }
}

/// Client side: an exported allocation imported and mapped at a reserved virtual address.
pub struct CudaMapping {
    context: Arc<CudaContext>,
    handle: sys::CUmemGenericAllocationHandle,
    address: sys::CUdeviceptr,
    /// Bytes of VA reserved (freed on drop).
    reserved: usize,
    /// Bytes mapped (0 until the map succeeded).
    len: u64,
}

impl CudaMapping {
    /// Import `fd` (closed afterwards), reserve `aligned_size` bytes of VA, map and set access.
    pub fn import(
        device: u32,
        fd: OwnedFd,
        aligned_size: u64,
        writable: bool,
    ) -> Result<Self, BackendError> {
        let context = context(device)?;
        let granularity = minimum_granularity(device)?;
        let size = aligned_size as usize;
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: for POSIX fds the OS handle is the descriptor value passed as a pointer-sized int.
        check(
            unsafe {
                sys::cuMemImportFromShareableHandle(
                    &mut handle,
                    fd.as_raw_fd() as isize as *mut libc::c_void,
                    sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                )
            },
            "cuMemImportFromShareableHandle",
        )?;
        drop(fd);
        let mut address: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; no fixed address requested.
        let reserved = check(
            unsafe { sys::cuMemAddressReserve(&mut address, size, granularity as usize, 0, 0) },
            "cuMemAddressReserve",
        );
        if let Err(e) = reserved {
            // SAFETY: releasing the handle imported above.
            unsafe { sys::cuMemRelease(handle) };
            return Err(e);
        }
        let mut mapping = CudaMapping {
            context,
            handle,
            address,
            reserved: size,
            len: 0,
        };
        // SAFETY: mapping the whole imported allocation at the start of a reservation of its size.
        check(
            unsafe { sys::cuMemMap(address, size, 0, handle, 0) },
            "cuMemMap",
        )?;
        mapping.len = aligned_size;
        // SAFETY: the access descriptor is plain data.
        let mut access: sys::CUmemAccessDesc = unsafe { std::mem::zeroed() };
        access.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        access.location.id = device as i32;
        access.flags = if writable {
            sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        } else {
            sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READ
        };
        // SAFETY: the range was just mapped.
        check(
            unsafe { sys::cuMemSetAccess(address, size, &access, 1) },
            "cuMemSetAccess",
        )?;
        Ok(mapping)
    }

    /// The device address of the mapping.
    pub fn device_pointer(&self) -> u64 {
        self.address
    }

    fn check_range(&self, offset: u64, count: usize) -> Result<(), BackendError> {
        match offset.checked_add(count as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(BackendError::Failed(format!(
                "range {offset}+{count} is outside the {}-byte mapping",
                self.len
            ))),
        }
    }
}

impl MappedAllocation for CudaMapping {
    fn len(&self) -> u64 {
        self.len
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.check_range(offset, data.len())?;
        let _ = self.context.bind_to_thread();
        // SAFETY: bounds checked; synchronous copy from a live host slice.
        check(
            unsafe {
                sys::cuMemcpyHtoD_v2(self.address + offset, data.as_ptr().cast(), data.len())
            },
            "cuMemcpyHtoD",
        )
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        self.check_range(offset, out.len())?;
        let _ = self.context.bind_to_thread();
        // SAFETY: bounds checked; synchronous copy into a live host slice.
        check(
            unsafe {
                sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.address + offset, out.len())
            },
            "cuMemcpyDtoH",
        )
    }
}

impl Drop for CudaMapping {
    fn drop(&mut self) {
        let _ = self.context.bind_to_thread();
        let _ = self.context.synchronize();
        // SAFETY: undoing exactly what `import` did, in reverse order.
        unsafe {
            if self.len > 0 {
                sys::cuMemUnmap(self.address, self.len as usize);
            }
            sys::cuMemRelease(self.handle);
            sys::cuMemAddressFree(self.address, self.reserved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_reports_no_gpu_clearly_instead_of_panicking() {
        match CudaBackend::new(0, None) {
            // On a GPU machine: a real device with the usual VMM properties.
            Ok(backend) => {
                assert!(backend.granularity() > 0);
                assert!(backend.device_identity().starts_with("GPU-"));
            }
            Err(BackendError::Unavailable(message)) => {
                assert!(
                    message.contains("cuda backend") || message.contains("CUDA device"),
                    "{message}"
                );
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
        let (fd, _) = std::os::unix::net::UnixStream::pair().unwrap();
        if CudaBackend::new(0, None).is_err() {
            assert!(matches!(
                CudaMapping::import(0, fd.into(), 2 << 20, false),
                Err(BackendError::Unavailable(_))
            ));
        }
    }
}
