//! The allocation table, the metadata store and the layout hash (runtime spec §2.5–2.7).
//!
//! Sizes are rounded up to the backend's granularity; each allocation gets the next layout slot. The
//! metadata store maps a key (usually a tensor name) to an allocation, an offset inside it and opaque
//! bytes. Both are wiped when a writer connects or aborts. The layout hash covers the structure (ranks,
//! sizes, tags, metadata), never allocation ids, so identical layouts hash identically across writers.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;

use sha2::{Digest, Sha256};

use super::backend::{align_up, BackendError, MemoryBackend, PhysicalMemory};
use super::protocol::AllocationInfo;

/// Why an allocation or metadata call failed (each becomes an `error_response`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// Size ≤ 0 or too large.
    #[error("{0}")]
    InvalidSize(String),
    /// No allocation with this id.
    #[error("Unknown allocation: {0}")]
    NotFound(String),
    /// Metadata offset outside its allocation.
    #[error("{0}")]
    InvalidOffset(String),
    /// The device has no memory now (the connection retries).
    #[error("out of memory")]
    OutOfMemory,
    /// The backend failed.
    #[error("{0}")]
    Backend(String),
    /// Metadata references a missing allocation or an offset outside it (checked at commit).
    #[error("metadata integrity check failed: {0}")]
    Integrity(String),
}

impl From<BackendError> for AllocationError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::OutOfMemory => AllocationError::OutOfMemory,
            other => AllocationError::Backend(other.to_string()),
        }
    }
}

/// One metadata entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataEntry {
    /// The allocation the entry describes part of.
    pub allocation_id: String,
    /// Where inside it.
    pub offset_bytes: u64,
    /// Opaque bytes (shape, dtype, stride...).
    pub value: Vec<u8>,
}

struct Allocation {
    info: AllocationInfo,
    memory: Box<dyn PhysicalMemory>,
}

/// Server-owned allocations, metadata and the layout hash of one (device, tag).
pub struct AllocationTable {
    /// The only place memory comes from.
    backend: Box<dyn MemoryBackend>,
    allocations: HashMap<String, Allocation>,
    next_slot: u64,
    metadata: BTreeMap<String, MetadataEntry>,
    layout_hash: String,
}

impl AllocationTable {
    /// An empty table over `backend`.
    pub fn new(backend: Box<dyn MemoryBackend>) -> Self {
        AllocationTable {
            backend,
            allocations: HashMap::new(),
            next_slot: 0,
            metadata: BTreeMap::new(),
            layout_hash: String::new(),
        }
    }

    /// The backend's granularity.
    pub fn granularity(&self) -> u64 {
        self.backend.granularity()
    }

    /// Server-owned allocations.
    pub fn count(&self) -> usize {
        self.allocations.len()
    }

    /// The hash of the last commit ("" when none).
    pub fn layout_hash(&self) -> &str {
        &self.layout_hash
    }

    /// Release everything (writer connect or abort); returns how many allocations were released.
    pub fn clear(&mut self) -> usize {
        let count = self.allocations.len();
        self.allocations.clear();
        self.metadata.clear();
        self.next_slot = 0;
        self.layout_hash.clear();
        count
    }

    /// Create an allocation of `size` bytes (rounded up to the granularity).
    pub fn allocate(&mut self, size: i64, tag: &str) -> Result<AllocationInfo, AllocationError> {
        if size <= 0 {
            return Err(AllocationError::InvalidSize(format!(
                "size must be > 0, got {size}"
            )));
        }
        let granularity = self.backend.granularity();
        let aligned_size = align_up(size as u64, granularity)
            .filter(|s| *s <= i64::MAX as u64)
            .ok_or_else(|| {
                AllocationError::InvalidSize(format!(
                    "size {size} is too large to align to {granularity} bytes"
                ))
            })?;
        let memory = self.backend.create(aligned_size)?;
        let info = AllocationInfo {
            allocation_id: uuid::Uuid::new_v4().to_string(),
            size: size as u64,
            aligned_size,
            tag: tag.to_string(),
            layout_slot: self.next_slot,
        };
        self.next_slot += 1;
        self.allocations.insert(
            info.allocation_id.clone(),
            Allocation {
                info: info.clone(),
                memory,
            },
        );
        Ok(info)
    }

