//! Tests of the model deployment card: the record Dynamo 1.6.1's mocker wrote (captured from
//! etcd, its files in `tests/fixtures/dynamo-model`), rejection of unservable cards, fetching
//! files from disk and over HTTP from a local server, and a SmolLM2 card written and loaded back.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::models::tests::TempDir;
use crate::tokenizer::{ChatMessage, ModelTokenizer};

/// Where the mocker's model files were when the card was captured.
const CAPTURED_DIR: &str = "/tmp/dynvenv/model";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dynamo-model")
}

/// The captured record, verbatim.
fn sample_bytes() -> Vec<u8> {
    std::fs::read(fixture_dir().join("mdc.json")).expect("read the captured card")
}

fn sample_value() -> Value {
    serde_json::from_slice(&sample_bytes()).expect("the captured card is JSON")
}

/// The captured record with its paths pointing at the fixture files.
fn sample_record_here() -> CardRecord {
    let dir = std::fs::canonicalize(fixture_dir()).expect("fixture dir");
    let text = String::from_utf8(sample_bytes())
        .expect("UTF-8")
        .replace(CAPTURED_DIR, &dir.to_string_lossy());
    CardRecord::from_json(text.as_bytes()).expect("the captured card is servable")
}

fn no_cache() -> FetchOptions {
    FetchOptions {
        cache_dir: None,
        ..FetchOptions::default()
    }
}

fn rejection(edit: impl FnOnce(&mut Value)) -> String {
    let mut value = sample_value();
    edit(&mut value);
    let bytes = serde_json::to_vec(&value).expect("serialise");
    match CardRecord::from_json(&bytes) {
        Ok(record) => panic!("accepted {record:?}"),
        Err(error) => error.to_string(),
    }
}

fn remove(value: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer with a parent");
    value
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("parent object")
        .remove(key)
        .expect("field present");
}

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

#[tokio::test]
async fn local_files_are_read_and_verified() {
    let tmp = TempDir::new("card-local");
    let path = tmp.path().join("tokenizer.json");
    std::fs::write(&path, b"{\"hello\": 1}").expect("write");
    let good = FileRef::for_bytes(path.to_string_lossy(), b"{\"hello\": 1}");
    assert_eq!(
        fetch_file(&good, &no_cache()).await.expect("fetch"),
        b"{\"hello\": 1}"
    );
    let url = FileRef {
        path: format!("file://{}", path.display()),
        ..good.clone()
    };
    assert_eq!(
        fetch_file(&url, &no_cache()).await.expect("fetch").len(),
        12
    );

    let wrong = FileRef {
        checksum: checksum(b"something else"),
        ..good.clone()
    };
    let error = fetch_file(&wrong, &no_cache()).await.expect_err("mismatch");
    let message = error.to_string();
    assert!(
        matches!(error, CardError::ChecksumMismatch { .. }),
        "{message}"
    );
    assert!(
        message.contains(&wrong.checksum)
            && message.contains(&good.checksum)
            && message.contains("tokenizer.json"),
        "{message}"
    );

    let small = FetchOptions {
        max_bytes: 4,
        ..no_cache()
    };
    let error = fetch_file(
        &FileRef {
            size: None,
            ..good.clone()
        },
        &small,
    )
    .await
    .expect_err("too large");
    assert!(matches!(error, CardError::TooLarge { .. }), "{error}");

    let absent = FileRef {
        path: tmp
            .path()
            .join("absent.json")
            .to_string_lossy()
            .into_owned(),
        ..good
    };
    let error = fetch_file(&absent, &no_cache()).await.expect_err("absent");
    assert!(error.to_string().contains("absent.json"), "{error}");
    assert!(error.is_retryable());
}

/// How the test server frames its answer.
#[derive(Clone, Copy)]
enum Framing {
    ContentLength,
    /// `Content-Length`, then the connection stays open.
    KeepAlive,
    Chunked,
    NotFound,
    Silent,
}

