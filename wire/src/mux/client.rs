//! The frontend's side of `mux/1`: a [`MuxPeer`] keeps up to `connections` long-lived connections
//! to one worker address and opens each request as a [`MuxStream`] on one of them, round-robin.
//!
//! Each connection has three tasks: a writer that drains a queue of frames into the socket (frames
//! that queue up while it writes go out in one write), a reader that hands each frame to its stream
//! and never waits on a consumer, and a heartbeat. When the connection ends (closed, a bad frame, no
//! frame for `dead_after`), every open stream ends with [`Event::Reset`] naming why.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_util::codec::FramedRead;

use super::{encode, Frame, FrameCodec, Kind, MuxRequest, MuxSettings, RequestError, PREFACE};

/// What a stream receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// One item (the bytes of a call-home data frame, in the request's codec).
    Data(Bytes),
    /// The stream completed.
    End,
    /// The stream ended without completing: the worker gave up on it, or the connection was lost.
    Reset(String),
    /// The worker did not take the request (unknown endpoint, draining, a bad request).
    Refused(String),
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The TCP connect took longer than the connect timeout.
    #[error("connecting to {address} timed out after {:.1} s", .timeout.as_secs_f64())]
    TimedOut {
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
    /// The peer did not answer the preface with its own.
    #[error("{address} does not speak the multiplexed request plane: {what}")]
    NoPreface {
        /// `host:port`.
        address: String,
        /// What happened instead.
        what: String,
    },
}

/// Why a request could not be started.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No connection to the worker.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The request does not encode.
    #[error("cannot encode the request: {0}")]
    Encode(#[from] RequestError),
    /// The connection ended before the request went out.
    #[error("the connection to {address} ended: {reason}")]
    Closed {
        /// `host:port`.
        address: String,
        /// Why it ended.
        reason: String,
    },
}

/// Connections to one worker address.
pub struct MuxPeer {
    address: String,
    settings: MuxSettings,
    connect_timeout: Duration,
    /// Largest frame accepted from the worker.
    max_message_size: usize,
    /// Open connections (closed ones are pruned when a stream is opened).
    connections: Mutex<Vec<Arc<Connection>>>,
    /// One dial at a time: concurrent first requests share the connection the first one opens.
    dialing: tokio::sync::Mutex<()>,
    next: AtomicUsize,
}

impl Drop for MuxPeer {
    fn drop(&mut self) {
        if let Ok(connections) = self.connections.lock() {
            for connection in connections.iter() {
                connection.close("the frontend stopped using this worker".into());
            }
        }
    }
}

impl MuxPeer {
    /// A peer at `address` (`host:port`); nothing is dialled until the first request.
    pub fn new(
        address: &str,
        settings: MuxSettings,
        connect_timeout: Duration,
        max_message_size: usize,
    ) -> MuxPeer {
        MuxPeer {
            address: address.to_string(),
            settings,
            connect_timeout,
            max_message_size,
            connections: Mutex::default(),
            dialing: tokio::sync::Mutex::new(()),
            next: AtomicUsize::new(0),
        }
    }

    /// The worker's `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The window a request should name.
    pub fn window(&self) -> u32 {
        self.settings.window
    }

    /// Start `request` on one of the peer's connections (dialling one when there are fewer than
    /// `connections`).
    pub async fn open(&self, request: &MuxRequest) -> Result<MuxStream, OpenError> {
        let body = request.encode()?;
        let connection = self.connection().await?;
        connection.start(body, request.window)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.connections
            .lock()
            .map(|c| c.iter().filter(|c| !c.is_closed()).count())
            .unwrap_or(0)
    }

    fn pick(&self) -> Option<Arc<Connection>> {
        let mut connections = self.connections.lock().ok()?;
        connections.retain(|c| !c.is_closed());
        if connections.len() < self.settings.connections.max(1) {
            return None;
        }
        let at = self.next.fetch_add(1, Ordering::Relaxed) % connections.len();
        Some(connections[at].clone())
    }

    async fn connection(&self) -> Result<Arc<Connection>, OpenError> {
        if let Some(connection) = self.pick() {
            return Ok(connection);
        }
        let _dialing = self.dialing.lock().await;
        if let Some(connection) = self.pick() {
            return Ok(connection);
        }
        match Connection::dial(
            &self.address,
            &self.settings,
            self.connect_timeout,
            self.max_message_size,
        )
        .await
        {
            Ok(connection) => {
                if let Ok(mut connections) = self.connections.lock() {
                    connections.push(connection.clone());
                }
                Ok(connection)
            }
            // A second connection that cannot be opened: the ones open still serve.
            Err(e) => {
                let open = self.connections.lock().ok().and_then(|c| {
                    let live: Vec<_> = c.iter().filter(|c| !c.is_closed()).cloned().collect();
                    (!live.is_empty()).then(|| {
                        live[self.next.fetch_add(1, Ordering::Relaxed) % live.len()].clone()
                    })
                });
                open.ok_or(OpenError::Dial(e))
            }
        }
    }
}

