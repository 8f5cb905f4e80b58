//! `dynamix bench http` as a user runs it: against a real `dynamix serve out=echo` on a free port it
//! reports requests and no errors (stream and unary, JSON line), and a URL where nothing listens is a
//! clear error, not a run full of failures.

mod common;

use std::process::Command;

use common::{spawn_serving, Served};
use serde_json::Value;

/// Kills the server when the test ends, passed or not.
struct Killed(Served);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamix"));
    for (key, _) in std::env::vars() {
        if key.starts_with("DYN_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

/// Runs `dynamix bench http` with `args`; exit status, stdout, stderr.
fn bench(args: &[&str]) -> (Option<i32>, String, String) {
    let out = bin()
        .args(["bench", "http"])
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn loads_an_echo_server_and_reports_one_json_line() {
    let dir = std::env::temp_dir().join(format!("dynamix-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        "[http]\nhost = \"127.0.0.1\"\nport = 0\nworkers = 1\n[echo]\ntoken_delay_ms = 0\n[embeddings]\nenabled = false\n",
    )
    .expect("config");
    let server = Killed(spawn_serving(bin().args([
        "serve",
        "--config",
        config.to_str().unwrap_or_default(),
        "out=echo",
    ])));
    let served = &server.0;
    let pid = served.child.id().to_string();
    for mode in ["stream", "unary"] {
        let (code, stdout, stderr) = bench(&[
            "--url",
            &served.base,
            "--mode",
            mode,
            "-c",
            "2",
            "-d",
            "1",
            "--warmup",
            "0.2",
            "--pid",
            &pid,
            "--json",
        ]);
        assert_eq!(code, Some(0), "{mode}: {stderr}");
        let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
        assert!(
            report["rps"].as_f64().is_some_and(|rps| rps > 0.0),
            "{report}"
        );
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(report["mode"], mode);
        assert!(report["p50_ms"].is_number(), "{report}");
        assert!(report["cpu_ms_per_req"].is_number(), "{report}");
        if mode == "stream" {
            assert!(report["ttft_p50_ms"].is_number(), "{report}");
            assert!(
                report["output_tokens"].as_u64().is_some_and(|n| n > 0),
                "{report}"
            );
        }
    }
    // A model the server does not serve fails the check request, naming the status.
    let (code, _, stderr) = bench(&["--url", &served.base, "--model", "no-such-model", "-d", "1"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("answered 404"), "{stderr}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_urls_are_clear_errors() {
    // A port where nothing listens: bind one, note it, free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, stdout, stderr) = bench(&["--url", &url, "-d", "1", "--json"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "no report: {stdout}");
    assert!(
        stderr.contains("cannot connect to") && stderr.contains(&url),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for (url, named) in [
        ("localhost:8000", "expected http://"),
        ("https://localhost", "https is not supported"),
    ] {
        let (code, _, stderr) = bench(&["--url", url, "-d", "1"]);
        assert_eq!(code, Some(2), "{url}: {stderr}");
        assert!(stderr.contains(named), "{url}: {stderr}");
    }
}
