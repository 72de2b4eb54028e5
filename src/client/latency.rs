//! Round-trip times in an HDR histogram, shared by the client window
//! ([`run_messages`](super::run_messages)) and `cport stress`: one set of
//! bounds and precision, percentiles read one way, and a plain
//! (value, count) form that crosses process boundaries and merges.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Longest round trip recorded exactly; longer ones are clamped to it.
const MAX_US: u64 = 60_000_000;

/// Round-trip times in microseconds (1 µs to 60 s, 3 significant digits).
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

/// Summary of a [`Latency`], in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Round trips recorded.
    pub count: u64,
    /// Fastest.
    pub min: u64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest.
    pub max: u64,
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Latency {
        Latency {
            // The bounds are constants that hdrhistogram accepts (low >= 1,
            // high >= 2 * low, sigfig <= 5), so this cannot fail.
            hist: Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"),
        }
    }

    /// Records one round trip (at least 1 µs, at most 60 s).
    pub fn record(&mut self, rtt: Duration) {
        let us = (rtt.as_micros() as u64).clamp(1, MAX_US);
        // In bounds by the clamp above.
        let _ = self.hist.record(us);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so nothing is out of range.
        let _ = self.hist.add(&other.hist);
    }

    /// Round trips recorded.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// p50/p90/p99/p99.9/max and friends (all zero when empty).
    pub fn percentiles(&self) -> Percentiles {
        if self.hist.is_empty() {
            return Percentiles::default();
        }
        let h = &self.hist;
        Percentiles {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }

    /// The round trip at percentile `p` (0 to 100), in µs (0 when empty).
    pub fn value_at_percentile(&self, p: f64) -> u64 {
        self.hist.value_at_percentile(p.clamp(0.0, 100.0))
    }

    /// `n` equal-width bins from the fastest round trip to `upto` µs, as
    /// (from, to, count); round trips above `upto` are left out (so a few
    /// slow ones do not squeeze the rest into one bar). Empty when nothing
    /// was recorded.
    pub fn bins(&self, n: usize, upto: u64) -> Vec<(u64, u64, u64)> {
        if self.hist.is_empty() || n == 0 {
            return Vec::new();
        }
        let lo = self.hist.min();
        let hi = upto.max(lo + 1);
        let width = (hi - lo).div_ceil(n as u64).max(1);
        let mut bins: Vec<(u64, u64, u64)> = (0..n as u64)
            .map(|i| (lo + i * width, lo + (i + 1) * width, 0))
            .take_while(|b| b.0 <= hi)
            .collect();
        for v in self.hist.iter_recorded() {
            let x = self.hist.highest_equivalent(v.value_iterated_to());
            let x = x.max(lo);
            if x > hi {
                continue;
            }
            let i = (((x - lo) / width) as usize).min(bins.len() - 1);
            bins[i].2 += v.count_at_value();
        }
        bins
    }

    /// The histogram as (value, count) pairs, one per non-empty bucket: a
    /// few thousand pairs at most, and exact to the histogram's precision
    /// when read back with [`from_counts`](Self::from_counts).
    pub fn to_counts(&self) -> Vec<(u64, u64)> {
        self.hist
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    /// Rebuilds a histogram from [`to_counts`](Self::to_counts) pairs
    /// (values out of range are clamped).
    pub fn from_counts(counts: &[(u64, u64)]) -> Latency {
        let mut l = Latency::new();
        for &(v, n) in counts {
            let _ = l.hist.record_n(v.clamp(1, MAX_US), n);
        }
        l
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_the_values_up_to_the_bound() {
        let mut l = Latency::new();
        for us in [100, 150, 199, 200, 900, 5000] {
            l.record(Duration::from_micros(us));
        }
        let b = l.bins(9, 1000);
        assert_eq!(b[0].0, 100);
        assert_eq!(b.iter().map(|x| x.2).sum::<u64>(), 5, "{b:?}");
        assert!(b.windows(2).all(|w| w[0].1 == w[1].0));
        let max = l.value_at_percentile(100.0);
        assert!((5000..=5005).contains(&max), "{max}");
        assert!(Latency::new().bins(10, 10).is_empty());
    }

    #[test]
    fn counts_round_trip_and_merge() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for i in 1..=1000u64 {
            a.record(Duration::from_micros(i));
            b.record(Duration::from_micros(i * 1000));
        }
        let a2 = Latency::from_counts(&a.to_counts());
        assert_eq!(a.percentiles(), a2.percentiles());
        let mut m = a2;
        m.merge(&Latency::from_counts(&b.to_counts()));
        let p = m.percentiles();
        assert_eq!(p.count, 2000);
        assert_eq!(p.min, 1);
        assert!((999_000..=1_001_000).contains(&p.max), "{p:?}");
        assert!((900..=1100).contains(&p.p50), "{p:?}");
    }

    #[test]
    fn empty_and_clamped() {
        let mut l = Latency::new();
        assert_eq!(l.percentiles(), Percentiles::default());
        l.record(Duration::ZERO);
        l.record(Duration::from_secs(3600));
        let p = l.percentiles();
        assert_eq!(p.min, 1);
        assert!(p.max >= MAX_US - MAX_US / 1000, "{p:?}");
    }
}
