//! `cport bench`: the same loads against cport and the servers users would
//! otherwise pick, side by side, in one run.
//!
//! Every server runs as a child process of its own ([`servers`]: cport
//! itself, and the peers of `cport-peer`, which live in the bench crate so
//! that this library depends on none of them), started fresh on a free
//! loopback port for each measurement and killed after it. The loads
//! ([`LoadSpec`]) are interleaved: for each load, every round runs every
//! server once, starting from a different server each round, so a slow
//! spell of this shared machine does not land on one server's runs; the
//! table shows medians over the rounds, and each figure's ratio to the
//! baseline server (tokio's multi-thread runtime by default).
//!
//! It owns the plan, the measurements ([`measure`]) and their summary; the
//! progress display, the files written and the command line are
//! `cli/bench.rs`.

pub mod measure;
pub mod servers;

use std::fmt::Write as _;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::chart;
use crate::port::BackendKind;
use crate::stress::{Progress, WorkerCommand};

pub use measure::{Figures, Measurement};
pub use servers::{
    ALL_SERVERS, DEFAULT_SERVERS, Programs, Running, ServerKind, ServerSpec, server_by_name,
};

/// What a load does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum LoadKind {
    /// `conns` connections, each with one `size`-byte echo in flight.
    Pingpong {
        /// Connections.
        conns: u64,
        /// Bytes per message.
        size: usize,
    },
    /// `conns` connections, each with a window of `size`-byte echoes in
    /// flight ([`BenchConfig::window`]).
    Flood {
        /// Connections.
        conns: u64,
        /// Bytes per message.
        size: usize,
    },
    /// `conns` connections, each driven by an OS thread of its own that
    /// writes a `size`-byte echo, reads it back, and repeats: the
    /// blocking thread-per-connection client of the common echo
    /// benchmarks, as a second load generator beside `stress`.
    Threads {
        /// Connections (and client threads).
        conns: u64,
        /// Bytes per message.
        size: usize,
    },
    /// `conns` connections held open, silent: the server's memory per
    /// idle connection. With `echo`, each connection first does one
    /// 512-byte echo, so whatever a connection grows on its first message
    /// and keeps is counted too.
    Idle {
        /// Connections.
        conns: u64,
        /// One echo per connection before it goes idle.
        #[serde(default)]
        echo: bool,
    },
}

/// A load and its name (`pingpong:100x512`, `flood:1000x4KiB`,
/// `threads:100x512`, `idle:10000`, `idle-echo:10000`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadSpec {
    /// The name it was given by.
    pub name: String,
    /// What it does.
    pub kind: LoadKind,
}

impl LoadSpec {
    /// Whether it is the idle-memory load.
    pub fn is_idle(&self) -> bool {
        matches!(self.kind, LoadKind::Idle { .. })
    }

    /// Connections it opens.
    pub fn conns(&self) -> u64 {
        match self.kind {
            LoadKind::Pingpong { conns, .. }
            | LoadKind::Flood { conns, .. }
            | LoadKind::Threads { conns, .. }
            | LoadKind::Idle { conns, .. } => conns,
        }
    }
}

/// The loads a default bench runs: echo ping-pong at 100 and 1,000
/// connections from `stress`, the same 100 × 512 B from a blocking
/// thread-per-connection client, the classic throughput rows (flood at
/// 1,000 and 5,000 connections), and memory per idle connection at
/// 10,000 connections, silent from the start and after one echo each.
pub const DEFAULT_LOADS: &[&str] = &[
    "pingpong:100x512",
    "threads:100x512",
    "pingpong:1000x512",
    "flood:1000x4KiB",
    "flood:5000x4KiB",
    "idle:10000",
    "idle-echo:10000",
];

/// The loads of `--quick`: small and short, a smoke test.
pub const QUICK_LOADS: &[&str] = &[
    "pingpong:50x512",
    "threads:20x512",
    "flood:50x4KiB",
    "idle:500",
    "idle-echo:500",
];

/// Most connections one load may ask for: the client holds them in this
/// process (idle) or in one stress process (traffic).
pub const MAX_LOAD_CONNS: u64 = 15_000;

