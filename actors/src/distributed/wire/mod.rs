//! The one vocabulary on the wire: Dynamo 1.6.1's messages (interop spec §2–§7), each as one serde
//! type, mapped from and to dynamix's internal types here and nowhere else. dynamix-to-dynamix
//! traffic uses the same types, so a dynamix frontend serves Dynamo workers and a Dynamo frontend
//! serves dynamix workers with the code that serves its own kind.
//!
//! Layout:
//! - [`record`]: the etcd instance record (`type: "Endpoint"`, the `tcp` transport with its path).
//! - [`request`]: the pre-processed request a frontend sends ([`PreprocessedRequest`]).
//! - [`response`]: the response-stream items (`Annotated<LLMEngineOutput>`, the final marker).
//! - [`error`]: Dynamo's error object and its mapping to [`crate::error::ApiError`].
//! - [`events`]: the NATS event-plane envelope, KV-event batches and `kv_metrics`.
//!
//! Bodies travel as JSON or msgpack ([`PayloadCodec`]); the worker answers in the codec of the
//! request. dynamix-only fields (the echo text, logit bias, migration offsets) ride in the request's
//! `extra_args.dynamix`, and only towards workers whose record marks them as dynamix workers.

pub mod error;
pub mod events;
pub mod record;
pub mod request;
pub mod response;

pub use error::DynamoError;
pub use record::{Instance, Transport};
pub use request::PreprocessedRequest;
pub use response::{LlmEngineOutput, StreamItem, WireItem};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// How a request body and its response items are encoded (`payload_codec`, `request_plane_codec`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PayloadCodec {
    /// JSON (the default when a record or control message names none).
    #[default]
    Json,
    /// msgpack maps with named fields (Dynamo 1.6.1's default).
    Msgpack,
}

impl PayloadCodec {
    /// The codec a `payload_codec` / `request_plane_codec` value names; `None` and `"json"` are JSON.
    pub fn parse(name: Option<&str>) -> Result<PayloadCodec, String> {
        match name {
            None | Some("json") => Ok(PayloadCodec::Json),
            Some("msgpack") => Ok(PayloadCodec::Msgpack),
            Some(other) => Err(format!(
                "payload codec {other:?} is not supported (json or msgpack)"
            )),
        }
    }

    /// Its name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            PayloadCodec::Json => "json",
            PayloadCodec::Msgpack => "msgpack",
        }
    }

    /// Encodes `value`.
    pub fn encode(self, value: &impl Serialize) -> Result<Vec<u8>, String> {
        match self {
            PayloadCodec::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
            PayloadCodec::Msgpack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
        }
    }

    /// Decodes a `T`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, String> {
        match self {
            PayloadCodec::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
            PayloadCodec::Msgpack => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests;
