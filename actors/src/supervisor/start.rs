//! Starting the tree: one function per actor kind, called in the order the tree declares
//! ([`crate::supervision::tree::start_order`]). Each returns the children it started (with how to
//! stop them) and leaves what later kinds need in [`Startup`]; a failure stops what already runs,
//! last started first, and is the start's error.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;

use super::preflight::{check, metrics, mocker_vocabulary, resolve_devices};
use super::{ClusterStart, RunningService, ServiceConfig, StartError, Supervisor};
use crate::embeddings::EmbeddingService;
use crate::engine::registry::{EngineInfo, EngineRegistry};
use crate::engine::{
    EngineActor, EngineKind, EngineLoad, EngineSpec, LlamaModel, MockerLoad, ModelLoad,
    ProgressSink, ResyncKv,
};
use crate::faults::FaultInjector;
use crate::gateway::inflight::InflightRegistry;
use crate::gateway::migration::Migrator;
use crate::gateway::Gateway;
use crate::http::{self, AppState, ClusterStatus, HttpActor, Lifecycle, ModelCard};
use crate::kv::indexer::SharedKvIndex;
use crate::kv::protocol::RouterEvent;
use crate::metrics::FrontendMetrics;
use crate::router::indexer::KvIndexerActor;
use crate::router::policy::KvContext;
use crate::router::{EngineSlot, KvRouterActor, Router, RouterMode};
use crate::supervision::tree::{start_order, Child, SupervisorLink, Tree, POOL};
use crate::supervision::{shared_budget, ActorKind, RestartTracker, SupervisorEvent};
use crate::tokenizer::ModelTokenizer;
use crate::validator::{Validator, ValidatorActor, ValidatorPool, ValidatorSupervision};

type Events = tokio::sync::mpsc::UnboundedSender<SupervisorEvent>;

/// What the children started so far left for the ones after them.
struct Startup {
    config: ServiceConfig,
    tokenizer: Arc<ModelTokenizer>,
    weights: Option<Arc<LlamaModel>>,
    gms: Option<crate::gms::InProcessGms>,
    metrics: Arc<FrontendMetrics>,
    faults: Arc<FaultInjector>,
    events: Events,
    block_size: usize,
    /// The shared prefix index (kv routing only).
    index: Option<SharedKvIndex>,
    /// Where engines send KV events (the indexer's or the exporter's channel).
    kv_events: Option<tokio::sync::mpsc::UnboundedSender<RouterEvent>>,
    kv_events_rx: Option<tokio::sync::mpsc::UnboundedReceiver<RouterEvent>>,
    /// A worker's engines' KV events, for the cluster side to publish.
    kv_events_out: Option<tokio::sync::mpsc::UnboundedReceiver<RouterEvent>>,
    /// Starts the cluster subtree (frontends and workers).
    cluster_start: Option<ClusterStart>,
    indexer: Option<Addr<KvIndexerActor>>,
    /// Engines report request progress to the router, which starts after them.
    progress: ProgressSink,
    slots: Vec<EngineSlot>,
    infos: Vec<EngineInfo>,
    router: Option<Addr<KvRouterActor>>,
    /// The router's shared selection state, which the serving path routes through.
    shared_router: Option<Arc<Router>>,
    validator: Option<ValidatorPool>,
    embeddings: Option<EmbeddingService>,
    /// Engines and their live load (remote ones join later on a frontend).
    registry: Arc<EngineRegistry>,
    inflight: Arc<InflightRegistry>,
    http_addrs: Vec<std::net::SocketAddr>,
    cluster: ClusterStatus,
    /// Set to the root once it runs.
    link: SupervisorLink,
}

/// A kind the declaration puts later was needed earlier: the tree's order and its wiring disagree.
fn out_of_order(what: &str) -> StartError {
    StartError::Config(format!(
        "the supervision tree starts {what} after an actor that needs it"
    ))
}

/// A stop that stops an arbiter thread.
fn stop_arbiter(
    arbiter: Arbiter,
) -> impl FnOnce() -> futures_util::future::LocalBoxFuture<'static, ()> {
    move || {
        arbiter.stop();
        async {}.boxed_local()
    }
}

impl Startup {
    /// The in-process memory service, started by the bootstrap (the weights are loaded through it).
    fn memory(&mut self) -> Vec<Child> {
        let Some(gms) = self.gms.take() else {
            return Vec::new();
        };
        gms.supervise(
            &self.config.supervision,
            self.events.clone(),
            self.faults.clone(),
        );
        vec![
            Child::new(ActorKind::MemoryService, "0").stopped_by(move || {
                gms.stop();
                async {}.boxed_local()
            }),
        ]
    }

