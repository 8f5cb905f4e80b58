//! The KV-cache-aware selection policy (runtime spec §3): for each request, the prefix overlap every
//! engine holds (read straight from the shared prefix index, no mailbox hop) against the load the
//! router predicts for it (active sequences), through Dynamo's cost function and softmax selection.
//!
//! The policy lives inside [`super::KvRouterActor`], the single owner of the per-engine
//! [`ActiveSequences`]: they change only on this actor's thread (a request is added when an engine
//! admits it, prefill completes at its first token, it is freed when its stream ends), and nothing
//! else — health checks included — resets them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::policy::SelectionPolicy;
use super::{EngineSlot, RouterConfig};
use crate::engine::RequestStage;
use crate::kv::active::ActiveSequences;
use crate::kv::approx::{ApproxRecorder, PruneConfig};
use crate::kv::hashing::{local_block_hashes, sequence_hashes, LocalBlockHash, SequenceHash};
use crate::kv::indexer::{OverlapScores, SharedKvIndex};
use crate::kv::selector::{select, WorkerState};
use crate::metrics::{FrontendMetrics, RouterPhase};
use crate::protocol::engine::EngineRequest;

/// What the policy decided for the request it last ordered, kept until an engine admits it.
struct Decision {
    request_id: String,
    sequence: Vec<SequenceHash>,
    locals: Vec<LocalBlockHash>,
    isl: usize,
    scores: OverlapScores,
}

/// KV-aware selection.
pub struct KvPolicy {
    index: SharedKvIndex,
    block_size: usize,
    overlap_score_weight: f64,
    temperature: f64,
    track_active_blocks: bool,
    active: HashMap<u64, ActiveSequences>,
    /// Approximate mode: the router's own record of what it routed where (no KV events).
    approx: Option<ApproxRecorder>,
    rng: SmallRng,
    last: Option<Decision>,
    metrics: Option<Arc<FrontendMetrics>>,
    router_id: String,
}

impl KvPolicy {
    /// A policy over `engines` reading `index`. In approximate mode (`use_kv_events = false`) the
    /// policy also writes the index, with its own routing decisions.
    pub fn new(
        config: &RouterConfig,
        block_size: usize,
        engines: &[EngineSlot],
        index: SharedKvIndex,
        metrics: Option<Arc<FrontendMetrics>>,
    ) -> Self {
        let approx = (!config.use_kv_events).then(|| {
            ApproxRecorder::new(PruneConfig {
                ttl: Duration::from_secs_f64(config.ttl_secs),
                max_tree_size: config.max_tree_size,
                prune_target_ratio: config.prune_target_ratio,
            })
        });
        let policy = KvPolicy {
            index,
            block_size,
            overlap_score_weight: config.kv_overlap_score_weight,
            temperature: config.temperature,
            track_active_blocks: config.track_active_blocks,
            active: engines
                .iter()
                .map(|e| (e.id, ActiveSequences::new(block_size)))
                .collect(),
            approx,
            rng: config
                .seed
                .map(SmallRng::seed_from_u64)
                .unwrap_or_else(SmallRng::from_entropy),
            last: None,
            metrics,
            router_id: uuid::Uuid::new_v4().to_string(),
        };
        for engine in engines {
            policy.publish_load(engine.id);
        }
        policy
    }

    fn publish_load(&self, engine: u64) {
        if let (Some(metrics), Some(active)) = (&self.metrics, self.active.get(&engine)) {
            metrics.set_worker_load(engine, active.active_blocks(), active.active_tokens());
        }
    }

    fn observe(&self, phase: RouterPhase, started: Instant) {
        if let Some(metrics) = &self.metrics {
            metrics.observe_router_overhead(
                &self.router_id,
                phase,
                started.elapsed().as_secs_f64() * 1e3,
            );
        }
    }

    /// Applies expired approximate-mode entries to the index.
    fn expire(&mut self, now: Instant) {
        let Some(approx) = &mut self.approx else {
            return;
        };
        for event in approx.expire(now) {
            if let Err(e) = self.index.apply(&event) {
                tracing::debug!(error = %e, "approximate-mode expiry");
            }
        }
    }
}

