//! What `/metrics` says about the process itself, under the names every
//! Prometheus client library uses (`process_*`), so the usual dashboards and
//! alerts work unchanged.
//!
//! Read from `/proc` and libc only when `/metrics` is asked for: nothing
//! here runs on the chat path. The parsers are separate from the reads, so
//! they are tested on text. A figure that cannot be read (no `/proc`, an
//! unexpected format) is `None` and its family is left out of the output.

use std::time::Duration;

/// The process's figures at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub resident_memory_bytes: Option<u64>,
    /// User plus system CPU time.
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    /// The soft open-file limit (the one that refuses an `accept`).
    pub max_fds: Option<u64>,
    /// Unix time the process started, in seconds.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads the figures now (a handful of system calls and three small
    /// `/proc` files).
    pub fn read() -> ProcessStats {
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| parse_self_stat(&text));
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| parse_boot_time(&text));
        let page_size = sysconf(libc::_SC_PAGESIZE);
        let ticks_per_second = sysconf(libc::_SC_CLK_TCK).filter(|&ticks| ticks > 0);
        ProcessStats {
            resident_memory_bytes: stat
                .zip(page_size)
                .map(|(stat, page)| stat.rss_pages.saturating_mul(page)),
            cpu_seconds: cpu_time().map(|t| t.as_secs_f64()),
            open_fds: open_fds(),
            max_fds: max_fds(),
            start_time_seconds: match (stat, boot_time, ticks_per_second) {
                (Some(stat), Some(boot), Some(ticks)) => {
                    Some(boot as f64 + stat.start_ticks as f64 / ticks as f64)
                }
                _ => None,
            },
        }
    }
}

/// The fields of `/proc/self/stat` used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SelfStat {
    /// Field 22: clock ticks from boot to the process's start.
    start_ticks: u64,
    /// Field 24: resident set size in pages.
    rss_pages: u64,
}

/// Parses `/proc/self/stat` (proc(5)). The second field, the command name in
/// parentheses, may itself hold spaces and `)`, so fields are counted from
/// the last `)`.
fn parse_self_stat(text: &str) -> Option<SelfStat> {
    let (_, after_name) = text.rsplit_once(')')?;
    // The first field after the name is field 3 (state).
    let field = |number: usize| -> Option<u64> {
        after_name.split_whitespace().nth(number - 3)?.parse().ok()
    };
    Some(SelfStat {
        start_ticks: field(22)?,
        rss_pages: field(24)?,
    })
}

/// The `btime` line of `/proc/stat`: boot time, in seconds since the epoch.
fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf only reads a system constant.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok()
}

/// User plus system time of the whole process.
fn cpu_time() -> Option<Duration> {
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct passed in.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).ok()?)
            .checked_add(Duration::from_micros(u64::try_from(t.tv_usec).ok()?))
    };
    time(usage.ru_utime)?.checked_add(time(usage.ru_stime)?)
}

/// The entries of `/proc/self/fd`, less the one the listing itself holds
/// open while it runs.
fn open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(entries.saturating_sub(1))
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct passed in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    // `rlim_t` is 32 bits wide on 32-bit glibc targets (armv7).
    #[allow(clippy::unnecessary_cast)] // a u64 already on 64-bit targets
    Some(limit.rlim_cur as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line, with a command name made to hold `) ` and spaces.
    const STAT: &str = "4242 (wschat) x (1) S 1 4242 4242 0 -1 4194560 150 0 0 0 3 1 0 0 20 0 1 0 \
                        123456 5439488 431 18446744073709551615 1 1 0 0 0 0 0 4096 17664 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn self_stat_fields_are_counted_from_the_last_parenthesis() {
        assert_eq!(
            parse_self_stat(STAT),
            Some(SelfStat {
                start_ticks: 123_456,
                rss_pages: 431,
            })
        );
        assert_eq!(parse_self_stat("4242 (wschat) S 1 2"), None, "cut short");
        assert_eq!(parse_self_stat("no name at all"), None);
    }

    #[test]
    fn boot_time_is_the_btime_line() {
        let text = "cpu  1 2 3 4\nintr 5 6\nctxt 7\nbtime 1764250000\nprocesses 8\n";
        assert_eq!(parse_boot_time(text), Some(1_764_250_000));
        assert_eq!(parse_boot_time("cpu 1 2\n"), None);
        assert_eq!(parse_boot_time("btime soon\n"), None);
    }

    #[test]
    fn this_process_reads_plausibly() {
        if !std::path::Path::new("/proc/self/stat").exists() {
            return; // not Linux: every figure but the rlimit and CPU is None
        }
        let stats = ProcessStats::read();
        assert!(
            stats.resident_memory_bytes.is_some_and(|rss| rss > 0),
            "{stats:?}"
        );
        assert!(stats.open_fds.is_some_and(|fds| fds >= 3), "{stats:?}");
        assert!(stats.max_fds.is_some_and(|max| max > 0), "{stats:?}");
        assert!(stats.cpu_seconds.is_some_and(|cpu| cpu >= 0.0), "{stats:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        // Boot time plus ticks drifts from the wall clock by the clock's
        // adjustments since boot: plausible, not exact.
        let start = stats.start_time_seconds.unwrap_or(0.0);
        assert!((start - now).abs() < 3600.0, "{start} vs {now}");
    }
}
