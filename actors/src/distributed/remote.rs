//! [`RemoteEngine`]: the frontend's actor for one worker instance. The router sees it as an engine
//! ([`Generate`] in, tokens out on the request's channel). Underneath, a worker whose record
//! advertises the multiplexed request plane (`"mux": 1`, a dynamix worker) gets each request as a
//! stream on a few long-lived connections ([`dynamix_wire::mux`]). Any other worker (or every worker,
//! with `distributed.request_plane_protocol = "dynamo"`) gets one TCP request-plane frame (ACKed by
//! the worker) and answers on one call-home response stream (runtime spec §1.5): handshake, prologue,
//! data frames, `complete_final`, sentinel. Either way requests go to the path and in the codec the
//! worker's record names, as Dynamo's pre-processed request; the worker may be a dynamix worker or
//! any Dynamo worker (interop spec §3–§5), and the items are the same.
//!
//! A stream that ends without `complete_final` — the worker was killed, its connection broke — closes
//! the request's channel before a finish, which the serving path migrates to another engine (same
//! rules as in-process). The instance is then reported down so no new request goes there until it
//! answers again. A consumer that goes away sends `kill` to the worker, as Dynamo's frontend does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use actix::prelude::*;
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::response_stream::{ResponseConnection, ResponseStreamServer};
use super::wire::record::{InstanceError, TcpTarget};
use super::wire::response::FinishReasonWire;
use super::wire::{Instance, PayloadCodec, PreprocessedRequest, StreamItem};
use crate::codec::messages::{ControlMessage, ResponseStreamPrologue};
use crate::codec::{MessageKind, TcpRequestMessage, TwoPartMessage};
use crate::engine::{Generate, RequestProgress, RequestStage, StartHere};
use crate::error::{ApiError, ErrorClass};
use crate::protocol::engine::EngineEvent;

/// Idle request-plane connections kept per worker.
const POOL_SIZE: usize = 100;

/// Timeouts and limits of the client side of the request plane (dynamix-wire's, shared with the
/// Python SDK's client).
pub use dynamix_wire::client::ClientSettings as RemoteSettings;
use dynamix_wire::client::{envelope, Connection};
use dynamix_wire::mux::client::{Event, MuxPeer, MuxStream};
use dynamix_wire::mux::{MuxRequest, MuxSettings};

/// What the requests of one instance share.
struct Shared {
    instance_id: u64,
    address: String,
    /// The frame path the worker serves.
    path: String,
    /// How request bodies (and so the responses) are encoded.
    codec: PayloadCodec,
    /// A dynamix worker: send the dynamix extension.
    dynamix: bool,
    /// The LoRA adapter every request names in `routing.lora_name` (an adapter's lane).
    lora: Option<String>,
    settings: RemoteSettings,
    streams: Arc<ResponseStreamServer>,
    pool: Mutex<Vec<Connection>>,
    /// The worker's multiplexed request plane, when it serves one and the frontend uses it;
    /// otherwise each request is a Dynamo frame and a call-home stream.
    mux: Option<MuxSettings>,
    /// Its connections, per thread that starts requests: a serving thread drives its own, so a
    /// request and its stream never cross threads in the frontend. Dropped with the engine.
    peers: Mutex<HashMap<ThreadId, Arc<MuxPeer>>>,
    /// Where "this instance looks dead" goes (the frontend's instance manager).
    down: mpsc::UnboundedSender<u64>,
    /// The router's view of its load; tokens received are counted here.
    load: Arc<crate::engine::EngineLoad>,
    /// The router's load tracking: first output and end of each request, as a local engine
    /// reports them (without it, finished requests would count as running forever).
    progress: Option<Arc<crate::router::Router>>,
}

/// The frontend's face of one worker instance.
pub struct RemoteEngine {
    shared: Arc<Shared>,
}

impl RemoteEngine {
    /// An engine for `instance`, whose response streams come back through `streams`; failures that
    /// suggest the worker is gone are reported on `down`.
    pub fn new(
        instance: &Instance,
        settings: RemoteSettings,
        streams: Arc<ResponseStreamServer>,
        down: mpsc::UnboundedSender<u64>,
        load: Arc<crate::engine::EngineLoad>,
        progress: Option<Arc<crate::router::Router>>,
    ) -> Result<Self, InstanceError> {
        instance.check()?;
        let TcpTarget { address, path } = instance.tcp_target()?;
        let mux = settings.mux.clone().filter(|_| instance.speaks_mux());
        Ok(RemoteEngine {
            shared: Arc::new(Shared {
                instance_id: instance.instance_id,
                address,
                path,
                codec: instance.codec(),
                dynamix: instance.is_dynamix(),
                lora: None,
                settings,
                streams,
                pool: Mutex::new(Vec::new()),
                mux,
                peers: Mutex::default(),
                down,
                load,
                progress,
            }),
        })
    }

