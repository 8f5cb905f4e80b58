//! `dynamix bench replay FILE`: a request trace in the Mooncake format (see [`super::trace`]) replayed
//! open loop against any OpenAI-compatible server: each request is sent at its timestamp (divided by
//! `--speedup`, or scaled to `--rate`) whatever the earlier ones are doing, as a streaming
//! `/v1/completions` request whose prompt is token ids, so that requests share exactly the prefixes
//! their hash ids share (a text prompt would be re-tokenized and chat-templated). `max_tokens` is the
//! record's output length, with `ignore_eos`, so the server generates what the trace says.
//!
//! Per request: TTFT (sent → first token frame), gaps between token frames (ITL) and latency. The
//! server's prefix-cache hit rate is read from its `/metrics` before and after (Dynamo's and dynamix's
//! `dynamo_frontend_cached_tokens` against `dynamo_frontend_input_sequence_tokens`), else from the
//! streams' `usage.prompt_tokens_details.cached_tokens`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::cpu;
use super::http::{Connection, HttpError};
use super::load::FrameClock;
use super::report::Spread;
use super::trace::{self, IdRange, TraceError, TraceRecord};
use super::{excerpt, fetch, first_model, reach, BenchError, Target};
use crate::cli::BenchReplayArgs;

/// Everything the requests share.
struct Plan {
    addr: SocketAddr,
    target: Target,
    model: String,
    timeout: Duration,
    /// Idle keep-alive connections and since when, reused by the next request to start.
    idle: Mutex<Vec<(Connection, Instant)>>,
}

/// What one request produced.
#[derive(Debug, Default)]
struct Outcome {
    ttft: Option<Duration>,
    latency: Option<Duration>,
    gaps: Vec<Duration>,
    output_frames: u64,
    /// `usage` of the stream, when the server sent one.
    prompt_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    /// How late it was sent against its schedule.
    lag: Duration,
    error: Option<String>,
    finished: Option<Instant>,
}

/// The stream chunk fields the replayer reads.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

/// An SSE body read as it arrives: frames with text are the tokens; a server that streams no text
/// (Dynamo's mocker sends token ids only) is timed by its frames with choices instead.
#[derive(Default)]
struct Sse {
    line: Vec<u8>,
    text: FrameClock,
    text_gaps: Vec<Duration>,
    choices: FrameClock,
    choice_gaps: Vec<Duration>,
    usage: Option<Usage>,
    done: bool,
    error: Option<String>,
}

impl Sse {
    fn feed(&mut self, mut piece: &[u8], now: Instant) {
        while let Some(end) = piece.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() {
                self.data(&piece[..end], now);
            } else {
                self.line.extend_from_slice(&piece[..end]);
                let line = std::mem::take(&mut self.line);
                self.data(&line, now);
                self.line = line;
                self.line.clear();
            }
            piece = &piece[end + 1..];
        }
        self.line.extend_from_slice(piece);
    }

    fn data(&mut self, line: &[u8], now: Instant) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        match serde_json::from_slice::<Chunk>(data) {
            Ok(chunk) if chunk.error.is_some() => {
                self.error
                    .get_or_insert_with(|| format!("stream error: {}", excerpt(data)));
            }
            Ok(chunk) => {
                if !chunk.choices.is_empty() {
                    self.choices.tick(now, &mut self.choice_gaps);
                    if chunk
                        .choices
                        .iter()
                        .any(|c| c.text.as_deref().is_some_and(|t| !t.is_empty()))
                    {
                        self.text.tick(now, &mut self.text_gaps);
                    }
                }
                if chunk.usage.is_some() {
                    self.usage = chunk.usage;
                }
            }
            Err(_) => {
                self.error
                    .get_or_insert_with(|| format!("malformed chunk: {}", excerpt(data)));
            }
        }
    }
}

