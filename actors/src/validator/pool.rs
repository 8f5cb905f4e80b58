//! [`ValidatorPool`]: where a validation runs. A small request is validated on the thread that asks
//! (an HTTP worker): parsing, templating and tokenizing a chat message of a few hundred bytes takes a
//! few microseconds, less than the two thread wake-ups of a round trip to a validator thread. A large
//! one goes to the [`ValidatorActor`] threads, so it never holds up the other connections of an HTTP
//! worker. Either way the same [`Validator`] runs, a panic is supervised under the one restart budget
//! all validators share, and the caller retries a validation whose validator restarted.

use std::sync::Arc;

use actix::Addr;

use super::{
    ChatInput, Job, ValidateChat, ValidateCompletion, ValidatedRequest, Validator, ValidatorActor,
    ValidatorSupervision,
};
use crate::error::{ApiError, ErrorClass};
use crate::protocol::chat::MessageContent;
use crate::supervision::ActorKind;

/// Bodies up to this size are validated inline. Templating and tokenizing cost about 35 ns a byte
/// when none of the words were seen before (less once the encoder's word cache knows them), so the
/// worst case holds an HTTP worker's other connections up for under 100 µs; a larger body goes to
/// the validator threads.
pub const INLINE_BODY_LIMIT: usize = 2 * 1024;

/// What decides where a chat request is validated: the body's size, or for a request built
/// already (Responses API, terminal chat) the size of its messages' text.
fn input_size(input: &ChatInput) -> usize {
    match input {
        ChatInput::Body(body) => body.len(),
        ChatInput::Parsed(request) => request
            .messages
            .iter()
            .filter_map(|m| m.content.as_ref())
            .map(|content| match content {
                MessageContent::Text(text) => text.len(),
                MessageContent::Parts(parts) => parts
                    .iter()
                    .filter_map(|p| p.text.as_ref())
                    .map(String::len)
                    .sum(),
            })
            .sum(),
    }
}

/// Validations retried after their validator panicked (a fresh one takes over each time).
const RESTART_RETRIES: usize = 3;

/// The validators: the shared [`Validator`], its actor threads, and their supervision. One `Arc`
/// to clone (the serving path clones its handles per request).
#[derive(Clone)]
pub struct ValidatorPool(Arc<Pool>);

struct Pool {
    validator: Arc<Validator>,
    /// The validator threads, for large requests.
    actors: Addr<ValidatorActor>,
    supervision: ValidatorSupervision,
}

impl ValidatorPool {
    /// A pool running `validator` inline or on `actors`, supervised by `supervision` (the actors'
    /// own).
    pub fn new(
        validator: Arc<Validator>,
        actors: Addr<ValidatorActor>,
        supervision: ValidatorSupervision,
    ) -> Self {
        ValidatorPool(Arc::new(Pool {
            validator,
            actors,
            supervision,
        }))
    }

    /// Validate a chat request.
    pub async fn chat(&self, msg: ValidateChat) -> Result<ValidatedRequest, ApiError> {
        if input_size(&msg.input) <= INLINE_BODY_LIMIT {
            return self.inline(Job::Chat(&msg.input, &msg.context));
        }
        self.on_actors(msg).await
    }

    /// Validate a completions request.
    pub async fn completion(&self, msg: ValidateCompletion) -> Result<ValidatedRequest, ApiError> {
        if msg.body.len() <= INLINE_BODY_LIMIT {
            return self.inline(Job::Completion(&msg.body, &msg.context));
        }
        self.on_actors(msg).await
    }

    /// Runs `job` on this thread, retrying after a supervised panic as the actors do.
    fn inline(&self, job: Job<'_>) -> Result<ValidatedRequest, ApiError> {
        let mut tries = 0;
        loop {
            if let Some(refusal) = self.0.supervision.refusal() {
                return Err(refusal);
            }
            let reason = match self.0.validator.run(job.clone()) {
                Ok(result) => return result,
                Err(reason) => reason,
            };
            // Nothing to rebuild (the validator is read-only): the restart is counted and reported.
            let mut tracker = self.0.supervision.tracker();
            let (error, restarted) = self.0.supervision.failed(&mut tracker, reason);
            tries += 1;
            if !restarted || tries > RESTART_RETRIES {
                return Err(error);
            }
        }
    }

    /// Sends `msg` to a validator thread; retried when the validator panicked on it (a fresh one
    /// takes over).
    async fn on_actors<M>(&self, msg: M) -> Result<ValidatedRequest, ApiError>
    where
        M: actix::Message<Result = Result<ValidatedRequest, ApiError>> + Clone + Send + 'static,
        ValidatorActor: actix::Handler<M>,
    {
        let mut tries = 0;
        loop {
            let result = self.0.actors.send(msg.clone()).await.map_err(|e| {
                ApiError::new(
                    ErrorClass::Unavailable,
                    format!("validator unavailable: {e}"),
                )
                .with_details(serde_json::json!({"actor": "validator"}))
            })?;
            tries += 1;
            let restarted = matches!(&result, Err(e) if e.restarted == Some(ActorKind::Validator));
            if !restarted || tries > RESTART_RETRIES {
                return result;
            }
        }
    }
}
