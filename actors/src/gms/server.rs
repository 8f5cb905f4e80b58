//! [`GpuMemoryActor`] and its socket listener ([`GmsServer`]).
//!
//! The actor owns everything about one (device, tag): the lock table, the allocations, the metadata,
//! the layout hash and the event ring. Each accepted connection is a task that reads frames, asks the
//! actor, and writes the reply (with the exported fd, if any). The connection *is* the lock: when its
//! task ends for any reason (clean close, crash, SIGKILL of the client), a guard tells the actor, which
//! aborts the writer or drops the reader. Waiting for a lock, or for device memory after an OOM, happens
//! in the connection task, so the actor never blocks.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use super::allocations::{AllocationError, AllocationTable};
use super::backend::MemoryBackend;
use super::fsm::{ConnectionId, Grant, LockError, LockTable, Release};
use super::protocol::{decode_request, encode, GrantedLockType, Request, Response, RuntimeEvent};
use super::wire::{self, FrameError};

/// Events kept for `get_event_history_request`.
pub const EVENT_HISTORY_LIMIT: usize = 256;

/// Settings of one server (one device, one tag).
#[derive(Clone, Debug)]
pub struct GmsConfig {
    /// Device index (names the server in logs; the backend was opened for it).
    pub device: u32,
    /// `weights`, `kv_cache`, ...
    pub tag: String,
    /// The Unix socket to listen on.
    pub socket_path: PathBuf,
    /// Pause between allocation attempts while the device is out of memory.
    pub alloc_retry_interval: Duration,
    /// Give up on an out-of-memory allocation after this long (None: wait as long as the writer lives).
    pub alloc_retry_timeout: Option<Duration>,
}

/// `{GMS_SOCKET_DIR or the temp dir}/gms_{device identity}_{tag}.sock` (spec §2.2).
pub fn default_socket_path(device_identity: &str, tag: &str, socket_dir: Option<&Path>) -> PathBuf {
    let dir = socket_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    dir.join(format!("gms_{device_identity}_{tag}.sock"))
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another server answers on the socket.
    #[error("GMS already running at {0}")]
    AlreadyRunning(PathBuf),
    /// The path exists and is not a socket; refusing to delete it.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// bind/chmod failed.
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
}

/// A granted lock, as the waiting connection learns it.
#[derive(Debug, Clone, Copy)]
pub struct Granted {
    /// Writer or reader.
    pub lock: Grant,
    /// Whether a layout is committed (after the grant; a writer's grant wipes it).
    pub committed: bool,
}

/// What the actor answers to one request.
#[derive(Debug)]
pub enum Outcome {
    /// Send `response` (with `fd` attached), then close the connection when `close`.
    Reply {
        response: Response,
        fd: Option<OwnedFd>,
        close: bool,
    },
    /// The device is out of memory; the connection waits and asks again.
    OutOfMemory {
        requested_size: i64,
        aligned_size: u64,
        tag: String,
    },
}

impl Outcome {
    fn reply(response: Response) -> Self {
        Outcome::Reply {
            response,
            fd: None,
            close: false,
        }
    }
}

/// A handshake: grant now, or queue and grant through `grant` later.
#[derive(Message)]
#[rtype(result = "Result<(), LockError>")]
pub struct Acquire {
    pub connection: ConnectionId,
    pub lock_type: super::protocol::RequestedLockType,
    pub grant: oneshot::Sender<Granted>,
}

/// A waiting handshake timed out; returns whether a layout is committed. A grant that raced the timeout
/// is released.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct GiveUp {
    pub connection: ConnectionId,
}

/// The connection is gone: abort its writer session, drop its reader session or forget its wait.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnected {
    pub connection: ConnectionId,
}

/// One request on an established (or probe) connection.
#[derive(Message)]
#[rtype(result = "Outcome")]
pub struct Dispatch {
    pub connection: ConnectionId,
    pub request: Request,
}

/// The owner of one (device, tag)'s lock, allocations, metadata and layout hash.
pub struct GpuMemoryActor {
    device: u32,
    tag: String,
    locks: LockTable,
    allocations: AllocationTable,
    /// Ring of the last [`EVENT_HISTORY_LIMIT`] runtime events.
    events: VecDeque<RuntimeEvent>,
    /// Grant channels of handshakes that are waiting.
    waiting: HashMap<ConnectionId, oneshot::Sender<Granted>>,
}

