//! The wire types against what Dynamo 1.6.1 wrote and accepted (interop spec, captured records).

use serde_json::json;

use super::events::{self, ActiveLoad, EventEnvelope};
use super::request::PreprocessedRequest;
use super::response::{FinishReasonWire, LlmEngineOutput, StreamItem, WireItem};
use super::*;
use crate::error::{ApiError, ErrorClass};
use crate::kv::protocol::{KvCacheEventData, RouterEvent};
use crate::protocol::engine::{
    EngineOutput, EngineRequest, SamplingOptions, StopConditions, TokenLogprob,
};
use crate::protocol::FinishReason;

/// The instance record a Dynamo 1.6.1 mocker wrote.
const DYNAMO_INSTANCE: &str = r#"{"type":"Endpoint","component":"backend","endpoint":"generate","namespace":"dynamo","instance_id":2324035810052302597,"transport":{"tcp":"127.0.0.1:42209/2040a24187746705/dynamo/backend/generate"},"device_type":"cuda","request_plane_codec":"msgpack"}"#;

#[test]
fn dynamo_instance_records_parse_with_their_path_and_codec() {
    let instance: Instance = serde_json::from_str(DYNAMO_INSTANCE).unwrap();
    instance.check().unwrap();
    let target = instance.tcp_target().unwrap();
    assert_eq!(target.address, "127.0.0.1:42209");
    assert_eq!(target.path, "2040a24187746705/dynamo/backend/generate");
    assert_eq!(instance.codec(), PayloadCodec::Msgpack);
    assert!(!instance.is_dynamix());
}

#[test]
fn transports_without_a_path_or_with_a_scheme_are_accepted() {
    let mut instance: Instance = serde_json::from_str(DYNAMO_INSTANCE).unwrap();
    instance.transport = Transport::Tcp("tcp://10.0.0.1:4000".into());
    let target = instance.tcp_target().unwrap();
    assert_eq!(target.address, "10.0.0.1:4000");
    assert_eq!(target.path, "2040a24187746705/dynamo/backend/generate");
    for bad in ["tcp://", "nohost", ":80/x", "h:99999/x"] {
        instance.transport = Transport::Tcp(bad.into());
        let error = instance.tcp_target().unwrap_err().to_string();
        assert!(error.contains("transport.tcp"), "{error}");
    }
    instance.transport = Transport::NatsTcp("dynamo_backend.generate-1".into());
    assert!(instance
        .tcp_target()
        .unwrap_err()
        .to_string()
        .contains("TCP request plane"));
    instance.kind = Some("Model".into());
    assert!(instance.check().unwrap_err().to_string().contains("type"));
    instance.kind = Some("Endpoint".into());
    instance.request_plane_codec = Some("cbor".into());
    assert!(instance
        .check()
        .unwrap_err()
        .to_string()
        .contains("request_plane_codec"));
}

#[test]
fn our_records_have_dynamos_shape() {
    let mut record = Instance::endpoint(
        "dynamo",
        "backend",
        "generate",
        0x2040a24187746705,
        "127.0.0.1:4000",
        PayloadCodec::Msgpack,
    );
    record.engine = Some("mocker".into());
    let value = serde_json::to_value(&record).unwrap();
    assert_eq!(value["type"], "Endpoint");
    assert_eq!(
        value["transport"]["tcp"],
        "127.0.0.1:4000/2040a24187746705/dynamo/backend/generate"
    );
    assert_eq!(value["request_plane_codec"], "msgpack");
    assert!(record.is_dynamix());
}

/// The body a Dynamo 1.6.1 frontend sent (JSON form).
fn dynamo_request() -> serde_json::Value {
    json!({
        "model": "mock-model",
        "token_ids": [1, 2, 3],
        "stop_conditions": {"max_tokens": 5, "stop": ["xyz"], "stop_token_ids": null,
            "stop_token_ids_visible": null, "stop_token_ids_hidden": [2], "min_tokens": null,
            "ignore_eos": null, "max_thinking_tokens": null},
        "sampling_options": {"n": null, "best_of": null, "presence_penalty": null,
            "frequency_penalty": null, "repetition_penalty": null, "temperature": 0.7,
            "top_p": null, "top_k": null, "min_p": null, "use_beam_search": null,
            "length_penalty": null, "seed": 42, "include_stop_str_in_output": null,
            "guided_decoding": null},
        "output_options": {"logprobs": 2, "prompt_logprobs": null, "skip_special_tokens": null,
            "formatted_prompt": null, "return_tokens_as_token_ids": null},
        "eos_token_ids": [2],
        "mdc_sum": "ab",
        "annotations": [],
        "routing": {},
        "router_config_override": null,
        "some_future_field": {"x": 1}
    })
}

