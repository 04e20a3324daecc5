//! Who gets what: membership (which connection holds which name: the router
//! is the only place that knows), presence, routing of public and private
//! messages, and the outboxes that hold private messages for users who are
//! offline (or have not acknowledged them yet). No I/O and no WebSocket
//! framing: the router emits application-level deliveries (a JSON text to
//! one connection, to everyone, or held for a user) through an [`Outbox`],
//! which the event loop implements over its connections (and tests over a
//! Vec); outbox changes become log records that the loop writes to disk.

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;

use super::lookalike::{Clash, Lookalikes};
use super::protocol::{self, encode, is_plain, PrivateMessage, Request, RequestError};
use super::username;
use crate::auth::Auth;
use crate::cluster::remote::Remote;
use crate::limits::rate::{Charge, MessageLimiter, MessagePolicy, Rate};
use crate::store::mailbox::{Mail, Mailbox, Refusal};
use crate::store::{self, Entry, Full, Outboxes};
use crate::ws::CloseCode;

mod cluster;

/// At most this many names are listed in `welcome` and `users`.
pub const LIST_LIMIT: usize = 1000;

/// How a frame may be treated by a recipient that cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Public messages: shed above the soft mark, reported by `gap`.
    Public,
    /// `join` and `leave`: shed like public messages, and never urgent, so
    /// the server may hold them briefly to send a burst of arrivals to each
    /// user in one write.
    Presence,
    /// Never shed (see `delivery::policy`).
    Private,
    /// An answer to the connection's own request (welcome, receipt, error).
    Reply,
}

/// A connection as the router knows it: the event loop's slot. The loop
/// tells the router when a connection stops being open (`leave`) in the same
/// turn, before the slot can be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// What became of a message handed to the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// Dropped for a slow recipient; it will be told with a `gap`.
    Shed,
    /// The recipient is gone or closing.
    Gone,
    /// The recipient was too slow for a private message and was disconnected.
    Disconnected,
    /// The recipient is draining but flooded: not queued, the sender is told.
    Refused,
}

/// How many recipients of a broadcast got it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fanout {
    pub queued: u64,
    pub shed: u64,
}

/// Where the router's messages go. Each `json` is one text message.
pub trait Outbox {
    /// One message to one connection.
    fn send(&mut self, to: ConnId, json: &[u8], class: Class) -> Delivery;
    /// A private message that the user on `from` sends to `to`: a flooded
    /// recipient may hold back its sender.
    fn send_private(&mut self, from: ConnId, to: ConnId, json: &[u8]) -> Delivery;
    /// The same message to every connection in `to`, framed once.
    fn broadcast(&mut self, json: &[u8], class: Class, to: impl Iterator<Item = ConnId>) -> Fanout;
    /// A reply sent once this turn's log records are on disk (a `queued`
    /// receipt promises the message survives a crash).
    fn send_when_durable(&mut self, to: ConnId, json: &[u8]);
    /// The connection's token was renewed: it may stay open until
    /// `until_unix_secs` (the new `exp` plus the leeway).
    fn renew(&mut self, conn: ConnId, until_unix_secs: u64);
    /// Closes a connection with a WebSocket close code.
    fn close(&mut self, conn: ConnId, code: CloseCode, reason: &'static str);
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
    pub stored: u64,
    pub expired: u64,
    /// Private messages refused because the recipient was flooded.
    pub refused: u64,
    /// Users not remembered because `--max-known-users` were.
    pub known_full: u64,
    /// Messages refused with `rate_limited`.
    pub rate_limited: u64,
    /// Connections closed for going on past the rate (1008).
    pub rate_limit_closes: u64,
    /// Private messages for offline users refused because the log could
    /// not be written.
    pub storage_refused: u64,
}

#[derive(Debug)]
struct Member {
    conn: ConnId,
    name: Rc<str>,
    /// Opted in with `resume`: its messages stay held until acknowledged.
    reliable: bool,
}

/// A message held this turn for an offline user, whose sender is promised
/// `queued` once the turn's log records are on disk.
#[derive(Debug)]
struct AwaitingDisk {
    sender: ConnId,
    user: Rc<str>,
    seq: u64,
    reference: Option<Box<str>>,
}

/// `positions` entry of a connection that holds no name.
const NOT_A_MEMBER: u32 = u32::MAX;

#[derive(Debug)]
pub struct Router {
    limits: Limits,
    /// Username to position in `members`.
    index: HashMap<Rc<str>, usize>,
    /// Everyone online, densely, for fan-out.
    members: Vec<Member>,
    /// Connection (slot) to position in `members`, or `NOT_A_MEMBER`: slots
    /// are dense, so a vector is smaller and faster than a map.
    positions: Vec<u32>,
    outboxes: Outboxes,
    /// Whose look each online and known name has (checked at join).
    lookalikes: Lookalikes,
    /// The names of `members[..roster_len]` (at most `LIST_LIMIT`), encoded
    /// once: every welcome lists up to 1000 names, and re-encoding them per
    /// handshake would cost more than the handshake.
    roster: Vec<u8>,
    /// Members covered by `roster`; `None` after a change that reordered them.
    roster_len: Option<usize>,
    /// The last private message's target and its position: messages in one
    /// read mostly come from one sender to one user, and comparing a name
    /// costs less than hashing it. Cleared when a departure moves members.
    last_target: Option<(Rc<str>, usize)>,
    last_id: u64,
    scratch: Vec<u8>,
    /// Verifies token renewals; `Auth::None` refuses them.
    auth: Auth,
    /// Hold private messages for names that never connected, too.
    offline_to_unknown: bool,
    /// Each connection's message allowance (`--rate-limit`).
    limiter: MessageLimiter,
    /// The log can be written: offline messages may be promised `queued`.
    storage_available: bool,
    /// This turn's `queued` promises, taken back if the log write fails.
    awaiting_disk: Vec<AwaitingDisk>,
    /// Under `--cluster`: the other nodes' users, and what goes to them.
    remote: Option<Box<Remote>>,
    pub stats: RouterStats,
}

impl Router {
    pub fn new(limits: Limits, outboxes: Outboxes) -> Router {
        Router {
            limits,
            index: HashMap::new(),
            members: Vec::new(),
            positions: Vec::new(),
            roster: Vec::new(),
            roster_len: Some(0),
            last_target: None,
            last_id: outboxes.max_id,
            lookalikes: Lookalikes::new(outboxes.known_names()),
            outboxes,
            scratch: Vec::with_capacity(256),
            auth: Auth::None,
            offline_to_unknown: false,
            limiter: MessageLimiter::new(MessagePolicy::new(Rate::UNLIMITED)),
            storage_available: true,
            awaiting_disk: Vec::new(),
            remote: None,
            stats: RouterStats::default(),
        }
    }

    /// Connections are authenticated (`--auth jwt`): a user's newer
    /// connection replaces its older one, and tokens may be renewed.
    pub fn set_auth(&mut self, auth: Auth) {
        self.auth = auth;
    }

    /// Private messages to names that never connected are held too
    /// (`--offline-to-unknown`, only without authentication), instead of
    /// refused with `unknown_user`.
    pub fn set_offline_to_unknown(&mut self, hold: bool) {
        self.offline_to_unknown = hold;
    }

    /// How fast each connection may send (unlimited until set).
    pub fn set_message_policy(&mut self, policy: MessagePolicy) {
        self.limiter = MessageLimiter::new(policy);
    }

    /// Names remembered as users.
    pub fn known_users(&self) -> usize {
        self.outboxes.known_users()
    }

    /// Message ids and sequence numbers must grow across restarts (clients
    /// de-duplicate by id and resume by seq): both start above what the log
    /// holds and above `now_ms * 1000`. The clock covers what the log could
    /// not: ids are not logged unless held, and a crash while the disk was
    /// full leaves the last numbers unrecorded. It holds unless the last run
    /// gave out more than 1000 a millisecond on average. (About 2^51 today,
    /// below 2^53, the largest integer a JavaScript number holds exactly,
    /// until the 23rd century.)
    pub fn start_numbers_after(&mut self, now_ms: u64) {
        let base = now_ms.saturating_mul(1000);
        self.last_id = self.last_id.max(base);
        self.outboxes.number_from(base);
    }

    pub fn online(&self) -> usize {
        self.members.len()
    }

    /// Messages and bytes held in outboxes.
    pub fn held(&self) -> (usize, usize) {
        self.outboxes.held()
    }

    /// Names with messages held.
    pub fn held_users(&self) -> usize {
        self.outboxes.boxes()
    }

    /// When the oldest held message expires (wall-clock milliseconds).
    pub fn next_expiry(&self) -> Option<u64> {
        self.outboxes.next_expiry()
    }

    /// The outbox log records of changes since the last call.
    pub fn take_log_records(&mut self) -> Vec<u8> {
        self.outboxes.take_pending()
    }

