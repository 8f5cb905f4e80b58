//! `dynamix drill`: supervisor-driven fault testing. Starts the configured service in-process and, for
//! each kind in `faults.kinds`, sends the same deterministic set of concurrent requests once with
//! fault injection off (the reference, once per kind of request) and once with random faults of that
//! kind only (on the `every_ms` timer and/or per output). The requests are what meets the fault
//! ([`Driver`]): streaming chat on the serving path below HTTP for the engine, router, validator and
//! indexer faults (recovery gaps are measured there); the same chat through a frontend of the
//! drill's own workers (its own etcd and NATS too) for the workers' request plane; the same chat over
//! HTTP, with the `openai` SDK's retries, for HTTP handler panics; `/v1/embeddings` for the embedding
//! engine; and weights loads through the memory service, as a restarting engine does them, for the
//! memory service.
//!
//! For each kind it reports the faults injected, the restarts of the actor it hits, escalations to
//! the root, migrations, client retries, failed requests, tokens (or vectors) lost or duplicated
//! against the reference, the recovery gap (last token before a failure → first token after it)
//! p50/p99, and throughput with vs without the fault; then the kinds and actors it could not reach
//! and why.
//!
//! The comparison needs a deterministic engine (`echo`/`echo_full`/`echo_core`); with another engine the
//! drill still runs and reports, but says that token comparison is meaningless.

mod cluster;
mod http;
mod report;
mod requests;

pub use cluster::DrillError;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamix_actors::engine::EngineKind;
use dynamix_actors::faults::FaultKind;
use dynamix_actors::router::RouterMode;
use dynamix_actors::supervisor::RunningService;

use crate::config::Config;
use crate::RunError;
use report::{difference, KindReport};
use requests::{Target, Weights};

/// Drill settings from the command line.
#[derive(Clone, Debug)]
pub struct DrillOptions {
    /// Requests per phase.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
}

