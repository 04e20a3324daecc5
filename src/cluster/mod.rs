//! `--cluster`: several wschat processes as one chat, over Redis. See
//! docs/CLUSTER.md for the design.
//!
//! This is the thin shell: two non-blocking Redis connections registered in
//! the server's `mio::Poll` (one for commands, one subscribed to the
//! cluster's channels), RESP from [`resp`], and the node's Redis work: name
//! leases, joins that wait for their lease, lease renewal and heartbeats in
//! batches, reconnecting with jittered backoff. What the node knows of the
//! others and what it tells them is [`remote::Remote`], owned by the router.

pub mod catchup;
pub mod link;
pub mod remote;
pub mod resp;
pub mod reuseport;
pub mod store;
pub mod url;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::{Registry, Token};

use self::link::{Link, LinkError};
use self::remote::{Outgoing, Remote, StoreOp, To};
use self::resp::Frame;
use self::store::{BadReply, Expired, Fetched, Held, Migrated, Quotas, Sent, Store};
pub use self::url::RedisUrl;

/// The command connection's token (outside the client slab's range, beside
/// the listeners').
pub const COMMAND_TOKEN: Token = Token(usize::MAX - 3);
/// The subscriber connection's token.
pub const SUBSCRIBER_TOKEN: Token = Token(usize::MAX - 4);

/// Joins waiting for their lease, at most; beyond, 1013 at once.
pub const MAX_WAITING_JOINS: usize = 10_000;
/// Bytes that waiting joins sent behind their request heads, at most.
pub const MAX_WAITING_BYTES: usize = 4 * 1024 * 1024;
/// Commands sent and not answered, at most; beyond, the node sheds.
pub const MAX_IN_FLIGHT: usize = 100_000;
/// Names renewed by one command (a short Lua script over their keys).
const RENEW_BATCH: usize = 1000;
/// `PEXPIRE` on every key given that this node (`ARGV[2]`) holds, answering
/// for each 1 (renewed), 0 (missing) or 2 (another node holds it: this
/// node's session under the name is over).
const RENEW_SCRIPT: &[u8] = b"local r = {} for i, k in ipairs(KEYS) do \
    local v = redis.call('GET', k) \
    if v == ARGV[2] then redis.call('PEXPIRE', k, ARGV[1]) r[i] = 1 \
    elseif v then r[i] = 2 else r[i] = 0 end end return r";
/// Sets the lease to this node whoever holds it, answering who did.
const TAKE_OVER_SCRIPT: &[u8] = b"local old = redis.call('GET', KEYS[1]) \
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return old";
/// Takes a name's lease for this node if it is free (answers nil), or
/// answers its holder; a lease this node holds already (left from an
/// earlier session, whose release was skipped while Redis was away) gets
/// a fresh expiry, or it would lapse under the new session between renewals.
const LEASE_SCRIPT: &[u8] = b"local v = redis.call('GET', KEYS[1]) \
    if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return false end \
    if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return v";
/// How long a join waits for Redis before it is told 1013 (at most the lease).
pub const JOIN_WAIT: Duration = Duration::from_secs(5);
/// How long the link may take to come up, or a command to be answered,
/// before the connection is dropped and made again.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the store's held messages are swept for expiry.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// Removals from the store (`ACK`s) kept to be sent again after a lost
/// link, at most; beyond, the message comes again in its user's next session.
const MAX_UNSENT_ACKS: usize = 100_000;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Round-trip histogram bounds, in seconds.
const RTT_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
];

#[derive(Debug, Clone)]
pub struct Settings {
    pub url: RedisUrl,
    pub prefix: String,
    pub lease: Duration,
    /// The offline store's limits, cluster-wide.
    pub quotas: Quotas,
    /// Names remembered as users (`--max-known-users`), cluster-wide.
    pub max_known: usize,
}

/// Local-log messages uploaded to the store at most this many at a time.
const MIGRATE_IN_FLIGHT: usize = 1000;

/// One message of the local log, to upload to the store once.
#[derive(Debug, Clone)]
pub struct ToMigrate {
    pub to: Rc<str>,
    pub held: Held,
    /// When it expires (ms; 0 never).
    pub expires_ms: u64,
}

/// The upload of a local log (`--data-dir`) to the store, at start.
#[derive(Debug, Default)]
struct Migration {
    entries: Vec<ToMigrate>,
    /// The next to send; replies come in order, so after a lost link the
    /// upload starts again from `answered` (an upload is idempotent).
    next: usize,
    answered: usize,
    stored: usize,
    before: usize,
    failed: usize,
    /// The local log's known names, and whether they were sent on this link.
    known: Vec<Rc<str>>,
    known_sent: bool,
}

/// A connection waiting for its name's lease before its `welcome`.
#[derive(Debug)]
pub struct WaitingJoin {
    pub slot: usize,
    pub conn_id: u64,
    pub name: Rc<str>,
    pub query: String,
    /// The name came from a verified token: a session elsewhere is replaced.
    pub verified: bool,
    /// Bytes that came right behind the request head, decoded once joined.
    pub early: Vec<u8>,
    pub deadline: Instant,
    sent: bool,
}

impl WaitingJoin {
    pub fn new(
        slot: usize,
        conn_id: u64,
        name: &str,
        query: &str,
        verified: bool,
        early: &[u8],
    ) -> WaitingJoin {
        WaitingJoin {
            slot,
            conn_id,
            name: Rc::from(name),
            query: query.to_owned(),
            verified,
            early: early.to_vec(),
            deadline: Instant::now() + JOIN_WAIT,
            sent: false,
        }
    }
}

/// What the loop must act on after Redis spoke.
#[derive(Debug)]
pub enum Event {
    JoinGranted(WaitingJoin),
    JoinRefused(WaitingJoin),
    /// Redis did not answer in time: close 1013.
    JoinTimedOut(WaitingJoin),
    /// A message from another node (or our own echo).
    Message(Vec<u8>),
    /// The lease of a local user was taken by another node while Redis was away.
    LeaseLost(Rc<str>),
    /// The link came up: re-register the local names.
    Up,
    /// A local user's lease was found missing in Redis and is being taken
    /// again: hold back what is published to it until its outbox is fetched.
    LeaseMissing(Rc<str>),
    /// A local user's lease is this node's again (after `Up` or
    /// `LeaseMissing`): its outbox holds what was sent meanwhile.
    Reclaimed(Rc<str>),
    /// An authenticated user's lease was taken from this node: its session there ends.
    TookOver(Rc<str>, Rc<str>),
    /// Message ids up to this one (a block of `remote::ID_BLOCK`) are this node's.
    Ids(u64),
    /// The store's answer to a private message (by its tag).
    Sent(u64, Result<Sent, BadReply>),
    /// A private message (by its tag) was never sent to the store.
    NotSent(u64),
    /// A private message (by its tag) was sent to the store and its answer
    /// lost with the link: it may be stored (and delivered) or not.
    Unconfirmed(u64),
    /// More of a joined user's outbox (the fetch's generation, its answer).
    Fetched(Rc<str>, u64, Fetched),
    /// The outbox of a user whose lease was granted: it joins now.
    JoinFetched(WaitingJoin, u64, Fetched),
    /// Held messages past their time to live, removed.
    Expired(Vec<Expired>),
    /// The local log is uploaded: these (recipient, local seq) are in the
    /// store now.
    Migrated(Vec<(Rc<str>, u64)>),
}

