//! The one interface for held private messages, whichever store holds them:
//! the local [`Outboxes`] (one process, in memory, logged to disk) or the
//! cluster's store in Redis (`cluster::store`, under `--cluster`). What both
//! must do is written once, in [`contract`], and run against each: the local
//! store by the unit test below, the Redis one by `tests/redis_store.rs`
//! against a real `redis-server` (through an adapter in `tests/support/`).
//!
//! Synchronous: the local store answers at once, and the test adapter of the
//! Redis store waits for each reply (the node sends the same commands through
//! its event loop instead).

use std::rc::Rc;

use super::outbox::{Entry, Full, Outboxes, Remembered};
pub use crate::cluster::store::{Expired, Fetched, Held};

/// A private message to hold.
#[derive(Debug, Clone, Copy)]
pub struct Mail<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub id: u64,
    /// When it was sent (Unix ms): given to the recipient with it.
    pub ts: u64,
    pub body: &'a str,
}

/// Why a message was not held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A quota is reached; which one decides what the sender is told.
    Full(Full),
    /// Nobody ever connected under the name and only names that did may be
    /// sent to (`unknown_user`): strangers' names cannot fill the store.
    Unknown,
}

/// Held mail: what the router asks of an offline store.
pub trait Mailbox {
    /// Holds `mail` for `mail.to` and returns its number, drawn from the
    /// store's one counter: numbers only grow, for each recipient and over
    /// all of them, so a client's resume point never skips a later message.
    /// Refused, before anything is numbered, for a name that never connected
    /// when `known_only` (no `--offline-to-unknown`, or a lookalike name), or
    /// when a quota is reached: the recipient's count, then the store's
    /// bytes, then the sender's share (so a full store is reported as full
    /// to everyone, whatever their share).
    ///
    /// The time to live runs from `now_ms` in Redis and from `mail.ts` in the
    /// local store; the router gives both the same.
    fn send(&mut self, mail: &Mail<'_>, known_only: bool, now_ms: u64) -> Result<u64, Refusal>;

    /// What is held for `name` numbered above `after`, in number order (the
    /// Redis store answers [`FETCH_BATCH`](crate::cluster::store::FETCH_BATCH)
    /// at most; the caller fetches again after the last). With `ack` (a
    /// reliable client's `resume`), what is at or below `after` is dropped
    /// first. A point above anything the store ever handed out (a client
    /// kept a number from before the store lost its data) acknowledges
    /// nothing and is answered as 0: everything held is given again rather
    /// than dropped unread.
    fn fetch(&mut self, name: &str, after: u64, ack: bool) -> Fetched;

    /// Drops what `name` holds numbered `from..=to`: `0..=N` for a reliable
    /// client's cumulative `ack N`, `N..=N` for one message written to a
    /// simple client. Returns how many. Frees their share of every quota.
    fn ack(&mut self, name: &str, from: u64, to: u64) -> usize;

    /// Drops what passed its time to live by `now_ms` and returns it, so
    /// the senders can be told (the Redis store answers
    /// [`EXPIRE_BATCH`](crate::cluster::store::EXPIRE_BATCH) at most a call).
    fn expire(&mut self, now_ms: u64) -> Vec<Expired>;

    /// `name` connected: from now on it may be sent to when `known_only`
    /// (up to `--max-known-users` names).
    fn remember(&mut self, name: &str) -> Remembered;
}

impl From<&Entry> for Held {
    fn from(e: &Entry) -> Held {
        Held {
            seq: e.seq,
            id: e.id,
            ts: e.ts,
            from: e.from.to_string(),
            body: e.body.clone(),
            notified: e.notified,
        }
    }
}

/// The local store, in terms of the methods the router calls today.
impl Mailbox for Outboxes {
    fn send(&mut self, mail: &Mail<'_>, known_only: bool, _now_ms: u64) -> Result<u64, Refusal> {
        if known_only && !self.is_known(mail.to) {
            return Err(Refusal::Unknown);
        }
        self.check_room(mail.to, mail.from, mail.body.len())
            .map_err(Refusal::Full)?;
        let seq = self.next_seq();
        let entry = Entry {
            seq,
            id: mail.id,
            ts: mail.ts,
            from: Rc::from(mail.from),
            body: mail.body.to_owned(),
            notified: false,
        };
        self.hold(mail.to, entry);
        Ok(seq)
    }

    fn fetch(&mut self, name: &str, after: u64, ack: bool) -> Fetched {
        // As `Router::replay`: a point beyond the counter means lost data.
        let after = if after <= self.last_seq() { after } else { 0 };
        if ack {
            Outboxes::ack(self, name, after);
        }
        let held = self.held_after(name, after).map(Held::from).collect();
        Fetched { after, held }
    }

