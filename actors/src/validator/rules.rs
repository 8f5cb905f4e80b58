//! The field rules of §4.1: each check names the parameter, the allowed range and the value given, with
//! Dynamo's exact texts (prefixed `Validation: ` by [`ApiError::validation`]).

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::protocol::chat::{ChatCompletionRequest, MessageContent, Role};
use crate::protocol::completions::{CompletionRequest, Prompt};
use crate::protocol::{CommonExt, StopSpec};

type Check = Result<(), ApiError>;

fn range(value: Option<f32>, lo: f32, hi: f32, what: &str) -> Check {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(ApiError::validation(format!(
            "{what} must be between {lo} and {hi}, got {v}"
        ))),
        _ => Ok(()),
    }
}

/// Sampling bounds shared by chat and completions.
pub fn sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    ext: &CommonExt,
) -> Check {
    range(temperature, 0.0, 2.0, "Temperature")?;
    range(top_p, 0.0, 1.0, "Top_p")?;
    if let Some(k) = ext.top_k {
        if k < -1 {
            return Err(ApiError::validation(
                "Top_k must be null or greater than or equal to -1",
            ));
        }
    }
    range(ext.min_p, 0.0, 1.0, "Min_p")?;
    range(frequency_penalty, -2.0, 2.0, "Frequency penalty")?;
    range(presence_penalty, -2.0, 2.0, "Presence penalty")?;
    if let Some(r) = ext.repetition_penalty {
        if r <= 0.0 || r > 2.0 || r.is_nan() {
            return Err(ApiError::validation(format!(
                "Repetition penalty must be between 0 and 2, got {r}"
            )));
        }
    }
    Ok(())
}

/// `logit_bias`: numeric values in −100..=100.
pub fn logit_bias(bias: Option<&Map<String, Value>>) -> Check {
    for (token, value) in bias.into_iter().flatten() {
        let Some(v) = value.as_f64() else {
            return Err(ApiError::validation(format!(
                "Logit bias value for token '{token}' must be a number, got {value}"
            )));
        };
        if !(-100.0..=100.0).contains(&v) {
            return Err(ApiError::validation(format!(
                "Logit bias for token '{token}' must be between -100 and 100, got {v}"
            )));
        }
    }
    Ok(())
}

/// `n` in 1..=128, and not with temperature 0.
pub fn n_choices(n: Option<u32>, temperature: Option<f32>) -> Check {
    let Some(n) = n else { return Ok(()) };
    if !(1..=128).contains(&n) {
        return Err(ApiError::validation(format!(
            "n must be between 1 and 128, got {n}"
        )));
    }
    let t = temperature.unwrap_or(1.0);
    if n > 1 && t == 0.0 {
        return Err(ApiError::validation(format!(
            "When n > 1, temperature must be greater than 0 to ensure diverse outputs. Got n={n}, temperature={t}"
        )));
    }
    Ok(())
}

/// `stop` strings, and `stop_token_ids`.
pub fn stop(stop: Option<&StopSpec>, stop_token_ids: Option<&Vec<u32>>) -> Check {
    match stop {
        Some(StopSpec::One(s)) if s.is_empty() => {
            return Err(ApiError::validation("Stop sequence cannot be empty"))
        }
        Some(StopSpec::Many(list)) => {
            if list.is_empty() {
                return Err(ApiError::validation("Stop sequences array cannot be empty"));
            }
            if list.len() > 32 {
                return Err(ApiError::validation(format!(
                    "Maximum of 32 stop sequences allowed, got {}",
                    list.len()
                )));
            }
            if let Some(i) = list.iter().position(String::is_empty) {
                return Err(ApiError::validation(format!(
                    "Stop sequence at index {i} cannot be empty"
                )));
            }
        }
        _ => {}
    }
    if let Some(ids) = stop_token_ids {
        if ids.is_empty() {
            return Err(ApiError::validation("Stop token IDs array cannot be empty"));
        }
        if ids.len() > 32 {
            return Err(ApiError::validation(format!(
                "Maximum of 32 stop token IDs allowed, got {}",
                ids.len()
            )));
        }
    }
    Ok(())
}

/// `model`, `user` non-blank; `max_tokens` / `max_completion_tokens` > 0.
pub fn identity_and_limits(
    model: &str,
    user: Option<&str>,
    max_tokens: Option<u32>,
    max_completion: Option<u32>,
) -> Check {
    if let Some(0) = max_tokens {
        return Err(ApiError::validation(
            "Max tokens must be greater than 0, got 0",
        ));
    }
    if let Some(0) = max_completion {
        return Err(ApiError::validation(
            "Max completion tokens must be greater than 0, got 0",
        ));
    }
    if model.trim().is_empty() {
        return Err(ApiError::validation("Model cannot be empty"));
    }
    if let Some(u) = user {
        if u.trim().is_empty() {
            return Err(ApiError::validation("User ID cannot be empty"));
        }
    }
    Ok(())
}

