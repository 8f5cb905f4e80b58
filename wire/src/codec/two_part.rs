//! The two-part frame (runtime spec §1.1): a 24-byte prefix of three big-endian u64 — header length,
//! body length, XXH3-64 checksum of header‖body — then the header and the body. It frames the request
//! payload on NATS/TCP and every frame of the TCP response stream.
//!
//! The decoder consumes nothing until a whole frame is buffered, checks the size limit as soon as the
//! prefix is readable (an oversized frame fails before its body arrives), and splits header and body off
//! the buffer without copying. Checksums are written and verified in debug builds (verification only
//! when the received value is non-zero, as upstream), and either can be switched on in release.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Length of the fixed prefix.
pub const PREFIX_LEN: usize = 24;

/// What a two-part frame carries: a header and a body, kept as one buffer (header‖body) and a split
/// point, so a decoded frame is one shared handle on the receive buffer, not two.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TwoPartMessage {
    /// Header bytes followed by body bytes.
    bytes: Bytes,
    /// Where the header ends.
    header_len: usize,
}

/// Which parts a message has (upstream's classification).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageKind {
    /// Neither part.
    Empty,
    /// Only a header.
    HeaderOnly,
    /// Only a body.
    DataOnly,
    /// Both.
    HeaderAndData,
}

impl TwoPartMessage {
    /// A message with both parts (copied into one buffer).
    pub fn new(header: impl AsRef<[u8]>, data: impl AsRef<[u8]>) -> Self {
        let (header, data) = (header.as_ref(), data.as_ref());
        let mut bytes = BytesMut::with_capacity(header.len() + data.len());
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(data);
        TwoPartMessage {
            bytes: bytes.freeze(),
            header_len: header.len(),
        }
    }

    /// A header-only message (no copy).
    pub fn header_only(header: impl Into<Bytes>) -> Self {
        let bytes = header.into();
        TwoPartMessage {
            header_len: bytes.len(),
            bytes,
        }
    }

    /// A data-only message (no copy).
    pub fn data_only(data: impl Into<Bytes>) -> Self {
        TwoPartMessage {
            bytes: data.into(),
            header_len: 0,
        }
    }

    /// The header bytes (a JSON control message, handshake or prologue).
    pub fn header(&self) -> &[u8] {
        &self.bytes[..self.header_len]
    }

    /// The body bytes (the request or a response item).
    pub fn data(&self) -> &[u8] {
        &self.bytes[self.header_len..]
    }

    /// Which parts it has.
    pub fn kind(&self) -> MessageKind {
        match (self.header_len == 0, self.header_len == self.bytes.len()) {
            (true, true) => MessageKind::Empty,
            (false, true) => MessageKind::HeaderOnly,
            (true, false) => MessageKind::DataOnly,
            (false, false) => MessageKind::HeaderAndData,
        }
    }
}

/// Why a two-part frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum TwoPartCodecError {
    /// The transport failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The frame (prefix + header + body) is larger than the limit.
    #[error("Message size {0} exceeds the maximum allowed size of {1} bytes")]
    MessageTooLarge(usize, usize),
    /// The bytes do not form a frame.
    #[error("Invalid message: {0}")]
    InvalidMessage(String),
    /// The checksum does not match header‖body.
    #[error(
        "Checksum mismatch: frame says {expected:#018x}, header and body hash to {actual:#018x}"
    )]
    ChecksumMismatch {
        /// The checksum in the prefix.
        expected: u64,
        /// The checksum of the received bytes.
        actual: u64,
    },
}

/// Encoder and decoder of [`TwoPartMessage`]s.
#[derive(Clone, Debug)]
pub struct TwoPartCodec {
    /// Largest whole frame accepted (prefix included); `None` = unlimited (the response stream).
    max_message_size: Option<usize>,
    /// Write XXH3-64 into the prefix (otherwise 0).
    write_checksum: bool,
    /// Check a non-zero received checksum.
    verify_checksum: bool,
}

