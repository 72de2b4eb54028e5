//! What a stress run found: the counts one process measures ([`Counts`],
//! which cross process boundaries as JSON and merge), and the
//! [`StressReport`] built from them, printed as text or written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::client::{Latency, Percentiles};
use crate::stress::probe::ServerFigures;
use crate::stress::{Mode, Plan, StressConfig, describe_sources};

/// One process's measurements (or several merged).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Counts {
    pub(crate) requested: u64,
    pub(crate) opened: u64,
    /// Most connections open at once (exact in one process; across
    /// processes, see `procs`).
    pub(crate) peak_open: u64,
    pub(crate) failed: BTreeMap<String, u64>,
    pub(crate) failure_examples: BTreeMap<String, String>,
    pub(crate) server_errors: BTreeMap<String, u64>,
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) mismatches: u64,
    pub(crate) bytes_out: u64,
    pub(crate) bytes_in: u64,
    /// Echoes received when the load stopped (rates are taken over the
    /// load, not the drain after it).
    pub(crate) received_at_stop: u64,
    pub(crate) bytes_in_at_stop: u64,
    pub(crate) bytes_out_at_stop: u64,
    /// Seconds from the start to the moment the load stopped.
    pub(crate) window_s: f64,
    pub(crate) elapsed_s: f64,
    /// The round-trip histogram as (µs, count) pairs.
    pub(crate) latency: Vec<(u64, u64)>,
    pub(crate) interrupted: bool,
    /// The backend the client's ports ran on.
    pub(crate) backend: String,
    /// CPU seconds the client process(es) used.
    pub(crate) cpu_s: f64,
}

impl Counts {
    /// Adds `o`'s counts; times are the longer of the two; histograms
    /// merge. Peaks add up (an upper bound: the caller that saw the
    /// processes side by side sets the real one).
    pub(crate) fn merge(&mut self, o: &Counts) {
        self.requested += o.requested;
        self.opened += o.opened;
        self.peak_open += o.peak_open;
        for (k, v) in &o.failed {
            *self.failed.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.failure_examples {
            self.failure_examples
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        for (k, v) in &o.server_errors {
            *self.server_errors.entry(k.clone()).or_default() += v;
        }
        self.sent += o.sent;
        self.received += o.received;
        self.lost += o.lost;
        self.mismatches += o.mismatches;
        self.bytes_out += o.bytes_out;
        self.bytes_in += o.bytes_in;
        self.received_at_stop += o.received_at_stop;
        self.bytes_in_at_stop += o.bytes_in_at_stop;
        self.bytes_out_at_stop += o.bytes_out_at_stop;
        self.window_s = self.window_s.max(o.window_s);
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
        let mut l = Latency::from_counts(&self.latency);
        l.merge(&Latency::from_counts(&o.latency));
        self.latency = l.to_counts();
        self.interrupted |= o.interrupted;
        self.cpu_s += o.cpu_s;
        if self.backend.is_empty() {
            self.backend = o.backend.clone();
        } else if !o.backend.is_empty() && o.backend != self.backend {
            self.backend = format!("{}+{}", self.backend, o.backend);
        }
    }

    /// Counts `n` connections as failed for `reason`.
    pub(crate) fn fail(&mut self, reason: &str, n: u64, example: String) {
        *self.failed.entry(reason.to_string()).or_default() += n;
        self.failure_examples
            .entry(reason.to_string())
            .or_insert(example);
    }
}

/// How the run was set up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunFacts {
    /// Load pattern.
    pub mode: Mode,
    /// Server addresses.
    pub targets: Vec<String>,
    /// Source addresses bound (empty: none).
    pub sources: Vec<String>,
    /// Processes the connections were spread over.
    pub procs: usize,
    /// Backend of the client's ports.
    pub backend: String,
    /// Messages per connection (interval mode).
    pub messages: u64,
    /// Milliseconds between messages (interval mode).
    pub interval_ms: u64,
    /// Body bytes per message.
    pub size: usize,
    /// Requests outstanding per connection (flood mode).
    pub window: usize,
    /// Seconds the load was allowed to run.
    pub run_time_s: f64,
    /// Connects per second asked for (0: as fast as allowed).
    pub ramp: f64,
    /// What the planner decided and why.
    pub notes: Vec<String>,
}

/// Connections.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectionCounts {
    /// Asked for.
    pub requested: u64,
    /// Opened.
    pub opened: u64,
    /// Failed: never opened, or ended before the run did (or, in interval
    /// mode, before their messages were answered).
    pub failed: u64,
    /// Failed connections by reason (`refused`, `connect_timeout`,
    /// `reset`, `closed_by_server`, `no_free_ports`, `no_descriptors`,
    /// `reply_timeout`, `unfinished`, ...).
    pub failed_by_reason: BTreeMap<String, u64>,
    /// One error message per reason.
    pub failure_examples: BTreeMap<String, String>,
    /// Most connections open at once.
    pub peak_open: u64,
}

