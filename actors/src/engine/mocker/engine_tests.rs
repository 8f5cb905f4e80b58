//! End-to-end tests: `MockerEngine::generate` through a real [`TokenSink`] on an actix (LocalSet)
//! runtime. Simulated time is sped up 1000× so a test takes milliseconds; nothing asserts on wall time.

use std::sync::atomic::Ordering;

use super::*;
use crate::engine::EngineLoad;
use crate::error::ErrorClass;
use crate::kv::hashing::{local_block_hashes, sequence_hashes};
use crate::kv::protocol::{KvCacheEventData, RouterEvent};
use crate::protocol::engine::{EngineEvent, StopConditions};

const VOCAB: [u32; 3] = [7, 8, 9];

fn fast() -> MockerConfig {
    MockerConfig {
        num_gpu_blocks: 64,
        block_size: 4,
        speedup_ratio: 1000.0,
        default_max_tokens: 6,
        ..MockerConfig::default()
    }
}

fn mocker(
    config: MockerConfig,
) -> (
    MockerEngine,
    mpsc::UnboundedReceiver<RouterEvent>,
    Arc<MockerLoad>,
) {
    let (events, received) = mpsc::unbounded_channel();
    let load = Arc::new(MockerLoad::default());
    let engine = MockerEngine::new(config, 42, Arc::from(VOCAB), Some(events), load.clone());
    (engine, received, load)
}

fn request(id: &str, tokens: Vec<u32>, max_tokens: Option<u32>) -> EngineRequest {
    EngineRequest {
        request_id: id.into(),
        model: "m".into(),
        token_ids: tokens,
        echo_text: String::new(),
        sampling: Default::default(),
        stop: StopConditions {
            max_tokens,
            ..Default::default()
        },
        pinned_engine: None,
        resumed_outputs: 0,
    }
}

fn token_sink(capacity: usize) -> (TokenSink, mpsc::Receiver<EngineEvent>, Arc<EngineLoad>) {
    let (tx, rx) = mpsc::channel(capacity);
    let load = Arc::new(EngineLoad::default());
    (TokenSink::new(tx, load.clone()), rx, load)
}

async fn collect(mut rx: mpsc::Receiver<EngineEvent>) -> Vec<EngineEvent> {
    let mut all = Vec::new();
    while let Some(event) = rx.recv().await {
        all.push(event);
    }
    all
}

fn outputs(events: Vec<EngineEvent>) -> Vec<EngineOutput> {
    events
        .into_iter()
        .map(|event| event.expect("no error"))
        .collect()
}

#[actix_rt::test]
async fn generate_streams_max_tokens_then_length() {
    let (mut engine, mut events, load) = mocker(fast());
    let (sink, rx, engine_load) = token_sink(64);
    engine
        .generate(request("r1", (0..10).collect(), Some(5)), sink)
        .await;
    let outs = outputs(collect(rx).await);
    assert_eq!(outs.len(), 5);
    assert!(outs
        .iter()
        .all(|o| o.token_ids.len() == 1 && VOCAB.contains(&o.token_ids[0]) && o.text.is_none()));
    assert!(outs[..4].iter().all(|o| o.finish_reason.is_none()));
    assert_eq!(outs[4].finish_reason, Some(FinishReason::Length));
    assert_eq!(engine_load.generated_tokens.load(Ordering::Relaxed), 5);

    // The prompt's full blocks were announced to the router under this worker's id.
    let first = events.recv().await.unwrap();
    assert_eq!(first.worker_id, 42);
    assert_eq!(first.event.event_id, 0);
    let seqs = sequence_hashes(&local_block_hashes(&(0..10).collect::<Vec<_>>(), 4));
    let KvCacheEventData::Stored(stored) = first.event.data else {
        panic!("expected stored, got {first:?}");
    };
    assert_eq!(stored.parent_hash, None);
    assert_eq!(
        stored
            .blocks
            .iter()
            .map(|b| b.block_hash)
            .collect::<Vec<_>>(),
        seqs
    );
    let second = events.recv().await.unwrap();
    assert_eq!(second.event.event_id, 1, "event ids count up");

    assert_eq!((load.running_requests(), load.waiting_requests()), (0, 0));
    assert_eq!(load.active_decode_blocks(), 0);
    // 14 computed tokens: 3 full blocks stay cached.
    assert_eq!(load.inactive_blocks(), 3);
    assert!(engine.shared.scheduler.borrow().is_idle());
}

#[actix_rt::test]
async fn tokens_are_deterministic_per_request_id_and_default_max_tokens_applies() {
    let tokens_of = |id: &'static str| async move {
        let (mut engine, _events, _load) = mocker(fast());
        let (sink, rx, _) = token_sink(64);
        engine
            .generate(request(id, vec![1, 2, 3], None), sink)
            .await;
        outputs(collect(rx).await)
            .into_iter()
            .flat_map(|o| o.token_ids)
            .collect::<Vec<_>>()
    };
    let a = tokens_of("same").await;
    assert_eq!(a.len(), 6, "default_max_tokens");
    assert_eq!(a, tokens_of("same").await);
}

