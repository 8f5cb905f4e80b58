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

use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::{TcpCodecError, TcpRequestCodec, TcpResponseCodec, TcpResponseMessage};
use crate::error::DynamoError;
use crate::mux::{MuxSettings, PREFACE};
use crate::{PayloadCodec, PayloadEncodeError};

mod accept;
mod mux;
mod respond;

pub use accept::{accept, accept_as, Accepted, BodyError, EnvelopeRefused};
use respond::respond;
pub use respond::{dial, header_frame, DialError};

/// Why an endpoint could not be registered or moved.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A thread panicked while holding the table of endpoints.
    #[error("endpoint table poisoned")]
    TablePoisoned,
    /// Another handler already serves the path.
    #[error("endpoint {path} is already served by this process")]
    AlreadyServed {
        /// The endpoint path.
        path: String,
    },
    /// No handler serves the path.
    #[error("endpoint {path} is not served by this process")]
    NotServed {
        /// The endpoint path.
        path: String,
    },
}

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
#[derive(Clone, Debug)]
pub enum Reply {
    /// A value, sent as `Annotated{data: value}`.
    Data(Value),
    /// A ready-made Annotated envelope (`data`, `id`, `event`, `comment`).
    Annotated(Value),
    /// An item the handler encodes itself, with no JSON value in between (a typed engine output,
    /// once per token).
    Item(Arc<dyn EncodeItem>),
    /// An error item; the stream ends after it.
    Error(DynamoError),
    /// The stream ends here without completing (no `complete_final`): the requester takes the
    /// answer for broken and may move the request elsewhere (migration), as for a dead worker.
    Abandon,
}

/// A reply that encodes itself.
pub trait EncodeItem: Send + Sync + std::fmt::Debug {
    /// The whole data frame body, `{"data": <Annotated>, "complete_final": false}`, in `codec`.
    fn encode(&self, codec: PayloadCodec) -> Result<Vec<u8>, PayloadEncodeError>;

    /// The Annotated envelope (for callers in the same process).
    fn annotated(&self) -> Value;
}

impl PartialEq for Reply {
    fn eq(&self, other: &Reply) -> bool {
        match (self, other) {
            (Reply::Data(a), Reply::Data(b)) | (Reply::Annotated(a), Reply::Annotated(b)) => a == b,
            (Reply::Item(a), Reply::Item(b)) => a.annotated() == b.annotated(),
            (Reply::Error(a), Reply::Error(b)) => a == b,
            (Reply::Abandon, Reply::Abandon) => true,
            _ => false,
        }
    }
}

impl Reply {
    /// The data frame body that carries this reply, in `codec`.
    pub fn encode(&self, codec: PayloadCodec) -> Result<Vec<u8>, PayloadEncodeError> {
        match self {
            Reply::Item(item) => item.encode(codec),
            other => codec.encode(&json!({ "data": other.annotated(), "complete_final": false })),
        }
    }

    /// The Annotated envelope this reply travels as.
    pub fn annotated(&self) -> Value {
        match self {
            Reply::Data(value) => json!({ "data": value }),
            Reply::Annotated(envelope) => envelope.clone(),
            Reply::Item(item) => item.annotated(),
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
    /// Heartbeats of multiplexed connections (the window and connection count are the client's).
    pub mux: MuxSettings,
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
    ) -> Result<Arc<EndpointState>, EndpointError> {
        let mut table = self
            .table
            .lock()
            .map_err(|_| EndpointError::TablePoisoned)?;
        if table.contains_key(path) {
            return Err(EndpointError::AlreadyServed { path: path.into() });
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
    pub fn rename(&self, old: &str, new: &str) -> Result<(), EndpointError> {
        let mut table = self
            .table
            .lock()
            .map_err(|_| EndpointError::TablePoisoned)?;
        if table.contains_key(new) {
            return Err(EndpointError::AlreadyServed { path: new.into() });
        }
        let served = table
            .remove(old)
            .ok_or_else(|| EndpointError::NotServed { path: old.into() })?;
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
                tokio::spawn(serve_socket(stream, settings.clone(), table.clone(), peer));
            }
            Err(e) => {
                tracing::warn!(error = %e, "endpoint server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Tell the two request planes apart by their first 8 bytes: the multiplexed plane's preface, or
/// the start of a Dynamo request frame (never shorter than 8 bytes), which is then read as one.
async fn serve_socket(
    stream: TcpStream,
    settings: Arc<ServerSettings>,
    table: Table,
    peer: std::net::SocketAddr,
) {
    let (mut read, mut write) = stream.into_split();
    let mut first = [0u8; 8];
    if read.read_exact(&mut first).await.is_err() {
        return;
    }
    if &first == PREFACE {
        if write.write_all(PREFACE).await.is_ok() {
            mux::serve(read, write, settings, table, peer).await;
        }
        return;
    }
    let read = std::io::Cursor::new(first).chain(read);
    serve_connection(read, write, settings, table, peer).await;
}

async fn serve_connection(
    read: impl AsyncRead + Unpin,
    write: OwnedWriteHalf,
    settings: Arc<ServerSettings>,
    table: Table,
    peer: std::net::SocketAddr,
) {
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
            Err(refused) => {
                let text = refused.to_string();
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

#[cfg(test)]
mod tests;
