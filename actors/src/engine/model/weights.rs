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
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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

impl<'a> Reader<'a> {
    fn open(path: &'a Path) -> Result<Self, LoadError> {
        let mut file = BufReader::new(File::open(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?);
        let content = gguf_file::Content::read(&mut file).map_err(|e| LoadError::Format {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Reader {
            path,
            content,
            file,
        })
    }

    fn shape(&self) -> Result<ModelShape, LoadError> {
        let path = self.path;
        let arch = self
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
        let layers = self.metadata_u32("llama.block_count")?;
        let hidden = self.metadata_u32("llama.embedding_length")?;
        let heads = self.metadata_u32("llama.attention.head_count")?;
        let kv_heads = self.metadata_u32("llama.attention.head_count_kv")?;
        let ffn = self.metadata_u32("llama.feed_forward_length")?;
        let context_length = self.metadata_u32("llama.context_length")?;
        let rms_eps = self
            .metadata_f32("llama.attention.layer_norm_rms_epsilon")
            .unwrap_or(1e-5);
        let rope_theta = self
            .metadata_f32("llama.rope.freq_base")
            .unwrap_or(10_000.0);
        if heads == 0
            || kv_heads == 0
            || hidden % heads != 0
            || heads % kv_heads != 0
            || hidden % 32 != 0
            || ffn % 32 != 0
        {
            return Err(LoadError::Metadata {
                path: path.to_path_buf(),
                key: format!(
                    "llama.attention.head_count ({heads}) / head_count_kv ({kv_heads}) vs embedding_length ({hidden}) and feed_forward_length ({ffn}) (sizes must be multiples of 32 for Q8_0)"
                ),
            });
        }
        let vocab = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => match info.shape.dims() {
                [vocab, h] if *h == hidden => *vocab,
                dims => {
                    return Err(self.tensor_error(
                        "token_embd.weight",
                        format!("shape {dims:?}, expected [vocab, {hidden}]"),
                    ))
                }
            },
            None => return Err(self.tensor_error("token_embd.weight", "missing")),
        };
        Ok(ModelShape {
            layers,
            hidden,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            ffn,
            vocab,
            context_length,
            rms_eps,
            rope_theta,
        })
    }

    /// Every tensor the engine keeps, in a fixed order, with its converted type and size.
    fn plan(&self, shape: &ModelShape) -> Result<Vec<TensorPlan>, LoadError> {
        let (h, kv, ffn) = (shape.hidden, shape.kv_width(), shape.ffn);
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| self.tensor_error("token_embd.weight", "missing"))?;
        let mut plan = vec![
            TensorPlan {
                name: "token_embd.weight".into(),
                dims: vec![shape.vocab, h],
                dtype: dtype_name(embd.ggml_dtype),
                bytes: storage_bytes(embd.ggml_dtype, shape.vocab * h),
            },
            TensorPlan {
                name: "output.weight".into(),
                dims: vec![shape.vocab, h],
                dtype: dtype_name(GgmlDType::Q8_0),
                bytes: storage_bytes(GgmlDType::Q8_0, shape.vocab * h),
            },
        ];
        let vector = |name: String, len: usize| TensorPlan {
            name,
            dims: vec![len],
            dtype: dtype_name(GgmlDType::F32),
            bytes: (len * 4) as u64,
        };
        let matrix = |name: String, rows: usize, cols: usize| TensorPlan {
            name,
            dims: vec![rows, cols],
            dtype: dtype_name(GgmlDType::Q8_0),
            bytes: storage_bytes(GgmlDType::Q8_0, rows * cols),
        };
        plan.push(vector("output_norm.weight".into(), h));
        for i in 0..shape.layers {
            let p = format!("blk.{i}");
            plan.push(vector(format!("{p}.attn_norm.weight"), h));
            plan.push(matrix(format!("{p}.attn_q.weight"), h, h));
            plan.push(matrix(format!("{p}.attn_k.weight"), kv, h));
            plan.push(matrix(format!("{p}.attn_v.weight"), kv, h));
            plan.push(matrix(format!("{p}.attn_output.weight"), h, h));
            plan.push(vector(format!("{p}.ffn_norm.weight"), h));
            plan.push(matrix(format!("{p}.ffn_gate.weight"), ffn, h));
            plan.push(matrix(format!("{p}.ffn_up.weight"), ffn, h));
            plan.push(matrix(format!("{p}.ffn_down.weight"), h, ffn));
        }
        for entry in &plan {
            if entry.name == "output.weight" && !self.content.tensor_infos.contains_key(&entry.name)
            {
                continue;
            }
            match self.content.tensor_infos.get(&entry.name) {
                Some(info) if info.shape.dims() == entry.dims.as_slice() => {}
                Some(info) => {
                    return Err(self.tensor_error(
                        &entry.name,
                        format!("shape {:?}, expected {:?}", info.shape.dims(), entry.dims),
                    ))
                }
                None => return Err(self.tensor_error(&entry.name, "missing")),
            }
        }
        Ok(plan)
    }

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

/// One tensor as the engine keeps it: its name, shape and storage type after conversion.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorPlan {
    /// GGUF name (`output.weight` is the output head even when the file ties it to the embedding).
    pub name: String,
    /// Shape, candle order.
    pub dims: Vec<usize>,
    /// Storage type: Q8_0 for matrices, F32 for vectors, the file's own type for the embedding (small;
    /// dequantized when the model is assembled).
    pub dtype: String,
    /// Bytes of its storage.
    pub bytes: u64,
}

