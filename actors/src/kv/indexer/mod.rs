//! The global prefix index (runtime spec §3.3): which engine holds which KV blocks, fed by KV events.
//!
//! [`KvIndex`] is Dynamo's classic radix tree with the same observable behaviour: children are keyed by
//! `tokens_hash` under their parent, every engine has a table `engine block hash → node`, a stored event
//! whose parent is unknown is dropped whole, and a node that loses its last engine drops its children, so
//! its subtree becomes unreachable for everyone. A worker's score for a query is the number of matched
//! nodes (walking from the root, stopping at the first miss) that hold it; for the prefix-closed caches
//! engines keep, that is the length of its longest cached prefix.
//!
//! Representation: Dynamo shares nodes through `Rc<RefCell<..>>`; here nodes live in an arena
//! (`Vec` + free list, `u32` ids) and carry an explicit reference count (child edges + table entries), so
//! a node is freed exactly when Dynamo's `Rc` would drop. That is what makes a re-stored block pick its
//! old node (and that node's subtree) back up from the engine's table, while a re-stored *parent* does not
//! bring back children it dropped. Engines are mapped to small slots and a node's engines are a 64-bit
//! set (plus a sorted overflow list past slot 63), so the match walk compares one word per node.
//!
//! Deviations, all only reachable with engines that send inconsistent block hashes: a stored event that
//! names a block twice (or its own parent) is refused whole, where Dynamo applies part of it and may
//! build a cycle; a block hash is never reattached at another depth (another way to build a cycle); and
//! an engine whose table entry is overwritten leaves the old node, where Dynamo leaves a phantom member
//! behind. Removing a block the engine does not hold is skipped (logged at debug) rather than reported.
//!
//! [`SharedKvIndex`] puts one index behind an `RwLock`: the router's event loop is the one writer, the
//! request path reads it directly, without a mailbox hop.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

mod arena;

pub(crate) use arena::KeyMap;
use arena::*;

use super::hashing::LocalBlockHash;
use super::protocol::{EngineBlockHash, KvCacheEventData, KvCacheStoreData, RouterEvent, WorkerId};

/// Per-worker overlap with one request: worker → the number of matched blocks it holds (§3.3).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlapScores {
    /// Matched blocks per worker; workers with no matched block are absent.
    pub scores: HashMap<WorkerId, u32>,
}

impl OverlapScores {
    /// The score of `worker`, 0 when it matched nothing.
    pub fn score(&self, worker: WorkerId) -> u32 {
        self.scores.get(&worker).copied().unwrap_or(0)
    }
}

/// Why an event was not applied. The index is unchanged when one is returned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    /// A stored event names a parent block the worker never stored (or already removed); Dynamo drops
    /// the whole event, and so do we.
    #[error("worker {worker}: stored event's parent block {parent} is unknown; event dropped")]
    UnknownParent {
        /// The worker that sent the event.
        worker: WorkerId,
        /// The engine hash of the missing parent.
        parent: EngineBlockHash,
    },
    /// A stored event names the same engine block twice (or names its parent among its blocks), which
    /// would make a block its own ancestor.
    #[error("worker {worker}: stored event repeats block {block}; event dropped")]
    RepeatedBlock {
        /// The worker that sent the event.
        worker: WorkerId,
        /// The engine hash that appears twice.
        block: EngineBlockHash,
    },
    /// The index holds as many nodes as a `u32` id can name.
    #[error("the KV index is full ({nodes} nodes); stored event dropped")]
    Full {
        /// Nodes in the index.
        nodes: usize,
    },
}

/// One worker's view: its slot in the node worker sets and its engine hash → node table.
#[derive(Debug)]
struct WorkerBlocks {
    slot: u32,
    blocks: KeyMap<EngineBlockHash, NodeId>,
}

/// The prefix index itself, single-threaded; see the module documentation for its semantics.
///
/// Data-parallel ranks are folded into their worker: an event's `dp_rank` is not part of the key.
pub struct KvIndex {
    arena: Arena,
    lookup: KeyMap<WorkerId, WorkerBlocks>,
    /// The worker in each slot (meaningful for slots in use).
    slot_workers: Vec<WorkerId>,
    /// Slots given back by removed workers, lowest reused first so the 64-bit sets stay enough.
    free_slots: BTreeSet<u32>,
}

