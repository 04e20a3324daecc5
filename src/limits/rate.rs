//! How fast one sender may go: a token bucket kept as one number (GCRA,
//! the generic cell rate algorithm), and the rule that turns a sender who
//! keeps going past it into a closed connection. No clock here: every call
//! is given the time, in microseconds on whatever clock the caller keeps.

/// `per_second` events, up to `burst` at once; [`Rate::UNLIMITED`] admits all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Microseconds one event costs; 0: unlimited.
    interval_us: u64,
    /// How far ahead of now the bucket may be spent: `(burst - 1)` events.
    tolerance_us: u64,
}

impl Rate {
    pub const UNLIMITED: Rate = Rate {
        interval_us: 0,
        tolerance_us: 0,
    };

    /// `per_second` 0 is unlimited; a `burst` of 0 counts as 1.
    pub fn new(per_second: u32, burst: u32) -> Rate {
        if per_second == 0 {
            return Rate::UNLIMITED;
        }
        let interval_us = (1_000_000 / u64::from(per_second)).max(1);
        Rate {
            interval_us,
            tolerance_us: interval_us * u64::from(burst.max(1) - 1),
        }
    }

    pub fn is_unlimited(self) -> bool {
        self.interval_us == 0
    }
}

/// A bucket's state: the time at which it would be full again (its
/// "theoretical arrival time"). 0, the default, is a full bucket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    full_at_us: u64,
}

impl Bucket {
    /// Takes one event's worth at `now_us`; when the bucket is empty, takes
    /// nothing and says how long until one event would be admitted.
    #[inline]
    pub fn take(&mut self, rate: Rate, now_us: u64) -> Result<(), u64> {
        if rate.is_unlimited() {
            return Ok(());
        }
        // Under a clock that never goes back the bucket is never owed more
        // than a full burst plus one event; a clock that stepped back (a
        // wall clock) is held to that too, so it costs a sender at most one
        // interval, never the size of the step.
        let most = now_us.saturating_add(rate.tolerance_us + rate.interval_us);
        let full_at = self.full_at_us.max(now_us).min(most);
        let allowed_at = full_at - rate.tolerance_us.min(full_at);
        if now_us < allowed_at {
            self.full_at_us = full_at;
            return Err(allowed_at - now_us);
        }
        self.full_at_us = full_at + rate.interval_us;
        Ok(())
    }

    /// Whether the bucket is full at `now_us`: it then carries nothing a
    /// fresh bucket would not, and may be forgotten.
    pub fn is_full(&self, now_us: u64) -> bool {
        self.full_at_us <= now_us
    }
}

/// The message policy of one server: the rate, and what "sustained abuse"
/// is (see [`Allowance::charge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessagePolicy {
    pub rate: Rate,
    /// Refusals within `abuse_window_us` of the first that close the connection.
    pub abuse_refusals: u32,
    pub abuse_window_us: u64,
}

/// Refusals that close a connection (with [`ABUSE_WINDOW_US`]). Only a
/// refusal of a message sent before the time the previous refusal gave
/// (`retry_after_ms`) counts, and the very first: a client that waits as it
/// is told is never closed, however often it is refused.
pub const ABUSE_REFUSALS: u32 = 50;
pub const ABUSE_WINDOW_US: u64 = 10_000_000;

/// How early a message may come after a `retry_after_ms` and still count as
/// having waited: the server's clock is read once per loop turn, in
/// milliseconds.
const RETRY_SLACK_US: u64 = 1_000;

impl MessagePolicy {
    pub fn new(rate: Rate) -> MessagePolicy {
        MessagePolicy {
            rate,
            abuse_refusals: ABUSE_REFUSALS,
            abuse_window_us: ABUSE_WINDOW_US,
        }
    }
}

/// What one message costs its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    Admitted,
    /// Not routed: the sender may send again in this many milliseconds.
    Refused {
        retry_after_ms: u64,
    },
    /// Refused, and the refusal that makes the abuse sustained: close.
    RefusedAndClose {
        retry_after_ms: u64,
    },
}

/// One connection's message allowance: its bucket and its recent refusals.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    bucket: Bucket,
    /// When the current window of refusals began.
    window_start_us: u64,
    /// Refusals since `window_start_us` (0: no window open).
    refusals: u32,
    /// When the last refusal said the sender could send again (none yet).
    retry_at_us: Option<u64>,
}

