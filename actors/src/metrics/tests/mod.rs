//! Tests of [`FrontendMetrics`] and [`RequestGuard`] through what matters to a scraper: the
//! rendered exposition text. Timings are only counted, never compared against wall-clock values.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;

mod exposition;
mod requests;

fn no_env(_: &str) -> Option<String> {
    None
}

fn metrics() -> Arc<FrontendMetrics> {
    Arc::new(
        FrontendMetrics::new(DEFAULT_PREFIX, &HistogramConfig::all_from_env(&no_env))
            .expect("metric definitions are valid"),
    )
}

/// The value of the sample line `series` (name plus label set, exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.parse().ok()
    })
}

fn sample_of(metrics: &FrontendMetrics, series: &str) -> Option<f64> {
    sample(&metrics.render().expect("render"), series)
}

const CHAT_STREAM_SUCCESS: &str = r#"dynamo_frontend_requests_total{endpoint="chat_completions",error_type="",model="m",request_type="stream",status="success"}"#;
