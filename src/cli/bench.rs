//! `cport bench`: flags in, a [`BenchConfig`] out, [`cport::bench::run`],
//! then the table on stdout, progress on stderr, and the JSON and chart
//! files.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use cport::bench::{
    self, ALL_SERVERS, BenchConfig, DEFAULT_LOADS, DEFAULT_SERVERS, Event, Programs, QUICK_LOADS,
};
use cport::stress::WorkerCommand;

use super::{BackendArg, init_logging, parse_duration};

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Servers to compare, comma-separated; `default`, `all`, or names
    /// (see --list).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    servers: Vec<String>,
    /// Loads, comma-separated: pingpong:CONNSxSIZE and flood:CONNSxSIZE
    /// (from the stress client), threads:CONNSxSIZE (one blocking client
    /// thread per connection: write, read the echo, repeat), idle:CONNS
    /// (silent connections) and idle-echo:CONNS (silent after one echo
    /// each) [default: pingpong:100x512, threads:100x512,
    /// pingpong:1000x512, flood:1000x4KiB, flood:5000x4KiB, idle:10000,
    /// idle-echo:10000].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    loads: Vec<String>,
    /// Rounds of each traffic load; the table shows medians.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: Option<u32>,
    /// Rounds of each idle load.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    idle_rounds: u32,
    /// Measured window of each traffic run [default: 1s; --quick 500ms].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Load before the window [default: 300ms; --quick 200ms].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    warmup: Option<Duration>,
    /// Echoes in flight per connection in flood loads.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    window: u32,
    /// Threads of the load generator (one completion port each).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    client_threads: u32,
    /// Backend of the load generator's ports.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    client_backend: BackendArg,
    /// The server ratios are taken to [default: tokio-mt, else the first].
    #[arg(long, value_name = "NAME")]
    baseline: Option<String>,
    /// A smoke run: tokio-mt and cport-raw (unless --servers), small loads
    /// (unless --loads), one round, short windows.
    #[arg(long)]
    quick: bool,
    /// Write every measurement and the table as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the results as an SVG chart to FILE.
    #[arg(long, value_name = "FILE.svg")]
    chart: Option<PathBuf>,
    /// The cport-peer program [default: beside this cport].
    #[arg(long, value_name = "PATH")]
    peer: Option<PathBuf>,
    /// List the servers and default loads, and exit.
    #[arg(long)]
    list: bool,
    /// No progress display.
    #[arg(long)]
    quiet: bool,
    /// Log level (of the load generator).
    #[arg(long, default_value = "error", value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    log: String,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn config(a: &BenchArgs) -> anyhow::Result<BenchConfig> {
    let cores = cores();
    let names: Vec<String> = if a.servers.is_empty() {
        if a.quick {
            vec!["tokio-mt".into(), "cport-raw".into()]
        } else {
            DEFAULT_SERVERS.iter().map(|s| s.to_string()).collect()
        }
    } else {
        let mut v = Vec::new();
        for s in &a.servers {
            match s.trim() {
                "default" => v.extend(DEFAULT_SERVERS.iter().map(|s| s.to_string())),
                "all" => v.extend(ALL_SERVERS.iter().map(|s| s.to_string())),
                "" => {}
                n => v.push(n.to_string()),
            }
        }
        v
    };
    let mut servers = Vec::new();
    for n in names {
        if servers.iter().any(|s: &bench::ServerSpec| s.name == n) {
            continue;
        }
        servers.push(bench::server_by_name(&n, cores).map_err(anyhow::Error::msg)?);
    }
    let load_names: Vec<String> = if a.loads.is_empty() {
        let l = if a.quick { QUICK_LOADS } else { DEFAULT_LOADS };
        l.iter().map(|s| s.to_string()).collect()
    } else {
        a.loads
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let loads = load_names
        .iter()
        .map(|l| bench::parse_load(l).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let baseline = match &a.baseline {
        Some(b) => {
            if !servers.iter().any(|s| &s.name == b) {
                bail!("--baseline {b} is not one of the servers benched");
            }
            b.clone()
        }
        None if servers.iter().any(|s| s.name == "tokio-mt") => "tokio-mt".into(),
        None => servers.first().map(|s| s.name.clone()).unwrap_or_default(),
    };
    let exe = std::env::current_exe().context("cannot find this program")?;
    Ok(BenchConfig {
        servers,
        loads,
        rounds: a.rounds.map_or(if a.quick { 1 } else { 3 }, |r| r as usize),
        idle_rounds: a.idle_rounds as usize,
        duration: a
            .duration
            .unwrap_or(Duration::from_millis(if a.quick { 500 } else { 1000 })),
        warmup: a
            .warmup
            .unwrap_or(Duration::from_millis(if a.quick { 200 } else { 300 })),
        window: a.window as usize,
        client_threads: a.client_threads as usize,
        client_backend: a.client_backend.kind()?,
        baseline,
        worker: Some(WorkerCommand {
            program: exe,
            args: vec!["stress-worker".into(), "--log".into(), a.log.clone().into()],
        }),
        start_timeout: Duration::from_secs(10),
    })
}

fn list() {
    let cores = cores();
    println!("servers (--servers; the default set is marked *):");
    for n in ALL_SERVERS {
        if let Ok(s) = bench::server_by_name(n, cores) {
            let star = if DEFAULT_SERVERS.contains(n) {
                "*"
            } else {
                " "
            };
            println!("  {star} {:<26} {}", s.name, s.description);
        }
    }
    println!("  (monoio and uring-ref also take -coop / -none / -defer ring-flag suffixes)");
    println!("default loads (--loads): {}", DEFAULT_LOADS.join(", "));
    println!("--quick loads: {}", QUICK_LOADS.join(", "));
}

pub(crate) fn run(a: BenchArgs) -> anyhow::Result<i32> {
    init_logging(&a.log)?;
    if a.list {
        list();
        return Ok(0);
    }
    let cfg = config(&a)?;
    let exe = std::env::current_exe().context("cannot find this program")?;
    let mut programs = Programs::beside(exe);
    if let Some(p) = &a.peer {
        if !p.is_file() {
            bail!("--peer {}: no such file", p.display());
        }
        programs.peer = Some(p.clone());
    }
    cfg.validate(&programs).map_err(anyhow::Error::msg)?;
    // Check the output files can be written before spending minutes.
    for p in [&a.json, &a.chart].into_iter().flatten() {
        std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?;
    }
    cport::port::sys::raise_fd_limit();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let mut hits = 0u32;
        ctrlc::set_handler(move || {
            hits += 1;
            if hits > 1 {
                std::process::exit(130);
            }
            eprintln!(
                "interrupted: finishing this measurement, then the table so far (again to quit now)"
            );
            stop.store(true, Ordering::SeqCst);
        })
        .context("cannot install the signal handler")?;
    }
    let mut display = Display::new(&cfg, a.quiet);
    let report =
        bench::run(&cfg, &programs, &stop, |e| display.event(e)).context("cannot run the bench")?;
    display.finish();

    let mut out = std::io::stdout();
    let text = format!("{}\n{}", report.render_table(), report.render_legend());
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
    if let Some(p) = &a.json {
        let body = serde_json::to_string_pretty(&report)?;
        std::fs::write(p, body + "\n").with_context(|| format!("cannot write {}", p.display()))?;
    }
    if let Some(p) = &a.chart {
        std::fs::write(p, report.chart_svg())
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(if report.interrupted { 130 } else { 0 })
}

/// Progress on stderr (stdout carries the table): a bar on a terminal, a
/// line per measurement otherwise.
struct Display {
    bar: Option<ProgressBar>,
    lines: bool,
    current: String,
}

impl Display {
    fn new(cfg: &BenchConfig, quiet: bool) -> Display {
        if quiet {
            return Display {
                bar: None,
                lines: false,
                current: String::new(),
            };
        }
        eprintln!(
            "cport bench: {} measurements ({} servers, {} loads), about {:.0} s",
            cfg.total(),
            cfg.servers.len(),
            cfg.loads.len(),
            cfg.estimate().as_secs_f64()
        );
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(
                Some(cfg.total() as u64),
                ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len}  {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            Display {
                bar: Some(bar),
                lines: false,
                current: String::new(),
            }
        } else {
            Display {
                bar: None,
                lines: true,
                current: String::new(),
            }
        }
    }

    fn event(&mut self, e: Event<'_>) {
        match e {
            Event::Begin {
                done,
                total,
                load,
                server,
                round,
            } => {
                self.current = format!(
                    "[{}/{total}] {} round {}/{} {}",
                    done + 1,
                    load.name,
                    round.0 + 1,
                    round.1,
                    server.name
                );
                if let Some(b) = &self.bar {
                    b.set_position(done as u64);
                    b.set_message(self.current.clone());
                }
            }
            Event::Traffic(p) => {
                if let Some(b) = &self.bar {
                    b.set_message(format!(
                        "{}: {}/{} open, {:.0} echoes/s",
                        self.current, p.open, p.requested, p.msgs_per_s
                    ));
                }
            }
            Event::Opened(n) => {
                if let Some(b) = &self.bar {
                    b.set_message(format!("{}: {n} connections open", self.current));
                }
            }
            Event::End(m) => {
                let f = &m.figures;
                let v = |x: Option<f64>| x.map_or("–".into(), cport::chart::format_value);
                let line = if f.req_per_s.is_some() {
                    format!(
                        "{}: {} req/s, {} MB/s, p99 {} µs, server {} µs/req",
                        self.current,
                        v(f.req_per_s),
                        v(f.mb_per_s),
                        v(f.p99_us),
                        v(f.cpu_us_per_req)
                    )
                } else {
                    format!("{}: {} B per connection", self.current, v(f.rss_per_conn))
                };
                let line = if m.notes.is_empty() {
                    line
                } else {
                    format!("{line} ({})", m.notes.join("; "))
                };
                if let Some(b) = &self.bar {
                    b.inc(1);
                    b.println(line);
                } else if self.lines {
                    eprintln!("{line}");
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