/// What a command's reply means to us.
#[derive(Debug)]
enum Expect {
    /// AUTH, SELECT, PUBLISH, deletes: an error is logged, nothing else.
    Nothing,
    /// `SET name node NX PX lease GET` for a waiting join (by connection id).
    Join(u64, Rc<str>),
    /// A batch of renewals of local names' leases: the reply lists, per
    /// name, 1 if renewed, 0 if the key was lost.
    Renew(Vec<Rc<str>>),
    /// Taking a lost lease back.
    Reclaim(Rc<str>),
    /// Taking an authenticated user's name over from the node named.
    TakeOver(Rc<str>, Rc<str>),
    /// A block of message ids from the cluster's counter.
    Ids,
    /// The store's `SEND` for the private message of this tag.
    Send(u64),
    /// The store's `FETCH` for a joined user (and its generation).
    Fetch(Rc<str>, u64),
    /// The store's `FETCH` for a user whose lease was just granted.
    JoinFetch(Box<WaitingJoin>, u64),
    /// The store's `EXPIRE` sweep.
    Expire,
    /// A removal from an outbox: sent again if the link is lost first.
    Ack(StoreOp),
    /// One message of the local log uploaded (its index in the migration).
    Migrate(usize),
    /// `REMEMBER`: an error is logged (a lost script drops the link, which
    /// loads them again).
    Store,
    /// The store's message count and bytes, cluster-wide (for /metrics).
    Size,
    /// `AUTH`, `SELECT` and `SCRIPT LOAD` on a new connection: the link is up
    /// only once all are answered without error (a Redis still loading its
    /// data accepts connections and subscriptions, and answers `LOADING`).
    Setup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Down { retry_at: Instant, attempt: u32 },
    Connecting { since: Instant, attempt: u32 },
    Up,
}

#[derive(Debug, Default)]
struct Stats {
    commands: u64,
    reconnects: u64,
    shed: u64,
    joins_timed_out: u64,
    rtt_counts: [u64; RTT_BUCKETS.len() + 1],
    rtt_sum: f64,
}

pub struct Cluster {
    settings: Settings,
    addr: SocketAddr,
    node: String,
    command: Link,
    subscriber: Link,
    state: State,
    /// Replies the command connection owes, in order, with when each was asked.
    expecting: VecDeque<(Expect, Instant)>,
    waiting: VecDeque<WaitingJoin>,
    /// The `early` bytes of `waiting`.
    waiting_bytes: usize,
    /// When local leases are renewed and the heartbeat sent next.
    renew_at: Instant,
    seed: u64,
    /// Ids are asked for above this (the clock × 1000 and the last id given
    /// out; kept by the loop).
    pub id_floor: u64,
    /// A block of ids is asked for and not granted yet.
    ids_asked: bool,
    /// The offline store's commands (scripts by SHA-1 once loaded).
    store: Store,
    /// The wall clock (ms), kept by the loop: store commands carry it.
    pub now_ms: u64,
    /// Joins whose outbox fetch was lost with the link: told 1013 next tick.
    lost_joins: Vec<WaitingJoin>,
    /// Removals not sent, or not answered, when the link was lost: sent
    /// first when it is back (an `ACK` is idempotent), so that a message
    /// written to a simple client is not given to it again.
    unsent_acks: Vec<StoreOp>,
    /// Privates (by tag) never sent to the store: refused, next tick.
    not_sent: Vec<u64>,
    /// Privates (by tag) sent to the store whose answer was lost with the
    /// link: they may or may not be stored.
    unconfirmed: Vec<u64>,
    migration: Option<Migration>,
    /// Set when Redis lost the scripts, refused the setup or a fetch, or
    /// a fetch could not be sent: the link is dropped and made again.
    broken: Option<String>,
    /// Leases to take again with the next renewal (a reclaim failed).
    reclaim_later: Vec<Rc<str>>,
    /// Messages and bytes held in the store, cluster-wide, as last read.
    store_size: Option<(u64, u64)>,
    /// Both channels are subscribed (on the new connection).
    subscribed: bool,
    /// Setup replies the command connection still owes.
    setup_left: usize,
    /// When the store's expiry sweep runs next (every node sweeps, at most
    /// once a second: a sweep removes at most `store::EXPIRE_BATCH`).
    expire_at: Instant,
    stats: Stats,
}

impl Cluster {
    pub fn new(settings: Settings, addr: SocketAddr, now: Instant) -> Cluster {
        let seed = random_seed();
        let node = format!("{seed:016x}");
        let mut store = Store::new(&settings.prefix);
        store.by_sha = true;
        Cluster {
            settings,
            addr,
            node,
            command: Link::default(),
            subscriber: Link::default(),
            state: State::Down {
                retry_at: now,
                attempt: 0,
            },
            expecting: VecDeque::new(),
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            renew_at: now,
            seed,
            id_floor: 0,
            ids_asked: false,
            store,
            now_ms: 0,
            lost_joins: Vec::new(),
            unsent_acks: Vec::new(),
            not_sent: Vec::new(),
            unconfirmed: Vec::new(),
            migration: None,
            broken: None,
            subscribed: false,
            setup_left: 0,
            reclaim_later: Vec::new(),
            store_size: None,
            expire_at: now,
            stats: Stats::default(),
        }
    }

    /// Uploads these local-log messages to the store once the link is up
    /// (and again after a lost link, from the first unanswered: an upload
    /// is idempotent).
    /// `known`: the names the local log remembers as users, so that they
    /// may be sent to in the cluster too (`SADD`, idempotent).
    pub fn migrate(&mut self, entries: Vec<ToMigrate>, known: Vec<Rc<str>>, now: Instant) {
        if entries.is_empty() && known.is_empty() {
            return;
        }
        if !entries.is_empty() {
            crate::log::info!(
                "cluster: uploading {} offline messages from the local log to Redis",
                entries.len()
            );
        }
        self.migration = Some(Migration {
            entries,
            known,
            ..Migration::default()
        });
        self.pump_migration(now);
    }

    fn pump_migration(&mut self, now: Instant) {
        if !self.is_up() {
            return;
        }
        let Some(m) = &mut self.migration else {
            return;
        };
        let mut commands = Vec::new();
        if !m.known_sent {
            m.known_sent = true;
            let key = format!("{}:known", self.settings.prefix).into_bytes();
            for names in m.known.chunks(1000) {
                let mut args = vec![b"SADD".to_vec(), key.clone()];
                args.extend(names.iter().map(|n| n.as_bytes().to_vec()));
                commands.push((args, Expect::Store));
            }
        }
        // Numbered above the clock × 1000, like every message now.
        let floor = self.now_ms.saturating_mul(1000);
        while m.next < m.entries.len() && m.next - m.answered < MIGRATE_IN_FLIGHT {
            let e = &m.entries[m.next];
            let payload = serde_json::to_string(&remote::Carried {
                tag: 0,
                id: e.held.id,
                ts: e.held.ts,
                from: e.held.from.clone(),
                to: e.to.to_string(),
                body: e.held.body.clone(),
            })
            .unwrap_or_default();
            let args =
                self.store
                    .migrate(&e.to, &e.held, e.expires_ms, floor, &self.node, &payload);
            commands.push((args, Expect::Migrate(m.next)));
            m.next += 1;
        }
        if m.entries.is_empty() {
            // Known names only: nothing to wait for or report.
            self.migration = None;
        }
        for (args, expect) in commands {
            self.command_owned(&args, expect, now);
        }
    }

