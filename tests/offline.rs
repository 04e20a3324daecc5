//! Black-box tests of offline delivery: the real `wschat` binary on a fresh
//! data directory per test, real sockets, restarts and `kill -9`.

mod chat_support;
mod offline_support;
mod support;

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use chat_support::{now_ms, Chat};
use offline_support::*;
use serde_json::{json, Value};
use tungstenite::Message;

fn id_of(v: &Value) -> u64 {
    v["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("`id` is not a non-negative integer: {v}"))
}

/// Reads from a connection whose server may be gone: every JSON message
/// until the connection fails (EOF, reset, or the read timeout).
fn read_until_dead(c: &mut Chat) -> Vec<Value> {
    let mut got = Vec::new();
    while let Some(v) = try_recv(c) {
        got.push(v);
    }
    got
}

/// The next JSON message, or `None` once the connection fails.
fn try_recv(c: &mut Chat) -> Option<Value> {
    loop {
        match c.ws.read() {
            Ok(Message::Text(t)) => {
                return Some(serde_json::from_str(t.as_str()).expect("server sent JSON"))
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Held while offline, delivered on connect
// ---------------------------------------------------------------------------

#[test]
fn held_messages_arrive_in_order_after_the_welcome_and_before_live_traffic() {
    let tmp = TempDir::new("deliver");
    let server = start_on(&tmp.sub("data"), &[]);
    let addr = server.addr;
    let mut alice = Chat::joined(addr, "alice");

    let before = now_ms();
    let bodies = ["one", "two", "three"];
    let mut ids = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let v = send_and_wait(&mut alice, "bob", body, &format!("r{i}"));
        assert_eq!(
            v,
            json!({"type": "receipt", "id": v["id"], "ref": format!("r{i}"), "status": "queued"}),
            "receipt for a message to offline bob"
        );
        ids.push(id_of(&v));
    }
    let after = now_ms();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");

    // Live traffic while bob connects: dave sends publics one after another.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut dave = Chat::joined(addr, "dave");
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 50_000 {
                let body = format!("flood {n}");
                dave.public(&body);
                next_where(&mut dave, "dave's own public", |v| {
                    v["type"] == "public" && v["body"] == json!(body)
                });
                n += 1;
            }
            n
        })
    };
    next_where(&mut alice, "the flood has started", |v| {
        v["type"] == "public" && v["from"] == "dave"
    });

    let (mut bob, _) = Chat::join(addr, "bob");
    // Right after the welcome: the three stored messages, nothing between.
    let mut seqs = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let v = bob.recv("stored messages right after the welcome");
        seqs.push(assert_private(
            &v,
            "alice",
            "bob",
            body,
            true,
            "stored message",
        ));
        assert_eq!(
            relative_seqs(&seqs)[i],
            i as u64 + 1,
            "seq of stored message {i}: {v}"
        );
        assert_eq!(id_of(&v), ids[i], "stored message keeps its id: {v}");
        let ts = v["ts"].as_u64().unwrap();
        assert!(
            (before..=after).contains(&ts),
            "stored message keeps the time it was sent ({before}..={after}): {v}"
        );
    }

    // alice is told each was delivered: a second receipt, without ref.
    let mut delivered = Vec::new();
    while delivered.len() < 3 {
        let v = next_where(&mut alice, "delivered receipts", |v| v["type"] == "receipt");
        assert_eq!(
            v,
            json!({"type": "receipt", "id": v["id"], "status": "delivered"}),
            "second receipt of a stored message"
        );
        delivered.push(id_of(&v));
    }
    assert_eq!(delivered, ids, "delivered receipts, in order");

    // A live private after that continues the sequence, not offline.
    let v = send_and_wait(&mut alice, "bob", "live", "live");
    assert_eq!(v["status"], "delivered", "{v}");
    let mut publics = 0;
    let live = next_where(&mut bob, "the live private", |v| {
        if v["type"] == "public" {
            publics += 1;
        }
        v["type"] == "private"
    });
    let seq = assert_private(&live, "alice", "bob", "live", false, "live message");
    assert!(seq > seqs[2], "{seq} continues after {seqs:?}");
    assert_eq!(id_of(&live), id_of(&v));

    if publics == 0 {
        // The flood is still running: wait for it to reach bob, so the
        // ordering above was checked with live traffic around it.
        next_where(&mut bob, "a flood message reaches bob", |v| {
            v["type"] == "public"
        });
        publics += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().expect("flood thread");
    publics += drain(&mut bob, "the rest of the flood")
        .iter()
        .filter(|v| v["type"] == "public")
        .count();
    assert!(
        publics > 0,
        "the flood ({sent} publics) never reached bob, so the ordering was not tested"
    );
    drop(server);
}

// ---------------------------------------------------------------------------
// 2. Simple clients: written counts as delivered
// ---------------------------------------------------------------------------

#[test]
fn a_simple_client_never_sees_a_message_twice() {
    let tmp = TempDir::new("simple");
    let dir = tmp.sub("data");
    let mut server = start_on(&dir, &[]);
    let addr = server.addr;
    let mut alice = Chat::joined(addr, "alice");
    send_queued(&mut alice, "bob", "held 1", "h1");
    send_queued(&mut alice, "bob", "held 2", "h2");

    let (mut bob, got) = collect_offline(addr, "bob", "first connect");
    let seqs: Vec<_> = got
        .iter()
        .zip(["held 1", "held 2"])
        .map(|(v, body)| assert_private(v, "alice", "bob", body, true, "first connect"))
        .collect();
    assert_eq!(
        (got.len(), relative_seqs(&seqs)),
        (2, vec![1, 2]),
        "{got:?}"
    );

    // A live message while online.
    assert_eq!(
        send_and_wait(&mut alice, "bob", "live 1", "l1")["status"],
        "delivered"
    );
    let v = next(&mut bob, "live 1");
    let seq = assert_private(&v, "alice", "bob", "live 1", false, "live");
    assert!(seq > seqs[1], "{seq} continues after {seqs:?}");

    // Clean close, reconnect: nothing again.
    bob.close();
    wait_leave(&mut alice, "bob", "bob's clean close");
    let (bob, got) = collect_offline(addr, "bob", "after a clean close");
    assert!(got.is_empty(), "shown twice after a clean close: {got:?}");

    // Abrupt drop after a live message, reconnect: nothing again.
    let mut bob = bob;
    assert_eq!(
        send_and_wait(&mut alice, "bob", "live 2", "l2")["status"],
        "delivered"
    );
    let v = next(&mut bob, "live 2");
    let later = assert_private(&v, "alice", "bob", "live 2", false, "live");
    assert!(later > seq, "{later} continues after {seq}");
    drop_abruptly(bob);
    wait_leave(&mut alice, "bob", "bob's abrupt drop");
    let (bob, got) = collect_offline(addr, "bob", "after an abrupt drop");
    assert!(got.is_empty(), "shown twice after an abrupt drop: {got:?}");

    // And across a restart.
    bob.close();
    alice.close();
    stop(&mut server);
    let server = start_on(&dir, &[]);
    let (_bob, got) = collect_offline(server.addr, "bob", "after a restart");
    assert!(got.is_empty(), "shown again after a restart: {got:?}");
}

// ---------------------------------------------------------------------------
// 3. Reliable clients: resume replays exactly the unacknowledged gap
// ---------------------------------------------------------------------------

/// Reads one private message per seq in `want`, in order, each with the
/// body `m{i}` where `i` is the seq's place in `numbered` (the seqs of
/// m1, m2, … as first received), then checks that nothing else came.
fn expect_seqs(
    c: &mut Chat,
    numbered: &[u64],
    want: &[u64],
    offline: bool,
    context: &str,
) -> Vec<Value> {
    let mut got = Vec::new();
    for &seq in want {
        let v = next(c, context);
        let i = numbered
            .iter()
            .position(|&s| s == seq)
            .expect("a known seq")
            + 1;
        let body = format!("m{i}");
        assert_eq!(
            assert_private(&v, "alice", "bob", &body, offline, context),
            seq,
            "{context}: {v}"
        );
        got.push(v);
    }
    assert_quiet(c, &format!("{context}: nothing after seq {want:?}"));
    got
}

/// Reads `n` private messages with the bodies `m1`..`mN`, in order, and
/// returns them with their seqs (which grow; they need not be consecutive).
fn receive_numbered(
    c: &mut Chat,
    n: usize,
    offline: bool,
    context: &str,
) -> (Vec<Value>, Vec<u64>) {
    let got: Vec<Value> = (1..=n).map(|_| next(c, context)).collect();
    let seqs: Vec<u64> = got
        .iter()
        .enumerate()
        .map(|(i, v)| assert_private(v, "alice", "bob", &format!("m{}", i + 1), offline, context))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{context}: {seqs:?}");
    (got, seqs)
}

#[test]
fn resume_replays_exactly_the_unacknowledged_messages_even_after_a_restart() {
    let tmp = TempDir::new("resume");
    let dir = tmp.sub("data");
    let mut server = start_on(&dir, &[]);
    let addr = server.addr;
    let mut alice = Chat::joined(addr, "alice");
    let mut bob = join_reliable(addr, "bob", 0);
    for i in 1..=5 {
        let v = send_and_wait(&mut alice, "bob", &format!("m{i}"), &format!("r{i}"));
        assert_eq!(v["status"], "delivered", "live to a reliable client: {v}");
    }
    let (live, s) = receive_numbered(&mut bob, 5, false, "live to reliable bob");
    assert_quiet(&mut bob, "live to reliable bob: nothing else");
    let original: HashMap<u64, (Value, Value)> = live
        .iter()
        .map(|v| {
            (
                v["seq"].as_u64().unwrap(),
                (v["id"].clone(), v["ts"].clone()),
            )
        })
        .collect();

    ack(&mut bob, s[1]);
    drop_abruptly(bob);
    wait_leave(&mut alice, "bob", "bob dropped");
    let mut bob = join_reliable(addr, "bob", s[1]);
    let replay = expect_seqs(&mut bob, &s, &s[2..], true, "resume=2");
    for v in &replay {
        let seq = v["seq"].as_u64().unwrap();
        assert_eq!(
            (v["id"].clone(), v["ts"].clone()),
            original[&seq],
            "replay keeps id and ts: {v}"
        );
    }

    ack(&mut bob, s[2]);
    drop_abruptly(bob);
    wait_leave(&mut alice, "bob", "bob dropped again");
    drop_abruptly(alice);
    kill9(&mut server);

    let server = start_on(&dir, &[]);
    let addr = server.addr;
    let mut alice = Chat::joined(addr, "alice");
    let mut bob = join_reliable(addr, "bob", s[2]);
    let replay = expect_seqs(
        &mut bob,
        &s,
        &s[3..],
        true,
        "resume=3 after kill -9 and restart",
    );
    for v in &replay {
        let seq = v["seq"].as_u64().unwrap();
        assert_eq!(
            (v["id"].clone(), v["ts"].clone()),
            original[&seq],
            "replay keeps id and ts: {v}"
        );
    }

    // resume=4 drops seq 4 without an ack message...
    drop_abruptly(bob);
    wait_leave(&mut alice, "bob", "bob dropped after restart");
    let mut bob = join_reliable(addr, "bob", s[3]);
    expect_seqs(&mut bob, &s, &s[4..], true, "resume=4");
    // ...for good: resume=0 gets only what is still held.
    drop_abruptly(bob);
    wait_leave(&mut alice, "bob", "bob dropped after resume=4");
    let mut bob = join_reliable(addr, "bob", 0);
    expect_seqs(&mut bob, &s, &s[4..], true, "resume=0 after resume=4");
    // A new message continues the sequence.
    assert_eq!(
        send_and_wait(&mut alice, "bob", "m6", "r6")["status"],
        "delivered"
    );
    // (After a restart the numbering may jump ahead: numbers are reserved
    // in blocks so that none is ever reused; it only has to grow.)
    let v = next(&mut bob, "live after the replays");
    let seq = assert_private(&v, "alice", "bob", "m6", false, "live after the replays");
    assert!(
        seq > s[4],
        "a new message after seq {} got seq {seq}: {v}",
        s[4]
    );
    assert_quiet(&mut bob, "nothing after m6");
}

/// alice was told "delivered" when reliable bob got the message live; it
/// was held only until bob's ack. Replaying it after a restart is right,
/// but alice must not be told "delivered" a second time.
#[test]
fn no_second_delivered_receipt_for_a_message_delivered_live_before_a_restart() {
    let tmp = TempDir::new("dupreceipt");
    let dir = tmp.sub("data");
    let mut server = start_on(&dir, &[]);
    let addr = server.addr;
    let mut alice = Chat::joined(addr, "alice");
    let mut bob = join_reliable(addr, "bob", 0);
    let v = send_and_wait(&mut alice, "bob", "m1", "r1");
    assert_eq!(v["status"], "delivered", "{v}");
    let id = id_of(&v);
    let (_, s) = receive_numbered(&mut bob, 1, false, "live");
    assert_quiet(&mut bob, "live: nothing else");
    // Without a restart, a replay does not repeat the receipt.
    drop_abruptly(bob);
    wait_leave(&mut alice, "bob", "bob dropped");
    let mut bob = join_reliable(addr, "bob", 0);
    expect_seqs(&mut bob, &s, &s, true, "replay in the same run");
    assert_quiet(&mut alice, "alice after a replay of a delivered message");
    drop_abruptly(bob);
    drop_abruptly(alice);
    stop(&mut server);

    let server = start_on(&dir, &[]);
    let addr = server.addr;
    let mut alice = Chat::joined(addr, "alice");
    let mut bob = join_reliable(addr, "bob", 0);
    expect_seqs(&mut bob, &s, &s, true, "replay after a restart");
    let extra = drain(&mut alice, "alice after the replay");
    assert!(
        extra.is_empty(),
        "message {id} was already reported delivered (live, before the restart); \
         after the restart alice got again: {extra:?}"
    );
}

// ---------------------------------------------------------------------------
// 4. kill -9 right after `queued`
// ---------------------------------------------------------------------------

#[test]
fn a_queued_message_survives_kill_9() {
    let tmp = TempDir::new("kill9");
    let dir = tmp.sub("data");
    let mut promised: Vec<(u64, String)> = Vec::new();
    for round in 0..3 {
        let mut server = start_on(&dir, &[]);
        let mut alice = Chat::joined(server.addr, "alice");
        // A burst; kill as soon as the first `queued` arrives, with the rest in flight.
        for i in 0..8 {
            private_ref(
                &mut alice,
                "bob",
                &format!("k{round}-{i}"),
                &format!("{round}-{i}"),
            );
        }
        let first = next_where(&mut alice, "first receipt", |v| v["type"] == "receipt");
        assert_eq!(first["status"], "queued", "{first}");
        kill9(&mut server);
        let mut receipts = vec![first];
        receipts.extend(read_until_dead(&mut alice));
        for v in receipts.iter().filter(|v| v["status"] == "queued") {
            let reference = v["ref"].as_str().expect("ref echoed");
            promised.push((id_of(v), format!("k{reference}")));
        }
    }
    let server = start_on(&dir, &[]);
    let (_bob, got) = collect_offline(server.addr, "bob", "after three kills");
    let delivered: HashMap<u64, String> = got
        .iter()
        .map(|v| (id_of(v), v["body"].as_str().unwrap().to_string()))
        .collect();
    for (id, body) in &promised {
        assert_eq!(
            delivered.get(id),
            Some(body),
            "message {id} ({body:?}) got `queued` before kill -9 but was not delivered; got {got:?}"
        );
    }
    let seqs: Vec<u64> = got.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in seq order: {seqs:?}"
    );
    assert_eq!(delivered.len(), got.len(), "no message twice: {got:?}");
}

