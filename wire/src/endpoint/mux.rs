//! The server's side of the multiplexed request plane ([`crate::mux`]): one connection carries
//! many requests, each answered on its own stream id with the same items a call-home stream carries.
//! A stream sends an item only while it holds credit, and asks its handler for the next reply only
//! then, so a slow consumer slows its own handler and nothing else. When the connection ends (closed,
//! a bad frame, no frame for `dead_after`), every stream's handler is killed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::FramedRead;

use super::{Control, Handler, InflightGuard, Reply, Request, ServerSettings, Table};
use crate::error::DynamoError;
use crate::mux::client::write_frames;
use crate::mux::{Frame, FrameCodec, Kind, MuxRequest};
use crate::PayloadCodec;

/// One running stream, as the connection's reader reaches it.
struct Running {
    control: Arc<Control>,
    /// Items the stream may still send.
    credits: Arc<Semaphore>,
}

type Streams = Arc<Mutex<HashMap<u32, Running>>>;

/// Serve one `mux/1` connection whose preface was read (and answered by the caller).
pub(super) async fn serve(
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    settings: Arc<ServerSettings>,
    table: Table,
    peer: SocketAddr,
) {
    let (writer, queue) = mpsc::unbounded_channel();
    tokio::spawn(write_frames(write, queue));
    let pinger = {
        let writer = writer.clone();
        let every = settings.mux.heartbeat;
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if writer.send(Frame::empty(Kind::Ping, 0)).is_err() {
                    return;
                }
            }
        })
    };
    let streams: Streams = Arc::default();
    let mut frames = FramedRead::new(read, FrameCodec::new(settings.max_message_size));
    let dead_after = settings.mux.dead_after;
    let reason = loop {
        let frame = match tokio::time::timeout(dead_after, frames.next()).await {
            Err(_) => {
                break format!(
                    "no frame in {:.1} s: the frontend is taken for dead",
                    dead_after.as_secs_f64()
                )
            }
            Ok(None) => break String::new(),
            Ok(Some(Err(e))) => break format!("bad frame: {e}"),
            Ok(Some(Ok(frame))) => frame,
        };
        match frame.kind {
            Kind::Ping => {}
            Kind::Request => start(frame, &settings, &table, &streams, &writer, peer),
            Kind::Cancel => {
                let kill = frame.body.first() != Some(&0);
                if let Some(running) = streams
                    .lock()
                    .ok()
                    .and_then(|s| s.get(&frame.stream).map(|r| r.control.clone()))
                {
                    if kill {
                        running.kill();
                    } else {
                        running.stop();
                    }
                }
            }
            Kind::Credit => {
                let Some(items) = frame.count() else {
                    break format!("a credit frame of {} bytes, not 4", frame.body.len());
                };
                if let Some(credits) = streams
                    .lock()
                    .ok()
                    .and_then(|s| s.get(&frame.stream).map(|r| r.credits.clone()))
                {
                    credits.add_permits((items as usize).min(Semaphore::MAX_PERMITS / 2));
                }
            }
            Kind::TooLarge => {
                let size = frame.oversize().unwrap_or(0);
                let text = format!(
                    "Request too large: {size} bytes (max: {} bytes)",
                    settings.max_message_size
                );
                tracing::warn!(%peer, %text, "request refused");
                let _ = writer.send(Frame::new(Kind::Refuse, frame.stream, text));
            }
            Kind::Data | Kind::End | Kind::Reset | Kind::Refuse => {
                break format!("a {:?} frame, which only a worker sends", frame.kind)
            }
        }
    };
    pinger.abort();
    let running: Vec<Arc<Control>> = streams
        .lock()
        .map(|s| s.values().map(|r| r.control.clone()).collect())
        .unwrap_or_default();
    if !reason.is_empty() {
        tracing::warn!(%peer, %reason, streams = running.len(), "multiplexed request-plane connection ended");
    }
    for control in running {
        control.kill();
    }
}

