//! The model's weights and shape, read from a llama-architecture GGUF file.
//!
//! Every quantized matrix that is not already Q8_0 is re-quantized to Q8_0 at load (candle has AVX2
//! kernels for Q8_0 and none for Q4_1: ~1.7x the decode speed on SmolLM2, platform facts). Norm
//! weights stay f32. The token embedding is kept twice: dequantized to f32 for the input lookup and
//! as Q8_0 for the output head when the model ties them (SmolLM2 does).
//!
//! Weights are immutable once loaded and shared (`Arc`) by every engine of the process and across
//! engine restarts: a restarted engine rebuilds its KV caches and scheduler, not its weights.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("cannot read the model file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a GGUF file candle can read.
    #[error("{path} is not a readable GGUF file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What candle reported.
        reason: String,
    },
    /// A metadata key this engine needs is missing or has the wrong type.
    #[error("{path}: metadata key {key} is missing or not a number")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// The architecture is not llama-style.
    #[error("{path}: architecture {arch:?} is not supported by the model engine (llama only)")]
    Architecture {
        /// The file.
        path: PathBuf,
        /// What the file says.
        arch: String,
    },
    /// A tensor is missing, has an unexpected shape, or could not be converted.
    #[error("{path}: tensor {name}: {reason}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Shape of a llama-style model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Attention (query) heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Feed-forward inner size.
    pub ffn: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab: usize,
    /// Context window in tokens.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
}

impl ModelShape {
    /// Floats one token occupies in one layer's key (or value) cache.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// One transformer block.
pub struct Layer {
    pub(super) attn_norm: Tensor,
    pub(super) wq: QMatMul,
    pub(super) wk: QMatMul,
    pub(super) wv: QMatMul,
    pub(super) wo: QMatMul,
    pub(super) ffn_norm: Tensor,
    pub(super) w_gate: QMatMul,
    pub(super) w_up: QMatMul,
    pub(super) w_down: QMatMul,
}

/// A loaded model: shape, weights and RoPE tables.
pub struct LlamaModel {
    /// Its shape.
    pub shape: ModelShape,
    pub(super) embedding: Tensor,
    pub(super) layers: Vec<Layer>,
    pub(super) final_norm: Tensor,
    pub(super) output: QMatMul,
    /// cos/sin of every (position, frequency) pair, `context_length × head_dim/2`, row-major.
    pub(super) rope_cos: Vec<f32>,
    pub(super) rope_sin: Vec<f32>,
    /// The file it came from.
    pub path: PathBuf,
    /// How long loading (reading + re-quantizing) took.
    pub load_time: Duration,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("path", &self.path)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// Reads tensors out of one open GGUF file, re-quantizing as it goes.
struct Reader<'a> {
    path: &'a Path,
    content: gguf_file::Content,
    file: BufReader<File>,
}

impl Reader<'_> {
    fn tensor_error(&self, name: &str, reason: impl std::fmt::Display) -> LoadError {
        LoadError::Tensor {
            path: self.path.to_path_buf(),
            name: name.to_string(),
            reason: reason.to_string(),
        }
    }

    fn raw(&mut self, name: &str) -> Result<QTensor, LoadError> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(self.tensor_error(name, "missing"));
        }
        self.content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| self.tensor_error(name, e))
    }

    /// A matrix as Q8_0, `[rows, cols]` as GGUF stores it (`rows` outputs of `cols` inputs).
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<QTensor, LoadError> {
        let tensor = self.raw(name)?;
        if tensor.shape().dims() != [rows, cols] {
            return Err(self.tensor_error(
                name,
                format!(
                    "shape {:?}, expected [{rows}, {cols}]",
                    tensor.shape().dims()
                ),
            ));
        }
        to_q8_0(tensor).map_err(|e| self.tensor_error(name, e))
    }

    fn matmul(&mut self, name: &str, rows: usize, cols: usize) -> Result<QMatMul, LoadError> {
        let q = self.matrix(name, rows, cols)?;
        QMatMul::from_qtensor(q).map_err(|e| self.tensor_error(name, e))
    }

    /// A vector as f32.
    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor, LoadError> {
        let tensor = self.raw(name)?;
        if tensor.shape().dims() != [len] {
            return Err(self.tensor_error(
                name,
                format!("shape {:?}, expected [{len}]", tensor.shape().dims()),
            ));
        }
        tensor
            .dequantize(&Device::Cpu)
            .map_err(|e| self.tensor_error(name, e))
    }

    fn metadata_u32(&self, key: &str) -> Result<usize, LoadError> {
        self.content
            .metadata
            .get(key)
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize)
            .ok_or_else(|| LoadError::Metadata {
                path: self.path.to_path_buf(),
                key: key.to_string(),
            })
    }

    fn metadata_f32(&self, key: &str) -> Option<f32> {
        self.content.metadata.get(key).and_then(|v| v.to_f32().ok())
    }
}

/// Re-quantizes anything that is not Q8_0 (a no-op for Q8_0 tensors).
fn to_q8_0(tensor: QTensor) -> candle_core::Result<QTensor> {
    if tensor.dtype() == GgmlDType::Q8_0 {
        return Ok(tensor);
    }
    let dense = tensor.dequantize(&Device::Cpu)?;
    QTensor::quantize(&dense, GgmlDType::Q8_0)
}

