//! Wire codecs of the multi-process runtime (runtime spec §1), as tokio-util `Encoder`/`Decoder`s.
//!
//! Layout:
//! - [`two_part`]: the 24-byte-prefix two-part frame (request payloads, response-stream frames).
//! - [`tcp`]: the TCP request-plane frame and its one-per-request ACK; its size limit (`distributed.max_message_size`).
//! - [`messages`]: the JSON messages inside them (request control header, call-home handshake,
//!   prologue, data wrapper, stop/kill/sentinel).
//!
//! Every decoder consumes nothing on partial input, checks its size limit as soon as the lengths are
//! readable, and reports malformed input as a typed error — never a panic (property tests here, fuzz
//! targets in `fuzz/`).

pub mod messages;
pub mod tcp;
pub mod two_part;

pub use tcp::{
    TcpCodecError, TcpRequestCodec, TcpRequestMessage, TcpResponseCodec, TcpResponseMessage,
};
pub use two_part::{MessageKind, TwoPartCodec, TwoPartCodecError, TwoPartMessage};
