//! The model's weights on one GPU, read from the GGUF file and converted to bf16 there.
//!
//! Q8_0, Q4_0, Q4_1, F16 and F32 tensors are copied to the device as stored and dequantized by a
//! kernel (`kernels/weights.cu`); other GGUF types (the K-quants) are dequantized to f32 on the host
//! by candle first. Projections that read the same input are stored side by side so one GEMM runs
//! them: Q, K and V as one `[hidden + 2·kv, hidden]` matrix, gate and up as one `[2·ffn, hidden]`.
//! Norm weights and the RoPE tables stay f32.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;

use super::device::{grid, Arg, DeviceMemory, GpuDevice};
use super::GpuError;
use crate::engine::model::{LlamaModel, ModelShape};

/// One transformer block's weights on the device.
pub struct GpuLayer {
    /// f32 [hidden].
    pub attn_norm: DeviceMemory,
    /// bf16 [hidden + 2·kv_width, hidden]: Q, K, V rows.
    pub wqkv: DeviceMemory,
    /// bf16 [hidden, hidden].
    pub wo: DeviceMemory,
    /// f32 [hidden].
    pub ffn_norm: DeviceMemory,
    /// bf16 [2·ffn, hidden]: gate rows then up rows.
    pub w_gate_up: DeviceMemory,
    /// bf16 [hidden, ffn].
    pub w_down: DeviceMemory,
}

/// A model's weights on one GPU.
pub struct GpuWeights {
    /// The model's shape.
    pub shape: ModelShape,
    /// bf16 [vocab, hidden]: the token embedding (also the output head when the file ties them).
    pub embedding: DeviceMemory,
    /// bf16 [vocab, hidden] when the file has its own `output.weight`.
    pub output: Option<DeviceMemory>,
    /// f32 [hidden].
    pub final_norm: DeviceMemory,
    /// The blocks.
    pub layers: Vec<GpuLayer>,
    /// f32 [context_length, head_dim / 2].
    pub rope_cos: DeviceMemory,
    /// f32 [context_length, head_dim / 2].
    pub rope_sin: DeviceMemory,
    /// How long loading took.
    pub load_time: Duration,
}

impl GpuWeights {
    /// Address of the output head (bf16 [vocab, hidden]).
    pub fn output_head(&self) -> u64 {
        self.output.as_ref().unwrap_or(&self.embedding).ptr()
    }

    /// Bytes of weights one decode step reads: every projection and the output head.
    pub fn bytes_per_step(&self) -> u64 {
        let s = &self.shape;
        let per_layer = (s.hidden + 2 * s.kv_width()) * s.hidden
            + s.hidden * s.hidden
            + 2 * s.ffn * s.hidden
            + s.hidden * s.ffn;
        ((per_layer * s.layers + s.vocab * s.hidden) * 2) as u64
    }

    /// Read `path` and put its weights on `device`.
    pub fn load(device: &GpuDevice, path: &Path) -> Result<GpuWeights, GpuError> {
        let started = Instant::now();
        let (shape, _) = LlamaModel::plan(path).map_err(|e| GpuError::Model(e.to_string()))?;
        super::kernels::check_shape(&shape)?;
        let mut reader = Reader::open(path)?;
        let (h, kv, ffn) = (shape.hidden, shape.kv_width(), shape.ffn);
        let bf16 = |rows: usize, cols: usize, what: &str| device.alloc(rows * cols * 2, what);
        let embedding = bf16(shape.vocab, h, "token embedding")?;
        reader.matrix(device, "token_embd.weight", &embedding, 0, shape.vocab * h)?;
        let output = if reader.has("output.weight") {
            let out = bf16(shape.vocab, h, "output head")?;
            reader.matrix(device, "output.weight", &out, 0, shape.vocab * h)?;
            Some(out)
        } else {
            None
        };
        let final_norm = reader.vector(device, "output_norm.weight", h)?;
        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let p = format!("blk.{i}");
            let wqkv = bf16(h + 2 * kv, h, "attention weights")?;
            reader.matrix(device, &format!("{p}.attn_q.weight"), &wqkv, 0, h * h)?;
            reader.matrix(device, &format!("{p}.attn_k.weight"), &wqkv, h * h, kv * h)?;
            reader.matrix(
                device,
                &format!("{p}.attn_v.weight"),
                &wqkv,
                (h + kv) * h,
                kv * h,
            )?;
            let wo = bf16(h, h, "attention output weights")?;
            reader.matrix(device, &format!("{p}.attn_output.weight"), &wo, 0, h * h)?;
            let w_gate_up = bf16(2 * ffn, h, "feed-forward weights")?;
            reader.matrix(
                device,
                &format!("{p}.ffn_gate.weight"),
                &w_gate_up,
                0,
                ffn * h,
            )?;
            reader.matrix(
                device,
                &format!("{p}.ffn_up.weight"),
                &w_gate_up,
                ffn * h,
                ffn * h,
            )?;
            let w_down = bf16(h, ffn, "feed-forward output weights")?;
            reader.matrix(device, &format!("{p}.ffn_down.weight"), &w_down, 0, h * ffn)?;
            layers.push(GpuLayer {
                attn_norm: reader.vector(device, &format!("{p}.attn_norm.weight"), h)?,
                ffn_norm: reader.vector(device, &format!("{p}.ffn_norm.weight"), h)?,
                wqkv,
                wo,
                w_gate_up,
                w_down,
            });
        }
        let (cos, sin) = crate::engine::model::weights::rope_tables(
            shape.context_length,
            shape.head_dim,
            shape.rope_theta,
        );
        let rope_cos = device.alloc(cos.len() * 4, "RoPE table")?;
        device.upload(rope_cos.ptr(), &cos)?;
        let rope_sin = device.alloc(sin.len() * 4, "RoPE table")?;
        device.upload(rope_sin.ptr(), &sin)?;
        device.synchronize()?;
        Ok(GpuWeights {
            shape,
            embedding,
            output,
            final_norm,
            layers,
            rope_cos,
            rope_sin,
            load_time: started.elapsed(),
        })
    }
}

