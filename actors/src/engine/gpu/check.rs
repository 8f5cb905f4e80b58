//! Checks of the GPU engine against the CPU engine and itself, shared by `tests/gpu.rs` (on a GPU
//! machine) and `benches/gpu.rs`. Each drives the device directly, without actors.

use std::path::Path;
use std::time::Instant;

use tokio::sync::mpsc;

use super::batch::{PlanItem, SampleRow, StepPlan};
use super::engine::{DeviceRunner, Emission, GpuLoad, Scheduler, Seq, StepRunner};
use super::{GpuEngineConfig, GpuError};
use crate::engine::model::forward::{forward, BatchItem, SeqCache};
use crate::engine::model::sampler::argmax;
use crate::engine::model::LlamaModel;
use crate::protocol::engine::{EngineRequest, SamplingOptions, StopConditions};

/// Random prompts of `len` tokens in `1..vocab`, from `seed`.
pub fn prompts(count: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| (0..len).map(|_| rng.gen_range(1..vocab as u32)).collect())
        .collect()
}

fn greedy_row() -> SampleRow<'static> {
    SampleRow {
        temperature: 0.0,
        top_p: 1.0,
        min_p: 0.0,
        top_k: 0,
        seed: 0,
        step: 0,
        banned: &[],
    }
}

/// Sequences run on the device with fixed block tables (sequence i owns blocks
/// `i·per_seq..(i+1)·per_seq`), one step at a time.
pub struct Direct {
    /// The device and its buffers.
    pub runner: DeviceRunner,
    per_seq: usize,
    block_size: usize,
}

impl Direct {
    /// Open `path` on GPU `ordinal` for up to `seqs` sequences of `context` tokens.
    pub fn open(
        path: &Path,
        ordinal: usize,
        seqs: usize,
        context: usize,
    ) -> Result<Direct, GpuError> {
        Self::open_with(path, ordinal, seqs, context, false)
    }

    /// [`open`](Self::open), launching every kernel one by one when `eager` (no CUDA graphs).
    pub fn open_with(
        path: &Path,
        ordinal: usize,
        seqs: usize,
        context: usize,
        eager: bool,
    ) -> Result<Direct, GpuError> {
        let config = GpuEngineConfig {
            max_num_seqs: seqs.max(1),
            max_batched_tokens: (seqs * 8).max(2048),
            max_kv_tokens: Some(seqs * (context + 16)),
            enforce_eager: eager,
            ..GpuEngineConfig::default()
        };
        let (runner, blocks) = DeviceRunner::open(path, ordinal, &config, &GpuLoad::default())?;
        let per_seq = context.div_ceil(config.block_size);
        if blocks < per_seq * seqs {
            return Err(GpuError::Memory(format!(
                "{blocks} KV blocks, {} needed",
                per_seq * seqs
            )));
        }
        Ok(Direct {
            runner,
            per_seq,
            block_size: config.block_size,
        })
    }

    /// One step: sequence `i` runs `tokens[i]` from position `starts[i]`, each sampled greedily.
    /// Returns each sequence's greedy token.
    pub fn step(
        &mut self,
        seqs: &[usize],
        tokens: &[&[u32]],
        starts: &[usize],
    ) -> Result<Vec<u32>, GpuError> {
        let tables: Vec<Vec<usize>> = seqs
            .iter()
            .map(|&s| (s * self.per_seq..(s + 1) * self.per_seq).collect())
            .collect();
        let items: Vec<PlanItem<'_>> = tokens
            .iter()
            .zip(starts)
            .zip(&tables)
            .map(|((t, &start), blocks)| PlanItem {
                tokens: t,
                start,
                blocks,
                sample: Some(greedy_row()),
            })
            .collect();
        let plan =
            StepPlan::build(&items, self.block_size).map_err(|e| GpuError::Model(e.to_string()))?;
        let (sampled, _) = self.runner.run(&plan, &[])?;
        Ok(sampled.into_iter().map(|(t, _)| t).collect())
    }

    /// Logits of row `row` of the last step.
    pub fn logits(&self, row: usize) -> Result<Vec<f32>, GpuError> {
        self.runner
            .forward
            .logits(&self.runner.device, self.runner.weights.shape.vocab, row)
    }
}

