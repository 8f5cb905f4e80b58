//! The root [`Supervisor`] and the wiring of the tree that [`crate::supervision::tree`] declares.
//!
//! [`start`] starts the children in the declared order (memory service → indexer → engines on their
//! own Arbiter threads → router → validator threads → embeddings → HTTP server); the root owns them
//! and, on [`Shutdown`], stops them in reverse (HTTP drains first, the engines' threads stop last).
//!
//! Each supervised actor restarts itself in place after a caught panic (engines, router, indexer,
//! embeddings under an actix `Supervisor`; validators re-created by their SyncArbiter; an HTTP
//! handler's panic fails only its request) and reports here ([`SupervisorEvent`], through its
//! [`crate::supervision::RestartTracker`]). The root applies the subtree's strategy (a restarted
//! indexer has the engines send their blocks again), counts the restart against each subtree's
//! intensity, takes an engine past its budget out of routing, and stops the process when a failure
//! escalates. The in-flight registry ([`crate::gateway::inflight`]) says which engine serves each
//! request; request migration itself happens in the serving path ([`crate::gateway::migration`]).

mod preflight;
mod start;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use crate::engine::registry::EngineRegistry;
use crate::engine::{EchoConfig, EngineConfig, MockerConfig, ModelEngineConfig};
use crate::faults::{FaultInjector, FaultsConfig};
use crate::gateway::inflight::InflightRegistry;
use crate::gateway::migration::MigrationConfig;
use crate::gateway::Gateway;
use crate::http::{ClusterStatus, HttpConfig};
use crate::kv::protocol::RouterEvent;
use crate::metrics::FrontendMetrics;
use crate::metrics::{HistogramConfig, HistogramKind};
use crate::router::indexer::{KvIndexerActor, RemoveWorker};
use crate::router::{EngineRemoved, KvRouterActor, RouterConfig};
use crate::supervision::tree::{Outcome, Snapshot, StopFn, SupervisorLink, Tree, TreeSnapshot};
use crate::supervision::{ActorKind, Escalation, SupervisionConfig, SupervisorEvent};
use crate::validator::ValidatorConfig;

