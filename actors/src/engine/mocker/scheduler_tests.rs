//! Scheduler tests: driven step by step over simulated time, so every number is exact.

use std::collections::HashMap;

use super::*;
use crate::kv::hashing::{chain, local_block_hash, local_block_hashes, sequence_hashes};
use crate::kv::protocol::{KvCacheStoreData, KvCacheStoredBlockData};

const VOCAB: [u32; 4] = [101, 202, 303, 404];

/// Block size 4, 64 blocks, budget 32 tokens, no watermark.
fn small() -> MockerConfig {
    MockerConfig {
        num_gpu_blocks: 64,
        block_size: 4,
        max_num_seqs: 16,
        max_num_batched_tokens: 32,
        watermark: 0.0,
        ..MockerConfig::default()
    }
}

fn scheduler(config: MockerConfig) -> Scheduler {
    Scheduler::new(config, Arc::from(VOCAB), true)
}

fn prompt(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}

/// Steps until idle (at most 10 000 steps).
fn run_to_idle(s: &mut Scheduler) -> Vec<StepReport> {
    let mut reports = Vec::new();
    while !s.is_idle() && reports.len() < 10_000 {
        reports.push(s.step());
    }
    assert!(s.is_idle(), "did not finish");
    reports
}

/// Tokens per request, in order, across `reports`.
fn tokens_by_request(reports: &[StepReport]) -> HashMap<RequestKey, Vec<Emission>> {
    let mut by = HashMap::<RequestKey, Vec<Emission>>::new();
    for report in reports {
        for emission in &report.emissions {
            by.entry(emission.key).or_default().push(*emission);
        }
    }
    by
}

