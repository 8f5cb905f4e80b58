//! The event plane on NATS (interop spec §2.4, §7). Subjects are
//! `namespace.{ns}.component.{comp}.endpoint.{ep}.{topic}`; every message is a msgpack envelope
//! `{publisher_id, sequence, published_at, topic, payload}` whose `payload` is itself msgpack:
//! an array of [`RouterEvent`]s for `kv-events`, an [`ActiveLoad`] for `kv_metrics`, and dynamix's
//! [`LoadMetrics`] for `load_metrics` (a dynamix-only topic Dynamo never subscribes to).
//!
//! A Dynamo frontend applies KV events only from publishers registered in etcd: an
//! [`EventChannelRecord`] per topic and an [`EventSourceRecord`] binding the publisher to the worker,
//! both under the worker's lease.

use serde::{Deserialize, Serialize};

use crate::kv::protocol::RouterEvent;
use crate::protocol::engine::LoadMetrics;

/// Topic of KV events.
pub const KV_EVENTS: &str = "kv-events";
/// Topic of KV usage (`ActiveLoad`).
pub const KV_METRICS: &str = "kv_metrics";
/// dynamix's load topic.
pub const LOAD_METRICS: &str = "load_metrics";

/// `namespace.{ns}.component.{comp}.endpoint.{ep}`.
pub fn subject_prefix(namespace: &str, component: &str, endpoint: &str) -> String {
    format!("namespace.{namespace}.component.{component}.endpoint.{endpoint}")
}

/// Why an event-plane message or registration record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The envelope could not be encoded.
    #[error(transparent)]
    Encode(#[from] rmp_serde::encode::Error),
    /// The bytes are not a msgpack envelope.
    #[error("not an event envelope: {0}")]
    NotAnEnvelope(#[source] rmp_serde::decode::Error),
    /// The payload is not the topic's type.
    #[error("{topic} payload from publisher {publisher_id:x}: {source}")]
    Payload {
        /// The envelope's topic.
        topic: String,
        /// The publisher.
        publisher_id: u64,
        /// The decoder's error.
        source: rmp_serde::decode::Error,
    },
    /// An etcd record could not be encoded.
    #[error("{source}")]
    Record {
        /// The key it was meant for.
        key: String,
        /// The serializer's error.
        source: serde_json::Error,
    },
}

/// One message on the event plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// The publisher (random per process, below 2^53).
    pub publisher_id: u64,
    /// Per publisher, from 0.
    pub sequence: u64,
    /// Unix milliseconds.
    pub published_at: u64,
    /// The topic (the subject's last token).
    pub topic: String,
    /// msgpack of the topic's payload.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl EventEnvelope {
    /// Encodes the envelope (msgpack).
    pub fn encode(&self) -> Result<Vec<u8>, EventError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    /// Decodes an envelope.
    pub fn decode(bytes: &[u8]) -> Result<EventEnvelope, EventError> {
        rmp_serde::from_slice(bytes).map_err(EventError::NotAnEnvelope)
    }

    /// Decodes the payload as a `T`.
    pub fn payload<T: serde::de::DeserializeOwned>(&self) -> Result<T, EventError> {
        rmp_serde::from_slice(&self.payload).map_err(|source| EventError::Payload {
            topic: self.topic.clone(),
            publisher_id: self.publisher_id,
            source,
        })
    }
}

/// A batch of KV events, as `kv-events` carries them.
pub type KvEventBatch = Vec<RouterEvent>;

/// `kv_metrics`: a worker's KV usage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ActiveLoad {
    /// The worker (instance id).
    pub worker_id: u64,
    /// Data-parallel rank.
    #[serde(default)]
    pub dp_rank: u32,
    /// Blocks of running sequences.
    #[serde(default)]
    pub active_decode_blocks: Option<u64>,
    /// Prompt tokens waiting for prefill.
    #[serde(default)]
    pub active_prefill_tokens: Option<u64>,
    /// KV blocks in use.
    #[serde(default)]
    pub kv_used_blocks: Option<u64>,
}

/// dynamix's load, carried on `load_metrics`.
pub type LoadPayload = LoadMetrics;

