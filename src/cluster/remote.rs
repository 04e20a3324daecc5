//! What a node knows of the others, sans-IO: which names are online on which
//! node (kept from the join, leave and roster messages on the cluster
//! channel), when each node was last heard, the messages this node owes the
//! cluster this turn, and the private messages sent to another node whose
//! receipt has not come back. The router owns one of these under
//! `--cluster`; the shell in [`super::Cluster`] carries its messages over Redis.
//!
//! Between nodes a message is `NODE KIND REST`: the sender's id (so a node
//! skips its own echo on the shared channel), a word, and the rest as bytes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use super::catchup::Catchup;
use crate::chat::protocol::encode;

/// Private messages awaiting their receipt from another node, at most.
pub const MAX_PENDING: usize = 10_000;
/// Bytes of messages waiting to go to Redis, at most; beyond, the node sheds
/// (publics) or refuses (privates, joins) and counts it.
pub const MAX_OUTGOING_BYTES: usize = 8 * 1024 * 1024;

/// The largest message between nodes, well inside what a node's RESP
/// decoder takes (`resp::MAX_BULK`): a bigger public or private is refused
/// with `cluster_unavailable` rather than sent to break every subscriber.
pub const MAX_PAYLOAD: usize = 1024 * 1024;
/// Names per `roster` message are sent in pieces of about this many bytes.
const ROSTER_PIECE: usize = 64 * 1024;

/// Message ids a node takes from the cluster's counter at a time.
pub const ID_BLOCK: u64 = 1 << 20;

/// Where a message between nodes goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// The cluster channel: every node.
    All,
    /// One node's channel.
    Node(Rc<str>),
}

/// Work for the shell: a message to publish, a name lease to give back, or
/// a command for the offline store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    Publish(To, Vec<u8>),
    /// Delete the name's lease if this node still holds it.
    Release(Rc<str>),
    Store(StoreOp),
}

/// What the router asks of the offline store in Redis
/// ([`super::store`]); the shell encodes it and hands the reply back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    /// Store (and, if its recipient is online somewhere, publish) a private
    /// message; the reply is matched by the message's tag. `online`: this
    /// node sees the recipient online (so it is a user, even if a Redis that
    /// lost its data no longer remembers the name).
    /// `payload` is `carried` as JSON, what the store publishes (`spriv`).
    Send {
        carried: Carried,
        online: bool,
        payload: String,
    },
    /// What `name` holds above `after` (with `ack`, dropping what is at or
    /// below it first): more of a joined user's outbox.
    Fetch {
        name: Rc<str>,
        after: u64,
        ack: bool,
        /// Given back with the answer (see `catchup`).
        generation: u64,
    },
    /// `name` has the messages numbered `from..=to`.
    Ack { name: Rc<str>, from: u64, to: u64 },
    /// `name` connected (checked for `unknown_user`).
    Remember(Rc<str>),
    /// Remove what is past its time to live (and tell its senders).
    Expire,
}

/// What became of a message, told to its sender's node when the sender is
/// not waiting for a receipt (a held message read later, or expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Delivered,
    Expired,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Delivered => "delivered",
            Status::Expired => "expired",
        }
    }
}

/// A [`Status`] for a sender on another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// The sender, to be told.
    pub to: String,
    pub id: u64,
    pub status: Status,
}

/// A private message as it crosses to the recipient's node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Carried {
    pub tag: u64,
    pub id: u64,
    pub ts: u64,
    pub from: String,
    pub to: String,
    pub body: String,
}

/// What the recipient's node did with a [`Carried`] message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A live connection of the recipient accepted it.
    Delivered,
    /// The recipient is not (or no longer) on that node: the sender's node
    /// holds it (with the store in Redis: it stays held there).
    Absent,
    /// The recipient reads slower than it is sent to: refused, and (with
    /// the store in Redis) taken back out of its outbox.
    Busy,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Absent => "absent",
            Outcome::Busy => "busy",
        }
    }
}

