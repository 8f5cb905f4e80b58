//! The in-flight registry under concurrent load: `threads` workers each register and drop choices
//! in a loop (what every routed request does once, plus one migration update), while one reader
//! takes a full snapshot every millisecond (what `/health`, `/dashboard` and an engine failure do).
//! Prints registrations per second and the reader's snapshot latency.
//!
//!   cargo bench --bench inflight [-- THREADS...]     (default 1 2 4 8)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dynamix_actors::gateway::inflight::InflightRegistry;

const RUN: Duration = Duration::from_secs(2);
/// Choices held open by each worker at once (requests in flight per thread).
const OPEN: usize = 64;

fn run(threads: usize) -> (f64, Duration, usize) {
    let registry = Arc::new(InflightRegistry::default());
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (registry, stop) = (registry.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                seen = seen.max(registry.snapshot().len());
                worst = worst.max(started.elapsed());
                std::thread::sleep(Duration::from_millis(1));
            }
            (worst, seen)
        })
    };
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (registry, stop) = (registry.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut open = std::collections::VecDeque::with_capacity(OPEN);
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("req-{t}-{done}");
                    let handle = registry.register(&id, 0, done % 4);
                    handle.entry().tokens.fetch_add(1, Ordering::Relaxed);
                    open.push_back(handle);
                    if open.len() > OPEN {
                        open.pop_front();
                    }
                    done += 1;
                }
                done
            })
        })
        .collect();
    std::thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap_or(0)).sum();
    let (worst, seen) = reader.join().unwrap_or((Duration::ZERO, 0));
    (total as f64 / RUN.as_secs_f64(), worst, seen)
}

fn main() {
    let threads: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let threads = if threads.is_empty() {
        vec![1, 2, 4, 8]
    } else {
        threads
    };
    println!(
        "in-flight registry, {} CPUs, {OPEN} choices open per thread, a snapshot every ms",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for n in threads {
        let (rate, worst, seen) = run(n);
        println!(
            "threads {n:>2}: {:>10.0} register+drop/s   worst snapshot {:>8.1} µs ({seen} entries)",
            rate,
            worst.as_secs_f64() * 1e6
        );
    }
}
