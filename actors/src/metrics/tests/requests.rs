//! What a [`RequestGuard`] records over a request's life: status and error class, gauges, token
//! timings, cached tokens, disconnects, and guards across instances, models and threads.

use super::*;

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