    /// Describe one allocation.
    pub fn get(&self, allocation_id: &str) -> Result<AllocationInfo, AllocationError> {
        self.allocations
            .get(allocation_id)
            .map(|a| a.info.clone())
            .ok_or_else(|| AllocationError::NotFound(allocation_id.to_string()))
    }

    /// A new descriptor for `allocation_id`.
    pub fn export(
        &self,
        allocation_id: &str,
    ) -> Result<(AllocationInfo, OwnedFd), AllocationError> {
        let allocation = self
            .allocations
            .get(allocation_id)
            .ok_or_else(|| AllocationError::NotFound(allocation_id.to_string()))?;
        let fd = allocation.memory.export()?;
        Ok((allocation.info.clone(), fd))
    }

    /// All allocations (with `tag`, when given) in layout order.
    pub fn list(&self, tag: Option<&str>) -> Vec<AllocationInfo> {
        let mut out: Vec<AllocationInfo> = self
            .allocations
            .values()
            .filter(|a| tag.is_none_or(|t| a.info.tag == t))
            .map(|a| a.info.clone())
            .collect();
        out.sort_by_key(|a| a.layout_slot);
        out
    }

    /// Release one allocation and the metadata that points into it; false if unknown.
    pub fn free(&mut self, allocation_id: &str) -> bool {
        if self.allocations.remove(allocation_id).is_none() {
            return false;
        }
        self.metadata
            .retain(|_, e| e.allocation_id != allocation_id);
        true
    }

    /// Store (or overwrite) a metadata entry.
    pub fn metadata_put(
        &mut self,
        key: String,
        allocation_id: String,
        offset_bytes: i64,
        value: Vec<u8>,
    ) -> Result<(), AllocationError> {
        let allocation = self
            .allocations
            .get(&allocation_id)
            .ok_or_else(|| AllocationError::NotFound(allocation_id.clone()))?;
        if offset_bytes < 0 {
            return Err(AllocationError::InvalidOffset(
                "offset_bytes must be >= 0".into(),
            ));
        }
        let offset = offset_bytes as u64;
        if offset >= allocation.info.aligned_size {
            return Err(AllocationError::InvalidOffset(format!(
                "offset_bytes {offset} out of range for allocation {allocation_id} (aligned_size={})",
                allocation.info.aligned_size
            )));
        }
        self.metadata.insert(
            key,
            MetadataEntry {
                allocation_id,
                offset_bytes: offset,
                value,
            },
        );
        Ok(())
    }

    /// Read a metadata entry.
    pub fn metadata_get(&self, key: &str) -> Option<&MetadataEntry> {
        self.metadata.get(key)
    }

    /// Remove a metadata entry; whether it existed.
    pub fn metadata_delete(&mut self, key: &str) -> bool {
        self.metadata.remove(key).is_some()
    }

