//! The real model engine (`out=model`): a llama-architecture GGUF model (SmolLM2-135M-Instruct by
//! default) on CPU with candle, serving many requests at once by **continuous batching**.
//!
//! All requests of one engine share one scheduler on the engine's thread. A driver task repeats
//! steps: drop sequences whose consumer went away, admit waiting sequences (up to `max_num_seqs` and
//! the KV budget), then run one batched forward pass over every running sequence's next token plus
//! prompt chunks of sequences still prefilling (chunked prefill, up to `max_batched_tokens` per step),
//! and sample one token for every sequence that produced logits. Requests join and leave between
//! steps. Between steps the driver yields, so the actor's mailbox (new requests) and the request
//! futures (which forward tokens to their HTTP streams) run.
//!
//! The engine decides `finish_reason` for stop token ids (EOS unless `ignore_eos`; never before
//! `min_tokens`, those tokens are masked until then), `max_tokens` and the context length. Stop
//! strings and detokenization stay in the backend stage, which ends the stream (and so the sequence)
//! when a stop string matches.
//!
//! Layout:
//! - `weights`: loading and re-quantizing the GGUF ([`LlamaModel`]).
//! - `forward`: the batched forward pass and per-sequence KV caches.
//! - `sampler`: logits → next token (penalties, bias, temperature, top-k/p, min-p, seed, logprobs).
//! - `engine`: [`ModelEngine`], the scheduler and its driver.
//! - `shared`: loading the weights through the GPU memory service (writer once, readers after).

mod engine;
pub mod forward;
pub mod sampler;
pub mod shared;
pub mod synthetic;
pub mod weights;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use engine::{ModelEngine, ModelLoad};

use tokio::sync::mpsc;

use crate::engine::TokenSink;
use crate::error::ApiError;
use crate::protocol::engine::{EngineOutput, EngineRequest};
use crate::setting::InvalidSetting;

/// What a model engine's scheduler hands a request's future.
pub enum Emission {
    /// One token (and maybe the finish).
    Output(EngineOutput),
    /// The request failed.
    Failed(ApiError),
}

/// The checks both model engines (CPU and GPU) make before queueing `request` for a model of `vocab`
/// tokens and `context_length`: a non-empty prompt of known ids that leaves room to generate. Returns
/// the tokens it may generate (`max_tokens` capped by the room left).
pub(crate) fn admit_request(
    request: &EngineRequest,
    vocab: usize,
    context_length: usize,
) -> Result<u32, ApiError> {
    let prompt_len = request.token_ids.len();
    if prompt_len == 0 {
        return Err(ApiError::validation(
            "The prompt is empty: there is nothing to continue",
        ));
    }
    if let Some(bad) = request.token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::validation(format!(
            "Token id {bad} is out of range: the model's vocabulary has {vocab} tokens"
        )));
    }
    if prompt_len >= context_length {
        return Err(ApiError::validation(format!(
            "The prompt has {prompt_len} tokens, which exceeds the model's context length of {context_length} tokens"
        )));
    }
    let room = (context_length - prompt_len) as u32;
    Ok(request.stop.max_tokens.unwrap_or(room).min(room).max(1))
}

/// Why a sequence ends after its `generated`-th token `token`, if it does: a stop id once
/// `min_tokens` are out (before that the samplers ban them), else `max_new` tokens or a sequence of
/// `len` tokens reaching the `context_length`.
pub(crate) fn finish_after(
    token: u32,
    stop_ids: &[u32],
    generated: u32,
    min_tokens: u32,
    max_new: u32,
    len: usize,
    context_length: usize,
) -> Option<crate::protocol::FinishReason> {
    use crate::protocol::FinishReason;
    if stop_ids.contains(&token) && generated >= min_tokens {
        Some(FinishReason::Stop)
    } else if generated >= max_new || len >= context_length {
        Some(FinishReason::Length)
    } else {
        None
    }
}

