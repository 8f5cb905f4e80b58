//! An end-to-end check through the real path: a writer fills allocations with a seeded pattern through
//! its own mapping and commits; a reader (usually another process) imports, maps and verifies them.
//! `dynamix gms write|read` and scripts/gpu-check.sh run these; so do the integration tests.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::backend::{self, BackendKind};
use super::client::{self, GmsClient};
use super::protocol::RequestedLockType;

/// Metadata key prefix under which the writer records its pattern seed for the reader.
pub const SEED_KEY: &str = "dynamix.gms.check.seed";

/// Copy size between host buffers and mappings.
const CHUNK: usize = 1 << 20;

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
) -> Result<CheckReport, String> {
    let mut session = GmsClient::connect(socket, RequestedLockType::Rw, lock_timeout)
        .map_err(|e| e.to_string())?;
    let mut digest = Sha256::new();
    for index in 0..plan.count as u64 {
        let info = session
            .allocate(plan.bytes, "dynamix-gms-check")
            .map_err(|e| e.to_string())?;
        let (_, fd) = session
            .export(&info.allocation_id)
            .map_err(|e| e.to_string())?;
        let mut mapping = backend::map_exported(kind, device, fd, info.aligned_size, true)
            .map_err(|e| format!("map allocation {index}: {e}"))?;
        let mut offset = 0u64;
        while offset < info.size {
            let len = CHUNK.min((info.size - offset) as usize);
            let chunk = pattern_chunk(plan.seed, index, offset, len);
            mapping
                .write(offset, &chunk)
                .map_err(|e| format!("write allocation {index}: {e}"))?;
            digest.update(&chunk);
            offset += len as u64;
        }
        // Unmap before commit, as Dynamo's client does.
        drop(mapping);
        session
            .metadata_put(
                &format!("{SEED_KEY}.{index}"),
                &info.allocation_id,
                0,
                plan.seed.to_string().as_bytes(),
            )
            .map_err(|e| e.to_string())?;
    }
    session.commit().map_err(|e| e.to_string())?;
    let state = client::runtime_state(socket).map_err(|e| e.to_string())?;
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
) -> Result<CheckReport, String> {
    let mut session = GmsClient::connect(socket, RequestedLockType::Ro, lock_timeout)
        .map_err(|e| e.to_string())?;
    if let Some(expected) = expect_hash {
        session.verify_layout(expected).map_err(|e| e.to_string())?;
    }
    let layout_hash = session.layout_hash().map_err(|e| e.to_string())?;
    let allocations = session.list_allocations(None).map_err(|e| e.to_string())?;
    let mut digest = Sha256::new();
    let mut mismatches = 0u64;
    let mut buffer = vec![0u8; CHUNK];
    for (index, info) in allocations.iter().enumerate() {
        let seed = session
            .metadata_get(&format!("{SEED_KEY}.{index}"))
            .map_err(|e| e.to_string())?
            .and_then(|m| String::from_utf8(m.value).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("allocation {index} has no {SEED_KEY} metadata"))?;
        let (_, fd) = session
            .export(&info.allocation_id)
            .map_err(|e| e.to_string())?;
        let mapping = backend::map_exported(kind, device, fd, info.aligned_size, false)
            .map_err(|e| format!("map allocation {index}: {e}"))?;
        let mut offset = 0u64;
        while offset < info.size {
            let len = CHUNK.min((info.size - offset) as usize);
            mapping
                .read(offset, &mut buffer[..len])
                .map_err(|e| format!("read allocation {index}: {e}"))?;
            let expected = pattern_chunk(seed, index as u64, offset, len);
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
        return Err(format!(
            "{mismatches} bytes differ from the pattern the writer recorded"
        ));
    }
    Ok(CheckReport {
        allocations: allocations.len(),
        layout_hash,
        digest: hex(&digest.finalize()),
    })
}