/// A message from another node, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A node (re)started or reconnected: it wants everyone's roster.
    Hello,
    Beat,
    /// All names online on the sender, replacing what was known (the last
    /// piece of a roster).
    Roster(Vec<Rc<str>>),
    /// A piece of a roster, more to come.
    Part(Vec<Rc<str>>),
    Join(Rc<str>),
    Leave(Rc<str>),
    /// A public event, encoded by the sender's node.
    Public(Vec<u8>),
    /// A private message stored in Redis under `seq` for a user here
    /// (published by the store's `SEND` script, in the sender node's name).
    Stored(u64, Carried),
    Receipt(u64, Outcome),
    /// What became of a message this node's user sent earlier.
    Note(Note),
    /// Another node took this (authenticated) user over: close ours quietly.
    Kick(Rc<str>),
}

/// Splits `NODE KIND REST`; `None` for anything malformed.
pub fn decode(payload: &[u8]) -> Option<(&str, Inbound)> {
    let mut parts = payload.splitn(3, |&b| b == b' ');
    let node = std::str::from_utf8(parts.next()?).ok()?;
    let kind = parts.next()?;
    let rest = parts.next().unwrap_or_default();
    let name = || -> Option<Rc<str>> {
        let s = std::str::from_utf8(rest).ok()?;
        crate::chat::username::is_valid(s).then(|| Rc::from(s))
    };
    let inbound = match kind {
        b"hello" => Inbound::Hello,
        b"beat" => Inbound::Beat,
        b"roster" | b"part" => {
            let s = std::str::from_utf8(rest).ok()?;
            let names = s
                .split('\n')
                .filter(|n| crate::chat::username::is_valid(n))
                .map(Rc::from)
                .collect();
            match kind {
                b"roster" => Inbound::Roster(names),
                _ => Inbound::Part(names),
            }
        }
        b"join" => Inbound::Join(name()?),
        b"leave" => Inbound::Leave(name()?),
        b"kick" => Inbound::Kick(name()?),
        b"pub" => Inbound::Public(rest.to_vec()),
        b"spriv" => {
            // `SEQ TAG JSON`: the tag is in the JSON too.
            let mut parts = rest.splitn(3, |&b| b == b' ');
            let seq = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
            let _tag = parts.next()?;
            let carried: Carried = serde_json::from_slice(parts.next()?).ok()?;
            crate::chat::username::is_valid(&carried.to).then_some(())?;
            Inbound::Stored(seq, carried)
        }
        b"note" => Inbound::Note(serde_json::from_slice(rest).ok()?),
        b"rcpt" => {
            let s = std::str::from_utf8(rest).ok()?;
            let (tag, word) = s.split_once(' ')?;
            let outcome = match word {
                "delivered" => Outcome::Delivered,
                "absent" => Outcome::Absent,
                "busy" => Outcome::Busy,
                _ => return None,
            };
            Inbound::Receipt(tag.parse().ok()?, outcome)
        }
        _ => return None,
    };
    Some((node, inbound))
}

/// A private message handed to another node, until its receipt.
#[derive(Debug, Clone)]
pub struct Pending {
    pub carried: Carried,
    pub reference: Option<String>,
    /// Wall-clock milliseconds after which the sender is told `cluster_unavailable`.
    pub deadline_ms: u64,
    /// Redis has stored it (the store's `SEND` answered): with no receipt
    /// in time, it is `queued` rather than perhaps lost.
    pub stored: bool,
}

/// Counters for `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RemoteStats {
    pub messages_out: u64,
    pub messages_in: u64,
    /// Publics and privates not sent because Redis was unreachable or the
    /// queue to it full.
    pub unavailable: u64,
    /// Privates whose receipt never came.
    pub receipts_lost: u64,
}

#[derive(Debug, Default)]
struct NodeSeen {
    last_ms: u64,
    names: HashSet<Rc<str>>,
    /// The pieces of a roster being received.
    parts: Vec<Rc<str>>,
}

