//! The closed loop: each client keeps one connection and sends its next request as soon as the
//! previous one ended, from the start of the warm-up until the end of the measured window; only
//! requests *started* inside the window are counted (those still running at its end finish and
//! count, as in load.py). A failed request drops its connection and the client pauses 10 ms, so a
//! dead server is not spun on.
//!
//! Per request: latency (request sent → answer complete), TTFT (→ first token frame), ITL (gaps
//! between token frames) and output tokens. A token frame is an SSE chunk with content; a stream
//! without any content (Dynamo's mocker sends token ids only) uses its chunks with choices instead.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::cpu;
use super::http::{Connection, HttpError};
use super::tokens::TokenCounter;
use crate::cli::BenchMode;

/// What every client sends and how it reads the answers.
pub(super) struct Plan {
    /// The server.
    pub(super) addr: SocketAddr,
    /// The whole HTTP request (head and body), sent as is every time.
    pub(super) request: Vec<u8>,
    /// Unary or streaming.
    pub(super) mode: BenchMode,
    /// A new connection per request.
    pub(super) close: bool,
    /// Longest a request may take.
    pub(super) timeout: Duration,
    /// How output tokens are counted.
    pub(super) counter: Arc<TokenCounter>,
}

/// The measured window.
#[derive(Clone, Copy, Debug)]
pub(super) struct Window {
    /// Requests started from here on are counted.
    pub(super) start: Instant,
    /// No request starts after this.
    pub(super) end: Instant,
}

/// What the counted requests produced.
#[derive(Debug, Default)]
pub(super) struct Samples {
    /// Latency of each successful request.
    pub(super) latencies: Vec<Duration>,
    /// Time to the first token frame (streaming).
    pub(super) ttfts: Vec<Duration>,
    /// Gaps between token frames (streaming).
    pub(super) gaps: Vec<Duration>,
    /// Output tokens of the successful requests.
    pub(super) output_tokens: u64,
    /// Failed requests by kind.
    pub(super) errors: BTreeMap<String, u64>,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.ttfts.extend(other.ttfts);
        self.gaps.extend(other.gaps);
        self.output_tokens += other.output_tokens;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }
}

/// CPU ticks at one instant.
#[derive(Clone, Debug)]
pub(super) struct CpuSnapshot {
    /// Each server process's (`None`: gone).
    pub(super) servers: Vec<Option<u64>>,
    /// This process's.
    pub(super) client: Option<u64>,
}

impl CpuSnapshot {
    fn take(pids: &[u32], children: bool) -> Self {
        CpuSnapshot {
            servers: pids.iter().map(|&pid| cpu::ticks(pid, children)).collect(),
            client: cpu::own_ticks(),
        }
    }
}

/// The outcome of a run.
pub(super) struct Measured {
    /// The counted requests.
    pub(super) samples: Samples,
    /// CPU at the start of the window.
    pub(super) cpu_start: CpuSnapshot,
    /// CPU after the last request.
    pub(super) cpu_end: CpuSnapshot,
}

/// Run `concurrency` clients through `warmup` and the measured `duration`.
pub(super) async fn run(
    plan: Arc<Plan>,
    concurrency: u32,
    warmup: Duration,
    duration: Duration,
    pids: Vec<u32>,
    children: bool,
) -> Measured {
    let now = Instant::now();
    let window = Window {
        start: now + warmup,
        end: now + warmup + duration,
    };
    let snapshot_pids = pids.clone();
    let cpu_start = tokio::spawn(async move {
        tokio::time::sleep_until(window.start.into()).await;
        CpuSnapshot::take(&snapshot_pids, children)
    });
    let clients: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(client(plan.clone(), window)))
        .collect();
    let mut samples = Samples::default();
    for handle in clients {
        match handle.await {
            Ok(client_samples) => samples.merge(client_samples),
            Err(_) => *samples.errors.entry("client panicked".into()).or_default() += 1,
        }
    }
    let cpu_end = CpuSnapshot::take(&pids, children);
    let cpu_start = cpu_start.await.unwrap_or_else(|_| CpuSnapshot {
        servers: vec![None; pids.len()],
        client: None,
    });
    Measured {
        samples,
        cpu_start,
        cpu_end,
    }
}

/// Why a request failed, as the report groups them.
#[derive(Debug)]
enum Failure {
    /// The connection could not be opened.
    Connect,
    /// The exchange failed below HTTP.
    Http(HttpError),
    /// A status other than 200.
    Status(u16),
    /// A 200 whose body is not a complete answer (no `[DONE]`, no choices, bad JSON).
    Incomplete,
    /// The stream carried an error event.
    StreamError,
    /// No complete answer within the timeout.
    Timeout,
}

impl Failure {
    fn kind(&self) -> String {
        match self {
            Failure::Connect => "connect".into(),
            Failure::Http(HttpError::Closed) => "closed".into(),
            Failure::Http(HttpError::Io(e)) => format!("io: {}", e.kind()),
            Failure::Http(HttpError::Malformed(_)) => "malformed".into(),
            Failure::Status(status) => status.to_string(),
            Failure::Incomplete => "incomplete".into(),
            Failure::StreamError => "stream error".into(),
            Failure::Timeout => "timeout".into(),
        }
    }
}

