//! The joining node's half of the connect/send race (docs/CLUSTER.md,
//! "Offline store in Redis"): while a local user's outbox is fetched, the
//! messages Redis publishes to it live are kept; when the fetch answers,
//! the fetched messages go first, then the kept ones numbered above them.
//! Afterwards a live message numbered at or below what the user was given
//! is dropped: the fetch reply (command connection) and a publish
//! (subscriber connection) can arrive in either order, and a message that
//! met the join can be in both. Sans-IO; the router owns one under
//! `--cluster`.

use std::collections::HashMap;
use std::rc::Rc;

use super::store::{Held, FETCH_BATCH};

/// Live messages kept for one name while its outbox is fetched, at most;
/// beyond, a message is not kept (it is in the outbox: every live message
/// is stored first) and the outbox is fetched again after the fetch
/// answers, until a fetch ends with nothing left out.
pub const MAX_KEPT: usize = 1000;

/// Live messages kept over all names at most (a node could otherwise be
/// made to hold `MAX_KEPT` for each of thousands of joining names); beyond,
/// as past `MAX_KEPT`.
pub const MAX_KEPT_TOTAL: usize = 10_000;

/// What to deliver to a user, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deliver<P> {
    /// From the outbox: sent with `"offline":true`.
    Offline(Held),
    /// Published live (`P` is the message as it came).
    Live(u64, P),
    /// Published live and kept, but the fetch gave it already: not
    /// delivered again, only answered for.
    Duplicate(P),
}

/// What to do with a message published live for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard<P> {
    /// Deliver it now.
    Now(u64, P),
    /// Kept until the fetch answers.
    Kept,
    /// The user was given it already (it came with the fetch).
    Given(P),
    /// The user is not here.
    NotHere(P),
    /// Not kept (too many are kept): it is in the outbox, and the outbox
    /// is fetched again after this fetch answers.
    Full(P),
}

#[derive(Debug)]
struct Name<P> {
    /// The highest `seq` delivered (or fetched) for the name.
    given: u64,
    /// `Some` while the outbox is being fetched: live messages kept.
    kept: Option<Vec<(u64, P)>>,
    /// A live message was not kept during this fetch: fetch again after it.
    overflowed: bool,
    /// Which fetch is the current one: a reply to an earlier one (the
    /// session was replaced meanwhile) is ignored.
    generation: u64,
}

/// Per local user: where its numbers stand, and what waits for its fetch.
#[derive(Debug)]
pub struct Catchup<P> {
    names: HashMap<Rc<str>, Name<P>>,
    /// Live messages not kept because too many were (each was fetched
    /// again from the outbox).
    pub dropped: u64,
    /// Live messages kept over all names.
    kept_total: usize,
    last_generation: u64,
}

impl<P> Default for Catchup<P> {
    fn default() -> Self {
        Catchup {
            names: HashMap::new(),
            dropped: 0,
            kept_total: 0,
            last_generation: 0,
        }
    }
}

impl<P> Catchup<P> {
    /// `name` joined (its lease is granted) and its outbox is being fetched
    /// after `after` (its `resume` point, 0 for everything).
    /// (A name being fetched already is left as it is: that fetch answers
    /// for both, and what was kept for it stays.)
    /// Returns the fetch's generation, to be given back with its answer.
    pub fn begin(&mut self, name: Rc<str>, after: u64) -> u64 {
        if let Some(state) = self.names.get(&name).filter(|s| s.kept.is_some()) {
            return state.generation;
        }
        self.last_generation += 1;
        self.names.insert(
            name,
            Name {
                given: after,
                kept: Some(Vec::new()),
                overflowed: false,
                generation: self.last_generation,
            },
        );
        self.last_generation
    }

    /// `name` left this node: the live messages kept for it are returned.
    pub fn end(&mut self, name: &str) -> Vec<P> {
        let kept = self
            .names
            .remove(name)
            .and_then(|state| state.kept)
            .unwrap_or_default();
        self.kept_total -= kept.len();
        kept.into_iter().map(|(_, message)| message).collect()
    }

