//! [`FrontendMetrics`]: the frontend's Prometheus registry and every metric of spec §1.7 that the
//! frontend itself records. Each instance owns its registry (never the process-global one) so that
//! several servers in one test process keep separate counts. Per-model label children used on the
//! request hot path are resolved once per model and cached, so starting a request costs one map
//! lookup instead of one per metric.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use prometheus::core::{MetricVec, MetricVecBuilder};
use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry,
    TextEncoder,
};

use super::buckets::{HistogramConfig, HistogramKind};
use super::guard::{Endpoint, RequestGuard, RequestType};
use super::labels::{MediaKind, MigrationOutcome, MigrationType, ModelGauges, RouterPhase};
use super::prefix::sanitize_prefix;
use super::registrar::Registrar;
use super::MetricsError;

/// Fixed buckets of `tokenizer_latency_ms`.
const TOKENIZER_LATENCY_MS_BUCKETS: [f64; 11] = [
    0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
];
/// Fixed buckets of `model_migration_duration_seconds`.
const MIGRATION_DURATION_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
];
/// Fixed buckets of the media-parts-per-request histograms.
const MEDIA_PER_REQUEST_BUCKETS: [f64; 16] = [
    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 20.0, 30.0, 40.0, 50.0, 100.0,
];
/// How many models' label children are cached. Beyond this (a cardinality guard upstream should
/// prevent it) requests still count correctly, they just resolve their children uncached.
const MAX_CACHED_MODELS: usize = 1024;

/// The label children of one model that requests touch, resolved once per model and shared by
/// all its requests. Children every request uses are resolved eagerly; the ones only some
/// requests reach are resolved on first use, so that (as upstream) a series appears in the
/// exposition only once something was observed in it.
pub(super) struct ModelSeries {
    pub(super) model: String,
    pub(super) inflight: IntGauge,
    pub(super) active: IntGauge,
    pub(super) queued: IntGauge,
    pub(super) request_duration: Histogram,
    pub(super) output_sequence_tokens: Histogram,
    input_sequence_tokens: OnceLock<Histogram>,
    cached_tokens: OnceLock<Histogram>,
    output_tokens: OnceLock<IntCounter>,
    time_to_first_token: OnceLock<Histogram>,
    inter_token_latency: OnceLock<Histogram>,
    /// `requests_started_total` per endpoint and request type ([`ModelSeries::slot`]), resolved on
    /// first use: a label lookup hashes every label value.
    started: [OnceLock<IntCounter>; SLOTS],
    /// `requests_total{status="success"}` likewise (failures are rare and look theirs up).
    succeeded: [OnceLock<IntCounter>; SLOTS],
}

/// Endpoints × request types.
const SLOTS: usize = 8;

impl ModelSeries {
    fn new(metrics: &FrontendMetrics, model: &str) -> Self {
        let labels = &[model];
        ModelSeries {
            model: model.to_string(),
            inflight: metrics.inflight_requests.with_label_values(labels),
            active: metrics.active_requests.with_label_values(labels),
            queued: metrics.queued_requests.with_label_values(labels),
            request_duration: metrics.request_duration.with_label_values(labels),
            output_sequence_tokens: metrics.output_sequence_tokens.with_label_values(labels),
            input_sequence_tokens: OnceLock::new(),
            cached_tokens: OnceLock::new(),
            output_tokens: OnceLock::new(),
            time_to_first_token: OnceLock::new(),
            inter_token_latency: OnceLock::new(),
            started: Default::default(),
            succeeded: Default::default(),
        }
    }

    fn slot(endpoint: Endpoint, request_type: RequestType) -> usize {
        let endpoint = match endpoint {
            Endpoint::ChatCompletions => 0,
            Endpoint::Completions => 1,
            Endpoint::Responses => 2,
            Endpoint::Embeddings => 3,
        };
        endpoint * 2 + usize::from(request_type == RequestType::Unary)
    }

