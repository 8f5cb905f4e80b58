//! Response-stream items (interop spec §5): each data frame's body is
//! `{"data": <Annotated<LLMEngineOutput>>, "complete_final": false}`; the last one is
//! `{"complete_final": true}` with no `data`. An item is either an engine output or an error
//! (`event: "error"` with Dynamo's `error` object; older peers put the text in `comment`).
//!
//! Mapping to [`EngineEvent`]: finish reasons `eos` and `stop` are a stop, `cancelled`/`abort` a
//! cancellation, `content_filter` stays, and `{"error": msg}` becomes an internal error; per-token
//! log-probabilities travel as `log_probs` and `top_logprobs`.

use serde::{Deserialize, Serialize};

use super::error::DynamoError;

/// Why a response item carries no engine event: a protocol error of the worker.
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    /// Neither an output nor an error.
    #[error("item has neither data nor an error")]
    Empty,
    /// `log_probs` does not have one entry per token.
    #[error("log_probs has {log_probs} entries for {token_ids} token_ids")]
    LogprobCount {
        /// Entries in `log_probs`.
        log_probs: usize,
        /// Entries in `token_ids`.
        token_ids: usize,
    },
}
use crate::error::{ApiError, ErrorClass};
use crate::protocol::engine::{EngineEvent, EngineOutput, TokenLogprob};
use crate::protocol::FinishReason;

/// `finish_reason` as Dynamo writes it: a string, or `{"error": msg}`. A string this build does
/// not know (a newer peer's) is kept as [`FinishReasonWire::Unknown`] and ends the stream as a stop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReasonWire {
    /// End of sequence.
    Eos,
    /// A stop condition.
    Stop,
    /// Token budget.
    Length,
    /// Cancelled.
    #[serde(alias = "abort")]
    Cancelled,
    /// Filtered.
    ContentFilter,
    /// The engine failed.
    Error(String),
    /// A reason this build does not know.
    #[serde(untagged)]
    Unknown(String),
}

/// One alternative at a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopLogprobWire {
    /// Rank (1 = most likely).
    pub rank: u32,
    /// The token.
    pub token_id: u32,
    /// Its text, when the engine detokenized.
    #[serde(default)]
    pub token: Option<String>,
    /// Its log-probability.
    pub logprob: f64,
}

/// `completion_usage`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionUsageWire {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens so far.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
    /// What the prompt tokens were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetailsWire>,
}

/// `completion_usage.prompt_tokens_details`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTokensDetailsWire {
    /// Audio tokens.
    #[serde(default)]
    pub audio_tokens: Option<u32>,
    /// Tokens served from the prefix cache (Dynamo's frontend reports these as cached tokens).
    #[serde(default)]
    pub cached_tokens: Option<u32>,
}

/// `LLMEngineOutput`: only `token_ids` is required.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LlmEngineOutput {
    /// New tokens.
    #[serde(default)]
    pub token_ids: Vec<u32>,
    /// Their texts, when the engine detokenized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Vec<Option<String>>>,
    /// Text the engine produced itself.
    #[serde(default)]
    pub text: Option<String>,
    /// Cumulative log-probability.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cum_log_probs: Option<f64>,
    /// One log-probability per token of `token_ids`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_probs: Option<Vec<f64>>,
    /// The alternatives per token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<Vec<TopLogprobWire>>>,
    /// Set on the last output.
    #[serde(default)]
    pub finish_reason: Option<FinishReasonWire>,
    /// Choice index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// Token counts, on the first and the last output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_usage: Option<CompletionUsageWire>,
}

/// `Annotated<LLMEngineOutput>`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WireItem {
    /// The output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<LlmEngineOutput>,
    /// Item id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `error` on an error item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Free text (older peers' error messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<Vec<String>>,
    /// The error of an error item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<DynamoError>,
}

/// A data frame's body.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamItem {
    /// The item; absent on the final frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<WireItem>,
    /// True on the final frame of a completed stream.
    #[serde(default)]
    pub complete_final: bool,
}

impl StreamItem {
    /// A frame carrying `event`.
    pub fn of(event: &EngineEvent) -> StreamItem {
        StreamItem {
            data: Some(WireItem::from_event(event)),
            complete_final: false,
        }
    }

    /// Adds `usage` to an output item (Dynamo reports it on the first and the last output).
    pub fn with_usage(mut self, usage: CompletionUsageWire) -> StreamItem {
        if let Some(output) = self.data.as_mut().and_then(|item| item.data.as_mut()) {
            output.completion_usage = Some(usage);
        }
        self
    }

    /// The final frame.
    pub fn complete() -> StreamItem {
        StreamItem {
            data: None,
            complete_final: true,
        }
    }
}

