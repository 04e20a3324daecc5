//! WebSocket framing and close-handshake rules, driven with raw frames over a
//! plain `TcpStream` against `wschat --echo`.

mod common;
mod support;

use std::io::Write;
use std::time::Duration;

use common::*;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

fn text_of(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

// ---------------------------------------------------------------------------
// Valid traffic
// ---------------------------------------------------------------------------

#[test]
fn text_and_binary_echo_with_raw_frames() {
    let mut server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::text("hello"));
    expect_text(&mut s, b"hello", "text echo");
    send(&mut s, &ClientFrame::binary(vec![0u8, 1, 2, 255, 254]));
    expect_binary(&mut s, &[0, 1, 2, 255, 254], "binary echo");
    send(&mut s, &ClientFrame::text(""));
    expect_text(&mut s, b"", "empty text echo");
    send(&mut s, &ClientFrame::binary(Vec::new()));
    expect_binary(&mut s, b"", "empty binary echo");
    send(&mut s, &ClientFrame::close(1000, b"done"));
    expect_close(&mut s, 1000, "normal close");
    server.assert_serving();
}

#[test]
fn every_length_encoding_boundary_is_echoed() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    // Default limit is 64 KiB, so 65536 (64-bit form) is still allowed.
    for len in [0usize, 1, 125, 126, 127, 1000, 65535, 65536] {
        let data = pattern(len);
        send(&mut s, &ClientFrame::binary(data.clone()));
        expect_binary(&mut s, &data, &format!("binary echo of {len} bytes"));
    }
}

#[test]
fn any_mask_key_works() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    for mask in [
        [0u8, 0, 0, 0],
        [0xff; 4],
        [1, 2, 3, 4],
        [0x80, 0x00, 0x7f, 0x01],
    ] {
        send(&mut s, &ClientFrame::text("masked payload!").mask(mask));
        expect_text(&mut s, b"masked payload!", &format!("mask {mask:02x?}"));
    }
}

#[test]
fn pipelined_frames_in_one_write() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    let mut batch = Vec::new();
    for i in 0..20 {
        batch.extend(ClientFrame::text(format!("message {i}")).encode());
    }
    batch.extend(ClientFrame::binary(pattern(300)).encode());
    batch.extend(ClientFrame::close(1000, b"").encode());
    send_raw(&mut s, &batch);
    for i in 0..20 {
        expect_text(&mut s, format!("message {i}").as_bytes(), "pipelined text");
    }
    expect_binary(&mut s, &pattern(300), "pipelined binary");
    expect_close(&mut s, 1000, "pipelined close");
}

#[test]
fn handshake_and_frames_written_one_byte_at_a_time() {
    let mut server = Server::echo(&[]);
    let mut s = connect(server.addr);
    write_bytewise(
        &mut s,
        upgrade_request("/ws", &[]).as_bytes(),
        Duration::ZERO,
    );
    let resp = read_response_head(&mut s);
    assert_switching(&resp, SAMPLE_KEY);

    // 7-bit length, 16-bit length, and a fragmented message, all bytewise.
    write_bytewise(&mut s, &ClientFrame::text("tiny").encode(), Duration::ZERO);
    expect_text(&mut s, b"tiny", "bytewise 7-bit frame");

    let medium = text_of(300);
    write_bytewise(
        &mut s,
        &ClientFrame::text(medium.clone()).encode(),
        Duration::ZERO,
    );
    expect_text(&mut s, &medium, "bytewise 16-bit frame");

    let mut frags = ClientFrame::binary(vec![1u8, 2, 3]).fin(false).encode();
    frags.extend(ClientFrame::ping("p").encode());
    frags.extend(ClientFrame::cont(vec![4u8, 5]).encode());
    write_bytewise(&mut s, &frags, Duration::ZERO);
    let pong = expect_frame(&mut s, "pong for bytewise ping");
    assert_eq!((pong.opcode, pong.payload.as_slice()), (OP_PONG, &b"p"[..]));
    expect_binary(&mut s, &[1, 2, 3, 4, 5], "bytewise fragmented message");

    write_bytewise(
        &mut s,
        &ClientFrame::close(1000, b"").encode(),
        Duration::ZERO,
    );
    expect_close(&mut s, 1000, "bytewise close");
    server.assert_serving();
}

