//! When the outbox log is written, synced and compacted: group commit once
//! per loop turn, compaction when the log is large and mostly dead.

use std::io;

use crate::chat::Router;
use crate::log;
use crate::store::log::Log;

/// Whether a log of `len` bytes, of which `live` bytes are still needed,
/// should be rewritten: only once it is at least `min_bytes` (small logs
/// are cheap to replay) and more than half dead (so a rewrite at least
/// halves it, and the cost of rewriting is paid back).
pub fn should_compact(len: u64, live: u64, min_bytes: u64) -> bool {
    len >= min_bytes && len > live.saturating_mul(2)
}

/// Group commit: this turn's outbox records go to the log with one sync
/// (none for `None`: memory only). The caller releases the replies that
/// promised durability afterwards.
pub fn commit(
    router: &mut Router,
    log: Option<&mut Log>,
    compact_min_bytes: u64,
) -> io::Result<()> {
    let records = router.take_log_records();
    let Some(log) = log else {
        return Ok(());
    };
    if let Err(e) = log.append(&records) {
        log::error!("cannot write the outbox log: {e}");
        return Err(e);
    }
    if should_compact(log.len(), router.live_log_bytes() as u64, compact_min_bytes) {
        let before = log.len();
        compact(router, log)?;
        log::info!("outbox log compacted: {before} -> {} bytes", log.len());
    }
    Ok(())
}

/// Rewrites the log to just the live records.
pub fn compact(router: &mut Router, log: &mut Log) -> io::Result<()> {
    log.compact(&router.log_snapshot())
}

#[cfg(test)]
mod tests {
    use super::should_compact;

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