/// The request for `record`, whole (head and body).
fn request_bytes(plan: &Plan, record: &TraceRecord, prompt: &[u32]) -> Vec<u8> {
    let body = serde_json::json!({
        "model": plan.model,
        "prompt": prompt,
        "max_tokens": record.output_length.max(1),
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    plan.target.request(
        "/completions",
        Some(body.as_bytes()),
        "text/event-stream",
        false,
    )
}

/// Idle connections older than this are closed rather than reused: servers close idle keep-alive
/// connections (actix after 5 s), and a request sent on one that is being closed is lost.
const MAX_IDLE: Duration = Duration::from_secs(2);

/// A connection to reuse: the most recently idle one that is young enough.
fn reuse(plan: &Plan) -> Option<Connection> {
    let mut idle = plan.idle.lock().ok()?;
    let now = Instant::now();
    idle.retain(|(_, since)| now - *since < MAX_IDLE);
    idle.pop().map(|(connection, _)| connection)
}

fn http_kind(e: HttpError) -> String {
    match e {
        HttpError::Closed => "closed".to_string(),
        HttpError::Io(e) => format!("io: {}", e.kind()),
        HttpError::Malformed(_) => "malformed HTTP".to_string(),
    }
}

/// Sends one request (on an idle connection, else a new one) and reads its stream. A reused
/// connection that turns out closed before any answer is replaced by a new one, once.
async fn send(
    plan: &Plan,
    request: Vec<u8>,
    output_length: u32,
    outcome: &mut Outcome,
) -> Result<(), String> {
    let started = Instant::now();
    let (mut connection, head) = loop {
        let (mut connection, reused) = match reuse(plan) {
            Some(connection) => (connection, true),
            None => (
                Connection::open(plan.addr)
                    .await
                    .map_err(|e| format!("connect: {}", e.kind()))?,
                false,
            ),
        };
        let answered = match connection.send(&request).await {
            Ok(()) => connection.read_head().await,
            Err(e) => Err(HttpError::Io(e)),
        };
        match answered {
            Ok(head) => break (connection, head),
            Err(_) if reused => continue,
            Err(e) => return Err(http_kind(e)),
        }
    };
    if head.status != 200 {
        let mut body = Vec::new();
        connection
            .read_body(&head, |piece| body.extend_from_slice(piece))
            .await
            .map_err(http_kind)?;
        return Err(format!("{}: {}", head.status, excerpt(&body)));
    }
    let mut sse = Sse::default();
    connection
        .read_body(&head, |piece| sse.feed(piece, Instant::now()))
        .await
        .map_err(http_kind)?;
    let finished = Instant::now();
    if connection.reusable() {
        if let Ok(mut idle) = plan.idle.lock() {
            idle.push((connection, finished));
        }
    }
    if let Some(error) = sse.error {
        return Err(error);
    }
    if !sse.done {
        return Err("stream ended without [DONE]".into());
    }
    let (frames, gaps) = if sse.text.count > 0 {
        (sse.text, sse.text_gaps)
    } else {
        (sse.choices, sse.choice_gaps)
    };
    // A stream that delivered a many-token answer in one frame (Dynamo's frontend holds back deltas
    // whose text is empty, as its mocker's are) shows no first token: no TTFT rather than a wrong one.
    if frames.count > 1 || output_length <= 1 {
        outcome.ttft = frames.first.map(|first| first - started);
    }
    outcome.gaps = gaps;
    outcome.output_frames = frames.count;
    outcome.latency = Some(finished - started);
    outcome.finished = Some(finished);
    if let Some(usage) = sse.usage {
        outcome.prompt_tokens = usage.prompt_tokens;
        outcome.cached_tokens = usage.prompt_tokens_details.and_then(|d| d.cached_tokens);
    }
    Ok(())
}

/// Σ of the `_sum` series of two histograms in a Prometheus exposition, over all their labels.
fn cache_sums(exposition: &str) -> Option<(f64, f64)> {
    let sum_of = |name: &str| -> Option<f64> {
        let mut total = None;
        for line in exposition.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                continue;
            }
            let value = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
            *total.get_or_insert(0.0) += value;
        }
        total
    };
    Some((
        sum_of("dynamo_frontend_cached_tokens_sum")?,
        sum_of("dynamo_frontend_input_sequence_tokens_sum")?,
    ))
}