/// Serves `body` for every GET on `127.0.0.1:<port>` until dropped; counts the requests.
async fn serve(body: &'static [u8], framing: Framing) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            assert!(request.starts_with(b"GET /v1/metadata/"), "{request:?}");
            let answer = match framing {
                Framing::ContentLength | Framing::KeepAlive => {
                    let mut a = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\
                         content-length: {}\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    a.extend_from_slice(body);
                    a
                }
                Framing::Chunked => {
                    let mut a = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                    for chunk in body.chunks(5) {
                        a.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                        a.extend_from_slice(chunk);
                        a.extend_from_slice(b"\r\n");
                    }
                    a.extend_from_slice(b"0\r\n\r\n");
                    a
                }
                Framing::NotFound => {
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()
                }
                Framing::Silent => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Vec::new()
                }
            };
            let _ = stream.write_all(&answer).await;
            if let Framing::KeepAlive = framing {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            let _ = stream.shutdown().await;
        }
    });
    (address, requests)
}

#[tokio::test]
async fn http_files_are_fetched_verified_and_cached() {
    const BODY: &[u8] = b"{\"model_type\": \"llama\", \"vocab_size\": 368}";
    let tmp = TempDir::new("card-http");
    let options = FetchOptions {
        cache_dir: Some(tmp.path().join("fetched")),
        ..FetchOptions::default()
    };
    let (address, requests) = serve(BODY, Framing::ContentLength).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let file = FileRef::for_bytes(url, BODY);
    assert_eq!(fetch_file(&file, &options).await.expect("fetch"), BODY);
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    let hex = file.checksum.trim_start_matches("blake3:");
    assert_eq!(
        std::fs::read(tmp.path().join("fetched").join(hex)).expect("cached"),
        BODY
    );
    // The second read comes from the cache.
    assert_eq!(fetch_file(&file, &options).await.expect("fetch"), BODY);
    assert_eq!(requests.load(Ordering::SeqCst), 1);

    let (address, _) = serve(BODY, Framing::Chunked).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let file = FileRef::for_bytes(url, BODY);
    assert_eq!(fetch_file(&file, &no_cache()).await.expect("fetch"), BODY);

    let (address, _) = serve(BODY, Framing::KeepAlive).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let impatient = FetchOptions {
        timeout: Duration::from_secs(5),
        ..no_cache()
    };
    let kept_open = FileRef::for_bytes(url, BODY);
    assert_eq!(
        fetch_file(&kept_open, &impatient).await.expect("fetch"),
        BODY
    );

    let wrong = FileRef {
        checksum: checksum(b"other"),
        ..file
    };
    let error = fetch_file(&wrong, &options).await.expect_err("mismatch");
    assert!(
        matches!(error, CardError::ChecksumMismatch { .. }),
        "{error}"
    );

    let (address, _) = serve(BODY, Framing::NotFound).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let error = fetch_file(&FileRef::for_bytes(url, BODY), &no_cache())
        .await
        .expect_err("404");
    assert!(error.to_string().contains("404"), "{error}");

    let (address, _) = serve(BODY, Framing::Silent).await;
    let url = metadata_url(
        &address,
        "dynamo",
        "backend",
        "generate",
        "m",
        "config.json",
    );
    let impatient = FetchOptions {
        timeout: Duration::from_millis(200),
        ..no_cache()
    };
    let error = fetch_file(&FileRef::for_bytes(url, BODY), &impatient)
        .await
        .expect_err("timeout");
    assert!(
        matches!(&error, CardError::Fetch { reason, .. } if reason.contains("no complete answer")),
        "{error}"
    );

    let error = fetch_file(
        &FileRef::for_bytes("https://example.invalid/x", BODY),
        &no_cache(),
    )
    .await
    .expect_err("https");
    assert!(error.to_string().contains("https"), "{error}");
}