impl Default for TwoPartCodec {
    /// Unlimited size; checksums written and verified in debug builds only (upstream's behaviour).
    fn default() -> Self {
        TwoPartCodec {
            max_message_size: None,
            write_checksum: cfg!(debug_assertions),
            verify_checksum: cfg!(debug_assertions),
        }
    }
}

impl TwoPartCodec {
    /// A codec limiting whole frames to `max_message_size` bytes.
    pub fn new(max_message_size: Option<usize>) -> Self {
        TwoPartCodec {
            max_message_size,
            ..Self::default()
        }
    }

    /// Writes and verifies checksums (or neither), whatever the build profile.
    pub fn with_checksums(mut self, enabled: bool) -> Self {
        self.write_checksum = enabled;
        self.verify_checksum = enabled;
        self
    }

    /// The size limit.
    pub fn max_message_size(&self) -> Option<usize> {
        self.max_message_size
    }

    #[inline]
    fn check_size(&self, header_len: u64, body_len: u64) -> Result<usize, TwoPartCodecError> {
        let limit = self.max_message_size.unwrap_or(usize::MAX);
        let total = usize::try_from(header_len)
            .ok()
            .zip(usize::try_from(body_len).ok())
            .and_then(|(h, b)| h.checked_add(b))
            .and_then(|n| n.checked_add(PREFIX_LEN))
            .ok_or(TwoPartCodecError::MessageTooLarge(usize::MAX, limit))?;
        if total > limit {
            return Err(TwoPartCodecError::MessageTooLarge(total, limit));
        }
        Ok(total)
    }

    /// Decodes exactly one whole frame from `bytes` (trailing bytes are an error).
    pub fn decode_message(&mut self, bytes: Bytes) -> Result<TwoPartMessage, TwoPartCodecError> {
        let mut buffer = BytesMut::from(&bytes[..]);
        let message = self
            .decode(&mut buffer)?
            .ok_or_else(|| TwoPartCodecError::InvalidMessage("No message decoded".into()))?;
        if !buffer.is_empty() {
            return Err(TwoPartCodecError::InvalidMessage(format!(
                "{} bytes after the frame",
                buffer.len()
            )));
        }
        Ok(message)
    }

    /// Encodes one message into a new buffer.
    pub fn encode_message(&mut self, message: TwoPartMessage) -> Result<Bytes, TwoPartCodecError> {
        let mut buffer = BytesMut::new();
        self.encode(message, &mut buffer)?;
        Ok(buffer.freeze())
    }
}

impl Decoder for TwoPartCodec {
    type Item = TwoPartMessage;
    type Error = TwoPartCodecError;

    /// Inlined into the caller (the hot path is a few instructions and two calls into `bytes`): a
    /// non-inlined decode returns its 48-byte `Result` through memory, and reading it back stalled
    /// on store forwarding, which cost more than the split itself for a 1 KiB frame.
    #[inline]
    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<TwoPartMessage>, TwoPartCodecError> {
        if src.len() < PREFIX_LEN {
            return Ok(None);
        }
        let mut prefix = &src[..PREFIX_LEN];
        let header_len = prefix.get_u64();
        let body_len = prefix.get_u64();
        let expected = prefix.get_u64();
        let total = self.check_size(header_len, body_len)?;
        if src.len() < total {
            reserve_rest(src, total);
            return Ok(None);
        }
        // One split off the buffer for the whole frame, the prefix skipped in the handle: a frame
        // costs one shared handle (one reference count up, one down).
        let mut bytes = src.split_to(total).freeze();
        bytes.advance(PREFIX_LEN);
        if self.verify_checksum && expected != 0 {
            verify(&bytes, expected)?;
        }
        Ok(Some(TwoPartMessage {
            bytes,
            header_len: header_len as usize,
        }))
    }
}

/// Room for the rest of a frame whose prefix has arrived; capped, because the length is the peer's
/// word and an unlimited codec must not allocate whatever it claims up front. Out of line: frames
/// split across reads are the uncommon case, and keeping it out keeps the inlined decode small.
#[cold]
#[inline(never)]
fn reserve_rest(src: &mut BytesMut, total: usize) {
    src.reserve((total - src.len()).min(1 << 20));
}

