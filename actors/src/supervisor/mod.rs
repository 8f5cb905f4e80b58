//! The root [`Supervisor`]: starts the actor tree in dependency order (engines on their own Arbiter
//! threads → router → validator threads → HTTP server) and owns it; on [`Shutdown`] it drains the HTTP
//! side, then stops the engines' threads.
//!
//! Supervision (one-for-one): each engine and the router run under an actix `Supervisor` and restart
//! after a caught panic, rebuilding their state; validators are re-created by their SyncArbiter. Each
//! reports restarts here ([`SupervisorEvent`], through its [`crate::supervision::RestartTracker`]),
//! where they are counted; an engine past its restart budget is taken out of routing and reported
//! unhealthy. The in-flight registry ([`crate::gateway::inflight`]) says which engine serves each
//! request; request migration itself happens in the serving path ([`crate::gateway::migration`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use crate::engine::{
    EchoConfig, EngineActor, EngineConfig, EngineKind, EngineLoad, EngineSpec, LlamaModel,
    MockerConfig, MockerLoad, ModelEngineConfig, ModelLoad, ProgressSink,
};
use crate::faults::{FaultInjector, FaultsConfig};
use crate::gateway::inflight::InflightRegistry;
use crate::gateway::migration::{MigrationConfig, Migrator};
use crate::gateway::Gateway;
use crate::http::{
    self, AppState, ClusterStatus, EngineInfo, EngineRegistry, HttpActor, HttpConfig, Lifecycle,
    ModelCard,
};
use crate::kv::indexer::SharedKvIndex;
use crate::kv::protocol::RouterEvent;
use crate::metrics::{FrontendMetrics, ModelGauges};
use crate::router::indexer::{KvIndexerActor, RemoveWorker};
use crate::router::policy::KvContext;
use crate::router::{EngineRemoved, EngineSlot, KvRouterActor, RouterConfig, RouterMode};
use crate::supervision::{
    shared_budget, ActorKind, Escalation, SupervisionConfig, SupervisorEvent,
};
use crate::tokenizer::ModelTokenizer;
use crate::validator::{ValidatorActor, ValidatorConfig};

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Metric name prefix (`--metrics-prefix`, `DYN_METRICS_PREFIX`).
    pub prefix: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            prefix: crate::metrics::DEFAULT_PREFIX.into(),
        }
    }
}

/// Everything the actor tree needs to start.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Served model name.
    pub model_name: String,
    /// HTTP.
    pub http: HttpConfig,
    /// Router.
    pub router: RouterConfig,
    /// Engines.
    pub engine: EngineConfig,
    /// Echo engines.
    pub echo: EchoConfig,
    /// Mocker engines.
    pub mocker: MockerConfig,
    /// Model engines.
    pub model_engine: ModelEngineConfig,
    /// Validator.
    pub validator: ValidatorConfig,
    /// Metrics.
    pub metrics: MetricsConfig,
    /// Request migration.
    pub migration: MigrationConfig,
    /// Restart budgets.
    pub supervision: SupervisionConfig,
    /// Fault injection.
    pub faults: FaultsConfig,
    /// The embedding model (`/v1/embeddings`); started only with the HTTP server.
    pub embeddings: crate::embeddings::EmbeddingsConfig,
    /// Whether to start the HTTP server (false for terminal chat and batch runs).
    pub serve_http: bool,
    /// A frontend of worker processes: no local engines; engines join and leave as workers register
    /// (`EngineAdded` / `EngineRemoved` to the router) and KV events arrive from outside
    /// ([`RunningService::kv_events_in`]).
    pub remote_engines: bool,
    /// A worker process: hand the engines' KV events to [`RunningService::kv_events_out`] (for
    /// publishing) instead of a local index.
    pub export_kv_events: bool,
}

