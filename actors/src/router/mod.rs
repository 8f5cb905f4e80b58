//! Routing: [`Router`] picks the engine for each request and hands the request to it; the
//! [`KvRouterActor`] owns it.
//!
//! Layout:
//! - `mod.rs`: [`Router`] (the shared selection state), the actor, its messages and [`RouterConfig`].
//! - [`policy`]: [`policy::SelectionPolicy`], the seam where selection strategies plug in.
//! - [`kv`]: the KV-cache-aware policy (prefix overlap from the shared index against predicted load).
//! - [`indexer`]: [`indexer::KvIndexerActor`], the single writer of the prefix index (KV events in).

pub mod indexer;
pub mod kv;
pub mod policy;

use std::sync::{Arc, Mutex};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::engine::{overloaded, EngineLoad, Generate, RequestProgress, StartHere};
use crate::error::{ApiError, ErrorClass};
use crate::faults::FaultInjector;
use crate::protocol::engine::{EngineEvent, EngineRequest};
use crate::supervision::{
    catch_panic, ActorKind, RestartTracker, SupervisionConfig, SupervisorEvents, Verdict,
};
use policy::SelectionPolicy;

/// How the router picks an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    /// Rotate through engines.
    RoundRobin,
    /// Pick uniformly at random.
    Random,
    /// KV-cache-aware routing: prefix overlap against predicted load (runtime spec §3).
    Kv,
}

impl RouterMode {
    /// Name as written in configs and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
            RouterMode::Kv => "kv",
        }
    }
}

/// `[router]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Selection mode (`--router-mode`, `DYN_ROUTER_MODE`).
    pub mode: RouterMode,
    /// Seed for `random` mode and `kv` tie-breaking/sampling (unset = from entropy), for
    /// reproducible runs.
    pub seed: Option<u64>,
    /// `kv`: weight of prefill work against decode load in the cost function
    /// (`--kv-overlap-score-weight`, `DYN_ROUTER_KV_OVERLAP_SCORE_WEIGHT`); 0 = load only.
    pub kv_overlap_score_weight: f64,
    /// `kv`: softmax temperature; 0 picks the cheapest engine (`--router-temperature`,
    /// `DYN_ROUTER_TEMPERATURE`).
    pub temperature: f64,
    /// `kv`: learn the engines' caches from their KV events; false = approximate mode, where the
    /// router remembers its own decisions for `ttl_secs` (`--use-kv-events`/`--no-kv-events`,
    /// `DYN_ROUTER_USE_KV_EVENTS`).
    pub use_kv_events: bool,
    /// `kv`, approximate mode: how long a routed prefix is assumed cached (`--router-ttl-secs`,
    /// `DYN_ROUTER_TTL_SECS`).
    pub ttl_secs: f64,
    /// `kv`, approximate mode: most (engine, block) entries remembered before pruning.
    pub max_tree_size: usize,
    /// `kv`, approximate mode: pruning shrinks the record to this fraction of `max_tree_size`.
    pub prune_target_ratio: f64,
    /// `kv`: track each engine's active blocks and prefill tokens to predict load.
    pub track_active_blocks: bool,
    /// `kv`: the KV block size in tokens; must equal the engines' (`--kv-cache-block-size`,
    /// `DYN_KV_CACHE_BLOCK_SIZE`). Unset = take it from the engines.
    pub kv_cache_block_size: Option<usize>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            mode: RouterMode::RoundRobin,
            seed: None,
            kv_overlap_score_weight: 1.0,
            temperature: 0.0,
            use_kv_events: true,
            ttl_secs: 120.0,
            max_tree_size: 1 << 20,
            prune_target_ratio: 0.8,
            track_active_blocks: true,
            kv_cache_block_size: None,
        }
    }
}

/// One routable engine as the router sees it.
#[derive(Clone)]
pub struct EngineSlot {
    /// Instance id (for `backend_instance_id` pinning).
    pub id: u64,
    /// Where to send work.
    pub addr: Recipient<Generate>,
    /// Starts work on the routing thread instead, when the engine can ([`StartHere`]).
    pub direct: Option<Arc<dyn StartHere>>,
    /// Live load, read without a mailbox hop; admission slots are reserved here.
    pub load: Arc<EngineLoad>,
    /// Requests the engine admits at once (`engine.admission_capacity`).
    pub capacity: usize,
    /// The engine's device, named in overload errors.
    pub device: String,
}

/// Where a request went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Routed {
    /// The engine that admitted it.
    pub engine_id: u64,
    /// Prompt tokens the router expects that engine to find in its prefix cache (`kv` mode).
    pub cached_tokens: Option<u32>,
}