#[derive(Debug)]
pub struct Remote {
    node: Rc<str>,
    /// Name to the node it is online on.
    directory: HashMap<Rc<str>, Rc<str>>,
    nodes: HashMap<Rc<str>, NodeSeen>,
    /// The remote names encoded as a list (see `encode::name_list_push`),
    /// rebuilt when the directory changed.
    listed: Option<(usize, Vec<u8>)>,
    outgoing: Vec<Outgoing>,
    outgoing_bytes: usize,
    pending: HashMap<u64, Pending>,
    /// Message id to tag, for what is pending: a message its recipient read
    /// from its outbox on another node is answered by id (`note`).
    pending_ids: HashMap<u64, u64>,
    /// Tags in the order sent, for the timeout.
    pending_order: VecDeque<u64>,
    next_tag: u64,
    /// Whether the link to Redis is up: set by the shell.
    pub up: bool,
    /// How long a receipt may take.
    pub receipt_timeout_ms: u64,
    /// Message ids granted by the cluster's counter, blocks of `next..=end`. Ids are
    /// unique across nodes (clients de-duplicate by id) and still grow.
    ids: VecDeque<(u64, u64)>,
    /// Per local user: what its outbox fetch has given, and the live
    /// messages kept until it answers (with the sender's node).
    pub catchup: Catchup<(Rc<str>, Carried)>,
    /// Cumulative acknowledgements to send at the end of the turn, by name.
    acks_due: HashMap<Rc<str>, u64>,
    /// The last acknowledgement sent, by local name.
    acked: HashMap<Rc<str>, u64>,
    pub stats: RemoteStats,
}

impl Remote {
    pub fn new(node: &str) -> Remote {
        Remote {
            node: Rc::from(node),
            directory: HashMap::new(),
            nodes: HashMap::new(),
            listed: None,
            outgoing: Vec::new(),
            outgoing_bytes: 0,
            pending: HashMap::new(),
            pending_ids: HashMap::new(),
            pending_order: VecDeque::new(),
            next_tag: 1,
            up: false,
            receipt_timeout_ms: 5_000,
            ids: VecDeque::new(),
            catchup: Catchup::default(),
            acks_due: HashMap::new(),
            acked: HashMap::new(),
            stats: RemoteStats::default(),
        }
    }

    /// The next id of the granted blocks, if one is left.
    pub fn take_id(&mut self) -> Option<u64> {
        while let Some((next, end)) = self.ids.front_mut() {
            if *next <= *end {
                let id = *next;
                *next += 1;
                return Some(id);
            }
            self.ids.pop_front();
        }
        None
    }

    /// Ids left in the granted blocks.
    pub fn ids_left(&self) -> u64 {
        self.ids
            .iter()
            .map(|(next, end)| (end + 1).saturating_sub(*next))
            .sum()
    }

