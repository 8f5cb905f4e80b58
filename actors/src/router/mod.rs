//! Routing: [`KvRouterActor`] picks the engine for each request and hands the request to it.
//!
//! Layout:
//! - `mod.rs`: the actor, its messages and [`RouterConfig`].
//! - [`policy`]: [`policy::SelectionPolicy`], the seam where selection strategies plug in (round-robin and
//!   random now; the KV-cache-aware policy arrives with the KV index).

pub mod policy;

use std::sync::Arc;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::engine::{overloaded, EngineLoad, Generate};
use crate::error::{ApiError, ErrorClass};
use crate::protocol::engine::{EngineEvent, EngineRequest};
use policy::SelectionPolicy;

/// How the router picks an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterMode {
    /// Rotate through engines.
    RoundRobin,
    /// Pick uniformly at random.
    Random,
    /// KV-cache-aware routing (not in this build; rejected at startup).
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
    /// Seed for `random` mode (unset = from entropy), for reproducible runs.
    pub seed: Option<u64>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            mode: RouterMode::RoundRobin,
            seed: None,
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
    /// Live load, read without a mailbox hop; admission slots are reserved here.
    pub load: Arc<EngineLoad>,
    /// Requests the engine admits at once (`engine.admission_capacity`).
    pub capacity: usize,
    /// The engine's device, named in overload errors.
    pub device: String,
}

/// Route `request` to an engine and start it there; tokens arrive on `output`. Replies with the id of
/// the engine that admitted the request, as soon as the request is in that engine's mailbox: the
/// router reserves the admission slot itself, so no reply from the engine is awaited.
#[derive(Message)]
#[rtype(result = "Result<u64, ApiError>")]
pub struct Route {
    /// The validated request.
    pub request: EngineRequest,
    /// The bounded channel to the consumer.
    pub output: mpsc::Sender<EngineEvent>,
}

/// Picks engines. One per process; its selection state is the only mutable state.
pub struct KvRouterActor {
    engines: Vec<EngineSlot>,
    policy: Box<dyn SelectionPolicy>,
}

impl KvRouterActor {
    /// A router over `engines` using the policy for `config.mode`.
    pub fn new(config: &RouterConfig, engines: Vec<EngineSlot>) -> Result<Self, ApiError> {
        Ok(KvRouterActor {
            engines,
            policy: policy::for_mode(config)?,
        })
    }
}

impl Actor for KvRouterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
    }
}

impl Handler<Route> for KvRouterActor {
    type Result = Result<u64, ApiError>;

    fn handle(&mut self, msg: Route, _ctx: &mut Self::Context) -> Self::Result {
        let order: Vec<usize> = match msg.request.pinned_engine {
            Some(id) => match self.engines.iter().position(|e| e.id == id) {
                Some(index) => vec![index],
                None => {
                    return Err(ApiError::new(
                        ErrorClass::Unavailable,
                        format!("Engine instance {id} not found"),
                    ))
                }
            },
            None => self.policy.order(&self.engines, &msg.request),
        };
        // The preferred engine first; one whose admission slots are all taken passes the request on.
        let Route { request, output } = msg;
        let mut message = None;
        let mut last_error = None;
        for index in order {
            let slot = &self.engines[index];
            let Some(admission) = slot.load.try_admit(slot.capacity) else {
                last_error = Some(overloaded(slot.id, &slot.device, slot.capacity));
                continue;
            };
            let generate = match message.take() {
                Some(Generate {
                    request, output, ..
                }) => Generate {
                    request,
                    output,
                    admission,
                },
                None => Generate {
                    request: request.clone(),
                    output: output.clone(),
                    admission,
                },
            };
            match slot.addr.try_send(generate) {
                Ok(()) => return Ok(slot.id),
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
        Err(last_error.unwrap_or_else(|| {
            ApiError::new(ErrorClass::Unavailable, "Service temporarily unavailable")
        }))
    }
}
