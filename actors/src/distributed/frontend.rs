//! The frontend side: [`InstanceManager`] turns discovery events into routable engines — one
//! [`RemoteEngine`] per worker instance, added to and removed from the router as workers register
//! and their leases vanish — and feeds the workers' KV events into this frontend's own index.
//! Frontends are replicas: each builds its index from the events, none coordinates with another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;
use serde_json::json;
use tokio::sync::mpsc;

use super::discovery::{self, DiscoveryEvent};
use super::events;
use super::remote::{RemoteEngine, RemoteSettings};
use super::response_stream::ResponseStreamServer;
use super::wire::events::{ActiveLoad, KV_EVENTS, KV_METRICS, LOAD_METRICS};
use super::{ClusterError, DistributedConfig, Instance, LoadMetrics, Local};
use crate::engine::registry::{EngineInfo, EngineRegistry};
use crate::engine::EngineLoad;
use crate::router::indexer::{KvIndexerActor, RemoveWorker};
use crate::router::{EngineAdded, EngineRemoved, EngineSlot, KvRouterActor};
use crate::supervision::tree::Child;
use crate::supervision::{watch_task, ActorKind};

type LoadCell = Arc<Mutex<Option<LoadMetrics>>>;

/// What the frontend's distributed layer needs from its process.
pub struct FrontendSettings {
    /// `[distributed]`.
    pub config: DistributedConfig,
    /// Request-plane frame limit (`DYN_TCP_MAX_MESSAGE_SIZE`).
    pub max_message_size: usize,
    /// Admission slots per worker when its record does not say.
    pub default_capacity: usize,
    /// KV block size the router uses when it routes by KV overlap (`None`: not routing by KV).
    pub kv_block_size: Option<usize>,
    /// The only namespace whose model cards this frontend serves beyond its own endpoint's
    /// (`None`: every namespace).
    pub text_namespace: Option<String>,
    /// The model this frontend serves, when it took it from the workers' cards: instances whose
    /// card names another model are not routed to (workers of several models may share one
    /// endpoint, as Dynamo's do by default).
    pub model: Option<String>,
    /// Whether the frontend's own tree routes to its endpoint's instances (false when it serves
    /// no card's model: a frontend that started with Text models only).
    pub route_own_endpoint: bool,
    /// Serve every other Tokens model of the cards in a lane of its own (python-sdk spec §7).
    pub lanes: Option<super::lanes::LaneSettings>,
}

/// What every model's instance manager of one frontend shares: the call-home server, the NATS
/// connection and the request-plane settings.
pub struct FrontendShared {
    /// `[distributed]` (a lane's endpoint replaces namespace, component and endpoint).
    pub config: DistributedConfig,
    /// The call-home server.
    pub streams: Arc<ResponseStreamServer>,
    nats: async_nats::Client,
    settings: RemoteSettings,
    default_capacity: usize,
    kv_block_size: Option<usize>,
}

/// The running distributed layer of a frontend; dropping it stops discovery and event intake.
pub struct FrontendHandle {
    _watch: discovery::WatchHandle,
    _attached: Attached,
    /// Held so the lanes live exactly as long as this handle.
    _lanes: Option<Addr<super::lanes::LaneManager>>,
    /// The call-home server.
    pub streams: Arc<ResponseStreamServer>,
}

impl FrontendHandle {
    /// The frontend's three children of the cluster subtree, in start order: `events` (the
    /// intake from NATS), `request_plane` (the response-stream server) and `discovery` (the etcd
    /// watch, the instance manager, the model catalog's lanes). Stopped in reverse: discovery
    /// first, the response streams after HTTP has drained, the intake last.
    pub fn into_children(self) -> Vec<Child> {
        let FrontendHandle {
            _watch: watch,
            _attached: mut attached,
            _lanes: lanes,
            streams,
        } = self;
        let intake = std::mem::take(&mut attached.tasks);
        vec![
            Child::new(ActorKind::Events, "0").stopped_by(move || {
                for task in &intake {
                    task.abort();
                }
                async {}.boxed_local()
            }),
            Child::new(ActorKind::RequestPlane, "0").stopped_by(move || {
                drop(streams);
                async {}.boxed_local()
            }),
            Child::new(ActorKind::Discovery, "0").stopped_by(move || {
                drop((watch, attached, lanes));
                async {}.boxed_local()
            }),
        ]
    }
}