/// The server's cached and input token sums, if it exposes them at /metrics.
async fn scrape(plan: &Plan) -> Option<(f64, f64)> {
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: {}\r\nAccept: text/plain\r\n\r\n",
        plan.target.authority
    );
    match fetch(plan.addr, request.as_bytes(), Duration::from_secs(10)).await {
        Ok((200, body)) => cache_sums(&String::from_utf8_lossy(&body)),
        _ => None,
    }
}

/// The replay's results.
struct Report {
    requests: usize,
    ok: usize,
    errors: BTreeMap<String, u64>,
    /// The first message of each error kind.
    first_errors: BTreeMap<String, String>,
    offered_rate: f64,
    duration: Duration,
    ttft: Spread,
    itl: Spread,
    latency: Spread,
    output_frames: u64,
    /// Successful requests whose first token could not be seen (all of it came in one frame).
    no_ttft: usize,
    hit_rate: Option<(f64, &'static str)>,
    max_lag: Duration,
    server_cpu_ms_per_req: Option<f64>,
}

impl Report {
    fn throughput(&self) -> f64 {
        self.ok as f64 / self.duration.as_secs_f64().max(1e-9)
    }

    fn text(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let mut out = format!(
            "requests        {} sent, {} ok, {} failed\n",
            self.requests,
            self.ok,
            self.requests - self.ok
        );
        out += &format!(
            "offered         {:.2} req/s; achieved {:.2} req/s, {:.0} output tokens/s over {:.1} s\n",
            self.offered_rate,
            self.throughput(),
            self.output_frames as f64 / self.duration.as_secs_f64().max(1e-9),
            self.duration.as_secs_f64()
        );
        out += &format!(
            "TTFT ms         p50 {}  p99 {}  mean {}\n",
            ms(self.ttft.p50),
            ms(self.ttft.p99),
            ms(self.ttft.mean)
        );
        if self.no_ttft > 0 {
            out += &format!(
                "                ({} requests streamed their whole answer in one frame: no TTFT)\n",
                self.no_ttft
            );
        }
        out += &format!(
            "ITL ms          p50 {}  p99 {}  mean {}\n",
            ms(self.itl.p50),
            ms(self.itl.p99),
            ms(self.itl.mean)
        );
        out += &format!(
            "latency ms      p50 {}  p99 {}  mean {}\n",
            ms(self.latency.p50),
            ms(self.latency.p99),
            ms(self.latency.mean)
        );
        out += &match self.hit_rate {
            Some((rate, source)) => format!("cache hit rate  {:.1}% ({source})\n", rate * 100.0),
            None => {
                "cache hit rate  n/a (no /metrics cached_tokens, no usage.prompt_tokens_details)\n"
                    .into()
            }
        };
        if let Some(cpu) = self.server_cpu_ms_per_req {
            out += &format!("server CPU      {cpu:.3} ms/req\n");
        }
        out += &format!(
            "send lag        max {:.1} ms behind schedule\n",
            self.max_lag.as_secs_f64() * 1e3
        );
        for (kind, count) in &self.errors {
            let first = self.first_errors.get(kind).map_or("", String::as_str);
            out += &format!("error           {count} × {kind} (first: {first})\n");
        }
        out
    }

