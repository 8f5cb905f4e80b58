//! `dynamix drill`: supervisor-driven fault testing. Starts the configured service in-process and sends
//! the same deterministic set of concurrent streaming chat requests once with fault injection off (the
//! reference), then once per kind in `faults.kinds` with random faults of that kind only (on the
//! `every_ms` timer and/or per output). For each kind it reports the faults injected, the restarts of
//! the actor it hits, escalations to the root, migrations, failed requests, tokens lost or duplicated
//! against the reference, the recovery gap (last token before a failure → first token after it)
//! p50/p99, and throughput with vs without the fault; then the kinds and actors it could not reach
//! and why.
//!
//! The comparison needs a deterministic engine (`echo`/`echo_full`/`echo_core`); with another engine the
//! drill still runs and reports, but says that token comparison is meaningless.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamix_actors::engine::EngineKind;
use dynamix_actors::faults::FaultKind;
use dynamix_actors::router::RouterMode;
use dynamix_actors::supervision::ActorKind;
use dynamix_actors::supervisor::RunningService;
use dynamix_actors::validator::{ChatInput, RequestContext, ValidateChat};
use serde_json::json;

use crate::config::Config;
use crate::RunError;

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
    text: String,
    tokens: u64,
    error: Option<String>,
    recoveries: Vec<(&'static str, Option<Duration>)>,
}

struct Phase {
    outcomes: Vec<Outcome>,
    elapsed: Duration,
}

impl Phase {
    fn tokens(&self) -> u64 {
        self.outcomes.iter().map(|o| o.tokens).sum()
    }

    fn tokens_per_s(&self) -> f64 {
        self.tokens() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The user message of drill request `i`: deterministic, 40–160 characters, some of them non-ASCII.
fn message(i: usize) -> String {
    const WORDS: [&str; 12] = [
        "supervisor",
        "restart",
        "migration",
        "token",
        "stream",
        "engine",
        "router",
        "café",
        "naïve",
        "fault",
        "drill",
        "résumé",
    ];
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut text = format!("drill request {i}:");
    let target = 40 + (state % 121) as usize;
    while text.chars().count() < target {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push(' ');
        text.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
    }
    text
}

async fn one(service: &RunningService, model: &str, i: usize) -> Outcome {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": message(i)}],
        "stream": true,
    });
    let mut outcome = Outcome::default();
    let validated = match service
        .gateway
        .validate_chat(ValidateChat {
            input: ChatInput::Body(body.to_string().into()),
            context: RequestContext {
                request_id: uuid::Uuid::new_v4().to_string(),
                pinned_engine: None,
            },
        })
        .await
    {
        Ok(v) => v,
        Err(e) => {
            outcome.error = Some(format!("validation: {}", e.message));
            return outcome;
        }
    };
    let mut generation = match service.gateway.generate(&validated).await {
        Ok(g) => g,
        Err(e) => {
            outcome.error = Some(format!("routing: {}", e.message));
            return outcome;
        }
    };
    while let Some(item) = generation.next().await {
        match item {
            Ok(delta) => {
                outcome.text.push_str(&delta.delta.text);
                outcome.tokens += u64::from(delta.delta.tokens);
            }
            Err(e) => {
                outcome.error = Some(e.message);
                break;
            }
        }
    }
    outcome.recoveries = generation
        .recoveries()
        .into_iter()
        .map(|r| (r.cause, r.gap))
        .collect();
    outcome
}

async fn phase(service: &Arc<RunningService>, model: &str, options: &DrillOptions) -> Phase {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..options.concurrency.max(1))
        .map(|_| {
            let (service, model, next) = (service.clone(), model.to_string(), next.clone());
            let total = options.requests;
            actix_rt::spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i == total {
                        // The tail: fewer and fewer requests run while faults keep coming at the same
                        // rate, until the last one standing takes them all. Faults cover the steady
                        // state only.
                        service.faults.set_enabled(false);
                    }
                    if i >= total {
                        return done;
                    }
                    done.push((i, one(&service, &model, i).await));
                }
            })
        })
        .collect();
    let mut outcomes = vec![Outcome::default(); options.requests];
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

fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    Some(values[rank.min(values.len() - 1)])
}

/// Characters lost, duplicated (extra) and changed in `got` against `want` (per-character tokens).
fn compare(want: &str, got: &str) -> (u64, u64, u64) {
    let (want, got): (Vec<char>, Vec<char>) = (want.chars().collect(), got.chars().collect());
    let changed = want.iter().zip(&got).filter(|(a, b)| a != b).count() as u64;
    let lost = want.len().saturating_sub(got.len()) as u64;
    let extra = got.len().saturating_sub(want.len()) as u64;
    (lost, extra, changed)
}

