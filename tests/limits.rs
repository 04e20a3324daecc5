//! The limits one client cannot escape, through real sockets: the message
//! rate, connections and handshakes per address, the sockets kept for
//! health checks at --max-connections, and X-Forwarded-For from a trusted
//! proxy. A second client address is 127.0.0.2 (Linux routes all of
//! 127/8 to loopback): the client socket is bound to it before connecting.

mod chat_support;
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use chat_support::{client_frame, Chat, ChatServer, Raw, IO_TIMEOUT, OP_CLOSE, OP_PING, OP_TEXT};
use serde_json::{json, Value};

const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Where `/metrics` and `/healthz` are asked from: an address of its own,
/// as an operator's scraper would have (or `--metrics-listen`).
const OPERATOR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// A TCP connection to `addr` from `source` (port chosen by the kernel),
/// with the suite's timeouts.
fn connect_from(source: Ipv4Addr, addr: SocketAddr) -> TcpStream {
    let stream = support::source::connect_from(source, addr);
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    stream
}

/// Sends an upgrade request (plus `extra` header lines) on `stream` and
/// reads the answer's head: the status, and the whole head for messages.
/// The stream stays open (on a 101 it is a WebSocket).
fn upgrade(stream: &mut TcpStream, path: &str, extra: &[&str]) -> (u16, String) {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .expect("write the request");
    read_head(stream)
}

/// Reads an HTTP answer's head byte by byte (nothing after it is taken).
fn read_head(stream: &mut TcpStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "reading an answer (so far {:?}): {e}",
                String::from_utf8_lossy(&head)
            ),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, head)
}

/// `GET path` on a fresh connection: the status and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = connect_from(OPERATOR, addr);
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .expect("write");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// The value of a counter line (`name{labels} value`) in `/metrics`.
fn metric(addr: SocketAddr, line_start: &str) -> u64 {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{body}"))
}

/// Reads JSON messages until `done` says stop; returns them all.
fn read_until(c: &mut Chat, context: &str, mut done: impl FnMut(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = c.recv(context);
        let stop = done(&v);
        seen.push(v);
        if stop {
            return seen;
        }
    }
}

#[test]
fn a_flood_past_the_burst_is_refused_and_nothing_more_reaches_a_bystander() {
    let server = ChatServer::start(&["--rate-limit", "1", "--rate-burst", "5"]);
    let mut bob = Chat::joined(server.addr, "bob");
    let mut alice = Chat::joined(server.addr, "alice");
    bob.recv_type("join", "alice arrives");
    let started = Instant::now();
    let sent = 12;
    for i in 1..=sent {
        alice.send(json!({"type": "private", "to": "bob", "body": format!("p{i}"), "ref": i}));
    }
    // One answer per message, in order: receipts, then rate_limited errors.
    let answers = read_until(&mut alice, "answers to the flood", |v| {
        v["ref"] == json!(sent)
    });
    let answers: Vec<&Value> = answers.iter().filter(|v| v["ref"].is_u64()).collect();
    assert_eq!(answers.len(), sent as usize, "{answers:?}");
    let delivered = answers.iter().filter(|v| v["type"] == "receipt").count();
    // The burst, plus what one message a second refilled meanwhile.
    let most = 5 + started.elapsed().as_secs() as usize;
    assert!(
        (5..=most).contains(&delivered),
        "{delivered} delivered: {answers:?}"
    );
    for (i, refused) in answers[delivered..].iter().enumerate() {
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["code"], "rate_limited", "{refused}");
        assert_eq!(refused["ref"], json!(delivered + i + 1), "{refused}");
        let wait = refused["retry_after_ms"].as_u64().expect("retry_after_ms");
        assert!((1..=1000).contains(&wait), "{refused}");
    }
    // bob got exactly the admitted ones: the answer to his own request
    // comes after everything queued for him before it.
    bob.send(json!({"type": "users"}));
    let got = read_until(&mut bob, "bob's privates", |v| v["type"] == "users");
    let bodies: Vec<&Value> = got
        .iter()
        .filter(|v| v["type"] == "private")
        .map(|v| &v["body"])
        .collect();
    let expected: Vec<Value> = (1..=delivered).map(|i| json!(format!("p{i}"))).collect();
    assert_eq!(bodies, expected.iter().collect::<Vec<_>>());
    assert_eq!(
        metric(server.addr, "wschat_rate_limited_total "),
        (sent as usize - delivered) as u64
    );
}

