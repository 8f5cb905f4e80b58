//! Per-request accounting: a [`RequestGuard`] is created when a handler accepts a request and
//! records everything about it (start counters, token timings, final status) until it is dropped,
//! so every exit path — success, error, panic, client hang-up — is counted exactly once. This is
//! the hot path: the guard holds pre-resolved label children and does no map lookups per token.

use std::sync::Arc;
use std::time::Instant;

use super::error_type;
use super::frontend::{FrontendMetrics, ModelSeries};

/// API surface a request arrived on, the `endpoint` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/v1/chat/completions` → `chat_completions`.
    ChatCompletions,
    /// `/v1/completions` → `completions`.
    Completions,
    /// `/v1/responses` → `responses`.
    Responses,
    /// `/v1/embeddings` → `embeddings`.
    Embeddings,
}

impl Endpoint {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// Whether the response is streamed, the `request_type` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestType {
    /// Server-sent events → `stream`.
    Stream,
    /// One JSON body → `unary`.
    Unary,
}

impl RequestType {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestType::Stream => "stream",
            RequestType::Unary => "unary",
        }
    }
}

/// What the request has been marked as so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Nothing recorded: counted as `error` / `internal`, so an unexpected exit is never a success.
    Unmarked,
    Success,
    Error(&'static str),
}

/// RAII accounting for one request; see [`FrontendMetrics::request_guard`].
///
/// Dropping it counts `requests_total{status, error_type}`, observes `request_duration_seconds`
/// and `output_sequence_tokens`, and lowers `inflight_requests`, `active_requests` and (if no
/// token arrived) `queued_requests`.
pub struct RequestGuard {
    metrics: Arc<FrontendMetrics>,
    series: Arc<ModelSeries>,
    endpoint: Endpoint,
    request_type: RequestType,
    started_at: Instant,
    /// When the previous token-bearing chunk arrived; `None` until the first token.
    last_token_at: Option<Instant>,
    output_tokens: u64,
    /// Still counted in `queued_requests` (no token yet).
    queued: bool,
    cached_tokens_observed: bool,
    /// Set by [`RequestGuard::client_disconnected`]; pins the outcome to `cancelled`.
    cancelled: bool,
    outcome: Outcome,
}

impl RequestGuard {
    pub(super) fn start(
        metrics: Arc<FrontendMetrics>,
        series: Arc<ModelSeries>,
        endpoint: Endpoint,
        request_type: RequestType,
    ) -> Self {
        series.inflight.inc();
        series.active.inc();
        series.queued.inc();
        RequestGuard {
            metrics,
            series,
            endpoint,
            request_type,
            started_at: Instant::now(),
            last_token_at: None,
            output_tokens: 0,
            queued: true,
            cached_tokens_observed: false,
            cancelled: false,
            outcome: Outcome::Unmarked,
        }
    }

    /// Marks the request successful (`status="success"`, `error_type=""`). Ignored after
    /// [`RequestGuard::client_disconnected`]: a killed request stays `cancelled`.
    pub fn mark_success(&mut self) {
        if !self.cancelled {
            self.outcome = Outcome::Success;
        }
    }

    /// Marks the request failed with an `error_type` label (see [`super::error_type`]); the last
    /// mark wins, except that a client disconnect stays `cancelled`.
    pub fn mark_error(&mut self, error_type: &'static str) {
        if !self.cancelled {
            self.outcome = Outcome::Error(error_type);
        }
    }

    /// Records one response chunk carrying `new_output_tokens` tokens; chunks without tokens are
    /// ignored (they neither end the queue phase nor split inter-token intervals).
    ///
    /// The first token-bearing chunk observes time-to-first-token and the input length
    /// (`input_tokens`) and leaves the queue. Later chunks observe the time since the previous
    /// chunk divided by their token count, once per token. Every chunk adds to
    /// `output_tokens_total` immediately.
    pub fn observe_tokens(&mut self, input_tokens: usize, new_output_tokens: usize) {
        if new_output_tokens == 0 {
            return;
        }
        let now = Instant::now();
        let metrics = &*self.metrics;
        let tokens = new_output_tokens as u64;
        self.series.output_tokens(metrics).inc_by(tokens);
        self.output_tokens = self.output_tokens.saturating_add(tokens);
        match self.last_token_at {
            None => {
                let ttft = now.duration_since(self.started_at).as_secs_f64();
                self.series.time_to_first_token(metrics).observe(ttft);
                self.series
                    .input_sequence_tokens(metrics)
                    .observe(input_tokens as f64);
                self.leave_queue();
            }
            Some(previous) => {
                let per_token =
                    now.duration_since(previous).as_secs_f64() / new_output_tokens as f64;
                let itl = self.series.inter_token_latency(metrics);
                for _ in 0..new_output_tokens {
                    itl.observe(per_token);
                }
            }
        }
        self.last_token_at = Some(now);
    }

    /// Records the prefix-cache hit tokens of this request; only the first call counts.
    pub fn observe_cached_tokens(&mut self, cached_tokens: usize) {
        if !self.cached_tokens_observed {
            self.cached_tokens_observed = true;
            self.series
                .cached_tokens(&self.metrics)
                .observe(cached_tokens as f64);
        }
    }

    /// Records that the client went away: `disconnected_clients` and `model_cancellation_total`
    /// go up (once per guard, however often this is called) and the request ends as
    /// `error` / `cancelled` whatever else it is marked with.
    pub fn client_disconnected(&mut self) {
        if self.cancelled {
            return;
        }
        self.cancelled = true;
        self.outcome = Outcome::Error(error_type::CANCELLED);
        self.metrics.disconnected_clients.inc();
        self.metrics
            .model_cancellation_total
            .with_label_values(&[
                &self.series.model,
                self.endpoint.as_str(),
                self.request_type.as_str(),
            ])
            .inc();
    }

    /// Total output tokens recorded so far.
    pub fn output_tokens(&self) -> u64 {
        self.output_tokens
    }

    fn leave_queue(&mut self) {
        if self.queued {
            self.queued = false;
            self.series.queued.dec();
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let error_type = match self.outcome {
            Outcome::Success => None,
            Outcome::Error(error_type) => Some(error_type),
            Outcome::Unmarked => Some(error_type::INTERNAL),
        };
        match error_type {
            None => self
                .series
                .succeeded(&self.metrics, self.endpoint, self.request_type)
                .inc(),
            Some(error_type) => self
                .metrics
                .requests_total
                .with_label_values(&[
                    &self.series.model,
                    self.endpoint.as_str(),
                    self.request_type.as_str(),
                    "error",
                    error_type,
                ])
                .inc(),
        }
        self.series
            .request_duration
            .observe(self.started_at.elapsed().as_secs_f64());
        self.series
            .output_sequence_tokens
            .observe(self.output_tokens as f64);
        self.series.inflight.dec();
        self.series.active.dec();
        self.leave_queue();
    }
}

impl std::fmt::Debug for RequestGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestGuard")
            .field("model", &self.series.model)
            .field("endpoint", &self.endpoint)
            .field("request_type", &self.request_type)
            .field("output_tokens", &self.output_tokens)
            .field("queued", &self.queued)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}