/// Check header‖body against the prefix's checksum.
#[inline(never)]
fn verify(bytes: &[u8], expected: u64) -> Result<(), TwoPartCodecError> {
    let actual = xxhash_rust::xxh3::xxh3_64(bytes);
    if actual != expected {
        return Err(TwoPartCodecError::ChecksumMismatch { expected, actual });
    }
    Ok(())
}

impl Encoder<TwoPartMessage> for TwoPartCodec {
    type Error = TwoPartCodecError;

    fn encode(
        &mut self,
        item: TwoPartMessage,
        dst: &mut BytesMut,
    ) -> Result<(), TwoPartCodecError> {
        self.encode(&item, dst)
    }
}

/// Encoding by reference: a sender that keeps the message (e.g. to retry) need not clone it.
impl Encoder<&TwoPartMessage> for TwoPartCodec {
    type Error = TwoPartCodecError;

    fn encode(
        &mut self,
        item: &TwoPartMessage,
        dst: &mut BytesMut,
    ) -> Result<(), TwoPartCodecError> {
        let header_len = item.header_len as u64;
        let data_len = (item.bytes.len() - item.header_len) as u64;
        let total = self.check_size(header_len, data_len)?;
        let sum = if self.write_checksum {
            xxhash_rust::xxh3::xxh3_64(&item.bytes)
        } else {
            0
        };
        dst.reserve(total);
        dst.put_u64(header_len);
        dst.put_u64(data_len);
        dst.put_u64(sum);
        dst.extend_from_slice(&item.bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(header: &[u8], data: &[u8], sum: u64) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u64(header.len() as u64);
        b.put_u64(data.len() as u64);
        b.put_u64(sum);
        b.extend_from_slice(header);
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn the_layout_is_big_endian_lengths_then_checksum() {
        let mut codec = TwoPartCodec::default().with_checksums(true);
        let bytes = codec
            .encode_message(TwoPartMessage::new(&b"hd"[..], &b"body"[..]))
            .unwrap();
        assert_eq!(&bytes[..8], &2u64.to_be_bytes());
        assert_eq!(&bytes[8..16], &4u64.to_be_bytes());
        assert_eq!(
            &bytes[16..24],
            &xxhash_rust::xxh3::xxh3_64(b"hdbody").to_be_bytes()
        );
        assert_eq!(&bytes[24..], b"hdbody");
        let mut plain = TwoPartCodec::default().with_checksums(false);
        let bytes = plain
            .encode_message(TwoPartMessage::header_only(&b"h"[..]))
            .unwrap();
        assert_eq!(&bytes[16..24], &[0; 8], "no checksum: zero");
    }

    #[test]
    fn partial_input_consumes_nothing() {
        let mut codec = TwoPartCodec::default();
        let whole = frame(b"abc", b"defg", 0);
        for cut in 0..whole.len() {
            let mut partial = BytesMut::from(&whole[..cut]);
            assert!(codec.decode(&mut partial).unwrap().is_none(), "cut {cut}");
            assert_eq!(&partial[..], &whole[..cut], "nothing consumed at {cut}");
        }
    }

    #[test]
    fn oversized_frames_fail_from_the_prefix_alone() {
        let mut codec = TwoPartCodec::new(Some(100));
        let mut prefix = BytesMut::new();
        prefix.put_u64(50);
        prefix.put_u64(27); // 24 + 50 + 27 = 101
        prefix.put_u64(0);
        match codec.decode(&mut prefix) {
            Err(TwoPartCodecError::MessageTooLarge(101, 100)) => {}
            other => panic!("expected MessageTooLarge(101, 100), got {other:?}"),
        }
        // Exactly the limit is fine.
        let mut exact = frame(&[1; 50], &[2; 26], 0);
        assert!(codec.decode(&mut exact).unwrap().is_some());
        // Lengths that overflow are too large, not a panic.
        let mut huge = BytesMut::new();
        huge.put_u64(u64::MAX);
        huge.put_u64(u64::MAX);
        huge.put_u64(0);
        assert!(matches!(
            TwoPartCodec::default().decode(&mut huge),
            Err(TwoPartCodecError::MessageTooLarge(usize::MAX, usize::MAX))
        ));
        let err = TwoPartCodec::new(Some(10))
            .encode_message(TwoPartMessage::data_only(vec![0u8; 20]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Message size 44 exceeds the maximum allowed size of 10 bytes"
        );
    }

    #[test]
    fn checksums_are_verified_when_non_zero() {
        let mut codec = TwoPartCodec::default().with_checksums(true);
        let good = xxhash_rust::xxh3::xxh3_64(b"hdbody");
        assert!(codec
            .decode(&mut frame(b"hd", b"body", good))
            .unwrap()
            .is_some());
        assert!(
            codec
                .decode(&mut frame(b"hd", b"body", 0))
                .unwrap()
                .is_some(),
            "zero = not computed"
        );
        assert!(matches!(
            codec.decode(&mut frame(b"hd", b"bodx", good)),
            Err(TwoPartCodecError::ChecksumMismatch { .. })
        ));
        let mut off = TwoPartCodec::default().with_checksums(false);
        assert!(off
            .decode(&mut frame(b"hd", b"bodx", good))
            .unwrap()
            .is_some());
    }

    #[test]
    fn one_shot_decoding_wants_exactly_one_frame() {
        let mut codec = TwoPartCodec::default();
        let err = codec
            .decode_message(Bytes::from_static(b"short"))
            .unwrap_err();
        assert_eq!(err.to_string(), "Invalid message: No message decoded");
        let mut two = frame(b"a", b"", 0);
        two.extend_from_slice(&frame(b"b", b"", 0));
        assert!(codec.decode_message(two.freeze()).is_err());
        assert_eq!(TwoPartMessage::new(b"", b"").kind(), MessageKind::Empty);
        assert_eq!(
            TwoPartMessage::data_only(&b"x"[..]).kind(),
            MessageKind::DataOnly
        );
        let decoded = codec
            .decode_message(frame(b"hd", b"body", 0).freeze())
            .unwrap();
        assert_eq!(
            (decoded.header(), decoded.data()),
            (&b"hd"[..], &b"body"[..])
        );
        assert_eq!(decoded.kind(), MessageKind::HeaderAndData);
        assert_eq!(decoded, TwoPartMessage::new(b"hd", b"body"));
        let header_only = codec.decode_message(frame(b"hd", b"", 0).freeze()).unwrap();
        assert_eq!(
            (header_only.header(), header_only.data()),
            (&b"hd"[..], &b""[..])
        );
        assert_eq!(header_only.kind(), MessageKind::HeaderOnly);
    }

    proptest! {
        #[test]
        fn frames_round_trip_split_anywhere(
            messages in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..300), proptest::collection::vec(any::<u8>(), 0..300)),
                1..6,
            ),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            checksums in any::<bool>(),
        ) {
            let mut codec = TwoPartCodec::new(Some(1 << 20)).with_checksums(checksums);
            let mut wire = BytesMut::new();
            let sent: Vec<TwoPartMessage> = messages
                .into_iter()
                .map(|(h, d)| TwoPartMessage::new(h, d))
                .collect();
            for m in &sent {
                codec.encode(m.clone(), &mut wire).unwrap();
            }
            let wire = wire.freeze();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.push(wire.len());
            points.sort_unstable();
            let mut buffer = BytesMut::new();
            let mut received = Vec::new();
            let mut last = 0;
            for point in points {
                buffer.extend_from_slice(&wire[last..point]);
                last = point;
                while let Some(m) = codec.decode(&mut buffer).unwrap() {
                    received.push(m);
                }
            }
            prop_assert!(buffer.is_empty());
            prop_assert_eq!(received, sent);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut codec = TwoPartCodec::new(Some(4096)).with_checksums(true);
            let mut buffer = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode(&mut buffer) {}
        }
    }
}