pub use start::{lane_starter, start, start_lane, start_with_cluster};

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Metric name prefix (`--metrics-prefix`, `DYN_METRICS_PREFIX`).
    pub prefix: String,
    /// Histogram buckets, from Dynamo's `DYN_METRICS_<X>_{MIN,MAX,COUNT}` (resolved by the config
    /// loader with upstream's lenient rules: a bad value falls back to its default, with a warning).
    #[serde(skip)]
    pub histograms: std::collections::HashMap<HistogramKind, HistogramConfig>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            prefix: crate::metrics::DEFAULT_PREFIX.into(),
            histograms: HistogramConfig::all_defaults(),
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
    /// The model engine on GPUs.
    pub gpu_engine: crate::engine::gpu::GpuEngineConfig,
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
    /// A section's setting out of its range.
    #[error("{0}")]
    Setting(#[from] crate::setting::InvalidSetting),
    /// The HTTP listener could not bind.
    #[error("{0}")]
    Bind(#[from] std::io::Error),
    /// Metrics registry setup failed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The embedding model could not be loaded.
    #[error("embeddings: {0}")]
    Embeddings(#[from] crate::embeddings::LoadError),
    /// The cluster side (discovery, events, request plane) could not start.
    #[error("{0}")]
    Cluster(Box<dyn std::error::Error + Send + Sync>),
}

/// Starts the cluster side of a frontend or worker as the tree's `cluster` subtree, once the serving
/// path runs: it gets what it wires to and returns its children, which stop in the tree's reverse
/// order (after HTTP has drained, before the serving path and the engines).
pub type ClusterStart = Box<
    dyn FnOnce(
        crate::distributed::Local,
    ) -> futures_util::future::LocalBoxFuture<
        'static,
        Result<Vec<crate::supervision::tree::Child>, Box<dyn std::error::Error + Send + Sync>>,
    >,
>;

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

/// The root supervisor: owns the [`Tree`] of started children, hears every restart, applies the
/// subtrees' strategies and intensities, takes failed engines out of routing, and stops the process
/// (through [`RunningService::escalated`]) when a failure escalates to it.
pub struct Supervisor {
    tree: Tree,
    router: Addr<KvRouterActor>,
    indexer: Option<Addr<KvIndexerActor>>,
    metrics: Arc<FrontendMetrics>,
    inflight: Arc<InflightRegistry>,
    faults: Arc<FaultInjector>,
    events: Option<tokio::sync::mpsc::UnboundedReceiver<SupervisorEvent>>,
    /// The first failure that escalated to the root: the process must stop (see
    /// [`RunningService::escalated`]).
    escalated: tokio::sync::watch::Sender<Option<Escalation>>,
    /// Told of every change, for `/dashboard`.
    link: SupervisorLink,
}

impl Supervisor {
    /// Takes engine `engine_id` out of routing (router and index) and stops its thread with `stop`.
    fn retire_engine(&mut self, engine_id: u64, stop: StopFn) -> ResponseActFuture<Self, ()> {
        let router = self.router.clone();
        let indexer = self.indexer.clone();
        Box::pin(
            async move {
                let _ = router.send(EngineRemoved { engine_id }).await;
                if let Some(indexer) = indexer {
                    let _ = indexer.send(RemoveWorker(engine_id)).await;
                }
                stop().await;
                tracing::info!(engine = engine_id, "engine removed");
            }
            .into_actor(self),
        )
    }

    /// The process must stop: the first escalation is the one it exits with.
    fn escalate(&mut self, escalation: Escalation) {
        tracing::error!(%escalation, "a failure escalated to the root supervisor; stopping");
        self.escalated.send_if_modified(|current| {
            let first = current.is_none();
            if first {
                *current = Some(escalation);
            }
            first
        });
    }
}

impl Handler<RemoveEngine> for Supervisor {
    type Result = ResponseActFuture<Self, bool>;

    fn handle(&mut self, msg: RemoveEngine, _ctx: &mut Self::Context) -> Self::Result {
        let Some(stop) = self
            .tree
            .remove(ActorKind::Engine, &msg.engine_id.to_string())
        else {
            return Box::pin(actix::fut::ready(false));
        };
        Box::pin(self.retire_engine(msg.engine_id, stop).map(|_, _, _| true))
    }
}

impl Handler<Snapshot> for Supervisor {
    type Result = MessageResult<Snapshot>;

    fn handle(&mut self, _msg: Snapshot, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(TreeSnapshot {
            tree: self.tree.view(),
            timeline: self.tree.timeline(),
        })
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
                if let Outcome::Escalate(escalation) =
                    self.tree.on_restarted(actor, &instance, &reason)
                {
                    self.escalate(escalation);
                }
            }
            SupervisorEvent::Escalated(escalation) => {
                self.metrics
                    .actor_restarted(escalation.actor.as_str(), &escalation.instance);
                self.tree.on_escalated(&escalation);
                self.escalate(escalation);
            }
            SupervisorEvent::Migrated {
                request_id,
                from_engine,
                to_engine,
                cause,
            } => self
                .tree
                .on_migrated(&request_id, from_engine, to_engine, cause),
            SupervisorEvent::EngineFailed { engine_id, reason } => {
                tracing::error!(engine = engine_id, %reason, "engine given up on; removing it from routing");
                let instance = engine_id.to_string();
                self.metrics
                    .actor_restarted(ActorKind::Engine.as_str(), &instance);
                let outcome = self.tree.on_given_up(ActorKind::Engine, &instance, &reason);
                if let Some(stop) = self.tree.take_stop(ActorKind::Engine, &instance) {
                    ctx.spawn(self.retire_engine(engine_id, stop));
                }
                if let Outcome::Escalate(escalation) = outcome {
                    self.escalate(escalation);
                }
            }
        }
        self.link.notify();
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
        // Last started first: HTTP drains before the serving path and the engines stop.
        let mut tree = std::mem::replace(&mut self.tree, Tree::new(&Default::default()));
        Box::pin(
            async move { tree.stop().await }
                .into_actor(self)
                .map(|_, _, ctx| {
                    tracing::debug!("actor tree stopped");
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

    /// The pieces the distributed layer wires to (the worker's KV events are handed over, once).
    pub fn local(&mut self) -> crate::distributed::Local {
        crate::distributed::Local {
            router: self.gateway.router.clone(),
            shared_router: self.gateway.migrator.router.clone(),
            engines: self.engines.clone(),
            indexer: self.indexer.clone(),
            kv_events_in: self.kv_events_in.clone(),
            kv_events_out: self.kv_events_out.take(),
            kv_block_size: self.kv_block_size,
            cluster: self.cluster.clone(),
            metrics: self.metrics.clone(),
            faults: self.faults.clone(),
            // Not under a tree's `request_plane` child: failures are counted, not reported.
            request_plane: std::sync::Arc::new(std::sync::Mutex::new(
                crate::supervision::RestartTracker::new(ActorKind::RequestPlane, "0"),
            )),
            supervision: None,
        }
    }

    /// The supervision tree as it stands, and its recent timeline (`None` once the tree stopped).
    pub async fn snapshot(&self) -> Option<TreeSnapshot> {
        self.supervisor.send(Snapshot).await.ok()
    }

    /// Take engine `engine_id` out of service (see [`RemoveEngine`]); false if there is none.
    pub async fn remove_engine(&self, engine_id: u64) -> bool {
        self.supervisor
            .send(RemoveEngine { engine_id })
            .await
            .unwrap_or(false)
    }
}
