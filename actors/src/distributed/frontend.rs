//! The frontend side: discovery, the response-stream server and event intake, and per model an
//! [`InstanceManager`] (in [`super::instances`]) that turns discovery events into routable engines
//! and feeds the workers' KV events into this frontend's own index. Frontends are replicas: each
//! builds its index from the events, none coordinates with another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;
use serde_json::json;
use tokio::sync::mpsc;

use super::discovery::{self, DiscoveryEvent};
use super::events;
use super::instances::{InstanceManager, LoadCell};
use super::remote::RemoteSettings;
use super::response_stream::ResponseStreamServer;
use super::wire::events::{ActiveLoad, KV_EVENTS, KV_METRICS, LOAD_METRICS};
use super::{ClusterError, DistributedConfig, LoadMetrics, Local};
use crate::supervision::tree::Child;
use crate::supervision::{watch_task, ActorKind};

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
            mux: config.client_mux(),
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
        progress: service.shared_router.clone(),
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
