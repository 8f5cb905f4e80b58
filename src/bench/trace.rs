//! Request traces in the public Mooncake format, read and generated.
//!
//! One JSON object per line: `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids":
//! [...]}`. Each hash id stands for one block of `block_tokens` (512 in Mooncake's traces) prompt
//! tokens, and equal ids mean equal content, so two requests whose `hash_ids` start alike share exactly
//! that prefix. This is the format of Mooncake's published traces and of aiperf's `mooncake_trace`
//! dataset. Other fields (`session_id`, `delay`, ...) are ignored.
//!
//! The generator writes synthetic traces in the same format, seeded, so tests and benches need no
//! download: groups of requests behind a shared prefix (documents, agents, system prompts), a tail of
//! unique prompts, multi-turn sessions whose every turn extends the previous turn's prompt, or a mix of
//! the three.

use std::fmt;
use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::cli::{BenchTraceArgs, TraceKind};

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
pub struct TraceRecord {
    /// When the request is sent, in milliseconds from the trace's start.
    pub timestamp: f64,
    /// Prompt tokens.
    pub input_length: usize,
    /// Tokens to generate.
    pub output_length: u32,
    /// The prompt's blocks, first to last; equal ids are equal content.
    #[serde(default)]
    pub hash_ids: Vec<u64>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A line is not a trace record.
    #[error("{path}:{line}: {reason}")]
    Record {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The file holds no record.
    #[error("{path}: no requests (expected one JSON object per line with timestamp, input_length, output_length and hash_ids)")]
    Empty {
        /// The file.
        path: String,
    },
}

/// Reads a JSONL trace: blank lines are skipped; anything else must be a record with a finite,
/// non-negative timestamp, a positive input length, and at most as many hash ids as the input has
/// blocks. Records come back sorted by timestamp (stable, so equal times keep file order).
pub fn read(
    path: &str,
    reader: impl BufRead,
    block_tokens: usize,
) -> Result<Vec<TraceRecord>, TraceError> {
    let mut records = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| TraceError::Io {
            path: path.to_string(),
            source,
        })?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let fail = |reason: String| TraceError::Record {
            path: path.to_string(),
            line: i + 1,
            reason,
        };
        let record: TraceRecord = serde_json::from_str(text).map_err(|e| fail(e.to_string()))?;
        if !record.timestamp.is_finite() || record.timestamp < 0.0 {
            return Err(fail(format!(
                "timestamp {} is not a time in milliseconds ≥ 0",
                record.timestamp
            )));
        }
        if record.input_length == 0 {
            return Err(fail("input_length is 0; a request needs a prompt".into()));
        }
        let blocks = record.input_length.div_ceil(block_tokens);
        if record.hash_ids.len() > blocks {
            return Err(fail(format!(
                "{} hash_ids for {} input tokens: more than the {blocks} blocks of {block_tokens} tokens they cover (is --block-tokens right?)",
                record.hash_ids.len(),
                record.input_length
            )));
        }
        records.push(record);
    }
    if records.is_empty() {
        return Err(TraceError::Empty {
            path: path.to_string(),
        });
    }
    records.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(records)
}

/// The prompt token ids of `record`: block `i` is the `block_tokens` ids that `hash_ids[i]` stands
/// for (the last one cut to the input length), and any tokens past the hashed blocks are unique to
/// request `index`. Ids are drawn from `[first_id, first_id + id_range)`.
pub fn prompt_tokens(
    record: &TraceRecord,
    index: usize,
    block_tokens: usize,
    ids: IdRange,
) -> Vec<u32> {
    let mut tokens = Vec::with_capacity(record.input_length);
    for &hash in &record.hash_ids {
        let take = block_tokens.min(record.input_length - tokens.len());
        ids.fill(&mut tokens, hash, take);
    }
    let rest = record.input_length - tokens.len();
    // A stream of its own per request: the top bit keeps it apart from every hash id's.
    ids.fill(&mut tokens, (1 << 63) | index as u64, rest);
    tokens
}

/// Which token ids prompts are made of.
#[derive(Clone, Copy, Debug)]
pub struct IdRange {
    /// The smallest id used.
    pub first: u32,
    /// How many ids after it are used.
    pub count: u32,
}