    fn migrated(&mut self, i: usize, frame: &Frame, events: &mut Vec<Event>, now: Instant) {
        let Some(m) = &mut self.migration else {
            return;
        };
        m.answered = m.answered.max(i + 1);
        match store::migrated(frame) {
            Ok(Migrated::Stored(_)) => m.stored += 1,
            Ok(Migrated::Duplicate(_)) => m.before += 1,
            Err(e) => {
                m.failed += 1;
                crate::log::warn!("cluster: migrating a held message: {e}");
            }
        }
        if m.answered < m.entries.len() {
            self.pump_migration(now);
            return;
        }
        let Some(m) = self.migration.take() else {
            return;
        };
        crate::log::info!(
            "cluster: migrated the local log's offline messages to Redis: {} stored, {} were uploaded before, {} failed",
            m.stored,
            m.before,
            m.failed
        );
        if m.failed == 0 {
            let done = m.entries.into_iter().map(|e| (e.to, e.held.seq)).collect();
            events.push(Event::Migrated(done));
        }
    }

    /// Fetches the outbox of a user whose lease was granted; it joins when
    /// the reply comes. Returns the join back when Redis is away.
    pub fn fetch_for_join(
        &mut self,
        join: WaitingJoin,
        (after, ack, generation): (u64, bool, u64),
        now: Instant,
    ) -> Result<(), WaitingJoin> {
        if !self.is_up() {
            return Err(join);
        }
        let args = self.store.fetch(&join.name, after, ack);
        self.command_owned(&args, Expect::JoinFetch(Box::new(join), generation), now);
        Ok(())
    }

    fn keep_ack(&mut self, op: StoreOp) {
        if self.unsent_acks.len() < MAX_UNSENT_ACKS {
            self.unsent_acks.push(op);
        }
    }

    fn command_owned(&mut self, args: &[Vec<u8>], expect: Expect, now: Instant) {
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        self.command(&args, expect, now);
    }

    /// Encodes one of the router's store commands.
    fn store_command(&mut self, op: StoreOp, now: Instant) {
        let (args, expect) = match op {
            StoreOp::Send {
                carried,
                online,
                payload,
            } => {
                let msg = store::Outgoing {
                    from: &carried.from,
                    to: &carried.to,
                    id: carried.id,
                    ts: carried.ts,
                    body: &carried.body,
                    tag: carried.tag,
                    payload: &payload,
                };
                // Numbers grow with the clock too, so a Redis that lost its
                // counter never hands one out again.
                let floor = self.now_ms.saturating_mul(1000);
                let quotas = Quotas {
                    known_only: self.settings.quotas.known_only && !online,
                    ..self.settings.quotas
                };
                let args = self
                    .store
                    .send(&msg, &quotas, floor, &self.node, self.now_ms);
                (args, Expect::Send(carried.tag))
            }
            StoreOp::Fetch {
                name,
                after,
                ack,
                generation,
            } => (
                self.store.fetch(&name, after, ack),
                Expect::Fetch(name, generation),
            ),
            StoreOp::Ack { name, from, to } => {
                let args = self.store.ack(&name, from, to);
                (args, Expect::Ack(StoreOp::Ack { name, from, to }))
            }
            StoreOp::Remember(name) => (
                self.store.remember(&name, self.settings.max_known),
                Expect::Store,
            ),
            StoreOp::Expire => (self.store.expire(self.now_ms), Expect::Expire),
        };
        self.command_owned(&args, expect, now);
    }

    /// How long a join waits for Redis: [`JOIN_WAIT`], or the lease if shorter.
    fn join_wait(&self) -> Duration {
        JOIN_WAIT.min(self.settings.lease)
    }

    /// This node's id (unique: 64 random bits).
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    fn key(&self, name: &str) -> Vec<u8> {
        format!("{}:name:{name}", self.settings.prefix).into_bytes()
    }

    fn channel(&self, to: &To) -> Vec<u8> {
        match to {
            To::All => format!("{}:all", self.settings.prefix).into_bytes(),
            To::Node(node) => format!("{}:node:{node}", self.settings.prefix).into_bytes(),
        }
    }

    fn lease_ms(&self) -> Vec<u8> {
        self.settings.lease.as_millis().to_string().into_bytes()
    }

    fn command(&mut self, args: &[&[u8]], expect: Expect, now: Instant) {
        self.command.queue(args);
        self.expecting.push_back((expect, now));
        self.stats.commands += 1;
    }

    /// When the loop must wake for the cluster next.
    pub fn next_deadline(&self) -> Option<Instant> {
        let link = match self.state {
            State::Down { retry_at, .. } => retry_at,
            State::Connecting { since, .. } => since + LINK_TIMEOUT,
            State::Up => self.renew_at.min(self.expire_at),
        };
        let join = self.waiting.front().map(|j| j.deadline);
        let reply = self.expecting.front().map(|(_, at)| *at + LINK_TIMEOUT);
        [Some(link), join, reply].into_iter().flatten().min()
    }

    /// A connection wants `name`: it waits for the lease (or is told 1013 at
    /// once when too many wait). Returns the join back when refused.
    pub fn begin_join(&mut self, mut join: WaitingJoin, now: Instant) -> Result<(), WaitingJoin> {
        if self.waiting.len() >= MAX_WAITING_JOINS
            || self.expecting.len() >= MAX_IN_FLIGHT
            || self.waiting_bytes + join.early.len() > MAX_WAITING_BYTES
        {
            self.stats.shed += 1;
            return Err(join);
        }
        join.deadline = now + self.join_wait();
        join.sent = false;
        if self.is_up() {
            self.send_join(&mut join, now);
        }
        self.waiting_bytes += join.early.len();
        self.waiting.push_back(join);
        Ok(())
    }

    fn send_join(&mut self, join: &mut WaitingJoin, now: Instant) {
        let key = self.key(&join.name);
        let lease = self.lease_ms();
        let node = self.node.clone();
        self.command(
            &[b"EVAL", LEASE_SCRIPT, b"1", &key, node.as_bytes(), &lease],
            Expect::Join(join.conn_id, join.name.clone()),
            now,
        );
        join.sent = true;
    }

    /// Asks the cluster's counter for the next block of message ids (raised
    /// to the floor first, so ids keep growing after Redis lost the counter).
    pub fn ask_for_ids(&mut self, now: Instant) {
        if !self.is_up() || self.ids_asked {
            return;
        }
        self.ids_asked = true;
        let key = format!("{}:ids", self.settings.prefix).into_bytes();
        let block = remote::ID_BLOCK.to_string().into_bytes();
        let floor = self.id_floor.to_string().into_bytes();
        self.command(
            &[
                b"EVAL",
                b"local v = redis.call('INCRBY', KEYS[1], ARGV[1]) \
                  local least = tonumber(ARGV[2]) + tonumber(ARGV[1]) \
                  if v < least then redis.call('SET', KEYS[1], least) v = least end return v",
                b"1",
                &key,
                &block,
                &floor,
            ],
            Expect::Ids,
            now,
        );
    }

