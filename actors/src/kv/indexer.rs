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
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

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

/// Hasher for keys that already are hashes (block hashes, worker ids): one folded 64×64→128 multiply
/// per word instead of SipHash. Seeded per process, because local block hashes derive from user prompts
/// with a public seed and a fixed hasher would let a client aim requests at one bucket.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHasher {
    state: u64,
}

impl KeyHasher {
    const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

    #[inline]
    fn mix(&mut self, word: u64) {
        let product = u128::from(self.state ^ word) * u128::from(Self::MULTIPLIER);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for KeyHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.state
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by the u64 keys here; correct for any key all the same.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }

    #[inline]
    fn write_u32(&mut self, value: u32) {
        self.mix(u64::from(value));
    }

    #[inline]
    fn write_usize(&mut self, value: usize) {
        self.mix(value as u64);
    }
}

/// Builds [`KeyHasher`]s seeded with one random value per process.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHasherBuilder {
    seed: u64,
}

impl Default for KeyHasherBuilder {
    fn default() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        Self {
            seed: *SEED.get_or_init(rand::random),
        }
    }
}

impl BuildHasher for KeyHasherBuilder {
    type Hasher = KeyHasher;

    #[inline]
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher { state: self.seed }
    }
}

/// A `HashMap` for keys that already are hashes.
pub(crate) type KeyMap<K, V> = HashMap<K, V, KeyHasherBuilder>;

/// Index of a node in the arena.
type NodeId = u32;

/// The root: no workers, never freed, never in a worker's table.
const ROOT: NodeId = 0;

/// Children kept in a list up to this many; a map beyond.
const FEW_CHILDREN: usize = 8;

/// `Node::flags`: how the children are held (two bits) ...
const CHILDREN_MASK: u32 = 0b11;
const CHILDREN_NONE: u32 = 0;
/// ... one child, inline in `key` and `child` ...
const CHILDREN_ONE: u32 = 1;
/// ... or several, in `Arena::child_sets[child]`;
const CHILDREN_SET: u32 = 2;
/// and whether workers in slots 64 and up hold the node (listed in `Arena::high_workers`).
const HIGH_WORKERS: u32 = 4;

/// One block of the tree: 32 bytes, aligned so a node never straddles a cache line, because the match
/// walk touches one node per block and is bound by those loads. What does not fit (several children,
/// workers past slot 63) lives beside the arena.
#[derive(Clone, Copy, Debug, Default)]
#[repr(align(32))]
struct Node {
    /// Worker slots below 64, a bit each.
    low: u64,
    /// The only child's `tokens_hash` (`CHILDREN_ONE`).
    key: u64,
    /// The only child (`CHILDREN_ONE`), or the node's entry in `Arena::child_sets` (`CHILDREN_SET`).
    child: u32,
    /// Child edges plus worker-table entries pointing here; the node is freed at zero, exactly where
    /// Dynamo's `Rc` would be dropped.
    refs: u32,
    /// Distance from the root; every edge goes one level down, which rules out cycles.
    depth: u32,
    /// `CHILDREN_*` and `HIGH_WORKERS`.
    flags: u32,
}

const _: () = assert!(std::mem::size_of::<Node>() == 32);

/// The children of a node that has more than one, by `tokens_hash`.
#[derive(Debug)]
enum ChildSet {
    Few(Vec<(LocalBlockHash, NodeId)>),
    Many(KeyMap<LocalBlockHash, NodeId>),
}

/// The nodes and their recycling.
#[derive(Debug)]
struct Arena {
    nodes: Vec<Node>,
    free: Vec<NodeId>,
    child_sets: Vec<ChildSet>,
    free_child_sets: Vec<u32>,
    /// Worker slots ≥ 64 per node, sorted and never empty (rare: slots are reused lowest first, so it
    /// takes more than 64 live workers).
    high_workers: KeyMap<NodeId, Vec<u32>>,
    /// Reused work list for releasing nodes, so that removals do not allocate.
    pending: Vec<NodeId>,
}

