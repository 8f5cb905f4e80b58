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