    /// The cluster side, given what it wires to: the router, engines and index the subtrees before
    /// it started.
    async fn cluster(&mut self) -> Result<Vec<Child>, StartError> {
        let Some(start) = self.cluster_start.take() else {
            return Ok(Vec::new());
        };
        let router = self
            .router
            .clone()
            .ok_or_else(|| out_of_order("the router"))?;
        let local = crate::distributed::Local {
            router,
            shared_router: self
                .shared_router
                .clone()
                .ok_or_else(|| out_of_order("the router"))?,
            engines: self.registry.clone(),
            indexer: self.indexer.clone(),
            kv_events_in: match self.config.remote_engines {
                true => self.kv_events.clone(),
                false => None,
            },
            kv_events_out: self.kv_events_out.take(),
            kv_block_size: self.block_size,
            cluster: self.cluster.clone(),
            metrics: self.metrics.clone(),
            faults: self.faults.clone(),
            request_plane: {
                let mut tracker = RestartTracker::new(ActorKind::RequestPlane, "0");
                tracker.supervise(&self.config.supervision, self.events.clone());
                std::sync::Arc::new(std::sync::Mutex::new(tracker))
            },
            supervision: Some((self.config.supervision.clone(), self.events.clone())),
        };
        start(local).await.map_err(StartError::Cluster)
    }

