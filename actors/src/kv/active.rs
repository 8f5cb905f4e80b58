//! Active sequence tracking for one engine (runtime spec §3.4): the router's own prediction of an
//! engine's load, from the requests it sent there and has not seen finish.
//!
//! Blocks are the prompts' sequence hashes, counted once however many concurrent requests share them;
//! tokens are the prefill work still ahead (a request's uncached prompt tokens until its first output
//! token). Time comes in as an argument, so the stale-request guard is deterministic under test.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::hashing::SequenceHash;
use super::indexer::KeyMap;

/// A request still active this long after a guard check is presumed lost (its free never came) and is
/// force-freed at the next check (`EXPIRY_DURATION`).
pub const EXPIRY: Duration = Duration::from_secs(300);

/// Why a tracker call was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActiveError {
    /// The request is already active on this engine (Dynamo treats a double add as an error).
    #[error("request {request_id} is already active on this engine")]
    Duplicate {
        /// The request id given twice.
        request_id: String,
    },
}

/// One request the engine is working on.
#[derive(Debug)]
struct ActiveRequest {
    /// The prompt's full-block sequence hashes (empty when tracking is off).
    blocks: Vec<SequenceHash>,
    /// Uncached prompt tokens still to prefill; 0 once the first token arrived.
    prefill_tokens: usize,
    /// The guard epoch the request was added in.
    epoch: u64,
}

/// The active requests of one engine and the load they imply.
#[derive(Debug)]
pub struct ActiveSequences {
    block_size: usize,
    requests: HashMap<String, ActiveRequest>,
    /// Sequence hash → how many active requests hold it; `active_blocks` is its size.
    unique_blocks: KeyMap<SequenceHash, u32>,
    /// Σ prefill tokens of the active requests.
    active_tokens: usize,
    /// Bumped at every guard check; a request from an older epoch was active at the previous check.
    epoch: u64,
    /// When the guard next checks; set at the first add.
    next_check: Option<Instant>,
}

