//! A chat server with nicknames and rooms, written only against cport's
//! public [`Handler`] API: nothing in the server was changed for it.
//!
//! ```sh
//! cargo run --release --example chat -- --listen 127.0.0.1:9500
//! cargo run --release --example chat -- --help        # every flag
//! ```
//!
//! # Protocol
//!
//! cport's framed protocol: every frame is an 8-byte header — body length
//! `u32`, command `u32`, both big-endian — then the body. Names and text are
//! UTF-8. The chat uses command numbers from 100 up so it never collides
//! with cport's own (ECHO 1 … STATS 8, ERROR `0xFFFF_FFFF`).
//!
//! | cmd | direction | name | body | answer |
//! |---|---|---|---|---|
//! | 100 | client → server | NICK | nickname | OK `nick NAME`, or ERROR 100/101 |
//! | 101 | client → server | JOIN | room | OK `joined ROOM`; `* NAME joined ROOM` to the room |
//! | 102 | client → server | SAY | text | MSG `NAME: text` to everyone in the room, sender included |
//! | 103 | client → server | LEAVE | (ignored) | OK `left ROOM`; `* NAME left ROOM` to the others |
//! | 104 | client → server | WHO | (ignored) | NAMES: the room's nicknames, sorted, one per line |
//! | 110 | server → client | OK | what was done | |
//! | 111 | server → client | MSG | `NAME: text` | |
//! | 112 | server → client | INFO | a `* …` line: joins, leaves, renames, the periodic `* N users in ROOM` | |
//! | 113 | server → client | NAMES | nicknames, `\n`-separated | |
//! | `0xFFFF_FFFF` | server → client | ERROR | code `u32` BE + message | |
//!
//! Error codes (see [`err`]): 2 unknown command (cport's own code), 100
//! nickname taken, 101 invalid name or text, 102 no nickname yet, 103 not
//! in a room. None of them closes the connection: a client that sends
//! garbage gets an ERROR and may go on. Nicknames and rooms are 1–32
//! letters, digits, `_`, `-` or `.`; a SAY text is 1–4096 bytes without
//! control characters. Sending NICK again renames; JOIN while in a room
//! leaves that room first.
//!
//! # Design
//!
//! **Per-connection state** — the nickname and room — is a [`Session`]
//! attached with [`Ctx::set_data`] in `on_open` and reached with
//! [`Ctx::data_mut`]; it comes back to `on_close`, which cleans up after it.
//!
//! **Shared state** lives in the handler, which every worker shares: a
//! [`Directory`] (nickname → connection, room → members) behind one mutex,
//! and a [`Mailbox`] per connection behind another. No code holds both
//! locks at once, and neither is held while calling into the engine.
//!
//! **Delivery to other connections goes through [`EngineRef::post`]**, the
//! completion port's `PostQueuedCompletionStatus`. A callback runs with its
//! own connection locked; writing straight to another connection would lock
//! that one too, and two workers doing so in opposite directions (alice
//! talks to bob while bob talks to alice) would each hold the lock the
//! other waits for: a deadlock. So a SAY appends the encoded frame (one
//! reference-counted buffer, shared by every recipient) to each member's
//! mailbox and posts a wake-up to each member; the engine runs the
//! member's [`Handler::on_posted`] on a worker of *that member's* port,
//! with only that member locked, and it moves its mailbox into its own send
//! queue. `post` locks nothing but the port's connection table for a
//! look-up, so it is safe from any callback, `on_close` included.
//!
//! The posted `u64` is the mailbox's sequence number when the wake-up was
//! sent: "your mail up to here is waiting". A mailbox with a wake-up
//! already on its way is not woken again, so a burst of 1,000 messages
//! costs one post per recipient, not 1,000. `on_posted` drains the whole
//! mailbox, whatever the value.
//!
//! **Order.** One connection's callbacks never overlap, so a sender's
//! messages reach each mailbox in the order it sent them, and a mailbox is
//! a FIFO that only its owner drains, into a send queue that is itself in
//! order. Messages from different senders interleave as they happened to
//! meet in the mailbox. The sender's own copy goes through its own mailbox
//! too (drained at the end of the same callback, no post needed), so its
//! view of the room is ordered like everyone else's.
//!
//! **Nothing leaks.** A mailbox is created in `on_open` and removed in
//! `on_close`, and messages are only ever appended to a mailbox that
//! exists, so mail for a connection that closed meanwhile is dropped, not
//! kept. A wake-up for a closed connection is refused by `post` (or
//! dropped by the engine if it closes while the wake-up is queued), and
//! the connection's [`ConnId`] is never reused for another connection.
//! [`Chat::census`] counts what is held; it returns to zero when the last
//! client leaves (the tests check it).
//!
//! **Slow readers.** A client that stops reading would make its mailbox
//! and send queue grow without bound while others talk. Once the two hold
//! more than [`ChatConfig::max_backlog`] bytes the client is disconnected
//! (an ERROR would never reach it: it does not read); the others go on.
//!
//! **A timer per connection**: every [`ChatConfig::announce`] the
//! connection gets `* N users in ROOM` (when in a room), re-armed with
//! [`Ctx::set_timer`] each time it fires. The engine keeps timers in a
//! per-port queue, so an idle connection's timer costs nothing per tick.
//!
//! **Rooms across servers** (`--cluster nats://HOST:4222`, with the
//! `cluster` feature): several chat servers form one chat, a room's members
//! spread over them (docs/CLUSTER.md). Each server tells the others who is
//! in which of its rooms ([`Cluster::publish`]: a line per member with its
//! cluster-wide id), on every change and every [`REPEAT_MEMBERS`]; a
//! server not heard from for [`REMOTE_TTL`] is taken as gone with its
//! members. A room's lines and notices reach the members on other servers
//! by targeted send ([`Cluster::send`] to their ids), one reference-counted
//! frame for all; WHO and the room size count them. Nicknames are unique
//! per server only; delivery across servers is at most once.
//!
//! ```sh
//! nats-server -p 4222 &
//! cargo run --release --example chat -- --listen 127.0.0.1:9501 --cluster nats://127.0.0.1:4222 &
//! cargo run --release --example chat -- --listen 127.0.0.1:9502 --cluster nats://127.0.0.1:4222 &
//! ```
//!
//! **Leaving.** `on_close` removes the user from the directory, drops its
//! mailbox, and tells the room `* NAME left ROOM` like any other delivery:
//! the notice goes into the members' mailboxes and each is woken with a
//! post through the [`EngineRef`] that `on_close` is given. The notice
//! arrives at once, whether or not anyone else is talking.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::mem;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
#[cfg(feature = "cluster")]
use cport::cluster::{Cluster, ClusterConfig};
use cport::frame::Frame;
use cport::server::{
    CloseInfo, ConnId, Ctx, Engine, EngineConfig, EngineRef, Handler, MAX_TIMER_VALUE,
};

