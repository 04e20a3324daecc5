//! `--auth jwt` through real sockets against the real binary: tokens in the
//! header and the query, every refusal a 401 (and the token never in the
//! log), expiry and renewal, a user's newer session replacing the older one,
//! and the start-up checks on the secret file. Tokens are minted here with
//! RustCrypto's HMAC, independently of the server's verifier.

mod chat_support;
mod common;
mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chat_support::{percent_encode, tcp, Chat, ChatServer, Event};
use serde_json::{json, Value};
use support::eintr::Restarting;
use support::http;
use support::token::{self, b64url};
use tungstenite::client::IntoClientRequest;

const SECRET: &[u8] = b"a test secret of forty bytes, not more.!";

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// A JWS compact token: `header` and `claims` as given, HS256 with `secret`.
fn mint_with(header: &Value, claims: &Value, secret: &[u8]) -> String {
    token::mint(&header.to_string(), &claims.to_string(), secret)
}

fn mint(claims: Value) -> String {
    mint_with(&json!({"alg":"HS256","typ":"JWT"}), &claims, SECRET)
}

fn token_for(sub: &str, valid_for: u64) -> String {
    mint(json!({"sub": sub, "exp": now_secs() + valid_for}))
}

/// A secret file of its own, mode `mode`.
fn secret_file(bytes: &[u8], mode: u32) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wschat-auth-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("secret");
    std::fs::write(&path, bytes).expect("write the secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

fn server(extra: &[&str]) -> ChatServer {
    let path = secret_file(SECRET, 0o600);
    let path = path.to_str().expect("a UTF-8 temp path").to_string();
    let mut args = vec!["--auth", "jwt", "--auth-secret-file", &path];
    args.extend_from_slice(extra);
    ChatServer::start(&args)
}

/// Sends an upgrade request with optional headers and reads the whole answer.
fn upgrade(addr: SocketAddr, path: &str, extra_headers: &str) -> String {
    let mut stream = tcp(addr);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    stream.write_all(request.as_bytes()).expect("request");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // A 101 never ends by itself: stop after its head.
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the answer: {e}"),
        }
        if answer.starts_with(b"HTTP/1.1 101") && answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// Opens a chat connection with `Authorization: Bearer <token>`.
fn open_with_header(addr: SocketAddr, token: &str) -> Chat {
    let mut request = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("a request");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("a header value"),
    );
    let (ws, response) = tungstenite::client(request, Restarting(tcp(addr)))
        .unwrap_or_else(|e| panic!("handshake failed: {e}"));
    assert_eq!(response.status().as_u16(), 101);
    Chat {
        ws,
        label: "header client".into(),
    }
}

fn open_with_query(addr: SocketAddr, token: &str) -> Chat {
    Chat::open(addr, &format!("/ws?token={token}"))
}

#[test]
fn a_valid_token_in_the_header_or_the_query_names_the_user() {
    let server = server(&[]);
    let mut alice = open_with_header(server.addr, &token_for("alice", 600));
    let welcome = alice.recv_type("welcome", "alice");
    assert_eq!(welcome["username"], "alice");
    // The query (browsers cannot set headers), with a non-ASCII name.
    let mut zoe = open_with_query(server.addr, &token_for("Zoë", 600));
    assert_eq!(zoe.recv_type("welcome", "zoe")["username"], "Zoë");
    // username= may repeat the token's sub.
    let path = format!(
        "/ws?username={}&token={}",
        percent_encode("Zoë2"),
        token_for("Zoë2", 600)
    );
    let mut zoe2 = Chat::open(server.addr, &path);
    assert_eq!(zoe2.recv_type("welcome", "zoe2")["username"], "Zoë2");
    // The server, not the client, decides `from`.
    alice.send(json!({"type":"public","body":"hi","from":"mallory"}));
    let v = loop {
        let v = zoe.recv("from alice");
        if v["type"] == "public" {
            break v;
        }
    };
    assert_eq!(v["from"], "alice");
}

