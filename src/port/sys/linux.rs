//! Linux helpers outside the port: process accounting (read from `/proc`
//! and the process CPU clock), returning free heap memory, descriptor
//! limits, socket options.

use std::time::Duration;

/// CPU time and resident memory of this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessUsage {
    /// User + system CPU time consumed so far.
    pub cpu: Duration,
    /// Resident set size in bytes.
    pub rss: u64,
}

/// Reads this process's CPU time and RSS; `None` if `/proc` is unreadable.
pub fn process_usage() -> Option<ProcessUsage> {
    usage_in("/proc/self")
}

/// Reads the CPU time and RSS of process `pid` (e.g. a server watched by
/// `cport stress --server-pid`); `None` if it is gone or `/proc` is
/// unreadable.
pub fn process_usage_of(pid: u32) -> Option<ProcessUsage> {
    usage_in(&format!("/proc/{pid}"))
}

/// The CPU time and RSS of process `pid` from `/proc/PID/stat` alone
/// (cheap enough to sample several times a second); `None` if it is gone.
pub fn process_cpu_rss_of(pid: u32) -> Option<(Duration, u64)> {
    cpu_rss_in(&format!("/proc/{pid}"))
}

/// This process's CPU time (user + system, all threads), from
/// `clock_gettime(CLOCK_PROCESS_CPUTIME_ID)`: one system call, no file, no
/// cost that grows with connections or descriptors, so a worker may read
/// it to answer a request.
pub fn process_cpu() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live local we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// This process's resident memory in bytes, from `/proc/self/statm`. A file
/// read: call it from a background thread, never from a worker.
pub fn process_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some(pages * page)
}

/// Gives the memory the allocator holds free back to the operating system
/// (glibc's `malloc_trim(0)`, which also releases free pages in the middle
/// of every arena). Returns whether anything was released. It walks the
/// allocator's free lists under their locks: call it from a background
/// thread, and rarely.
#[cfg(target_env = "gnu")]
pub fn trim_heap() -> bool {
    // SAFETY: malloc_trim has no preconditions; it only changes how much
    // free memory the allocator keeps mapped.
    unsafe { libc::malloc_trim(0) != 0 }
}

/// Makes the allocator keep less free memory for itself (glibc): blocks of
/// 1 MiB and more get mappings of their own, unmapped when freed, and the
/// free top of every arena over 1 MiB is returned at once. Without this,
/// glibc raises both thresholds as large blocks come and go (up to 32 and
/// 64 MiB), and the top of a thread's arena is never given back, not even
/// by [`trim_heap`]: after a burst a server kept tens of MiB it no longer
/// used. Call once, before the threads start.
#[cfg(target_env = "gnu")]
pub fn limit_heap_retention() {
    // SAFETY: mallopt only changes allocator parameters; both values are
    // in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

/// Makes the allocator keep less free memory: nothing to set with this C
/// library.
#[cfg(not(target_env = "gnu"))]
pub fn limit_heap_retention() {}

/// Gives the memory the allocator holds free back to the operating system:
/// nothing to do with this C library. Returns false.
#[cfg(not(target_env = "gnu"))]
pub fn trim_heap() -> bool {
    false
}

/// Returns the free top of the calling thread's arena (glibc). `malloc_trim`
/// never shrinks the top of a thread's arena, and a free shrinks it only
/// when the block it frees merges into a top of 64 KiB or more: when the
/// last block freed next to the top was a small one, the top stays
/// resident, however large. Freeing a block taken from that top does it.
/// Called by each worker after a trim.
#[cfg(target_env = "gnu")]
pub fn trim_thread_heap() {
    // Under the mmap threshold (see `limit_heap_retention`), so it comes
    // from this thread's arena, and over the 64 KiB that makes a free trim.
    // SAFETY: a plain malloc/free pair; the block is never touched.
    unsafe {
        let p = std::hint::black_box(libc::malloc(256 << 10));
        libc::free(p);
    }
}

/// Returns the free top of the calling thread's arena: nothing to do with
/// this C library.
#[cfg(not(target_env = "gnu"))]
pub fn trim_thread_heap() {}

fn cpu_rss_in(dir: &str) -> Option<(Duration, u64)> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, so split
    // after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line (1-based),
    // i.e. indices 11 and 12 after the state field at index 0.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    Some((
        Duration::from_nanos((utime + stime) * 1_000_000_000 / tick),
        rss_pages * page,
    ))
}

