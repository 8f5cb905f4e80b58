//! The chat model's tokenizer, built from the metadata of its GGUF file or from Hugging Face
//! files (`tokenizer.json` and friends, as a Dynamo model deployment card references them).
//!
//! SmolLM2 ships as a GGUF file with no `tokenizer.json`: its byte-level BPE vocabulary, merges,
//! token types and ChatML chat template are GGUF metadata. [`ModelTokenizer::from_gguf`] reads
//! them with the small reader in [`gguf`] and assembles an in-memory `tokenizers::Tokenizer`
//! (BPE, a digit-splitting + byte-level pre-tokenizer, a byte-level decoder, control tokens as
//! special added tokens) that round-trips text exactly. The chat template is rendered with
//! minijinja the way `transformers` renders it. [`IncrementalDecoder`] turns a stream of ids into
//! text without ever splitting a UTF-8 character. [`ModelTokenizer::from_hf`] loads a byte-level
//! BPE `tokenizer.json` instead, and [`ModelTokenizer::to_hf_json`] exports either kind as one.
//!
//! Layout:
//! - `gguf` — the GGUF metadata reader and its errors.
//! - `hf` — loading Hugging Face tokenizer files; exporting `tokenizer.json`.
//! - `fast` — the direct byte-level BPE encoder used when a pipeline allows it.
//! - `incremental` — the streaming detokenizer.
//! - `tests` — tests against the real model file and crafted GGUF bytes.

mod fast;
pub mod gguf;
mod hf;
mod incremental;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

pub use gguf::{GgufArray, GgufError, GgufMetadata, GgufValue};
pub use hf::HfTokenizerFiles;
pub use incremental::IncrementalDecoder;

/// GGUF token type of control tokens (`<|im_start|>`, ...), per llama.cpp's `llama_token_type`.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF token type of user-defined tokens: matched whole in text, but not special.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// Context window assumed when the model files do not state one.
const DEFAULT_CONTEXT_LENGTH: u32 = 2048;

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A required metadata key is absent.
    #[error("GGUF metadata has no {key:?}; is this a model file with an embedded tokenizer?")]
    MissingKey {
        /// The key looked for.
        key: &'static str,
    },
    /// A metadata key holds a value of the wrong type.
    #[error("GGUF metadata key {key:?} is a {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// What this code needs.
        expected: &'static str,
        /// What the file holds.
        found: &'static str,
    },
    /// The tokenizer is of a kind this code does not build.
    #[error("tokenizer model {0:?} is not supported (only byte-level BPE, \"gpt2\")")]
    UnsupportedModel(String),
    /// The metadata contradicts itself (mismatched array lengths, ids out of range, ...).
    #[error("GGUF tokenizer metadata is inconsistent: {0}")]
    Inconsistent(String),
    /// The `tokenizers` library rejected the assembled tokenizer.
    #[error("cannot build the tokenizer: {0}")]
    Build(String),
    /// Encoding text failed.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// Decoding ids failed.
    #[error("cannot decode tokens: {0}")]
    Decode(String),
    /// A token id outside the vocabulary.
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens")]
    UnknownTokenId {
        /// The id given.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The model file has no chat template.
    #[error("the model has no chat template (tokenizer.chat_template)")]
    NoChatTemplate,
    /// The chat template failed to compile or render.
    #[error("chat template error: {0}")]
    ChatTemplate(#[from] minijinja::Error),
}

/// One message of a chat, as the chat template sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's tokenizer and chat template. Immutable after construction: share it with `Arc`.
pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    /// The same encoding without `tokenizers`' per-split bookkeeping; `None` for a vocabulary it
    /// does not cover, when `tokenizer` encodes.
    fast: Option<fast::FastBpe>,
    /// The raw bytes each token stands for, indexed by id: what the byte-level decoder emits for
    /// it. Kept so that streaming decode is a table lookup instead of re-decoding a window.
    token_bytes: Vec<Box<[u8]>>,
    /// Whether each id is a control (special) token.
    special: Vec<bool>,
    bos_token_id: u32,
    eos_token_id: u32,
    /// Every id that ends a generation, `eos_token_id` first (Hugging Face models may list more
    /// in `generation_config.json`).
    eos_token_ids: Vec<u32>,
    bos_token: String,
    eos_token: String,
    context_length: u32,
    /// The chat template, compiled once at load under the name [`CHAT_TEMPLATE`]: compiling
    /// it per request cost more than tokenizing the prompt.
    chat_template: Option<minijinja::Environment<'static>>,
    /// The template's source, kept to export it (a model deployment card's files).
    chat_template_source: Option<String>,
    model_name: Option<String>,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("model_name", &self.model_name)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_id", &self.eos_token_id)
            .field("context_length", &self.context_length)
            .finish_non_exhaustive()
    }
}

