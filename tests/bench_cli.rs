//! `dynamix bench http` as a user runs it: against a real `dynamix serve out=echo` on a free port it
//! reports requests and no errors (stream and unary, JSON line), and a URL where nothing listens is a
//! clear error, not a run full of failures. `dynamix bench trace` and `dynamix bench replay`: a generated
//! Mooncake-format trace replayed against four mocker engines completes with its prefixes cached, and
//! bad traces and flags are errors that name them.

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
    bench_cmd("http", args)
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

/// Runs `dynamix bench SUBCOMMAND` with `args`; exit status, stdout, stderr.
fn bench_cmd(subcommand: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = bin()
        .args(["bench", subcommand])
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Four mocker engines at speed-up 20 behind `router`, on a free port.
fn mockers(dir: &std::path::Path, router: &str) -> Killed {
    let config = dir.join(format!("{router}.toml"));
    std::fs::write(
        &config,
        format!(
            "[http]\nhost = \"127.0.0.1\"\nport = 0\nworkers = 1\n[router]\nmode = \"{router}\"\n\
             [engine]\nkind = \"mocker\"\ndevices = [\"sim:0\", \"sim:1\", \"sim:2\", \"sim:3\"]\n\
             [mocker]\nnum_gpu_blocks = 2048\nblock_size = 64\nspeedup_ratio = 20.0\n\
             [embeddings]\nenabled = false\n"
        ),
    )
    .expect("config");
    Killed(spawn_serving(bin().args([
        "serve",
        "--config",
        config.to_str().unwrap_or_default(),
    ])))
}

#[test]
fn a_generated_trace_replays_with_its_shared_prefixes_cached() {
    let dir = std::env::temp_dir().join(format!("dynamix-replay-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let trace = dir.join("trace.jsonl");
    let trace = trace.to_str().unwrap_or_default();
    // Two prefixes of 4 blocks (2048 tokens) each, 40 requests at 20 req/s.
    let (code, stdout, stderr) = bench_cmd(
        "trace",
        &[
            "--kind",
            "prefix-groups",
            "-n",
            "40",
            "--rate",
            "20",
            "--groups",
            "2",
            "--prefix-blocks",
            "4",
            "--output-tokens",
            "8",
            "--seed",
            "7",
            "-o",
            trace,
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.is_empty(), "the trace went to the file: {stdout}");
    assert!(stderr.contains("40 prefix-groups requests"), "{stderr}");
    let lines = std::fs::read_to_string(trace).expect("trace written");
    assert_eq!(lines.lines().count(), 40);
    let first: Value =
        serde_json::from_str(lines.lines().next().unwrap_or_default()).expect("json");
    for field in ["timestamp", "input_length", "output_length", "hash_ids"] {
        assert!(!first[field].is_null(), "{field} missing: {first}");
    }

    // Both routers: every request completes, and the hit rate is the engines' own count (round-robin
    // has no router estimate): two prefixes over four engines leave most prompt tokens cached.
    for router in ["kv", "round-robin"] {
        let server = mockers(&dir, router);
        let pid = server.0.child.id().to_string();
        let (code, stdout, stderr) = bench_cmd(
            "replay",
            &[
                trace,
                "--url",
                &server.0.base,
                "--speedup",
                "4",
                "--pid",
                &pid,
                "--json",
            ],
        );
        assert_eq!(code, Some(0), "{router}: {stderr}");
        let report: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
        assert_eq!(report["requests"], 40, "{report}");
        assert_eq!(report["ok"], 40, "{report}");
        assert_eq!(report["errors"], serde_json::json!({}), "{report}");
        assert!(report["ttft_p50_ms"].is_number(), "{report}");
        assert!(report["itl_p50_ms"].is_number(), "{report}");
        assert!(report["server_cpu_ms_per_req"].is_number(), "{report}");
        assert_eq!(report["cache_hit_source"], "server /metrics", "{report}");
        let hit = report["cache_hit_rate"].as_f64().unwrap_or(0.0);
        // kv: all but each prefix's first visit hit (about 0.9); round-robin: each engine misses
        // each prefix once (about 0.6); without the prefixes there would be nothing.
        let floor = if router == "kv" { 0.7 } else { 0.3 };
        assert!(
            hit > floor && hit <= 1.0,
            "{router}: hit rate {hit}: {report}"
        );
        drop(server);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn replay_errors_name_what_is_wrong() {
    let dir = std::env::temp_dir().join(format!("dynamix-replay-bad-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 4, \"hash_ids\": [1, 2]}\n{\"timestamp\": 1, \"input_length\": 10}\n",
    )
    .expect("trace");
    let bad = bad.to_str().unwrap_or_default();
    let (code, _, stderr) = bench_cmd("replay", &[bad, "--url", "http://127.0.0.1:9"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("bad.jsonl:2: missing field `output_length`"),
        "{stderr}"
    );
    let missing = dir.join("none.jsonl");
    let (code, _, stderr) = bench_cmd("replay", &[missing.to_str().unwrap_or_default()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("none.jsonl"), "{stderr}");
    // A good trace against a port where nothing listens.
    let good = dir.join("good.jsonl");
    std::fs::write(
        &good,
        "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 4, \"hash_ids\": [1, 2]}\n",
    )
    .expect("trace");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, _, stderr) = bench_cmd(
        "replay",
        &[good.to_str().unwrap_or_default(), "--url", &url],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect to"), "{stderr}");
    for (flag, value) in [("--speedup", "0"), ("--token-ids", "5"), ("--timeout", "0")] {
        let (code, _, stderr) = bench_cmd(
            "replay",
            &[
                good.to_str().unwrap_or_default(),
                "--url",
                &url,
                flag,
                value,
            ],
        );
        assert_eq!(code, Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
