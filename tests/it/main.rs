//! cport's integration tests: one binary, one module per area.
//!
//! `port` and `engine` test the library directly. The other modules start
//! real `cport` servers (each test its own, on an ephemeral loopback port,
//! see `util::Server`), talk to them with blocking std sockets that have
//! read/write timeouts, and stop them at the end, checking the exit code and
//! the final summary (nothing outstanding).
//!
//! The binary is located through `CARGO_BIN_EXE_cport` (or the `CPORT_BIN`
//! environment variable). Set `CPORT_TEST_BACKEND=uring|poll|auto` to pass
//! `--backend` to every server.

mod util;

mod bad_input;
mod chat;
mod cli;
mod client;
mod echo;
mod engine;
mod fallback;
mod port;
mod protocol;
mod raw;
mod scale;
mod services;
mod shutdown;
mod slot_reuse;
mod stress;
