//! Who gets what: the username index, presence, and routing of public and
//! private messages. No I/O: frames go out through an [`Outbox`], which the
//! event loop implements over its connections (and tests implement over a Vec).

use std::collections::HashMap;
use std::rc::Rc;

use super::protocol::{self, encode, Request, RequestError};
use super::username;
use crate::outbound::Chunk;
use crate::ws::frame::{header_len, write_header, Opcode};

/// At most this many names are listed in `welcome` and `users`.
pub const LIST_LIMIT: usize = 1000;

/// How a frame may be treated by a recipient that cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Public messages and presence: shed above the soft mark, reported by `gap`.
    Public,
    /// Never shed: a recipient that cannot take it is disconnected.
    Private,
    /// An answer to the connection's own request (welcome, receipt, error).
    Reply,
}

/// What became of a frame handed to the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// Dropped for a slow recipient; it will be told with a `gap`.
    Shed,
    /// The recipient is gone or closing.
    Gone,
    /// The recipient was too slow for a private message and was disconnected.
    Disconnected,
}

/// Where the router's frames go.
pub trait Outbox {
    fn send(&mut self, slot: usize, frame: Chunk, class: Class) -> Delivery;
    /// Closes the connection in `slot` with a WebSocket close code.
    fn close(&mut self, slot: usize, code: u16, reason: &'static str);
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest `body`, in bytes.
    pub max_body: usize,
    /// Presence events are sent only while this many users or fewer are online.
    pub presence_limit: usize,
}

/// Counters for the operator.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouterStats {
    pub public: u64,
    pub private: u64,
    pub deliveries: u64,
    pub shed: u64,
    pub errors: u64,
}

#[derive(Debug)]
struct Member {
    slot: usize,
    name: Rc<str>,
}

/// Close codes of the chat protocol (4000-4999 is for applications).
pub const CLOSE_INVALID_USERNAME: u16 = 4001;
pub const CLOSE_USERNAME_TAKEN: u16 = 4009;

#[derive(Debug)]
pub struct Router {
    limits: Limits,
    /// Username to position in `members`.
    index: HashMap<Rc<str>, usize>,
    /// Everyone online, densely, for fan-out.
    members: Vec<Member>,
    last_id: u64,
    scratch: Vec<u8>,
    pub stats: RouterStats,
}

impl Router {
    pub fn new(limits: Limits) -> Router {
        Router {
            limits,
            index: HashMap::new(),
            members: Vec::new(),
            last_id: 0,
            scratch: Vec::with_capacity(256),
            stats: RouterStats::default(),
        }
    }

    pub fn online(&self) -> usize {
        self.members.len()
    }

    /// A WebSocket connection opened with `query`: admit it under its name,
    /// or refuse it with an error event and a close code. Returns the name.
    pub fn join(&mut self, slot: usize, query: &str, out: &mut impl Outbox) -> Option<Rc<str>> {
        let requested = username::query_param(query, "username");
        let name = match requested.as_deref() {
            Some(name) if username::is_valid(name) => name,
            _ => {
                self.refuse(
                    slot,
                    "invalid_username",
                    "username must be 1-32 letters, digits, '_', '-' or '.'",
                    CLOSE_INVALID_USERNAME,
                    "invalid username",
                    out,
                );
                return None;
            }
        };
        if self.index.contains_key(name) {
            self.refuse(
                slot,
                "username_taken",
                "that username is online already",
                CLOSE_USERNAME_TAKEN,
                "username taken",
                out,
            );
            return None;
        }
        let name: Rc<str> = Rc::from(name);
        self.index.insert(name.clone(), self.members.len());
        self.members.push(Member {
            slot,
            name: name.clone(),
        });
        let online = self.members.len();

        let mut json = std::mem::take(&mut self.scratch);
        json.clear();
        let others = self
            .members
            .iter()
            .filter(|m| m.slot != slot)
            .take(LIST_LIMIT)
            .map(|m| &*m.name);
        encode::roster(&mut json, "welcome", Some(&name), online, others);
        out.send(slot, Chunk::Owned(text_frame(&json)), Class::Reply);
        json.clear();
        if online <= self.limits.presence_limit {
            encode::presence(&mut json, "join", &name, online);
            self.broadcast(&json, Some(slot), out);
        }
        self.scratch = json;
        Some(name)
    }

