//! Text-input models (python-sdk spec §7.2): workers whose model card says `model_input: "Text"`
//! take the client's OpenAI request body as it came and answer OpenAI stream chunks. The frontend
//! only routes: [`TextModels`] follows every model card and instance record in etcd, lists a Text
//! model while at least one live instance holds its card, and calls those instances round-robin
//! through the same endpoint client the Python SDK uses. No tokenizer, template, stop string or
//! migration applies: the worker's words are final.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dynamix_wire::client::{Call, ClientSettings, EndpointClient, ResponseStream};
use dynamix_wire::etcd::{self, Client};
use dynamix_wire::record::Instance;
use dynamix_wire::watch::{watch_prefix, KeyWatch};
use serde_json::Value;

use super::{ClusterError, DistributedConfig};

/// One Text model as the frontend serves it.
#[derive(Clone, Debug, PartialEq)]
pub struct TextModel {
    /// The name clients send (`display_name`).
    pub name: String,
    /// Served on `/v1/chat/completions`.
    pub chat: bool,
    /// Served on `/v1/completions`.
    pub completions: bool,
    /// Its context window, when the card gives one (listed in `/v1/models`).
    pub context_length: u64,
    /// The live instances that hold its card, by id.
    pub instances: Vec<Instance>,
}

/// The frontend's view of the Text models in etcd, and its client for them.
pub struct TextModels {
    catalog: Arc<RwLock<BTreeMap<String, TextModel>>>,
    client: Arc<EndpointClient>,
    next: AtomicUsize,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for TextModels {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The model cards and instance records in etcd, followed once for every kind of model a frontend
/// serves (Text models here, more Tokens models in [`lanes`](super::lanes)).
pub struct ModelWatch {
    /// `v1/mdc/` (every namespace, or one).
    pub cards: KeyWatch,
    /// `v1/instances/`.
    pub instances: KeyWatch,
}

impl ModelWatch {
    /// Follow `v1/mdc/` (every namespace, or `namespace`'s only) and `v1/instances/` in etcd.
    pub async fn start(
        config: &DistributedConfig,
        namespace: Option<&str>,
    ) -> Result<Arc<ModelWatch>, ClusterError> {
        let options = etcd::ConnectOptions {
            connect_timeout: Duration::from_secs_f64(config.connect_timeout_secs),
            ..etcd::ConnectOptions::default()
        };
        let client = Client::connect(&config.etcd_endpoints, &options)
            .await
            .map_err(|source| ClusterError::Etcd {
                what: "model cards",
                source,
            })?;
        let card_prefix = match namespace {
            Some(ns) => format!("v1/mdc/{ns}/"),
            None => "v1/mdc/".to_string(),
        };
        let cards = watch_prefix(client.clone(), &card_prefix, Duration::from_secs(10))
            .await
            .map_err(ClusterError::Watch)?;
        let instances = watch_prefix(client, "v1/instances/", Duration::from_secs(10))
            .await
            .map_err(ClusterError::Watch)?;
        Ok(Arc::new(ModelWatch { cards, instances }))
    }

    /// Resolves when the cards or the instances change; `false` once the watches ended.
    pub async fn changed(
        card_changes: &mut tokio::sync::watch::Receiver<u64>,
        instance_changes: &mut tokio::sync::watch::Receiver<u64>,
    ) -> bool {
        tokio::select! {
            changed = card_changes.changed() => changed.is_ok(),
            changed = instance_changes.changed() => changed.is_ok(),
        }
    }
}

impl TextModels {
    /// Serve the Text models of `watch`.
    pub async fn start(
        config: &DistributedConfig,
        watch: Arc<ModelWatch>,
    ) -> Result<Arc<TextModels>, ClusterError> {
        let calls = EndpointClient::new(
            &config.host,
            ClientSettings {
                request_timeout: Duration::from_secs_f64(config.request_timeout_secs),
                connect_timeout: Duration::from_secs_f64(config.connect_timeout_secs),
                max_message_size: config.max_message_size,
                mux: config.client_mux(),
            },
        )
        .await
        .map_err(|source| ClusterError::Listen {
            what: "response streams",
            address: format!("{}:0", config.host),
            source,
        })?;
        let catalog = Arc::new(RwLock::new(BTreeMap::new()));
        let task = tokio::spawn(follow(watch, catalog.clone()));
        Ok(Arc::new(TextModels {
            catalog,
            client: Arc::new(calls),
            next: AtomicUsize::new(0),
            tasks: vec![task],
        }))
    }

    /// The model named `name`, if it is a Text model with a live instance.
    pub fn get(&self, name: &str) -> Option<TextModel> {
        self.catalog.read().ok()?.get(name).cloned()
    }

    /// Whether no Text model is listed.
    pub fn is_empty(&self) -> bool {
        self.catalog.read().map(|c| c.is_empty()).unwrap_or(true)
    }

    /// Every listed Text model.
    pub fn list(&self) -> Vec<TextModel> {
        self.catalog
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Send `body` to the next instance of `model` (round-robin): that instance's id and the stream
    /// of its chunks.
    pub async fn call(
        &self,
        model: &TextModel,
        request_id: &str,
        body: &Value,
        headers: BTreeMap<String, String>,
    ) -> Result<(u64, ResponseStream), dynamix_wire::client::CallError> {
        use dynamix_wire::client::CallError;
        if model.instances.is_empty() {
            return Err(CallError::Unavailable(format!(
                "no instances for model {}",
                model.name
            )));
        }
        let instance =
            &model.instances[self.next.fetch_add(1, Ordering::Relaxed) % model.instances.len()];
        // CallError carries text: it crosses into HTTP responses and the Python SDK as such.
        let target = instance
            .tcp_target()
            .map_err(|e| CallError::Unavailable(e.to_string()))?;
        let stream = self
            .client
            .call(Call {
                target: &target,
                codec: instance.codec(),
                id: request_id,
                body,
                headers,
                mux: instance.speaks_mux(),
            })
            .await?;
        Ok((instance.instance_id, stream))
    }
}

/// Rebuild the catalog whenever cards or instances change.
async fn follow(watch: Arc<ModelWatch>, catalog: Arc<RwLock<BTreeMap<String, TextModel>>>) {
    let warned = Mutex::new(HashSet::new());
    let mut card_changes = watch.cards.changes();
    let mut instance_changes = watch.instances.changes();
    loop {
        let built = build(
            &watch.cards.snapshot(),
            &watch.instances.snapshot(),
            &warned,
        );
        if let Ok(mut current) = catalog.write() {
            if *current != built {
                let names: Vec<&String> = built.keys().collect();
                tracing::info!(models = ?names, "Text models served from workers' cards");
                *current = built;
            }
        }
        if !ModelWatch::changed(&mut card_changes, &mut instance_changes).await {
            return;
        }
    }
}

/// The Text models of `cards` whose instance is alive in `instances`. A card that does not parse is
/// skipped, with one warning naming its key.
fn build(
    cards: &BTreeMap<String, Vec<u8>>,
    instances: &BTreeMap<String, Vec<u8>>,
    warned: &Mutex<HashSet<String>>,
) -> BTreeMap<String, TextModel> {
    let mut models: BTreeMap<String, TextModel> = BTreeMap::new();
    for (key, value) in cards {
        let parsed = serde_json::from_slice::<Value>(value)
            .map_err(CardRecordError::from)
            .and_then(|record| card_facts(&record));
        let facts = match parsed {
            Ok(Some(facts)) => facts,
            Ok(None) => continue,
            Err(e) => {
                if warned
                    .lock()
                    .map(|mut w| w.insert(key.clone()))
                    .unwrap_or(false)
                {
                    tracing::warn!(%key, "skipping a model card: {e}");
                }
                continue;
            }
        };
        let instance_key = format!(
            "v1/instances/{}/{}/{}/{:x}",
            facts.namespace, facts.component, facts.endpoint, facts.instance_id
        );
        let Some(record) = instances.get(&instance_key) else {
            continue;
        };
        let instance = match serde_json::from_slice::<Instance>(record) {
            Ok(instance) => instance,
            Err(e) => {
                if warned
                    .lock()
                    .map(|mut w| w.insert(instance_key.clone()))
                    .unwrap_or(false)
                {
                    tracing::warn!(key = %instance_key, "skipping an instance record: {e}");
                }
                continue;
            }
        };
        let model = models
            .entry(facts.name.clone())
            .or_insert_with(|| TextModel {
                name: facts.name.clone(),
                chat: false,
                completions: false,
                context_length: facts.context_length,
                instances: Vec::new(),
            });
        model.chat |= facts.chat;
        model.completions |= facts.completions;
        if !model
            .instances
            .iter()
            .any(|i| i.instance_id == instance.instance_id)
        {
            model.instances.push(instance);
        }
    }
    models
}

/// What the catalog needs from one card record.
#[derive(Debug, PartialEq)]
struct CardFacts {
    name: String,
    namespace: String,
    component: String,
    endpoint: String,
    instance_id: u64,
    chat: bool,
    completions: bool,
    context_length: u64,
}

/// What is wrong with a malformed card record (the catalog skips it, saying so once).
#[derive(Debug, thiserror::Error)]
enum CardRecordError {
    /// The value is not JSON.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A string field is absent, empty or not a string.
    #[error("`{0}` is missing or not a string")]
    NotAString(&'static str),
    /// `card_json` is absent or not an object.
    #[error("`card_json` is missing or not an object")]
    NoCard,
    /// `card_json.display_name` is absent or empty.
    #[error("`card_json.display_name` is missing or empty")]
    NoDisplayName,
    /// `instance_id` is absent or not a `u64`.
    #[error("`instance_id` is missing or not an unsigned integer")]
    NoInstanceId,
}

/// The facts of a Text model's card; `None` for other models (Tokens cards are served by the
/// frontend's own model path); `Err` naming what is wrong with a malformed record.
fn card_facts(record: &Value) -> Result<Option<CardFacts>, CardRecordError> {
    let text = |field: &'static str| -> Result<String, CardRecordError> {
        record
            .get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or(CardRecordError::NotAString(field))
    };
    let card = record
        .get("card_json")
        .filter(|c| c.is_object())
        .ok_or(CardRecordError::NoCard)?;
    if card.get("model_input").and_then(Value::as_str) != Some("Text") {
        return Ok(None);
    }
    let name = card
        .get("display_name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(CardRecordError::NoDisplayName)?
        .to_string();
    let model_type = card
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or(CardRecordError::NotAString("card_json.model_type"))?;
    let kinds: Vec<&str> = model_type.split('|').map(str::trim).collect();
    let instance_id = record
        .get("instance_id")
        .and_then(Value::as_u64)
        .ok_or(CardRecordError::NoInstanceId)?;
    Ok(Some(CardFacts {
        name,
        namespace: text("namespace")?,
        component: text("component")?,
        endpoint: text("endpoint")?,
        instance_id,
        chat: kinds.contains(&"Chat"),
        completions: kinds.contains(&"Completions"),
        context_length: card
            .get("context_length")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    fn card(name: &str, input: &str, id: u64, kind: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "type": "Model", "namespace": "ns", "component": "c", "endpoint": "e",
            "instance_id": id,
            "card_json": {"display_name": name, "model_input": input, "model_type": kind,
                          "context_length": 128}
        }))
        .unwrap()
    }

    /// The etcd key and record of instance `id` of `ns/c/e`.
    pub(crate) fn instance(id: u64) -> (String, Vec<u8>) {
        let record = json!({"type": "Endpoint", "namespace": "ns", "component": "c",
                            "endpoint": "e", "instance_id": id,
                            "transport": {"tcp": format!("127.0.0.1:1/{id:x}/ns/c/e")}});
        (
            format!("v1/instances/ns/c/e/{id:x}"),
            serde_json::to_vec(&record).unwrap(),
        )
    }

    #[test]
    fn text_cards_with_live_instances_are_listed_and_others_are_not() {
        let cards = BTreeMap::from([
            (
                "v1/mdc/ns/c/e/a".to_string(),
                card("bot", "Text", 10, "Chat"),
            ),
            (
                "v1/mdc/ns/c/e/b".to_string(),
                card("bot", "Text", 11, "Chat | Completions"),
            ),
            (
                "v1/mdc/ns/c/e/c".to_string(),
                card("tok", "Tokens", 10, "Chat"),
            ),
            (
                "v1/mdc/ns/c/e/d".to_string(),
                card("gone", "Text", 12, "Chat"),
            ),
            ("v1/mdc/ns/c/e/e".to_string(), b"{not json".to_vec()),
            (
                "v1/mdc/ns/c/e/f".to_string(),
                br#"{"card_json": {"model_input": "Text"}}"#.to_vec(),
            ),
        ]);
        let instances = BTreeMap::from([instance(10), instance(11)]);
        let warned = Mutex::new(HashSet::new());
        let models = build(&cards, &instances, &warned);
        assert_eq!(models.keys().collect::<Vec<_>>(), vec!["bot"]);
        let bot = &models["bot"];
        assert!(bot.chat && bot.completions);
        assert_eq!(bot.context_length, 128);
        let ids: Vec<u64> = bot.instances.iter().map(|i| i.instance_id).collect();
        assert_eq!(ids, vec![10, 11]);
        // Each malformed card is warned about once, by key.
        let warned = warned.into_inner().unwrap();
        assert!(warned.contains("v1/mdc/ns/c/e/e") && warned.contains("v1/mdc/ns/c/e/f"));
        assert_eq!(
            card_facts(&serde_json::from_slice(&cards["v1/mdc/ns/c/e/f"]).unwrap())
                .unwrap_err()
                .to_string(),
            "`card_json.display_name` is missing or empty"
        );
    }
}