    fn indexer(&mut self) -> Vec<Child> {
        let (Some(index), Some(rx)) = (self.index.clone(), self.kv_events_rx.take()) else {
            return Vec::new();
        };
        let arbiter = Arbiter::new();
        let (supervision, events, faults) = (
            self.config.supervision.clone(),
            self.events.clone(),
            self.faults.clone(),
        );
        let addr = actix::Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
            KvIndexerActor::new(index, rx).supervised(&supervision, events, faults)
        });
        self.indexer = Some(addr);
        vec![Child::new(ActorKind::Indexer, "0").stopped_by(stop_arbiter(arbiter))]
    }

    fn engines(&mut self) -> Vec<Child> {
        if self.config.remote_engines {
            return Vec::new();
        }
        let config = &self.config;
        let output_tokens = mocker_vocabulary(&self.tokenizer);
        let mut children = Vec::new();
        for (index, device) in config.engine.devices.iter().enumerate() {
            let id = index as u64;
            let load = Arc::new(EngineLoad::default());
            let arbiter = Arbiter::new();
            let mocker_load = Arc::new(MockerLoad::default());
            let model_load = Arc::new(ModelLoad::default());
            let gpu_load = Arc::new(crate::engine::gpu::GpuLoad::default());
            let on_gpu = matches!(
                crate::engine::gpu::DeviceSpec::parse(device),
                Ok(crate::engine::gpu::DeviceSpec::Cuda(_))
            ) && config.engine.kind == EngineKind::Model;
            let spec = EngineSpec {
                kind: config.engine.kind,
                instance_id: id,
                echo: config.echo.clone(),
                mocker: config.mocker.clone(),
                output_tokens: output_tokens.clone(),
                kv_events: self.kv_events.clone(),
                mocker_load: mocker_load.clone(),
                model: self.weights.clone(),
                model_engine: config.model_engine.clone(),
                model_load: model_load.clone(),
                device: device.clone(),
                gpu_engine: config.gpu_engine.clone(),
                gpu_load: gpu_load.clone(),
            };
            let (capacity, device_name, actor_load) = (
                config.engine.admission_capacity,
                device.clone(),
                load.clone(),
            );
            let (progress, supervision, events, faults) = (
                self.progress.clone(),
                config.supervision.clone(),
                self.events.clone(),
                self.faults.clone(),
            );
            let addr = actix::Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
                EngineActor::new(id, device_name, spec, capacity, actor_load)
                    .with_progress(progress)
                    .supervised(&supervision, events, faults)
            });
            self.slots.push(EngineSlot {
                id,
                addr: addr.clone().recipient(),
                direct: None,
                load: load.clone(),
                capacity: config.engine.admission_capacity,
                device: device.clone(),
            });
            self.infos.push(EngineInfo {
                instance_id: id,
                engine: config.engine.kind.as_str().into(),
                device: device.clone(),
                load: load.clone(),
                mocker: (config.engine.kind == EngineKind::Mocker).then_some(mocker_load),
                model: (config.engine.kind == EngineKind::Model && !on_gpu).then_some(model_load),
                gpu: on_gpu.then_some(gpu_load),
                transport: "in-process".into(),
                request_plane: None,
                endpoint_id: ["dynamix".into(), "backend".into(), "generate".into()],
                remote: None,
            });
            let (resync, queued) = (addr.clone(), load.clone());
            children.push(
                Child::new(ActorKind::Engine, id.to_string())
                    .stopped_by(move || {
                        load.retired
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        arbiter.stop();
                        async {}.boxed_local()
                    })
                    .resynced_by(move || resync.do_send(ResyncKv))
                    .mailbox(move || queued.active()),
            );
        }
        self.registry = Arc::new(EngineRegistry::new(std::mem::take(&mut self.infos)));
        children
    }

    fn router(&mut self) -> Result<Vec<Child>, StartError> {
        let kv_context = self.index.clone().map(|index| KvContext {
            block_size: self.block_size,
            index,
            metrics: Some(self.metrics.clone()),
        });
        let slots = std::mem::take(&mut self.slots);
        let actor = KvRouterActor::new(&self.config.router, slots, kv_context)
            .map_err(|e| StartError::Config(e.message))?
            .supervised(
                &self.config.supervision,
                self.events.clone(),
                self.faults.clone(),
            );
        self.shared_router = Some(actor.router());
        let actor_router = actor.router();
        let router = actix::Supervisor::start(move |_| actor);
        if self.config.router.mode == RouterMode::Kv {
            let _ = self.progress.set(actor_router);
        }
        self.router = Some(router);
        // Stops when the last address goes (the serving path holds them).
        Ok(vec![Child::new(ActorKind::Router, "0")])
    }

    fn validators(&mut self) -> Vec<Child> {
        let config = &self.config;
        let validator = Arc::new(
            Validator::new(
                config.validator.clone(),
                config.model_name.clone(),
                self.tokenizer.clone(),
                self.metrics.clone(),
            )
            .with_faults(self.faults.clone()),
        );
        // One restart intensity for all validator threads and inline validations: a re-created
        // validator keeps counting.
        let supervision =
            ValidatorSupervision::new(shared_budget(&config.supervision), self.events.clone());
        let threads = config.validator.threads.max(1);
        let (shared, watched) = (validator.clone(), supervision.clone());
        let actors = SyncArbiter::start(threads, move || {
            ValidatorActor::new(shared.clone(), watched.clone())
        });
        self.validator = Some(ValidatorPool::new(validator, actors, supervision));
        // One child for the pool: its SyncArbiter re-creates a stopped validator on its own.
        vec![Child::new(ActorKind::Validator, POOL)]
    }

    fn embeddings(&mut self) -> Result<Vec<Child>, StartError> {
        // Only the HTTP server serves embeddings: terminal and batch runs do not load the model.
        if !(self.config.embeddings.enabled && self.config.serve_http) {
            return Ok(Vec::new());
        }
        let running = crate::embeddings::start(
            &self.config.embeddings,
            self.config.validator.ignore_unsupported_fields,
            &self.config.supervision,
            self.events.clone(),
            self.faults.clone(),
        )?;
        self.embeddings = Some(running.service);
        Ok(vec![
            Child::new(ActorKind::Embeddings, "0").stopped_by(stop_arbiter(running.arbiter))
        ])
    }

    fn gateway(&self) -> Result<Gateway, StartError> {
        let router = self
            .router
            .clone()
            .ok_or_else(|| out_of_order("the router"))?;
        Ok(Gateway {
            validator: self
                .validator
                .clone()
                .ok_or_else(|| out_of_order("the validators"))?,
            router,
            tokenizer: self.tokenizer.clone(),
            stream_buffer: self.config.engine.stream_buffer,
            migrator: Arc::new(Migrator {
                config: self.config.migration.clone(),
                router: self
                    .shared_router
                    .clone()
                    .ok_or_else(|| out_of_order("the router"))?,
                metrics: Some(self.metrics.clone()),
                model: self.config.model_name.clone(),
                inflight: self.inflight.clone(),
                stream_buffer: self.config.engine.stream_buffer,
                events: Some(self.events.clone()),
            }),
        })
    }

    fn http(&mut self) -> Result<Vec<Child>, StartError> {
        if !self.config.serve_http {
            return Ok(Vec::new());
        }
        let config = &self.config;
        let lifecycle = Arc::new(Lifecycle::default());
        let state = Arc::new(AppState {
            gateway: self.gateway()?,
            metrics: self.metrics.clone(),
            config: config.http.clone(),
            model: ModelCard {
                name: config.model_name.clone(),
                context_length: self.tokenizer.context_length(),
                aliases: config.validator.model_aliases.clone(),
            },
            lifecycle: lifecycle.clone(),
            engines: self.registry.clone(),
            faults: self.faults.clone(),
            inflight: self.inflight.clone(),
            embeddings: self.embeddings.clone(),
            cluster: self.cluster.clone(),
            supervision: std::sync::Mutex::new({
                let mut tracker = RestartTracker::new(ActorKind::Http, "0");
                tracker.supervise(&config.supervision, self.events.clone());
                tracker
            }),
            supervisor: self.link.clone(),
        });
        let (server, addrs) = http::bind(state)?;
        self.http_addrs = addrs;
        let handle = server.handle();
        let (events, watching) = (self.events.clone(), lifecycle.clone());
        actix_rt::spawn(async move {
            let ended = server.await;
            // The server only ends on its own when it failed: the process cannot serve without it.
            if !watching.is_draining() {
                let last_error = match ended {
                    Err(e) => e.to_string(),
                    Ok(()) => "the HTTP server stopped without a drain".into(),
                };
                let _ = events.send(SupervisorEvent::Escalated(crate::supervision::Escalation {
                    actor: ActorKind::Http,
                    instance: "0".into(),
                    failures: 1,
                    last_error,
                    subtree: None,
                }));
            }
        });
        let timeout = Duration::from_secs(config.http.graceful_shutdown_timeout_secs);
        let actor = HttpActor::new(handle, lifecycle, timeout).start();
        Ok(vec![Child::new(ActorKind::Http, "0").stopped_by(
            move || {
                async move {
                    let _ = actor.send(http::Drain).await;
                }
                .boxed_local()
            },
        )])
    }
}

