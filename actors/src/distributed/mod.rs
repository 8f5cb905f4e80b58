//! The multi-process deployment (runtime spec §1, §5): `dynamix frontend` (HTTP, validator, router)
//! and `dynamix worker` (engines) as separate processes on existing infrastructure — etcd for
//! discovery, NATS for KV events and load metrics, TCP for requests and response streams.
//!
//! Layout:
//! - `mod.rs`: [`DistributedConfig`] (`[distributed]`), names of keys and subjects.
//! - [`wire`]: every message on etcd, NATS and TCP, in Dynamo 1.6.1's formats (interop spec).
//! - [`card`]: model deployment cards: a worker's files and checksums, a frontend's model.
//! - [`metadata`]: a worker's system server, serving its card's files over HTTP.
//! - [`etcd`]: the etcd v3 client (generated gRPC code for KV, Watch and Lease; no protoc needed).
//! - [`discovery`]: etcd — a worker's lease-bound registration and keep-alive; the frontend's watch.
//! - [`infra`]: start local etcd and NATS servers (tests, benches, the README's walk-through).
//! - [`events`]: NATS — KV events and load metrics, worker → every frontend.
//! - [`request_plane`]: the worker's TCP endpoint (request frames, ACKs) and its call-home responses.
//! - [`response_stream`]: the frontend's call-home server (pending subjects → streams).
//! - [`remote`]: [`remote::RemoteEngine`], the frontend's actor for one worker instance.
//! - [`text`]: Text-input models: their cards and instances, and calls to them.
//! - [`frontend`], [`worker`]: wiring of the two processes.

pub mod card;
pub mod discovery;
pub use dynamix_wire::etcd;
pub mod events;
pub mod frontend;
pub mod infra;
pub mod instances;
pub mod lanes;
pub mod metadata;
pub mod remote;
pub mod request_plane;
pub mod text;
pub use dynamix_wire::response_stream;
pub mod wire;
pub mod worker;

/// What the distributed layer takes from the local tree that [`crate::supervisor::start`] started:
/// only the pieces it wires to, so that this layer does not depend on the root that will supervise
/// it.
pub struct Local {
    /// The router: remote engines join and leave it; the worker's endpoint routes through it.
    pub router: actix::Addr<crate::router::KvRouterActor>,
    /// The router's shared state (remote engines report their requests' progress to it).
    pub shared_router: std::sync::Arc<crate::router::Router>,
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
    /// The process's metrics (a frontend's lanes count their requests there too).
    pub metrics: std::sync::Arc<crate::metrics::FrontendMetrics>,
    /// The fault injector (a worker's request plane takes `request_plane_panic` from it).
    pub faults: std::sync::Arc<crate::faults::FaultInjector>,
    /// Where a worker's request plane counts its failures (the tree's `request_plane` child).
    pub request_plane: std::sync::Arc<std::sync::Mutex<crate::supervision::RestartTracker>>,
    /// The tree's restart intensity and the root's inbox (`None`: a lane's, not under a tree).
    pub supervision: Option<(
        crate::supervision::SupervisionConfig,
        crate::supervision::SupervisorEvents,
    )>,
}

impl Local {
    /// The bookkeeping of this process's cluster child `kind`.
    pub fn tracker(
        &self,
        kind: crate::supervision::ActorKind,
    ) -> crate::supervision::RestartTracker {
        let mut tracker = crate::supervision::RestartTracker::new(kind, "0");
        if let Some((config, events)) = &self.supervision {
            tracker.supervise(config, events.clone());
        }
        tracker
    }
}

