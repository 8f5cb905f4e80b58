//! Answering an accepted request: dial back to the requester, handshake, prologue, one data frame
//! per reply pulled from the handler, `complete_final` and the sentinel.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use super::{Accepted, Control, Handler, InflightGuard, Reply, Request};
use crate::codec::messages::{
    CallHomeHandshake, ControlMessage, ResponseStreamPrologue, StreamType,
};
use crate::codec::{MessageKind, TwoPartCodec, TwoPartMessage};
use crate::error::DynamoError;
use crate::{PayloadCodec, PayloadEncodeError};

/// Why the requester could not be dialled back.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The connection failed.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The requester's call-home address.
        address: String,
        /// The connect error.
        source: std::io::Error,
    },
    /// No connection within the connect timeout.
    #[error("connecting to {address} timed out")]
    TimedOut {
        /// The requester's call-home address.
        address: String,
    },
}

/// Dial back to the requester (retrying while the local address is not yet available).
pub async fn dial(address: &str, timeout: Duration) -> Result<TcpStream, DialError> {
    let attempt = async {
        loop {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(source) => {
                    return Err(DialError::Connect {
                        address: address.into(),
                        source,
                    })
                }
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| DialError::TimedOut {
            address: address.into(),
        })?
}

/// A header-only frame carrying `value` as JSON.
pub fn header_frame(value: &impl serde::Serialize) -> TwoPartMessage {
    TwoPartMessage::header_only(Bytes::from(serde_json::to_vec(value).unwrap_or_default()))
}

/// A data frame carrying `reply` in `codec`.
fn data_frame(codec: PayloadCodec, reply: &Reply) -> Result<TwoPartMessage, PayloadEncodeError> {
    reply
        .encode(codec)
        .map(|body| TwoPartMessage::data_only(Bytes::from(body)))
}

type Sink = futures_util::stream::SplitSink<Framed<TcpStream, TwoPartCodec>, TwoPartMessage>;

pub(super) async fn respond(
    accepted: Accepted,
    headers: BTreeMap<String, String>,
    handler: Arc<dyn Handler>,
    connect_timeout: Duration,
    _guard: InflightGuard,
) {
    let Accepted {
        id,
        info,
        codec,
        metadata,
        body,
    } = accepted;
    let stream = match dial(&info.address, connect_timeout).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(request = %id, error = %e, "cannot open the response stream");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, TwoPartCodec::new(None));
    let handshake = CallHomeHandshake {
        subject: info.subject.clone(),
        stream_type: StreamType::Response,
    };
    if framed.send(header_frame(&handshake)).await.is_err()
        || framed
            .send(header_frame(&ResponseStreamPrologue { error: None }))
            .await
            .is_err()
    {
        return;
    }
    let (mut sink, mut incoming) = framed.split();
    let body = match body {
        Ok(body) => body,
        Err(refused) => {
            let error = DynamoError::new(
                "InvalidRequest",
                "InvalidRequest",
                "request.invalid",
                refused.to_string(),
            );
            if let Ok(frame) = data_frame(codec, &Reply::Error(error)) {
                if sink.send(frame).await.is_ok() {
                    finish(&mut sink, codec).await;
                }
            }
            return;
        }
    };
    let control = Arc::new(Control::default());
    let mut replies = handler.call(Request {
        id: id.clone(),
        body,
        headers,
        metadata,
        control: control.clone(),
    });
    loop {
        tokio::select! {
            reply = replies.next() => {
                let Some(reply) = reply else { break };
                if matches!(reply, Reply::Abandon) {
                    tracing::warn!(request = %id, "the handler gave up on the request; ending its stream without completion");
                    return;
                }
                let is_error = matches!(reply, Reply::Error(_));
                let frame = match data_frame(codec, &reply) {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::error!(request = %id, error = %e, "cannot encode a reply");
                        let error = DynamoError::new("Internal", "Internal", "runtime.internal", format!("cannot encode a reply ({}): {e}", codec.name()));
                        match data_frame(codec, &Reply::Error(error)) {
                            Ok(frame) => frame,
                            Err(_) => return,
                        }
                    }
                };
                if sink.send(frame).await.is_err() {
                    tracing::debug!(request = %id, "response stream broke; stopping the handler");
                    control.kill();
                    return;
                }
                if is_error {
                    break;
                }
            }
            message = incoming.next() => match message {
                Some(Ok(frame)) if frame.kind() == MessageKind::HeaderOnly => {
                    match serde_json::from_slice::<ControlMessage>(frame.header()) {
                        Ok(ControlMessage::Stop) => {
                            tracing::debug!(request = %id, "stopped by the requester");
                            control.stop();
                            return;
                        }
                        Ok(ControlMessage::Kill) => {
                            tracing::debug!(request = %id, "killed by the requester");
                            control.kill();
                            return;
                        }
                        other => {
                            tracing::warn!(request = %id, message = ?other, "protocol violation on a response stream; closing it");
                            control.kill();
                            return;
                        }
                    }
                }
                Some(Ok(_)) => {
                    tracing::warn!(request = %id, "data from the requester on a response stream; closing it");
                    control.kill();
                    return;
                }
                Some(Err(_)) | None => {
                    tracing::debug!(request = %id, "requester closed the response stream; stopping the handler");
                    control.kill();
                    return;
                }
            }
        }
    }
    finish(&mut sink, codec).await;
}

/// `complete_final`, the sentinel, close.
async fn finish(sink: &mut Sink, codec: PayloadCodec) {
    if let Ok(frame) = codec
        .encode(&json!({ "complete_final": true }))
        .map(|body| TwoPartMessage::data_only(Bytes::from(body)))
    {
        if sink.send(frame).await.is_err() {
            return;
        }
    }
    let _ = sink.send(header_frame(&ControlMessage::Sentinel)).await;
    let _ = sink.close().await;
}
