//! A paged KV cache's block accounting (runtime spec §4.5), shared by the mocker (which simulates the
//! cache) and the GPU engine (whose block ids index its device pool): `capacity` blocks of
//! `block_size` tokens, an active pool of blocks that running requests hold (refcounted), and an
//! inactive pool of full blocks that no request holds but that stay cached for prefix reuse until
//! evicted, least recently used first.
//!
//! Full blocks are identified by their sequence hash (kv::hashing); a block that is still filling, or a
//! full block whose prefix another block already caches, is private to the request holding it and goes
//! straight back to the free list when released. With prefix caching on, the manager records the KV
//! events a router needs (`stored` for newly cached blocks, grouped per run; `removed` on eviction).

use std::collections::{BTreeMap, HashMap};

use crate::kv::hashing::{LocalBlockHash, SequenceHash};
use crate::kv::protocol::{
    KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
};

/// Index of one block slot.
pub(crate) type BlockId = usize;

/// The two hashes of one full block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockHashes {
    /// Chained hash of this block and every block before it: the block's identity in the cache and
    /// its `block_hash` on the wire.
    pub(crate) sequence: SequenceHash,
    /// Hash of this block's tokens alone (`tokens_hash` on the wire).
    pub(crate) local: LocalBlockHash,
}

#[derive(Debug, Default)]
struct Block {
    refcount: u32,
    /// Set while the block is in the prefix cache.
    hashes: Option<BlockHashes>,
    /// The sequence hash of the block before it (while cached; `None` for a sequence's first).
    parent: Option<SequenceHash>,
    /// Set while the block sits in the inactive pool: its key in `inactive`.
    lru_tick: Option<u64>,
}

/// The block pools of one simulated worker.
#[derive(Debug)]
pub(crate) struct KvManager {
    capacity: usize,
    /// Slots created so far; grown on demand so a huge `num_gpu_blocks` costs nothing up front.
    blocks: Vec<Block>,
    /// Slots holding nothing (refcount 0, not cached).
    free: Vec<BlockId>,
    /// Cached full blocks (active or inactive) by sequence hash.
    cached: HashMap<SequenceHash, BlockId>,
    /// Inactive cached blocks by last release, oldest first: the eviction order.
    inactive: BTreeMap<u64, BlockId>,
    next_tick: u64,
    /// Blocks with refcount > 0.
    active: usize,
    prefix_caching: bool,
    record_events: bool,
    events: Vec<KvCacheEventData>,
}

impl KvManager {
    /// A cache of `capacity` blocks; `record_events` only matters with `prefix_caching`.
    pub(crate) fn new(capacity: usize, prefix_caching: bool, record_events: bool) -> Self {
        KvManager {
            capacity,
            blocks: Vec::new(),
            free: Vec::new(),
            cached: HashMap::new(),
            inactive: BTreeMap::new(),
            next_tick: 0,
            active: 0,
            prefix_caching,
            record_events: prefix_caching && record_events,
            events: Vec::new(),
        }
    }

    /// Blocks in the cache.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks held by at least one request.
    pub(crate) fn active_blocks(&self) -> usize {
        self.active
    }

    /// Cached blocks no request holds (evictable).
    pub(crate) fn inactive_blocks(&self) -> usize {
        self.inactive.len()
    }

    /// Blocks holding nothing.
    pub(crate) fn free_blocks(&self) -> usize {
        self.capacity
            .saturating_sub(self.active + self.inactive.len())
    }

    /// Whether a full block with this sequence hash is cached.
    pub(crate) fn is_cached(&self, sequence: SequenceHash) -> bool {
        self.cached.contains_key(&sequence)
    }

    /// Whether the block with this sequence hash is cached but held by nobody.
    pub(crate) fn is_inactive(&self, sequence: SequenceHash) -> bool {
        self.cached
            .get(&sequence)
            .and_then(|&id| self.blocks.get(id))
            .is_some_and(|block| block.refcount == 0)
    }

    /// How many leading blocks of `hashes` are cached (0 without prefix caching).
    pub(crate) fn cached_prefix(&self, hashes: &[BlockHashes]) -> usize {
        if !self.prefix_caching {
            return 0;
        }
        hashes
            .iter()
            .take_while(|h| self.is_cached(h.sequence))
            .count()
    }

