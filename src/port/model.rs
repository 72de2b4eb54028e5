//! A model kernel, and the loom models of the port's scheduling.
//!
//! Built only with `--cfg loom`. The port's real code (`port/mod.rs`: the
//! leader/follower hand-off, the LIFO waiter stack, the concurrency limit,
//! `post`, `kick`, `Worker::drop`) runs unchanged on loom's primitives (see
//! `crate::sync`); only the OS backend is replaced by [`Backend`], a model
//! of what the port relies on from the kernel:
//!
//! - submissions are queued by any thread and reach the kernel only when a
//!   worker enters it (`flush` or `wait`), as on io_uring, where only the
//!   port's workers call `io_uring_enter` (docs/DESIGN.md);
//! - an entered operation completes, and its completion is what a blocked
//!   `wait` returns with; `wake` makes a concurrent or the next `wait`
//!   return (the eventfd: the wake-up is not lost if nobody waits yet).
//!
//! An operation completes as soon as it reaches the kernel; when it does
//! is what the interleavings vary. Only timers are modelled (the other
//! operations need sockets and add nothing to the scheduling).
//!
//! The models run with `RUSTFLAGS="--cfg loom" cargo test --release --lib
//! loom_`; each prints how many interleavings loom explored.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::time::Duration;

use loom::sync::Condvar;
use socket2::Socket;

use crate::op::{Completion, Op, OpId, Outcome, Sock};
use crate::port::PortConfig;
use crate::sync::Mutex;

/// The model kernel behind a port under loom.
pub(crate) struct Backend {
    k: Mutex<Kernel>,
    cv: Condvar,
}

#[derive(Default)]
struct Kernel {
    /// Submitted, not yet handed to the kernel: (key, op id).
    sq: VecDeque<(u64, u64)>,
    /// Completed, not yet reaped.
    cq: VecDeque<Completion>,
    /// `wake` was called since the last `wait` returned (eventfd count).
    woken: bool,
    next_id: u64,
    outstanding: usize,
}

impl Kernel {
    /// The kernel takes the submission queue; each op completes.
    fn enter(&mut self) -> bool {
        let any = !self.sq.is_empty();
        while let Some((key, id)) = self.sq.pop_front() {
            self.cq.push_back(Completion {
                key,
                op: Some(OpId(id)),
                outcome: Outcome::Timer(Ok(())),
            });
        }
        any
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("model::Backend")
    }
}

impl Backend {
    pub(crate) fn new(_: &PortConfig) -> io::Result<Backend> {
        Ok(Backend {
            k: Mutex::new(Kernel::default()),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Kernel> {
        self.k.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn name(&self) -> &'static str {
        "model"
    }

    pub(crate) fn make_direct(&self, socket: Socket) -> Sock {
        Sock::Os(std::sync::Arc::new(socket))
    }

    pub(crate) fn direct_capacity(&self) -> usize {
        0
    }

    pub(crate) fn associate(&self, _: &Socket) -> io::Result<()> {
        Ok(())
    }

    pub(crate) fn submit(&self, key: u64, op: Op) -> io::Result<OpId> {
        if !matches!(op, Op::Timeout { .. }) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the model kernel runs timers only",
            ));
        }
        let mut k = self.lock();
        k.next_id += 1;
        let id = k.next_id;
        k.sq.push_back((key, id));
        k.outstanding += 1;
        Ok(OpId(id))
    }

    /// Operations complete as soon as they reach the kernel, so a cancel
    /// always loses the race; the target completes once either way.
    pub(crate) fn cancel(&self, _: OpId) -> io::Result<()> {
        Ok(())
    }

    pub(crate) fn flush(&self) -> io::Result<()> {
        let mut k = self.lock();
        if k.enter() {
            self.cv.notify_all();
        }
        Ok(())
    }

    pub(crate) fn wait(
        &self,
        timeout: Option<Duration>,
        out: &mut VecDeque<Completion>,
    ) -> io::Result<()> {
        let mut k = self.lock();
        k.enter();
        // Without a deadline, block until a completion or a wake-up; with
        // one, the deadline may pass at once.
        while timeout.is_none() && k.cq.is_empty() && !k.woken {
            k = self.cv.wait(k).unwrap_or_else(|e| e.into_inner());
        }
        k.woken = false;
        k.outstanding -= k.cq.len();
        out.extend(k.cq.drain(..));
        Ok(())
    }

    pub(crate) fn wake(&self) {
        self.lock().woken = true;
        self.cv.notify_all();
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.lock().outstanding
    }

    pub(crate) fn bufs_leased(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;
    use std::time::{Duration, Instant};

    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicUsize, Ordering};
    use loom::thread;

    use crate::op::{Op, Outcome};
    use crate::port::{CompletionPort, PortConfig};

    const EXIT: u64 = u64::MAX;
    const SUBMIT: u64 = u64::MAX - 1;

