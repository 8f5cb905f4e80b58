//! The multi-process deployment with real processes: etcd and NATS servers, `dynamix frontend` and
//! `dynamix worker` binaries started from the shipped configs (configs/frontend.toml,
//! configs/worker.toml), then killed, restarted and cut off from etcd and NATS.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{client, get, metric_value, post_json, sse_json};
use dynamix_actors::distributed::infra::{free_port, EtcdServer, NatsServer};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// etcd and NATS for one test.
struct Infra {
    etcd: EtcdServer,
    nats: NatsServer,
    logs: PathBuf,
}

impl Infra {
    fn start() -> Infra {
        let etcd = EtcdServer::start().expect("etcd starts");
        let nats = NatsServer::start().expect("nats-server starts");
        let logs = std::env::temp_dir().join(format!("dynamix-dist-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&logs).expect("log dir");
        Infra { etcd, nats, logs }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("ETCD_ENDPOINTS".into(), self.etcd.url()),
            ("NATS_SERVER".into(), self.nats.url()),
            ("DYN_LOG".into(), "info,dynamix_actors=debug".into()),
        ]
    }
}

impl Drop for Infra {
    fn drop(&mut self) {
        // Processes are dropped first (declared later); keep their logs only for a failed test.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}

/// A dynamix process; killed on drop. Its log is printed if the test fails.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(infra: &Infra, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let log = infra.logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_dynamix"));
        command
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in infra.env() {
            command.env(k, v);
        }
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn dynamix");
        Proc {
            name: name.into(),
            child,
            log,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freeze it (SIGSTOP): its sockets stay open, but it answers nothing.
    fn freeze(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGSTOP);
        }
    }

