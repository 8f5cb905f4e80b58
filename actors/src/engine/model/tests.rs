//! Tests over the real SmolLM2 weights (pulled on demand like the tokenizer tests).

use std::sync::{Arc, OnceLock};

use super::forward::{forward, BatchItem, SeqCache};
use super::sampler::argmax;
use super::LlamaModel;
use crate::models::tests::smollm2_gguf;
use crate::tokenizer::{ChatMessage, ModelTokenizer};

/// Model and tokenizer, loaded once per test binary.
pub(crate) fn smollm2() -> (Arc<LlamaModel>, Arc<ModelTokenizer>) {
    static LOADED: OnceLock<(Arc<LlamaModel>, Arc<ModelTokenizer>)> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let path = smollm2_gguf();
            let model = LlamaModel::load(&path)
                .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
            let tok = ModelTokenizer::from_gguf(&path)
                .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
            (Arc::new(model), Arc::new(tok))
        })
        .clone()
}

fn chat_prompt(tok: &ModelTokenizer, question: &str) -> Vec<u32> {
    let text = tok
        .render_chat(&[ChatMessage::new("user", question)], true)
        .expect("template renders");
    tok.encode(&text).expect("encodes")
}

/// Greedy decoding of one sequence, one token per forward pass.
fn greedy(model: &LlamaModel, prompt: &[u32], steps: usize, eos: u32) -> Vec<u32> {
    let mut cache = SeqCache::new(model.shape.layers);
    let mut next = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..steps {
        let logits = forward(
            model,
            &mut [BatchItem {
                tokens: &next,
                cache: &mut cache,
                want_logits: true,
            }],
        )
        .expect("forward")
        .remove(0)
        .expect("logits");
        let t = argmax(&logits);
        if t == eos {
            break;
        }
        out.push(t);
        next = vec![t];
    }
    out
}

#[test]
fn greedy_answer_names_paris() {
    let (model, tok) = smollm2();
    assert_eq!(model.shape.layers, 30);
    assert_eq!(model.shape.hidden, 576);
    assert_eq!((model.shape.heads, model.shape.kv_heads), (9, 3));
    let prompt = chat_prompt(&tok, "What is the capital of France?");
    let out = greedy(&model, &prompt, 24, tok.eos_token_id());
    let text = tok.decode(&out, true).expect("decodes");
    assert!(text.contains("Paris"), "answer: {text:?}");
}

#[test]
fn batched_sequences_match_their_single_runs() {
    // Two different prompts of different lengths, prefilled in one pass (one in two chunks), then
    // decoded together: each must produce exactly what it produces alone.
    let (model, tok) = smollm2();
    let a = chat_prompt(&tok, "What is the capital of France?");
    let b = chat_prompt(&tok, "Name three colours of the rainbow.");
    let alone_a = greedy(&model, &a, 8, u32::MAX);
    let alone_b = greedy(&model, &b, 8, u32::MAX);
    let (mut ca, mut cb) = (
        SeqCache::new(model.shape.layers),
        SeqCache::new(model.shape.layers),
    );
    // Step 1: all of a, the first half of b (no logits for b).
    let half = b.len() / 2;
    let logits = forward(
        &model,
        &mut [
            BatchItem {
                tokens: &a,
                cache: &mut ca,
                want_logits: true,
            },
            BatchItem {
                tokens: &b[..half],
                cache: &mut cb,
                want_logits: false,
            },
        ],
    )
    .expect("forward");
    assert!(logits[1].is_none());
    let mut ta = argmax(logits[0].as_ref().expect("a's logits"));
    let mut got_a = vec![ta];
    // Step 2: a decodes, b finishes its prompt.
    let logits = forward(
        &model,
        &mut [
            BatchItem {
                tokens: &[ta],
                cache: &mut ca,
                want_logits: true,
            },
            BatchItem {
                tokens: &b[half..],
                cache: &mut cb,
                want_logits: true,
            },
        ],
    )
    .expect("forward");
    ta = argmax(logits[0].as_ref().expect("a"));
    got_a.push(ta);
    let mut tb = argmax(logits[1].as_ref().expect("b"));
    let mut got_b = vec![tb];
    for _ in 0..6 {
        let logits = forward(
            &model,
            &mut [
                BatchItem {
                    tokens: &[ta],
                    cache: &mut ca,
                    want_logits: true,
                },
                BatchItem {
                    tokens: &[tb],
                    cache: &mut cb,
                    want_logits: true,
                },
            ],
        )
        .expect("forward");
        ta = argmax(logits[0].as_ref().expect("a"));
        tb = argmax(logits[1].as_ref().expect("b"));
        got_a.push(ta);
        got_b.push(tb);
    }
    got_a.truncate(8);
    got_b.truncate(7);
    assert_eq!(got_a, alone_a);
    assert_eq!(got_b, alone_b[..7]);
    assert_eq!(ca.len(), a.len() + 7);
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let (model, _) = smollm2();
    let mut cache = SeqCache::new(model.shape.layers);
    let vocab = model.shape.vocab as u32;
    let err = forward(
        &model,
        &mut [BatchItem {
            tokens: &[vocab + 5],
            cache: &mut cache,
            want_logits: true,
        }],
    )
    .expect_err("out-of-vocabulary token is an error");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert!(cache.is_empty(), "nothing was cached");
}