impl Actor for GpuMemoryActor {
    type Context = Context<Self>;
}

impl GpuMemoryActor {
    /// An actor over `backend`.
    pub fn new(device: u32, tag: impl Into<String>, backend: Box<dyn MemoryBackend>) -> Self {
        GpuMemoryActor {
            device,
            tag: tag.into(),
            locks: LockTable::new(),
            allocations: AllocationTable::new(backend),
            events: VecDeque::new(),
            waiting: HashMap::new(),
        }
    }

    fn record(&mut self, kind: &str, allocation_count: u64) {
        if self.events.len() == EVENT_HISTORY_LIMIT {
            self.events.pop_front();
        }
        self.events.push_back(RuntimeEvent {
            kind: kind.to_string(),
            allocation_count,
        });
    }

    /// Side effects of a grant: a writer starts from an empty layout.
    fn on_grant(&mut self, connection: ConnectionId, grant: Grant) -> Granted {
        if grant == Grant::Rw {
            let had_layout = !self.allocations.layout_hash().is_empty();
            let cleared = self.allocations.clear();
            if had_layout || cleared > 0 {
                self.record("allocations_cleared", cleared as u64);
            }
            self.record("rw_connected", 0);
        }
        tracing::debug!(
            device = self.device,
            tag = %self.tag,
            connection,
            ?grant,
            "gms lock granted"
        );
        Granted {
            lock: grant,
            committed: self.locks.committed(),
        }
    }

    /// Hand out every grant the state now allows; undo grants whose connection is gone.
    fn pump(&mut self) {
        loop {
            let grants = self.locks.pump();
            if grants.is_empty() {
                return;
            }
            for (connection, grant) in grants {
                let granted = self.on_grant(connection, grant);
                let delivered = self
                    .waiting
                    .remove(&connection)
                    .is_some_and(|tx| tx.send(granted).is_ok());
                if !delivered {
                    let release = self.locks.release(connection);
                    self.after_release(release);
                }
            }
        }
    }

    fn after_release(&mut self, release: Release) {
        if release == Release::WriterAborted {
            let cleared = self.allocations.clear();
            self.record("rw_aborted", 0);
            self.record("allocations_cleared", cleared as u64);
            tracing::info!(
                device = self.device,
                tag = %self.tag,
                cleared,
                "gms writer left without commit; layout wiped"
            );
        }
    }

    fn release(&mut self, connection: ConnectionId) {
        self.waiting.remove(&connection);
        let release = self.locks.release(connection);
        self.after_release(release);
        self.pump();
    }

    fn lock_state_fields(&self) -> (String, bool, u64, u64, bool, bool) {
        (
            self.locks.state().as_str().to_string(),
            self.locks.has_writer(),
            self.locks.reader_count() as u64,
            self.locks.waiting_writers() as u64,
            self.locks.committed(),
            self.locks.is_ready(),
        )
    }