#[test]
fn every_bad_token_gets_401_and_is_never_logged() {
    let server = server(&[
        "--auth-audience",
        "chat",
        "--auth-issuer",
        "https://auth.example",
    ]);
    let now = now_secs();
    let good_claims = |extra: Value| -> Value {
        let mut claims =
            json!({"sub":"alice","exp":now + 600,"aud":"chat","iss":"https://auth.example"});
        if let (Some(claims), Some(extra)) = (claims.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                claims.insert(k.clone(), v.clone());
            }
        }
        claims
    };
    let good = mint(good_claims(json!({})));
    assert!(upgrade(server.addr, &format!("/ws?token={good}"), "").starts_with("HTTP/1.1 101"));
    let header_only = |alg: &str| b64url(json!({"alg":alg}).to_string().as_bytes());
    let payload = b64url(good_claims(json!({})).to_string().as_bytes());
    let cases: Vec<(&str, String, &str)> = vec![
        ("no token", String::new(), "a token is required"),
        (
            "expired",
            mint(good_claims(json!({"exp": now - 31}))),
            "token expired",
        ),
        (
            "not yet valid",
            mint(good_claims(json!({"nbf": now + 600}))),
            "not yet valid",
        ),
        (
            "wrong signature",
            mint_with(
                &json!({"alg":"HS256"}),
                &good_claims(json!({})),
                b"another secret of forty bytes, not more",
            ),
            "invalid token signature",
        ),
        (
            "alg none",
            format!("{}.{payload}.", header_only("none")),
            "algorithm",
        ),
        (
            "HS512",
            mint_with(&json!({"alg":"HS512"}), &good_claims(json!({})), SECRET),
            "algorithm",
        ),
        (
            "wrong aud",
            mint(good_claims(json!({"aud":"other"}))),
            "audience",
        ),
        (
            "wrong iss",
            mint(good_claims(json!({"iss":"evil"}))),
            "issuer",
        ),
        (
            "no exp",
            mint(json!({"sub":"alice","aud":"chat","iss":"https://auth.example"})),
            "exp",
        ),
        ("bad sub", mint(good_claims(json!({"sub":"no one"}))), "sub"),
        ("oversized", "a".repeat(5000), "too long"),
        ("malformed", "abc.def".into(), "malformed"),
        (
            "bad base64",
            format!("{}.{payload}.!!", header_only("HS256")),
            "malformed",
        ),
    ];
    for (what, token, reason) in &cases {
        let path = if token.is_empty() {
            "/ws?username=alice".to_string()
        } else {
            format!("/ws?token={token}")
        };
        let answer = upgrade(server.addr, &path, "");
        assert!(answer.starts_with("HTTP/1.1 401 "), "{what}: {answer:.200}");
        assert!(
            answer.contains("WWW-Authenticate: Bearer"),
            "{what}: {answer:.300}"
        );
        assert!(answer.contains(reason), "{what}: {answer:.300}");
        // The same through the header.
        if !token.is_empty() && token.len() < 4000 {
            let answer = upgrade(
                server.addr,
                "/ws",
                &format!("Authorization: Bearer {token}\r\n"),
            );
            assert!(
                answer.starts_with("HTTP/1.1 401 "),
                "{what} (header): {answer:.200}"
            );
        }
    }
    // A token for alice with username=bob, and a token in both places.
    let answer = upgrade(server.addr, &format!("/ws?username=bob&token={good}"), "");
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer:.200}");
    let answer = upgrade(
        server.addr,
        &format!("/ws?token={good}"),
        &format!("Authorization: Bearer {good}\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer:.200}");
    // Nothing of any token reached the log (the reason did).
    let logs = server.logs();
    for (what, token, _) in &cases {
        if token.len() > 20 {
            assert!(
                !logs.contains(&token[token.len() - 20..]),
                "{what} logged:\n{logs}"
            );
        }
    }
    assert!(
        !logs.contains(&good[good.len() - 20..]),
        "a good token logged"
    );
    let metrics = http::get(server.addr, "/metrics");
    assert!(
        metrics.contains("wschat_handshake_failures_total{reason=\"http_401\"}"),
        "{metrics}"
    );
}

