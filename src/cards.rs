//! Model deployment cards in the two processes (interop spec §2.3): the worker describes the model
//! it serves (its tokenizer files, name, block size, capacities) so that any frontend — dynamix's
//! or Dynamo's — can serve it; the frontend takes its model from the first card it finds under its
//! endpoint, so that it serves whatever workers (dynamix's or Dynamo's) register there.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamix_actors::distributed::card::{self, CardRecord, CardSpec, ModelCard, RuntimeConfig};
use dynamix_actors::distributed::discovery;
use dynamix_actors::engine::EngineKind;
use dynamix_actors::models::ModelStore;
use dynamix_actors::tokenizer::ModelTokenizer;

use crate::config::{Config, ModelSource};
use crate::{ModelError, RunError};

/// How often the frontend looks for a card while none is there, and how often it says so.
const POLL: Duration = Duration::from_secs(1);
const WAITING_LOG: Duration = Duration::from_secs(10);
/// How long a frontend that sees cards, but none it can serve on its own endpoint, waits for one
/// there before it serves the others alone.
const OTHERS_ONLY_AFTER: Duration = Duration::from_secs(3);

/// The prefix of the model cards a frontend serves beyond its own endpoint's: every namespace, or
/// only `distributed.namespace` when it is not the built-in one (python-sdk spec §7).
pub fn text_card_prefix(config: &Config) -> String {
    let default = dynamix_actors::distributed::DistributedConfig::default().namespace;
    if config.distributed.namespace == default {
        "v1/mdc/".to_string()
    } else {
        format!("v1/mdc/{}/", config.distributed.namespace)
    }
}

/// Whether any model card is under `prefix`.
async fn cards_exist(config: &Config, prefix: &str) -> Result<bool, RunError> {
    let records = discovery::list_prefix(&config.distributed, prefix)
        .await
        .map_err(|e| RunError::Distributed(e.into()))?;
    Ok(!records.is_empty())
}