#[test]
fn sixty_four_bit_header_written_one_byte_at_a_time() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    let data = pattern(65536);
    let frame = ClientFrame::binary(data.clone());
    let header = frame.header();
    assert_eq!(header.len(), 14, "64-bit form + mask");
    write_bytewise(&mut s, &header, Duration::ZERO);
    send_raw(&mut s, &frame.wire_payload());
    expect_binary(&mut s, &data, "64-bit frame with bytewise header");
}

#[test]
fn fragmented_messages_are_echoed_whole() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::text("Hel").fin(false));
    send(&mut s, &ClientFrame::cont("lo, ").fin(false));
    send(&mut s, &ClientFrame::cont("").fin(false));
    send(&mut s, &ClientFrame::cont("world"));
    expect_text(&mut s, b"Hello, world", "4-fragment text");

    send(&mut s, &ClientFrame::binary(vec![9u8; 10]).fin(false));
    send(&mut s, &ClientFrame::cont(vec![8u8; 10]));
    let mut want = vec![9u8; 10];
    want.extend([8u8; 10]);
    expect_binary(&mut s, &want, "2-fragment binary");

    // Empty first fragment.
    send(&mut s, &ClientFrame::text("").fin(false));
    send(&mut s, &ClientFrame::cont("x"));
    expect_text(&mut s, b"x", "empty first fragment");
}

#[test]
fn utf8_split_across_fragments_mid_character_is_fine() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    // "a€😀b": € = e2 82 ac, 😀 = f0 9f 98 80; split inside both.
    let full = "a\u{20ac}\u{1f600}b".as_bytes().to_vec();
    send(&mut s, &ClientFrame::text(full[..2].to_vec()).fin(false)); // a, e2
    send(&mut s, &ClientFrame::cont(full[2..3].to_vec()).fin(false)); // 82
    send(&mut s, &ClientFrame::cont(full[3..6].to_vec()).fin(false)); // ac, f0 9f
    send(&mut s, &ClientFrame::cont(full[6..].to_vec())); // 98 80 b
    expect_text(&mut s, &full, "UTF-8 split mid-character");
}

#[test]
fn ping_is_answered_with_pong_of_same_payload() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    for payload in [Vec::new(), b"hello".to_vec(), pattern(125)] {
        send(&mut s, &ClientFrame::ping(payload.clone()));
        let f = expect_frame(&mut s, "pong");
        assert_eq!(f.opcode, OP_PONG, "expected a pong, got {f:?}");
        assert!(f.fin, "pong without FIN");
        assert_eq!(f.payload, payload, "pong payload differs");
    }
}

#[test]
fn ping_between_fragments_is_answered_first() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::text("Hel").fin(false));
    send(&mut s, &ClientFrame::ping("mid"));
    let f = expect_frame(&mut s, "pong in the middle of a fragmented message");
    assert_eq!(f.opcode, OP_PONG, "expected a pong, got {f:?}");
    assert_eq!(f.payload, b"mid");
    send(&mut s, &ClientFrame::cont("lo"));
    expect_text(&mut s, b"Hello", "message around a ping");
}

#[test]
fn unsolicited_pong_is_ignored() {
    let mut server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::pong("nobody asked"));
    send(&mut s, &ClientFrame::pong(""));
    send(&mut s, &ClientFrame::text("after pongs"));
    // The very next frame must be the echo (no reply to the pongs).
    expect_text(&mut s, b"after pongs", "echo after unsolicited pongs");
    // Also between fragments.
    send(&mut s, &ClientFrame::text("a").fin(false));
    send(&mut s, &ClientFrame::pong("x"));
    send(&mut s, &ClientFrame::cont("b"));
    expect_text(&mut s, b"ab", "pong between fragments");
    server.assert_serving();
}

// ---------------------------------------------------------------------------
// Protocol errors: 1002
// ---------------------------------------------------------------------------

#[test]
fn unmasked_frame_is_1002() {
    let mut server = Server::echo(&[]);
    expect_close_after(
        server.addr,
        &[ClientFrame::text("plain").unmasked()],
        1002,
        "unmasked text",
    );
    expect_close_after(
        server.addr,
        &[ClientFrame::ping("plain").unmasked()],
        1002,
        "unmasked ping",
    );
    // Also when written one byte at a time.
    let mut s = ws_raw(server.addr);
    // The server may close after the second byte already.
    let _ = try_write_bytewise(
        &mut s,
        &ClientFrame::binary(vec![1u8, 2, 3]).unmasked().encode(),
    );
    expect_close(&mut s, 1002, "bytewise unmasked binary");
    server.assert_serving();
}

