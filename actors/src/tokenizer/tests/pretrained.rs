//! The real SmolLM2 tokenizer against encodings computed with Hugging Face `tokenizers`, and the
//! fast encoder against the `tokenizers` pipeline.

use super::*;

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