    /// The `requests_started_total` child of this model, `endpoint` and `request_type`.
    fn started(
        &self,
        metrics: &FrontendMetrics,
        endpoint: Endpoint,
        request_type: RequestType,
    ) -> &IntCounter {
        self.started[Self::slot(endpoint, request_type)].get_or_init(|| {
            metrics.requests_started_total.with_label_values(&[
                self.model.as_str(),
                endpoint.as_str(),
                request_type.as_str(),
            ])
        })
    }

    /// The `requests_total{status="success"}` child of this model, `endpoint` and `request_type`.
    pub(super) fn succeeded(
        &self,
        metrics: &FrontendMetrics,
        endpoint: Endpoint,
        request_type: RequestType,
    ) -> &IntCounter {
        self.succeeded[Self::slot(endpoint, request_type)].get_or_init(|| {
            metrics.requests_total.with_label_values(&[
                self.model.as_str(),
                endpoint.as_str(),
                request_type.as_str(),
                "success",
                super::error_type::SUCCESS,
            ])
        })
    }

    fn child<'a, B: MetricVecBuilder>(
        &self,
        cell: &'a OnceLock<B::M>,
        vec: &MetricVec<B>,
    ) -> &'a B::M {
        cell.get_or_init(|| vec.with_label_values(&[self.model.as_str()]))
    }

    pub(super) fn input_sequence_tokens(&self, metrics: &FrontendMetrics) -> &Histogram {
        self.child(&self.input_sequence_tokens, &metrics.input_sequence_tokens)
    }

    pub(super) fn cached_tokens(&self, metrics: &FrontendMetrics) -> &Histogram {
        self.child(&self.cached_tokens, &metrics.cached_tokens)
    }

    pub(super) fn output_tokens(&self, metrics: &FrontendMetrics) -> &IntCounter {
        self.child(&self.output_tokens, &metrics.output_tokens_total)
    }

    pub(super) fn time_to_first_token(&self, metrics: &FrontendMetrics) -> &Histogram {
        self.child(&self.time_to_first_token, &metrics.time_to_first_token)
    }

    pub(super) fn inter_token_latency(&self, metrics: &FrontendMetrics) -> &Histogram {
        self.child(&self.inter_token_latency, &metrics.inter_token_latency)
    }
}

/// Labels of the per-worker router gauges.
const WORKER_LABELS: &[&str] = &["worker_id", "dp_rank", "worker_type"];

/// Buckets of the router overhead histograms, in milliseconds.
const ROUTER_OVERHEAD_BUCKETS_MS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0,
];

/// The frontend's metrics: an owned registry plus handles to every metric in it.
///
/// Shared as `Arc<FrontendMetrics>`; recording is lock-free apart from a read lock on the
/// per-model cache when a request starts.
pub struct FrontendMetrics {
    registry: Registry,
    prefix: String,
    histogram_configs: HashMap<HistogramKind, HistogramConfig>,
    pub(super) requests_total: IntCounterVec,
    requests_started_total: IntCounterVec,
    inflight_requests: IntGaugeVec,
    active_requests: IntGaugeVec,
    queued_requests: IntGaugeVec,
    pub(super) disconnected_clients: IntGauge,
    request_duration: HistogramVec,
    input_sequence_tokens: HistogramVec,
    output_sequence_tokens: HistogramVec,
    cached_tokens: HistogramVec,
    output_tokens_total: IntCounterVec,
    time_to_first_token: HistogramVec,
    inter_token_latency: HistogramVec,
    tokenizer_latency: HistogramVec,
    /// The `tokenize` child of `tokenizer_latency`, resolved on first use.
    tokenize_latency: OnceLock<Histogram>,
    embedding_latency: HistogramVec,
    images_per_request: HistogramVec,
    videos_per_request: HistogramVec,
    audio_per_request: HistogramVec,
    model_migration_total: IntCounterVec,
    actor_restarts_total: IntCounterVec,
    model_migration_duration: HistogramVec,
    model_migration_max_seq_len_exceeded_total: IntCounterVec,
    pub(super) model_cancellation_total: IntCounterVec,
    model_rejection_total: IntCounterVec,
    model_ready: IntGaugeVec,
    model_context_length: IntGaugeVec,
    model_kv_cache_block_size: IntGaugeVec,
    model_migration_limit: IntGaugeVec,
    model_total_kv_blocks: IntGaugeVec,
    model_max_num_seqs: IntGaugeVec,
    model_max_num_batched_tokens: IntGaugeVec,
    worker_active_decode_blocks: IntGaugeVec,
    worker_active_prefill_tokens: IntGaugeVec,
    router_overhead: [HistogramVec; RouterPhase::ALL.len()],
    /// Hot-path label children per model; written once per new model, read by every request.
    series_cache: RwLock<HashMap<String, Arc<ModelSeries>>>,
}

