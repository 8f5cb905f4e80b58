//! `/v1/completions`: request, non-streaming response and stream chunk.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{CommonExt, FinishReason, StopSpec, StreamOptions, Usage};

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    /// One text prompt.
    Text(String),
    /// Several text prompts (one choice set each).
    Texts(Vec<String>),
    /// One pre-tokenized prompt.
    Tokens(Vec<u32>),
    /// Several pre-tokenized prompts.
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions` body.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct CompletionRequest {
    /// Model name.
    pub model: String,
    /// The prompt(s).
    pub prompt: Prompt,
    /// Text after the completion (≤ 10000 chars).
    #[serde(default)]
    pub suffix: Option<String>,
    /// Maximum new tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Choices per prompt.
    #[serde(default)]
    pub n: Option<u32>,
    /// Stream with SSE.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Log probabilities of the top N tokens, 0–5.
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Echo the prompt in the output.
    #[serde(default)]
    pub echo: Option<bool>,
    /// Stop sequences.
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Presence penalty.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Best-of sampling, 0–20, ≥ n.
    #[serde(default)]
    pub best_of: Option<u32>,
    /// Token-id → bias.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// End-user id.
    #[serde(default)]
    pub user: Option<String>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Base64 prompt embeddings.
    #[serde(default)]
    pub prompt_embeds: Option<String>,
    /// Dynamo extensions at the top level.
    #[serde(flatten)]
    pub ext: CommonExt,
    /// Anything else: rejected as `Unsupported parameter(s)`.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, Value>,
}

/// A choice of a completion response or chunk.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CompletionChoice {
    /// Choice index.
    pub index: u32,
    /// Generated text (delta in a chunk).
    pub text: String,
    /// Why generation ended.
    pub finish_reason: Option<FinishReason>,
    /// Log probabilities.
    pub logprobs: Option<Value>,
}

/// `text_completion` response or chunk (the same shape).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CompletionResponse {
    /// `cmpl-<request id>`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<CompletionChoice>,
    /// Usage (always on a non-streaming response; on the last chunk when requested).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend fingerprint.
    pub system_fingerprint: Option<String>,
}