    /// The counter's answer: the block ending at `end` is ours, used after
    /// what is left of the current one.
    pub fn grant_ids(&mut self, end: u64) {
        self.ids.push_back((end.saturating_sub(ID_BLOCK - 1), end));
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Names online on other nodes.
    pub fn online(&self) -> usize {
        self.directory.len()
    }

    /// The node `name` is online on, if another.
    pub fn node_of(&self, name: &str) -> Option<&Rc<str>> {
        self.directory.get(name)
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Other nodes heard from.
    pub fn peers(&self) -> usize {
        self.nodes.len()
    }

    /// The remote names, at most `limit` of them, encoded for a `welcome`
    /// or `users` list. Kept until the directory or the limit changes (the
    /// limit is what the local names leave of the list's room).
    pub fn listed(&mut self, limit: usize) -> &[u8] {
        if self
            .listed
            .as_ref()
            .is_none_or(|(built_for, _)| *built_for != limit)
        {
            let mut list = Vec::new();
            for name in self.directory.keys().take(limit) {
                encode::name_list_push(&mut list, name);
            }
            self.listed = Some((limit, list));
        }
        self.listed.as_ref().map_or(&[], |(_, list)| list)
    }

    pub fn has_outgoing(&self) -> bool {
        !self.outgoing.is_empty() || !self.acks_due.is_empty()
    }

    pub fn take_outgoing(&mut self) -> Vec<Outgoing> {
        self.outgoing_bytes = 0;
        for (name, seq) in self.acks_due.drain() {
            self.acked.insert(name.clone(), seq);
            self.outgoing.push(Outgoing::Store(StoreOp::Ack {
                name,
                from: 0,
                to: seq,
            }));
        }
        std::mem::take(&mut self.outgoing)
    }

    /// A reliable client acknowledged everything up to `seq`. `ack` costs a
    /// client nothing against its rate, so it must cost Redis little: one
    /// removal per name per turn at most, and none for a number at or below
    /// one already sent.
    pub fn ack_through(&mut self, name: &Rc<str>, seq: u64) {
        if self.acked.get(name).is_some_and(|&sent| seq <= sent) {
            return;
        }
        let due = self.acks_due.entry(name.clone()).or_insert(0);
        *due = (*due).max(seq);
    }

    /// `name` left this node: its acknowledgements are forgotten.
    pub fn forget_acks(&mut self, name: &str) {
        self.acked.remove(name);
    }

    /// Whether a message of `len` bytes may go to Redis now.
    pub fn can_send(&self, len: usize) -> bool {
        self.up && len <= MAX_PAYLOAD && self.outgoing_bytes + len <= MAX_OUTGOING_BYTES
    }

    fn publish(&mut self, to: To, kind: &str, rest: &[u8]) {
        let mut payload = Vec::with_capacity(self.node.len() + kind.len() + rest.len() + 2);
        payload.extend_from_slice(self.node.as_bytes());
        payload.push(b' ');
        payload.extend_from_slice(kind.as_bytes());
        payload.push(b' ');
        payload.extend_from_slice(rest);
        self.outgoing_bytes += payload.len();
        self.outgoing.push(Outgoing::Publish(to, payload));
    }

    pub fn hello(&mut self) {
        self.publish(To::All, "hello", b"");
    }

    pub fn beat(&mut self) {
        self.publish(To::All, "beat", b"");
    }

    /// Sends this node's names to `to` (all nodes, or one that said hello):
    /// as many `part`s as it takes, then the `roster` that completes them.
    pub fn roster<'a>(&mut self, to: To, names: impl Iterator<Item = &'a str>) {
        let mut rest = Vec::new();
        for name in names {
            if rest.len() + name.len() >= ROSTER_PIECE {
                self.publish(to.clone(), "part", &rest);
                rest.clear();
            }
            if !rest.is_empty() {
                rest.push(b'\n');
            }
            rest.extend_from_slice(name.as_bytes());
        }
        self.publish(to, "roster", &rest);
    }

    /// A piece of `node`'s roster, kept until its last piece.
    pub fn roster_part(&mut self, node: &str, names: Vec<Rc<str>>) {
        if let Some(seen) = self.nodes.get_mut(node) {
            seen.parts.extend(names);
        }
    }

    pub fn announce_join(&mut self, name: &str) {
        self.publish(To::All, "join", name.as_bytes());
    }

    /// `name` is joining this node: whatever was known of it elsewhere (a
    /// session this one replaces) is forgotten.
    pub fn claim(&mut self, name: &str) {
        if let Some(node) = self.directory.remove(name) {
            if let Some(seen) = self.nodes.get_mut(&node) {
                seen.names.remove(name);
            }
            self.listed = None;
        }
    }

    pub fn announce_leave(&mut self, name: &Rc<str>) {
        self.publish(To::All, "leave", name.as_bytes());
        self.outgoing.push(Outgoing::Release(name.clone()));
    }

    /// An authenticated user connected here: its session on `node` ends.
    pub fn kick(&mut self, node: Rc<str>, name: &str) {
        self.publish(To::Node(node), "kick", name.as_bytes());
    }

    /// A public event, already encoded, for every other node.
    pub fn public(&mut self, json: &[u8]) {
        self.stats.messages_out += 1;
        self.publish(To::All, "pub", json);
    }

    /// A private message for the offline store in Redis, which stores it and
    /// publishes it to its recipient's node if there is one; false (nothing
    /// sent) when too many wait for answers already or it is too big.
    pub fn store_private(
        &mut self,
        mut carried: Carried,
        online: bool,
        reference: Option<&str>,
        now_ms: u64,
    ) -> bool {
        if self.pending.len() >= MAX_PENDING {
            return false;
        }
        carried.tag = self.next_tag;
        let payload = serde_json::to_string(&carried).unwrap_or_default();
        // The body goes to Redis twice: stored, and in the JSON published.
        let size = payload.len() + carried.body.len();
        if payload.len() > MAX_PAYLOAD || !self.can_send(size) {
            return false;
        }
        self.next_tag += 1;
        self.stats.messages_out += 1;
        self.outgoing_bytes += size;
        self.pending_order.push_back(carried.tag);
        self.pending_ids.insert(carried.id, carried.tag);
        self.pending.insert(
            carried.tag,
            Pending {
                carried: carried.clone(),
                reference: reference.map(str::to_owned),
                deadline_ms: now_ms + self.receipt_timeout_ms,
                stored: false,
            },
        );
        self.outgoing.push(Outgoing::Store(StoreOp::Send {
            carried,
            online,
            payload,
        }));
        true
    }

    /// The store's answer to [`store_private`](Self::store_private) `tag`:
    /// stored and published, so a receipt comes from the recipient's node.
    pub fn stored(&mut self, tag: u64) {
        if let Some(p) = self.pending.get_mut(&tag) {
            p.stored = true;
        }
    }

    /// A command for the offline store.
    pub fn store(&mut self, op: StoreOp) {
        self.outgoing_bytes += 64;
        self.outgoing.push(Outgoing::Store(op));
    }

    /// Tells `sender`'s node what became of its message `id`.
    pub fn note(&mut self, node: Rc<str>, sender: &str, id: u64, status: Status) {
        let note = Note {
            to: sender.to_owned(),
            id,
            status,
        };
        let rest = serde_json::to_vec(&note).unwrap_or_default();
        self.publish(To::Node(node), "note", &rest);
    }

    pub fn receipt(&mut self, node: Rc<str>, tag: u64, outcome: Outcome) {
        let rest = format!("{tag} {}", outcome.word());
        self.publish(To::Node(node), "rcpt", rest.as_bytes());
    }

    /// The pending message a receipt answers.
    pub fn answered(&mut self, tag: u64) -> Option<Pending> {
        let pending = self.pending.remove(&tag)?;
        self.pending_ids.remove(&pending.carried.id);
        Some(pending)
    }

    /// The pending message of id `id`, answered otherwise than by its tag.
    pub fn answered_by_id(&mut self, id: u64) -> Option<Pending> {
        let tag = self.pending_ids.get(&id).copied()?;
        self.answered(tag)
    }

    /// Pending messages whose receipt is overdue.
    pub fn overdue(&mut self, now_ms: u64) -> Vec<Pending> {
        let mut late = Vec::new();
        while let Some(&tag) = self.pending_order.front() {
            match self.pending.get(&tag) {
                None => {
                    self.pending_order.pop_front();
                }
                Some(p) if p.deadline_ms <= now_ms => {
                    self.pending_order.pop_front();
                    late.extend(self.answered(tag));
                }
                Some(_) => break,
            }
        }
        self.stats.receipts_lost += late.len() as u64;
        late
    }

    /// The earliest receipt deadline.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let tag = self.pending_order.front()?;
        self.pending.get(tag).map(|p| p.deadline_ms)
    }

