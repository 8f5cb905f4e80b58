//! The inference routes: `/v1/chat/completions`, `/v1/completions`, `/v1/responses` (and its
//! `input_tokens` estimate). Every handler runs one path (§2.1, [`inference`]): content type, body,
//! readiness, its own validation on the validator actor, routing, then stream or fold.

use std::time::Duration;

use actix_web::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde::Deserialize;

use super::request::{check_content_type, error_response, read_body, request_context, PeerSocket};
use super::stream::{
    fold, sse_body, ChatFramer, CompletionFramer, Framer, RequestTracker, ResponsesFramer,
    SseOptions,
};
use super::text::Target;
use super::{Admission, AppState};
use crate::error::{ApiError, ErrorClass};
use crate::gateway::Gateway;
use crate::metrics::{Endpoint, RequestType};
use crate::protocol::responses::{ResponseBuilder, ResponsesRequest};
use crate::validator::{
    parse_lenient, ChatInput, RequestContext, ValidateChat, ValidateCompletion, ValidatedRequest,
    ValidatorPool,
};

/// What the first steps produce for every inference route.
pub(super) struct Accepted {
    pub(super) body: Bytes,
    pub(super) context: RequestContext,
    pub(super) admission: Admission,
}

/// Content type (415), readiness (503), body (413/400), headers (431).
pub(super) async fn accept(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Accepted, ApiError> {
    check_content_type(req)?;
    let body = read_body(payload, state.config.body_limit_mb).await?;
    let admission = state.lifecycle.admit().ok_or_else(ApiError::not_ready)?;
    if state.faults.on_http() {
        panic!("injected fault: HTTP handler panics while accepting a request");
    }
    let context = request_context(req.headers())?;
    Ok(Accepted {
        body,
        context,
        admission,
    })
}

/// Count a request that failed before it had a tracker, and render the error.
pub(super) fn reject(
    state: &AppState,
    endpoint: Endpoint,
    body: Option<&[u8]>,
    stream_hint: bool,
    error: &ApiError,
) -> HttpResponse {
    let model = body
        .map(|b| model_label(state, b))
        .unwrap_or_else(|| "unknown".into());
    let request_type = if stream_hint {
        RequestType::Stream
    } else {
        RequestType::Unary
    };
    let mut guard = state.metrics.request_guard(&model, endpoint, request_type);
    guard.mark_error(error.class.metric_label());
    if error.class == ErrorClass::Overloaded {
        state.metrics.rejection(&model, endpoint);
    }
    error_response(error, state.config.overload_status_code)
}

/// The model label for a request that failed early; names we do not serve collapse to `unknown` so
/// clients cannot grow the label set.
fn model_label(state: &AppState, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ModelOnly {
        model: Option<String>,
    }
    match serde_json::from_slice::<ModelOnly>(body)
        .ok()
        .and_then(|m| m.model)
    {
        Some(m)
            if m == state.model.name
                || state.model.aliases.contains(&m)
                || serves_embeddings(state, &m)
                || serves_lane(state, &m) =>
        {
            m
        }
        _ => "unknown".into(),
    }
}

fn serves_lane(state: &AppState, model: &str) -> bool {
    state
        .cluster
        .lanes
        .get()
        .is_some_and(|l| l.get(model).is_some())
}

fn serves_embeddings(state: &AppState, model: &str) -> bool {
    state
        .embeddings
        .as_ref()
        .is_some_and(|e| e.card().name == model)
}

fn sse_response<F: Framer>(
    state: &AppState,
    validated: &ValidatedRequest,
    generation: crate::gateway::Generation,
    framer: F,
    tracker: RequestTracker,
    admission: Admission,
) -> HttpResponse {
    let keep_alive = (state.config.sse_keep_alive_interval_ms > 0)
        .then(|| Duration::from_millis(state.config.sse_keep_alive_interval_ms));
    let leading = validated.annotate_request_id.then(|| {
        format!(
            "event: request_id\n: {}\n\n",
            serde_json::Value::String(validated.request_id.clone())
        )
    });
    let body = sse_body(
        generation,
        framer,
        tracker,
        admission,
        SseOptions {
            include_usage: validated.include_usage,
            overload_status: state.config.overload_status_code,
            keep_alive,
            leading,
        },
    );
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "text/event-stream"))
        .insert_header((CACHE_CONTROL, "no-cache"))
        .streaming(body)
}

/// Route, then stream or fold: shared by every inference route once validation passed.
async fn serve<F: Framer>(
    state: &AppState,
    gateway: &Gateway,
    peer: Option<PeerSocket>,
    endpoint: Endpoint,
    (validated, mut framer, stream): (ValidatedRequest, F, bool),
    admission: Admission,
) -> HttpResponse {
    let request_type = if stream {
        RequestType::Stream
    } else {
        RequestType::Unary
    };
    let guard = state
        .metrics
        .request_guard(&validated.model, endpoint, request_type);
    let mut tracker = RequestTracker::new(guard, validated.prompt_tokens as usize);
    let generation = match gateway.generate(&validated).await {
        Ok(g) => g,
        Err(error) => {
            tracker.error(&error);
            if error.class == ErrorClass::Overloaded {
                state.metrics.rejection(&validated.model, endpoint);
            }
            return error_response(&error, state.config.overload_status_code);
        }
    };
    if stream {
        return sse_response(state, &validated, generation, framer, tracker, admission);
    }
    let folded = async {
        match fold(generation, &mut framer, &mut tracker).await {
            Ok(body) => HttpResponse::Ok()
                .content_type(actix_web::http::header::ContentType::json())
                .body(body),
            Err(error) => error_response(&error, state.config.overload_status_code),
        }
    };
    let Some(peer) = peer else {
        return folded.await;
    };
    tokio::select! {
        response = folded => response,
        // The client hung up: dropping the fold drops the generation (cancelling the engines) and the
        // unsettled tracker counts the disconnect. Nobody reads this response.
        _ = peer.closed() => HttpResponse::build(actix_web::http::StatusCode::from_u16(499).unwrap_or_default()).finish(),
    }
}

