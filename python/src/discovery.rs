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
    ) -> Result<EtcdStore, String> {
        let options = etcd::ConnectOptions {
            connect_timeout,
            ..etcd::ConnectOptions::default()
        };
        let listed = endpoints.join(",");
        let attempt = async {
            let mut client = Client::connect(endpoints, &options)
                .await
                .map_err(|e| format!("cannot connect to etcd at {listed}: {e}"))?;
            let lease = client
                .lease_grant(ttl)
                .await
                .map_err(|e| format!("etcd at {listed} refused a lease: {e}"))?
                .id;
            Ok::<_, String>((client, lease))
        };
        let (client, lease) = tokio::time::timeout(connect_timeout, attempt)
            .await
            .map_err(|_| {
                format!(
                    "cannot connect to etcd at {listed}: no answer within {:.1} s",
                    connect_timeout.as_secs_f64()
                )
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
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<(), String> {
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
                .map_err(|e| format!("etcd put {key}: {e}")),
        }
    }

    /// Delete `key`.
    pub async fn delete(&self, key: &str) -> Result<(), String> {
        match self {
            Store::Mem(store) => {
                store.delete(key);
                Ok(())
            }
            Store::Etcd(store) => store
                .client
                .clone()
                .delete(key)
                .await
                .map(drop)
                .map_err(|e| format!("etcd delete {key}: {e}")),
        }
    }

    /// Follow the keys under `prefix`; on etcd the first listing is in before this returns.
    pub async fn watch(&self, prefix: &str) -> Result<KeyWatch, String> {
        match self {
            Store::Mem(store) => Ok(store.watch(prefix)),
            Store::Etcd(store) => {
                dynamix_wire::watch::watch_prefix(
                    store.client.clone(),
                    prefix,
                    Duration::from_secs(10),
                )
                .await
            }
        }
    }

    /// Revoke the lease (etcd: every key of the process goes at once).
    pub async fn revoke(&self) -> Result<(), String> {
        match self {
            Store::Mem(_) => Ok(()),
            Store::Etcd(store) => {
                store.renewal.abort();
                store
                    .client
                    .clone()
                    .lease_revoke(store.lease())
                    .await
                    .map_err(|e| format!("etcd lease revoke: {e}"))
            }
        }
    }
}
