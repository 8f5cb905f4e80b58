//! The HTTP face: [`HttpActor`] owns the actix-web server (OpenAI routes, SSE, health, metrics) and its
//! handle, and drains it gracefully.
//!
//! Layout:
//! - `mod.rs`: [`HttpConfig`], [`AppState`], [`Lifecycle`] (readiness and the admission tracker), server
//!   construction and the actor.
//! - [`request`]: what every inference route does first (content type, body limit, request id, headers)
//!   and the one place errors become HTTP responses.
//! - [`openai`]: `/v1/chat/completions`, `/v1/completions`, `/v1/responses`.
//! - [`embeddings`]: `POST /v1/embeddings`.
//! - [`stream`]: SSE framing of a generation, and folding it into one response.
//! - [`info`]: `/v1/models`, `/health`, `/live`, `/metrics`, `/openapi.json`, `/docs`, unmatched routes.
//! - [`dashboard`]: `/dashboard`, the live picture of the supervision tree, engines and requests.

pub mod admin;
pub mod dashboard;
pub mod embeddings;
pub mod info;
pub mod openai;
pub mod openapi;
pub mod request;
pub mod stream;
pub mod text;
mod text_responses;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::dev::{Server, ServerHandle, Service};
use actix_web::{web, App, HttpResponse, HttpServer};
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::engine::registry::EngineRegistry;
use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::metrics::FrontendMetrics;

/// `[http.paths]`: route paths, each overridable (`DYN_HTTP_SVC_*_PATH`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpPaths {
    /// Readiness (`DYN_HTTP_SVC_HEALTH_PATH`).
    pub health: String,
    /// Liveness (`DYN_HTTP_SVC_LIVE_PATH`).
    pub live: String,
    /// Prometheus metrics (`DYN_HTTP_SVC_METRICS_PATH`).
    pub metrics: String,
    /// Model list (`DYN_HTTP_SVC_MODELS_PATH`).
    pub models: String,
    /// Chat completions (`DYN_HTTP_SVC_CHAT_PATH`).
    pub chat: String,
    /// Completions (`DYN_HTTP_SVC_CMP_PATH`).
    pub completions: String,
    /// Responses (`DYN_HTTP_SVC_RESPONSES_PATH`).
    pub responses: String,
    /// Embeddings (`DYN_HTTP_SVC_EMB_PATH`).
    pub embeddings: String,
}

impl Default for HttpPaths {
    fn default() -> Self {
        HttpPaths {
            health: "/health".into(),
            live: "/live".into(),
            metrics: "/metrics".into(),
            models: "/v1/models".into(),
            chat: "/v1/chat/completions".into(),
            completions: "/v1/completions".into(),
            responses: "/v1/responses".into(),
            embeddings: "/v1/embeddings".into(),
        }
    }
}

/// `[http]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address (`--http-host`, `DYN_HTTP_HOST`).
    pub host: String,
    /// Listen port; 0 picks a free one (`--http-port`, `DYN_HTTP_PORT`).
    pub port: u16,
    /// actix-web worker threads (0 = one per CPU).
    pub workers: usize,
    /// Request body limit in MiB (`DYN_HTTP_BODY_LIMIT_MB`).
    pub body_limit_mb: u64,
    /// How long a drain waits for in-flight requests (`DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS`).
    pub graceful_shutdown_timeout_secs: u64,
    /// Status for overload rejections (`DYN_HTTP_OVERLOAD_STATUS_CODE`).
    pub overload_status_code: u16,
    /// SSE keep-alive comment interval; 0 = off (`DYN_HTTP_SSE_KEEP_ALIVE_INTERVAL_MS`).
    pub sse_keep_alive_interval_ms: u64,
    /// Route paths.
    pub paths: HttpPaths,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            host: "0.0.0.0".into(),
            port: 8000,
            workers: 0,
            body_limit_mb: 45,
            graceful_shutdown_timeout_secs: 5,
            overload_status_code: crate::error::DEFAULT_OVERLOAD_STATUS,
            sse_keep_alive_interval_ms: 0,
            paths: HttpPaths::default(),
        }
    }
}

/// Readiness and the admission tracker: counts admitted inference requests until their response body
/// (including an SSE stream) finishes, so a drain knows when it may stop.
#[derive(Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    /// Set when the drain gave up: streams still open end without `[DONE]`.
    killed: AtomicBool,
    in_flight: AtomicUsize,
    /// Woken each time an admitted request finishes.
    idle: Notify,
}

