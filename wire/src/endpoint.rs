//! A process's TCP endpoint server (interop spec §3–§5), independent of what answers: one listener
//! per process, request frames routed by their endpoint path (`{instance_id:x}/{ns}/{comp}/{ep}`) to
//! the [`Handler`] registered under it. Each frame gets exactly one reply, in order: an empty ACK once
//! the request will be answered on a response stream, else a `Server unavailable: ...` text (unknown
//! path, draining, no usable call-home address). An accepted request runs in its own task: dial back
//! to the requester, handshake, prologue, then one data frame per [`Reply`] in the request's codec,
//! `complete_final` and the sentinel.
//!
//! Replies are pulled on demand: the next one is asked for only after the previous one was written,
//! so a slow reader slows the handler instead of filling memory. A `stop` or `kill` frame, or the
//! requester closing the stream, marks the request's [`Control`] and drops the reply stream; the
//! stream then ends without `complete_final`, as a Dynamo worker's does.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::codec::{Framed, FramedRead, FramedWrite};

use crate::codec::messages::{
    CallHomeHandshake, ControlMessage, RequestControlMessage, ResponseStreamPrologue, StreamType,
    TcpStreamConnectionInfo,
};
use crate::codec::{
    MessageKind, TcpCodecError, TcpRequestCodec, TcpResponseCodec, TcpResponseMessage,
    TwoPartCodec, TwoPartMessage,
};
use crate::error::DynamoError;
use crate::PayloadCodec;

/// Cancellation state of one request, shared by the transport (which sets it on `stop`/`kill` or
/// a lost requester) and the handler (which reads it, or waits for it).
#[derive(Debug, Default)]
pub struct Control {
    stopped: AtomicBool,
    killed: AtomicBool,
    changed: Notify,
}

impl Control {
    /// Ask the handler to stop.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Stop now (also a stop).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.stop();
    }

    /// True once stopped or killed.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// True once killed.
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Resolves once stopped or killed.
    pub async fn stopped(&self) {
        loop {
            let notified = self.changed.notified();
            if self.is_stopped() {
                return;
            }
            notified.await;
        }
    }
}

/// A request as a handler sees it.
#[derive(Debug)]
pub struct Request {
    /// The request (context) id.
    pub id: String,
    /// The body, decoded from the request's codec.
    pub body: Value,
    /// The frame's headers (`x-dynamo-meta-*`, trace context, ...).
    pub headers: BTreeMap<String, String>,
    /// The control message's `metadata`, if any.
    pub metadata: Option<serde_json::Map<String, Value>>,
    /// Cancellation.
    pub control: Arc<Control>,
}

/// One response item.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// A value, sent as `Annotated{data: value}`.
    Data(Value),
    /// A ready-made Annotated envelope (`data`, `id`, `event`, `comment`).
    Annotated(Value),
    /// An error item; the stream ends after it.
    Error(DynamoError),
    /// The stream ends here without completing (no `complete_final`): the requester takes the
    /// answer for broken and may move the request elsewhere (migration), as for a dead worker.
    Abandon,
}

impl Reply {
    /// The Annotated envelope this reply travels as.
    pub fn annotated(&self) -> Value {
        match self {
            Reply::Data(value) => json!({ "data": value }),
            Reply::Annotated(envelope) => envelope.clone(),
            Reply::Error(error) => json!({
                "event": "error",
                "comment": [error.text()],
                "error": error,
            }),
            Reply::Abandon => Value::Null,
        }
    }
}

/// The replies of one request.
pub type Replies = Pin<Box<dyn Stream<Item = Reply> + Send>>;

/// What answers an endpoint.
pub trait Handler: Send + Sync + 'static {
    /// Start answering `request`.
    fn call(&self, request: Request) -> Replies;
}

impl<F> Handler for F
where
    F: Fn(Request) -> Replies + Send + Sync + 'static,
{
    fn call(&self, request: Request) -> Replies {
        self(request)
    }
}

/// Requests an endpoint is running, and whether it takes new ones.
#[derive(Debug, Default)]
pub struct EndpointState {
    inflight: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
}

impl EndpointState {
    /// Requests running now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Refuse new requests (`Server unavailable: ...`); running ones go on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Take new requests again.
    pub fn resume(&self) {
        self.draining.store(false, Ordering::SeqCst);
    }

