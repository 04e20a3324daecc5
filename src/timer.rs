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
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Timers {
    pub fn push(&mut self, at: Instant, slot: usize, id: u64) {
        self.heap.push(Reverse((at, slot, id)));
    }

    /// The earliest entry's time, to bound how long the loop may sleep.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Removes and returns one entry due at `now`, if any.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize, u64)> {
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
    fn pops_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
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
