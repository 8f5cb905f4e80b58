//! Wire types: the OpenAI-compatible request and response bodies, and the internal request/output types
//! that travel between the validator, the router and the engines.
//!
//! Layout:
//! - [`chat`]: `/v1/chat/completions` request, response and stream chunk.
//! - [`completions`]: `/v1/completions` request, response and stream chunk.
//! - [`responses`]: `/v1/responses` request and its conversion to and from chat.
//! - [`embeddings`]: `/v1/embeddings` request and response.
//! - [`engine`]: [`engine::EngineRequest`] (a validated, tokenized request) and [`engine::EngineOutput`].

pub mod chat;
pub mod completions;
pub mod embeddings;
pub mod engine;
pub mod responses;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `stop`: a single string or a list of strings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum StopSpec {
    /// One stop sequence.
    One(String),
    /// Up to 32 stop sequences.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct StreamOptions {
    /// Send a final usage-only chunk.
    #[serde(default)]
    pub include_usage: bool,
    /// Accepted for compatibility with newer SDKs; usage is always reported on the last chunk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuous_usage_stats: Option<bool>,
}

/// Token accounting returned in `usage`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the (templated) prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Sum of the two.
    pub total_tokens: u32,
}

/// `usage` with its fields in alphabetical order, as non-streaming responses write it (stream
/// chunks keep the declaration order).
pub fn usage_alphabetical<S: serde::Serializer>(
    usage: &Usage,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut fields = serializer.serialize_struct("Usage", 3)?;
    fields.serialize_field("completion_tokens", &usage.completion_tokens)?;
    fields.serialize_field("prompt_tokens", &usage.prompt_tokens)?;
    fields.serialize_field("total_tokens", &usage.total_tokens)?;
    fields.end()
}

impl Usage {
    /// Usage for the given counts.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Dynamo's `nvext` extension object (the fields this build acts on; the rest are accepted and ignored).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct NvExt {
    /// Force greedy sampling.
    #[serde(default)]
    pub greed_sampling: Option<bool>,
    /// Bypass the chat template and tokenize the prompt as is.
    #[serde(default)]
    pub use_raw_prompt: Option<bool>,
    /// Out-of-band annotations to stream (`"request_id"` is supported).
    #[serde(default)]
    pub annotations: Option<Vec<String>>,
    /// Pin the request to one engine instance.
    #[serde(default)]
    pub backend_instance_id: Option<u64>,
    /// Pre-tokenized prompt (skips tokenization).
    #[serde(default)]
    pub token_data: Option<Vec<u32>>,
    /// Deprecated location of `ignore_eos` (top level wins).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Deprecated location of `top_k` (top level wins).
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Deprecated location of `repetition_penalty` (top level wins).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Everything else upstream defines (accepted, not acted on).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

/// Fields shared by chat and completions requests that are Dynamo extensions at the top level.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct CommonExt {
    /// Keep generating past end-of-sequence tokens.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Minimum number of tokens before a stop condition may end generation.
    #[serde(default)]
    pub min_tokens: Option<u32>,
    /// Top-k sampling (−1 or null = off).
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Repetition penalty, (0, 2].
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Min-p sampling, [0, 1].
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Emit the matched stop string.
    #[serde(default)]
    pub include_stop_str_in_output: Option<bool>,
    /// Drop special tokens when detokenizing (default true).
    #[serde(default)]
    pub skip_special_tokens: Option<bool>,
    /// Guided decoding (accepted; engines of this build do not constrain output).
    #[serde(default)]
    pub guided_json: Option<Value>,
    /// Guided decoding by regex.
    #[serde(default)]
    pub guided_regex: Option<String>,
    /// Guided decoding by grammar.
    #[serde(default)]
    pub guided_grammar: Option<String>,
    /// Guided decoding by choice.
    #[serde(default)]
    pub guided_choice: Option<Vec<String>>,
    /// Guided decoding backend name.
    #[serde(default)]
    pub guided_decoding_backend: Option<String>,
    /// Pass-through extra: cache salt.
    #[serde(default)]
    pub cache_salt: Option<String>,
    /// Pass-through extra: token ids that stop generation.
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    /// Pass-through extra.
    #[serde(default)]
    pub detokenize: Option<bool>,
    /// Pass-through extra.
    #[serde(default)]
    pub allowed_token_ids: Option<Vec<u32>>,
    /// Pass-through extra.
    #[serde(default)]
    pub bad_words_token_ids: Option<Vec<Vec<u32>>>,
    /// Dynamo extension object.
    #[serde(default)]
    pub nvext: Option<NvExt>,
}

/// Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Finish reasons on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop condition (EOS, stop string or stop token) ended generation.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The request was cancelled.
    Cancelled,
    /// Output was withheld by a content filter (reported by some remote engines).
    ContentFilter,
}