#[test]
fn rsv_bits_are_1002() {
    let mut server = Server::echo(&[]);
    for rsv in [0b100u8, 0b010, 0b001, 0b111] {
        expect_close_after(
            server.addr,
            &[ClientFrame::text("x").rsv(rsv)],
            1002,
            &format!("text with rsv {rsv:03b}"),
        );
    }
    expect_close_after(
        server.addr,
        &[ClientFrame::ping("x").rsv(0b100)],
        1002,
        "ping with rsv1",
    );
    expect_close_after(
        server.addr,
        &[
            ClientFrame::text("a").fin(false),
            ClientFrame::cont("b").rsv(0b010),
        ],
        1002,
        "continuation with rsv2",
    );
    server.assert_serving();
}

#[test]
fn reserved_opcodes_are_1002() {
    let mut server = Server::echo(&[]);
    for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        expect_close_after(
            server.addr,
            &[ClientFrame::new(op, "x")],
            1002,
            &format!("reserved opcode {op:#x}"),
        );
    }
    // Reserved opcode in the middle of a fragmented message.
    expect_close_after(
        server.addr,
        &[ClientFrame::text("a").fin(false), ClientFrame::new(0xB, "")],
        1002,
        "reserved control opcode between fragments",
    );
    server.assert_serving();
}

#[test]
fn oversized_control_frames_are_1002() {
    let mut server = Server::echo(&[]);
    for op in [OP_PING, OP_PONG, OP_CLOSE] {
        let mut payload = pattern(126);
        if op == OP_CLOSE {
            payload[0] = 0x03; // 1000
            payload[1] = 0xE8;
            for b in payload.iter_mut().skip(2) {
                *b = b'r';
            }
        }
        expect_close_after(
            server.addr,
            &[ClientFrame::new(op, payload)],
            1002,
            &format!("control opcode {op:#x} with 126-byte payload"),
        );
    }
    server.assert_serving();
}

#[test]
fn fragmented_control_frames_are_1002() {
    let mut server = Server::echo(&[]);
    for (op, payload) in [
        (OP_PING, b"p".to_vec()),
        (OP_PONG, b"p".to_vec()),
        (OP_CLOSE, vec![0x03, 0xE8]),
    ] {
        expect_close_after(
            server.addr,
            &[ClientFrame::new(op, payload).fin(false)],
            1002,
            &format!("control opcode {op:#x} without FIN"),
        );
    }
    server.assert_serving();
}

#[test]
fn continuation_without_start_is_1002() {
    let mut server = Server::echo(&[]);
    expect_close_after(
        server.addr,
        &[ClientFrame::cont("orphan")],
        1002,
        "final continuation without a message",
    );
    expect_close_after(
        server.addr,
        &[ClientFrame::cont("orphan").fin(false)],
        1002,
        "non-final continuation without a message",
    );
    // After a complete message there is nothing to continue either.
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::text("complete"));
    expect_text(&mut s, b"complete", "echo before the orphan");
    send(&mut s, &ClientFrame::cont("orphan"));
    expect_close(&mut s, 1002, "continuation after a complete message");
    server.assert_serving();
}

#[test]
fn new_data_frame_inside_fragmented_message_is_1002() {
    let mut server = Server::echo(&[]);
    expect_close_after(
        server.addr,
        &[ClientFrame::text("a").fin(false), ClientFrame::text("b")],
        1002,
        "text inside unfinished text",
    );
    expect_close_after(
        server.addr,
        &[ClientFrame::text("a").fin(false), ClientFrame::binary("b")],
        1002,
        "binary inside unfinished text",
    );
    expect_close_after(
        server.addr,
        &[
            ClientFrame::binary("a").fin(false),
            ClientFrame::text("b").fin(false),
        ],
        1002,
        "unfinished text inside unfinished binary",
    );
    server.assert_serving();
}