/// One model's instance manager and event intake; dropping it stops them.
pub struct Attached {
    /// The intake tasks, watched (a panic in one escalates when the tree supervises the cluster).
    tasks: Vec<tokio::task::AbortHandle>,
    /// Held so the manager lives exactly as long as this handle.
    _manager: Addr<InstanceManager>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Start discovery, the response-stream server and event intake for `service` (started with
/// `remote_engines`). Fails, naming the address, when etcd or NATS cannot be reached.
pub async fn start(
    service: &Local,
    settings: FrontendSettings,
) -> Result<FrontendHandle, ClusterError> {
    let config = settings.config.clone();
    config.validate()?;
    let streams = ResponseStreamServer::bind(
        &config.host,
        config.response_stream_port,
        settings.max_message_size,
    )
    .await
    .map_err(|source| ClusterError::Listen {
        what: "response streams",
        address: format!("{}:{}", config.host, config.response_stream_port),
        source,
    })?;
    let nats = events::connect(
        &config.nats_url,
        "dynamix-frontend",
        Duration::from_secs_f64(config.connect_timeout_secs),
    )
    .await?;
    let shared = Arc::new(FrontendShared {
        config: config.clone(),
        streams: streams.clone(),
        nats: nats.clone(),
        settings: RemoteSettings {
            request_timeout: Duration::from_secs_f64(config.request_timeout_secs),
            connect_timeout: Duration::from_secs_f64(config.connect_timeout_secs),
            max_message_size: settings.max_message_size,
        },
        default_capacity: settings.default_capacity,
        kv_block_size: settings.kv_block_size,
    });
    let (discovered, watch) = match settings.route_own_endpoint {
        true => discovery::watch_instances(&config).await?,
        // It serves no card's model: nothing on its own endpoint is routed by its own tree.
        false => {
            let (_tx, rx) = mpsc::unbounded_channel();
            (rx, discovery::WatchHandle::idle())
        }
    };
    let etcd_state = Arc::new(Mutex::new("connected".to_string()));
    let attached = attach_with(
        service,
        &shared,
        &config,
        None,
        settings.model.clone(),
        discovered,
        etcd_state.clone(),
    )
    .await?;
    let models =
        super::text::ModelWatch::start(&config, settings.text_namespace.as_deref()).await?;
    let text_models = super::text::TextModels::start(&config, models.clone()).await?;
    let _ = service.cluster.text_models.set(text_models);
    let lanes = settings.lanes.map(|lanes| {
        let (manager, view) = super::lanes::LaneManager::start(lanes, shared.clone(), models);
        let _ = service.cluster.lanes.set(view);
        manager
    });
    let registry = service.engines.clone();
    let nats_state = nats.clone();
    let _ = service.cluster.status.set(Box::new(move || {
        json!({
            "discovery": {"backend": "etcd", "state": etcd_state.lock().map(|s| s.clone()).unwrap_or_default()},
            "event_plane": {"backend": "nats", "state": events::nats_state(&nats_state)},
            "workers": registry.len(),
        })
    }));
    Ok(FrontendHandle {
        _watch: watch,
        _attached: attached,
        _lanes: lanes,
        streams,
    })
}

/// Route `service`'s requests to the instances `discovered` names (a lane's, from its manager),
/// served at `endpoint`, with every request naming adapter `lora` when given; take their KV events
/// and load reports.
pub async fn attach(
    service: &Local,
    shared: &Arc<FrontendShared>,
    endpoint: &DistributedConfig,
    lora: Option<String>,
    discovered: mpsc::UnboundedReceiver<DiscoveryEvent>,
) -> Result<Attached, ClusterError> {
    let state = Arc::new(Mutex::new("connected".to_string()));
    attach_with(service, shared, endpoint, lora, None, discovered, state).await
}

async fn attach_with(
    service: &Local,
    shared: &Arc<FrontendShared>,
    endpoint: &DistributedConfig,
    lora: Option<String>,
    model: Option<String>,
    discovered: mpsc::UnboundedReceiver<DiscoveryEvent>,
    etcd_state: Arc<Mutex<String>>,
) -> Result<Attached, ClusterError> {
    let nats = &shared.nats;
    let mut tasks = Vec::new();
    if let Some(sink) = service.kv_events_in.clone() {
        tasks.push(
            events::subscribe_kv_events(nats, endpoint.event_subject(KV_EVENTS), sink).await?,
        );
    }
    let loads: Arc<Mutex<HashMap<u64, LoadCell>>> = Arc::default();
    {
        let loads = loads.clone();
        tasks.push(
            events::subscribe_load_metrics(nats, endpoint.event_subject(LOAD_METRICS), move |m| {
                if let Some(cell) = loads.lock().ok().and_then(|l| l.get(&m.worker_id).cloned()) {
                    if let Ok(mut cell) = cell.lock() {
                        *cell = Some(m);
                    }
                }
            })
            .await?,
        );
    }
    {
        // Dynamo workers publish only their KV usage: keep it beside the rest of their load.
        let loads = loads.clone();
        tasks.push(
            events::subscribe_enveloped(
                nats,
                endpoint.event_subject(KV_METRICS),
                "KV metrics",
                move |usage: ActiveLoad| {
                    let Some(cell) = loads
                        .lock()
                        .ok()
                        .and_then(|l| l.get(&usage.worker_id).cloned())
                    else {
                        return;
                    };
                    let Ok(mut guard) = cell.lock() else {
                        return;
                    };
                    let load = guard.get_or_insert_with(|| LoadMetrics {
                        worker_id: usage.worker_id,
                        ..LoadMetrics::default()
                    });
                    load.kv_active_blocks = usage.kv_used_blocks;
                },
            )
            .await?,
        );
    }
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    let manager = InstanceManager {
        settings: shared.settings.clone(),
        default_capacity: shared.default_capacity,
        // Routing by KV overlap: each model's router uses its own card's block size.
        kv_block_size: shared.kv_block_size.map(|_| service.kv_block_size),
        model,
        lora,
        config: endpoint.clone(),
        pending: Default::default(),
        streams: shared.streams.clone(),
        router: service.router.clone(),
        indexer: service.indexer.clone(),
        registry: service.engines.clone(),
        loads,
        known: HashMap::new(),
        down_tx,
        etcd_state,
        inputs: Some((discovered, down_rx)),
    }
    .start();
    Ok(Attached {
        tasks: tasks
            .into_iter()
            .map(|task| watch_task(task, service.tracker(ActorKind::Events)))
            .collect(),
        _manager: manager,
    })
}

struct Known {
    instance: Instance,
    addr: Addr<RemoteEngine>,
    load: Arc<EngineLoad>,
    routable: bool,
}

/// Keeps the router's engines equal to the live workers.
pub struct InstanceManager {
    settings: RemoteSettings,
    default_capacity: usize,
    kv_block_size: Option<usize>,
    model: Option<String>,
    /// The adapter every request names (a LoRA adapter's lane).
    lora: Option<String>,
    config: DistributedConfig,
    /// Instances whose card is being checked (a removal meanwhile cancels the add).
    pending: std::collections::HashSet<u64>,
    streams: Arc<ResponseStreamServer>,
    router: Addr<KvRouterActor>,
    indexer: Option<Addr<KvIndexerActor>>,
    registry: Arc<EngineRegistry>,
    loads: Arc<Mutex<HashMap<u64, LoadCell>>>,
    known: HashMap<u64, Known>,
    down_tx: mpsc::UnboundedSender<u64>,
    etcd_state: Arc<Mutex<String>>,
    #[allow(clippy::type_complexity)]
    inputs: Option<(
        mpsc::UnboundedReceiver<DiscoveryEvent>,
        mpsc::UnboundedReceiver<u64>,
    )>,
}

impl Actor for InstanceManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some((mut discovered, mut down)) = self.inputs.take() {
            ctx.add_stream(futures_util::stream::poll_fn(move |cx| {
                discovered.poll_recv(cx)
            }));
            ctx.add_stream(futures_util::stream::poll_fn(move |cx| {
                down.poll_recv(cx).map(|id| id.map(Down))
            }));
        }
    }
}