/// Command numbers of the chat protocol (header `cmd` field).
pub mod cmd {
    /// Client → server: set or change the nickname (body: the name).
    pub const NICK: u32 = 100;
    /// Client → server: enter a room, leaving the current one (body: the room).
    pub const JOIN: u32 = 101;
    /// Client → server: say something to the room (body: the text).
    pub const SAY: u32 = 102;
    /// Client → server: leave the current room.
    pub const LEAVE: u32 = 103;
    /// Client → server: ask who is in the room; answered with [`NAMES`].
    pub const WHO: u32 = 104;
    /// Server → client: a request succeeded (body: what was done).
    pub const OK: u32 = 110;
    /// Server → client: a chat line, `NAME: text`.
    pub const MSG: u32 = 111;
    /// Server → client: a `* …` notice (joins, leaves, renames, room size).
    pub const INFO: u32 = 112;
    /// Server → client: the room's nicknames, sorted, `\n`-separated.
    pub const NAMES: u32 = 113;
}

/// Codes in the ERROR frames the chat sends (`u32` BE, then a message).
/// None is fatal: the connection stays usable.
pub mod err {
    /// The command number is not a chat command (cport's own code).
    pub const UNKNOWN_COMMAND: u32 = cport::frame::code::UNKNOWN_COMMAND;
    /// NICK: another connection has this nickname.
    pub const NICK_TAKEN: u32 = 100;
    /// A nickname, room name or text is empty, too long or has bad characters.
    pub const INVALID: u32 = 101;
    /// JOIN/SAY/WHO before NICK.
    pub const NO_NICK: u32 = 102;
    /// SAY/LEAVE/WHO while not in a room.
    pub const NOT_IN_ROOM: u32 = 103;
}

/// Longest nickname or room name, in bytes.
pub const MAX_NAME: usize = 32;
/// Longest SAY text, in bytes.
pub const MAX_TEXT: usize = 4096;