/// The streams of one connection.
#[derive(Default)]
struct Streams {
    open: HashMap<u32, mpsc::UnboundedSender<Event>>,
    last_id: u32,
    /// Why the connection ended, once it has.
    closed: Option<String>,
}

/// One connection to a worker.
struct Connection {
    address: String,
    /// Frames to write; taken at close, which ends the writer.
    writer: Mutex<Option<mpsc::UnboundedSender<Frame>>>,
    streams: Mutex<Streams>,
    /// The reader and the heartbeat, stopped at close.
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Connection {
    async fn dial(
        address: &str,
        settings: &MuxSettings,
        connect_timeout: Duration,
        max_message_size: usize,
    ) -> Result<Arc<Connection>, DialError> {
        let handshake = async {
            let mut stream =
                TcpStream::connect(address)
                    .await
                    .map_err(|source| DialError::Connect {
                        address: address.into(),
                        source,
                    })?;
            let _ = stream.set_nodelay(true);
            let no_preface = |what: String| DialError::NoPreface {
                address: address.into(),
                what,
            };
            stream
                .write_all(PREFACE)
                .await
                .map_err(|e| no_preface(e.to_string()))?;
            let mut answer = [0u8; 8];
            stream
                .read_exact(&mut answer)
                .await
                .map_err(|e| no_preface(e.to_string()))?;
            if &answer != PREFACE {
                return Err(no_preface(format!("it answered {answer:?}")));
            }
            Ok(stream)
        };
        let stream = match tokio::time::timeout(connect_timeout, handshake).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(DialError::TimedOut {
                    address: address.into(),
                    timeout: connect_timeout,
                })
            }
        };
        let (read, write) = stream.into_split();
        let (frames, queue) = mpsc::unbounded_channel();
        let connection = Arc::new(Connection {
            address: address.to_string(),
            writer: Mutex::new(Some(frames)),
            streams: Mutex::default(),
            tasks: Mutex::default(),
        });
        tokio::spawn(write_frames(write, queue));
        let reader = tokio::spawn(read_frames(
            connection.clone(),
            FramedRead::new(read, FrameCodec::new(max_message_size)),
            settings.dead_after,
        ));
        let heartbeat = tokio::spawn(heartbeat(Arc::downgrade(&connection), settings.heartbeat));
        if let Ok(mut tasks) = connection.tasks.lock() {
            tasks.push(reader.abort_handle());
            tasks.push(heartbeat.abort_handle());
        }
        tracing::debug!(%address, "multiplexed request-plane connection open");
        Ok(connection)
    }

    fn is_closed(&self) -> bool {
        self.streams.lock().map_or(true, |s| s.closed.is_some())
    }

    fn send(&self, frame: Frame) -> bool {
        self.writer
            .lock()
            .ok()
            .and_then(|w| w.as_ref().map(|w| w.send(frame).is_ok()))
            .unwrap_or(false)
    }

    /// Register a stream and send its request.
    fn start(self: &Arc<Self>, body: Bytes, window: u32) -> Result<MuxStream, OpenError> {
        let closed = |reason: String| OpenError::Closed {
            address: self.address.clone(),
            reason,
        };
        let (events, receiver) = mpsc::unbounded_channel();
        let id = {
            let mut streams = self
                .streams
                .lock()
                .map_err(|_| closed("its stream table was poisoned".into()))?;
            if let Some(reason) = &streams.closed {
                return Err(closed(reason.clone()));
            }
            let mut id = streams.last_id;
            loop {
                id = id.wrapping_add(1).max(1);
                if !streams.open.contains_key(&id) {
                    break;
                }
            }
            streams.last_id = id;
            streams.open.insert(id, events);
            id
        };
        if !self.send(Frame::new(Kind::Request, id, body)) {
            self.forget(id);
            return Err(closed("its writer stopped".into()));
        }
        Ok(MuxStream {
            connection: self.clone(),
            id,
            events: receiver,
            window,
            taken: 0,
            finished: false,
        })
    }

    fn forget(&self, id: u32) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.open.remove(&id);
        }
    }

    /// Hand `frame` to its stream; an error names a frame a worker must not send.
    fn deliver(&self, frame: Frame) -> Result<(), String> {
        let event = match frame.kind {
            Kind::Ping => return Ok(()),
            Kind::Data => Event::Data(frame.body),
            Kind::End => Event::End,
            Kind::Reset => Event::Reset(frame.text()),
            Kind::Refuse => Event::Refused(frame.text()),
            Kind::TooLarge => Event::Reset(format!(
                "the worker sent an item of {} bytes, over the limit",
                frame.oversize().unwrap_or(0)
            )),
            Kind::Request | Kind::Cancel | Kind::Credit => {
                return Err(format!(
                    "the worker sent a {:?} frame, which only a client sends",
                    frame.kind
                ))
            }
        };
        let Ok(mut streams) = self.streams.lock() else {
            return Err("stream table poisoned".into());
        };
        let last = !matches!(event, Event::Data(_));
        let target = if last {
            streams.open.remove(&frame.stream)
        } else {
            streams.open.get(&frame.stream).cloned()
        };
        // No stream: it was cancelled, and its late frames are dropped.
        if let Some(target) = target {
            let _ = target.send(event);
        }
        Ok(())
    }

    /// End the connection: every open stream gets `Reset(reason)`.
    fn close(&self, reason: String) {
        let open = match self.streams.lock() {
            Ok(mut streams) => {
                if streams.closed.is_some() {
                    return;
                }
                streams.closed = Some(reason.clone());
                std::mem::take(&mut streams.open)
            }
            Err(_) => return,
        };
        if !open.is_empty() {
            tracing::warn!(address = %self.address, %reason, streams = open.len(), "multiplexed request-plane connection lost");
        }
        for (_, stream) in open {
            let _ = stream.send(Event::Reset(reason.clone()));
        }
        if let Ok(mut writer) = self.writer.lock() {
            writer.take();
        }
        if let Ok(tasks) = self.tasks.lock() {
            for task in tasks.iter() {
                task.abort();
            }
        }
    }

    fn closed_reason(&self) -> String {
        self.streams
            .lock()
            .ok()
            .and_then(|s| s.closed.clone())
            .unwrap_or_else(|| "the stream's connection ended".into())
    }
}

