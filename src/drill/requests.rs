//! What one drill request is, per driver: a streaming chat request on the serving path in-process
//! (gaps measured there; on the drill cluster's frontend for request-plane faults), the same over
//! HTTP, an embeddings request over HTTP, or a weights load through the memory service as a
//! restarting engine does it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dynamix_actors::engine::model::shared::{load_shared, Role};
use dynamix_actors::gms::BackendKind;
use dynamix_actors::supervisor::RunningService;
use dynamix_actors::validator::{ChatInput, RequestContext, ValidateChat};
use serde_json::{json, Value};

use super::cluster::Cluster;
use super::http;
use super::Outcome;

/// What the requests go to.
pub(super) struct Target {
    pub(super) service: Arc<RunningService>,
    /// The chat model.
    pub(super) model: String,
    /// The bound HTTP address, when a driver needs HTTP.
    pub(super) http: Option<SocketAddr>,
    /// The embedding model, when embeddings are served.
    pub(super) embeddings_model: Option<String>,
    /// The weights an engine loads through the memory service, when it serves them.
    pub(super) weights: Option<Weights>,
    /// The drill's own frontend and workers, when a fault lives between them.
    pub(super) cluster: Option<Cluster>,
}

impl Target {
    /// The services whose faults `driver`'s phases inject and count: the drill cluster's first
    /// worker for the request plane (one injector, so one fault per `every_ms` as elsewhere; the
    /// frontend keeps a worker whose stream broke out of routing until it answers a probe, and the
    /// others carry the load meanwhile), else the drill's service.
    pub(super) fn faulted(&self, driver: super::Driver) -> Vec<&RunningService> {
        match (driver, &self.cluster) {
            (super::Driver::ClusterChat, Some(cluster)) => cluster.workers.iter().take(1).collect(),
            _ => vec![&self.service],
        }
    }

    /// Every service the drill runs.
    pub(super) fn all(&self) -> Vec<&RunningService> {
        let mut all = vec![&*self.service];
        if let Some(cluster) = &self.cluster {
            all.push(&cluster.frontend);
            all.extend(&cluster.workers);
        }
        all
    }
}

/// A model file behind a memory service.
pub(super) struct Weights {
    pub(super) gguf: PathBuf,
    pub(super) socket: PathBuf,
    pub(super) lock_timeout: Duration,
}

/// The user message of drill request `i`: deterministic, 40–160 characters, some of them non-ASCII.
pub(super) fn message(i: usize) -> String {
    const WORDS: [&str; 12] = [
        "supervisor",
        "restart",
        "migration",
        "token",
        "stream",
        "engine",
        "router",
        "café",
        "naïve",
        "fault",
        "drill",
        "résumé",
    ];
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut text = format!("drill request {i}:");
    let target = 40 + (state % 121) as usize;
    while text.chars().count() < target {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push(' ');
        text.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
    }
    text
}

fn chat_body(model: &str, i: usize) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": message(i)}],
        "stream": true,
    })
}

/// A streaming chat request on `service`'s serving path below HTTP, with its recoveries.
pub(super) async fn chat(service: &RunningService, model: &str, i: usize) -> Outcome {
    let mut outcome = Outcome::default();
    let validated = match service
        .gateway
        .validate_chat(ValidateChat {
            input: ChatInput::Body(chat_body(model, i).to_string().into()),
            context: RequestContext {
                request_id: uuid::Uuid::new_v4().to_string(),
                pinned_engine: None,
            },
        })
        .await
    {
        Ok(v) => v,
        Err(e) => {
            outcome.error = Some(format!("validation: {}", e.message));
            return outcome;
        }
    };
    let mut generation = match service.gateway.generate(&validated).await {
        Ok(g) => g,
        Err(e) => {
            outcome.error = Some(format!("routing: {}", e.message));
            return outcome;
        }
    };
    while let Some(item) = generation.next().await {
        match item {
            Ok(delta) => {
                outcome.text.push_str(&delta.delta.text);
                outcome.units += u64::from(delta.delta.tokens);
            }
            Err(e) => {
                outcome.error = Some(e.message);
                break;
            }
        }
    }
    outcome.recoveries = generation
        .recoveries()
        .into_iter()
        .map(|r| (r.cause, r.gap))
        .collect();
    outcome
}

/// The `openai` SDK's default `max_retries`: a connection error, 408, 409, 429 or 5xx answer is
/// tried again, twice at most, before any of the response was used.
const CLIENT_RETRIES: u32 = 2;

