//! The tree's declared shape: subtrees, their strategies and the order of their children.

use serde::Serialize;

use crate::supervision::ActorKind;

/// What a subtree does when one of its children restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Only the failed child restarts.
    OneForOne,
    /// The failed child restarts and every later child re-synchronises with it.
    RestForOne,
}

/// The subtrees of the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subtree {
    /// The root supervisor.
    Root,
    /// The GPU memory service.
    Memory,
    /// The KV index and the engines that feed it.
    Kv,
    /// One child per device.
    Engines,
    /// Validators, router, embeddings: the request path in front of the engines.
    Serving,
    /// A frontend's or worker's link to the cluster: discovery, events, the request plane.
    Cluster,
    /// The actix-web server.
    Http,
}

impl Subtree {
    /// Its name in logs, metrics and the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            Subtree::Root => "root",
            Subtree::Memory => "memory",
            Subtree::Kv => "kv",
            Subtree::Engines => "engines",
            Subtree::Serving => "serving",
            Subtree::Cluster => "cluster",
            Subtree::Http => "http",
        }
    }
}

impl std::fmt::Display for Subtree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One slot of a subtree, in start order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// Every instance of an actor kind.
    Actor(ActorKind),
    /// A nested subtree.
    Subtree(Subtree),
}

/// One subtree as declared.
#[derive(Debug)]
pub struct SubtreeSpec {
    /// Which one.
    pub subtree: Subtree,
    /// What a child's restart does to its siblings.
    pub strategy: Strategy,
    /// Its children, in start order.
    pub children: &'static [Slot],
}

/// The tree, declared once: who starts before whom, and each subtree's strategy.
pub const TREE: &[SubtreeSpec] = &[
    SubtreeSpec {
        subtree: Subtree::Root,
        strategy: Strategy::OneForOne,
        children: &[
            Slot::Subtree(Subtree::Memory),
            Slot::Subtree(Subtree::Kv),
            Slot::Subtree(Subtree::Serving),
            // After serving (it routes to the router), before HTTP: a frontend's response streams
            // must outlive the HTTP drain, and a worker leaves discovery before its engines stop.
            Slot::Subtree(Subtree::Cluster),
            Slot::Subtree(Subtree::Http),
        ],
    },
    SubtreeSpec {
        subtree: Subtree::Memory,
        strategy: Strategy::OneForOne,
        children: &[Slot::Actor(ActorKind::MemoryService)],
    },
    SubtreeSpec {
        subtree: Subtree::Kv,
        strategy: Strategy::RestForOne,
        children: &[
            Slot::Actor(ActorKind::Indexer),
            Slot::Subtree(Subtree::Engines),
        ],
    },
    SubtreeSpec {
        subtree: Subtree::Engines,
        strategy: Strategy::OneForOne,
        children: &[Slot::Actor(ActorKind::Engine)],
    },
    SubtreeSpec {
        subtree: Subtree::Serving,
        strategy: Strategy::OneForOne,
        children: &[
            Slot::Actor(ActorKind::Router),
            Slot::Actor(ActorKind::Validator),
            Slot::Actor(ActorKind::Embeddings),
        ],
    },
    SubtreeSpec {
        subtree: Subtree::Cluster,
        strategy: Strategy::OneForOne,
        // Stopped in reverse: leave discovery first, then drain the request plane, then stop the
        // event plane (the running requests' KV events still go out while they finish).
        children: &[
            Slot::Actor(ActorKind::Events),
            Slot::Actor(ActorKind::RequestPlane),
            Slot::Actor(ActorKind::Discovery),
        ],
    },
    SubtreeSpec {
        subtree: Subtree::Http,
        strategy: Strategy::OneForOne,
        children: &[Slot::Actor(ActorKind::Http)],
    },
];

/// What an undeclared subtree is treated as: no children (a test keeps every subtree declared).
const UNDECLARED: SubtreeSpec = SubtreeSpec {
    subtree: Subtree::Root,
    strategy: Strategy::OneForOne,
    children: &[],
};

/// The declaration of `subtree`.
pub fn spec(subtree: Subtree) -> &'static SubtreeSpec {
    TREE.iter()
        .find(|s| s.subtree == subtree)
        .unwrap_or(&UNDECLARED)
}

/// Where `kind` sits: the subtrees from the root down to its own, each with the index of the slot
/// taken on the way (the order key of its children).
pub(super) fn placement(kind: ActorKind) -> Option<Vec<(Subtree, usize)>> {
    fn walk(subtree: Subtree, kind: ActorKind, path: &mut Vec<(Subtree, usize)>) -> bool {
        for (i, slot) in spec(subtree).children.iter().enumerate() {
            path.push((subtree, i));
            let found = match *slot {
                Slot::Actor(k) => k == kind,
                Slot::Subtree(nested) => walk(nested, kind, path),
            };
            if found {
                return true;
            }
            path.pop();
        }
        false
    }
    let mut path = Vec::new();
    walk(Subtree::Root, kind, &mut path).then_some(path)
}

/// The actor kinds in start order (a depth-first walk of [`TREE`]).
pub fn start_order() -> Vec<ActorKind> {
    fn walk(subtree: Subtree, out: &mut Vec<ActorKind>) {
        for slot in spec(subtree).children {
            match *slot {
                Slot::Actor(kind) => out.push(kind),
                Slot::Subtree(nested) => walk(nested, out),
            }
        }
    }
    let mut out = Vec::new();
    walk(Subtree::Root, &mut out);
    out
}
