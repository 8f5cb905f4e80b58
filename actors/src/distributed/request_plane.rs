//! The worker's TCP request plane (runtime spec §1.2–1.3, §1.6): one listener per worker process.
//! Each request frame gets exactly one reply, in order — an empty ACK once the request is accepted,
//! or an error text — and an accepted request runs in its own task: dial back to the requester's
//! response-stream server, handshake, hand the request to this process's router, then prologue,
//! one data frame per engine output, `complete_final` and the sentinel.
//!
//! If the local engine dies mid-stream (its channel closes before a finish), the stream ends without
//! `complete_final`: the frontend migrates the request, exactly as for a killed worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

use super::{Annotated, WireError};
use crate::codec::messages::{
    CallHomeHandshake, ControlMessage, NetworkStreamWrapper, RequestControlMessage,
    ResponseStreamPrologue, StreamType, TcpStreamConnectionInfo,
};
use crate::codec::{
    MessageKind, TcpCodecError, TcpRequestCodec, TcpResponseCodec, TcpResponseMessage,
    TwoPartCodec, TwoPartMessage,
};
use crate::error::{ApiError, ErrorClass};
use crate::protocol::engine::{EngineEvent, EngineRequest};
use crate::router::{KvRouterActor, Route};

/// What the endpoint needs.
#[derive(Clone)]
pub struct EndpointSettings {
    /// `{ns}.{comp}.{ep}`: frames for any other path get "Unknown endpoint".
    pub endpoint_path: String,
    /// Request-plane frame limit (`DYN_TCP_MAX_MESSAGE_SIZE`).
    pub max_message_size: usize,
    /// Dialling the requester back.
    pub connect_timeout: Duration,
    /// Capacity of each request's token channel.
    pub stream_buffer: usize,
}

/// Requests the endpoint is running, and whether it takes new ones.
#[derive(Default)]
pub struct EndpointState {
    inflight: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
}

impl EndpointState {
    /// Requests running now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Refuse new requests ("Server unavailable: ...").
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Wait until no request runs, at most `timeout`; true when idle.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.inflight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.inflight() == 0;
            }
        }
    }
}

struct InflightGuard(Arc<EndpointState>);

