//! Batching of `join` and `leave` events.
//!
//! When the first thousand users arrive one by one, each arrival is an event
//! for everyone already online: half a million frames. Sent as they happen,
//! that is one write per user per loop turn and one queue entry per event.
//! Instead, the events of a short window are appended to one buffer, and
//! each user is owed a *suffix* of it: every event after the first one it
//! was sent (later events go to everyone still online, and a newcomer is
//! only ever owed events after its own arrival). When the window closes, the
//! buffer becomes shared bytes and each user gets one slice of it, so a
//! burst of arrivals costs one queue entry and one write per user.
//!
//! A user that is about to get anything else closes the window early (so
//! events never overtake or trail other messages); a user that is shed in
//! the middle of a window gets its part up to the shed event.

use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long the events of a window may wait: short enough that nobody sees it.
pub const WINDOW: Duration = Duration::from_millis(10);

/// A window this large closes at the end of the turn, whatever its age.
pub const MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct PresenceBatch {
    /// The window's frames, back to back.
    bytes: Vec<u8>,
    /// The last frame appended (kept alive, so its address is not reused
    /// while it identifies the broadcast in progress) and where it starts.
    last: Option<(Rc<[u8]>, usize)>,
    /// Connections owed a suffix (see `Connection::presence_from`). One paid
    /// a copy and then owed again appears twice; the first entry pays it.
    pub owed: Vec<usize>,
    /// When the window closes.
    pub due: Option<Instant>,
}

impl PresenceBatch {
    /// Appends `frame` unless it is the one appended last (a broadcast hands
    /// the same frame for every recipient); returns where it starts.
    pub fn append(&mut self, frame: &Rc<[u8]>) -> usize {
        if let Some((last, start)) = &self.last {
            if Rc::ptr_eq(last, frame) {
                return *start;
            }
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(frame);
        self.last = Some((frame.clone(), start));
        start
    }

    /// The window's bytes from `from` up to `to` (a copy for one user).
    pub fn copy(&self, from: usize, to: usize) -> Vec<u8> {
        debug_assert!(from <= to && to <= self.bytes.len(), "{from}..{to}");
        self.bytes.get(from..to).unwrap_or_default().to_vec()
    }

    /// Bytes in the window so far.
    pub fn end(&self) -> usize {
        self.bytes.len()
    }

    /// Starts the window's clock once someone is owed events.
    pub fn arm(&mut self, now: Instant) {
        if self.owed.is_empty() {
            self.due = None;
        } else if self.due.is_none() {
            self.due = Some(now + WINDOW);
        }
    }

    /// Whether the window should close now (arming it first).
    pub fn should_close(&mut self, now: Instant) -> bool {
        self.arm(now);
        self.due.is_some_and(|due| due <= now) || self.bytes.len() >= MAX_BYTES
    }

    /// Closes the window: its bytes, to be shared, and who is owed them.
    pub fn close(&mut self) -> (Rc<[u8]>, Vec<usize>) {
        let shared = Rc::from(&self.bytes[..]);
        self.bytes.clear();
        // A mass departure can leave a large buffer behind: don't keep it.
        if self.bytes.capacity() > MAX_BYTES {
            self.bytes = Vec::new();
        }
        self.last = None;
        self.due = None;
        (shared, std::mem::take(&mut self.owed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broadcast_is_appended_once_and_a_window_closes_when_due_or_full() {
        let mut batch = PresenceBatch::default();
        let now = Instant::now();
        assert!(!batch.should_close(now), "nobody owed: nothing to close");

        let join: Rc<[u8]> = Rc::from(&b"join"[..]);
        assert_eq!(batch.append(&join), 0);
        assert_eq!(batch.append(&join), 0, "same frame for the next recipient");
        let leave: Rc<[u8]> = Rc::from(&b"leave"[..]);
        assert_eq!(batch.append(&leave), 4);
        assert_eq!(batch.copy(4, 9), b"leave");

        batch.owed.push(7);
        assert!(!batch.should_close(now), "the window just opened");
        assert!(!batch.should_close(now + WINDOW / 2));
        assert!(batch.should_close(now + WINDOW));
        let (shared, owed) = batch.close();
        assert_eq!(&shared[..], b"joinleave");
        assert_eq!(owed, vec![7]);
        assert_eq!(batch.end(), 0);
        assert_eq!(batch.append(&join), 0, "a new window starts empty");

        batch.owed.push(1);
        let big: Rc<[u8]> = Rc::from(vec![b'x'; MAX_BYTES]);
        batch.append(&big);
        assert!(batch.should_close(now), "a full window closes at once");
    }
}
