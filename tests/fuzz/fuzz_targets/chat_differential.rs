//! The chat message parser, differentially: the one-pass reader
//! (src/chat/scan.rs) against serde_json (`read_with_serde`), through
//! `protocol::readings`.
//!
//! The one-pass reader takes only the plain shape and leaves everything
//! else to serde_json, the parser of record. So on every input: what it
//! takes, serde_json takes too, with the same fields, borrowed alike. A
//! string either reader borrowed is written back unescaped
//! (`protocol::is_plain`), so it must hold nothing JSON escapes. Then
//! `protocol::parse`, as the router calls it: its limits hold, and what the
//! server writes back from it (the body, the echoed `ref`) is valid JSON
//! that reads back the same.
//!
//! Input: the text of a WebSocket text message (invalid UTF-8 never gets
//! this far: the frame decoder refuses it).

#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wschat::chat::protocol::{self, encode, is_plain, Fields, PrivateMessage, Request};

/// The body limit to parse with (the server's default is 8 KiB; a small
/// one lets short inputs reach both sides of it).
const MAX_BODY: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (fast, slow) = protocol::readings(text);
    if let Some(fast) = &fast {
        let slow = slow.as_ref().unwrap_or_else(|e| {
            panic!("the one-pass reader took {text:?}, serde_json refused it: {e}")
        });
        assert_eq!(fast, slow, "{text:?}");
        assert_eq!(borrowed(fast), borrowed(slow), "{text:?}");
    }
    for fields in fast.iter().chain(slow.as_ref().ok()) {
        for s in strings(fields).into_iter().flatten() {
            assert!(
                !is_plain(s) || !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\'),
                "{s:?} borrowed from {text:?} needs escaping"
            );
        }
    }

    let mut out = Vec::new();
    match protocol::parse(text, MAX_BODY) {
        Ok(parsed) => {
            let body = match &parsed.request {
                Request::Public { body } | Request::Private { body, .. } => Some(body),
                Request::Users | Request::Ack { .. } | Request::Auth { .. } => None,
            };
            if let Some(body) = body {
                assert!(body.len() <= MAX_BODY);
                let message = PrivateMessage {
                    id: 1,
                    ts: 2,
                    seq: 3,
                    from: "alice",
                    to: "bob",
                    body: body.as_ref(),
                    body_is_plain: is_plain(body),
                    offline: false,
                };
                encode::private(&mut out, &message);
                let back = read_back(&out);
                assert_eq!(back["body"].as_str(), Some(&**body), "{text:?}");
                out.clear();
            }
            encode::receipt(&mut out, 1, parsed.reference, "delivered");
            check_ref(&out, parsed.reference, text);
        }
        Err((error, reference)) => {
            encode::error(&mut out, error.code(), &error.message(), reference);
            check_ref(&out, reference, text);
        }
    }
});

fn strings<'f, 'a>(f: &'f Fields<'a>) -> [&'f Option<Cow<'a, str>>; 4] {
    [&f.kind, &f.to, &f.body, &f.token]
}

/// Which of the string fields are borrowed from the input.
fn borrowed(f: &Fields<'_>) -> [Option<bool>; 4] {
    strings(f).map(|s| s.as_ref().map(is_plain))
}

fn read_back(json: &[u8]) -> Value {
    serde_json::from_slice(json).unwrap_or_else(|e| {
        panic!(
            "the server would write invalid JSON ({e}): {}",
            String::from_utf8_lossy(json)
        )
    })
}

/// The `ref` is echoed raw: the message must stay valid JSON and carry it.
fn check_ref(json: &[u8], reference: Option<&str>, text: &str) {
    let back = read_back(json);
    let expected = reference.map(|raw| serde_json::from_str::<Value>(raw).unwrap());
    assert_eq!(back.get("ref"), expected.as_ref(), "{text:?}");
}
