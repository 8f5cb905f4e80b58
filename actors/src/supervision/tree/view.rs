//! How the tree is shown: the snapshot message the root answers, the link that reaches it, and the
//! serializable views of the tree and its timeline.

use serde::Serialize;

use super::{ChildState, Strategy};
use crate::supervision::ActorKind;

/// One entry of the restart and migration timeline.
#[derive(Clone, Debug, Serialize)]
pub struct TimelineEntry {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `restarted`, `given_up`, `escalated`, `resynced`, `removed` or `migrated`.
    pub event: &'static str,
    /// The actor kind.
    pub actor: ActorKind,
    /// Which one.
    pub instance: String,
    /// Why, or what happened.
    pub detail: String,
}

/// Asks the root for the tree as it stands and its recent timeline (`/dashboard`). Declared here so
/// that the HTTP side can hold a `Recipient` without importing the root that supervises it.
#[derive(actix::Message)]
#[rtype(result = "TreeSnapshot")]
pub struct Snapshot;

/// Where the root can be asked for a [`Snapshot`] (set once it runs), and a signal it raises each
/// time the tree or its timeline changes, so watchers need not poll.
#[derive(Clone, Default)]
pub struct SupervisorLink {
    root: std::sync::Arc<std::sync::OnceLock<actix::Recipient<Snapshot>>>,
    changed: std::sync::Arc<tokio::sync::Notify>,
}

impl SupervisorLink {
    /// Points the link at the running root.
    pub fn set(&self, root: actix::Recipient<Snapshot>) {
        let _ = self.root.set(root);
    }

    /// The tree as it stands; `None` before the root runs or after it stopped.
    pub async fn snapshot(&self) -> Option<TreeSnapshot> {
        self.root.get()?.send(Snapshot).await.ok()
    }

    /// The root saw a change.
    pub fn notify(&self) {
        self.changed.notify_waiters();
    }

    /// Resolves at the next change.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}

/// The answer to [`Snapshot`].
#[derive(Clone, Debug, Serialize)]
pub struct TreeSnapshot {
    /// The tree.
    pub tree: TreeView,
    /// Restarts, resyncs, removals, migrations and escalations, oldest first.
    pub timeline: Vec<TimelineEntry>,
}

/// One node of [`Tree::view`]: a subtree (with `strategy`) or an actor (with `actor` and `state`).
#[derive(Clone, Debug, Serialize)]
pub struct TreeView {
    /// `engines`, or `engine 0`.
    pub name: String,
    /// The actor's kind (actors only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<ActorKind>,
    /// The subtree's strategy (subtrees only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// The actor's state (actors only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<ChildState>,
    /// Restarts (a subtree's: its children's total).
    pub restarts: u64,
    /// The last failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Messages waiting in the actor's mailbox, where it can be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<usize>,
    /// Nested subtrees and actors, in start order.
    pub children: Vec<TreeView>,
}
