//! `cport stress`: the load generator — tens of thousands of connections
//! on cport's own completion port (no thread per connection), every echoed
//! byte verified, round trips in an HDR histogram, the server's CPU and
//! memory sampled through the run.
//!
//! It owns the load and its report; it must not hold presentation (the
//! progress display and the command line are `cli/stress.rs`) nor read
//! `/proc` itself (that is `port::sys`).
//!
//! - [`StressConfig`] says what to run; [`plan`] turns it into processes,
//!   source addresses and slices of connections.
//! - `load` runs one slice in this process: the [`Handler`](crate::server::Handler)
//!   that drives each connection, and the thread that connects at the
//!   ramp rate, times out connects and ends the run.
//! - `procs` runs slices in worker processes (this binary again, through
//!   [`WorkerCommand`]) and merges their counts and histograms;
//!   [`run_worker`] is the worker's side.
//! - `probe` samples the server through a STATS control connection or its
//!   pid; `report` assembles and prints the [`StressReport`], `html`
//!   draws it as a page with charts.
//!
//! Every run is bounded in time: the load stops at the end of its duration
//! (computed for interval mode when not given), replies get a bounded
//! drain, the engine's shutdown is bounded, and worker processes that
//! outlive all that are killed.

pub mod broadcast;
mod content;
mod html;
mod load;
mod probe;
mod procs;
mod report;

use std::ffi::OsString;
use std::io::{self, BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::port::BackendKind;

pub use probe::ServerPoint;
pub use probe::{ServerFigures, ServerWatch};
pub use report::{
    ByteCounts, ConnectionCounts, LatencyBin, MessageCounts, PercentilePoint, RunFacts,
    StressReport, Throughput, TimelinePoint,
};

/// How each connection loads the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The classic IOCP articles' scenario: each connection sends `messages` messages, one
    /// every `interval`, waiting for each echo, then stays open until every
    /// connection is done.
    Interval,
    /// One request outstanding per connection, back to back, for the
    /// duration: latency-focused.
    Pingpong,
    /// A window of requests outstanding per connection, topped up as echoes
    /// arrive, for the duration: throughput-focused.
    Flood,
}

impl Mode {
    /// Lower-case name, as `--mode` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Interval => "interval",
            Mode::Pingpong => "pingpong",
            Mode::Flood => "flood",
        }
    }
}

/// What to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StressConfig {
    /// Server addresses; connection `i` goes to `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// Source addresses to bind before connecting (empty: chosen by
    /// [`plan`], which binds none unless one source/destination pair would
    /// run out of ephemeral ports).
    pub sources: Vec<IpAddr>,
    /// Connections in all.
    pub connections: u64,
    /// Load pattern.
    pub mode: Mode,
    /// Messages per connection (interval mode).
    pub messages: u64,
    /// Time from one message to the next on a connection (interval mode).
    pub interval: Duration,
    /// Body bytes of each ECHO frame.
    pub size: usize,
    /// Requests outstanding per connection (flood mode).
    pub window: usize,
    /// How long the load runs (default: 10 s for pingpong and flood; for
    /// interval mode, long enough for the ramp, the connects and every
    /// message, see [`StressConfig::run_time`]).
    pub duration: Option<Duration>,
    /// Connects started per second over all processes (0: as fast as the
    /// cap on connects in flight allows).
    pub ramp: f64,
    /// A connect not done after this long fails (`connect_timeout`).
    pub connect_timeout: Duration,
    /// A request not answered after this long fails its connection.
    pub reply_timeout: Duration,
    /// Seed of the message contents.
    pub seed: u64,
    /// Worker threads (one completion port each) per process.
    pub threads: usize,
    /// Completion backend of the client's ports.
    #[serde(with = "backend_name")]
    pub backend: BackendKind,
    /// Processes to spread the connections over (`None`: as many as the
    /// descriptor limit needs, see [`plan`]).
    pub procs: Option<usize>,
    /// Speak raw echo instead of ECHO frames: each message is `size` bytes
    /// sent as they are, and the same bytes must come back (for
    /// `cport server --protocol raw` and any other echo server).
    #[serde(default)]
    pub raw: bool,
}

