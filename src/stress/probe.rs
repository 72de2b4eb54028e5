//! The server's CPU and memory through a run, sampled once a second from
//! its STATS reply (a control connection of its own) or from its pid
//! (`port::sys::process_usage_of`). Sampling never holds the run up: the
//! first sample is waited for at most a few seconds, and a server that
//! stops answering ends the sampling with a note, not the run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::Session;
use crate::frame::{Frame, cmd};
use crate::port::BackendKind;

/// Where the server's figures come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerWatch {
    /// Not sampled.
    Off,
    /// STATS (cmd 8) on a control connection to this address: its
    /// `cpu_s`, `rss_bytes` and `connections_open` (less the control
    /// connection itself).
    Stats(SocketAddr),
    /// `/proc/PID` of a server on this machine; connections are the
    /// client's own open count.
    Pid(u32),
}

/// The server's CPU and memory over a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerFigures {
    /// Where they came from ("stats 127.0.0.1:9000", "pid 1234").
    pub source: String,
    /// Samples taken (about one a second, one before the load and one after).
    pub samples: usize,
    /// CPU used over the run, in % of one core.
    pub cpu_avg_pct: Option<f64>,
    /// Highest CPU % over any one-second interval.
    pub cpu_peak_pct: Option<f64>,
    /// Resident memory before the load.
    pub rss_start_bytes: Option<u64>,
    /// Highest resident memory seen.
    pub rss_peak_bytes: Option<u64>,
    /// Most connections seen open at a sample.
    pub peak_connections: u64,
    /// Resident memory at that sample.
    pub rss_at_peak_connections_bytes: Option<u64>,
    /// (RSS at peak connections - RSS at start) / peak connections.
    pub rss_per_connection_bytes: Option<f64>,
    /// Why sampling stopped early or never started, if it did.
    pub error: Option<String>,
    /// The samples over the run, for charts.
    #[serde(default)]
    pub timeline: Vec<ServerPoint>,
}

/// One sample of the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerPoint {
    /// Seconds since the run started (the baseline sample is a little
    /// before 0).
    pub t_s: f64,
    /// CPU since the previous point (at least 0.9 s before), in % of one
    /// core; `None` for the first.
    pub cpu_pct: Option<f64>,
    /// Resident memory.
    pub rss_bytes: u64,
    /// Connections open at the server (less the sampler's own).
    pub connections: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    cpu_s: f64,
    rss: u64,
    conns: u64,
}

/// Takes one sample.
type Sampler = Box<dyn FnMut() -> Result<Sample, String> + Send>;

const EVERY: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest the run waits for the first (baseline) sample.
const FIRST_SAMPLE_WAIT: Duration = Duration::from_secs(5);

/// A sampling thread. Dropping its sender (in [`Probe::finish`]) stops it;
/// a `()` asks for a sample now.
pub(crate) struct Probe {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<(ServerFigures, Vec<Sample>)>>,
}

