//! `dynamix gms`: run GPU memory service servers (one per tag) until SIGINT/SIGTERM, or act as a client
//! (`write`, `read`, `state`) to check a running server end to end (scripts/gpu-check.sh uses these on a
//! GPU machine that has no Rust toolchain).
//!
//! Exit status: 0 success, 1 runtime failure (backend unavailable, socket busy, data mismatch), 2 bad
//! arguments.

use std::process::ExitCode;
use std::time::Duration;

use dynamix_actors::gms::backend::{self, BackendKind};
use dynamix_actors::gms::check::{self, CheckError, CheckReport, WritePlan};
use dynamix_actors::gms::client::{self, ClientError};
use dynamix_actors::gms::{default_socket_path, GmsConfig, GmsServer};

use crate::cli::{GmsAction, GmsArgs, GmsClientArgs, GmsServerArgs};

/// Tags served when none is given (Dynamo's default).
pub const DEFAULT_TAGS: &[&str] = &["weights", "kv_cache"];

/// Entry point of `dynamix gms`.
pub fn main(args: GmsArgs) -> ExitCode {
    match args.action {
        None => serve(args.server),
        Some(GmsAction::Write(a)) => client_action(a, write),
        Some(GmsAction::Read(a)) => client_action(a, read),
        Some(GmsAction::State(a)) => client_action(a, state),
    }
}

fn bad_arguments(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("dynamix gms: {message}");
    ExitCode::from(2)
}

fn failure(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("dynamix gms: {message}");
    ExitCode::from(1)
}

/// Why a `dynamix gms` argument or client action failed.
#[derive(Debug, thiserror::Error)]
enum GmsError {
    /// A duration flag is not a usable number of seconds (exit status 2).
    #[error("--{flag} must be a positive number of seconds, got {value}")]
    Seconds {
        /// The flag without its dashes.
        flag: &'static str,
        /// The value given.
        value: f64,
    },
    /// The write or read check failed.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The server could not be asked for its state.
    #[error(transparent)]
    Client(#[from] ClientError),
}

fn seconds(flag: &'static str, value: f64) -> Result<Duration, GmsError> {
    if value.is_finite() && value > 0.0 && value < 1e9 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(GmsError::Seconds { flag, value })
    }
}

fn serve(args: GmsServerArgs) -> ExitCode {
    crate::init_logging(&crate::config::LogConfig {
        filter: match args.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
        .into(),
        deprecated: Vec::new(),
    });
    let kind: BackendKind = match args.backend.parse() {
        Ok(kind) => kind,
        Err(e) => return bad_arguments(format!("--backend: {e}")),
    };
    let tags: Vec<String> = if args.tags.is_empty() {
        DEFAULT_TAGS.iter().map(|t| t.to_string()).collect()
    } else {
        args.tags.clone()
    };
    if let Some(bad) = tags.iter().find(|t| {
        t.is_empty()
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }) {
        return bad_arguments(format!("--tag {bad:?}: use letters, digits, '_' or '-'"));
    }
    if args.socket.is_some() && tags.len() != 1 {
        return bad_arguments(format!(
            "--socket needs exactly one --tag (got {})",
            tags.len()
        ));
    }
    let interval = match seconds("alloc-retry-interval", args.alloc_retry_interval) {
        Ok(d) => d,
        Err(e) => return bad_arguments(e),
    };
    let timeout = match args
        .alloc_retry_timeout
        .map(|t| seconds("alloc-retry-timeout", t))
    {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => return bad_arguments(e),
    };
    let from_env = match crate::config::gms_env(&std::env::vars().collect::<Vec<_>>()) {
        Ok(from_env) => from_env,
        Err(e) => return bad_arguments(e),
    };
    let granularity = args.granularity.or(from_env.granularity);
    let socket_dir = from_env.socket_dir;

    let system = actix_rt::System::new();
    system.block_on(async move {
        let mut servers = Vec::new();
        for tag in &tags {
            let backend = match backend::open(kind, args.device, granularity) {
                Ok(b) => b,
                Err(e) => return failure(format!("{kind} backend on device {}: {e}", args.device)),
            };
            let socket_path = args.socket.clone().unwrap_or_else(|| {
                default_socket_path(&backend.device_identity(), tag, socket_dir.as_deref())
            });
            let config = GmsConfig {
                device: args.device,
                tag: tag.clone(),
                socket_path: socket_path.clone(),
                alloc_retry_interval: interval,
                alloc_retry_timeout: timeout,
            };
            match GmsServer::bind(config, backend) {
                Ok(server) => {
                    println!(
                        "gms listening device={} tag={tag} backend={kind} socket={}",
                        args.device,
                        socket_path.display()
                    );
                    servers.push(server);
                }
                Err(e) => return failure(e),
            }
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        actix_rt::spawn(async move {
            crate::shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let running = servers.into_iter().map(|server| {
            let mut stop = stop_rx.clone();
            server.serve(async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            })
        });
        futures_util::future::join_all(running).await;
        ExitCode::SUCCESS
    })
}

fn client_action(
    args: GmsClientArgs,
    action: fn(&GmsClientArgs, BackendKind) -> Result<(), GmsError>,
) -> ExitCode {
    let kind: BackendKind = match args.backend.parse() {
        Ok(kind) => kind,
        Err(e) => return bad_arguments(format!("--backend: {e}")),
    };
    match action(&args, kind) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failure(e),
    }
}

fn lock_timeout(args: &GmsClientArgs) -> Option<Duration> {
    args.lock_timeout_ms.map(Duration::from_millis)
}

fn print_report(report: &CheckReport) {
    println!("allocations={}", report.allocations);
    println!("layout_hash={}", report.layout_hash);
    println!("digest={}", report.digest);
}

fn write(args: &GmsClientArgs, kind: BackendKind) -> Result<(), GmsError> {
    let plan = WritePlan {
        bytes: args.bytes,
        count: args.count,
        seed: args.seed,
    };
    let report = check::write_pattern(&args.socket, kind, args.device, plan, lock_timeout(args))?;
    print_report(&report);
    Ok(())
}

fn read(args: &GmsClientArgs, kind: BackendKind) -> Result<(), GmsError> {
    let report = check::read_pattern(
        &args.socket,
        kind,
        args.device,
        args.expect_hash.as_deref(),
        lock_timeout(args),
    )?;
    print_report(&report);
    println!("verified=true");
    Ok(())
}

fn state(args: &GmsClientArgs, _kind: BackendKind) -> Result<(), GmsError> {
    let state = client::runtime_state(&args.socket)?;
    println!(
        "state={} has_rw_session={} ro_session_count={} waiting_writers={} committed={} is_ready={}",
        state.lock.state,
        state.lock.has_rw_session,
        state.lock.ro_session_count,
        state.lock.waiting_writers,
        state.lock.committed,
        state.lock.is_ready
    );
    println!("allocation_count={}", state.allocation_count);
    println!("layout_hash={}", state.memory_layout_hash);
    let events = client::event_history(&args.socket)?;
    let kinds: Vec<String> = events
        .iter()
        .map(|e| format!("{}:{}", e.kind, e.allocation_count))
        .collect();
    println!("events={}", kinds.join(","));
    Ok(())
}
