//! The one error vocabulary of dynamix.
//!
//! Every failure that can reach a client is an [`ApiError`]: a closed [`ErrorClass`] plus the message a
//! client may see. The class is decided once, where the cause is understood; everything downstream derives
//! from it in exactly one place each: the HTTP status ([`ErrorClass::status`]), the reason phrase used as the
//! error body's `type` ([`ApiError::body`]), the in-stream SSE error frame ([`ApiError::sse_frame`]) and the
//! metric label `error_type` ([`ErrorClass::metric_label`]). Nothing parses messages to recover a class.

use serde_json::{json, Value};

use crate::supervision::ActorKind;

/// Default status for "all engines busy / admission queue full" (Dynamo's non-standard 529).
pub const DEFAULT_OVERLOAD_STATUS: u16 = 529;

/// The closed set of error classes shared by every component (snake_case on the wire between a
/// worker and its frontend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The body could not be read or parsed as the expected JSON type (400).
    BadRequest,
    /// A request field failed validation (400, message prefixed `Validation: `).
    Validation,
    /// Unknown model or route (404).
    NotFound,
    /// HTTP method not allowed on a known route (405).
    MethodNotAllowed,
    /// Body over the configured limit (413).
    PayloadTooLarge,
    /// Missing or non-JSON content type (415).
    UnsupportedMediaType,
    /// Request header fields too large, e.g. metadata headers (431).
    HeadersTooLarge,
    /// Deprecated or unsupported feature (501).
    NotImplemented,
    /// Every engine's admission queue is full (configurable overload status, default 529).
    Overloaded,
    /// Not ready, draining, or no routable engine (503).
    Unavailable,
    /// The client went away or the request was cancelled (499, never delivered).
    Cancelled,
    /// No engine event for longer than the configured backend timeout.
    Timeout,
    /// Anything else (500). The message is logged; clients see a sanitized text.
    Internal,
}

impl ErrorClass {
    /// HTTP status for this class. `overload_status` is the configured overload code.
    pub fn status(self, overload_status: u16) -> u16 {
        match self {
            ErrorClass::BadRequest | ErrorClass::Validation => 400,
            ErrorClass::NotFound => 404,
            ErrorClass::MethodNotAllowed => 405,
            ErrorClass::PayloadTooLarge => 413,
            ErrorClass::UnsupportedMediaType => 415,
            ErrorClass::HeadersTooLarge => 431,
            ErrorClass::NotImplemented => 501,
            ErrorClass::Overloaded => overload_status,
            ErrorClass::Unavailable => 503,
            ErrorClass::Cancelled => 499,
            ErrorClass::Timeout | ErrorClass::Internal => 500,
        }
    }

    /// Value of the `error_type` label on `requests_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            ErrorClass::BadRequest | ErrorClass::Validation => "validation",
            ErrorClass::NotFound | ErrorClass::MethodNotAllowed => "not_found",
            ErrorClass::PayloadTooLarge
            | ErrorClass::UnsupportedMediaType
            | ErrorClass::HeadersTooLarge => "validation",
            ErrorClass::NotImplemented => "not_implemented",
            ErrorClass::Overloaded => "overload",
            ErrorClass::Unavailable => "unavailable",
            ErrorClass::Cancelled => "cancelled",
            ErrorClass::Timeout => "response_timeout",
            ErrorClass::Internal => "internal",
        }
    }

    /// The `type` slug used inside an in-stream SSE error frame.
    fn stream_slug(self) -> &'static str {
        match self {
            ErrorClass::Cancelled => "request_cancelled",
            ErrorClass::Overloaded | ErrorClass::Unavailable => "service_unavailable",
            ErrorClass::BadRequest | ErrorClass::Validation => "invalid_request_error",
            _ => "internal_server_error",
        }
    }

    /// Whether a failure of this class may be retried on another engine (request migration).
    pub fn is_migratable(self) -> bool {
        matches!(self, ErrorClass::Unavailable | ErrorClass::Timeout)
    }
}

/// A classified error with the message a client may see.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What kind of failure this is; drives status, frames, metrics and retries.
    pub class: ErrorClass,
    /// Client-facing message (already sanitized where the class requires it).
    pub message: String,
    /// Optional structured details (for example the admission queue that rejected a request).
    pub details: Option<Value>,
    /// Set when the actor handling the request failed and is being restarted: the typed signal the
    /// serving path retries on (never parsed from text). Stays inside the process.
    pub restarted: Option<ActorKind>,
    /// An HTTP status chosen by a worker's handler (`HttpError(code, ...)` in the Python SDK) that
    /// no class expresses; it replaces the class's status in bodies and frames.
    pub status: Option<u16>,
    /// No engine could be routed to at all (every one failed, was removed or is being probed): a
    /// migration waits for one to come back instead of spending its attempts at once. Stays
    /// inside the process.
    pub no_engine: bool,
}