/// A request failed in a way that suggests the worker is gone.
struct Down(u64);

/// A down worker answered a probe.
#[derive(Message)]
#[rtype(result = "()")]
struct Answered(u64);

impl InstanceManager {
    fn add(&mut self, instance: Instance) {
        let id = instance.instance_id;
        if let Some(known) = self.known.get(&id) {
            if known.instance == instance && known.routable {
                return;
            }
        }
        if let (Some(ours), Some(theirs)) = (self.kv_block_size, instance.kv_block_size) {
            if ours != theirs {
                tracing::error!(
                    worker = format!("{id:x}"),
                    "worker uses KV blocks of {theirs} tokens but this frontend's router uses {ours} (router.kv_cache_block_size); not routing to it"
                );
                return;
            }
        }
        let load = Arc::new(EngineLoad::default());
        let engine = match RemoteEngine::new(
            &instance,
            self.settings.clone(),
            self.streams.clone(),
            self.down_tx.clone(),
            load.clone(),
            Some(self.router.clone().recipient()),
        ) {
            Ok(engine) => engine.for_adapter(self.lora.clone()),
            Err(e) => {
                tracing::error!(worker = format!("{id:x}"), error = %e, "cannot route to this worker");
                return;
            }
        };
        let addr = engine.start();
        let capacity = instance.capacity.unwrap_or(self.default_capacity).max(1);
        let address = instance.tcp_address().unwrap_or_default();
        self.router.do_send(EngineAdded {
            slot: EngineSlot {
                id,
                addr: addr.clone().recipient(),
                load: load.clone(),
                capacity,
                device: address.clone(),
            },
        });
        let cell: LoadCell = Arc::default();
        if let Ok(mut loads) = self.loads.lock() {
            loads.insert(id, cell.clone());
        }
        self.registry.upsert(EngineInfo {
            gpu: None,
            instance_id: id,
            engine: instance.engine.clone().unwrap_or_else(|| "remote".into()),
            device: address.clone(),
            load: load.clone(),
            mocker: None,
            model: None,
            transport: format!("tcp://{address}"),
            endpoint_id: [
                instance.namespace.clone(),
                instance.component.clone(),
                instance.endpoint.clone(),
            ],
            remote: Some(cell),
        });
        tracing::info!(worker = format!("{id:x}"), %address, "worker joined; routing to it");
        self.known.insert(
            id,
            Known {
                instance,
                addr,
                load,
                routable: true,
            },
        );
    }

