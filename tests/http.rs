//! Plain HTTP, WebSocket handshake, limits, origin checks, timeouts and
//! command-line handling of the `wschat` binary.

mod common;
mod support;

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use support::spawn::{self, AfterListening};

// ---------------------------------------------------------------------------
// Plain HTTP
// ---------------------------------------------------------------------------

#[test]
fn healthz_returns_ok_and_closes() {
    let mut server = Server::start(&[]);
    let resp = http_request(server.addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.version, 1, "response must be HTTP/1.1: {resp:?}");
    assert_eq!(resp.body_str().trim(), "ok", "{resp:?}");
    server.assert_serving();
}

#[test]
fn healthz_request_written_one_byte_at_a_time() {
    let server = Server::start(&[]);
    let mut s = connect(server.addr);
    write_bytewise(
        &mut s,
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nUser-Agent: bytewise\r\n\r\n",
        Duration::ZERO,
    );
    let head = read_response_head(&mut s);
    let resp = finish_error_response(&mut s, head);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body_str().trim(), "ok", "{resp:?}");
}

#[test]
fn root_serves_the_chat_page_and_metrics_are_prometheus_text() {
    let mut server = Server::start(&[]);
    let page = http_error(server.addr, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.header("content-type")
            .is_some_and(|v| v.starts_with("text/html")),
        "{page:?}"
    );
    assert!(
        page.body_str().contains("<html") || page.body_str().contains("<!doctype"),
        "{page:?}"
    );
    let metrics = http_error(server.addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    let body = metrics.body_str();
    assert!(
        body.contains("# TYPE wschat_open_connections gauge"),
        "{body}"
    );
    assert!(
        body.contains("wschat_connections_accepted_total "),
        "{body}"
    );
    server.assert_serving();
}

#[test]
fn unknown_paths_are_404() {
    let mut server = Server::start(&[]);
    for path in ["/nope", "/wsx", "/healthzz", "/ws/extra", "/index.html"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        let resp = http_error(server.addr, req.as_bytes());
        assert_eq!(resp.status, 404, "GET {path}: {resp:?}");
    }
    server.assert_serving();
}

#[test]
fn wrong_methods_are_405() {
    let mut server = Server::start(&[]);
    for (method, path) in [
        ("POST", "/healthz"),
        ("POST", "/ws"),
        ("PUT", "/healthz"),
        ("DELETE", "/ws"),
    ] {
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n");
        let resp = http_error(server.addr, req.as_bytes());
        assert_eq!(resp.status, 405, "{method} {path}: {resp:?}");
    }
    // A POST to /ws that otherwise looks like an upgrade is still a 405.
    let req = upgrade_request("/ws", &[]).replacen("GET", "POST", 1);
    let resp = http_error(server.addr, req.as_bytes());
    assert_eq!(resp.status, 405, "POST upgrade: {resp:?}");
    server.assert_serving();
}

#[test]
fn malformed_requests_are_400() {
    let mut server = Server::start(&[]);
    let cases: [&[u8]; 5] = [
        b"garbage\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: test\r\nthis line has no colon\r\n\r\n",
        b"GET /healthz HTTP/9.9.9\r\nHost: test\r\n\r\n",
        b"\x00\x01\x02\x03 / HTTP/1.1\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: test\r\nBad Header Name: x\r\n\r\n",
    ];
    for raw in cases {
        let resp = http_error(server.addr, raw);
        assert_eq!(
            resp.status,
            400,
            "request {:?}: {resp:?}",
            String::from_utf8_lossy(raw)
        );
    }
    server.assert_serving();
}

#[test]
fn oversized_request_head_is_431() {
    let mut server = Server::start(&[]);
    // Complete head, just above 8 KiB.
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let resp = http_error(server.addr, req.as_bytes());
    assert_eq!(resp.status, 431, "{resp:?}");

    // A head that never ends: the server must answer once it passes 8 KiB
    // instead of waiting for the blank line.
    let mut s = connect(server.addr);
    let mut partial = String::from("GET /ws HTTP/1.1\r\nHost: test\r\n");
    for i in 0..200 {
        partial.push_str(&format!("X-Filler-{i}: {}\r\n", "b".repeat(40)));
    }
    assert!(partial.len() > 8 * 1024 + 512);
    s.write_all(partial.as_bytes()).expect("write endless head");
    let head = read_response_head(&mut s);
    let resp = finish_error_response(&mut s, head);
    assert_eq!(resp.status, 431, "endless head: {resp:?}");
    server.assert_serving();
}

#[test]
fn head_size_boundary_is_8_kib() {
    let mut server = Server::start(&[]);
    let head = |total: usize| {
        let start = "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: ";
        let end = "\r\n\r\n";
        format!(
            "{start}{}{end}",
            "p".repeat(total - start.len() - end.len())
        )
    };
    // Exactly 8192 bytes including the blank line: not more than 8 KiB.
    let req = head(8192);
    assert_eq!(req.len(), 8192);
    let resp = http_request(server.addr, req.as_bytes());
    assert_eq!(resp.status, 200, "8192-byte head: {resp:?}");
    // 8193 bytes even without counting the final CRLFCRLF.
    let req = head(8197);
    let resp = http_error(server.addr, req.as_bytes());
    assert_eq!(resp.status, 431, "8197-byte head: {resp:?}");
    server.assert_serving();
}

#[test]
fn head_just_under_the_limit_is_accepted() {
    let server = Server::start(&[]);
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(7000)
    );
    let resp = http_request(server.addr, req.as_bytes());
    assert_eq!(resp.status, 200, "7 KiB head must be fine: {resp:?}");
}

