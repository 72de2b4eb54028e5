//! Windows helpers outside the port: process accounting, the (absent)
//! descriptor limits, socket options, opening files beneath a directory,
//! and the error codes the layers above compare against. The Windows
//! counterpart of `linux.rs`, with the same functions.

use std::fs::File;
use std::io;
use std::os::windows::ffi::OsStringExt;
use std::os::windows::fs::OpenOptionsExt;
use std::os::windows::io::{AsRawHandle, AsRawSocket};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use windows_sys::Win32::Foundation::{CloseHandle, ERROR_CANT_RESOLVE_FILENAME, FILETIME, HANDLE};
use windows_sys::Win32::Networking::WinSock::{SO_REUSE_UNICASTPORT, SOL_SOCKET, setsockopt};
use windows_sys::Win32::Storage::FileSystem::{
    FILE_FLAG_BACKUP_SEMANTICS, FILE_NAME_NORMALIZED, FILE_TYPE_CHAR, FILE_TYPE_DISK,
    FILE_TYPE_PIPE, GetFileType, GetFinalPathNameByHandleW, VOLUME_NAME_DOS,
};
use windows_sys::Win32::System::Memory::{
    MEM_COMMIT, MEM_RELEASE, MEM_RESERVE, PAGE_READWRITE, VirtualAlloc, VirtualFree,
};
use windows_sys::Win32::System::ProcessStatus::{K32GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS};
use windows_sys::Win32::System::Threading::{
    GetCurrentProcess, GetProcessTimes, GetSystemTimes, OpenProcess,
    PROCESS_QUERY_LIMITED_INFORMATION,
};

/// CPU time and resident memory of this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessUsage {
    /// User + system CPU time consumed so far.
    pub cpu: Duration,
    /// Resident set size (working set) in bytes.
    pub rss: u64,
}

/// Reads this process's CPU time and working set.
pub fn process_usage() -> Option<ProcessUsage> {
    // SAFETY: the pseudo-handle of the current process needs no closing
    // and is valid for the whole call.
    usage_of(unsafe { GetCurrentProcess() })
}

/// This process's CPU time (user + system): GetProcessTimes, one system
/// call whose cost does not grow with connections or handles.
pub fn process_cpu() -> Option<Duration> {
    process_usage().map(|u| u.cpu)
}

/// This process's working set in bytes.
pub fn process_rss() -> Option<u64> {
    process_usage().map(|u| u.rss)
}

/// Gives free heap memory back to the operating system: the Windows heap
/// decommits free pages by itself, so there is nothing to do. Returns false.
pub fn trim_heap() -> bool {
    false
}

/// Returns the free memory of the calling thread's heap: nothing to do on
/// Windows.
pub fn trim_thread_heap() {}

/// Makes the allocator keep less free memory: the Windows heap needs no
/// setting.
pub fn limit_heap_retention() {}

/// Reads the CPU time and working set of process `pid`; `None` if it is
/// gone or we may not query it.
pub fn process_usage_of(pid: u32) -> Option<ProcessUsage> {
    // SAFETY: OpenProcess has no memory-safety preconditions; the handle is
    // checked and closed below.
    let h = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
    if h.is_null() {
        return None;
    }
    let u = usage_of(h);
    // SAFETY: `h` is a handle we opened above and close once.
    unsafe { CloseHandle(h) };
    u
}

/// The CPU time and working set of process `pid` (no handle count);
/// `None` if it is gone or we may not query it.
pub fn process_cpu_rss_of(pid: u32) -> Option<(Duration, u64)> {
    process_usage_of(pid).map(|u| (u.cpu, u.rss))
}

/// CPU time the threads of process `pid` have spent running (user +
/// kernel, from GetProcessTimes: Windows keeps no per-thread scheduler
/// clock that is finer); `None` if it is gone or we may not query it.
pub fn sched_cpu_of(pid: u32) -> Option<Duration> {
    process_usage_of(pid).map(|u| u.cpu)
}

