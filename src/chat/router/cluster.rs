//! The router under `--cluster`: users on other nodes count as online, are
//! listed, and are reached through [`Remote`]; publics from other nodes are
//! delivered here as if their senders were local. Every private goes
//! through the offline store in Redis (`StoreOp`s, answered later as
//! events): stored, numbered and published to its recipient's node, which
//! delivers it, fetches a joining user's outbox, and removes what its
//! users have (see docs/CLUSTER.md). Without `--cluster` every function
//! here is a no-op behind `self.remote == None`.

use std::rc::Rc;

use super::{encode, full_store_error, Class, ConnId, Delivery, Outbox, Router, LIST_LIMIT};
use crate::chat::protocol::PrivateMessage;
use crate::chat::username;
use crate::cluster::catchup::{Deliver, Heard};
use crate::cluster::remote::{Carried, Inbound, Outcome, Pending, Remote, Status, StoreOp, To};
use crate::cluster::store::{BadReply, Expired, Fetched, Held, Sent};
use crate::cluster::ToMigrate;
use crate::ws::CloseCode;

impl Router {
    /// Makes this router one node of a cluster.
    pub fn set_remote(&mut self, remote: Remote) {
        self.remote = Some(Box::new(remote));
    }

    pub fn remote(&self) -> Option<&Remote> {
        self.remote.as_deref()
    }

    pub fn remote_mut(&mut self) -> Option<&mut Remote> {
        self.remote.as_deref_mut()
    }

