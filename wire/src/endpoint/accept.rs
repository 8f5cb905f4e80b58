//! Reading a request envelope: where to call home, in which codec, and the body.

use bytes::Bytes;
use serde_json::Value;

use crate::codec::messages::{RequestControlMessage, StreamType, TcpStreamConnectionInfo};
use crate::codec::{MessageKind, TwoPartCodec};
use crate::PayloadCodec;

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
    pub body: Result<B, String>,
}

/// Decodes a request envelope: control header, then the body in its codec as a JSON value. `Err`
/// (the ACK text) when there is no usable call-home address.
pub fn accept(payload: &Bytes) -> Result<Accepted, String> {
    accept_as(payload)
}

/// [`accept`] with the body decoded as a `B`.
pub fn accept_as<B: serde::de::DeserializeOwned>(payload: &Bytes) -> Result<Accepted<B>, String> {
    let message = TwoPartCodec::new(None)
        .decode_message(payload.clone())
        .map_err(|e| format!("cannot decode the request envelope: {e}"))?;
    if message.kind() != MessageKind::HeaderAndData {
        return Err("the request envelope must have a control header and a body".into());
    }
    let control: RequestControlMessage = serde_json::from_slice(message.header())
        .map_err(|e| format!("cannot decode the control header: {e}"))?;
    if control.connection_info.transport != "tcp_server" {
        return Err(format!(
            "connection_info.transport {:?} is not supported (tcp_server only)",
            control.connection_info.transport
        ));
    }
    let info: TcpStreamConnectionInfo = serde_json::from_str(&control.connection_info.info)
        .map_err(|e| format!("cannot decode connection_info.info: {e}"))?;
    if info.stream_type != StreamType::Response {
        return Err(format!(
            "connection_info.info.stream_type {:?} is not a response stream",
            info.stream_type
        ));
    }
    if info.context != control.id {
        return Err(format!(
            "connection_info.info.context {:?} does not match the request id {:?}",
            info.context, control.id
        ));
    }
    let (codec, body) = match PayloadCodec::parse(control.payload_codec.as_deref()) {
        Ok(codec) => (
            codec,
            codec
                .decode::<B>(message.data())
                .map_err(|e| format!("cannot decode the request body ({}): {e}", codec.name())),
        ),
        Err(e) => (PayloadCodec::Json, Err(e.to_string())),
    };
    Ok(Accepted {
        id: control.id,
        info,
        codec,
        metadata: control.metadata,
        body,
    })
}