/// Start the tree. Must run inside an actix System.
/// `weights` must be given when the engine kind is `model` (loaded once, shared by every engine); `gms`
/// is an in-process memory service the tree takes ownership of (its first child).
pub async fn start(
    config: ServiceConfig,
    tokenizer: Arc<ModelTokenizer>,
    weights: Option<Arc<LlamaModel>>,
    gms: Option<crate::gms::InProcessGms>,
) -> Result<RunningService, StartError> {
    start_tree(config, tokenizer, weights, gms, None, None).await
}

/// [`start`] with the cluster side of a frontend or worker as the tree's `cluster` subtree.
pub async fn start_with_cluster(
    config: ServiceConfig,
    tokenizer: Arc<ModelTokenizer>,
    weights: Option<Arc<LlamaModel>>,
    gms: Option<crate::gms::InProcessGms>,
    cluster: ClusterStart,
) -> Result<RunningService, StartError> {
    start_tree(config, tokenizer, weights, gms, None, Some(cluster)).await
}

/// How a frontend's lanes start their trees: `template` (the frontend's own settings) changed as
/// each lane's spec says, with requests counted in the frontend's `metrics`.
pub fn lane_starter(
    template: ServiceConfig,
    metrics: Arc<FrontendMetrics>,
) -> crate::distributed::lanes::StartLane {
    Arc::new(move |spec: crate::distributed::lanes::LaneSpec| {
        let mut config = template.clone();
        config.model_name = spec.name;
        config.serve_http = false;
        config.remote_engines = true;
        config.export_kv_events = false;
        config.validator.model_aliases = spec.aliases;
        if let Some(mode) = spec.router_mode {
            config.router.mode = mode;
        }
        if let Some(block) = spec.block_size {
            config.router.kv_cache_block_size = Some(block);
            config.mocker.block_size = block;
            config.gpu_engine.block_size = block;
        }
        let metrics = metrics.clone();
        async move {
            let mut service = start_lane(config, spec.tokenizer, metrics).await?;
            Ok(crate::distributed::lanes::LaneTree {
                local: service.local(),
                gateway: service.gateway.clone(),
                engines: service.engines.clone(),
                escalated: service.escalated().boxed_local(),
                stop: Box::new(move || service.shutdown().boxed_local()),
            })
        }
        .boxed_local()
    })
}

/// The tree of one more model of a frontend of workers (`config.remote_engines`, no HTTP): its
/// requests are counted in the frontend's own `metrics`.
pub async fn start_lane(
    config: ServiceConfig,
    tokenizer: Arc<ModelTokenizer>,
    metrics: Arc<FrontendMetrics>,
) -> Result<RunningService, StartError> {
    if config.serve_http || !config.remote_engines {
        return Err(StartError::Config(
            "a model lane routes to remote engines and serves no HTTP of its own".into(),
        ));
    }
    start_tree(config, tokenizer, None, None, Some(metrics), None).await
}

