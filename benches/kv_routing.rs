//! Routing quality: the same request traces replayed through four mocker engines behind the `kv`,
//! `round-robin` and `random` routers, in one run.
//!
//! `cargo bench --bench kv_routing` prints, per trace and router: TTFT p50/p99, end-to-end latency
//! p50/p99, throughput (requests/s and output tokens/s), and the prefix hit rate (prompt tokens the
//! engines found in their prefix cache / prompt tokens admitted, from the mocker's counters).
//!
//! Traces (seeded, so every router sees the same requests at the same times):
//! - `prefix-heavy`: multi-turn conversations; each turn's prompt is a shared system prompt (one of
//!   four) plus the whole conversation so far plus a new user turn. Conversations start as a Poisson
//!   process; each next turn is sent when the previous answer is complete (after a short think time).
//! - `shared-system-prompts`: many long system prompts (300 × 6144 tokens: more than one engine's KV
//!   cache holds, less than four engines' together), each request one of them picked uniformly plus a
//!   256-token question, 32-token answers, Poisson arrivals.
//! - `no-shared-prefix`: single requests with unrelated prompts of similar lengths, Poisson arrivals.
//!
//! Requests go through the in-process serving path (validator → router → engine → detokenizer), not
//! HTTP, so the numbers measure routing and the simulated engines rather than this machine's sockets.
//! Tunables: BENCH_CONVERSATIONS (160), BENCH_TURNS (6; more overflows the 8192-token context),
//! BENCH_RATE (conversations/s, 30), BENCH_FLAT_REQUESTS (600) and BENCH_FLAT_RATE (requests/s, 60) for
//! the no-shared-prefix trace, BENCH_PROMPTS (300), BENCH_PROMPT_REQUESTS (1500) and BENCH_PROMPT_RATE
//! (requests/s, 40) for the shared-system-prompts trace, BENCH_TRACES (comma list: only these), BENCH_SPEEDUP (mocker speedup ratio, 1.0), BENCH_GPU_BLOCKS (KV blocks per
//! engine, 16384 as the mocker's default), BENCH_OVERLAP_WEIGHT (the kv router's overlap weight, 1.0).

use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamix_actors::supervisor::RunningService;
use dynamix_actors::validator::{RequestContext, ValidateCompletion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BLOCK: usize = 64;
/// Shared system prompts: four of them, this many blocks each.
const SYSTEM_BLOCKS: usize = 16;
/// Each user turn adds this many blocks.
const USER_BLOCKS: usize = 16;
/// Tokens generated per request (and appended to the conversation as the assistant's answer).
const ANSWER_TOKENS: u32 = 128;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One conversation (or one lone request): its turns' prompts, in order, sent one after another.
struct Session {
    start: Duration,
    turns: Vec<Vec<u32>>,
    output_tokens: u32,
}

fn tokens(rng: &mut StdRng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.gen_range(300..40_000)).collect()
}

fn poisson_starts(rng: &mut StdRng, n: usize, rate: f64) -> Vec<Duration> {
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let u: f64 = rng.gen_range(f64::EPSILON..1.0);
            t += -u.ln() / rate;
            Duration::from_secs_f64(t)
        })
        .collect()
}

fn prefix_heavy(conversations: usize, turns: usize, rate: f64) -> Vec<Session> {
    let mut rng = StdRng::seed_from_u64(0xC0FFEE);
    let systems: Vec<Vec<u32>> = (0..4)
        .map(|_| tokens(&mut rng, SYSTEM_BLOCKS * BLOCK))
        .collect();
    let starts = poisson_starts(&mut rng, conversations, rate);
    starts
        .into_iter()
        .enumerate()
        .map(|(i, start)| {
            let mut history = systems[i % systems.len()].clone();
            let turns = (0..turns)
                .map(|_| {
                    history.extend(tokens(&mut rng, USER_BLOCKS * BLOCK));
                    let prompt = history.clone();
                    // The assistant's answer becomes part of the next turn's prompt.
                    history.extend(tokens(&mut rng, ANSWER_TOKENS as usize));
                    prompt
                })
                .collect();
            Session {
                start,
                turns,
                output_tokens: ANSWER_TOKENS,
            }
        })
        .collect()
}