// ---------------------------------------------------------------------------
// WebSocket handshake
// ---------------------------------------------------------------------------

#[test]
fn upgrade_succeeds_with_rfc_sample_key() {
    let mut server = Server::echo(&[]);
    let mut s = connect(server.addr);
    s.write_all(upgrade_request("/ws", &[]).as_bytes())
        .expect("write upgrade");
    let resp = read_response_head(&mut s);
    assert_switching(&resp, SAMPLE_KEY);
    assert_eq!(
        resp.header("Sec-WebSocket-Accept"),
        Some(SAMPLE_ACCEPT),
        "RFC 6455 sample accept value"
    );
    // The connection is now a WebSocket: a close is answered and the server
    // closes the TCP connection.
    send(&mut s, &ClientFrame::close(1000, b""));
    expect_close(&mut s, 1000, "close after plain upgrade");
    server.assert_serving();
}

#[test]
fn upgrade_with_query_string() {
    let server = Server::echo(&[]);
    let mut s = ws_raw_request(server.addr, &upgrade_request("/ws?username=alice", &[]));
    send(&mut s, &ClientFrame::close(1000, b""));
    expect_close(&mut s, 1000, "close after upgrade with query");
}

#[test]
fn upgrade_headers_are_case_insensitive() {
    let server = Server::start(&[]);
    let key = base64_encode(b"0123456789abcdef");
    let req = raw_request(
        "GET /ws HTTP/1.1",
        &[
            "host: 127.0.0.1",
            "upgrade: WebSocket",
            "CONNECTION: keep-alive, Upgrade",
            &format!("sec-websocket-key: {key}"),
            "SEC-WEBSOCKET-VERSION: 13",
        ],
    );
    let resp = http_request(server.addr, req.as_bytes());
    assert_switching(&resp, &key);
}

