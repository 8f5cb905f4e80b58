//! Reading a request envelope: where to call home, in which codec, and the body.

use bytes::Bytes;
use serde_json::Value;

use crate::codec::messages::{RequestControlMessage, StreamType, TcpStreamConnectionInfo};
use crate::codec::{MessageKind, TwoPartCodec, TwoPartCodecError};
use crate::{PayloadCodec, PayloadCodecError};

/// Why an envelope is refused (the text goes back as the frame's `Server unavailable: ...` answer).
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeRefused {
    /// The two-part framing does not decode.
    #[error("cannot decode the request envelope: {0}")]
    Envelope(#[from] TwoPartCodecError),
    /// A header-only or body-only message.
    #[error("the request envelope must have a control header and a body")]
    NotHeaderAndData,
    /// The control header is not a request control message.
    #[error("cannot decode the control header: {0}")]
    Header(#[source] serde_json::Error),
    /// A transport other than `tcp_server`.
    #[error("connection_info.transport {0:?} is not supported (tcp_server only)")]
    Transport(String),
    /// `connection_info.info` does not decode.
    #[error("cannot decode connection_info.info: {0}")]
    Info(#[source] serde_json::Error),
    /// The call-home stream is not a response stream.
    #[error("connection_info.info.stream_type {0:?} is not a response stream")]
    NotResponse(StreamType),
    /// The call-home context is another request's.
    #[error("connection_info.info.context {context:?} does not match the request id {id:?}")]
    Context {
        /// The info's context.
        context: String,
        /// The request id.
        id: String,
    },
}

/// Why an accepted request's body cannot be used (answered on the stream as an error item).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// `payload_codec` names no codec this endpoint speaks.
    #[error(transparent)]
    Codec(PayloadCodecError),
    /// The body does not decode in its codec.
    #[error("cannot decode the request body ({codec}): {source}")]
    Decode {
        /// The codec's name.
        codec: &'static str,
        /// What the decoder said.
        source: PayloadCodecError,
    },
}

/// A request that will be answered on a response stream: where to call home, in which codec, and
/// its body, or why the body cannot be used (answered as an error item).
#[derive(Debug)]
pub struct Accepted<B = Value> {
    /// The request id.
    pub id: String,
    /// The call-home address and subject.
    pub info: TcpStreamConnectionInfo,
    /// The codec of the body and of the replies.
    pub codec: PayloadCodec,
    /// The control message's metadata.
    pub metadata: Option<serde_json::Map<String, Value>>,
    /// The decoded body.
    pub body: Result<B, BodyError>,
}

/// Decodes a request envelope: control header, then the body in its codec as a JSON value. `Err`
/// (the ACK text) when there is no usable call-home address.
pub fn accept(payload: &Bytes) -> Result<Accepted, EnvelopeRefused> {
    accept_as(payload)
}

/// [`accept`] with the body decoded as a `B`.
pub fn accept_as<B: serde::de::DeserializeOwned>(
    payload: &Bytes,
) -> Result<Accepted<B>, EnvelopeRefused> {
    let message = TwoPartCodec::new(None).decode_message(payload.clone())?;
    if message.kind() != MessageKind::HeaderAndData {
        return Err(EnvelopeRefused::NotHeaderAndData);
    }
    let control: RequestControlMessage =
        serde_json::from_slice(message.header()).map_err(EnvelopeRefused::Header)?;
    if control.connection_info.transport != "tcp_server" {
        return Err(EnvelopeRefused::Transport(
            control.connection_info.transport,
        ));
    }
    let info: TcpStreamConnectionInfo =
        serde_json::from_str(&control.connection_info.info).map_err(EnvelopeRefused::Info)?;
    if info.stream_type != StreamType::Response {
        return Err(EnvelopeRefused::NotResponse(info.stream_type));
    }
    if info.context != control.id {
        return Err(EnvelopeRefused::Context {
            context: info.context,
            id: control.id,
        });
    }
    let (codec, body) = match PayloadCodec::parse(control.payload_codec.as_deref()) {
        Ok(codec) => (
            codec,
            codec
                .decode::<B>(message.data())
                .map_err(|source| BodyError::Decode {
                    codec: codec.name(),
                    source,
                }),
        ),
        Err(e) => (PayloadCodec::Json, Err(BodyError::Codec(e))),
    };
    Ok(Accepted {
        id: control.id,
        info,
        codec,
        metadata: control.metadata,
        body,
    })
}