    fn json(&self) -> String {
        let ms = |v: Option<f64>| v;
        serde_json::json!({
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "first_errors": self.first_errors,
            "offered_rps": self.offered_rate,
            "rps": self.throughput(),
            "output_tokens_per_s": self.output_frames as f64 / self.duration.as_secs_f64().max(1e-9),
            "duration_s": self.duration.as_secs_f64(),
            "ttft_p50_ms": ms(self.ttft.p50),
            "ttft_p99_ms": ms(self.ttft.p99),
            "ttft_mean_ms": ms(self.ttft.mean),
            "no_ttft": self.no_ttft,
            "itl_p50_ms": ms(self.itl.p50),
            "itl_p99_ms": ms(self.itl.p99),
            "latency_p50_ms": ms(self.latency.p50),
            "latency_p99_ms": ms(self.latency.p99),
            "cache_hit_rate": self.hit_rate.map(|(r, _)| r),
            "cache_hit_source": self.hit_rate.map(|(_, s)| s),
            "max_send_lag_ms": self.max_lag.as_secs_f64() * 1e3,
            "server_cpu_ms_per_req": self.server_cpu_ms_per_req,
        })
        .to_string()
    }
}

/// `--token-ids FIRST:COUNT`.
fn id_range(value: &str) -> Result<IdRange, BenchError> {
    let fail = || BenchError::Argument {
        flag: "token-ids",
        value: value.to_string(),
        reason: "expected FIRST:COUNT, two whole numbers with COUNT > 0 and FIRST + COUNT < 2^32",
    };
    let (first, count) = value.split_once(':').ok_or_else(fail)?;
    let first: u32 = first.trim().parse().map_err(|_| fail())?;
    let count: u32 = count.trim().parse().map_err(|_| fail())?;
    if count == 0 || first.checked_add(count).is_none() {
        return Err(fail());
    }
    Ok(IdRange { first, count })
}

/// The trace, cut as asked, and each request's send time from the start.
fn schedule(args: &BenchReplayArgs) -> Result<(Vec<TraceRecord>, Vec<Duration>, f64), BenchError> {
    let bad = |flag: &'static str, value: f64| BenchError::Argument {
        flag,
        value: value.to_string(),
        reason: "expected a number > 0",
    };
    let file = File::open(&args.file).map_err(|source| TraceError::Io {
        path: args.file.clone(),
        source,
    })?;
    let mut records = trace::read(&args.file, BufReader::new(file), args.block_tokens)?;
    if let Some(n) = args.max_requests {
        records.truncate(n);
    }
    if let Some(max) = args.max_input {
        for record in &mut records {
            if record.input_length > max {
                record.input_length = max;
                record.hash_ids.truncate(max.div_ceil(args.block_tokens));
            }
        }
    }
    let t0 = records.first().map_or(0.0, |r| r.timestamp);
    let span_ms = records.last().map_or(0.0, |r| r.timestamp) - t0;
    let speedup = match args.rate {
        Some(rate) if rate.is_finite() && rate > 0.0 => {
            if records.len() < 2 || span_ms <= 0.0 {
                1.0
            } else {
                // The trace's own mean rate, (n − 1) gaps over its span, made `rate`.
                let own = (records.len() - 1) as f64 / (span_ms / 1e3);
                rate / own
            }
        }
        Some(rate) => return Err(bad("rate", rate)),
        None if args.speedup.is_finite() && args.speedup > 0.0 => args.speedup,
        None => return Err(bad("speedup", args.speedup)),
    };
    let offsets = records
        .iter()
        .map(|r| Duration::from_secs_f64((r.timestamp - t0) / 1e3 / speedup))
        .collect::<Vec<_>>();
    let wall = offsets.last().map_or(0.0, Duration::as_secs_f64);
    let offered = if wall > 0.0 {
        (records.len() - 1) as f64 / wall
    } else {
        f64::INFINITY
    };
    Ok((records, offsets, offered))
}