/// Timer value of the periodic room announcement (the only timer we set).
/// [`Ctx::set_timer`] takes values up to [`MAX_TIMER_VALUE`].
const TICK: u64 = 1;
const _: () = assert!(TICK <= MAX_TIMER_VALUE);

/// How a [`Chat`] behaves.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Period of the `* N users in ROOM` line each connection gets; `None`
    /// for none.
    pub announce: Option<Duration>,
    /// Bytes a connection may have waiting (its mailbox plus its send
    /// queue) before it is dropped as a slow reader. Keep it above the
    /// engine's [`EngineConfig::max_send_queue`]: a sender's own copies
    /// can fill its queue up to that limit before the engine stops reading
    /// it, and a fast talker is not a slow reader.
    pub max_backlog: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            announce: Some(Duration::from_secs(10)),
            max_backlog: 8 << 20,
        }
    }
}

/// One connection's chat state, attached with [`Ctx::set_data`].
#[derive(Debug, Default)]
struct Session {
    /// The nickname, once NICK succeeded.
    nick: Option<String>,
    /// The room, while in one.
    room: Option<String>,
}

/// Who is who and where, shared by every worker.
#[derive(Debug, Default)]
struct Directory {
    /// Nickname → the connection holding it (unique).
    nicks: HashMap<String, ConnId>,
    /// Room → its members by nickname (sorted, for WHO). A room exists
    /// while it has members.
    rooms: HashMap<String, BTreeMap<String, ConnId>>,
}

/// Frames waiting for one connection, filled by any worker and drained
/// only by the connection's own callbacks.
#[derive(Debug, Default)]
struct Mailbox {
    /// Frames not yet moved to the connection's send queue, oldest first.
    frames: VecDeque<Frame>,
    /// Wire bytes in `frames`.
    bytes: usize,
    /// Frames ever appended; the value a wake-up carries.
    seq: u64,
    /// A wake-up was posted and not yet handled: no need for another.
    wake_pending: bool,
    /// Over [`ChatConfig::max_backlog`]: the connection is being dropped,
    /// and nothing more is appended.
    overflowed: bool,
}

/// What [`Chat`] holds right now (see [`Chat::census`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Census {
    /// Nicknames taken.
    pub nicks: usize,
    /// Rooms with at least one member.
    pub rooms: usize,
    /// Mailboxes, one per open connection.
    pub mailboxes: usize,
    /// Frames waiting in mailboxes.
    pub queued_frames: usize,
}

/// A refused request: the ERROR frame to answer with.
#[derive(Debug)]
struct Reject {
    /// One of [`err`].
    code: u32,
    /// Human-readable reason.
    message: String,
}

impl Reject {
    fn new(code: u32, message: impl Into<String>) -> Reject {
        Reject {
            code,
            message: message.into(),
        }
    }
}

/// The chat service: a [`Handler`] shared by all workers.
#[derive(Debug)]
pub struct Chat {
    /// Settings.
    cfg: ChatConfig,
    /// Nicknames and rooms. Never locked together with `mail`.
    directory: Mutex<Directory>,
    /// One mailbox per open connection.
    mail: Mutex<HashMap<ConnId, Mailbox>>,
    /// The cluster this chat spans, if any.
    #[cfg(feature = "cluster")]
    cluster: Option<Arc<Cluster>>,
    /// Room members on the other nodes, by node number, as each last said.
    #[cfg(feature = "cluster")]
    remote: Mutex<HashMap<u16, Remote>>,
}

/// What another node last said its rooms hold.
#[cfg(feature = "cluster")]
#[derive(Debug)]
struct Remote {
    heard: std::time::Instant,
    /// Room -> (nickname, cluster-wide id) of each member there.
    rooms: HashMap<String, Vec<(String, u64)>>,
}

/// A node that has not repeated its room list for this long is taken as
/// gone, and its members with it.
#[cfg(feature = "cluster")]
pub const REMOTE_TTL: Duration = Duration::from_secs(10);

/// How often a node repeats its room list to the others (so that a node
/// that joins late, or missed a change, catches up).
#[cfg(feature = "cluster")]
pub const REPEAT_MEMBERS: Duration = Duration::from_secs(2);

