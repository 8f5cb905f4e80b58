//! The event plane over NATS core pub/sub (interop spec §7): workers publish their engines' KV
//! events (batches, topic `kv-events`), their KV usage (`kv_metrics`) and dynamix's load
//! (`load_metrics`), each in Dynamo's msgpack envelope on
//! `namespace.{ns}.component.{comp}.endpoint.{ep}.{topic}`; every frontend subscribes. The same
//! subscribers read Dynamo workers' events (run with `--event-plane nats`). Core NATS keeps nothing: what
//! is published while a subscriber (or the publisher) is disconnected is lost, so the KV router's
//! view of a worker can lag until that worker's next events, as with Dynamo's non-durable mode.
//!
//! A client fails clearly when NATS is unreachable at start; once connected, async-nats reconnects
//! on its own, forever, and re-subscribes its subscriptions. Publishers drop what they cannot send
//! during an outage (one warning per outage) rather than queue without bound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, Subject};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::wire::events::{ActiveLoad, EventEnvelope};
use super::LoadMetrics;
use crate::kv::protocol::RouterEvent;

/// Most KV events sent in one batch.
const MAX_BATCH: usize = 256;

/// Bound on handing one message to the client: its outgoing queue is full only when the connection
/// is stuck, and a publisher must not stall behind it.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the final flush of a publisher that ends.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between two reconnection attempts (async-nats' default grows to 4 s).
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// What can go wrong with NATS.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The first connection failed (refused, timed out, bad URL).
    #[error("cannot reach NATS at {url}: {reason}")]
    Connect {
        /// The server URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// Subscribing failed.
    #[error("cannot subscribe to NATS subject {subject}: {reason}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// The client's error.
        reason: String,
    },
}

/// Connects to NATS as `name`, failing if the server does not answer within `timeout` (no retry
/// at start). After that the client reconnects forever (`max_reconnects` unlimited, backoff capped
/// at 1 s), logging each disconnection and reconnection.
pub async fn connect(url: &str, name: &str, timeout: Duration) -> Result<Client, EventsError> {
    let connect_error = |reason: String| EventsError::Connect {
        url: url.to_string(),
        reason,
    };
    let logged_url = url.to_string();
    let was_disconnected = Arc::new(AtomicBool::new(false));
    let options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(timeout)
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let url = logged_url.clone();
            let was_disconnected = was_disconnected.clone();
            async move { log_connection_event(&url, &was_disconnected, event) }
        });
    // connection_timeout bounds each TCP attempt only; bound the handshake as well.
    match tokio::time::timeout(timeout, options.connect(url)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(connect_error(e.to_string())),
        Err(_) => Err(connect_error(format!(
            "no connection within {:.1} s",
            timeout.as_secs_f64()
        ))),
    }
}

/// Exponential from 0 to [`MAX_RECONNECT_DELAY`]: a restarted server is found within a second.
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(attempts - 1).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(10u64 << exponent).min(MAX_RECONNECT_DELAY)
}

fn log_connection_event(url: &str, was_disconnected: &AtomicBool, event: async_nats::Event) {
    match event {
        async_nats::Event::Disconnected => {
            was_disconnected.store(true, Ordering::Relaxed);
            tracing::warn!(url, "NATS connection lost; reconnecting");
        }
        async_nats::Event::Connected => {
            if was_disconnected.swap(false, Ordering::Relaxed) {
                tracing::info!(url, "NATS connection restored");
            }
        }
        // Every failed reconnection attempt reports one; the outage is already logged.
        async_nats::Event::ClientError(e) => tracing::debug!(url, "NATS client: {e}"),
        other => tracing::warn!(url, "NATS: {other}"),
    }
}

/// The client's connection state: `connected`, `disconnected` or `pending`.
pub fn nats_state(client: &Client) -> &'static str {
    match client.connection_state() {
        State::Connected => "connected",
        State::Disconnected => "disconnected",
        State::Pending => "pending",
    }
}