#[test]
fn a_session_ends_with_4003_when_its_token_expires_unless_renewed() {
    let server = server(&["--auth-leeway", "0s"]);
    // Expires in 2 s; renewed in time, it outlives its first token.
    let mut kept = open_with_query(server.addr, &token_for("kept", 2));
    kept.recv_type("welcome", "kept");
    let renewed_exp = now_secs() + 600;
    let renewal = mint(json!({"sub":"kept","exp":renewed_exp}));
    kept.send(json!({"type":"auth","token":renewal,"ref":"r"}));
    let answer = kept.recv_type("auth", "renewal answer");
    assert_eq!(answer, json!({"type":"auth","exp":renewed_exp,"ref":"r"}));
    // Not renewed: closed at its expiry.
    let mut lapsed = open_with_query(server.addr, &token_for("lapsed", 2));
    lapsed.recv_type("welcome", "lapsed");
    lapsed.expect_close(4003, Some("token expired"), "lapsed token");
    // The renewed one is still there, after its first token's expiry.
    kept.send(json!({"type":"users"}));
    let users = loop {
        let v = kept.recv("users");
        if v["type"] == "users" {
            break v;
        }
    };
    assert_eq!(users["users"], json!(["kept"]));
    // A bad renewal is an error and changes nothing; another user's token ends it.
    kept.send(json!({"type":"auth","token":"x.y.z"}));
    assert_eq!(
        kept.recv_type("error", "bad renewal")["code"],
        "invalid_token"
    );
    kept.send(json!({"type":"auth","token":token_for("mallory", 600)}));
    assert_eq!(
        kept.recv_type("error", "other user")["code"],
        "invalid_token"
    );
    // The lapsed user's `leave` may come first (presence waits up to 10 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(
            Instant::now() < deadline,
            "no close after another user's token"
        );
        match kept.event("another user's token") {
            Event::Close(close) => {
                assert_eq!(close.map(|(code, _)| code), Some(4003));
                break;
            }
            Event::Json(v) if v["type"] == "leave" => {}
            other => panic!("expected the close, got {other:?}"),
        }
    }
}

