//! Framing (runtime spec §2.2): a 4-byte big-endian length, then the msgpack body. At most one file
//! descriptor travels per frame, with SCM_RIGHTS in the same `sendmsg` as the frame's first bytes.
//!
//! The server side is async (tokio `UnixStream`); the client side is blocking, as Dynamo's client is.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Length prefix size.
pub const HEADER_SIZE: usize = 4;

/// Largest body accepted. Messages are small (metadata values are tensor descriptions); the bound keeps
/// a hostile length prefix from making the server allocate gigabytes.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// The receive buffer of the first `recvmsg` of a frame (as Dynamo's client).
const RECV_CHUNK: usize = 65536;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES} bytes")]
    TooLarge(usize),
    /// The peer closed in the middle of a frame.
    #[error("Connection closed")]
    Closed,
    /// Socket error.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Prefix `body` with its length.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Read one frame; `Ok(None)` when the peer closed cleanly between frames.
pub async fn read_frame(stream: &mut UnixStream) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; HEADER_SIZE];
    let mut filled = 0;
    while filled < HEADER_SIZE {
        let n = stream.read(&mut header[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Closed)
            };
        }
        filled += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    match stream.read_exact(&mut body).await {
        Ok(_) => Ok(Some(body)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// Write one frame, with `fd` attached to its first bytes when given.
pub async fn write_frame(
    stream: &mut UnixStream,
    body: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let bytes = frame(body);
    let mut rest: &[u8] = &bytes;
    if let Some(fd) = fd {
        let raw = stream.as_raw_fd();
        let sent = loop {
            stream.writable().await?;
            match stream.try_io(Interest::WRITABLE, || {
                send_with_fd(raw, &bytes, fd.as_raw_fd())
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        rest = &bytes[sent..];
    }
    stream.write_all(rest).await
}

/// Whether the peer has hung up (without consuming any data). Resolves only on hang-up or error; if the
/// peer sends bytes instead, it never resolves (those bytes stay for the next read).
pub async fn peer_closed(stream: &UnixStream) {
    let raw = stream.as_raw_fd();
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let mut probe = [0u8; 1];
        let peeked = stream.try_io(Interest::READABLE, || {
            // SAFETY: `probe` is a valid 1-byte buffer and `raw` a live socket owned by `stream`.
            let n = unsafe {
                libc::recv(
                    raw,
                    probe.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match peeked {
            Ok(0) => return,
            Ok(_) => std::future::pending::<()>().await,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

/// `sendmsg` of `data` with one descriptor in an SCM_RIGHTS control message.
fn send_with_fd(socket: RawFd, data: &[u8], fd: RawFd) -> io::Result<usize> {
    // SAFETY: the control buffer is sized with CMSG_SPACE for one int and aligned for cmsghdr; every
    // pointer handed to sendmsg outlives the call.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        let n = libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// `recvmsg` into `buf`, taking at most one descriptor (extra ones are closed).
fn recv_with_fd(socket: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    // SAFETY: as in `send_with_fd`; descriptors found in the control data are new ones owned by us.
    unsafe {
        let space = libc::CMSG_SPACE(4 * std::mem::size_of::<RawFd>() as u32) as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = loop {
            let n = libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut received = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                    if received.is_none() {
                        received = Some(fd);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n, received))
    }
}

/// Blocking: write one frame (clients send no descriptors).
pub fn send_frame(stream: &mut StdUnixStream, body: &[u8]) -> io::Result<()> {
    stream.write_all(&frame(body))
}

/// Blocking: read one frame and the descriptor that arrived with its first bytes.
pub fn recv_frame(stream: &mut StdUnixStream) -> Result<(Vec<u8>, Option<OwnedFd>), FrameError> {
    let mut chunk = vec![0u8; RECV_CHUNK];
    let (n, fd) = recv_with_fd(stream.as_raw_fd(), &mut chunk)?;
    if n == 0 {
        return Err(FrameError::Closed);
    }
    let mut data = chunk[..n].to_vec();
    while data.len() < HEADER_SIZE {
        let mut more = [0u8; HEADER_SIZE];
        let m = stream.read(&mut more[..HEADER_SIZE - data.len()])?;
        if m == 0 {
            return Err(FrameError::Closed);
        }
        data.extend_from_slice(&more[..m]);
    }
    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let total = HEADER_SIZE + len;
    if data.len() > total {
        return Err(FrameError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            "server sent more than one frame for one request",
        )));
    }
    let start = data.len();
    data.resize(total, 0);
    let mut filled = start;
    while filled < total {
        let m = stream.read(&mut data[filled..])?;
        if m == 0 {
            return Err(FrameError::Closed);
        }
        filled += m;
    }
    data.drain(..HEADER_SIZE);
    Ok((data, fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_travels_with_its_frame() {
        let (mut a, mut b) = StdUnixStream::pair().unwrap();
        let file = tempfile_fd();
        let bytes = frame(b"hello");
        let sent = send_with_fd(a.as_raw_fd(), &bytes, file.as_raw_fd()).unwrap();
        a.write_all(&bytes[sent..]).unwrap();
        let (body, fd) = recv_frame(&mut b).unwrap();
        assert_eq!(body, b"hello");
        assert!(fd.is_some());
        send_frame(&mut a, b"second").unwrap();
        let (body, fd) = recv_frame(&mut b).unwrap();
        assert_eq!(body, b"second");
        assert!(fd.is_none());
    }

    fn tempfile_fd() -> OwnedFd {
        let file = std::fs::File::open("/dev/null").unwrap();
        OwnedFd::from(file)
    }
}
