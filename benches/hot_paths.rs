//! Micro-benchmarks of the hot paths, in process: frame header parsing,
//! unmasking, UTF-8 validation, the handshake parser, one private message
//! from JSON to queued frame, and a public message fanned out to 1000 users.
//!
//! `cargo bench --bench hot_paths`; the end-to-end figures come from
//! `wschat-bench` against a running server (see the README).

mod support;

use wschat::chat::ConnId;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use support::{router_with, Counting};
use wschat::handshake::{self, Policy};
use wschat::ws::frame::{apply_mask, encode_masked, parse_header, Opcode, Role};
use wschat::ws::utf8::Utf8Validator;
use wschat::ws::Decoder;

fn frames(c: &mut Criterion) {
    let frame = encode_masked(Opcode::Text, &[b'x'; 100], [1, 2, 3, 4]);
    c.bench_function("frame header parse", |b| {
        b.iter(|| parse_header(black_box(&frame), Role::Server))
    });

    let mut group = c.benchmark_group("unmask");
    for size in [64usize, 4096, 65536] {
        let mut payload = vec![0x5au8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{size} bytes"), |b| {
            b.iter(|| apply_mask(black_box(&mut payload), [0x37, 0xfa, 0x21, 0x3d], 1))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode");
    let message = encode_masked(
        Opcode::Text,
        br#"{"type":"private","to":"bob","body":"hello there"}"#,
        [9, 8, 7, 6],
    );
    group.throughput(Throughput::Elements(1));
    group.bench_function("one small text frame", |b| {
        let mut decoder = Decoder::default();
        let mut input = message.clone();
        b.iter(|| {
            input.copy_from_slice(&message);
            let (used, m) = decoder
                .decode(black_box(&mut input), 1 << 16)
                .expect("valid");
            black_box((used, m.is_some()))
        })
    });
    group.finish();
}

fn utf8(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf-8");
    let ascii = "hello world, this is a chat message. ".repeat(100);
    let mixed = "héllo 小明 😀 مرحبا ".repeat(100);
    for (name, text) in [("ascii", &ascii), ("mixed", &mixed)] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("{name} in 3 pieces"), |b| {
            let bytes = text.as_bytes();
            let (a, rest) = bytes.split_at(bytes.len() / 3 + 1);
            let (m, z) = rest.split_at(rest.len() / 2 + 1);
            b.iter(|| {
                let mut v = Utf8Validator::default();
                v.feed(black_box(a)).expect("valid");
                v.feed(black_box(m)).expect("valid");
                v.feed(black_box(z)).expect("valid");
                v.finish().expect("valid")
            })
        });
    }
    group.finish();
}

fn handshake_parse(c: &mut Criterion) {
    let request = b"GET /ws?username=alice HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nUser-Agent: bench\r\n\r\n";
    let policy = Policy::default();
    c.bench_function("handshake parse + accept key", |b| {
        b.iter(|| handshake::parse(black_box(request), &policy))
    });
}

fn routing(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(1));
    let mut out = Counting::default();
    let mut router = router_with(100, &mut out);
    let private = r#"{"type":"private","to":"u42","body":"P7Q123T1764250000123456789Xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    group.bench_function("private: parse, route, encode", |b| {
        b.iter(|| router.handle(ConnId(7), black_box(private), 1_764_250_000_123, &mut out))
    });
    group.finish();

    let mut group = c.benchmark_group("fan-out");
    let mut out = Counting::default();
    let mut router = router_with(1000, &mut out);
    let public = r#"{"type":"public","body":"K1T1764250000123456789Xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    group.throughput(Throughput::Elements(1000));
    group.bench_function("public to 1000 users", |b| {
        b.iter(|| router.handle(ConnId(0), black_box(public), 1_764_250_000_123, &mut out))
    });
    group.finish();
}

criterion_group!(benches, frames, utf8, handshake_parse, routing);
criterion_main!(benches);
