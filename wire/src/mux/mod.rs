//! The multiplexed request plane (`mux/1`) between dynamix processes. Dynamo's TCP request plane
//! costs two TCP connections per request: a pooled one for the request frame and its ACK, and a new
//! call-home connection for the response stream. Here a frontend keeps a few long-lived connections
//! to each worker and runs every request on them as a numbered stream:
//!
//! - **Preface.** The client opens with the 8 bytes [`PREFACE`]; the server answers with the same 8
//!   bytes. A Dynamo request frame can never start that way in practice (its first two bytes would be a
//!   17,497-byte endpoint path), so one listener serves both planes. A client only speaks `mux/1` to
//!   an instance whose record advertises it ([`crate::record::Instance::mux`]).
//! - **Frames.** `len u32 | kind u8 | stream u32 | body`, big-endian, `len` counting everything after
//!   itself. Stream 0 is the connection's own ([`Kind::Ping`]).
//! - **A request** ([`Kind::Request`], client → server) carries its id, codec, endpoint path, headers,
//!   metadata and body ([`MuxRequest`]). The server answers on the same stream id with
//!   [`Kind::Data`] items (the bytes of a call-home data frame: `{"data": …, "complete_final": false}`
//!   in the request's codec), then [`Kind::End`] (completed), or [`Kind::Reset`] (ended without
//!   completing: the frontend migrates it), or at once [`Kind::Refuse`] (not taken: unknown path,
//!   draining, bad request; the text says why).
//! - **Flow control.** Each request names a window in items. The server sends no more items than the
//!   credit it holds; the client returns [`Kind::Credit`] as its consumer takes items. A slow consumer
//!   so stalls only its own stream, and the connection's reader never waits on a consumer.
//! - **Cancellation** is a [`Kind::Cancel`] frame (stop or kill) for one stream.
//! - **Heartbeats.** Both sides send [`Kind::Ping`] every `heartbeat`; a side that hears nothing for
//!   `dead_after` takes the peer for dead and ends every stream of the connection (the frontend then
//!   migrates them), so a hung worker is found even when its socket stays open.
//!
//! Layout: this file is the frame format; [`client`] is the frontend's side (connections per peer,
//! streams); the server's side is in [`crate::endpoint`], beside Dynamo's.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::PayloadCodec;

pub mod client;

/// The first 8 bytes each side sends on a `mux/1` connection.
pub const PREFACE: &[u8; 8] = b"DYNMUX1\n";

/// The version an instance record advertises (`"mux": 1`).
pub const VERSION: u32 = 1;

/// Bytes of a frame's head after its length: kind and stream id.
const HEAD: usize = 5;

/// What a frame is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client → server: a new request on a new stream id ([`MuxRequest`]).
    Request = 1,
    /// Server → client: one response item.
    Data = 2,
    /// Server → client: the stream completed.
    End = 3,
    /// Server → client: the stream ended without completing (body: why).
    Reset = 4,
    /// Server → client: the request was not taken (body: why).
    Refuse = 5,
    /// Client → server: stop (body `0`) or kill (body `1`) a stream.
    Cancel = 6,
    /// Client → server: the server may send `u32` more items on the stream.
    Credit = 7,
    /// Either way, stream 0: I am alive.
    Ping = 8,
    /// Never sent: what the decoder yields for a frame over the limit, which it skips (body: the
    /// frame's size, `u64`), so that one oversized request fails alone.
    TooLarge = 255,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Request,
            2 => Kind::Data,
            3 => Kind::End,
            4 => Kind::Reset,
            5 => Kind::Refuse,
            6 => Kind::Cancel,
            7 => Kind::Credit,
            8 => Kind::Ping,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// Its stream (0: the connection).
    pub stream: u32,
    /// Its body.
    pub body: Bytes,
}

