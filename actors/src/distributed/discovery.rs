//! etcd discovery (runtime spec §5.3).
//!
//! Protocol: a worker grants itself a lease of `lease_ttl_secs` and puts its JSON [`Instance`] under
//! `config.instance_key(lease_id)` (`v1/instances/{ns}/{comp}/{ep}/{lease_id:x}`) attached to that
//! lease; its instance id *is* the lease id. A keep-alive task renews the lease every ttl/3. When the
//! worker stops renewing (killed, partitioned) etcd expires the lease and deletes the key; a graceful
//! exit revokes the lease, which deletes it at once. Either deletion is the "worker gone" signal.
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

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::etcd::{self, Client, ConnectOptions, EventType};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{DistributedConfig, Instance};

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

/// Builds the record a worker announces under a lease id.
type RecordFn = Arc<dyn Fn(u64) -> Instance + Send + Sync>;

/// A worker's presence in discovery: its lease, its key, and the task that keeps both alive.
///
/// Dropping it stops the keep-alive without revoking, as a crash would: the key disappears when the
/// lease expires. [`Registration::deregister`] is the graceful exit.
pub struct Registration {
    /// The current instance id (the lease id); changes only when the lease had to be re-granted.
    instance_id: watch::Receiver<u64>,
    /// Whether the last keep-alive round trip succeeded.
    connected: Arc<AtomicBool>,
    /// The keep-alive task's latest client, so deregistering can revoke without reconnecting.
    client: Arc<Mutex<Option<Client>>>,
    access: EtcdAccess,
    task: JoinHandle<()>,
}

impl Registration {
    /// Connects to etcd, grants a lease of `lease_ttl_secs`, puts `record(lease_id)` (its
    /// `instance_id` forced to the lease id) under `config.instance_key(lease_id)` and starts the
    /// keep-alive task. The whole start is bounded by `connect_timeout_secs`.
    pub async fn start(
        config: &DistributedConfig,
        record: impl Fn(u64) -> Instance + Send + Sync + 'static,
    ) -> Result<Registration, DiscoveryError> {
        let access = EtcdAccess::new(config);
        let record: RecordFn = Arc::new(record);
        let ttl = i64::try_from(config.lease_ttl_secs.max(1)).unwrap_or(i64::MAX);
        let started = tokio::time::timeout(access.timeout, async {
            let mut client = access.connect().await?;
            let lease = register(&access, &mut client, config, ttl, &record).await?;
            Ok::<_, DiscoveryError>((client, lease))
        })
        .await;
        let (client, lease) = match started {
            Ok(result) => result?,
            Err(_) => {
                return Err(access.unreachable(format!(
                    "registration did not complete within {:.1} s",
                    access.timeout.as_secs_f64()
                )))
            }
        };
        tracing::info!(
            instance_id = format_args!("{:x}", lease.id),
            key = %config.instance_key(lease.id as u64),
            ttl_secs = lease.ttl,
            "registered in etcd"
        );
        let (id_sender, instance_id) = watch::channel(lease.id as u64);
        let connected = Arc::new(AtomicBool::new(true));
        let shared_client = Arc::new(Mutex::new(Some(client.clone())));
        let keeper = KeepAlive {
            access: access.clone(),
            config: config.clone(),
            ttl,
            period: renewal_period(lease.ttl),
            record,
            lease_id: lease.id,
            client: Some(client),
            shared_client: shared_client.clone(),
            id_sender,
            connected: connected.clone(),
            in_outage: false,
        };
        let task = tokio::spawn(keeper.run());
        Ok(Registration {
            instance_id,
            connected,
            client: shared_client,
            access,
            task,
        })
    }

    /// The current instance id (lease id).
    pub fn instance_id(&self) -> u64 {
        *self.instance_id.borrow()
    }

    /// Follows the instance id: it changes when an expired lease had to be replaced.
    pub fn watch_id(&self) -> watch::Receiver<u64> {
        self.instance_id.clone()
    }

