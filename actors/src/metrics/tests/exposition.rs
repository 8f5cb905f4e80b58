//! What the exposition text shows: every metric's name, type and labels, the bucket bounds and
//! their env overrides, the prefix, and the label spellings.

use super::*;

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
fn label_values_are_the_spec_spellings() {
    assert_eq!(Endpoint::ChatCompletions.as_str(), "chat_completions");
    assert_eq!(Endpoint::Completions.as_str(), "completions");
    assert_eq!(Endpoint::Responses.as_str(), "responses");
    assert_eq!(Endpoint::Embeddings.as_str(), "embeddings");
    assert_eq!(RequestType::Stream.as_str(), "stream");
    assert_eq!(RequestType::Unary.as_str(), "unary");
    assert_eq!(CONTENT_TYPE, prometheus::TEXT_FORMAT);
}
