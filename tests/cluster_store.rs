//! `--cluster` with the offline store in Redis (docs/CLUSTER.md, "Offline
//! store in Redis"): real wschat nodes over a real `redis-server` that each
//! test starts on a free port with a temporary directory. Held messages,
//! `resume` cursors, quotas, expiry and the names that may be sent to are
//! the cluster's, not a node's. Without `redis-server` the tests print
//! `skipped: no redis-server` and pass, except under `CI=true`, where they
//! fail.

mod chat_support;
mod cluster_support;
mod offline_support;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use chat_support::{now_ms, ws_path, Chat, ChatServer, Event};
use cluster_support::{metric, node, wait_for_cluster, NO_CLIENT_LIMITS};
use offline_support::{
    assert_private, drain, drop_abruptly, next, next_where, resume_path, send_and_wait, stop,
    TempDir,
};
use serde_json::{json, Value};
use support::http;
use support::redis::Redis;
use wschat::cluster::resp::Frame;

/// The default `--cluster-prefix`: the keys checked below are `wschat:...`.
const PREFIX: &str = "wschat";

/// Asks for `users` until `name` is listed (presence crosses nodes asynchronously).
fn wait_listed(c: &mut Chat, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        c.send(json!({"type": "users"}));
        let v = next_where(c, "users", |v| v["type"] == "users");
        if v["users"]
            .as_array()
            .is_some_and(|u| u.contains(&json!(name)))
        {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never listed: {v}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn id_of(v: &Value) -> u64 {
    v["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("`id` is not a non-negative integer: {v}"))
}

fn seq_of(v: &Value) -> u64 {
    v["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("`seq` is not a non-negative integer: {v}"))
}

/// Opens `path` on `addr` until it is let in: a name whose lease another
/// node still holds (it left a moment ago, or its node was killed and the
/// lease has not lapsed) is refused with `username_taken`, and a node that
/// is reconnecting to Redis closes a join with 1013; both are tried again
/// every `pause` for a few seconds. Returns the client and its welcome.
fn join_when_free(addr: SocketAddr, path: &str, label: &str, pause: Duration) -> (Chat, Value) {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let mut c = Chat::open(addr, path);
        c.label = label.to_string();
        let refused = loop {
            match c.event(label) {
                Event::Ping => {}
                Event::Json(v) if v["type"] == "welcome" => return (c, v),
                Event::Json(v) if v["code"] == "username_taken" => break format!("{v}"),
                Event::Close(Some((1013, why))) => break format!("1013 {why}"),
                other => panic!("{label}: joining {path} on {addr}: {other:?}"),
            }
        };
        assert!(
            Instant::now() < deadline,
            "{label}: still refused after 8 s: {refused}"
        );
        thread::sleep(pause);
    }
}

/// `NAME` connects once on `addr` and leaves, so that it is a known user
/// of the cluster; waits until Redis has remembered it (`P:known`).
fn make_known(redis: &Redis, addr: SocketAddr, name: &str) {
    Chat::joined(addr, name).close();
    let key = format!("{PREFIX}:known");
    let mut r = redis.client();
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.call(&["SISMEMBER", key.as_str(), name]) != Frame::Integer(1) {
        assert!(
            Instant::now() < deadline,
            "{name} connected but is not in {key}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// How many messages `name`'s outbox in Redis holds.
fn box_len(redis: &Redis, name: &str) -> i64 {
    match redis
        .client()
        .call(&["XLEN", format!("{PREFIX}:box:{name}").as_str()])
    {
        Frame::Integer(n) => n,
        other => panic!("XLEN: {other:?}"),
    }
}

/// Waits (a few seconds at most) until `name`'s outbox holds `want`.
fn wait_box_len(redis: &Redis, name: &str, want: i64, context: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = box_len(redis, name);
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: {name}'s outbox in Redis holds {n}, expected {want}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The next `n` messages that are not presence; each must be a private.
fn privates(c: &mut Chat, n: usize, context: &str) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let v = next(c, context);
            assert_eq!(
                v["type"], "private",
                "{}: {context}: message {i} of {n}: {v}",
                c.label
            );
            v
        })
        .collect()
}

/// The next `n` receipts (other messages skipped); each must say `status`.
fn receipts(c: &mut Chat, status: &str, n: usize, context: &str) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let v = next_where(c, context, |v| v["type"] == "receipt");
            assert_eq!(v["status"], json!(status), "{}: {context}: {v}", c.label);
            id_of(&v)
        })
        .collect()
}

/// `body` for a failure message: its start, and its length if long.
fn shown(body: &str) -> String {
    match body.char_indices().nth(24) {
        Some((at, _)) => format!("{:?}... ({} bytes)", &body[..at], body.len()),
        None => format!("{body:?}"),
    }
}

/// Sends and expects the receipt `status` (matched by `ref`); returns the id.
fn send_expecting(c: &mut Chat, to: &str, body: &str, reference: &str, status: &str) -> u64 {
    let v = send_and_wait(c, to, body, reference);
    assert_eq!(
        (v["type"].as_str(), v["status"].as_str()),
        (Some("receipt"), Some(status)),
        "{}: private {} to {to}: expected a {status} receipt, got {v}",
        c.label,
        shown(body)
    );
    id_of(&v)
}

/// Sends and expects the error `code` (matched by `ref`).
fn send_refused(c: &mut Chat, to: &str, body: &str, reference: &str, code: &str) {
    let v = send_and_wait(c, to, body, reference);
    assert_eq!(
        (v["type"].as_str(), v["code"].as_str(), v["ref"].as_str()),
        (Some("error"), Some(code), Some(reference)),
        "{}: private {} to {to}: expected {code}, got {v}",
        c.label,
        shown(body)
    );
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

/// Sends until the answer is no longer the error `code` (a quota freed
/// asynchronously), then expects `queued`; returns the id.
fn send_when_room(c: &mut Chat, to: &str, body: &str, label: &str, code: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    for attempt in 0.. {
        let reference = format!("{label}-try{attempt}");
        let v = send_and_wait(c, to, body, &reference);
        if v["type"] == "error" && v["code"] == json!(code) {
            assert!(
                Instant::now() < deadline,
                "{}: {label} to {to} still refused {code} after the quota was freed: {v}",
                c.label
            );
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        assert_eq!(
            (v["type"].as_str(), v["status"].as_str()),
            (Some("receipt"), Some("queued")),
            "{}: {label} to {to}: {v}",
            c.label
        );
        return id_of(&v);
    }
    unreachable!()
}

/// Nothing more is held for `to`: a live private from `from` is the next
/// private `to` gets (held messages come before any live one), and it is
/// numbered above `above`. Returns its seq.
fn next_is_live(from: &mut Chat, to: &mut Chat, body: &str, above: u64, context: &str) -> u64 {
    let to_name = to.label.split('(').next().unwrap_or_default().to_string();
    let from_name = from.label.clone();
    let reference = format!("live-{body}");
    let v = send_and_wait(from, &to_name, body, &reference);
    assert_eq!(v["status"], "delivered", "{context}: a live private: {v}");
    let got = next(to, context);
    let seq = assert_private(&got, &from_name, &to_name, body, false, context);
    assert_eq!(id_of(&got), id_of(&v), "{context}: {got}");
    assert!(
        seq > above,
        "{context}: a new message got seq {seq}, not above {above}: {got}"
    );
    seq
}

// ---------------------------------------------------------------------------
// 1. Held on one node, delivered on another
// ---------------------------------------------------------------------------

#[test]
fn messages_held_for_an_offline_user_are_delivered_once_in_order_on_another_node() {
    let Some(redis) = Redis::start(
        "messages_held_for_an_offline_user_are_delivered_once_in_order_on_another_node",
        &[],
    ) else {
        return;
    };
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    wait_for_cluster(&[&a, &b]);
    make_known(&redis, b.addr, "bob");
    let mut alice = Chat::joined(a.addr, "alice");
    let mut dave = Chat::joined(b.addr, "dave");

    // Two senders on two nodes, one after the other: the cluster's one
    // counter numbers them in the order Redis accepted them.
    let mut sent = Vec::new();
    for i in 0..6 {
        let body = format!("m{i}");
        let (sender, name) = if i % 2 == 0 {
            (&mut alice, "alice")
        } else {
            (&mut dave, "dave")
        };
        let id = send_expecting(sender, "bob", &body, &format!("r{i}"), "queued");
        sent.push((name, body, id));
    }
    wait_box_len(&redis, "bob", 6, "six queued");
    // Every node shows the store's size, cluster-wide (read once a second).
    for n in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let m = http::get(n.addr, "/metrics");
            if metric(&m, "wschat_cluster_store_messages") == Some(6.0) {
                assert!(metric(&m, "wschat_cluster_store_bytes").unwrap_or(0.0) > 6.0 * 64.0);
                break;
            }
            assert!(Instant::now() < deadline, "store size not shown:\n{m}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let mut bob = Chat::joined(b.addr, "bob");
    let got = privates(&mut bob, 6, "held messages after the welcome");
    let mut seqs = Vec::new();
    for (v, (from, body, id)) in got.iter().zip(&sent) {
        seqs.push(assert_private(v, from, "bob", body, true, "held message"));
        assert_eq!(id_of(v), *id, "a held message keeps its id: {v}");
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seq grows in the order sent, across nodes: {seqs:?}"
    );

    // Each sender is told each of its messages was delivered, once.
    let mut to_alice = receipts(&mut alice, "delivered", 3, "alice's delivered receipts");
    let mut to_dave = receipts(&mut dave, "delivered", 3, "dave's delivered receipts");
    to_alice.sort_unstable();
    to_dave.sort_unstable();
    let ids_of = |who: &str| -> Vec<u64> {
        let mut ids: Vec<u64> = sent
            .iter()
            .filter(|(from, _, _)| *from == who)
            .map(|(_, _, id)| *id)
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(to_alice, ids_of("alice"));
    assert_eq!(to_dave, ids_of("dave"));

    // A simple client: what was written to it is gone from Redis...
    wait_box_len(&redis, "bob", 0, "after delivery to a simple client");
    // ...and a live message now is the next thing, numbered after them.
    let last = *seqs.last().unwrap();
    let live = next_is_live(&mut alice, &mut bob, "live", last, "live after held");

    // Reconnecting (on the other node): nothing again.
    bob.close();
    let mut bob = Chat::joined(a.addr, "bob");
    next_is_live(&mut dave, &mut bob, "again", live, "after a reconnect");
    let extra = drain(&mut alice, "no second delivered receipt");
    assert!(
        extra.iter().all(|v| v["type"] != "receipt"),
        "alice: {extra:?}"
    );
}

// ---------------------------------------------------------------------------
// 2. A reliable client resumes on another node after a kill -9
// ---------------------------------------------------------------------------

#[test]
fn a_reliable_client_resumes_on_another_node_after_its_node_is_killed() {
    let Some(redis) = Redis::start(
        "a_reliable_client_resumes_on_another_node_after_its_node_is_killed",
        &[],
    ) else {
        return;
    };
    let mut a = node(&redis, &[]);
    let (b, c) = (node(&redis, &[]), node(&redis, &[]));
    wait_for_cluster(&[&a, &b, &c]);
    let mut alice = Chat::joined(c.addr, "alice");
    let (mut bob, _) = join_when_free(
        a.addr,
        &resume_path("bob", 0),
        "bob",
        Duration::from_millis(20),
    );
    wait_listed(&mut alice, "bob");

    let mut sent = Vec::new();
    for i in 1..=6 {
        let id = send_expecting(
            &mut alice,
            "bob",
            &format!("m{i}"),
            &format!("r{i}"),
            "delivered",
        );
        sent.push(id);
    }
    let live = privates(&mut bob, 6, "live to reliable bob on A");
    let mut s = Vec::new();
    for (i, v) in live.iter().enumerate() {
        s.push(assert_private(
            v,
            "alice",
            "bob",
            &format!("m{}", i + 1),
            false,
            "live",
        ));
        assert_eq!(id_of(v), sent[i], "{v}");
    }
    assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
    let original: HashMap<u64, Value> = live.iter().map(|v| (seq_of(v), v.clone())).collect();
    // Live messages of a reliable client are held until acknowledged.
    wait_box_len(&redis, "bob", 6, "six live, none acked");

    bob.send(json!({"type": "ack", "seq": s[3]}));
    wait_box_len(&redis, "bob", 2, "after ack of m4");
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5));
    drop(bob);

    // On B, once A's lease on the name has lapsed, from the last ack: m5
    // and m6, as they were, and nothing bob acknowledged.
    let (mut bob, _) = join_when_free(
        b.addr,
        &resume_path("bob", s[3]),
        "bob(resume on B)",
        Duration::from_millis(50),
    );
    let replay = |bob: &mut Chat, want: &[u64], context: &str| {
        for (&seq, v) in want.iter().zip(privates(bob, want.len(), context)) {
            assert_eq!(seq_of(&v), seq, "{context}: {v}");
            let was = &original[&seq];
            assert_eq!(
                (&v["id"], &v["ts"], &v["from"], &v["body"]),
                (&was["id"], &was["ts"], &was["from"], &was["body"]),
                "{context}: a replay is the message as first given: {v}"
            );
            assert_eq!(v["offline"], json!(true), "{context}: {v}");
        }
    };
    replay(&mut bob, &s[4..], "resume on B after kill -9 of A");
    // Then live traffic, numbered above.
    let m7 = next_is_live(&mut alice, &mut bob, "m7", s[5], "live on B");

    // resume=N on another node (C) gives what follows N, acknowledged or
    // not: m7 only.
    drop_abruptly(bob);
    let (mut bob, _) = join_when_free(
        c.addr,
        &resume_path("bob", s[5]),
        "bob(resume=m6 on C)",
        Duration::from_millis(20),
    );
    let bodies_of = |got: &[Value]| -> Vec<String> {
        got.iter()
            .map(|v| v["body"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let got = privates(&mut bob, 1, "resume=m6 on C");
    assert_eq!(
        (seq_of(&got[0]), bodies_of(&got)),
        (m7, vec!["m7".into()]),
        "resume=m6 on C: only what follows m6: {got:?}"
    );
    assert_eq!(got[0]["offline"], json!(true), "{got:?}");
    let m8 = next_is_live(&mut alice, &mut bob, "m8", m7, "live on C");

    // ...and drops up to N, for the cluster: resuming from before it (and
    // before the ack of m4) on B gives only m7 and m8.
    drop_abruptly(bob);
    let (mut bob, _) = join_when_free(
        b.addr,
        &resume_path("bob", s[1]),
        "bob(resume=m2 on B)",
        Duration::from_millis(20),
    );
    let got = privates(&mut bob, 2, "resume=m2 on B");
    assert_eq!(
        (got.iter().map(seq_of).collect::<Vec<_>>(), bodies_of(&got)),
        (vec![m7, m8], vec!["m7".into(), "m8".into()]),
        "resume=m2 on B, after resume=m6 on C: {got:?}"
    );
    next_is_live(&mut alice, &mut bob, "m9", m8, "live on B again");

    // A resume point above anything the cluster handed out acknowledges
    // nothing: everything held comes again.
    bob.close();
    let (mut bob, _) = join_when_free(
        c.addr,
        &resume_path("bob", u64::MAX / 2),
        "bob(resume far ahead)",
        Duration::from_millis(20),
    );
    let got = privates(&mut bob, 3, "resume above every seq");
    assert_eq!(bodies_of(&got), ["m7", "m8", "m9"], "{got:?}");
    assert!(got.iter().all(|v| v["offline"] == json!(true)), "{got:?}");
}

// ---------------------------------------------------------------------------
// 3. Quotas and time to live, cluster-wide
// ---------------------------------------------------------------------------

#[test]
fn per_user_and_per_sender_quotas_count_messages_sent_through_every_node() {
    let Some(redis) = Redis::start(
        "per_user_and_per_sender_quotas_count_messages_sent_through_every_node",
        &[],
    ) else {
        return;
    };
    let quotas = [
        "--offline-max-per-user",
        "3",
        "--offline-max-per-sender",
        "4",
    ];
    let (a, b) = (node(&redis, &quotas), node(&redis, &quotas));
    wait_for_cluster(&[&a, &b]);
    make_known(&redis, a.addr, "carol");
    make_known(&redis, b.addr, "erin");
    let mut alice = Chat::joined(a.addr, "alice");
    let mut dave = Chat::joined(b.addr, "dave");

    let c1 = send_expecting(&mut alice, "carol", "c1", "c1", "queued");
    let c2 = send_expecting(&mut alice, "carol", "c2", "c2", "queued");
    let e1 = send_expecting(&mut alice, "erin", "e1", "e1", "queued");
    let e2 = send_expecting(&mut alice, "erin", "e2", "e2", "queued");
    // carol's box: two through A, the third through B, no fourth.
    let c3 = send_expecting(&mut dave, "carol", "c3", "c3", "queued");
    send_refused(&mut dave, "carol", "c4", "c4", "offline_queue_full");
    send_refused(&mut alice, "carol", "c5", "c5", "offline_queue_full");
    // alice's share: four held, whatever node she sends from now.
    alice.close();
    let mut alice = Chat::joined(b.addr, "alice");
    send_refused(&mut alice, "erin", "e3", "e3", "offline_sender_limit");
    // Others still may.
    let e5 = send_expecting(&mut dave, "erin", "e5", "e5", "queued");

    let mut carol = Chat::joined(b.addr, "carol");
    let got = privates(&mut carol, 3, "carol's held messages");
    let bodies: Vec<_> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
    assert_eq!(
        bodies,
        ["c1", "c2", "c3"],
        "the refused ones were not stored"
    );
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), [c1, c2, c3]);
    let mut to_alice = receipts(&mut alice, "delivered", 2, "alice's receipts (now on B)");
    to_alice.sort_unstable();
    assert_eq!(to_alice, [c1.min(c2), c1.max(c2)]);
    assert_eq!(receipts(&mut dave, "delivered", 1, "dave's receipt"), [c3]);
    next_is_live(&mut dave, &mut carol, "hi", seq_of(&got[2]), "carol live");

    carol.close();

    // carol's messages were delivered: alice's share is two again (e1, e2).
    let c6 = send_when_room(&mut alice, "carol", "c6", "c6", "offline_sender_limit");
    let mut erin = Chat::joined(a.addr, "erin");
    let got = privates(&mut erin, 3, "erin's held messages");
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), [e1, e2, e5]);
    next_is_live(
        &mut dave,
        &mut erin,
        "hi",
        seq_of(&got[2]),
        "erin: nothing more held",
    );
    let mut carol = Chat::joined(a.addr, "carol");
    let got = privates(&mut carol, 1, "carol's message after the quota freed");
    assert_eq!((id_of(&got[0]), &got[0]["body"]), (c6, &json!("c6")));
    next_is_live(
        &mut dave,
        &mut carol,
        "bye",
        seq_of(&got[0]),
        "carol: nothing more held",
    );
}

#[test]
fn the_byte_quota_is_one_for_the_whole_cluster_and_delivery_frees_it() {
    let Some(redis) = Redis::start(
        "the_byte_quota_is_one_for_the_whole_cluster_and_delivery_frees_it",
        &[],
    ) else {
        return;
    };
    let bytes = [
        "--offline-max-bytes",
        "2048",
        "--offline-max-bytes-per-sender",
        "2048",
    ];
    let (a, b) = (node(&redis, &bytes), node(&redis, &bytes));
    wait_for_cluster(&[&a, &b]);
    make_known(&redis, a.addr, "carol");
    make_known(&redis, b.addr, "erin");
    let mut alice = Chat::joined(a.addr, "alice");
    let mut dave = Chat::joined(b.addr, "dave");
    let big = "x".repeat(1200);

    let first = send_expecting(&mut alice, "carol", &big, "big1", "queued");
    // 1200 bytes are held through A: a second 1200 through B does not fit
    // in 2048, whoever it is for; a small one does.
    send_refused(&mut dave, "erin", &big, "big2", "offline_queue_full");
    let small = send_expecting(&mut dave, "erin", "small", "small", "queued");

    let mut carol = Chat::joined(b.addr, "carol");
    let got = privates(&mut carol, 1, "carol's big message");
    assert_eq!((id_of(&got[0]), &got[0]["body"]), (first, &json!(big)));
    // Delivered to a simple client: its bytes are free again, cluster-wide.
    let second = send_when_room(&mut dave, "erin", &big, "big2", "offline_queue_full");
    let mut erin = Chat::joined(a.addr, "erin");
    let got = privates(&mut erin, 2, "erin's held messages");
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), [small, second]);
    next_is_live(
        &mut alice,
        &mut erin,
        "hi",
        seq_of(&got[1]),
        "erin: nothing more held",
    );
}

