//! Next-token selection from logits: logit_bias, banned tokens, repetition / frequency / presence
//! penalties, then greedy (temperature 0, `greedy`, or top_k 1) or temperature + top_k + top_p + min_p
//! sampling with a per-sequence RNG (seeded when the request gives a seed, so the same seed gives the
//! same output). Log-probabilities, when asked for, are those of the model's raw distribution (before
//! bias, penalties and temperature), as vLLM reports them by default.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::protocol::engine::{SamplingOptions, TokenLogprob};

/// Candidates sorted first when nucleus sampling needs an order; the whole vocabulary is sorted only
/// when these do not already hold `top_p` of the mass.
const NUCLEUS_PREFIX: usize = 256;

/// One sequence's sampler.
pub struct Sampler {
    options: SamplingOptions,
    rng: StdRng,
    /// Output tokens so far and how often each occurred (frequency / presence penalties).
    counts: HashMap<u32, u32>,
    /// Tokens of the prompt and the output (repetition penalty), kept only when that penalty is set.
    seen: Option<std::collections::HashSet<u32>>,
    /// Scratch.
    order: Vec<u32>,
}

impl Sampler {
    /// A sampler for one sequence with `prompt` as its context.
    pub fn new(options: SamplingOptions, prompt: &[u32]) -> Self {
        let rng = match options.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let seen = options
            .repetition_penalty
            .filter(|&r| r != 1.0)
            .map(|_| prompt.iter().copied().collect());
        Sampler {
            options,
            rng,
            counts: HashMap::new(),
            seen,
            order: Vec::new(),
        }
    }

    /// Whether selection is deterministic argmax.
    pub fn is_greedy(&self) -> bool {
        let o = &self.options;
        o.greedy || o.temperature.is_some_and(|t| t <= 0.0) || o.top_k == Some(1)
    }

    /// Pick the next token from `logits` (modified in place). `banned` tokens are never picked
    /// (stop tokens before `min_tokens`).
    pub fn sample(&mut self, logits: &mut [f32], banned: &[u32]) -> (u32, Option<TokenLogprob>) {
        let raw = self
            .options
            .logprobs
            .map(|top| (log_softmax(logits), top as usize));
        self.adjust(logits, banned);
        let token = if self.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        self.record(token);
        let logprob = raw.map(|(lp, top)| TokenLogprob {
            token_id: token,
            logprob: lp[token as usize],
            top: top_n(&lp, top),
        });
        (token, logprob)
    }

    /// Counts `token` as generated (for penalties).
    fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
        if let Some(seen) = &mut self.seen {
            seen.insert(token);
        }
    }

    fn adjust(&self, logits: &mut [f32], banned: &[u32]) {
        let o = &self.options;
        for &(id, bias) in &o.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        for &id in banned {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if let (Some(r), Some(seen)) = (o.repetition_penalty, &self.seen) {
            for &id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        let (freq, pres) = (
            o.frequency_penalty.unwrap_or(0.0),
            o.presence_penalty.unwrap_or(0.0),
        );
        if freq != 0.0 || pres != 0.0 {
            for (&id, &count) in &self.counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= freq * count as f32 + pres;
                }
            }
        }
    }

    /// Temperature, then top_k, min_p and top_p, then a draw from what is left.
    fn draw(&mut self, logits: &mut [f32]) -> u32 {
        let o = &self.options;
        let temperature = o.temperature.unwrap_or(1.0);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let mut pmax = 0f32;
        for l in logits.iter_mut() {
            *l = ((*l - max) / temperature).exp();
            pmax = pmax.max(*l);
        }
        let probs = logits;
        let order = &mut self.order;
        order.clear();
        let min_p = o.min_p.unwrap_or(0.0);
        let floor = min_p * pmax;
        order.extend(
            (0..probs.len() as u32)
                .filter(|&i| probs[i as usize] > 0.0 && probs[i as usize] >= floor),
        );
        let desc = |a: &u32, b: &u32| probs[*b as usize].total_cmp(&probs[*a as usize]);
        if let Some(k) = o.top_k.filter(|&k| k > 0).map(|k| k as usize) {
            if k < order.len() {
                order.select_nth_unstable_by(k - 1, desc);
                order.truncate(k);
            }
        }
        let top_p = o.top_p.unwrap_or(1.0);
        if top_p < 1.0 && order.len() > 1 {
            let mass: f32 = order.iter().map(|&i| probs[i as usize]).sum();
            let target = top_p * mass;
            let mut cut = None;
            if order.len() > NUCLEUS_PREFIX {
                order.select_nth_unstable_by(NUCLEUS_PREFIX - 1, desc);
                order[..NUCLEUS_PREFIX].sort_unstable_by(desc);
                cut = nucleus_cut(&order[..NUCLEUS_PREFIX], probs, target);
            }
            let cut = match cut {
                Some(cut) => cut,
                None => {
                    order.sort_unstable_by(desc);
                    nucleus_cut(order, probs, target).unwrap_or(order.len())
                }
            };
            order.truncate(cut);
        }
        let total: f32 = order.iter().map(|&i| probs[i as usize]).sum();
        let mut r = self.rng.gen::<f32>() * total;
        for &i in order.iter() {
            r -= probs[i as usize];
            if r <= 0.0 {
                return i;
            }
        }
        order.last().copied().unwrap_or_else(|| argmax(probs))
    }
}