/// Take one request: refuse it, answer an unusable body with an error item, or start its stream.
fn start(
    frame: Frame,
    settings: &ServerSettings,
    table: &Table,
    streams: &Streams,
    writer: &mpsc::UnboundedSender<Frame>,
    peer: SocketAddr,
) {
    let id = frame.stream;
    let refuse = |text: String| {
        tracing::warn!(%peer, %text, "request refused");
        let _ = writer.send(Frame::new(Kind::Refuse, id, text));
    };
    if frame.body.len() > settings.max_message_size {
        return refuse(format!(
            "Request too large: {} bytes (max: {} bytes)",
            frame.body.len(),
            settings.max_message_size
        ));
    }
    let request = match MuxRequest::decode(frame.body) {
        Ok(request) => request,
        Err(e) => return refuse(format!("cannot decode the request: {e}")),
    };
    let served = table.lock().ok().and_then(|t| {
        t.get(&request.path)
            .map(|s| (s.handler.clone(), s.state.clone()))
    });
    let Some((handler, state)) = served else {
        return refuse(format!("unknown endpoint {}", request.path));
    };
    if state.is_draining() {
        return refuse("endpoint is shutting down".into());
    }
    let guard = state.enter();
    let control = Arc::new(Control::default());
    let credits = Arc::new(Semaphore::new(request.window.max(1) as usize));
    match streams.lock() {
        Ok(mut open) if !open.contains_key(&id) => {
            open.insert(
                id,
                Running {
                    control: control.clone(),
                    credits: credits.clone(),
                },
            );
        }
        _ => return refuse(format!("stream {id} is already running")),
    }
    tokio::spawn(respond(
        id,
        request,
        handler,
        Stream {
            id,
            control,
            credits,
            writer: writer.clone(),
            streams: streams.clone(),
            _guard: guard,
        },
    ));
}

/// A running stream's transport; leaving the table when dropped.
struct Stream {
    id: u32,
    control: Arc<Control>,
    credits: Arc<Semaphore>,
    writer: mpsc::UnboundedSender<Frame>,
    streams: Streams,
    _guard: InflightGuard,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.remove(&self.id);
        }
    }
}

impl Stream {
    /// Send one item; false when the connection is gone.
    fn item(&self, codec: PayloadCodec, reply: &Reply) -> bool {
        let bytes = match reply.encode(codec) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(stream = self.id, error = %e, "cannot encode a reply");
                let error = DynamoError::new(
                    "Internal",
                    "Internal",
                    "runtime.internal",
                    format!("cannot encode a reply ({}): {e}", codec.name()),
                );
                match Reply::Error(error).encode(codec) {
                    Ok(bytes) => bytes,
                    Err(_) => return false,
                }
            }
        };
        self.writer
            .send(Frame::new(Kind::Data, self.id, bytes))
            .is_ok()
    }

    fn end(&self, kind: Kind, text: &str) {
        let _ = self
            .writer
            .send(Frame::new(kind, self.id, text.as_bytes().to_vec()));
    }
}

async fn respond(id: u32, request: MuxRequest, handler: Arc<dyn Handler>, stream: Stream) {
    let MuxRequest {
        codec,
        id: request_id,
        headers,
        metadata,
        body,
        ..
    } = request;
    let body = match codec.decode::<Value>(&body) {
        Ok(body) => body,
        Err(e) => {
            let error = DynamoError::new(
                "InvalidRequest",
                "InvalidRequest",
                "request.invalid",
                format!("cannot decode the request body ({}): {e}", codec.name()),
            );
            if stream.item(codec, &Reply::Error(error)) {
                stream.end(Kind::End, "");
            }
            return;
        }
    };
    let control = stream.control.clone();
    let mut replies = handler.call(Request {
        id: request_id.clone(),
        body,
        headers,
        metadata,
        control: control.clone(),
    });
    loop {
        // Credit first, so that an item is pulled from the handler only when it can be sent.
        tokio::select! {
            biased;
            _ = control.stopped() => return,
            permit = stream.credits.acquire() => match permit {
                Ok(permit) => permit.forget(),
                Err(_) => return,
            },
        }
        let reply = tokio::select! {
            biased;
            _ = control.stopped() => return,
            reply = replies.next() => reply,
        };
        let Some(reply) = reply else { break };
        if matches!(reply, Reply::Abandon) {
            tracing::warn!(request = %request_id, stream = id, "the handler gave up on the request; ending its stream without completion");
            stream.end(Kind::Reset, "the worker gave up on the request");
            return;
        }
        let is_error = matches!(reply, Reply::Error(_));
        if !stream.item(codec, &reply) {
            control.kill();
            return;
        }
        if is_error {
            break;
        }
    }
    stream.end(Kind::End, "");
}
