//! The model deployment card (interop spec §2.3): how a worker tells frontends which model it
//! serves, in the form NVIDIA Dynamo 1.6.1 reads and writes.
//!
//! A worker writes a [`CardRecord`] to etcd at [`card_key`] under the lease of its instance
//! record. The card names the model (`display_name`), its KV block size and context length, and
//! references the model's small Hugging Face files (`tokenizer.json`, `tokenizer_config.json`,
//! the chat template, `config.json`, `generation_config.json`) by path or URL with a blake3
//! checksum that the reader verifies.
//!
//! - Worker side: [`write_card_files`] exports a [`ModelTokenizer`] as those files (atomically,
//!   under the model store by default, [`write_store_card_files`]) and returns the card that
//!   references them.
//! - Frontend side: [`load_model`] fetches a card's files ([`fetch_file`]: a local path, a
//!   `file://` URL or an `http://` URL of a worker's metadata server), verifies their checksums,
//!   caches them under the model store by checksum, and builds the tokenizer: a [`CardModel`].
//!
//! Reading is tolerant — unknown fields are ignored and fields Dynamo may leave out are optional —
//! but [`CardRecord::from_json`] rejects a card that could not be served, naming the field.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::models::ModelStore;
use crate::tokenizer::{HfTokenizerFiles, ModelTokenizer, TokenizerError};

#[cfg(test)]
mod tests;

/// Root of the card keys in etcd (`v1/mdc/{ns}/{comp}/{ep}/{instance_id:x}`).
pub const CARD_ROOT: &str = "v1/mdc";
/// Largest card file [`fetch_file`] accepts by default: real tokenizers are a few MB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// How long [`fetch_file`] waits for one file by default.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// The `type` of a card record.
const RECORD_TYPE: &str = "Model";
/// Prefix of every checksum in a card.
const BLAKE3_PREFIX: &str = "blake3:";

/// Why a card could not be read, written or served.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    /// The record is not JSON of the card's shape.
    #[error("model card record is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field needed to serve the model is absent or empty.
    #[error("model card has no {field}; it cannot be served without it")]
    MissingField {
        /// The field's path in the record (`card_json.tokenizer.hf_tokenizer_json`).
        field: String,
    },
    /// A field holds a value this code cannot use.
    #[error("model card field {field} is invalid: {reason}")]
    InvalidField {
        /// The field's path in the record.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file's bytes do not hash to the card's checksum.
    #[error("{file}: checksum mismatch: the card says {expected}, the file is {actual}")]
    ChecksumMismatch {
        /// The file's path or URL.
        file: String,
        /// The checksum in the card.
        expected: String,
        /// The checksum of the bytes read.
        actual: String,
    },
    /// A file is over the size limit.
    #[error("{file} is larger than the {limit}-byte limit for card files")]
    TooLarge {
        /// The file's path or URL.
        file: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file could not be read or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// `read`, `write`, `create`, ...
        action: &'static str,
        /// The file or directory.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// An `http://` file could not be fetched.
    #[error("cannot fetch {url}: {reason}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong (connection, status, framing, timeout).
        reason: String,
    },
    /// The card's files do not make a tokenizer.
    #[error("the model card's files do not make a tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
}

impl CardError {
    /// Whether trying again later may succeed (a file not reachable yet, a worker restarting),
    /// as opposed to a card that will never be servable as written.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CardError::Io { .. } | CardError::Fetch { .. } | CardError::ChecksumMismatch { .. }
        )
    }

    fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        CardError::Io {
            action,
            path: path.display().to_string(),
            source,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire types.

/// The record stored at [`card_key`]: which endpoint serves the model, and its card.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CardRecord {
    /// Always `"Model"`.
    #[serde(rename = "type")]
    pub record_type: String,
    /// Dynamo namespace of the serving endpoint.
    pub namespace: String,
    /// Component of the serving endpoint.
    pub component: String,
    /// Endpoint name (`generate`).
    pub endpoint: String,
    /// The worker instance (the etcd lease id of its instance record).
    pub instance_id: u64,
    /// The card itself.
    pub card_json: ModelCard,
}

impl CardRecord {
    /// The record for `card`, served by `instance_id` at `namespace/component/endpoint`.
    pub fn new(
        namespace: impl Into<String>,
        component: impl Into<String>,
        endpoint: impl Into<String>,
        instance_id: u64,
        card: ModelCard,
    ) -> Self {
        Self {
            record_type: RECORD_TYPE.to_string(),
            namespace: namespace.into(),
            component: component.into(),
            endpoint: endpoint.into(),
            instance_id,
            card_json: card,
        }
    }

    /// The etcd key this record is stored under.
    pub fn key(&self) -> String {
        card_key(
            &self.namespace,
            &self.component,
            &self.endpoint,
            self.instance_id,
        )
    }

    /// The record as Dynamo writes it.
    pub fn to_json(&self) -> Result<String, CardError> {
        Ok(serde_json::to_string(self)?)
    }

    /// Parses a record and checks that its card can be served ([`ModelCard::validate`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, CardError> {
        let record: Self = serde_json::from_slice(bytes)?;
        if record.record_type != RECORD_TYPE {
            return Err(CardError::InvalidField {
                field: "type".to_string(),
                reason: format!("expected {RECORD_TYPE:?}, found {:?}", record.record_type),
            });
        }
        record.card_json.validate()?;
        Ok(record)
    }
}

