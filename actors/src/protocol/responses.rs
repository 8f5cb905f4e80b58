//! `/v1/responses`: request type, conversion to a chat request, and the response object / stream events
//! built from the chat result (§3.2 of the frontend spec).

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::chat::{ChatCompletionRequest, ChatMessage, MessageContent, Role};
use super::{CommonExt, NvExt, StreamOptions, Usage};
use crate::error::ApiError;

/// `input`: a string or a list of input items.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ResponsesInput {
    /// A single user message.
    Text(String),
    /// Message items (`{"role","content"}` or `{"type":"message",...}`).
    Items(Vec<Value>),
}

/// `POST /v1/responses` body.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResponsesRequest {
    /// Model name.
    pub model: String,
    /// The input.
    pub input: ResponsesInput,
    /// System instructions.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Stream named SSE events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Maximum output tokens (> 0).
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Tools.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    /// Tool choice.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Parallel tool calls.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Store (no-op).
    #[serde(default)]
    pub store: Option<bool>,
    /// Text format options.
    #[serde(default)]
    pub text: Option<Value>,
    /// Reasoning options.
    #[serde(default)]
    pub reasoning: Option<Value>,
    /// Service tier.
    #[serde(default)]
    pub service_tier: Option<String>,
    /// Extra output to include.
    #[serde(default)]
    pub include: Option<Vec<String>>,
    /// Truncation strategy.
    #[serde(default)]
    pub truncation: Option<String>,
    /// Metadata.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Prompt cache key.
    #[serde(default)]
    pub prompt_cache_key: Option<String>,
    /// Prompt cache retention.
    #[serde(default)]
    pub prompt_cache_retention: Option<String>,
    /// Safety identifier.
    #[serde(default)]
    pub safety_identifier: Option<String>,
    /// End-user id.
    #[serde(default)]
    pub user: Option<String>,
    /// Top log probabilities.
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// Not supported (501).
    #[serde(default)]
    pub background: Option<bool>,
    /// Not supported (501).
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// Not supported (501).
    #[serde(default)]
    pub prompt: Option<Value>,
    /// Not supported (501).
    #[serde(default)]
    pub max_tool_calls: Option<u32>,
    /// Dynamo extension.
    #[serde(default)]
    pub nvext: Option<NvExt>,
}

impl ResponsesRequest {
    /// Reject the fields Dynamo answers with 501, then the bounds it checks (400).
    pub fn check(&self) -> Result<(), ApiError> {
        if self.background == Some(true) {
            return Err(ApiError::not_implemented("`background` is not supported."));
        }
        if self.previous_response_id.is_some() {
            return Err(ApiError::not_implemented(
                "`previous_response_id` is not supported.",
            ));
        }
        if self.prompt.is_some() {
            return Err(ApiError::not_implemented("`prompt` is not supported."));
        }
        if self.max_tool_calls.is_some() {
            return Err(ApiError::not_implemented(
                "`max_tool_calls` is not supported.",
            ));
        }
        if let Some(0) = self.max_output_tokens {
            return Err(ApiError::validation(
                "Max tokens must be greater than 0, got 0",
            ));
        }
        Ok(())
    }

    /// Convert to a streaming chat request with usage forced on, as upstream does.
    pub fn to_chat(&self) -> Result<ChatCompletionRequest, ApiError> {
        let mut messages = Vec::new();
        if let Some(instructions) = &self.instructions {
            messages.push(text_message(Role::System, instructions.clone()));
        }
        match &self.input {
            ResponsesInput::Text(text) => messages.push(text_message(Role::User, text.clone())),
            ResponsesInput::Items(items) => {
                for (i, item) in items.iter().enumerate() {
                    messages.push(item_to_message(i, item)?);
                }
            }
        }
        let mut ext = CommonExt {
            nvext: self.nvext.clone(),
            ..CommonExt::default()
        };
        ext.ignore_eos = None;
        Ok(ChatCompletionRequest {
            model: self.model.clone(),
            messages,
            temperature: self.temperature,
            top_p: self.top_p,
            n: None,
            stream: Some(true),
            stream_options: Some(StreamOptions {
                include_usage: true,
                continuous_usage_stats: None,
            }),
            stop: None,
            max_tokens: None,
            max_completion_tokens: self.max_output_tokens,
            presence_penalty: None,
            frequency_penalty: None,
            logit_bias: None,
            logprobs: None,
            top_logprobs: None,
            user: self.user.clone(),
            seed: None,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
            functions: None,
            function_call: None,
            service_tier: None,
            reasoning_effort: None,
            store: None,
            metadata: None,
            modalities: None,
            chat_template_args: None,
            ext,
            unknown: Map::new(),
        })
    }

