//! The input is what a client sends before the server decides: a request
//! head, maybe with frames behind it.
//!
//! The server appends each read to the head and calls `handshake::parse` on
//! all of it until the answer is not `Partial` (src/server/dispatch.rs), and
//! never buffers more than `MAX_HEAD + 1` bytes (src/server.rs). The reads
//! can end anywhere, so the outcome must not depend on where they did:
//! every prefix from the first one that is decided on gives that same
//! decision. Checking every prefix covers every way of splitting the input.
//! The server also relies on these: beyond `MAX_HEAD` bytes the answer is
//! never `Partial` (else it would read zero bytes and take that for EOF),
//! and an upgrade's `head_len` lies within the bytes parsed.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wschat::handshake::{parse, Outcome, Policy, MAX_HEAD};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_HEAD + 1)];
    let policies = [
        Policy::default(),
        Policy {
            allowed_origins: vec!["https://chat.example/".into(), "http://a".into()],
            shutting_down: false,
        },
        Policy {
            allowed_origins: Vec::new(),
            shutting_down: true,
        },
    ];
    // The server's policy, fixed for the connection: the input's length
    // picks one, so that the input stays a plain request.
    let policy = &policies[data.len() % policies.len()];

    // One byte per read: the first decided prefix.
    let mut decided = None;
    for end in 1..=data.len() {
        let outcome = check(&data[..end], policy);
        if outcome != Outcome::Partial {
            decided = Some((end, outcome));
            break;
        }
    }
    let Some((first, expected)) = decided else {
        return; // still reading: every prefix was Partial
    };
    // Any other way of reading stops at a longer prefix: same answer.
    for end in first + 1..=data.len() {
        let outcome = check(&data[..end], policy);
        assert_eq!(
            outcome, expected,
            "{end} bytes answer differently from the first {first}"
        );
    }
});

/// Parses `head`, checks what the caller relies on, and renders any
/// response (as the server would send it).
fn check(head: &[u8], policy: &Policy) -> Outcome {
    let outcome = parse(head, policy);
    match &outcome {
        Outcome::Partial => assert!(head.len() <= MAX_HEAD, "Partial beyond MAX_HEAD"),
        Outcome::Upgrade(upgrade) => {
            assert!(upgrade.head_len <= head.len().min(MAX_HEAD));
            assert!(upgrade.response.starts_with(b"HTTP/1.1 101 "));
            assert!(upgrade.response.ends_with(b"\r\n\r\n"));
        }
        Outcome::Serve { .. } => {}
        Outcome::Reject(response) => {
            let bytes = response.to_bytes();
            assert!(bytes.starts_with(b"HTTP/1.1 4") || bytes.starts_with(b"HTTP/1.1 5"));
        }
    }
    outcome
}