#[test]
fn connection_header_token_list_variants() {
    let server = Server::start(&[]);
    for conn in [
        "Upgrade",
        "upgrade",
        "keep-alive, Upgrade",
        "Upgrade, keep-alive",
        "keep-alive,upgrade",
    ] {
        let key = base64_encode(
            conn.as_bytes()
                .iter()
                .cycle()
                .take(16)
                .copied()
                .collect::<Vec<u8>>()
                .as_slice(),
        );
        let req = raw_request(
            "GET /ws HTTP/1.1",
            &[
                "Host: 127.0.0.1",
                "Upgrade: websocket",
                &format!("Connection: {conn}"),
                &format!("Sec-WebSocket-Key: {key}"),
                "Sec-WebSocket-Version: 13",
            ],
        );
        let resp = http_request(server.addr, req.as_bytes());
        assert!(resp.status == 101, "Connection: {conn}: {resp:?}");
        assert_switching(&resp, &key);
    }
}

#[test]
fn accept_key_matches_for_random_keys() {
    let server = Server::start(&[]);
    for seed in 0u8..5 {
        let raw: Vec<u8> = (0..16u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(seed.wrapping_mul(101)))
            .collect();
        let key = base64_encode(&raw);
        let req = raw_request(
            "GET /ws HTTP/1.1",
            &[
                "Host: 127.0.0.1",
                "Upgrade: websocket",
                "Connection: Upgrade",
                &format!("Sec-WebSocket-Key: {key}"),
                "Sec-WebSocket-Version: 13",
            ],
        );
        let resp = http_request(server.addr, req.as_bytes());
        assert_switching(&resp, &key);
    }
}

#[test]
fn offered_subprotocols_and_extensions_are_not_accepted() {
    let mut server = Server::echo(&[]);
    let req = upgrade_request(
        "/ws",
        &[
            "Sec-WebSocket-Protocol: chat, superchat",
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        ],
    );
    // ws_raw_request asserts neither header is in the 101.
    let mut s = ws_raw_request(server.addr, &req);
    // And no compression is in effect: a plain frame is echoed plainly.
    send(&mut s, &ClientFrame::text("uncompressed"));
    expect_text(&mut s, b"uncompressed", "echo after offering extensions");
    server.assert_serving();
}

#[test]
fn bad_websocket_keys_are_400() {
    let mut server = Server::start(&[]);
    let fifteen = base64_encode(&[7u8; 15]);
    let seventeen = base64_encode(&[7u8; 17]);
    let bad_keys = [
        "abc",
        fifteen.as_str(),
        seventeen.as_str(),
        "!!!!!!!!!!!!!!!!!!!!!!==",
        "dGhlIHNhbXBsZSBub25jZQ=*", // invalid character
        "",
    ];
    for key in bad_keys {
        let req = raw_request(
            "GET /ws HTTP/1.1",
            &[
                "Host: 127.0.0.1",
                "Upgrade: websocket",
                "Connection: Upgrade",
                &format!("Sec-WebSocket-Key: {key}"),
                "Sec-WebSocket-Version: 13",
            ],
        );
        let resp = http_error(server.addr, req.as_bytes());
        assert_eq!(resp.status, 400, "key {key:?}: {resp:?}");
    }
    // No key at all.
    let req = raw_request(
        "GET /ws HTTP/1.1",
        &[
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
        ],
    );
    let resp = http_error(server.addr, req.as_bytes());
    assert_eq!(resp.status, 400, "missing key: {resp:?}");
    server.assert_serving();
}

#[test]
fn unsupported_websocket_version_is_426() {
    let mut server = Server::start(&[]);
    for version in ["8", "12", "14", "abc"] {
        let req = raw_request(
            "GET /ws HTTP/1.1",
            &[
                "Host: 127.0.0.1",
                "Upgrade: websocket",
                "Connection: Upgrade",
                &format!("Sec-WebSocket-Key: {SAMPLE_KEY}"),
                &format!("Sec-WebSocket-Version: {version}"),
            ],
        );
        let resp = http_error(server.addr, req.as_bytes());
        assert_eq!(resp.status, 426, "version {version}: {resp:?}");
        assert_eq!(
            resp.header("Sec-WebSocket-Version"),
            Some("13"),
            "426 must advertise version 13: {resp:?}"
        );
    }
    server.assert_serving();
}

