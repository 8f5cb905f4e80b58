//! The GPU engine on a real NVIDIA GPU: greedy tokens and first-step logits against the CPU engine
//! on the same random weights (SmolLM2's shape, drawn from a seed on each machine), batch
//! invariance, and a request served over HTTP from `cuda:0`.
//!
//! Without a GPU every test here prints why and passes without checking anything: CI has no GPU.
//! `scripts/gpu-check.sh` runs this binary on a GPU machine.

use std::path::PathBuf;
use std::sync::OnceLock;

use dynamix_actors::engine::gpu::{self, check};
use dynamix_actors::engine::model::synthetic::{smollm2_shape, write_random_llama};
use dynamix_actors::engine::model::ModelShape;

/// Why the GPU tests cannot run here, or `None` when a GPU is present.
fn skip_reason() -> Option<String> {
    match gpu::probe() {
        Ok(gpus) if !gpus.is_empty() => None,
        Ok(_) => Some("no CUDA device".into()),
        Err(e) => Some(e.to_string()),
    }
}

macro_rules! require_gpu {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

/// SmolLM2's shape, or a tiny one with `DYNAMIX_GPU_TEST_SHAPE=tiny` (for the CPU emulation of the
/// CUDA libraries in scripts/kernel-emulation, where SmolLM2's size would take hours).
fn shape() -> ModelShape {
    if std::env::var("DYNAMIX_GPU_TEST_SHAPE").as_deref() == Ok("tiny") {
        ModelShape {
            layers: 2,
            hidden: 192,
            heads: 6,
            kv_heads: 2,
            head_dim: 32,
            ffn: 256,
            vocab: 2048,
            context_length: 256,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
        }
    } else {
        smollm2_shape()
    }
}

/// The random model (seed 7), written once per test binary.
fn random_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dynamix-gpu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("random-smollm2.gguf");
        write_random_llama(&path, &shape(), 7, None).expect("random model");
        path
    })
    .clone()
}

#[test]
fn greedy_tokens_and_logits_agree_with_the_cpu_engine() {
    require_gpu!();
    let path = random_model();
    let shape = shape();
    let prompts = check::prompts(4, 24, shape.vocab, 11);
    let report = check::compare_with_cpu(&path, 0, &prompts, 64).expect("comparison runs");
    for (i, a) in report.iter().enumerate() {
        println!(
            "prompt {i}: teacher-forced agreement {}/{}, free-running identical prefix {}/{}, first-step logits max |diff| {:.4} (logit std {:.3})",
            a.teacher_forced, a.steps, a.free_prefix, a.steps, a.max_abs_diff, a.logit_std
        );
    }
    for a in &report {
        assert!(
            a.teacher_forced >= 60,
            "greedy tokens agree on {}/{} steps",
            a.teacher_forced,
            a.steps
        );
        // bf16 weights and KV on the GPU against Q8_0 on the CPU: differences of a few percent of
        // the logits' spread.
        assert!(
            a.max_abs_diff <= 0.1 * a.logit_std.max(1e-3) + 0.05,
            "first-step logits differ by {} (std {})",
            a.max_abs_diff,
            a.logit_std
        );
    }
}

#[test]
fn a_request_decodes_the_same_alone_and_in_a_batch_of_32() {
    require_gpu!();
    let path = random_model();
    let shape = shape();
    let mut prompts = check::prompts(32, 20, shape.vocab, 23);
    let target = prompts.remove(0);
    let (alone, together) = check::batch_invariance(&path, 0, &target, &prompts, 64).expect("runs");
    let same = alone
        .iter()
        .zip(&together)
        .take_while(|(a, b)| a == b)
        .count();
    println!("batch invariance: identical prefix {same}/{}", alone.len());
    assert_eq!(
        alone, together,
        "greedy tokens differ between a lone run and a batch of 32"
    );
}