    /// The request plane its requests take: `mux` or `dynamo`.
    pub fn request_plane(&self) -> &'static str {
        if self.shared.mux.is_some() {
            "mux"
        } else {
            "dynamo"
        }
    }

    /// What starts requests on the routing thread ([`StartHere`]): on the multiplexed plane, each
    /// serving thread runs its requests on connections of its own.
    pub fn starter(&self) -> Arc<dyn StartHere> {
        Arc::new(StartRemote(self.shared.clone()))
    }

    /// Every request names LoRA adapter `lora` (`routing.lora_name`), when it is given.
    pub fn for_adapter(mut self, lora: Option<String>) -> Self {
        // A new engine's state is not shared yet (it is once the engine starts).
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.lora = lora;
        }
        self
    }
}

impl Actor for RemoteEngine {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The router reserves an admission slot per message; keep room for all of them.
        ctx.set_mailbox_capacity(4096);
    }
}

impl Handler<Generate> for RemoteEngine {
    type Result = ();

    fn handle(&mut self, msg: Generate, _ctx: &mut Self::Context) {
        start(self.shared.clone(), msg);
    }
}

/// Starts a remote engine's requests on the thread that routes them.
struct StartRemote(Arc<Shared>);

impl StartHere for StartRemote {
    fn can_start_here(&self) -> bool {
        // Dynamo's plane keeps pooled connections and one call-home server, driven by the actor's
        // thread; only the multiplexed plane has connections per thread.
        self.0.mux.is_some() && actix_rt::Arbiter::try_current().is_some()
    }

    fn start_here(&self, msg: Generate) {
        start(self.0.clone(), msg);
    }
}

/// Run `msg` on this thread until its stream ends.
fn start(shared: Arc<Shared>, msg: Generate) {
    actix::spawn(async move {
        let Generate {
            request,
            output,
            admission,
        } = msg;
        let id = request.request_id.clone();
        run(&shared, request, &output).await;
        drop(admission);
        shared.report(&id, RequestStage::Finished);
    });
}

impl Shared {
    /// This thread's connections to the worker's multiplexed plane (`None` on Dynamo's plane).
    fn peer_here(&self) -> Option<Arc<MuxPeer>> {
        let settings = self.mux.as_ref()?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let peer = peers.entry(std::thread::current().id()).or_insert_with(|| {
            Arc::new(MuxPeer::new(
                &self.address,
                settings.clone(),
                self.settings.connect_timeout,
                self.settings.max_message_size,
            ))
        });
        Some(peer.clone())
    }

    fn report(&self, request_id: &str, stage: RequestStage) {
        if let Some(progress) = &self.progress {
            progress.progress(&RequestProgress {
                engine_id: self.instance_id,
                request_id: request_id.to_string(),
                stage,
            });
        }
    }
}

/// Why a request could not be started on the worker.
fn unavailable(shared: &Shared, what: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        ErrorClass::Unavailable,
        format!(
            "worker {:x} at {}: {what}",
            shared.instance_id, shared.address
        ),
    )
    .with_details(serde_json::json!({"instance_id": shared.instance_id}))
}

async fn run(
    shared: &Shared,
    mut request: crate::protocol::engine::EngineRequest,
    output: &mpsc::Sender<EngineEvent>,
) {
    // The instance id pins to this worker; inside it, its own router picks the engine.
    request.pinned_engine = None;
    let id = request.request_id.clone();
    let opened = match shared.peer_here() {
        Some(peer) => open_mux(shared, &peer, &request).await,
        None => open_call_home(shared, &request).await,
    };
    let source = match opened {
        Ok(source) => source,
        Err(e) => {
            let _ = output.send(Err(e)).await;
            return;
        }
    };
    match pump(shared, source, output, &id).await {
        StreamEnd::Complete | StreamEnd::Cancelled => {}
        StreamEnd::Broken(reason) => {
            // Closing the channel before a finish is what migration acts on.
            tracing::warn!(
                worker = format!("{:x}", shared.instance_id),
                request = %id,
                %reason,
                "Stream ended before generation completed"
            );
            let _ = shared.down.send(shared.instance_id);
        }
    }
}