/// Reads raw tensors out of the GGUF file and converts them on the device.
struct Reader<'a> {
    path: &'a Path,
    content: gguf_file::Content,
    file: BufReader<File>,
    /// Raw bytes of the tensor being converted.
    host: Vec<u8>,
    /// Their copy on the device.
    staging: Option<DeviceMemory>,
}

impl<'a> Reader<'a> {
    fn open(path: &'a Path) -> Result<Self, GpuError> {
        let io =
            |e: std::io::Error| GpuError::Model(format!("cannot read {}: {e}", path.display()));
        let mut file = BufReader::new(File::open(path).map_err(io)?);
        let content = gguf_file::Content::read(&mut file).map_err(|e| {
            GpuError::Model(format!(
                "{} is not a readable GGUF file: {e}",
                path.display()
            ))
        })?;
        Ok(Reader {
            path,
            content,
            file,
            host: Vec::new(),
            staging: None,
        })
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn error(&self, name: &str, reason: impl std::fmt::Display) -> GpuError {
        GpuError::Model(format!("{}: tensor {name}: {reason}", self.path.display()))
    }

    fn info(&self, name: &str, elems: usize) -> Result<(GgmlDType, u64), GpuError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.error(name, "missing"))?;
        if info.shape.elem_count() != elems {
            return Err(self.error(
                name,
                format!("{} elements, expected {elems}", info.shape.elem_count()),
            ));
        }
        Ok((
            info.ggml_dtype,
            self.content.tensor_data_offset + info.offset,
        ))
    }

    /// Convert tensor `name` (`elems` values) to bf16 at element `at` of `dst`.
    fn matrix(
        &mut self,
        device: &GpuDevice,
        name: &str,
        dst: &DeviceMemory,
        at: usize,
        elems: usize,
    ) -> Result<(), GpuError> {
        let (dtype, offset) = self.info(name, elems)?;
        if (at + elems) * 2 > dst.bytes() {
            return Err(self.error(name, "does not fit its destination"));
        }
        let kernel = match dtype {
            GgmlDType::Q8_0 => Some("dequant_q8_0"),
            GgmlDType::Q4_0 => Some("dequant_q4_0"),
            GgmlDType::Q4_1 => Some("dequant_q4_1"),
            GgmlDType::F16 => Some("f16_to_bf16"),
            GgmlDType::F32 => Some("f32_to_bf16"),
            _ => None,
        };
        let kernel = match kernel {
            Some(kernel) => {
                let bytes = elems / dtype.block_size() * dtype.type_size();
                self.read_raw(name, offset, bytes)?;
                kernel
            }
            None => {
                // Host dequantization (K-quants): f32 values, converted on the device.
                let values = self.dense(name)?;
                self.host.clear();
                for v in values {
                    self.host.extend_from_slice(&v.to_le_bytes());
                }
                "f32_to_bf16"
            }
        };
        let staging = self.stage(device)?;
        device.launch(
            kernel,
            grid(((elems as u32).div_ceil(256), 1, 1), 256),
            &[
                Arg::Ptr(staging),
                Arg::Ptr(dst.at(at * 2)),
                Arg::I64(elems as i64),
            ],
        )
    }

    /// Tensor `name` as `len` f32 values on the device.
    fn vector(
        &mut self,
        device: &GpuDevice,
        name: &str,
        len: usize,
    ) -> Result<DeviceMemory, GpuError> {
        self.info(name, len)?;
        let values = self.dense(name)?;
        let out = device.alloc(len * 4, name)?;
        device.upload(out.ptr(), &values)?;
        Ok(out)
    }

    fn dense(&mut self, name: &str) -> Result<Vec<f32>, GpuError> {
        let tensor = self
            .content
            .tensor(&mut self.file, name, &Device::Cpu)
            .map_err(|e| self.error(name, e))?;
        tensor
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| self.error(name, e))
    }

    fn read_raw(&mut self, name: &str, offset: u64, bytes: usize) -> Result<(), GpuError> {
        self.host.resize(bytes, 0);
        let read = self
            .file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(&mut self.host));
        read.map_err(|e| self.error(name, format!("cannot read {bytes} bytes at {offset}: {e}")))
    }

    /// Copy `host` to the staging buffer (grown as needed); returns its address.
    fn stage(&mut self, device: &GpuDevice) -> Result<u64, GpuError> {
        if self
            .staging
            .as_ref()
            .is_none_or(|s| s.bytes() < self.host.len())
        {
            // The old buffer may still be read by a queued kernel.
            device.synchronize()?;
            self.staging = Some(device.alloc(self.host.len(), "weight staging")?);
        }
        let staging = self.staging.as_ref().map(|s| s.ptr()).unwrap_or(0);
        device.upload(staging, &self.host)?;
        Ok(staging)
    }
}