#[test]
fn missing_websocket_version_is_rejected() {
    let server = Server::start(&[]);
    let req = raw_request(
        "GET /ws HTTP/1.1",
        &[
            "Host: 127.0.0.1",
            "Upgrade: websocket",
            "Connection: Upgrade",
            &format!("Sec-WebSocket-Key: {SAMPLE_KEY}"),
        ],
    );
    let resp = http_error(server.addr, req.as_bytes());
    assert!(
        resp.status == 426 || resp.status == 400,
        "missing version should be 426 (or 400): {resp:?}"
    );
}

#[test]
fn incomplete_upgrade_requests_are_rejected() {
    let mut server = Server::start(&[]);
    let key = format!("Sec-WebSocket-Key: {SAMPLE_KEY}");
    let cases: Vec<(&str, String)> = vec![
        (
            "missing Upgrade",
            raw_request(
                "GET /ws HTTP/1.1",
                &[
                    "Host: x",
                    "Connection: Upgrade",
                    &key,
                    "Sec-WebSocket-Version: 13",
                ],
            ),
        ),
        (
            "Upgrade is not websocket",
            raw_request(
                "GET /ws HTTP/1.1",
                &[
                    "Host: x",
                    "Upgrade: h2c",
                    "Connection: Upgrade",
                    &key,
                    "Sec-WebSocket-Version: 13",
                ],
            ),
        ),
        (
            "Connection lacks upgrade",
            raw_request(
                "GET /ws HTTP/1.1",
                &[
                    "Host: x",
                    "Upgrade: websocket",
                    "Connection: keep-alive",
                    &key,
                    "Sec-WebSocket-Version: 13",
                ],
            ),
        ),
        (
            "Connection token is only a substring",
            raw_request(
                "GET /ws HTTP/1.1",
                &[
                    "Host: x",
                    "Upgrade: websocket",
                    "Connection: upgradeish",
                    &key,
                    "Sec-WebSocket-Version: 13",
                ],
            ),
        ),
        (
            "missing Connection",
            raw_request(
                "GET /ws HTTP/1.1",
                &[
                    "Host: x",
                    "Upgrade: websocket",
                    &key,
                    "Sec-WebSocket-Version: 13",
                ],
            ),
        ),
        (
            "missing Host",
            raw_request(
                "GET /ws HTTP/1.1",
                &[
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    &key,
                    "Sec-WebSocket-Version: 13",
                ],
            ),
        ),
        (
            "HTTP/1.0",
            raw_request(
                "GET /ws HTTP/1.0",
                &[
                    "Host: x",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    &key,
                    "Sec-WebSocket-Version: 13",
                ],
            ),
        ),
    ];
    for (what, req) in cases {
        let resp = http_error(server.addr, req.as_bytes());
        assert!(
            (400..500).contains(&resp.status) || resp.status == 505,
            "{what}: expected a 4xx rejection, got {resp:?}"
        );
    }
    server.assert_serving();
}

#[test]
fn upgrade_written_one_byte_at_a_time_then_echo() {
    let mut server = Server::echo(&[]);
    let mut s = connect(server.addr);
    let req = upgrade_request("/ws?username=slow", &["User-Agent: bytewise-test"]);
    write_bytewise(&mut s, req.as_bytes(), Duration::from_micros(200));
    let resp = read_response_head(&mut s);
    assert_switching(&resp, SAMPLE_KEY);
    send(&mut s, &ClientFrame::text("after a slow handshake"));
    expect_text(
        &mut s,
        b"after a slow handshake",
        "echo after bytewise handshake",
    );
    server.assert_serving();
}

// ---------------------------------------------------------------------------
// Origin
// ---------------------------------------------------------------------------