impl fmt::Debug for KvIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvIndex")
            .field("blocks", &self.block_count())
            .field("workers", &self.lookup.len())
            .finish()
    }
}

impl Default for KvIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl KvIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            arena: Arena::new(),
            lookup: KeyMap::default(),
            slot_workers: Vec::new(),
            free_slots: BTreeSet::new(),
        }
    }

    /// Applies one KV event. A stored event is applied whole or not at all (the error says why not; it
    /// is not logged here); a removed event skips the blocks the worker does not hold; a cleared event
    /// drops every block of the worker, which stays listed in [`KvIndex::workers`].
    pub fn apply(&mut self, event: &RouterEvent) -> Result<(), IndexError> {
        let worker = event.worker_id;
        match &event.event.data {
            KvCacheEventData::Stored(data) => self.store(worker, data),
            KvCacheEventData::Removed(data) => {
                self.remove_blocks(worker, &data.block_hashes);
                Ok(())
            }
            KvCacheEventData::Cleared => {
                self.clear_worker(worker, true);
                Ok(())
            }
        }
    }

    /// Forgets a worker entirely (it left discovery): its blocks and its place in [`KvIndex::workers`].
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.clear_worker(worker, false);
    }

    /// Walks `locals` from the root and scores every worker on each matched node (+1 per node); stops at
    /// the first block with no node. With `early_exit`, also stops after a node held by exactly one
    /// worker (only that worker could still gain, so the best overlap is already known).
    pub fn find_matches(&self, locals: &[LocalBlockHash], early_exit: bool) -> OverlapScores {
        let mut tally = Tally::default();
        let mut current = ROOT;
        // Runs of nodes with the same workers are counted once, at the end of the run: (a node of the
        // run, its length).
        let mut run: Option<(NodeId, u32)> = None;
        for &local in locals {
            let Some(child) = self.arena.child(current, local) else {
                break;
            };
            match &mut run {
                Some((first, length)) if self.arena.same_workers(*first, child) => *length += 1,
                _ => {
                    if let Some((first, length)) = run {
                        tally.add(&self.arena, first, length);
                    }
                    run = Some((child, 1));
                }
            }
            if early_exit && self.arena.worker_count(child) == 1 {
                break;
            }
            current = child;
        }
        if let Some((first, length)) = run {
            tally.add(&self.arena, first, length);
        }
        tally.into_scores(&self.slot_workers)
    }

    /// Nodes in the index (distinct blocks by position), including detached ones a worker's table still
    /// names and empty leaves kept for reuse (Dynamo keeps both too).
    pub fn block_count(&self) -> usize {
        self.arena.live()
    }

    /// Engine block hashes stored over all workers (a block two workers hold counts twice).
    pub fn stored_block_count(&self) -> usize {
        self.lookup.values().map(|w| w.blocks.len()).sum()
    }

    /// Heap bytes the index holds, counted from its containers' capacities: the arena (nodes, child
    /// sets, high-slot lists) and the per-worker tables. For reports (the bench's bytes per cached
    /// block); the allocator's own overhead is not included.
    pub fn heap_bytes(&self) -> usize {
        let tables: usize = self
            .lookup
            .values()
            .map(|w| arena::map_bytes(&w.blocks))
            .sum();
        self.arena.heap_bytes()
            + arena::map_bytes(&self.lookup)
            + tables
            + self.slot_workers.capacity() * std::mem::size_of::<WorkerId>()
    }

    /// How many engine block hashes `worker` has stored and not removed.
    pub fn worker_block_count(&self, worker: WorkerId) -> usize {
        self.lookup.get(&worker).map_or(0, |w| w.blocks.len())
    }

    /// Every worker that has stored blocks (even if it has since removed or cleared them) and was not
    /// removed with [`KvIndex::remove_worker`], ascending.
    pub fn workers(&self) -> Vec<WorkerId> {
        let mut workers: Vec<WorkerId> = self.lookup.keys().copied().collect();
        workers.sort_unstable();
        workers
    }

    fn store(&mut self, worker: WorkerId, data: &KvCacheStoreData) -> Result<(), IndexError> {
        // Errors are returned, not logged: the caller reports them once.
        if let Some(block) = repeated_block(data) {
            return Err(IndexError::RepeatedBlock { worker, block });
        }
        let parent = match data.parent_hash {
            None => ROOT,
            Some(parent) => match self.lookup.get(&worker).and_then(|w| w.blocks.get(&parent)) {
                Some(&node) => node,
                None => return Err(IndexError::UnknownParent { worker, parent }),
            },
        };
        if self.arena.room() < data.blocks.len() {
            return Err(IndexError::Full {
                nodes: self.arena.live(),
            });
        }
        let slot = self.worker_slot(worker);
        let Self { arena, lookup, .. } = self;
        let Some(table) = lookup.get_mut(&worker) else {
            return Ok(()); // worker_slot just inserted it
        };
        // Every node on the path holds a table entry made by this event (block hashes are distinct, and
        // distinct from the parent's), so releasing an overwritten entry below cannot free the path.
        let mut current = parent;
        for block in &data.blocks {
            let depth = arena.node(current).depth.saturating_add(1);
            let child = match arena.child(current, block.tokens_hash) {
                Some(child) => child,
                None => {
                    // Reattach the worker's own node for this block if it has one at this depth: the
                    // block and the subtree under it come back (Dynamo's lookup reuse).
                    let reused = table
                        .blocks
                        .get(&block.block_hash)
                        .copied()
                        .filter(|&node| arena.node(node).depth == depth);
                    let child = reused.unwrap_or_else(|| arena.alloc(depth));
                    arena.add_child(current, block.tokens_hash, child);
                    child
                }
            };
            arena.join(child, slot);
            match table.blocks.insert(block.block_hash, child) {
                Some(old) if old == child => {}
                Some(old) => {
                    arena.node_mut(child).refs += 1;
                    arena.leave(old, slot);
                    arena.release(old);
                }
                None => arena.node_mut(child).refs += 1,
            }
            current = child;
        }
        Ok(())
    }

    fn remove_blocks(&mut self, worker: WorkerId, hashes: &[EngineBlockHash]) {
        let Self { arena, lookup, .. } = self;
        let Some(table) = lookup.get_mut(&worker) else {
            tracing::debug!(
                worker,
                blocks = hashes.len(),
                "removed event from an unknown worker; skipped"
            );
            return;
        };
        for hash in hashes {
            match table.blocks.remove(hash) {
                Some(node) => {
                    arena.leave(node, table.slot);
                    arena.release(node);
                }
                None => tracing::debug!(worker, block = hash, "removed block unknown; skipped"),
            }
        }
    }

    fn clear_worker(&mut self, worker: WorkerId, keep_listed: bool) {
        let Some(table) = self.lookup.remove(&worker) else {
            return;
        };
        for (_, node) in table.blocks {
            self.arena.leave(node, table.slot);
            self.arena.release(node);
        }
        if keep_listed {
            self.lookup.insert(
                worker,
                WorkerBlocks {
                    slot: table.slot,
                    blocks: KeyMap::default(),
                },
            );
        } else {
            // No node names the slot any more (membership implies a table entry), so it can be reused.
            self.free_slots.insert(table.slot);
        }
    }

    /// The worker's slot, registering the worker on first sight.
    fn worker_slot(&mut self, worker: WorkerId) -> u32 {
        if let Some(entry) = self.lookup.get(&worker) {
            return entry.slot;
        }
        let slot = match self.free_slots.pop_first() {
            Some(slot) => {
                self.slot_workers[slot as usize] = worker;
                slot
            }
            None => {
                self.slot_workers.push(worker);
                (self.slot_workers.len() - 1) as u32
            }
        };
        self.lookup.insert(
            worker,
            WorkerBlocks {
                slot,
                blocks: KeyMap::default(),
            },
        );
        slot
    }
}

