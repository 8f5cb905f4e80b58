//! The README's quick start, run as a new user types it: the "start it" command exactly as written
//! in the README (`cargo run --release`: a release build, the first-start model pull when the store
//! is empty, the embedded default config), then the README's first curl line, then Ctrl-C.
//!
//! Only the port changes, through the environment (`DYN_HTTP_PORT`) and in the curl line, so the
//! test never needs port 8000 free; the GPU memory service's socket goes to a scratch directory
//! (`GMS_SOCKET_DIR`) for the same reason. The commands themselves are read from README.md, so a
//! README that stops working fails here.
//!
//! This test builds the release binary when it is not built yet (minutes on two cores); nextest
//! runs it alone (`.config/nextest.toml`) so that build does not slow the timing-sensitive tests.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use dynamix_actors::distributed::infra::free_port;
use serde_json::Value;

/// Building the release binary from nothing on a 2-core machine, plus the first model pull.
const START_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// One chat completion on the CPU (a few seconds; generous for a loaded machine).
const CURL_TIMEOUT: Duration = Duration::from_secs(300);
/// Ctrl-C to exit: the drain is at most `DYN_HTTP_GRACEFUL_SHUTDOWN_TIMEOUT_SECS` (5 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(repo_root().join("README.md")).expect("README.md is readable")
}

/// The text of the section under `## {heading}`, up to the next `## `.
fn section<'a>(readme: &'a str, heading: &str) -> &'a str {
    let marker = format!("\n## {heading}\n");
    let start = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README has no `## {heading}` section"))
        + marker.len();
    let rest = &readme[start..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    &rest[..end]
}

/// The ```sh code blocks of a section, in order.
fn sh_blocks(section: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "```sh" {
            let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
            blocks.push(body.join("\n"));
        }
    }
    blocks
}

/// The commands of a shell block: a command runs from a line starting with a word to the line where
/// its quotes are balanced again (the README's curl lines span several lines inside `'...'`).
fn commands(block: &str) -> Vec<String> {
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        if current.is_empty() && (line.trim().is_empty() || line.trim_start().starts_with('#')) {
            continue;
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(line);
        if current.matches('\'').count().is_multiple_of(2) && !current.ends_with('\\') {
            commands.push(std::mem::take(&mut current));
        }
    }
    commands
}

/// The process group of `cargo run` and the server it starts; Ctrl-C goes to the whole group, as
/// a terminal sends it.
struct Started {
    child: Child,
    log: PathBuf,
}

impl Started {
    fn signal(&self, signal: libc::c_int) {
        let group = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's process group; no memory is involved.
        unsafe {
            libc::kill(-group, signal);
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// `GET path` on 127.0.0.1:port with a plain socket: the status code, or None when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    use std::io::Write;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Runs `command` with `sh -c` in `dir`; killed (and the test failed) after `timeout`.
fn run_shell(command: &str, dir: &Path, timeout: Duration) -> std::process::Output {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `sh -c {command}`: {e}"));
    // Drain both pipes while waiting, so a long answer cannot stall the child on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{command}` did not finish within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

#[test]
fn quick_start_from_the_readme_works_as_written() {
    use std::os::unix::process::CommandExt;

    let readme = readme();
    let start_blocks = sh_blocks(section(&readme, "Two commands"));
    let start = commands(
        start_blocks
            .first()
            .expect("a start block under `## Two commands`"),
    )
    .into_iter()
    .next()
    .expect("a start command");
    assert!(
        start.starts_with("cargo run"),
        "the README's start command changed: {start}"
    );
    let curl = sh_blocks(section(&readme, "Talk to it"))
        .iter()
        .flat_map(|block| commands(block))
        .find(|command| command.starts_with("curl ") && command.contains("/v1/chat/completions"))
        .expect("a curl chat completion under `## Talk to it`");
    assert!(
        curl.contains("localhost:8000"),
        "the README's curl line no longer targets localhost:8000: {curl}"
    );
    let curl_found = Command::new("curl").arg("--version").output().is_ok();
    assert!(
        curl_found,
        "curl is not installed; the README's quick start uses it"
    );

    let scratch = std::env::temp_dir().join(format!("dynamix-readme-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&scratch).unwrap();
    let port = free_port();
    let log = scratch.join("server.log");
    // A simple command: run its words directly (no shell in between to take the Ctrl-C).
    assert!(
        !start.contains(|c: char| "'\"$|&;<>`\\".contains(c)),
        "the start command is no longer a simple command: {start}"
    );
    let words: Vec<&str> = start.split_whitespace().collect();
    let child = Command::new(words[0])
        .args(&words[1..])
        .current_dir(repo_root())
        .env("DYN_HTTP_PORT", port.to_string())
        .env("GMS_SOCKET_DIR", &scratch)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(scratch.join("stdout.log")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{start}`: {e}"));
    let mut server = Started { child, log };

    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if http_status(port, "/health") == Some(200) {
            break;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!(
                "`{start}` exited ({status}) before serving; its output:\n{}",
                server.log_tail()
            );
        }
        assert!(
            Instant::now() < deadline,
            "`{start}` did not serve /health within {} s; its output:\n{}",
            START_TIMEOUT.as_secs(),
            server.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let curl = curl.replace("localhost:8000", &format!("localhost:{port}"));
    let output = run_shell(&curl, &repo_root(), CURL_TIMEOUT);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "`{curl}` failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let body: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the curl line's answer is not JSON ({e}): {stdout}"));
    assert_eq!(body["object"], "chat.completion", "{body}");
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(!content.trim().is_empty(), "an empty answer: {body}");
    let startup = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        startup.contains(&format!(
            "serving SmolLM2-135M-Instruct on http://0.0.0.0:{port}"
        )),
        "the start-up output does not say what it serves and where:\n{}",
        server.log_tail()
    );
    assert!(
        startup.contains("try: curl"),
        "the start-up output has no curl line to try:\n{}",
        server.log_tail()
    );

    // Ctrl-C, as in a terminal: the whole foreground group gets SIGINT; the server drains and exits.
    server.signal(libc::SIGINT);
    let status = server.wait_exit(STOP_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "`{start}` still runs {} s after Ctrl-C; its output:\n{}",
            STOP_TIMEOUT.as_secs(),
            server.log_tail()
        )
    });
    assert!(
        status.success(),
        "`{start}` exited with {status} after Ctrl-C; its output:\n{}",
        server.log_tail()
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn readme_command_blocks_parse_as_the_quick_start_expects() {
    let block = "cargo run --release\n\ncurl -s localhost:8000/x -d '{\n  \"a\": 1\n}'\n# note\nfoo \\\n  bar";
    let parsed = commands(block);
    assert_eq!(parsed[0], "cargo run --release");
    assert_eq!(parsed[1], "curl -s localhost:8000/x -d '{\n  \"a\": 1\n}'");
    assert_eq!(parsed[2], "foo \\\n  bar");
    let readme = "intro\n## Two commands\ntext\n```sh\ncargo run --release\n```\n## Next\n";
    assert_eq!(
        sh_blocks(section(readme, "Two commands")),
        vec!["cargo run --release"]
    );
}
