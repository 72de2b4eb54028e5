//! `cport stress` and its hidden worker-process twin `cport stress-worker`:
//! flags into a [`StressConfig`], Ctrl-C into a stop flag, progress onto
//! the terminal (or plain lines), the report onto stdout and into files.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use cport::stress::{
    Mode, Progress, RunOptions, ServerWatch, StressConfig, WorkerCommand, run, run_worker,
};

use super::{BackendArg, init_logging, parse_addr, parse_duration, parse_size, start_failure};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ModeArg {
    /// Each connection sends --messages messages, one every --interval, waiting for each echo.
    Interval,
    /// One request in flight per connection, back to back (latency).
    Pingpong,
    /// --window requests in flight per connection (throughput).
    Flood,
    /// Connections take turns sending BROADCAST frames, --rate a second in
    /// all; every connection checks it gets each one exactly once, in each
    /// sender's order (give every node of a cluster with --connect).
    Broadcast,
}

/// A list of source addresses, from `FIRST-LAST` or one address.
#[derive(Debug, Clone)]
pub(crate) struct Sources(Vec<IpAddr>);

fn parse_sources(s: &str) -> Result<Sources, String> {
    let bad =
        || format!("'{s}' is not a source range (write FIRST-LAST, e.g. 127.0.0.2-127.0.0.9)");
    let Some((a, b)) = s.split_once('-') else {
        return s
            .trim()
            .parse()
            .map(|ip| Sources(vec![ip]))
            .map_err(|_| bad());
    };
    let a: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
    let b: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
    let (x, y) = (u32::from(a), u32::from(b));
    if x > y {
        return Err(format!("source range '{s}' ends before it starts"));
    }
    if y - x >= 256 {
        return Err(format!("source range '{s}' has more than 256 addresses"));
    }
    Ok(Sources(
        (x..=y).map(|v| IpAddr::V4(Ipv4Addr::from(v))).collect(),
    ))
}

#[derive(Debug, Args)]
pub(crate) struct StressArgs {
    /// Server address; repeat to spread connections over several.
    #[arg(long = "connect", value_name = "ADDR", value_parser = parse_addr, required = true)]
    connect: Vec<SocketAddr>,
    /// Connections in all (spread over worker processes past 15,000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    connections: u64,
    /// Load pattern.
    #[arg(long, value_enum, default_value_t = ModeArg::Interval)]
    mode: ModeArg,
    /// Messages per connection (interval mode).
    #[arg(long, value_name = "N", default_value_t = 3)]
    messages: u64,
    /// Time from one message to the next on a connection (interval mode).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "3s")]
    interval: Duration,
    /// Body bytes of each ECHO frame (e.g. 512, 4KiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64")]
    size: u64,
    /// Broadcasts per second over all connections (broadcast mode).
    #[arg(long, value_name = "N", default_value_t = 100.0)]
    rate: f64,
    /// Requests in flight per connection (flood mode).
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    window: u32,
    /// How long the load runs [default: 10s for pingpong and flood; for
    /// interval, long enough for every message].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Connects per second (0: as fast as allowed, at most 1,000 in flight per process).
    #[arg(long, value_name = "RATE", default_value_t = 0)]
    ramp: u64,
    /// A connect not done after this long fails.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    connect_timeout: Duration,
    /// A request not answered after this long fails its connection.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    reply_timeout: Duration,
    /// Source addresses to bind, FIRST-LAST (e.g. 127.0.0.2-127.0.0.9)
    /// [default: chosen when one address would run out of ports].
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_sources)]
    source_range: Option<Sources>,
    /// Worker processes to spread the connections over [default: one per 15,000].
    #[arg(long = "worker-procs", alias = "workers-procs", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    worker_procs: Option<u32>,
    /// Worker threads (one completion port each) per process.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// Raw echo instead of ECHO frames: each message is --size bytes and
    /// the same bytes must come back (for `cport server --protocol raw`
    /// and other echo servers; give --server-pid for its CPU and RSS).
    #[arg(long)]
    raw: bool,
    /// Completion backend of the client's own ports.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Read the server's CPU and memory from /proc/PID instead of its STATS reply.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// Do not sample the server (no STATS control connection).
    #[arg(long, conflicts_with = "server_pid")]
    no_server_stats: bool,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also write the report to FILE: a self-contained HTML page with
    /// charts when FILE ends in .html or .htm, else the text report.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Seed of the message contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// No progress display, only the report.
    #[arg(long)]
    quiet: bool,
    /// Log level.
    #[arg(long, default_value = "warn", value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    log: String,
}