/// Why the tree could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting the actors reject.
    #[error("{0}")]
    Config(String),
    /// The HTTP listener could not bind.
    #[error("{0}")]
    Bind(#[from] std::io::Error),
    /// Metrics registry setup failed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The embedding model could not be loaded.
    #[error("embeddings: {0}")]
    Embeddings(#[from] crate::embeddings::LoadError),
}

/// Drain and stop everything. Replies when the tree has stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Take an engine out of service: the router stops sending it work and forgets its KV blocks and
/// load, then its thread stops (requests still running on it end early).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct RemoveEngine {
    /// Its instance id.
    pub engine_id: u64,
}

/// One running engine and the thread it is pinned to.
struct EngineChild {
    id: u64,
    arbiter: Arbiter,
    load: Arc<EngineLoad>,
}

/// Owns the actor tree.
pub struct Supervisor {
    http: Option<Addr<HttpActor>>,
    engines: Vec<EngineChild>,
    validator: Addr<ValidatorActor>,
    router: Addr<KvRouterActor>,
    indexer: Option<(Addr<KvIndexerActor>, Arbiter)>,
    /// The embedding engine's thread.
    embeddings: Option<Arbiter>,
    /// The in-process GPU memory service (`model_engine.gms_serve`).
    gms: Option<crate::gms::InProcessGms>,
    metrics: Arc<FrontendMetrics>,
    inflight: Arc<InflightRegistry>,
    faults: Arc<FaultInjector>,
    events: Option<tokio::sync::mpsc::UnboundedReceiver<SupervisorEvent>>,
    /// The first failure that escalated to the root: the process must stop (see
    /// [`RunningService::escalated`]).
    escalated: tokio::sync::watch::Sender<Option<Escalation>>,
}

impl Supervisor {
    /// Stops routing to engine `engine_id` and stops its thread; false if it is not running.
    fn remove_engine(&mut self, engine_id: u64) -> ResponseActFuture<Self, bool> {
        let Some(position) = self.engines.iter().position(|e| e.id == engine_id) else {
            return Box::pin(actix::fut::ready(false));
        };
        let child = self.engines.remove(position);
        child
            .load
            .retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let router = self.router.clone();
        let indexer = self.indexer.as_ref().map(|(addr, _)| addr.clone());
        Box::pin(
            async move {
                let _ = router
                    .send(EngineRemoved {
                        engine_id: child.id,
                    })
                    .await;
                if let Some(indexer) = indexer {
                    let _ = indexer.send(RemoveWorker(child.id)).await;
                }
                child.arbiter.stop();
                tracing::info!(engine = child.id, "engine removed");
                true
            }
            .into_actor(self),
        )
    }
}

impl Handler<RemoveEngine> for Supervisor {
    type Result = ResponseActFuture<Self, bool>;

    fn handle(&mut self, msg: RemoveEngine, _ctx: &mut Self::Context) -> Self::Result {
        self.remove_engine(msg.engine_id)
    }
}

