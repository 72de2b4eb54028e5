//! A hand-written io_uring echo loop: the reference for what io_uring can
//! do on this machine with nothing in the way. Per thread: one ring, one
//! SO_REUSEPORT listener with a multishot accept, a multishot recv per
//! connection that picks its buffers from a provided-buffer ring (so an
//! idle connection holds no buffer), and a send straight from the received
//! buffer, which goes back to the ring once sent. At most one send is in
//! flight per connection, so echoed bytes keep their order; a short send
//! resumes where it stopped. The ring is set up with the flags `--ring`
//! names (SINGLE_ISSUER + DEFER_TASKRUN by default).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::{BufRingEntry, Fd};
use io_uring::{IoUring, cqueue, opcode, squeue};

use crate::Ring;

const ACCEPT: u64 = 0;
const RECV: u64 = 1;
const SEND: u64 = 2;
/// The provided-buffer group id.
const BGID: u16 = 0;

fn ud(kind: u64, slot: usize, generation: u32) -> u64 {
    kind | (slot as u64) << 2 | (generation as u64) << 32
}

fn ud_parts(u: u64) -> (u64, usize, u32) {
    (u & 3, ((u >> 2) & 0x3FFF_FFFF) as usize, (u >> 32) as u32)
}

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping touches no existing memory;
        // the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The provided-buffer ring and the buffers it hands out. Buffers are
/// lazily backed pages: only buffers that have carried data are resident.
struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    entries: u16,
    buf_size: u32,
    /// Our copy of the tail; published to the kernel by `publish`.
    tail: u16,
}