/// Logits of the last token of `tokens`, run through `model` after what `cache` holds.
fn cpu_logits(model: &LlamaModel, cache: &mut SeqCache, tokens: &[u32]) -> Vec<f32> {
    forward(
        model,
        &mut [BatchItem {
            tokens,
            cache,
            want_logits: true,
        }],
    )
    .ok()
    .and_then(|mut l| l.remove(0))
    .unwrap_or_default()
}

/// CPU greedy decoding of `prompt` for `steps` tokens, and the first step's logits.
pub fn cpu_greedy(model: &LlamaModel, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<f32>) {
    let mut cache = SeqCache::new(model.shape.layers);
    let mut next = prompt.to_vec();
    let mut out = Vec::new();
    let mut first = Vec::new();
    for i in 0..steps {
        let logits = cpu_logits(model, &mut cache, &next);
        let t = argmax(&logits);
        if i == 0 {
            first = logits;
        }
        out.push(t);
        next = vec![t];
    }
    (out, first)
}

/// Steps where `model`'s greedy token equals `expected[i]` when fed `prompt` then `expected[..i]`
/// (teacher forcing), and the first step's logits.
pub fn cpu_forced(model: &LlamaModel, prompt: &[u32], expected: &[u32]) -> (usize, Vec<f32>) {
    let mut cache = SeqCache::new(model.shape.layers);
    let mut agree = 0;
    let mut first = Vec::new();
    for (i, &want) in expected.iter().enumerate() {
        let input = if i == 0 { prompt } else { &expected[i - 1..i] };
        let logits = cpu_logits(model, &mut cache, input);
        agree += usize::from(argmax(&logits) == want);
        if i == 0 {
            first = logits;
        }
    }
    (agree, first)
}

/// Largest |a − b| over two logits vectors.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Standard deviation of `values`.
fn std_dev(values: &[f32]) -> f32 {
    let n = values.len().max(1) as f32;
    let mean = values.iter().sum::<f32>() / n;
    (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n).sqrt()
}

/// How the GPU's greedy decoding compares with the CPU engine's on one prompt. The reference is
/// the CPU engine with its matrices in f32 ([`LlamaModel::load_dense`]): the same weights, with no
/// rounding beyond f32's. The CPU engine as it serves (Q8_0 matrices times Q8_0-quantized
/// activations) is measured against the same reference, for scale.
#[derive(Clone, Debug)]
pub struct Agreement {
    /// Steps compared.
    pub steps: usize,
    /// Steps where the GPU's greedy token equals the reference's when both are fed the reference's
    /// tokens.
    pub teacher_forced: usize,
    /// Leading steps where the GPU's and the reference's free-running greedy decodings are
    /// identical.
    pub free_prefix: usize,
    /// Largest |GPU − reference| over the first step's logits.
    pub max_abs_diff: f32,
    /// Standard deviation of the reference's first-step logits (the scale of that difference).
    pub logit_std: f32,
    /// The same teacher-forced count for the quantized CPU engine against the reference.
    pub cpu_q8_teacher_forced: usize,
    /// The same logits difference for the quantized CPU engine against the reference.
    pub cpu_q8_max_abs_diff: f32,
}

