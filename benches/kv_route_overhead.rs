//! Router overhead (issue 21, item 5): the time the `kv` policy takes to decide where a 32,768-token
//! prompt goes, hashing included, per call.
//!
//! `cargo bench --bench kv_route_overhead` runs, at block sizes 16 and 64:
//! - the real decision, `KvPolicy::order` as the router calls it (block hashing, `find_matches` on the
//!   shared index, active-sequence load per engine, cost and softmax selection, the fallback order, and
//!   the `dynamo_router_overhead_*` observations into a real `FrontendMetrics`), timed per call; each
//!   decision is then admitted on the chosen engine, reaches its first token, and is freed 32
//!   decisions later, so every engine carries active sequences as in a loaded router;
//! - the same decision phase by phase through the public pieces (`local_block_hashes` +
//!   `sequence_hashes`, `SharedKvIndex::find_matches`, `ActiveSequences::potential_blocks_and_tokens`
//!   + `selector::select`), each timed per call;
//! - what `/metrics` saw: the share of `dynamo_router_overhead_*_ms` observations at or below its
//!   0.05 ms bucket.
//!
//! The index: 8 engines; 32 documents of 32,768 tokens, each held in part (a quarter, a half, three
//! quarters, all) by four engines, plus unrelated 64–128-block prompts up to about 200k blocks. Each
//! request is one document's first 0–100% (uniform, in blocks) followed by tokens of its own. Prints
//! numbers; asserts nothing.

// The server's allocator (mimalloc, set in the `dynamix` library), so allocation costs are the server's.
extern crate dynamix;

use std::collections::{HashMap, VecDeque};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler};
use dynamix_actors::engine::{EngineLoad, Generate, RequestStage};
use dynamix_actors::kv::active::ActiveSequences;
use dynamix_actors::kv::hashing::{local_block_hashes, sequence_hashes, LocalBlockHash};
use dynamix_actors::kv::indexer::SharedKvIndex;
use dynamix_actors::kv::protocol::{
    KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent,
};
use dynamix_actors::kv::selector::{select, WorkerState};
use dynamix_actors::metrics::FrontendMetrics;
use dynamix_actors::protocol::engine::EngineRequest;
use dynamix_actors::router::kv::KvPolicy;
use dynamix_actors::router::policy::SelectionPolicy;
use dynamix_actors::router::{EngineSlot, RouterConfig, RouterMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PROMPT_TOKENS: usize = 32_768;
const ENGINES: u64 = 8;
const DOCUMENTS: usize = 32;
const BACKGROUND_BLOCKS: usize = 200_000;
/// Decisions still active (admitted, not finished) at any time, over all engines.
const IN_FLIGHT: usize = 32;
const REQUESTS: usize = 128;
const DECISIONS: usize = 10_000;
/// The goal for the whole decision, p99.
const GOAL: Duration = Duration::from_micros(50);

/// Receives nothing: the policy only needs engine ids.
struct Nowhere;

impl Actor for Nowhere {
    type Context = Context<Self>;
}

impl Handler<Generate> for Nowhere {
    type Result = ();
    fn handle(&mut self, _: Generate, _: &mut Context<Self>) {}
}

fn tokens(rng: &mut StdRng, count: usize) -> Vec<u32> {
    (0..count).map(|_| rng.gen_range(0..128_000)).collect()
}

/// `engine` announces the full blocks of `tokens` (one stored event, as a prefill's would be).
fn holds(index: &SharedKvIndex, engine: u64, tokens: &[u32], block_size: usize) {
    let locals = local_block_hashes(tokens, block_size);
    let blocks = locals
        .iter()
        .zip(sequence_hashes(&locals))
        .map(|(&local, hash)| KvCacheStoredBlockData {
            block_hash: hash,
            tokens_hash: local,
        })
        .collect();
    index
        .apply(&RouterEvent {
            worker_id: engine,
            event: KvCacheEvent {
                event_id: 0,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: None,
                    blocks,
                }),
                dp_rank: 0,
            },
        })
        .expect("stored event applies");
}

struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

fn percentiles(samples: &mut [Duration]) -> Percentiles {
    samples.sort_unstable();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    Percentiles {
        p50: micros(at(0.5)),
        p99: micros(at(0.99)),
        max: micros(samples[samples.len() - 1]),
    }
}