impl IdRange {
    fn fill(&self, tokens: &mut Vec<u32>, stream: u64, n: usize) {
        let mut rng = SplitMix(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
        let count = self.count.max(1) as u64;
        tokens.extend((0..n).map(|_| self.first + (rng.next() % count) as u32));
    }
}

impl fmt::Display for TraceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TraceKind::PrefixGroups => "prefix-groups",
            TraceKind::MultiTurn => "multi-turn",
            TraceKind::Unique => "unique",
            TraceKind::Mixed => "mixed",
        })
    }
}

/// SplitMix64: small, seeded, and the same on every platform.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi.saturating_sub(lo) as u64 + 1)) as usize
    }
}

/// Synthetic traces, seeded.
struct Generator {
    rng: SplitMix,
    /// The next hash id nobody has used.
    next_id: u64,
    block_tokens: usize,
    /// The prefix groups' blocks, made on first use.
    groups: Vec<Vec<u64>>,
}

impl Generator {
    fn fresh(&mut self, n: usize) -> Vec<u64> {
        let ids = (self.next_id..self.next_id + n as u64).collect();
        self.next_id += n as u64;
        ids
    }

    /// An exponential gap with mean `mean` (ms).
    fn gap(&mut self, mean: f64) -> f64 {
        let u = self.rng.unit().max(f64::EPSILON);
        -u.ln() * mean
    }

    /// A length of about `mean` (±50%), at least 1.
    fn around(&mut self, mean: usize) -> usize {
        let mean = mean.max(1);
        self.rng.between(mean.div_ceil(2), mean + mean / 2).max(1)
    }

    /// A request of `blocks` whole blocks of hashed content, the last one partly filled.
    fn request(&mut self, timestamp: f64, hash_ids: Vec<u64>, output: u32) -> TraceRecord {
        let full = hash_ids.len().saturating_sub(1) * self.block_tokens;
        let last = self
            .rng
            .between(self.block_tokens / 2, self.block_tokens)
            .max(1);
        TraceRecord {
            timestamp,
            input_length: full + last,
            output_length: output,
            hash_ids,
        }
    }

    /// A request behind one of `groups` shared prefixes of `prefix_blocks` blocks, picked by a Zipf-like
    /// popularity (group g with weight 1 / (g + 1)^skew), plus `unique_blocks` of its own.
    fn prefixed(&mut self, timestamp: f64, args: &BenchTraceArgs) -> TraceRecord {
        if self.groups.is_empty() {
            self.groups = (0..args.groups.max(1))
                .map(|_| self.fresh(args.prefix_blocks))
                .collect();
        }
        let weights: Vec<f64> = (0..self.groups.len())
            .map(|g| 1.0 / ((g + 1) as f64).powf(args.skew))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut draw = self.rng.unit() * total;
        let mut group = self.groups.len() - 1;
        for (g, w) in weights.iter().enumerate() {
            if draw < *w {
                group = g;
                break;
            }
            draw -= w;
        }
        let mut ids = self.groups[group].clone();
        let own = args.unique_blocks.max(1);
        ids.extend(self.fresh(own));
        let output = self.around(args.output_tokens as usize) as u32;
        self.request(timestamp, ids, output)
    }

    fn unique(&mut self, timestamp: f64, args: &BenchTraceArgs) -> TraceRecord {
        let blocks = self.around(args.prefix_blocks + args.unique_blocks.max(1));
        let ids = self.fresh(blocks);
        let output = self.around(args.output_tokens as usize) as u32;
        self.request(timestamp, ids, output)
    }

    /// A session starting at `start`: `turns` requests, each turn's prompt the previous one's plus the
    /// answer and a new user message (`unique_blocks` blocks), `think_ms` apart on average. Sessions share
    /// one of `groups` system prompts.
    fn session(&mut self, start: f64, args: &BenchTraceArgs) -> Vec<TraceRecord> {
        if self.groups.is_empty() {
            self.groups = (0..args.groups.max(1))
                .map(|_| self.fresh(args.prefix_blocks))
                .collect();
        }
        let group = self.rng.between(0, self.groups.len() - 1);
        let mut history = self.groups[group].clone();
        let mut at = start;
        let mut turns = Vec::with_capacity(args.turns);
        for turn in 0..args.turns.max(1) {
            if turn > 0 {
                at += args.think_ms * 0.5 + self.gap(args.think_ms * 0.5);
            }
            let user = self.around(args.unique_blocks.max(1));
            history.extend(self.fresh(user));
            let output = self.around(args.output_tokens as usize) as u32;
            turns.push(self.request(at, history.clone(), output));
        }
        turns
    }
}