    /// Marks `node` heard now; false for our own echo.
    pub fn heard(&mut self, node: &str, now_ms: u64) -> bool {
        if node == &*self.node {
            return false;
        }
        match self.nodes.get_mut(node) {
            Some(seen) => seen.last_ms = now_ms,
            None => {
                self.nodes.insert(
                    Rc::from(node),
                    NodeSeen {
                        last_ms: now_ms,
                        ..NodeSeen::default()
                    },
                );
            }
        }
        true
    }

    /// `name` is online on `node`. Returns whether it is new to this node's view.
    pub fn joined(&mut self, node: &str, name: Rc<str>) -> bool {
        let Some(node_key) = self.nodes.get_key_value(node).map(|(k, _)| k.clone()) else {
            return false;
        };
        if let Some(seen) = self.nodes.get_mut(node) {
            seen.names.insert(name.clone());
        }
        let previous = self.directory.insert(name.clone(), node_key.clone());
        if let Some(previous) = &previous {
            if *previous != node_key {
                if let Some(old) = self.nodes.get_mut(previous) {
                    old.names.remove(&name);
                }
            }
        }
        self.listed = None;
        previous.is_none()
    }

    /// `name` left `node`. Returns whether it was listed there.
    pub fn left(&mut self, node: &str, name: &str) -> bool {
        if let Some(seen) = self.nodes.get_mut(node) {
            seen.names.remove(name);
        }
        if self.directory.get(name).is_some_and(|n| **n == *node) {
            self.directory.remove(name);
            self.listed = None;
            return true;
        }
        false
    }