    /// Sorted keys starting with `prefix`.
    pub fn metadata_list(&self, prefix: &str) -> Vec<String> {
        self.metadata
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Check metadata integrity, then compute and keep the layout hash (at commit).
    pub fn seal(&mut self) -> Result<String, AllocationError> {
        for (key, entry) in &self.metadata {
            match self.allocations.get(&entry.allocation_id) {
                None => {
                    return Err(AllocationError::Integrity(format!(
                        "key {key} references unknown allocation {}",
                        entry.allocation_id
                    )))
                }
                Some(a) if entry.offset_bytes >= a.info.aligned_size => {
                    return Err(AllocationError::Integrity(format!(
                        "key {key} offset {} is outside allocation {}",
                        entry.offset_bytes, entry.allocation_id
                    )))
                }
                Some(_) => {}
            }
        }
        self.layout_hash = layout_hash(&self.list(None), &self.metadata);
        Ok(self.layout_hash.clone())
    }
}

/// The §2.7 formula: allocations by layout slot as `"{rank}:{size}:{aligned_size}:{tag}"`, then metadata by
/// key as `"{key}:{rank}:{offset}:"` followed by the value bytes; lowercase hex SHA-256.
pub fn layout_hash(
    allocations_in_slot_order: &[AllocationInfo],
    metadata: &BTreeMap<String, MetadataEntry>,
) -> String {
    let mut hasher = Sha256::new();
    let mut rank_of = HashMap::new();
    for (rank, a) in allocations_in_slot_order.iter().enumerate() {
        rank_of.insert(a.allocation_id.as_str(), rank);
        hasher.update(format!("{rank}:{}:{}:{}", a.size, a.aligned_size, a.tag).as_bytes());
    }
    for (key, entry) in metadata {
        // seal() checked that every entry's allocation exists.
        let rank = rank_of
            .get(entry.allocation_id.as_str())
            .copied()
            .unwrap_or(usize::MAX);
        hasher.update(format!("{key}:{rank}:{}:", entry.offset_bytes).as_bytes());
        hasher.update(&entry.value);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gms::backend::host::HostBackend;

    fn table() -> AllocationTable {
        AllocationTable::new(Box::new(HostBackend::new(0, Some(1 << 20)).unwrap()))
    }

    #[test]
    fn sizes_round_up_and_slots_count_from_zero() {
        let mut t = table();
        let a = t.allocate(1, "w").unwrap();
        let b = t.allocate((1 << 20) + 1, "w").unwrap();
        assert_eq!((a.size, a.aligned_size, a.layout_slot), (1, 1 << 20, 0));
        assert_eq!(b.aligned_size, 2 << 20);
        assert_eq!(b.layout_slot, 1);
        assert!(matches!(
            t.allocate(0, "w"),
            Err(AllocationError::InvalidSize(_))
        ));
        assert!(matches!(
            t.allocate(-5, "w"),
            Err(AllocationError::InvalidSize(_))
        ));
        assert!(matches!(
            t.allocate(i64::MAX, "w"),
            Err(AllocationError::InvalidSize(_))
        ));
        assert_eq!(t.count(), 2);
        assert_eq!(t.clear(), 2);
        assert_eq!(t.allocate(1, "w").unwrap().layout_slot, 0);
    }

    #[test]
    fn metadata_rules() {
        let mut t = table();
        let a = t.allocate(10, "w").unwrap();
        let id = a.allocation_id.clone();
        assert!(matches!(
            t.metadata_put("k".into(), "nope".into(), 0, vec![]),
            Err(AllocationError::NotFound(_))
        ));
        assert_eq!(
            t.metadata_put("k".into(), id.clone(), -1, vec![])
                .unwrap_err()
                .to_string(),
            "offset_bytes must be >= 0"
        );
        assert!(t
            .metadata_put("k".into(), id.clone(), 1 << 20, vec![])
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        t.metadata_put("b.w".into(), id.clone(), 4, vec![1])
            .unwrap();
        t.metadata_put("a.w".into(), id.clone(), 0, vec![2])
            .unwrap();
        t.metadata_put("c".into(), id.clone(), 0, vec![3]).unwrap();
        assert_eq!(t.metadata_list(""), vec!["a.w", "b.w", "c"]);
        assert_eq!(t.metadata_list("b"), vec!["b.w"]);
        assert!(t.metadata_delete("c"));
        assert!(!t.metadata_delete("c"));
        assert!(t.free(&id));
        assert!(!t.free(&id));
        assert!(t.metadata_list("").is_empty());
    }

    #[test]
    fn hash_follows_structure_not_ids() {
        let build = |value: u8| {
            let mut t = table();
            let a = t.allocate(10, "w").unwrap();
            t.allocate(20, "kv").unwrap();
            t.metadata_put("x".into(), a.allocation_id, 8, vec![value])
                .unwrap();
            t.seal().unwrap()
        };
        assert_eq!(build(1), build(1));
        assert_ne!(build(1), build(2));
        // The formula, spelled out for one allocation and one key.
        let info = AllocationInfo {
            allocation_id: "id".into(),
            size: 10,
            aligned_size: 16,
            tag: "w".into(),
            layout_slot: 0,
        };
        let mut metadata = BTreeMap::new();
        metadata.insert(
            "k".to_string(),
            MetadataEntry {
                allocation_id: "id".into(),
                offset_bytes: 2,
                value: b"v".to_vec(),
            },
        );
        let expected: String = Sha256::digest(b"0:10:16:wk:0:2:v")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(layout_hash(&[info], &metadata), expected);
    }
}