// ---------------------------------------------------------------------------
// 5. seq is never reused
// ---------------------------------------------------------------------------

#[test]
fn seq_is_never_reused_across_kill_9_and_graceful_restarts() {
    let tmp = TempDir::new("seq");
    let dir = tmp.sub("data");
    let mut seqs: Vec<(String, u64)> = Vec::new();
    let mut note = |v: &Value, what: &str| {
        let seq = v["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no seq in {v}"));
        if let Some((prev_what, prev)) = seqs.last() {
            assert!(
                seq > *prev,
                "seq reused or went back: {what} has seq {seq}, after {prev_what} with {prev}"
            );
        }
        seqs.push((what.to_string(), seq));
    };

    // Run 1: live only, then kill -9 with everyone connected.
    let mut server = start_on(&dir, &[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    for i in 0..3 {
        send_and_wait(&mut alice, "bob", &format!("a{i}"), &format!("a{i}"));
        let v = next(&mut bob, "live in run 1");
        note(&v, &format!("run 1 live a{i}"));
    }
    kill9(&mut server);
    drop((alice, bob));

    // Run 2: live, then one stored; graceful stop.
    let mut server = start_on(&dir, &[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    send_and_wait(&mut alice, "bob", "b0", "b0");
    note(&next(&mut bob, "live in run 2"), "run 2 live b0");
    bob.close();
    wait_leave(&mut alice, "bob", "bob leaves in run 2");
    send_queued(&mut alice, "bob", "b1", "b1");
    alice.close();
    stop(&mut server);

    // Run 3: the stored one, then live; kill -9.
    let mut server = start_on(&dir, &[]);
    let (mut bob, got) = collect_offline(server.addr, "bob", "run 3");
    assert_eq!(got.len(), 1, "the message stored in run 2: {got:?}");
    note(&got[0], "run 3 stored b1");
    let mut alice = Chat::joined(server.addr, "alice");
    send_and_wait(&mut alice, "bob", "c0", "c0");
    note(&next(&mut bob, "live in run 3"), "run 3 live c0");
    kill9(&mut server);
    drop((alice, bob));

    // Run 4: live again.
    let server = start_on(&dir, &[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    assert_quiet(&mut bob, "nothing held in run 4");
    for i in 0..2 {
        send_and_wait(&mut alice, "bob", &format!("d{i}"), &format!("d{i}"));
        note(
            &next(&mut bob, "live in run 4"),
            &format!("run 4 live d{i}"),
        );
    }
}

// ---------------------------------------------------------------------------
// 6. A torn tail is cut, everything before it kept
// ---------------------------------------------------------------------------

/// Runs a server on `dir` in which alice queues `m1`..`mN` for bob, stops
/// it, and returns the log it left.
fn queued_log(dir: &std::path::Path, n: usize) -> Vec<u8> {
    let mut server = start_on(dir, &[]);
    let mut alice = Chat::joined(server.addr, "alice");
    for i in 1..=n {
        send_queued(&mut alice, "bob", &format!("m{i}"), &format!("r{i}"));
    }
    alice.close();
    stop(&mut server);
    fs::read(dir.join(LOG_NAME)).expect("read the log")
}

/// Writes `bytes` as the log of a fresh data dir, starts the server on it,
/// and checks the warning and what bob gets.
fn check_damaged_log(
    tmp: &TempDir,
    name: &str,
    bytes: &[u8],
    cut_expected: bool,
    keep: usize,
    last_start: usize,
) {
    let dir = tmp.sub(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(LOG_NAME), bytes).unwrap();
    let server = start_on(&dir, &[]);
    let warnings = count_lines(&server, CUT_WARNING);
    assert_eq!(
        warnings,
        usize::from(cut_expected),
        "{name}: log of {} bytes (last record at {last_start}): `{CUT_WARNING}` lines; stderr:\n{}",
        bytes.len(),
        server.logs()
    );
    if cut_expected {
        let len = fs::metadata(dir.join(LOG_NAME)).unwrap().len();
        assert_eq!(
            len, last_start as u64,
            "{name}: the log is cut where the bad record starts"
        );
    }
    let (bob, got) = collect_offline(server.addr, "bob", name);
    let bodies: Vec<&str> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
    let want: Vec<String> = (1..=keep).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want, "{name}: messages kept");
    let seqs: Vec<u64> = got.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        relative_seqs(&seqs),
        (1..=keep as u64).collect::<Vec<_>>(),
        "{name}: seqs"
    );
    drop(bob);
    drop(server);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_log_torn_or_corrupted_anywhere_in_its_last_record_keeps_the_rest() {
    let tmp = TempDir::new("torn");
    let whole = queued_log(&tmp.sub("source"), 3);
    let starts = record_starts(&whole);
    let last = *starts.last().expect("records");
    assert_eq!(
        whole[last + 8],
        1,
        "the last record is the third message (a store)"
    );
    assert!(
        whole[last..].windows(2).any(|w| w == b"m3"),
        "the last record holds m3"
    );

    // Every cut from the start of the last record to the full length, and
    // every byte of the last record flipped; four workers.
    let mut cases: Vec<(String, Vec<u8>, bool, usize)> = Vec::new();
    for cut in last..=whole.len() {
        let torn = cut > last && cut < whole.len();
        let keep = if cut == whole.len() { 3 } else { 2 };
        cases.push((format!("cut-{cut}"), whole[..cut].to_vec(), torn, keep));
    }
    for at in last..whole.len() {
        let mut bad = whole.clone();
        bad[at] ^= 0x20;
        cases.push((format!("flip-{at}"), bad, true, 2));
    }
    let tmp = Arc::new(tmp);
    let cases = Arc::new(std::sync::Mutex::new(cases));
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let cases = Arc::clone(&cases);
            let tmp = Arc::clone(&tmp);
            thread::spawn(move || loop {
                let Some((name, bytes, torn, keep)) = cases.lock().unwrap().pop() else {
                    return;
                };
                check_damaged_log(&tmp, &name, &bytes, torn, keep, last);
            })
        })
        .collect();
    let mut failures = Vec::new();
    for w in workers {
        if let Err(e) = w.join() {
            failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "damaged-log cases failed:\n{}",
        failures.join("\n---\n")
    );
    eprintln!(
        "checked {} damaged logs in {:?}",
        2 * (whole.len() - last) + 1,
        started.elapsed()
    );
}

/// One record damaged inside the log between two runs: the records after
/// it are kept, the damaged file is kept aside byte for byte, the log is
/// rewritten clean, and the counts are logged and in `/metrics`.
#[test]
fn a_record_damaged_inside_the_log_loses_only_itself() {
    let tmp = TempDir::new("inside");
    let dir = tmp.sub("data");
    let whole = queued_log(&dir, 100);

    // Flip one byte of m50's body (a string: u32 length, then its bytes).
    let starts = record_starts(&whole);
    let body = b"\x03\x00\x00\x00m50";
    let at = whole
        .windows(body.len())
        .position(|w| w == body)
        .expect("m50 is in the log")
        + 4;
    let record = starts.iter().rposition(|&s| s < at).expect("a record");
    let end = starts.get(record + 1).copied().unwrap_or(whole.len());
    let mut damaged = whole.clone();
    damaged[at] ^= 0x01;
    fs::write(dir.join(LOG_NAME), &damaged).unwrap();

    let mut server = start_on(&dir, &[]);
    let logs = server.logs();
    let kept = starts.len() - 1;
    let lost_bytes = end - starts[record];
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains(DAMAGE_ERROR)).collect();
    assert_eq!(errors.len(), 1, "one ERROR line about the damage:\n{logs}");
    assert!(errors[0].contains("ERROR"), "{}", errors[0]);
    assert!(
        errors[0].contains(&format!("{lost_bytes} bytes in 1 stretch "))
            && errors[0].contains(&format!("{kept} records around them were kept")),
        "{}",
        errors[0]
    );
    assert_eq!(count_lines(&server, CUT_WARNING), 0, "{logs}");
    let aside = kept_aside(&dir);
    assert_eq!(aside.len(), 1, "one damaged log kept aside: {aside:?}");
    assert!(
        errors[0].contains(&*aside[0].to_string_lossy()),
        "{}",
        errors[0]
    );
    assert_eq!(
        fs::read(&aside[0]).unwrap(),
        damaged,
        "the kept file is the damaged log, byte for byte"
    );
    let rewritten = fs::read(dir.join(LOG_NAME)).unwrap();
    assert_eq!(
        rewritten.len(),
        whole.len() - lost_bytes,
        "rewritten without it"
    );
    for (name, want) in [
        ("wschat_store_replay_records_kept", kept as u64),
        ("wschat_store_replay_damaged_bytes", lost_bytes as u64),
        ("wschat_store_replay_damaged_regions", 1),
    ] {
        assert_eq!(metric(server.addr, name), want, "{name}");
    }
    stop(&mut server);

    // The next start finds a clean log, and bob gets the other 99.
    let server = start_on(&dir, &[]);
    assert_eq!(count_lines(&server, DAMAGE_ERROR), 0, "{}", server.logs());
    assert_eq!(count_lines(&server, CUT_WARNING), 0, "{}", server.logs());
    assert_eq!(
        metric(server.addr, "wschat_store_replay_damaged_regions"),
        0
    );
    assert_eq!(kept_aside(&dir).len(), 1, "nothing new kept aside");
    let (_bob, got) = collect_offline(server.addr, "bob", "after the damage");
    let bodies: Vec<&str> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
    let want: Vec<String> = (1..=100)
        .filter(|&i| i != 50)
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(bodies, want, "every message but the damaged one, in order");
    let seqs: Vec<u64> = got.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=100).filter(|&s| s != 50).collect();
    assert_eq!(relative_seqs(&seqs), want, "each keeps its seq");
    eprintln!(
        "damaged 1 byte of record {record} of {}: kept {kept} records ({} messages), lost {lost_bytes} bytes (1 message)",
        starts.len(),
        got.len()
    );
}

// ---------------------------------------------------------------------------
// 7. Compaction under kill -9
// ---------------------------------------------------------------------------

/// What one round of load saw.
#[derive(Default)]
struct Load {
    /// Bodies to carol (never online) that got `queued`.
    carol_queued: Vec<String>,
    /// Bodies to reliable bob that got `delivered`.
    bob_delivered: Vec<String>,
    /// Bodies bob received, with their seq, in order.
    bob_received: Vec<(u64, String)>,
    /// The last ack bob sent.
    bob_acked: u64,
}

#[test]
fn messages_survive_kill_9_during_repeated_compaction() {
    let tmp = TempDir::new("compact");
    let dir = tmp.sub("data");
    let flags = [
        "--compact-min-bytes",
        "4096",
        "--offline-max-per-user",
        "100000",
    ];
    let pad = "x".repeat(400);
    let delays_ms = [60u64, 150, 90, 250, 120, 40, 200, 330];
    let mut all = Load::default();
    let mut compactions = 0;
    let mut scratch_left = 0;
    for (round, delay) in delays_ms.iter().enumerate() {
        let mut server = start_on(&dir, &flags);
        let addr = server.addr;
        let mut alice = Chat::joined(addr, "alice");
        let mut bob = join_reliable(addr, "bob", all.bob_acked);
        let acked_before = all.bob_acked;

        let bob_thread = thread::spawn(move || {
            let mut received = Vec::new();
            let mut acked = acked_before;
            while let Some(v) = try_recv(&mut bob) {
                if v["type"] != "private" {
                    continue;
                }
                let seq = v["seq"].as_u64().expect("seq");
                received.push((seq, v["body"].as_str().unwrap().to_string()));
                // Counted as sent even if the write fails: the server may
                // have got it, and resuming after it is right either way.
                acked = seq;
                let ack = json!({"type": "ack", "seq": seq}).to_string();
                if bob.ws.send(Message::text(ack)).is_err() {
                    break;
                }
            }
            (received, acked)
        });
        let pad = pad.clone();
        let alice_thread = thread::spawn(move || {
            let mut load = Load::default();
            let mut k = 0u64;
            'load: loop {
                k += 1;
                let mut batch = vec![("bob", format!("b{round}-{k}-{pad}"))];
                if k % 3 == 0 {
                    batch.push(("carol", format!("c{round}-{k}")));
                }
                for (to, body) in batch {
                    let reference = format!("{to}-{round}-{k}");
                    let sent = json!({"type": "private", "to": to, "body": body, "ref": reference});
                    if alice.ws.send(Message::text(sent.to_string())).is_err() {
                        break 'load;
                    }
                    loop {
                        let Some(v) = try_recv(&mut alice) else {
                            break 'load;
                        };
                        if v["ref"] != json!(reference) {
                            continue;
                        }
                        match (to, v["status"].as_str()) {
                            ("carol", Some("queued")) => load.carol_queued.push(body.clone()),
                            ("bob", Some("delivered")) => load.bob_delivered.push(body.clone()),
                            _ => panic!("round {round}: unexpected answer to {to}: {v}"),
                        }
                        break;
                    }
                }
            }
            load
        });

        thread::sleep(Duration::from_millis(*delay));
        kill9(&mut server);
        compactions += count_lines(&server, "compacted");
        if dir.join(COMPACT_NAME).exists() {
            scratch_left += 1;
        }
        let load = alice_thread.join().expect("alice's load thread");
        let (received, acked) = bob_thread.join().expect("bob's thread");
        let mut prev = acked_before;
        for (seq, _) in &received {
            assert!(
                *seq > prev,
                "round {round}: bob (resume={acked_before}) got seq {seq} after {prev}"
            );
            prev = *seq;
        }
        all.carol_queued.extend(load.carol_queued);
        all.bob_delivered.extend(load.bob_delivered);
        all.bob_received.extend(received);
        all.bob_acked = acked;
    }
    assert!(
        compactions > 0,
        "no compaction ran during the load, so this test tested nothing"
    );
    eprintln!(
        "{} rounds: {compactions} compactions, {scratch_left} kills left {COMPACT_NAME} behind, \
         {} to carol queued, {} to bob delivered",
        delays_ms.len(),
        all.carol_queued.len(),
        all.bob_delivered.len()
    );

    // Final run: bob resumes after his last ack and gets the rest; carol gets everything.
    let server = start_on(&dir, &flags);
    let mut bob = join_reliable(server.addr, "bob", all.bob_acked);
    for v in drain(&mut bob, "bob's final replay") {
        assert_eq!(v["type"], "private", "{v}");
        let seq = v["seq"].as_u64().unwrap();
        assert!(
            seq > all.bob_acked,
            "bob resumed at {} and got seq {seq}",
            all.bob_acked
        );
        all.bob_received
            .push((seq, v["body"].as_str().unwrap().to_string()));
    }
    let bob_got: Vec<&String> = all.bob_received.iter().map(|(_, b)| b).collect();
    let bob_set: BTreeSet<&String> = bob_got.iter().copied().collect();
    assert_eq!(bob_set.len(), bob_got.len(), "bob got a message twice");
    let lost: Vec<_> = all
        .bob_delivered
        .iter()
        .filter(|b| !bob_set.contains(b))
        .map(|b| b.chars().take(12).collect::<String>())
        .collect();
    assert!(
        lost.is_empty(),
        "reported delivered to bob but never received: {lost:?}"
    );

    let (_carol, got) = collect_offline(server.addr, "carol", "carol after the kills");
    let carol_got: Vec<String> = got
        .iter()
        .map(|v| v["body"].as_str().unwrap().to_string())
        .collect();
    let carol_set: BTreeSet<&String> = carol_got.iter().collect();
    assert_eq!(
        carol_set.len(),
        carol_got.len(),
        "carol got a message twice: {carol_got:?}"
    );
    let lost: Vec<_> = all
        .carol_queued
        .iter()
        .filter(|b| !carol_set.contains(b))
        .collect();
    assert!(
        lost.is_empty(),
        "got `queued` but lost after kill -9 during compaction: {lost:?} (carol got {carol_got:?})"
    );
    let seqs: Vec<u64> = got.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "carol's seqs in order: {seqs:?}"
    );
    // Sent order is kept too.
    let order: Vec<&String> = all.carol_queued.iter().collect();
    let positions: Vec<usize> = order
        .iter()
        .map(|b| carol_got.iter().position(|g| g == *b).unwrap())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "carol's messages out of order"
    );
}

