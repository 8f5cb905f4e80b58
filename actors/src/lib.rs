//! dynamix-actors: the actors of the dynamix serving runtime and the domain logic beside each.
//!
//! # Layout
//! - [`supervision`]: the supervision primitives every supervised actor uses ([`supervision::ActorKind`],
//!   restart budgets, [`supervision::RestartTracker`]); imports no actor.
//! - [`supervisor`]: the root [`supervisor::Supervisor`]; starts and owns the tree, drains it on shutdown.
//! - [`http`]: [`http::HttpActor`] and the actix-web server: OpenAI routes, SSE, health, metrics, docs.
//! - [`validator`]: [`validator::ValidatorActor`]: parsing, the §4 validation rules, templating, tokenization.
//! - [`router`]: [`router::KvRouterActor`]: engine selection (round-robin, random; the KV seam).
//! - [`engine`]: the [`engine::Engine`] trait, [`engine::EngineActor`] (one per device, own thread), echo.
//! - [`embeddings`]: [`embeddings::EmbeddingActor`]: the `/v1/embeddings` model (BERT on candle), batching.
//! - [`gateway`]: the serving path shared by HTTP, terminal chat and batch runs.
//! - [`backend`]: per-choice detokenization and stop handling.
//! - [`protocol`]: wire types (OpenAI requests/responses) and the internal engine request/output.
//! - [`error`]: the one error vocabulary ([`error::ErrorClass`], [`error::ApiError`]).
//! - [`kv`]: KV block hashing and the KV event protocol shared by engines and the router.
//! - [`metrics`]: the `dynamo_frontend_*` Prometheus metrics.
//! - [`tokenizer`]: GGUF metadata, the model's tokenizer and chat template, streaming detokenizer.
//! - [`models`]: the model store (`dynamix models pull`).
//! - [`distributed`]: frontend and worker processes over etcd (discovery), NATS (events) and TCP.

pub mod backend;
pub use dynamix_wire::codec;
pub mod distributed;
pub mod embeddings;
pub mod engine;
pub mod error;
pub mod faults;
pub mod gateway;
pub mod gms;
pub mod http;
pub mod kv;
pub mod metrics;
pub mod models;
pub mod protocol;
pub mod router;
pub mod setting;
pub mod supervision;
pub mod supervisor;
pub mod tokenizer;
pub mod validator;