/// The body of `request` as the worker takes it, in its codec.
fn request_body(
    shared: &Shared,
    request: &crate::protocol::engine::EngineRequest,
) -> Result<Vec<u8>, ApiError> {
    let mut wire = PreprocessedRequest::from_engine_request(request, shared.dynamix);
    if let Some(lora) = &shared.lora {
        wire.routing.get_or_insert_with(Default::default).lora_name = Some(lora.clone());
    }
    shared
        .codec
        .encode(&wire)
        .map_err(|e| ApiError::new(ErrorClass::Internal, e.to_string()))
}

/// Start `request` as a stream of the worker's multiplexed request plane.
async fn open_mux(
    shared: &Shared,
    peer: &MuxPeer,
    request: &crate::protocol::engine::EngineRequest,
) -> Result<Source, ApiError> {
    let body = request_body(shared, request)?;
    let mux_request = MuxRequest {
        window: peer.window(),
        codec: shared.codec,
        id: request.request_id.clone(),
        path: shared.path.clone(),
        headers: Default::default(),
        metadata: None,
        body: body.into(),
    };
    match peer.open(&mux_request).await {
        Ok(stream) => Ok(Source::Mux(stream)),
        Err(e) => {
            tracing::warn!(worker = format!("{:x}", shared.instance_id), address = %shared.address, error = %e, "multiplexed request plane unreachable");
            let _ = shared.down.send(shared.instance_id);
            Err(unavailable(shared, e))
        }
    }
}

/// Send `request` as a Dynamo request frame and wait for the worker's call-home connection.
async fn open_call_home(
    shared: &Shared,
    request: &crate::protocol::engine::EngineRequest,
) -> Result<Source, ApiError> {
    let mut pending = shared.streams.register();
    let frame = request_frame(shared, request, &pending.subject)?;
    send_request(shared, frame).await?;
    let Some(connection) = pending.connected(shared.settings.request_timeout).await else {
        let _ = shared.down.send(shared.instance_id);
        return Err(unavailable(
            shared,
            format!(
                "accepted request {} but did not open its response stream within {:.1} s",
                request.request_id,
                shared.settings.request_timeout.as_secs_f64()
            ),
        ));
    };
    let (sink, stream) = connection.split();
    Ok(Source::CallHome {
        sink,
        stream,
        prologue: true,
    })
}

fn request_frame(
    shared: &Shared,
    request: &crate::protocol::engine::EngineRequest,
    subject: &str,
) -> Result<TcpRequestMessage, ApiError> {
    let internal = |e: &dyn std::fmt::Display| ApiError::new(ErrorClass::Internal, e.to_string());
    let body = request_body(shared, request)?;
    let payload = envelope(
        shared.streams.address(),
        subject,
        &request.request_id,
        shared.codec,
        body,
    )
    .map_err(|e| internal(&e))?;
    // Dynamo's frontend also sends x-endpoint-path, request-id and x-frontend-send-ts-ns headers;
    // workers need none of them (interop spec §3.1), so the request path builds none.
    Ok(TcpRequestMessage {
        endpoint_path: shared.path.clone(),
        headers: Default::default(),
        payload,
    })
}

/// Send one request frame and wait for its ACK, on a pooled connection or a new one. A pooled
/// connection that fails is retried once on a fresh one (the worker may have closed it) before the
/// worker is reported down.
async fn send_request(shared: &Shared, frame: TcpRequestMessage) -> Result<(), ApiError> {
    let timeout = shared.settings.request_timeout;
    let mut pooled = shared.pool.lock().ok().and_then(|mut p| p.pop());
    let (connection, ack) = loop {
        let fresh = pooled.is_none();
        let mut connection = match pooled.take() {
            Some(c) => c,
            None => connect(shared).await?,
        };
        match tokio::time::timeout(timeout, connection.exchange(&frame)).await {
            Ok(Ok(ack)) => break (connection, ack),
            Ok(Err(_)) if !fresh => continue,
            Ok(Err(what)) => {
                tracing::warn!(worker = format!("{:x}", shared.instance_id), address = %shared.address, error = %what, "request-plane exchange failed");
                let _ = shared.down.send(shared.instance_id);
                return Err(unavailable(shared, what));
            }
            Err(_) => {
                let _ = shared.down.send(shared.instance_id);
                return Err(unavailable(
                    shared,
                    format!("no ACK within {:.1} s", timeout.as_secs_f64()),
                ));
            }
        }
    };
    if !ack.data.is_empty() {
        // Rejections ("Server unavailable: ...": unknown endpoint, draining) and other texts.
        // The worker closes the connection after some of them: do not pool it.
        let text = String::from_utf8_lossy(&ack.data).into_owned();
        let class = if ack.is_accepted() {
            ErrorClass::Internal
        } else {
            ErrorClass::Unavailable
        };
        drop(connection);
        return Err(ApiError::new(
            class,
            format!(
                "worker {:x} refused the request: {text}",
                shared.instance_id
            ),
        ));
    }
    return_to_pool(shared, connection);
    Ok(())
}