/// Most connections of a `threads` load: one OS thread each.
pub const MAX_THREAD_CONNS: u64 = 2_000;

/// Parses `pingpong:CxS`, `flood:CxS`, `threads:CxS`, `idle:C` or
/// `idle-echo:C` (S a size: `512`, `4KiB`).
pub fn parse_load(s: &str) -> Result<LoadSpec, String> {
    let bad = || {
        format!(
            "bad load '{s}': write pingpong:CONNSxSIZE, flood:CONNSxSIZE, threads:CONNSxSIZE, idle:CONNS or idle-echo:CONNS (e.g. pingpong:100x512, flood:1000x4KiB, threads:100x512, idle:10000)"
        )
    };
    let (mode, rest) = s.split_once(':').ok_or_else(bad)?;
    let conns_of = |c: &str| -> Result<u64, String> {
        let n: u64 = c.trim().parse().map_err(|_| bad())?;
        if n == 0 || n > MAX_LOAD_CONNS {
            return Err(format!(
                "load '{s}': connections must be 1 to {MAX_LOAD_CONNS}"
            ));
        }
        Ok(n)
    };
    let kind = match mode {
        "idle" | "idle-echo" => LoadKind::Idle {
            conns: conns_of(rest)?,
            echo: mode == "idle-echo",
        },
        "pingpong" | "flood" | "threads" => {
            let (c, z) = rest.split_once(['x', 'X']).ok_or_else(bad)?;
            let conns = conns_of(c)?;
            let size =
                crate::units::parse_size(z.trim()).map_err(|e| format!("load '{s}': {e}"))?;
            if size == 0 || size > crate::stress::MAX_SIZE as u64 {
                return Err(format!(
                    "load '{s}': the message size must be 1 byte to {}",
                    crate::stress::MAX_SIZE
                ));
            }
            let size = size as usize;
            match mode {
                "pingpong" => LoadKind::Pingpong { conns, size },
                "flood" => LoadKind::Flood { conns, size },
                _ if conns > MAX_THREAD_CONNS => {
                    return Err(format!(
                        "load '{s}': a threads load runs one client thread per connection, at most {MAX_THREAD_CONNS}"
                    ));
                }
                _ => LoadKind::Threads { conns, size },
            }
        }
        _ => return Err(bad()),
    };
    Ok(LoadSpec {
        name: s.to_string(),
        kind,
    })
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Servers, in table order.
    pub servers: Vec<ServerSpec>,
    /// Loads, in the order they run.
    pub loads: Vec<LoadSpec>,
    /// Rounds of each traffic load (the table shows medians).
    pub rounds: usize,
    /// Rounds of each idle load (memory varies little from run to run).
    pub idle_rounds: usize,
    /// How long each traffic measurement's window is.
    pub duration: Duration,
    /// Load before the window starts (connects, caches, JITs of the mind).
    pub warmup: Duration,
    /// Echoes in flight per connection in flood loads.
    pub window: usize,
    /// The load generator's threads (one completion port each).
    pub client_threads: usize,
    /// The load generator's backend.
    pub client_backend: BackendKind,
    /// The server the ratios are taken to.
    pub baseline: String,
    /// How `stress` starts worker processes (needed past 15,000
    /// connections; bench loads stay below, so this is a safety net).
    pub worker: Option<WorkerCommand>,
    /// How long a server may take to start accepting.
    pub start_timeout: Duration,
}

impl BenchConfig {
    /// Measurements in all.
    pub fn total(&self) -> usize {
        self.loads
            .iter()
            .map(|l| self.rounds_of(l) * self.servers.len())
            .sum()
    }

    fn rounds_of(&self, l: &LoadSpec) -> usize {
        if l.is_idle() {
            self.idle_rounds
        } else {
            self.rounds
        }
    }

