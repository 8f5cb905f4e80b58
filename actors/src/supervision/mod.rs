//! Supervision primitives, at the bottom of the crate: what every supervised actor shares, and
//! nothing of the actors themselves (this module imports no actor).
//!
//! - [`ActorKind`]: the typed identity of a supervised actor (metrics label, restart signal, logs).
//! - [`SupervisionConfig`] and [`RestartBudget`]: how many restarts a window allows.
//! - [`RestartTracker`]: the restart bookkeeping one supervised actor carries: its budget, the reason
//!   it is stopping, whether it was given up on, and the [`SupervisorEvent`]s it reports to the root.
//!   Engines, the router, validators and the embedding engine all use it instead of their own copies.
//! - [`panic_message`]: the text of a caught panic.
//!
//! - [`tree`]: the tree as declared (subtrees, strategies, start order) and its live state
//!   (intensities, rest-for-one resyncs, the timeline), still without naming an actor type.
//!
//! The wiring (which function starts each kind, and the root actor that hears the events) is
//! [`crate::supervisor`].

pub mod tree;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Every kind of actor the tree supervises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    /// An HTTP worker of the actix-web server.
    Http,
    /// A ValidatorActor thread.
    Validator,
    /// The KvRouterActor.
    Router,
    /// The KV prefix index's writer.
    Indexer,
    /// An EngineActor (one per device).
    Engine,
    /// The embedding model's actor.
    Embeddings,
    /// The GPU memory service.
    MemoryService,
    /// The TCP request plane: a worker's endpoint server, or a frontend's response-stream server.
    RequestPlane,
    /// The event plane on NATS: a worker's KV-event and load publishers, or a frontend's intake.
    Events,
    /// Discovery in etcd: a worker's registration under its lease, or a frontend's watch, instance
    /// managers, model catalog and lanes.
    Discovery,
}

impl ActorKind {
    /// The name used in metrics labels, logs and error details (`engine`, `router`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Http => "http",
            ActorKind::Validator => "validator",
            ActorKind::Router => "router",
            ActorKind::Indexer => "indexer",
            ActorKind::Engine => "engine",
            ActorKind::Embeddings => "embeddings",
            ActorKind::MemoryService => "memory_service",
            ActorKind::RequestPlane => "request_plane",
            ActorKind::Events => "events",
            ActorKind::Discovery => "discovery",
        }
    }
}

