//! The servers a bench compares, by name, and running one as a child
//! process on a free loopback port.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What runs behind a server name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum ServerKind {
    /// `cport server`.
    Cport {
        /// `--protocol raw` (else framed).
        raw: bool,
        /// `--backend`: `uring` or `poll`.
        backend: String,
        /// `--ports`.
        ports: usize,
        /// `--workers`.
        workers: usize,
    },
    /// `cport-peer SERVER`.
    Peer {
        /// The peer's server argument (`tokio-mt`, `uring`, ...).
        server: String,
        /// `--workers`, when it takes one.
        workers: Option<usize>,
        /// `--ring`, when it takes one.
        ring: Option<String>,
    },
}

/// A server to bench: its name in tables and on the command line, and
/// what runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSpec {
    /// Short name (`tokio-mt`, `cport-raw`, ...).
    pub name: String,
    /// One line saying what it is.
    pub description: String,
    /// How it is started.
    pub kind: ServerKind,
}

impl ServerSpec {
    /// Whether it speaks raw echo (everything but cport's framed protocol).
    pub fn raw(&self) -> bool {
        match &self.kind {
            ServerKind::Cport { raw, .. } => *raw,
            ServerKind::Peer { .. } => true,
        }
    }

    /// Whether it runs from `cport-peer`.
    pub fn is_peer(&self) -> bool {
        matches!(self.kind, ServerKind::Peer { .. })
    }

    /// The command line (program name and arguments) that serves on `addr`.
    pub fn args(&self, addr: SocketAddr) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        match &self.kind {
            ServerKind::Cport {
                raw,
                backend,
                ports,
                workers,
            } => {
                a.extend(
                    [
                        "server",
                        "--listen",
                        &addr.to_string(),
                        "--protocol",
                        if *raw { "raw" } else { "framed" },
                        "--backend",
                        backend,
                        "--ports",
                        &ports.to_string(),
                        "--workers",
                        &workers.to_string(),
                        "--log",
                        "warn",
                    ]
                    .map(String::from),
                );
            }
            ServerKind::Peer {
                server,
                workers,
                ring,
            } => {
                a.extend([server.clone(), "--listen".into(), addr.to_string()]);
                if let Some(w) = workers {
                    a.extend(["--workers".into(), w.to_string()]);
                }
                if let Some(r) = ring {
                    a.extend(["--ring".into(), r.clone()]);
                }
            }
        }
        a
    }
}

/// The servers a default bench runs (tokio-ct, the ring-flag variants
/// and the other cport models are in [`ALL_SERVERS`]; the default stays
/// within five minutes on two cores).
pub const DEFAULT_SERVERS: &[&str] = &[
    "tokio-mt",
    "threads",
    "monoio",
    "uring-ref",
    "cport-raw",
    "cport-framed",
    "cport-raw-poll",
];

/// Every server name `server_by_name` knows, for `--servers all` and the
/// help text (the ring-flag variants of monoio and uring-ref are extra).
pub const ALL_SERVERS: &[&str] = &[
    "tokio-mt",
    "tokio-ct",
    "threads",
    "monoio",
    "monoio-coop",
    "monoio-none",
    "uring-ref",
    "uring-ref-2",
    "cport-raw",
    "cport-framed",
    "cport-raw-poll",
    "cport-framed-poll",
    "cport-raw-shared",
    "cport-framed-shared",
    "cport-raw-poll-shared",
    "cport-framed-poll-shared",
];