    /// A rough upper estimate of the run time, for the progress display.
    pub fn estimate(&self) -> Duration {
        let mut t = Duration::ZERO;
        for l in &self.loads {
            let n = (self.rounds_of(l) * self.servers.len()) as u32;
            let conns = l.conns() as f64;
            t += if l.is_idle() {
                // Connects one by one, plus two settles of the RSS.
                Duration::from_secs_f64(1.5 + conns * 80e-6) * n
            } else {
                // Start, connects, the window, the drain and shutdown
                // (measured on the project's 2-core machine).
                (self.duration + self.warmup + Duration::from_secs_f64(1.2 + conns * 0.8e-3)) * n
            };
        }
        t
    }

    /// Checks what the command line cannot check alone.
    pub fn validate(&self, programs: &Programs) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("no servers to bench (--servers)".into());
        }
        if self.loads.is_empty() {
            return Err("no loads to run (--loads)".into());
        }
        if self.rounds == 0 || self.idle_rounds == 0 {
            return Err("--rounds must be at least 1".into());
        }
        if self.duration < Duration::from_millis(300) {
            return Err(
                "--duration must be at least 300ms (progress is sampled every 250ms)".into(),
            );
        }
        if self.window == 0 || self.client_threads == 0 {
            return Err("--window and --client-threads must be at least 1".into());
        }
        if let Some(s) = self.servers.iter().find(|s| s.is_peer())
            && programs.peer.is_none()
        {
            return Err(format!(
                "server '{}' runs from cport-peer, which is not beside {}: build it with \
                 `cargo build --release --workspace` (or `-p cport-bench`), or choose \
                 cport servers only with --servers",
                s.name,
                programs.cport.display()
            ));
        }
        Ok(())
    }
}

/// What the caller's callback hears while a bench runs.
#[derive(Debug)]
pub enum Event<'a> {
    /// A measurement starts: `done` of `total` are finished.
    Begin {
        /// Measurements finished.
        done: usize,
        /// Measurements in all.
        total: usize,
        /// The load.
        load: &'a LoadSpec,
        /// The server.
        server: &'a ServerSpec,
        /// Round (0-based) and rounds of this load.
        round: (usize, usize),
    },
    /// A traffic load's progress, about four times a second.
    Traffic(&'a Progress),
    /// The idle load's connections opened so far.
    Opened(u64),
    /// A measurement is finished.
    End(&'a Measurement),
}

/// Facts about the run, for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Facts {
    /// CPU cores seen.
    pub cores: usize,
    /// Rounds of traffic loads and of idle loads.
    pub rounds: usize,
    /// Rounds of idle loads.
    pub idle_rounds: usize,
    /// Window of each traffic measurement, seconds.
    pub duration_s: f64,
    /// Warm-up before it, seconds.
    pub warmup_s: f64,
    /// Echoes in flight per connection in flood loads.
    pub window: usize,
    /// Load generator threads and backend.
    pub client_threads: usize,
    /// Load generator backend.
    pub client_backend: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix_s: u64,
}

/// One line of the table: medians of a server's runs of a load.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Load name.
    pub load: String,
    /// Server name.
    pub server: String,
    /// Measurements behind the medians.
    pub runs: usize,
    /// Medians.
    pub median: Figures,
    /// Each median divided by the baseline server's median of the same load.
    pub ratio: Figures,
    /// Errors over all runs (failed connections, lost or wrong echoes).
    pub errors: u64,
    /// Distinct notes from the runs.
    pub notes: Vec<String>,
}

/// Everything a bench found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    /// How it ran.
    pub facts: Facts,
    /// The servers, in table order.
    pub servers: Vec<ServerSpec>,
    /// The loads, in order.
    pub loads: Vec<LoadSpec>,
    /// The server ratios are taken to.
    pub baseline: String,
    /// Every measurement, in the order taken.
    pub measurements: Vec<Measurement>,
    /// The table.
    pub rows: Vec<Row>,
    /// Seconds the bench took.
    pub elapsed_s: f64,
    /// Stopped early (Ctrl-C).
    pub interrupted: bool,
}