    /// Bytes a compacted log would take.
    pub fn live_log_bytes(&self) -> usize {
        self.outboxes.live_log_bytes()
    }

    /// The live records, for rewriting the log.
    pub fn log_snapshot(&mut self) -> Vec<u8> {
        self.outboxes.snapshot()
    }

    /// The name the connection holds, if it joined.
    pub fn name_of(&self, conn: ConnId) -> Option<&Rc<str>> {
        let position = self.position_of_conn(conn)?;
        Some(&self.members[position].name)
    }

    fn position_of_conn(&self, ConnId(slot): ConnId) -> Option<usize> {
        match self.positions.get(slot) {
            Some(&p) if p != NOT_A_MEMBER => Some(p as usize),
            _ => None,
        }
    }

    fn set_position(&mut self, ConnId(slot): ConnId, position: usize) {
        if self.positions.len() <= slot {
            self.positions.resize(slot + 1, NOT_A_MEMBER);
        }
        self.positions[slot] = u32::try_from(position).unwrap_or(NOT_A_MEMBER);
    }

    /// A WebSocket connection opened with `query`: admit it under its name,
    /// or refuse it with an error event and a close code. Returns the name.
    pub fn join(&mut self, slot: ConnId, query: &str, out: &mut impl Outbox) -> Option<Rc<str>> {
        self.join_as(slot, query, None, out)
    }

    /// [`join`](Self::join) for a connection whose token named `verified`
    /// (its `sub`, a valid username): that is its name, and if the user is
    /// online already, this connection takes over (see `replace`).
    pub fn join_as(
        &mut self,
        slot: ConnId,
        query: &str,
        verified: Option<&str>,
        out: &mut impl Outbox,
    ) -> Option<Rc<str>> {
        if let Some(name) = verified {
            if let Some(&position) = self.index.get(name) {
                return Some(self.replace(position, slot, query, out));
            }
        }
        let requested = match verified {
            Some(name) => Some(std::borrow::Cow::Borrowed(name)),
            None => username::query_param(query, "username"),
        };
        let name = match requested.as_deref().map(username::canonical) {
            Some(Ok(name)) => name,
            Some(Err(invalid)) => {
                let message = invalid.explain();
                self.refuse_invalid_name(slot, message, out);
                return None;
            }
            None => {
                let message = username::InvalidName::Length.explain();
                self.refuse_invalid_name(slot, message, out);
                return None;
            }
        };
        if self.index.contains_key(&*name) || self.position_of_conn(slot).is_some() {
            self.refuse_lookalike_or_taken(slot, "that username is online already", out);
            return None;
        }
        let keys = username::lookalike_keys(&name);
        let known_exactly = self.outboxes.is_known(&name);
        if let Some(clash) = self.lookalikes.clash(&name, &keys, known_exactly) {
            let message = match clash {
                Clash::Online => "that username looks like the name of a user who is online",
                Clash::Known => "that username looks like the name of an existing user",
            };
            self.refuse_lookalike_or_taken(slot, message, out);
            return None;
        }
        let resume = resume_point(query);
        let name: Rc<str> = Rc::from(&*name);
        if let Some(remote) = &mut self.remote {
            remote.claim(&name);
        }
        // Everyone already online is listed first in `members`.
        let online = self.online_everywhere() + 1;
        let mut json = std::mem::take(&mut self.scratch);
        json.clear();
        self.encode_roster(&mut json, Some(&name), online);
        out.send(slot, &json, Class::Reply);

        match self.outboxes.remember(&name) {
            store::Remembered::Full => self.stats.known_full += 1,
            store::Remembered::New => self.lookalikes.remember(&keys),
            store::Remembered::AlreadyKnown => {}
        }
        self.lookalikes.arrive(&name, keys);
        self.index.insert(name.clone(), self.members.len());
        self.set_position(slot, self.members.len());
        self.members.push(Member {
            conn: slot,
            name: name.clone(),
            reliable: resume.is_some(),
        });
        if self.roster_len == Some(self.members.len() - 1) && self.members.len() <= LIST_LIMIT {
            encode::name_list_push(&mut self.roster, &name);
            self.roster_len = Some(self.members.len());
        }
        json.clear();
        if online <= self.limits.presence_limit {
            encode::presence(&mut json, "join", &name, online);
            self.broadcast(&json, Some(slot), Class::Presence, out);
        }
        if let Some(remote) = &mut self.remote {
            remote.announce_join(&name);
        }
        self.scratch = json;
        self.replay_held(slot, &name, resume, false, out);
        Some(name)
    }

    /// The same (authenticated) user connected again: a phone whose old
    /// connection is half-open. The old connection is closed with 4010 after
    /// what it was sent; the new one takes over the name, its place and its
    /// outbox. Others see no `leave` and `join`: the user never left.
    fn replace(
        &mut self,
        position: usize,
        slot: ConnId,
        query: &str,
        out: &mut impl Outbox,
    ) -> Rc<str> {
        let old = self.members[position].conn;
        self.positions[old.0] = NOT_A_MEMBER;
        out.close(old, CloseCode::Replaced, "replaced by a newer session");
        self.set_position(slot, position);
        let resume = resume_point(query);
        let member = &mut self.members[position];
        member.conn = slot;
        member.reliable = resume.is_some();
        let name = member.name.clone();
        // The others, as a welcome lists them (not the roster: it has this name).
        let mut others = Vec::new();
        for (i, member) in self.members.iter().enumerate().take(LIST_LIMIT + 1) {
            if i != position && others.len() < LIST_LIMIT {
                encode::name_list_push(&mut others, &member.name);
            }
        }
        let mut json = std::mem::take(&mut self.scratch);
        json.clear();
        encode::welcome(
            &mut json,
            &name,
            self.online_everywhere(),
            &others,
            self.limits.max_body,
        );
        out.send(slot, &json, Class::Reply);
        json.clear();
        self.scratch = json;
        self.replay_held(slot, &name, resume, true, out);
        name
    }

    /// Where `name` is in `members`, if online. Inlined: it is on the path
    /// of every private message.
    #[inline(always)]
    fn position_of(&mut self, name: &str) -> Option<usize> {
        if let Some((last, position)) = &self.last_target {
            if **last == *name {
                return Some(*position);
            }
        }
        let position = self.index.get(name).copied()?;
        self.last_target = Some((self.members[position].name.clone(), position));
        Some(position)
    }

    /// [`position_of`](Self::position_of) off the per-message path (a
    /// second call site would stop it being inlined there).
    #[cold]
    #[inline(never)]
    fn position_of_cold(&mut self, name: &str) -> Option<usize> {
        self.position_of(name)
    }

    /// Sends what the outbox holds for a user who just connected, before
    /// any live message. A reliable client gets what follows its `resume`
    /// and keeps it held until it acknowledges; a simple client gets it all,
    /// and it counts as delivered.
    fn replay_held(
        &mut self,
        slot: ConnId,
        name: &Rc<str>,
        resume: Option<u64>,
        replacing: bool,
        out: &mut impl Outbox,
    ) {
        // Under `--cluster` the outbox is in Redis: fetched, and delivered
        // when the store answers.
        if self.cluster_replay(name, resume, replacing, out) {
            return;
        }
        // A reliable client's resume point acknowledges what it covers; one
        // beyond anything given out (the client kept a seq from before the
        // server lost its data) acknowledges nothing, and all that is held
        // is replayed (the client de-duplicates by id) rather than dropped.
        let held = Mailbox::fetch(
            &mut self.outboxes,
            name,
            resume.unwrap_or(0),
            resume.is_some(),
        )
        .held;
        let Some(last) = held.last().map(|e| e.seq) else {
            return;
        };
        let mut json = Vec::with_capacity(256);
        for entry in &held {
            json.clear();
            encode::private(
                &mut json,
                &PrivateMessage {
                    id: entry.id,
                    ts: entry.ts,
                    seq: entry.seq,
                    from: &entry.from,
                    to: name,
                    body: &entry.body,
                    body_is_plain: false,
                    offline: true,
                },
            );
            out.send(slot, &json, Class::Reply);
            self.stats.deliveries += 1;
            if !entry.notified {
                self.outboxes.mark_notified(name, entry.seq);
                self.notify_sender(&entry.from, entry.id, "delivered", out);
            }
        }
        if resume.is_none() {
            Mailbox::ack(&mut self.outboxes, name, 0, last);
        }
    }

    /// Tells the sender of message `id`, if online, what became of it.
    fn notify_sender(&mut self, sender: &str, id: u64, status: &str, out: &mut impl Outbox) {
        if let Some(&position) = self.index.get(sender) {
            let mut json = Vec::with_capacity(64);
            encode::receipt(&mut json, id, None, status);
            out.send(self.members[position].conn, &json, Class::Reply);
        }
    }