#[test]
fn a_sender_that_waits_as_told_is_never_closed() {
    // 100/s, no burst: a sender that sends as fast as it can and waits
    // retry_after_ms after each refusal is refused about every other
    // message, far more than 50 times, and must not be closed for it.
    let server = ChatServer::start(&["--rate-limit", "100", "--rate-burst", "1"]);
    let mut sender = Chat::joined(server.addr, "patient");
    let (mut admitted, mut refused) = (0, 0);
    let mut n = 0;
    while refused < 80 {
        n += 1;
        sender.send(json!({"type": "public", "body": format!("p{n}"), "ref": n}));
        let answer = loop {
            let v = sender.recv("the answer");
            if v["ref"] == json!(n) || (v["type"] == "public" && v["body"] == format!("p{n}")) {
                break v;
            }
        };
        if answer["type"] == "error" {
            assert_eq!(answer["code"], "rate_limited", "{answer}");
            refused += 1;
            let wait = answer["retry_after_ms"].as_u64().expect("retry_after_ms");
            std::thread::sleep(Duration::from_millis(wait));
        } else {
            admitted += 1;
        }
    }
    assert!(admitted >= 40, "{admitted} admitted, {refused} refused");
    assert_eq!(metric(server.addr, "wschat_rate_limit_closes_total "), 0);
    // Still open: one more, after a pause, goes through.
    std::thread::sleep(Duration::from_millis(20));
    sender.public("still here");
    assert_eq!(
        sender.recv_type("public", "after the refusals")["body"],
        "still here"
    );
}

#[test]
fn a_sustained_flood_is_closed_with_1008() {
    let server = ChatServer::start(&["--rate-limit", "1", "--rate-burst", "1"]);
    let mut bystander = Chat::joined(server.addr, "bystander");
    let mut flooder = Raw::join(server.addr, "flooder");
    bystander.recv_type("join", "the flooder arrives");
    // 60 in one write: 1 admitted, then refusals; the 50th closes.
    let frames: Vec<u8> = (0..60)
        .flat_map(|i| {
            client_frame(
                OP_TEXT,
                json!({"type": "public", "body": format!("f{i}")})
                    .to_string()
                    .as_bytes(),
            )
        })
        .collect();
    let _ = flooder.stream.write_all(&frames);
    let mut refused = 0;
    let mut publics = 0;
    let close = loop {
        let frame = flooder.frame("the flood's answers");
        match frame.opcode {
            OP_TEXT => match frame.json()["type"].as_str() {
                Some("error") => {
                    assert_eq!(frame.json()["code"], "rate_limited");
                    refused += 1;
                }
                Some("public") => publics += 1,
                _ => {}
            },
            OP_CLOSE => break frame,
            _ => {}
        }
    };
    assert_eq!(close.close_code(), Some(1008), "{:?}", close.close_reason());
    assert_eq!(close.close_reason(), "rate limit exceeded");
    assert_eq!(refused, 50, "closed at the 50th refusal");
    assert!(publics >= 1, "the first one was routed");
    flooder.expect_eof(IO_TIMEOUT, "after the close");
    // The bystander saw the admitted ones and the flooder leave; nothing else.
    let seen = read_until(&mut bystander, "the flood as the bystander sees it", |v| {
        v["type"] == "leave"
    });
    let from_flood = seen.iter().filter(|v| v["type"] == "public").count();
    assert_eq!(from_flood, publics, "{seen:?}");
    assert_eq!(metric(server.addr, "wschat_rate_limit_closes_total "), 1);
}

