//! The result of a run, as a table for people or one JSON line for scripts. The JSON keys follow
//! ../shared/peer_bench/load.py's (`rps`, `p50_ms`, `ttft_p50_ms`, `cpu_ms_per_req`, ...) so the
//! two can be compared and tabulated together.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use serde_json::json;

use super::cpu::TICKS_PER_SECOND;
use super::load::{CpuSnapshot, Measured};

/// A percentile as load.py takes it: the sample at `q`% of the sorted list, rounded to the nearest
/// (ties to even, as Python's `round`).
fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    let index = ((q / 100.0) * last as f64).round_ties_even() as usize;
    sorted.get(index.min(last)).copied()
}

/// p50, p99 and mean of `samples`, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Spread {
    pub(super) p50: Option<f64>,
    pub(super) p99: Option<f64>,
    pub(super) mean: Option<f64>,
}

impl Spread {
    pub(super) fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mean = (!samples.is_empty())
            .then(|| ms(samples.iter().sum::<Duration>()) / samples.len() as f64);
        Spread {
            p50: percentile(&samples, 50.0).map(ms),
            p99: percentile(&samples, 99.0).map(ms),
            mean,
        }
    }
}

/// What the run was.
pub(super) struct Setup {
    /// The chat completions URL.
    pub(super) url: String,
    /// The model asked for.
    pub(super) model: String,
    /// `unary` or `stream`, `+close` with a connection per request.
    pub(super) mode: String,
    pub(super) concurrency: u32,
    pub(super) duration: Duration,
    pub(super) warmup: Duration,
    pub(super) max_tokens: u32,
    /// Tokens in the prompt's text, when a tokenizer counted them.
    pub(super) prompt_tokens: Option<usize>,
    /// `tokenizer` or `chunks`, and the sentence saying which.
    pub(super) token_method: &'static str,
    pub(super) token_note: String,
    /// Server processes charged.
    pub(super) pids: Vec<u32>,
    /// 1-minute load average before the run.
    pub(super) load_before: Option<f64>,
}

/// The numbers.
pub(super) struct Report {
    setup: Setup,
    /// Successful requests in the window.
    pub(super) requests: usize,
    rps: f64,
    latency: Spread,
    ttft: Spread,
    itl: Spread,
    output_tokens: u64,
    errors: BTreeMap<String, u64>,
    /// Server CPU ms per request, per --pid (`None` when the process went away).
    server_cpu: Vec<Option<f64>>,
    client_cpu: Option<f64>,
}

/// CPU milliseconds per request between two tick counts.
fn ms_per_request(start: Option<u64>, end: Option<u64>, requests: usize) -> Option<f64> {
    let ticks = end?.checked_sub(start?)?;
    (requests > 0).then(|| ticks as f64 * 1e3 / TICKS_PER_SECOND / requests as f64)
}

