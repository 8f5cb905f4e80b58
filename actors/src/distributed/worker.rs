//! The worker side: serve this process's engines on the TCP request plane, register in etcd under a
//! lease that the keep-alive renews, and publish the engines' KV events and load on NATS, all in
//! Dynamo's formats (interop spec §2): the `Endpoint` instance record with its frame path, the model
//! card (`v1/mdc/...`) and the event channel and source records, all under the one lease. Shutdown
//! follows upstream (runtime spec §5.7): leave discovery first, keep serving for the grace period,
//! refuse new requests, wait for the running ones, then stop.

use std::time::Duration;

use futures_util::FutureExt;

use super::discovery::Registration;
use super::events;
use super::request_plane::{EndpointSettings, WorkerEndpoint};
use super::wire::events::{KV_EVENTS, KV_METRICS, LOAD_METRICS};
use super::wire::PayloadCodec;
use super::Local;
use super::{ClusterError, DistributedConfig, Instance, LoadMetrics};
use crate::supervision::tree::Child;
use crate::supervision::{watch_task, ActorKind};

/// What the worker's distributed layer needs from its process.
pub struct WorkerSettings {
    /// `[distributed]`.
    pub config: DistributedConfig,
    /// Request-plane frame limit (`DYN_TCP_MAX_MESSAGE_SIZE`).
    pub max_message_size: usize,
    /// The engine kind, advertised in the discovery record.
    pub engine: String,
    /// Requests this worker admits at once (all its engines).
    pub capacity: usize,
    /// Capacity of each request's token channel.
    pub stream_buffer: usize,
    /// The model deployment card (`card_json`) a Dynamo frontend needs to serve the model.
    pub card: Option<serde_json::Value>,
    /// How request bodies are to be encoded (advertised in the record).
    pub codec: PayloadCodec,
    /// `cuda` or `cpu`, as the record's `device_type`.
    pub device_type: String,
}

/// A registered, serving worker.
pub struct WorkerHandle {
    registration: Registration,
    endpoint: WorkerEndpoint,
    /// The publishers, watched (a panic in one escalates).
    tasks: Vec<tokio::task::AbortHandle>,
    grace: Duration,
}

impl WorkerHandle {
    /// The worker's three children of the cluster subtree, in start order: `events` (the
    /// publishers), `request_plane` (the endpoint) and `discovery` (the registration). Stopped in
    /// reverse, they do what upstream's shutdown does (runtime spec §5.7): leave discovery, serve for
    /// the grace period, refuse new work and wait (at most `drain_timeout`) for running requests,
    /// then stop publishing. `also_on_leave` is dropped after discovery is left (the system server).
    pub fn into_children(
        self,
        drain_timeout: Duration,
        also_on_leave: impl Sized + 'static,
    ) -> Vec<Child> {
        let WorkerHandle {
            registration,
            endpoint,
            tasks,
            grace,
        } = self;
        let events = Child::new(ActorKind::Events, "0").stopped_by(move || {
            for task in &tasks {
                task.abort();
            }
            async {}.boxed_local()
        });
        let request_plane = Child::new(ActorKind::RequestPlane, "0").stopped_by(move || {
            async move {
                if !grace.is_zero() {
                    tokio::time::sleep(grace).await;
                }
                endpoint.state.drain();
                let running = endpoint.state.inflight();
                if !endpoint.state.wait_idle(Some(drain_timeout)).await {
                    tracing::warn!(
                        running = endpoint.state.inflight(),
                        "drain timed out; stopping with requests still running"
                    );
                } else if running > 0 {
                    tracing::info!(running, "running requests finished");
                }
            }
            .boxed_local()
        });
        let discovery = Child::new(ActorKind::Discovery, "0").stopped_by(move || {
            async move {
                let id = registration.instance_id();
                registration.deregister().await;
                tracing::info!(worker = format!("{id:x}"), "left discovery");
                drop(also_on_leave);
            }
            .boxed_local()
        });
        vec![events, request_plane, discovery]
    }
}

