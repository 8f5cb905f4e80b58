//! KV prefix index speed (runtime spec §3.3): event application and `find_matches` on one core, bare and
//! through the `SharedKvIndex` lock, and readers against a concurrent writer.
//!
//! `cargo bench --bench kv_index` builds ~100k blocks over 8 workers from 64-block prompts that share
//! 16-block system prompts, then measures in steady state: each churn cycle evicts the last 16 blocks of
//! one (prompt, worker) and stores them again, so the index stays at the same size. Queries are 16–64
//! blocks of a known prompt, a quarter of them diverging part-way. Prints numbers; asserts nothing.
//!
//! Then (e) the size of the goal: 64 workers and about 1M distinct cached blocks (tree nodes) in
//! total, from 32–128-block prompts that open with one of 256 shared 16-block system prompts, each prompt
//! on one worker and one in four on a second. It prints the memory per cached block (the process's RSS
//! before and after the build, and the index's own count of its heap bytes), per-call `find_matches`
//! latency for 32–128-block queries, and the same 80/20 mix at that size. `KV_INDEX_LARGE_BLOCKS` sets
//! the target (default 1000000).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamix_actors::kv::hashing::{sequence_hashes, LocalBlockHash, SequenceHash};
use dynamix_actors::kv::indexer::{KvIndex, SharedKvIndex};
use dynamix_actors::kv::protocol::{
    KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData,
    RouterEvent, WorkerId,
};

const WORKERS: u64 = 8;
const SYSTEM_PROMPTS: usize = 32;
const SYSTEM_BLOCKS: usize = 16;
const PROMPT_BLOCKS: usize = 64;
const TARGET_BLOCKS: usize = 100_000;
const MEASURE: Duration = Duration::from_millis(1500);

/// A small deterministic generator (the bench has no `rand`).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Prompt {
    locals: Vec<LocalBlockHash>,
    hashes: Vec<SequenceHash>,
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

/// Stored events for blocks `range` of a prompt, `per_event` blocks each, chained by parent.
fn stores(
    worker: WorkerId,
    prompt: &Prompt,
    range: std::ops::Range<usize>,
    per_event: usize,
) -> Vec<RouterEvent> {
    range
        .clone()
        .step_by(per_event)
        .map(|start| {
            let end = (start + per_event).min(range.end);
            event(
                worker,
                KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: start.checked_sub(1).map(|p| prompt.hashes[p]),
                    blocks: (start..end)
                        .map(|i| KvCacheStoredBlockData {
                            block_hash: prompt.hashes[i],
                            tokens_hash: prompt.locals[i],
                        })
                        .collect(),
                }),
            )
        })
        .collect()
}

/// Removed events for blocks `range` of a prompt, deepest first, `per_event` blocks each.
fn removals(
    worker: WorkerId,
    prompt: &Prompt,
    range: std::ops::Range<usize>,
    per_event: usize,
) -> Vec<RouterEvent> {
    let deepest_first: Vec<SequenceHash> = range.rev().map(|i| prompt.hashes[i]).collect();
    deepest_first
        .chunks(per_event)
        .map(|chunk| {
            event(
                worker,
                KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: chunk.to_vec(),
                }),
            )
        })
        .collect()
}

/// One churn cycle per (prompt, worker) placement: evict the last 16 blocks, store them again.
fn churn_cycle(worker: WorkerId, prompt: &Prompt, per_event: usize) -> Vec<RouterEvent> {
    let tail = PROMPT_BLOCKS - 16..PROMPT_BLOCKS;
    let mut events = removals(worker, prompt, tail.clone(), per_event);
    events.extend(stores(worker, prompt, tail, per_event));
    events
}

