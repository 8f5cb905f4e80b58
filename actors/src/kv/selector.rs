//! The cost function and worker selection (runtime spec §3.5, Dynamo's `DefaultWorkerSelector`).
//!
//! Each candidate's cost (its *logit*, lower is better) is the prefill it would still have to do, in
//! blocks and weighted by `overlap_score_weight`, plus the blocks it would hold:
//! `weight × potential_tokens / block_size + potential_blocks`, normalized by the largest. A softmax over
//! the negated, range-scaled logits at `temperature` picks one; temperature 0 takes the cheapest.

use rand::Rng;

use super::indexer::OverlapScores;
use super::protocol::WorkerId;

/// One candidate's predicted load if the request went there (from its [`super::active::ActiveSequences`],
/// or the request alone for a worker without a tracker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerState {
    /// The candidate.
    pub worker: WorkerId,
    /// Blocks it would hold: its active blocks plus the request's blocks it does not hold yet.
    pub potential_blocks: usize,
    /// Prefill tokens it would have ahead: its active prefill plus the request's uncached tokens.
    pub potential_tokens: usize,
}

/// The chosen worker and what the decision knew.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// The chosen worker.
    pub worker: WorkerId,
    /// The request's blocks, `ceil(isl / block_size)`.
    pub required_blocks: usize,
    /// Of those, the blocks the worker already has cached (its overlap score).
    pub overlap_blocks: u32,
    /// The worker's normalized logit.
    pub logit: f64,
}

/// Each state's logit, `overlap_score_weight × potential_tokens / block_size + potential_blocks`, divided
/// by the largest when that is positive. A `block_size` of 0 is taken as 1.
pub fn logits(states: &[WorkerState], block_size: usize, overlap_score_weight: f64) -> Vec<f64> {
    let block_size = block_size.max(1) as f64;
    let mut logits: Vec<f64> = states
        .iter()
        .map(|s| {
            overlap_score_weight * (s.potential_tokens as f64 / block_size)
                + s.potential_blocks as f64
        })
        .collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max > 0.0 && max.is_finite() {
        for logit in &mut logits {
            *logit /= max;
        }
    }
    logits
}

