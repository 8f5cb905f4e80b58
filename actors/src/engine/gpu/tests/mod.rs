//! Host-side tests of the GPU engine: device names, step packing, the scheduler (batching, chunked
//! prefill, prefix reuse, cancellation, preemption) over a stand-in runner, and the kernels compiled
//! to PTX by NVRTC from PyPI (no GPU needed).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::batch::{PlanItem, SampleRow, StepPlan};
use super::engine::{Emission, GpuLoad, Scheduler, Seq, StepRunner};
use super::forward::Sampled;
use super::kernels::{self, SAMPLE_PARAMS};
use super::{DeviceSpec, GpuEngineConfig, GpuError};
// The test files below reach these modules as `super::batch` and so on, as they did when they
// were one file.
use super::{batch, check, device, forward};
use crate::engine::model::synthetic::smollm2_shape;
use crate::kv::protocol::KvCacheEventData;
use crate::protocol::engine::{EngineRequest, SamplingOptions, StopConditions};
use crate::protocol::FinishReason;

mod device_config;
mod nvrtc;
mod scheduler;
mod step;
