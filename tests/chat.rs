//! Black-box tests of the chat protocol: the real `wschat` binary, real
//! sockets, tungstenite and raw clients.

mod chat_support;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chat_support::{
    now_ms, percent_encode, ws_path, Chat, ChatServer, Event, Raw, RawRead, OP_CLOSE, OP_PING,
    OP_PONG, OP_TEXT,
};
use serde_json::{json, Value};
use tungstenite::Message;

fn names(v: &Value, context: &str) -> BTreeSet<String> {
    v["users"]
        .as_array()
        .unwrap_or_else(|| panic!("{context}: `users` is not an array: {v}"))
        .iter()
        .map(|n| {
            n.as_str()
                .unwrap_or_else(|| panic!("{context}: a user name is not a string: {v}"))
                .to_string()
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn id_of(v: &Value) -> u64 {
    v["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("`id` is not a non-negative integer: {v}"))
}

/// Checks every field of a public message; returns its id.
fn assert_public(v: &Value, from: &str, body: &str, sent_at: u64, context: &str) -> u64 {
    assert_eq!(v["type"], "public", "{context}: {v}");
    assert_eq!(v["from"], json!(from), "{context}: from: {v}");
    assert_eq!(v["body"], json!(body), "{context}: body: {v}");
    let ts = v["ts"]
        .as_u64()
        .unwrap_or_else(|| panic!("{context}: `ts` is not an integer: {v}"));
    assert!(
        ts + 5 >= sent_at && ts <= now_ms() + 5,
        "{context}: ts {ts} is not the Unix time in ms of the send ({sent_at}): {v}"
    );
    let obj = v.as_object().expect("message is an object");
    let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["body", "from", "id", "ts", "type"].into_iter().collect(),
        "{context}: public message fields: {v}"
    );
    id_of(v)
}

/// Checks every field of a private message; returns its id.
fn assert_private(v: &Value, from: &str, to: &str, body: &str, sent_at: u64, context: &str) -> u64 {
    assert_eq!(v["type"], "private", "{context}: {v}");
    assert_eq!(v["from"], json!(from), "{context}: from: {v}");
    assert_eq!(v["to"], json!(to), "{context}: to: {v}");
    assert_eq!(v["body"], json!(body), "{context}: body: {v}");
    let ts = v["ts"]
        .as_u64()
        .unwrap_or_else(|| panic!("{context}: `ts` is not an integer: {v}"));
    assert!(
        ts + 5 >= sent_at && ts <= now_ms() + 5,
        "{context}: ts {ts} is not the Unix time in ms of the send ({sent_at}): {v}"
    );
    id_of(v)
}

fn assert_presence(v: &Value, kind: &str, username: &str, online: u64, context: &str) {
    assert_eq!(
        v,
        &json!({"type": kind, "username": username, "online": online}),
        "{context}"
    );
}

// ---------------------------------------------------------------------------
// welcome, join, leave
// ---------------------------------------------------------------------------

#[test]
fn welcome_lists_the_others_and_counts_everyone() {
    let server = ChatServer::start(&[]);
    let (mut alice, w) = Chat::join(server.addr, "alice");
    assert_eq!(
        w,
        json!({"type":"welcome","username":"alice","online":1,"users":[],"limits":{"max_body":8192}}),
        "first user's welcome"
    );

    let (mut bob, w) = Chat::join(server.addr, "bob");
    assert_eq!(
        w,
        json!({"type":"welcome","username":"bob","online":2,"users":["alice"],"limits":{"max_body":8192}}),
        "second user's welcome"
    );
    assert_presence(
        &alice.recv("alice sees bob join"),
        "join",
        "bob",
        2,
        "join bob",
    );

    let (mut carol, w) = Chat::join(server.addr, "carol");
    assert_eq!(w["online"], 3, "carol's welcome counts her: {w}");
    assert_eq!(
        names(&w, "carol's welcome"),
        set(&["alice", "bob"]),
        "welcome lists the others only: {w}"
    );
    for c in [&mut alice, &mut bob] {
        let v = c.recv("sees carol join");
        assert_presence(&v, "join", "carol", 3, "join carol");
    }

    // A client-initiated close: the others get leave with the new count.
    bob.close();
    for c in [&mut alice, &mut carol] {
        let v = c.recv("sees bob leave");
        assert_presence(&v, "leave", "bob", 2, "leave bob after close");
    }

    // A TCP connection dropped without a closing handshake: leave as well.
    drop(carol);
    let v = alice.recv("sees carol's connection drop");
    assert_presence(&v, "leave", "carol", 1, "leave carol after TCP drop");

    // The joiner itself gets no join event: its next message is its own public.
    let (mut dave, _) = Chat::join(server.addr, "dave");
    assert_presence(&alice.recv("join dave"), "join", "dave", 2, "join dave");
    let t = now_ms();
    dave.public("hello");
    assert_public(&dave.recv("dave's own public"), "dave", "hello", t, "dave");
}

// ---------------------------------------------------------------------------
// public and private messages
// ---------------------------------------------------------------------------

/// Presence events may be held for a few milliseconds to batch a burst of
/// arrivals; they must still arrive complete, in order, and never behind a
/// newcomer's first message.
#[test]
fn a_burst_of_arrivals_reaches_a_watcher_in_order_before_their_messages() {
    // A crowd from one address, faster than --max-handshakes-per-ip allows.
    let server = ChatServer::start(&["--max-handshakes-per-ip", "0"]);
    let mut watcher = Chat::joined(server.addr, "watcher");
    // Each newcomer's message closes the watcher's presence window early;
    // the lone arrival below is released by the window's deadline.
    let newcomers: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
    let mut clients = Vec::new();
    for name in &newcomers {
        let mut client = Chat::joined(server.addr, name);
        client.public(&format!("hello from {name}"));
        clients.push(client);
    }
    let mut joined = BTreeSet::new();
    let mut online = 1;
    let mut said = 0;
    while said < newcomers.len() {
        let v = watcher.recv("burst of arrivals");
        match v["type"].as_str() {
            Some("join") => {
                online += 1;
                let name = newcomers[online - 2].as_str();
                assert_presence(&v, "join", name, online as u64, "joins in order");
                joined.insert(name.to_owned());
            }
            Some("public") => {
                let from = v["from"].as_str().unwrap_or_default().to_owned();
                assert!(
                    joined.contains(&from),
                    "{from}'s message arrived before its join: {v}"
                );
                assert_eq!(v["body"], format!("hello from {from}"));
                said += 1;
            }
            _ => panic!("unexpected event {v}"),
        }
    }
    assert_eq!(joined.len(), newcomers.len());
    // A lone arrival with no traffic after it still arrives.
    let _last = Chat::joined(server.addr, "last");
    let v = watcher.recv("a lone join");
    assert_presence(&v, "join", "last", newcomers.len() as u64 + 2, "lone join");

    // Departures: each one's last message comes before its leave.
    let mut online = newcomers.len() as u64 + 2;
    for (name, mut client) in newcomers.iter().zip(clients).take(10) {
        client.public(&format!("bye from {name}"));
        client.close();
        let v = watcher.recv("last words");
        assert_public(&v, name, &format!("bye from {name}"), 0, "last words");
        online -= 1;
        let v = watcher.recv("a leave");
        assert_presence(&v, "leave", name, online, "leave after last words");
    }
}

/// A `join` still held in the presence window when the connection is
/// closed goes out before the close frame.
#[test]
fn a_join_held_at_shutdown_still_comes_before_the_close() {
    let server = ChatServer::start(&[]);
    let mut watcher = Chat::joined(server.addr, "watcher");
    let _newcomer = Chat::joined(server.addr, "newcomer");
    server.signal("TERM");
    let v = watcher.recv("the newcomer's join before the shutdown close");
    assert_presence(&v, "join", "newcomer", 2, "join before 1001");
    watcher.expect_close(1001, None, "shutdown");
}

/// A client that closes while a `join` is held for it still gets the join
/// before the server's close reply (the join may also have left already).
#[test]
fn a_join_held_when_the_client_closes_comes_before_the_close_reply() {
    let server = ChatServer::start(&[]);
    let mut watcher = Chat::joined(server.addr, "watcher");
    let _newcomer = Chat::joined(server.addr, "newcomer");
    watcher.ws.close(None).expect("start the close");
    let mut saw_join = false;
    loop {
        match watcher.ws.read() {
            Ok(Message::Text(text)) => {
                let v: Value = serde_json::from_str(&text).expect("JSON");
                assert_presence(&v, "join", "newcomer", 2, "join before the close reply");
                saw_join = true;
            }
            Ok(Message::Close(_)) => assert!(saw_join, "the close reply came before the join"),
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing handshake failed: {e}"),
        }
    }
    assert!(saw_join, "the join never came");
}

#[test]
fn public_messages_reach_everyone_including_the_sender() {
    let server = ChatServer::start(&[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    alice.recv_type("join", "alice sees bob");
    let mut carol = Chat::joined(server.addr, "carol");
    alice.recv_type("join", "alice sees carol");
    bob.recv_type("join", "bob sees carol");

    let body = "say \"hi\"\n\ttab \\ back / slash \u{e9}\u{5c0f}\u{1f600} \u{0}\u{1f}";
    let t = now_ms();
    alice.public(body);
    let mut ids = Vec::new();
    for c in [&mut alice, &mut bob, &mut carol] {
        let v = c.recv("public from alice");
        ids.push(assert_public(&v, "alice", body, t, "public reaches all"));
    }
    assert!(
        ids.iter().all(|&i| i == ids[0]),
        "every recipient sees the same id: {ids:?}"
    );

    // Empty bodies are fine; ids increase across senders.
    let t = now_ms();
    bob.public("");
    let mut bob_ids = Vec::new();
    for c in [&mut alice, &mut bob, &mut carol] {
        let id = assert_public(&c.recv("empty public"), "bob", "", t, "empty body");
        assert!(id > ids[0], "ids increase: {id} after {}", ids[0]);
        bob_ids.push(id);
    }
    assert!(bob_ids.iter().all(|&i| i == bob_ids[0]), "{bob_ids:?}");
    let t = now_ms();
    for i in 0..5 {
        carol.public(&format!("n{i}"));
    }
    for c in [&mut alice, &mut bob, &mut carol] {
        let mut prev = bob_ids[0];
        for i in 0..5 {
            let v = c.recv("burst");
            let id = assert_public(&v, "carol", &format!("n{i}"), t, "burst in order");
            assert!(id > prev, "ids increase within a burst: {id} after {prev}");
            prev = id;
        }
    }
}

#[test]
fn private_messages_reach_only_the_addressee_and_are_receipted() {
    let server = ChatServer::start(&[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    alice.recv_type("join", "bob joins");
    let mut carol = Chat::joined(server.addr, "carol");
    alice.recv_type("join", "carol joins");
    bob.recv_type("join", "carol joins");

    let t = now_ms();
    alice.private("bob", "psst \u{1f92b}");
    let v = bob.recv("bob gets the private message");
    let id = assert_private(&v, "alice", "bob", "psst \u{1f92b}", t, "private");
    let keys: BTreeSet<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["body", "from", "id", "seq", "to", "ts", "type"]
            .into_iter()
            .collect(),
        "private message fields: {v}"
    );
    let receipt = alice.recv("alice gets a receipt");
    assert_eq!(
        receipt,
        json!({"type":"receipt","id":id,"status":"delivered"}),
        "receipt without a ref has no ref field"
    );

    // Isolation: the next thing carol (and alice) receive is a later public.
    let t = now_ms();
    bob.public("after the secret");
    for c in [&mut carol, &mut alice, &mut bob] {
        let v = c.recv("next message after the private one");
        let pid = assert_public(&v, "bob", "after the secret", t, "isolation");
        assert!(pid > id, "public id {pid} after private id {id}");
    }

    // Both directions, several in a row, in order.
    for i in 0..3 {
        bob.private("alice", &format!("r{i}"));
    }
    let mut prev = id;
    for i in 0..3 {
        let v = alice.recv("alice gets bob's private");
        let pid = assert_private(&v, "bob", "alice", &format!("r{i}"), t, "reply");
        assert!(pid > prev, "ids increase: {pid} after {prev}");
        prev = pid;
        let r = bob.recv_type("receipt", "bob's receipt");
        assert_eq!(r["id"], json!(pid), "receipt id matches the message: {r}");
        assert_eq!(r["status"], "delivered", "{r}");
    }
    let t = now_ms();
    alice.public("still private?");
    let v = carol.recv("carol after the replies");
    assert_public(
        &v,
        "alice",
        "still private?",
        t,
        "carol saw no private message",
    );
}

#[test]
fn private_message_to_self_is_delivered_and_receipted() {
    let server = ChatServer::start(&[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    alice.recv_type("join", "bob joins");

    let t = now_ms();
    alice.send(json!({"type":"private","to":"alice","body":"note to self","ref":"me"}));
    let a = alice.recv("first of private + receipt");
    let b = alice.recv("second of private + receipt");
    let (msg, receipt) = if a["type"] == "private" {
        (a, b)
    } else {
        (b, a)
    };
    let id = assert_private(&msg, "alice", "alice", "note to self", t, "self");
    assert_eq!(
        receipt,
        json!({"type":"receipt","id":id,"ref":"me","status":"delivered"}),
        "receipt for a message to self"
    );
    let t = now_ms();
    alice.public("then public");
    assert_public(
        &bob.recv("bob's next message"),
        "alice",
        "then public",
        t,
        "bob never sees alice's note to self",
    );
}

#[test]
fn client_supplied_from_is_ignored_and_unknown_fields_too() {
    let server = ChatServer::start(&[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    alice.recv_type("join", "bob joins");

    let t = now_ms();
    alice.send(
        json!({"type":"public","from":"bob","body":"I am bob","extra":{"x":[1,2]},"id":999,"ts":1}),
    );
    for c in [&mut alice, &mut bob] {
        let v = c.recv("spoofed public");
        let id = assert_public(&v, "alice", "I am bob", t, "server stamps the sender");
        assert_ne!(id, 999, "client-supplied id is ignored: {v}");
    }
    alice.send(json!({"from":"mallory","to":"bob","body":"hi","type":"private","flag":true}));
    let v = bob.recv("spoofed private");
    assert_private(&v, "alice", "bob", "hi", t, "private from is stamped");
    alice.recv_type("receipt", "receipt for the spoofed private");
}

// ---------------------------------------------------------------------------
// usernames
// ---------------------------------------------------------------------------

#[test]
fn unicode_usernames_work_percent_encoded() {
    let server = ChatServer::start(&[]);
    let (mut ming, w) = Chat::join(server.addr, "\u{5c0f}\u{660e}");
    assert_eq!(w["users"], json!([]), "{w}");
    let zoe_name = "Zo\u{eb}";
    let (mut zoe, w) = Chat::join(server.addr, zoe_name);
    assert_eq!(w["users"], json!(["\u{5c0f}\u{660e}"]), "{w}");
    assert_presence(&ming.recv("join Zoë"), "join", zoe_name, 2, "join Zoë");

    // Other scripts (one a name: Latin with Greek would be mixed), digits,
    // `_ - .`, and exactly 32 characters (64 bytes).
    let long = "\u{e9}".repeat(32);
    for name in [
        "\u{3a9}\u{3bc}\u{3ad}\u{3b3}\u{3b1}_1.2-3",
        "\u{663}\u{664}",
        "a",
        long.as_str(),
    ] {
        let (c, _) = Chat::join(server.addr, name);
        for other in [&mut ming, &mut zoe] {
            assert_presence(&other.recv("join"), "join", name, 3, "unicode join");
        }
        c.close();
        for other in [&mut ming, &mut zoe] {
            assert_presence(&other.recv("leave"), "leave", name, 2, "unicode leave");
        }
    }

    let t = now_ms();
    zoe.private("\u{5c0f}\u{660e}", "\u{4f60}\u{597d}");
    let v = ming.recv("小明 gets Zoë's private");
    assert_private(
        &v,
        zoe_name,
        "\u{5c0f}\u{660e}",
        "\u{4f60}\u{597d}",
        t,
        "unicode private",
    );
    zoe.recv_type("receipt", "Zoë's receipt");
    ming.public("hi");
    for c in [&mut ming, &mut zoe] {
        assert_public(
            &c.recv("public"),
            "\u{5c0f}\u{660e}",
            "hi",
            t,
            "unicode sender",
        );
    }
    let users = zoe.users("users with unicode names");
    assert_eq!(
        names(&users, "users"),
        set(&["\u{5c0f}\u{660e}", zoe_name]),
        "{users}"
    );
}

#[test]
fn invalid_usernames_are_refused_with_4001_after_the_handshake() {
    let server = ChatServer::start(&[]);
    let mut watcher = Chat::joined(server.addr, "watcher");
    let a33 = format!("/ws?username={}", "a".repeat(33));
    let e33 = format!("/ws?username={}", percent_encode(&"\u{e9}".repeat(33)));
    let paths = [
        ("empty", "/ws?username="),
        ("missing parameter", "/ws"),
        ("other parameter only", "/ws?name=alice"),
        ("space", "/ws?username=a%20b"),
        ("plus", "/ws?username=a+b"),
        ("33 ASCII characters", a33.as_str()),
        ("33 two-byte characters", e33.as_str()),
        ("emoji", "/ws?username=%F0%9F%98%80"),
        ("markup", "/ws?username=%3Cb%3E"),
        ("slash", "/ws?username=a%2Fb"),
        ("invalid UTF-8", "/ws?username=%C3"),
    ];
    for (what, path) in paths {
        let mut c = Chat::open(server.addr, path);
        c.label = format!("{what} ({path})");
        let e = c.recv_error("invalid_username", "first message for an invalid name");
        assert!(e.get("ref").is_none(), "{what}: no ref: {e}");
        c.expect_close(4001, None, "invalid name");
    }
    // Nobody joined: no presence events, and the count is unchanged.
    let users = watcher.users("after the refused names");
    assert_eq!(
        users,
        json!({"type":"users","online":1,"users":["watcher"]}),
        "refused clients are not online"
    );
}

#[test]
fn a_taken_username_is_refused_with_4009_and_the_owner_keeps_working() {
    let server = ChatServer::start(&[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    alice.recv_type("join", "bob joins");

    let mut dup = Chat::open(server.addr, &ws_path("alice"));
    dup.label = "second alice".into();
    dup.recv_error("username_taken", "duplicate name");
    dup.expect_close(4009, None, "duplicate name");

    // The owner still sends and receives; bob saw no leave/join for alice.
    let t = now_ms();
    alice.public("still here");
    for c in [&mut bob, &mut alice] {
        assert_public(&c.recv("after dup"), "alice", "still here", t, "owner");
    }
    bob.private("alice", "to the original");
    let v = alice.recv("private reaches the original alice");
    assert_private(&v, "bob", "alice", "to the original", t, "owner");
    bob.recv_type("receipt", "receipt");
    assert_eq!(
        alice.users("users")["online"],
        2,
        "the refused duplicate is not counted"
    );

    // Once the owner leaves, the name is free again.
    alice.close();
    assert_presence(&bob.recv("alice leaves"), "leave", "alice", 1, "leave");
    let (_again, w) = Chat::join(server.addr, "alice");
    assert_eq!(w["online"], 2, "{w}");
    assert_presence(&bob.recv("alice again"), "join", "alice", 2, "rejoin");
}

// ---------------------------------------------------------------------------
// presence limit, users
// ---------------------------------------------------------------------------

#[test]
fn presence_events_stop_above_the_presence_limit() {
    let server = ChatServer::start(&["--presence-limit", "2"]);
    let mut a = Chat::joined(server.addr, "a");
    let (mut b, w) = Chat::join(server.addr, "b");
    assert_eq!(w["online"], 2, "{w}");
    assert_presence(&a.recv("join b at the limit"), "join", "b", 2, "join b");

    // Third user: online 3 > 2, no join event for anyone.
    let (mut c, w) = Chat::join(server.addr, "c");
    assert_eq!(w["online"], 3, "welcome still counts: {w}");
    assert_eq!(names(&w, "welcome"), set(&["a", "b"]), "{w}");
    let (d, w) = Chat::join(server.addr, "d");
    assert_eq!(w["online"], 4, "{w}");
    let t = now_ms();
    c.public("probe");
    for x in [&mut a, &mut b, &mut c] {
        assert_public(
            &x.recv("next after joins"),
            "c",
            "probe",
            t,
            "no join above the limit",
        );
    }
    let users = a.users("users above the limit");
    assert_eq!(users["online"], 4, "{users}");
    assert_eq!(
        names(&users, "users"),
        set(&["a", "b", "c", "d"]),
        "{users}"
    );

    // d leaves: 3 online, still above the limit: no leave event.
    d.close();
    let t = now_ms();
    c.public("probe 2");
    for x in [&mut a, &mut b, &mut c] {
        assert_public(
            &x.recv("next after d left"),
            "c",
            "probe 2",
            t,
            "no leave above",
        );
    }
    // c leaves: 2 online, at the limit again: leave events resume.
    c.close();
    for x in [&mut a, &mut b] {
        assert_presence(&x.recv("c leaves"), "leave", "c", 2, "leave at the limit");
    }
    b.close();
    assert_presence(
        &a.recv("b leaves"),
        "leave",
        "b",
        1,
        "leave below the limit",
    );
}

#[test]
fn users_request_lists_everyone_online() {
    let server = ChatServer::start(&[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let users = alice.users("alone");
    assert_eq!(users, json!({"type":"users","online":1,"users":["alice"]}));

    let mut bob = Chat::joined(server.addr, "bob");
    let carol = Chat::joined(server.addr, "carol");
    alice.recv_type("join", "bob");
    alice.recv_type("join", "carol");
    bob.recv_type("join", "carol");
    for c in [&mut alice, &mut bob] {
        let users = c.users("three online");
        assert_eq!(users["online"], 3, "{users}");
        assert_eq!(
            names(&users, "users"),
            set(&["alice", "bob", "carol"]),
            "{users}"
        );
        let keys: BTreeSet<&str> = users
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["online", "type", "users"].into_iter().collect(),
            "{users}"
        );
    }
    carol.close();
    alice.recv_type("leave", "carol leaves");
    bob.recv_type("leave", "carol leaves");
    let users = alice.users("two online");
    assert_eq!(users["online"], 2, "{users}");
    assert_eq!(names(&users, "users"), set(&["alice", "bob"]), "{users}");
    // A users request is answered to the asker only.
    let t = now_ms();
    alice.public("ping");
    assert_public(
        &bob.recv("bob's next"),
        "alice",
        "ping",
        t,
        "bob got no users reply",
    );
}

// ---------------------------------------------------------------------------
// ref and errors
// ---------------------------------------------------------------------------

#[test]
fn ref_is_echoed_in_receipts_and_errors() {
    let server = ChatServer::start(&["--max-body", "10"]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    alice.recv_type("join", "bob");

    let r64 = "r".repeat(64);
    let refs = [
        json!("m-1"),
        json!(42),
        json!(0),
        json!(-7),
        json!(9007199254740993u64),
        json!(""),
        json!("\u{e9}\"q\\"),
        json!(r64),
    ];
    for r in &refs {
        alice.send(json!({"type":"private","to":"bob","body":"x","ref":r}));
        let m = bob.recv_type("private", "bob's private");
        assert!(m.get("ref").is_none(), "the ref is not forwarded: {m}");
        let receipt = alice.recv_type("receipt", "receipt with ref");
        assert_eq!(
            receipt,
            json!({"type":"receipt","id":m["id"],"ref":r,"status":"delivered"}),
            "ref {r} echoed in the receipt"
        );
    }

    let errors = [
        (
            json!({"type":"shout","ref":"s"}),
            "unknown_type",
            json!("s"),
        ),
        (json!({"type":"shout","ref":5}), "unknown_type", json!(5)),
        (json!({"body":"x","ref":"t"}), "missing_field", json!("t")),
        (json!({"type":"public","ref":6}), "missing_field", json!(6)),
        (
            json!({"type":"private","body":"x","ref":"no-to"}),
            "missing_field",
            json!("no-to"),
        ),
        (
            json!({"type":"private","to":"bob","ref":8}),
            "missing_field",
            json!(8),
        ),
        (
            json!({"type":"public","body":"01234567890","ref":"long"}),
            "body_too_long",
            json!("long"),
        ),
        (
            json!({"type":"private","to":"bob","body":"01234567890","ref":9}),
            "body_too_long",
            json!(9),
        ),
    ];
    for (request, code, r) in errors {
        alice.send(request.clone());
        let e = alice.recv_error(code, &format!("error for {request}"));
        assert_eq!(
            e["ref"], r,
            "ref echoed in the {code} error for {request}: {e}"
        );
    }
    // Without a ref, the error carries none.
    alice.send(json!({"type":"shout"}));
    let e = alice.recv_error("unknown_type", "no ref");
    assert!(e["ref"].is_null(), "no ref given, none echoed: {e}");
    // Bob never saw any of the refused messages.
    let t = now_ms();
    alice.public("done");
    assert_public(
        &bob.recv("bob's next"),
        "alice",
        "done",
        t,
        "refused messages not sent",
    );
}

#[test]
fn every_error_code_and_the_connection_stays_open() {
    let server = ChatServer::start(&[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    alice.recv_type("join", "bob");

    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "invalid_json"),
        ("".into(), "invalid_json"),
        ("{\"type\":\"public\",\"body\":\"x\"".into(), "invalid_json"),
        ("[1,2]".into(), "invalid_json"),
        ("\"public\"".into(), "invalid_json"),
        ("{\"type\":\"public\",\"body\":5}".into(), "invalid_json"),
        ("{\"type\":\"shout\",\"body\":\"x\"}".into(), "unknown_type"),
        (
            "{\"type\":\"PUBLIC\",\"body\":\"x\"}".into(),
            "unknown_type",
        ),
        ("{\"type\":\"welcome\"}".into(), "unknown_type"),
        ("{}".into(), "missing_field"),
        ("{\"body\":\"x\"}".into(), "missing_field"),
        ("{\"type\":\"public\"}".into(), "missing_field"),
        (
            "{\"type\":\"private\",\"body\":\"x\"}".into(),
            "missing_field",
        ),
        (
            "{\"type\":\"private\",\"to\":\"bob\"}".into(),
            "missing_field",
        ),
        (
            json!({"type":"public","body":"x".repeat(8193)}).to_string(),
            "body_too_long",
        ),
        (
            json!({"type":"private","to":"bob","body":"x".repeat(8193)}).to_string(),
            "body_too_long",
        ),
    ];
    for (text, code) in &cases {
        alice.send_text(text);
        let shown = &text[..text.len().min(60)];
        let e = alice.recv_error(code, &format!("sent {shown:?}"));
        let keys: BTreeSet<&str> = e
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            ["code", "message", "type"].into_iter().collect(),
            "{e}"
        );
        // Still open and serving this client.
        let users = alice.users("after an error");
        assert_eq!(users["online"], 2, "{users}");
    }
    // The default --max-body is 8192 bytes: exactly that is accepted.
    let body = "x".repeat(8192);
    let t = now_ms();
    alice.public(&body);
    assert_public(
        &bob.recv("8192-byte body"),
        "alice",
        &body,
        t,
        "body at the limit",
    );
    assert_public(&alice.recv("own"), "alice", &body, t, "body at the limit");
    // None of the refused messages reached bob.
    alice.public("end");
    assert_public(
        &bob.recv("bob's next"),
        "alice",
        "end",
        t,
        "errors are private",
    );
}

#[test]
fn body_limit_counts_bytes_not_characters() {
    let server = ChatServer::start(&["--max-body", "16"]);
    let (mut alice, welcome) = Chat::join(server.addr, "alice");
    assert_eq!(
        welcome["limits"],
        json!({"max_body":16}),
        "the welcome tells the limit"
    );
    let t = now_ms();
    let ok = "\u{e9}".repeat(8); // 16 bytes
    alice.public(&ok);
    assert_public(&alice.recv("16 bytes"), "alice", &ok, t, "at the limit");
    alice.public(&"\u{e9}".repeat(9)); // 9 characters, 18 bytes
    alice.recv_error("body_too_long", "18 bytes in 9 characters");
    alice.private("alice", &"y".repeat(17));
    alice.recv_error("body_too_long", "17-byte private");
    alice.private("alice", &"y".repeat(16));
    alice.recv_type("private", "16-byte private");
    alice.recv_type("receipt", "16-byte private");
}

#[test]
fn a_binary_message_closes_with_1003() {
    let server = ChatServer::start(&[]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut bob = Chat::joined(server.addr, "bob");
    alice.recv_type("join", "bob");
    bob.ws
        .send(Message::binary(
            b"{\"type\":\"public\",\"body\":\"x\"}".to_vec(),
        ))
        .expect("send a binary message");
    bob.expect_close(1003, None, "binary message");
    assert_presence(&alice.recv("bob leaves"), "leave", "bob", 1, "after 1003");
    assert_eq!(alice.users("after")["online"], 1, "bob's name is free");
}

// ---------------------------------------------------------------------------
// heartbeat and idle timeout
// ---------------------------------------------------------------------------

#[test]
fn server_pings_and_a_client_that_answers_stays_online() {
    let server = ChatServer::start(&["--ping-interval", "100ms", "--idle-timeout", "350ms"]);
    let mut alice = Chat::joined(server.addr, "alice");
    let start = Instant::now();
    let mut pings = 0;
    // Eight pings span about 800 ms, more than twice the idle timeout; the
    // client sends nothing but the pongs tungstenite answers with.
    while pings < 8 {
        assert!(start.elapsed() < Duration::from_secs(5), "too few pings");
        match alice.event("waiting for pings") {
            Event::Ping => pings += 1,
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(600),
        "8 pings at 100 ms intervals came in {elapsed:?}"
    );
    let t = now_ms();
    alice.public("alive");
    assert_public(
        &alice.recv("still online"),
        "alice",
        "alive",
        t,
        "after pings",
    );
}

#[test]
fn first_ping_comes_after_the_ping_interval() {
    let server = ChatServer::start(&["--ping-interval", "200ms"]);
    let start = Instant::now();
    let mut raw = Raw::join(server.addr, "raw");
    let f = raw.frame("waiting for a ping");
    assert_eq!(f.opcode, OP_PING, "expected a ping, got {f:?}");
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(2),
        "first ping after {elapsed:?}, expected about 200 ms"
    );
    assert!(f.payload.len() <= 125, "{f:?}");
    // Answer it, and the connection carries on.
    let payload = f.payload.clone();
    raw.send_frame(OP_PONG, &payload);
    raw.send_frame(OP_TEXT, br#"{"type":"users"}"#);
    let v = raw.expect_json("users after a pong");
    assert_eq!(v["type"], "users", "{v}");
}

#[test]
fn a_silent_client_is_closed_with_1001_idle_timeout() {
    let server = ChatServer::start(&["--ping-interval", "150ms", "--idle-timeout", "600ms"]);
    let mut watcher = Chat::joined(server.addr, "watcher");
    let start = Instant::now();
    let mut idle = Raw::join(server.addr, "idle");
    // The watcher keeps reading (so tungstenite answers its pings) until the
    // idle client leaves.
    let watcher_thread = std::thread::spawn(move || {
        let mut got_join = false;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            assert!(
                Instant::now() < deadline,
                "the watcher never saw idle leave"
            );
            match watcher.event("watcher") {
                Event::Ping => {}
                Event::Json(v) if !got_join => {
                    assert_presence(&v, "join", "idle", 2, "join idle");
                    got_join = true;
                }
                Event::Json(v) => {
                    assert_presence(&v, "leave", "idle", 1, "idle leaves");
                    return watcher;
                }
                Event::Close(c) => panic!("the watcher was closed too: {c:?}"),
            }
        }
    });
    let mut pings = 0;
    let close = loop {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the idle client was never closed"
        );
        let f = idle.frame("waiting for the idle close");
        match f.opcode {
            OP_PING => pings += 1,
            OP_CLOSE => break f,
            _ => panic!("unexpected frame for the idle client: {f:?}"),
        }
    };
    let elapsed = start.elapsed();
    assert_eq!(close.close_code(), Some(1001), "close frame {close:?}");
    assert_eq!(close.close_reason(), "idle timeout", "close reason");
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(3),
        "idle close after {elapsed:?}, expected about 600 ms"
    );
    assert!(pings >= 1, "the idle client was pinged before being closed");
    match idle.read("after the close frame") {
        RawRead::Closed => {}
        RawRead::Frame(f) => panic!("frame after the close: {f:?}"),
    }
    // The watcher, which answers pings, stays online and sees the leave.
    let mut watcher = watcher_thread.join().expect("watcher thread");
    assert_eq!(watcher.users("after")["online"], 1);
}

// ---------------------------------------------------------------------------
// slow consumers
// ---------------------------------------------------------------------------

/// Bytes of public messages that surely overflow what the kernel buffers
/// for one client that never reads (its receive buffer plus the server's
/// send buffer, both auto-tuned), so the rest piles up in the server.
fn flood_bytes() -> usize {
    let field = |path: &str, i: usize| -> Option<usize> {
        std::fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .nth(i)?
            .parse()
            .ok()
    };
    match (
        field("/proc/sys/net/ipv4/tcp_wmem", 2),
        field("/proc/sys/net/ipv4/tcp_rmem", 1),
    ) {
        (Some(wmem_max), Some(rmem_default)) => wmem_max + 2 * rmem_default + (1 << 20),
        _ => 16 << 20,
    }
}

const BIG: usize = 50_000;

fn big_body(i: usize) -> String {
    format!("{i:06}:{}", "b".repeat(BIG - 7))
}

fn body_index(v: &Value, context: &str) -> usize {
    let body = v["body"]
        .as_str()
        .unwrap_or_else(|| panic!("{context}: no body in {}", v["type"]));
    body[..6]
        .parse()
        .unwrap_or_else(|_| panic!("{context}: unexpected body {:?}", &body[..20]))
}

#[test]
fn a_slow_reader_gets_a_gap_and_the_others_get_everything() {
    let server = ChatServer::start(&[
        "--max-outbound",
        "65536",
        "--max-body",
        "60000",
        "--rate-limit",
        "0",
    ]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut carol = Chat::joined(server.addr, "carol");
    alice.recv_type("join", "carol");
    let mut dave = Raw::join(server.addr, "dave");
    alice.recv_type("join", "dave");
    carol.recv_type("join", "dave");

    // dave stops reading; alice floods, carol and alice read every message.
    let count = flood_bytes() / BIG + 1;
    let mut last_id = 0;
    for i in 0..count {
        let body = big_body(i);
        alice.public(&body);
        let v = carol.recv("carol during the flood");
        assert_eq!(body_index(&v, "flood"), i, "carol receives in order");
        assert!(v["body"] == json!(body), "body intact");
        let id = id_of(&v);
        assert!(id > last_id, "ids increase: {id} after {last_id}");
        last_id = id;
        let own = alice.recv("alice during the flood");
        assert_eq!(own["id"], json!(id), "alice gets her own message {i}");
    }

    // dave drains: a prefix of the flood in order, then the gap.
    let mut received = 0;
    let gap = loop {
        let v = dave.expect_json("dave drains");
        match v["type"].as_str() {
            Some("public") => {
                assert_eq!(
                    body_index(&v, "dave"),
                    received,
                    "dave's messages are in order"
                );
                received += 1;
            }
            Some("gap") => break v,
            _ => panic!("unexpected message while draining: {}", v["type"]),
        }
    };
    let dropped = gap["dropped"]
        .as_u64()
        .unwrap_or_else(|| panic!("gap without a count: {gap}"));
    assert_eq!(gap, json!({"type":"gap","dropped":dropped}), "gap fields");
    assert!(dropped >= 1, "{gap}");
    assert!(
        received < count,
        "dave got all {count} messages: nothing was shed"
    );
    assert_eq!(
        received as u64 + dropped,
        count as u64,
        "received ({received}) + dropped ({dropped}) = sent"
    );
    // dave is back in the stream.
    let t = now_ms();
    alice.public("after the gap");
    let v = dave.expect_json("after the gap");
    assert_public(&v, "alice", "after the gap", t, "dave after draining");
    carol.recv_type("public", "carol");
}

#[test]
fn a_slow_consumer_is_disconnected_by_a_private_message_others_keep_receiving() {
    let mut server = ChatServer::start(&[
        "--max-outbound",
        "65536",
        "--max-body",
        "60000",
        "--slow-reader-after",
        "300ms",
        "--rate-limit",
        "0",
    ]);
    let mut alice = Chat::joined(server.addr, "alice");
    let mut carol = Chat::joined(server.addr, "carol");
    alice.recv_type("join", "carol");
    let mut slow = Raw::join(server.addr, "slow");
    alice.recv_type("join", "slow");
    carol.recv_type("join", "slow");

    // While its backlog is small, a private message to slow is queued.
    alice.send(json!({"type":"private","to":"slow","body":"early","ref":"early"}));
    let r = alice.recv_type("receipt", "receipt for the early private");
    assert_eq!(r["ref"], "early", "{r}");

    // Public flood: slow never reads; carol and alice get every message in order.
    let count = flood_bytes() / BIG + 1;
    for i in 0..count {
        alice.public(&big_body(i));
        for c in [&mut carol, &mut alice] {
            let v = c.recv("public flood");
            assert_eq!(v["type"], "public", "{} during the flood", c.label);
            assert_eq!(body_index(&v, "flood"), i, "{} receives in order", c.label);
        }
    }

    // Private messages to slow until one would pass --max-outbound. While
    // slow's socket took bytes in the last --slow-reader-after, slow counts
    // as flooded rather than slow: such a private is refused to alice
    // (`recipient_busy`, alice is not read for a while), and she retries.
    let limit = (64 << 20) / BIG;
    let mut refused = None;
    let mut delivered_to_slow = Vec::new();
    let mut busy = 0;
    let mut k = 0;
    while k < limit {
        alice.send(json!({"type":"private","to":"slow","body":big_body(k),"ref":k}));
        let v = alice.recv("receipt for a private to slow");
        match (v["type"].as_str(), v["status"].as_str(), v["code"].as_str()) {
            (Some("receipt"), Some("delivered"), _) => {
                assert_eq!(v["ref"], json!(k), "{v}");
                delivered_to_slow.push(k);
            }
            (Some("error"), _, Some("recipient_busy")) => {
                assert_eq!(v["ref"], json!(k), "{v}");
                busy += 1;
                assert!(busy < 100, "slow is never judged slow");
                continue; // the same message again
            }
            // Disconnected: the message is held for later; the leave comes
            // behind the receipt (replies go ahead of presence).
            (Some("receipt"), Some("queued"), _) => {
                let leave = alice.recv("leave after the queued receipt");
                assert_presence(&leave, "leave", "slow", 2, "slow consumer leave (sender)");
                refused = Some((k, v));
                break;
            }
            _ => panic!("unexpected answer to a private message: {v}"),
        }
        k += 1;
    }
    let (k, receipt) = refused.unwrap_or_else(|| {
        panic!("slow was never disconnected after {limit} private messages of {BIG} bytes")
    });
    assert_eq!(
        receipt["status"], "queued",
        "held for slow's next visit: {receipt}"
    );
    assert_eq!(receipt["ref"], json!(k), "{receipt}");
    assert_presence(
        &carol.recv("slow leaves"),
        "leave",
        "slow",
        2,
        "slow consumer leave",
    );

    // Its name is free at once, and the held message is delivered to the
    // newcomer (offline), with a second receipt to the sender.
    let (mut new_slow, w) = Chat::join(server.addr, "slow");
    assert_eq!(w["online"], 3, "{w}");
    let held = new_slow.recv("the held private");
    assert_eq!(
        (held["type"].as_str(), held["offline"].as_bool()),
        (Some("private"), Some(true)),
        "{held}"
    );
    assert_eq!(held["id"], receipt["id"], "{held}");
    assert_presence(&carol.recv("new slow"), "join", "slow", 3, "name reused");
    // The receipt is a reply and goes ahead of the join (presence).
    let delivered = alice.recv("second receipt");
    alice.recv_type("join", "new slow");
    assert_eq!(
        (delivered["status"].as_str(), &delivered["id"]),
        (Some("delivered"), &receipt["id"]),
        "{delivered}"
    );
    let t = now_ms();
    alice.public("business as usual");
    assert_public(
        &carol.recv("carol"),
        "alice",
        "business as usual",
        t,
        "carol",
    );
    assert_public(
        &alice.recv("alice"),
        "alice",
        "business as usual",
        t,
        "alice",
    );

    // The old slow connection, read at last: what was buffered, then close
    // 1008 "slow consumer" (or the end of the connection), nothing more.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut seen, mut privates, mut publics) = (0, 0, 0);
    loop {
        assert!(
            Instant::now() < deadline,
            "the slow consumer's connection was never closed"
        );
        match slow.read("slow reads at last") {
            RawRead::Closed => break,
            RawRead::Frame(f) if f.opcode == OP_CLOSE => {
                assert_eq!(f.close_code(), Some(1008), "close frame {f:?}");
                assert_eq!(f.close_reason(), "slow consumer", "close reason");
                slow.expect_eof(Duration::from_secs(10), "after the 1008 close frame");
                break;
            }
            RawRead::Frame(f) if f.opcode == OP_PING => {}
            RawRead::Frame(f) => {
                let v = f.json();
                if seen == 0 {
                    assert_eq!(v["type"], "private", "slow's first message: {v}");
                    assert_eq!(v["body"], "early", "slow's first message: {v}");
                } else if v["type"] == "private" {
                    // Only what alice was told was delivered, in order.
                    assert_eq!(
                        Some(&body_index(&v, "slow private")),
                        delivered_to_slow.get(privates),
                        "slow got no refused private"
                    );
                    privates += 1;
                } else if v["type"] == "gap" {
                    // Its socket took what was queued (buffers grow): shed ones are counted.
                    publics += v["dropped"].as_u64().expect("a count") as usize;
                } else {
                    assert_eq!(v["type"], "public", "{v}");
                    assert_eq!(body_index(&v, "slow"), publics, "slow's publics in order");
                    publics += 1;
                }
                seen += 1;
            }
        }
    }
    server.assert_running();
}

// ---------------------------------------------------------------------------
// shutdown
// ---------------------------------------------------------------------------

fn shutdown_on(sig: &str) {
    let mut server = ChatServer::start(&["--shutdown-timeout", "3s"]);
    let mut clients = Vec::new();
    for name in ["a", "b", "c"] {
        let c = Chat::joined(server.addr, name);
        clients.push(c);
        let n = clients.len();
        for other in &mut clients[..n - 1] {
            other.recv_type("join", "join");
        }
    }
    let start = Instant::now();
    server.signal(sig);
    // Each client answers the close and then, like any real client, drops
    // its socket once the server has ended the connection.
    for mut c in clients {
        c.expect_close(1001, Some("server shutting down"), &format!("SIG{sig}"));
    }
    let status = server.wait_exit(Duration::from_secs(4));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIG{sig}: {status}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "with every client answering, exit should not wait for the timeout ({:?})",
        start.elapsed()
    );
    assert!(
        std::net::TcpStream::connect(server.addr).is_err(),
        "nothing listens after the exit"
    );
}

#[test]
fn sigterm_closes_every_client_with_1001_and_exits_0() {
    shutdown_on("TERM");
}

#[test]
fn sigint_closes_every_client_with_1001_and_exits_0() {
    shutdown_on("INT");
}

#[test]
fn shutdown_does_not_wait_past_the_timeout_for_a_client_that_never_answers() {
    let mut server = ChatServer::start(&["--shutdown-timeout", "500ms"]);
    let mut mute = Raw::join(server.addr, "mute");
    let start = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(3));
    let elapsed = start.elapsed();
    assert_eq!(status.code(), Some(0), "exit status: {status}");
    assert!(
        elapsed >= Duration::from_millis(400),
        "exited after {elapsed:?}, before the mute client's 500 ms were up"
    );
    let f = mute.frame("the mute client's buffered close");
    assert_eq!(f.opcode, OP_CLOSE, "{f:?}");
    assert_eq!(f.close_code(), Some(1001), "{f:?}");
    assert_eq!(f.close_reason(), "server shutting down");
    mute.expect_eof(Duration::from_secs(2), "after exit");
}

/// The log lines of connection number `id` that start with `verb`.
fn conn_lines<'a>(log: &'a str, verb: &str, id: &str) -> Vec<&'a str> {
    let tag = format!(" INFO {verb} #{id} ");
    log.lines().filter(|l| l.contains(&tag)).collect()
}

#[test]
fn log_lines_name_the_user_quoted_and_a_name_cannot_forge_a_line() {
    let mut server = ChatServer::start(&["--log", "info"]);
    let alice = Chat::joined(server.addr, "alice");
    let mut zoe = Chat::joined(server.addr, "Zoë");
    alice.close();
    zoe.recv_type("leave", "alice's leave");
    // Refused: a name with a line break and a fake log line after it.
    let mut forger = Chat::open(
        server.addr,
        &format!("/ws?username={}", percent_encode("x\nINFO close #1 forged")),
    );
    forger.recv_error("invalid_username", "the forged name");
    forger.expect_close(4001, None, "the forged name");
    drop(forger);
    drop(zoe); // its name is still known when its socket goes
    let log = server.log_after_exit();

    let id_of = |name: &str| -> String {
        let quoted = format!(" \"{name}\"");
        let line = log
            .lines()
            .find(|l| l.contains(" INFO join #") && l.ends_with(&quoted))
            .unwrap_or_else(|| panic!("no join line for {name}:\n{log}"));
        let after = &line[line.find(" INFO join #").expect("join") + " INFO join #".len()..];
        after.split(' ').next().expect("an id").to_string()
    };
    for name in ["alice", "Zoë"] {
        let id = id_of(name);
        assert_eq!(
            conn_lines(&log, "open", &id).len(),
            1,
            "{name}: open\n{log}"
        );
        let closes = conn_lines(&log, "close", &id);
        assert_eq!(closes.len(), 1, "{name}: one close line\n{log}");
        assert!(
            closes[0].contains(&format!(" \"{name}\": ")),
            "{name}: the close line names the user: {}",
            closes[0]
        );
    }
    // Every line is one whole log line: the refused name forged none.
    for line in log.lines() {
        let stamp = line.split(' ').next().unwrap_or_default();
        assert!(
            stamp.len() == 24 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "a line that is not a log line: {line:?}\n{log}"
        );
    }
    assert!(
        !log.contains("forged"),
        "the refused name was logged:\n{log}"
    );
}