#[test]
fn held_messages_expire_cluster_wide_with_a_receipt_to_their_senders() {
    let Some(redis) = Redis::start(
        "held_messages_expire_cluster_wide_with_a_receipt_to_their_senders",
        &[],
    ) else {
        return;
    };
    let ttl = ["--offline-ttl", "1s"];
    let (a, b) = (node(&redis, &ttl), node(&redis, &ttl));
    wait_for_cluster(&[&a, &b]);
    make_known(&redis, b.addr, "bob");
    let mut alice = Chat::joined(a.addr, "alice");
    let mut dave = Chat::joined(b.addr, "dave");

    let sent_at = Instant::now();
    let from_alice = send_expecting(&mut alice, "bob", "soon gone", "a", "queued");
    let from_dave = send_expecting(&mut dave, "bob", "gone too", "d", "queued");
    for (sender, id) in [(&mut alice, from_alice), (&mut dave, from_dave)] {
        let v = next_where(sender, "the expired receipt", |v| v["type"] == "receipt");
        let waited = sent_at.elapsed();
        assert_eq!(
            v,
            json!({"type": "receipt", "id": id, "status": "expired"}),
            "{}",
            sender.label
        );
        assert!(
            waited >= Duration::from_millis(990),
            "{}: expired after {waited:?}, before the 1 s time to live",
            sender.label
        );
        assert!(
            waited < Duration::from_secs(4),
            "{}: expired only after {waited:?} with a 1 s time to live (swept every second)",
            sender.label
        );
    }
    wait_box_len(&redis, "bob", 0, "after expiry");

    // bob, on either node, gets neither.
    let mut bob = Chat::joined(a.addr, "bob");
    next_is_live(&mut dave, &mut bob, "live", 0, "bob after expiry, on A");
    bob.close();
    let mut bob = Chat::joined(b.addr, "bob");
    next_is_live(&mut alice, &mut bob, "live 2", 0, "bob after expiry, on B");
    for sender in [&mut alice, &mut dave] {
        let extra = drain(sender, "one expired receipt each");
        assert!(
            extra.iter().all(|v| v["status"] != "expired"),
            "{}: {extra:?}",
            sender.label
        );
    }
}