/// `v1/mdc/{namespace}/{component}/{endpoint}/{instance_id in lowercase hex}`.
pub fn card_key(namespace: &str, component: &str, endpoint: &str, instance_id: u64) -> String {
    format!("{CARD_ROOT}/{namespace}/{component}/{endpoint}/{instance_id:x}")
}

/// A file the card references, with the blake3 checksum its reader verifies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// A path on the reader's file system, a `file://` URL, or an `http://` URL.
    #[serde(default)]
    pub path: String,
    /// `blake3:<64 lowercase hex digits>` of the file's bytes.
    #[serde(default)]
    pub checksum: String,
    /// The file's size in bytes (optional on the wire).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

impl FileRef {
    /// The reference to `bytes` stored at `path`.
    pub fn for_bytes(path: impl Into<String>, bytes: &[u8]) -> Self {
        Self {
            path: path.into(),
            checksum: checksum(bytes),
            size: Some(bytes.len() as u64),
        }
    }

    /// The last path segment (`tokenizer.json`), for messages and metadata URLs.
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    fn validate(&self, field: &str) -> Result<(), CardError> {
        if self.path.is_empty() {
            return Err(CardError::MissingField {
                field: format!("{field}.path"),
            });
        }
        if self.checksum.is_empty() {
            return Err(CardError::MissingField {
                field: format!("{field}.checksum"),
            });
        }
        if checksum_hex(&self.checksum).is_none() {
            return Err(CardError::InvalidField {
                field: format!("{field}.checksum"),
                reason: format!(
                    "{:?} is not \"blake3:\" and 64 lowercase hex digits",
                    self.checksum
                ),
            });
        }
        Ok(())
    }
}

/// `model_info`: `{"hf_config_json": file}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfoRef {
    /// The model's `config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_config_json: Option<FileRef>,
}

/// `tokenizer`: `{"hf_tokenizer_json": file}` (Dynamo's other kind, tiktoken, is not read).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerRef {
    /// `tokenizer.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_tokenizer_json: Option<FileRef>,
}

/// A chat template file: `{"is_custom": false, "file": file}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTemplateRef {
    /// Whether the worker was given a template other than the model's own.
    #[serde(default)]
    pub is_custom: bool,
    /// The template file.
    #[serde(default)]
    pub file: FileRef,
}

/// `prompt_formatter` and `chat_template_file`: Dynamo's externally tagged enum, read as a struct
/// of optional variants so that unknown variants are ignored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptFormatterRef {
    /// `tokenizer_config.json` (bos/eos tokens, maybe a `chat_template`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_tokenizer_config_json: Option<FileRef>,
    /// A Jinja template file (`chat_template.jinja`).
    #[serde(
        default,
        alias = "hf_chat_template_jinja",
        skip_serializing_if = "Option::is_none"
    )]
    pub hf_chat_template: Option<ChatTemplateRef>,
    /// A JSON file holding `{"chat_template": ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_chat_template_json: Option<ChatTemplateRef>,
}

/// `gen_config`: `{"hf_generation_config_json": file}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenConfigRef {
    /// `generation_config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_generation_config_json: Option<FileRef>,
}

/// `runtime_config`: what the engine was started with. The fields dynamix sets are typed; the
/// rest are kept as they were read (and written with Dynamo's defaults).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// The engine's context limit; 0 or absent means the model's.
    #[serde(default)]
    pub context_length: Option<u32>,
    /// KV cache blocks the engine has.
    #[serde(default)]
    pub total_kv_blocks: Option<u64>,
    /// Most sequences the engine runs at once.
    #[serde(default)]
    pub max_num_seqs: Option<u64>,
    /// Most tokens in one engine step.
    #[serde(default)]
    pub max_num_batched_tokens: Option<u64>,
    /// Every other field (`tool_call_parser`, `data_parallel_size`, ...), as read.
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl RuntimeConfig {
    /// A worker's runtime config: the given capacities and Dynamo 1.6.1's defaults for the rest
    /// (no tool-call or reasoning parser, one data-parallel rank, KV events published, no local
    /// indexer to query).
    pub fn new(total_kv_blocks: u64, max_num_seqs: u64, max_num_batched_tokens: u64) -> Self {
        let other = json!({
            "tool_call_parser": null,
            "reasoning_parser": null,
            "tool_call_arguments_format": "json_string",
            "structural_tag_mode": "off",
            "structural_tag_scope": "auto",
            "structural_tag_schema": "auto",
            "exclude_tools_when_tool_choice_none": true,
            "data_parallel_start_rank": 0,
            "data_parallel_size": 1,
            "enable_local_indexer": false,
            "kv_event_publishing_enabled": true,
            "runtime_data": {},
            "enable_eagle": false,
        });
        Self {
            context_length: Some(0),
            total_kv_blocks: Some(total_kv_blocks),
            max_num_seqs: Some(max_num_seqs),
            max_num_batched_tokens: Some(max_num_batched_tokens),
            other: match other {
                Value::Object(map) => map,
                _ => Map::new(),
            },
        }
    }
}