#[tokio::test]
async fn the_captured_dynamo_card_loads_its_model() {
    let record = sample_record_here();
    let model = load_model_with(&record.card_json, &no_cache())
        .await
        .expect("load");
    assert_eq!(model.name, "mock-model");
    assert_eq!(model.kv_block_size, 64);
    assert_eq!(model.context_length, 4096);
    assert_eq!(model.eos_token_ids, vec![2]);
    let tok = &model.tokenizer;
    assert_eq!(tok.eos_token_id(), 2);
    assert_eq!(
        tok.render_chat(&[ChatMessage::new("user", "Hello")], true)
            .expect("render"),
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
    let text = "<|im_start|>user\nthe quick brown fox, 42 times<|im_end|>";
    let ids = tok.encode(text).expect("encode");
    assert_eq!(ids[0], 1);
    assert_eq!(tok.decode(&ids, false).expect("decode"), text);

    // A file changed after the card was written is refused.
    let mut card = record.card_json.clone();
    if let Some(file) = card
        .tokenizer
        .as_mut()
        .and_then(|t| t.hf_tokenizer_json.as_mut())
    {
        file.checksum = checksum(b"not the tokenizer");
    }
    let error = load_model_with(&card, &no_cache())
        .await
        .expect_err("mismatch");
    assert!(
        matches!(error, CardError::ChecksumMismatch { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn written_card_files_load_back_as_the_same_tokenizer() {
    let gguf = crate::models::tests::smollm2_gguf();
    let original = ModelTokenizer::from_gguf(&gguf).expect("SmolLM2 tokenizer");
    let home = TempDir::new("card-write");
    let spec = CardSpec {
        model_name: "SmolLM2-135M-Instruct".to_string(),
        kv_cache_block_size: 16,
        context_length: 4096,
        migration_limit: 3,
        runtime: RuntimeConfig::new(2048, 64, 2048),
    };
    let card = write_store_card_files(home.path(), &original, &spec).expect("write");
    card.validate().expect("the written card is servable");
    let dir = PathBuf::from(card.source_path.clone().expect("source path"));
    let dir_name = dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(dir_name.starts_with("smollm2-135m-instruct-"), "{dir_name}");
    assert_eq!(
        dir.parent().and_then(Path::file_name),
        Some("cards".as_ref())
    );
    // Writing again (another worker, a restart) lands in the same directory.
    let again = write_store_card_files(home.path(), &original, &spec).expect("rewrite");
    assert_eq!(again, card);

    // Every field of the captured card is written, and a Dynamo checksum on every file.
    let record = CardRecord::new("dynamo", "backend", "generate", 7, card.clone());
    let written: Value = serde_json::from_str(&record.to_json().expect("JSON")).expect("JSON");
    let keys = |v: &Value| -> Vec<String> {
        let mut keys: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        keys.sort();
        keys
    };
    let sample = sample_value();
    assert_eq!(keys(&written), keys(&sample));
    assert_eq!(keys(&written["card_json"]), keys(&sample["card_json"]));
    assert_eq!(
        keys(&written["card_json"]["runtime_config"]),
        keys(&sample["card_json"]["runtime_config"])
    );
    for (field, file) in card.file_refs() {
        let bytes = std::fs::read(&file.path).expect("written file");
        assert_eq!(file.checksum, checksum(&bytes), "{field}");
        assert_eq!(file.size, Some(bytes.len() as u64), "{field}");
        assert!(Path::new(&file.path).is_absolute(), "{field}");
    }
    assert_eq!(card.context_length, Some(4096));
    assert_eq!(card.architectural_max_context_length, Some(8192));

    let loaded = load_model_with(&card, &no_cache()).await.expect("load");
    assert_eq!(loaded.name, "SmolLM2-135M-Instruct");
    assert_eq!(loaded.kv_block_size, 16);
    assert_eq!(loaded.context_length, 4096);
    assert_eq!(loaded.eos_token_ids, vec![2]);
    let tok = &loaded.tokenizer;
    assert_eq!(tok.vocab_size(), original.vocab_size());
    assert_eq!(tok.bos_token_id(), original.bos_token_id());
    assert_eq!(tok.eos_token_id(), original.eos_token_id());
    assert_eq!(tok.context_length(), original.context_length());
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "What is 2+2?"),
    ];
    for generation_prompt in [true, false] {
        assert_eq!(
            tok.render_chat(&messages, generation_prompt)
                .expect("render"),
            original
                .render_chat(&messages, generation_prompt)
                .expect("render")
        );
    }
    let chat = original.render_chat(&messages[1..], true).expect("render");
    for text in [
        chat.as_str(),
        "In 2024, 12345 apples cost $3.50.",
        "emoji 😀👍🏽 and 🇫🇷 flag",
        "<|endoftext|><|im_start|>x<|im_end|>",
    ] {
        let ids = original.encode(text).expect("encode");
        assert_eq!(tok.encode(text).expect("encode"), ids, "{text:?}");
        assert_eq!(
            tok.decode(&ids, true).expect("decode"),
            original.decode(&ids, true).expect("decode")
        );
    }
    for id in 0..20 {
        assert_eq!(tok.is_special(id), original.is_special(id), "{id}");
    }
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