fn return_to_pool(shared: &Shared, connection: Connection) {
    if let Ok(mut pool) = shared.pool.lock() {
        if pool.len() < POOL_SIZE {
            pool.push(connection);
        }
    }
}

async fn connect(shared: &Shared) -> Result<Connection, ApiError> {
    Connection::open(
        &shared.address,
        shared.settings.connect_timeout,
        shared.settings.max_message_size,
    )
    .await
    .map_err(|e| {
        let _ = shared.down.send(shared.instance_id);
        unavailable(shared, e)
    })
}

/// How a response stream ended.
enum StreamEnd {
    /// `complete_final` (or the sentinel) arrived.
    Complete,
    /// The consumer went away; `kill` was sent.
    Cancelled,
    /// It ended or broke before completing.
    Broken(String),
}

/// Where a request's responses come from.
enum Source {
    /// Dynamo's call-home connection; its prologue is read with the first item.
    CallHome {
        sink: SplitSink<ResponseConnection, TwoPartMessage>,
        stream: SplitStream<ResponseConnection>,
        prologue: bool,
    },
    /// A stream of the multiplexed request plane.
    Mux(MuxStream),
}

/// What a source yields next.
enum Incoming {
    /// One item, decoded from the request's codec.
    Item(Box<StreamItem>),
    /// The worker completed the stream.
    Complete,
    /// The worker did not start the request (a prologue error, a refusal): another worker may.
    Refused(String),
    /// The stream ended or broke before completing.
    Broken(String),
}

impl Source {
    async fn next(&mut self, shared: &Shared) -> Incoming {
        match self {
            Source::Mux(stream) => match stream.next().await {
                Some(Event::Data(bytes)) => decode(shared, &bytes),
                Some(Event::End) => Incoming::Complete,
                Some(Event::Refused(text)) => {
                    Incoming::Refused(format!("refused the request: {text}"))
                }
                Some(Event::Reset(reason)) => Incoming::Broken(reason),
                None => Incoming::Broken("the stream was cancelled".into()),
            },
            Source::CallHome {
                stream, prologue, ..
            } => {
                if std::mem::take(prologue) {
                    let first =
                        tokio::time::timeout(shared.settings.request_timeout, stream.next()).await;
                    let frame = match first {
                        Err(_) => return Incoming::Broken("no prologue".into()),
                        Ok(None) => return Incoming::Broken("closed before its prologue".into()),
                        Ok(Some(Err(e))) => return Incoming::Broken(format!("bad frame: {e}")),
                        Ok(Some(Ok(frame))) => frame,
                    };
                    match serde_json::from_slice::<ResponseStreamPrologue>(frame.header()) {
                        Ok(ResponseStreamPrologue { error: None }) => {}
                        Ok(ResponseStreamPrologue { error: Some(text) }) => {
                            return Incoming::Refused(text)
                        }
                        Err(e) => return Incoming::Broken(format!("bad prologue: {e}")),
                    }
                }
                let frame = match stream.next().await {
                    None => return Incoming::Broken("connection closed".into()),
                    Some(Err(e)) => return Incoming::Broken(format!("bad frame: {e}")),
                    Some(Ok(frame)) => frame,
                };
                match frame.kind() {
                    MessageKind::DataOnly => decode(shared, frame.data()),
                    MessageKind::HeaderOnly => {
                        match serde_json::from_slice::<ControlMessage>(frame.header()) {
                            Ok(ControlMessage::Sentinel) => Incoming::Complete,
                            Ok(other) => Incoming::Broken(format!(
                                "unexpected control message {other:?} from the worker"
                            )),
                            Err(e) => Incoming::Broken(format!("bad control frame: {e}")),
                        }
                    }
                    other => Incoming::Broken(format!("unexpected {other:?} frame")),
                }
            }
        }
    }

