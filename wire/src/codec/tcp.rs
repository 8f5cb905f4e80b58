//! The TCP request plane's frames (runtime spec §1.2–1.3): the request frame
//! `path_len u16 | path | headers_len u16 | headers JSON | payload_len u32 | payload` (v2, all big-endian)
//! and the one-per-request reply `len u32 | data` (empty data = accepted).
//!
//! Both decoders consume nothing on partial input and check the size limit as soon as the total length
//! is known, before waiting for (or buffering) the rest.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Default `distributed.max_message_size` (`DYN_TCP_MAX_MESSAGE_SIZE`): 32 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 32 * 1024 * 1024;

/// The prefix of the ACK that marks a rejection.
pub const ACK_UNAVAILABLE_PREFIX: &str = "Server unavailable:";

/// One request on the TCP request plane.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpRequestMessage {
    /// The endpoint it is for (the routing key of the shared per-process server).
    pub endpoint_path: String,
    /// Trace and propagation headers.
    pub headers: BTreeMap<String, String>,
    /// A two-part frame with the control message and the request.
    pub payload: Bytes,
}

/// Why a request-plane frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum TcpCodecError {
    /// The transport failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Encoding: the endpoint path does not fit its u16 length.
    #[error("Endpoint path too long: {0} bytes")]
    PathTooLong(usize),
    /// Encoding: the headers JSON does not fit its u16 length.
    #[error("Headers too large: {0} bytes")]
    HeadersTooLarge(usize),
    /// Encoding: the payload does not fit its u32 length.
    #[error("Payload too large")]
    PayloadTooLarge,
    /// The whole frame is over the limit.
    #[error("Request too large: {size} bytes (max: {max} bytes)")]
    TooLarge {
        /// Frame size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The endpoint path is not UTF-8.
    #[error("Invalid UTF-8 in endpoint path")]
    InvalidPath,
    /// The headers are not a JSON object of strings.
    #[error("Invalid JSON in headers: {0}")]
    InvalidHeaders(String),
}

impl TcpCodecError {
    /// The `io::ErrorKind` upstream reports this as.
    pub fn io_kind(&self) -> std::io::ErrorKind {
        match self {
            TcpCodecError::Io(e) => e.kind(),
            TcpCodecError::PathTooLong(_)
            | TcpCodecError::HeadersTooLarge(_)
            | TcpCodecError::PayloadTooLarge => std::io::ErrorKind::InvalidInput,
            _ => std::io::ErrorKind::InvalidData,
        }
    }
}

/// Encoder and decoder of [`TcpRequestMessage`]s.
#[derive(Clone, Debug)]
pub struct TcpRequestCodec {
    max_message_size: Option<usize>,
}

impl TcpRequestCodec {
    /// A codec limiting whole frames to `max_message_size` bytes (`None` = unlimited).
    pub fn new(max_message_size: Option<usize>) -> Self {
        TcpRequestCodec { max_message_size }
    }

    fn check(&self, size: usize) -> Result<(), TcpCodecError> {
        match self.max_message_size {
            Some(max) if size > max => Err(TcpCodecError::TooLarge { size, max }),
            _ => Ok(()),
        }
    }
}

impl Default for TcpRequestCodec {
    fn default() -> Self {
        Self::new(Some(DEFAULT_MAX_MESSAGE_SIZE))
    }
}