/// Serve `service`'s engines (started with `export_kv_events`) to frontends. Fails, naming the
/// address, when the port cannot be bound or etcd or NATS cannot be reached.
pub async fn start(
    service: &mut Local,
    settings: WorkerSettings,
) -> Result<WorkerHandle, ClusterError> {
    let config = settings.config.clone();
    config.validate()?;
    let endpoint = WorkerEndpoint::serve(
        &config.host,
        config.request_plane_port,
        EndpointSettings {
            path_suffix: format!(
                "/{}/{}/{}",
                config.namespace, config.component, config.endpoint
            ),
            max_message_size: settings.max_message_size,
            connect_timeout: Duration::from_secs_f64(config.connect_timeout_secs),
            stream_buffer: settings.stream_buffer,
            mux: config.mux(),
            faults: service.faults.clone(),
            supervision: service.request_plane.clone(),
        },
        service.router.clone(),
    )
    .await
    .map_err(|source| ClusterError::Listen {
        what: "requests",
        address: format!("{}:{}", config.host, config.request_plane_port),
        source,
    })?;
    let address = format!("{}:{}", config.host, endpoint.port);
    let nats = events::connect(
        &config.nats_url,
        "dynamix-worker",
        Duration::from_secs_f64(config.connect_timeout_secs),
    )
    .await?;
    let record = {
        let (config, address, engine, capacity, block, codec, device) = (
            config.clone(),
            address.clone(),
            settings.engine.clone(),
            settings.capacity,
            service.kv_block_size,
            settings.codec,
            settings.device_type.clone(),
        );
        let switch = endpoint.instance_switch();
        // Called with each lease id before its record is put: frames for it are accepted from
        // the moment a frontend can see it (a re-granted lease calls it again).
        move |id: u64| {
            switch(id);
            Instance {
                engine: Some(engine.clone()),
                kv_block_size: Some(block),
                capacity: Some(capacity),
                device_type: Some(device.clone()),
                ..Instance::endpoint(
                    &config.namespace,
                    &config.component,
                    &config.endpoint,
                    id,
                    &address,
                    codec,
                )
            }
        }
    };
    let publisher_id = events::new_publisher_id();
    let publishes_kv = service.kv_events_out.is_some();
    let extras = {
        let (config, card) = (config.clone(), settings.card.clone());
        move |id: u64| extra_records(&config, card.as_ref(), publisher_id, publishes_kv, id)
    };
    let registration = Registration::start_with(&config, record, extras).await?;
    let mut tasks = Vec::new();
    if let Some(events) = service.kv_events_out.take() {
        tasks.push(events::spawn_kv_publisher(
            nats.clone(),
            config.event_subject(KV_EVENTS),
            publisher_id,
            events,
            registration.watch_id(),
        ));
    }
    let ids = registration.watch_id();
    let engines = service.engines.clone();
    let state = endpoint.state.clone();
    let capacity = settings.capacity as u64;
    tasks.push(events::spawn_load_publisher(
        nats,
        config.event_subject(LOAD_METRICS),
        config.event_subject(KV_METRICS),
        publisher_id,
        Duration::from_millis(config.load_metrics_interval_ms),
        move || {
            let engines = engines.snapshot();
            let mockers: Vec<_> = engines.iter().filter_map(|e| e.mocker.clone()).collect();
            let blocks = (!mockers.is_empty())
                .then(|| mockers.iter().map(|m| m.active_decode_blocks()).sum());
            let waiting = (!mockers.is_empty())
                .then(|| mockers.iter().map(|m| m.waiting_requests() as u64).sum());
            LoadMetrics {
                worker_id: *ids.borrow(),
                active_requests: state.inflight() as u64,
                capacity,
                kv_active_blocks: blocks,
                kv_total_blocks: None,
                waiting_requests: waiting,
            }
        },
    ));
    tracing::info!(
        worker = format!("{:x}", registration.instance_id()),
        %address,
        "worker registered and serving"
    );
    let tasks = tasks
        .into_iter()
        .map(|task| watch_task(task, service.tracker(ActorKind::Events)))
        .collect();
    Ok(WorkerHandle {
        registration,
        endpoint,
        tasks,
        grace: Duration::from_secs_f64(config.graceful_shutdown_grace_period_secs),
    })
}

/// The keys a worker puts beside its instance record: the model card and, when it publishes on
/// NATS, the event channels and the KV-event source. A record that cannot be encoded is logged and
/// left out (the worker still serves dynamix frontends).
fn extra_records(
    config: &DistributedConfig,
    card: Option<&serde_json::Value>,
    publisher_id: u64,
    publishes_kv: bool,
    instance_id: u64,
) -> Vec<(String, Vec<u8>)> {
    let mut records = Vec::new();
    if let Some(card) = card {
        let record = serde_json::json!({
            "type": "Model",
            "namespace": config.namespace,
            "component": config.component,
            "endpoint": config.endpoint,
            "instance_id": instance_id,
            "card_json": card,
        });
        match serde_json::to_vec(&record) {
            Ok(value) => records.push((config.card_key(instance_id), value)),
            Err(e) => tracing::error!("cannot encode the model card: {e}"),
        }
    }
    let topics: &[&str] = if publishes_kv {
        &[KV_EVENTS, KV_METRICS]
    } else {
        &[KV_METRICS]
    };
    match super::wire::events::registration_records(
        &config.namespace,
        &config.component,
        &config.endpoint,
        publisher_id,
        instance_id,
        topics,
    ) {
        Ok(mut events) => records.append(&mut events),
        Err(e) => tracing::error!("cannot encode the event channel records: {e}"),
    }
    records
}