    /// Take a reference on the cached block `sequence` (reactivating it if inactive).
    pub(crate) fn acquire_cached(&mut self, sequence: SequenceHash) -> Option<BlockId> {
        let id = *self.cached.get(&sequence)?;
        let block = self.blocks.get_mut(id)?;
        if block.refcount == 0 {
            if let Some(tick) = block.lru_tick.take() {
                self.inactive.remove(&tick);
            }
            self.active += 1;
        }
        block.refcount += 1;
        Some(id)
    }

    /// Allocate `count` fresh blocks, evicting least recently used inactive blocks as needed. All or
    /// nothing: `None` (and no change) when free plus evictable blocks are fewer than `count`.
    pub(crate) fn allocate(&mut self, count: usize) -> Option<Vec<BlockId>> {
        if self.free_blocks() + self.inactive.len() < count {
            return None;
        }
        let mut ids = Vec::with_capacity(count);
        let mut evicted = Vec::new();
        for _ in 0..count {
            let id = if let Some(id) = self.free.pop() {
                id
            } else if self.blocks.len() < self.capacity {
                self.blocks.push(Block::default());
                self.blocks.len() - 1
            } else {
                let (_, id) = self.inactive.pop_first()?;
                let block = &mut self.blocks[id];
                block.lru_tick = None;
                block.parent = None;
                if let Some(hashes) = block.hashes.take() {
                    self.cached.remove(&hashes.sequence);
                    evicted.push(hashes.sequence);
                }
                id
            };
            self.blocks[id].refcount = 1;
            self.active += 1;
            ids.push(id);
        }
        if self.record_events && !evicted.is_empty() {
            self.events
                .push(KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: evicted,
                }));
        }
        Some(ids)
    }

    /// Drop one reference on each of `ids`. Released last block first, so a sequence's tail is evicted
    /// before its prefix (an evicted parent would strand its children in the router's prefix tree).
    pub(crate) fn release(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let Some(block) = self.blocks.get_mut(id) else {
                continue;
            };
            if block.refcount == 0 {
                continue;
            }
            block.refcount -= 1;
            if block.refcount > 0 {
                continue;
            }
            self.active -= 1;
            if block.hashes.is_some() {
                block.lru_tick = Some(self.next_tick);
                self.inactive.insert(self.next_tick, id);
                self.next_tick += 1;
            } else {
                self.free.push(id);
            }
        }
    }

    /// Cache the just-filled blocks `ids` (in sequence order, with their `hashes`) whose predecessor
    /// has sequence hash `parent`. A block whose sequence hash is already cached stays private. Newly
    /// cached blocks are reported as `stored` events, one per run of consecutive new blocks.
    pub(crate) fn register_run(
        &mut self,
        ids: &[BlockId],
        hashes: &[BlockHashes],
        mut parent: Option<SequenceHash>,
    ) {
        if !self.prefix_caching {
            return;
        }
        let mut run: Option<KvCacheStoreData> = None;
        for (&id, &hash) in ids.iter().zip(hashes) {
            let newly_cached = match self.blocks.get_mut(id) {
                Some(block)
                    if block.hashes.is_none() && !self.cached.contains_key(&hash.sequence) =>
                {
                    block.hashes = Some(hash);
                    block.parent = parent;
                    self.cached.insert(hash.sequence, id);
                    true
                }
                _ => false,
            };
            if newly_cached && self.record_events {
                run.get_or_insert_with(|| KvCacheStoreData {
                    parent_hash: parent,
                    blocks: Vec::new(),
                })
                .blocks
                .push(KvCacheStoredBlockData {
                    block_hash: hash.sequence,
                    tokens_hash: hash.local,
                });
            } else if let Some(done) = run.take() {
                self.events.push(KvCacheEventData::Stored(done));
            }
            parent = Some(hash.sequence);
        }
        if let Some(done) = run {
            self.events.push(KvCacheEventData::Stored(done));
        }
    }

    /// Every cached block as `stored` events, each block after its parent: what a router that lost
    /// its index needs to know this cache again. Empty unless events are recorded.
    pub(crate) fn snapshot(&self) -> Vec<KvCacheEventData> {
        if !self.record_events {
            return Vec::new();
        }
        // Depth of each cached block in its sequence (a parent that is no longer cached ends the walk).
        let mut depth: HashMap<SequenceHash, usize> = HashMap::with_capacity(self.cached.len());
        let mut chain = Vec::new();
        for &sequence in self.cached.keys() {
            let mut at = Some(sequence);
            while let Some(hash) = at {
                if depth.contains_key(&hash) {
                    break;
                }
                let Some(block) = self.cached.get(&hash).and_then(|&id| self.blocks.get(id)) else {
                    break;
                };
                chain.push(hash);
                at = block.parent;
            }
            let mut below = at.and_then(|hash| depth.get(&hash).copied());
            while let Some(hash) = chain.pop() {
                let d = below.map_or(0, |b| b + 1);
                depth.insert(hash, d);
                below = Some(d);
            }
        }
        let mut blocks: Vec<(usize, SequenceHash)> =
            depth.into_iter().map(|(h, d)| (d, h)).collect();
        blocks.sort_unstable();
        blocks
            .into_iter()
            .filter_map(|(_, sequence)| {
                let block = self.blocks.get(*self.cached.get(&sequence)?)?;
                let hashes = block.hashes?;
                Some(KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: block.parent,
                    blocks: vec![KvCacheStoredBlockData {
                        block_hash: hashes.sequence,
                        tokens_hash: hashes.local,
                    }],
                }))
            })
            .collect()
    }

    /// The events recorded since the last call, oldest first.
    pub(crate) fn take_events(&mut self) -> Vec<KvCacheEventData> {
        std::mem::take(&mut self.events)
    }
}

