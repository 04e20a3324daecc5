//! The frame decoder and message assembler (src/ws/message.rs) on a byte
//! stream that arrives in pieces cut anywhere: the messages and the error
//! must be the same whatever the cuts.
//!
//! Input: `[settings][n][n cut points, u16 LE each][stream]`.
//! - `settings`: bits 0-2 pick the message size limit from [`LIMITS`]; bit 3
//!   reads as the client end (unmasked server frames, as the load
//!   generator does) instead of the server end.
//! - `n % 16` cut points, each taken modulo the stream's length plus one.
//!
//! The stream is decoded whole, in the cut pieces, and one byte at a time,
//! each as the server does it (src/server/dispatch.rs): decode until the
//! piece is used up, stop at the first error. Beyond agreement, every call
//! must make progress (the server loops until the piece is used up), a
//! text message must be valid UTF-8 (the decoder skips validation for
//! ASCII, unmasking in the same pass), data messages keep to the limit and
//! control payloads to 125 bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wschat::ws::frame::MAX_CONTROL_PAYLOAD;
use wschat::ws::{Decoder, Message, ProtocolError};

/// Message size limits to run with: the edges of the length encodings, and
/// the server's default (65,536).
const LIMITS: [usize; 8] = [0, 1, 125, 126, 65_535, 65_536, 1 << 20, 16 << 20];

#[derive(Debug, PartialEq, Eq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

fuzz_target!(|data: &[u8]| {
    let [settings, n, rest @ ..] = data else {
        return;
    };
    let limit = LIMITS[usize::from(settings & 7)];
    let client = settings & 8 != 0;
    let n = usize::from(n % 16);
    let Some((cut_bytes, stream)) = rest.split_at_checked(2 * n) else {
        return;
    };
    let mut cuts: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();

    let whole = decode(stream, &[], limit, client);
    assert_eq!(decode(stream, &cuts, limit, client), whole, "cuts {cuts:?}");
    let every_byte: Vec<usize> = (1..stream.len()).collect();
    assert_eq!(
        decode(stream, &every_byte, limit, client),
        whole,
        "one byte at a time"
    );
});

/// Feeds `stream` cut at `cuts` (sorted), as the server's read loop does.
fn decode(
    stream: &[u8],
    cuts: &[usize],
    limit: usize,
    client: bool,
) -> (Vec<Owned>, Option<ProtocolError>) {
    let mut decoder = if client {
        Decoder::client()
    } else {
        Decoder::default()
    };
    let mut messages = Vec::new();
    let mut bytes = stream.to_vec(); // unmasked in place
    let mut start = 0;
    for end in cuts.iter().copied().chain([stream.len()]) {
        let piece = &mut bytes[start..end];
        let len = piece.len();
        let mut pos = 0;
        while pos < len {
            match decoder.decode(&mut piece[pos..], limit) {
                Ok((used, message)) => {
                    assert!(used > 0, "no progress at {}", start + pos);
                    pos += used;
                    assert!(pos <= len);
                    if let Some(message) = message {
                        messages.push(own(message, limit));
                    }
                }
                Err(e) => return (messages, Some(e)),
            }
        }
        start = end;
    }
    (messages, None)
}

fn own(message: Message<'_>, limit: usize) -> Owned {
    let control = |payload: &[u8]| {
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        payload.to_vec()
    };
    match message {
        Message::Text(text) => {
            assert!(text.len() <= limit);
            assert!(std::str::from_utf8(text.as_bytes()).is_ok());
            Owned::Text(text.to_owned())
        }
        Message::Binary(bytes) => {
            assert!(bytes.len() <= limit);
            Owned::Binary(bytes.to_vec())
        }
        Message::Ping(payload) => Owned::Ping(control(payload)),
        Message::Pong(payload) => Owned::Pong(control(payload)),
        Message::Close(close) => Owned::Close(close.map(|c| {
            assert!(2 + c.reason.len() <= MAX_CONTROL_PAYLOAD);
            (c.code, c.reason.to_owned())
        })),
    }
}