/// The process's resident set in bytes (`VmRSS`), 0 where /proc is missing.
fn resident_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let mut rng = SplitMix(2024);
    let systems: Vec<Vec<LocalBlockHash>> = (0..SYSTEM_PROMPTS)
        .map(|_| (0..SYSTEM_BLOCKS).map(|_| rng.next()).collect())
        .collect();
    let unique = PROMPT_BLOCKS - SYSTEM_BLOCKS;
    let prompt_count = (TARGET_BLOCKS - SYSTEM_PROMPTS * SYSTEM_BLOCKS).div_ceil(unique);
    let prompts: Vec<Prompt> = (0..prompt_count)
        .map(|i| {
            let mut locals = systems[i % SYSTEM_PROMPTS].clone();
            locals.extend((0..unique).map(|_| rng.next()));
            let hashes = sequence_hashes(&locals);
            Prompt { locals, hashes }
        })
        .collect();
    // Every prompt on one worker, one in four on a second as well.
    let placements: Vec<(WorkerId, usize)> = (0..prompt_count)
        .flat_map(|i| {
            let first = (i as u64) % WORKERS;
            let second = (i % 4 == 0).then_some((first + 3) % WORKERS);
            std::iter::once((first, i)).chain(second.map(|w| (w, i)))
        })
        .collect();

    // Build.
    let build: Vec<RouterEvent> = placements
        .iter()
        .flat_map(|&(worker, i)| stores(worker, &prompts[i], 0..PROMPT_BLOCKS, 16))
        .collect();
    let mut index = KvIndex::new();
    let started = Instant::now();
    for e in &build {
        index.apply(e).expect("build event");
    }
    let took = started.elapsed();
    println!(
        "build: {} blocks ({} placements over {} workers, {} stored events of 16 blocks) in {:.1} ms, {:.2} M events/s",
        index.block_count(),
        placements.len(),
        WORKERS,
        build.len(),
        took.as_secs_f64() * 1e3,
        build.len() as f64 / took.as_secs_f64() / 1e6
    );

    // Steady-state churn streams.
    let cycles: Vec<(usize, Vec<RouterEvent>, Vec<RouterEvent>)> = (0..4096)
        .map(|_| {
            let (worker, i) = placements[rng.below(placements.len())];
            (
                i,
                churn_cycle(worker, &prompts[i], 4),
                churn_cycle(worker, &prompts[i], 1),
            )
        })
        .collect();

    for (label, pick) in [("4-block events", 0usize), ("1-block events", 1)] {
        let mut events = 0u64;
        let mut blocks = 0u64;
        let started = Instant::now();
        'outer: loop {
            for (_, four, one) in &cycles {
                let stream = if pick == 0 { four } else { one };
                for e in stream {
                    black_box(index.apply(e)).ok();
                }
                events += stream.len() as u64;
                blocks += 32;
                if started.elapsed() > MEASURE {
                    break 'outer;
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "(a) apply, {label} (stored/removed 50/50): {:.2} M events/s, {:.2} M blocks/s, {:.0} ns/event",
            events as f64 / secs / 1e6,
            blocks as f64 / secs / 1e6,
            secs * 1e9 / events as f64
        );
    }
    assert_eq!(index.block_count(), {
        let mut fresh = KvIndex::new();
        build.iter().for_each(|e| fresh.apply(e).expect("build"));
        fresh.block_count()
    });

    // Queries: 16–64 blocks of a known prompt; a quarter diverge at a random point.
    let queries: Vec<Vec<LocalBlockHash>> = (0..8192)
        .map(|_| {
            let prompt = &prompts[rng.below(prompts.len())];
            let length = 16 + rng.below(PROMPT_BLOCKS - 16 + 1);
            let mut query = prompt.locals[..length].to_vec();
            if rng.below(4) == 0 {
                let cut = rng.below(length);
                for local in &mut query[cut..] {
                    *local = rng.next();
                }
            }
            query
        })
        .collect();
    let average_length = queries.iter().map(Vec::len).sum::<usize>() as f64 / queries.len() as f64;
    let mut matched = 0u64;
    let mut calls = 0u64;
    let started = Instant::now();
    'outer: loop {
        for query in &queries {
            let scores = index.find_matches(black_box(query), false);
            matched += scores
                .scores
                .values()
                .map(|&s| u64::from(s))
                .max()
                .unwrap_or(0);
            calls += 1;
            if calls & 0xff == 0 && started.elapsed() > MEASURE {
                break 'outer;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "(b) find_matches, {average_length:.0}-block queries on average: {:.2} M calls/s, {:.0} ns/call, {:.1} best-matched blocks/query",
        calls as f64 / secs / 1e6,
        secs * 1e9 / calls as f64,
        matched as f64 / calls as f64
    );
    let mut latencies: Vec<Duration> = Vec::with_capacity(queries.len() * 20);
    for _ in 0..20 {
        for query in &queries {
            let started = Instant::now();
            black_box(index.find_matches(black_box(query), false));
            latencies.push(started.elapsed());
        }
    }
    latencies.sort_unstable();
    println!(
        "(b) find_matches latency over {} calls: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.2} µs",
        latencies.len(),
        micros(percentile(&latencies, 0.5)),
        micros(percentile(&latencies, 0.99)),
        micros(percentile(&latencies, 0.999)),
        micros(*latencies.last().unwrap_or(&Duration::ZERO))
    );

    // Combined: each 4-block churn cycle (8 events) followed by 2 queries, i.e. 80% events.
    let shared = SharedKvIndex::new();
    for e in &build {
        shared.apply(e).expect("build event");
    }
    for (label, through_lock) in [("KvIndex", false), ("SharedKvIndex (lock per op)", true)] {
        let mut ops = 0u64;
        let mut q = 0usize;
        let started = Instant::now();
        'outer: loop {
            for (_, four, _) in &cycles {
                for e in four {
                    if through_lock {
                        black_box(shared.apply(e)).ok();
                    } else {
                        black_box(index.apply(e)).ok();
                    }
                }
                for _ in 0..2 {
                    let query = &queries[q % queries.len()];
                    q += 1;
                    if through_lock {
                        black_box(shared.find_matches(query, false));
                    } else {
                        black_box(index.find_matches(query, false));
                    }
                }
                ops += four.len() as u64 + 2;
                if started.elapsed() > MEASURE {
                    break 'outer;
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "(c) combined 80% events / 20% find_matches, one thread, {label}: {:.2} M ops/s",
            ops as f64 / secs / 1e6
        );
    }

    // Readers against a writer: one thread churns through the lock (paced, then flat out), this one
    // queries.
    let streams: Arc<Vec<Vec<RouterEvent>>> =
        Arc::new(cycles.iter().map(|(_, four, _)| four.clone()).collect());
    for pace in [Some(100_000u64), None] {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let shared = shared.clone();
            let stop = stop.clone();
            let written = written.clone();
            let streams = streams.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut applied = 0u64;
                'run: loop {
                    for stream in streams.iter() {
                        if stop.load(Ordering::Relaxed) {
                            break 'run;
                        }
                        if let Some(per_second) = pace {
                            let due = Duration::from_secs_f64(applied as f64 / per_second as f64);
                            if let Some(wait) = due.checked_sub(started.elapsed()) {
                                std::thread::sleep(wait);
                            }
                        }
                        for e in stream {
                            black_box(shared.apply(e)).ok();
                        }
                        applied += stream.len() as u64;
                        written.store(applied, Ordering::Relaxed);
                    }
                }
            })
        };
        let mut latencies: Vec<Duration> = Vec::with_capacity(4_000_000);
        let started = Instant::now();
        'outer: loop {
            for query in &queries {
                let call = Instant::now();
                black_box(shared.find_matches(query, false));
                latencies.push(call.elapsed());
                if latencies.len() & 0xff == 0 && started.elapsed() > MEASURE {
                    break 'outer;
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
        let events = written.load(Ordering::Relaxed);
        latencies.sort_unstable();
        let label = match pace {
            Some(per_second) => format!("writer paced at {}k events/s", per_second / 1000),
            None => "writer flat out".to_string(),
        };
        println!(
            "(d) SharedKvIndex, 1 reader thread + 1 {label}: reader {:.2} M calls/s (p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs), writer {:.2} M events/s",
            latencies.len() as f64 / secs / 1e6,
            micros(percentile(&latencies, 0.5)),
            micros(percentile(&latencies, 0.99)),
            micros(percentile(&latencies, 0.999)),
            events as f64 / secs / 1e6
        );
    }
    println!(
        "final: {} blocks, {} workers",
        shared.block_count(),
        shared.workers().len()
    );

    large(&mut rng);
}

