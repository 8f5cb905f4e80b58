//! The supervision tree: its declared shape ([`TREE`]) and its live state ([`Tree`]).
//!
//! ```text
//! root (one-for-one)
//! ├── memory   (one-for-one)  memory_service
//! ├── kv       (rest-for-one) indexer, engines
//! │   └── engines (one-for-one) engine × devices
//! ├── serving  (one-for-one)  router, validator × threads, embeddings
//! └── http     (one-for-one)  http
//! ```
//!
//! Children start in the order of a depth-first walk of [`TREE`] and stop in the reverse order.
//! Each actor restarts itself in place (its own [`super::RestartTracker`]); the tree applies the
//! strategy of the subtree the actor sits in, and counts the restart against the intensity of every
//! subtree on its path:
//! - **one-for-one**: nothing else is touched.
//! - **rest-for-one**: every later child of that subtree (nested ones included) whose state derives
//!   from the restarted one is re-synchronised: a restarted indexer starts from an empty index, so
//!   the engines after it send their current blocks again.
//! - **intensity**: a subtree whose children together restart more than `max_restarts` times per
//!   actor beneath it within `restart_window_secs` escalates to the root, which stops the process
//!   with a non-zero exit naming the subtree, the actor and the last error. A subtree whose children
//!   were all given up on (no engine left) escalates too.
//!
//! Nothing here knows an actor's type: a child is its kind, its instance, and closures to stop it,
//! re-synchronise it and read its mailbox depth. [`crate::supervisor`] does the wiring.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::LocalBoxFuture;
use serde::Serialize;

use super::{ActorKind, Escalation, RestartBudget, SupervisionConfig};

mod spec;
mod view;

use spec::placement;
pub use spec::{spec, start_order, Slot, Strategy, Subtree, SubtreeSpec, TREE};
pub use view::{Snapshot, SupervisorLink, TimelineEntry, TreeSnapshot, TreeView};

/// The instance name of a child that stands for a pool of interchangeable actors.
pub const POOL: &str = "pool";

/// How a started child is stopped (awaited in reverse start order).
pub type StopFn = Box<dyn FnOnce() -> LocalBoxFuture<'static, ()>>;

/// A started child as the tree holds it.
pub struct Child {
    /// Its kind.
    pub kind: ActorKind,
    /// Which one (an engine's id; `0` for singletons).
    pub instance: String,
    stop: Option<StopFn>,
    resync: Option<Box<dyn Fn()>>,
    mailbox: Option<Box<dyn Fn() -> usize>>,
    state: ChildState,
    restarts: u64,
    last_error: Option<String>,
}

impl Child {
    /// A child of `kind`; stopping it does nothing until [`Self::stopped_by`] says how.
    pub fn new(kind: ActorKind, instance: impl Into<String>) -> Self {
        Child {
            kind,
            instance: instance.into(),
            stop: None,
            resync: None,
            mailbox: None,
            state: ChildState::Running,
            restarts: 0,
            last_error: None,
        }
    }

    /// How to stop it.
    pub fn stopped_by(
        mut self,
        stop: impl FnOnce() -> LocalBoxFuture<'static, ()> + 'static,
    ) -> Self {
        self.stop = Some(Box::new(stop));
        self
    }

    /// What it does when an earlier sibling of a rest-for-one subtree restarts.
    pub fn resynced_by(mut self, resync: impl Fn() + 'static) -> Self {
        self.resync = Some(Box::new(resync));
        self
    }

    /// How to read its mailbox depth (messages queued, for the dashboard).
    pub fn mailbox(mut self, depth: impl Fn() -> usize + 'static) -> Self {
        self.mailbox = Some(Box::new(depth));
        self
    }
}

/// A child's state as the root knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildState {
    /// Serving.
    Running,
    /// Past its restart budget and out of service.
    GivenUp,
    /// Stopped by a shutdown or by an operator (an engine removed).
    Stopped,
}

/// What the root must do after a child's event.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Nothing more.
    Contained,
    /// The failure went past a subtree's intensity: stop the process.
    Escalate(Escalation),
}

/// Entries kept in the timeline.
const TIMELINE_LIMIT: usize = 200;

/// The live tree: every started child in start order, each subtree's restart intensity, and the
/// recent timeline.
pub struct Tree {
    config: SupervisionConfig,
    /// Started children with their order keys.
    children: Vec<(Vec<usize>, Child)>,
    intensity: BTreeMap<Subtree, RestartBudget>,
    timeline: VecDeque<TimelineEntry>,
}

