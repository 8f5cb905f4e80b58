//! The client library: a blocking session over one connection, as Dynamo's client is synchronous.
//!
//! [`GmsClient::connect`] performs the handshake; the session then holds the lock until it is dropped
//! (or, for a writer, until [`GmsClient::commit`]). Reader helpers map exported allocations through the
//! backend ([`super::backend::map_exported`]); [`GmsClient::verify_layout`] raises
//! [`ClientError::StaleLayout`] when the server's layout hash no longer matches a saved one.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{
    decode_response, encode, AllocationInfo, GrantedLockType, Request, RequestedLockType, Response,
    RuntimeEvent,
};
use super::wire::{self, FrameError};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket connect or I/O failed.
    #[error("GMS connection to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The server closed the connection.
    #[error("Connection closed")]
    Closed,
    /// The handshake timed out (`timeout_ms`).
    #[error("Timeout waiting for lock")]
    LockTimeout { committed: bool },
    /// The server answered `error_response`.
    #[error("GMS error: {message}")]
    Server { message: String, code: i64 },
    /// The server sent something this client cannot use.
    #[error("GMS protocol error: {0}")]
    Protocol(String),
    /// The layout changed since it was saved; re-import everything.
    #[error("stale memory layout: saved hash {saved:?}, server has {current:?}")]
    StaleLayout { saved: String, current: String },
}

impl ClientError {
    /// The service failed while handling this session's request and closed it; its tables are
    /// intact, so a new session may try again.
    pub fn is_service_failure(&self) -> bool {
        matches!(
            self,
            ClientError::Server {
                code: super::protocol::CODE_SERVICE_FAILED,
                ..
            }
        )
    }
}

/// Lock snapshot (`get_lock_state_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockStateView {
    pub state: String,
    pub has_rw_session: bool,
    pub ro_session_count: u64,
    pub waiting_writers: u64,
    pub committed: bool,
    pub is_ready: bool,
}

/// Probe snapshot (`get_runtime_state_response`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeStateView {
    pub lock: LockStateView,
    pub allocation_count: u64,
    pub memory_layout_hash: String,
}

/// One metadata entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataValue {
    pub allocation_id: String,
    pub offset_bytes: u64,
    pub value: Vec<u8>,
}

/// A lock session on one GMS socket.
#[derive(Debug)]
pub struct GmsClient {
    stream: UnixStream,
    path: PathBuf,
    granted: GrantedLockType,
    committed: bool,
}

