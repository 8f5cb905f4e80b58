//! A small etcd v3 client: the KV, Watch and Lease calls discovery makes, over tonic.
//!
//! The gRPC types in [`pb`] are generated from the subset of etcd's protos in `wire/proto/etcd/`
//! and committed, so building dynamix needs no `protoc`; `scripts/gen-etcd-proto` regenerates
//! them (it brings its own protoc). The wire is etcd's own: same packages, services, methods and
//! field numbers as any other etcd client.
//!
//! Only plain-text endpoints are supported (`http://host:port` or `host:port`); an `https://`
//! endpoint is a clear error rather than a silent downgrade.

use std::time::Duration;

use futures_util::stream::{self, Stream};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

/// Code generated from `wire/proto/etcd/` by `scripts/gen-etcd-proto`: do not edit by hand.
#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod pb {
    pub mod etcdserverpb;
    pub mod mvccpb;
}

use pb::etcdserverpb::kv_client::KvClient;
use pb::etcdserverpb::lease_client::LeaseClient;
use pb::etcdserverpb::watch_client::WatchClient;
use pb::etcdserverpb::{
    watch_request, DeleteRangeRequest, LeaseGrantRequest, LeaseGrantResponse,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
pub use pb::mvccpb::event::EventType;
pub use pb::mvccpb::{Event, KeyValue};

/// What went wrong in an etcd call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be made to any endpoint.
    #[error("{0}")]
    Connect(String),
    /// An endpoint string is not a usable `http://host:port`.
    #[error("invalid etcd endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// etcd (or the transport under the call) answered with a gRPC status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The keep-alive or watch stream's sending side is gone.
    #[error("the {0} stream is closed")]
    StreamClosed(&'static str),
}

impl Error {
    /// Whether the failure means "etcd could not be reached" (as opposed to etcd saying no).
    pub fn is_unreachable(&self) -> bool {
        match self {
            Error::Connect(_) | Error::StreamClosed(_) => true,
            Error::BadEndpoint { .. } => false,
            Error::Status(status) => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
        }
    }
}

/// How to connect: bounds and HTTP/2 keep-alive pings.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Bound on establishing the TCP + HTTP/2 connection to one endpoint.
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval and the time to wait for its answer; `None` sends no pings.
    pub keep_alive: Option<(Duration, Duration)>,
    /// Whether to ping while no call is open (etcd refuses that by default).
    pub keep_alive_while_idle: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            keep_alive: None,
            keep_alive_while_idle: false,
        }
    }
}

/// A connection to one etcd member (the first of the endpoints that accepted).
#[derive(Clone, Debug)]
pub struct Client {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
}

/// `http://` + `endpoint` unless it already has a scheme; `https://` is refused (no TLS here).
fn endpoint_uri(endpoint: &str) -> Result<String, Error> {
    let bad = |reason: &str| Error::BadEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = endpoint.trim();
    if trimmed.is_empty() {
        return Err(bad("empty"));
    }
    if trimmed.starts_with("https://") {
        return Err(bad(
            "TLS (https) etcd endpoints are not supported; use http://",
        ));
    }
    if trimmed.starts_with("http://") {
        return Ok(trimmed.to_string());
    }
    if trimmed.contains("://") {
        return Err(bad("the scheme must be http://"));
    }
    Ok(format!("http://{trimmed}"))
}

impl Client {
    /// Connects to the first endpoint that answers, in order.
    pub async fn connect<S: AsRef<str>>(
        endpoints: &[S],
        options: &ConnectOptions,
    ) -> Result<Client, Error> {
        if endpoints.is_empty() {
            return Err(Error::Connect("no etcd endpoints configured".into()));
        }
        let mut failures = Vec::new();
        for endpoint in endpoints {
            let endpoint = endpoint.as_ref();
            let uri = endpoint_uri(endpoint)?;
            let mut config = Endpoint::from_shared(uri.clone())
                .map_err(|e| Error::BadEndpoint {
                    endpoint: endpoint.to_string(),
                    reason: e.to_string(),
                })?
                .connect_timeout(options.connect_timeout)
                .tcp_nodelay(true);
            if let Some((interval, timeout)) = options.keep_alive {
                config = config
                    .http2_keep_alive_interval(interval)
                    .keep_alive_timeout(timeout)
                    .keep_alive_while_idle(options.keep_alive_while_idle);
            }
            match config.connect().await {
                Ok(channel) => return Ok(Client::from_channel(channel)),
                Err(e) => failures.push(format!("{endpoint}: {}", error_chain(&e))),
            }
        }
        Err(Error::Connect(failures.join("; ")))
    }

    fn from_channel(channel: Channel) -> Client {
        Client {
            kv: KvClient::new(channel.clone()),
            watch: WatchClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
        }
    }

    /// Every key that starts with `prefix`, with the revision of the read.
    pub async fn get_prefix(&mut self, prefix: impl Into<Vec<u8>>) -> Result<RangeResponse, Error> {
        let key = prefix.into();
        let range_end = prefix_end(&key);
        let request = RangeRequest {
            key,
            range_end,
            ..RangeRequest::default()
        };
        Ok(self.kv.range(request).await?.into_inner())
    }

