//! When the outbox log is written, synced and compacted: group commit once
//! per loop turn, compaction when the log is large and mostly dead, and
//! what happens when the disk refuses (full, or failing): the turn's
//! offline messages are refused rather than promised, live chat goes on,
//! and the log is rewritten from memory once the disk takes it again.

use std::io;
use std::time::{Duration, Instant};

use crate::chat::{Outbox, Router};
use crate::log;
use crate::store::log::Log;

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

/// How long to wait before trying the disk again, after waiting
/// `previous` (none: the first failure): doubling, within bounds.
pub fn next_backoff(previous: Option<Duration>) -> Duration {
    match previous {
        None => FIRST_RETRY,
        Some(wait) => wait.saturating_mul(2).clamp(FIRST_RETRY, LONGEST_RETRY),
    }
}

/// Whether the log is being written, and if not, when to try again.
#[derive(Debug, Default)]
pub struct Disk {
    failing: Option<Failing>,
    /// After a compaction failed: not again before this.
    compact_not_before: Option<Instant>,
    /// Writes (appends, syncs, rewrites) that failed.
    pub write_failures: u64,
    /// Times the log was rewritten after failures and written again.
    pub recoveries: u64,
}

#[derive(Debug, Clone, Copy)]
struct Failing {
    retry_at: Instant,
    waited: Duration,
}

impl Disk {
    /// The log cannot be written now (`/healthz` says degraded).
    pub fn degraded(&self) -> bool {
        self.failing.is_some()
    }

    /// When the loop must wake to try the disk again.
    pub fn retry_at(&self) -> Option<Instant> {
        self.failing.map(|f| f.retry_at)
    }

    fn failed(&mut self, now: Instant) {
        self.write_failures += 1;
        let waited = next_backoff(self.failing.map(|f| f.waited));
        self.failing = Some(Failing {
            retry_at: now + waited,
            waited,
        });
    }
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
/// (none for `None`: memory only). While the disk fails, records are not
/// written at all (the state in memory is the truth, and the rewrite that
/// ends the failure writes all of it), and offline messages are refused.
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
    if let Some(failing) = disk.failing {
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
        disk.failed(now);
        router.storage_failed(out);
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

/// Rewrites the log from memory, which ends a failure if it succeeds.
fn retry(router: &mut Router, log: &mut Log, disk: &mut Disk, now: Instant) {
    match compact(router, log) {
        Ok(()) => {
            disk.failing = None;
            disk.recoveries += 1;
            router.storage_recovered();
            log::info!(
                "the outbox log is written again ({} bytes, rewritten from memory); offline messages are accepted",
                log.len()
            );
        }
        Err(e) => {
            disk.failed(now);
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