/// One request's responses.
pub struct MuxStream {
    connection: Arc<Connection>,
    id: u32,
    events: mpsc::UnboundedReceiver<Event>,
    window: u32,
    /// Items taken since the last credit.
    taken: u32,
    finished: bool,
}

impl MuxStream {
    /// The next event; `None` after the last one (End, Reset, Refused) or a cancel.
    pub async fn next(&mut self) -> Option<Event> {
        if self.finished {
            return None;
        }
        let event = match self.events.recv().await {
            Some(event) => event,
            None => Event::Reset(self.connection.closed_reason()),
        };
        if matches!(event, Event::Data(_)) {
            self.taken += 1;
            // Credit in halves of the window: one small frame per window/2 items.
            if self.taken >= (self.window / 2).max(1) {
                self.connection.send(Frame::credit(self.id, self.taken));
                self.taken = 0;
            }
        } else {
            self.finished = true;
        }
        Some(event)
    }

    /// Tell the worker to stop the request (`kill`: at once); no event follows.
    pub fn cancel(&mut self, kill: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.connection.forget(self.id);
        self.connection
            .send(Frame::new(Kind::Cancel, self.id, vec![u8::from(kill)]));
    }

    /// Whether the stream has ended.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// A handle that cancels the stream from another task; the stream then ends with a Reset.
    pub fn canceller(&self) -> Canceller {
        Canceller {
            connection: self.connection.clone(),
            id: self.id,
        }
    }
}

/// Cancels one stream from outside it.
#[derive(Clone)]
pub struct Canceller {
    connection: Arc<Connection>,
    id: u32,
}

impl Canceller {
    /// Tell the worker to stop the request (`kill`: at once); the stream ends.
    pub fn cancel(&self, kill: bool) {
        self.connection.forget(self.id);
        self.connection
            .send(Frame::new(Kind::Cancel, self.id, vec![u8::from(kill)]));
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        // An abandoned stream: the worker stops generating for it.
        self.cancel(true);
    }
}

/// Write queued frames; those queued while a write runs go out together in the next one.
pub(crate) async fn write_frames(
    mut write: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Frame>,
) {
    /// Past this, write what is gathered before taking more.
    const BATCH: usize = 64 * 1024;
    let mut buffer = BytesMut::with_capacity(16 * 1024);
    while let Some(frame) = queue.recv().await {
        encode(&frame, &mut buffer);
        while buffer.len() < BATCH {
            match queue.try_recv() {
                Ok(frame) => encode(&frame, &mut buffer),
                Err(_) => break,
            }
        }
        if write.write_all(&buffer).await.is_err() {
            return;
        }
        buffer.clear();
    }
    let _ = write.shutdown().await;
}

async fn read_frames(
    connection: Arc<Connection>,
    mut frames: FramedRead<OwnedReadHalf, FrameCodec>,
    dead_after: Duration,
) {
    let reason = loop {
        match tokio::time::timeout(dead_after, frames.next()).await {
            Err(_) => {
                break format!(
                    "no frame from {} in {:.1} s: the worker is taken for dead",
                    connection.address,
                    dead_after.as_secs_f64()
                )
            }
            Ok(None) => break format!("{} closed the connection", connection.address),
            Ok(Some(Err(e))) => break format!("bad frame from {}: {e}", connection.address),
            Ok(Some(Ok(frame))) => {
                if let Err(violation) = connection.deliver(frame) {
                    break violation;
                }
            }
        }
    };
    connection.close(reason);
}

/// Say "alive" every `every` while the connection exists.
async fn heartbeat(connection: Weak<Connection>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(connection) = connection.upgrade() else {
            return;
        };
        if !connection.send(Frame::empty(Kind::Ping, 0)) {
            return;
        }
    }
}
