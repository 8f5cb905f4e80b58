//! The internal request and output types: what the validator hands to the router and an engine, and what
//! an engine streams back.

use serde::{Deserialize, Serialize};

use super::FinishReason;
use crate::error::ApiError;

/// Sampling parameters after validation and defaulting.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptions {
    /// Temperature (None = engine default).
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Top-k (None or −1 = off).
    pub top_k: Option<i32>,
    /// Min-p.
    pub min_p: Option<f32>,
    /// Seed for reproducible sampling.
    pub seed: Option<u64>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Force greedy decoding.
    pub greedy: bool,
    /// Added to the logits of these token ids before sampling (OpenAI `logit_bias`, -100..=100).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// Report each generated token's log-probability and this many alternatives (`None` = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
}

/// A generated token's log-probability and the most likely alternatives at that step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token.
    pub token_id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens at that step with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// When generation ends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StopConditions {
    /// Maximum new tokens (None = until a stop condition or the context length).
    pub max_tokens: Option<u32>,
    /// Stop strings (not emitted unless `include_stop_str_in_output`).
    pub stop: Vec<String>,
    /// Token ids that stop generation (EOS is added unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// No stop condition may fire before this many tokens.
    pub min_tokens: u32,
    /// Emit the matched stop string.
    pub include_stop_str_in_output: bool,
}

/// A validated, tokenized request: the only type an engine accepts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineRequest {
    /// Canonical request id (UUID); kept across retries.
    pub request_id: String,
    /// Served model name.
    pub model: String,
    /// The templated prompt's token ids.
    pub token_ids: Vec<u32>,
    /// The text `echo_full` echoes: the last user message (chat) or the prompt (completions).
    pub echo_text: String,
    /// Sampling options.
    pub sampling: SamplingOptions,
    /// Stop conditions.
    pub stop: StopConditions,
    /// Pin to this engine instance id (nvext `backend_instance_id` or header).
    pub pinned_engine: Option<u64>,
    /// Outputs of this request an earlier attempt already delivered (request migration); their token
    /// ids were appended to `token_ids`. Deterministic engines (echo) continue after them; model
    /// engines need nothing more than the extended prompt.
    #[serde(default)]
    pub resumed_outputs: u32,
}

/// One step of an engine's output stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineOutput {
    /// Newly generated token ids.
    pub token_ids: Vec<u32>,
    /// Text produced directly by the engine (`echo_full`); when set it is used instead of detokenizing.
    pub text: Option<String>,
    /// Set on the last output of the stream.
    pub finish_reason: Option<FinishReason>,
    /// One entry per token of `token_ids` when the request asked for log-probabilities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
    /// On the first output, when the engine knows: prompt tokens served from its prefix cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
}

/// What flows through an engine's bounded output channel.
pub type EngineEvent = Result<EngineOutput, ApiError>;

/// A worker's load as it publishes it on the load-metrics subject.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadMetrics {
    /// The instance.
    pub worker_id: u64,
    /// Requests running on it.
    pub active_requests: u64,
    /// Requests it admits at once.
    pub capacity: u64,
    /// KV blocks in use (mocker) — `None` when the engine does not track blocks.
    #[serde(default)]
    pub kv_active_blocks: Option<u64>,
    /// KV blocks it has.
    #[serde(default)]
    pub kv_total_blocks: Option<u64>,
    /// Requests waiting for a batch slot.
    #[serde(default)]
    pub waiting_requests: Option<u64>,
}
