//! The chat example (`examples/chat.rs`) run in-process: its handler on a
//! real engine, talked to over loopback with blocking sockets. It is the
//! proof that a service can be written on the public `Handler` API alone,
//! so these tests check the service, in both models, and that the engine
//! and the handler are left holding nothing.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use cport::server::{Engine, EngineConfig};

use crate::util::{self, DEADLINE, Gate, POLL_STEP};

#[path = "../../examples/chat.rs"]
#[allow(dead_code)] // the example's `main` and its flags are not used here
pub(crate) mod chat_example;

use chat_example::{Census, Chat, ChatConfig, cmd, err};

/// The two threading models: workers sharing one port, and one port each.
const MODELS: [(usize, usize); 2] = [(1, 2), (2, 2)];

/// How soon a departure notice must reach an otherwise idle member: it is
/// posted by `on_close`, so it comes at once, not with the next traffic.
/// Generous for a loaded machine, yet well under the socket timeout.
const PROMPT: Duration = Duration::from_secs(5);

/// Starts the chat on an engine with `ports` and `workers`, runs `body`
/// against its address, then shuts down and checks that nothing is left:
/// no operation, no buffer, no connection, and nothing in the chat's maps.
fn with_chat(ports: usize, workers: usize, chat: ChatConfig, body: impl FnOnce(SocketAddr)) {
    with_chat_engine(
        EngineConfig {
            ports,
            workers,
            ..EngineConfig::default()
        },
        chat,
        body,
    );
}

fn with_chat_engine(mut cfg: EngineConfig, chat: ChatConfig, body: impl FnOnce(SocketAddr)) {
    // The backend under test (`CPORT_TEST_BACKEND`), like every other suite.
    cfg.port.backend = util::test_port_backend();
    let model = format!("ports={} workers={}", cfg.ports, cfg.workers);
    let chat = Arc::new(Chat::new(chat));
    let mut engine = Engine::start(cfg, chat.clone()).expect("start the engine");
    let addr = engine
        .listen("127.0.0.1:0".parse().unwrap(), 1024)
        .expect("listen");
    body(addr);
    let summary = engine.shutdown(Duration::from_secs(2));
    assert_eq!(summary.outstanding_ops, 0, "{model}: {summary}");
    assert_eq!(summary.outstanding_bufs, 0, "{model}: {summary}");
    assert_eq!(summary.connections_left, 0, "{model}: {summary}");
    assert_eq!(
        chat.census(),
        Census::default(),
        "{model}: the chat still holds state after every connection closed"
    );
}

/// A test client: a blocking socket with timeouts.
struct Client {
    s: TcpStream,
    what: String,
}

impl Client {
    fn connect(addr: SocketAddr, what: &str) -> Client {
        Client {
            s: util::connect(addr),
            what: what.to_string(),
        }
    }

    /// A client with nickname `nick` in `room`.
    fn join(addr: SocketAddr, nick: &str, room: &str) -> Client {
        let mut c = Client::connect(addr, nick);
        assert_eq!(c.ask(cmd::NICK, nick), (cmd::OK, format!("nick {nick}")));
        assert_eq!(c.ask(cmd::JOIN, room), (cmd::OK, format!("joined {room}")));
        c
    }

    fn send(&mut self, cmd: u32, body: impl AsRef<[u8]>) {
        util::write_frame(&mut self.s, cmd, body.as_ref())
            .unwrap_or_else(|e| panic!("{}: write: {e}", self.what));
    }

    /// The next frame, body as text.
    fn next(&mut self) -> (u32, String) {
        let (cmd, body) = util::expect_frame(&mut self.s, &self.what);
        let text = String::from_utf8(body)
            .unwrap_or_else(|_| panic!("{}: a frame with cmd {cmd} is not UTF-8", self.what));
        (cmd, text)
    }

