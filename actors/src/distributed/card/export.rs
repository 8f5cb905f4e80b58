//! Worker side: a tokenizer exported as the Hugging Face files a card references, or a model
//! directory's own files, and the card for them.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::*;
use crate::tokenizer::ModelTokenizer;

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
            lora: None,
            user_data: None,
            router_config: None,
            model_aliases: Vec::new(),
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
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CardError> {
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
