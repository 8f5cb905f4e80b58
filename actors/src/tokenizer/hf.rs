//! Loading a Hugging Face tokenizer: `tokenizer.json` plus the small JSON files around it
//! (`tokenizer_config.json`, `generation_config.json`, `config.json`) and an optional chat
//! template, as a Dynamo worker's model deployment card references them.
//!
//! Only byte-level decoders are accepted: [`IncrementalDecoder`](super::IncrementalDecoder) and
//! `token_bytes` rely on every token standing for a fixed run of bytes, which holds for GPT-2
//! style byte-level BPE (Llama 3, Qwen, SmolLM, the Dynamo mocker's model) but not for
//! SentencePiece-style decoders, whose output depends on the neighbouring tokens. The fast encoder
//! is used when the pipeline is one it reproduces exactly; any other byte-level pipeline encodes
//! through `tokenizers`.

use std::collections::HashMap;

use serde_json::Value;
use tokenizers::{AddedToken, Model, Tokenizer};

use super::{
    byte_level_char_to_byte, fast, token_to_bytes, ModelTokenizer, TokenizerError,
    DEFAULT_CONTEXT_LENGTH,
};

/// `model_max_length` above this is `transformers`' "no limit" sentinel (1e30), not a context
/// window.
const SANE_MODEL_MAX_LENGTH: u64 = 16 * 1024 * 1024;

/// The files a Hugging Face tokenizer is made of; only `tokenizer_json` is required.
#[derive(Clone, Copy, Debug, Default)]
pub struct HfTokenizerFiles<'a> {
    /// `tokenizer.json`: vocabulary, merges, pre-tokenizer, decoder, added tokens.
    pub tokenizer_json: &'a [u8],
    /// `tokenizer_config.json`: `bos_token`, `eos_token`, `chat_template`, `model_max_length`.
    pub tokenizer_config_json: Option<&'a [u8]>,
    /// A chat template given on its own (`chat_template.jinja`); wins over `tokenizer_config`'s.
    pub chat_template: Option<&'a str>,
    /// `generation_config.json`: `bos_token_id`, `eos_token_id` (an id or a list of ids).
    pub generation_config_json: Option<&'a [u8]>,
    /// `config.json`: `max_position_embeddings`, `bos_token_id`, `eos_token_id`.
    pub config_json: Option<&'a [u8]>,
}

impl ModelTokenizer {
    /// Builds a tokenizer from Hugging Face files (see [`HfTokenizerFiles`]).
    ///
    /// Special tokens: `eos_token`/`bos_token` of `tokenizer_config.json` (a string or a
    /// `{"content": ...}` object), else the ids in `generation_config.json`, else in
    /// `config.json`. Every eos id of `generation_config.json` also ends a generation (see
    /// [`eos_token_ids`](Self::eos_token_ids)). A model without a bos token gets the eos id as
    /// [`bos_token_id`](Self::bos_token_id) and an empty `bos_token` in its chat template. Context
    /// length: `max_position_embeddings` of `config.json`, else a realistic `model_max_length`,
    /// else 2048.
    pub fn from_hf(files: &HfTokenizerFiles<'_>) -> Result<Self, TokenizerError> {
        let tokenizer = Tokenizer::from_bytes(files.tokenizer_json)
            .map_err(|e| TokenizerError::Build(format!("tokenizer.json: {e}")))?;
        let json: Value = parse_json("tokenizer.json", files.tokenizer_json)?;
        let tokenizer_config = files
            .tokenizer_config_json
            .map(|bytes| parse_json("tokenizer_config.json", bytes))
            .transpose()?;
        let generation_config = files
            .generation_config_json
            .map(|bytes| parse_json("generation_config.json", bytes))
            .transpose()?;
        let config = files
            .config_json
            .map(|bytes| parse_json("config.json", bytes))
            .transpose()?;

        match json.pointer("/decoder/type").and_then(Value::as_str) {
            Some("ByteLevel") => {}
            other => {
                return Err(TokenizerError::UnsupportedModel(format!(
                    "tokenizer.json with decoder {}",
                    other.unwrap_or("null")
                )))
            }
        }

        // Every id, model vocabulary and added tokens alike; an id nobody names stays empty.
        let names = tokenizer.get_vocab(true);
        let size = names.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let mut tokens = vec![String::new(); size];
        for (name, &id) in &names {
            tokens[id as usize].clone_from(name);
        }
        let char_bytes = byte_level_char_to_byte();
        let token_bytes = tokens
            .iter()
            .map(|token| token_to_bytes(token, &char_bytes))
            .collect();
        let mut added: Vec<(u32, AddedToken)> =
            tokenizer.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|&(id, _)| id);
        let mut special = vec![false; size];
        for (id, token) in &added {
            if token.special {
                special[*id as usize] = true;
            }
        }