/// Messages.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MessageCounts {
    /// ECHO frames sent.
    pub sent: u64,
    /// Echoes received.
    pub received: u64,
    /// Sent on connections that ended before the echo came.
    pub lost: u64,
    /// Echoes that were not byte for byte what was sent.
    pub mismatches: u64,
    /// ERROR frames from the server, by code name.
    pub server_errors: BTreeMap<String, u64>,
}

/// Bytes on the wire (frame headers included).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ByteCounts {
    /// Sent.
    pub sent: u64,
    /// Received.
    pub received: u64,
}

/// Rates over the load (from the start to the moment the load stopped).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Throughput {
    /// Seconds the rates are taken over.
    pub window_s: f64,
    /// Echoes received per second.
    pub msgs_per_s: f64,
    /// Megabytes (10^6) received per second.
    pub mb_per_s: f64,
    /// Megabytes sent per second.
    pub mb_per_s_sent: f64,
}

/// One point of the run's timeline, about a second after the previous
/// one: what the client saw (over every process).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the run started.
    pub t_s: f64,
    /// Connections open.
    pub open: u64,
    /// Connections opened so far.
    pub opened: u64,
    /// Connections failed so far.
    pub failed: u64,
    /// Messages sent per second since the previous point.
    pub sent_per_s: f64,
    /// Echoes received per second since the previous point.
    pub received_per_s: f64,
    /// Megabytes (10^6) received per second since the previous point.
    pub mb_per_s_received: f64,
}

/// One bar of the latency histogram: round trips from `from_us` up to
/// (not including) `to_us`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyBin {
    /// Lower bound, µs.
    pub from_us: u64,
    /// Upper bound, µs.
    pub to_us: u64,
    /// Round trips in it.
    pub count: u64,
}

/// One point of the latency percentile curve.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PercentilePoint {
    /// Percentile, 0 to 100.
    pub percentile: f64,
    /// Round trip at it, µs.
    pub us: u64,
}

/// Bars in the latency histogram.
const LATENCY_BINS: usize = 40;

/// Everything a run found; `--json` writes it as is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StressReport {
    /// How the run was set up.
    pub run: RunFacts,
    /// Connections.
    pub connections: ConnectionCounts,
    /// Messages.
    pub messages: MessageCounts,
    /// Bytes.
    pub bytes: ByteCounts,
    /// Rates.
    pub throughput: Throughput,
    /// Round-trip times in microseconds.
    pub latency_us: Percentiles,
    /// Round trips up to the 99.9th percentile in equal bins (the slowest
    /// 0.1 % are left out so that they do not squeeze the rest).
    #[serde(default)]
    pub latency_bins: Vec<LatencyBin>,
    /// The round trip at each percentile, from 0 to 100, denser towards the
    /// tail (p90, p99, p99.9, ...).
    #[serde(default)]
    pub latency_curve: Vec<PercentilePoint>,
    /// What the client saw, about once a second.
    #[serde(default)]
    pub timeline: Vec<TimelinePoint>,
    /// The server's CPU and memory, when they could be read.
    pub server: Option<ServerFigures>,
    /// CPU the client process(es) used over the run, in % of one core:
    /// near 100 per client thread, the client and not the server is the
    /// limit.
    pub client_cpu_pct: f64,
    /// Seconds the whole run took.
    pub elapsed_s: f64,
    /// Stopped early by a signal.
    pub interrupted: bool,
    /// Every connection opened and lasted, every message was answered
    /// byte for byte, and the run was not interrupted.
    pub ok: bool,
}

