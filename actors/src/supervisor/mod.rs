//! The root [`Supervisor`]: starts the actor tree in dependency order (engines on their own Arbiter
//! threads → router → validator threads → HTTP server) and owns it; on [`Shutdown`] it drains the HTTP
//! side, then stops the engines' threads.
//!
//! Restart policies, the in-flight registry and request migration build on this actor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};

use crate::engine::{build_engine, EchoConfig, EngineActor, EngineConfig, EngineLoad};
use crate::gateway::Gateway;
use crate::http::{self, AppState, EngineInfo, HttpActor, HttpConfig, Lifecycle, ModelCard};
use crate::metrics::{FrontendMetrics, ModelGauges};
use crate::router::{EngineSlot, KvRouterActor, RouterConfig};
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
    /// Validator.
    pub validator: ValidatorConfig,
    /// Metrics.
    pub metrics: MetricsConfig,
    /// Whether to start the HTTP server (false for terminal chat and batch runs).
    pub serve_http: bool,
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
}

/// Drain and stop everything. Replies when the tree has stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// One running engine and the thread it is pinned to.
struct EngineChild {
    arbiter: Arbiter,
}

/// Owns the actor tree.
pub struct Supervisor {
    http: Option<Addr<HttpActor>>,
    engines: Vec<EngineChild>,
    validator: Addr<ValidatorActor>,
    router: Addr<KvRouterActor>,
}

impl Actor for Supervisor {
    type Context = Context<Self>;
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
    pub engines: Arc<Vec<EngineInfo>>,
}

impl RunningService {
    /// Drain and stop the tree.
    pub async fn shutdown(self) {
        let _ = self.supervisor.send(Shutdown).await;
    }
}

/// Start the tree. Must run inside an actix System.
pub async fn start(
    config: ServiceConfig,
    tokenizer: Arc<ModelTokenizer>,
) -> Result<RunningService, StartError> {
    if config.engine.devices.is_empty() {
        return Err(StartError::Config(
            "engine.devices must list at least one device".into(),
        ));
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

    let mut slots = Vec::new();
    let mut infos = Vec::new();
    let mut children = Vec::new();
    for (index, device) in config.engine.devices.iter().enumerate() {
        let id = index as u64;
        let load = Arc::new(EngineLoad::default());
        let arbiter = Arbiter::new();
        let (kind, echo, capacity, device_name, actor_load) = (
            config.engine.kind,
            config.echo.clone(),
            config.engine.admission_capacity,
            device.clone(),
            load.clone(),
        );
        let addr = EngineActor::start_in_arbiter(&arbiter.handle(), move |_| {
            EngineActor::new(
                id,
                device_name,
                build_engine(kind, &echo),
                capacity,
                actor_load,
            )
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
            engine: kind.as_str().into(),
            device: device.clone(),
            load,
        });
        children.push(EngineChild { arbiter });
    }
    let engines = Arc::new(infos);

    let router = KvRouterActor::new(&config.router, slots)
        .map_err(|e| StartError::Config(e.message))?
        .start();
    let validator = {
        let (cfg, model, tok, m) = (
            config.validator.clone(),
            config.model_name.clone(),
            tokenizer.clone(),
            metrics.clone(),
        );
        SyncArbiter::start(config.validator.threads.max(1), move || {
            ValidatorActor::new(cfg.clone(), model.clone(), tok.clone(), m.clone())
        })
    };
    let gateway = Gateway {
        validator: validator.clone(),
        router: router.clone(),
        tokenizer: tokenizer.clone(),
        stream_buffer: config.engine.stream_buffer,
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
        });
        let (server, addrs) = match http::bind(state) {
            Ok(bound) => bound,
            Err(e) => {
                for child in children {
                    child.arbiter.stop();
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

    let supervisor = Supervisor {
        http,
        engines: children,
        validator,
        router,
    }
    .start();
    Ok(RunningService {
        supervisor,
        http_addrs,
        gateway,
        metrics,
        engines,
    })
}