/// Many long shared system prompts (one per agent or document), picked uniformly, each followed by a
/// short question of its own; short answers. Together the prompts are larger than one engine's KV
/// cache but fit in the cluster's: routing by prefix lets each engine keep its share cached.
fn shared_system_prompts(
    requests: usize,
    prompts: usize,
    prompt_blocks: usize,
    rate: f64,
) -> Vec<Session> {
    let mut rng = StdRng::seed_from_u64(0xA11CE);
    let systems: Vec<Vec<u32>> = (0..prompts)
        .map(|_| tokens(&mut rng, prompt_blocks * BLOCK))
        .collect();
    let starts = poisson_starts(&mut rng, requests, rate);
    starts
        .into_iter()
        .map(|start| {
            let mut prompt = systems[rng.gen_range(0..prompts)].clone();
            prompt.extend(tokens(&mut rng, 4 * BLOCK));
            Session {
                start,
                turns: vec![prompt],
                output_tokens: 32,
            }
        })
        .collect()
}

fn no_shared_prefix(requests: usize, mean_len: usize, rate: f64) -> Vec<Session> {
    let mut rng = StdRng::seed_from_u64(0xBEEF);
    let starts = poisson_starts(&mut rng, requests, rate);
    starts
        .into_iter()
        .map(|start| {
            let len = rng.gen_range(mean_len / 2..mean_len * 3 / 2);
            Session {
                start,
                turns: vec![tokens(&mut rng, len)],
                output_tokens: ANSWER_TOKENS,
            }
        })
        .collect()
}

#[derive(Default)]
struct Outcome {
    ttft: Vec<f64>,
    e2e: Vec<f64>,
    output_tokens: u64,
    prompt_tokens: u64,
    errors: u64,
}

async fn one_request(service: &RunningService, prompt: &[u32], max_tokens: u32, out: &mut Outcome) {
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct",
        "prompt": prompt,
        "max_tokens": max_tokens,
    })
    .to_string();
    let started = Instant::now();
    let validated = match service
        .gateway
        .validate_completion(ValidateCompletion {
            body: body.into(),
            context: RequestContext {
                request_id: uuid::Uuid::new_v4().to_string(),
                pinned_engine: None,
            },
        })
        .await
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("validation failed: {}", e.message);
            out.errors += 1;
            return;
        }
    };
    let mut generation = match service.gateway.generate(&validated).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("routing failed: {}", e.message);
            out.errors += 1;
            return;
        }
    };
    let mut first = None;
    while let Some(item) = generation.next().await {
        if item.is_err() {
            out.errors += 1;
            return;
        }
        first.get_or_insert_with(|| started.elapsed());
    }
    let usage = generation.usage();
    out.ttft
        .push(first.unwrap_or_else(|| started.elapsed()).as_secs_f64() * 1e3);
    out.e2e.push(started.elapsed().as_secs_f64() * 1e3);
    out.output_tokens += u64::from(usage.completion_tokens);
    out.prompt_tokens += u64::from(usage.prompt_tokens);
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank.min(values.len() - 1)]
}

struct Report {
    ttft_p50: f64,
    ttft_p99: f64,
    e2e_p50: f64,
    e2e_p99: f64,
    requests_per_s: f64,
    tokens_per_s: f64,
    hit_rate: f64,
    errors: u64,
}

