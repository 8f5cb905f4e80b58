//! GPU memory service latency: allocation and export per backend, measured at the backend (create one
//! granule-sized allocation, export a descriptor) and through the service (a writer's `allocate_request`
//! and `export_allocation_request` over the Unix socket, fd passing included).
//!
//! `cargo bench --bench gms` (on a GPU machine; without a GPU the cuda rows print
//! that they were skipped). The engine cold-start vs warm-import comparison needs a model engine and is
//! not here yet.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dynamix_actors::gms::backend::{self, BackendKind, MemoryBackend};
use dynamix_actors::gms::{GmsClient, GmsConfig, GmsServer, RequestedLockType};

const ITERATIONS: usize = 200;

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let mean = samples.iter().map(|d| micros(*d)).sum::<f64>() / samples.len() as f64;
    let at = |q: f64| micros(samples[((samples.len() - 1) as f64 * q) as usize]);
    println!(
        "{name:<34} n={:<4} mean={mean:>9.1}us p50={:>9.1}us p99={:>9.1}us",
        samples.len(),
        at(0.5),
        at(0.99)
    );
}

fn bench_backend(kind: BackendKind, backend: &dyn MemoryBackend) {
    let size = backend.granularity();
    let mut create = Vec::with_capacity(ITERATIONS);
    let mut export = Vec::with_capacity(ITERATIONS);
    let mut keep = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let t = Instant::now();
        let memory = match backend.create(size) {
            Ok(m) => m,
            Err(e) => {
                println!("{kind}: create failed: {e}");
                return;
            }
        };
        create.push(t.elapsed());
        let t = Instant::now();
        match memory.export() {
            Ok(fd) => drop(fd),
            Err(e) => {
                println!("{kind}: export failed: {e}");
                return;
            }
        }
        export.push(t.elapsed());
        keep.push(memory);
    }
    summary(&format!("{kind} backend create {}MiB", size >> 20), create);
    summary(&format!("{kind} backend export fd"), export);
}

fn bench_service(kind: BackendKind, backend: Box<dyn MemoryBackend>) {
    let dir = std::env::temp_dir().join(format!("dynamix-gms-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let socket: PathBuf = dir.join(format!("{kind}.sock"));
    let size = backend.granularity();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = GmsConfig {
        device: 0,
        tag: "weights".into(),
        socket_path: socket.clone(),
        alloc_retry_interval: Duration::from_millis(500),
        alloc_retry_timeout: Some(Duration::from_secs(5)),
    };
    let server = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            match GmsServer::bind(config, backend) {
                Ok(server) => {
                    let _ = ready_tx.send(Ok(()));
                    server
                        .serve(async {
                            let _ = stop_rx.await;
                        })
                        .await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            }
        })
    });
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            println!("{kind}: server failed to start: {e}");
            return;
        }
        Err(_) => return,
    }
    let run = || -> Result<(Vec<Duration>, Vec<Duration>), String> {
        let mut client =
            GmsClient::connect(&socket, RequestedLockType::Rw, None).map_err(|e| e.to_string())?;
        let mut allocate = Vec::with_capacity(ITERATIONS);
        let mut export = Vec::with_capacity(ITERATIONS);
        for _ in 0..ITERATIONS {
            let t = Instant::now();
            let info = client.allocate(size, "bench").map_err(|e| e.to_string())?;
            allocate.push(t.elapsed());
            let t = Instant::now();
            let (_, fd) = client
                .export(&info.allocation_id)
                .map_err(|e| e.to_string())?;
            export.push(t.elapsed());
            drop(fd);
        }
        Ok((allocate, export))
    };
    match run() {
        Ok((allocate, export)) => {
            summary(&format!("{kind} service allocate_request"), allocate);
            summary(&format!("{kind} service export (fd passing)"), export);
        }
        Err(e) => println!("{kind}: service run failed: {e}"),
    }
    let _ = stop_tx.send(());
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    println!("gms bench: {ITERATIONS} allocations of one granule each");
    for kind in [BackendKind::Host, BackendKind::Cuda] {
        let backend = match backend::open(kind, 0, None) {
            Ok(b) => b,
            Err(e) => {
                println!("{kind}: skipped ({e})");
                continue;
            }
        };
        bench_backend(kind, backend.as_ref());
        drop(backend);
        match backend::open(kind, 0, None) {
            Ok(b) => bench_service(kind, b),
            Err(e) => println!("{kind}: skipped ({e})"),
        }
    }
}
