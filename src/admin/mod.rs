//! The admin endpoint (`cport server --admin ADDR`): an
//! HTTP server on a thread of its own, beside the engine, serving
//!
//! - `/metrics` — the counters in the Prometheus text format;
//! - `/stats` — the same as JSON: the STATS command's document;
//! - `/` — a live dashboard (HTML, CSS and JS embedded in the binary, no
//!   external requests) charting connections, accepts/s, messages/s,
//!   bytes/s, CPU and RSS over the last minutes, with a log of recent
//!   connection events — the classic IOCP articles' server window, in a browser;
//! - `/api/live` — what the dashboard polls: new samples and events.
//!
//! This module sits on the `server` layer and reads the engine only
//! through an [`Observer`] (snapshots of the sharded counters, the event
//! ring); it never locks a connection or touches a port, so its traffic
//! cannot hold up the data path. HTTP is `tiny_http`'s; a malformed
//! request is answered (or dropped) by it, an unknown path gets 404, a
//! method other than GET/HEAD 405, and the thread carries on.
//!
//! The dashboard polls once a second rather than holding a server-sent
//! event stream or a websocket open: `tiny_http` answers a request on the
//! admin thread, so a stream would need a thread per open page, while a
//! poll is one short request that costs nothing once the tab is closed.
//! The history lives in the server ([`history`]), so the page shows the
//! last minutes however late it is opened and catches up after a
//! background tab was throttled.

pub mod history;
pub mod metrics;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::server::{Event, Observer, StatsSnapshot};
use history::{History, Sample};

/// How often the dashboard's figures are sampled (and the page polls).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Most events one `/api/live` reply carries.
const MAX_EVENTS_PER_REPLY: usize = 500;

const DASHBOARD_HTML: &str = include_str!("dashboard.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard.css");

/// Why the admin endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is reachable from other hosts and that was not allowed.
    #[error(
        "{0} is not a loopback address, and the admin endpoint shows the server's counters and its clients' addresses to whoever connects"
    )]
    NotLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What went wrong.
        source: io::Error,
    },
}

/// Refuses an address other hosts can reach unless `allow_public`.
pub fn check_addr(addr: SocketAddr, allow_public: bool) -> Result<(), AdminError> {
    if addr.ip().is_loopback() || allow_public {
        Ok(())
    } else {
        Err(AdminError::NotLoopback(addr))
    }
}

/// A running admin endpoint. Dropping it stops the thread.
pub struct Admin {
    addr: SocketAddr,
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").field("addr", &self.addr).finish()
    }
}

impl Admin {
    /// Serves the admin endpoint for the engine behind `observer` on
    /// `addr`, which must be a loopback address unless `allow_public`.
    /// Turns on the engine's latency histogram and event log.
    pub fn start(
        addr: SocketAddr,
        allow_public: bool,
        observer: Observer,
    ) -> Result<Admin, AdminError> {
        check_addr(addr, allow_public)?;
        let bind = |source| AdminError::Bind { addr, source };
        let listener = TcpListener::bind(addr).map_err(bind)?;
        let bound = listener.local_addr().map_err(bind)?;
        let server = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| bind(io::Error::other(e.to_string())))?;
        let server = Arc::new(server);
        let stop = Arc::new(AtomicBool::new(false));
        observer.set_live(true);
        let thread = {
            let (server, stop) = (server.clone(), stop.clone());
            thread::Builder::new()
                .name("cport-admin".into())
                .spawn(move || serve(&server, &observer, &stop))
                .map_err(bind)?
        };
        Ok(Admin {
            addr: bound,
            server,
            stop,
            thread: Some(thread),
        })
    }

    /// The address served (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the endpoint and waits for its thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The admin thread: samples once a second and answers requests between.
