//! The label values and per-model settings the frontend's metrics take: migration type and outcome,
//! media kind, the model gauges, and the phases of a routing decision.

/// Kind of request migration (spec §6), the `migration_type` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationType {
    /// Stream creation failed and was retried.
    NewRequest,
    /// A stream failed mid-generation and was continued on another worker.
    OngoingRequest,
}

impl MigrationType {
    /// The label value: `new_request` or `ongoing_request`.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationType::NewRequest => "new_request",
            MigrationType::OngoingRequest => "ongoing_request",
        }
    }
}

/// How a migration ended, the `outcome` label of `model_migration_duration_seconds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// The request continued on a new stream.
    Recovered,
    /// No new stream could be created (limit exhausted or retry failed).
    Failed,
    /// The client went away while migrating.
    Cancelled,
}

impl MigrationOutcome {
    /// The label value: `recovered`, `failed` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationOutcome::Recovered => "recovered",
            MigrationOutcome::Failed => "failed",
            MigrationOutcome::Cancelled => "cancelled",
        }
    }
}

/// Kind of media part counted by the `*_per_request` histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaKind {
    /// `images_per_request`.
    Image,
    /// `videos_per_request`.
    Video,
    /// `audio_per_request`.
    Audio,
}

/// Per-model values copied from model cards / runtime config into the `model_*` gauges. `None`
/// leaves that gauge untouched (never set, or last value kept: these gauges are never removed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelGauges {
    /// `model_context_length`.
    pub context_length: Option<u64>,
    /// `model_kv_cache_block_size`.
    pub kv_cache_block_size: Option<u64>,
    /// `model_migration_limit`.
    pub migration_limit: Option<u64>,
    /// `model_total_kv_blocks`.
    pub total_kv_blocks: Option<u64>,
    /// `model_max_num_seqs`.
    pub max_num_seqs: Option<u64>,
    /// `model_max_num_batched_tokens`.
    pub max_num_batched_tokens: Option<u64>,
}

/// A phase of one KV routing decision, timed into `dynamo_router_overhead_<phase>_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterPhase {
    /// Hashing the prompt into blocks.
    BlockHashing,
    /// Looking the blocks up in the prefix index.
    FindMatches,
    /// Scoring and picking the worker.
    Scheduling,
    /// The whole decision.
    Total,
}

impl RouterPhase {
    /// Every phase, in metric order.
    pub const ALL: [RouterPhase; 4] = [
        RouterPhase::BlockHashing,
        RouterPhase::FindMatches,
        RouterPhase::Scheduling,
        RouterPhase::Total,
    ];

    pub(super) fn metric_name(self) -> &'static str {
        match self {
            RouterPhase::BlockHashing => "overhead_block_hashing_ms",
            RouterPhase::FindMatches => "overhead_indexer_find_matches_ms",
            RouterPhase::Scheduling => "overhead_scheduling_ms",
            RouterPhase::Total => "overhead_total_ms",
        }
    }

    pub(super) fn help(self) -> &'static str {
        match self {
            RouterPhase::BlockHashing => "Time spent computing block hashes per routed request",
            RouterPhase::FindMatches => {
                "Time spent in the prefix index's find_matches per routed request"
            }
            RouterPhase::Scheduling => {
                "Time spent scoring and selecting a worker per routed request"
            }
            RouterPhase::Total => "Total routing overhead per routed request",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}
