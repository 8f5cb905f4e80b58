//! The load generator's HTTP/1.1 client: one keep-alive TCP connection (TCP_NODELAY), a request
//! written with one `write_all`, the answer read into a reused buffer, and the body handed over
//! chunk by chunk as it arrives (chunked or `Content-Length`, or until the server closes). Nothing
//! more (no TLS, redirects, compression or pipelining): the client shares the cores with the server
//! it measures, so every request must cost it as little as possible.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Room kept free in the receive buffer before each read.
const READ_ROOM: usize = 16 << 10;

/// Largest response head accepted (a server answering with more is not an HTTP server).
const MAX_HEAD: usize = 64 << 10;

/// Why an exchange failed below HTTP status codes.
#[derive(Debug, thiserror::Error)]
pub(super) enum HttpError {
    /// The server closed the connection before the response ended.
    #[error("connection closed before the response ended")]
    Closed,
    /// Reading or writing the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes are not an HTTP/1.1 response.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// How the body of a response ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyLength {
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// `Content-Length`.
    Fixed(usize),
    /// Neither: the body runs until the server closes.
    UntilClose,
}

/// A response's status line and the headers the client acts on.
#[derive(Clone, Copy, Debug)]
pub(super) struct Head {
    /// The status code.
    pub(super) status: u16,
    /// How the body ends.
    pub(super) body: BodyLength,
    /// The server closes the connection after this response.
    pub(super) close: bool,
}

/// One open connection.
pub(super) struct Connection {
    stream: TcpStream,
    /// Received bytes; those before `start` are consumed. Reused across responses.
    buffer: Vec<u8>,
    start: usize,
    /// The server closed its side (the connection cannot carry another request).
    eof: bool,
}

impl Connection {
    /// Connect to `addr` with Nagle off: requests and small SSE frames go out at once.
    pub(super) async fn open(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            buffer: Vec::with_capacity(READ_ROOM),
            start: 0,
            eof: false,
        })
    }

    /// Whether another request may be sent on this connection.
    pub(super) fn reusable(&self) -> bool {
        !self.eof
    }

    /// Send a whole request (head and body).
    pub(super) async fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request).await
    }

    /// The unconsumed bytes.
    fn pending(&self) -> &[u8] {
        &self.buffer[self.start..]
    }

    /// Read more bytes from the socket; `false` at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        } else if self.start > READ_ROOM {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        if self.buffer.capacity() - self.buffer.len() < READ_ROOM / 2 {
            self.buffer.reserve(READ_ROOM);
        }
        let n = self.stream.read_buf(&mut self.buffer).await?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n > 0)
    }

    /// Read the status line and headers.
    pub(super) async fn read_head(&mut self) -> Result<Head, HttpError> {
        let mut searched = 0;
        let end = loop {
            let pending = self.pending();
            if let Some(i) = find(&pending[searched..], b"\r\n\r\n") {
                break searched + i;
            }
            if pending.len() > MAX_HEAD {
                return Err(HttpError::Malformed("response head over 64 KiB"));
            }
            searched = pending.len().saturating_sub(3);
            if !self.fill().await? {
                return Err(HttpError::Closed);
            }
        };
        let head = parse_head(&self.pending()[..end])?;
        self.start += end + 4;
        Ok(head)
    }

    /// Read the body of the response with `head`, handing each piece to `on_data` as it arrives.
    pub(super) async fn read_body(
        &mut self,
        head: &Head,
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<(), HttpError> {
        match head.body {
            BodyLength::Fixed(mut left) => {
                while left > 0 {
                    if self.pending().is_empty() && !self.fill().await? {
                        return Err(HttpError::Closed);
                    }
                    let n = left.min(self.pending().len());
                    on_data(&self.pending()[..n]);
                    self.start += n;
                    left -= n;
                }
            }
            BodyLength::UntilClose => loop {
                if !self.pending().is_empty() {
                    on_data(self.pending());
                    self.start = self.buffer.len();
                }
                if !self.fill().await? {
                    break;
                }
            },
            BodyLength::Chunked => loop {
                let size = self.read_chunk_size().await?;
                if size == 0 {
                    // Trailers (normally none) up to the empty line.
                    while self.read_line().await?.1 > 0 {}
                    break;
                }
                while self.pending().len() < size + 2 {
                    if !self.fill().await? {
                        return Err(HttpError::Closed);
                    }
                }
                if &self.pending()[size..size + 2] != b"\r\n" {
                    return Err(HttpError::Malformed("chunk not followed by CRLF"));
                }
                on_data(&self.pending()[..size]);
                self.start += size + 2;
            },
        }
        if head.close {
            self.eof = true;
        }
        Ok(())
    }

    /// Consume one CRLF-terminated line; where it starts in the buffer (valid until the next read)
    /// and its length without the CRLF.
    async fn read_line(&mut self) -> Result<(usize, usize), HttpError> {
        loop {
            if let Some(i) = find(self.pending(), b"\r\n") {
                let start = self.start;
                self.start += i + 2;
                return Ok((start, i));
            }
            if self.pending().len() > MAX_HEAD {
                return Err(HttpError::Malformed("line over 64 KiB"));
            }
            if !self.fill().await? {
                return Err(HttpError::Closed);
            }
        }
    }

    /// Consume a chunk-size line (`1a;ext=x`); the size.
    async fn read_chunk_size(&mut self) -> Result<usize, HttpError> {
        let (start, length) = self.read_line().await?;
        let line = &self.buffer[start..start + length];
        let digits = line.split(|&b| b == b';').next().unwrap_or_default();
        std::str::from_utf8(digits)
            .ok()
            .and_then(|d| usize::from_str_radix(d.trim(), 16).ok())
            .filter(|&size| size <= usize::MAX - 2)
            .ok_or(HttpError::Malformed("bad chunk size"))
    }
}

