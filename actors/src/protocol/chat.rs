//! `/v1/chat/completions`: request, non-streaming response and stream chunk.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{CommonExt, FinishReason, StopSpec, StreamOptions, Usage};

/// Message content: a string or a list of typed parts.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Typed parts (`{"type":"text","text":...}`; other part types are rejected by validation).
    Parts(Vec<ContentPart>),
}

/// One typed content part.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ContentPart {
    /// Part type, e.g. `text`, `image_url`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Text of a `text` part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Other fields of the part (image_url, input_audio, ...).
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

impl MessageContent {
    /// The text of the content, parts joined (non-text parts contribute nothing).
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(s) => s.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(""),
        }
    }
}

/// Roles accepted in `messages`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System prompt.
    System,
    /// Developer prompt (treated as system).
    Developer,
    /// User turn.
    User,
    /// Assistant turn.
    Assistant,
    /// Tool result.
    Tool,
    /// Legacy function result.
    Function,
}

impl Role {
    /// Name used in the chat template.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System | Role::Developer => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Function => "function",
        }
    }
}

/// One chat message.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// Author role.
    pub role: Role,
    /// Content (may be null for assistant messages carrying tool calls).
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Assistant tool calls from an earlier turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Id of the tool call a tool message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Reasoning text of an earlier assistant turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Refusal text of an earlier assistant turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Legacy function call of an earlier assistant turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function_call: Option<Value>,
}

/// A tool call in an assistant message.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ToolCall {
    /// Call id.
    #[serde(default)]
    pub id: Option<String>,
    /// Always `function`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The function called.
    pub function: FunctionCall,
}

/// Function name and JSON-encoded arguments.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON object string.
    #[serde(default)]
    pub arguments: String,
}

/// A tool definition.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function.
    pub function: FunctionDef,
}

/// A function definition.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct FunctionDef {
    /// Name (`[A-Za-z0-9_-]`, ≤ 96 bytes).
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON schema of the parameters.
    #[serde(default)]
    pub parameters: Option<Value>,
    /// Strict schema adherence.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// `POST /v1/chat/completions` body. Unknown fields are collected in `unknown` and rejected by validation.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ChatCompletionRequest {
    /// Model name.
    pub model: String,
    /// Conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Sampling temperature, 0–2.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling, 0–1.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Choices to generate, 1–128.
    #[serde(default)]
    pub n: Option<u32>,
    /// Stream with SSE.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options (only with `stream: true`).
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Stop sequences.
    #[serde(default)]
    pub stop: Option<StopSpec>,
    /// Deprecated maximum of new tokens.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Maximum of new tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    /// Presence penalty, −2–2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty, −2–2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Token-id → bias, −100–100.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// Return log probabilities.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Top log probabilities per token, 0–20.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// End-user id.
    #[serde(default)]
    pub user: Option<String>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Tool definitions.
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    /// Tool choice.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Allow parallel tool calls.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Output format.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Deprecated (501).
    #[serde(default)]
    pub functions: Option<Value>,
    /// Deprecated (501).
    #[serde(default)]
    pub function_call: Option<Value>,
    /// Accepted OpenAI fields this build does not act on.
    #[serde(default)]
    pub service_tier: Option<String>,
    /// Reasoning effort.
    #[serde(default)]
    pub reasoning_effort: Option<String>,
    /// Store the completion (no-op).
    #[serde(default)]
    pub store: Option<bool>,
    /// Metadata (no-op).
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Output modalities.
    #[serde(default)]
    pub modalities: Option<Value>,
    /// Chat template arguments.
    #[serde(default)]
    pub chat_template_args: Option<serde_json::Map<String, Value>>,
    /// Dynamo extensions at the top level.
    #[serde(flatten)]
    pub ext: CommonExt,
    /// Anything else: rejected as `Unsupported parameter(s)` unless configured to ignore.
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, Value>,
}

// The non-streaming response is serialized straight from these types, with their fields in the
// order it has always had on the wire: alphabetical, as the `serde_json::Value` it used to be built
// as wrote them.

/// A choice in a non-streaming chat response.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatChoice {
    /// Why generation ended.
    pub finish_reason: Option<FinishReason>,
    /// Choice index.
    pub index: u32,
    /// Log probabilities (not produced by this build's engines).
    pub logprobs: Option<Value>,
    /// The assistant message.
    pub message: ResponseMessage,
}

/// The assistant message of a response.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ResponseMessage {
    /// Generated text.
    pub content: Option<String>,
    /// Always `assistant`.
    pub role: &'static str,
}

/// Non-streaming chat response (`chat.completion`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatCompletionResponse {
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Unix seconds.
    pub created: u64,
    /// `chatcmpl-<request id>`.
    pub id: String,
    /// Served model name.
    pub model: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Backend fingerprint.
    pub system_fingerprint: Option<String>,
    /// Token usage.
    #[serde(serialize_with = "crate::protocol::usage_alphabetical")]
    pub usage: Usage,
}

/// Streamed delta.
#[derive(Clone, Debug, Serialize, Default, PartialEq)]
pub struct ChunkDelta {
    /// `assistant` on the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A choice in a stream chunk.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChunkChoice {
    /// Choice index.
    pub index: u32,
    /// The delta.
    pub delta: ChunkDelta,
    /// Set on the last chunk of the choice.
    pub finish_reason: Option<FinishReason>,
    /// Log probabilities.
    pub logprobs: Option<Value>,
}

/// Stream chunk (`chat.completion.chunk`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ChatCompletionChunk {
    /// Same id on every chunk of a response.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices (empty on the usage-only chunk).
    pub choices: Vec<ChunkChoice>,
    /// Usage, only on the final usage chunk when requested.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Backend fingerprint.
    pub system_fingerprint: Option<String>,
}