#[test]
fn a_leftover_compaction_file_is_ignored() {
    let tmp = TempDir::new("scratch");
    // A valid log with a different message, to plant as the scratch file.
    let decoy = tmp.sub("decoy");
    let mut server = start_on(&decoy, &[]);
    let mut alice = Chat::joined(server.addr, "alice");
    send_queued(&mut alice, "bob", "decoy", "d");
    alice.close();
    stop(&mut server);
    let decoy_log = fs::read(decoy.join(LOG_NAME)).unwrap();

    for (name, scratch) in [
        (
            "garbage",
            b"\xff\xfe not a log at all \x00\x01\x02".repeat(50),
        ),
        ("valid-other-log", decoy_log),
    ] {
        let dir = tmp.sub(name);
        let mut server = start_on(&dir, &[]);
        let mut alice = Chat::joined(server.addr, "alice");
        send_queued(&mut alice, "bob", "m1", "r1");
        send_queued(&mut alice, "bob", "m2", "r2");
        alice.close();
        stop(&mut server);
        fs::write(dir.join(COMPACT_NAME), &scratch).unwrap();

        let server = start_on(&dir, &[]);
        let (_bob, got) = collect_offline(server.addr, "bob", name);
        let bodies: Vec<_> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
        assert_eq!(
            bodies,
            ["m1", "m2"],
            "{name}: the log, not the scratch file, counts"
        );
        assert_eq!(
            count_lines(&server, CUT_WARNING),
            0,
            "{name}: {}",
            server.logs()
        );
    }
}