impl Chat {
    /// A chat with no one in it.
    pub fn new(cfg: ChatConfig) -> Chat {
        Chat {
            cfg,
            directory: Mutex::new(Directory::default()),
            mail: Mutex::new(HashMap::new()),
            #[cfg(feature = "cluster")]
            cluster: None,
            #[cfg(feature = "cluster")]
            remote: Mutex::new(HashMap::new()),
        }
    }

    /// A chat whose rooms span every node of `cluster`: each node tells
    /// the others who is in which of its rooms ([`Cluster::publish`]), and
    /// a room's lines reach its members on other nodes by targeted send
    /// ([`Cluster::send`] to their cluster-wide ids). Nicknames are unique
    /// per node only.
    #[cfg(feature = "cluster")]
    pub fn with_cluster(cfg: ChatConfig, cluster: Arc<Cluster>) -> Arc<Chat> {
        let mut chat = Chat::new(cfg);
        chat.cluster = Some(cluster.clone());
        let chat = Arc::new(chat);
        let weak = Arc::downgrade(&chat);
        cluster.set_receiver(Arc::new(move |_engine, node, bytes| {
            if let Some(chat) = weak.upgrade() {
                chat.on_remote(node, &bytes);
            }
        }));
        chat
    }

    /// Tells the other nodes who is in which room here (every change, and
    /// every [`REPEAT_MEMBERS`] from `main`): one line `ROOM\tNICK\tID`
    /// per member.
    #[cfg(feature = "cluster")]
    pub fn publish_members(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let mut out = String::new();
        {
            let dir = self.lock_directory();
            for (room, members) in &dir.rooms {
                for (nick, id) in members {
                    out.push_str(&format!("{room}\t{nick}\t{}\n", cluster.id_of(*id)));
                }
            }
        }
        cluster.publish(bytes::Bytes::from(out));
    }

    #[cfg(not(feature = "cluster"))]
    fn publish_members(&self) {}

    /// Another node's room list: replaces what it said before. Lines that
    /// do not parse are skipped.
    #[cfg(feature = "cluster")]
    fn on_remote(&self, node: u16, bytes: &[u8]) {
        let mut rooms: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for line in String::from_utf8_lossy(bytes).lines() {
            let mut f = line.split('\t');
            let (Some(room), Some(nick), Some(id)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let (Ok(room), Ok(nick), Ok(id)) = (
                valid_name(room.as_bytes(), "room"),
                valid_name(nick.as_bytes(), "nickname"),
                id.parse::<u64>(),
            ) else {
                continue;
            };
            rooms
                .entry(room.to_owned())
                .or_default()
                .push((nick.to_owned(), id));
        }
        let heard = std::time::Instant::now();
        lock(&self.remote).insert(node, Remote { heard, rooms });
    }

    /// Members of `room` on other nodes, from lists heard lately.
    #[cfg(feature = "cluster")]
    fn remote_members(&self, room: &str) -> Vec<(String, u64)> {
        let mut remote = lock(&self.remote);
        remote.retain(|_, r| r.heard.elapsed() < REMOTE_TTL);
        remote
            .values()
            .filter_map(|r| r.rooms.get(room))
            .flatten()
            .cloned()
            .collect()
    }

    #[cfg(not(feature = "cluster"))]
    fn remote_members(&self, _room: &str) -> Vec<(String, u64)> {
        Vec::new()
    }

    /// Sends `frame` to the members of `room` on other nodes.
    #[cfg(feature = "cluster")]
    fn send_remote(&self, engine: EngineRef<'_>, room: &str, frame: &Frame) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        for (_, id) in self.remote_members(room) {
            cluster.send(engine, id, frame.wire().clone());
        }
    }

    #[cfg(not(feature = "cluster"))]
    fn send_remote(&self, _engine: EngineRef<'_>, _room: &str, _frame: &Frame) {}

    /// Counts what the chat holds, for monitoring and leak checks.
    pub fn census(&self) -> Census {
        let (nicks, rooms) = {
            let dir = self.lock_directory();
            (dir.nicks.len(), dir.rooms.len())
        };
        let (mailboxes, queued_frames) = {
            let mail = self.lock_mail();
            (mail.len(), mail.values().map(|m| m.frames.len()).sum())
        };
        Census {
            nicks,
            rooms,
            mailboxes,
            queued_frames,
        }
    }

    fn lock_directory(&self) -> MutexGuard<'_, Directory> {
        lock(&self.directory)
    }