#[test]
fn a_dynamo_request_becomes_an_engine_request() {
    let wire: PreprocessedRequest = serde_json::from_value(dynamo_request()).unwrap();
    let request = wire.into_engine_request("req-1".into()).unwrap();
    assert_eq!(request.request_id, "req-1");
    assert_eq!(request.model, "mock-model");
    assert_eq!(request.token_ids, vec![1, 2, 3]);
    assert_eq!(request.stop.max_tokens, Some(5));
    assert_eq!(request.stop.stop, vec!["xyz".to_string()]);
    assert_eq!(request.stop.stop_token_ids, vec![2]);
    assert_eq!(request.sampling.temperature, Some(0.7));
    assert_eq!(request.sampling.seed, Some(42));
    assert_eq!(request.sampling.logprobs, Some(2));
    // token_ids alone is enough.
    let minimal: PreprocessedRequest = serde_json::from_value(json!({"token_ids": [5]})).unwrap();
    let request = minimal.into_engine_request("r".into()).unwrap();
    assert_eq!(request.stop.max_tokens, None);
    // ignore_eos drops the EOS ids.
    let mut body = dynamo_request();
    body["stop_conditions"]["ignore_eos"] = json!(true);
    body["stop_conditions"]["stop_token_ids_hidden"] = json!(null);
    let request = serde_json::from_value::<PreprocessedRequest>(body)
        .unwrap()
        .into_engine_request("r".into())
        .unwrap();
    assert!(request.stop.stop_token_ids.is_empty());
    assert!(request.stop.ignore_eos);
}

#[test]
fn requests_dynamix_cannot_serve_are_named() {
    for (patch, field) in [
        (json!({"token_ids": []}), "token_ids"),
        (
            json!({"token_ids": [1], "sampling_options": {"use_beam_search": true}}),
            "use_beam_search",
        ),
        (
            json!({"token_ids": [1], "sampling_options": {"n": 3}}),
            "sampling_options.n",
        ),
    ] {
        let wire: PreprocessedRequest = serde_json::from_value(patch).unwrap();
        let error = wire
            .into_engine_request("r".into())
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{error} should name {field}");
    }
    assert!(serde_json::from_value::<PreprocessedRequest>(json!({"model": "m"})).is_err());
}

fn engine_request() -> EngineRequest {
    EngineRequest {
        request_id: "req-9".into(),
        model: "m".into(),
        token_ids: vec![10, 11],
        echo_text: "hello".into(),
        sampling: SamplingOptions {
            temperature: Some(0.5),
            seed: Some(u64::MAX),
            logit_bias: vec![(3, -100.0)],
            logprobs: Some(1),
            ..SamplingOptions::default()
        },
        stop: StopConditions {
            max_tokens: Some(9),
            stop: vec!["\n".into()],
            stop_token_ids: vec![2, 7],
            ignore_eos: false,
            min_tokens: 1,
            include_stop_str_in_output: true,
        },
        pinned_engine: Some(3),
        resumed_outputs: 4,
    }
}

#[test]
fn engine_requests_round_trip_between_dynamix_peers_in_both_codecs() {
    let request = engine_request();
    let wire = PreprocessedRequest::from_engine_request(&request, true);
    for codec in [PayloadCodec::Json, PayloadCodec::Msgpack] {
        let bytes = codec.encode(&wire).unwrap();
        let back: PreprocessedRequest = codec.decode(&bytes).unwrap();
        let back = back.into_engine_request("req-9".into()).unwrap();
        let expected = EngineRequest {
            pinned_engine: None,
            ..request.clone()
        };
        assert_eq!(back, expected, "{codec:?}");
    }
    // Towards a Dynamo worker: no extension, Dynamo's fields only.
    let value =
        serde_json::to_value(PreprocessedRequest::from_engine_request(&request, false)).unwrap();
    assert!(value.get("extra_args").is_none());
    assert_eq!(value["stop_conditions"]["max_tokens"], 9);
    assert_eq!(
        value["stop_conditions"]["stop_token_ids_hidden"],
        json!([2, 7])
    );
    assert_eq!(value["sampling_options"]["seed"], -1);
    assert_eq!(value["output_options"]["logprobs"], 1);
}