    /// The connection is gone or closing: free its name at once (nothing
    /// if it held none).
    /// The connection stopped being open: its name is free (and returned)
    /// and the others are told.
    pub fn leave(&mut self, conn: ConnId, out: &mut impl Outbox) -> Option<Rc<str>> {
        let member = self.forget_member(conn)?;
        if let Some(remote) = &mut self.remote {
            remote.announce_leave(&member.name);
        }
        self.end_catchup(&member.name, out);
        let online = self.online_everywhere();
        if online <= self.limits.presence_limit {
            let mut json = std::mem::take(&mut self.scratch);
            json.clear();
            encode::presence(&mut json, "leave", &member.name, online);
            self.broadcast(&json, None, Class::Presence, out);
            json.clear();
            self.scratch = json;
        }
        Some(member.name)
    }

    /// Takes the connection's member out of the index and the list.
    fn forget_member(&mut self, conn: ConnId) -> Option<Member> {
        let position = self.position_of_conn(conn)?;
        self.positions[conn.0] = NOT_A_MEMBER;
        self.limiter.forget(conn.0);
        let member = self.members.swap_remove(position);
        self.index.remove(&member.name);
        self.lookalikes.leave(&member.name);
        self.last_target = None;
        if position < self.roster_len.unwrap_or(0) {
            self.roster_len = None;
        }
        if let Some(moved) = self.members.get(position) {
            let moved_conn = moved.conn;
            if let Some(p) = self.index.get_mut(&moved.name) {
                *p = position;
            }
            self.set_position(moved_conn, position);
        }
        Some(member)
    }

    /// A text message from the connection `slot`; one that has not joined
    /// (it was refused, and is closing) is ignored.
    pub fn handle(&mut self, slot: ConnId, text: &str, now_ms: u64, out: &mut impl Outbox) {
        let Some(position) = self.position_of_conn(slot) else {
            return;
        };
        let from = self.members[position].name.clone();
        let from = &*from;
        // Everything a client asks for is charged but acknowledgements and
        // token renewals, which a well-behaved client must be able to send
        // however fast it chats; errors are charged as the message they answer.
        let parsed = match protocol::parse(text, self.limits.max_body) {
            Ok(parsed) => parsed,
            Err((error, reference)) => {
                if self.admit(slot, now_ms, reference, out) {
                    self.reply_error(slot, &error, reference, out);
                }
                return;
            }
        };
        let free = matches!(parsed.request, Request::Ack { .. } | Request::Auth { .. });
        if !free && !self.admit(slot, now_ms, parsed.reference, out) {
            return;
        }
        let reference = parsed.reference;
        let mut json = std::mem::take(&mut self.scratch);
        json.clear();
        match parsed.request {
            Request::Public { body } => {
                let id = self.next_id();
                encode::public(&mut json, id, now_ms, from, &body, is_plain(&body));
                self.stats.public += 1;
                self.broadcast(&json, None, Class::Public, out);
                if !self.public_to_cluster(&json) {
                    self.cluster_unavailable(slot, reference, out);
                }
            }
            Request::Private { to, body } => {
                let body_is_plain = is_plain(&body);
                self.private(
                    slot,
                    from,
                    &to,
                    (&body, body_is_plain),
                    reference,
                    now_ms,
                    &mut json,
                    out,
                );
            }
            Request::Users => {
                let online = self.online_everywhere();
                self.encode_roster(&mut json, None, online);
                out.send(slot, &json, Class::Reply);
            }
            Request::Auth { token } => self.renew(slot, from, &token, reference, now_ms, out),
            Request::Ack { seq } => {
                let member = &self.members[position];
                if member.reliable {
                    let name = member.name.clone();
                    if !self.cluster_ack(&name, seq) {
                        Mailbox::ack(&mut self.outboxes, from, 0, seq);
                    }
                }
            }
        }
        json.clear();
        self.scratch = json;
    }

    /// A newer token for the connection's user: renewed, refused with an
    /// error (the current token stays good until it expires), or, for
    /// another user, an error and the connection closed (4003).
    fn renew(
        &mut self,
        slot: ConnId,
        from: &str,
        token: &str,
        reference: Option<&str>,
        now_ms: u64,
        out: &mut impl Outbox,
    ) {
        if !self.auth.is_on() {
            let message = "this server does not use tokens";
            self.send_error(slot, "invalid_token", message, reference, out);
            return;
        }
        match self.auth.verify(Some(token), now_ms / 1000) {
            Ok(claims) if claims.sub == from => {
                out.renew(slot, claims.exp.saturating_add(self.auth.leeway_secs()));
                let mut json = Vec::with_capacity(48);
                encode::auth_renewed(&mut json, claims.exp, reference);
                out.send(slot, &json, Class::Reply);
            }
            Ok(_) => {
                let message = "the token names another user";
                self.send_error(slot, "invalid_token", message, reference, out);
                out.close(slot, CloseCode::TokenExpired, "token for another user");
            }
            Err(e) => self.send_error(slot, "invalid_token", &e.to_string(), reference, out),
        }
    }

    /// Routes one private message: live to an online recipient (and held
    /// too if it is a reliable client), or held for an offline one.
    #[allow(clippy::too_many_arguments)]
    fn private(
        &mut self,
        slot: ConnId,
        from: &str,
        to: &str,
        (body, body_is_plain): (&str, bool),
        reference: Option<&str>,
        now_ms: u64,
        json: &mut Vec<u8>,
        out: &mut impl Outbox,
    ) {
        let mut position = self.position_of(to);
        // Only valid names in NFC are online, so only a miss needs the
        // check, and a name in another normalisation form a second look.
        let normalised;
        let to = match position {
            Some(_) => to,
            None => match username::canonical(to) {
                Ok(Cow::Borrowed(_)) => to,
                Ok(Cow::Owned(nfc)) => {
                    normalised = nfc;
                    position = self.position_of_cold(&normalised);
                    &normalised
                }
                Err(_) => {
                    let message = "no user can have that name";
                    self.send_error(slot, "invalid_username", message, reference, out);
                    return;
                }
            },
        };
        if self.remote.is_some()
            && self.private_via_store(slot, (from, to, body), reference, now_ms, out)
        {
            return;
        }
        let target = position.map(|p| (self.members[p].conn, self.members[p].reliable));
        // Offline storage is for users: a name nobody ever connected under
        // (or, with tokens, that no valid token named) cannot fill the store,
        // and a name that looks like a user's is never held for: nobody can
        // take it, and the sender meant that user or was tricked.
        if target.is_none() && !self.outboxes.is_known(to) {
            let lookalike = self.offline_to_unknown
                && self
                    .lookalikes
                    .clash(to, &username::lookalike_keys(to), false)
                    .is_some();
            if !self.offline_to_unknown || lookalike {
                let message = if lookalike {
                    "no user has that name (it looks like another user's name)"
                } else {
                    "no user of that name has ever connected"
                };
                self.send_error(slot, "unknown_user", message, reference, out);
                return;
            }
        }
        self.stats.private += 1;
        let hold = !matches!(target, Some((_, false)));
        if hold && !self.may_hold(slot, to, from, body.len(), target.is_none(), reference, out) {
            return;
        }
        let id = self.next_id();
        let mail = Mail {
            from,
            to,
            id,
            ts: now_ms,
            body,
        };
        let Some((target_slot, _)) = target else {
            self.hold_offline(slot, &mail, reference, json, out);
            return;
        };
        let seq = self.outboxes.next_seq();
        encode::private(
            json,
            &PrivateMessage {
                id,
                ts: now_ms,
                seq,
                from,
                to,
                body,
                body_is_plain,
                offline: false,
            },
        );
        let delivery = out.send_private(slot, target_slot, json);
        json.clear();
        match delivery {
            Delivery::Queued => {
                if hold {
                    let entry = held_entry(seq, id, now_ms, from, body, true);
                    self.outboxes.hold(to, entry);
                }
                self.stats.deliveries += 1;
                encode::receipt(json, id, reference, "delivered");
                out.send(slot, json, Class::Reply);
            }
            Delivery::Refused => {
                self.stats.refused += 1;
                // Nobody saw it: the number is given again.
                self.outboxes.take_back_seq(seq);
                let message = format!("{to} is receiving faster than it reads; try again later");
                self.send_error(slot, "recipient_busy", &message, reference, out);
            }
            Delivery::Disconnected | Delivery::Gone | Delivery::Shed => {
                // Not written to a live connection: hold it like any offline
                // message (the loop tells the router the recipient left),
                // under a number of its own (this one was shown to nobody).
                self.outboxes.take_back_seq(seq);
                if self.may_hold(slot, to, from, body.len(), true, reference, out) {
                    self.hold_offline(slot, &mail, reference, json, out);
                }
            }
        }
    }

