//! Deadlines without scanning every connection.
//!
//! A min-heap of (deadline, slot, connection id). Each connection keeps its
//! true deadline itself and has at most one live entry here ("armed"): moving
//! a deadline later costs nothing (the entry fires early and is re-armed for
//! the new time), moving it earlier pushes one new entry. Entries of closed
//! connections, or of a slot reused by another connection, are recognised by
//! the id and dropped when they surface.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::num::NonZeroU64;
use std::ops::Add;
use std::time::{Duration, Instant};

/// A point in time: nanoseconds after the loop's [`Clock`] origin, plus one
/// so that `Option<Tick>` needs no tag. 8 bytes where an `Instant` takes 16;
/// every open connection keeps five of them, and a heap entry one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(NonZeroU64);

impl Add<Duration> for Tick {
    type Output = Tick;

    /// Saturates (584 years out) rather than overflow on an absurd duration.
    fn add(self, duration: Duration) -> Tick {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        Tick(self.0.saturating_add(nanos))
    }
}

/// Turns `Instant`s into [`Tick`]s and back.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock whose ticks count from now; earlier instants map to its origin.
    pub fn starting_now() -> Clock {
        Clock {
            origin: Instant::now(),
        }
    }

    pub fn tick(&self, at: Instant) -> Tick {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        let nanos = u64::try_from(nanos).unwrap_or(u64::MAX);
        Tick(NonZeroU64::MIN.saturating_add(nanos))
    }

    pub fn instant(&self, tick: Tick) -> Instant {
        self.origin + Duration::from_nanos(tick.0.get() - 1)
    }
}

#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Tick, usize, u64)>>,
}

impl Timers {
    pub fn push(&mut self, at: Tick, slot: usize, id: u64) {
        self.heap.push(Reverse((at, slot, id)));
    }

    /// The earliest entry's time, to bound how long the loop may sleep.
    pub fn next(&self) -> Option<Tick> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Removes and returns one entry due at `now`, if any.
    pub fn pop_due(&mut self, now: Tick) -> Option<(Tick, usize, u64)> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => self.heap.pop().map(|Reverse(entry)| entry),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ticks_keep_order_and_round_trip_to_the_nanosecond() {
        let clock = Clock::starting_now();
        let t0 = clock.instant(clock.tick(Instant::now()));
        let later = t0 + Duration::from_nanos(1);
        assert!(clock.tick(later) > clock.tick(t0));
        assert_eq!(clock.instant(clock.tick(later)), later);
        assert_eq!(
            clock.tick(t0) + Duration::from_secs(60),
            clock.tick(t0 + Duration::from_secs(60))
        );
        let before_origin = t0.checked_sub(Duration::from_secs(1)).unwrap_or(t0);
        assert!(clock.tick(before_origin) <= clock.tick(t0));
        let far = clock.tick(t0) + Duration::MAX;
        assert!(far > clock.tick(t0) + Duration::from_secs(86_400 * 365 * 500));
        assert_eq!(std::mem::size_of::<Option<Tick>>(), 8);
    }

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let clock = Clock::starting_now();
        let t0 = clock.tick(Instant::now());
        let mut timers = Timers::default();
        timers.push(t0 + Duration::from_secs(3), 1, 10);
        timers.push(t0 + Duration::from_secs(1), 2, 20);
        timers.push(t0 + Duration::from_secs(2), 3, 30);
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(timers.pop_due(t0), None);
        let due = t0 + Duration::from_secs(2);
        assert_eq!(timers.pop_due(due).map(|e| e.2), Some(20));
        assert_eq!(timers.pop_due(due).map(|e| e.2), Some(30));
        assert_eq!(timers.pop_due(due), None);
        assert_eq!(timers.len(), 1);
    }
}
