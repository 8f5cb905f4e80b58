//! Selection policies: given the engines and a request, the order in which to offer it.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use std::sync::Arc;

use super::kv::KvPolicy;
use super::{EngineSlot, RouterConfig, RouterMode};
use crate::engine::RequestStage;
use crate::error::{ApiError, ErrorClass};
use crate::kv::indexer::SharedKvIndex;
use crate::metrics::FrontendMetrics;
use crate::protocol::engine::EngineRequest;

/// Orders engines for one request; the router offers the request in that order until one admits it.
/// The other methods tell a stateful policy what became of its choices; they default to nothing.
pub trait SelectionPolicy: Send {
    /// Indices into `engines`, preferred first.
    fn order(&mut self, engines: &[EngineSlot], request: &EngineRequest) -> Vec<usize>;

    /// `engine` admitted the request `request_id` (the last one ordered). Returns the prompt tokens the policy
    /// expects that engine to find cached, when it knows.
    fn admitted(&mut self, _engine: &EngineSlot, _request_id: &str) -> Option<u32> {
        None
    }

    /// A request admitted on `engine_id` reached `stage`.
    fn progress(&mut self, _engine_id: u64, _request_id: &str, _stage: RequestStage) {}

    /// The engine is gone; forget everything about it.
    fn engine_removed(&mut self, _engine_id: u64) {}

    /// A new engine joined (a worker process registered).
    fn engine_added(&mut self, _engine: &EngineSlot) {}
}

/// What the `kv` policy needs beyond the config.
#[derive(Clone)]
pub struct KvContext {
    /// The engines' KV block size in tokens.
    pub block_size: usize,
    /// The shared prefix index.
    pub index: SharedKvIndex,
    /// Where router gauges and overhead histograms go.
    pub metrics: Option<Arc<FrontendMetrics>>,
}

/// The policy for `config.mode`.
pub fn for_mode(
    config: &RouterConfig,
    engines: &[EngineSlot],
    kv: Option<KvContext>,
) -> Result<Box<dyn SelectionPolicy>, ApiError> {
    match config.mode {
        RouterMode::RoundRobin => Ok(Box::new(RoundRobin::default())),
        RouterMode::Random => Ok(Box::new(Random::new(config.seed))),
        RouterMode::Kv => {
            let kv = kv.ok_or_else(|| {
                ApiError::new(
                    ErrorClass::Internal,
                    "router mode `kv` was started without a KV index",
                )
            })?;
            if kv.block_size < 2 {
                return Err(ApiError::new(
                    ErrorClass::Internal,
                    format!(
                        "KV block size must be at least 2 tokens, got {}",
                        kv.block_size
                    ),
                ));
            }
            Ok(Box::new(KvPolicy::new(
                config,
                kv.block_size,
                engines,
                kv.index,
                kv.metrics,
            )))
        }
    }
}

fn rotated(len: usize, start: usize) -> Vec<usize> {
    (0..len).map(|i| (start + i) % len).collect()
}

/// Rotate through the engines.
#[derive(Default)]
pub struct RoundRobin {
    next: usize,
}

impl SelectionPolicy for RoundRobin {
    fn order(&mut self, engines: &[EngineSlot], _request: &EngineRequest) -> Vec<usize> {
        if engines.is_empty() {
            return Vec::new();
        }
        let start = self.next % engines.len();
        self.next = self.next.wrapping_add(1);
        rotated(engines.len(), start)
    }
}

/// Uniformly random first choice.
pub struct Random {
    rng: SmallRng,
}

impl Random {
    /// Seeded for reproducibility, or from entropy.
    pub fn new(seed: Option<u64>) -> Self {
        Random {
            rng: seed
                .map(SmallRng::seed_from_u64)
                .unwrap_or_else(SmallRng::from_entropy),
        }
    }
}

impl SelectionPolicy for Random {
    fn order(&mut self, engines: &[EngineSlot], _request: &EngineRequest) -> Vec<usize> {
        if engines.is_empty() {
            return Vec::new();
        }
        let start = self.rng.gen_range(0..engines.len());
        rotated(engines.len(), start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_covers_all_engines() {
        assert_eq!(rotated(3, 1), vec![1, 2, 0]);
        assert_eq!(rotated(1, 0), vec![0]);
    }

    #[test]
    fn kv_mode_needs_its_index() {
        let config = RouterConfig {
            mode: RouterMode::Kv,
            ..RouterConfig::default()
        };
        let err = for_mode(&config, &[], None)
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(err.contains("router mode `kv`"), "{err}");
    }
}
