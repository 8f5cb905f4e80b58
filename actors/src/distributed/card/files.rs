//! What a card points at: its files (by path or URL, with the blake3 checksum the reader
//! verifies), grouped as Dynamo groups them, and the engine's runtime figures.

use serde::{Deserialize, Serialize};

use super::*;

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

    pub(super) fn validate(&self, field: &str) -> Result<(), CardError> {
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
