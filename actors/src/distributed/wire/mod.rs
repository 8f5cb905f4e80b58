//! The one vocabulary on the wire: Dynamo 1.6.1's messages (interop spec §2–§7), each as one serde
//! type, mapped from and to dynamix's internal types here and nowhere else. dynamix-to-dynamix
//! traffic uses the same types, so a dynamix frontend serves Dynamo workers and a Dynamo frontend
//! serves dynamix workers with the code that serves its own kind.
//!
//! Layout:
//! - [`record`]: the etcd instance record (`type: "Endpoint"`, the `tcp` transport with its path).
//! - [`request`]: the pre-processed request a frontend sends ([`PreprocessedRequest`]).
//! - [`response`]: the response-stream items (`Annotated<LLMEngineOutput>`, the final marker).
//! - [`error`]: Dynamo's error object and its mapping to [`crate::error::ApiError`].
//! - [`events`]: the NATS event-plane envelope, KV-event batches and `kv_metrics`.
//!
//! Bodies travel as JSON or msgpack ([`PayloadCodec`]); the worker answers in the codec of the
//! request. dynamix-only fields (the echo text, logit bias, migration offsets) ride in the request's
//! `extra_args.dynamix`, and only towards workers whose record marks them as dynamix workers.

pub mod error;
pub mod events;
pub mod request;
pub mod response;

pub use dynamix_wire::record::{self, Instance, Transport};
pub use dynamix_wire::PayloadCodec;
pub use error::DynamoError;
pub use request::PreprocessedRequest;
pub use response::{LlmEngineOutput, StreamItem, WireItem};

#[cfg(test)]
mod tests;