pub(crate) fn build(
    cfg: &StressConfig,
    plan: &Plan,
    c: Counts,
    server: Option<ServerFigures>,
    elapsed: std::time::Duration,
    timeline: Vec<TimelinePoint>,
) -> StressReport {
    let failed: u64 = c.failed.values().sum();
    let window = c.window_s.max(1e-6);
    let hist = Latency::from_counts(&c.latency);
    let latency = hist.percentiles();
    let latency_bins = hist
        .bins(LATENCY_BINS, latency.p999)
        .into_iter()
        .map(|(from_us, to_us, count)| LatencyBin {
            from_us,
            to_us,
            count,
        })
        .collect();
    let interval_short = cfg.mode == Mode::Interval && c.received < c.requested * cfg.messages;
    let ok = failed == 0
        && c.mismatches == 0
        && c.lost == 0
        && !c.interrupted
        && c.opened == c.requested
        && !interval_short;
    StressReport {
        run: RunFacts {
            mode: cfg.mode,
            targets: cfg.targets.iter().map(|t| t.to_string()).collect(),
            sources: plan.sources.iter().map(|s| s.to_string()).collect(),
            procs: plan.procs,
            backend: c.backend.clone(),
            messages: cfg.messages,
            interval_ms: cfg.interval.as_millis() as u64,
            size: cfg.size,
            window: cfg.window,
            run_time_s: cfg.run_time().as_secs_f64(),
            ramp: cfg.ramp,
            notes: plan.notes.clone(),
        },
        connections: ConnectionCounts {
            requested: c.requested,
            opened: c.opened,
            failed,
            failed_by_reason: c.failed,
            failure_examples: c.failure_examples,
            peak_open: c.peak_open,
        },
        messages: MessageCounts {
            sent: c.sent,
            received: c.received,
            lost: c.lost,
            mismatches: c.mismatches,
            server_errors: c.server_errors,
        },
        bytes: ByteCounts {
            sent: c.bytes_out,
            received: c.bytes_in,
        },
        throughput: Throughput {
            window_s: c.window_s,
            msgs_per_s: c.received_at_stop as f64 / window,
            mb_per_s: c.bytes_in_at_stop as f64 / 1e6 / window,
            mb_per_s_sent: c.bytes_out_at_stop as f64 / 1e6 / window,
        },
        latency_us: latency,
        latency_bins,
        latency_curve: percentile_curve(&hist),
        timeline,
        server,
        client_cpu_pct: c.cpu_s / c.elapsed_s.max(1e-6) * 100.0,
        elapsed_s: elapsed.as_secs_f64(),
        interrupted: c.interrupted,
        ok,
    }
}