fn usage_in(dir: &str) -> Option<ProcessUsage> {
    let (cpu, rss) = cpu_rss_in(dir)?;
    Some(ProcessUsage { cpu, rss })
}

/// Connections waiting in the accept queues of the TCP listeners on local
/// port `port` (all addresses, IPv4 and IPv6, every SO_REUSEPORT socket),
/// from `/proc/net/tcp*`: 0 once the server has accepted every connection
/// made to it. `None` if no listener on that port is found.
pub fn accept_queue_len(port: u16) -> Option<u64> {
    let mut found = false;
    let mut total = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        // "sl local_address rem_address st tx_queue:rx_queue ..."; for a
        // listener (st 0A) rx_queue is its accept queue length.
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().take(5).collect();
            if f.len() < 5 || f[3] != "0A" {
                continue;
            }
            let lport = f[1]
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            if lport != Some(port) {
                continue;
            }
            let rx = f[4]
                .split(':')
                .nth(1)
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            found = true;
            total += rx.unwrap_or(0);
        }
    }
    found.then_some(total)
}

/// CPU time the threads of process `pid` have spent running, summed over
/// `/proc/PID/task/*/schedstat` (its first field: nanoseconds on a CPU,
/// as the scheduler accounts it, where `/proc/PID/stat` samples in
/// clock ticks and misreads threads that sleep and wake thousands of
/// times a second). Threads that have exited are not counted, so read it
/// around a window in which the process keeps its threads. `None` if the
/// process is gone or schedstat is not available.
pub fn sched_cpu_of(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    let mut any = false;
    for t in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        {
            total += ns;
            any = true;
        }
    }
    any.then(|| Duration::from_nanos(total))
}

/// The whole machine's CPU time so far, from the first line of
/// `/proc/stat`: `(busy, all)`, where busy is every state but idle and
/// I/O wait (user, nice, system, irq, softirq, steal), summed over the
/// cores. On loopback the kernel's network work lands on whichever task
/// happens to run, so the busy time over a window, divided by the
/// requests in it, is the honest cost of a request to client, server and
/// kernel together.
pub fn machine_cpu() -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    let all = busy + at(3) + at(4);
    // SAFETY: sysconf has no memory-safety preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let d = |t: u64| Duration::from_nanos(t * 1_000_000_000 / tick);
    Some((d(busy), d(all)))
}

/// The ephemeral port range (`net.ipv4.ip_local_port_range`) as
/// `(first, last)`; `None` if it cannot be read.
pub fn ephemeral_port_range() -> Option<(u16, u16)> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u16>());
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) if a <= b => Some((a, b)),
        _ => None,
    }
}

/// The hard limit on open file descriptors of this process (the most
/// [`raise_fd_limit`] can give).
pub fn fd_hard_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (rc == 0).then_some(r.rlim_max)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on a socket about to be bound to an
/// address with port 0 and then connected: the kernel then picks the
/// source port at `connect` time for the whole 4-tuple, instead of
/// reserving one at `bind` time for the source address alone, so one
/// source address gives a full ephemeral range per destination.
pub fn set_bind_address_no_port(socket: &socket2::Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live
    // c_int on our stack; the descriptor is owned by `socket`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The soft limit on open file descriptors of this process.
pub fn fd_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    (rc == 0).then_some(r.rlim_cur)
}

/// Raises the soft descriptor limit to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return None;
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    fd_limit()
}

