//! Every route over real HTTP against the echo engines: chat, completions and responses (stream and
//! unary, folding), models, health, liveness, OpenAPI, docs, request ids, routing and path overrides.

mod common;

use common::*;
use serde_json::{json, Value};

#[actix_rt::test]
async fn chat_unary_echoes_last_user_message_with_exact_usage() {
    let server = start("").await;
    let body = json!({"model": MODEL, "messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "Héllo wörld 日本"}]});
    let (status, res) = post_json(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["object"], "chat.completion");
    assert_eq!(res["model"], MODEL);
    assert!(res["id"].as_str().unwrap_or("").starts_with("chatcmpl-"));
    assert_eq!(res["choices"][0]["message"]["role"], "assistant");
    assert_eq!(res["choices"][0]["message"]["content"], "Héllo wörld 日本");
    assert_eq!(res["choices"][0]["finish_reason"], "stop");
    let usage = &res["usage"];
    assert_eq!(
        usage["completion_tokens"],
        "Héllo wörld 日本".chars().count()
    );
    assert!(usage["prompt_tokens"].as_u64().unwrap_or(0) > 5);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap_or(0)
                + usage["completion_tokens"].as_u64().unwrap_or(0)
        )
    );
    server.stop().await;
}

#[actix_rt::test]
async fn chat_stream_framing_role_once_usage_and_done() {
    let server = start("").await;
    let mut body = chat_body("abc");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, text, content_type) = post_sse(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200);
    assert_eq!(content_type.as_deref(), Some("text/event-stream"));
    // Every frame is `data: ...` followed by a blank line.
    for frame in text.split_terminator("\n\n") {
        assert!(frame.starts_with("data: "), "bad frame {frame:?}");
        assert_eq!(frame.lines().count(), 1, "one line per frame: {frame:?}");
    }
    assert!(text.ends_with("data: [DONE]\n\n"));
    let chunks = sse_json(&text);
    let ids: Vec<&str> = chunks.iter().filter_map(|c| c["id"].as_str()).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "one id per stream");
    let roles = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["role"] == "assistant")
        .count();
    assert_eq!(roles, 1, "role only on the first chunk");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "abc");
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("stop")]);
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 3);
    for chunk in &chunks[..chunks.len() - 1] {
        assert!(chunk.get("usage").is_none(), "usage only on the last chunk");
        assert_eq!(chunk["object"], "chat.completion.chunk");
    }

    // Without include_usage: no usage chunk.
    let mut body = chat_body("xy");
    body["stream"] = json!(true);
    let (_, text, _) = post_sse(&server.url("/v1/chat/completions"), &body).await;
    assert!(sse_json(&text).iter().all(|c| c.get("usage").is_none()));
    server.stop().await;
}

#[actix_rt::test]
async fn unary_is_the_fold_of_the_stream() {
    let server = start("").await;
    let text_in = "fold me 🙂 please";
    let (_, unary) = post_json(&server.url("/v1/chat/completions"), &chat_body(text_in)).await;
    let mut body = chat_body(text_in);
    body["stream"] = json!(true);
    let (_, sse, _) = post_sse(&server.url("/v1/chat/completions"), &body).await;
    let streamed: String = sse_json(&sse)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(
        unary["choices"][0]["message"]["content"].as_str(),
        Some(streamed.as_str())
    );
    assert_eq!(streamed, text_in);
    server.stop().await;
}

#[actix_rt::test]
async fn completions_unary_stream_max_tokens_stop_and_batches() {
    let server = start("").await;
    let url = server.url("/v1/completions");
    let (status, res) = post_json(
        &url,
        &json!({"model": MODEL, "prompt": "hello world", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["object"], "text_completion");
    assert!(res["id"].as_str().unwrap_or("").starts_with("cmpl-"));
    assert_eq!(res["choices"][0]["text"], "hell");
    assert_eq!(res["choices"][0]["finish_reason"], "length");
    assert_eq!(res["usage"]["completion_tokens"], 4);

    // A stop string ends generation with finish_reason stop and is not emitted.
    let (_, res) = post_json(
        &url,
        &json!({"model": MODEL, "prompt": "hello world", "stop": ["o w"]}),
    )
    .await;
    assert_eq!(res["choices"][0]["text"], "hell");
    assert_eq!(res["choices"][0]["finish_reason"], "stop");
    let (_, res) = post_json(&url, &json!({"model": MODEL, "prompt": "hello world", "stop": "o w", "include_stop_str_in_output": true})).await;
    assert_eq!(res["choices"][0]["text"], "hello w");

    // Several prompts: one choice each, in order; usage sums the prompts.
    let (status, res) = post_json(&url, &json!({"model": MODEL, "prompt": ["ab", "cde"]})).await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["choices"][0]["text"], "ab");
    assert_eq!(res["choices"][1]["text"], "cde");
    assert_eq!(res["choices"][1]["index"], 1);
    assert_eq!(res["usage"]["completion_tokens"], 5);

    // Token-id prompts are decoded for echo.
    let (_, res) = post_json(
        &url,
        &json!({"model": MODEL, "prompt": [28120, 905], "echo": false}),
    )
    .await;
    assert!(
        res["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{res}"
    );

    // echo prepends the prompt.
    let (_, res) = post_json(&url, &json!({"model": MODEL, "prompt": "ab", "echo": true})).await;
    assert_eq!(res["choices"][0]["text"], "abab");

    // Streaming.
    let (status, sse, _) = post_sse(&url, &json!({"model": MODEL, "prompt": "xyz", "stream": true, "stream_options": {"include_usage": true}})).await;
    assert_eq!(status, 200);
    let chunks = sse_json(&sse);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(String::from))
        .collect();
    assert_eq!(text, "xyz");
    assert_eq!(
        chunks
            .last()
            .map(|c| c["usage"]["completion_tokens"].clone()),
        Some(json!(3))
    );
    assert!(sse.ends_with("data: [DONE]\n\n"));
    server.stop().await;
}

#[actix_rt::test]
async fn n_choices_each_echo() {
    let server = start("").await;
    let mut body = chat_body("hi");
    body["n"] = json!(3);
    let (status, res) = post_json(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200, "{res}");
    let choices = res["choices"].as_array().cloned().unwrap_or_default();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["content"], "hi");
    }
    assert_eq!(res["usage"]["completion_tokens"], 6);
    server.stop().await;
}

