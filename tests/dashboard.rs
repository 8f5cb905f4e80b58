//! `/dashboard` in a real headless Chromium, driven over the DevTools protocol: the page loads, shows
//! the supervision tree, and a fault injected the way the drill does appears on it within 2 s. The
//! test saves a screenshot as an artifact: `target/test-artifacts/dashboard.png`.
//!
//! The browser is fetched on first use into the model store (`tests/browser/fetch_chromium.py`;
//! `DYNAMIX_CHROMIUM` names another chrome-headless-shell to use instead).

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use awc::ws;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

/// The browser executable, fetched when missing.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("DYNAMIX_CHROMIUM") {
        return path.into();
    }
    let packages = ensure_python_package("brotli", "brotli>=1.1,<2");
    let dest = dynamix_actors::models::ModelStore::default_home()
        .join("tools")
        .join("chromium-153.0.0");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/browser/fetch_chromium.py"
    );
    let output = Command::new(python())
        .arg(script)
        .arg(&dest)
        .env("PYTHONPATH", packages)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "fetching Chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// A running browser; killed when dropped (a failing test leaves no process behind).
struct Browser {
    child: Child,
    /// `http://127.0.0.1:PORT` of its DevTools endpoint.
    devtools: String,
    _profile: TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn launch(executable: &Path) -> Browser {
    let dir = executable
        .parent()
        .expect("the browser sits in a directory");
    let profile = TempDir(std::env::temp_dir().join(format!(
        "dynamix-chromium-{}",
        uuid::Uuid::new_v4().simple()
    )));
    let mut child = Command::new(executable)
        .args([
            "--headless=shell",
            "--no-sandbox",
            "--no-zygote",
            "--single-process",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1400,900",
        ])
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .arg("about:blank")
        .env("LD_LIBRARY_PATH", dir.join("lib"))
        .env("FONTCONFIG_PATH", dir.join("fonts"))
        .env("HOME", &profile.0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", executable.display()));
    // It prints `DevTools listening on ws://127.0.0.1:PORT/devtools/browser/...` once it listens.
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                let _ = tx.send(rest.split('/').next().unwrap_or_default().to_string());
            }
        }
    });
    let host = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("Chromium prints its DevTools address within 60 s");
    Browser {
        child,
        devtools: format!("http://{host}"),
        _profile: profile,
    }
}

/// One page's DevTools session.
struct Page {
    socket: actix_codec::Framed<awc::BoxedSocket, ws::Codec>,
    next_id: u64,
}

impl Page {
    /// Opens `url` in a new tab.
    async fn open(browser: &Browser, url: &str) -> Page {
        let mut reply = client()
            .put(format!("{}/json/new?{url}", browser.devtools))
            .send()
            .await
            .expect("DevTools answers");
        let tab: Value = reply.json().await.expect("a tab");
        let target = tab["webSocketDebuggerUrl"]
            .as_str()
            .expect("the tab's DevTools socket");
        let (_, socket) = awc::Client::new()
            .ws(target)
            .max_frame_size(32 << 20)
            .connect()
            .await
            .expect("connect to the tab");
        Page { socket, next_id: 0 }
    }

    /// Calls `method` and returns its `result`, skipping the events in between.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let request = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(ws::Message::Text(request.to_string().into()))
            .await
            .expect("send to DevTools");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let frame = tokio::time::timeout_at(deadline.into(), self.socket.next())
                .await
                .unwrap_or_else(|_| panic!("{method}: no answer in 30 s"))
                .expect("the socket stays open")
                .expect("a frame");
            let text = match frame {
                ws::Frame::Text(bytes) => bytes,
                ws::Frame::Ping(bytes) => {
                    let _ = self.socket.send(ws::Message::Pong(bytes)).await;
                    continue;
                }
                _ => continue,
            };
            let message: Value = serde_json::from_slice(&text).expect("DevTools sends JSON");
            if message["id"] == id {
                assert!(message.get("error").is_none(), "{method}: {message}");
                return message["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` every 50 ms until it is true; returns how long that took.
    async fn until(&mut self, expression: &str, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.eval(expression).await == json!(true) {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

#[actix_rt::test]
async fn the_dashboard_shows_the_tree_and_a_drill_fault_within_two_seconds() {
    let executable = actix_rt::task::spawn_blocking(chromium)
        .await
        .expect("join");
    let server = start(
        "[engine]\nkind = \"echo_full\"\ndevices = [\"cpu:0\", \"cpu:1\"]\n\
         [faults]\nenabled = true\nadmin_endpoint = true\n",
    )
    .await;
    let browser = launch(&executable);
    let mut page = Page::open(&browser, &server.url("/dashboard")).await;

    // The page loads and draws the tree from the event stream.
    page.until(
        "document.querySelector('[data-node=\"engine 1\"]') !== null",
        Duration::from_secs(20),
    )
    .await
    .expect("the tree is drawn");
    let tree = page.eval("document.getElementById('tree').innerText").await;
    let tree = tree.as_str().unwrap_or_default();
    for needle in [
        "root",
        "kv",
        "rest-for-one",
        "engines",
        "engine 0",
        "serving",
        "router 0",
        "validator pool",
        "http 0",
    ] {
        assert!(
            tree.contains(needle),
            "{needle:?} missing from the tree: {tree}"
        );
    }
    assert_eq!(
        page.eval("document.getElementById('conn').textContent")
            .await,
        "live"
    );

    // A router panic, injected as the drill does; a request meets it (and is retried, so it succeeds).
    let (status, armed) = post_json(
        &server.url("/admin/faults"),
        &json!({"kind": "router_panic"}),
    )
    .await;
    assert_eq!(status, 200, "{armed}");
    let (status, body) = post_json(&server.url("/v1/chat/completions"), &chat_body("hi")).await;
    assert_eq!(status, 200, "{body}");
    let shown = page
        .until(
            "[...document.querySelectorAll('#timeline [data-event=\"restarted\"]')]\
             .some(e => e.innerText.includes('router 0'))\
             && document.querySelector('[data-node=\"router 0\"]').innerText.includes('1 restart')",
            Duration::from_secs(2),
        )
        .await;

    // The screenshot is kept whatever the outcome.
    let shot = page
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        shot["data"].as_str().expect("image data"),
    )
    .expect("base64");
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).expect("artifact directory");
    let path = artifacts.join("dashboard.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    eprintln!("screenshot: {}", path.display());

    let shown = shown.expect("the router's restart is on the dashboard within 2 s");
    eprintln!("the fault appeared on the dashboard after {shown:?}");
    drop(browser);
    server.stop().await;
}