impl ModelTokenizer {
    /// Builds the tokenizer embedded in the GGUF file at `path`.
    pub fn from_gguf(path: &Path) -> Result<Self, TokenizerError> {
        let metadata = GgufMetadata::read_file(path)?;
        Self::from_metadata(&metadata)
    }

    /// Builds the tokenizer from already-read GGUF metadata.
    pub fn from_metadata(metadata: &GgufMetadata) -> Result<Self, TokenizerError> {
        let model = required_str(metadata, "tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let tokens = match required_array(metadata, "tokenizer.ggml.tokens")? {
            GgufArray::String(tokens) => tokens,
            other => {
                return Err(wrong_array_type(
                    "tokenizer.ggml.tokens",
                    "array of string",
                    other,
                ))
            }
        };
        let merges = match required_array(metadata, "tokenizer.ggml.merges")? {
            GgufArray::String(merges) => merges,
            other => {
                return Err(wrong_array_type(
                    "tokenizer.ggml.merges",
                    "array of string",
                    other,
                ))
            }
        };
        let token_types: Vec<i32> = match metadata.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(GgufValue::Array(GgufArray::I32(types))) => types.clone(),
            Some(GgufValue::Array(GgufArray::U32(types))) => types
                .iter()
                .map(|&t| i32::try_from(t).unwrap_or(-1))
                .collect(),
            Some(other) => {
                return Err(TokenizerError::WrongType {
                    key: "tokenizer.ggml.token_type",
                    expected: "array of int32",
                    found: other.type_name(),
                })
            }
        };
        if token_types.len() != tokens.len() {
            return Err(TokenizerError::Inconsistent(format!(
                "{} tokens but {} token types",
                tokens.len(),
                token_types.len()
            )));
        }
        let vocab_size = u32::try_from(tokens.len()).map_err(|_| {
            TokenizerError::Inconsistent(format!("{} tokens is too many", tokens.len()))
        })?;
        let token_id = |key: &'static str| -> Result<u32, TokenizerError> {
            let id = required_u32(metadata, key)?;
            if id >= vocab_size {
                return Err(TokenizerError::Inconsistent(format!(
                    "{key} is {id}, outside the {vocab_size}-token vocabulary"
                )));
            }
            Ok(id)
        };
        let bos_token_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_token_id = token_id("tokenizer.ggml.eos_token_id")?;

        let architecture = metadata
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .unwrap_or("llama");
        let context_length = metadata
            .get(&format!("{architecture}.context_length"))
            .and_then(GgufValue::as_u32)
            .unwrap_or(DEFAULT_CONTEXT_LENGTH);

        let char_bytes = byte_level_char_to_byte();
        let (tokenizer, fast) = build_tokenizer(tokens, merges, &token_types, &char_bytes)?;
        let token_bytes = tokens
            .iter()
            .map(|token| token_to_bytes(token, &char_bytes))
            .collect();
        let special = token_types
            .iter()
            .map(|&t| t == TOKEN_TYPE_CONTROL)
            .collect();

        // Compiled here so that a template that does not compile fails the load, not a request.
        let chat_template_source = metadata
            .get("tokenizer.chat_template")
            .and_then(GgufValue::as_str)
            .map(str::to_string);
        let chat_template = compile_chat_template(chat_template_source.as_deref())?;

        Ok(Self {
            tokenizer,
            fast,
            token_bytes,
            special,
            bos_token_id,
            eos_token_id,
            eos_token_ids: vec![eos_token_id],
            bos_token: tokens[bos_token_id as usize].clone(),
            eos_token: tokens[eos_token_id as usize].clone(),
            context_length,
            chat_template,
            chat_template_source,
            model_name: metadata
                .get("general.name")
                .and_then(GgufValue::as_str)
                .map(str::to_string),
        })
    }

    /// Encodes `text` into token ids. Special tokens written in the text (`<|im_start|>`) are
    /// recognised as their single ids; no BOS is added (the model's `add_bos_token` is false).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match &self.fast {
            Some(fast) => Ok(fast.encode(text)),
            None => self.encode_reference(text),
        }
    }

    /// [`encode`](Self::encode) through the `tokenizers` pipeline: the reference the fast encoder
    /// is tested against.
    pub fn encode_reference(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids into text; with `skip_special_tokens`, control tokens are left out. Invalid
    /// UTF-8 (a character cut off at the end) decodes to U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(self.unknown_id(id));
        }
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Renders the model's chat template (`tokenizer.chat_template`) for `messages`, ending with
    /// the assistant's turn header when `add_generation_prompt` is set. The template sees
    /// `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, as in `transformers`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let environment = self
            .chat_template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        let template = environment.get_template(CHAT_TEMPLATE)?;
        Ok(template.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })?)
    }

    /// The id that ends a generation (`<|im_end|>` for SmolLM2).
    pub fn eos_token_id(&self) -> u32 {
        self.eos_token_id
    }

    /// Every id that ends a generation: [`eos_token_id`](Self::eos_token_id) first, then any
    /// other listed in a Hugging Face model's `generation_config.json`.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The id that begins a sequence (`<|im_start|>` for SmolLM2; the eos id for a Hugging Face
    /// model that names no bos token).
    pub fn bos_token_id(&self) -> u32 {
        self.bos_token_id
    }

    /// The text of the bos token, as chat templates see it (empty when the model has none).
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The text of the eos token, as chat templates see it.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The chat template's Jinja source, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template_source.as_deref()
    }

    /// The model's context window in tokens (`<arch>.context_length` of a GGUF file,
    /// `max_position_embeddings` of a Hugging Face `config.json`; 2048 if absent).
    pub fn context_length(&self) -> u32 {
        self.context_length
    }

    /// The number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Whether `id` is a control token (`<|im_start|>`, `<|endoftext|>`, ...). False for ids
    /// outside the vocabulary.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The text a single token decodes to (lossy if the token is part of a multi-byte
    /// character); `None` for ids outside the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.token_bytes(id)
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
    }

    /// The raw bytes a single token stands for (as OpenAI's `logprobs.bytes` reports them);
    /// `None` for ids outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(|bytes| &bytes[..])
    }

    /// `general.name` from the GGUF file, if present (`None` for Hugging Face files).
    pub fn model_name(&self) -> Option<&str> {
        self.model_name.as_deref()
    }

    fn unknown_id(&self, id: u32) -> TokenizerError {
        TokenizerError::UnknownTokenId {
            id,
            vocab_size: self.vocab_size(),
        }
    }
}