/// Position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Status line and headers (without the final CRLF CRLF).
fn parse_head(raw: &[u8]) -> Result<Head, HttpError> {
    let text = std::str::from_utf8(raw).map_err(|_| HttpError::Malformed("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not an HTTP/1.x status line"));
    }
    let status = parts
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or(HttpError::Malformed("bad status code"))?;
    let mut head = Head {
        status,
        body: BodyLength::UntilClose,
        // HTTP/1.0 closes unless told otherwise.
        close: version == "HTTP/1.0",
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            if value.eq_ignore_ascii_case("chunked") {
                head.body = BodyLength::Chunked;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            if head.body != BodyLength::Chunked {
                let length = value
                    .parse()
                    .map_err(|_| HttpError::Malformed("bad content-length"))?;
                head.body = BodyLength::Fixed(length);
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                head.close = true;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                head.close = false;
            }
        }
    }
    // 1xx, 204 and 304 have no body.
    if status < 200 || status == 204 || status == 304 {
        head.body = BodyLength::Fixed(0);
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::net::TcpListener;

    /// A server that answers each request on one connection with the next of `answers`, as raw bytes
    /// written in pieces of `piece` bytes.
    async fn serve(answers: Vec<&'static [u8]>, piece: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            for answer in answers {
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                for part in answer.chunks(piece) {
                    socket.write_all(part).await.expect("write");
                    socket.flush().await.expect("flush");
                }
            }
        });
        addr
    }

    async fn body(connection: &mut Connection) -> Result<(Head, Vec<u8>), HttpError> {
        connection.send(b"GET / HTTP/1.1\r\n\r\n").await?;
        let head = connection.read_head().await?;
        let mut body = Vec::new();
        connection
            .read_body(&head, |piece| body.extend_from_slice(piece))
            .await?;
        Ok((head, body))
    }

    #[tokio::test]
    async fn keep_alive_chunked_and_fixed_bodies_in_small_pieces() {
        let addr = serve(
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}",
                b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nto the end",
            ],
            3,
        )
        .await;
        let mut connection = Connection::open(addr).await.expect("connects");
        let (head, text) = body(&mut connection).await.expect("chunked");
        assert_eq!((head.status, text.as_slice()), (200, &b"hello world"[..]));
        let (head, text) = body(&mut connection).await.expect("fixed");
        assert_eq!((head.status, text.as_slice()), (503, &b"{}"[..]));
        assert!(connection.reusable());
        let (head, text) = body(&mut connection).await.expect("until close");
        assert_eq!((head.status, text.as_slice()), (200, &b"to the end"[..]));
        assert!(!connection.reusable());
    }

    #[tokio::test]
    async fn truncated_and_malformed_answers_are_errors() {
        for (answer, expected) in [
            (
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel"[..],
                "connection closed",
            ),
            (&b"HTTP/1.1 200 OK\r\n"[..], "connection closed"),
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], "not an HTTP/1.x"),
            (
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
                "bad chunk size",
            ),
        ] {
            let addr = serve(vec![answer], 4).await;
            let mut connection = Connection::open(addr).await.expect("connects");
            let error = body(&mut connection).await.expect_err("fails");
            assert!(error.to_string().contains(expected), "{error}");
        }
    }
}