// ---------------------------------------------------------------------------
// 4. A private meeting its recipient's join on another node
// ---------------------------------------------------------------------------

/// What alice's sender thread saw: for each message, its id, body and
/// first answer (`queued`, `delivered`, or an error code).
type Outcomes = Vec<(u64, String, String)>;

/// Sends `m0`, `m1`, ... to bob one after another until `stop`, each
/// waiting for its first answer.
fn send_continuously(mut alice: Chat, stop: Arc<AtomicBool>) -> Outcomes {
    let mut outcomes = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && i < 50_000 {
        let body = format!("m{i}");
        alice.send(json!({"type": "private", "to": "bob", "body": body, "ref": body}));
        let v = next_where(&mut alice, "alice's answer", |v| v["ref"] == json!(body));
        let outcome = match v["type"].as_str() {
            Some("receipt") => v["status"].as_str().unwrap_or_default(),
            _ => v["code"].as_str().unwrap_or_default(),
        };
        outcomes.push((v["id"].as_u64().unwrap_or(0), body, outcome.to_string()));
        i += 1;
    }
    outcomes
}

/// The next JSON message, or `None` when nothing came for `quiet`.
fn recv_within(c: &mut Chat, quiet: Duration) -> Option<Value> {
    c.ws.get_ref()
        .set_read_timeout(Some(quiet))
        .expect("set read timeout");
    let got = loop {
        match c.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                break Some(serde_json::from_str(t.as_str()).expect("server sent JSON"))
            }
            Ok(tungstenite::Message::Close(f)) => panic!("{}: closed: {f:?}", c.label),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break None
            }
            Err(e) => panic!("{}: read failed: {e}", c.label),
        }
    };
    c.ws.get_ref()
        .set_read_timeout(Some(chat_support::IO_TIMEOUT))
        .expect("set read timeout");
    got
}

