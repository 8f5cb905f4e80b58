//! [`Runtime`]: one per process and backend (python-sdk spec §2): the store (etcd with its lease, or
//! `mem`), the TCP endpoint server (bound when the first endpoint is served), the calling client
//! (made on the first call), and the endpoints served now.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dynamix_wire::client::{Call, ClientSettings, EndpointClient};
use dynamix_wire::endpoint::{EndpointServer, EndpointState, Handler, Request, ServerSettings};
use dynamix_wire::mux::MuxSettings;
use dynamix_wire::record::{endpoint_path, Instance, Transport};
use dynamix_wire::PayloadCodec;
use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tokio::sync::OnceCell;

use crate::call::{CallStream, Source};
use crate::discovery::{EtcdStore, KeyWatch, MemStore, Store, StoreError};
use crate::serve::{to_json, Control, PyHandler};

mod watch;

pub use watch::InstanceWatch;

/// Limits and addresses (`DYN_TCP_*`, read by the Python layer).
#[derive(Clone, Debug)]
struct Settings {
    host: String,
    port: u16,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_message_size: usize,
    /// The client's multiplexed request plane (`None`: Dynamo's frames for every call).
    mux: Option<MuxSettings>,
}

/// `DYN_DISTRIBUTED__REQUEST_PLANE_PROTOCOL`, as the frontend reads it: `mux` (the default) calls
/// instances that advertise the multiplexed plane on it, `dynamo` calls every instance with
/// Dynamo's frame and call-home stream.
fn client_mux() -> PyResult<Option<MuxSettings>> {
    const KEY: &str = "DYN_DISTRIBUTED__REQUEST_PLANE_PROTOCOL";
    match std::env::var(KEY).ok().as_deref() {
        None | Some("mux") => Ok(Some(MuxSettings::default())),
        Some("dynamo") => Ok(None),
        Some(other) => Err(PyValueError::new_err(format!(
            "{KEY} = {other:?} must be mux or dynamo"
        ))),
    }
}

/// One endpoint this process serves.
struct Served {
    names: (String, String, String),
    state: Arc<EndpointState>,
}

/// A model card this process published: `(ns, comp, ep, lora slug)` → its record.
type Cards = BTreeMap<(String, String, String, Option<String>), serde_json::Value>;

struct Inner {
    store: Store,
    /// The lease id (etcd), which changes when a lost lease is replaced.
    instance_id: std::sync::atomic::AtomicU64,
    settings: Settings,
    server: OnceCell<Arc<EndpointServer>>,
    client: OnceCell<Arc<EndpointClient>>,
    /// Endpoints by `ns/comp/ep`.
    served: Mutex<HashMap<String, Served>>,
    /// Model cards, kept to publish them again under a new lease.
    cards: Mutex<Cards>,
}