impl StreamHandler<SupervisorEvent> for Supervisor {
    fn handle(&mut self, event: SupervisorEvent, ctx: &mut Self::Context) {
        match event {
            SupervisorEvent::Restarted {
                actor,
                instance,
                reason,
            } => {
                self.metrics.actor_restarted(actor.as_str(), &instance);
                if actor == ActorKind::Engine {
                    let migrating = instance
                        .parse()
                        .map(|id| self.inflight.on_engine(id).len())
                        .unwrap_or(0);
                    tracing::warn!(engine = %instance, %reason, migrating, "engine restarted; its in-flight requests migrate");
                } else {
                    tracing::warn!(%actor, %instance, %reason, "actor restarted");
                }
            }
            SupervisorEvent::Escalated(escalation) => {
                self.metrics
                    .actor_restarted(escalation.actor.as_str(), &escalation.instance);
                tracing::error!(%escalation, "a failure escalated to the root supervisor; stopping");
                // The first escalation is the one the process exits with.
                self.escalated.send_if_modified(|current| {
                    let first = current.is_none();
                    if first {
                        *current = Some(escalation);
                    }
                    first
                });
            }
            SupervisorEvent::EngineFailed { engine_id, reason } => {
                tracing::error!(engine = engine_id, %reason, "engine given up on; removing it from routing");
                self.metrics
                    .actor_restarted(ActorKind::Engine.as_str(), &engine_id.to_string());
                ctx.spawn(self.remove_engine(engine_id).map(|_, _, _| ()));
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {
        // Every sender is gone (shutdown): nothing more to supervise, but keep running until Shutdown.
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(mut events) = self.events.take() {
            ctx.add_stream(futures_util::stream::poll_fn(move |cx| {
                events.poll_recv(cx)
            }));
        }
        let every = self.faults.config().every_ms;
        if self.faults.config().enabled && every > 0 {
            ctx.run_interval(Duration::from_millis(every), |act, _| {
                act.faults.arm_random()
            });
        }
    }
}

impl Handler<Shutdown> for Supervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _msg: Shutdown, _ctx: &mut Self::Context) -> Self::Result {
        let http = self.http.take();
        Box::pin(
            async move {
                if let Some(http) = http {
                    let _ = http.send(http::Drain).await;
                }
            }
            .into_actor(self)
            .map(|_, act, ctx| {
                for child in act.engines.drain(..) {
                    child.arbiter.stop();
                }
                if let Some((_, arbiter)) = act.indexer.take() {
                    arbiter.stop();
                }
                if let Some(arbiter) = act.embeddings.take() {
                    arbiter.stop();
                }
                if let Some(gms) = act.gms.take() {
                    gms.stop();
                }
                tracing::debug!(
                    router = act.router.connected(),
                    validator = act.validator.connected(),
                    "actor tree stopped"
                );
                ctx.stop();
            }),
        )
    }
}

/// A started tree: where it listens and how to reach and stop it.
pub struct RunningService {
    /// The root supervisor.
    pub supervisor: Addr<Supervisor>,
    /// Bound HTTP addresses (empty when HTTP is off).
    pub http_addrs: Vec<SocketAddr>,
    /// The serving path, for in-process front ends.
    pub gateway: Gateway,
    /// Metrics registry.
    pub metrics: Arc<FrontendMetrics>,
    /// Engines and their live load.
    pub engines: Arc<EngineRegistry>,
    /// Frontend of workers: where KV events received from workers go (the index's writer).
    pub kv_events_in: Option<tokio::sync::mpsc::UnboundedSender<RouterEvent>>,
    /// The index's writer, to purge an engine that left.
    pub indexer: Option<Addr<KvIndexerActor>>,
    /// Worker: the local engines' KV events, to publish.
    pub kv_events_out: Option<tokio::sync::mpsc::UnboundedReceiver<RouterEvent>>,
    /// Frontend of workers: the `/health` reporter of discovery and events, set once they run.
    pub cluster: ClusterStatus,
    /// KV block size the engines use (the mocker's, or `router.kv_cache_block_size`, default 64).
    pub kv_block_size: usize,
    /// Requests in flight, per engine.
    pub inflight: Arc<InflightRegistry>,
    /// The fault injector (inert unless `faults.enabled`).
    pub faults: Arc<FaultInjector>,
    /// Set when a failure escalated to the root.
    escalated: tokio::sync::watch::Receiver<Option<Escalation>>,
}

impl RunningService {
    /// Resolves with the first failure that escalated to the root (an actor past its restart
    /// intensity); the caller stops the process with a non-zero exit naming it. Pending forever
    /// while the tree is healthy.
    pub fn escalated(&self) -> impl std::future::Future<Output = Escalation> + 'static {
        let mut escalated = self.escalated.clone();
        async move {
            loop {
                if let Some(escalation) = escalated.borrow_and_update().clone() {
                    return escalation;
                }
                if escalated.changed().await.is_err() {
                    // The root is gone without escalating: nothing will ever escalate.
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Drain and stop the tree.
    pub async fn shutdown(self) {
        let _ = self.supervisor.send(Shutdown).await;
    }

    /// Take engine `engine_id` out of service (see [`RemoveEngine`]); false if there is none.
    pub async fn remove_engine(&self, engine_id: u64) -> bool {
        self.supervisor
            .send(RemoveEngine { engine_id })
            .await
            .unwrap_or(false)
    }
}

/// Words the mocker draws its output from, so that simulated responses are real text.
const MOCKER_TEXT: &str = "The model is simulated, but the words are real: it reads the request, \
    weighs the cached prefix against the work still queued, and answers with a steady stream of \
    plain English tokens until the requested length is reached. Routing, batching, prefill and \
    decode all take the time a real accelerator would need for the same shapes of work.";

/// The mocker's output vocabulary: the ordinary tokens of [`MOCKER_TEXT`].
fn mocker_vocabulary(tokenizer: &ModelTokenizer) -> Arc<[u32]> {
    let mut ids: Vec<u32> = tokenizer
        .encode(MOCKER_TEXT)
        .unwrap_or_default()
        .into_iter()
        .filter(|&id| !tokenizer.is_special(id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        // A tokenizer that cannot encode plain English still has ids; any non-special one will do.
        ids = (0..tokenizer.vocab_size() as u32)
            .filter(|&id| !tokenizer.is_special(id))
            .take(64)
            .collect();
    }
    ids.into()
}

/// Start the tree. Must run inside an actix System.
/// `weights` must be given when the engine kind is `model` (loaded once, shared by every engine); `gms`
/// is an in-process memory service the tree takes ownership of (stopped at shutdown).
pub async fn start(
    config: ServiceConfig,
    tokenizer: Arc<ModelTokenizer>,
    weights: Option<Arc<LlamaModel>>,
    gms: Option<crate::gms::InProcessGms>,
) -> Result<RunningService, StartError> {
    if config.engine.devices.is_empty() && !config.remote_engines {
        return Err(StartError::Config(
            "engine.devices must list at least one device".into(),
        ));
    }
    if config.engine.kind == EngineKind::Model && !config.remote_engines {
        if weights.is_none() {
            return Err(StartError::Config(
                "engine.kind = \"model\" needs the model's weights loaded".into(),
            ));
        }
        config.model_engine.validate().map_err(StartError::Config)?;
    }
    let env = |key: &str| std::env::var(key).ok();
    let metrics = Arc::new(
        FrontendMetrics::new(&config.metrics.prefix, &env)
            .map_err(|e| StartError::Metrics(e.to_string()))?,
    );
    metrics.set_model_gauges(
        &config.model_name,
        &ModelGauges {
            context_length: Some(u64::from(tokenizer.context_length())),
            ..ModelGauges::default()
        },
    );

    let kv_mode = config.router.mode == RouterMode::Kv;
    let block_size = match config.engine.kind {
        EngineKind::Mocker => config.mocker.block_size,
        _ => config.router.kv_cache_block_size.unwrap_or(64),
    };
    if let Some(size) = config.router.kv_cache_block_size {
        if size != block_size {
            return Err(StartError::Config(format!(
                "router.kv_cache_block_size = {size} does not match the engines' KV block size of {block_size} tokens"
            )));
        }
    }
    if config.engine.kind == EngineKind::Mocker {
        metrics.set_model_gauges(
            &config.model_name,
            &ModelGauges {
                kv_cache_block_size: Some(block_size as u64),
                total_kv_blocks: Some(
                    (config.mocker.num_gpu_blocks * config.engine.devices.len()) as u64,
                ),
                max_num_seqs: Some(config.mocker.max_num_seqs as u64),
                max_num_batched_tokens: Some(config.mocker.max_num_batched_tokens as u64),
                ..ModelGauges::default()
            },
        );
    }
    // KV events flow engine → indexer only when the kv router consumes them.
    let index = kv_mode.then(SharedKvIndex::default);
    let mut kv_events_out = None;
    let (kv_events, indexer) = match (&index, kv_mode && config.router.use_kv_events) {
        _ if config.export_kv_events => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            kv_events_out = Some(rx);
            (Some(tx), None)
        }
        (Some(index), true) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let arbiter = Arbiter::new();
            let index = index.clone();
            let addr = KvIndexerActor::start_in_arbiter(&arbiter.handle(), move |_| {
                KvIndexerActor::new(index, rx)
            });
            (Some(tx), Some((addr, arbiter)))
        }
        _ => (None, None),
    };
    // Engines report request progress to the router, which starts after them.
    let progress = ProgressSink::default();
    let (events, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let faults = FaultInjector::new(config.faults.clone());
    let output_tokens = mocker_vocabulary(&tokenizer);

    let mut slots = Vec::new();
    let mut infos = Vec::new();
    let mut children = Vec::new();
    let local_devices: &[String] = match config.remote_engines {
        true => &[],
        false => &config.engine.devices,
    };
    for (index, device) in local_devices.iter().enumerate() {
        let id = index as u64;
        let load = Arc::new(EngineLoad::default());
        let arbiter = Arbiter::new();
        let mocker_load = Arc::new(MockerLoad::default());
        let model_load = Arc::new(ModelLoad::default());
        let spec = EngineSpec {
            kind: config.engine.kind,
            instance_id: id,
            echo: config.echo.clone(),
            mocker: config.mocker.clone(),
            output_tokens: output_tokens.clone(),
            kv_events: kv_events.clone(),
            mocker_load: mocker_load.clone(),
            model: weights.clone(),
            model_engine: config.model_engine.clone(),
            model_load: model_load.clone(),
        };
        let (capacity, device_name, actor_load) = (
            config.engine.admission_capacity,
            device.clone(),
            load.clone(),
        );
        let (progress, supervision, events, faults) = (
            progress.clone(),
            config.supervision.clone(),
            events.clone(),
            faults.clone(),
        );
        let addr = actix::Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
            EngineActor::new(id, device_name, spec, capacity, actor_load)
                .with_progress(progress)
                .supervised(&supervision, events, faults)
        });
        slots.push(EngineSlot {
            id,
            addr: addr.recipient(),
            load: load.clone(),
            capacity: config.engine.admission_capacity,
            device: device.clone(),
        });
        infos.push(EngineInfo {
            instance_id: id,
            engine: config.engine.kind.as_str().into(),
            device: device.clone(),
            load: load.clone(),
            mocker: (config.engine.kind == EngineKind::Mocker).then_some(mocker_load),
            model: (config.engine.kind == EngineKind::Model).then_some(model_load),
            transport: "in-process".into(),
            endpoint_id: ["dynamix".into(), "backend".into(), "generate".into()],
            remote: None,
        });
        children.push(EngineChild {
            id,
            arbiter,
            load: load.clone(),
        });
    }
    // A frontend keeps one sender for events from workers; otherwise the channel closes with the
    // last engine.
    let kv_events_in = match config.remote_engines {
        true => kv_events,
        false => None,
    };
    let engines = Arc::new(EngineRegistry::new(infos));
    let cluster = ClusterStatus::default();

    let kv_context = index.map(|index| KvContext {
        block_size,
        index,
        metrics: Some(metrics.clone()),
    });
    let router_actor = match KvRouterActor::new(&config.router, slots, kv_context) {
        Ok(actor) => actor,
        Err(e) => {
            for child in children {
                child.arbiter.stop();
            }
            if let Some((_, arbiter)) = indexer {
                arbiter.stop();
            }
            return Err(StartError::Config(e.message));
        }
    };
    let router_actor = router_actor.supervised(&config.supervision, events.clone(), faults.clone());
    let router = actix::Supervisor::start(move |_| router_actor);
    if kv_mode {
        let _ = progress.set(router.clone().recipient());
    }
    let validator = {
        let (cfg, model, tok, m, ev, f) = (
            config.validator.clone(),
            config.model_name.clone(),
            tokenizer.clone(),
            metrics.clone(),
            events.clone(),
            faults.clone(),
        );
        // One restart intensity for all validator threads: a re-created validator keeps counting.
        let budget = shared_budget(&config.supervision);
        SyncArbiter::start(config.validator.threads.max(1), move || {
            ValidatorActor::new(cfg.clone(), model.clone(), tok.clone(), m.clone()).supervised(
                budget.clone(),
                ev.clone(),
                f.clone(),
            )
        })
    };
    // Only the HTTP server serves embeddings: terminal and batch runs do not load the model.
    let embeddings = if config.embeddings.enabled && config.serve_http {
        match crate::embeddings::start(
            &config.embeddings,
            config.validator.ignore_unsupported_fields,
            &config.supervision,
            events.clone(),
            faults.clone(),
        ) {
            Ok(running) => Some(running),
            Err(e) => {
                for child in children {
                    child.arbiter.stop();
                }
                if let Some((_, arbiter)) = indexer {
                    arbiter.stop();
                }
                return Err(e.into());
            }
        }
    } else {
        None
    };
    drop(events);
    let inflight = Arc::new(InflightRegistry::default());
    let gateway = Gateway {
        validator: validator.clone(),
        router: router.clone(),
        tokenizer: tokenizer.clone(),
        stream_buffer: config.engine.stream_buffer,
        migrator: Arc::new(Migrator {
            config: config.migration.clone(),
            router: router.clone(),
            metrics: Some(metrics.clone()),
            model: config.model_name.clone(),
            inflight: inflight.clone(),
            stream_buffer: config.engine.stream_buffer,
        }),
    };

    let (http, http_addrs) = if config.serve_http {
        let lifecycle = Arc::new(Lifecycle::default());
        let state = Arc::new(AppState {
            gateway: gateway.clone(),
            metrics: metrics.clone(),
            config: config.http.clone(),
            model: ModelCard {
                name: config.model_name.clone(),
                context_length: tokenizer.context_length(),
            },
            lifecycle: lifecycle.clone(),
            engines: engines.clone(),
            faults: faults.clone(),
            inflight: inflight.clone(),
            embeddings: embeddings.as_ref().map(|e| e.service.clone()),
            cluster: cluster.clone(),
        });
        let (server, addrs) = match http::bind(state) {
            Ok(bound) => bound,
            Err(e) => {
                for child in children {
                    child.arbiter.stop();
                }
                if let Some((_, arbiter)) = indexer {
                    arbiter.stop();
                }
                if let Some(running) = embeddings {
                    running.arbiter.stop();
                }
                return Err(e.into());
            }
        };
        let handle = server.handle();
        actix_rt::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        let timeout = Duration::from_secs(config.http.graceful_shutdown_timeout_secs);
        (
            Some(HttpActor::new(handle, lifecycle, timeout).start()),
            addrs,
        )
    } else {
        (None, Vec::new())
    };

    let indexer_addr = indexer.as_ref().map(|(addr, _)| addr.clone());
    let (escalated_tx, escalated_rx) = tokio::sync::watch::channel(None);
    let supervisor = Supervisor {
        http,
        engines: children,
        validator,
        router,
        indexer,
        embeddings: embeddings.map(|e| e.arbiter),
        gms,
        metrics: metrics.clone(),
        inflight: inflight.clone(),
        faults: faults.clone(),
        events: Some(events_rx),
        escalated: escalated_tx,
    }
    .start();
    Ok(RunningService {
        supervisor,
        http_addrs,
        gateway,
        metrics,
        engines,
        inflight,
        faults,
        kv_events_in,
        indexer: indexer_addr,
        kv_events_out,
        cluster,
        kv_block_size: block_size,
        escalated: escalated_rx,
    })
}
