//! Applying stored, removed and cleared events to the index and scoring prefixes against it.

use super::*;

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