impl Decoder for TcpRequestCodec {
    type Item = TcpRequestMessage;
    type Error = TcpCodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<TcpRequestMessage>, TcpCodecError> {
        if src.len() < 2 {
            return Ok(None);
        }
        let path_len = u16::from_be_bytes([src[0], src[1]]) as usize;
        let headers_at = 2 + path_len;
        if src.len() < headers_at + 2 {
            return Ok(None);
        }
        let headers_len = u16::from_be_bytes([src[headers_at], src[headers_at + 1]]) as usize;
        let payload_at = headers_at + 2 + headers_len;
        if src.len() < payload_at + 4 {
            return Ok(None);
        }
        let payload_len = u32::from_be_bytes([
            src[payload_at],
            src[payload_at + 1],
            src[payload_at + 2],
            src[payload_at + 3],
        ]) as usize;
        let total = payload_at + 4 + payload_len;
        self.check(total)?;
        if src.len() < total {
            src.reserve((total - src.len()).min(1 << 20));
            return Ok(None);
        }
        let endpoint_path = std::str::from_utf8(&src[2..headers_at])
            .map_err(|_| TcpCodecError::InvalidPath)?
            .to_string();
        let headers = match &src[headers_at + 2..payload_at] {
            // No headers (the common case): no JSON parse.
            b"" | EMPTY_HEADERS => BTreeMap::new(),
            json => serde_json::from_slice(json)
                .map_err(|e| TcpCodecError::InvalidHeaders(e.to_string()))?,
        };
        src.advance(payload_at + 4);
        let payload = src.split_to(payload_len).freeze();
        Ok(Some(TcpRequestMessage {
            endpoint_path,
            headers,
            payload,
        }))
    }
}

/// The headers JSON of a request without headers.
const EMPTY_HEADERS: &[u8] = b"{}";

impl Encoder<TcpRequestMessage> for TcpRequestCodec {
    type Error = TcpCodecError;

    fn encode(&mut self, item: TcpRequestMessage, dst: &mut BytesMut) -> Result<(), TcpCodecError> {
        self.encode(&item, dst)
    }
}

/// Encoding by reference: a sender that keeps the frame (to retry it on a fresh connection) need
/// not clone it.
impl Encoder<&TcpRequestMessage> for TcpRequestCodec {
    type Error = TcpCodecError;

    fn encode(
        &mut self,
        item: &TcpRequestMessage,
        dst: &mut BytesMut,
    ) -> Result<(), TcpCodecError> {
        let path = item.endpoint_path.as_bytes();
        if path.len() > u16::MAX as usize {
            return Err(TcpCodecError::PathTooLong(path.len()));
        }
        let headers = if item.headers.is_empty() {
            std::borrow::Cow::Borrowed(EMPTY_HEADERS)
        } else {
            std::borrow::Cow::Owned(
                serde_json::to_vec(&item.headers)
                    .map_err(|e| TcpCodecError::InvalidHeaders(e.to_string()))?,
            )
        };
        if headers.len() > u16::MAX as usize {
            return Err(TcpCodecError::HeadersTooLarge(headers.len()));
        }
        if item.payload.len() > u32::MAX as usize {
            return Err(TcpCodecError::PayloadTooLarge);
        }
        let total = 2 + path.len() + 2 + headers.len() + 4 + item.payload.len();
        self.check(total)?;
        dst.reserve(total);
        dst.put_u16(path.len() as u16);
        dst.extend_from_slice(path);
        dst.put_u16(headers.len() as u16);
        dst.extend_from_slice(&headers);
        dst.put_u32(item.payload.len() as u32);
        dst.extend_from_slice(&item.payload);
        Ok(())
    }
}

/// The reply to one request frame: empty = accepted (the response follows on the response stream),
/// otherwise an error or rejection text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpResponseMessage {
    /// Empty for an ACK.
    pub data: Bytes,
}

impl TcpResponseMessage {
    /// The ACK.
    pub fn ack() -> Self {
        Self::default()
    }

    /// A rejection: `Server unavailable: <reason>`.
    pub fn unavailable(reason: &str) -> Self {
        TcpResponseMessage {
            data: Bytes::from(format!("{ACK_UNAVAILABLE_PREFIX} {reason}")),
        }
    }

    /// Whether the request was accepted (anything but a rejection counts, as upstream).
    pub fn is_accepted(&self) -> bool {
        !self.data.starts_with(ACK_UNAVAILABLE_PREFIX.as_bytes())
    }
}

/// Encoder and decoder of [`TcpResponseMessage`]s.
#[derive(Clone, Debug)]
pub struct TcpResponseCodec {
    max_message_size: Option<usize>,
}