    /// Frames until one that `want` accepts (returned), within DEADLINE.
    /// Room traffic (MSG, INFO) on the way is skipped; anything else fails.
    fn until(&mut self, what: &str, want: impl Fn(u32, &str) -> bool) -> (u32, String) {
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < DEADLINE,
                "{}: no {what} within {DEADLINE:?}",
                self.what
            );
            let (c, text) = self.next();
            if want(c, &text) {
                return (c, text);
            }
            assert!(
                c == cmd::MSG || c == cmd::INFO,
                "{}: waiting for {what}, got cmd {c:#x} {text:?}",
                self.what
            );
        }
    }

    /// Waits at most [`PROMPT`] for `* NICK left ROOM`, with nothing sent
    /// meanwhile: only a wake-up posted by the server can bring it. Room
    /// traffic on the way is skipped.
    fn departure(&mut self, nick: &str, room: &str) {
        let want = format!("* {nick} left {room}");
        let start = Instant::now();
        loop {
            let left = PROMPT.saturating_sub(start.elapsed());
            let (c, body) = util::read_frame_timeout(&mut self.s, left).unwrap_or_else(|e| {
                panic!(
                    "{}: no {want:?} within {PROMPT:?} ({e}): the departure was not posted",
                    self.what
                )
            });
            let text = String::from_utf8_lossy(&body);
            if c == cmd::INFO && text == want {
                return;
            }
            assert!(
                c == cmd::MSG || c == cmd::INFO,
                "{}: waiting for {want:?}, got cmd {c:#x} {text:?}",
                self.what
            );
        }
    }

    /// Sends a request and returns the direct answer (OK, NAMES or ERROR;
    /// an ERROR's body is given as "code message").
    fn ask(&mut self, cmd: u32, body: impl AsRef<[u8]>) -> (u32, String) {
        self.send(cmd, body);
        let (c, text) = self.until("an answer", |c, _| {
            matches!(c, cmd::OK | cmd::NAMES | util::CMD_ERROR)
        });
        if c == util::CMD_ERROR {
            let raw = text.as_bytes();
            assert!(raw.len() >= 4, "{}: short ERROR frame", self.what);
            let code = u32::from_be_bytes(raw[..4].try_into().unwrap());
            return (c, format!("{code} {}", &text[4..]));
        }
        (c, text)
    }

    /// Sends a request that must be refused with `code`.
    fn refused(&mut self, cmd: u32, body: impl AsRef<[u8]>, code: u32) {
        let (c, text) = self.ask(cmd, body);
        assert_eq!(
            c,
            util::CMD_ERROR,
            "{}: expected ERROR {code}, got {text:?}",
            self.what
        );
        assert!(
            text.starts_with(&format!("{code} ")),
            "{}: expected ERROR {code}, got {text:?}",
            self.what
        );
    }

    /// WHO, as a list.
    fn who(&mut self) -> Vec<String> {
        let (c, text) = self.ask(cmd::WHO, "");
        assert_eq!(c, cmd::NAMES, "{}: WHO answered {text:?}", self.what);
        text.lines().map(str::to_string).collect()
    }
}

fn no_ticks() -> ChatConfig {
    ChatConfig {
        announce: None,
        ..ChatConfig::default()
    }
}

#[test]
fn chat_nick_is_unique_and_released_on_close() {
    for (ports, workers) in MODELS {
        with_chat(ports, workers, no_ticks(), |addr| {
            let mut a = Client::connect(addr, "a");
            let mut b = Client::connect(addr, "b");
            assert_eq!(a.ask(cmd::NICK, "alice"), (cmd::OK, "nick alice".into()));
            b.refused(cmd::NICK, "alice", err::NICK_TAKEN);
            // Renaming releases the old name.
            assert_eq!(a.ask(cmd::NICK, "al"), (cmd::OK, "nick al".into()));
            assert_eq!(b.ask(cmd::NICK, "alice"), (cmd::OK, "nick alice".into()));
            a.refused(cmd::NICK, "alice", err::NICK_TAKEN);
            // Closing releases it too; poll, since the close is asynchronous.
            drop(b);
            let start = Instant::now();
            loop {
                let (c, text) = a.ask(cmd::NICK, "alice");
                if c == cmd::OK {
                    assert_eq!(text, "nick alice");
                    break;
                }
                assert!(
                    text.starts_with(&format!("{} ", err::NICK_TAKEN)),
                    "{text:?}"
                );
                assert!(start.elapsed() < DEADLINE, "alice never released");
                thread::sleep(POLL_STEP);
            }
        });
    }
}

