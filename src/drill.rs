//! `dynamix drill`: supervisor-driven fault testing. Starts the configured service in-process, sends the
//! same deterministic set of concurrent streaming chat requests twice — once with fault injection off
//! (the reference), once with it on (`[faults]`: random faults on a timer and/or per output) — and
//! prints a report: requests sent/completed/failed, faults injected per kind, restarts per actor,
//! migrations, tokens lost or duplicated against the reference, the recovery gap (last token before a
//! failure → first token after it) p50/p99 per cause, and throughput with vs without faults.
//!
//! The comparison needs a deterministic engine (`echo`/`echo_full`/`echo_core`); with another engine the
//! drill still runs and reports, but says that token comparison is meaningless.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamix_actors::engine::EngineKind;
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
        println!("drill: faults.enabled is false in this config: the second phase injects nothing");
    }

    faults.set_enabled(false);
    let reference = phase(&service, &model, &options).await;
    println!(
        "phase 1 (no faults): {:.2} s, {:.0} tokens/s",
        reference.elapsed.as_secs_f64(),
        reference.tokens_per_s()
    );

    let restarts_before: BTreeMap<&str, u64> = ["engine", "router", "validator"]
        .into_iter()
        .map(|a| (a, service.metrics.actor_restarts(a)))
        .collect();
    let injected_before = faults.injected();
    faults.set_enabled(true);
    let faulted = phase(&service, &model, &options).await;
    faults.set_enabled(false);
    // Let restart reports reach the supervisor.
    actix_rt::time::sleep(Duration::from_millis(100)).await;
    println!(
        "phase 2 (faults):    {:.2} s, {:.0} tokens/s",
        faulted.elapsed.as_secs_f64(),
        faulted.tokens_per_s()
    );

    let failed: Vec<(usize, &String)> = faulted
        .outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.error.as_ref().map(|e| (i, e)))
        .collect();
    let reference_failed = reference
        .outcomes
        .iter()
        .filter(|o| o.error.is_some())
        .count();
    let (mut lost, mut extra, mut changed) = (0, 0, 0);
    for (want, got) in reference.outcomes.iter().zip(&faulted.outcomes) {
        let (l, e, c) = compare(&want.text, &got.text);
        lost += l;
        extra += e;
        changed += c;
    }
    let mut gaps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut migrations = 0;
    for outcome in &faulted.outcomes {
        for (cause, gap) in &outcome.recoveries {
            migrations += 1;
            if let Some(gap) = gap {
                gaps.entry(cause).or_default().push(gap.as_secs_f64() * 1e3);
            }
        }
    }

    println!(
        "\nrequests: sent {}, completed {}, failed {} (reference run: {} failed)",
        options.requests,
        options.requests - failed.len(),
        failed.len(),
        reference_failed
    );
    for (i, error) in failed.iter().take(5) {
        println!("  request {i} failed: {error}");
    }
    let injected: Vec<String> = faults
        .injected()
        .into_iter()
        .map(|(kind, n)| (kind, n - injected_before.get(&kind).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .map(|(kind, n)| format!("{} {n}", kind.as_str()))
        .collect();
    println!(
        "faults injected: {}",
        if injected.is_empty() {
            "none".to_string()
        } else {
            injected.join(", ")
        }
    );
    let restarts: Vec<String> = restarts_before
        .iter()
        .map(|(actor, before)| {
            format!("{actor} {}", service.metrics.actor_restarts(actor) - before)
        })
        .collect();
    println!("restarts: {}", restarts.join(", "));
    println!("migrations that recovered a stream: {migrations}");
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
    let mut all: Vec<f64> = gaps.values().flatten().copied().collect();
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    println!(
        "recovery gap, all: n={} p50 {} p99 {}",
        all.len(),
        fmt(percentile(&mut all, 50.0)),
        fmt(percentile(&mut all, 99.0))
    );
    for (cause, values) in &mut gaps {
        println!(
            "recovery gap, {cause}: n={} p50 {} p99 {}",
            values.len(),
            fmt(percentile(values, 50.0)),
            fmt(percentile(values, 99.0))
        );
    }
    println!(
        "throughput with faults / without: {:.2}",
        faulted.tokens_per_s() / reference.tokens_per_s().max(1e-9)
    );
    let clean = failed.is_empty() && (!deterministic || lost + extra + changed == 0);
    println!(
        "result: {}",
        if clean {
            "PASS (no lost requests, no lost or duplicated tokens)"
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
    crate::init_logging(&config.log.filter);
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