    /// Whether the last keep-alive round trip with etcd succeeded.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Leaves discovery: stops the keep-alive and revokes the lease (deleting the key), within 2 s.
    /// Failures are logged; the lease then expires on its own.
    pub async fn deregister(self) {
        self.task.abort();
        let lease_id = *self.instance_id.borrow() as i64;
        let client = self.client.lock().ok().and_then(|guard| guard.clone());
        let access = self.access.clone();
        let revoked = tokio::time::timeout(DEREGISTER_TIMEOUT, async move {
            let mut client = match client {
                Some(client) => client,
                None => access.connect().await?,
            };
            access
                .call(
                    "lease revoke",
                    &format!("lease {lease_id:x}"),
                    client.lease_revoke(lease_id),
                )
                .await
        })
        .await;
        match revoked {
            Ok(Ok(_)) => tracing::info!(
                instance_id = format_args!("{lease_id:x}"),
                "deregistered from etcd"
            ),
            Ok(Err(e)) => tracing::warn!(
                instance_id = format_args!("{lease_id:x}"),
                "deregistering failed; the lease will expire on its own: {e}"
            ),
            Err(_) => tracing::warn!(
                instance_id = format_args!("{lease_id:x}"),
                "deregistering took over {} s; the lease will expire on its own",
                DEREGISTER_TIMEOUT.as_secs()
            ),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A granted lease.
struct Lease {
    id: i64,
    /// The TTL etcd chose, in seconds.
    ttl: i64,
}

/// Renew three times per TTL, so one lost round trip does not lose the lease.
fn renewal_period(ttl_secs: i64) -> Duration {
    let ttl_ms = u64::try_from(ttl_secs.max(1))
        .unwrap_or(1)
        .saturating_mul(1000);
    Duration::from_millis((ttl_ms / 3).max(100))
}

/// Grants a lease and puts the record under it; revokes the lease if the put fails.
async fn register(
    access: &EtcdAccess,
    client: &mut Client,
    config: &DistributedConfig,
    ttl: i64,
    record: &RecordFn,
) -> Result<Lease, DiscoveryError> {
    let granted = access
        .call(
            "lease grant",
            &format!("ttl {ttl} s"),
            client.lease_grant(ttl),
        )
        .await?;
    let lease = Lease {
        id: granted.id,
        ttl: granted.ttl,
    };
    let instance_id = lease.id as u64;
    let key = config.instance_key(instance_id);
    let mut instance = record(instance_id);
    instance.instance_id = instance_id;
    let value = serde_json::to_vec(&instance).map_err(|e| DiscoveryError::Record {
        key: key.clone(),
        reason: e.to_string(),
    })?;
    let put = access
        .call("put", &key, client.put(key.clone(), value, lease.id))
        .await;
    if let Err(e) = put {
        // Best effort: an orphan lease holds no key and expires on its own anyway.
        let _ = tokio::time::timeout(access.timeout, client.lease_revoke(lease.id)).await;
        return Err(e);
    }
    Ok(lease)
}

/// Why renewing stopped.
enum RenewalStop {
    /// etcd answered that the lease no longer exists (it expired during an outage).
    LeaseGone,
    /// etcd could not be reached, or the stream broke.
    Unreachable(String),
}

/// The keep-alive task's state.
struct KeepAlive {
    access: EtcdAccess,
    config: DistributedConfig,
    /// The TTL to ask for when a lease must be re-granted.
    ttl: i64,
    period: Duration,
    record: RecordFn,
    lease_id: i64,
    /// `None` after a failure: the next attempt connects a fresh client.
    client: Option<Client>,
    shared_client: Arc<Mutex<Option<Client>>>,
    id_sender: watch::Sender<u64>,
    connected: Arc<AtomicBool>,
    /// Set while etcd is unreachable, so the outage is logged once.
    in_outage: bool,
}

impl KeepAlive {
    async fn run(mut self) {
        loop {
            let stop = self.renew_until_failure().await;
            self.connected.store(false, Ordering::Relaxed);
            match stop {
                RenewalStop::LeaseGone => match self.register_again().await {
                    Ok(()) => continue,
                    Err(e) => self.note_outage(&e.to_string()),
                },
                RenewalStop::Unreachable(reason) => self.note_outage(&reason),
            }
            self.client = None;
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    fn note_outage(&mut self, reason: &str) {
        if !self.in_outage {
            self.in_outage = true;
            tracing::warn!(
                instance_id = format_args!("{:x}", self.lease_id),
                "etcd keep-alive failing, retrying every {} ms: {reason}",
                RETRY_INTERVAL.as_millis()
            );
        }
    }

    fn set_client(&mut self, client: Client) -> &mut Client {
        if let Ok(mut shared) = self.shared_client.lock() {
            *shared = Some(client.clone());
        }
        self.client.insert(client)
    }

    /// Renews the lease every period until something fails.
    async fn renew_until_failure(&mut self) -> RenewalStop {
        let lease_id = self.lease_id;
        let access = self.access.clone();
        let client = match self.client.take() {
            Some(client) => self.set_client(client),
            None => match access.connect().await {
                Ok(client) => self.set_client(client),
                Err(e) => return RenewalStop::Unreachable(e.to_string()),
            },
        };
        let subject = format!("lease {lease_id:x}");
        // Opening the stream sends the first keep-alive and reads its answer; "lease not found"
        // comes back as an error, so ask etcd whether the lease still exists to tell it apart.
        let opened = access
            .call(
                "lease keep-alive",
                &subject,
                client.lease_keep_alive(lease_id),
            )
            .await;
        let (keeper, mut stream) = match opened {
            Ok(pair) => pair,
            Err(e) => {
                return match access
                    .call(
                        "lease time-to-live",
                        &subject,
                        client.lease_time_to_live(lease_id),
                    )
                    .await
                {
                    Ok(answer) if answer.ttl <= 0 => RenewalStop::LeaseGone,
                    Ok(_) => RenewalStop::Unreachable(e.to_string()),
                    Err(e) => RenewalStop::Unreachable(e.to_string()),
                }
            }
        };
        self.connected.store(true, Ordering::Relaxed);
        if self.in_outage {
            self.in_outage = false;
            tracing::info!(
                instance_id = format_args!("{lease_id:x}"),
                "etcd reachable again; lease kept"
            );
        }
        loop {
            tokio::time::sleep(self.period).await;
            if let Err(e) = keeper.keep_alive() {
                return RenewalStop::Unreachable(format!("keep-alive of {subject}: {e}"));
            }
            match tokio::time::timeout(self.access.timeout, stream.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl > 0 => {
                    self.connected.store(true, Ordering::Relaxed);
                }
                Ok(Ok(Some(_))) => return RenewalStop::LeaseGone,
                Ok(Ok(None)) => {
                    return RenewalStop::Unreachable(format!(
                        "etcd closed the keep-alive stream of {subject}"
                    ))
                }
                Ok(Err(e)) => {
                    return RenewalStop::Unreachable(format!("keep-alive of {subject}: {e}"))
                }
                Err(_) => {
                    return RenewalStop::Unreachable(format!(
                        "no keep-alive answer for {subject} within {:.1} s",
                        self.access.timeout.as_secs_f64()
                    ))
                }
            }
        }
    }

    /// The old lease expired: register under a new one and publish the new instance id.
    async fn register_again(&mut self) -> Result<(), DiscoveryError> {
        let mut client = match self.client.take() {
            Some(client) => client,
            None => self.access.connect().await?,
        };
        let lease = register(
            &self.access,
            &mut client,
            &self.config,
            self.ttl,
            &self.record,
        )
        .await;
        self.set_client(client);
        let lease = lease?;
        tracing::warn!(
            old_instance_id = format_args!("{:x}", self.lease_id),
            instance_id = format_args!("{:x}", lease.id),
            key = %self.config.instance_key(lease.id as u64),
            "etcd lease expired during an outage; registered again under a new lease"
        );
        self.lease_id = lease.id;
        self.period = renewal_period(lease.ttl);
        self.id_sender.send_replace(lease.id as u64);
        Ok(())
    }
}

/// A change in the set of instances, as the frontend sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum DiscoveryEvent {
    /// An instance appeared or its record changed (consumers must be idempotent: a re-put of the
    /// same id emits `Added` again).
    Added(Instance),
    /// The instance with this id left (deregistered, or its lease expired).
    Removed(u64),
    /// The watch on etcd broke (the reason); the known set is stale until `Restored`.
    Lost(String),
    /// etcd is reachable again; the `Added`/`Removed` diff against the known set follows.
    Restored,
}

/// Keeps the frontend's watch task alive; dropping it stops the task.
pub struct WatchHandle {
    task: JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lists the instances under `config.instance_prefix()` (an `Added` each) and then follows the
/// prefix. Fails with [`DiscoveryError::Connect`] when etcd does not answer within
/// `connect_timeout_secs`; after that, outages are reported in the stream (`Lost`, `Restored`).
/// The task ends when the receiver is dropped or the handle is.
pub async fn watch_instances(
    config: &DistributedConfig,
) -> Result<(mpsc::UnboundedReceiver<DiscoveryEvent>, WatchHandle), DiscoveryError> {
    let access = EtcdAccess::new(config);
    let (sink, events) = mpsc::unbounded_channel();
    let mut watcher = Watcher {
        access: access.clone(),
        prefix: config.instance_prefix(),
        sink,
        known: HashMap::new(),
    };
    let listed = tokio::time::timeout(access.timeout, async {
        let mut client = access.connect().await?;
        let listing = watcher.list(&mut client).await?;
        Ok::<_, DiscoveryError>((client, listing))
    })
    .await;
    let (client, (instances, revision)) = match listed {
        Ok(result) => result?,
        Err(_) => {
            return Err(access.unreachable(format!(
                "listing {} took over {:.1} s",
                config.instance_prefix(),
                access.timeout.as_secs_f64()
            )))
        }
    };
    watcher.apply_listing(instances);
    let task = tokio::spawn(watcher.run(client, revision));
    Ok((events, WatchHandle { task }))
}

/// Why following the prefix stopped.
enum WatchStop {
    /// Nobody listens any more.
    SinkClosed,
    /// etcd went away (the reason).
    Lost(String),
    /// The start revision was compacted away: re-list (no outage to report).
    Compacted,
}

/// The frontend's watch task state.
struct Watcher {
    access: EtcdAccess,
    prefix: String,
    sink: mpsc::UnboundedSender<DiscoveryEvent>,
    /// What consumers have been told is alive, to diff against after an outage.
    known: HashMap<u64, Instance>,
}

impl Watcher {
    async fn run(mut self, mut client: Client, mut revision: i64) {
        loop {
            let mut lost = match self.follow(&mut client, revision).await {
                WatchStop::SinkClosed => return,
                WatchStop::Compacted => false,
                WatchStop::Lost(reason) => {
                    if !self.report_lost(reason) {
                        return;
                    }
                    true
                }
            };
            loop {
                if lost {
                    tokio::time::sleep(RETRY_INTERVAL).await;
                }
                if self.sink.is_closed() {
                    return;
                }
                let relisted = async {
                    let mut client = self.access.connect().await?;
                    let listing = self.list(&mut client).await?;
                    Ok::<_, DiscoveryError>((client, listing))
                }
                .await;
                match relisted {
                    Ok((fresh, (instances, listed_at))) => {
                        client = fresh;
                        revision = listed_at;
                        if lost {
                            tracing::info!(prefix = %self.prefix, "etcd watch restored");
                            if self.sink.send(DiscoveryEvent::Restored).is_err() {
                                return;
                            }
                        }
                        self.apply_listing(instances);
                        break;
                    }
                    Err(e) if lost => {
                        tracing::debug!(prefix = %self.prefix, "etcd still unreachable: {e}");
                    }
                    Err(e) => {
                        // The re-list after a compaction failed: an outage after all.
                        if !self.report_lost(e.to_string()) {
                            return;
                        }
                        lost = true;
                    }
                }
            }
        }
    }

    /// Logs and emits `Lost`; false when nobody listens any more.
    fn report_lost(&self, reason: String) -> bool {
        tracing::warn!(
            prefix = %self.prefix,
            "lost the etcd watch, retrying every {} ms: {reason}",
            RETRY_INTERVAL.as_millis()
        );
        self.sink.send(DiscoveryEvent::Lost(reason)).is_ok()
    }

    /// The valid records under the prefix and the revision of the listing.
    async fn list(
        &self,
        client: &mut Client,
    ) -> Result<(HashMap<u64, Instance>, i64), DiscoveryError> {
        let listing = self
            .access
            .call(
                "list",
                &self.prefix,
                client.get_prefix(self.prefix.as_str()),
            )
            .await?;
        let revision = listing.header.as_ref().map_or(0, |h| h.revision);
        let mut instances = HashMap::new();
        for kv in &listing.kvs {
            match parse_record(&self.prefix, &kv.key, &kv.value) {
                Ok(instance) => {
                    instances.insert(instance.instance_id, instance);
                }
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&kv.key), "skipping discovery record: {e}")
                }
            }
        }
        Ok((instances, revision))
    }

    /// Tells consumers the difference between what they know and a fresh listing.
    fn apply_listing(&mut self, instances: HashMap<u64, Instance>) {
        let mut gone: Vec<u64> = self
            .known
            .keys()
            .filter(|id| !instances.contains_key(id))
            .copied()
            .collect();
        gone.sort_unstable();
        for id in gone {
            let _ = self.sink.send(DiscoveryEvent::Removed(id));
        }
        let mut fresh: Vec<&Instance> = instances
            .values()
            .filter(|instance| self.known.get(&instance.instance_id) != Some(*instance))
            .collect();
        fresh.sort_unstable_by_key(|instance| instance.instance_id);
        for instance in fresh {
            let _ = self.sink.send(DiscoveryEvent::Added(instance.clone()));
        }
        self.known = instances;
    }

    /// Watches the prefix from `revision + 1` until the watch breaks or nobody listens.
    async fn follow(&mut self, client: &mut Client, revision: i64) -> WatchStop {
        let opened = self
            .access
            .call(
                "watch",
                &self.prefix,
                client.watch_prefix(self.prefix.as_str(), revision.saturating_add(1)),
            )
            .await;
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(e) => return WatchStop::Lost(e.to_string()),
        };
        loop {
            let message = tokio::select! {
                _ = self.sink.closed() => return WatchStop::SinkClosed,
                message = stream.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => {
                    return WatchStop::Lost(format!("etcd closed the watch on {}", self.prefix))
                }
                Err(e) => return WatchStop::Lost(format!("watch on {}: {e}", self.prefix)),
            };
            if response.canceled {
                if response.compact_revision > 0 {
                    tracing::info!(
                        prefix = %self.prefix,
                        compact_revision = response.compact_revision,
                        "etcd compacted past the watch revision; re-listing"
                    );
                    return WatchStop::Compacted;
                }
                return WatchStop::Lost(format!(
                    "etcd cancelled the watch on {}: {}",
                    self.prefix, response.cancel_reason
                ));
            }
            // The first message is the `created` confirmation, with no events.
            for event in &response.events {
                let Some(kv) = event.kv.as_ref() else {
                    continue;
                };
                let key = String::from_utf8_lossy(&kv.key);
                let id = instance_id_of_key(&self.prefix, &kv.key);
                // An event type this client does not know (a newer etcd) is neither put nor delete.
                let Ok(event_type) = EventType::try_from(event.r#type) else {
                    tracing::warn!(key = %key, event_type = event.r#type, "ignoring unknown etcd event type");
                    continue;
                };
                let update = match event_type {
                    EventType::Put => match parse_record(&self.prefix, &kv.key, &kv.value) {
                        Ok(instance) => {
                            self.known.insert(instance.instance_id, instance.clone());
                            Some(DiscoveryEvent::Added(instance))
                        }
                        Err(e) => {
                            tracing::warn!(key = %key, "skipping discovery record: {e}");
                            // A record that turned bad no longer describes a routable instance.
                            id.ok()
                                .and_then(|id| self.known.remove(&id).map(|_| id))
                                .map(DiscoveryEvent::Removed)
                        }
                    },
                    EventType::Delete => match id {
                        Ok(id) => {
                            self.known.remove(&id);
                            Some(DiscoveryEvent::Removed(id))
                        }
                        Err(e) => {
                            tracing::warn!(key = %key, "ignoring deleted discovery key: {e}");
                            None
                        }
                    },
                };
                if let Some(update) = update {
                    if self.sink.send(update).is_err() {
                        return WatchStop::SinkClosed;
                    }
                }
            }
        }
    }
}

/// The instance id in a key: the hex suffix after the prefix.
fn instance_id_of_key(prefix: &str, key: &[u8]) -> Result<u64, String> {
    let key = std::str::from_utf8(key).map_err(|e| format!("key is not UTF-8: {e}"))?;
    let suffix = key
        .strip_prefix(prefix)
        .ok_or_else(|| format!("key is not under {prefix}"))?;
    u64::from_str_radix(suffix, 16)
        .map_err(|e| format!("key suffix {suffix:?} is not a hex instance id: {e}"))
}

/// A record under the prefix: its JSON must be an [`Instance`] whose id matches the key.
fn parse_record(prefix: &str, key: &[u8], value: &[u8]) -> Result<Instance, String> {
    let id = instance_id_of_key(prefix, key)?;
    let instance: Instance = serde_json::from_slice(value)
        .map_err(|e| format!("value is not an instance record: {e}"))?;
    if instance.instance_id != id {
        return Err(format!(
            "record says instance_id {:x} but the key says {id:x}",
            instance.instance_id
        ));
    }
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::infra::EtcdServer;
    use crate::distributed::Transport;
    use std::collections::HashSet;
    use std::time::Instant;

    fn config(etcd: &EtcdServer, ttl: u64) -> DistributedConfig {
        DistributedConfig {
            etcd_endpoints: vec![etcd.url()],
            lease_ttl_secs: ttl,
            connect_timeout_secs: 2.0,
            ..DistributedConfig::default()
        }
    }

    fn record(port: u16) -> impl Fn(u64) -> Instance + Send + Sync + 'static {
        move |id| Instance {
            component: "backend".into(),
            endpoint: "generate".into(),
            namespace: "dynamo".into(),
            instance_id: id,
            transport: Transport::Tcp(format!("tcp://127.0.0.1:{port}")),
            engine: Some("mocker".into()),
            kv_block_size: Some(16),
            capacity: Some(8),
        }
    }

    async fn next_event(
        events: &mut mpsc::UnboundedReceiver<DiscoveryEvent>,
        within: Duration,
    ) -> DiscoveryEvent {
        tokio::time::timeout(within, events.recv())
            .await
            .expect("no discovery event in time")
            .expect("the watcher ended")
    }

    #[tokio::test]
    async fn register_then_deregister() {
        let etcd = EtcdServer::start().unwrap();
        let config = config(&etcd, 5);
        let (mut events, _handle) = watch_instances(&config).await.unwrap();
        let registration = Registration::start(&config, record(4000)).await.unwrap();
        let id = registration.instance_id();
        assert!(registration.connected());
        match next_event(&mut events, Duration::from_secs(5)).await {
            DiscoveryEvent::Added(instance) => assert_eq!(instance, record(4000)(id)),
            other => panic!("expected Added, got {other:?}"),
        }
        registration.deregister().await;
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            DiscoveryEvent::Removed(id)
        );
    }