#[test]
fn a_newer_session_replaces_the_older_one_and_nothing_held_is_lost() {
    let server = server(&[]);
    let mut bob = open_with_query(server.addr, &token_for("bob", 600));
    bob.recv_type("welcome", "bob");
    // alice, a reliable client, gets three messages and acknowledges one.
    let mut old = Chat::open(
        server.addr,
        &format!("/ws?resume=0&token={}", token_for("alice", 600)),
    );
    old.recv_type("welcome", "old alice");
    bob.recv_type("join", "alice joins");
    let mut seqs = Vec::new();
    for i in 1..=3 {
        bob.send(json!({"type":"private","to":"alice","body":format!("m{i}")}));
        assert_eq!(bob.recv_type("receipt", "receipt")["status"], "delivered");
        let v = old.recv_type("private", "live");
        assert_eq!(v["body"], format!("m{i}"));
        seqs.push(v["seq"].as_u64().expect("a seq"));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    old.send(json!({"type":"ack","seq":seqs[0]}));
    // Her phone reconnects while the old connection lingers.
    let mut new = Chat::open(
        server.addr,
        &format!("/ws?resume={}&token={}", seqs[0], token_for("alice", 600)),
    );
    let welcome = new.recv_type("welcome", "new alice");
    assert_eq!(welcome["online"], 2);
    assert_eq!(welcome["users"], json!(["bob"]));
    // What was not acknowledged comes again, once, in order.
    for &seq in &seqs[1..] {
        let v = new.recv_type("private", "replayed");
        assert_eq!(
            (v["seq"].clone(), v["offline"].clone()),
            (json!(seq), json!(true))
        );
    }
    // The old one is closed with 4010 after what it was sent.
    old.expect_close(4010, None, "old session");
    // bob saw neither a leave nor a join; his next message reaches the new one.
    bob.send(json!({"type":"private","to":"alice","body":"m4"}));
    let receipt = bob.recv("receipt after the replacement");
    assert_eq!(
        receipt["type"], "receipt",
        "bob got {receipt} (a leave or join?)"
    );
    let v = new.recv_type("private", "live again");
    assert_eq!(v["body"], "m4");
    assert!(v["seq"].as_u64() > Some(seqs[2]), "{v}");
}

#[test]
fn an_unusable_secret_file_is_a_start_up_error() {
    let cases = [
        (secret_file(SECRET, 0o644), "read or write"),
        (secret_file(b"short", 0o600), "at least 32"),
        (PathBuf::from("/nonexistent/wschat-secret"), "cannot read"),
    ];
    for (path, says) in cases {
        let path = path.to_str().expect("UTF-8").to_string();
        let exit = common::run_to_exit(&[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "none",
            "--auth",
            "jwt",
            "--auth-secret-file",
            &path,
        ]);
        assert_eq!(exit.status.code(), Some(2), "{path}: {}", exit.stderr);
        assert!(exit.stderr.contains(says), "{path}: {}", exit.stderr);
        assert!(!exit.stderr.contains("forty bytes"), "the secret was shown");
    }
    let exit = common::run_to_exit(&["--listen", "127.0.0.1:0", "--auth", "jwt"]);
    assert_eq!(exit.status.code(), Some(2), "{}", exit.stderr);
    assert!(
        exit.stderr.contains("--auth-secret-file"),
        "{}",
        exit.stderr
    );
}

#[test]
fn offline_mail_only_for_users_a_token_named_and_they_survive_kill_9() {
    let dir = secret_file(b"unused", 0o600)
        .parent()
        .expect("a temp dir")
        .join("data");
    let dir = dir.to_str().expect("UTF-8").to_string();
    let start = || server(&["--data-dir", &dir]);
    let mut first = start();
    // alice was here once; zed never was.
    let mut alice = open_with_query(first.addr, &token_for("alice", 600));
    alice.recv_type("welcome", "alice");
    alice.close();
    let mut bob = open_with_query(first.addr, &token_for("bob", 600));
    bob.recv_type("welcome", "bob");
    let send = |bob: &mut Chat, to: &str| -> Value {
        bob.send(json!({"type":"private","to":to,"body":"hi"}));
        loop {
            let v = bob.recv("answer");
            if v["type"] == "receipt" || v["type"] == "error" {
                return v;
            }
        }
    };
    assert_eq!(send(&mut bob, "alice")["status"], "queued");
    let refused = send(&mut bob, "zed");
    assert_eq!(refused["code"], "unknown_user", "{refused}");
    // kill -9: who is known is on disk like the messages.
    first.signal("KILL");
    first.wait_exit(Duration::from_secs(5));
    let second = start();
    let mut bob = open_with_query(second.addr, &token_for("bob", 600));
    bob.recv_type("welcome", "bob again");
    assert_eq!(send(&mut bob, "alice")["status"], "queued");
    assert_eq!(send(&mut bob, "zed")["code"], "unknown_user");
    let metrics = http::get(second.addr, "/metrics");
    assert!(metrics.contains("\nwschat_known_users 2\n"), "{metrics}");
    // alice gets both, in order.
    let mut alice = open_with_query(second.addr, &token_for("alice", 600));
    alice.recv_type("welcome", "alice back");
    for _ in 0..2 {
        let v = alice.recv_type("private", "held for alice");
        assert_eq!(
            (v["from"].clone(), v["offline"].clone()),
            (json!("bob"), json!(true))
        );
    }
    let _ = std::fs::remove_dir_all(PathBuf::from(&dir).parent().expect("parent"));
}

#[test]
fn metrics_listen_serves_metrics_apart_from_the_chat() {
    let server = ChatServer::start(&["--metrics-listen", "127.0.0.1:0"]);
    let logs = server.logs();
    let admin: SocketAddr = logs
        .lines()
        .find_map(|l| support::spawn::address_after(l, "metrics on "))
        .unwrap_or_else(|| panic!("no `metrics on` line:\n{logs}"));
    assert!(http::get(admin, "/metrics").starts_with("HTTP/1.1 200"));
    assert!(http::get(admin, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http::get(admin, "/").starts_with("HTTP/1.1 404"));
    assert!(upgrade(admin, "/ws?username=alice", "").starts_with("HTTP/1.1 404"));
    // The chat's address no longer shows metrics, and still does the rest.
    assert!(http::get(server.addr, "/metrics").starts_with("HTTP/1.1 404"));
    assert!(http::get(server.addr, "/healthz").starts_with("HTTP/1.1 200"));
    assert!(http::get(server.addr, "/").starts_with("HTTP/1.1 200"));
    assert!(upgrade(server.addr, "/ws?username=alice", "").starts_with("HTTP/1.1 101"));
}
