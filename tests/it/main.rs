//! cport's integration tests: one binary, one module per area.
//!
//! `port` and `engine` test the library directly. The other modules start
//! real `cport` servers (each test its own, on an ephemeral loopback port,
//! see `util::Server`), talk to them with blocking std sockets that have
//! read/write timeouts, and stop them at the end, checking the exit code and
//! the final summary (nothing outstanding).
//!
//! The binary is `$CPORT_BIN` when set (e.g. an ASan or release build), else
//! `CARGO_BIN_EXE_cport`. Set `CPORT_TEST_BACKEND=uring|poll|auto` to pass
//! `--backend` to every server.

#![cfg(target_os = "linux")]
// Linux only: the suite stops servers with signals and reads /proc and
// rlimits. The Windows build is tested by `tests/win` (under Wine in CI).

mod util;

mod admin;
mod bad_input;
mod bench;
mod cancel_race;
mod chat;
mod cli;
mod client;
#[cfg(feature = "cluster")]
mod cluster;
mod echo;
mod engine;
mod fallback;
mod fault;
mod hostile;
mod hostile_budget;
mod hostile_file;
mod hostile_limits;
mod hostile_mixed;
mod netpath;
mod port;
mod port_multishot;
mod protocol;
mod raw;
mod recv_end;
mod ring_limits;
mod scale;
mod services;
mod shutdown;
mod shutdown_load;
mod slot_reuse;
mod soak;
mod stress;
