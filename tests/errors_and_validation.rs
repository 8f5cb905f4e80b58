//! The status catalogue (§1.3) and every validation rule (§4), table-driven, over real HTTP.

mod common;

use common::*;
use serde_json::{json, Value};

fn merge(base: &Value, patch: &Value) -> Value {
    let mut out = base.clone();
    if let (Some(o), Some(p)) = (out.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            o.insert(k.clone(), v.clone());
        }
    }
    out
}

#[actix_rt::test]
async fn chat_validation_rules() {
    let server = start("").await;
    let url = server.url("/v1/chat/completions");
    let base = chat_body("hi");
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"temperature": 2.5}), 400, "Validation: Temperature must be between 0 and 2, got 2.5"),
        (json!({"temperature": -0.5}), 400, "Validation: Temperature must be between 0 and 2, got -0.5"),
        (json!({"top_p": 1.5}), 400, "Validation: Top_p must be between 0 and 1, got 1.5"),
        (json!({"top_k": -2}), 400, "Validation: Top_k must be null or greater than or equal to -1"),
        (json!({"min_p": 1.5}), 400, "Validation: Min_p must be between 0 and 1, got 1.5"),
        (json!({"frequency_penalty": 2.5}), 400, "Validation: Frequency penalty must be between -2 and 2, got 2.5"),
        (json!({"presence_penalty": -3}), 400, "Validation: Presence penalty must be between -2 and 2, got -3"),
        (json!({"repetition_penalty": 0}), 400, "Validation: Repetition penalty must be between 0 and 2, got 0"),
        (json!({"repetition_penalty": 2.5}), 400, "Validation: Repetition penalty must be between 0 and 2, got 2.5"),
        (json!({"logit_bias": {"50": "x"}}), 400, "Validation: Logit bias value for token '50' must be a number, got \"x\""),
        (json!({"logit_bias": {"50": 101}}), 400, "Validation: Logit bias for token '50' must be between -100 and 100, got 101"),
        (json!({"logit_bias": {"abc": 1}}), 400, "Validation: Invalid key in 'logit_bias': \"abc\" is not a token id (keys must be integers)"),
        (json!({"logit_bias": {"49152": 1}}), 400, "Validation: Token id 49152 in 'logit_bias' is out of range: the vocabulary has 49152 tokens"),
        (json!({"n": 0}), 400, "Validation: n must be between 1 and 128, got 0"),
        (json!({"n": 129}), 400, "Validation: n must be between 1 and 128, got 129"),
        (json!({"n": 2, "temperature": 0}), 400, "Validation: When n > 1, temperature must be greater than 0 to ensure diverse outputs. Got n=2, temperature=0"),
        (json!({"top_logprobs": 21}), 400, "Validation: Top_logprobs must be between 0 and 20, got 21"),
        (json!({"max_tokens": 0}), 400, "Validation: Max tokens must be greater than 0, got 0"),
        (json!({"max_completion_tokens": 0}), 400, "Validation: Max completion tokens must be greater than 0, got 0"),
        (json!({"model": "  "}), 400, "Validation: Model cannot be empty"),
        (json!({"user": ""}), 400, "Validation: User ID cannot be empty"),
        (json!({"stop": ""}), 400, "Validation: Stop sequence cannot be empty"),
        (json!({"stop": []}), 400, "Validation: Stop sequences array cannot be empty"),
        (json!({"stop": (0..33).map(|i| i.to_string()).collect::<Vec<_>>()}), 400, "Validation: Maximum of 32 stop sequences allowed, got 33"),
        (json!({"stop": ["a", ""]}), 400, "Validation: Stop sequence at index 1 cannot be empty"),
        (json!({"stop_token_ids": []}), 400, "Validation: Stop token IDs array cannot be empty"),
        (json!({"stop_token_ids": (0..33).collect::<Vec<_>>()}), 400, "Validation: Maximum of 32 stop token IDs allowed, got 33"),
        (json!({"messages": []}), 400, "Validation: The 'messages' field cannot be empty. At least one message is required."),
        (json!({"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}, {"role": "user", "content": "x"}]}),
            400, "Validation: `messages[0].tool_calls[0].function.arguments` must be a valid JSON object string"),
        (json!({"tools": [{"type": "function", "function": {"name": ""}}]}), 400, "Validation: Function name at index 0 cannot be empty"),
        (json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}), 400,
            "Validation: Function at index 0 has an invalid name: \"bad name\". Only a-z, A-Z, 0-9, underscores, and dashes are allowed."),
        (json!({"tool_choice": "required"}), 400, "Validation: tool_choice is \"required\" but tools is empty"),
        (json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}), 400,
            "Validation: tool named \"g\" in tool_choice is not present in tools"),
        (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "", "schema": {}}}}), 400,
            "Validation: `response_format.json_schema.name` cannot be empty"),
        (json!({"chat_template_args": {"chat_template": "x"}}), 400, "Validation: `chat_template` is not supported inside `chat_template_args`"),
        (json!({"stream_options": {"include_usage": true}}), 400, "Validation: The 'stream_options' field is only allowed when 'stream' is set to true."),
        (json!({"foo": 1, "bar": 2}), 400, "Validation: Unsupported parameter(s): `bar`, `foo`"),
        (json!({"function_call": "auto"}), 501, "Validation: `function_call` is deprecated. Please migrate to use `tool_choice` instead."),
        (json!({"functions": []}), 501, "Validation: `functions` is deprecated. Please migrate to use `tools` instead."),
        (json!({"model": "other"}), 404, "Model not found"),
        (json!({"max_tokens": 9000}), 400, "exceeds the model's context length of 8192 tokens"),
    ];
    for (patch, status, message) in cases {
        let (got_status, body) = post_json(&url, &merge(&base, &patch)).await;
        assert_eq!(got_status, status, "patch {patch}: {body}");
        let got = body["message"].as_str().unwrap_or("");
        assert!(
            got == message || (message.starts_with("exceeds") && got.contains(message)),
            "patch {patch}: got {got:?}, want {message:?}"
        );
        assert_eq!(body["code"], status, "{body}");
        assert!(body["type"].is_string());
    }
    // Pass-through extras are accepted, and bounds that pass are accepted.
    let ok = merge(
        &base,
        &json!({"temperature": 2, "top_p": 0, "n": 1, "cache_salt": "s", "stop_token_ids": [5], "seed": 1, "logit_bias": {"5": -100}}),
    );
    let (status, body) = post_json(&url, &ok).await;
    assert_eq!(status, 200, "{body}");
    server.stop().await;
}