/// Runs the bench. Errors are for benches that cannot start (bad
/// configuration, no `cport-peer`); a server that fails to start or dies
/// is noted in its measurement and the bench goes on.
pub fn run(
    cfg: &BenchConfig,
    programs: &Programs,
    stop: &Arc<AtomicBool>,
    mut on_event: impl FnMut(Event<'_>),
) -> io::Result<BenchReport> {
    cfg.validate(programs)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let started = Instant::now();
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let total = cfg.total();
    let n = cfg.servers.len();
    let mut measurements = Vec::with_capacity(total);
    'all: for load in &cfg.loads {
        let rounds = cfg.rounds_of(load);
        for round in 0..rounds {
            for k in 0..n {
                if stop.load(Ordering::Relaxed) {
                    break 'all;
                }
                // Each round starts from another server.
                let spec = &cfg.servers[(k + round) % n];
                on_event(Event::Begin {
                    done: measurements.len(),
                    total,
                    load,
                    server: spec,
                    round: (round, rounds),
                });
                let m = measure_one(cfg, programs, spec, load, round, stop, &mut on_event);
                on_event(Event::End(&m));
                measurements.push(m);
            }
        }
    }
    let rows = summarise(&cfg.servers, &cfg.loads, &cfg.baseline, &measurements);
    Ok(BenchReport {
        facts: Facts {
            cores: std::thread::available_parallelism().map_or(1, |c| c.get()),
            rounds: cfg.rounds,
            idle_rounds: cfg.idle_rounds,
            duration_s: cfg.duration.as_secs_f64(),
            warmup_s: cfg.warmup.as_secs_f64(),
            window: cfg.window,
            client_threads: cfg.client_threads,
            client_backend: cfg.client_backend.name().to_string(),
            started_unix_s,
        },
        servers: cfg.servers.clone(),
        loads: cfg.loads.clone(),
        baseline: cfg.baseline.clone(),
        measurements,
        rows,
        elapsed_s: started.elapsed().as_secs_f64(),
        interrupted: stop.load(Ordering::Relaxed),
    })
}

