//! Validation and tokenization: [`ValidatorActor`] turns a raw request body into a [`ValidatedRequest`],
//! the proof that a request passed every rule, carrying one tokenized [`EngineRequest`] per choice.
//!
//! The actor is a `SyncActor` on its own threads so JSON parsing, template rendering and tokenization
//! never run on the HTTP workers.
//!
//! Layout: `mod.rs` (actor, messages, parsing, tokenization), [`rules`] (the §4.1 bounds and messages).

mod lenient;
pub mod rules;

pub use lenient::parse_lenient;

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ErrorClass};
use crate::faults::FaultInjector;
use crate::metrics::FrontendMetrics;
use crate::protocol::chat::{ChatCompletionRequest, MessageContent, Role};
use crate::protocol::completions::{CompletionRequest, Prompt};
use crate::protocol::engine::{EngineRequest, SamplingOptions, StopConditions};
use crate::protocol::{CommonExt, StopSpec};
use crate::supervision::{
    catch_panic, ActorKind, RestartTracker, SharedBudget, SupervisorEvents, Verdict,
};
use crate::tokenizer::{self, ModelTokenizer};

/// `[validator]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidatorConfig {
    /// Threads parsing, templating and tokenizing requests (off the HTTP workers).
    pub threads: usize,
    /// Drop unknown request fields instead of rejecting them (`DYN_IGNORE_OPENAI_FE_UNSUPPORTED_FIELDS`).
    pub ignore_unsupported_fields: bool,
    /// Other names the model answers to (a worker card's `model_aliases`; not read from config).
    #[serde(skip)]
    pub model_aliases: Vec<String>,
}

impl Default for ValidatorConfig {
    fn default() -> Self {
        ValidatorConfig {
            threads: 2,
            ignore_unsupported_fields: false,
            model_aliases: Vec::new(),
        }
    }
}

/// Identity and routing facts taken from the HTTP request (headers), not the body.
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    /// Canonical request id (UUID).
    pub request_id: String,
    /// Engine pinned by the `x-dynamo-worker-instance-id` header (wins over the body's nvext).
    pub pinned_engine: Option<u64>,
}

/// A request that passed validation: what the HTTP side streams and what engines receive.
#[derive(Clone, Debug)]
pub struct ValidatedRequest {
    /// Canonical request id.
    pub request_id: String,
    /// Served model name (for responses and metrics).
    pub model: String,
    /// One engine request per output choice, in choice-index order.
    pub choices: Vec<EngineRequest>,
    /// Prompt tokens, counted once per prompt (for `usage`).
    pub prompt_tokens: u32,
    /// Stream the response.
    pub stream: bool,
    /// Send a final usage chunk.
    pub include_usage: bool,
    /// Drop special tokens when detokenizing.
    pub skip_special_tokens: bool,
    /// Emit the `request_id` annotation first (`nvext.annotations`).
    pub annotate_request_id: bool,
    /// Completions `echo`: prepend the prompt text to each choice.
    pub echo_prompt: Option<Vec<String>>,
}

/// Validate and tokenize a chat request.
#[derive(Clone, Message)]
#[rtype(result = "Result<ValidatedRequest, ApiError>")]
pub struct ValidateChat {
    /// Raw body or an already-built request (Responses API, terminal chat).
    pub input: ChatInput,
    /// Header-derived identity.
    pub context: RequestContext,
}

/// What [`ValidateChat`] validates.
#[derive(Clone)]
pub enum ChatInput {
    /// A raw JSON body.
    Body(Bytes),
    /// An already-parsed request.
    Parsed(Box<ChatCompletionRequest>),
}

/// Validate and tokenize a completions request.
#[derive(Clone, Message)]
#[rtype(result = "Result<ValidatedRequest, ApiError>")]
pub struct ValidateCompletion {
    /// Raw JSON body.
    pub body: Bytes,
    /// Header-derived identity.
    pub context: RequestContext,
}