/// Picks an index by softmax over the logits (lower logit, likelier pick); `None` only when `logits` is
/// empty.
///
/// - temperature 0 (or negative, or NaN): the minimal logit, ties broken uniformly at random;
/// - all logits equal: uniform;
/// - otherwise `p_i ∝ exp(s_i − max s)` with `s_i = −logit_i / (max − min) / T`, drawn by walking the
///   cumulative sum to the first `≥ u`, `u ~ U[0, 1)` (the last candidate if rounding leaves a gap).
///
/// Logits that are NaN or infinite never win against finite ones; if none is finite the pick is uniform.
pub fn softmax_sample<R: Rng + ?Sized>(
    logits: &[f64],
    temperature: f64,
    rng: &mut R,
) -> Option<usize> {
    if logits.is_empty() {
        return None;
    }
    let candidates: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if candidates.is_empty() {
        return Some(rng.gen_range(0..logits.len()));
    }
    let (min, max) = candidates
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &i| {
            (lo.min(logits[i]), hi.max(logits[i]))
        });
    if temperature.is_nan() || temperature <= 0.0 {
        let best: Vec<usize> = candidates
            .into_iter()
            .filter(|&i| logits[i] == min)
            .collect();
        return Some(best[rng.gen_range(0..best.len())]);
    }
    if max == min {
        return Some(candidates[rng.gen_range(0..candidates.len())]);
    }
    // s_i − max s = −(logit_i − min) / (max − min) / T: the same numbers as the spec's formula, without
    // the ∞ − ∞ a tiny temperature would produce.
    let range = max - min;
    let weights: Vec<f64> = candidates
        .iter()
        .map(|&i| (-((logits[i] - min) / range) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let draw: f64 = rng.gen();
    let mut cumulative = 0.0;
    for (&i, weight) in candidates.iter().zip(&weights) {
        cumulative += weight / total;
        if cumulative >= draw {
            return Some(i);
        }
    }
    candidates.last().copied()
}

/// Chooses a worker for a request of `isl` tokens from the candidates' predicted loads; `None` when there
/// is no candidate.
pub fn select<R: Rng + ?Sized>(
    states: &[WorkerState],
    scores: &OverlapScores,
    isl: usize,
    block_size: usize,
    overlap_score_weight: f64,
    temperature: f64,
    rng: &mut R,
) -> Option<Selection> {
    let logits = logits(states, block_size, overlap_score_weight);
    let chosen = softmax_sample(&logits, temperature, rng)?;
    let worker = states[chosen].worker;
    Some(Selection {
        worker,
        required_blocks: isl.div_ceil(block_size.max(1)),
        overlap_blocks: scores.score(worker),
        logit: logits[chosen],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::active::ActiveSequences;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::time::Instant;

    fn state(worker: WorkerId, potential_blocks: usize, potential_tokens: usize) -> WorkerState {
        WorkerState {
            worker,
            potential_blocks,
            potential_tokens,
        }
    }

    #[test]
    fn the_documented_example_picks_w2() {
        // Weight 1.0, block size 16: W1 8 prefill + 10 decode blocks = 18, W2 5 + 5 = 10, W3 2 + 9 = 11.
        let states = [
            state(1, 10, 8 * 16),
            state(2, 5, 5 * 16),
            state(3, 9, 2 * 16),
        ];
        let raw = logits(&states, 16, 1.0);
        assert_eq!(raw, [1.0, 10.0 / 18.0, 11.0 / 18.0]);
        let mut rng = StdRng::seed_from_u64(7);
        let chosen = select(
            &states,
            &OverlapScores::default(),
            100,
            16,
            1.0,
            0.0,
            &mut rng,
        )
        .unwrap();
        assert_eq!(chosen.worker, 2);
        assert_eq!(chosen.required_blocks, 7);
        assert_eq!(chosen.overlap_blocks, 0);
        assert_eq!(chosen.logit, 10.0 / 18.0);
    }

    #[test]
    fn weight_zero_balances_blocks_only() {
        let states = [state(1, 10, 0), state(2, 4, 10_000)];
        assert_eq!(logits(&states, 16, 0.0), [1.0, 0.4]);
        // Zero load everywhere is not normalized (max is 0).
        assert_eq!(
            logits(&[state(1, 0, 0), state(2, 0, 0)], 16, 1.0),
            [0.0, 0.0]
        );
        assert_eq!(logits(&[], 16, 1.0), Vec::<f64>::new());
        // Block size 0 is read as 1 rather than dividing by zero.
        assert_eq!(logits(&[state(1, 1, 3)], 0, 1.0), [1.0]);
    }

    #[test]
    fn temperature_zero_takes_the_minimum() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert_eq!(softmax_sample(&[0.9, 0.2, 0.5], 0.0, &mut rng), Some(1));
        }
        assert_eq!(softmax_sample(&[], 0.0, &mut rng), None);
        assert_eq!(softmax_sample(&[], 1.0, &mut rng), None);
        assert_eq!(softmax_sample(&[3.0], 1.0, &mut rng), Some(0));
    }

    #[test]
    fn ties_are_broken_uniformly_over_many_seeds() {
        let mut counts = [0usize; 4];
        for seed in 0..4000 {
            let mut rng = StdRng::seed_from_u64(seed);
            let chosen = softmax_sample(&[0.5, 0.2, 0.2, 0.2], 0.0, &mut rng).unwrap();
            counts[chosen] += 1;
        }
        assert_eq!(counts[0], 0);
        for &count in &counts[1..] {
            assert!((1100..1570).contains(&count), "{counts:?}");
        }
        // All equal with a temperature: uniform too.
        let mut counts = [0usize; 3];
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..3000 {
            counts[softmax_sample(&[0.7, 0.7, 0.7], 1.0, &mut rng).unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|&c| (850..1150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn temperature_spreads_the_choices_by_softmax_weight() {
        let logits = [0.0, 0.5, 1.0];
        let mut rng = StdRng::seed_from_u64(11);
        let draws = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..draws {
            counts[softmax_sample(&logits, 1.0, &mut rng).unwrap()] += 1;
        }
        // p ∝ e^0, e^-0.5, e^-1 = 0.506, 0.307, 0.186.
        let expected = [0.506, 0.307, 0.186];
        for (count, p) in counts.iter().zip(expected) {
            let share = *count as f64 / draws as f64;
            assert!((share - p).abs() < 0.015, "{counts:?}");
        }
        // A low temperature concentrates on the best; a high one flattens.
        let mut rng = StdRng::seed_from_u64(12);
        let cold = (0..2000)
            .filter(|_| softmax_sample(&logits, 0.05, &mut rng) == Some(0))
            .count();
        assert!(cold > 1990, "{cold}");
        let hot = (0..3000)
            .filter(|_| softmax_sample(&logits, 1000.0, &mut rng) == Some(2))
            .count();
        assert!((850..1150).contains(&hot), "{hot}");
    }

    #[test]
    fn non_finite_logits_never_beat_finite_ones() {
        let mut rng = StdRng::seed_from_u64(5);
        for temperature in [0.0, 0.5, f64::NAN, -1.0, f64::INFINITY, 1e-300] {
            for _ in 0..200 {
                let chosen = softmax_sample(
                    &[f64::NAN, 0.3, f64::INFINITY, f64::NEG_INFINITY, 0.3],
                    temperature,
                    &mut rng,
                );
                assert!(matches!(chosen, Some(1) | Some(4)), "{temperature}");
            }
        }
        // Nothing finite: still a pick.
        assert!(softmax_sample(&[f64::NAN, f64::NAN], 1.0, &mut rng).is_some());
        // A NaN weight gives NaN logits: no panic, some pick.
        let states = [state(1, 1, 1), state(2, 2, 2)];
        let chosen = select(
            &states,
            &OverlapScores::default(),
            1,
            16,
            f64::NAN,
            0.0,
            &mut rng,
        );
        assert!(chosen.is_some());
        assert_eq!(
            select(&[], &OverlapScores::default(), 1, 16, 1.0, 0.0, &mut rng),
            None
        );
    }

    #[test]
    fn a_saturated_worker_with_the_whole_prefix_loses_to_an_idle_one() {
        let now = Instant::now();
        let block_size = 16;
        let prompt: Vec<u64> = (1..=8).collect(); // 8 blocks, 128 tokens
        let isl = prompt.len() * block_size;
        // Worker 1 caches the whole prompt but is busy: 40 other requests of 32 blocks, half still
        // prefilling.
        let mut busy = ActiveSequences::new(block_size);
        for r in 0..40u64 {
            let blocks: Vec<u64> = (0..32).map(|b| 1000 * (r + 1) + b).collect();
            busy.add_request(&format!("r{r}"), blocks, 512, 0, now)
                .unwrap();
            if r % 2 == 0 {
                busy.mark_prefill_completed(&format!("r{r}"));
            }
        }
        let idle = ActiveSequences::new(block_size);
        let mut scores = OverlapScores::default();
        scores.scores.insert(1, 8);
        let states = [
            {
                let (potential_blocks, potential_tokens) =
                    busy.potential_blocks_and_tokens(&prompt, isl, 8);
                state(1, potential_blocks, potential_tokens)
            },
            {
                let (potential_blocks, potential_tokens) =
                    idle.potential_blocks_and_tokens(&prompt, isl, 0);
                state(2, potential_blocks, potential_tokens)
            },
        ];
        assert_eq!(states[0].potential_tokens, 20 * 512);
        let mut rng = StdRng::seed_from_u64(9);
        let chosen = select(&states, &scores, isl, block_size, 1.0, 0.0, &mut rng).unwrap();
        assert_eq!(chosen.worker, 2);
        assert_eq!(chosen.overlap_blocks, 0);
        assert_eq!(chosen.required_blocks, 8);
        // Unloaded, the cache wins.
        let cached = ActiveSequences::new(block_size);
        let (blocks, tokens) = cached.potential_blocks_and_tokens(&prompt, isl, 8);
        let states = [state(1, blocks, tokens), states[1]];
        let chosen = select(&states, &scores, isl, block_size, 1.0, 0.0, &mut rng).unwrap();
        assert_eq!((chosen.worker, chosen.overlap_blocks), (1, 8));
    }
}