/// A GPU memory service (host backend) on its own thread; returns its socket.
fn gms_server(dir: &std::path::Path) -> std::path::PathBuf {
    use crate::gms::{backend, BackendKind, GmsConfig, GmsServer};
    let socket = dir.join("gms_weights.sock");
    let path = socket.clone();
    std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let config = GmsConfig {
                device: 0,
                tag: "weights".into(),
                socket_path: path,
                alloc_retry_interval: std::time::Duration::from_millis(10),
                alloc_retry_timeout: Some(std::time::Duration::from_secs(1)),
            };
            let server = GmsServer::bind(
                config,
                backend::open(BackendKind::Host, 0, None).expect("host"),
            )
            .expect("bind");
            server.serve(futures_util::future::pending()).await;
        })
    });
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    socket
}

fn last_logits(model: &LlamaModel, prompt: &[u32]) -> Vec<f32> {
    let mut cache = SeqCache::new(model.shape.layers);
    forward(
        model,
        &mut [BatchItem {
            tokens: prompt,
            cache: &mut cache,
            want_logits: true,
        }],
    )
    .expect("forward")
    .remove(0)
    .expect("logits")
}

#[test]
fn weights_written_to_the_memory_service_come_back_identical() {
    use super::shared::{load_shared, Role, SharedError};
    use crate::gms::BackendKind;
    let (cold, tok) = smollm2();
    let dir = std::env::temp_dir().join(format!("dynamix-gms-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = gms_server(&dir);
    let path = smollm2_gguf();
    let timeout = std::time::Duration::from_secs(30);
    let (written, role) =
        load_shared(&path, &socket, BackendKind::Host, 0, timeout).expect("writer");
    assert_eq!(role, Role::Writer);
    let (read, role) = load_shared(&path, &socket, BackendKind::Host, 0, timeout).expect("reader");
    assert_eq!(
        role,
        Role::Reader,
        "the second load maps the committed layout"
    );
    let prompt = chat_prompt(&tok, "What is the capital of France?");
    let expected = last_logits(&cold, &prompt);
    assert_eq!(last_logits(&written, &prompt), expected);
    assert_eq!(
        last_logits(&read, &prompt),
        expected,
        "bit-identical weights"
    );

    // A service holding some other layout: a clear stale-layout error, not a wrong model.
    let other_dir = dir.join("other");
    std::fs::create_dir_all(&other_dir).expect("dir");
    let other = gms_server(&other_dir);
    crate::gms::check::write_pattern(
        &other,
        BackendKind::Host,
        0,
        crate::gms::check::WritePlan {
            bytes: 4096,
            count: 1,
            seed: 1,
        },
        Some(timeout),
    )
    .expect("pattern committed");
    match load_shared(&path, &other, BackendKind::Host, 0, timeout) {
        Err(SharedError::Stale { found, .. }) => {
            assert!(found.contains("no dynamix.model.manifest"), "{found}")
        }
        Err(e) => panic!("expected a stale-layout error, got {e}"),
        Ok(_) => panic!("expected a stale-layout error, got a model"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A memory service that fails mid-session (a panic while handling a request closes that session)
/// costs a new session, not the load: the writer starts over on the wiped layout, a reader maps
/// the committed one; only a service that keeps failing fails the load.
#[actix_rt::test]
async fn a_memory_service_failure_during_the_weights_session_is_retried_with_a_new_session() {
    use super::shared::{load_shared, Role, SharedError};
    use crate::faults::{FaultInjector, FaultKind, FaultSpec, FaultsConfig};
    use crate::gms::{BackendKind, InProcessGms};
    use crate::supervision::SupervisionConfig;
    let socket = std::env::temp_dir().join(format!(
        "dynamix-gms-retry-{}.sock",
        uuid::Uuid::new_v4().simple()
    ));
    let gms = InProcessGms::start(socket.clone(), "weights")
        .await
        .expect("starts");
    let (events, _reports) = tokio::sync::mpsc::unbounded_channel();
    let faults = FaultInjector::new(FaultsConfig {
        enabled: true,
        ..FaultsConfig::default()
    });
    let budget = SupervisionConfig {
        max_restarts: 100,
        restart_window_secs: 60.0,
    };
    gms.supervise(&budget, events, faults.clone());
    let load = |socket: std::path::PathBuf| {
        actix_rt::task::spawn_blocking(move || {
            let timeout = std::time::Duration::from_secs(30);
            load_shared(&smollm2_gguf(), &socket, BackendKind::Host, 0, timeout)
                .map(|(_, role)| role)
        })
    };
    let mut twice = FaultSpec::new(FaultKind::MemoryServicePanic);
    twice.count = 2;
    faults.arm(twice.clone()).expect("armed");
    let role = load(socket.clone()).await.expect("join").expect("writer");
    assert_eq!(role, Role::Writer, "written after two failed sessions");
    faults.arm(twice).expect("armed");
    let role = load(socket.clone()).await.expect("join").expect("reader");
    assert_eq!(
        role,
        Role::Reader,
        "the committed layout survived the failures"
    );
    let mut thrice = FaultSpec::new(FaultKind::MemoryServicePanic);
    thrice.count = 3;
    faults.arm(thrice).expect("armed");
    match load(socket.clone()).await.expect("join") {
        Err(SharedError::Service { source, .. }) => {
            assert!(source.is_service_failure(), "{source}")
        }
        Err(e) => panic!("expected the service's failure, got {e}"),
        Ok(role) => panic!("a service that keeps failing cannot load; got {role:?}"),
    }
    gms.stop();
}
