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

/// Sends a HEAD for `path`; returns the head and whatever followed it
/// before the server closed the connection (nothing, for a HEAD).
fn head_request(addr: std::net::SocketAddr, path: &str) -> (HttpResponse, Vec<u8>) {
    let mut s = connect(addr);
    let request = format!("HEAD {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    s.write_all(request.as_bytes()).expect("write HEAD request");
    let head = read_response_head(&mut s);
    let rest = read_until_closed(&mut s, IO_TIMEOUT);
    (head, rest)
}

#[test]
fn head_answers_like_get_without_a_body() {
    let mut server = Server::start(&[]);
    for path in ["/", "/healthz", "/metrics"] {
        let get = http_request(
            server.addr,
            format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
        );
        let (head, rest) = head_request(server.addr, path);
        assert_eq!(head.status, get.status, "HEAD {path}: {head:?}");
        assert!(
            rest.is_empty(),
            "HEAD {path} sent a body of {} bytes",
            rest.len()
        );
        for name in ["Content-Type", "Connection", "Cache-Control"] {
            assert_eq!(head.header(name), get.header(name), "HEAD {path}: {name}");
        }
        let length: usize = head
            .header("Content-Length")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("HEAD {path} has no Content-Length: {head:?}"));
        if path == "/metrics" {
            // Counters move between the two requests: only the size's order is the same.
            assert!(length > 1000, "HEAD /metrics: Content-Length {length}");
        } else {
            assert_eq!(
                length,
                get.body.len(),
                "HEAD {path}: the GET's Content-Length"
            );
        }
    }
    server.assert_serving();
}