async fn start_tree(
    config: ServiceConfig,
    tokenizer: Arc<ModelTokenizer>,
    weights: Option<Arc<LlamaModel>>,
    gms: Option<crate::gms::InProcessGms>,
    shared_metrics: Option<Arc<FrontendMetrics>>,
    cluster_start: Option<ClusterStart>,
) -> Result<RunningService, StartError> {
    let mut config = config;
    config.engine.devices = resolve_devices(&config)?;
    let block_size = check(&config, weights.is_some())?;
    let metrics = metrics(&config, &tokenizer, block_size, shared_metrics)?;
    let kv_mode = config.router.mode == RouterMode::Kv;
    // KV events flow engine → indexer only when the kv router consumes them; a worker exports them.
    let index = kv_mode.then(SharedKvIndex::default);
    let (mut kv_events, mut kv_events_rx, mut kv_events_out) = (None, None, None);
    // (`kv_events_out` goes to the cluster side through `Startup`.)
    if config.export_kv_events {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        kv_events = Some(tx);
        kv_events_out = Some(rx);
    } else if kv_mode && config.router.use_kv_events {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        kv_events = Some(tx);
        kv_events_rx = Some(rx);
    }
    let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let faults = FaultInjector::new(config.faults.clone());
    let mut startup = Startup {
        tokenizer,
        weights,
        gms,
        metrics: metrics.clone(),
        faults: faults.clone(),
        events,
        block_size,
        index,
        kv_events,
        kv_events_rx,
        kv_events_out,
        cluster_start,
        indexer: None,
        progress: ProgressSink::default(),
        slots: Vec::new(),
        infos: Vec::new(),
        router: None,
        shared_router: None,
        validator: None,
        embeddings: None,
        registry: Arc::new(EngineRegistry::new(Vec::new())),
        inflight: Arc::new(InflightRegistry::default()),
        http_addrs: Vec::new(),
        cluster: ClusterStatus::default(),
        link: SupervisorLink::default(),
        config,
    };
    let mut tree = Tree::new(&startup.config.supervision);
    for kind in start_order() {
        let started = match kind {
            ActorKind::MemoryService => Ok(startup.memory()),
            ActorKind::Indexer => Ok(startup.indexer()),
            ActorKind::Engine => Ok(startup.engines()),
            ActorKind::Router => startup.router(),
            ActorKind::Validator => Ok(startup.validators()),
            ActorKind::Embeddings => startup.embeddings(),
            ActorKind::Http => startup.http(),
            // The cluster side starts as one unit (its parts wire to each other: the publishers
            // follow the registration's lease) and hands back its three children, in this order.
            ActorKind::Events => startup.cluster().await,
            ActorKind::RequestPlane | ActorKind::Discovery => Ok(Vec::new()),
        };
        match started {
            Ok(children) => children.into_iter().for_each(|child| tree.add(child)),
            Err(e) => {
                tree.stop().await;
                return Err(e);
            }
        }
    }
    let gateway = match startup.gateway() {
        Ok(gateway) => gateway,
        Err(e) => {
            tree.stop().await;
            return Err(e);
        }
    };
    // A frontend keeps one sender for events from workers; otherwise the channel closes with the
    // last engine.
    let kv_events_in = match startup.config.remote_engines {
        true => startup.kv_events.take(),
        false => None,
    };
    let (escalated_tx, escalated_rx) = tokio::sync::watch::channel(None);
    let supervisor = Supervisor {
        tree,
        router: gateway.router.clone(),
        indexer: startup.indexer.clone(),
        metrics: metrics.clone(),
        inflight: startup.inflight.clone(),
        faults: faults.clone(),
        events: Some(events_rx),
        escalated: escalated_tx,
        link: startup.link.clone(),
    }
    .start();
    startup.link.set(supervisor.clone().recipient());
    Ok(RunningService {
        supervisor,
        http_addrs: startup.http_addrs,
        gateway,
        metrics,
        engines: startup.registry,
        inflight: startup.inflight,
        faults,
        kv_events_in,
        indexer: startup.indexer,
        kv_events_out: startup.kv_events_out.take(),
        cluster: startup.cluster,
        kv_block_size: block_size,
        escalated: escalated_rx,
    })
}