    fn ack(&mut self, name: &str, from: u64, to: u64) -> usize {
        if from > to {
            return 0;
        }
        let first = self.held_after(name, 0).next().map(|e| e.seq);
        if first.is_none_or(|first| first >= from) {
            // Nothing held below the range: a cumulative ack, logged.
            return Outboxes::ack(self, name, to);
        }
        // A range inside the box. The log records only cumulative acks, so
        // this removal is in memory only: after a restart these messages
        // are held again until an ack covers them (given twice, not lost).
        let inside: Vec<u64> = self
            .held_after(name, from - 1)
            .map(|e| e.seq)
            .take_while(|&seq| seq <= to)
            .collect();
        for &seq in &inside {
            self.unhold(name, seq);
        }
        inside.len()
    }

    fn expire(&mut self, now_ms: u64) -> Vec<Expired> {
        Outboxes::expire(self, now_ms)
            .into_iter()
            .map(|(to, e)| Expired {
                to: to.to_string(),
                seq: e.seq,
                id: e.id,
                from: e.from.to_string(),
                notified: e.notified,
            })
            .collect()
    }

    fn remember(&mut self, name: &str) -> Remembered {
        Outboxes::remember(self, name)
    }
}

/// The behaviour every [`Mailbox`] shares, as one table of cases. Compiled
/// in the library (not only under `cfg(test)`) so that the integration
/// tests can run it against the Redis store too.
pub mod contract {
    use super::{Expired, Full, Mail, Mailbox, Refusal, Remembered};
    use crate::store::outbox::Limits;

    /// What a store under test is built from. Where the stores differ in
    /// how they take it, each side builds accordingly: the local store takes
    /// the limits at construction, the Redis one passes them with each call;
    /// the local store numbers from a point (`Outboxes::number_from`), the
    /// Redis one from a floor given with each `SEND`.
    #[derive(Debug, Clone, Copy)]
    pub struct Setup {
        pub limits: Limits,
        /// Every number handed out is above this.
        pub seqs_above: u64,
    }

    /// A realistic floor: a node numbers from its clock's ms times 1000, 16
    /// digits today (Lua must not print them as `1.78e+15`).
    pub const CLOCK_FLOOR: u64 = 1_780_000_000_000_000;

    /// The clock of the cases (Unix ms).
    const NOW: u64 = 1_780_000_000_000;

    const TTL_MS: u64 = 60_000;

    /// Room for everything but what a case is about.
    const OPEN: Limits = Limits {
        max_per_user: 100,
        max_bytes: 1 << 20,
        max_per_sender: 100,
        max_bytes_per_sender: 1 << 20,
        ttl_ms: TTL_MS,
        max_known_users: 100,
    };

    /// What a message of a body of `body_len` bytes from a sender of a
    /// three-letter name counts against the byte quotas (body + sender + 64,
    /// in both stores).
    const fn cost(body_len: usize) -> usize {
        body_len + 3 + 64
    }

    type Case<M> = (&'static str, Limits, fn(&mut M, u64));

    /// Runs every case on a fresh store from `make`, numbering from 1 and
    /// from [`CLOCK_FLOOR`]. Panics on the first broken expectation; the
    /// case is named on stderr first.
    pub fn run<M: Mailbox>(mut make: impl FnMut(Setup) -> M) {
        let cases: [Case<M>; 11] = [
            ("numbers grow per recipient and overall", OPEN, numbering),
            ("fetch after a point", OPEN, fetch_after),
            ("fetch with ack drops up to the point", OPEN, fetch_ack),
            ("a point beyond the counter acks nothing", OPEN, beyond),
            ("acks by range", OPEN, range_ack),
            ("unknown names", TWO_KNOWN, unknown),
            ("a full box, freed by an ack", PER_USER_2, full_box),
            ("a sender's share", SHARES, sender_share),
            (
                "a full store, freed by an ack",
                STORE_TWO_OF_100,
                full_store,
            ),
            ("the order of the quota checks", ALL_TIGHT, check_order),
            ("expiry", PER_USER_2, expiry),
        ];
        for floor in [0, CLOCK_FLOOR] {
            for (name, limits, case) in &cases {
                eprintln!("mailbox contract: {name} (numbers above {floor})");
                let mut store = make(Setup {
                    limits: *limits,
                    seqs_above: floor,
                });
                case(&mut store, floor);
            }
        }
    }

    fn mail<'a>(from: &'a str, to: &'a str, id: u64, body: &'a str) -> Mail<'a> {
        Mail {
            from,
            to,
            id,
            ts: NOW + id,
            body,
        }
    }

