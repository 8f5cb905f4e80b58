//! Dynamo's error object (interop spec §5.3), carried by an error item
//! `{"event": "error", "error": {...}}`: a legacy `error_type`, a canonical `class`, a catalogued
//! `reason` that must belong to the class (Dynamo rejects a mismatched pair as an internal error), an
//! operator-facing `diagnostic` and the client-safe `public` message. A Dynamo frontend maps `class` to
//! the HTTP status and shows `public.message`.
//!
//! dynamix's [`ErrorClass`] is finer than Dynamo's classes in places (bad body vs failed
//! validation); `error_type` keeps that distinction within Dynamo's own vocabulary, so a dynamix
//! frontend reads back exactly the class a dynamix worker sent.

use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorClass};

/// The client-safe part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PublicMessage {
    /// `message`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text a client may see.
    #[serde(default)]
    pub message: Option<String>,
}

/// `error` of an error item.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DynamoError {
    /// Legacy, finer category (`InvalidArgument`, `WorkerOverloaded`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_type: Option<String>,
    /// Canonical category (`InvalidRequest`, `Unavailable`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Catalogued cause (`request.invalid_argument`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Operator-facing context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostic: Option<String>,
    /// Client-safe details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<PublicMessage>,
}

/// (error_type, class, reason) for a dynamix class: every pair is in Dynamo's catalogue.
fn identity(class: ErrorClass) -> (&'static str, &'static str, &'static str) {
    match class {
        ErrorClass::BadRequest => ("InvalidRequest", "InvalidRequest", "request.invalid"),
        ErrorClass::Validation => (
            "InvalidArgument",
            "InvalidRequest",
            "request.invalid_argument",
        ),
        ErrorClass::NotFound => ("NotFound", "NotFound", "request.not_found"),
        ErrorClass::PayloadTooLarge => (
            "PayloadTooLarge",
            "PayloadTooLarge",
            "request.payload_too_large",
        ),
        ErrorClass::UnsupportedMediaType => (
            "UnsupportedMedia",
            "UnsupportedMedia",
            "request.unsupported_media",
        ),
        ErrorClass::NotImplemented => (
            "NotImplemented",
            "NotImplemented",
            "runtime.not_implemented",
        ),
        ErrorClass::Overloaded => (
            "WorkerOverloaded",
            "CapacityExhausted",
            "capacity.worker_overloaded",
        ),
        ErrorClass::Unavailable => ("Unavailable", "Unavailable", "backend.unavailable"),
        ErrorClass::Cancelled => ("Cancelled", "Cancelled", "request.cancelled"),
        ErrorClass::Timeout => (
            "ResponseTimeout",
            "DeadlineExceeded",
            "backend.response_timeout",
        ),
        ErrorClass::MethodNotAllowed | ErrorClass::HeadersTooLarge | ErrorClass::Internal => {
            ("Internal", "Internal", "runtime.internal")
        }
    }
}

/// The dynamix class of a Dynamo category name (legacy or canonical); `None` for names this
/// build does not know.
fn class_of(name: &str) -> Option<ErrorClass> {
    Some(match name {
        "InvalidArgument" | "BackendInvalidArgument" => ErrorClass::Validation,
        "InvalidRequest" => ErrorClass::BadRequest,
        "NotFound" => ErrorClass::NotFound,
        "PayloadTooLarge" => ErrorClass::PayloadTooLarge,
        "UnsupportedMedia" => ErrorClass::UnsupportedMediaType,
        "NotImplemented" => ErrorClass::NotImplemented,
        "WorkerOverloaded" | "ResourceExhausted" | "CapacityExhausted" | "RateLimited" => {
            ErrorClass::Overloaded
        }
        "Unavailable"
        | "WorkerUnavailable"
        | "CannotConnect"
        | "Disconnected"
        | "BackendCannotConnect"
        | "BackendDisconnected"
        | "BackendEngineShutdown"
        | "BackendStreamIncomplete" => ErrorClass::Unavailable,
        "Cancelled" | "BackendCancelled" => ErrorClass::Cancelled,
        "ResponseTimeout"
        | "ConnectionTimeout"
        | "DeadlineExceeded"
        | "BackendResponseTimeout"
        | "BackendConnectionTimeout" => ErrorClass::Timeout,
        "Internal" | "Unknown" | "BackendUnknown" | "BackendProtocol" | "Conflict"
        | "Unauthenticated" | "PermissionDenied" => ErrorClass::Internal,
        _ => return None,
    })
}

impl From<&ApiError> for DynamoError {
    fn from(error: &ApiError) -> DynamoError {
        let (error_type, class, reason) = identity(error.class);
        DynamoError {
            error_type: Some(error_type.into()),
            class: Some(class.into()),
            reason: Some(reason.into()),
            message: Some(error.message.clone()),
            diagnostic: Some(error.message.clone()),
            public: Some(PublicMessage {
                kind: "message".into(),
                message: Some(error.message.clone()),
            }),
        }
    }
}

impl DynamoError {
    /// The error as dynamix serves it: the finer `error_type` first, then `class`; unknown or
    /// absent categories are internal errors. The text is the public message, else the message,
    /// else the diagnostic.
    pub fn to_api_error(&self) -> ApiError {
        let class = self
            .error_type
            .as_deref()
            .and_then(class_of)
            .or_else(|| self.class.as_deref().and_then(class_of))
            .unwrap_or(ErrorClass::Internal);
        let message = self
            .public
            .as_ref()
            .and_then(|p| p.message.clone())
            .or_else(|| self.message.clone())
            .or_else(|| self.diagnostic.clone())
            .unwrap_or_else(|| {
                format!(
                    "worker error ({})",
                    self.reason.as_deref().unwrap_or("no reason given")
                )
            });
        ApiError::new(class, message)
    }
}