    /// The connection in `slot` is gone or closing: free its name at once.
    pub fn leave(&mut self, slot: usize, name: &str, out: &mut impl Outbox) {
        let Some(&position) = self.index.get(name) else {
            return;
        };
        if self.members[position].slot != slot {
            return; // the name belongs to someone else now
        }
        self.index.remove(name);
        self.members.swap_remove(position);
        if let Some(moved) = self.members.get(position) {
            if let Some(p) = self.index.get_mut(&moved.name) {
                *p = position;
            }
        }
        let online = self.members.len();
        if online <= self.limits.presence_limit {
            let mut json = std::mem::take(&mut self.scratch);
            json.clear();
            encode::presence(&mut json, "leave", name, online);
            self.broadcast(&json, None, out);
            json.clear();
            self.scratch = json;
        }
    }

    /// A text message from the user `from` in `slot`.
    pub fn handle(
        &mut self,
        slot: usize,
        from: &str,
        text: &str,
        now_ms: u64,
        out: &mut impl Outbox,
    ) {
        let parsed = match protocol::parse(text, self.limits.max_body) {
            Ok(parsed) => parsed,
            Err((error, reference)) => {
                self.reply_error(slot, &error, reference, out);
                return;
            }
        };
        let reference = parsed.reference;
        let mut json = std::mem::take(&mut self.scratch);
        json.clear();
        match parsed.request {
            Request::Public { body } => {
                let id = self.next_id();
                encode::public(&mut json, id, now_ms, from, &body);
                self.stats.public += 1;
                self.broadcast(&json, None, out);
            }
            Request::Private { to, body } => {
                let id = self.next_id();
                self.stats.private += 1;
                let target = self.index.get(&*to).map(|&p| self.members[p].slot);
                let delivery = match target {
                    Some(target) => {
                        encode::private(&mut json, id, now_ms, from, &to, &body);
                        out.send(target, Chunk::Owned(text_frame(&json)), Class::Private)
                    }
                    None => Delivery::Gone,
                };
                json.clear();
                match delivery {
                    Delivery::Queued => {
                        self.stats.deliveries += 1;
                        encode::receipt(&mut json, id, reference, "delivered");
                        out.send(slot, Chunk::Owned(text_frame(&json)), Class::Reply);
                    }
                    Delivery::Disconnected => {
                        let message = format!("{to} was disconnected: too slow to receive");
                        self.send_error(slot, "user_offline", &message, reference, out);
                        if let Some(target) = target {
                            self.leave(target, &to, out);
                        }
                    }
                    Delivery::Gone | Delivery::Shed => {
                        let message = format!("{to} is not online");
                        self.send_error(slot, "user_offline", &message, reference, out);
                    }
                }
            }
            Request::Users => {
                let names = self.members.iter().take(LIST_LIMIT).map(|m| &*m.name);
                encode::roster(&mut json, "users", None, self.members.len(), names);
                out.send(slot, Chunk::Owned(text_frame(&json)), Class::Reply);
            }
        }
        json.clear();
        self.scratch = json;
    }

    fn next_id(&mut self) -> u64 {
        self.last_id += 1;
        self.last_id
    }

    /// Frames `json` once and queues the same bytes to every member but `except`.
    fn broadcast(&mut self, json: &[u8], except: Option<usize>, out: &mut impl Outbox) {
        let frame: Rc<[u8]> = Rc::from(text_frame(json));
        for member in &self.members {
            if Some(member.slot) == except {
                continue;
            }
            match out.send(member.slot, Chunk::Shared(frame.clone()), Class::Public) {
                Delivery::Queued => self.stats.deliveries += 1,
                Delivery::Shed => self.stats.shed += 1,
                Delivery::Gone | Delivery::Disconnected => {}
            }
        }
    }

    fn reply_error(
        &mut self,
        slot: usize,
        error: &RequestError,
        reference: Option<&str>,
        out: &mut impl Outbox,
    ) {
        self.send_error(slot, error.code(), &error.message(), reference, out);
    }

    fn send_error(
        &mut self,
        slot: usize,
        code: &str,
        message: &str,
        reference: Option<&str>,
        out: &mut impl Outbox,
    ) {
        self.stats.errors += 1;
        let mut json = Vec::with_capacity(64 + message.len());
        encode::error(&mut json, code, message, reference);
        out.send(slot, Chunk::Owned(text_frame(&json)), Class::Reply);
    }

    fn refuse(
        &mut self,
        slot: usize,
        code: &str,
        message: &str,
        close_code: u16,
        close_reason: &'static str,
        out: &mut impl Outbox,
    ) {
        self.send_error(slot, code, message, None, out);
        out.close(slot, close_code, close_reason);
    }
}