/// The server called `name` on a machine with `cores` cores, or why there
/// is none.
///
/// - `tokio-mt` (one worker per core), `tokio-ct`, `threads`;
/// - `monoio` (a thread per core; ring flags `-defer` by default, or
///   `-coop` / `-none`);
/// - `uring-ref` (the hand-written loop, one thread; `-2` for two, and the
///   same ring-flag suffixes);
/// - `cport-{raw|framed}[-poll][-shared]`: io_uring unless `-poll`;
///   per-core (a port per worker, a worker per core) unless `-shared`
///   (one port, a worker per core).
pub fn server_by_name(name: &str, cores: usize) -> Result<ServerSpec, String> {
    let cores = cores.max(1);
    let peer = |server: &str, workers: Option<usize>, ring: Option<&str>, d: String| ServerSpec {
        name: name.to_string(),
        description: d,
        kind: ServerKind::Peer {
            server: server.to_string(),
            workers,
            ring: ring.map(String::from),
        },
    };
    let ring_of = |rest: &str| -> Result<&'static str, String> {
        match rest {
            "" | "-defer" => Ok("defer"),
            "-coop" => Ok("coop"),
            "-none" => Ok("none"),
            _ => Err(format!(
                "unknown ring flags '{rest}' in '{name}' (use -defer, -coop or -none)"
            )),
        }
    };
    let flags = |r: &str| match r {
        "defer" => "SINGLE_ISSUER+DEFER_TASKRUN",
        "coop" => "COOP_TASKRUN",
        _ => "no setup flags",
    };
    match name {
        "tokio-mt" => Ok(peer(
            "tokio-mt",
            Some(cores),
            None,
            format!("tokio multi-thread runtime, {cores} workers, a task per connection"),
        )),
        "tokio-ct" => Ok(peer(
            "tokio-ct",
            None,
            None,
            "tokio current-thread runtime, a task per connection".into(),
        )),
        "threads" => Ok(peer(
            "threads",
            None,
            None,
            "a thread per connection, std blocking sockets".into(),
        )),
        n if n.starts_with("monoio") => {
            let r = ring_of(&n["monoio".len()..])?;
            Ok(peer(
                "monoio",
                Some(cores),
                Some(r),
                format!(
                    "monoio 0.2 on io_uring, {cores} threads (thread per core), {}",
                    flags(r)
                ),
            ))
        }
        n if n.starts_with("uring-ref") => {
            let mut rest = &n["uring-ref".len()..];
            let mut threads = 1;
            if let Some(r) = rest.strip_prefix("-2") {
                threads = 2;
                rest = r;
            }
            let r = ring_of(rest)?;
            Ok(peer(
                "uring",
                Some(threads),
                Some(r),
                format!(
                    "hand-written io_uring loop, {threads} thread(s), multishot recv from a provided-buffer ring, {}",
                    flags(r)
                ),
            ))
        }
        n if n.starts_with("cport-") => {
            let mut parts = n["cport-".len()..].split('-');
            let raw = match parts.next() {
                Some("raw") => true,
                Some("framed") => false,
                _ => return Err(format!("'{n}': say cport-raw or cport-framed")),
            };
            let mut backend = "uring";
            let mut shared = false;
            for p in parts {
                match p {
                    "poll" => backend = "poll",
                    "uring" => backend = "uring",
                    "shared" => shared = true,
                    "percore" => shared = false,
                    _ => return Err(format!("'{n}': unknown part '{p}' (use -poll, -shared)")),
                }
            }
            let ports = if shared { 1 } else { cores };
            Ok(ServerSpec {
                name: name.to_string(),
                description: format!(
                    "cport server --protocol {} --backend {backend} --ports {ports} --workers {cores} ({})",
                    if raw { "raw" } else { "framed" },
                    if shared {
                        "shared port"
                    } else {
                        "per-core ports"
                    }
                ),
                kind: ServerKind::Cport {
                    raw,
                    backend: backend.to_string(),
                    ports,
                    workers: cores,
                },
            })
        }
        _ => Err(format!(
            "unknown server '{name}' (known: {})",
            ALL_SERVERS.join(", ")
        )),
    }
}

/// The programs servers run from.
#[derive(Debug, Clone)]
pub struct Programs {
    /// The `cport` executable.
    pub cport: PathBuf,
    /// `cport-peer`, if it was found.
    pub peer: Option<PathBuf>,
}

