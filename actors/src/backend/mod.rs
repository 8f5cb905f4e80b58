//! The backend stage (Dynamo's "backend operator"): turns one choice's engine outputs into text deltas —
//! UTF-8-safe incremental detokenization, stop token ids (EOS unless `ignore_eos`), stop strings (held back
//! while they could still match, never emitted unless asked, matched across token boundaries), `min_tokens`
//! and `max_tokens` (`finish_reason: length`).

use std::sync::Arc;

use crate::error::ApiError;
use crate::protocol::engine::{EngineOutput, StopConditions};
use crate::protocol::FinishReason;
use crate::tokenizer::{IncrementalDecoder, ModelTokenizer};

/// What one engine output contributes to a choice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Delta {
    /// Text to send now (may be empty while a stop string is pending or a character is incomplete).
    pub text: String,
    /// Tokens this output accounted for (for usage and metrics).
    pub tokens: u32,
    /// Set once, on the choice's last delta.
    pub finish_reason: Option<FinishReason>,
    /// Log-probabilities of this output's emitted tokens (when the request asked for them; a stop
    /// token that ends the choice has none, as OpenAI reports).
    pub logprobs: Vec<LogprobEntry>,
}

/// One token's log-probability as the APIs report it.
#[derive(Clone, Debug, PartialEq)]
pub struct LogprobEntry {
    /// The token's text.
    pub token: String,
    /// Its raw bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely alternatives: text, bytes, log-probability.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// Per-choice decoding and stop handling.
pub struct ChoiceDecoder {
    decoder: IncrementalDecoder,
    tokenizer: Arc<ModelTokenizer>,
    stop: StopConditions,
    generated: u32,
    /// Text not yet released because it could be the start of a stop string.
    pending: String,
    finished: bool,
    /// An undecodable id was logged for this choice (once is enough).
    reported_unknown_id: bool,
}

impl ChoiceDecoder {
    /// A decoder for one choice.
    pub fn new(
        tokenizer: Arc<ModelTokenizer>,
        stop: StopConditions,
        skip_special_tokens: bool,
    ) -> Self {
        ChoiceDecoder {
            decoder: IncrementalDecoder::new(tokenizer.clone(), skip_special_tokens),
            tokenizer,
            stop,
            generated: 0,
            pending: String::new(),
            finished: false,
            reported_unknown_id: false,
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Whether the choice has finished.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Fold one engine output into a delta. Outputs after the finish are ignored (empty delta).
    pub fn process(&mut self, output: EngineOutput) -> Result<Delta, ApiError> {
        let mut delta = Delta::default();
        if self.finished {
            return Ok(delta);
        }
        let mut finish = None;
        for (k, &id) in output.token_ids.iter().enumerate() {
            self.generated += 1;
            delta.tokens += 1;
            if self.generated > self.stop.min_tokens && self.stop.stop_token_ids.contains(&id) {
                finish = Some(FinishReason::Stop);
                break;
            }
            if let Some(lp) = output.logprobs.get(k) {
                delta.logprobs.push(self.logprob_entry(lp));
            }
            // An id outside the vocabulary (a remote worker whose model differs from this
            // frontend's tokenizer) renders as nothing, as Dynamo renders it; it still counts.
            match self.decoder.push(id) {
                Ok(text) => self.pending.push_str(&text),
                Err(e) => {
                    if !self.reported_unknown_id {
                        self.reported_unknown_id = true;
                        tracing::warn!(
                            "engine output cannot be detokenized ({e}); its text is left out"
                        );
                    }
                }
            }
            if let Some(reason) = self.after_text() {
                finish = Some(reason);
                break;
            }
        }
        if finish.is_none() {
            if let Some(text) = &output.text {
                self.generated += 1;
                delta.tokens += 1;
                self.pending.push_str(text);
                finish = self.after_text();
            }
        }
        let finish = finish.or(output.finish_reason);
        match finish {
            Some(reason) => {
                if !self.stop_matched_in_pending(&mut delta.text) {
                    self.pending.push_str(&self.decoder.flush());
                    delta.text.push_str(&std::mem::take(&mut self.pending));
                }
                delta.finish_reason = Some(reason);
                self.finished = true;
            }
            None => delta.text = self.release_safe_prefix(),
        }
        Ok(delta)
    }

    fn logprob_entry(&self, lp: &crate::protocol::engine::TokenLogprob) -> LogprobEntry {
        let describe = |id: u32| {
            let bytes = self.tokenizer.token_bytes(id).unwrap_or_default().to_vec();
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let (token, bytes) = describe(lp.token_id);
        LogprobEntry {
            token,
            bytes,
            logprob: lp.logprob,
            top: lp
                .top
                .iter()
                .map(|&(id, logprob)| {
                    let (text, bytes) = describe(id);
                    (text, bytes, logprob)
                })
                .collect(),
        }
    }

    /// The stream ended without a finish: flush what is held back.
    pub fn finish_abruptly(&mut self) -> String {
        self.finished = true;
        self.pending.push_str(&self.decoder.flush());
        std::mem::take(&mut self.pending)
    }

    /// Check stop strings and max_tokens after new text arrived.
    fn after_text(&mut self) -> Option<FinishReason> {
        if self.generated > self.stop.min_tokens && self.find_stop().is_some() {
            return Some(FinishReason::Stop);
        }
        match self.stop.max_tokens {
            Some(max) if self.generated >= max => Some(FinishReason::Length),
            _ => None,
        }
    }

    /// Earliest (position, length) of any stop string in the pending text.
    fn find_stop(&self) -> Option<(usize, usize)> {
        self.stop
            .stop
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|pos| (pos, s.len())))
            .min_by_key(|&(pos, _)| pos)
    }

    /// If a stop string matched, move the text before it (and the stop string itself when asked) into `out`.
    fn stop_matched_in_pending(&mut self, out: &mut String) -> bool {
        if self.generated <= self.stop.min_tokens {
            return false;
        }
        let Some((pos, len)) = self.find_stop() else {
            return false;
        };
        let keep = if self.stop.include_stop_str_in_output {
            pos + len
        } else {
            pos
        };
        out.push_str(&self.pending[..keep]);
        self.pending.clear();
        true
    }

    /// Release the pending text except the longest suffix that could still begin a stop string.
    fn release_safe_prefix(&mut self) -> String {
        let held = self
            .stop
            .stop
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - held;
        let rest = self.pending.split_off(cut);
        std::mem::replace(&mut self.pending, rest)
    }
}

/// Length in bytes of the longest proper suffix of `text` that is a prefix of `stop`, on char boundaries.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_prefix_overlap() {
        assert_eq!(longest_suffix_prefix("hello wo", "world"), 2);
        assert_eq!(longest_suffix_prefix("hello", "xyz"), 0);
        assert_eq!(
            longest_suffix_prefix("abc", "abc"),
            0,
            "a full match is found by find_stop, not held"
        );
        assert_eq!(longest_suffix_prefix("é", "éa"), 2);
    }
}
