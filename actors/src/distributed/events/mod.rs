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

/// Why one message was not published (it is dropped; the publisher says so once per outage).
#[derive(Debug, thiserror::Error)]
enum PublishError {
    /// The client is not connected (its state).
    #[error("the connection is {0}")]
    NotConnected(&'static str),
    /// The client refused the message.
    #[error(transparent)]
    Client(async_nats::client::PublishError),
    /// The client did not take it within [`PUBLISH_TIMEOUT`].
    #[error("the client did not take the message within {} s", PUBLISH_TIMEOUT.as_secs())]
    TimedOut,
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

    async fn send(&self, payload: Vec<u8>) -> Result<(), PublishError> {
        // While disconnected the client would queue (then block); a stale event is worth less
        // than a publisher that keeps up, so drop instead.
        if self.client.connection_state() != State::Connected {
            return Err(PublishError::NotConnected(nats_state(&self.client)));
        }
        let publish = self.client.publish(self.subject.clone(), payload.into());
        match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(PublishError::Client(e)),
            Err(_) => Err(PublishError::TimedOut),
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
mod tests;