impl Default for StressConfig {
    fn default() -> Self {
        StressConfig {
            targets: Vec::new(),
            sources: Vec::new(),
            connections: 100,
            mode: Mode::Interval,
            messages: 3,
            interval: Duration::from_secs(3),
            size: 64,
            window: 16,
            duration: None,
            ramp: 0.0,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(10),
            seed: 1,
            threads: 1,
            backend: BackendKind::Auto,
            procs: None,
            raw: false,
        }
    }
}

/// Largest `--size`: four times the server's default frame limit.
pub const MAX_SIZE: usize = 4 << 20;
/// Most worker processes one run starts.
pub const MAX_PROCS: usize = 64;
/// Connections one process takes on before the load is spread over worker
/// processes: three quarters of this machine's 20,000-descriptor hard
/// limit, leaving room for the ports, pipes and a margin.
pub const CONNS_PER_PROC: u64 = 15_000;

mod backend_name {
    use super::BackendKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &BackendKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(b.name())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BackendKind, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl StressConfig {
    /// Checks the values a command line cannot check on their own.
    pub fn validate(&self) -> Result<(), String> {
        if self.targets.is_empty() {
            return Err("give at least one --connect ADDR".into());
        }
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.size > MAX_SIZE {
            return Err(format!(
                "--size {} is over the {MAX_SIZE}-byte limit (the server's default --max-frame is 1MiB)",
                self.size
            ));
        }
        if self.raw && self.size == 0 {
            return Err(
                "--size must be at least 1 byte in raw mode (an empty echo cannot be seen)".into(),
            );
        }
        if self.window == 0 {
            return Err("--window must be at least 1".into());
        }
        if self.threads == 0 || self.threads > 64 {
            return Err("--threads must be between 1 and 64".into());
        }
        if !self.ramp.is_finite() || self.ramp < 0.0 {
            return Err("--ramp must be a rate of connects per second, 0 or more".into());
        }
        if self.connect_timeout.is_zero() || self.reply_timeout.is_zero() {
            return Err("--connect-timeout and --reply-timeout must be above 0".into());
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return Err("--duration must be above 0".into());
        }
        if let Some(p) = self.procs
            && (p == 0 || p > MAX_PROCS)
        {
            return Err(format!("--worker-procs must be between 1 and {MAX_PROCS}"));
        }
        for s in &self.sources {
            if self.targets.iter().any(|t| t.is_ipv4() != s.is_ipv4()) {
                return Err(format!(
                    "source address {s} and the --connect addresses are not all of one family (IPv4 or IPv6)"
                ));
            }
        }
        Ok(())
    }

    /// How long the load runs before it stops sending: `duration` if
    /// given; otherwise 10 s for pingpong and flood, and for interval mode
    /// the ramp, a connect timeout, every message's interval and a reply
    /// timeout, plus 5 s.
    pub fn run_time(&self) -> Duration {
        if let Some(d) = self.duration {
            return d;
        }
        match self.mode {
            Mode::Pingpong | Mode::Flood => Duration::from_secs(10),
            Mode::Interval => {
                let ramp = if self.ramp > 0.0 {
                    Duration::from_secs_f64(self.connections as f64 / self.ramp)
                } else {
                    Duration::ZERO
                };
                let messages = u32::try_from(self.messages).unwrap_or(u32::MAX);
                ramp + self.connect_timeout
                    + self.interval.saturating_mul(messages)
                    + self.reply_timeout
                    + Duration::from_secs(5)
            }
        }
    }

    /// How long, after the load stops, replies still in flight are waited for.
    pub fn drain_time(&self) -> Duration {
        self.reply_timeout.min(Duration::from_secs(5))
    }

    /// The latest a whole run can take when nothing is wrong with cport
    /// itself: the run time, the drain, the engine's bounded shutdown,
    /// the sampler's last request, and the grace given to worker
    /// processes before they are killed, plus a margin. A process still
    /// running then is stuck; `cport stress` gives up on it.
    pub fn hard_deadline(&self) -> Duration {
        self.run_time() + self.drain_time() + Duration::from_secs(60)
    }

    /// The destination of connection `i`, and the address to bind it to.
    fn endpoints(&self, sources: &[IpAddr], i: u64) -> (SocketAddr, Option<SocketAddr>) {
        let t = self.targets.len() as u64;
        let target = self.targets[(i % t) as usize];
        let local = (!sources.is_empty())
            .then(|| SocketAddr::new(sources[((i / t) % sources.len() as u64) as usize], 0));
        (target, local)
    }
}

/// How a run is laid out over processes and addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Processes (1: this one; more: worker processes).
    pub procs: usize,
    /// Source addresses bound before connecting (empty: none).
    pub sources: Vec<IpAddr>,
    /// Per process: the global index of its first connection, and how many.
    pub slices: Vec<(u64, u64)>,
    /// What was decided and why, for the report.
    pub notes: Vec<String>,
}