/// Unknown top-level fields → `Unsupported parameter(s): `a`, `b``.
pub fn unknown_fields(unknown: &Map<String, Value>) -> Check {
    if unknown.is_empty() {
        return Ok(());
    }
    let mut names: Vec<&String> = unknown.keys().collect();
    names.sort();
    let list = names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    Err(ApiError::validation(format!(
        "Unsupported parameter(s): {list}"
    )))
}

/// `stream_options` only with `stream: true`.
pub fn stream_options(stream: Option<bool>, has_options: bool) -> Check {
    if has_options && stream != Some(true) {
        return Err(ApiError::validation(
            "The 'stream_options' field is only allowed when 'stream' is set to true.",
        ));
    }
    Ok(())
}

/// Chat-only rules, in upstream's order: unsupported (501) → required → fields.
pub fn chat(req: &ChatCompletionRequest) -> Check {
    if req.function_call.is_some() {
        return Err(ApiError::not_implemented(
            "`function_call` is deprecated. Please migrate to use `tool_choice` instead.",
        ));
    }
    if req.functions.is_some() {
        return Err(ApiError::not_implemented(
            "`functions` is deprecated. Please migrate to use `tools` instead.",
        ));
    }
    if req.messages.is_empty() {
        return Err(ApiError::validation(
            "The 'messages' field cannot be empty. At least one message is required.",
        ));
    }
    stream_options(req.stream, req.stream_options.is_some())?;
    identity_and_limits(
        &req.model,
        req.user.as_deref(),
        req.max_tokens,
        req.max_completion_tokens,
    )?;
    sampling(
        req.temperature,
        req.top_p,
        req.frequency_penalty,
        req.presence_penalty,
        &req.ext,
    )?;
    logit_bias(req.logit_bias.as_ref())?;
    n_choices(req.n, req.temperature)?;
    if let Some(k) = req.top_logprobs {
        if k > 20 {
            return Err(ApiError::validation(format!(
                "Top_logprobs must be between 0 and 20, got {k}"
            )));
        }
    }
    stop(req.stop.as_ref(), req.ext.stop_token_ids.as_ref())?;
    for (i, message) in req.messages.iter().enumerate() {
        for (j, call) in message.tool_calls.iter().flatten().enumerate() {
            let args = call.function.arguments.trim();
            let ok = args.is_empty()
                || matches!(serde_json::from_str::<Value>(args), Ok(Value::Object(_)));
            if !ok {
                return Err(ApiError::validation(format!(
                    "`messages[{i}].tool_calls[{j}].function.arguments` must be a valid JSON object string"
                )));
            }
        }
        if let Some(MessageContent::Parts(parts)) = &message.content {
            if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                return Err(ApiError::validation(format!(
                    "messages[{i}] has a content part of type `{}`, which this model does not accept (text only)",
                    p.kind
                )));
            }
        }
        if message.role == Role::User && message.content.is_none() {
            return Err(ApiError::validation(format!(
                "messages[{i}]: a user message must have content"
            )));
        }
    }
    tools(req)?;
    response_format(req.response_format.as_ref())?;
    if let Some(args) = &req.chat_template_args {
        if args.contains_key("chat_template") {
            return Err(ApiError::validation(
                "`chat_template` is not supported inside `chat_template_args`",
            ));
        }
    }
    Ok(())
}

fn tools(req: &ChatCompletionRequest) -> Check {
    let tools = req.tools.as_deref().unwrap_or_default();
    if tools.len() > 1536 {
        return Err(ApiError::validation(format!(
            "Maximum of 1536 tools are supported, got {}",
            tools.len()
        )));
    }
    for (i, tool) in tools.iter().enumerate() {
        let name = &tool.function.name;
        if name.trim().is_empty() {
            return Err(ApiError::validation(format!(
                "Function name at index {i} cannot be empty"
            )));
        }
        if name.len() > 96 {
            return Err(ApiError::validation(format!(
                "Function name at index {i} exceeds 96 character limit, got {} characters",
                name.len()
            )));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ApiError::validation(format!(
                "Function at index {i} has an invalid name: \"{name}\". Only a-z, A-Z, 0-9, underscores, and dashes are allowed."
            )));
        }
    }
    match &req.tool_choice {
        Some(Value::String(s)) if s == "required" && tools.is_empty() => Err(ApiError::validation(
            "tool_choice is \"required\" but tools is empty",
        )),
        Some(Value::Object(choice)) => {
            let name = choice
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if tools.iter().any(|t| t.function.name == name) {
                Ok(())
            } else {
                Err(ApiError::validation(format!(
                    "tool named \"{name}\" in tool_choice is not present in tools"
                )))
            }
        }
        _ => Ok(()),
    }
}