/// The whole machine's CPU time so far: `(busy, all)` summed over the
/// cores, from GetSystemTimes (whose kernel time includes idle time).
pub fn machine_cpu() -> Option<(Duration, Duration)> {
    let zero = FILETIME {
        dwLowDateTime: 0,
        dwHighDateTime: 0,
    };
    let (mut idle, mut kernel, mut user) = (zero, zero, zero);
    // SAFETY: GetSystemTimes writes the three FILETIMEs we pass and
    // nothing else.
    let ok = unsafe { GetSystemTimes(&mut idle, &mut kernel, &mut user) };
    if ok == 0 {
        return None;
    }
    let t = |f: FILETIME| ((f.dwHighDateTime as u64) << 32) | f.dwLowDateTime as u64;
    let all = t(kernel) + t(user);
    let busy = all.saturating_sub(t(idle));
    // FILETIME counts 100 ns units.
    Some((
        Duration::from_nanos(busy * 100),
        Duration::from_nanos(all * 100),
    ))
}

/// Connections waiting in the accept queue of a listener on local port
/// `port`. Windows does not expose a listener's backlog length to another
/// process (GetExtendedTcpTable lists connections, not queue lengths), so
/// this is `None`: unknown.
pub fn accept_queue_len(port: u16) -> Option<u64> {
    let _ = port;
    None
}

fn usage_of(h: HANDLE) -> Option<ProcessUsage> {
    let zero = FILETIME {
        dwLowDateTime: 0,
        dwHighDateTime: 0,
    };
    let (mut created, mut exited, mut kernel, mut user) = (zero, zero, zero, zero);
    // SAFETY: the four out-pointers are live locals; `h` is a valid process
    // handle for the call.
    if unsafe { GetProcessTimes(h, &mut created, &mut exited, &mut kernel, &mut user) } == 0 {
        return None;
    }
    let ticks = |f: FILETIME| ((f.dwHighDateTime as u64) << 32) | f.dwLowDateTime as u64;
    // SAFETY: PROCESS_MEMORY_COUNTERS is plain old data; all-zero is valid.
    let mut mem: PROCESS_MEMORY_COUNTERS = unsafe { std::mem::zeroed() };
    mem.cb = std::mem::size_of::<PROCESS_MEMORY_COUNTERS>() as u32;
    // SAFETY: `mem` is a live local of the size we pass.
    let rss = if unsafe { K32GetProcessMemoryInfo(h, &mut mem, mem.cb) } != 0 {
        mem.WorkingSetSize as u64
    } else {
        0
    };
    Some(ProcessUsage {
        // FILETIME counts 100 ns intervals.
        cpu: Duration::from_nanos((ticks(kernel) + ticks(user)) * 100),
        rss,
    })
}

/// Windows' dynamic port range is 49152-65535 by default; it is not read
/// from the system (`netsh int ipv4 show dynamicport tcp` shows it).
pub fn ephemeral_port_range() -> Option<(u16, u16)> {
    Some((49152, 65535))
}

/// Windows has no per-process descriptor limit for sockets: a process may
/// hold up to 2^24 handles, and memory runs out first. This is that limit.
const HANDLE_LIMIT: u64 = 1 << 24;

/// The most handles a process can hold (there is no soft/hard pair).
pub fn fd_hard_limit() -> Option<u64> {
    Some(HANDLE_LIMIT)
}

/// The most handles a process can hold.
pub fn fd_limit() -> Option<u64> {
    Some(HANDLE_LIMIT)
}

/// Nothing to raise on Windows; returns the handle limit.
pub fn raise_fd_limit() -> Option<u64> {
    fd_limit()
}

