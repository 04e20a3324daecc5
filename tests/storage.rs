//! What one sender, or the disk, can do to the offline store: names with
//! nothing held cost nothing, one sender holds only its share, and a disk
//! that refuses writes costs offline messages (refused, never promised)
//! but not the chat. The real binary, real sockets.

mod chat_support;
mod offline_support;
mod support;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use chat_support::{Chat, ChatServer};
use offline_support::*;
use support::spawn::{self, AfterListening};

/// Waits until `/metrics` shows `name` at `want`.
fn wait_metric(addr: SocketAddr, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(addr, name) != want {
        assert!(Instant::now() < deadline, "{name} never reached {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn names_with_nothing_held_cost_the_store_nothing() {
    // Each round holds 400 messages for 400 new names (about 57 KB of the
    // 64 KiB quota with the names) until they expire. Names used to stay
    // behind, counted against --offline-max-bytes (about 71 bytes each),
    // so the second round ran into offline_queue_full.
    let tmp = TempDir::new("idle-names");
    let server = start_on(
        &tmp.sub("data"),
        &[
            "--offline-max-bytes",
            "65536",
            // One sender here, and the test is about names, not shares.
            "--offline-max-bytes-per-sender",
            "65536",
            "--offline-ttl",
            "1s",
            "--fsync",
            "never",
        ],
    );
    let mut alice = Chat::joined(server.addr, "alice");
    for round in 0..3 {
        for n in 0..400 {
            let to = format!("u{round}x{n}");
            send_queued(&mut alice, &to, "m", &format!("r{round}-{n}"));
        }
        wait_metric(server.addr, "wschat_offline_messages", 0);
        assert_eq!(metric(server.addr, "wschat_offline_bytes"), 0);
    }
    assert_eq!(metric(server.addr, "wschat_offline_users"), 0);
}

#[test]
fn one_sender_holds_only_its_share() {
    let tmp = TempDir::new("sender-share");
    let server = start_on(&tmp.sub("data"), &["--offline-max-per-sender", "3"]);
    let mut mallory = Chat::joined(server.addr, "mallory");
    for n in 1..=3 {
        send_queued(&mut mallory, &format!("v{n}"), "spam", &format!("s{n}"));
    }
    let v = send_and_wait(&mut mallory, "v4", "spam", "s4");
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str(), v["ref"].as_str()),
        (Some("error"), Some("offline_sender_limit"), Some("s4")),
        "{v}"
    );
    // Others still store, also for the same recipients.
    let mut alice = Chat::joined(server.addr, "alice");
    send_queued(&mut alice, "v1", "hello", "a1");
    send_queued(&mut alice, "v4", "hello", "a2");
    // Once one of mallory's messages is delivered, she has room again.
    let (_v1, got) = collect_offline(server.addr, "v1", "v1 collects");
    assert_eq!(got.len(), 2, "{got:?}");
    send_queued(&mut mallory, "v4", "again", "s5");
    let (_v4, got) = collect_offline(server.addr, "v4", "v4 collects");
    let bodies: Vec<_> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["hello", "again"], "the refused one is not stored");
}

/// A server on `dir` whose files may grow to `max_file_bytes` at most
/// (RLIMIT_FSIZE: past it a write fails with EFBIG, as a full disk fails
/// with ENOSPC; the server ignores SIGXFSZ, which would otherwise end it).
fn start_with_file_limit(dir: &std::path::Path, max_file_bytes: u64) -> ChatServer {
    let mut cmd = Command::new(spawn::bin());
    cmd.args(spawn::TEST_FLAGS)
        .args(["--data-dir", dir.to_str().expect("UTF-8 path")])
        .args(["--offline-to-unknown", "--log", "info"]);
    // SAFETY: setrlimit is async-signal-safe, and nothing else runs
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: max_file_bytes,
                rlim_max: libc::RLIM_INFINITY,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    ChatServer::from_spawned(spawn::start_command(cmd, AfterListening::KeepReading))
}

/// Lifts the file-size limit of a running server (the disk has room again).
fn lift_file_limit(pid: u32) {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit reads `unlimited` and writes nothing (old is null).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &unlimited,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// `GET /healthz`: status code and body.
fn health(addr: SocketAddr) -> (u16, String) {
    let text = http_get(addr, "/healthz");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.trim().to_string())
}

#[test]
fn a_full_disk_refuses_offline_messages_but_not_the_chat_and_recovers() {
    let tmp = TempDir::new("full-disk");
    let dir = tmp.sub("data");
    let mut server = start_with_file_limit(&dir, 16 * 1024);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    let body = "x".repeat(1000);

    // Offline messages are queued until the log cannot grow; the one that
    // does not fit is refused, not promised.
    let mut queued = Vec::new();
    let refused = loop {
        let n = queued.len() + 1;
        let v = send_and_wait(&mut alice, "carol", &body, &format!("q{n}"));
        match (v["type"].as_str(), v["status"].as_str()) {
            (Some("receipt"), Some("queued")) => queued.push(format!("q{n}")),
            (Some("error"), _) => break v,
            _ => panic!("unexpected answer {v}"),
        }
        assert!(n < 100, "16 KiB should hold far fewer than 100 KB");
    };
    assert_eq!(refused["code"], "storage_unavailable", "{refused}");
    assert!(queued.len() >= 5, "{} queued first", queued.len());
    // Refused at once while the disk fails.
    let v = send_and_wait(&mut alice, "carol", "short", "while-full");
    assert_eq!(v["code"], "storage_unavailable", "{v}");
    let (status, text) = health(server.addr);
    assert_eq!(
        (status, text.as_str()),
        (200, "degraded: offline storage unavailable")
    );
    assert_eq!(metric(server.addr, "wschat_store_degraded"), 1);
    assert!(metric(server.addr, "wschat_store_write_failures_total") >= 1);
    assert_eq!(metric(server.addr, "wschat_store_refused_total"), 2);

    // Live chat goes on: a private to bob, and a public.
    let v = send_and_wait(&mut alice, "bob", "live", "live");
    assert_eq!(v["status"], "delivered", "{v}");
    assert_eq!(bob.recv_type("private", "live private")["body"], "live");
    alice.public("still here");
    assert_eq!(bob.recv_type("public", "public")["body"], "still here");

    // Room again: the log is rewritten from memory and offline messages
    // are accepted (the retry waits at most 30 s; it doubles from 250 ms).
    lift_file_limit(server.pid());
    let deadline = Instant::now() + Duration::from_secs(40);
    while health(server.addr).1 != "ok" {
        assert!(Instant::now() < deadline, "still degraded");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(server.addr, "wschat_store_degraded"), 0);
    assert_eq!(metric(server.addr, "wschat_store_recoveries_total"), 1);
    send_queued(&mut alice, "carol", "after", "after");
    queued.push("after".to_string());

    // A crash now loses nothing that was queued, and brings back nothing
    // that was refused.
    kill9(&mut server);
    let server = start_on(&dir, &[]);
    let (_carol, got) = collect_offline(server.addr, "carol", "carol after the crash");
    let bodies: Vec<&str> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
    let mut want = vec![body.as_str(); queued.len() - 1];
    want.push("after");
    assert_eq!(bodies, want, "exactly the queued messages");
}