impl Tree {
    /// An empty tree whose subtrees allow `config`'s restarts per actor beneath them.
    pub fn new(config: &SupervisionConfig) -> Self {
        Tree {
            config: config.clone(),
            children: Vec::new(),
            intensity: BTreeMap::new(),
            timeline: VecDeque::new(),
        }
    }

    /// Adds a started child at its declared place (after its already started siblings of the same
    /// kind). A kind missing from [`TREE`] is a programming error, reported and kept last.
    pub fn add(&mut self, child: Child) {
        let key = match placement(child.kind) {
            Some(path) => path.into_iter().map(|(_, i)| i).collect(),
            None => {
                tracing::error!(actor = %child.kind, "actor kind missing from the declared tree");
                vec![usize::MAX]
            }
        };
        let at = self.children.partition_point(|(k, _)| *k <= key);
        self.children.insert(at, (key, child));
    }

    /// Started children in start order.
    pub fn children(&self) -> impl Iterator<Item = &Child> {
        self.children.iter().map(|(_, c)| c)
    }

    /// The child `kind` `instance`, or the pool of that kind (validator threads, whose host
    /// re-creates them under new names).
    fn position(&self, kind: ActorKind, instance: &str) -> Option<usize> {
        self.children
            .iter()
            .position(|(_, c)| c.kind == kind && (c.instance == instance || c.instance == POOL))
    }

    fn record(&mut self, event: &'static str, actor: ActorKind, instance: &str, detail: String) {
        if self.timeline.len() == TIMELINE_LIMIT {
            self.timeline.pop_front();
        }
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as u64;
        self.timeline.push_back(TimelineEntry {
            at_ms,
            event,
            actor,
            instance: instance.to_string(),
            detail,
        });
    }

    /// Actors beneath `subtree` (started ones; at least one).
    fn population(&self, subtree: Subtree) -> usize {
        self.children
            .iter()
            .filter(|(_, c)| {
                placement(c.kind).is_some_and(|path| path.iter().any(|(s, _)| *s == subtree))
            })
            .count()
            .max(1)
    }

    /// `kind` `instance` restarted after `reason`: apply its subtree's strategy and count it against
    /// every subtree on its path.
    pub fn on_restarted(&mut self, kind: ActorKind, instance: &str, reason: &str) -> Outcome {
        self.record("restarted", kind, instance, reason.to_string());
        let Some(at) = self.position(kind, instance) else {
            return self.charge(kind, instance, reason);
        };
        {
            let child = &mut self.children[at].1;
            child.restarts += 1;
            child.last_error = Some(reason.to_string());
        }
        // Rest-for-one: the later children of the subtree that holds this one re-synchronise.
        let path = placement(kind).unwrap_or_default();
        if let Some(&(subtree, slot)) = path.last() {
            if spec(subtree).strategy == Strategy::RestForOne {
                let depth = path.len() - 1;
                let later: Vec<usize> = (0..self.children.len())
                    .filter(|&i| {
                        let key = &self.children[i].0;
                        key.len() > depth
                            && key[..depth] == self.children[at].0[..depth]
                            && key[depth] > slot
                    })
                    .collect();
                for i in later {
                    let child = &self.children[i].1;
                    if child.state != ChildState::Running {
                        continue;
                    }
                    if let Some(resync) = &child.resync {
                        resync();
                        let (k, inst) = (child.kind, child.instance.clone());
                        self.record("resynced", k, &inst, format!("{kind} {instance} restarted"));
                    }
                }
            }
        }
        self.charge(kind, instance, reason)
    }

    /// Counts one restart against the intensity of each subtree on `kind`'s path, innermost first.
    fn charge(&mut self, kind: ActorKind, instance: &str, reason: &str) -> Outcome {
        let now = Instant::now();
        for (subtree, _) in placement(kind).unwrap_or_default().into_iter().rev() {
            let allowed = self.config.max_restarts as usize * self.population(subtree);
            let budget = self.intensity.entry(subtree).or_insert_with(|| {
                RestartBudget::new(&SupervisionConfig {
                    max_restarts: 0,
                    restart_window_secs: self.config.restart_window_secs,
                })
            });
            // The allowance grows with the subtree (engines join and leave).
            budget.set_max(allowed as u32);
            if !budget.allow(now) {
                let escalation = Escalation {
                    actor: kind,
                    instance: instance.to_string(),
                    failures: budget.recent(),
                    last_error: reason.to_string(),
                    subtree: Some(subtree),
                };
                self.record("escalated", kind, instance, escalation.to_string());
                return Outcome::Escalate(escalation);
            }
        }
        Outcome::Contained
    }