impl LlamaModel {
    /// Load a llama-architecture GGUF file. Blocking: reads ~100 MB and re-quantizes (about a second
    /// for SmolLM2-135M).
    pub fn load(path: &Path) -> Result<LlamaModel, LoadError> {
        let started = Instant::now();
        let io = |source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = BufReader::new(File::open(path).map_err(io)?);
        let content = gguf_file::Content::read(&mut file).map_err(|e| LoadError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut reader = Reader {
            path,
            content,
            file,
        };
        let arch = reader
            .content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(LoadError::Architecture {
                path: path.to_path_buf(),
                arch,
            });
        }
        let layers = reader.metadata_u32("llama.block_count")?;
        let hidden = reader.metadata_u32("llama.embedding_length")?;
        let heads = reader.metadata_u32("llama.attention.head_count")?;
        let kv_heads = reader.metadata_u32("llama.attention.head_count_kv")?;
        let ffn = reader.metadata_u32("llama.feed_forward_length")?;
        let context_length = reader.metadata_u32("llama.context_length")?;
        let rms_eps = reader
            .metadata_f32("llama.attention.layer_norm_rms_epsilon")
            .unwrap_or(1e-5);
        let rope_theta = reader
            .metadata_f32("llama.rope.freq_base")
            .unwrap_or(10_000.0);
        if heads == 0 || kv_heads == 0 || hidden % heads != 0 || heads % kv_heads != 0 {
            return Err(LoadError::Metadata {
                path: path.to_path_buf(),
                key: format!(
                    "llama.attention.head_count ({heads}) / head_count_kv ({kv_heads}) vs embedding_length ({hidden})"
                ),
            });
        }
        let head_dim = hidden / heads;
        let embed_q = reader.raw("token_embd.weight")?;
        let vocab = match embed_q.shape().dims() {
            [vocab, h] if *h == hidden => *vocab,
            dims => {
                return Err(reader.tensor_error(
                    "token_embd.weight",
                    format!("shape {dims:?}, expected [vocab, {hidden}]"),
                ))
            }
        };
        let shape = ModelShape {
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim,
            ffn,
            vocab,
            context_length,
            rms_eps,
            rope_theta,
        };
        let embedding = embed_q
            .dequantize(&Device::Cpu)
            .map_err(|e| reader.tensor_error("token_embd.weight", e))?;
        let output = if reader.content.tensor_infos.contains_key("output.weight") {
            reader.matmul("output.weight", vocab, hidden)?
        } else {
            let q = to_q8_0(embed_q).map_err(|e| reader.tensor_error("token_embd.weight", e))?;
            QMatMul::from_qtensor(q).map_err(|e| reader.tensor_error("token_embd.weight", e))?
        };
        let kv = shape.kv_width();
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            let p = format!("blk.{i}");
            blocks.push(Layer {
                attn_norm: reader.vector(&format!("{p}.attn_norm.weight"), hidden)?,
                wq: reader.matmul(&format!("{p}.attn_q.weight"), hidden, hidden)?,
                wk: reader.matmul(&format!("{p}.attn_k.weight"), kv, hidden)?,
                wv: reader.matmul(&format!("{p}.attn_v.weight"), kv, hidden)?,
                wo: reader.matmul(&format!("{p}.attn_output.weight"), hidden, hidden)?,
                ffn_norm: reader.vector(&format!("{p}.ffn_norm.weight"), hidden)?,
                w_gate: reader.matmul(&format!("{p}.ffn_gate.weight"), ffn, hidden)?,
                w_up: reader.matmul(&format!("{p}.ffn_up.weight"), ffn, hidden)?,
                w_down: reader.matmul(&format!("{p}.ffn_down.weight"), hidden, ffn)?,
            });
        }
        let final_norm = reader.vector("output_norm.weight", hidden)?;
        let (rope_cos, rope_sin) = rope_tables(context_length, head_dim, rope_theta);
        Ok(LlamaModel {
            shape,
            embedding,
            layers: blocks,
            final_norm,
            output,
            rope_cos,
            rope_sin,
            path: path.to_path_buf(),
            load_time: started.elapsed(),
        })
    }

    /// Write the weights as this engine uses them (Q8_0 matrices, f32 vectors) to a GGUF file with the
    /// original metadata: what the plain-candle baseline of `benches/model.rs` loads.
    pub fn write_requantized(source: &Path, dest: &Path) -> Result<(), LoadError> {
        let io = |source| LoadError::Io {
            path: dest.to_path_buf(),
            source,
        };
        let format = |e: candle_core::Error| LoadError::Format {
            path: source.to_path_buf(),
            reason: e.to_string(),
        };
        let mut file = BufReader::new(File::open(source).map_err(|e| LoadError::Io {
            path: source.to_path_buf(),
            source: e,
        })?);
        let content = gguf_file::Content::read(&mut file).map_err(format)?;
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let t = content
                .tensor(&mut file, name, &Device::Cpu)
                .map_err(format)?;
            let t = if t.rank() == 2 && t.dtype() != GgmlDType::F32 {
                to_q8_0(t).map_err(format)?
            } else {
                t
            };
            tensors.push((name.clone(), t));
        }
        let metadata: HashMap<&str, &gguf_file::Value> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let metadata: Vec<(&str, &gguf_file::Value)> = metadata.into_iter().collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out = File::create(dest).map_err(io)?;
        gguf_file::write(&mut out, &metadata, &tensor_refs).map_err(format)?;
        Ok(())
    }
}

/// cos and sin of `pos * theta^(-2i/head_dim)` for every position and pair `i`.
fn rope_tables(positions: usize, head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for pos in 0..positions {
        for f in &freqs {
            let angle = pos as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}
