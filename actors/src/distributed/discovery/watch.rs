//! The frontend's side: list the instances under the prefix, then follow it through outages.

use std::collections::HashMap;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{DiscoveryError, EtcdAccess, RETRY_INTERVAL};
use crate::distributed::etcd::{Client, EventType};
use crate::distributed::{DistributedConfig, Instance};

/// A change in the set of instances, as the frontend sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum DiscoveryEvent {
    /// An instance appeared or its record changed (consumers must be idempotent: a re-put of the
    /// same id emits `Added` again).
    Added(Box<Instance>),
    /// The instance with this id left (deregistered, or its lease expired).
    Removed(u64),
    /// The watch on etcd broke (the reason); the known set is stale until `Restored`.
    Lost(String),
    /// etcd is reachable again; the `Added`/`Removed` diff against the known set follows.
    Restored,
}

/// Keeps the frontend's watch task alive; dropping it stops the task.
pub struct WatchHandle {
    task: JoinHandle<()>,
}

impl WatchHandle {
    /// A handle that follows nothing.
    pub fn idle() -> Self {
        WatchHandle {
            task: tokio::spawn(async {}),
        }
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lists the instances under `config.instance_prefix()` (an `Added` each) and then follows the
/// prefix. Fails with [`DiscoveryError::Connect`] when etcd does not answer within
/// `connect_timeout_secs`; after that, outages are reported in the stream (`Lost`, `Restored`).
/// The task ends when the receiver is dropped or the handle is.
pub async fn watch_instances(
    config: &DistributedConfig,
) -> Result<(mpsc::UnboundedReceiver<DiscoveryEvent>, WatchHandle), DiscoveryError> {
    let access = EtcdAccess::new(config);
    let (sink, events) = mpsc::unbounded_channel();
    let mut watcher = Watcher {
        access: access.clone(),
        prefix: config.instance_prefix(),
        sink,
        known: HashMap::new(),
    };
    let listed = tokio::time::timeout(access.timeout, async {
        let mut client = access.connect().await?;
        let listing = watcher.list(&mut client).await?;
        Ok::<_, DiscoveryError>((client, listing))
    })
    .await;
    let (client, (instances, revision)) = match listed {
        Ok(result) => result?,
        Err(_) => {
            return Err(access.unreachable(format!(
                "listing {} took over {:.1} s",
                config.instance_prefix(),
                access.timeout.as_secs_f64()
            )))
        }
    };
    watcher.apply_listing(instances);
    let task = tokio::spawn(watcher.run(client, revision));
    Ok((events, WatchHandle { task }))
}

/// Why following the prefix stopped.
enum WatchStop {
    /// Nobody listens any more.
    SinkClosed,
    /// etcd went away (the reason).
    Lost(String),
    /// The start revision was compacted away: re-list (no outage to report).
    Compacted,
}

/// The frontend's watch task state.
struct Watcher {
    access: EtcdAccess,
    prefix: String,
    sink: mpsc::UnboundedSender<DiscoveryEvent>,
    /// What consumers have been told is alive, to diff against after an outage.
    known: HashMap<u64, Instance>,
}

impl Watcher {
    async fn run(mut self, mut client: Client, mut revision: i64) {
        loop {
            let mut lost = match self.follow(&mut client, revision).await {
                WatchStop::SinkClosed => return,
                WatchStop::Compacted => false,
                WatchStop::Lost(reason) => {
                    if !self.report_lost(reason) {
                        return;
                    }
                    true
                }
            };
            loop {
                if lost {
                    tokio::time::sleep(RETRY_INTERVAL).await;
                }
                if self.sink.is_closed() {
                    return;
                }
                let relisted = async {
                    let mut client = self.access.connect().await?;
                    let listing = self.list(&mut client).await?;
                    Ok::<_, DiscoveryError>((client, listing))
                }
                .await;
                match relisted {
                    Ok((fresh, (instances, listed_at))) => {
                        client = fresh;
                        revision = listed_at;
                        if lost {
                            tracing::info!(prefix = %self.prefix, "etcd watch restored");
                            if self.sink.send(DiscoveryEvent::Restored).is_err() {
                                return;
                            }
                        }
                        self.apply_listing(instances);
                        break;
                    }
                    Err(e) if lost => {
                        tracing::debug!(prefix = %self.prefix, "etcd still unreachable: {e}");
                    }
                    Err(e) => {
                        // The re-list after a compaction failed: an outage after all.
                        if !self.report_lost(e.to_string()) {
                            return;
                        }
                        lost = true;
                    }
                }
            }
        }
    }

    /// Logs and emits `Lost`; false when nobody listens any more.
    fn report_lost(&self, reason: String) -> bool {
        tracing::warn!(
            prefix = %self.prefix,
            "lost the etcd watch, retrying every {} ms: {reason}",
            RETRY_INTERVAL.as_millis()
        );
        self.sink.send(DiscoveryEvent::Lost(reason)).is_ok()
    }

    /// The valid records under the prefix and the revision of the listing.
    async fn list(
        &self,
        client: &mut Client,
    ) -> Result<(HashMap<u64, Instance>, i64), DiscoveryError> {
        let listing = self
            .access
            .call(
                "list",
                &self.prefix,
                client.get_prefix(self.prefix.as_str()),
            )
            .await?;
        let revision = listing.header.as_ref().map_or(0, |h| h.revision);
        let mut instances = HashMap::new();
        for kv in &listing.kvs {
            match parse_record(&self.prefix, &kv.key, &kv.value) {
                Ok(instance) => {
                    instances.insert(instance.instance_id, instance);
                }
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "skipping discovery record: {e}")
                }
            }
        }
        Ok((instances, revision))
    }

