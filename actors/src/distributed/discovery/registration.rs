//! The worker's side: a lease-bound registration in etcd and the task that keeps it alive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{DiscoveryError, EtcdAccess, DEREGISTER_TIMEOUT, RETRY_INTERVAL};
use crate::distributed::etcd::Client;
use crate::distributed::{DistributedConfig, Instance};

type RecordFn = Arc<dyn Fn(u64) -> Instance + Send + Sync>;
/// More keys to put under the same lease (model card, event channels), for an instance id.
type ExtrasFn = Arc<dyn Fn(u64) -> Vec<(String, Vec<u8>)> + Send + Sync>;

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
        Self::start_with(config, record, |_| Vec::new()).await
    }

    /// [`Self::start`], also putting `extras(lease_id)` (key, value) pairs under the same lease,
    /// after the instance record: they vanish with it.
    pub async fn start_with(
        config: &DistributedConfig,
        record: impl Fn(u64) -> Instance + Send + Sync + 'static,
        extras: impl Fn(u64) -> Vec<(String, Vec<u8>)> + Send + Sync + 'static,
    ) -> Result<Registration, DiscoveryError> {
        let access = EtcdAccess::new(config);
        let record: RecordFn = Arc::new(record);
        let extras: ExtrasFn = Arc::new(extras);
        let ttl = i64::try_from(config.lease_ttl_secs.max(1)).unwrap_or(i64::MAX);
        let started = tokio::time::timeout(access.timeout, async {
            let mut client = access.connect().await?;
            let lease = register(&access, &mut client, config, ttl, &record, &extras).await?;
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
            extras,
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
    extras: &ExtrasFn,
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
    let mut put = access
        .call("put", &key, client.put(key.clone(), value, lease.id))
        .await
        .map(|_| ());
    if put.is_ok() {
        for (extra_key, extra_value) in extras(instance_id) {
            put = access
                .call(
                    "put",
                    &extra_key,
                    client.put(extra_key.clone(), extra_value, lease.id),
                )
                .await
                .map(|_| ());
            if put.is_err() {
                break;
            }
        }
    }
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
    extras: ExtrasFn,
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
            &self.extras,
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
