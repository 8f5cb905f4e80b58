//! The model: [`Embedder`] is the seam the actor computes through; [`BertEmbedder`] is the real one,
//! a BERT encoder (candle) + attention-mask-aware mean pooling + L2 normalisation, the
//! sentence-transformers recipe of all-MiniLM-L6-v2.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde::Deserialize;

use super::error::{EmbedError, LoadError};

/// Computes one unit vector per row of token ids. Rows are non-empty and within
/// [`Embedder::max_tokens`]; an implementation still returns an error (never panics) when they are not.
pub trait Embedder: Send + Sync {
    /// Length of every vector.
    fn dimensions(&self) -> usize;
    /// Longest row the model takes (its position embeddings).
    fn max_tokens(&self) -> usize;
    /// Vectors for `rows`, in order.
    fn embed(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// The files of a sentence-transformers BERT model directory.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// The directory.
    pub dir: PathBuf,
}

impl ModelFiles {
    /// `config.json`: the BERT hyper-parameters.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// `model.safetensors`: F32 weights (with or without a `bert.` prefix).
    pub fn weights(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }

    /// `tokenizer.json`.
    pub fn tokenizer(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    /// `1_Pooling/config.json` (optional; mean pooling when absent).
    pub fn pooling(&self) -> PathBuf {
        self.dir.join("1_Pooling").join("config.json")
    }
}

/// `1_Pooling/config.json`: which pooling the model was trained with.
#[derive(Debug, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

/// A BERT sentence encoder on the CPU, computing on its own thread pool.
pub struct BertEmbedder {
    bert: BertModel,
    dimensions: usize,
    max_tokens: usize,
    vocab_size: usize,
    pad_id: u32,
    /// candle's matmuls and softmax split work over the rayon pool they run in; running every
    /// forward pass inside this one bounds them to `threads` cores, leaving the rest to the HTTP
    /// workers and the chat engine (candle's elementwise kernels use its own global pool; see
    /// [`super::EmbeddingsConfig::threads`]).
    pool: rayon::ThreadPool,
}

impl BertEmbedder {
    /// Loads `files` and builds a pool of `threads` compute threads.
    pub fn load(files: &ModelFiles, threads: usize) -> Result<Self, LoadError> {
        let config: BertConfig = read_json(&files.config())?;
        check_pooling(&files.pooling())?;
        let weights_path = files.weights();
        let weights = std::fs::read(&weights_path).map_err(|source| LoadError::File {
            path: weights_path.clone(),
            source,
        })?;
        let invalid = |e: candle_core::Error| LoadError::Invalid {
            path: weights_path.clone(),
            message: e.to_string(),
        };
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)
            .map_err(invalid)?;
        // BertModel::load looks for a `bert.` prefix itself and falls back to none (this package).
        let bert = BertModel::load(vb, &config).map_err(invalid)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("embeddings-compute-{i}"))
            .build()
            .map_err(|e| LoadError::Threads {
                threads,
                message: e.to_string(),
            })?;
        Ok(BertEmbedder {
            bert,
            dimensions: config.hidden_size,
            max_tokens: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            pad_id: config.pad_token_id as u32,
            pool,
        })
    }

    fn check(&self, rows: &[Vec<u32>]) -> Result<(), EmbedError> {
        for (i, row) in rows.iter().enumerate() {
            if row.is_empty() || row.len() > self.max_tokens {
                return Err(EmbedError::InvalidInput(format!(
                    "row {i} has {} tokens; the model takes 1 to {}",
                    row.len(),
                    self.max_tokens
                )));
            }
            if let Some(id) = row.iter().find(|&&id| id as usize >= self.vocab_size) {
                return Err(EmbedError::InvalidInput(format!(
                    "token id {id} is out of range for a vocabulary of {} tokens",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// One padded forward pass: rows are padded to the longest with `pad_id` and masked out of
    /// attention and of the mean, so each row's vector does not depend on its batch mates.
    fn forward(&self, rows: &[Vec<u32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * longest);
        let mut mask = Vec::with_capacity(rows.len() * longest);
        for row in rows {
            let padding = longest - row.len();
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(self.pad_id, padding));
            mask.extend(std::iter::repeat_n(1f32, row.len()));
            mask.extend(std::iter::repeat_n(0f32, padding));
        }
        let shape = (rows.len(), longest);
        let ids = Tensor::from_vec(ids, shape, &Device::Cpu)?;
        let mask = Tensor::from_vec(mask, shape, &Device::Cpu)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.bert.forward(&ids, &token_types, Some(&mask))?; // (rows, longest, dims)
        let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?; // (rows, dims)
        let counts = mask.sum_keepdim(1)?.clamp(1e-9f32, f32::MAX)?; // (rows, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12f32, f32::MAX)?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

impl Embedder for BertEmbedder {
    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn embed(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.check(rows)?;
        self.pool
            .install(|| self.forward(rows))
            .map_err(|e| EmbedError::Model(e.to_string()))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::File {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Only mean pooling is implemented; a model trained with another would give wrong vectors.
fn check_pooling(path: &Path) -> Result<(), LoadError> {
    if !path.exists() {
        return Ok(());
    }
    let pooling: PoolingConfig = read_json(path)?;
    let other = pooling.pooling_mode_cls_token
        || pooling.pooling_mode_max_tokens
        || pooling.pooling_mode_mean_sqrt_len_tokens;
    if pooling.pooling_mode_mean_tokens && !other {
        Ok(())
    } else {
        Err(LoadError::Invalid {
            path: path.to_path_buf(),
            message: format!("only mean pooling is supported, the model asks for {pooling:?}"),
        })
    }
}