/// Why a drill of `config` cannot inject `kind`, if it cannot.
fn unreachable(kind: FaultKind, config: &Config) -> Option<&'static str> {
    match kind {
        FaultKind::IndexerPanic
            if !(config.router.mode == RouterMode::Kv
                && config.router.use_kv_events
                && config.engine.kind == EngineKind::Mocker) =>
        {
            Some("needs router.mode = \"kv\" with mocker engines (the indexer applies their KV events)")
        }
        FaultKind::HttpPanic => Some(
            "the drill drives the serving path below HTTP; tests/faults.rs panics HTTP handlers",
        ),
        FaultKind::EmbeddingsPanic => Some(
            "the drill sends chat requests; tests/embeddings.rs panics the embedding engine",
        ),
        FaultKind::MemoryServicePanic => Some(
            "engines talk to the memory service at load and restart, not per chat; gms::in_process tests panic it",
        ),
        _ => None,
    }
}

/// The actors no fault kind reaches yet, and where their failures are exercised instead.
const NOT_INJECTED: &[(ActorKind, &str)] = &[(
    ActorKind::RequestPlane,
    "a worker process's; tests/distributed.rs kills workers mid-stream",
)];

/// What one phase with faults of one kind did, against the fault-free reference.
struct KindReport {
    kind: FaultKind,
    phase: Phase,
    injected: u64,
    restarts: u64,
    escalations: usize,
    migrations: usize,
    failed: usize,
    lost: u64,
    extra: u64,
    changed: u64,
    gaps: Vec<f64>,
}