/// Forward a sequence's emissions to its sink until it finishes, fails or the consumer leaves.
/// Returns `false` when the scheduler dropped the sequence without a last word (a panicked step).
pub(crate) async fn relay(
    mut outputs: mpsc::UnboundedReceiver<Emission>,
    sink: &TokenSink,
) -> bool {
    while let Some(emission) = outputs.recv().await {
        match emission {
            Emission::Output(output) => {
                let last = output.finish_reason.is_some();
                if sink.send(output).await.is_err() || last {
                    return true;
                }
            }
            Emission::Failed(error) => {
                sink.fail(error).await;
                return true;
            }
        }
    }
    false
}
pub use weights::{LlamaModel, LoadError, ModelShape};

/// `[model_engine]`: settings of the real model engine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelEngineConfig {
    /// Threads the matmul kernels use (`CANDLE_NUM_THREADS`). Process-wide: candle has one pool, and
    /// engines of one process take turns on it. 1 is fastest when anything else runs on the machine.
    pub threads: usize,
    /// Sequences decoded together at most; more wait for a slot.
    pub max_num_seqs: usize,
    /// Tokens one step runs at most (decode tokens first, then prompt chunks).
    pub max_batched_tokens: usize,
    /// Tokens all sequences' KV caches may hold together when admitting a new one (46 KB per token for
    /// SmolLM2-135M); a sequence is always admitted when nothing else runs.
    pub max_kv_tokens: usize,
    /// Load the weights through the GPU memory service listening here (`dynamix gms --tag weights`,
    /// host backend): the first process writes the re-quantized tensors, later ones map them. `None`:
    /// read the GGUF in every process.
    pub gms_socket: Option<std::path::PathBuf>,
    /// Where default memory-service sockets live (`GMS_SOCKET_DIR`; `None`: the temp dir).
    pub gms_socket_dir: Option<std::path::PathBuf>,
    /// Run the memory service inside this process (host backend, tag `weights`) at `gms_socket`, or at
    /// the default socket `{GMS_SOCKET_DIR or /tmp}/gms_host-0_weights.sock`, and load through it: this
    /// process writes the weights, other processes on the machine map them. When a service already
    /// answers on that socket, the weights are loaded through it instead. Off by default; the shipped
    /// `configs/default.toml` turns it on.
    pub gms_serve: bool,
    /// How long to wait for another process that is still writing the weights into the service.
    pub gms_lock_timeout_secs: f64,
}

impl Default for ModelEngineConfig {
    fn default() -> Self {
        ModelEngineConfig {
            threads: 1,
            max_num_seqs: 32,
            max_batched_tokens: 256,
            max_kv_tokens: 65_536,
            gms_socket: None,
            gms_socket_dir: None,
            gms_serve: false,
            gms_lock_timeout_secs: 120.0,
        }
    }
}

impl ModelEngineConfig {
    /// A description of the first bad value, if any.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.threads == 0 {
            return Err(InvalidSetting::new(
                "model_engine.threads",
                0,
                "must be at least 1",
            ));
        }
        if self.max_num_seqs == 0 {
            return Err(InvalidSetting::new(
                "model_engine.max_num_seqs",
                0,
                "must be at least 1",
            ));
        }
        if self.max_batched_tokens < self.max_num_seqs {
            return Err(InvalidSetting::new(
                "model_engine.max_batched_tokens",
                self.max_batched_tokens,
                format!(
                    "must be at least max_num_seqs ({}): every running sequence decodes one token per step",
                    self.max_num_seqs
                ),
            ));
        }
        if !(self.gms_lock_timeout_secs.is_finite() && self.gms_lock_timeout_secs > 0.0) {
            return Err(InvalidSetting::new(
                "model_engine.gms_lock_timeout_secs",
                self.gms_lock_timeout_secs,
                "must be a positive number of seconds",
            ));
        }
        if self.max_kv_tokens == 0 {
            return Err(InvalidSetting::new(
                "model_engine.max_kv_tokens",
                0,
                "must be at least 1",
            ));
        }
        Ok(())
    }
}
