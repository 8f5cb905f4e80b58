//! Tokenizers loaded from Hugging Face files: the Dynamo mocker's tiny model
//! (tests/fixtures/dynamo-model) and SmolLM2 exported as `tokenizer.json`.

use super::*;

// ---------------------------------------------------------------------------------------------
// Hugging Face files: the Dynamo mocker's tiny model (tests/fixtures/dynamo-model) and SmolLM2
// exported as `tokenizer.json`.

fn dynamo_fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/dynamo-model")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The fixture model's files, read once.
fn dynamo_files() -> &'static [Vec<u8>; 4] {
    static FILES: OnceLock<[Vec<u8>; 4]> = OnceLock::new();
    FILES.get_or_init(|| {
        [
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "config.json",
        ]
        .map(dynamo_fixture)
    })
}

/// The fixture model loaded from all its files, or with some replaced.
fn dynamo_tokenizer_with<'a>(
    edit: impl FnOnce(&mut HfTokenizerFiles<'a>),
) -> Result<ModelTokenizer, TokenizerError> {
    let [tokenizer_json, tokenizer_config, generation_config, config] = dynamo_files();
    let mut files = HfTokenizerFiles {
        tokenizer_json,
        tokenizer_config_json: Some(tokenizer_config),
        chat_template: None,
        generation_config_json: Some(generation_config),
        config_json: Some(config),
    };
    edit(&mut files);
    ModelTokenizer::from_hf(&files)
}

fn dynamo_tokenizer() -> ModelTokenizer {
    dynamo_tokenizer_with(|_| {}).expect("the fixture model's tokenizer")
}

#[test]
fn dynamo_fixture_tokenizer_loads_from_hf_files() {
    let tok = Arc::new(dynamo_tokenizer());
    assert_eq!(tok.vocab_size(), 368);
    assert_eq!(tok.eos_token_id(), 2);
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.bos_token_id(), 0);
    assert_eq!(tok.bos_token(), "<|endoftext|>");
    assert_eq!(tok.eos_token(), "<|im_end|>");
    assert_eq!(tok.context_length(), 4096);
    assert_eq!(tok.model_name(), None);
    assert!((0..3).all(|id| tok.is_special(id)) && !tok.is_special(3));
    assert!(
        tok.fast.is_some(),
        "a plain byte-level BPE takes the fast path"
    );

    let rendered = tok
        .render_chat(&[ChatMessage::new("user", "Hi there")], true)
        .expect("render");
    assert_eq!(
        rendered,
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&rendered).expect("encode");
    assert_eq!(&ids[..1], &[1]);
    assert_eq!(tok.decode(&ids, false).expect("decode"), rendered);
    assert_eq!(
        tok.decode(&ids, true).expect("decode"),
        "user\nHi there\nassistant\n"
    );
    for text in EDGE_CASES {
        let ids = tok.encode(text).expect("encode");
        assert_eq!(
            ids,
            tok.encode_reference(text).expect("reference"),
            "{text:?}"
        );
        assert_eq!(tok.decode(&ids, false).expect("decode"), *text, "{text:?}");
        let mut decoder = IncrementalDecoder::new(tok.clone(), false);
        let mut streamed: String = ids
            .iter()
            .map(|&id| decoder.push(id).expect("push"))
            .collect();
        streamed.push_str(&decoder.flush());
        assert_eq!(streamed, *text, "{text:?}");
    }
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xd1a0);
    for _ in 0..1000 {
        let text = random_text(&mut rng);
        assert_eq!(
            tok.encode(&text).expect("encode"),
            tok.encode_reference(&text).expect("reference"),
            "{text:?}"
        );
    }
}