#[actix_rt::test]
async fn completion_validation_rules() {
    let server = start("").await;
    let url = server.url("/v1/completions");
    let base = json!({"model": MODEL, "prompt": "hi"});
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"prompt": ""}),
            "Validation: Prompt string cannot be empty",
        ),
        (
            json!({"prompt": []}),
            "Validation: Prompt string array cannot be empty",
        ),
        (
            json!({"prompt": ["a", ""]}),
            "Validation: Prompt string at index 1 cannot be empty",
        ),
        (
            json!({"prompt": [[1], []]}),
            "Validation: Prompt integer array at index 1 cannot be empty",
        ),
        (
            json!({"logprobs": 6}),
            "Validation: Logprobs must be between 0 and 5, got 6",
        ),
        (
            json!({"best_of": 21}),
            "Validation: Best_of must be between 0 and 20, got 21",
        ),
        (
            json!({"best_of": 1, "n": 2}),
            "Validation: Best_of must be greater than or equal to n, got best_of=1and n=2",
        ),
        (
            json!({"suffix": "x".repeat(10_001)}),
            "Validation: Suffix is too long, maximum 10000 characters",
        ),
        (
            json!({"prompt": ["a", "b", "c"], "n": 43}),
            "Validation: Total choices (batch_size × n = 3 × 43 = 129) exceeds maximum of 128",
        ),
        (
            json!({"stream_options": {"include_usage": true}}),
            "Validation: The 'stream_options' field is only allowed when 'stream' is set to true.",
        ),
        (
            json!({"prompt": [99999999]}),
            "Validation: Prompt token id 99999999 is out of range for a vocabulary of 49152 tokens",
        ),
    ];
    for (patch, message) in cases {
        let (status, body) = post_json(&url, &merge(&base, &patch)).await;
        assert_eq!(status, 400, "patch {patch}: {body}");
        assert_eq!(body["message"], message, "patch {patch}");
        assert_eq!(body["type"], "Bad Request");
    }
    server.stop().await;
}