/// Numbers one worker's KV events in order and sends them to whoever indexes them (a router that
/// went away is not the engine's problem). Shared by the mocker and the GPU engine.
pub(crate) struct KvEventPublisher {
    worker_id: u64,
    sender: Option<tokio::sync::mpsc::UnboundedSender<crate::kv::protocol::RouterEvent>>,
    next_event_id: std::cell::Cell<u64>,
}

impl KvEventPublisher {
    /// Events of `worker_id` into `sender` (`None`: nobody listens, nothing is sent).
    pub(crate) fn new(
        worker_id: u64,
        sender: Option<tokio::sync::mpsc::UnboundedSender<crate::kv::protocol::RouterEvent>>,
    ) -> Self {
        KvEventPublisher {
            worker_id,
            sender,
            next_event_id: std::cell::Cell::new(0),
        }
    }

    /// Send `events`, oldest first.
    pub(crate) fn send(&self, events: Vec<KvCacheEventData>) {
        let Some(sender) = &self.sender else {
            return;
        };
        for data in events {
            let event_id = self.next_event_id.get();
            self.next_event_id.set(event_id + 1);
            let _ = sender.send(crate::kv::protocol::RouterEvent {
                worker_id: self.worker_id,
                event: crate::kv::protocol::KvCacheEvent {
                    event_id,
                    data,
                    dp_rank: 0,
                },
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::hashing::{local_block_hashes, sequence_hashes};

    /// Hashes of the full blocks of `tokens` (block size 4).
    fn hashes(tokens: &[u32]) -> Vec<BlockHashes> {
        let locals = local_block_hashes(tokens, 4);
        sequence_hashes(&locals)
            .into_iter()
            .zip(locals)
            .map(|(sequence, local)| BlockHashes { sequence, local })
            .collect()
    }

    fn stored(parent: Option<u64>, blocks: &[BlockHashes]) -> KvCacheEventData {
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: parent,
            blocks: blocks
                .iter()
                .map(|h| KvCacheStoredBlockData {
                    block_hash: h.sequence,
                    tokens_hash: h.local,
                })
                .collect(),
        })
    }

    #[test]
    fn refcounts_move_blocks_between_pools() {
        let mut kv = KvManager::new(4, true, true);
        let tokens: Vec<u32> = (0..8).collect();
        let h = hashes(&tokens);
        let ids = kv.allocate(2).unwrap();
        kv.register_run(&ids, &h, None);
        assert_eq!((kv.active_blocks(), kv.inactive_blocks()), (2, 0));
        // A second holder of the first block.
        assert_eq!(kv.acquire_cached(h[0].sequence), Some(ids[0]));
        kv.release(&ids);
        // Block 0 is still held once; block 1 is inactive but cached.
        assert_eq!((kv.active_blocks(), kv.inactive_blocks()), (1, 1));
        assert!(kv.is_inactive(h[1].sequence) && !kv.is_inactive(h[0].sequence));
        kv.release(&ids[..1]);
        assert_eq!((kv.active_blocks(), kv.inactive_blocks()), (0, 2));
        assert_eq!(kv.free_blocks(), 2);
        // Reactivating an inactive block takes it out of the inactive pool.
        assert_eq!(kv.acquire_cached(h[1].sequence), Some(ids[1]));
        assert_eq!((kv.active_blocks(), kv.inactive_blocks()), (1, 1));
        // Releasing more than held is ignored.
        kv.release(&[ids[0], ids[0], 99]);
        assert_eq!((kv.active_blocks(), kv.inactive_blocks()), (1, 1));
    }

    #[test]
    fn uncached_blocks_go_back_to_the_free_list() {
        let mut kv = KvManager::new(2, true, true);
        let ids = kv.allocate(2).unwrap();
        assert_eq!(kv.free_blocks(), 0);
        kv.release(&ids);
        assert_eq!((kv.free_blocks(), kv.inactive_blocks()), (2, 0));
        assert!(kv.take_events().is_empty());
    }

    #[test]
    fn eviction_is_least_recently_used_first_and_reported() {
        let mut kv = KvManager::new(3, true, true);
        let a = hashes(&[1, 1, 1, 1]);
        let b = hashes(&[2, 2, 2, 2]);
        let c = hashes(&[3, 3, 3, 3]);
        let ia = kv.allocate(1).unwrap();
        let ib = kv.allocate(1).unwrap();
        let ic = kv.allocate(1).unwrap();
        kv.register_run(&ia, &a, None);
        kv.register_run(&ib, &b, None);
        kv.register_run(&ic, &c, None);
        kv.take_events();
        // Release order b, a, c: b is the least recently used.
        kv.release(&ib);
        kv.release(&ia);
        kv.release(&ic);
        // Touch b again and release it: now a is the oldest.
        kv.acquire_cached(b[0].sequence).unwrap();
        kv.release(&ib);
        let got = kv.allocate(2).unwrap();
        assert_eq!(got.len(), 2);
        assert!(!kv.is_cached(a[0].sequence) && !kv.is_cached(c[0].sequence));
        assert!(kv.is_cached(b[0].sequence));
        assert_eq!(
            kv.take_events(),
            vec![KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: vec![a[0].sequence, c[0].sequence]
            })]
        );
    }