impl Lifecycle {
    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Admit a request (None while draining).
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        if self.is_draining() {
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Admission(self.clone()))
    }

    /// Whether the drain timed out and remaining streams are being killed.
    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Requests admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Stop admitting; wait until nothing is in flight or `timeout` passes. Returns whether it drained.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.draining.store(true, Ordering::Release);
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        let drained = tokio::time::timeout(timeout, wait).await.is_ok();
        if !drained {
            self.killed.store(true, Ordering::Release);
        }
        drained
    }
}

/// One admitted request; dropping it (when the response body ends) releases it.
pub struct Admission(Arc<Lifecycle>);

impl Admission {
    /// Whether the service gave up waiting for this request (drain timed out).
    pub fn is_killed(&self) -> bool {
        self.0.is_killed()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.idle.notify_waiters();
    }
}

/// A late-bound reporter of the distributed layer's state for `/health`.
pub type ClusterStatus = Arc<ClusterLink>;

/// What a frontend of workers adds to the HTTP side once its distributed layer runs.
#[derive(Default)]
pub struct ClusterLink {
    /// The `/health` reporter of discovery and events (merged under `cluster`).
    pub status: std::sync::OnceLock<Box<dyn Fn() -> serde_json::Value + Send + Sync>>,
    /// Models whose workers take the OpenAI request as it came (Text models).
    pub text_models: std::sync::OnceLock<Arc<crate::distributed::text::TextModels>>,
    /// The Tokens models served beyond the frontend's own, each in a lane of its own.
    pub lanes: std::sync::OnceLock<Arc<crate::distributed::lanes::TokensLanes>>,
}

/// The served model as the models routes describe it.
#[derive(Clone, Debug)]
pub struct ModelCard {
    /// Served name.
    pub name: String,
    /// Context window in tokens.
    pub context_length: u32,
    /// Other names it answers to (a worker card's `model_aliases`).
    pub aliases: Vec<String>,
}

/// Shared by every HTTP worker.
pub struct AppState {
    /// The serving path.
    pub gateway: Gateway,
    /// Prometheus metrics.
    pub metrics: Arc<FrontendMetrics>,
    /// HTTP settings.
    pub config: HttpConfig,
    /// The served model.
    pub model: ModelCard,
    /// Readiness and admission.
    pub lifecycle: Arc<Lifecycle>,
    /// Engines, for `/health`.
    pub engines: Arc<EngineRegistry>,
    /// Discovery and event-plane state (a frontend of workers), set once they start: merged into
    /// `/health` under `cluster`.
    pub cluster: ClusterStatus,
    /// Fault injection (`/admin/faults` when `faults.admin_endpoint`).
    pub faults: Arc<crate::faults::FaultInjector>,
    /// Requests in flight, for `/health`.
    pub inflight: Arc<crate::gateway::inflight::InflightRegistry>,
    /// The embedding model; None when the embeddings family is off (its route answers 404).
    pub embeddings: Option<crate::embeddings::EmbeddingService>,
    /// The HTTP workers' restart bookkeeping: a handler panic fails its request and counts as a
    /// restart; past the budget it escalates to the root.
    pub supervision: std::sync::Mutex<crate::supervision::RestartTracker>,
    /// The root supervisor, once it runs (it starts after the HTTP server), for `/dashboard`.
    pub supervisor: crate::supervision::tree::SupervisorLink,
}

impl AppState {
    /// A handler panicked with `reason` (its request already failed with a 500).
    fn handler_panicked(&self, reason: String) {
        // Nothing to rebuild: the worker thread carries on with its other connections.
        self.supervision
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .resume_after(reason);
    }
}

/// A handler panicked: the request gets Dynamo's sanitized 500 body.
#[derive(Debug)]
struct HandlerPanicked;

impl std::fmt::Display for HandlerPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Internal server error")
    }
}

impl actix_web::ResponseError for HandlerPanicked {
    fn error_response(&self) -> HttpResponse {
        request::error_response(&ApiError::internal("handler panicked"), 529)
    }
}