impl std::fmt::Display for ActorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[supervisor]`: how often a failing actor may be restarted before it is given up on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisionConfig {
    /// Restarts allowed within `restart_window_secs`; one more and the actor is given up on (an engine
    /// is taken out of routing and reported unhealthy).
    pub max_restarts: u32,
    /// The sliding window for `max_restarts`, in seconds.
    pub restart_window_secs: f64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            max_restarts: 5,
            restart_window_secs: 60.0,
        }
    }
}

impl SupervisionConfig {
    /// Checks ranges; the message names the key.
    pub fn validate(&self) -> Result<(), SupervisionError> {
        if !(self.restart_window_secs.is_finite() && self.restart_window_secs > 0.0) {
            return Err(SupervisionError::Window(self.restart_window_secs));
        }
        Ok(())
    }

    /// The window as a duration.
    pub fn window(&self) -> Duration {
        Duration::from_secs_f64(self.restart_window_secs)
    }
}

/// Why a `[supervisor]` setting was refused; the message names the key.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum SupervisionError {
    /// `restart_window_secs` is not a positive, finite number.
    #[error("supervisor.restart_window_secs = {0} must be a positive number of seconds")]
    Window(f64),
}

/// Restarts in the last window; see [`SupervisionConfig`].
#[derive(Debug)]
pub struct RestartBudget {
    max: u32,
    window: Duration,
    history: VecDeque<Instant>,
}

impl RestartBudget {
    /// A fresh budget.
    pub fn new(config: &SupervisionConfig) -> Self {
        RestartBudget {
            max: config.max_restarts,
            window: config.window(),
            history: VecDeque::new(),
        }
    }

    /// Records a failure at `now`; true when a restart is still within budget.
    pub fn allow(&mut self, now: Instant) -> bool {
        while self
            .history
            .front()
            .is_some_and(|&t| now.duration_since(t) > self.window)
        {
            self.history.pop_front();
        }
        self.history.push_back(now);
        self.history.len() <= self.max as usize
    }

    /// Changes how many restarts the window allows.
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// Failures recorded in the current window.
    pub fn recent(&self) -> usize {
        self.history.len()
    }
}

/// What supervised actors tell the root supervisor.
#[derive(Clone, Debug, PartialEq)]
pub enum SupervisorEvent {
    /// `actor` `instance` failed and was restarted.
    Restarted {
        /// Which kind of actor.
        actor: ActorKind,
        /// Which one (an engine's instance id; `0` for singletons; a validator's thread).
        instance: String,
        /// What went wrong.
        reason: String,
    },
    /// An actor the process cannot serve without spent its restart budget: the failure goes up to
    /// the root, which stops the process with a non-zero exit naming the actor and the last error.
    Escalated(Escalation),
    /// A request left a failed engine and continues on another (for the timeline).
    Migrated {
        /// The request.
        request_id: String,
        /// The engine it left.
        from_engine: u64,
        /// Where it continues; `None` when no engine took it (the client got the error).
        to_engine: Option<u64>,
        /// `engine_error`, `engine_stopped` or `stalled`.
        cause: &'static str,
    },
    /// An engine spent its restart budget: take it out of routing.
    EngineFailed {
        /// Its instance id.
        engine_id: u64,
        /// Why, for `/health`.
        reason: String,
    },
}

/// A failure that went past an actor's restart intensity, on its way to the root.
#[derive(Clone, Debug, PartialEq)]
pub struct Escalation {
    /// Which kind of actor.
    pub actor: ActorKind,
    /// Which one.
    pub instance: String,
    /// Failures within the restart window, the last one included.
    pub failures: usize,
    /// The last failure.
    pub last_error: String,
    /// The subtree whose intensity was exceeded; `None` when the actor's own budget was.
    pub subtree: Option<tree::Subtree>,
}

impl std::fmt::Display for Escalation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.subtree {
            None => write!(
                f,
                "{} {} failed {} times within its restart window; last error: {}",
                self.actor, self.instance, self.failures, self.last_error
            ),
            Some(subtree) => write!(
                f,
                "the {subtree} subtree went past its restart intensity ({} failures within its window), the last of {} {}; last error: {}",
                self.failures, self.actor, self.instance, self.last_error
            ),
        }
    }
}

/// A restart budget shared by the instances of one actor that their host re-creates on its own
/// (the validator threads of a SyncArbiter), so a new instance does not start a new budget.
pub type SharedBudget = Arc<Mutex<RestartBudget>>;

/// A [`SharedBudget`] for `config`.
pub fn shared_budget(config: &SupervisionConfig) -> SharedBudget {
    Arc::new(Mutex::new(RestartBudget::new(config)))
}

/// Where supervised actors send [`SupervisorEvent`]s.
pub type SupervisorEvents = mpsc::UnboundedSender<SupervisorEvent>;

/// What a supervised actor does about a failure it caught ([`RestartTracker::on_failure`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within budget: stop now; the restart (`Supervised::restarting`) rebuilds the state and reports.
    Restart,
    /// Past the budget: `failures` in the window. The actor says why in its own words and calls
    /// [`RestartTracker::give_up`].
    GiveUp {
        /// Failures in the current window, this one included.
        failures: usize,
    },
    /// The actor is already stopping for an earlier failure, or was given up on: nothing more to do.
    AlreadyHandled,
}

/// The restart bookkeeping of one supervised actor.
#[derive(Debug)]
pub struct RestartTracker {
    actor: ActorKind,
    instance: String,
    /// `None`: every failure restarts.
    budget: Option<SharedBudget>,
    events: Option<SupervisorEvents>,
    /// Why the actor is stopping, reported once it restarts.
    stopping_because: Option<String>,
    /// The budget is spent: why, for every later request.
    given_up: Option<String>,
}

impl RestartTracker {
    /// Bookkeeping for `actor` `instance`, with no budget and nobody to report to yet.
    pub fn new(actor: ActorKind, instance: impl Into<String>) -> Self {
        RestartTracker {
            actor,
            instance: instance.into(),
            budget: None,
            events: None,
            stopping_because: None,
            given_up: None,
        }
    }

    /// Limits restarts to `config`'s budget.
    pub fn with_budget(self, config: &SupervisionConfig) -> Self {
        self.with_shared_budget(shared_budget(config))
    }

    /// Limits restarts to a budget shared with the actor's other instances.
    pub fn with_shared_budget(mut self, budget: SharedBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Reports restarts to `events` (the root supervisor).
    pub fn reporting_to(mut self, events: SupervisorEvents) -> Self {
        self.events = Some(events);
        self
    }

    /// Puts the actor under the tree: `config`'s restart intensity, reporting to `events`.
    pub fn supervise(&mut self, config: &SupervisionConfig, events: SupervisorEvents) {
        self.budget = Some(shared_budget(config));
        self.events = Some(events);
    }

    /// A failure was caught (`reason`): restart within budget, else give up.
    pub fn on_failure(&mut self, reason: String) -> Verdict {
        if self.given_up.is_some() || self.stopping_because.is_some() {
            return Verdict::AlreadyHandled;
        }
        if let Some(budget) = &self.budget {
            // A poisoned lock still holds a usable history: a panic cannot leave it half-written.
            let mut budget = budget
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !budget.allow(Instant::now()) {
                return Verdict::GiveUp {
                    failures: budget.recent(),
                };
            }
        }
        self.stopping_because = Some(reason);
        Verdict::Restart
    }

    /// Marks the actor as given up on, with the reason every later request gets.
    pub fn give_up(&mut self, reason: String) {
        self.given_up = Some(reason);
    }

    /// Why the actor was given up on, if it was.
    pub fn given_up(&self) -> Option<&str> {
        self.given_up.as_deref()
    }

    /// In `Supervised::restarting`: the reason when this restart follows a caught failure (`None`
    /// for any other stop, and after giving up). The actor rebuilds its state, then tells the root
    /// with [`Self::report_restarted`].
    pub fn on_restart(&mut self) -> Option<String> {
        let reason = self.stopping_because.take()?;
        self.given_up.is_none().then_some(reason)
    }

    /// Reports a restart to the root as [`SupervisorEvent::Restarted`] (after the state is
    /// rebuilt, or when the actor's host restarts it on its own, as a SyncArbiter does).
    pub fn report_restarted(&self, reason: String) {
        if let Some(events) = &self.events {
            let _ = events.send(SupervisorEvent::Restarted {
                actor: self.actor,
                instance: self.instance.clone(),
                reason,
            });
        }
    }

    /// Gives up (with `reason` for every later request) and escalates the failure to the root.
    pub fn escalate(&mut self, failures: usize, last_error: String) -> Escalation {
        let escalation = Escalation {
            actor: self.actor,
            instance: self.instance.clone(),
            failures,
            last_error,
            subtree: None,
        };
        self.given_up = Some(escalation.to_string());
        self.report(SupervisorEvent::Escalated(escalation.clone()));
        escalation
    }

    /// A failure (`reason`) that cost only the work it hit: the actor carries on as it is, with
    /// nothing to rebuild (an HTTP worker thread, the memory service's tables, the request plane's
    /// other streams). Counted and reported as a restart within budget; past it, escalated.
    pub fn resume_after(&mut self, reason: String) {
        match self.on_failure(reason.clone()) {
            Verdict::Restart => {
                self.on_restart();
                self.report_restarted(reason);
            }
            Verdict::GiveUp { failures } => {
                self.escalate(failures, reason);
            }
            Verdict::AlreadyHandled => {}
        }
    }

    /// Sends `event` to the root, if anyone listens.
    pub fn report(&self, event: SupervisorEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }
}

/// Watches a spawned task of `tracker`'s child (a publisher, an event intake). A panic in it cannot
/// be resumed from (the task owned its channel), so it is escalated: the root stops the process,
/// naming the child and the panic, and whatever runs the process starts it again. A task that
/// returns, or is stopped through the returned handle, is not a failure.
pub fn watch_task(
    task: tokio::task::JoinHandle<()>,
    mut tracker: RestartTracker,
) -> tokio::task::AbortHandle {
    let stop = task.abort_handle();
    tokio::spawn(async move {
        if let Err(error) = task.await {
            if error.is_panic() {
                let reason = panic_message(&*error.into_panic());
                tracing::error!(actor = %tracker.actor, %reason, "task panicked");
                tracker.escalate(1, reason);
            }
        }
    });
    stop
}

/// Runs `f`, turning a panic into `Err` with its message: the one way a supervised actor catches
/// the failure of a unit of work (the actor then asks its [`RestartTracker`] what to do).
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|payload| panic_message(&*payload))
}

/// The message of a caught panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_max_restarts_per_window() {
        let mut budget = RestartBudget::new(&SupervisionConfig {
            max_restarts: 2,
            restart_window_secs: 10.0,
        });
        let t0 = Instant::now();
        assert!(budget.allow(t0));
        assert!(budget.allow(t0 + Duration::from_secs(1)));
        assert!(!budget.allow(t0 + Duration::from_secs(2)), "third in 10 s");
        // Old failures leave the window.
        assert!(budget.allow(t0 + Duration::from_secs(30)));
        assert_eq!(budget.recent(), 1);
    }

    #[test]
    fn zero_restarts_gives_up_at_the_first_failure() {
        let mut budget = RestartBudget::new(&SupervisionConfig {
            max_restarts: 0,
            ..SupervisionConfig::default()
        });
        assert!(!budget.allow(Instant::now()));
    }

    #[test]
    fn panic_messages_are_recovered() {
        let caught = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(panic_message(&*caught), "boom 7");
        let caught = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(&*caught), "static");
    }

    #[test]
    fn caught_panics_become_their_message() {
        assert_eq!(catch_panic(|| 3), Ok(3));
        assert_eq!(
            catch_panic(|| -> u8 { panic!("at {}", 4) }),
            Err("at 4".into())
        );
    }

    #[test]
    fn a_bad_window_is_named() {
        let config = SupervisionConfig {
            restart_window_secs: 0.0,
            ..SupervisionConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert_eq!(err, SupervisionError::Window(0.0));
        assert!(
            err.to_string().contains("supervisor.restart_window_secs"),
            "{err}"
        );
    }

    #[test]
    fn the_tracker_restarts_within_budget_reports_once_and_then_gives_up() {
        let (events, mut received) = mpsc::unbounded_channel();
        let mut tracker = RestartTracker::new(ActorKind::Engine, "7")
            .with_budget(&SupervisionConfig {
                max_restarts: 1,
                restart_window_secs: 60.0,
            })
            .reporting_to(events);
        assert_eq!(tracker.on_failure("first".into()), Verdict::Restart);
        // A second failure while stopping is the same incident.
        assert_eq!(tracker.on_failure("again".into()), Verdict::AlreadyHandled);
        assert_eq!(tracker.on_restart(), Some("first".into()));
        assert!(
            received.try_recv().is_err(),
            "reported once the state is rebuilt"
        );
        tracker.report_restarted("first".into());
        assert_eq!(
            received.try_recv().unwrap(),
            SupervisorEvent::Restarted {
                actor: ActorKind::Engine,
                instance: "7".into(),
                reason: "first".into()
            }
        );
        // A stop that did not follow a failure is no restart to report.
        assert_eq!(tracker.on_restart(), None);
        assert!(received.try_recv().is_err());
        assert_eq!(
            tracker.on_failure("second".into()),
            Verdict::GiveUp { failures: 2 }
        );
        tracker.give_up("out of service".into());
        assert_eq!(tracker.given_up(), Some("out of service"));
        assert_eq!(tracker.on_failure("third".into()), Verdict::AlreadyHandled);
    }

    #[test]
    fn a_shared_budget_spans_instances_and_escalation_names_the_actor_and_error() {
        let (events, mut received) = mpsc::unbounded_channel();
        let budget = shared_budget(&SupervisionConfig {
            max_restarts: 1,
            restart_window_secs: 60.0,
        });
        let mut first = RestartTracker::new(ActorKind::Validator, "t1")
            .with_shared_budget(budget.clone())
            .reporting_to(events.clone());
        assert_eq!(first.on_failure("a".into()), Verdict::Restart);
        // The host re-creates the actor: a new instance, the same budget.
        let mut second = RestartTracker::new(ActorKind::Validator, "t2")
            .with_shared_budget(budget)
            .reporting_to(events);
        let Verdict::GiveUp { failures } = second.on_failure("b".into()) else {
            panic!("the second failure in the window must give up");
        };
        let escalation = second.escalate(failures, "b".into());
        assert_eq!(
            escalation.to_string(),
            "validator t2 failed 2 times within its restart window; last error: b"
        );
        assert_eq!(second.given_up(), Some(escalation.to_string().as_str()));
        assert_eq!(
            received.try_recv().unwrap(),
            SupervisorEvent::Escalated(escalation)
        );
    }

    #[test]
    fn without_a_budget_every_failure_restarts() {
        let mut tracker = RestartTracker::new(ActorKind::Router, "0");
        for n in 0..20 {
            assert_eq!(tracker.on_failure(format!("{n}")), Verdict::Restart);
            assert_eq!(tracker.on_restart(), Some(format!("{n}")));
        }
    }

    #[test]
    fn kinds_have_stable_names() {
        assert_eq!(ActorKind::Engine.to_string(), "engine");
        assert_eq!(ActorKind::MemoryService.as_str(), "memory_service");
        assert_eq!(
            serde_json::to_value(ActorKind::Validator).unwrap(),
            serde_json::json!("validator")
        );
    }

    #[actix_rt::test]
    async fn a_watched_task_that_panics_is_escalated_and_a_stopped_one_is_not() {
        let (events, mut reports) = mpsc::unbounded_channel();
        let tracker = || {
            RestartTracker::new(ActorKind::Events, "0")
                .with_budget(&SupervisionConfig::default())
                .reporting_to(events.clone())
        };
        let stop = watch_task(tokio::spawn(std::future::pending()), tracker());
        stop.abort();
        watch_task(tokio::spawn(async { panic!("publisher broke") }), tracker());
        match tokio::time::timeout(Duration::from_secs(5), reports.recv()).await {
            Ok(Some(SupervisorEvent::Escalated(escalation))) => {
                assert_eq!(escalation.actor, ActorKind::Events);
                assert!(
                    escalation.last_error.contains("publisher broke"),
                    "{escalation:?}"
                );
            }
            other => panic!("expected an escalation, got {other:?}"),
        }
        assert!(
            reports.try_recv().is_err(),
            "the stopped task reported nothing"
        );
    }
}
