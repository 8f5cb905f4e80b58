//! Every Tokens model a frontend serves beyond its first (python-sdk spec §7, §7.1, §6.3): Dynamo's
//! frontend serves each model it finds a card for, so this one does too. Each such model is a
//! **lane**: a serving tree of its own (validator with the card's tokenizer and template, router,
//! migration; no HTTP, no local engines) whose remote engines are exactly the live instances that
//! hold the model's card. A LoRA adapter's card is a lane of its own: it shares the base model's
//! tokenizer, routes only to the instances that published the adapter, and names the adapter in
//! every request (`routing.lora_name`).
//!
//! [`LaneManager`] is the actor that owns the lanes: it reads the catalog of Tokens cards, starts a
//! lane for a model that appears (loading its tokenizer off the actor), feeds each lane's instance
//! manager the instances that come and go, and stops a lane when its last card or instance goes.
//! [`TokensLanes`] is the HTTP side's read-only view: the routable lanes by name.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;
use serde_json::Value;
use tokio::sync::mpsc;

use super::card::{self, CardRecord, ModelCard};
use super::discovery::DiscoveryEvent;
use super::frontend::{attach, Attached, FrontendShared};
use super::text::ModelWatch;
use super::{Instance, Local};
use crate::engine::registry::EngineRegistry;
use crate::gateway::Gateway;
use crate::router::RouterMode;
use crate::supervision::Escalation;
use crate::tokenizer::ModelTokenizer;

/// One more Tokens model, as the HTTP side serves it.
#[derive(Clone)]
pub struct Lane {
    /// The name clients send (the card's `display_name`: the adapter's name for an adapter).
    pub name: String,
    /// Other names it is listed and served under (the card's `model_aliases`).
    pub aliases: Vec<String>,
    /// Served on `/v1/chat/completions` (and `/v1/responses`).
    pub chat: bool,
    /// Served on `/v1/completions`.
    pub completions: bool,
    /// The context window served (listed in `/v1/models`).
    pub context_length: u32,
    /// The lane's serving path.
    pub gateway: Gateway,
    /// The instances routed to.
    pub engines: Arc<EngineRegistry>,
}

/// The lanes that can take requests now, by name.
#[derive(Default)]
pub struct TokensLanes {
    lanes: RwLock<BTreeMap<String, Lane>>,
}

impl TokensLanes {
    /// The lane named `name`, while at least one instance serves it.
    pub fn get(&self, name: &str) -> Option<Lane> {
        let lanes = self.lanes.read().ok()?;
        lanes.get(name).filter(|l| !l.engines.is_empty()).cloned()
    }

    /// Whether no lane is running (the request path then skips its lookup).
    pub fn is_empty(&self) -> bool {
        self.lanes.read().map(|l| l.is_empty()).unwrap_or(true)
    }