fn stored_blocks(events: &[KvCacheEventData]) -> Vec<(Option<u64>, Vec<u64>)> {
    events
        .iter()
        .filter_map(|event| match event {
            KvCacheEventData::Stored(data) => Some((
                data.parent_hash,
                data.blocks.iter().map(|b| b.block_hash).collect(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn emits_exactly_max_tokens_then_finishes_and_caches_its_blocks() {
    let mut s = scheduler(small());
    let key = s.enqueue(7, prompt(0..10), 5).unwrap();
    let reports = run_to_idle(&mut s);
    assert_eq!(reports.len(), 5, "one prefill step, then four decode steps");
    let emitted = &tokens_by_request(&reports)[&key];
    assert_eq!(emitted.len(), 5);
    assert!(emitted.iter().all(|e| VOCAB.contains(&e.token)));
    let finished: Vec<bool> = emitted.iter().map(|e| e.finished).collect();
    assert_eq!(finished, vec![false, false, false, false, true]);
    // 10 prompt + 5 generated tokens, of which 14 were computed: 3 full blocks stay cached.
    assert_eq!((s.active_blocks(), s.inactive_blocks()), (0, 3));

    // The same seed draws the same tokens.
    let mut again = scheduler(small());
    again.enqueue(7, prompt(0..10), 5).unwrap();
    let same: Vec<u32> = run_to_idle(&mut again)
        .iter()
        .flat_map(|r| r.emissions.iter().map(|e| e.token))
        .collect();
    assert_eq!(same, emitted.iter().map(|e| e.token).collect::<Vec<_>>());
}

#[test]
fn first_token_ends_the_prefill_step_and_steps_are_priced_by_the_perf_model() {
    let config = MockerConfig {
        speedup_ratio: 2.0,
        decode_speedup_ratio: 4.0,
        ..small()
    };
    let mut s = scheduler(config);
    let key = s.enqueue(1, prompt(0..10), 3).unwrap();
    let prefill = s.step();
    assert_eq!(prefill.prefill_tokens, 10);
    assert_eq!(prefill.decode_requests, 0);
    assert_eq!(prefill.prefill_ms, prefill_ms(10));
    assert_eq!(prefill.decode_ms, 0.0);
    assert_eq!(prefill.duration_ms, prefill_ms(10) / 2.0);
    assert_eq!(prefill.end_ms, prefill.duration_ms);
    assert_eq!(prefill.emissions.len(), 1);
    assert_eq!(prefill.emissions[0].key, key);

    let decode = s.step();
    assert_eq!(decode.prefill_tokens, 0);
    assert_eq!(decode.decode_requests, 1);
    // 11 tokens in the cache need 3 of 64 blocks.
    assert_eq!(decode.decode_ms, decode_ms(3.0 / 64.0));
    assert_eq!(decode.duration_ms, decode_ms(3.0 / 64.0) / 8.0);
    assert_eq!(s.clock_ms(), prefill.duration_ms + decode.duration_ms);
}

#[test]
fn stored_events_carry_chained_hashes_including_generated_blocks() {
    let mut s = scheduler(small());
    let tokens = prompt(0..10);
    s.enqueue(3, tokens.clone(), 4).unwrap();
    let first = s.step();
    let locals = local_block_hashes(&tokens, 4);
    let seqs = sequence_hashes(&locals);
    assert_eq!(
        s.take_events(),
        vec![KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: None,
            blocks: vec![
                KvCacheStoredBlockData {
                    block_hash: seqs[0],
                    tokens_hash: locals[0],
                },
                KvCacheStoredBlockData {
                    block_hash: seqs[1],
                    tokens_hash: locals[1],
                },
            ],
        })]
    );
    // Tokens 10 and 11 are generated; once token 11 is computed the third block is full.
    let second = s.step();
    assert!(s.take_events().is_empty());
    s.step();
    let block: Vec<u32> = vec![8, 9, first.emissions[0].token, second.emissions[0].token];
    let local = local_block_hash(&block);
    assert_eq!(
        s.take_events(),
        vec![KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: Some(seqs[1]),
            blocks: vec![KvCacheStoredBlockData {
                block_hash: chain(Some(seqs[1]), local),
                tokens_hash: local,
            }],
        })]
    );
}

#[test]
fn a_shared_prefix_is_reused_not_restored_and_shortens_ttft() {
    let mut s = scheduler(small());
    let shared = prompt(0..32);
    s.enqueue(1, shared.clone(), 1).unwrap();
    let cold_start = s.clock_ms();
    let cold = run_to_idle(&mut s);
    let cold_ttft = cold[0].end_ms - cold_start;
    assert_eq!(cold[0].prefill_tokens, 32);
    assert_eq!(stored_blocks(&s.take_events())[0].1.len(), 8);

    let mut longer = shared.clone();
    longer.extend(1000..1008);
    let warm_start = s.clock_ms();
    s.enqueue(2, longer.clone(), 1).unwrap();
    let warm = run_to_idle(&mut s);
    let warm_ttft = warm[0].end_ms - warm_start;
    assert_eq!(
        warm[0].prefill_tokens, 8,
        "only the new blocks are computed"
    );
    assert!(warm_ttft < cold_ttft);
    assert!((warm_ttft - prefill_ms(8)).abs() < 1e-9);
    // Only the two new blocks are stored, chained onto the cached prefix.
    let seqs = sequence_hashes(&local_block_hashes(&longer, 4));
    assert_eq!(
        stored_blocks(&s.take_events()),
        vec![(Some(seqs[7]), vec![seqs[8], seqs[9]])]
    );
    assert!((s.prefix_hit_rate() - (0.0 + 0.8) / 2.0).abs() < 1e-12);
    assert_eq!(
        s.prompt_token_totals(),
        (32 + 40, 32),
        "admitted and cached prompt tokens"
    );

    // A fully cached prompt still computes its last block, to have something to sample from.
    s.enqueue(3, shared, 1).unwrap();
    assert_eq!(s.step().prefill_tokens, 4);
    assert!(s.take_events().is_empty(), "nothing new to store");
}

#[test]
fn watermark_holds_back_admission_while_others_run() {
    let config = MockerConfig {
        num_gpu_blocks: 10,
        watermark: 0.5,
        ..small()
    };
    let mut s = scheduler(config);
    let a = s.enqueue(1, prompt(0..12), 2).unwrap();
    let b = s.enqueue(2, prompt(100..112), 2).unwrap();
    let first = s.step();
    // A takes 3 blocks; B's 3 more would pass the ceiling of (1 − 0.5) × 10 = 5 blocks.
    assert_eq!((s.running_len(), s.waiting_len()), (1, 1));
    assert_eq!(
        first.emissions.iter().map(|e| e.key).collect::<Vec<_>>(),
        vec![a]
    );
    s.step();
    // A finished; B gets in.
    let third = s.step();
    assert_eq!(
        third.emissions.iter().map(|e| e.key).collect::<Vec<_>>(),
        vec![b]
    );

    // With nothing running the watermark is waived: 7 blocks > 5 still run alone.
    let mut alone = scheduler(MockerConfig {
        num_gpu_blocks: 10,
        watermark: 0.5,
        ..small()
    });
    alone.enqueue(1, prompt(0..28), 1).unwrap();
    assert_eq!(alone.step().emissions.len(), 1);
}

#[test]
fn max_num_seqs_caps_the_running_set() {
    let mut s = scheduler(MockerConfig {
        max_num_seqs: 2,
        ..small()
    });
    for seed in 0..3 {
        s.enqueue(seed, prompt(0..4), 3).unwrap();
    }
    let mut reports = vec![s.step()];
    assert_eq!((s.running_len(), s.waiting_len()), (2, 1));
    reports.extend(run_to_idle(&mut s));
    let by = tokens_by_request(&reports);
    assert_eq!(by.len(), 3);
    assert!(by.values().all(|emitted| emitted.len() == 3));
}

#[test]
fn chunked_prefill_splits_a_long_prompt_within_the_budget() {
    let mut s = scheduler(MockerConfig {
        max_num_batched_tokens: 8,
        ..small()
    });
    s.enqueue(1, prompt(0..20), 1).unwrap();
    let reports = run_to_idle(&mut s);
    let chunks: Vec<usize> = reports.iter().map(|r| r.prefill_tokens).collect();
    assert_eq!(chunks, vec![8, 8, 4]);
    let emitted: Vec<usize> = reports.iter().map(|r| r.emissions.len()).collect();
    assert_eq!(
        emitted,
        vec![0, 0, 1],
        "the first token ends the last chunk"
    );
    // The chunks' full blocks are stored as they are computed, each run chained onto the last.
    let stored = stored_blocks(&s.take_events());
    let seqs = sequence_hashes(&local_block_hashes(&prompt(0..20), 4));
    assert_eq!(
        stored,
        vec![
            (None, seqs[..2].to_vec()),
            (Some(seqs[1]), seqs[2..4].to_vec()),
            (Some(seqs[3]), seqs[4..].to_vec()),
        ]
    );
}

#[test]
fn decodes_share_the_budget_with_a_chunk() {
    let mut s = scheduler(MockerConfig {
        max_num_batched_tokens: 8,
        ..small()
    });
    s.enqueue(1, prompt(0..4), 5).unwrap();
    s.step();
    s.enqueue(2, prompt(100..120), 1).unwrap();
    let mixed = s.step();
    assert_eq!((mixed.decode_requests, mixed.prefill_tokens), (1, 7));
    assert!(mixed.decode_ms > 0.0 && mixed.prefill_ms > 0.0);
    assert_eq!(mixed.duration_ms, mixed.prefill_ms + mixed.decode_ms);
}

#[test]
fn without_chunking_a_prompt_is_prefilled_whole() {
    let mut s = scheduler(MockerConfig {
        max_num_batched_tokens: 8,
        enable_chunked_prefill: false,
        ..small()
    });
    s.enqueue(1, prompt(0..20), 1).unwrap();
    s.enqueue(2, prompt(100..106), 1).unwrap();
    let first = s.step();
    // Over the budget, but alone in the step: it must run or it never would.
    assert_eq!(first.prefill_tokens, 20);
    assert_eq!(s.waiting_len(), 1, "nothing joins a full step");
    assert_eq!(s.step().prefill_tokens, 6);
}

#[test]
fn running_out_of_blocks_preempts_the_newest_request_which_resumes_later() {
    let mut s = scheduler(MockerConfig {
        num_gpu_blocks: 6,
        ..small()
    });
    let a = s.enqueue(1, prompt(0..8), 12).unwrap();
    let b = s.enqueue(2, prompt(100..108), 12).unwrap();
    let mut reports = Vec::new();
    while reports.len() < 100 {
        let report = s.step();
        let preempted = !report.preempted.is_empty();
        reports.push(report);
        if preempted {
            break;
        }
    }
    let preempting = reports.last().unwrap();
    assert_eq!(preempting.preempted, vec![b]);
    // B freed everything and waits at the front; A holds all the blocks it uses.
    assert_eq!((s.running_len(), s.waiting_len()), (1, 1));
    assert_eq!(s.active_blocks(), 4);
    assert_eq!(s.preemptions(), 1);
    assert!(preempting.emissions.iter().all(|e| e.key == a));

    reports.extend(run_to_idle(&mut s));
    let by = tokens_by_request(&reports);
    for key in [a, b] {
        assert_eq!(by[&key].len(), 12, "no token lost or repeated");
        assert_eq!(by[&key].iter().filter(|e| e.finished).count(), 1);
        assert!(by[&key].last().unwrap().finished);
    }
    // B's readmission recomputed its prompt and what it had generated (more than one token).
    let resumed = reports
        .iter()
        .skip_while(|r| r.preempted.is_empty())
        .find(|r| r.emissions.iter().any(|e| e.key == b))
        .unwrap();
    assert!(resumed.prefill_tokens > 1);
    assert_eq!(s.active_blocks(), 0);
}

#[test]
fn cancelling_frees_blocks_wherever_the_request_is() {
    let mut s = scheduler(MockerConfig {
        max_num_seqs: 1,
        enable_prefix_caching: false,
        ..small()
    });
    let running = s.enqueue(1, prompt(0..10), 100).unwrap();
    let waiting = s.enqueue(2, prompt(0..10), 100).unwrap();
    s.step();
    assert_eq!(s.active_blocks(), 3);
    assert!(s.cancel(running));
    assert_eq!((s.active_blocks(), s.inactive_blocks()), (0, 0));
    assert!(s.cancel(waiting));
    assert!(s.is_idle());
    assert!(!s.cancel(running), "already gone");
    let idle = s.step();
    assert_eq!((idle.scheduled, idle.duration_ms), (0, 0.0));
}

#[test]
fn impossible_requests_are_refused_up_front() {
    let mut s = scheduler(MockerConfig {
        num_gpu_blocks: 4,
        ..small()
    });
    assert_eq!(s.enqueue(1, vec![], 1), Err(MockerError::EmptyPrompt));
    assert_eq!(
        s.enqueue(1, prompt(0..16), 1),
        Err(MockerError::TooLong {
            prompt_tokens: 16,
            max_tokens: 1,
            needed_blocks: 5,
            capacity: 4
        })
    );
    assert!(s.enqueue(1, prompt(0..15), 1).is_ok());
    assert!(s.enqueue(1, prompt(0..4), usize::MAX).is_err());
}

#[test]
fn no_hits_and_no_events_without_prefix_caching() {
    let mut s = scheduler(MockerConfig {
        enable_prefix_caching: false,
        ..small()
    });
    s.enqueue(1, prompt(0..16), 1).unwrap();
    run_to_idle(&mut s);
    s.enqueue(1, prompt(0..16), 1).unwrap();
    assert_eq!(s.step().prefill_tokens, 16);
    assert!(s.take_events().is_empty());
    assert_eq!(s.prefix_hit_rate(), 0.0);
    assert_eq!(s.inactive_blocks(), 0);
}

#[test]
fn eviction_of_cached_blocks_is_reported() {
    let mut s = scheduler(MockerConfig {
        num_gpu_blocks: 4,
        ..small()
    });
    s.enqueue(1, prompt(0..12), 1).unwrap();
    run_to_idle(&mut s);
    let seqs = sequence_hashes(&local_block_hashes(&prompt(0..12), 4));
    s.take_events();
    // A different 12-token prompt needs 3 blocks: 1 free, 2 evicted (tail first).
    s.enqueue(2, prompt(50..62), 1).unwrap();
    s.step();
    let events = s.take_events();
    assert_eq!(
        events[0],
        KvCacheEventData::Removed(crate::kv::protocol::KvCacheRemoveData {
            block_hashes: vec![seqs[2], seqs[1]]
        })
    );
}

#[test]
fn pending_prefill_tokens_counts_waiting_and_prefilling_work() {
    let mut s = scheduler(MockerConfig {
        max_num_batched_tokens: 8,
        ..small()
    });
    s.enqueue(1, prompt(0..20), 2).unwrap();
    s.enqueue(2, prompt(0..6), 2).unwrap();
    assert_eq!(s.pending_prefill_tokens(), 26);
    s.step();
    assert_eq!(s.pending_prefill_tokens(), 12 + 6);
}

/// The first token of a request says how much of its prompt the prefix cache held (Dynamo's
/// `completion_usage.prompt_tokens_details.cached_tokens`); later tokens say nothing.
#[test]
fn the_first_emission_reports_cached_prompt_tokens() {
    let mut s = scheduler(small());
    let first = s.enqueue(1, prompt(0..18), 3).unwrap();
    let reports = run_to_idle(&mut s);
    let cold = &tokens_by_request(&reports)[&first];
    assert_eq!(cold[0].cached_tokens, Some(0));
    assert!(cold[1..].iter().all(|e| e.cached_tokens.is_none()));
    // The same prompt again: its four full blocks (16 tokens) are cached.
    let again = s.enqueue(2, prompt(0..18), 3).unwrap();
    let reports = run_to_idle(&mut s);
    let warm = &tokens_by_request(&reports)[&again];
    assert_eq!(warm[0].cached_tokens, Some(16));
}
