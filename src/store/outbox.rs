//! Every user's outbox, in memory: private messages held until they are
//! acknowledged (reliable clients), written to a live connection (simple
//! clients), or expire. No I/O: each change is also encoded as a log record
//! into `pending`, which the event loop appends to disk once per turn.

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;

use super::record::{Record, FRAME_OVERHEAD, SEQ_LIMIT};

/// Sequence numbers are reserved on disk this many at a time, so a live
/// delivery costs no log write while a restart still never reuses one.
const SEQ_BLOCK: u64 = 1024;

/// Memory counted per held message beyond its strings.
const ENTRY_OVERHEAD: usize = 64;

/// Memory counted per tracked name beyond the name: its sequence counter is
/// kept for good, so it counts against `--offline-max-bytes` too.
const USER_OVERHEAD: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_per_user: usize,
    pub max_bytes: usize,
    pub ttl_ms: u64,
    /// Names remembered as users (`--max-known-users`).
    pub max_known_users: usize,
}

/// What [`Outboxes::remember`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remembered {
    New,
    AlreadyKnown,
    /// `--max-known-users` names are remembered: this one is not.
    Full,
}

/// A held private message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub id: u64,
    pub ts: u64,
    pub from: Rc<str>,
    pub body: String,
    /// The sender has been told it was delivered.
    pub notified: bool,
}

impl Entry {
    fn cost(&self) -> usize {
        self.body.len() + self.from.len() + ENTRY_OVERHEAD
    }
}

#[derive(Debug)]
struct UserBox {
    name: Rc<str>,
    /// The next sequence number to give out.
    next_seq: u64,
    /// Numbers below this are reserved on disk.
    floor: u64,
    entries: VecDeque<Entry>,
}

/// A user's box, for a caller that keeps it to skip the name lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoxId(usize);

/// Why a message could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    User,
    Store,
}

#[derive(Debug)]
pub struct Outboxes {
    limits: Limits,
    /// Every user's box; boxes are never removed, so a [`BoxId`] stays valid.
    boxes: Vec<UserBox>,
    by_name: HashMap<Rc<str>, usize>,
    /// (expires at, user, seq) in expiry order.
    expiry: VecDeque<(u64, Rc<str>, u64)>,
    held: usize,
    held_bytes: usize,
    /// What the tracked names themselves cost.
    names_bytes: usize,
    /// Names that connected: only these may be sent offline messages
    /// (unless the router says otherwise). Persisted as `Known` records.
    known: HashSet<Rc<str>>,
    /// What the known names cost in the log.
    known_bytes: usize,
    /// Encoded records not yet handed to the log.
    pending: Vec<u8>,
    /// The largest message id held (ids must keep growing across restarts).
    pub max_id: u64,
}

impl Outboxes {
    pub fn new(limits: Limits) -> Outboxes {
        Outboxes {
            limits,
            boxes: Vec::new(),
            by_name: HashMap::new(),
            expiry: VecDeque::new(),
            held: 0,
            held_bytes: 0,
            names_bytes: 0,
            known: HashSet::new(),
            known_bytes: 0,
            pending: Vec::new(),
            max_id: 0,
        }
    }

    /// Messages held, and their bytes.
    pub fn held(&self) -> (usize, usize) {
        (self.held, self.held_bytes)
    }

    /// Remembers `user` as a user (it connected), up to `max_known_users`.
    pub fn remember(&mut self, user: &str) -> Remembered {
        if self.known.contains(user) {
            return Remembered::AlreadyKnown;
        }
        if !self.insert_known(user) {
            return Remembered::Full;
        }
        Record::Known {
            user: user.to_owned(),
        }
        .encode(&mut self.pending);
        Remembered::New
    }

    fn insert_known(&mut self, user: &str) -> bool {
        if self.known.len() >= self.limits.max_known_users {
            return false;
        }
        self.known_bytes += FRAME_OVERHEAD + 5 + user.len();
        self.known.insert(Rc::from(user))
    }

    /// Whether `user` ever connected (as far as the log remembers).
    pub fn is_known(&self, user: &str) -> bool {
        self.known.contains(user)
    }

    /// How many names are remembered.
    pub fn known_users(&self) -> usize {
        self.known.len()
    }