/// Percentiles every tenth of a "nine" (p0, p20.6, ..., p90, ..., p99,
/// ..., p99.9, ...) as far as there are samples to tell them apart, then
/// the maximum.
fn percentile_curve(h: &Latency) -> Vec<PercentilePoint> {
    let n = h.count();
    if n == 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for tenth in 0..=60 {
        let tail = 10f64.powf(-(tenth as f64) / 10.0);
        if tail * (n as f64) < 1.0 {
            break;
        }
        let percentile = (1.0 - tail) * 100.0;
        out.push(PercentilePoint {
            percentile,
            us: h.value_at_percentile(percentile),
        });
    }
    out.push(PercentilePoint {
        percentile: 100.0,
        us: h.value_at_percentile(100.0),
    });
    out
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

fn bytes(b: u64) -> String {
    if b >= 1_000_000 {
        format!("{:.1} MB", b as f64 / 1e6)
    } else if b >= 10_000 {
        format!("{:.1} kB", b as f64 / 1e3)
    } else {
        format!("{b} B")
    }
}

impl StressReport {
    /// The report as aligned text lines (what `cport stress` prints).
    pub fn render(&self) -> String {
        let mut s = String::new();
        let r = &self.run;
        let what = match r.mode {
            Mode::Interval => format!("{} messages every {} ms", r.messages, r.interval_ms),
            Mode::Pingpong => "one request in flight per connection".to_string(),
            Mode::Flood => format!("{} requests in flight per connection", r.window),
        };
        let _ = writeln!(
            s,
            "cport stress: {} mode, {} connections -> {}, {} B bodies, {what}",
            r.mode.name(),
            self.connections.requested,
            r.targets.join(", "),
            r.size,
        );
        let sources: Vec<std::net::IpAddr> =
            r.sources.iter().filter_map(|x| x.parse().ok()).collect();
        let _ = writeln!(
            s,
            "  run          {} process(es), backend {}, sources {}, client cpu {:.0} %, elapsed {:.2} s{}",
            r.procs,
            if r.backend.is_empty() {
                "?"
            } else {
                &r.backend
            },
            if sources.is_empty() {
                "default".to_string()
            } else {
                describe_sources(&sources)
            },
            self.client_cpu_pct,
            self.elapsed_s,
            if self.interrupted {
                " (INTERRUPTED)"
            } else {
                ""
            }
        );
        for n in &r.notes {
            let _ = writeln!(s, "  note         {n}");
        }
        let c = &self.connections;
        let _ = writeln!(
            s,
            "  connections  requested {}  opened {}  failed {}  peak open {}",
            c.requested, c.opened, c.failed, c.peak_open
        );
        for (reason, n) in &c.failed_by_reason {
            let example = c
                .failure_examples
                .get(reason)
                .map(|e| format!("  (e.g. {e})"))
                .unwrap_or_default();
            let _ = writeln!(s, "    failed: {reason:<18} {n}{example}");
        }
        let m = &self.messages;
        let _ = writeln!(
            s,
            "  messages     sent {}  received {}  lost {}  mismatches {}",
            m.sent, m.received, m.lost, m.mismatches
        );
        for (code, n) in &m.server_errors {
            let _ = writeln!(s, "    server error: {code} {n}");
        }
        let _ = writeln!(
            s,
            "  bytes        sent {}  received {}",
            bytes(self.bytes.sent),
            bytes(self.bytes.received)
        );
        let t = &self.throughput;
        let _ = writeln!(
            s,
            "  throughput   {:.0} msgs/s  {:.2} MB/s received  {:.2} MB/s sent  (over {:.2} s)",
            t.msgs_per_s, t.mb_per_s, t.mb_per_s_sent, t.window_s
        );
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "  latency      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            l.count
        );
        match &self.server {
            None => {
                let _ = writeln!(s, "  server       not sampled");
            }
            Some(f) => {
                let pct = |x: Option<f64>| x.map_or("n/a".to_string(), |v| format!("{v:.1} %"));
                let _ = writeln!(
                    s,
                    "  server       cpu avg {}  peak {}  ({}, {} samples)",
                    pct(f.cpu_avg_pct),
                    pct(f.cpu_peak_pct),
                    f.source,
                    f.samples
                );
                if let (Some(a), Some(b)) = (f.rss_start_bytes, f.rss_peak_bytes) {
                    let per = f
                        .rss_per_connection_bytes
                        .map(|v| {
                            format!(
                                "  {:.0} B per connection at {} connections",
                                v, f.peak_connections
                            )
                        })
                        .unwrap_or_default();
                    let _ = writeln!(
                        s,
                        "               rss {} at start, peak {}{per}",
                        mib(a),
                        mib(b)
                    );
                }
                if let Some(e) = &f.error {
                    let _ = writeln!(s, "               note: {e}");
                }
            }
        }
        let _ = writeln!(
            s,
            "  result       {}",
            if self.ok {
                "ok".to_string()
            } else {
                let mut why = Vec::new();
                if c.failed > 0 {
                    why.push(format!("{} failed connections", c.failed));
                }
                if m.mismatches > 0 {
                    why.push(format!("{} mismatches", m.mismatches));
                }
                if m.lost > 0 {
                    why.push(format!("{} messages lost", m.lost));
                }
                if self.interrupted {
                    why.push("interrupted".into());
                }
                if why.is_empty() {
                    why.push("not every message was answered".into());
                }
                format!("FAILED: {}", why.join(", "))
            }
        );
        s
    }
}