async fn run(args: &BenchReplayArgs) -> Result<Report, BenchError> {
    let target = Target::parse(&args.url)?;
    let timeout = Duration::try_from_secs_f64(args.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or(BenchError::Seconds {
            flag: "timeout",
            value: args.timeout,
            range: "> 0",
        })?;
    let ids = id_range(&args.token_ids)?;
    let (records, offsets, offered_rate) = schedule(args)?;
    let addr = reach(&target, &args.pids).await?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => first_model(&target, addr, timeout).await?,
    };
    let plan = Arc::new(Plan {
        addr,
        target,
        model,
        timeout,
        idle: Mutex::new(Vec::new()),
    });
    // One small request first, so a wrong model or a server that refuses token prompts is one clear
    // error rather than a run of failures.
    let probe = TraceRecord {
        timestamp: 0.0,
        input_length: 4,
        output_length: 1,
        hash_ids: Vec::new(),
    };
    let mut probe_outcome = Outcome::default();
    let check = request_bytes(
        &plan,
        &probe,
        &trace::prompt_tokens(&probe, usize::MAX, 1, ids),
    );
    tokio::time::timeout(timeout, send(&plan, check, 1, &mut probe_outcome))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
        .map_err(|reason| BenchError::Check {
            request: format!("POST {}", plan.target.url("/completions")),
            reason,
        })?;
    let before = scrape(&plan).await;
    let cpu_before: Vec<Option<u64>> = args.pids.iter().map(|&p| cpu::ticks(p, false)).collect();
    eprintln!(
        "dynamix bench replay: {} requests at {offered_rate:.2} req/s over {:.1} s to {} (model {})",
        records.len(),
        offsets.last().map_or(0.0, Duration::as_secs_f64),
        plan.target.url("/completions"),
        plan.model,
    );
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(records.len());
    for (index, (record, offset)) in records.iter().zip(&offsets).enumerate() {
        let due = start + *offset;
        tokio::time::sleep_until(due).await;
        let lag = tokio::time::Instant::now().saturating_duration_since(due);
        let prompt = trace::prompt_tokens(record, index, args.block_tokens, ids);
        let request = request_bytes(&plan, record, &prompt);
        let output_length = record.output_length;
        let plan = plan.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcome = Outcome {
                lag,
                ..Outcome::default()
            };
            let result = tokio::time::timeout(
                plan.timeout,
                send(&plan, request, output_length, &mut outcome),
            )
            .await
            .unwrap_or_else(|_| Err("timeout".into()));
            if let Err(error) = result {
                outcome.error = Some(error);
            }
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(|e| Outcome {
            error: Some(format!("client task failed: {e}")),
            ..Outcome::default()
        }));
    }
    let cpu_after: Vec<Option<u64>> = args.pids.iter().map(|&p| cpu::ticks(p, false)).collect();
    let after = scrape(&plan).await;
    let last = outcomes
        .iter()
        .filter_map(|o| o.finished)
        .max()
        .unwrap_or_else(Instant::now);
    let duration = last.saturating_duration_since(start.into_std());
    let mut errors = BTreeMap::new();
    let mut first_errors = BTreeMap::new();
    let (mut ttfts, mut gaps, mut latencies) = (Vec::new(), Vec::new(), Vec::new());
    let (mut frames, mut usage_prompt, mut usage_cached, mut usage_seen) = (0, 0, 0, false);
    let mut max_lag = Duration::ZERO;
    for outcome in &outcomes {
        max_lag = max_lag.max(outcome.lag);
        if let Some(error) = &outcome.error {
            // Errors by kind: the status or failure, without the body's details.
            let kind = error.split(':').next().unwrap_or(error).to_string();
            *errors.entry(kind.clone()).or_insert(0) += 1;
            first_errors.entry(kind).or_insert_with(|| error.clone());
            continue;
        }
        ttfts.extend(outcome.ttft);
        latencies.extend(outcome.latency);
        gaps.extend_from_slice(&outcome.gaps);
        frames += outcome.output_frames;
        if let (Some(prompt), Some(cached)) = (outcome.prompt_tokens, outcome.cached_tokens) {
            usage_prompt += prompt;
            usage_cached += cached;
            usage_seen = true;
        }
    }
    let ok = latencies.len();
    let no_ttft = ok - ttfts.len();
    let hit_rate = match (before, after) {
        (Some((c0, i0)), Some((c1, i1))) if i1 > i0 => {
            Some(((c1 - c0) / (i1 - i0), "server /metrics"))
        }
        _ if usage_seen && usage_prompt > 0 => Some((
            usage_cached as f64 / usage_prompt as f64,
            "usage.prompt_tokens_details",
        )),
        _ => None,
    };
    let ticks = cpu::TICKS_PER_SECOND;
    let server_cpu_ms_per_req = (!args.pids.is_empty() && ok > 0)
        .then(|| {
            let used: Option<u64> = cpu_before
                .iter()
                .zip(&cpu_after)
                .map(|(b, a)| Some(a.as_ref()?.saturating_sub(*b.as_ref()?)))
                .sum();
            used.map(|t| t as f64 * 1e3 / ticks / ok as f64)
        })
        .flatten();
    Ok(Report {
        requests: outcomes.len(),
        ok,
        errors,
        first_errors,
        offered_rate,
        duration,
        ttft: Spread::of(ttfts),
        itl: Spread::of(gaps),
        latency: Spread::of(latencies),
        output_frames: frames,
        no_ttft,
        hit_rate,
        max_lag,
        server_cpu_ms_per_req,
    })
}

