//! What crossing processes costs: the same echo requests served by one `dynamix serve` process and
//! by `dynamix frontend` + one `dynamix worker` (TCP request frame + ACK, call-home response stream,
//! etcd discovery, NATS events), on the same machine, driven by the same client.
//!
//! `cargo bench --bench distributed` prints, for each deployment (one process; frontend + worker on
//! the multiplexed request plane; the same worker behind a second frontend on Dynamo's plane):
//! 1. Sequential non-streaming chat requests (echo_full, 0 delay, a 16-character message): p50 / p99
//!    latency, requests/s, and the servers' CPU per request (frontend + worker, from /proc) — the
//!    per-request overhead of the request plane.
//! 2. Concurrent streams (BENCH_CONCURRENCY, default 16) of a 256-character message: characters
//!    (stream chunks) per second — the response stream's throughput — and the servers' CPU per chunk.
//!
//! It starts its own etcd and NATS (Debian `etcd-server`, `nats-server`). Tunables: BENCH_REQUESTS
//! (default 500), BENCH_STREAMS (default 64), BENCH_CONCURRENCY (16).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dynamix_actors::distributed::infra::{free_port, EtcdServer, NatsServer};
use futures_util::StreamExt;

mod common;
use common::env_usize;

const MODEL: &str = "SmolLM2-135M-Instruct";

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn dynamix(args: &[&str], env: &[(&str, String)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dynamix"));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .env("DYN_LOG", "warn")
        .env("DYN_TOKEN_ECHO_DELAY_MS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().expect("spawn dynamix")
}

async fn wait_ready(base: &str, workers: Option<usize>) {
    let client = awc::Client::default();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(mut res) = client.get(format!("{base}/health")).send().await {
            if let Ok(body) = res.json::<serde_json::Value>().await {
                let n = body["instances"].as_array().map(Vec::len).unwrap_or(0);
                if workers.map_or(n > 0, |w| n == w) {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "{base} never became ready");
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU time (user + system) the processes have used, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // Clock ticks are 100 a second on Linux's usual configuration (USER_HZ).
    const TICKS: f64 = 100.0;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
            Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / TICKS
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn unary(base: &str, requests: usize) -> (f64, f64, f64) {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "sixteen chars!!!"}],
    })
    .to_string();
    let mut latencies = Vec::with_capacity(requests);
    let started = Instant::now();
    for _ in 0..requests {
        let t = Instant::now();
        let mut res = client
            .post(format!("{base}/v1/chat/completions"))
            .insert_header(("content-type", "application/json"))
            .send_body(body.clone())
            .await
            .expect("request");
        assert_eq!(res.status().as_u16(), 200);
        let _ = res.body().await.expect("body");
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let rps = requests as f64 / started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        rps,
    )
}

/// Chunks per second, and chunks.
async fn streams(base: &str, total: usize, concurrency: usize) -> (f64, usize) {
    let text: String = (0..256)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "stream": true,
    })
    .to_string();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (base, body, next) = (base.to_string(), body.clone(), next.clone());
            async move {
                let client = awc::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .finish();
                let mut chunks = 0usize;
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    let mut res = client
                        .post(format!("{base}/v1/chat/completions"))
                        .insert_header(("content-type", "application/json"))
                        .send_body(body.clone())
                        .await
                        .expect("request");
                    let mut raw = Vec::new();
                    while let Some(chunk) = res.next().await {
                        raw.extend_from_slice(&chunk.expect("chunk"));
                    }
                    chunks += String::from_utf8_lossy(&raw)
                        .matches("\"content\":\"")
                        .count();
                }
                chunks
            }
        })
        .collect();
    let chunks: usize = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .sum();
    (chunks as f64 / started.elapsed().as_secs_f64(), chunks)
}

fn main() {
    let requests = env_usize("BENCH_REQUESTS", 500);
    let total_streams = env_usize("BENCH_STREAMS", 64);
    let concurrency = env_usize("BENCH_CONCURRENCY", 16);
    let etcd = EtcdServer::start().expect("etcd");
    let nats = NatsServer::start().expect("nats-server");
    let infra_env = vec![("ETCD_ENDPOINTS", etcd.url()), ("NATS_SERVER", nats.url())];

    let (single_port, frontend_port, dynamo_port) = (
        free_port().to_string(),
        free_port().to_string(),
        free_port().to_string(),
    );
    let mut dynamo_env = infra_env.clone();
    dynamo_env.push(("DYN_DISTRIBUTED__REQUEST_PLANE_PROTOCOL", "dynamo".into()));
    let procs = Killed(vec![
        dynamix(
            &[
                "serve",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                &single_port,
                "--no-embeddings",
                "out=echo_full",
            ],
            &[],
        ),
        dynamix(
            &[
                "frontend",
                "--config",
                "configs/frontend.toml",
                "--router-mode",
                "round-robin",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                &frontend_port,
            ],
            &infra_env,
        ),
        dynamix(
            &["worker", "--config", "configs/worker.toml", "out=echo_full"],
            &infra_env,
        ),
        dynamix(
            &[
                "frontend",
                "--config",
                "configs/frontend.toml",
                "--router-mode",
                "round-robin",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                &dynamo_port,
            ],
            &dynamo_env,
        ),
    ]);
    let pid = |i: usize| procs.0[i].id();
    let single = format!("http://127.0.0.1:{single_port}");
    let split = format!("http://127.0.0.1:{frontend_port}");
    let dynamo = format!("http://127.0.0.1:{dynamo_port}");
    let deployments = [
        ("one process", single.clone(), vec![pid(0)]),
        ("frontend+worker, mux", split.clone(), vec![pid(1), pid(2)]),
        (
            "frontend+worker, dynamo",
            dynamo.clone(),
            vec![pid(3), pid(2)],
        ),
    ];
    actix_rt::System::new().block_on(async move {
        for (_, base, pids) in &deployments {
            wait_ready(base, (pids.len() > 1).then_some(1)).await;
            // Warm up (connections, tokenizer caches).
            let _ = unary(base, 20).await;
        }
        println!("deployment                unary p50   unary p99  unary req/s  CPU µs/req   stream chunks/s (c={concurrency})  CPU µs/chunk");
        for (name, base, pids) in &deployments {
            let cpu = cpu_seconds(pids);
            let (p50, p99, rps) = unary(base, requests).await;
            let per_request = (cpu_seconds(pids) - cpu) / requests as f64 * 1e6;
            let cpu = cpu_seconds(pids);
            let (cps, chunks) = streams(base, total_streams, concurrency).await;
            let per_chunk = (cpu_seconds(pids) - cpu) / chunks.max(1) as f64 * 1e6;
            println!(
                "{name:<25} {p50:>6.2} ms {p99:>8.2} ms {rps:>12.0} {per_request:>11.1} {cps:>26.0} {per_chunk:>13.2}"
            );
        }
    });
}