#[test]
fn length_with_top_bit_set_is_1002() {
    let mut server = Server::echo(&[]);
    for declared in [0x8000_0000_0000_0005u64, u64::MAX] {
        // Only the header (with mask key) is sent: the server has to decide
        // from the header alone.
        let frame = ClientFrame::binary(Vec::new()).declared_len(declared);
        let mut s = ws_raw(server.addr);
        send_raw(&mut s, &frame.header());
        expect_close(&mut s, 1002, &format!("64-bit length {declared:#x}"));
    }
    server.assert_serving();
}

#[test]
fn non_minimal_length_encodings_are_1002() {
    let mut server = Server::echo(&[]);
    let cases = [
        (
            ClientFrame::text("hello").len_form(LenForm::Len16),
            "126-form for 5",
        ),
        (
            ClientFrame::text("").len_form(LenForm::Len16),
            "126-form for 0",
        ),
        (
            ClientFrame::text(text_of(125)).len_form(LenForm::Len16),
            "126-form for 125",
        ),
        (
            ClientFrame::text("hello").len_form(LenForm::Len64),
            "127-form for 5",
        ),
        (
            ClientFrame::binary(pattern(200)).len_form(LenForm::Len64),
            "127-form for 200",
        ),
        (
            ClientFrame::binary(pattern(65535)).len_form(LenForm::Len64),
            "127-form for 65535",
        ),
        (
            ClientFrame::ping("p").len_form(LenForm::Len16),
            "126-form ping",
        ),
    ];
    for (frame, what) in cases {
        expect_close_after(server.addr, &[frame], 1002, what);
    }
    server.assert_serving();
}

// ---------------------------------------------------------------------------
// UTF-8: 1007
// ---------------------------------------------------------------------------

const INVALID_UTF8: [(&[u8], &str); 9] = [
    (b"\xff", "0xff byte"),
    (b"abc\xfe", "0xfe byte"),
    (b"\xc3\x28", "bad continuation byte"),
    (b"\x80", "lone continuation byte"),
    (b"\xc0\xaf", "overlong '/'"),
    (b"\xe0\x80\xaf", "overlong 3-byte"),
    (b"\xed\xa0\x80", "UTF-16 surrogate"),
    (b"\xf4\x90\x80\x80", "above U+10FFFF"),
    (b"ok\xe2\x82", "truncated at end of message"),
];

#[test]
fn invalid_utf8_text_is_1007() {
    let mut server = Server::echo(&[]);
    for (bytes, what) in INVALID_UTF8 {
        expect_close_after(server.addr, &[ClientFrame::text(bytes)], 1007, what);
    }
    server.assert_serving();
}

#[test]
fn invalid_utf8_in_final_fragment_is_1007() {
    let mut server = Server::echo(&[]);
    expect_close_after(
        server.addr,
        &[
            ClientFrame::text("fine").fin(false),
            ClientFrame::cont(b"\xff".to_vec()),
        ],
        1007,
        "invalid byte in the last fragment",
    );
    // Valid prefix in fragment 1, invalid continuation in fragment 2.
    expect_close_after(
        server.addr,
        &[
            ClientFrame::text(b"a\xe2".to_vec()).fin(false),
            ClientFrame::cont(b"\x28b".to_vec()),
        ],
        1007,
        "sequence broken across fragments",
    );
    // Message ends in the middle of a character.
    expect_close_after(
        server.addr,
        &[
            ClientFrame::text(b"a".to_vec()).fin(false),
            ClientFrame::cont(b"\xf0\x9f".to_vec()),
        ],
        1007,
        "message ends mid-character",
    );
    server.assert_serving();
}

#[test]
fn invalid_utf8_in_unfinished_message_fails_fast() {
    let mut server = Server::echo(&[]);
    for (bytes, what) in [
        (&b"\xff"[..], "0xff in first fragment"),
        (&b"hello \xc3\x28"[..], "bad continuation in first fragment"),
        (&b"\xed\xa0\x80"[..], "surrogate in first fragment"),
        // Invalid although the character is not complete yet: the second
        // byte already rules out any valid sequence.
        (&b"ab\xf4\x90"[..], "prefix above U+10FFFF"),
        (&b"ab\xed\xa0"[..], "surrogate prefix"),
        (&b"ab\xe0\x80"[..], "overlong 3-byte prefix"),
        (&b"ab\xf0\x80"[..], "overlong 4-byte prefix"),
        (&b"ab\xc0"[..], "0xc0 can never start a character"),
        (&b"ab\xf5"[..], "0xf5 can never start a character"),
    ] {
        // The rest of the message is never sent: the close must come anyway.
        expect_close_after(
            server.addr,
            &[ClientFrame::text(bytes).fin(false)],
            1007,
            what,
        );
    }
    server.assert_serving();
}

