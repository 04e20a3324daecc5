//! The cluster's offline store in Redis (`src/cluster/store.rs`): its
//! scripts against a real `redis-server` started by each test on a free
//! port with a temporary directory. Without `redis-server` the tests print
//! `skipped: ...` and pass, except under `CI=true`, where they fail.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Barrier};

use support::redis::{Client, Redis};
use support::redis_mailbox::RedisMailbox;
use wschat::cluster::resp::Frame;
use wschat::cluster::store::{self, Held, Migrated, Outgoing, Quotas, Sent, Store};
use wschat::store::mailbox::contract;
use wschat::store::outbox::{Full, Remembered};

const OPEN: Quotas = Quotas {
    max_per_user: 1000,
    max_bytes: 1 << 20,
    max_per_sender: 1000,
    max_bytes_per_sender: 1 << 20,
    ttl_ms: 0,
    known_only: false,
};

fn msg<'a>(from: &'a str, to: &'a str, id: u64, body: &'a str) -> Outgoing<'a> {
    Outgoing {
        from,
        to,
        id,
        ts: 1_700_000_000_000 + id,
        body,
        tag: id,
        payload: "{}",
    }
}

fn send(c: &mut Client, s: &Store, m: &Outgoing<'_>, q: &Quotas, now_ms: u64) -> Sent {
    store::sent(&c.call(&s.send(m, q, 0, "node-a", now_ms))).expect("SEND reply")
}

fn fetch(c: &mut Client, s: &Store, name: &str, after: u64) -> Vec<Held> {
    store::fetched(&c.call(&s.fetch(name, after, false)))
        .expect("FETCH reply")
        .held
}

fn queued(sent: Sent) -> u64 {
    match sent {
        Sent::Queued(seq) => seq,
        other => panic!("expected queued, got {other:?}"),
    }
}

fn held_totals(c: &mut Client) -> Frame {
    c.call(&["HGETALL", "wx:held"])
}

#[test]
fn held_messages_are_numbered_fetched_in_order_after_a_cursor_and_acked() {
    let Some(redis) = Redis::start("held_messages_are_numbered", &[]) else {
        return;
    };
    let s = Store::new("wx");
    let mut c = redis.client();
    let a1 = queued(send(&mut c, &s, &msg("ann", "bob", 1, "one"), &OPEN, 0));
    let other = queued(send(&mut c, &s, &msg("ann", "cy", 2, "x"), &OPEN, 0));
    let a2 = queued(send(&mut c, &s, &msg("dee", "bob", 3, "two"), &OPEN, 0));
    assert!(a1 < other && other < a2, "one counter, only growing");
    let all = fetch(&mut c, &s, "bob", 0);
    let got: Vec<_> = all
        .iter()
        .map(|h| (h.seq, h.from.as_str(), h.body.as_str()))
        .collect();
    assert_eq!(got, [(a1, "ann", "one"), (a2, "dee", "two")]);
    assert_eq!(all[0].id, 1);
    assert_eq!(all[0].ts, 1_700_000_000_001);
    // resume=a1: only what follows.
    let after: Vec<_> = fetch(&mut c, &s, "bob", a1).iter().map(|h| h.seq).collect();
    assert_eq!(after, [a2]);
    // ack a1 removes it; ack a2 empties the box and the key goes.
    assert_eq!(store::acked(&c.call(&s.ack("bob", 0, a1))), Ok(1));
    assert_eq!(fetch(&mut c, &s, "bob", 0).len(), 1);
    assert_eq!(store::acked(&c.call(&s.ack("bob", 0, a2))), Ok(1));
    assert_eq!(store::acked(&c.call(&s.ack("bob", 0, a2))), Ok(0));
    assert_eq!(c.call(&["EXISTS", "wx:box:bob"]), Frame::Integer(0));
    store::acked(&c.call(&s.ack("cy", 0, other))).expect("ack");
    // Every quota counter is back to zero.
    let Frame::Array(Some(fields)) = held_totals(&mut c) else {
        panic!("HGETALL")
    };
    for pair in fields.chunks(2) {
        assert_eq!(pair[1].as_bytes(), Some(&b"0"[..]), "{pair:?}");
    }
    // A later message is numbered above everything given before.
    assert!(queued(send(&mut c, &s, &msg("ann", "bob", 4, "three"), &OPEN, 0)) > a2);
}

