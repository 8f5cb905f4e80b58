//! dynamix: the program around the actor tree — command line ([`cli`]), config composition ([`config`]),
//! bootstrap ([`start`], [`run`]), and the terminal and batch front ends ([`frontends`]); beside them the
//! fault drill ([`drill`]) and the HTTP load generator ([`bench`]).
//!
//! `run(config, input, shutdown)` takes the shutdown future as a parameter, so tests start a real server
//! and stop it when they choose.

pub mod bench;
pub mod cards;
pub mod cli;
pub mod config;
pub mod drill;
pub mod frontends;
pub mod gms;
pub mod model;

pub use model::{
    config_tokenizer, load_tokenizer, load_weights, model_file, models_list, models_pull,
    ModelError,
};

use std::future::Future;
use std::sync::Arc;

use dynamix_actors::distributed;
use dynamix_actors::engine::model::shared::TAG as WEIGHTS_TAG;
use dynamix_actors::engine::EngineKind;
use dynamix_actors::gms::InProcessGms;
use dynamix_actors::supervisor::{self, RunningService};
use dynamix_actors::tokenizer::ModelTokenizer;
use futures_util::FutureExt;

/// mimalloc for every binary that links this crate (the server, its tests and benches): the request
/// path allocates many small short-lived objects across threads, where glibc malloc was ~20% of CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use cli::Input;
pub use config::Config;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The model's files, tokenizer, weights or card are not available.
    #[error("{0}")]
    Model(#[from] ModelError),
    /// The actor tree could not start (bind failure, bad settings).
    #[error("{0}")]
    Start(#[from] supervisor::StartError),
    /// A terminal or batch front end failed.
    #[error("{0}")]
    Frontend(#[from] frontends::FrontendError),
    /// The distributed layer could not start (etcd or NATS unreachable, a port taken).
    #[error("{0}")]
    Distributed(#[from] distributed::ClusterError),
    /// A setting read at start is invalid (exit status 2).
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    /// The drill's own etcd or NATS server could not start.
    #[error("{0}")]
    Infra(#[from] distributed::infra::InfraError),
    /// The drill's own cluster did not come up.
    #[error("{0}")]
    Drill(#[from] drill::DrillError),
    /// An actor failed past its restart intensity and the failure reached the root supervisor.
    #[error("stopping: {0}")]
    Escalated(dynamix_actors::supervision::Escalation),
}

/// Which process this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything in one process (`dynamix`, `dynamix serve`).
    Standalone,
    /// HTTP, validator and router; engines are the workers found in etcd (`dynamix frontend`).
    Frontend,
    /// Engines served to frontends (`dynamix worker`).
    Worker,
}

impl RunError {
    /// Process exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Start(supervisor::StartError::Config(_))
            | RunError::Start(supervisor::StartError::Setting(_))
            | RunError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Set up logging for `[log]`: its `RUST_LOG`-style filter (an invalid filter falls back to `info`, with
/// a notice), then the deprecation warnings the config loader collected.
pub fn init_logging(log: &config::LogConfig) {
    let filter = log.filter.as_str();
    let env_filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("dynamix: invalid log filter {filter:?} ({e}); using \"info\"");
        tracing_subscriber::EnvFilter::new("info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
    for warning in &log.deprecated {
        tracing::warn!("{warning}");
    }
    // Actor panics are caught and supervised (restart, migration); report each as one log line
    // instead of the default hook's multi-line dump (a backtrace only when RUST_BACKTRACE asks).
    let backtraces = std::env::var_os("RUST_BACKTRACE")
        .is_some_and(|v| v != "0")
        .then(backtrace_printer);
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".into());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(thread = thread.name().unwrap_or("unnamed"), %location, "panic: {message}");
        if let Some(printer) = &backtraces {
            // Walking the stack is quick; resolving its symbols is not (hundreds of milliseconds),
            // and the panicking thread is an engine whose other requests wait on it: resolve and
            // print elsewhere.
            let _ = printer.send(std::backtrace::Backtrace::force_capture());
        }
    }));
}

/// A thread that prints the backtraces of caught panics, so the panicking thread does not resolve
/// them itself.
fn backtrace_printer() -> std::sync::mpsc::Sender<std::backtrace::Backtrace> {
    let (tx, rx) = std::sync::mpsc::channel::<std::backtrace::Backtrace>();
    let spawned = std::thread::Builder::new()
        .name("panic-backtraces".into())
        .spawn(move || {
            for backtrace in rx {
                // Resolve before taking stderr: log lines of other threads must not wait on it.
                let text = backtrace.to_string();
                eprintln!("{text}");
            }
        });
    if let Err(e) = spawned {
        eprintln!("dynamix: cannot start the backtrace printer ({e}); panics are logged without backtraces");
    }
    tx
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}

/// Start the actor tree for `config` (HTTP on when `serve_http`). Must run inside an actix System.
pub async fn start(config: &Config, serve_http: bool) -> Result<RunningService, RunError> {
    start_as(config, serve_http, Role::Standalone).await
}

/// [`start`] for a role: a frontend starts no engines, a worker hands its KV events out.
pub async fn start_as(
    config: &Config,
    serve_http: bool,
    role: Role,
) -> Result<RunningService, RunError> {
    let tokenizer = config_tokenizer(config)?;
    start_with(config, tokenizer, serve_http, role, None).await
}

/// The memory service socket the model engine loads its weights through (`model_engine.gms_socket`,
/// else the default path for the host backend's weights).
pub fn weights_socket(config: &Config) -> std::path::PathBuf {
    config.model_engine.gms_socket.clone().unwrap_or_else(|| {
        dynamix_actors::gms::default_socket_path(
            "host-0",
            WEIGHTS_TAG,
            config.model_engine.gms_socket_dir.as_deref(),
        )
    })
}

/// [`start_as`] with a given tokenizer (a frontend's, from the workers' model card) and the cluster
/// side of a frontend or worker, started as the tree's `cluster` subtree.
pub async fn start_with(
    config: &Config,
    tokenizer: Arc<ModelTokenizer>,
    serve_http: bool,
    role: Role,
    cluster: Option<supervisor::ClusterStart>,
) -> Result<RunningService, RunError> {
    // The in-process memory service starts first so the weights can be written into it.
    let (gms, config) = match config.model_engine.gms_serve
        && config.engine.kind == EngineKind::Model
        && role != Role::Frontend
    {
        true => {
            let socket = weights_socket(config);
            // Another process on this machine already serves it: load through that one instead.
            let gms = if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                tracing::info!(socket = %socket.display(), "using the GPU memory service already running there");
                None
            } else {
                let gms = InProcessGms::start(socket.clone(), WEIGHTS_TAG)
                    .await
                    .map_err(ModelError::from)?;
                tracing::info!(socket = %socket.display(), "GPU memory service (host, weights) running in-process");
                Some(gms)
            };
            let mut config = config.clone();
            config.model_engine.gms_socket = Some(socket);
            (gms, std::borrow::Cow::Owned(config))
        }
        false => (None, std::borrow::Cow::Borrowed(config)),
    };
    let config = config.as_ref();
    let weights = match (config.engine.kind, role) {
        (_, Role::Frontend) => None,
        (EngineKind::Model, _) => Some(load_weights(&model_file(config)?, config)?),
        _ => None,
    };
    let mut service_config = config.service(serve_http);
    service_config.remote_engines = role == Role::Frontend;
    service_config.export_kv_events = role == Role::Worker;
    let service = match cluster {
        Some(cluster) => {
            supervisor::start_with_cluster(service_config, tokenizer, weights, gms, cluster).await?
        }
        None => supervisor::start(service_config, tokenizer, weights, gms).await?,
    };
    for addr in &service.http_addrs {
        tracing::info!(
            "serving {} on http://{addr} (OpenAI API under /v1)",
            config.model.name
        );
    }
    if let Some(addr) = service.http_addrs.first() {
        tracing::info!("try: {}", curl_hint(*addr, &config.model.name));
    }
    Ok(service)
}

/// A curl command line that sends one chat completion to the server at `addr`.
pub fn curl_hint(addr: std::net::SocketAddr, model: &str) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "localhost".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello!"}],
    });
    format!(
        "curl -s http://{host}:{}/v1/chat/completions -H 'content-type: application/json' -d '{}'",
        addr.port(),
        body.to_string().replace('\'', "'\\''")
    )
}