    /// The request parameters echoed in every response object, with upstream's defaults.
    fn echoed_params(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("instructions".into(), json!(self.instructions));
        m.insert("max_output_tokens".into(), json!(self.max_output_tokens));
        m.insert("temperature".into(), json!(self.temperature.unwrap_or(1.0)));
        m.insert("top_p".into(), json!(self.top_p.unwrap_or(1.0)));
        m.insert(
            "tool_choice".into(),
            self.tool_choice.clone().unwrap_or(json!("auto")),
        );
        m.insert(
            "tools".into(),
            json!(self.tools.clone().unwrap_or_default()),
        );
        m.insert(
            "parallel_tool_calls".into(),
            json!(self.parallel_tool_calls.unwrap_or(true)),
        );
        m.insert("store".into(), json!(self.store.unwrap_or(false)));
        m.insert(
            "truncation".into(),
            json!(self.truncation.clone().unwrap_or_else(|| "disabled".into())),
        );
        m.insert(
            "service_tier".into(),
            json!(self.service_tier.clone().unwrap_or_else(|| "auto".into())),
        );
        m.insert("background".into(), json!(false));
        m.insert("frequency_penalty".into(), json!(0.0));
        m.insert("presence_penalty".into(), json!(0.0));
        m.insert(
            "metadata".into(),
            self.metadata.clone().unwrap_or(json!({})),
        );
        m.insert("top_logprobs".into(), json!(self.top_logprobs.unwrap_or(0)));
        m.insert(
            "text".into(),
            self.text
                .clone()
                .unwrap_or(json!({"format": {"type": "text"}})),
        );
        m.insert(
            "reasoning".into(),
            self.reasoning.clone().unwrap_or(Value::Null),
        );
        m.insert("user".into(), json!(self.user));
        m.insert("previous_response_id".into(), Value::Null);
        m.insert("incomplete_details".into(), Value::Null);
        m.insert("error".into(), Value::Null);
        m
    }
}

fn text_message(role: Role, text: String) -> ChatMessage {
    ChatMessage {
        role,
        content: Some(MessageContent::Text(text)),
        name: None,
        tool_calls: None,
        tool_call_id: None,
        reasoning_content: None,
        refusal: None,
        function_call: None,
    }
}

/// Convert one input item to a chat message; content may be a string or `input_text`/`output_text` parts.
fn item_to_message(index: usize, item: &Value) -> Result<ChatMessage, ApiError> {
    let fail = |why: &str| {
        ApiError::new(
            crate::error::ErrorClass::BadRequest,
            format!("Failed to convert responses request: input[{index}] {why}"),
        )
    };
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    if kind != "message" {
        return Err(fail(&format!("has unsupported type `{kind}`")));
    }
    let role: Role = item
        .get("role")
        .cloned()
        .ok_or_else(|| fail("is missing `role`"))
        .and_then(|r| {
            serde_json::from_value(r).map_err(|e| fail(&format!("has an invalid role: {e}")))
        })?;
    let text = match item.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        text.push_str(part.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    other => {
                        return Err(fail(&format!(
                            "has an unsupported content part type {other:?}"
                        )))
                    }
                }
            }
            text
        }
        _ => return Err(fail("has no text content")),
    };
    Ok(text_message(role, text))
}

/// Builds the Responses API output (object or stream events) from the chat result.
pub struct ResponseBuilder {
    /// `resp_<hex>`.
    pub id: String,
    message_id: String,
    model: String,
    created_at: u64,
    params: Map<String, Value>,
    sequence: u64,
    text: String,
}

impl ResponseBuilder {
    /// Start a response for `request` served by `model`.
    pub fn new(request: &ResponsesRequest, model: &str) -> Self {
        ResponseBuilder {
            id: format!("resp_{}", uuid::Uuid::new_v4().simple()),
            message_id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            model: model.to_string(),
            created_at: super::unix_now(),
            params: request.echoed_params(),
            sequence: 0,
            text: String::new(),
        }
    }

