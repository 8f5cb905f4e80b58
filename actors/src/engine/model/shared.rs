//! Model weights through the GPU memory service (`gms`, issue 6): the first engine process on a device
//! re-quantizes the GGUF once and writes the tensors into a service allocation (writer session); every
//! later process — a second worker, or a worker restarted after a crash — maps the committed layout
//! and copies the tensors out (reader session) instead of re-reading and re-quantizing the file.
//!
//! The layout is one allocation (tag `weights`) holding every tensor at a 64-byte aligned offset, plus
//! one metadata entry ([`MANIFEST_KEY`]) whose value is the [`Manifest`]: source file, model shape and
//! each tensor's name, type, shape, offset and size. A reader checks that the stored manifest names its
//! GGUF file (name and size) and this manifest format, and that the server's layout hash (§2.7) is the
//! hash that manifest implies; any difference is a stale-layout error naming both, never a silently
//! wrong model.
//!
//! Within one process engines share weights through an `Arc` and a supervisor restart rebuilds only
//! the engine's KV caches and scheduler, which is cheaper still than a reader session.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::{QStorage, QTensor};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::weights::{dtype_from_name, LlamaModel, LoadError, ModelShape, TensorPlan, TensorSet};
use crate::gms::allocations::{layout_hash, MetadataEntry};
use crate::gms::backend::host::HostMapping;
use crate::gms::backend::{self, BackendKind};
use crate::gms::client::{ClientError, GmsClient};
use crate::gms::protocol::{AllocationInfo, GrantedLockType, RequestedLockType};

/// Metadata key of the manifest.
pub const MANIFEST_KEY: &str = "dynamix.model.manifest";
/// Allocation tag.
pub const TAG: &str = "weights";
/// Tensor offsets are multiples of this.
const ALIGN: u64 = 64;
/// Version of the [`Manifest`] layout; a reader refuses any other.
const FORMAT: u32 = 1;

/// What the service holds: enough to rebuild the model and to notice a different one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version of this manifest.
    pub format: u32,
    /// The GGUF file's name and size (what was re-quantized).
    pub source_name: String,
    /// Its size in bytes.
    pub source_bytes: u64,
    /// Model shape.
    pub shape: ModelShape,
    /// Tensors in layout order.
    pub tensors: Vec<PlacedTensor>,
}

/// One tensor's place in the allocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacedTensor {
    /// What it is.
    #[serde(flatten)]
    pub plan: TensorPlan,
    /// Byte offset in the allocation.
    pub offset: u64,
}

impl Manifest {
    /// The manifest for `path`, from its header (no tensor data is read).
    pub fn for_file(path: &Path) -> Result<Manifest, LoadError> {
        let (shape, plan) = LlamaModel::plan(path)?;
        let (source_name, source_bytes) = source_identity(path)?;
        let mut offset = 0;
        let tensors = plan
            .into_iter()
            .map(|plan| {
                let placed = PlacedTensor { offset, plan };
                offset = (offset + placed.plan.bytes).div_ceil(ALIGN) * ALIGN;
                placed
            })
            .collect();
        Ok(Manifest {
            format: FORMAT,
            source_name,
            source_bytes,
            shape,
            tensors,
        })
    }

    /// Bytes of the allocation.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.offset + t.plan.bytes)
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why loading through the service failed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Reading the model file.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Talking to the service.
    #[error("GPU memory service at {socket}: {source}")]
    Service {
        /// Its socket.
        socket: PathBuf,
        /// What went wrong.
        source: ClientError,
    },
    /// Mapping the allocation.
    #[error("GPU memory service at {socket}: cannot map the weights allocation: {reason}")]
    Map {
        /// Its socket.
        socket: PathBuf,
        /// Why.
        reason: String,
    },
    /// The service holds a layout that is not this model's.
    #[error("GPU memory service at {socket} holds a different weights layout ({found}); expected the layout of {expected}. Restart the service (or point model_engine.gms_socket at another one) to load this model")]
    Stale {
        /// Its socket.
        socket: PathBuf,
        /// What this process expected.
        expected: String,
        /// What it found.
        found: String,
    },
}

/// Which session loaded the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Nothing was committed: this process read the GGUF and wrote the layout.
    Writer,
    /// A committed layout was mapped.
    Reader,
}