    /// Whether a message from `from` may be held for `to`; if not, the
    /// sender is told why. `offline`: nobody reads it live, so it is
    /// promised `queued`, which needs the log (a reliable client's live
    /// message is held in memory while the log cannot be written, and
    /// written with everything else once it can).
    #[allow(clippy::too_many_arguments)]
    fn may_hold(
        &mut self,
        slot: ConnId,
        to: &str,
        from: &str,
        body_len: usize,
        offline: bool,
        reference: Option<&str>,
        out: &mut impl Outbox,
    ) -> bool {
        if offline && !self.storage_available {
            self.stats.storage_refused += 1;
            let message =
                "offline storage is unavailable (the server cannot write its log); try again later";
            self.send_error(slot, "storage_unavailable", message, reference, out);
            return false;
        }
        let Err(full) = self.outboxes.check_room(to, from, body_len) else {
            return true;
        };
        let (code, message) = full_store_error(full, to);
        self.send_error(slot, code, &message, reference, out);
        false
    }

    /// Holds `mail` for its recipient, who is offline, and promises its
    /// sender a `queued` receipt once it is on disk. (Whether it may be held
    /// was asked already: a name is known, the log can be written.)
    fn hold_offline(
        &mut self,
        slot: ConnId,
        mail: &Mail<'_>,
        reference: Option<&str>,
        json: &mut Vec<u8>,
        out: &mut impl Outbox,
    ) {
        let seq = match Mailbox::send(&mut self.outboxes, mail, false, mail.ts) {
            Ok(seq) => seq,
            Err(Refusal::Full(full)) => {
                let (code, message) = full_store_error(full, mail.to);
                self.send_error(slot, code, &message, reference, out);
                return;
            }
            Err(Refusal::Unknown) => {
                let message = "no user of that name has ever connected";
                self.send_error(slot, "unknown_user", message, reference, out);
                return;
            }
        };
        self.stats.stored += 1;
        self.awaiting_disk.push(AwaitingDisk {
            sender: slot,
            user: Rc::from(mail.to),
            seq,
            reference: reference.map(Box::from),
        });
        json.clear();
        encode::receipt(json, mail.id, reference, "queued");
        out.send_when_durable(slot, json);
    }

    /// This turn's log records are on disk: the `queued` promises stand.
    pub fn stored_durably(&mut self) {
        self.awaiting_disk.clear();
    }

    /// This turn's log records did not reach the disk: the messages held
    /// for offline users this turn are taken back and their senders told
    /// (the caller drops the `queued` receipts), and until
    /// [`storage_recovered`](Self::storage_recovered) no offline message is
    /// accepted. Live chat goes on. Returns the (user, seq) taken back, whose
    /// records must never reach the log.
    pub fn storage_failed(&mut self, out: &mut impl Outbox) -> Vec<(Rc<str>, u64)> {
        self.storage_available = false;
        let mut taken_back = Vec::new();
        for taken in std::mem::take(&mut self.awaiting_disk) {
            self.outboxes.unhold(&taken.user, taken.seq);
            self.stats.stored -= 1;
            self.stats.storage_refused += 1;
            let message = "the message could not be stored (the server cannot write its log); try again later";
            self.send_error(
                taken.sender,
                "storage_unavailable",
                message,
                taken.reference.as_deref(),
                out,
            );
            taken_back.push((taken.user, taken.seq));
        }
        taken_back
    }

    /// The log is written again.
    pub fn storage_recovered(&mut self) {
        self.storage_available = true;
    }

    /// Drops held messages past their time to live and tells their senders.
    pub fn expire(&mut self, now_ms: u64, out: &mut impl Outbox) {
        for expired in Mailbox::expire(&mut self.outboxes, now_ms) {
            self.stats.expired += 1;
            // One the sender already heard was delivered just goes quietly.
            if !expired.notified {
                self.notify_sender(&expired.from, expired.id, "expired", out);
            }
        }
    }

    /// The encoded names of the first `LIST_LIMIT` members, rebuilt only
    /// after a departure reordered them.
    fn roster_names(&mut self) -> &[u8] {
        let wanted = self.members.len().min(LIST_LIMIT);
        if self.roster_len != Some(wanted) {
            self.roster.clear();
            for member in &self.members[..wanted] {
                encode::name_list_push(&mut self.roster, &member.name);
            }
            self.roster_len = Some(wanted);
        }
        &self.roster
    }

    fn next_id(&mut self) -> u64 {
        // Under `--cluster`, from the blocks the cluster's counter granted
        // (unique across nodes); past them (Redis away long), on from here.
        let granted = self.remote.as_mut().and_then(|r| r.take_id());
        self.last_id = granted.map_or(self.last_id + 1, |id| id.max(self.last_id + 1));
        self.last_id
    }

    /// The last message id given out.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Sends `json` to every member but `except`.
    fn broadcast(
        &mut self,
        json: &[u8],
        except: Option<ConnId>,
        class: Class,
        out: &mut impl Outbox,
    ) {
        let recipients = self
            .members
            .iter()
            .map(|member| member.conn)
            .filter(|&conn| Some(conn) != except);
        let fanout = out.broadcast(json, class, recipients);
        self.stats.deliveries += fanout.queued;
        self.stats.shed += fanout.shed;
    }

    fn reply_error(
        &mut self,
        slot: ConnId,
        error: &RequestError,
        reference: Option<&str>,
        out: &mut impl Outbox,
    ) {
        self.send_error(slot, error.code(), &error.message(), reference, out);
    }

    fn send_error(
        &mut self,
        slot: ConnId,
        code: &str,
        message: &str,
        reference: Option<&str>,
        out: &mut impl Outbox,
    ) {
        self.stats.errors += 1;
        let mut json = Vec::with_capacity(64 + message.len());
        encode::error(&mut json, code, message, reference);
        out.send(slot, &json, Class::Reply);
    }

    fn refuse_invalid_name(&mut self, slot: ConnId, message: &str, out: &mut impl Outbox) {
        let (code, reason) = (CloseCode::InvalidUsername, "invalid username");
        self.refuse(slot, "invalid_username", message, code, reason, out);
    }

    fn refuse_lookalike_or_taken(&mut self, slot: ConnId, message: &str, out: &mut impl Outbox) {
        let (code, reason) = (CloseCode::UsernameTaken, "username taken");
        self.refuse(slot, "username_taken", message, code, reason, out);
    }

    /// Charges one message to the connection's allowance: false if it is
    /// over its rate (and then it was answered, perhaps closed).
    #[inline]
    fn admit(
        &mut self,
        slot: ConnId,
        now_ms: u64,
        reference: Option<&str>,
        out: &mut impl Outbox,
    ) -> bool {
        match self.limiter.charge(slot.0, now_ms.saturating_mul(1000)) {
            Charge::Admitted => true,
            refused => {
                self.rate_limited(slot, refused, reference, out);
                false
            }
        }
    }

    /// A message over the sender's rate: not routed, answered with
    /// `rate_limited`; the refusal that makes the flood sustained closes.
    #[cold]
    fn rate_limited(
        &mut self,
        slot: ConnId,
        charge: Charge,
        reference: Option<&str>,
        out: &mut impl Outbox,
    ) {
        let (Charge::Refused { retry_after_ms } | Charge::RefusedAndClose { retry_after_ms }) =
            charge
        else {
            return;
        };
        self.stats.rate_limited += 1;
        self.stats.errors += 1;
        let mut json = Vec::with_capacity(128);
        encode::rate_limited(&mut json, retry_after_ms, reference);
        out.send(slot, &json, Class::Reply);
        if matches!(charge, Charge::RefusedAndClose { .. }) {
            self.stats.rate_limit_closes += 1;
            out.close(slot, CloseCode::Policy, "rate limit exceeded");
        }
    }

    fn refuse(
        &mut self,
        slot: ConnId,
        code: &str,
        message: &str,
        close_code: CloseCode,
        close_reason: &'static str,
        out: &mut impl Outbox,
    ) {
        self.send_error(slot, code, message, None, out);
        out.close(slot, close_code, close_reason);
    }
}

/// The error a sender gets when a store has no room for its message to `to`.
fn full_store_error(full: Full, to: &str) -> (&'static str, String) {
    match full {
        Full::User => (
            "offline_queue_full",
            format!("{to} has too many messages waiting"),
        ),
        Full::Store => (
            "offline_queue_full",
            "the offline store is full".to_string(),
        ),
        Full::Sender => (
            "offline_sender_limit",
            "too many of your messages are waiting for users who are offline".to_string(),
        ),
    }
}

/// `resume=SEQ` opts in to acknowledged delivery; a bad number counts as 0.
fn resume_point(query: &str) -> Option<u64> {
    username::query_param(query, "resume").map(|v| v.parse::<u64>().unwrap_or(0))
}

fn held_entry(seq: u64, id: u64, ts: u64, from: &str, body: &str, notified: bool) -> Entry {
    Entry {
        seq,
        id,
        ts,
        from: Rc::from(from),
        body: body.to_owned(),
        notified,
    }
}

/// Outbox limits that never bind, for routers without offline storage limits in tests.
pub fn unlimited_outboxes() -> Outboxes {
    Outboxes::new(store::Limits::unbounded())
}

#[cfg(test)]
mod tests {
    use super::*;