    /// The box of `user`, created (and counted) on first use.
    pub fn box_id(&mut self, user: &str) -> BoxId {
        if let Some(&at) = self.by_name.get(user) {
            return BoxId(at);
        }
        self.names_bytes += USER_OVERHEAD + user.len();
        let name: Rc<str> = Rc::from(user);
        self.boxes.push(UserBox {
            name: name.clone(),
            next_seq: 1,
            floor: 0,
            entries: VecDeque::new(),
        });
        self.by_name.insert(name, self.boxes.len() - 1);
        BoxId(self.boxes.len() - 1)
    }

    fn user_box(&mut self, user: &str) -> &mut UserBox {
        let BoxId(at) = self.box_id(user);
        &mut self.boxes[at]
    }

    fn find(&self, user: &str) -> Option<&UserBox> {
        self.by_name.get(user).and_then(|&at| self.boxes.get(at))
    }

    fn find_mut(&mut self, user: &str) -> Option<&mut UserBox> {
        let at = *self.by_name.get(user)?;
        self.boxes.get_mut(at)
    }

    /// Gives out `user`'s next sequence number.
    pub fn next_seq(&mut self, user: &str) -> u64 {
        let id = self.box_id(user);
        self.next_seq_in(id)
    }

    /// Gives out the next sequence number of the box `id` (no name lookup:
    /// the router keeps the ids of online users' boxes).
    pub fn next_seq_in(&mut self, BoxId(at): BoxId) -> u64 {
        let Some(b) = self.boxes.get_mut(at) else {
            debug_assert!(false, "boxes are never removed");
            return 0;
        };
        // Numbers end at SEQ_LIMIT, which no server reaches: past it the
        // last one is given again, not one that the log would refuse.
        let seq = b.next_seq.min(SEQ_LIMIT - 1);
        b.next_seq = seq + 1;
        if b.next_seq > b.floor {
            b.floor = (b.next_seq + SEQ_BLOCK).min(SEQ_LIMIT);
            let record = Record::SeqFloor {
                user: b.name.to_string(),
                next: b.floor,
            };
            record.encode(&mut self.pending);
        }
        seq
    }

    /// Takes back `seq`, the last number given out from box `id`, for a
    /// message that was refused before anyone saw it, so the recipient's
    /// numbering has no hole. (The floor record already written stays: it is
    /// only an upper bound.)
    pub fn take_back_seq(&mut self, BoxId(at): BoxId, seq: u64) {
        if let Some(b) = self.boxes.get_mut(at) {
            if b.next_seq == seq + 1 {
                b.next_seq = seq;
            }
        }
    }

    /// The last sequence number given out for `user` (0: none).
    pub fn last_seq(&self, user: &str) -> u64 {
        self.find(user).map_or(0, |b| b.next_seq.saturating_sub(1))
    }

    /// Checks the quotas for one more message of `body_len` bytes.
    pub fn check_room(&self, user: &str, from_len: usize, body_len: usize) -> Result<(), Full> {
        if self
            .find(user)
            .is_some_and(|b| b.entries.len() >= self.limits.max_per_user)
        {
            return Err(Full::User);
        }
        let new_name = if self.by_name.contains_key(user) {
            0
        } else {
            USER_OVERHEAD + user.len()
        };
        let after =
            self.held_bytes + self.names_bytes + new_name + body_len + from_len + ENTRY_OVERHEAD;
        if after > self.limits.max_bytes {
            return Err(Full::Store);
        }
        Ok(())
    }

    /// Holds a message for `user` (the caller checked the quotas).
    pub fn hold(&mut self, user: &str, entry: Entry) {
        let record = Record::Store {
            user: user.to_owned(),
            seq: entry.seq,
            id: entry.id,
            ts: entry.ts,
            from: entry.from.to_string(),
            body: entry.body.clone(),
            notified: entry.notified,
        };
        record.encode(&mut self.pending);
        self.insert(user, entry);
    }

    fn insert(&mut self, user: &str, entry: Entry) {
        self.held += 1;
        self.held_bytes += entry.cost();
        self.max_id = self.max_id.max(entry.id);
        let expires = entry.ts.saturating_add(self.limits.ttl_ms);
        let seq = entry.seq;
        let b = self.user_box(user);
        b.next_seq = b.next_seq.max(entry.seq + 1);
        b.entries.push_back(entry);
        let name = b.name.clone();
        self.expiry.push_back((expires, name, seq));
    }