/// Route `request` to an engine and start it there; tokens arrive on `output`. Replies with the
/// engine that admitted the request, as soon as the request is in that engine's mailbox: the router
/// reserves the admission slot itself, so no reply from the engine is awaited.
#[derive(Message)]
#[rtype(result = "Result<Routed, ApiError>")]
pub struct Route {
    /// The validated request.
    pub request: EngineRequest,
    /// The bounded channel to the consumer.
    pub output: mpsc::Sender<EngineEvent>,
    /// Engines that just failed this request (migration): tried only when no other engine admits it.
    pub exclude: Vec<u64>,
}

/// The router's selection state: the engines, the policy and its restart bookkeeping. Shared by
/// `Arc`: the [`KvRouterActor`] owns it and applies engine changes and progress reports, while the
/// serving path routes through it directly ([`Router::route`]) instead of queueing on the actor's
/// mailbox, from every HTTP worker at once. One short lock per routing decision keeps a decision and
/// the load it adds atomic, as the actor's one-message-at-a-time handling did.
pub struct Router {
    selection: Mutex<Selection>,
}

struct Selection {
    engines: Vec<EngineSlot>,
    policy: Box<dyn SelectionPolicy>,
    config: RouterConfig,
    kv: Option<policy::KvContext>,
    faults: Arc<FaultInjector>,
    /// Restart intensity (`[supervisor]`); past it the failure escalates to the root.
    supervision: RestartTracker,
}

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, Selection> {
        // Every panic inside the lock is caught before it unwinds through the guard (`route`), and
        // engine changes are single calls: a poisoned lock still holds consistent state.
        self.selection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Route `request` to an engine and start it there; tokens arrive on `output`. `exclude`: engines
    /// that just failed this request (migration), tried only when no other engine admits it.
    /// Supervised: a panic while routing fails this attempt with a retryable error and restarts the
    /// router (its selection state is rebuilt; the KV index, shared, is kept); past the restart
    /// intensity the failure escalates to the root.
    pub fn route(
        &self,
        request: &EngineRequest,
        output: &mpsc::Sender<EngineEvent>,
        exclude: &[u64],
    ) -> Result<Routed, ApiError> {
        let mut selection = self.lock();
        if let Some(reason) = selection.supervision.given_up() {
            return Err(ApiError::new(ErrorClass::Unavailable, reason));
        }
        match catch_panic(|| selection.route(request, output, exclude)) {
            Ok(result) => result,
            Err(reason) => {
                tracing::error!(%reason, "router panicked while routing");
                Err(selection.failed(reason))
            }
        }
    }

    /// A request admitted on an engine reached `stage` (load tracking). Called on the reporting
    /// engine's thread rather than queued on the actor: a message per stage woke the router's
    /// thread twice per request. Supervised as routing is: a panic restarts the router.
    pub fn progress(&self, msg: &RequestProgress) {
        let mut selection = self.lock();
        if let Err(reason) = catch_panic(|| {
            selection
                .policy
                .progress(msg.engine_id, &msg.request_id, msg.stage)
        }) {
            tracing::error!(%reason, "router panicked while tracking a request's progress");
            let _ = selection.failed(reason);
        }
    }
}

impl Selection {
    /// A panic while routing was caught: restart (rebuild the selection state) within the budget,
    /// otherwise give up and escalate. Returns what the failed attempt answers.
    fn failed(&mut self, reason: String) -> ApiError {
        match self.supervision.on_failure(reason.clone()) {
            Verdict::Restart => {
                self.restart();
                ApiError::restarted(ActorKind::Router, "routing")
            }
            Verdict::GiveUp { failures } => {
                let escalation = self.supervision.escalate(failures, reason);
                tracing::error!(%escalation, "router past its restart intensity; escalating");
                ApiError::new(ErrorClass::Unavailable, escalation.to_string())
            }
            Verdict::AlreadyHandled => ApiError::restarted(ActorKind::Router, "routing"),
        }
    }

    /// The restart after a caught failure: load tracking starts over.
    fn restart(&mut self) {
        let Some(reason) = self.supervision.on_restart() else {
            return;
        };
        match policy::for_mode(&self.config, &self.engines, self.kv.clone()) {
            Ok(policy) => self.policy = policy,
            Err(e) => {
                tracing::error!(error = %e.message, "router restart kept its old selection state")
            }
        }
        tracing::warn!(%reason, "router restarted");
        self.supervision.report_restarted(reason);
    }
}

/// Owns the [`Router`]: engines join and leave through its messages, and it answers [`Route`] for
/// callers that hold its address (a worker's request plane). One per process.
pub struct KvRouterActor {
    router: Arc<Router>,
}

impl KvRouterActor {
    /// A router over `engines` using the policy for `config.mode` (`kv` needs `kv`).
    pub fn new(
        config: &RouterConfig,
        engines: Vec<EngineSlot>,
        kv: Option<policy::KvContext>,
    ) -> Result<Self, ApiError> {
        let selection = Selection {
            policy: policy::for_mode(config, &engines, kv.clone())?,
            engines,
            config: config.clone(),
            kv,
            faults: FaultInjector::disabled(),
            supervision: RestartTracker::new(ActorKind::Router, "0"),
        };
        Ok(KvRouterActor {
            router: Arc::new(Router {
                selection: Mutex::new(selection),
            }),
        })
    }