    fn unroute(&mut self, id: u64) {
        self.router.do_send(EngineRemoved { engine_id: id });
        if let Some(info) = self.registry.remove(id) {
            info.load
                .retired
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(known) = self.known.remove(&id) else {
            return;
        };
        self.unroute(id);
        if let Some(indexer) = &self.indexer {
            indexer.do_send(RemoveWorker(id));
        }
        if let Ok(mut loads) = self.loads.lock() {
            loads.remove(&id);
        }
        drop(known.addr);
        tracing::warn!(
            worker = format!("{id:x}"),
            active = known.load.active(),
            "worker left discovery (lease revoked or expired); no longer routing to it"
        );
    }
}

/// An instance whose model card was checked.
#[derive(Message)]
#[rtype(result = "()")]
struct Checked(Box<Instance>);

impl Handler<Checked> for InstanceManager {
    type Result = ();

    fn handle(&mut self, Checked(instance): Checked, _ctx: &mut Self::Context) {
        if self.pending.remove(&instance.instance_id) {
            self.add(*instance);
        }
    }
}

/// What an instance's model card says.
enum CardCheck {
    /// It serves this model.
    Serves(String),
    /// It wrote no card (within the wait).
    Missing,
    /// The card could not be read or parsed (the reason).
    Unreadable(String),
}

/// Reads `v1/mdc/.../{id:x}`, waiting up to 2 s for it: a worker writes its card just after its
/// instance record.
async fn card_model(config: &DistributedConfig, id: u64) -> CardCheck {
    let key = config.card_key(id);
    for _ in 0..10 {
        match super::discovery::list_prefix(config, &key).await {
            Ok(records) => {
                if let Some((_, value)) = records.into_iter().find(|(k, _)| *k == key) {
                    return match serde_json::from_slice::<serde_json::Value>(&value) {
                        Ok(card) => match card["card_json"]["display_name"].as_str() {
                            Some(name) => CardCheck::Serves(name.to_string()),
                            None => {
                                CardCheck::Unreadable("card_json.display_name is missing".into())
                            }
                        },
                        Err(e) => CardCheck::Unreadable(format!("not JSON: {e}")),
                    };
                }
            }
            Err(e) => return CardCheck::Unreadable(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    CardCheck::Missing
}

impl InstanceManager {
    /// Routes to `instance` once its card shows it serves this frontend's model (when the frontend
    /// took its model from the cards); a worker without a card, or whose card cannot be read, is
    /// routed to as before.
    fn check_then_add(&mut self, instance: Instance, ctx: &mut Context<Self>) {
        let Some(model) = self.model.clone() else {
            return self.add(instance);
        };
        let id = instance.instance_id;
        if self
            .known
            .get(&id)
            .is_some_and(|k| k.instance == instance && k.routable)
        {
            return;
        }
        self.pending.insert(id);
        let config = self.config.clone();
        let me = ctx.address();
        actix::spawn(async move {
            let worker = format!("{id:x}");
            match card_model(&config, id).await {
                CardCheck::Serves(name) if name == model => {}
                CardCheck::Serves(name) => {
                    tracing::warn!(%worker, card_model = %name, served = %model, "worker serves another model; not routing to it");
                    return;
                }
                CardCheck::Missing => {
                    tracing::debug!(%worker, "worker wrote no model card; routing to it")
                }
                CardCheck::Unreadable(reason) => {
                    tracing::warn!(%worker, key = %config.card_key(id), %reason, "cannot read the worker's model card; routing to it")
                }
            }
            me.do_send(Checked(Box::new(instance)));
        });
    }
}

impl StreamHandler<DiscoveryEvent> for InstanceManager {
    fn handle(&mut self, event: DiscoveryEvent, ctx: &mut Self::Context) {
        match event {
            DiscoveryEvent::Added(instance) => self.check_then_add(*instance, ctx),
            DiscoveryEvent::Removed(id) => {
                self.pending.remove(&id);
                self.remove(id)
            }
            DiscoveryEvent::Lost(reason) => {
                tracing::warn!(%reason, "lost etcd; routing to the {} workers already known until it is back", self.known.len());
                if let Ok(mut state) = self.etcd_state.lock() {
                    *state = format!("disconnected: {reason}");
                }
            }
            DiscoveryEvent::Restored => {
                tracing::info!("etcd is back; re-reading the workers");
                if let Ok(mut state) = self.etcd_state.lock() {
                    *state = "connected".into();
                }
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {
        tracing::debug!("discovery stream ended");
    }
}

impl StreamHandler<Down> for InstanceManager {
    fn handle(&mut self, Down(id): Down, ctx: &mut Self::Context) {
        let Some(known) = self.known.get_mut(&id) else {
            return;
        };
        if !known.routable {
            return;
        }
        known.routable = false;
        let address = known.instance.tcp_address().unwrap_or_default();
        tracing::warn!(worker = format!("{id:x}"), %address, "worker looks down (request failed or stream broke); not routing to it until it answers");
        self.unroute(id);
        // Probe until it answers or discovery drops it.
        let me = ctx.address();
        actix::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !me.connected() {
                    return;
                }
                let ok = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(&address),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                if ok {
                    me.do_send(Answered(id));
                    return;
                }
                if !matches!(me.send(IsDown(id)).await, Ok(true)) {
                    return;
                }
            }
        });
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {}
}

/// Whether `id` is known and not routable (the probe keeps going only then).
#[derive(Message)]
#[rtype(result = "bool")]
struct IsDown(u64);

impl Handler<IsDown> for InstanceManager {
    type Result = bool;

    fn handle(&mut self, IsDown(id): IsDown, _ctx: &mut Self::Context) -> bool {
        self.known.get(&id).is_some_and(|k| !k.routable)
    }
}

impl Handler<Answered> for InstanceManager {
    type Result = ();

    fn handle(&mut self, Answered(id): Answered, _ctx: &mut Self::Context) {
        let Some(known) = self.known.get(&id) else {
            return;
        };
        if known.routable {
            return;
        }
        let instance = known.instance.clone();
        tracing::info!(worker = format!("{id:x}"), "worker answers again");
        self.add(instance);
    }
}
