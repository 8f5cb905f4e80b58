//! Discovery against a real etcd (started by the test on free ports).

use std::time::Duration;

use tokio::sync::mpsc;

use super::*;
use crate::distributed::etcd::{Client, ConnectOptions};
use crate::distributed::infra::EtcdServer;
use crate::distributed::wire::PayloadCodec;
use crate::distributed::Instance;
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
        engine: Some("mocker".into()),
        kv_block_size: Some(16),
        capacity: Some(8),
        ..Instance::endpoint(
            "dynamo",
            "backend",
            "generate",
            id,
            &format!("127.0.0.1:{port}"),
            PayloadCodec::Msgpack,
        )
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
        DiscoveryEvent::Added(instance) => assert_eq!(*instance, record(4000)(id)),
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
        DiscoveryEvent::Added(Box::new(record(4001)(registration.instance_id())))
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
        DiscoveryEvent::Added(Box::new(record(4003)(registration.instance_id())))
    );
    // The listing of a fresh watcher skips them too.
    let (mut relisted, _handle2) = watch_instances(&config).await.unwrap();
    assert_eq!(
        next_event(&mut relisted, Duration::from_secs(5)).await,
        DiscoveryEvent::Added(Box::new(record(4003)(registration.instance_id())))
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
        DiscoveryEvent::Added(Box::new(record(4005)(first)))
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
        DiscoveryEvent::Added(Box::new(record(4005)(second)))
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