impl Programs {
    /// `cport` at `cport`, and `cport-peer` beside it if it is there.
    pub fn beside(cport: PathBuf) -> Programs {
        let peer = cport
            .parent()
            .map(|d| d.join("cport-peer"))
            .filter(|p| p.is_file());
        Programs { cport, peer }
    }

    fn program_for(&self, spec: &ServerSpec) -> io::Result<&Path> {
        if spec.is_peer() {
            self.peer.as_deref().ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "server '{}' runs from cport-peer, which is not beside {}: build it with \
                         `cargo build --release --workspace` (or `-p cport-bench`), or leave the \
                         peers out with --servers",
                        spec.name,
                        self.cport.display()
                    ),
                )
            })
        } else {
            Ok(&self.cport)
        }
    }
}

/// A server process, killed when dropped.
#[derive(Debug)]
pub struct Running {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its process id.
    pub pid: u32,
    log: PathBuf,
}

/// A loopback port nothing listens on right now.
fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Running {
    /// Starts `spec` on a free loopback port and waits (at most `within`)
    /// until it accepts connections.
    pub fn start(spec: &ServerSpec, programs: &Programs, within: Duration) -> io::Result<Running> {
        let program = programs.program_for(spec)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = std::env::temp_dir().join(format!(
            "cport-bench-{}-{}.log",
            std::process::id(),
            spec.name
        ));
        let child = Command::new(program)
            .args(spec.args(addr))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot start {} ({}): {e}", spec.name, program.display()),
                )
            })?;
        let pid = child.id();
        let mut r = Running {
            child,
            addr,
            pid,
            log,
        };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = r.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{} exited ({status}) before accepting: {}",
                    spec.name,
                    r.log_tail()
                )));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} did not accept on {addr} within {within:?}: {}",
                        spec.name,
                        r.log_tail()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of its standard error.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        if tail.is_empty() {
            "(no output)".into()
        } else {
            tail
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Nothing of its state is wanted: SIGKILL is quickest, and its
        // sockets are closed by the kernel all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_server_parses() {
        for n in ALL_SERVERS.iter().chain(DEFAULT_SERVERS) {
            let s = server_by_name(n, 2).unwrap_or_else(|e| panic!("{n}: {e}"));
            assert_eq!(s.name, *n);
            assert!(!s.args("127.0.0.1:1".parse().unwrap()).is_empty());
        }
    }

    #[test]
    fn names_say_what_runs() {
        let s = server_by_name("cport-framed-poll-shared", 2).unwrap();
        assert_eq!(
            s.kind,
            ServerKind::Cport {
                raw: false,
                backend: "poll".into(),
                ports: 1,
                workers: 2
            }
        );
        assert!(!s.raw());
        let args = s.args("127.0.0.1:9".parse().unwrap()).join(" ");
        assert!(
            args.contains("--protocol framed --backend poll --ports 1 --workers 2"),
            "{args}"
        );
        let m = server_by_name("monoio-coop", 2).unwrap();
        assert!(m.raw() && m.is_peer());
        assert!(
            m.args("127.0.0.1:9".parse().unwrap())
                .join(" ")
                .ends_with("--ring coop")
        );
        let u = server_by_name("uring-ref", 2).unwrap();
        assert!(
            u.args("127.0.0.1:9".parse().unwrap())
                .join(" ")
                .contains("uring --listen 127.0.0.1:9 --workers 1 --ring defer")
        );
    }

    #[test]
    fn bad_names_are_refused_with_the_known_ones() {
        for bad in ["nginx", "cport-", "cport-raw-fast", "monoio-turbo", ""] {
            let e = server_by_name(bad, 2).unwrap_err();
            assert!(e.contains(bad) || e.contains("known"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_missing_peer_binary_says_how_to_build_it() {
        let p = Programs {
            cport: "/nonexistent/cport".into(),
            peer: None,
        };
        let e = Running::start(
            &server_by_name("tokio-mt", 2).unwrap(),
            &p,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("cargo build --release --workspace"),
            "{e}"
        );
    }
}
