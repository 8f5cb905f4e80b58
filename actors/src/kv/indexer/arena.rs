//! The index's storage: nodes in an arena (`Vec` + free list, `u32` ids) with explicit reference
//! counts, child sets, and the hasher for keys that already are hashes.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use super::super::hashing::LocalBlockHash;

/// Hasher for keys that already are hashes (block hashes, worker ids): one folded 64×64→128 multiply
/// per word instead of SipHash. Seeded per process, because local block hashes derive from user prompts
/// with a public seed and a fixed hasher would let a client aim requests at one bucket.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHasher {
    pub(super) state: u64,
}

impl KeyHasher {
    pub(super) const MULTIPLIER: u64 = 0x9E37_79B9_7F4A_7C15;

    #[inline]
    pub(super) fn mix(&mut self, word: u64) {
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
    pub(super) seed: u64,
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

/// Heap bytes of a std (SwissTable) map, from its capacity: a power-of-two bucket count at most 7/8
/// full, one `(K, V)` slot and one control byte per bucket, plus a group of trailing control bytes.
/// An estimate of the layout, not a measurement (the allocator's own overhead is not counted).
pub(super) fn map_bytes<K, V, S>(map: &HashMap<K, V, S>) -> usize {
    if map.capacity() == 0 {
        return 0;
    }
    let buckets = if map.capacity() < 8 {
        (map.capacity() + 1).next_power_of_two()
    } else {
        (map.capacity() * 8 / 7).next_power_of_two()
    };
    buckets * (std::mem::size_of::<(K, V)>() + 1) + 16
}

/// Index of a node in the arena.
pub(super) type NodeId = u32;

/// The root: no workers, never freed, never in a worker's table.
pub(super) const ROOT: NodeId = 0;

/// Children kept in a list up to this many; a map beyond.
pub(super) const FEW_CHILDREN: usize = 8;

/// `Node::flags`: how the children are held (two bits) ...
pub(super) const CHILDREN_MASK: u32 = 0b11;
pub(super) const CHILDREN_NONE: u32 = 0;
/// ... one child, inline in `key` and `child` ...
pub(super) const CHILDREN_ONE: u32 = 1;
/// ... or several, in `Arena::child_sets[child]`;
pub(super) const CHILDREN_SET: u32 = 2;
/// and whether workers in slots 64 and up hold the node (listed in `Arena::high_workers`).
pub(super) const HIGH_WORKERS: u32 = 4;

/// One block of the tree: 32 bytes, aligned so a node never straddles a cache line, because the match
/// walk touches one node per block and is bound by those loads. What does not fit (several children,
/// workers past slot 63) lives beside the arena.
#[derive(Clone, Copy, Debug, Default)]
#[repr(align(32))]
pub(super) struct Node {
    /// Worker slots below 64, a bit each.
    pub(super) low: u64,
    /// The only child's `tokens_hash` (`CHILDREN_ONE`).
    pub(super) key: u64,
    /// The only child (`CHILDREN_ONE`), or the node's entry in `Arena::child_sets` (`CHILDREN_SET`).
    pub(super) child: u32,
    /// Child edges plus worker-table entries pointing here; the node is freed at zero, exactly where
    /// Dynamo's `Rc` would be dropped.
    pub(super) refs: u32,
    /// Distance from the root; every edge goes one level down, which rules out cycles.
    pub(super) depth: u32,
    /// `CHILDREN_*` and `HIGH_WORKERS`.
    pub(super) flags: u32,
}

const _: () = assert!(std::mem::size_of::<Node>() == 32);

/// The children of a node that has more than one, by `tokens_hash`.
#[derive(Debug)]
pub(super) enum ChildSet {
    Few(Vec<(LocalBlockHash, NodeId)>),
    Many(KeyMap<LocalBlockHash, NodeId>),
}

/// The nodes and their recycling.
#[derive(Debug)]
pub(super) struct Arena {
    pub(super) nodes: Vec<Node>,
    pub(super) free: Vec<NodeId>,
    pub(super) child_sets: Vec<ChildSet>,
    pub(super) free_child_sets: Vec<u32>,
    /// Worker slots ≥ 64 per node, sorted and never empty (rare: slots are reused lowest first, so it
    /// takes more than 64 live workers).
    pub(super) high_workers: KeyMap<NodeId, Vec<u32>>,
    /// Reused work list for releasing nodes, so that removals do not allocate.
    pub(super) pending: Vec<NodeId>,
}

impl Arena {
    pub(super) fn new() -> Self {
        Self {
            nodes: vec![Node::default()],
            free: Vec::new(),
            child_sets: Vec::new(),
            free_child_sets: Vec::new(),
            high_workers: KeyMap::default(),
            pending: Vec::new(),
        }
    }

    pub(super) fn live(&self) -> usize {
        self.nodes.len() - 1 - self.free.len()
    }

    /// How many more nodes can be allocated.
    pub(super) fn room(&self) -> usize {
        (NodeId::MAX as usize).saturating_sub(self.nodes.len()) + self.free.len()
    }

    #[inline]
    pub(super) fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    #[inline]
    pub(super) fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// A fresh node with no references; the caller checked [`Arena::room`].
    pub(super) fn alloc(&mut self, depth: u32) -> NodeId {
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
    pub(super) fn child(&self, id: NodeId, key: LocalBlockHash) -> Option<NodeId> {
        let node = self.node(id);
        match node.flags & CHILDREN_MASK {
            CHILDREN_ONE => (node.key == key).then_some(node.child),
            CHILDREN_SET => self.child_in_set(node.child, key),
            _ => None,
        }
    }

    /// The rarer case, kept out of line so the walk's loop stays small.
    #[inline(never)]
    pub(super) fn child_in_set(&self, set: u32, key: LocalBlockHash) -> Option<NodeId> {
        match self.child_sets.get(set as usize)? {
            ChildSet::Few(list) => list.iter().find(|(k, _)| *k == key).map(|&(_, c)| c),
            ChildSet::Many(map) => map.get(&key).copied(),
        }
    }

    /// Adds an edge the caller has checked is absent, and counts it as a reference to `child`.
    pub(super) fn add_child(&mut self, id: NodeId, key: LocalBlockHash, child: NodeId) {
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
    pub(super) fn take_children(&mut self, id: NodeId, out: &mut Vec<NodeId>) {
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
    pub(super) fn release_pending(&mut self, pending: &mut Vec<NodeId>) {
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
    pub(super) fn release(&mut self, id: NodeId) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.push(id);
        self.release_pending(&mut pending);
        self.pending = pending;
    }

    pub(super) fn join(&mut self, id: NodeId, slot: u32) {
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
    pub(super) fn leave(&mut self, id: NodeId, slot: u32) {
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

    /// Heap bytes held by the arena: node and free-list capacity, child sets, high-slot lists (see
    /// [`map_bytes`] for how a map is counted).
    pub(super) fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        let child_sets: usize = self
            .child_sets
            .iter()
            .map(|set| match set {
                ChildSet::Few(list) => list.capacity() * size_of::<(LocalBlockHash, NodeId)>(),
                ChildSet::Many(map) => map_bytes(map),
            })
            .sum();
        let high: usize = self
            .high_workers
            .values()
            .map(|slots| slots.capacity() * size_of::<u32>())
            .sum();
        self.nodes.capacity() * size_of::<Node>()
            + (self.free.capacity() + self.free_child_sets.capacity() + self.pending.capacity())
                * size_of::<NodeId>()
            + self.child_sets.capacity() * size_of::<ChildSet>()
            + child_sets
            + map_bytes(&self.high_workers)
            + high
    }

    /// The slots ≥ 64 holding the node.
    pub(super) fn high(&self, id: NodeId) -> &[u32] {
        if self.node(id).flags & HIGH_WORKERS == 0 {
            return &[];
        }
        self.high_workers.get(&id).map_or(&[], Vec::as_slice)
    }

    pub(super) fn worker_count(&self, id: NodeId) -> usize {
        self.node(id).low.count_ones() as usize + self.high(id).len()
    }

    /// Whether two nodes are held by the same workers.
    #[inline]
    pub(super) fn same_workers(&self, a: NodeId, b: NodeId) -> bool {
        let (x, y) = (self.node(a), self.node(b));
        x.low == y.low && ((x.flags | y.flags) & HIGH_WORKERS == 0 || self.high(a) == self.high(b))
    }
}