/// Publishes enveloped messages on one subject, dropping them while NATS is away (warned once per
/// outage).
struct Publisher {
    client: Client,
    subject: Subject,
    /// The envelope's topic: the subject's last token.
    topic: String,
    publisher_id: u64,
    sequence: u64,
    /// What is published, for the logs (`KV events`, `load metrics`).
    what: &'static str,
    /// Set while publishing fails, so an outage is logged once rather than per message.
    failing: bool,
}

/// A publisher id: random per process and publisher, below 2^53 as Dynamo's (JSON-safe).
pub fn new_publisher_id() -> u64 {
    let id = uuid::Uuid::new_v4().as_u64_pair().0 & ((1 << 53) - 1);
    id.max(1)
}

impl Publisher {
    fn new(client: Client, subject: String, publisher_id: u64, what: &'static str) -> Publisher {
        let topic = subject.rsplit('.').next().unwrap_or_default().to_string();
        Publisher {
            client,
            subject: Subject::from(subject),
            topic,
            publisher_id,
            sequence: 0,
            what,
            failing: false,
        }
    }

    async fn publish(&mut self, message: &impl Serialize) {
        let envelope = rmp_serde::to_vec_named(message).and_then(|payload| {
            let published_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default();
            rmp_serde::to_vec_named(&EventEnvelope {
                publisher_id: self.publisher_id,
                sequence: self.sequence,
                published_at,
                topic: self.topic.clone(),
                payload,
            })
        });
        let payload = match envelope {
            Ok(payload) => payload,
            Err(e) => {
                tracing::warn!(subject = %self.subject, "cannot encode {}: {e}", self.what);
                return;
            }
        };
        self.sequence += 1;
        match self.send(payload).await {
            Ok(()) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!(subject = %self.subject, "publishing {} again", self.what);
                }
            }
            Err(reason) => {
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(
                        subject = %self.subject,
                        "dropping {} until NATS is back: {reason}",
                        self.what
                    );
                }
            }
        }
    }

    async fn send(&self, payload: Vec<u8>) -> Result<(), String> {
        // While disconnected the client would queue (then block); a stale event is worth less
        // than a publisher that keeps up, so drop instead.
        if self.client.connection_state() != State::Connected {
            return Err(format!("the connection is {}", nats_state(&self.client)));
        }
        let publish = self.client.publish(self.subject.clone(), payload.into());
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the client did not take the message within {} s",
                PUBLISH_TIMEOUT.as_secs()
            )),
        }
    }

    async fn flush(&self) {
        match tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(subject = %self.subject, "final flush failed: {e}"),
            Err(_) => tracing::debug!(subject = %self.subject, "final flush timed out"),
        }
    }
}

/// Forwards the worker's local KV events to `subject` as batches (what is queued when one is sent,
/// at most 256) from `publisher_id`. Each event's `worker_id` (the local engine index) moves to
/// `dp_rank` and is replaced by the current instance id. Ends, after a flush, when the channel
/// closes.
pub fn spawn_kv_publisher(
    client: Client,
    subject: String,
    publisher_id: u64,
    mut events: mpsc::UnboundedReceiver<RouterEvent>,
    instance_id: watch::Receiver<u64>,
) -> JoinHandle<()> {
    let mut publisher = Publisher::new(client, subject, publisher_id, "KV events");
    tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(first) = events.recv().await {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match events.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            let id = *instance_id.borrow();
            for event in &mut batch {
                event.event.dp_rank = u32::try_from(event.worker_id).unwrap_or(u32::MAX);
                event.worker_id = id;
            }
            publisher.publish(&batch).await;
            batch.clear();
        }
        publisher.flush().await;
    })
}

