//! The drill's report: the per-kind table, what could not be reached, and the totals; and how a
//! phase's output is compared with the fault-free reference.

use dynamix_actors::faults::FaultKind;

use super::{Driver, Outcome, Phase};
use crate::config::Config;

/// What one phase with faults of one kind did, against the fault-free reference.
pub(super) struct KindReport {
    pub(super) kind: FaultKind,
    pub(super) driver: Driver,
    pub(super) phase: Phase,
    /// The reference's throughput.
    pub(super) reference_rate: f64,
    pub(super) injected: u64,
    pub(super) restarts: u64,
    pub(super) escalations: usize,
    pub(super) migrations: usize,
    pub(super) retries: u64,
    pub(super) failed: usize,
    pub(super) lost: u64,
    pub(super) extra: u64,
    pub(super) changed: u64,
    pub(super) gaps: Vec<f64>,
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

/// Vectors lost, extra and changed (beyond float noise from other batch shapes) in `got` against
/// `want`, both flattened with `dimensions` values per vector.
fn compare_vectors(want: &[f32], got: &[f32], dimensions: usize) -> (u64, u64, u64) {
    let dimensions = dimensions.max(1);
    let (want_n, got_n) = (want.len() / dimensions, got.len() / dimensions);
    let changed = want
        .chunks(dimensions)
        .zip(got.chunks(dimensions))
        .filter(|(a, b)| a.iter().zip(*b).any(|(x, y)| (x - y).abs() > 1e-3))
        .count() as u64;
    (
        want_n.saturating_sub(got_n) as u64,
        got_n.saturating_sub(want_n) as u64,
        changed,
    )
}

/// Lost, extra and changed units of one outcome against its reference.
pub(super) fn difference(driver: Driver, want: &Outcome, got: &Outcome) -> (u64, u64, u64) {
    match driver {
        Driver::Chat | Driver::ClusterChat | Driver::HttpChat | Driver::Weights => {
            compare(&want.text, &got.text)
        }
        Driver::Embeddings => {
            let dimensions = want.values.len() / want.units.max(1) as usize;
            compare_vectors(&want.values, &got.values, dimensions)
        }
    }
}

/// Print the table and the totals; true when nothing was lost, duplicated or escalated.
pub(super) fn print(
    reports: &mut [KindReport],
    skipped: &[(&str, &str)],
    reference_failed: usize,
    deterministic: bool,
    config: &Config,
) -> bool {
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "\n{:<20} {:>8} {:>8} {:>11} {:>10} {:>6} {:>6} {:>10} {:>8} {:>8} {:>10} {:>7}  requests",
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
        "throughput",
        "retries"
    );
    for r in reports.iter_mut() {
        let (lost, extra) = match r.driver.compared(deterministic) {
            true => (r.lost.to_string(), r.extra.to_string()),
            false => ("-".into(), "-".into()),
        };
        println!(
            "{:<20} {:>8} {:>8} {:>11} {:>10} {:>6} {:>6} {:>10} {:>8} {:>8} {:>10.2} {:>7}  {}",
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
            r.phase.units_per_s() / r.reference_rate.max(1e-9),
            r.retries,
            r.driver.describe()
        );
    }
    println!("(lost and duplicated count tokens, vectors or loads as the requests go; gaps in ms, from the last token before a failure to the first after it; throughput = work/s with the fault / without; retries = attempts the client repeated, as the openai SDK does)");
    for (kind, why) in skipped {
        println!("{kind:<20} not injected: {why}");
    }

    let sent: usize = reports.iter().map(|r| r.phase.outcomes.len()).sum();
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
        "\nall fault phases: requests sent {sent}, completed {}, failed {} (reference runs: {reference_failed} failed)",
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
    let compared = |r: &&KindReport| r.driver.compared(deterministic);
    let (lost, extra, changed) = reports
        .iter()
        .filter(compared)
        .fold((0, 0, 0), |(l, e, c), r| {
            (l + r.lost, e + r.extra, c + r.changed)
        });
    if deterministic {
        println!(
            "output vs the fault-free run: lost {lost}, duplicated {extra}, changed {changed}"
        );
    } else {
        println!(
            "output vs the fault-free run: lost {lost}, duplicated {extra}, changed {changed} (chat text not compared: engine {} is not deterministic)",
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
    let clean = failed.is_empty() && !escalated && lost + extra + changed == 0;
    println!(
        "result: {}",
        if clean {
            "PASS (no lost requests, no lost or duplicated output, no escalation)"
        } else {
            "FAIL"
        }
    );
    clean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_counts_lost_extra_and_changed() {
        assert_eq!(compare("abcd", "abcd"), (0, 0, 0));
        assert_eq!(compare("abcd", "ab"), (2, 0, 0));
        assert_eq!(compare("abcd", "abccd"), (0, 1, 1));
        assert_eq!(compare("héllo", "hello"), (0, 0, 1));
    }

    #[test]
    fn vectors_compare_with_a_tolerance() {
        let want = [0.5, 0.25, 1.0, 0.0];
        assert_eq!(
            compare_vectors(&want, &[0.5001, 0.25, 1.0, 0.0], 2),
            (0, 0, 0)
        );
        assert_eq!(compare_vectors(&want, &[0.5, 0.3, 1.0, 0.0], 2), (0, 0, 1));
        assert_eq!(compare_vectors(&want, &[0.5, 0.25], 2), (1, 0, 0));
        assert_eq!(compare_vectors(&want, &[], 2), (2, 0, 0));
    }
}