/// One request's outcome.
#[derive(Clone, Debug, Default)]
struct Outcome {
    /// Chat: the text streamed; weights: how they were loaded.
    text: String,
    /// Embeddings: the vectors, flattened.
    values: Vec<f32>,
    /// Work done: tokens, embedded inputs or loads.
    units: u64,
    error: Option<String>,
    recoveries: Vec<(&'static str, Option<Duration>)>,
    /// Attempts the client repeated (HTTP drivers).
    retries: u32,
}

struct Phase {
    outcomes: Vec<Outcome>,
    elapsed: Duration,
}

impl Phase {
    fn units_per_s(&self) -> f64 {
        let units: u64 = self.outcomes.iter().map(|o| o.units).sum();
        units as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The requests that meet a kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Driver {
    /// Streaming chat on the serving path, below HTTP.
    Chat,
    /// The same through the drill cluster's frontend, to its workers over the request plane.
    ClusterChat,
    /// The same over HTTP.
    HttpChat,
    /// `/v1/embeddings` over HTTP.
    Embeddings,
    /// Weights loads through the memory service.
    Weights,
}

impl Driver {
    fn of(kind: FaultKind) -> Driver {
        match kind {
            FaultKind::HttpPanic => Driver::HttpChat,
            FaultKind::EmbeddingsPanic => Driver::Embeddings,
            FaultKind::MemoryServicePanic => Driver::Weights,
            FaultKind::RequestPlanePanic => Driver::ClusterChat,
            _ => Driver::Chat,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Driver::Chat => "streaming chat, in-process",
            Driver::ClusterChat => "streaming chat, frontend to workers",
            Driver::HttpChat => "streaming chat over HTTP",
            Driver::Embeddings => "embeddings over HTTP",
            Driver::Weights => "weights loads through the memory service",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Driver::Chat | Driver::ClusterChat | Driver::HttpChat => "tokens",
            Driver::Embeddings => "vectors",
            Driver::Weights => "loads",
        }
    }

    /// Whether its output can be compared with the reference: chat text only from a deterministic
    /// engine.
    fn compared(self, deterministic: bool) -> bool {
        deterministic || matches!(self, Driver::Embeddings | Driver::Weights)
    }

    fn needs_http(self) -> bool {
        matches!(self, Driver::HttpChat | Driver::Embeddings)
    }

    /// Requests per phase: a weights load copies the whole model, so those phases are shorter.
    fn requests(self, options: &DrillOptions) -> usize {
        match self {
            Driver::Weights => options.requests.div_ceil(20).max(8),
            _ => options.requests,
        }
    }

    fn request(self, target: Arc<Target>, i: usize) -> impl Future<Output = Outcome> + 'static {
        async move {
            match self {
                Driver::Chat => requests::chat(&target.service, &target.model, i).await,
                Driver::ClusterChat => match &target.cluster {
                    Some(cluster) => requests::chat(&cluster.frontend, &target.model, i).await,
                    None => Outcome {
                        error: Some("the drill's cluster is not running".into()),
                        ..Outcome::default()
                    },
                },
                Driver::HttpChat => requests::chat_http(&target, i).await,
                Driver::Embeddings => requests::embeddings(&target, i).await,
                Driver::Weights => requests::weights(&target, i).await,
            }
        }
    }
}

/// `requests` of `driver`, `concurrency` at a time.
async fn phase(target: &Arc<Target>, driver: Driver, options: &DrillOptions) -> Phase {
    let started = Instant::now();
    let total = driver.requests(options);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..options.concurrency.clamp(1, total))
        .map(|_| {
            let (target, next) = (target.clone(), next.clone());
            actix_rt::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i == total {
                        // The tail: fewer and fewer requests run while faults keep coming at the same
                        // rate, until the last one standing takes them all. Faults cover the steady
                        // state only.
                        for service in target.faulted(driver) {
                            service.faults.set_enabled(false);
                        }
                    }
                    if i >= total {
                        return done;
                    }
                    done.push((i, driver.request(target.clone(), i).await));
                }
            })
        })
        .collect();
    let mut outcomes = vec![Outcome::default(); total];
    for worker in workers {
        for (i, outcome) in worker.await.unwrap_or_default() {
            outcomes[i] = outcome;
        }
    }
    Phase {
        outcomes,
        elapsed: started.elapsed(),
    }
}

/// Why a drill of `config` cannot inject `kind`, if it cannot.
fn unreachable(kind: FaultKind, config: &Config) -> Option<&'static str> {
    match kind {
        FaultKind::IndexerPanic
            if !(config.router.mode == RouterMode::Kv
                && config.router.use_kv_events
                && config.engine.kind == EngineKind::Mocker) =>
        {
            Some("needs router.mode = \"kv\" with mocker engines (the indexer applies their KV events); see configs/fault-drill-kv.toml")
        }
        FaultKind::EmbeddingsPanic if !config.embeddings.enabled => Some(
            "needs embeddings.enabled = true (the drill then sends /v1/embeddings requests)",
        ),
        FaultKind::MemoryServicePanic
            if !(config.engine.kind == EngineKind::Model && config.model_engine.gms_serve) =>
        {
            Some("needs engine.kind = \"model\" with model_engine.gms_serve = true (the drill then loads the weights through it as restarting engines do); see configs/fault-drill-memory.toml")
        }
        _ => None,
    }
}