/// `cport stress-worker`: one slice of a run, for a parent `cport stress`.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Log level.
    #[arg(long, default_value = "warn")]
    log: String,
}

/// Exits the process if the run is still going at `cfg.hard_deadline()`:
/// the run bounds itself, so this only fires if something is stuck, and
/// then a clear error beats a hang. (Worker processes see their stdin
/// close and stop.)
fn exit_at_hard_deadline(cfg: &StressConfig) {
    let limit = cfg.hard_deadline();
    let _ = std::thread::Builder::new()
        .name("cport-deadline".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!(
                "error: the stress run did not end within its hard deadline of {limit:?}; giving up"
            );
            std::process::exit(1);
        });
}

/// Ctrl-C (SIGINT, SIGTERM) sets the flag; a second one exits at once.
fn stop_on_signal() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let count = AtomicU32::new(0);
    ctrlc::set_handler(move || {
        if count.fetch_add(1, Ordering::SeqCst) > 0 {
            eprintln!("second interrupt: exiting without a report");
            std::process::exit(130);
        }
        flag.store(true, Ordering::SeqCst);
    })
    .context("cannot install the signal handler")?;
    Ok(stop)
}

fn create(path: &PathBuf, what: &str) -> anyhow::Result<File> {
    File::create(path).with_context(|| format!("cannot write the {what} to {}", path.display()))
}

pub(crate) fn run_stress(a: StressArgs) -> anyhow::Result<i32> {
    init_logging(&a.log)?;
    if let ModeArg::Broadcast = a.mode {
        return run_broadcast(&a);
    }
    let cfg = StressConfig {
        targets: a.connect.clone(),
        sources: a.source_range.clone().map(|s| s.0).unwrap_or_default(),
        connections: a.connections,
        mode: match a.mode {
            ModeArg::Interval => Mode::Interval,
            ModeArg::Pingpong => Mode::Pingpong,
            ModeArg::Flood => Mode::Flood,
            ModeArg::Broadcast => unreachable!("broadcast mode runs on its own"),
        },
        messages: a.messages,
        interval: a.interval,
        size: usize::try_from(a.size).unwrap_or(usize::MAX),
        window: a.window as usize,
        duration: a.duration,
        ramp: a.ramp as f64,
        connect_timeout: a.connect_timeout,
        reply_timeout: a.reply_timeout,
        seed: a.seed,
        threads: a.threads as usize,
        backend: a.backend.kind()?,
        procs: a.worker_procs.map(|p| p as usize),
        raw: a.raw,
    };
    // Bad values and an impossible layout are usage errors (exit 2),
    // found before anything starts.
    let plan = cport::stress::plan(&cfg).map_err(anyhow::Error::msg)?;
    let mut json = a
        .json
        .as_ref()
        .map(|p| create(p, "JSON report"))
        .transpose()?;
    let mut text = a.report.as_ref().map(|p| create(p, "report")).transpose()?;
    cport::port::sys::raise_fd_limit();
    let stop = stop_on_signal()?;
    let opts = RunOptions {
        stop,
        worker: Some(WorkerCommand {
            program: std::env::current_exe()
                .context("cannot find this program to start worker processes")?,
            args: vec!["stress-worker".into(), "--log".into(), a.log.clone().into()],
        }),
        server: match (a.server_pid, a.no_server_stats) {
            (Some(pid), _) => ServerWatch::Pid(pid),
            (None, true) => ServerWatch::Off,
            // A raw echo server has no STATS to ask.
            (None, false) if a.raw => ServerWatch::Off,
            (None, false) => ServerWatch::Stats(cfg.targets[0]),
        },
    };
    exit_at_hard_deadline(&cfg);
    let mut display = Display::new(&cfg, plan.procs, a.quiet);
    let report =
        run(&cfg, &opts, |p| display.update(p)).with_context(|| start_failure(cfg.backend))?;
    display.finish();
    let rendered = report.render();
    // A closed stdout (e.g. piped into `head`) must not turn into a panic.
    let mut out = std::io::stdout();
    let _ = out.write_all(rendered.as_bytes()).and_then(|_| out.flush());
    if let Some(f) = &mut json {
        let body = serde_json::to_string_pretty(&report)?;
        writeln!(f, "{body}").context("cannot write the JSON report")?;
    }
    if let Some(f) = &mut text {
        let html = a.report.as_deref().is_some_and(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm"))
        });
        let body = if html {
            report.render_html()
        } else {
            rendered.clone()
        };
        f.write_all(body.as_bytes())
            .context("cannot write the report")?;
    }
    if !report.ok {
        eprintln!(
            "error: stress run failed: {} of {} connections failed, {} mismatches, {} messages lost{}",
            report.connections.failed,
            report.connections.requested,
            report.messages.mismatches,
            report.messages.lost,
            if report.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        );
        return Ok(1);
    }
    Ok(0)
}

