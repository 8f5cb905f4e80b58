//! Tests of [`FrontendMetrics`] and [`RequestGuard`] through what matters to a scraper: the
//! rendered exposition text. Timings are only counted, never compared against wall-clock values.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;

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

#[test]
fn every_core_metric_renders_with_its_name_type_and_labels() {
    let metrics = metrics();
    {
        let mut guard = metrics.request_guard("m", Endpoint::ChatCompletions, RequestType::Stream);
        guard.observe_tokens(10, 1);
        guard.observe_tokens(10, 2);
        guard.observe_cached_tokens(4);
        guard.client_disconnected();
    }
    metrics.rejection("m", Endpoint::Completions);
    metrics.migration("m", MigrationType::OngoingRequest);
    metrics.observe_migration_duration(
        "m",
        MigrationType::OngoingRequest,
        MigrationOutcome::Recovered,
        0.3,
    );
    metrics.migration_max_seq_len_exceeded("m");
    metrics.observe_tokenizer_latency("tokenize", 0.7);
    metrics.observe_embedding_latency("m", 0.01);
    metrics.observe_media_parts("m", MediaKind::Image, 2);
    metrics.observe_media_parts("m", MediaKind::Video, 0);
    metrics.observe_media_parts("m", MediaKind::Audio, 1);
    metrics.set_model_ready("m", true);
    metrics.set_model_gauges(
        "m",
        &ModelGauges {
            context_length: Some(8192),
            kv_cache_block_size: Some(16),
            migration_limit: Some(3),
            total_kv_blocks: Some(1000),
            max_num_seqs: Some(256),
            max_num_batched_tokens: Some(u64::MAX),
        },
    );
    let text = metrics.render().expect("render");

    let types = [
        ("requests_total", "counter"),
        ("requests_started_total", "counter"),
        ("inflight_requests", "gauge"),
        ("active_requests", "gauge"),
        ("queued_requests", "gauge"),
        ("disconnected_clients", "gauge"),
        ("request_duration_seconds", "histogram"),
        ("input_sequence_tokens", "histogram"),
        ("output_sequence_tokens", "histogram"),
        ("cached_tokens", "histogram"),
        ("output_tokens_total", "counter"),
        ("time_to_first_token_seconds", "histogram"),
        ("inter_token_latency_seconds", "histogram"),
        ("tokenizer_latency_ms", "histogram"),
        ("embedding_latency_seconds", "histogram"),
        ("images_per_request", "histogram"),
        ("videos_per_request", "histogram"),
        ("audio_per_request", "histogram"),
        ("model_migration_total", "counter"),
        ("model_migration_duration_seconds", "histogram"),
        ("model_migration_max_seq_len_exceeded_total", "counter"),
        ("model_cancellation_total", "counter"),
        ("model_rejection_total", "counter"),
        ("model_ready", "gauge"),
        ("model_context_length", "gauge"),
        ("model_kv_cache_block_size", "gauge"),
        ("model_migration_limit", "gauge"),
        ("model_total_kv_blocks", "gauge"),
        ("model_max_num_seqs", "gauge"),
        ("model_max_num_batched_tokens", "gauge"),
    ];
    for (name, kind) in types {
        let line = format!("# TYPE dynamo_frontend_{name} {kind}");
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }

    let expected = [
        (
            r#"dynamo_frontend_requests_total{endpoint="chat_completions",error_type="cancelled",model="m",request_type="stream",status="error"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_requests_started_total{endpoint="chat_completions",model="m",request_type="stream"}"#,
            1.0,
        ),
        (r#"dynamo_frontend_inflight_requests{model="m"}"#, 0.0),
        (r#"dynamo_frontend_active_requests{model="m"}"#, 0.0),
        (r#"dynamo_frontend_queued_requests{model="m"}"#, 0.0),
        ("dynamo_frontend_disconnected_clients", 1.0),
        (
            r#"dynamo_frontend_request_duration_seconds_bucket{model="m",le="510"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_request_duration_seconds_bucket{model="m",le="+Inf"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_request_duration_seconds_count{model="m"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_input_sequence_tokens_bucket{model="m",le="0"}"#,
            0.0,
        ),
        (
            r#"dynamo_frontend_input_sequence_tokens_bucket{model="m",le="100"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_input_sequence_tokens_bucket{model="m",le="130000"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_input_sequence_tokens_sum{model="m"}"#,
            10.0,
        ),
        (
            r#"dynamo_frontend_output_sequence_tokens_bucket{model="m",le="880"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_output_sequence_tokens_sum{model="m"}"#,
            3.0,
        ),
        (
            r#"dynamo_frontend_cached_tokens_bucket{model="m",le="130000"}"#,
            1.0,
        ),
        (r#"dynamo_frontend_cached_tokens_sum{model="m"}"#, 4.0),
        (r#"dynamo_frontend_output_tokens_total{model="m"}"#, 3.0),
        (
            r#"dynamo_frontend_time_to_first_token_seconds_bucket{model="m",le="0.0022"}"#,
            f64::NAN,
        ),
        (
            r#"dynamo_frontend_time_to_first_token_seconds_count{model="m"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_inter_token_latency_seconds_bucket{model="m",le="0.0019"}"#,
            f64::NAN,
        ),
        (
            r#"dynamo_frontend_inter_token_latency_seconds_count{model="m"}"#,
            2.0,
        ),
        (
            r#"dynamo_frontend_tokenizer_latency_ms_bucket{operation="tokenize",le="0.5"}"#,
            0.0,
        ),
        (
            r#"dynamo_frontend_tokenizer_latency_ms_bucket{operation="tokenize",le="1"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_tokenizer_latency_ms_bucket{operation="tokenize",le="512"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_embedding_latency_seconds_bucket{model="m",le="0.0084"}"#,
            0.0,
        ),
        (
            r#"dynamo_frontend_embedding_latency_seconds_bucket{model="m",le="0.017"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_images_per_request_bucket{model="m",le="2"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_videos_per_request_bucket{model="m",le="0"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_audio_per_request_bucket{model="m",le="100"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_model_migration_total{migration_type="ongoing_request",model="m"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_model_migration_duration_seconds_bucket{migration_type="ongoing_request",model="m",outcome="recovered",le="0.25"}"#,
            0.0,
        ),
        (
            r#"dynamo_frontend_model_migration_duration_seconds_bucket{migration_type="ongoing_request",model="m",outcome="recovered",le="0.5"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_model_migration_duration_seconds_bucket{migration_type="ongoing_request",model="m",outcome="recovered",le="60"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_model_migration_max_seq_len_exceeded_total{model="m"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_model_cancellation_total{endpoint="chat_completions",model="m",request_type="stream"}"#,
            1.0,
        ),
        (
            r#"dynamo_frontend_model_rejection_total{endpoint="completions",model="m"}"#,
            1.0,
        ),
        (r#"dynamo_frontend_model_ready{model="m"}"#, 1.0),
        (r#"dynamo_frontend_model_context_length{model="m"}"#, 8192.0),
        (
            r#"dynamo_frontend_model_kv_cache_block_size{model="m"}"#,
            16.0,
        ),
        (r#"dynamo_frontend_model_migration_limit{model="m"}"#, 3.0),
        (
            r#"dynamo_frontend_model_total_kv_blocks{model="m"}"#,
            1000.0,
        ),
        (r#"dynamo_frontend_model_max_num_seqs{model="m"}"#, 256.0),
        (
            r#"dynamo_frontend_model_max_num_batched_tokens{model="m"}"#,
            i64::MAX as f64,
        ),
    ];
    for (series, value) in expected {
        let found = sample(&text, series);
        assert!(found.is_some(), "missing `{series}` in\n{text}");
        if !value.is_nan() {
            assert_eq!(found, Some(value), "{series}");
        }
    }
}

#[test]
fn every_bucket_bound_of_the_default_layouts_is_rendered() {
    let metrics = metrics();
    {
        let mut guard = metrics.request_guard("m", Endpoint::Completions, RequestType::Unary);
        guard.observe_tokens(1, 1);
        guard.observe_tokens(1, 1);
        guard.mark_success();
    }
    metrics.observe_embedding_latency("m", 1.0);
    let text = metrics.render().expect("render");
    let layouts = [
        ("request_duration_seconds", HistogramKind::RequestDuration),
        ("input_sequence_tokens", HistogramKind::InputSequence),
        ("output_sequence_tokens", HistogramKind::OutputSequence),
        ("time_to_first_token_seconds", HistogramKind::Ttft),
        ("inter_token_latency_seconds", HistogramKind::Itl),
        ("embedding_latency_seconds", HistogramKind::EmbeddingLatency),
    ];
    for (name, kind) in layouts {
        let rendered: Vec<&str> = text
            .lines()
            .filter_map(|l| {
                l.strip_prefix(&format!("dynamo_frontend_{name}_bucket{{model=\"m\",le=\""))
            })
            .filter_map(|rest| rest.split('"').next())
            .collect();
        let mut expected: Vec<String> = kind
            .default_config()
            .buckets()
            .iter()
            .map(f64::to_string)
            .collect();
        expected.push("+Inf".to_string());
        assert_eq!(rendered, expected, "{name}");
    }
    assert!(text.contains(r#"dynamo_frontend_request_duration_seconds_bucket{model="m",le="510"}"#));
    assert!(text
        .contains(r#"dynamo_frontend_time_to_first_token_seconds_bucket{model="m",le="0.0022"}"#));
}

#[test]
fn env_overrides_change_the_rendered_buckets() {
    let env: HashMap<&str, &str> = [
        ("DYN_METRICS_REQUEST_DURATION_MIN", "1"),
        ("DYN_METRICS_REQUEST_DURATION_MAX", "100"),
        ("DYN_METRICS_REQUEST_DURATION_COUNT", "3"),
    ]
    .into_iter()
    .collect();
    let lookup = |key: &str| env.get(key).map(|v| v.to_string());
    let metrics = Arc::new(
        FrontendMetrics::new("", &HistogramConfig::all_from_env(&lookup)).expect("metrics"),
    );
    assert_eq!(
        metrics.histogram_config(HistogramKind::RequestDuration),
        HistogramConfig {
            min: 1.0,
            max: 100.0,
            count: 3
        }
    );
    drop(metrics.request_guard("m", Endpoint::Completions, RequestType::Unary));
    let text = metrics.render().expect("render");
    let bounds: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            l.strip_prefix(r#"dynamo_frontend_request_duration_seconds_bucket{model="m",le=""#)
        })
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert_eq!(bounds, ["0", "10", "100", "+Inf"]);
}

#[test]
fn unmarked_guard_counts_as_internal_error() {
    let metrics = metrics();
    drop(metrics.request_guard("m", Endpoint::ChatCompletions, RequestType::Unary));
    assert_eq!(
        sample_of(
            &metrics,
            r#"dynamo_frontend_requests_total{endpoint="chat_completions",error_type="internal",model="m",request_type="unary",status="error"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn success_and_explicit_errors_are_counted_by_class() {
    let metrics = metrics();
    for _ in 0..2 {
        let mut guard = metrics.request_guard("m", Endpoint::ChatCompletions, RequestType::Stream);
        guard.mark_error(error_type::VALIDATION);
        guard.mark_success();
    }
    {
        let mut guard = metrics.request_guard("m", Endpoint::ChatCompletions, RequestType::Stream);
        guard.mark_error(error_type::OVERLOAD);
    }
    let text = metrics.render().expect("render");
    assert_eq!(sample(&text, CHAT_STREAM_SUCCESS), Some(2.0));
    assert_eq!(
        sample(
            &text,
            r#"dynamo_frontend_requests_total{endpoint="chat_completions",error_type="overload",model="m",request_type="stream",status="error"}"#
        ),
        Some(1.0)
    );
    assert!(
        !text.contains(r#"error_type="validation""#),
        "last mark wins:\n{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"dynamo_frontend_requests_started_total{endpoint="chat_completions",model="m",request_type="stream"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"dynamo_frontend_request_duration_seconds_count{model="m"}"#
        ),
        Some(3.0)
    );
}

#[test]
fn gauges_rise_while_the_request_lives_and_fall_on_drop() {
    let metrics = metrics();
    let mut guard = metrics.request_guard("m", Endpoint::Completions, RequestType::Stream);
    let other = metrics.request_guard("m", Endpoint::Completions, RequestType::Stream);
    for name in ["inflight_requests", "active_requests", "queued_requests"] {
        assert_eq!(
            sample_of(&metrics, &format!("dynamo_frontend_{name}{{model=\"m\"}}")),
            Some(2.0),
            "{name}"
        );
    }
    guard.observe_tokens(5, 0);
    assert_eq!(
        sample_of(&metrics, r#"dynamo_frontend_queued_requests{model="m"}"#),
        Some(2.0)
    );
    guard.observe_tokens(5, 1);
    assert_eq!(
        sample_of(&metrics, r#"dynamo_frontend_queued_requests{model="m"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample_of(&metrics, r#"dynamo_frontend_active_requests{model="m"}"#),
        Some(2.0)
    );
    guard.mark_success();
    drop(guard);
    assert_eq!(
        sample_of(&metrics, r#"dynamo_frontend_queued_requests{model="m"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample_of(&metrics, r#"dynamo_frontend_inflight_requests{model="m"}"#),
        Some(1.0)
    );
    drop(other);
    for name in ["inflight_requests", "active_requests", "queued_requests"] {
        assert_eq!(
            sample_of(&metrics, &format!("dynamo_frontend_{name}{{model=\"m\"}}")),
            Some(0.0),
            "{name}"
        );
    }
}

#[test]
fn token_timings_are_counted_per_token() {
    let metrics = metrics();
    {
        let mut guard = metrics.request_guard("m", Endpoint::ChatCompletions, RequestType::Stream);
        guard.observe_tokens(100, 0); // no tokens: ignored entirely
        guard.observe_tokens(100, 1); // first token: TTFT + ISL
        guard.observe_tokens(100, 3); // three ITL observations
        guard.observe_tokens(100, 0);
        guard.observe_tokens(100, 2); // two more
        assert_eq!(guard.output_tokens(), 6);
        guard.mark_success();
    }
    let text = metrics.render().expect("render");
    let count = |name: &str| sample(&text, &format!("dynamo_frontend_{name}{{model=\"m\"}}"));
    assert_eq!(count("time_to_first_token_seconds_count"), Some(1.0));
    assert_eq!(count("inter_token_latency_seconds_count"), Some(5.0));
    assert_eq!(count("input_sequence_tokens_count"), Some(1.0));
    assert_eq!(count("input_sequence_tokens_sum"), Some(100.0));
    assert_eq!(count("output_tokens_total"), Some(6.0));
    assert_eq!(count("output_sequence_tokens_count"), Some(1.0));
    assert_eq!(count("output_sequence_tokens_sum"), Some(6.0));
    assert!(count("time_to_first_token_seconds_sum").is_some_and(|s| s >= 0.0));
}

#[test]
fn output_tokens_total_moves_in_real_time() {
    let metrics = metrics();
    let mut guard = metrics.request_guard("m", Endpoint::Completions, RequestType::Stream);
    guard.observe_tokens(1, 4);
    assert_eq!(
        sample_of(
            &metrics,
            r#"dynamo_frontend_output_tokens_total{model="m"}"#
        ),
        Some(4.0)
    );
    // The final length is only observed when the guard drops.
    assert_eq!(
        sample_of(
            &metrics,
            r#"dynamo_frontend_output_sequence_tokens_count{model="m"}"#
        ),
        Some(0.0)
    );
    guard.mark_success();
    drop(guard);
    assert_eq!(
        sample_of(
            &metrics,
            r#"dynamo_frontend_output_sequence_tokens_count{model="m"}"#
        ),
        Some(1.0)
    );
}

#[test]
fn series_appear_only_once_observed() {
    let metrics = metrics();
    drop(metrics.request_guard("m", Endpoint::Embeddings, RequestType::Unary));
    let text = metrics.render().expect("render");
    for absent in [
        "time_to_first_token",
        "inter_token_latency",
        "cached_tokens",
        "input_sequence_tokens",
        "output_tokens_total",
    ] {
        assert!(
            !text.contains(absent),
            "{absent} should not be rendered yet:\n{text}"
        );
    }
}

#[test]
fn cached_tokens_are_observed_at_most_once() {
    let metrics = metrics();
    {
        let mut guard = metrics.request_guard("m", Endpoint::ChatCompletions, RequestType::Unary);
        guard.observe_cached_tokens(64);
        guard.observe_cached_tokens(128);
    }
    let text = metrics.render().expect("render");
    assert_eq!(
        sample(&text, r#"dynamo_frontend_cached_tokens_count{model="m"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"dynamo_frontend_cached_tokens_sum{model="m"}"#),
        Some(64.0)
    );
}

#[test]
fn client_disconnect_is_counted_once_and_pins_cancelled() {
    let metrics = metrics();
    {
        let mut guard = metrics.request_guard("m", Endpoint::Completions, RequestType::Unary);
        guard.mark_success();
        guard.client_disconnected();
        guard.client_disconnected();
        guard.mark_success();
        guard.mark_error(error_type::INTERNAL);
    }
    let text = metrics.render().expect("render");
    assert_eq!(
        sample(&text, "dynamo_frontend_disconnected_clients"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"dynamo_frontend_model_cancellation_total{endpoint="completions",model="m",request_type="unary"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"dynamo_frontend_requests_total{endpoint="completions",error_type="cancelled",model="m",request_type="unary",status="error"}"#
        ),
        Some(1.0)
    );
    assert!(!text.contains(r#"status="success""#));
}

#[test]
fn two_instances_do_not_interfere() {
    let first = metrics();
    let second = metrics();
    let mut guard = first.request_guard("m", Endpoint::ChatCompletions, RequestType::Stream);
    guard.mark_success();
    drop(guard);
    first.rejection("m", Endpoint::ChatCompletions);
    assert_eq!(sample_of(&first, CHAT_STREAM_SUCCESS), Some(1.0));
    assert_eq!(sample_of(&second, CHAT_STREAM_SUCCESS), None);
    assert!(!second
        .render()
        .expect("render")
        .contains("dynamo_frontend_model_rejection_total{"));
    // Neither touches the process-global registry.
    assert!(prometheus::gather()
        .iter()
        .all(|family| !family.name().starts_with("dynamo_frontend")));
}

#[test]
fn models_are_labelled_separately() {
    let metrics = metrics();
    for model in ["a", "b", "a"] {
        let mut guard = metrics.request_guard(model, Endpoint::Completions, RequestType::Unary);
        guard.observe_tokens(1, 1);
        guard.mark_success();
    }
    let text = metrics.render().expect("render");
    assert_eq!(
        sample(&text, r#"dynamo_frontend_output_tokens_total{model="a"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&text, r#"dynamo_frontend_output_tokens_total{model="b"}"#),
        Some(1.0)
    );
}

#[test]
fn prefix_is_sanitised_and_applied_to_every_name() {
    let metrics = Arc::new(
        FrontendMetrics::new("my-service.v1", &HistogramConfig::all_from_env(&no_env))
            .expect("metrics"),
    );
    assert_eq!(metrics.prefix(), "my_service_v1");
    let mut guard = metrics.request_guard("m", Endpoint::Responses, RequestType::Stream);
    guard.mark_success();
    drop(guard);
    let text = metrics.render().expect("render");
    assert_eq!(
        sample(
            &text,
            r#"my_service_v1_requests_total{endpoint="responses",error_type="",model="m",request_type="stream",status="success"}"#
        ),
        Some(1.0)
    );
    assert!(!text.contains("dynamo_frontend"));
    let fallback =
        FrontendMetrics::new("", &HistogramConfig::all_from_env(&no_env)).expect("metrics");
    assert_eq!(fallback.prefix(), DEFAULT_PREFIX);
}

#[test]
fn guard_is_send_and_static() {
    fn assert_send_static<T: Send + 'static>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_static::<RequestGuard>();
    assert_send_sync::<FrontendMetrics>();
}

#[test]
fn guards_from_many_threads_add_up() {
    let metrics = metrics();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let metrics = Arc::clone(&metrics);
            std::thread::spawn(move || {
                for _ in 0..250 {
                    let mut guard =
                        metrics.request_guard("m", Endpoint::ChatCompletions, RequestType::Stream);
                    guard.observe_tokens(1, 1);
                    guard.mark_success();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("worker thread");
    }
    let text = metrics.render().expect("render");
    assert_eq!(sample(&text, CHAT_STREAM_SUCCESS), Some(1000.0));
    assert_eq!(
        sample(&text, r#"dynamo_frontend_active_requests{model="m"}"#),
        Some(0.0)
    );
}

#[test]
fn label_values_are_the_spec_spellings() {
    assert_eq!(Endpoint::ChatCompletions.as_str(), "chat_completions");
    assert_eq!(Endpoint::Completions.as_str(), "completions");
    assert_eq!(Endpoint::Responses.as_str(), "responses");
    assert_eq!(Endpoint::Embeddings.as_str(), "embeddings");
    assert_eq!(RequestType::Stream.as_str(), "stream");
    assert_eq!(RequestType::Unary.as_str(), "unary");
    assert_eq!(CONTENT_TYPE, prometheus::TEXT_FORMAT);
}
