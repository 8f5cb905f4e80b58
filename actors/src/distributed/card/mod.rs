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

use std::io;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::tokenizer::TokenizerError;

mod export;
mod fetch;
mod files;
#[cfg(test)]
mod tests;

pub use export::*;
pub use fetch::*;
pub use files::*;

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
    /// The LoRA adapter this card serves; `display_name` is then the adapter's name, and requests
    /// for it carry `routing.lora_name` (python-sdk spec §6.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraRef>,
    /// The worker's own metadata, kept as it came (the frontend does not interpret it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<Value>,
    /// How the frontend routes this model instead of its own router mode (`router_mode`:
    /// `RoundRobin`, `Random`, `KV`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_config: Option<Value>,
    /// Other names the model is listed and served under.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_aliases: Vec<String>,
}

impl ModelCard {
    /// The router mode the card asks for, when it asks for one dynamix has; `Err` names a mode it
    /// does not have.
    pub fn router_mode(&self) -> Result<Option<crate::router::RouterMode>, String> {
        use crate::router::RouterMode;
        let Some(mode) = self.router_config.as_ref().map(|c| &c["router_mode"]) else {
            return Ok(None);
        };
        match mode.as_str() {
            None if mode.is_null() => Ok(None),
            Some("RoundRobin") => Ok(Some(RouterMode::RoundRobin)),
            Some("Random") => Ok(Some(RouterMode::Random)),
            Some("KV") => Ok(Some(RouterMode::Kv)),
            _ => Err(format!(
                "router_config.router_mode {mode} is not one of RoundRobin, Random, KV"
            )),
        }
    }
}

/// `card_json.lora`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    /// The adapter's name.
    #[serde(default)]
    pub name: String,
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
