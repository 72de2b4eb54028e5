//! The IOCP backend's receive pool: fixed-size chunks in one allocation,
//! taken only when a zero-byte `WSARecv` has said that data is waiting, and
//! given back when the [`RecvBuf`](crate::buf::RecvBuf) lease drops.
//!
//! It plays the part of io_uring's provided-buffer ring (and of the seeds'
//! pre-allocated 4 KiB buffers): an idle connection holds no chunk. Free chunks are kept on a stack, so the most recently
//! used (cache-warm, already-touched) chunk is handed out next and the pages
//! of a large, mostly idle pool are never touched.

use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::buf::{RecvBuf, Recycle};

/// A pool of `count` chunks of `size` bytes.
pub(super) struct Pool {
    /// Start of the allocation holding every chunk.
    mem: *mut u8,
    /// Length of the allocation in bytes (`count * size`).
    len: usize,
    /// Bytes per chunk.
    size: u32,
    /// Ids of the chunks nobody holds, most recently returned last.
    free: Mutex<Vec<u32>>,
    /// Chunks held by a [`Chunk`] or a `RecvBuf`.
    leased: AtomicUsize,
}

// SAFETY: `mem` is an allocation owned by this pool for its whole life.
// A chunk's bytes are written only through the one `Chunk` holding its id
// and read only through the one `RecvBuf` holding it afterwards; the free
// list is behind a mutex.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Pool {
    /// A pool with the same geometry as io_uring's buffer ring for the same
    /// configuration: `count` rounded up to a power of two (2..=32768),
    /// `size` clamped to 512 B..=1 MiB.
    pub(super) fn new(count: u32, size: u32) -> io::Result<Pool> {
        let count = count.clamp(2, 32768).next_power_of_two().min(32768);
        let size = size.clamp(512, 1 << 20);
        let len = count as usize * size as usize;
        let layout = std::alloc::Layout::from_size_align(len, 4096)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // Zeroed, so that the allocator takes fresh pages from the system
        // (VirtualAlloc), which cost nothing until a receive first writes
        // there.
        // SAFETY: the layout has a non-zero size (count >= 2, size >= 512).
        let mem = unsafe { std::alloc::alloc_zeroed(layout) };
        if mem.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate the receive buffer pool ({len} bytes)"),
            ));
        }
        Ok(Pool {
            mem,
            len,
            size,
            // Reversed so that chunk 0 is handed out first.
            free: Mutex::new((0..count).rev().collect()),
            leased: AtomicUsize::new(0),
        })
    }

    /// Chunks currently held by a `Chunk` or a `RecvBuf`.
    pub(super) fn leased(&self) -> usize {
        self.leased.load(Ordering::Relaxed)
    }

    /// Takes a free chunk, or `None` if every chunk is lent out.
    pub(super) fn take(self: &Arc<Self>) -> Option<Chunk> {
        let id = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        self.leased.fetch_add(1, Ordering::Relaxed);
        Some(Chunk {
            pool: Some(self.clone()),
            id,
        })
    }

    fn put_back(&self, id: u32) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push(id);
        self.leased.fetch_sub(1, Ordering::Relaxed);
    }

    fn chunk_ptr(&self, id: u32) -> *mut u8 {
        debug_assert!((id as usize + 1) * self.size as usize <= self.len);
        // SAFETY: every id handed out is below `count`, so the chunk lies
        // inside the allocation.
        unsafe { self.mem.add(id as usize * self.size as usize) }
    }
}

impl Recycle for Pool {
    fn chunk(&self, id: u32, len: usize) -> &[u8] {
        let len = len.min(self.size as usize);
        // SAFETY: the caller is the `RecvBuf` holding chunk `id`, made by
        // `Chunk::into_recv_buf` after a receive wrote its first `len` bytes;
        // nothing writes the chunk again until `recycle(id)`.
        unsafe { std::slice::from_raw_parts(self.chunk_ptr(id), len) }
    }

    fn recycle(&self, id: u32) {
        self.put_back(id);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: `mem` was allocated in `new` with this layout (which was
        // valid then); no chunk or lease is alive, since each holds an `Arc`
        // to this pool.
        unsafe {
            std::alloc::dealloc(
                self.mem,
                std::alloc::Layout::from_size_align_unchecked(self.len, 4096),
            );
        }
    }
}

/// One chunk taken from the pool, not yet holding received bytes. Dropping
/// it puts the chunk back.
pub(super) struct Chunk {
    /// The pool; `None` once the chunk became a lease.
    pool: Option<Arc<Pool>>,
    id: u32,
}

impl Chunk {
    /// The chunk's memory, for a receive to write into.
    pub(super) fn buf(&mut self) -> &mut [MaybeUninit<u8>] {
        let pool = self
            .pool
            .as_ref()
            .expect("a chunk holds its pool until it becomes a lease");
        // SAFETY: this `Chunk` is the only holder of `id` (it came off the
        // free list and goes back only when the chunk or its lease drops),
        // so nobody else reads or writes these bytes; the chunk lies inside
        // the mapping, and `MaybeUninit` makes no claim about its contents.
        unsafe {
            std::slice::from_raw_parts_mut(
                pool.chunk_ptr(self.id).cast::<MaybeUninit<u8>>(),
                pool.size as usize,
            )
        }
    }

    /// Turns the chunk into a lease on its first `len` bytes, which a
    /// receive has just written.
    pub(super) fn into_recv_buf(mut self, len: usize) -> RecvBuf {
        let pool = self
            .pool
            .take()
            .expect("a chunk holds its pool until it becomes a lease");
        let len = len.min(pool.size as usize);
        RecvBuf::new(pool, self.id, len)
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put_back(self.id);
        }
    }
}