/// Runs one phase with random faults of `kind` only.
async fn drill_kind(
    target: &Arc<Target>,
    options: &DrillOptions,
    reference: &Phase,
    kind: FaultKind,
) -> KindReport {
    let driver = Driver::of(kind);
    let services = target.faulted(driver);
    let actor = kind.actor();
    let restarts = || -> u64 {
        services
            .iter()
            .map(|s| s.metrics.actor_restarts(actor.as_str()))
            .sum()
    };
    let injected = || -> u64 {
        services
            .iter()
            .map(|s| s.faults.injected().get(&kind).copied().unwrap_or(0))
            .sum()
    };
    let (restarts_before, injected_before) = (restarts(), injected());
    let escalations_before = escalations(&services).await;
    for faults in services.iter().map(|s| &s.faults) {
        faults.restrict(Some(kind));
        faults.set_enabled(true);
    }
    let phase = phase(target, driver, options).await;
    for faults in services.iter().map(|s| &s.faults) {
        faults.set_enabled(false);
        faults.restrict(None);
    }
    // Let restart reports reach the supervisor.
    actix_rt::time::sleep(Duration::from_millis(100)).await;
    let (mut lost, mut extra, mut changed) = (0, 0, 0);
    for (want, got) in reference.outcomes.iter().zip(&phase.outcomes) {
        let (l, e, c) = difference(driver, want, got);
        lost += l;
        extra += e;
        changed += c;
    }
    let recoveries = phase.outcomes.iter().flat_map(|o| &o.recoveries);
    KindReport {
        kind,
        driver,
        reference_rate: reference.units_per_s(),
        injected: injected() - injected_before,
        restarts: restarts() - restarts_before,
        escalations: escalations(&services).await - escalations_before,
        migrations: recoveries.clone().count(),
        retries: phase.outcomes.iter().map(|o| u64::from(o.retries)).sum(),
        gaps: recoveries
            .filter_map(|(_, gap)| gap.map(|g| g.as_secs_f64() * 1e3))
            .collect(),
        failed: phase.outcomes.iter().filter(|o| o.error.is_some()).count(),
        lost,
        extra,
        changed,
        phase,
    }
}

/// Escalations in the roots' timelines so far.
async fn escalations(services: &[&RunningService]) -> usize {
    let mut total = 0;
    for service in services {
        total += service.snapshot().await.map_or(0, |s| {
            s.timeline.iter().filter(|e| e.event == "escalated").count()
        });
    }
    total
}

/// What the requests of `drivers` need: HTTP on a free port of the loopback, the weights' file.
fn prepare(config: &Config, drivers: &[Driver]) -> Result<(Config, Option<Weights>), RunError> {
    let mut config = config.clone();
    if drivers.iter().any(|d| d.needs_http()) {
        // The drill's own server: a free port, so it never meets a running dynamix.
        config.http.port = 0;
        config.http.host = "127.0.0.1".into();
    }
    let weights = match drivers.contains(&Driver::Weights) {
        true => Some(Weights {
            gguf: crate::model::model_file(&config)?,
            socket: crate::weights_socket(&config),
            lock_timeout: Duration::from_secs_f64(config.model_engine.gms_lock_timeout_secs),
        }),
        false => None,
    };
    Ok((config, weights))
}