/// The model deployment card (`card_json`). Every field Dynamo 1.6.1 writes; on read, absent
/// fields take their defaults and [`validate`](Self::validate) decides whether the card serves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The model name clients ask for.
    #[serde(default)]
    pub display_name: String,
    /// `display_name` reduced to `[a-z0-9_-]` ([`slug`]).
    #[serde(default)]
    pub slug: String,
    /// Where the model came from (a directory or a hub name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_path: Option<String>,
    /// `config.json`.
    #[serde(default)]
    pub model_info: Option<ModelInfoRef>,
    /// `tokenizer.json`.
    #[serde(default)]
    pub tokenizer: Option<TokenizerRef>,
    /// `tokenizer_config.json` (or a chat template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_formatter: Option<PromptFormatterRef>,
    /// The chat template as its own file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_file: Option<PromptFormatterRef>,
    /// `generation_config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_config: Option<GenConfigRef>,
    /// The model's own context window (`max_position_embeddings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectural_max_context_length: Option<u32>,
    /// The context window served (0: see `runtime_config` and the architectural maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
    /// Tokens per KV cache block.
    #[serde(default)]
    pub kv_cache_block_size: u32,
    /// How many times a request may move to another worker when its worker is lost.
    #[serde(default)]
    pub migration_limit: u32,
    /// The APIs served, as Dynamo's flags print (`"Chat | Completions"`).
    #[serde(default)]
    pub model_type: String,
    /// `"Tokens"`: the worker takes token ids, the frontend tokenizes.
    #[serde(default)]
    pub model_input: String,
    /// `"aggregated"`, `"prefill"`, `"decode"`, ...
    #[serde(default)]
    pub worker_type: Option<String>,
    /// Peer worker types this worker needs (OR of AND-sets); empty: none.
    #[serde(default)]
    pub needs: Vec<Vec<String>>,
    /// What the engine was started with.
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// Multimodal input decoding (unused by dynamix).
    #[serde(default)]
    pub media_decoder: Option<Value>,
    /// Multimodal input fetching (unused by dynamix).
    #[serde(default)]
    pub media_fetcher: Option<Value>,
}

impl ModelCard {
    /// Checks that the card has what serving needs: a name, a KV block size, a tokenizer, and a
    /// path and well-formed checksum on every file it references.
    pub fn validate(&self) -> Result<(), CardError> {
        if self.display_name.is_empty() {
            return Err(missing("card_json.display_name"));
        }
        if self.kv_cache_block_size == 0 {
            return Err(missing("card_json.kv_cache_block_size"));
        }
        if self.tokenizer_file().is_none() {
            return Err(missing("card_json.tokenizer.hf_tokenizer_json"));
        }
        for (field, file) in self.file_refs() {
            file.validate(&format!("card_json.{field}"))?;
        }
        Ok(())
    }

    /// `tokenizer.json`'s reference, if the card has one.
    pub fn tokenizer_file(&self) -> Option<&FileRef> {
        self.tokenizer.as_ref()?.hf_tokenizer_json.as_ref()
    }

    /// Every file reference with its field path under `card_json`
    /// (`tokenizer.hf_tokenizer_json`).
    pub fn file_refs(&self) -> Vec<(String, &FileRef)> {
        let mut refs = Vec::new();
        if let Some(file) = self
            .model_info
            .as_ref()
            .and_then(|m| m.hf_config_json.as_ref())
        {
            refs.push(("model_info.hf_config_json".to_string(), file));
        }
        if let Some(file) = self.tokenizer_file() {
            refs.push(("tokenizer.hf_tokenizer_json".to_string(), file));
        }
        for (name, formatter) in [
            ("prompt_formatter", &self.prompt_formatter),
            ("chat_template_file", &self.chat_template_file),
        ] {
            let Some(formatter) = formatter else { continue };
            if let Some(file) = &formatter.hf_tokenizer_config_json {
                refs.push((format!("{name}.hf_tokenizer_config_json"), file));
            }
            if let Some(template) = &formatter.hf_chat_template {
                refs.push((format!("{name}.hf_chat_template.file"), &template.file));
            }
            if let Some(template) = &formatter.hf_chat_template_json {
                refs.push((format!("{name}.hf_chat_template_json.file"), &template.file));
            }
        }
        if let Some(file) = self
            .gen_config
            .as_ref()
            .and_then(|g| g.hf_generation_config_json.as_ref())
        {
            refs.push(("gen_config.hf_generation_config_json".to_string(), file));
        }
        refs
    }

    /// Every file reference, to rewrite paths (for example into metadata-server URLs, see
    /// [`metadata_url`]).
    pub fn file_refs_mut(&mut self) -> Vec<&mut FileRef> {
        let mut refs = Vec::new();
        if let Some(file) = self
            .model_info
            .as_mut()
            .and_then(|m| m.hf_config_json.as_mut())
        {
            refs.push(file);
        }
        if let Some(file) = self
            .tokenizer
            .as_mut()
            .and_then(|t| t.hf_tokenizer_json.as_mut())
        {
            refs.push(file);
        }
        for formatter in [&mut self.prompt_formatter, &mut self.chat_template_file]
            .into_iter()
            .flatten()
        {
            refs.extend(formatter.hf_tokenizer_config_json.as_mut());
            refs.extend(formatter.hf_chat_template.as_mut().map(|t| &mut t.file));
            refs.extend(
                formatter
                    .hf_chat_template_json
                    .as_mut()
                    .map(|t| &mut t.file),
            );
        }
        if let Some(file) = self
            .gen_config
            .as_mut()
            .and_then(|g| g.hf_generation_config_json.as_mut())
        {
            refs.push(file);
        }
        refs
    }