    /// Tells consumers the difference between what they know and a fresh listing.
    fn apply_listing(&mut self, instances: HashMap<u64, Instance>) {
        let mut gone: Vec<u64> = self
            .known
            .keys()
            .filter(|id| !instances.contains_key(id))
            .copied()
            .collect();
        gone.sort_unstable();
        for id in gone {
            let _ = self.sink.send(DiscoveryEvent::Removed(id));
        }
        let mut fresh: Vec<&Instance> = instances
            .values()
            .filter(|instance| self.known.get(&instance.instance_id) != Some(*instance))
            .collect();
        fresh.sort_unstable_by_key(|instance| instance.instance_id);
        for instance in fresh {
            let _ = self
                .sink
                .send(DiscoveryEvent::Added(Box::new(instance.clone())));
        }
        self.known = instances;
    }

    /// Watches the prefix from `revision + 1` until the watch breaks or nobody listens.
    async fn follow(&mut self, client: &mut Client, revision: i64) -> WatchStop {
        let opened = self
            .access
            .call(
                "watch",
                &self.prefix,
                client.watch_prefix(self.prefix.as_str(), revision.saturating_add(1)),
            )
            .await;
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(e) => return WatchStop::Lost(e.to_string()),
        };
        loop {
            let message = tokio::select! {
                _ = self.sink.closed() => return WatchStop::SinkClosed,
                message = stream.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => {
                    return WatchStop::Lost(format!("etcd closed the watch on {}", self.prefix))
                }
                Err(e) => return WatchStop::Lost(format!("watch on {}: {e}", self.prefix)),
            };
            if response.canceled {
                if response.compact_revision > 0 {
                    tracing::info!(
                        prefix = %self.prefix,
                        compact_revision = response.compact_revision,
                        "etcd compacted past the watch revision; re-listing"
                    );
                    return WatchStop::Compacted;
                }
                return WatchStop::Lost(format!(
                    "etcd cancelled the watch on {}: {}",
                    self.prefix, response.cancel_reason
                ));
            }
            // The first message is the `created` confirmation, with no events.
            for event in &response.events {
                let Some(kv) = event.kv.as_ref() else {
                    continue;
                };
                let key = String::from_utf8_lossy(&kv.key);
                let id = instance_id_of_key(&self.prefix, &kv.key);
                // An event type this client does not know (a newer etcd) is neither put nor delete.
                let Ok(event_type) = EventType::try_from(event.r#type) else {
                    tracing::warn!(key = %key, event_type = event.r#type, "ignoring unknown etcd event type");
                    continue;
                };
                let update = match event_type {
                    EventType::Put => match parse_record(&self.prefix, &kv.key, &kv.value) {
                        Ok(instance) => {
                            self.known.insert(instance.instance_id, instance.clone());
                            Some(DiscoveryEvent::Added(Box::new(instance)))
                        }
                        Err(e) => {
                            tracing::warn!(key = %key, "skipping discovery record: {e}");
                            // A record that turned bad no longer describes a routable instance.
                            id.ok()
                                .and_then(|id| self.known.remove(&id).map(|_| id))
                                .map(DiscoveryEvent::Removed)
                        }
                    },
                    EventType::Delete => match id {
                        Ok(id) => {
                            self.known.remove(&id);
                            Some(DiscoveryEvent::Removed(id))
                        }
                        Err(e) => {
                            tracing::warn!(key = %key, "ignoring deleted discovery key: {e}");
                            None
                        }
                    },
                };
                if let Some(update) = update {
                    if self.sink.send(update).is_err() {
                        return WatchStop::SinkClosed;
                    }
                }
            }
        }
    }
}