    /// Whether new requests are refused.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Wait until no request runs, at most `timeout` (`None`: no limit); true when idle.
    pub async fn wait_idle(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let notified = self.idle.notified();
            if self.inflight() == 0 {
                return true;
            }
            match deadline {
                Some(deadline) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return self.inflight() == 0;
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Count one request until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self.clone())
    }
}

/// One running request of an endpoint.
pub struct InflightGuard(Arc<EndpointState>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Limits of the server.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Largest request frame (`DYN_TCP_MAX_MESSAGE_SIZE`).
    pub max_message_size: usize,
    /// Dialling a requester back (`DYN_TCP_CONNECT_TIMEOUT`).
    pub connect_timeout: Duration,
}

struct Served {
    handler: Arc<dyn Handler>,
    state: Arc<EndpointState>,
}

type Table = Arc<Mutex<HashMap<String, Served>>>;

/// The listener and its endpoints.
pub struct EndpointServer {
    host: String,
    port: u16,
    table: Table,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EndpointServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EndpointServer {
    /// Listen on `host:port` (0 = any free port). Must run inside a tokio runtime.
    pub async fn bind(
        host: &str,
        port: u16,
        settings: ServerSettings,
    ) -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind((host, port)).await?;
        let port = listener.local_addr()?.port();
        let table: Table = Arc::default();
        let task = tokio::spawn(accept_loop(listener, Arc::new(settings), table.clone()));
        Ok(Arc::new(EndpointServer {
            host: host.to_string(),
            port,
            table,
            task,
        }))
    }