impl Arena {
    fn new() -> Self {
        Self {
            nodes: vec![Node::default()],
            free: Vec::new(),
            child_sets: Vec::new(),
            free_child_sets: Vec::new(),
            high_workers: KeyMap::default(),
            pending: Vec::new(),
        }
    }

    fn live(&self) -> usize {
        self.nodes.len() - 1 - self.free.len()
    }

    /// How many more nodes can be allocated.
    fn room(&self) -> usize {
        (NodeId::MAX as usize).saturating_sub(self.nodes.len()) + self.free.len()
    }

    #[inline]
    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    #[inline]
    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// A fresh node with no references; the caller checked [`Arena::room`].
    fn alloc(&mut self, depth: u32) -> NodeId {
        let node = Node {
            depth,
            ..Node::default()
        };
        match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as NodeId
            }
        }
    }

    #[inline(always)]
    fn child(&self, id: NodeId, key: LocalBlockHash) -> Option<NodeId> {
        let node = self.node(id);
        match node.flags & CHILDREN_MASK {
            CHILDREN_ONE => (node.key == key).then_some(node.child),
            CHILDREN_SET => self.child_in_set(node.child, key),
            _ => None,
        }
    }

    /// The rarer case, kept out of line so the walk's loop stays small.
    #[inline(never)]
    fn child_in_set(&self, set: u32, key: LocalBlockHash) -> Option<NodeId> {
        match self.child_sets.get(set as usize)? {
            ChildSet::Few(list) => list.iter().find(|(k, _)| *k == key).map(|&(_, c)| c),
            ChildSet::Many(map) => map.get(&key).copied(),
        }
    }

    /// Adds an edge the caller has checked is absent, and counts it as a reference to `child`.
    fn add_child(&mut self, id: NodeId, key: LocalBlockHash, child: NodeId) {
        self.node_mut(child).refs += 1;
        let node = *self.node(id);
        match node.flags & CHILDREN_MASK {
            CHILDREN_NONE => {
                let node = self.node_mut(id);
                node.key = key;
                node.child = child;
                node.flags = (node.flags & !CHILDREN_MASK) | CHILDREN_ONE;
            }
            CHILDREN_ONE => {
                let set = ChildSet::Few(vec![(node.key, node.child), (key, child)]);
                let index = match self.free_child_sets.pop() {
                    Some(index) => {
                        self.child_sets[index as usize] = set;
                        index
                    }
                    None => {
                        self.child_sets.push(set);
                        (self.child_sets.len() - 1) as u32
                    }
                };
                let node = self.node_mut(id);
                node.key = 0;
                node.child = index;
                node.flags = (node.flags & !CHILDREN_MASK) | CHILDREN_SET;
            }
            _ => {
                let set = &mut self.child_sets[node.child as usize];
                match set {
                    ChildSet::Few(list) if list.len() < FEW_CHILDREN => list.push((key, child)),
                    ChildSet::Few(list) => {
                        let mut map: KeyMap<LocalBlockHash, NodeId> = list.drain(..).collect();
                        map.insert(key, child);
                        *set = ChildSet::Many(map);
                    }
                    ChildSet::Many(map) => {
                        map.insert(key, child);
                    }
                }
            }
        }
    }

    /// Removes every edge below `id`, appending the children they pointed to to `out`.
    fn take_children(&mut self, id: NodeId, out: &mut Vec<NodeId>) {
        let node = self.node_mut(id);
        let kind = node.flags & CHILDREN_MASK;
        node.flags &= !CHILDREN_MASK;
        node.key = 0;
        let child = std::mem::take(&mut node.child);
        match kind {
            CHILDREN_ONE => out.push(child),
            CHILDREN_SET => {
                let set = std::mem::replace(
                    &mut self.child_sets[child as usize],
                    ChildSet::Few(Vec::new()),
                );
                match set {
                    ChildSet::Few(list) => out.extend(list.iter().map(|&(_, c)| c)),
                    ChildSet::Many(map) => out.extend(map.values().copied()),
                }
                self.free_child_sets.push(child);
            }
            _ => {}
        }
    }

    /// Drops one reference to each node in `pending`, freeing (iteratively) those that reach zero,
    /// together with what only they kept alive.
    fn release_pending(&mut self, pending: &mut Vec<NodeId>) {
        while let Some(id) = pending.pop() {
            if id == ROOT {
                continue;
            }
            let node = self.node_mut(id);
            node.refs = node.refs.saturating_sub(1);
            if node.refs > 0 {
                continue;
            }
            self.take_children(id, pending);
            if self.node(id).flags & HIGH_WORKERS != 0 {
                self.high_workers.remove(&id);
            }
            *self.node_mut(id) = Node::default();
            self.free.push(id);
        }
    }

    /// Drops one reference to `id`.
    fn release(&mut self, id: NodeId) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.push(id);
        self.release_pending(&mut pending);
        self.pending = pending;
    }

    fn join(&mut self, id: NodeId, slot: u32) {
        if slot < 64 {
            self.node_mut(id).low |= 1 << slot;
            return;
        }
        let high = self.high_workers.entry(id).or_default();
        if let Err(at) = high.binary_search(&slot) {
            high.insert(at, slot);
        }
        self.node_mut(id).flags |= HIGH_WORKERS;
    }

    /// Takes `slot` off the node; a node left with no worker drops its children (Dynamo: "if no workers
    /// are using this block, that is true for all children").
    fn leave(&mut self, id: NodeId, slot: u32) {
        if id == ROOT {
            return;
        }
        if slot < 64 {
            self.node_mut(id).low &= !(1 << slot);
        } else if let Some(high) = self.high_workers.get_mut(&id) {
            if let Ok(at) = high.binary_search(&slot) {
                high.remove(at);
            }
            if high.is_empty() {
                self.high_workers.remove(&id);
                self.node_mut(id).flags &= !HIGH_WORKERS;
            }
        }
        let node = self.node(id);
        if node.low == 0 && node.flags & HIGH_WORKERS == 0 {
            let mut pending = std::mem::take(&mut self.pending);
            self.take_children(id, &mut pending);
            self.release_pending(&mut pending);
            self.pending = pending;
        }
    }

    /// The slots ≥ 64 holding the node.
    fn high(&self, id: NodeId) -> &[u32] {
        if self.node(id).flags & HIGH_WORKERS == 0 {
            return &[];
        }
        self.high_workers.get(&id).map_or(&[], Vec::as_slice)
    }

    fn worker_count(&self, id: NodeId) -> usize {
        self.node(id).low.count_ones() as usize + self.high(id).len()
    }

    /// Whether two nodes are held by the same workers.
    #[inline]
    fn same_workers(&self, a: NodeId, b: NodeId) -> bool {
        let (x, y) = (self.node(a), self.node(b));
        x.low == y.low && ((x.flags | y.flags) & HIGH_WORKERS == 0 || self.high(a) == self.high(b))
    }
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
mod tests {
    use super::*;
    use crate::kv::protocol::{KvCacheEvent, KvCacheRemoveData, KvCacheStoredBlockData};

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