/// The first engine hash a stored event names twice (its parent counts).
fn repeated_block(data: &KvCacheStoreData) -> Option<EngineBlockHash> {
    let blocks = &data.blocks;
    if blocks.len() <= 16 {
        for (i, block) in blocks.iter().enumerate() {
            if data.parent_hash == Some(block.block_hash)
                || blocks[..i].iter().any(|b| b.block_hash == block.block_hash)
            {
                return Some(block.block_hash);
            }
        }
        return None;
    }
    let mut seen: KeyMap<EngineBlockHash, ()> = KeyMap::default();
    seen.reserve(blocks.len() + 1);
    if let Some(parent) = data.parent_hash {
        seen.insert(parent, ());
    }
    blocks
        .iter()
        .find(|b| seen.insert(b.block_hash, ()).is_some())
        .map(|b| b.block_hash)
}

/// Per-slot match counts during one walk.
struct Tally {
    low: [u32; 64],
    seen_low: u64,
    high: Vec<(u32, u32)>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            low: [0; 64],
            seen_low: 0,
            high: Vec::new(),
        }
    }
}

impl Tally {
    /// Counts `count` matched nodes for every worker holding `node`.
    fn add(&mut self, arena: &Arena, node: NodeId, count: u32) {
        let low = arena.node(node).low;
        self.seen_low |= low;
        let mut bits = low;
        while bits != 0 {
            self.low[bits.trailing_zeros() as usize] += count;
            bits &= bits - 1;
        }
        for &slot in arena.high(node) {
            match self.high.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, total)) => *total += count,
                None => self.high.push((slot, count)),
            }
        }
    }

    fn into_scores(self, slot_workers: &[WorkerId]) -> OverlapScores {
        let mut scores =
            HashMap::with_capacity(self.seen_low.count_ones() as usize + self.high.len());
        let mut bits = self.seen_low;
        while bits != 0 {
            let slot = bits.trailing_zeros() as usize;
            if let Some(&worker) = slot_workers.get(slot) {
                scores.insert(worker, self.low[slot]);
            }
            bits &= bits - 1;
        }
        for (slot, total) in self.high {
            if let Some(&worker) = slot_workers.get(slot as usize) {
                scores.insert(worker, total);
            }
        }
        OverlapScores { scores }
    }
}

