//! dynamix and NVIDIA Dynamo 1.6.1 in one deployment, with real Dynamo processes
//! (tests/common/dynamo.rs): etcd, NATS, `python -m dynamo.mocker` / `python -m dynamo.frontend`
//! and the `dynamix` binary, all on loopback with the interop profile (etcd discovery, TCP request
//! plane, NATS event plane). Every test skips when PyPI is unreachable (Dynamo cannot be
//! installed).
//!
//! The same scenarios run for three pairings: Dynamo with Dynamo (the baseline: proves the harness
//! and what each check expects), direction F (a `dynamix frontend` serving Dynamo mockers) and
//! direction W (a Dynamo frontend serving `dynamix` workers); the mixed tests put one worker of
//! each kind behind each frontend.

mod common;

use std::cell::Cell;
use std::time::{Duration, Instant};

use common::dynamo::{
    chat_request, stream_chat, stream_chat_then_disconnect, stream_chat_with_progress, Cluster,
    ClusterProcess, DynamoEnv, DEFAULT_ENDPOINT, MOCK_MODEL,
};
use common::post_json;
use serde_json::{json, Value};

/// How long a deployment may take to register its workers and list the model (Python start-up,
/// discovery, the frontend fetching the model card's files).
const READY: Duration = Duration::from_secs(90);

/// Generous bounds for things that take milliseconds when they work.
const SETTLE: Duration = Duration::from_secs(20);

/// Mocker speed for tests that do not act mid-stream (~0.1 ms a token).
const FAST: f64 = 100.0;

/// Mocker speed for tests that act mid-stream: 5-10 ms a token, so a few hundred tokens last
/// seconds.
const SLOW: f64 = 1.0;

/// How long a worker's KV events are given to reach a KV router (they take milliseconds).
const KV_EVENTS_PROPAGATION: Duration = Duration::from_secs(1);

/// The block size of both mockers (Dynamo's default in vLLM mode; configs/worker.toml).
const BLOCK_SIZE: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Dynamo,
    Dynamix,
}

/// A frontend and its workers on one [`Cluster`]. Fields drop in order: the processes are killed
/// before etcd and NATS.
struct Deployment {
    frontend: ClusterProcess,
    workers: Vec<(Side, ClusterProcess)>,
    frontend_side: Side,
    /// etcd, NATS and the log directory: only held, and dropped after the processes.
    _cluster: Cluster,
}

/// How a [`Deployment`] is started.
struct Plan<'a> {
    frontend: Side,
    workers: &'a [Side],
    speedup: f64,
    router_mode: &'a str,
    migration_limit: u32,
}

impl Plan<'_> {
    /// `None` when Dynamo cannot be installed (the test skips).
    async fn start(&self) -> Option<Deployment> {
        let dynamo = DynamoEnv::ensure()?;
        let cluster = Cluster::start(&dynamo);
        let mut workers: Vec<(Side, ClusterProcess)> = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, side)| {
                let process = match side {
                    Side::Dynamo => {
                        cluster.mocker(&format!("dynamo-mocker-{i}"), self.speedup, &[])
                    }
                    Side::Dynamix => {
                        cluster.dynamix_worker(&format!("dynamix-worker-{i}"), self.speedup, &[])
                    }
                };
                (*side, process)
            })
            .collect();
        let limit = self.migration_limit.to_string();
        let mut frontend = match self.frontend {
            Side::Dynamo => cluster.dynamo_frontend(
                "dynamo-frontend",
                self.router_mode,
                &["--migration-limit", &limit],
            ),
            Side::Dynamix => cluster.dynamix_frontend(
                "dynamix-frontend",
                &[
                    "--router-mode",
                    self.router_mode,
                    "--migration-limit",
                    &limit,
                ],
            ),
        };
        let mut watched: Vec<&mut ClusterProcess> = workers.iter_mut().map(|(_, p)| p).collect();
        cluster
            .wait_workers(DEFAULT_ENDPOINT, self.workers.len(), &mut watched, READY)
            .await;
        frontend.wait_model(MOCK_MODEL, &mut watched, READY).await;
        frontend
            .wait_health_instances(self.workers.len(), READY)
            .await;
        Some(Deployment {
            frontend,
            workers,
            frontend_side: self.frontend,
            _cluster: cluster,
        })
    }
}

impl Deployment {
    fn base(&self) -> String {
        self.frontend.base().to_string()
    }

    fn chat_url(&self) -> String {
        self.frontend.url("/v1/chat/completions")
    }

