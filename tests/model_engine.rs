//! The real model engine (`engine.kind = "model"`, SmolLM2-135M-Instruct on CPU) through the HTTP
//! API: answers, sampling controls, finish reasons, UTF-8-safe streaming, logprobs, continuous
//! batching, migration of a stream off a panicking engine, and the official `openai` SDK.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

const MODEL_ENGINE: &str = "engine.kind = \"model\"\n";

fn ask(question: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0})
}

fn content(body: &Value) -> &str {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {body}"))
}

#[actix_rt::test]
async fn greedy_answer_names_paris_and_usage_is_exact() {
    let server = start(MODEL_ENGINE).await;
    let mut body = ask("What is the capital of France?");
    body["max_tokens"] = json!(32);
    let (status, res) = post_json(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{res}");
    assert!(content(&res).contains("Paris"), "{res}");
    assert_eq!(res["choices"][0]["finish_reason"], "stop");
    // The prompt count is the chat template's tokens, exactly.
    let config = test_config(MODEL_ENGINE);
    let tokenizer = dynamix::load_tokenizer(&dynamix::model_file(&config).expect("model file"))
        .expect("tokenizer");
    let prompt = tokenizer
        .render_chat(
            &[dynamix_actors::tokenizer::ChatMessage::new(
                "user",
                "What is the capital of France?",
            )],
            true,
        )
        .expect("template");
    let prompt_tokens = tokenizer.encode(&prompt).expect("encode").len() as u64;
    assert_eq!(res["usage"]["prompt_tokens"], prompt_tokens);
    // Completion tokens: the answer's tokens plus the end-of-sequence token that stopped it.
    let answer_tokens = tokenizer.encode(content(&res)).expect("encode").len() as u64;
    assert_eq!(
        res["usage"]["completion_tokens"],
        answer_tokens + 1,
        "{res}"
    );
    assert_eq!(
        res["usage"]["total_tokens"],
        prompt_tokens + answer_tokens + 1
    );
    server.stop().await;
}

#[actix_rt::test]
async fn the_same_seed_gives_the_same_text() {
    let server = start(MODEL_ENGINE).await;
    let url = server.url("/v1/chat/completions");
    let body = |seed: u64| {
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Write a sentence about the sea."}],
               "temperature": 1.0, "top_p": 0.95, "seed": seed, "max_tokens": 20})
    };
    let (_, a) = post_json(&url, &body(42)).await;
    let (_, b) = post_json(&url, &body(42)).await;
    assert_eq!(content(&a), content(&b));
    // Other seeds sample other texts (five tries: a collision on all of them would mean the seed is ignored).
    let mut differs = false;
    for seed in 1..=5 {
        let (_, c) = post_json(&url, &body(seed)).await;
        differs |= content(&c) != content(&a);
    }
    assert!(differs, "every seed produced {:?}", content(&a));
    server.stop().await;
}

