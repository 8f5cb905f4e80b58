//! Prompt encoding speed: the fast byte-level BPE encoder against the `tokenizers` pipeline it
//! reproduces, on SmolLM2's tokenizer.
//!
//! `cargo bench --bench tokenize` prints µs per encode and tokens/s for a short chat prompt (the
//! http_path bench's request) and a long document (~4.5k tokens). Pulls the model on first use.

use std::time::Instant;

use dynamix_actors::tokenizer::{ChatMessage, ModelTokenizer};

fn main() {
    let config =
        dynamix::config::load(None, &Vec::new, &Default::default()).expect("default config");
    let path = dynamix::model_file(&config).expect("model file");
    let tokenizer = ModelTokenizer::from_gguf(&path).expect("tokenizer");

    let chat = tokenizer
        .render_chat(&[ChatMessage::new("user", "Hello world, benchmark!")], true)
        .expect("render");
    let paragraph = "The quick brown fox jumps over the lazy dog; it's 12:45 and we've got 3.5 miles to go. \
                     Naïve café owners said \"¡Hola!\" — 日本語も少し。\n\n    fn main() { println!(\"{}\", 42); }\n";
    let document = paragraph.repeat(64);

    for (name, text, iterations) in [
        ("chat prompt", chat.as_str(), 20_000u32),
        ("long document", document.as_str(), 50),
    ] {
        let tokens = tokenizer.encode(text).expect("encode").len();
        assert_eq!(
            tokens,
            tokenizer.encode_reference(text).expect("encode").len()
        );
        for (label, reference) in [("fast", false), ("tokenizers", true)] {
            let started = Instant::now();
            for _ in 0..iterations {
                let ids = if reference {
                    tokenizer.encode_reference(text)
                } else {
                    tokenizer.encode(text)
                };
                std::hint::black_box(ids.expect("encode"));
            }
            let per = started.elapsed() / iterations;
            println!(
                "{name:<14} {tokens:>6} tokens  {label:<10} {:>9.2} µs/encode  {:>6.2} M tokens/s",
                per.as_secs_f64() * 1e6,
                tokens as f64 / per.as_secs_f64() / 1e6
            );
        }
    }
}
