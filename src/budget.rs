//! What peers make the server hold, in one ledger, and the rules that bound it.
//!
//! Three kinds of memory grow with what a peer sends or fails to read:
//! - outbound queues (`delivery::outbound`): bytes of frames owned by one
//!   queue, plus each queued entry; a frame shared by many queues (a public
//!   message, a presence window) is one copy whatever the readers, and is
//!   counted at its entry's size in each;
//! - partial messages (`ws::message`): a message being reassembled, at its
//!   buffer's capacity;
//! - request heads (`handshake`): a request head still arriving, at its
//!   buffer's capacity.
//!
//! The buffers report their own growth and release to the ledger (a
//! partial message and a head are a [`Charged`] buffer, which gives its
//! bytes back when dropped, however its connection ends), so the counts
//! are exact without any scan. The loop is single-threaded: the ledger is a
//! thread-local set of plain cells (each unit test thread has its own).
//!
//! The rules are pure functions of the counts and the [`Limits`]:
//! - at or above the high mark (three quarters of `--memory-budget`) new
//!   connections are answered 503 with `Retry-After`, and public messages
//!   and presence events are shed for any reader that has bytes waiting
//!   (see `delivery::policy::admit`);
//! - at the budget itself, private messages that would wait are refused to
//!   their sender, and a partial message that would grow past it (or past
//!   `--max-partial-bytes` for all partial messages together) ends its
//!   connection with 1009: the newest growth is refused, the messages
//!   already held keep their room and can finish.

use std::cell::Cell;
use std::ops::{Deref, DerefMut};

/// Bytes held, by kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub outbound: usize,
    pub partial: usize,
    pub heads: usize,
}

impl Held {
    pub fn total(self) -> usize {
        self.outbound
            .saturating_add(self.partial)
            .saturating_add(self.heads)
    }
}

/// The operator's bounds (`--memory-budget`, `--max-partial-bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Everything peers make the server hold, together.
    pub memory_budget: usize,
    /// All partial messages together.
    pub max_partial: usize,
}

impl Limits {
    /// No bounds: what a thread that was never configured (a unit test, a
    /// fuzz target) runs with.
    pub const UNLIMITED: Limits = Limits {
        memory_budget: usize::MAX,
        max_partial: usize::MAX,
    };

    /// At or above this, new connections are refused and public messages
    /// shed: three quarters of the budget, so the last quarter is left for
    /// what the connections already admitted are doing.
    pub fn high_mark(self) -> usize {
        self.memory_budget / 4 * 3
    }
}

/// How close the process is to its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    Normal,
    /// At or above the high mark: refuse newcomers, shed public messages.
    High,
    /// At or above the budget: refuse what would be held longer.
    Full,
}

pub fn pressure(held: Held, limits: Limits) -> Pressure {
    let total = held.total();
    if total >= limits.memory_budget {
        Pressure::Full
    } else if total >= limits.high_mark() {
        Pressure::High
    } else {
        Pressure::Normal
    }
}

/// Whether a new connection may be accepted.
pub fn admits_connection(held: Held, limits: Limits) -> bool {
    pressure(held, limits) == Pressure::Normal
}

/// Whether a partial message may grow by `more` bytes of capacity.
pub fn may_grow_partial(held: Held, limits: Limits, more: usize) -> bool {
    held.partial.saturating_add(more) <= limits.max_partial
        && held.total().saturating_add(more) <= limits.memory_budget
}

/// A buffer's new capacity when `needed` bytes must fit: as is if they do;
/// otherwise doubling (so a message of many small fragments is copied a
/// few times, not once per fragment), but never past `max` unless `needed`
/// itself is. A buffer grows with the bytes that arrived, never with a
/// length a peer only declared: a frame header naming megabytes reserves
/// nothing until they come.
pub fn grown_capacity(capacity: usize, needed: usize, max: usize) -> usize {
    if needed <= capacity {
        capacity
    } else {
        needed.max(capacity.saturating_mul(2).min(max))
    }
}

/// Give freed memory back to the OS once the held total has fallen this far
/// below its last peak (a crowd left): the allocator keeps freed pages
/// otherwise, and fragmentation can keep most of them.
pub const TRIM_AFTER_FALL: usize = 8 << 20;

/// Whether freed memory should be given back: the held total fell at
/// least [`TRIM_AFTER_FALL`] below the peak since the last time.
pub fn trim_due(peak: usize, total: usize) -> bool {
    peak.saturating_sub(total) >= TRIM_AFTER_FALL
}