#[test]
fn close_reason_not_utf8_is_1007() {
    let mut server = Server::echo(&[]);
    expect_close_after(
        server.addr,
        &[ClientFrame::close(1000, b"\xff\xfe")],
        1007,
        "close reason 0xff 0xfe",
    );
    expect_close_after(
        server.addr,
        &[ClientFrame::close(1001, b"bye \xc0\xaf")],
        1007,
        "close reason with overlong encoding",
    );
    server.assert_serving();
}

#[test]
fn binary_messages_are_not_utf8_checked() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::binary(b"\xff\xfe\xc0\xaf".to_vec()));
    expect_binary(&mut s, b"\xff\xfe\xc0\xaf", "binary with invalid UTF-8");
}

// ---------------------------------------------------------------------------
// Size limit: 1009
// ---------------------------------------------------------------------------

#[test]
fn message_at_limit_is_echoed() {
    let server = Server::echo(&["--max-message-size", "100"]);
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::text(text_of(100)));
    expect_text(&mut s, &text_of(100), "text exactly at the limit");
    send(&mut s, &ClientFrame::binary(pattern(60)).fin(false));
    send(&mut s, &ClientFrame::cont(pattern(40)));
    let mut want = pattern(60);
    want.extend(pattern(40));
    expect_binary(&mut s, &want, "fragmented binary exactly at the limit");
}

#[test]
fn message_over_limit_is_1009() {
    let mut server = Server::echo(&["--max-message-size", "100"]);
    expect_close_after(
        server.addr,
        &[ClientFrame::text(text_of(101))],
        1009,
        "single 101-byte text",
    );
    expect_close_after(
        server.addr,
        &[ClientFrame::binary(pattern(5000))],
        1009,
        "single 5000-byte binary",
    );
    expect_close_after(
        server.addr,
        &[
            ClientFrame::text(text_of(60)).fin(false),
            ClientFrame::cont(text_of(41)),
        ],
        1009,
        "fragments totalling 101 bytes",
    );
    server.assert_serving();
}

#[test]
fn oversized_declared_length_is_1009_without_payload() {
    let mut server = Server::echo(&["--max-message-size", "100"]);
    // Headers only; the payload is never sent.
    for (frame, what) in [
        (
            ClientFrame::binary(Vec::new()).declared_len(101),
            "7-bit 101 declared",
        ),
        (
            ClientFrame::binary(Vec::new()).declared_len(5000),
            "16-bit 5000 declared",
        ),
        (
            ClientFrame::text(Vec::new()).declared_len(1 << 40),
            "64-bit 2^40 declared",
        ),
    ] {
        let mut s = ws_raw(server.addr);
        send_raw(&mut s, &frame.header());
        expect_close(&mut s, 1009, what);
    }
    // Second fragment's header pushes the total over the limit.
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::text(text_of(60)).fin(false));
    send_raw(
        &mut s,
        &ClientFrame::cont(Vec::new()).declared_len(50).header(),
    );
    expect_close(&mut s, 1009, "continuation header exceeding the limit");
    server.assert_serving();
}

#[test]
fn default_limit_is_64_kib() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::binary(pattern(65536)));
    expect_binary(&mut s, &pattern(65536), "65536 bytes at the default limit");
    send_raw(
        &mut s,
        &ClientFrame::binary(Vec::new()).declared_len(65537).header(),
    );
    expect_close(&mut s, 1009, "65537 bytes over the default limit");
}

// ---------------------------------------------------------------------------
// Close handshake
// ---------------------------------------------------------------------------

#[test]
fn close_with_one_byte_payload_is_1002() {
    let mut server = Server::echo(&[]);
    expect_close_after(
        server.addr,
        &[ClientFrame::new(OP_CLOSE, vec![0x03])],
        1002,
        "1-byte close payload",
    );
    server.assert_serving();
}