impl SelectionPolicy for KvPolicy {
    fn order(&mut self, engines: &[EngineSlot], request: &EngineRequest) -> Vec<usize> {
        if engines.is_empty() {
            return Vec::new();
        }
        let started = Instant::now();
        self.expire(started);
        let locals = local_block_hashes(&request.token_ids, self.block_size);
        let sequence = if self.track_active_blocks {
            sequence_hashes(&locals)
        } else {
            Vec::new()
        };
        self.observe(RouterPhase::BlockHashing, started);

        let matching = Instant::now();
        let scores = self.index.find_matches(&locals, false);
        self.observe(RouterPhase::FindMatches, matching);

        let scheduling = Instant::now();
        let isl = request.token_ids.len();
        let states: Vec<WorkerState> = engines
            .iter()
            .map(|engine| {
                let overlap = scores.scores.get(&engine.id).copied().unwrap_or(0);
                let (potential_blocks, potential_tokens) = match self.active.get(&engine.id) {
                    Some(active) => active.potential_blocks_and_tokens(&sequence, isl, overlap),
                    None => (isl.div_ceil(self.block_size), isl),
                };
                WorkerState {
                    worker: engine.id,
                    potential_blocks,
                    potential_tokens,
                }
            })
            .collect();
        let chosen = select(
            &states,
            &scores,
            isl,
            self.block_size,
            self.overlap_score_weight,
            self.temperature,
            &mut self.rng,
        );
        tracing::debug!(
            request = %request.request_id,
            blocks = locals.len(),
            overlaps = ?scores.scores,
            chosen = ?chosen.as_ref().map(|c| c.worker),
            "kv routing decision"
        );
        // The chosen engine first; should it be full, the others from cheapest to dearest.
        let logits =
            crate::kv::selector::logits(&states, self.block_size, self.overlap_score_weight);
        let mut order: Vec<usize> = (0..engines.len()).collect();
        order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
        if let Some(chosen) = chosen {
            if let Some(position) = engines.iter().position(|e| e.id == chosen.worker) {
                order.retain(|&i| i != position);
                order.insert(0, position);
            }
        }
        self.observe(RouterPhase::Scheduling, scheduling);
        self.observe(RouterPhase::Total, started);
        self.last = Some(Decision {
            request_id: request.request_id.clone(),
            sequence,
            locals,
            isl,
            scores,
        });
        order
    }

    fn admitted(&mut self, engine: &EngineSlot, request_id: &str) -> Option<u32> {
        let decision = self.last.take().filter(|d| d.request_id == request_id)?;
        let overlap = decision.scores.scores.get(&engine.id).copied().unwrap_or(0);
        let now = Instant::now();
        if let Some(active) = self.active.get_mut(&engine.id) {
            if let Err(e) =
                active.add_request(request_id, decision.sequence, decision.isl, overlap, now)
            {
                tracing::warn!(engine = engine.id, %request_id, error = %e, "active sequence tracking");
            }
        }
        if let Some(approx) = &mut self.approx {
            let event = approx.record(engine.id, &decision.locals, now);
            if let Err(e) = self.index.apply(&event) {
                tracing::debug!(error = %e, "approximate-mode record");
            }
        }
        self.publish_load(engine.id);
        let cached = (overlap as usize * self.block_size).min(decision.isl);
        Some(cached as u32)
    }

    fn progress(&mut self, engine_id: u64, request_id: &str, stage: RequestStage) {
        let Some(active) = self.active.get_mut(&engine_id) else {
            return;
        };
        match stage {
            RequestStage::FirstToken => active.mark_prefill_completed(request_id),
            RequestStage::Finished => active.free(request_id),
        }
        self.publish_load(engine_id);
    }

    fn engine_removed(&mut self, engine_id: u64) {
        self.active.remove(&engine_id);
        if let Some(approx) = &mut self.approx {
            // In approximate mode this policy is the index's only writer; with KV events the
            // indexer actor owns it and purges the engine itself.
            approx.remove_worker(engine_id);
            self.index.remove_worker(engine_id);
        }
        if let Some(metrics) = &self.metrics {
            metrics.remove_worker(engine_id);
        }
    }