    /// A node's full list: returns the names that joined and those that left.
    pub fn replace_roster(
        &mut self,
        node: &str,
        mut names: Vec<Rc<str>>,
    ) -> (Vec<Rc<str>>, Vec<Rc<str>>) {
        if let Some(seen) = self.nodes.get_mut(node) {
            names.append(&mut seen.parts);
        }
        let before: Vec<Rc<str>> = self
            .nodes
            .get(node)
            .map(|s| s.names.iter().cloned().collect())
            .unwrap_or_default();
        let now: HashSet<Rc<str>> = names.into_iter().collect();
        let mut left = Vec::new();
        for name in before {
            if !now.contains(&name) && self.left(node, &name) {
                left.push(name);
            }
        }
        let mut joined = Vec::new();
        for name in now {
            if self.joined(node, name.clone()) {
                joined.push(name);
            }
        }
        (joined, left)
    }

    /// Nodes not heard from since `before_ms` are taken for dead: their
    /// names are forgotten and returned (each gets a `leave`).
    pub fn forget_silent(&mut self, before_ms: u64) -> Vec<Rc<str>> {
        let dead: Vec<Rc<str>> = self
            .nodes
            .iter()
            .filter(|(_, seen)| seen.last_ms < before_ms)
            .map(|(node, _)| node.clone())
            .collect();
        let mut gone = Vec::new();
        for node in dead {
            if let Some(seen) = self.nodes.remove(&node) {
                for name in seen.names {
                    if self.directory.get(&name).is_some_and(|n| *n == node) {
                        self.directory.remove(&name);
                        gone.push(name);
                    }
                }
            }
        }
        if !gone.is_empty() {
            self.listed = None;
        }
        gone
    }