impl Report {
    /// Summarise a run.
    pub(super) fn new(setup: Setup, measured: Measured) -> Self {
        let Measured {
            samples,
            cpu_start,
            cpu_end,
        } = measured;
        let requests = samples.latencies.len();
        let CpuSnapshot {
            servers: start,
            client: client_start,
        } = cpu_start;
        let server_cpu = start
            .iter()
            .zip(&cpu_end.servers)
            .map(|(&s, &e)| ms_per_request(s, e, requests))
            .collect();
        Report {
            rps: requests as f64 / setup.duration.as_secs_f64(),
            requests,
            latency: Spread::of(samples.latencies),
            ttft: Spread::of(samples.ttfts),
            itl: Spread::of(samples.gaps),
            output_tokens: samples.output_tokens,
            errors: samples.errors,
            server_cpu,
            client_cpu: ms_per_request(client_start, cpu_end.client, requests),
            setup,
        }
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn tokens_per_s(&self) -> f64 {
        self.output_tokens as f64 / self.setup.duration.as_secs_f64()
    }

    /// Sum of the server processes' CPU per request (`None` without --pid).
    fn server_cpu_total(&self) -> Option<f64> {
        (!self.server_cpu.is_empty()).then(|| self.server_cpu.iter().flatten().sum())
    }

    /// One JSON object.
    pub(super) fn json(&self) -> serde_json::Value {
        let round = |x: f64, places: i32| {
            let scale = 10f64.powi(places);
            (x * scale).round() / scale
        };
        let ms = |x: Option<f64>| x.map(|v| round(v, 3));
        let s = &self.setup;
        let by_pid: serde_json::Map<String, serde_json::Value> = s
            .pids
            .iter()
            .zip(&self.server_cpu)
            .map(|(pid, cpu)| (pid.to_string(), json!(ms(*cpu))))
            .collect();
        json!({
            "url": s.url,
            "model": s.model,
            "mode": s.mode,
            "client": "dynamix",
            "concurrency": s.concurrency,
            "duration_s": s.duration.as_secs_f64(),
            "warmup_s": s.warmup.as_secs_f64(),
            "max_tokens": s.max_tokens,
            "prompt_tokens": s.prompt_tokens,
            "requests": self.requests,
            "rps": round(self.rps, 1),
            "p50_ms": ms(self.latency.p50),
            "p99_ms": ms(self.latency.p99),
            "ttft_p50_ms": ms(self.ttft.p50),
            "ttft_p99_ms": ms(self.ttft.p99),
            "itl_p50_ms": ms(self.itl.p50),
            "itl_p99_ms": ms(self.itl.p99),
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.tokens_per_s(), 1),
            "tokens_counted_by": s.token_method,
            "errors": self.error_count(),
            "error_kinds": self.errors,
            "cpu_ms_per_req": ms(self.server_cpu_total()),
            "cpu_ms_per_req_by_pid": by_pid,
            "client_cpu_ms_per_req": ms(self.client_cpu),
            "load1_before": s.load_before.map(|l| round(l, 2)),
        })
    }

    /// The table.
    pub(super) fn text(&self) -> String {
        let s = &self.setup;
        let ms = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2} ms"));
        let mut out = String::new();
        let _ = writeln!(out, "POST {}  model {}", s.url, s.model);
        let prompt = s
            .prompt_tokens
            .map_or(String::new(), |n| format!(", prompt {n} tokens"));
        let _ = writeln!(
            out,
            "{}, {} clients, {:.1} s measured after {:.1} s warm-up, max_tokens {}{prompt}",
            s.mode,
            s.concurrency,
            s.duration.as_secs_f64(),
            s.warmup.as_secs_f64(),
            s.max_tokens,
        );
        let _ = writeln!(out, "output tokens counted as {}", s.token_note);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<14}{} ok, {} failed",
            "requests",
            self.requests,
            self.error_count()
        );
        let _ = writeln!(
            out,
            "{:<14}{:.1} req/s, {:.1} output tokens/s",
            "throughput",
            self.rps,
            self.tokens_per_s()
        );
        for (name, spread) in [
            ("latency", self.latency),
            ("TTFT", self.ttft),
            ("ITL", self.itl),
        ] {
            let _ = writeln!(
                out,
                "{name:<14}p50 {:<12} p99 {}",
                ms(spread.p50),
                ms(spread.p99)
            );
        }
        if let Some(total) = self.server_cpu_total() {
            let each: Vec<String> = s
                .pids
                .iter()
                .zip(&self.server_cpu)
                .map(|(pid, cpu)| match cpu {
                    Some(v) => format!("pid {pid}: {v:.3}"),
                    None => format!("pid {pid}: gone"),
                })
                .collect();
            let _ = writeln!(
                out,
                "{:<14}{total:.3} ms/req ({})",
                "server CPU",
                each.join(", ")
            );
        }
        if let Some(client) = self.client_cpu {
            let _ = writeln!(out, "{:<14}{client:.3} ms/req", "client CPU");
        }
        if !self.errors.is_empty() {
            let kinds: Vec<String> = self
                .errors
                .iter()
                .map(|(kind, n)| format!("{kind}: {n}"))
                .collect();
            let _ = writeln!(out, "{:<14}{}", "errors", kinds.join(", "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_round_to_the_nearest_sample_like_load_py() {
        let samples: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), Some(Duration::from_millis(5)));
        assert_eq!(percentile(&samples, 99.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(ms_per_request(Some(100), Some(150), 250), Some(2.0));
        assert_eq!(ms_per_request(Some(100), None, 250), None);
        assert_eq!(ms_per_request(Some(100), Some(150), 0), None);
    }
}
