//! The frontend's call-home response-stream server (runtime spec §1.5): one listener per frontend
//! process. Each request registers a pending stream under a fresh `subject`; the worker dials back,
//! sends a header-only [`CallHomeHandshake`] naming that subject, and the connection is handed to
//! the request that waits for it. Connections naming no pending subject are closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::codec::Framed;

use crate::codec::messages::{CallHomeHandshake, StreamType};
use crate::codec::{MessageKind, TwoPartCodec, TwoPartCodecError};

/// A worker's response connection, past its handshake.
pub type ResponseConnection = Framed<TcpStream, TwoPartCodec>;

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<ResponseConnection>>>>;

/// How long a new connection may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The listener and its pending streams.
pub struct ResponseStreamServer {
    address: String,
    pending: Pending,
    task: tokio::task::JoinHandle<()>,
}

impl ResponseStreamServer {
    /// Listen on `host:port` (0 = any free port); `host` is also the address advertised to workers.
    /// Frames over `max_frame` bytes end their stream (upstream sets no limit; one output is small,
    /// so a huge length is a broken or hostile peer, not data worth buffering).
    pub async fn bind(host: &str, port: u16, max_frame: usize) -> std::io::Result<Arc<Self>> {
        let listener = TcpListener::bind((host, port)).await?;
        let local: SocketAddr = listener.local_addr()?;
        let address = format!("{host}:{}", local.port());
        let pending: Pending = Arc::default();
        let task = tokio::spawn(accept_loop(listener, pending.clone(), max_frame));
        tracing::info!(%address, "response-stream server listening");
        Ok(Arc::new(ResponseStreamServer {
            address,
            pending,
            task,
        }))
    }

    /// `host:port` workers dial back to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A pending stream under a fresh subject; dropping it forgets the subject.
    pub fn register(&self) -> PendingStream {
        let subject = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(subject.clone(), tx);
        }
        PendingStream {
            subject,
            rx,
            pending: self.pending.clone(),
        }
    }
}

impl Drop for ResponseStreamServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request's expected response connection.
pub struct PendingStream {
    /// The subject the worker must name.
    pub subject: String,
    rx: oneshot::Receiver<ResponseConnection>,
    pending: Pending,
}

impl PendingStream {
    /// Wait for the worker's connection (`None` after `timeout`).
    pub async fn connected(&mut self, timeout: Duration) -> Option<ResponseConnection> {
        match tokio::time::timeout(timeout, &mut self.rx).await {
            Ok(Ok(connection)) => Some(connection),
            _ => None,
        }
    }
}

impl Drop for PendingStream {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&self.subject);
        }
    }
}

async fn accept_loop(listener: TcpListener, pending: Pending, max_frame: usize) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pending = pending.clone();
                tokio::spawn(async move {
                    if let Err(reason) = handshake(stream, &pending, max_frame).await {
                        tracing::warn!(%peer, %reason, "response-stream connection refused");
                    }
                });
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "response-stream accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a call-home connection was refused.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    /// Nothing arrived within [`HANDSHAKE_TIMEOUT`].
    #[error("no handshake within 5 s")]
    TimedOut,
    /// The peer closed the connection first.
    #[error("closed before its handshake")]
    Closed,
    /// The first frame does not decode.
    #[error("bad handshake frame: {0}")]
    Frame(#[source] TwoPartCodecError),
    /// The first frame carries data.
    #[error("the first frame must be a header-only handshake, got {0:?}")]
    NotHeaderOnly(MessageKind),
    /// The header is not a [`CallHomeHandshake`].
    #[error("handshake is not a CallHomeHandshake: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The handshake asks for another kind of stream.
    #[error("handshake for subject {subject} asks for a {stream_type:?} stream; only response streams are served")]
    NotResponseStream {
        /// The subject named.
        subject: String,
        /// The kind asked for.
        stream_type: StreamType,
    },
    /// A thread panicked while holding the pending table.
    #[error("pending table poisoned")]
    PendingPoisoned,
    /// The request stopped waiting just before the connection arrived.
    #[error("subject {subject} was abandoned")]
    Abandoned {
        /// The subject named.
        subject: String,
    },
    /// No request waits under the subject.
    #[error("subject {subject} is not pending (unknown, timed out or already connected)")]
    NotPending {
        /// The subject named.
        subject: String,
    },
}

async fn handshake(
    stream: TcpStream,
    pending: &Pending,
    max_frame: usize,
) -> Result<(), HandshakeError> {
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, TwoPartCodec::new(Some(max_frame)));
    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, framed.next()).await {
        Err(_) => return Err(HandshakeError::TimedOut),
        Ok(None) => return Err(HandshakeError::Closed),
        Ok(Some(Err(e))) => return Err(HandshakeError::Frame(e)),
        Ok(Some(Ok(frame))) => frame,
    };
    if first.kind() != MessageKind::HeaderOnly {
        return Err(HandshakeError::NotHeaderOnly(first.kind()));
    }
    let handshake: CallHomeHandshake =
        serde_json::from_slice(first.header()).map_err(HandshakeError::Malformed)?;
    if handshake.stream_type != StreamType::Response {
        return Err(HandshakeError::NotResponseStream {
            subject: handshake.subject,
            stream_type: handshake.stream_type,
        });
    }
    let waiter = pending
        .lock()
        .map_err(|_| HandshakeError::PendingPoisoned)?
        .remove(&handshake.subject);
    match waiter {
        Some(tx) => tx.send(framed).map_err(|_| HandshakeError::Abandoned {
            subject: handshake.subject,
        }),
        None => Err(HandshakeError::NotPending {
            subject: handshake.subject,
        }),
    }
}