    fn lock_mail(&self) -> MutexGuard<'_, HashMap<ConnId, Mailbox>> {
        lock(&self.mail)
    }

    /// Handles one request frame.
    fn request(&self, ctx: &mut Ctx<'_>, frame: &Frame) -> Result<(), Reject> {
        let body = frame.body();
        match frame.cmd() {
            cmd::NICK => self.nick(ctx, valid_name(&body, "nickname")?),
            cmd::JOIN => self.join(ctx, valid_name(&body, "room name")?),
            cmd::SAY => self.say(ctx, valid_text(&body)?),
            cmd::LEAVE => self.leave(ctx),
            cmd::WHO => self.who(ctx),
            other => Err(Reject::new(
                err::UNKNOWN_COMMAND,
                format!("unknown command {other}: the chat knows 100 to 104"),
            )),
        }
    }

    /// NICK: claims `name`, releasing the old one; tells the room.
    fn nick(&self, ctx: &mut Ctx<'_>, name: &str) -> Result<(), Reject> {
        let me = ctx.id();
        let s = session(ctx)?;
        let old = s.nick.clone();
        let room = s.room.clone();
        if old.as_deref() == Some(name) {
            ctx.send_frame(Frame::new(cmd::OK, format!("nick {name}").as_bytes()));
            return Ok(());
        }
        let members = {
            let mut dir = self.lock_directory();
            if dir.nicks.contains_key(name) {
                return Err(Reject::new(
                    err::NICK_TAKEN,
                    format!("nickname {name} is taken"),
                ));
            }
            dir.nicks.insert(name.to_owned(), me);
            if let Some(old) = &old {
                dir.nicks.remove(old);
            }
            match (&room, &old) {
                (Some(room), Some(old)) => dir.rooms.get_mut(room).map(|m| {
                    m.remove(old);
                    m.insert(name.to_owned(), me);
                    m.values().copied().collect::<Vec<_>>()
                }),
                _ => None,
            }
        };
        session(ctx)?.nick = Some(name.to_owned());
        ctx.send_frame(Frame::new(cmd::OK, format!("nick {name}").as_bytes()));
        if let (Some(members), Some(old)) = (members, old) {
            let line = notice(&format!("* {old} is now known as {name}"));
            if let Some(room) = &room {
                self.send_remote(ctx.engine(), room, &line);
            }
            self.deliver(ctx, &members, line);
            self.publish_members();
        }
        Ok(())
    }

    /// JOIN: leaves the current room if any, enters `room`, tells it.
    fn join(&self, ctx: &mut Ctx<'_>, room: &str) -> Result<(), Reject> {
        let me = ctx.id();
        let s = session(ctx)?;
        let nick = s.nick.clone().ok_or_else(no_nick)?;
        if s.room.as_deref() == Some(room) {
            ctx.send_frame(Frame::new(cmd::OK, format!("joined {room}").as_bytes()));
            return Ok(());
        }
        if let Some(old) = s.room.take() {
            self.leave_room(ctx, me, &nick, &old);
        }
        let members: Vec<ConnId> = {
            let mut dir = self.lock_directory();
            let m = dir.rooms.entry(room.to_owned()).or_default();
            m.insert(nick.clone(), me);
            m.values().copied().collect()
        };
        session(ctx)?.room = Some(room.to_owned());
        ctx.send_frame(Frame::new(cmd::OK, format!("joined {room}").as_bytes()));
        let line = notice(&format!("* {nick} joined {room}"));
        self.send_remote(ctx.engine(), room, &line);
        self.deliver(ctx, &members, line);
        self.publish_members();
        Ok(())
    }

    /// SAY: `NAME: text` to everyone in the room, sender included.
    fn say(&self, ctx: &mut Ctx<'_>, text: &str) -> Result<(), Reject> {
        let s = session(ctx)?;
        let nick = s.nick.clone().ok_or_else(no_nick)?;
        let room = s.room.clone().ok_or_else(not_in_room)?;
        let members = self.members(&room);
        // Encoded once; every mailbox holds a reference to the same bytes.
        let line = Frame::new(cmd::MSG, format!("{nick}: {text}").as_bytes());
        self.send_remote(ctx.engine(), &room, &line);
        self.deliver(ctx, &members, line);
        Ok(())
    }

    /// LEAVE: out of the room; the others are told.
    fn leave(&self, ctx: &mut Ctx<'_>) -> Result<(), Reject> {
        let me = ctx.id();
        let s = session(ctx)?;
        let room = s.room.take().ok_or_else(not_in_room)?;
        let nick = s.nick.clone().unwrap_or_default();
        self.leave_room(ctx, me, &nick, &room);
        ctx.send_frame(Frame::new(cmd::OK, format!("left {room}").as_bytes()));
        self.publish_members();
        Ok(())
    }

    /// WHO: the room's nicknames.
    fn who(&self, ctx: &mut Ctx<'_>) -> Result<(), Reject> {
        let room = session(ctx)?.room.clone().ok_or_else(not_in_room)?;
        let names = {
            let dir = self.lock_directory();
            let mut names: Vec<String> = dir
                .rooms
                .get(&room)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            drop(dir);
            names.extend(self.remote_members(&room).into_iter().map(|(n, _)| n));
            names.sort();
            names.join("\n")
        };
        ctx.send_frame(Frame::new(cmd::NAMES, names.as_bytes()));
        Ok(())
    }

    /// Takes `nick` out of `room` and tells those who remain.
    fn leave_room(&self, ctx: &mut Ctx<'_>, me: ConnId, nick: &str, room: &str) {
        let rest = self.remove_member(me, nick, room);
        let line = notice(&format!("* {nick} left {room}"));
        self.send_remote(ctx.engine(), room, &line);
        self.deliver(ctx, &rest, line);
    }

    /// Removes a member from the directory (dropping the room if it empties);
    /// returns the members left.
    fn remove_member(&self, me: ConnId, nick: &str, room: &str) -> Vec<ConnId> {
        let mut dir = self.lock_directory();
        let Some(m) = dir.rooms.get_mut(room) else {
            return Vec::new();
        };
        if m.get(nick) == Some(&me) {
            m.remove(nick);
        }
        let rest: Vec<ConnId> = m.values().copied().collect();
        if rest.is_empty() {
            dir.rooms.remove(room);
        }
        rest
    }

    /// The connections in `room`.
    fn members(&self, room: &str) -> Vec<ConnId> {
        let dir = self.lock_directory();
        dir.rooms
            .get(room)
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    }

    /// Sends `frame` to `to` from a callback of `ctx`'s connection: appends
    /// it to each mailbox, wakes the others with a post, and hands the
    /// sender its own copy at once.
    fn deliver(&self, ctx: &mut Ctx<'_>, to: &[ConnId], frame: Frame) {
        self.post_mail(ctx.engine(), ctx.id(), to, &frame);
        self.drain(ctx);
    }

    /// Appends `frame` to the mailboxes of `to` and posts a wake-up to each
    /// member but `me` (the caller's own connection) that has none on its
    /// way. Posts after the mailbox lock is released.
    fn post_mail(&self, engine: EngineRef<'_>, me: ConnId, to: &[ConnId], frame: &Frame) {
        let wakes = append(&mut self.lock_mail(), to, frame, self.cfg.max_backlog, me);
        for (id, seq) in wakes {
            // False: the connection is gone; its mailbox goes with `on_close`.
            engine.post(id, seq);
        }
    }

    /// Moves this connection's mailbox into its send queue, in order; drops
    /// the connection if it has fallen too far behind.
    fn drain(&self, ctx: &mut Ctx<'_>) {
        let (frames, bytes, overflowed) = {
            let mut mail = self.lock_mail();
            let Some(mb) = mail.get_mut(&ctx.id()) else {
                return;
            };
            mb.wake_pending = false;
            let bytes = mem::take(&mut mb.bytes);
            if ctx.queued_bytes() + bytes > self.cfg.max_backlog {
                mb.overflowed = true;
            }
            (mem::take(&mut mb.frames), bytes, mb.overflowed)
        };
        if overflowed {
            tracing::info!(
                conn = %ctx.id(),
                queued = ctx.queued_bytes() + bytes,
                "dropping a client that does not read"
            );
            // Abort, not an ERROR frame: the client is not reading, so a
            // polite close would wait on it forever.
            ctx.abort();
            return;
        }
        for f in frames {
            ctx.send_frame(f);
        }
    }

    /// Arms the next room announcement, if they are on.
    fn arm_tick(&self, ctx: &mut Ctx<'_>) {
        if let Some(every) = self.cfg.announce
            && let Err(e) = ctx.set_timer(every, TICK)
        {
            tracing::warn!(conn = %ctx.id(), "cannot arm the announcement timer: {e}");
        }
    }
}

