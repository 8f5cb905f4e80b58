//! The pre-processed request (interop spec §4): what a frontend sends a worker after templating and
//! tokenizing. Only `token_ids` is required; every other field has Dynamo's default and unknown
//! fields are ignored, so requests from newer Dynamo frontends still decode.
//!
//! Mapping to [`EngineRequest`]: the request id is the control message's `id`; stop token ids are
//! `stop_token_ids` ∪ `stop_token_ids_visible` ∪ `stop_token_ids_hidden`, plus `eos_token_ids`
//! unless `ignore_eos`; `output_options.logprobs` is the number of alternatives to report. What
//! Dynamo has no field for (the echo text, logit bias, forced greedy decoding, migration offsets)
//! travels in `extra_args.dynamix`, sent only to dynamix workers.

use serde::{Deserialize, Serialize};

use crate::protocol::engine::{EngineRequest, SamplingOptions, StopConditions};

/// `stop_conditions`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StopConditionsWire {
    /// New tokens at most.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Vec<String>>,
    /// Stop tokens.
    #[serde(default)]
    pub stop_token_ids: Option<Vec<u32>>,
    /// Stop tokens that are emitted.
    #[serde(default)]
    pub stop_token_ids_visible: Option<Vec<u32>>,
    /// Stop tokens that are not emitted (Dynamo puts EOS here).
    #[serde(default)]
    pub stop_token_ids_hidden: Option<Vec<u32>>,
    /// No stop before this many tokens.
    #[serde(default)]
    pub min_tokens: Option<u32>,
    /// Generate past EOS.
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// Reasoning budget (not used by dynamix engines).
    #[serde(default)]
    pub max_thinking_tokens: Option<u32>,
}

/// `sampling_options`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptionsWire {
    /// Choices per prompt.
    #[serde(default)]
    pub n: Option<u32>,
    /// Candidates to pick from.
    #[serde(default)]
    pub best_of: Option<u32>,
    /// Presence penalty.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Repetition penalty.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Temperature.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Top-k.
    #[serde(default)]
    pub top_k: Option<i32>,
    /// Min-p.
    #[serde(default)]
    pub min_p: Option<f32>,
    /// Beam search (not supported by dynamix engines).
    #[serde(default)]
    pub use_beam_search: Option<bool>,
    /// Beam length penalty.
    #[serde(default)]
    pub length_penalty: Option<f32>,
    /// Seed (an i64 on the wire; read bitwise).
    #[serde(default)]
    pub seed: Option<i64>,
    /// Emit the matched stop string.
    #[serde(default)]
    pub include_stop_str_in_output: Option<bool>,
    /// Structured output (not supported by dynamix engines; kept opaque).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guided_decoding: Option<serde_json::Value>,
}

/// `output_options`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputOptionsWire {
    /// Alternatives to report per generated token.
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Prompt log-probabilities.
    #[serde(default)]
    pub prompt_logprobs: Option<u32>,
    /// Skip special tokens when detokenizing.
    #[serde(default)]
    pub skip_special_tokens: Option<bool>,
    /// Return the formatted prompt.
    #[serde(default)]
    pub formatted_prompt: Option<bool>,
    /// Tokens as `token_id:N` strings.
    #[serde(default)]
    pub return_tokens_as_token_ids: Option<bool>,
}

/// What only dynamix engines use, under `extra_args.dynamix`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DynamixExtension {
    /// The text `echo_full` echoes.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub echo_text: String,
    /// Outputs an earlier attempt delivered (request migration).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub resumed_outputs: u32,
    /// OpenAI `logit_bias`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f32)>,
    /// Force greedy decoding.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub greedy: bool,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

/// `extra_args`: an open map; dynamix reads only its own key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExtraArgs {
    /// dynamix's fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamix: Option<DynamixExtension>,
}

/// `routing`: the hints a frontend's router leaves for the worker.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingWire {
    /// The worker the request is pinned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_instance_id: Option<u64>,
    /// Data-parallel rank inside the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_rank: Option<u32>,
    /// The LoRA adapter the request is for (python-sdk spec §6.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_name: Option<String>,
}

/// The body of a request frame.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PreprocessedRequest {
    /// Served model name.
    #[serde(default)]
    pub model: String,
    /// The templated prompt.
    pub token_ids: Vec<u32>,
    /// When to stop.
    #[serde(default)]
    pub stop_conditions: StopConditionsWire,
    /// How to sample.
    #[serde(default)]
    pub sampling_options: SamplingOptionsWire,
    /// What to report.
    #[serde(default)]
    pub output_options: OutputOptionsWire,
    /// End-of-sequence tokens.
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    /// Hash of the model card the frontend used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mdc_sum: Option<String>,
    /// The client's annotations.
    #[serde(default)]
    pub annotations: Vec<String>,
    /// Routing hints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingWire>,
    /// Extensions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_args: Option<ExtraArgs>,
}