/// Starts the server, runs the load, stops the server; whatever fails is
/// written into the measurement.
fn measure_one(
    cfg: &BenchConfig,
    programs: &Programs,
    spec: &ServerSpec,
    load: &LoadSpec,
    round: usize,
    stop: &Arc<AtomicBool>,
    on_event: &mut impl FnMut(Event<'_>),
) -> Measurement {
    let failed = |note: String| Measurement {
        load: load.name.clone(),
        server: spec.name.clone(),
        round,
        figures: Figures::default(),
        window_s: 0.0,
        opened: 0,
        errors: 1,
        notes: vec![note],
    };
    let mut server = match Running::start(spec, programs, cfg.start_timeout) {
        Ok(s) => s,
        Err(e) => return failed(format!("could not start: {e}")),
    };
    let (addr, pid, raw) = (server.addr, server.pid, spec.raw());
    let r = if load.is_idle() {
        measure::idle(load, &spec.name, raw, addr, pid, round, stop, |n| {
            on_event(Event::Opened(n))
        })
    } else if let LoadKind::Threads { .. } = load.kind {
        measure::threads(cfg, load, &spec.name, raw, addr, pid, round, stop, |n| {
            on_event(Event::Opened(n))
        })
    } else {
        measure::traffic(cfg, load, &spec.name, raw, addr, pid, round, stop, |p| {
            on_event(Event::Traffic(p))
        })
    };
    let mut m = r.unwrap_or_else(|e| failed(format!("measurement failed: {e}")));
    if !server.alive() {
        m.errors += 1;
        m.notes.push(format!(
            "the server died during the load: {}",
            server.log_tail()
        ));
    }
    m
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

type Field = fn(&Figures) -> Option<f64>;
type FieldMut = fn(&mut Figures) -> &mut Option<f64>;

/// Each figure: how to read it and how to write it.
const FIELDS: [(Field, FieldMut); 8] = [
    (|f| f.req_per_s, |f| &mut f.req_per_s),
    (|f| f.mb_per_s, |f| &mut f.mb_per_s),
    (|f| f.p50_us, |f| &mut f.p50_us),
    (|f| f.p99_us, |f| &mut f.p99_us),
    (|f| f.cpu_us_per_req, |f| &mut f.cpu_us_per_req),
    (|f| f.machine_us_per_req, |f| &mut f.machine_us_per_req),
    (|f| f.rss_per_conn, |f| &mut f.rss_per_conn),
    (|f| f.rss_bytes, |f| &mut f.rss_bytes),
];

/// The table: a row per (load, server) with medians over rounds and
/// ratios to `baseline`'s medians.
pub fn summarise(
    servers: &[ServerSpec],
    loads: &[LoadSpec],
    baseline: &str,
    ms: &[Measurement],
) -> Vec<Row> {
    let mut rows = Vec::new();
    for load in loads {
        let mut load_rows: Vec<Row> = servers
            .iter()
            .map(|s| {
                let runs: Vec<&Measurement> = ms
                    .iter()
                    .filter(|m| m.load == load.name && m.server == s.name)
                    .collect();
                let mut median_f = Figures::default();
                for (get, set) in FIELDS {
                    *set(&mut median_f) =
                        median(runs.iter().filter_map(|m| get(&m.figures)).collect());
                }
                let mut notes: Vec<String> = Vec::new();
                for n in runs.iter().flat_map(|m| &m.notes) {
                    if !notes.contains(n) {
                        notes.push(n.clone());
                    }
                }
                Row {
                    load: load.name.clone(),
                    server: s.name.clone(),
                    runs: runs.len(),
                    median: median_f,
                    ratio: Figures::default(),
                    errors: runs.iter().map(|m| m.errors).sum(),
                    notes,
                }
            })
            .collect();
        let base = load_rows
            .iter()
            .find(|r| r.server == baseline)
            .map(|r| r.median.clone());
        if let Some(base) = base {
            for r in &mut load_rows {
                for (get, set) in FIELDS {
                    *set(&mut r.ratio) = match (get(&r.median), get(&base)) {
                        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                        _ => None,
                    };
                }
            }
        }
        rows.extend(load_rows);
    }
    rows
}

/// `213k ×1.05`, or `–` when there is no figure.
fn cell(v: Option<f64>, ratio: Option<f64>, show_ratio: bool) -> String {
    match (v, ratio) {
        (None, _) => "–".to_string(),
        (Some(v), Some(r)) if show_ratio => format!("{} ×{:.2}", chart::format_value(v), r),
        (Some(v), _) => chart::format_value(v),
    }
}

impl BenchReport {
    /// The table as Markdown (readable on a terminal, pasteable into the
    /// README), then the notes.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "| load | server | req/s | MB/s | p50 µs | p99 µs | server CPU µs/req | machine CPU µs/req | RSS/conn B |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.rows {
            let base = r.server == self.baseline;
            let (m, q) = (&r.median, &r.ratio);
            let _ = writeln!(
                out,
                "| {} | {}{} | {} | {} | {} | {} | {} | {} | {} |",
                r.load,
                r.server,
                if r.errors > 0 { " (!)" } else { "" },
                cell(m.req_per_s, q.req_per_s, !base),
                cell(m.mb_per_s, q.mb_per_s, !base),
                cell(m.p50_us, q.p50_us, false),
                cell(m.p99_us, q.p99_us, !base),
                cell(m.cpu_us_per_req, q.cpu_us_per_req, !base),
                cell(m.machine_us_per_req, q.machine_us_per_req, !base),
                cell(m.rss_per_conn, q.rss_per_conn, !base),
            );
        }
        let noted: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| !r.notes.is_empty() || r.errors > 0)
            .collect();
        if !noted.is_empty() {
            let _ = writeln!(out, "\n(!) errors and notes:");
            for r in noted {
                let _ = writeln!(
                    out,
                    "- {} / {}: {} error(s); {}",
                    r.load,
                    r.server,
                    r.errors,
                    r.notes.join("; ")
                );
            }
        }
        out
    }

    /// A few lines on how the figures were taken.
    pub fn render_legend(&self) -> String {
        let f = &self.facts;
        let mut out = format!(
            "{} server(s) x {} load(s); medians of {} interleaved round(s) ({} for idle loads); \
             {:.1} s windows after {:.1} s warm-up; flood window {}; client: {} thread(s) on {}; \
             {} cores; ratios (×) to {}; took {:.0} s.\n\
             server CPU = the server's threads' time on a CPU (schedstat) over the window / echoes in it; \
             machine CPU = all non-idle CPU time of the machine (/proc/stat: client, server and kernel) over the window / echoes; \
             traffic loads run on `stress` (pingpong, flood) or on one blocking client thread per connection (threads); \
             RSS/conn = server RSS added per idle connection (idle: silent from the start; idle-echo: after one echo each); \
             JSON also has each server's RSS under traffic.\n",
            self.servers.len(),
            self.loads.len(),
            f.rounds,
            f.idle_rounds,
            f.duration_s,
            f.warmup_s,
            f.window,
            f.client_threads,
            f.client_backend,
            f.cores,
            self.baseline,
            self.elapsed_s
        );
        for s in &self.servers {
            let _ = writeln!(out, "  {:<22} {}", s.name, s.description);
        }
        out
    }

    /// The chart: echoes per second relative to the baseline, server CPU
    /// per echo, and memory per idle connection, stacked in one SVG.
    pub fn chart_svg(&self) -> String {
        let traffic: Vec<&LoadSpec> = self.loads.iter().filter(|l| !l.is_idle()).collect();
        let idle: Vec<&LoadSpec> = self.loads.iter().filter(|l| l.is_idle()).collect();
        let series =
            |loads: &[&LoadSpec], get: fn(&Row) -> Option<f64>| -> Vec<(String, Vec<f64>)> {
                self.servers
                    .iter()
                    .map(|s| {
                        let v = loads
                            .iter()
                            .map(|l| {
                                self.rows
                                    .iter()
                                    .find(|r| r.load == l.name && r.server == s.name)
                                    .and_then(get)
                                    .unwrap_or(f64::NAN)
                            })
                            .collect();
                        (s.name.clone(), v)
                    })
                    .collect()
            };
        let names = |loads: &[&LoadSpec]| loads.iter().map(|l| l.name.clone()).collect::<Vec<_>>();
        let mut charts = Vec::new();
        if !traffic.is_empty() {
            charts.push(chart::bar_chart(
                &format!("Echoes per second, relative to {}", self.baseline),
                &format!("× {}", self.baseline),
                &names(&traffic),
                &series(&traffic, |r| r.ratio.req_per_s),
            ));
            charts.push(chart::bar_chart(
                "Server CPU per echo (lower is better)",
                "µs per request",
                &names(&traffic),
                &series(&traffic, |r| r.median.cpu_us_per_req),
            ));
        }
        if !idle.is_empty() {
            charts.push(chart::bar_chart(
                "Server memory per idle connection (lower is better)",
                "bytes",
                &names(&idle),
                &series(&idle, |r| r.median.rss_per_conn),
            ));
        }
        chart::stack(&charts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_parse() {
        assert_eq!(
            parse_load("pingpong:100x512").unwrap().kind,
            LoadKind::Pingpong {
                conns: 100,
                size: 512
            }
        );
        assert_eq!(
            parse_load("flood:1000x4KiB").unwrap().kind,
            LoadKind::Flood {
                conns: 1000,
                size: 4096
            }
        );
        assert_eq!(
            parse_load("idle:10000").unwrap().kind,
            LoadKind::Idle {
                conns: 10000,
                echo: false
            }
        );
        assert_eq!(
            parse_load("idle-echo:10000").unwrap().kind,
            LoadKind::Idle {
                conns: 10000,
                echo: true
            }
        );
        assert_eq!(
            parse_load("threads:100x512").unwrap().kind,
            LoadKind::Threads {
                conns: 100,
                size: 512
            }
        );
        for l in DEFAULT_LOADS.iter().chain(QUICK_LOADS) {
            parse_load(l).unwrap();
        }
        for bad in [
            "pingpong",
            "pingpong:100",
            "pingpong:0x512",
            "flood:10x0",
            "idle:20000",
            "storm:1x1",
            "flood:ax1",
            "threads:5000x512",
            "threads:10",
            "idle-echo:0",
        ] {
            let e = parse_load(bad).unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    fn m(server: &str, round: usize, req: f64, cpu: f64) -> Measurement {
        Measurement {
            load: "pingpong:100x512".into(),
            server: server.into(),
            round,
            figures: Figures {
                req_per_s: Some(req),
                cpu_us_per_req: Some(cpu),
                ..Figures::default()
            },
            window_s: 1.0,
            opened: 100,
            errors: 0,
            notes: vec![],
        }
    }

    fn report(ms: Vec<Measurement>) -> BenchReport {
        let servers = vec![
            server_by_name("tokio-mt", 2).unwrap(),
            server_by_name("cport-raw", 2).unwrap(),
        ];
        let loads = vec![
            parse_load("pingpong:100x512").unwrap(),
            parse_load("idle:100").unwrap(),
        ];
        let rows = summarise(&servers, &loads, "tokio-mt", &ms);
        BenchReport {
            facts: Facts {
                cores: 2,
                rounds: 3,
                idle_rounds: 1,
                duration_s: 1.0,
                warmup_s: 0.5,
                window: 8,
                client_threads: 1,
                client_backend: "uring".into(),
                started_unix_s: 0,
            },
            servers,
            loads,
            baseline: "tokio-mt".into(),
            measurements: ms,
            rows,
            elapsed_s: 1.0,
            interrupted: false,
        }
    }

    #[test]
    fn medians_and_ratios() {
        let r = report(vec![
            m("tokio-mt", 0, 200e3, 4.0),
            m("tokio-mt", 1, 100e3, 5.0),
            m("tokio-mt", 2, 210e3, 4.5),
            m("cport-raw", 0, 230e3, 3.0),
            m("cport-raw", 1, 250e3, 2.0),
            m("cport-raw", 2, f64::NAN, 2.5),
        ]);
        let tokio = &r.rows[0];
        assert_eq!(tokio.median.req_per_s, Some(200e3));
        assert_eq!(tokio.median.cpu_us_per_req, Some(4.5));
        assert_eq!(tokio.ratio.req_per_s, Some(1.0));
        let cport = &r.rows[1];
        // NaN is left out: the median of 230k and 250k.
        assert_eq!(cport.median.req_per_s, Some(240e3));
        assert_eq!(cport.ratio.req_per_s, Some(1.2));
        assert_eq!(cport.ratio.cpu_us_per_req, Some(2.5 / 4.5));
        // The idle load has no measurements: rows with nothing in them.
        assert_eq!(r.rows.len(), 4);
        assert_eq!(r.rows[2].runs, 0);
        assert_eq!(r.rows[2].median, Figures::default());
        let table = r.render_table();
        assert!(
            table.contains("| pingpong:100x512 | cport-raw | 240k ×1.20 |"),
            "{table}"
        );
        assert!(
            table.contains("| pingpong:100x512 | tokio-mt | 200k |"),
            "{table}"
        );
        let svg = r.chart_svg();
        assert!(svg.starts_with("<svg") && svg.contains("Server CPU per echo"));
    }

    #[test]
    fn errors_are_flagged_in_the_table() {
        let mut bad = m("cport-raw", 0, 1.0, 1.0);
        bad.errors = 2;
        bad.notes.push("2 connection(s) failed: refused".into());
        let r = report(vec![m("tokio-mt", 0, 1.0, 1.0), bad]);
        let t = r.render_table();
        assert!(t.contains("cport-raw (!)"), "{t}");
        assert!(t.contains("2 connection(s) failed: refused"), "{t}");
    }

    #[test]
    fn a_bench_without_its_peer_binary_is_refused_up_front() {
        let cfg = BenchConfig {
            servers: vec![server_by_name("tokio-mt", 2).unwrap()],
            loads: vec![parse_load("idle:10").unwrap()],
            rounds: 1,
            idle_rounds: 1,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(100),
            window: 8,
            client_threads: 1,
            client_backend: BackendKind::Auto,
            baseline: "tokio-mt".into(),
            worker: None,
            start_timeout: Duration::from_secs(1),
        };
        let programs = Programs {
            cport: "/nowhere/cport".into(),
            peer: None,
        };
        let e = cfg.validate(&programs).unwrap_err();
        assert!(e.contains("cargo build --release --workspace"), "{e}");
    }
}
