//! The dashboard's memory: one sample a second of the figures it charts,
//! the last ten minutes of them, taken by the admin thread from engine
//! snapshots. Keeping them in the server (rather than in the page) means a
//! page opened late still shows the last minutes, and a page that was in a
//! background tab catches up in one request.

use std::collections::VecDeque;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::server::StatsSnapshot;

/// Samples kept: ten minutes at one a second.
pub const HISTORY_LEN: usize = 600;

/// The figures of one second.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Sample {
    /// Position in the history, from 1.
    pub seq: u64,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub t_ms: u64,
    /// Connections open.
    pub connections: u64,
    /// Connections accepted per second over the interval.
    pub accepts_per_s: f64,
    /// Connections closed per second.
    pub closes_per_s: f64,
    /// Frames received per second.
    pub msgs_in_per_s: f64,
    /// Frames queued for sending per second.
    pub msgs_out_per_s: f64,
    /// Bytes received per second.
    pub bytes_in_per_s: f64,
    /// Bytes sent per second.
    pub bytes_out_per_s: f64,
    /// Process CPU over the interval, in % of one core.
    pub cpu_pct: Option<f64>,
    /// Resident memory.
    pub rss_bytes: Option<u64>,
    /// Bytes queued for sending.
    pub send_queue_bytes: u64,
    /// Median request handling time over the interval (bucket bound), µs.
    pub handling_p50_us: Option<f64>,
    /// 99th percentile of it, µs.
    pub handling_p99_us: Option<f64>,
}

/// The sample ring and the snapshot the next rates are taken from.
#[derive(Debug)]
pub struct History {
    samples: VecDeque<Sample>,
    next_seq: u64,
    last: Option<(Instant, StatsSnapshot)>,
}

impl Default for History {
    fn default() -> Self {
        History {
            samples: VecDeque::with_capacity(HISTORY_LEN),
            next_seq: 1,
            last: None,
        }
    }
}

fn closed_total(s: &StatsSnapshot) -> u64 {
    s.closed.values().sum()
}

impl History {
    /// Adds the sample for the interval ending at `now` with snapshot `s`.
    /// The first call only sets the baseline.
    pub fn record(&mut self, now: Instant, s: StatsSnapshot) {
        let Some((then, prev)) = self.last.take() else {
            self.last = Some((now, s));
            return;
        };
        let dt = now.duration_since(then).as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
        let cpu_pct = match (prev.cpu_s, s.cpu_s) {
            (Some(a), Some(b)) => Some(((b - a) / dt * 100.0).max(0.0)),
            _ => None,
        };
        // Latency of this interval alone: the difference of the cumulative
        // buckets.
        let mut interval = s.latency.clone();
        interval.count = s.latency.count.saturating_sub(prev.latency.count);
        for (b, p) in interval.buckets.iter_mut().zip(&prev.latency.buckets) {
            b.count = b.count.saturating_sub(p.count);
        }
        let sample = Sample {
            seq: self.next_seq,
            t_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            connections: s.connections_open,
            accepts_per_s: rate(prev.connections_accepted, s.connections_accepted),
            closes_per_s: rate(closed_total(&prev), closed_total(&s)),
            msgs_in_per_s: rate(prev.frames_in, s.frames_in),
            msgs_out_per_s: rate(prev.frames_out, s.frames_out),
            bytes_in_per_s: rate(prev.bytes_in, s.bytes_in),
            bytes_out_per_s: rate(prev.bytes_out, s.bytes_out),
            cpu_pct,
            rss_bytes: s.rss_bytes,
            send_queue_bytes: s.send_queue_bytes,
            handling_p50_us: interval.quantile(0.5).map(|v| v * 1e6),
            handling_p99_us: interval.quantile(0.99).map(|v| v * 1e6),
        };
        self.next_seq += 1;
        if self.samples.len() == HISTORY_LEN {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        self.last = Some((now, s));
    }

    /// Samples after `after` (by seq), oldest first.
    pub fn since(&self, after: u64) -> Vec<Sample> {
        self.samples
            .iter()
            .filter(|s| s.seq > after)
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rates_come_from_differences_and_history_is_bounded() {
        let mut h = History::default();
        let t0 = Instant::now();
        let mut s = StatsSnapshot {
            frames_in: 100,
            connections_accepted: 5,
            cpu_s: Some(1.0),
            ..Default::default()
        };
        h.record(t0, s.clone());
        assert!(h.since(0).is_empty());
        s.frames_in = 300;
        s.connections_accepted = 9;
        s.cpu_s = Some(1.5);
        s.connections_open = 4;
        h.record(t0 + Duration::from_secs(2), s.clone());
        let v = h.since(0);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].msgs_in_per_s, 100.0);
        assert_eq!(v[0].accepts_per_s, 2.0);
        assert_eq!(v[0].cpu_pct, Some(25.0));
        assert_eq!(v[0].connections, 4);
        for i in 0..HISTORY_LEN + 10 {
            h.record(t0 + Duration::from_secs(3 + i as u64), s.clone());
        }
        let all = h.since(0);
        assert_eq!(all.len(), HISTORY_LEN);
        assert_eq!(h.since(all[HISTORY_LEN - 2].seq).len(), 1);
    }
}