    #[test]
    fn a_sequence_tail_is_evicted_before_its_prefix() {
        let mut kv = KvManager::new(3, true, false);
        let tokens: Vec<u32> = (0..12).collect();
        let h = hashes(&tokens);
        let ids = kv.allocate(3).unwrap();
        kv.register_run(&ids, &h, None);
        kv.release(&ids);
        kv.allocate(1).unwrap();
        assert!(kv.is_cached(h[0].sequence) && kv.is_cached(h[1].sequence));
        assert!(!kv.is_cached(h[2].sequence));
    }

    #[test]
    fn allocation_fails_without_evictable_blocks_and_changes_nothing() {
        let mut kv = KvManager::new(3, true, true);
        let held = kv.allocate(2).unwrap();
        assert_eq!(kv.allocate(2), None);
        assert_eq!((kv.active_blocks(), kv.free_blocks()), (2, 1));
        kv.register_run(&held, &hashes(&(0..8).collect::<Vec<_>>()), None);
        kv.release(&held[1..]);
        // One free plus one evictable.
        assert_eq!(kv.allocate(2).map(|ids| ids.len()), Some(2));
        assert_eq!(kv.allocate(1), None);
    }

    #[test]
    fn a_snapshot_replays_every_cached_block_after_its_parent() {
        let mut kv = KvManager::new(16, true, true);
        let a = hashes(&(0..12).collect::<Vec<_>>());
        // A second sequence sharing a's first block, then diverging.
        let b = hashes(&[0, 1, 2, 3, 90, 91, 92, 93]);
        let first = kv.allocate(3).unwrap();
        kv.register_run(&first, &a, None);
        let second = kv.allocate(1).unwrap();
        kv.register_run(&second, &b[1..], Some(b[0].sequence));
        kv.take_events();
        let snapshot = kv.snapshot();
        assert_eq!(snapshot.len(), 4, "{snapshot:?}");
        // Replayed into an empty index, every event finds its parent.
        let mut index = crate::kv::indexer::KvIndex::new();
        for (event_id, data) in snapshot.into_iter().enumerate() {
            let event = crate::kv::protocol::RouterEvent {
                worker_id: 3,
                event: crate::kv::protocol::KvCacheEvent {
                    event_id: event_id as u64,
                    data,
                    dp_rank: 0,
                },
            };
            index.apply(&event).expect("parent known");
        }
        assert_eq!(index.worker_block_count(3), 4);
        // Without recorded events there is nothing to replay.
        assert!(KvManager::new(16, true, false).snapshot().is_empty());
    }

