//! Who is too slow: the one place that decides what happens to a frame for
//! a reader that is behind, and to the sender that keeps it busy.
//!
//! A reader is judged by what its socket has not accepted, never by a burst
//! that arrived this turn: the caller offers the queued bytes to the kernel
//! first when a verdict would be anything but `Queue` (see
//! `Post::deliver`), and asks again with what is left. All judgments are
//! pure functions of numbers, so the whole policy is tested as a table.
//!
//! - Public messages and presence are shed above the soft mark (a quarter of
//!   `--max-outbound`); the reader gets one `gap` with the count once it
//!   has drained.
//! - Private messages are never shed. Past the soft mark the sender is held
//!   (not read) until the reader drains below half the soft mark, or for at
//!   most `--slow-reader-after`: a flood's cost falls on the flooder, and a
//!   reader that drains steadily is never disconnected because of what
//!   others send it. A private that would pass `--max-outbound` is refused to
//!   its sender while the reader drains, and disconnects the reader (1008)
//!   only when its socket has accepted nothing for `--slow-reader-after`.
//! - Replies to a client's own requests are always queued (a reconnecting
//!   user's stored messages among them), but a client whose unread replies
//!   pass twice `--max-outbound` while it keeps asking is disconnected;
//!   short of that it is simply not read while its own backlog is at
//!   `--max-outbound`.
//! - Any backlog that makes no progress for `--write-timeout` ends the
//!   connection (`write stall`).
//! - Under memory pressure (see `budget`; read once per loop turn, so the
//!   usual frame pays one comparison for it): from the high mark, public
//!   messages and presence are shed for every reader with bytes still
//!   waiting, not only past the soft mark; at the budget itself, a private
//!   message that would wait is refused to its sender. Replies are queued
//!   as ever (each client's own are bounded by the read pause above).

use std::time::Duration;

use crate::timer::Tick;

pub use crate::budget::Pressure;
pub use crate::chat::Class;

/// The byte marks of the policy, from `--max-outbound`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    /// Unsent bytes a connection may hold.
    pub max: usize,
    /// Above this, public messages are shed and private senders held.
    pub soft: usize,
}

impl Marks {
    pub fn new(max_outbound: usize) -> Marks {
        Marks {
            max: max_outbound,
            soft: max_outbound / 4,
        }
    }

    /// Held senders are read again once their reader is below this.
    pub fn resume_below(self) -> usize {
        self.soft / 2
    }
}

/// The times of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    /// A reader whose socket took nothing this long while bytes waited is slow.
    pub slow_reader_after: Duration,
    /// A backlog that made no progress this long ends the connection.
    pub write_timeout: Duration,
}

/// What the socket has been doing with a reader's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// It took bytes recently, or has nothing waiting.
    Draining,
    /// Bytes wait and its socket has taken nothing for `slow_reader_after`.
    Stalled,
}

/// What to do with one frame for one reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Queue,
    /// Queue it, and read no more from its sender until the reader drains.
    QueueAndHoldSender,
    /// Drop it and count it for the reader's next `gap`.
    Shed,
    /// Do not queue it; its sender is told the reader is busy.
    Refuse,
    /// Do not queue it; close the reader with 1008 `slow consumer`.
    Disconnect,
}

