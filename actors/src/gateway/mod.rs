//! The serving path shared by every front end (HTTP, terminal chat, batch files): validate and tokenize
//! on the [`ValidatorActor`](crate::validator::ValidatorActor), route each choice through the
//! [`KvRouterActor`](crate::router::KvRouterActor) to an engine, and read the engines' bounded token
//! channels as one [`Generation`] of decoded deltas.
//!
//! One message per hop: `ValidateChat`/`ValidateCompletion` to the validator, one `Route` per choice to the
//! router (which forwards one `Generate` to the engine). Tokens never travel through a mailbox.
//!
//! Faults: a validation whose validator panicked is retried on a fresh validator; each choice's stream
//! migrates to another engine when its engine fails ([`migration`]).

pub mod inflight;
pub mod migration;

use std::sync::Arc;

use actix::Addr;
use futures_util::stream::{SelectAll, StreamExt};
use tokio::sync::mpsc;

use crate::backend::{ChoiceDecoder, Delta};
use crate::error::{ApiError, ErrorClass};
use crate::protocol::engine::EngineEvent;
use crate::protocol::Usage;
use crate::router::KvRouterActor;
use crate::tokenizer::ModelTokenizer;
use crate::validator::{ValidateChat, ValidateCompletion, ValidatedRequest, ValidatorPool};
use migration::{ChoiceStream, Migrator, Recoveries, Recovery};

/// Handles to the actors of the serving path; cheap to clone into every HTTP worker.
#[derive(Clone)]
pub struct Gateway {
    /// Validation and tokenization.
    pub validator: ValidatorPool,
    /// Engine selection.
    pub router: Addr<KvRouterActor>,
    /// For detokenizing engine output.
    pub tokenizer: Arc<ModelTokenizer>,
    /// Capacity of each choice's token channel.
    pub stream_buffer: usize,
    /// Request migration (router, limits, metrics, in-flight registry).
    pub migrator: Arc<Migrator>,
}

impl Gateway {
    /// Validate a chat request.
    pub async fn validate_chat(&self, msg: ValidateChat) -> Result<ValidatedRequest, ApiError> {
        self.validator.chat(msg).await
    }

    /// Validate a completions request.
    pub async fn validate_completion(
        &self,
        msg: ValidateCompletion,
    ) -> Result<ValidatedRequest, ApiError> {
        self.validator.completion(msg).await
    }

    /// Route every choice of `request` and return its generation. Fails (before any output) when an
    /// engine cannot be found or every engine is overloaded.
    pub async fn generate(&self, request: &ValidatedRequest) -> Result<Generation, ApiError> {
        let mut streams = Vec::with_capacity(request.choices.len());
        let mut decoders = Vec::with_capacity(request.choices.len());
        let mut cached_tokens = None;
        let recoveries = Recoveries::default();
        for (index, choice) in request.choices.iter().enumerate() {
            let (tx, rx) = mpsc::channel::<EngineEvent>(self.stream_buffer.max(1));
            let mut migrations_left = self.migrator.config.limit;
            let routed = migration::route(
                &self.migrator,
                choice,
                &tx,
                Vec::new(),
                &mut migrations_left,
            )
            .await?;
            drop(tx);
            // Choices of one prompt share it: the first choice's estimate stands for the request.
            cached_tokens = cached_tokens.or(routed.cached_tokens);
            let stream = ChoiceStream::new(
                index,
                self.migrator.clone(),
                choice.clone(),
                rx,
                routed,
                migrations_left,
                recoveries.clone(),
            );
            streams.push(stream);
            decoders.push(ChoiceDecoder::new(
                self.tokenizer.clone(),
                choice.stop.clone(),
                request.skip_special_tokens,
            ));
        }
        let streams = match <[ChoiceStream; 1]>::try_from(streams) {
            Ok([one]) => Choices::One(Box::new(one)),
            Err(many) => Choices::Many(
                many.into_iter()
                    .map(|stream| stream.into_stream().boxed())
                    .collect(),
            ),
        };
        Ok(Generation {
            streams,
            decoders,
            prompt_tokens: request.prompt_tokens,
            cached_tokens,
            finished: 0,
            recoveries,
        })
    }
}

type IndexedEvents = futures_util::stream::BoxStream<'static, (usize, Option<EngineEvent>)>;

/// The engine streams of a request's choices.
enum Choices {
    /// One choice, the common case: its stream is read directly, with no stream combinator
    /// re-queueing it for every output.
    One(Box<ChoiceStream>),
    /// Several: whichever has output first.
    Many(SelectAll<IndexedEvents>),
}

impl Choices {
    async fn next(&mut self) -> Option<(usize, Option<EngineEvent>)> {
        match self {
            Choices::One(stream) => stream.next_item().await,
            Choices::Many(streams) => streams.next().await,
        }
    }
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
    streams: Choices,
    decoders: Vec<ChoiceDecoder>,
    prompt_tokens: u32,
    cached_tokens: Option<u32>,
    finished: usize,
    recoveries: Recoveries,
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
                Some(Ok(output)) => {
                    // The engine's own count of its prefix-cache hits replaces the router's estimate.
                    if index == 0 {
                        if let Some(cached) = output.cached_tokens {
                            self.cached_tokens = Some(cached);
                        }
                    }
                    decoder.process(output)
                }
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

    /// Prompt tokens served from the engine's prefix cache: what the engine reported with its first
    /// output, else what the router expected it to find (`kv` routing), else `None`. Taken: a second
    /// call gets `None` unless the engine reported again since.
    pub fn take_cached_tokens(&mut self) -> Option<u32> {
        self.cached_tokens.take()
    }

    /// Migrations that recovered this request's streams so far, with their recovery gaps.
    pub fn recoveries(&self) -> Vec<Recovery> {
        self.recoveries
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Number of choices.
    pub fn choices(&self) -> usize {
        self.decoders.len()
    }
}
