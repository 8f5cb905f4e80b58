//! Frontend Prometheus metrics (spec §1.7): what `/metrics` exposes and the per-request accounting
//! that feeds it. The HTTP layer owns one `Arc<FrontendMetrics>`, opens a [`RequestGuard`] per
//! accepted request and serves [`FrontendMetrics::render`] with [`CONTENT_TYPE`].
//!
//! # Layout
//! - `frontend` — [`FrontendMetrics`]: the owned registry, every metric definition, the
//!   non-request recorders (rejections, migrations, tokenizer, model gauges) and rendering.
//! - `guard` — [`RequestGuard`], [`Endpoint`], [`RequestType`]: RAII accounting of one request,
//!   the hot path.
//! - `buckets` — [`log_buckets`] and [`HistogramConfig`]: log-spaced buckets and their
//!   `DYN_METRICS_<X>_{MIN,MAX,COUNT}` overrides.
//! - `error_type` — the `error_type` label values and [`error_type_for_status`].
//! - `labels` — label values and per-model settings ([`MigrationType`], [`RouterPhase`], [`ModelGauges`], ...).
//! - `prefix` — [`sanitize_prefix`] for `--metrics-prefix`.

mod buckets;
pub mod error_type;
mod frontend;
mod guard;
mod labels;
mod prefix;
mod registrar;
#[cfg(test)]
mod tests;

pub use buckets::{log_buckets, HistogramConfig, HistogramKind, MAX_BUCKET_COUNT};
pub use error_type::error_type_for_status;
pub use frontend::FrontendMetrics;
pub use guard::{Endpoint, RequestGuard, RequestType};
pub use labels::{MediaKind, MigrationOutcome, MigrationType, ModelGauges, RouterPhase};
pub use prefix::{sanitize_prefix, DEFAULT_PREFIX};

/// `Content-Type` of the Prometheus text exposition served on `/metrics`.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Failures of the metrics layer. Neither depends on request input: registration fails only on a
/// bad metric definition, encoding only on an internal Prometheus error. The HTTP layer answers
/// an encoding failure with 500 `Failed to encode metrics`.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Prometheus rejected a metric definition or its registration.
    #[error("failed to register metric {name}: {source}")]
    Register {
        /// Fully-qualified metric name.
        name: String,
        /// What Prometheus reported.
        source: prometheus::Error,
    },
    /// The registry could not be encoded as text.
    #[error("failed to encode metrics: {0}")]
    Encode(prometheus::Error),
}