/// Load `path`'s weights through the service at `socket` (host or CUDA backend `kind`, `device`):
/// as a reader when the service holds this model's committed layout, otherwise as its writer. Waits at
/// most `lock_timeout` for a writer that is still busy. Blocking.
pub fn load_shared(
    path: &Path,
    socket: &Path,
    kind: BackendKind,
    device: u32,
    lock_timeout: Duration,
) -> Result<(LlamaModel, Role), SharedError> {
    let started = Instant::now();
    let mut attempt = 0;
    let (shape, tensors, role) = loop {
        match session(path, socket, kind, device, lock_timeout) {
            Err(SharedError::Service { source, .. })
                if source.is_service_failure() && attempt < SERVICE_FAILURE_RETRIES =>
            {
                attempt += 1;
                tracing::warn!(socket = %socket.display(), %source, attempt, "the memory service failed during the weights session; opening a new one");
            }
            done => break done?,
        }
    };
    let mut model = LlamaModel::assemble(path, shape, tensors)?;
    model.load_time = started.elapsed();
    Ok((model, role))
}

/// New sessions after the service failed while serving one (it closes that session and resumes with
/// its tables; a writer's half-written layout is wiped, so the next writer starts clean).
const SERVICE_FAILURE_RETRIES: u32 = 2;

/// One session: read the committed layout, or write it.
fn session(
    path: &Path,
    socket: &Path,
    kind: BackendKind,
    device: u32,
    lock_timeout: Duration,
) -> Result<(ModelShape, TensorSet, Role), SharedError> {
    let service = |source| SharedError::Service {
        socket: socket.to_path_buf(),
        source,
    };
    let mut session =
        GmsClient::connect(socket, RequestedLockType::Auto, Some(lock_timeout)).map_err(service)?;
    Ok(match session.granted() {
        GrantedLockType::Ro => {
            let (shape, tensors) = read(&mut session, socket, path, kind, device)?;
            (shape, tensors, Role::Reader)
        }
        _ => {
            let manifest = Manifest::for_file(path)?;
            let (shape, tensors) = LlamaModel::read_tensors(path)?;
            write(session, socket, &manifest, &tensors, kind, device)?;
            (shape, tensors, Role::Writer)
        }
    })
}

fn write(
    mut session: GmsClient,
    socket: &Path,
    manifest: &Manifest,
    tensors: &TensorSet,
    kind: BackendKind,
    device: u32,
) -> Result<(), SharedError> {
    let service = |source| SharedError::Service {
        socket: socket.to_path_buf(),
        source,
    };
    let map_error = |reason: String| SharedError::Map {
        socket: socket.to_path_buf(),
        reason,
    };
    let info = session
        .allocate(manifest.total_bytes(), TAG)
        .map_err(service)?;
    let (_, fd) = session.export(&info.allocation_id).map_err(service)?;
    let mut mapping = backend::map_exported(kind, device, fd, info.aligned_size, true)
        .map_err(|e| map_error(e.to_string()))?;
    for placed in &manifest.tensors {
        let tensor = tensors
            .get(&placed.plan.name)
            .ok_or_else(|| map_error(format!("tensor {} was not loaded", placed.plan.name)))?;
        let data = tensor
            .data()
            .map_err(|e| map_error(format!("tensor {}: {e}", placed.plan.name)))?;
        if data.len() as u64 != placed.plan.bytes {
            return Err(map_error(format!(
                "tensor {} has {} bytes, the plan says {}",
                placed.plan.name,
                data.len(),
                placed.plan.bytes
            )));
        }
        mapping
            .write(placed.offset, &data)
            .map_err(|e| map_error(e.to_string()))?;
    }
    drop(mapping);
    session
        .metadata_put(MANIFEST_KEY, &info.allocation_id, 0, &manifest.encode())
        .map_err(service)?;
    session.commit().map_err(service)
}

/// The §2.7 hash of the layout `manifest` produces with an allocation of `info`'s sizes.
fn expected_hash(manifest: &Manifest, info: &AllocationInfo) -> String {
    let mut metadata = BTreeMap::new();
    metadata.insert(
        MANIFEST_KEY.to_string(),
        MetadataEntry {
            allocation_id: info.allocation_id.clone(),
            offset_bytes: 0,
            value: manifest.encode(),
        },
    );
    let expected = AllocationInfo {
        size: manifest.total_bytes(),
        tag: TAG.to_string(),
        ..info.clone()
    };
    layout_hash(&[expected], &metadata)
}