impl InflightGuard {
    fn new(state: &Arc<EndpointState>) -> Self {
        state.inflight.fetch_add(1, Ordering::Relaxed);
        InflightGuard(state.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A listening endpoint.
pub struct WorkerEndpoint {
    /// Bound port.
    pub port: u16,
    /// In-flight accounting and drain.
    pub state: Arc<EndpointState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WorkerEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WorkerEndpoint {
    /// Listen on `host:port` and serve requests through `router`.
    pub async fn serve(
        host: &str,
        port: u16,
        settings: EndpointSettings,
        router: Addr<KvRouterActor>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind((host, port)).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(EndpointState::default());
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::new(settings),
            router,
            state.clone(),
        ));
        Ok(WorkerEndpoint { port, state, task })
    }
}

async fn accept_loop(
    listener: TcpListener,
    settings: Arc<EndpointSettings>,
    router: Addr<KvRouterActor>,
    state: Arc<EndpointState>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(
                    stream,
                    settings.clone(),
                    router.clone(),
                    state.clone(),
                    peer,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "request-plane accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    settings: Arc<EndpointSettings>,
    router: Addr<KvRouterActor>,
    state: Arc<EndpointState>,
    peer: std::net::SocketAddr,
) {
    let (read, write) = stream.into_split();
    let max = Some(settings.max_message_size);
    let mut frames = FramedRead::new(read, TcpRequestCodec::new(max));
    let mut replies = FramedWrite::new(write, TcpResponseCodec::new(None));
    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                // The decoder cannot resynchronise after a bad frame: say why, then close.
                let text = match &e {
                    TcpCodecError::TooLarge { .. } => e.to_string(),
                    _ => format!("Decode error: {e}"),
                };
                tracing::warn!(%peer, error = %e, "request-plane frame rejected; closing the connection");
                let _ = replies.send(reply(&text)).await;
                return;
            }
        };
        if frame.endpoint_path != settings.endpoint_path {
            let _ = replies
                .send(reply(&format!("Unknown endpoint: {}", frame.endpoint_path)))
                .await;
            continue;
        }
        if state.draining.load(Ordering::Relaxed) {
            let _ = replies
                .send(TcpResponseMessage::unavailable("worker is shutting down"))
                .await;
            continue;
        }
        match accept(&frame.payload) {
            Ok((info, request)) => {
                if replies.send(TcpResponseMessage::ack()).await.is_err() {
                    return;
                }
                let guard = InflightGuard::new(&state);
                tokio::spawn(handle(
                    info,
                    request,
                    settings.clone(),
                    router.clone(),
                    guard,
                ));
            }
            Err(text) => {
                tracing::warn!(%peer, %text, "request rejected");
                if replies.send(reply(&text)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn reply(text: &str) -> TcpResponseMessage {
    TcpResponseMessage {
        data: Bytes::from(text.to_string()),
    }
}

/// Decode a request envelope: control header + engine request.
fn accept(payload: &Bytes) -> Result<(TcpStreamConnectionInfo, EngineRequest), String> {
    let message = TwoPartCodec::new(None)
        .decode_message(payload.clone())
        .map_err(|e| format!("Decode error: {e}"))?;
    if message.kind() != MessageKind::HeaderAndData {
        return Err("Unexpected message from work queue; unable extract a TwoPartMessage with a header and data".into());
    }
    let control: RequestControlMessage = serde_json::from_slice(message.header())
        .map_err(|e| format!("Decode error: control header: {e}"))?;
    if let Some(codec) = control.payload_codec.as_deref().filter(|c| *c != "json") {
        return Err(format!(
            "Decode error: payload_codec {codec:?} is not supported (json only)"
        ));
    }
    if control.connection_info.transport != "tcp_server" {
        return Err(format!(
            "Decode error: response transport {:?} is not supported (tcp_server only)",
            control.connection_info.transport
        ));
    }
    let info: TcpStreamConnectionInfo = serde_json::from_str(&control.connection_info.info)
        .map_err(|e| format!("Decode error: connection_info.info: {e}"))?;
    if info.stream_type != StreamType::Response {
        return Err(format!(
            "Decode error: stream_type {:?} is not a response stream",
            info.stream_type
        ));
    }
    if info.context != control.id {
        return Err(format!(
            "Decode error: connection context {:?} does not match request id {:?}",
            info.context, control.id
        ));
    }
    let request: EngineRequest = serde_json::from_slice(message.data())
        .map_err(|e| format!("Decode error: request body: {e}"))?;
    Ok((info, request))
}

/// Dial back to the requester (retrying while the local address is not yet available).
async fn dial(address: &str, timeout: Duration) -> Result<TcpStream, String> {
    let attempt = async {
        loop {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(format!("cannot connect to {address}: {e}")),
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("connecting to {address} timed out"))?
}

fn header(value: &impl serde::Serialize) -> TwoPartMessage {
    TwoPartMessage::header_only(Bytes::from(serde_json::to_vec(value).unwrap_or_default()))
}

fn data(item: Option<Annotated>, complete_final: bool) -> Result<TwoPartMessage, String> {
    let data = match item {
        Some(item) => Some(serde_json::to_value(item).map_err(|e| e.to_string())?),
        None => None,
    };
    let body = serde_json::to_vec(&NetworkStreamWrapper {
        data,
        complete_final,
    })
    .map_err(|e| e.to_string())?;
    Ok(TwoPartMessage::data_only(Bytes::from(body)))
}

fn item(event: &EngineEvent) -> Result<Annotated, String> {
    Ok(match event {
        Ok(output) => Annotated {
            data: Some(serde_json::to_value(output).map_err(|e| e.to_string())?),
            ..Annotated::default()
        },
        Err(error) => Annotated {
            data: Some(serde_json::to_value(WireError::from(error)).map_err(|e| e.to_string())?),
            event: Some("error".into()),
            comment: Some(vec![error.message.clone()]),
            ..Annotated::default()
        },
    })
}

async fn handle(
    info: TcpStreamConnectionInfo,
    mut request: EngineRequest,
    settings: Arc<EndpointSettings>,
    router: Addr<KvRouterActor>,
    _guard: InflightGuard,
) {
    let id = request.request_id.clone();
    let stream = match dial(&info.address, settings.connect_timeout).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(request = %id, error = %e, "Failed to create response stream");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, TwoPartCodec::new(None));
    let handshake = CallHomeHandshake {
        subject: info.subject.clone(),
        stream_type: StreamType::Response,
    };
    if framed.send(header(&handshake)).await.is_err() {
        return;
    }
    request.pinned_engine = None;
    let (tx, mut rx) = mpsc::channel(settings.stream_buffer.max(1));
    let routed = router
        .send(Route {
            request,
            output: tx,
            exclude: Vec::new(),
        })
        .await
        .map_err(|e| ApiError::new(ErrorClass::Unavailable, format!("router unavailable: {e}")))
        .and_then(|r| r);
    if let Err(error) = routed {
        let prologue = ResponseStreamPrologue {
            error: Some(error.message.clone()),
            typed_error: serde_json::to_value(WireError::from(&error)).ok(),
        };
        let _ = framed.send(header(&prologue)).await;
        return;
    }
    let prologue = ResponseStreamPrologue {
        error: None,
        typed_error: None,
    };
    if framed.send(header(&prologue)).await.is_err() {
        return;
    }
    let (mut sink, mut control) = framed.split();
    let mut finished = false;
    loop {
        tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                finished |= match &event {
                    Ok(output) => output.finish_reason.is_some(),
                    Err(_) => true,
                };
                let frame = match item(&event).and_then(|i| data(Some(i), false)) {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::error!(request = %id, error = %e, "cannot encode an output");
                        return;
                    }
                };
                if sink.send(frame).await.is_err() {
                    // The requester is gone: dropping the channel stops generation.
                    tracing::debug!(request = %id, "response stream broke; stopping generation");
                    return;
                }
            }
            message = control.next() => match message {
                Some(Ok(frame)) if frame.kind() == MessageKind::HeaderOnly => {
                    match serde_json::from_slice::<ControlMessage>(frame.header()) {
                        Ok(ControlMessage::Stop) | Ok(ControlMessage::Kill) => {
                            tracing::debug!(request = %id, "stopped by the requester");
                            return;
                        }
                        other => {
                            tracing::warn!(request = %id, message = ?other, "protocol violation on a response stream; closing it");
                            return;
                        }
                    }
                }
                Some(Ok(_)) => {
                    tracing::warn!(request = %id, "data from the requester on a response stream; closing it");
                    return;
                }
                Some(Err(_)) | None => {
                    tracing::debug!(request = %id, "requester closed the response stream; stopping generation");
                    return;
                }
            }
        }
    }
    if !finished {
        // The local engine stopped without finishing (panic, removal): no complete_final, so the
        // requester migrates the request.
        tracing::warn!(request = %id, "engine stopped before finishing; ending the stream without completion");
        return;
    }
    if let Ok(frame) = data(None, true) {
        if sink.send(frame).await.is_err() {
            return;
        }
    }
    let _ = sink.send(header(&ControlMessage::Sentinel)).await;
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::messages::{ConnectionInfo, RequestType, ResponseType};

    fn request() -> EngineRequest {
        EngineRequest {
            request_id: "req-1".into(),
            model: "m".into(),
            token_ids: vec![1, 2, 3],
            echo_text: "hi".into(),
            sampling: Default::default(),
            stop: Default::default(),
            pinned_engine: None,
            resumed_outputs: 0,
        }
    }

    fn envelope(context: &str, transport: &str, body: &[u8]) -> Bytes {
        let info = TcpStreamConnectionInfo {
            address: "127.0.0.1:1".into(),
            subject: "s".into(),
            context: context.into(),
            stream_type: StreamType::Response,
        };
        let control = RequestControlMessage {
            id: "req-1".into(),
            request_type: RequestType::SingleIn,
            response_type: ResponseType::ManyOut,
            connection_info: ConnectionInfo {
                transport: transport.into(),
                info: serde_json::to_string(&info).unwrap(),
            },
            payload_codec: None,
            metadata: None,
            frontend_send_ts_ns: None,
        };
        TwoPartCodec::new(None)
            .encode_message(TwoPartMessage::new(
                serde_json::to_vec(&control).unwrap(),
                body,
            ))
            .unwrap()
    }

    #[test]
    fn a_well_formed_envelope_is_accepted() {
        let body = serde_json::to_vec(&request()).unwrap();
        let (info, parsed) = accept(&envelope("req-1", "tcp_server", &body)).unwrap();
        assert_eq!(info.subject, "s");
        assert_eq!(parsed, request());
    }

    #[test]
    fn malformed_envelopes_are_named_errors() {
        let body = serde_json::to_vec(&request()).unwrap();
        let cases: Vec<(Bytes, &str)> = vec![
            (Bytes::from_static(b"junk"), "Decode error"),
            (
                TwoPartCodec::new(None)
                    .encode_message(TwoPartMessage::header_only(b"{}".to_vec()))
                    .unwrap(),
                "Unexpected message from work queue",
            ),
            (
                envelope("other", "tcp_server", &body),
                "does not match request id",
            ),
            (envelope("req-1", "nats", &body), "response transport"),
            (
                envelope("req-1", "tcp_server", b"{\"nope\":1}"),
                "request body",
            ),
        ];
        for (payload, expected) in cases {
            let error = accept(&payload).unwrap_err();
            assert!(
                error.contains(expected),
                "{error} should mention {expected}"
            );
        }
    }

    #[test]
    fn outputs_and_errors_become_annotated_items() {
        let ok: EngineEvent = Ok(crate::protocol::engine::EngineOutput {
            token_ids: vec![7],
            ..Default::default()
        });
        let item = item(&ok).unwrap();
        assert_eq!(item.data.unwrap()["token_ids"], serde_json::json!([7]));
        let err: EngineEvent = Err(ApiError::new(ErrorClass::Unavailable, "gone"));
        let item = item_of(&err);
        assert_eq!(item.event.as_deref(), Some("error"));
        assert_eq!(item.comment, Some(vec!["gone".to_string()]));
        let wire: WireError = serde_json::from_value(item.data.unwrap()).unwrap();
        assert_eq!(wire.class, ErrorClass::Unavailable);
    }

    fn item_of(event: &EngineEvent) -> Annotated {
        item(event).unwrap()
    }
}