#[test]
fn disallowed_origin_is_403() {
    let mut server = Server::echo(&["--allowed-origin", "http://a.example"]);
    for origin in [
        "http://b.example",
        "http://a.example.evil",
        "https://a.example",
        "null",
    ] {
        let req = upgrade_request("/ws", &[&format!("Origin: {origin}")]);
        let resp = http_error(server.addr, req.as_bytes());
        assert_eq!(resp.status, 403, "Origin {origin}: {resp:?}");
    }
    server.assert_serving();
}

#[test]
fn allowed_origin_and_missing_origin_are_accepted() {
    let server = Server::echo(&["--allowed-origin", "http://a.example"]);
    let mut s = ws_raw_request(
        server.addr,
        &upgrade_request("/ws", &["Origin: http://a.example"]),
    );
    send(&mut s, &ClientFrame::text("from a.example"));
    expect_text(&mut s, b"from a.example", "echo with allowed origin");

    let mut s = ws_raw_request(server.addr, &upgrade_request("/ws", &[]));
    send(&mut s, &ClientFrame::text("no origin"));
    expect_text(&mut s, b"no origin", "echo without origin");
}

#[test]
fn several_allowed_origins() {
    let server = Server::start(&[
        "--allowed-origin",
        "http://a.example",
        "--allowed-origin",
        "http://b.example:8080",
    ]);
    for origin in ["http://a.example", "http://b.example:8080"] {
        let req = upgrade_request("/ws", &[&format!("Origin: {origin}")]);
        let resp = http_request(server.addr, req.as_bytes());
        assert_switching(&resp, SAMPLE_KEY);
    }
    let req = upgrade_request("/ws", &["Origin: http://b.example"]);
    let resp = http_error(server.addr, req.as_bytes());
    assert_eq!(
        resp.status, 403,
        "port differs from the allowed one: {resp:?}"
    );
}

// ---------------------------------------------------------------------------
// Timeouts and slow clients
// ---------------------------------------------------------------------------

#[test]
fn idle_connection_is_closed_after_handshake_timeout() {
    let mut server = Server::echo(&["--handshake-timeout", "300ms"]);
    let start = Instant::now();
    let mut s = connect(server.addr);
    let _ = read_until_closed(&mut s, Duration::from_secs(5));
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200),
        "closed after only {elapsed:?}, before the 300ms handshake timeout"
    );
    server.assert_serving();
}

#[test]
fn partial_request_is_closed_after_handshake_timeout() {
    let mut server = Server::echo(&["--handshake-timeout", "300ms"]);
    let start = Instant::now();
    let mut s = connect(server.addr);
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        .expect("write partial request");
    // The server may or may not answer (e.g. 408) before closing; it must
    // close.
    let _ = read_until_closed(&mut s, Duration::from_secs(5));
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200),
        "closed after only {elapsed:?}, before the 300ms handshake timeout"
    );
    server.assert_serving();
}

#[test]
fn trickling_request_is_still_closed_after_handshake_timeout() {
    // A client that keeps sending a byte now and then must not extend the
    // handshake deadline forever.
    let server = Server::start(&["--handshake-timeout", "300ms"]);
    let mut s = connect(server.addr);
    let start = Instant::now();
    let filler = b"GET /ws HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for b in filler.iter() {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    if !closed {
        let _ = read_until_closed(&mut s, Duration::from_secs(3));
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "trickling client kept the connection open for {:?}",
        start.elapsed()
    );
}

#[test]
fn handshake_timeout_does_not_affect_upgraded_connections() {
    let server = Server::echo(&["--handshake-timeout", "300ms"]);
    let mut ws = ws_client(server.addr, "/ws");
    // Wait (on an event, not a sleep) for a connection opened after the
    // WebSocket to be closed by the handshake timeout: the WebSocket is then
    // older than the timeout.
    let mut idle = connect(server.addr);
    let _ = read_until_closed(&mut idle, Duration::from_secs(5));
    ws.send(tungstenite::Message::text("still here"))
        .expect("send after the handshake timeout elapsed");
    match read_data(&mut ws, "echo after handshake timeout elapsed") {
        tungstenite::Message::Text(t) => assert_eq!(t.as_str(), "still here"),
        other => panic!("unexpected message {other:?}"),
    }
    close_client(ws);
}

