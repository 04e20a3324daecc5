//! The joining node's half of the connect/send race (docs/CLUSTER.md,
//! "Offline store in Redis"): while a local user's outbox is fetched, the
//! messages Redis publishes to it live are kept; when the fetch answers,
//! the fetched messages go first, then the kept ones numbered above them.
//! Afterwards a live message numbered at or below what the user was given
//! is dropped: the fetch reply (command connection) and a publish
//! (subscriber connection) can arrive in either order, and a message that
//! met the join can be in both. Sans-IO; the node does not use it yet.

use std::collections::HashMap;
use std::rc::Rc;

use super::store::{Held, FETCH_BATCH};

/// Live messages kept for one name while its outbox is fetched, at most;
/// beyond, the oldest kept is dropped and counted (it stays in the outbox
/// and comes with the next `resume`).
pub const MAX_KEPT: usize = 1000;

/// What to deliver to a user, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deliver<P> {
    /// From the outbox: sent with `"offline":true`.
    Offline(Held),
    /// Published live (`P` is the message as it came).
    Live(u64, P),
}

#[derive(Debug)]
struct Name<P> {
    /// The highest `seq` delivered (or fetched) for the name.
    given: u64,
    /// `Some` while the outbox is being fetched: live messages kept.
    kept: Option<Vec<(u64, P)>>,
}

/// Per local user: where its numbers stand, and what waits for its fetch.
#[derive(Debug)]
pub struct Catchup<P> {
    names: HashMap<Rc<str>, Name<P>>,
    /// Live messages dropped because too many were kept.
    pub dropped: u64,
}

impl<P> Default for Catchup<P> {
    fn default() -> Self {
        Catchup {
            names: HashMap::new(),
            dropped: 0,
        }
    }
}

impl<P> Catchup<P> {
    /// `name` joined (its lease is granted) and its outbox is being fetched
    /// after `after` (its `resume` point, 0 for everything).
    pub fn begin(&mut self, name: Rc<str>, after: u64) {
        self.names.insert(
            name,
            Name {
                given: after,
                kept: Some(Vec::new()),
            },
        );
    }

    /// `name` left this node.
    pub fn end(&mut self, name: &str) {
        self.names.remove(name);
    }

    /// A message published live for `name`: deliver it now, or not (kept
    /// for the fetch, already given, or the name is not here).
    pub fn live(&mut self, name: &str, seq: u64, message: P) -> Option<Deliver<P>> {
        let state = self.names.get_mut(name)?;
        if seq <= state.given {
            return None;
        }
        match &mut state.kept {
            Some(kept) => {
                if kept.len() >= MAX_KEPT {
                    kept.remove(0);
                    self.dropped += 1;
                }
                kept.push((seq, message));
                None
            }
            None => {
                state.given = seq;
                Some(Deliver::Live(seq, message))
            }
        }
    }

    /// The fetch for `name` answered `batch` (in `seq` order). Returns what
    /// to deliver, in order, and whether to fetch again after the last
    /// (the batch was full). The kept live messages come after the last
    /// batch.
    pub fn fetched(&mut self, name: &str, batch: Vec<Held>) -> (Vec<Deliver<P>>, Option<u64>) {
        let Some(state) = self.names.get_mut(name) else {
            return (Vec::new(), None);
        };
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
        for (seq, message) in state.kept.take().unwrap_or_default() {
            if seq > state.given {
                state.given = seq;
                out.push(Deliver::Live(seq, message));
            }
        }
        (out, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(seq: u64) -> Held {
        Held {
            seq,
            id: seq,
            ts: 0,
            from: "ann".into(),
            body: String::new(),
        }
    }

    fn seqs(out: &[Deliver<&str>]) -> Vec<(char, u64)> {
        out.iter()
            .map(|d| match d {
                Deliver::Offline(h) => ('o', h.seq),
                Deliver::Live(seq, _) => ('l', *seq),
            })
            .collect()
    }

    #[test]
    fn live_messages_wait_for_the_fetch_and_duplicates_go_once() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 0);
        // 5 and 6 met the join: stored and published; 7 only published.
        for seq in [5, 6, 7] {
            assert_eq!(c.live("bob", seq, "x"), None, "kept while fetching");
        }
        let (out, again) = c.fetched("bob", vec![held(3), held(5), held(6)]);
        assert_eq!(again, None);
        assert_eq!(seqs(&out), [('o', 3), ('o', 5), ('o', 6), ('l', 7)]);
        // A publish that arrives after the fetch reply and was in it: dropped.
        assert_eq!(c.live("bob", 6, "x"), None);
        assert_eq!(c.live("bob", 8, "x"), Some(Deliver::Live(8, "x")));
        assert_eq!(c.live("cy", 9, "x"), None, "not here");
    }

    #[test]
    fn a_publish_after_the_fetch_reply_is_delivered_once() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 0);
        let (out, _) = c.fetched("bob", vec![held(4)]);
        assert_eq!(seqs(&out), [('o', 4)]);
        // The same message's publish, late on the other connection.
        assert_eq!(c.live("bob", 4, "x"), None);
        assert_eq!(seqs(&[c.live("bob", 5, "y").expect("new")]), [('l', 5)]);
    }

    #[test]
    fn a_full_batch_asks_for_more_and_kept_messages_come_last() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 10);
        assert_eq!(c.live("bob", 5000, "x"), None);
        let first: Vec<Held> = (11..11 + FETCH_BATCH as u64).map(held).collect();
        let (out, again) = c.fetched("bob", first);
        assert_eq!(out.len(), FETCH_BATCH);
        assert_eq!(again, Some(10 + FETCH_BATCH as u64));
        let (out, again) = c.fetched("bob", vec![held(4000)]);
        assert_eq!(again, None);
        assert_eq!(seqs(&out), [('o', 4000), ('l', 5000)]);
    }

    #[test]
    fn resume_skips_what_was_acked_and_kept_messages_are_bounded() {
        let mut c = Catchup::default();
        c.begin(Rc::from("bob"), 7);
        assert_eq!(c.live("bob", 7, "x"), None);
        for seq in 8..8 + MAX_KEPT as u64 + 2 {
            assert_eq!(c.live("bob", seq, "x"), None);
        }
        assert_eq!(c.dropped, 2);
        let (out, _) = c.fetched("bob", vec![held(6), held(8)]);
        assert_eq!(
            out.len(),
            1 + MAX_KEPT,
            "6 skipped; 8 fetched; 8 and 9 dropped from kept; the rest once"
        );
        assert_eq!(seqs(&out[..2]), [('o', 8), ('l', 10)]);
        c.end("bob");
        assert_eq!(c.live("bob", 100_000, "x"), None);
    }
}