#[test]
fn acks_and_pings_are_not_charged() {
    let server = ChatServer::start(&["--rate-limit", "1", "--rate-burst", "2"]);
    let mut reliable = Raw::join(server.addr, "rel");
    // 200 acks and 200 pings at once: charged, the 50th refusal would close.
    let mut frames = Vec::new();
    for i in 0..200 {
        frames.extend(client_frame(
            OP_TEXT,
            json!({"type": "ack", "seq": i}).to_string().as_bytes(),
        ));
        frames.extend(client_frame(OP_PING, b"p"));
    }
    // Then three privates to itself: the burst of two passes, the third not.
    for i in 1..=3 {
        frames.extend(client_frame(
            OP_TEXT,
            json!({"type": "private", "to": "rel", "body": "x", "ref": i})
                .to_string()
                .as_bytes(),
        ));
    }
    reliable.stream.write_all(&frames).expect("write the batch");
    let mut answers = Vec::new();
    while answers.len() < 3 {
        let v = reliable.expect_json("answers to the privates");
        if v["ref"].is_u64() {
            answers.push(v);
        }
    }
    let kinds: Vec<(&str, &str)> = answers
        .iter()
        .map(|v| {
            (
                v["type"].as_str().unwrap_or(""),
                v["status"].as_str().or(v["code"].as_str()).unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("receipt", "delivered"),
            ("receipt", "delivered"),
            ("error", "rate_limited")
        ]
    );
}

#[test]
fn the_connection_past_the_per_address_limit_gets_429_and_another_address_does_not() {
    let server = ChatServer::start(&[
        "--max-connections-per-ip",
        "3",
        "--max-handshakes-per-ip",
        "0",
    ]);
    let mut held: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut s = connect_from(Ipv4Addr::LOCALHOST, server.addr);
            let (status, head) = upgrade(&mut s, &format!("/ws?username=a{i}"), &[]);
            assert_eq!(status, 101, "{head}");
            s
        })
        .collect();
    let mut fourth = connect_from(Ipv4Addr::LOCALHOST, server.addr);
    let (status, head) = upgrade(&mut fourth, "/ws?username=a3", &[]);
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("Retry-After: 1\r\n"), "{head}");
    let mut body = String::new();
    let _ = fourth.read_to_string(&mut body);
    assert_eq!(body, "too many connections from your address\n");
    let refused = |reason: &str| {
        metric(
            server.addr,
            &format!("wschat_per_ip_refused_total{{reason=\"{reason}\"}} "),
        )
    };
    assert_eq!((refused("connections"), refused("handshakes")), (1, 0));
    assert_eq!(
        metric(
            server.addr,
            "wschat_handshake_failures_total{reason=\"http_429\"} "
        ),
        1
    );
    // Another address is not affected.
    let mut other = connect_from(OTHER, server.addr);
    let (status, head) = upgrade(&mut other, "/ws?username=b0", &[]);
    assert_eq!(status, 101, "{head}");
    // Once one of the three is gone, there is room again.
    drop(held.pop());
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let mut again = connect_from(Ipv4Addr::LOCALHOST, server.addr);
        match upgrade(&mut again, "/ws?username=a4", &[]) {
            (101, _) => break,
            (429, _) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            (status, head) => panic!("after a departure: {status} {head}"),
        }
    }
    drop(held);
}

#[test]
fn handshakes_past_the_per_address_rate_get_429() {
    let server = ChatServer::start(&[
        "--max-handshakes-per-ip",
        "3",
        "--max-connections-per-ip",
        "0",
    ]);
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    for i in 0..10 {
        let mut s = connect_from(Ipv4Addr::LOCALHOST, server.addr);
        let (status, head) = upgrade(&mut s, &format!("/ws?username=h{i}"), &[]);
        if status == 429 {
            assert!(head.contains("Retry-After: 1\r\n"), "{head}");
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            assert_eq!(body, "too many handshakes from your address\n");
        }
        statuses.push(status);
        open.push(s);
    }
    // A burst of 3, then 3 a second.
    let let_in = statuses.iter().filter(|&&s| s == 101).count();
    let most = 3 + (started.elapsed().as_secs_f64() * 3.0).ceil() as usize;
    assert!((3..=most).contains(&let_in), "{statuses:?}");
    assert_eq!(&statuses[..3], [101, 101, 101]);
    assert!(statuses.contains(&429), "{statuses:?}");
    let mut other = connect_from(OTHER, server.addr);
    assert_eq!(upgrade(&mut other, "/ws?username=o", &[]).0, 101);
}

