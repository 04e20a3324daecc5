//! The router as a cluster node, on messages in and out (no Redis).

use std::rc::Rc;

use serde_json::Value;

use super::{router, Recorder};
use crate::chat::router::{ConnId, Router};
use crate::cluster::remote::{self, Carried, Inbound, Outcome, Outgoing, Remote, To};

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
            Outgoing::Release(_) => None,
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

#[test]
fn a_private_to_another_node_is_receipted_when_it_answers() {
    let (mut r, mut out) = node();
    r.join(ConnId(1), "username=ann", &mut out);
    r.on_cluster("peer", Inbound::Join(Rc::from("bob")), 0, &mut out);
    out.take();
    published(&mut r);
    r.handle(
        ConnId(1),
        r#"{"type":"private","to":"bob","body":"hi","ref":"r"}"#,
        5,
        &mut out,
    );
    assert!(
        out.take().is_empty(),
        "no receipt before bob's node answers"
    );
    let carried = match published(&mut r).pop() {
        Some((To::Node(n), Inbound::Private(c))) if &*n == "peer" => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (
            carried.from.as_str(),
            carried.to.as_str(),
            carried.body.as_str()
        ),
        ("ann", "bob", "hi")
    );
    r.on_cluster(
        "peer",
        Inbound::Receipt(carried.tag, Outcome::Delivered),
        6,
        &mut out,
    );
    let sent = out.take();
    assert_eq!(types(&sent), vec![(1, "receipt".to_string())]);
    assert_eq!(
        (sent[0].1["status"].clone(), sent[0].1["ref"].clone()),
        ("delivered".into(), "r".into())
    );
    assert_eq!(sent[0].1["id"], carried.id);

    // Absent on arrival: held here, `queued` once on disk.
    r.handle(
        ConnId(1),
        r#"{"type":"private","to":"bob","body":"2"}"#,
        7,
        &mut out,
    );
    let Some((_, Inbound::Private(second))) = published(&mut r).pop() else {
        panic!("sent on")
    };
    r.on_cluster(
        "peer",
        Inbound::Receipt(second.tag, Outcome::Absent),
        8,
        &mut out,
    );
    assert_eq!(
        out.durable.pop().map(|(s, v)| (s, v["status"].clone())),
        Some((1, "queued".into()))
    );
    assert_eq!(r.held().0, 1);

    // No answer at all: the sender is told it may not have arrived.
    r.handle(
        ConnId(1),
        r#"{"type":"private","to":"bob","body":"3","ref":9}"#,
        10,
        &mut out,
    );
    r.cluster_overdue(10 + r.remote().unwrap().receipt_timeout_ms, &mut out);
    let sent = out.take();
    assert_eq!(
        (sent[0].1["code"].clone(), sent[0].1["ref"].clone()),
        ("cluster_unavailable".into(), 9.into())
    );
}

#[test]
fn a_private_from_another_node_is_delivered_or_reported_absent() {
    let (mut r, mut out) = node();
    r.join(ConnId(4), "username=bob", &mut out);
    out.take();
    published(&mut r);
    let carried = |tag, to: &str| Carried {
        tag,
        id: 77,
        ts: 1,
        from: "ann".into(),
        to: to.into(),
        body: "hey".into(),
    };
    r.on_cluster("peer", Inbound::Private(carried(3, "bob")), 0, &mut out);
    let sent = out.take();
    assert_eq!(
        (
            sent[0].0,
            sent[0].1["from"].clone(),
            sent[0].1["id"].clone()
        ),
        (4, "ann".into(), 77.into())
    );
    r.on_cluster("peer", Inbound::Private(carried(4, "nobody")), 0, &mut out);
    out.gone.push(4);
    r.on_cluster("peer", Inbound::Private(carried(5, "bob")), 0, &mut out);
    assert_eq!(
        published(&mut r),
        vec![
            (
                To::Node(Rc::from("peer")),
                Inbound::Receipt(3, Outcome::Delivered)
            ),
            (
                To::Node(Rc::from("peer")),
                Inbound::Receipt(4, Outcome::Absent)
            ),
            (
                To::Node(Rc::from("peer")),
                Inbound::Receipt(5, Outcome::Absent)
            ),
        ]
    );
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
