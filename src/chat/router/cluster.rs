//! The router under `--cluster`: users on other nodes count as online, are
//! listed, and are reached through [`Remote`]; messages from other nodes are
//! delivered here as if their senders were local. Without `--cluster` every
//! function here is a no-op behind `self.remote == None`.

use std::rc::Rc;

use super::{encode, held_entry, Class, ConnId, Delivery, Outbox, Router, LIST_LIMIT};
use crate::chat::protocol::PrivateMessage;
use crate::cluster::remote::{Carried, Inbound, Outcome, Remote, To};
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

    /// A private message for a user not on this node: sent to the node it is
    /// on (its receipt comes back later), or refused when that node cannot
    /// be reached. False when the name is online on no other node.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn private_to_cluster(
        &mut self,
        slot: ConnId,
        from: &str,
        to: &str,
        body: &str,
        reference: Option<&str>,
        now_ms: u64,
        out: &mut impl Outbox,
    ) -> bool {
        let Some(node) = self.remote.as_ref().and_then(|r| r.node_of(to)).cloned() else {
            return false;
        };
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
        let sent =
            remote.can_send(body.len() + 128) && remote.private(node, carried, reference, now_ms);
        if sent {
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
        if !remote.heard(node, now_ms) {
            return; // our own echo
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
            Inbound::Private(carried) => {
                remote.stats.messages_in += 1;
                let node = Rc::from(node);
                let outcome = self.deliver_carried(&carried, out);
                if let Some(remote) = &mut self.remote {
                    remote.receipt(node, carried.tag, outcome);
                }
            }
            Inbound::Receipt(tag, outcome) => {
                if let Some(pending) = remote.answered(tag) {
                    let reference = pending.reference.as_deref();
                    self.receipt_from_cluster(&pending.carried, reference, outcome, out);
                }
            }
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

    /// A private message from a user on another node, to one here.
    fn deliver_carried(&mut self, carried: &Carried, out: &mut impl Outbox) -> Outcome {
        let Some(&position) = self.index.get(carried.to.as_str()) else {
            return Outcome::Absent;
        };
        let to = self.members[position].name.clone();
        let reliable = self.members[position].reliable;
        let conn = self.members[position].conn;
        if reliable
            && self
                .outboxes
                .check_room(&to, &carried.from, carried.body.len())
                .is_err()
        {
            return Outcome::Absent;
        }
        let seq = self.outboxes.next_seq();
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
        match out.send(conn, &json, Class::Private) {
            Delivery::Queued => {
                if reliable {
                    let entry = held_entry(
                        seq,
                        carried.id,
                        carried.ts,
                        &carried.from,
                        &carried.body,
                        true,
                    );
                    self.outboxes.hold(&to, entry);
                }
                self.stats.deliveries += 1;
                Outcome::Delivered
            }
            _ => {
                self.outboxes.take_back_seq(seq);
                Outcome::Absent
            }
        }
    }

    /// What the recipient's node did, told to the sender: `delivered`, or
    /// held here as for an offline user (`queued`).
    fn receipt_from_cluster(
        &mut self,
        carried: &Carried,
        reference: Option<&str>,
        outcome: Outcome,
        out: &mut impl Outbox,
    ) {
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
            Outcome::Absent => {
                let (from, to, body) = (&carried.from, &carried.to, &carried.body);
                let seq = self.outboxes.next_seq();
                let entry = held_entry(seq, carried.id, carried.ts, from, body, false);
                match sender {
                    Some(sender) => {
                        if self.may_hold(sender, to, from, body.len(), true, reference, out) {
                            self.hold_offline(sender, to, entry, reference, &mut json, out);
                        } else {
                            self.outboxes.take_back_seq(seq);
                        }
                    }
                    // The sender left meanwhile: the message is held if it
                    // fits, with nobody to promise it to.
                    None if self.storage_available
                        && self.outboxes.check_room(to, from, body.len()).is_ok() =>
                    {
                        self.outboxes.hold(to, entry);
                        self.stats.stored += 1;
                    }
                    None => self.outboxes.take_back_seq(seq),
                }
            }
        }
    }

    /// Receipts that never came: the sender cannot know whether the message
    /// arrived, and is told so.
    pub fn cluster_overdue(&mut self, now_ms: u64, out: &mut impl Outbox) {
        let Some(remote) = &mut self.remote else {
            return;
        };
        for pending in remote.overdue(now_ms) {
            if let Some(&p) = self.index.get(pending.carried.from.as_str()) {
                let sender = self.members[p].conn;
                let message =
                    "the recipient's server did not answer; the message may not have arrived";
                self.send_error(
                    sender,
                    "cluster_unavailable",
                    message,
                    pending.reference.as_deref(),
                    out,
                );
            }
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