fn required<'a>(
    metadata: &'a GgufMetadata,
    key: &'static str,
) -> Result<&'a GgufValue, TokenizerError> {
    metadata.get(key).ok_or(TokenizerError::MissingKey { key })
}

fn required_str<'a>(
    metadata: &'a GgufMetadata,
    key: &'static str,
) -> Result<&'a str, TokenizerError> {
    let value = required(metadata, key)?;
    value.as_str().ok_or(TokenizerError::WrongType {
        key,
        expected: "string",
        found: value.type_name(),
    })
}

fn required_u32(metadata: &GgufMetadata, key: &'static str) -> Result<u32, TokenizerError> {
    let value = required(metadata, key)?;
    value.as_u32().ok_or(TokenizerError::WrongType {
        key,
        expected: "unsigned 32-bit integer",
        found: value.type_name(),
    })
}

fn required_array<'a>(
    metadata: &'a GgufMetadata,
    key: &'static str,
) -> Result<&'a GgufArray, TokenizerError> {
    let value = required(metadata, key)?;
    value.as_array().ok_or(TokenizerError::WrongType {
        key,
        expected: "array",
        found: value.type_name(),
    })
}

fn wrong_array_type(
    key: &'static str,
    expected: &'static str,
    found: &GgufArray,
) -> TokenizerError {
    TokenizerError::WrongType {
        key,
        expected,
        found: found.element_type_name(),
    }
}