/// `--mode broadcast`: one process, its own report (see
/// `cport::stress::broadcast`). Exit code 1 unless every delivery checked out.
fn run_broadcast(a: &StressArgs) -> anyhow::Result<i32> {
    let cfg = cport::stress::broadcast::BroadcastConfig {
        targets: a.connect.clone(),
        connections: a.connections,
        rate: a.rate,
        size: usize::try_from(a.size).unwrap_or(usize::MAX),
        duration: a.duration.unwrap_or(Duration::from_secs(10)),
        connect_timeout: a.connect_timeout.max(Duration::from_secs(10)),
        threads: a.threads as usize,
        backend: a.backend.kind()?,
    };
    let report = match cport::stress::broadcast::run_broadcast(&cfg) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => anyhow::bail!("{e}"),
        Err(e) => return Err(e).context(start_failure(cfg.backend)),
    };
    let text = report.text(&cfg);
    print!("{text}");
    if let Some(path) = &a.report {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if report.ok() { 0 } else { 1 })
}

pub(crate) fn run_stress_worker(a: WorkerArgs) -> anyhow::Result<i32> {
    init_logging(&a.log)?;
    cport::port::sys::raise_fd_limit();
    let stop = stop_on_signal()?;
    let input = std::io::BufReader::new(std::io::stdin());
    run_worker(input, std::io::stdout(), stop).context("stress worker")?;
    Ok(0)
}

/// Progress: a bar on a terminal, a plain line a second otherwise.
enum Display {
    Bar(ProgressBar),
    Lines { last: Option<(Instant, u64)> },
    Off,
}

impl Display {
    fn new(cfg: &StressConfig, procs: usize, quiet: bool) -> Display {
        if quiet {
            return Display::Off;
        }
        if std::io::stdout().is_terminal() {
            let bar =
                ProgressBar::with_draw_target(Some(cfg.connections), ProgressDrawTarget::stdout());
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} connected  {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(format!("{} mode, {procs} process(es)", cfg.mode.name()));
            bar.enable_steady_tick(Duration::from_millis(200));
            Display::Bar(bar)
        } else {
            Display::Lines { last: None }
        }
    }

    fn update(&mut self, p: &Progress) {
        match self {
            Display::Off => {}
            Display::Bar(bar) => {
                bar.set_position(p.opened.min(p.requested));
                bar.set_message(format!(
                    "open {}  {:.0} msgs/s  sent {}  received {}  errors {}",
                    p.open,
                    p.msgs_per_s,
                    p.sent,
                    p.received,
                    p.failed + p.mismatches
                ));
            }
            Display::Lines { last } => {
                let now = Instant::now();
                let rate = match *last {
                    Some((t, _)) if now.duration_since(t) < Duration::from_secs(1) => return,
                    Some((t, r)) => {
                        p.received.saturating_sub(r) as f64 / now.duration_since(t).as_secs_f64()
                    }
                    None => 0.0,
                };
                *last = Some((now, p.received));
                let _ = writeln!(
                    std::io::stdout(),
                    "progress: {:.1}s connected {}/{} open {} failed {} sent {} received {} mismatches {} msgs/s {:.0}",
                    p.elapsed_s,
                    p.opened,
                    p.requested,
                    p.open,
                    p.failed,
                    p.sent,
                    p.received,
                    p.mismatches,
                    rate
                );
            }
        }
    }

    fn finish(&mut self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