fn replay(mode: &str, sessions: &[Session], speedup: f64, gpu_blocks: usize) -> Report {
    let weight = env_f64("BENCH_OVERLAP_WEIGHT", 1.0);
    let text = format!(
        "[http]\nhost = \"127.0.0.1\"\nport = 0\n[log]\nfilter = \"warn\"\n\
         [router]\nmode = \"{mode}\"\nseed = 1\nkv_overlap_score_weight = {weight}\n\
         [engine]\nkind = \"mocker\"\ndevices = [\"sim:0\", \"sim:1\", \"sim:2\", \"sim:3\"]\nadmission_capacity = 4096\n\
         [mocker]\nblock_size = {BLOCK}\nspeedup_ratio = {speedup}\nnum_gpu_blocks = {gpu_blocks}\n"
    );
    let path = std::env::temp_dir().join(format!("dynamix-kv-bench-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write config");
    let config =
        dynamix::config::load(Some(&path), &Vec::new, &Default::default()).expect("config");
    let _ = std::fs::remove_file(&path);

    actix_rt::System::new().block_on(async move {
        let service = Arc::new(dynamix::start(&config, false).await.expect("start"));
        let (admitted_before, cached_before) = prompt_token_totals(&service);
        let begin = Instant::now();
        let outcomes: Vec<_> = sessions
            .iter()
            .map(|session| {
                let service = service.clone();
                let turns = session.turns.clone();
                let start = session.start;
                let max_tokens = session.output_tokens;
                actix_rt::spawn(async move {
                    actix_rt::time::sleep_until((begin + start).into()).await;
                    let mut out = Outcome::default();
                    for prompt in &turns {
                        one_request(&service, prompt, max_tokens, &mut out).await;
                        // A short think time before the next turn.
                        actix_rt::time::sleep(Duration::from_millis(20)).await;
                    }
                    out
                })
            })
            .collect();
        let mut all = Outcome::default();
        for handle in outcomes {
            let out = handle.await.expect("session task");
            all.ttft.extend(out.ttft);
            all.e2e.extend(out.e2e);
            all.output_tokens += out.output_tokens;
            all.prompt_tokens += out.prompt_tokens;
            all.errors += out.errors;
        }
        let elapsed = begin.elapsed().as_secs_f64();
        let (admitted, cached) = prompt_token_totals(&service);
        let (admitted, cached) = (admitted - admitted_before, cached - cached_before);
        let requests = all.e2e.len() as f64;
        let report = Report {
            ttft_p50: percentile(&mut all.ttft, 50.0),
            ttft_p99: percentile(&mut all.ttft, 99.0),
            e2e_p50: percentile(&mut all.e2e, 50.0),
            e2e_p99: percentile(&mut all.e2e, 99.0),
            requests_per_s: requests / elapsed,
            tokens_per_s: all.output_tokens as f64 / elapsed,
            hit_rate: cached as f64 / admitted.max(1) as f64,
            errors: all.errors,
        };
        if let Ok(service) = Arc::try_unwrap(service) {
            service.shutdown().await;
        }
        report
    })
}

/// Prompt tokens the engines admitted and found in their prefix caches so far, summed over engines.
fn prompt_token_totals(service: &RunningService) -> (u64, u64) {
    service
        .engines
        .snapshot()
        .iter()
        .filter_map(|e| e.mocker.as_ref())
        .fold((0, 0), |(a, c), m| {
            (a + m.admitted_prompt_tokens(), c + m.cached_prompt_tokens())
        })
}

fn main() {
    let conversations = env_f64("BENCH_CONVERSATIONS", 160.0) as usize;
    let turns = env_f64("BENCH_TURNS", 6.0) as usize;
    let rate = env_f64("BENCH_RATE", 30.0);
    let flat_rate = env_f64("BENCH_FLAT_RATE", 60.0);
    let flat_requests = env_f64("BENCH_FLAT_REQUESTS", 600.0) as usize;
    let speedup = env_f64("BENCH_SPEEDUP", 1.0);
    let gpu_blocks = env_f64("BENCH_GPU_BLOCKS", 16384.0) as usize;
    let prompts = env_f64("BENCH_PROMPTS", 300.0) as usize;
    let prompt_requests = env_f64("BENCH_PROMPT_REQUESTS", 1500.0) as usize;
    let prompt_rate = env_f64("BENCH_PROMPT_RATE", 40.0);
    let traces = [
        ("prefix-heavy", prefix_heavy(conversations, turns, rate)),
        (
            "shared-system-prompts",
            shared_system_prompts(prompt_requests, prompts, 96, prompt_rate),
        ),
        (
            "no-shared-prefix",
            no_shared_prefix(flat_requests, 20 * BLOCK, flat_rate),
        ),
    ];
    println!(
        "kv_routing: 4 mocker engines ({gpu_blocks} KV blocks of {BLOCK} tokens, speedup {speedup}), {conversations} conversations × {turns} turns at {rate} conversations/s"
    );
    let only = std::env::var("BENCH_TRACES").ok();
    for (name, sessions) in &traces {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|t| t == *name))
        {
            continue;
        }
        let requests: usize = sessions.iter().map(|s| s.turns.len()).sum();
        let prompt_tokens: usize = sessions
            .iter()
            .flat_map(|s| s.turns.iter())
            .map(Vec::len)
            .sum();
        println!(
            "\ntrace {name}: {requests} requests, mean prompt {} tokens",
            prompt_tokens / requests.max(1)
        );
        println!(
            "{:<12} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>6}",
            "router",
            "TTFT p50",
            "TTFT p99",
            "E2E p50",
            "E2E p99",
            "req/s",
            "out tok/s",
            "hit rate",
            "errors"
        );
        let mut ttft = Vec::new();
        for mode in ["kv", "round-robin", "random"] {
            let r = replay(mode, sessions, speedup, gpu_blocks);
            println!(
                "{mode:<12} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>9.1} {:>10.0} {:>8.1}% {:>6}",
                r.ttft_p50,
                r.ttft_p99,
                r.e2e_p50,
                r.e2e_p99,
                r.requests_per_s,
                r.tokens_per_s,
                r.hit_rate * 100.0,
                r.errors
            );
            ttft.push(r.ttft_p50);
        }
        println!(
            "TTFT p50 round-robin / kv = {:.2}x, random / kv = {:.2}x",
            ttft[1] / ttft[0],
            ttft[2] / ttft[0]
        );
    }
}
