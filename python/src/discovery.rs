//! Where a process's instances and model cards live (python-sdk spec §2.1, §3): etcd, every key
//! attached to the process's primary lease (its id is the instance id), or `mem`, one map per
//! process, where served handlers are called in-process.
//!
//! A [`KeyWatch`] follows the keys under a prefix and keeps the current set; both backends feed it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dynamix_wire::endpoint::Handler;
use dynamix_wire::etcd::{self, Client};
pub use dynamix_wire::watch::KeyWatch;
use tokio::sync::watch;

/// How long a failed etcd watch waits before re-listing.
const RETRY: Duration = Duration::from_secs(1);

/// Why the etcd store could not connect or change a key. (Display by hand: this crate does not
/// depend on thiserror.)
#[derive(Debug)]
pub enum StoreError {
    /// No endpoint answered.
    Connect {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The client's error.
        source: etcd::Error,
    },
    /// Connecting and granting the lease took longer than the connect timeout.
    ConnectTimeout {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The connect timeout.
        timeout: Duration,
    },
    /// etcd did not grant the primary lease.
    Lease {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// etcd's error.
        source: etcd::Error,
    },
    /// A put failed.
    Put {
        /// The key.
        key: String,
        /// etcd's error.
        source: etcd::Error,
    },
    /// A delete failed.
    Delete {
        /// The key.
        key: String,
        /// etcd's error.
        source: etcd::Error,
    },
    /// The first listing of a prefix did not come in (the text names the prefix).
    Watch {
        /// The prefix.
        prefix: String,
        /// Why [`dynamix_wire::watch::watch_prefix`] failed.
        source: dynamix_wire::watch::WatchError,
    },
    /// Revoking the primary lease failed.
    Revoke(etcd::Error),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Connect { endpoints, source } => {
                write!(f, "cannot connect to etcd at {endpoints}: {source}")
            }
            StoreError::ConnectTimeout { endpoints, timeout } => write!(
                f,
                "cannot connect to etcd at {endpoints}: no answer within {:.1} s",
                timeout.as_secs_f64()
            ),
            StoreError::Lease { endpoints, source } => {
                write!(f, "etcd at {endpoints} refused a lease: {source}")
            }
            StoreError::Put { key, source } => write!(f, "etcd put {key}: {source}"),
            StoreError::Delete { key, source } => write!(f, "etcd delete {key}: {source}"),
            StoreError::Watch { source, .. } => write!(f, "{source}"),
            StoreError::Revoke(source) => write!(f, "etcd lease revoke: {source}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Connect { source, .. }
            | StoreError::Lease { source, .. }
            | StoreError::Put { source, .. }
            | StoreError::Delete { source, .. }
            | StoreError::Revoke(source) => Some(source),
            StoreError::Watch { source, .. } => Some(source),
            StoreError::ConnectTimeout { .. } => None,
        }
    }
}

/// The `mem` backend: one per process.
#[derive(Default)]
pub struct MemStore {
    keys: Mutex<BTreeMap<String, Vec<u8>>>,
    version: Mutex<Option<watch::Sender<u64>>>,
    /// Handlers served in this process, by endpoint path.
    pub handlers: Mutex<HashMap<String, Arc<dyn Handler>>>,
}

impl MemStore {
    /// The process's store.
    pub fn global() -> Arc<MemStore> {
        static STORE: OnceLock<Arc<MemStore>> = OnceLock::new();
        STORE.get_or_init(Arc::default).clone()
    }

    fn sender(&self) -> watch::Sender<u64> {
        let mut version = self.version.lock().unwrap_or_else(|e| e.into_inner());
        version.get_or_insert_with(|| watch::channel(0).0).clone()
    }

    fn changed(&self) {
        self.sender().send_modify(|v| *v += 1);
    }

    fn put(&self, key: &str, value: Vec<u8>) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.insert(key.to_string(), value);
        }
        self.changed();
    }

    fn delete(&self, key: &str) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.remove(key);
        }
        self.changed();
    }

    fn watch(self: &Arc<Self>, prefix: &str) -> KeyWatch {
        let keys = Arc::new(Mutex::new(BTreeMap::new()));
        let (tx, rx) = watch::channel(0u64);
        let mut source = self.sender().subscribe();
        let store = self.clone();
        let prefix = prefix.to_string();
        let mirror = keys.clone();
        let refresh = move || {
            let current: BTreeMap<String, Vec<u8>> = store
                .keys
                .lock()
                .map(|k| {
                    k.iter()
                        .filter(|(key, _)| key.starts_with(&prefix))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            if let Ok(mut keys) = mirror.lock() {
                *keys = current;
            }
            tx.send_modify(|v| *v += 1);
        };
        refresh();
        let task = tokio::spawn(async move {
            while source.changed().await.is_ok() {
                refresh();
            }
        });
        KeyWatch::from_parts(keys, rx, Some(task))
    }
}

/// The etcd backend: a connection and the process's primary lease, renewed in the background. When
/// etcd says the lease is gone (it expired while etcd or this process was unreachable, or someone
/// revoked it), the renewer grants a new one and announces it on [`EtcdStore::leases`]: the
/// runtime then registers everything again under the new id.
pub struct EtcdStore {
    client: Client,
    lease: Arc<std::sync::atomic::AtomicI64>,
    renewal: tokio::task::JoinHandle<()>,
    leases: watch::Receiver<i64>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.renewal.abort();
    }
}

