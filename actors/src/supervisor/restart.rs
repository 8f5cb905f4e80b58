//! Restart policy shared by every supervised actor: a budget of restarts in a sliding window, and the
//! events a supervised actor reports to the root [`Supervisor`](super::Supervisor).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

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
    pub fn validate(&self) -> Result<(), String> {
        if !(self.restart_window_secs.is_finite() && self.restart_window_secs > 0.0) {
            return Err(format!(
                "supervisor.restart_window_secs = {} must be a positive number of seconds",
                self.restart_window_secs
            ));
        }
        Ok(())
    }

    /// The window as a duration.
    pub fn window(&self) -> Duration {
        Duration::from_secs_f64(self.restart_window_secs)
    }
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

    /// Failures recorded in the current window.
    pub fn recent(&self) -> usize {
        self.history.len()
    }
}

/// What supervised actors tell the root supervisor.
#[derive(Clone, Debug, PartialEq)]
pub enum SupervisorEvent {
    /// `actor` `instance` panicked and was restarted.
    Restarted {
        /// `engine`, `router` or `validator`.
        actor: &'static str,
        /// Which one (an engine's instance id; `0` for singletons).
        instance: String,
        /// What went wrong.
        reason: String,
    },
    /// An engine spent its restart budget: take it out of routing.
    EngineFailed {
        /// Its instance id.
        engine_id: u64,
        /// Why, for `/health`.
        reason: String,
    },
}

/// Where supervised actors send [`SupervisorEvent`]s.
pub type SupervisorEvents = mpsc::UnboundedSender<SupervisorEvent>;

/// The error a request gets when `actor` panicked while handling it and is being restarted: retryable
/// (the request never reached an engine), marked so that callers can tell it from other failures.
pub fn restarted_error(actor: &'static str, while_doing: &str) -> crate::error::ApiError {
    crate::error::ApiError::new(
        crate::error::ErrorClass::Unavailable,
        format!("{actor} restarted after a fault while {while_doing} this request"),
    )
    .with_details(serde_json::json!({"actor": actor, "restarted": true}))
}

/// Which actor's restart `error` reports (see [`restarted_error`]), if it is such an error.
pub fn restarted_actor(error: &crate::error::ApiError) -> Option<&str> {
    let details = error.details.as_ref()?;
    (details["restarted"] == true)
        .then(|| details["actor"].as_str())
        .flatten()
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
    fn restart_errors_name_their_actor_and_nothing_else_matches() {
        let error = restarted_error("router", "routing");
        assert_eq!(restarted_actor(&error), Some("router"));
        assert!(error.class.is_migratable());
        assert!(error.message.contains("while routing"), "{}", error.message);
        let other = crate::error::ApiError::new(crate::error::ErrorClass::Unavailable, "x")
            .with_details(serde_json::json!({"actor": "router"}));
        assert_eq!(restarted_actor(&other), None);
    }

    #[test]
    fn a_bad_window_is_named() {
        let config = SupervisionConfig {
            restart_window_secs: 0.0,
            ..SupervisionConfig::default()
        };
        assert!(config
            .validate()
            .unwrap_err()
            .contains("supervisor.restart_window_secs"));
    }
}
