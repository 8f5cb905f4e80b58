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

use crate::engine::{EngineLoad, Generate};
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
    /// Live load, read without a mailbox hop.
    pub load: Arc<EngineLoad>,
}

/// Route `request` to an engine and start it there; tokens arrive on `output`. Replies with the id of
/// the engine that admitted the request.
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
    type Result = ResponseFuture<Result<u64, ApiError>>;

    fn handle(&mut self, msg: Route, _ctx: &mut Self::Context) -> Self::Result {
        let candidates: Vec<EngineSlot> = match msg.request.pinned_engine {
            Some(id) => match self.engines.iter().find(|e| e.id == id) {
                Some(slot) => vec![slot.clone()],
                None => {
                    let err = ApiError::new(
                        ErrorClass::Unavailable,
                        format!("Engine instance {id} not found"),
                    );
                    return Box::pin(async move { Err(err) });
                }
            },
            None => self
                .policy
                .order(&self.engines, &msg.request)
                .into_iter()
                .map(|i| self.engines[i].clone())
                .collect(),
        };
        Box::pin(async move {
            if candidates.is_empty() {
                return Err(ApiError::new(
                    ErrorClass::Unavailable,
                    "Service temporarily unavailable",
                ));
            }
            // Try the preferred engine first; an engine whose admission queue is full passes the request on.
            let mut last_error = None;
            for slot in candidates {
                let generate = Generate {
                    request: msg.request.clone(),
                    output: msg.output.clone(),
                };
                match slot.addr.send(generate).await {
                    Ok(Ok(())) => return Ok(slot.id),
                    Ok(Err(e)) => last_error = Some(e),
                    Err(mailbox) => {
                        last_error = Some(ApiError::new(
                            ErrorClass::Unavailable,
                            format!("Engine {} unreachable: {mailbox}", slot.id),
                        ))
                    }
                }
            }
            Err(last_error.unwrap_or_else(|| {
                ApiError::new(ErrorClass::Unavailable, "Service temporarily unavailable")
            }))
        })
    }
}
