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

/// The responses of one call.
#[pyclass(frozen, module = "dynamix._core")]
pub struct CallStream {
    source: Arc<tokio::sync::Mutex<Source>>,
    canceller: Canceller,
    finished: Arc<std::sync::atomic::AtomicBool>,
}

impl CallStream {
    /// Wrap a source.
    pub fn new(source: Source) -> Self {
        CallStream {
            canceller: source.canceller(),
            source: Arc::new(tokio::sync::Mutex::new(source)),
            finished: Arc::default(),
        }
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
        let source = self.source.clone();
        let finished = self.finished.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let mut source = source.lock().await;
            let next = source.next().await;
            if !matches!(next, Some(Ok(_))) {
                finished.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            Ok(match next {
                None => None,
                Some(Ok(envelope)) => Some(("item", Json(envelope))),
                Some(Err(error)) => Some(("error", Json(error_value(&error)))),
            })
        })
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