    #[test]
    fn stored_chain_scores_its_prefix() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1, 2, 3])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 3)]);
        assert_eq!(scores(&index, &[1, 2, 3, 4, 5]), [(0, 3)]);
        assert_eq!(scores(&index, &[1, 2, 9, 3]), [(0, 2)]);
        assert_eq!(scores(&index, &[2, 3]), []);
        assert_eq!(scores(&index, &[]), []);
        assert_eq!(index.block_count(), 3);
        assert_eq!(index.worker_block_count(0), 3);
        // Continuing the chain from a stored parent.
        index.apply(&stored(0, Some(3), &[4, 5])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3, 4, 5, 6]), [(0, 5)]);
        assert_eq!(index.workers(), [0]);
    }

    #[test]
    fn two_workers_share_a_prefix_then_diverge() {
        // Dynamo's test_radix_tree, step by step.
        let mut index = KvIndex::new();
        index.apply(&stored(1, None, &[1, 2, 3])).unwrap();
        index.apply(&stored(2, None, &[1, 4, 5])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(1, 3), (2, 1)]);
        assert_eq!(scores(&index, &[1, 4, 5]), [(1, 1), (2, 3)]);
        assert_eq!(index.block_count(), 5);
        index.apply(&removed(2, &[5])).unwrap();
        index.apply(&removed(2, &[4])).unwrap();
        assert_eq!(index.worker_block_count(2), 1);
        assert_eq!(scores(&index, &[1, 4, 5]), [(1, 1), (2, 1)]);
        // Worker 2 now stores 2 under its 1: it joins worker 1's node.
        index.apply(&stored(2, Some(1), &[2, 6, 7])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(1, 3), (2, 2)]);
        assert_eq!(scores(&index, &[1, 2, 6, 7]), [(1, 2), (2, 4)]);
        assert_eq!(index.worker_block_count(2), 4);
        assert_eq!(index.workers(), [1, 2]);
    }

    #[test]
    fn unknown_parent_drops_the_whole_event() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1])).unwrap();
        let error = index.apply(&stored(0, Some(42), &[2, 3])).unwrap_err();
        assert_eq!(
            error,
            IndexError::UnknownParent {
                worker: 0,
                parent: engine_hash(42)
            }
        );
        assert_eq!(index.block_count(), 1);
        assert_eq!(index.worker_block_count(0), 1);
        // Another worker's blocks are no parent of ours.
        assert!(index.apply(&stored(1, Some(1), &[2])).is_err());
        assert_eq!(scores(&index, &[1, 2]), [(0, 1)]);
        assert_eq!(index.block_count(), 1);
    }

    #[test]
    fn repeated_blocks_drop_the_whole_event() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1])).unwrap();
        // Dynamo's self-referencing case: the parent among the blocks.
        let error = index.apply(&stored(0, Some(1), &[1, 2, 3])).unwrap_err();
        assert!(matches!(error, IndexError::RepeatedBlock { worker: 0, .. }));
        assert!(index.apply(&stored(0, None, &[5, 6, 5])).is_err());
        let long: Vec<u64> = (10..40).chain([12]).collect();
        assert!(index.apply(&stored(0, None, &long)).is_err());
        assert_eq!(index.block_count(), 1);
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 1)]);
    }

    #[test]
    fn removing_a_middle_block_cuts_the_worker_there() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1, 2, 3, 4])).unwrap();
        index.apply(&removed(0, &[2])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3, 4]), [(0, 1)]);
        assert_eq!(index.worker_block_count(0), 3);
    }

    #[test]
    fn a_score_counts_the_matched_nodes_the_worker_is_on() {
        // Dynamo scores +1 per matched node holding the worker; a worker that evicted a middle block
        // still shared with others keeps the blocks after it.
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1, 2, 3])).unwrap();
        index.apply(&stored(1, None, &[1, 2, 3])).unwrap();
        index.apply(&removed(1, &[2])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 3), (1, 2)]);
        assert_eq!(index.block_count(), 3);
    }

    #[test]
    fn an_emptied_node_drops_its_subtree_and_a_restored_parent_does_not_bring_it_back() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1, 2, 3])).unwrap();
        index.apply(&stored(1, None, &[1])).unwrap();
        index.apply(&stored(1, Some(1), &[2])).unwrap();
        // Worker 1 leaves 2 (worker 0 still holds it): nothing is cut.
        index.apply(&removed(1, &[2])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 3), (1, 1)]);
        // Worker 0 evicts 2: the node is empty, 3 is unreachable for everyone.
        index.apply(&removed(0, &[2])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 1), (1, 1)]);
        // Worker 1 stores 2 again: a fresh membership on the emptied node, without the old child.
        index.apply(&stored(1, Some(1), &[2])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 1), (1, 2)]);
        // Worker 0 still holds 3 (it never evicted it), but re-storing 2 does not bring it back ...
        assert_eq!(index.worker_block_count(0), 2);
        index.apply(&stored(0, Some(1), &[2])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 2), (1, 2)]);
        // ... re-storing 3 under 2 reattaches worker 0's own node for it, as in Dynamo.
        index.apply(&stored(0, Some(2), &[3])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 3), (1, 2)]);
    }

    #[test]
    fn a_restored_root_block_does_not_resurrect_children() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1, 2, 3])).unwrap();
        index.apply(&removed(0, &[1])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), []);
        index.apply(&stored(0, None, &[1])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 1)]);
        // The worker's table still names 2 and 3; storing 2 under 1 reattaches them.
        index.apply(&stored(0, Some(1), &[2])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 3)]);
        // A worker that evicts everything leaves only the empty first node, kept for reuse.
        index.apply(&removed(0, &[3, 2, 1])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), []);
        assert_eq!(index.block_count(), 1);
        assert_eq!(index.worker_block_count(0), 0);
    }

    #[test]
    fn cleared_and_remove_worker_purge_exactly_that_worker() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[0, 1, 3])).unwrap();
        index.apply(&stored(1, None, &[0, 2, 3])).unwrap();
        index.apply(&stored(2, None, &[0, 1, 3, 4])).unwrap();
        assert_eq!(scores(&index, &[0, 1, 3, 4]), [(0, 3), (1, 1), (2, 4)]);

        index.apply(&event(0, KvCacheEventData::Cleared)).unwrap();
        assert_eq!(scores(&index, &[0, 1, 3, 4]), [(1, 1), (2, 4)]);
        assert_eq!(scores(&index, &[0, 2, 3]), [(1, 3), (2, 1)]);
        assert_eq!(index.worker_block_count(0), 0);
        assert_eq!(index.workers(), [0, 1, 2], "a cleared worker stays listed");

        index.remove_worker(2);
        assert_eq!(scores(&index, &[0, 1, 3, 4]), [(1, 1)]);
        assert_eq!(scores(&index, &[0, 2, 3]), [(1, 3)]);
        assert_eq!(index.workers(), [0, 1]);
        // Left: worker 1's chain 0-2-3 and the emptied node for block 1 under 0 (kept for reuse).
        assert_eq!(index.block_count(), 4);

        // A cleared worker stores again from scratch.
        index.apply(&stored(0, None, &[0, 1])).unwrap();
        assert_eq!(scores(&index, &[0, 1, 3, 4]), [(0, 2), (1, 1)]);
        // Removing unknown workers is a no-op.
        index.remove_worker(99);
        index.apply(&event(99, KvCacheEventData::Cleared)).unwrap();
        index.apply(&removed(99, &[0])).unwrap();
        assert_eq!(index.workers(), [0, 1]);
    }

    #[test]
    fn removing_every_worker_frees_every_node_below_the_root_blocks() {
        let mut index = KvIndex::new();
        for worker in 0..4 {
            let chain: Vec<u64> = (0..50).map(|i| 1000 * (worker + 1) + i).collect();
            index.apply(&stored(worker, None, &[1])).unwrap();
            index.apply(&stored(worker, Some(1), &chain)).unwrap();
        }
        assert_eq!(index.block_count(), 201);
        for worker in 0..4 {
            index.remove_worker(worker);
        }
        // The emptied root block stays, as an Rc held by Dynamo's root would.
        assert_eq!(index.block_count(), 1);
        assert_eq!(index.arena.free.len(), 200);
        // Freed nodes are recycled.
        index.apply(&stored(7, None, &[1, 2, 3])).unwrap();
        assert_eq!(index.block_count(), 3);
        assert_eq!(index.arena.nodes.len(), 202);
    }

    #[test]
    fn early_exit_stops_after_a_node_held_by_one_worker() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1, 2, 3, 4])).unwrap();
        index.apply(&stored(1, None, &[1, 2])).unwrap();
        let full = index.find_matches(&[1, 2, 3, 4], false);
        assert_eq!((full.score(0), full.score(1)), (4, 2));
        let early = index.find_matches(&[1, 2, 3, 4], true);
        assert_eq!((early.score(0), early.score(1)), (3, 2));
        let single = index.find_matches(&[1, 2], true);
        assert_eq!((single.score(0), single.score(1)), (2, 2));
    }

    #[test]
    fn duplicate_events_are_idempotent() {
        let mut index = KvIndex::new();
        for _ in 0..3 {
            index.apply(&stored(0, None, &[1, 2, 3])).unwrap();
            index.apply(&stored(0, Some(1), &[2, 3])).unwrap();
        }
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 3)]);
        assert_eq!(index.block_count(), 3);
        assert_eq!(index.worker_block_count(0), 3);
        index.apply(&removed(0, &[3])).unwrap();
        index.apply(&removed(0, &[3])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 2)]);
        assert_eq!(index.worker_block_count(0), 2);
    }

    #[test]
    fn unknown_removed_blocks_are_skipped_and_the_rest_applied() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1, 2, 3])).unwrap();
        index.apply(&removed(0, &[9, 3, 8])).unwrap();
        assert_eq!(scores(&index, &[1, 2, 3]), [(0, 2)]);
    }

    #[test]
    fn signed_wire_hashes_index_like_any_other() {
        let mut index = KvIndex::new();
        let event: RouterEvent = serde_json::from_str(
            r#"{"worker_id": 3, "event": {"event_id": 1, "data": {"stored": {"parent_hash": null,
                "blocks": [{"block_hash": -1, "tokens_hash": -2}, {"block_hash": -3, "tokens_hash": 5}]}}}}"#,
        )
        .unwrap();
        index.apply(&event).unwrap();
        assert_eq!(scores(&index, &[u64::MAX - 1, 5]), [(3, 2)]);
        let removed: RouterEvent = serde_json::from_str(
            r#"{"worker_id": 3, "event": {"event_id": 2, "data": {"removed": {"block_hashes": [-3]}}}}"#,
        )
        .unwrap();
        index.apply(&removed).unwrap();
        assert_eq!(scores(&index, &[u64::MAX - 1, 5]), [(3, 1)]);
    }

    #[test]
    fn a_block_hash_reused_at_another_depth_makes_no_cycle() {
        // A confused engine names block 1 (depth 1) again below its own child.
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1, 2])).unwrap();
        let confused = event(
            0,
            KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: Some(engine_hash(2)),
                blocks: vec![KvCacheStoredBlockData {
                    block_hash: engine_hash(1),
                    tokens_hash: 1,
                }],
            }),
        );
        index.apply(&confused).unwrap();
        // Walks terminate however long the query, and nothing is scored twice per node.
        let query: Vec<u64> = [1, 2].iter().copied().cycle().take(1000).collect();
        assert!(index.find_matches(&query, false).score(0) <= 3);
        index.remove_worker(0);
        assert!(index.block_count() <= 1);
        assert_eq!(scores(&index, &query), []);
    }

    #[test]
    fn more_than_64_workers_use_the_overflow_set_and_recycle_slots() {
        let mut index = KvIndex::new();
        for worker in 0..100 {
            index.apply(&stored(worker, None, &[1, 2])).unwrap();
        }
        for worker in 60..100 {
            index.apply(&removed(worker, &[2])).unwrap();
        }
        let found = index.find_matches(&[1, 2], false);
        assert_eq!(found.scores.len(), 100);
        assert!((0..60).all(|w| found.score(w) == 2));
        assert!((60..100).all(|w| found.score(w) == 1));
        // A slot given back is reused without inheriting anything.
        index.remove_worker(5);
        index.remove_worker(70);
        index.apply(&stored(500, None, &[1])).unwrap();
        index.apply(&stored(501, None, &[3])).unwrap();
        let found = index.find_matches(&[1, 2], false);
        assert_eq!((found.score(5), found.score(70)), (0, 0));
        assert_eq!((found.score(500), found.score(501)), (1, 0));
        assert_eq!(found.scores.len(), 99);
        // Early exit counts overflow workers too.
        for worker in (0..100).chain([500, 501]).filter(|&w| w != 99) {
            index.remove_worker(worker);
        }
        assert_eq!(index.find_matches(&[1, 2], true).score(99), 1);
    }

    #[test]
    fn many_children_under_one_node_spill_into_a_map() {
        let mut index = KvIndex::new();
        index.apply(&stored(0, None, &[1])).unwrap();
        for child in 10..40 {
            index.apply(&stored(0, Some(1), &[child])).unwrap();
        }
        for child in 10..40 {
            assert_eq!(scores(&index, &[1, child]), [(0, 2)]);
        }
        assert_eq!(index.block_count(), 31);
        index.apply(&removed(0, &[1])).unwrap();
        assert_eq!(scores(&index, &[1, 20]), []);
    }

    #[test]
    fn shared_index_is_send_sync_and_survives_a_poisoned_lock() {
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<SharedKvIndex>();
        let shared = SharedKvIndex::new();
        shared.apply(&stored(0, None, &[1, 2])).unwrap();
        let poisoner = shared.clone();
        let result = std::thread::spawn(move || {
            let _guard = poisoner.inner.write().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(result.is_err());
        assert!(shared.inner.is_poisoned());
        assert_eq!(shared.find_matches(&[1, 2], false).score(0), 2);
        shared.apply(&stored(1, None, &[1])).unwrap();
        assert_eq!(shared.block_count(), 2);
        assert_eq!(shared.worker_block_count(1), 1);
        assert_eq!(shared.workers(), [0, 1]);
        shared.remove_worker(0);
        assert_eq!(shared.find_matches(&[1, 2], false).scores.len(), 1);
    }

    #[test]
    fn readers_see_consistent_results_while_a_writer_applies() {
        let shared = SharedKvIndex::new();
        shared.apply(&stored(0, None, &[1, 2, 3])).unwrap();
        let writer = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                for round in 0..2000u64 {
                    let extra = 10 + round % 50;
                    shared.apply(&stored(1, None, &[1, 2, extra])).unwrap();
                    shared.apply(&removed(1, &[extra, 2, 1])).unwrap();
                }
            })
        };
        for _ in 0..2000 {
            let found = shared.find_matches(&[1, 2, 3], false);
            assert_eq!(found.score(0), 3);
            assert!(found.score(1) <= 2);
        }
        writer.join().unwrap();
        assert_eq!(shared.find_matches(&[1, 2, 3], false).scores.len(), 1);
    }

    /// Dynamo's `Rc<RefCell<..>>` radix tree, written plainly (with this module's two documented
    /// deviations), to check the arena against on random event streams.
    mod reference {
        use std::cell::RefCell;
        use std::collections::{HashMap, HashSet};
        use std::rc::Rc;

        use super::*;

        type Block = Rc<RefCell<RefBlock>>;

        #[derive(Default)]
        pub struct RefBlock {
            children: HashMap<u64, Block>,
            workers: HashSet<WorkerId>,
            depth: u32,
        }

        #[derive(Default)]
        pub struct RefTree {
            root: Block,
            lookup: HashMap<WorkerId, HashMap<u64, Block>>,
        }

        fn leave(block: &Block, worker: WorkerId) {
            let mut b = block.borrow_mut();
            b.workers.remove(&worker);
            if b.workers.is_empty() {
                b.children.clear();
            }
        }

        impl RefTree {
            pub fn apply(&mut self, event: &RouterEvent) {
                let worker = event.worker_id;
                match &event.event.data {
                    KvCacheEventData::Stored(data) => {
                        if repeated_block(data).is_some() {
                            return;
                        }
                        let mut current = match data.parent_hash {
                            None => self.root.clone(),
                            Some(p) => match self.lookup.get(&worker).and_then(|t| t.get(&p)) {
                                Some(b) => b.clone(),
                                None => return,
                            },
                        };
                        let table = self.lookup.entry(worker).or_default();
                        for block in &data.blocks {
                            let depth = current.borrow().depth + 1;
                            let existing =
                                current.borrow().children.get(&block.tokens_hash).cloned();
                            let child = existing.unwrap_or_else(|| {
                                let child = table
                                    .get(&block.block_hash)
                                    .filter(|b| b.borrow().depth == depth)
                                    .cloned()
                                    .unwrap_or_else(|| {
                                        Rc::new(RefCell::new(RefBlock {
                                            depth,
                                            ..Default::default()
                                        }))
                                    });
                                current
                                    .borrow_mut()
                                    .children
                                    .insert(block.tokens_hash, child.clone());
                                child
                            });
                            child.borrow_mut().workers.insert(worker);
                            if let Some(old) = table.insert(block.block_hash, child.clone()) {
                                if !Rc::ptr_eq(&old, &child) {
                                    leave(&old, worker);
                                }
                            }
                            current = child;
                        }
                    }
                    KvCacheEventData::Removed(data) => {
                        if let Some(table) = self.lookup.get_mut(&worker) {
                            for hash in &data.block_hashes {
                                if let Some(block) = table.remove(hash) {
                                    leave(&block, worker);
                                }
                            }
                        }
                    }
                    KvCacheEventData::Cleared => {
                        if let Some(table) = self.lookup.get_mut(&worker) {
                            for (_, block) in table.drain() {
                                leave(&block, worker);
                            }
                        }
                    }
                }
            }

            pub fn remove_worker(&mut self, worker: WorkerId) {
                if let Some(table) = self.lookup.remove(&worker) {
                    for block in table.values() {
                        leave(block, worker);
                    }
                }
            }

            pub fn find_matches(&self, locals: &[u64]) -> HashMap<WorkerId, u32> {
                let mut scores = HashMap::new();
                let mut current = self.root.clone();
                for local in locals {
                    let next = current.borrow().children.get(local).cloned();
                    let Some(next) = next else { break };
                    for &worker in &next.borrow().workers {
                        *scores.entry(worker).or_insert(0) += 1;
                    }
                    current = next;
                }
                scores
            }

            pub fn worker_block_count(&self, worker: WorkerId) -> usize {
                self.lookup.get(&worker).map_or(0, |t| t.len())
            }
        }
    }

    /// A small deterministic generator (the tests need no cryptographic or statistical quality).
    struct SplitMix(u64);

    impl SplitMix {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_event_streams_match_the_reference_tree() {
        for seed in 0..40 {
            let mut rng = SplitMix(seed);
            let mut index = KvIndex::new();
            let mut reference = reference::RefTree::default();
            // Chains over a small alphabet so prefixes are shared and blocks collide often; engine
            // hashes are either consistent (chained) or, for some workers, reused across positions.
            let chains: Vec<Vec<u64>> = (0..12)
                .map(|_| (0..1 + rng.below(8)).map(|_| 1 + rng.below(4)).collect())
                .collect();
            for step in 0..400 {
                let worker = rng.below(5);
                let chain = &chains[rng.below(chains.len() as u64) as usize];
                let confused = worker == 4;
                let hash_of = |i: usize| -> u64 {
                    if confused {
                        chain[i] // the same hash for the same tokens at any position
                    } else {
                        crate::kv::hashing::sequence_hashes(&chain[..=i])[i]
                    }
                };
                let event = match rng.below(10) {
                    0..=4 => {
                        let start = rng.below(chain.len() as u64) as usize;
                        let start = if rng.below(3) == 0 { 0 } else { start };
                        let end = start + 1 + rng.below((chain.len() - start) as u64) as usize;
                        RouterEvent {
                            worker_id: worker,
                            event: KvCacheEvent {
                                event_id: step,
                                data: KvCacheEventData::Stored(KvCacheStoreData {
                                    parent_hash: (start > 0).then(|| hash_of(start - 1)),
                                    blocks: (start..end)
                                        .map(|i| KvCacheStoredBlockData {
                                            block_hash: hash_of(i),
                                            tokens_hash: chain[i],
                                        })
                                        .collect(),
                                }),
                                dp_rank: 0,
                            },
                        }
                    }
                    5..=7 => {
                        let i = rng.below(chain.len() as u64) as usize;
                        event(
                            worker,
                            KvCacheEventData::Removed(KvCacheRemoveData {
                                block_hashes: vec![hash_of(i), rng.below(1000)],
                            }),
                        )
                    }
                    8 => event(worker, KvCacheEventData::Cleared),
                    _ => {
                        index.remove_worker(worker);
                        reference.remove_worker(worker);
                        continue;
                    }
                };
                let _ = index.apply(&event);
                reference.apply(&event);
                for query in &chains {
                    let got = index.find_matches(query, false).scores;
                    assert_eq!(
                        got,
                        reference.find_matches(query),
                        "seed {seed} step {step}"
                    );
                }
                for worker in 0..5 {
                    assert_eq!(
                        index.worker_block_count(worker),
                        reference.worker_block_count(worker)
                    );
                }
            }
        }
    }
}