/// The tensors a model is assembled from, by name, in the form the engine keeps them.
pub type TensorSet = HashMap<String, QTensor>;

fn dtype_name(dtype: GgmlDType) -> String {
    format!("{dtype:?}")
}

/// The GGUF type named by [`dtype_name`].
pub fn dtype_from_name(name: &str) -> Option<GgmlDType> {
    use GgmlDType::*;
    [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K,
    ]
    .into_iter()
    .find(|d| dtype_name(*d) == name)
}

fn storage_bytes(dtype: GgmlDType, elems: usize) -> u64 {
    (elems / dtype.block_size() * dtype.type_size()) as u64
}

/// The variable candle 0.11 reads (once, at the first quantized matmul) to keep its AVX2 kernels on
/// CPUs that have AVX512-VNNI.
pub const FORCE_AVX2_ENV: &str = "MISTRALRS_FORCE_AVX2";

/// Keeps every host on one Q8_0 matmul path: candle's own Q8_0 x Q8_0 dot products, which quantize
/// the activations in blocks of 32 like the weights.
///
/// On CPUs with AVX512-VNNI candle otherwise repacks Q8_0 weights and quantizes the activations in
/// blocks of 256 (one scale per 256 values), which is coarse enough to change SmolLM2's greedy text:
/// "What is the capital of France?" answers "L'Étoile, la Cité, ..." and rambles to the length
/// limit instead of naming Paris and stopping. Set `MISTRALRS_FORCE_AVX2=0` to get the repacked
/// path anyway (faster on such CPUs, less exact); any value set before start is left alone.
fn pin_q8_0_activation_blocks() {
    static PINNED: std::sync::Once = std::sync::Once::new();
    PINNED.call_once(|| {
        if std::env::var_os(FORCE_AVX2_ENV).is_none() {
            std::env::set_var(FORCE_AVX2_ENV, "1");
        }
    });
}

impl LlamaModel {
    /// Load a llama-architecture GGUF file. Blocking: reads ~100 MB and re-quantizes (about a second
    /// for SmolLM2-135M).
    pub fn load(path: &Path) -> Result<LlamaModel, LoadError> {
        let started = Instant::now();
        let (shape, tensors) = Self::read_tensors(path)?;
        let mut model = Self::assemble(path, shape, tensors)?;
        model.load_time = started.elapsed();
        Ok(model)
    }

    /// The model with every matrix dequantized to f32: the CPU engine's own forward pass with no
    /// quantization of activations (Q8_0 matrices multiply Q8_0-quantized activations), so that its
    /// only rounding is f32's. A reference for checks of other engines on the same weights; about 4x
    /// the memory of [`load`](Self::load) and several times slower.
    pub fn load_dense(path: &Path) -> Result<LlamaModel, LoadError> {
        let started = Instant::now();
        let (shape, mut tensors) = Self::read_tensors(path)?;
        for (name, tensor) in tensors.iter_mut() {
            if tensor.dtype() != GgmlDType::F32 {
                let dense = tensor
                    .dequantize(&Device::Cpu)
                    .and_then(|t| QTensor::quantize(&t, GgmlDType::F32))
                    .map_err(|e| LoadError::Tensor {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        reason: e.to_string(),
                    })?;
                *tensor = dense;
            }
        }
        let mut model = Self::assemble(path, shape, tensors)?;
        model.load_time = started.elapsed();
        Ok(model)
    }