    mod cluster;
    use serde_json::{json, Value};

    /// Records what the router sends; slots listed in `full` are too slow.
    #[derive(Default)]
    struct Recorder {
        sent: Vec<(usize, Value, Class)>,
        closed: Vec<(usize, u16)>,
        full: Vec<usize>,
        gone: Vec<usize>,
        broadcasts: usize,
        busy: Vec<usize>,
        renewed: Vec<(usize, u64)>,
        durable: Vec<(usize, Value)>,
    }

    impl Recorder {
        fn record(&mut self, slot: usize, json: &[u8], class: Class) -> Delivery {
            if self.gone.contains(&slot) {
                return Delivery::Gone;
            }
            if self.full.contains(&slot) {
                return match class {
                    Class::Public | Class::Presence => Delivery::Shed,
                    _ => Delivery::Disconnected,
                };
            }
            let value = serde_json::from_slice(json).expect("valid JSON");
            self.sent.push((slot, value, class));
            Delivery::Queued
        }
    }

    impl Outbox for Recorder {
        fn send(&mut self, ConnId(slot): ConnId, json: &[u8], class: Class) -> Delivery {
            self.record(slot, json, class)
        }
        fn send_private(&mut self, _from: ConnId, ConnId(to): ConnId, json: &[u8]) -> Delivery {
            if self.busy.contains(&to) {
                return Delivery::Refused;
            }
            self.record(to, json, Class::Private)
        }
        fn broadcast(
            &mut self,
            json: &[u8],
            class: Class,
            to: impl Iterator<Item = ConnId>,
        ) -> Fanout {
            self.broadcasts += 1;
            let mut fanout = Fanout::default();
            for ConnId(slot) in to {
                match self.record(slot, json, class) {
                    Delivery::Queued => fanout.queued += 1,
                    Delivery::Shed => fanout.shed += 1,
                    _ => {}
                }
            }
            fanout
        }
        fn send_when_durable(&mut self, ConnId(slot): ConnId, json: &[u8]) {
            let value = serde_json::from_slice(json).expect("valid JSON");
            self.durable.push((slot, value));
        }
        fn close(&mut self, ConnId(slot): ConnId, code: CloseCode, _reason: &'static str) {
            self.closed.push((slot, code.to_u16()));
        }
        fn renew(&mut self, ConnId(slot): ConnId, until_unix_secs: u64) {
            self.renewed.push((slot, until_unix_secs));
        }
    }

    impl Recorder {
        fn take(&mut self) -> Vec<(usize, Value)> {
            self.sent.drain(..).map(|(s, v, _)| (s, v)).collect()
        }
    }

    /// A router that holds messages for any name, as the older tests expect.
    fn router(presence_limit: usize) -> Router {
        let mut r = Router::new(
            Limits {
                max_body: 100,
                presence_limit,
            },
            unlimited_outboxes(),
        );
        r.set_offline_to_unknown(true);
        r
    }

    #[test]
    fn join_welcomes_and_announces() {
        let mut r = router(10);
        let mut out = Recorder::default();
        assert_eq!(
            r.join(ConnId(1), "username=alice", &mut out).as_deref(),
            Some("alice")
        );
        assert_eq!(
            out.take(),
            vec![(
                1,
                json!({"type":"welcome","username":"alice","online":1,"users":[],"limits":{"max_body":100}})
            )]
        );
        r.join(ConnId(2), "username=bob", &mut out);
        assert_eq!(
            out.take(),
            vec![
                (
                    2,
                    json!({"type":"welcome","username":"bob","online":2,"users":["alice"],"limits":{"max_body":100}})
                ),
                (1, json!({"type":"join","username":"bob","online":2})),
            ]
        );
        r.leave(ConnId(2), &mut out);
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
        assert!(r.join(ConnId(1), "username=a%20b", &mut out).is_none());
        assert!(r.join(ConnId(2), "other=x", &mut out).is_none());
        r.join(ConnId(3), "username=alice", &mut out);
        out.take();
        assert!(r.join(ConnId(4), "username=alice", &mut out).is_none());
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
            r.join(ConnId(slot), &format!("username={name}"), &mut out);
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
        r.leave(ConnId(3), &mut out);
        assert_eq!(out.take().len(), 2, "back at the limit: leave is announced");
    }

    #[test]
    fn seq_counts_on_across_online_offline_and_rejoining() {
        let mut r = router(10);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.join(ConnId(2), "username=bob", &mut out);
        let send = |r: &mut Router, out: &mut Recorder| {
            r.handle(
                ConnId(1),
                r#"{"type":"private","to":"bob","body":"x"}"#,
                1,
                out,
            );
        };
        let seqs = |out: &mut Recorder| -> Vec<u64> {
            let mut sent: Vec<Value> = out.take().into_iter().map(|(_, v)| v).collect();
            sent.retain(|v| v["type"] == "private");
            sent.iter().filter_map(|v| v["seq"].as_u64()).collect()
        };
        out.take();
        send(&mut r, &mut out);
        send(&mut r, &mut out);
        assert_eq!(seqs(&mut out), vec![1, 2], "online");
        r.leave(ConnId(2), &mut out);
        send(&mut r, &mut out);
        out.take();
        r.join(ConnId(3), "username=bob", &mut out);
        assert_eq!(seqs(&mut out), vec![3], "held while offline, replayed");
        send(&mut r, &mut out);
        assert_eq!(seqs(&mut out), vec![4], "online again");
        assert_eq!(r.outboxes.last_seq(), 4);
    }

    #[test]
    fn a_private_reaches_the_right_user_after_a_departure_moves_members() {
        let mut r = router(10);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "alice"), (2, "bob"), (3, "carol"), (4, "dave")] {
            r.join(ConnId(slot), &format!("username={name}"), &mut out);
        }
        let to = |name: &str| format!(r#"{{"type":"private","to":"{name}","body":"x"}}"#);
        r.handle(ConnId(1), &to("bob"), 1, &mut out);
        // bob leaves; dave moves into bob's place in the member list.
        r.leave(ConnId(2), &mut out);
        out.take();
        r.handle(ConnId(1), &to("bob"), 2, &mut out);
        r.handle(ConnId(1), &to("dave"), 3, &mut out);
        let sent = out.take();
        // dave's message and its receipt; bob's is stored, its receipt waits for the disk.
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert_eq!(sent[0].0, 4);
        assert_eq!(sent[0].1["to"], "dave");
        assert_eq!(out.durable.len(), 1);
        assert_eq!(out.durable[0].1["status"], "queued");
    }