    /// Sends `mail` (anyone may be sent to) at its own time; panics if refused.
    fn held(m: &mut impl Mailbox, mail: Mail<'_>) -> u64 {
        let sent = m.send(&mail, false, mail.ts);
        sent.unwrap_or_else(|refused| panic!("{mail:?} refused: {refused:?}"))
    }

    fn try_send(m: &mut impl Mailbox, mail: Mail<'_>) -> Result<u64, Refusal> {
        m.send(&mail, false, mail.ts)
    }

    fn seqs(m: &mut impl Mailbox, name: &str) -> Vec<u64> {
        m.fetch(name, 0, false).held.iter().map(|h| h.seq).collect()
    }

    fn numbering(m: &mut impl Mailbox, floor: u64) {
        let table = [
            ("ann", "bob", "one"),
            ("dee", "cy", "two"),
            ("eve", "bob", "three"),
            ("ann", "cy", "four"),
            ("dee", "bob", "five"),
        ];
        let mut given = Vec::new();
        for (id, &(from, to, body)) in (1..).zip(&table) {
            given.push((to, held(m, mail(from, to, id, body))));
        }
        assert!(given[0].1 > floor, "{given:?} above {floor}");
        assert!(given.windows(2).all(|w| w[0].1 < w[1].1), "{given:?}");
        let got = m.fetch("bob", 0, false);
        assert_eq!(got.after, 0);
        let bob: Vec<_> = got
            .held
            .iter()
            .map(|h| (h.seq, h.id, h.ts, h.from.as_str(), h.body.as_str()))
            .collect();
        let s = |i: usize| given[i].1;
        assert_eq!(
            bob,
            [
                (s(0), 1, NOW + 1, "ann", "one"),
                (s(2), 3, NOW + 3, "eve", "three"),
                (s(4), 5, NOW + 5, "dee", "five"),
            ]
        );
        assert_eq!(seqs(m, "cy"), [s(1), s(3)]);
        assert_eq!(seqs(m, "nobody"), [] as [u64; 0]);
    }

    fn three_for_bob(m: &mut impl Mailbox) -> [u64; 3] {
        [1, 2, 3].map(|id| held(m, mail("ann", "bob", id, "x")))
    }

    fn fetch_after(m: &mut impl Mailbox, _: u64) {
        let [s1, s2, s3] = three_for_bob(m);
        let other = held(m, mail("ann", "cy", 4, "x"));
        // (after, expected after used, expected seqs)
        let table = [
            (s1, s1, vec![s2, s3]),
            (s2, s2, vec![s3]),
            (s3, s3, vec![]),
            (other, other, vec![]),
            (s1 - 1, s1 - 1, vec![s1, s2, s3]),
        ];
        for (after, used, want) in table {
            let got = m.fetch("bob", after, false);
            let seqs: Vec<u64> = got.held.iter().map(|h| h.seq).collect();
            assert_eq!((got.after, seqs), (used, want), "after {after}");
        }
        assert_eq!(seqs(m, "bob"), [s1, s2, s3], "without ack nothing goes");
    }

    fn fetch_ack(m: &mut impl Mailbox, _: u64) {
        let [s1, s2, s3] = three_for_bob(m);
        let got = m.fetch("bob", s2, true);
        assert_eq!(got.after, s2);
        assert_eq!(got.held.iter().map(|h| h.seq).collect::<Vec<_>>(), [s3]);
        assert_eq!(seqs(m, "bob"), [s3]);
        assert_eq!(m.fetch("bob", s1, true).held.len(), 1, "s1 is gone already");
        let got = m.fetch("bob", s3, true);
        assert_eq!((got.after, got.held.len()), (s3, 0));
        assert_eq!(seqs(m, "bob"), [] as [u64; 0]);
    }

    fn beyond(m: &mut impl Mailbox, _: u64) {
        let [s1, s2, s3] = three_for_bob(m);
        for after in [s3 + 1, s3 + 1_000_000, u64::MAX] {
            let got = m.fetch("bob", after, true);
            let seqs: Vec<u64> = got.held.iter().map(|h| h.seq).collect();
            assert_eq!((got.after, seqs), (0, vec![s1, s2, s3]), "after {after}");
        }
    }

