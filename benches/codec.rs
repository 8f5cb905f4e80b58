//! Codec throughput: encode and decode of two-part frames (1 KiB and 1 MiB bodies, checksums off and
//! on) and of TCP request frames, against a plain memcpy of the same bytes in the same run.
//!
//! `cargo bench --bench codec` prints GB/s per case and the ratio to memcpy (target: ≥ 0.5× memcpy
//! without checksum). Tunable: BENCH_BYTES (bytes moved per case, default 1 GiB).

use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use dynamix_actors::codec::{TcpRequestCodec, TcpRequestMessage, TwoPartCodec, TwoPartMessage};
use tokio_util::codec::{Decoder, Encoder};

mod common;
use common::env_usize;

fn gbps(bytes: usize, seconds: f64) -> f64 {
    bytes as f64 / seconds / 1e9
}

/// memcpy of `size`-byte buffers, `count` times.
fn memcpy(size: usize, count: usize) -> f64 {
    let src = vec![7u8; size];
    let mut dst = vec![0u8; size];
    let started = Instant::now();
    for _ in 0..count {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
    }
    gbps(size * count, started.elapsed().as_secs_f64())
}

fn two_part(size: usize) -> TwoPartMessage {
    TwoPartMessage::new(b"{\"id\":\"req\"}", vec![7u8; size])
}

/// GB/s of `size`-byte bodies when `encode` writes one frame into a cleared buffer, `count` times.
fn encode_rate(size: usize, count: usize, mut encode: impl FnMut(&mut BytesMut)) -> f64 {
    let mut out = BytesMut::with_capacity(size + 64);
    let started = Instant::now();
    for _ in 0..count {
        out.clear();
        encode(&mut out);
        black_box(&out);
    }
    gbps(size * count, started.elapsed().as_secs_f64())
}

fn two_part_encode(size: usize, count: usize, checksums: bool) -> f64 {
    let mut codec = TwoPartCodec::default().with_checksums(checksums);
    let message = two_part(size);
    encode_rate(size, count, |out| {
        codec.encode(&message, out).expect("encode")
    })
}

/// Frames decoded per second (GB/s of bodies once multiplied by the body size, in units of 1e9):
/// `one` encoded frame laid out `count` times back to back, decoded by `decode` about 256 KiB at a
/// time, as frames arrive on a socket, so they sit in cache as freshly received bytes do (the
/// memcpy baseline is in cache too). Laying the frames out is not timed.
fn decode_batches(one: &[u8], count: usize, mut decode: impl FnMut(&mut BytesMut)) -> f64 {
    let batch = ((256 << 10) / one.len().max(1)).clamp(1, count);
    let mut wire = BytesMut::with_capacity(one.len() * batch);
    let mut decoded = 0;
    let mut elapsed = 0.0;
    while decoded < count {
        wire.clear();
        let n = batch.min(count - decoded);
        for _ in 0..n {
            wire.extend_from_slice(one);
        }
        let started = Instant::now();
        decode(&mut wire);
        elapsed += started.elapsed().as_secs_f64();
        assert!(wire.is_empty(), "every frame decoded");
        decoded += n;
    }
    count as f64 / elapsed / 1e9
}

fn two_part_decode(size: usize, count: usize, checksums: bool) -> f64 {
    let mut codec = TwoPartCodec::default().with_checksums(checksums);
    let mut one = BytesMut::new();
    codec.encode(two_part(size), &mut one).expect("encode");
    decode_batches(&one, count, |wire| {
        while let Some(message) = codec.decode(wire).expect("decode") {
            black_box(message);
        }
    }) * size as f64
}

fn tcp_request(size: usize) -> TcpRequestMessage {
    TcpRequestMessage {
        endpoint_path: "dynamix/backend/generate".into(),
        headers: Default::default(),
        payload: Bytes::from(vec![7u8; size]),
    }
}

fn tcp_request_encode(size: usize, count: usize) -> f64 {
    let mut codec = TcpRequestCodec::new(None);
    let message = tcp_request(size);
    encode_rate(size, count, |out| {
        codec.encode(&message, out).expect("encode")
    })
}

fn tcp_request_decode(size: usize, count: usize) -> f64 {
    let mut codec = TcpRequestCodec::new(None);
    let mut one = BytesMut::new();
    codec.encode(&tcp_request(size), &mut one).expect("encode");
    decode_batches(&one, count, |wire| {
        while let Some(message) = codec.decode(wire).expect("decode") {
            black_box(message);
        }
    }) * size as f64
}

fn tcp_request_round_trip(size: usize, count: usize) -> f64 {
    let mut codec = TcpRequestCodec::new(None);
    let message = tcp_request(size);
    let mut wire = BytesMut::with_capacity(size + 64);
    let started = Instant::now();
    for _ in 0..count {
        wire.clear();
        codec.encode(&message, &mut wire).expect("encode");
        black_box(codec.decode(&mut wire).expect("decode"));
    }
    gbps(size * count, started.elapsed().as_secs_f64())
}

fn main() {
    let total = env_usize("BENCH_BYTES", 1 << 30);
    println!("codec: {} MiB moved per case", total >> 20);
    println!(
        "{:<34} {:>10} {:>10} {:>12}",
        "case", "GB/s", "memcpy", "vs memcpy"
    );
    for size in [1usize << 10, 1 << 20] {
        let count = (total / size).max(1);
        let base = memcpy(size, count);
        let label = if size == 1024 { "1 KiB" } else { "1 MiB" };
        let cases: [(&str, f64); 7] = [
            ("two-part encode", two_part_encode(size, count, false)),
            (
                "two-part decode (zero-copy split)",
                two_part_decode(size, count, false),
            ),
            ("two-part encode + xxh3", two_part_encode(size, count, true)),
            ("two-part decode + xxh3", two_part_decode(size, count, true)),
            ("tcp request encode", tcp_request_encode(size, count)),
            ("tcp request decode", tcp_request_decode(size, count)),
            (
                "tcp request encode+decode",
                tcp_request_round_trip(size, count),
            ),
        ];
        for (name, rate) in cases {
            println!(
                "{:<34} {:>10.2} {:>10.2} {:>11.2}x",
                format!("{name}, {label}"),
                rate,
                base,
                rate / base
            );
        }
    }
}
