//! Approximate mode (runtime spec §3.6): without KV events, the router indexes its own decisions.
//!
//! After routing a request, the router records the request's full blocks as stored on the chosen worker
//! ([`ApproxRecorder::record`] returns the [`RouterEvent`] to apply to the index). Every (worker, block)
//! lives for the configured TTL from its last record; [`ApproxRecorder::expire`] returns what expired as
//! removed events, and keeps the number of tracked entries within `max_tree_size` by removing the
//! earliest-expiring ones ([`ApproxRecorder::prune`], which `expire` runs after the TTL pass). The events
//! name blocks by their sequence hash, which doubles as the "engine" hash, chained from the root.
//!
//! Time comes in as an argument, so expiry is deterministic under test.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use super::hashing::{sequence_hashes, LocalBlockHash, SequenceHash};
use super::indexer::KeyMap;
use super::protocol::{
    KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
    RouterEvent, WorkerId,
};

/// The heap is rebuilt from the live timers once it holds this many entries per live timer: every
/// refresh leaves a stale entry behind, and rebuilding at a fixed factor keeps both memory and the
/// amortized cost bounded.
const HEAP_REBUILD_FACTOR: usize = 4;

/// A TTL so long it never expires in practice; longer ones are clamped to it so deadlines never overflow.
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// TTL and size bounds of the approximate index (`router_ttl_secs`, `router_max_tree_size`,
/// `router_prune_target_ratio`).
#[derive(Clone, Debug, PartialEq)]
pub struct PruneConfig {
    /// How long a recorded (worker, block) stays after its last record.
    pub ttl: Duration,
    /// Tracked (worker, block) entries allowed before size pruning starts.
    pub max_tree_size: usize,
    /// Size pruning removes entries until `max_tree_size × prune_target_ratio` are left (clamped to 0–1).
    pub prune_target_ratio: f64,
}

impl Default for PruneConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(120),
            max_tree_size: 1 << 20,
            prune_target_ratio: 0.8,
        }
    }
}

/// One (worker, block) and its place in the removal order: earliest expiry first; among equal expiries
/// the shallower block first (deeper blocks last), then the lower block hash, then the lower worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Instant,
    position: usize,
    block: SequenceHash,
    worker: WorkerId,
}

/// The router's own record of which worker got which blocks, with their expiry.
#[derive(Debug)]
pub struct ApproxRecorder {
    config: PruneConfig,
    /// The source of truth: (worker, block) → its current deadline.
    timers: KeyMap<(WorkerId, SequenceHash), Deadline>,
    /// Deadlines in removal order; an entry whose deadline no longer matches `timers` is stale.
    heap: BinaryHeap<Reverse<Deadline>>,
    /// Ids for the events this recorder makes.
    next_event_id: u64,
}

impl ApproxRecorder {
    /// An empty recorder.
    pub fn new(config: PruneConfig) -> Self {
        let config = PruneConfig {
            ttl: config.ttl.min(MAX_TTL),
            prune_target_ratio: if config.prune_target_ratio.is_nan() {
                0.0
            } else {
                config.prune_target_ratio.clamp(0.0, 1.0)
            },
            ..config
        };
        Self {
            config,
            timers: KeyMap::default(),
            heap: BinaryHeap::new(),
            next_event_id: 0,
        }
    }