/// Caps what a TCP socket holds queued but not yet sent at `bytes`
/// (`TCP_NOTSENT_LOWAT`): a send waits (and the socket is not writable)
/// while more is unsent, so the sender sees its peer's progress every
/// `bytes` instead of after a whole send buffer, and holds the rest in its
/// own queue. Bytes in flight are not limited.
pub fn set_notsent_lowat(socket: &socket2::Socket, bytes: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let v = bytes.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live
    // c_int on our stack; the descriptor is owned by `socket`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Turns on TCP keepalive (first probe after `idle`, then every `idle / 3`
/// (at least 1 s), 3 probes) and sets TCP_USER_TIMEOUT to the same total,
/// so a peer that vanished is reaped even while data is unacknowledged.
pub fn set_keepalive(socket: &socket2::Socket, idle: std::time::Duration) -> std::io::Result<()> {
    let interval = (idle / 3).max(std::time::Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(3);
    socket.set_tcp_keepalive(&ka)?;
    socket.set_tcp_user_timeout(Some(idle + interval * 3))
}

/// Opens `path` for reading, resolved strictly beneath the directory `root`
/// (openat2 with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS): absolute paths,
/// `..` that climbs out and symlinks that lead outside fail with `EXDEV`,
/// a symlink loop with `ELOOP`, decided by the kernel at open time, so
/// there is no check-then-open race.
///
/// Only a regular file is ever opened for reading: the path is first
/// resolved without opening what it names (`O_PATH`), and anything else (a
/// FIFO, whose open would wait for a writer; a socket; a device, whose open
/// may have effects) fails with an error [`is_not_regular`] recognises.
/// The open itself is `O_NONBLOCK` and re-checked with `fstat`, so a file
/// replaced by a FIFO between the two steps cannot block the caller either.
pub fn open_beneath(root: &std::fs::File, path: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let c = std::ffi::CString::new(path)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let probe = openat2_beneath(root, &c, libc::O_PATH)?;
    let first = fstat(&probe)?;
    if first.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(super::not_regular(file_kind(first.st_mode)));
    }
    drop(probe);
    let file = openat2_beneath(root, &c, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY)?;
    let st = fstat(&file)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(super::not_regular(file_kind(st.st_mode)));
    }
    // Back to blocking mode: on a regular file O_NONBLOCK would make an
    // io_uring read or splice that misses the page cache fail with EAGAIN
    // instead of waiting for the disk off the worker.
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// `openat2(root, path, flags | O_CLOEXEC)` resolved beneath `root`.
fn openat2_beneath(
    root: &std::fs::File,
    path: &std::ffi::CStr,
    flags: libc::c_int,
) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: open_how is plain old data; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: the path is NUL-terminated and `how` is a valid open_how of
    // the size we pass; the kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from openat2 that nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd as i32) })
}

fn fstat(f: &std::fs::File) -> std::io::Result<libc::stat> {
    use std::os::fd::AsRawFd;
    // SAFETY: stat is plain old data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the struct we pass, on a descriptor we own.
    if unsafe { libc::fstat(f.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// What a file that is not a regular file is, for the error message.
fn file_kind(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "a directory",
        libc::S_IFIFO => "a FIFO",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symbolic link",
        _ => "not a regular file",
    }
}

/// Whether an error from [`open_beneath`] means the path tried to leave the root.
pub fn is_escape(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EXDEV)
}

/// Whether an error from [`open_beneath`] means the path could not be
/// resolved because of a symlink loop (too many levels of symbolic links).
pub fn is_loop(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// Maps `len` bytes of fresh, zeroed, private memory: pages cost nothing
/// until first written (the receive pools live here).
pub(super) fn map_pages(len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping with no address hint; the
    // result is checked against MAP_FAILED.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(mem.cast())
}

/// Unmaps what [`map_pages`] mapped.
///
/// # Safety
/// `mem` and `len` come from one `map_pages` call, and nothing uses the
/// memory any more.
pub(super) unsafe fn unmap_pages(mem: *mut u8, len: usize) {
    // SAFETY: the caller's contract.
    unsafe { libc::munmap(mem.cast(), len) };
}

/// Whether the running kernel is at least `major.minor` (from
/// /proc/sys/kernel/osrelease; an unreadable release counts as new enough,
/// so a feature then fails loudly instead of being skipped silently).
pub(crate) fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return true;
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let have = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    have >= (major, minor)
}

/// Opens a directory to serve files beneath (see [`open_beneath`]).
pub fn open_dir(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

/// Raw OS error codes the layers above compare `io::Error::raw_os_error`
/// against, under their POSIX names (here they are the errno values).
pub mod errno {
    pub use libc::{
        EADDRINUSE, EADDRNOTAVAIL, ECANCELED, ECONNABORTED, ECONNREFUSED, ECONNRESET, EHOSTUNREACH,
        EMFILE, ENETUNREACH, ENFILE, ENOBUFS, ENOMEM, EPIPE, ETIMEDOUT,
    };
}
