//! [`EngineRegistry`]: the engines this process routes to, with their live load, as `/health`, the
//! dashboard and the distributed layer see them: fixed for in-process engines, changing as workers
//! join and leave in a frontend.

use std::sync::Arc;

use serde::Serialize;

use crate::protocol::engine::LoadMetrics;

/// One engine as `/health` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct EngineInfo {
    /// Instance id.
    pub instance_id: u64,
    /// Engine kind.
    pub engine: String,
    /// Device it is pinned to.
    pub device: String,
    /// Live load.
    #[serde(skip)]
    pub load: Arc<crate::engine::EngineLoad>,
    /// The mocker's simulated cache and queue state (mocker engines only).
    #[serde(skip)]
    pub mocker: Option<Arc<crate::engine::MockerLoad>>,
    /// The model engine's batch state (model engines only).
    #[serde(skip)]
    pub model: Option<Arc<crate::engine::ModelLoad>>,
    /// The GPU engine's live state (a model engine on `cuda:N`).
    #[serde(skip)]
    pub gpu: Option<Arc<crate::engine::gpu::GpuLoad>>,
    /// How it is reached: `in-process`, or a worker's `tcp://host:port`.
    pub transport: String,
    /// A worker's request plane as this frontend speaks it: `mux` or `dynamo` (remote engines only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_plane: Option<&'static str>,
    /// Namespace, component and endpoint it serves (`dynamix/backend/generate` in-process; a
    /// worker's from its discovery record).
    pub endpoint_id: [String; 3],
    /// A worker's last published load (remote engines only).
    #[serde(skip)]
    pub remote: Option<Arc<std::sync::Mutex<Option<LoadMetrics>>>>,
}

/// The engines `/health` reports: fixed for in-process engines, changing as workers join and leave
/// in a frontend.
#[derive(Debug, Default)]
pub struct EngineRegistry {
    engines: std::sync::RwLock<Vec<EngineInfo>>,
}

impl EngineRegistry {
    /// A registry holding `engines`.
    pub fn new(engines: Vec<EngineInfo>) -> Self {
        EngineRegistry {
            engines: std::sync::RwLock::new(engines),
        }
    }

    /// The engines now.
    pub fn snapshot(&self) -> Vec<EngineInfo> {
        self.engines
            .read()
            .map(|e| e.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// How many engines there are.
    pub fn len(&self) -> usize {
        self.engines.read().map(|e| e.len()).unwrap_or(0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether engine `id` is listed.
    pub fn contains(&self, id: u64) -> bool {
        self.engines
            .read()
            .map(|e| e.iter().any(|e| e.instance_id == id))
            .unwrap_or(false)
    }

    /// Add an engine, replacing one with the same id.
    pub fn upsert(&self, info: EngineInfo) {
        let mut engines = self.engines.write().unwrap_or_else(|e| e.into_inner());
        engines.retain(|e| e.instance_id != info.instance_id);
        engines.push(info);
    }

    /// Remove engine `id`; returns it.
    pub fn remove(&self, id: u64) -> Option<EngineInfo> {
        let mut engines = self.engines.write().unwrap_or_else(|e| e.into_inner());
        let index = engines.iter().position(|e| e.instance_id == id)?;
        Some(engines.remove(index))
    }
}
