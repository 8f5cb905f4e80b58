//! Device names and the engine's config validation.

use super::*;

#[test]
fn devices_parse_as_cpu_or_cuda() {
    assert_eq!(DeviceSpec::parse("cuda:3"), Ok(DeviceSpec::Cuda(3)));
    assert_eq!(DeviceSpec::parse("cpu:1"), Ok(DeviceSpec::Cpu(1)));
    assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
    let bad = DeviceSpec::parse("tpu:0").unwrap_err().to_string();
    assert!(bad.contains("tpu:0") && bad.contains("cuda:N"), "{bad}");
    let bad = DeviceSpec::parse("cuda:x").unwrap_err().to_string();
    assert!(bad.contains("`x` is not a device number"), "{bad}");
}

#[test]
fn gpu_engine_config_rejects_bad_values() {
    let bad = GpuEngineConfig {
        gpu_memory_utilization: 1.5,
        ..GpuEngineConfig::default()
    };
    assert_eq!(
        bad.validate().unwrap_err().key,
        "gpu_engine.gpu_memory_utilization"
    );
    let bad = GpuEngineConfig {
        max_batched_tokens: 4,
        max_num_seqs: 8,
        ..GpuEngineConfig::default()
    };
    assert_eq!(
        bad.validate().unwrap_err().key,
        "gpu_engine.max_batched_tokens"
    );
    assert!(GpuEngineConfig::default().validate().is_ok());
}