/// 20 clients in one room each say 50 numbered lines; every client must
/// get all 1,000 exactly once, each sender's in the order sent. Room
/// announcements tick every 20 ms meanwhile, to mix timers in.
fn room_fan_out(ports: usize, workers: usize) {
    const CLIENTS: usize = 20;
    const LINES: usize = 50;
    let cfg = ChatConfig {
        announce: Some(Duration::from_millis(20)),
        ..ChatConfig::default()
    };
    with_chat(ports, workers, cfg, |addr| {
        let gate = Gate::new(CLIENTS, DEADLINE);
        thread::scope(|s| {
            for i in 0..CLIENTS {
                let gate = &gate;
                s.spawn(move || {
                    let _g = gate.guard();
                    let me = format!("u{i}");
                    let mut c = Client::join(addr, &me, "lobby");
                    gate.wait(1); // everyone is in the room
                    for k in 0..LINES {
                        c.send(cmd::SAY, format!("m{k}"));
                    }
                    let mut next = [0usize; CLIENTS];
                    let mut got = 0;
                    while got < CLIENTS * LINES {
                        let (_, line) = c.until("a chat line", |c, _| c == cmd::MSG);
                        let (from, text) = line
                            .split_once(": m")
                            .unwrap_or_else(|| panic!("{me}: odd line {line:?}"));
                        let j: usize = from[1..].parse().unwrap();
                        let k: usize = text.parse().unwrap();
                        assert_eq!(k, next[j], "{me}: from {from}, line {k} out of order");
                        next[j] += 1;
                        got += 1;
                    }
                    gate.wait(2); // everyone has everything: no more lines may come
                    c.send(cmd::WHO, "");
                    let (_, names) = c.until("NAMES", |c, _| {
                        assert_ne!(c, cmd::MSG, "{me}: a line arrived twice");
                        c == cmd::NAMES
                    });
                    assert_eq!(names.lines().count(), CLIENTS, "{me}: WHO gave {names:?}");
                    gate.wait(3); // nobody leaves before everyone asked WHO
                });
            }
        });
    });
}

#[test]
fn chat_room_fan_out_shared_port() {
    room_fan_out(1, 2);
}

#[test]
fn chat_room_fan_out_port_per_worker() {
    room_fan_out(2, 2);
}

#[test]
fn chat_rooms_are_isolated() {
    for (ports, workers) in MODELS {
        with_chat(ports, workers, no_ticks(), |addr| {
            let mut a = Client::join(addr, "alice", "red");
            let mut b = Client::join(addr, "bob", "red");
            let mut c = Client::join(addr, "carol", "blue");
            a.send(cmd::SAY, "secret");
            b.until("alice's line", |c, t| c == cmd::MSG && t == "alice: secret");
            // alice's line was in every mailbox it went to before bob got
            // it; carol's own line queues behind it, so it would show here.
            c.send(cmd::SAY, "hi");
            let (_, line) = c.until("carol's own line", |c, _| c == cmd::MSG);
            assert_eq!(line, "carol: hi", "a line crossed rooms");
            assert_eq!(a.who(), ["alice", "bob"]);
            assert_eq!(c.who(), ["carol"]);
            // Moving rooms: bob leaves red for blue.
            assert_eq!(b.ask(cmd::JOIN, "blue"), (cmd::OK, "joined blue".into()));
            a.until("bob leaving", |c, t| {
                c == cmd::INFO && t == "* bob left red"
            });
            c.until("bob arriving", |c, t| {
                c == cmd::INFO && t == "* bob joined blue"
            });
            assert_eq!(a.who(), ["alice"]);
            assert_eq!(c.who(), ["bob", "carol"]);
        });
    }
}