/// Lays a run out. Processes: `cfg.procs`, or enough that none holds more
/// than [`CONNS_PER_PROC`] connections (a process may hold at most 20,000
/// open files here). Sources: `cfg.sources`, or, when every target is a
/// loopback address and one (source, destination) pair would need more
/// than three quarters of the ephemeral port range, enough addresses from
/// 127.0.0.2 up that none does.
pub fn plan(cfg: &StressConfig) -> Result<Plan, String> {
    cfg.validate()?;
    let mut notes = Vec::new();
    let n = cfg.connections;
    let procs = match cfg.procs {
        Some(p) => p,
        None => {
            let p = n.div_ceil(CONNS_PER_PROC) as usize;
            if p > 1 {
                notes.push(format!(
                    "{n} connections are more than one process should hold ({CONNS_PER_PROC}): \
                     {p} worker processes"
                ));
            }
            p
        }
    };
    if procs > MAX_PROCS {
        return Err(format!(
            "{n} connections would need {procs} processes, over the limit of {MAX_PROCS}"
        ));
    }
    let procs = procs.min(n as usize).max(1);
    let (lo, hi) = crate::port::sys::ephemeral_port_range().unwrap_or((32768, 60999));
    let ports = u64::from(hi - lo) + 1;
    let per_pair_max = ports * 3 / 4;
    let per_target = n.div_ceil(cfg.targets.len() as u64);
    let sources = if !cfg.sources.is_empty() {
        cfg.sources.clone()
    } else if per_target > per_pair_max {
        let loopback = cfg.targets.iter().all(|t| match t.ip() {
            IpAddr::V4(a) => a.is_loopback(),
            IpAddr::V6(_) => false,
        });
        if loopback {
            let k = per_target.div_ceil(per_pair_max).min(250) as u8;
            let s: Vec<IpAddr> = (0..k)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
                .collect();
            notes.push(format!(
                "{per_target} connections per destination are more than one source address \
                 has ephemeral ports for ({ports} in {lo}-{hi}): sources {}",
                describe_sources(&s)
            ));
            s
        } else {
            notes.push(format!(
                "{per_target} connections per destination may exhaust the {ports} ephemeral \
                 ports of one source address: give --source-range or more --connect addresses"
            ));
            Vec::new()
        }
    } else {
        Vec::new()
    };
    let base = n / procs as u64;
    let extra = n % procs as u64;
    let mut first = 0;
    let slices = (0..procs as u64)
        .map(|p| {
            let count = base + u64::from(p < extra);
            let s = (first, count);
            first += count;
            s
        })
        .collect();
    Ok(Plan {
        procs,
        sources,
        slices,
        notes,
    })
}

/// `127.0.0.2-127.0.0.3` for a contiguous list, else a comma list.
fn describe_sources(s: &[IpAddr]) -> String {
    match s {
        [] => "none".into(),
        [one] => one.to_string(),
        [first, .., last] => format!("{first}-{last}"),
    }
}

/// How this binary is started again as a worker process.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments (the hidden subcommand that calls [`run_worker`]).
    pub args: Vec<OsString>,
}

/// How to run, beyond what to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Set (e.g. by a Ctrl-C handler) to stop the run early; the report
    /// still comes back, marked interrupted.
    pub stop: Arc<AtomicBool>,
    /// How to start worker processes; without it a run that needs more
    /// than one process is refused.
    pub worker: Option<WorkerCommand>,
    /// Where the server's CPU and memory come from.
    pub server: ServerWatch,
}

