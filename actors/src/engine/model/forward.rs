//! The batched forward pass: one call runs every scheduled sequence's new tokens (a prefill chunk or
//! one decode token each) through the model together. The weight matmuls run once over all rows of
//! the batch — candle's Q8_0 kernel reads each weight tile once per 16 rows, which is what makes
//! aggregate tokens/s grow with concurrency — while RoPE, the KV caches and attention are per
//! sequence.

use candle_core::{Device, Module, Tensor};

use super::weights::{LlamaModel, ModelShape};

/// One sequence's key/value cache: per layer, `len` rows of `kv_heads × head_dim` floats for keys and
/// the same for values.
#[derive(Debug, Default)]
pub struct SeqCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl SeqCache {
    /// An empty cache for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        SeqCache {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            len: 0,
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One sequence's part of a step.
pub struct BatchItem<'a> {
    /// The new tokens (positions `cache.len()..cache.len() + tokens.len()`).
    pub tokens: &'a [u32],
    /// Its cache; extended by the tokens.
    pub cache: &'a mut SeqCache,
    /// Compute next-token logits after the last of `tokens` (false for a prefill chunk that is not
    /// the prompt's last).
    pub want_logits: bool,
}

/// Run one step. Returns, per item, the next-token logits (`None` where not wanted). Every item's
/// cache grows by its tokens.
pub fn forward(
    model: &LlamaModel,
    items: &mut [BatchItem<'_>],
) -> candle_core::Result<Vec<Option<Vec<f32>>>> {
    let shape = &model.shape;
    let total: usize = items.iter().map(|i| i.tokens.len()).sum();
    if total == 0 {
        return Ok(items.iter().map(|_| None).collect());
    }
    for item in items.iter() {
        if item.tokens.is_empty() {
            candle_core::bail!("a batch item has no tokens");
        }
        if item.cache.len + item.tokens.len() > shape.context_length {
            candle_core::bail!(
                "sequence of {} tokens exceeds the context length {}",
                item.cache.len + item.tokens.len(),
                shape.context_length
            );
        }
        if let Some(&bad) = item.tokens.iter().find(|&&t| t as usize >= shape.vocab) {
            candle_core::bail!("token id {bad} is outside the vocabulary ({})", shape.vocab);
        }
    }
    let ids: Vec<u32> = items
        .iter()
        .flat_map(|i| i.tokens.iter().copied())
        .collect();
    let ids = Tensor::from_vec(ids, total, &Device::Cpu)?;
    let mut x = model.embedding.index_select(&ids, 0)?;
    let (h, kvw) = (shape.hidden, shape.kv_width());
    let mut scores = Vec::new();
    for (l, layer) in model.layers.iter().enumerate() {
        let normed = candle_nn::ops::rms_norm(&x, &layer.attn_norm, shape.rms_eps)?;
        let mut q: Vec<f32> = layer.wq.forward(&normed)?.flatten_all()?.to_vec1()?;
        let mut k: Vec<f32> = layer.wk.forward(&normed)?.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = layer.wv.forward(&normed)?.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; total * h];
        let mut row = 0;
        for item in items.iter_mut() {
            let (start, n) = (item.cache.len, item.tokens.len());
            for j in 0..n {
                let r = row + j;
                rope(model, &mut q[r * h..(r + 1) * h], shape.heads, start + j);
                rope(
                    model,
                    &mut k[r * kvw..(r + 1) * kvw],
                    shape.kv_heads,
                    start + j,
                );
            }
            item.cache.keys[l].extend_from_slice(&k[row * kvw..(row + n) * kvw]);
            item.cache.values[l].extend_from_slice(&v[row * kvw..(row + n) * kvw]);
            attention(
                shape,
                &q[row * h..(row + n) * h],
                &item.cache.keys[l],
                &item.cache.values[l],
                start,
                &mut y[row * h..(row + n) * h],
                &mut scores,
            );
            row += n;
        }
        let y = Tensor::from_vec(y, (total, h), &Device::Cpu)?;
        x = (x + layer.wo.forward(&y)?)?;
        let normed = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, shape.rms_eps)?;
        let gate = layer.w_gate.forward(&normed)?;
        let up = layer.w_up.forward(&normed)?;
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        x = (x + layer.w_down.forward(&act)?)?;
    }
    let mut last_rows = Vec::new();
    let mut row = 0u32;
    for item in items.iter_mut() {
        let n = item.tokens.len();
        item.cache.len += n;
        row += n as u32;
        if item.want_logits {
            last_rows.push(row - 1);
        }
    }
    let mut logits = if last_rows.is_empty() {
        Vec::new()
    } else {
        let rows = Tensor::new(last_rows.as_slice(), &Device::Cpu)?;
        let last = x.index_select(&rows, 0)?;
        let normed = candle_nn::ops::rms_norm(&last, &model.final_norm, shape.rms_eps)?;
        model.output.forward(&normed)?.to_vec2::<f32>()?
    }
    .into_iter();
    Ok(items
        .iter()
        .map(|item| {
            if item.want_logits {
                logits.next()
            } else {
                None
            }
        })
        .collect())
}

/// Rotary position embedding in place on `heads` consecutive heads of one token at `pos`, rotating
/// adjacent pairs (GGUF llama weights are laid out for this "interleaved" form).
fn rope(model: &LlamaModel, x: &mut [f32], heads: usize, pos: usize) {
    let hd = model.shape.head_dim;
    let half = hd / 2;
    let cos = &model.rope_cos[pos * half..(pos + 1) * half];
    let sin = &model.rope_sin[pos * half..(pos + 1) * half];
    for head in x.chunks_exact_mut(hd).take(heads) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos[i] - b * sin[i];
            pair[1] = a * sin[i] + b * cos[i];
        }
    }
}

/// Causal attention of `n = q.len() / hidden` new queries at positions `start..start + n` over a
/// sequence's cached keys and values (which already include the new tokens). Writes `n × hidden`.
fn attention(
    shape: &ModelShape,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    start: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let (h, hd, kvw) = (shape.hidden, shape.head_dim, shape.kv_width());
    let group = shape.heads / shape.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    for (j, (q_row, out_row)) in q.chunks_exact(h).zip(out.chunks_exact_mut(h)).enumerate() {
        let visible = start + j + 1;
        for head in 0..shape.heads {
            let kv_off = (head / group) * hd;
            let qh = &q_row[head * hd..(head + 1) * hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for p in 0..visible {
                let s = dot(qh, &keys[p * kvw + kv_off..p * kvw + kv_off + hd]) * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let oh = &mut out_row[head * hd..(head + 1) * hd];
            oh.fill(0.0);
            for (p, &w) in scores.iter().enumerate() {
                let w = w * inv;
                let vp = &values[p * kvw + kv_off..p * kvw + kv_off + hd];
                for (o, &v) in oh.iter_mut().zip(vp) {
                    *o += w * v;
                }
            }
        }
    }
}

/// Dot product with eight independent accumulators (so the compiler can vectorise it).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
