//! Dynamo's error object (interop spec §5.3), carried by an error item
//! `{"event": "error", "error": {...}}`: a legacy `error_type`, a canonical `class`, a catalogued
//! `reason` that must belong to the class (Dynamo rejects a mismatched pair as an internal error), an
//! operator-facing `diagnostic` and the client-safe `public` message. A Dynamo frontend maps `class` to
//! the HTTP status and shows `public.message`.
//!
//! dynamix's [`ErrorClass`] is finer than Dynamo's classes in places (bad body vs failed
//! validation); `error_type` keeps that distinction within Dynamo's own vocabulary, so a dynamix
//! frontend reads back exactly the class a dynamix worker sent.

pub use dynamix_wire::error::{DynamoError, PublicMessage};

use crate::error::{ApiError, ErrorClass};

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
            status: error.status,
        }
    }
}

/// The error as dynamix serves it: the finer `error_type` first, then `class`; unknown or absent
/// categories are internal errors. The text is the public message, else the message, else the
/// diagnostic.
impl From<&DynamoError> for ApiError {
    fn from(error: &DynamoError) -> ApiError {
        let class = error
            .error_type
            .as_deref()
            .and_then(class_of)
            .or_else(|| error.class.as_deref().and_then(class_of))
            .unwrap_or(ErrorClass::Internal);
        let message = error.text();
        let error_out = ApiError::new(class, message);
        // A handler's own status: 4xx as chosen; 5xx other than 503 and 529 become 500 (the
        // class's), as Dynamo's frontend does (frontend spec §1.3).
        match error.status {
            Some(code @ 400..=499) | Some(code @ (503 | 529)) => error_out.with_status(code),
            _ => error_out,
        }
    }
}