/// Compare the GPU against the CPU engine on `prompts` for `steps` greedy tokens each.
pub fn compare_with_cpu(
    path: &Path,
    ordinal: usize,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Result<Vec<Agreement>, GpuError> {
    let reference = LlamaModel::load_dense(path).map_err(|e| GpuError::Model(e.to_string()))?;
    let quantized = LlamaModel::load(path).map_err(|e| GpuError::Model(e.to_string()))?;
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut gpu = Direct::open(path, ordinal, 2, longest + steps + 1)?;
    let mut out = Vec::new();
    for prompt in prompts {
        let (ref_tokens, ref_logits) = cpu_greedy(&reference, prompt, steps);
        let (cpu_q8_teacher_forced, q8_logits) = cpu_forced(&quantized, prompt, &ref_tokens);
        // Teacher forcing on sequence 0; free running on sequence 1.
        let mut forced = 0;
        let first = gpu.step(&[0], &[prompt], &[0])?;
        let gpu_logits = gpu.logits(0)?;
        forced += usize::from(first[0] == ref_tokens[0]);
        for i in 1..steps {
            let t = gpu.step(&[0], &[&ref_tokens[i - 1..i]], &[prompt.len() + i - 1])?;
            forced += usize::from(t[0] == ref_tokens[i]);
        }
        let mut free = gpu.step(&[1], &[prompt], &[0])?[0];
        let mut free_prefix = 0;
        for (i, &expected) in ref_tokens.iter().enumerate() {
            if free != expected {
                break;
            }
            free_prefix += 1;
            if i + 1 < steps {
                free = gpu.step(&[1], &[&[free]], &[prompt.len() + i])?[0];
            }
        }
        out.push(Agreement {
            steps,
            teacher_forced: forced,
            free_prefix,
            max_abs_diff: max_abs_diff(&ref_logits, &gpu_logits),
            logit_std: std_dev(&ref_logits),
            cpu_q8_teacher_forced,
            cpu_q8_max_abs_diff: max_abs_diff(&ref_logits, &q8_logits),
        });
    }
    Ok(out)
}

/// Free-running greedy decoding of each prompt for `steps` tokens with decode steps replayed as
/// CUDA graphs and with every kernel launched one by one: per prompt, the leading steps where the
/// two agree and the largest |difference| of the first decode step's logits.
pub fn graphs_against_eager(
    path: &Path,
    ordinal: usize,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Result<Vec<(usize, f32)>, GpuError> {
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let context = longest + steps + 1;
    let mut graphs = Direct::open_with(path, ordinal, 1, context, false)?;
    let mut eager = Direct::open_with(path, ordinal, 1, context, true)?;
    let mut out = Vec::new();
    for prompt in prompts {
        let mut decoded: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
        for gpu in [&mut graphs, &mut eager] {
            let mut tokens = vec![gpu.step(&[0], &[prompt], &[0])?[0]];
            let mut logits = Vec::new();
            for i in 1..steps {
                let last = [tokens[i - 1]];
                tokens.push(gpu.step(&[0], &[&last], &[prompt.len() + i - 1])?[0]);
                if i == 1 {
                    logits = gpu.logits(0)?;
                }
            }
            decoded.push((tokens, logits));
        }
        let same = decoded[0]
            .0
            .iter()
            .zip(&decoded[1].0)
            .take_while(|(a, b)| a == b)
            .count();
        out.push((same, max_abs_diff(&decoded[0].1, &decoded[1].1)));
    }
    Ok(out)
}

/// Greedy tokens of `target` decoded alone, and decoded as one of `batch` sequences (the others
/// from `others`) stepping together.
pub fn batch_invariance(
    path: &Path,
    ordinal: usize,
    target: &[u32],
    others: &[Vec<u32>],
    steps: usize,
) -> Result<(Vec<u32>, Vec<u32>), GpuError> {
    let batch = others.len() + 1;
    let longest = others
        .iter()
        .map(|p| p.len())
        .chain([target.len()])
        .max()
        .unwrap_or(0);
    let mut gpu = Direct::open(path, ordinal, batch, longest + steps + 1)?;
    let decode = |gpu: &mut Direct, prompts: &[&[u32]]| -> Result<Vec<Vec<u32>>, GpuError> {
        let seqs: Vec<usize> = (0..prompts.len()).collect();
        let starts = vec![0; prompts.len()];
        let mut last = gpu.step(&seqs, prompts, &starts)?;
        let mut out: Vec<Vec<u32>> = last.iter().map(|&t| vec![t]).collect();
        for i in 1..steps {
            let next: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
            let refs: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
            let starts: Vec<usize> = prompts.iter().map(|p| p.len() + i - 1).collect();
            last = gpu.step(&seqs, &refs, &starts)?;
            for (o, &t) in out.iter_mut().zip(&last) {
                o.push(t);
            }
        }
        Ok(out)
    };
    let alone = decode(&mut gpu, &[target])?.remove(0);
    let mut all: Vec<&[u32]> = vec![target];
    all.extend(others.iter().map(|p| p.as_slice()));
    let together = decode(&mut gpu, &all)?.remove(0);
    Ok((alone, together))
}

/// GPU microseconds of one decode step of `batch` sequences at `context` positions each, whole and
/// per operation ([`Forward::profile`](super::Forward::profile)), after one real run of that step.
pub fn profile_decode(
    runner: &mut DeviceRunner,
    blocks: usize,
    batch: usize,
    context: usize,
    block_size: usize,
) -> Result<Vec<(&'static str, f64)>, GpuError> {
    let per_seq = context.div_ceil(block_size);
    if per_seq * batch > blocks {
        return Err(GpuError::Memory(format!(
            "{blocks} KV blocks, {} needed",
            per_seq * batch
        )));
    }
    let tables: Vec<Vec<usize>> = (0..batch)
        .map(|s| (s * per_seq..(s + 1) * per_seq).collect())
        .collect();
    let ids: Vec<[u32; 1]> = (0..batch).map(|s| [1 + s as u32]).collect();
    let items: Vec<PlanItem<'_>> = (0..batch)
        .map(|s| PlanItem {
            tokens: &ids[s],
            start: context - 1,
            blocks: &tables[s],
            sample: Some(greedy_row()),
        })
        .collect();
    let plan = StepPlan::build(&items, block_size).map_err(|e| GpuError::Model(e.to_string()))?;
    runner.run(&plan, &[])?;
    runner.device.bind()?;
    runner
        .forward
        .profile(&runner.device, &runner.weights, &plan, 10)
}

/// Throughput of `streams` sequences through the real scheduler: each with a `prompt_len`-token
/// prompt, decoding `tokens` tokens greedily. Returns (decode tokens/s over the decode phase,
/// seconds to the first token of the batch).
pub fn scheduler_throughput(
    runner: &mut DeviceRunner,
    blocks: usize,
    config: &GpuEngineConfig,
    streams: usize,
    prompt_len: usize,
    tokens: u32,
    seed: u64,
) -> (f64, f64) {
    let shape = runner.weights.shape.clone();
    let load = std::sync::Arc::new(GpuLoad::default());
    let mut config = config.clone();
    config.prefix_caching = false;
    let mut scheduler = Scheduler::new(
        config,
        blocks,
        shape.vocab,
        shape.context_length,
        load.clone(),
    );
    let mut receivers = Vec::new();
    for prompt in prompts(streams, prompt_len, shape.vocab, seed) {
        let (tx, rx) = mpsc::unbounded_channel();
        let request = EngineRequest {
            request_id: String::new(),
            model: String::new(),
            echo_text: String::new(),
            pinned_engine: None,
            resumed_outputs: 0,
            token_ids: prompt,
            sampling: SamplingOptions {
                greedy: true,
                ..SamplingOptions::default()
            },
            stop: StopConditions {
                max_tokens: Some(tokens),
                ignore_eos: true,
                ..StopConditions::default()
            },
        };
        scheduler.push(Seq::new(request, tokens, tx));
        receivers.push(rx);
    }
    let started = Instant::now();
    let mut first_token = None;
    let mut decode_start = None;
    let mut decoded_at_start = 0;
    while !scheduler.is_idle() {
        scheduler.step(runner);
        let decoded = load
            .decode_tokens
            .load(std::sync::atomic::Ordering::Relaxed);
        if first_token.is_none() && decoded > 0 {
            first_token = Some(started.elapsed().as_secs_f64());
        }
        if decode_start.is_none() && decoded as usize >= streams {
            decode_start = Some(Instant::now());
            decoded_at_start = decoded;
        }
        for rx in &mut receivers {
            while let Ok(emission) = rx.try_recv() {
                if let Emission::Failed(e) = emission {
                    tracing::error!(error = %e.message, "benchmark sequence failed");
                }
            }
        }
    }
    let decoded = load
        .decode_tokens
        .load(std::sync::atomic::Ordering::Relaxed)
        - decoded_at_start;
    let seconds = decode_start
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or(0.0);
    let rate = if seconds > 0.0 {
        decoded as f64 / seconds
    } else {
        0.0
    };
    (rate, first_token.unwrap_or(0.0))
}