    /// `name`, here and delivered to live, is to be fetched again (its lease
    /// may have been missing from Redis, which then held what was sent to
    /// it): live messages are kept again until the fetch answers. Returns
    /// where the fetch starts, or `None` when the name is not here or is
    /// being fetched already.
    /// Returns where the fetch starts and its generation.
    pub fn again(&mut self, name: &str) -> Option<(u64, u64)> {
        let state = self.names.get_mut(name)?;
        if state.kept.is_some() {
            return None;
        }
        self.last_generation += 1;
        state.kept = Some(Vec::new());
        state.overflowed = false;
        state.generation = self.last_generation;
        Some((state.given, state.generation))
    }

    /// Where `name`'s fetch starts, and its generation, if it is being
    /// fetched (or held back for one).
    pub fn fetch_point(&self, name: &str) -> Option<(u64, u64)> {
        self.names
            .get(name)
            .filter(|state| state.kept.is_some())
            .map(|state| (state.given, state.generation))
    }

    /// Whether `name` is here (joined, or joining).
    pub fn has(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// The names whose outbox is being fetched, with where the next fetch
    /// starts and its generation (to ask again after the link was lost).
    pub fn fetching(&self) -> impl Iterator<Item = (&Rc<str>, u64, u64)> {
        self.names
            .iter()
            .filter(|(_, state)| state.kept.is_some())
            .map(|(name, state)| (name, state.given, state.generation))
    }

    /// A message published live for `name`, numbered `seq`.
    pub fn live(&mut self, name: &str, seq: u64, message: P) -> Heard<P> {
        let Some(state) = self.names.get_mut(name) else {
            return Heard::NotHere(message);
        };
        // While fetching, everything is kept: the point asked for may be
        // one the store refuses (above anything it handed out), and only
        // the fetch's answer says what the user has.
        if seq <= state.given && state.kept.is_none() {
            return Heard::Given(message);
        }
        match &mut state.kept {
            Some(kept) => {
                // The newest is left out, never an older one: what is kept
                // stays below everything left out, so delivering the kept
                // ones and then fetching again keeps the order.
                // Once one is left out, all later ones are too (room made
                // elsewhere meanwhile must not let a newer one in).
                if state.overflowed || kept.len() >= MAX_KEPT || self.kept_total >= MAX_KEPT_TOTAL {
                    self.dropped += 1;
                    state.overflowed = true;
                    return Heard::Full(message);
                }
                kept.push((seq, message));
                self.kept_total += 1;
                Heard::Kept
            }
            None => {
                state.given = seq;
                Heard::Now(seq, message)
            }
        }
    }

    /// The fetch for `name` answered `batch` (in `seq` order). Returns what
    /// to deliver, in order, and whether to fetch again after the last
    /// (the batch was full). The kept live messages come after the last
    /// batch.
    /// `after` is the point the store used: lower than asked when the
    /// resume point was above anything it handed out (then all is given
    /// again).
    /// An answer to a fetch of another generation than the current one is
    /// ignored (nothing delivered, nothing asked).
    pub fn fetched(
        &mut self,
        name: &str,
        generation: u64,
        after: u64,
        batch: Vec<Held>,
    ) -> (Vec<Deliver<P>>, Option<u64>) {
        let Some(state) = self
            .names
            .get_mut(name)
            .filter(|s| s.generation == generation && s.kept.is_some())
        else {
            return (Vec::new(), None);
        };
        if state.kept.is_some() && after < state.given {
            state.given = after;
        }
        let full = batch.len() >= FETCH_BATCH;
        let mut out = Vec::with_capacity(batch.len());
        for held in batch {
            if held.seq > state.given {
                state.given = held.seq;
                out.push(Deliver::Offline(held));
            }
        }
        if full {
            return (out, Some(state.given));
        }
        let kept = state.kept.take().unwrap_or_default();
        self.kept_total -= kept.len();
        for (seq, message) in kept {
            if seq > state.given {
                state.given = seq;
                out.push(Deliver::Live(seq, message));
            } else {
                out.push(Deliver::Duplicate(message));
            }
        }
        if state.overflowed {
            // What was left out is in the outbox, above all of this: fetch
            // again, keeping what comes meanwhile.
            state.overflowed = false;
            state.kept = Some(Vec::new());
            return (out, Some(state.given));
        }
        (out, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<P> Catchup<P> {
        /// `fetched` with the current generation of `name`.
        fn fetched_now(
            &mut self,
            name: &str,
            after: u64,
            batch: Vec<Held>,
        ) -> (Vec<Deliver<P>>, Option<u64>) {
            let generation = self.names.get(name).map_or(0, |s| s.generation);
            self.fetched(name, generation, after, batch)
        }
    }

    #[test]
    fn an_answer_to_an_earlier_fetch_is_ignored() {
        let mut c = Catchup::default();
        let first = c.begin(Rc::from("bob"), 0);
        assert_eq!(c.begin(Rc::from("bob"), 0), first, "the same fetch");
        // The session is replaced: a new fetch from its own resume point.
        c.end("bob");
        let second = c.begin(Rc::from("bob"), 3);
        assert_ne!(first, second);
        assert_eq!(c.fetched("bob", first, 0, vec![held(9)]), (vec![], None));
        let (out, _) = c.fetched("bob", second, 3, vec![held(4)]);
        assert_eq!(seqs(&out), [('o', 4)]);
        // Fetching again is a new generation too.
        let (after, third) = c.again("bob").expect("here");
        assert_eq!((after, c.fetch_point("bob")), (4, Some((4, third))));
        assert_eq!(c.fetched("bob", second, 4, vec![held(5)]), (vec![], None));
    }

    fn held(seq: u64) -> Held {
        Held {
            seq,
            id: seq,
            ts: 0,
            from: "ann".into(),
            body: String::new(),
            notified: false,
        }
    }

    fn seqs(out: &[Deliver<&str>]) -> Vec<(char, u64)> {
        out.iter()
            .map(|d| match d {
                Deliver::Offline(h) => ('o', h.seq),
                Deliver::Live(seq, _) => ('l', *seq),
                Deliver::Duplicate(_) => ('d', 0),
            })
            .collect()
    }

    #[test]
    fn live_messages_wait_for_the_fetch_and_duplicates_go_once() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 0);
        // 5 and 6 met the join: stored and published; 7 only published.
        for seq in [5, 6, 7] {
            assert_eq!(c.live("bob", seq, "x"), Heard::Kept, "kept while fetching");
        }
        let (out, again) = c.fetched_now("bob", 0, vec![held(3), held(5), held(6)]);
        assert_eq!(again, None);
        assert_eq!(
            seqs(&out),
            [('o', 3), ('o', 5), ('o', 6), ('d', 0), ('d', 0), ('l', 7)],
            "5 and 6 came with the fetch: answered for, not delivered twice"
        );
        // A publish that arrives after the fetch reply and was in it: dropped.
        assert_eq!(c.live("bob", 6, "x"), Heard::Given("x"));
        assert_eq!(c.live("bob", 8, "x"), Heard::Now(8, "x"));
        assert_eq!(c.live("cy", 9, "x"), Heard::NotHere("x"));
    }

    #[test]
    fn a_publish_after_the_fetch_reply_is_delivered_once() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 0);
        let (out, _) = c.fetched_now("bob", 0, vec![held(4)]);
        assert_eq!(seqs(&out), [('o', 4)]);
        // The same message's publish, late on the other connection.
        assert_eq!(c.live("bob", 4, "x"), Heard::Given("x"));
        assert_eq!(c.live("bob", 5, "y"), Heard::Now(5, "y"));
    }

    #[test]
    fn a_full_batch_asks_for_more_and_kept_messages_come_last() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 10);
        assert_eq!(c.live("bob", 5000, "x"), Heard::Kept);
        let first: Vec<Held> = (11..11 + FETCH_BATCH as u64).map(held).collect();
        let (out, again) = c.fetched_now("bob", 10, first);
        assert_eq!(out.len(), FETCH_BATCH);
        assert_eq!(again, Some(10 + FETCH_BATCH as u64));
        assert_eq!(c.fetching().count(), 1, "still fetching");
        let (out, again) = c.fetched_now("bob", 10 + FETCH_BATCH as u64, vec![held(4000)]);
        assert_eq!(again, None);
        assert_eq!(seqs(&out), [('o', 4000), ('l', 5000)]);
        assert_eq!(c.fetching().count(), 0);
    }

    #[test]
    fn a_resume_point_the_store_did_not_know_gives_everything_again() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 900);
        // Below the point asked for, but the store may not know that point.
        assert_eq!(c.live("bob", 12, "x"), Heard::Kept);
        let (out, _) = c.fetched_now("bob", 0, vec![held(3), held(5)]);
        assert_eq!(seqs(&out), [('o', 3), ('o', 5), ('l', 12)]);
        assert_eq!(c.live("bob", 13, "y"), Heard::Now(13, "y"));
    }

    #[test]
    fn a_name_fetched_again_keeps_live_messages_until_the_answer() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 0);
        c.fetched_now("bob", 0, vec![held(2)]);
        assert_eq!(c.live("bob", 4, "x"), Heard::Now(4, "x"));
        assert_eq!(c.again("bob").map(|(after, _)| after), Some(4));
        assert_eq!(c.again("bob"), None, "already fetching");
        assert_eq!(c.again("cy"), None);
        assert_eq!(c.live("bob", 7, "y"), Heard::Kept);
        // 5 was stored while nobody held bob's lease.
        let (out, _) = c.fetched_now("bob", 4, vec![held(5)]);
        assert_eq!(seqs(&out), [('o', 5), ('l', 7)]);
    }

    #[test]
    fn kept_messages_are_bounded_over_all_names() {
        let mut c = Catchup::default();
        let names: Vec<Rc<str>> = (0..=MAX_KEPT_TOTAL / MAX_KEPT)
            .map(|i| Rc::from(format!("u{i}")))
            .collect();
        for name in &names {
            c.begin(name.clone(), 0);
        }
        for (i, name) in names.iter().enumerate().take(MAX_KEPT_TOTAL / MAX_KEPT) {
            for seq in 1..=MAX_KEPT as u64 {
                assert_eq!(c.live(name, seq, i), Heard::Kept);
            }
        }
        let last = names.last().unwrap();
        assert_eq!(c.live(last, 1, 99), Heard::Full(99), "none left to keep");
        // Room made elsewhere does not let a newer one in after one left out.
        assert_eq!(c.end(&names[1]).len(), MAX_KEPT);
        assert_eq!(c.live(last, 2, 99), Heard::Full(99));
        assert_eq!(c.live(&names[2], 5000, 2), Heard::Full(2), "its own bound");
        let (out, _) = c.fetched_now(&names[3], 0, vec![]);
        assert_eq!(out.len(), MAX_KEPT);
        assert_eq!(c.kept_total, MAX_KEPT_TOTAL - 2 * MAX_KEPT);
    }

    #[test]
    fn a_name_that_leaves_while_fetching_hands_back_what_was_kept() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 0);
        assert_eq!(c.live("bob", 5, "x"), Heard::Kept);
        assert!(c.has("bob"));
        assert_eq!(c.end("bob"), ["x"]);
        assert!(!c.has("bob"));
        assert_eq!(c.end("bob"), Vec::<&str>::new());
    }

    #[test]
    fn resume_skips_what_was_acked_and_what_is_left_out_is_fetched_again() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 7);
        // Kept even at the resume point: the fetch says whether it stands.
        assert_eq!(c.live("bob", 7, "x"), Heard::Kept);
        for seq in 8..7 + MAX_KEPT as u64 {
            assert_eq!(c.live("bob", seq, "x"), Heard::Kept);
        }
        // Full: the newest are left out (they are in the outbox).
        let past = 7 + MAX_KEPT as u64;
        assert_eq!(c.live("bob", past, "y"), Heard::Full("y"));
        assert_eq!(c.live("bob", past + 1, "y"), Heard::Full("y"));
        assert_eq!(c.dropped, 2);
        let (out, again) = c.fetched_now("bob", 7, vec![held(6), held(8)]);
        assert_eq!(
            out.len(),
            1 + MAX_KEPT,
            "6 skipped; 8 fetched; kept 7 and 8 answered, not shown again; the rest once"
        );
        assert_eq!(seqs(&out[..3]), [('o', 8), ('d', 0), ('d', 0)]);
        assert_eq!(seqs(&out[3..4]), [('l', 9)]);
        // Fetched again after the last kept: the two left out come, then live.
        assert_eq!(again, Some(past - 1));
        assert_eq!(c.live("bob", past + 2, "z"), Heard::Kept);
        let (out, again) = c.fetched_now("bob", past - 1, vec![held(past), held(past + 1)]);
        assert_eq!(again, None);
        assert_eq!(seqs(&out), [('o', past), ('o', past + 1), ('l', past + 2)]);
        assert_eq!(c.live("bob", past + 3, "w"), Heard::Now(past + 3, "w"));
        c.end("bob");
        assert_eq!(c.live("bob", 100_000, "x"), Heard::NotHere("x"));
    }
}
