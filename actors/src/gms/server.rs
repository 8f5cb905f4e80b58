//! [`GmsServer`]: the Unix-socket listener of one [`GpuMemoryActor`].
//!
//! Each accepted connection is a task that reads frames, asks the
//! actor, and writes the reply (with the exported fd, if any). The connection *is* the lock: when its
//! task ends for any reason (clean close, crash, SIGKILL of the client), a guard tells the actor, which
//! aborts the writer or drops the reader. Waiting for a lock, or for device memory after an OOM, happens
//! in the connection task, so the actor never blocks.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use super::actor::{Acquire, Disconnected, Dispatch, GiveUp, GpuMemoryActor, Outcome};
use super::backend::MemoryBackend;
use super::fsm::{ConnectionId, Grant};
use super::protocol::{decode_request, encode, GrantedLockType, Request, Response};
use super::wire::{self, FrameError};

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
        // A socket directory that does not exist yet (`gms_socket_dir`) is made, owner-only.
        if let Some(dir) = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(bind_error)?;
        }
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
