//! Request validation: [`validate`] turns a parsed [`EmbeddingRequest`] into a
//! [`ValidEmbeddingRequest`], the proof that every rule passed, with each input tokenized. Every
//! message names the parameter (and the input's index), the limit and the value given.

use serde_json::Value;

use super::tokenizer::EmbeddingTokenizer;
use crate::error::ApiError;
use crate::protocol::embeddings::{EmbeddingRequest, EncodingFormat};

/// Inputs one request may carry (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;

/// What validation needs to know about the served model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmbeddingModelCard {
    /// Served name.
    pub name: String,
    /// Length of every vector.
    pub dimensions: usize,
    /// Longest input in tokens, special tokens included.
    pub max_tokens: usize,
    /// Token ids below this are valid.
    pub vocab_size: usize,
}

/// A request that passed validation.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidEmbeddingRequest {
    /// Served model name.
    pub model: String,
    /// Token ids, one row per input, in input order.
    pub inputs: Vec<Vec<u32>>,
    /// How to write the vectors.
    pub encoding_format: EncodingFormat,
    /// Tokens of all inputs together (`usage`).
    pub prompt_tokens: u32,
}

/// One input before tokenization.
enum Input<'a> {
    Text(&'a str),
    Tokens(Vec<u32>),
}

/// Checks `request` against `card` and tokenizes its text inputs. `ignore_unknown` drops unknown
/// fields instead of rejecting them (`DYN_IGNORE_OPENAI_FE_UNSUPPORTED_FIELDS`).
pub fn validate(
    request: &EmbeddingRequest,
    card: &EmbeddingModelCard,
    tokenizer: &EmbeddingTokenizer,
    ignore_unknown: bool,
) -> Result<ValidEmbeddingRequest, ApiError> {
    if !ignore_unknown {
        crate::validator::rules::unknown_fields(&request.unknown)?;
    }
    if request.model.trim().is_empty() {
        return Err(ApiError::validation("Model cannot be empty"));
    }
    if request.model != card.name {
        return Err(ApiError::model_not_found());
    }
    if request.user.as_deref().is_some_and(|u| u.trim().is_empty()) {
        return Err(ApiError::validation("User ID cannot be empty"));
    }
    let encoding_format = encoding_format(request.encoding_format.as_deref())?;
    dimensions(request.dimensions.as_ref(), card)?;
    let inputs = inputs(&request.input)?;
    let many =
        matches!(&request.input, Value::Array(items) if items.iter().all(|i| !i.is_number()));
    let name = |i: usize| {
        if many {
            format!("input[{i}]")
        } else {
            "input".to_string()
        }
    };
    let mut rows = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        let ids = match input {
            Input::Text(text) => tokenizer.encode(text).map_err(ApiError::internal)?,
            Input::Tokens(ids) => {
                if let Some((j, id)) = ids
                    .iter()
                    .enumerate()
                    .find(|(_, &id)| id as usize >= card.vocab_size)
                {
                    return Err(ApiError::validation(format!(
                        "{}[{j}] = {id} is not a token id of {}: its vocabulary has {} tokens (ids 0 to {})",
                        name(i),
                        card.name,
                        card.vocab_size,
                        card.vocab_size.saturating_sub(1)
                    )));
                }
                ids
            }
        };
        if ids.len() > card.max_tokens {
            return Err(ApiError::validation(format!(
                "{} has {} tokens, more than the {} tokens {} accepts per input",
                name(i),
                ids.len(),
                card.max_tokens,
                card.name
            )));
        }
        rows.push(ids);
    }
    let prompt_tokens = rows.iter().map(Vec::len).sum::<usize>();
    Ok(ValidEmbeddingRequest {
        model: card.name.clone(),
        inputs: rows,
        encoding_format,
        prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
    })
}

fn encoding_format(value: Option<&str>) -> Result<EncodingFormat, ApiError> {
    match value {
        None | Some("float") => Ok(EncodingFormat::Float),
        Some("base64") => Ok(EncodingFormat::Base64),
        Some(other) => Err(ApiError::validation(format!(
            "encoding_format must be \"float\" or \"base64\", got {other:?}"
        ))),
    }
}

/// A model that is not Matryoshka-trained cannot be cut shorter; only its own size is accepted.
fn dimensions(value: Option<&Value>, card: &EmbeddingModelCard) -> Result<(), ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(());
    };
    if value.as_u64() == Some(card.dimensions as u64) {
        return Ok(());
    }
    if value.as_i64().is_none() && value.as_u64().is_none() {
        return Err(ApiError::validation(format!(
            "dimensions must be an integer, got {value}"
        )));
    }
    Err(ApiError::validation(format!(
        "Model {} does not support dimensions = {value}: it is not a Matryoshka model and only produces {}-dimensional embeddings (omit dimensions or set it to {})",
        card.name, card.dimensions, card.dimensions
    )))
}