impl WireItem {
    /// The item for one engine event.
    pub fn from_event(event: &EngineEvent) -> WireItem {
        match event {
            Ok(output) => WireItem {
                data: Some(LlmEngineOutput::from(output)),
                ..WireItem::default()
            },
            Err(error) => WireItem {
                event: Some("error".into()),
                comment: Some(vec![error.message.clone()]),
                error: Some(DynamoError::from(error)),
                ..WireItem::default()
            },
        }
    }

    /// The engine event this item carries; an item that is neither an output nor an error is a
    /// protocol error (the text says what it lacked).
    pub fn into_event(self) -> Result<EngineEvent, ItemError> {
        if self.event.as_deref() == Some("error") || self.error.is_some() {
            let error = match self.error {
                Some(error) => ApiError::from(&error),
                None => ApiError::new(
                    ErrorClass::Internal,
                    self.comment
                        .filter(|c| !c.is_empty())
                        .map(|c| c.join("; "))
                        .unwrap_or_else(|| "the worker reported an error without a message".into()),
                ),
            };
            return Ok(Err(error));
        }
        let data = self.data.ok_or(ItemError::Empty)?;
        data.into_event()
    }
}

impl From<&EngineOutput> for LlmEngineOutput {
    fn from(output: &EngineOutput) -> LlmEngineOutput {
        let logprobs = !output.logprobs.is_empty();
        LlmEngineOutput {
            token_ids: output.token_ids.clone(),
            tokens: None,
            text: output.text.clone(),
            cum_log_probs: None,
            log_probs: logprobs.then(|| {
                output
                    .logprobs
                    .iter()
                    .map(|l| f64::from(l.logprob))
                    .collect()
            }),
            top_logprobs: logprobs.then(|| {
                output
                    .logprobs
                    .iter()
                    .map(|l| {
                        l.top
                            .iter()
                            .enumerate()
                            .map(|(rank, (token_id, logprob))| TopLogprobWire {
                                rank: rank as u32 + 1,
                                token_id: *token_id,
                                token: None,
                                logprob: f64::from(*logprob),
                            })
                            .collect()
                    })
                    .collect()
            }),
            finish_reason: output.finish_reason.map(|reason| match reason {
                FinishReason::Stop => FinishReasonWire::Stop,
                FinishReason::Length => FinishReasonWire::Length,
                FinishReason::Cancelled => FinishReasonWire::Cancelled,
                FinishReason::ContentFilter => FinishReasonWire::ContentFilter,
            }),
            index: None,
            completion_usage: None,
        }
    }
}

impl LlmEngineOutput {
    /// The engine event: an output, or the error a `{"error": msg}` finish reason reports.
    pub fn into_event(self) -> Result<EngineEvent, ItemError> {
        let finish_reason = match self.finish_reason {
            None => None,
            // Python engines say `"error"` or `"error: <why>"` (python-sdk spec §7.1).
            Some(FinishReasonWire::Unknown(reason)) if reason.starts_with("error") => {
                let why = reason["error".len()..].trim_start_matches(':').trim();
                let message = match why {
                    "" => "the worker's engine failed".to_string(),
                    why => format!("the worker's engine failed: {why}"),
                };
                return Ok(Err(ApiError::new(ErrorClass::Internal, message)));
            }
            Some(FinishReasonWire::Eos | FinishReasonWire::Stop | FinishReasonWire::Unknown(_)) => {
                Some(FinishReason::Stop)
            }
            Some(FinishReasonWire::Length) => Some(FinishReason::Length),
            Some(FinishReasonWire::Cancelled) => Some(FinishReason::Cancelled),
            Some(FinishReasonWire::ContentFilter) => Some(FinishReason::ContentFilter),
            Some(FinishReasonWire::Error(message)) => {
                return Ok(Err(ApiError::new(ErrorClass::Internal, message)))
            }
        };
        let logprobs = match self.log_probs {
            Some(values) => {
                if values.len() != self.token_ids.len() {
                    return Err(ItemError::LogprobCount {
                        log_probs: values.len(),
                        token_ids: self.token_ids.len(),
                    });
                }
                let mut tops = self.top_logprobs.unwrap_or_default().into_iter();
                values
                    .into_iter()
                    .zip(&self.token_ids)
                    .map(|(logprob, token_id)| {
                        let mut top = tops.next().unwrap_or_default();
                        top.sort_by_key(|t| t.rank);
                        TokenLogprob {
                            token_id: *token_id,
                            logprob: logprob as f32,
                            top: top
                                .into_iter()
                                .map(|t| (t.token_id, t.logprob as f32))
                                .collect(),
                        }
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        let cached_tokens = self
            .completion_usage
            .and_then(|u| u.prompt_tokens_details)
            .and_then(|d| d.cached_tokens);
        Ok(Ok(EngineOutput {
            token_ids: self.token_ids,
            text: self.text,
            finish_reason,
            logprobs,
            cached_tokens,
        }))
    }
}