/// Run until `shutdown` resolves (HTTP) or the input is exhausted (text, batch), then drain and stop.
pub async fn run(
    config: Config,
    input: Input,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let service = start(&config, input == Input::Http).await?;
    let work = async {
        match &input {
            Input::Http => {
                shutdown.await;
                Ok(())
            }
            Input::Text => {
                tokio::select! {
                    r = frontends::text(&service, &config.model.name) => r,
                    _ = shutdown => Ok(()),
                }
            }
            Input::Batch(file) => frontends::batch(&service, &config.model.name, file).await,
            Input::Endpoint { .. } => Err(frontends::FrontendError::Input(
                "in=dyn://... serves a worker: run it with `dynamix in=dyn://ns.comp.ep out=ENGINE`",
            )
            .into()),
        }
    };
    let result = until_escalated(&service, work).await;
    service.shutdown().await;
    result
}

/// Runs `work` unless a failure escalates to the root supervisor first: then the work is dropped
/// and the escalation is the result (the caller drains and exits non-zero).
async fn until_escalated(
    service: &RunningService,
    work: impl Future<Output = Result<(), RunError>>,
) -> Result<(), RunError> {
    tokio::select! {
        result = work => result,
        escalation = service.escalated() => Err(RunError::Escalated(escalation)),
    }
}

