//! `/v1/responses` for a Text-input Chat model (python-sdk spec §7: a Chat model answers it as a
//! local model does). The Responses request went to the worker as a chat request
//! ([`text::serve`](super::text::serve)); here the worker's chat chunks become the response: the
//! text of each chunk's first choice is one output-text delta, the worker's `usage` (or, without
//! one, a count of chunks) is the response's usage, and an error is a `response.failed` event or
//! the client's status.

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::HttpResponse;
use bytes::Bytes;
use dynamix_wire::client::ResponseStream;
use serde_json::Value;

use super::request::error_response;
use super::stream::{Framer, ResponsesFramer};
use super::text::{call_error, not_a_chunk, Progress};
use super::Admission;
use crate::backend::Delta;
use crate::error::ApiError;
use crate::gateway::ChoiceDelta;
use crate::protocol::responses::{ResponseBuilder, ResponsesRequest};
use crate::protocol::Usage;

/// What one worker item adds: the first choice's text, and the usage when the chunk has one.
fn piece(item: Value) -> Result<(String, Option<Usage>), ApiError> {
    let chunk = item.get("data").cloned().unwrap_or(Value::Null);
    let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
        return Err(not_a_chunk(&chunk));
    };
    let text = choices
        .iter()
        .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
        .and_then(|c| c.pointer("/delta/content"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let usage = chunk.get("usage").filter(|u| u.is_object()).map(|u| {
        let count = |field: &str| u.get(field).and_then(Value::as_u64).unwrap_or(0) as u32;
        Usage::new(count("prompt_tokens"), count("completion_tokens"))
    });
    Ok((text, usage))
}

fn delta(text: String) -> ChoiceDelta {
    ChoiceDelta {
        index: 0,
        delta: Delta {
            text,
            tokens: 1,
            finish_reason: None,
            logprobs: Vec::new(),
        },
    }
}

/// Everything the response's SSE body owns; dropping it (client gone) drops the worker's stream,
/// which stops the handler.
struct Events {
    responses: ResponseStream,
    framer: ResponsesFramer,
    progress: Progress,
    chunks: u32,
    usage: Option<Usage>,
    overload: u16,
    opening: Option<String>,
    done: bool,
    _admission: Admission,
}

impl Events {
    async fn next_frame(&mut self) -> Option<String> {
        if let Some(opening) = self.opening.take() {
            return Some(opening);
        }
        loop {
            if self.done {
                return None;
            }
            let failed = match self.responses.next().await {
                None => {
                    self.done = true;
                    self.progress.tracker.success();
                    let usage = self
                        .usage
                        .take()
                        .unwrap_or_else(|| Usage::new(0, self.chunks));
                    return Some(self.framer.closing(usage, true));
                }
                Some(Ok(item)) => match piece(item) {
                    Ok((text, usage)) => {
                        self.chunks += 1;
                        self.progress.chunk();
                        self.usage = usage.or(self.usage.take());
                        match self.framer.delta(&delta(text)) {
                            Some(frame) => return Some(frame),
                            None => continue,
                        }
                    }
                    Err(error) => error,
                },
                Some(Err(e)) => call_error(e),
            };
            self.done = true;
            self.progress.tracker.error(&failed);
            return Some(self.framer.error(&failed, self.overload));
        }
    }
}

/// Answer `request` from the worker's chat chunks: SSE events when `stream`, else the response
/// object.
pub(super) async fn answer(
    request: &ResponsesRequest,
    model: &str,
    stream: bool,
    mut responses: ResponseStream,
    mut progress: Progress,
    admission: Admission,
    overload: u16,
) -> HttpResponse {
    let mut framer = ResponsesFramer::new(ResponseBuilder::new(request, model));
    if stream {
        let events = Events {
            responses,
            opening: Some(framer.opening()),
            framer,
            progress,
            chunks: 0,
            usage: None,
            overload,
            done: false,
            _admission: admission,
        };
        let body = futures_util::stream::unfold(events, |mut events| async move {
            let frame = events.next_frame().await?;
            Some((Ok::<_, actix_web::Error>(Bytes::from(frame)), events))
        });
        return HttpResponse::Ok()
            .insert_header((CONTENT_TYPE, "text/event-stream"))
            .insert_header((CACHE_CONTROL, "no-cache"))
            .streaming(body);
    }
    let (mut chunks, mut usage) = (0u32, None);
    while let Some(item) = responses.next().await {
        match item.map_err(call_error).and_then(piece) {
            Ok((text, reported)) => {
                chunks += 1;
                progress.chunk();
                usage = reported.or(usage);
                framer.fold(&delta(text));
            }
            Err(error) => {
                progress.tracker.error(&error);
                return error_response(&error, overload);
            }
        }
    }
    progress.tracker.success();
    HttpResponse::Ok()
        .content_type(actix_web::http::header::ContentType::json())
        .body(framer.folded(usage.unwrap_or_else(|| Usage::new(0, chunks))))
}
