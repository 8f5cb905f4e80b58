//! The kernels compiled to PTX by NVRTC from PyPI (no GPU needed), the shapes they accept, and a
//! random model decoded on the CPU reference engine.

use super::*;

/// NVRTC from PyPI (pinned), loaded by absolute path.
fn nvrtc_from_pypi() {
    use crate::models::{ModelStore, NVRTC_CU12, NVRTC_CU12_LIB_DIR};
    let store = ModelStore::default();
    store
        .ensure(&NVRTC_CU12, &mut |_| {})
        .unwrap_or_else(|e| panic!("cannot pull {}: {e}", NVRTC_CU12.requirement()));
    let dir = store.package_dir(&NVRTC_CU12).join(NVRTC_CU12_LIB_DIR);
    let loaded = super::device::preload(std::slice::from_ref(&dir));
    assert!(
        loaded.len() >= 2,
        "loaded {loaded:?} from {}",
        dir.display()
    );
}

#[test]
fn every_kernel_compiles_to_ptx_with_nvrtc() {
    nvrtc_from_pypi();
    let mut other = smollm2_shape();
    // A Llama-3-8B-like shape as well: head size 128, 4 query heads per KV head, 128k vocabulary.
    other.head_dim = 128;
    other.heads = 32;
    other.kv_heads = 8;
    other.hidden = 4096;
    other.vocab = 128_256;
    for (shape, arch) in [(smollm2_shape(), (9, 0)), (other, (8, 0))] {
        let ptx = kernels::compile(&shape, arch).unwrap_or_else(|e| panic!("{e}"));
        let text = ptx.to_src();
        for name in kernels::KERNEL_NAMES {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "kernel {name} missing from the PTX"
            );
        }
        assert!(text.contains(&format!(".target sm_{}{}", arch.0, arch.1)));
    }
}

#[test]
fn a_model_outside_the_kernels_shapes_is_refused_clearly() {
    let mut shape = smollm2_shape();
    shape.head_dim = 60;
    let e = kernels::check_shape(&shape).unwrap_err().to_string();
    assert!(e.contains("head size 60"), "{e}");
    let mut shape = smollm2_shape();
    shape.heads = 24;
    let e = kernels::check_shape(&shape).unwrap_err().to_string();
    assert!(e.contains("24 query heads over 3 KV heads"), "{e}");
}

#[test]
fn a_random_model_loads_and_decodes_on_the_cpu_engine() {
    let dir = std::env::temp_dir().join(format!("dynamix-random-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("tiny.gguf");
    let shape = crate::engine::model::ModelShape {
        layers: 2,
        hidden: 64,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        ffn: 128,
        vocab: 256,
        context_length: 128,
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
    };
    crate::engine::model::synthetic::write_random_llama(&path, &shape, 3, None).expect("written");
    let model = crate::engine::model::LlamaModel::load(&path).expect("loads");
    assert_eq!(model.shape, shape);
    let prompt = super::check::prompts(1, 5, shape.vocab, 1).remove(0);
    let (a, logits) = super::check::cpu_greedy(&model, &prompt, 8);
    let (b, _) = super::check::cpu_greedy(&model, &prompt, 8);
    assert_eq!(a, b);
    assert_eq!(logits.len(), 256);
    // The same seed writes the same file.
    let again = dir.join("again.gguf");
    crate::engine::model::synthetic::write_random_llama(&again, &shape, 3, None).expect("written");
    assert_eq!(std::fs::read(&path).ok(), std::fs::read(&again).ok());
    let _ = std::fs::remove_dir_all(&dir);
}