/// The verdict for a frame of `len` bytes and `class` for a reader with
/// `backlog` unsent bytes (after the kernel was offered them), with the
/// process's memory `pressure` (as of this loop turn). `reader` is asked
/// only when the frame does not fit under the soft mark (the usual case
/// costs three comparisons).
pub fn admit(
    class: Class,
    backlog: usize,
    len: usize,
    reader: impl FnOnce() -> Reader,
    pressure: Pressure,
    marks: Marks,
) -> Verdict {
    let after = backlog.saturating_add(len);
    // With memory to spare, or nothing waiting (the frame goes out with this
    // turn's flush), a frame under the soft mark is queued.
    if after <= marks.soft && (pressure == Pressure::Normal || backlog == 0) {
        return Verdict::Queue;
    }
    match class {
        Class::Reply => Verdict::Queue,
        Class::Public | Class::Presence => {
            if backlog > marks.soft || (backlog > 0 && pressure >= Pressure::High) {
                Verdict::Shed
            } else {
                Verdict::Queue
            }
        }
        Class::Private if backlog > 0 && pressure == Pressure::Full => Verdict::Refuse,
        Class::Private if after <= marks.soft => Verdict::Queue,
        Class::Private => match (after <= marks.max, reader()) {
            (true, Reader::Draining) => Verdict::QueueAndHoldSender,
            (true, Reader::Stalled) => Verdict::Queue,
            (false, Reader::Draining) => Verdict::Refuse,
            (false, Reader::Stalled) => Verdict::Disconnect,
        },
    }
}

/// Whether anything but `Queue` could change if the kernel took more first.
pub fn worth_offering(verdict: Verdict) -> bool {
    verdict != Verdict::Queue
}

/// A reader's state from when its socket last took nothing (`stalled_since`:
/// set at a write that left bytes behind, moved on at each write that took
/// some, cleared when everything went out).
pub fn reader(stalled_since: Option<Tick>, now: Tick, times: Times) -> Reader {
    match stalled_since {
        Some(since) if now >= since + times.slow_reader_after => Reader::Stalled,
        _ => Reader::Draining,
    }
}

/// Whether a connection's backlog has made no progress for too long.
pub fn write_stalled(stalled_since: Option<Tick>, now: Tick, times: Times) -> bool {
    stalled_since.is_some_and(|since| now >= since + times.write_timeout)
}

/// When a stalled backlog ends the connection.
pub fn write_stall_deadline(stalled_since: Option<Tick>, times: Times) -> Option<Tick> {
    stalled_since.map(|since| since + times.write_timeout)
}

/// Whether a client that sent a request has piled up too many unread
/// replies: a `users` reply can be 100 times its request, so one read can
/// ask for far more than `--max-outbound` before the read pause acts.
pub fn asks_without_reading(own_backlog: usize, marks: Marks) -> bool {
    own_backlog > marks.max.saturating_mul(2)
}

/// Whether a connection may be read: not while its own unread output is at
/// `--max-outbound` (it is read again once that drains).
pub fn may_read(own_backlog: usize, marks: Marks) -> bool {
    own_backlog < marks.max
}

/// Whether the senders held for a reader may be read again.
pub fn may_release_senders(backlog: usize, marks: Marks) -> bool {
    backlog < marks.resume_below()
}

/// How long a sender is held for one reader at most.
pub fn hold_sender_until(now: Tick, times: Times) -> Tick {
    now + times.slow_reader_after
}

#[cfg(test)]
mod tests {
    use super::*;
    use Class::*;
    use Reader::*;
    use Verdict::*;

    #[test]
    fn the_admission_table() {
        let marks = Marks::new(1000); // soft 250
        #[rustfmt::skip]
        let table = [
            // class,   backlog, len, reader,   verdict
            (Public,    0,       900, Draining, Queue),    // a burst is judged by what was not taken
            (Public,    250,     10,  Draining, Queue),
            (Public,    251,     10,  Draining, Shed),
            (Public,    251,     10,  Stalled,  Shed),
            (Presence,  251,     10,  Draining, Shed),
            (Presence,  100,     10,  Stalled,  Queue),
            (Private,   240,     10,  Draining, Queue),
            (Private,   240,     11,  Draining, QueueAndHoldSender),
            (Private,   240,     11,  Stalled,  Queue),     // holding its sender would not help
            (Private,   990,     10,  Draining, QueueAndHoldSender),
            (Private,   990,     11,  Draining, Refuse),    // flooded: the sender hears it
            (Private,   990,     11,  Stalled,  Disconnect), // slow: the reader goes
            (Private,   0,       2000, Stalled, Disconnect),
            (Reply,     5000,    9000, Stalled, Queue),    // stored messages at a reconnect
            (Reply,     usize::MAX, 1, Draining, Queue),
        ];
        for (class, backlog, len, reader, verdict) in table {
            for pressure in [Pressure::Normal, Pressure::High] {
                // High pressure sheds more, but none of these rows.
                let high_sheds =
                    pressure == Pressure::High && matches!(class, Public | Presence) && backlog > 0;
                let expected = if high_sheds { Shed } else { verdict };
                assert_eq!(
                    admit(class, backlog, len, || reader, pressure, marks),
                    expected,
                    "{class:?} backlog {backlog} len {len} {reader:?} {pressure:?}"
                );
            }
        }
        assert!(!worth_offering(Queue));
        for verdict in [QueueAndHoldSender, Shed, Refuse, Disconnect] {
            assert!(worth_offering(verdict));
        }
    }