/// POST as the `openai` SDK does (with its retries, a shorter backoff); the 200 response's body.
async fn post(
    addr: SocketAddr,
    path: &str,
    body: &Value,
    outcome: &mut Outcome,
) -> Option<Vec<u8>> {
    let body = body.to_string();
    let mut attempt = 0;
    loop {
        let answer = http::post(addr, path, body.as_bytes(), Duration::from_secs(120)).await;
        let retryable = match &answer {
            Err(_) => true,
            Ok(r) => matches!(r.status, 408 | 409 | 429) || r.status >= 500,
        };
        if retryable && attempt < CLIENT_RETRIES {
            attempt += 1;
            outcome.retries += 1;
            actix_rt::time::sleep(Duration::from_millis(25 << attempt)).await;
            continue;
        }
        match answer {
            Ok(r) if r.status == 200 => return Some(r.body),
            Ok(r) => {
                let text = String::from_utf8_lossy(&r.body);
                outcome.error = Some(format!("HTTP {}: {}", r.status, text.trim()));
            }
            Err(e) => outcome.error = Some(format!("HTTP: {e}")),
        }
        return None;
    }
}

/// The same streaming chat request over HTTP; its text from the SSE chunks.
pub(super) async fn chat_http(target: &Target, i: usize) -> Outcome {
    let mut outcome = Outcome::default();
    let Some(addr) = target.http else {
        outcome.error = Some("HTTP is not serving".into());
        return outcome;
    };
    let body = chat_body(&target.model, i);
    let Some(body) = post(addr, "/v1/chat/completions", &body, &mut outcome).await else {
        return outcome;
    };
    let mut done = false;
    for data in http::sse_data(&body) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(e) => {
                outcome.error = Some(format!("a chunk that is not JSON ({e}): {data}"));
                return outcome;
            }
        };
        if let Some(error) = chunk.get("error") {
            outcome.error = Some(format!("in-stream error: {error}"));
            return outcome;
        }
        if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str() {
            outcome.text.push_str(text);
            outcome.units += text.chars().count() as u64;
        }
    }
    if !done {
        outcome.error = Some("the stream ended without [DONE]".into());
    }
    outcome
}

/// An embeddings request over HTTP (one input, every third request two); its vectors.
pub(super) async fn embeddings(target: &Target, i: usize) -> Outcome {
    let mut outcome = Outcome::default();
    let (Some(addr), Some(model)) = (target.http, &target.embeddings_model) else {
        outcome.error = Some("embeddings are not served".into());
        return outcome;
    };
    let input = match i % 3 {
        0 => json!([message(i), message(i + 1)]),
        _ => json!(message(i)),
    };
    let body = json!({"model": model, "input": input});
    let Some(body) = post(addr, "/v1/embeddings", &body, &mut outcome).await else {
        return outcome;
    };
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let Some(data) = parsed["data"].as_array() else {
        outcome.error = Some(format!(
            "no data in the answer: {}",
            String::from_utf8_lossy(&body)
        ));
        return outcome;
    };
    for item in data {
        let vector = item["embedding"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        outcome
            .values
            .extend(vector.iter().map(|v| v.as_f64().unwrap_or(f64::NAN) as f32));
        outcome.units += 1;
    }
    outcome
}

/// A weights load through the memory service, as a restarting engine does it: a reader session
/// that maps the committed layout and copies the tensors out.
pub(super) async fn weights(target: &Target, _i: usize) -> Outcome {
    let mut outcome = Outcome::default();
    let Some(weights) = &target.weights else {
        outcome.error = Some("no memory service serves the weights".into());
        return outcome;
    };
    let (gguf, socket, timeout) = (
        weights.gguf.clone(),
        weights.socket.clone(),
        weights.lock_timeout,
    );
    let loaded = actix_rt::task::spawn_blocking(move || {
        load_shared(&gguf, &socket, BackendKind::Host, 0, timeout)
            .map(|(model, role)| (model.shape.layers, role))
    })
    .await;
    match loaded {
        Ok(Ok((layers, role))) => {
            let role = match role {
                Role::Reader => "mapped",
                Role::Writer => "written",
            };
            outcome.text = format!("{role} {layers} layers");
            outcome.units = 1;
        }
        Ok(Err(e)) => outcome.error = Some(e.to_string()),
        Err(e) => outcome.error = Some(format!("the load's thread failed: {e}")),
    }
    outcome
}
