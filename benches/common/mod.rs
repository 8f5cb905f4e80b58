//! What several benches share (each bench is its own crate and includes this module).

/// A size or count from the environment (`BENCH_*` knobs), `default` when unset or not a number.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