    /// Puts `value` under `key`, attached to `lease` unless it is 0.
    pub async fn put(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: i64,
    ) -> Result<PutResponse, Error> {
        let request = PutRequest {
            key: key.into(),
            value: value.into(),
            lease,
            ..PutRequest::default()
        };
        Ok(self.kv.put(request).await?.into_inner())
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub async fn delete(&mut self, key: impl Into<Vec<u8>>) -> Result<i64, Error> {
        let request = DeleteRangeRequest {
            key: key.into(),
            ..DeleteRangeRequest::default()
        };
        Ok(self.kv.delete_range(request).await?.into_inner().deleted)
    }

    /// Grants a lease of `ttl_secs` (etcd picks the id).
    pub async fn lease_grant(&mut self, ttl_secs: i64) -> Result<LeaseGrantResponse, Error> {
        let request = LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        let granted = self.lease.lease_grant(request).await?.into_inner();
        if !granted.error.is_empty() {
            return Err(Error::Status(tonic::Status::unknown(granted.error)));
        }
        Ok(granted)
    }

    /// Revokes a lease, deleting every key attached to it.
    pub async fn lease_revoke(&mut self, id: i64) -> Result<(), Error> {
        self.lease
            .lease_revoke(LeaseRevokeRequest { id })
            .await
            .map(drop)
            .map_err(Error::from)
    }

    /// The lease's remaining TTL (`ttl <= 0` when it no longer exists).
    pub async fn lease_time_to_live(&mut self, id: i64) -> Result<LeaseTimeToLiveResponse, Error> {
        let request = LeaseTimeToLiveRequest { id, keys: false };
        Ok(self.lease.lease_time_to_live(request).await?.into_inner())
    }

    /// Opens the keep-alive stream of lease `id` and sends its first keep-alive. The answer to each
    /// [`LeaseKeeper::keep_alive`] arrives on the returned stream.
    pub async fn lease_keep_alive(
        &mut self,
        id: i64,
    ) -> Result<(LeaseKeeper, Streaming<LeaseKeepAliveResponse>), Error> {
        let (sender, requests) = request_stream();
        let keeper = LeaseKeeper { id, sender };
        keeper.keep_alive()?;
        let responses = self.lease.lease_keep_alive(requests).await?.into_inner();
        Ok((keeper, responses))
    }

    /// Watches every key under `prefix` from `start_revision` (0: from now on).
    pub async fn watch_prefix(
        &mut self,
        prefix: impl Into<Vec<u8>>,
        start_revision: i64,
    ) -> Result<WatchStream, Error> {
        let key = prefix.into();
        let range_end = prefix_end(&key);
        let (sender, requests) = request_stream();
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key,
                    range_end,
                    start_revision,
                    ..WatchCreateRequest::default()
                },
            )),
        };
        sender
            .send(create)
            .map_err(|_| Error::StreamClosed("watch"))?;
        let responses = self.watch.watch(requests).await?.into_inner();
        Ok(WatchStream {
            _sender: sender,
            responses,
        })
    }
}

/// Sends keep-alives on one lease's stream.
#[derive(Debug)]
pub struct LeaseKeeper {
    id: i64,
    sender: mpsc::UnboundedSender<LeaseKeepAliveRequest>,
}

impl LeaseKeeper {
    /// Queues one keep-alive; its answer arrives on the response stream.
    pub fn keep_alive(&self) -> Result<(), Error> {
        self.sender
            .send(LeaseKeepAliveRequest { id: self.id })
            .map_err(|_| Error::StreamClosed("lease keep-alive"))
    }
}

/// An open watch. The request side stays open while this lives: etcd ends a watch stream whose
/// client half-closes it.
pub struct WatchStream {
    _sender: mpsc::UnboundedSender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl WatchStream {
    /// The next batch of events, `None` when etcd closed the stream.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        self.responses.message().await.map_err(Error::from)
    }
}

/// A channel whose receiving side is a request stream for tonic.
fn request_stream<T: Send + 'static>() -> (
    mpsc::UnboundedSender<T>,
    impl Stream<Item = T> + Send + 'static,
) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let requests = stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    (sender, requests)
}

/// etcd's range end for "every key with this prefix": the prefix with its last byte below 0xff
/// incremented (and what follows dropped); `\0` (every key) when the prefix is all 0xff or empty.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An error and its sources, `: `-joined (tonic's transport errors hide the cause in `source()`).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"v1/instances/"), b"v1/instances0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_get_a_scheme_and_tls_is_refused_by_name() {
        assert_eq!(
            endpoint_uri("127.0.0.1:2379").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            endpoint_uri("http://etcd:2379").unwrap(),
            "http://etcd:2379"
        );
        let tls = endpoint_uri("https://etcd:2379").unwrap_err().to_string();
        assert!(
            tls.contains("https://etcd:2379") && tls.contains("TLS"),
            "{tls}"
        );
        assert!(endpoint_uri(" ").is_err());
        assert!(endpoint_uri("unix:///tmp/etcd").is_err());
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error_naming_the_endpoint() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("127.0.0.1:{port}");
        let options = ConnectOptions {
            connect_timeout: Duration::from_secs(2),
            ..ConnectOptions::default()
        };
        let error = Client::connect(std::slice::from_ref(&endpoint), &options)
            .await
            .unwrap_err();
        assert!(error.is_unreachable(), "{error:?}");
        assert!(error.to_string().contains(&endpoint), "{error}");
    }
}