    #[test]
    fn the_memory_pressure_table() {
        use Pressure::{Full, High, Normal};
        let marks = Marks::new(1000); // soft 250
        #[rustfmt::skip]
        let table = [
            // class,   backlog, len, pressure, verdict
            (Public,    0,       10,  Full,   Queue),  // nothing waits: it goes out this turn
            (Public,    0,       900, High,   Queue),  // a burst, judged after the kernel took it
            (Public,    1,       10,  Normal, Queue),
            (Public,    1,       10,  High,   Shed),   // it would wait, and memory is short
            (Presence,  1,       10,  High,   Shed),
            (Public,    1,       10,  Full,   Shed),
            (Private,   1,       10,  High,   Queue),  // privates are never shed
            (Private,   1,       10,  Full,   Refuse), // at the budget: the sender hears it
            (Private,   0,       10,  Full,   Queue),
            (Private,   990,     11,  Full,   Refuse), // not disconnected: refused first
            (Reply,     1,       10,  Full,   Queue),  // replies are bounded per client
            (Reply,     5000,    10,  Full,   Queue),
        ];
        for (class, backlog, len, pressure, verdict) in table {
            assert_eq!(
                admit(class, backlog, len, || Stalled, pressure, marks),
                verdict,
                "{class:?} backlog {backlog} len {len} {pressure:?}"
            );
        }
        // A frame under the soft mark does not ask about the reader.
        for pressure in [Normal, High, Full] {
            let verdict = admit(
                Public,
                0,
                10,
                || unreachable!("reader asked"),
                pressure,
                marks,
            );
            assert_eq!(verdict, Queue);
        }
    }

    #[test]
    fn the_time_table() {
        let times = Times {
            slow_reader_after: Duration::from_secs(2),
            write_timeout: Duration::from_secs(30),
        };
        let clock = crate::timer::Clock::starting_now();
        let origin = clock.tick(std::time::Instant::now());
        let at = |secs: u64| origin + Duration::from_secs(secs);
        assert_eq!(reader(None, at(100), times), Draining);
        assert_eq!(reader(Some(at(0)), at(1), times), Draining);
        assert_eq!(reader(Some(at(0)), at(2), times), Stalled);
        assert!(!write_stalled(None, at(100), times));
        assert!(!write_stalled(Some(at(0)), at(29), times));
        assert!(write_stalled(Some(at(0)), at(30), times));
        assert_eq!(write_stall_deadline(Some(at(1)), times), Some(at(31)));
        assert_eq!(hold_sender_until(at(5), times), at(7));
    }

    #[test]
    fn the_read_and_release_marks() {
        let marks = Marks::new(1000);
        assert!(may_read(999, marks));
        assert!(!may_read(1000, marks));
        assert!(!asks_without_reading(2000, marks));
        assert!(asks_without_reading(2001, marks));
        assert!(may_release_senders(124, marks));
        assert!(!may_release_senders(125, marks));
    }
}
