//! Where a process's instances and model cards live (python-sdk spec §2.1, §3): etcd, every key
//! attached to the process's primary lease (its id is the instance id), or `mem`, one map per
//! process, where served handlers are called in-process.
//!
//! A [`KeyWatch`] follows the keys under a prefix and keeps the current set; both backends feed it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dynamix_wire::endpoint::Handler;
use dynamix_wire::etcd::{self, Client, EventType};
use tokio::sync::watch;

/// How long a failed etcd watch waits before re-listing.
const RETRY: Duration = Duration::from_secs(1);

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
        KeyWatch {
            keys,
            changes: rx,
            task: Some(task),
        }
    }
}

/// The etcd backend: a connection and the process's primary lease, renewed in the background.
pub struct EtcdStore {
    client: Client,
    lease: i64,
    renewal: tokio::task::JoinHandle<()>,
    /// Set once etcd says the lease no longer exists.
    pub lease_lost: Arc<std::sync::atomic::AtomicBool>,
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
        let lease_lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renewal = tokio::spawn(renew(
            client.clone(),
            lease,
            Duration::from_secs_f64((ttl as f64 / 3.0).max(0.5)),
            lease_lost.clone(),
        ));
        Ok(EtcdStore {
            client,
            lease,
            renewal,
            lease_lost,
        })
    }

    /// The lease id (the instance id).
    pub fn lease(&self) -> i64 {
        self.lease
    }
}

/// Keep-alives every `period`; reconnects the stream when it breaks.
async fn renew(
    mut client: Client,
    lease: i64,
    period: Duration,
    lost: Arc<std::sync::atomic::AtomicBool>,
) {
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
        loop {
            match tokio::time::timeout(period * 2, answers.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl > 0 => {}
                Ok(Ok(Some(_))) => {
                    tracing::error!(
                        lease = format!("{lease:x}"),
                        "the etcd lease expired: this process's endpoints and models left discovery"
                    );
                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                _ => break,
            }
            tokio::time::sleep(period).await;
            if keeper.keep_alive().is_err() {
                break;
            }
        }
        tokio::time::sleep(RETRY).await;
    }
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
                .put(key, value, store.lease)
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
                let keys = Arc::new(Mutex::new(BTreeMap::new()));
                let (tx, mut rx) = watch::channel(0u64);
                let task = tokio::spawn(follow(
                    store.client.clone(),
                    prefix.to_string(),
                    keys.clone(),
                    tx,
                ));
                let watch = KeyWatch {
                    keys,
                    changes: rx.clone(),
                    task: Some(task),
                };
                // The first tick is the first listing.
                tokio::time::timeout(Duration::from_secs(10), rx.changed())
                    .await
                    .map_err(|_| format!("listing {prefix} in etcd took over 10 s"))?
                    .map_err(|_| format!("the watch of {prefix} stopped"))?;
                Ok(watch)
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
                    .lease_revoke(store.lease)
                    .await
                    .map_err(|e| format!("etcd lease revoke: {e}"))
            }
        }
    }
}
