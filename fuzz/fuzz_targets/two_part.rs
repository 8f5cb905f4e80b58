//! Fuzz the two_part decoder: arbitrary bytes, fed whole and then split at the first byte's position,
//! must decode or fail with a typed error — never panic, never loop.
#![no_main]

use bytes::BytesMut;
use dynamix_actors::codec::*;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = TwoPartCodec::new(Some(1 << 20)).with_checksums(true);
    let mut whole = BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut whole) {}
    let split = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    let mut codec = TwoPartCodec::new(Some(1 << 20)).with_checksums(true);
    let mut buffer = BytesMut::from(&data[..split]);
    let _ = codec.decode(&mut buffer);
    buffer.extend_from_slice(&data[split..]);
    while let Ok(Some(_)) = codec.decode(&mut buffer) {}
});
