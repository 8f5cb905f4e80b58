//! Streaming detokenization that never splits a UTF-8 character.
//!
//! A byte-level BPE token is a run of bytes, not of characters: an emoji or a CJK character often
//! spans two or three tokens. Decoding each token alone would emit U+FFFD halves; re-decoding a
//! sliding window (the usual prefix-offset/read-offset technique) costs a decode per token.
//! Because the byte-level decoder is exactly "concatenate each token's bytes, then read them as
//! UTF-8 lossily", [`IncrementalDecoder`] does the same incrementally: it appends each token's
//! bytes and emits the longest complete prefix, holding back at most three bytes of an unfinished
//! character. The concatenation of everything it emits equals `decode(all ids)`.

use std::sync::Arc;

use super::{ModelTokenizer, TokenizerError};

/// Turns token ids, fed one at a time, into text as soon as it is complete.
pub struct IncrementalDecoder {
    tokenizer: Arc<ModelTokenizer>,
    skip_special_tokens: bool,
    /// Bytes of a character whose remaining bytes have not arrived yet (at most 3 after a push).
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// A decoder for ids of `tokenizer`; with `skip_special_tokens`, control tokens emit nothing.
    pub fn new(tokenizer: Arc<ModelTokenizer>, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            pending: Vec::new(),
        }
    }

    /// Adds one token and returns the text it completes (possibly empty while a multi-byte
    /// character is unfinished).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let bytes = self
            .tokenizer
            .token_bytes(id)
            .ok_or_else(|| self.tokenizer.unknown_id(id))?;
        if self.skip_special_tokens && self.tokenizer.is_special(id) {
            return Ok(String::new());
        }
        self.pending.extend_from_slice(bytes);
        Ok(self.take_complete())
    }

    /// Returns whatever is held back, as the full decode would render it (an unfinished character
    /// becomes U+FFFD), and resets the decoder.
    pub fn flush(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Moves the decodable prefix of `pending` out as text. Invalid sequences become U+FFFD just
    /// as `String::from_utf8_lossy` would render them in the whole stream; a sequence that is
    /// merely incomplete at the end stays pending.
    fn take_complete(&mut self) -> String {
        let mut text = String::new();
        let mut start = 0;
        while start < self.pending.len() {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(valid) => {
                    text.push_str(valid);
                    start = self.pending.len();
                }
                Err(error) => {
                    let valid_end = start + error.valid_up_to();
                    // The prefix up to `valid_up_to` is valid UTF-8 by definition.
                    text.push_str(&String::from_utf8_lossy(&self.pending[start..valid_end]));
                    match error.error_len() {
                        Some(invalid_len) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            start = valid_end + invalid_len;
                        }
                        None => {
                            start = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        text
    }
}
