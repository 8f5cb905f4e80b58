//! Shared test harness: start the real server on 127.0.0.1:0 from a TOML snippet (hermetic: no process
//! environment), and small HTTP/SSE helpers over awc.
#![allow(dead_code)]

pub mod dynamo;

use std::time::Duration;

use awc::Client;
use bytes::Bytes;
use dynamix::config::{self, Overrides};
use dynamix_actors::supervisor::RunningService;
use futures_util::StreamExt;
use serde_json::Value;

pub const MODEL: &str = "SmolLM2-135M-Instruct";

/// A running server.
pub struct TestServer {
    pub base: String,
    pub service: Option<RunningService>,
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.service.take() {
            s.shutdown().await;
        }
    }
}

/// Load a config from a TOML snippet layered over the test defaults (loopback, port 0, no echo delay).
pub fn test_config(extra: &str) -> dynamix::Config {
    // Top-level dotted keys first, so a snippet may add its own [section] tables after them. Snippets set
    // [http] and [echo] keys as dotted keys (`http.body_limit_mb = 1`) before any table header.
    let mut text = String::from("http.host = \"127.0.0.1\"\nhttp.port = 0\nhttp.workers = 2\n");
    if !extra.contains("echo.token_delay_ms") {
        text.push_str("echo.token_delay_ms = 0\n");
    }
    // Only tests that configure [embeddings] load the embedding model (tests/embeddings.rs).
    let sets_embeddings = extra.lines().any(|line| {
        let line = line.trim();
        line.starts_with("embeddings.") || line == "[embeddings]"
    });
    if !sets_embeddings {
        text.push_str("embeddings.enabled = false\n");
    }
    text.push_str(extra);
    let dir = std::env::temp_dir().join(format!("dynamix-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    let config =
        config::load(Some(&path), &Vec::new, &Overrides::default()).expect("test config is valid");
    let _ = std::fs::remove_dir_all(&dir);
    config
}

/// Start a server for `extra` (TOML; use dotted keys like `http.body_limit_mb = 1` for [http] settings).
pub async fn start(extra: &str) -> TestServer {
    start_config(test_config(extra)).await
}

pub async fn start_config(config: dynamix::Config) -> TestServer {
    let service = dynamix::start(&config, true).await.expect("server starts");
    let addr = service.http_addrs[0];
    TestServer {
        base: format!("http://{addr}"),
        service: Some(service),
    }
}

pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .disable_redirects()
        .finish()
}

/// POST JSON; returns status and parsed body.
pub async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let mut res = client()
        .post(url)
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("request");
    let status = res.status().as_u16();
    let bytes = res.body().limit(64 << 20).await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())),
    )
}

/// GET; returns status and parsed body (or the text as a JSON string).
pub async fn get(url: &str) -> (u16, Value) {
    let mut res = client().get(url).send().await.expect("request");
    let status = res.status().as_u16();
    let bytes = res.body().limit(64 << 20).await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())),
    )
}

/// GET text.
pub async fn get_text(url: &str) -> String {
    let mut res = client().get(url).send().await.expect("request");
    let bytes = res.body().limit(64 << 20).await.expect("body");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// POST and read the whole SSE body as text.
pub async fn post_sse(url: &str, body: &Value) -> (u16, String, Option<String>) {
    let mut res = client()
        .post(url)
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("request");
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let mut text = Vec::new();
    while let Some(chunk) = res.next().await {
        let chunk: Bytes = chunk.expect("chunk");
        text.extend_from_slice(&chunk);
    }
    (
        status,
        String::from_utf8(text).expect("utf-8 SSE body"),
        content_type,
    )
}

/// The `data:` payloads of an SSE body, in order (`[DONE]` included as a string).
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|frame| !frame.is_empty())
        .filter_map(|frame| {
            frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(String::from)
        })
        .collect()
}

/// Parsed JSON data frames (excluding `[DONE]`).
pub fn sse_json(text: &str) -> Vec<Value> {
    sse_data(text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("JSON data frame"))
        .collect()
}