use crate::setting::InvalidSetting;
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
    /// Worker: port of the system server that serves the model card's files to frontends on
    /// other machines (`DYN_SYSTEM_PORT`; unset = the card names local paths; 0 = any free port).
    pub system_port: Option<u16>,
    /// Worker: address the system server binds (`DYN_SYSTEM_HOST`; default: `host`).
    pub system_host: Option<String>,
    /// Frontend: how requests reach workers that advertise the multiplexed request plane (dynamix
    /// workers): `mux` (streams on a few long-lived connections per worker) or `dynamo` (Dynamo's
    /// frame and a call-home connection per request, as Dynamo's own workers always get).
    pub request_plane_protocol: RequestPlaneProtocol,
    /// Frontend: long-lived connections each serving (HTTP worker) thread keeps to each worker
    /// (`mux`); a thread runs its requests on its own connections.
    pub mux_connections: usize,
    /// Frontend: items one stream may have in flight before its consumer takes them (`mux`); a
    /// slow client stalls its own stream, never the connection.
    pub mux_window: u32,
    /// How often each side of a multiplexed connection says it is alive (milliseconds).
    pub mux_heartbeat_ms: u64,
    /// Silence after which the other side of a multiplexed connection is taken for dead and its
    /// streams end (milliseconds): the frontend then migrates them.
    pub mux_dead_after_ms: u64,
}

/// `distributed.request_plane_protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestPlaneProtocol {
    /// The multiplexed request plane with workers that advertise it.
    #[default]
    Mux,
    /// Dynamo's request frame and call-home stream with every worker.
    Dynamo,
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
            system_port: None,
            system_host: None,
            request_plane_protocol: RequestPlaneProtocol::Mux,
            mux_connections: 1,
            mux_window: 64,
            mux_heartbeat_ms: 1000,
            mux_dead_after_ms: 5000,
        }
    }
}

