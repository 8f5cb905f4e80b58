//! Host backend: each allocation is an anonymous memfd of the aligned size. Exporting duplicates the
//! descriptor; clients `mmap` it shared, so a writer's bytes are what every reader sees. Pages are
//! allocated lazily by the kernel, so a large but untouched layout costs nothing.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{BackendError, BackendKind, MappedAllocation, MemoryBackend, PhysicalMemory};

/// memfd allocations.
#[derive(Debug)]
pub struct HostBackend {
    device: u32,
    granularity: u64,
}

impl HostBackend {
    /// A host backend named after `device`, with `granularity` (default 2 MiB, as CUDA's usual minimum,
    /// so layouts and hashes match across backends). It must be a multiple of the page size.
    pub fn new(device: u32, granularity: Option<u64>) -> Result<Self, BackendError> {
        let page = page_size();
        let granularity = granularity.unwrap_or(super::DEFAULT_GRANULARITY);
        if granularity == 0 || !granularity.is_multiple_of(page) {
            return Err(BackendError::Failed(format!(
                "granularity must be a positive multiple of the page size ({page} bytes), got {granularity}"
            )));
        }
        Ok(HostBackend {
            device,
            granularity,
        })
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as u64
    } else {
        4096
    }
}

impl MemoryBackend for HostBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Host
    }

    fn granularity(&self) -> u64 {
        self.granularity
    }

    fn device_identity(&self) -> String {
        format!("host-{}", self.device)
    }

    fn create(&self, aligned_size: u64) -> Result<Box<dyn PhysicalMemory>, BackendError> {
        // SAFETY: the name is a valid C string; the returned fd (if any) is new and ours.
        let raw = unsafe { libc::memfd_create(c"gms-allocation".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(os_error("memfd_create"));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = libc::off_t::try_from(aligned_size)
            .map_err(|_| BackendError::Failed(format!("size {aligned_size} is too large")))?;
        // SAFETY: `fd` is a valid memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ENOSPC) {
                BackendError::OutOfMemory
            } else {
                BackendError::Failed(format!("ftruncate: {e}"))
            });
        }
        Ok(Box::new(HostMemory { fd }))
    }
}

fn os_error(call: &str) -> BackendError {
    BackendError::Failed(format!("{call}: {}", std::io::Error::last_os_error()))
}

/// One memfd.
#[derive(Debug)]
struct HostMemory {
    fd: OwnedFd,
}

impl PhysicalMemory for HostMemory {
    fn export(&self) -> Result<OwnedFd, BackendError> {
        self.fd
            .try_clone()
            .map_err(|e| BackendError::Failed(format!("dup: {e}")))
    }
}

/// An exported memfd mapped into this process.
#[derive(Debug)]
pub struct HostMapping {
    ptr: *mut u8,
    len: u64,
}

// The mapping is plain shared memory owned by this value; moving it between threads is sound.
unsafe impl Send for HostMapping {}

impl HostMapping {
    /// `mmap` `len` bytes of `fd`, shared, read-only unless `writable`. The descriptor is closed after
    /// mapping (the mapping keeps the memory alive).
    pub fn map(fd: OwnedFd, len: u64, writable: bool) -> Result<Self, BackendError> {
        if len == 0 {
            return Ok(HostMapping {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        let size = usize::try_from(len)
            .map_err(|_| BackendError::Failed(format!("size {len} does not fit in memory")))?;
        // The file may be shorter than claimed (a hostile or confused server): check before mapping, as
        // touching pages past its end would raise SIGBUS.
        // SAFETY: `stat` is plain data filled by fstat on a valid fd.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
            return Err(os_error("fstat"));
        }
        if (stat.st_size as u64) < len {
            return Err(BackendError::Failed(format!(
                "exported allocation is {} bytes, expected at least {len}",
                stat.st_size
            )));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of a valid fd; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_error("mmap"));
        }
        Ok(HostMapping {
            ptr: ptr.cast(),
            len,
        })
    }

    fn check(&self, offset: u64, count: usize) -> Result<usize, BackendError> {
        let end = offset.checked_add(count as u64);
        match end {
            Some(end) if end <= self.len => Ok(offset as usize),
            _ => Err(BackendError::Failed(format!(
                "range {offset}+{count} is outside the {}-byte mapping",
                self.len
            ))),
        }
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        if self.ptr.is_null() {
            return &[];
        }
        // SAFETY: `ptr` maps `len` readable bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len as usize) }
    }
}

impl MappedAllocation for HostMapping {
    fn len(&self) -> u64 {
        self.len
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        let start = self.check(offset, data.len())?;
        // SAFETY: bounds checked above; a read-only mapping would fault, so only writers call this
        // (the mapping was made writable by `map(.., true)`).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(start), data.len()) };
        Ok(())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendError> {
        let start = self.check(offset, out.len())?;
        out.copy_from_slice(&self.as_slice()[start..start + out.len()]);
        Ok(())
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: unmapping exactly what `map` mapped.
            unsafe { libc::munmap(self.ptr.cast(), self.len as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_through_one_mapping_are_read_through_another() {
        let backend = HostBackend::new(0, Some(4096)).unwrap();
        let memory = backend.create(8192).unwrap();
        let mut writer = HostMapping::map(memory.export().unwrap(), 8192, true).unwrap();
        writer.write(100, b"weights").unwrap();
        let reader = HostMapping::map(memory.export().unwrap(), 8192, false).unwrap();
        let mut out = [0u8; 7];
        reader.read(100, &mut out).unwrap();
        assert_eq!(&out, b"weights");
        assert!(reader.read(8190, &mut out).is_err());
        // Claiming more than the file holds is refused instead of faulting later.
        assert!(HostMapping::map(memory.export().unwrap(), 1 << 20, false).is_err());
    }

    #[test]
    fn granularity_must_be_page_multiple() {
        assert!(HostBackend::new(0, Some(1000)).is_err());
        assert!(HostBackend::new(0, Some(0)).is_err());
    }
}