/// Why a key or value under the instance prefix is not an instance's record.
#[derive(Debug, thiserror::Error)]
enum RecordError {
    /// The key is not UTF-8.
    #[error("key is not UTF-8: {0}")]
    KeyNotUtf8(#[source] std::str::Utf8Error),
    /// The key does not start with the watched prefix.
    #[error("key is not under {prefix}")]
    OutsidePrefix {
        /// The watched prefix.
        prefix: String,
    },
    /// The part after the prefix is not a hex id.
    #[error("key suffix {suffix:?} is not a hex instance id: {source}")]
    BadInstanceId {
        /// The part after the prefix.
        suffix: String,
        /// The parser's error.
        source: std::num::ParseIntError,
    },
    /// The value is not the JSON of an [`Instance`].
    #[error("value is not an instance record: {0}")]
    NotAnInstance(#[source] serde_json::Error),
    /// The record names another instance than its key.
    #[error("record says instance_id {record:x} but the key says {key:x}")]
    IdMismatch {
        /// The id in the record.
        record: u64,
        /// The id in the key.
        key: u64,
    },
}

/// The instance id in a key: the hex suffix after the prefix.
fn instance_id_of_key(prefix: &str, key: &[u8]) -> Result<u64, RecordError> {
    let key = std::str::from_utf8(key).map_err(RecordError::KeyNotUtf8)?;
    let suffix = key
        .strip_prefix(prefix)
        .ok_or_else(|| RecordError::OutsidePrefix {
            prefix: prefix.into(),
        })?;
    u64::from_str_radix(suffix, 16).map_err(|source| RecordError::BadInstanceId {
        suffix: suffix.into(),
        source,
    })
}

/// A record under the prefix: its JSON must be an [`Instance`] whose id matches the key.
fn parse_record(prefix: &str, key: &[u8], value: &[u8]) -> Result<Instance, RecordError> {
    let id = instance_id_of_key(prefix, key)?;
    let instance: Instance = serde_json::from_slice(value).map_err(RecordError::NotAnInstance)?;
    if instance.instance_id != id {
        return Err(RecordError::IdMismatch {
            record: instance.instance_id,
            key: id,
        });
    }
    Ok(instance)
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn bad_keys_and_records_are_named() {
        let prefix = "v1/instances/ns/comp/ep/";
        let error = |key: &str, value: &[u8]| {
            parse_record(prefix, key.as_bytes(), value)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error("v1/other/1", b"{}"),
            format!("key is not under {prefix}")
        );
        assert!(error(&format!("{prefix}xyz"), b"{}")
            .starts_with("key suffix \"xyz\" is not a hex instance id: "));
        assert!(
            error(&format!("{prefix}1f"), b"[]").starts_with("value is not an instance record: ")
        );
        let record =
            Instance::endpoint("ns", "comp", "ep", 0x2a, "127.0.0.1:1", Default::default());
        let value = serde_json::to_vec(&record).unwrap();
        assert_eq!(
            error(&format!("{prefix}1f"), &value),
            "record says instance_id 2a but the key says 1f"
        );
        assert_eq!(
            parse_record(prefix, format!("{prefix}2a").as_bytes(), &value).unwrap(),
            record
        );
    }
}