    /// Gives a lease back unless another node holds it now.
    pub fn release(&mut self, name: &str, now: Instant) {
        if !self.is_up() {
            return; // it lapses within the lease
        }
        let key = self.key(name);
        let node = self.node.clone();
        self.command(
            &[
                b"EVAL",
                b"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
                b"1",
                &key,
                node.as_bytes(),
            ],
            Expect::Nothing,
            now,
        );
    }

    /// Sends what the router owes the cluster this turn (all of it in the
    /// turn's one write).
    pub fn send_outgoing(&mut self, remote: &mut Remote, now: Instant) {
        for outgoing in remote.take_outgoing() {
            match outgoing {
                Outgoing::Publish(to, payload) => {
                    if !self.is_up() || self.expecting.len() >= MAX_IN_FLIGHT {
                        self.stats.shed += 1;
                        continue;
                    }
                    let channel = self.channel(&to);
                    self.command(&[b"PUBLISH", &channel, &payload], Expect::Nothing, now);
                }
                Outgoing::Release(name) => self.release(&name, now),
                Outgoing::Store(op) => {
                    if !self.is_up() || self.expecting.len() >= MAX_IN_FLIGHT {
                        // Not sent: a private's sender is told; a removal
                        // waits for the link; a fetch is asked again when
                        // the link is back.
                        self.stats.shed += 1;
                        match op {
                            StoreOp::Send { carried, .. } => self.not_sent.push(carried.tag),
                            StoreOp::Ack { .. } => self.keep_ack(op),
                            // Its user would wait for it for good: the
                            // link is made again, which fetches again.
                            StoreOp::Fetch { .. } if self.is_up() => {
                                self.broken = Some("too many commands in flight".to_owned());
                            }
                            _ => {}
                        }
                        continue;
                    }
                    self.store_command(op, now);
                }
            }
        }
    }