impl Allowance {
    /// Charges one message at `now_us`. A refusal that counts (see
    /// [`ABUSE_REFUSALS`]) opens a window of `abuse_window_us` unless one is
    /// open; the `abuse_refusals`th that counts inside a window is
    /// [`Charge::RefusedAndClose`].
    #[inline]
    pub fn charge(&mut self, policy: &MessagePolicy, now_us: u64) -> Charge {
        match self.bucket.take(policy.rate, now_us) {
            Ok(()) => Charge::Admitted,
            Err(wait_us) => self.refuse(policy, now_us, wait_us),
        }
    }

    /// Counts a refusal (see [`Allowance::charge`]).
    #[cold]
    fn refuse(&mut self, policy: &MessagePolicy, now_us: u64, wait_us: u64) -> Charge {
        let retry_after_ms = wait_us.div_ceil(1000);
        let ignored_the_last = self
            .retry_at_us
            .is_none_or(|at| now_us.saturating_add(RETRY_SLACK_US) < at);
        self.retry_at_us = Some(now_us + retry_after_ms * 1000);
        if !ignored_the_last {
            return Charge::Refused { retry_after_ms };
        }
        let in_window = self.refusals > 0
            && now_us.saturating_sub(self.window_start_us) < policy.abuse_window_us;
        if in_window {
            self.refusals += 1;
        } else {
            self.window_start_us = now_us;
            self.refusals = 1;
        }
        if self.refusals >= policy.abuse_refusals {
            Charge::RefusedAndClose { retry_after_ms }
        } else {
            Charge::Refused { retry_after_ms }
        }
    }
}

/// Every connection's allowance, by slot (slots are dense). Holds nothing
/// while the rate is unlimited.
#[derive(Debug)]
pub struct MessageLimiter {
    policy: MessagePolicy,
    by_slot: Vec<Allowance>,
}

impl MessageLimiter {
    pub fn new(policy: MessagePolicy) -> MessageLimiter {
        MessageLimiter {
            policy,
            by_slot: Vec::new(),
        }
    }

    /// Charges one message from the connection in `slot`.
    #[inline]
    pub fn charge(&mut self, slot: usize, now_us: u64) -> Charge {
        if self.policy.rate.is_unlimited() {
            return Charge::Admitted;
        }
        match self.by_slot.get_mut(slot) {
            Some(allowance) => allowance.charge(&self.policy, now_us),
            None => self.charge_first(slot, now_us),
        }
    }

    /// The first message ever from a slot this high: room for it, then the charge.
    #[cold]
    fn charge_first(&mut self, slot: usize, now_us: u64) -> Charge {
        self.by_slot.resize(slot + 1, Allowance::default());
        self.by_slot[slot].charge(&self.policy, now_us)
    }