#[actix_rt::test]
async fn concurrent_requests_sharing_a_prefix_all_finish() {
    let (mut engine, _events, load) = mocker(fast());
    // A first request caches the prefix; requests admitted in the same step as it could not hit.
    let (sink, rx, _) = token_sink(64);
    engine
        .generate(request("warm", (0..16).collect(), Some(1)), sink)
        .await;
    assert_eq!(outputs(collect(rx).await).len(), 1);
    let mut handles = Vec::new();
    for i in 0..4u32 {
        let (sink, rx, _) = token_sink(4);
        let mut tokens: Vec<u32> = (0..16).collect();
        tokens.push(1000 + i);
        let run = engine.generate(request(&format!("r{i}"), tokens, Some(8)), sink);
        handles.push(tokio::task::spawn_local(run));
        handles.push(tokio::task::spawn_local(async move {
            let outs = outputs(collect(rx).await);
            assert_eq!(outs.len(), 8);
            assert_eq!(outs[7].finish_reason, Some(FinishReason::Length));
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    assert_eq!(load.running_requests(), 0);
    assert!(
        load.prefix_hit_rate() > 0.0,
        "later requests hit the shared prefix"
    );
}

#[actix_rt::test]
async fn a_consumer_leaving_frees_the_request() {
    let (mut engine, _events, load) = mocker(fast());
    let (sink, mut rx, engine_load) = token_sink(1);
    let shared = engine.shared.clone();
    let run =
        tokio::task::spawn_local(engine.generate(request("r", (0..10).collect(), Some(200)), sink));
    assert!(rx.recv().await.is_some());
    drop(rx);
    run.await.unwrap();
    assert!(shared.scheduler.borrow().is_idle());
    assert_eq!(shared.scheduler.borrow().active_blocks(), 0);
    assert_eq!(load.running_requests(), 0);
    assert_eq!(load.active_decode_blocks(), 0);
    assert_eq!(engine_load.cancelled.load(Ordering::Relaxed), 1);
    assert!(shared.outputs.borrow().is_empty());
}

#[actix_rt::test]
async fn dropping_the_future_frees_the_request() {
    // Real-time speed: the request cannot finish within the timeout.
    let (mut engine, _events, load) = mocker(MockerConfig {
        speedup_ratio: 1.0,
        ..fast()
    });
    let (sink, _rx, _) = token_sink(64);
    let run = engine.generate(request("r", (0..10).collect(), Some(200)), sink);
    let timed_out = tokio::time::timeout(Duration::from_millis(30), run).await;
    assert!(timed_out.is_err());
    let scheduler = engine.shared.scheduler.borrow();
    assert!(scheduler.is_idle());
    assert_eq!(scheduler.active_blocks(), 0);
    assert_eq!(load.running_requests(), 0);
}

#[actix_rt::test]
async fn the_driver_stops_when_idle_and_restarts_on_demand() {
    let (mut engine, _events, _load) = mocker(fast());
    for round in 0..2 {
        let (sink, rx, _) = token_sink(64);
        engine
            .generate(
                request(&format!("r{round}"), vec![1, 2, 3, 4, 5], Some(2)),
                sink,
            )
            .await;
        assert_eq!(outputs(collect(rx).await).len(), 2);
        // Let the driver observe that nothing is left.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!engine.shared.driver_running.get());
    }
}

#[actix_rt::test]
async fn impossible_requests_fail_with_a_validation_error() {
    let (mut engine, _events, load) = mocker(fast());
    let (sink, rx, _) = token_sink(4);
    engine.generate(request("r", vec![], Some(1)), sink).await;
    let events = collect(rx).await;
    assert_eq!(events.len(), 1);
    let error = events[0].clone().unwrap_err();
    assert_eq!(error.class, ErrorClass::Validation);
    assert!(error.message.contains("empty"), "{}", error.message);

    let (sink, rx, _) = token_sink(4);
    engine
        .generate(request("r", vec![1; 300], Some(1)), sink)
        .await;
    let error = collect(rx).await[0].clone().unwrap_err();
    assert!(
        error.message.contains("num_gpu_blocks"),
        "{}",
        error.message
    );
    assert_eq!(load.waiting_requests(), 0);
}

#[actix_rt::test]
async fn an_invalid_config_is_sanitized_not_a_panic() {
    let (mut engine, _events, _load) = mocker(MockerConfig {
        block_size: 0,
        num_gpu_blocks: 0,
        speedup_ratio: f64::NAN,
        ..fast()
    });
    let (sink, rx, _) = token_sink(4);
    engine.generate(request("r", vec![1], Some(1)), sink).await;
    assert_eq!(outputs(collect(rx).await).len(), 1);
}

#[actix_rt::test]
async fn no_events_without_a_sender_or_without_prefix_caching() {
    let load = Arc::new(MockerLoad::default());
    let mut quiet = MockerEngine::new(fast(), 1, Arc::from(VOCAB), None, load);
    let (sink, rx, _) = token_sink(64);
    quiet
        .generate(request("r", (0..8).collect(), Some(2)), sink)
        .await;
    assert_eq!(outputs(collect(rx).await).len(), 2);

    let (mut engine, mut events, _load) = mocker(MockerConfig {
        enable_prefix_caching: false,
        ..fast()
    });
    let (sink, rx, _) = token_sink(64);
    engine
        .generate(request("r", (0..8).collect(), Some(2)), sink)
        .await;
    assert_eq!(outputs(collect(rx).await).len(), 2);
    assert!(events.try_recv().is_err());
}