/// One text frame holding `json`.
pub fn text_frame(json: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(header_len(json.len()) + json.len());
    write_header(&mut frame, Opcode::Text, json.len());
    frame.extend_from_slice(json);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// Records what the router sends; slots listed in `full` are too slow.
    #[derive(Default)]
    struct Recorder {
        sent: Vec<(usize, Value, Class)>,
        closed: Vec<(usize, u16)>,
        full: Vec<usize>,
        gone: Vec<usize>,
        shared_frames: Vec<*const u8>,
    }

    impl Outbox for Recorder {
        fn send(&mut self, slot: usize, frame: Chunk, class: Class) -> Delivery {
            if self.gone.contains(&slot) {
                return Delivery::Gone;
            }
            if self.full.contains(&slot) {
                return match class {
                    Class::Public => Delivery::Shed,
                    _ => Delivery::Disconnected,
                };
            }
            if let Chunk::Shared(rc) = &frame {
                self.shared_frames.push(rc.as_ptr());
            }
            let bytes = frame.as_bytes();
            let start = match bytes[1] {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            let payload = &bytes[start..];
            let value = serde_json::from_slice(payload).expect("valid JSON");
            self.sent.push((slot, value, class));
            Delivery::Queued
        }
        fn close(&mut self, slot: usize, code: u16, _reason: &'static str) {
            self.closed.push((slot, code));
        }
    }

    impl Recorder {
        fn take(&mut self) -> Vec<(usize, Value)> {
            self.sent.drain(..).map(|(s, v, _)| (s, v)).collect()
        }
    }

    fn router(presence_limit: usize) -> Router {
        Router::new(Limits {
            max_body: 100,
            presence_limit,
        })
    }

    #[test]
    fn join_welcomes_and_announces() {
        let mut r = router(10);
        let mut out = Recorder::default();
        assert_eq!(
            r.join(1, "username=alice", &mut out).as_deref(),
            Some("alice")
        );
        assert_eq!(
            out.take(),
            vec![(
                1,
                json!({"type":"welcome","username":"alice","online":1,"users":[]})
            )]
        );
        r.join(2, "username=bob", &mut out);
        assert_eq!(
            out.take(),
            vec![
                (
                    2,
                    json!({"type":"welcome","username":"bob","online":2,"users":["alice"]})
                ),
                (1, json!({"type":"join","username":"bob","online":2})),
            ]
        );
        r.leave(2, "bob", &mut out);
        assert_eq!(
            out.take(),
            vec![(1, json!({"type":"leave","username":"bob","online":1}))]
        );
        assert_eq!(r.online(), 1);
    }

    #[test]
    fn refuses_invalid_and_taken_names() {
        let mut r = router(10);
        let mut out = Recorder::default();
        assert!(r.join(1, "username=a%20b", &mut out).is_none());
        assert!(r.join(2, "other=x", &mut out).is_none());
        r.join(3, "username=alice", &mut out);
        out.take();
        assert!(r.join(4, "username=alice", &mut out).is_none());
        assert_eq!(out.closed, vec![(1, 4001), (2, 4001), (4, 4009)]);
        let codes: Vec<_> = out
            .take()
            .into_iter()
            .map(|(s, v)| (s, v["code"].clone()))
            .collect();
        assert_eq!(codes, vec![(4, json!("username_taken"))]);
        assert_eq!(r.online(), 1);
    }

    #[test]
    fn presence_stops_above_the_limit() {
        let mut r = router(2);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "a"), (2, "b"), (3, "c")] {
            r.join(slot, &format!("username={name}"), &mut out);
        }
        let joins: Vec<_> = out
            .take()
            .into_iter()
            .filter(|(_, v)| v["type"] == "join")
            .collect();
        assert_eq!(
            joins,
            vec![(1, json!({"type":"join","username":"b","online":2}))]
        );
        r.leave(3, "c", &mut out);
        assert_eq!(out.take().len(), 2, "back at the limit: leave is announced");
    }

    #[test]
    fn private_goes_to_the_target_only_with_a_receipt() {
        let mut r = router(10);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "alice"), (2, "bob"), (3, "carol")] {
            r.join(slot, &format!("username={name}"), &mut out);
        }
        out.take();
        r.handle(
            1,
            "alice",
            r#"{"type":"private","from":"carol","to":"bob","body":"hi","ref":"r1"}"#,
            1234,
            &mut out,
        );
        assert_eq!(
            out.take(),
            vec![
                (
                    2,
                    json!({"type":"private","id":1,"ts":1234,"from":"alice","to":"bob","body":"hi"})
                ),
                (
                    1,
                    json!({"type":"receipt","id":1,"ref":"r1","status":"delivered"})
                ),
            ]
        );
        r.handle(
            1,
            "alice",
            r#"{"type":"private","to":"alice","body":"me"}"#,
            1235,
            &mut out,
        );
        let sent = out.take();
        assert_eq!(
            sent[0],
            (
                1,
                json!({"type":"private","id":2,"ts":1235,"from":"alice","to":"alice","body":"me"})
            )
        );
        assert_eq!(sent[1].1["status"], "delivered");
        r.handle(
            1,
            "alice",
            r#"{"type":"private","to":"nobody","body":"x","ref":7}"#,
            1,
            &mut out,
        );
        let sent = out.take();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            (sent[0].1["code"].clone(), sent[0].1["ref"].clone()),
            (json!("user_offline"), json!(7))
        );
    }

    #[test]
    fn public_reaches_everyone_with_one_shared_frame() {
        let mut r = router(10);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "alice"), (2, "bob"), (3, "carol")] {
            r.join(slot, &format!("username={name}"), &mut out);
        }
        out.take();
        out.shared_frames.clear();
        r.handle(
            2,
            "bob",
            r#"{"type":"public","body":"hello all","from":"alice"}"#,
            99,
            &mut out,
        );
        let sent = out.take();
        assert_eq!(sent.len(), 3);
        let expected = json!({"type":"public","id":1,"ts":99,"from":"bob","body":"hello all"});
        assert!(sent.iter().all(|(_, v)| *v == expected));
        let mut slots: Vec<_> = sent.iter().map(|(s, _)| *s).collect();
        slots.sort();
        assert_eq!(slots, vec![1, 2, 3]);
        assert_eq!(out.shared_frames.len(), 3);
        assert!(
            out.shared_frames.windows(2).all(|w| w[0] == w[1]),
            "one allocation for all"
        );
    }

    #[test]
    fn slow_recipients_shed_public_and_drop_out_on_private() {
        let mut r = router(10);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "alice"), (2, "bob"), (3, "carol")] {
            r.join(slot, &format!("username={name}"), &mut out);
        }
        out.take();
        out.full.push(2);
        r.handle(1, "alice", r#"{"type":"public","body":"x"}"#, 1, &mut out);
        assert_eq!(out.take().len(), 2);
        assert_eq!(r.stats.shed, 1);
        r.handle(
            1,
            "alice",
            r#"{"type":"private","to":"bob","body":"x"}"#,
            1,
            &mut out,
        );
        let sent = out.take();
        assert_eq!(sent[0], (1, sent[0].1.clone()));
        assert_eq!(sent[0].1["code"], "user_offline");
        let leave = json!({"type":"leave","username":"bob","online":2});
        assert_eq!(&sent[1..], &[(1, leave.clone()), (3, leave)]);
        assert_eq!(r.online(), 2);
    }

    #[test]
    fn users_and_errors_answer_the_requester() {
        let mut r = router(10);
        let mut out = Recorder::default();
        r.join(1, "username=alice", &mut out);
        r.join(2, "username=bob", &mut out);
        out.take();
        r.handle(2, "bob", r#"{"type":"users","ref":3}"#, 1, &mut out);
        assert_eq!(
            out.take(),
            vec![(
                2,
                json!({"type":"users","online":2,"users":["alice","bob"]})
            )]
        );
        for (text, code) in [
            ("{", "invalid_json"),
            (r#"{"type":"dance"}"#, "unknown_type"),
            (r#"{"type":"private","body":"x"}"#, "missing_field"),
            (
                &format!(r#"{{"type":"public","body":"{}"}}"#, "x".repeat(101)),
                "body_too_long",
            ),
        ] {
            r.handle(2, "bob", text, 1, &mut out);
            let sent = out.take();
            assert_eq!(sent.len(), 1, "{text}");
            assert_eq!((sent[0].0, sent[0].1["code"].as_str()), (2, Some(code)));
        }
    }

    #[test]
    fn leave_is_idempotent_and_keeps_the_index_consistent() {
        let mut r = router(10);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            r.join(slot, &format!("username={name}"), &mut out);
        }
        r.leave(1, "a", &mut out);
        r.leave(1, "a", &mut out);
        r.leave(9, "b", &mut out); // wrong slot: not b's connection
        assert_eq!(r.online(), 3);
        out.take();
        r.handle(
            2,
            "b",
            r#"{"type":"private","to":"d","body":"x"}"#,
            1,
            &mut out,
        );
        assert_eq!(out.take()[0].0, 4);
        assert!(r.join(5, "username=a", &mut out).is_some());
    }
}
