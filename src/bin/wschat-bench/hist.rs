//! A log-linear (HDR-style) latency histogram over `u64` nanoseconds.
//!
//! Values below 256 have a bucket each; above, every power of two is split
//! into 128 linear buckets, so a bucket is at most 1/128 of its lower bound
//! wide. A percentile reports the middle of its bucket: at most 0.4 %
//! relative error (well inside 1 %). The maximum and minimum are exact.

/// Linear buckets per power of two, as a number of bits.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// The largest index `index` can return, plus one.
const BUCKETS: usize = (((64 - SUB_BITS - 1) as usize) << SUB_BITS) + 2 * SUB as usize;

#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

fn index(v: u64) -> usize {
    let bits = 64 - v.leading_zeros();
    let shift = bits.saturating_sub(SUB_BITS + 1);
    ((shift as usize) << SUB_BITS) + (v >> shift) as usize
}

/// The lowest value and the width of bucket `i`.
fn bucket(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < 2 * SUB {
        return (i, 1);
    }
    let shift = (i >> SUB_BITS) - 1;
    let mantissa = i - (shift << SUB_BITS);
    (mantissa << shift, 1 << shift)
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value at quantile `q` (0..=1): the smallest recorded value with at
    /// least `q` of all values at or below it, to within the bucket width.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket(i);
                let mid = low + (width - 1) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

/// The standard summary, in microseconds.
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

impl Histogram {
    pub fn summary_us(&self) -> Summary {
        let us = |ns: u64| ns as f64 / 1000.0;
        Summary {
            count: self.count,
            p50: us(self.quantile(0.50)),
            p90: us(self.quantile(0.90)),
            p99: us(self.quantile(0.99)),
            p999: us(self.quantile(0.999)),
            max: us(self.max),
            mean: self.mean() / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_bucket_agree() {
        let mut v = 0u64;
        while v < u64::MAX / 3 {
            let i = index(v);
            assert!(i < BUCKETS, "{v}");
            let (low, width) = bucket(i);
            assert!(low <= v && v - low < width, "v {v} bucket {low}+{width}");
            assert!(width == 1 || width * SUB <= low, "bucket too wide at {v}");
            v = v * 3 / 2 + 1;
        }
        assert!(index(u64::MAX) < BUCKETS);
        let (low, width) = bucket(index(u64::MAX));
        assert_eq!(low.wrapping_add(width - 1), u64::MAX);
        for v in 0..100_000u64 {
            assert!(index(v) <= index(v + 1));
        }
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 50);
        assert_eq!(h.quantile(0.9), 90);
        assert_eq!(h.quantile(0.99), 99);
        assert_eq!(h.quantile(1.0), 100);
        assert_eq!(h.max(), 100);
        assert_eq!(h.min(), 1);
        assert_eq!(h.count(), 100);
    }

    #[test]
    fn quantiles_within_one_percent_of_exact() {
        // A skewed, wide distribution from a fixed xorshift sequence.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut values = Vec::new();
        let mut h = Histogram::new();
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x % 1_000_000) * (x >> 40 & 0xFF) + 300;
            values.push(v);
            h.record(v);
        }
        values.sort_unstable();
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            let rank = ((q * values.len() as f64).ceil() as usize).max(1);
            let exact = values[rank - 1] as f64;
            let got = h.quantile(q) as f64;
            assert!(
                (got - exact).abs() / exact <= 0.01,
                "q {q}: exact {exact} got {got}"
            );
        }
        assert_eq!(h.max(), *values.last().unwrap());
    }

    #[test]
    fn empty_and_merge() {
        let mut a = Histogram::new();
        assert_eq!(a.quantile(0.99), 0);
        assert_eq!(a.min(), 0);
        let mut b = Histogram::new();
        a.record(1_000);
        b.record(1_000_000);
        b.record(2_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.max(), 2_000_000);
        let p50 = a.quantile(0.5) as f64;
        assert!((p50 - 1_000_000.0).abs() / 1_000_000.0 < 0.01);
        let s = a.summary_us();
        assert_eq!(s.max, 2000.0);
    }
}