fn connect_socket(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn roundtrip(
    stream: &mut UnixStream,
    path: &Path,
    request: &Request,
) -> Result<(Response, Option<OwnedFd>), ClientError> {
    wire::send_frame(stream, &encode(request)).map_err(|source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (body, fd) = wire::recv_frame(stream).map_err(|e| match e {
        FrameError::Closed => ClientError::Closed,
        FrameError::Io(source) => ClientError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => ClientError::Protocol(other.to_string()),
    })?;
    let response = decode_response(&body).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if let Response::ErrorResponse { error, code } = response {
        return Err(ClientError::Server {
            message: error,
            code,
        });
    }
    Ok((response, fd))
}

fn unexpected(expected: &str, got: &Response) -> ClientError {
    ClientError::Protocol(format!("expected {expected}, got {got:?}"))
}

fn lock_view(response: Response) -> Result<LockStateView, ClientError> {
    match response {
        Response::GetLockStateResponse {
            state,
            has_rw_session,
            ro_session_count,
            waiting_writers,
            committed,
            is_ready,
            ..
        } => Ok(LockStateView {
            state,
            has_rw_session,
            ro_session_count,
            waiting_writers,
            committed,
            is_ready,
        }),
        other => Err(unexpected("get_lock_state_response", &other)),
    }
}

impl GmsClient {
    /// Connect and take `lock`, waiting at most `timeout` for it (None: as long as it takes).
    pub fn connect(
        path: impl AsRef<Path>,
        lock: RequestedLockType,
        timeout: Option<Duration>,
    ) -> Result<Self, ClientError> {
        let path = path.as_ref().to_path_buf();
        let mut stream = connect_socket(&path)?;
        let request = Request::HandshakeRequest {
            lock_type: lock,
            timeout_ms: timeout.map(|t| t.as_millis().min(u64::MAX as u128) as u64),
            profile_session_id: None,
        };
        match roundtrip(&mut stream, &path, &request)? {
            (
                Response::HandshakeResponse {
                    success: true,
                    committed,
                    granted_lock_type: Some(granted),
                },
                _,
            ) => Ok(GmsClient {
                stream,
                path,
                granted,
                committed,
            }),
            (
                Response::HandshakeResponse {
                    success: false,
                    committed,
                    ..
                },
                _,
            ) => Err(ClientError::LockTimeout { committed }),
            (other, _) => Err(unexpected("handshake_response", &other)),
        }
    }

    /// The lock this session holds.
    pub fn granted(&self) -> GrantedLockType {
        self.granted
    }

    /// Whether a layout was committed when the lock was granted.
    pub fn committed_at_grant(&self) -> bool {
        self.committed
    }

    /// Send any request and return the raw reply (an `error_response` becomes [`ClientError::Server`]).
    pub fn call(&mut self, request: &Request) -> Result<(Response, Option<OwnedFd>), ClientError> {
        roundtrip(&mut self.stream, &self.path, request)
    }

    /// Create an allocation of `size` bytes.
    pub fn allocate(&mut self, size: u64, tag: &str) -> Result<AllocationInfo, ClientError> {
        let size = i64::try_from(size)
            .map_err(|_| ClientError::Protocol(format!("size {size} exceeds i64")))?;
        match self.call(&Request::AllocateRequest {
            size,
            tag: tag.to_string(),
        })? {
            (
                Response::AllocateResponse {
                    allocation_id,
                    size,
                    aligned_size,
                    layout_slot,
                },
                _,
            ) => Ok(AllocationInfo {
                allocation_id,
                size,
                aligned_size,
                tag: tag.to_string(),
                layout_slot,
            }),
            (other, _) => Err(unexpected("allocate_response", &other)),
        }
    }

    /// Export an allocation: its description and a descriptor owned by the caller.
    pub fn export(
        &mut self,
        allocation_id: &str,
    ) -> Result<(AllocationInfo, OwnedFd), ClientError> {
        match self.call(&Request::ExportAllocationRequest {
            allocation_id: allocation_id.to_string(),
        })? {
            (
                Response::ExportAllocationResponse {
                    allocation_id,
                    size,
                    aligned_size,
                    tag,
                    layout_slot,
                },
                Some(fd),
            ) => Ok((
                AllocationInfo {
                    allocation_id,
                    size,
                    aligned_size,
                    tag,
                    layout_slot,
                },
                fd,
            )),
            (Response::ExportAllocationResponse { .. }, None) => Err(ClientError::Protocol(
                "export_allocation_response arrived without a file descriptor".into(),
            )),
            (other, _) => Err(unexpected("export_allocation_response", &other)),
        }
    }

    /// Describe one allocation.
    pub fn get_allocation(&mut self, allocation_id: &str) -> Result<AllocationInfo, ClientError> {
        match self.call(&Request::GetAllocationRequest {
            allocation_id: allocation_id.to_string(),
        })? {
            (
                Response::GetAllocationResponse {
                    allocation_id,
                    size,
                    aligned_size,
                    tag,
                    layout_slot,
                },
                _,
            ) => Ok(AllocationInfo {
                allocation_id,
                size,
                aligned_size,
                tag,
                layout_slot,
            }),
            (other, _) => Err(unexpected("get_allocation_response", &other)),
        }
    }

    /// All allocations (with `tag`, when given) in layout order.
    pub fn list_allocations(
        &mut self,
        tag: Option<&str>,
    ) -> Result<Vec<AllocationInfo>, ClientError> {
        match self.call(&Request::ListAllocationsRequest {
            tag: tag.map(str::to_string),
        })? {
            (Response::ListAllocationsResponse { mut allocations }, _) => {
                allocations.sort_by_key(|a| a.layout_slot);
                Ok(allocations)
            }
            (other, _) => Err(unexpected("list_allocations_response", &other)),
        }
    }

    /// Release an allocation; false if the server did not know it.
    pub fn free(&mut self, allocation_id: &str) -> Result<bool, ClientError> {
        match self.call(&Request::FreeAllocationRequest {
            allocation_id: allocation_id.to_string(),
        })? {
            (Response::FreeAllocationResponse { success }, _) => Ok(success),
            (other, _) => Err(unexpected("free_allocation_response", &other)),
        }
    }

    /// Store a metadata entry.
    pub fn metadata_put(
        &mut self,
        key: &str,
        allocation_id: &str,
        offset_bytes: u64,
        value: &[u8],
    ) -> Result<(), ClientError> {
        let offset_bytes = i64::try_from(offset_bytes)
            .map_err(|_| ClientError::Protocol(format!("offset {offset_bytes} exceeds i64")))?;
        match self.call(&Request::MetadataPutRequest {
            key: key.to_string(),
            allocation_id: allocation_id.to_string(),
            offset_bytes,
            value: value.to_vec(),
        })? {
            (Response::MetadataPutResponse { success: true }, _) => Ok(()),
            (other, _) => Err(unexpected("metadata_put_response{success: true}", &other)),
        }
    }

    /// Read a metadata entry.
    pub fn metadata_get(&mut self, key: &str) -> Result<Option<MetadataValue>, ClientError> {
        match self.call(&Request::MetadataGetRequest {
            key: key.to_string(),
        })? {
            (Response::MetadataGetResponse { found: false, .. }, _) => Ok(None),
            (
                Response::MetadataGetResponse {
                    found: true,
                    allocation_id,
                    offset_bytes,
                    value,
                },
                _,
            ) => Ok(Some(MetadataValue {
                allocation_id: allocation_id.unwrap_or_default(),
                offset_bytes: offset_bytes.unwrap_or_default(),
                value: value.unwrap_or_default(),
            })),
            (other, _) => Err(unexpected("metadata_get_response", &other)),
        }
    }

    /// Remove a metadata entry; whether it existed.
    pub fn metadata_delete(&mut self, key: &str) -> Result<bool, ClientError> {
        match self.call(&Request::MetadataDeleteRequest {
            key: key.to_string(),
        })? {
            (Response::MetadataDeleteResponse { deleted }, _) => Ok(deleted),
            (other, _) => Err(unexpected("metadata_delete_response", &other)),
        }
    }

    /// Sorted metadata keys starting with `prefix`.
    pub fn metadata_list(&mut self, prefix: &str) -> Result<Vec<String>, ClientError> {
        match self.call(&Request::MetadataListRequest {
            prefix: prefix.to_string(),
        })? {
            (Response::MetadataListResponse { keys }, _) => Ok(keys),
            (other, _) => Err(unexpected("metadata_list_response", &other)),
        }
    }

    /// The lock state.
    pub fn lock_state(&mut self) -> Result<LockStateView, ClientError> {
        lock_view(self.call(&Request::GetLockStateRequest {})?.0)
    }

    /// Number of server-owned allocations.
    pub fn allocation_count(&mut self) -> Result<u64, ClientError> {
        match self.call(&Request::GetAllocationStateRequest {})? {
            (Response::GetAllocationStateResponse { allocation_count }, _) => Ok(allocation_count),
            (other, _) => Err(unexpected("get_allocation_state_response", &other)),
        }
    }

    /// The committed layout hash ("" if none).
    pub fn layout_hash(&mut self) -> Result<String, ClientError> {
        match self.call(&Request::GetMemoryLayoutHashRequest {})? {
            (Response::GetMemoryLayoutHashResponse { memory_layout_hash }, _) => {
                Ok(memory_layout_hash)
            }
            (other, _) => Err(unexpected("get_memory_layout_hash_response", &other)),
        }
    }

    /// Fail with [`ClientError::StaleLayout`] unless the server's layout hash is `saved`.
    pub fn verify_layout(&mut self, saved: &str) -> Result<(), ClientError> {
        let current = self.layout_hash()?;
        if current != saved {
            return Err(ClientError::StaleLayout {
                saved: saved.to_string(),
                current,
            });
        }
        Ok(())
    }

    /// Publish the layout. The server replies, then closes the connection; the session ends here and
    /// readers may connect.
    pub fn commit(mut self) -> Result<(), ClientError> {
        match self.call(&Request::CommitRequest {})? {
            (Response::CommitResponse { success: true }, _) => Ok(()),
            (other, _) => Err(unexpected("commit_response{success: true}", &other)),
        }
    }
}

/// Probe: the runtime state, on a connection that never takes a lock.
pub fn runtime_state(path: impl AsRef<Path>) -> Result<RuntimeStateView, ClientError> {
    let path = path.as_ref();
    let mut stream = connect_socket(path)?;
    match roundtrip(&mut stream, path, &Request::GetRuntimeStateRequest {})?.0 {
        Response::GetRuntimeStateResponse {
            state,
            has_rw_session,
            ro_session_count,
            waiting_writers,
            committed,
            is_ready,
            allocation_count,
            memory_layout_hash,
            ..
        } => Ok(RuntimeStateView {
            lock: LockStateView {
                state,
                has_rw_session,
                ro_session_count,
                waiting_writers,
                committed,
                is_ready,
            },
            allocation_count,
            memory_layout_hash,
        }),
        other => Err(unexpected("get_runtime_state_response", &other)),
    }
}

/// Probe: the runtime event history.
pub fn event_history(path: impl AsRef<Path>) -> Result<Vec<RuntimeEvent>, ClientError> {
    let path = path.as_ref();
    let mut stream = connect_socket(path)?;
    match roundtrip(&mut stream, path, &Request::GetEventHistoryRequest {})?.0 {
        Response::GetEventHistoryResponse { events } => Ok(events),
        other => Err(unexpected("get_event_history_response", &other)),
    }
}