#[actix_rt::test]
async fn stop_strings_and_max_tokens_set_the_finish_reason() {
    let server = start(MODEL_ENGINE).await;
    let url = server.url("/v1/chat/completions");
    let mut body = ask("What is the capital of France?");
    body["max_tokens"] = json!(32);
    let (_, full) = post_json(&url, &body).await;
    let answer = content(&full).to_string();
    let cut = answer.find("Paris").expect("Paris in the answer");

    body["stop"] = json!(["Paris"]);
    let (status, stopped) = post_json(&url, &body).await;
    assert_eq!(status, 200, "{stopped}");
    assert_eq!(
        content(&stopped),
        &answer[..cut],
        "text up to the stop string"
    );
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    let mut short = ask("What is the capital of France?");
    short["max_tokens"] = json!(3);
    let (_, res) = post_json(&url, &short).await;
    assert_eq!(res["choices"][0]["finish_reason"], "length", "{res}");
    assert_eq!(res["usage"]["completion_tokens"], 3);
    assert!(answer.starts_with(content(&res)), "{res}");

    // Beyond the context window: 400 naming the prompt size, max_tokens and the limit.
    let mut long = ask("Hello");
    long["max_tokens"] = json!(8190);
    let (status, err) = post_json(&url, &long).await;
    assert_eq!(status, 400, "{err}");
    let message = err["message"]
        .as_str()
        .or(err["error"]["message"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("8190") && message.contains("8192"),
        "{err}"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn a_streamed_non_ascii_answer_decodes_exactly() {
    let server = start(MODEL_ENGINE).await;
    let body = json!({"model": MODEL, "prompt": "Traduis en français : « The coffee is very good. » Réponse :",
                      "temperature": 0, "max_tokens": 24});
    let (status, unary) = post_json(&server.url("/v1/completions"), &body).await;
    assert_eq!(status, 200, "{unary}");
    let text = unary["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    assert!(
        !text.is_ascii(),
        "the answer has non-ASCII characters: {text:?}"
    );
    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let (_, sse, _) = post_sse(&server.url("/v1/completions"), &streaming).await;
    let pieces: Vec<String> = sse_json(&sse)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert!(pieces.len() > 3, "{pieces:?}");
    assert!(
        pieces.iter().all(|p| !p.contains('\u{FFFD}')),
        "no replacement characters: {pieces:?}"
    );
    assert_eq!(pieces.concat(), text);
    server.stop().await;
}

#[actix_rt::test]
async fn concurrent_requests_share_forward_passes_and_match_their_solo_answers() {
    let server = start(MODEL_ENGINE).await;
    let url = server.url("/v1/completions");
    let prompts = [
        "The quick brown fox",
        "In the beginning",
        "My favourite fruit is",
        "Rust is a programming language that",
        "Water boils at",
        "The best way to learn is",
    ];
    let body = |p: &str| json!({"model": MODEL, "prompt": p, "temperature": 0, "max_tokens": 12, "ignore_eos": true});
    let mut solo = Vec::new();
    for p in prompts {
        let (_, res) = post_json(&url, &body(p)).await;
        solo.push(
            res["choices"][0]["text"]
                .as_str()
                .expect("text")
                .to_string(),
        );
    }
    let (_, before) = get(&server.url("/health")).await;
    let steps_before = before["instances"][0]["batch"]["steps"]
        .as_u64()
        .expect("steps");
    let together = futures_util::future::join_all(prompts.iter().map(|p| {
        let url = url.clone();
        let body = body(p);
        async move { post_json(&url, &body).await }
    }))
    .await;
    for ((status, res), expected) in together.iter().zip(&solo) {
        assert_eq!(*status, 200, "{res}");
        assert_eq!(res["usage"]["completion_tokens"], 12);
        assert_eq!(
            res["choices"][0]["text"].as_str(),
            Some(expected.as_str()),
            "batched = solo"
        );
    }
    let (_, after) = get(&server.url("/health")).await;
    let steps = after["instances"][0]["batch"]["steps"]
        .as_u64()
        .expect("steps")
        - steps_before;
    // Alone, 6 × 12 tokens take 72 passes; sharing passes needs far fewer.
    assert!(
        steps <= 36,
        "{steps} forward passes for 6 concurrent requests of 12 tokens"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn a_stream_survives_its_engine_panicking_and_reads_as_if_nothing_happened() {
    let config =
        "engine.kind = \"model\"\nengine.devices = [\"cpu:0\", \"cpu:1\"]\nmigration.limit = 3\n\
                  faults.enabled = true\nfaults.admin_endpoint = true\n";
    let server = start(config).await;
    let url = server.url("/v1/completions");
    let body = json!({"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 16,
                      "ignore_eos": true, "stream": true});
    let (_, clean, _) = post_sse(&url, &body).await;
    let text = |sse: &str| -> String {
        sse_json(sse)
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str().map(String::from))
            .collect()
    };
    let expected = text(&clean);
    let (status, armed) = post_json(
        &server.url("/admin/faults"),
        &json!({"kind": "engine_panic", "after_tokens": 5}),
    )
    .await;
    assert_eq!(status, 200, "{armed}");
    let (status, faulted, _) = post_sse(&url, &body).await;
    assert_eq!(status, 200);
    assert!(faulted.ends_with("data: [DONE]\n\n"), "{faulted}");
    assert_eq!(
        text(&faulted),
        expected,
        "migrated greedy stream = clean stream"
    );
    // The restart is reported to the supervisor asynchronously: wait for it to be counted.
    let mut restarted = false;
    for _ in 0..100 {
        let metrics = get_text(&server.url("/metrics")).await;
        if metrics.contains("dynamo_frontend_actor_restarts_total{actor=\"engine\"") {
            restarted = true;
            break;
        }
        actix_rt::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(restarted, "the engine restart is counted");
    server.stop().await;
}

#[actix_rt::test]
async fn the_official_openai_sdk_accepts_the_model_responses() {
    let server = start(MODEL_ENGINE).await;
    run_sdk_script(
        "openai_model.py",
        vec![server.base.clone(), MODEL.to_string()],
        "model conformance: all checks passed",
    )
    .await;
    server.stop().await;
}

/// A child process that is killed and reaped when dropped, so a failing test leaves nothing running.
struct Reaped(std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `dynamix` process serving the model with its weights through the memory service at `socket`;
/// returns it, its base URL and how it loaded the weights (the log line).
fn serve_through_gms(socket: &std::path::Path) -> (Reaped, String, String) {
    serve_with_gms(socket, "")
}

/// Like [`serve_through_gms`], with `extra` lines in `[model_engine]`.
fn serve_with_gms(socket: &std::path::Path, extra: &str) -> (Reaped, String, String) {
    let dir = std::env::temp_dir().join(format!("dynamix-gms-serve-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\nhost = \"127.0.0.1\"\nport = 0\n[engine]\nkind = \"model\"\n[model_engine]\ngms_socket = {:?}\n{extra}",
            socket.display().to_string()
        ),
    )
    .expect("config");
    let served = spawn_serving(
        Command::new(env!("CARGO_BIN_EXE_dynamix"))
            .arg("--config")
            .arg(&config)
            .env("DYN_LOG", "info"),
    );
    let how = served
        .early
        .iter()
        .rev()
        .find(|line| line.contains("model weights loaded"))
        .cloned()
        .unwrap_or_default();
    (Reaped(served.child), served.base, how)
}

#[actix_rt::test]
async fn a_crashed_worker_restarts_from_the_memory_service_instead_of_the_gguf() {
    let dir = std::env::temp_dir().join(format!("dynamix-gms-model-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("weights.sock");
    let mut gms = Reaped(
        Command::new(env!("CARGO_BIN_EXE_dynamix"))
            .args(["gms", "--tag", "weights", "--socket"])
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn gms"),
    );
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (mut first, _, how) = serve_through_gms(&socket);
    assert!(
        how.contains("wrote the weights"),
        "first process writes: {how}"
    );
    first.kill().expect("SIGKILL the first worker");
    let _ = first.wait();
    let (mut second, base, how) = serve_through_gms(&socket);
    assert!(
        how.contains("mapped the weights"),
        "the restarted process maps them: {how}"
    );
    let mut body = ask("What is the capital of France?");
    body["max_tokens"] = json!(24);
    let (status, res) = post_json(&format!("{base}/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{res}");
    assert!(content(&res).contains("Paris"), "{res}");
    let _ = second.kill();
    let _ = second.wait();
    let _ = gms.kill();
    let _ = gms.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_rt::test]
async fn a_process_serving_the_memory_service_in_process_shares_its_weights_with_another() {
    let dir = std::env::temp_dir().join(format!("dynamix-gms-inproc-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("weights.sock");
    let (mut owner, _, how) = serve_with_gms(&socket, "gms_serve = true\n");
    assert!(
        how.contains("wrote the weights"),
        "the serving process writes: {how}"
    );
    let (mut other, base, how) = serve_through_gms(&socket);
    assert!(
        how.contains("mapped the weights"),
        "a second process maps them: {how}"
    );
    let mut body = ask("What is the capital of France?");
    body["max_tokens"] = json!(24);
    let (status, res) = post_json(&format!("{base}/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{res}");
    assert!(content(&res).contains("Paris"), "{res}");
    for child in [&mut other, &mut owner] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_rt::test]
async fn devices_auto_without_a_gpu_runs_the_model_on_the_cpu() {
    if dynamix_actors::engine::gpu::probe().is_ok() {
        eprintln!("skipped: this machine has a GPU, so `auto` takes it");
        return;
    }
    let server = start("engine.kind = \"model\"\nengine.devices = \"auto\"\n").await;
    let (status, health) = get(&server.url("/health")).await;
    assert_eq!(status, 200, "{health}");
    let instances = health["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 1, "{health}");
    assert_eq!(instances[0]["device"], "cpu:0", "{health}");
    let mut body = ask("What is the capital of France?");
    body["max_tokens"] = json!(4);
    let (status, res) = post_json(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{res}");
    server.stop().await;
}

#[actix_rt::test]
async fn an_explicit_cuda_device_without_a_driver_is_refused_naming_why() {
    if dynamix_actors::engine::gpu::probe().is_ok() {
        eprintln!("skipped: this machine has a GPU");
        return;
    }
    let config = test_config("engine.kind = \"model\"\nengine.devices = [\"cuda:0\"]\n");
    let error = match dynamix::start(&config, true).await {
        Ok(_) => panic!("started on cuda:0 without a GPU"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("engine.devices names cuda:0")
            && error.contains("GPU engine is unavailable"),
        "{error}"
    );
}
