//! Clocks, CPU accounting, /proc readings, a timer file descriptor and a PRNG.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// CLOCK_MONOTONIC in nanoseconds (the clock the timer fd counts in).
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec passed in.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// user + system CPU time of this process, in nanoseconds.
pub fn self_cpu_ns() -> u64 {
    // SAFETY: getrusage fills the struct passed in.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// utime + stime of process `pid` from /proc/PID/stat, in nanoseconds.
pub fn proc_cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11, 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000_000 / hz)
}

/// VmRSS of process `pid`, in KiB.
pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The core this process is pinned to, if exactly one (`taskset -c N`).
pub fn pinned_core() -> Option<usize> {
    // SAFETY: sched_getaffinity fills the cpu_set_t passed in.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    let cores: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads a bit of a valid cpu_set_t.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect();
    (cores.len() == 1).then(|| cores[0])
}

/// Busy time (all but idle and iowait) from /proc/stat, in nanoseconds: the
/// whole machine and, if given, one core. Includes softirq work, which
/// getrusage of a process on loopback misses.
fn busy_ns(core: Option<usize>) -> (Option<u64>, Option<u64>) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (None, None);
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let busy = |line: &str| -> Option<u64> {
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|f| f.parse().ok())
            .collect();
        (v.len() >= 5).then(|| (v.iter().sum::<u64>() - v[3] - v[4]) * 1_000_000_000 / hz)
    };
    let all = stat.lines().find(|l| l.starts_with("cpu ")).and_then(busy);
    let one = core.and_then(|c| {
        let name = format!("cpu{c} ");
        stat.lines().find(|l| l.starts_with(&name)).and_then(busy)
    });
    (all, one)
}

/// CPU time of this process, the server, its core and the machine.
#[derive(Clone, Copy)]
pub struct CpuMark {
    wall: u64,
    own: u64,
    server: Option<u64>,
    core: Option<usize>,
    core_busy: Option<u64>,
    machine_busy: Option<u64>,
}

/// Percent of one core over a window.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    pub own: f64,
    pub server: Option<f64>,
    /// (core, busy %) when pinned to one core: softirq work included.
    pub core: Option<(usize, f64)>,
    /// Everything else the machine did (other processes, kernel threads).
    pub other: Option<f64>,
}

impl CpuMark {
    pub fn take(pid: Option<u32>) -> CpuMark {
        let core = pinned_core();
        let (machine_busy, core_busy) = busy_ns(core);
        CpuMark {
            wall: now_ns(),
            own: self_cpu_ns(),
            server: pid.and_then(proc_cpu_ns),
            core,
            core_busy,
            machine_busy,
        }
    }

    pub fn until(&self, end: &CpuMark) -> CpuUse {
        let wall = end.wall.saturating_sub(self.wall).max(1) as f64;
        let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 * 100.0 / wall),
            _ => None,
        };
        let own = pct(Some(self.own), Some(end.own)).unwrap_or(0.0);
        let server = pct(self.server, end.server);
        let core = pct(self.core_busy, end.core_busy)
            .and_then(|busy| self.core.map(|c| (c, busy.min(100.0))));
        let other = pct(self.machine_busy, end.machine_busy)
            .map(|all| (all - own - server.unwrap_or(0.0)).max(0.0));
        CpuUse {
            own,
            server,
            core,
            other,
        }
    }
}

/// Lets timer wake-ups be precise (the default slack is 50 µs).
pub fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0);
    }
}

/// A CLOCK_MONOTONIC timerfd for nanosecond-precise wake-ups in the poll.
pub struct TimerFd {
    fd: OwnedFd,
    armed_at: u64,
}

impl TimerFd {
    pub fn new() -> io::Result<TimerFd> {
        // SAFETY: timerfd_create returns a new descriptor or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(TimerFd { fd, armed_at: 0 })
    }

    /// Fires once at the absolute monotonic time `at_ns`, or earlier: a
    /// deadline still to come that is sooner is kept (several schedules share
    /// the timer; each arms its next time again once woken). A deadline that
    /// has passed is replaced; the same deadline is not set twice.
    pub fn arm_at(&mut self, at_ns: u64) {
        if at_ns == self.armed_at
            || (self.armed_at != 0 && self.armed_at < at_ns && self.armed_at > now_ns())
        {
            return;
        }
        self.armed_at = at_ns;
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (at_ns % 1_000_000_000).max(1) as libc::c_long,
            },
        };
        // SAFETY: the fd is a timerfd and spec is a valid itimerspec.
        unsafe {
            libc::timerfd_settime(
                self.fd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            );
        }
    }

    /// Reads the expiry count so the next expiry is a new edge.
    pub fn clear(&mut self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a local buffer.
        unsafe {
            libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8);
        }
        self.armed_at = 0;
    }
}

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// xorshift64* : masks, keys and the default name prefix.
pub struct Rng(u64);

impl Rng {
    pub fn seeded() -> Rng {
        let seed = now_ns() ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        Rng(seed | 1)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[inline]
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_ne_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The soft open-file limit after raising it to the hard limit.
pub fn raise_fd_limit() -> usize {
    wschat::sys::raise_fd_limit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sooner_deadline_to_come_is_kept() {
        let mut t = TimerFd::new().unwrap();
        let now = now_ns();
        let (soon, later) = (now + 10_000_000_000, now + 20_000_000_000);
        t.arm_at(later);
        assert_eq!(t.armed_at, later);
        t.arm_at(soon);
        assert_eq!(t.armed_at, soon, "a sooner deadline replaces a later one");
        t.arm_at(later);
        assert_eq!(t.armed_at, soon, "a later one waits for the sooner");
        // A deadline that has passed (fired, not yet seen) is replaced.
        t.arm_at(now - 1);
        t.arm_at(later);
        assert_eq!(t.armed_at, later);
        t.clear();
        assert_eq!(t.armed_at, 0);
        t.arm_at(later);
        assert_eq!(t.armed_at, later);
    }
}