        let lookup = |file: &'static str, key: &str, token: &str| {
            tokenizer.token_to_id(token).ok_or_else(|| {
                TokenizerError::Inconsistent(format!(
                    "{file} {key} {token:?} is not in the vocabulary"
                ))
            })
        };
        let in_range = |file: &'static str, key: &str, id: u32| {
            if (id as usize) < size {
                Ok(id)
            } else {
                Err(TokenizerError::Inconsistent(format!(
                    "{file} {key} is {id}, outside the {size}-token vocabulary"
                )))
            }
        };
        let config_token = |name: &str| {
            tokenizer_config
                .as_ref()
                .and_then(|c| c.get(name))
                .and_then(token_content)
        };
        let generation_eos = generation_config
            .as_ref()
            .map(|c| ids_of(c.get("eos_token_id")))
            .unwrap_or_default();
        let config_eos = config
            .as_ref()
            .map(|c| ids_of(c.get("eos_token_id")))
            .unwrap_or_default();

        let (eos_token_id, eos_token) = match config_token("eos_token") {
            Some(text) => (lookup("tokenizer_config.json", "eos_token", &text)?, text),
            None => {
                let (file, id) =
                    match (generation_eos.first(), config_eos.first()) {
                        (Some(&id), _) => ("generation_config.json", id),
                        (None, Some(&id)) => ("config.json", id),
                        (None, None) => return Err(TokenizerError::Inconsistent(
                            "no end-of-sequence token: tokenizer_config.json has no eos_token, \
                             generation_config.json and config.json no eos_token_id"
                                .to_string(),
                        )),
                    };
                let id = in_range(file, "eos_token_id", id)?;
                (id, tokens[id as usize].clone())
            }
        };
        let mut eos_token_ids = vec![eos_token_id];
        for &id in generation_eos.iter() {
            let id = in_range("generation_config.json", "eos_token_id", id)?;
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }

        let bos_id_in = |file: &'static str, json: Option<&Value>| {
            json.and_then(|c| c.get("bos_token_id"))
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| in_range(file, "bos_token_id", id))
                .transpose()
        };
        let (bos_token_id, bos_token) = match config_token("bos_token") {
            Some(text) => (lookup("tokenizer_config.json", "bos_token", &text)?, text),
            None => match bos_id_in("generation_config.json", generation_config.as_ref())? {
                Some(id) => (id, tokens[id as usize].clone()),
                None => match bos_id_in("config.json", config.as_ref())? {
                    Some(id) => (id, tokens[id as usize].clone()),
                    None => (eos_token_id, String::new()),
                },
            },
        };

        let context_length = context_length(config.as_ref(), tokenizer_config.as_ref());

        let chat_template_source = match files.chat_template {
            Some(source) => Some(source.to_string()),
            None => tokenizer_config.as_ref().and_then(config_chat_template),
        };
        let chat_template = super::compile_chat_template(chat_template_source.as_deref())?;

        let fast = fast_encoder(&json, &tokenizer, &added);

        Ok(Self {
            tokenizer,
            fast,
            token_bytes,
            special,
            bos_token_id,
            eos_token_id,
            eos_token_ids,
            bos_token,
            eos_token,
            context_length,
            chat_template,
            chat_template_source,
            model_name: None,
        })
    }

    /// The tokenizer as a Hugging Face `tokenizer.json` document, which [`from_hf`](Self::from_hf)
    /// (and `transformers`, and Dynamo) load back to the same encoding.
    pub fn to_hf_json(&self) -> Result<String, TokenizerError> {
        self.tokenizer
            .to_string(false)
            .map_err(|e| TokenizerError::Build(format!("cannot serialise tokenizer.json: {e}")))
    }
}

fn parse_json(file: &'static str, bytes: &[u8]) -> Result<Value, TokenizerError> {
    serde_json::from_slice(bytes).map_err(|e| TokenizerError::Build(format!("{file}: {e}")))
}