    fn engine_added(&mut self, engine: &EngineSlot) {
        self.active
            .insert(engine.id, ActiveSequences::new(self.block_size));
        self.publish_load(engine.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineLoad, Generate};
    use crate::kv::hashing::chain;
    use crate::kv::protocol::{
        KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent,
    };
    use crate::router::RouterMode;
    use actix::{Actor, Context, Handler};

    const BLOCK: usize = 16;

    /// Receives nothing in these tests: the policy only needs engine ids.
    struct Nowhere;
    impl Actor for Nowhere {
        type Context = Context<Self>;
    }
    impl Handler<Generate> for Nowhere {
        type Result = ();
        fn handle(&mut self, _: Generate, _: &mut Context<Self>) {}
    }

    fn engines(n: u64) -> Vec<EngineSlot> {
        let addr = Nowhere.start().recipient();
        (1..=n)
            .map(|id| EngineSlot {
                id,
                addr: addr.clone(),
                direct: None,
                load: Arc::new(EngineLoad::default()),
                capacity: 1024,
                device: format!("sim:{id}"),
            })
            .collect()
    }

    fn request(id: usize, tokens: Vec<u32>) -> EngineRequest {
        EngineRequest {
            request_id: format!("r{id}"),
            model: "m".into(),
            token_ids: tokens,
            echo_text: String::new(),
            sampling: Default::default(),
            stop: Default::default(),
            pinned_engine: None,
            resumed_outputs: 0,
        }
    }

    /// `engine` announces it holds every full block of `tokens` (as its KV events would).
    fn holds(index: &SharedKvIndex, engine: u64, tokens: &[u32]) {
        let locals = local_block_hashes(tokens, BLOCK);
        let mut parent = None;
        let blocks = locals
            .iter()
            .map(|&local| {
                let hash = chain(parent, local);
                parent = Some(hash);
                KvCacheStoredBlockData {
                    block_hash: hash,
                    tokens_hash: local,
                }
            })
            .collect();
        index
            .apply(&RouterEvent {
                worker_id: engine,
                event: KvCacheEvent {
                    event_id: 0,
                    data: KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: None,
                        blocks,
                    }),
                    dp_rank: 0,
                },
            })
            .expect("stored event applies");
    }

    /// A skewed trace: every request is one long shared prefix (held by engine 2 only) plus a short
    /// suffix of its own. Each request finishes its prefill before the next arrives; `finish` says
    /// whether it also ends (otherwise it keeps decoding, holding its blocks).
    fn replay_skewed(requests: usize, finish: bool) -> HashMap<u64, usize> {
        let config = RouterConfig {
            mode: RouterMode::Kv,
            seed: Some(7),
            ..RouterConfig::default()
        };
        let slots = engines(4);
        let index = SharedKvIndex::new();
        let prefix: Vec<u32> = (0..32 * BLOCK as u32).collect();
        holds(&index, 2, &prefix);
        let mut policy = KvPolicy::new(&config, BLOCK, &slots, index, None);
        let mut landed = HashMap::new();
        for i in 0..requests {
            let mut tokens = prefix.clone();
            tokens.extend((0..4 * BLOCK as u32).map(|t| 100_000 + (i as u32) * 1000 + t));
            let request = request(i, tokens);
            let order = policy.order(&slots, &request);
            let chosen = &slots[order[0]];
            policy.admitted(chosen, &request.request_id);
            *landed.entry(chosen.id).or_default() += 1;
            policy.progress(chosen.id, &request.request_id, RequestStage::FirstToken);
            if finish {
                policy.progress(chosen.id, &request.request_id, RequestStage::Finished);
            }
        }
        landed
    }

    #[actix_rt::test]
    async fn an_idle_cluster_follows_the_cache() {
        let landed = replay_skewed(40, true);
        assert_eq!(landed.get(&2), Some(&40), "{landed:?}");
    }

    #[actix_rt::test]
    async fn a_saturated_preferred_engine_loses_to_load() {
        // Requests pile up (none finishes): the engine holding the prefix takes them until its
        // decode load outweighs the 32 blocks of prefill it saves, then the others take their share.
        // A hot spot would send all 200 to engine 2, as the idle case above does.
        let landed = replay_skewed(200, false);
        assert_eq!(landed.len(), 4, "every engine takes work: {landed:?}");
        for (engine, &count) in &landed {
            assert!(
                (40..=65).contains(&count),
                "engine {engine} got {count} of 200 requests: {landed:?}"
            );
        }
        let busiest = landed.values().copied().max().unwrap_or(0);
        assert_eq!(
            landed[&2], busiest,
            "the cache holder is the busiest: {landed:?}"
        );
    }
}
