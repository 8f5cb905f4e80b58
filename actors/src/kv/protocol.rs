//! KV events, engine → router (runtime spec §3.2), with Dynamo's JSON shape:
//! `{"worker_id": 7, "event": {"event_id": 1, "data": {"stored": {"parent_hash": null, "blocks": [...]}}, "dp_rank": 0}}`.

use serde::{Deserialize, Deserializer, Serialize};

use super::hashing::LocalBlockHash;

/// An engine's own id for one of its blocks (`ExternalSequenceBlockHash`): opaque to the router, used
/// only to find the block again (parent lookup, removal). An i64 on the wire is read bitwise.
pub type EngineBlockHash = u64;

/// Engine instance id.
pub type WorkerId = u64;

/// One KV event from one engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterEvent {
    /// The engine instance that emitted it.
    pub worker_id: WorkerId,
    /// The event.
    pub event: KvCacheEvent,
}

/// One change to an engine's KV cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheEvent {
    /// Monotonic per engine.
    pub event_id: u64,
    /// What changed.
    pub data: KvCacheEventData,
    /// Data-parallel rank within the engine.
    #[serde(default)]
    pub dp_rank: u32,
}

/// What changed (externally tagged, snake_case).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheEventData {
    /// Full blocks newly stored, in sequence order.
    Stored(KvCacheStoreData),
    /// Blocks evicted.
    Removed(KvCacheRemoveData),
    /// Every block of this engine dropped.
    Cleared,
}

/// Payload of a `stored` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheStoreData {
    /// The engine hash of the block before `blocks[0]`; `None` when `blocks[0]` starts the sequence.
    #[serde(default, deserialize_with = "optional_hash")]
    pub parent_hash: Option<EngineBlockHash>,
    /// The stored blocks.
    pub blocks: Vec<KvCacheStoredBlockData>,
}

/// One stored block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheStoredBlockData {
    /// The engine's id for the block.
    #[serde(deserialize_with = "hash")]
    pub block_hash: EngineBlockHash,
    /// The block's local hash (§3.1).
    #[serde(deserialize_with = "hash")]
    pub tokens_hash: LocalBlockHash,
}

/// Payload of a `removed` event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheRemoveData {
    /// Engine hashes of the evicted blocks.
    #[serde(deserialize_with = "hashes")]
    pub block_hashes: Vec<EngineBlockHash>,
}

/// A u64 written as an unsigned or (two's complement) signed JSON integer.
#[derive(Deserialize)]
#[serde(untagged)]
enum WireHash {
    Unsigned(u64),
    Signed(i64),
}

impl From<WireHash> for u64 {
    fn from(hash: WireHash) -> u64 {
        match hash {
            WireHash::Unsigned(v) => v,
            WireHash::Signed(v) => v as u64,
        }
    }
}

fn hash<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    WireHash::deserialize(deserializer).map(u64::from)
}

fn optional_hash<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<WireHash>::deserialize(deserializer)?.map(u64::from))
}

fn hashes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u64>, D::Error> {
    Ok(Vec::<WireHash>::deserialize(deserializer)?
        .into_iter()
        .map(u64::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape_matches_dynamo() {
        let stored = RouterEvent {
            worker_id: 7,
            event: KvCacheEvent {
                event_id: 1,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: None,
                    blocks: vec![KvCacheStoredBlockData {
                        block_hash: 11,
                        tokens_hash: 22,
                    }],
                }),
                dp_rank: 0,
            },
        };
        assert_eq!(
            serde_json::to_value(&stored).unwrap(),
            serde_json::json!({"worker_id": 7, "event": {"event_id": 1, "dp_rank": 0, "data": {"stored": {
                "parent_hash": null, "blocks": [{"block_hash": 11, "tokens_hash": 22}]}}}})
        );
        let cleared: KvCacheEventData = serde_json::from_str("\"cleared\"").unwrap();
        assert_eq!(cleared, KvCacheEventData::Cleared);
    }

    #[test]
    fn signed_hashes_are_read_bitwise() {
        let removed: KvCacheEventData =
            serde_json::from_str(r#"{"removed": {"block_hashes": [-1, 5]}}"#).unwrap();
        assert_eq!(
            removed,
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: vec![u64::MAX, 5]
            })
        );
        let stored: KvCacheEventData = serde_json::from_str(
            r#"{"stored": {"parent_hash": -2, "blocks": [{"block_hash": -3, "tokens_hash": 4}]}}"#,
        )
        .unwrap();
        let KvCacheEventData::Stored(data) = stored else {
            panic!("not stored")
        };
        assert_eq!(data.parent_hash, Some(u64::MAX - 1));
        assert_eq!(data.blocks[0].block_hash, u64::MAX - 2);
    }
}