fn inputs(value: &Value) -> Result<Vec<Input<'_>>, ApiError> {
    const SHAPE: &str =
        "input must be a string, an array of strings, an array of token ids or an array of token-id arrays";
    match value {
        Value::String(text) => {
            if text.is_empty() {
                return Err(ApiError::validation("input cannot be an empty string"));
            }
            Ok(vec![Input::Text(text)])
        }
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::validation("input cannot be an empty array"))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => {
            let ids = token_ids(items, "input")?;
            Ok(vec![Input::Tokens(ids)])
        }
        Value::Array(items) => {
            if items.len() > MAX_INPUTS {
                return Err(ApiError::validation(format!(
                    "input has {} entries, more than the {MAX_INPUTS} allowed per request",
                    items.len()
                )));
            }
            let strings = items[0].is_string();
            items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(text) if strings => {
                        if text.is_empty() {
                            Err(ApiError::validation(format!(
                                "input[{i}] cannot be an empty string"
                            )))
                        } else {
                            Ok(Input::Text(text))
                        }
                    }
                    Value::Array(ids) if !strings => {
                        if ids.is_empty() {
                            return Err(ApiError::validation(format!(
                                "input[{i}] cannot be an empty token-id array"
                            )));
                        }
                        Ok(Input::Tokens(token_ids(ids, &format!("input[{i}]"))?))
                    }
                    other => Err(ApiError::validation(format!(
                        "{SHAPE} (all of one kind); input[{i}] is {}",
                        kind(other)
                    ))),
                })
                .collect()
        }
        other => Err(ApiError::validation(format!(
            "{SHAPE}; got {}",
            kind(other)
        ))),
    }
}

fn token_ids(items: &[Value], name: &str) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(j, item)| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::validation(format!(
                        "{name}[{j}] = {item} is not a token id (an integer from 0 to {})",
                        u32::MAX
                    ))
                })
        })
        .collect()
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> EmbeddingModelCard {
        EmbeddingModelCard {
            name: "mini".into(),
            dimensions: 384,
            max_tokens: 4,
            vocab_size: 100,
        }
    }

    fn message(input: Value) -> String {
        inputs(&input)
            .err()
            .map(|e| e.message)
            .unwrap_or_else(|| "accepted".into())
    }

    #[test]
    fn input_shapes() {
        let count = |v: Value| inputs(&v).map(|i| i.len()).unwrap_or(0);
        assert_eq!(count(serde_json::json!("a")), 1);
        assert_eq!(count(serde_json::json!(["a", "b"])), 2);
        assert_eq!(count(serde_json::json!([1, 2, 3])), 1);
        assert_eq!(count(serde_json::json!([[1], [2, 3]])), 2);
    }

    #[test]
    fn input_errors_name_the_element() {
        for (input, needle) in [
            (serde_json::json!(""), "input cannot be an empty string"),
            (serde_json::json!([]), "input cannot be an empty array"),
            (
                serde_json::json!(["a", ""]),
                "input[1] cannot be an empty string",
            ),
            (
                serde_json::json!([[1], []]),
                "input[1] cannot be an empty token-id array",
            ),
            (serde_json::json!(["a", 1]), "input[1] is a number"),
            (serde_json::json!([[1], "a"]), "input[1] is a string"),
            (
                serde_json::json!([1, -2]),
                "input[1] = -2 is not a token id",
            ),
            (
                serde_json::json!([[1, 2.5]]),
                "input[0][1] = 2.5 is not a token id",
            ),
            (serde_json::json!({"text": "a"}), "got an object"),
            (serde_json::json!(null), "got null"),
        ] {
            let got = message(input.clone());
            assert!(got.contains(needle), "{input}: {got}");
            assert!(got.starts_with("Validation: "), "{got}");
        }
        let too_many = Value::Array(vec![Value::String("a".into()); MAX_INPUTS + 1]);
        assert!(message(too_many).contains("2049 entries, more than the 2048"));
        let at_limit = Value::Array(vec![Value::String("a".into()); MAX_INPUTS]);
        assert_eq!(message(at_limit), "accepted");
    }

    #[test]
    fn dimensions_only_the_models_own() {
        let card = card();
        assert!(dimensions(None, &card).is_ok());
        assert!(dimensions(Some(&Value::Null), &card).is_ok());
        assert!(dimensions(Some(&serde_json::json!(384)), &card).is_ok());
        for value in [
            serde_json::json!(128),
            serde_json::json!(0),
            serde_json::json!(-1),
        ] {
            let message = dimensions(Some(&value), &card)
                .err()
                .map(|e| e.message)
                .unwrap_or_default();
            assert!(
                message.contains("mini") && message.contains(&format!("dimensions = {value}")),
                "{message}"
            );
        }
        assert!(dimensions(Some(&serde_json::json!("384")), &card).is_err());
    }

    #[test]
    fn encoding_formats() {
        assert_eq!(encoding_format(None).ok(), Some(EncodingFormat::Float));
        assert_eq!(
            encoding_format(Some("float")).ok(),
            Some(EncodingFormat::Float)
        );
        assert_eq!(
            encoding_format(Some("base64")).ok(),
            Some(EncodingFormat::Base64)
        );
        let message = encoding_format(Some("int8"))
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(message.contains("\"int8\""), "{message}");
    }
}