/// What identifies the model file a manifest was made from: its name and size.
fn source_identity(path: &Path) -> Result<(String, u64), LoadError> {
    let bytes = std::fs::metadata(path)
        .map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((name, bytes))
}

/// Reader: check that the committed layout is `path`'s (manifest identity, then the §2.7 hash the
/// manifest implies against the server's), then copy every tensor out of the mapping.
fn read(
    session: &mut GmsClient,
    socket: &Path,
    path: &Path,
    kind: BackendKind,
    device: u32,
) -> Result<(ModelShape, TensorSet), SharedError> {
    let service = |source| SharedError::Service {
        socket: socket.to_path_buf(),
        source,
    };
    let (name, bytes) = source_identity(path)?;
    let stale = |found: String| SharedError::Stale {
        socket: socket.to_path_buf(),
        expected: format!("{name} ({bytes} bytes, manifest format {FORMAT})"),
        found,
    };
    let stored = session.metadata_get(MANIFEST_KEY).map_err(service)?;
    let Some(stored) = stored else {
        return Err(stale(format!("no {MANIFEST_KEY} entry")));
    };
    let manifest: Manifest = serde_json::from_slice(&stored.value)
        .map_err(|e| stale(format!("an unreadable manifest ({e})")))?;
    if manifest.format != FORMAT || manifest.source_name != name || manifest.source_bytes != bytes {
        return Err(stale(format!(
            "{} ({} bytes, manifest format {})",
            manifest.source_name, manifest.source_bytes, manifest.format
        )));
    }
    let info = session
        .get_allocation(&stored.allocation_id)
        .map_err(service)?;
    let allocations = session.list_allocations(None).map_err(service)?;
    if allocations.len() != 1 || info.size < manifest.total_bytes() {
        return Err(stale(format!(
            "{} allocations, the weights one of {} bytes for {} bytes of tensors",
            allocations.len(),
            info.size,
            manifest.total_bytes()
        )));
    }
    let expected = expected_hash(&manifest, &info);
    session.verify_layout(&expected).map_err(|e| match e {
        ClientError::StaleLayout { current, .. } => stale(format!("layout hash {current}")),
        other => service(other),
    })?;
    let (_, fd) = session.export(&info.allocation_id).map_err(service)?;
    let map_error = |reason: String| SharedError::Map {
        socket: socket.to_path_buf(),
        reason,
    };
    let mut tensors = TensorSet::new();
    let mut add = |placed: &PlacedTensor, data: Cow<'_, [u8]>| -> Result<(), SharedError> {
        let err = |reason: String| map_error(format!("tensor {}: {reason}", placed.plan.name));
        let dtype = dtype_from_name(&placed.plan.dtype)
            .ok_or_else(|| err(format!("unknown type {}", placed.plan.dtype)))?;
        let storage =
            QStorage::from_data(data, &Device::Cpu, dtype).map_err(|e| err(e.to_string()))?;
        let tensor =
            QTensor::new(storage, placed.plan.dims.as_slice()).map_err(|e| err(e.to_string()))?;
        tensors.insert(placed.plan.name.clone(), tensor);
        Ok(())
    };
    if kind == BackendKind::Host {
        // Host memory: borrow the tensors straight from the mapping (one copy, into candle's storage).
        let mapping =
            HostMapping::map(fd, info.aligned_size, false).map_err(|e| map_error(e.to_string()))?;
        let all = mapping.as_slice();
        for placed in &manifest.tensors {
            let range = placed.offset as usize..(placed.offset + placed.plan.bytes) as usize;
            let data = all.get(range).ok_or_else(|| {
                map_error(format!(
                    "tensor {} lies outside the allocation",
                    placed.plan.name
                ))
            })?;
            add(placed, Cow::Borrowed(data))?;
        }
    } else {
        let mapping = backend::map_exported(kind, device, fd, info.aligned_size, false)
            .map_err(|e| map_error(e.to_string()))?;
        for placed in &manifest.tensors {
            let mut data = vec![0u8; placed.plan.bytes as usize];
            mapping
                .read(placed.offset, &mut data)
                .map_err(|e| map_error(format!("tensor {}: {e}", placed.plan.name)))?;
            add(placed, Cow::Owned(data))?;
        }
    }
    Ok((manifest.shape, tensors))
}