impl Handler for Chat {
    fn on_open(&self, ctx: &mut Ctx<'_>) {
        ctx.set_data(Session::default());
        self.lock_mail().insert(ctx.id(), Mailbox::default());
        self.arm_tick(ctx);
    }

    fn on_frame(&self, ctx: &mut Ctx<'_>, frame: Frame) {
        if let Err(r) = self.request(ctx, &frame) {
            ctx.send_error(r.code, &r.message);
        }
        // Whatever arrived for us meanwhile goes out now rather than at the
        // next wake-up; it costs one look-up.
        self.drain(ctx);
    }

    fn on_posted(&self, ctx: &mut Ctx<'_>, seq: u64) {
        tracing::trace!(conn = %ctx.id(), seq, "mail");
        self.drain(ctx);
    }

    fn on_timer(&self, ctx: &mut Ctx<'_>, value: u64) {
        if value != TICK {
            return;
        }
        if let Some(room) = session(ctx).ok().and_then(|s| s.room.clone()) {
            let n = self.members(&room).len() + self.remote_members(&room).len();
            let users = if n == 1 { "user" } else { "users" };
            ctx.send_frame(notice(&format!("* {n} {users} in {room}")));
        }
        self.drain(ctx);
        self.arm_tick(ctx);
    }

    fn on_close(&self, engine: EngineRef<'_>, info: &CloseInfo, data: Option<Box<dyn Any + Send>>) {
        let me = info.id;
        // Mail still waiting for us goes, and nothing more can be appended.
        self.lock_mail().remove(&me);
        let Some(session) = data.and_then(|d| d.downcast::<Session>().ok()) else {
            return; // `on_open` never ran
        };
        let Session {
            nick: Some(nick),
            room,
        } = *session
        else {
            return; // never chose a nickname, so never in a room
        };
        {
            let mut dir = self.lock_directory();
            if dir.nicks.get(&nick) == Some(&me) {
                dir.nicks.remove(&nick);
            }
        }
        if let Some(room) = room {
            let rest = self.remove_member(me, &nick, &room);
            // `post` never locks the members, so it is safe here even with
            // this connection still locked.
            let line = notice(&format!("* {nick} left {room}"));
            self.send_remote(engine, &room, &line);
            self.post_mail(engine, me, &rest, &line);
            self.publish_members();
        }
    }
}