#[test]
fn outputs_round_trip_and_dynamo_outputs_decode() {
    let output = EngineOutput {
        token_ids: vec![5, 6],
        text: None,
        finish_reason: Some(FinishReason::Length),
        logprobs: vec![
            TokenLogprob {
                token_id: 5,
                logprob: -0.5,
                top: vec![(5, -0.5), (9, -1.5)],
            },
            TokenLogprob {
                token_id: 6,
                logprob: -0.25,
                top: vec![(6, -0.25), (1, -2.0)],
            },
        ],
        cached_tokens: None,
    };
    for codec in [PayloadCodec::Json, PayloadCodec::Msgpack] {
        let bytes = codec.encode(&StreamItem::of(&Ok(output.clone()))).unwrap();
        let item: StreamItem = codec.decode(&bytes).unwrap();
        assert!(!item.complete_final);
        let event = item.data.unwrap().into_event().unwrap().unwrap();
        assert_eq!(event, output, "{codec:?}");
    }
    // A frame Dynamo's mocker wrote.
    let frame = json!({"data": {"data": {"token_ids": [1980], "tokens": null, "text": null,
        "output_type": "text", "cum_log_probs": null, "log_probs": null, "top_logprobs": null,
        "finish_reason": null, "index": null, "completion_usage": {"prompt_tokens": 17,
        "completion_tokens": 1, "total_tokens": 18, "prompt_tokens_details":
        {"audio_tokens": null, "cached_tokens": 0}}}}, "complete_final": false});
    let item: StreamItem = serde_json::from_value(frame).unwrap();
    let event = item.data.unwrap().into_event().unwrap().unwrap();
    assert_eq!(event.token_ids, vec![1980]);
    assert_eq!(event.cached_tokens, Some(0), "from completion_usage");
    for (reason, expected) in [
        (json!("eos"), Some(FinishReason::Stop)),
        (json!("stop"), Some(FinishReason::Stop)),
        (json!("length"), Some(FinishReason::Length)),
        (json!("abort"), Some(FinishReason::Cancelled)),
        (json!("content_filter"), Some(FinishReason::ContentFilter)),
    ] {
        let out: LlmEngineOutput =
            serde_json::from_value(json!({"token_ids": [], "finish_reason": reason})).unwrap();
        assert_eq!(out.into_event().unwrap().unwrap().finish_reason, expected);
    }
    let failed: LlmEngineOutput =
        serde_json::from_value(json!({"token_ids": [], "finish_reason": {"error": "oom"}}))
            .unwrap();
    assert_eq!(
        failed.finish_reason,
        Some(FinishReasonWire::Error("oom".into()))
    );
    assert_eq!(failed.into_event().unwrap().unwrap_err().message, "oom");
    // A Python engine's "error" (with or without a reason) is an error too.
    for (reason, message) in [
        ("error", "the worker's engine failed"),
        (
            "error: CUDA out of memory",
            "the worker's engine failed: CUDA out of memory",
        ),
    ] {
        let failed: LlmEngineOutput =
            serde_json::from_value(json!({"token_ids": [], "finish_reason": reason})).unwrap();
        assert_eq!(failed.into_event().unwrap().unwrap_err().message, message);
    }
    // A reason from a newer peer ends the stream as a stop; a malformed one is an error.
    let newer: LlmEngineOutput =
        serde_json::from_value(json!({"token_ids": [], "finish_reason": "exploded"})).unwrap();
    assert_eq!(
        newer.finish_reason,
        Some(FinishReasonWire::Unknown("exploded".into()))
    );
    assert_eq!(
        newer.into_event().unwrap().unwrap().finish_reason,
        Some(FinishReason::Stop)
    );
    let msgpack =
        rmp_serde::to_vec_named(&json!({"token_ids": [], "finish_reason": "exploded"})).unwrap();
    let newer: LlmEngineOutput = rmp_serde::from_slice(&msgpack).unwrap();
    assert_eq!(
        newer.finish_reason,
        Some(FinishReasonWire::Unknown("exploded".into()))
    );
    assert!(serde_json::from_value::<LlmEngineOutput>(
        json!({"token_ids": [], "finish_reason": 7})
    )
    .is_err());
    // The final frame has no data key, in both codecs.
    assert_eq!(
        serde_json::to_value(StreamItem::complete()).unwrap(),
        json!({"complete_final": true})
    );
    assert_eq!(
        rmp_serde::to_vec_named(&StreamItem::complete()).unwrap(),
        b"\x81\xaecomplete_final\xc3".to_vec()
    );
}