    fn output_item(&self, status: &str) -> Value {
        let content = if status == "completed" {
            json!([{"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}])
        } else {
            json!([])
        };
        json!({"type": "message", "id": self.message_id, "role": "assistant", "status": status, "content": content})
    }

    /// The response object in `status`, with `usage` when known.
    pub fn object(&self, status: &str, usage: Option<Usage>) -> Value {
        let mut obj = Map::new();
        obj.insert("id".into(), json!(self.id));
        obj.insert("object".into(), json!("response"));
        obj.insert("created_at".into(), json!(self.created_at));
        obj.insert("status".into(), json!(status));
        obj.insert("model".into(), json!(self.model));
        let output = if status == "completed" {
            vec![self.output_item("completed")]
        } else {
            vec![]
        };
        obj.insert("output".into(), Value::Array(output));
        if status == "completed" {
            obj.insert("completed_at".into(), json!(super::unix_now()));
        }
        obj.insert(
            "usage".into(),
            match usage {
                Some(u) => json!({
                    "input_tokens": u.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": u.completion_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": u.total_tokens,
                }),
                None => Value::Null,
            },
        );
        for (k, v) in &self.params {
            obj.insert(k.clone(), v.clone());
        }
        Value::Object(obj)
    }

    /// Record generated text (for the final object).
    pub fn push_text(&mut self, delta: &str) {
        self.text.push_str(delta);
    }

    /// One SSE event frame: `event: <type>` + `data: <json with type and sequence_number>`.
    pub fn event(&mut self, kind: &str, mut data: Map<String, Value>) -> String {
        data.insert("type".into(), json!(kind));
        data.insert("sequence_number".into(), json!(self.sequence));
        self.sequence += 1;
        format!("event: {kind}\ndata: {}\n\n", Value::Object(data))
    }

    /// The events that open a stream.
    pub fn opening_events(&mut self) -> String {
        let created = self.object("in_progress", None);
        let mut out = String::new();
        out += &self.event("response.created", obj([("response", created.clone())]));
        out += &self.event("response.in_progress", obj([("response", created)]));
        let item = self.output_item("in_progress");
        out += &self.event(
            "response.output_item.added",
            obj([("output_index", json!(0)), ("item", item)]),
        );
        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        let ids = self.ids();
        out += &self.event("response.content_part.added", with(ids, [("part", part)]));
        out
    }

    fn ids(&self) -> Map<String, Value> {
        obj([
            ("item_id", json!(self.message_id)),
            ("output_index", json!(0)),
            ("content_index", json!(0)),
        ])
    }

    /// A text delta event.
    pub fn delta_event(&mut self, delta: &str) -> String {
        self.push_text(delta);
        let ids = self.ids();
        self.event(
            "response.output_text.delta",
            with(ids, [("delta", json!(delta)), ("logprobs", json!([]))]),
        )
    }

    /// The events that close a successful stream (without `data: [DONE]`).
    pub fn closing_events(&mut self, usage: Usage) -> String {
        let mut out = String::new();
        let ids = self.ids();
        let text = self.text.clone();
        out += &self.event(
            "response.output_text.done",
            with(
                ids.clone(),
                [("text", json!(text)), ("logprobs", json!([]))],
            ),
        );
        let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
        out += &self.event("response.content_part.done", with(ids, [("part", part)]));
        let item = self.output_item("completed");
        out += &self.event(
            "response.output_item.done",
            obj([("output_index", json!(0)), ("item", item)]),
        );
        let done = self.object("completed", Some(usage));
        out += &self.event("response.completed", obj([("response", done)]));
        out
    }

    /// `response.failed` for a backend error.
    pub fn failed_event(&mut self, status: u16, message: &str) -> String {
        let code = match status {
            429 => "rate_limit_exceeded",
            400..=499 => "invalid_prompt",
            _ => "server_error",
        };
        let mut response = self.object("failed", None);
        if let Some(map) = response.as_object_mut() {
            map.insert("error".into(), json!({"code": code, "message": message}));
        }
        self.event("response.failed", obj([("response", response)]))
    }
}

fn obj<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn with<const N: usize>(
    mut base: Map<String, Value>,
    pairs: [(&str, Value); N],
) -> Map<String, Value> {
    for (k, v) in pairs {
        base.insert(k.to_string(), v);
    }
    base
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> ResponsesRequest {
        serde_json::from_value(body).expect("valid test body")
    }

    #[test]
    fn converts_string_input_and_instructions() {
        let r = request(
            json!({"model": "m", "input": "hi", "instructions": "be brief", "max_output_tokens": 5}),
        );
        let chat = r.to_chat().expect("converts");
        assert_eq!(chat.messages.len(), 2);
        assert_eq!(chat.messages[0].role, Role::System);
        assert_eq!(chat.stream, Some(true));
        assert_eq!(chat.max_completion_tokens, Some(5));
        assert!(chat
            .stream_options
            .map(|o| o.include_usage)
            .unwrap_or(false));
    }

    #[test]
    fn unsupported_fields_are_501() {
        let r = request(json!({"model": "m", "input": "hi", "background": true}));
        assert_eq!(
            r.check().map_err(|e| e.class),
            Err(crate::error::ErrorClass::NotImplemented)
        );
    }

    #[test]
    fn events_have_increasing_sequence_numbers() {
        let r = request(json!({"model": "m", "input": "hi"}));
        let mut b = ResponseBuilder::new(&r, "m");
        let text = b.opening_events() + &b.delta_event("a") + &b.closing_events(Usage::new(1, 1));
        let seqs: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| v["sequence_number"].as_u64())
            .collect();
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>());
        assert!(text.contains("event: response.completed"));
    }
}