#[actix_rt::test]
async fn echo_core_echoes_the_templated_prompt_tokens() {
    let server = start("[engine]\nkind = \"echo_core\"\n").await;
    let mut body = chat_body("What is up?");
    // The template's first <|im_end|> is EOS: without ignore_eos, echo_core stops at the end of the
    // system turn; with it, the whole templated prompt comes back (special tokens skipped).
    let (_, res) = post_json(&server.url("/v1/chat/completions"), &body).await;
    let text = res["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        text.starts_with("system\nYou are a helpful AI assistant named SmolLM"),
        "{text:?}"
    );
    assert!(!text.contains("What is up?"), "{text:?}");
    assert_eq!(res["choices"][0]["finish_reason"], "stop");
    body["ignore_eos"] = json!(true);
    let (_, res) = post_json(&server.url("/v1/chat/completions"), &body).await;
    let text = res["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or("");
    assert!(text.contains("user\nWhat is up?\nassistant\n"), "{text:?}");
    assert_eq!(
        res["usage"]["completion_tokens"],
        res["usage"]["prompt_tokens"]
    );
    server.stop().await;
}

#[actix_rt::test]
async fn responses_unary_and_stream_events() {
    let server = start("").await;
    let url = server.url("/v1/responses");
    let (status, res) = post_json(
        &url,
        &json!({"model": MODEL, "input": "hey there", "instructions": "be brief"}),
    )
    .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["object"], "response");
    assert_eq!(res["status"], "completed");
    assert!(res["id"].as_str().unwrap_or("").starts_with("resp_"));
    assert_eq!(res["output"][0]["type"], "message");
    assert_eq!(res["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(res["output"][0]["content"][0]["text"], "hey there");
    assert_eq!(res["usage"]["output_tokens"], 9);
    assert_eq!(res["temperature"], 1.0);
    assert_eq!(res["tool_choice"], "auto");

    let (status, sse, _) = post_sse(
        &url,
        &json!({"model": MODEL, "input": [{"role": "user", "content": "ok"}], "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let events: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(
        events,
        vec![
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let seq: Vec<u64> = sse_json(&sse)
        .iter()
        .filter_map(|v| v["sequence_number"].as_u64())
        .collect();
    assert_eq!(seq, (0..10).collect::<Vec<u64>>());
    assert!(sse.ends_with("data: [DONE]\n\n"));

    let (status, res) = post_json(
        &url,
        &json!({"model": MODEL, "input": "x", "previous_response_id": "resp_1"}),
    )
    .await;
    assert_eq!(status, 501, "{res}");
    assert!(res["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("Validation: "));
    let (status, res) = post_json(
        &server.url("/v1/responses/input_tokens"),
        &json!({"model": MODEL, "input": "123456789"}),
    )
    .await;
    assert_eq!((status, res["input_tokens"].clone()), (200, json!(3)));
    server.stop().await;
}

#[actix_rt::test]
async fn models_health_live_openapi_docs() {
    let server = start("").await;
    let (status, models) = get(&server.url("/v1/models")).await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["context_window"], 8192);
    let (status, model) = get(&server.url(&format!("/v1/models/{MODEL}"))).await;
    assert_eq!((status, model["id"].clone()), (200, json!(MODEL)));
    let (status, ready) = get(&server.url(&format!("/v1/models/{MODEL}/ready"))).await;
    assert_eq!((status, ready["ready"].clone()), (200, json!(true)));
    let (status, missing) = get(&server.url("/v1/models/org/other-model")).await;
    assert_eq!(status, 404);
    assert_eq!(
        missing,
        json!({"message": "Model not found", "type": "Not Found", "code": 404})
    );

    let (status, health) = get(&server.url("/health")).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["message"], "Service is healthy");
    assert_eq!(health["initial_discovery_complete"], true);
    assert!(health["initial_discovery_error"].is_null());
    assert_eq!(health["instances"].as_array().map(Vec::len), Some(1));
    let (status, live) = get(&server.url("/live")).await;
    assert_eq!(
        (status, live),
        (200, json!({"status": "live", "message": "Service is live"}))
    );

    let (status, doc) = get(&server.url("/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap_or("").starts_with("3."));
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/models",
        "/health",
        "/metrics",
    ] {
        assert!(doc["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    assert_eq!(
        doc["paths"]["/v1/chat/completions"]["post"]["operationId"],
        "post_v1_chat_completions"
    );
    let docs = get_text(&server.url("/docs")).await;
    assert!(docs.contains("/openapi.json") && docs.contains("<html"));
    server.stop().await;
}

#[actix_rt::test]
async fn request_ids_are_echoed_and_canonical() {
    let server = start("").await;
    let id = "0b6f3c1e-5a0c-4d6b-9f3a-2f1e0d9c8b7a";
    let mut res = client()
        .post(server.url("/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .insert_header(("x-request-id", "my-trace-123"))
        .insert_header(("request-id", id))
        .send_body(chat_body("a").to_string())
        .await
        .expect("request");
    assert_eq!(
        res.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("my-trace-123")
    );
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["id"], format!("chatcmpl-{id}"));

    let mut res = client()
        .post(server.url("/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .insert_header(("request-id", "not-a-uuid"))
        .send_body(chat_body("a").to_string())
        .await
        .expect("request");
    assert!(res.headers().get("x-request-id").is_none());
    let body: Value = res.json().await.expect("json");
    let generated = body["id"]
        .as_str()
        .unwrap_or("")
        .trim_start_matches("chatcmpl-")
        .to_string();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");

    // x-request-id is echoed on errors too, and the request_id annotation comes first when asked.
    let res = client()
        .get(server.url("/nope"))
        .insert_header(("x-request-id", "e1"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        res.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("e1")
    );
    let mut body = chat_body("a");
    body["stream"] = json!(true);
    body["nvext"] = json!({"annotations": ["request_id"]});
    let res = client()
        .post(server.url("/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .insert_header(("request-id", id))
        .send_body(body.to_string())
        .await;
    let mut res = res.expect("request");
    let text = String::from_utf8(res.body().await.expect("body").to_vec()).expect("utf8");
    assert!(
        text.starts_with(&format!("event: request_id\n: \"{id}\"\n\n")),
        "{text}"
    );
    server.stop().await;
}

#[actix_rt::test]
async fn round_robin_spreads_and_header_pins_engine() {
    let server = start("[engine]\ndevices = [\"cpu:0\", \"cpu:1\"]\n").await;
    for _ in 0..4 {
        let (status, _) = post_json(&server.url("/v1/chat/completions"), &chat_body("abcd")).await;
        assert_eq!(status, 200);
    }
    let (_, health) = get(&server.url("/health")).await;
    let tokens: Vec<u64> = health["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["generated_tokens"].as_u64())
        .collect();
    assert_eq!(tokens, vec![8, 8], "round-robin alternates: {health}");

    for _ in 0..3 {
        let res = client()
            .post(server.url("/v1/chat/completions"))
            .insert_header(("content-type", "application/json"))
            .insert_header(("x-dynamo-worker-instance-id", "1"))
            .send_body(chat_body("ab").to_string())
            .await
            .expect("request");
        assert_eq!(res.status().as_u16(), 200);
    }
    let mut body = chat_body("ab");
    body["nvext"] = json!({"backend_instance_id": 1});
    let (status, _) = post_json(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 200);
    let (_, health) = get(&server.url("/health")).await;
    let tokens: Vec<u64> = health["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["generated_tokens"].as_u64())
        .collect();
    assert_eq!(tokens, vec![8, 16], "pinned to instance 1: {health}");

    body["nvext"] = json!({"backend_instance_id": 7});
    let (status, res) = post_json(&server.url("/v1/chat/completions"), &body).await;
    assert_eq!(status, 503, "{res}");
    server.stop().await;
}

#[actix_rt::test]
async fn route_paths_can_be_overridden() {
    let server = start("[http.paths]\nchat = \"/custom/chat\"\nhealth = \"/ready\"\n").await;
    let (status, _) = post_json(&server.url("/custom/chat"), &chat_body("a")).await;
    assert_eq!(status, 200);
    let (status, body) = post_json(&server.url("/v1/chat/completions"), &chat_body("a")).await;
    assert_eq!(status, 404);
    assert_eq!(
        body["message"],
        "Route not found: POST /v1/chat/completions"
    );
    let (status, _) = get(&server.url("/ready")).await;
    assert_eq!(status, 200);
    server.stop().await;
}
