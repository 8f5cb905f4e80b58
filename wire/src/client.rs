//! Calling an endpoint instance over the TCP request plane (interop spec §3–§5), independent of what
//! the body means: one request frame (ACKed by the instance, on a pooled connection) and one call-home
//! response stream, read as Annotated envelopes until `complete_final` or the sentinel.
//! [`StreamControl::stop`] / [`StreamControl::kill`] tell the worker to stop; dropping an unfinished
//! stream sends `kill`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::codec::messages::{
    ConnectionInfo, ControlMessage, RequestControlMessage, RequestType, ResponseStreamPrologue,
    ResponseType, StreamType, TcpStreamConnectionInfo,
};
use crate::codec::{
    MessageKind, TcpCodecError, TcpRequestCodec, TcpRequestMessage, TcpResponseCodec,
    TcpResponseMessage, TwoPartCodec, TwoPartCodecError, TwoPartMessage,
};
use crate::error::DynamoError;
use crate::mux::client::{Canceller, Event, MuxPeer, MuxStream, OpenError};
use crate::mux::{MuxRequest, MuxSettings};
use crate::record::TcpTarget;
use crate::response_stream::{ResponseConnection, ResponseStreamServer};
use crate::PayloadCodec;

/// Idle request-plane connections kept per address.
const POOL_SIZE: usize = 32;