fn print_row(label: &str, samples: &mut [Duration]) {
    let p = percentiles(samples);
    println!(
        "  {label:<44} p50 {:>7.2} µs  p99 {:>7.2} µs  max {:>8.2} µs",
        p.p50, p.p99, p.max
    );
}

/// The router-overhead histograms, by phase, as `/metrics` names them.
const HISTOGRAMS: [&str; 4] = [
    "dynamo_router_overhead_block_hashing_ms",
    "dynamo_router_overhead_indexer_find_matches_ms",
    "dynamo_router_overhead_scheduling_ms",
    "dynamo_router_overhead_total_ms",
];

/// The share of a histogram's observations at or below 0.05 ms, and its count.
fn under_goal(metrics: &FrontendMetrics, name: &str) -> (f64, u64) {
    for family in metrics.registry().gather() {
        if family.name() != name {
            continue;
        }
        let (mut under, mut count) = (0u64, 0u64);
        for metric in family.get_metric() {
            let histogram = metric.get_histogram();
            count += histogram.get_sample_count();
            under += histogram
                .get_bucket()
                .iter()
                .find(|b| (b.upper_bound() - 0.05).abs() < 1e-12)
                .map_or(0, |b| b.cumulative_count());
        }
        return (under as f64 / count.max(1) as f64, count);
    }
    (f64::NAN, 0)
}

struct Setup {
    index: SharedKvIndex,
    requests: Vec<EngineRequest>,
}

fn setup(block_size: usize, rng: &mut StdRng) -> Setup {
    let index = SharedKvIndex::new();
    let documents: Vec<Vec<u32>> = (0..DOCUMENTS).map(|_| tokens(rng, PROMPT_TOKENS)).collect();
    for (d, document) in documents.iter().enumerate() {
        for k in 0..4u64 {
            let engine = 1 + (d as u64 + k) % ENGINES;
            let length = PROMPT_TOKENS * (k as usize + 1) / 4;
            holds(&index, engine, &document[..length], block_size);
        }
    }
    while index.block_count() < BACKGROUND_BLOCKS {
        let length = rng.gen_range(64..=128) * block_size;
        holds(
            &index,
            rng.gen_range(1..=ENGINES),
            &tokens(rng, length),
            block_size,
        );
    }
    let requests = (0..REQUESTS)
        .map(|_| {
            let document = &documents[rng.gen_range(0..DOCUMENTS)];
            let shared = rng.gen_range(0..=PROMPT_TOKENS / block_size) * block_size;
            let mut token_ids = document[..shared].to_vec();
            token_ids.extend(tokens(rng, PROMPT_TOKENS - shared));
            EngineRequest {
                request_id: String::new(),
                model: "m".into(),
                token_ids,
                echo_text: String::new(),
                sampling: Default::default(),
                stop: Default::default(),
                pinned_engine: None,
                resumed_outputs: 0,
            }
        })
        .collect();
    Setup { index, requests }
}

/// The real path: `KvPolicy::order`, then admission, first token and (later) the end of the request.
fn through_policy(block_size: usize, setup: &mut Setup, slots: &[EngineSlot]) {
    let config = RouterConfig {
        mode: RouterMode::Kv,
        seed: Some(7),
        kv_cache_block_size: Some(block_size),
        ..RouterConfig::default()
    };
    let metrics = Arc::new(FrontendMetrics::new("", &HashMap::new()).expect("metrics"));
    let mut policy = KvPolicy::new(
        &config,
        block_size,
        slots,
        setup.index.clone(),
        Some(metrics.clone()),
    );
    let mut in_flight: VecDeque<(u64, String)> = VecDeque::new();
    let mut samples = Vec::with_capacity(DECISIONS);
    let mut chosen_count: HashMap<u64, usize> = HashMap::new();
    for i in 0..DECISIONS {
        let request = &mut setup.requests[i % REQUESTS];
        request.request_id = format!("r{i}");
        let started = Instant::now();
        let order = black_box(policy.order(slots, request));
        samples.push(started.elapsed());
        let engine = &slots[order[0]];
        *chosen_count.entry(engine.id).or_default() += 1;
        policy.admitted(engine, &request.request_id);
        policy.progress(engine.id, &request.request_id, RequestStage::FirstToken);
        in_flight.push_back((engine.id, request.request_id.clone()));
        if in_flight.len() > IN_FLIGHT {
            if let Some((engine, id)) = in_flight.pop_front() {
                policy.progress(engine, &id, RequestStage::Finished);
            }
        }
    }
    let mut spread: Vec<(u64, usize)> = chosen_count.into_iter().collect();
    spread.sort_unstable();
    println!(
        "block size {block_size}: {} blocks per prompt, index {} blocks over {} engines, {IN_FLIGHT} requests in flight; chosen {spread:?}",
        PROMPT_TOKENS / block_size,
        setup.index.block_count(),
        setup.index.workers().len()
    );
    print_row("KvPolicy::order (whole decision)", &mut samples);
    let p99 = percentiles(&mut samples).p99;
    println!(
        "  goal p99 < {} µs: {}",
        GOAL.as_micros(),
        if p99 < GOAL.as_secs_f64() * 1e6 {
            "met"
        } else {
            "NOT met"
        }
    );
    for name in HISTOGRAMS {
        let (share, count) = under_goal(&metrics, name);
        println!(
            "  /metrics {name:<48} {:>6.2}% of {count} at ≤ 0.05 ms",
            share * 100.0
        );
    }
}

