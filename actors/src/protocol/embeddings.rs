//! `/v1/embeddings`: request and response (frontend spec §3.1).
//!
//! `input` and `dimensions` are kept as raw JSON here and checked by
//! [`crate::embeddings::validate`], so that a wrong shape or a negative token id gets a message that
//! names the offending element instead of serde's "did not match any variant".

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /v1/embeddings` body.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct EmbeddingRequest {
    /// Model name.
    pub model: String,
    /// A string, an array of strings, an array of token ids, or an array of token-id arrays.
    pub input: Value,
    /// `float` (default) or `base64`.
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Output dimensions (only the model's own dimension is accepted).
    #[serde(default)]
    pub dimensions: Option<Value>,
    /// End-user id (accepted, not acted on).
    #[serde(default)]
    pub user: Option<String>,
    /// Dynamo's extension object: only `annotations` is defined for embeddings, and accepted.
    #[serde(default)]
    pub nvext: Option<Value>,
    /// Any other field (rejected unless unsupported fields are ignored).
    #[serde(flatten)]
    pub unknown: Map<String, Value>,
}

/// How vectors are written in the response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EncodingFormat {
    /// A JSON array of numbers.
    #[default]
    Float,
    /// Little-endian f32 bytes, standard base64 (what the OpenAI SDKs request by default).
    Base64,
}

/// One vector as written on the wire.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `encoding_format: float`.
    Float(Vec<f32>),
    /// `encoding_format: base64`.
    Base64(String),
}

impl EmbeddingVector {
    /// `vector` in `format`.
    pub fn encode(vector: Vec<f32>, format: EncodingFormat) -> Self {
        match format {
            EncodingFormat::Float => EmbeddingVector::Float(vector),
            EncodingFormat::Base64 => {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// One entry of `data`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: String,
    /// Position of the input this vector belongs to.
    pub index: usize,
    /// The vector.
    pub embedding: EmbeddingVector,
}

/// `usage` of an embeddings response (no completion tokens).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EmbeddingUsage {
    /// Tokens of every input together.
    pub prompt_tokens: u32,
    /// Equal to `prompt_tokens`.
    pub total_tokens: u32,
}

/// The response body.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: String,
    /// Served model name.
    pub model: String,
    /// One vector per input, in input order.
    pub data: Vec<EmbeddingData>,
    /// Token accounting.
    pub usage: EmbeddingUsage,
}

impl EmbeddingResponse {
    /// The response for `vectors` (in input order), written in `format`.
    pub fn new(
        model: &str,
        vectors: Vec<Vec<f32>>,
        format: EncodingFormat,
        prompt_tokens: u32,
    ) -> Self {
        EmbeddingResponse {
            object: "list".into(),
            model: model.to_string(),
            data: vectors
                .into_iter()
                .enumerate()
                .map(|(index, vector)| EmbeddingData {
                    object: "embedding".into(),
                    index,
                    embedding: EmbeddingVector::encode(vector, format),
                })
                .collect(),
            usage: EmbeddingUsage {
                prompt_tokens,
                total_tokens: prompt_tokens,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_f32() {
        let encoded = EmbeddingVector::encode(vec![1.0, -2.5], EncodingFormat::Base64);
        let EmbeddingVector::Base64(text) = encoded else {
            panic!("expected base64, got {encoded:?}");
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("valid base64");
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat()
        );
    }

    #[test]
    fn response_shape_matches_the_spec() {
        let response =
            EmbeddingResponse::new("m", vec![vec![0.5], vec![0.25]], EncodingFormat::Float, 7);
        let json = serde_json::to_value(&response).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "object": "list",
                "model": "m",
                "data": [
                    {"object": "embedding", "index": 0, "embedding": [0.5]},
                    {"object": "embedding", "index": 1, "embedding": [0.25]},
                ],
                "usage": {"prompt_tokens": 7, "total_tokens": 7},
            })
        );
    }
}