#[test]
fn hf_metadata_takes_each_documented_form() {
    // The chat template given on its own wins; a list of named templates picks "default".
    let tok = dynamo_tokenizer_with(|f| f.chat_template = Some("{{ eos_token }}")).expect("load");
    assert_eq!(tok.render_chat(&[], false).expect("render"), "<|im_end|>");
    let config = br#"{"eos_token": {"content": "<|im_end|>", "special": true},
        "chat_template": [{"name": "tool_use", "template": "tools"},
                          {"name": "default", "template": "plain"}],
        "model_max_length": 1000000000000000019884624838656}"#;
    let tok = dynamo_tokenizer_with(|f| {
        f.tokenizer_config_json = Some(config);
        f.generation_config_json = Some(br#"{"eos_token_id": [2, 0]}"#);
        f.config_json = None;
    })
    .expect("load");
    assert_eq!(tok.render_chat(&[], false).expect("render"), "plain");
    assert_eq!(tok.eos_token_ids(), &[2, 0]);
    assert_eq!(
        tok.bos_token_id(),
        2,
        "no bos anywhere: the eos id stands in"
    );
    assert_eq!(tok.bos_token(), "");
    assert_eq!(
        tok.context_length(),
        2048,
        "the 1e30 sentinel is not a context length"
    );

    // Only ids: generation_config, then config.json.
    let tok = dynamo_tokenizer_with(|f| f.tokenizer_config_json = None).expect("load");
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (0, 2));
    assert_eq!(tok.eos_token(), "<|im_end|>");
    assert!(matches!(
        tok.render_chat(&[], false),
        Err(TokenizerError::NoChatTemplate)
    ));
    let tok = dynamo_tokenizer_with(|f| {
        f.tokenizer_config_json = Some(br#"{"model_max_length": 512}"#);
        f.generation_config_json = None;
        f.config_json = Some(br#"{"eos_token_id": 1}"#);
    })
    .expect("load");
    assert_eq!((tok.eos_token_id(), tok.context_length()), (1, 512));
}

#[test]
fn unusable_hf_files_are_typed_errors() {
    let result = dynamo_tokenizer_with(|f| {
        f.tokenizer_config_json = None;
        f.generation_config_json = None;
        f.config_json = None;
    });
    assert!(
        matches!(&result, Err(TokenizerError::Inconsistent(m)) if m.contains("eos_token")),
        "{result:?}"
    );
    let result =
        dynamo_tokenizer_with(|f| f.tokenizer_config_json = Some(br#"{"eos_token": "</s>"}"#));
    assert!(
        matches!(&result, Err(TokenizerError::Inconsistent(m))
            if m.contains("tokenizer_config.json") && m.contains("</s>")),
        "{result:?}"
    );
    let result = dynamo_tokenizer_with(|f| f.generation_config_json = Some(b"{not json"));
    assert!(
        matches!(&result, Err(TokenizerError::Build(m)) if m.contains("generation_config.json")),
        "{result:?}"
    );
    let result = dynamo_tokenizer_with(|f| f.tokenizer_json = b"{}");
    assert!(
        matches!(&result, Err(TokenizerError::Build(m)) if m.contains("tokenizer.json")),
        "{result:?}"
    );
    let mut json: serde_json::Value =
        serde_json::from_slice(&dynamo_fixture("tokenizer.json")).expect("JSON");
    json["decoder"] = serde_json::json!({"type": "Fuse"});
    let bytes = serde_json::to_vec(&json).expect("serialise");
    let result = dynamo_tokenizer_with(|f| f.tokenizer_json = &bytes);
    assert!(
        matches!(&result, Err(TokenizerError::UnsupportedModel(m)) if m.contains("Fuse")),
        "{result:?}"
    );
    let result = dynamo_tokenizer_with(|f| f.chat_template = Some("{% if %}"));
    assert!(
        matches!(result, Err(TokenizerError::ChatTemplate(_))),
        "{result:?}"
    );
}

#[test]
fn a_pipeline_the_fast_encoder_does_not_reproduce_uses_tokenizers() {
    let mut json: serde_json::Value =
        serde_json::from_slice(&dynamo_fixture("tokenizer.json")).expect("JSON");
    json["normalizer"] = serde_json::json!({"type": "NFC"});
    let bytes = serde_json::to_vec(&json).expect("serialise");
    let tok = dynamo_tokenizer_with(|f| f.tokenizer_json = &bytes).expect("load");
    assert!(tok.fast.is_none());
    let text = "<|im_start|>caf\u{65}\u{301} 12<|im_end|>";
    let ids = tok.encode(text).expect("encode");
    assert_eq!(
        tok.decode(&ids, false).expect("decode"),
        "<|im_start|>café 12<|im_end|>"
    );
}

#[test]
fn smollm2_exported_as_tokenizer_json_loads_back_identically() {
    let original = smollm2();
    let json = original.to_hf_json().expect("export");
    let tok = ModelTokenizer::from_hf(&HfTokenizerFiles {
        tokenizer_json: json.as_bytes(),
        tokenizer_config_json: Some(br#"{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}"#),
        chat_template: original.chat_template_source(),
        generation_config_json: None,
        config_json: Some(br#"{"max_position_embeddings": 8192}"#),
    })
    .expect("load the export");
    assert!(
        tok.fast.is_some(),
        "the digit-splitting pipeline takes the fast path"
    );
    assert_eq!(tok.vocab_size(), original.vocab_size());
    assert_eq!(tok.context_length(), 8192);
    assert_eq!(
        (tok.bos_token_id(), tok.eos_token_id()),
        (original.bos_token_id(), original.eos_token_id())
    );
    for id in 0..original.vocab_size() as u32 {
        assert_eq!(tok.token_bytes(id), original.token_bytes(id), "token {id}");
        assert_eq!(tok.is_special(id), original.is_special(id), "token {id}");
    }
    for &(text, expected) in KNOWN_ENCODINGS {
        assert_eq!(tok.encode(text).expect("encode"), expected, "{text:?}");
        assert_eq!(
            tok.encode_reference(text).expect("encode"),
            expected,
            "{text:?}"
        );
    }
    let user = [ChatMessage::new("user", "What is the capital of France?")];
    assert_eq!(
        tok.render_chat(&user, true).expect("render"),
        original.render_chat(&user, true).expect("render")
    );
}