impl EtcdStore {
    /// Connect to the first endpoint that answers, grant a lease of `ttl` seconds and keep it alive.
    pub async fn connect(
        endpoints: &[String],
        ttl: i64,
        connect_timeout: Duration,
    ) -> Result<EtcdStore, StoreError> {
        let options = etcd::ConnectOptions {
            connect_timeout,
            ..etcd::ConnectOptions::default()
        };
        let listed = endpoints.join(",");
        let attempt = async {
            let mut client = Client::connect(endpoints, &options)
                .await
                .map_err(|source| StoreError::Connect {
                    endpoints: listed.clone(),
                    source,
                })?;
            let lease = client
                .lease_grant(ttl)
                .await
                .map_err(|source| StoreError::Lease {
                    endpoints: listed.clone(),
                    source,
                })?
                .id;
            Ok((client, lease))
        };
        let (client, lease) = tokio::time::timeout(connect_timeout, attempt)
            .await
            .map_err(|_| StoreError::ConnectTimeout {
                endpoints: listed.clone(),
                timeout: connect_timeout,
            })??;
        let current = Arc::new(std::sync::atomic::AtomicI64::new(lease));
        let (announce, leases) = watch::channel(lease);
        let renewal = tokio::spawn(renew(
            client.clone(),
            Renewal {
                ttl,
                period: Duration::from_secs_f64((ttl as f64 / 3.0).max(0.5)),
                current: current.clone(),
                announce,
            },
        ));
        Ok(EtcdStore {
            client,
            lease: current,
            renewal,
            leases,
        })
    }

    /// The current lease id (the instance id).
    pub fn lease(&self) -> i64 {
        self.lease.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ticks with the new lease id whenever a lost lease was replaced.
    pub fn leases(&self) -> watch::Receiver<i64> {
        self.leases.clone()
    }
}

struct Renewal {
    ttl: i64,
    period: Duration,
    current: Arc<std::sync::atomic::AtomicI64>,
    announce: watch::Sender<i64>,
}

/// Keep-alives every `period`; reconnects the stream when it breaks; replaces a lost lease.
async fn renew(mut client: Client, renewal: Renewal) {
    let mut lease = renewal.current.load(std::sync::atomic::Ordering::SeqCst);
    loop {
        let (keeper, mut answers) = match client.lease_keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(
                    lease = format!("{lease:x}"),
                    "cannot renew the etcd lease: {e}"
                );
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        let mut gone = false;
        loop {
            match tokio::time::timeout(renewal.period * 2, answers.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl > 0 => {}
                Ok(Ok(Some(_))) => {
                    gone = true;
                    break;
                }
                _ => break,
            }
            tokio::time::sleep(renewal.period).await;
            if keeper.keep_alive().is_err() {
                break;
            }
        }
        if gone {
            tracing::error!(
                lease = format!("{lease:x}"),
                "the etcd lease is gone: this process's endpoints and models left discovery; registering them again under a new lease"
            );
            lease = loop {
                match client.lease_grant(renewal.ttl).await {
                    Ok(granted) => break granted.id,
                    Err(e) => {
                        tracing::warn!("cannot grant a new etcd lease: {e}");
                        tokio::time::sleep(RETRY).await;
                    }
                }
            };
            renewal
                .current
                .store(lease, std::sync::atomic::Ordering::SeqCst);
            let _ = renewal.announce.send(lease);
            continue;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Either backend.
pub enum Store {
    /// This process only.
    Mem(Arc<MemStore>),
    /// etcd.
    Etcd(Box<EtcdStore>),
}

impl Store {
    /// Put `key` (attached to the lease on etcd).
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        match self {
            Store::Mem(store) => {
                store.put(key, value);
                Ok(())
            }
            Store::Etcd(store) => store
                .client
                .clone()
                .put(key, value, store.lease())
                .await
                .map(drop)
                .map_err(|source| StoreError::Put {
                    key: key.into(),
                    source,
                }),
        }
    }

    /// Delete `key`.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Mem(store) => {
                store.delete(key);
                Ok(())
            }
            Store::Etcd(store) => {
                store
                    .client
                    .clone()
                    .delete(key)
                    .await
                    .map(drop)
                    .map_err(|source| StoreError::Delete {
                        key: key.into(),
                        source,
                    })
            }
        }
    }

    /// Follow the keys under `prefix`; on etcd the first listing is in before this returns.
    pub async fn watch(&self, prefix: &str) -> Result<KeyWatch, StoreError> {
        match self {
            Store::Mem(store) => Ok(store.watch(prefix)),
            Store::Etcd(store) => dynamix_wire::watch::watch_prefix(
                store.client.clone(),
                prefix,
                Duration::from_secs(10),
            )
            .await
            .map_err(|source| StoreError::Watch {
                prefix: prefix.into(),
                source,
            }),
        }
    }

    /// Revoke the lease (etcd: every key of the process goes at once).
    pub async fn revoke(&self) -> Result<(), StoreError> {
        match self {
            Store::Mem(_) => Ok(()),
            Store::Etcd(store) => {
                store.renewal.abort();
                store
                    .client
                    .clone()
                    .lease_revoke(store.lease())
                    .await
                    .map_err(StoreError::Revoke)
            }
        }
    }
}