    fn handle_request(&mut self, connection: ConnectionId, request: Request) -> Outcome {
        // Probes need no session.
        match &request {
            Request::GetRuntimeStateRequest {} => {
                let (state, has_rw_session, ro_session_count, waiting_writers, committed, is_ready) =
                    self.lock_state_fields();
                return Outcome::reply(Response::GetRuntimeStateResponse {
                    state,
                    has_rw_session,
                    ro_session_count,
                    waiting_writers,
                    committed,
                    is_ready,
                    allocation_count: self.allocations.count() as u64,
                    memory_layout_hash: self.allocations.layout_hash().to_string(),
                    layout_committed: committed,
                });
            }
            Request::GetEventHistoryRequest {} => {
                return Outcome::reply(Response::GetEventHistoryResponse {
                    events: self.events.iter().cloned().collect(),
                })
            }
            Request::HandshakeRequest { .. } => {
                return Outcome::reply(Response::error(LockError::AlreadyConnected.to_string()))
            }
            _ => {}
        }
        let held = self.locks.held_by(connection);
        match held {
            None => {
                return Outcome::reply(Response::error(format!(
                    "{} not allowed: the connection holds no lock",
                    request.name()
                )))
            }
            Some(Grant::Ro) if request.requires_rw() => {
                return Outcome::reply(Response::error(format!(
                    "{} requires RW session, got ro",
                    request.name()
                )))
            }
            _ => {}
        }
        match request {
            Request::CommitRequest {} => self.commit(connection),
            Request::GetLockStateRequest {} => {
                let (state, has_rw_session, ro_session_count, waiting_writers, committed, is_ready) =
                    self.lock_state_fields();
                Outcome::reply(Response::GetLockStateResponse {
                    state,
                    has_rw_session,
                    ro_session_count,
                    waiting_writers,
                    committed,
                    is_ready,
                    layout_committed: committed,
                })
            }
            Request::GetAllocationStateRequest {} => {
                Outcome::reply(Response::GetAllocationStateResponse {
                    allocation_count: self.allocations.count() as u64,
                })
            }
            Request::AllocateRequest { size, tag } => match self.allocations.allocate(size, &tag) {
                Ok(info) => Outcome::reply(Response::AllocateResponse {
                    allocation_id: info.allocation_id,
                    size: info.size,
                    aligned_size: info.aligned_size,
                    layout_slot: info.layout_slot,
                }),
                Err(AllocationError::OutOfMemory) => {
                    self.record("allocation_oom", 0);
                    let granularity = self.allocations.granularity();
                    Outcome::OutOfMemory {
                        requested_size: size,
                        aligned_size: super::backend::align_up(size.max(0) as u64, granularity)
                            .unwrap_or(0),
                        tag,
                    }
                }
                Err(e) => Outcome::reply(Response::error(e.to_string())),
            },
            Request::ExportAllocationRequest { allocation_id } => {
                match self.allocations.export(&allocation_id) {
                    Ok((info, fd)) => Outcome::Reply {
                        response: Response::ExportAllocationResponse {
                            allocation_id: info.allocation_id,
                            size: info.size,
                            aligned_size: info.aligned_size,
                            tag: info.tag,
                            layout_slot: info.layout_slot,
                        },
                        fd: Some(fd),
                        close: false,
                    },
                    Err(e) => Outcome::reply(Response::error(e.to_string())),
                }
            }
            Request::GetAllocationRequest { allocation_id } => {
                match self.allocations.get(&allocation_id) {
                    Ok(info) => Outcome::reply(Response::GetAllocationResponse {
                        allocation_id: info.allocation_id,
                        size: info.size,
                        aligned_size: info.aligned_size,
                        tag: info.tag,
                        layout_slot: info.layout_slot,
                    }),
                    Err(e) => Outcome::reply(Response::error(e.to_string())),
                }
            }
            Request::ListAllocationsRequest { tag } => {
                Outcome::reply(Response::ListAllocationsResponse {
                    allocations: self.allocations.list(tag.as_deref()),
                })
            }
            Request::FreeAllocationRequest { allocation_id } => {
                Outcome::reply(Response::FreeAllocationResponse {
                    success: self.allocations.free(&allocation_id),
                })
            }
            Request::MetadataPutRequest {
                key,
                allocation_id,
                offset_bytes,
                value,
            } => match self
                .allocations
                .metadata_put(key, allocation_id, offset_bytes, value)
            {
                Ok(()) => Outcome::reply(Response::MetadataPutResponse { success: true }),
                Err(e) => Outcome::reply(Response::error(e.to_string())),
            },
            Request::MetadataGetRequest { key } => {
                let response = match self.allocations.metadata_get(&key) {
                    Some(entry) => Response::MetadataGetResponse {
                        found: true,
                        allocation_id: Some(entry.allocation_id.clone()),
                        offset_bytes: Some(entry.offset_bytes),
                        value: Some(entry.value.clone()),
                    },
                    None => Response::MetadataGetResponse {
                        found: false,
                        allocation_id: None,
                        offset_bytes: None,
                        value: None,
                    },
                };
                Outcome::reply(response)
            }
            Request::MetadataDeleteRequest { key } => {
                Outcome::reply(Response::MetadataDeleteResponse {
                    deleted: self.allocations.metadata_delete(&key),
                })
            }
            Request::MetadataListRequest { prefix } => {
                Outcome::reply(Response::MetadataListResponse {
                    keys: self.allocations.metadata_list(&prefix),
                })
            }
            Request::GetMemoryLayoutHashRequest {} => {
                Outcome::reply(Response::GetMemoryLayoutHashResponse {
                    memory_layout_hash: self.allocations.layout_hash().to_string(),
                })
            }
            Request::ClearAllRequest {} => Outcome::reply(Response::ClearAllResponse {
                cleared_count: self.allocations.clear() as u64,
            }),
            Request::HandshakeRequest { .. }
            | Request::GetRuntimeStateRequest {}
            | Request::GetEventHistoryRequest {} => {
                Outcome::reply(Response::error("internal: request already handled"))
            }
        }
    }

