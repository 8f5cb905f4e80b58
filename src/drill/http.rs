//! The drill's HTTP client: one POST per connection (`Connection: close`), the whole answer read,
//! a chunked body decoded. Enough for the drill's own server; it is not a general client.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A status and a body.
pub(super) struct Response {
    pub(super) status: u16,
    pub(super) body: Vec<u8>,
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// POST `body` (JSON) to `path` at `addr`; the answer within `timeout`.
pub(super) async fn post(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse(&raw)
    };
    tokio::time::timeout(timeout, exchange).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )
    })?
}

/// Status line, headers, and the body (de-chunked when `Transfer-Encoding: chunked`).
fn parse(raw: &[u8]) -> io::Result<Response> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("the connection closed before the response headers ended"))?;
    let head =
        std::str::from_utf8(&raw[..end]).map_err(|_| invalid("response headers are not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line in {head:?}")))?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("the body ended inside a chunk header"))?;
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .and_then(|line| usize::from_str_radix(line.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| invalid("bad chunk size"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err(invalid("the body ended inside a chunk"));
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// The `data:` payloads of an SSE body, in order.
pub(super) fn sse_data(body: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(body)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.strip_prefix("data:").map(str::trim))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_plain_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n";
        let response = parse(raw).expect("parses");
        assert_eq!(
            (response.status, response.body.as_slice()),
            (200, &b"hello world"[..])
        );
        let raw = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}";
        let response = parse(raw).expect("parses");
        assert_eq!(
            (response.status, response.body.as_slice()),
            (503, &b"{}"[..])
        );
        assert!(
            parse(b"HTTP/1.1 200 OK\r\n").is_err(),
            "headers never ended"
        );
        let truncated = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
        assert!(parse(truncated).is_err(), "a chunk cut short");
    }

    #[test]
    fn sse_payloads() {
        let body = b"data: {\"a\":1}\n\nevent: error\ndata: {\"b\":2}\n\ndata: [DONE]\n\n";
        assert_eq!(
            sse_data(body).collect::<Vec<_>>(),
            ["{\"a\":1}", "{\"b\":2}", "[DONE]"]
        );
    }
}