/// `dynamix bench replay`: exit status 0 when every request succeeded, 1 when some failed or the
/// server could not be reached, 2 for bad arguments.
pub fn main(args: BenchReplayArgs) -> ExitCode {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)
        .and_then(|runtime| runtime.block_on(run(&args)));
    match result {
        Ok(report) => {
            if args.json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text());
            }
            if report.ok < report.requests {
                eprintln!(
                    "dynamix bench replay: {} of {} requests failed",
                    report.requests - report.ok,
                    report.requests
                );
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dynamix bench replay: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_frames_usage_and_errors() {
        let now = Instant::now();
        let mut sse = Sse::default();
        let body = b"data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[{\"te";
        sse.feed(body, now);
        sse.feed(b"xt\":\"b\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\ndata: [DONE]\n\n", now + Duration::from_millis(5));
        assert!(sse.done && sse.error.is_none());
        assert_eq!(sse.text.count, 2);
        assert_eq!(sse.text_gaps, [Duration::from_millis(5)]);
        let usage = sse.usage.expect("usage");
        assert_eq!(usage.prompt_tokens, Some(10));
        assert_eq!(
            usage.prompt_tokens_details.and_then(|d| d.cached_tokens),
            Some(8)
        );
        let mut sse = Sse::default();
        sse.feed(b"data: {\"error\":{\"message\":\"x\"}}\r\n", now);
        assert!(sse.error.expect("error").starts_with("stream error"));
        let mut sse = Sse::default();
        sse.feed(b"data: {nope\n", now);
        assert!(sse.error.expect("error").starts_with("malformed chunk"));
    }

    #[test]
    fn cache_sums_add_up_every_label_set() {
        let exposition = "# HELP x\ndynamo_frontend_cached_tokens_sum{model=\"a\"} 100\ndynamo_frontend_cached_tokens_sum{model=\"b\"} 50\ndynamo_frontend_cached_tokens_count{model=\"a\"} 3\ndynamo_frontend_input_sequence_tokens_sum{model=\"a\"} 300\ndynamo_frontend_input_sequence_tokens_sum_other 7\n";
        assert_eq!(cache_sums(exposition), Some((150.0, 300.0)));
        assert_eq!(cache_sums("dynamo_frontend_cached_tokens_sum 1\n"), None);
    }

    #[test]
    fn token_id_ranges() {
        let range = id_range("5:10").expect("valid");
        assert_eq!((range.first, range.count), (5, 10));
        for bad in ["5", "a:1", "1:0", "4294967295:2", "-1:3"] {
            assert!(id_range(bad).is_err(), "{bad}");
        }
    }
}