impl FrontendMetrics {
    /// Builds the frontend registry with every metric registered.
    ///
    /// `prefix` is sanitised with [`sanitize_prefix`] (empty → `dynamo_frontend`). Histogram
    /// buckets come from `DYN_METRICS_<X>_{MIN,MAX,COUNT}` read through `env` (see
    /// [`HistogramConfig::from_env`]); bad values only warn. Errors are limited to Prometheus
    /// rejecting a metric definition, which would be a bug here rather than bad input.
    pub fn new(
        prefix: &str,
        histogram_configs: &HashMap<HistogramKind, HistogramConfig>,
    ) -> Result<Self, MetricsError> {
        let prefix = sanitize_prefix(prefix);
        let registry = Registry::new();
        let buckets = |kind: HistogramKind| {
            histogram_configs
                .get(&kind)
                .copied()
                .unwrap_or_else(|| kind.default_config())
                .buckets()
        };
        let r = Registrar {
            registry: &registry,
            prefix: &prefix,
        };
        let model = &["model"];
        let request = &["model", "endpoint", "request_type"];

        let metrics = FrontendMetrics {
            requests_total: r.counter_vec(
                "requests_total",
                "Total number of LLM requests processed",
                &["model", "endpoint", "request_type", "status", "error_type"],
            )?,
            requests_started_total: r.counter_vec(
                "requests_started_total",
                "Total number of LLM requests accepted by a handler",
                request,
            )?,
            inflight_requests: r.gauge_vec(
                "inflight_requests",
                "Number of requests in flight (deprecated alias of active_requests)",
                model,
            )?,
            active_requests: r.gauge_vec(
                "active_requests",
                "Number of requests between handler entry and response completion",
                model,
            )?,
            queued_requests: r.gauge_vec(
                "queued_requests",
                "Number of requests waiting for their first generated token",
                model,
            )?,
            disconnected_clients: r
                .gauge("disconnected_clients", "Number of client disconnects detected")?,
            request_duration: r.histogram_vec(
                "request_duration_seconds",
                "Duration of LLM requests",
                model,
                buckets(HistogramKind::RequestDuration),
            )?,
            input_sequence_tokens: r.histogram_vec(
                "input_sequence_tokens",
                "Input sequence length in tokens",
                model,
                buckets(HistogramKind::InputSequence),
            )?,
            output_sequence_tokens: r.histogram_vec(
                "output_sequence_tokens",
                "Output sequence length in tokens",
                model,
                buckets(HistogramKind::OutputSequence),
            )?,
            cached_tokens: r.histogram_vec(
                "cached_tokens",
                "Number of prompt tokens served from the prefix cache",
                model,
                buckets(HistogramKind::InputSequence),
            )?,
            output_tokens_total: r.counter_vec(
                "output_tokens_total",
                "Total number of output tokens generated",
                model,
            )?,
            time_to_first_token: r.histogram_vec(
                "time_to_first_token_seconds",
                "Time to first token",
                model,
                buckets(HistogramKind::Ttft),
            )?,
            inter_token_latency: r.histogram_vec(
                "inter_token_latency_seconds",
                "Inter-token latency",
                model,
                buckets(HistogramKind::Itl),
            )?,
            tokenizer_latency: r.histogram_vec(
                "tokenizer_latency_ms",
                "Tokenizer latency in milliseconds",
                &["operation"],
                TOKENIZER_LATENCY_MS_BUCKETS.to_vec(),
            )?,
            embedding_latency: r.histogram_vec(
                "embedding_latency_seconds",
                "Latency of successful embedding requests",
                model,
                buckets(HistogramKind::EmbeddingLatency),
            )?,
            images_per_request: r.histogram_vec(
                "images_per_request",
                "Number of image parts per request",
                model,
                MEDIA_PER_REQUEST_BUCKETS.to_vec(),
            )?,
            videos_per_request: r.histogram_vec(
                "videos_per_request",
                "Number of video parts per request",
                model,
                MEDIA_PER_REQUEST_BUCKETS.to_vec(),
            )?,
            audio_per_request: r.histogram_vec(
                "audio_per_request",
                "Number of audio parts per request",
                model,
                MEDIA_PER_REQUEST_BUCKETS.to_vec(),
            )?,
            actor_restarts_total: r.counter_vec(
                "actor_restarts_total",
                "Actors restarted by their supervisor after a panic, per actor and instance",
                &["actor", "instance"],
            )?,
            model_migration_total: r.counter_vec(
                "model_migration_total",
                "Total number of request migrations",
                &["model", "migration_type"],
            )?,
            model_migration_duration: r.histogram_vec(
                "model_migration_duration_seconds",
                "Time from a migratable failure to recovery, failure or cancellation",
                &["model", "migration_type", "outcome"],
                MIGRATION_DURATION_BUCKETS.to_vec(),
            )?,
            model_migration_max_seq_len_exceeded_total: r.counter_vec(
                "model_migration_max_seq_len_exceeded_total",
                "Requests that became non-migratable by exceeding the migration max sequence length",
                model,
            )?,
            model_cancellation_total: r.counter_vec(
                "model_cancellation_total",
                "Total number of requests cancelled by the client",
                request,
            )?,
            model_rejection_total: r.counter_vec(
                "model_rejection_total",
                "Total number of requests rejected because the service was overloaded",
                &["model", "endpoint"],
            )?,
            model_ready: r.gauge_vec("model_ready", "Whether the model is routable (1) or not (0)", model)?,
            model_context_length: r.gauge_vec(
                "model_context_length",
                "Maximum context length of the model, in tokens",
                model,
            )?,
            model_kv_cache_block_size: r.gauge_vec(
                "model_kv_cache_block_size",
                "KV cache block size of the model, in tokens",
                model,
            )?,
            model_migration_limit: r.gauge_vec(
                "model_migration_limit",
                "Maximum number of migrations per request",
                model,
            )?,
            model_total_kv_blocks: r.gauge_vec(
                "model_total_kv_blocks",
                "Total number of KV cache blocks of the model's workers",
                model,
            )?,
            model_max_num_seqs: r.gauge_vec(
                "model_max_num_seqs",
                "Maximum number of concurrent sequences per worker",
                model,
            )?,
            model_max_num_batched_tokens: r.gauge_vec(
                "model_max_num_batched_tokens",
                "Maximum number of batched tokens per worker step",
                model,
            )?,
            worker_active_decode_blocks: r.gauge_vec(
                "worker_active_decode_blocks",
                "KV blocks the router predicts each worker holds for its active requests",
                WORKER_LABELS,
            )?,
            worker_active_prefill_tokens: r.gauge_vec(
                "worker_active_prefill_tokens",
                "Prompt tokens the router predicts each worker still has to prefill",
                WORKER_LABELS,
            )?,
            router_overhead: {
                let router = Registrar {
                    registry: &registry,
                    prefix: "dynamo_router",
                };
                let mut built = Vec::with_capacity(RouterPhase::ALL.len());
                for phase in RouterPhase::ALL {
                    built.push(router.histogram_vec(
                        phase.metric_name(),
                        phase.help(),
                        &["router_id"],
                        ROUTER_OVERHEAD_BUCKETS_MS.to_vec(),
                    )?);
                }
                built.try_into().map_err(|_| MetricsError::Register {
                    name: "dynamo_router_overhead_*".into(),
                    source: prometheus::Error::Msg("phase count mismatch".into()),
                })?
            },
            series_cache: RwLock::new(HashMap::new()),
            tokenize_latency: OnceLock::new(),
            histogram_configs: histogram_configs.clone(),
            prefix,
            registry,
        };
        Ok(metrics)
    }

