//! The few things asked of the OS directly.

/// Raises the soft open-file limit to the hard limit (as servers that hold
/// many sockets do) and returns the limit now in force.
pub fn raise_fd_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// GCC's unwinder linked in (`libgcc_eh.a`) rather than loaded at start
// (`libgcc_s.so.1`, which std's own link line names): std needs it only for
// backtraces and unwinding panics, and the shared library's pages cost
// 60-140 KiB of start-up RSS (medians over 20 starts each, see docs/PERFORMANCE.md). What
// `-static-libgcc` does for C programs: with the unwinder's symbols defined,
// `--as-needed` leaves libgcc_s out (`ldd target/release/wschat` shows it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[link(name = "gcc_eh", kind = "static", modifiers = "-bundle")]
extern "C" {}

/// The part of Rust's start-up runtime this server needs, for a binary that
/// skips that runtime (`#![no_main]`, see `src/main.rs`):
/// - descriptors 0, 1 and 2 are made to exist (on `/dev/null` if closed), so
///   that a socket accepted later can never be one of them and receive log
///   lines meant for stderr;
/// - SIGPIPE is ignored, so writing to a peer that reset (`writev` takes no
///   `MSG_NOSIGNAL`) or to a log pipe whose reader left is an `EPIPE` error,
///   not the end of the process;
/// - SIGXFSZ is ignored, so a log that reaches the file-size limit
///   (`ulimit -f`, systemd's `LimitFSIZE`) is a write error (`EFBIG`), which
///   the store survives like a full disk, not the end of the process.
pub fn prepare_process() {
    for fd in 0..=2 {
        // SAFETY: fcntl(F_GETFD) only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: the path is a NUL-terminated literal. open takes the
            // lowest free descriptor, which is `fd` (the lower ones exist).
            if unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) } != fd {
                // Running on would risk exactly what this guards against
                // (std's runtime aborts here too).
                std::process::abort();
            }
        }
    }
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory effects.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

/// Calls `listen` again with a longer queue (Linux allows changing it on a
/// listening socket). Best effort: the default queue still works.
pub fn set_listen_backlog(listener: &impl AsRawFd, backlog: i32) {
    // SAFETY: listen on a valid socket descriptor has no memory effects.
    unsafe {
        libc::listen(listener.as_raw_fd(), backlog);
    }
}

/// Sets TCP_NODELAY on the listening socket. Linux copies it to each
/// connection whose handshake completes afterwards, which saves a
/// `setsockopt` per connection. Returns whether it took.
pub fn set_listener_nodelay(listener: &impl AsRawFd) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid local.
    unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Takes an exclusive `flock` on `file` without waiting; `Ok(false)` if
/// another open of the file holds one (another process, normally). The lock
/// lasts while this open stays open, and the kernel drops it when the
/// process ends, however it ends: no stale lock survives a `kill -9`.
pub fn try_lock_exclusive(file: &impl AsRawFd) -> io::Result<bool> {
    loop {
        // SAFETY: flock on a valid descriptor has no memory effects.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Gives the allocator's free memory back to the OS, after a crowd left
/// (see `budget::trim_due`): glibc returns only the top of its heap by
/// itself, and freed buffers between live ones stay in the process's RSS.
/// Elsewhere a no-op (other allocators decide for themselves).
pub fn give_back_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists and
    // releases free pages (madvise); it takes its own locks.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

use std::sync::atomic::{AtomicI32, Ordering};

/// The write end of the signal pipe, for the handler (which may only make
/// async-signal-safe calls: `write` is one).
static SIGNAL_WRITE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = SIGNAL_WRITE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: writing one byte from a valid local to a pipe is async-signal-safe.
        unsafe {
            libc::write(fd, (&byte as *const u8).cast(), 1);
        }
    }
}

/// SIGINT and SIGTERM turned into readiness on a pipe the event loop polls
/// (the self-pipe trick), so shutdown happens between loop turns.
pub struct ShutdownSignal {
    read: OwnedFd,
    _write: OwnedFd,
}

impl ShutdownSignal {
    pub fn install() -> io::Result<ShutdownSignal> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here only.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        SIGNAL_WRITE_FD.store(write.as_raw_fd(), Ordering::Relaxed);
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction with a plain handler and SA_RESTART is valid.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(ShutdownSignal {
            read,
            _write: write,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// Empties the pipe (readiness is edge-triggered).
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a local buffer of the given length.
        while unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Core::admit` skips its own `setsockopt` on this inheritance, and
    /// not for connections completed before the listener had the option.
    #[test]
    fn accepted_sockets_inherit_nodelay_set_before_their_handshake() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let early = std::net::TcpStream::connect(addr).expect("connect");
        assert!(set_listener_nodelay(&listener));
        let late = std::net::TcpStream::connect(addr).expect("connect");
        let (first, _) = listener.accept().expect("accept");
        let (second, _) = listener.accept().expect("accept");
        assert!(
            !first.nodelay().expect("read TCP_NODELAY"),
            "completed before"
        );
        assert!(
            second.nodelay().expect("read TCP_NODELAY"),
            "completed after"
        );
        assert!(!early.nodelay().expect("read") && !late.nodelay().expect("read"));
    }
}