/// Run the drill and print its report. Fails when the service cannot start.
pub async fn run(config: Config, options: DrillOptions) -> Result<bool, RunError> {
    let deterministic = matches!(
        config.engine.kind,
        EngineKind::Echo | EngineKind::EchoFull | EngineKind::EchoCore
    );
    let mut kinds = Vec::new();
    let mut skipped = Vec::new();
    for &kind in &config.faults.kinds {
        match unreachable(kind, &config) {
            Some(why) => skipped.push((kind.as_str(), why)),
            None => kinds.push(kind),
        }
    }
    let mut drivers: Vec<Driver> = kinds.iter().map(|&k| Driver::of(k)).collect();
    drivers.dedup();
    let (config, weights) = prepare(&config, &drivers)?;
    let needs_http = drivers.iter().any(|d| d.needs_http());
    let service = Arc::new(crate::start(&config, needs_http).await?);
    let target = Arc::new(Target {
        service: service.clone(),
        model: config.model.name.clone(),
        http: service.http_addrs.first().copied(),
        embeddings_model: config
            .embeddings
            .enabled
            .then(|| config.embeddings.model_name.clone()),
        weights,
        cluster: match drivers.contains(&Driver::ClusterChat) {
            true => Some(cluster::start(&config).await?),
            false => None,
        },
    });
    drop(service);
    let faults = target.service.faults.clone();
    println!(
        "drill: {} requests per phase, {} concurrent, {} engine(s) of kind {}, migration limit {}",
        options.requests,
        options.concurrency,
        target.service.engines.len(),
        config.engine.kind.as_str(),
        config.migration.limit
    );
    if target.cluster.is_some() {
        println!(
            "drill: its own etcd, NATS, {} workers (each as above) and a frontend, for the request plane (faults on the first worker)",
            cluster::WORKERS
        );
    }
    if !faults.is_enabled() {
        println!("drill: faults.enabled is false in this config: the fault phases inject nothing");
    }

    // One fault-free reference per kind of request.
    for service in target.all() {
        service.faults.set_enabled(false);
    }
    let mut references: HashMap<Driver, Phase> = HashMap::new();
    let mut reference_failed = 0;
    for &driver in &drivers {
        if references.contains_key(&driver) {
            continue;
        }
        // Untimed warm-up (first connections, page cache, lazy allocations) so the reference's
        // throughput is the steady state's.
        driver.request(target.clone(), 0).await;
        let reference = phase(&target, driver, &options).await;
        let failed = reference
            .outcomes
            .iter()
            .filter(|o| o.error.is_some())
            .count();
        reference_failed += failed;
        println!(
            "reference ({}, no faults): {} requests, {:.2} s, {:.0} {}/s, {failed} failed",
            driver.describe(),
            reference.outcomes.len(),
            reference.elapsed.as_secs_f64(),
            reference.units_per_s(),
            driver.unit()
        );
        if let Some(error) = reference.outcomes.iter().find_map(|o| o.error.as_ref()) {
            println!("  first failure: {error}");
        }
        references.insert(driver, reference);
    }

    // One phase per configured kind, so every number below belongs to one kind of fault.
    let mut reports = Vec::new();
    for &kind in &kinds {
        let reference = &references[&Driver::of(kind)];
        let report = drill_kind(&target, &options, reference, kind).await;
        println!(
            "phase {} ({}): {:.2} s, {:.0} {}/s",
            reports.len() + 1,
            kind.as_str(),
            report.phase.elapsed.as_secs_f64(),
            report.phase.units_per_s(),
            report.driver.unit()
        );
        let escalated = report.escalations > 0;
        reports.push(report);
        if escalated {
            println!("a failure escalated to the root: the process would stop here; drill ends");
            break;
        }
    }

    let clean = report::print(
        &mut reports,
        &skipped,
        reference_failed,
        deterministic,
        &config,
    );
    drop(reports);
    drop(references);
    if let Ok(target) = Arc::try_unwrap(target) {
        if let Some(cluster) = target.cluster {
            cluster.shutdown().await;
        }
        if let Ok(service) = Arc::try_unwrap(target.service) {
            service.shutdown().await;
        }
    }
    Ok(clean)
}

/// `dynamix drill`: exit 0 when nothing was lost, 1 when the report says FAIL, 2 for a bad config.
pub fn main(args: crate::cli::DrillArgs) -> std::process::ExitCode {
    let env = || std::env::vars().collect::<Vec<_>>();
    let overrides = crate::config::Overrides {
        verbosity: args.verbose,
        ..Default::default()
    };
    let config = match crate::config::load(args.config.as_deref(), &env, &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dynamix: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    crate::init_logging(&config.log);
    let options = crate::drill::DrillOptions {
        requests: args.requests as usize,
        concurrency: args.concurrency as usize,
    };
    match actix_rt::System::new().block_on(crate::drill::run(config, options)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("dynamix: {e}");
            std::process::ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_deterministic_and_varied() {
        use requests::message;
        assert_eq!(message(7), message(7));
        assert_ne!(message(7), message(8));
        for i in 0..50 {
            let n = message(i).chars().count();
            assert!((40..=175).contains(&n), "{n}");
        }
    }
}