/// What a route hands the shared path once its body is validated: the request, how to frame its
/// output, and whether to stream it.
type Validated<F> = Result<(ValidatedRequest, F, bool), ApiError>;

/// The one path of every inference route: accept (content type, body, readiness, headers), the
/// route's own validation, then route and stream or fold. A failure before routing is counted and
/// rendered the same way for every route.
async fn inference<F: Framer, V: std::future::Future<Output = Validated<F>>>(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    endpoint: Endpoint,
    validate: impl FnOnce(ValidatorPool, Bytes, RequestContext) -> V,
) -> HttpResponse {
    let accepted = match accept(&state, &req, payload).await {
        Ok(a) => a,
        Err(e) => return reject(&state, endpoint, None, false, &e),
    };
    let lane_gateway: Gateway;
    let gateway = match super::text::target(&state, endpoint, &accepted.body) {
        Target::Text(model) => {
            return super::text::serve(&state, &req, endpoint, model, accepted).await
        }
        Target::Lane(lane) => {
            lane_gateway = lane.gateway;
            &lane_gateway
        }
        Target::Own => &state.gateway,
    };
    let validator = gateway.validator.clone();
    let validated = match validate(validator, accepted.body.clone(), accepted.context).await {
        Ok(v) => v,
        Err(e) => return reject(&state, endpoint, Some(&accepted.body), false, &e),
    };
    serve(
        &state,
        gateway,
        req.conn_data::<PeerSocket>().cloned(),
        endpoint,
        validated,
        accepted.admission,
    )
    .await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    inference(
        req,
        payload,
        state,
        Endpoint::ChatCompletions,
        |validator, body, context| async move {
            let input = ChatInput::Body(body);
            let validated = validator.chat(ValidateChat { input, context }).await?;
            let framer = ChatFramer::new(
                &validated.request_id,
                &validated.model,
                validated.choices.len(),
            );
            let stream = validated.stream;
            Ok((validated, framer, stream))
        },
    )
    .await
}

/// `POST /v1/completions`.
pub async fn completions(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    inference(
        req,
        payload,
        state,
        Endpoint::Completions,
        |validator, body, context| async move {
            let validated = validator
                .completion(ValidateCompletion { body, context })
                .await?;
            let framer = CompletionFramer::new(
                &validated.request_id,
                &validated.model,
                validated.echo_prompt.clone(),
            );
            let stream = validated.stream;
            Ok((validated, framer, stream))
        },
    )
    .await
}

/// `POST /v1/responses`: converted to a chat request, run through the chat path, converted back.
pub async fn responses(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    inference(
        req,
        payload,
        state,
        Endpoint::Responses,
        |validator, body, context| async move {
            let request: ResponsesRequest = parse_lenient(&body)?;
            request.check()?;
            let input = ChatInput::Parsed(Box::new(request.to_chat()?));
            let validated = validator.chat(ValidateChat { input, context }).await?;
            let framer = ResponsesFramer::new(ResponseBuilder::new(&request, &validated.model));
            Ok((validated, framer, request.stream == Some(true)))
        },
    )
    .await
}

/// `POST /v1/responses/input_tokens`: upstream's estimate (text length / 3), no readiness or model check.
pub async fn responses_input_tokens(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let overload = state.config.overload_status_code;
    if let Err(e) = check_content_type(&req) {
        return error_response(&e, overload);
    }
    let body = match read_body(payload, state.config.body_limit_mb).await {
        Ok(b) => b,
        Err(e) => return error_response(&e, overload),
    };
    let value: serde_json::Value = match parse_lenient(&body) {
        Ok(v) => v,
        Err(e) => return error_response(&e, overload),
    };
    let mut chars = 0usize;
    count_text(
        value.get("input").unwrap_or(&serde_json::Value::Null),
        &mut chars,
    );
    if let Some(s) = value.get("instructions").and_then(|v| v.as_str()) {
        chars += s.chars().count();
    }
    HttpResponse::Ok()
        .json(serde_json::json!({"object": "response.input_tokens", "input_tokens": chars / 3}))
}

fn count_text(value: &serde_json::Value, chars: &mut usize) {
    match value {
        serde_json::Value::String(s) => *chars += s.chars().count(),
        serde_json::Value::Array(items) => items.iter().for_each(|v| count_text(v, chars)),
        serde_json::Value::Object(map) => {
            for key in ["content", "text"] {
                if let Some(v) = map.get(key) {
                    count_text(v, chars);
                }
            }
        }
        _ => {}
    }
}
