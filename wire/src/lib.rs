//! dynamix's wire layer, shared by the server's actors (`dynamix-actors`) and the Python SDK
//! (`python/`): everything a process needs to take part in a Dynamo deployment without running an
//! engine. tokio only: no actix, no candle.
//!
//! Layout:
//! - [`codec`]: the two-part frame, the TCP request frame and its ACK, the call-home messages.
//! - [`etcd`]: the etcd v3 client (generated gRPC code; no protoc needed).
//! - [`record`]: the instance record under `v1/instances/...`.
//! - [`error`]: Dynamo's error object.
//! - [`PayloadCodec`]: JSON or msgpack request bodies and response items.
//! - [`response_stream`]: the requester's call-home server (pending subjects → streams).
//! - [`endpoint`]: a process's TCP endpoint server: one listener, handlers by endpoint path, for
//!   Dynamo's request plane and the multiplexed one.
//! - [`mux`]: the multiplexed request plane between dynamix processes (frames, the client side).
//! - [`client`]: calling an instance's endpoint and reading its response stream.
//! - [`watch`]: following the keys under an etcd prefix.

pub mod client;
pub mod codec;
pub mod endpoint;
pub mod error;
pub mod etcd;
pub mod mux;
pub mod record;
pub mod response_stream;
pub mod watch;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a payload codec name is not usable, or a body or item does not decode.
#[derive(Debug, thiserror::Error)]
pub enum PayloadCodecError {
    /// `payload_codec` / `request_plane_codec` names a codec this build does not speak.
    #[error("payload codec {name:?} is not supported (json or msgpack)")]
    Unsupported {
        /// The name as given.
        name: String,
    },
    /// The bytes are not the JSON of the expected type.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// The bytes are not the msgpack of the expected type.
    #[error(transparent)]
    Msgpack(#[from] rmp_serde::decode::Error),
}

/// Why a body or item could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum PayloadEncodeError {
    /// JSON refused the value (a map with non-string keys, a failing `Serialize`).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// msgpack refused the value.
    #[error(transparent)]
    Msgpack(#[from] rmp_serde::encode::Error),
}

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
    pub fn parse(name: Option<&str>) -> Result<PayloadCodec, PayloadCodecError> {
        match name {
            None | Some("json") => Ok(PayloadCodec::Json),
            Some("msgpack") => Ok(PayloadCodec::Msgpack),
            Some(other) => Err(PayloadCodecError::Unsupported { name: other.into() }),
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
    pub fn encode(self, value: &impl Serialize) -> Result<Vec<u8>, PayloadEncodeError> {
        Ok(match self {
            PayloadCodec::Json => serde_json::to_vec(value)?,
            PayloadCodec::Msgpack => rmp_serde::to_vec_named(value)?,
        })
    }

    /// Decodes a `T`.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, PayloadCodecError> {
        Ok(match self {
            PayloadCodec::Json => serde_json::from_slice(bytes)?,
            PayloadCodec::Msgpack => rmp_serde::from_slice(bytes)?,
        })
    }
}