#[test]
fn slowloris_does_not_block_real_clients() {
    let mut server = Server::echo(&[]);
    let mut half_open = Vec::new();
    for i in 0..200 {
        let mut s = connect(server.addr);
        s.write_all(
            format!("GET /ws?n={i} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
                .as_bytes(),
        )
        .expect("write half request");
        half_open.push(s);
    }
    let start = Instant::now();
    server.assert_serving();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "real client took {:?} with 200 half-open requests",
        start.elapsed()
    );
    drop(half_open);
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

fn assert_usage_error(args: &[&str]) {
    let exit = run_to_exit(args);
    assert_eq!(
        exit.status.code(),
        Some(2),
        "wschat {args:?} should exit with code 2: {exit:?}"
    );
    assert!(
        !exit.stderr.contains("panicked"),
        "wschat {args:?} panicked: {}",
        exit.stderr
    );
    assert_eq!(
        exit.stderr_lines().len(),
        1,
        "wschat {args:?} should print exactly one line on stderr, got:\n{}",
        exit.stderr
    );
}

#[test]
fn bad_flags_exit_with_code_2() {
    let l = ["--listen", "127.0.0.1:0"];
    let cases: Vec<Vec<&str>> = vec![
        vec!["--bogus"],
        vec!["--listen"],
        vec!["--listen", "not-an-address"],
        vec!["--listen", "127.0.0.1:70000"],
        vec![l[0], l[1], "--bogus"],
        vec![l[0], l[1], "extra-positional"],
        vec![l[0], l[1], "--max-message-size"],
        vec![l[0], l[1], "--max-message-size", "abc"],
        vec![l[0], l[1], "--max-message-size", "-5"],
        vec![l[0], l[1], "--handshake-timeout", "10x"],
        vec![l[0], l[1], "--handshake-timeout", "ms"],
        vec![l[0], l[1], "--handshake-timeout", ""],
        vec![l[0], l[1], "--close-timeout", "-1s"],
        vec![l[0], l[1], "--close-timeout", "1.5.2s"],
        vec![l[0], l[1], "--max-connections", "many"],
        vec![l[0], l[1], "--log", "loud"],
        vec![l[0], l[1], "--log"],
        vec![l[0], l[1], "--allowed-origin"],
    ];
    for args in cases {
        assert_usage_error(&args);
    }
}

#[test]
fn port_in_use_exits_with_code_2() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let addr = taken.local_addr().expect("local addr").to_string();
    assert_usage_error(&["--listen", &addr]);
    drop(taken);
}