    /// Runs `f` under loom, every interleaving within the preemption bound
    /// (`LOOM_MAX_PREEMPTIONS`, default 3), and prints how many there were.
    fn model<F: Fn() + Sync + Send + 'static>(name: &str, f: F) {
        let runs = std::sync::Arc::new(StdAtomicUsize::new(0));
        let r = runs.clone();
        let mut b = loom::model::Builder::new();
        if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
            b.preemption_bound = Some(3);
        }
        let bound = b.preemption_bound;
        let t0 = Instant::now();
        b.check(move || {
            r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            f();
        });
        println!(
            "loom model {name}: {} interleavings (preemption bound {bound:?}) in {:.1}s",
            runs.load(std::sync::atomic::Ordering::Relaxed),
            t0.elapsed().as_secs_f64()
        );
    }

    fn port(concurrency: usize) -> CompletionPort {
        CompletionPort::new(&PortConfig {
            concurrency,
            ..PortConfig::default()
        })
        .unwrap()
    }

    /// A worker that takes completions until it gets `EXIT`, checking the
    /// concurrency limit while it "runs" each one. On `SUBMIT` it submits a
    /// timer with key 7 (from a worker thread: batched until its next
    /// `get`); on that timer's completion it posts one `EXIT` per worker.
    /// Returns the values it took.
    fn worker(
        port: CompletionPort,
        active: Arc<AtomicUsize>,
        limit: usize,
        workers: usize,
    ) -> Vec<u64> {
        let mut w = port.worker();
        let mut got = Vec::new();
        loop {
            let c = w.get(None).unwrap().expect("no timeout was given");
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            assert!(now <= limit, "{now} workers running, limit {limit}");
            assert!(port.running_workers() <= limit);
            active.fetch_sub(1, Ordering::SeqCst);
            match c.outcome {
                Outcome::Posted(EXIT) => return got,
                Outcome::Posted(SUBMIT) => {
                    port.submit(
                        7,
                        Op::Timeout {
                            after: Duration::ZERO,
                        },
                    )
                    .unwrap();
                    got.push(SUBMIT);
                }
                Outcome::Posted(v) => got.push(v),
                Outcome::Timer(Ok(())) => {
                    got.push(c.key);
                    for _ in 0..workers {
                        port.post(1, EXIT);
                    }
                }
                other => panic!("unexpected completion {other:?}"),
            }
        }
    }

    fn spawn_worker(
        port: &CompletionPort,
        active: &Arc<AtomicUsize>,
        limit: usize,
        workers: usize,
    ) -> thread::JoinHandle<Vec<u64>> {
        let (p, a) = (port.clone(), active.clone());
        thread::spawn(move || worker(p, a, limit, workers))
    }

    /// A completion posted from another thread reaches the one worker,
    /// whether the worker is leading (asleep in the kernel), about to lead,
    /// or not started: the post must wake the kernel wait.
    #[test]
    fn loom_post_wakes_the_leader() {
        model("post_wakes_the_leader", || {
            let port = port(1);
            let active = Arc::new(AtomicUsize::new(0));
            let t = spawn_worker(&port, &active, 1, 1);
            port.post(1, 10);
            port.post(1, EXIT);
            assert_eq!(t.join().unwrap(), vec![10]);
        });
    }

    /// Two workers, concurrency 1: every posted completion is taken exactly
    /// once, at most one worker runs at a time, and a worker leaving (its
    /// `Worker` dropped while it still counts as running) lets the other
    /// take what is left (no lost wake-up on the LIFO stack).
    #[test]
    fn loom_two_workers_limit_one() {
        model("two_workers_limit_one", || {
            let port = port(1);
            let active = Arc::new(AtomicUsize::new(0));
            let t1 = spawn_worker(&port, &active, 1, 2);
            let t2 = spawn_worker(&port, &active, 1, 2);
            port.post(1, 10);
            port.post(1, EXIT);
            port.post(1, EXIT);
            let mut all = t1.join().unwrap();
            all.extend(t2.join().unwrap());
            assert_eq!(all, vec![10]);
            assert_eq!(port.running_workers(), 0);
            assert_eq!(port.queued(), 0);
        });
    }

    /// Two workers, concurrency 2: both may run, each completion is taken
    /// once, and the port ends with nobody counted as running.
    #[test]
    fn loom_two_workers_limit_two() {
        model("two_workers_limit_two", || {
            let port = port(2);
            let active = Arc::new(AtomicUsize::new(0));
            let t1 = spawn_worker(&port, &active, 2, 2);
            let t2 = spawn_worker(&port, &active, 2, 2);
            port.post(1, 10);
            port.post(1, 11);
            port.post(1, EXIT);
            port.post(1, EXIT);
            let mut all = t1.join().unwrap();
            all.extend(t2.join().unwrap());
            all.sort_unstable();
            assert_eq!(all, vec![10, 11]);
            assert_eq!(port.running_workers(), 0);
        });
    }

    /// An operation submitted from a thread that is not a worker reaches
    /// the kernel (only workers enter it): the submission's kick wakes the
    /// leader or a follower, whatever they are doing at that moment.
    #[test]
    fn loom_foreign_submit_is_kicked_in() {
        model("foreign_submit_is_kicked_in", || {
            let port = port(1);
            let active = Arc::new(AtomicUsize::new(0));
            let t = spawn_worker(&port, &active, 1, 1);
            port.submit(
                7,
                Op::Timeout {
                    after: Duration::ZERO,
                },
            )
            .unwrap();
            assert_eq!(t.join().unwrap(), vec![7]);
            assert_eq!(port.outstanding(), 0);
        });
    }

    /// A worker's own submission is batched and reaches the kernel at its
    /// next `get`, even when another worker is asleep in the kernel as
    /// leader (the flush's completion must wake it) or the submitter takes
    /// ready work instead of leading.
    #[test]
    fn loom_worker_submit_flushed_at_next_get() {
        model("worker_submit_flushed_at_next_get", || {
            let port = port(2);
            let active = Arc::new(AtomicUsize::new(0));
            let t1 = spawn_worker(&port, &active, 2, 2);
            let t2 = spawn_worker(&port, &active, 2, 2);
            port.post(1, SUBMIT);
            let mut all = t1.join().unwrap();
            all.extend(t2.join().unwrap());
            all.sort_unstable();
            assert_eq!(all, vec![7, SUBMIT]);
            assert_eq!(port.outstanding(), 0);
        });
    }
}
