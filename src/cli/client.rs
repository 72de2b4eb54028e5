//! `cport client`.

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;

use cport::client::{MessageEvent, MessagesConfig, Session, run_messages};
use cport::frame::{self, Frame, cmd};
use cport::server::EngineConfig;

use super::{BackendArg, init_logging, parse_addr, parse_duration, start_failure};

#[derive(Debug, Args)]
pub(crate) struct ClientArgs {
    /// Server address.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    connect: SocketAddr,
    /// Send this text as ECHO frames instead of reading stdin.
    #[arg(long, value_name = "TEXT")]
    message: Option<String>,
    /// Messages per connection (with --message).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Pause after each reply before the next message (with --message).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1s")]
    interval: Duration,
    /// Concurrent connections (with --message).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    connections: u32,
    /// Connects started per second (with --message; 0 = all at once).
    #[arg(long, value_name = "RATE", default_value_t = 0)]
    ramp: u64,
    /// Give up on a reply after this long.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "10s")]
    timeout: Duration,
    /// Completion backend of the client's own port.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Print only the summary, not a line per message.
    #[arg(long)]
    quiet: bool,
    /// Log level.
    #[arg(long, default_value = "warn", value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    log: String,
}

fn engine_config(a: &ClientArgs) -> anyhow::Result<EngineConfig> {
    let mut cfg = cport::client::engine_config(a.backend.kind()?);
    cfg.port.recv_bufs = 1024;
    Ok(cfg)
}

pub(crate) fn run(a: ClientArgs) -> anyhow::Result<i32> {
    init_logging(&a.log)?;
    match &a.message {
        Some(m) => run_messages_mode(&a, m.clone()),
        None => run_lines(&a),
    }
}

fn run_messages_mode(a: &ClientArgs, message: String) -> anyhow::Result<i32> {
    cport::port::sys::raise_fd_limit();
    let cfg = MessagesConfig {
        addr: a.connect,
        connections: a.connections as usize,
        count: a.count,
        interval: a.interval,
        message: Bytes::from(message),
        connect_rate: a.ramp,
        reply_timeout: a.timeout,
    };
    let quiet = a.quiet;
    let count = a.count;
    let mut out = std::io::stdout().lock();
    let engine_cfg = engine_config(a)?;
    let backend = engine_cfg.port.backend;
    let report = run_messages(cfg, engine_cfg, |e| match e {
        MessageEvent::Reply {
            conn,
            seq,
            bytes,
            rtt,
            ok,
        } => {
            if !quiet || !ok {
                let _ = writeln!(
                    out,
                    "conn {conn} msg {seq}/{count}: {bytes} bytes {} in {:.3} ms",
                    if *ok { "echoed" } else { "MISMATCHED" },
                    rtt.as_secs_f64() * 1e3
                );
            }
        }
        MessageEvent::Failed { conn, reason } => {
            let _ = writeln!(out, "conn {conn} failed: {reason}");
        }
    })
    .with_context(|| start_failure(backend))?;
    let failed: Vec<String> = report
        .failed
        .iter()
        .map(|(k, v)| format!("{k}:{v}"))
        .collect();
    println!(
        "summary: connections={} opened={} failed={} sent={} received={} mismatches={} rtt_us p50={} p90={} p99={} max={} elapsed={:.2}s{}",
        a.connections,
        report.opened,
        report.failed_total(),
        report.sent,
        report.received,
        report.mismatches,
        report.rtt_us[0],
        report.rtt_us[1],
        report.rtt_us[2],
        report.rtt_us[3],
        report.elapsed.as_secs_f64(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" ({})", failed.join(", "))
        }
    );
    let expected = a.connections as u64 * a.count;
    if report.failed_total() > 0 || report.mismatches > 0 || report.received != expected {
        eprintln!(
            "error: {} of {} connections failed, {} of {} replies received, {} mismatched",
            report.failed_total(),
            a.connections,
            report.received,
            expected,
            report.mismatches
        );
        return Ok(1);
    }
    Ok(0)
}

fn describe(f: &Frame) -> String {
    match f.cmd() {
        cmd::ERROR => match f.error_parts() {
            Some((c, m)) => format!("error {c} ({}): {m}", frame::code::name(c)),
            None => "error (malformed)".into(),
        },
        cmd::ECHO => format!("echo: {}", String::from_utf8_lossy(&f.body())),
        cmd::PONG => format!("pong: {}", String::from_utf8_lossy(&f.body())),
        cmd::FILE => {
            let body = f.body();
            let preview: String = String::from_utf8_lossy(&body[..body.len().min(64)])
                .chars()
                .map(|c| if c.is_control() { '.' } else { c })
                .collect();
            format!(
                "file: {} bytes: {preview}{}",
                body.len(),
                if body.len() > 64 { "..." } else { "" }
            )
        }
        cmd::BROADCAST if f.body_len() >= 8 => {
            let body = f.body();
            let from = u64::from_be_bytes(body[..8].try_into().unwrap_or_default());
            format!(
                "broadcast from {from:#x}: {}",
                String::from_utf8_lossy(&body[8..])
            )
        }
        cmd::STATS => match serde_json::from_slice::<serde_json::Value>(&f.body()) {
            Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
            Err(_) => String::from_utf8_lossy(&f.body()).into_owned(),
        },
        c => format!(
            "{} ({} bytes): {}",
            cmd::name(c),
            f.body_len(),
            String::from_utf8_lossy(&f.body())
        ),
    }
}

const HELP: &str =
    "type a line to ECHO it; /ping [text], /stats, /broadcast TEXT, /file PATH, /quit";

fn run_lines(a: &ClientArgs) -> anyhow::Result<i32> {
    let tty = std::io::stdin().is_terminal();
    let mut session = match Session::connect(a.connect, engine_config(a)?, a.timeout) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot connect to {}: {e}", a.connect);
            return Ok(1);
        }
    };
    if tty {
        println!("connected to {} — {HELP}", a.connect);
    }
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut input = stdin.lock();
    loop {
        if tty {
            print!("> ");
            let _ = std::io::stdout().flush();
        }
        line.clear();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        let (command, arg) = match text.strip_prefix('/') {
            Some(rest) => {
                let mut it = rest.splitn(2, ' ');
                (it.next().unwrap_or(""), it.next().unwrap_or(""))
            }
            None => ("", text),
        };
        let frame = match command {
            "" => Frame::new(cmd::ECHO, arg.as_bytes()),
            "ping" => Frame::new(cmd::PING, arg.as_bytes()),
            "stats" => Frame::new(cmd::STATS, b""),
            "broadcast" => Frame::new(cmd::BROADCAST, arg.as_bytes()),
            "file" => Frame::new(cmd::FILE, arg.as_bytes()),
            "quit" | "exit" => break,
            "help" => {
                println!("{HELP}");
                continue;
            }
            other => {
                println!("unknown command /{other} — {HELP}");
                continue;
            }
        };
        match session.request(frame, a.timeout) {
            Ok((reply, rtt)) => {
                println!("{} ({:.3} ms)", describe(&reply), rtt.as_secs_f64() * 1e3)
            }
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(1);
            }
        }
    }
    session.close();
    Ok(0)
}
