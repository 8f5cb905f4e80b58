//! A Python handler behind the endpoint server (python-sdk spec §4, §9.5). For each request the
//! server's [`PyHandler`] calls the Python dispatcher once — in a blocking-pool thread, since taking
//! the GIL may wait on user code — with the body, the headers, a [`Control`] and a [`Sink`]. The
//! dispatcher schedules the request's task on the user's event loop and returns at once. That task
//! pulls the handler's async generator and awaits [`Sink::send`] for each item; the send resolves
//! once the server has taken the previous item, so the generator is pulled on demand.

use std::sync::{Arc, Mutex};

use dynamix_wire::endpoint::{self, Handler, Replies, Reply, Request};
use dynamix_wire::error::DynamoError;
use futures_util::stream;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::Value;
use tokio::sync::mpsc;

/// A request's cancellation state, as Python sees it (`Context` wraps it).
#[pyclass(frozen, module = "dynamix._core")]
pub struct Control {
    pub(crate) inner: Arc<endpoint::Control>,
}

#[pymethods]
impl Control {
    /// A fresh, unstopped control (the client side's `Context()`).
    #[new]
    fn new() -> Self {
        Control {
            inner: Arc::default(),
        }
    }

    /// True once stopped or killed.
    fn is_stopped(&self) -> bool {
        self.inner.is_stopped()
    }

    /// True once killed.
    fn is_killed(&self) -> bool {
        self.inner.is_killed()
    }

    /// Ask to stop.
    fn stop(&self) {
        self.inner.stop();
    }

    /// Stop now.
    fn kill(&self) {
        self.inner.kill();
    }

    /// An awaitable that resolves to `True` once stopped or killed.
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let inner = self.inner.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            inner.stopped().await;
            Ok(true)
        })
    }
}

/// Where a request's Python task puts its items.
#[pyclass(frozen, module = "dynamix._core")]
pub struct Sink {
    tx: Mutex<Option<mpsc::Sender<Reply>>>,
}

impl Sink {
    fn sender(&self) -> Option<mpsc::Sender<Reply>> {
        self.tx.lock().ok().and_then(|tx| tx.clone())
    }

    fn push<'py>(&self, py: Python<'py>, reply: Reply) -> PyResult<Bound<'py, PyAny>> {
        let tx = self.sender();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            Ok(match tx {
                Some(tx) => tx.send(reply).await.is_ok(),
                None => false,
            })
        })
    }
}

/// A JSON-like Python value as JSON; `TypeError` naming the type otherwise.
pub fn to_json(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    pythonize::depythonize::<Value>(value).map_err(|e| {
        let kind = value
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        pyo3::exceptions::PyTypeError::new_err(format!(
            "{what} a value of type {kind} that is not JSON: {e}"
        ))
    })
}

#[pymethods]
impl Sink {
    /// Send one item; resolves to `False` when the request is gone (stopped, or the caller left).
    /// A value that is not JSON raises `TypeError` naming its type.
    fn send<'py>(&self, py: Python<'py>, item: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let value = to_json(item, "the handler yielded")?;
        self.push(py, Reply::Data(value))
    }

    /// Send one item at once if the stream has room for it: `True` when it was taken, `False`
    /// when the caller must await [`Sink::send`] (full, or the request is gone). Saves the round
    /// trip through the background runtime for a handler that yields faster than the reader.
    fn try_send(&self, item: &Bound<'_, PyAny>) -> PyResult<bool> {
        let value = to_json(item, "the handler yielded")?;
        Ok(match self.sender() {
            Some(tx) => tx.try_send(Reply::Data(value)).is_ok(),
            None => false,
        })
    }

    /// Send a ready-made Annotated envelope (`data`, `event`, `comment`, `id`).
    fn send_annotated<'py>(
        &self,
        py: Python<'py>,
        envelope: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut value = to_json(envelope, "the handler yielded")?;
        if let Value::Object(map) = &mut value {
            map.remove("_dynamo_annotated");
        }
        self.push(py, Reply::Annotated(value))
    }

    /// End the stream with an error item of Dynamo category (`error_type`, `class`, `reason`), and
    /// the HTTP status the handler chose, if any (`HttpError`).
    #[pyo3(signature = (error_type, class, reason, message, status=None))]
    fn error<'py>(
        &self,
        py: Python<'py>,
        error_type: String,
        class: String,
        reason: String,
        message: String,
        status: Option<u16>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut error = DynamoError::new(&error_type, &class, &reason, message);
        error.status = status;
        let reply = Reply::Error(error);
        let future = self.push(py, reply);
        self.close();
        future
    }

    /// End the stream normally.
    fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }
}

/// An endpoint served by a Python dispatcher:
/// `dispatch(request_id, body, headers, metadata, control, sink)`.
pub struct PyHandler {
    pub dispatch: Arc<Py<PyAny>>,
}

enum Phase {
    Start(Request),
    Items(mpsc::Receiver<Reply>),
    Done,
}

impl Handler for PyHandler {
    fn call(&self, request: Request) -> Replies {
        let dispatch = self.dispatch.clone();
        Box::pin(stream::unfold(Phase::Start(request), move |phase| {
            let dispatch = dispatch.clone();
            async move {
                let mut rx = match phase {
                    Phase::Done => return None,
                    Phase::Items(rx) => rx,
                    Phase::Start(request) => {
                        let (tx, rx) = mpsc::channel(1);
                        let id = request.id.clone();
                        let started =
                            tokio::task::spawn_blocking(move || start(&dispatch, request, tx))
                                .await
                                .map_err(|e| e.to_string())
                                .and_then(|r| r);
                        if let Err(e) = started {
                            tracing::error!(request = %id, "cannot start the Python handler: {e}");
                            let error = DynamoError::new(
                                "Internal",
                                "Internal",
                                "runtime.internal",
                                format!("cannot start the handler: {e}"),
                            );
                            return Some((Reply::Error(error), Phase::Done));
                        }
                        rx
                    }
                };
                let reply = rx.recv().await?;
                Some((reply, Phase::Items(rx)))
            }
        }))
    }
}

/// Hand a request to the Python dispatcher.
fn start(dispatch: &Py<PyAny>, request: Request, tx: mpsc::Sender<Reply>) -> Result<(), String> {
    Python::attach(|py| {
        let body = pythonize::pythonize(py, &request.body).map_err(|e| e.to_string())?;
        let headers = PyDict::new(py);
        for (key, value) in &request.headers {
            headers.set_item(key, value).map_err(|e| e.to_string())?;
        }
        let metadata = match &request.metadata {
            Some(map) => pythonize::pythonize(py, map).map_err(|e| e.to_string())?,
            None => py.None().into_bound(py),
        };
        let control = Py::new(
            py,
            Control {
                inner: request.control.clone(),
            },
        )
        .map_err(|e| e.to_string())?;
        let sink = Py::new(
            py,
            Sink {
                tx: Mutex::new(Some(tx)),
            },
        )
        .map_err(|e| e.to_string())?;
        dispatch
            .call1(py, (request.id, body, headers, metadata, control, sink))
            .map(drop)
            .map_err(|e| e.to_string())
    })
}