pub fn chat_body(content: &str) -> Value {
    serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

/// The values of the series of `name` in Prometheus text whose labels include all of `labels`.
pub fn metric_values<'a>(
    text: &'a str,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = f64> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let ok = metric == name
                && labels.iter().all(|(k, v)| {
                    label_text
                        .split(',')
                        .any(|pair| pair == format!("{k}=\"{v}\""))
                });
            if ok {
                value.parse().ok()
            } else {
                None
            }
        })
}

/// The value of a metric series line in Prometheus text, matching name and all given label pairs.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_values(text, name, labels).next()
}

/// The Python that runs the `openai` SDK scripts (`DYNAMIX_PYTHON`, default `python3`).
pub fn python() -> String {
    std::env::var("DYNAMIX_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Where the tests keep their own Python packages: `<model store>/python` (`DYNAMIX_HOME`, default
/// `~/.cache/dynamix`), so the user's Python environment is never changed.
pub fn python_packages_dir() -> std::path::PathBuf {
    dynamix_actors::models::ModelStore::default_home().join("python")
}

/// Makes the `openai` SDK importable from [`python_packages_dir`] (see [`ensure_python_package`]).
/// Returns the directory to put on `PYTHONPATH`.
pub fn ensure_openai_sdk() -> std::path::PathBuf {
    ensure_python_package("openai", "openai>=1.40,<3")
}

/// Makes `module` importable from [`python_packages_dir`], installing `requirement` there with
/// `pip install --target` when it is not (test processes take turns on a lock file, so concurrent
/// runs install once). Returns the directory to put on `PYTHONPATH`.
pub fn ensure_python_package(module: &str, requirement: &str) -> std::path::PathBuf {
    use std::process::Command;
    let dir = python_packages_dir();
    std::fs::create_dir_all(&dir).expect("the model store is writable");
    let importable = || {
        Command::new(python())
            .args(["-c", &format!("import {module}")])
            .env("PYTHONPATH", &dir)
            .stderr(std::process::Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if importable() {
        return dir;
    }
    let lock = std::fs::File::create(dir.join(".install.lock")).expect("lock file");
    lock.lock().expect("lock the python packages directory");
    if !importable() {
        let output = Command::new(python())
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--upgrade",
                "--target",
            ])
            .arg(&dir)
            .arg(requirement)
            .output()
            .unwrap_or_else(|e| panic!("python3 with pip is needed to install {requirement}: {e}"));
        assert!(
            output.status.success(),
            "pip install {requirement} into {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    dir
}

/// Runs an `openai` SDK script from tests/conformance with `args` off the actix thread (the SDK
/// blocks; the in-process server must keep serving) and asserts it succeeded and printed `marker`.
pub async fn run_sdk_script(script: &str, args: Vec<String>, marker: &str) {
    let packages = ensure_openai_sdk();
    let path = format!("{}/tests/conformance/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = actix_rt::task::spawn_blocking(move || {
        std::process::Command::new(python())
            .arg(path)
            .env("PYTHONPATH", packages)
            .args(args)
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(marker), "{stdout}");
}

/// A `dynamix` process started by a test, once it printed the address it serves on.
pub struct Served {
    /// The process.
    pub child: std::process::Child,
    /// `http://host:port` from its `serving ... on http://...` line.
    pub base: String,
    /// Its stderr lines after that one, as they come.
    pub log: std::sync::mpsc::Receiver<String>,
    /// Lines logged before the address.
    pub early: Vec<String>,
}

/// Spawns `cmd` with stderr piped and waits (up to 60 s) for the line naming its address.
pub fn spawn_serving(cmd: &mut std::process::Command) -> Served {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn dynamix");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining the log for the life of the process (a closed pipe would fail its writes).
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut early = Vec::new();
    let base = loop {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            panic!("dynamix did not start: {early:?}");
        };
        if let Some(i) = line.find("on http://") {
            break line[i + 3..]
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
        }
        early.push(line);
    };
    Served {
        child,
        base,
        log: rx,
        early,
    }
}