/// A validator's restart bookkeeping, named after the SyncArbiter thread that builds (and rebuilds)
/// the actor.
fn validator_tracker() -> RestartTracker {
    RestartTracker::new(
        ActorKind::Validator,
        format!("{:?}", std::thread::current().id()),
    )
}

/// Parses, validates, templates and tokenizes.
pub struct ValidatorActor {
    config: ValidatorConfig,
    model: String,
    tokenizer: Arc<ModelTokenizer>,
    metrics: Arc<FrontendMetrics>,
    faults: Arc<FaultInjector>,
    /// Reports restarts; the budget is shared by every validator thread (the SyncArbiter re-creates
    /// a stopped validator), and past it the failure escalates to the root.
    supervision: RestartTracker,
}

impl ValidatorActor {
    /// Supervision: the restart budget all validators share, where to report restarts, and the fault
    /// injector.
    pub fn supervised(
        mut self,
        budget: SharedBudget,
        events: SupervisorEvents,
        faults: Arc<FaultInjector>,
    ) -> Self {
        self.supervision = validator_tracker()
            .with_shared_budget(budget)
            .reporting_to(events);
        self.faults = faults;
        self
    }

    /// Runs `validate` as a supervised unit: a panic (a bug, or an injected fault) fails this request
    /// with a retryable error and stops the actor; its SyncArbiter thread builds a fresh one.
    fn guarded(
        &mut self,
        ctx: &mut SyncContext<Self>,
        validate: impl FnOnce(&mut Self) -> Result<ValidatedRequest, ApiError>,
    ) -> Result<ValidatedRequest, ApiError> {
        if let Some(reason) = self.supervision.given_up() {
            return Err(ApiError::new(ErrorClass::Unavailable, reason));
        }
        let result = catch_panic(|| {
            if self.faults.on_validate() {
                panic!("injected fault: validator panics while validating");
            }
            validate(self)
        });
        result.unwrap_or_else(|reason| {
            if let Verdict::GiveUp { failures } = self.supervision.on_failure(reason.clone()) {
                let escalation = self.supervision.escalate(failures, reason);
                tracing::error!(%escalation, "validators past their restart intensity; escalating");
                return Err(ApiError::new(
                    ErrorClass::Unavailable,
                    escalation.to_string(),
                ));
            }
            tracing::error!(%reason, "validator panicked; restarting it");
            self.supervision.report_restarted(reason);
            ctx.stop();
            Err(ApiError::restarted(ActorKind::Validator, "validating"))
        })
    }

    /// A validator serving `model` with `tokenizer`.
    pub fn new(
        config: ValidatorConfig,
        model: String,
        tokenizer: Arc<ModelTokenizer>,
        metrics: Arc<FrontendMetrics>,
    ) -> Self {
        ValidatorActor {
            config,
            model,
            tokenizer,
            metrics,
            faults: FaultInjector::disabled(),
            supervision: validator_tracker(),
        }
    }

