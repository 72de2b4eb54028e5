//! Slices of a run in worker processes: this binary started again (see
//! [`WorkerCommand`]) once per slice, each told what to run by one JSON
//! line on its stdin, each answering with JSON lines on its stdout —
//! progress four times a second, then its counts (histogram included).
//! The parent sums progress for the display and merges the counts.
//!
//! Stopping: closing a worker's stdin stops it (so does the parent dying,
//! which closes the pipe too); its counts still come back. A worker still
//! running well past the run's bound is killed, and a worker that ends
//! without counts has its connections counted as failed (`worker_failed`).

use std::io::{self, BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::stress::report::Counts;
use crate::stress::{Plan, Progress, StressConfig, WorkerCommand, WorkerLine, WorkerSpec};

/// What the parent knows of one worker.
#[derive(Default)]
struct Seen {
    progress: Progress,
    /// The most this worker reported open.
    peak_open: u64,
    result: Option<Counts>,
    error: Option<String>,
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    reader: Option<JoinHandle<()>>,
    seen: Arc<Mutex<Seen>>,
    count: u64,
    exited: Option<std::process::ExitStatus>,
}

/// How long past the run's own bound (run time + drain + shutdown) a
/// worker is asked to stop, and then how long until it is killed.
const STOP_SLACK: Duration = Duration::from_secs(15);
const KILL_SLACK: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(100);

/// Runs every slice of `plan` in a worker process; returns the merged
/// counts. `on_progress` gets the summed progress of all workers.
pub(crate) fn run_procs(
    cfg: &StressConfig,
    plan: &Plan,
    cmd: &WorkerCommand,
    stop: &AtomicBool,
    mut on_progress: impl FnMut(&Progress),
) -> io::Result<Counts> {
    let mut workers: Vec<Worker> = Vec::new();
    let procs = plan.slices.len();
    for &(first, count) in &plan.slices {
        let spec = WorkerSpec {
            cfg: cfg.clone(),
            sources: plan.sources.clone(),
            first,
            count,
            ramp: cfg.ramp / procs as f64,
        };
        match spawn(cmd, &spec) {
            Ok(w) => workers.push(w),
            Err(e) => {
                for w in &mut workers {
                    let _ = w.child.kill();
                    let _ = w.child.wait();
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot start a worker process ({}): {e}",
                        cmd.program.display()
                    ),
                ));
            }
        }
    }
    let start = Instant::now();
    let stop_at = start + cfg.run_time() + cfg.drain_time() + STOP_SLACK;
    let kill_at = stop_at + KILL_SLACK;
    let mut last_progress = start;
    // Open connections summed over the workers' latest progress, at every
    // tick: the most seen open at once across processes.
    let mut peak_open = 0;
    loop {
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) || now >= stop_at {
            for w in &mut workers {
                // Closing the pipe is the stop request.
                w.stdin.take();
            }
        }
        if now >= kill_at {
            for w in workers.iter_mut().filter(|w| w.exited.is_none()) {
                tracing::warn!("worker process {} did not stop; killing it", w.child.id());
                let _ = w.child.kill();
            }
        }
        for w in workers.iter_mut().filter(|w| w.exited.is_none()) {
            if let Ok(Some(st)) = w.child.try_wait() {
                w.exited = Some(st);
            }
        }
        let sum = sum_progress(&workers);
        peak_open = peak_open.max(sum.open);
        if now.duration_since(last_progress) >= Duration::from_millis(250) {
            last_progress = now;
            on_progress(&sum);
        }
        if workers.iter().all(|w| w.exited.is_some()) {
            break;
        }
        thread::sleep(TICK);
    }
    let mut total = Counts::default();
    for w in &mut workers {
        if let Some(r) = w.reader.take() {
            let _ = r.join();
        }
        let seen = w.seen.lock().unwrap_or_else(|e| e.into_inner());
        match &seen.result {
            Some(c) => total.merge(c),
            None => {
                let why = seen.error.clone().unwrap_or_else(|| {
                    format!(
                        "worker process ended ({}) without results",
                        w.exited.map_or("?".to_string(), |s| s.to_string())
                    )
                });
                let mut c = Counts {
                    requested: w.count,
                    ..Counts::default()
                };
                c.fail("worker_failed", w.count, why);
                total.merge(&c);
            }
        }
    }
    on_progress(&sum_progress(&workers));
    // No process held more than its own peak, nor all more than the sum.
    let own_max = workers
        .iter()
        .filter_map(|w| {
            let s = w.seen.lock().unwrap_or_else(|e| e.into_inner());
            s.result
                .as_ref()
                .map_or(Some(s.peak_open), |c| Some(c.peak_open))
        })
        .max()
        .unwrap_or(0);
    total.peak_open = peak_open.max(own_max).min(total.peak_open);
    Ok(total)
}

fn sum_progress(workers: &[Worker]) -> Progress {
    let mut p = Progress::default();
    for w in workers {
        p.add(&w.seen.lock().unwrap_or_else(|e| e.into_inner()).progress);
    }
    p
}

fn spawn(cmd: &WorkerCommand, spec: &WorkerSpec) -> io::Result<Worker> {
    let mut child = Command::new(&cmd.program)
        .args(&cmd.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("no stdin pipe"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io::Error::other("no stdout pipe"))?;
    let line = serde_json::to_string(spec).map_err(io::Error::other)?;
    if let Err(e) = writeln!(stdin, "{line}").and_then(|_| stdin.flush()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sink = seen.clone();
    let reader = thread::Builder::new()
        .name("cport-worker-out".into())
        .spawn(move || read_lines(BufReader::new(stdout), &sink))?;
    Ok(Worker {
        child,
        stdin: Some(stdin),
        reader: Some(reader),
        seen,
        count: spec.count,
        exited: None,
    })
}

fn read_lines(r: impl BufRead, seen: &Mutex<Seen>) {
    for line in r.lines() {
        let Ok(line) = line else {
            break;
        };
        let parsed: Result<WorkerLine, _> = serde_json::from_str(&line);
        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
        match parsed {
            Ok(WorkerLine::Progress(p)) => {
                s.peak_open = s.peak_open.max(p.open);
                s.progress = p;
            }
            Ok(WorkerLine::Result(c)) => s.result = Some(*c),
            Ok(WorkerLine::Error(e)) => s.error = Some(e),
            Err(e) => {
                s.error
                    .get_or_insert_with(|| format!("unreadable worker output ({e}): {line}"));
            }
        }
    }
}