    fn terminate(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("---- {} log (last 40 lines) ----", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

struct Frontend {
    proc: Proc,
    base: String,
}

fn frontend(infra: &Infra, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Frontend {
    let port = free_port().to_string();
    let mut args = vec![
        "frontend",
        "--config",
        "configs/frontend.toml",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        &port,
    ];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(infra, name, &args, env);
    Frontend {
        proc,
        base: format!("http://127.0.0.1:{port}"),
    }
}

fn worker(infra: &Infra, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut args = vec!["worker", "--config", "configs/worker.toml"];
    args.extend_from_slice(extra);
    // Short leases so a killed worker leaves discovery quickly.
    let mut all = vec![("DYN_DISTRIBUTED__LEASE_TTL_SECS", "2")];
    all.extend_from_slice(env);
    Proc::spawn(infra, name, &args, &all)
}

/// Echo workers: deterministic output (the user's text, one character per step), so a migrated
/// stream can be checked character by character.
fn echo_worker(infra: &Infra, name: &str) -> Proc {
    worker(
        infra,
        name,
        &["out=echo_full"],
        &[("DYN_TOKEN_ECHO_DELAY_MS", "25")],
    )
}

impl Frontend {
    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn health(&self) -> Option<Value> {
        let res = client().get(self.url("/health")).send().await;
        match res {
            Ok(mut res) => res.json::<Value>().limit(1 << 20).await.ok(),
            Err(_) => None,
        }
    }

    /// Wait until `/health` lists exactly `n` workers.
    async fn wait_workers(&self, n: usize, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(health) = self.health().await {
                if health["instances"].as_array().map(Vec::len) == Some(n) {
                    return health;
                }
                last = health;
            }
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("frontend did not see {n} workers within {within:?}; last /health: {last}");
    }

    /// Wait until `/health`'s `cluster` reports `component` (`discovery` / `event_plane`) in a
    /// state starting with `prefix`.
    async fn wait_cluster(&self, component: &str, prefix: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(health) = self.health().await {
                if health["cluster"][component]["state"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(prefix))
                {
                    return health;
                }
                last = health;
            }
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "cluster.{component} never became {prefix:?} within {within:?}; last /health: {last}"
        );
    }
}

fn text_of(n: usize, seed: usize) -> String {
    // Distinct, easy-to-check characters per request.
    (0..n)
        .map(|i| char::from(b'a' + ((i * 7 + seed * 3) % 26) as u8))
        .collect()
}

/// Stream one chat request; returns (content, finish_reason, status).
async fn stream_chat(base: &str, content: &str) -> (String, Option<String>, u16) {
    let body = json!({
        "model": common::MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": true,
    });
    let mut res = awc::Client::builder()
        .timeout(Duration::from_secs(60))
        .finish()
        .post(format!("{base}/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("request");
    let status = res.status().as_u16();
    let mut raw = Vec::new();
    while let Some(chunk) = res.next().await {
        match chunk {
            Ok(bytes) => raw.extend_from_slice(&bytes),
            Err(e) => panic!("stream broke at the client: {e}"),
        }
    }
    let text = String::from_utf8(raw).expect("utf-8");
    if status != 200 {
        return (text, None, status);
    }
    let mut out = String::new();
    let mut finish = None;
    for frame in sse_json(&text) {
        if let Some(error) = frame.get("error") {
            panic!("error frame in the stream: {error}");
        }
        for choice in frame["choices"].as_array().into_iter().flatten() {
            if let Some(piece) = choice["delta"]["content"].as_str() {
                out.push_str(piece);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_string());
            }
        }
    }
    (out, finish, status)
}

fn generated_tokens(health: &Value) -> Vec<(u64, u64)> {
    health["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["instance_id"].as_u64().unwrap_or_default(),
                i["generated_tokens"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

#[actix_rt::test]
async fn killed_worker_mid_stream_migrates_every_request_and_a_restarted_one_rejoins() {
    killed_worker_mid_stream("mux").await;
}

#[actix_rt::test]
async fn killed_worker_mid_stream_migrates_on_dynamos_request_plane_too() {
    killed_worker_mid_stream("dynamo").await;
}

/// Kills one of two workers mid-stream, with the frontend on request plane `protocol`.
async fn killed_worker_mid_stream(protocol: &str) {
    let infra = Infra::start();
    let fe = frontend(
        &infra,
        "frontend",
        &["--router-mode", "round-robin"],
        &[("DYN_DISTRIBUTED__REQUEST_PLANE_PROTOCOL", protocol)],
    );
    let mut a = echo_worker(&infra, "worker-a");
    let _b = echo_worker(&infra, "worker-b");
    let health = fe.wait_workers(2, Duration::from_secs(60)).await;
    assert_eq!(
        health["endpoints"],
        json!(["dyn://dynamo.backend.generate"]),
        "{health}"
    );
    assert!(
        health["instances"][0]["transport"]
            .as_str()
            .is_some_and(|t| t.starts_with("tcp://127.0.0.1:")),
        "{health}"
    );
    assert_eq!(
        health["instances"][0]["request_plane"],
        json!(protocol),
        "{health}"
    );

    // 8 streams of 60 characters (~1.5 s each at 25 ms a character), spread over both workers.
    let texts: Vec<String> = (0..8).map(|i| text_of(60, i)).collect();
    let base = fe.base.clone();
    let streams = futures_util::future::join_all(
        texts
            .iter()
            .map(|t| stream_chat(&base, t))
            .collect::<Vec<_>>(),
    );
    let killer = async {
        actix_rt::time::sleep(Duration::from_millis(500)).await;
        a.kill();
    };
    let (results, ()) = tokio::join!(streams, killer);
    for (text, (content, finish, status)) in texts.iter().zip(&results) {
        assert_eq!(*status, 200, "{content}");
        assert_eq!(
            content, text,
            "a migrated stream must lose and repeat nothing"
        );
        assert_eq!(finish.as_deref(), Some("stop"));
    }
    let metrics = common::get_text(&fe.url("/metrics")).await;
    let migrations: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("dynamo_frontend_model_migration_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        migrations >= 1.0,
        "the killed worker's requests were migrated: {metrics}"
    );

    // The dead worker leaves routing (broken stream, then lease expiry).
    let health = fe.wait_workers(1, Duration::from_secs(15)).await;
    let survivor = health["instances"][0]["instance_id"].as_u64().unwrap();

    // Restarted, it registers again (a new lease, so a new instance id) and receives traffic.
    let _a2 = echo_worker(&infra, "worker-a-restarted");
    let health = fe.wait_workers(2, Duration::from_secs(30)).await;
    let newcomer = generated_tokens(&health)
        .into_iter()
        .map(|(id, _)| id)
        .find(|id| *id != survivor)
        .unwrap();
    for i in 0..4 {
        let (content, _, status) = stream_chat(&fe.base, &text_of(5, 100 + i)).await;
        assert_eq!(status, 200);
        assert_eq!(content, text_of(5, 100 + i));
    }
    let health = fe.health().await.unwrap();
    let served = generated_tokens(&health)
        .into_iter()
        .find(|(id, _)| *id == newcomer)
        .map(|(_, n)| n)
        .unwrap_or(0);
    assert!(served > 0, "the restarted worker gets traffic: {health}");
}

/// A frozen worker keeps its connections open but sends nothing: only the multiplexed plane's
/// heartbeats can tell (the stall timeout is off here), and its streams migrate. Without them the
/// streams would wait until the client gave up.
#[actix_rt::test]
async fn a_frozen_worker_is_found_by_heartbeats_and_its_streams_migrate() {
    let infra = Infra::start();
    let fe = frontend(
        &infra,
        "frontend",
        &["--router-mode", "round-robin"],
        &[
            ("DYN_DISTRIBUTED__MUX_HEARTBEAT_MS", "100"),
            ("DYN_DISTRIBUTED__MUX_DEAD_AFTER_MS", "500"),
            ("DYN_MIGRATION__STALL_TIMEOUT_SECS", "0"),
        ],
    );
    let mut a = echo_worker(&infra, "worker-a");
    let _b = echo_worker(&infra, "worker-b");
    fe.wait_workers(2, Duration::from_secs(60)).await;
    let texts: Vec<String> = (0..8).map(|i| text_of(40, 200 + i)).collect();
    let base = fe.base.clone();
    let streams = futures_util::future::join_all(
        texts
            .iter()
            .map(|t| stream_chat(&base, t))
            .collect::<Vec<_>>(),
    );
    let freezer = async {
        actix_rt::time::sleep(Duration::from_millis(400)).await;
        a.freeze();
    };
    let (results, ()) = tokio::join!(streams, freezer);
    for (text, (content, finish, status)) in texts.iter().zip(&results) {
        assert_eq!(*status, 200, "{content}");
        assert_eq!(
            content, text,
            "a migrated stream must lose and repeat nothing"
        );
        assert_eq!(finish.as_deref(), Some("stop"));
    }
    a.kill();
}

#[actix_rt::test]
async fn kv_events_cross_processes_and_every_frontend_replica_learns_them() {
    let infra = Infra::start();
    let fe1 = frontend(&infra, "frontend-1", &[], &[]);
    let fe2 = frontend(&infra, "frontend-2", &[], &[]);
    let speed = [("DYN_MOCKER__SPEEDUP_RATIO", "100")];
    let _w1 = worker(&infra, "worker-1", &[], &speed);
    let _w2 = worker(&infra, "worker-2", &[], &speed);
    fe1.wait_workers(2, Duration::from_secs(60)).await;
    fe2.wait_workers(2, Duration::from_secs(60)).await;

    // A long prompt (many 64-token blocks), served once through frontend 1.
    let prompt: String = (0..400).map(|i| format!("word{i} ")).collect();
    let body = json!({"model": common::MODEL, "prompt": prompt, "max_tokens": 4});
    let (status, first) = post_json(&fe1.url("/v1/completions"), &body).await;
    assert_eq!(status, 200, "{first}");

    // Both replicas learn the worker's cache from its KV events on NATS: the same prompt is then
    // routed expecting cached tokens, on either frontend.
    for fe in [&fe1, &fe2] {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, _) = post_json(&fe.url("/v1/completions"), &body).await;
            assert_eq!(status, 200);
            let metrics = common::get_text(&fe.url("/metrics")).await;
            let cached =
                metric_value(&metrics, "dynamo_frontend_cached_tokens_sum", &[]).unwrap_or(0.0);
            if cached > 0.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never routed with a cache hit: {metrics}",
                fe.base
            );
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Workers publish their load, which the frontend shows per instance.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = fe1.health().await.unwrap();
        let with_load = health["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["load_metrics"]["capacity"].as_u64() == Some(256))
            .count();
        if with_load == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no load metrics: {health}");
        actix_rt::time::sleep(Duration::from_millis(200)).await;
    }
}

#[actix_rt::test]
async fn nats_and_etcd_outages_are_reported_and_recovered_from() {
    let mut infra = Infra::start();
    let fe = frontend(&infra, "frontend", &["--router-mode", "round-robin"], &[]);
    let _w = echo_worker(&infra, "worker");
    fe.wait_workers(1, Duration::from_secs(60)).await;
    fe.wait_cluster("event_plane", "connected", Duration::from_secs(5))
        .await;

    // NATS down: requests still travel over TCP; /health says the event plane is down.
    infra.nats.stop();
    fe.wait_cluster("event_plane", "disconnected", Duration::from_secs(15))
        .await;
    let (content, _, status) = stream_chat(&fe.base, "hello").await;
    assert_eq!((status, content.as_str()), (200, "hello"));
    infra.nats.restart().expect("nats restarts");
    fe.wait_cluster("event_plane", "connected", Duration::from_secs(20))
        .await;

    // etcd down: the known worker keeps serving; /health names the discovery outage.
    infra.etcd.stop();
    let health = fe
        .wait_cluster("discovery", "disconnected", Duration::from_secs(15))
        .await;
    assert!(
        health["cluster"]["discovery"]["state"]
            .as_str()
            .unwrap()
            .len()
            > "disconnected".len(),
        "the outage names its cause: {health}"
    );
    let (content, _, status) = stream_chat(&fe.base, "still here").await;
    assert_eq!((status, content.as_str()), (200, "still here"));
    infra.etcd.restart().expect("etcd restarts");
    fe.wait_cluster("discovery", "connected", Duration::from_secs(20))
        .await;
    fe.wait_workers(1, Duration::from_secs(20)).await;
    let (content, _, status) = stream_chat(&fe.base, "back").await;
    assert_eq!((status, content.as_str()), (200, "back"));

    // With no worker at all, a request fails with a clear 503.
    drop(_w);
    fe.wait_workers(0, Duration::from_secs(15)).await;
    let (status, body) = post_json(&fe.url("/v1/chat/completions"), &common::chat_body("x")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("No engine is available")),
        "{body}"
    );
}

#[actix_rt::test]
async fn processes_refuse_to_start_without_etcd_or_nats_and_say_which() {
    let mut infra = Infra::start();
    infra.etcd.stop();
    let mut fe = frontend(&infra, "frontend-no-etcd", &[], &[]);
    let status = fe
        .proc
        .wait_exit(Duration::from_secs(30))
        .expect("a frontend without etcd exits");
    assert!(!status.success());
    let log = fe.proc.log();
    assert!(
        log.contains(&infra.etcd.url()) || log.contains("etcd"),
        "names etcd: {log}"
    );

    infra.etcd.restart().unwrap();
    infra.nats.stop();
    let mut w = worker(&infra, "worker-no-nats", &[], &[]);
    let status = w
        .wait_exit(Duration::from_secs(30))
        .expect("a worker without NATS exits");
    assert!(!status.success());
    let log = w.log();
    assert!(log.contains(&infra.nats.url()), "names the NATS URL: {log}");
}

#[actix_rt::test]
async fn sigterm_leaves_discovery_first_and_finishes_running_streams() {
    let infra = Infra::start();
    let fe = frontend(&infra, "frontend", &["--router-mode", "round-robin"], &[]);
    let mut w = worker(
        &infra,
        "worker",
        &["out=echo_full"],
        &[
            ("DYN_TOKEN_ECHO_DELAY_MS", "25"),
            ("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", "0"),
        ],
    );
    fe.wait_workers(1, Duration::from_secs(60)).await;
    // 200 characters: 5 s of streaming.
    let text = text_of(200, 9);
    let stream = stream_chat(&fe.base, &text);
    let stop = async {
        actix_rt::time::sleep(Duration::from_millis(400)).await;
        w.terminate();
        // Gone from discovery while its stream still runs (the lease is revoked, not left to expire:
        // with a 2 s lease and a 5 s stream, only the revocation fits).
        fe.wait_workers(0, Duration::from_secs(3)).await;
    };
    let ((content, finish, status), ()) = tokio::join!(stream, stop);
    assert_eq!(status, 200);
    assert_eq!(
        content, text,
        "the running stream finishes on the draining worker"
    );
    assert_eq!(finish.as_deref(), Some("stop"));
    let exit = w.wait_exit(Duration::from_secs(15)).expect("worker exits");
    assert!(exit.success(), "clean exit: {}", w.log());
}

#[actix_rt::test]
async fn the_request_plane_answers_bad_frames_with_errors_and_keeps_serving() {
    use dynamix_actors::codec::{TcpRequestCodec, TcpRequestMessage, TcpResponseCodec};
    use futures_util::SinkExt;
    use tokio_util::codec::{FramedRead, FramedWrite};

    let infra = Infra::start();
    let fe = frontend(&infra, "frontend", &["--router-mode", "round-robin"], &[]);
    let _w = echo_worker(&infra, "worker");
    let health = fe.wait_workers(1, Duration::from_secs(60)).await;
    let address = health["instances"][0]["device"]
        .as_str()
        .unwrap()
        .to_string();
    let id = health["instances"][0]["instance_id"].as_u64().unwrap();
    let path = format!("{id:x}/dynamo/backend/generate");

    let stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let (r, w) = stream.into_split();
    let mut acks = FramedRead::new(r, TcpResponseCodec::new(None));
    let mut frames = FramedWrite::new(w, TcpRequestCodec::new(None));
    let mut reply_to = async |endpoint_path: &str, payload: &'static [u8]| {
        frames
            .send(TcpRequestMessage {
                endpoint_path: endpoint_path.into(),
                headers: Default::default(),
                payload: bytes::Bytes::from_static(payload),
            })
            .await
            .unwrap();
        let reply = acks.next().await.unwrap().unwrap();
        String::from_utf8_lossy(&reply.data).into_owned()
    };
    // Unknown endpoint (Dynamo's path form, another instance or the old dotted form): a
    // rejection as Dynamo words it, the connection stays open.
    for wrong in ["dynamo.backend.generate", "1/dynamo/backend/generate"] {
        assert_eq!(
            reply_to(wrong, b"x").await,
            format!("Server unavailable: unknown endpoint {wrong}")
        );
    }
    // Right endpoint, payload that is not a two-part frame: no call-home address, so a rejection
    // naming the problem.
    let reply = reply_to(&path, b"not a frame").await;
    assert!(
        reply.starts_with("Server unavailable: cannot decode the request envelope"),
        "{reply:?}"
    );
    // Garbage bytes that are not a request frame at all: an error reply, then the connection closes.
    let mut raw = tokio::net::TcpStream::connect(&address).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, &[0, 3, 0xff, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut buf),
    )
    .await
    .expect("the worker closes the connection");
    assert!(
        String::from_utf8_lossy(&buf)
            .contains("Server unavailable: cannot decode the request frame"),
        "{buf:?}"
    );
    // The worker still serves.
    let (content, _, status) = stream_chat(&fe.base, "fine").await;
    assert_eq!((status, content.as_str()), (200, "fine"));
    let _ = get(&fe.url("/health")).await;
}

/// The README's walk-through: one frontend and two workers from the shipped configs, with only the
/// addresses of this test's own etcd and NATS (free ports) given through the environment, as a user
/// whose servers are elsewhere would; then a request through them.
#[actix_rt::test]
async fn readme_walkthrough_with_the_shipped_configs() {
    let dir = std::env::temp_dir().join(format!("dynamix-walk-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let infra = Infra::start();
    // Only the namespace is ours, so parallel runs on one etcd do not see each other's workers.
    let namespace = format!("walk{}", std::process::id());
    let port = free_port();
    let spawn = |name: &str, args: &[&str]| -> Proc {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_dynamix"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .env("DYN_NAMESPACE", &namespace)
            .env("ETCD_ENDPOINTS", infra.etcd.url())
            .env("NATS_SERVER", infra.nats.url())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn dynamix");
        Proc {
            name: name.into(),
            child,
            log,
        }
    };
    let port_arg = port.to_string();
    let fe = Frontend {
        proc: spawn(
            "frontend",
            &[
                "frontend",
                "--config",
                "configs/frontend.toml",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                &port_arg,
            ],
        ),
        base: format!("http://127.0.0.1:{port}"),
    };
    let worker_args = ["worker", "--config", "configs/worker.toml"];
    let _w1 = spawn("worker-1", &worker_args);
    let _w2 = spawn("worker-2", &worker_args);
    fe.wait_workers(2, Duration::from_secs(60)).await;
    let (status, body) = post_json(
        &fe.url("/v1/chat/completions"),
        &json!({"model": common::MODEL, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 8}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 8, "{body}");
    let health = fe.health().await.unwrap();
    assert_eq!(
        health["cluster"]["discovery"]["state"], "connected",
        "{health}"
    );
    assert_eq!(
        health["cluster"]["event_plane"]["state"], "connected",
        "{health}"
    );
    // The cluster side is a child of the supervision tree: after serving, before HTTP.
    let mut res = client()
        .get(fe.url("/dashboard/state"))
        .send()
        .await
        .expect("dashboard state");
    let state: Value = res.json().limit(1 << 20).await.expect("dashboard JSON");
    let subtrees: Vec<&str> = state["tree"]["children"]
        .as_array()
        .expect("the root's children")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        subtrees,
        ["memory", "kv", "serving", "cluster", "http"],
        "{state}"
    );
    // Its parts are children of their own, in start order.
    let cluster: Vec<(&str, &str)> = state["tree"]["children"][3]["children"]
        .as_array()
        .expect("the cluster's children")
        .iter()
        .filter_map(|c| Some((c["name"].as_str()?, c["state"].as_str()?)))
        .collect();
    assert_eq!(
        cluster,
        [
            ("events 0", "running"),
            ("request_plane 0", "running"),
            ("discovery 0", "running")
        ],
        "{state}"
    );
    drop(fe);
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix_rt::test]
async fn a_client_that_hangs_up_stops_generation_on_the_worker() {
    let infra = Infra::start();
    let fe = frontend(&infra, "frontend", &["--router-mode", "round-robin"], &[]);
    let _w = worker(
        &infra,
        "worker",
        &["out=echo_full"],
        &[
            ("DYN_TOKEN_ECHO_DELAY_MS", "25"),
            ("DYN_DISTRIBUTED__LOAD_METRICS_INTERVAL_MS", "100"),
        ],
    );
    fe.wait_workers(1, Duration::from_secs(60)).await;
    // 400 characters: 10 s of generation if nobody stops it.
    let body = json!({
        "model": common::MODEL,
        "messages": [{"role": "user", "content": text_of(400, 1)}],
        "stream": true,
    });
    let mut res = client()
        .post(fe.url("/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let first = res.next().await.expect("a first chunk").unwrap();
    assert!(!first.is_empty());
    let running =
        |health: &Value| health["instances"][0]["load_metrics"]["active_requests"].as_u64();
    let deadline = Instant::now() + Duration::from_secs(5);
    while running(&fe.health().await.unwrap()) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the worker never reported the running request"
        );
        actix_rt::time::sleep(Duration::from_millis(50)).await;
    }
    drop(res);
    // The frontend sends `stop`; the worker drops the request long before its 10 s would end.
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        let health = fe.health().await.unwrap();
        if running(&health) == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker still runs the abandoned request: {health}"
        );
        actix_rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bad input from a foreign peer (interop spec §2, issue: "bad input from a foreign peer"):
/// malformed instance records and model cards under the frontend's endpoint, and a worker that
/// accepts the TCP connection but answers garbage, are each skipped with a log line naming the key
/// or the worker and the field; the frontend keeps serving through the good worker.
#[actix_rt::test]
async fn malformed_records_cards_and_peers_are_skipped_and_named() {
    use dynamix_actors::distributed::etcd::{Client as Etcd, ConnectOptions};

    let infra = Infra::start();
    let mut etcd = Etcd::connect(
        &[infra.etcd.url()],
        &ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            keep_alive: None,
            keep_alive_while_idle: false,
        },
    )
    .await
    .expect("etcd client");
    // A junk card sorts first: the frontend must skip it and take the good worker's.
    let prefix = "v1/instances/dynamo/backend/generate";
    etcd.put(
        "v1/mdc/dynamo/backend/generate/0",
        b"{\"type\": \"Model\"}".to_vec(),
        0,
    )
    .await
    .unwrap();
    let _w = echo_worker(&infra, "worker");
    let fe = frontend(&infra, "frontend", &["--router-mode", "round-robin"], &[]);
    fe.wait_workers(1, Duration::from_secs(60)).await;

    // A listener that answers every frame with garbage bytes, advertised as a worker.
    let liar = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let liar_port = liar.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = liar.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut socket, &[0xff; 64]).await;
        }
    });
    let bad: Vec<(String, Vec<u8>)> = vec![
        (format!("{prefix}/aa"), b"not json".to_vec()),
        (
            format!("{prefix}/bb"),
            json!({"type": "Endpoint", "component": "backend", "endpoint": "generate",
                "namespace": "dynamo", "instance_id": 1, "transport": {"tcp": "127.0.0.1:1/x"}})
            .to_string()
            .into_bytes(),
        ),
        (
            format!("{prefix}/cc"),
            json!({"type": "Endpoint", "component": "backend", "endpoint": "generate",
                "namespace": "dynamo", "instance_id": 0xcc, "transport": {"tcp": "127.0.0.1:1/cc/x"},
                "request_plane_codec": "cbor"})
            .to_string()
            .into_bytes(),
        ),
        (
            format!("{prefix}/dd"),
            json!({"type": "Endpoint", "component": "backend", "endpoint": "generate",
                "namespace": "dynamo", "instance_id": 0xdd, "transport": {"tcp": "nohost/dd"}})
            .to_string()
            .into_bytes(),
        ),
    ];
    for (key, value) in bad {
        etcd.put(key, value, 0).await.unwrap();
    }
    // Only the well-formed records count as workers; the liar is well-formed until it lies.
    let liar_key = format!("{prefix}/ee");
    etcd.put(
        liar_key.clone(),
        json!({"type": "Endpoint", "component": "backend", "endpoint": "generate",
            "namespace": "dynamo", "instance_id": 0xee,
            "transport": {"tcp": format!("127.0.0.1:{liar_port}/ee/dynamo/backend/generate")}})
        .to_string()
        .into_bytes(),
        0,
    )
    .await
    .unwrap();
    fe.wait_workers(2, Duration::from_secs(30)).await;
    // Requests keep succeeding: one may land on the liar, which breaks its stream; the request
    // then migrates to the good worker and the liar is taken out of routing.
    for i in 0..6 {
        let text = format!("still fine {i}");
        let (content, _, status) = stream_chat(&fe.base, &text).await;
        assert_eq!((status, content.as_str()), (200, text.as_str()));
    }
    let log = fe.proc.log();
    for expected in [
        "v1/mdc/dynamo/backend/generate/0",
        "generate/aa",
        "but the key says",
        "request_plane_codec",
        "transport.tcp",
        "request-plane exchange failed",
    ] {
        assert!(
            log.contains(expected),
            "frontend log should name {expected:?}:\n{log}"
        );
    }
}
