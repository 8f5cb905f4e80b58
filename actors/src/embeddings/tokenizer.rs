//! [`EmbeddingTokenizer`]: the model's `tokenizer.json` (BERT WordPiece), used without its own
//! truncation and padding.
//!
//! The packaged file truncates to 128 tokens and pads to 128 (sentence-transformers' training
//! settings). Here each input keeps every token, so usage counts are true and an input over the
//! model's limit is rejected with a message instead of silently cut; padding is the batcher's job
//! (to the longest row of a batch, not a fixed length).

use std::path::Path;

use tokenizers::Tokenizer;

use super::error::LoadError;

/// Text → token ids, with `[CLS]` and `[SEP]` added as the model was trained with.
pub struct EmbeddingTokenizer {
    inner: Tokenizer,
    vocab_size: usize,
}

impl EmbeddingTokenizer {
    /// Loads `tokenizer.json` and switches off its truncation and padding.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let invalid = |message: String| LoadError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(LoadError::File {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| invalid(e.to_string()))?;
        inner
            .with_truncation(None)
            .map_err(|e| invalid(e.to_string()))?;
        inner.with_padding(None);
        let vocab_size = inner.get_vocab_size(true);
        Ok(EmbeddingTokenizer { inner, vocab_size })
    }

    /// The ids of `text`, special tokens included: exactly what the model reads, so also the
    /// request's token count.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.inner
            .encode_fast(text, true)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    /// Ids below this are valid.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}
