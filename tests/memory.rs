//! What a peer can make the server hold, bounded per process: partial
//! messages in time (`--message-timeout`) and in bytes
//! (`--max-partial-bytes`), and everything together (`--memory-budget`),
//! through real sockets against `wschat --echo`.

mod common;
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// The address of `--metrics-listen 127.0.0.1:0`, from the server's log
/// (the chat's own address answers 503 to everyone while memory is short).
fn admin_addr(server: &Server) -> SocketAddr {
    server
        .logs()
        .iter()
        .find_map(|l| support::spawn::address_after(l, "metrics on "))
        .unwrap_or_else(|| panic!("no `metrics on` line: {:?}", server.logs()))
}

/// One sample's value from `/metrics` (`name` with its labels).
fn metric(admin: SocketAddr, name: &str) -> u64 {
    let resp = http_request(admin, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(resp.status, 200, "{resp:?}");
    let body = resp.body_str();
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{body}"))
}

/// Polls `/metrics` until `name` satisfies `ok` (at most 5 s).
fn wait_for_metric(admin: SocketAddr, name: &str, ok: impl Fn(u64) -> bool) -> u64 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let value = metric(admin, name);
        if ok(value) {
            return value;
        }
        assert!(Instant::now() < until, "{name} stayed at {value}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const PARTIAL: &str = "wschat_memory_held_bytes{kind=\"partial\"}";

fn text_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i + seed as usize) % 26) as u8)
        .collect()
}

/// Reads frames until the close frame, answering nothing; returns its code
/// and the pongs seen before it (chat events and server pings are skipped).
fn close_code_after_pongs(stream: &mut std::net::TcpStream, context: &str) -> (Option<u16>, usize) {
    let mut pongs = 0;
    loop {
        let frame = expect_frame(stream, context);
        match frame.opcode {
            OP_PONG => pongs += 1,
            OP_CLOSE => return (frame.close_code(), pongs),
            OP_TEXT | OP_PING => {}
            other => panic!("{context}: unexpected opcode {other:#x}"),
        }
    }
}