    fn range_ack(m: &mut impl Mailbox, _: u64) {
        let [s1, s2, s3] = three_for_bob(m);
        let s4 = held(m, mail("dee", "bob", 4, "x"));
        // (from, to, dropped, left)
        let table = [
            (s2, s2, 1, vec![s1, s3, s4]),
            (s2, s2, 0, vec![s1, s3, s4]),
            (s4, s2, 0, vec![s1, s3, s4]),
            (0, s3, 2, vec![s4]),
            (s1, s1, 0, vec![s4]),
            (s4, s4, 1, vec![]),
            (0, u64::MAX, 0, vec![]),
        ];
        for (from, to, dropped, left) in table {
            assert_eq!(m.ack("bob", from, to), dropped, "ack {from}..={to}");
            assert_eq!(seqs(m, "bob"), left, "after ack {from}..={to}");
        }
        assert_eq!(m.ack("nobody", 0, u64::MAX), 0);
    }

    const TWO_KNOWN: Limits = Limits {
        max_known_users: 2,
        ..OPEN
    };

    fn unknown(m: &mut impl Mailbox, _: u64) {
        let to_zed = mail("ann", "zed", 1, "x");
        assert_eq!(m.send(&to_zed, true, NOW), Err(Refusal::Unknown));
        assert_eq!(seqs(m, "zed"), [] as [u64; 0], "nothing held");
        assert_eq!(m.remember("zed"), Remembered::New);
        assert_eq!(m.remember("zed"), Remembered::AlreadyKnown);
        let seq = m.send(&to_zed, true, NOW).expect("zed is known");
        assert_eq!(seqs(m, "zed"), [seq]);
        // Anyone, when not only known names may be sent to.
        let to_yan = mail("ann", "yan", 2, "x");
        assert!(m.send(&to_yan, false, NOW).is_ok());
        assert_eq!(m.remember("yan"), Remembered::New);
        assert_eq!(m.remember("xi"), Remembered::Full, "at most 2 names");
        let to_xi = mail("ann", "xi", 3, "x");
        assert_eq!(m.send(&to_xi, true, NOW), Err(Refusal::Unknown));
    }

    const PER_USER_2: Limits = Limits {
        max_per_user: 2,
        ..OPEN
    };

    fn full_box(m: &mut impl Mailbox, _: u64) {
        let s1 = held(m, mail("ann", "bob", 1, "x"));
        held(m, mail("dee", "bob", 2, "x"));
        let full = Err(Refusal::Full(Full::User));
        assert_eq!(try_send(m, mail("eve", "bob", 3, "x")), full);
        held(m, mail("eve", "cy", 4, "x"));
        assert_eq!(m.ack("bob", s1, s1), 1);
        let s5 = held(m, mail("eve", "bob", 5, "x"));
        assert_eq!(try_send(m, mail("eve", "bob", 6, "x")), full);
        assert_eq!(m.fetch("bob", s5, true).held.len(), 0);
        held(m, mail("eve", "bob", 6, "x"));
    }

    /// Three messages a sender, or its bytes: two bodies of 100 and one of
    /// 30 fit, three of 100 do not.
    const SHARES: Limits = Limits {
        max_per_sender: 3,
        max_bytes_per_sender: 2 * cost(100) + cost(30),
        ..OPEN
    };

    fn sender_share(m: &mut impl Mailbox, _: u64) {
        let full = Err(Refusal::Full(Full::Sender));
        let x100 = "x".repeat(100);
        let x30 = "x".repeat(30);
        let mut given = Vec::new();
        // (from, to, body, refused by the sender's share)
        let table = [
            ("mal", "u1", "x", false),
            ("mal", "u2", "x", false),
            ("mal", "u3", "x", false),
            ("mal", "u4", "x", true),  // a 4th message, to anyone
            ("ann", "u4", "x", false), // others are not affected
            ("eve", "u5", &*x100, false),
            ("eve", "u6", &*x100, false),
            ("eve", "u6", &*x100, true), // bytes
            ("eve", "u6", &*x30, false),
        ];
        for (id, &(from, to, body, refused)) in (1..).zip(&table) {
            let sent = try_send(m, mail(from, to, id, body));
            if refused {
                assert_eq!(sent, full, "row {id}");
            } else {
                given.push(sent.unwrap_or_else(|e| panic!("row {id}: {e:?}")));
            }
        }
        // Freed by an ack of one of mal's, to anyone.
        assert_eq!(m.ack("u1", 0, given[0]), 1);
        held(m, mail("mal", "u9", 20, "x"));
        assert_eq!(try_send(m, mail("mal", "u9", 21, "x")), full);
    }

    /// Two bodies of 100 from one sender to one name fit, a third anywhere
    /// does not. (The local store also counts 64 bytes and the name for each
    /// name with something held, the Redis store does not: the limit leaves
    /// room for that, so both answer alike.)
    const STORE_TWO_OF_100: Limits = Limits {
        max_bytes: 3 * cost(100) - 1,
        ..OPEN
    };