/// The Windows analogue of `IP_BIND_ADDRESS_NO_PORT`: `SO_REUSE_UNICASTPORT`
/// lets the stack share a source port between connections to different
/// destinations, choosing it at connect time. Best effort: older systems
/// (and Wine) lack the option, and a bind with port 0 still works there,
/// only with fewer ports per source address.
pub fn set_bind_address_no_port(socket: &socket2::Socket) -> io::Result<()> {
    let one: u32 = 1;
    // SAFETY: setsockopt reads 4 bytes from a live local; the socket is
    // owned by `socket` for the call.
    let rc = unsafe {
        setsockopt(
            socket.as_raw_socket() as usize,
            SOL_SOCKET,
            SO_REUSE_UNICASTPORT,
            (&one as *const u32).cast(),
            4,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "SO_REUSE_UNICASTPORT is not available: {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Turns on TCP keepalive: first probe after `idle`, then every `idle / 3`
/// (at least 1 s), 3 probes. (Windows has no TCP_USER_TIMEOUT.)
pub fn set_keepalive(socket: &socket2::Socket, idle: Duration) -> io::Result<()> {
    let interval = (idle / 3).max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval);
    socket.set_tcp_keepalive(&ka)?;
    // TCP_KEEPCNT exists since Windows 10 1703; without it the system's
    // default count (10) applies.
    let _ = socket.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_retries(3));
    Ok(())
}

/// Reserves and commits `len` bytes of fresh, zeroed memory: pages cost
/// nothing until first written (the receive pool lives here).
pub(super) fn map_pages(len: usize) -> io::Result<*mut u8> {
    // SAFETY: a new region at an address of the system's choosing; the
    // result is checked for null.
    let mem = unsafe {
        VirtualAlloc(
            std::ptr::null(),
            len,
            MEM_RESERVE | MEM_COMMIT,
            PAGE_READWRITE,
        )
    };
    if mem.is_null() {
        return Err(io::Error::last_os_error());
    }
    Ok(mem.cast())
}

/// Releases what [`map_pages`] reserved.
///
/// # Safety
/// `mem` comes from a `map_pages` call, and nothing uses the memory any
/// more.
pub(super) unsafe fn unmap_pages(mem: *mut u8, _len: usize) {
    // SAFETY: the caller's contract; MEM_RELEASE takes size 0 and frees the
    // whole reservation.
    unsafe { VirtualFree(mem.cast(), 0, MEM_RELEASE) };
}

/// `TCP_NOTSENT_LOWAT` has no Windows counterpart: nothing to set.
pub fn set_notsent_lowat(_socket: &socket2::Socket, _bytes: u32) -> io::Result<()> {
    Ok(())
}

/// Opens a directory to serve files beneath. A directory opens on Windows
/// only with `FILE_FLAG_BACKUP_SEMANTICS`.
pub fn open_dir(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(FILE_FLAG_BACKUP_SEMANTICS)
        .open(path)
}

/// The error [`open_beneath`] gives for a path that leaves the root.
#[derive(Debug)]
struct Escape;

impl std::fmt::Display for Escape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("path leads outside the files directory")
    }
}

impl std::error::Error for Escape {}

fn escape() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, Escape)
}

/// The final path of an open file or directory (links and junctions
/// resolved), as the system sees it.
fn final_path(f: &File) -> io::Result<PathBuf> {
    let mut buf = vec![0u16; 512];
    loop {
        // SAFETY: `buf` is a live buffer of the length we pass; the handle
        // is owned by `f` for the call.
        let n = unsafe {
            GetFinalPathNameByHandleW(
                f.as_raw_handle(),
                buf.as_mut_ptr(),
                buf.len() as u32,
                FILE_NAME_NORMALIZED | VOLUME_NAME_DOS,
            )
        } as usize;
        if n == 0 {
            return Err(io::Error::last_os_error());
        }
        if n < buf.len() {
            buf.truncate(n);
            return Ok(PathBuf::from(std::ffi::OsString::from_wide(&buf)));
        }
        // Too small: `n` is the size needed, terminator included.
        buf.resize(n + 1, 0);
    }
}

/// Opens `path` for reading, strictly beneath the directory `root`.
/// Windows has no `openat2(RESOLVE_BENEATH)`, so the file is opened and
/// then its *final* path (every link and junction resolved, read from the
/// open handle) is checked to lie beneath the root's final path: what is
/// checked is the very file that will be sent, so there is no
/// check-then-open race. Absolute paths, drive prefixes and `..` are
/// refused before anything is opened.
///
/// Only a disk file is ever served: a component with a reserved device
/// name (`CON`, `NUL`, `COM1`, ...; these name devices wherever they
/// appear on older Windows) is refused before anything is opened, and a
/// handle that is not a disk file (`GetFileType`: a pipe or a character
/// device reached through a link) or is a directory is closed unread.
pub fn open_beneath(root: &File, path: &str) -> io::Result<File> {
    let rel = Path::new(path);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(escape());
    }
    if rel.components().any(|c| is_device_name(c.as_os_str())) {
        return Err(super::not_regular("a device"));
    }
    let base = final_path(root)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .open(base.join(rel))?;
    // SAFETY: GetFileType only reads the handle, owned by `f` for the call.
    let kind = unsafe { GetFileType(f.as_raw_handle()) };
    if kind != FILE_TYPE_DISK {
        return Err(super::not_regular(match kind {
            FILE_TYPE_PIPE => "a pipe",
            FILE_TYPE_CHAR => "a character device",
            _ => "not a disk file",
        }));
    }
    if !final_path(&f)?.starts_with(&base) {
        return Err(escape());
    }
    if f.metadata()?.is_dir() {
        return Err(super::not_regular("a directory"));
    }
    Ok(f)
}