/// Build and bind the server. Fails with Dynamo's message when the port is taken.
pub fn bind(state: Arc<AppState>) -> Result<(Server, Vec<SocketAddr>), std::io::Error> {
    let config = state.config.clone();
    let data = web::Data::from(state);
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap_fn(|req, srv| {
                let echoed = req.headers().get("x-request-id").cloned();
                let path = req.path().to_string();
                let state = req.app_data::<web::Data<AppState>>().cloned();
                let fut = srv.call(req);
                async move {
                    // A panic in a handler fails that request with a 500, not the worker thread and
                    // every connection on it.
                    let mut res = match std::panic::AssertUnwindSafe(fut).catch_unwind().await {
                        Ok(result) => result?,
                        Err(payload) => {
                            let reason = crate::supervision::panic_message(&*payload);
                            tracing::error!(%path, %reason, "HTTP handler panicked");
                            if let Some(state) = state {
                                state.handler_panicked(reason);
                            }
                            return Err(HandlerPanicked.into());
                        }
                    };
                    if let Some(value) = echoed {
                        res.headers_mut().insert(
                            actix_web::http::header::HeaderName::from_static("x-request-id"),
                            value,
                        );
                    }
                    Ok(res)
                }
            })
            .configure(|cfg| routes(cfg, &data.config, data.faults.config().admin_endpoint))
            .default_service(web::to(info::route_not_found))
    })
    .disable_signals()
    .shutdown_timeout(config.graceful_shutdown_timeout_secs.max(1))
    // Token streams are many small writes: never let Nagle hold one back.
    .on_connect(|conn, ext| {
        if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
            let _ = tcp.set_nodelay(true);
            if let Some(peer) = request::PeerSocket::watch(tcp) {
                ext.insert(peer);
            }
        }
    });
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    let server = server.bind((config.host.as_str(), config.port)).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            std::io::Error::new(
                e.kind(),
                format!(
                    "Failed to start HTTP server: port {} already in use. Use --http-port to specify a different port.",
                    config.port
                ),
            )
        } else {
            std::io::Error::new(e.kind(), format!("Failed to start HTTP server on {}:{}: {e}", config.host, config.port))
        }
    })?;
    let addrs = server.addrs();
    Ok((server.run(), addrs))
}

fn routes(cfg: &mut web::ServiceConfig, config: &HttpConfig, faults_admin: bool) {
    let p = &config.paths;
    let post = |path: &str, handler| {
        web::resource(path.to_string())
            .route(handler)
            .default_service(web::to(info::method_not_allowed))
    };
    let get = |path: &str, handler| {
        web::resource(path.to_string())
            .route(handler)
            .default_service(web::to(info::method_not_allowed))
    };
    cfg.service(post(&p.chat, web::post().to(openai::chat_completions)))
        .service(post(&p.completions, web::post().to(openai::completions)))
        .service(post(&p.responses, web::post().to(openai::responses)))
        .service(post(&p.embeddings, web::post().to(embeddings::embeddings)))
        .service(post(
            &format!("{}/input_tokens", p.responses.trim_end_matches('/')),
            web::post().to(openai::responses_input_tokens),
        ))
        .service(get(&p.models, web::get().to(info::list_models)))
        .service(get(
            &format!("{}/{{model_id:.*}}", p.models.trim_end_matches('/')),
            web::get().to(info::get_model),
        ))
        .service(get(&p.health, web::get().to(info::health)))
        .service(get(&p.live, web::get().to(info::live)))
        .service(get(&p.metrics, web::get().to(info::metrics)))
        .service(get("/openapi.json", web::get().to(openapi::openapi)))
        .service(get("/dashboard", web::get().to(dashboard::page)))
        .service(get("/dashboard/state", web::get().to(dashboard::state)))
        .service(get("/dashboard/events", web::get().to(dashboard::events)))
        .service(get("/docs", web::get().to(openapi::docs)));
    if faults_admin {
        cfg.service(
            web::resource("/admin/faults")
                .route(web::get().to(admin::faults_status))
                .route(web::post().to(admin::arm_fault))
                .default_service(web::to(info::method_not_allowed)),
        );
    }
}

/// Begin draining: readiness fails, new inference requests get 503, admitted ones finish (up to the
/// graceful timeout); then the server stops. Replies when the server has stopped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Owns the running server.
pub struct HttpActor {
    handle: ServerHandle,
    lifecycle: Arc<Lifecycle>,
    timeout: Duration,
}

impl HttpActor {
    /// Wrap a running server.
    pub fn new(handle: ServerHandle, lifecycle: Arc<Lifecycle>, timeout: Duration) -> Self {
        HttpActor {
            handle,
            lifecycle,
            timeout,
        }
    }
}

impl Actor for HttpActor {
    type Context = Context<Self>;
}

impl Handler<Drain> for HttpActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Drain, _ctx: &mut Self::Context) -> Self::Result {
        let lifecycle = self.lifecycle.clone();
        let handle = self.handle.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            tracing::info!(in_flight = lifecycle.in_flight(), "draining HTTP service");
            if !lifecycle.drain(timeout).await {
                tracing::warn!(
                    in_flight = lifecycle.in_flight(),
                    "graceful shutdown timed out after {}s with requests still in flight",
                    timeout.as_secs()
                );
            }
            // Graceful: the last frames of a finished stream may still sit in a connection's write
            // buffer when its admission is released; a forced stop would cut them off.
            handle.stop(true).await;
            tracing::info!("HTTP service stopped");
        })
    }
}