    /// Renews every local lease and beats, once a third of the lease has
    /// passed: one pipelined batch, not a round trip per name.
    pub fn renew<'a>(&mut self, names: impl Iterator<Item = &'a Rc<str>>, now: Instant) -> bool {
        if !self.is_up() || now < self.renew_at {
            return false;
        }
        self.renew_at = now + self.settings.lease / 3;
        for name in std::mem::take(&mut self.reclaim_later) {
            self.reclaim_one(name, now);
        }
        let lease = self.lease_ms();
        let node = self.node.clone();
        let mut batch: Vec<Rc<str>> = Vec::with_capacity(RENEW_BATCH);
        let mut names = names.peekable();
        while names.peek().is_some() {
            batch.clear();
            batch.extend(names.by_ref().take(RENEW_BATCH).cloned());
            let keys: Vec<Vec<u8>> = batch.iter().map(|n| self.key(n)).collect();
            let count = keys.len().to_string().into_bytes();
            let mut args: Vec<&[u8]> = vec![b"EVAL", RENEW_SCRIPT, &count];
            args.extend(keys.iter().map(Vec::as_slice));
            args.push(&lease);
            args.push(node.as_bytes());
            self.command(&args, Expect::Renew(batch.clone()), now);
        }
        true
    }

    /// Re-registers names after the link came back (the keys may be gone
    /// with a restarted Redis).
    pub fn reclaim<'a>(&mut self, names: impl Iterator<Item = &'a Rc<str>>, now: Instant) {
        for name in names {
            self.reclaim_one(name.clone(), now);
        }
    }

    fn reclaim_one(&mut self, name: Rc<str>, now: Instant) {
        let key = self.key(&name);
        let lease = self.lease_ms();
        let node = self.node.clone();
        self.command(
            &[b"EVAL", LEASE_SCRIPT, b"1", &key, node.as_bytes(), &lease],
            Expect::Reclaim(name),
            now,
        );
    }

    /// Takes a name over from `holder` for an authenticated user (and from
    /// whichever node took it in between: its reply says).
    fn take_over(&mut self, name: &Rc<str>, holder: Rc<str>, now: Instant) {
        let key = self.key(name);
        let lease = self.lease_ms();
        let node = self.node.clone();
        self.command(
            &[
                b"EVAL",
                TAKE_OVER_SCRIPT,
                b"1",
                &key,
                node.as_bytes(),
                &lease,
            ],
            Expect::TakeOver(name.clone(), holder),
            now,
        );
    }

    /// Deadlines: reconnect, link and reply timeouts, joins that waited too long.
    pub fn tick(&mut self, registry: &Registry, now: Instant, events: &mut Vec<Event>) {
        match self.state {
            State::Down { retry_at, attempt } if now >= retry_at => {
                self.connect(registry, now, attempt)
            }
            State::Connecting { since, attempt } if now >= since + LINK_TIMEOUT => {
                self.fail(registry, now, attempt, "connecting timed out");
            }
            State::Up
                if self
                    .expecting
                    .front()
                    .is_some_and(|(_, at)| now >= *at + LINK_TIMEOUT) =>
            {
                self.fail(registry, now, 0, "a reply timed out");
            }
            _ => {}
        }
        // Once a second: the expiry sweep, and the store's size for /metrics.
        if self.is_up() && now >= self.expire_at {
            self.expire_at = now + EXPIRE_EVERY;
            if self.expecting.len() < MAX_IN_FLIGHT {
                if self.settings.quotas.ttl_ms != u64::MAX {
                    self.store_command(StoreOp::Expire, now);
                }
                let held = format!("{}:held", self.settings.prefix).into_bytes();
                self.command(&[b"HMGET", &held, b"count", b"bytes"], Expect::Size, now);
            }
        }
        for tag in self.not_sent.drain(..) {
            events.push(Event::NotSent(tag));
        }
        for tag in self.unconfirmed.drain(..) {
            events.push(Event::Unconfirmed(tag));
        }
        for join in self.lost_joins.drain(..) {
            self.stats.joins_timed_out += 1;
            events.push(Event::JoinTimedOut(join));
        }
        while self.waiting.front().is_some_and(|j| now >= j.deadline) {
            if let Some(join) = self.waiting.pop_front() {
                self.waiting_bytes -= join.early.len();
                self.stats.joins_timed_out += 1;
                events.push(Event::JoinTimedOut(join));
            }
        }
    }

    fn connect(&mut self, registry: &Registry, now: Instant, attempt: u32) {
        self.stats.reconnects += u64::from(attempt > 0);
        let result = self
            .command
            .connect(registry, COMMAND_TOKEN, self.addr)
            .and_then(|()| {
                self.subscriber
                    .connect(registry, SUBSCRIBER_TOKEN, self.addr)
            });
        if let Err(e) = result {
            self.fail(registry, now, attempt, &e.to_string());
            return;
        }
        self.state = State::Connecting {
            since: now,
            attempt,
        };
        self.expecting.clear();
        let db = self.settings.url.db.to_string();
        let password = self.settings.url.password.clone();
        for link in [&mut self.command, &mut self.subscriber] {
            if let Some(pw) = &password {
                link.queue(&[b"AUTH", pw.as_bytes()]);
            }
            if db != "0" {
                link.queue(&[b"SELECT", db.as_bytes()]);
            }
        }
        let setup = usize::from(password.is_some()) + usize::from(db != "0");
        for _ in 0..setup {
            self.expecting.push_back((Expect::Setup, now));
        }
        // The store's scripts, before anything names them by SHA-1.
        let loads = self.store.loads();
        for load in &loads {
            let args: Vec<&[u8]> = load.iter().map(Vec::as_slice).collect();
            self.command.queue(&args);
            self.expecting.push_back((Expect::Setup, now));
        }
        self.setup_left = setup + loads.len();
        self.subscribed = false;
        let all = self.channel(&To::All);
        let mine = self.channel(&To::Node(Rc::from(self.node.as_str())));
        self.subscriber.queue(&[b"SUBSCRIBE", &all, &mine]);
        self.subscriber.setup_replies = setup;
    }

    fn fail(&mut self, registry: &Registry, now: Instant, attempt: u32, why: &str) {
        if self.state == State::Up {
            crate::log::warn!(
                "cluster: lost Redis at {}: {why}; serving local users",
                self.addr
            );
        } else if attempt < 2 {
            crate::log::warn!("cluster: cannot reach Redis at {}: {why}", self.addr);
        }
        self.command.close(registry);
        self.subscriber.close(registry);
        for (expect, _) in std::mem::take(&mut self.expecting) {
            match expect {
                Expect::JoinFetch(join, _) => self.lost_joins.push(*join),
                Expect::Ack(op) => self.keep_ack(op),
                Expect::Send(tag) => self.unconfirmed.push(tag),
                _ => {}
            }
        }
        if let Some(m) = &mut self.migration {
            m.next = m.answered;
            m.known_sent = false;
        }
        self.broken = None;
        self.ids_asked = false;
        for join in &mut self.waiting {
            join.sent = false;
        }
        let attempt = attempt.saturating_add(1);
        self.state = State::Down {
            retry_at: now + self.backoff(attempt),
            attempt,
        };
    }

    /// Exponential from 100 ms to 5 s, each delay drawn from its upper half,
    /// so nodes that lost Redis together do not return together.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let ceiling = BACKOFF_MIN
            .saturating_mul(1 << attempt.min(10))
            .min(BACKOFF_MAX);
        self.seed = xorshift(self.seed);
        let half = ceiling / 2;
        half + Duration::from_micros(self.seed % (half.as_micros() as u64 + 1))
    }

    /// A readiness event on one of the cluster's tokens.
    pub fn on_event(
        &mut self,
        registry: &Registry,
        token: Token,
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        let attempt = match self.state {
            State::Connecting { attempt, .. } => attempt,
            State::Down { .. } => return,
            State::Up => 0,
        };
        let mut frames = Vec::new();
        let result = if token == COMMAND_TOKEN {
            self.command.on_ready(&mut frames)
        } else {
            self.subscriber.on_ready(&mut frames)
        };
        for frame in frames {
            if token == COMMAND_TOKEN {
                self.on_reply(frame, now, events);
            } else if let Err(e) = self.on_push(frame, now, events) {
                self.fail(registry, now, attempt, &e.to_string());
                return;
            }
        }
        if let Some(why) = self.broken.take() {
            self.fail(registry, now, attempt, &why);
            return;
        }
        if let Err(e) = result {
            self.fail(registry, now, attempt, &e.to_string());
        }
    }

    fn on_push(
        &mut self,
        frame: Frame,
        now: Instant,
        events: &mut Vec<Event>,
    ) -> Result<(), LinkError> {
        if self.subscriber.setup_replies > 0 {
            self.subscriber.setup_replies -= 1;
            if let Frame::Error(e) = frame {
                return Err(LinkError::Refused(e));
            }
            return Ok(());
        }
        let Frame::Array(Some(items)) = frame else {
            if let Frame::Error(e) = frame {
                return Err(LinkError::Refused(e));
            }
            return Ok(());
        };
        match items.first().and_then(Frame::as_bytes) {
            Some(b"message") => {
                if let Some(Frame::Bulk(Some(payload))) = items.into_iter().nth(2) {
                    events.push(Event::Message(payload));
                }
            }
            // Both channels confirmed.
            Some(b"subscribe") if matches!(items.get(2), Some(Frame::Integer(2))) => {
                self.subscribed = true;
                self.maybe_up(now, events);
            }
            _ => {}
        }
        Ok(())
    }

    /// Subscribed, and the command connection set up: the node is part of
    /// the cluster.
    fn maybe_up(&mut self, now: Instant, events: &mut Vec<Event>) {
        if self.state == State::Up || !self.subscribed || self.setup_left > 0 {
            return;
        }
        {
            self.state = State::Up;
            self.renew_at = now;
            crate::log::info!(
                "cluster: node {} joined via Redis at {}",
                self.node,
                self.addr
            );
            // Ids first: a user welcomed by the joins below may speak at once.
            self.ask_for_ids(now);
            let mut waiting = std::mem::take(&mut self.waiting);
            for join in &mut waiting {
                self.send_join(join, now);
            }
            self.waiting = waiting;
            // Removals first: a fetch after them must not find those
            // messages again.
            for op in std::mem::take(&mut self.unsent_acks) {
                self.store_command(op, now);
            }
            self.pump_migration(now);
            events.push(Event::Up);
        }
    }

    fn on_reply(&mut self, frame: Frame, now: Instant, events: &mut Vec<Event>) {
        let Some((expect, asked)) = self.expecting.pop_front() else {
            return;
        };
        self.observe_rtt(now.saturating_duration_since(asked));
        match expect {
            Expect::Nothing => {
                if let Frame::Error(e) = frame {
                    crate::log::warn!("cluster: Redis said {e}");
                }
            }
            Expect::Join(conn_id, name) => {
                let Some(i) = self
                    .waiting
                    .iter()
                    .position(|j| j.conn_id == conn_id && j.sent)
                else {
                    // It timed out meanwhile: give back a lease it was granted.
                    if frame == Frame::Bulk(None) {
                        self.release(&name, now);
                    }
                    return;
                };
                let Some(join) = self.waiting.remove(i) else {
                    return;
                };
                self.waiting_bytes -= join.early.len();
                match frame {
                    Frame::Bulk(None) => events.push(Event::JoinGranted(join)),
                    Frame::Bulk(Some(holder)) if holder == self.node.as_bytes() => {
                        // Ours already: the router decides (a local duplicate
                        // or, with a token, a local replacement).
                        events.push(Event::JoinGranted(join));
                    }
                    Frame::Bulk(Some(holder)) if join.verified => {
                        let name = join.name.clone();
                        let holder: Rc<str> = Rc::from(&*String::from_utf8_lossy(&holder));
                        self.take_over(&name, holder.clone(), now);
                        events.push(Event::TookOver(holder, name));
                        events.push(Event::JoinGranted(join));
                    }
                    Frame::Bulk(Some(_)) => events.push(Event::JoinRefused(join)),
                    _ => {
                        crate::log::warn!("cluster: unexpected reply to a join: {frame:?}");
                        events.push(Event::JoinTimedOut(join));
                    }
                }
            }
            Expect::Renew(names) => {
                let Frame::Array(Some(results)) = frame else {
                    crate::log::warn!("cluster: unexpected reply to a renewal: {frame:?}");
                    return;
                };
                for (name, result) in names.into_iter().zip(results) {
                    match result {
                        // Told before the lease is taken again (both go out
                        // at the end of this turn), so the router holds back
                        // what is published to it from then on.
                        Frame::Integer(0) => {
                            events.push(Event::LeaseMissing(name.clone()));
                            self.reclaim_one(name, now);
                        }
                        Frame::Integer(2) => events.push(Event::LeaseLost(name)),
                        _ => {}
                    }
                }
            }
            Expect::Ids => {
                self.ids_asked = false;
                match frame {
                    Frame::Integer(end) if end > 0 => events.push(Event::Ids(end as u64)),
                    other => crate::log::warn!("cluster: unexpected reply for ids: {other:?}"),
                }
            }
            Expect::Send(tag) => {
                events.push(Event::Sent(tag, self.store_reply(&frame, store::sent)))
            }
            // A fetch that fails is not taken for an empty outbox (later
            // acks would drop what it did not deliver): the link is made
            // again, and every local user's outbox fetched again with it.
            Expect::Fetch(name, generation) => match self.store_reply(&frame, store::fetched) {
                Ok(fetched) => events.push(Event::Fetched(name, generation, fetched)),
                Err(e) => self.broken = Some(format!("a fetch failed: {e}")),
            },
            Expect::JoinFetch(join, generation) => match self.store_reply(&frame, store::fetched) {
                Ok(fetched) => events.push(Event::JoinFetched(*join, generation, fetched)),
                Err(_) => {
                    self.stats.joins_timed_out += 1;
                    events.push(Event::JoinTimedOut(*join));
                }
            },
            Expect::TakeOver(name, holder) => {
                // Another node took the name between the join's answer and
                // the takeover: its session ends too.
                if let Frame::Bulk(Some(old)) = frame {
                    let old: Rc<str> = Rc::from(&*String::from_utf8_lossy(&old));
                    if old != holder && *old != *self.node {
                        events.push(Event::TookOver(old, name));
                    }
                }
            }
            Expect::Expire => {
                if let Ok(expired) = self.store_reply(&frame, store::expired) {
                    events.push(Event::Expired(expired));
                }
            }
            Expect::Migrate(i) => self.migrated(i, &frame, events, now),
            Expect::Setup => {
                if let Frame::Error(e) = frame {
                    self.broken = Some(format!("Redis refused the setup: {e}"));
                    return;
                }
                self.setup_left = self.setup_left.saturating_sub(1);
                self.maybe_up(now, events);
            }
            Expect::Store => {
                let _ = self.store_reply(&frame, not_an_error);
            }
            Expect::Size => {
                if let Frame::Array(Some(items)) = &frame {
                    let figure = |i: usize| {
                        items
                            .get(i)
                            .and_then(Frame::as_bytes)
                            .and_then(|b| std::str::from_utf8(b).ok())
                            .and_then(|t| t.parse::<i64>().ok())
                            .map_or(0, |n| n.max(0) as u64)
                    };
                    self.store_size = Some((figure(0), figure(1)));
                }
            }
            // Kept on an error too (it is sent again with the next link): a
            // removal that never happens is a message given twice.
            Expect::Ack(op) => {
                if self.store_reply(&frame, not_an_error).is_err() {
                    self.keep_ack(op);
                }
            }
            Expect::Reclaim(name) => match frame {
                // Ours again: what was sent while it was gone (or while this
                // node was not subscribed) was held, not published.
                Frame::Bulk(None) => events.push(Event::Reclaimed(name)),
                Frame::Bulk(Some(holder)) if holder == self.node.as_bytes() => {
                    events.push(Event::Reclaimed(name))
                }
                Frame::Bulk(Some(_)) => events.push(Event::LeaseLost(name)),
                // Not known: asked again with the next renewal; meanwhile
                // what is published to the user stays held back.
                other => {
                    crate::log::warn!("cluster: unexpected reply to a reclaim: {other:?}");
                    self.reclaim_later.push(name);
                }
            },
        }
    }

    /// Decodes a store reply; an error is logged, and a lost script (Redis
    /// restarted or flushed them) drops the link so the next one loads them.
    fn store_reply<T>(
        &mut self,
        frame: &Frame,
        decode: impl FnOnce(&Frame) -> Result<T, BadReply>,
    ) -> Result<T, BadReply> {
        if let Frame::Error(e) = frame {
            if e.starts_with("NOSCRIPT") {
                self.broken = Some("Redis lost the offline store's scripts".to_owned());
            }
        }
        let decoded = decode(frame);
        if let Err(e) = &decoded {
            crate::log::warn!("cluster: {e}");
        }
        decoded
    }

    fn observe_rtt(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = RTT_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(RTT_BUCKETS.len());
        self.stats.rtt_counts[i] += 1;
        self.stats.rtt_sum += secs;
    }

    /// Writes what the turn queued, one write per connection.
    pub fn flush(&mut self, registry: &Registry, now: Instant) {
        let attempt = match self.state {
            State::Connecting { attempt, .. } => attempt,
            State::Down { .. } => return,
            State::Up => 0,
        };
        if let Some(why) = self.broken.take() {
            self.fail(registry, now, attempt, &why);
            return;
        }
        let result = self.command.flush().and_then(|()| self.subscriber.flush());
        if let Err(e) = result {
            self.fail(registry, now, attempt, &e.to_string());
        }
    }

    /// The cluster's part of `/metrics`.
    pub fn render_metrics(&self, out: &mut String, remote: Option<&Remote>) {
        let _ = writeln!(
            out,
            "# HELP wschat_cluster_node_info This node's id.\n# TYPE wschat_cluster_node_info gauge\nwschat_cluster_node_info{{node=\"{}\"}} 1",
            self.node
        );
        let state = match self.state {
            State::Down { .. } => 0,
            State::Connecting { .. } => 1,
            State::Up => 2,
        };
        gauge(
            out,
            "wschat_cluster_redis_state",
            "Redis link: 0 down, 1 connecting, 2 up.",
            state,
        );
        gauge(
            out,
            "wschat_cluster_commands_in_flight",
            "Redis commands sent and not yet answered.",
            self.expecting.len() as u64,
        );
        gauge(
            out,
            "wschat_cluster_joins_waiting",
            "Connections waiting for their name's lease.",
            self.waiting.len() as u64,
        );
        counter(
            out,
            "wschat_cluster_commands_total",
            "Redis commands sent.",
            self.stats.commands,
        );
        counter(
            out,
            "wschat_cluster_reconnects_total",
            "Reconnections to Redis.",
            self.stats.reconnects,
        );
        counter(
            out,
            "wschat_cluster_shed_total",
            "Messages and joins not sent to Redis because it was unreachable or the queue full.",
            self.stats.shed,
        );
        counter(
            out,
            "wschat_cluster_joins_timed_out_total",
            "Joins closed with 1013 because Redis did not answer in time.",
            self.stats.joins_timed_out,
        );
        let _ = writeln!(
            out,
            "# HELP wschat_cluster_redis_rtt_seconds Redis command round trips.\n# TYPE wschat_cluster_redis_rtt_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, count) in self.stats.rtt_counts.iter().enumerate() {
            cumulative += count;
            let le = RTT_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "wschat_cluster_redis_rtt_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "wschat_cluster_redis_rtt_seconds_sum {}",
            self.stats.rtt_sum
        );
        let _ = writeln!(out, "wschat_cluster_redis_rtt_seconds_count {cumulative}");
        if let Some(remote) = remote {
            let s = remote.stats;
            counter(
                out,
                "wschat_cluster_messages_out_total",
                "Messages sent to other nodes.",
                s.messages_out,
            );
            counter(
                out,
                "wschat_cluster_messages_in_total",
                "Messages received from other nodes.",
                s.messages_in,
            );
            counter(
                out,
                "wschat_cluster_unavailable_total",
                "Messages refused with cluster_unavailable.",
                s.unavailable,
            );
            counter(
                out,
                "wschat_cluster_receipts_lost_total",
                "Privates whose store answer or receipt never came.",
                s.receipts_lost,
            );
            counter(
                out,
                "wschat_cluster_catchup_dropped_total",
                "Live privates not kept for a joining user (too many kept); fetched again from its outbox.",
                remote.catchup.dropped,
            );
            if let Some((messages, bytes)) = self.store_size {
                gauge(
                    out,
                    "wschat_cluster_store_messages",
                    "Private messages held in the store in Redis, cluster-wide (read once a second).",
                    messages,
                );
                gauge(
                    out,
                    "wschat_cluster_store_bytes",
                    "Bytes the store's quota counts, cluster-wide (read once a second).",
                    bytes,
                );
            }
            if let Some(m) = &self.migration {
                gauge(
                    out,
                    "wschat_cluster_migration_pending",
                    "Local-log messages not yet uploaded to the store.",
                    (m.entries.len() - m.answered) as u64,
                );
            }
            gauge(
                out,
                "wschat_cluster_peers",
                "Other nodes heard from.",
                remote.peers() as u64,
            );
            gauge(
                out,
                "wschat_cluster_remote_users",
                "Users online on other nodes.",
                remote.online() as u64,
            );
        }
    }
}