#[test]
fn chat_departures_are_announced_and_leave_who() {
    for (ports, workers) in MODELS {
        with_chat(ports, workers, no_ticks(), |addr| {
            let mut a = Client::join(addr, "alice", "lobby");
            let b = Client::join(addr, "bob", "lobby");
            let mut c = Client::join(addr, "carol", "lobby");
            assert_eq!(a.who(), ["alice", "bob", "carol"]);
            // A disconnect: announced by `on_close`, which posts the
            // wake-ups itself. No ticks, and alice and carol send nothing
            // while they wait, so nothing else could bring the notice.
            drop(b);
            a.departure("bob", "lobby");
            c.departure("bob", "lobby");
            assert_eq!(a.who(), ["alice", "carol"]);
            // A LEAVE: announced to the others, and WHO needs a room again.
            assert_eq!(c.ask(cmd::LEAVE, ""), (cmd::OK, "left lobby".into()));
            a.until("carol's departure", |c, t| {
                c == cmd::INFO && t == "* carol left lobby"
            });
            assert_eq!(a.who(), ["alice"]);
            c.refused(cmd::WHO, "", err::NOT_IN_ROOM);
            // The last one out: the room goes (the census checks it).
            drop(a);
        });
    }
}

#[test]
fn chat_bad_input_gets_errors_and_the_connection_goes_on() {
    for (ports, workers) in MODELS {
        with_chat(ports, workers, no_ticks(), |addr| {
            let mut other = Client::join(addr, "other", "lobby");
            let mut c = Client::connect(addr, "c");
            c.refused(999, "??", err::UNKNOWN_COMMAND);
            c.refused(util::CMD_ECHO, "hello", err::UNKNOWN_COMMAND);
            c.refused(cmd::OK, "", err::UNKNOWN_COMMAND);
            c.refused(cmd::JOIN, "lobby", err::NO_NICK);
            c.refused(cmd::SAY, "hi", err::NO_NICK);
            c.refused(cmd::NICK, "", err::INVALID);
            c.refused(cmd::NICK, "two words", err::INVALID);
            c.refused(cmd::NICK, [0xff, 0xfe, b'x'], err::INVALID);
            c.refused(
                cmd::NICK,
                "x".repeat(chat_example::MAX_NAME + 1),
                err::INVALID,
            );
            assert_eq!(c.ask(cmd::NICK, "zoë"), (cmd::OK, "nick zoë".into()));
            c.refused(cmd::SAY, "hi", err::NOT_IN_ROOM);
            c.refused(cmd::WHO, "", err::NOT_IN_ROOM);
            c.refused(cmd::LEAVE, "", err::NOT_IN_ROOM);
            c.refused(cmd::JOIN, "../etc", err::INVALID);
            assert_eq!(c.ask(cmd::JOIN, "lobby"), (cmd::OK, "joined lobby".into()));
            c.refused(cmd::SAY, "", err::INVALID);
            c.refused(cmd::SAY, "bell\x07", err::INVALID);
            c.refused(cmd::SAY, [b'a', 0xc3], err::INVALID);
            c.refused(
                cmd::SAY,
                "y".repeat(chat_example::MAX_TEXT + 1),
                err::INVALID,
            );
            // Still a working member, and the others never noticed.
            c.send(cmd::SAY, "still here");
            c.until("own line", |c, t| c == cmd::MSG && t == "zoë: still here");
            other.until("zoë's line", |c, t| {
                c == cmd::MSG && t == "zoë: still here"
            });
            assert_eq!(other.who(), ["other", "zoë"]);
        });
    }
}

#[test]
fn chat_announces_room_size_on_a_timer() {
    let cfg = ChatConfig {
        announce: Some(Duration::from_millis(50)),
        ..ChatConfig::default()
    };
    for (ports, workers) in MODELS {
        with_chat(ports, workers, cfg.clone(), |addr| {
            let mut a = Client::join(addr, "alice", "lobby");
            a.until("a tick", |c, t| c == cmd::INFO && t == "* 1 user in lobby");
            let _b = Client::join(addr, "bob", "lobby");
            a.until("a tick", |c, t| c == cmd::INFO && t == "* 2 users in lobby");
            // Re-armed each time: more keep coming.
            a.until("a tick", |c, t| c == cmd::INFO && t == "* 2 users in lobby");
        });
    }
}