    /// Sets the router's predicted load of one worker (`worker_active_decode_blocks`,
    /// `worker_active_prefill_tokens`; `dp_rank` 0, `worker_type` "decode").
    pub fn set_worker_load(&self, worker_id: u64, decode_blocks: usize, prefill_tokens: usize) {
        let worker = worker_id.to_string();
        let labels = [worker.as_str(), "0", "decode"];
        self.worker_active_decode_blocks
            .with_label_values(&labels)
            .set(decode_blocks as i64);
        self.worker_active_prefill_tokens
            .with_label_values(&labels)
            .set(prefill_tokens as i64);
    }

    /// Drops a worker's router gauges (it left).
    pub fn remove_worker(&self, worker_id: u64) {
        let worker = worker_id.to_string();
        let labels = [worker.as_str(), "0", "decode"];
        let _ = self
            .worker_active_decode_blocks
            .remove_label_values(&labels);
        let _ = self
            .worker_active_prefill_tokens
            .remove_label_values(&labels);
    }

    /// Records how long one phase of a routing decision took.
    pub fn observe_router_overhead(&self, router_id: &str, phase: RouterPhase, milliseconds: f64) {
        self.router_overhead[phase.index()]
            .with_label_values(&[router_id])
            .observe(milliseconds);
    }