// ---------------------------------------------------------------------------
// 8. Quotas
// ---------------------------------------------------------------------------

#[test]
fn a_full_outbox_refuses_with_offline_queue_full() {
    let tmp = TempDir::new("quota");
    let server = start_on(&tmp.sub("count"), &["--offline-max-per-user", "2"]);
    let mut alice = Chat::joined(server.addr, "alice");
    send_queued(&mut alice, "bob", "m1", "r1");
    send_queued(&mut alice, "bob", "m2", "r2");
    let v = send_and_wait(&mut alice, "bob", "m3", "r3");
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str(), v["ref"].as_str()),
        (Some("error"), Some("offline_queue_full"), Some("r3")),
        "the third held message: {v}"
    );
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    // Another user's outbox is separate.
    send_queued(&mut alice, "carol", "c1", "c1");
    let (_bob, got) = collect_offline(server.addr, "bob", "bob after the quota");
    let bodies: Vec<_> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["m1", "m2"], "the refused message is not stored");
    drop(server);

    let server = start_on(
        &tmp.sub("bytes"),
        &[
            "--offline-max-bytes",
            "1024",
            "--offline-max-bytes-per-sender",
            "1024",
        ],
    );
    let mut alice = Chat::joined(server.addr, "alice");
    let big = "y".repeat(600);
    send_queued(&mut alice, "bob", &big, "big1");
    let v = send_and_wait(&mut alice, "bob", &big, "big2");
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str(), v["ref"].as_str()),
        (Some("error"), Some("offline_queue_full"), Some("big2")),
        "a second 600-byte body under --offline-max-bytes 1024: {v}"
    );
    let v = send_and_wait(&mut alice, "carol", &big, "big3");
    assert_eq!(
        (v["code"].as_str(), v["ref"].as_str()),
        (Some("offline_queue_full"), Some("big3")),
        "the byte quota is for all outboxes together: {v}"
    );
    let (_bob, got) = collect_offline(server.addr, "bob", "bob after the byte quota");
    assert_eq!(
        got.len(),
        1,
        "only the first big message is stored: {got:?}"
    );
}

