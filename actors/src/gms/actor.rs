//! [`GpuMemoryActor`]: everything about one (device, tag): the lock table, the allocations, the
//! metadata, the layout hash and the event ring. The socket side ([`super::server`]) asks it one
//! message at a time; waiting (for a lock, or for memory after an OOM) happens in the connection
//! tasks, so the actor never blocks.
//!
//! Supervision: a panic while handling a request is caught, that request is answered with an error
//! and the failure is reported to the root (`memory_service` restarts). The actor then *resumes*
//! with its tables as they are rather than starting empty: they describe device memory that engines
//! in this and other processes have mapped, and a fresh table would orphan it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::allocations::{AllocationError, AllocationTable};
use super::backend::MemoryBackend;
use super::fsm::{ConnectionId, Grant, LockError, LockTable, Release};
use super::protocol::{Request, Response, RuntimeEvent};
use crate::faults::FaultInjector;
use crate::supervision::{
    catch_panic, ActorKind, RestartTracker, SupervisionConfig, SupervisorEvents,
};

/// Events kept for `get_event_history_request`.
pub const EVENT_HISTORY_LIMIT: usize = 256;

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
    /// Reports caught panics to the root (when a tree supervises this service).
    supervision: RestartTracker,
    faults: Arc<FaultInjector>,
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
            supervision: RestartTracker::new(ActorKind::MemoryService, "0")
                .with_budget(&SupervisionConfig::default()),
            faults: FaultInjector::disabled(),
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
        let Dispatch {
            connection,
            request,
        } = msg;
        let inject = self.faults.on_memory();
        let handled = catch_panic(|| {
            if inject {
                panic!("injected fault: memory service panics while handling a request");
            }
            self.handle_request(connection, request)
        });
        MessageResult(match handled {
            Ok(outcome) => outcome,
            Err(reason) => self.failed(reason),
        })
    }
}

impl GpuMemoryActor {
    /// A request panicked: answer it with an error, close its connection (its session may be half
    /// done; closing releases its lock), report, and resume (see the module docs).
    fn failed(&mut self, reason: String) -> Outcome {
        tracing::error!(device = self.device, tag = %self.tag, %reason, "memory service panicked");
        self.supervision.resume_after(reason.clone());
        Outcome::Reply {
            response: Response::service_failed(format!("memory service failed: {reason}")),
            fd: None,
            close: true,
        }
    }
}

/// Puts the actor under a tree: restart budget, where to report, and the fault injector.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Supervise {
    /// Restart budget.
    pub config: SupervisionConfig,
    /// The root's event channel.
    pub events: SupervisorEvents,
    /// Fault injection (`memory_service_panic`).
    pub faults: Arc<FaultInjector>,
}

impl Handler<Supervise> for GpuMemoryActor {
    type Result = ();

    fn handle(&mut self, msg: Supervise, _: &mut Context<Self>) {
        self.supervision.supervise(&msg.config, msg.events);
        self.faults = msg.faults;
    }
}