    /// Tell the worker to stop generating now.
    async fn kill(&mut self) {
        match self {
            Source::Mux(stream) => stream.cancel(true),
            Source::CallHome { sink, .. } => {
                let _ = sink.send(control(ControlMessage::Kill)).await;
            }
        }
    }
}

fn decode(shared: &Shared, bytes: &[u8]) -> Incoming {
    match shared.codec.decode::<StreamItem>(bytes) {
        Ok(item) if item.complete_final => Incoming::Complete,
        Ok(item) => Incoming::Item(Box::new(item)),
        Err(e) => Incoming::Broken(format!("bad data frame ({}): {e}", shared.codec.name())),
    }
}

async fn pump(
    shared: &Shared,
    mut source: Source,
    output: &mpsc::Sender<EngineEvent>,
    id: &str,
) -> StreamEnd {
    let mut first = true;
    loop {
        tokio::select! {
            incoming = source.next(shared) => {
                let item = match incoming {
                    Incoming::Item(item) => item,
                    Incoming::Complete => return StreamEnd::Complete,
                    Incoming::Broken(reason) => return StreamEnd::Broken(reason),
                    Incoming::Refused(text) => {
                        let _ = output.send(Err(unavailable(shared, text))).await;
                        return StreamEnd::Complete;
                    }
                };
                if let Some(FinishReasonWire::Unknown(reason)) = item.data.as_ref().and_then(|i| i.data.as_ref()).and_then(|d| d.finish_reason.as_ref()) {
                    tracing::warn!(worker = format!("{:x}", shared.instance_id), request = %id, finish_reason = %reason, "unknown finish_reason from the worker; ending the choice as a stop");
                }
                let event = match item.data.map(|i| i.into_event()) {
                    Some(Ok(event)) => event,
                    Some(Err(e)) => return StreamEnd::Broken(e.to_string()),
                    None => return StreamEnd::Broken("data frame without an item".into()),
                };
                if first {
                    first = false;
                    shared.report(id, RequestStage::FirstToken);
                }
                if let Ok(out) = &event {
                    // Text-only outputs (echo_full) count as one token each, as in-process.
                    let tokens = out.token_ids.len().max(usize::from(out.text.is_some()));
                    shared
                        .load
                        .generated_tokens
                        .fetch_add(tokens as u64, std::sync::atomic::Ordering::Relaxed);
                }
                if output.send(event).await.is_err() {
                    source.kill().await;
                    tracing::debug!(request = %id, "consumer gone; sent kill to the worker");
                    return StreamEnd::Cancelled;
                }
            }
            _ = output.closed() => {
                source.kill().await;
                tracing::debug!(request = %id, "consumer gone; sent kill to the worker");
                return StreamEnd::Cancelled;
            }
        }
    }
}