    fn check_unknown(
        &self,
        unknown: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), ApiError> {
        if self.config.ignore_unsupported_fields {
            return Ok(());
        }
        rules::unknown_fields(unknown)
    }

    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.model || self.config.model_aliases.iter().any(|a| a == model) {
            Ok(())
        } else {
            Err(ApiError::model_not_found())
        }
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        let started = Instant::now();
        let ids = self.tokenizer.encode(text).map_err(ApiError::internal)?;
        self.metrics
            .observe_tokenizer_latency("tokenize", started.elapsed().as_secs_f64() * 1000.0);
        Ok(ids)
    }

    /// `logit_bias` keys as token ids of this model's vocabulary (values were range-checked by the rules).
    fn logit_bias(
        &self,
        bias: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<Vec<(u32, f32)>, ApiError> {
        let vocab = self.tokenizer.vocab_size();
        bias.into_iter()
            .flatten()
            .map(|(key, value)| {
                let id: u32 = key.trim().parse().map_err(|_| {
                    ApiError::validation(format!(
                        "Invalid key in 'logit_bias': {key:?} is not a token id (keys must be integers)"
                    ))
                })?;
                if id as usize >= vocab {
                    return Err(ApiError::validation(format!(
                        "Token id {id} in 'logit_bias' is out of range: the vocabulary has {vocab} tokens"
                    )));
                }
                Ok((id, value.as_f64().unwrap_or(0.0) as f32))
            })
            .collect()
    }

    fn check_context(&self, prompt_tokens: usize, max_tokens: Option<u32>) -> Result<(), ApiError> {
        let limit = self.tokenizer.context_length() as usize;
        if prompt_tokens >= limit {
            return Err(ApiError::validation(format!(
                "The prompt has {prompt_tokens} tokens, which exceeds the model's context length of {limit} tokens"
            )));
        }
        if let Some(max) = max_tokens {
            let total = prompt_tokens + max as usize;
            if total > limit {
                return Err(ApiError::validation(format!(
                    "The prompt ({prompt_tokens} tokens) plus max_tokens ({max}) is {total} tokens, which exceeds the model's context length of {limit} tokens"
                )));
            }
        }
        Ok(())
    }

    fn chat(
        &self,
        input: ChatInput,
        context: RequestContext,
    ) -> Result<ValidatedRequest, ApiError> {
        let req: ChatCompletionRequest = match input {
            ChatInput::Body(body) => parse_lenient(&body)?,
            ChatInput::Parsed(req) => *req,
        };
        rules::chat(&req)?;
        self.check_unknown(&req.unknown)?;
        self.check_model(&req.model)?;
        let nvext = req.ext.nvext.clone().unwrap_or_default();
        let token_ids = match &nvext.token_data {
            Some(ids) => ids.clone(),
            None => {
                let prompt = if nvext.use_raw_prompt == Some(true) {
                    req.messages
                        .iter()
                        .filter_map(|m| m.content.as_ref().map(MessageContent::text))
                        .collect::<Vec<_>>()
                        .join("\n")
                } else {
                    let messages: Vec<tokenizer::ChatMessage> = req
                        .messages
                        .iter()
                        .map(|m| tokenizer::ChatMessage {
                            role: m.role.as_str().to_string(),
                            content: m
                                .content
                                .as_ref()
                                .map(MessageContent::text)
                                .unwrap_or_default(),
                        })
                        .collect();
                    self.tokenizer.render_chat(&messages, true).map_err(|e| {
                        ApiError::new(
                            ErrorClass::BadRequest,
                            format!("Failed to apply the chat template: {e}"),
                        )
                    })?
                };
                self.tokenize(&prompt)?
            }
        };
        let max_tokens = req.max_completion_tokens.or(req.max_tokens);
        self.check_context(token_ids.len(), max_tokens)?;
        let echo_text = match req.messages.last() {
            Some(m) if m.role == Role::User => m
                .content
                .as_ref()
                .map(MessageContent::text)
                .unwrap_or_default(),
            Some(m) => m
                .content
                .as_ref()
                .map(MessageContent::text)
                .unwrap_or_default(),
            None => String::new(),
        };
        let base = self.engine_request(
            &context,
            &req.model,
            token_ids,
            echo_text,
            Sampling {
                temperature: req.temperature,
                top_p: req.top_p,
                seed: req.seed,
                frequency_penalty: req.frequency_penalty,
                presence_penalty: req.presence_penalty,
                logit_bias: self.logit_bias(req.logit_bias.as_ref())?,
                logprobs: (req.logprobs == Some(true)).then(|| req.top_logprobs.unwrap_or(0)),
            },
            &req.ext,
            req.stop.as_ref(),
            max_tokens,
        );
        let prompt_tokens = base.token_ids.len() as u32;
        let n = req.n.unwrap_or(1) as usize;
        Ok(ValidatedRequest {
            request_id: context.request_id.clone(),
            model: req.model.clone(),
            choices: fan_out(base, n),
            prompt_tokens,
            stream: req.stream == Some(true),
            include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
            skip_special_tokens: req.ext.skip_special_tokens.unwrap_or(true),
            annotate_request_id: wants_request_id(&req.ext),
            echo_prompt: None,
        })
    }

    fn completion(
        &self,
        body: &Bytes,
        context: RequestContext,
    ) -> Result<ValidatedRequest, ApiError> {
        let req: CompletionRequest = parse_lenient(body)?;
        rules::completion(&req)?;
        self.check_unknown(&req.unknown)?;
        self.check_model(&req.model)?;
        let prompts: Vec<(Vec<u32>, String)> = match &req.prompt {
            Prompt::Text(s) => vec![(self.tokenize(s)?, s.clone())],
            Prompt::Texts(list) => list
                .iter()
                .map(|s| Ok((self.tokenize(s)?, s.clone())))
                .collect::<Result<_, ApiError>>()?,
            Prompt::Tokens(ids) => vec![(ids.clone(), self.decode(ids)?)],
            Prompt::TokenLists(lists) => lists
                .iter()
                .map(|ids| Ok((ids.clone(), self.decode(ids)?)))
                .collect::<Result<_, ApiError>>()?,
        };
        let n = req.n.unwrap_or(1) as usize;
        let logit_bias = self.logit_bias(req.logit_bias.as_ref())?;
        let mut choices = Vec::with_capacity(prompts.len() * n);
        let mut prompt_tokens = 0u32;
        let many = prompts.len() > 1;
        for (index, (ids, text)) in prompts.iter().enumerate() {
            self.check_context(ids.len(), req.max_tokens)?;
            prompt_tokens += ids.len() as u32;
            let mut sub_context = context.clone();
            if many {
                sub_context.request_id = format!("{}-{index}", context.request_id);
            }
            let base = self.engine_request(
                &sub_context,
                &req.model,
                ids.clone(),
                text.clone(),
                Sampling {
                    temperature: req.temperature,
                    top_p: req.top_p,
                    seed: req.seed,
                    frequency_penalty: req.frequency_penalty,
                    presence_penalty: req.presence_penalty,
                    logit_bias: logit_bias.clone(),
                    logprobs: req.logprobs,
                },
                &req.ext,
                req.stop.as_ref(),
                req.max_tokens,
            );
            choices.extend(fan_out(base, n));
        }
        let echo_prompt = (req.echo == Some(true)).then(|| {
            prompts
                .iter()
                .flat_map(|(_, text)| std::iter::repeat_n(text.clone(), n))
                .collect()
        });
        Ok(ValidatedRequest {
            request_id: context.request_id.clone(),
            model: req.model.clone(),
            choices,
            prompt_tokens,
            stream: req.stream == Some(true),
            include_usage: req.stream_options.as_ref().is_some_and(|o| o.include_usage),
            skip_special_tokens: req.ext.skip_special_tokens.unwrap_or(true),
            annotate_request_id: wants_request_id(&req.ext),
            echo_prompt,
        })
    }

    fn decode(&self, ids: &[u32]) -> Result<String, ApiError> {
        if let Some(bad) = ids
            .iter()
            .find(|&&id| id as usize >= self.tokenizer.vocab_size())
        {
            return Err(ApiError::validation(format!(
                "Prompt token id {bad} is out of range for a vocabulary of {} tokens",
                self.tokenizer.vocab_size()
            )));
        }
        self.tokenizer
            .decode(ids, false)
            .map_err(ApiError::internal)
    }

    #[allow(clippy::too_many_arguments)]
    fn engine_request(
        &self,
        context: &RequestContext,
        model: &str,
        token_ids: Vec<u32>,
        echo_text: String,
        sampling: Sampling,
        ext: &CommonExt,
        stop: Option<&StopSpec>,
        max_tokens: Option<u32>,
    ) -> EngineRequest {
        let nvext = ext.nvext.clone().unwrap_or_default();
        let ignore_eos = ext
            .ignore_eos
            .or_else(|| deprecated_nvext("ignore_eos", nvext.ignore_eos))
            .unwrap_or(false);
        let top_k = ext.top_k.or_else(|| deprecated_nvext("top_k", nvext.top_k));
        let repetition_penalty = ext
            .repetition_penalty
            .or_else(|| deprecated_nvext("repetition_penalty", nvext.repetition_penalty));
        let mut stop_token_ids = ext.stop_token_ids.clone().unwrap_or_default();
        if !ignore_eos && !stop_token_ids.contains(&self.tokenizer.eos_token_id()) {
            stop_token_ids.push(self.tokenizer.eos_token_id());
        }
        EngineRequest {
            request_id: context.request_id.clone(),
            model: model.to_string(),
            token_ids,
            echo_text,
            sampling: SamplingOptions {
                temperature: sampling.temperature,
                top_p: sampling.top_p,
                top_k,
                min_p: ext.min_p,
                seed: sampling.seed.map(|s| s as u64),
                repetition_penalty,
                frequency_penalty: sampling.frequency_penalty,
                presence_penalty: sampling.presence_penalty,
                greedy: nvext.greed_sampling == Some(true),
                logit_bias: sampling.logit_bias,
                logprobs: sampling.logprobs,
            },
            stop: StopConditions {
                max_tokens,
                stop: match stop {
                    Some(StopSpec::One(s)) => vec![s.clone()],
                    Some(StopSpec::Many(v)) => v.clone(),
                    None => Vec::new(),
                },
                stop_token_ids,
                ignore_eos,
                min_tokens: ext.min_tokens.unwrap_or(0),
                include_stop_str_in_output: ext.include_stop_str_in_output.unwrap_or(false),
            },
            pinned_engine: context.pinned_engine.or(nvext.backend_instance_id),
            resumed_outputs: 0,
        }
    }
}