/// The tokenizer of a frontend that serves Text models only: bytes (ids 0-255) and ChatML's
/// special tokens. Its own model is never listed (no worker serves it), so nothing is ever
/// tokenized with it; the serving path needs one to start.
pub fn placeholder_tokenizer() -> Result<Arc<ModelTokenizer>, RunError> {
    use serde_json::{json, Map, Value};
    // GPT-2's reversible byte -> printable character map.
    let mut visible: Vec<u32> = (u32::from('!')..=u32::from('~'))
        .chain(u32::from('¡')..=u32::from('¬'))
        .chain(u32::from('®')..=u32::from('ÿ'))
        .collect();
    let mut chars = visible.clone();
    let mut extra = 0;
    for byte in 0..256u32 {
        if !visible.contains(&byte) {
            visible.push(byte);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut vocab = Map::new();
    for (byte, ch) in visible.iter().zip(&chars) {
        let text = char::from_u32(*ch).map(String::from).unwrap_or_default();
        vocab.insert(text, json!(byte));
    }
    let special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let added: Vec<Value> = special
        .iter()
        .enumerate()
        .map(|(i, token)| {
            vocab.insert(token.to_string(), json!(256 + i));
            json!({"id": 256 + i, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                            "use_regex": true});
    let tokenizer = json!({
        "version": "1.0", "added_tokens": added, "normalizer": null,
        "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "vocab": vocab, "merges": []},
    });
    let config = json!({"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>",
                        "model_max_length": 4096});
    let tokenizer_json = tokenizer.to_string();
    let config_json = config.to_string();
    ModelTokenizer::from_hf(&dynamix_actors::tokenizer::HfTokenizerFiles {
        tokenizer_json: tokenizer_json.as_bytes(),
        tokenizer_config_json: Some(config_json.as_bytes()),
        chat_template: None,
        generation_config_json: None,
        config_json: None,
    })
    .map(Arc::new)
    .map_err(|source| {
        ModelError::Tokenizer {
            what: "cannot build the placeholder tokenizer".into(),
            source,
        }
        .into()
    })
}

/// The tokenizer of a Hugging Face model directory (`model.path`).
pub fn tokenizer_from_dir(dir: &Path) -> Result<Arc<ModelTokenizer>, RunError> {
    card::CardFiles::read_dir(dir)
        .and_then(|files| files.tokenizer())
        .map(Arc::new)
        .map_err(|source| {
            ModelError::Card {
                what: format!("model.path = {}: cannot load its tokenizer", dir.display()),
                source,
            }
            .into()
        })
}

/// The card a worker registers for `config`'s engines: the files of `model.path` in place, or
/// `tokenizer` exported into the model store.
pub fn worker_card(
    config: &Config,
    tokenizer: &ModelTokenizer,
    kv_block_size: usize,
) -> Result<ModelCard, RunError> {
    let devices = config.engine.devices.len().max(1) as u64;
    let runtime = match config.engine.kind {
        EngineKind::Mocker => RuntimeConfig::new(
            config.mocker.num_gpu_blocks as u64 * devices,
            config.mocker.max_num_seqs as u64 * devices,
            config.mocker.max_num_batched_tokens as u64,
        ),
        EngineKind::Model => RuntimeConfig::new(
            (config.model_engine.max_kv_tokens / kv_block_size.max(1)) as u64 * devices,
            config.model_engine.max_num_seqs as u64 * devices,
            config.model_engine.max_batched_tokens as u64,
        ),
        _ => RuntimeConfig::new(0, config.engine.admission_capacity as u64 * devices, 0),
    };
    let spec = CardSpec {
        model_name: config.model.name.clone(),
        kv_cache_block_size: u32::try_from(kv_block_size).unwrap_or(u32::MAX),
        context_length: 0,
        migration_limit: config.migration.limit,
        runtime,
    };
    let card = match &config.model.path {
        Some(dir) => card::card_from_model_dir(dir, &spec).map(|(_, card)| card),
        None => card::write_store_card_files(&ModelStore::default_home(), tokenizer, &spec),
    };
    card.map_err(|source| {
        ModelError::Card {
            what: "cannot write the model card".into(),
            source,
        }
        .into()
    })
}

/// What a frontend takes from a card.
pub struct CardChoice {
    /// The config with the card's model name and block size.
    pub config: Config,
    /// The card's tokenizer, or `None` to use the local one.
    pub tokenizer: Option<Arc<ModelTokenizer>>,
    /// The frontend serves no card's model of its own (it started with Text models only): every
    /// Tokens model it later finds is served in a lane of its own.
    pub placeholder: bool,
}

/// Waits for the first card under the frontend's endpoint and applies it to `config`
/// (`model.source` = `workers` or `auto`). Cards that do not parse are skipped with a warning
/// naming the key; a card whose files cannot be read is skipped under `workers` and, under
/// `auto`, served with the local tokenizer. Returns `None` if `stop` resolves first.
pub async fn frontend_model(
    mut config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Option<CardChoice>, RunError> {
    let prefix = config.distributed.card_prefix();
    let mut stop = std::pin::pin!(stop);
    let started = Instant::now();
    let mut logged: Option<Instant> = None;
    let mut skipped = std::collections::HashSet::new();
    let watched = text_card_prefix(&config);
    let mut others_seen: Option<Instant> = None;
    loop {
        let records = discovery::list_prefix(&config.distributed, &prefix)
            .await
            .map_err(|e| RunError::Distributed(e.into()))?;
        for (key, value) in records {
            if skipped.contains(&key) {
                continue;
            }
            let record = match CardRecord::from_json(&value) {
                Ok(record) => record,
                Err(e) => {
                    tracing::warn!(%key, "skipping a model card: {e}");
                    skipped.insert(key);
                    continue;
                }
            };
            let card = record.card_json;
            if card.model_input == "Text" {
                // Served as it comes, by the Text-model catalog (distributed::text), not by this
                // frontend's tokenizer path.
                skipped.insert(key);
                continue;
            }
            match card::load_model(&card).await {
                Ok(model) => {
                    tracing::info!(%key, model = %model.name, block_size = model.kv_block_size, context_length = model.context_length, "serving the model of the workers' card");
                    apply(&mut config, &model.name, model.kv_block_size as usize);
                    config.validator.model_aliases = card.model_aliases.clone();
                    match card.router_mode() {
                        Ok(Some(mode)) => config.router.mode = mode,
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(%key, "{e}; routing by the frontend's router mode")
                        }
                    }
                    return Ok(Some(CardChoice {
                        config,
                        tokenizer: Some(model.tokenizer),
                        placeholder: false,
                    }));
                }
                Err(e) if config.model.source == ModelSource::Auto => {
                    tracing::warn!(%key, model = %card.display_name, "cannot load the card's tokenizer ({e}); serving it with the local tokenizer (model.source = \"auto\")");
                    let block = card.kv_cache_block_size as usize;
                    apply(&mut config, &card.display_name, block);
                    return Ok(Some(CardChoice {
                        config,
                        tokenizer: None,
                        placeholder: false,
                    }));
                }
                Err(e) => {
                    tracing::warn!(%key, "skipping a model card: {e}");
                    skipped.insert(key);
                }
            }
        }
        // Models elsewhere, none on this endpoint: serve them (Text models as they are, Tokens
        // models in lanes of their own) rather than wait forever for a card here.
        if others_seen.is_none() && cards_exist(&config, &watched).await? {
            others_seen = Some(Instant::now());
        }
        if others_seen.is_some_and(|at| at.elapsed() >= OTHERS_ONLY_AFTER) {
            tracing::info!(
                prefix,
                "no model card this frontend can serve on its own endpoint: serving the workers' models found elsewhere (Text models, and each Tokens model on a path of its own) as they register"
            );
            return Ok(Some(CardChoice {
                config,
                tokenizer: Some(placeholder_tokenizer()?),
                placeholder: true,
            }));
        }
        if logged.is_none_or(|at| at.elapsed() >= WAITING_LOG) {
            tracing::info!(
                prefix,
                waited_secs = started.elapsed().as_secs(),
                "waiting for a worker's model card"
            );
            logged = Some(Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = &mut stop => return Ok(None),
        }
    }
}

/// The card's name and block size into the frontend's config.
fn apply(config: &mut Config, name: &str, block_size: usize) {
    config.model.name = name.to_string();
    if block_size >= 2 {
        config.router.kv_cache_block_size = Some(block_size);
        config.mocker.block_size = block_size;
        config.gpu_engine.block_size = block_size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placeholder_tokenizer_is_bytes_and_chatml_specials() {
        let tokenizer = placeholder_tokenizer().unwrap();
        assert_eq!(tokenizer.vocab_size(), 259);
        let ids = tokenizer.encode("hé!").unwrap();
        assert_eq!(ids, vec![b'h' as u32, 0xc3, 0xa9, b'!' as u32]);
        assert_eq!(tokenizer.decode(&ids, true).unwrap(), "hé!");
        assert_eq!(tokenizer.eos_token_ids(), &[258]);
    }
}
