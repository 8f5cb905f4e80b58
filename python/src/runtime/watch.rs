//! [`InstanceWatch`]: the live instances of one endpoint (from etcd or `mem`), and calls to them
//! by round robin, at random or to one instance.

use super::*;

/// The live instances of one endpoint, and calls to them.
#[pyclass(frozen, module = "dynamix._core")]
pub struct InstanceWatch {
    pub(super) inner: Arc<Inner>,
    pub(super) keys: KeyWatch,
    /// `ns/comp/ep`.
    pub(super) name: String,
}

impl InstanceWatch {
    fn instances(&self) -> BTreeMap<u64, Instance> {
        self.keys
            .snapshot()
            .into_iter()
            .filter_map(|(key, value)| match serde_json::from_slice::<Instance>(&value) {
                Ok(instance) => Some((instance.instance_id, instance)),
                Err(e) => {
                    tracing::warn!(%key, "skipping an instance record that does not parse: {e}");
                    None
                }
            })
            .collect()
    }
}

#[pymethods]
impl InstanceWatch {
    /// The instance ids now, sorted.
    fn ids(&self) -> Vec<u64> {
        self.instances().into_keys().collect()
    }

    /// Awaitable: the ids as soon as there is at least one.
    fn wait_for_instances<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let mut changes = self.keys.changes();
        let ids = self.ids();
        let watch = InstanceIds {
            keys: self.keys.snapshot_handle(),
        };
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            if !ids.is_empty() {
                return Ok(ids);
            }
            loop {
                if changes.changed().await.is_err() {
                    return Err(PyRuntimeError::new_err("the instance watch stopped"));
                }
                let ids = watch.ids();
                if !ids.is_empty() {
                    return Ok(ids);
                }
            }
        })
    }

    /// Awaitable: call `instance_id` with `body`; resolves to a [`CallStream`] once the instance
    /// accepted the request. `control` is the caller's context (stopping it stops the call).
    #[pyo3(signature = (instance_id, body, request_id, headers, control=None))]
    fn call<'py>(
        &self,
        py: Python<'py>,
        instance_id: u64,
        body: &Bound<'py, PyAny>,
        request_id: String,
        headers: BTreeMap<String, String>,
        control: Option<&Bound<'py, Control>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let body = to_json(body, "the request is")?;
        let instance = self.instances().remove(&instance_id).ok_or_else(|| {
            PyValueError::new_err(format!(
                "Unavailable: instance_id={instance_id} not found for endpoint {}",
                self.name
            ))
        })?;
        let given = control.is_some();
        let control = control.map(|c| c.get().inner.clone()).unwrap_or_default();
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let source = match &inner.store {
                Store::Mem(store) => {
                    let path = endpoint_path(
                        instance_id,
                        &instance.namespace,
                        &instance.component,
                        &instance.endpoint,
                    );
                    let handler = store
                        .handlers
                        .lock()
                        .map_err(runtime_error)?
                        .get(&path)
                        .cloned()
                        .ok_or_else(|| {
                            PyValueError::new_err(format!(
                                "Unavailable: instance {instance_id:x} no longer serves {path}"
                            ))
                        })?;
                    let replies = handler.call(Request {
                        id: request_id,
                        body,
                        headers,
                        metadata: None,
                        control: control.clone(),
                    });
                    Source::Local {
                        replies,
                        control,
                        done: false,
                    }
                }
                Store::Etcd(_) => {
                    let target = instance
                        .tcp_target()
                        .map_err(|e| PyValueError::new_err(format!("Unavailable: {e}")))?;
                    let client = inner.client().await?;
                    let stream = client
                        .call(Call {
                            target: &target,
                            codec: instance.codec(),
                            id: &request_id,
                            body: &body,
                            headers,
                            mux: instance.speaks_mux(),
                        })
                        .await
                        .map_err(|e| PyValueError::new_err(e.to_string()))?;
                    if given {
                        // The caller's context: its stop reaches the worker until the stream ends.
                        let stop = stream.control();
                        tokio::spawn(async move {
                            loop {
                                tokio::select! {
                                    _ = control.stopped() => break,
                                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                                        if stop.is_done() {
                                            return;
                                        }
                                    }
                                }
                            }
                            if control.is_killed() {
                                stop.kill().await
                            } else {
                                stop.stop().await
                            }
                        });
                    }
                    Source::Remote(stream)
                }
            };
            Ok(CallStream::new(source))
        })
    }
}

/// The ids of a watch, readable from a task.
struct InstanceIds {
    keys: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
}

impl InstanceIds {
    fn ids(&self) -> Vec<u64> {
        let keys = self.keys.lock().map(|k| k.clone()).unwrap_or_default();
        let mut ids: Vec<u64> = keys
            .values()
            .filter_map(|v| serde_json::from_slice::<Instance>(v).ok())
            .map(|i| i.instance_id)
            .collect();
        ids.sort_unstable();
        ids
    }
}