    /// Whether `name` is held by a connection on this node.
    pub fn is_online_here(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Users online here and on every other node.
    pub(super) fn online_everywhere(&self) -> usize {
        self.members.len() + self.remote.as_ref().map_or(0, |r| r.online())
    }

    /// A `welcome` (with `username`) or `users` event: this node's names
    /// first, then the others'.
    pub(super) fn encode_roster(
        &mut self,
        json: &mut Vec<u8>,
        username: Option<&str>,
        online: usize,
    ) {
        let max_body = self.limits.max_body;
        let encode = |json: &mut Vec<u8>, names: &[u8]| match username {
            Some(name) => encode::welcome(json, name, online, names, max_body),
            None => encode::users(json, online, names),
        };
        let local_listed = self.members.len().min(LIST_LIMIT);
        match self.remote.take() {
            Some(mut remote) if remote.online() > 0 && local_listed < LIST_LIMIT => {
                let mut names = self.roster_names().to_vec();
                let more = remote.listed(LIST_LIMIT - local_listed);
                if !names.is_empty() && !more.is_empty() {
                    names.push(b',');
                }
                names.extend_from_slice(more);
                encode(json, &names);
                self.remote = Some(remote);
            }
            remote => {
                self.remote = remote;
                encode(json, self.roster_names());
            }
        }
    }

    /// Hands an encoded public event to the other nodes; false when it
    /// could not go (the sender is told).
    pub(super) fn public_to_cluster(&mut self, json: &[u8]) -> bool {
        let Some(remote) = &mut self.remote else {
            return true;
        };
        if !remote.can_send(json.len()) {
            remote.stats.unavailable += 1;
            return false;
        }
        remote.public(json);
        true
    }

    pub(super) fn cluster_unavailable(
        &mut self,
        slot: ConnId,
        reference: Option<&str>,
        out: &mut impl Outbox,
    ) {
        let message = "the other chat servers cannot be reached; try again later";
        self.send_error(slot, "cluster_unavailable", message, reference, out);
    }

    /// A private message under `--cluster`: every one goes through the
    /// offline store in Redis, which numbers it with the cluster's `seq`,
    /// holds it, and publishes it to the node its recipient is on, if any.
    /// The sender hears back when the store answers (`queued`, or a
    /// refusal) or the recipient's node does (`delivered`). False without a
    /// cluster.
    pub(super) fn private_via_store(
        &mut self,
        slot: ConnId,
        (from, to, body): (&str, &str, &str),
        reference: Option<&str>,
        now_ms: u64,
        out: &mut impl Outbox,
    ) -> bool {
        let online = self.index.contains_key(to);
        let Some(remote) = &self.remote else {
            return false;
        };
        let online = online || remote.node_of(to).is_some();
        // As on a single node: with `--offline-to-unknown`, a name that looks
        // like a user's (of those this node knows) is still never held for.
        if !online
            && self.offline_to_unknown
            && self
                .lookalikes
                .clash(to, &username::lookalike_keys(to), false)
                .is_some()
        {
            let message = "no user has that name (it looks like another user's name)";
            self.send_error(slot, "unknown_user", message, reference, out);
            return true;
        }
        let id = self.next_id();
        let carried = Carried {
            tag: 0,
            id,
            ts: now_ms,
            from: from.to_owned(),
            to: to.to_owned(),
            body: body.to_owned(),
        };
        let Some(remote) = &mut self.remote else {
            return false;
        };
        if remote.store_private(carried, online, reference, now_ms) {
            self.stats.private += 1;
        } else {
            remote.stats.unavailable += 1;
            self.cluster_unavailable(slot, reference, out);
        }
        true
    }

    /// A message from node `node`.
    pub fn on_cluster(&mut self, node: &str, inbound: Inbound, now_ms: u64, out: &mut impl Outbox) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        // Our own echo is skipped, but for a private the store published to
        // us in our own name (its recipient is here too).
        if !remote.heard(node, now_ms) && !matches!(inbound, Inbound::Stored(..)) {
            return;
        }
        match inbound {
            Inbound::Hello => {
                let names: Vec<Rc<str>> = self.members.iter().map(|m| m.name.clone()).collect();
                if let Some(remote) = &mut self.remote {
                    remote.roster(To::Node(Rc::from(node)), names.iter().map(|n| &**n));
                }
            }
            Inbound::Beat => {}
            Inbound::Roster(names) => {
                let (joined, left) = remote.replace_roster(node, names);
                for name in joined {
                    self.remote_presence("join", &name, out);
                }
                for name in left {
                    self.remote_presence("leave", &name, out);
                }
            }
            Inbound::Part(names) => remote.roster_part(node, names),
            Inbound::Join(name) => {
                if remote.joined(node, name.clone()) {
                    self.remote_presence("join", &name, out);
                }
            }
            Inbound::Leave(name) => {
                if remote.left(node, &name) {
                    self.remote_presence("leave", &name, out);
                }
            }
            Inbound::Public(json) => {
                remote.stats.messages_in += 1;
                self.stats.public += 1;
                self.broadcast(&json, None, Class::Public, out);
            }
            Inbound::Stored(seq, carried) => {
                remote.stats.messages_in += 1;
                let to: Rc<str> = Rc::from(carried.to.as_str());
                match remote.catchup.live(&to, seq, (Rc::from(node), carried)) {
                    Heard::Now(seq, (node, carried)) => {
                        let outcome = self.deliver_stored(seq, &carried, out);
                        self.answer_stored(node, carried.tag, outcome, out);
                    }
                    Heard::Kept => {}
                    Heard::Given((node, carried)) => {
                        self.answer_stored(node, carried.tag, Outcome::Delivered, out)
                    }
                    // Held in the outbox: its sender is told `queued` (the
                    // user, left out of a full catch-up, gets it from the
                    // next fetch).
                    Heard::NotHere((node, carried)) | Heard::Full((node, carried)) => {
                        self.answer_stored(node, carried.tag, Outcome::Absent, out)
                    }
                }
            }
            Inbound::Receipt(tag, outcome) => self.on_receipt(tag, outcome, out),
            Inbound::Note(note) => self.sender_told(&note.to, note.id, note.status, out),
            Inbound::Kick(name) => {
                self.kicked(&name, out);
                // The user is now on the node that kicked: its coming `join`
                // is no news to anyone here.
                if let Some(remote) = &mut self.remote {
                    remote.joined(node, name);
                }
            }
        }
    }

    /// A `join` or `leave` of a user on another node, told to this node's users.
    fn remote_presence(&mut self, kind: &str, name: &str, out: &mut impl Outbox) {
        let online = self.online_everywhere();
        if online <= self.limits.presence_limit {
            let mut json = Vec::with_capacity(64);
            encode::presence(&mut json, kind, name, online);
            self.broadcast(&json, None, Class::Presence, out);
        }
    }