impl Frame {
    /// A frame with `body`.
    pub fn new(kind: Kind, stream: u32, body: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            stream,
            body: body.into(),
        }
    }

    /// A frame with no body.
    pub fn empty(kind: Kind, stream: u32) -> Frame {
        Frame::new(kind, stream, Bytes::new())
    }

    /// A [`Kind::Credit`] frame granting `items`.
    pub fn credit(stream: u32, items: u32) -> Frame {
        Frame::new(
            Kind::Credit,
            stream,
            Bytes::copy_from_slice(&items.to_be_bytes()),
        )
    }

    /// The body as text (Reset and Refuse reasons), lossy.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The size a [`Kind::TooLarge`] frame reports.
    pub fn oversize(&self) -> Option<u64> {
        <[u8; 8]>::try_from(&self.body[..])
            .ok()
            .map(u64::from_be_bytes)
    }

    /// The body as a `u32` (Credit), if it is one.
    pub fn count(&self) -> Option<u32> {
        <[u8; 4]>::try_from(&self.body[..])
            .ok()
            .map(u32::from_be_bytes)
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The transport failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A length shorter than a frame's head.
    #[error("frame length {0} is shorter than the 5-byte head")]
    TooShort(usize),
    /// A kind byte this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
}

/// Reads and writes [`Frame`]s. A frame over `max_frame` bytes is not buffered: the decoder yields
/// a [`Kind::TooLarge`] frame for its stream and skips its bytes as they arrive.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    max_frame: usize,
    /// Bytes of an oversized frame still to skip.
    skip: usize,
}

impl FrameCodec {
    /// A codec refusing frames over `max_frame` bytes (the request plane's message limit, plus the
    /// few bytes of a request's own fields).
    pub fn new(max_frame: usize) -> FrameCodec {
        FrameCodec {
            max_frame: max_frame.saturating_add(REQUEST_OVERHEAD),
            skip: 0,
        }
    }
}

