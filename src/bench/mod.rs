//! `dynamix bench http`: a closed-loop load generator for the chat completions API of any
//! OpenAI-compatible server, dynamix or not. Its numbers are meant to compare with
//! ../shared/peer_bench/load.py's (same loop, same default prompt, same percentiles and CPU
//! accounting), from a client cheap enough to share two cores with the server it measures: one
//! tokio thread, one keep-alive HTTP/1.1 connection per client, the request bytes built once.
//!
//! Before loading, one request checks that the server answers (a wrong URL, port or model is an
//! error that says so, not a run full of failures).
//!
//! Layout:
//! - [`http`](self::http): the minimal HTTP/1.1 client.
//! - [`load`](self::load): the closed loop, SSE parsing and per-request timings.
//! - [`tokens`](self::tokens): the model's tokenizer for prompts and output tokens.
//! - [`cpu`](self::cpu): server and client CPU time from /proc.
//! - [`report`](self::report): percentiles, the table and the JSON line.
//! - [`trace`](self::trace) and [`replay`](self::replay): `dynamix bench trace` and `dynamix bench
//!   replay`, Mooncake-format request traces generated and replayed open loop.

mod cpu;
mod http;
mod load;
pub mod replay;
mod report;
mod tokens;
pub mod trace;

use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{BenchHttpArgs, BenchMode};
use http::Connection;
use tokens::TokenCounter;

/// Why a load test could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// `--url` is not an http:// URL.
    #[error("--url {url}: {reason}")]
    Url {
        /// The value given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A duration flag is negative, zero or not a number.
    #[error("--{flag} {value}: expected a number of seconds {range}")]
    Seconds {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: f64,
        /// The allowed range.
        range: &'static str,
    },
    /// The host name does not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        source: io::Error,
    },
    /// No connection to the server.
    #[error("cannot connect to {url} ({addr}): {source}; is the server running?")]
    Connect {
        /// The base URL.
        url: String,
        /// The address tried.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The server did not answer the check request as an OpenAI-compatible server would.
    #[error("{request}: {reason}")]
    Check {
        /// Method and URL.
        request: String,
        /// What came back.
        reason: String,
    },
    /// `--tokenizer` names no usable tokenizer.
    #[error("--tokenizer {given}: {reason}")]
    Tokenizer {
        /// The value given.
        given: String,
        /// Why.
        reason: String,
    },
    /// A `--pid` is not a running process.
    #[error("--pid {pid}: no such process (/proc/{pid}/stat is not readable)")]
    NoSuchProcess {
        /// The pid given.
        pid: u32,
    },
    /// The client's runtime could not start.
    #[error("cannot start the client runtime: {0}")]
    Runtime(io::Error),
    /// The trace file cannot be replayed.
    #[error("{0}")]
    Trace(#[from] trace::TraceError),
    /// A flag's value is not usable.
    #[error("--{flag} {value}: {reason}")]
    Argument {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is expected.
        reason: &'static str,
    },
}

impl BenchError {
    /// Exit status: 2 for bad arguments, 1 when the server or the machine is the problem.
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Url { .. }
            | BenchError::Seconds { .. }
            | BenchError::Tokenizer { .. }
            | BenchError::NoSuchProcess { .. }
            | BenchError::Trace(_)
            | BenchError::Argument { .. } => 2,
            _ => 1,
        }
    }
}

/// Where the server is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    /// `host[:port]` as written (the Host header).
    authority: String,
    /// The host name or address, without IPv6 brackets.
    host: String,
    port: u16,
    /// The API's path prefix, ending in `/v1`.
    prefix: String,
}

