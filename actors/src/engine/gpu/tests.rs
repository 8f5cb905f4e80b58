//! Host-side tests of the GPU engine: device names, step packing, the scheduler (batching, chunked
//! prefill, prefix reuse, cancellation, preemption) over a stand-in runner, and the kernels compiled
//! to PTX by NVRTC from PyPI (no GPU needed).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::batch::{PlanItem, SampleRow, StepPlan};
use super::engine::{Emission, GpuLoad, Scheduler, Seq, StepRunner};
use super::forward::Sampled;
use super::kernels::{self, SAMPLE_PARAMS};
use super::{DeviceSpec, GpuEngineConfig, GpuError};
use crate::engine::model::synthetic::smollm2_shape;
use crate::kv::protocol::KvCacheEventData;
use crate::protocol::engine::{EngineRequest, SamplingOptions, StopConditions};
use crate::protocol::FinishReason;

#[test]
fn devices_parse_as_cpu_or_cuda() {
    assert_eq!(DeviceSpec::parse("cuda:3"), Ok(DeviceSpec::Cuda(3)));
    assert_eq!(DeviceSpec::parse("cpu:1"), Ok(DeviceSpec::Cpu(1)));
    assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
    let bad = DeviceSpec::parse("tpu:0").unwrap_err().to_string();
    assert!(bad.contains("tpu:0") && bad.contains("cuda:N"), "{bad}");
    let bad = DeviceSpec::parse("cuda:x").unwrap_err().to_string();
    assert!(bad.contains("`x` is not a device number"), "{bad}");
}

fn greedy(banned: &[u32]) -> SampleRow<'_> {
    SampleRow {
        temperature: 0.0,
        top_p: 1.0,
        min_p: 0.0,
        top_k: 0,
        seed: 0x1_0000_0002,
        step: 5,
        banned,
    }
}

#[test]
fn a_step_packs_slots_tables_rows_and_parameters() {
    let banned = [7u32, 9];
    let items = [
        PlanItem {
            tokens: &[10, 11, 12],
            start: 0,
            blocks: &[4, 2],
            sample: None,
        },
        PlanItem {
            tokens: &[20],
            start: 5,
            blocks: &[1, 3, 8],
            sample: Some(greedy(&banned)),
        },
    ];
    let plan = StepPlan::build(&items, 4).expect("plan");
    assert_eq!(
        (plan.tokens, plan.seqs, plan.rows, plan.max_blocks),
        (4, 2, 1, 2)
    );
    assert_eq!(plan.max_context, 6);
    let d = &plan.data;
    let at = plan.at;
    assert_eq!(&d[at.ids..at.ids + 4], &[10, 11, 12, 20]);
    assert_eq!(&d[at.pos..at.pos + 4], &[0, 1, 2, 5]);
    // Position 5 of the second sequence: block index 1 → block 3, offset 1 → slot 13.
    assert_eq!(&d[at.slots..at.slots + 4], &[16, 17, 18, 13]);
    assert_eq!(&d[at.seq..at.seq + 4], &[0, 0, 0, 1]);
    assert_eq!(&d[at.tables..at.tables + 4], &[4, 0, 1, 3]);
    assert_eq!(d[at.rows], 3, "the logits row is the sequence's last token");
    let p = &d[at.params..at.params + SAMPLE_PARAMS];
    assert_eq!(p[4], 2);
    assert_eq!(p[5], 1);
    assert_eq!((p[6], p[7], p[8]), (5, 0, 2));
    assert_eq!(&d[at.banned..], &[7, 9]);
}

