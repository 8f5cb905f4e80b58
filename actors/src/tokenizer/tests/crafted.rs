//! The tokenizer on a tiny crafted vocabulary: merges, special tokens, its chat template, decoding
//! and the incremental decoder.

use super::*;

// ---------------------------------------------------------------------------------------------
// A tiny crafted tokenizer: three control tokens, the 256 byte-level characters, one merge.

fn tiny_tokenizer_bytes() -> GgufBytes {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut chars: Vec<char> = byte_level_char_to_byte().into_keys().collect();
    chars.sort_unstable();
    tokens.extend(chars.iter().map(char::to_string));
    tokens.push("hi".to_string());
    let mut types = vec![1; tokens.len()];
    types[..3].fill(TOKEN_TYPE_CONTROL);

    let mut g = GgufBytes::new(9);
    g.kv_string("general.architecture", "llama")
        .kv_u32("llama.context_length", 64)
        .kv_string("tokenizer.ggml.model", "gpt2")
        .kv_strings("tokenizer.ggml.tokens", &tokens)
        .kv_i32s("tokenizer.ggml.token_type", &types)
        .kv_strings("tokenizer.ggml.merges", &["h i".to_string()])
        .kv_u32("tokenizer.ggml.bos_token_id", 1)
        .kv_u32("tokenizer.ggml.eos_token_id", 2)
        .kv_string(
            "tokenizer.chat_template",
            "{% for m in messages %}{{ bos_token }}{{ m.role }}\n{{ m.content }}{{ eos_token }}\n{% endfor %}\
             {% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}",
        );
    g
}

fn tiny_tokenizer() -> ModelTokenizer {
    let metadata = tiny_tokenizer_bytes().parse().expect("valid crafted GGUF");
    ModelTokenizer::from_metadata(&metadata).expect("valid crafted tokenizer")
}

#[test]
fn crafted_tokenizer_encodes_merges_and_special_tokens() {
    let tok = tiny_tokenizer();
    assert_eq!(tok.vocab_size(), 3 + 256 + 1);
    assert_eq!(tok.context_length(), 64);
    let hi = 3 + 256;
    let ids = tok.encode("<|im_start|>hi<|im_end|>").expect("encode");
    assert_eq!(ids, vec![1, hi, 2]);
    assert_eq!(
        tok.decode(&ids, false).expect("decode"),
        "<|im_start|>hi<|im_end|>"
    );
    assert_eq!(tok.decode(&ids, true).expect("decode"), "hi");
    assert!(
        tok.is_special(0) && tok.is_special(2) && !tok.is_special(hi) && !tok.is_special(u32::MAX)
    );
    assert_eq!(tok.token_text(hi).as_deref(), Some("hi"));
    assert_eq!(tok.token_text(u32::MAX), None);
    let text = "a é 日本 😀\n";
    assert_eq!(
        tok.decode(&tok.encode(text).expect("encode"), false)
            .expect("decode"),
        text
    );
}

#[test]
fn crafted_tokenizer_renders_its_template() {
    let tok = tiny_tokenizer();
    let rendered = tok
        .render_chat(&[ChatMessage::new("user", "yo")], true)
        .expect("render");
    assert_eq!(
        rendered,
        "<|im_start|>user\nyo<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn decoding_an_unknown_id_is_an_error() {
    let tok = Arc::new(tiny_tokenizer());
    let result = tok.decode(&[5, 100_000], false);
    assert!(
        matches!(
            result,
            Err(TokenizerError::UnknownTokenId { id: 100_000, .. })
        ),
        "{result:?}"
    );
    let mut decoder = IncrementalDecoder::new(tok, false);
    assert!(decoder.push(100_000).is_err());
}

#[test]
fn broken_tokenizer_metadata_is_a_typed_error() {
    let build = |g: &GgufBytes| {
        let metadata = g.parse().expect("valid crafted GGUF");
        ModelTokenizer::from_metadata(&metadata)
    };
    let result = build(GgufBytes::new(1).kv_string("general.name", "x"));
    assert!(
        matches!(
            result,
            Err(TokenizerError::MissingKey {
                key: "tokenizer.ggml.model"
            })
        ),
        "{result:?}"
    );
    let result = build(GgufBytes::new(1).kv_string("tokenizer.ggml.model", "llama"));
    assert!(matches!(result, Err(TokenizerError::UnsupportedModel(m)) if m == "llama"));
    let result = build(
        GgufBytes::new(2)
            .kv_string("tokenizer.ggml.model", "gpt2")
            .kv_u32("tokenizer.ggml.tokens", 3),
    );
    assert!(matches!(
        result,
        Err(TokenizerError::WrongType {
            key: "tokenizer.ggml.tokens",
            ..
        })
    ));

    // A bos id outside the vocabulary.
    let mut bytes = tiny_tokenizer_bytes().bytes;
    let key = b"tokenizer.ggml.bos_token_id";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("key present")
        + key.len()
        + 4;
    bytes[at..at + 4].copy_from_slice(&1_000_000u32.to_le_bytes());
    let metadata = GgufMetadata::read_from(Cursor::new(&bytes), bytes.len() as u64).expect("parse");
    let result = ModelTokenizer::from_metadata(&metadata);
    assert!(
        matches!(result, Err(TokenizerError::Inconsistent(_))),
        "{result:?}"
    );
}

#[test]
fn incremental_decoder_holds_back_split_characters() {
    // Byte-level tokens: one token per byte, so every multi-byte character is split.
    let tok = Arc::new(tiny_tokenizer());
    let text = "é日😀!";
    let ids = tok.encode(text).expect("encode");
    assert_eq!(ids.len(), text.len());
    let mut decoder = IncrementalDecoder::new(tok, false);
    let chunks: Vec<String> = ids
        .iter()
        .map(|&id| decoder.push(id).expect("push"))
        .collect();
    assert_eq!(
        chunks,
        ["", "é", "", "", "日", "", "", "", "😀", "!"].map(String::from)
    );
    assert!(!decoder.has_pending());
    assert_eq!(decoder.flush(), "");
}

#[test]
fn incremental_decoder_matches_lossy_decode_on_invalid_bytes() {
    let tok = Arc::new(tiny_tokenizer());
    let byte_id = |b: u8| -> u32 {
        (0..tok.vocab_size() as u32)
            .find(|&id| tok.token_bytes(id) == Some(&[b][..]))
            .expect("every byte has a token")
    };
    // A lone continuation byte, a truncated 3-byte sequence followed by ASCII, and a
    // truncated sequence at the very end.
    let cases: [&[u8]; 3] = [b"a\x80b", b"\xe6\x97x", b"ok\xf0\x9f\x98"];
    for bytes in cases {
        let ids: Vec<u32> = bytes.iter().map(|&b| byte_id(b)).collect();
        let mut decoder = IncrementalDecoder::new(tok.clone(), false);
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&decoder.push(id).expect("push"));
        }
        streamed.push_str(&decoder.flush());
        assert_eq!(
            streamed,
            tok.decode(&ids, false).expect("decode"),
            "{bytes:?}"
        );
        assert_eq!(streamed, String::from_utf8_lossy(bytes), "{bytes:?}");
    }
}