async fn raw_post(url: &str, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req = client().post(url);
    if let Some(ct) = content_type {
        req = req.insert_header(("content-type", ct));
    }
    let mut res = req.send_body(body).await.expect("request");
    let status = res.status().as_u16();
    let bytes = res.body().limit(1 << 20).await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[actix_rt::test]
async fn status_catalogue() {
    let server = start("http.body_limit_mb = 1\n").await;
    let url = server.url("/v1/chat/completions");

    // 400: not JSON, wrong types, missing fields — the parser's error follows the fixed prefix.
    for body in [
        &b"{not json"[..],
        br#"{"model": 5, "messages": []}"#,
        br#"{"messages": []}"#,
    ] {
        let (status, res) = raw_post(&url, Some("application/json"), body.to_vec()).await;
        assert_eq!(status, 400, "{res}");
        assert!(
            res["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("Failed to deserialize the JSON body into the target type: "),
            "{res}"
        );
        assert_eq!(res["type"], "Bad Request");
    }
    // Raw control characters inside strings are tolerated (lenient parsing).
    let lenient = format!(
        r#"{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "a{}b"}}]}}"#,
        '\t'
    );
    let (status, res) = raw_post(&url, Some("application/json"), lenient.into_bytes()).await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["choices"][0]["message"]["content"], "a\tb");

    // 415.
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let (status, res) = raw_post(&url, ct, chat_body("a").to_string().into_bytes()).await;
        assert_eq!(status, 415);
        assert_eq!(
            res,
            json!({"message": "Expected request with Content-Type application/json", "type": "Unsupported Media Type", "code": 415})
        );
    }
    let (status, _) = raw_post(
        &url,
        Some("application/vnd.dynamix+json; charset=utf-8"),
        chat_body("a").to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200);

    // 413.
    let big =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(1_100_000)}]});
    let (status, res) =
        raw_post(&url, Some("application/json"), big.to_string().into_bytes()).await;
    assert_eq!(status, 413);
    assert_eq!(
        res["message"],
        "Request body exceeds the limit of 1 MB set by DYN_HTTP_BODY_LIMIT_MB"
    );
    assert_eq!(res["type"], "Payload Too Large");

    // 404 route, 405 method.
    let (status, res) = raw_post(
        &server.url("/v1/nothing"),
        Some("application/json"),
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(res["message"], "Route not found: POST /v1/nothing");
    let (status, res) = get(&url).await;
    assert_eq!(status, 405, "{res}");

    // 431: too many metadata headers.
    let mut req = client()
        .post(&url)
        .insert_header(("content-type", "application/json"));
    for i in 0..65 {
        req = req.insert_header((format!("x-dynamo-meta-k{i}"), "v"));
    }
    let mut res = req
        .send_body(chat_body("a").to_string())
        .await
        .expect("request");
    assert_eq!(res.status().as_u16(), 431);
    let body: Value = res.json().await.expect("json");
    assert_eq!(
        body["message"],
        "metadata headers exceed the limit of 64 entries"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn overload_is_529_with_details_and_configurable() {
    // One engine admitting one request at a time; a slow echo holds the slot.
    let server = start("echo.token_delay_ms = 100\n[engine]\nadmission_capacity = 1\n").await;
    let url = server.url("/v1/chat/completions");
    let mut slow = chat_body("slow request");
    slow["stream"] = json!(true);
    let mut holder = client()
        .post(&url)
        .insert_header(("content-type", "application/json"))
        .send_body(slow.to_string())
        .await
        .expect("first");
    assert_eq!(holder.status().as_u16(), 200);
    let (status, body) = post_json(&url, &chat_body("second")).await;
    assert_eq!(status, 529, "{body}");
    assert_eq!(body["type"], "Overloaded");
    assert_eq!(body["message"], "Service temporarily overloaded");
    assert_eq!(body["details"]["admission_capacity"], 1);
    let metrics = get_text(&server.url("/metrics")).await;
    assert_eq!(
        metric_value(
            &metrics,
            "dynamo_frontend_model_rejection_total",
            &[("model", MODEL), ("endpoint", "chat_completions")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "dynamo_frontend_requests_total",
            &[
                ("model", MODEL),
                ("error_type", "overload"),
                ("status", "error")
            ]
        ),
        Some(1.0)
    );
    drop(holder.body());
    server.stop().await;

    let server = start("echo.token_delay_ms = 100\nhttp.overload_status_code = 503\n[engine]\nadmission_capacity = 1\n").await;
    let url = server.url("/v1/chat/completions");
    let _holder = client()
        .post(&url)
        .insert_header(("content-type", "application/json"))
        .send_body(slow.to_string())
        .await
        .expect("first");
    let (status, body) = post_json(&url, &chat_body("second")).await;
    assert_eq!((status, body["type"].clone()), (503, json!("Overloaded")));
    server.stop().await;
}

#[actix_rt::test]
async fn unknown_fields_can_be_ignored_by_config() {
    let server = start("[validator]\nignore_unsupported_fields = true\n").await;
    let mut body = chat_body("a");
    body["foo"] = json!(1);
    let (status, _) = post_json(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200);
    body["cache_salt"] = json!(5);
    let (status, res) = post_json(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(
        status, 400,
        "pass-through extras are still type-checked: {res}"
    );
    server.stop().await;
}