/// Why the cluster side of a process (discovery, events, request plane, response streams) could not
/// start. Each message names the address, key or file involved.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A `[distributed]` setting out of its range.
    #[error("invalid config: {0}")]
    Setting(#[from] InvalidSetting),
    /// A listener could not bind.
    #[error("cannot listen for {what} on {address}: {source}")]
    Listen {
        /// What it would serve (`requests`, `response streams`, `the model card's files`).
        what: &'static str,
        /// `host:port`.
        address: String,
        /// The bind error.
        source: std::io::Error,
    },
    /// etcd could not be reached, or refused a call.
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
    /// etcd could not be reached for a watch.
    #[error("cannot connect to etcd for {what}: {source}")]
    Etcd {
        /// What the connection was for.
        what: &'static str,
        /// The client's error.
        source: etcd::Error,
    },
    /// A prefix watch could not start (the message names the prefix).
    #[error(transparent)]
    Watch(#[from] dynamix_wire::watch::WatchError),
    /// NATS could not be reached, or a subscription failed.
    #[error(transparent)]
    Events(#[from] events::EventsError),
    /// A file the model card names could not be served.
    #[error("card file {path}: {why}")]
    CardFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
}

impl DistributedConfig {
    /// Checks names and ranges; the error names the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.etcd_endpoints.is_empty() {
            return Err(InvalidSetting::new(
                "distributed.etcd_endpoints",
                "[]",
                "must list at least one etcd URL",
            ));
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
                return Err(InvalidSetting::new(
                    key,
                    format!("{value:?}"),
                    "must match ^[a-z0-9-_]+$ (Dynamo's component naming)",
                ));
            }
        }
        if self.max_message_size == 0 {
            return Err(InvalidSetting::new(
                "distributed.max_message_size",
                0,
                "must be a positive number of bytes",
            ));
        }
        if self.lease_ttl_secs < 2 {
            return Err(InvalidSetting::new(
                "distributed.lease_ttl_secs",
                self.lease_ttl_secs,
                "must be at least 2 seconds",
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
                return Err(InvalidSetting::new(
                    key,
                    value,
                    "must be a positive number of seconds",
                ));
            }
        }
        if !(self.graceful_shutdown_grace_period_secs.is_finite()
            && self.graceful_shutdown_grace_period_secs >= 0.0)
        {
            return Err(InvalidSetting::new(
                "distributed.graceful_shutdown_grace_period_secs",
                self.graceful_shutdown_grace_period_secs,
                "must be a non-negative number of seconds",
            ));
        }
        if self.load_metrics_interval_ms == 0 {
            return Err(InvalidSetting::new(
                "distributed.load_metrics_interval_ms",
                0,
                "must be positive",
            ));
        }
        if !(1..=64).contains(&self.mux_connections) {
            return Err(InvalidSetting::new(
                "distributed.mux_connections",
                self.mux_connections,
                "must be between 1 and 64",
            ));
        }
        if self.mux_window == 0 {
            return Err(InvalidSetting::new(
                "distributed.mux_window",
                0,
                "must be at least 1 item",
            ));
        }
        if self.mux_heartbeat_ms < 10 {
            return Err(InvalidSetting::new(
                "distributed.mux_heartbeat_ms",
                self.mux_heartbeat_ms,
                "must be at least 10 milliseconds",
            ));
        }
        if self.mux_dead_after_ms < 2 * self.mux_heartbeat_ms {
            return Err(InvalidSetting::new(
                "distributed.mux_dead_after_ms",
                self.mux_dead_after_ms,
                format!(
                    "must be at least twice distributed.mux_heartbeat_ms ({}), or a live peer would be taken for dead",
                    self.mux_heartbeat_ms
                ),
            ));
        }
        Ok(())
    }

    /// The multiplexed request plane's settings.
    pub fn mux(&self) -> dynamix_wire::mux::MuxSettings {
        dynamix_wire::mux::MuxSettings {
            connections: self.mux_connections,
            window: self.mux_window,
            heartbeat: std::time::Duration::from_millis(self.mux_heartbeat_ms),
            dead_after: std::time::Duration::from_millis(self.mux_dead_after_ms),
        }
    }

    /// The client side's: `None` when every request goes as Dynamo's frame.
    pub fn client_mux(&self) -> Option<dynamix_wire::mux::MuxSettings> {
        (self.request_plane_protocol == RequestPlaneProtocol::Mux).then(|| self.mux())
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

    /// etcd key of an instance's model card: `v1/mdc/{ns}/{comp}/{ep}/{id:x}`.
    pub fn card_key(&self, instance_id: u64) -> String {
        format!(
            "v1/mdc/{}/{}/{}/{instance_id:x}",
            self.namespace, self.component, self.endpoint
        )
    }

    /// etcd prefix of the model cards of the served endpoint.
    pub fn card_prefix(&self) -> String {
        format!(
            "v1/mdc/{}/{}/{}/",
            self.namespace, self.component, self.endpoint
        )
    }

    /// NATS subject of one event-plane topic of the served endpoint:
    /// `namespace.{ns}.component.{comp}.endpoint.{ep}.{topic}`.
    pub fn event_subject(&self, topic: &str) -> String {
        format!(
            "{}.{topic}",
            wire::events::subject_prefix(&self.namespace, &self.component, &self.endpoint)
        )
    }

    /// The endpoint path of instance `id` in request-plane frames: `{id:x}/{ns}/{comp}/{ep}`.
    pub fn endpoint_path(&self, id: u64) -> String {
        wire::record::endpoint_path(id, &self.namespace, &self.component, &self.endpoint)
    }
}

pub use crate::protocol::engine::LoadMetrics;
pub use wire::{Instance, Transport};

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
            c.event_subject("kv-events"),
            "namespace.dynamo.component.backend.endpoint.generate.kv-events"
        );
        assert_eq!(c.endpoint_path(0x1f), "1f/dynamo/backend/generate");
    }

    #[test]
    fn bad_names_are_named() {
        let c = DistributedConfig {
            component: "Back End".into(),
            ..DistributedConfig::default()
        };
        assert!(c.validate().unwrap_err().key == "distributed.component");
    }
}
