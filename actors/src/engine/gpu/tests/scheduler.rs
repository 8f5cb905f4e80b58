//! The scheduler over a stand-in runner: batching, chunked prefill, prefix reuse, cancellation,
//! preemption, stop tokens, failed steps and prompts larger than the cache.

use super::*;

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