    /// The registry holding every frontend metric, e.g. to gather it together with another one.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The sanitised metric-name prefix in use.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The resolved bucket configuration of a configurable histogram.
    pub fn histogram_config(&self, kind: HistogramKind) -> HistogramConfig {
        self.histogram_configs
            .get(&kind)
            .copied()
            .unwrap_or_else(|| kind.default_config())
    }

    /// Prometheus text exposition of the registry; serve it with [`super::CONTENT_TYPE`].
    pub fn render(&self) -> Result<String, MetricsError> {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .map_err(MetricsError::Encode)
    }

    /// Starts accounting for one request; the guard records the outcome when dropped.
    ///
    /// Counts `requests_started_total`, raises `inflight_requests`, `active_requests` and
    /// `queued_requests`. `model` should be the canonical model name.
    pub fn request_guard(
        self: &Arc<Self>,
        model: &str,
        endpoint: Endpoint,
        request_type: super::RequestType,
    ) -> RequestGuard {
        let series = self.series(model);
        series.started(self, endpoint, request_type).inc();
        RequestGuard::start(Arc::clone(self), series, endpoint, request_type)
    }

    /// Counts an overload rejection (`model_rejection_total`).
    pub fn rejection(&self, model: &str, endpoint: Endpoint) {
        self.model_rejection_total
            .with_label_values(&[model, endpoint.as_str()])
            .inc();
    }

    /// Counts one supervised restart of `actor` (`engine`, `router`, `validator`) `instance`.
    pub fn actor_restarted(&self, actor: &str, instance: &str) {
        self.actor_restarts_total
            .with_label_values(&[actor, instance])
            .inc();
    }