/// A reply that only says it worked (or not).
fn not_an_error(frame: &Frame) -> Result<(), BadReply> {
    match frame {
        Frame::Error(e) => Err(BadReply(e.clone())),
        _ => Ok(()),
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// 64 bits from the kernel (node ids must not collide across hosts).
fn random_seed() -> u64 {
    let mut bytes = [0u8; 8];
    let filled = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if filled && bytes != [0; 8] {
        return u64::from_le_bytes(bytes);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    now ^ (u64::from(std::process::id()) << 32) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(lease_secs: u64) -> Cluster {
        let settings = Settings {
            url: RedisUrl::parse("redis://127.0.0.1:1").unwrap(),
            prefix: "t".into(),
            lease: Duration::from_secs(lease_secs),
            quotas: Quotas {
                max_per_user: 10,
                max_bytes: 1000,
                max_per_sender: 10,
                max_bytes_per_sender: 1000,
                ttl_ms: u64::MAX,
                known_only: true,
            },
            max_known: 100,
        };
        let mut c = Cluster::new(settings, "127.0.0.1:1".parse().unwrap(), Instant::now());
        c.state = State::Up;
        c
    }

    fn join(conn_id: u64, name: &str, verified: bool) -> WaitingJoin {
        WaitingJoin::new(conn_id as usize, conn_id, name, "", verified, b"")
    }

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn backoff_doubles_to_five_seconds_with_jitter_in_the_upper_half() {
        let mut c = cluster(15);
        for attempt in 1..20 {
            let ceiling = BACKOFF_MIN
                .saturating_mul(1 << attempt.min(10))
                .min(BACKOFF_MAX);
            for _ in 0..50 {
                let d = c.backoff(attempt);
                assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
            }
        }
    }

    #[test]
    fn join_replies_grant_refuse_or_take_over() {
        let now = Instant::now();
        let mut c = cluster(15);
        let node = c.node().to_string();
        let cases = [
            (false, Frame::Bulk(None), "granted"),
            (false, bulk(&node), "granted"),
            (false, bulk("another"), "refused"),
            (true, bulk("another"), "took over"),
            (false, Frame::Error("ERR".into()), "timed out"),
        ];
        for (i, (verified, reply, expected)) in cases.into_iter().enumerate() {
            let id = i as u64;
            c.begin_join(join(id, "ann", verified), now).unwrap();
            let mut events = Vec::new();
            c.on_reply(reply, now, &mut events);
            let got = match events.as_slice() {
                [Event::JoinGranted(j)] if j.conn_id == id => "granted",
                [Event::JoinRefused(j)] if j.conn_id == id => "refused",
                [Event::JoinTimedOut(j)] if j.conn_id == id => "timed out",
                [Event::TookOver(holder, name), Event::JoinGranted(_)]
                    if &**holder == "another" && &**name == "ann" =>
                {
                    // The take-over is queued behind; a third node that
                    // took the name meanwhile is told too.
                    assert!(matches!(
                        c.expecting.back(),
                        Some((Expect::TakeOver(..), _))
                    ));
                    let mut more = Vec::new();
                    c.on_reply(bulk("third"), now, &mut more);
                    assert!(
                        matches!(more.as_slice(), [Event::TookOver(n, _)] if &**n == "third"),
                        "{more:?}"
                    );
                    "took over"
                }
                other => panic!("case {i}: {other:?}"),
            };
            assert_eq!(got, expected, "case {i}");
            assert!(c.waiting.is_empty() && c.expecting.is_empty(), "case {i}");
        }
    }

    #[test]
    fn a_lease_granted_after_its_join_timed_out_is_given_back() {
        let now = Instant::now();
        let mut c = cluster(15);
        c.begin_join(join(1, "ann", false), now).unwrap();
        let mut events = Vec::new();
        c.tick(
            &mio::Poll::new().unwrap().registry().try_clone().unwrap(),
            now + Duration::from_secs(6),
            &mut events,
        );
        assert!(matches!(events.as_slice(), [Event::JoinTimedOut(_)]));
        c.state = State::Up; // the reply timeout dropped the link; say it is back
        c.expecting
            .push_back((Expect::Join(1, Rc::from("ann")), now));
        c.on_reply(Frame::Bulk(None), now, &mut events);
        assert!(
            matches!(c.expecting.back(), Some((Expect::Nothing, _))),
            "a compare-and-delete follows"
        );
    }

    #[test]
    fn a_lost_lease_is_taken_again_or_reported() {
        let mut c = cluster(15);
        let now = Instant::now();
        let names = [Rc::from("ann")];
        assert!(c.renew(names.iter(), now));
        assert!(!c.renew(names.iter(), now), "once a third of the lease");
        let mut events = Vec::new();
        c.on_reply(
            Frame::Array(Some(vec![Frame::Integer(0)])),
            now,
            &mut events,
        );
        assert!(matches!(c.expecting.back(), Some((Expect::Reclaim(n), _)) if &**n == "ann"));
        // The router hears it is missing before the reclaim is even sent.
        assert!(matches!(events.as_slice(), [Event::LeaseMissing(n)] if &**n == "ann"));
        events.clear();
        c.on_reply(bulk("another"), now, &mut events);
        assert!(matches!(events.as_slice(), [Event::LeaseLost(n)] if &**n == "ann"));
        // Taken again (free, or ours): the outbox is fetched again.
        for reply in [Frame::Bulk(None), bulk(&c.node.clone())] {
            events.clear();
            c.reclaim_one(Rc::from("ann"), now);
            c.on_reply(reply, now, &mut events);
            assert!(matches!(events.as_slice(), [Event::Reclaimed(n)] if &**n == "ann"));
        }
    }

    #[test]
    fn the_link_is_up_only_once_redis_answers_its_setup() {
        let now = Instant::now();
        let subscribed = || {
            Frame::Array(Some(vec![
                bulk("subscribe"),
                bulk("t:node:x"),
                Frame::Integer(2),
            ]))
        };
        let connecting = || {
            let mut c = cluster(15);
            c.state = State::Connecting {
                since: now,
                attempt: 0,
            };
            c.setup_left = 2;
            c.expecting.push_back((Expect::Setup, now));
            c.expecting.push_back((Expect::Setup, now));
            c
        };
        // Subscribed first, then the setup answered: up at the last answer.
        let mut c = connecting();
        let mut events = Vec::new();
        c.on_push(subscribed(), now, &mut events).unwrap();
        assert!(!c.is_up(), "subscriptions work while Redis loads");
        c.on_reply(bulk("OK"), now, &mut events);
        assert!(!c.is_up());
        c.on_reply(bulk("sha"), now, &mut events);
        assert!(c.is_up());
        assert!(matches!(events.last(), Some(Event::Up)));
        // A Redis still loading its data: the link is made again later.
        let mut c = connecting();
        c.on_push(subscribed(), now, &mut events).unwrap();
        c.on_reply(
            Frame::Error("LOADING Redis is loading the dataset in memory".into()),
            now,
            &mut events,
        );
        assert!(!c.is_up());
        assert!(c.broken.as_deref().is_some_and(|b| b.contains("LOADING")));
        // A removal refused is kept for the next link; a reclaim refused
        // is not a lost lease.
        let mut c = cluster(15);
        let ack = StoreOp::Ack {
            name: Rc::from("bob"),
            from: 1,
            to: 1,
        };
        c.store_command(ack.clone(), now);
        c.reclaim_one(Rc::from("bob"), now);
        events.clear();
        c.on_reply(Frame::Error("OOM".into()), now, &mut events);
        c.on_reply(Frame::Error("LOADING".into()), now, &mut events);
        assert_eq!(c.unsent_acks, vec![ack]);
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(c.reclaim_later, vec![Rc::from("bob")], "asked again later");
        // A renewal that finds another node holding a name: that session is over.
        assert!(c.renew([Rc::from("bob"), Rc::from("cy")].iter(), Instant::now()));
        c.expecting.retain(|(e, _)| matches!(e, Expect::Renew(_)));
        c.on_reply(
            Frame::Array(Some(vec![Frame::Integer(2), Frame::Integer(1)])),
            now,
            &mut events,
        );
        assert!(matches!(events.as_slice(), [Event::LeaseLost(n)] if &**n == "bob"));
        // A fetch refused is no empty outbox: the link is made again; a
        // join's is a join that could not happen (1013).
        events.clear();
        let mut c = cluster(15);
        c.store_command(
            StoreOp::Fetch {
                name: Rc::from("bob"),
                after: 0,
                ack: false,
                generation: 1,
            },
            now,
        );
        c.on_reply(Frame::Error("BUSY".into()), now, &mut events);
        assert!(events.is_empty());
        assert!(c.broken.is_some());
        c.fetch_for_join(join(1, "cy", false), (0, false, 1), now)
            .unwrap();
        c.on_reply(Frame::Error("OOM".into()), now, &mut events);
        assert!(matches!(events.as_slice(), [Event::JoinTimedOut(j)] if &*j.name == "cy"));
    }

    #[test]
    fn removals_and_privates_lost_with_the_link_are_redone_or_reported() {
        let mut c = cluster(15);
        let now = Instant::now();
        let registry = mio::Poll::new().unwrap();
        let registry = registry.registry();
        let ack = StoreOp::Ack {
            name: Rc::from("bob"),
            from: 5,
            to: 5,
        };
        c.store_command(ack.clone(), now);
        let carried = remote::Carried {
            tag: 7,
            id: 1,
            ts: 1,
            from: "ann".into(),
            to: "bob".into(),
            body: "x".into(),
        };
        c.store_command(
            StoreOp::Send {
                carried: carried.clone(),
                online: true,
                payload: String::new(),
            },
            now,
        );
        c.fail(registry, now, 0, "test");
        // While down: a removal waits, a private is refused.
        let mut remote = Remote::new("me");
        remote.store(ack.clone());
        remote.up = true;
        assert!(remote.store_private(remote::Carried { tag: 0, ..carried }, true, None, 0));
        c.send_outgoing(&mut remote, now);
        assert_eq!(c.unsent_acks, vec![ack.clone(), ack.clone()]);
        let mut events = Vec::new();
        c.tick(registry, now, &mut events);
        let told: Vec<String> = events
            .iter()
            .filter_map(|e| match e {
                Event::NotSent(tag) => Some(format!("not sent {tag}")),
                Event::Unconfirmed(tag) => Some(format!("unconfirmed {tag}")),
                _ => None,
            })
            .collect();
        assert_eq!(told, ["not sent 1", "unconfirmed 7"]);
        // Back up: the removals go first.
        c.state = State::Connecting {
            since: now,
            attempt: 1,
        };
        c.subscriber.setup_replies = 0;
        let subscribed = Frame::Array(Some(vec![
            bulk("subscribe"),
            bulk("t:node:x"),
            Frame::Integer(2),
        ]));
        c.on_push(subscribed, now, &mut events).unwrap();
        assert!(c.unsent_acks.is_empty());
        let acks = c
            .expecting
            .iter()
            .filter(|(e, _)| matches!(e, Expect::Ack(op) if *op == ack))
            .count();
        assert_eq!(acks, 2);
    }

    #[test]
    fn leases_are_renewed_in_batches_of_a_thousand() {
        let mut c = cluster(15);
        let now = Instant::now();
        let names: Vec<Rc<str>> = (0..2500).map(|i| Rc::from(format!("u{i}"))).collect();
        assert!(c.renew(names.iter(), now));
        let sizes: Vec<usize> = c
            .expecting
            .iter()
            .map(|(e, _)| match e {
                Expect::Renew(batch) => batch.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
        // Only the lost ones are taken again.
        let mut results = vec![Frame::Integer(1); 1000];
        results[7] = Frame::Integer(0);
        c.on_reply(Frame::Array(Some(results)), now, &mut Vec::new());
        assert!(matches!(c.expecting.back(), Some((Expect::Reclaim(n), _)) if &**n == "u7"));
        assert_eq!(c.expecting.len(), 3);
    }

    #[test]
    fn ids_are_asked_for_once_and_granted() {
        let now = Instant::now();
        let mut c = cluster(15);
        c.id_floor = 5_000;
        c.ask_for_ids(now);
        c.ask_for_ids(now);
        assert_eq!(c.expecting.len(), 1, "one request at a time");
        let mut events = Vec::new();
        c.on_reply(Frame::Integer(7_000_000), now, &mut events);
        assert!(matches!(events.as_slice(), [Event::Ids(7_000_000)]));
        c.ask_for_ids(now);
        assert_eq!(c.expecting.len(), 1, "asked again once answered");
    }

    #[test]
    fn waiting_joins_are_bounded() {
        let now = Instant::now();
        let mut c = cluster(15);
        c.state = State::Down {
            retry_at: now,
            attempt: 1,
        };
        for i in 0..MAX_WAITING_JOINS as u64 {
            assert!(c.begin_join(join(i, "n", false), now).is_ok());
        }
        assert!(c.begin_join(join(0, "n", false), now).is_err());
        let mut c = cluster(15);
        let big = WaitingJoin::new(1, 1, "n", "", false, &vec![0; MAX_WAITING_BYTES + 1]);
        assert!(
            c.begin_join(big, now).is_err(),
            "early bytes are bounded too"
        );
    }
}
