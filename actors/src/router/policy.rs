//! Selection policies: given the engines and a request, the order in which to offer it.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{EngineSlot, RouterConfig, RouterMode};
use crate::error::{ApiError, ErrorClass};
use crate::protocol::engine::EngineRequest;

/// Orders engines for one request; the router offers the request in that order until one admits it.
pub trait SelectionPolicy: Send {
    /// Indices into `engines`, preferred first.
    fn order(&mut self, engines: &[EngineSlot], request: &EngineRequest) -> Vec<usize>;
}

/// The policy for `config.mode`.
pub fn for_mode(config: &RouterConfig) -> Result<Box<dyn SelectionPolicy>, ApiError> {
    match config.mode {
        RouterMode::RoundRobin => Ok(Box::new(RoundRobin::default())),
        RouterMode::Random => Ok(Box::new(Random::new(config.seed))),
        RouterMode::Kv => Err(ApiError::new(
            ErrorClass::NotImplemented,
            "router mode `kv` needs the KV-aware router, which this build does not include yet; use `round-robin` or `random`",
        )),
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
    fn kv_mode_is_rejected_with_a_clear_message() {
        let config = RouterConfig {
            mode: RouterMode::Kv,
            seed: None,
        };
        let err = for_mode(&config)
            .err()
            .map(|e| e.message)
            .unwrap_or_default();
        assert!(err.contains("router mode `kv`"), "{err}");
    }
}