impl Target {
    /// `http://HOST[:PORT][/PATH]`; `/v1` is appended to the path unless it ends with it.
    fn parse(url: &str) -> Result<Self, BenchError> {
        let fail = |reason| BenchError::Url {
            url: url.to_string(),
            reason,
        };
        let rest = match url.strip_prefix("http://") {
            Some(rest) => rest,
            None if url.starts_with("https://") => {
                return Err(fail(
                    "https is not supported (the client speaks plain HTTP/1.1)",
                ))
            }
            None => return Err(fail("expected http://HOST[:PORT][/PATH]")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let (host, port) = match authority.strip_prefix('[') {
            Some(bracketed) => {
                let (host, after) = bracketed
                    .split_once(']')
                    .ok_or_else(|| fail("unclosed [ in the IPv6 address"))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(fail("no host"));
        }
        let port = match port {
            Some(port) => port
                .parse()
                .map_err(|_| fail("the port is not a number from 0 to 65535"))?,
            None => 80,
        };
        if path.contains(['?', '#']) {
            return Err(fail("a base URL has no query or fragment"));
        }
        let path = path.trim_end_matches('/');
        let prefix = if path.ends_with("/v1") {
            path.to_string()
        } else {
            format!("{path}/v1")
        };
        Ok(Target {
            authority: authority.to_string(),
            host: host.to_string(),
            port,
            prefix,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}{path}", self.authority, self.prefix)
    }

    /// A request for `path` under the prefix: GET without a body, else POST of JSON.
    fn request(&self, path: &str, body: Option<&[u8]>, accept: &str, close: bool) -> Vec<u8> {
        let connection = if close { "Connection: close\r\n" } else { "" };
        let mut request = match body {
            None => format!(
                "GET {}{path} HTTP/1.1\r\nHost: {}\r\nAccept: {accept}\r\n{connection}\r\n",
                self.prefix, self.authority
            ),
            Some(body) => format!(
                "POST {}{path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: {accept}\r\n{connection}Content-Length: {}\r\n\r\n",
                self.prefix,
                self.authority,
                body.len()
            ),
        }
        .into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        request
    }
}

/// The command line, checked.
struct Options {
    target: Target,
    args: BenchHttpArgs,
    duration: Duration,
    warmup: Duration,
    timeout: Duration,
}

impl Options {
    fn new(args: BenchHttpArgs) -> Result<Self, BenchError> {
        let seconds = |flag, value: f64, zero_ok: bool| {
            let range = if zero_ok { "≥ 0" } else { "> 0" };
            match Duration::try_from_secs_f64(value) {
                Ok(d) if zero_ok || !d.is_zero() => Ok(d),
                _ => Err(BenchError::Seconds { flag, value, range }),
            }
        };
        Ok(Options {
            target: Target::parse(&args.url)?,
            duration: seconds("duration", args.duration, false)?,
            warmup: seconds("warmup", args.warmup, true)?,
            timeout: seconds("timeout", args.timeout, false)?,
            args,
        })
    }
}

/// A status and a body, read whole (the checks before the run).
async fn fetch(
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>), String> {
    let exchange = async {
        let mut connection = Connection::open(addr).await.map_err(|e| e.to_string())?;
        connection.send(request).await.map_err(|e| e.to_string())?;
        let head = connection.read_head().await.map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        connection
            .read_body(&head, |piece| body.extend_from_slice(piece))
            .await
            .map_err(|e| e.to_string())?;
        Ok((head.status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// The start of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// Checks that every `--pid` is a process, resolves the target and opens one connection to it: the
/// checks before any load.
async fn reach(target: &Target, pids: &[u32]) -> Result<SocketAddr, BenchError> {
    for &pid in pids {
        if cpu::ticks(pid, false).is_none() {
            return Err(BenchError::NoSuchProcess { pid });
        }
    }
    let resolve = |source| BenchError::Resolve {
        host: target.host.clone(),
        source,
    };
    let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(&resolve)?
        .next()
        .ok_or_else(|| resolve(io::Error::new(io::ErrorKind::NotFound, "no address")))?;
    Connection::open(addr)
        .await
        .map_err(|source| BenchError::Connect {
            url: target.url(""),
            addr,
            source,
        })?;
    Ok(addr)
}

/// Check the target, then run the load and summarise it.
async fn run(options: &Options) -> Result<report::Report, BenchError> {
    let Options { target, args, .. } = options;
    let addr = reach(target, &args.pids).await?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => first_model(target, addr, options.timeout).await?,
    };
    let counter = Arc::new(TokenCounter::resolve(args.tokenizer.as_deref(), &model)?);
    let (prompt, prompt_tokens) = counter.prompt(args.prompt_tokens);
    let stream = args.mode == BenchMode::Stream;
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
    });
    if stream {
        body["stream"] = serde_json::Value::Bool(true);
    }
    let body = body.to_string().into_bytes();
    let accept = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    let check = target.request("/chat/completions", Some(&body), accept, false);
    let request_name = format!("POST {}", target.url("/chat/completions"));
    match fetch(addr, &check, options.timeout).await {
        Ok((200, _)) => {}
        Ok((status, body)) => {
            return Err(BenchError::Check {
                request: request_name,
                reason: format!("answered {status}: {}", excerpt(&body)),
            })
        }
        Err(reason) => {
            return Err(BenchError::Check {
                request: request_name,
                reason,
            })
        }
    }
    eprintln!(
        "dynamix bench http: {} clients for {:.1} s (+{:.1} s warm-up) on {}; output tokens counted as {}",
        args.concurrency,
        options.duration.as_secs_f64(),
        options.warmup.as_secs_f64(),
        target.url("/chat/completions"),
        counter.describe()
    );
    let setup = report::Setup {
        url: target.url("/chat/completions"),
        model,
        mode: format!(
            "{}{}",
            if stream { "stream" } else { "unary" },
            if args.close { "+close" } else { "" }
        ),
        concurrency: args.concurrency,
        duration: options.duration,
        warmup: options.warmup,
        max_tokens: args.max_tokens,
        prompt_tokens,
        token_method: counter.method(),
        token_note: counter.describe(),
        pids: args.pids.clone(),
        load_before: cpu::load_average(),
    };
    let plan = Arc::new(load::Plan {
        addr,
        request: target.request("/chat/completions", Some(&body), accept, args.close),
        mode: args.mode,
        close: args.close,
        timeout: options.timeout,
        counter,
    });
    let measured = load::run(
        plan,
        args.concurrency,
        options.warmup,
        options.duration,
        args.pids.clone(),
        args.children,
    )
    .await;
    Ok(report::Report::new(setup, measured))
}

/// The first model the server lists at /v1/models.
async fn first_model(
    target: &Target,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<String, BenchError> {
    let request = target.request("/models", None, "application/json", false);
    let fail = |reason: String| BenchError::Check {
        request: format!("GET {}", target.url("/models")),
        reason: format!("{reason}; name the model with --model"),
    };
    let (status, body) = fetch(addr, &request, timeout).await.map_err(fail)?;
    if status != 200 {
        return Err(fail(format!("answered {status}: {}", excerpt(&body))));
    }
    let list: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|_| fail(format!("not a JSON model list: {}", excerpt(&body))))?;
    list["data"][0]["id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| fail("lists no models".into()))
}

/// `dynamix bench http`: exit status 0 when requests succeeded, 1 when none did or the server could
/// not be reached, 2 for bad arguments.
pub fn main(args: BenchHttpArgs) -> ExitCode {
    let json = args.json;
    let result = Options::new(args).and_then(|options| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(BenchError::Runtime)?
            .block_on(run(&options))
    });
    match result {
        Ok(report) => {
            if json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text());
            }
            if report.requests == 0 {
                eprintln!("dynamix bench http: no request succeeded in the measured window");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dynamix bench http: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_and_without_v1() {
        let target = Target::parse("http://127.0.0.1:8000").expect("valid");
        assert_eq!(
            (target.host.as_str(), target.port, target.prefix.as_str()),
            ("127.0.0.1", 8000, "/v1")
        );
        assert_eq!(
            target.url("/chat/completions"),
            "http://127.0.0.1:8000/v1/chat/completions"
        );
        assert_eq!(Target::parse("http://h/v1/").expect("valid").prefix, "/v1");
        assert_eq!(
            Target::parse("http://h:1/api").expect("valid").prefix,
            "/api/v1"
        );
        let v6 = Target::parse("http://[::1]:9000/v1").expect("valid");
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
        assert_eq!(Target::parse("http://example.com").expect("valid").port, 80);
        for (bad, reason) in [
            ("localhost:8000", "expected http://"),
            ("https://h", "https is not supported"),
            ("http://:80", "no host"),
            ("http://h:port", "port"),
            ("http://h:70000", "port"),
            ("http://h/v1?x=1", "query"),
        ] {
            let error = Target::parse(bad).expect_err(bad).to_string();
            assert!(error.contains(reason), "{bad}: {error}");
        }
    }

    #[test]
    fn requests_are_built_once_with_their_length() {
        let target = Target::parse("http://h:1").expect("valid");
        let request = target.request("/chat/completions", Some(b"{}"), "text/event-stream", true);
        assert_eq!(
            String::from_utf8(request).expect("text"),
            "POST /v1/chat/completions HTTP/1.1\r\nHost: h:1\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
        );
    }
}
