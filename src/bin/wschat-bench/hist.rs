//! Latency histograms over `u64` nanoseconds: `hdrhistogram` with three
//! significant digits (at most 0.1 % relative error in a percentile), and
//! the one summary every scenario reports.

use hdrhistogram::Histogram as Hdr;

/// Significant decimal digits kept per value.
const DIGITS: u8 = 3;

#[derive(Clone)]
pub struct Histogram(Hdr<u64>);

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub fn new() -> Histogram {
        // Grows its range as values come (allocating only when a value
        // needs a larger power of two than any before).
        Histogram(Hdr::new(DIGITS).expect("3 significant digits is a valid precision"))
    }

    #[inline]
    pub fn record(&mut self, v: u64) {
        if self.0.record(v).is_err() {
            // Only when the range cannot grow that far.
            self.0.saturating_record(v);
        }
    }

    /// The standard summary, in microseconds.
    pub fn summary_us(&self) -> Summary {
        let h = &self.0;
        let us = |ns: u64| ns as f64 / 1000.0;
        Summary {
            count: h.len(),
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact_and_empty_is_zero() {
        let s = Histogram::new().summary_us();
        assert_eq!((s.count, s.p99, s.max), (0, 0.0, 0.0));
        let mut h = Histogram::new();
        for v in 1_000..=100_000 {
            h.record(v);
        }
        h.record(u64::MAX);
        let s = h.summary_us();
        assert_eq!(s.count, 99_002);
        assert!((s.p50 - 50.5).abs() / 50.5 < 0.001, "{s:?}");
        assert!((s.p99 - 99.0).abs() / 99.0 < 0.001, "{s:?}");
        assert!(s.max > 1e13, "a huge value is kept, not dropped: {s:?}");
    }
}
