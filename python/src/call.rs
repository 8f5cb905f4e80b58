//! One call's responses, as a Python awaitable-per-item object (python-sdk spec §5): a remote
//! instance's response stream, or an in-process handler's replies (`mem` backend).

use std::sync::Arc;

use dynamix_wire::client::{CallError, ResponseStream, StreamControl};
use dynamix_wire::endpoint::{Control, Replies, Reply};
use futures_util::StreamExt;
use pyo3::prelude::*;
use serde_json::{json, Value};

/// A JSON value going to Python.
pub struct Json(pub Value);

impl<'py> IntoPyObject<'py> for Json {
    type Target = PyAny;
    type Output = Bound<'py, PyAny>;
    type Error = PyErr;

    fn into_pyobject(self, py: Python<'py>) -> Result<Self::Output, Self::Error> {
        pythonize::pythonize(py, &self.0).map_err(PyErr::from)
    }
}

/// Where the items come from.
pub enum Source {
    /// Another process, over TCP.
    Remote(ResponseStream),
    /// A handler in this process.
    Local {
        /// Its replies.
        replies: Replies,
        /// Its cancellation.
        control: Arc<Control>,
        /// Whether the stream has ended.
        done: bool,
    },
}

impl Source {
    async fn next(&mut self) -> Option<Result<Value, CallError>> {
        match self {
            Source::Remote(stream) => stream.next().await,
            Source::Local {
                replies,
                control,
                done,
            } => {
                if *done || control.is_stopped() {
                    *done = true;
                    return None;
                }
                let reply = replies.next().await;
                match reply {
                    None => {
                        *done = true;
                        None
                    }
                    Some(Reply::Error(error)) => {
                        *done = true;
                        Some(Err(CallError::Remote(error)))
                    }
                    Some(reply) => Some(Ok(reply.annotated())),
                }
            }
        }
    }

    fn canceller(&self) -> Canceller {
        match self {
            Source::Remote(stream) => Canceller::Remote(stream.control()),
            Source::Local { control, .. } => Canceller::Local(control.clone()),
        }
    }
}

/// Stops a call from outside its stream's lock.
#[derive(Clone)]
enum Canceller {
    Remote(StreamControl),
    Local(Arc<Control>),
}

impl Canceller {
    async fn cancel(&self, kill: bool) {
        match self {
            Canceller::Remote(control) if kill => control.kill().await,
            Canceller::Remote(control) => control.stop().await,
            Canceller::Local(control) if kill => control.kill(),
            Canceller::Local(control) => control.stop(),
        }
    }

    fn is_finished(&self) -> bool {
        match self {
            Canceller::Remote(control) => control.is_done() || control.is_cancelled(),
            Canceller::Local(control) => control.is_stopped(),
        }
    }
}

/// How many responses are read ahead of the Python reader (python-sdk spec §9.5).
const READ_AHEAD: usize = 64;

/// One read-ahead response: an envelope, an error, or the end.
type Next = Option<Result<Value, CallError>>;

/// The responses of one call. A task on the background runtime reads them into a bounded buffer,
/// so a reader that is behind takes the next one without a round trip (`try_next`).
#[pyclass(frozen, module = "dynamix._core")]
pub struct CallStream {
    buffer: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Next>>>,
    canceller: Canceller,
    finished: Arc<std::sync::atomic::AtomicBool>,
}

impl CallStream {
    /// Start reading `source`. Must run on the background runtime.
    pub fn new(mut source: Source) -> Self {
        let canceller = source.canceller();
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        tokio::spawn(async move {
            loop {
                let next = source.next().await;
                let last = !matches!(next, Some(Ok(_)));
                if tx.send(next).await.is_err() || last {
                    return;
                }
            }
        });
        CallStream {
            buffer: Arc::new(tokio::sync::Mutex::new(rx)),
            canceller,
            finished: Arc::default(),
        }
    }
}

/// What Python gets for one response.
fn to_python(next: Next) -> Option<(&'static str, Json)> {
    match next {
        None => None,
        Some(Ok(envelope)) => Some(("item", Json(envelope))),
        Some(Err(error)) => Some(("error", Json(error_value(&error)))),
    }
}

/// `{"class", "message", "text"}` of a failed call, for Python to raise.
fn error_value(error: &CallError) -> Value {
    let class = match error {
        CallError::Unavailable(_) => "Unavailable".to_string(),
        CallError::Disconnected(_) => "Disconnected".to_string(),
        CallError::Encode(_) => "InvalidArgument".to_string(),
        CallError::Remote(e) => e.class.clone().unwrap_or_else(|| "Internal".into()),
    };
    let message = match error {
        CallError::Remote(e) => e.text(),
        CallError::Unavailable(t) | CallError::Disconnected(t) | CallError::Encode(t) => t.clone(),
    };
    let error_type = match error {
        CallError::Remote(e) => e.error_type.clone(),
        _ => None,
    };
    json!({"class": class, "message": message, "error_type": error_type, "text": error.to_string()})
}

#[pymethods]
impl CallStream {
    /// Awaitable: `("item", envelope)`, `("error", {...})`, or `None` at the end.
    fn next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let buffer = self.buffer.clone();
        let finished = self.finished.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            // A closed buffer is an end already reported.
            let next = buffer.lock().await.recv().await.unwrap_or(None);
            if !matches!(next, Some(Ok(_))) {
                finished.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(to_python(next))
        })
    }

    /// The next response if one is buffered, as `next()` resolves; the string `"pending"` when
    /// the caller must await `next()`.
    fn try_next<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let pending = || Ok(pyo3::types::PyString::new(py, "pending").into_any());
        let Ok(mut buffer) = self.buffer.try_lock() else {
            return pending();
        };
        let next = match buffer.try_recv() {
            Ok(next) => next,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => return pending(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => None,
        };
        if !matches!(next, Some(Ok(_))) {
            self.finished
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        to_python(next).into_pyobject(py)
    }

    /// Awaitable: ask the handler to stop (`kill=True`: stop now).
    #[pyo3(signature = (kill=false))]
    fn cancel<'py>(&self, py: Python<'py>, kill: bool) -> PyResult<Bound<'py, PyAny>> {
        let canceller = self.canceller.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            canceller.cancel(kill).await;
            Ok(())
        })
    }
}

impl Drop for CallStream {
    fn drop(&mut self) {
        // Dropped by Python's garbage collector, outside the runtime: tell the handler from there.
        if self.finished.load(std::sync::atomic::Ordering::SeqCst) || self.canceller.is_finished() {
            return;
        }
        let canceller = self.canceller.clone();
        pyo3_async_runtimes::tokio::get_runtime()
            .spawn(async move { canceller.cancel(true).await });
    }
}
