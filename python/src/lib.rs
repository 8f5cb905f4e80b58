//! `dynamix._core`: the compiled half of the Python SDK (python-sdk spec §9.5). It does the I/O —
//! etcd (lease, keys, watches), the TCP endpoint server, calls and their response streams — on one
//! background tokio runtime, and hands Python only awaitables and short calls. The pure-Python
//! package (`dynamix.runtime`, `dynamix.llm`) builds Dynamo's API on it.
//!
//! Layout:
//! - [`discovery`]: where instances and model cards live: etcd (lease-bound keys) or `mem` (this
//!   process only, no network).
//! - [`serve`]: a Python handler as a [`dynamix_wire::endpoint::Handler`]: [`serve::Control`] and
//!   [`serve::Sink`], the two objects a request's Python task holds.
//! - [`call`]: [`call::CallStream`], one call's responses, remote or in-process.
//! - [`runtime`]: [`runtime::Runtime`], the object `DistributedRuntime` wraps.

use pyo3::prelude::*;

pub mod call;
pub mod discovery;
pub mod runtime;
pub mod serve;

/// `blake3:<hex>` of a file's bytes (model-card file references).
#[pyfunction]
fn blake3_file(py: Python<'_>, path: String) -> PyResult<(String, u64)> {
    py.detach(|| {
        let bytes = std::fs::read(&path).map_err(|e| {
            pyo3::exceptions::PyFileNotFoundError::new_err(format!("cannot read {path}: {e}"))
        })?;
        Ok((
            format!("blake3:{}", blake3::hash(&bytes).to_hex()),
            bytes.len() as u64,
        ))
    })
}

/// Release the GIL for `millis` milliseconds, so background threads that are handing results to
/// Python finish before the interpreter finalizes (registered with `atexit` by `dynamix.runtime`).
#[pyfunction]
fn quiesce(py: Python<'_>, millis: u64) {
    py.detach(|| std::thread::sleep(std::time::Duration::from_millis(millis.min(1000))));
}

/// The background runtime: `DYNAMIX_PY_THREADS` worker threads (default 2).
fn init_runtime() -> PyResult<()> {
    let threads = match std::env::var("DYNAMIX_PY_THREADS") {
        Err(_) => 2,
        Ok(text) => match text.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "DYNAMIX_PY_THREADS = {text:?} must be a positive number of threads"
                )))
            }
        },
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(threads)
        .thread_name("dynamix-io")
        .enable_all();
    pyo3_async_runtimes::tokio::init(builder);
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_runtime()?;
    m.add_function(wrap_pyfunction!(blake3_file, m)?)?;
    m.add_function(wrap_pyfunction!(quiesce, m)?)?;
    m.add_class::<runtime::Runtime>()?;
    m.add_class::<runtime::InstanceWatch>()?;
    m.add_class::<serve::Control>()?;
    m.add_class::<serve::Sink>()?;
    m.add_class::<call::CallStream>()?;
    Ok(())
}