    /// The connection in `slot` is gone: its next tenant starts full.
    pub fn forget(&mut self, slot: usize) {
        if let Some(allowance) = self.by_slot.get_mut(slot) {
            *allowance = Allowance::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    const MS: u64 = 1_000;

    /// An event's time and what taking from the bucket then gives.
    type Event = (u64, Result<(), u64>);

    /// Each row: the rate, then (time, admitted?) for successive events
    /// on one bucket starting full.
    #[test]
    fn the_bucket_admits_a_burst_then_the_rate() {
        #[rustfmt::skip]
        let table: &[(Rate, &[Event])] = &[
            // 2/s, burst 3: three at once, then one per 500 ms.
            (Rate::new(2, 3), &[
                (10 * S, Ok(())), (10 * S, Ok(())), (10 * S, Ok(())),
                (10 * S, Err(500 * MS)),
                (10 * S + 499 * MS, Err(MS)),
                (10 * S + 500 * MS, Ok(())),
                (10 * S + 500 * MS, Err(500 * MS)),
                // A long pause refills to the burst, no further.
                (100 * S, Ok(())), (100 * S, Ok(())), (100 * S, Ok(())),
                (100 * S, Err(500 * MS)),
            ]),
            // Burst 1: exactly the rate.
            (Rate::new(4, 1), &[
                (S, Ok(())), (S, Err(250 * MS)), (S + 250 * MS, Ok(())),
                (S + 300 * MS, Err(200 * MS)),
            ]),
            // A burst of 0 counts as 1.
            (Rate::new(1, 0), &[(S, Ok(())), (S, Err(S))]),
            // Unlimited: everything, whenever.
            (Rate::UNLIMITED, &[(0, Ok(())), (0, Ok(())), (0, Ok(()))]),
            (Rate::new(0, 5), &[(0, Ok(())), (0, Ok(()))]),
            // A rate finer than a microsecond still costs something.
            (Rate::new(u32::MAX, 1), &[(S, Ok(())), (S, Err(1)), (S + 1, Ok(()))]),
            // Time zero is a time like any other.
            (Rate::new(1, 2), &[(0, Ok(())), (0, Ok(())), (0, Err(S))]),
        ];
        for (rate, events) in table {
            let mut bucket = Bucket::default();
            for (i, &(now, expected)) in events.iter().enumerate() {
                assert_eq!(
                    bucket.take(*rate, now),
                    expected,
                    "{rate:?} event {i} at {now}"
                );
            }
        }
    }

    #[test]
    fn a_clock_that_steps_back_costs_at_most_one_interval() {
        let rate = Rate::new(10, 5); // 100 ms each
        let mut bucket = Bucket::default();
        for _ in 0..5 {
            bucket.take(rate, 3600 * S).expect("the burst");
        }
        // The clock steps back an hour: the bucket counts as empty, not as
        // owed an hour.
        let back = 60 * S;
        assert_eq!(bucket.take(rate, back), Err(100 * MS));
        assert_eq!(bucket.take(rate, back + 100 * MS), Ok(()));
        // A step forward fills it (no more than a burst).
        let ahead = 7200 * S;
        for _ in 0..5 {
            bucket.take(rate, ahead).expect("full again");
        }
        assert!(bucket.take(rate, ahead).is_err());
        assert!(!bucket.is_full(ahead));
        assert!(bucket.is_full(ahead + S));
    }

    /// Each row: the events (time, expected charge) on one allowance.
    #[test]
    fn sustained_refusals_close_and_a_pause_forgives() {
        let policy = MessagePolicy {
            rate: Rate::new(1, 1),
            abuse_refusals: 3,
            abuse_window_us: 10 * S,
        };
        let refused = |ms| Charge::Refused { retry_after_ms: ms };
        let close = |ms| Charge::RefusedAndClose { retry_after_ms: ms };
        #[rustfmt::skip]
        let table: &[&[(u64, Charge)]] = &[
            // The third refusal within the window closes.
            &[(0, Charge::Admitted), (0, refused(1000)), (500 * MS, refused(500)),
              (998 * MS, close(2))],
            // Refusals spread wider than the window never add up.
            &[(0, Charge::Admitted), (0, refused(1000)), (0, refused(1000)),
              (10 * S, Charge::Admitted), (10 * S, refused(1000)), (10 * S, refused(1000)),
              (20 * S, Charge::Admitted), (20 * S, refused(1000))],
            // A sender that waits as told after each refusal is never
            // closed, however often it is refused (here half the time)...
            &[(0, Charge::Admitted), (0, refused(1000)),
              (S, Charge::Admitted), (S, refused(1000)),
              (2 * S, Charge::Admitted), (2 * S, refused(1000)),
              // (a millisecond early is the server's clock, not the client)
              (3 * S - MS, refused(1)), (3 * S, Charge::Admitted)],
            // ...but one that comes back early is counted, admissions in
            // between or not.
            &[(0, Charge::Admitted), (0, refused(1000)),
              (S - 2 * MS, refused(2)),
              (S, Charge::Admitted), (S, refused(1000)), (S + 500 * MS, close(500))],
            // A retry_after_ms is rounded up, never down to 0.
            &[(0, Charge::Admitted), (999_999, refused(1))],
        ];
        for (row, events) in table.iter().enumerate() {
            let mut allowance = Allowance::default();
            for (i, &(now, expected)) in events.iter().enumerate() {
                assert_eq!(
                    allowance.charge(&policy, now),
                    expected,
                    "row {row} event {i}"
                );
            }
        }
    }

    #[test]
    fn the_limiter_keeps_one_allowance_per_slot_and_forgets_it() {
        let mut limiter = MessageLimiter::new(MessagePolicy::new(Rate::new(1, 1)));
        assert_eq!(limiter.charge(5, 0), Charge::Admitted);
        assert_eq!(limiter.charge(2, 0), Charge::Admitted, "another slot");
        assert!(matches!(limiter.charge(5, 0), Charge::Refused { .. }));
        limiter.forget(5);
        assert_eq!(limiter.charge(5, 0), Charge::Admitted, "a new tenant");
        limiter.forget(99); // never used: nothing to forget
        let mut off = MessageLimiter::new(MessagePolicy::new(Rate::UNLIMITED));
        for _ in 0..100 {
            assert_eq!(off.charge(1_000_000, 0), Charge::Admitted);
        }
        assert!(off.by_slot.is_empty(), "no state while unlimited");
    }
}