#[test]
fn a_decode_step_pads_to_its_graph_layout_and_keeps_every_value() {
    let banned = [7u32, 9];
    let row = greedy(&banned);
    let (b0, b1, b2) = ([3usize, 8], [5usize], [1usize, 2, 6]);
    let items = [
        PlanItem {
            tokens: &[11],
            start: 20,
            blocks: &b0,
            sample: Some(row.clone()),
        },
        PlanItem {
            tokens: &[12],
            start: 3,
            blocks: &b1,
            sample: Some(greedy(&[])),
        },
        PlanItem {
            tokens: &[13],
            start: 40,
            blocks: &b2,
            sample: Some(row.clone()),
        },
    ];
    let plan = StepPlan::build(&items, 16).expect("plan");
    assert!(plan.is_decode());
    let scratch = 99;
    let padded = plan.padded(4, 8, scratch).expect("padded");
    let (a, p) = (plan.at, padded.at);
    assert_eq!(
        (padded.tokens, padded.seqs, padded.rows, padded.max_blocks),
        (4, 4, 4, 8)
    );
    assert_eq!(
        p,
        super::batch::Offsets::layout(4, 4, 4, 8),
        "offsets depend on (batch, width) only"
    );
    for (from, to) in [
        (a.ids, p.ids),
        (a.pos, p.pos),
        (a.slots, p.slots),
        (a.seq, p.seq),
        (a.rows, p.rows),
    ] {
        assert_eq!(padded.data[to..to + 3], plan.data[from..from + 3]);
    }
    for s in 0..3 {
        let src = &plan.data[a.tables + s * plan.max_blocks..][..plan.max_blocks];
        assert_eq!(
            &padded.data[p.tables + s * 8..][..plan.max_blocks],
            src,
            "table row {s}"
        );
    }
    assert_eq!(
        padded.data[p.params..p.params + 3 * SAMPLE_PARAMS],
        plan.data[a.params..a.params + 3 * SAMPLE_PARAMS]
    );
    assert_eq!(
        padded.data[p.banned..],
        [7, 9, 7, 9],
        "banned ids keep their offsets"
    );
    // The padding row: token 0 at position 0, written to the scratch block, sampled greedily.
    assert_eq!((padded.data[p.ids + 3], padded.data[p.pos + 3]), (0, 0));
    assert_eq!(padded.data[p.slots + 3], (scratch * 16) as i32);
    assert_eq!(
        (padded.data[p.seq + 3], padded.data[p.tables + 3 * 8]),
        (3, scratch as i32)
    );
    assert_eq!(padded.data[p.rows + 3], 3);
    let params = &padded.data[p.params + 3 * SAMPLE_PARAMS..][..SAMPLE_PARAMS];
    assert_eq!(f32::from_bits(params[0] as u32), 0.0, "greedy");
    assert_eq!(params[8], 0, "nothing banned");
    // Too small a graph, too narrow a table, or a step that prefills: no padded layout.
    assert!(plan.padded(2, 8, scratch).is_none());
    assert!(plan.padded(4, 2, scratch).is_none());
    let prefill = [PlanItem {
        tokens: &[1, 2],
        start: 0,
        blocks: &b1,
        sample: Some(greedy(&[])),
    }];
    assert!(StepPlan::build(&prefill, 16)
        .expect("plan")
        .padded(4, 8, scratch)
        .is_none());
}

#[test]
fn decode_steps_map_to_graph_buckets() {
    use super::forward::graph_key;
    assert_eq!(graph_key(1, 1, 256, 512), Some((1, 4)));
    assert_eq!(graph_key(3, 5, 256, 512), Some((4, 8)));
    assert_eq!(graph_key(17, 9, 256, 512), Some((24, 16)));
    assert_eq!(graph_key(129, 300, 256, 512), Some((160, 512)));
    // Capped by the largest batch and the widest table.
    assert_eq!(graph_key(100, 3, 100, 512), Some((100, 4)));
    assert_eq!(graph_key(1, 300, 256, 300), Some((1, 300)));
    assert_eq!(graph_key(257, 3, 256, 512), None);
    assert_eq!(graph_key(0, 3, 256, 512), None);
    assert_eq!(graph_key(1, 600, 256, 512), None);
}

