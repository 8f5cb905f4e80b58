//! KV-cache awareness shared by the router and the engines (runtime spec §3).
//!
//! Layout:
//! - [`hashing`]: local and chained block hashes (§3.1).
//! - [`protocol`]: the KV events engines emit (§3.2).
//! - [`indexer`]: the global prefix index fed by KV events (§3.3); one writer, lock-light readers.
//! - [`active`]: per-engine active-sequence tracking for load prediction (§3.4).
//! - [`selector`]: the cost function and softmax selection (§3.5).
//! - [`approx`]: approximate mode, the router's own TTL-bounded record of its decisions (§3.6).
//! - `blocks`: a paged cache's block pools and the KV events they produce (the mocker's and the GPU
//!   engine's).

pub mod active;
pub mod approx;
pub(crate) mod blocks;
pub mod hashing;
pub mod indexer;
pub mod protocol;
pub mod selector;