/// The same decision through the public pieces, each phase timed on its own.
fn by_phase(block_size: usize, setup: &Setup) {
    let index = &setup.index;
    let mut active: Vec<ActiveSequences> = (0..ENGINES)
        .map(|_| ActiveSequences::new(block_size))
        .collect();
    let mut rng = StdRng::seed_from_u64(7);
    let mut in_flight: VecDeque<(usize, String)> = VecDeque::new();
    let [mut local_hashing, mut chaining, mut hashing, mut matching, mut selecting, mut total]: [Vec<Duration>; 6] =
        std::array::from_fn(|_| Vec::with_capacity(DECISIONS));
    for i in 0..DECISIONS {
        let request = &setup.requests[i % REQUESTS];
        let started = Instant::now();
        let locals: Vec<LocalBlockHash> = local_block_hashes(&request.token_ids, block_size);
        let local_hashed = Instant::now();
        let sequence = sequence_hashes(&locals);
        let hashed = Instant::now();
        let scores = index.find_matches(&locals, false);
        let matched = Instant::now();
        let isl = request.token_ids.len();
        let states: Vec<WorkerState> = (0..ENGINES)
            .map(|e| {
                let worker = e + 1;
                let overlap = scores.score(worker);
                let (potential_blocks, potential_tokens) =
                    active[e as usize].potential_blocks_and_tokens(&sequence, isl, overlap);
                WorkerState {
                    worker,
                    potential_blocks,
                    potential_tokens,
                }
            })
            .collect();
        let chosen = select(&states, &scores, isl, block_size, 1.0, 0.0, &mut rng);
        let done = Instant::now();
        local_hashing.push(local_hashed - started);
        chaining.push(hashed - local_hashed);
        hashing.push(hashed - started);
        matching.push(matched - hashed);
        selecting.push(done - matched);
        total.push(done - started);

        let Some(chosen) = chosen else { continue };
        let engine = (chosen.worker - 1) as usize;
        let id = format!("r{i}");
        let overlap = scores.score(chosen.worker);
        active[engine]
            .add_request(&id, sequence, isl, overlap, Instant::now())
            .expect("fresh request id");
        active[engine].mark_prefill_completed(&id);
        in_flight.push_back((engine, id));
        if in_flight.len() > IN_FLIGHT {
            if let Some((engine, id)) = in_flight.pop_front() {
                active[engine].free(&id);
            }
        }
    }
    println!("  by phase (public pieces, same trace):");
    print_row("hashing: local block hashes", &mut local_hashing);
    print_row("hashing: sequence hashes", &mut chaining);
    print_row("hashing (local + sequence hashes)", &mut hashing);
    print_row("find_matches (SharedKvIndex)", &mut matching);
    print_row(
        "selection (active load per engine + select)",
        &mut selecting,
    );
    print_row("sum of the phases", &mut total);
}

fn main() {
    // Tails on a shared 2-core machine depend on what else runs; say so next to the numbers.
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    actix_rt::System::new().block_on(async {
        let addr = Nowhere.start().recipient();
        let slots: Vec<EngineSlot> = (1..=ENGINES)
            .map(|id| EngineSlot {
                id,
                addr: addr.clone(),
                direct: None,
                load: Arc::new(EngineLoad::default()),
                capacity: 1024,
                device: format!("sim:{id}"),
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(2024);
        for block_size in [16, 64] {
            let mut setup = setup(block_size, &mut rng);
            through_policy(block_size, &mut setup, &slots);
            by_phase(block_size, &setup);
        }
    });
}