    fn full_store(m: &mut impl Mailbox, _: u64) {
        let x100 = "x".repeat(100);
        let s1 = held(m, mail("ann", "bob", 1, &x100));
        held(m, mail("ann", "bob", 2, &x100));
        let full = Err(Refusal::Full(Full::Store));
        assert_eq!(try_send(m, mail("dee", "cy", 3, &x100)), full);
        assert_eq!(m.ack("bob", 0, s1), 1);
        held(m, mail("dee", "cy", 3, &x100));
        assert_eq!(try_send(m, mail("eve", "dy", 4, &x100)), full);
    }

    /// One message of 100 bytes to one name fills every quota.
    const ALL_TIGHT: Limits = Limits {
        max_per_user: 1,
        max_per_sender: 1,
        max_bytes: 2 * cost(100) - 1,
        ..OPEN
    };

    fn check_order(m: &mut impl Mailbox, _: u64) {
        let x100 = "x".repeat(100);
        held(m, mail("ann", "bob", 1, &x100));
        // Every quota is reached: the recipient's count is answered.
        let again = try_send(m, mail("ann", "bob", 2, &x100));
        assert_eq!(again, Err(Refusal::Full(Full::User)));
        // The store's bytes and the sender's share: the store is full for
        // everyone, so that is what the sender hears.
        let elsewhere = try_send(m, mail("ann", "cy", 3, &x100));
        assert_eq!(elsewhere, Err(Refusal::Full(Full::Store)));
    }

    /// Held messages expire after the time to live: the senders are named,
    /// the messages are gone from fetches and free their quotas.
    fn expiry(m: &mut impl Mailbox, _: u64) {
        let at = |from, id, ts| Mail {
            ts,
            ..mail(from, "bob", id, "x")
        };
        let old = held(m, at("ann", 1, NOW));
        let new = held(m, at("dee", 2, NOW + 500));
        let late = at("eve", 3, NOW + 600);
        assert_eq!(try_send(m, late), Err(Refusal::Full(Full::User)));
        let none: Vec<Expired> = Vec::new();
        assert_eq!(m.expire(NOW + TTL_MS - 1), none);
        let gone = m.expire(NOW + TTL_MS);
        let gone: Vec<_> = gone
            .iter()
            .map(|e| (e.to.as_str(), e.seq, e.id, e.from.as_str()))
            .collect();
        assert_eq!(gone, [("bob", old, 1, "ann")]);
        assert_eq!(seqs(m, "bob"), [new]);
        let later = held(m, late);
        assert_eq!(m.ack("bob", 0, new), 1);
        // An acknowledged message does not expire later.
        let gone = m.expire(NOW + 600 + TTL_MS);
        assert_eq!(gone.iter().map(|e| e.seq).collect::<Vec<_>>(), [later]);
        assert_eq!(m.expire(u64::MAX / 2), none);
        assert_eq!(seqs(m, "bob"), [] as [u64; 0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{record::Record, Limits};

    #[test]
    fn the_local_store_keeps_the_mailbox_contract() {
        contract::run(|setup| {
            let mut outboxes = Outboxes::new(setup.limits);
            outboxes.number_from(setup.seqs_above + 1);
            outboxes
        });
    }

    #[test]
    fn a_range_inside_a_box_is_not_logged_and_comes_back_after_a_restart() {
        // The log has only cumulative acks: `N..=N` inside a box is dropped in
        // memory; a later cumulative ack covers it on disk.
        let mut o = Outboxes::new(Limits::unbounded());
        let seqs: Vec<u64> = (1..=3)
            .map(|id| {
                let mail = Mail {
                    from: "ann",
                    to: "bob",
                    id,
                    ts: 10,
                    body: "x",
                };
                o.send(&mail, false, 10).expect("held")
            })
            .collect();
        assert_eq!(Mailbox::ack(&mut o, "bob", seqs[1], seqs[1]), 1);
        assert_eq!(Mailbox::ack(&mut o, "bob", seqs[0], seqs[0]), 1);
        let log = o.take_pending();
        let mut back = Outboxes::new(Limits::unbounded());
        let mut pos = 0;
        while pos < log.len() {
            let (record, used) = Record::decode(&log[pos..]).expect("record");
            back.replay(record);
            pos += used;
        }
        back.finish_replay();
        let held: Vec<u64> = back.held_after("bob", 0).map(|e| e.seq).collect();
        assert_eq!(
            held,
            [seqs[1], seqs[2]],
            "the front one was logged, the middle one not"
        );
    }
}