    fn commit(&mut self, connection: ConnectionId) -> Outcome {
        // Integrity is checked before the lock changes: a failed commit leaves the writer in RW.
        let hash = match self.allocations.seal() {
            Ok(hash) => hash,
            Err(e) => return Outcome::reply(Response::error(e.to_string())),
        };
        if let Err(e) = self.locks.commit(connection) {
            return Outcome::reply(Response::error(e.to_string()));
        }
        self.record("committed", self.allocations.count() as u64);
        tracing::info!(
            device = self.device,
            tag = %self.tag,
            allocations = self.allocations.count(),
            %hash,
            "gms layout committed"
        );
        self.pump();
        Outcome::Reply {
            response: Response::CommitResponse { success: true },
            fd: None,
            close: true,
        }
    }
}

impl Handler<Acquire> for GpuMemoryActor {
    type Result = Result<(), LockError>;

    fn handle(&mut self, msg: Acquire, _: &mut Context<Self>) -> Self::Result {
        match self.locks.request(msg.connection, msg.lock_type)? {
            Some(grant) => {
                let granted = self.on_grant(msg.connection, grant);
                if msg.grant.send(granted).is_err() {
                    self.release(msg.connection);
                }
            }
            None => {
                self.waiting.insert(msg.connection, msg.grant);
            }
        }
        Ok(())
    }
}

impl Handler<GiveUp> for GpuMemoryActor {
    type Result = bool;

    fn handle(&mut self, msg: GiveUp, _: &mut Context<Self>) -> bool {
        self.release(msg.connection);
        self.locks.committed()
    }
}

impl Handler<Disconnected> for GpuMemoryActor {
    type Result = ();

    fn handle(&mut self, msg: Disconnected, _: &mut Context<Self>) {
        self.release(msg.connection);
    }
}

impl Handler<Dispatch> for GpuMemoryActor {
    type Result = MessageResult<Dispatch>;

    fn handle(&mut self, msg: Dispatch, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.handle_request(msg.connection, msg.request))
    }
}

/// A bound socket with its actor, ready to [`serve`](GmsServer::serve).
pub struct GmsServer {
    listener: UnixListener,
    actor: Addr<GpuMemoryActor>,
    config: GmsConfig,
}

impl GmsServer {
    /// Start the actor over `backend` and listen on `config.socket_path` (owner-only permissions). A
    /// stale socket file is replaced; a live server on it is an error. Must run inside an actix System.
    pub fn bind(config: GmsConfig, backend: Box<dyn MemoryBackend>) -> Result<Self, ServerError> {
        let path = config.socket_path.clone();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ServerError::NotASocket(path));
            }
            Ok(_) => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(ServerError::AlreadyRunning(path));
                }
                std::fs::remove_file(&path).map_err(|source| ServerError::Bind {
                    path: path.clone(),
                    source,
                })?;
            }
            Err(_) => {}
        }
        let bind_error = |source| ServerError::Bind {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(bind_error)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        let actor = GpuMemoryActor::new(config.device, config.tag.clone(), backend).start();
        Ok(GmsServer {
            listener,
            actor,
            config,
        })
    }

    /// Where it listens.
    pub fn socket_path(&self) -> &Path {
        &self.config.socket_path
    }

    /// The actor, for in-process use.
    pub fn actor(&self) -> Addr<GpuMemoryActor> {
        self.actor.clone()
    }

    /// Accept connections until `shutdown` resolves, then remove the socket file.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut next_connection: ConnectionId = 0;
        let retry = RetryPolicy {
            interval: self.config.alloc_retry_interval,
            timeout: self.config.alloc_retry_timeout,
        };
        tracing::info!(
            device = self.config.device,
            tag = %self.config.tag,
            socket = %self.config.socket_path.display(),
            "gms listening"
        );
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        next_connection += 1;
                        let actor = self.actor.clone();
                        actix_rt::spawn(serve_connection(stream, next_connection, actor, retry));
                    }
                    Err(e) => {
                        tracing::warn!("gms accept failed: {e}");
                        // EMFILE and friends: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = &mut shutdown => break,
            }
        }
        let _ = std::fs::remove_file(&self.config.socket_path);
    }
}