/// Room for a request's own fields above the message limit.
const REQUEST_OVERHEAD: usize = 64 * 1024;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = MuxError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, MuxError> {
        if self.skip > 0 {
            let n = self.skip.min(src.len());
            src.advance(n);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len < HEAD {
            return Err(MuxError::TooShort(len));
        }
        if len > self.max_frame {
            if src.len() < 4 + HEAD {
                return Ok(None);
            }
            let stream = u32::from_be_bytes([src[5], src[6], src[7], src[8]]);
            src.advance(4 + HEAD);
            self.skip = len - HEAD;
            let size = Bytes::copy_from_slice(&(len as u64).to_be_bytes());
            return Ok(Some(Frame::new(Kind::TooLarge, stream, size)));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        let kind = Kind::from_byte(src[4]).ok_or(MuxError::UnknownKind(src[4]))?;
        let stream = u32::from_be_bytes([src[5], src[6], src[7], src[8]]);
        src.advance(4 + HEAD);
        let body = src.split_to(len - HEAD).freeze();
        Ok(Some(Frame { kind, stream, body }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = MuxError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), MuxError> {
        encode(&frame, dst);
        Ok(())
    }
}

/// Append `frame` to `dst`.
pub fn encode(frame: &Frame, dst: &mut BytesMut) {
    dst.reserve(4 + HEAD + frame.body.len());
    dst.put_u32((HEAD + frame.body.len()) as u32);
    dst.put_u8(frame.kind as u8);
    dst.put_u32(frame.stream);
    dst.extend_from_slice(&frame.body);
}

/// A request as it travels in a [`Kind::Request`] body:
/// `window u32 | codec u8 | id_len u16 | id | path_len u16 | path | headers_len u32 | headers JSON |
/// metadata_len u32 | metadata JSON | body` (no headers and no metadata: length 0).
#[derive(Clone, Debug, PartialEq)]
pub struct MuxRequest {
    /// Items the server may send before the first credit.
    pub window: u32,
    /// The codec of the body and of the items.
    pub codec: PayloadCodec,
    /// The request (context) id.
    pub id: String,
    /// The endpoint path (`{instance_id:x}/{ns}/{comp}/{ep}`).
    pub path: String,
    /// Frame headers.
    pub headers: BTreeMap<String, String>,
    /// Free-form metadata (Dynamo's control message `metadata`).
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// The body, in `codec`.
    pub body: Bytes,
}

/// Why a request body is not a [`MuxRequest`].
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The body ends inside a field.
    #[error("request frame truncated in its {0} field")]
    Truncated(&'static str),
    /// A codec byte this version does not know.
    #[error("unknown payload codec {0} (0 json, 1 msgpack)")]
    Codec(u8),
    /// The id or path is not UTF-8.
    #[error("the request's {0} is not UTF-8")]
    NotUtf8(&'static str),
    /// Headers or metadata that are not a JSON object (of strings, for headers).
    #[error("the request's {what} are not a JSON object: {source}")]
    Json {
        /// `headers` or `metadata`.
        what: &'static str,
        /// What the parser said.
        source: serde_json::Error,
    },
    /// An id or path over 64 KiB.
    #[error("the request's {0} is longer than 65,535 bytes")]
    TooLong(&'static str),
}

impl MuxRequest {
    /// The frame body.
    pub fn encode(&self) -> Result<Bytes, RequestError> {
        let json = |what, value: Option<Result<Vec<u8>, serde_json::Error>>| match value {
            None => Ok(Vec::new()),
            Some(result) => result.map_err(|source| RequestError::Json { what, source }),
        };
        let headers = json(
            "headers",
            (!self.headers.is_empty()).then(|| serde_json::to_vec(&self.headers)),
        )?;
        let metadata = json("metadata", self.metadata.as_ref().map(serde_json::to_vec))?;
        let short =
            |what, text: &str| u16::try_from(text.len()).map_err(|_| RequestError::TooLong(what));
        let (id_len, path_len) = (short("id", &self.id)?, short("path", &self.path)?);
        let mut out = BytesMut::with_capacity(
            4 + 1
                + 2
                + self.id.len()
                + 2
                + self.path.len()
                + 8
                + headers.len()
                + metadata.len()
                + self.body.len(),
        );
        out.put_u32(self.window);
        out.put_u8(match self.codec {
            PayloadCodec::Json => 0,
            PayloadCodec::Msgpack => 1,
        });
        out.put_u16(id_len);
        out.extend_from_slice(self.id.as_bytes());
        out.put_u16(path_len);
        out.extend_from_slice(self.path.as_bytes());
        out.put_u32(headers.len() as u32);
        out.extend_from_slice(&headers);
        out.put_u32(metadata.len() as u32);
        out.extend_from_slice(&metadata);
        out.extend_from_slice(&self.body);
        Ok(out.freeze())
    }

    /// Reads a frame body.
    pub fn decode(mut body: Bytes) -> Result<MuxRequest, RequestError> {
        fn take(body: &mut Bytes, n: usize, what: &'static str) -> Result<Bytes, RequestError> {
            if body.len() < n {
                return Err(RequestError::Truncated(what));
            }
            Ok(body.split_to(n))
        }
        fn text(bytes: Bytes, what: &'static str) -> Result<String, RequestError> {
            String::from_utf8(bytes.to_vec()).map_err(|_| RequestError::NotUtf8(what))
        }
        let window = take(&mut body, 4, "window")?.get_u32();
        let codec = match take(&mut body, 1, "codec")?[0] {
            0 => PayloadCodec::Json,
            1 => PayloadCodec::Msgpack,
            other => return Err(RequestError::Codec(other)),
        };
        let id_len = take(&mut body, 2, "id")?.get_u16() as usize;
        let id = text(take(&mut body, id_len, "id")?, "id")?;
        let path_len = take(&mut body, 2, "path")?.get_u16() as usize;
        let path = text(take(&mut body, path_len, "path")?, "path")?;
        let headers_len = take(&mut body, 4, "headers")?.get_u32() as usize;
        let headers = match take(&mut body, headers_len, "headers")? {
            empty if empty.is_empty() => BTreeMap::new(),
            json => serde_json::from_slice(&json).map_err(|source| RequestError::Json {
                what: "headers",
                source,
            })?,
        };
        let metadata_len = take(&mut body, 4, "metadata")?.get_u32() as usize;
        let metadata = match take(&mut body, metadata_len, "metadata")? {
            empty if empty.is_empty() => None,
            json => Some(
                serde_json::from_slice(&json).map_err(|source| RequestError::Json {
                    what: "metadata",
                    source,
                })?,
            ),
        };
        Ok(MuxRequest {
            window,
            codec,
            id,
            path,
            headers,
            metadata,
            body,
        })
    }
}

/// How a `mux/1` connection behaves.
#[derive(Clone, Debug)]
pub struct MuxSettings {
    /// Connections a frontend keeps to each worker; streams are spread over them.
    pub connections: usize,
    /// Items a stream may have in flight before its consumer takes them.
    pub window: u32,
    /// How often each side says it is alive.
    pub heartbeat: Duration,
    /// Silence after which the peer is taken for dead and the connection's streams end.
    pub dead_after: Duration,
}

impl Default for MuxSettings {
    fn default() -> Self {
        MuxSettings {
            connections: 2,
            window: 64,
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests;