    #[test]
    fn stored_events_group_new_runs_with_parents_and_skip_known_blocks() {
        let mut kv = KvManager::new(16, true, true);
        let tokens: Vec<u32> = (0..16).collect();
        let h = hashes(&tokens);
        let first = kv.allocate(2).unwrap();
        kv.register_run(&first, &h[..2], None);
        assert_eq!(kv.take_events(), vec![stored(None, &h[..2])]);
        // Another request computes the same four blocks privately: the first two are already cached
        // (no event, they stay private), the last two are new and chain onto block 1.
        let second = kv.allocate(4).unwrap();
        kv.register_run(&second, &h, None);
        assert_eq!(kv.take_events(), vec![stored(Some(h[1].sequence), &h[2..])]);
        // The hashes are kv::hashing's: sequence = chain(parent, local).
        assert_eq!(
            h[2].sequence,
            crate::kv::hashing::chain(Some(h[1].sequence), h[2].local)
        );
        // The private duplicates go back to the free list, not the cache.
        kv.release(&second[..2]);
        assert_eq!(kv.inactive_blocks(), 0);
        // A gap in the middle splits the run in two events.
        let other: Vec<u32> = (100..116).collect();
        let o = hashes(&other);
        let mid = kv.allocate(1).unwrap();
        kv.register_run(&mid, &o[1..2], Some(o[0].sequence));
        kv.take_events();
        let all = kv.allocate(4).unwrap();
        kv.register_run(&all, &o, None);
        assert_eq!(
            kv.take_events(),
            vec![stored(None, &o[..1]), stored(Some(o[1].sequence), &o[2..])]
        );
    }

    #[test]
    fn no_caching_and_no_events_when_prefix_caching_is_off() {
        let mut kv = KvManager::new(4, false, true);
        let h = hashes(&(0..8).collect::<Vec<_>>());
        let ids = kv.allocate(2).unwrap();
        kv.register_run(&ids, &h, None);
        assert_eq!(kv.cached_prefix(&h), 0);
        kv.release(&ids);
        assert_eq!((kv.inactive_blocks(), kv.free_blocks()), (0, 4));
        assert!(kv.take_events().is_empty());
    }

    #[test]
    fn cached_prefix_counts_leading_hits_only() {
        let mut kv = KvManager::new(8, true, false);
        let h = hashes(&(0..16).collect::<Vec<_>>());
        let ids = kv.allocate(2).unwrap();
        kv.register_run(&ids, &h[..2], None);
        assert_eq!(kv.cached_prefix(&h), 2);
        assert_eq!(kv.cached_prefix(&h[1..]), 1);
        assert_eq!(kv.cached_prefix(&h[2..]), 0);
        assert!(kv.take_events().is_empty(), "events off");
    }
}