    /// After the link to Redis came back: nobody can be blamed for the
    /// silence while it was down.
    pub fn forgive_silence(&mut self, now_ms: u64) {
        for seen in self.nodes.values_mut() {
            seen.last_ms = now_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_come_from_granted_blocks_in_order() {
        let mut r = Remote::new("me");
        assert_eq!((r.take_id(), r.ids_left()), (None, 0));
        r.grant_ids(10 * ID_BLOCK);
        assert_eq!(r.take_id(), Some(9 * ID_BLOCK + 1));
        for _ in 0..ID_BLOCK / 2 {
            r.take_id();
        }
        assert!(r.ids_left() < ID_BLOCK / 2);
        r.grant_ids(20 * ID_BLOCK);
        let mut last = 0;
        while let Some(id) = r.take_id() {
            assert!(id > last);
            last = id;
        }
        assert_eq!(last, 20 * ID_BLOCK, "the old block first, then the new one");
    }

    fn payloads(r: &mut Remote) -> Vec<(To, String)> {
        r.take_outgoing()
            .into_iter()
            .filter_map(|o| match o {
                Outgoing::Publish(to, p) => Some((to, String::from_utf8(p).unwrap())),
                Outgoing::Release(_) | Outgoing::Store(_) => None,
            })
            .collect()
    }

    #[test]
    fn messages_round_trip_through_their_wire_form() {
        let mut a = Remote::new("a1");
        a.up = true;
        a.hello();
        a.roster(To::All, ["x", "y"].into_iter());
        a.announce_join("bob");
        a.announce_leave(&Rc::from("bob"));
        a.public(br#"{"type":"message"}"#);
        let carried = Carried {
            tag: 0,
            id: 7,
            ts: 1,
            from: "x".into(),
            to: "bob".into(),
            body: "hi there".into(),
        };
        a.up = true;
        assert!(a.store_private(carried.clone(), false, Some("r"), 100));
        a.receipt(Rc::from("b2"), 9, Outcome::Delivered);
        a.kick(Rc::from("b2"), "bob");
        a.note(Rc::from("b2"), "x", 7, Status::Expired);
        let decoded: Vec<Inbound> = payloads(&mut a)
            .iter()
            .map(|(_, p)| {
                let (node, inbound) = decode(p.as_bytes()).expect(p);
                assert_eq!(node, "a1");
                inbound
            })
            .collect();
        assert_eq!(
            decoded,
            vec![
                Inbound::Hello,
                Inbound::Roster(vec![Rc::from("x"), Rc::from("y")]),
                Inbound::Join(Rc::from("bob")),
                Inbound::Leave(Rc::from("bob")),
                Inbound::Public(br#"{"type":"message"}"#.to_vec()),
                Inbound::Receipt(9, Outcome::Delivered),
                Inbound::Kick(Rc::from("bob")),
                Inbound::Note(Note {
                    to: "x".into(),
                    id: 7,
                    status: Status::Expired
                }),
            ]
        );
        // What the store's `SEND` script publishes: `NODE spriv SEQ TAG JSON`.
        let tagged = Carried { tag: 1, ..carried };
        let json = serde_json::to_string(&tagged).unwrap();
        let spriv = format!("a1 spriv 42 1 {json}");
        assert_eq!(
            decode(spriv.as_bytes()),
            Some(("a1", Inbound::Stored(42, tagged)))
        );
        for bad in ["a1 spriv x 1 {}", "a1 spriv 42 1 {", "a1 spriv 42"] {
            assert_eq!(decode(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn a_big_roster_goes_in_pieces() {
        let mut a = Remote::new("a1");
        let names: Vec<String> = (0..20_000).map(|i| format!("user{i:05}")).collect();
        a.roster(To::All, names.iter().map(String::as_str));
        let mut b = Remote::new("b2");
        b.heard("a1", 0);
        b.joined("a1", Rc::from("user00001"));
        b.joined("a1", Rc::from("gone"));
        let sent = payloads(&mut a);
        assert!(sent.len() > 2);
        for (i, (_, payload)) in sent.iter().enumerate() {
            assert!(payload.len() <= ROSTER_PIECE + 64);
            match decode(payload.as_bytes()) {
                Some((node, Inbound::Part(n))) if i + 1 < sent.len() => b.roster_part(node, n),
                Some((node, Inbound::Roster(n))) if i + 1 == sent.len() => {
                    let (joined, left) = b.replace_roster(node, n);
                    assert_eq!((joined.len(), left), (19_999, vec![Rc::from("gone")]));
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(b.online(), 20_000);
    }

    #[test]
    fn malformed_messages_are_ignored() {
        for bad in [
            &b""[..],
            b"a1",
            b"a1 what",
            b"a1 join bad name",
            b"a1 priv {",
            b"a1 rcpt x delivered",
            b"a1 rcpt 1 maybe",
        ] {
            assert!(decode(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn the_directory_follows_joins_rosters_and_deaths() {
        let mut r = Remote::new("me");
        assert!(!r.heard("me", 1), "own echo");
        assert!(r.heard("n1", 1));
        assert!(r.heard("n2", 1));
        assert!(r.joined("n1", Rc::from("ann")));
        assert!(r.joined("n2", Rc::from("bob")));
        assert_eq!(r.online(), 2);
        let (joined, left) = r.replace_roster("n1", vec![Rc::from("cat")]);
        assert_eq!((joined.len(), left.len()), (1, 1));
        assert_eq!(r.node_of("cat").map(|n| &**n), Some("n1"));
        assert!(r.node_of("ann").is_none());
        r.heard("n1", 100);
        let gone = r.forget_silent(50);
        assert_eq!(gone, vec![Rc::from("bob")]);
        assert_eq!(r.online(), 1);
        assert_eq!(r.listed(10), br#""cat""#);
    }

    #[test]
    fn the_listed_names_follow_the_limit_they_are_asked_for() {
        let mut r = Remote::new("me");
        r.heard("n1", 1);
        for name in ["a", "b", "c"] {
            r.joined("n1", Rc::from(name));
        }
        let count = |list: &[u8]| list.split(|&b| b == b',').filter(|s| !s.is_empty()).count();
        assert_eq!(count(r.listed(10)), 3);
        // Fewer rooms left in the list (more local users): fewer names.
        assert_eq!(count(r.listed(1)), 1);
        assert_eq!(count(r.listed(0)), 0);
        assert_eq!(count(r.listed(2)), 2);
    }

    #[test]
    fn pending_privates_are_bounded_and_time_out() {
        let mut r = Remote::new("me");
        let carried = Carried {
            tag: 0,
            id: 1,
            ts: 0,
            from: "a".into(),
            to: "b".into(),
            body: String::new(),
        };
        r.up = true;
        for _ in 0..MAX_PENDING {
            assert!(r.store_private(carried.clone(), false, None, 0));
        }
        assert!(!r.store_private(carried.clone(), false, None, 0));
        assert!(r.answered(1).is_some());
        assert_eq!(r.overdue(r.receipt_timeout_ms - 1).len(), 0);
        assert_eq!(r.overdue(r.receipt_timeout_ms).len(), MAX_PENDING - 1);
        assert_eq!(r.pending(), 0);
    }
}