fn runtime_error(e: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

/// A discovery-store failure as Python's `ConnectionError`.
fn connection_error(e: StoreError) -> PyErr {
    PyConnectionError::new_err(e.to_string())
}

impl Inner {
    fn is_mem(&self) -> bool {
        matches!(self.store, Store::Mem(_))
    }

    fn id(&self) -> u64 {
        self.instance_id.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn path(&self, ns: &str, comp: &str, ep: &str) -> String {
        endpoint_path(self.id(), ns, comp, ep)
    }

    /// The key and value of a card under the current id.
    fn card_entry(
        &self,
        (ns, comp, ep, suffix): &(String, String, String, Option<String>),
        record: &serde_json::Value,
    ) -> (String, Vec<u8>) {
        let id = self.id();
        let mut key = format!("v1/mdc/{ns}/{comp}/{ep}/{id:x}");
        if let Some(suffix) = suffix {
            key = format!("{key}/{suffix}");
        }
        let mut record = record.clone();
        if let Some(map) = record.as_object_mut() {
            map.insert("instance_id".into(), serde_json::json!(id));
        }
        (key, serde_json::to_vec(&record).unwrap_or_default())
    }

    /// A new lease replaced a lost one: serve every endpoint under the new id, and publish its
    /// records and every card again.
    async fn relocate(&self, new_id: u64) {
        let old_id = self
            .instance_id
            .swap(new_id, std::sync::atomic::Ordering::SeqCst);
        if old_id == new_id {
            return;
        }
        let names: Vec<(String, String, String)> = self
            .served
            .lock()
            .map(|s| s.values().map(|v| v.names.clone()).collect())
            .unwrap_or_default();
        for (ns, comp, ep) in &names {
            if let Some(server) = self.server.get() {
                let old = endpoint_path(old_id, ns, comp, ep);
                if let Err(e) = server.rename(&old, &self.path(ns, comp, ep)) {
                    tracing::error!("cannot move {ns}.{comp}.{ep} to the new lease: {e}");
                }
            }
            if let Err(e) = self.publish(ns, comp, ep).await {
                tracing::error!("cannot register {ns}.{comp}.{ep} again: {e}");
            }
        }
        let cards: Vec<(String, Vec<u8>)> = self
            .cards
            .lock()
            .map(|c| c.iter().map(|(k, v)| self.card_entry(k, v)).collect())
            .unwrap_or_default();
        for (key, value) in cards {
            if let Err(e) = self.store.put(&key, value).await {
                tracing::error!("cannot publish the model card {key} again: {e}");
            }
        }
        tracing::info!(
            old = format!("{old_id:x}"),
            new = format!("{new_id:x}"),
            endpoints = names.len(),
            "registered again under a new etcd lease"
        );
    }

    async fn server(&self) -> PyResult<Arc<EndpointServer>> {
        self.server
            .get_or_try_init(|| async {
                EndpointServer::bind(
                    &self.settings.host,
                    self.settings.port,
                    ServerSettings {
                        max_message_size: self.settings.max_message_size,
                        connect_timeout: self.settings.connect_timeout,
                        mux: Default::default(),
                    },
                )
                .await
                .map_err(|e| {
                    PyConnectionError::new_err(format!(
                        "cannot listen on {}:{} (DYN_TCP_RPC_HOST, DYN_DISTRIBUTED__REQUEST_PLANE_PORT): {e}",
                        self.settings.host, self.settings.port
                    ))
                })
            })
            .await
            .cloned()
    }

    async fn client(&self) -> PyResult<Arc<EndpointClient>> {
        self.client
            .get_or_try_init(|| async {
                EndpointClient::new(
                    &self.settings.host,
                    ClientSettings {
                        request_timeout: self.settings.request_timeout,
                        connect_timeout: self.settings.connect_timeout,
                        max_message_size: self.settings.max_message_size,
                        mux: self.settings.mux.clone(),
                    },
                )
                .await
                .map(Arc::new)
                .map_err(|e| {
                    PyConnectionError::new_err(format!(
                        "cannot listen for response streams on {}: {e}",
                        self.settings.host
                    ))
                })
            })
            .await
            .cloned()
    }

    /// The instance record of this process's `ns.comp.ep`.
    async fn record(&self, ns: &str, comp: &str, ep: &str) -> PyResult<Instance> {
        let path = self.path(ns, comp, ep);
        let address = if self.is_mem() {
            "mem:0".to_string()
        } else {
            self.server().await?.address()
        };
        Ok(Instance {
            kind: Some("Endpoint".into()),
            component: comp.into(),
            endpoint: ep.into(),
            namespace: ns.into(),
            instance_id: self.id(),
            transport: Transport::Tcp(format!("{address}/{path}")),
            device_type: None,
            request_plane_codec: Some(PayloadCodec::Json.name().into()),
            engine: None,
            kv_block_size: None,
            capacity: None,
            mux: Some(dynamix_wire::mux::VERSION),
        })
    }

    fn instance_key(&self, ns: &str, comp: &str, ep: &str) -> String {
        format!("v1/instances/{ns}/{comp}/{ep}/{:x}", self.id())
    }

    async fn publish(&self, ns: &str, comp: &str, ep: &str) -> PyResult<()> {
        let record = self.record(ns, comp, ep).await?;
        let value = serde_json::to_vec(&record).map_err(runtime_error)?;
        self.store
            .put(&self.instance_key(ns, comp, ep), value)
            .await
            .map_err(connection_error)
    }
}

/// Whether a NATS server answers at `urls` (`NATS_SERVER`: `nats://host:port`, comma-separated;
/// the first that answers wins): it greets every client with an `INFO {...}` line. The SDK
/// publishes nothing on NATS yet; this only makes a wrong address fail at start, naming it.
fn nats_reachable(urls: &str, timeout: Duration) -> Result<(), String> {
    use std::io::Read;
    use std::net::ToSocketAddrs;
    let mut failures = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let address = if rest.contains(':') {
            rest.to_string()
        } else {
            format!("{rest}:4222")
        };
        let attempt = (|| {
            let addr = address
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve it: {e}"))?
                .next()
                .ok_or("it resolves to no address")?;
            let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
                .map_err(|e| format!("cannot connect: {e}"))?;
            stream
                .set_read_timeout(Some(timeout))
                .map_err(|e| e.to_string())?;
            let mut greeting = [0u8; 5];
            stream
                .read_exact(&mut greeting)
                .map_err(|e| format!("no greeting: {e}"))?;
            if &greeting == b"INFO " {
                Ok(())
            } else {
                Err("it is not a NATS server (no INFO greeting)".to_string())
            }
        })();
        match attempt {
            Ok(()) => return Ok(()),
            Err(e) => failures.push(format!("{url}: {e}")),
        }
    }
    Err(format!(
        "cannot reach NATS at NATS_SERVER ({})",
        failures.join("; ")
    ))
}

/// The process's connection to its deployment.
#[pyclass(frozen, module = "dynamix._core")]
pub struct Runtime {
    inner: Arc<Inner>,
}

#[pymethods]
impl Runtime {
    /// Connect (`etcd`: to the first endpoint that answers, and grant the primary lease) or set up
    /// the process-local store (`mem`). Blocks, without the GIL, for at most the connect timeout.
    #[new]
    #[pyo3(signature = (backend, etcd_endpoints, host, port, lease_ttl_secs, connect_timeout_secs, request_timeout_secs, max_message_size, nats_server=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        backend: &str,
        etcd_endpoints: Vec<String>,
        host: String,
        port: u16,
        lease_ttl_secs: i64,
        connect_timeout_secs: f64,
        request_timeout_secs: f64,
        max_message_size: usize,
        nats_server: Option<String>,
    ) -> PyResult<Self> {
        let seconds = |name: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(PyValueError::new_err(format!(
                    "{name} = {value} must be a positive number of seconds"
                )))
            }
        };
        let settings = Settings {
            host,
            port,
            connect_timeout: seconds("DYN_TCP_CONNECT_TIMEOUT", connect_timeout_secs)?,
            request_timeout: seconds("DYN_TCP_REQUEST_TIMEOUT", request_timeout_secs)?,
            max_message_size,
            mux: client_mux()?,
        };
        if lease_ttl_secs < 2 {
            return Err(PyValueError::new_err(format!(
                "DYN_DISTRIBUTED__LEASE_TTL_SECS = {lease_ttl_secs} must be at least 2 seconds"
            )));
        }
        let (store, instance_id) = match backend {
            "mem" => {
                // Positive and below 2^63, like an etcd lease id.
                let id = rand::random::<u64>() >> 1 | 1;
                (Store::Mem(MemStore::global()), id)
            }
            "etcd" => {
                let connect_timeout = settings.connect_timeout;
                let store = py.detach(|| {
                    pyo3_async_runtimes::tokio::get_runtime().block_on(EtcdStore::connect(
                        &etcd_endpoints,
                        lease_ttl_secs,
                        connect_timeout,
                    ))
                });
                let store = store.map_err(connection_error)?;
                if let Some(url) = nats_server.as_deref().filter(|u| !u.trim().is_empty()) {
                    py.detach(|| nats_reachable(url, connect_timeout))
                        .map_err(PyConnectionError::new_err)?;
                }
                let id = store.lease() as u64;
                (Store::Etcd(Box::new(store)), id)
            }
            other => {
                return Err(PyValueError::new_err(format!(
                    "discovery backend {other:?} is not supported (etcd or mem)"
                )))
            }
        };
        let inner = Arc::new(Inner {
            store,
            instance_id: std::sync::atomic::AtomicU64::new(instance_id),
            settings,
            server: OnceCell::new(),
            client: OnceCell::new(),
            served: Mutex::default(),
            cards: Mutex::default(),
        });
        if let Store::Etcd(store) = &inner.store {
            let mut leases = store.leases();
            let weak = Arc::downgrade(&inner);
            pyo3_async_runtimes::tokio::get_runtime().spawn(async move {
                while leases.changed().await.is_ok() {
                    let id = *leases.borrow_and_update() as u64;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.relocate(id).await;
                }
            });
        }
        Ok(Runtime { inner })
    }

    /// This process's instance id (the lease id on etcd).
    #[getter]
    fn instance_id(&self) -> u64 {
        self.inner.id()
    }

    /// Awaitable: serve `ns.comp.ep` with `dispatch(id, body, headers, metadata, control, sink)` and
    /// publish its instance record. `RuntimeError` if this process serves it already.
    fn serve<'py>(
        &self,
        py: Python<'py>,
        ns: String,
        comp: String,
        ep: String,
        dispatch: Py<PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let key = format!("{ns}/{comp}/{ep}");
            let path = inner.path(&ns, &comp, &ep);
            let handler: Arc<dyn Handler> = Arc::new(PyHandler {
                dispatch: Arc::new(dispatch),
            });
            let state = match &inner.store {
                Store::Mem(store) => {
                    let mut handlers = store.handlers.lock().map_err(runtime_error)?;
                    if handlers.contains_key(&path) {
                        return Err(PyRuntimeError::new_err(format!(
                            "endpoint {ns}.{comp}.{ep} is already served by this process"
                        )));
                    }
                    handlers.insert(path.clone(), handler);
                    Arc::new(EndpointState::default())
                }
                Store::Etcd(_) => inner
                    .server()
                    .await?
                    .register(&path, handler)
                    .map_err(|_| {
                        PyRuntimeError::new_err(format!(
                            "endpoint {ns}.{comp}.{ep} is already served by this process"
                        ))
                    })?,
            };
            inner.served.lock().map_err(runtime_error)?.insert(
                key,
                Served {
                    names: (ns.clone(), comp.clone(), ep.clone()),
                    state,
                },
            );
            inner.publish(&ns, &comp, &ep).await
        })
    }

    /// Awaitable: put this instance of `ns.comp.ep` back in discovery.
    fn register_instance<'py>(
        &self,
        py: Python<'py>,
        ns: String,
        comp: String,
        ep: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            inner.publish(&ns, &comp, &ep).await
        })
    }

    /// Awaitable: take this instance of `ns.comp.ep` out of discovery (routing stops; running
    /// requests go on).
    fn unregister_instance<'py>(
        &self,
        py: Python<'py>,
        ns: String,
        comp: String,
        ep: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            inner
                .store
                .delete(&inner.instance_key(&ns, &comp, &ep))
                .await
                .map_err(connection_error)
        })
    }

    /// Awaitable: stop serving `ns.comp.ep`: refuse new requests, wait for running ones when
    /// `wait` (at most `timeout` seconds; `None`: no limit), then forget the handler. Resolves to
    /// the number of requests still running.
    #[pyo3(signature = (ns, comp, ep, wait, timeout=None))]
    fn stop_serving<'py>(
        &self,
        py: Python<'py>,
        ns: String,
        comp: String,
        ep: String,
        wait: bool,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let key = format!("{ns}/{comp}/{ep}");
            let path = inner.path(&ns, &comp, &ep);
            let served = inner.served.lock().map_err(runtime_error)?.remove(&key);
            let Some(Served { state, .. }) = served else {
                return Ok(0);
            };
            state.drain();
            if wait {
                state
                    .wait_idle(timeout.map(|t| Duration::from_secs_f64(t.max(0.0))))
                    .await;
            }
            match &inner.store {
                Store::Mem(store) => {
                    store.handlers.lock().map_err(runtime_error)?.remove(&path);
                }
                Store::Etcd(_) => {
                    if let Some(server) = inner.server.get() {
                        server.unregister(&path);
                    }
                }
            }
            Ok(state.inflight())
        })
    }

    /// Awaitable: publish a model card for this instance of `ns.comp.ep` (`suffix`: an adapter's
    /// slug), with the current instance id in its key and record; kept, so it is published again
    /// under a new lease.
    #[pyo3(signature = (ns, comp, ep, suffix, record))]
    fn put_card<'py>(
        &self,
        py: Python<'py>,
        ns: String,
        comp: String,
        ep: String,
        suffix: Option<String>,
        record: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let record = to_json(record, "the model card is")?;
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let slot = (ns, comp, ep, suffix);
            let (key, value) = inner.card_entry(&slot, &record);
            inner
                .cards
                .lock()
                .map_err(runtime_error)?
                .insert(slot, record);
            inner
                .store
                .put(&key, value)
                .await
                .map_err(connection_error)?;
            Ok(key)
        })
    }

    /// Awaitable: delete this instance's card for `ns.comp.ep` (and `suffix`).
    #[pyo3(signature = (ns, comp, ep, suffix))]
    fn delete_card<'py>(
        &self,
        py: Python<'py>,
        ns: String,
        comp: String,
        ep: String,
        suffix: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let slot = (ns, comp, ep, suffix);
            let (key, _) = inner.card_entry(&slot, &serde_json::Value::Null);
            inner.cards.lock().map_err(runtime_error)?.remove(&slot);
            inner.store.delete(&key).await.map_err(connection_error)
        })
    }

    /// Awaitable: an [`InstanceWatch`] of `ns.comp.ep`.
    fn watch<'py>(
        &self,
        py: Python<'py>,
        ns: String,
        comp: String,
        ep: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let prefix = format!("v1/instances/{ns}/{comp}/{ep}/");
            let keys = inner.store.watch(&prefix).await.map_err(connection_error)?;
            Ok(InstanceWatch {
                inner,
                keys,
                name: format!("{ns}/{comp}/{ep}"),
            })
        })
    }

    /// Revoke the lease, blocking without the GIL (at most the connect timeout). Used last before
    /// a process exits: an awaitable completed by a background thread could still be handing its
    /// result to Python when the interpreter starts finalizing.
    fn revoke_blocking(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner.clone();
        let timeout = inner.settings.connect_timeout;
        py.detach(|| {
            pyo3_async_runtimes::tokio::get_runtime().block_on(async move {
                match tokio::time::timeout(timeout, inner.store.revoke()).await {
                    Ok(result) => result.map_err(connection_error),
                    Err(_) => Err(PyConnectionError::new_err(format!(
                        "revoking the etcd lease took over {:.1} s",
                        timeout.as_secs_f64()
                    ))),
                }
            })
        })
    }
}
