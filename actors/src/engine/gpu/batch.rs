//! Host side of one step: which tokens run, where their KV goes, and how each logits row is
//! sampled, packed into one `i32` array that a single copy puts on the device.

use super::kernels::SAMPLE_PARAMS;

/// How one logits row picks its token on the device.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRow<'a> {
    /// <= 0: greedy.
    pub temperature: f32,
    /// >= 1: off.
    pub top_p: f32,
    /// <= 0: off.
    pub min_p: f32,
    /// <= 0: off.
    pub top_k: i32,
    /// The request's seed (or a random one).
    pub seed: u64,
    /// Tokens the sequence generated so far (the draw's counter).
    pub step: u32,
    /// Tokens never picked (stop tokens before `min_tokens`).
    pub banned: &'a [u32],
}

/// One sequence's part of a step.
#[derive(Clone, Debug)]
pub struct PlanItem<'a> {
    /// The tokens run now, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// Position of the first.
    pub start: usize,
    /// The sequence's KV blocks, in order; must cover every position up to the last token's.
    pub blocks: &'a [usize],
    /// Sample the next token after the last of `tokens` (a finished prefill or a decode step).
    pub sample: Option<SampleRow<'a>>,
}

/// Where each array starts in [`StepPlan::data`] (in `i32`s).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    /// Token ids [T].
    pub ids: usize,
    /// Positions [T].
    pub pos: usize,
    /// KV slots [T].
    pub slots: usize,
    /// Sequence (block-table row) of each token [T].
    pub seq: usize,
    /// Block tables [S × max_blocks].
    pub tables: usize,
    /// Token row of each logits row [R].
    pub rows: usize,
    /// Sampling parameters [R × SAMPLE_PARAMS].
    pub params: usize,
    /// Banned ids of every row, concatenated.
    pub banned: usize,
}

/// One step, ready to upload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepPlan {
    /// Tokens run (T).
    pub tokens: usize,
    /// Sequences (S).
    pub seqs: usize,
    /// Logits rows (R).
    pub rows: usize,
    /// Width of a block-table row.
    pub max_blocks: usize,
    /// Longest context any token attends over.
    pub max_context: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// The packed arrays.
    pub data: Vec<i32>,
    /// Where each starts.
    pub at: Offsets,
}

/// Why a step could not be planned (a scheduler bug: the engine checks before planning).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// An item has no tokens.
    #[error("sequence {0} has no tokens in this step")]
    Empty(usize),
    /// An item's blocks do not cover its positions.
    #[error("sequence {seq} needs {needed} KV blocks for position {position} but holds {held}")]
    Blocks {
        /// Item index.
        seq: usize,
        /// Last position.
        position: usize,
        /// Blocks needed.
        needed: usize,
        /// Blocks held.
        held: usize,
    },
}

impl StepPlan {
    /// Pack `items` for blocks of `block_size` tokens.
    pub fn build(items: &[PlanItem<'_>], block_size: usize) -> Result<StepPlan, PlanError> {
        let tokens: usize = items.iter().map(|i| i.tokens.len()).sum();
        let seqs = items.len();
        let rows = items.iter().filter(|i| i.sample.is_some()).count();
        let banned: usize = items
            .iter()
            .filter_map(|i| i.sample.as_ref())
            .map(|s| s.banned.len())
            .sum();
        let mut max_blocks = 1;
        let mut max_context = 0;
        for (n, item) in items.iter().enumerate() {
            if item.tokens.is_empty() {
                return Err(PlanError::Empty(n));
            }
            let end = item.start + item.tokens.len();
            let needed = end.div_ceil(block_size);
            if item.blocks.len() < needed {
                return Err(PlanError::Blocks {
                    seq: n,
                    position: end - 1,
                    needed,
                    held: item.blocks.len(),
                });
            }
            max_blocks = max_blocks.max(needed);
            max_context = max_context.max(end);
        }
        let mut at = Offsets {
            ids: 0,
            ..Offsets::default()
        };
        at.pos = at.ids + tokens;
        at.slots = at.pos + tokens;
        at.seq = at.slots + tokens;
        at.tables = at.seq + tokens;
        at.rows = at.tables + seqs * max_blocks;
        at.params = at.rows + rows;
        at.banned = at.params + rows * SAMPLE_PARAMS;
        let mut data = vec![0i32; at.banned + banned];
        let (mut t, mut r, mut b) = (0usize, 0usize, 0usize);
        for (s, item) in items.iter().enumerate() {
            for (j, &id) in item.tokens.iter().enumerate() {
                let p = item.start + j;
                data[at.ids + t] = id as i32;
                data[at.pos + t] = p as i32;
                data[at.slots + t] =
                    (item.blocks[p / block_size] * block_size + p % block_size) as i32;
                data[at.seq + t] = s as i32;
                t += 1;
            }
            let needed = (item.start + item.tokens.len()).div_ceil(block_size);
            for (k, &block) in item.blocks.iter().take(needed).enumerate() {
                data[at.tables + s * max_blocks + k] = block as i32;
            }
            if let Some(sample) = &item.sample {
                data[at.rows + r] = (t - 1) as i32;
                let p =
                    &mut data[at.params + r * SAMPLE_PARAMS..at.params + (r + 1) * SAMPLE_PARAMS];
                p[0] = sample.temperature.to_bits() as i32;
                p[1] = sample.top_p.to_bits() as i32;
                p[2] = sample.min_p.to_bits() as i32;
                p[3] = sample.top_k;
                p[4] = sample.seed as u32 as i32;
                p[5] = (sample.seed >> 32) as u32 as i32;
                p[6] = sample.step as i32;
                p[7] = b as i32;
                p[8] = sample.banned.len() as i32;
                for &id in sample.banned {
                    data[at.banned + b] = id as i32;
                    b += 1;
                }
                r += 1;
            }
        }
        Ok(StepPlan {
            tokens,
            seqs,
            rows,
            max_blocks,
            max_context,
            block_size,
            data,
            at,
        })
    }
}