    /// The address requesters dial: `host:port`.
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serve `path` with `handler`; an error when the path is already served.
    pub fn register(
        &self,
        path: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<Arc<EndpointState>, String> {
        let mut table = self
            .table
            .lock()
            .map_err(|_| "endpoint table poisoned".to_string())?;
        if table.contains_key(path) {
            return Err(format!("endpoint {path} is already served by this process"));
        }
        let state = Arc::new(EndpointState::default());
        table.insert(
            path.to_string(),
            Served {
                handler,
                state: state.clone(),
            },
        );
        Ok(state)
    }

    /// Stop routing `path` (requests already running go on).
    pub fn unregister(&self, path: &str) {
        if let Ok(mut table) = self.table.lock() {
            table.remove(path);
        }
    }

    /// Serve what `old` served under `new` instead (the instance id in the path changed); its
    /// state and handler stay. An error when `old` is not served or `new` already is.
    pub fn rename(&self, old: &str, new: &str) -> Result<(), String> {
        let mut table = self
            .table
            .lock()
            .map_err(|_| "endpoint table poisoned".to_string())?;
        if table.contains_key(new) {
            return Err(format!("endpoint {new} is already served by this process"));
        }
        let served = table
            .remove(old)
            .ok_or_else(|| format!("endpoint {old} is not served by this process"))?;
        table.insert(new.to_string(), served);
        Ok(())
    }

    /// The paths served now.
    pub fn paths(&self) -> Vec<String> {
        self.table
            .lock()
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default()
    }
}

async fn accept_loop(listener: TcpListener, settings: Arc<ServerSettings>, table: Table) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(
                    stream,
                    settings.clone(),
                    table.clone(),
                    peer,
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, "endpoint server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    settings: Arc<ServerSettings>,
    table: Table,
    peer: std::net::SocketAddr,
) {
    let (read, write) = stream.into_split();
    let mut frames = FramedRead::new(read, TcpRequestCodec::new(Some(settings.max_message_size)));
    let mut replies = FramedWrite::new(write, TcpResponseCodec::new(None));
    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) => {
                // The decoder cannot resynchronise after a bad frame: say why, then close.
                let text = match &e {
                    TcpCodecError::TooLarge { .. } => e.to_string(),
                    _ => format!("cannot decode the request frame: {e}"),
                };
                tracing::warn!(%peer, error = %e, "request frame rejected; closing the connection");
                let _ = replies.send(TcpResponseMessage::unavailable(&text)).await;
                return;
            }
        };
        let served = table.lock().ok().and_then(|t| {
            t.get(&frame.endpoint_path)
                .map(|s| (s.handler.clone(), s.state.clone()))
        });
        let Some((handler, state)) = served else {
            tracing::warn!(%peer, path = %frame.endpoint_path, "request for an endpoint this process does not serve");
            let text = format!("unknown endpoint {}", frame.endpoint_path);
            if replies
                .send(TcpResponseMessage::unavailable(&text))
                .await
                .is_err()
            {
                return;
            }
            continue;
        };
        if state.is_draining() {
            if replies
                .send(TcpResponseMessage::unavailable("endpoint is shutting down"))
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        match accept(&frame.payload) {
            Ok(accepted) => {
                if replies.send(TcpResponseMessage::ack()).await.is_err() {
                    return;
                }
                let guard = state.enter();
                tokio::spawn(respond(
                    accepted,
                    frame.headers,
                    handler,
                    settings.connect_timeout,
                    guard,
                ));
            }
            Err(text) => {
                tracing::warn!(%peer, %text, "request rejected");
                if replies
                    .send(TcpResponseMessage::unavailable(&text))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
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
        Err(e) => (PayloadCodec::Json, Err(e)),
    };
    Ok(Accepted {
        id: control.id,
        info,
        codec,
        metadata: control.metadata,
        body,
    })
}

/// Dial back to the requester (retrying while the local address is not yet available).
pub async fn dial(address: &str, timeout: Duration) -> Result<TcpStream, String> {
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

/// A header-only frame carrying `value` as JSON.
pub fn header_frame(value: &impl serde::Serialize) -> TwoPartMessage {
    TwoPartMessage::header_only(Bytes::from(serde_json::to_vec(value).unwrap_or_default()))
}

fn data_frame(codec: PayloadCodec, item: &Value) -> Result<TwoPartMessage, String> {
    codec
        .encode(item)
        .map(|body| TwoPartMessage::data_only(Bytes::from(body)))
}

type Sink = futures_util::stream::SplitSink<Framed<TcpStream, TwoPartCodec>, TwoPartMessage>;

async fn respond(
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
        Err(text) => {
            let error =
                DynamoError::new("InvalidRequest", "InvalidRequest", "request.invalid", text);
            if let Ok(frame) = data_frame(codec, &item(&Reply::Error(error))) {
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
                if reply == Reply::Abandon {
                    tracing::warn!(request = %id, "the handler gave up on the request; ending its stream without completion");
                    return;
                }
                let is_error = matches!(reply, Reply::Error(_));
                let frame = match data_frame(codec, &item(&reply)) {
                    Ok(frame) => frame,
                    Err(e) => {
                        tracing::error!(request = %id, error = %e, "cannot encode a reply");
                        let error = DynamoError::new("Internal", "Internal", "runtime.internal", format!("cannot encode a reply ({}): {e}", codec.name()));
                        match data_frame(codec, &item(&Reply::Error(error))) {
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

/// The data-frame wrapper of a reply.
fn item(reply: &Reply) -> Value {
    json!({ "data": reply.annotated(), "complete_final": false })
}

/// `complete_final`, the sentinel, close.
async fn finish(sink: &mut Sink, codec: PayloadCodec) {
    if let Ok(frame) = data_frame(codec, &json!({ "complete_final": true })) {
        if sink.send(frame).await.is_err() {
            return;
        }
    }
    let _ = sink.send(header_frame(&ControlMessage::Sentinel)).await;
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Call, CallError, ClientSettings, EndpointClient};
    use crate::record::TcpTarget;

    fn settings() -> (ServerSettings, ClientSettings) {
        (
            ServerSettings {
                max_message_size: 1 << 20,
                connect_timeout: Duration::from_secs(5),
            },
            ClientSettings {
                request_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(5),
                max_message_size: 1 << 20,
            },
        )
    }

    /// Echoes `body.n` items, then fails when `body.fail` is set; records stops.
    fn counter(stops: Arc<Mutex<Vec<(bool, bool)>>>) -> Arc<dyn Handler> {
        Arc::new(move |request: Request| -> Replies {
            let n = request.body["n"].as_u64().unwrap_or(0);
            let fail = request.body["fail"].as_bool().unwrap_or(false);
            let control = request.control.clone();
            let stops = stops.clone();
            Box::pin(futures_util::stream::unfold(0u64, move |i| {
                let control = control.clone();
                let stops = stops.clone();
                async move {
                    if i == n {
                        return fail.then(|| {
                            let error = DynamoError::new(
                                "InvalidArgument",
                                "InvalidRequest",
                                "request.invalid_argument",
                                "ValueError: no",
                            );
                            (Reply::Error(error), n + 1)
                        });
                    }
                    if i > n {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if control.is_stopped() {
                        stops
                            .lock()
                            .unwrap()
                            .push((control.is_stopped(), control.is_killed()));
                        return None;
                    }
                    Some((Reply::Data(json!(i)), i + 1))
                }
            }))
        })
    }

    #[tokio::test]
    async fn calls_stream_items_errors_and_stops_over_tcp() {
        let (server_settings, client_settings) = settings();
        let server = EndpointServer::bind("127.0.0.1", 0, server_settings)
            .await
            .unwrap();
        let stops = Arc::new(Mutex::new(Vec::new()));
        let state = server
            .register("7/ns/comp/ep", counter(stops.clone()))
            .unwrap();
        assert!(server
            .register("7/ns/comp/ep", counter(stops.clone()))
            .is_err());
        let client = EndpointClient::new("127.0.0.1", client_settings)
            .await
            .unwrap();
        let target = TcpTarget {
            address: server.address(),
            path: "7/ns/comp/ep".into(),
        };
        for codec in [PayloadCodec::Json, PayloadCodec::Msgpack] {
            let body = json!({"n": 3});
            let mut stream = client
                .call(Call {
                    target: &target,
                    codec,
                    id: "r1",
                    body: &body,
                    headers: BTreeMap::new(),
                })
                .await
                .unwrap();
            let mut got = Vec::new();
            while let Some(item) = stream.next().await {
                got.push(item.unwrap()["data"].clone());
            }
            assert_eq!(got, vec![json!(0), json!(1), json!(2)], "{codec:?}");
        }

        let body = json!({"n": 1, "fail": true});
        let mut stream = client
            .call(Call {
                target: &target,
                codec: PayloadCodec::Json,
                id: "r2",
                body: &body,
                headers: BTreeMap::new(),
            })
            .await
            .unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap()["data"], json!(0));
        match stream.next().await {
            Some(Err(CallError::Remote(error))) => {
                assert_eq!(error.class.as_deref(), Some("InvalidRequest"));
                assert_eq!(error.text(), "ValueError: no");
            }
            other => panic!("expected the handler's error, got {other:?}"),
        }
        assert!(stream.next().await.is_none());

        // A stop reaches the handler's control; the stream then ends cleanly.
        let body = json!({"n": 1000});
        let mut stream = client
            .call(Call {
                target: &target,
                codec: PayloadCodec::Json,
                id: "r3",
                body: &body,
                headers: BTreeMap::new(),
            })
            .await
            .unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        stream.control().stop().await;
        while let Some(item) = stream.next().await {
            assert!(item.is_ok(), "{item:?}");
        }
        assert!(state.wait_idle(Some(Duration::from_secs(5))).await);

        // Unknown paths and draining endpoints are refused in the ACK.
        let unknown = TcpTarget {
            address: server.address(),
            path: "7/ns/comp/other".into(),
        };
        let refused = client
            .call(Call {
                target: &unknown,
                codec: PayloadCodec::Json,
                id: "r4",
                body: &body,
                headers: BTreeMap::new(),
            })
            .await
            .err()
            .unwrap();
        assert!(
            refused
                .to_string()
                .contains("unknown endpoint 7/ns/comp/other"),
            "{refused}"
        );
        state.drain();
        let refused = client
            .call(Call {
                target: &target,
                codec: PayloadCodec::Json,
                id: "r5",
                body: &body,
                headers: BTreeMap::new(),
            })
            .await
            .err()
            .unwrap();
        assert!(refused.to_string().contains("shutting down"), "{refused}");
    }

    #[tokio::test]
    async fn a_dropped_stream_kills_the_handler() {
        let (server_settings, client_settings) = settings();
        let server = EndpointServer::bind("127.0.0.1", 0, server_settings)
            .await
            .unwrap();
        let stops = Arc::new(Mutex::new(Vec::new()));
        let state = server.register("1/a/b/c", counter(stops.clone())).unwrap();
        let client = EndpointClient::new("127.0.0.1", client_settings)
            .await
            .unwrap();
        let target = TcpTarget {
            address: server.address(),
            path: "1/a/b/c".into(),
        };
        let body = json!({"n": 1000});
        let mut stream = client
            .call(Call {
                target: &target,
                codec: PayloadCodec::Json,
                id: "d1",
                body: &body,
                headers: BTreeMap::new(),
            })
            .await
            .unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        drop(stream);
        assert!(state.wait_idle(Some(Duration::from_secs(5))).await);
        assert_eq!(state.inflight(), 0);
    }
}