/// Assembles the `tokenizers` pipeline that matches llama.cpp's `smollm` pre-tokenizer: split
/// digits one by one, then GPT-2 byte-level splitting (no prefix space), then BPE; and the fast
/// encoder for the same pipeline.
fn build_tokenizer(
    tokens: &[String],
    merges: &[String],
    token_types: &[i32],
    char_bytes: &HashMap<char, u8>,
) -> Result<(Tokenizer, Option<fast::FastBpe>), TokenizerError> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err(TokenizerError::Inconsistent(format!(
            "the vocabulary repeats tokens ({} tokens, {} distinct)",
            tokens.len(),
            vocab.len()
        )));
    }
    let merges = merges
        .iter()
        .map(|merge| match merge.split_once(' ') {
            Some((left, right))
                if !left.is_empty() && !right.is_empty() && !right.contains(' ') =>
            {
                Ok((left.to_string(), right.to_string()))
            }
            _ => Err(TokenizerError::Inconsistent(format!(
                "merge {merge:?} is not two tokens separated by one space"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut byte_chars = [char::REPLACEMENT_CHARACTER; 256];
    for (&c, &byte) in char_bytes {
        byte_chars[byte as usize] = c;
    }
    let added_tokens: Vec<(String, u32)> = tokens
        .iter()
        .zip(token_types)
        .enumerate()
        .filter(|(_, (_, &t))| t == TOKEN_TYPE_CONTROL || t == TOKEN_TYPE_USER_DEFINED)
        .map(|(id, (token, _))| (token.clone(), id as u32))
        .collect();
    let fast = fast::FastBpe::new(
        |token| vocab.get(token).copied(),
        &byte_chars,
        &merges,
        &added_tokens,
        true,
    );
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let added = |token_type: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(token_types)
            .filter(|(_, &t)| t == token_type)
            .map(|(token, _)| AddedToken::from(token.clone(), special).normalized(false))
            .collect()
    };
    tokenizer
        .add_special_tokens(added(TOKEN_TYPE_CONTROL, true))
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    tokenizer
        .add_tokens(added(TOKEN_TYPE_USER_DEFINED, false))
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    Ok((tokenizer, fast))
}

/// The inverse of GPT-2's `bytes_to_unicode`: byte-level BPE writes every byte as a printable
/// character; this maps those characters back to bytes.
fn byte_level_char_to_byte() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut next_unprintable = 0u32;
    for byte in 0..=255u8 {
        let c = if printable(byte) {
            char::from(byte)
        } else {
            next_unprintable += 1;
            // 256 + n is always a valid scalar value (U+0100..U+0143).
            char::from_u32(255 + next_unprintable).unwrap_or(char::REPLACEMENT_CHARACTER)
        };
        map.insert(c, byte);
    }
    map
}

/// The bytes a token stands for, exactly as the byte-level decoder computes them: each character
/// mapped back to its byte, or the token's own UTF-8 if any character is not a byte-level one
/// (added tokens such as `<|im_start|>` are plain ASCII and come out as themselves either way).
fn token_to_bytes(token: &str, char_bytes: &HashMap<char, u8>) -> Box<[u8]> {
    token
        .chars()
        .map(|c| char_bytes.get(&c).copied())
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| token.as_bytes().to_vec())
        .into_boxed_slice()
}

/// The name the chat template is registered under in its environment.
const CHAT_TEMPLATE: &str = "chat";

/// The Jinja environment chat templates run in, configured like `transformers`' (trimmed and
/// left-stripped blocks, `raise_exception`).
/// The template compiled for rendering, so that one that does not compile fails the load.
fn compile_chat_template(
    source: Option<&str>,
) -> Result<Option<minijinja::Environment<'static>>, minijinja::Error> {
    source
        .map(|source| {
            let mut environment = chat_environment();
            environment.add_template_owned(CHAT_TEMPLATE, source.to_string())?;
            Ok(environment)
        })
        .transpose()
}

fn chat_environment() -> minijinja::Environment<'static> {
    let mut environment = minijinja::Environment::new();
    environment.set_trim_blocks(true);
    environment.set_lstrip_blocks(true);
    environment.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    environment
}