impl From<HttpError> for Failure {
    fn from(e: HttpError) -> Self {
        Failure::Http(e)
    }
}

/// Buffers one client reuses across its requests.
#[derive(Default)]
struct Scratch {
    /// An SSE line split across reads; the unary body.
    line: Vec<u8>,
    /// The answer's text (kept only when a tokenizer counts it).
    text: String,
    /// Gaps between content frames, and between frames with choices.
    content_gaps: Vec<Duration>,
    choice_gaps: Vec<Duration>,
}

/// One successful request.
struct Answer {
    /// When the answer was complete.
    finished: Instant,
    ttft: Option<Duration>,
    output_tokens: u64,
}

/// One client of the closed loop.
async fn client(plan: Arc<Plan>, window: Window) -> Samples {
    let mut samples = Samples::default();
    let mut connection = None;
    let mut scratch = Scratch::default();
    loop {
        let started = Instant::now();
        if started >= window.end {
            break;
        }
        let result = tokio::time::timeout(
            plan.timeout,
            exchange(&mut connection, &plan, &mut scratch, started),
        )
        .await
        .unwrap_or(Err(Failure::Timeout));
        let counted = started >= window.start;
        match result {
            Ok(answer) => {
                if counted {
                    samples.latencies.push(answer.finished - started);
                    samples.ttfts.extend(answer.ttft);
                    samples.output_tokens += answer.output_tokens;
                    let gaps = if scratch.content_gaps.is_empty() {
                        &scratch.choice_gaps
                    } else {
                        &scratch.content_gaps
                    };
                    samples.gaps.extend_from_slice(gaps);
                }
                if plan.close {
                    connection = None;
                }
            }
            Err(failure) => {
                if !matches!(failure, Failure::Status(_)) || plan.close {
                    connection = None;
                }
                if counted {
                    *samples.errors.entry(failure.kind()).or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    samples
}

/// Send the request on `connection` (opened first if needed) and read the whole answer.
async fn exchange(
    connection: &mut Option<Connection>,
    plan: &Plan,
    scratch: &mut Scratch,
    started: Instant,
) -> Result<Answer, Failure> {
    let connection = match connection {
        Some(open) if open.reusable() => open,
        _ => connection.insert(
            Connection::open(plan.addr)
                .await
                .map_err(|_| Failure::Connect)?,
        ),
    };
    connection
        .send(&plan.request)
        .await
        .map_err(HttpError::Io)?;
    let head = connection.read_head().await?;
    scratch.line.clear();
    scratch.text.clear();
    scratch.content_gaps.clear();
    scratch.choice_gaps.clear();
    if head.status != 200 {
        // Read the error body so the connection can carry the next request.
        connection.read_body(&head, |_| {}).await?;
        return Err(Failure::Status(head.status));
    }
    let keep_text = plan.counter.tokenizer().is_some();
    match plan.mode {
        BenchMode::Stream => {
            let mut stream = StreamReader::new(scratch, keep_text);
            connection
                .read_body(&head, |piece| stream.feed(piece, Instant::now()))
                .await?;
            let finished = Instant::now();
            let frames = stream.finish()?;
            Ok(Answer {
                finished,
                ttft: frames.first.map(|first| first - started),
                output_tokens: plan.counter.count(&scratch.text, frames.count),
            })
        }
        BenchMode::Unary => {
            let body = &mut scratch.line;
            connection
                .read_body(&head, |piece| body.extend_from_slice(piece))
                .await?;
            let finished = Instant::now();
            let completion: Completion =
                serde_json::from_slice(body).map_err(|_| Failure::Incomplete)?;
            let choice = completion.choices.first().ok_or(Failure::Incomplete)?;
            let text = choice
                .message
                .as_ref()
                .and_then(|m| m.content.as_deref())
                .or(choice.text.as_deref())
                .unwrap_or_default();
            let reported = completion
                .usage
                .and_then(|u| u.completion_tokens)
                .unwrap_or(0);
            Ok(Answer {
                finished,
                ttft: None,
                output_tokens: plan.counter.count(text, reported),
            })
        }
    }
}

/// A streamed chat completion chunk: only what the load generator looks at.
#[derive(Deserialize)]
struct StreamChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<StreamChoice<'a>>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct StreamChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    /// The completions API's text.
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

/// A unary chat completion: only what the load generator looks at.
#[derive(Deserialize)]
struct Completion<'a> {
    #[serde(default, borrow)]
    choices: Vec<UnaryChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct UnaryChoice<'a> {
    #[serde(default, borrow)]
    message: Option<Message<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// The token frames of a finished stream.
#[derive(Debug, PartialEq, Eq)]
struct Frames {
    /// When the first arrived.
    first: Option<Instant>,
    /// How many.
    count: u64,
}

/// Splits an SSE body into lines as it arrives and times its frames.
struct StreamReader<'s> {
    scratch: &'s mut Scratch,
    keep_text: bool,
    content: FrameClock,
    choices: FrameClock,
    done: bool,
    error: bool,
    malformed: bool,
}

/// Arrival times of one kind of frame.
#[derive(Default)]
pub(super) struct FrameClock {
    pub(super) first: Option<Instant>,
    last: Option<Instant>,
    pub(super) count: u64,
}

impl FrameClock {
    /// A frame arrived at `now`; the gap since the previous one goes to `gaps`.
    pub(super) fn tick(&mut self, now: Instant, gaps: &mut Vec<Duration>) {
        if let Some(last) = self.last {
            gaps.push(now - last);
        }
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.count += 1;
    }
}

impl<'s> StreamReader<'s> {
    fn new(scratch: &'s mut Scratch, keep_text: bool) -> Self {
        StreamReader {
            scratch,
            keep_text,
            content: FrameClock::default(),
            choices: FrameClock::default(),
            done: false,
            error: false,
            malformed: false,
        }
    }

    /// Take the next piece of the body, received at `now`.
    fn feed(&mut self, mut piece: &[u8], now: Instant) {
        while let Some(end) = piece.iter().position(|&b| b == b'\n') {
            let line = &piece[..end];
            if self.scratch.line.is_empty() {
                self.line(line, now);
            } else {
                let mut joined = std::mem::take(&mut self.scratch.line);
                joined.extend_from_slice(line);
                self.line(&joined, now);
                joined.clear();
                self.scratch.line = joined;
            }
            piece = &piece[end + 1..];
        }
        self.scratch.line.extend_from_slice(piece);
    }

    fn line(&mut self, line: &[u8], now: Instant) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(data) = line.strip_prefix(b"data:") {
            self.data(data.trim_ascii(), now);
        } else if line.strip_prefix(b"event:").map(<[u8]>::trim_ascii) == Some(b"error") {
            self.error = true;
        }
    }

    fn data(&mut self, data: &[u8], now: Instant) {
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<StreamChunk>(data) else {
            self.malformed = true;
            return;
        };
        if chunk.error.is_some() {
            self.error = true;
        }
        let Some(choice) = chunk.choices.first() else {
            return;
        };
        self.choices.tick(now, &mut self.scratch.choice_gaps);
        let content = choice
            .delta
            .as_ref()
            .and_then(|d| d.content.as_deref())
            .or(choice.text.as_deref())
            .unwrap_or_default();
        if !content.is_empty() {
            self.content.tick(now, &mut self.scratch.content_gaps);
            if self.keep_text {
                self.scratch.text.push_str(content);
            }
        }
    }

    /// The token frames, or why the stream is not a complete answer.
    fn finish(self) -> Result<Frames, Failure> {
        if self.error {
            return Err(Failure::StreamError);
        }
        if !self.done || self.malformed {
            return Err(Failure::Incomplete);
        }
        let clock = if self.content.count > 0 {
            self.content
        } else {
            self.choices
        };
        Ok(Frames {
            first: clock.first,
            count: clock.count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pieces: &[&[u8]]) -> (Result<Frames, Failure>, Scratch, Instant) {
        let mut scratch = Scratch::default();
        let t0 = Instant::now();
        let result = {
            let mut reader = StreamReader::new(&mut scratch, true);
            for (i, piece) in pieces.iter().enumerate() {
                reader.feed(piece, t0 + Duration::from_millis(i as u64));
            }
            reader.finish()
        };
        (result, scratch, t0)
    }

    #[test]
    fn frames_split_across_pieces_are_timed_when_complete() {
        let (frames, scratch, t0) = read(&[
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"He\"}}]}\n\ndata: {\"choi",
            b"ces\":[{\"delta\":{\"content\":\"llo\\n\"}}]}\r\n\r\n",
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            b"data: [DONE]\n\n",
        ]);
        assert_eq!(
            frames.expect("complete"),
            Frames {
                first: Some(t0),
                count: 2
            }
        );
        assert_eq!(scratch.text, "Hello\n");
        assert_eq!(scratch.content_gaps, [Duration::from_millis(1)]);
        assert_eq!(scratch.choice_gaps.len(), 2);
    }

    #[test]
    fn streams_without_text_count_their_choices() {
        let (frames, _, t0) = read(&[
            b"data: {\"choices\":[{\"delta\":{}}]}\n\n",
            b"data: {\"choices\":[{\"delta\":{}}]}\n\ndata: [DONE]\n\n",
        ]);
        assert_eq!(
            frames.expect("complete"),
            Frames {
                first: Some(t0),
                count: 2
            }
        );
    }

    #[test]
    fn errors_and_cut_streams_fail() {
        let (result, _, _) = read(&[b"event: error\ndata: {\"error\":{\"message\":\"x\"}}\n\n"]);
        assert!(matches!(result, Err(Failure::StreamError)));
        let (result, _, _) = read(&[b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"]);
        assert!(matches!(result, Err(Failure::Incomplete)), "no [DONE]");
        let (result, _, _) = read(&[b"data: {nope\n\ndata: [DONE]\n\n"]);
        assert!(matches!(result, Err(Failure::Incomplete)), "bad JSON");
    }
}
