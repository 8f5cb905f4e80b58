//! Llama-architecture GGUF files with random weights drawn from a seed: the same file on every
//! machine for the same seed and shape, for checks that compare engines (CPU against GPU) where the
//! real model cannot be carried.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::weights::{LoadError, ModelShape};

/// SmolLM2-135M's shape.
pub fn smollm2_shape() -> ModelShape {
    ModelShape {
        layers: 30,
        hidden: 576,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        ffn: 1536,
        vocab: 49152,
        context_length: 8192,
        rms_eps: 1e-5,
        rope_theta: 100_000.0,
    }
}

/// Write a GGUF file of `shape` with weights drawn from `seed`: Q8_0 matrices (what the CPU engine
/// runs as stored), f32 norms near 1, an embedding tied to the output head. Metadata keys not about
/// the architecture (the tokenizer's) are copied from `metadata_from` when given, so the file also
/// serves HTTP requests.
pub fn write_random_llama(
    dest: &Path,
    shape: &ModelShape,
    seed: u64,
    metadata_from: Option<&Path>,
) -> Result<(), LoadError> {
    let format = |e: candle_core::Error| LoadError::Format {
        path: dest.to_path_buf(),
        reason: e.to_string(),
    };
    let mut rng = StdRng::seed_from_u64(seed);
    // Uniform values with the given standard deviation.
    let mut matrix = |rows: usize, cols: usize, std: f32| -> Result<QTensor, LoadError> {
        let a = std * 3f32.sqrt();
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-a..a)).collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).map_err(format)?;
        QTensor::quantize(&t, GgmlDType::Q8_0).map_err(format)
    };
    let (h, kv, ffn) = (shape.hidden, shape.kv_width(), shape.ffn);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    // A large embedding scale gives clear margins between the top logits.
    tensors.push(("token_embd.weight".into(), matrix(shape.vocab, h, 0.08)?));
    for i in 0..shape.layers {
        let p = format!("blk.{i}");
        tensors.push((format!("{p}.attn_q.weight"), matrix(h, h, 0.04)?));
        tensors.push((format!("{p}.attn_k.weight"), matrix(kv, h, 0.04)?));
        tensors.push((format!("{p}.attn_v.weight"), matrix(kv, h, 0.04)?));
        tensors.push((format!("{p}.attn_output.weight"), matrix(h, h, 0.02)?));
        tensors.push((format!("{p}.ffn_gate.weight"), matrix(ffn, h, 0.04)?));
        tensors.push((format!("{p}.ffn_up.weight"), matrix(ffn, h, 0.04)?));
        tensors.push((format!("{p}.ffn_down.weight"), matrix(h, ffn, 0.02)?));
    }
    let mut norm_rng = StdRng::seed_from_u64(seed ^ 0x6e6f726d);
    let mut norm = |len: usize| -> Result<QTensor, LoadError> {
        let values: Vec<f32> = (0..len)
            .map(|_| 1.0 + norm_rng.gen_range(-0.1..0.1))
            .collect();
        let t = Tensor::from_vec(values, len, &Device::Cpu).map_err(format)?;
        QTensor::quantize(&t, GgmlDType::F32).map_err(format)
    };
    tensors.push(("output_norm.weight".into(), norm(h)?));
    for i in 0..shape.layers {
        tensors.push((format!("blk.{i}.attn_norm.weight"), norm(h)?));
        tensors.push((format!("blk.{i}.ffn_norm.weight"), norm(h)?));
    }
    let u32v = |v: usize| gguf_file::Value::U32(v as u32);
    let mut metadata: HashMap<String, gguf_file::Value> = HashMap::new();
    if let Some(source) = metadata_from {
        for (k, v) in read_header(source)?.metadata {
            if !k.starts_with("llama.") {
                metadata.insert(k, v);
            }
        }
    }
    let entries = [
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        (
            "general.name",
            gguf_file::Value::String(format!("random-llama-seed{seed}")),
        ),
        ("llama.block_count", u32v(shape.layers)),
        ("llama.embedding_length", u32v(shape.hidden)),
        ("llama.attention.head_count", u32v(shape.heads)),
        ("llama.attention.head_count_kv", u32v(shape.kv_heads)),
        ("llama.feed_forward_length", u32v(shape.ffn)),
        ("llama.context_length", u32v(shape.context_length)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(shape.rms_eps),
        ),
        (
            "llama.rope.freq_base",
            gguf_file::Value::F32(shape.rope_theta),
        ),
        ("llama.rope.dimension_count", u32v(shape.head_dim)),
    ];
    for (k, v) in entries {
        metadata.insert(k.into(), v);
    }
    let mut keys: Vec<&String> = metadata.keys().collect();
    keys.sort();
    let metadata: Vec<(&str, &gguf_file::Value)> =
        keys.iter().map(|k| (k.as_str(), &metadata[*k])).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = File::create(dest).map_err(|e| LoadError::Io {
        path: dest.to_path_buf(),
        source: e,
    })?;
    gguf_file::write(&mut out, &metadata, &refs).map_err(format)
}

/// Copy only the metadata of `source` (no tensors) to `dest`: the tokenizer of a model, small enough
/// to carry where the model is not.
pub fn write_metadata_only(source: &Path, dest: &Path) -> Result<(), LoadError> {
    let content = read_header(source)?;
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    let metadata: Vec<(&str, &gguf_file::Value)> = keys
        .iter()
        .map(|k| (k.as_str(), &content.metadata[*k]))
        .collect();
    let mut out = File::create(dest).map_err(|e| LoadError::Io {
        path: dest.to_path_buf(),
        source: e,
    })?;
    gguf_file::write(&mut out, &metadata, &[]).map_err(|e| LoadError::Format {
        path: dest.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The header (metadata and tensor directory) of the GGUF file at `path`.
fn read_header(path: &Path) -> Result<gguf_file::Content, LoadError> {
    let mut file = BufReader::new(File::open(path).map_err(|e| LoadError::Io {
        path: path.to_path_buf(),
        source: e,
    })?);
    gguf_file::Content::read(&mut file).map_err(|e| LoadError::Format {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
