//! cport: a completion-port network server framework and toolkit.
//!
//! The layers, each depending only on the ones before it:
//!
//! 1. [`port`] — the completion port and its backends (io_uring or epoll on
//!    Linux, IOCP on Windows).
//! 2. [`op`] / [`buf`] — operations that own their buffers until their
//!    completion is reaped; pooled receive buffers.
//! 3. [`frame`] — the wire codec (pure, no I/O).
//! 4. [`server`] / [`client`] — connections, send queues, handlers, shutdown,
//!    stats; the built-in services. [`stress`] (the load generator behind
//!    `cport stress`) sits beside them, on the same engine.
//!
//! [`cluster`] (with the `cluster` feature, on by default) bridges servers
//! over NATS: BROADCAST and targeted sends across nodes (docs/CLUSTER.md).
//!
//! [`chart`] draws SVG charts and self-contained HTML report pages for the
//! tools (`cport bench`, stress reports); it depends on none of the above.
//!
//! The `cport` binary (`src/main.rs`, `src/cli/`) is a thin layer over these.
//! docs/DESIGN.md describes the life of an operation and of a connection.
#![deny(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![warn(clippy::undocumented_unsafe_blocks)]
// Under the loom models (`--cfg loom`) the OS backends are built but unused.
#![cfg_attr(loom, allow(dead_code))]

pub mod admin;
pub mod bench;
pub mod buf;
pub mod chart;
pub mod client;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod frame;
pub mod op;
pub mod port;
pub mod server;
pub mod stress;
mod sync;
pub mod units;