    /// A unary chat completion of exactly `max_tokens` tokens; fails the test otherwise.
    async fn unary(&self, content: &str, max_tokens: u32) -> Value {
        let (status, body) =
            post_json(&self.chat_url(), &chat_request(content, max_tokens, false)).await;
        assert!(
            status == 200
                && body["usage"]["completion_tokens"] == max_tokens
                && body["choices"][0]["finish_reason"] == "length",
            "unary chat completion ({max_tokens} tokens) through {:?}'s frontend: {status} {body}",
            self.frontend_side
        );
        body
    }

    /// Requests served so far by the Dynamo mocker `worker` (its own counter).
    async fn mocker_requests(&self, worker: usize) -> f64 {
        let (side, process) = &self.workers[worker];
        assert_eq!(
            *side,
            Side::Dynamo,
            "only mockers expose per-worker counters"
        );
        process
            .metric(
                "dynamo_component_requests_total",
                &[("dynamo_endpoint", "generate")],
            )
            .await
    }
}

fn single(frontend: Side, worker: Side, speedup: f64) -> Plan<'static> {
    Plan {
        frontend,
        workers: match worker {
            Side::Dynamo => &[Side::Dynamo],
            Side::Dynamix => &[Side::Dynamix],
        },
        speedup,
        router_mode: "round-robin",
        migration_limit: 0,
    }
}

// ---- the scenarios, each for any pairing ----