    /// Supervision: the restart intensity, where to report restarts, and the fault injector.
    pub fn supervised(
        self,
        config: &SupervisionConfig,
        events: SupervisorEvents,
        faults: Arc<FaultInjector>,
    ) -> Self {
        {
            let mut selection = self.router.lock();
            selection.supervision.supervise(config, events);
            selection.faults = faults;
        }
        self
    }

    /// The shared router, for routing without a mailbox hop.
    pub fn router(&self) -> Arc<Router> {
        self.router.clone()
    }
}

impl Supervised for KvRouterActor {}

/// An engine left (stopped, or removed by the operator): stop routing to it and forget its load.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EngineRemoved {
    /// Its instance id.
    pub engine_id: u64,
}

impl Handler<EngineRemoved> for KvRouterActor {
    type Result = ();

    fn handle(&mut self, msg: EngineRemoved, _ctx: &mut Self::Context) {
        let selection = &mut *self.router.lock();
        selection.engines.retain(|e| e.id != msg.engine_id);
        selection.policy.engine_removed(msg.engine_id);
    }
}

/// An engine joined (a worker registered in discovery): route to it from now on. An engine with the
/// same id is replaced.
#[derive(Message)]
#[rtype(result = "()")]
pub struct EngineAdded {
    /// The engine.
    pub slot: EngineSlot,
}

impl Handler<EngineAdded> for KvRouterActor {
    type Result = ();

    fn handle(&mut self, msg: EngineAdded, _ctx: &mut Self::Context) {
        let selection = &mut *self.router.lock();
        if selection.engines.iter().any(|e| e.id == msg.slot.id) {
            selection.engines.retain(|e| e.id != msg.slot.id);
            selection.policy.engine_removed(msg.slot.id);
        }
        selection.policy.engine_added(&msg.slot);
        selection.engines.push(msg.slot);
    }
}

impl Actor for KvRouterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
    }
}

impl Handler<Route> for KvRouterActor {
    type Result = Result<Routed, ApiError>;

    fn handle(&mut self, msg: Route, _ctx: &mut Self::Context) -> Self::Result {
        self.router.route(&msg.request, &msg.output, &msg.exclude)
    }
}

impl Selection {
    fn route(
        &mut self,
        request: &EngineRequest,
        output: &mpsc::Sender<EngineEvent>,
        exclude: &[u64],
    ) -> Result<Routed, ApiError> {
        if self.faults.on_route() {
            panic!(
                "injected fault: router panics while routing {}",
                request.request_id
            );
        }
        let mut order: Vec<usize> = match request.pinned_engine {
            Some(id) => match self.engines.iter().position(|e| e.id == id) {
                Some(index) => vec![index],
                None => {
                    return Err(ApiError::new(
                        ErrorClass::Unavailable,
                        format!("Engine instance {id} not found"),
                    ))
                }
            },
            None => self.policy.order(&self.engines, request),
        };
        if !exclude.is_empty() {
            // Engines that just failed this request go last (stable: the policy's order otherwise).
            order.sort_by_key(|&i| exclude.contains(&self.engines[i].id));
        }
        // The preferred engine first; one whose admission slots are all taken passes the request on.
        let mut message: Option<Generate> = None;
        let mut last_error = None;
        for index in order {
            let slot = &self.engines[index];
            let Some(admission) = slot.load.try_admit(slot.capacity) else {
                last_error = Some(overloaded(slot.id, &slot.device, slot.capacity));
                continue;
            };
            let generate = match message.take() {
                Some(returned) => Generate {
                    admission,
                    ..returned
                },
                None => Generate {
                    request: request.clone(),
                    output: output.clone(),
                    admission,
                },
            };
            let sent = match &slot.direct {
                Some(direct) if direct.can_start_here() => {
                    direct.start_here(generate);
                    Ok(())
                }
                _ => slot.addr.try_send(generate),
            };
            match sent {
                Ok(()) => {
                    let cached_tokens = self.policy.admitted(slot, &request.request_id);
                    return Ok(Routed {
                        engine_id: slot.id,
                        cached_tokens,
                    });
                }
                Err(SendError::Full(returned)) | Err(SendError::Closed(returned)) => {
                    // Full cannot happen (the mailbox holds at least `capacity` messages and each
                    // holds a slot); closed means the engine has stopped. Either way the slot is
                    // released with the admission, and the request is offered to the next engine.
                    last_error = Some(ApiError::new(
                        ErrorClass::Unavailable,
                        format!("Engine {} is not accepting requests", slot.id),
                    ));
                    message = Some(returned);
                }
            }
        }
        Err(last_error.unwrap_or_else(ApiError::no_engine_available))
    }
}
