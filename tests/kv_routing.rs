//! KV-aware routing end to end: four mocker engines behind the `kv` router, driven over HTTP.
//! Requests sharing a long prefix land on the engine that cached it; once that engine is removed they
//! move to another, and the removed engine's blocks no longer score.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const KV_CONFIG: &str = r#"
[router]
mode = "kv"
seed = 7
[engine]
kind = "mocker"
devices = ["sim:0", "sim:1", "sim:2", "sim:3"]
[mocker]
block_size = 16
num_gpu_blocks = 4096
speedup_ratio = 50.0
default_max_tokens = 2
"#;

/// Tokens generated so far per engine instance, from `/health`.
async fn generated_by_engine(server: &TestServer) -> HashMap<u64, u64> {
    let (status, health) = get(&server.url("/health")).await;
    assert_eq!(status, 200, "{health}");
    health["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            (
                i["instance_id"].as_u64().expect("id"),
                i["generated_tokens"].as_u64().expect("tokens"),
            )
        })
        .collect()
}

/// The sum of the `cached_tokens` histogram.
async fn cached_tokens_sum(server: &TestServer) -> f64 {
    let text = get_text(&server.url("/metrics")).await;
    text.lines()
        .find(|l| l.starts_with("dynamo_frontend_cached_tokens_sum"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Sends a completion with these prompt token ids; returns the engine that generated it.
async fn complete_on(server: &TestServer, prompt: &[u32]) -> u64 {
    let before = generated_by_engine(server).await;
    let (status, body) = post_json(
        &server.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !body["choices"][0]["text"].as_str().unwrap_or("").is_empty(),
        "the mocker answers with real text: {body}"
    );
    let after = generated_by_engine(server).await;
    let served: Vec<u64> = after
        .iter()
        .filter(|(id, tokens)| before.get(id).copied().unwrap_or(0) < **tokens)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        served.len(),
        1,
        "exactly one engine generated: {before:?} → {after:?}"
    );
    // Let the engine's KV events reach the index before the next routing decision.
    tokio::time::sleep(Duration::from_millis(100)).await;
    served[0]
}

fn prompt(prefix_seed: u32, prefix_len: u32, suffix_seed: u32) -> Vec<u32> {
    (0..prefix_len)
        .map(|i| 1000 + (prefix_seed * 7919 + i * 31) % 20000)
        .chain((0..8).map(|i| 2000 + suffix_seed * 13 + i))
        .collect()
}

#[actix_rt::test]
async fn shared_prefixes_stick_to_their_engine_until_it_is_removed() {
    let server = start(KV_CONFIG).await;

    // A 20-block prefix, then four more requests with the same prefix and other suffixes.
    let home = complete_on(&server, &prompt(1, 320, 0)).await;
    let cached_before = cached_tokens_sum(&server).await;
    for suffix in 1..5 {
        assert_eq!(
            complete_on(&server, &prompt(1, 320, suffix)).await,
            home,
            "a request sharing the cached prefix goes where the prefix is"
        );
    }
    let cached_after = cached_tokens_sum(&server).await;
    assert!(
        cached_after - cached_before >= 4.0 * 320.0,
        "each of the 4 follow-ups found the 320-token prefix cached: {cached_before} → {cached_after}"
    );

    // The home engine's own view in /health: the prefix sits in its cache, its admissions hit.
    let (_, health) = get(&server.url("/health")).await;
    let kv_cache = health["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|i| i["instance_id"].as_u64() == Some(home))
        .map(|i| i["kv_cache"].clone())
        .expect("home engine listed");
    let cached_blocks = kv_cache["active_blocks"].as_u64().unwrap_or(0)
        + kv_cache["inactive_blocks"].as_u64().unwrap_or(0);
    assert!(
        cached_blocks >= 20,
        "the 20-block prefix is cached: {kv_cache}"
    );
    assert!(
        kv_cache["prefix_hit_rate"].as_f64().unwrap_or(0.0) > 0.5,
        "4 of 5 admissions hit the prefix: {kv_cache}"
    );
    assert_eq!(kv_cache["waiting_requests"], 0, "{kv_cache}");

    // A different prefix is free to go elsewhere, and the index keeps both.
    let other = complete_on(&server, &prompt(2, 320, 0)).await;
    assert_eq!(complete_on(&server, &prompt(2, 320, 1)).await, other);

    // Remove the engine holding prefix 1.
    let service = server.service.as_ref().expect("running");
    assert!(service.remove_engine(home).await);
    assert!(!service.remove_engine(home).await, "already removed");
    let remaining = generated_by_engine(&server).await;
    assert!(!remaining.contains_key(&home), "/health no longer lists it");

    let cached = cached_tokens_sum(&server).await;
    let new_home = complete_on(&server, &prompt(1, 320, 9)).await;
    assert_ne!(new_home, home);
    assert_eq!(
        cached_tokens_sum(&server).await,
        cached,
        "the removed engine's blocks no longer score: nothing was expected cached"
    );
    // The new engine now holds the prefix, and the prefix sticks to it.
    for suffix in 10..13 {
        assert_eq!(
            complete_on(&server, &prompt(1, 320, suffix)).await,
            new_home
        );
    }
    server.stop().await;
}

/// The actors of `kind` in the tree, with their restart counts, and the timeline's events.
async fn tree_of(server: &TestServer) -> (Value, Vec<(String, String)>) {
    let service = server.service.as_ref().expect("running");
    let snapshot = service.snapshot().await.expect("the root answers");
    let events = snapshot
        .timeline
        .iter()
        .map(|e| (e.event.to_string(), format!("{} {}", e.actor, e.instance)))
        .collect();
    (
        serde_json::to_value(snapshot.tree).expect("serializable"),
        events,
    )
}

#[actix_rt::test]
async fn a_restarted_indexer_rebuilds_the_index_from_the_engines_blocks() {
    let server = start(&format!("{KV_CONFIG}\n[faults]\nenabled = true\n")).await;
    let home = complete_on(&server, &prompt(3, 320, 0)).await;

    // The next KV event the indexer applies panics it; another request makes one.
    let service = server.service.as_ref().expect("running");
    service
        .faults
        .arm(dynamix_actors::faults::FaultSpec::new(
            dynamix_actors::faults::FaultKind::IndexerPanic,
        ))
        .expect("armed");
    complete_on(&server, &prompt(4, 64, 0)).await;
    let mut waited = 0;
    let events = loop {
        let (_, events) = tree_of(&server).await;
        if events.iter().filter(|(e, _)| e == "resynced").count() == 4 || waited > 50 {
            break events;
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        events[0],
        ("restarted".to_string(), "indexer 0".to_string()),
        "{events:?}"
    );
    let resynced: Vec<&str> = events[1..].iter().map(|(_, who)| who.as_str()).collect();
    assert_eq!(
        resynced,
        ["engine 0", "engine 1", "engine 2", "engine 3"],
        "rest-for-one: every engine after the indexer sends its blocks again"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The restarted index knows the home engine's prefix again: it still attracts its requests,
    // and the router expects the whole prefix cached.
    let cached = cached_tokens_sum(&server).await;
    for suffix in 1..4 {
        assert_eq!(complete_on(&server, &prompt(3, 320, suffix)).await, home);
    }
    assert!(
        cached_tokens_sum(&server).await - cached >= 3.0 * 320.0,
        "the rebuilt index scores the cached prefix"
    );
    let (tree, _) = tree_of(&server).await;
    let kv = tree["children"]
        .as_array()
        .and_then(|c| c.iter().find(|s| s["name"] == "kv"))
        .expect("kv subtree");
    assert_eq!(kv["strategy"], "rest_for_one", "{kv}");
    assert_eq!(kv["children"][0]["name"], "indexer 0", "{kv}");
    assert_eq!(kv["children"][0]["restarts"], 1, "{kv}");
    assert_eq!(kv["children"][0]["state"], "running", "{kv}");
    server.stop().await;
}

#[actix_rt::test]
async fn kv_metrics_are_exported() {
    let server = start(KV_CONFIG).await;
    complete_on(&server, &prompt(3, 64, 0)).await;
    let text = get_text(&server.url("/metrics")).await;
    for name in [
        "dynamo_frontend_worker_active_decode_blocks{",
        "dynamo_frontend_worker_active_prefill_tokens{",
        "dynamo_router_overhead_total_ms_bucket{",
        "dynamo_router_overhead_indexer_find_matches_ms_count{",
        "dynamo_router_overhead_scheduling_ms_count{",
        "dynamo_router_overhead_block_hashing_ms_count{",
        "dynamo_frontend_cached_tokens_count{",
        "dynamo_frontend_model_kv_cache_block_size{",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // Load counters return to zero once requests finish: nothing is left active.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = get_text(&server.url("/metrics")).await;
    for line in text
        .lines()
        .filter(|l| l.starts_with("dynamo_frontend_worker_active_"))
    {
        assert!(line.ends_with(" 0"), "{line}");
    }
    server.stop().await;
}

#[actix_rt::test]
async fn streaming_through_the_kv_router_completes() {
    let server = start(KV_CONFIG).await;
    let (status, text, _) = post_sse(
        &server.url("/v1/chat/completions"),
        &json!({"model": MODEL, "stream": true, "max_tokens": 5,
                "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    assert_eq!(status, 200);
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let content: String = data
        .iter()
        .filter(|d| d.as_str() != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(!content.trim().is_empty(), "{text}");
    server.stop().await;
}