/// A special token of `tokenizer_config.json`: `"<s>"` or `{"content": "<s>", ...}`; `null`
/// means none.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Object(object) => object
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` as `transformers` writes it: one id or a list of ids.
fn ids_of(value: Option<&Value>) -> Vec<u32> {
    let id = |v: &Value| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match value {
        Some(Value::Array(items)) => items.iter().filter_map(id).collect(),
        Some(v) => id(v).into_iter().collect(),
        None => Vec::new(),
    }
}

fn context_length(config: Option<&Value>, tokenizer_config: Option<&Value>) -> u32 {
    let positive_u32 = |v: &Value| {
        v.as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| u32::try_from(n).ok())
    };
    let from_config = config.and_then(|c| {
        c.get("max_position_embeddings")
            .or_else(|| c.pointer("/text_config/max_position_embeddings"))
            .and_then(positive_u32)
    });
    let from_tokenizer_config = || {
        tokenizer_config
            .and_then(|c| c.get("model_max_length"))
            .and_then(Value::as_u64)
            .filter(|&n| n > 0 && n <= SANE_MODEL_MAX_LENGTH)
            .and_then(|n| u32::try_from(n).ok())
    };
    from_config
        .or_else(from_tokenizer_config)
        .unwrap_or(DEFAULT_CONTEXT_LENGTH)
}

/// `chat_template` of `tokenizer_config.json`: a string, or a list of `{name, template}` of
/// which the one named "default" (else the first) is the chat template.
fn config_chat_template(tokenizer_config: &Value) -> Option<String> {
    match tokenizer_config.get("chat_template")? {
        Value::String(source) => Some(source.clone()),
        Value::Array(named) => {
            let template = |entry: &Value| {
                entry
                    .get("template")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            named
                .iter()
                .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| named.first())
                .and_then(template)
        }
        _ => None,
    }
}

/// The fast encoder, when `tokenizer.json` describes a pipeline it reproduces exactly: no
/// normalizer; GPT-2 byte-level splitting without a prefix space, optionally after isolating
/// digits; plain BPE (no dropout, unknown token, affixes, byte fallback or whole-word lookup);
/// added tokens matched verbatim. `None` otherwise (the `tokenizers` pipeline then encodes).
fn fast_encoder(
    json: &Value,
    tokenizer: &Tokenizer,
    added: &[(u32, AddedToken)],
) -> Option<fast::FastBpe> {
    if !json.get("normalizer").is_none_or(Value::is_null) {
        return None;
    }
    let byte_level = |p: &Value| {
        p.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && p.get("add_prefix_space").and_then(Value::as_bool) == Some(false)
            && p.get("use_regex").and_then(Value::as_bool) != Some(false)
    };
    let pre_tokenizer = json.get("pre_tokenizer")?;
    let split_digits = if byte_level(pre_tokenizer) {
        false
    } else {
        match pre_tokenizer.get("pretokenizers").and_then(Value::as_array) {
            Some(steps)
                if pre_tokenizer.get("type").and_then(Value::as_str) == Some("Sequence")
                    && steps.len() == 2
                    && steps[0].get("type").and_then(Value::as_str) == Some("Digits")
                    && steps[0].get("individual_digits").and_then(Value::as_bool) == Some(true)
                    && byte_level(&steps[1]) =>
            {
                true
            }
            _ => return None,
        }
    };

    let model = json.get("model")?;
    let absent = |key: &str| match model.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    };
    if model.get("type").and_then(Value::as_str) != Some("BPE")
        || ![
            "dropout",
            "unk_token",
            "continuing_subword_prefix",
            "end_of_word_suffix",
        ]
        .iter()
        .all(|key| absent(key))
        || !absent("byte_fallback")
        || !absent("ignore_merges")
    {
        return None;
    }
    let merges = model
        .get("merges")?
        .as_array()?
        .iter()
        .map(|merge| match merge {
            Value::String(pair) => pair
                .split_once(' ')
                .map(|(l, r)| (l.to_string(), r.to_string())),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(l), Value::String(r)] => Some((l.clone(), r.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;

    if added
        .iter()
        .any(|(_, t)| t.single_word || t.lstrip || t.rstrip)
    {
        return None;
    }
    let added_tokens: Vec<(String, u32)> = added
        .iter()
        .map(|(id, t)| (t.content.clone(), *id))
        .collect();

    let vocab: HashMap<String, u32> = tokenizer.get_model().get_vocab();
    let mut byte_chars = [char::REPLACEMENT_CHARACTER; 256];
    for (c, byte) in byte_level_char_to_byte() {
        byte_chars[byte as usize] = c;
    }
    fast::FastBpe::new(
        |token| vocab.get(token).copied(),
        &byte_chars,
        &merges,
        &added_tokens,
        split_digits,
    )
}
