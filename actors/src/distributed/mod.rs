//! The multi-process deployment (runtime spec §1, §5): `dynamix frontend` (HTTP, validator, router)
//! and `dynamix worker` (engines) as separate processes on existing infrastructure — etcd for
//! discovery, NATS for KV events and load metrics, TCP for requests and response streams.
//!
//! Layout:
//! - `mod.rs`: [`DistributedConfig`] (`[distributed]`), the discovery record [`Instance`], names.
//! - [`etcd`]: the etcd v3 client (generated gRPC code for KV, Watch and Lease; no protoc needed).
//! - [`discovery`]: etcd — a worker's lease-bound registration and keep-alive; the frontend's watch.
//! - [`infra`]: start local etcd and NATS servers (tests, benches, the README's walk-through).
//! - [`events`]: NATS — KV events and load metrics, worker → every frontend.
//! - [`request_plane`]: the worker's TCP endpoint (request frames, ACKs) and its call-home responses.
//! - [`response_stream`]: the frontend's call-home server (pending subjects → streams).
//! - [`remote`]: [`remote::RemoteEngine`], the frontend's actor for one worker instance.
//! - [`frontend`], [`worker`]: wiring of the two processes.

pub mod discovery;
pub mod etcd;
pub mod events;
pub mod frontend;
pub mod infra;
pub mod remote;
pub mod request_plane;
pub mod response_stream;
pub mod worker;

/// What the distributed layer takes from the local tree that [`crate::supervisor::start`] started:
/// only the pieces it wires to, so that this layer does not depend on the root that will supervise
/// it.
pub struct Local {
    /// The router: remote engines join and leave it; the worker's endpoint routes through it.
    pub router: actix::Addr<crate::router::KvRouterActor>,
    /// Engines and their live load (`/health`, the load publisher).
    pub engines: std::sync::Arc<crate::engine::registry::EngineRegistry>,
    /// Frontend: the KV index's writer, to purge a worker that left.
    pub indexer: Option<actix::Addr<crate::router::indexer::KvIndexerActor>>,
    /// Frontend: where KV events received from workers go.
    pub kv_events_in: Option<tokio::sync::mpsc::UnboundedSender<crate::kv::protocol::RouterEvent>>,
    /// Worker: the local engines' KV events, to publish (taken by the publisher).
    pub kv_events_out:
        Option<tokio::sync::mpsc::UnboundedReceiver<crate::kv::protocol::RouterEvent>>,
    /// KV block size the engines use.
    pub kv_block_size: usize,
    /// Frontend: the `/health` reporter of discovery and events, set once they run.
    pub cluster: crate::http::ClusterStatus,
}

use serde::{Deserialize, Serialize};

/// `[distributed]`: where etcd and NATS are and how this process is addressed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistributedConfig {
    /// etcd client URLs (`ETCD_ENDPOINTS`, comma-separated).
    pub etcd_endpoints: Vec<String>,
    /// NATS server URL (`NATS_SERVER`).
    pub nats_url: String,
    /// Namespace of the served component (`DYN_NAMESPACE`).
    pub namespace: String,
    /// Component the workers serve.
    pub component: String,
    /// Endpoint the workers serve.
    pub endpoint: String,
    /// Time-to-live of a worker's etcd lease, in seconds: a worker that stops renewing it (killed,
    /// partitioned) disappears from discovery this long after its last renewal.
    pub lease_ttl_secs: u64,
    /// Address this process advertises and binds its TCP servers to (`DYN_TCP_RPC_HOST`).
    pub host: String,
    /// Worker: port of the TCP request plane (0 = any free port; the chosen one is advertised).
    pub request_plane_port: u16,
    /// Frontend: port of the call-home response-stream server (0 = any free port).
    pub response_stream_port: u16,
    /// How long the frontend waits for a worker's ACK, and then for its call-home connection
    /// (`DYN_TCP_REQUEST_TIMEOUT`, seconds).
    pub request_timeout_secs: f64,
    /// How long connecting to a worker may take (`DYN_TCP_CONNECT_TIMEOUT`, seconds).
    pub connect_timeout_secs: f64,
    /// How often a worker publishes its load metrics (milliseconds).
    pub load_metrics_interval_ms: u64,
    /// Worker: seconds to keep serving after leaving discovery on SIGTERM, so routing stops first
    /// (`DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS`).
    pub graceful_shutdown_grace_period_secs: f64,
    /// Largest request-plane frame, in bytes (`DYN_TCP_MAX_MESSAGE_SIZE`).
    pub max_message_size: usize,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        DistributedConfig {
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            nats_url: "nats://127.0.0.1:4222".into(),
            namespace: "dynamo".into(),
            component: "backend".into(),
            endpoint: "generate".into(),
            lease_ttl_secs: 10,
            host: "127.0.0.1".into(),
            request_plane_port: 0,
            response_stream_port: 0,
            request_timeout_secs: 5.0,
            connect_timeout_secs: 5.0,
            load_metrics_interval_ms: 1000,
            graceful_shutdown_grace_period_secs: 5.0,
            max_message_size: crate::codec::tcp::DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

impl DistributedConfig {
    /// Checks names and ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.etcd_endpoints.is_empty() {
            return Err("distributed.etcd_endpoints must list at least one etcd URL".into());
        }
        for (key, value) in [
            ("distributed.namespace", &self.namespace),
            ("distributed.component", &self.component),
            ("distributed.endpoint", &self.endpoint),
        ] {
            if value.is_empty()
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                return Err(format!(
                    "{key} = {value:?} must match ^[a-z0-9-_]+$ (Dynamo's component naming)"
                ));
            }
        }
        if self.max_message_size == 0 {
            return Err("distributed.max_message_size must be a positive number of bytes".into());
        }
        if self.lease_ttl_secs < 2 {
            return Err(format!(
                "distributed.lease_ttl_secs = {} must be at least 2 seconds",
                self.lease_ttl_secs
            ));
        }
        for (key, value) in [
            (
                "distributed.request_timeout_secs",
                self.request_timeout_secs,
            ),
            (
                "distributed.connect_timeout_secs",
                self.connect_timeout_secs,
            ),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(format!(
                    "{key} = {value} must be a positive number of seconds"
                ));
            }
        }
        if !(self.graceful_shutdown_grace_period_secs.is_finite()
            && self.graceful_shutdown_grace_period_secs >= 0.0)
        {
            return Err(format!(
                "distributed.graceful_shutdown_grace_period_secs = {} must be a non-negative number of seconds",
                self.graceful_shutdown_grace_period_secs
            ));
        }
        if self.load_metrics_interval_ms == 0 {
            return Err("distributed.load_metrics_interval_ms must be positive".into());
        }
        Ok(())
    }

    /// etcd prefix the frontend watches: `v1/instances/{ns}/{comp}/{ep}/`.
    pub fn instance_prefix(&self) -> String {
        format!(
            "v1/instances/{}/{}/{}/",
            self.namespace, self.component, self.endpoint
        )
    }

    /// etcd key of one instance: the prefix then the lease id in hex.
    pub fn instance_key(&self, instance_id: u64) -> String {
        format!("{}{instance_id:x}", self.instance_prefix())
    }

    /// NATS subject of the component's KV events: `namespace.{ns}.component.{comp}.kv-events`.
    pub fn kv_events_subject(&self) -> String {
        format!(
            "namespace.{}.component.{}.kv-events",
            self.namespace, self.component
        )
    }

    /// NATS subject of the workers' load metrics: `namespace.{ns}.component.{comp}.load_metrics`.
    pub fn load_metrics_subject(&self) -> String {
        format!(
            "namespace.{}.component.{}.load_metrics",
            self.namespace, self.component
        )
    }

    /// The endpoint path carried in request-plane frames: `{ns}.{comp}.{ep}`.
    pub fn endpoint_path(&self) -> String {
        format!("{}.{}.{}", self.namespace, self.component, self.endpoint)
    }
}

