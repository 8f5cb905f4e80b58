//! The registry of in-flight requests: which engine serves each choice of each request and how many
//! tokens it has produced so far. Written by the serving path (one entry per routed choice, updated per
//! output with one atomic add), read by the supervisor when an engine fails, by `/health` and by the
//! fault drill.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use std::time::Instant;

use serde::Serialize;

/// One routed choice.
#[derive(Debug)]
pub struct InflightEntry {
    /// Canonical request id.
    pub request_id: String,
    /// Choice index.
    pub choice: u32,
    /// The engine serving it now.
    pub engine_id: AtomicU64,
    /// Tokens delivered so far (over every attempt).
    pub tokens: AtomicU64,
    /// Migrations so far.
    pub migrations: AtomicU32,
    /// When it was first routed.
    pub started: Instant,
}

/// A snapshot of one entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InflightSnapshot {
    /// Canonical request id.
    pub request_id: String,
    /// Choice index.
    pub choice: u32,
    /// The engine serving it.
    pub engine_id: u64,
    /// Tokens delivered so far.
    pub tokens: u64,
    /// Migrations so far.
    pub migrations: u32,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct InflightRegistry {
    /// Sharded: registrations from many HTTP workers and snapshots never wait on one lock.
    entries: DashMap<(String, u32), Arc<InflightEntry>>,
}

/// Keeps a registry entry alive; removes it when dropped (the choice finished, failed or was cancelled).
#[derive(Debug)]
pub struct InflightHandle {
    registry: Arc<InflightRegistry>,
    entry: Arc<InflightEntry>,
}

impl InflightHandle {
    /// The entry.
    pub fn entry(&self) -> &InflightEntry {
        &self.entry
    }
}

impl Drop for InflightHandle {
    fn drop(&mut self) {
        let key = (self.entry.request_id.clone(), self.entry.choice);
        self.registry
            .entries
            .remove_if(&key, |_, e| Arc::ptr_eq(e, &self.entry));
    }
}

impl InflightRegistry {
    /// Registers choice `choice` of `request_id`, now on `engine_id`.
    pub fn register(
        self: &Arc<Self>,
        request_id: &str,
        choice: u32,
        engine_id: u64,
    ) -> InflightHandle {
        let entry = Arc::new(InflightEntry {
            request_id: request_id.to_string(),
            choice,
            engine_id: AtomicU64::new(engine_id),
            tokens: AtomicU64::new(0),
            migrations: AtomicU32::new(0),
            started: Instant::now(),
        });
        self.entries
            .insert((request_id.to_string(), choice), entry.clone());
        InflightHandle {
            registry: self.clone(),
            entry,
        }
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Choices in flight on `engine_id`.
    pub fn on_engine(&self, engine_id: u64) -> Vec<InflightSnapshot> {
        self.snapshot()
            .into_iter()
            .filter(|e| e.engine_id == engine_id)
            .collect()
    }

    /// Every entry.
    pub fn snapshot(&self) -> Vec<InflightSnapshot> {
        self.entries
            .iter()
            .map(|e| InflightSnapshot {
                request_id: e.request_id.clone(),
                choice: e.choice,
                engine_id: e.engine_id.load(Ordering::Relaxed),
                tokens: e.tokens.load(Ordering::Relaxed),
                migrations: e.migrations.load(Ordering::Relaxed),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_live_as_long_as_their_handles() {
        let registry = Arc::new(InflightRegistry::default());
        let a = registry.register("r1", 0, 3);
        let b = registry.register("r1", 1, 4);
        a.entry().tokens.fetch_add(5, Ordering::Relaxed);
        assert_eq!(registry.len(), 2);
        let on_3 = registry.on_engine(3);
        assert_eq!(on_3.len(), 1);
        assert_eq!(on_3[0].tokens, 5);
        a.entry().engine_id.store(4, Ordering::Relaxed);
        assert_eq!(registry.on_engine(4).len(), 2, "migrated");
        drop(a);
        assert_eq!(registry.len(), 1);
        drop(b);
        assert!(registry.is_empty());
    }
}
