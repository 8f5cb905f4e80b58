//! [`InstanceManager`]: one model's view of the workers. It turns discovery events into routable
//! engines — one [`RemoteEngine`] per worker instance whose card is the model's, added to and removed
//! from the router as workers register and their leases vanish — keeps a worker whose stream broke
//! out of routing until it answers a probe, and purges a departed worker's blocks from the index.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::discovery::DiscoveryEvent;
use super::remote::{RemoteEngine, RemoteSettings};
use super::response_stream::ResponseStreamServer;
use super::{DistributedConfig, Instance, LoadMetrics};
use crate::engine::registry::{EngineInfo, EngineRegistry};
use crate::engine::EngineLoad;
use crate::router::indexer::{KvIndexerActor, RemoveWorker};
use crate::router::{EngineAdded, EngineRemoved, EngineSlot, KvRouterActor, Router};

/// A worker's last load report.
pub(super) type LoadCell = Arc<Mutex<Option<LoadMetrics>>>;

/// A worker instance the manager knows, routable or not.
pub(super) struct Known {
    instance: Instance,
    addr: Addr<RemoteEngine>,
    load: Arc<EngineLoad>,
    routable: bool,
}

/// Keeps the router's engines equal to the live workers.
pub struct InstanceManager {
    pub(super) settings: RemoteSettings,
    pub(super) default_capacity: usize,
    pub(super) kv_block_size: Option<usize>,
    pub(super) model: Option<String>,
    /// The adapter every request names (a LoRA adapter's lane).
    pub(super) lora: Option<String>,
    pub(super) config: DistributedConfig,
    /// Instances whose card is being checked (a removal meanwhile cancels the add).
    pub(super) pending: std::collections::HashSet<u64>,
    pub(super) streams: Arc<ResponseStreamServer>,
    pub(super) router: Addr<KvRouterActor>,
    /// The router's shared state, where remote engines report their requests' progress.
    pub(super) progress: Arc<Router>,
    pub(super) indexer: Option<Addr<KvIndexerActor>>,
    pub(super) registry: Arc<EngineRegistry>,
    pub(super) loads: Arc<Mutex<HashMap<u64, LoadCell>>>,
    pub(super) known: HashMap<u64, Known>,
    pub(super) down_tx: mpsc::UnboundedSender<u64>,
    pub(super) etcd_state: Arc<Mutex<String>>,
    #[allow(clippy::type_complexity)]
    pub(super) inputs: Option<(
        mpsc::UnboundedReceiver<DiscoveryEvent>,
        mpsc::UnboundedReceiver<u64>,
    )>,
}

impl Actor for InstanceManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some((mut discovered, mut down)) = self.inputs.take() {
            ctx.add_stream(futures_util::stream::poll_fn(move |cx| {
                discovered.poll_recv(cx)
            }));
            ctx.add_stream(futures_util::stream::poll_fn(move |cx| {
                down.poll_recv(cx).map(|id| id.map(Down))
            }));
        }
    }
}

/// A request failed in a way that suggests the worker is gone.
struct Down(u64);

/// A down worker answered a probe.
#[derive(Message)]
#[rtype(result = "()")]
struct Answered(u64);