    /// The model's shape and the plan of its tensors, from the file's header alone (no tensor data is
    /// read): what [`read_tensors`](Self::read_tensors) will produce, byte for byte in size.
    pub fn plan(path: &Path) -> Result<(ModelShape, Vec<TensorPlan>), LoadError> {
        let reader = Reader::open(path)?;
        let shape = reader.shape()?;
        let plan = reader.plan(&shape)?;
        Ok((shape, plan))
    }

    /// Read every tensor the engine needs, re-quantizing matrices to Q8_0.
    pub fn read_tensors(path: &Path) -> Result<(ModelShape, TensorSet), LoadError> {
        let mut reader = Reader::open(path)?;
        let shape = reader.shape()?;
        let plan = reader.plan(&shape)?;
        let mut tensors = TensorSet::new();
        for entry in &plan {
            let tensor = match entry.name.as_str() {
                "token_embd.weight" => reader.raw(&entry.name)?,
                "output.weight" => {
                    let source = if reader.content.tensor_infos.contains_key("output.weight") {
                        "output.weight"
                    } else {
                        "token_embd.weight"
                    };
                    let raw = reader.raw(source)?;
                    to_q8_0(raw).map_err(|e| reader.tensor_error(source, e))?
                }
                name if entry.dims.len() == 2 => {
                    let raw = reader.raw(name)?;
                    to_q8_0(raw).map_err(|e| reader.tensor_error(name, e))?
                }
                name => {
                    let raw = reader.raw(name)?;
                    let dense = raw
                        .dequantize(&Device::Cpu)
                        .map_err(|e| reader.tensor_error(name, e))?;
                    QTensor::quantize(&dense, GgmlDType::F32)
                        .map_err(|e| reader.tensor_error(name, e))?
                }
            };
            if tensor.shape().dims() != entry.dims.as_slice() {
                return Err(reader.tensor_error(
                    &entry.name,
                    format!(
                        "shape {:?}, expected {:?}",
                        tensor.shape().dims(),
                        entry.dims
                    ),
                ));
            }
            tensors.insert(entry.name.clone(), tensor);
        }
        Ok((shape, tensors))
    }

    /// Build the model from its tensors (from [`read_tensors`](Self::read_tensors), or attached from
    /// the GPU memory service). `path` names where they came from.
    pub fn assemble(
        path: &Path,
        shape: ModelShape,
        mut tensors: TensorSet,
    ) -> Result<LlamaModel, LoadError> {
        pin_q8_0_activation_blocks();
        let started = Instant::now();
        let err = |name: &str, reason: String| LoadError::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            reason,
        };
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| err(name, "missing".into()))
        };
        let dense = |name: &str, q: QTensor| {
            q.dequantize(&Device::Cpu)
                .map_err(|e| err(name, e.to_string()))
        };
        let matmul =
            |name: &str, q: QTensor| QMatMul::from_qtensor(q).map_err(|e| err(name, e.to_string()));
        let embedding = dense("token_embd.weight", take("token_embd.weight")?)?;
        let output = matmul("output.weight", take("output.weight")?)?;
        let final_norm = dense("output_norm.weight", take("output_norm.weight")?)?;
        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let p = format!("blk.{i}");
            let mut m = |suffix: &str| {
                let name = format!("{p}.{suffix}.weight");
                matmul(&name, take(&name)?)
            };
            let (wq, wk, wv, wo) = (m("attn_q")?, m("attn_k")?, m("attn_v")?, m("attn_output")?);
            let (w_gate, w_up, w_down) = (m("ffn_gate")?, m("ffn_up")?, m("ffn_down")?);
            let mut v = |suffix: &str| {
                let name = format!("{p}.{suffix}.weight");
                dense(&name, take(&name)?)
            };
            layers.push(Layer {
                attn_norm: v("attn_norm")?,
                ffn_norm: v("ffn_norm")?,
                wq,
                wk,
                wv,
                wo,
                w_gate,
                w_up,
                w_down,
            });
        }
        let (rope_cos, rope_sin) =
            rope_tables(shape.context_length, shape.head_dim, shape.rope_theta);
        Ok(LlamaModel {
            shape,
            embedding,
            layers,
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
pub(crate) fn rope_tables(positions: usize, head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
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