/// A synthetic trace as `args` describes it, sorted by timestamp.
pub fn generate(args: &BenchTraceArgs) -> Vec<TraceRecord> {
    let mut generator = Generator {
        rng: SplitMix(args.seed),
        next_id: 0,
        block_tokens: args.block_tokens,
        groups: Vec::new(),
    };
    let mean_gap = 1000.0 / args.rate;
    let mut records = Vec::with_capacity(args.requests);
    let mut now = 0.0;
    while records.len() < args.requests {
        now += generator.gap(mean_gap);
        let kind = match args.kind {
            TraceKind::Mixed => match generator.rng.between(0, 9) {
                0..=4 => TraceKind::PrefixGroups,
                5..=7 => TraceKind::MultiTurn,
                _ => TraceKind::Unique,
            },
            kind => kind,
        };
        match kind {
            TraceKind::PrefixGroups => records.push(generator.prefixed(now, args)),
            TraceKind::Unique => records.push(generator.unique(now, args)),
            TraceKind::MultiTurn | TraceKind::Mixed => {
                // A session counts its turns against the rate: it starts as often as `turns` requests
                // would arrive.
                let turns = generator.session(now, args);
                now += generator.gap(mean_gap) * (turns.len().saturating_sub(1)) as f64;
                records.extend(turns);
            }
        }
    }
    records.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    records.truncate(args.requests);
    for record in &mut records {
        // Whole microseconds keep the file short and the order exact.
        record.timestamp = (record.timestamp * 1000.0).round() / 1000.0;
    }
    records
}

/// Distinct prompt tokens a trace's hash ids stand for (each id once), and its total prompt tokens.
pub fn footprint(records: &[TraceRecord], block_tokens: usize) -> (usize, usize) {
    let mut ids: Vec<u64> = records
        .iter()
        .flat_map(|r| r.hash_ids.iter().copied())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let total = records.iter().map(|r| r.input_length).sum();
    (ids.len() * block_tokens, total)
}