    /// The messages held for `user` after `seq`, oldest first.
    pub fn held_after(&self, user: &str, seq: u64) -> impl Iterator<Item = &Entry> {
        self.find(user)
            .into_iter()
            .flat_map(move |b| b.entries.iter().filter(move |e| e.seq > seq))
    }

    /// Records that the sender of `user`'s message `seq` was told it arrived.
    pub fn mark_notified(&mut self, user: &str, seq: u64) {
        if let Some(e) = self
            .find_mut(user)
            .and_then(|b| b.entries.iter_mut().find(|e| e.seq == seq))
        {
            e.notified = true;
            Record::Notified {
                user: user.to_owned(),
                seq,
            }
            .encode(&mut self.pending);
        }
    }

    /// Drops `user`'s messages up to `seq`. Returns how many.
    pub fn ack(&mut self, user: &str, seq: u64) -> usize {
        // Field by field: the counters below change while `b` is held.
        let Some(b) = self
            .by_name
            .get(user)
            .and_then(|&at| self.boxes.get_mut(at))
        else {
            return 0;
        };
        let mut dropped = 0;
        while b.entries.front().is_some_and(|e| e.seq <= seq) {
            if let Some(e) = b.entries.pop_front() {
                self.held -= 1;
                self.held_bytes -= e.cost();
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.prune_expiry();
            Record::Ack {
                user: user.to_owned(),
                seq,
            }
            .encode(&mut self.pending);
        }
        dropped
    }

    /// The expiry queue keeps entries of acknowledged messages until their
    /// time comes; rebuild it when those dominate, so a busy reliable client
    /// cannot grow it without bound.
    fn prune_expiry(&mut self) {
        if self.expiry.len() > 2 * self.held + 1024 {
            self.rebuild_expiry();
        }
    }

    /// The expiry queue from the held messages, in time order.
    fn rebuild_expiry(&mut self) {
        let ttl = self.limits.ttl_ms;
        let mut expiry: Vec<_> = self
            .boxes
            .iter()
            .flat_map(|b| {
                b.entries
                    .iter()
                    .map(move |e| (e.ts.saturating_add(ttl), b.name.clone(), e.seq))
            })
            .collect();
        expiry.sort();
        self.expiry = expiry.into();
    }

    /// When the oldest held message expires (Unix ms).
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiry.front().map(|(at, _, _)| *at)
    }

