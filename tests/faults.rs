//! Supervision, fault injection and request migration, through the real HTTP server: faults are armed
//! with `POST /admin/faults` (or by a seeded random injector) and the client must see one uninterrupted
//! stream — no token lost, none duplicated — whenever the migration limit allows it.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Two echo engines (deterministic: the answer is the user's message, one character per token).
fn config(migration_limit: u32, extra: &str) -> String {
    format!(
        "echo.token_delay_ms = 2\n\
         [engine]\ndevices = [\"cpu:0\", \"cpu:1\"]\n\
         [migration]\nlimit = {migration_limit}\n\
         [faults]\nenabled = true\nadmin_endpoint = true\n{extra}"
    )
}

const TEXT: &str =
    "The quick brown fox jumps over the lazy dog, twice: the quick brown fox jumps again.";

fn stream_body(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": true})
}

/// Streams a chat; returns the concatenated content and the raw SSE text.
async fn stream_chat(server: &TestServer, content: &str) -> (String, String) {
    let (status, sse, _) =
        post_sse(&server.url("/v1/chat/completions"), &stream_body(content)).await;
    assert_eq!(status, 200, "{sse}");
    let text = sse_json(&sse)
        .iter()
        .filter_map(|frame| {
            frame["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    (text, sse)
}

async fn arm(server: &TestServer, fault: Value) {
    let (status, body) = post_json(&server.url("/admin/faults"), &fault).await;
    assert_eq!(status, 200, "arming {fault}: {body}");
}

/// The sum of every series of `name` that carries `labels` (e.g. restarts over all engine instances).
async fn metric(server: &TestServer, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = get_text(&server.url("/metrics")).await;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (up to 10 s) until the metric reaches `expected`: restarts and releases are reported
/// asynchronously, after the client already has its last byte. Returns the last value seen.
async fn settle_metric(
    server: &TestServer,
    name: &str,
    labels: &[(&str, &str)],
    expected: f64,
) -> f64 {
    let mut value = 0.0;
    for _ in 0..500 {
        value = metric(server, name, labels).await;
        if value == expected {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    value
}

/// Waits (up to 10 s) until nothing is in flight, then returns `/health`.
async fn settle_health(server: &TestServer) -> (u16, Value) {
    health_when(server, |h| h["inflight_requests"] == 0).await
}

/// Waits (up to 10 s) until `/health` satisfies `ready` (the supervisor acts on failures
/// asynchronously); returns the last answer either way, for the caller's assertions.
async fn health_when(server: &TestServer, ready: impl Fn(&Value) -> bool) -> (u16, Value) {
    let mut last = get_health(server).await;
    for _ in 0..500 {
        if ready(&last.1) {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
        last = get_health(server).await;
    }
    last
}

async fn get_health(server: &TestServer) -> (u16, Value) {
    get(&server.url("/health")).await
}

#[actix_rt::test]
async fn an_engine_panicking_mid_stream_migrates_and_the_stream_is_unchanged() {
    let server = start(&config(2, "")).await;
    let (clean, _) = stream_chat(&server, TEXT).await;
    assert_eq!(clean, TEXT, "fault-free run");

    arm(&server, json!({"kind": "engine_panic", "after_tokens": 10})).await;
    let (faulted, sse) = stream_chat(&server, TEXT).await;
    assert_eq!(faulted, clean, "no token lost or duplicated");
    assert!(sse.ends_with("data: [DONE]\n\n"), "{sse}");

    assert_eq!(
        metric(
            &server,
            "dynamo_frontend_model_migration_total",
            &[("migration_type", "ongoing_request")]
        )
        .await,
        1.0
    );
    assert_eq!(
        settle_metric(
            &server,
            "dynamo_frontend_actor_restarts_total",
            &[("actor", "engine")],
            1.0
        )
        .await,
        1.0
    );
    let (status, health) = settle_health(&server).await;
    assert_eq!(status, 200, "{health}");
    let instances = health["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2, "the restarted engine is back: {health}");
    let restarts: u64 = instances
        .iter()
        .map(|i| i["restarts"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(restarts, 1, "{health}");
    assert_eq!(health["inflight_requests"], 0, "{health}");
    server.stop().await;
}

/// With one engine there is nowhere else to go: the engine a stream failed on takes it back after
/// its restart (the failed engine is only a last choice). Waiting when no engine is routable at all
/// is `gateway::migration`'s unit test.
#[actix_rt::test]
async fn with_one_engine_a_migrated_stream_goes_back_to_it_after_the_restart() {
    let server = start(
        "echo.token_delay_ms = 2\n[engine]\ndevices = [\"cpu:0\"]\n[migration]\nlimit = 1\n\
         [faults]\nenabled = true\nadmin_endpoint = true\n",
    )
    .await;
    arm(&server, json!({"kind": "engine_panic", "after_tokens": 10})).await;
    let (faulted, sse) = stream_chat(&server, TEXT).await;
    assert_eq!(faulted, TEXT, "no token lost or duplicated: {sse}");
    assert!(sse.ends_with("data: [DONE]\n\n"), "{sse}");
    server.stop().await;
}

#[actix_rt::test]
async fn without_migration_the_client_gets_the_error() {
    let server = start(&config(0, "")).await;
    // Streaming: the failure comes after the first bytes, as an in-stream error frame.
    arm(&server, json!({"kind": "engine_panic", "after_tokens": 5})).await;
    let (text, sse) = stream_chat(&server, TEXT).await;
    assert_eq!(text, TEXT[..5], "the tokens before the fault arrived");
    let frames = sse_json(&sse);
    let last = frames.last().expect("frames");
    assert_eq!(last["error"]["code"], 500, "in-stream error frame: {sse}");
    assert!(
        !frames
            .iter()
            .any(|f| f["choices"][0]["finish_reason"] == "stop"),
        "never reported as complete: {sse}"
    );
    // Unary: the error arrives before any byte, as the HTTP status.
    arm(&server, json!({"kind": "engine_error", "after_tokens": 3})).await;
    let (status, body) = post_json(&server.url("/v1/chat/completions"), &chat_body(TEXT)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        metric(
            &server,
            "dynamo_frontend_model_migration_total",
            &[("migration_type", "ongoing_request")]
        )
        .await,
        0.0
    );
    server.stop().await;
}

#[actix_rt::test]
async fn a_stalled_engine_is_abandoned_after_the_stall_timeout() {
    let server = start(
        "echo.token_delay_ms = 2\n[engine]\ndevices = [\"cpu:0\", \"cpu:1\"]\n\
         [migration]\nlimit = 1\nstall_timeout_secs = 0.3\n\
         [faults]\nenabled = true\nadmin_endpoint = true\nstall_ms = 10000\n",
    )
    .await;
    arm(&server, json!({"kind": "engine_stall", "after_tokens": 7})).await;
    // The stall lasts 10 s; the migration below (not a clock) shows the stream did not wait it out.
    let (text, _) = stream_chat(&server, TEXT).await;
    assert_eq!(text, TEXT);
    assert_eq!(
        metric(
            &server,
            "dynamo_frontend_model_migration_total",
            &[("migration_type", "ongoing_request")]
        )
        .await,
        1.0
    );
    server.stop().await;
}

#[actix_rt::test]
async fn random_faults_under_concurrent_load_lose_nothing() {
    let server = start(
        "echo.token_delay_ms = 1\n[engine]\ndevices = [\"cpu:0\", \"cpu:1\", \"cpu:2\"]\n\
         [migration]\nlimit = 20\n\
         [supervisor]\nmax_restarts = 1000\n\
         [faults]\nenabled = true\nadmin_endpoint = true\nseed = 42\nprobability = 0.01\n\
         kinds = [\"engine_panic\", \"engine_error\"]\n",
    )
    .await;
    let texts: Vec<String> = (0..24)
        .map(|i| format!("request {i}: {TEXT} {}", "abcdefghij".repeat(i % 4)))
        .collect();
    let results =
        futures_util::future::join_all(texts.iter().map(|t| stream_chat(&server, t))).await;
    for ((got, sse), want) in results.iter().zip(&texts) {
        assert_eq!(got, want, "lost or duplicated tokens: {sse}");
    }
    let (_, faults) = get(&server.url("/admin/faults")).await;
    let panics = faults["injected"]["engine_panic"].as_f64().unwrap_or(0.0);
    let errors = faults["injected"]["engine_error"].as_f64().unwrap_or(0.0);
    assert!(panics + errors > 0.0, "some faults fired: {faults}");
    let (_, health) = settle_health(&server).await;
    let restarts: u64 = health["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["restarts"].as_u64().unwrap_or(0))
        .sum();
    // Panics that hit one engine in the same instant share one restart.
    assert!(
        restarts >= 1 && restarts as f64 <= panics,
        "{restarts} restarts for {panics} panics"
    );
    assert_eq!(
        settle_metric(
            &server,
            "dynamo_frontend_actor_restarts_total",
            &[("actor", "engine")],
            restarts as f64
        )
        .await,
        restarts as f64,
        "every restart is counted: {health}"
    );
    let migrations = metric(
        &server,
        "dynamo_frontend_model_migration_total",
        &[("migration_type", "ongoing_request")],
    )
    .await;
    assert!(
        migrations >= panics + errors,
        "{migrations} migrations for {faults}"
    );
    let (status, health) = settle_health(&server).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(
        health["instances"].as_array().map(Vec::len),
        Some(3),
        "{health}"
    );
    assert_eq!(health["inflight_requests"], 0, "{health}");
    server.stop().await;
}

#[actix_rt::test]
async fn router_and_validator_panics_do_not_fail_requests() {
    let server = start(&config(0, "")).await;
    // Long streams in flight while the router and a validator panic.
    let long = TEXT.repeat(3);
    let in_flight = futures_util::future::join_all((0..4).map(|_| stream_chat(&server, &long)));
    let faults = async {
        actix_rt::time::sleep(Duration::from_millis(30)).await;
        arm(&server, json!({"kind": "router_panic"})).await;
        arm(&server, json!({"kind": "validator_panic"})).await;
        // New requests meet the faults: they are retried on the restarted actors.
        futures_util::future::join_all((0..4).map(|_| stream_chat(&server, TEXT))).await
    };
    let (long_results, new_results) = tokio::join!(in_flight, faults);
    for (text, sse) in long_results {
        assert_eq!(text, long, "{sse}");
    }
    for (text, sse) in new_results {
        assert_eq!(text, TEXT, "{sse}");
    }
    for actor in ["router", "validator"] {
        assert_eq!(
            settle_metric(
                &server,
                "dynamo_frontend_actor_restarts_total",
                &[("actor", actor)],
                1.0
            )
            .await,
            1.0,
            "{actor} restarted once"
        );
    }
    server.stop().await;
}

#[actix_rt::test]
async fn a_panicking_http_handler_fails_one_request_and_the_server_keeps_serving() {
    let server = start(&config(0, "")).await;
    arm(&server, json!({"kind": "http_panic"})).await;
    let (status, body) = post_json(&server.url("/v1/chat/completions"), &chat_body(TEXT)).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        body["message"], "Internal server error",
        "sanitized: {body}"
    );
    // The same worker (two workers; try several times) still serves, and the drain is not stuck on
    // the panicked request's admission.
    for _ in 0..4 {
        let (status, body) = post_json(&server.url("/v1/chat/completions"), &chat_body(TEXT)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, health) = get_health(&server).await;
    assert_eq!(status, 200, "{health}");
    // The root counted it as a restart of the http child.
    let service = server.service.as_ref().expect("running");
    let snapshot = service.snapshot().await.expect("the root answers");
    let http = snapshot
        .tree
        .children
        .iter()
        .find(|s| s.name == "http")
        .and_then(|s| s.children.first())
        .expect("http child");
    assert_eq!((http.name.as_str(), http.restarts), ("http 0", 1));
    assert!(
        snapshot
            .timeline
            .iter()
            .any(|e| e.event == "restarted" && e.detail.contains("injected fault")),
        "{:?}",
        snapshot.timeline
    );
    server.stop().await;
}

/// HTTP handler panics count against a restart intensity like any actor's.
#[actix_rt::test]
async fn http_handler_panics_past_the_restart_intensity_escalate() {
    let escalation = escalation_after(1, "http_panic", 2, 2).await;
    assert_eq!(
        escalation.actor,
        dynamix_actors::supervision::ActorKind::Http
    );
    assert_eq!(escalation.failures, 2);
}

#[actix_rt::test]
async fn an_engine_past_its_restart_budget_leaves_routing_and_health_says_why() {
    let server = start(&config(3, "[supervisor]\nmax_restarts = 1\n")).await;
    // Engine 0 panics twice: one restart is allowed, the second failure gives it up.
    arm(
        &server,
        json!({"kind": "engine_panic", "engine": 0, "after_tokens": 2, "count": 2}),
    )
    .await;
    for _ in 0..4 {
        let (text, sse) = stream_chat(&server, TEXT).await;
        assert_eq!(text, TEXT, "migrated to engine 1: {sse}");
    }
    let (status, health) = health_when(&server, |h| {
        h["failed_instances"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    assert_eq!(status, 200, "engine 1 still serves: {health}");
    let ids: Vec<u64> = health["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["instance_id"].as_u64())
        .collect();
    assert_eq!(ids, vec![1], "{health}");
    assert_eq!(health["failed_instances"][0]["instance_id"], 0, "{health}");
    let reason = health["failed_instances"][0]["reason"]
        .as_str()
        .unwrap_or("");
    assert!(reason.contains("taken out of service"), "{reason}");

    // Routing never picks engine 0 again.
    for _ in 0..4 {
        let (text, _) = stream_chat(&server, TEXT).await;
        assert_eq!(text, TEXT);
    }

    // Engine 1 fails the same way: nothing is left, requests get 503 and /health says why.
    arm(
        &server,
        json!({"kind": "engine_panic", "engine": 1, "after_tokens": 2, "count": 2}),
    )
    .await;
    for _ in 0..2 {
        // The second of these may already find no engine left (503): either is fine here.
        let _ = post_sse(&server.url("/v1/chat/completions"), &stream_body(TEXT)).await;
    }
    let (status, health) = health_when(&server, |h| {
        h["failed_instances"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "unhealthy");
    assert!(
        health["message"]
            .as_str()
            .unwrap_or("")
            .contains("engine 1"),
        "{health}"
    );
    let (status, body) = post_json(&server.url("/v1/chat/completions"), &chat_body(TEXT)).await;
    assert_eq!(status, 503, "{body}");
    // An engines subtree with no engine left escalates: the binary would exit non-zero.
    let service = server.service.as_ref().expect("running");
    let escalation = tokio::time::timeout(Duration::from_secs(5), service.escalated())
        .await
        .expect("the failure reaches the root");
    assert_eq!(
        escalation.subtree,
        Some(dynamix_actors::supervision::tree::Subtree::Engines),
        "{escalation}"
    );
    assert!(
        escalation.to_string().contains("no engine left"),
        "{escalation}"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn the_admin_endpoint_rejects_bad_faults_and_is_off_by_default() {
    let server = start(&config(1, "")).await;
    for (body, needle) in [
        (json!({"kind": "meteor_strike"}), "unknown variant"),
        (
            json!({"kind": "router_panic", "engine": 0}),
            "engine faults",
        ),
        (
            json!({"kind": "engine_panic", "engine": 9}),
            "no engine with instance id 9",
        ),
        (json!({"kind": "engine_panic", "count": 0}), "count"),
    ] {
        let (status, reply) = post_json(&server.url("/admin/faults"), &body).await;
        assert_eq!(status, 400, "{body} → {reply}");
        assert!(reply.to_string().contains(needle), "{body} → {reply}");
    }
    let (status, _) = get(&server.url("/admin/faults")).await;
    assert_eq!(status, 200);
    server.stop().await;

    let plain = start("").await;
    let (status, _) = post_json(
        &plain.url("/admin/faults"),
        &json!({"kind": "router_panic"}),
    )
    .await;
    assert_eq!(status, 404, "no admin endpoint unless configured");
    plain.stop().await;
}

/// Runs `dynamix drill` on a shipped config with `env`; its report, once it passed.
fn drill(config: &str, requests: &str, concurrency: &str, env: &[(&str, &str)]) -> String {
    let config = format!("{}/configs/{config}", env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_dynamix"))
        .args(["drill", "--config", &config])
        .args(["--requests", requests, "--concurrency", concurrency])
        .envs(env.iter().copied())
        .env("DYN_LOG", "error")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run dynamix drill");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "drill failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_drill_reports_no_lost_or_duplicated_tokens() {
    let stdout = drill(
        "fault-drill.toml",
        "120",
        "16",
        // Faster than the shipped config, so a short run still meets several faults. Not for the
        // embedding engine: a fault every 150 ms is one in nearly every forward pass on a slow
        // machine, and a request whose pass fails three times in a row fails (its own test below).
        &[
            ("DYN_FAULTS__EVERY_MS", "150"),
            ("DYN_ECHO__TOKEN_DELAY_MS", "2"),
            ("DYN_FAULTS__KINDS", "[\"engine_panic\", \"engine_error\", \"engine_stall\", \"engine_slow\", \"router_panic\", \"validator_panic\", \"http_panic\", \"request_plane_panic\", \"indexer_panic\", \"memory_service_panic\"]"),
        ],
    );
    // One phase of 120 requests per reachable kind: chat on the serving path, chat through the
    // drill's own frontend and workers (request_plane_panic) and chat over HTTP (http_panic).
    let reachable = [
        "engine_panic",
        "engine_error",
        "engine_stall",
        "engine_slow",
        "router_panic",
        "validator_panic",
        "http_panic",
        "request_plane_panic",
    ];
    let sent = 120 * reachable.len();
    assert!(
        stdout.contains(&format!("requests sent {sent}, completed {sent}, failed 0")),
        "{stdout}"
    );
    for kind in reachable {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(kind) && !l.contains("not injected"))
            .unwrap_or_else(|| panic!("a report row for {kind}: {stdout}"));
        let columns: Vec<&str> = row.split_whitespace().collect();
        // fault, injected, restarts, escalations, migrations, failed, lost, duplicated, ...
        assert_eq!(columns[3], "0", "no escalation: {row}");
        assert_eq!(
            &columns[5..8],
            ["0", "0", "0"],
            "nothing failed or lost: {row}"
        );
    }
    for unreachable in ["indexer_panic", "memory_service_panic"] {
        assert!(
            stdout.contains(&format!("{unreachable:<20} not injected: ")),
            "{unreachable} is named with the reason: {stdout}"
        );
    }
    assert!(
        stdout.contains("lost 0, duplicated 0, changed 0"),
        "{stdout}"
    );
    assert!(!stdout.contains("faults injected: none"), "{stdout}");
    // HTTP handler panics reached the handlers and the client's retries (as the openai SDK's) got
    // every request through.
    let http = stdout
        .lines()
        .find(|l| l.starts_with("http_panic"))
        .unwrap_or_default();
    let columns: Vec<&str> = http.split_whitespace().collect();
    assert!(
        columns[1].parse::<u32>().is_ok_and(|n| n > 0) && columns[11] == columns[1],
        "every injected HTTP panic cost one retry: {http}"
    );
    assert!(stdout.contains("recovery gap, all"), "{stdout}");
}

/// The embeddings drill at the shipped config's rate (a fault a second): a panicked forward pass is
/// computed again after the restart, so no request fails and every vector equals the fault-free one.
#[test]
fn the_embeddings_drill_loses_no_vector() {
    let stdout = drill(
        "fault-drill.toml",
        "120",
        "16",
        &[("DYN_FAULTS__KINDS", "[\"embeddings_panic\"]")],
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("embeddings_panic") && !l.contains("not injected"))
        .unwrap_or_else(|| panic!("a report row for the embedding engine: {stdout}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns[3], "0", "no escalation: {row}");
    assert_eq!(
        &columns[5..8],
        ["0", "0", "0"],
        "nothing failed or lost: {row}"
    );
    assert!(
        stdout.contains("lost 0, duplicated 0, changed 0"),
        "{stdout}"
    );
}

/// The memory service drill: the model engine's weights behind an in-process memory service that
/// panics now and then; every weights load still succeeds (a new session after a failed one).
#[test]
fn the_memory_service_drill_loses_no_weights_load() {
    let sockets = std::env::temp_dir().join(format!("dynamix-drill-gms-{}", std::process::id()));
    let stdout = drill(
        "fault-drill-memory.toml",
        "200",
        "4",
        &[
            ("GMS_SOCKET_DIR", &sockets.to_string_lossy()),
            ("DYN_FAULTS__EVERY_MS", "150"),
        ],
    );
    let _ = std::fs::remove_dir_all(&sockets);
    let row = stdout
        .lines()
        .find(|l| l.starts_with("memory_service_panic") && !l.contains("not injected"))
        .unwrap_or_else(|| panic!("a report row for the memory service: {stdout}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(columns[3], "0", "no escalation: {row}");
    assert_eq!(&columns[5..8], ["0", "0", "0"], "no load failed: {row}");
    assert!(
        stdout.contains("requests sent 10, completed 10, failed 0"),
        "{stdout}"
    );
}

/// Starts a server allowing `max_restarts`, arms `fault` (`count` times), sends `requests` chats
/// (each meets a fault; the gateway retries a restarted router or validator) and returns the failure
/// that reached the root.
async fn escalation_after(
    max_restarts: u32,
    fault: &str,
    count: u32,
    requests: usize,
) -> dynamix_actors::supervision::Escalation {
    let server = start(&config(
        0,
        &format!("[supervisor]\nmax_restarts = {max_restarts}\n"),
    ))
    .await;
    arm(&server, json!({"kind": fault, "count": count})).await;
    for _ in 0..requests {
        let _ = post_json(
            &server.url("/v1/chat/completions"),
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    }
    let service = server.service.as_ref().expect("running");
    let escalation = tokio::time::timeout(Duration::from_secs(5), service.escalated())
        .await
        .expect("the failure reaches the root");
    server.stop().await;
    escalation
}

/// Past its restart intensity the router's failure escalates to the root: in process, the running
/// service reports it (actor and last error); the binary drains and exits 1 naming both.
#[actix_rt::test]
async fn a_router_past_its_restart_intensity_escalates_to_the_root() {
    // One restart allowed, the second failure escalates.
    let escalation = escalation_after(1, "router_panic", 3, 3).await;
    assert_eq!(
        escalation.actor,
        dynamix_actors::supervision::ActorKind::Router
    );
    assert_eq!(escalation.failures, 2);
    assert!(
        escalation
            .last_error
            .contains("injected fault: router panics"),
        "{escalation}"
    );
}

/// The validator threads share one restart intensity: a SyncArbiter re-creating a validator does
/// not reset it, so repeated validator panics escalate too.
#[actix_rt::test]
async fn validators_share_one_restart_intensity_and_escalate_past_it() {
    let escalation = escalation_after(2, "validator_panic", 3, 4).await;
    assert_eq!(
        escalation.actor,
        dynamix_actors::supervision::ActorKind::Validator
    );
    assert_eq!(escalation.failures, 3);
}

#[test]
fn the_binary_exits_non_zero_naming_the_escalated_actor_and_its_last_error() {
    let dir = std::env::temp_dir().join(format!("dynamix-escalate-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "[http]\nhost = \"127.0.0.1\"\nport = 0\n{}",
            config(0, "[supervisor]\nmax_restarts = 0\n").replace(
                "echo.token_delay_ms = 2\n",
                "[echo]\ntoken_delay_ms = 2\n[embeddings]\nenabled = false\n"
            )
        ),
    )
    .unwrap();
    let Served {
        mut child,
        base,
        log: rx,
        ..
    } = spawn_serving(
        std::process::Command::new(env!("CARGO_BIN_EXE_dynamix"))
            .args(["serve", "out=echo", "--config"])
            .arg(&config_path)
            .env("NO_COLOR", "1"),
    );
    let system = actix_rt::System::new();
    system.block_on(async {
        let (status, body) = post_json(
            &format!("{base}/admin/faults"),
            &json!({"kind": "router_panic"}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let _ = post_json(
            &format!("{base}/v1/chat/completions"),
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("dynamix did not exit after the escalation");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log: Vec<String> = rx.try_iter().collect();
    assert_eq!(status.code(), Some(1), "{log:#?}");
    let last = log.last().cloned().unwrap_or_default();
    assert!(
        last.starts_with("dynamix: stopping: router 0 failed 1 times within its restart window")
            && last.contains("injected fault: router panics"),
        "{log:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