/// How an instance is reached (externally tagged, as upstream: `{"tcp": "tcp://ip:port"}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// The TCP request plane: `tcp://ip:port`.
    Tcp(String),
    /// NATS request plane: the instance subject.
    NatsTcp(String),
    /// HTTP/2 request plane.
    Http(String),
}

/// A worker's discovery record (the value under its lease-bound key, runtime spec §5.3), with what
/// the frontend needs to route to it beyond upstream's fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Component name.
    pub component: String,
    /// Endpoint name.
    pub endpoint: String,
    /// Namespace.
    pub namespace: String,
    /// The primary lease id.
    pub instance_id: u64,
    /// Where requests go.
    pub transport: Transport,
    /// The engine kind it runs (`mocker`, `model`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Its KV block size in tokens (the frontend's kv router must use the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_block_size: Option<usize>,
    /// Requests it admits at once (its engines' admission capacity summed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<usize>,
}

impl Instance {
    /// The `host:port` of a `tcp://` transport, else an error naming the transport.
    pub fn tcp_address(&self) -> Result<String, String> {
        match &self.transport {
            Transport::Tcp(url) => url
                .strip_prefix("tcp://")
                .map(str::to_string)
                .ok_or_else(|| format!("instance {:x}: transport {url:?} is not tcp://host:port", self.instance_id)),
            other => Err(format!(
                "instance {:x} uses transport {other:?}; this frontend speaks the TCP request plane only",
                self.instance_id
            )),
        }
    }
}

pub use crate::protocol::engine::LoadMetrics;

/// One item of a response stream (upstream's `Annotated<T>`): `data` carries an engine output; an
/// error travels as `event: "error"` with the message in `comment` and the typed error in `data`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Annotated {
    /// The item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Item id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `error` for an error item.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Error text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<Vec<String>>,
}

/// An [`ApiError`](crate::error::ApiError) on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// Its class (decides status and whether it migrates).
    pub class: crate::error::ErrorClass,
    /// Client-facing message.
    pub message: String,
    /// Structured details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl From<&crate::error::ApiError> for WireError {
    fn from(e: &crate::error::ApiError) -> Self {
        WireError {
            class: e.class,
            message: e.message.clone(),
            details: e.details.clone(),
        }
    }
}

impl From<WireError> for crate::error::ApiError {
    fn from(e: WireError) -> Self {
        crate::error::ApiError {
            class: e.class,
            message: e.message,
            details: e.details,
            restarted: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_upstream() {
        let c = DistributedConfig::default();
        assert_eq!(
            c.instance_key(0x1f),
            "v1/instances/dynamo/backend/generate/1f"
        );
        assert_eq!(
            c.kv_events_subject(),
            "namespace.dynamo.component.backend.kv-events"
        );
        let i = Instance {
            component: "backend".into(),
            endpoint: "generate".into(),
            namespace: "dynamo".into(),
            instance_id: 7,
            transport: Transport::Tcp("tcp://127.0.0.1:4000".into()),
            engine: None,
            kv_block_size: None,
            capacity: None,
        };
        let v = serde_json::to_value(&i).unwrap();
        assert_eq!(
            v["transport"],
            serde_json::json!({"tcp": "tcp://127.0.0.1:4000"})
        );
        assert_eq!(i.tcp_address().unwrap(), "127.0.0.1:4000");
    }

    #[test]
    fn bad_names_are_named() {
        let c = DistributedConfig {
            component: "Back End".into(),
            ..DistributedConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("distributed.component"));
    }
}
