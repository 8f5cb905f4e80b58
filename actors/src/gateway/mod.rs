//! The serving path shared by every front end (HTTP, terminal chat, batch files): validate and tokenize
//! on the [`ValidatorActor`](crate::validator::ValidatorActor), route each choice through the
//! [`KvRouterActor`](crate::router::KvRouterActor) to an engine, and read the engines' bounded token
//! channels as one [`Generation`] of decoded deltas.
//!
//! One message per hop: `ValidateChat`/`ValidateCompletion` to the validator, one `Route` per choice to the
//! router (which forwards one `Generate` to the engine). Tokens never travel through a mailbox.

use std::sync::Arc;

use actix::Addr;
use futures_util::stream::{SelectAll, StreamExt};
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::backend::{ChoiceDecoder, Delta};
use crate::error::{ApiError, ErrorClass};
use crate::protocol::engine::EngineEvent;
use crate::protocol::Usage;
use crate::router::{KvRouterActor, Route};
use crate::tokenizer::ModelTokenizer;
use crate::validator::{ValidateChat, ValidateCompletion, ValidatedRequest, ValidatorActor};

/// Handles to the actors of the serving path; cheap to clone into every HTTP worker.
#[derive(Clone)]
pub struct Gateway {
    /// Validation and tokenization.
    pub validator: Addr<ValidatorActor>,
    /// Engine selection.
    pub router: Addr<KvRouterActor>,
    /// For detokenizing engine output.
    pub tokenizer: Arc<ModelTokenizer>,
    /// Capacity of each choice's token channel.
    pub stream_buffer: usize,
}

fn mailbox_error(what: &str, e: actix::MailboxError) -> ApiError {
    ApiError::new(ErrorClass::Unavailable, format!("{what} unavailable: {e}"))
        .with_details(serde_json::json!({"actor": what}))
}

impl Gateway {
    /// Validate a chat request.
    pub async fn validate_chat(&self, msg: ValidateChat) -> Result<ValidatedRequest, ApiError> {
        self.validator
            .send(msg)
            .await
            .map_err(|e| mailbox_error("validator", e))?
    }

    /// Validate a completions request.
    pub async fn validate_completion(
        &self,
        msg: ValidateCompletion,
    ) -> Result<ValidatedRequest, ApiError> {
        self.validator
            .send(msg)
            .await
            .map_err(|e| mailbox_error("validator", e))?
    }

    /// Route every choice of `request` and return its generation. Fails (before any output) when an
    /// engine cannot be found or every engine is overloaded.
    pub async fn generate(&self, request: &ValidatedRequest) -> Result<Generation, ApiError> {
        let mut streams = SelectAll::new();
        let mut decoders = Vec::with_capacity(request.choices.len());
        let mut cached_tokens = None;
        for (index, choice) in request.choices.iter().enumerate() {
            let (tx, rx) = mpsc::channel::<EngineEvent>(self.stream_buffer.max(1));
            let routed = self
                .router
                .send(Route {
                    request: choice.clone(),
                    output: tx,
                })
                .await
                .map_err(|e| mailbox_error("router", e))??;
            // Choices of one prompt share it: the first choice's estimate stands for the request.
            cached_tokens = cached_tokens.or(routed.cached_tokens);
            streams.push(receiver_stream(index, rx).boxed());
            decoders.push(ChoiceDecoder::new(
                self.tokenizer.clone(),
                choice.stop.clone(),
                request.skip_special_tokens,
            ));
        }
        Ok(Generation {
            streams,
            decoders,
            prompt_tokens: request.prompt_tokens,
            cached_tokens,
            finished: 0,
        })
    }
}

type IndexedEvents = futures_util::stream::BoxStream<'static, (usize, Option<EngineEvent>)>;

/// Yields `(index, Some(event))` for each event and a final `(index, None)` when the channel closes.
fn receiver_stream(
    index: usize,
    mut rx: mpsc::Receiver<EngineEvent>,
) -> impl Stream<Item = (usize, Option<EngineEvent>)> + Send {
    let mut closed = false;
    futures_util::stream::poll_fn(move |cx| {
        if closed {
            return std::task::Poll::Ready(None);
        }
        match rx.poll_recv(cx) {
            std::task::Poll::Ready(Some(ev)) => std::task::Poll::Ready(Some((index, Some(ev)))),
            std::task::Poll::Ready(None) => {
                closed = true;
                std::task::Poll::Ready(Some((index, None)))
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
}

/// One decoded delta of one choice.
#[derive(Clone, Debug, PartialEq)]
pub struct ChoiceDelta {
    /// Choice index.
    pub index: u32,
    /// The delta.
    pub delta: Delta,
}

/// The running generation of all choices of one request. Dropping it closes every channel, which
/// cancels the work in the engines.
pub struct Generation {
    streams: SelectAll<IndexedEvents>,
    decoders: Vec<ChoiceDecoder>,
    prompt_tokens: u32,
    cached_tokens: Option<u32>,
    finished: usize,
}

impl Generation {
    /// The next delta, an error, or `None` when every choice has finished.
    pub async fn next(&mut self) -> Option<Result<ChoiceDelta, ApiError>> {
        loop {
            if self.finished == self.decoders.len() {
                return None;
            }
            let (index, event) = match self.streams.next().await {
                Some(item) => item,
                None => return None,
            };
            let Some(decoder) = self.decoders.get_mut(index) else {
                continue;
            };
            if decoder.is_finished() {
                continue;
            }
            let result = match event {
                Some(Ok(output)) => decoder.process(output),
                Some(Err(e)) => Err(e),
                None => Err(ApiError::new(
                    ErrorClass::Internal,
                    "Stream ended before generation completed",
                )),
            };
            match result {
                Ok(delta) => {
                    if delta.finish_reason.is_some() {
                        self.finished += 1;
                    }
                    if delta.text.is_empty() && delta.finish_reason.is_none() && delta.tokens == 0 {
                        continue;
                    }
                    return Some(Ok(ChoiceDelta {
                        index: index as u32,
                        delta,
                    }));
                }
                Err(e) => {
                    // One failed choice fails the request.
                    self.finished = self.decoders.len();
                    return Some(Err(e));
                }
            }
        }
    }

    /// Usage so far (exact once the generation has finished).
    pub fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens,
            self.decoders.iter().map(ChoiceDecoder::generated).sum(),
        )
    }

    /// Prompt tokens the router expects the engine to find cached (`kv` routing only).
    pub fn cached_tokens(&self) -> Option<u32> {
        self.cached_tokens
    }

    /// Number of choices.
    pub fn choices(&self) -> usize {
        self.decoders.len()
    }
}
