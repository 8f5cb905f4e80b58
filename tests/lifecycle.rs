//! Cancellation, keep-alive and graceful drain: a client that hangs up stops generation in the engine;
//! a drain answers 503 to new work while admitted streams finish.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

async fn engine_stats(server: &TestServer) -> (u64, u64, u64) {
    let (_, health) = get(&server.url("/health")).await;
    let i = &health["instances"][0];
    (
        i["active_requests"].as_u64().unwrap_or(99),
        i["generated_tokens"].as_u64().unwrap_or(0),
        i["cancelled_requests"].as_u64().unwrap_or(0),
    )
}

#[actix_rt::test]
async fn client_disconnect_mid_stream_cancels_generation() {
    let server = start("echo.token_delay_ms = 20\n").await;
    let mut body = chat_body(&"x".repeat(300));
    body["stream"] = json!(true);
    let mut res = client()
        .post(server.url("/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("request");
    // Read a few frames, then hang up.
    let mut frames = 0;
    while frames < 3 {
        if let Some(Ok(chunk)) = res.next().await {
            frames += String::from_utf8_lossy(&chunk).matches("data: ").count();
        }
    }
    assert_eq!(engine_stats(&server).await.0, 1, "the engine is generating");
    drop(res);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (active, generated, cancelled) = loop {
        let stats = engine_stats(&server).await;
        if stats.0 == 0 || Instant::now() > deadline {
            break stats;
        }
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(active, 0, "generation stopped after the client left");
    assert_eq!(cancelled, 1);
    assert!(generated < 100, "stopped early: {generated} of 300 tokens");
    actix_rt::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        engine_stats(&server).await.1,
        generated,
        "no tokens after cancellation"
    );
    let metrics = get_text(&server.url("/metrics")).await;
    assert_eq!(
        metric_value(&metrics, "dynamo_frontend_disconnected_clients", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "dynamo_frontend_requests_total",
            &[
                ("status", "error"),
                ("error_type", "cancelled"),
                ("request_type", "stream")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "dynamo_frontend_model_cancellation_total",
            &[("model", MODEL)]
        ),
        Some(1.0)
    );
    server.stop().await;
}

#[actix_rt::test]
async fn client_disconnect_during_unary_cancels_generation() {
    let server = start("echo.token_delay_ms = 20\n").await;
    let url = server.url("/v1/chat/completions");
    let body = chat_body(&"y".repeat(300));
    let request = client()
        .post(&url)
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string());
    // Give up on the request after 200 ms: the connection is closed while the server folds.
    let _ = actix_rt::time::timeout(Duration::from_millis(200), request).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (active, generated, _) = engine_stats(&server).await;
        if active == 0 {
            assert!(generated < 150, "stopped early: {generated}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "engine still generating after the client left"
        );
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[actix_rt::test]
async fn sse_keep_alive_comments_when_configured() {
    let server = start("echo.token_delay_ms = 120\nhttp.sse_keep_alive_interval_ms = 30\n").await;
    let mut body = chat_body("ab");
    body["stream"] = json!(true);
    let (status, text, _) = post_sse(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200);
    assert!(text.contains(": keep-alive\n\n"), "{text}");
    let content: String = sse_json(&text)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(content, "ab");
    assert!(text.ends_with("data: [DONE]\n\n"));
    server.stop().await;

    let server = start("echo.token_delay_ms = 60\n").await;
    let (_, text, _) = post_sse(&server.url("/v1/chat/completions"), &body).await;
    assert!(
        !text.contains(": keep-alive"),
        "keep-alive is off by default"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn drain_rejects_new_work_and_finishes_admitted_streams() {
    let server =
        start("echo.token_delay_ms = 30\nhttp.graceful_shutdown_timeout_secs = 10\n").await;
    let base = server.base.clone();
    let mut body = chat_body("drain me please");
    body["stream"] = json!(true);
    let mut res = client()
        .post(format!("{base}/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("request");
    let first = res.next().await;
    assert!(first.is_some());

    let service = server.service.expect("running");
    let shutdown = actix_rt::spawn(async move { service.shutdown().await });
    actix_rt::time::sleep(Duration::from_millis(100)).await;

    let (status, health) = get(&format!("{base}/health")).await;
    assert_eq!(status, 503);
    assert_eq!(health["status"], "shutting_down");
    let (status, live) = get(&format!("{base}/live")).await;
    assert_eq!(
        (status, live["status"].clone()),
        (503, json!("shutting_down"))
    );
    let (status, err) = post_json(&format!("{base}/v1/chat/completions"), &chat_body("late")).await;
    assert_eq!(status, 503);
    assert_eq!(
        err,
        json!({"message": "Service is not ready", "type": "Service Unavailable", "code": 503})
    );

    let mut rest = Vec::new();
    while let Some(chunk) = res.next().await {
        rest.extend_from_slice(&chunk.expect("stream continues during drain"));
    }
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "admitted stream completed: {text}"
    );
    shutdown.await.expect("shutdown finished");
    assert!(
        client().get(format!("{base}/health")).send().await.is_err(),
        "server stopped after the drain"
    );
}

#[actix_rt::test]
async fn drain_times_out_when_streams_outlive_the_grace_period() {
    let server = start("echo.token_delay_ms = 50\nhttp.graceful_shutdown_timeout_secs = 1\n").await;
    let base = server.base.clone();
    let mut body = chat_body(&"z".repeat(200));
    body["stream"] = json!(true);
    let mut res = client()
        .post(format!("{base}/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("request");
    let _ = res.next().await;
    let started = Instant::now();
    server.stop().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
    let mut text = Vec::new();
    while let Some(Ok(chunk)) = res.next().await {
        text.extend_from_slice(&chunk);
    }
    assert!(
        !String::from_utf8_lossy(&text).contains("[DONE]"),
        "a killed stream ends without [DONE]"
    );
    let _: Value = json!(null);
}