fn control(message: ControlMessage) -> TwoPartMessage {
    let header = serde_json::to_vec(&message).unwrap_or_default();
    TwoPartMessage::header_only(Bytes::from(header))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{TcpRequestCodec, TcpResponseCodec};
    use dynamix_wire::mux::MuxSettings;
    use std::time::Duration;
    use tokio_util::codec::{FramedRead, FramedWrite};

    /// A worker that ACKs one frame per connection and then closes it: a pooled connection is dead
    /// by the time it is reused, which must cost a reconnect, not a "worker down" report.
    #[actix_rt::test]
    async fn a_pooled_connection_the_worker_closed_is_replaced_not_reported() {
        use crate::codec::TcpResponseMessage;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (r, w) = stream.into_split();
                let mut frames = FramedRead::new(r, TcpRequestCodec::new(None));
                let mut acks = FramedWrite::new(w, TcpResponseCodec::new(None));
                if frames.next().await.is_some() {
                    acks.send(TcpResponseMessage::ack()).await.unwrap();
                }
            }
        });
        let streams = ResponseStreamServer::bind("127.0.0.1", 0, 1 << 20)
            .await
            .unwrap();
        let (shared, mut reports) = shared_at(address, None, streams);
        let frame = TcpRequestMessage {
            endpoint_path: "1/ns/backend/generate".into(),
            headers: Default::default(),
            payload: Bytes::from_static(b"x"),
        };
        for _ in 0..3 {
            send_request(&shared, frame.clone()).await.unwrap();
        }
        assert!(reports.try_recv().is_err(), "no down report");
    }

    fn generate(id: &str) -> (Generate, mpsc::Receiver<EngineEvent>) {
        let (output, events) = mpsc::channel(4);
        let load = Arc::new(crate::engine::EngineLoad::default());
        let request = crate::distributed::request_plane::tests::request(id);
        let admission = load.try_admit(4).expect("a free slot");
        let msg = Generate {
            request,
            output,
            admission,
        };
        (msg, events)
    }

    /// A remote engine's state for a worker at `address`; the receiver gets its "down" reports.
    fn shared_at(
        address: String,
        mux: Option<MuxSettings>,
        streams: Arc<ResponseStreamServer>,
    ) -> (Shared, mpsc::UnboundedReceiver<u64>) {
        let (down, reports) = mpsc::unbounded_channel();
        let shared = Shared {
            instance_id: 2,
            address,
            path: "2/ns/backend/generate".into(),
            codec: PayloadCodec::Json,
            dynamix: true,
            lora: None,
            settings: RemoteSettings {
                request_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(5),
                max_message_size: 1 << 20,
                mux: mux.clone(),
            },
            streams,
            pool: Mutex::new(Vec::new()),
            mux,
            peers: Mutex::default(),
            down,
            load: Default::default(),
            progress: None,
        };
        (shared, reports)
    }

    /// The frontend's serving threads each start their requests on connections of their own, so a
    /// request and its stream stay on the thread that routed it; a thread that is not an arbiter,
    /// and Dynamo's plane, hand the request back to go through the actor.
    #[test]
    fn each_serving_thread_starts_its_requests_on_its_own_connections() {
        use dynamix_wire::mux::PREFACE;
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (accepted, connections) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut preface = [0u8; 8];
                stream.read_exact(&mut preface).unwrap();
                stream.write_all(PREFACE).unwrap();
                // Kept open, unanswered: the requests stay in flight.
                let _ = accepted.send(stream);
            }
        });
        let mux = MuxSettings {
            connections: 1,
            ..Default::default()
        };
        // Dynamo's plane's call-home server; not reached here.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let streams = runtime
            .block_on(ResponseStreamServer::bind("127.0.0.1", 0, 1 << 20))
            .unwrap();
        let (shared, _reports) = shared_at(address.clone(), Some(mux), streams.clone());
        let starter = Arc::new(StartRemote(Arc::new(shared)));

        let plain = starter.clone();
        let handed_back = std::thread::spawn(move || !plain.can_start_here());
        assert!(
            handed_back.join().unwrap(),
            "a plain thread has no arbiter to run the request on"
        );
        // Arbiters belong to a system; this thread's is not one of the serving threads below.
        let _system = actix_rt::System::new();
        let (shared, _reports) = shared_at(address, None, streams);
        let dynamo = StartRemote(Arc::new(shared));
        let arbiter = actix_rt::Arbiter::new();
        let (handed_back, on_arbiter) = std::sync::mpsc::channel();
        arbiter.spawn(async move {
            let _ = handed_back.send(!dynamo.can_start_here());
        });
        assert!(
            on_arbiter.recv_timeout(Duration::from_secs(5)).unwrap(),
            "Dynamo's plane goes through the actor"
        );

        let arbiters = [actix_rt::Arbiter::new(), actix_rt::Arbiter::new()];
        let mut keep = Vec::new();
        for (n, arbiter) in arbiters.iter().enumerate() {
            for k in 0..3 {
                let starter = starter.clone();
                let (started, done) = std::sync::mpsc::channel();
                arbiter.spawn(async move {
                    let (msg, events) = generate(&format!("r{n}-{k}"));
                    let _ = started.send(starter.can_start_here());
                    starter.start_here(msg);
                    // The consumer stays: the stream is not cancelled.
                    std::future::pending::<()>().await;
                    drop(events);
                });
                assert!(done.recv_timeout(Duration::from_secs(5)).unwrap());
            }
        }
        for _ in 0..2 {
            keep.push(
                connections
                    .recv_timeout(Duration::from_secs(5))
                    .expect("a connection per arbiter"),
            );
        }
        assert!(
            connections
                .recv_timeout(Duration::from_millis(300))
                .is_err(),
            "three requests per arbiter share that arbiter's one connection"
        );
        assert_eq!(starter.0.peers.lock().unwrap().len(), 2);
        for arbiter in arbiters {
            arbiter.stop();
        }
        arbiter.stop();
    }
}
