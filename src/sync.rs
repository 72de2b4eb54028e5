//! The synchronisation primitives of the completion port's scheduling code
//! (leader/follower hand-off, LIFO waiter stack, concurrency limit): std's,
//! or [loom]'s when the crate is built with `--cfg loom`, so that the loom
//! models in `port::model` check the port's real code under every
//! interleaving (see docs/reliability/models.md).
//!
//! Only what `port/mod.rs` uses is here; everything else in the crate uses
//! std directly.
//!
//! [loom]: https://docs.rs/loom

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::thread;
#[cfg(not(loom))]
pub(crate) use std::thread_local;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
/// loom's `thread_local!` (each loom thread gets its own value), accepting
/// std's `const { .. }` initialiser, which loom's macro does not parse.
#[cfg(loom)]
macro_rules! loom_thread_local {
    ($(#[$attr:meta])* static $name:ident: $t:ty = const { $init:expr };) => {
        loom::thread_local! { $(#[$attr])* static $name: $t = $init; }
    };
}

/// Threads under loom, with std's park/unpark semantics.
///
/// loom's own `unpark` makes the target runnable even when it is blocked
/// on a mutex, not parked (loom then fails with "expected to be able to
/// acquire lock"); std's only leaves a token for the next `park`. The port
/// unparks a waiter that may be anywhere between pushing itself on the
/// stack and parking, so it needs std's semantics: a token behind a loom
/// mutex and condition variable.
#[cfg(loom)]
pub(crate) mod thread {
    use loom::sync::{Arc, Condvar, Mutex};

    pub(crate) use std::thread::available_parallelism;

    /// A handle to wake one thread, like `std::thread::Thread`.
    #[derive(Clone)]
    pub(crate) struct Thread(Arc<Parker>);

    struct Parker {
        token: Mutex<bool>,
        cv: Condvar,
    }

    loom::thread_local! {
        static CURRENT: Thread = Thread(Arc::new(Parker {
            token: Mutex::new(false),
            cv: Condvar::new(),
        }));
    }

    /// The calling thread's handle.
    pub(crate) fn current() -> Thread {
        CURRENT.with(Thread::clone)
    }

    /// Blocks until the calling thread's token is available, consuming it.
    pub(crate) fn park() {
        let p = current().0;
        let mut token = p.token.lock().unwrap();
        while !*token {
            token = p.cv.wait(token).unwrap();
        }
        *token = false;
    }

    /// loom has no time: the models only wait without a deadline, so a
    /// timed park is never reached there; if it were, parking until
    /// unparked is a legal behaviour of `park_timeout`.
    pub(crate) fn park_timeout(_: std::time::Duration) {
        park()
    }

    impl Thread {
        /// Makes the token available, waking the thread if it is parked.
        pub(crate) fn unpark(&self) {
            *self.0.token.lock().unwrap() = true;
            self.0.cv.notify_one();
        }
    }
}
#[cfg(loom)]
pub(crate) use loom_thread_local as thread_local;