#[test]
fn errors_carry_dynamos_object_and_come_back_with_their_class() {
    for class in [
        ErrorClass::BadRequest,
        ErrorClass::Validation,
        ErrorClass::NotFound,
        ErrorClass::Overloaded,
        ErrorClass::Unavailable,
        ErrorClass::Cancelled,
        ErrorClass::Timeout,
        ErrorClass::Internal,
    ] {
        let error = ApiError::new(class, "it failed");
        let item = WireItem::from_event(&Err(error.clone()));
        let value = serde_json::to_value(&item).unwrap();
        assert_eq!(value["event"], "error");
        assert!(value.get("data").is_none(), "no data on an error item");
        assert_eq!(value["error"]["public"]["message"], "it failed");
        let back = item.into_event().unwrap().unwrap_err();
        assert_eq!((back.class, back.message.as_str()), (class, "it failed"));
    }
    let validation = serde_json::to_value(WireItem::from_event(&Err(ApiError::new(
        ErrorClass::Validation,
        "x",
    ))))
    .unwrap();
    assert_eq!(validation["error"]["class"], "InvalidRequest");
    assert_eq!(validation["error"]["reason"], "request.invalid_argument");
    // Dynamo 1.6.1's own error item.
    let item: WireItem = serde_json::from_value(json!({"event": "error", "error": {
        "error_type": "InvalidArgument", "class": "InvalidRequest",
        "reason": "request.invalid_argument", "message": "max_tokens required",
        "diagnostic": "d", "public": {"type": "message", "message": "max_tokens required"}}}))
    .unwrap();
    let error = item.into_event().unwrap().unwrap_err();
    assert_eq!(error.class, ErrorClass::Validation);
    assert_eq!(error.message, "max_tokens required");
    // Older items: text in comment; unknown classes are internal.
    let item: WireItem =
        serde_json::from_value(json!({"event": "error", "comment": ["boom"]})).unwrap();
    assert_eq!(item.into_event().unwrap().unwrap_err().message, "boom");
    let item: WireItem = serde_json::from_value(
        json!({"event": "error", "error": {"class": "Mystery", "message": "?"}}),
    )
    .unwrap();
    assert_eq!(
        item.into_event().unwrap().unwrap_err().class,
        ErrorClass::Internal
    );
    assert!(WireItem::default().into_event().is_err());
}