    /// Records that the request with these local block hashes went to `worker`: every block's expiry is
    /// set (or refreshed) to `now + ttl`. Returns the stored event to apply to the index: always the
    /// whole chain from the root (block hash = sequence hash, parent none), which the index applies
    /// idempotently.
    pub fn record(
        &mut self,
        worker: WorkerId,
        locals: &[LocalBlockHash],
        now: Instant,
    ) -> RouterEvent {
        let at = now.checked_add(self.config.ttl).unwrap_or(now);
        let sequence = sequence_hashes(locals);
        for (position, &block) in sequence.iter().enumerate() {
            let deadline = Deadline {
                at,
                position,
                block,
                worker,
            };
            self.timers.insert((worker, block), deadline);
            self.heap.push(Reverse(deadline));
        }
        if self.heap.len() > self.timers.len().max(1) * HEAP_REBUILD_FACTOR {
            self.rebuild_heap();
        }
        let blocks = sequence
            .iter()
            .zip(locals)
            .map(|(&block_hash, &tokens_hash)| KvCacheStoredBlockData {
                block_hash,
                tokens_hash,
            })
            .collect();
        self.event(
            worker,
            KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: None,
                blocks,
            }),
        )
    }

    /// Removes every entry whose expiry is at or before `now`, then prunes by size ([`Self::prune`]).
    /// Returns the removed events to apply to the index, one per worker, workers ascending.
    pub fn expire(&mut self, now: Instant) -> Vec<RouterEvent> {
        let mut removed: BTreeMap<WorkerId, Vec<SequenceHash>> = BTreeMap::new();
        while let Some(Reverse(next)) = self.heap.peek() {
            if next.at > now {
                break;
            }
            let next = *next;
            self.heap.pop();
            self.take_if_live(next, &mut removed);
        }
        self.prune_into(&mut removed);
        self.removal_events(removed)
    }

    /// If more than `max_tree_size` entries are tracked, removes the earliest-expiring ones (order: see
    /// the module docs) until `max_tree_size × prune_target_ratio` are left. Returns the removed events,
    /// one per worker, workers ascending; empty when within bounds. [`Self::expire`] runs it too.
    pub fn prune(&mut self) -> Vec<RouterEvent> {
        let mut removed = BTreeMap::new();
        self.prune_into(&mut removed);
        self.removal_events(removed)
    }

    /// Forgets a worker that left (its blocks are dropped from the index by `remove_worker` there); no
    /// events are produced for it afterwards.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.timers.retain(|&(w, _), _| w != worker);
        if self.heap.len() > self.timers.len().max(1) * HEAP_REBUILD_FACTOR {
            self.rebuild_heap();
        }
    }

    /// The earliest pending expiry, for scheduling the next [`Self::expire`]; it may be a refreshed
    /// entry's old deadline (an early wake-up, never a late one).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(deadline)| deadline.at)
    }

    /// Tracked (worker, block) entries.
    pub fn len(&self) -> usize {
        self.timers.len()
    }

    /// Whether nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.timers.is_empty()
    }

    fn prune_into(&mut self, removed: &mut BTreeMap<WorkerId, Vec<SequenceHash>>) {
        let max = self.config.max_tree_size;
        if self.timers.len() <= max {
            return;
        }
        let target = (max as f64 * self.config.prune_target_ratio) as usize;
        let excess = self.timers.len().saturating_sub(target);
        tracing::debug!(
            tracked = self.timers.len(),
            max,
            excess,
            "approximate KV index over its size bound; pruning"
        );
        let mut pruned = 0;
        while pruned < excess {
            let Some(Reverse(next)) = self.heap.pop() else {
                break;
            };
            if self.take_if_live(next, removed) {
                pruned += 1;
            }
        }
    }

    /// Drops the timer behind a popped heap entry unless the entry is stale; true if it was live.
    fn take_if_live(
        &mut self,
        deadline: Deadline,
        removed: &mut BTreeMap<WorkerId, Vec<SequenceHash>>,
    ) -> bool {
        let key = (deadline.worker, deadline.block);
        if self.timers.get(&key) != Some(&deadline) {
            return false;
        }
        self.timers.remove(&key);
        removed
            .entry(deadline.worker)
            .or_default()
            .push(deadline.block);
        true
    }

    fn rebuild_heap(&mut self) {
        self.heap = self.timers.values().copied().map(Reverse).collect();
    }

    fn removal_events(
        &mut self,
        removed: BTreeMap<WorkerId, Vec<SequenceHash>>,
    ) -> Vec<RouterEvent> {
        removed
            .into_iter()
            .map(|(worker, block_hashes)| {
                self.event(
                    worker,
                    KvCacheEventData::Removed(KvCacheRemoveData { block_hashes }),
                )
            })
            .collect()
    }

    fn event(&mut self, worker: WorkerId, data: KvCacheEventData) -> RouterEvent {
        let event_id = self.next_event_id;
        self.next_event_id += 1;
        RouterEvent {
            worker_id: worker,
            event: KvCacheEvent {
                event_id,
                data,
                dp_rank: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::indexer::KvIndex;

    fn config(ttl_secs: u64, max_tree_size: usize, prune_target_ratio: f64) -> PruneConfig {
        PruneConfig {
            ttl: Duration::from_secs(ttl_secs),
            max_tree_size,
            prune_target_ratio,
        }
    }

    fn removed_blocks(events: &[RouterEvent]) -> Vec<(WorkerId, Vec<SequenceHash>)> {
        events
            .iter()
            .map(|e| match &e.event.data {
                KvCacheEventData::Removed(data) => (e.worker_id, data.block_hashes.clone()),
                other => panic!("not a removal: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = PruneConfig::default();
        assert_eq!(config.ttl, Duration::from_secs(120));
        assert_eq!(config.max_tree_size, 1_048_576);
        assert_eq!(config.prune_target_ratio, 0.8);
    }

    #[test]
    fn record_emits_the_chain_from_the_root() {
        let mut recorder = ApproxRecorder::new(PruneConfig::default());
        let locals = [11, 22, 33];
        let event = recorder.record(4, &locals, Instant::now());
        assert_eq!(event.worker_id, 4);
        let KvCacheEventData::Stored(data) = &event.event.data else {
            panic!("not stored");
        };
        assert_eq!(data.parent_hash, None);
        let sequence = sequence_hashes(&locals);
        let blocks: Vec<(u64, u64)> = data
            .blocks
            .iter()
            .map(|b| (b.block_hash, b.tokens_hash))
            .collect();
        assert_eq!(
            blocks,
            [(sequence[0], 11), (sequence[1], 22), (sequence[2], 33)]
        );
        assert_eq!(recorder.len(), 3);
        let next = recorder.record(4, &[], Instant::now());
        assert!(next.event.event_id > event.event.event_id);
    }

    #[test]
    fn entries_expire_after_the_ttl_and_a_refresh_extends_them() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut recorder = ApproxRecorder::new(config(120, usize::MAX, 0.8));
        let mut index = KvIndex::new();
        let long = [1, 2, 3];
        index.apply(&recorder.record(7, &long, at(0))).unwrap();
        index
            .apply(&recorder.record(8, &long[..1], at(10)))
            .unwrap();
        // Worker 7's first two blocks are refreshed at 60 by a shorter prompt.
        index
            .apply(&recorder.record(7, &long[..2], at(60)))
            .unwrap();
        assert_eq!(index.find_matches(&long, false).score(7), 3);
        assert_eq!(recorder.next_expiry(), Some(at(120)));

        assert!(recorder.expire(at(119)).is_empty());
        let sequence = sequence_hashes(&long);
        let expired = recorder.expire(at(120));
        // Only block 3 was not refreshed; the stale heap entries of blocks 1 and 2 are ignored.
        assert_eq!(removed_blocks(&expired), [(7, vec![sequence[2]])]);
        for event in &expired {
            index.apply(event).unwrap();
        }
        assert_eq!(index.find_matches(&long, false).score(7), 2);

        let expired = recorder.expire(at(130));
        assert_eq!(removed_blocks(&expired), [(8, vec![sequence[0]])]);
        let expired = recorder.expire(at(1000));
        assert_eq!(
            removed_blocks(&expired),
            [(7, vec![sequence[0], sequence[1]])]
        );
        for event in &expired {
            index.apply(event).unwrap();
        }
        assert!(recorder.is_empty());
        assert_eq!(recorder.next_expiry(), None);
        assert_eq!(index.find_matches(&long, false).score(7), 0);
        assert!(recorder.expire(at(2000)).is_empty());
    }

    #[test]
    fn several_workers_expire_in_one_call_one_event_each() {
        let now = Instant::now();
        let mut recorder = ApproxRecorder::new(config(1, usize::MAX, 0.8));
        for worker in [9, 3, 5] {
            recorder.record(worker, &[1, 2], now);
        }
        let expired = recorder.expire(now + Duration::from_secs(1));
        let workers: Vec<WorkerId> = expired.iter().map(|e| e.worker_id).collect();
        assert_eq!(workers, [3, 5, 9]);
        assert!(removed_blocks(&expired).iter().all(|(_, b)| b.len() == 2));
    }

    #[test]
    fn pruning_removes_the_earliest_expiring_down_to_the_target() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        // Max 5 entries, prune down to 2.
        let mut recorder = ApproxRecorder::new(config(60, 5, 0.4));
        for i in 0..5u64 {
            recorder.record(42, &[100 + i], at(i));
        }
        assert!(recorder.prune().is_empty(), "at the bound, not over it");
        recorder.record(42, &[105], at(5));
        // Refresh the oldest: it moves to the back.
        recorder.record(42, &[100], at(6));
        let pruned = removed_blocks(&recorder.prune());
        let expected: Vec<u64> = [101, 102, 103, 104]
            .iter()
            .map(|&l| sequence_hashes(&[l])[0])
            .collect();
        assert_eq!(pruned, [(42, expected)]);
        assert_eq!(recorder.len(), 2);
        assert!(recorder.prune().is_empty());
    }

    #[test]
    fn pruning_ties_take_shallow_blocks_first_then_key_then_worker() {
        let now = Instant::now();
        let mut recorder = ApproxRecorder::new(config(60, 6, 0.5));
        // Two workers, the same three-block chain at the same instant: 6 entries, all equal expiry.
        recorder.record(2, &[7, 8, 9], now);
        recorder.record(1, &[7, 8, 9], now);
        assert!(recorder.prune().is_empty());
        recorder.record(3, &[5], now);
        // 7 entries > 6: prune down to 3, so 4 go: position 0 entries first (block hash order, then
        // worker), then position 1 ones.
        let sequence = sequence_hashes(&[7, 8, 9]);
        let first = sequence_hashes(&[5])[0];
        let mut order: Vec<(usize, u64, WorkerId)> = vec![
            (0, sequence[0], 1),
            (0, sequence[0], 2),
            (0, first, 3),
            (1, sequence[1], 1),
            (1, sequence[1], 2),
        ];
        order.sort_unstable();
        let pruned = removed_blocks(&recorder.prune());
        let mut expected: BTreeMap<WorkerId, Vec<u64>> = BTreeMap::new();
        for &(_, block, worker) in &order[..4] {
            expected.entry(worker).or_default().push(block);
        }
        assert_eq!(pruned, expected.into_iter().collect::<Vec<_>>());
        // The deepest blocks are the last to go.
        let mut left: Vec<(WorkerId, u64)> = recorder.timers.keys().copied().collect();
        left.sort_unstable();
        let mut expected_left = vec![(1, sequence[2]), (2, sequence[1]), (2, sequence[2])];
        expected_left.sort_unstable();
        assert_eq!(left, expected_left);
    }

    #[test]
    fn expire_also_prunes_by_size() {
        let now = Instant::now();
        let mut recorder = ApproxRecorder::new(config(60, 2, 0.5));
        recorder.record(1, &[1, 2, 3], now);
        let removed = removed_blocks(&recorder.expire(now));
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].1.len(), 2);
        assert_eq!(recorder.len(), 1);
    }

    #[test]
    fn refreshes_leave_stale_entries_that_are_compacted() {
        let start = Instant::now();
        let mut recorder = ApproxRecorder::new(config(100, usize::MAX, 0.8));
        for step in 0..1000u64 {
            recorder.record(1, &[1, 2, 3, 4], start + Duration::from_millis(step));
        }
        assert_eq!(recorder.len(), 4);
        assert!(recorder.heap.len() <= 4 * HEAP_REBUILD_FACTOR + 4);
        // Nothing expires before the last refresh's deadline.
        assert!(recorder
            .expire(start + Duration::from_millis(100_998))
            .is_empty());
        let expired = recorder.expire(start + Duration::from_millis(100_999));
        assert_eq!(removed_blocks(&expired)[0].1.len(), 4);
        assert!(recorder.is_empty());
    }

    #[test]
    fn a_removed_worker_produces_no_more_events() {
        let now = Instant::now();
        let mut recorder = ApproxRecorder::new(config(1, usize::MAX, 0.8));
        recorder.record(1, &[1, 2], now);
        recorder.record(2, &[1, 2], now);
        recorder.remove_worker(1);
        assert_eq!(recorder.len(), 2);
        let expired = recorder.expire(now + Duration::from_secs(5));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].worker_id, 2);
    }

    #[test]
    fn odd_configurations_do_not_panic() {
        let now = Instant::now();
        let mut recorder = ApproxRecorder::new(PruneConfig {
            ttl: Duration::MAX,
            max_tree_size: 0,
            prune_target_ratio: f64::NAN,
        });
        recorder.record(1, &[1, 2], now);
        assert_eq!(removed_blocks(&recorder.prune())[0].1.len(), 2);
        let mut recorder = ApproxRecorder::new(config(0, usize::MAX, 7.0));
        recorder.record(1, &[1], now);
        assert_eq!(recorder.expire(now).len(), 1);
    }

    #[test]
    fn pruned_and_expired_events_keep_the_index_consistent() {
        let start = Instant::now();
        let mut recorder = ApproxRecorder::new(config(30, 64, 0.5));
        let mut index = KvIndex::new();
        for step in 0..500u64 {
            let now = start + Duration::from_secs(step);
            let worker = step % 4;
            let prompt: Vec<u64> = (0..1 + step % 9).map(|b| (step % 7) * 100 + b).collect();
            index.apply(&recorder.record(worker, &prompt, now)).unwrap();
            for event in recorder.expire(now) {
                index.apply(&event).unwrap();
            }
            assert!(recorder.len() <= 64);
            let tracked: usize = (0..4).map(|w| index.worker_block_count(w)).sum();
            assert_eq!(tracked, recorder.len());
        }
    }
}