/// Where a run stands, given to the caller's progress callback about four
/// times a second. Counts are cumulative.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Seconds since the run started.
    pub elapsed_s: f64,
    /// Connections asked for.
    pub requested: u64,
    /// Connections that opened so far.
    pub opened: u64,
    /// Connections open now.
    pub open: u64,
    /// Connections that failed so far.
    pub failed: u64,
    /// Messages sent.
    pub sent: u64,
    /// Echoes received.
    pub received: u64,
    /// Echoes that did not match.
    pub mismatches: u64,
    /// Bytes sent (frames, headers included).
    pub bytes_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Echoes per second since the previous progress.
    pub msgs_per_s: f64,
}

impl Progress {
    fn add(&mut self, o: &Progress) {
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
        self.opened += o.opened;
        self.open += o.open;
        self.failed += o.failed;
        self.sent += o.sent;
        self.received += o.received;
        self.mismatches += o.mismatches;
        self.bytes_out += o.bytes_out;
        self.bytes_in += o.bytes_in;
    }
}

/// Runs a stress test: lays it out ([`plan`]), samples the server, runs the
/// slices here or in worker processes, and returns the merged report.
/// `on_progress` is called from this thread about four times a second.
///
/// Errors are for runs that cannot start (bad configuration, no port,
/// worker processes that cannot be spawned); everything that goes wrong
/// with connections is counted in the report instead.
pub fn run(
    cfg: &StressConfig,
    opts: &RunOptions,
    mut on_progress: impl FnMut(&Progress),
) -> io::Result<StressReport> {
    let plan = plan(cfg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if plan.procs > 1 && opts.worker.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "this run needs worker processes but no way to start them was given",
        ));
    }
    let open_now = Arc::new(AtomicU64::new(0));
    let probe = probe::Probe::start(opts.server.clone(), cfg.backend, open_now.clone());
    let start = Instant::now();
    let mut all_open = false;
    let mut last: Option<(Instant, u64)> = None;
    let mut timeline: Vec<TimelinePoint> = Vec::new();
    let mut point_from = (0.0, Progress::default());
    let mut tick = |p: &Progress| {
        let mut p = *p;
        let now = Instant::now();
        p.elapsed_s = now.duration_since(start).as_secs_f64();
        p.requested = cfg.connections;
        if let Some((t, r)) = last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 {
                p.msgs_per_s = p.received.saturating_sub(r) as f64 / dt;
            }
        }
        last = Some((now, p.received));
        open_now.store(p.open, Ordering::Relaxed);
        // The timeline: a point about once a second, rates since the last.
        let dt = p.elapsed_s - point_from.0;
        if timeline.is_empty() || dt >= 0.95 {
            let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt.max(1e-3);
            let q = &point_from.1;
            timeline.push(TimelinePoint {
                t_s: p.elapsed_s,
                open: p.open,
                opened: p.opened,
                failed: p.failed,
                sent_per_s: rate(q.sent, p.sent),
                received_per_s: rate(q.received, p.received),
                mb_per_s_received: rate(q.bytes_in, p.bytes_in) / 1e6,
            });
            point_from = (p.elapsed_s, p);
        }
        if !all_open && p.open == cfg.connections {
            // The moment the server should hold the most: sample it.
            all_open = true;
            probe.sample_now();
        }
        on_progress(&p);
    };
    let result = if plan.procs == 1 {
        let slice = load::Slice {
            first: 0,
            count: cfg.connections,
            ramp: cfg.ramp,
        };
        load::run_slice(cfg, &plan.sources, slice, &opts.stop, &mut tick)
    } else {
        let worker = opts
            .worker
            .as_ref()
            .ok_or_else(|| io::Error::other("no worker command"))?;
        procs::run_procs(cfg, &plan, worker, &opts.stop, &mut tick)
    };
    let server = probe.finish(start);
    let counts = result?;
    Ok(report::build(
        cfg,
        &plan,
        counts,
        server,
        start.elapsed(),
        timeline,
    ))
}

/// One line a worker process writes to its standard output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum WorkerLine {
    Progress(Progress),
    Result(Box<report::Counts>),
    Error(String),
}

/// What a worker process is asked to run (one JSON line on its stdin).
#[derive(Debug, Serialize, Deserialize)]
struct WorkerSpec {
    cfg: StressConfig,
    sources: Vec<IpAddr>,
    first: u64,
    count: u64,
    ramp: f64,
}