impl ActiveSequences {
    /// An idle engine with KV blocks of `block_size` tokens.
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size,
            requests: HashMap::new(),
            unique_blocks: KeyMap::default(),
            active_tokens: 0,
            epoch: 0,
            next_check: None,
        }
    }

    /// Starts tracking a request routed here: its prompt blocks (`sequence`, the chained hashes of its
    /// full blocks), and `isl − overlap_blocks × block_size` tokens of prefill. Runs the stale guard
    /// first (see [`EXPIRY`]), so a refused duplicate may still have expired others.
    pub fn add_request(
        &mut self,
        request_id: &str,
        sequence: Vec<SequenceHash>,
        isl: usize,
        overlap_blocks: u32,
        now: Instant,
    ) -> Result<(), ActiveError> {
        self.expire_stale(now);
        if self.requests.contains_key(request_id) {
            return Err(ActiveError::Duplicate {
                request_id: request_id.to_string(),
            });
        }
        let prefill_tokens = self.new_tokens(isl, overlap_blocks);
        for &hash in &sequence {
            *self.unique_blocks.entry(hash).or_insert(0) += 1;
        }
        self.active_tokens += prefill_tokens;
        self.requests.insert(
            request_id.to_string(),
            ActiveRequest {
                blocks: sequence,
                prefill_tokens,
                epoch: self.epoch,
            },
        );
        Ok(())
    }

    /// The request's first token arrived: its prefill no longer loads the engine. Unknown ids are
    /// ignored (the request may have been force-freed).
    pub fn mark_prefill_completed(&mut self, request_id: &str) {
        match self.requests.get_mut(request_id) {
            Some(request) => {
                self.active_tokens -= std::mem::take(&mut request.prefill_tokens);
            }
            None => tracing::debug!(request_id, "prefill completed for an untracked request"),
        }
    }

    /// The request's stream ended: its blocks are released (a block no request holds disappears) and
    /// any prefill left is dropped. Unknown ids are ignored.
    pub fn free(&mut self, request_id: &str) {
        let Some(request) = self.requests.remove(request_id) else {
            tracing::debug!(request_id, "free of an untracked request");
            return;
        };
        self.active_tokens -= request.prefill_tokens;
        for hash in request.blocks {
            if let Some(count) = self.unique_blocks.get_mut(&hash) {
                *count -= 1;
                if *count == 0 {
                    self.unique_blocks.remove(&hash);
                }
            }
        }
    }

    /// Distinct blocks held by active requests (shared blocks count once).
    pub fn active_blocks(&self) -> usize {
        self.unique_blocks.len()
    }

    /// Prefill tokens still ahead of the engine.
    pub fn active_tokens(&self) -> usize {
        self.active_tokens
    }

    /// The tokens a request of `isl` tokens would prefill with `overlap_blocks` cached:
    /// `isl − overlap × block_size`, never below 0.
    pub fn new_tokens(&self, isl: usize, overlap_blocks: u32) -> usize {
        isl.saturating_sub((overlap_blocks as usize).saturating_mul(self.block_size))
    }

    /// How many of `sequence`'s blocks no active request holds yet.
    ///
    /// `sequence` is a prompt's chain of sequence hashes (each block's hash covers every block before
    /// it), and every active request holds its own prompt's whole chain, so the blocks of a chain that
    /// are held form a prefix of it: a binary search finds where it ends in log₂ n lookups instead of
    /// n (a 32k-token prompt is 512 blocks of 64 tokens, for each engine, for each request routed).
    pub fn new_blocks(&self, sequence: &[SequenceHash]) -> usize {
        let held = sequence.partition_point(|hash| self.unique_blocks.contains_key(hash));
        sequence.len() - held
    }

    /// The engine's blocks and prefill tokens if the request were added:
    /// `(active_blocks + new_blocks(sequence), active_tokens + new_tokens(isl, overlap_blocks))`.
    pub fn potential_blocks_and_tokens(
        &self,
        sequence: &[SequenceHash],
        isl: usize,
        overlap_blocks: u32,
    ) -> (usize, usize) {
        (
            self.active_blocks() + self.new_blocks(sequence),
            self.active_tokens + self.new_tokens(isl, overlap_blocks),
        )
    }

    /// Active requests.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// Whether no request is active.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// The stale-request guard: once [`EXPIRY`] has passed since the last check, every request that was
    /// already active at that check is freed, and the requests active now become the next candidates.
    fn expire_stale(&mut self, now: Instant) {
        let Some(next_check) = self.next_check else {
            self.next_check = now.checked_add(EXPIRY);
            return;
        };
        if now < next_check {
            return;
        }
        let stale: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, request)| request.epoch < self.epoch)
            .map(|(id, _)| id.clone())
            .collect();
        if !stale.is_empty() {
            tracing::warn!(
                count = stale.len(),
                "freeing requests active for over {}s without finishing",
                EXPIRY.as_secs()
            );
        }
        for id in &stale {
            self.free(id);
        }
        self.epoch += 1;
        self.next_check = now.checked_add(EXPIRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_blocks_count_once_and_disappear_with_their_last_request() {
        let now = Instant::now();
        let mut active = ActiveSequences::new(4);
        active.add_request("a", vec![1, 2, 3], 12, 0, now).unwrap();
        active
            .add_request("b", vec![1, 2, 4, 5], 16, 2, now)
            .unwrap();
        assert_eq!(active.active_blocks(), 5);
        assert_eq!(active.len(), 2);
        active.free("a");
        assert_eq!(active.active_blocks(), 4, "1 and 2 are still held by b");
        assert_eq!(active.new_blocks(&[1, 2, 3]), 1);
        active.free("b");
        assert_eq!(active.active_blocks(), 0);
        assert!(active.is_empty());
        // Unknown ids are ignored.
        active.free("b");
        active.mark_prefill_completed("zzz");
        assert_eq!(active.active_tokens(), 0);
    }

    #[test]
    fn new_blocks_of_real_chains_match_a_count_of_every_block() {
        use crate::kv::hashing::{local_block_hashes, sequence_hashes};
        let now = Instant::now();
        let block_size = 4;
        // Prompts from a small tree of shared prefixes, as sequence hashes chain them.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let prompts: Vec<Vec<u32>> = (0..64)
            .map(|_| {
                let shared = (next() % 4) as u32;
                let mut tokens: Vec<u32> = (0..(next() % 5) * block_size as u64)
                    .map(|i| shared * 1000 + i as u32)
                    .collect();
                let own = next() % 6 * block_size as u64 + next() % 3;
                tokens.extend((0..own).map(|_| (next() % 7) as u32));
                tokens
            })
            .collect();
        let chain = |tokens: &[u32]| sequence_hashes(&local_block_hashes(tokens, block_size));
        let mut active = ActiveSequences::new(block_size);
        for (i, prompt) in prompts.iter().enumerate().take(32) {
            active
                .add_request(&format!("r{i}"), chain(prompt), prompt.len(), 0, now)
                .unwrap();
            if i % 3 == 0 {
                active.free(&format!("r{}", i / 2));
            }
        }
        for prompt in &prompts {
            let sequence = chain(prompt);
            let counted = sequence
                .iter()
                .filter(|hash| !active.unique_blocks.contains_key(hash))
                .count();
            assert_eq!(active.new_blocks(&sequence), counted, "{prompt:?}");
        }
    }

    #[test]
    fn prefill_tokens_count_until_the_first_token() {
        let now = Instant::now();
        let mut active = ActiveSequences::new(16);
        active.add_request("a", vec![1, 2], 40, 1, now).unwrap();
        active.add_request("b", vec![], 10, 0, now).unwrap();
        assert_eq!(active.active_tokens(), 24 + 10);
        active.mark_prefill_completed("a");
        assert_eq!(active.active_tokens(), 10);
        active.mark_prefill_completed("a");
        assert_eq!(active.active_tokens(), 10);
        // Blocks stay until the request is freed.
        assert_eq!(active.active_blocks(), 2);
        active.free("a");
        active.free("b");
        assert_eq!((active.active_blocks(), active.active_tokens()), (0, 0));
    }

    #[test]
    fn new_tokens_clamp_at_zero() {
        let active = ActiveSequences::new(16);
        assert_eq!(active.new_tokens(100, 2), 68);
        assert_eq!(active.new_tokens(100, 7), 0);
        assert_eq!(active.new_tokens(100, u32::MAX), 0);
        assert_eq!(active.new_tokens(0, 0), 0);
    }

    #[test]
    fn potential_load_adds_the_new_blocks_and_tokens() {
        let now = Instant::now();
        let mut active = ActiveSequences::new(4);
        assert_eq!(active.potential_blocks_and_tokens(&[1, 2], 8, 0), (2, 8));
        active.add_request("a", vec![1, 2, 3], 12, 0, now).unwrap();
        assert_eq!(
            active.potential_blocks_and_tokens(&[1, 2, 7, 8], 18, 2),
            (3 + 2, 12 + 10)
        );
    }

    #[test]
    fn a_double_add_is_refused_and_changes_nothing() {
        let now = Instant::now();
        let mut active = ActiveSequences::new(4);
        active.add_request("a", vec![1], 4, 0, now).unwrap();
        let error = active.add_request("a", vec![2, 3], 8, 0, now).unwrap_err();
        assert_eq!(
            error,
            ActiveError::Duplicate {
                request_id: "a".into()
            }
        );
        assert_eq!((active.active_blocks(), active.active_tokens()), (1, 4));
        assert_eq!(active.len(), 1);
    }

    #[test]
    fn requests_active_across_a_whole_expiry_period_are_force_freed() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut active = ActiveSequences::new(4);
        // The first add starts the timer; nothing is a candidate yet.
        active.add_request("old", vec![1, 2], 8, 0, at(0)).unwrap();
        active
            .add_request("mid", vec![2, 3], 8, 0, at(200))
            .unwrap();
        // First check at 300: no candidates from before, so nothing is freed; old and mid become
        // candidates.
        active
            .add_request("new", vec![3, 4], 8, 0, at(301))
            .unwrap();
        assert_eq!(active.len(), 3);
        // Before the next check (601), nothing changes.
        active.add_request("x", vec![], 0, 0, at(600)).unwrap();
        assert_eq!(active.len(), 4);
        active.free("mid");
        // Second check: old (still active since the first check) goes; new and x were added after it.
        active.add_request("y", vec![9], 4, 0, at(601)).unwrap();
        let mut left: Vec<&str> = active.requests.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["new", "x", "y"]);
        assert_eq!(active.active_blocks(), 3, "blocks 3, 4 and 9");
        assert_eq!(active.active_tokens(), 8 + 4);
        // Third check: new and x go, y (added at the second check) stays.
        active.add_request("z", vec![], 0, 0, at(902)).unwrap();
        let mut left: Vec<&str> = active.requests.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["y", "z"]);
        assert_eq!(active.active_blocks(), 1);
    }

    #[test]
    fn a_request_freed_and_readded_under_the_same_id_starts_fresh() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut active = ActiveSequences::new(4);
        active.add_request("a", vec![1], 4, 0, at(0)).unwrap();
        // Check at 300 (before b is added): a becomes a candidate.
        active.add_request("b", vec![], 0, 0, at(300)).unwrap();
        active.free("a");
        active.add_request("a", vec![1], 4, 0, at(400)).unwrap();
        // Check at 600: the old a is gone; the new a and b were added after the last check.
        active.add_request("c", vec![], 0, 0, at(600)).unwrap();
        assert_eq!(active.len(), 3);
        // Check at 900: the new a and b go.
        active.add_request("d", vec![], 0, 0, at(900)).unwrap();
        let mut left: Vec<&str> = active.requests.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["c", "d"]);
        assert_eq!((active.active_blocks(), active.active_tokens()), (0, 0));
    }
}