/// `/healthz`'s status, read from the raw bytes: a connection the server
/// drops instead (one that was in its handshake when the signal came) is `None`.
fn healthz_status(addr: std::net::SocketAddr) -> Option<u16> {
    let mut s = connect(addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .ok()?;
    let response = read_until_closed(&mut s, IO_TIMEOUT);
    let status = response.strip_prefix(b"HTTP/1.1 ")?.get(..3)?;
    std::str::from_utf8(status).ok()?.parse().ok()
}

#[test]
fn healthz_is_503_while_shutting_down() {
    let mut server = Server::start(&["--shutdown-timeout", "5s"]);
    // A client that does not answer the server's close keeps it shutting
    // down (until it answers, or for --shutdown-timeout).
    let mut keeper = ws_client(server.addr, "/ws?username=keeper");
    assert_eq!(healthz_status(server.addr), Some(200));
    server.terminate();
    let deadline = Instant::now() + Duration::from_secs(3);
    while healthz_status(server.addr) != Some(503) {
        assert!(
            Instant::now() < deadline,
            "/healthz never said 503 after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let health = http_error(server.addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(
        (health.status, health.body_str().trim()),
        (503, "shutting down")
    );
    let (head, rest) = head_request(server.addr, "/healthz");
    assert_eq!(head.status, 503, "{head:?}");
    assert!(rest.is_empty(), "HEAD sent a body");
    assert_eq!(head.header("Content-Length"), Some("14"), "{head:?}");
    // New WebSocket clients are refused rather than opened and closed.
    let late = http_error(
        server.addr,
        upgrade_request("/ws?username=late", &[]).as_bytes(),
    );
    assert_eq!(late.status, 503, "{late:?}");

    // The keeper answers the 1001 close; with no client left the server exits.
    let mut close_code = None;
    loop {
        match keeper.read() {
            Ok(tungstenite::Message::Close(frame)) => {
                close_code = frame.map(|f| u16::from(f.code));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(close_code, Some(1001));
    // Like any real client, it lets go of the socket the server has ended.
    drop(keeper);
    let status = server.exit_within(Duration::from_secs(4));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "exit after the last client left: {status:?}; stderr:\n{}",
        server.logs().join("\n")
    );
}

#[test]
fn metrics_include_process_figures_and_the_version() {
    let server = Server::start(&[]);
    let metrics = http_error(server.addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    let body = metrics.body_str();
    let value = |name: &str| -> f64 {
        assert!(
            body.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}:\n{body}"
        );
        body.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample of {name}:\n{body}"))
    };
    assert!(value("process_resident_memory_bytes") > 100_000.0);
    assert!(value("process_max_fds") > 0.0);
    // stdio, the listener, the poll, the signal pipe and this connection.
    assert!(value("process_open_fds") >= 5.0);
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(
        (now - started).abs() < 3600.0,
        "started {started}, now {now}"
    );
    let build = format!(
        "wschat_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    assert!(body.contains(&build), "{body}");
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
    // From one address: the per-address limits would refuse most of the
    // attack; this is about what the handshake deadline alone does.
    let mut server = Server::echo(&[
        "--max-connections-per-ip",
        "0",
        "--max-handshakes-per-ip",
        "0",
    ]);
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

/// Runs wschat with `args` to its exit; returns its status code and stdout.
fn stdout_of(args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the wschat binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn version_prints_the_package_version() {
    let expected = format!("wschat {}\n", env!("CARGO_PKG_VERSION"));
    for flag in ["--version", "-V"] {
        assert_eq!(stdout_of(&[flag]), (Some(0), expected.clone()), "{flag}");
    }
}

#[test]
fn help_names_each_option_variable() {
    let (code, help) = stdout_of(&["--help"]);
    assert_eq!(code, Some(0));
    for var in [
        "WSCHAT_LISTEN",
        "WSCHAT_ECHO",
        "WSCHAT_MAX_OUTBOUND",
        "WSCHAT_LOG",
    ] {
        assert!(
            help.contains(&format!("[env: {var}]")),
            "{var} missing:\n{help}"
        );
    }
}

/// The `listening on` line states the connection limit and the mode.
fn listening_line(server: &Server) -> String {
    server
        .logs()
        .into_iter()
        .find(|line| line.contains("listening on"))
        .expect("the listening line")
}

#[test]
fn environment_variables_set_options_and_flags_win() {
    let from_env = Server::start_in(
        &[("WSCHAT_MAX_CONNECTIONS", "7"), ("WSCHAT_ECHO", "true")],
        &[],
    );
    let line = listening_line(&from_env);
    assert!(
        line.contains("max 7 connections") && line.contains("echo mode"),
        "{line}"
    );

    let env = [
        ("WSCHAT_MAX_CONNECTIONS", "7"),
        ("WSCHAT_LISTEN", "not-an-address"),
    ];
    let flagged = Server::start_in(&env, &["--max-connections", "9"]);
    // --max-connections beats its variable; --listen (given by Server) beats a
    // variable that would not even parse.
    let line = listening_line(&flagged);
    assert!(line.contains("max 9 connections"), "{line}");
}

#[test]
fn a_bad_environment_variable_exits_2_naming_it() {
    let args = ["--listen", "127.0.0.1:0", "--data-dir", "none"];
    for (var, value) in [
        ("WSCHAT_MAX_BODY", "lots"),
        ("WSCHAT_ECHO", "yes"),
        ("WSCHAT_HANDSHAKE_TIMEOUT", "soon"),
    ] {
        let exit = run_to_exit_in(&[(var, value)], &args);
        assert_eq!(exit.status.code(), Some(2), "{var}={value}: {exit:?}");
        let lines = exit.stderr_lines();
        assert_eq!(lines.len(), 1, "{var}={value}: {exit:?}");
        assert!(
            lines[0].contains(&format!("{var}: '{value}'")),
            "{}",
            lines[0]
        );
    }
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
    let resp = http_error(server.addr, upgrade_request("/ws", &[]).as_bytes());
    assert_eq!(
        resp.status, 503,
        "third connection with --max-connections 2: {resp:?}"
    );
    assert_eq!(resp.header("Retry-After"), Some("1"), "{resp:?}");
    // Health checks still get their answer (in the sockets kept for them).
    let health = http_request(server.addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(health.status, 200, "/healthz at the limit: {health:?}");
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

/// Tries upgrades until one is let in (101, not 503), for at most a second.
fn wait_for_room(server: &Server) {
    let mut last = None;
    for _ in 0..40 {
        let resp = http_request(server.addr, upgrade_request("/ws", &[]).as_bytes());
        if resp.status == 101 {
            return;
        }
        last = Some(resp);
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("no room after a client left: {last:?}");
}

#[test]
fn slowloris_at_the_connection_limit_evicts_the_oldest_handshake() {
    let server = Server::echo(&["--max-connections", "20", "--max-handshakes-per-ip", "0"]);
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