/// `dynamix bench trace`: writes the trace to stdout (or `--output`), a summary to stderr.
pub fn main(args: BenchTraceArgs) -> std::process::ExitCode {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        eprintln!(
            "dynamix bench trace: --rate {}: expected requests per second > 0",
            args.rate
        );
        return std::process::ExitCode::from(2);
    }
    if !(args.think_ms.is_finite() && args.think_ms >= 0.0) {
        eprintln!(
            "dynamix bench trace: --think-ms {}: expected milliseconds ≥ 0",
            args.think_ms
        );
        return std::process::ExitCode::from(2);
    }
    if !(args.skew.is_finite() && args.skew >= 0.0) {
        eprintln!(
            "dynamix bench trace: --skew {}: expected a number ≥ 0",
            args.skew
        );
        return std::process::ExitCode::from(2);
    }
    let records = generate(&args);
    let write = |out: &mut dyn Write| -> io::Result<()> {
        for record in &records {
            serde_json::to_writer(&mut *out, record)?;
            out.write_all(b"\n")?;
        }
        out.flush()
    };
    let result = match &args.output {
        Some(path) => std::fs::File::create(path)
            .map(io::BufWriter::new)
            .and_then(|mut file| write(&mut file))
            .map_err(|e| format!("{path}: {e}")),
        None => write(&mut io::stdout().lock()).map_err(|e| format!("stdout: {e}")),
    };
    if let Err(e) = result {
        eprintln!("dynamix bench trace: {e}");
        return std::process::ExitCode::from(1);
    }
    let (distinct, total) = footprint(&records, args.block_tokens);
    let span = records.last().map_or(0.0, |r| r.timestamp) / 1000.0;
    eprintln!(
        "dynamix bench trace: {} {} requests over {span:.1} s; {total} prompt tokens, {distinct} of them distinct hashed-block tokens",
        records.len(),
        args.kind,
    );
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> BenchTraceArgs {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: BenchTraceArgs,
        }
        let mut argv = vec!["trace"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).args
    }

    const IDS: IdRange = IdRange {
        first: 1000,
        count: 30_000,
    };

    #[test]
    fn equal_hash_ids_give_equal_tokens_and_nothing_else_is_shared() {
        let a = TraceRecord {
            timestamp: 0.0,
            input_length: 1300,
            output_length: 4,
            hash_ids: vec![7, 8, 9],
        };
        let b = TraceRecord {
            timestamp: 1.0,
            input_length: 1100,
            output_length: 4,
            hash_ids: vec![7, 8],
        };
        let ta = prompt_tokens(&a, 0, 512, IDS);
        let tb = prompt_tokens(&b, 1, 512, IDS);
        assert_eq!((ta.len(), tb.len()), (1300, 1100));
        assert_eq!(ta[..1024], tb[..1024]);
        // Past the shared blocks: a's block 9 against b's own tokens.
        let same = ta[1024..1100]
            .iter()
            .zip(&tb[1024..1100])
            .filter(|(x, y)| x == y)
            .count();
        assert!(same < 5, "{same}");
        assert!(ta.iter().all(|&t| (1000..31_000).contains(&t)));
        // The same request twice is the same prompt.
        assert_eq!(prompt_tokens(&a, 0, 512, IDS), ta);
    }

    #[test]
    fn reading_checks_each_line_and_sorts() {
        let text = "{\"timestamp\": 5, \"input_length\": 600, \"output_length\": 3, \"hash_ids\": [1, 2]}\n\n{\"timestamp\": 1.5, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [], \"session_id\": 3}\n";
        let records = read("t.jsonl", text.as_bytes(), 512).expect("valid");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].timestamp, 1.5);
        for (bad, reason) in [
            ("{\"timestamp\": 1}", "t.jsonl:1: missing field `input_length`"),
            ("{}\n", "missing field"),
            ("not json", "t.jsonl:1:"),
            (
                "{\"timestamp\": -1, \"input_length\": 1, \"output_length\": 1}",
                "timestamp -1",
            ),
            (
                "{\"timestamp\": 0, \"input_length\": 0, \"output_length\": 1}",
                "input_length is 0",
            ),
            (
                "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [1, 2]}",
                "2 hash_ids for 10 input tokens",
            ),
            ("\n\n", "no requests"),
        ] {
            let error = read("t.jsonl", bad.as_bytes(), 512)
                .expect_err(bad)
                .to_string();
            assert!(error.contains(reason), "{bad}: {error}");
        }
    }

    #[test]
    fn generated_traces_round_trip_and_have_their_shape() {
        for kind in ["prefix-groups", "multi-turn", "unique", "mixed"] {
            let args = args(&["--kind", kind, "--requests", "200", "--seed", "3"]);
            let records = generate(&args);
            assert_eq!(records.len(), 200, "{kind}");
            assert!(records.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
            let mut text = Vec::new();
            for record in &records {
                serde_json::to_writer(&mut text, record).expect("json");
                text.push(b'\n');
            }
            let back = read("gen", text.as_slice(), 512).expect(kind);
            assert_eq!(back, records, "{kind}");
            // Seeded: the same arguments give the same trace.
            assert_eq!(generate(&args), records);
        }
        // Prefix groups: every request starts with one of the groups' prefixes.
        let records = generate(&args(&[
            "--kind",
            "prefix-groups",
            "--groups",
            "4",
            "--prefix-blocks",
            "6",
        ]));
        let mut prefixes: Vec<&[u64]> = records.iter().map(|r| &r.hash_ids[..6]).collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 4);
        // Unique: no id twice.
        let records = generate(&args(&["--kind", "unique"]));
        let (distinct, _) = footprint(&records, 512);
        let all: usize = records.iter().map(|r| r.hash_ids.len()).sum();
        assert_eq!(distinct, all * 512);
        // Multi-turn: a turn's prompt extends an earlier turn's.
        let records = generate(&args(&[
            "--kind",
            "multi-turn",
            "--turns",
            "3",
            "--groups",
            "1",
        ]));
        let extended = records
            .iter()
            .filter(|r| {
                records.iter().any(|earlier| {
                    earlier.timestamp < r.timestamp
                        && earlier.hash_ids.len() > args(&[]).prefix_blocks
                        && r.hash_ids.starts_with(&earlier.hash_ids)
                })
            })
            .count();
        assert!(
            extended * 3 >= records.len(),
            "{extended} of {}",
            records.len()
        );
    }
}
