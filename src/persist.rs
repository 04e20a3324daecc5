//! When the outbox log is written, synced and compacted: group commit once
//! per loop turn, compaction when the log is large and mostly dead, and
//! what happens when the disk refuses (full, or failing): the turn's
//! offline messages are refused rather than promised, live chat goes on,
//! and what the log missed is written once the disk takes it again.

use std::io;
use std::time::{Duration, Instant};

use std::rc::Rc;

use crate::chat::{Outbox, Router};
use crate::log;
use crate::store::log::Log;
use crate::store::record::Record;

/// Whether a log of `len` bytes, of which `live` bytes are still needed,
/// should be rewritten: only once it is at least `min_bytes` (small logs
/// are cheap to replay) and more than half dead (so a rewrite at least
/// halves it, and the cost of rewriting is paid back).
pub fn should_compact(len: u64, live: u64, min_bytes: u64) -> bool {
    len >= min_bytes && len > live.saturating_mul(2)
}

/// The first wait after a failed write, and the longest.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

/// The most record bytes kept for appending while the disk fails. Beyond
/// it they are dropped, and only a rewrite of the whole log from memory
/// (which needs room for a second copy) ends the failure.
pub const MAX_BACKLOG: usize = 1 << 20;

/// How long to wait before trying the disk again, after waiting
/// `previous` (none: the first failure): doubling, within bounds.
pub fn next_backoff(previous: Option<Duration>) -> Duration {
    match previous {
        None => FIRST_RETRY,
        Some(wait) => wait.saturating_mul(2).clamp(FIRST_RETRY, LONGEST_RETRY),
    }
}

/// `records` without the `Store` records of the messages in `taken_back`
/// (held, then refused when the write failed: their senders were told they
/// were not stored, so a later append must not bring them back).
pub fn without_taken_back(records: &[u8], taken_back: &[(Rc<str>, u64)]) -> Vec<u8> {
    let mut kept = Vec::with_capacity(records.len());
    let mut at = 0;
    while let Ok((record, used)) = Record::decode(&records[at..]) {
        let refused = matches!(&record, Record::Store { user, seq, .. }
            if taken_back.iter().any(|(u, s)| **u == **user && s == seq));
        if !refused {
            kept.extend_from_slice(&records[at..at + used]);
        }
        at += used;
    }
    debug_assert_eq!(at, records.len(), "records encoded here decode");
    kept
}

/// Whether the log is being written, and if not, what waits for it.
#[derive(Debug, Default)]
pub struct Disk {
    failing: Option<Failing>,
    /// After a compaction failed: not again before this.
    compact_not_before: Option<Instant>,
    /// Writes (appends, syncs, rewrites) that failed.
    pub write_failures: u64,
    /// Times the log took writes again after failing.
    pub recoveries: u64,
}

#[derive(Debug)]
struct Failing {
    retry_at: Instant,
    waited: Duration,
    /// The records since the last that reached the disk, in order; `None`
    /// once they outgrew [`MAX_BACKLOG`].
    backlog: Option<Vec<u8>>,
}

impl Disk {
    /// The log cannot be written now (`/healthz` says degraded).
    pub fn degraded(&self) -> bool {
        self.failing.is_some()
    }

    /// When the loop must wake to try the disk again.
    pub fn retry_at(&self) -> Option<Instant> {
        self.failing.as_ref().map(|f| f.retry_at)
    }

    /// A write failed at `now`, after `waited_before` (none: the first):
    /// wait longer before the next try.
    fn failed(&mut self, now: Instant, waited_before: Option<Duration>, backlog: Option<Vec<u8>>) {
        self.write_failures += 1;
        let waited = next_backoff(waited_before);
        self.failing = Some(Failing {
            retry_at: now + waited,
            waited,
            backlog,
        });
    }
}

/// Adds `records` to what waits for the disk, within [`MAX_BACKLOG`].
fn keep_for_later(backlog: Option<Vec<u8>>, records: &[u8]) -> Option<Vec<u8>> {
    let mut backlog = backlog?;
    if backlog.len() + records.len() > MAX_BACKLOG {
        return None;
    }
    backlog.extend_from_slice(records);
    Some(backlog)
}

/// What became of this turn's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// On disk (or there is no disk): the replies that promised it go out.
    Durable,
    /// Not on disk: those replies are dropped (the router has told the
    /// senders instead).
    Refused,
}