#[test]
fn kv_event_batches_travel_in_envelopes() {
    // A RouterEvent as Dynamo's mocker published it (JSON view of the msgpack payload).
    let dynamo_event = json!({"worker_id": 2324035801584301319u64, "storage_tier": "device",
        "residency_domain": "worker", "event": {"event_id": 1, "data": {"stored": {
        "parent_hash": null, "start_position": null, "blocks": [
            {"block_hash": 11264587614749111611u64, "tokens_hash": 11264587614749111611u64, "mm_extra_info": null},
            {"block_hash": 5685786748178303360u64, "tokens_hash": 9298609696122010354u64, "mm_extra_info": null}]}},
        "dp_rank": 0}});
    let payload = rmp_serde::to_vec_named(&vec![dynamo_event]).unwrap();
    let envelope = EventEnvelope {
        publisher_id: 0x72e252ec398c7,
        sequence: 0,
        published_at: 1,
        topic: events::KV_EVENTS.into(),
        payload,
    };
    let bytes = envelope.encode().unwrap();
    let back = EventEnvelope::decode(&bytes).unwrap();
    assert_eq!(back, envelope);
    let batch: Vec<RouterEvent> = back.payload().unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].worker_id, 2324035801584301319);
    let KvCacheEventData::Stored(stored) = &batch[0].event.data else {
        panic!("not stored")
    };
    assert_eq!(stored.blocks[1].tokens_hash, 9298609696122010354);
    // Our own batches decode the same way, including `removed` and `cleared`.
    let ours = vec![
        RouterEvent {
            worker_id: 1,
            event: crate::kv::protocol::KvCacheEvent {
                event_id: 2,
                data: KvCacheEventData::Cleared,
                dp_rank: 0,
            },
        },
        batch[0].clone(),
    ];
    let decoded: Vec<RouterEvent> =
        rmp_serde::from_slice(&rmp_serde::to_vec_named(&ours).unwrap()).unwrap();
    assert_eq!(decoded, ours);
    // A single map instead of a batch is refused, as Dynamo refuses it.
    let single = EventEnvelope {
        payload: rmp_serde::to_vec_named(&ours[0]).unwrap(),
        ..envelope.clone()
    };
    assert!(single.payload::<Vec<RouterEvent>>().is_err());
    assert!(EventEnvelope::decode(b"{\"json\": true}").is_err());
    let load: ActiveLoad = rmp_serde::from_slice(
        &rmp_serde::to_vec_named(&json!({"worker_id": 5, "dp_rank": 0,
            "active_decode_blocks": null, "active_prefill_tokens": null, "kv_used_blocks": 3}))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(load.kv_used_blocks, Some(3));
}

#[test]
fn event_registration_records_match_dynamos() {
    let records = events::registration_records(
        "dynamo",
        "backend",
        "generate",
        0x72e252ec398c7,
        99,
        &[events::KV_EVENTS, events::KV_METRICS],
    )
    .unwrap();
    let keys: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "v1/event_channels/namespace/dynamo/component/backend/endpoint/generate/topic/kv-events/72e252ec398c7",
            "v1/event_channels/namespace/dynamo/component/backend/endpoint/generate/topic/kv_metrics/72e252ec398c7",
            "v1/event_sources/namespace/dynamo/component/backend/endpoint/generate/topic/kv-events/72e252ec398c7",
        ]
    );
    let channel: serde_json::Value = serde_json::from_slice(&records[0].1).unwrap();
    assert_eq!(
        channel,
        json!({"type": "EventChannel", "scope": {"kind": "endpoint", "endpoint":
            {"namespace": "dynamo", "component": "backend", "name": "generate"}},
            "topic": "kv-events", "instance_id": 0x72e252ec398c7u64,
            "transport": {"kind": "Nats", "config": {"subject_prefix":
            "namespace.dynamo.component.backend.endpoint.generate"}}})
    );
    let source: serde_json::Value = serde_json::from_slice(&records[2].1).unwrap();
    assert_eq!(
        source["metadata"]["worker"],
        json!({"worker_id": 99, "dp_rank": 0})
    );
    assert_eq!(source["publisher_id"], 0x72e252ec398c7u64);
}

#[test]
fn a_handlers_own_status_survives_for_4xx_and_503_only() {
    let with = |status: u16, error_type: &str, class: &str| {
        let mut error = DynamoError::new(error_type, class, "r", "why");
        error.status = Some(status);
        ApiError::from(&error)
    };
    let forbidden = with(403, "InvalidArgument", "InvalidRequest");
    assert_eq!(forbidden.status(429), 403);
    assert_eq!(forbidden.body(429)["type"], "Forbidden");
    assert_eq!(forbidden.message, "why");
    assert_eq!(with(503, "Unavailable", "Unavailable").status(429), 503);
    let bad_gateway = with(502, "Internal", "Internal");
    assert_eq!(
        (bad_gateway.class, bad_gateway.status(429)),
        (ErrorClass::Internal, 500)
    );
    // Without a status, the class decides, and the field is not written.
    let plain = DynamoError::new("NotFound", "NotFound", "request.not_found", "gone");
    assert_eq!(ApiError::from(&plain).status(429), 404);
    assert!(!serde_json::to_string(&plain).unwrap().contains("status"));
}