#[test]
fn a_step_without_enough_blocks_is_refused() {
    let items = [PlanItem {
        tokens: &[1, 2, 3, 4, 5],
        start: 0,
        blocks: &[0],
        sample: None,
    }];
    let e = StepPlan::build(&items, 4).unwrap_err();
    assert!(e.to_string().contains("needs 2 KV blocks"), "{e}");
}

/// Runs nothing: each sampled row's token is its position (its last token's row index + 100), so
/// tests can follow what the scheduler asked for.
#[derive(Default)]
struct Fake {
    plans: Vec<StepPlan>,
    host_rows: Vec<Vec<usize>>,
    fail: bool,
}

impl StepRunner for Fake {
    fn run(
        &mut self,
        plan: &StepPlan,
        host_rows: &[usize],
    ) -> Result<(Vec<Sampled>, Vec<Vec<f32>>), GpuError> {
        if self.fail {
            return Err(GpuError::Model("device lost".into()));
        }
        self.plans.push(plan.clone());
        self.host_rows.push(host_rows.to_vec());
        let sampled = (0..plan.rows)
            .map(|r| {
                let row = plan.data[plan.at.rows + r] as usize;
                (plan.data[plan.at.pos + row] as u32 + 100, -0.5)
            })
            .collect();
        let logits = host_rows
            .iter()
            .map(|_| {
                let mut l = vec![0f32; 1000];
                l[42] = 10.0;
                l
            })
            .collect();
        Ok((sampled, logits))
    }
}

fn request(prompt: Vec<u32>, max_tokens: u32) -> EngineRequest {
    EngineRequest {
        request_id: "r".into(),
        model: "m".into(),
        token_ids: prompt,
        echo_text: String::new(),
        sampling: SamplingOptions {
            greedy: true,
            ..SamplingOptions::default()
        },
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            ..StopConditions::default()
        },
        pinned_engine: None,
        resumed_outputs: 0,
    }
}

fn config(max_batched_tokens: usize) -> GpuEngineConfig {
    GpuEngineConfig {
        max_num_seqs: 8,
        max_batched_tokens,
        block_size: 4,
        ..GpuEngineConfig::default()
    }
}

fn scheduler(config: GpuEngineConfig, blocks: usize) -> (Scheduler, Arc<GpuLoad>) {
    let load = Arc::new(GpuLoad::default());
    (
        Scheduler::new(config, blocks, 1000, 512, load.clone()),
        load,
    )
}

fn push(s: &mut Scheduler, req: EngineRequest) -> mpsc::UnboundedReceiver<Emission> {
    let (tx, rx) = mpsc::unbounded_channel();
    let max = req.stop.max_tokens.unwrap_or(16);
    s.push(Seq::new(req, max, tx));
    rx
}

fn tokens(rx: &mut mpsc::UnboundedReceiver<Emission>) -> (Vec<u32>, Option<FinishReason>) {
    let mut out = Vec::new();
    let mut finish = None;
    while let Ok(e) = rx.try_recv() {
        match e {
            Emission::Output(o) => {
                out.extend(o.token_ids);
                finish = finish.or(o.finish_reason);
            }
            Emission::Failed(e) => panic!("failed: {}", e.message),
        }
    }
    (out, finish)
}