/// (e): 64 workers × about 1M distinct blocks; memory per block, lookup latency, the 80/20 mix.
fn large(rng: &mut SplitMix) {
    const LARGE_WORKERS: u64 = 64;
    const LARGE_SYSTEM_PROMPTS: usize = 256;
    const SHORTEST: usize = 32;
    const LONGEST: usize = 128;
    let target: usize = std::env::var("KV_INDEX_LARGE_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);

    let systems: Vec<Vec<LocalBlockHash>> = (0..LARGE_SYSTEM_PROMPTS)
        .map(|_| (0..SYSTEM_BLOCKS).map(|_| rng.next()).collect())
        .collect();
    let mut prompts: Vec<Prompt> = Vec::new();
    let mut distinct = LARGE_SYSTEM_PROMPTS * SYSTEM_BLOCKS;
    while distinct < target {
        let length = SHORTEST + rng.below(LONGEST - SHORTEST + 1);
        let mut locals = systems[prompts.len() % LARGE_SYSTEM_PROMPTS].clone();
        locals.extend((SYSTEM_BLOCKS..length).map(|_| rng.next()));
        distinct += length - SYSTEM_BLOCKS;
        let hashes = sequence_hashes(&locals);
        prompts.push(Prompt { locals, hashes });
    }
    let placements: Vec<(WorkerId, usize)> = (0..prompts.len())
        .flat_map(|i| {
            let first = (i as u64) % LARGE_WORKERS;
            let second = (i % 4 == 0).then_some((first + 17) % LARGE_WORKERS);
            std::iter::once((first, i)).chain(second.map(|w| (w, i)))
        })
        .collect();
    let build: Vec<RouterEvent> = placements
        .iter()
        .flat_map(|&(worker, i)| stores(worker, &prompts[i], 0..prompts[i].locals.len(), 16))
        .collect();

    let before = resident_bytes();
    let mut index = KvIndex::new();
    let started = Instant::now();
    for e in &build {
        index.apply(e).expect("build event");
    }
    let took = started.elapsed();
    let after = resident_bytes();
    let nodes = index.block_count();
    let entries = index.stored_block_count();
    let heap = index.heap_bytes();
    let resident = after.saturating_sub(before);
    println!(
        "(e) build: {nodes} distinct blocks (tree nodes), {entries} (worker, block) entries, {} prompts of {SHORTEST}–{LONGEST} blocks over {} workers, in {:.0} ms",
        prompts.len(),
        index.workers().len(),
        took.as_secs_f64() * 1e3
    );
    println!(
        "(e) memory: RSS +{:.1} MiB = {:.1} B per distinct block, {:.1} B per (worker, block) entry; index heap (counted) {:.1} MiB = {:.1} B per distinct block, {:.1} B per entry",
        resident as f64 / (1 << 20) as f64,
        resident as f64 / nodes as f64,
        resident as f64 / entries as f64,
        heap as f64 / (1 << 20) as f64,
        heap as f64 / nodes as f64,
        heap as f64 / entries as f64
    );

    // Queries: 32–128 blocks (at most the prompt) of a known prompt; a quarter diverge part-way.
    let queries: Vec<Vec<LocalBlockHash>> = (0..8192)
        .map(|_| {
            let prompt = &prompts[rng.below(prompts.len())];
            let length = (SHORTEST + rng.below(LONGEST - SHORTEST + 1)).min(prompt.locals.len());
            let mut query = prompt.locals[..length].to_vec();
            if rng.below(4) == 0 {
                let cut = rng.below(length);
                for local in &mut query[cut..] {
                    *local = rng.next();
                }
            }
            query
        })
        .collect();
    let average_length = queries.iter().map(Vec::len).sum::<usize>() as f64 / queries.len() as f64;
    let mut latencies: Vec<Duration> = Vec::with_capacity(queries.len() * 25);
    let mut matched = 0u64;
    for _ in 0..25 {
        for query in &queries {
            let started = Instant::now();
            let scores = black_box(index.find_matches(black_box(query), false));
            latencies.push(started.elapsed());
            matched += u64::from(scores.scores.values().copied().max().unwrap_or(0));
        }
    }
    let calls = latencies.len();
    latencies.sort_unstable();
    println!(
        "(e) find_matches latency, {average_length:.0}-block queries on average, over {calls} calls: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, max {:.2} µs ({:.1} best-matched blocks/query)",
        micros(percentile(&latencies, 0.5)),
        micros(percentile(&latencies, 0.99)),
        micros(percentile(&latencies, 0.999)),
        micros(*latencies.last().unwrap_or(&Duration::ZERO)),
        matched as f64 / calls as f64
    );

    // The 80/20 mix at this size: a 4-block churn cycle (8 events) on a random placement, 2 queries.
    let cycles: Vec<Vec<RouterEvent>> = (0..8192)
        .map(|_| {
            let (worker, i) = placements[rng.below(placements.len())];
            let prompt = &prompts[i];
            let tail = prompt.locals.len() - 16..prompt.locals.len();
            let mut events = removals(worker, prompt, tail.clone(), 4);
            events.extend(stores(worker, prompt, tail, 4));
            events
        })
        .collect();
    let mut events = 0u64;
    let started = Instant::now();
    'events: loop {
        for cycle in &cycles {
            for e in cycle {
                black_box(index.apply(e)).ok();
            }
            events += cycle.len() as u64;
            if started.elapsed() > MEASURE {
                break 'events;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "(e) apply alone, 4-block events (stored/removed 50/50) on random placements: {:.2} M events/s, {:.0} ns/event",
        events as f64 / secs / 1e6,
        secs * 1e9 / events as f64
    );
    let mut ops = 0u64;
    let mut q = 0usize;
    let started = Instant::now();
    'outer: loop {
        for cycle in &cycles {
            for e in cycle {
                black_box(index.apply(e)).ok();
            }
            for _ in 0..2 {
                black_box(index.find_matches(&queries[q % queries.len()], false));
                q += 1;
            }
            ops += cycle.len() as u64 + 2;
            if started.elapsed() > MEASURE {
                break 'outer;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "(e) combined 80% events / 20% find_matches ({average_length:.0}-block queries), one thread, KvIndex at {} blocks: {:.2} M ops/s",
        index.block_count(),
        ops as f64 / secs / 1e6
    );
}