/// Appends `frame` to the mailboxes of `to` and returns the wake-ups to
/// post: one per mailbox, but `me`'s, that has none on its way, which is
/// marked as having one. `me` is the caller's connection: it drains its own
/// mailbox at the end of the callback (or is closing), so needs no wake-up.
fn append(
    mail: &mut HashMap<ConnId, Mailbox>,
    to: &[ConnId],
    frame: &Frame,
    max_backlog: usize,
    me: ConnId,
) -> Vec<(ConnId, u64)> {
    let size = frame.wire().len();
    let mut wakes = Vec::new();
    for &id in to {
        // No mailbox: the connection closed; its mail is not kept.
        let Some(mb) = mail.get_mut(&id) else {
            continue;
        };
        if mb.overflowed {
            continue;
        }
        if mb.bytes + size > max_backlog {
            // Slow reader: stop queueing for it; its next drain drops it.
            mb.overflowed = true;
            mb.frames.clear();
            mb.bytes = 0;
        } else {
            mb.frames.push_back(frame.clone());
            mb.bytes += size;
            mb.seq += 1;
        }
        if id != me && !mb.wake_pending {
            mb.wake_pending = true;
            wakes.push((id, mb.seq));
        }
    }
    wakes
}

/// The connection's [`Session`]; always there, set in `on_open`.
fn session<'c>(ctx: &'c mut Ctx<'_>) -> Result<&'c mut Session, Reject> {
    ctx.data_mut::<Session>()
        .ok_or_else(|| Reject::new(err::INVALID, "internal error: no session"))
}

/// Checks a nickname or room name.
fn valid_name<'b>(body: &'b [u8], what: &str) -> Result<&'b str, Reject> {
    let bad = |why: &str| Reject::new(err::INVALID, format!("invalid {what}: {why}"));
    let s = std::str::from_utf8(body).map_err(|_| bad("not UTF-8"))?;
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(bad(&format!("must be 1 to {MAX_NAME} bytes")));
    }
    if !s
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(bad("use letters, digits, '_', '-' or '.'"));
    }
    Ok(s)
}