#[test]
fn a_recipient_holding_a_lease_gets_the_message_published_by_the_script() {
    let Some(redis) = Redis::start("a_recipient_holding_a_lease", &[]) else {
        return;
    };
    let s = Store::new("wx");
    let mut c = redis.client();
    let mut sub = redis.client();
    sub.call(&["SUBSCRIBE", "wx:node:node-b"]);
    c.call(&["SET", "wx:name:bob", "node-b"]);
    let mut m = msg("ann", "bob", 9, "hi");
    m.payload = r#"{"body":"hi"}"#;
    let Sent::Live { node, seq } = send(&mut c, &s, &m, &OPEN, 0) else {
        panic!("expected live")
    };
    assert_eq!(node, "node-b");
    let Frame::Array(Some(push)) = sub.next() else {
        panic!("a message on node-b's channel")
    };
    let payload = String::from_utf8(push[2].as_bytes().expect("payload").to_vec()).expect("utf-8");
    assert_eq!(payload, format!(r#"node-a spriv {seq} 9 {{"body":"hi"}}"#));
    // Stored as well, so a reliable client can resume it on another node.
    assert_eq!(fetch(&mut c, &s, "bob", 0)[0].seq, seq);
}

/// A private meets its recipient's join on another node, a few hundred
/// times: the joining node takes the lease, then fetches, on one
/// connection, while the sender's node runs `SEND` on its own. The joining
/// node delivers the fetch, then the published messages numbered above the
/// last fetched: each message exactly once, never both, never neither.
#[test]
fn a_private_racing_its_recipients_join_is_delivered_exactly_once() {
    let Some(redis) = Redis::start("a_private_racing_its_recipients_join", &[]) else {
        return;
    };
    let s = Store::new("wx");
    let rounds = 300;
    let mut sub = redis.client();
    sub.call(&["SUBSCRIBE", "wx:node:node-b"]);
    let barrier = Arc::new(Barrier::new(2));
    let sender = {
        let (s, barrier) = (s.clone(), barrier.clone());
        let mut c = redis.client();
        std::thread::spawn(move || {
            let mut sent = Vec::new();
            for round in 0..rounds {
                let name = format!("u{round}");
                barrier.wait();
                for k in 0..2 {
                    match send(&mut c, &s, &msg("ann", &name, round * 2 + k, "x"), &OPEN, 0) {
                        Sent::Queued(seq) | Sent::Live { seq, .. } => {
                            sent.push((name.clone(), seq))
                        }
                        refused => panic!("refused: {refused:?}"),
                    }
                }
            }
            sent
        })
    };
    let mut joiner = redis.client();
    let mut fetched = HashMap::new();
    for round in 0..rounds {
        let name = format!("u{round}");
        barrier.wait();
        joiner.call(&["SET", &format!("wx:name:{name}"), "node-b"]);
        let seqs: Vec<u64> = fetch(&mut joiner, &s, &name, 0)
            .iter()
            .map(|h| h.seq)
            .collect();
        fetched.insert(name, seqs);
    }
    let sent = sender.join().expect("sender thread");
    // Everything published before this marker has reached the subscriber.
    redis.client().call(&["PUBLISH", "wx:node:node-b", "end"]);
    let mut published = HashSet::new();
    loop {
        let Frame::Array(Some(push)) = sub.next() else {
            panic!("a pushed message")
        };
        let text = String::from_utf8_lossy(push[2].as_bytes().expect("payload")).into_owned();
        if text == "end" {
            break;
        }
        let seq: u64 = text
            .split(' ')
            .nth(2)
            .and_then(|n| n.parse().ok())
            .expect("seq");
        published.insert(seq);
    }
    let (mut live, mut both) = (0, 0);
    for (name, seq) in &sent {
        let held = &fetched[name];
        let last = held.iter().copied().max().unwrap_or(0);
        let from_fetch = held.contains(seq);
        let from_publish = published.contains(seq) && *seq > last;
        assert!(
            from_fetch != from_publish,
            "{name} seq {seq}: fetched {from_fetch}, live {from_publish}"
        );
        live += usize::from(from_publish);
        both += usize::from(from_fetch && published.contains(seq));
    }
    eprintln!(
        "race: {} messages: {} delivered from the fetch, {live} live; {both} were fetched and published",
        sent.len(),
        sent.len() - live,
    );
}

#[test]
fn quotas_are_counted_across_every_sender_and_freed_by_acks() {
    let Some(redis) = Redis::start("quotas_are_counted", &[]) else {
        return;
    };
    let s = Store::new("wx");
    let mut c = redis.client();
    let per_user = Quotas {
        max_per_user: 2,
        ..OPEN
    };
    let first = queued(send(&mut c, &s, &msg("ann", "bob", 1, "a"), &per_user, 0));
    queued(send(&mut c, &s, &msg("dee", "bob", 2, "b"), &per_user, 0));
    assert_eq!(
        send(&mut c, &s, &msg("eve", "bob", 3, "c"), &per_user, 0),
        Sent::Full(Full::User)
    );
    store::acked(&c.call(&s.ack("bob", 0, first))).expect("ack");
    queued(send(&mut c, &s, &msg("eve", "bob", 3, "c"), &per_user, 0));

    let per_sender = Quotas {
        max_per_sender: 3,
        ..OPEN
    };
    // "ann"'s message to bob was acked: it has none held.
    for (id, to) in [(4, "cy"), (5, "di"), (6, "fo")] {
        queued(send(&mut c, &s, &msg("ann", to, id, "d"), &per_sender, 0));
    }
    let refused = send(&mut c, &s, &msg("ann", "gi", 7, "f"), &per_sender, 0);
    assert_eq!(refused, Sent::Full(Full::Sender));

    // Five held, each costing body + from + 64 = 68 bytes: room for one more
    // of 68, not for one of 131.
    let store_full = Quotas {
        max_bytes: 6 * 68,
        ..OPEN
    };
    assert_eq!(
        send(
            &mut c,
            &s,
            &msg("gus", "fo", 8, &"z".repeat(64)),
            &store_full,
            0
        ),
        Sent::Full(Full::Store)
    );
    queued(send(&mut c, &s, &msg("gus", "fo", 8, "z"), &store_full, 0));
}

#[test]
fn held_messages_expire_cluster_wide_and_the_senders_are_named() {
    let Some(redis) = Redis::start("held_messages_expire", &[]) else {
        return;
    };
    let s = Store::new("wx");
    let mut c = redis.client();
    let ttl = Quotas {
        ttl_ms: 1000,
        ..OPEN
    };
    let old = queued(send(&mut c, &s, &msg("ann", "bob", 1, "old"), &ttl, 10_000));
    let new = queued(send(&mut c, &s, &msg("dee", "bob", 2, "new"), &ttl, 10_500));
    let never = queued(send(
        &mut c,
        &s,
        &msg("eve", "bob", 3, "kept"),
        &OPEN,
        10_500,
    ));
    assert_eq!(store::expired(&c.call(&s.expire(10_999))), Ok(vec![]));
    let gone = store::expired(&c.call(&s.expire(11_000))).expect("EXPIRE reply");
    assert_eq!(gone.len(), 1);
    assert_eq!(
        (
            gone[0].to.as_str(),
            gone[0].seq,
            gone[0].id,
            gone[0].from.as_str()
        ),
        ("bob", old, 1, "ann")
    );
    let left: Vec<_> = fetch(&mut c, &s, "bob", 0).iter().map(|h| h.seq).collect();
    assert_eq!(left, [new, never]);
    // An acked message is not expired later.
    store::acked(&c.call(&s.ack("bob", 0, new))).expect("ack");
    assert_eq!(store::expired(&c.call(&s.expire(u64::MAX / 2))), Ok(vec![]));
    assert_eq!(c.call(&["ZCARD", "wx:due"]), Frame::Integer(0));
}

#[test]
fn a_queued_message_survives_a_redis_kill_with_appendfsync_always() {
    let Some(mut redis) = Redis::start(
        "a_queued_message_survives_a_redis_kill",
        &["--appendonly", "yes", "--appendfsync", "always"],
    ) else {
        return;
    };
    let s = Store::new("wx");
    let seq = queued(send(
        &mut redis.client(),
        &s,
        &msg("ann", "bob", 1, "kept"),
        &OPEN,
        0,
    ));
    redis.restart();
    let mut c = redis.client();
    let held = fetch(&mut c, &s, "bob", 0);
    assert_eq!(held.iter().map(|h| h.seq).collect::<Vec<_>>(), [seq]);
    assert!(queued(send(&mut c, &s, &msg("ann", "bob", 2, "next"), &OPEN, 0)) > seq);
}

#[test]
fn a_local_log_is_uploaded_once_numbered_anew_and_published_to_a_live_user() {
    let Some(redis) = Redis::start("a_local_log_is_uploaded_once", &[]) else {
        return;
    };
    let s = Store::new("wx");
    let mut c = redis.client();
    let first = queued(send(&mut c, &s, &msg("ann", "bob", 1, "cluster"), &OPEN, 0));
    let local = |seq: u64, from: &str, body: &str| Held {
        seq,
        id: 100 + seq,
        ts: 1_600_000_000_000 + seq,
        from: from.into(),
        body: body.into(),
        notified: false,
    };
    // What a single node's log held: seq 5 and 6 for bob, 7 for cy, who is
    // online on node n2 meanwhile.
    let log = [
        ("bob", local(5, "eve", "a")),
        ("bob", local(6, "eve", "b")),
        ("cy", local(7, "gus", "c")),
    ];
    c.call(&["SET", "wx:name:cy", "n2"]);
    let mut sub = redis.client();
    sub.call(&["SUBSCRIBE", "wx:node:n2"]);
    let floor = 1_780_000_000_000_000u64;
    let upload = |c: &mut Client| -> Vec<Migrated> {
        log.iter()
            .map(|(to, h)| {
                let args = s.migrate(to, h, 0, floor, "n1", "{}");
                store::migrated(&c.call(&args)).expect("MIGRATE reply")
            })
            .collect()
    };
    let stored: Vec<u64> = upload(&mut c)
        .into_iter()
        .map(|m| match m {
            Migrated::Stored(seq) => seq,
            other => panic!("expected stored, got {other:?}"),
        })
        .collect();
    // Numbered anew, above the floor and in the log's order: an old cursor
    // skips nothing, and an emptied box cannot take a number below its user's.
    assert!(stored[0] > floor && stored[0] < stored[1] && stored[1] < stored[2]);
    assert_eq!(
        upload(&mut c),
        stored
            .iter()
            .map(|&s| Migrated::Duplicate(s))
            .collect::<Vec<_>>(),
        "a second upload adds nothing"
    );
    let bob: Vec<_> = fetch(&mut c, &s, "bob", 0)
        .iter()
        .map(|h| (h.seq, h.body.clone()))
        .collect();
    assert_eq!(
        bob,
        [
            (first, "cluster".into()),
            (stored[0], "a".into()),
            (stored[1], "b".into())
        ]
    );
    let cy = fetch(&mut c, &s, "cy", 0);
    assert_eq!(
        (cy[0].seq, cy[0].id, cy[0].from.as_str()),
        (stored[2], 107, "gus")
    );
    // cy's node got it live, as from SEND.
    let pushed = sub.next();
    let Frame::Array(Some(parts)) = pushed else {
        panic!("{pushed:?}")
    };
    assert_eq!(
        parts[2].as_bytes(),
        Some(format!("n1 spriv {} 0 {{}}", stored[2]).as_bytes())
    );
    // The recipients are known names now.
    assert_eq!(c.call(&["SISMEMBER", "wx:known", "bob"]), Frame::Integer(1));
    // Later messages come after.
    let later = queued(send(&mut c, &s, &msg("ann", "bob", 2, "new"), &OPEN, 0));
    assert!(later > stored[2]);
    // Acks free what was migrated like anything else.
    assert_eq!(store::acked(&c.call(&s.ack("bob", 0, stored[1]))), Ok(3));
}

#[test]
fn only_names_that_connected_on_some_node_may_be_sent_to() {
    let Some(redis) = Redis::start("only_names_that_connected", &[]) else {
        return;
    };
    let s = Store::new("wx");
    let mut c = redis.client();
    let known_only = Quotas {
        known_only: true,
        ..OPEN
    };
    let remember = |c: &mut Client, name: &str| store::remembered(&c.call(&s.remember(name, 2)));
    assert_eq!(
        send(&mut c, &s, &msg("ann", "bob", 1, "x"), &known_only, 0),
        Sent::Unknown
    );
    assert_eq!(
        c.call(&["EXISTS", "wx:box:bob"]),
        Frame::Integer(0),
        "nothing stored"
    );
    // With --offline-to-unknown anyone may be sent to.
    queued(send(&mut c, &s, &msg("ann", "bob", 1, "x"), &OPEN, 0));
    // bob connected on some node: remembered cluster-wide.
    assert_eq!(remember(&mut c, "bob"), Ok(Remembered::New));
    assert_eq!(remember(&mut c, "bob"), Ok(Remembered::AlreadyKnown));
    queued(send(&mut c, &s, &msg("ann", "bob", 2, "y"), &known_only, 0));
    // A name online right now (its lease held) is a user, remembered or not.
    c.call(&["SET", "wx:name:cy", "node-b"]);
    let live = send(&mut c, &s, &msg("ann", "cy", 3, "z"), &known_only, 0);
    assert!(matches!(live, Sent::Live { .. }), "{live:?}");
    // --max-known-users: 2 here.
    assert_eq!(remember(&mut c, "cy"), Ok(Remembered::New));
    assert_eq!(remember(&mut c, "dee"), Ok(Remembered::Full));
}

/// The behaviour the local store has (`wschat::store::mailbox::contract`):
/// each case on a fresh prefix of one `redis-server`.
#[test]
fn the_redis_store_keeps_the_mailbox_contract() {
    let Some(redis) = Redis::start("the_redis_store_keeps_the_mailbox_contract", &[]) else {
        return;
    };
    let mut case = 0;
    contract::run(|setup| {
        case += 1;
        RedisMailbox::new(redis.client(), &format!("contract{case}"), setup)
    });
}

#[test]
fn a_full_redis_still_drains_by_acks_and_expiry() {
    let Some(redis) = Redis::start(
        "a_full_redis_still_drains_by_acks_and_expiry",
        &["--maxmemory-policy", "noeviction"],
    ) else {
        return;
    };
    let s = Store::new("wx");
    let mut c = redis.client();
    let body = "x".repeat(64 * 1024);
    let quotas = Quotas {
        max_bytes: usize::MAX,
        max_bytes_per_sender: usize::MAX,
        ttl_ms: 1000,
        ..OPEN
    };
    let held: Vec<u64> = (0..20)
        .map(|i| queued(send(&mut c, &s, &msg("ann", "bob", i, &body), &quotas, 0)))
        .collect();
    // Redis is now well over its memory limit: it refuses every write...
    c.call(&["CONFIG", "SET", "maxmemory", "1mb"]);
    let refusal = c.call(&s.send(&msg("ann", "bob", 99, "small"), &quotas, 0, "n", 0));
    assert!(
        matches!(&refusal, Frame::Error(e) if e.starts_with("OOM")),
        "{refusal:?}"
    );
    // ... but an ack still runs (its delete comes before its counters), and
    // so does expiry (everything is due at 1000 + 1000 ms).
    assert_eq!(store::acked(&c.call(&s.ack("bob", 0, held[9]))), Ok(10));
    let expired = store::expired(&c.call(&s.expire(5000))).expect("EXPIRE under OOM");
    assert_eq!(expired.len(), 10);
    assert_eq!(fetch(&mut c, &s, "bob", 0), vec![]);
}
