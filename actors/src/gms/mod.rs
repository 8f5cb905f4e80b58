//! GPU Memory Service (runtime spec §2): an out-of-process owner of device memory, one server per device
//! and tag. A writer fills a layout once and commits it; readers in other processes import the same
//! physical memory through exported file descriptors. The socket connection is the lock, so a crashed
//! client releases it.
//!
//! # Layout
//! - [`actor`]: [`actor::GpuMemoryActor`] (lock, allocations, metadata, layout hash, events).
//! - [`server`]: [`server::GmsServer`], the Unix-socket listener whose per-connection tasks talk to
//!   the actor.
//! - [`in_process`]: [`in_process::InProcessGms`], a service on its own thread of this process.
//! - [`fsm`]: the lock state machine (EMPTY, RW, COMMITTED, RO; writer preference).
//! - [`allocations`]: the allocation table, metadata store and layout hash (§2.5–2.7).
//! - [`backend`]: the [`backend::MemoryBackend`] seam: host memfd (default) and CUDA VMM (feature `cuda`).
//! - [`protocol`]: the message catalogue (msgpack maps tagged by `"type"`).
//! - [`wire`]: length-prefixed frames and SCM_RIGHTS descriptor passing.
//! - [`client`]: the blocking client library for writer and reader sessions.
//! - [`check`]: the end-to-end write/verify check used by `dynamix gms write|read` and the GPU check.

pub mod actor;
pub mod allocations;
pub mod backend;
pub mod check;
pub mod client;
pub mod fsm;
pub mod in_process;
pub mod protocol;
pub mod server;
pub mod wire;

pub use actor::GpuMemoryActor;
pub use backend::BackendKind;
pub use client::{ClientError, GmsClient};
pub use in_process::InProcessGms;
pub use protocol::RequestedLockType;
pub use server::{default_socket_path, GmsConfig, GmsServer};
