//! Requests for Text-input models (python-sdk spec §7.2): the client's OpenAI body goes to a worker
//! as it came; the worker's chunks come back as SSE frames in order, or folded into one
//! `chat.completion` / `text_completion`. The frontend fills a missing `id`, `object`, `created` or
//! `model`, and refuses a chunk that is not an object with a `choices` list (an internal error
//! naming it). A worker's error item is the client's status (non-streaming) or an in-stream error
//! frame after the chunks before it.

use std::collections::BTreeMap;

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use dynamix_wire::client::{CallError, ResponseStream};
use serde_json::{json, Map, Value};

use super::openai::Accepted;
use super::request::error_response;
use super::stream::RequestTracker;
use super::{Admission, AppState};
use crate::distributed::lanes::Lane;
use crate::distributed::text::TextModel;
use crate::error::{ApiError, ErrorClass};
use crate::metrics::{Endpoint, RequestType};
use crate::protocol::responses::ResponsesRequest;
use crate::validator::parse_lenient;

/// Which path serves a request.
pub(super) enum Target {
    /// The frontend's own model (or none: its validator answers for unknown names).
    Own,
    /// A Text model: the body goes to a worker as it came.
    Text(TextModel),
    /// Another Tokens model, on its own serving path.
    Lane(Lane),
}

/// The path that serves the model a request body names on `endpoint`. The body is parsed a second
/// time only when the frontend serves Text models or more Tokens models than its own.
pub(super) fn target(state: &AppState, endpoint: Endpoint, body: &[u8]) -> Target {
    let text = state.cluster.text_models.get().filter(|m| !m.is_empty());
    let lanes = state.cluster.lanes.get().filter(|l| !l.is_empty());
    if text.is_none() && lanes.is_none() {
        // The common case: no second parse of the body on the request path.
        return Target::Own;
    }
    #[derive(serde::Deserialize)]
    struct ModelOnly {
        model: Option<String>,
    }
    let Some(name) = serde_json::from_slice::<ModelOnly>(body)
        .ok()
        .and_then(|m| m.model)
    else {
        return Target::Own;
    };
    let text_route = matches!(
        endpoint,
        Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses
    );
    if let Some(model) = text.filter(|_| text_route).and_then(|t| t.get(&name)) {
        return Target::Text(model);
    }
    if let Some(lane) = lanes.and_then(|l| l.get(&name)) {
        // A route the model's type lacks answers as for an unknown model (404).
        let fits = match endpoint {
            Endpoint::ChatCompletions | Endpoint::Responses => lane.chat,
            Endpoint::Completions => lane.completions,
            _ => false,
        };
        if fits {
            return Target::Lane(lane);
        }
    }
    Target::Own
}

/// Which OpenAI object the chunks make.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn chunk_object(self) -> &'static str {
        match self {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl-",
            Kind::Completion => "cmpl-",
        }
    }
}

pub(super) fn call_error(error: CallError) -> ApiError {
    match error {
        CallError::Remote(e) => ApiError::from(&e),
        CallError::Unavailable(text) => ApiError::new(ErrorClass::Unavailable, text),
        CallError::Disconnected(text) => ApiError::new(
            ErrorClass::Internal,
            format!("the worker's stream ended before it completed: {text}"),
        ),
        CallError::Encode(text) => ApiError::new(ErrorClass::Internal, text),
    }
}

/// Serve `accepted` (whose body names `model`) on `endpoint`.
pub(super) async fn serve(
    state: &AppState,
    req: &HttpRequest,
    endpoint: Endpoint,
    model: TextModel,
    accepted: Accepted,
) -> HttpResponse {
    let overload = state.config.overload_status_code;
    let kind = match endpoint {
        Endpoint::Completions if model.completions => Kind::Completion,
        Endpoint::ChatCompletions | Endpoint::Responses if model.chat => Kind::Chat,
        _ => return error_response(&ApiError::model_not_found(), overload),
    };
    let (body, stream, responses_request) = match request_body(endpoint, &model, &accepted.body) {
        Ok(parsed) => parsed,
        Err(error) => return error_response(&error, overload),
    };
    let request_id = accepted.context.request_id.clone();
    let (responses, progress) =
        match call(state, req, endpoint, &model, &request_id, &body, stream).await {
            Ok(called) => called,
            Err(response) => return response,
        };
    if let Some(request) = responses_request {
        return super::text_responses::answer(
            &request,
            &model.name,
            stream,
            responses,
            progress,
            accepted.admission,
            overload,
        )
        .await;
    }
    let fill = Fill {
        kind,
        id: format!("{}{request_id}", kind.id_prefix()),
        model: model.name.clone(),
        created: now(),
    };
    if stream {
        return HttpResponse::Ok()
            .insert_header((CONTENT_TYPE, "text/event-stream"))
            .insert_header((CACHE_CONTROL, "no-cache"))
            .streaming(sse(responses, fill, overload, progress, accepted.admission));
    }
    let mut progress = progress;
    match fold(responses, &fill, &mut progress).await {
        Ok(body) => {
            progress.tracker.success();
            HttpResponse::Ok().json(body)
        }
        Err(error) => {
            progress.tracker.error(&error);
            error_response(&error, overload)
        }
    }
}