#[test]
fn valid_close_codes_are_echoed() {
    let mut server = Server::echo(&[]);
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        expect_close_after(
            server.addr,
            &[ClientFrame::close(code, b"reason")],
            code,
            &format!("client close {code}"),
        );
    }
    server.assert_serving();
}

#[test]
fn invalid_close_codes_are_1002() {
    let mut server = Server::echo(&[]);
    for code in [
        0u16, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        expect_close_after(
            server.addr,
            &[ClientFrame::close(code, b"")],
            1002,
            &format!("client close with invalid code {code}"),
        );
    }
    server.assert_serving();
}

#[test]
fn empty_close_is_answered_and_connection_closed() {
    let mut server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::new(OP_CLOSE, Vec::new()));
    let f = expect_frame(&mut s, "reply to an empty close");
    assert_eq!(f.opcode, OP_CLOSE, "expected a close reply, got {f:?}");
    assert!(
        f.payload.is_empty() || f.close_code() == Some(1000),
        "reply to an empty close must be empty or 1000: {f:?}"
    );
    expect_eof(&mut s);
    server.assert_serving();
}

#[test]
fn close_between_fragments_is_answered() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::text("partial").fin(false));
    send(&mut s, &ClientFrame::close(1001, b"going away"));
    expect_close(&mut s, 1001, "close in the middle of a fragmented message");
}

#[test]
fn close_written_one_byte_at_a_time() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    write_bytewise(
        &mut s,
        &ClientFrame::close(4321, b"custom").encode(),
        Duration::ZERO,
    );
    expect_close(&mut s, 4321, "bytewise close");
}

// ---------------------------------------------------------------------------
// Misbehaving peers must not affect the server
// ---------------------------------------------------------------------------