    /// The context window to serve: the card's `context_length`, else the runtime config's,
    /// else the architectural maximum; `None` when all are absent or 0.
    pub fn served_context_length(&self) -> Option<u32> {
        [
            self.context_length,
            self.runtime_config.context_length,
            self.architectural_max_context_length,
        ]
        .into_iter()
        .flatten()
        .find(|&n| n > 0)
    }
}

fn missing(field: &str) -> CardError {
    CardError::MissingField {
        field: field.to_string(),
    }
}

/// `blake3:<hex>` of `bytes`, as a card writes it.
pub fn checksum(bytes: &[u8]) -> String {
    format!("{BLAKE3_PREFIX}{}", blake3::hash(bytes).to_hex())
}

/// The hex digest of a well-formed `blake3:<64 lowercase hex>` checksum.
fn checksum_hex(checksum: &str) -> Option<&str> {
    let hex = checksum.strip_prefix(BLAKE3_PREFIX)?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// A model name reduced to what Dynamo accepts in a slug: lowercase ASCII letters, digits, `-`
/// and `_`; anything else becomes `_` (`Qwen/Qwen3-0.6B` → `qwen_qwen3-0_6b`).
pub fn slug(name: &str) -> String {
    let slug: String = name
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = slug.trim_start_matches('_');
    if trimmed.is_empty() {
        "model".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The URL under which a worker's metadata server (`DYN_SYSTEM_PORT`) serves a card file:
/// `http://{authority}/v1/metadata/{ns}/{comp}/{ep}/{slug}/_base/{file}`.
pub fn metadata_url(
    authority: &str,
    namespace: &str,
    component: &str,
    endpoint: &str,
    slug: &str,
    file: &str,
) -> String {
    format!("http://{authority}/v1/metadata/{namespace}/{component}/{endpoint}/{slug}/_base/{file}")
}

// ---------------------------------------------------------------------------------------------
// Worker side: exporting a tokenizer as card files.

/// What a worker's card says about the model and the engine besides its files.
#[derive(Clone, Debug, PartialEq)]
pub struct CardSpec {
    /// The model name clients ask for (`display_name`).
    pub model_name: String,
    /// Tokens per KV cache block.
    pub kv_cache_block_size: u32,
    /// The engine's context limit in tokens; 0 serves the model's whole window.
    pub context_length: u32,
    /// How many times a request may move to another worker (`migration_limit`).
    pub migration_limit: u32,
    /// Engine capacities and flags (`runtime_config`).
    pub runtime: RuntimeConfig,
}

/// File names of a card's files, as Hugging Face names them.
const TOKENIZER_JSON: &str = "tokenizer.json";
const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
const CONFIG_JSON: &str = "config.json";
const GENERATION_CONFIG_JSON: &str = "generation_config.json";

/// A tokenizer exported as the Hugging Face files a card references, in memory.
#[derive(Clone, Debug)]
pub struct CardFiles {
    /// `tokenizer.json`.
    pub tokenizer_json: Vec<u8>,
    /// `tokenizer_config.json`.
    pub tokenizer_config_json: Vec<u8>,
    /// `chat_template.jinja`, when the model has a template.
    pub chat_template: Option<Vec<u8>>,
    /// `config.json` (llama-style: just what readers look up).
    pub config_json: Vec<u8>,
    /// `generation_config.json`.
    pub generation_config_json: Vec<u8>,
}

impl CardFiles {
    /// Exports `tokenizer`.
    pub fn render(tokenizer: &ModelTokenizer) -> Result<Self, CardError> {
        let bos = (!tokenizer.bos_token().is_empty()).then(|| tokenizer.bos_token().to_string());
        let mut tokenizer_config = json!({
            "add_bos_token": false,
            "add_eos_token": false,
            "bos_token": bos,
            "eos_token": tokenizer.eos_token(),
            "clean_up_tokenization_spaces": false,
            "model_max_length": tokenizer.context_length(),
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        if let (Some(template), Value::Object(map)) =
            (tokenizer.chat_template_source(), &mut tokenizer_config)
        {
            map.insert("chat_template".to_string(), Value::from(template));
        }
        let eos_ids = tokenizer.eos_token_ids();
        let eos_id_value = match eos_ids {
            [one] => json!(one),
            many => json!(many),
        };
        let bos_id = bos.as_ref().map(|_| tokenizer.bos_token_id());
        let config = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "max_position_embeddings": tokenizer.context_length(),
            "bos_token_id": bos_id,
            "eos_token_id": eos_id_value,
            "vocab_size": tokenizer.vocab_size(),
        });
        let generation_config = json!({
            "bos_token_id": bos_id,
            "eos_token_id": eos_id_value,
        });
        Ok(Self {
            tokenizer_json: tokenizer.to_hf_json()?.into_bytes(),
            tokenizer_config_json: pretty(&tokenizer_config)?,
            chat_template: tokenizer
                .chat_template_source()
                .map(|t| t.as_bytes().to_vec()),
            config_json: pretty(&config)?,
            generation_config_json: pretty(&generation_config)?,
        })
    }

    /// The files by name, in the order they are written.
    fn named(&self) -> Vec<(&'static str, &[u8])> {
        let mut files = vec![
            (TOKENIZER_JSON, &self.tokenizer_json[..]),
            (TOKENIZER_CONFIG_JSON, &self.tokenizer_config_json[..]),
            (CONFIG_JSON, &self.config_json[..]),
            (GENERATION_CONFIG_JSON, &self.generation_config_json[..]),
        ];
        if let Some(template) = &self.chat_template {
            files.push((CHAT_TEMPLATE_JINJA, &template[..]));
        }
        files
    }

    /// Sixteen hex digits identifying the files' contents, to name their directory.
    pub fn content_hash(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        for (name, bytes) in self.named() {
            hasher.update(name.as_bytes());
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        hasher.finalize().to_hex()[..16].to_string()
    }

    /// Writes the files into `dir` (created if needed; each file written to a temporary name
    /// and renamed, so a reader never sees half a file) and returns the card referencing them by
    /// absolute path.
    pub fn write(&self, dir: &Path, spec: &CardSpec) -> Result<ModelCard, CardError> {
        std::fs::create_dir_all(dir).map_err(|e| CardError::io("create", dir, e))?;
        let dir = std::fs::canonicalize(dir).map_err(|e| CardError::io("resolve", dir, e))?;
        for (name, bytes) in self.named() {
            write_atomically(&dir.join(name), bytes)?;
        }
        Ok(self.card_in(&dir, spec))
    }

    /// Reads a Hugging Face model directory's files (`tokenizer.json` is required; the others
    /// are optional and then empty, and left out of the card when empty).
    pub fn read_dir(dir: &Path) -> Result<Self, CardError> {
        let read = |name: &str, required: bool| -> Result<Option<Vec<u8>>, CardError> {
            let path = dir.join(name);
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(CardError::io("read", &path, e)),
            }
        };
        Ok(Self {
            tokenizer_json: read(TOKENIZER_JSON, true)?.unwrap_or_default(),
            tokenizer_config_json: read(TOKENIZER_CONFIG_JSON, false)?.unwrap_or_default(),
            chat_template: read(CHAT_TEMPLATE_JINJA, false)?,
            config_json: read(CONFIG_JSON, false)?.unwrap_or_default(),
            generation_config_json: read(GENERATION_CONFIG_JSON, false)?.unwrap_or_default(),
        })
    }

    /// The tokenizer these files describe.
    pub fn tokenizer(&self) -> Result<ModelTokenizer, CardError> {
        let template = match &self.chat_template {
            Some(bytes) => Some(
                std::str::from_utf8(bytes)
                    .map_err(|e| CardError::InvalidField {
                        field: CHAT_TEMPLATE_JINJA.to_string(),
                        reason: format!("not UTF-8: {e}"),
                    })?
                    .to_string(),
            ),
            None => None,
        };
        ModelTokenizer::from_hf(&crate::tokenizer::HfTokenizerFiles {
            tokenizer_json: &self.tokenizer_json,
            tokenizer_config_json: non_empty(&self.tokenizer_config_json),
            chat_template: template.as_deref(),
            generation_config_json: non_empty(&self.generation_config_json),
            config_json: non_empty(&self.config_json),
        })
        .map_err(CardError::Tokenizer)
    }

    /// The card for these files, found in `dir` under their Hugging Face names (absolute paths,
    /// checksums, sizes). Files that are empty are left out.
    pub fn card_in(&self, dir: &Path, spec: &CardSpec) -> ModelCard {
        let dir = dir.to_path_buf();
        let file = |name: &str, bytes: &[u8]| FileRef::for_bytes(path_text(&dir.join(name)), bytes);

        let architectural = context_of(&self.config_json);
        let served = if spec.context_length > 0 {
            spec.context_length
        } else {
            architectural
        };
        let mut runtime = spec.runtime.clone();
        runtime.context_length = Some(spec.context_length);
        ModelCard {
            display_name: spec.model_name.clone(),
            slug: slug(&spec.model_name),
            source_path: Some(path_text(&dir)),
            model_info: Some(ModelInfoRef {
                hf_config_json: (!self.config_json.is_empty())
                    .then(|| file(CONFIG_JSON, &self.config_json)),
            }),
            tokenizer: Some(TokenizerRef {
                hf_tokenizer_json: Some(file(TOKENIZER_JSON, &self.tokenizer_json)),
            }),
            prompt_formatter: Some(PromptFormatterRef {
                hf_tokenizer_config_json: (!self.tokenizer_config_json.is_empty())
                    .then(|| file(TOKENIZER_CONFIG_JSON, &self.tokenizer_config_json)),
                ..PromptFormatterRef::default()
            }),
            chat_template_file: self
                .chat_template
                .as_ref()
                .map(|template| PromptFormatterRef {
                    hf_chat_template: Some(ChatTemplateRef {
                        is_custom: false,
                        file: file(CHAT_TEMPLATE_JINJA, template),
                    }),
                    ..PromptFormatterRef::default()
                }),
            gen_config: (!self.generation_config_json.is_empty()).then(|| GenConfigRef {
                hf_generation_config_json: Some(file(
                    GENERATION_CONFIG_JSON,
                    &self.generation_config_json,
                )),
            }),
            architectural_max_context_length: Some(architectural),
            context_length: Some(served),
            kv_cache_block_size: spec.kv_cache_block_size,
            migration_limit: spec.migration_limit,
            model_type: "Chat | Completions".to_string(),
            model_input: "Tokens".to_string(),
            worker_type: Some("aggregated".to_string()),
            needs: Vec::new(),
            runtime_config: runtime,
            media_decoder: None,
            media_fetcher: None,
        }
    }
}

fn non_empty(bytes: &[u8]) -> Option<&[u8]> {
    (!bytes.is_empty()).then_some(bytes)
}

/// A Hugging Face model directory's tokenizer and the card referencing its own files in place
/// (nothing is copied: workers given the same directory write the same file references).
pub fn card_from_model_dir(
    dir: &Path,
    spec: &CardSpec,
) -> Result<(ModelTokenizer, ModelCard), CardError> {
    let dir = std::fs::canonicalize(dir).map_err(|e| CardError::io("resolve", dir, e))?;
    let files = CardFiles::read_dir(&dir)?;
    let tokenizer = files.tokenizer()?;
    Ok((tokenizer, files.card_in(&dir, spec)))
}

/// Exports `tokenizer` into `dir` and returns the card for `spec` ([`CardFiles::write`]).
pub fn write_card_files(
    dir: &Path,
    tokenizer: &ModelTokenizer,
    spec: &CardSpec,
) -> Result<ModelCard, CardError> {
    CardFiles::render(tokenizer)?.write(dir, spec)
}

/// [`write_card_files`] into the store at `store_home` (usually
/// [`ModelStore::default_home`]): `<home>/cards/{slug}-{content hash}`, so that workers of
/// the same model share one directory and a changed tokenizer gets a new one.
pub fn write_store_card_files(
    store_home: &Path,
    tokenizer: &ModelTokenizer,
    spec: &CardSpec,
) -> Result<ModelCard, CardError> {
    let files = CardFiles::render(tokenizer)?;
    let dir = card_dir(store_home, &spec.model_name, &files);
    files.write(&dir, spec)
}

/// `<store_home>/cards/{slug}-{content hash}`.
pub fn card_dir(store_home: &Path, model_name: &str, files: &CardFiles) -> PathBuf {
    store_home
        .join("cards")
        .join(format!("{}-{}", slug(model_name), files.content_hash()))
}

fn pretty(value: &Value) -> Result<Vec<u8>, CardError> {
    Ok(serde_json::to_vec_pretty(value)?)
}

/// `max_position_embeddings` of a `config.json` this module rendered.
fn context_of(config_json: &[u8]) -> u32 {
    serde_json::from_slice::<Value>(config_json)
        .ok()
        .and_then(|c| c.get("max_position_embeddings")?.as_u64())
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Writes `bytes` to a unique temporary name beside `path`, then renames it into place.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CardError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = std::fs::File::create(&temp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .map_err(|e| CardError::io("write", &temp, e))
        .and_then(|()| std::fs::rename(&temp, path).map_err(|e| CardError::io("rename", path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

// ---------------------------------------------------------------------------------------------
// Frontend side: fetching, verifying, loading.

/// How [`fetch_file`] and [`load_model_with`] fetch card files.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Where files fetched over HTTP are kept, named by checksum, so that a restart does not
    /// fetch them again; `None`: no cache.
    pub cache_dir: Option<PathBuf>,
    /// Largest file accepted: a bogus card must not fill memory.
    pub max_bytes: u64,
    /// Longest wait for one file: a worker that accepts connections but never answers must not
    /// stall the frontend's model discovery.
    pub timeout: Duration,
}

impl Default for FetchOptions {
    /// Caches under the default model store (`<home>/cards/fetched`), 64 MiB, 30 s.
    fn default() -> Self {
        Self {
            cache_dir: Some(ModelStore::default_home().join("cards").join("fetched")),
            max_bytes: DEFAULT_MAX_FILE_BYTES,
            timeout: DEFAULT_FETCH_TIMEOUT,
        }
    }
}

/// Reads the file `file` references — a local path, a `file://` URL or an `http://` URL — and
/// verifies its blake3 checksum. Files fetched over HTTP are served from, and saved to,
/// `options.cache_dir`.
pub async fn fetch_file(file: &FileRef, options: &FetchOptions) -> Result<Vec<u8>, CardError> {
    let expected = checksum_hex(&file.checksum).ok_or_else(|| CardError::InvalidField {
        field: format!("checksum of {}", file.path),
        reason: format!(
            "{:?} is not \"blake3:\" and 64 lowercase hex digits",
            file.checksum
        ),
    })?;
    if file.size.is_some_and(|size| size > options.max_bytes) {
        return Err(CardError::TooLarge {
            file: file.path.clone(),
            limit: options.max_bytes,
        });
    }
    if file.path.starts_with("http://") {
        fetch_http(file, expected, options).await
    } else if file.path.starts_with("https://") {
        Err(CardError::Fetch {
            url: file.path.clone(),
            reason: "https is not supported; serve card files over http or a shared path"
                .to_string(),
        })
    } else {
        let bytes = fetch_local(file, options.max_bytes).await?;
        verify(file, &bytes)?;
        Ok(bytes)
    }
}

/// An `http://` file: from the cache when a verified copy is there, else fetched, verified and
/// cached.
async fn fetch_http(
    file: &FileRef,
    expected_hex: &str,
    options: &FetchOptions,
) -> Result<Vec<u8>, CardError> {
    let cached = options.cache_dir.as_ref().map(|dir| dir.join(expected_hex));
    if let Some(bytes) = cached
        .as_deref()
        .and_then(|path| read_cached(path, expected_hex))
    {
        return Ok(bytes);
    }
    let url = file.path.trim_start_matches("http://");
    let bytes = tokio::time::timeout(options.timeout, http_get(url, options.max_bytes))
        .await
        .map_err(|_| CardError::Fetch {
            url: file.path.clone(),
            reason: format!("no complete answer within {:?}", options.timeout),
        })?
        .map_err(|error| match error {
            HttpError::TooLarge => CardError::TooLarge {
                file: file.path.clone(),
                limit: options.max_bytes,
            },
            HttpError::Other(reason) => CardError::Fetch {
                url: file.path.clone(),
                reason,
            },
        })?;
    verify(file, &bytes)?;
    if let Some(path) = cached {
        // A cache that cannot be written only costs a fetch next time.
        let saved = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(|e| CardError::io("create", &path, e))
            .and_then(|()| write_atomically(&path, &bytes));
        if let Err(error) = saved {
            tracing::warn!(%error, "cannot cache a model card file");
        }
    }
    Ok(bytes)
}

/// A local file: a path or a `file://` URL.
async fn fetch_local(file: &FileRef, limit: u64) -> Result<Vec<u8>, CardError> {
    let path = PathBuf::from(file.path.strip_prefix("file://").unwrap_or(&file.path));
    tokio::task::spawn_blocking(move || read_local(&path, limit))
        .await
        .map_err(|e| CardError::Fetch {
            url: file.path.clone(),
            reason: format!("the reading task failed: {e}"),
        })?
        .map_err(|error| match error {
            LocalError::TooLarge => CardError::TooLarge {
                file: file.path.clone(),
                limit,
            },
            LocalError::Io(e) => CardError::Io {
                action: "read",
                path: file.path.clone(),
                source: e,
            },
        })
}

fn verify(file: &FileRef, bytes: &[u8]) -> Result<(), CardError> {
    let actual = checksum(bytes);
    if actual != file.checksum {
        return Err(CardError::ChecksumMismatch {
            file: file.path.clone(),
            expected: file.checksum.clone(),
            actual,
        });
    }
    Ok(())
}

/// The cached copy of a file, if present and still matching its checksum.
fn read_cached(path: &Path, expected_hex: &str) -> Option<Vec<u8>> {
    let bytes = std::fs::read(path).ok()?;
    (blake3::hash(&bytes).to_hex().as_str() == expected_hex).then_some(bytes)
}

enum LocalError {
    TooLarge,
    Io(io::Error),
}

fn read_local(path: &Path, limit: u64) -> Result<Vec<u8>, LocalError> {
    let file = std::fs::File::open(path).map_err(LocalError::Io)?;
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, limit + 1), &mut bytes)
        .map_err(LocalError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(LocalError::TooLarge);
    }
    Ok(bytes)
}

enum HttpError {
    TooLarge,
    Other(String),
}

/// Room for the status line and headers on top of the body limit.
const MAX_HEADER_BYTES: u64 = 64 * 1024;

/// A minimal HTTP/1.1 GET of `rest` (the URL without `http://`) on its own connection. The body
/// is framed by `Content-Length`, chunked encoding, or the end of the connection; reading stops
/// as soon as it is complete, so a server that keeps the connection open is no problem.
async fn http_get(rest: &str, limit: u64) -> Result<Vec<u8>, HttpError> {
    let other = HttpError::Other;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(other("the URL has no host".to_string()));
    }
    let has_port = match authority.rfind(']') {
        Some(bracket) => authority[bracket..].contains(':'),
        None => authority.contains(':'),
    };
    let address = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .map_err(|e| other(format!("cannot connect to {address}: {e}")))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: */*\r\n\
         User-Agent: dynamix\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| other(format!("cannot send the request: {e}")))?;

    let cap = limit + MAX_HEADER_BYTES;
    let mut response = Vec::new();
    let mut head: Option<ResponseHead> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| other(format!("cannot read the answer: {e}")))?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if response.len() as u64 > cap {
            return Err(HttpError::TooLarge);
        }
        if head.is_none() {
            head = ResponseHead::parse(&response).map_err(other)?;
        }
        if let Some(head) = &head {
            if let Some(body) = head
                .body(&response[head.body_start..], false)
                .map_err(other)?
            {
                return checked_body(body, limit);
            }
        }
    }
    let head = match head {
        Some(head) => head,
        None => return Err(other("the answer has no complete header".to_string())),
    };
    match head
        .body(&response[head.body_start..], true)
        .map_err(other)?
    {
        Some(body) => checked_body(body, limit),
        None => Err(other(
            "the connection closed before the body ended".to_string(),
        )),
    }
}

fn checked_body(body: Vec<u8>, limit: u64) -> Result<Vec<u8>, HttpError> {
    if body.len() as u64 > limit {
        return Err(HttpError::TooLarge);
    }
    Ok(body)
}

/// What the status line and headers say about the body.
struct ResponseHead {
    /// Where the body starts in the response bytes.
    body_start: usize,
    content_length: Option<usize>,
    chunked: bool,
}

impl ResponseHead {
    /// The head, once `response` holds all of it (`None` before); an error for any status but
    /// 200 or a malformed head.
    fn parse(response: &[u8]) -> Result<Option<Self>, String> {
        let Some(head_end) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&response[..head_end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| format!("malformed status line {status_line:?}"))?;
        if status != 200 {
            return Err(format!("the server answered {status_line:?}"));
        }
        let mut content_length = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| format!("malformed Content-Length {value:?}"))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
        Ok(Some(Self {
            body_start: head_end + 4,
            content_length,
            chunked,
        }))
    }

    /// The body if `received` completes it (`at_end`: the connection has closed, which ends an
    /// unframed body); `None` while more is to come.
    fn body(&self, received: &[u8], at_end: bool) -> Result<Option<Vec<u8>>, String> {
        if self.chunked {
            return dechunk(received);
        }
        match self.content_length {
            Some(length) if received.len() >= length => Ok(Some(received[..length].to_vec())),
            Some(length) if at_end => Err(format!(
                "the body ended after {} of {length} bytes",
                received.len()
            )),
            Some(_) => Ok(None),
            None if at_end => Ok(Some(received.to_vec())),
            None => Ok(None),
        }
    }
}

/// Decodes a chunked body (`<hex size>[;ext]\r\n<data>\r\n ... 0\r\n`); `None` while the last
/// chunk has not arrived.
fn dechunk(mut body: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = body.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&body[..line_end]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("malformed chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(Some(out));
        }
        if body.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// A model served from a card: what the frontend needs to tokenize, route and validate.
#[derive(Clone, Debug)]
pub struct CardModel {
    /// The model name clients ask for (`display_name`).
    pub name: String,
    /// The tokenizer and chat template built from the card's files.
    pub tokenizer: Arc<ModelTokenizer>,
    /// Tokens per KV cache block (`kv_cache_block_size`).
    pub kv_block_size: u32,
    /// The context window to serve (see [`ModelCard::served_context_length`]; else the model's
    /// `config.json`).
    pub context_length: u32,
    /// Every id that ends a generation.
    pub eos_token_ids: Vec<u32>,
}

/// [`load_model_with`] with the default [`FetchOptions`].
pub async fn load_model(card: &ModelCard) -> Result<CardModel, CardError> {
    load_model_with(card, &FetchOptions::default()).await
}

/// Validates `card`, fetches and verifies its files, and builds the model's tokenizer.
pub async fn load_model_with(
    card: &ModelCard,
    options: &FetchOptions,
) -> Result<CardModel, CardError> {
    card.validate()?;
    let optional = |file: Option<&FileRef>| {
        let file = file.cloned();
        async move {
            match file {
                Some(file) => fetch_file(&file, options).await.map(Some),
                None => Ok(None),
            }
        }
    };
    let formatters = [&card.chat_template_file, &card.prompt_formatter];
    let formatter_file = |pick: fn(&PromptFormatterRef) -> Option<&FileRef>| {
        formatters.iter().filter_map(|f| f.as_ref()).find_map(pick)
    };
    let tokenizer_file = card
        .tokenizer_file()
        .ok_or_else(|| missing("card_json.tokenizer.hf_tokenizer_json"))?;

    let tokenizer_json = fetch_file(tokenizer_file, options).await?;
    let tokenizer_config =
        optional(formatter_file(|f| f.hf_tokenizer_config_json.as_ref())).await?;
    let template_jinja = optional(formatter_file(|f| {
        f.hf_chat_template.as_ref().map(|t| &t.file)
    }))
    .await?;
    let template_json = optional(formatter_file(|f| {
        f.hf_chat_template_json.as_ref().map(|t| &t.file)
    }))
    .await?;
    let generation_config = optional(
        card.gen_config
            .as_ref()
            .and_then(|g| g.hf_generation_config_json.as_ref()),
    )
    .await?;
    let config = optional(
        card.model_info
            .as_ref()
            .and_then(|m| m.hf_config_json.as_ref()),
    )
    .await?;

    let chat_template = match (template_jinja, template_json) {
        (Some(bytes), _) => {
            Some(
                String::from_utf8(bytes).map_err(|_| CardError::InvalidField {
                    field: "card_json.chat_template_file.hf_chat_template.file".to_string(),
                    reason: "the template is not UTF-8".to_string(),
                })?,
            )
        }
        (None, Some(bytes)) => Some(template_from_json(&bytes)?),
        (None, None) => None,
    };

    let tokenizer = tokio::task::spawn_blocking(move || {
        ModelTokenizer::from_hf(&HfTokenizerFiles {
            tokenizer_json: &tokenizer_json,
            tokenizer_config_json: tokenizer_config.as_deref(),
            chat_template: chat_template.as_deref(),
            generation_config_json: generation_config.as_deref(),
            config_json: config.as_deref(),
        })
    })
    .await
    .map_err(|e| {
        CardError::Tokenizer(TokenizerError::Build(format!(
            "the loading task failed: {e}"
        )))
    })??;

    Ok(CardModel {
        name: card.display_name.clone(),
        kv_block_size: card.kv_cache_block_size,
        context_length: card
            .served_context_length()
            .unwrap_or_else(|| tokenizer.context_length()),
        eos_token_ids: tokenizer.eos_token_ids().to_vec(),
        tokenizer: Arc::new(tokenizer),
    })
}

/// The template of a `{"chat_template": ...}` file (a string, or `{name, template}` entries of
/// which "default" wins).
fn template_from_json(bytes: &[u8]) -> Result<String, CardError> {
    let field = "card_json.chat_template_file.hf_chat_template_json.file";
    let invalid = |reason: &str| CardError::InvalidField {
        field: field.to_string(),
        reason: reason.to_string(),
    };
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(&format!("not JSON: {e}")))?;
    match value.get("chat_template") {
        Some(Value::String(template)) => Ok(template.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|e| e.get("template")?.as_str())
            .map(str::to_string)
            .ok_or_else(|| invalid("chat_template lists no template")),
        _ => Err(invalid("no chat_template string")),
    }
}
