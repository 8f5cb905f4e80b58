//! Dynamo's error object (interop spec §5.3), carried by an error item
//! `{"event": "error", "error": {...}}`: a legacy `error_type`, a canonical `class`, a catalogued
//! `reason` that must belong to the class (Dynamo rejects a mismatched pair as an internal error), an
//! operator-facing `diagnostic` and the client-safe `public` message. A Dynamo frontend maps `class` to
//! the HTTP status and shows `public.message`. dynamix-actors maps it to and from its `ApiError`.

use serde::{Deserialize, Serialize};

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
    /// dynamix: the HTTP status the handler chose (the Python SDK's `HttpError(code, ...)`), for a
    /// code no class expresses. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl DynamoError {
    /// An error of Dynamo category (`error_type`, `class`, `reason`), with `message` as every text.
    pub fn new(error_type: &str, class: &str, reason: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        DynamoError {
            error_type: Some(error_type.into()),
            class: Some(class.into()),
            reason: Some(reason.into()),
            diagnostic: Some(message.clone()),
            public: Some(PublicMessage {
                kind: "message".into(),
                message: Some(message.clone()),
            }),
            message: Some(message),
            status: None,
        }
    }

    /// The text to show: the public message, else the message, else the diagnostic, else the reason.
    pub fn text(&self) -> String {
        self.public
            .as_ref()
            .and_then(|p| p.message.clone())
            .or_else(|| self.message.clone())
            .or_else(|| self.diagnostic.clone())
            .unwrap_or_else(|| {
                format!(
                    "worker error ({})",
                    self.reason.as_deref().unwrap_or("no reason given")
                )
            })
    }
}
