//! One private message parsed, routed and encoded, N times, for counting
//! instructions with callgrind (repeatable where timings are not):
//!
//! ```sh
//! cargo bench --bench route_count --no-run   # prints the binary's path
//! valgrind --tool=callgrind target/release/deps/route_count-HASH 10000
//! valgrind --tool=callgrind target/release/deps/route_count-HASH 110000
//! ```
//!
//! Instructions per message = (Ir at 110000 − Ir at 10000) / 100000. Run
//! without valgrind (`cargo bench --bench route_count`) it only times itself.

mod support;

use wschat::chat::ConnId;
use wschat::limits::rate::{MessagePolicy, Rate};

use std::hint::black_box;
use std::time::Instant;

use support::{router_with, Counting};

fn main() {
    // `cargo bench` passes `--bench`; a number is the message count.
    let count = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<u64>().ok())
        .unwrap_or(1_000_000);
    let mut out = Counting::default();
    let mut router = router_with(100, &mut out);
    // The server always charges messages (`--rate-limit`, 20 a second by
    // default); this rate admits all of them, so the count is the charge
    // plus the routing.
    router.set_message_policy(MessagePolicy::new(Rate::new(u32::MAX, u32::MAX)));
    // The shape the shared load generator sends (a 64-byte body).
    let message = r#"{"type":"private","from":"u7","to":"u42","body":"P7Q123T1764250000123456789Xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let started = Instant::now();
    for i in 0..count {
        let now_ms = 1_764_250_000_123 + i / 1000;
        router.handle(ConnId(7), black_box(message), now_ms, &mut out);
    }
    let elapsed = started.elapsed();
    println!(
        "route_count: {count} private messages, {} frames, {} bytes out, {:.0} ns/message",
        out.frames,
        out.bytes,
        elapsed.as_nanos() as f64 / count.max(1) as f64
    );
}