#[derive(Clone, Copy, Debug)]
struct RetryPolicy {
    interval: Duration,
    timeout: Option<Duration>,
}

/// Tells the actor that the connection ended, however the task ends.
struct DisconnectGuard {
    actor: Addr<GpuMemoryActor>,
    connection: ConnectionId,
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        self.actor.do_send(Disconnected {
            connection: self.connection,
        });
    }
}

enum Incoming {
    Closed,
    Request(Request),
    /// Answer with this error; close afterwards when `close`.
    Reject {
        error: String,
        close: bool,
    },
}

async fn read_request(stream: &mut UnixStream) -> Incoming {
    match wire::read_frame(stream).await {
        Ok(None) | Err(FrameError::Closed) | Err(FrameError::Io(_)) => Incoming::Closed,
        // The rest of an oversized frame cannot be skipped safely: answer, then close.
        Err(e @ FrameError::TooLarge(_)) => Incoming::Reject {
            error: e.to_string(),
            close: true,
        },
        Ok(Some(body)) => match decode_request(&body) {
            Ok(request) => Incoming::Request(request),
            Err(e) => Incoming::Reject {
                error: e.to_string(),
                close: false,
            },
        },
    }
}

async fn send(stream: &mut UnixStream, response: &Response, fd: Option<&OwnedFd>) -> bool {
    wire::write_frame(stream, &encode(response), fd.map(|f| f.as_fd()))
        .await
        .is_ok()
}

async fn serve_connection(
    mut stream: UnixStream,
    connection: ConnectionId,
    actor: Addr<GpuMemoryActor>,
    retry: RetryPolicy,
) {
    let _guard = DisconnectGuard {
        actor: actor.clone(),
        connection,
    };
    let (lock_type, timeout_ms) = match read_request(&mut stream).await {
        Incoming::Closed => return,
        Incoming::Reject { error, .. } => {
            send(
                &mut stream,
                &Response::error(format!("Expected HandshakeRequest ({error})")),
                None,
            )
            .await;
            return;
        }
        Incoming::Request(Request::HandshakeRequest {
            lock_type,
            timeout_ms,
            ..
        }) => (lock_type, timeout_ms),
        Incoming::Request(
            probe @ (Request::GetRuntimeStateRequest {} | Request::GetEventHistoryRequest {}),
        ) => {
            if let Ok(Outcome::Reply { response, .. }) = actor
                .send(Dispatch {
                    connection,
                    request: probe,
                })
                .await
            {
                send(&mut stream, &response, None).await;
            }
            return;
        }
        Incoming::Request(_) => {
            send(
                &mut stream,
                &Response::error("Expected HandshakeRequest"),
                None,
            )
            .await;
            return;
        }
    };

    let (grant_tx, grant_rx) = oneshot::channel();
    match actor
        .send(Acquire {
            connection,
            lock_type,
            grant: grant_tx,
        })
        .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            send(&mut stream, &Response::error(e.to_string()), None).await;
            return;
        }
        Err(_) => return,
    }
    let wait_limit = async {
        match timeout_ms {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
    };
    let granted = tokio::select! {
        granted = grant_rx => match granted {
            Ok(granted) => granted,
            Err(_) => return,
        },
        _ = wait_limit => {
            let committed = actor.send(GiveUp { connection }).await.unwrap_or(false);
            let response = Response::HandshakeResponse {
                success: false,
                committed,
                granted_lock_type: None,
            };
            send(&mut stream, &response, None).await;
            return;
        }
        // A client that gives up while queued must not stay counted as a waiting writer.
        _ = wire::peer_closed(&stream) => return,
    };
    let granted_lock_type = match granted.lock {
        Grant::Rw => GrantedLockType::Rw,
        Grant::Ro => GrantedLockType::Ro,
    };
    let response = Response::HandshakeResponse {
        success: true,
        committed: granted.committed,
        granted_lock_type: Some(granted_lock_type),
    };
    if !send(&mut stream, &response, None).await {
        return;
    }

    loop {
        let request = match read_request(&mut stream).await {
            Incoming::Closed => return,
            Incoming::Reject { error, close } => {
                if !send(&mut stream, &Response::error(error), None).await || close {
                    return;
                }
                continue;
            }
            Incoming::Request(request) => request,
        };
        let Some((response, fd, close)) =
            dispatch_with_retry(&actor, connection, request, retry, &stream).await
        else {
            return;
        };
        if !send(&mut stream, &response, fd.as_ref()).await || close {
            return;
        }
        // The server's copy of an exported fd closes here.
        drop(fd);
    }
}