impl InstanceManager {
    fn add(&mut self, instance: Instance) {
        let id = instance.instance_id;
        if let Some(known) = self.known.get(&id) {
            if known.instance == instance && known.routable {
                return;
            }
        }
        if let (Some(ours), Some(theirs)) = (self.kv_block_size, instance.kv_block_size) {
            if ours != theirs {
                tracing::error!(
                    worker = format!("{id:x}"),
                    "worker uses KV blocks of {theirs} tokens but this frontend's router uses {ours} (router.kv_cache_block_size); not routing to it"
                );
                return;
            }
        }
        let load = Arc::new(EngineLoad::default());
        let engine = match RemoteEngine::new(
            &instance,
            self.settings.clone(),
            self.streams.clone(),
            self.down_tx.clone(),
            load.clone(),
            // Only the kv policy tracks requests' progress (in-process engines report it only then).
            self.kv_block_size.map(|_| self.progress.clone()),
        ) {
            Ok(engine) => engine.for_adapter(self.lora.clone()),
            Err(e) => {
                tracing::error!(worker = format!("{id:x}"), error = %e, "cannot route to this worker");
                return;
            }
        };
        let request_plane = engine.request_plane();
        let direct = engine.starter();
        let addr = engine.start();
        let capacity = instance.capacity.unwrap_or(self.default_capacity).max(1);
        let address = instance.tcp_address().unwrap_or_default();
        self.router.do_send(EngineAdded {
            slot: EngineSlot {
                id,
                addr: addr.clone().recipient(),
                direct: Some(direct),
                load: load.clone(),
                capacity,
                device: address.clone(),
            },
        });
        let cell: LoadCell = Arc::default();
        if let Ok(mut loads) = self.loads.lock() {
            loads.insert(id, cell.clone());
        }
        self.registry.upsert(EngineInfo {
            gpu: None,
            instance_id: id,
            engine: instance.engine.clone().unwrap_or_else(|| "remote".into()),
            device: address.clone(),
            load: load.clone(),
            mocker: None,
            model: None,
            transport: format!("tcp://{address}"),
            request_plane: Some(request_plane),
            endpoint_id: [
                instance.namespace.clone(),
                instance.component.clone(),
                instance.endpoint.clone(),
            ],
            remote: Some(cell),
        });
        tracing::info!(worker = format!("{id:x}"), %address, "worker joined; routing to it");
        self.known.insert(
            id,
            Known {
                instance,
                addr,
                load,
                routable: true,
            },
        );
    }