/// The loop's memory of the ledger between turns.
#[derive(Debug, Default)]
pub struct Watch {
    /// The held total's peak since freed memory was last given back.
    peak: usize,
    /// Refusing newcomers (to log the first refusal of an episode only).
    pub refusing: bool,
}

impl Watch {
    /// Notes the held total at the end of a turn; true when freed memory
    /// should be given back now.
    pub fn note(&mut self, total: usize) -> bool {
        self.peak = self.peak.max(total);
        if trim_due(self.peak, total) {
            self.peak = total;
            return true;
        }
        false
    }
}

// --- The ledger ---------------------------------------------------------------

struct Ledger {
    outbound: Cell<usize>,
    partial: Cell<usize>,
    heads: Cell<usize>,
    limits: Cell<Limits>,
}

thread_local! {
    static LEDGER: Ledger = const {
        Ledger {
            outbound: Cell::new(0),
            partial: Cell::new(0),
            heads: Cell::new(0),
            limits: Cell::new(Limits::UNLIMITED),
        }
    };
}

/// Sets this thread's limits (the loop does, at start).
pub fn set_limits(limits: Limits) {
    LEDGER.with(|l| l.limits.set(limits));
}

pub fn limits() -> Limits {
    LEDGER.with(|l| l.limits.get())
}

/// What this thread holds now.
pub fn held() -> Held {
    LEDGER.with(|l| Held {
        outbound: l.outbound.get(),
        partial: l.partial.get(),
        heads: l.heads.get(),
    })
}

/// The pressure now.
pub fn current_pressure() -> Pressure {
    pressure(held(), limits())
}

/// Which count a buffer is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Outbound,
    Partial,
    Heads,
}

fn cell(ledger: &Ledger, kind: Kind) -> &Cell<usize> {
    match kind {
        Kind::Outbound => &ledger.outbound,
        Kind::Partial => &ledger.partial,
        Kind::Heads => &ledger.heads,
    }
}

#[inline]
pub fn charge(kind: Kind, bytes: usize) {
    LEDGER.with(|l| {
        let c = cell(l, kind);
        c.set(c.get().wrapping_add(bytes));
    });
}

#[inline]
pub fn refund(kind: Kind, bytes: usize) {
    LEDGER.with(|l| {
        let c = cell(l, kind);
        c.set(c.get().wrapping_sub(bytes));
    });
}

/// Refused: the bytes would pass a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBudget;

/// A byte buffer charged to the ledger at its capacity, from growth to drop.
#[derive(Debug)]
pub struct Charged<const KIND: u8> {
    bytes: Vec<u8>,
}

/// A request head still arriving.
pub type HeadBytes = Charged<HEADS>;
/// A message being reassembled.
pub type PartialBytes = Charged<PARTIAL>;

const HEADS: u8 = 0;
const PARTIAL: u8 = 1;

impl<const KIND: u8> Charged<KIND> {
    const KIND: Kind = if KIND == HEADS {
        Kind::Heads
    } else {
        Kind::Partial
    };

    pub fn new() -> Self {
        Charged { bytes: Vec::new() }
    }

    /// Makes room for `capacity` bytes in all. Refused, with nothing
    /// changed, if the growth would pass this thread's limits for partial
    /// messages.
    pub fn try_reserve_total(&mut self, capacity: usize) -> Result<(), OverBudget> {
        self.reserve_total(capacity, |more| may_grow_partial(held(), limits(), more))
    }

    /// Appends `piece`, growing by doubling up to `max` where it does not fit
    /// and without a limit: for a request head, which the reader bounds
    /// (`handshake::MAX_HEAD`) and admission control keeps few, and for
    /// bytes already reserved.
    pub fn extend(&mut self, piece: &[u8], max: usize) {
        let needed = self.bytes.len().saturating_add(piece.len());
        let capacity = grown_capacity(self.bytes.capacity(), needed, max);
        let _always = self.reserve_total(capacity, |_| true);
        self.bytes.extend_from_slice(piece);
    }

    fn reserve_total(
        &mut self,
        capacity: usize,
        may_grow: impl FnOnce(usize) -> bool,
    ) -> Result<(), OverBudget> {
        let before = self.bytes.capacity();
        if capacity > before {
            if !may_grow(capacity - before) {
                return Err(OverBudget);
            }
            self.bytes.reserve_exact(capacity - self.bytes.len());
            charge(Self::KIND, self.bytes.capacity() - before);
        }
        Ok(())
    }

    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

impl<const KIND: u8> Default for Charged<KIND> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const KIND: u8> Drop for Charged<KIND> {
    fn drop(&mut self) {
        refund(Self::KIND, self.bytes.capacity());
    }
}

impl<const KIND: u8> Deref for Charged<KIND> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl<const KIND: u8> DerefMut for Charged<KIND> {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(outbound: usize, partial: usize, heads: usize) -> Held {
        Held {
            outbound,
            partial,
            heads,
        }
    }