/// Whether a path component is a reserved DOS device name (`CON`, `PRN`,
/// `AUX`, `NUL`, `COM0`-`COM9`, `LPT0`-`LPT9`), with or without an
/// extension or trailing spaces and dots.
fn is_device_name(c: &std::ffi::OsStr) -> bool {
    let Some(s) = c.to_str() else {
        return false;
    };
    let stem = s.split('.').next().unwrap_or("").trim_end_matches(' ');
    let upper = stem.to_ascii_uppercase();
    let b = upper.as_bytes();
    matches!(
        upper.as_str(),
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$"
    ) || (b.len() == 4 && (b.starts_with(b"COM") || b.starts_with(b"LPT")) && b[3].is_ascii_digit())
        || ((upper.starts_with("COM") || upper.starts_with("LPT"))
            && matches!(&upper[3..], "\u{b9}" | "\u{b2}" | "\u{b3}"))
}

/// Whether an error from [`open_beneath`] means the path tried to leave the root.
pub fn is_escape(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|r| r.is::<Escape>())
}

/// Whether an error from [`open_beneath`] means the path could not be
/// resolved because of a symbolic link loop.
pub fn is_loop(e: &io::Error) -> bool {
    e.raw_os_error() == Some(ERROR_CANT_RESOLVE_FILENAME as i32)
}

/// Raw OS error codes the layers above compare `io::Error::raw_os_error`
/// against, under their POSIX names: here the Winsock and Win32 codes
/// that mean the same. The IOCP backend turns the codes of failed
/// overlapped operations (`ERROR_NETNAME_DELETED`, ...) into these.
pub mod errno {
    use windows_sys::Win32::Foundation as f;
    use windows_sys::Win32::Networking::WinSock as w;

    /// An operation cancelled (CancelIoEx): `ERROR_OPERATION_ABORTED`.
    pub const ECANCELED: i32 = f::ERROR_OPERATION_ABORTED as i32;
    /// No buffer space.
    pub const ENOBUFS: i32 = w::WSAENOBUFS;
    /// Too many sockets.
    pub const EMFILE: i32 = w::WSAEMFILE;
    /// Too many open files (system-wide).
    pub const ENFILE: i32 = f::ERROR_TOO_MANY_OPEN_FILES as i32;
    /// Out of memory.
    pub const ENOMEM: i32 = f::ERROR_NOT_ENOUGH_MEMORY as i32;
    /// Connection refused.
    pub const ECONNREFUSED: i32 = w::WSAECONNREFUSED;
    /// Timed out.
    pub const ETIMEDOUT: i32 = w::WSAETIMEDOUT;
    /// Connection reset by the peer.
    pub const ECONNRESET: i32 = w::WSAECONNRESET;
    /// Connection aborted.
    pub const ECONNABORTED: i32 = w::WSAECONNABORTED;
    /// Send after the connection was shut down.
    pub const EPIPE: i32 = w::WSAESHUTDOWN;
    /// Address not available.
    pub const EADDRNOTAVAIL: i32 = w::WSAEADDRNOTAVAIL;
    /// Address in use.
    pub const EADDRINUSE: i32 = w::WSAEADDRINUSE;
    /// Network unreachable.
    pub const ENETUNREACH: i32 = w::WSAENETUNREACH;
    /// Host unreachable.
    pub const EHOSTUNREACH: i32 = w::WSAEHOSTUNREACH;
}