/// A server whose log reader has gone (`wschat 2>&1 | head`, a crashed log
/// shipper) must keep serving: the next log line meets a broken pipe, which
/// has to be a failed write, not a SIGPIPE that ends the process.
#[test]
fn a_closed_log_pipe_does_not_stop_the_server() {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(spawn::TEST_FLAGS).args(["--log", "info"]);
    let mut server = spawn::start_command(cmd, AfterListening::ClosePipe);
    let addr = server.addr;
    // Each request is logged at info (`open #N`), into the closed pipe.
    for attempt in 0..3 {
        let status = server.child.try_wait().expect("try_wait on wschat");
        assert_eq!(
            status, None,
            "wschat exited after its log pipe closed (attempt {attempt})"
        );
        let resp = http_request(addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(
            resp.status, 200,
            "healthz after closing the log pipe, attempt {attempt}"
        );
    }
}

/// Arguments are read from `argv` by the binary itself (it has no Rust
/// runtime): one that is not UTF-8 is a usage error, not a panic.
#[test]
fn a_non_utf8_argument_is_a_usage_error() {
    use std::os::unix::ffi::OsStrExt;
    let output = std::process::Command::new(bin())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(std::ffi::OsStr::from_bytes(b"dir-\xff"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the wschat binary");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr.trim(),
        "wschat: argument 4 is not UTF-8 (see --help)"
    );
}

#[test]
fn duration_forms_are_accepted() {
    for (hs, close) in [("10", "10s"), ("10s", "500ms"), ("500ms", "10")] {
        let mut server = Server::echo(&["--handshake-timeout", hs, "--close-timeout", close]);
        server.assert_serving();
    }
}

#[test]
fn every_log_level_is_accepted_and_prints_listening() {
    for level in ["debug", "info", "warn", "error"] {
        let mut server = Server::echo(&["--log", level]);
        server.assert_serving();
    }
}

#[test]
fn numeric_limits_are_accepted() {
    let mut server = Server::echo(&["--max-connections", "50", "--max-message-size", "1000"]);
    server.assert_serving();
}

#[test]
fn listening_line_reports_the_real_port() {
    let server = Server::start(&[]);
    assert_ne!(server.port(), 0, "listening line must show the bound port");
    assert!(
        server
            .logs()
            .iter()
            .any(|l| l.contains(&format!("listening on {}", server.addr))),
        "logs: {:?}",
        server.logs()
    );
}

#[test]
fn connections_beyond_max_connections_get_503() {
    let server = Server::echo(&["--max-connections", "2"]);
    let a = ws_client(server.addr, "/ws");
    let mut b = ws_client(server.addr, "/ws");
    let resp = http_error(server.addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(
        resp.status, 503,
        "third connection with --max-connections 2: {resp:?}"
    );
    // The connections that were in first are unaffected.
    b.send(tungstenite::Message::text("b still works"))
        .expect("send on b");
    match read_data(&mut b, "echo on b at the limit") {
        tungstenite::Message::Text(t) => assert_eq!(t.as_str(), "b still works"),
        other => panic!("unexpected {other:?}"),
    }
    // Once one leaves (its close handshake completed, TCP closed by the
    // server), there is room again. Poll briefly: the server counts a socket
    // until it has seen our FIN, which races with the next connect.
    close_client(a);
    wait_for_room(&server);
    close_client(b);
    wait_for_room(&server);
}

/// Polls `/healthz` until it answers 200 (not 503), for at most a second.
fn wait_for_room(server: &Server) {
    let mut last = None;
    for _ in 0..40 {
        let resp = http_request(server.addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
        if resp.status == 200 {
            return;
        }
        last = Some(resp);
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("no room after a client left: {last:?}");
}

#[test]
fn slowloris_at_the_connection_limit_evicts_the_oldest_handshake() {
    let server = Server::echo(&["--max-connections", "20"]);
    let mut half_open = Vec::new();
    for i in 0..20 {
        let mut s = connect(server.addr);
        s.write_all(format!("GET /ws?n={i} HTTP/1.1\r\nHost: 127.0.0.1\r\n").as_bytes())
            .expect("write half request");
        half_open.push(s);
    }
    // The server is full of unfinished handshakes (accepted in connect
    // order); a real client still gets in, by evicting the oldest one.
    let mut ws = ws_client(server.addr, "/ws");
    ws.send(tungstenite::Message::text("made it"))
        .expect("send with the server full of half-open requests");
    match read_data(&mut ws, "echo at the connection limit") {
        tungstenite::Message::Text(t) => assert_eq!(t.as_str(), "made it"),
        other => panic!("unexpected {other:?}"),
    }
    // The oldest half-open request is the one that was evicted.
    let _ = read_until_closed(&mut half_open[0], Duration::from_secs(5));
    close_client(ws);
}