/// Publishes `sample()` on `load_subject` every `interval`, and the KV usage it implies on
/// `kv_subject` (Dynamo's `kv_metrics`) whenever it changed, until the handle is aborted.
pub fn spawn_load_publisher(
    client: Client,
    load_subject: String,
    kv_subject: String,
    publisher_id: u64,
    interval: Duration,
    sample: impl Fn() -> LoadMetrics + Send + 'static,
) -> JoinHandle<()> {
    let mut load = Publisher::new(client.clone(), load_subject, publisher_id, "load metrics");
    let mut kv = Publisher::new(client, kv_subject, publisher_id, "KV metrics");
    let period = interval.max(Duration::from_millis(1));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = None;
        loop {
            ticks.tick().await;
            let metrics = sample();
            let usage = ActiveLoad {
                worker_id: metrics.worker_id,
                dp_rank: 0,
                active_decode_blocks: None,
                active_prefill_tokens: None,
                kv_used_blocks: metrics.kv_active_blocks,
            };
            load.publish(&metrics).await;
            if usage.kv_used_blocks.is_some() && last.as_ref() != Some(&usage) {
                kv.publish(&usage).await;
                last = Some(usage);
            }
        }
    })
}

/// Subscribes to `subject` and forwards each event of each batch to `sink` (malformed envelopes
/// and payloads are logged, naming the publisher, and skipped). Ends when `sink` is closed.
pub async fn subscribe_kv_events(
    client: &Client,
    subject: String,
    sink: mpsc::UnboundedSender<RouterEvent>,
) -> Result<JoinHandle<()>, EventsError> {
    let mut subscriber = subscribe(client, &subject).await?;
    Ok(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = sink.closed() => break,
                message = subscriber.next() => message,
            };
            let Some(message) = message else { break };
            let Some(batch) =
                parse::<Vec<RouterEvent>>(&subject, "KV event batch", &message.payload)
            else {
                continue;
            };
            for event in batch {
                if sink.send(event).is_err() {
                    return;
                }
            }
        }
        let _ = subscriber.unsubscribe().await;
    }))
}

/// Subscribes to `subject` and calls `sink` with each enveloped `T` (malformed ones are logged and
/// skipped). Runs until the handle is aborted or the client closes.
pub async fn subscribe_enveloped<T: DeserializeOwned + Send + 'static>(
    client: &Client,
    subject: String,
    what: &'static str,
    sink: impl Fn(T) + Send + 'static,
) -> Result<JoinHandle<()>, EventsError> {
    let mut subscriber = subscribe(client, &subject).await?;
    Ok(tokio::spawn(async move {
        while let Some(message) = subscriber.next().await {
            if let Some(value) = parse::<T>(&subject, what, &message.payload) {
                sink(value);
            }
        }
    }))
}

/// [`subscribe_enveloped`] for dynamix's [`LoadMetrics`].
pub async fn subscribe_load_metrics(
    client: &Client,
    subject: String,
    sink: impl Fn(LoadMetrics) + Send + 'static,
) -> Result<JoinHandle<()>, EventsError> {
    subscribe_enveloped(client, subject, "load metrics", sink).await
}

async fn subscribe(client: &Client, subject: &str) -> Result<async_nats::Subscriber, EventsError> {
    client
        .subscribe(subject.to_string())
        .await
        .map_err(|e| EventsError::Subscribe {
            subject: subject.to_string(),
            reason: e.to_string(),
        })
}

/// Opens the envelope and decodes its payload; logs and skips what does not decode.
fn parse<T: DeserializeOwned>(subject: &str, what: &str, bytes: &[u8]) -> Option<T> {
    let envelope = match EventEnvelope::decode(bytes) {
        Ok(envelope) => envelope,
        Err(e) => {
            tracing::warn!(subject, "skipping a malformed {what} message: {e}");
            return None;
        }
    };
    match envelope.payload() {
        Ok(value) => Some(value),
        Err(e) => {
            tracing::warn!(subject, "skipping a malformed {what} message: {e}");
            None
        }
    }
}

