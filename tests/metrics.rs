//! `/metrics` over HTTP: names, labels, histogram buckets (default and env-configured), and the
//! success/error accounting of real requests.

mod common;

use common::*;
use serde_json::json;

#[actix_rt::test]
async fn metrics_names_labels_and_buckets() {
    let server = start("").await;
    let chat = server.url("/v1/chat/completions");
    for _ in 0..2 {
        assert_eq!(post_json(&chat, &chat_body("hello")).await.0, 200);
    }
    let mut stream = chat_body("abc");
    stream["stream"] = json!(true);
    assert_eq!(post_sse(&chat, &stream).await.0, 200);
    let mut bad = chat_body("x");
    bad["temperature"] = json!(9);
    assert_eq!(post_json(&chat, &bad).await.0, 400);
    let mut unknown_model = chat_body("x");
    unknown_model["model"] = json!("nope");
    assert_eq!(post_json(&chat, &unknown_model).await.0, 404);
    let (status, _) = post_json(
        &server.url("/v1/completions"),
        &json!({"model": MODEL, "prompt": "abcd", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);

    let mut res = client()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(res.body().await.expect("body").to_vec()).expect("utf8");
    let total =
        |labels: &[(&str, &str)]| metric_value(&text, "dynamo_frontend_requests_total", labels);
    assert_eq!(
        total(&[
            ("model", MODEL),
            ("endpoint", "chat_completions"),
            ("request_type", "unary"),
            ("status", "success"),
            ("error_type", "")
        ]),
        Some(2.0)
    );
    assert_eq!(
        total(&[
            ("model", MODEL),
            ("endpoint", "chat_completions"),
            ("request_type", "stream"),
            ("status", "success")
        ]),
        Some(1.0)
    );
    assert_eq!(
        total(&[
            ("model", MODEL),
            ("endpoint", "chat_completions"),
            ("status", "error"),
            ("error_type", "validation")
        ]),
        Some(1.0)
    );
    assert_eq!(
        total(&[
            ("model", "unknown"),
            ("endpoint", "chat_completions"),
            ("status", "error"),
            ("error_type", "not_found")
        ]),
        Some(1.0)
    );
    assert_eq!(
        total(&[
            ("model", MODEL),
            ("endpoint", "completions"),
            ("status", "success")
        ]),
        Some(1.0)
    );
    // 5 + 5 + 3 + 2 output tokens.
    assert_eq!(
        metric_value(
            &text,
            "dynamo_frontend_output_tokens_total",
            &[("model", MODEL)]
        ),
        Some(15.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "dynamo_frontend_inflight_requests",
            &[("model", MODEL)]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "dynamo_frontend_active_requests",
            &[("model", MODEL)]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "dynamo_frontend_queued_requests",
            &[("model", MODEL)]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "dynamo_frontend_time_to_first_token_seconds_count",
            &[("model", MODEL)]
        ),
        Some(4.0)
    );
    assert_eq!(
        metric_value(
            &text,
            "dynamo_frontend_model_context_length",
            &[("model", MODEL)]
        ),
        Some(8192.0)
    );
    assert_eq!(
        metric_value(&text, "dynamo_frontend_model_ready", &[("model", MODEL)]),
        Some(1.0)
    );
    assert!(
        metric_value(
            &text,
            "dynamo_frontend_tokenizer_latency_ms_count",
            &[("operation", "tokenize")]
        )
        .unwrap_or(0.0)
            >= 4.0
    );
    // Default bucket layouts (spec §1.7 table).
    for (name, buckets) in [
        (
            "dynamo_frontend_request_duration_seconds_bucket",
            &[
                "0", "2", "4", "8", "16", "32", "64", "130", "260", "510", "+Inf",
            ][..],
        ),
        (
            "dynamo_frontend_input_sequence_tokens_bucket",
            &[
                "0", "100", "210", "430", "870", "1800", "3600", "7400", "15000", "31000", "63000",
                "130000", "+Inf",
            ][..],
        ),
        (
            "dynamo_frontend_output_sequence_tokens_bucket",
            &[
                "0", "100", "210", "430", "880", "1800", "3700", "7600", "16000", "32000", "+Inf",
            ][..],
        ),
        (
            "dynamo_frontend_time_to_first_token_seconds_bucket",
            &[
                "0", "0.0022", "0.0047", "0.01", "0.022", "0.047", "0.1", "0.22", "0.47", "1",
                "2.2", "4.7", "10", "22", "48", "100", "220", "480", "+Inf",
            ][..],
        ),
        (
            "dynamo_frontend_inter_token_latency_seconds_bucket",
            &[
                "0", "0.0019", "0.0035", "0.0067", "0.013", "0.024", "0.045", "0.084", "0.16",
                "0.3", "0.56", "1.1", "2", "+Inf",
            ][..],
        ),
    ] {
        let les: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(&format!("model=\"{MODEL}\"")))
            .filter_map(|l| l.split("le=\"").nth(1).and_then(|r| r.split('"').next()))
            .collect();
        assert_eq!(les, buckets, "{name}");
    }
    server.stop().await;
}