impl Probe {
    /// Starts sampling and waits (bounded) for the baseline sample.
    /// `client_open` is the client's open connection count (used with
    /// [`ServerWatch::Pid`]).
    pub(crate) fn start(
        watch: ServerWatch,
        backend: BackendKind,
        client_open: Arc<AtomicU64>,
    ) -> Probe {
        let (source, make): (String, Box<dyn FnOnce() -> Result<Sampler, String> + Send>) =
            match watch {
                ServerWatch::Off => {
                    return Probe {
                        stop: None,
                        thread: None,
                    };
                }
                ServerWatch::Stats(addr) => (
                    format!("stats {addr}"),
                    Box::new(move || stats_sampler(addr, backend)),
                ),
                ServerWatch::Pid(pid) => (
                    format!("pid {pid}"),
                    Box::new(move || Ok(pid_sampler(pid, client_open))),
                ),
            };
        let (stop_tx, stop_rx) = mpsc::channel();
        let (first_tx, first_rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("cport-probe".into())
            .spawn(move || sample_loop(source, make, stop_rx, first_tx))
            .ok();
        // Bounded: a server that does not answer must not hold up the run.
        let _ = first_rx.recv_timeout(FIRST_SAMPLE_WAIT);
        Probe {
            stop: Some(stop_tx),
            thread,
        }
    }

    /// Asks for a sample now, between the periodic ones (e.g. the moment
    /// every connection is open).
    pub(crate) fn sample_now(&self) {
        if let Some(tx) = &self.stop {
            let _ = tx.send(());
        }
    }

    /// Takes a last sample, stops, and computes the figures (`None` when
    /// not sampling), with the timeline's times relative to `origin`.
    pub(crate) fn finish(mut self, origin: Instant) -> Option<ServerFigures> {
        drop(self.stop.take());
        let (mut f, samples) = self.thread.take()?.join().ok()?;
        f.timeline = timeline(&samples, origin);
        Some(f)
    }
}

fn sample_loop(
    source: String,
    make: Box<dyn FnOnce() -> Result<Sampler, String> + Send>,
    stop: Receiver<()>,
    first: Sender<()>,
) -> (ServerFigures, Vec<Sample>) {
    let mut samples = Vec::new();
    let mut error = None;
    match make() {
        Err(e) => error = Some(e),
        Ok(mut sampler) => {
            loop {
                match sampler() {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
                let _ = first.send(());
                match stop.recv_timeout(EVERY) {
                    Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                    // Finished: one last sample after the load.
                    Err(RecvTimeoutError::Disconnected) => {
                        if let Ok(s) = sampler() {
                            samples.push(s);
                        }
                        break;
                    }
                }
            }
        }
    }
    let _ = first.send(());
    (figures(source, &samples, error), samples)
}

/// The samples as chart points: CPU over windows of at least 0.9 s (CPU
/// time comes in 10 ms ticks, and extra samples are taken between the
/// periodic ones), memory and connections at every sample.
fn timeline(s: &[Sample], origin: Instant) -> Vec<ServerPoint> {
    let secs = |at: Instant| {
        if at >= origin {
            at.duration_since(origin).as_secs_f64()
        } else {
            -origin.duration_since(at).as_secs_f64()
        }
    };
    let mut out = Vec::with_capacity(s.len());
    let mut from: Option<&Sample> = None;
    for x in s {
        let cpu_pct = match from {
            Some(a) if x.at.duration_since(a.at) >= Duration::from_millis(900) => {
                let dt = x.at.duration_since(a.at).as_secs_f64();
                Some(((x.cpu_s - a.cpu_s) / dt * 100.0).max(0.0))
            }
            Some(_) => continue,
            None => None,
        };
        from = Some(x);
        out.push(ServerPoint {
            t_s: secs(x.at),
            cpu_pct,
            rss_bytes: x.rss,
            connections: x.conns,
        });
    }
    out
}

fn stats_sampler(addr: SocketAddr, backend: BackendKind) -> Result<Sampler, String> {
    let mut session =
        Session::connect(addr, crate::client::engine_config(backend), REQUEST_TIMEOUT)
            .map_err(|e| format!("cannot open a STATS connection to {addr}: {e}"))?;
    Ok(Box::new(move || {
        let (reply, _) = session
            .request(Frame::new(cmd::STATS, b""), REQUEST_TIMEOUT)
            .map_err(|e| format!("STATS stopped answering: {e}"))?;
        if reply.cmd() != cmd::STATS {
            return Err(format!("STATS answered with command {}", reply.cmd()));
        }
        let v: serde_json::Value = serde_json::from_slice(&reply.body())
            .map_err(|e| format!("STATS reply is not JSON: {e}"))?;
        let cpu_s = v["cpu_s"]
            .as_f64()
            .ok_or("STATS reply has no cpu_s (a server that cannot read its own /proc?)")?;
        let rss = v["rss_bytes"]
            .as_u64()
            .ok_or("STATS reply has no rss_bytes")?;
        // Less our own control connection.
        let conns = v["connections_open"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(1);
        Ok(Sample {
            at: Instant::now(),
            cpu_s,
            rss,
            conns,
        })
    }))
}

fn pid_sampler(pid: u32, client_open: Arc<AtomicU64>) -> Sampler {
    Box::new(move || {
        let u = crate::port::sys::process_usage_of(pid)
            .ok_or_else(|| format!("cannot read /proc/{pid} (is the server still running?)"))?;
        Ok(Sample {
            at: Instant::now(),
            cpu_s: u.cpu.as_secs_f64(),
            rss: u.rss,
            conns: client_open.load(Ordering::Relaxed),
        })
    })
}

fn figures(source: String, s: &[Sample], error: Option<String>) -> ServerFigures {
    let mut f = ServerFigures {
        source,
        samples: s.len(),
        error,
        ..ServerFigures::default()
    };
    let (Some(first), Some(last)) = (s.first(), s.last()) else {
        return f;
    };
    let pct = |a: &Sample, b: &Sample| {
        let dt = b.at.duration_since(a.at).as_secs_f64();
        (dt > 0.0).then(|| ((b.cpu_s - a.cpu_s) / dt * 100.0).max(0.0))
    };
    f.cpu_avg_pct = pct(first, last);
    // Over windows of at least 0.9 s: CPU time comes in 10 ms ticks, so a
    // shorter window (the last one, after the load) would be noise.
    let mut peak: Option<f64> = None;
    let mut i = 0;
    for j in 1..s.len() {
        if s[j].at.duration_since(s[i].at) >= Duration::from_millis(900) {
            if let Some(p) = pct(&s[i], &s[j]) {
                peak = Some(peak.map_or(p, |q| q.max(p)));
            }
            i = j;
        }
    }
    f.cpu_peak_pct = peak.or(f.cpu_avg_pct);
    f.rss_start_bytes = Some(first.rss);
    f.rss_peak_bytes = s.iter().map(|x| x.rss).max();
    // The first sample with the most connections: RSS there, less the
    // baseline, spread over those connections.
    if let Some(at_peak) = s.iter().rev().max_by_key(|x| x.conns) {
        f.peak_connections = at_peak.conns;
        f.rss_at_peak_connections_bytes = Some(at_peak.rss);
        if at_peak.conns > 0 {
            f.rss_per_connection_bytes =
                Some(at_peak.rss.saturating_sub(first.rss) as f64 / at_peak.conns as f64);
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_from_samples() {
        let t0 = Instant::now();
        let mk = |s: u64, cpu: f64, rss: u64, conns: u64| Sample {
            at: t0 + Duration::from_secs(s),
            cpu_s: cpu,
            rss,
            conns,
        };
        let s = [
            mk(0, 1.0, 10_000_000, 0),
            mk(1, 1.1, 20_000_000, 5000),
            mk(2, 1.5, 30_000_000, 10_000),
            mk(3, 1.6, 30_000_000, 10_000),
            mk(4, 1.6, 12_000_000, 0),
        ];
        let f = figures("test".into(), &s, None);
        assert_eq!(f.samples, 5);
        assert!((f.cpu_avg_pct.unwrap() - 15.0).abs() < 1e-6, "{f:?}");
        assert!((f.cpu_peak_pct.unwrap() - 40.0).abs() < 1e-6, "{f:?}");
        assert_eq!(f.rss_peak_bytes, Some(30_000_000));
        assert_eq!(f.peak_connections, 10_000);
        assert_eq!(f.rss_at_peak_connections_bytes, Some(30_000_000));
        assert!((f.rss_per_connection_bytes.unwrap() - 2000.0).abs() < 1e-6);
        let t = timeline(&s, t0 + Duration::from_secs(1));
        assert_eq!(t.len(), 5);
        assert_eq!(t[0].t_s, -1.0);
        assert_eq!(t[0].cpu_pct, None);
        assert!((t[2].cpu_pct.unwrap() - 40.0).abs() < 1e-6, "{t:?}");
        assert_eq!(t[2].connections, 10_000);
        let mut close = s.to_vec();
        close.insert(2, mk(1, 1.2, 20_000_000, 6000));
        close[2].at += Duration::from_millis(100);
        assert_eq!(
            timeline(&close, t0).len(),
            5,
            "a sample 0.1 s after another is skipped"
        );
        let empty = figures("x".into(), &[], Some("no server".into()));
        assert_eq!(empty.samples, 0);
        assert!(empty.cpu_avg_pct.is_none());
    }
}