struct Sampling {
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    logit_bias: Vec<(u32, f32)>,
    logprobs: Option<u32>,
}

fn deprecated_nvext<T>(field: &str, value: Option<T>) -> Option<T> {
    if value.is_some() {
        tracing::warn!("DEPRECATION WARNING: 'nvext.{field}' is deprecated and will be removed in a future release. Use '{field}' at the top level or in 'extra_body' instead.");
    }
    value
}

fn wants_request_id(ext: &CommonExt) -> bool {
    ext.nvext
        .as_ref()
        .and_then(|n| n.annotations.as_ref())
        .is_some_and(|a| a.iter().any(|s| s == "request_id"))
}

/// `n` copies of `base`, each with its own sub-id when there is more than one.
fn fan_out(base: EngineRequest, n: usize) -> Vec<EngineRequest> {
    if n <= 1 {
        return vec![base];
    }
    (0..n)
        .map(|i| {
            let mut r = base.clone();
            if let Some(seed) = r.sampling.seed {
                r.sampling.seed = Some(seed.wrapping_add(i as u64));
            }
            r
        })
        .collect()
}

impl Actor for ValidatorActor {
    type Context = SyncContext<Self>;
}

impl Handler<ValidateChat> for ValidatorActor {
    type Result = Result<ValidatedRequest, ApiError>;

    fn handle(&mut self, msg: ValidateChat, ctx: &mut Self::Context) -> Self::Result {
        self.guarded(ctx, |this| this.chat(msg.input, msg.context))
    }
}

impl Handler<ValidateCompletion> for ValidatorActor {
    type Result = Result<ValidatedRequest, ApiError>;

    fn handle(&mut self, msg: ValidateCompletion, ctx: &mut Self::Context) -> Self::Result {
        self.guarded(ctx, |this| this.completion(&msg.body, msg.context))
    }
}

#[cfg(test)]
mod tests;