/// A member that never reads is dropped once its backlog passes the
/// limit; the others keep talking and get every line.
#[test]
fn chat_drops_a_client_that_does_not_read() {
    const BACKLOG: usize = 1 << 20;
    for (ports, workers) in MODELS {
        let cfg = EngineConfig {
            ports,
            workers,
            // Well under the chat's limit: a talker reading its own lines a
            // little late is paused by the engine long before it could be
            // mistaken for a slow reader.
            max_send_queue: 64 << 10,
            ..EngineConfig::default()
        };
        let chat = ChatConfig {
            announce: None,
            max_backlog: BACKLOG,
        };
        with_chat_engine(cfg, chat, |addr| {
            let mut talker = Client::join(addr, "talker", "lobby");
            let mut listener = Client::join(addr, "listener", "lobby");
            let mut sleeper = Client::join(addr, "sleeper", "lobby");
            let text = "z".repeat(4000);
            let left = AtomicBool::new(false);
            let heard = std::sync::atomic::AtomicUsize::new(0);
            thread::scope(|s| {
                let mut writer = talker.s.try_clone().unwrap();
                let (left, text, heard) = (&left, &text, &heard);
                // The talker talks until the sleeper is gone (bounded), at
                // most 32 lines (128 KB) ahead of the listener, so on a busy
                // machine only the client that never reads falls behind.
                let w = s.spawn(move || {
                    let mut sent = 0usize;
                    let deadline = Instant::now() + DEADLINE;
                    while !left.load(Ordering::Relaxed) {
                        if sent > heard.load(Ordering::Relaxed) + 32 {
                            assert!(Instant::now() < deadline, "the listener stalled");
                            thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                        util::write_frame(&mut writer, cmd::SAY, text.as_bytes()).unwrap();
                        sent += 1;
                        assert!(sent < 64 * 1024, "the sleeper was never dropped");
                    }
                    util::write_frame(&mut writer, cmd::SAY, b"done").unwrap();
                    sent
                });
                let l = s.spawn(|| {
                    let mut lines = 0usize;
                    loop {
                        let (c, t) = listener.next();
                        match (c, t.as_str()) {
                            (cmd::MSG, "talker: done") => return lines,
                            (cmd::MSG, _) => {
                                lines += 1;
                                heard.store(lines, Ordering::Relaxed);
                            }
                            (cmd::INFO, _) => {}
                            other => panic!("listener: unexpected {other:?}"),
                        }
                    }
                });
                let mut own = 0usize;
                loop {
                    let (c, t) = talker.next();
                    match (c, t.as_str()) {
                        (cmd::MSG, "talker: done") => break,
                        (cmd::MSG, _) => own += 1,
                        (cmd::INFO, "* sleeper left lobby") => left.store(true, Ordering::Relaxed),
                        (cmd::INFO, _) => {} // joins
                        other => panic!("talker: unexpected {other:?}"),
                    }
                }
                let sent = w.join().unwrap();
                assert_eq!(own, sent, "the talker missed some of its own lines");
                assert_eq!(l.join().unwrap(), sent, "the listener missed lines");
            });
            assert_eq!(talker.who(), ["listener", "talker"]);
            // The sleeper's connection was cut: it reads what got through,
            // then EOF or a reset, never a hang.
            let mut buf = vec![0u8; 1 << 16];
            let start = Instant::now();
            loop {
                match std::io::Read::read(&mut sleeper.s, &mut buf) {
                    Ok(0) => break,
                    Ok(_) => assert!(start.elapsed() < DEADLINE, "sleeper: endless data"),
                    Err(e) if util::is_closed_error(&e) => break,
                    Err(e) => panic!("sleeper: {e}"),
                }
            }
        });
    }
}