async fn unary_scenario(frontend: Side, worker: Side) {
    let Some(d) = single(frontend, worker, FAST).start().await else {
        return;
    };
    d.unary("Hello there, how are you?", 8).await;
    let body = d
        .unary("The quick brown fox jumps over the lazy dog.", 33)
        .await;
    assert!(
        body["usage"]["prompt_tokens"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "usage counts the prompt: {body}"
    );
}

async fn streaming_scenario(frontend: Side, worker: Side) {
    let Some(d) = single(frontend, worker, FAST).start().await else {
        return;
    };
    for max_tokens in [1, 16] {
        let stream = stream_chat(&d.base(), &chat_request("Hello there", max_tokens, true)).await;
        assert!(
            stream.is_complete(u64::from(max_tokens)),
            "a {max_tokens}-token stream through {frontend:?}'s frontend from a {worker:?} worker: \
             {stream:?}"
        );
    }
}

/// The client goes away mid-stream: the frontend forgets the request and the worker stops
/// generating (it does not run on to max_tokens).
async fn disconnect_scenario(frontend: Side, worker: Side) {
    let Some(mut d) = single(frontend, worker, SLOW).start().await else {
        return;
    };
    // ~10 s of tokens if nothing stopped it.
    let max_tokens = 1000;
    let cut =
        stream_chat_then_disconnect(&d.base(), &chat_request("Hello there", max_tokens, true), 5)
            .await;
    assert_eq!(cut.status, 200, "{cut:?}");
    d.frontend
        .wait_metric(
            "dynamo_frontend_inflight_requests",
            &[("model", MOCK_MODEL)],
            SETTLE,
            |v| v == 0.0,
        )
        .await;
    let (side, process) = &mut d.workers[0];
    match side {
        Side::Dynamo => {
            let labels = [("dynamo_endpoint", "generate")];
            process
                .wait_metric("dynamo_component_inflight_requests", &labels, SETTLE, |v| {
                    v == 0.0
                })
                .await;
            // One inter-token latency per token after the first.
            let generated = process
                .metric("vllm:inter_token_latency_seconds_count", &[])
                .await;
            assert!(
                generated < f64::from(max_tokens - 1),
                "the mocker generated {generated} tokens after its client left at 5 frames"
            );
        }
        Side::Dynamix => {
            process
                .wait_log(
                    &[
                        "stopped by the requester",
                        "killed by the requester",
                        "requester closed the response stream",
                        "response stream broke",
                    ],
                    SETTLE,
                )
                .await;
        }
    }
}

/// Two workers; one is SIGKILLed while every stream is under way. Every stream still completes
/// with all its tokens, through migration.
async fn migration_scenario(frontend: Side, workers: &[Side]) {
    let plan = Plan {
        frontend,
        workers,
        speedup: SLOW,
        router_mode: "round-robin",
        migration_limit: 3,
    };
    let Some(mut d) = plan.start().await else {
        return;
    };
    // ~3 s a stream; round-robin puts two on each worker.
    let max_tokens = 300;
    let base = d.base();
    let progress: Vec<Cell<usize>> = (0..4).map(|_| Cell::new(0)).collect();
    let streams = futures_util::future::join_all(progress.iter().enumerate().map(|(i, p)| {
        let body = chat_request(&format!("Stream number {i}, hello there"), max_tokens, true);
        let base = base.clone();
        async move { stream_chat_with_progress(&base, &body, p).await }
    }));
    let victim = &mut d.workers[0].1;
    let killer = async {
        let deadline = Instant::now() + SETTLE;
        while progress.iter().any(|p| p.get() < 5) {
            assert!(
                Instant::now() < deadline,
                "the streams did not get under way: {:?}",
                progress.iter().map(Cell::get).collect::<Vec<_>>()
            );
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        victim.kill();
    };
    let (results, ()) = tokio::join!(streams, killer);
    for (i, stream) in results.iter().enumerate() {
        assert!(
            stream.is_complete(u64::from(max_tokens)),
            "stream {i} after a worker was killed mid-stream: {stream:?}"
        );
    }
    let migrations = d
        .frontend
        .metric("dynamo_frontend_model_migration_total", &[])
        .await;
    assert!(
        migrations >= 1.0,
        "the killed worker's streams were migrated (dynamo_frontend_model_migration_total = \
         {migrations})"
    );
}

/// Two workers behind a KV-aware frontend. A long prompt is sent once, then again: the repeat must
/// go to the worker that has the prompt cached, which the frontend counts in
/// `dynamo_frontend_cached_tokens`. Fresh prompts in pairs tell KV routing from luck: round-robin
/// would send every repeat to the other worker, where nothing is cached.
async fn kv_routing_scenario(frontend: Side, workers: &[Side]) {
    let plan = Plan {
        frontend,
        workers,
        speedup: FAST,
        router_mode: "kv",
        migration_limit: 0,
    };
    let Some(mut d) = plan.start().await else {
        return;
    };
    let labels = [("model", MOCK_MODEL)];
    for pair in 0..3 {
        let prompt: String = (0..100).map(|i| format!("item {pair}-{i}, ")).collect();
        let first = d.unary(&prompt, 4).await;
        let prompt_tokens = first["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        assert!(
            prompt_tokens >= 4 * BLOCK_SIZE,
            "the prompt spans at least 4 blocks of {BLOCK_SIZE}: {first}"
        );
        // The worker's KV events reach the router over NATS (milliseconds on loopback); until
        // they do, the repeat would be routed by load alone.
        actix_rt::time::sleep(KV_EVENTS_PROPAGATION).await;
        let before = d
            .frontend
            .metric("dynamo_frontend_cached_tokens_sum", &labels)
            .await;
        d.unary(&prompt, 4).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let after = d
                .frontend
                .metric("dynamo_frontend_cached_tokens_sum", &labels)
                .await;
            if after - before >= (4 * BLOCK_SIZE) as f64 {
                break;
            }
            if Instant::now() >= deadline {
                d.frontend.fail(&format!(
                    "{frontend:?}'s frontend routed the repeat of {prompt_tokens}-token prompt \
                     {pair} without a cache hit of 4 blocks (dynamo_frontend_cached_tokens_sum \
                     went from {before} to {after}): the repeat did not go to the worker that \
                     served it first"
                ));
            }
            d.frontend.assert_running("checking cached tokens");
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One dynamix worker and one Dynamo mocker behind `frontend`: unary and streaming requests all
/// succeed, and both workers serve some (the mocker counts its own; the rest went to dynamix).
async fn mixed_scenario(frontend: Side) {
    let plan = Plan {
        frontend,
        workers: &[Side::Dynamix, Side::Dynamo],
        speedup: FAST,
        router_mode: "round-robin",
        migration_limit: 0,
    };
    let Some(d) = plan.start().await else {
        return;
    };
    let mut sent = 0;
    loop {
        if sent % 2 == 0 {
            d.unary("Hello there, how are you?", 8).await;
        } else {
            let stream = stream_chat(&d.base(), &chat_request("Hello there", 8, true)).await;
            assert!(stream.is_complete(8), "stream {sent}: {stream:?}");
        }
        sent += 1;
        let by_mocker = d.mocker_requests(1).await;
        if sent >= 6 && by_mocker > 0.0 && by_mocker < f64::from(sent) {
            break;
        }
        assert!(
            sent < 20,
            "after {sent} requests through {frontend:?}'s frontend the Dynamo mocker served \
             {by_mocker} and the dynamix worker {} (both should serve some)",
            f64::from(sent) - by_mocker
        );
    }
}

// ---- the harness itself, and the Dynamo-only baselines ----

/// The harness itself: a Dynamo frontend serving a Dynamo mocker, unary and streaming.
#[actix_rt::test]
async fn dynamo_frontend_serves_dynamo_mocker() {
    let Some(d) = single(Side::Dynamo, Side::Dynamo, FAST).start().await else {
        return;
    };
    d.unary("Hello there, how are you?", 8).await;
    let stream = stream_chat(&d.base(), &chat_request("Hello there", 8, true)).await;
    assert!(
        stream.is_complete(8),
        "streaming chat completion: {stream:?}"
    );
    // Where the harness's expectations come from: the frontend and the mocker both count it.
    assert!(d.mocker_requests(0).await >= 2.0);
}

#[actix_rt::test]
async fn dynamo_frontend_client_disconnect_stops_dynamo_mocker() {
    disconnect_scenario(Side::Dynamo, Side::Dynamo).await;
}

#[actix_rt::test]
async fn dynamo_frontend_migrates_when_dynamo_mocker_is_killed() {
    migration_scenario(Side::Dynamo, &[Side::Dynamo, Side::Dynamo]).await;
}

#[actix_rt::test]
async fn dynamo_frontend_kv_routes_across_dynamo_mockers() {
    kv_routing_scenario(Side::Dynamo, &[Side::Dynamo, Side::Dynamo]).await;
}

// ---- direction F: a dynamix frontend serving Dynamo mockers ----

#[actix_rt::test]
async fn dynamix_frontend_serves_dynamo_mocker_unary() {
    unary_scenario(Side::Dynamix, Side::Dynamo).await;
}

#[actix_rt::test]
async fn dynamix_frontend_serves_dynamo_mocker_streaming() {
    streaming_scenario(Side::Dynamix, Side::Dynamo).await;
}

#[actix_rt::test]
async fn dynamix_frontend_client_disconnect_stops_dynamo_mocker() {
    disconnect_scenario(Side::Dynamix, Side::Dynamo).await;
}

#[actix_rt::test]
async fn dynamix_frontend_migrates_when_dynamo_mocker_is_killed() {
    migration_scenario(Side::Dynamix, &[Side::Dynamo, Side::Dynamo]).await;
}

#[actix_rt::test]
async fn dynamix_frontend_kv_routes_across_dynamo_mockers() {
    kv_routing_scenario(Side::Dynamix, &[Side::Dynamo, Side::Dynamo]).await;
}

#[actix_rt::test]
async fn dynamix_frontend_serves_mixed_workers() {
    mixed_scenario(Side::Dynamix).await;
}

// ---- direction W: a Dynamo frontend serving dynamix workers ----

#[actix_rt::test]
async fn dynamo_frontend_serves_dynamix_worker_unary() {
    unary_scenario(Side::Dynamo, Side::Dynamix).await;
}

#[actix_rt::test]
async fn dynamo_frontend_serves_dynamix_worker_streaming() {
    streaming_scenario(Side::Dynamo, Side::Dynamix).await;
}

#[actix_rt::test]
async fn dynamo_frontend_client_disconnect_stops_dynamix_worker() {
    disconnect_scenario(Side::Dynamo, Side::Dynamix).await;
}

#[actix_rt::test]
async fn dynamo_frontend_migrates_when_dynamix_worker_is_killed() {
    migration_scenario(Side::Dynamo, &[Side::Dynamix, Side::Dynamix]).await;
}

#[actix_rt::test]
async fn dynamo_frontend_kv_routes_across_dynamix_workers() {
    kv_routing_scenario(Side::Dynamo, &[Side::Dynamix, Side::Dynamix]).await;
}

#[actix_rt::test]
async fn dynamo_frontend_serves_mixed_workers() {
    mixed_scenario(Side::Dynamo).await;
}

/// A dynamix worker on "another machine": no `--model-path`, so its card is its own tokenizer
/// (SmolLM2's, exported as Hugging Face files) and, with `DYN_SYSTEM_PORT`, the card names URLs on
/// the worker's system server instead of local paths. A Dynamo frontend fetches the files over
/// HTTP, checks their blake3 sums, loads the exported tokenizer and serves the model.
#[actix_rt::test]
async fn dynamo_frontend_fetches_a_dynamix_workers_card_over_http() {
    use dynamix_actors::distributed::{discovery, DistributedConfig};

    let Some(dynamo) = DynamoEnv::ensure() else {
        return;
    };
    let cluster = Cluster::start(&dynamo);
    let system_port = dynamix_actors::distributed::infra::free_port().to_string();
    let mut worker = cluster.dynamix(
        "dynamix-worker",
        &[
            format!("in={DEFAULT_ENDPOINT}"),
            "out=mocker".into(),
            "--config".into(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/configs/worker.toml").into(),
            "--model-name".into(),
            MOCK_MODEL.into(),
        ],
        &[
            ("DYN_SYSTEM_PORT", &system_port),
            ("DYN_MOCKER__SPEEDUP_RATIO", "100"),
        ],
        None,
    );
    let mut frontend = cluster.dynamo_frontend("dynamo-frontend", "round-robin", &[]);
    cluster
        .wait_workers(DEFAULT_ENDPOINT, 1, &mut [&mut worker], READY)
        .await;
    let config = DistributedConfig {
        etcd_endpoints: vec![cluster.etcd.url()],
        ..DistributedConfig::default()
    };
    let cards = discovery::list_prefix(&config, &config.card_prefix())
        .await
        .expect("list cards");
    let card: Value = serde_json::from_slice(&cards[0].1).expect("card JSON");
    let tokenizer = &card["card_json"]["tokenizer"]["hf_tokenizer_json"];
    let url = tokenizer["path"].as_str().unwrap_or_default();
    assert!(
        url.starts_with(&format!(
            "http://127.0.0.1:{system_port}/v1/metadata/dynamo/backend/generate/"
        )),
        "the card names the system server's URL: {tokenizer}"
    );
    frontend
        .wait_model(MOCK_MODEL, &mut [&mut worker], READY)
        .await;
    let (status, body) = post_json(
        &frontend.url("/v1/chat/completions"),
        &chat_request("Hello there", 6, false),
    )
    .await;
    assert!(
        status == 200 && body["usage"]["completion_tokens"] == 6,
        "Dynamo's frontend serves the dynamix worker's model from the fetched card: {status} {body}"
    );
    let stream = stream_chat(frontend.base(), &chat_request("Hello there", 5, true)).await;
    assert!(stream.is_complete(5), "{stream:?}");
}

/// Dynamo's workers of different models share one endpoint by default (`dyn://dynamo.backend.generate`).
/// A dynamix frontend that took `mock-model` from the first card must not route `mock-model`'s
/// requests to a worker whose card names another model; it serves that model too, through that
/// worker only.
#[actix_rt::test]
async fn dynamix_frontend_routes_only_to_workers_of_its_model() {
    let Some(dynamo) = DynamoEnv::ensure() else {
        return;
    };
    let cluster = Cluster::start(&dynamo);
    let mut ours = cluster.mocker("mock-model-mocker", FAST, &[]);
    cluster
        .wait_workers(DEFAULT_ENDPOINT, 1, &mut [&mut ours], READY)
        .await;
    let mut frontend =
        cluster.dynamix_frontend("dynamix-frontend", &["--router-mode", "round-robin"]);
    frontend
        .wait_model(MOCK_MODEL, &mut [&mut ours], READY)
        .await;
    let mut other = cluster.mocker("other-model-mocker", FAST, &["--model-name", "other-model"]);
    cluster
        .wait_workers(DEFAULT_ENDPOINT, 2, &mut [&mut ours, &mut other], READY)
        .await;
    frontend
        .wait_log(&["worker serves another model; not routing to it"], READY)
        .await;
    let url = frontend.url("/v1/chat/completions");
    for i in 0..6 {
        let (status, body) = post_json(&url, &chat_request(&format!("Hello {i}"), 4, false)).await;
        assert!(
            status == 200 && body["usage"]["completion_tokens"] == 4,
            "request {i}: {status} {body}"
        );
    }
    let served_by_other = other
        .metric(
            "dynamo_component_requests_total",
            &[("dynamo_endpoint", "generate")],
        )
        .await;
    assert_eq!(
        served_by_other, 0.0,
        "the other model's worker got requests"
    );
    let served_by_ours = ours
        .metric(
            "dynamo_component_requests_total",
            &[("dynamo_endpoint", "generate")],
        )
        .await;
    assert!(
        served_by_ours >= 6.0,
        "mock-model's worker served {served_by_ours}"
    );
    // The other model is served too, on a path of its own (its card's tokenizer, its own router),
    // by its own worker only: Dynamo's frontend serves every model it finds, and so does this one.
    frontend
        .wait_model("other-model", &mut [&mut ours, &mut other], READY)
        .await;
    let mut request = chat_request("Hello other", 3, false);
    request["model"] = json!("other-model");
    let (status, body) = post_json(&url, &request).await;
    assert!(
        status == 200 && body["usage"]["completion_tokens"] == 3 && body["model"] == "other-model",
        "other-model: {status} {body}"
    );
    let served_by_other = other
        .metric(
            "dynamo_component_requests_total",
            &[("dynamo_endpoint", "generate")],
        )
        .await;
    assert_eq!(served_by_other, 1.0, "the other model's worker");
}