/// Group commit: this turn's outbox records go to the log with one sync
/// (none for `None`: memory only). While the disk fails, offline messages
/// are refused, the records of everything else wait in a bounded backlog,
/// and the disk is tried again with backoff (see [`retry`]).
pub fn commit(
    router: &mut Router,
    log: Option<&mut Log>,
    disk: &mut Disk,
    now: Instant,
    compact_min_bytes: u64,
    out: &mut impl Outbox,
) -> Committed {
    let records = router.take_log_records();
    let Some(log) = log else {
        router.stored_durably();
        return Committed::Durable;
    };
    if let Some(failing) = &mut disk.failing {
        failing.backlog = keep_for_later(failing.backlog.take(), &records);
        if now >= failing.retry_at {
            retry(router, log, disk, now);
        }
        router.stored_durably();
        return Committed::Durable;
    }
    if let Err(e) = log.append(&records) {
        log::error!(
            "cannot write the outbox log: {e}; offline messages are refused until it can be written (live chat goes on)"
        );
        let taken_back = router.storage_failed(out);
        let backlog = keep_for_later(Some(Vec::new()), &without_taken_back(&records, &taken_back));
        disk.failed(now, None, backlog);
        return Committed::Refused;
    }
    router.stored_durably();
    let compact_due = disk.compact_not_before.is_none_or(|at| now >= at);
    if compact_due && should_compact(log.len(), router.live_log_bytes() as u64, compact_min_bytes) {
        let before = log.len();
        match compact(router, log) {
            Ok(()) => {
                disk.compact_not_before = None;
                log::info!("outbox log compacted: {before} -> {} bytes", log.len());
            }
            Err(e) => {
                // The log as it was is whole and still appended to.
                disk.compact_not_before = Some(now + LONGEST_RETRY);
                log::warn!("cannot compact the outbox log: {e}; trying again later");
            }
        }
    }
    Committed::Durable
}

/// Tries the disk again: appends what waited (the log on disk then says
/// what it would have without the failure), or, if that outgrew its bound,
/// rewrites the log from memory. Either ends the failure if it succeeds.
fn retry(router: &mut Router, log: &mut Log, disk: &mut Disk, now: Instant) {
    let Some(failing) = disk.failing.take() else {
        return;
    };
    let (written, how) = match &failing.backlog {
        Some(backlog) => (log.append(backlog), "appended what waited"),
        None => (compact(router, log), "rewritten from memory"),
    };
    match written {
        Ok(()) => {
            disk.recoveries += 1;
            router.storage_recovered();
            log::info!(
                "the outbox log is written again ({how}; {} bytes); offline messages are accepted",
                log.len()
            );
        }
        Err(e) => {
            disk.failed(now, Some(failing.waited), failing.backlog);
            log::warn!("the outbox log still cannot be written: {e}");
        }
    }
}

/// Rewrites the log to just the live records.
pub fn compact(router: &mut Router, log: &mut Log) -> io::Result<()> {
    log.compact(&router.log_snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_messages_never_reach_the_log_later() {
        let store = |user: &str, seq| Record::Store {
            user: user.into(),
            seq,
            id: seq,
            ts: 1,
            from: "alice".into(),
            body: "b".into(),
            notified: false,
        };
        let ack = Record::Ack {
            user: "bob".into(),
            seq: 9,
        };
        let mut records = Vec::new();
        for r in [
            store("bob", 1),
            ack.clone(),
            store("carol", 2),
            store("bob", 3),
        ] {
            r.encode(&mut records);
        }
        let taken_back: Vec<(Rc<str>, u64)> = vec![(Rc::from("bob"), 3), (Rc::from("carol"), 1)];
        let kept =
            crate::store::replay::Replay::read(&without_taken_back(&records, &taken_back)).records;
        assert_eq!(kept, [store("bob", 1), ack, store("carol", 2)]);
        assert_eq!(without_taken_back(&records, &[]), records);
    }

    #[test]
    fn the_backlog_is_bounded() {
        let full = vec![0u8; MAX_BACKLOG - 1];
        assert_eq!(
            keep_for_later(Some(Vec::new()), b"ab"),
            Some(b"ab".to_vec())
        );
        assert_eq!(
            keep_for_later(Some(full.clone()), b"a").map(|b| b.len()),
            Some(MAX_BACKLOG)
        );
        assert_eq!(
            keep_for_later(Some(full), b"ab"),
            None,
            "past the bound: a rewrite"
        );
        assert_eq!(keep_for_later(None, b"a"), None, "stays dropped");
    }

    #[test]
    fn the_backoff_table() {
        let ms = Duration::from_millis;
        for (previous, expected) in [
            (None, ms(250)),
            (Some(ms(250)), ms(500)),
            (Some(ms(1)), ms(250)),
            (Some(ms(20_000)), ms(30_000)),
            (Some(ms(30_000)), ms(30_000)),
            (Some(Duration::MAX), ms(30_000)),
        ] {
            assert_eq!(next_backoff(previous), expected, "{previous:?}");
        }
    }

    #[test]
    fn the_compaction_table() {
        let mib = 1 << 20;
        #[rustfmt::skip]
        let table = [
            // len,      live,     min,     compact
            (mib - 1,    0,        mib,     false), // small: cheap to replay
            (mib,        0,        mib,     true),
            (mib,        mib / 2,  mib,     false), // half live: not yet
            (mib,        mib / 2 - 1, mib,  true),
            (10 * mib,   10 * mib, mib,     false),
            (u64::MAX,   u64::MAX, 0,       false),
        ];
        for (len, live, min, expected) in table {
            assert_eq!(
                should_compact(len, live, min),
                expected,
                "{len} {live} {min}"
            );
        }
    }
}
