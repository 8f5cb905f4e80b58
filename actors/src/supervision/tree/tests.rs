use std::cell::RefCell;
use std::rc::Rc;

use futures_util::FutureExt;

use super::*;

fn config(max_restarts: u32) -> SupervisionConfig {
    SupervisionConfig {
        max_restarts,
        restart_window_secs: 60.0,
    }
}

/// A child that logs its stop and resync into `log`.
fn child(kind: ActorKind, instance: &str, log: &Rc<RefCell<Vec<String>>>) -> Child {
    let (stop_log, resync_log) = (log.clone(), log.clone());
    let name = format!("{kind} {instance}");
    let resync_name = name.clone();
    Child::new(kind, instance)
        .stopped_by(move || {
            async move { stop_log.borrow_mut().push(format!("stop {name}")) }.boxed_local()
        })
        .resynced_by(move || {
            resync_log
                .borrow_mut()
                .push(format!("resync {resync_name}"))
        })
}

#[test]
fn start_order_is_a_depth_first_walk_of_the_declaration() {
    assert_eq!(
        start_order(),
        vec![
            ActorKind::MemoryService,
            ActorKind::Indexer,
            ActorKind::Engine,
            ActorKind::Router,
            ActorKind::Validator,
            ActorKind::Embeddings,
            ActorKind::Events,
            ActorKind::RequestPlane,
            ActorKind::Discovery,
            ActorKind::Http,
        ]
    );
}

#[test]
fn every_subtree_is_declared_once() {
    for subtree in [
        Subtree::Root,
        Subtree::Memory,
        Subtree::Kv,
        Subtree::Engines,
        Subtree::Serving,
        Subtree::Cluster,
        Subtree::Http,
    ] {
        let declared = TREE.iter().filter(|s| s.subtree == subtree).count();
        assert_eq!(declared, 1, "{subtree}");
    }
}

#[test]
fn every_actor_kind_of_a_process_has_a_place() {
    for kind in start_order() {
        assert!(placement(kind).is_some(), "{kind}");
    }
}

#[test]
fn children_stop_in_reverse_start_order_whatever_order_they_were_added_in() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut tree = Tree::new(&config(5));
    tree.add(child(ActorKind::Http, "0", &log));
    tree.add(child(ActorKind::Engine, "0", &log));
    tree.add(child(ActorKind::Router, "0", &log));
    tree.add(child(ActorKind::Engine, "1", &log));
    tree.add(child(ActorKind::Indexer, "0", &log));
    tree.stop().now_or_never().expect("stops at once");
    assert_eq!(
        *log.borrow(),
        vec![
            "stop http 0",
            "stop router 0",
            "stop engine 1",
            "stop engine 0",
            "stop indexer 0",
        ]
    );
    assert_eq!(tree.children().count(), 0);
}

#[test]
fn a_restarted_indexer_resyncs_the_engines_after_it_and_nothing_else() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut tree = Tree::new(&config(5));
    for kind in [ActorKind::Indexer, ActorKind::Router, ActorKind::Http] {
        tree.add(child(kind, "0", &log));
    }
    tree.add(child(ActorKind::Engine, "0", &log));
    tree.add(child(ActorKind::Engine, "1", &log));
    assert_eq!(
        tree.on_restarted(ActorKind::Indexer, "0", "boom"),
        Outcome::Contained
    );
    assert_eq!(*log.borrow(), vec!["resync engine 0", "resync engine 1"]);
    // One-for-one: an engine's restart touches no sibling, nor does the router's.
    log.borrow_mut().clear();
    tree.on_restarted(ActorKind::Engine, "0", "boom");
    tree.on_restarted(ActorKind::Router, "0", "boom");
    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
    let view = tree.view();
    let kv = view.children.iter().find(|c| c.name == "kv").unwrap();
    assert_eq!(kv.strategy, Some(Strategy::RestForOne));
    assert_eq!(kv.restarts, 2, "the indexer's and engine 0's");
    let events: Vec<&str> = tree.timeline().iter().map(|e| e.event).collect();
    assert_eq!(
        events,
        vec![
            "restarted",
            "resynced",
            "resynced",
            "restarted",
            "restarted"
        ]
    );
}

#[test]
fn a_subtree_escalates_past_its_intensity() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut tree = Tree::new(&config(2));
    tree.add(child(ActorKind::Engine, "0", &log));
    tree.add(child(ActorKind::Engine, "1", &log));
    tree.add(child(ActorKind::Router, "0", &log));
    // The engines subtree allows 2 per engine: 4 restarts among them.
    for i in 0..4 {
        let instance = (i % 2).to_string();
        assert_eq!(
            tree.on_restarted(ActorKind::Engine, &instance, "boom"),
            Outcome::Contained,
            "restart {i}"
        );
    }
    let Outcome::Escalate(escalation) = tree.on_restarted(ActorKind::Engine, "1", "the fifth")
    else {
        panic!("the fifth restart escalates");
    };
    assert_eq!(escalation.subtree, Some(Subtree::Engines));
    assert_eq!(escalation.failures, 5);
    assert_eq!(
        escalation.to_string(),
        "the engines subtree went past its restart intensity (5 failures within its window), the last of engine 1; last error: the fifth"
    );
}

#[test]
fn a_subtree_with_every_child_given_up_escalates() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut tree = Tree::new(&config(5));
    tree.add(child(ActorKind::Engine, "0", &log));
    tree.add(child(ActorKind::Engine, "1", &log));
    assert_eq!(
        tree.on_given_up(ActorKind::Engine, "0", "cuda error"),
        Outcome::Contained
    );
    let Outcome::Escalate(escalation) = tree.on_given_up(ActorKind::Engine, "1", "cuda error")
    else {
        panic!("no engine left escalates");
    };
    assert_eq!(escalation.subtree, Some(Subtree::Engines));
    assert!(
        escalation.last_error.contains("no engine left"),
        "{escalation}"
    );
}

#[test]
fn a_pool_registered_as_one_child_is_found_by_kind() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut tree = Tree::new(&config(5));
    tree.add(child(ActorKind::Validator, POOL, &log));
    tree.on_restarted(ActorKind::Validator, "ThreadId(7)", "boom");
    let restarts: Vec<u64> = tree.children().map(|c| c.restarts).collect();
    assert_eq!(restarts, vec![1]);
}

#[test]
fn a_removed_child_leaves_the_tree_and_returns_its_stop() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut tree = Tree::new(&config(5));
    tree.add(child(ActorKind::Engine, "0", &log));
    tree.add(child(ActorKind::Engine, "1", &log));
    let stop = tree
        .remove(ActorKind::Engine, "0")
        .expect("engine 0 is there");
    stop().now_or_never().expect("stops at once");
    assert_eq!(*log.borrow(), vec!["stop engine 0"]);
    assert!(tree.remove(ActorKind::Engine, "0").is_none());
    assert_eq!(tree.children().count(), 1);
}
