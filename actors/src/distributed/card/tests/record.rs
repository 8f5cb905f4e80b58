//! Reading and writing the card record: the record Dynamo's mocker wrote, keys and slugs, optional
//! and unknown fields, rejection of unservable cards, adapters and router modes.

use super::*;

#[test]
fn the_captured_dynamo_card_round_trips() {
    let original = sample_value();
    let record = CardRecord::from_json(&sample_bytes()).expect("parse");
    assert_eq!(record.record_type, "Model");
    assert_eq!(record.instance_id, 2324035810052302597);
    assert_eq!(
        record.key(),
        "v1/mdc/dynamo/backend/generate/2040a24187746705"
    );
    let card = &record.card_json;
    assert_eq!(card.display_name, "mock-model");
    assert_eq!(card.slug, "mock-model");
    assert_eq!(card.kv_cache_block_size, 64);
    assert_eq!(card.architectural_max_context_length, Some(4096));
    assert_eq!(card.served_context_length(), Some(4096));
    assert_eq!(card.runtime_config.total_kv_blocks, Some(16384));
    assert_eq!(
        card.tokenizer_file().map(|f| f.path.as_str()),
        Some("/tmp/dynvenv/model/tokenizer.json")
    );
    assert_eq!(card.file_refs().len(), 5);

    let written: Value = serde_json::from_str(&record.to_json().expect("serialise")).expect("JSON");
    assert_eq!(written, original);
}

#[test]
fn card_keys_and_slugs_follow_dynamo() {
    assert_eq!(
        card_key("ns", "backend", "generate", 255),
        "v1/mdc/ns/backend/generate/ff"
    );
    assert_eq!(slug("mock-model"), "mock-model");
    assert_eq!(slug("Qwen/Qwen3-0.6B"), "qwen_qwen3-0_6b");
    assert_eq!(slug("/x"), "x");
    assert_eq!(
        metadata_url(
            "10.0.0.2:9090",
            "dynamo",
            "backend",
            "generate",
            "m",
            "tokenizer.json"
        ),
        "http://10.0.0.2:9090/v1/metadata/dynamo/backend/generate/m/_base/tokenizer.json"
    );
}

#[test]
fn reading_ignores_unknown_and_optional_fields() {
    let mut value = sample_value();
    for pointer in [
        "/card_json/gen_config",
        "/card_json/runtime_config",
        "/card_json/media_decoder",
        "/card_json/worker_type",
        "/card_json/context_length",
        "/card_json/tokenizer/hf_tokenizer_json/size",
    ] {
        remove(&mut value, pointer);
    }
    let card = value["card_json"].as_object_mut().expect("object");
    card.insert("aliases".into(), json!(["other-name"]));
    card.insert("lora".into(), json!({"name": "x"}));
    card.insert("future_field".into(), json!({"nested": [1, 2]}));
    let record =
        CardRecord::from_json(&serde_json::to_vec(&value).expect("serialise")).expect("parse");
    assert_eq!(record.card_json.display_name, "mock-model");
    assert_eq!(record.card_json.tokenizer_file().and_then(|f| f.size), None);
    assert_eq!(record.card_json.gen_config, None);
}

/// A change to a record, and the field its rejection must name.
type Case = (&'static str, Box<dyn FnOnce(&mut Value)>);

#[test]
fn a_card_that_cannot_be_served_is_rejected_naming_the_field() {
    let cases: [Case; 7] = [
        (
            "card_json.display_name",
            Box::new(|v| remove(v, "/card_json/display_name")),
        ),
        (
            "card_json.tokenizer.hf_tokenizer_json",
            Box::new(|v| remove(v, "/card_json/tokenizer")),
        ),
        (
            "card_json.tokenizer.hf_tokenizer_json.checksum",
            Box::new(|v| remove(v, "/card_json/tokenizer/hf_tokenizer_json/checksum")),
        ),
        (
            "card_json.model_info.hf_config_json.checksum",
            Box::new(|v| remove(v, "/card_json/model_info/hf_config_json/checksum")),
        ),
        (
            "card_json.chat_template_file.hf_chat_template.file.checksum",
            Box::new(|v| {
                v["card_json"]["chat_template_file"]["hf_chat_template"]["file"]["checksum"] =
                    json!("blake3:not-hex")
            }),
        ),
        (
            "card_json.kv_cache_block_size",
            Box::new(|v| remove(v, "/card_json/kv_cache_block_size")),
        ),
        ("type", Box::new(|v| v["type"] = json!("EventChannel"))),
    ];
    for (field, edit) in cases {
        let message = rejection(edit);
        assert!(message.contains(field), "{field}: {message}");
    }
    let message = match CardRecord::from_json(b"{\"type\":\"Model\"") {
        Ok(record) => panic!("accepted {record:?}"),
        Err(error) => error.to_string(),
    };
    assert!(message.contains("not valid JSON"), "{message}");
}

#[test]
fn adapters_user_data_and_router_modes_are_read_from_the_card() {
    use crate::router::RouterMode;
    let mut value = sample_value();
    value["card_json"]["lora"] = serde_json::json!({"name": "tail", "base_model_path": "/m"});
    value["card_json"]["user_data"] = serde_json::json!({"lora_id": 7});
    value["card_json"]["router_config"] = serde_json::json!({"router_mode": "KV"});
    let record = CardRecord::from_json(value.to_string().as_bytes()).unwrap();
    let card = &record.card_json;
    assert_eq!(card.lora.as_ref().map(|l| l.name.as_str()), Some("tail"));
    assert_eq!(card.user_data, Some(serde_json::json!({"lora_id": 7})));
    assert_eq!(card.router_mode(), Ok(Some(RouterMode::Kv)));
    // Written back as they came.
    let again: Value = serde_json::from_str(&record.to_json().unwrap()).unwrap();
    assert_eq!(
        again["card_json"]["user_data"],
        value["card_json"]["user_data"]
    );
    let mut card = card.clone();
    for (mode, expected) in [
        (
            serde_json::json!("RoundRobin"),
            Ok(Some(RouterMode::RoundRobin)),
        ),
        (serde_json::json!("Random"), Ok(Some(RouterMode::Random))),
        (Value::Null, Ok(None)),
        (
            serde_json::json!("Direct"),
            Err("router_config.router_mode \"Direct\" is not one of RoundRobin, Random, KV".into()),
        ),
    ] {
        card.router_config = Some(serde_json::json!({ "router_mode": mode }));
        assert_eq!(card.router_mode(), expected);
    }
}
