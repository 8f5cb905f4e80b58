//! Following the keys under an etcd prefix (discovery records, model cards): a [`KeyWatch`] keeps
//! the current set, re-listing after every break of the watch, and ticks on every change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::etcd::{Client, EventType};

/// How long a failed watch waits before re-listing.
const RETRY: Duration = Duration::from_secs(1);

/// Why a watch did not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The first listing did not come in within the timeout.
    #[error("listing {prefix} in etcd took over {:.1} s", .timeout.as_secs_f64())]
    FirstListingTimeout {
        /// The prefix.
        prefix: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// The task following the prefix ended before its first listing.
    #[error("the watch of {prefix} stopped")]
    Stopped {
        /// The prefix.
        prefix: String,
    },
}

/// The live keys under a prefix; `changes` ticks on every change.
pub struct KeyWatch {
    keys: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    changes: watch::Receiver<u64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for KeyWatch {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl KeyWatch {
    /// A watch fed by something else (the SDK's in-process store): the shared map, its change
    /// counter, and the task that feeds them (aborted on drop).
    pub fn from_parts(
        keys: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
        changes: watch::Receiver<u64>,
        task: Option<tokio::task::JoinHandle<()>>,
    ) -> Self {
        KeyWatch {
            keys,
            changes,
            task,
        }
    }

    /// The keys and values now.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        self.keys.lock().map(|k| k.clone()).unwrap_or_default()
    }

    /// The shared map itself.
    pub fn snapshot_handle(&self) -> Arc<Mutex<BTreeMap<String, Vec<u8>>>> {
        self.keys.clone()
    }

    /// A receiver that changes whenever the set does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

/// Follow `prefix` on etcd; returns once the first listing is in (at most `timeout`).
pub async fn watch_prefix(
    client: Client,
    prefix: &str,
    timeout: Duration,
) -> Result<KeyWatch, WatchError> {
    let keys = Arc::new(Mutex::new(BTreeMap::new()));
    let (tx, mut rx) = watch::channel(0u64);
    let task = tokio::spawn(follow(client, prefix.to_string(), keys.clone(), tx));
    let watch = KeyWatch::from_parts(keys, rx.clone(), Some(task));
    // The first tick is the first listing.
    tokio::time::timeout(timeout, rx.changed())
        .await
        .map_err(|_| WatchError::FirstListingTimeout {
            prefix: prefix.to_string(),
            timeout,
        })?
        .map_err(|_| WatchError::Stopped {
            prefix: prefix.to_string(),
        })?;
    Ok(watch)
}

/// Follow `prefix` on etcd into `keys`, re-listing after every break.
async fn follow(
    mut client: Client,
    prefix: String,
    keys: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    tx: watch::Sender<u64>,
) {
    loop {
        let listing = match client.get_prefix(prefix.as_str()).await {
            Ok(listing) => listing,
            Err(e) => {
                tracing::warn!(%prefix, "cannot list etcd keys: {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let revision = listing.header.as_ref().map_or(0, |h| h.revision);
        if let Ok(mut current) = keys.lock() {
            *current = listing
                .kvs
                .into_iter()
                .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value))
                .collect();
        }
        tx.send_modify(|v| *v += 1);
        let mut stream = match client
            .watch_prefix(prefix.as_str(), revision.saturating_add(1))
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%prefix, "cannot watch etcd keys: {e}");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        while let Ok(Some(response)) = stream.message().await {
            if response.canceled || response.compact_revision > 0 {
                break;
            }
            if let Ok(mut current) = keys.lock() {
                for event in response.events {
                    let Some(kv) = event.kv else { continue };
                    let key = String::from_utf8_lossy(&kv.key).into_owned();
                    if event.r#type == EventType::Delete as i32 {
                        current.remove(&key);
                    } else {
                        current.insert(key, kv.value);
                    }
                }
            }
            tx.send_modify(|v| *v += 1);
        }
        tokio::time::sleep(RETRY).await;
    }
}