/// How many of `sorted` (descending) it takes to reach `target` mass, if they do.
fn nucleus_cut(sorted: &[u32], probs: &[f32], target: f32) -> Option<usize> {
    let mut acc = 0.0;
    for (n, &i) in sorted.iter().enumerate() {
        acc += probs[i as usize];
        if acc >= target {
            return Some(n + 1);
        }
    }
    None
}

/// Index of the largest logit (the lowest index on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|l| l - log_sum).collect()
}

/// The `n` most likely tokens, most likely first.
fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let desc = |a: &u32, b: &u32| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]);
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, desc);
        idx.truncate(n);
    }
    idx.sort_unstable_by(desc);
    idx.into_iter().map(|i| (i, logprobs[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> SamplingOptions {
        SamplingOptions::default()
    }

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let o = SamplingOptions {
            temperature: Some(0.0),
            ..options()
        };
        let mut s = Sampler::new(o, &[]);
        assert_eq!(s.sample(&mut logits(), &[]).0, 1);
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_another_seed_differs() {
        let draw = |seed| {
            let o = SamplingOptions {
                seed: Some(seed),
                temperature: Some(5.0),
                ..options()
            };
            let mut s = Sampler::new(o, &[]);
            (0..64)
                .map(|_| s.sample(&mut logits(), &[]).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_and_top_p_limit_the_candidates() {
        let o = SamplingOptions {
            seed: Some(1),
            temperature: Some(10.0),
            top_k: Some(2),
            ..options()
        };
        let mut s = Sampler::new(o, &[]);
        for _ in 0..200 {
            let t = s.sample(&mut logits(), &[]).0;
            assert!(t == 1 || t == 4, "top_k 2 allows only 1 and 4, got {t}");
        }
        let o = SamplingOptions {
            seed: Some(1),
            top_p: Some(0.01),
            ..options()
        };
        let mut s = Sampler::new(o, &[]);
        for _ in 0..50 {
            assert_eq!(
                s.sample(&mut logits(), &[]).0,
                1,
                "top_p 0.01 keeps only the best"
            );
        }
        let o = SamplingOptions {
            seed: Some(1),
            min_p: Some(0.8),
            ..options()
        };
        let mut s = Sampler::new(o, &[]);
        for _ in 0..100 {
            let t = s.sample(&mut logits(), &[]).0;
            assert!(
                t == 1 || t == 4,
                "min_p 0.8 keeps tokens within 0.8 of the best, got {t}"
            );
        }
    }

    #[test]
    fn nucleus_over_a_large_vocabulary_matches_a_full_sort() {
        // 5000 tokens with a long flat tail: the 256-token prefix does not reach top_p 0.99.
        let mut big: Vec<f32> = (0..5000).map(|i| -(i as f32) * 0.001).collect();
        big[4321] = 5.0;
        let o = SamplingOptions {
            seed: Some(3),
            top_p: Some(0.99),
            ..options()
        };
        let mut s = Sampler::new(o, &[]);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            seen.insert(s.sample(&mut big.clone(), &[]).0);
        }
        assert!(seen.len() > 10, "the tail is sampled: {}", seen.len());
        assert!(seen.iter().any(|&t| t > NUCLEUS_PREFIX as u32 * 2));
    }

    #[test]
    fn bias_bans_and_penalties_move_the_choice() {
        let greedy = || SamplingOptions {
            temperature: Some(0.0),
            ..options()
        };
        let o = SamplingOptions {
            logit_bias: vec![(3, 100.0)],
            ..greedy()
        };
        assert_eq!(Sampler::new(o, &[]).sample(&mut logits(), &[]).0, 3);
        assert_eq!(Sampler::new(greedy(), &[]).sample(&mut logits(), &[1]).0, 4);
        // Presence penalty: after emitting 1 once, 4 wins.
        let o = SamplingOptions {
            presence_penalty: Some(0.5),
            ..greedy()
        };
        let mut s = Sampler::new(o, &[]);
        assert_eq!(s.sample(&mut logits(), &[]).0, 1);
        assert_eq!(s.sample(&mut logits(), &[]).0, 4);
        // Repetition penalty covers the prompt.
        let o = SamplingOptions {
            repetition_penalty: Some(2.0),
            ..greedy()
        };
        assert_eq!(Sampler::new(o, &[1]).sample(&mut logits(), &[]).0, 4);
    }

    #[test]
    fn logprobs_are_of_the_raw_distribution() {
        let o = SamplingOptions {
            temperature: Some(0.0),
            logprobs: Some(2),
            logit_bias: vec![(0, 100.0)],
            ..options()
        };
        let (token, lp) = Sampler::new(o, &[]).sample(&mut logits(), &[]);
        let lp = lp.expect("logprobs asked for");
        assert_eq!(token, 0);
        let expected = log_softmax(&logits());
        assert!((lp.logprob - expected[0]).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4]);
        let total: f32 = expected.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}
