use super::*;
use crate::kv::protocol::{KvCacheEvent, KvCacheRemoveData, KvCacheStoredBlockData};

mod concurrency;
mod events;
mod random_streams;

/// Engine hash of a block in these tests: 100 × its tokens hash (Dynamo's test convention).
fn engine_hash(tokens_hash: u64) -> EngineBlockHash {
    tokens_hash * 100
}

fn event(worker: WorkerId, data: KvCacheEventData) -> RouterEvent {
    RouterEvent {
        worker_id: worker,
        event: KvCacheEvent {
            event_id: 0,
            data,
            dp_rank: 0,
        },
    }
}

fn stored(worker: WorkerId, parent: Option<u64>, tokens: &[u64]) -> RouterEvent {
    event(
        worker,
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: parent.map(engine_hash),
            blocks: tokens
                .iter()
                .map(|&t| KvCacheStoredBlockData {
                    block_hash: engine_hash(t),
                    tokens_hash: t,
                })
                .collect(),
        }),
    )
}

fn removed(worker: WorkerId, tokens: &[u64]) -> RouterEvent {
    event(
        worker,
        KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: tokens.iter().map(|&t| engine_hash(t)).collect(),
        }),
    )
}

fn scores(index: &KvIndex, query: &[u64]) -> Vec<(WorkerId, u32)> {
    let mut scores: Vec<_> = index
        .find_matches(query, false)
        .scores
        .into_iter()
        .collect();
    scores.sort_unstable();
    scores
}