impl BufRing {
    fn new(entries: u16, buf_size: u32) -> io::Result<BufRing> {
        let ring = Mapping::new(entries as usize * std::mem::size_of::<BufRingEntry>())?;
        let bufs = Mapping::new(entries as usize * buf_size as usize)?;
        let mut br = BufRing {
            ring,
            bufs,
            entries,
            buf_size,
            tail: 0,
        };
        for bid in 0..entries {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    fn base(&self) -> *mut BufRingEntry {
        self.ring.ptr.cast()
    }

    fn addr(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < entries, so the offset is inside the buffer mapping.
        unsafe { self.bufs.ptr.add(bid as usize * self.buf_size as usize) }
    }

    /// Gives buffer `bid` back (visible to the kernel after `publish`).
    fn push(&mut self, bid: u16) {
        let slot = self.tail & (self.entries - 1);
        // SAFETY: slot < entries, inside the ring mapping; the kernel reads
        // only entries before the published tail, and this one is at or
        // past it until `publish`.
        let e = unsafe { &mut *self.base().add(slot as usize) };
        e.set_addr(self.addr(bid) as u64);
        e.set_len(self.buf_size);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lies in the first ring entry, inside our
        // mapping, and is shared with the kernel, so it is written
        // atomically, with release order after the entries it covers.
        unsafe {
            let t = BufRingEntry::tail(self.base()) as *const AtomicU16;
            (*t).store(self.tail, Ordering::Release);
        }
    }
}

struct Conn {
    fd: RawFd,
    generation: u32,
    /// Received buffers waiting to be echoed: (buffer id, sent so far, length).
    queue: VecDeque<(u16, u32, u32)>,
    sending: bool,
    recv_armed: bool,
    /// The peer finished (or the connection failed): close once idle.
    done: bool,
}

struct Loop {
    ring: IoUring,
    br: BufRing,
    listener: RawFd,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    generations: Vec<u32>,
    /// Connections whose recv ended for want of buffers.
    starved: Vec<usize>,
    returned: bool,
}

impl Loop {
    fn push(&mut self, e: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry we push refers to a descriptor that stays
            // open until its completions are reaped (a connection is closed
            // only when no recv or send is in flight on it) and to buffers
            // in `br`, which lives as long as the ring.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(Fd(self.listener))
            .build()
            .user_data(ud(ACCEPT, 0, 0));
        self.push(e)
    }

    fn arm_recv(&mut self, slot: usize) -> io::Result<()> {
        let Some(c) = self.conns[slot].as_mut() else {
            return Ok(());
        };
        c.recv_armed = true;
        let e =
            opcode::RecvMulti::new(Fd(c.fd), BGID)
                .build()
                .user_data(ud(RECV, slot, c.generation));
        self.push(e)
    }

    fn start_send(&mut self, slot: usize) -> io::Result<()> {
        let Some(c) = self.conns[slot].as_mut() else {
            return Ok(());
        };
        let Some(&(bid, off, len)) = c.queue.front() else {
            return Ok(());
        };
        c.sending = true;
        // SAFETY (of the pointer arithmetic): off < len <= buf_size.
        let p = unsafe { self.br.addr(bid).add(off as usize) };
        let e = opcode::Send::new(Fd(c.fd), p, len - off)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(SEND, slot, c.generation));
        self.push(e)
    }

    fn new_conn(&mut self, fd: RawFd) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads an int from a valid pointer.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.generations.push(0);
                self.conns.len() - 1
            }
        };
        self.conns[slot] = Some(Conn {
            fd,
            generation: self.generations[slot],
            queue: VecDeque::new(),
            sending: false,
            recv_armed: false,
            done: false,
        });
        self.arm_recv(slot)
    }

    /// Closes the connection once nothing is in flight on it.
    fn maybe_close(&mut self, slot: usize) {
        let Some(c) = self.conns[slot].as_ref() else {
            return;
        };
        let idle = c.done && !c.sending && !c.recv_armed && c.queue.is_empty();
        if !idle {
            return;
        }
        // SAFETY: no operation refers to this descriptor any more.
        unsafe { libc::close(c.fd) };
        self.conns[slot] = None;
        self.generations[slot] = self.generations[slot].wrapping_add(1);
        self.free.push(slot);
    }

    /// Ends a connection that failed: drops what it had queued and shuts
    /// the socket so its multishot recv ends.
    fn fail(&mut self, slot: usize) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        c.done = true;
        let fd = c.fd;
        let queued: Vec<u16> = c.queue.drain(..).map(|q| q.0).collect();
        for bid in queued {
            self.br.push(bid);
            self.returned = true;
        }
        // SAFETY: shutdown on a descriptor we own.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        self.maybe_close(slot);
    }

    fn live(&self, slot: usize, generation: u32) -> bool {
        matches!(self.conns.get(slot), Some(Some(c)) if c.generation == generation)
    }

    fn on_cqe(&mut self, user_data: u64, res: i32, flags: u32) -> io::Result<()> {
        let (kind, slot, generation) = ud_parts(user_data);
        let more = cqueue::more(flags);
        match kind {
            ACCEPT => {
                if res >= 0 {
                    self.new_conn(res)?;
                }
                if !more {
                    if res < 0 {
                        // EMFILE and the like: do not spin on them.
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    self.arm_accept()?;
                }
            }
            RECV => {
                let bid = cqueue::buffer_select(flags);
                if !self.live(slot, generation) {
                    if let Some(b) = bid {
                        self.br.push(b);
                        self.returned = true;
                    }
                    return Ok(());
                }
                if res > 0 {
                    let Some(b) = bid else {
                        self.fail(slot);
                        return Ok(());
                    };
                    let c = self.conns[slot].as_mut().expect("live");
                    if c.done {
                        self.br.push(b);
                        self.returned = true;
                    } else {
                        c.queue.push_back((b, 0, res as u32));
                        if !c.sending {
                            self.start_send(slot)?;
                        }
                    }
                } else if let Some(b) = bid {
                    self.br.push(b);
                    self.returned = true;
                }
                if !more {
                    let c = self.conns[slot].as_mut().expect("live");
                    c.recv_armed = false;
                    if res == -libc::ENOBUFS {
                        self.starved.push(slot);
                    } else if res > 0 && !c.done {
                        self.arm_recv(slot)?;
                    } else if res == 0 {
                        c.done = true;
                        self.maybe_close(slot);
                    } else {
                        self.fail(slot);
                    }
                }
            }
            SEND => {
                if !self.live(slot, generation) {
                    return Ok(());
                }
                let c = self.conns[slot].as_mut().expect("live");
                c.sending = false;
                if res < 0 {
                    self.fail(slot);
                    return Ok(());
                }
                let front = c.queue.front_mut().expect("a send was in flight");
                front.1 += res as u32;
                if front.1 >= front.2 {
                    let bid = front.0;
                    c.queue.pop_front();
                    self.br.push(bid);
                    self.returned = true;
                }
                if c.queue.is_empty() {
                    self.maybe_close(slot);
                } else {
                    self.start_send(slot)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn run(&mut self) -> io::Result<()> {
        self.arm_accept()?;
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(u, r, f) in &cqes {
                self.on_cqe(u, r, f)?;
            }
            if self.returned {
                self.returned = false;
                self.br.publish();
                for slot in std::mem::take(&mut self.starved) {
                    if matches!(&self.conns[slot], Some(c) if !c.done && !c.recv_armed) {
                        self.arm_recv(slot)?;
                    }
                }
            }
        }
    }
}

fn build_ring(ring: Ring) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.setup_cqsize(16384);
    match ring {
        Ring::None => {}
        Ring::Coop => {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        Ring::Defer => {
            b.setup_single_issuer().setup_defer_taskrun();
        }
    }
    b.build(4096)
}

fn serve(l: std::net::TcpListener, ring: Ring, buf_size: u32, bufs: u16) -> io::Result<Loop> {
    let r = build_ring(ring)?;
    let br = BufRing::new(bufs, buf_size)?;
    // SAFETY: the ring mapping holds `bufs` entries and outlives the
    // registration (it is dropped with the loop, after the io_uring, which
    // is declared first and so dropped first).
    unsafe {
        r.submitter()
            .register_buf_ring_with_flags(br.ring.ptr as u64, bufs, BGID, 0)?;
    }
    let fd = l.as_raw_fd();
    // The listener must stay open: leak it into the loop's lifetime.
    std::mem::forget(l);
    Ok(Loop {
        ring: r,
        br,
        listener: fd,
        conns: Vec::new(),
        free: Vec::new(),
        generations: Vec::new(),
        starved: Vec::new(),
        returned: false,
    })
}

/// Runs `workers` threads, each its own loop; returns only on failure.
pub(crate) fn run(
    addr: SocketAddr,
    workers: usize,
    ring: Ring,
    buf_size: u32,
    bufs: u16,
) -> anyhow::Result<()> {
    if !bufs.is_power_of_two() || bufs > 32768 {
        anyhow::bail!("--ring-bufs {bufs} must be a power of two, at most 32768");
    }
    let listeners: Vec<std::net::TcpListener> = (0..workers)
        .map(|_| crate::listener(addr, true))
        .collect::<io::Result<_>>()?;
    let local = listeners[0].local_addr()?;
    let (tx, rx) = std::sync::mpsc::channel::<io::Result<()>>();
    let mut handles = Vec::new();
    for l in listeners {
        let tx = tx.clone();
        handles.push(std::thread::spawn(move || {
            // The ring is made on the thread that drives it (SINGLE_ISSUER).
            let mut lp = match serve(l, ring, buf_size, bufs) {
                Ok(lp) => {
                    let _ = tx.send(Ok(()));
                    lp
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Ok(());
                }
            };
            lp.run()
        }));
    }
    drop(tx);
    for _ in 0..workers {
        rx.recv()??;
    }
    crate::announce(
        local,
        &format!("hand-written io_uring, {workers} threads, ring {ring:?}"),
    );
    for h in handles {
        match h.join() {
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(())) => {}
            Err(_) => anyhow::bail!("a uring thread panicked"),
        }
    }
    anyhow::bail!("uring threads ended")
}