#[test]
fn health_checks_answer_while_the_chat_is_full() {
    let server = ChatServer::start(&[
        "--max-connections",
        "3",
        "--max-connections-per-ip",
        "0",
        "--max-handshakes-per-ip",
        "0",
    ]);
    let _full: Vec<Chat> = (0..3)
        .map(|i| Chat::joined(server.addr, &format!("u{i}")))
        .collect();
    assert_eq!(get(server.addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(server.addr, "/metrics").0, 200);
    // A chat connection is still refused.
    let mut late = TcpStream::connect(server.addr).expect("connect");
    late.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let (status, head) = upgrade(&mut late, "/ws?username=late", &[]);
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("Retry-After: 1"), "{head}");
    // Refused clients that keep their sockets open (more of them than the
    // sockets kept for health checks) hold them only a moment: health
    // checks answer again long before the 5 s close timeout.
    let refused: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut s = TcpStream::connect(server.addr).expect("connect");
            s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            let _ = upgrade(&mut s, &format!("/ws?username=r{i}"), &[]);
            s
        })
        .collect();
    let since = Instant::now();
    while get(server.addr, "/healthz").0 != 200 {
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "/healthz still refused"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(refused);
}

#[test]
fn x_forwarded_for_is_believed_from_a_trusted_proxy_only() {
    let mut server = ChatServer::start(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--max-connections-per-ip",
        "2",
        "--max-handshakes-per-ip",
        "0",
        // Its raw clients never answer the closing handshake: the stop
        // that lets the log be read to its end need not wait for them.
        "--shutdown-timeout",
        "100ms",
    ]);
    let proxied = |client: &str, name: &str| {
        let mut s = connect_from(Ipv4Addr::LOCALHOST, server.addr);
        let header = format!("X-Forwarded-For: 198.51.100.1, {client}");
        let (status, _) = upgrade(&mut s, &format!("/ws?username={name}"), &[&header]);
        (status, s)
    };
    // Through the proxy: counted by the client it names, not by the proxy.
    let (a1, _s1) = proxied("203.0.113.7", "p1");
    let (a2, _s2) = proxied("203.0.113.7", "p2");
    let (a3, _s3) = proxied("203.0.113.7", "p3");
    let (b1, _s4) = proxied("203.0.113.8", "p4");
    let (b2, _s5) = proxied("203.0.113.8", "p5");
    assert_eq!([a1, a2, a3, b1, b2], [101, 101, 429, 101, 101]);
    // From an address that is not a trusted proxy the header is ignored:
    // claiming a new client each time does not get past its own limit.
    let mut direct = Vec::new();
    for (i, claimed) in ["192.0.2.1", "192.0.2.2", "192.0.2.3"].iter().enumerate() {
        let mut s = connect_from(OTHER, server.addr);
        let header = format!("X-Forwarded-For: {claimed}");
        let (status, _) = upgrade(&mut s, &format!("/ws?username=d{i}"), &[&header]);
        direct.push((status, s));
    }
    let direct: Vec<u16> = direct.iter().map(|(status, _)| *status).collect();
    assert_eq!(direct, [101, 101, 429]);
    server.assert_running();
    // The whole log, read to its end (a line may still be on its way).
    let logs = server.log_after_exit();
    assert!(
        logs.contains("client 203.0.113.7 (through 127.0.0.1)"),
        "{logs}"
    );
    assert!(!logs.contains("client 192.0.2."), "{logs}");
}
