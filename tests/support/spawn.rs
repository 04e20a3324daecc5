//! Starting the `wschat` binary and learning its address: the one place
//! that spawns it, waits for its `listening on ADDR` line on stderr and
//! keeps reading stderr afterwards (so the server never blocks on a full
//! pipe).
//!
//! Plain `std`, nothing else from the test crates, so that a bench can
//! include it too (`#[path = "../tests/support/spawn.rs"] mod spawn;`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How long the server may take to print its `listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The binary under test: `$WSCHAT_BIN` if set (e.g. a release build),
/// otherwise the one cargo built for this run.
pub fn bin() -> String {
    std::env::var("WSCHAT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_wschat").to_string())
}

/// Extracts the address from a line containing `listening on ADDR`.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    address_after(line, "listening on ")
}

/// Extracts the address that follows `marker` in `line` (`metrics on ADDR`
/// for `--metrics-listen`).
pub fn address_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let at = line.find(marker)?;
    line[at + marker.len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The server's stderr lines so far, shared with the thread reading them.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn lock(&self) -> MutexGuard<'_, Vec<String>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every line so far (without line ends).
    pub fn lines(&self) -> Vec<String> {
        self.lock().clone()
    }

    /// Every line so far, joined with `\n`.
    pub fn text(&self) -> String {
        self.lock().join("\n")
    }
}

/// What happens to the child's stderr once it has said where it listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterListening {
    /// Keep reading (and logging) it until the child closes it.
    KeepReading,
    /// Close our end before [`start_command`] returns, so the child's next
    /// log line meets a broken pipe.
    ClosePipe,
}

/// A started server: the process, where it listens, and its stderr.
/// Dropping it [stops](Spawned::stop) the process.
pub struct Spawned {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Log,
    /// The thread reading stderr; it ends when the child's stderr closes.
    reader: Option<JoinHandle<()>>,
}

impl Spawned {
    /// Kills the process (if it still runs), reaps it, and waits until its
    /// stderr is read to the end, so [`Spawned::log`] is then complete.
    pub fn stop(&mut self) {
        // Harmless for a child that has exited (or was already reaped).
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.reader.take().map(JoinHandle::join);
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The flags every test server starts with: a free loopback port and no
/// data directory (a later `--data-dir` wins).
pub const TEST_FLAGS: [&str; 4] = ["--listen", "127.0.0.1:0", "--data-dir", "none"];

/// `wschat ARGS` (the binary from [`bin`]), once it listens.
pub fn start(args: &[&str]) -> Spawned {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    start_command(cmd, AfterListening::KeepReading)
}

/// `wschat TEST_FLAGS EXTRA`, once it listens.
pub fn start_test_server(extra: &[&str]) -> Spawned {
    start(&[&TEST_FLAGS[..], extra].concat())
}

/// Spawns `cmd` (stdin and stdout null, stderr piped) and waits, up to
/// [`STARTUP_TIMEOUT`], for its first `listening on ADDR` line. Panics with
/// the stderr read so far if the child exits or stays silent first.
pub fn start_command(mut cmd: Command, after: AfterListening) -> Spawned {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let stderr = child.stderr.take().expect("child stderr is piped");
    let log = Log::default();
    let (tx, rx) = mpsc::channel();
    let thread_log = log.clone();
    let mut reader = Some(thread::spawn(move || {
        read_stderr(stderr, &thread_log, after, tx)
    }));
    let failure = match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(addr) => {
            if after == AfterListening::ClosePipe {
                // It has already dropped the pipe and is about to return.
                let _ = reader.take().map(JoinHandle::join);
            }
            return Spawned {
                child,
                addr,
                log,
                reader,
            };
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            "closed its stderr before printing `listening on ADDR`".to_string()
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            format!("did not print `listening on ADDR` within {STARTUP_TIMEOUT:?}, so it is killed")
        }
    };
    // Killing an exited child is harmless, and `wait` then gives its status.
    let _ = child.kill();
    let status = child
        .wait()
        .map_or_else(|e| format!("wait failed: {e}"), |s| s.to_string());
    let _ = reader.take().map(JoinHandle::join);
    panic!("{cmd:?} {failure} ({status}); stderr:\n{}", log.text());
}

/// Logs each stderr line, sends the first `listening on` address, and
/// returns at EOF (or right after the address, dropping the pipe first,
/// for [`AfterListening::ClosePipe`]).
fn read_stderr(
    stderr: ChildStderr,
    log: &Log,
    after: AfterListening,
    tx: mpsc::Sender<SocketAddr>,
) {
    let mut tx = Some(tx);
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // `read_until` retries EINTR itself.
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
        let addr = tx.as_ref().and(parse_listening(&line));
        log.lock().push(line);
        if let Some(addr) = addr {
            let tx = tx.take().expect("the address is sent once");
            if after == AfterListening::ClosePipe {
                drop(reader);
                let _ = tx.send(addr);
                return;
            }
            let _ = tx.send(addr);
        }
    }
}