    /// A stored private message, numbered `seq`, for a user here: written to
    /// its connection. A simple client's copy leaves the store once written;
    /// a reliable client's stays until it acknowledges it; one refused (the
    /// reader is flooded) is taken back out.
    fn deliver_stored(&mut self, seq: u64, carried: &Carried, out: &mut impl Outbox) -> Outcome {
        let Some(&position) = self.index.get(carried.to.as_str()) else {
            return Outcome::Absent;
        };
        let to = self.members[position].name.clone();
        let reliable = self.members[position].reliable;
        let conn = self.members[position].conn;
        let mut json = Vec::with_capacity(128 + carried.body.len());
        encode::private(
            &mut json,
            &PrivateMessage {
                id: carried.id,
                ts: carried.ts,
                seq,
                from: &carried.from,
                to: &to,
                body: &carried.body,
                body_is_plain: false,
                offline: false,
            },
        );
        let delivery = out.send(conn, &json, Class::Private);
        let Some(remote) = &mut self.remote else {
            return Outcome::Absent;
        };
        let take_out = || StoreOp::Ack {
            name: to.clone(),
            from: seq,
            to: seq,
        };
        match delivery {
            Delivery::Queued => {
                if !reliable {
                    remote.store(take_out());
                }
                self.stats.deliveries += 1;
                Outcome::Delivered
            }
            Delivery::Refused => {
                remote.store(take_out());
                self.stats.refused += 1;
                Outcome::Busy
            }
            // Still held: it comes with the next session's fetch.
            Delivery::Disconnected | Delivery::Gone | Delivery::Shed => Outcome::Absent,
        }
    }