/// Ask the actor; on out-of-memory wait and retry while the client is alive, until the retry timeout.
async fn dispatch_with_retry(
    actor: &Addr<GpuMemoryActor>,
    connection: ConnectionId,
    request: Request,
    retry: RetryPolicy,
    stream: &UnixStream,
) -> Option<(Response, Option<OwnedFd>, bool)> {
    let started = Instant::now();
    loop {
        let outcome = actor
            .send(Dispatch {
                connection,
                request: request.clone(),
            })
            .await
            .ok()?;
        match outcome {
            Outcome::Reply {
                response,
                fd,
                close,
            } => return Some((response, fd, close)),
            Outcome::OutOfMemory {
                requested_size,
                aligned_size,
                tag,
            } => {
                let waited = started.elapsed();
                if retry.timeout.is_some_and(|limit| waited >= limit) {
                    let message = format!(
                        "Timed out waiting for GPU memory: requested_size={requested_size}, aligned_size={aligned_size}, tag={tag}, waited_sec={:.1}",
                        waited.as_secs_f64()
                    );
                    return Some((Response::error(message), None, false));
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry.interval) => {}
                    _ = wire::peer_closed(stream) => return None,
                }
            }
        }
    }
}

/// A memory service run inside this process (`model_engine.gms_serve`): host backend, its own Arbiter
/// thread, owned by the root supervisor, which stops it at shutdown. Other processes on the machine
/// attach to what this one publishes.
pub struct InProcessGms {
    arbiter: Arbiter,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Where it listens.
    pub socket: PathBuf,
}

impl InProcessGms {
    /// Start a host-backend service for `tag` on `socket`. Must run inside an actix System.
    pub fn start(socket: PathBuf, tag: &str) -> Result<InProcessGms, String> {
        let tag = tag.to_string();
        let arbiter = Arbiter::new();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let path = socket.clone();
        let spawned = arbiter.spawn(async move {
            let config = GmsConfig {
                device: 0,
                tag,
                socket_path: path,
                alloc_retry_interval: Duration::from_millis(100),
                alloc_retry_timeout: Some(Duration::from_secs(30)),
            };
            let server = super::backend::open(super::BackendKind::Host, 0, None)
                .map_err(|e| e.to_string())
                .and_then(|b| GmsServer::bind(config, b).map_err(|e| e.to_string()));
            match server {
                Ok(server) => {
                    let _ = bound_tx.send(Ok(()));
                    server
                        .serve(async move {
                            let _ = stopped.await;
                        })
                        .await;
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                }
            }
        });
        let bound = if spawned {
            bound_rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| Err("the memory service thread did not start".into()))
        } else {
            Err("the memory service thread did not start".into())
        };
        match bound {
            Ok(()) => Ok(InProcessGms {
                arbiter,
                stop: Some(stop),
                socket,
            }),
            Err(e) => {
                arbiter.stop();
                Err(format!(
                    "in-process GPU memory service at {}: {e}",
                    socket.display()
                ))
            }
        }
    }

    /// Stop serving (the socket file is removed) and end its thread; dropping it does the same.
    pub fn stop(self) {}
}

impl Drop for InProcessGms {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.arbiter.stop();
    }
}