fn serve(server: &tiny_http::Server, observer: &Observer, stop: &AtomicBool) {
    let mut history = History::default();
    let mut next = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next {
            history.record(now, observer.snapshot());
            next += SAMPLE_EVERY;
            if next <= now {
                next = now + SAMPLE_EVERY; // fell behind: skip, don't burst
            }
        }
        match server.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(Some(req)) => answer(req, observer, &history),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("admin endpoint: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn answer(req: tiny_http::Request, observer: &Observer, history: &History) {
    // Prometheus asks for OpenMetrics; everyone else gets the classic text.
    let openmetrics = req.headers().iter().any(|h| {
        h.field.equiv("Accept") && h.value.as_str().contains("application/openmetrics-text")
    });
    let reply = route(req.method(), req.url(), openmetrics, observer, history);
    let mut resp = tiny_http::Response::from_data(reply.body).with_status_code(reply.status);
    let headers = [
        ("Content-Type", reply.content_type),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        // The page may load only from here: no external requests.
        (
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
        ),
    ];
    for (k, v) in headers.iter().chain(reply.allow.iter()) {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            resp = resp.with_header(h);
        }
    }
    if let Err(e) = req.respond(resp) {
        tracing::debug!("admin endpoint: reply not sent: {e}");
    }
}

/// An answer, before it is put on the wire.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    allow: Option<(&'static str, &'static str)>,
}

impl Reply {
    fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status: 200,
            content_type,
            body: body.into(),
            allow: None,
        }
    }

    fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            ..Reply::ok("text/plain; charset=utf-8", format!("{body}\n"))
        }
    }
}

const JSON: &str = "application/json";

/// What `/api/live` returns.
#[derive(Debug, Serialize)]
struct Live<'a> {
    /// How often samples are taken, ms.
    sample_every_ms: u64,
    stats: &'a StatsSnapshot,
    samples: Vec<Sample>,
    events: Vec<Event>,
}

fn route(
    method: &tiny_http::Method,
    url: &str,
    openmetrics: bool,
    observer: &Observer,
    history: &History,
) -> Reply {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let known = matches!(
        path,
        "/" | "/index.html"
            | "/dashboard.js"
            | "/dashboard.css"
            | "/metrics"
            | "/stats"
            | "/api/live"
    );
    if !known {
        return Reply::text(
            404,
            &format!("not found: {path} (try /, /metrics or /stats)"),
        );
    }
    if !matches!(method, tiny_http::Method::Get | tiny_http::Method::Head) {
        return Reply {
            allow: Some(("Allow", "GET, HEAD")),
            ..Reply::text(
                405,
                &format!("method {method} not allowed on {path}: use GET"),
            )
        };
    }
    match path {
        "/" | "/index.html" => Reply::ok("text/html; charset=utf-8", DASHBOARD_HTML),
        "/dashboard.js" => Reply::ok("text/javascript; charset=utf-8", DASHBOARD_JS),
        "/dashboard.css" => Reply::ok("text/css; charset=utf-8", DASHBOARD_CSS),
        "/metrics" if openmetrics => {
            Reply::ok(metrics::CONTENT_TYPE, metrics::encode(&observer.snapshot()))
        }
        "/metrics" => Reply::ok(
            metrics::CLASSIC_CONTENT_TYPE,
            metrics::encode_classic(&observer.snapshot()),
        ),
        "/stats" => Reply::ok(
            JSON,
            serde_json::to_vec(&observer.snapshot()).unwrap_or_default(),
        ),
        _ => live(query, observer, history),
    }
}

/// `/api/live?samples=S&events=E`: samples after S and events after E
/// (both by seq; 0 or absent for all), with the current snapshot.
fn live(query: &str, observer: &Observer, history: &History) -> Reply {
    let mut after = (0u64, 0u64);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match k {
            "samples" => &mut after.0,
            "events" => &mut after.1,
            _ => continue,
        };
        match v.parse() {
            Ok(n) => *slot = n,
            Err(_) => {
                return Reply::text(400, &format!("bad {k}={v:?}: expected a sequence number"));
            }
        }
    }
    let stats = observer.snapshot();
    let body = Live {
        sample_every_ms: SAMPLE_EVERY.as_millis() as u64,
        stats: &stats,
        samples: history.since(after.0),
        events: observer.events_since(after.1, MAX_EVENTS_PER_REPLY),
    };
    Reply::ok(JSON, serde_json::to_vec(&body).unwrap_or_default())
}