#[test]
fn abrupt_disconnects_do_not_break_the_server() {
    let mut server = Server::echo(&[]);
    // Mid-handshake.
    {
        let mut s = connect(server.addr);
        send_raw(&mut s, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpg");
    }
    // Right after the handshake.
    drop(ws_raw(server.addr));
    // Mid-header and mid-payload.
    {
        let mut s = ws_raw(server.addr);
        send_raw(&mut s, &ClientFrame::text("abc").encode()[..3]);
    }
    {
        let mut s = ws_raw(server.addr);
        let bytes = ClientFrame::binary(pattern(1000)).encode();
        send_raw(&mut s, &bytes[..500]);
    }
    // Mid fragmented message.
    {
        let mut s = ws_raw(server.addr);
        send(&mut s, &ClientFrame::text("part").fin(false));
    }
    // Sends big messages and leaves without reading the echoes: the server
    // writes into a closed socket (EPIPE/ECONNRESET, never SIGPIPE death).
    for _ in 0..3 {
        let mut s = ws_raw(server.addr);
        for _ in 0..3 {
            if s.write_all(&ClientFrame::binary(pattern(60_000)).encode())
                .is_err()
            {
                break;
            }
        }
    }
    server.assert_serving();
    // And once more, after the server had time to notice all of the above.
    server.assert_serving();
}

#[test]
fn non_reading_client_does_not_block_others() {
    let mut server = Server::echo(&[]);
    let mut hog = ws_raw(server.addr);
    let hog_handle = hog.try_clone().expect("clone hog stream");
    let writer = std::thread::spawn(move || {
        let frame = ClientFrame::binary(pattern(60_000)).encode();
        let mut sent = 0usize;
        for _ in 0..200 {
            if hog.write_all(&frame).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    // While the hog floods the server without ever reading, others work.
    server.assert_serving();
    server.assert_serving();
    let _ = hog_handle.shutdown(std::net::Shutdown::Both);
    let _ = writer.join().expect("hog writer thread");
    server.assert_serving();
}

#[test]
fn partial_frames_on_several_connections_do_not_mix() {
    let mut server = Server::echo(&[]);
    let mut a = ws_raw(server.addr);
    let mut b = ws_raw(server.addr);
    let mut c = ws_raw(server.addr);
    let text = text_of(50_000);
    let bin = pattern(40_000);
    // Two fragmented messages so message state is interleaved too.
    let mut wire_a = ClientFrame::text(text[..20_000].to_vec())
        .fin(false)
        .encode();
    wire_a.extend(ClientFrame::cont(text[20_000..].to_vec()).encode());
    let mut wire_b = ClientFrame::binary(bin[..1].to_vec()).fin(false).encode();
    wire_b.extend(ClientFrame::cont(bin[1..].to_vec()).encode());
    let sizes = [1usize, 7, 100, 3000, 17_000, 2, 5, 13, 4096, 9000];
    let (mut ia, mut ib, mut round) = (0usize, 0usize, 0usize);
    while ia < wire_a.len() || ib < wire_b.len() {
        let n = sizes[round % sizes.len()];
        let end_a = (ia + n).min(wire_a.len());
        send_raw(&mut a, &wire_a[ia..end_a]);
        ia = end_a;
        let n = sizes[(round + 3) % sizes.len()];
        let end_b = (ib + n).min(wire_b.len());
        send_raw(&mut b, &wire_b[ib..end_b]);
        ib = end_b;
        // A round trip on a third connection lets the server's event loop
        // turn between the chunks.
        send(&mut c, &ClientFrame::ping(format!("{round}")));
        let pong = expect_frame(&mut c, "pong on the third connection");
        assert_eq!(pong.opcode, OP_PONG, "{pong:?}");
        assert_eq!(pong.payload, format!("{round}").into_bytes());
        round += 1;
    }
    expect_text(&mut a, &text, "interleaved connection A");
    expect_binary(&mut b, &bin, "interleaved connection B");
    server.assert_serving();
}

#[test]
fn large_backlog_is_echoed_completely_and_in_order() {
    let server = Server::echo(&[]);
    let mut reader = ws_raw(server.addr);
    let mut writer = reader.try_clone().expect("clone stream for the writer");
    const COUNT: u32 = 100;
    const SIZE: usize = 60_000;
    let message = |i: u32| {
        let mut m = pattern(SIZE);
        m[..4].copy_from_slice(&i.to_be_bytes());
        m
    };
    let handle = std::thread::spawn(move || {
        for i in 0..COUNT {
            // Blocks while the server applies backpressure; the main thread
            // keeps reading, so it must make progress.
            writer
                .write_all(&ClientFrame::binary(message(i)).encode())
                .unwrap_or_else(|e| panic!("writing message {i} failed: {e}"));
        }
    });
    for i in 0..COUNT {
        expect_binary(&mut reader, &message(i), &format!("backlog message {i}"));
    }
    handle.join().expect("writer thread panicked");
}

#[test]
fn invalid_utf8_in_later_unfinished_fragment_fails_fast() {
    let mut server = Server::echo(&[]);
    expect_close_after(
        server.addr,
        &[
            ClientFrame::text("fine so far").fin(false),
            ClientFrame::cont(b"\xff".to_vec()).fin(false),
        ],
        1007,
        "invalid byte in a non-final continuation",
    );
    expect_close_after(
        server.addr,
        &[
            ClientFrame::text(b"x\xe2".to_vec()).fin(false),
            ClientFrame::cont(b"\x28".to_vec()).fin(false),
        ],
        1007,
        "sequence broken across two unfinished fragments",
    );
    server.assert_serving();
}

#[test]
fn valid_but_unusual_utf8_is_accepted() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    for (bytes, what) in [
        (
            &b"\xef\xbf\xbe\xef\xbf\xbf"[..],
            "noncharacters U+FFFE U+FFFF",
        ),
        (&b"\xf4\x8f\xbf\xbf"[..], "U+10FFFF"),
        (&b"\x00\x7f"[..], "NUL and DEL"),
        (&b"\xef\xbb\xbfBOM"[..], "byte order mark"),
        (
            &b"\xed\x9f\xbf\xee\x80\x80"[..],
            "around the surrogate range",
        ),
    ] {
        send(&mut s, &ClientFrame::text(bytes));
        expect_text(&mut s, bytes, what);
    }
}

#[test]
fn data_after_client_close_is_ignored() {
    let server = Server::echo(&[]);
    let mut s = ws_raw(server.addr);
    let mut batch = ClientFrame::text("before").encode();
    batch.extend(ClientFrame::close(1000, b"").encode());
    batch.extend(ClientFrame::text("after close").encode());
    send_raw(&mut s, &batch);
    expect_text(&mut s, b"before", "echo before the close");
    expect_close(&mut s, 1000, "close with trailing data");
}

/// Chat mode (no `--echo`) runs the same codec: a few violations there.
#[test]
fn chat_mode_enforces_the_same_framing_rules() {
    let mut server = Server::start(&[]);
    let open = |name: &str| {
        let mut s = ws_raw_request(
            server.addr,
            &upgrade_request(&format!("/ws?username={name}"), &[]),
        );
        let welcome = expect_frame(&mut s, "chat welcome");
        assert_eq!(welcome.opcode, OP_TEXT, "welcome frame: {welcome:?}");
        assert!(
            String::from_utf8_lossy(&welcome.payload).contains("welcome"),
            "first chat message should be the welcome: {welcome:?}"
        );
        s
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            ClientFrame::text("{}").unmasked().encode(),
            1002,
            "unmasked",
        ),
        (ClientFrame::text("{}").rsv(0b100).encode(), 1002, "rsv1"),
        (ClientFrame::new(0x3, "").encode(), 1002, "reserved opcode"),
        (
            ClientFrame::ping(pattern(126)).encode(),
            1002,
            "oversized ping",
        ),
        (ClientFrame::cont("x").encode(), 1002, "orphan continuation"),
        (
            ClientFrame::text(b"\xff".to_vec()).encode(),
            1007,
            "invalid UTF-8",
        ),
        (
            ClientFrame::text(b"{\"type\":\"public\",\"body\":\"\xc3\x28".to_vec())
                .fin(false)
                .encode(),
            1007,
            "invalid UTF-8 in an unfinished message",
        ),
        (
            ClientFrame::text(Vec::new()).declared_len(1 << 20).header(),
            1009,
            "declared 1 MiB, header only",
        ),
        (
            ClientFrame::close(1004, b"").encode(),
            1002,
            "invalid close code",
        ),
        (
            ClientFrame::new(OP_CLOSE, vec![3]).encode(),
            1002,
            "1-byte close",
        ),
        (
            ClientFrame::close(4000, b"").encode(),
            4000,
            "valid close code",
        ),
    ];
    for (i, (bytes, code, what)) in cases.into_iter().enumerate() {
        let mut s = open(&format!("framer{i}"));
        let _ = s.write_all(&bytes);
        expect_close(&mut s, code, &format!("chat mode: {what}"));
    }
    server.assert_serving();
}

#[test]
fn absurd_declared_lengths_are_1009_even_with_a_big_limit() {
    let mut server = Server::echo(&["--max-message-size", "16777216"]);
    for declared in [(1u64 << 62), i64::MAX as u64, 16_777_217] {
        let mut s = ws_raw(server.addr);
        send_raw(
            &mut s,
            &ClientFrame::binary(Vec::new())
                .declared_len(declared)
                .header(),
        );
        expect_close(&mut s, 1009, &format!("declared length {declared}"));
    }
    // A fragmented message whose declared total overflows the limit.
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::text("a").fin(false));
    send_raw(
        &mut s,
        &ClientFrame::cont(Vec::new())
            .declared_len(i64::MAX as u64)
            .header(),
    );
    expect_close(&mut s, 1009, "continuation declaring i64::MAX");
    server.assert_serving();
}

#[test]
fn a_ping_sent_with_the_request_is_answered_after_the_101() {
    let server = Server::echo(&[]);
    let mut s = connect(server.addr);
    let mut bytes = upgrade_request("/ws", &[]).into_bytes();
    bytes.extend(ClientFrame::ping(b"hi".to_vec()).encode());
    send_raw(&mut s, &bytes);
    let head = read_response_head(&mut s);
    assert_eq!(head.status, 101, "the 101 comes first: {head:?}");
    let pong = expect_frame(&mut s, "pong after the 101");
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"hi"[..]));
}

#[test]
fn a_ping_flood_from_a_client_that_never_reads_does_not_stall_others() {
    let mut server = Server::start(&["--echo"]);
    let mut flooder = ws_raw(server.addr);
    let _ = flooder.set_write_timeout(Some(Duration::from_millis(500)));
    let ping = ClientFrame::ping(Vec::new()).encode();
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 20_000)
        .collect();
    // Up to 2.4 MB of pings; the flooder never reads its pongs.
    for _ in 0..20 {
        if flooder.write_all(&burst).is_err() {
            break;
        }
    }
    // Within the helpers' read timeouts: before pongs were coalesced, the
    // loop spent many seconds per turn reshuffling millions of queued pongs.
    server.assert_serving();
}
