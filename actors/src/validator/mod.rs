//! Validation and tokenization: [`ValidatorActor`] turns a raw request body into a [`ValidatedRequest`],
//! the proof that a request passed every rule, carrying one tokenized [`EngineRequest`] per choice.
//!
//! The rules themselves live in [`Validator`], which holds only read-only state (the tokenizer, the
//! served names, the settings) and is shared by `Arc`. The [`ValidatorActor`]s are `SyncActor`s on
//! their own threads, so parsing, templating and tokenizing a large request never runs on the HTTP
//! workers; a small one is validated right where it arrives ([`ValidatorPool`]), since the hop to a
//! validator thread and back would cost more than the work.
//!
//! Layout: `mod.rs` ([`Validator`], the actor, messages, parsing, tokenization), [`pool`] (where a
//! validation runs, and its supervision off the actor threads), [`rules`] (the §4.1 bounds and
//! messages).

mod lenient;
pub mod pool;
pub mod rules;

pub use lenient::parse_lenient;
pub use pool::ValidatorPool;

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

/// A validator's restart bookkeeping, named after the thread it runs on (a SyncArbiter thread that
/// builds and rebuilds the actor, or the HTTP worker that validated inline).
fn validator_tracker() -> RestartTracker {
    RestartTracker::new(
        ActorKind::Validator,
        format!("{:?}", std::thread::current().id()),
    )
}

/// How a validation panic is supervised, wherever it ran: the restart budget every validator shares,
/// where restarts are reported, and whether the validators were given up on.
#[derive(Clone, Default)]
pub struct ValidatorSupervision {
    /// One restart intensity for every validator thread and inline validation.
    budget: Option<SharedBudget>,
    events: Option<SupervisorEvents>,
    /// Set once the budget is spent (the failure escalated): every later validation answers with it.
    given_up: Arc<std::sync::OnceLock<String>>,
}

impl ValidatorSupervision {
    /// Under the tree: `budget` shared by all validators, restarts reported to `events`.
    pub fn new(budget: SharedBudget, events: SupervisorEvents) -> Self {
        ValidatorSupervision {
            budget: Some(budget),
            events: Some(events),
            given_up: Arc::default(),
        }
    }

    /// A tracker for the current thread.
    fn tracker(&self) -> RestartTracker {
        let mut tracker = validator_tracker();
        if let Some(budget) = &self.budget {
            tracker = tracker.with_shared_budget(budget.clone());
        }
        if let Some(events) = &self.events {
            tracker = tracker.reporting_to(events.clone());
        }
        tracker
    }

    /// The refusal for every validation once the validators were given up on.
    fn refusal(&self) -> Option<ApiError> {
        self.given_up
            .get()
            .map(|reason| ApiError::new(ErrorClass::Unavailable, reason.clone()))
    }

    /// A validation panicked with `reason` (counted by `tracker`): within the budget the validator
    /// restarts (`restart` is true and the caller retries the request); past it the failure
    /// escalates to the root and every later validation is refused.
    fn failed(&self, tracker: &mut RestartTracker, reason: String) -> (ApiError, bool) {
        match tracker.on_failure(reason.clone()) {
            Verdict::GiveUp { failures } => {
                let escalation = tracker.escalate(failures, reason);
                tracing::error!(%escalation, "validators past their restart intensity; escalating");
                let _ = self.given_up.set(escalation.to_string());
                (
                    ApiError::new(ErrorClass::Unavailable, escalation.to_string()),
                    false,
                )
            }
            Verdict::Restart | Verdict::AlreadyHandled => {
                tracing::error!(%reason, "validator panicked; restarting it");
                tracker.report_restarted(reason);
                (
                    ApiError::restarted(ActorKind::Validator, "validating"),
                    true,
                )
            }
        }
    }
}

/// One validation: what a [`ValidateChat`] or [`ValidateCompletion`] carries.
#[derive(Clone)]
pub(crate) enum Job<'a> {
    Chat(&'a ChatInput, &'a RequestContext),
    Completion(&'a Bytes, &'a RequestContext),
}

/// Parses, validates, templates and tokenizes. Read-only, so any thread may run it.
pub struct Validator {
    config: ValidatorConfig,
    model: String,
    tokenizer: Arc<ModelTokenizer>,
    metrics: Arc<FrontendMetrics>,
    faults: Arc<FaultInjector>,
}

/// A validator thread: runs the [`Validator`] shared by the pool on requests too large to validate on
/// an HTTP worker. A panic stops it and its SyncArbiter builds a fresh one.
pub struct ValidatorActor {
    validator: Arc<Validator>,
    supervision: ValidatorSupervision,
    /// Restarts of this instance, under the shared budget.
    tracker: RestartTracker,
}

impl ValidatorActor {
    /// A validator thread running `validator`, supervised by `supervision`.
    pub fn new(validator: Arc<Validator>, supervision: ValidatorSupervision) -> Self {
        ValidatorActor {
            tracker: supervision.tracker(),
            validator,
            supervision,
        }
    }

    /// Runs `job` as a supervised unit: a panic (a bug, or an injected fault) fails this request
    /// with a retryable error and stops the actor; its SyncArbiter thread builds a fresh one.
    fn guarded(
        &mut self,
        ctx: &mut SyncContext<Self>,
        job: Job<'_>,
    ) -> Result<ValidatedRequest, ApiError> {
        if let Some(refusal) = self.supervision.refusal() {
            return Err(refusal);
        }
        match self.validator.run(job) {
            Ok(result) => result,
            Err(reason) => {
                let (error, restart) = self.supervision.failed(&mut self.tracker, reason);
                if restart {
                    ctx.stop();
                }
                Err(error)
            }
        }
    }
}

impl Validator {
    /// A validator serving `model` with `tokenizer`.
    pub fn new(
        config: ValidatorConfig,
        model: String,
        tokenizer: Arc<ModelTokenizer>,
        metrics: Arc<FrontendMetrics>,
    ) -> Self {
        Validator {
            config,
            model,
            tokenizer,
            metrics,
            faults: FaultInjector::disabled(),
        }
    }

    /// Consults `faults` (`validator_panic`) on every validation.
    pub fn with_faults(mut self, faults: Arc<FaultInjector>) -> Self {
        self.faults = faults;
        self
    }

    /// Runs `job`; a panic (a bug, or an injected fault) is caught and returned as its message.
    pub(crate) fn run(&self, job: Job<'_>) -> Result<Result<ValidatedRequest, ApiError>, String> {
        catch_panic(|| {
            if self.faults.on_validate() {
                panic!("injected fault: validator panics while validating");
            }
            match job {
                Job::Chat(input, context) => self.chat(input, context),
                Job::Completion(body, context) => self.completion(body, context),
            }
        })
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
        input: &ChatInput,
        context: &RequestContext,
    ) -> Result<ValidatedRequest, ApiError> {
        let parsed: ChatCompletionRequest;
        let req = match input {
            ChatInput::Body(body) => {
                parsed = parse_lenient(body)?;
                &parsed
            }
            ChatInput::Parsed(req) => &**req,
        };
        rules::chat(req)?;
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
            context,
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
        context: &RequestContext,
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
        self.guarded(ctx, Job::Chat(&msg.input, &msg.context))
    }
}

impl Handler<ValidateCompletion> for ValidatorActor {
    type Result = Result<ValidatedRequest, ApiError>;

    fn handle(&mut self, msg: ValidateCompletion, ctx: &mut Self::Context) -> Self::Result {
        self.guarded(ctx, Job::Completion(&msg.body, &msg.context))
    }
}

#[cfg(test)]
mod tests;