/// `{namespace, component, name}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EndpointId {
    /// Namespace.
    pub namespace: String,
    /// Component.
    pub component: String,
    /// Endpoint.
    pub name: String,
}

/// `{"kind": "endpoint", "endpoint": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventScope {
    /// `endpoint`.
    pub kind: String,
    /// The endpoint.
    pub endpoint: EndpointId,
}

/// How a channel's events travel: `{"kind": "Nats", "config": {"subject_prefix": ...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventTransport {
    /// `Nats` (or `Zmq`).
    pub kind: String,
    /// Its settings.
    pub config: serde_json::Value,
}

/// `v1/event_channels/namespace/{ns}/component/{comp}/endpoint/{ep}/topic/{topic}/{pub:x}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventChannelRecord {
    /// `EventChannel`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The endpoint the events are about.
    pub scope: EventScope,
    /// The topic.
    pub topic: String,
    /// The publisher id.
    pub instance_id: u64,
    /// Where they travel.
    pub transport: EventTransport,
}

/// `{worker_id, dp_rank}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerRank {
    /// Instance id.
    pub worker_id: u64,
    /// Data-parallel rank.
    pub dp_rank: u32,
}

/// The metadata of an event source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventSourceMetadata {
    /// The endpoint whose KV state the events describe.
    pub kv_state_endpoint: EndpointId,
    /// The worker the publisher speaks for.
    pub worker: WorkerRank,
    /// The publisher id.
    pub publisher_id: u64,
}

/// `v1/event_sources/namespace/{ns}/component/{comp}/endpoint/{ep}/topic/kv-events/{pub:x}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventSourceRecord {
    /// `EventSource`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The endpoint.
    pub scope: EventScope,
    /// `kv-events`.
    pub topic: String,
    /// The publisher id.
    pub publisher_id: u64,
    /// Binding to the worker.
    pub metadata: EventSourceMetadata,
}

/// The etcd keys and values a worker that publishes on NATS registers under its lease: a channel
/// per topic and the KV-event source binding `publisher_id` to `worker_id`.
pub fn registration_records(
    namespace: &str,
    component: &str,
    endpoint: &str,
    publisher_id: u64,
    worker_id: u64,
    topics: &[&str],
) -> Result<Vec<(String, Vec<u8>)>, EventError> {
    let id = EndpointId {
        namespace: namespace.into(),
        component: component.into(),
        name: endpoint.into(),
    };
    let scope = EventScope {
        kind: "endpoint".into(),
        endpoint: id.clone(),
    };
    let base = format!("namespace/{namespace}/component/{component}/endpoint/{endpoint}/topic");
    let mut records = Vec::new();
    for topic in topics {
        let channel = EventChannelRecord {
            kind: "EventChannel".into(),
            scope: scope.clone(),
            topic: (*topic).into(),
            instance_id: publisher_id,
            transport: EventTransport {
                kind: "Nats".into(),
                config: serde_json::json!({
                    "subject_prefix": subject_prefix(namespace, component, endpoint)
                }),
            },
        };
        let key = format!("v1/event_channels/{base}/{topic}/{publisher_id:x}");
        let value = record_bytes(&key, &channel)?;
        records.push((key, value));
    }
    if topics.contains(&KV_EVENTS) {
        let source = EventSourceRecord {
            kind: "EventSource".into(),
            scope,
            topic: KV_EVENTS.into(),
            publisher_id,
            metadata: EventSourceMetadata {
                kv_state_endpoint: id,
                worker: WorkerRank {
                    worker_id,
                    dp_rank: 0,
                },
                publisher_id,
            },
        };
        let key = format!("v1/event_sources/{base}/{KV_EVENTS}/{publisher_id:x}");
        let value = record_bytes(&key, &source)?;
        records.push((key, value));
    }
    Ok(records)
}

/// The JSON of the record meant for `key`.
fn record_bytes(key: &str, record: &impl Serialize) -> Result<Vec<u8>, EventError> {
    serde_json::to_vec(record).map_err(|source| EventError::Record {
        key: key.into(),
        source,
    })
}