/// Why a worker cannot serve a pre-processed request as asked; the message names the field.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum Unservable {
    /// No prompt tokens.
    #[error("token_ids is empty: the prompt must have at least one token")]
    EmptyPrompt,
    /// Beam search was asked for.
    #[error("sampling_options.use_beam_search is not supported")]
    BeamSearch,
    /// More than one choice.
    #[error("sampling_options.n = {0}: a worker generates one choice per request")]
    Choices(u32),
}

impl PreprocessedRequest {
    /// The wire form of `request`; `dynamix_worker` adds the dynamix extension.
    pub fn from_engine_request(request: &EngineRequest, dynamix_worker: bool) -> Self {
        let sampling = &request.sampling;
        let stop = &request.stop;
        let extension = DynamixExtension {
            echo_text: request.echo_text.clone(),
            resumed_outputs: request.resumed_outputs,
            logit_bias: sampling.logit_bias.clone(),
            greedy: sampling.greedy,
        };
        PreprocessedRequest {
            model: request.model.clone(),
            token_ids: request.token_ids.clone(),
            stop_conditions: StopConditionsWire {
                max_tokens: stop.max_tokens,
                stop: (!stop.stop.is_empty()).then(|| stop.stop.clone()),
                stop_token_ids: None,
                stop_token_ids_visible: None,
                // The validator already added EOS unless ignore_eos: every stop id is hidden.
                stop_token_ids_hidden: (!stop.stop_token_ids.is_empty())
                    .then(|| stop.stop_token_ids.clone()),
                min_tokens: (stop.min_tokens > 0).then_some(stop.min_tokens),
                ignore_eos: stop.ignore_eos.then_some(true),
                max_thinking_tokens: None,
            },
            sampling_options: SamplingOptionsWire {
                presence_penalty: sampling.presence_penalty,
                frequency_penalty: sampling.frequency_penalty,
                repetition_penalty: sampling.repetition_penalty,
                temperature: if sampling.greedy {
                    Some(0.0)
                } else {
                    sampling.temperature
                },
                top_p: sampling.top_p,
                top_k: sampling.top_k,
                min_p: sampling.min_p,
                seed: sampling.seed.map(|s| s as i64),
                include_stop_str_in_output: stop.include_stop_str_in_output.then_some(true),
                ..SamplingOptionsWire::default()
            },
            output_options: OutputOptionsWire {
                logprobs: sampling.logprobs,
                ..OutputOptionsWire::default()
            },
            eos_token_ids: Vec::new(),
            mdc_sum: None,
            annotations: Vec::new(),
            routing: None,
            extra_args: (dynamix_worker && extension != DynamixExtension::default()).then_some(
                ExtraArgs {
                    dynamix: Some(extension),
                },
            ),
        }
    }

    /// The engine request `request_id` names. Fails, naming the field, for requests dynamix
    /// engines cannot serve as asked.
    pub fn into_engine_request(self, request_id: String) -> Result<EngineRequest, Unservable> {
        if self.token_ids.is_empty() {
            return Err(Unservable::EmptyPrompt);
        }
        if self.sampling_options.use_beam_search == Some(true) {
            return Err(Unservable::BeamSearch);
        }
        if let Some(n) = self.sampling_options.n.filter(|n| *n > 1) {
            return Err(Unservable::Choices(n));
        }
        let extension = self.extra_args.and_then(|a| a.dynamix).unwrap_or_default();
        let conditions = self.stop_conditions;
        let ignore_eos = conditions.ignore_eos.unwrap_or(false);
        let mut stop_token_ids = Vec::new();
        let eos = (!ignore_eos).then_some(self.eos_token_ids);
        for id in [
            conditions.stop_token_ids,
            conditions.stop_token_ids_visible,
            conditions.stop_token_ids_hidden,
            eos,
        ]
        .into_iter()
        .flatten()
        .flatten()
        {
            if !stop_token_ids.contains(&id) {
                stop_token_ids.push(id);
            }
        }
        let options = self.sampling_options;
        Ok(EngineRequest {
            request_id,
            model: self.model,
            token_ids: self.token_ids,
            echo_text: extension.echo_text,
            sampling: SamplingOptions {
                temperature: options.temperature,
                top_p: options.top_p,
                top_k: options.top_k,
                min_p: options.min_p,
                seed: options.seed.map(|s| s as u64),
                repetition_penalty: options.repetition_penalty,
                frequency_penalty: options.frequency_penalty,
                presence_penalty: options.presence_penalty,
                greedy: extension.greedy,
                logit_bias: extension.logit_bias,
                logprobs: self.output_options.logprobs,
            },
            stop: StopConditions {
                max_tokens: conditions.max_tokens,
                stop: conditions.stop.unwrap_or_default(),
                stop_token_ids,
                ignore_eos,
                min_tokens: conditions.min_tokens.unwrap_or(0),
                include_stop_str_in_output: options.include_stop_str_in_output.unwrap_or(false),
            },
            pinned_engine: None,
            resumed_outputs: extension.resumed_outputs,
        })
    }
}