/// A [`KvIndex`] shared between its one writer (the router's KV event loop) and the request path, which
/// reads it in place instead of asking an actor.
///
/// An `RwLock` because writes are short (one event, well under a microsecond) and reads are short (one
/// walk): readers proceed in parallel and wait at most one event. A poisoned lock is recovered: the index
/// never panics half-way through an update.
#[derive(Clone, Default)]
pub struct SharedKvIndex {
    /// The index; the writer takes the write lock per event, readers the read lock per query.
    inner: Arc<RwLock<KvIndex>>,
}

impl fmt::Debug for SharedKvIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedKvIndex").field(&*self.read()).finish()
    }
}

impl SharedKvIndex {
    /// An empty shared index.
    pub fn new() -> Self {
        Self::default()
    }

    /// [`KvIndex::apply`] under the write lock.
    pub fn apply(&self, event: &RouterEvent) -> Result<(), IndexError> {
        self.write().apply(event)
    }

    /// [`KvIndex::remove_worker`] under the write lock.
    pub fn remove_worker(&self, worker: WorkerId) {
        self.write().remove_worker(worker);
    }

    /// Forgets every block (a restarted writer starts over; the engines send theirs again).
    pub fn clear(&self) {
        *self.write() = KvIndex::new();
    }

    /// [`KvIndex::find_matches`] under the read lock.
    pub fn find_matches(&self, locals: &[LocalBlockHash], early_exit: bool) -> OverlapScores {
        self.read().find_matches(locals, early_exit)
    }

    /// [`KvIndex::block_count`] under the read lock.
    pub fn block_count(&self) -> usize {
        self.read().block_count()
    }

    /// [`KvIndex::worker_block_count`] under the read lock.
    pub fn worker_block_count(&self, worker: WorkerId) -> usize {
        self.read().worker_block_count(worker)
    }

    /// [`KvIndex::workers`] under the read lock.
    pub fn workers(&self) -> Vec<WorkerId> {
        self.read().workers()
    }

    fn read(&self) -> RwLockReadGuard<'_, KvIndex> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, KvIndex> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests;