    #[test]
    fn private_goes_to_the_target_only_with_a_receipt() {
        let mut r = router(10);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "alice"), (2, "bob"), (3, "carol")] {
            r.join(ConnId(slot), &format!("username={name}"), &mut out);
        }
        out.take();
        r.handle(
            ConnId(1),
            r#"{"type":"private","from":"carol","to":"bob","body":"hi","ref":"r1"}"#,
            1234,
            &mut out,
        );
        assert_eq!(
            out.take(),
            vec![
                (
                    2,
                    json!({"type":"private","id":1,"ts":1234,"seq":1,"from":"alice","to":"bob","body":"hi"})
                ),
                (
                    1,
                    json!({"type":"receipt","id":1,"ref":"r1","status":"delivered"})
                ),
            ]
        );
        r.handle(
            ConnId(1),
            r#"{"type":"private","to":"alice","body":"me"}"#,
            1235,
            &mut out,
        );
        let sent = out.take();
        assert_eq!(
            sent[0],
            (
                1,
                json!({"type":"private","id":2,"ts":1235,"seq":2,"from":"alice","to":"alice","body":"me"})
            )
        );
        assert_eq!(sent[1].1["status"], "delivered");
        r.handle(
            ConnId(1),
            r#"{"type":"private","to":"nobody","body":"x","ref":7}"#,
            1,
            &mut out,
        );
        assert!(out.take().is_empty(), "held, not sent");
        assert_eq!(
            out.durable,
            vec![(
                1,
                json!({"type":"receipt","id":3,"ref":7,"status":"queued"})
            )]
        );
    }

    #[test]
    fn public_reaches_everyone_in_one_broadcast() {
        let mut r = router(10);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "alice"), (2, "bob"), (3, "carol")] {
            r.join(ConnId(slot), &format!("username={name}"), &mut out);
        }
        out.take();
        out.broadcasts = 0;
        r.handle(
            ConnId(2),
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
        assert_eq!(out.broadcasts, 1, "encoded once for all");
    }

    #[test]
    fn slow_recipients_shed_public_and_drop_out_on_private() {
        let mut r = router(10);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "alice"), (2, "bob"), (3, "carol")] {
            r.join(ConnId(slot), &format!("username={name}"), &mut out);
        }
        out.take();
        out.full.push(2);
        r.handle(ConnId(1), r#"{"type":"public","body":"x"}"#, 1, &mut out);
        assert_eq!(out.take().len(), 2);
        assert_eq!(r.stats.shed, 1);
        r.handle(
            ConnId(1),
            r#"{"type":"private","to":"bob","body":"x"}"#,
            1,
            &mut out,
        );
        assert!(out.take().is_empty());
        assert_eq!(out.durable[0].1["status"], "queued", "held for bob instead");
        assert_eq!(r.outboxes.held().0, 1);
        // The loop closed bob and tells the router so.
        r.leave(ConnId(2), &mut out);
        let leave = json!({"type":"leave","username":"bob","online":2});
        assert_eq!(out.take(), vec![(1, leave.clone()), (3, leave)]);
        assert_eq!(r.online(), 2);
        assert_eq!(r.name_of(ConnId(2)), None);
        assert_eq!(r.name_of(ConnId(3)).map(|n| &**n), Some("carol"));
    }

    #[test]
    fn a_flooded_recipient_refuses_and_nothing_is_stored() {
        let mut r = router(10);
        let mut out = Recorder::default();
        for (slot, name) in [(1, "alice"), (2, "bob")] {
            r.join(ConnId(slot), &format!("username={name}"), &mut out);
        }
        out.take();
        out.busy.push(2);
        r.handle(
            ConnId(1),
            r#"{"type":"private","to":"bob","body":"x","ref":5}"#,
            1,
            &mut out,
        );
        let sent = out.take();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].0, 1);
        assert_eq!(sent[0].1["code"], "recipient_busy");
        assert_eq!(sent[0].1["ref"], 5);
        assert!(out.durable.is_empty());
        assert_eq!(r.outboxes.held().0, 0);
        // Its seq was not used up: the next message bob gets has seq 1.
        out.busy.clear();
        r.handle(
            ConnId(1),
            r#"{"type":"private","to":"bob","body":"y"}"#,
            2,
            &mut out,
        );
        assert_eq!(out.take()[0].1["seq"], 1);
    }

    #[test]
    fn an_authenticated_user_replaces_its_older_session_without_presence_flicker() {
        let mut r = router(10);
        let mut out = Recorder::default();
        r.join_as(ConnId(1), "", Some("alice"), &mut out);
        r.join_as(ConnId(2), "", Some("bob"), &mut out);
        out.take();
        // alice again (her phone reconnects; the old connection is half-open).
        let name = r.join_as(ConnId(3), "resume=0", Some("alice"), &mut out);
        assert_eq!(name.as_deref(), Some("alice"));
        assert_eq!(out.closed, vec![(1, 4010)]);
        assert_eq!(
            out.take(),
            vec![(
                3,
                json!({"type":"welcome","username":"alice","online":2,"users":["bob"],"limits":{"max_body":100}})
            )],
            "bob sees no leave and no join"
        );
        // The old connection's departure frees nothing.
        r.leave(ConnId(1), &mut out);
        assert!(out.take().is_empty());
        assert_eq!(r.online(), 2);
        r.handle(
            ConnId(2),
            r#"{"type":"private","to":"alice","body":"hi"}"#,
            1,
            &mut out,
        );
        assert_eq!(
            out.take()[0].0,
            3,
            "alice's messages go to the new connection"
        );
        // Without a token, a taken name is still refused.
        assert!(r.join(ConnId(4), "username=bob", &mut out).is_none());
        assert_eq!(out.closed.last(), Some(&(4, 4009)));
    }

    #[test]
    fn a_token_renewal_extends_the_session_and_another_users_token_ends_it() {
        use crate::auth::jwt::tests::mint;
        use crate::auth::{Auth, Rules, Secret};
        let secret = b"0123456789abcdef0123456789abcdef";
        let mut r = router(10);
        r.set_auth(Auth::Jwt {
            secret: Secret::new(secret.to_vec()).expect("32 bytes"),
            rules: Rules {
                leeway_secs: 30,
                audience: None,
                issuer: None,
            },
        });
        let mut out = Recorder::default();
        r.join_as(ConnId(1), "", Some("alice"), &mut out);
        out.take();
        let now_ms = 1_800_000_000_000;
        let token = |sub: &str| {
            let claims = format!(r#"{{"sub":"{sub}","exp":1800000600}}"#);
            mint(r#"{"alg":"HS256"}"#, &claims, secret)
        };
        let renew = |r: &mut Router, out: &mut Recorder, token: &str| {
            let text = format!(r#"{{"type":"auth","token":"{token}","ref":1}}"#);
            r.handle(ConnId(1), &text, now_ms, out);
        };
        renew(&mut r, &mut out, &token("alice"));
        assert_eq!(out.renewed, vec![(1, 1_800_000_630)]);
        assert_eq!(
            out.take(),
            vec![(1, json!({"type":"auth","exp":1800000600,"ref":1}))]
        );
        renew(&mut r, &mut out, "not.a.token");
        assert_eq!(out.take()[0].1["code"], "invalid_token");
        assert!(
            out.closed.is_empty(),
            "a bad renewal leaves the session as it was"
        );
        renew(&mut r, &mut out, &token("mallory"));
        assert_eq!(out.take()[0].1["code"], "invalid_token");
        assert_eq!(out.closed, vec![(1, 4003)]);
        assert_eq!(out.renewed.len(), 1);
    }

    #[test]
    fn a_failed_log_write_takes_back_this_turns_offline_messages() {
        let mut r = router(10);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.join(ConnId(2), "username=bob&resume=0", &mut out);
        out.take();
        let to = |name: &str, n: u32| {
            format!(r#"{{"type":"private","to":"{name}","body":"m{n}","ref":{n}}}"#)
        };
        r.handle(ConnId(1), &to("carol", 1), 1, &mut out);
        r.stored_durably();
        r.handle(ConnId(1), &to("carol", 2), 1, &mut out);
        r.handle(ConnId(1), &to("bob", 3), 1, &mut out); // live, held for reliable bob
        assert_eq!(out.durable.len(), 2, "two queued promises");
        out.take();
        r.storage_failed(&mut out);
        let sent = out.take();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(
            (sent[0].0, &sent[0].1["code"], &sent[0].1["ref"]),
            (1, &json!("storage_unavailable"), &json!(2))
        );
        // m1 was on disk already; m2 is taken back; bob's live one stays held.
        let held: Vec<_> = r
            .outboxes
            .held_after("carol", 0)
            .map(|e| e.body.clone())
            .collect();
        assert_eq!(held, ["m1"]);
        assert_eq!(r.outboxes.held_after("bob", 0).count(), 1);
        // Until the log is written again, offline messages are refused at
        // once; live ones go on.
        r.handle(ConnId(1), &to("carol", 4), 1, &mut out);
        assert_eq!(out.take()[0].1["code"], "storage_unavailable");
        r.handle(ConnId(1), &to("bob", 5), 1, &mut out);
        assert!(out.take().iter().any(|(_, v)| v["status"] == "delivered"));
        r.storage_recovered();
        r.handle(ConnId(1), &to("carol", 6), 1, &mut out);
        assert_eq!(
            out.durable.last().map(|d| &d.1["status"]),
            Some(&json!("queued"))
        );
        assert_eq!(r.stats.storage_refused, 2);
    }

    /// Joins `query` on `slot`: the name admitted, or the error code.
    fn join_answer(r: &mut Router, slot: usize, query: &str) -> Result<String, String> {
        let mut out = Recorder::default();
        match r.join(ConnId(slot), query, &mut out) {
            Some(name) => Ok(name.to_string()),
            None => {
                let code = out.take()[0].1["code"].as_str().unwrap_or("").to_string();
                let close = out.closed[0].1;
                let expected = if code == "invalid_username" {
                    4001
                } else {
                    4009
                };
                assert_eq!(close, expected, "{query}");
                Err(code)
            }
        }
    }

    #[test]
    fn names_are_nfc_and_lookalikes_of_online_and_known_users_are_taken() {
        let mut r = router(10);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.join(ConnId(2), "username=bob", &mut out);
        r.leave(ConnId(2), &mut out); // bob is known, offline
        let taken = Err("username_taken".to_string());
        let invalid = Err("invalid_username".to_string());
        // (query, what it gets), in order, each on its own slot.
        let table: &[(&str, Result<&str, ()>)] = &[
            ("username=%D0%B0lice", Err(())),    // Cyrillic а + Latin: invalid
            ("username=%D0%B0%D0%B5", Ok("ае")), // all Cyrillic, no clash
            ("username=Alice", Err(())),         // case: alice is online
            ("username=ALICE", Err(())),
            ("username=aIice", Err(())), // capital I
            ("username=a1ice", Err(())),
            ("username=%EF%BD%81lice", Err(())), // full-width a
            ("username=%F0%9D%90%9Alice", Err(())), // mathematical bold a
            ("username=alice%E3%85%A4", Err(())), // U+3164 HANGUL FILLER
            ("username=BOB", Err(())),           // known, offline
            ("username=b0b", Err(())),
            ("username=Zoe%CC%88", Ok("Zoë")), // NFD in, NFC name
            ("username=zo%C3%AB", Err(())),    // Zoë is online
            ("username=%E6%9D%8E%E9%9B%B7", Ok("李雷")),
            ("username=bob", Ok("bob")), // bob himself comes back
        ];
        for (slot, (query, expected)) in table.iter().enumerate() {
            let got = join_answer(&mut r, 10 + slot, query);
            match expected {
                Ok(name) => assert_eq!(got, Ok(name.to_string()), "{query}"),
                Err(()) => assert!(got == taken || got == invalid, "{query}: {got:?}"),
            }
        }
        // Which refusal: invalid names are invalid, lookalikes taken.
        assert_eq!(join_answer(&mut r, 40, "username=%D0%B0lice"), invalid);
        assert_eq!(join_answer(&mut r, 41, "username=%EF%BD%81lice"), invalid);
        assert_eq!(join_answer(&mut r, 42, "username=alice%E3%85%A4"), invalid);
        assert_eq!(join_answer(&mut r, 43, "username=Alice"), taken);
        assert_eq!(join_answer(&mut r, 44, "username=BOB"), taken);
        // Alice leaves: her look stays hers, since she is known.
        r.leave(ConnId(1), &mut out);
        assert_eq!(join_answer(&mut r, 45, "username=Alice"), taken);
        assert_eq!(
            join_answer(&mut r, 46, "username=alice"),
            Ok("alice".into())
        );
    }

    #[test]
    fn a_lookalike_of_a_known_user_is_taken_only_once_that_user_is_known() {
        // Past --max-known-users, a name is not known: its look is not kept
        // once it leaves (nor is mail held for it).
        let mut r = Router::new(
            Limits {
                max_body: 100,
                presence_limit: 10,
            },
            Outboxes::new(store::Limits {
                max_known_users: 1,
                ..store::Limits::unbounded()
            }),
        );
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.join(ConnId(2), "username=bob", &mut out);
        assert_eq!(
            join_answer(&mut r, 3, "username=BOB"),
            Err("username_taken".into())
        );
        r.leave(ConnId(2), &mut out);
        assert_eq!(join_answer(&mut r, 4, "username=BOB"), Ok("BOB".into()));
    }

    #[test]
    fn a_private_to_a_lookalike_spelling_goes_to_nobody() {
        let mut r = router(10); // holds for unknown names too
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.join(ConnId(2), "username=Zo%C3%AB", &mut out);
        r.join(ConnId(3), "username=bob", &mut out);
        r.leave(ConnId(3), &mut out);
        r.join(ConnId(4), "username=dave", &mut out);
        out.take();
        let to = |name: &str| format!(r#"{{"type":"private","to":"{name}","body":"x","ref":1}}"#);
        // (to, the error code, or the slot it reaches live)
        let table: &[(&str, Result<usize, &str>)] = &[
            ("alice", Ok(1)),
            ("Zoe\\u0308", Ok(2)), // NFD: the same name
            ("\\u0430lice", Err("invalid_username")),
            ("\\uff41lice", Err("invalid_username")),
            ("alice\\u200b", Err("invalid_username")),
            ("Alice", Err("unknown_user")),
            ("aIice", Err("unknown_user")),
            ("BOB", Err("unknown_user")), // bob is known, offline
        ];
        for (name, expected) in table {
            r.handle(ConnId(4), &to(name), 1, &mut out);
            let sent = out.take();
            assert!(!sent.is_empty(), "{name}: {:?}", out.durable);
            match expected {
                Ok(slot) => {
                    assert_eq!(sent[0].0, *slot, "{name}");
                    assert_eq!(sent[0].1["type"], "private", "{name}");
                }
                Err(code) => assert_eq!(sent[0].1["code"], *code, "{name}"),
            }
        }
        assert_eq!(r.held().0, 0, "nothing held for a lookalike");
        // A name that looks like nobody's is still held for (this router
        // holds for names that never connected).
        r.handle(ConnId(4), &to("carol"), 1, &mut out);
        assert_eq!(r.held().0, 1);
    }

    #[test]
    fn offline_messages_only_for_names_that_connected() {
        let mut r = Router::new(
            Limits {
                max_body: 100,
                presence_limit: 10,
            },
            Outboxes::new(store::Limits {
                max_per_user: 10,
                max_bytes: 1 << 20,
                ttl_ms: u64::MAX,
                max_known_users: 2,
                ..store::Limits::unbounded()
            }),
        );
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.join(ConnId(2), "username=bob", &mut out);
        r.leave(ConnId(2), &mut out);
        r.join(ConnId(3), "username=carol", &mut out); // past --max-known-users
        r.leave(ConnId(3), &mut out);
        out.take();
        let to = |name: &str| format!(r#"{{"type":"private","to":"{name}","body":"x","ref":1}}"#);
        r.handle(ConnId(1), &to("bob"), 1, &mut out);
        assert_eq!(out.durable[0].1["status"], "queued", "bob connected once");
        for name in ["zed", "carol"] {
            r.handle(ConnId(1), &to(name), 1, &mut out);
            let sent = out.take();
            assert_eq!(sent[0].1["code"], "unknown_user", "{name}");
        }
        assert_eq!(r.outboxes.held().0, 1, "nothing stored for them");
        assert_eq!((r.known_users(), r.stats.known_full), (2, 1));
        // The log remembers who is known.
        let mut replayed = Outboxes::new(store::Limits {
            max_per_user: 10,
            max_bytes: 1 << 20,
            ttl_ms: u64::MAX,
            max_known_users: 2,
            ..store::Limits::unbounded()
        });
        let records = r.take_log_records();
        let mut at = 0;
        while at < records.len() {
            let (record, used) = store::record::Record::decode(&records[at..]).expect("a record");
            replayed.replay(record);
            at += used;
        }
        assert!(replayed.is_known("alice") && replayed.is_known("bob"));
        assert!(!replayed.is_known("carol"));
    }

    #[test]
    fn a_connection_that_did_not_join_is_not_heard() {
        let mut r = router(10);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        assert!(r.join(ConnId(2), "username=alice", &mut out).is_none());
        out.take();
        r.handle(ConnId(2), r#"{"type":"public","body":"x"}"#, 1, &mut out);
        assert!(out.take().is_empty());
        r.leave(ConnId(2), &mut out);
        assert_eq!(r.online(), 1, "the refused one's leave frees nobody");
    }

    #[test]
    fn messages_are_charged_to_their_sender_but_acks_and_renewals() {
        let mut r = router(10);
        r.set_message_policy(MessagePolicy::new(Rate::new(1, 2)));
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.join(ConnId(2), "username=bob", &mut out);
        out.take();
        let t = 1_800_000_000_000; // ms
        let limited = |reference: Value, wait: u64| {
            let mut e = json!({"type":"error","code":"rate_limited",
                "message":"too many messages: wait before sending more","retry_after_ms":wait});
            if !reference.is_null() {
                e["ref"] = reference;
            }
            vec![(1, e)]
        };
        /// The time, the message, and what its sender is sent.
        type Row<'a> = (u64, &'a str, Vec<(usize, Value)>);
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            // The burst of two.
            (t, r#"{"type":"users"}"#, vec![(1, json!({"type":"users","online":2,"users":["alice","bob"]}))]),
            (t, r#"{"type":"private","to":"bob","body":"1","ref":1}"#, vec![]),
            // Acks and renewals are free (this server has no tokens: the
            // renewal's own error, not rate_limited).
            (t, r#"{"type":"ack","seq":1}"#, vec![]),
            (t, r#"{"type":"auth","token":"x","ref":2}"#, vec![(1, json!({"type":"error","code":"invalid_token",
                "message":"this server does not use tokens","ref":2}))]),
            // Everything else is refused, with the message's ref if it has one.
            (t, r#"{"type":"private","to":"bob","body":"2","ref":3}"#, limited(json!(3), 1000)),
            (t + 400, r#"{"type":"public","body":"3","ref":"q"}"#, limited(json!("q"), 600)),
            (t + 400, "{", limited(Value::Null, 600)),
            (t + 400, r#"{"type":"dance","ref":4}"#, limited(json!(4), 600)),
            // One second after the burst, one more.
            (t + 1000, r#"{"type":"users"}"#, vec![(1, json!({"type":"users","online":2,"users":["alice","bob"]}))]),
            (t + 1000, r#"{"type":"users"}"#, limited(Value::Null, 1000)),
        ];
        for (i, (now, text, expected)) in table.into_iter().enumerate() {
            r.handle(ConnId(1), text, now, &mut out);
            let mine: Vec<(usize, Value)> = out
                .take()
                .into_iter()
                .filter(|(slot, v)| *slot == 1 && v["type"] != "receipt")
                .collect();
            assert_eq!(mine, expected, "row {i}: {text}");
        }
        assert_eq!((r.stats.rate_limited, r.stats.rate_limit_closes), (5, 0));
        assert!(out.closed.is_empty());
        // A new tenant of the slot starts with a full bucket.
        r.leave(ConnId(1), &mut out);
        r.join(ConnId(1), "username=carol", &mut out);
        out.take();
        r.handle(ConnId(1), r#"{"type":"users"}"#, t + 1000, &mut out);
        assert_eq!(out.take()[0].1["type"], "users");
    }

    #[test]
    fn users_and_errors_answer_the_requester() {
        let mut r = router(10);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.join(ConnId(2), "username=bob", &mut out);
        out.take();
        r.handle(ConnId(2), r#"{"type":"users","ref":3}"#, 1, &mut out);
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
            r.handle(ConnId(2), text, 1, &mut out);
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
            r.join(ConnId(slot), &format!("username={name}"), &mut out);
        }
        r.leave(ConnId(1), &mut out);
        r.leave(ConnId(1), &mut out);
        r.leave(ConnId(9), &mut out); // wrong slot: not b's connection
        assert_eq!(r.online(), 3);
        out.take();
        r.handle(
            ConnId(2),
            r#"{"type":"private","to":"d","body":"x"}"#,
            1,
            &mut out,
        );
        assert_eq!(out.take()[0].0, 4);
        assert!(r.join(ConnId(5), "username=a", &mut out).is_some());
    }
    fn limited_router(max_per_user: usize, ttl_ms: u64) -> Router {
        let mut r = Router::new(
            Limits {
                max_body: 100,
                presence_limit: 10,
            },
            Outboxes::new(store::Limits {
                max_per_user,
                max_bytes: 1 << 20,
                ttl_ms,
                ..store::Limits::unbounded()
            }),
        );
        r.set_offline_to_unknown(true);
        r
    }

    #[test]
    fn offline_messages_are_held_then_delivered_in_order_after_welcome() {
        let mut r = limited_router(10, 1_000_000);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        for body in ["one", "two"] {
            let text = format!(r#"{{"type":"private","to":"bob","body":"{body}"}}"#);
            r.handle(ConnId(1), &text, 50, &mut out);
        }
        let queued: Vec<_> = out
            .durable
            .drain(..)
            .map(|(s, v)| (s, v["status"].clone()))
            .collect();
        assert_eq!(queued, vec![(1, json!("queued")), (1, json!("queued"))]);
        out.take();
        r.join(ConnId(2), "username=bob", &mut out);
        let sent = out.take();
        let to_bob: Vec<_> = sent
            .iter()
            .filter(|(s, _)| *s == 2)
            .map(|(_, v)| v.clone())
            .collect();
        assert_eq!(to_bob[0]["type"], "welcome");
        assert_eq!(
            to_bob[1],
            json!({"type":"private","id":1,"ts":50,"seq":1,"from":"alice","to":"bob","body":"one","offline":true})
        );
        assert_eq!(to_bob[2]["seq"], 2);
        let to_alice: Vec<_> = sent
            .iter()
            .filter(|(s, _)| *s == 1)
            .map(|(_, v)| v.clone())
            .collect();
        assert!(to_alice.contains(&json!({"type":"receipt","id":1,"status":"delivered"})));
        assert!(to_alice.contains(&json!({"type":"receipt","id":2,"status":"delivered"})));
        // A simple client: written counts as delivered, so nothing is held any more.
        assert_eq!(r.outboxes.held().0, 0);
        r.handle(
            ConnId(1),
            r#"{"type":"private","to":"bob","body":"live"}"#,
            60,
            &mut out,
        );
        assert_eq!(out.take()[0].1["seq"], 3, "sequence numbers continue");
    }

    #[test]
    fn reliable_clients_keep_messages_until_acked_and_resume_after_the_gap() {
        let mut r = limited_router(10, 1_000_000);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.join(ConnId(2), "username=bob&resume=0", &mut out);
        for i in 1..=3 {
            let text = format!(r#"{{"type":"private","to":"bob","body":"m{i}"}}"#);
            r.handle(ConnId(1), &text, 10, &mut out);
        }
        assert_eq!(r.outboxes.held().0, 3, "live but unacknowledged");
        r.handle(ConnId(2), r#"{"type":"ack","seq":1}"#, 11, &mut out);
        assert_eq!(r.outboxes.held().0, 2);
        r.leave(ConnId(2), &mut out);
        out.take();
        r.join(ConnId(3), "username=bob&resume=2", &mut out);
        let replayed: Vec<_> = out
            .take()
            .into_iter()
            .filter(|(s, v)| *s == 3 && v["type"] == "private")
            .map(|(_, v)| (v["seq"].clone(), v["offline"].clone()))
            .collect();
        assert_eq!(replayed, vec![(json!(3), json!(true))]);
        assert_eq!(r.outboxes.held().0, 1, "still held until acked");
    }

    #[test]
    fn a_resume_point_beyond_anything_given_out_acknowledges_nothing() {
        let mut r = limited_router(10, 1_000_000);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        for i in 1..=2 {
            let text = format!(r#"{{"type":"private","to":"bob","body":"m{i}"}}"#);
            r.handle(ConnId(1), &text, 10, &mut out);
        }
        out.take();
        r.join(ConnId(2), "username=bob&resume=99", &mut out);
        let replayed: Vec<_> = out
            .take()
            .into_iter()
            .filter(|(s, v)| *s == 2 && v["type"] == "private")
            .map(|(_, v)| v["seq"].clone())
            .collect();
        assert_eq!(replayed, vec![json!(1), json!(2)], "nothing dropped unread");
        assert_eq!(r.outboxes.held().0, 2, "held until acknowledged");
    }

    #[test]
    fn full_outboxes_refuse_with_an_error_and_ttl_expires_with_a_receipt() {
        let mut r = limited_router(1, 100);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        r.handle(
            ConnId(1),
            r#"{"type":"private","to":"bob","body":"a"}"#,
            1000,
            &mut out,
        );
        out.take();
        r.handle(
            ConnId(1),
            r#"{"type":"private","to":"bob","body":"b","ref":"r"}"#,
            1000,
            &mut out,
        );
        let sent = out.take();
        assert_eq!(
            (sent[0].1["code"].clone(), sent[0].1["ref"].clone()),
            (json!("offline_queue_full"), json!("r"))
        );
        r.expire(1099, &mut out);
        assert!(out.take().is_empty());
        r.expire(1100, &mut out);
        assert_eq!(
            out.take(),
            vec![(1, json!({"type":"receipt","id":1,"status":"expired"}))]
        );
        assert_eq!(r.outboxes.held().0, 0);
    }

    #[test]
    fn a_private_to_a_name_no_one_can_hold_is_refused() {
        let mut r = limited_router(10, 1000);
        let mut out = Recorder::default();
        r.join(ConnId(1), "username=alice", &mut out);
        out.take();
        r.handle(
            ConnId(1),
            r#"{"type":"private","to":"no one","body":"x","ref":1}"#,
            1,
            &mut out,
        );
        let sent = out.take();
        assert_eq!(sent[0].1["code"], "invalid_username");
        assert_eq!(r.outboxes.held(), (0, 0));
    }

    #[test]
    fn rosters_list_at_most_1000_names_and_stay_right_after_departures() {
        let mut r = router(0);
        let mut out = Recorder::default();
        for slot in 0..1002 {
            r.join(ConnId(slot), &format!("username=u{slot}"), &mut out);
        }
        let welcome = out.take().pop().expect("a welcome").1;
        assert_eq!(welcome["online"], 1002);
        let names = welcome["users"].as_array().expect("users").clone();
        assert_eq!(names.len(), 1000);
        assert!(
            !names.contains(&json!("u1001")),
            "the newcomer is not among the others"
        );
        r.leave(ConnId(5), &mut out);
        r.handle(ConnId(0), r#"{"type":"users"}"#, 1, &mut out);
        let users = out.take().pop().expect("users").1;
        let listed = users["users"].as_array().expect("users");
        assert_eq!((users["online"].clone(), listed.len()), (json!(1001), 1000));
        assert!(!listed.contains(&json!("u5")));
        assert!(
            listed.contains(&json!("u1001")),
            "the member moved into the gap is listed"
        );
        let mut unique = listed.clone();
        unique.dedup();
        assert_eq!(unique.len(), 1000);
    }
}
