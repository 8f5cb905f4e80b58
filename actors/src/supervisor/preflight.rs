//! What the tree's start checks and derives before any actor runs: settings the actors would reject,
//! the devices `auto` resolves to, the frontend metrics with the model's gauges, and the mocker's
//! output vocabulary.

use std::sync::Arc;

use super::{ServiceConfig, StartError};
use crate::engine::EngineKind;
use crate::metrics::{FrontendMetrics, ModelGauges};
use crate::tokenizer::ModelTokenizer;

/// Settings the actors would reject, caught before anything starts.
pub(super) fn check(config: &ServiceConfig, has_weights: bool) -> Result<usize, StartError> {
    if config.engine.devices.is_empty() && !config.remote_engines {
        return Err(StartError::Config(
            "engine.devices must list at least one device".into(),
        ));
    }
    if config.engine.kind == EngineKind::Model && !config.remote_engines {
        if !has_weights {
            return Err(StartError::Config(
                "engine.kind = \"model\" needs the model's weights loaded".into(),
            ));
        }
        config.model_engine.validate()?;
    }
    let on_gpu = config.engine.kind == EngineKind::Model
        && config.engine.devices.iter().any(|d| d.starts_with("cuda"));
    if on_gpu {
        config.gpu_engine.validate()?;
    }
    let block_size = match config.engine.kind {
        EngineKind::Mocker => config.mocker.block_size,
        EngineKind::Model if on_gpu => config.gpu_engine.block_size,
        _ => config.router.kv_cache_block_size.unwrap_or(64),
    };
    if let Some(size) = config.router.kv_cache_block_size {
        if size != block_size {
            return Err(StartError::Config(format!(
                "router.kv_cache_block_size = {size} does not match the engines' KV block size of {block_size} tokens"
            )));
        }
    }
    Ok(block_size)
}

/// `engine.devices` with `auto` resolved: every visible GPU for the model engine, else `cpu:0` (said
/// once in the log). An explicit `cuda:N` on a machine without that GPU is an error naming why.
pub(super) fn resolve_devices(config: &ServiceConfig) -> Result<Vec<String>, StartError> {
    use crate::engine::gpu::{self, DeviceSpec};
    let devices = &config.engine.devices;
    let model = config.engine.kind == EngineKind::Model && !config.remote_engines;
    let wants_gpu = model
        && devices
            .iter()
            .any(|d| d == "auto" || matches!(DeviceSpec::parse(d), Ok(DeviceSpec::Cuda(_))));
    if !wants_gpu {
        return Ok(devices
            .iter()
            .map(|d| {
                if d == "auto" {
                    "cpu:0".to_string()
                } else {
                    d.clone()
                }
            })
            .collect());
    }
    gpu::device::preload(&config.gpu_engine.cuda_lib_dirs);
    let probed = gpu::probe();
    let mut resolved = Vec::new();
    for device in devices {
        if device == "auto" {
            match &probed {
                Ok(gpus) => resolved.extend(gpus.iter().map(|g| format!("cuda:{}", g.ordinal))),
                Err(e) => {
                    tracing::warn!(reason = %e, "engine.devices = \"auto\": no usable GPU, running the model on the CPU");
                    resolved.push("cpu:0".into());
                }
            }
            continue;
        }
        if let Ok(DeviceSpec::Cuda(ordinal)) = DeviceSpec::parse(device) {
            match &probed {
                Err(e) => {
                    return Err(StartError::Config(format!(
                        "engine.devices names {device}, but {e}"
                    )))
                }
                Ok(gpus) if ordinal >= gpus.len() => {
                    return Err(StartError::Config(format!(
                        "engine.devices names {device}, but this machine has {} CUDA device(s)",
                        gpus.len()
                    )))
                }
                Ok(_) => {}
            }
        }
        resolved.push(device.clone());
    }
    // `["auto", "cuda:0"]` names cuda:0 twice: one engine per device.
    let mut seen = std::collections::HashSet::new();
    resolved.retain(|d| seen.insert(d.clone()));
    Ok(resolved)
}

/// The frontend metrics (`shared`, or a new registry) with the model's gauges set.
pub(super) fn metrics(
    config: &ServiceConfig,
    tokenizer: &ModelTokenizer,
    block_size: usize,
    shared: Option<Arc<FrontendMetrics>>,
) -> Result<Arc<FrontendMetrics>, StartError> {
    let metrics = match shared {
        Some(metrics) => metrics,
        None => Arc::new(
            FrontendMetrics::new(&config.metrics.prefix, &config.metrics.histograms)
                .map_err(|e| StartError::Metrics(e.to_string()))?,
        ),
    };
    let mut gauges = ModelGauges {
        context_length: Some(u64::from(tokenizer.context_length())),
        ..ModelGauges::default()
    };
    if config.engine.kind == EngineKind::Mocker {
        gauges.kv_cache_block_size = Some(block_size as u64);
        gauges.total_kv_blocks =
            Some((config.mocker.num_gpu_blocks * config.engine.devices.len()) as u64);
        gauges.max_num_seqs = Some(config.mocker.max_num_seqs as u64);
        gauges.max_num_batched_tokens = Some(config.mocker.max_num_batched_tokens as u64);
    }
    metrics.set_model_gauges(&config.model_name, &gauges);
    Ok(metrics)
}

/// Words the mocker draws its output from, so that simulated responses are real text.
const MOCKER_TEXT: &str = "The model is simulated, but the words are real: it reads the request, \
    weighs the cached prefix against the work still queued, and answers with a steady stream of \
    plain English tokens until the requested length is reached. Routing, batching, prefill and \
    decode all take the time a real accelerator would need for the same shapes of work.";

/// The mocker's output vocabulary: the ordinary tokens of [`MOCKER_TEXT`].
pub(super) fn mocker_vocabulary(tokenizer: &ModelTokenizer) -> Arc<[u32]> {
    let mut ids: Vec<u32> = tokenizer
        .encode(MOCKER_TEXT)
        .unwrap_or_default()
        .into_iter()
        .filter(|&id| !tokenizer.is_special(id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        // A tokenizer that cannot encode plain English still has ids; any non-special one will do.
        ids = (0..tokenizer.vocab_size() as u32)
            .filter(|&id| !tokenizer.is_special(id))
            .take(64)
            .collect();
    }
    ids.into()
}