#[test]
fn long_prompts_prefill_in_chunks_while_others_decode() {
    let (mut s, load) = scheduler(config(8), 64);
    let mut fake = Fake::default();
    let mut a = push(&mut s, request((1..=3).collect(), 4));
    s.step(&mut fake);
    // a is decoding; b's 10-token prompt arrives and is prefilled 7 + 3 beside a's decode tokens.
    let mut b = push(&mut s, request((1..=10).collect(), 2));
    s.step(&mut fake);
    s.step(&mut fake);
    let p = &fake.plans;
    assert_eq!(p[0].tokens, 3);
    assert_eq!(
        (p[1].tokens, p[1].rows),
        (8, 1),
        "a's decode token + 7 of b's prompt, only a samples"
    );
    assert_eq!(
        (p[2].tokens, p[2].rows),
        (4, 2),
        "a's decode token + b's last 3, both sample"
    );
    while s.step(&mut fake) {}
    assert_eq!(
        tokens(&mut a),
        (vec![102, 103, 104, 105], Some(FinishReason::Length))
    );
    assert_eq!(tokens(&mut b), (vec![109, 110], Some(FinishReason::Length)));
    assert_eq!(
        s.blocks_in_use(),
        0,
        "finished sequences give their blocks back"
    );
    assert_eq!(load.decode_tokens.load(Ordering::Relaxed), 6);
    assert!(fake.plans.iter().all(|p| p.tokens <= 8));
}

