//! Full actor path vs a bare actix-web handler, and SSE streaming speed.
//!
//! `cargo bench --bench http_path` prints:
//! 1. Non-streaming chat through the whole path (HTTP → validator → router → echo engine at 0 delay →
//!    fold) against a bare actix-web handler returning the same JSON bytes, each in its own server
//!    process with the same worker count, driven by the same keep-alive load generator at a fixed
//!    concurrency: requests/s, p50/p99 latency, server CPU ms per request (from /proc/<pid>/stat), and
//!    the throughput ratio (target ≥ 0.5; full path ≤ 50 µs CPU per request).
//! 2. Tokens/s through SSE for one long stream at 0 delay, and time to first byte on a reused keep-alive
//!    connection (a Nagle/delayed-ACK stall would show as ~40 ms).
//! 3. Server CPU per streamed token, engine to socket: streaming chat requests of 256 tokens each at
//!    the same concurrency, the server's CPU time divided by the tokens it streamed (target ≤ 2 µs).
//!
//! The bench binary re-executes itself as each server (env `BENCH_ROLE`), so the numbers compare servers,
//! not harnesses. Tunables: BENCH_REQUESTS (default 4000), BENCH_CONCURRENCY (16), BENCH_WORKERS (1).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::env_usize;

const MODEL: &str = "SmolLM2-135M-Instruct";

fn main() {
    match std::env::var("BENCH_ROLE").as_deref() {
        Ok("full") => serve_full(),
        Ok("bare") => serve_bare(),
        _ => drive(),
    }
}

/// The dynamix server, echo engine at 0 delay.
fn serve_full() {
    let workers = env_usize("BENCH_WORKERS", 1);
    let text = format!(
        "[http]\nhost = \"127.0.0.1\"\nport = 0\nworkers = {workers}\n[echo]\ntoken_delay_ms = 0\n[log]\nfilter = \"warn\"\n[validator]\nthreads = 1\n"
    );
    let path = std::env::temp_dir().join(format!("dynamix-bench-{}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write config");
    let config =
        dynamix::config::load(Some(&path), &Vec::new, &Default::default()).expect("config");
    actix_rt::System::new().block_on(async move {
        let service = dynamix::start(&config, true).await.expect("start");
        println!("READY {}", service.http_addrs[0]);
        std::future::pending::<()>().await;
    });
}

/// A bare actix-web handler returning fixed bytes.
fn serve_bare() {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let workers = env_usize("BENCH_WORKERS", 1);
    let body: &'static str = Box::leak(
        std::env::var("BENCH_BODY")
            .expect("BENCH_BODY")
            .into_boxed_str(),
    );
    actix_rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            App::new().route(
                "/v1/chat/completions",
                web::post().to(move |_body: web::Bytes| async move {
                    HttpResponse::Ok()
                        .content_type("application/json")
                        .body(body)
                }),
            )
        })
        .workers(workers)
        .bind(("127.0.0.1", 0))
        .expect("bind");
        println!("READY {}", server.addrs()[0]);
        server.run().await.expect("run");
    });
}

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(role: &str, body: Option<&str>) -> Server {
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.env("BENCH_ROLE", role)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(b) = body {
        cmd.env("BENCH_BODY", b);
    }
    let mut child = cmd.spawn().expect("spawn server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    let addr = line
        .trim()
        .strip_prefix("READY ")
        .expect("READY <addr>")
        .to_string();
    Server { child, addr }
}

/// utime + stime of `pid`, in milliseconds.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the command name: state is field 3, utime 14, stime 15 (1-based) → indexes 11, 12 here.
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks * 1000.0 / hz
}

fn request_bytes(addr: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Read one HTTP/1.1 response with Content-Length from `stream`; returns the body.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            let total = end + 4 + len;
            while buf.len() < total {
                let mut chunk = [0u8; 16384];
                let n = stream.read(&mut chunk).await.expect("read");
                assert!(n > 0, "connection closed");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..total].to_vec();
            buf.drain(..total);
            return body;
        }
        let mut chunk = [0u8; 16384];
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

struct LoadResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms_per_request: f64,
}

async fn load(server: &Server, body: &str, total: usize, concurrency: usize) -> LoadResult {
    let request = request_bytes(&server.addr, body);
    // Warm up.
    run_clients(&server.addr, &request, concurrency * 20, concurrency).await;
    let cpu0 = cpu_ms(server.child.id());
    let started = Instant::now();
    let mut latencies = run_clients(&server.addr, &request, total, concurrency).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_ms(server.child.id()) - cpu0;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    LoadResult {
        rps: total as f64 / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        cpu_ms_per_request: cpu / total as f64,
    }
}