impl TcpResponseCodec {
    /// A codec limiting whole frames (`4 + len`) to `max_message_size` bytes.
    pub fn new(max_message_size: Option<usize>) -> Self {
        TcpResponseCodec { max_message_size }
    }

    fn check(&self, size: usize) -> Result<(), TcpCodecError> {
        match self.max_message_size {
            Some(max) if size > max => Err(TcpCodecError::TooLarge { size, max }),
            _ => Ok(()),
        }
    }
}

impl Default for TcpResponseCodec {
    fn default() -> Self {
        Self::new(Some(DEFAULT_MAX_MESSAGE_SIZE))
    }
}

impl Decoder for TcpResponseCodec {
    type Item = TcpResponseMessage;
    type Error = TcpCodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<TcpResponseMessage>, TcpCodecError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        self.check(4 + len)?;
        if src.len() < 4 + len {
            src.reserve((4 + len - src.len()).min(1 << 20));
            return Ok(None);
        }
        src.advance(4);
        Ok(Some(TcpResponseMessage {
            data: src.split_to(len).freeze(),
        }))
    }
}

impl Encoder<TcpResponseMessage> for TcpResponseCodec {
    type Error = TcpCodecError;

    fn encode(
        &mut self,
        item: TcpResponseMessage,
        dst: &mut BytesMut,
    ) -> Result<(), TcpCodecError> {
        if item.data.len() > u32::MAX as usize {
            return Err(TcpCodecError::PayloadTooLarge);
        }
        self.check(4 + item.data.len())?;
        dst.reserve(4 + item.data.len());
        dst.put_u32(item.data.len() as u32);
        dst.extend_from_slice(&item.data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(path: &str, headers: &[(&str, &str)], payload: &[u8]) -> TcpRequestMessage {
        TcpRequestMessage {
            endpoint_path: path.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn the_request_layout_is_v2() {
        let mut codec = TcpRequestCodec::default();
        let mut wire = BytesMut::new();
        codec
            .encode(request("gen", &[("traceparent", "x")], b"PAY"), &mut wire)
            .unwrap();
        let headers = br#"{"traceparent":"x"}"#;
        let mut want = vec![0, 3];
        want.extend_from_slice(b"gen");
        want.extend_from_slice(&(headers.len() as u16).to_be_bytes());
        want.extend_from_slice(headers);
        want.extend_from_slice(&3u32.to_be_bytes());
        want.extend_from_slice(b"PAY");
        assert_eq!(&wire[..], &want[..]);
        // Empty headers travel as `{}`.
        let mut wire = BytesMut::new();
        codec.encode(request("p", &[], b""), &mut wire).unwrap();
        assert_eq!(&wire[3..7], &[0, 2, b'{', b'}']);
    }

    #[test]
    fn partial_requests_consume_nothing_and_limits_apply_early() {
        let mut codec = TcpRequestCodec::new(Some(64));
        let mut wire = BytesMut::new();
        codec
            .encode(request("endpoint", &[], b"0123456789"), &mut wire)
            .unwrap();
        for cut in 0..wire.len() {
            let mut partial = BytesMut::from(&wire[..cut]);
            assert!(codec.decode(&mut partial).unwrap().is_none());
            assert_eq!(partial.len(), cut);
        }
        // A frame announcing 1 GB fails as soon as its length is readable.
        let mut big = BytesMut::new();
        big.put_u16(1);
        big.put_slice(b"p");
        big.put_u16(0);
        big.put_u32(1 << 30);
        let err = codec.decode(&mut big).unwrap_err();
        assert!(err.to_string().starts_with("Request too large: "), "{err}");
        assert_eq!(err.io_kind(), std::io::ErrorKind::InvalidData);
        let err = codec
            .encode(request("p", &[], &[0; 100]), &mut BytesMut::new())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Request too large: 111 bytes (max: 64 bytes)"
        );
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        let mut codec = TcpRequestCodec::default();
        let mut bad_path = BytesMut::new();
        bad_path.put_u16(2);
        bad_path.put_slice(&[0xff, 0xfe]);
        bad_path.put_u16(0);
        bad_path.put_u32(0);
        assert!(matches!(
            codec.decode(&mut bad_path),
            Err(TcpCodecError::InvalidPath)
        ));
        let mut bad_headers = BytesMut::new();
        bad_headers.put_u16(1);
        bad_headers.put_slice(b"p");
        bad_headers.put_u16(3);
        bad_headers.put_slice(b"[1]");
        bad_headers.put_u32(0);
        assert!(matches!(
            codec.decode(&mut bad_headers),
            Err(TcpCodecError::InvalidHeaders(_))
        ));
        let long = "x".repeat(70_000);
        assert_eq!(
            codec
                .encode(request(&long, &[], b""), &mut BytesMut::new())
                .unwrap_err()
                .to_string(),
            "Endpoint path too long: 70000 bytes"
        );
    }

    #[test]
    fn acks_and_rejections() {
        let mut codec = TcpResponseCodec::default();
        let mut wire = BytesMut::new();
        codec.encode(TcpResponseMessage::ack(), &mut wire).unwrap();
        codec
            .encode(TcpResponseMessage::unavailable("draining"), &mut wire)
            .unwrap();
        assert_eq!(&wire[..4], &[0, 0, 0, 0]);
        let first = codec.decode(&mut wire).unwrap().unwrap();
        assert!(first.is_accepted() && first.data.is_empty());
        let second = codec.decode(&mut wire).unwrap().unwrap();
        assert!(!second.is_accepted());
        assert_eq!(&second.data[..], b"Server unavailable: draining");
        let mut oversized = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            TcpResponseCodec::new(Some(1024)).decode(&mut oversized),
            Err(TcpCodecError::TooLarge { .. })
        ));
    }

    proptest! {
        #[test]
        fn requests_round_trip_split_anywhere(
            items in proptest::collection::vec(
                ("[a-z/._-]{0,40}", proptest::collection::btree_map("[a-z-]{1,8}", "[ -~]{0,16}", 0..4), proptest::collection::vec(any::<u8>(), 0..500)),
                1..5,
            ),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut codec = TcpRequestCodec::default();
            let sent: Vec<TcpRequestMessage> = items
                .into_iter()
                .map(|(path, headers, payload)| TcpRequestMessage { endpoint_path: path, headers, payload: payload.into() })
                .collect();
            let mut wire = BytesMut::new();
            for m in &sent {
                codec.encode(m.clone(), &mut wire).unwrap();
            }
            let wire = wire.freeze();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.push(wire.len());
            points.sort_unstable();
            let (mut buffer, mut received, mut last) = (BytesMut::new(), Vec::new(), 0);
            for point in points {
                buffer.extend_from_slice(&wire[last..point]);
                last = point;
                while let Some(m) = codec.decode(&mut buffer).unwrap() {
                    received.push(m);
                }
            }
            prop_assert_eq!(received, sent);
        }

        #[test]
        fn responses_round_trip_split_anywhere(
            items in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut codec = TcpResponseCodec::default();
            let mut wire = BytesMut::new();
            for data in &items {
                codec.encode(TcpResponseMessage { data: data.clone().into() }, &mut wire).unwrap();
            }
            let at = cut.index(wire.len() + 1);
            let mut buffer = BytesMut::from(&wire[..at]);
            let mut received = Vec::new();
            while let Some(m) = codec.decode(&mut buffer).unwrap() {
                received.push(m.data.to_vec());
            }
            buffer.extend_from_slice(&wire[at..]);
            while let Some(m) = codec.decode(&mut buffer).unwrap() {
                received.push(m.data.to_vec());
            }
            prop_assert_eq!(received, items);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut requests = TcpRequestCodec::new(Some(4096));
            let mut buffer = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = requests.decode(&mut buffer) {}
            let mut responses = TcpResponseCodec::new(Some(4096));
            let mut buffer = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = responses.decode(&mut buffer) {}
        }
    }
}