#[test]
fn a_repeated_prompt_reuses_the_cached_prefix_and_announces_its_blocks() {
    let (mut s, load) = scheduler(config(64), 64);
    let mut fake = Fake::default();
    let prompt: Vec<u32> = (1..=10).collect();
    let mut a = push(&mut s, request(prompt.clone(), 1));
    while s.step(&mut fake) {}
    tokens(&mut a);
    let events = s.take_events();
    let stored: usize = events
        .iter()
        .map(|e| match e {
            KvCacheEventData::Stored(d) => d.blocks.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(
        stored, 2,
        "two full blocks of 4 in a 10-token prompt (+1 generated)"
    );
    let mut b = push(&mut s, request(prompt, 1));
    s.step(&mut fake);
    let last = fake.plans.last().expect("plan");
    assert_eq!(last.tokens, 2, "8 prompt tokens come from the cache");
    assert_eq!(last.data[last.at.pos], 8);
    assert_eq!(load.cached_tokens.load(Ordering::Relaxed), 8);
    assert_eq!(tokens(&mut b).0, vec![109]);
}

#[test]
fn a_cancelled_request_frees_its_blocks_at_the_next_step() {
    let (mut s, _) = scheduler(config(64), 64);
    let mut fake = Fake::default();
    let rx = push(&mut s, request((1..=9).collect(), 100));
    s.step(&mut fake);
    assert_eq!(s.blocks_in_use(), 3);
    drop(rx);
    assert!(!s.step(&mut fake));
    assert_eq!(s.blocks_in_use(), 0);
    assert!(s.is_idle());
}

#[test]
fn when_blocks_run_out_the_newest_sequence_is_preempted_and_finishes_later() {
    // 4 blocks of 4 tokens: two 4-token prompts fit, but both cannot grow past 8 tokens.
    let (mut s, load) = scheduler(config(64), 4);
    let mut fake = Fake::default();
    let mut a = push(&mut s, request(vec![1, 2, 3, 4], 6));
    let mut b = push(&mut s, request(vec![5, 6, 7, 8], 6));
    while s.step(&mut fake) {}
    let (ta, fa) = tokens(&mut a);
    let (tb, fb) = tokens(&mut b);
    assert_eq!((ta.len(), fa), (6, Some(FinishReason::Length)));
    assert_eq!((tb.len(), fb), (6, Some(FinishReason::Length)));
    assert!(load.preemptions.load(Ordering::Relaxed) >= 1);
    assert_eq!(s.blocks_in_use(), 0);
}

#[test]
fn stop_tokens_finish_only_after_min_tokens_and_are_banned_before() {
    let (mut s, _) = scheduler(config(64), 64);
    let mut fake = Fake::default();
    let mut req = request(vec![1, 2, 3], 10);
    // The fake samples position + 100: 102 first, then 103, 104.
    req.stop.stop_token_ids = vec![102, 104];
    req.stop.min_tokens = 2;
    let mut rx = push(&mut s, req);
    while s.step(&mut fake) {}
    let first = &fake.plans[0];
    let p = &first.data[first.at.params..first.at.params + SAMPLE_PARAMS];
    assert_eq!(p[8], 2, "stop tokens are banned before min_tokens");
    assert_eq!(
        tokens(&mut rx),
        (vec![102, 103, 104], Some(FinishReason::Stop))
    );
}

#[test]
fn penalties_and_top_logprobs_take_the_host_sampler() {
    let (mut s, _) = scheduler(config(64), 64);
    let mut fake = Fake::default();
    let mut req = request(vec![1, 2, 3], 1);
    req.sampling.frequency_penalty = Some(0.5);
    let mut rx = push(&mut s, req);
    let mut plain = push(&mut s, request(vec![4, 5], 1));
    while s.step(&mut fake) {}
    assert_eq!(fake.host_rows[0], vec![0]);
    assert_eq!(
        tokens(&mut rx).0,
        vec![42],
        "the host sampler read the downloaded logits"
    );
    assert_eq!(tokens(&mut plain).0, vec![101]);
}

#[test]
fn a_failed_step_fails_every_sequence_with_the_reason() {
    let (mut s, _) = scheduler(config(64), 64);
    let mut fake = Fake {
        fail: true,
        ..Fake::default()
    };
    let mut rx = push(&mut s, request(vec![1, 2], 4));
    assert!(!s.step(&mut fake));
    match rx.try_recv() {
        Ok(Emission::Failed(e)) => assert!(e.message.contains("device lost"), "{}", e.message),
        _ => panic!("expected a failure"),
    }
    assert_eq!(s.blocks_in_use(), 0);
}

/// A step that fails and leaves the device unusable (a sticky CUDA error).
struct Faulted;

impl StepRunner for Faulted {
    fn run(
        &mut self,
        _plan: &StepPlan,
        _host_rows: &[usize],
    ) -> Result<(Vec<Sampled>, Vec<Vec<f32>>), GpuError> {
        Err(GpuError::Model(
            "an illegal memory access was encountered".into(),
        ))
    }

    fn fault(&mut self) -> Option<String> {
        Some("CUDA_ERROR_ILLEGAL_ADDRESS".into())
    }
}

#[test]
fn a_step_that_leaves_the_device_unusable_drops_its_sequences_for_a_rebuilt_engine() {
    let (mut s, load) = scheduler(config(64), 64);
    let mut a = push(&mut s, request(vec![1, 2], 4));
    let mut b = push(&mut s, request(vec![3, 4, 5], 4));
    assert!(!s.step(&mut Faulted));
    let fault = s.take_fault().expect("the fault is reported");
    assert!(
        fault.contains("illegal memory access") && fault.contains("ILLEGAL_ADDRESS"),
        "{fault}"
    );
    assert!(s.take_fault().is_none(), "reported once");
    // No last word: the requests' relays end without a result, which is what makes the engine
    // panic, be rebuilt by its supervisor and retry them.
    for rx in [&mut a, &mut b] {
        assert!(matches!(
            rx.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected)
        ));
    }
    assert_eq!(s.blocks_in_use(), 0);
    assert_eq!(load.running.load(Ordering::Relaxed), 0);
}

/// NVRTC from PyPI (pinned), loaded by absolute path.
fn nvrtc_from_pypi() {
    use crate::models::{ModelStore, NVRTC_CU12, NVRTC_CU12_LIB_DIR};
    let store = ModelStore::default();
    store
        .ensure(&NVRTC_CU12, &mut |_| {})
        .unwrap_or_else(|e| panic!("cannot pull {}: {e}", NVRTC_CU12.requirement()));
    let dir = store.package_dir(&NVRTC_CU12).join(NVRTC_CU12_LIB_DIR);
    let loaded = super::device::preload(std::slice::from_ref(&dir));
    assert!(
        loaded.len() >= 2,
        "loaded {loaded:?} from {}",
        dir.display()
    );
}

#[test]
fn every_kernel_compiles_to_ptx_with_nvrtc() {
    nvrtc_from_pypi();
    let mut other = smollm2_shape();
    // A Llama-3-8B-like shape as well: head size 128, 4 query heads per KV head, 128k vocabulary.
    other.head_dim = 128;
    other.heads = 32;
    other.kv_heads = 8;
    other.hidden = 4096;
    other.vocab = 128_256;
    for (shape, arch) in [(smollm2_shape(), (9, 0)), (other, (8, 0))] {
        let ptx = kernels::compile(&shape, arch).unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        for name in kernels::KERNEL_NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "kernel {name} missing from the PTX"
            );
        }
        assert!(text.contains(&format!(".target sm_{}{}", arch.0, arch.1)));
    }
}

