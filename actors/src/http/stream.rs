//! Turning a [`Generation`] into a response: SSE framing (§2.3) for streams, folding (§2.4) for unary
//! responses, and the per-request accounting that notices a client that went away.
//!
//! A [`Framer`] knows one API's wire format (chat chunks, completion chunks, Responses events); the SSE
//! body and the fold are written once over it.

use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde::Serialize;

use super::Admission;
use crate::backend::LogprobEntry;
use crate::error::ApiError;
use crate::gateway::{ChoiceDelta, Generation};
use crate::metrics::RequestGuard;
use crate::protocol::chat::{
    ChatChoice, ChatCompletionChunk, ChatCompletionResponse, ChunkChoice, ChunkDelta,
    ResponseMessage,
};
use crate::protocol::completions::{CompletionChoice, CompletionResponse};
use crate::protocol::responses::ResponseBuilder;
use crate::protocol::{FinishReason, Usage};

/// Metrics accounting for one request. Dropped before it was settled means the client went away.
pub struct RequestTracker {
    guard: RequestGuard,
    prompt_tokens: usize,
    settled: bool,
}

impl RequestTracker {
    /// Track a request with `prompt_tokens` input tokens.
    pub fn new(guard: RequestGuard, prompt_tokens: usize) -> Self {
        RequestTracker {
            guard,
            prompt_tokens,
            settled: false,
        }
    }

    /// Count generated tokens (TTFT, ITL, output tokens).
    pub fn tokens(&mut self, n: u32) {
        self.guard.observe_tokens(self.prompt_tokens, n as usize);
    }

    /// Prompt tokens served from the engine's prefix cache (`cached_tokens`; only the first call of a
    /// request counts).
    pub fn cached_tokens(&mut self, n: usize) {
        self.guard.observe_cached_tokens(n);
    }

    /// The request completed.
    pub fn success(&mut self) {
        self.settled = true;
        self.guard.mark_success();
    }

    /// The request failed with `error`.
    pub fn error(&mut self, error: &ApiError) {
        self.settled = true;
        self.guard.mark_error(error.class.metric_label());
    }
}

impl Drop for RequestTracker {
    fn drop(&mut self) {
        if !self.settled {
            self.guard.client_disconnected();
        }
    }
}

/// One API's response format.
pub trait Framer: Send + 'static {
    /// Frames sent before any delta.
    fn opening(&mut self) -> String {
        String::new()
    }
    /// The SSE frame(s) for one delta, or None when nothing is to be sent (counted, not sent).
    fn delta(&mut self, delta: &ChoiceDelta) -> Option<String>;
    /// Frames after the last delta, ending with `data: [DONE]`.
    fn closing(&mut self, usage: Usage, include_usage: bool) -> String;
    /// Frames for an in-stream error, ending the stream.
    fn error(&mut self, error: &ApiError, overload_status: u16) -> String {
        format!("{}data: [DONE]\n\n", error.sse_frame(overload_status))
    }
    /// Record a delta for the unary response.
    fn fold(&mut self, delta: &ChoiceDelta);
    /// The unary response body (JSON).
    fn folded(&mut self, usage: Usage) -> Vec<u8>;
}

/// `value` as a JSON body; `null` if it cannot be encoded (as a `Value` that failed to build wrote).
fn json_body(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec())
}

fn data_frame(value: &impl Serialize) -> String {
    match serde_json::to_string(value) {
        Ok(json) => format!("data: {json}\n\n"),
        Err(e) => ApiError::internal(format!("failed to encode a chunk: {e}")).sse_frame(500),
    }
}

/// Per-choice text, finish reason and log-probabilities collected while folding.
#[derive(Default, Clone)]
struct Folded {
    text: String,
    finish_reason: Option<FinishReason>,
    logprobs: Vec<LogprobEntry>,
}

fn fold_into(choices: &mut Vec<Folded>, delta: &ChoiceDelta) {
    let i = delta.index as usize;
    if choices.len() <= i {
        choices.resize(i + 1, Folded::default());
    }
    choices[i].text.push_str(&delta.delta.text);
    choices[i]
        .logprobs
        .extend(delta.delta.logprobs.iter().cloned());
    if delta.delta.finish_reason.is_some() {
        choices[i].finish_reason = delta.delta.finish_reason;
    }
}

/// Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(entries: &[LogprobEntry]) -> serde_json::Value {
    let item = |token: &str, bytes: &[u8], logprob: f32| serde_json::json!({"token": token, "logprob": logprob, "bytes": bytes});
    let content: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let mut v = item(&e.token, &e.bytes, e.logprob);
            v["top_logprobs"] = e.top.iter().map(|(t, b, l)| item(t, b, *l)).collect();
            v
        })
        .collect();
    serde_json::json!({ "content": content, "refusal": null })
}

/// Legacy completions `logprobs`: parallel `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`
/// (character offsets from `offset`, the characters before this delta in the choice's text).
fn completion_logprobs(entries: &[LogprobEntry], mut offset: usize) -> serde_json::Value {
    let mut text_offset = Vec::with_capacity(entries.len());
    for e in entries {
        text_offset.push(offset);
        offset += e.token.chars().count();
    }
    let top: Vec<serde_json::Map<String, serde_json::Value>> = entries
        .iter()
        .map(|e| {
            e.top
                .iter()
                .map(|(t, _, l)| (t.clone(), serde_json::json!(l)))
                .collect()
        })
        .collect();
    serde_json::json!({
        "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

/// `chat.completion.chunk` / `chat.completion`.
pub struct ChatFramer {
    id: String,
    model: String,
    created: u64,
    role_sent: Vec<bool>,
    folded: Vec<Folded>,
}

impl ChatFramer {
    /// For request `request_id`.
    pub fn new(request_id: &str, model: &str, choices: usize) -> Self {
        ChatFramer {
            id: format!("chatcmpl-{request_id}"),
            model: model.to_string(),
            created: crate::protocol::unix_now(),
            role_sent: vec![false; choices],
            folded: Vec::new(),
        }
    }

    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        }
    }
}

impl Framer for ChatFramer {
    fn delta(&mut self, d: &ChoiceDelta) -> Option<String> {
        if d.delta.text.is_empty() && d.delta.finish_reason.is_none() {
            return None;
        }
        let i = d.index as usize;
        let first = self.role_sent.get(i).is_some_and(|sent| !sent);
        if let Some(sent) = self.role_sent.get_mut(i) {
            *sent = true;
        }
        let delta = ChunkDelta {
            role: first.then_some("assistant"),
            content: (!d.delta.text.is_empty() || first).then(|| d.delta.text.clone()),
        };
        let choice = ChunkChoice {
            index: d.index,
            delta,
            finish_reason: d.delta.finish_reason,
            logprobs: (!d.delta.logprobs.is_empty()).then(|| chat_logprobs(&d.delta.logprobs)),
        };
        Some(data_frame(&self.chunk(vec![choice], None)))
    }

    fn closing(&mut self, usage: Usage, include_usage: bool) -> String {
        let mut out = String::new();
        if include_usage {
            out += &data_frame(&self.chunk(Vec::new(), Some(usage)));
        }
        out += "data: [DONE]\n\n";
        out
    }

    fn fold(&mut self, delta: &ChoiceDelta) {
        fold_into(&mut self.folded, delta);
    }

    fn folded(&mut self, usage: Usage) -> Vec<u8> {
        let choices = self
            .folded
            .iter_mut()
            .enumerate()
            .map(|(i, c)| ChatChoice {
                index: i as u32,
                message: ResponseMessage {
                    role: "assistant",
                    content: Some(std::mem::take(&mut c.text)),
                },
                finish_reason: c.finish_reason,
                logprobs: (!c.logprobs.is_empty()).then(|| chat_logprobs(&c.logprobs)),
            })
            .collect();
        let response = ChatCompletionResponse {
            id: self.id.clone(),
            object: "chat.completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        };
        json_body(&response)
    }
}

/// `text_completion` chunks and response.
pub struct CompletionFramer {
    id: String,
    model: String,
    created: u64,
    echo: Option<Vec<String>>,
    folded: Vec<Folded>,
    /// Characters streamed so far per choice (for `text_offset`).
    streamed_chars: Vec<usize>,
}

impl CompletionFramer {
    /// For request `request_id`; `echo` holds each choice's prompt when `echo: true`.
    pub fn new(request_id: &str, model: &str, echo: Option<Vec<String>>) -> Self {
        CompletionFramer {
            id: format!("cmpl-{request_id}"),
            model: model.to_string(),
            created: crate::protocol::unix_now(),
            echo,
            folded: Vec::new(),
            streamed_chars: Vec::new(),
        }
    }

    fn response(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        }
    }
}

impl Framer for CompletionFramer {
    fn opening(&mut self) -> String {
        let Some(echo) = &self.echo else {
            return String::new();
        };
        echo.iter()
            .enumerate()
            .map(|(i, text)| {
                let choice = CompletionChoice {
                    index: i as u32,
                    text: text.clone(),
                    finish_reason: None,
                    logprobs: None,
                };
                data_frame(&self.response(vec![choice], None))
            })
            .collect()
    }

    fn delta(&mut self, d: &ChoiceDelta) -> Option<String> {
        if d.delta.text.is_empty() && d.delta.finish_reason.is_none() {
            return None;
        }
        let i = d.index as usize;
        if self.streamed_chars.len() <= i {
            self.streamed_chars.resize(i + 1, 0);
        }
        let offset = self.streamed_chars[i]
            + self
                .echo
                .as_ref()
                .and_then(|e| e.get(i))
                .map_or(0, |p| p.chars().count());
        self.streamed_chars[i] += d.delta.text.chars().count();
        let choice = CompletionChoice {
            index: d.index,
            text: d.delta.text.clone(),
            finish_reason: d.delta.finish_reason,
            logprobs: (!d.delta.logprobs.is_empty())
                .then(|| completion_logprobs(&d.delta.logprobs, offset)),
        };
        Some(data_frame(&self.response(vec![choice], None)))
    }

    fn closing(&mut self, usage: Usage, include_usage: bool) -> String {
        let mut out = String::new();
        if include_usage {
            out += &data_frame(&self.response(Vec::new(), Some(usage)));
        }
        out += "data: [DONE]\n\n";
        out
    }

    fn fold(&mut self, delta: &ChoiceDelta) {
        fold_into(&mut self.folded, delta);
    }

    fn folded(&mut self, usage: Usage) -> Vec<u8> {
        let echo = self.echo.clone().unwrap_or_default();
        let choices = self
            .folded
            .iter()
            .enumerate()
            .map(|(i, c)| CompletionChoice {
                index: i as u32,
                text: format!(
                    "{}{}",
                    echo.get(i).map(String::as_str).unwrap_or(""),
                    c.text
                ),
                finish_reason: c.finish_reason,
                logprobs: (!c.logprobs.is_empty()).then(|| {
                    completion_logprobs(&c.logprobs, echo.get(i).map_or(0, |p| p.chars().count()))
                }),
            })
            .collect();
        json_body(&serde_json::to_value(self.response(choices, Some(usage))).unwrap_or_default())
    }
}

/// Responses API events and object.
pub struct ResponsesFramer {
    builder: ResponseBuilder,
}

impl ResponsesFramer {
    /// Around a response builder.
    pub fn new(builder: ResponseBuilder) -> Self {
        ResponsesFramer { builder }
    }
}

impl Framer for ResponsesFramer {
    fn opening(&mut self) -> String {
        self.builder.opening_events()
    }

    fn delta(&mut self, d: &ChoiceDelta) -> Option<String> {
        (!d.delta.text.is_empty()).then(|| self.builder.delta_event(&d.delta.text))
    }

    fn closing(&mut self, usage: Usage, _include_usage: bool) -> String {
        self.builder.closing_events(usage) + "data: [DONE]\n\n"
    }

    fn error(&mut self, error: &ApiError, overload_status: u16) -> String {
        self.builder
            .failed_event(error.status(overload_status), &error.message)
            + "data: [DONE]\n\n"
    }

    fn fold(&mut self, delta: &ChoiceDelta) {
        self.builder.push_text(&delta.delta.text);
    }

    fn folded(&mut self, usage: Usage) -> Vec<u8> {
        json_body(&self.builder.object("completed", Some(usage)))
    }
}

/// Everything an SSE body owns; dropping it (client gone) drops the generation, which cancels the engines.
struct SseBody<F: Framer> {
    generation: Generation,
    framer: F,
    tracker: RequestTracker,
    include_usage: bool,
    overload_status: u16,
    keep_alive: Option<tokio::time::Interval>,
    opening: Option<String>,
    done: bool,
    admission: Admission,
}

impl<F: Framer> SseBody<F> {
    async fn next_frame(&mut self) -> Option<String> {
        if let Some(opening) = self.opening.take() {
            if !opening.is_empty() {
                return Some(opening);
            }
        }
        loop {
            if self.done {
                return None;
            }
            let next = match &mut self.keep_alive {
                Some(interval) => tokio::select! {
                    item = self.generation.next() => item,
                    _ = interval.tick() => return Some(": keep-alive\n\n".to_string()),
                },
                None => self.generation.next().await,
            };
            if self.admission.is_killed() {
                // The drain gave up on this stream: it ends without `[DONE]`, as a killed stream does.
                self.done = true;
                self.tracker.error(&ApiError::new(
                    crate::error::ErrorClass::Cancelled,
                    "Request cancelled",
                ));
                return None;
            }
            match next {
                Some(Ok(delta)) => {
                    if let Some(cached) = self.generation.take_cached_tokens() {
                        self.tracker.cached_tokens(cached as usize);
                    }
                    self.tracker.tokens(delta.delta.tokens);
                    if let Some(frame) = self.framer.delta(&delta) {
                        return Some(frame);
                    }
                }
                Some(Err(error)) => {
                    self.done = true;
                    self.tracker.error(&error);
                    return Some(self.framer.error(&error, self.overload_status));
                }
                None => {
                    self.done = true;
                    self.tracker.success();
                    return Some(
                        self.framer
                            .closing(self.generation.usage(), self.include_usage),
                    );
                }
            }
        }
    }
}

/// How one SSE response is framed beyond its chunks.
pub struct SseOptions {
    /// Send the final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// Status written into an in-stream overload error.
    pub overload_status: u16,
    /// Comment frames this often while no data flows.
    pub keep_alive: Option<Duration>,
    /// Text sent before the first chunk (the `request_id` event).
    pub leading: Option<String>,
}

/// The SSE body stream of `generation`.
pub fn sse_body<F: Framer>(
    generation: Generation,
    mut framer: F,
    tracker: RequestTracker,
    admission: Admission,
    options: SseOptions,
) -> impl Stream<Item = Result<Bytes, actix_web::Error>> {
    let SseOptions {
        include_usage,
        overload_status,
        keep_alive,
        leading,
    } = options;
    let opening = leading.unwrap_or_default() + &framer.opening();
    let keep_alive = keep_alive.map(|period| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    let body = SseBody {
        generation,
        framer,
        tracker,
        include_usage,
        overload_status,
        keep_alive,
        opening: Some(opening),
        done: false,
        admission,
    };
    futures_util::stream::unfold(body, |mut body| async move {
        body.next_frame()
            .await
            .map(|frame| (Ok(Bytes::from(frame)), body))
    })
}

/// Fold `generation` into one JSON response body. The first error (before or during generation) is
/// returned.
pub async fn fold<F: Framer>(
    mut generation: Generation,
    framer: &mut F,
    tracker: &mut RequestTracker,
) -> Result<Vec<u8>, ApiError> {
    loop {
        match generation.next().await {
            Some(Ok(delta)) => {
                if let Some(cached) = generation.take_cached_tokens() {
                    tracker.cached_tokens(cached as usize);
                }
                tracker.tokens(delta.delta.tokens);
                framer.fold(&delta);
            }
            Some(Err(error)) => {
                tracker.error(&error);
                return Err(error);
            }
            None => {
                tracker.success();
                return Ok(framer.folded(generation.usage()));
            }
        }
    }
}
