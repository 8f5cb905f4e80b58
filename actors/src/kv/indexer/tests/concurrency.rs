//! The shared index across threads: `Send + Sync`, a poisoned lock, and readers during writes.

use super::*;

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