    /// `kind` `instance` spent its own restart budget and is out of service. A subtree left with no
    /// running child escalates.
    pub fn on_given_up(&mut self, kind: ActorKind, instance: &str, reason: &str) -> Outcome {
        self.record("given_up", kind, instance, reason.to_string());
        if let Some(at) = self.position(kind, instance) {
            let child = &mut self.children[at].1;
            child.state = ChildState::GivenUp;
            child.last_error = Some(reason.to_string());
        }
        let any_running = self
            .children()
            .any(|c| c.kind == kind && c.state == ChildState::Running);
        if any_running {
            return Outcome::Contained;
        }
        let subtree = placement(kind)
            .and_then(|p| p.last().map(|(s, _)| *s))
            .unwrap_or(Subtree::Root);
        let escalation = Escalation {
            actor: kind,
            instance: instance.to_string(),
            failures: self.children().filter(|c| c.kind == kind).count(),
            last_error: format!("no {kind} left in service; last failure: {reason}"),
            subtree: Some(subtree),
        };
        self.record("escalated", kind, instance, escalation.to_string());
        Outcome::Escalate(escalation)
    }

    /// Takes `kind` `instance` out of the tree (an engine removed): returns how to stop it.
    pub fn remove(&mut self, kind: ActorKind, instance: &str) -> Option<StopFn> {
        let at = self.position(kind, instance)?;
        let (_, mut child) = self.children.remove(at);
        self.record("removed", kind, instance, "taken out of service".into());
        child.state = ChildState::Stopped;
        child.stop.take()
    }

    /// How to stop `kind` `instance`, taken so it runs once (a given-up engine's thread stops while
    /// the tree keeps showing it as given up).
    pub fn take_stop(&mut self, kind: ActorKind, instance: &str) -> Option<StopFn> {
        let at = self.position(kind, instance)?;
        self.children[at].1.stop.take()
    }

    /// Records a request migration in the timeline.
    pub fn on_migrated(&mut self, request_id: &str, from: u64, to: Option<u64>, cause: &str) {
        let detail = match to {
            Some(to) => format!("request {request_id} moved to engine {to} ({cause})"),
            None => format!("request {request_id} found no engine to continue on ({cause})"),
        };
        self.record("migrated", ActorKind::Engine, &from.to_string(), detail);
    }

    /// Records an escalation that an actor raised itself (past its own budget).
    pub fn on_escalated(&mut self, escalation: &Escalation) {
        self.record(
            "escalated",
            escalation.actor,
            &escalation.instance,
            escalation.to_string(),
        );
        if let Some(at) = self.position(escalation.actor, &escalation.instance) {
            self.children[at].1.state = ChildState::GivenUp;
        }
    }

    /// Stops every child, last started first.
    pub async fn stop(&mut self) {
        while let Some((_, mut child)) = self.children.pop() {
            if let Some(stop) = child.stop.take() {
                stop().await;
            }
            tracing::debug!(actor = %child.kind, instance = %child.instance, "stopped");
        }
    }

    /// A picture of the tree for `/dashboard`.
    pub fn view(&self) -> TreeView {
        fn build(tree: &Tree, subtree: Subtree) -> TreeView {
            let spec = spec(subtree);
            let mut children = Vec::new();
            for slot in spec.children {
                match *slot {
                    Slot::Actor(kind) => {
                        children.extend(tree.children().filter(|c| c.kind == kind).map(|c| {
                            TreeView {
                                name: format!("{} {}", c.kind, c.instance),
                                actor: Some(c.kind),
                                strategy: None,
                                state: Some(c.state),
                                restarts: c.restarts,
                                last_error: c.last_error.clone(),
                                mailbox: c.mailbox.as_ref().map(|depth| depth()),
                                children: Vec::new(),
                            }
                        }))
                    }
                    Slot::Subtree(nested) => children.push(build(tree, nested)),
                }
            }
            TreeView {
                name: subtree.as_str().into(),
                actor: None,
                strategy: Some(spec.strategy),
                state: None,
                restarts: children.iter().map(|c| c.restarts).sum(),
                last_error: None,
                mailbox: None,
                children,
            }
        }
        build(self, Subtree::Root)
    }

    /// The recent restarts, resyncs, removals and escalations, oldest first.
    pub fn timeline(&self) -> Vec<TimelineEntry> {
        self.timeline.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests;