/// Checks a SAY text.
fn valid_text(body: &[u8]) -> Result<&str, Reject> {
    let bad = |why: &str| Reject::new(err::INVALID, format!("invalid text: {why}"));
    let s = std::str::from_utf8(body).map_err(|_| bad("not UTF-8"))?;
    if s.is_empty() || s.len() > MAX_TEXT {
        return Err(bad(&format!("must be 1 to {MAX_TEXT} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(bad("control characters are not allowed"));
    }
    Ok(s)
}

fn no_nick() -> Reject {
    Reject::new(err::NO_NICK, "choose a nickname first (NICK)")
}

fn not_in_room() -> Reject {
    Reject::new(err::NOT_IN_ROOM, "join a room first (JOIN)")
}

/// An INFO frame.
fn notice(line: &str) -> Frame {
    Frame::new(cmd::INFO, line.as_bytes())
}

/// Locks a mutex, taking the data even if a panicking thread poisoned it:
/// the chat's maps stay consistent between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Command line of the example.
#[derive(Debug, Parser)]
#[command(about = "A chat room server on cport's Handler API")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9500")]
    listen: SocketAddr,
    /// Worker threads in all.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Completion ports (1: workers share one port; = workers: one each).
    #[arg(long, default_value_t = 1)]
    ports: usize,
    /// How often each client gets "* N users in ROOM"; 0 for never.
    #[arg(long, value_name = "DUR", value_parser = cport::units::parse_duration, default_value = "10s")]
    announce: Duration,
    /// Bytes waiting for a client before it is dropped as a slow reader.
    #[arg(long, value_name = "SIZE", value_parser = cport::units::parse_size, default_value = "8MiB")]
    max_backlog: u64,
    /// Span rooms over every chat server of a cluster through the NATS
    /// server at URL (repeat for several seed servers).
    #[cfg(feature = "cluster")]
    #[arg(long = "cluster", value_name = "URL")]
    cluster: Vec<String>,
    /// This node's name in the cluster [default: chat-PORT].
    #[cfg(feature = "cluster")]
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let chat_cfg = ChatConfig {
        announce: (!args.announce.is_zero()).then_some(args.announce),
        max_backlog: usize::try_from(args.max_backlog).unwrap_or(usize::MAX),
    };
    #[cfg(feature = "cluster")]
    let cluster = if args.cluster.is_empty() {
        None
    } else {
        let name = args
            .node_name
            .clone()
            .unwrap_or_else(|| format!("chat-{}", args.listen.port()));
        let c =
            Cluster::start(ClusterConfig::new(args.cluster.clone(), name)).context("--cluster")?;
        Some(Arc::new(c))
    };
    #[cfg(feature = "cluster")]
    let chat = match &cluster {
        Some(c) => Chat::with_cluster(chat_cfg, c.clone()),
        None => Arc::new(Chat::new(chat_cfg)),
    };
    #[cfg(not(feature = "cluster"))]
    let chat = Arc::new(Chat::new(chat_cfg));
    let cfg = EngineConfig {
        workers: args.workers,
        ports: args.ports,
        ..EngineConfig::default()
    };
    let mut engine = Engine::start(cfg, chat.clone())
        .context("cannot start the engine (is io_uring available?)")?;
    let addr = engine
        .listen(args.listen, 1024)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!("chat listening on {addr}; Ctrl-C to stop");

    let (stop, stopped) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop.send(());
    })
    .context("cannot install the Ctrl-C handler")?;
    // The workers do everything; the main thread waits for Ctrl-C.
    #[cfg(feature = "cluster")]
    if let Some(c) = &cluster {
        // In a cluster, one thread delivers what comes from the other
        // nodes, and this one repeats the room list now and then.
        std::thread::scope(|s| {
            let engine = &engine;
            s.spawn(move || c.run_delivery(engine.handle()));
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REPEAT_MEMBERS) {
                chat.publish_members();
            }
            c.stop();
        });
    }
    #[cfg(feature = "cluster")]
    let in_cluster = cluster.is_some();
    #[cfg(not(feature = "cluster"))]
    let in_cluster = false;
    if !in_cluster {
        let _ = stopped.recv();
    }

    let summary = engine.shutdown(Duration::from_secs(1));
    tracing::info!("final summary: {summary}; chat: {:?}", chat.census());
    if summary.outstanding_ops != 0 || summary.outstanding_bufs != 0 {
        anyhow::bail!("operations or buffers were still outstanding at exit");
    }
    Ok(())
}