/// The worker process's side of [`run`]: reads its `WorkerSpec` as one
/// JSON line from `input`, runs that slice, and writes progress lines and
/// finally its counts as JSON lines to `output`. Anything more on `input`,
/// or its end (the parent closed the pipe, or died), stops the run early,
/// as does `stop`.
pub fn run_worker(
    mut input: impl BufRead + Send + 'static,
    mut output: impl Write,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    let mut line = String::new();
    input.read_line(&mut line)?;
    let spec: WorkerSpec = match serde_json::from_str(&line) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("bad worker spec: {e}");
            let _ = writeln!(output, "{}", json_line(&WorkerLine::Error(msg.clone())));
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
        }
    };
    let watch = stop.clone();
    std::thread::Builder::new()
        .name("cport-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            // Returns on EOF, an error, or any byte: all mean "stop".
            let _ = io::Read::read(&mut input, &mut buf);
            watch.store(true, Ordering::SeqCst);
        })?;
    let slice = load::Slice {
        first: spec.first,
        count: spec.count,
        ramp: spec.ramp,
    };
    let r = load::run_slice(&spec.cfg, &spec.sources, slice, &stop, |p: &Progress| {
        let _ = writeln!(output, "{}", json_line(&WorkerLine::Progress(*p)));
        let _ = output.flush();
    });
    let line = match &r {
        Ok(c) => WorkerLine::Result(Box::new(c.clone())),
        Err(e) => WorkerLine::Error(e.to_string()),
    };
    writeln!(output, "{}", json_line(&line))?;
    output.flush()?;
    r.map(drop)
}

fn json_line<T: Serialize>(v: &T) -> String {
    // Our own plain data types: serialising them cannot fail.
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n: u64) -> StressConfig {
        StressConfig {
            targets: vec!["127.0.0.1:9000".parse().unwrap()],
            connections: n,
            ..StressConfig::default()
        }
    }

    #[test]
    fn small_runs_stay_in_one_process_without_binding() {
        let p = plan(&cfg(100)).unwrap();
        assert_eq!(p.procs, 1);
        assert!(p.sources.is_empty());
        assert_eq!(p.slices, vec![(0, 100)]);
    }

    #[test]
    fn the_seeds_scenario_is_spread_over_processes_and_sources() {
        let p = plan(&cfg(30_000)).unwrap();
        assert_eq!(p.procs, 2);
        assert_eq!(p.slices, vec![(0, 15_000), (15_000, 15_000)]);
        assert!(p.sources.len() >= 2, "{p:?}");
        assert_eq!(p.sources[0], "127.0.0.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forced_processes_split_evenly() {
        let mut c = cfg(2001);
        c.procs = Some(2);
        let p = plan(&c).unwrap();
        assert_eq!(p.slices, vec![(0, 1001), (1001, 1000)]);
    }

    #[test]
    fn endpoints_cycle_targets_then_sources() {
        let mut c = cfg(8);
        c.targets.push("127.0.0.1:9001".parse().unwrap());
        let s: Vec<IpAddr> = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
        let e: Vec<_> = (0..4).map(|i| c.endpoints(&s, i)).collect();
        assert_eq!(e[0].0.port(), 9000);
        assert_eq!(e[1].0.port(), 9001);
        assert_eq!(e[0].1.unwrap().ip(), s[0]);
        assert_eq!(e[1].1.unwrap().ip(), s[0]);
        assert_eq!(e[2].1.unwrap().ip(), s[1]);
        assert_eq!(e[3].1.unwrap().port(), 0);
    }

    #[test]
    fn bad_values_are_refused() {
        let mut c = cfg(0);
        assert!(plan(&c).is_err());
        c.connections = 1;
        c.sources = vec!["::1".parse().unwrap()];
        assert!(plan(&c).is_err());
        c.sources.clear();
        c.procs = Some(0);
        assert!(plan(&c).is_err());
    }

    #[test]
    fn interval_runs_are_bounded_by_their_messages() {
        let mut c = cfg(10);
        c.messages = 3;
        c.interval = Duration::from_secs(3);
        assert_eq!(c.run_time(), Duration::from_secs(10 + 9 + 10 + 5));
        c.mode = Mode::Flood;
        assert_eq!(c.run_time(), Duration::from_secs(10));
        c.duration = Some(Duration::from_secs(2));
        assert_eq!(c.run_time(), Duration::from_secs(2));
    }
}