    #[tokio::test]
    async fn listing_reports_existing_instances() {
        let etcd = EtcdServer::start().unwrap();
        let config = config(&etcd, 5);
        let registration = Registration::start(&config, record(4001)).await.unwrap();
        let (mut events, _handle) = watch_instances(&config).await.unwrap();
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            DiscoveryEvent::Added(record(4001)(registration.instance_id()))
        );
    }

    #[tokio::test]
    async fn dead_worker_expires() {
        let etcd = EtcdServer::start().unwrap();
        let config = config(&etcd, 2);
        let (mut events, _handle) = watch_instances(&config).await.unwrap();
        let registration = Registration::start(&config, record(4002)).await.unwrap();
        let id = registration.instance_id();
        assert!(matches!(
            next_event(&mut events, Duration::from_secs(5)).await,
            DiscoveryEvent::Added(_)
        ));
        // Keep renewing for a while first: the lease must survive renewals past its TTL.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            events.try_recv().is_err(),
            "a renewed lease must not expire"
        );
        let died = Instant::now();
        drop(registration);
        assert_eq!(
            next_event(&mut events, Duration::from_secs(6)).await,
            DiscoveryEvent::Removed(id)
        );
        assert!(died.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn malformed_records_are_skipped() {
        let etcd = EtcdServer::start().unwrap();
        let config = config(&etcd, 5);
        let (mut events, _handle) = watch_instances(&config).await.unwrap();
        let mut client = Client::connect(&[etcd.url()], &ConnectOptions::default())
            .await
            .unwrap();
        client
            .put(format!("{}abc", config.instance_prefix()), "not json", 0)
            .await
            .unwrap();
        client
            .put(format!("{}xyz", config.instance_prefix()), "{}", 0)
            .await
            .unwrap();
        // A well-formed record whose id disagrees with its key.
        let liar = serde_json::to_vec(&record(1)(0x99)).unwrap();
        client
            .put(config.instance_key(0x98), liar, 0)
            .await
            .unwrap();
        let registration = Registration::start(&config, record(4003)).await.unwrap();
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            DiscoveryEvent::Added(record(4003)(registration.instance_id()))
        );
        // The listing of a fresh watcher skips them too.
        let (mut relisted, _handle2) = watch_instances(&config).await.unwrap();
        assert_eq!(
            next_event(&mut relisted, Duration::from_secs(5)).await,
            DiscoveryEvent::Added(record(4003)(registration.instance_id()))
        );
        assert!(relisted.try_recv().is_err());
    }

    #[tokio::test]
    async fn unreachable_etcd_is_named() {
        let port = crate::distributed::infra::free_port();
        let config = DistributedConfig {
            etcd_endpoints: vec![format!("http://127.0.0.1:{port}")],
            connect_timeout_secs: 1.0,
            ..DistributedConfig::default()
        };
        let error = watch_instances(&config).await.err().expect("must fail");
        assert!(matches!(error, DiscoveryError::Connect { .. }));
        assert!(
            error.to_string().contains(&format!("127.0.0.1:{port}")),
            "{error}"
        );
        let error = Registration::start(&config, record(1))
            .await
            .err()
            .expect("must fail");
        assert!(
            error.to_string().contains(&format!("127.0.0.1:{port}")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn lost_lease_is_granted_again() {
        let etcd = EtcdServer::start().unwrap();
        let config = config(&etcd, 3);
        let (mut events, _handle) = watch_instances(&config).await.unwrap();
        let registration = Registration::start(&config, record(4005)).await.unwrap();
        let first = registration.instance_id();
        let mut ids = registration.watch_id();
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            DiscoveryEvent::Added(record(4005)(first))
        );
        // What etcd does to a lease that was not renewed in time.
        let mut client = Client::connect(&[etcd.url()], &ConnectOptions::default())
            .await
            .unwrap();
        client.lease_revoke(first as i64).await.unwrap();
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            DiscoveryEvent::Removed(first)
        );
        tokio::time::timeout(Duration::from_secs(5), ids.changed())
            .await
            .unwrap()
            .unwrap();
        let second = registration.instance_id();
        assert_ne!(second, first);
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            DiscoveryEvent::Added(record(4005)(second))
        );
        registration.deregister().await;
        assert_eq!(
            next_event(&mut events, Duration::from_secs(5)).await,
            DiscoveryEvent::Removed(second)
        );
    }

    /// Applies events to a set until `done` holds for it.
    async fn wait_for_set(
        events: &mut mpsc::UnboundedReceiver<DiscoveryEvent>,
        live: &mut HashSet<u64>,
        within: Duration,
        done: impl Fn(&HashSet<u64>) -> bool,
    ) {
        let deadline = Instant::now() + within;
        while !done(live) {
            let left = deadline.saturating_duration_since(Instant::now());
            match next_event(events, left).await {
                DiscoveryEvent::Added(instance) => {
                    live.insert(instance.instance_id);
                }
                DiscoveryEvent::Removed(id) => {
                    live.remove(&id);
                }
                DiscoveryEvent::Lost(_) | DiscoveryEvent::Restored => {}
            }
        }
    }

    #[tokio::test]
    async fn etcd_outage_is_reported_and_recovered() {
        let mut etcd = EtcdServer::start().unwrap();
        let config = config(&etcd, 3);
        let (mut events, _handle) = watch_instances(&config).await.unwrap();
        let registration = Registration::start(&config, record(4004)).await.unwrap();
        let mut live = HashSet::new();
        wait_for_set(&mut events, &mut live, Duration::from_secs(5), |live| {
            live.contains(&registration.instance_id())
        })
        .await;

        etcd.stop();
        match next_event(&mut events, Duration::from_secs(5)).await {
            DiscoveryEvent::Lost(reason) => assert!(!reason.is_empty()),
            other => panic!("expected Lost, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!registration.connected());

        etcd.restart().unwrap();
        assert_eq!(
            next_event(&mut events, Duration::from_secs(10)).await,
            DiscoveryEvent::Restored
        );
        let ids = registration.watch_id();
        wait_for_set(&mut events, &mut live, Duration::from_secs(10), |live| {
            live.len() == 1 && live.contains(&*ids.borrow())
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !registration.connected() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(registration.connected());
    }
}