// ---------------------------------------------------------------------------
// 9. Time to live
// ---------------------------------------------------------------------------

#[test]
fn held_messages_expire_with_a_receipt_and_are_not_delivered() {
    let tmp = TempDir::new("ttl");
    let dir = tmp.sub("data");
    let mut server = start_on(&dir, &["--offline-ttl", "300ms"]);
    let addr = server.addr;
    // zed's message to carol expires while zed is offline.
    let mut zed = Chat::joined(addr, "zed");
    send_queued(&mut zed, "carol", "for carol", "z");
    zed.close();

    let mut alice = Chat::joined(addr, "alice");
    let sent_at = Instant::now();
    let id = send_queued(&mut alice, "bob", "soon gone", "a");
    let v = next_where(&mut alice, "the expired receipt", |v| {
        v["type"] == "receipt"
    });
    let waited = sent_at.elapsed();
    assert_eq!(v, json!({"type": "receipt", "id": id, "status": "expired"}));
    assert!(
        waited >= Duration::from_millis(290),
        "expired after {waited:?}, before the 300 ms time to live"
    );
    assert!(
        waited < Duration::from_millis(2000),
        "expired only after {waited:?} with a 300 ms time to live"
    );

    let (bob, got) = collect_offline(addr, "bob", "bob after expiry");
    assert!(got.is_empty(), "an expired message was delivered: {got:?}");
    let (carol, got) = collect_offline(addr, "carol", "carol after expiry");
    assert!(got.is_empty(), "an expired message was delivered: {got:?}");
    assert_quiet(&mut alice, "no more receipts for alice");

    // Not back after a restart either.
    bob.close();
    carol.close();
    alice.close();
    stop(&mut server);
    let server = start_on(&dir, &["--offline-ttl", "300ms"]);
    for name in ["bob", "carol"] {
        let (_c, got) = collect_offline(server.addr, name, "after a restart");
        assert!(
            got.is_empty(),
            "{name}: an expired message came back: {got:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 10. A data directory that cannot be used
// ---------------------------------------------------------------------------

#[test]
fn a_second_server_on_a_data_dir_in_use_exits_2_until_the_first_is_gone() {
    let tmp = TempDir::new("locked");
    let dir = tmp.sub("data");
    let dir_str = dir.to_str().unwrap();
    let mut first = start_on(&dir, &[]);
    let mut alice = Chat::joined(first.addr, "alice");
    send_queued(&mut alice, "bob", "before", "b");
    let log_before = fs::read(dir.join(LOG_NAME)).unwrap();

    let out = run_to_exit(&["--data-dir", dir_str]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(out.status.code(), Some(2), "second server: {stderr}");
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains(dir_str) && lines[0].contains("another process is using it"),
        "the line names the directory and why: {stderr}"
    );
    assert_eq!(
        fs::read(dir.join(LOG_NAME)).unwrap(),
        log_before,
        "the refused server did not touch the log"
    );

    // The first one is unaffected.
    first.assert_running();
    send_queued(&mut alice, "bob", "after", "a");
    alice.close();
    stop(&mut first);

    let server = start_on(&dir, &[]);
    let (_bob, got) = collect_offline(server.addr, "bob", "after the first server stopped");
    let bodies: Vec<&str> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["before", "after"]);
}

#[test]
fn an_unusable_data_dir_exits_2_with_one_line() {
    let tmp = TempDir::new("baddir");
    let file = tmp.path.join("plain-file");
    fs::write(&file, b"not a directory").unwrap();
    for dir in [file.join("data"), file.clone()] {
        let out = run_to_exit(&["--data-dir", dir.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            out.status.code(),
            Some(2),
            "--data-dir {}: exit status {:?}; stderr:\n{stderr}",
            dir.display(),
            out.status
        );
        assert_eq!(
            lines.len(),
            1,
            "--data-dir {}: stderr:\n{stderr}",
            dir.display()
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            lines[0].contains(dir.to_str().unwrap()),
            "the line names the directory: {stderr}"
        );
    }
}
