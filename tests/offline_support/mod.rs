//! Helpers for the offline-delivery tests (`tests/offline.rs`), on top of
//! `chat_support`: per-test data directories, servers started on them,
//! reliable (`resume`) clients, and readers that skip presence chatter.

#![allow(dead_code)]

use std::fs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::chat_support::{percent_encode, Chat, ChatServer};

/// How long a stopped or killed server may take to exit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

pub const LOG_NAME: &str = "outbox.log";
pub const COMPACT_NAME: &str = "outbox.log.compact";
pub const CUT_WARNING: &str = "cut a torn or corrupt tail";
/// The ERROR line of a log damaged before its last readable record.
pub const DAMAGE_ERROR: &str = "could not be read and the records in them are lost";
/// How a kept-aside damaged log's name starts.
pub const CORRUPT_PREFIX: &str = "outbox.log.corrupt-";

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "wschat-offline-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create a temp dir");
        TempDir { path }
    }

    /// A data directory inside this one (not created: the server makes it).
    pub fn sub(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn str(&self) -> &str {
        self.path.to_str().expect("temp path is UTF-8")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// `wschat --data-dir DIR <extra...>` (chat_support puts `--data-dir none`
/// first; the later flag wins).
///
/// These tests are about storage, not about who may be sent a message:
/// they hold messages for names that never connected (`--offline-to-unknown`).
pub fn start_on(dir: &Path, extra: &[&str]) -> ChatServer {
    let dir = dir.to_str().expect("data dir path is UTF-8");
    // The suites load the store far faster than --rate-limit lets a person,
    // and poll /metrics from the clients' address faster than
    // --max-handshakes-per-ip allows.
    let mut args = vec![
        "--data-dir",
        dir,
        "--offline-to-unknown",
        "--rate-limit",
        "0",
        "--max-handshakes-per-ip",
        "0",
    ];
    args.extend_from_slice(extra);
    ChatServer::start(&args)
}

/// SIGKILL, then waits for the process to be gone.
pub fn kill9(server: &mut ChatServer) {
    server.signal("KILL");
    let status = server.wait_exit(EXIT_TIMEOUT);
    assert!(!status.success(), "a SIGKILLed server exited with {status}");
}

/// SIGTERM and a clean exit (clients should be gone, or the server waits
/// for them up to its shutdown timeout).
pub fn stop(server: &mut ChatServer) {
    server.signal("TERM");
    let status = server.wait_exit(EXIT_TIMEOUT);
    assert!(
        status.success(),
        "graceful stop exited with {status}; stderr:\n{}",
        server.logs()
    );
}

/// Lines of the server's stderr that contain `needle`.
pub fn count_lines(server: &ChatServer, needle: &str) -> usize {
    server.logs().lines().filter(|l| l.contains(needle)).count()
}

/// Runs the binary to completion with `args` (after `--listen 127.0.0.1:0`).
pub fn run_to_exit(args: &[&str]) -> Output {
    let bin =
        std::env::var("WSCHAT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wschat").to_string());
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the wschat binary");
    // It should exit at once; don't let a server that runs hang the test.
    let deadline = std::time::Instant::now() + EXIT_TIMEOUT;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "wschat {args:?} still running after {EXIT_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("collect output")
}

/// The whole answer to `GET path` (the server closes after it).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    crate::support::http::get(addr, path)
}

/// One figure from `GET /metrics`.
pub fn metric(addr: SocketAddr, name: &str) -> u64 {
    let text = http_get(addr, "/metrics");
    let sample = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&sample)?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// The damaged logs kept aside in `dir`.
pub fn kept_aside(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read the data dir")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(CORRUPT_PREFIX))
        })
        .collect();
    found.sort();
    found
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

/// `/ws?username=NAME&resume=SEQ`.
pub fn resume_path(name: &str, resume: u64) -> String {
    format!("/ws?username={}&resume={resume}", percent_encode(name))
}

/// Joins as a reliable client (`resume=SEQ`); returns it after the welcome.
pub fn join_reliable(addr: std::net::SocketAddr, name: &str, resume: u64) -> Chat {
    let mut c = Chat::open(addr, &resume_path(name, resume));
    c.label = format!("{name}(resume={resume})");
    let welcome = c.recv_type("welcome", "first message after joining with resume");
    assert_eq!(welcome["username"], json!(name), "welcome names the user");
    c
}

fn is_presence(v: &Value) -> bool {
    matches!(v["type"].as_str(), Some("join" | "leave"))
}

/// The next message that is not a join/leave event.
pub fn next(c: &mut Chat, context: &str) -> Value {
    loop {
        let v = c.recv(context);
        if !is_presence(&v) {
            return v;
        }
    }
}

/// The next message for which `keep` holds; everything else is skipped.
pub fn next_where(c: &mut Chat, context: &str, mut keep: impl FnMut(&Value) -> bool) -> Value {
    loop {
        let v = c.recv(context);
        if keep(&v) {
            return v;
        }
    }
}

