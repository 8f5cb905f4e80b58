//! GPU engine benchmark on one NVIDIA GPU, on random weights of SmolLM2's shape (or a GGUF given as
//! the first argument): single-stream decode, aggregate decode at 1/8/32/128 streams, TTFT for a
//! 512-token prompt, KV-cache capacity; each against the bandwidth ceiling (weight bytes per step
//! over HBM bandwidth). Prints "skipped" without a GPU.
//!
//!   cargo bench --bench gpu [-- model.gguf]
//!   GPU_BENCH_HBM_GBPS (default 4800, the H200's datasheet bandwidth)

use std::time::Instant;

use dynamix_actors::engine::gpu::check;
use dynamix_actors::engine::gpu::engine::{DeviceRunner, GpuLoad};
use dynamix_actors::engine::gpu::{self, GpuEngineConfig};
use dynamix_actors::engine::model::synthetic::{smollm2_shape, write_random_llama};

fn main() {
    let gpus = match gpu::probe() {
        Ok(gpus) if !gpus.is_empty() => gpus,
        Ok(_) => return println!("skipped: no CUDA device"),
        Err(e) => return println!("skipped: {e}"),
    };
    let path = match std::env::args().nth(1).filter(|a| !a.starts_with('-')) {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let p = std::env::temp_dir().join("dynamix-gpu-bench.gguf");
            let t = Instant::now();
            if let Err(e) = write_random_llama(&p, &smollm2_shape(), 7, None) {
                fail(&format!("cannot write the random model: {e}"));
            }
            println!(
                "random SmolLM2-shaped model written in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            p
        }
    };
    let hbm: f64 = std::env::var("GPU_BENCH_HBM_GBPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4800.0);
    println!(
        "device: {} ({} MiB, sm_{}{})",
        gpus[0].name,
        gpus[0].total_memory >> 20,
        gpus[0].compute_capability.0,
        gpus[0].compute_capability.1
    );
    let config = GpuEngineConfig::default();
    let load = GpuLoad::default();
    let t = Instant::now();
    let (runner, _) = DeviceRunner::open(&path, 0, &config, &load)
        .unwrap_or_else(|e| fail(&format!("the engine did not open: {e}")));
    let cold = t.elapsed().as_secs_f64();
    let cold_load_ms = load.load_ms.load(std::sync::atomic::Ordering::Relaxed);
    // What a restarted engine does: the old one (and its KV pool) goes, the new one re-attaches the
    // weights this process already put on the GPU.
    drop(runner);
    let t = Instant::now();
    let (mut runner, blocks) = DeviceRunner::open(&path, 0, &config, &load)
        .unwrap_or_else(|e| fail(&format!("the engine did not re-open: {e}")));
    let warm = t.elapsed().as_secs_f64();
    let bytes = runner.weights.bytes_per_step();
    let ceiling = hbm * 1e9 / bytes as f64;
    println!(
        "weights: {:.1} MB bf16 read per step; ceiling {:.0} steps/s at {hbm} GB/s",
        bytes as f64 / 1e6,
        ceiling
    );
    println!(
        "open: cold {:.2} s (weights load {} ms), re-attach {:.3} s",
        cold, cold_load_ms, warm
    );
    println!(
        "kv cache: {} blocks x {} tokens = {} tokens",
        blocks,
        config.block_size,
        blocks * config.block_size
    );
    for (name, regs, local, shared) in runner.device.kernel_resources() {
        println!(
            "kernel {name:<18} {regs:>3} registers, {local:>4} B local (spills), {shared:>6} B shared"
        );
    }
    decode_rates(&mut runner, blocks, &config, ceiling, "CUDA graphs");
    // Where a decode step's time goes: each operation alone, replayed from a graph.
    for (batch, context) in [(1usize, 256usize), (8, 256), (32, 256), (128, 256)] {
        match check::profile_decode(&mut runner, blocks, batch, context, config.block_size) {
            Ok(times) => {
                let line: Vec<String> = times
                    .iter()
                    .map(|(op, us)| format!("{op} {us:.1}"))
                    .collect();
                println!(
                    "decode step profile, batch {batch}, context {context} (GPU us per step): {}",
                    line.join(", ")
                );
            }
            Err(e) => println!("decode step profile, batch {batch}: failed: {e}"),
        }
    }
    let mut ttfts = Vec::new();
    for i in 0..5 {
        let (_, ttft) =
            check::scheduler_throughput(&mut runner, blocks, &config, 1, 512, 1, 100 + i);
        ttfts.push(ttft * 1e3);
    }
    ttfts.sort_by(f64::total_cmp);
    println!(
        "TTFT, 512-token prompt: median {:.2} ms (min {:.2}, max {:.2})",
        ttfts[2], ttfts[0], ttfts[4]
    );
    // The same decode without graphs, for what they buy (the first engine and its pool go first).
    drop(runner);
    let eager = GpuEngineConfig {
        enforce_eager: true,
        ..config
    };
    match DeviceRunner::open(&path, 0, &eager, &load) {
        Ok((mut runner, blocks)) => decode_rates(&mut runner, blocks, &eager, ceiling, "eager"),
        Err(e) => println!("eager run skipped: the engine did not re-open: {e}"),
    }
}

/// Single-stream and aggregate decode through the scheduler, printed against the ceiling.
fn decode_rates(
    runner: &mut DeviceRunner,
    blocks: usize,
    config: &GpuEngineConfig,
    ceiling: f64,
    mode: &str,
) {
    // Each run twice, the first as warm-up (cuBLAS heuristics, the PTX's JIT, and the capture of the
    // graphs its batch buckets and table widths need, as a serving engine has after its first
    // requests).
    let (single, _) = (0..2)
        .map(|_| check::scheduler_throughput(runner, blocks, config, 1, 32, 256, 2))
        .last()
        .unwrap_or_default();
    println!(
        "[{mode}] single-stream decode: {:.0} tok/s ({:.1}% of the bandwidth ceiling)",
        single,
        100.0 * single / ceiling
    );
    for streams in [1usize, 8, 32, 128] {
        let seed = 3 + streams as u64;
        let (rate, _) = (0..2)
            .map(|_| check::scheduler_throughput(runner, blocks, config, streams, 32, 128, seed))
            .last()
            .unwrap_or_default();
        let steps = rate / streams as f64;
        println!("[{mode}] aggregate decode, {streams:>3} streams: {:.0} tok/s ({:.0} steps/s, {:.1}% of the ceiling's steps/s)", rate, steps, 100.0 * steps / ceiling);
    }
    if let Some((graphs, time)) = runner.forward.graph_stats() {
        println!(
            "[{mode}] {graphs} decode graphs captured in {:.1} ms ({:.2} ms each)",
            time.as_secs_f64() * 1e3,
            time.as_secs_f64() * 1e3 / graphs.max(1) as f64
        );
    }
}

/// Print why the benchmark cannot go on and exit non-zero.
fn fail(why: &str) -> ! {
    eprintln!("error: {why}");
    std::process::exit(1)
}