    const LIMITS: Limits = Limits {
        memory_budget: 1000,
        max_partial: 400,
    };

    #[test]
    fn the_pressure_table() {
        use Pressure::*;
        #[rustfmt::skip]
        let table = [
            // outbound, partial, heads, pressure, admits a connection
            (0,    0,   0,   Normal, true),
            (749,  0,   0,   Normal, true),
            (500,  200, 49,  Normal, true),
            (500,  200, 50,  High,   false), // 750: the high mark
            (0,    0,   750, High,   false), // heads count too
            (999,  0,   0,   High,   false),
            (600,  400, 0,   Full,   false), // 1000: the budget
            (usize::MAX, 1, 1, Full, false), // no overflow
        ];
        for (outbound, partial, heads, expected, admits) in table {
            let h = held(outbound, partial, heads);
            assert_eq!(pressure(h, LIMITS), expected, "{h:?}");
            assert_eq!(admits_connection(h, LIMITS), admits, "{h:?}");
        }
        assert_eq!(pressure(held(1 << 40, 0, 0), Limits::UNLIMITED), Normal);
    }

    #[test]
    fn the_partial_table() {
        #[rustfmt::skip]
        let table = [
            // outbound, partial, growth, may grow
            (0,   0,   400, true),  // exactly --max-partial-bytes
            (0,   0,   401, false),
            (0,   300, 100, true),
            (0,   300, 101, false), // the newest growth is refused
            (600, 300, 100, true),  // exactly the budget
            (601, 300, 100, false), // the budget binds before the partial bound
            (0,   0,   usize::MAX, false),
        ];
        for (outbound, partial, more, expected) in table {
            assert_eq!(
                may_grow_partial(held(outbound, partial, 0), LIMITS, more),
                expected,
                "outbound {outbound} partial {partial} more {more}"
            );
        }
    }

    #[test]
    fn capacity_doubles_with_what_arrived_up_to_the_limit() {
        #[rustfmt::skip]
        let table = [
            // capacity, needed, max, grown
            (0,     10,    100,   10),  // what arrived, not what a header declared
            (10,    10,    100,   10),  // fits: no growth
            (10,    11,    100,   20),  // doubling
            (10,    11,    11,    11),  // the message ends there: exactly
            (60,    61,    100,   100), // doubling stops at the limit
            (100,   150,   100,   150), // past it only as far as needed
            (0,     0,     100,   0),
        ];
        for (capacity, needed, max, grown) in table {
            assert_eq!(
                grown_capacity(capacity, needed, max),
                grown,
                "{capacity} {needed} {max}"
            );
        }
    }

    #[test]
    fn trimming_waits_for_a_large_fall() {
        assert!(!trim_due(0, 0));
        assert!(!trim_due(TRIM_AFTER_FALL - 1, 0));
        assert!(trim_due(TRIM_AFTER_FALL + 5, 5));
        assert!(!trim_due(5, TRIM_AFTER_FALL)); // rising is no fall
    }

    #[test]
    fn charged_buffers_account_their_capacity_until_dropped_and_refuse_past_the_limits() {
        // This test thread's own ledger.
        set_limits(Limits {
            memory_budget: 1 << 20,
            max_partial: 1000,
        });
        let mut a = PartialBytes::new();
        a.try_reserve_total(300).unwrap();
        a.extend(&[1; 300], 10_000);
        assert_eq!(super::held().partial, 300);
        a.try_reserve_total(600).unwrap();
        a.extend(&[2; 10], 10_000);
        assert_eq!(super::held().partial, 600);
        assert_eq!(&a[298..302], &[1, 1, 2, 2]);
        let mut b = PartialBytes::new();
        assert_eq!(b.try_reserve_total(401), Err(OverBudget));
        assert_eq!(b.capacity(), 0, "a refused growth changes nothing");
        b.try_reserve_total(400).unwrap();
        assert_eq!(super::held().partial, 1000);
        drop(a);
        assert_eq!(super::held().partial, 400);
        let mut head = HeadBytes::new();
        head.extend(&[b'G'; 5000], 8193); // heads are not refused here
        head.extend(&[b'E'; 1], 8193); // doubling, up to the bound
        assert_eq!(super::held().heads, 8193);
        drop((b, head));
        assert_eq!(super::held(), Held::default());
        set_limits(Limits::UNLIMITED);
    }
}