    /// Every name an instance serves, with its lane (an alias names its model's lane).
    pub fn list(&self) -> Vec<(String, Lane)> {
        self.lanes
            .read()
            .map(|l| {
                l.iter()
                    .filter(|(_, l)| !l.engines.is_empty())
                    .map(|(name, lane)| (name.clone(), lane.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Serve `lane` under its name and its aliases (an alias another model holds stays that
    /// model's).
    fn insert(&self, lane: Lane) {
        if let Ok(mut lanes) = self.lanes.write() {
            for alias in &lane.aliases {
                if lanes.get(alias).is_none_or(|l| l.name == lane.name) {
                    lanes.insert(alias.clone(), lane.clone());
                }
            }
            lanes.insert(lane.name.clone(), lane);
        }
    }

    fn remove(&self, name: &str) {
        if let Ok(mut lanes) = self.lanes.write() {
            lanes.retain(|_, lane| lane.name != name);
        }
    }
}

/// A model the cards ask for: its first card, and the live instances holding one of its cards.
#[derive(Clone, Debug, PartialEq)]
pub struct Wanted {
    /// The name served.
    pub name: String,
    /// The etcd key of the card the lane is built from (named in warnings).
    pub key: String,
    /// That card's record.
    pub record: CardRecord,
    /// The adapter every request names, for an adapter's card.
    pub lora: Option<String>,
    /// Every live instance holding one of the model's cards, by id.
    pub instances: BTreeMap<u64, Instance>,
}

/// The Tokens models of `cards` with at least one live instance in `instances`, except `primary`
/// (the frontend's own tree serves it). A card that does not parse is skipped, with one warning
/// naming its key; Text cards are the Text-model catalog's, and Embedding-only cards are not
/// served here.
pub fn wanted(
    cards: &BTreeMap<String, Vec<u8>>,
    instances: &BTreeMap<String, Vec<u8>>,
    primary: Option<&str>,
    warned: &Mutex<HashSet<String>>,
) -> BTreeMap<String, Wanted> {
    let warn_once = |key: &str, what: &str, error: String| {
        if warned
            .lock()
            .map(|mut w| w.insert(key.to_string()))
            .unwrap_or(false)
        {
            tracing::warn!(%key, "skipping {what}: {error}");
        }
    };
    let mut models: BTreeMap<String, Wanted> = BTreeMap::new();
    for (key, value) in cards {
        let input = serde_json::from_slice::<Value>(value)
            .ok()
            .and_then(|v| v.pointer("/card_json/model_input").cloned());
        if input.as_ref().and_then(Value::as_str) == Some("Text") {
            continue;
        }
        let record = match CardRecord::from_json(value) {
            Ok(record) => record,
            Err(e) => {
                warn_once(key, "a model card", e.to_string());
                continue;
            }
        };
        let card = &record.card_json;
        let kinds: Vec<&str> = card.model_type.split('|').map(str::trim).collect();
        if !kinds.iter().any(|k| *k == "Chat" || *k == "Completions") {
            continue;
        }
        let name = card.display_name.clone();
        if primary == Some(name.as_str()) {
            continue;
        }
        let instance_key = format!(
            "v1/instances/{}/{}/{}/{:x}",
            record.namespace, record.component, record.endpoint, record.instance_id
        );
        let Some(bytes) = instances.get(&instance_key) else {
            continue;
        };
        let instance = match serde_json::from_slice::<Instance>(bytes) {
            Ok(instance) => instance,
            Err(e) => {
                warn_once(&instance_key, "an instance record", e.to_string());
                continue;
            }
        };
        let lora = card.lora.as_ref().map(|l| l.name.clone());
        let model = models.entry(name.clone()).or_insert_with(|| Wanted {
            name,
            key: key.clone(),
            record: record.clone(),
            lora,
            instances: BTreeMap::new(),
        });
        model.instances.insert(instance.instance_id, instance);
    }
    models
}

/// How a lane's model differs from the frontend's own: what the tree starter changes in the
/// frontend's settings for it.
pub struct LaneSpec {
    /// The model's name (the validator accepts it and its aliases).
    pub name: String,
    /// The card's `model_aliases`.
    pub aliases: Vec<String>,
    /// The card's router mode, when it names one.
    pub router_mode: Option<RouterMode>,
    /// The card's KV block size, when usable (at least 2).
    pub block_size: Option<usize>,
    /// The card's tokenizer and chat template.
    pub tokenizer: Arc<ModelTokenizer>,
}

/// A lane's started serving tree, as the lanes use it.
pub struct LaneTree {
    /// What its instance manager wires to.
    pub local: Local,
    /// Its request path.
    pub gateway: Gateway,
    /// Its remote engines, as they join and leave.
    pub engines: Arc<EngineRegistry>,
    /// Resolves when the tree fails past its restart budget.
    pub escalated: LocalBoxFuture<'static, Escalation>,
    /// Drains and stops the tree.
    pub stop: Box<dyn FnOnce() -> LocalBoxFuture<'static, ()>>,
}

/// Starts a lane's serving tree. The process's bootstrap gives it (it owns the supervisor), so the
/// lanes start trees without importing the supervisor that starts them; its error is the
/// supervisor's, boxed for the same reason.
pub type StartLane =
    Arc<dyn Fn(LaneSpec) -> LocalBoxFuture<'static, Result<LaneTree, TreeError>> + Send + Sync>;

/// Why a lane's tree did not start: the supervisor's error, boxed so the lanes need not name it.
pub type TreeError = Box<dyn std::error::Error + Send + Sync>;

/// Why a model's lane did not start (the manager logs it and tries again when its cards change).
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// The card's tokenizer could not be loaded.
    #[error("cannot load the card's tokenizer: {0}")]
    Tokenizer(#[source] card::CardError),
    /// The lane's serving tree did not start.
    #[error("cannot start its serving tree: {0}")]
    Tree(#[source] TreeError),
    /// Its instance manager could not follow the workers' events.
    #[error("cannot follow its workers' events: {0}")]
    Events(#[source] super::ClusterError),
}

/// What every lane starts from.
pub struct LaneSettings {
    /// Starts a lane's tree from the frontend's own settings.
    pub start: StartLane,
    /// The model the frontend's own tree serves (`None`: it serves no card's model).
    pub primary: Option<String>,
}

/// A started lane.
struct Running {
    tree: LaneTree,
    attached: Attached,
    events: mpsc::UnboundedSender<DiscoveryEvent>,
    /// The instances handed to the lane's instance manager.
    fed: BTreeMap<u64, Instance>,
    /// The manager's wait for the lane's tree to escalate (cancelled when the lane stops).
    escalation: Option<SpawnHandle>,
}

enum State {
    /// Loading the card's tokenizer and starting the tree.
    Starting,
    Running(Box<Running>),
    /// The card at this key could not be served; tried again when the model's first card changes.
    Failed(String),
}

/// Owns the lanes: starts, feeds and stops them as the catalog changes.
pub struct LaneManager {
    settings: Arc<LaneSettings>,
    shared: Arc<FrontendShared>,
    view: Arc<TokensLanes>,
    watch: Arc<ModelWatch>,
    lanes: BTreeMap<String, State>,
    latest: BTreeMap<String, Wanted>,
}

impl LaneManager {
    /// Start following `watch` for Tokens models other than `settings.primary`.
    pub fn start(
        settings: LaneSettings,
        shared: Arc<FrontendShared>,
        watch: Arc<ModelWatch>,
    ) -> (Addr<LaneManager>, Arc<TokensLanes>) {
        let view = Arc::new(TokensLanes::default());
        let manager = LaneManager {
            settings: Arc::new(settings),
            shared,
            view: view.clone(),
            watch,
            lanes: BTreeMap::new(),
            latest: BTreeMap::new(),
        }
        .start();
        (manager, view)
    }

    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        let gone: Vec<String> = self
            .lanes
            .keys()
            .filter(|name| !self.latest.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(State::Running(running)) = self.lanes.remove(&name) {
                self.stop_lane(&name, *running, ctx);
            }
        }
        let names: Vec<String> = self.latest.keys().cloned().collect();
        for name in names {
            let wanted = &self.latest[&name];
            if matches!(self.lanes.get(&name), Some(State::Failed(key)) if *key != wanted.key) {
                self.lanes.remove(&name);
            }
            match self.lanes.get_mut(&name) {
                None => {
                    let start =
                        start_lane(self.settings.clone(), self.shared.clone(), wanted.clone());
                    self.lanes.insert(name.clone(), State::Starting);
                    start
                        .into_actor(self)
                        .map(move |result, me, ctx| me.started_lane(name, result, ctx))
                        .spawn(ctx);
                }
                Some(State::Running(running)) => feed(running, wanted),
                Some(_) => {}
            }
        }
    }

    fn started_lane(
        &mut self,
        name: String,
        result: Result<(Box<Running>, Lane), LaneError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(wanted) = self.latest.get(&name) else {
            // The model left while its lane started.
            self.lanes.remove(&name);
            if let Ok((running, _)) = result {
                self.stop_lane(&name, *running, ctx);
            }
            return;
        };
        match result {
            Ok((mut running, lane)) => {
                tracing::info!(model = %name, key = %wanted.key, lora = ?wanted.lora, "serving a Tokens model of the workers' cards");
                feed(&mut running, wanted);
                let escalated = std::mem::replace(
                    &mut running.tree.escalated,
                    Box::pin(std::future::pending()),
                );
                let failed = name.clone();
                running.escalation =
                    Some(ctx.spawn(
                        escalated.into_actor(self).map(move |escalation, me, ctx| {
                            me.lane_failed(failed, escalation, ctx)
                        }),
                    ));
                self.view.insert(lane);
                self.lanes.insert(name, State::Running(running));
            }
            Err(e) => {
                tracing::warn!(model = %name, key = %wanted.key, "not serving this model: {e}");
                self.lanes.insert(name, State::Failed(wanted.key.clone()));
            }
        }
    }

    /// A lane's tree escalated: it stops, and starts again from the cards.
    fn lane_failed(&mut self, name: String, escalation: Escalation, ctx: &mut Context<Self>) {
        tracing::error!(model = %name, ?escalation, "a model's serving tree failed past its restart budget; starting it again");
        if let Some(State::Running(mut running)) = self.lanes.remove(&name) {
            // This wait is the one that ended.
            running.escalation = None;
            self.stop_lane(&name, *running, ctx);
        }
        self.reconcile(ctx);
    }

    fn stop_lane(&self, name: &str, running: Running, ctx: &mut Context<Self>) {
        self.view.remove(name);
        tracing::info!(model = %name, "no worker serves this model any more; it leaves the model list");
        let Running {
            tree,
            attached,
            events,
            escalation,
            ..
        } = running;
        if let Some(escalation) = escalation {
            ctx.cancel_future(escalation);
        }
        drop(events);
        drop(attached);
        actix::spawn((tree.stop)());
    }
}

/// Hand the lane's instance manager the instances that came and went.
fn feed(running: &mut Running, wanted: &Wanted) {
    let gone: Vec<u64> = running
        .fed
        .keys()
        .filter(|id| !wanted.instances.contains_key(id))
        .copied()
        .collect();
    for id in gone {
        running.fed.remove(&id);
        let _ = running.events.send(DiscoveryEvent::Removed(id));
    }
    for (id, instance) in &wanted.instances {
        if running.fed.get(id) != Some(instance) {
            running.fed.insert(*id, instance.clone());
            let _ = running
                .events
                .send(DiscoveryEvent::Added(Box::new(instance.clone())));
        }
    }
}

/// Load the card's tokenizer, start the lane's tree and attach its instance manager.
async fn start_lane(
    settings: Arc<LaneSettings>,
    shared: Arc<FrontendShared>,
    wanted: Wanted,
) -> Result<(Box<Running>, Lane), LaneError> {
    let card: &ModelCard = &wanted.record.card_json;
    let model = card::load_model(card).await.map_err(LaneError::Tokenizer)?;
    let router_mode = match card.router_mode() {
        Ok(mode) => mode,
        Err(e) => {
            tracing::warn!(model = %wanted.name, key = %wanted.key, "{e}; routing it by the frontend's router mode");
            None
        }
    };
    let block = model.kv_block_size as usize;
    let spec = LaneSpec {
        name: wanted.name.clone(),
        aliases: card.model_aliases.clone(),
        router_mode,
        block_size: (block >= 2).then_some(block),
        tokenizer: model.tokenizer,
    };
    let tree = (settings.start)(spec).await.map_err(LaneError::Tree)?;
    let mut endpoint = shared.config.clone();
    endpoint.namespace = wanted.record.namespace.clone();
    endpoint.component = wanted.record.component.clone();
    endpoint.endpoint = wanted.record.endpoint.clone();
    let (events, discovered) = mpsc::unbounded_channel();
    let attached = match attach(
        &tree.local,
        &shared,
        &endpoint,
        wanted.lora.clone(),
        discovered,
    )
    .await
    {
        Ok(attached) => attached,
        Err(e) => {
            (tree.stop)().await;
            return Err(LaneError::Events(e));
        }
    };
    let kinds: Vec<&str> = card.model_type.split('|').map(str::trim).collect();
    let lane = Lane {
        name: wanted.name.clone(),
        aliases: card.model_aliases.clone(),
        chat: kinds.contains(&"Chat"),
        completions: kinds.contains(&"Completions"),
        context_length: model.context_length,
        gateway: tree.gateway.clone(),
        engines: tree.engines.clone(),
    };
    Ok((
        Box::new(Running {
            tree,
            attached,
            events,
            fed: BTreeMap::new(),
            escalation: None,
        }),
        lane,
    ))
}

impl Actor for LaneManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let watch = self.watch.clone();
        let primary = self.settings.primary.clone();
        let me = ctx.address();
        // The catalog is built off the actor; each change sends it the whole set.
        let follow = async move {
            let warned = Mutex::new(HashSet::new());
            let mut card_changes = watch.cards.changes();
            let mut instance_changes = watch.instances.changes();
            let mut last = None;
            loop {
                let models = wanted(
                    &watch.cards.snapshot(),
                    &watch.instances.snapshot(),
                    primary.as_deref(),
                    &warned,
                );
                if last.as_ref() != Some(&models) {
                    last = Some(models.clone());
                    if me.send(Catalog(models)).await.is_err() {
                        return;
                    }
                }
                if !ModelWatch::changed(&mut card_changes, &mut instance_changes).await {
                    return;
                }
            }
        };
        ctx.spawn(follow.into_actor(self));
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        for (name, state) in std::mem::take(&mut self.lanes) {
            if let State::Running(running) = state {
                self.stop_lane(&name, *running, ctx);
            }
        }
    }
}

/// The Tokens models the cards ask for now.
#[derive(Message)]
#[rtype(result = "()")]
struct Catalog(BTreeMap<String, Wanted>);

impl Handler<Catalog> for LaneManager {
    type Result = ();

    fn handle(&mut self, Catalog(models): Catalog, ctx: &mut Self::Context) {
        self.latest = models;
        self.reconcile(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::text::tests::instance;
    use serde_json::json;

    fn card(name: &str, input: &str, kind: &str, id: u64, lora: Option<&str>) -> Vec<u8> {
        let file =
            json!({"path": "/m/tokenizer.json", "checksum": format!("blake3:{}", "0".repeat(64))});
        serde_json::to_vec(&json!({
            "type": "Model", "namespace": "ns", "component": "c", "endpoint": "e",
            "instance_id": id,
            "card_json": {"display_name": name, "model_input": input, "model_type": kind,
                          "kv_cache_block_size": 16, "tokenizer": {"hf_tokenizer_json": file},
                          "lora": lora.map(|l| json!({"name": l}))}
        }))
        .unwrap()
    }

    #[test]
    fn tokens_models_and_adapters_with_live_instances_are_wanted() {
        let cards = BTreeMap::from([
            (
                "v1/mdc/ns/c/e/a".into(),
                card("base", "Tokens", "Chat | Completions", 10, None),
            ),
            (
                "v1/mdc/ns/c/e/b".into(),
                card("base", "Tokens", "Chat", 11, None),
            ),
            (
                "v1/mdc/ns/c/e/a/tail".into(),
                card("tail", "Tokens", "Chat", 10, Some("tail")),
            ),
            (
                "v1/mdc/ns/c/e/c".into(),
                card("first", "Tokens", "Chat", 10, None),
            ),
            (
                "v1/mdc/ns/c/e/d".into(),
                card("bot", "Text", "Chat", 10, None),
            ),
            (
                "v1/mdc/ns/c/e/f".into(),
                card("emb", "Tokens", "Embedding", 10, None),
            ),
            (
                "v1/mdc/ns/c/e/g".into(),
                card("gone", "Tokens", "Chat", 12, None),
            ),
            ("v1/mdc/ns/c/e/h".into(), b"{not json".to_vec()),
        ]);
        let instances = BTreeMap::from([instance(10), instance(11)]);
        let warned = Mutex::new(HashSet::new());
        let models = wanted(&cards, &instances, Some("first"), &warned);
        assert_eq!(models.keys().collect::<Vec<_>>(), vec!["base", "tail"]);
        assert_eq!(
            models["base"].instances.keys().collect::<Vec<_>>(),
            vec![&10, &11]
        );
        assert_eq!(models["base"].lora, None);
        assert_eq!(models["base"].key, "v1/mdc/ns/c/e/a");
        assert_eq!(models["tail"].lora.as_deref(), Some("tail"));
        assert_eq!(
            models["tail"].instances.keys().collect::<Vec<_>>(),
            vec![&10]
        );
        let warned = warned.into_inner().unwrap();
        assert_eq!(warned, HashSet::from(["v1/mdc/ns/c/e/h".to_string()]));
    }
}