#[test]
fn in_the_chat_too_an_unfinished_message_is_closed_with_1008() {
    let server = Server::start(&["--message-timeout", "500ms"]);
    let mut s = ws_raw_request(server.addr, &upgrade_request("/ws?username=slow", &[]));
    send(
        &mut s,
        &ClientFrame::text(r#"{"type":"public","bo"#).fin(false),
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(900) {
        if s.write_all(&ClientFrame::ping("p").encode()).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, pongs) = close_code_after_pongs(&mut s, "unfinished chat message");
    assert_eq!(code, Some(1008));
    assert!(pongs >= 3, "{pongs} pongs");
}

#[test]
fn a_message_not_completed_within_the_timeout_is_closed_with_1008_whatever_the_pings() {
    let server = Server::echo(&[
        "--message-timeout",
        "600ms",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let mut slow = ws_raw(server.addr);
    let mut prompt = ws_raw(server.addr);
    let started = Instant::now();
    send(&mut slow, &ClientFrame::text("half a mess").fin(false));
    send(&mut prompt, &ClientFrame::text("in ").fin(false));
    // Pings keep the connection alive, but do not extend the message's time.
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        if slow.write_all(&ClientFrame::ping("p").encode()).is_err() {
            break; // closed by now: the close frame is waiting
        }
        pings += 1;
        if pings == 2 {
            // The other one completes its message in time.
            send(&mut prompt, &ClientFrame::cont("time").fin(true));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, pongs) = close_code_after_pongs(&mut slow, "unfinished message");
    assert_eq!(code, Some(1008), "after {pings} pings");
    assert!(
        pongs >= 3,
        "pings were answered until the deadline ({pongs} pongs)"
    );
    expect_eof(&mut slow);
    // A completed message stops its clock: the other connection lives on.
    expect_text(&mut prompt, b"in time", "completed in time");
    send(&mut prompt, &ClientFrame::text("still here"));
    expect_text(&mut prompt, b"still here", "past the timeout, idle");
    let admin = admin_addr(&server);
    assert_eq!(
        metric(
            admin,
            "wschat_memory_refusals_total{reason=\"message_timeout\"}"
        ),
        1
    );
}

/// Sends a ping and waits for its pong: the server has read everything sent
/// before it.
fn round_trip(stream: &mut std::net::TcpStream) {
    send(stream, &ClientFrame::ping("sync"));
    let frame = expect_frame(stream, "pong");
    assert_eq!(
        (frame.opcode, frame.payload.as_slice()),
        (OP_PONG, &b"sync"[..])
    );
}

#[test]
fn the_client_whose_partial_message_would_pass_the_bound_is_closed_and_the_others_finish() {
    const BOUND: u64 = 130_000;
    let server = Server::echo(&[
        "--max-partial-bytes",
        &BOUND.to_string(),
        "--max-message-size",
        "200000",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let admin = admin_addr(&server);
    let mut early: Vec<_> = (0..2).map(|_| ws_raw(server.addr)).collect();
    for (i, s) in early.iter_mut().enumerate() {
        send(s, &ClientFrame::text(text_of(30_000, i as u8)).fin(false));
        round_trip(s);
    }
    // 60,000 bytes held; up to twice that where a message's reads were cut
    // (buffers double as bytes arrive), still under the bound.
    let held = metric(admin, PARTIAL);
    assert!((60_000..=120_000).contains(&held), "{held}");

    // A third message that takes the held bytes past the bound.
    let mut late = ws_raw(server.addr);
    let over = (BOUND - held + 1) as usize;
    // The server may close as soon as the bytes are over the bound.
    let _ = late.write_all(&ClientFrame::text(text_of(over, 9)).fin(false).encode());
    let (code, _) = close_code_after_pongs(&mut late, "the newest partial message");
    assert_eq!(code, Some(1009));
    expect_eof(&mut late);
    assert_eq!(
        metric(
            admin,
            "wschat_memory_refusals_total{reason=\"partial_message\"}"
        ),
        1
    );

    // The earlier ones keep their room and finish.
    for (i, s) in early.iter_mut().enumerate() {
        send(s, &ClientFrame::cont(b"!".to_vec()));
        let mut expected = text_of(30_000, i as u8);
        expected.push(b'!');
        expect_text(s, &expected, "an earlier message, finished");
    }
    wait_for_metric(admin, PARTIAL, |held| held == 0);
    // And room is free again for a new one.
    let mut next = ws_raw(server.addr);
    send(&mut next, &ClientFrame::text(text_of(30_000, 3)).fin(false));
    send(&mut next, &ClientFrame::cont(b"?".to_vec()));
    let mut expected = text_of(30_000, 3);
    expected.push(b'?');
    expect_text(&mut next, &expected, "a message after the crowd");
}

/// Connects and reads what the server says first (nothing is sent, so a
/// refusal cannot be cut short by a reset).
fn answer_to_a_newcomer(addr: SocketAddr) -> Option<HttpResponse> {
    let mut s = connect(addr);
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    if s.peek(&mut [0u8; 1]).is_err() {
        return None; // accepted: the server waits for a request
    }
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let head = read_response_head(&mut s);
    Some(finish_error_response(&mut s, head))
}

#[test]
fn over_the_memory_budgets_high_mark_newcomers_get_503_until_the_pressure_drops() {
    // High mark: three quarters of 64 KiB, 49,152 bytes.
    let server = Server::echo(&[
        "--memory-budget",
        "65536",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let admin = admin_addr(&server);
    assert_eq!(metric(admin, "wschat_memory_budget_bytes"), 65_536);
    assert!(
        answer_to_a_newcomer(server.addr).is_none(),
        "accepted at first"
    );

    let mut heavy = ws_raw(server.addr);
    send(
        &mut heavy,
        &ClientFrame::text(text_of(50_000, 0)).fin(false),
    );
    wait_for_metric(admin, PARTIAL, |held| held >= 50_000);

    let refused = answer_to_a_newcomer(server.addr).expect("an answer over the high mark");
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.has_header("Retry-After"), "{refused:?}");
    assert_eq!(
        metric(admin, "wschat_memory_refusals_total{reason=\"connection\"}"),
        1
    );

    // The heavy client's message is finished and echoed: the pressure drops.
    send(&mut heavy, &ClientFrame::cont(b"".to_vec()));
    expect_text(&mut heavy, &text_of(50_000, 0), "the heavy message");
    wait_for_metric(admin, PARTIAL, |held| held == 0);
    assert!(
        answer_to_a_newcomer(server.addr).is_none(),
        "accepted again after the pressure dropped"
    );
    let mut s = ws_raw(server.addr);
    send(&mut s, &ClientFrame::text("welcome back"));
    expect_text(&mut s, b"welcome back", "a newcomer after the pressure");
}