/// Asks for the user list and returns every non-presence message that came
/// before the answer: the server handles a connection's messages in order,
/// so this is "everything it sent so far".
pub fn drain(c: &mut Chat, context: &str) -> Vec<Value> {
    c.send(json!({"type": "users"}));
    let mut before = Vec::new();
    loop {
        let v = c.recv(context);
        match v["type"].as_str() {
            Some("users") => return before,
            Some("join" | "leave") => {}
            _ => before.push(v),
        }
    }
}

/// Like [`drain`], but nothing may have come.
pub fn assert_quiet(c: &mut Chat, context: &str) {
    let extra = drain(c, context);
    assert!(
        extra.is_empty(),
        "{}: {context}: expected nothing more, got {extra:?}",
        c.label
    );
}

/// Waits for the `leave` of `name` (so the name is free again), returning
/// the non-presence messages seen meanwhile.
pub fn wait_leave(c: &mut Chat, name: &str, context: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = c.recv(context);
        if v["type"] == "leave" && v["username"] == json!(name) {
            return seen;
        }
        if !is_presence(&v) {
            seen.push(v);
        }
    }
}

/// Drops the TCP connection without a WebSocket close.
pub fn drop_abruptly(c: Chat) {
    let _ = c.ws.get_ref().shutdown(std::net::Shutdown::Both);
    drop(c);
}

/// Sends a private message with a `ref`.
pub fn private_ref(c: &mut Chat, to: &str, body: &str, reference: &str) {
    c.send(json!({"type": "private", "to": to, "body": body, "ref": reference}));
}

/// Sends a private message and returns the receipt or error it causes
/// (matched by `ref`; other messages are skipped).
pub fn send_and_wait(c: &mut Chat, to: &str, body: &str, reference: &str) -> Value {
    private_ref(c, to, body, reference);
    next_where(c, &format!("answer to {reference}"), |v| {
        matches!(v["type"].as_str(), Some("receipt" | "error")) && v["ref"] == json!(reference)
    })
}

/// Sends and expects a `queued` receipt; returns its id.
pub fn send_queued(c: &mut Chat, to: &str, body: &str, reference: &str) -> u64 {
    let v = send_and_wait(c, to, body, reference);
    assert_eq!(
        (v["type"].as_str(), v["status"].as_str()),
        (Some("receipt"), Some("queued")),
        "private {body:?} to offline {to}: expected a queued receipt, got {v}"
    );
    v["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("receipt without a numeric id: {v}"))
}

/// Checks a private message's fields; returns its seq.
pub fn assert_private(
    v: &Value,
    from: &str,
    to: &str,
    body: &str,
    offline: bool,
    ctx: &str,
) -> u64 {
    assert_eq!(
        v["type"], "private",
        "{ctx}: expected a private message: {v}"
    );
    assert_eq!(v["from"], json!(from), "{ctx}: from: {v}");
    assert_eq!(v["to"], json!(to), "{ctx}: to: {v}");
    assert_eq!(v["body"], json!(body), "{ctx}: body: {v}");
    assert!(v["id"].as_u64().is_some(), "{ctx}: id: {v}");
    assert!(v["ts"].as_u64().is_some(), "{ctx}: ts: {v}");
    if offline {
        assert_eq!(
            v["offline"],
            json!(true),
            "{ctx}: stored message must say offline:true: {v}"
        );
    } else {
        assert!(
            v.get("offline").is_none() || v["offline"] == json!(false),
            "{ctx}: a live message must not say offline:true: {v}"
        );
    }
    v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("{ctx}: private message without a numeric seq: {v}"))
}

/// Sends a cumulative ack and waits until the server has handled it.
pub fn ack(c: &mut Chat, seq: u64) {
    c.send(json!({"type": "ack", "seq": seq}));
    assert_quiet(c, &format!("after ack {seq}"));
}

// ---------------------------------------------------------------------------
// The log file
// ---------------------------------------------------------------------------

/// Byte offsets where each record of a log starts (and the total length),
/// checking the framing `[len u32 LE][crc u32 LE][payload]`.
pub fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        assert!(
            pos + 8 <= bytes.len(),
            "log ends inside a record header at {pos}"
        );
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        assert!(
            pos + 8 + len <= bytes.len(),
            "log ends inside a record at {pos}"
        );
        starts.push(pos);
        pos += 8 + len;
    }
    starts
}

/// `seqs` counted from the first as 1: the numbers a server gives in one
/// run to one recipient, when nobody else is sent privates, are
/// consecutive, but they start wherever the server's counter stands.
pub fn relative_seqs(seqs: &[u64]) -> Vec<u64> {
    let first = seqs.first().copied().unwrap_or(1);
    seqs.iter().map(|s| s - first + 1).collect()
}

/// Bob connects as a simple client and reads what was held for him: the
/// private messages that come right after the welcome, up to the `users`
/// answer that [`drain`] asks for. Everything must be an offline private.
pub fn collect_offline(addr: SocketAddr, name: &str, context: &str) -> (Chat, Vec<Value>) {
    let mut c = Chat::joined(addr, name);
    let got = drain(&mut c, context);
    for v in &got {
        assert!(
            v["type"] == "private" && v["offline"] == json!(true),
            "{context}: {name} got something other than a stored private: {v} (all: {got:?})"
        );
    }
    (c, got)
}