fn response_format(format: Option<&Value>) -> Check {
    let Some(format) = format else { return Ok(()) };
    match format.get("type").and_then(Value::as_str) {
        Some("text") | Some("json_object") => Ok(()),
        Some("json_schema") => {
            let schema = format.get("json_schema");
            let name = schema
                .and_then(|s| s.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if name.trim().is_empty() {
                return Err(ApiError::validation(
                    "`response_format.json_schema.name` cannot be empty",
                ));
            }
            match schema.and_then(|s| s.get("schema")) {
                None | Some(Value::Null) => Err(ApiError::validation(
                    "`response_format.json_schema.schema` is required",
                )),
                Some(Value::Bool(false)) => Err(ApiError::validation(
                    "`response_format.json_schema.schema` cannot be `false`",
                )),
                Some(_) => Ok(()),
            }
        }
        other => {
            Err(ApiError::validation(format!(
            "`response_format.type` must be one of `text`, `json_object`, `json_schema`, got {}",
            other.map(|s| format!("`{s}`")).unwrap_or_else(|| "nothing".into())
        )))
        }
    }
}

/// Completions-only rules.
pub fn completion(req: &CompletionRequest) -> Check {
    stream_options(req.stream, req.stream_options.is_some())?;
    identity_and_limits(&req.model, req.user.as_deref(), req.max_tokens, None)?;
    sampling(
        req.temperature,
        req.top_p,
        req.frequency_penalty,
        req.presence_penalty,
        &req.ext,
    )?;
    logit_bias(req.logit_bias.as_ref())?;
    n_choices(req.n, req.temperature)?;
    if let Some(k) = req.logprobs {
        if k > 5 {
            return Err(ApiError::validation(format!(
                "Logprobs must be between 0 and 5, got {k}"
            )));
        }
    }
    if let Some(best_of) = req.best_of {
        if best_of > 20 {
            return Err(ApiError::validation(format!(
                "Best_of must be between 0 and 20, got {best_of}"
            )));
        }
        let n = req.n.unwrap_or(1);
        if best_of < n {
            return Err(ApiError::validation(format!(
                "Best_of must be greater than or equal to n, got best_of={best_of}and n={n}"
            )));
        }
    }
    stop(req.stop.as_ref(), req.ext.stop_token_ids.as_ref())?;
    if let Some(suffix) = &req.suffix {
        if suffix.chars().count() > 10_000 {
            return Err(ApiError::validation(
                "Suffix is too long, maximum 10000 characters",
            ));
        }
    }
    let has_embeds = req.prompt_embeds.is_some();
    let batch = match &req.prompt {
        Prompt::Text(s) => {
            if s.is_empty() && !has_embeds {
                return Err(ApiError::validation("Prompt string cannot be empty"));
            }
            1
        }
        Prompt::Texts(list) => {
            if list.is_empty() {
                return Err(ApiError::validation("Prompt string array cannot be empty"));
            }
            if let Some(i) = list.iter().position(String::is_empty) {
                return Err(ApiError::validation(format!(
                    "Prompt string at index {i} cannot be empty"
                )));
            }
            list.len()
        }
        Prompt::Tokens(ids) => {
            if ids.is_empty() && !has_embeds {
                return Err(ApiError::validation("Prompt integer array cannot be empty"));
            }
            1
        }
        Prompt::TokenLists(lists) => {
            if lists.is_empty() {
                return Err(ApiError::validation(
                    "Prompt array of integer arrays cannot be empty",
                ));
            }
            if let Some(i) = lists.iter().position(Vec::is_empty) {
                return Err(ApiError::validation(format!(
                    "Prompt integer array at index {i} cannot be empty"
                )));
            }
            lists.len()
        }
    };
    let n = req.n.unwrap_or(1) as usize;
    if batch * n > 128 {
        return Err(ApiError::validation(format!(
            "Total choices (batch_size × n = {batch} × {n} = {}) exceeds maximum of 128",
            batch * n
        )));
    }
    if has_embeds {
        return Err(ApiError::not_implemented(
            "`prompt_embeds` is not supported by this model",
        ));
    }
    Ok(())
}