/// `dynamix frontend`: serve HTTP and route to the workers registered in etcd until `shutdown`
/// resolves, then drain.
pub async fn run_frontend(
    config: Config,
    input: Input,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let Some((service, config)) =
        start_frontend(config, input == Input::Http, &mut shutdown).await?
    else {
        return Ok(());
    };
    let work = async {
        match &input {
            Input::Text => {
                tokio::select! {
                    r = frontends::text(&service, &config.model.name) => r,
                    _ = &mut shutdown => Ok(()),
                }
            }
            Input::Batch(file) => frontends::batch(&service, &config.model.name, file).await,
            Input::Http | Input::Endpoint { .. } => {
                (&mut shutdown).await;
                Ok(())
            }
        }
    };
    let result = until_escalated(&service, work).await;
    service.shutdown().await;
    result
}

/// Start a frontend: wait for the workers' model card (unless the model is local; `None` when
/// `shutdown` came first), then the tree with the cluster side routing to the workers. Returns the
/// service and the config as the card completed it.
pub async fn start_frontend<S: Future<Output = ()>>(
    config: Config,
    serve_http: bool,
    shutdown: &mut std::pin::Pin<&mut S>,
) -> Result<Option<(RunningService, Config)>, RunError> {
    let max_message_size = config.distributed.max_message_size;
    let (config, tokenizer, placeholder) = match config.model.source {
        config::ModelSource::Local => (config, None, false),
        _ => match cards::frontend_model(config, shutdown).await? {
            Some(choice) => (choice.config, choice.tokenizer, choice.placeholder),
            None => return Ok(None),
        },
    };
    let tokenizer = match tokenizer {
        Some(tokenizer) => tokenizer,
        None => config_tokenizer(&config)?,
    };
    let kv = config.router.mode == dynamix_actors::router::RouterMode::Kv;
    let cluster: supervisor::ClusterStart = {
        let config = config.clone();
        Box::new(move |local: distributed::Local| {
            async move {
                let settings = distributed::frontend::FrontendSettings {
                    config: config.distributed.clone(),
                    max_message_size,
                    default_capacity: config.engine.admission_capacity,
                    kv_block_size: kv.then_some(local.kv_block_size),
                    model: (config.model.source != config::ModelSource::Local)
                        .then(|| config.model.name.clone()),
                    // A namespace other than the built-in one was chosen: serve only its Text
                    // models (python-sdk spec §7: the default watches every namespace, as Dynamo's
                    // frontend does).
                    text_namespace: (config.distributed.namespace
                        != distributed::DistributedConfig::default().namespace)
                        .then(|| config.distributed.namespace.clone()),
                    route_own_endpoint: !placeholder,
                    // Every other Tokens model of the cards is served in a lane of its own, as
                    // Dynamo's frontend serves every model it finds.
                    lanes: Some(distributed::lanes::LaneSettings {
                        start: supervisor::lane_starter(
                            config.service(false),
                            local.metrics.clone(),
                        ),
                        primary: (!placeholder).then(|| config.model.name.clone()),
                    }),
                };
                let handle = distributed::frontend::start(&local, settings).await?;
                tracing::info!(
                    etcd = config.distributed.etcd_endpoints.join(","),
                    nats = %config.distributed.nats_url,
                    responses = handle.streams.address(),
                    "frontend routing to the workers of {}",
                    config.distributed.instance_prefix()
                );
                // Stopped after HTTP has drained: the response streams outlive the last request.
                Ok(handle.into_children())
            }
            .boxed_local()
        })
    };
    let service = start_with(
        &config,
        tokenizer,
        serve_http,
        Role::Frontend,
        Some(cluster),
    )
    .await?;
    Ok(Some((service, config)))
}