#[test]
fn a_model_outside_the_kernels_shapes_is_refused_clearly() {
    let mut shape = smollm2_shape();
    shape.head_dim = 60;
    let e = kernels::check_shape(&shape).unwrap_err().to_string();
    assert!(e.contains("head size 60"), "{e}");
    let mut shape = smollm2_shape();
    shape.heads = 24;
    let e = kernels::check_shape(&shape).unwrap_err().to_string();
    assert!(e.contains("24 query heads over 3 KV heads"), "{e}");
}

#[test]
fn gpu_engine_config_rejects_bad_values() {
    let bad = GpuEngineConfig {
        gpu_memory_utilization: 1.5,
        ..GpuEngineConfig::default()
    };
    assert_eq!(
        bad.validate().unwrap_err().key,
        "gpu_engine.gpu_memory_utilization"
    );
    let bad = GpuEngineConfig {
        max_batched_tokens: 4,
        max_num_seqs: 8,
        ..GpuEngineConfig::default()
    };
    assert_eq!(
        bad.validate().unwrap_err().key,
        "gpu_engine.max_batched_tokens"
    );
    assert!(GpuEngineConfig::default().validate().is_ok());
}

#[test]
fn a_random_model_loads_and_decodes_on_the_cpu_engine() {
    let dir = std::env::temp_dir().join(format!("dynamix-random-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("tiny.gguf");
    let shape = crate::engine::model::ModelShape {
        layers: 2,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        ffn: 128,
        vocab: 256,
        context_length: 128,
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
    };
    crate::engine::model::synthetic::write_random_llama(&path, &shape, 3, None).expect("written");
    let model = crate::engine::model::LlamaModel::load(&path).expect("loads");
    assert_eq!(model.shape, shape);
    let prompt = super::check::prompts(1, 5, shape.vocab, 1).remove(0);
    let (a, logits) = super::check::cpu_greedy(&model, &prompt, 8);
    let (b, _) = super::check::cpu_greedy(&model, &prompt, 8);
    assert_eq!(a, b);
    assert_eq!(logits.len(), 256);
    // The same seed writes the same file.
    let again = dir.join("again.gguf");
    crate::engine::model::synthetic::write_random_llama(&again, &shape, 3, None).expect("written");
    assert_eq!(std::fs::read(&path).ok(), std::fs::read(&again).ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_prompt_larger_than_the_whole_cache_fails_instead_of_waiting_forever() {
    let (mut s, _) = scheduler(config(64), 2);
    let mut fake = Fake::default();
    let mut rx = push(&mut s, request((1..=9).collect(), 4));
    let mut ok = push(&mut s, request(vec![1, 2], 1));
    while s.step(&mut fake) {}
    match rx.try_recv() {
        Ok(Emission::Failed(e)) => assert!(
            e.message.contains("needs 3 KV blocks") && e.message.contains("holds 2 blocks"),
            "{}",
            e.message
        ),
        _ => panic!("expected a failure"),
    }
    assert_eq!(tokens(&mut ok).0, vec![101], "the next request still runs");
    assert!(s.is_idle());
}
