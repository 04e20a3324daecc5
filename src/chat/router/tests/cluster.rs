//! The router as a cluster node, on messages in and out (no Redis).

use std::rc::Rc;

use serde_json::Value;

use super::{router, Recorder};
use crate::chat::router::{ConnId, Router};
use crate::cluster::remote::{
    self, Carried, Inbound, Note, Outcome, Outgoing, Remote, Status, StoreOp, To,
};
use crate::cluster::store::{BadReply, Fetched, Held, Sent};
use crate::store::outbox::Full;

/// A router that is a node `me`, with `peer` known and up.
fn node() -> (Router, Recorder) {
    let mut r = router(10);
    let mut remote = Remote::new("me");
    remote.up = true;
    r.set_remote(remote);
    let mut out = Recorder::default();
    r.on_cluster("peer", Inbound::Hello, 0, &mut out);
    r.remote_mut().unwrap().take_outgoing();
    (r, out)
}

/// What the router published, decoded, with where it went.
fn published(r: &mut Router) -> Vec<(To, Inbound)> {
    r.remote_mut()
        .unwrap()
        .take_outgoing()
        .into_iter()
        .filter_map(|o| match o {
            Outgoing::Publish(to, payload) => {
                let (node, inbound) = remote::decode(&payload).expect("well formed");
                assert_eq!(node, "me");
                Some((to, inbound))
            }
            Outgoing::Release(_) | Outgoing::Store(_) => None,
        })
        .collect()
}

fn types(sent: &[(usize, Value)]) -> Vec<(usize, String)> {
    sent.iter()
        .map(|(slot, v)| (*slot, v["type"].as_str().unwrap_or("").to_string()))
        .collect()
}

#[test]
fn remote_users_are_listed_counted_and_announced() {
    let (mut r, mut out) = node();
    r.join(ConnId(1), "username=ann", &mut out);
    out.take();
    published(&mut r);
    r.on_cluster("peer", Inbound::Join(Rc::from("bob")), 0, &mut out);
    let sent = out.take();
    assert_eq!(sent[0].1["type"], "join");
    assert_eq!(
        (sent[0].1["username"].clone(), sent[0].1["online"].clone()),
        ("bob".into(), 2.into())
    );
    r.join(ConnId(2), "username=cat", &mut out);
    let welcome = &out.take()[0].1;
    assert_eq!(welcome["online"], 3);
    assert_eq!(welcome["users"], serde_json::json!(["ann", "bob"]));
    assert!(matches!(published(&mut r).as_slice(), [(To::All, Inbound::Join(n))] if &**n == "cat"));
    // Its node goes silent: its users leave.
    r.cluster_forget_silent(1, &mut out);
    let sent = out.take();
    assert!(sent
        .iter()
        .all(|(_, v)| v["type"] == "leave" && v["username"] == "bob"));
    assert_eq!(sent.len(), 2, "both local users told");
}

/// The store commands the router queued.
fn store_ops(r: &mut Router) -> Vec<StoreOp> {
    r.remote_mut()
        .unwrap()
        .take_outgoing()
        .into_iter()
        .filter_map(|o| match o {
            Outgoing::Store(op) => Some(op),
            _ => None,
        })
        .collect()
}