/// Runs one phase with random faults of `kind` only.
async fn drill_kind(
    service: &Arc<RunningService>,
    model: &str,
    options: &DrillOptions,
    reference: &Phase,
    kind: FaultKind,
) -> KindReport {
    let faults = &service.faults;
    let actor = kind.actor();
    let restarts_before = service.metrics.actor_restarts(actor.as_str());
    let escalations_before = escalations(service).await;
    let injected_before = faults.injected().get(&kind).copied().unwrap_or(0);
    faults.restrict(Some(kind));
    faults.set_enabled(true);
    let phase = phase(service, model, options).await;
    faults.set_enabled(false);
    faults.restrict(None);
    // Let restart reports reach the supervisor.
    actix_rt::time::sleep(Duration::from_millis(100)).await;
    let (mut lost, mut extra, mut changed) = (0, 0, 0);
    for (want, got) in reference.outcomes.iter().zip(&phase.outcomes) {
        let (l, e, c) = compare(&want.text, &got.text);
        lost += l;
        extra += e;
        changed += c;
    }
    let recoveries = phase.outcomes.iter().flat_map(|o| &o.recoveries);
    KindReport {
        kind,
        injected: faults.injected().get(&kind).copied().unwrap_or(0) - injected_before,
        restarts: service.metrics.actor_restarts(actor.as_str()) - restarts_before,
        escalations: escalations(service).await - escalations_before,
        migrations: recoveries.clone().count(),
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

/// Escalations in the root's timeline so far.
async fn escalations(service: &RunningService) -> usize {
    service.snapshot().await.map_or(0, |s| {
        s.timeline.iter().filter(|e| e.event == "escalated").count()
    })
}

/// Run the drill and print its report. Fails when the service cannot start.
pub async fn run(config: Config, options: DrillOptions) -> Result<bool, RunError> {
    let deterministic = matches!(
        config.engine.kind,
        EngineKind::Echo | EngineKind::EchoFull | EngineKind::EchoCore
    );
    let model = config.model.name.clone();
    let service = Arc::new(crate::start(&config, false).await?);
    let faults = service.faults.clone();
    println!(
        "drill: {} requests per phase, {} concurrent, {} engine(s) of kind {}, migration limit {}",
        options.requests,
        options.concurrency,
        service.engines.len(),
        config.engine.kind.as_str(),
        config.migration.limit
    );
    if !faults.is_enabled() {
        println!("drill: faults.enabled is false in this config: the fault phases inject nothing");
    }

    faults.set_enabled(false);
    let reference = phase(&service, &model, &options).await;
    let reference_failed = reference
        .outcomes
        .iter()
        .filter(|o| o.error.is_some())
        .count();
    println!(
        "phase 0 (no faults): {:.2} s, {:.0} tokens/s, {reference_failed} failed",
        reference.elapsed.as_secs_f64(),
        reference.tokens_per_s()
    );

    // One phase per configured kind, so every number below belongs to one kind of fault.
    let mut reports = Vec::new();
    let mut skipped = Vec::new();
    for &kind in &config.faults.kinds {
        if let Some(why) = unreachable(kind, &config) {
            skipped.push((kind.as_str(), why));
            continue;
        }
        let report = drill_kind(&service, &model, &options, &reference, kind).await;
        println!(
            "phase {} ({}): {:.2} s, {:.0} tokens/s",
            reports.len() + 1,
            kind.as_str(),
            report.phase.elapsed.as_secs_f64(),
            report.phase.tokens_per_s()
        );
        let escalated = report.escalations > 0;
        reports.push(report);
        if escalated {
            println!("a failure escalated to the root: the process would stop here; drill ends");
            break;
        }
    }

    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "\n{:<20} {:>8} {:>8} {:>11} {:>10} {:>6} {:>6} {:>10} {:>8} {:>8} {:>10}",
        "fault",
        "injected",
        "restarts",
        "escalations",
        "migrations",
        "failed",
        "lost",
        "duplicated",
        "gap p50",
        "gap p99",
        "throughput"
    );
    for r in &mut reports {
        let (lost, extra) = match deterministic {
            true => (r.lost.to_string(), r.extra.to_string()),
            false => ("-".into(), "-".into()),
        };
        println!(
            "{:<20} {:>8} {:>8} {:>11} {:>10} {:>6} {:>6} {:>10} {:>8} {:>8} {:>10.2}",
            r.kind.as_str(),
            r.injected,
            r.restarts,
            r.escalations,
            r.migrations,
            r.failed,
            lost,
            extra,
            fmt(percentile(&mut r.gaps, 50.0)),
            fmt(percentile(&mut r.gaps, 99.0)),
            r.phase.tokens_per_s() / reference.tokens_per_s().max(1e-9)
        );
    }
    println!("(gaps in ms, from the last token before a failure to the first after it; throughput = tokens/s with the fault / without)");
    for (kind, why) in &skipped {
        println!("{kind:<20} not injected: {why}");
    }
    for (actor, why) in NOT_INJECTED {
        println!("{:<20} not injected: {why}", actor.as_str());
    }

    let sent = options.requests * reports.len();
    let failed: Vec<(FaultKind, usize, &String)> = reports
        .iter()
        .flat_map(|r| {
            r.phase
                .outcomes
                .iter()
                .enumerate()
                .filter_map(move |(i, o)| o.error.as_ref().map(|e| (r.kind, i, e)))
        })
        .collect();
    println!(
        "\nall fault phases: requests sent {sent}, completed {}, failed {} (reference run: {reference_failed} failed)",
        sent - failed.len(),
        failed.len(),
    );
    for (kind, i, error) in failed.iter().take(5) {
        println!("  {} request {i} failed: {error}", kind.as_str());
    }
    let injected: Vec<String> = reports
        .iter()
        .filter(|r| r.injected > 0)
        .map(|r| format!("{} {}", r.kind.as_str(), r.injected))
        .collect();
    println!(
        "faults injected: {}",
        if injected.is_empty() {
            "none".to_string()
        } else {
            injected.join(", ")
        }
    );
    let (lost, extra, changed) = reports.iter().fold((0, 0, 0), |(l, e, c), r| {
        (l + r.lost, e + r.extra, c + r.changed)
    });
    if deterministic {
        println!(
            "tokens vs the fault-free run: lost {lost}, duplicated {extra}, changed {changed}"
        );
    } else {
        println!(
            "tokens vs the fault-free run: not compared (engine {} is not deterministic)",
            config.engine.kind.as_str()
        );
    }
    let mut all: Vec<f64> = reports
        .iter()
        .flat_map(|r| r.gaps.iter().copied())
        .collect();
    println!(
        "recovery gap, all: n={} p50 {} ms p99 {} ms",
        all.len(),
        fmt(percentile(&mut all, 50.0)),
        fmt(percentile(&mut all, 99.0))
    );
    let escalated = reports.iter().any(|r| r.escalations > 0);
    let clean = failed.is_empty() && !escalated && (!deterministic || lost + extra + changed == 0);
    println!(
        "result: {}",
        if clean {
            "PASS (no lost requests, no lost or duplicated tokens, no escalation)"
        } else {
            "FAIL"
        }
    );
    if let Ok(service) = Arc::try_unwrap(service) {
        service.shutdown().await;
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
        assert_eq!(message(7), message(7));
        assert_ne!(message(7), message(8));
        for i in 0..50 {
            let n = message(i).chars().count();
            assert!((40..=175).contains(&n), "{n}");
        }
    }

    #[test]
    fn comparison_counts_lost_extra_and_changed() {
        assert_eq!(compare("abcd", "abcd"), (0, 0, 0));
        assert_eq!(compare("abcd", "ab"), (2, 0, 0));
        assert_eq!(compare("abcd", "abccd"), (0, 1, 1));
        assert_eq!(compare("héllo", "hello"), (0, 0, 1));
    }
}
