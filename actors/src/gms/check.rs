//! An end-to-end check through the real path: a writer fills allocations with a seeded pattern through
//! its own mapping and commits; a reader (usually another process) imports, maps and verifies them.
//! `dynamix gms write|read` and scripts/gpu-check.sh run these; so do the integration tests.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::backend::{self, BackendError, BackendKind};
use super::client::{self, ClientError, GmsClient};
use super::protocol::RequestedLockType;

/// Metadata key prefix under which the writer records its pattern seed for the reader.
pub const SEED_KEY: &str = "dynamix.gms.check.seed";

/// Copy size between host buffers and mappings.
const CHUNK: usize = 1 << 20;

/// Why a write or read check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The server refused or failed a call (lock, allocate, export, metadata, commit, state).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An exported allocation could not be mapped.
    #[error("map allocation {index}: {source}")]
    Map {
        /// The allocation's position.
        index: u64,
        /// The backend's error.
        source: BackendError,
    },
    /// Writing the pattern into a mapping failed.
    #[error("write allocation {index}: {source}")]
    Write {
        /// The allocation's position.
        index: u64,
        /// The backend's error.
        source: BackendError,
    },
    /// Reading a mapping back failed.
    #[error("read allocation {index}: {source}")]
    Read {
        /// The allocation's position.
        index: u64,
        /// The backend's error.
        source: BackendError,
    },
    /// The writer recorded no usable seed for the allocation.
    #[error("allocation {index} has no {SEED_KEY} metadata")]
    MissingSeed {
        /// The allocation's position.
        index: u64,
    },
    /// The bytes read are not the pattern.
    #[error("{bytes} bytes differ from the pattern the writer recorded")]
    Mismatch {
        /// How many bytes differ.
        bytes: u64,
    },
}

/// What to write.
#[derive(Debug, Clone, Copy)]
pub struct WritePlan {
    /// Bytes per allocation.
    pub bytes: u64,
    /// Number of allocations.
    pub count: u32,
    /// Pattern seed.
    pub seed: u64,
}

/// What a writer wrote or a reader read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Allocations covered.
    pub allocations: usize,
    /// The committed layout hash.
    pub layout_hash: String,
    /// Lowercase hex SHA-256 of all bytes, allocation after allocation.
    pub digest: String,
}

/// The byte the writer puts at `offset` of allocation `index`.
pub fn pattern_byte(seed: u64, index: u64, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seed.wrapping_mul(31).wrapping_add(index));
    ((x >> 56) as u8) ^ (offset as u8)
}

fn pattern_chunk(seed: u64, index: u64, start: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| pattern_byte(seed, index, start + i))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writer: take the RW lock, allocate, map, fill, record the seed in metadata, commit.
pub fn write_pattern(
    socket: &Path,
    kind: BackendKind,
    device: u32,
    plan: WritePlan,
    lock_timeout: Option<Duration>,
) -> Result<CheckReport, CheckError> {
    let mut session = GmsClient::connect(socket, RequestedLockType::Rw, lock_timeout)?;
    let mut digest = Sha256::new();
    for index in 0..plan.count as u64 {
        let info = session.allocate(plan.bytes, "dynamix-gms-check")?;
        let (_, fd) = session.export(&info.allocation_id)?;
        let mut mapping = backend::map_exported(kind, device, fd, info.aligned_size, true)
            .map_err(|source| CheckError::Map { index, source })?;
        let mut offset = 0u64;
        while offset < info.size {
            let len = CHUNK.min((info.size - offset) as usize);
            let chunk = pattern_chunk(plan.seed, index, offset, len);
            mapping
                .write(offset, &chunk)
                .map_err(|source| CheckError::Write { index, source })?;
            digest.update(&chunk);
            offset += len as u64;
        }
        // Unmap before commit, as Dynamo's client does.
        drop(mapping);
        session.metadata_put(
            &format!("{SEED_KEY}.{index}"),
            &info.allocation_id,
            0,
            plan.seed.to_string().as_bytes(),
        )?;
    }
    session.commit()?;
    let state = client::runtime_state(socket)?;
    Ok(CheckReport {
        allocations: plan.count as usize,
        layout_hash: state.memory_layout_hash,
        digest: hex(&digest.finalize()),
    })
}

/// Reader: take an RO lock (checking the layout hash when `expect_hash` is given), map every allocation
/// and compare it with the pattern the writer recorded. A mismatch is an error naming the count.
pub fn read_pattern(
    socket: &Path,
    kind: BackendKind,
    device: u32,
    expect_hash: Option<&str>,
    lock_timeout: Option<Duration>,
) -> Result<CheckReport, CheckError> {
    let mut session = GmsClient::connect(socket, RequestedLockType::Ro, lock_timeout)?;
    if let Some(expected) = expect_hash {
        session.verify_layout(expected)?;
    }
    let layout_hash = session.layout_hash()?;
    let allocations = session.list_allocations(None)?;
    let mut digest = Sha256::new();
    let mut mismatches = 0u64;
    let mut buffer = vec![0u8; CHUNK];
    for (index, info) in (0u64..).zip(&allocations) {
        let seed = session
            .metadata_get(&format!("{SEED_KEY}.{index}"))?
            .and_then(|m| String::from_utf8(m.value).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(CheckError::MissingSeed { index })?;
        let (_, fd) = session.export(&info.allocation_id)?;
        let mapping = backend::map_exported(kind, device, fd, info.aligned_size, false)
            .map_err(|source| CheckError::Map { index, source })?;
        let mut offset = 0u64;
        while offset < info.size {
            let len = CHUNK.min((info.size - offset) as usize);
            mapping
                .read(offset, &mut buffer[..len])
                .map_err(|source| CheckError::Read { index, source })?;
            let expected = pattern_chunk(seed, index, offset, len);
            mismatches += expected
                .iter()
                .zip(&buffer[..len])
                .filter(|(a, b)| a != b)
                .count() as u64;
            digest.update(&buffer[..len]);
            offset += len as u64;
        }
    }
    if mismatches > 0 {
        return Err(CheckError::Mismatch { bytes: mismatches });
    }
    Ok(CheckReport {
        allocations: allocations.len(),
        layout_hash,
        digest: hex(&digest.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_errors_name_the_allocation_and_the_key() {
        assert_eq!(
            CheckError::MissingSeed { index: 3 }.to_string(),
            "allocation 3 has no dynamix.gms.check.seed metadata"
        );
        let read = CheckError::Read {
            index: 1,
            source: BackendError::Failed("short read".into()),
        };
        assert_eq!(read.to_string(), "read allocation 1: short read");
        assert_eq!(
            CheckError::Mismatch { bytes: 7 }.to_string(),
            "7 bytes differ from the pattern the writer recorded"
        );
    }
}