/// Ann (slot 1) sends a private to bob; the `SEND` the router queued.
fn send_from_ann(r: &mut Router, out: &mut Recorder, json: &str) -> Carried {
    r.handle(ConnId(1), json, 5, out);
    match store_ops(r).pop() {
        Some(StoreOp::Send { carried, .. }) => carried,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_private_goes_through_the_store_and_its_sender_hears_every_answer() {
    let (mut r, mut out) = node();
    r.join(ConnId(1), "username=ann", &mut out);
    out.take();
    store_ops(&mut r);
    let first = send_from_ann(
        &mut r,
        &mut out,
        r#"{"type":"private","to":"bob","body":"hi","ref":"r"}"#,
    );
    assert_eq!(
        (first.from.as_str(), first.to.as_str(), first.body.as_str()),
        ("ann", "bob", "hi")
    );
    assert!(out.take().is_empty(), "no receipt before the store answers");
    // Stored and published to bob's node: that node's receipt decides.
    let live = || {
        Ok(Sent::Live {
            node: "peer".into(),
            seq: 9,
        })
    };
    r.on_sent(first.tag, live(), &mut out);
    assert!(out.take().is_empty());
    r.on_cluster(
        "peer",
        Inbound::Receipt(first.tag, Outcome::Delivered),
        6,
        &mut out,
    );
    let sent = out.take();
    assert_eq!(types(&sent), vec![(1, "receipt".to_string())]);
    assert_eq!(
        (
            sent[0].1["status"].clone(),
            sent[0].1["ref"].clone(),
            sent[0].1["id"].clone()
        ),
        ("delivered".into(), "r".into(), first.id.into())
    );

    // Every other answer, and what ann is told.
    let private = r#"{"type":"private","to":"bob","body":"x","ref":2}"#;
    let cases: Vec<(Result<Sent, BadReply>, Option<Outcome>, &str)> = vec![
        (Ok(Sent::Queued(10)), None, "queued"),
        (live(), Some(Outcome::Absent), "queued"),
        (live(), Some(Outcome::Busy), "recipient_busy"),
        (Ok(Sent::Full(Full::User)), None, "offline_queue_full"),
        (Ok(Sent::Full(Full::Store)), None, "offline_queue_full"),
        (Ok(Sent::Full(Full::Sender)), None, "offline_sender_limit"),
        (Ok(Sent::Unknown), None, "unknown_user"),
        (Err(BadReply("ERR".into())), None, "cluster_unavailable"),
    ];
    for (answer, receipt, told) in cases {
        let carried = send_from_ann(&mut r, &mut out, private);
        r.on_sent(carried.tag, answer, &mut out);
        if let Some(outcome) = receipt {
            r.on_cluster("peer", Inbound::Receipt(carried.tag, outcome), 6, &mut out);
        }
        let sent = out.take();
        assert_eq!(sent.len(), 1, "{told}: {sent:?}");
        let v = &sent[0].1;
        let got = v["status"].as_str().or(v["code"].as_str());
        assert_eq!((got, v["ref"].clone()), (Some(told), 2.into()), "{v}");
    }

    // No receipt in time: stored means `queued`; no answer at all means
    // it may not have been stored.
    let stored = send_from_ann(&mut r, &mut out, private);
    r.on_sent(stored.tag, live(), &mut out);
    let _unanswered = send_from_ann(&mut r, &mut out, private);
    r.cluster_overdue(5 + r.remote().unwrap().receipt_timeout_ms, &mut out);
    let sent: Vec<Value> = out.take().into_iter().map(|(_, v)| v).collect();
    assert_eq!(sent[0]["status"], "queued");
    assert_eq!(sent[1]["code"], "unconfirmed");
    // Never sent to the store, or its answer lost with the link.
    for (surely_not_stored, code) in [(true, "cluster_unavailable"), (false, "unconfirmed")] {
        let carried = send_from_ann(&mut r, &mut out, private);
        r.on_unsent(carried.tag, surely_not_stored, &mut out);
        assert_eq!(out.take()[0].1["code"], code);
    }
    // Redis away: refused at once.
    r.remote_mut().unwrap().up = false;
    r.handle(ConnId(1), private, 7, &mut out);
    assert_eq!(out.take()[0].1["code"], "cluster_unavailable");
    assert!(store_ops(&mut r).is_empty());
}

fn carried(tag: u64, to: &str) -> Carried {
    Carried {
        tag,
        id: 70 + tag,
        ts: 1,
        from: "ann".into(),
        to: to.into(),
        body: "hey".into(),
    }
}

fn held(seq: u64) -> Held {
    Held {
        seq,
        id: seq,
        ts: 1,
        from: "cy".into(),
        body: "held".into(),
        notified: false,
    }
}

/// The receipts published to `peer`, and the store commands, queued.
fn answers(r: &mut Router) -> (Vec<(u64, Outcome)>, Vec<StoreOp>) {
    let mut receipts = Vec::new();
    let mut ops = Vec::new();
    for o in r.remote_mut().unwrap().take_outgoing() {
        match o {
            Outgoing::Publish(To::Node(n), payload) if &*n == "peer" => {
                if let Some((_, Inbound::Receipt(tag, outcome))) = remote::decode(&payload) {
                    receipts.push((tag, outcome));
                }
            }
            Outgoing::Store(op) => ops.push(op),
            _ => {}
        }
    }
    (receipts, ops)
}

fn receipts(r: &mut Router) -> Vec<(u64, Outcome)> {
    answers(r).0
}

#[test]
fn a_joining_user_gets_its_outbox_then_what_came_meanwhile_each_once() {
    let (mut r, mut out) = node();
    r.join(ConnId(4), "username=bob", &mut out);
    assert_eq!(types(&out.take()), vec![(4, "welcome".to_string())]);
    assert_eq!(
        store_ops(&mut r),
        vec![
            StoreOp::Remember(Rc::from("bob")),
            StoreOp::Fetch {
                name: Rc::from("bob"),
                after: 0,
                ack: false,
                generation: 1
            }
        ]
    );
    // Stored and published while the fetch was out: kept.
    r.on_cluster("peer", Inbound::Stored(10, carried(3, "bob")), 0, &mut out);
    r.on_cluster("peer", Inbound::Stored(11, carried(4, "bob")), 0, &mut out);
    assert!(out.take().is_empty());
    assert!(receipts(&mut r).is_empty());
    // The fetch ran after 10 was stored: it has 8 and 10.
    let fetched = Fetched {
        after: 0,
        held: vec![held(8), held(10)],
    };
    r.on_fetched(&Rc::from("bob"), 1, fetched, &mut out);
    let sent: Vec<(u64, bool)> = out
        .take()
        .iter()
        .map(|(slot, v)| {
            assert_eq!(*slot, 4);
            (v["seq"].as_u64().unwrap(), v["offline"] == true)
        })
        .collect();
    assert_eq!(sent, [(8, true), (10, true), (11, false)]);
    let (receipts_now, ops) = answers(&mut r);
    assert_eq!(
        receipts_now,
        [(3, Outcome::Delivered), (4, Outcome::Delivered)]
    );
    // A simple client's copies leave the store once written.
    assert_eq!(
        ops,
        vec![
            StoreOp::Ack {
                name: Rc::from("bob"),
                from: 11,
                to: 11
            },
            StoreOp::Ack {
                name: Rc::from("bob"),
                from: 0,
                to: 10
            },
        ]
    );
    // Live from now on; a late duplicate publish is answered, not delivered.
    r.on_cluster("peer", Inbound::Stored(12, carried(5, "bob")), 0, &mut out);
    r.on_cluster("peer", Inbound::Stored(12, carried(5, "bob")), 0, &mut out);
    assert_eq!(out.take().len(), 1);
    r.on_cluster(
        "peer",
        Inbound::Stored(13, carried(6, "nobody")),
        0,
        &mut out,
    );
    out.gone.push(4);
    r.on_cluster("peer", Inbound::Stored(14, carried(7, "bob")), 0, &mut out);
    assert_eq!(
        receipts(&mut r),
        [
            (5, Outcome::Delivered),
            (5, Outcome::Delivered),
            (6, Outcome::Absent),
            (7, Outcome::Absent)
        ]
    );
}

#[test]
fn a_reliable_client_keeps_its_messages_in_the_store_until_it_acks() {
    let (mut r, mut out) = node();
    r.join(ConnId(4), "username=bob&resume=7", &mut out);
    out.take();
    let fetch = store_ops(&mut r).pop();
    assert_eq!(
        fetch,
        Some(StoreOp::Fetch {
            name: Rc::from("bob"),
            after: 7,
            ack: true,
            generation: 1
        })
    );
    let fetched = Fetched {
        after: 7,
        held: vec![held(9)],
    };
    r.on_fetched(&Rc::from("bob"), 1, fetched, &mut out);
    r.on_cluster("peer", Inbound::Stored(12, carried(5, "bob")), 0, &mut out);
    assert_eq!(out.take().len(), 2);
    assert!(store_ops(&mut r).is_empty(), "nothing taken out unacked");
    // Acks cost the client nothing: one removal per turn, none for a
    // number already acknowledged.
    for seq in [9, 12, 11] {
        r.handle(
            ConnId(4),
            &format!(r#"{{"type":"ack","seq":{seq}}}"#),
            1,
            &mut out,
        );
    }
    assert_eq!(
        store_ops(&mut r),
        vec![StoreOp::Ack {
            name: Rc::from("bob"),
            from: 0,
            to: 12
        }]
    );
    r.handle(ConnId(4), r#"{"type":"ack","seq":12}"#, 1, &mut out);
    assert!(store_ops(&mut r).is_empty());
}

#[test]
fn a_stored_private_between_two_users_of_this_node_is_answered_here() {
    let (mut r, mut out) = node();
    r.join(ConnId(1), "username=ann", &mut out);
    r.join(ConnId(2), "username=bob", &mut out);
    for (generation, name) in [(1, "ann"), (2, "bob")] {
        let empty = Fetched {
            after: 0,
            held: vec![],
        };
        r.on_fetched(&Rc::from(name), generation, empty, &mut out);
    }
    out.take();
    store_ops(&mut r);
    let sent = send_from_ann(
        &mut r,
        &mut out,
        r#"{"type":"private","to":"bob","body":"hi"}"#,
    );
    r.on_sent(
        sent.tag,
        Ok(Sent::Live {
            node: "me".into(),
            seq: 20,
        }),
        &mut out,
    );
    // The store published it in this node's own name: not an echo to skip.
    r.on_cluster("me", Inbound::Stored(20, sent.clone()), 0, &mut out);
    let got: Vec<(usize, String)> = types(&out.take());
    assert_eq!(
        got,
        vec![(2, "private".to_string()), (1, "receipt".to_string())]
    );
    assert!(published(&mut r).is_empty(), "no receipt through Redis");
}

#[test]
fn publics_cross_once_and_are_refused_when_redis_is_away() {
    let (mut r, mut out) = node();
    r.join(ConnId(1), "username=ann", &mut out);
    r.join(ConnId(2), "username=cat", &mut out);
    out.take();
    published(&mut r);
    r.handle(ConnId(1), r#"{"type":"public","body":"x"}"#, 1, &mut out);
    let local: Vec<Value> = out.take().into_iter().map(|(_, v)| v).collect();
    let Some((To::All, Inbound::Public(bytes))) = published(&mut r).pop() else {
        panic!("published once")
    };
    assert_eq!(
        serde_json::from_slice::<Value>(&bytes).unwrap(),
        local[0],
        "the same encoded event"
    );
    // One from another node reaches every local user, as it came.
    r.on_cluster("peer", Inbound::Public(bytes.clone()), 2, &mut out);
    assert_eq!(
        types(&out.take()),
        vec![(1, "public".into()), (2, "public".into())]
    );
    // Our own echo is ignored.
    r.on_cluster("me", Inbound::Public(bytes), 2, &mut out);
    assert!(out.take().is_empty());
    r.remote_mut().unwrap().up = false;
    r.handle(
        ConnId(1),
        r#"{"type":"public","body":"y","ref":1}"#,
        3,
        &mut out,
    );
    let sent = out.take();
    assert_eq!(
        types(&sent),
        vec![
            (1, "public".into()),
            (2, "public".into()),
            (1, "error".into())
        ]
    );
    assert_eq!(sent[2].1["code"], "cluster_unavailable");
    assert!(published(&mut r).is_empty());
}

#[test]
fn a_kicked_user_is_closed_quietly_and_now_elsewhere() {
    let (mut r, mut out) = node();
    r.join(ConnId(1), "username=ann", &mut out);
    r.join(ConnId(2), "username=dora", &mut out);
    out.take();
    r.on_cluster("peer", Inbound::Kick(Rc::from("dora")), 0, &mut out);
    assert_eq!(out.closed, vec![(2, 4010)]);
    r.leave(ConnId(2), &mut out);
    r.on_cluster("peer", Inbound::Join(Rc::from("dora")), 0, &mut out);
    assert!(out.take().is_empty(), "no leave, no second join");
    assert_eq!(
        r.remote().unwrap().node_of("dora").map(|n| &**n),
        Some("peer")
    );
}

#[test]
fn with_offline_to_unknown_a_lookalike_of_a_user_is_still_refused_in_a_cluster() {
    let (mut r, mut out) = node();
    r.set_offline_to_unknown(true);
    r.join(ConnId(1), "username=ann", &mut out);
    r.join(ConnId(3), "username=bob", &mut out);
    r.leave(ConnId(3), &mut out);
    out.take();
    store_ops(&mut r);
    let to = |name: &str| format!(r#"{{"type":"private","to":"{name}","body":"x","ref":1}}"#);
    r.handle(ConnId(1), &to("BOB"), 1, &mut out);
    assert_eq!(out.take()[0].1["code"], "unknown_user");
    assert!(store_ops(&mut r).is_empty(), "nothing asked of the store");
    // A name that looks like nobody's goes to the store (which holds it).
    r.handle(ConnId(1), &to("carol"), 1, &mut out);
    assert!(matches!(
        store_ops(&mut r).as_slice(),
        [StoreOp::Send { carried, online: false, .. }] if carried.to == "carol"
    ));
}

#[test]
fn a_message_read_from_its_outbox_elsewhere_answers_its_waiting_sender_with_its_ref() {
    let (mut r, mut out) = node();
    r.join(ConnId(1), "username=ann", &mut out);
    out.take();
    store_ops(&mut r);
    let sent = send_from_ann(
        &mut r,
        &mut out,
        r#"{"type":"private","to":"bob","body":"hi","ref":"r"}"#,
    );
    // Published to bob's node, which died with it: no receipt comes. Bob
    // reads it from his outbox on a third node, which tells ann's node.
    let live = Sent::Live {
        node: "peer".into(),
        seq: 9,
    };
    r.on_sent(sent.tag, Ok(live), &mut out);
    let note = Note {
        to: "ann".into(),
        id: sent.id,
        status: Status::Delivered,
    };
    r.on_cluster("third", Inbound::Note(note), 1, &mut out);
    let got = out.take();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].1["status"].clone(), got[0].1["ref"].clone()),
        ("delivered".into(), "r".into())
    );
    // Nothing more for it: not `queued` at the timeout, not a second receipt.
    r.on_cluster(
        "peer",
        Inbound::Receipt(sent.tag, Outcome::Absent),
        2,
        &mut out,
    );
    r.cluster_overdue(u64::MAX, &mut out);
    assert!(out.take().is_empty());
}
