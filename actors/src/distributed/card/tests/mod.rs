//! Tests of the model deployment card: the record Dynamo 1.6.1's mocker wrote (captured from
//! etcd, its files in `tests/fixtures/dynamo-model`), rejection of unservable cards, fetching
//! files from disk and over HTTP from a local server, and a SmolLM2 card written and loaded back.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::models::tests::TempDir;
use crate::tokenizer::{ChatMessage, ModelTokenizer};

mod file_fetch;
mod model_load;
mod record;

/// Where the mocker's model files were when the card was captured.
const CAPTURED_DIR: &str = "/tmp/dynvenv/model";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dynamo-model")
}

/// The captured record, verbatim.
fn sample_bytes() -> Vec<u8> {
    std::fs::read(fixture_dir().join("mdc.json")).expect("read the captured card")
}

fn sample_value() -> Value {
    serde_json::from_slice(&sample_bytes()).expect("the captured card is JSON")
}

/// The captured record with its paths pointing at the fixture files.
fn sample_record_here() -> CardRecord {
    let dir = std::fs::canonicalize(fixture_dir()).expect("fixture dir");
    let text = String::from_utf8(sample_bytes())
        .expect("UTF-8")
        .replace(CAPTURED_DIR, &dir.to_string_lossy());
    CardRecord::from_json(text.as_bytes()).expect("the captured card is servable")
}

fn no_cache() -> FetchOptions {
    FetchOptions {
        cache_dir: None,
        ..FetchOptions::default()
    }
}

fn rejection(edit: impl FnOnce(&mut Value)) -> String {
    let mut value = sample_value();
    edit(&mut value);
    let bytes = serde_json::to_vec(&value).expect("serialise");
    match CardRecord::from_json(&bytes) {
        Ok(record) => panic!("accepted {record:?}"),
        Err(error) => error.to_string(),
    }
}

fn remove(value: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').expect("a pointer with a parent");
    value
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("parent object")
        .remove(key)
        .expect("field present");
}