impl ApiError {
    /// An error of `class` with `message`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        ApiError {
            class,
            message: message.into(),
            details: None,
            restarted: None,
            status: None,
            no_engine: false,
        }
    }

    /// `Validation: <detail>` (400).
    pub fn validation(detail: impl std::fmt::Display) -> Self {
        Self::new(ErrorClass::Validation, format!("Validation: {detail}"))
    }

    /// `Validation: <detail>` with status 501 (deprecated / unsupported fields).
    pub fn not_implemented(detail: impl std::fmt::Display) -> Self {
        Self::new(ErrorClass::NotImplemented, format!("Validation: {detail}"))
    }

    /// JSON body that failed to deserialize (400).
    pub fn bad_json(parser_error: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorClass::BadRequest,
            format!("Failed to deserialize the JSON body into the target type: {parser_error}"),
        )
    }

    /// `Model not found` (404).
    pub fn model_not_found() -> Self {
        Self::new(ErrorClass::NotFound, "Model not found")
    }

    /// `Service is not ready` (503), also used while draining.
    pub fn not_ready() -> Self {
        Self::new(ErrorClass::Unavailable, "Service is not ready")
    }

    /// Every engine's admission queue is full.
    pub fn overloaded(details: Value) -> Self {
        ApiError {
            class: ErrorClass::Overloaded,
            message: "Service temporarily overloaded".into(),
            details: Some(details),
            restarted: None,
            status: None,
            no_engine: false,
        }
    }

    /// Internal failure: the cause is logged here, the client gets a sanitized text.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(ErrorClass::Internal, "Internal server error")
    }

    /// No engine can take the request now (see [`ApiError::no_engine`]).
    pub fn no_engine_available() -> Self {
        ApiError {
            no_engine: true,
            ..Self::new(
                ErrorClass::Unavailable,
                "No engine is available to serve the request (every engine has failed or been removed)",
            )
        }
    }

    /// The error a request gets when `actor` failed while handling it and is being restarted:
    /// retryable (the request never reached an engine). The body names the actor in `details`.
    pub fn restarted(actor: ActorKind, while_doing: &str) -> Self {
        let mut error = Self::new(
            ErrorClass::Unavailable,
            format!("{actor} restarted after a fault while {while_doing} this request"),
        )
        .with_details(json!({"actor": actor.as_str(), "restarted": true}));
        error.restarted = Some(actor);
        error
    }

    /// Answer with `status` instead of the class's (400-599; other values are ignored).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = (400..=599).contains(&status).then_some(status);
        self
    }

    /// The HTTP status: the one set with [`Self::with_status`], else the class's.
    pub fn status(&self, overload_status: u16) -> u16 {
        self.status
            .unwrap_or_else(|| self.class.status(overload_status))
    }

    /// Attach structured details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The flat error body `{"message","type","code"}` (plus `details` when present).
    pub fn body(&self, overload_status: u16) -> Value {
        let code = self.status(overload_status);
        let mut body = json!({
            "message": self.message,
            "type": reason_phrase(code, overload_status, self.class),
            "code": code,
        });
        if let (Some(details), Some(map)) = (&self.details, body.as_object_mut()) {
            map.insert("details".into(), details.clone());
        }
        body
    }

    /// The in-stream SSE error frame (nested envelope), without the trailing `data: [DONE]`.
    pub fn sse_frame(&self, overload_status: u16) -> String {
        let message = match self.class {
            ErrorClass::Internal | ErrorClass::Timeout => "Internal server error",
            ErrorClass::Cancelled => "Request cancelled",
            ErrorClass::Overloaded => "Service temporarily overloaded",
            ErrorClass::Unavailable => "Service temporarily unavailable",
            _ => self.message.as_str(),
        };
        let frame = json!({"error": {
            "message": message,
            "type": self.class.stream_slug(),
            "code": self.status(overload_status),
        }});
        format!("data: {frame}\n\n")
    }
}

/// Canonical reason phrase for `code`, with Dynamo's special cases for the overload code and 499.
fn reason_phrase(code: u16, overload_status: u16, class: ErrorClass) -> &'static str {
    if class == ErrorClass::Overloaded && code == overload_status {
        return "Overloaded";
    }
    match code {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        401 => "Unauthorized",
        403 => "Forbidden",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        499 => "Client Closed Request",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "UnknownError",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_body_uses_reason_phrase() {
        let body = ApiError::model_not_found().body(DEFAULT_OVERLOAD_STATUS);
        assert_eq!(
            body,
            json!({"message": "Model not found", "type": "Not Found", "code": 404})
        );
    }

    #[test]
    fn overload_uses_configured_status_and_phrase() {
        let err = ApiError::overloaded(json!({"queue": "engine-0"}));
        let body = err.body(529);
        assert_eq!(body["code"], 529);
        assert_eq!(body["type"], "Overloaded");
        assert_eq!(body["details"]["queue"], "engine-0");
        assert_eq!(err.body(503)["type"], "Overloaded");
        assert_eq!(
            ApiError::not_ready().body(503)["type"],
            "Service Unavailable"
        );
    }

    #[test]
    fn sse_frame_is_nested_and_sanitized() {
        let frame = ApiError::internal("secret detail").sse_frame(529);
        assert_eq!(
            frame,
            "data: {\"error\":{\"code\":500,\"message\":\"Internal server error\",\"type\":\"internal_server_error\"}}\n\n"
        );
        assert!(ApiError::overloaded(json!({}))
            .sse_frame(529)
            .contains("service_unavailable"));
    }

    #[test]
    fn metric_labels() {
        assert_eq!(ErrorClass::Validation.metric_label(), "validation");
        assert_eq!(ErrorClass::Overloaded.metric_label(), "overload");
        assert_eq!(ErrorClass::NotImplemented.metric_label(), "not_implemented");
        assert_eq!(ErrorClass::Cancelled.metric_label(), "cancelled");
    }
}
