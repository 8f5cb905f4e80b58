//! Cards that load their model: the captured Dynamo card, and a SmolLM2 card written and loaded
//! back as the same tokenizer.

use super::*;

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