/// The body the worker gets, whether the client streams, and for `/v1/responses` the request it
/// answers: the client's object as it came, or a Responses request made a chat request.
fn request_body(
    endpoint: Endpoint,
    model: &TextModel,
    body: &[u8],
) -> Result<(Value, bool, Option<ResponsesRequest>), ApiError> {
    if endpoint == Endpoint::Responses {
        let request: ResponsesRequest = parse_lenient(body)?;
        request.check()?;
        let mut chat = serde_json::to_value(request.to_chat()?)
            .map_err(|e| ApiError::internal(format!("cannot build the chat request: {e}")))?;
        strip_nulls(&mut chat);
        chat["model"] = json!(model.name);
        let stream = request.stream == Some(true);
        return Ok((chat, stream, Some(request)));
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => {
            let stream = map.get("stream").and_then(Value::as_bool) == Some(true);
            Ok((Value::Object(map), stream, None))
        }
        Ok(_) => Err(ApiError::new(
            ErrorClass::BadRequest,
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            ErrorClass::BadRequest,
            format!("the request body is not valid JSON: {e}"),
        )),
    }
}

/// Drops every `null` member, as a client that leaves optional fields out sends them.
fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Send `body` to an instance of `model`, counted and registered in flight like every request;
/// the worker's stream, or the error response.
async fn call(
    state: &AppState,
    req: &HttpRequest,
    endpoint: Endpoint,
    model: &TextModel,
    request_id: &str,
    body: &Value,
    stream: bool,
) -> Result<(ResponseStream, Progress), HttpResponse> {
    let overload = state.config.overload_status_code;
    let Some(models) = state.cluster.text_models.get() else {
        return Err(error_response(&ApiError::model_not_found(), overload));
    };
    // Counted like every request; a chunk stands for a token (TTFT, ITL, output count), since the
    // frontend has no tokenizer for a Text model.
    let request_type = if stream {
        RequestType::Stream
    } else {
        RequestType::Unary
    };
    let mut tracker = RequestTracker::new(
        state
            .metrics
            .request_guard(&model.name, endpoint, request_type),
        0,
    );
    // Client metadata reaches the handler as `context.metadata` (x-dynamo-meta-<key>).
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .filter(|(name, _)| {
            name.as_str().starts_with("x-dynamo-meta-") || name.as_str() == "traceparent"
        })
        .filter_map(|(name, value)| {
            Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
        })
        .collect();
    match models.call(model, request_id, body, headers).await {
        Ok((instance, responses)) => {
            let inflight = state.inflight.register(request_id, 0, instance);
            Ok((responses, Progress { tracker, inflight }))
        }
        Err(e) => {
            let error = call_error(e);
            tracker.error(&error);
            Err(error_response(&error, overload))
        }
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What the frontend fills in when a chunk lacks it.
struct Fill {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
}

impl Fill {
    /// The chunk inside `envelope`, checked and completed.
    fn chunk(&self, envelope: Value) -> Result<Map<String, Value>, ApiError> {
        let data = envelope.get("data").cloned().unwrap_or(Value::Null);
        let Value::Object(mut chunk) = data else {
            return Err(not_a_chunk(&data));
        };
        if !chunk.get("choices").is_some_and(Value::is_array) {
            return Err(not_a_chunk(&Value::Object(chunk)));
        }
        chunk.entry("id").or_insert_with(|| json!(self.id));
        chunk
            .entry("object")
            .or_insert_with(|| json!(self.kind.chunk_object()));
        chunk
            .entry("created")
            .or_insert_with(|| json!(self.created));
        chunk.entry("model").or_insert_with(|| json!(self.model));
        Ok(chunk)
    }
}

pub(super) fn not_a_chunk(data: &Value) -> ApiError {
    let mut text = data.to_string();
    if text.len() > 200 {
        let mut cut = 200;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    ApiError::new(
        ErrorClass::Internal,
        format!("the worker sent a chunk that is not an object with a `choices` list: {text}"),
    )
}

/// A request's metrics and its in-flight registry entry (dropped when the request ends).
pub(super) struct Progress {
    pub(super) tracker: RequestTracker,
    inflight: crate::gateway::inflight::InflightHandle,
}

impl Progress {
    /// One chunk delivered.
    pub(super) fn chunk(&mut self) {
        self.tracker.tokens(1);
        self.inflight
            .entry()
            .tokens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

struct SseState {
    responses: ResponseStream,
    fill: Fill,
    overload: u16,
    done: bool,
    progress: Progress,
    _admission: Admission,
}

fn sse(
    responses: ResponseStream,
    fill: Fill,
    overload: u16,
    progress: Progress,
    admission: Admission,
) -> impl futures_util::Stream<Item = Result<Bytes, actix_web::Error>> {
    let state = SseState {
        responses,
        fill,
        overload,
        done: false,
        progress,
        _admission: admission,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        let frame = match state.responses.next().await {
            None => {
                state.done = true;
                state.progress.tracker.success();
                "data: [DONE]\n\n".to_string()
            }
            Some(Ok(envelope)) => match state.fill.chunk(envelope) {
                Ok(chunk) => {
                    state.progress.chunk();
                    format!("data: {}\n\n", Value::Object(chunk))
                }
                Err(error) => {
                    tracing::error!("{}", error.message);
                    state.done = true;
                    state.progress.tracker.error(&error);
                    format!("{}data: [DONE]\n\n", error.sse_frame(state.overload))
                }
            },
            Some(Err(e)) => {
                state.done = true;
                let error = call_error(e);
                state.progress.tracker.error(&error);
                format!("{}data: [DONE]\n\n", error.sse_frame(state.overload))
            }
        };
        Some((Ok(Bytes::from(frame)), state))
    })
}

/// One choice being folded.
#[derive(Default)]
struct Choice {
    content: Option<String>,
    reasoning: Option<String>,
    tool_calls: Vec<Value>,
    finish_reason: Value,
    logprobs: Value,
}

/// Add one streamed tool-call delta to the calls folded so far, as OpenAI streams them: deltas with
/// the same `index` are one call, whose `id`, `type` and `function.name` come once and whose
/// `function.arguments` arrive in pieces. A delta without an `index` is a call of its own.
fn merge_tool_call(calls: &mut Vec<Value>, delta: &Value) {
    let index = delta.get("index").and_then(Value::as_u64);
    let existing = index.and_then(|i| {
        calls
            .iter_mut()
            .find(|c| c.get("index").and_then(Value::as_u64) == Some(i))
    });
    let Some(call) = existing else {
        calls.push(delta.clone());
        return;
    };
    for field in ["id", "type"] {
        if call.get(field).is_none_or(Value::is_null) {
            if let Some(value) = delta.get(field).filter(|v| !v.is_null()) {
                call[field] = value.clone();
            }
        }
    }
    let Some(piece) = delta.get("function").filter(|f| f.is_object()) else {
        return;
    };
    if !call.get("function").is_some_and(Value::is_object) {
        call["function"] = json!({});
    }
    let function = &mut call["function"];
    if function.get("name").is_none_or(Value::is_null) {
        if let Some(name) = piece.get("name").filter(|v| !v.is_null()) {
            function["name"] = name.clone();
        }
    }
    if let Some(more) = piece.get("arguments").and_then(Value::as_str) {
        let so_far = function
            .get("arguments")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        function["arguments"] = json!(so_far + more);
    }
}

/// Fold every chunk into one response (spec §7.2): content concatenated per choice, role
/// `assistant`, the last `finish_reason`, `usage` from the chunk that had it.
async fn fold(
    mut responses: ResponseStream,
    fill: &Fill,
    progress: &mut Progress,
) -> Result<Value, ApiError> {
    let mut choices: BTreeMap<u64, Choice> = BTreeMap::new();
    let mut head: Option<Map<String, Value>> = None;
    let mut usage = Value::Null;
    while let Some(item) = responses.next().await {
        let chunk = fill.chunk(item.map_err(call_error)?)?;
        progress.chunk();
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            usage = u.clone();
        }
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            let folded = choices.entry(index).or_default();
            let piece = match fill.kind {
                Kind::Chat => choice.get("delta"),
                Kind::Completion => Some(choice),
            };
            let text_field = match fill.kind {
                Kind::Chat => "content",
                Kind::Completion => "text",
            };
            if let Some(text) = piece
                .and_then(|p| p.get(text_field))
                .and_then(Value::as_str)
            {
                folded
                    .content
                    .get_or_insert_with(String::new)
                    .push_str(text);
            }
            if let Some(text) = piece
                .and_then(|p| p.get("reasoning_content"))
                .and_then(Value::as_str)
            {
                folded
                    .reasoning
                    .get_or_insert_with(String::new)
                    .push_str(text);
            }
            if let Some(calls) = piece
                .and_then(|p| p.get("tool_calls"))
                .and_then(Value::as_array)
            {
                for call in calls {
                    merge_tool_call(&mut folded.tool_calls, call);
                }
            }
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                folded.finish_reason = reason.clone();
            }
            if let Some(logprobs) = choice.get("logprobs").filter(|l| !l.is_null()) {
                folded.logprobs = logprobs.clone();
            }
        }
        head.get_or_insert(chunk);
    }
    let head = head.unwrap_or_default();
    let field = |name: &str, default: Value| head.get(name).cloned().unwrap_or(default);
    let choices: Vec<Value> = choices
        .into_iter()
        .map(|(index, c)| match fill.kind {
            Kind::Chat => {
                let mut message = json!({"role": "assistant", "content": c.content});
                if let Some(reasoning) = c.reasoning {
                    message["reasoning_content"] = json!(reasoning);
                }
                if !c.tool_calls.is_empty() {
                    // A whole call has no stream `index`.
                    let calls = c.tool_calls.into_iter().map(|mut call| {
                        if let Some(fields) = call.as_object_mut() {
                            fields.remove("index");
                        }
                        call
                    });
                    message["tool_calls"] = Value::Array(calls.collect());
                }
                json!({"index": index, "message": message, "finish_reason": c.finish_reason,
                       "logprobs": c.logprobs})
            }
            Kind::Completion => json!({"index": index, "text": c.content.unwrap_or_default(),
                                       "finish_reason": c.finish_reason, "logprobs": c.logprobs}),
        })
        .collect();
    let object = match fill.kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    let mut body = json!({
        "id": field("id", json!(fill.id)),
        "object": object,
        "created": field("created", json!(fill.created)),
        "model": field("model", json!(fill.model)),
        "choices": choices,
    });
    if !usage.is_null() {
        body["usage"] = usage;
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_tool_call_deltas_fold_into_whole_calls() {
        let deltas = [
            json!({"index": 0, "id": "call_a", "type": "function",
                   "function": {"name": "get_weather", "arguments": ""}}),
            json!({"index": 0, "function": {"arguments": "{\"city\": "}}),
            json!({"index": 1, "id": "call_b", "type": "function",
                   "function": {"name": "get_time", "arguments": "{}"}}),
            json!({"index": 0, "function": {"arguments": "\"Paris\"}"}}),
        ];
        let mut calls = Vec::new();
        for delta in &deltas {
            merge_tool_call(&mut calls, delta);
        }
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["id"], "call_a");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\": \"Paris\"}");
        assert_eq!(calls[1]["function"]["arguments"], "{}");
    }

    #[test]
    fn chunks_get_what_they_lack_and_non_chunks_are_named() {
        let fill = Fill {
            kind: Kind::Chat,
            id: "chatcmpl-r1".into(),
            model: "bot".into(),
            created: 7,
        };
        let chunk = fill
            .chunk(json!({"data": {"choices": [], "model": "own"}}))
            .unwrap();
        assert_eq!(chunk["id"], "chatcmpl-r1");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["created"], 7);
        assert_eq!(chunk["model"], "own");
        let error = fill.chunk(json!({"data": "just text"})).unwrap_err();
        assert_eq!(error.class, ErrorClass::Internal);
        assert!(error.message.contains("\"just text\""), "{}", error.message);
    }
}
