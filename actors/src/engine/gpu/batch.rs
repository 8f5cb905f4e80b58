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

impl Offsets {
    /// Where each array starts for `tokens` tokens, `seqs` sequences, `rows` sampled rows and block
    /// tables `max_blocks` wide.
    pub fn layout(tokens: usize, seqs: usize, rows: usize, max_blocks: usize) -> Offsets {
        let ids = 0;
        let pos = ids + tokens;
        let slots = pos + tokens;
        let seq = slots + tokens;
        let tables = seq + tokens;
        let rows_at = tables + seqs * max_blocks;
        let params = rows_at + rows;
        Offsets {
            ids,
            pos,
            slots,
            seq,
            tables,
            rows: rows_at,
            params,
            banned: params + rows * SAMPLE_PARAMS,
        }
    }
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
        let at = Offsets::layout(tokens, seqs, rows, max_blocks);
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

impl StepPlan {
    /// Whether every sequence runs one token and samples it: a decode-only step, the kind a captured
    /// CUDA graph replays.
    pub fn is_decode(&self) -> bool {
        self.tokens == self.seqs && self.rows == self.seqs
    }

    /// This decode step laid out for a graph captured for `batch` sequences and block tables `width`
    /// wide, so that every offset and size depends only on (`batch`, `width`). Sequences past this
    /// plan's are padding: token 0 at position 0, its KV written to `scratch_block` (a block no
    /// sequence owns), sampled greedily, its token ignored. Returns `None` when this plan is not a
    /// decode step or does not fit.
    pub fn padded(&self, batch: usize, width: usize, scratch_block: usize) -> Option<StepPlan> {
        let n = self.seqs;
        if !self.is_decode() || n > batch || self.max_blocks > width {
            return None;
        }
        let at = Offsets::layout(batch, batch, batch, width);
        let banned = self.data.len() - self.at.banned;
        let mut data = vec![0i32; at.banned + banned];
        for (from, to) in [
            (self.at.ids, at.ids),
            (self.at.pos, at.pos),
            (self.at.slots, at.slots),
            (self.at.seq, at.seq),
            (self.at.rows, at.rows),
        ] {
            data[to..to + n].copy_from_slice(&self.data[from..from + n]);
        }
        for s in 0..n {
            let src = self.at.tables + s * self.max_blocks;
            let dst = at.tables + s * width;
            data[dst..dst + self.max_blocks]
                .copy_from_slice(&self.data[src..src + self.max_blocks]);
        }
        data[at.params..at.params + n * SAMPLE_PARAMS]
            .copy_from_slice(&self.data[self.at.params..self.at.params + n * SAMPLE_PARAMS]);
        data[at.banned..].copy_from_slice(&self.data[self.at.banned..]);
        for s in n..batch {
            data[at.slots + s] = (scratch_block * self.block_size) as i32;
            data[at.seq + s] = s as i32;
            data[at.tables + s * width] = scratch_block as i32;
            data[at.rows + s] = s as i32;
            // Greedy (temperature 0), top_p 1, nothing banned.
            data[at.params + s * SAMPLE_PARAMS + 1] = 1.0f32.to_bits() as i32;
        }
        Some(StepPlan {
            tokens: batch,
            seqs: batch,
            rows: batch,
            max_blocks: width,
            max_context: width * self.block_size,
            block_size: self.block_size,
            data,
            at,
        })
    }
}