/// A clean close that does not read what is still arriving (privates sent
/// meanwhile are not taken as received: a reliable client gets them again).
fn close_unread(mut c: Chat) {
    c.ws.close(None)
        .unwrap_or_else(|e| panic!("{}: starting the close failed: {e}", c.label));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match c.ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => return,
            Err(e) => panic!("{}: closing handshake failed: {e}", c.label),
        }
        assert!(
            Instant::now() < deadline,
            "{}: server never finished the closing handshake",
            c.label
        );
    }
}

#[test]
fn privates_racing_a_reliable_recipients_reconnects_across_nodes_arrive_exactly_once() {
    let Some(redis) = Redis::start(
        "privates_racing_a_reliable_recipients_reconnects_across_nodes_arrive_exactly_once",
        &[],
    ) else {
        return;
    };
    let open = [
        "--offline-max-per-user",
        "1000000",
        "--offline-max-per-sender",
        "1000000",
    ];
    let (a, b, c) = (
        node(&redis, &open),
        node(&redis, &open),
        node(&redis, &open),
    );
    wait_for_cluster(&[&a, &b, &c]);
    make_known(&redis, b.addr, "bob");
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let alice = Chat::joined(a.addr, "alice");
        let stop = Arc::clone(&stop);
        thread::spawn(move || send_continuously(alice, stop))
    };

    // bob: a reliable client, connecting on B and C in turn, resuming from
    // the last seq he has seen, reading 0 to 3 privates a session, acking
    // or not, leaving cleanly or not.
    let mut received: Vec<Value> = Vec::new();
    let mut last = 0u64;
    let started = Instant::now();
    let mut rounds = 0;
    while rounds < 300 && started.elapsed() < Duration::from_secs(10) {
        let addr = if rounds % 2 == 0 { b.addr } else { c.addr };
        let label = format!("bob(round {rounds}, resume={last})");
        let (mut bob, _) = join_when_free(
            addr,
            &resume_path("bob", last),
            &label,
            Duration::from_millis(5),
        );
        // Whatever is held comes first (offline), then live ones: read up
        // to the 0th to 3rd live one, so that the backlog stays small.
        let mut live = 0;
        while live < rounds % 4 {
            let v = next(&mut bob, &label);
            assert_eq!(v["type"], "private", "{label}: {v}");
            live += usize::from(v["offline"] != json!(true));
            last = last.max(seq_of(&v));
            received.push(v);
        }
        let mode = (rounds / 2) % 4;
        if mode % 2 == 0 && last > 0 {
            bob.send(json!({"type": "ack", "seq": last}));
        }
        if mode < 2 {
            close_unread(bob);
        } else {
            drop_abruptly(bob);
        }
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let outcomes = sender.join().expect("alice's sender thread");

    // A last session gets whatever is still held.
    let accepted: Vec<u64> = outcomes
        .iter()
        .filter(|(_, _, o)| o == "queued" || o == "delivered")
        .map(|(id, _, _)| *id)
        .collect();
    let (mut bob, _) = join_when_free(
        b.addr,
        &resume_path("bob", last),
        "bob(last session)",
        Duration::from_millis(5),
    );
    let mut seen: std::collections::HashSet<u64> = received.iter().map(id_of).collect();
    let mut missing: Vec<u64> = accepted
        .iter()
        .copied()
        .filter(|id| !seen.contains(id))
        .collect();
    while !missing.is_empty() {
        let Some(v) = recv_within(&mut bob, Duration::from_secs(3)) else {
            let lost: Vec<_> = outcomes
                .iter()
                .filter(|(id, _, _)| missing.contains(id))
                .collect();
            panic!(
                "{} accepted messages never reached bob (id, body, answer): {lost:?}",
                lost.len()
            );
        };
        if v["type"] != "private" {
            continue;
        }
        seen.insert(id_of(&v));
        received.push(v);
        missing.retain(|id| !seen.contains(id));
    }
    let extra = drain(&mut bob, "after everything accepted arrived");
    received.extend(extra.into_iter().filter(|v| v["type"] == "private"));

    // Exactly once, in seq order, each message alice was told was accepted.
    let mut count: HashMap<u64, usize> = HashMap::new();
    for v in &received {
        *count.entry(id_of(v)).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} messages received more than once; the first (id, times): {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    let seqs: Vec<u64> = received.iter().map(seq_of).collect();
    let backwards: Vec<_> = seqs.windows(2).filter(|w| w[0] >= w[1]).collect();
    assert!(
        backwards.is_empty(),
        "seq went back between {backwards:?} (out of {} received)",
        seqs.len()
    );
    let by_id: HashMap<u64, &(u64, String, String)> = outcomes.iter().map(|o| (o.0, o)).collect();
    for v in &received {
        let (_, body, _) = by_id
            .get(&id_of(v))
            .unwrap_or_else(|| panic!("bob got a message alice never sent: {v}"));
        assert_eq!(v["body"], json!(body), "{v}");
        assert_eq!(v["from"], "alice", "{v}");
    }
    let refused: Vec<_> = outcomes
        .iter()
        .filter(|(_, _, o)| o != "queued" && o != "delivered")
        .collect();
    assert!(
        refused.is_empty(),
        "refused while bob came and went: {refused:?}"
    );

    // The race was run: many rounds, messages both live and from the outbox.
    let offline = received
        .iter()
        .filter(|v| v["offline"] == json!(true))
        .count();
    let live = received.len() - offline;
    eprintln!(
        "race: {rounds} sessions in {:?}, {} sent, {} received ({live} live, {offline} held)",
        started.elapsed(),
        outcomes.len(),
        received.len()
    );
    assert!(rounds >= 100, "only {rounds} sessions in 10 s");
    assert!(live > 0 && offline > 0, "live {live}, held {offline}");
}

// ---------------------------------------------------------------------------
// 5. Redis restarted (AOF, appendfsync always) between queued and the join
// ---------------------------------------------------------------------------

#[test]
fn a_queued_message_survives_a_redis_kill_with_appendfsync_always() {
    let Some(mut redis) = Redis::start(
        "a_queued_message_survives_a_redis_kill_with_appendfsync_always",
        &["--appendonly", "yes", "--appendfsync", "always"],
    ) else {
        return;
    };
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    wait_for_cluster(&[&a, &b]);
    make_known(&redis, b.addr, "bob");
    let mut alice = Chat::joined(a.addr, "alice");
    let ids: Vec<u64> = (1..=3)
        .map(|i| {
            send_expecting(
                &mut alice,
                "bob",
                &format!("k{i}"),
                &format!("k{i}"),
                "queued",
            )
        })
        .collect();

    redis.restart();
    wait_for_cluster(&[&a, &b]);

    let (mut bob, _) = join_when_free(b.addr, &ws_path("bob"), "bob", Duration::from_millis(50));
    let got = privates(&mut bob, 3, "held across the Redis restart");
    let mut seqs = Vec::new();
    for (i, v) in got.iter().enumerate() {
        seqs.push(assert_private(
            v,
            "alice",
            "bob",
            &format!("k{}", i + 1),
            true,
            "kept",
        ));
        assert_eq!(id_of(v), ids[i], "{v}");
    }
    let mut delivered = receipts(&mut alice, "delivered", 3, "receipts after the restart");
    delivered.sort_unstable();
    let mut want = ids.clone();
    want.sort_unstable();
    assert_eq!(delivered, want);
    // The counter was kept too: the next number is above them.
    next_is_live(&mut alice, &mut bob, "after", seqs[2], "after the restart");
}

// ---------------------------------------------------------------------------
// 6. A single server's log moves into the cluster
// ---------------------------------------------------------------------------

/// Waits until a line of `server`'s log mentions migration; returns it.
fn wait_migration_line(server: &ChatServer, context: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = server
            .logs()
            .lines()
            .find(|l| l.to_lowercase().contains("migrat"))
        {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{context}: no line about migration in the log:\n{}",
            server.logs()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_single_servers_held_messages_are_uploaded_once_and_delivered_on_any_node() {
    let Some(redis) = Redis::start(
        "a_single_servers_held_messages_are_uploaded_once_and_delivered_on_any_node",
        &[],
    ) else {
        return;
    };
    let tmp = TempDir::new("cluster-logdir");
    let dir = tmp.sub("data");
    let dir = dir.to_str().expect("UTF-8 path");
    let local = [&["--data-dir", dir][..], &NO_CLIENT_LIMITS].concat();

    // One server, no cluster: bob is known, then two messages held for him.
    let mut single = ChatServer::start(&local);
    Chat::joined(single.addr, "bob").close();
    let mut alice = Chat::joined(single.addr, "alice");
    let sent_before = now_ms();
    let ids: Vec<u64> = ["old 1", "old 2"]
        .iter()
        .map(|body| send_expecting(&mut alice, "bob", body, body, "queued"))
        .collect();
    alice.close();
    stop(&mut single);

    // The same directory under a cluster node: its log goes up to Redis.
    let mut a = node(&redis, &["--data-dir", dir]);
    let b = node(&redis, &[]);
    wait_for_cluster(&[&a, &b]);
    wait_box_len(&redis, "bob", 2, "after the upload");
    let line = wait_migration_line(&a, "the first cluster start on the log");
    eprintln!("migration logged: {line}");

    let mut alice = Chat::joined(a.addr, "alice");
    let mut bob = Chat::joined(b.addr, "bob");
    let got = privates(&mut bob, 2, "uploaded messages, on B");
    let mut seqs = Vec::new();
    for (i, v) in got.iter().enumerate() {
        let body = ["old 1", "old 2"][i];
        seqs.push(assert_private(v, "alice", "bob", body, true, "uploaded"));
        assert_eq!(id_of(v), ids[i], "an uploaded message keeps its id: {v}");
        let ts = v["ts"].as_u64().unwrap();
        assert!(
            ts >= sent_before && ts <= now_ms(),
            "an uploaded message keeps the time it was sent: {v}"
        );
    }
    assert!(seqs[0] < seqs[1], "{seqs:?}");
    let mut delivered = receipts(&mut alice, "delivered", 2, "alice's receipts");
    delivered.sort_unstable();
    let mut want = ids.clone();
    want.sort_unstable();
    assert_eq!(delivered, want);
    wait_box_len(&redis, "bob", 0, "delivered to a simple client");
    let live = next_is_live(&mut alice, &mut bob, "new", seqs[1], "bob after the upload");

    // The node restarts on the same log: nothing is uploaded again, and
    // nobody is given the old messages again, on either node.
    alice.close();
    bob.close();
    stop(&mut a);
    let a = node(&redis, &["--data-dir", dir]);
    wait_for_cluster(&[&a, &b]);
    // A node says it is uploading before it says where it listens; if this
    // one does (its log still held something), wait for its account.
    let under_way = a.logs().lines().any(|l| {
        let l = l.to_lowercase();
        l.contains("upload") || l.contains("migrat")
    });
    let line = if under_way {
        wait_migration_line(&a, "the second cluster start on the log")
    } else {
        "(nothing left to upload)".to_string()
    };
    eprintln!("second start logged: {line}");
    assert_eq!(box_len(&redis, "bob"), 0, "uploaded again: {line}");
    let mut alice = Chat::joined(a.addr, "alice");
    let mut bob = Chat::joined(b.addr, "bob");
    let live = next_is_live(
        &mut alice,
        &mut bob,
        "on B",
        live,
        "bob on B after the restart",
    );
    bob.close();
    let mut bob = Chat::joined(a.addr, "bob");
    next_is_live(
        &mut alice,
        &mut bob,
        "on A",
        live,
        "bob on A after the restart",
    );
    assert_eq!(box_len(&redis, "bob"), 0);
}

// ---------------------------------------------------------------------------
// 7. Who may be sent to is the cluster's
// ---------------------------------------------------------------------------

#[test]
fn a_name_that_connected_on_any_node_may_be_sent_to_and_no_other() {
    let Some(redis) = Redis::start(
        "a_name_that_connected_on_any_node_may_be_sent_to_and_no_other",
        &[],
    ) else {
        return;
    };
    let (a, b) = (node(&redis, &[]), node(&redis, &[]));
    wait_for_cluster(&[&a, &b]);
    make_known(&redis, b.addr, "zoe");
    make_known(&redis, a.addr, "yan");
    let mut alice = Chat::joined(a.addr, "alice");
    let mut dave = Chat::joined(b.addr, "dave");
    let to_zoe = send_expecting(&mut alice, "zoe", "for zoe", "z", "queued");
    let to_yan = send_expecting(&mut dave, "yan", "for yan", "y", "queued");
    send_refused(&mut alice, "nobody", "?", "n1", "unknown_user");
    send_refused(&mut dave, "nobody", "?", "n2", "unknown_user");

    // A node started after they left learns it from Redis, not from their
    // joins, which it never heard.
    let c = node(&redis, &[]);
    let u = node(&redis, &["--offline-to-unknown"]);
    wait_for_cluster(&[&a, &b, &c, &u]);
    let mut carl = Chat::joined(c.addr, "carl");
    let zoe_again = send_expecting(&mut carl, "zoe", "again", "z2", "queued");
    send_refused(&mut carl, "nobody", "?", "n3", "unknown_user");
    wait_box_len(&redis, "nobody", 0, "nothing stored for an unknown name");
    // --offline-to-unknown: that node holds messages for any name.
    let mut una = Chat::joined(u.addr, "una");
    let to_stranger = send_expecting(&mut una, "stranger", "hello", "s", "queued");

    let mut zoe = Chat::joined(c.addr, "zoe");
    let got = privates(&mut zoe, 2, "zoe's held messages");
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        [to_zoe, zoe_again]
    );
    let mut yan = Chat::joined(b.addr, "yan");
    let got = privates(&mut yan, 1, "yan's held message");
    assert_eq!(id_of(&got[0]), to_yan);
    let mut stranger = Chat::joined(a.addr, "stranger");
    let got = privates(&mut stranger, 1, "the stranger's held message");
    assert_eq!(id_of(&got[0]), to_stranger);
    next_is_live(
        &mut alice,
        &mut stranger,
        "welcome",
        seq_of(&got[0]),
        "stranger",
    );
}
