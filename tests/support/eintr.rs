//! Socket I/O that retries `ErrorKind::Interrupted` (EINTR).
//!
//! Test sockets have `SO_RCVTIMEO`/`SO_SNDTIMEO` set, and Linux never
//! restarts a timed socket call: a signal, or the test process being stopped
//! and continued (a debugger, a frozen CI cgroup), makes a blocked `recv` or
//! `send` fail with EINTR. `std`'s `read_exact`, `write_all` and `connect`
//! retry that themselves, a bare `read` or `write` does not, and neither
//! does tungstenite: its handshake, `read`, `send` and `flush` pass an
//! `Error::Io(Interrupted)` up (once seen as a failed
//! `held_messages_expire_with_a_receipt_and_are_not_delivered`, "read
//! failed: IO error: Interrupted system call"). So tungstenite clients run
//! on [`Restarting`], and bare reads go through [`retry`].

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};

/// Runs `op` again for as long as it fails with `Interrupted`.
pub fn retry<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            done => return done,
        }
    }
}

/// A `TcpStream` whose `read`, `write` and `flush` retry EINTR. It derefs
/// to the stream, so `get_ref().shutdown(..)` and the like still work.
#[derive(Debug)]
pub struct Restarting(pub TcpStream);

impl Read for Restarting {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        retry(|| self.0.read(buf))
    }
}

impl Write for Restarting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        retry(|| self.0.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        retry(|| self.0.flush())
    }
}

impl Deref for Restarting {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.0
    }
}

impl DerefMut for Restarting {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.0
    }
}
