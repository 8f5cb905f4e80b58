//! The Python SDK's test suite (python/tests, pytest), run by `cargo nextest run` like every other
//! test: this harness installs the SDK the way a user does (`pip install ./python`) into a venv of
//! its own under the model store, with pytest, pytest-asyncio and the `openai` client, starts real
//! etcd and NATS on free ports, and runs pytest with them and the `dynamix` binary. A missing piece
//! fails the run (DYNAMIX_SDK_REQUIRE_INFRA=1), and so does a pytest run that collected nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use dynamix_actors::distributed::infra::{EtcdServer, NatsServer};

/// What the test venv holds besides the SDK (pinned: the suite is checked against these).
const TEST_REQUIREMENTS: &[&str] = &[
    "pytest==9.2.0",
    "pytest-asyncio==1.5.0",
    "openai>=1.40,<4",
    "pydantic>=2,<3",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The venv with the test requirements (made once; a marker names what it holds).
fn test_venv() -> PathBuf {
    let store = dynamix_actors::models::ModelStore::default_home().join("python");
    std::fs::create_dir_all(&store).expect("the model store is writable");
    let venv = store.join("venv-sdk-tests");
    let marker = venv.join(".requirements");
    let wanted = TEST_REQUIREMENTS.join("\n");
    let lock = std::fs::File::create(store.join(".venv-sdk-tests.lock")).expect("lock file");
    lock.lock().expect("lock the SDK test venv");
    if std::fs::read_to_string(&marker).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&venv);
        let python = std::env::var("DYNAMIX_PYTHON").unwrap_or_else(|_| "python3".into());
        run(
            Command::new(&python).args(["-m", "venv"]).arg(&venv),
            &format!("{python} -m venv"),
        );
        run(
            Command::new(venv.join("bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(TEST_REQUIREMENTS),
            "pip install the test requirements",
        );
        std::fs::write(&marker, &wanted).expect("write the venv marker");
    }
    venv
}

/// `pip install ./python` into `venv`: maturin builds the extension with cargo (release), into
/// this workspace's target directory, so later runs rebuild only what changed.
fn install_sdk(venv: &Path) {
    run(
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--force-reinstall",
                "--no-deps",
            ])
            .arg(repo().join("python"))
            .env("CARGO_TARGET_DIR", target_dir()),
        "pip install ./python",
    );
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

#[test]
fn the_python_sdk_suite_passes() {
    let venv = test_venv();
    install_sdk(&venv);
    let etcd = EtcdServer::start().expect("etcd starts");
    let nats = NatsServer::start().expect("nats-server starts");
    // The venv's `pytest` script, not `python -m pytest`: `-m` puts the working directory first on
    // sys.path, where the source tree's `dynamix` (without its compiled `_core`) would shadow the
    // installed package.
    let output = Command::new(venv.join("bin/pytest"))
        .args(["-q", "-p", "no:cacheprovider", "tests"])
        .current_dir(repo().join("python"))
        .env("ETCD_ENDPOINTS", etcd.url())
        .env("NATS_SERVER", nats.url())
        .env("DYNAMIX_BIN", env!("CARGO_BIN_EXE_dynamix"))
        .env("DYNAMIX_SDK_REQUIRE_INFRA", "1")
        .output()
        .expect("pytest runs");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Exit 5: pytest collected no test, which must not pass as success.
    assert!(
        output.status.success(),
        "pytest failed ({}):\n{text}",
        output.status
    );
    assert!(text.contains(" passed"), "pytest ran no test:\n{text}");
    println!("{text}");
}