/// Why a call failed.
#[derive(Clone, Debug, PartialEq)]
pub enum CallError {
    /// The instance could not be reached or refused the request (`Unavailable: ...`).
    Unavailable(String),
    /// The response stream ended before it completed (`Disconnected: ...`).
    Disconnected(String),
    /// The handler answered with an error item.
    Remote(DynamoError),
    /// The request could not be encoded.
    Encode(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unavailable(text) => write!(f, "Unavailable: {text}"),
            CallError::Disconnected(text) => write!(f, "Disconnected: {text}"),
            CallError::Remote(error) => write!(
                f,
                "{}: {}",
                error.class.as_deref().unwrap_or("Internal"),
                error.text()
            ),
            CallError::Encode(text) => write!(f, "InvalidArgument: {text}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Why a request-plane connection could not be opened or a frame got no ACK.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The TCP connect took longer than the connect timeout.
    #[error("connecting to {address} timed out after {:.1} s", .timeout.as_secs_f64())]
    ConnectTimeout {
        /// `host:port`.
        address: String,
        /// The connect timeout.
        timeout: Duration,
    },
    /// The TCP connect failed.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The socket's error.
        source: std::io::Error,
    },
    /// Writing the request frame failed.
    #[error("cannot send the request: {0}")]
    Send(#[source] TcpCodecError),
    /// The instance answered with something that is not an ACK frame.
    #[error("bad ACK: {0}")]
    BadAck(#[source] TcpCodecError),
    /// The instance closed the connection instead of acknowledging.
    #[error("closed the connection before its ACK")]
    ClosedBeforeAck,
}

/// Why a request envelope could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The control header did not serialize.
    #[error(transparent)]
    Header(#[from] serde_json::Error),
    /// The two-part frame could not be encoded.
    #[error(transparent)]
    Frame(#[from] TwoPartCodecError),
}

/// Timeouts and limits.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// ACK and call-home wait (`DYN_TCP_REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// TCP connect (`DYN_TCP_CONNECT_TIMEOUT`).
    pub connect_timeout: Duration,
    /// Largest frame (`DYN_TCP_MAX_MESSAGE_SIZE`).
    pub max_message_size: usize,
    /// The multiplexed request plane, for instances that advertise it (`None`: Dynamo's frames
    /// and a call-home stream for every request).
    pub mux: Option<crate::mux::MuxSettings>,
}

/// One request-plane connection: frames out, ACKs in.
pub struct Connection {
    reader: FramedRead<OwnedReadHalf, TcpResponseCodec>,
    writer: FramedWrite<OwnedWriteHalf, TcpRequestCodec>,
}

impl Connection {
    /// Connect to `address` within `timeout`; frames over `max_message_size` are refused.
    pub async fn open(
        address: &str,
        timeout: Duration,
        max_message_size: usize,
    ) -> Result<Connection, ConnectionError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
            .await
            .map_err(|_| ConnectionError::ConnectTimeout {
                address: address.to_string(),
                timeout,
            })?
            .map_err(|source| ConnectionError::Connect {
                address: address.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (read, write) = stream.into_split();
        let max = Some(max_message_size);
        Ok(Connection {
            reader: FramedRead::new(read, TcpResponseCodec::new(max)),
            writer: FramedWrite::new(write, TcpRequestCodec::new(max)),
        })
    }

    /// Write one frame, read its ACK.
    pub async fn exchange(
        &mut self,
        frame: &TcpRequestMessage,
    ) -> Result<TcpResponseMessage, ConnectionError> {
        self.writer
            .send(frame)
            .await
            .map_err(ConnectionError::Send)?;
        match self.reader.next().await {
            Some(Ok(ack)) => Ok(ack),
            Some(Err(e)) => Err(ConnectionError::BadAck(e)),
            None => Err(ConnectionError::ClosedBeforeAck),
        }
    }
}

/// The two-part request envelope (interop spec §4): the control header naming the call-home
/// `streams` address and `subject`, then `body` already encoded in `codec`.
pub fn envelope(
    streams: &str,
    subject: &str,
    id: &str,
    codec: PayloadCodec,
    body: Vec<u8>,
) -> Result<Bytes, EnvelopeError> {
    let info = TcpStreamConnectionInfo {
        address: streams.to_string(),
        subject: subject.to_string(),
        context: id.to_string(),
        stream_type: StreamType::Response,
    };
    let control = RequestControlMessage {
        id: id.to_string(),
        request_type: RequestType::SingleIn,
        response_type: ResponseType::ManyOut,
        connection_info: ConnectionInfo {
            transport: "tcp_server".into(),
            info: serde_json::to_string(&info)?,
        },
        payload_codec: Some(codec.name().into()),
        metadata: None,
        frontend_send_ts_ns: None,
    };
    let header = serde_json::to_vec(&control)?;
    Ok(TwoPartCodec::new(None).encode_message(TwoPartMessage::new(header, body))?)
}

/// Calls endpoints; owns the call-home server its streams come back through.
pub struct EndpointClient {
    settings: ClientSettings,
    streams: Arc<ResponseStreamServer>,
    pools: Mutex<HashMap<String, Vec<Connection>>>,
    /// Multiplexed connections, by worker address (an address stays once used: a worker that
    /// went away keeps an entry without connections).
    peers: Mutex<HashMap<String, Arc<MuxPeer>>>,
}

/// One call.
pub struct Call<'a> {
    /// Where.
    pub target: &'a TcpTarget,
    /// How the body is encoded (the instance record's `request_plane_codec`).
    pub codec: PayloadCodec,
    /// The request id (becomes the handler's context id).
    pub id: &'a str,
    /// The body.
    pub body: &'a Value,
    /// Frame headers.
    pub headers: BTreeMap<String, String>,
    /// The instance serves the multiplexed request plane (its record's `mux`); it is used when the
    /// client's settings allow.
    pub mux: bool,
}

impl EndpointClient {
    /// A client whose call-home server listens on `host` (any free port).
    pub async fn new(host: &str, settings: ClientSettings) -> std::io::Result<Self> {
        let streams = ResponseStreamServer::bind(host, 0, settings.max_message_size).await?;
        Ok(EndpointClient {
            settings,
            streams,
            pools: Mutex::default(),
            peers: Mutex::default(),
        })
    }

    /// Send `call` and wait for the instance to open its response stream.
    pub async fn call(&self, call: Call<'_>) -> Result<ResponseStream, CallError> {
        if call.mux {
            if let Some(mux) = &self.settings.mux {
                return self.call_mux(call, mux).await;
            }
        }
        let mut pending = self.streams.register();
        let body = call
            .codec
            .encode(call.body)
            .map_err(|e| CallError::Encode(e.to_string()))?;
        let payload = envelope(
            self.streams.address(),
            &pending.subject,
            call.id,
            call.codec,
            body,
        )
        .map_err(|e| CallError::Encode(e.to_string()))?;
        let frame = TcpRequestMessage {
            endpoint_path: call.target.path.clone(),
            headers: call.headers,
            payload,
        };
        self.send(&call.target.address, &frame).await?;
        let Some(connection) = pending.connected(self.settings.request_timeout).await else {
            return Err(CallError::Unavailable(format!(
                "{} accepted request {} but did not open its response stream within {:.1} s",
                call.target.address,
                call.id,
                self.settings.request_timeout.as_secs_f64()
            )));
        };
        let (sink, mut stream) = connection.split();
        let prologue = tokio::time::timeout(self.settings.request_timeout, stream.next()).await;
        let frame = match prologue {
            Err(_) => return Err(CallError::Disconnected("no prologue".into())),
            Ok(None) => return Err(CallError::Disconnected("closed before its prologue".into())),
            Ok(Some(Err(e))) => return Err(CallError::Disconnected(format!("bad frame: {e}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        match serde_json::from_slice::<ResponseStreamPrologue>(frame.header()) {
            Ok(ResponseStreamPrologue { error: None }) => {}
            Ok(ResponseStreamPrologue { error: Some(text) }) => {
                return Err(CallError::Unavailable(text))
            }
            Err(e) => return Err(CallError::Disconnected(format!("bad prologue: {e}"))),
        }
        Ok(ResponseStream {
            control: StreamControl {
                sink: Arc::new(tokio::sync::Mutex::new(Some(sink))),
                mux: None,
                cancelled: Arc::default(),
                done: Arc::default(),
            },
            source: Source::CallHome(stream),
            codec: call.codec,
        })
    }

    /// `call` as a stream of the instance's multiplexed request plane.
    async fn call_mux(
        &self,
        call: Call<'_>,
        settings: &MuxSettings,
    ) -> Result<ResponseStream, CallError> {
        let body = call
            .codec
            .encode(call.body)
            .map_err(|e| CallError::Encode(e.to_string()))?;
        let address = &call.target.address;
        let peer = {
            let mut peers = self.peers.lock().map_err(|_| {
                CallError::Unavailable("the client's peer table was poisoned".into())
            })?;
            peers
                .entry(address.clone())
                .or_insert_with(|| {
                    Arc::new(MuxPeer::new(
                        address,
                        settings.clone(),
                        self.settings.connect_timeout,
                        self.settings.max_message_size,
                    ))
                })
                .clone()
        };
        let request = MuxRequest {
            window: peer.window(),
            codec: call.codec,
            id: call.id.to_string(),
            path: call.target.path.clone(),
            headers: call.headers,
            metadata: None,
            body: body.into(),
        };
        let mut stream = peer.open(&request).await.map_err(|e| match e {
            OpenError::Encode(e) => CallError::Encode(e.to_string()),
            other => CallError::Unavailable(other.to_string()),
        })?;
        // A refusal is the call's error, as a refusing ACK is on Dynamo's plane.
        let first = match stream.next().await {
            Some(Event::Refused(text)) => {
                return Err(CallError::Unavailable(format!(
                    "{address} refused the request: {text}"
                )))
            }
            first => first,
        };
        Ok(ResponseStream {
            control: StreamControl {
                sink: Arc::new(tokio::sync::Mutex::new(None)),
                mux: Some(stream.canceller()),
                cancelled: Arc::default(),
                done: Arc::default(),
            },
            source: Source::Mux(stream, Some(first)),
            codec: call.codec,
        })
    }

    /// One request frame and its ACK, on a pooled connection or a new one; a pooled connection
    /// that fails is retried once on a fresh one (the instance may have closed it).
    async fn send(&self, address: &str, frame: &TcpRequestMessage) -> Result<(), CallError> {
        let timeout = self.settings.request_timeout;
        let mut pooled = self
            .pools
            .lock()
            .ok()
            .and_then(|mut p| p.get_mut(address).and_then(Vec::pop));
        let (connection, ack) = loop {
            let fresh = pooled.is_none();
            let mut connection = match pooled.take() {
                Some(c) => c,
                None => self.connect(address).await?,
            };
            match tokio::time::timeout(timeout, connection.exchange(frame)).await {
                Ok(Ok(ack)) => break (connection, ack),
                Ok(Err(_)) if !fresh => continue,
                Ok(Err(what)) => return Err(CallError::Unavailable(format!("{address}: {what}"))),
                Err(_) => {
                    return Err(CallError::Unavailable(format!(
                        "{address}: no ACK within {:.1} s",
                        timeout.as_secs_f64()
                    )))
                }
            }
        };
        if !ack.data.is_empty() {
            let text = String::from_utf8_lossy(&ack.data).into_owned();
            return Err(CallError::Unavailable(format!(
                "{address} refused the request: {text}"
            )));
        }
        if let Ok(mut pools) = self.pools.lock() {
            let pool = pools.entry(address.to_string()).or_default();
            if pool.len() < POOL_SIZE {
                pool.push(connection);
            }
        }
        Ok(())
    }

    async fn connect(&self, address: &str) -> Result<Connection, CallError> {
        Connection::open(
            address,
            self.settings.connect_timeout,
            self.settings.max_message_size,
        )
        .await
        .map_err(|e| CallError::Unavailable(e.to_string()))
    }
}

/// Stops a call's handler; usable while another task waits on the stream.
#[derive(Clone)]
pub struct StreamControl {
    sink: Arc<tokio::sync::Mutex<Option<SplitSink<ResponseConnection, TwoPartMessage>>>>,
    /// A multiplexed stream's cancel.
    mux: Option<Canceller>,
    cancelled: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
}

impl StreamControl {
    /// Ask the worker to stop; the stream then ends cleanly after what is in flight.
    pub async fn stop(&self) {
        self.send(ControlMessage::Stop).await;
    }

    /// Tell the worker to stop now.
    pub async fn kill(&self) {
        self.send(ControlMessage::Kill).await;
    }

    async fn send(&self, message: ControlMessage) {
        self.cancelled.store(true, Ordering::SeqCst);
        if self.done.load(Ordering::SeqCst) {
            return;
        }
        if let Some(mux) = &self.mux {
            mux.cancel(message == ControlMessage::Kill);
            return;
        }
        if let Some(sink) = self.sink.lock().await.as_mut() {
            let header = serde_json::to_vec(&message).unwrap_or_default();
            let _ = sink
                .send(TwoPartMessage::header_only(Bytes::from(header)))
                .await;
        }
    }

    /// Whether this side stopped the call.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Whether the stream has ended.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
}

/// The responses of one call.
pub struct ResponseStream {
    control: StreamControl,
    source: Source,
    codec: PayloadCodec,
}

/// Where a call's items come from.
enum Source {
    /// Dynamo's call-home connection, past its prologue.
    CallHome(SplitStream<ResponseConnection>),
    /// A stream of the multiplexed request plane, and its first event until it is read.
    Mux(MuxStream, Option<Option<Event>>),
}

impl ResponseStream {
    /// The next Annotated envelope; `None` at the end. An error item is `Err(Remote)` and ends the
    /// stream; a stream that breaks before completing is `Err(Disconnected)`, unless this side
    /// stopped it.
    pub async fn next(&mut self) -> Option<Result<Value, CallError>> {
        if self.control.is_done() {
            return None;
        }
        let result = self.read().await;
        if !matches!(result, Some(Ok(_))) {
            self.control.done.store(true, Ordering::SeqCst);
        }
        match result {
            Some(Err(CallError::Disconnected(_))) if self.control.is_cancelled() => None,
            other => other,
        }
    }

    async fn read(&mut self) -> Option<Result<Value, CallError>> {
        let disconnected = |what: String| Some(Err(CallError::Disconnected(what)));
        let decode = |codec: PayloadCodec, bytes: &[u8]| {
            codec
                .decode::<Value>(bytes)
                .map_err(|e| format!("bad data frame ({}): {e}", codec.name()))
        };
        let decoded = match &mut self.source {
            Source::Mux(stream, first) => {
                let event = match first.take() {
                    Some(event) => event,
                    None => stream.next().await,
                };
                match event {
                    Some(Event::Data(bytes)) => decode(self.codec, &bytes),
                    Some(Event::End) => return None,
                    Some(Event::Refused(text)) => {
                        return Some(Err(CallError::Unavailable(format!(
                            "the instance refused the request: {text}"
                        ))))
                    }
                    Some(Event::Reset(reason)) => return disconnected(reason),
                    None => return disconnected("the stream was cancelled".into()),
                }
            }
            Source::CallHome(stream) => {
                let frame = match stream.next().await {
                    None => {
                        return disconnected("Stream ended before generation completed".into());
                    }
                    Some(Err(e)) => return disconnected(format!("bad frame: {e}")),
                    Some(Ok(frame)) => frame,
                };
                match frame.kind() {
                    MessageKind::DataOnly => decode(self.codec, frame.data()),
                    MessageKind::HeaderOnly => {
                        return match serde_json::from_slice::<ControlMessage>(frame.header()) {
                            Ok(ControlMessage::Sentinel) => None,
                            Ok(other) => {
                                disconnected(format!("unexpected control message {other:?}"))
                            }
                            Err(e) => disconnected(format!("bad control frame: {e}")),
                        };
                    }
                    other => return disconnected(format!("unexpected {other:?} frame")),
                }
            }
        };
        let mut item = match decoded {
            Ok(item) => item,
            Err(what) => return disconnected(what),
        };
        if item.get("complete_final").and_then(Value::as_bool) == Some(true) {
            return None;
        }
        let envelope = match item.get_mut("data").map(Value::take) {
            Some(Value::Object(envelope)) => envelope,
            _ => return disconnected("data frame without an item".into()),
        };
        let is_error = envelope.get("event").and_then(Value::as_str) == Some("error")
            || envelope.get("error").is_some_and(|e| !e.is_null());
        if is_error {
            let error = envelope
                .get("error")
                .and_then(|e| serde_json::from_value::<DynamoError>(e.clone()).ok())
                .unwrap_or_else(|| {
                    let text = envelope
                        .get("comment")
                        .and_then(Value::as_array)
                        .map(|c| {
                            c.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join("; ")
                        })
                        .filter(|t| !t.is_empty())
                        .unwrap_or_else(|| "error item without a message".into());
                    DynamoError::new("Internal", "Internal", "runtime.internal", text)
                });
            return Some(Err(CallError::Remote(error)));
        }
        Some(Ok(Value::Object(envelope)))
    }

    /// Its control, to stop the handler from another task.
    pub fn control(&self) -> StreamControl {
        self.control.clone()
    }

    /// Whether the stream has ended.
    pub fn is_done(&self) -> bool {
        self.control.is_done()
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if self.control.is_done() || self.control.is_cancelled() {
            return;
        }
        // An abandoned stream: tell the worker, without blocking the dropper.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let control = self.control.clone();
            runtime.spawn(async move { control.kill().await });
        }
    }
}