    /// Restarts counted so far for `actor` (all instances).
    pub fn actor_restarts(&self, actor: &str) -> u64 {
        use prometheus::core::Collector;
        self.actor_restarts_total
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "actor" && l.value() == actor)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// Counts one migration (`model_migration_total`).
    pub fn migration(&self, model: &str, migration_type: MigrationType) {
        self.model_migration_total
            .with_label_values(&[model, migration_type.as_str()])
            .inc();
    }

    /// Records how long a migration took from failure detection to its outcome.
    pub fn observe_migration_duration(
        &self,
        model: &str,
        migration_type: MigrationType,
        outcome: MigrationOutcome,
        seconds: f64,
    ) {
        self.model_migration_duration
            .with_label_values(&[model, migration_type.as_str(), outcome.as_str()])
            .observe(seconds);
    }

    /// Counts a request that became non-migratable by exceeding the migration max sequence length.
    pub fn migration_max_seq_len_exceeded(&self, model: &str) {
        self.model_migration_max_seq_len_exceeded_total
            .with_label_values(&[model])
            .inc();
    }

    /// Records a tokenizer call; `operation` is `tokenize` or `detokenize`.
    pub fn observe_tokenizer_latency(&self, operation: &'static str, milliseconds: f64) {
        // Every request tokenizes: its child is looked up once.
        if operation == "tokenize" {
            let child = self
                .tokenize_latency
                .get_or_init(|| self.tokenizer_latency.with_label_values(&[operation]));
            return child.observe(milliseconds);
        }
        self.tokenizer_latency
            .with_label_values(&[operation])
            .observe(milliseconds);
    }

    /// Records the latency of a successful `/v1/embeddings` request.
    pub fn observe_embedding_latency(&self, model: &str, seconds: f64) {
        self.embedding_latency
            .with_label_values(&[model])
            .observe(seconds);
    }

    /// Records how many media parts of one kind a request carried.
    pub fn observe_media_parts(&self, model: &str, kind: MediaKind, count: usize) {
        let histogram = match kind {
            MediaKind::Image => &self.images_per_request,
            MediaKind::Video => &self.videos_per_request,
            MediaKind::Audio => &self.audio_per_request,
        };
        histogram.with_label_values(&[model]).observe(count as f64);
    }

    /// Copies model-card / runtime-config values into the `model_*` gauges; `None` fields are
    /// left as they are. Values above `i64::MAX` are clamped.
    pub fn set_model_gauges(&self, model: &str, gauges: &ModelGauges) {
        let pairs = [
            (&self.model_context_length, gauges.context_length),
            (&self.model_kv_cache_block_size, gauges.kv_cache_block_size),
            (&self.model_migration_limit, gauges.migration_limit),
            (&self.model_total_kv_blocks, gauges.total_kv_blocks),
            (&self.model_max_num_seqs, gauges.max_num_seqs),
            (
                &self.model_max_num_batched_tokens,
                gauges.max_num_batched_tokens,
            ),
        ];
        for (gauge, value) in pairs {
            if let Some(value) = value {
                gauge
                    .with_label_values(&[model])
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            }
        }
    }

    /// Sets `model_ready` (1 = routable); call it before rendering, it is a scrape-time value.
    pub fn set_model_ready(&self, model: &str, ready: bool) {
        self.model_ready
            .with_label_values(&[model])
            .set(i64::from(ready));
    }

    /// The cached hot-path label children of `model`, resolving them on first use.
    fn series(&self, model: &str) -> Arc<ModelSeries> {
        // A panic while holding the lock cannot leave the map half-updated (inserts are single
        // calls), so a poisoned lock is still safe to use.
        if let Some(series) = self
            .series_cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
        {
            return Arc::clone(series);
        }
        let mut cache = self
            .series_cache
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(series) = cache.get(model) {
            return Arc::clone(series);
        }
        let series = Arc::new(ModelSeries::new(self, model));
        if cache.len() < MAX_CACHED_MODELS {
            cache.insert(model.to_string(), Arc::clone(&series));
        }
        series
    }
}

impl std::fmt::Debug for FrontendMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontendMetrics")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}