    /// Removes the messages whose time to live has passed; returns each
    /// with its recipient.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(Rc<str>, Entry)> {
        let mut expired = Vec::new();
        while let Some((at, user, seq)) = self.expiry.front().cloned() {
            if at > now_ms {
                break;
            }
            self.expiry.pop_front();
            let Some(b) = self.find_mut(&user) else {
                continue;
            };
            // A user's messages expire in order, so a live one is at the front.
            if b.entries.front().is_some_and(|e| e.seq == seq) {
                if let Some(e) = b.entries.pop_front() {
                    self.held -= 1;
                    self.held_bytes -= e.cost();
                    Record::Expire {
                        user: user.to_string(),
                        seq,
                    }
                    .encode(&mut self.pending);
                    expired.push((user, e));
                }
            }
        }
        expired
    }

    /// Takes the records produced since the last call.
    pub fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// Rebuilds state from a record read back from the log.
    pub fn replay(&mut self, record: Record) {
        match record {
            Record::Store {
                user,
                seq,
                id,
                ts,
                from,
                body,
                notified,
            } => {
                let entry = Entry {
                    seq,
                    id,
                    ts,
                    from: Rc::from(from),
                    body,
                    notified,
                };
                self.insert(&user, entry);
            }
            Record::Notified { user, seq } => {
                if let Some(e) = self
                    .find_mut(&user)
                    .and_then(|b| b.entries.iter_mut().find(|e| e.seq == seq))
                {
                    e.notified = true;
                }
            }
            Record::Ack { user, seq } | Record::Expire { user, seq } => {
                let found = self.by_name.get(user.as_str());
                if let Some(b) = found.and_then(|&at| self.boxes.get_mut(at)) {
                    while b.entries.front().is_some_and(|e| e.seq <= seq) {
                        if let Some(e) = b.entries.pop_front() {
                            self.held -= 1;
                            self.held_bytes -= e.cost();
                        }
                    }
                }
            }
            Record::SeqFloor { user, next } => {
                let b = self.user_box(&user);
                b.floor = b.floor.max(next);
                b.next_seq = b.next_seq.max(next);
            }
            Record::Known { user } => {
                if !self.known.contains(user.as_str()) {
                    self.insert_known(&user);
                }
            }
        }
    }

    /// After replay: give out numbers from the reserved floor on (some below
    /// it may have been used before a crash) and put expiries in time order.
    pub fn finish_replay(&mut self) {
        for b in &mut self.boxes {
            b.next_seq = b.next_seq.max(b.floor).max(1);
        }
        self.rebuild_expiry();
        self.pending.clear();
    }

    /// After a replay that lost records (damage inside the log): numbers up
    /// to one block past a box's last floor that was read may have been
    /// given out under the floor record that followed it, which may be among
    /// the lost ones, so every box continues one block further on. (A name
    /// whose every record was lost is unknown, and starts again from 1.)
    pub fn after_lost_records(&mut self) {
        for b in &mut self.boxes {
            b.next_seq = (b.next_seq.max(b.floor) + SEQ_BLOCK + 1).min(SEQ_LIMIT);
        }
    }

    /// The records that rebuild the current state: the compacted log. The
    /// exact next sequence numbers are recorded (so a clean restart skips
    /// none) and the next number given out reserves a new block first.
    pub fn snapshot(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for user in &self.known {
            Record::Known {
                user: user.to_string(),
            }
            .encode(&mut out);
        }
        for b in &mut self.boxes {
            let user = &b.name;
            b.next_seq = b.next_seq.max(1);
            b.floor = b.next_seq;
            Record::SeqFloor {
                user: user.to_string(),
                next: b.next_seq,
            }
            .encode(&mut out);
            for e in &b.entries {
                Record::Store {
                    user: user.to_string(),
                    seq: e.seq,
                    id: e.id,
                    ts: e.ts,
                    from: e.from.to_string(),
                    body: e.body.clone(),
                    notified: e.notified,
                }
                .encode(&mut out);
            }
        }
        out
    }

    /// About the size of [`snapshot`](Self::snapshot), for the compaction threshold.
    pub fn live_log_bytes(&self) -> usize {
        self.held_bytes + self.names_bytes + self.boxes.len() * FRAME_OVERHEAD + self.known_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outboxes() -> Outboxes {
        Outboxes::new(Limits {
            max_per_user: 3,
            max_bytes: 10_000,
            ttl_ms: 1000,
            max_known_users: usize::MAX,
        })
    }

    fn entry(o: &mut Outboxes, user: &str, id: u64, ts: u64) -> Entry {
        Entry {
            seq: o.next_seq(user),
            id,
            ts,
            from: Rc::from("alice"),
            body: format!("m{id}"),
            notified: false,
        }
    }

    fn replayed(bytes: &[u8], limits: Limits) -> Outboxes {
        let mut o = Outboxes::new(limits);
        let mut pos = 0;
        while pos < bytes.len() {
            let (r, used) = Record::decode(&bytes[pos..]).unwrap();
            o.replay(r);
            pos += used;
        }
        o.finish_replay();
        o
    }

    #[test]
    fn holds_acks_and_replays_in_order() {
        let mut o = outboxes();
        let mut log = Vec::new();
        for id in 1..=3 {
            let e = entry(&mut o, "bob", id, 100);
            o.hold("bob", e);
        }
        assert_eq!(o.check_room("bob", 5, 2), Err(Full::User));
        assert_eq!(
            o.held_after("bob", 1).map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(o.ack("bob", 2), 2);
        assert_eq!(o.ack("bob", 2), 0);
        log.extend(o.take_pending());
        let back = replayed(&log, o.limits);
        assert_eq!(
            back.held_after("bob", 0).map(|e| e.seq).collect::<Vec<_>>(),
            vec![3]
        );
        assert_eq!(back.held(), o.held());
    }

    #[test]
    fn sequence_numbers_survive_a_restart_without_reuse() {
        let mut o = outboxes();
        for _ in 0..5 {
            o.next_seq("bob");
        }
        let log = o.take_pending();
        let mut back = replayed(&log, o.limits);
        assert!(back.next_seq("bob") > 5);
        assert_eq!(replayed(&[], o.limits).boxes.len(), 0);
        let mut fresh = outboxes();
        assert_eq!(fresh.next_seq("carol"), 1);
        assert_eq!(fresh.next_seq("carol"), 2);
    }

    #[test]
    fn a_lost_floor_record_does_not_bring_numbers_back() {
        let mut o = outboxes();
        let given = 2 * SEQ_BLOCK + 10;
        for _ in 0..given {
            o.next_seq("bob");
        }
        // Every record but the last floor.
        let mut records = crate::store::replay::Replay::read(&o.take_pending()).records;
        assert!(records.len() >= 2, "{records:?}");
        records.pop();
        let mut back = Outboxes::new(o.limits);
        for r in records {
            back.replay(r);
        }
        back.finish_replay();
        assert!(back.last_seq("bob") < given, "the loss is visible");
        back.after_lost_records();
        assert!(back.next_seq("bob") > given);
    }

    #[test]
    fn expiry_removes_in_time_order_and_skips_acked() {
        let mut o = outboxes();
        for (id, ts) in [(1, 100), (2, 200), (3, 300)] {
            let e = entry(&mut o, "bob", id, ts);
            o.hold("bob", e);
        }
        o.ack("bob", 1);
        assert_eq!(o.next_expiry(), Some(1100));
        let gone = o.expire(1250);
        assert_eq!(gone.iter().map(|(_, e)| e.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(o.held().0, 1);
        let back = replayed(&o.take_pending(), o.limits);
        assert_eq!(back.held().0, 1);
    }

    #[test]
    fn store_wide_byte_quota() {
        let mut o = Outboxes::new(Limits {
            max_per_user: 100,
            max_bytes: 300,
            ttl_ms: 1000,
            max_known_users: usize::MAX,
        });
        let e = entry(&mut o, "bob", 1, 1);
        assert_eq!(o.check_room("bob", 5, 100), Ok(()));
        o.hold("bob", e);
        assert_eq!(o.check_room("carol", 5, 100), Err(Full::Store));
    }

    #[test]
    fn snapshot_rebuilds_the_same_state() {
        let mut o = outboxes();
        for (user, id) in [("bob", 1), ("bob", 2), ("carol", 3)] {
            let e = entry(&mut o, user, id, 10);
            o.hold(user, e);
        }
        o.ack("bob", 1);
        let snapshot = o.snapshot();
        let back = replayed(&snapshot, o.limits);
        assert_eq!(back.held(), o.held());
        assert_eq!(
            back.held_after("bob", 0).map(|e| e.id).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!(back.max_id, 3);
    }

    #[test]
    fn the_highest_sequence_numbers_replay_and_write_back() {
        // Found by the log_replay fuzz target: a Store of seq 2^63, once
        // accepted, replayed into a state whose snapshot (SeqFloor 2^63 + 1)
        // did not read back; so did a floor of 2^63 after a replay that
        // lost records.
        let mut log = Vec::new();
        Record::Store {
            user: "bob".into(),
            seq: SEQ_LIMIT - 1,
            id: 1,
            ts: 1,
            from: "alice".into(),
            body: "hi".into(),
            notified: false,
        }
        .encode(&mut log);
        Record::SeqFloor {
            user: "carol".into(),
            next: SEQ_LIMIT,
        }
        .encode(&mut log);
        let mut o = replayed(&log, outboxes().limits);
        o.after_lost_records();
        let snapshot = o.snapshot();
        let mut back = replayed(&snapshot, o.limits);
        assert_eq!(back.snapshot(), snapshot);
        assert_eq!(back.last_seq("bob"), SEQ_LIMIT - 1);
        // At the end of the numbers, the last one is given again.
        assert_eq!(back.next_seq("carol"), SEQ_LIMIT - 1);
        assert_eq!(back.next_seq("carol"), SEQ_LIMIT - 1);
        replayed(&back.take_pending(), o.limits);
        replayed(&back.snapshot(), o.limits);
    }
}
