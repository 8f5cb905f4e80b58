//! KV-cache awareness shared by the router and the engines (runtime spec §3): block hashing and the
//! KV event protocol.
//!
//! Layout:
//! - [`hashing`]: local and chained block hashes (§3.1).
//! - [`protocol`]: the KV events engines emit (§3.2).

pub mod hashing;
pub mod protocol;
