//! etcd discovery (runtime spec §5.3).
//!
//! Protocol: a worker grants itself a lease of `lease_ttl_secs` and puts its JSON
//! [`Instance`](super::Instance) under `config.instance_key(lease_id)`
//! (`v1/instances/{ns}/{comp}/{ep}/{lease_id:x}`) attached to that lease; its instance id *is* the
//! lease id. A keep-alive task renews the lease every ttl/3. When the worker stops renewing (killed,
//! partitioned) etcd expires the lease and deletes the key; a graceful exit revokes the lease, which
//! deletes it at once. Either deletion is the "worker gone" signal.
//!
//! Layout: this file holds what both sides share (errors, bounded etcd access); [`registration`]
//! is the worker's side, [`watch`] the frontend's, `tests` runs both against a real etcd.
//!
//! The frontend lists the prefix `config.instance_prefix()` and then watches it from the listing's
//! revision + 1: a put is an instance [`DiscoveryEvent::Added`] (or re-announced), a delete is
//! [`DiscoveryEvent::Removed`]. When etcd goes away the watcher reports [`DiscoveryEvent::Lost`],
//! retries every 500 ms, and on success reports [`DiscoveryEvent::Restored`] followed by the diff
//! between what it knew and a fresh listing, so consumers converge without replaying history.
//!
//! A worker that survives an etcd outage keeps its lease if etcd still has it when it comes back;
//! if the lease expired meanwhile it registers again under a new lease, hence a new instance id,
//! published through [`Registration::watch_id`].
//!
//! A call on a channel whose peer went silent can wait for a long time, so every call here is
//! bounded by `connect_timeout_secs`, and a TCP probe of the endpoints first turns "nothing listens
//! there" into an immediate, clearly worded error. The client is [`super::etcd`]: generated gRPC
//! code for the few etcd RPCs used here, committed, so the build needs no `protoc`.

use std::future::Future;
use std::time::Duration;

use super::etcd::{self, Client, ConnectOptions};
use super::DistributedConfig;

/// Pause between two attempts to reach etcd again after an outage.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// Upper bound on revoking the lease when a worker deregisters: shutdown must not hang on etcd.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keep-alive pings, so a silently dead connection (partition) fails streams. etcd refuses
/// pings more often than every 5 s (`--grpc-keepalive-min-time`) and pings without an open stream.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(10);
const HTTP2_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// What can go wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No endpoint answered (refused, timed out, transport failure).
    #[error("cannot reach etcd at {endpoints}: {reason}")]
    Connect {
        /// The configured endpoints, comma-separated.
        endpoints: String,
        /// What failed.
        reason: String,
    },
    /// etcd answered a call with an error.
    #[error("etcd {op} failed: {reason}")]
    Etcd {
        /// The call (`lease grant`, `put`, `list`, ...).
        op: &'static str,
        /// etcd's error, with the key or lease involved.
        reason: String,
    },
    /// The instance record could not be encoded.
    #[error("cannot encode the instance record for {key}: {reason}")]
    Record {
        /// The key it was meant for.
        key: String,
        /// The serializer's error.
        reason: String,
    },
}

/// How to reach etcd: the endpoints and the bound on every call.
#[derive(Clone, Debug)]
struct EtcdAccess {
    endpoints: Vec<String>,
    /// `connect_timeout_secs`: bounds connecting and each call.
    timeout: Duration,
}

impl EtcdAccess {
    fn new(config: &DistributedConfig) -> EtcdAccess {
        let timeout = Duration::try_from_secs_f64(config.connect_timeout_secs)
            .ok()
            .filter(|t| !t.is_zero())
            .unwrap_or(Duration::from_secs(5));
        EtcdAccess {
            endpoints: config.etcd_endpoints.clone(),
            timeout,
        }
    }

    fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }

    fn unreachable(&self, reason: impl Into<String>) -> DiscoveryError {
        DiscoveryError::Connect {
            endpoints: self.endpoints_text(),
            reason: reason.into(),
        }
    }

    /// A fresh client, once at least one endpoint accepts TCP.
    async fn connect(&self) -> Result<Client, DiscoveryError> {
        if self.endpoints.is_empty() {
            return Err(self.unreachable("no etcd endpoints configured"));
        }
        self.probe().await?;
        let options = ConnectOptions {
            connect_timeout: self.timeout,
            keep_alive: Some((HTTP2_PING_INTERVAL, HTTP2_PING_TIMEOUT)),
            keep_alive_while_idle: false,
        };
        match tokio::time::timeout(self.timeout, Client::connect(&self.endpoints, &options)).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(self.unreachable(e.to_string())),
            Err(_) => Err(self.unreachable(format!(
                "no connection within {:.1} s",
                self.timeout.as_secs_f64()
            ))),
        }
    }

    /// Succeeds when one endpoint accepts TCP (or none has a `host:port` we can probe).
    async fn probe(&self) -> Result<(), DiscoveryError> {
        let mut failures = Vec::new();
        for endpoint in &self.endpoints {
            let Some(address) = socket_address(endpoint) else {
                return Ok(());
            };
            match tokio::time::timeout(self.timeout, tokio::net::TcpStream::connect(address)).await
            {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => failures.push(format!("{endpoint}: {e}")),
                Err(_) => failures.push(format!(
                    "{endpoint}: no TCP connection within {:.1} s",
                    self.timeout.as_secs_f64()
                )),
            }
        }
        Err(self.unreachable(failures.join("; ")))
    }

    /// Runs one etcd call bounded by the timeout; transport failures and silence are `Connect`.
    async fn call<T>(
        &self,
        op: &'static str,
        subject: &str,
        call: impl Future<Output = Result<T, etcd::Error>>,
    ) -> Result<T, DiscoveryError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_unreachable() => {
                Err(self.unreachable(format!("{op} {subject}: {e}")))
            }
            Ok(Err(e)) => Err(DiscoveryError::Etcd {
                op,
                reason: format!("{subject}: {e}"),
            }),
            Err(_) => Err(self.unreachable(format!(
                "{op} {subject}: no answer within {:.1} s",
                self.timeout.as_secs_f64()
            ))),
        }
    }
}

/// `host:port` of an endpoint URL (`http://127.0.0.1:2379` or `127.0.0.1:2379`), when it has a port.
fn socket_address(endpoint: &str) -> Option<&str> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    let authority = rest.split('/').next().unwrap_or(rest);
    let (_, port) = authority.rsplit_once(':')?;
    port.parse::<u16>().ok().map(|_| authority)
}

/// The keys and values under `prefix` (sorted by key), bounded by `connect_timeout_secs`.
pub async fn list_prefix(
    config: &DistributedConfig,
    prefix: &str,
) -> Result<Vec<(String, Vec<u8>)>, DiscoveryError> {
    let access = EtcdAccess::new(config);
    let listing = tokio::time::timeout(access.timeout, async {
        let mut client = access.connect().await?;
        access.call("list", prefix, client.get_prefix(prefix)).await
    })
    .await
    .map_err(|_| {
        access.unreachable(format!(
            "listing {prefix} took over {:.1} s",
            access.timeout.as_secs_f64()
        ))
    })??;
    let mut records: Vec<(String, Vec<u8>)> = listing
        .kvs
        .into_iter()
        .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value))
        .collect();
    records.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(records)
}

/// Builds the record a worker announces under a lease id.
mod registration;
mod watch;

pub use registration::Registration;
pub use watch::{watch_instances, DiscoveryEvent, WatchHandle};

#[cfg(test)]
mod tests;
