//! Random event streams applied to the index and to a simple reference tree give the same scores.

use super::*;

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
                        let existing = current.borrow().children.get(&block.tokens_hash).cloned();
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