async fn run_clients(addr: &str, request: &[u8], total: usize, concurrency: usize) -> Vec<f64> {
    let per_client = total / concurrency;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (addr, request) = (addr.to_string(), request.to_vec());
        tasks.push(tokio::task::spawn_local(async move {
            let mut stream = TcpStream::connect(&addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let mut buf = Vec::new();
            let mut latencies = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let t0 = Instant::now();
                stream.write_all(&request).await.expect("write");
                let _ = read_response(&mut stream, &mut buf).await;
                latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    all
}

/// Tokens each request of the per-token measurement streams (the echo engine emits one per character).
const SSE_TOKENS: usize = 256;

/// Server CPU µs per streamed token: `total` streaming requests of [`SSE_TOKENS`] tokens each, at
/// `concurrency`, each client reading whole responses over one keep-alive connection.
async fn sse_cpu_per_token(server: &Server, total: usize, concurrency: usize) -> f64 {
    let text: String = "abcdefgh".repeat(SSE_TOKENS / 8);
    let body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": true}).to_string();
    let request = request_bytes(&server.addr, &body);
    let run = |total: usize| {
        let (addr, request) = (server.addr.clone(), request.clone());
        async move {
            let per_client = (total / concurrency).max(1);
            let mut tasks = Vec::new();
            for _ in 0..concurrency {
                let (addr, request) = (addr.clone(), request.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let mut stream = TcpStream::connect(&addr).await.expect("connect");
                    stream.set_nodelay(true).expect("nodelay");
                    let mut chunk = vec![0u8; 65536];
                    let mut data = Vec::new();
                    for _ in 0..per_client {
                        stream.write_all(&request).await.expect("write");
                        data.clear();
                        // The chunked body ends with its empty last chunk.
                        while !data.ends_with(b"0\r\n\r\n") {
                            let n = stream.read(&mut chunk).await.expect("read");
                            assert!(n > 0, "connection closed");
                            data.extend_from_slice(&chunk[..n]);
                        }
                    }
                }));
            }
            for t in tasks {
                t.await.expect("client");
            }
            per_client * concurrency
        }
    };
    run(concurrency * 2).await;
    let cpu0 = cpu_ms(server.child.id());
    let requests = run(total).await;
    let cpu = cpu_ms(server.child.id()) - cpu0;
    cpu * 1000.0 / (requests * SSE_TOKENS) as f64
}

/// Tokens/s of one long SSE stream, and time to first byte on a reused keep-alive connection.
async fn streaming(server: &Server) -> (f64, usize, f64, f64) {
    let text: String = "streaming benchmark ".repeat(500);
    let body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": true}).to_string();
    let request = request_bytes(&server.addr, &body);
    let mut stream = TcpStream::connect(&server.addr).await.expect("connect");
    // Measure tokens/s: count content chunks until [DONE].
    let t0 = Instant::now();
    stream.write_all(&request).await.expect("write");
    let mut data = Vec::new();
    let mut chunk = vec![0u8; 65536];
    while !data.ends_with(b"data: [DONE]\n\n\r\n") && !data.ends_with(b"0\r\n\r\n") {
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0);
        data.extend_from_slice(&chunk[..n]);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let tokens = String::from_utf8_lossy(&data)
        .matches("\"content\":")
        .count();
    // TTFB on the same keep-alive connection, short streams, many times.
    let short = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "ttfb"}], "stream": true}).to_string();
    let short_request = request_bytes(&server.addr, &short);
    let mut ttfb = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        stream.write_all(&short_request).await.expect("write");
        let mut got = Vec::new();
        let mut first = None;
        loop {
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0);
            if first.is_none() && got.len() + n > 0 {
                got.extend_from_slice(&chunk[..n]);
                if got.windows(6).any(|w| w == b"data: ") {
                    first = Some(t.elapsed().as_secs_f64() * 1000.0);
                }
            } else {
                got.extend_from_slice(&chunk[..n]);
            }
            if got.ends_with(b"0\r\n\r\n") {
                break;
            }
        }
        ttfb.push(first.unwrap_or(f64::NAN));
    }
    ttfb.sort_by(f64::total_cmp);
    (
        tokens as f64 / elapsed,
        tokens,
        ttfb[ttfb.len() / 2],
        ttfb[(ttfb.len() * 99) / 100],
    )
}

fn drive() {
    let total = env_usize("BENCH_REQUESTS", 4000);
    let concurrency = env_usize("BENCH_CONCURRENCY", 16);
    let workers = env_usize("BENCH_WORKERS", 1);
    let body = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello world, benchmark!"}]}).to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let full = spawn("full", None);
        // The bare handler returns exactly what the full path returns.
        let mut s = TcpStream::connect(&full.addr).await.expect("connect");
        s.write_all(&request_bytes(&full.addr, &body)).await.expect("write");
        let reference = String::from_utf8(read_response(&mut s, &mut Vec::new()).await).expect("utf8");
        drop(s);
        println!("http_path: {total} non-streaming chat requests, concurrency {concurrency}, {workers} HTTP worker(s) per server");
        println!("response body: {} bytes", reference.len());
        let full_result = load(&full, &body, total, concurrency).await;
        let (tok_s, tokens, ttfb50, ttfb99) = streaming(&full).await;
        let sse_requests = (total / 10).max(concurrency);
        let per_token_us = sse_cpu_per_token(&full, sse_requests, concurrency).await;
        drop(full);
        let bare = spawn("bare", Some(&reference));
        let bare_result = load(&bare, &body, total, concurrency).await;
        drop(bare);
        for (name, r) in [("bare actix-web handler", &bare_result), ("full actor path (echo)", &full_result)] {
            println!(
                "{name:<24} {:>9.0} req/s   p50 {:>6.3} ms   p99 {:>6.3} ms   server CPU {:>6.3} ms/req",
                r.rps, r.p50_ms, r.p99_ms, r.cpu_ms_per_request
            );
        }
        println!("throughput ratio full/bare: {:.2} (target >= 0.50)", full_result.rps / bare_result.rps);
        println!("SSE stream: {tokens} tokens at {tok_s:.0} tokens/s (echo, 0 delay)");
        println!("SSE server CPU per token, engine to socket: {per_token_us:.2} µs ({sse_requests} streams of {SSE_TOKENS} tokens, concurrency {concurrency}; target <= 2)");
        println!("SSE time to first byte on a reused keep-alive connection: p50 {ttfb50:.3} ms, p99 {ttfb99:.3} ms (a Nagle stall would be ~40 ms)");
    });
}