/// An enveloped message, as publishers send it (tests).
#[cfg(test)]
pub(crate) fn envelope(topic: &str, message: &impl Serialize) -> Vec<u8> {
    EventEnvelope {
        publisher_id: 1,
        sequence: 0,
        published_at: 0,
        topic: topic.into(),
        payload: rmp_serde::to_vec_named(message).unwrap_or_default(),
    }
    .encode()
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::infra::{free_port, NatsServer};
    use crate::kv::protocol::{KvCacheEvent, KvCacheEventData, KvCacheRemoveData};
    use std::sync::Mutex;

    const WAIT: Duration = Duration::from_secs(5);

    fn removed(worker_id: u64, event_id: u64) -> RouterEvent {
        RouterEvent {
            worker_id,
            event: KvCacheEvent {
                event_id,
                data: KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: vec![1, 2, 3],
                }),
                dp_rank: 0,
            },
        }
    }

    async fn next(events: &mut mpsc::UnboundedReceiver<RouterEvent>) -> RouterEvent {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("no event in time")
            .expect("subscriber ended")
    }

    /// Subscribes `client` to the KV events on `subject` and waits until the server has registered
    /// the subscription: core NATS drops what another connection publishes before that, and `flush`
    /// only writes the SUB out. A probe published on the subscribing connection itself is ordered
    /// after its SUB, so once it arrives the subscription is live.
    async fn kv_subscriber(
        client: &Client,
        subject: &str,
    ) -> (JoinHandle<()>, mpsc::UnboundedReceiver<RouterEvent>) {
        let (sink, mut events) = mpsc::unbounded_channel();
        let subscription = subscribe_kv_events(client, subject.into(), sink)
            .await
            .unwrap();
        let probe = removed(u64::MAX, 0);
        client
            .publish(
                subject.to_string(),
                envelope("kv-events", &vec![probe.clone()]).into(),
            )
            .await
            .unwrap();
        client.flush().await.unwrap();
        assert_eq!(next(&mut events).await, probe);
        (subscription, events)
    }

    #[tokio::test]
    async fn kv_events_round_trip_with_instance_id() {
        let nats = NatsServer::start().unwrap();
        let worker = connect(&nats.url(), "worker", WAIT).await.unwrap();
        let frontend = connect(&nats.url(), "frontend", WAIT).await.unwrap();
        assert_eq!(nats_state(&worker), "connected");
        let (_subscription, mut received) = kv_subscriber(&frontend, "kv").await;

        let (local, events) = mpsc::unbounded_channel();
        let (ids, id) = watch::channel(0xabc_u64);
        let publisher = spawn_kv_publisher(worker, "kv".into(), 9, events, id);
        local.send(removed(2, 1)).unwrap();
        let got = next(&mut received).await;
        assert_eq!(got.worker_id, 0xabc);
        assert_eq!(got.event.dp_rank, 2);
        assert_eq!(got.event.event_id, 1);

        // A re-granted lease changes the id of later events.
        ids.send_replace(0xdef);
        local.send(removed(0, 2)).unwrap();
        let got = next(&mut received).await;
        assert_eq!((got.worker_id, got.event.dp_rank), (0xdef, 0));

        drop(local);
        tokio::time::timeout(WAIT, publisher)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn malformed_payloads_are_skipped() {
        let nats = NatsServer::start().unwrap();
        let client = connect(&nats.url(), "test", WAIT).await.unwrap();
        let (sink, mut received) = mpsc::unbounded_channel();
        let _kv = subscribe_kv_events(&client, "kv".into(), sink)
            .await
            .unwrap();
        let metrics = Arc::new(Mutex::new(Vec::new()));
        let seen = metrics.clone();
        let _load = subscribe_load_metrics(&client, "load".into(), move |m| {
            seen.lock().unwrap().push(m)
        })
        .await
        .unwrap();
        client.flush().await.unwrap();

        client.publish("kv", "not msgpack".into()).await.unwrap();
        // Raw JSON without the envelope, and a single event instead of a batch: both refused.
        client
            .publish("kv", serde_json::to_vec(&removed(7, 8)).unwrap().into())
            .await
            .unwrap();
        client
            .publish("kv", envelope("kv-events", &removed(7, 8)).into())
            .await
            .unwrap();
        client
            .publish("kv", envelope("kv-events", &vec![removed(7, 9)]).into())
            .await
            .unwrap();
        client
            .publish("load", envelope("load_metrics", &[1, 2]).into())
            .await
            .unwrap();
        let good = LoadMetrics {
            worker_id: 7,
            active_requests: 3,
            capacity: 8,
            ..LoadMetrics::default()
        };
        client
            .publish("load", envelope("load_metrics", &good).into())
            .await
            .unwrap();
        assert_eq!(next(&mut received).await, removed(7, 9));
        let deadline = std::time::Instant::now() + WAIT;
        while metrics.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*metrics.lock().unwrap(), vec![good]);
    }

    #[tokio::test]
    async fn load_metrics_are_published_periodically() {
        let nats = NatsServer::start().unwrap();
        let worker = connect(&nats.url(), "worker", WAIT).await.unwrap();
        let frontend = connect(&nats.url(), "frontend", WAIT).await.unwrap();
        let (sink, mut received) = mpsc::unbounded_channel();
        let _subscription = subscribe_load_metrics(&frontend, "load".into(), move |m| {
            let _ = sink.send(m);
        })
        .await
        .unwrap();
        frontend.flush().await.unwrap();
        let (kv_sink, mut kv_received) = mpsc::unbounded_channel();
        let _kv = subscribe_enveloped(
            &frontend,
            "kvm".into(),
            "KV metrics",
            move |m: ActiveLoad| {
                let _ = kv_sink.send(m);
            },
        )
        .await
        .unwrap();
        frontend.flush().await.unwrap();
        let publisher = spawn_load_publisher(
            worker,
            "load".into(),
            "kvm".into(),
            3,
            Duration::from_millis(50),
            || LoadMetrics {
                worker_id: 5,
                capacity: 4,
                kv_active_blocks: Some(7),
                ..LoadMetrics::default()
            },
        );
        for _ in 0..3 {
            let got = tokio::time::timeout(WAIT, received.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((got.worker_id, got.capacity), (5, 4));
        }
        // KV usage goes out once, as it does not change.
        let usage = tokio::time::timeout(WAIT, kv_received.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((usage.worker_id, usage.kv_used_blocks), (5, Some(7)));
        assert!(kv_received.try_recv().is_err());
        publisher.abort();
    }

    #[tokio::test]
    async fn unreachable_server_is_named() {
        let url = format!("nats://127.0.0.1:{}", free_port());
        let error = connect(&url, "test", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(error, EventsError::Connect { .. }));
        assert!(error.to_string().contains(&url), "{error}");
    }

    #[tokio::test]
    async fn delivery_resumes_after_a_server_restart() {
        let mut nats = NatsServer::start().unwrap();
        let worker = connect(&nats.url(), "worker", WAIT).await.unwrap();
        let frontend = connect(&nats.url(), "frontend", WAIT).await.unwrap();
        let (_subscription, mut received) = kv_subscriber(&frontend, "kv").await;
        let (local, events) = mpsc::unbounded_channel();
        let (_ids, id) = watch::channel(1_u64);
        let _publisher = spawn_kv_publisher(worker.clone(), "kv".into(), 9, events, id);
        local.send(removed(0, 1)).unwrap();
        assert_eq!(next(&mut received).await.event.event_id, 1);

        nats.stop();
        let deadline = std::time::Instant::now() + WAIT;
        while nats_state(&worker) == "connected" && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_ne!(nats_state(&worker), "connected");
        // Published during the outage: dropped, never blocks the publisher.
        local.send(removed(0, 2)).unwrap();
        nats.restart().unwrap();

        // Core NATS keeps nothing: keep publishing until both clients are back and one arrives.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut event_id = 3;
        let arrived = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no delivery after the restart"
            );
            local.send(removed(0, event_id)).unwrap();
            event_id += 1;
            if let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(200), received.recv()).await
            {
                break event;
            }
        };
        assert!(arrived.event.event_id >= 3, "{arrived:?}");
        assert_eq!(nats_state(&worker), "connected");
        assert_eq!(nats_state(&frontend), "connected");
    }
}