    /// Tells the node of a stored private's sender what became of it.
    fn answer_stored(&mut self, node: Rc<str>, tag: u64, outcome: Outcome, out: &mut impl Outbox) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        if *node == *remote.node() {
            self.on_receipt(tag, outcome, out);
        } else {
            remote.receipt(node, tag, outcome);
        }
    }

    /// The recipient's node answered for a private message sent from here.
    fn on_receipt(&mut self, tag: u64, outcome: Outcome, out: &mut impl Outbox) {
        if let Some(pending) = self.remote.as_mut().and_then(|r| r.answered(tag)) {
            self.on_answer(pending, outcome, out);
        }
    }

    /// What became of a private message sent from here, told to its sender.
    fn on_answer(&mut self, pending: Pending, outcome: Outcome, out: &mut impl Outbox) {
        let reference = pending.reference.as_deref();
        let carried = &pending.carried;
        let sender = self
            .index
            .get(carried.from.as_str())
            .map(|&p| self.members[p].conn);
        let mut json = Vec::with_capacity(64);
        match outcome {
            Outcome::Delivered => {
                self.stats.deliveries += 1;
                if let Some(sender) = sender {
                    encode::receipt(&mut json, carried.id, reference, "delivered");
                    out.send(sender, &json, Class::Reply);
                }
            }
            // It stays in the recipient's outbox in Redis.
            Outcome::Absent => {
                self.stats.stored += 1;
                if let Some(sender) = sender {
                    encode::receipt(&mut json, carried.id, reference, "queued");
                    out.send(sender, &json, Class::Reply);
                }
            }
            Outcome::Busy => {
                self.stats.refused += 1;
                if let Some(sender) = sender {
                    let message = format!(
                        "{} is receiving faster than it reads; try again later",
                        carried.to
                    );
                    self.send_error(sender, "recipient_busy", &message, reference, out);
                }
            }
        }
    }

    /// The store's answer to the private message of `tag`.
    pub fn on_sent(&mut self, tag: u64, sent: Result<Sent, BadReply>, out: &mut impl Outbox) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        if let Ok(Sent::Live { .. }) = sent {
            // Its recipient's node answers.
            remote.stored(tag);
            return;
        }
        let Some(pending) = remote.answered(tag) else {
            return;
        };
        let reference = pending.reference.as_deref();
        let carried = &pending.carried;
        let Some(sender) = self
            .index
            .get(carried.from.as_str())
            .map(|&p| self.members[p].conn)
        else {
            return;
        };
        match sent {
            Ok(Sent::Live { .. }) => {}
            Ok(Sent::Queued(_)) => {
                self.stats.stored += 1;
                let mut json = Vec::with_capacity(64);
                encode::receipt(&mut json, carried.id, reference, "queued");
                out.send(sender, &json, Class::Reply);
            }
            Ok(Sent::Full(full)) => {
                let (code, message) = full_store_error(full, &carried.to);
                self.send_error(sender, code, &message, reference, out);
            }
            Ok(Sent::Unknown) => {
                let message = "no user of that name has ever connected";
                self.send_error(sender, "unknown_user", message, reference, out);
            }
            Err(_) => {
                let message =
                    "the message could not be stored (the offline store failed); try again later";
                self.send_error(sender, "cluster_unavailable", message, reference, out);
            }
        }
    }

    /// A private message the store never got (`surely_not_stored`) or whose
    /// answer was lost with the link: its sender is told which.
    pub fn on_unsent(&mut self, tag: u64, surely_not_stored: bool, out: &mut impl Outbox) {
        let Some(pending) = self.remote.as_mut().and_then(|r| r.answered(tag)) else {
            return;
        };
        let Some(&p) = self.index.get(pending.carried.from.as_str()) else {
            return;
        };
        let sender = self.members[p].conn;
        let reference = pending.reference.as_deref();
        if surely_not_stored {
            let message = "the other chat servers cannot be reached; try again later";
            self.send_error(sender, "cluster_unavailable", message, reference, out);
        } else {
            self.unconfirmed(sender, reference, out);
        }
    }

    fn unconfirmed(&mut self, sender: ConnId, reference: Option<&str>, out: &mut impl Outbox) {
        let message =
            "the offline store did not confirm the message; it may have been stored and delivered";
        self.send_error(sender, "unconfirmed", message, reference, out);
    }

    /// Under `--cluster`, the outbox of a user who joined (its fetch was
    /// asked for with its lease, and answers next) or whose session a new
    /// connection replaced (fetched now from the new connection's resume
    /// point; an answer to a fetch of the old session is ignored). False
    /// without a cluster.
    pub(super) fn cluster_replay(
        &mut self,
        name: &Rc<str>,
        resume: Option<u64>,
        replacing: bool,
        out: &mut impl Outbox,
    ) -> bool {
        if self.remote.is_none() {
            return false;
        }
        if replacing {
            self.end_catchup(name, out);
        }
        let Some(remote) = &mut self.remote else {
            return false;
        };
        remote.store(StoreOp::Remember(name.clone()));
        if !replacing && remote.catchup.fetch_point(name).is_some() {
            return true;
        }
        let after = resume.unwrap_or(0);
        let generation = remote.catchup.begin(name.clone(), after);
        remote.store(StoreOp::Fetch {
            name: name.clone(),
            after,
            ack: resume.is_some(),
            generation,
        });
        true
    }

    /// The cluster granted `name`'s lease: its outbox is fetched before it
    /// joins, and live messages for it are kept until then.
    /// (A name online here already is left alone: the router refuses the
    /// join, or a token's replacement fetches for itself.)
    /// Returns where the fetch starts, whether it acknowledges up to there,
    /// and its generation.
    pub fn cluster_begin_join(&mut self, name: &Rc<str>, query: &str) -> (u64, bool, u64) {
        let resume = super::resume_point(query);
        let after = resume.unwrap_or(0);
        let generation = match (&mut self.remote, self.index.contains_key(&**name)) {
            (Some(remote), false) => remote.catchup.begin(name.clone(), after),
            _ => 0,
        };
        (after, resume.is_some(), generation)
    }

    /// A join that waited for its outbox will not happen (refused, gone, or
    /// Redis lost): what was kept for it stays in the store.
    pub fn cluster_join_abandoned(&mut self, name: &str, out: &mut impl Outbox) {
        if self.index.contains_key(name) {
            return; // joined after all (a replacement)
        }
        self.end_catchup(name, out);
    }

    pub(super) fn end_catchup(&mut self, name: &str, out: &mut impl Outbox) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        remote.forget_acks(name);
        for (node, carried) in remote.catchup.end(name) {
            self.answer_stored(node, carried.tag, Outcome::Absent, out);
        }
    }

    /// The store answered a fetch of `name`'s outbox: the held messages go
    /// to its connection (`"offline":true`, in `seq` order), then the live
    /// ones kept meanwhile. A simple client's leave the store; a reliable
    /// client's stay until acknowledged.
    pub fn on_fetched(
        &mut self,
        name: &Rc<str>,
        generation: u64,
        fetched: Fetched,
        out: &mut impl Outbox,
    ) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        let (deliveries, again) =
            remote
                .catchup
                .fetched(name, generation, fetched.after, fetched.held);
        if let Some(after) = again {
            remote.store(StoreOp::Fetch {
                name: name.clone(),
                after,
                ack: false,
                generation,
            });
        }
        let member = self
            .index
            .get(&**name)
            .map(|&p| (self.members[p].conn, self.members[p].reliable));
        // The last offline message written with none refused before it:
        // what a simple client's copies may be removed up to.
        let (mut written_through, mut refused) = (0, false);
        let mut json = Vec::with_capacity(256);
        for delivery in deliveries {
            match delivery {
                Deliver::Offline(held) => {
                    let Some((conn, _)) = member else { continue };
                    json.clear();
                    encode::private(
                        &mut json,
                        &PrivateMessage {
                            id: held.id,
                            ts: held.ts,
                            seq: held.seq,
                            from: &held.from,
                            to: name,
                            body: &held.body,
                            body_is_plain: false,
                            offline: true,
                        },
                    );
                    // Only what the connection took leaves the store.
                    if out.send(conn, &json, Class::Reply) != Delivery::Queued {
                        refused = true;
                        continue;
                    }
                    self.stats.deliveries += 1;
                    if !refused {
                        written_through = held.seq;
                    }
                    self.tell_sender(&held.from, held.id, Status::Delivered, out);
                }
                Deliver::Live(seq, (node, carried)) => {
                    let outcome = self.deliver_stored(seq, &carried, out);
                    self.answer_stored(node, carried.tag, outcome, out);
                }
                Deliver::Duplicate((node, carried)) => {
                    self.answer_stored(node, carried.tag, Outcome::Delivered, out);
                }
            }
        }
        if let (Some((_, false)), Some(remote)) = (member, &mut self.remote) {
            if written_through > 0 {
                remote.store(StoreOp::Ack {
                    name: name.clone(),
                    from: 0,
                    to: written_through,
                });
            }
        }
    }

    /// Tells the sender of message `id`, wherever it is online, what became of it.
    fn tell_sender(&mut self, sender: &str, id: u64, status: Status, out: &mut impl Outbox) {
        if self.index.contains_key(sender) {
            self.sender_told(sender, id, status, out);
        } else if let Some(remote) = &mut self.remote {
            if let Some(node) = remote.node_of(sender).cloned() {
                remote.note(node, sender, id, status);
            }
        }
    }

    /// A sender here hears what became of its message `id`. One still waiting
    /// for its recipient's node (a node that died with it, say) while the
    /// recipient read it from its outbox elsewhere is answered now, with its
    /// `ref`, and not later with `queued`.
    fn sender_told(&mut self, sender: &str, id: u64, status: Status, out: &mut impl Outbox) {
        let pending = match status {
            Status::Delivered => self.remote.as_mut().and_then(|r| r.answered_by_id(id)),
            Status::Expired => None,
        };
        match pending {
            Some(pending) => self.on_answer(pending, Outcome::Delivered, out),
            None => self.notify_sender(sender, id, status.word(), out),
        }
    }

    /// The store removed these held messages past their time to live.
    pub fn on_store_expired(&mut self, expired: Vec<Expired>, out: &mut impl Outbox) {
        for e in expired {
            self.stats.expired += 1;
            self.tell_sender(&e.from, e.id, Status::Expired, out);
        }
    }

    /// The link to Redis is back: every local user's live messages are held
    /// back until its outbox is fetched again after what it was given, once
    /// its lease is ours again ([`cluster_fetch_again`](Self::cluster_fetch_again)):
    /// a restarted Redis lost the leases and held what was sent meanwhile, and
    /// what was published while this node was not subscribed never came.
    /// The local names are remembered again too. Called before the leases
    /// are asked for, so that nothing published after them is delivered
    /// ahead of what the fetch finds.
    pub fn cluster_hold_all(&mut self) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        for member in &self.members {
            remote.store(StoreOp::Remember(member.name.clone()));
            remote.catchup.again(&member.name);
        }
    }

    /// `name`'s lease was found missing (and is being taken again): what is
    /// published to it is held back until the fetch after the lease.
    pub fn cluster_hold(&mut self, name: &str) {
        if let Some(remote) = &mut self.remote {
            remote.catchup.again(name);
        }
    }

    /// `name`'s lease is ours again: its outbox is fetched after what it
    /// was given, and what was held back goes after that.
    pub fn cluster_fetch_again(&mut self, name: &Rc<str>) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        if !self.index.contains_key(&**name) {
            return;
        }
        let point = remote
            .catchup
            .fetch_point(name)
            .or_else(|| remote.catchup.again(name));
        if let Some((after, generation)) = point {
            remote.store(StoreOp::Fetch {
                name: name.clone(),
                after,
                ack: false,
                generation,
            });
        }
    }

    /// A reliable client acknowledged everything up to `seq`.
    pub(super) fn cluster_ack(&mut self, name: &Rc<str>, seq: u64) -> bool {
        let Some(remote) = &mut self.remote else {
            return false;
        };
        remote.ack_through(name, seq);
        true
    }

    /// Answers that never came: a message the store holds is `queued` (it
    /// waits in the recipient's outbox, or was delivered); one it may not
    /// hold is `cluster_unavailable`.
    pub fn cluster_overdue(&mut self, now_ms: u64, out: &mut impl Outbox) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        for pending in remote.overdue(now_ms) {
            let Some(&p) = self.index.get(pending.carried.from.as_str()) else {
                continue;
            };
            let sender = self.members[p].conn;
            let reference = pending.reference.as_deref();
            if pending.stored {
                self.stats.stored += 1;
                let mut json = Vec::with_capacity(64);
                encode::receipt(&mut json, pending.carried.id, reference, "queued");
                out.send(sender, &json, Class::Reply);
            } else {
                self.unconfirmed(sender, reference, out);
            }
        }
    }

    /// What the local log holds, to upload to the store (a single node
    /// that grows into a cluster keeps its users' mail).
    pub fn held_to_migrate(&self) -> Vec<ToMigrate> {
        self.outboxes
            .all_held()
            .map(|(to, e)| ToMigrate {
                to: to.clone(),
                held: Held::from(e),
                expires_ms: self.outboxes.expiry_of(e.ts),
            })
            .collect()
    }

    /// The names the local log remembers as users.
    pub fn known_to_migrate(&self) -> Vec<Rc<str>> {
        self.outboxes.known_names().map(Rc::from).collect()
    }

    /// The store holds these local-log messages now: the local log lets
    /// them go (so a later start has nothing left to upload).
    pub fn migrated(&mut self, done: Vec<(Rc<str>, u64)>) {
        let mut last: std::collections::HashMap<Rc<str>, u64> = Default::default();
        for (to, seq) in done {
            let at = last.entry(to).or_default();
            *at = (*at).max(seq);
        }
        for (to, seq) in last {
            self.outboxes.ack(&to, seq);
        }
    }

    /// Nodes silent past the lease are gone: their users leave.
    pub fn cluster_forget_silent(&mut self, before_ms: u64, out: &mut impl Outbox) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        for name in remote.forget_silent(before_ms) {
            self.remote_presence("leave", &name, out);
        }
    }

    /// This node's names, for re-registering leases and for rosters.
    pub fn local_names(&self) -> impl Iterator<Item = &Rc<str>> {
        self.members.iter().map(|m| &m.name)
    }

    /// The user's session moved to another node (or lost its lease): its
    /// connection here closes with 4010 and the others see no `leave`.
    pub fn kicked(&mut self, name: &str, out: &mut impl Outbox) {
        let Some(&position) = self.index.get(name) else {
            return;
        };
        let conn = self.members[position].conn;
        // Forgotten before the close, so `leave` finds nothing to announce.
        self.forget_member(conn);
        self.end_catchup(name, out);
        out.close(conn, CloseCode::Replaced, "replaced by a newer session");
    }

    /// A name refused by the cluster (online on another node).
    pub fn refuse_taken(&mut self, slot: ConnId, out: &mut impl Outbox) {
        self.refuse(
            slot,
            "username_taken",
            "that username is online already",
            CloseCode::UsernameTaken,
            "username taken",
            out,
        );
    }
}