/// `dynamix worker`: serve this process's engines to frontends until `shutdown` resolves, then leave
/// discovery and drain.
pub async fn run_worker(
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let service = start_worker(&config).await?;
    let result = until_escalated(&service, async {
        shutdown.await;
        Ok(())
    })
    .await;
    service.shutdown().await;
    result
}

/// Start a worker: the tree with its engines, and the cluster side serving them on the request
/// plane, registered in etcd and publishing on NATS.
pub async fn start_worker(config: &Config) -> Result<RunningService, RunError> {
    let config = config.clone();
    let max_message_size = config.distributed.max_message_size;
    let tokenizer = config_tokenizer(&config)?;
    let cluster: supervisor::ClusterStart = {
        let (config, tokenizer) = (config.clone(), tokenizer.clone());
        Box::new(move |mut local: distributed::Local| {
            async move {
                let mut card = cards::worker_card(&config, &tokenizer, local.kv_block_size)?;
                let d = &config.distributed;
                let system_server = match d.system_port {
                    Some(port) => Some(
                        distributed::metadata::serve(
                            d.system_host.as_deref().unwrap_or(&d.host),
                            port,
                            &d.host,
                            (&d.namespace, &d.component, &d.endpoint),
                            &mut card,
                        )
                        .map_err(RunError::Distributed)?,
                    ),
                    None => None,
                };
                let card = serde_json::to_value(card).map_err(ModelError::from)?;
                let settings = distributed::worker::WorkerSettings {
                    config: config.distributed.clone(),
                    max_message_size,
                    engine: config.engine.kind.as_str().into(),
                    capacity: config.engine.admission_capacity * config.engine.devices.len().max(1),
                    stream_buffer: config.engine.stream_buffer,
                    card: Some(card),
                    codec: distributed::wire::PayloadCodec::Msgpack,
                    device_type: if config.engine.devices.iter().any(|d| d.starts_with("cuda")) {
                        "cuda".into()
                    } else {
                        "cpu".into()
                    },
                };
                let handle = distributed::worker::start(&mut local, settings)
                    .await
                    .map_err(RunError::Distributed)?;
                let drain = std::time::Duration::from_secs(
                    config.http.graceful_shutdown_timeout_secs.max(1) * 6,
                );
                // Stopped before the serving path and the engines: the worker leaves discovery,
                // finishes its running requests, then its engines stop.
                Ok(handle.into_children(drain, system_server))
            }
            .boxed_local()
        })
    };
    start_with(&config, tokenizer, false, Role::Worker, Some(cluster)).await
}