    fn unroute(&mut self, id: u64) {
        self.router.do_send(EngineRemoved { engine_id: id });
        if let Some(info) = self.registry.remove(id) {
            info.load
                .retired
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn remove(&mut self, id: u64) {
        let Some(known) = self.known.remove(&id) else {
            return;
        };
        self.unroute(id);
        if let Some(indexer) = &self.indexer {
            indexer.do_send(RemoveWorker(id));
        }
        if let Ok(mut loads) = self.loads.lock() {
            loads.remove(&id);
        }
        drop(known.addr);
        tracing::warn!(
            worker = format!("{id:x}"),
            active = known.load.active(),
            "worker left discovery (lease revoked or expired); no longer routing to it"
        );
    }
}

/// An instance whose model card was checked.
#[derive(Message)]
#[rtype(result = "()")]
struct Checked(Box<Instance>);

impl Handler<Checked> for InstanceManager {
    type Result = ();

    fn handle(&mut self, Checked(instance): Checked, _ctx: &mut Self::Context) {
        if self.pending.remove(&instance.instance_id) {
            self.add(*instance);
        }
    }
}

/// What an instance's model card says.
enum CardCheck {
    /// It serves this model.
    Serves(String),
    /// It wrote no card (within the wait).
    Missing,
    /// The card could not be read or parsed (the reason).
    Unreadable(String),
}

/// Reads `v1/mdc/.../{id:x}`, waiting up to 2 s for it: a worker writes its card just after its
/// instance record.
async fn card_model(config: &DistributedConfig, id: u64) -> CardCheck {
    let key = config.card_key(id);
    for _ in 0..10 {
        match super::discovery::list_prefix(config, &key).await {
            Ok(records) => {
                if let Some((_, value)) = records.into_iter().find(|(k, _)| *k == key) {
                    return match serde_json::from_slice::<serde_json::Value>(&value) {
                        Ok(card) => match card["card_json"]["display_name"].as_str() {
                            Some(name) => CardCheck::Serves(name.to_string()),
                            None => {
                                CardCheck::Unreadable("card_json.display_name is missing".into())
                            }
                        },
                        Err(e) => CardCheck::Unreadable(format!("not JSON: {e}")),
                    };
                }
            }
            Err(e) => return CardCheck::Unreadable(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    CardCheck::Missing
}

impl InstanceManager {
    /// Routes to `instance` once its card shows it serves this frontend's model (when the frontend
    /// took its model from the cards); a worker without a card, or whose card cannot be read, is
    /// routed to as before.
    fn check_then_add(&mut self, instance: Instance, ctx: &mut Context<Self>) {
        let Some(model) = self.model.clone() else {
            return self.add(instance);
        };
        let id = instance.instance_id;
        if self
            .known
            .get(&id)
            .is_some_and(|k| k.instance == instance && k.routable)
        {
            return;
        }
        self.pending.insert(id);
        let config = self.config.clone();
        let me = ctx.address();
        actix::spawn(async move {
            let worker = format!("{id:x}");
            match card_model(&config, id).await {
                CardCheck::Serves(name) if name == model => {}
                CardCheck::Serves(name) => {
                    tracing::warn!(%worker, card_model = %name, served = %model, "worker serves another model; not routing to it");
                    return;
                }
                CardCheck::Missing => {
                    tracing::debug!(%worker, "worker wrote no model card; routing to it")
                }
                CardCheck::Unreadable(reason) => {
                    tracing::warn!(%worker, key = %config.card_key(id), %reason, "cannot read the worker's model card; routing to it")
                }
            }
            me.do_send(Checked(Box::new(instance)));
        });
    }
}

impl StreamHandler<DiscoveryEvent> for InstanceManager {
    fn handle(&mut self, event: DiscoveryEvent, ctx: &mut Self::Context) {
        match event {
            DiscoveryEvent::Added(instance) => self.check_then_add(*instance, ctx),
            DiscoveryEvent::Removed(id) => {
                self.pending.remove(&id);
                self.remove(id)
            }
            DiscoveryEvent::Lost(reason) => {
                tracing::warn!(%reason, "lost etcd; routing to the {} workers already known until it is back", self.known.len());
                if let Ok(mut state) = self.etcd_state.lock() {
                    *state = format!("disconnected: {reason}");
                }
            }
            DiscoveryEvent::Restored => {
                tracing::info!("etcd is back; re-reading the workers");
                if let Ok(mut state) = self.etcd_state.lock() {
                    *state = "connected".into();
                }
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {
        tracing::debug!("discovery stream ended");
    }
}

impl StreamHandler<Down> for InstanceManager {
    fn handle(&mut self, Down(id): Down, ctx: &mut Self::Context) {
        let Some(known) = self.known.get_mut(&id) else {
            return;
        };
        if !known.routable {
            return;
        }
        known.routable = false;
        let address = known.instance.tcp_address().unwrap_or_default();
        tracing::warn!(worker = format!("{id:x}"), %address, "worker looks down (request failed or stream broke); not routing to it until it answers");
        self.unroute(id);
        // Probe until it answers or discovery drops it.
        let me = ctx.address();
        actix::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if !me.connected() {
                    return;
                }
                let ok = tokio::time::timeout(
                    Duration::from_secs(1),
                    tokio::net::TcpStream::connect(&address),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                if ok {
                    me.do_send(Answered(id));
                    return;
                }
                if !matches!(me.send(IsDown(id)).await, Ok(true)) {
                    return;
                }
            }
        });
    }

    fn finished(&mut self, _ctx: &mut Self::Context) {}
}

/// Whether `id` is known and not routable (the probe keeps going only then).
#[derive(Message)]
#[rtype(result = "bool")]
struct IsDown(u64);

impl Handler<IsDown> for InstanceManager {
    type Result = bool;

    fn handle(&mut self, IsDown(id): IsDown, _ctx: &mut Self::Context) -> bool {
        self.known.get(&id).is_some_and(|k| !k.routable)
    }
}

impl Handler<Answered> for InstanceManager {
    type Result = ();

    fn handle(&mut self, Answered(id): Answered, _ctx: &mut Self::Context) {
        let Some(known) = self.known.get(&id) else {
            return;
        };
        if known.routable {
            return;
        }
        let instance = known.instance.clone();
        tracing::info!(worker = format!("{id:x}"), "worker answers again");
        self.add(instance);
    }
}
