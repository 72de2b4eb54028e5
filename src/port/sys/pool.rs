//! The receive pool of the poll and IOCP backends: fixed-size chunks in one
//! mapping, taken only at the moment data is known to be waiting (poll: the
//! socket is readable; IOCP: a zero-byte `WSARecv` completed) and given back
//! when the [`RecvBuf`](crate::buf::RecvBuf) lease drops.
//!
//! It plays the part of io_uring's provided-buffer ring (and of the classic IOCP articles'
//! pre-allocated 4 KiB buffers): an idle connection holds no chunk. Free chunks are kept on a stack, so the most recently
//! used (cache-warm, already-touched) chunk is handed out next and the pages
//! of a large, mostly idle pool are never touched.

use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{map_pages, unmap_pages};
use crate::buf::{RecvBuf, Recycle};

/// A pool of `count` chunks of `size` bytes.
pub(in crate::port::sys) struct Pool {
    /// Start of the mapping holding every chunk.
    mem: *mut u8,
    /// Length of the mapping in bytes (`count * size`).
    len: usize,
    /// Bytes per chunk.
    size: u32,
    /// Ids of the chunks nobody holds, most recently returned last.
    free: Mutex<Vec<u32>>,
    /// Chunks held by a [`Chunk`] or a `RecvBuf`.
    leased: AtomicUsize,
}

// SAFETY: `mem` is a private mapping owned by this pool for its whole life.
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
    pub(in crate::port::sys) fn new(count: u32, size: u32) -> io::Result<Pool> {
        let count = count.clamp(2, 32768).next_power_of_two().min(32768);
        let size = size.clamp(512, 1 << 20);
        let len = count as usize * size as usize;
        // The pool is mapped, not allocated: its pages cost nothing until a
        // receive first writes there.
        let mem = map_pages(len).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot map the receive buffer pool ({len} bytes): {e}"),
            )
        })?;
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
    pub(in crate::port::sys) fn leased(&self) -> usize {
        self.leased.load(Ordering::Relaxed)
    }

    /// Takes a free chunk, or `None` if every chunk is lent out.
    pub(in crate::port::sys) fn take(self: &Arc<Self>) -> Option<Chunk> {
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
        // inside the mapping.
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
        // SAFETY: `mem` was mapped in `new` with `len` bytes; no chunk or
        // lease is alive, since each holds an `Arc` to this pool.
        unsafe { unmap_pages(self.mem, self.len) }
    }
}

/// One chunk taken from the pool, not yet holding received bytes. Dropping
/// it puts the chunk back.
pub(in crate::port::sys) struct Chunk {
    /// The pool; `None` once the chunk became a lease.
    pool: Option<Arc<Pool>>,
    id: u32,
}

impl Chunk {
    /// The chunk's memory, for a receive to write into.
    pub(in crate::port::sys) fn buf(&mut self) -> &mut [MaybeUninit<u8>] {
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
    pub(in crate::port::sys) fn into_recv_buf(mut self, len: usize) -> RecvBuf {
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

#[cfg(test)]
mod tests {
    //! Pure bookkeeping of the pool, and the raw-pointer accesses behind
    //! it; these also run under Miri (docs/reliability/models.md).

    use super::*;

    /// Writes `byte` into the first `len` bytes of a chunk, as a receive does.
    fn fill(chunk: &mut Chunk, byte: u8, len: usize) {
        for b in &mut chunk.buf()[..len] {
            b.write(byte);
        }
    }

    #[test]
    fn geometry_is_clamped_like_the_buffer_ring() {
        let p = Pool::new(3, 100).unwrap();
        assert_eq!(p.size, 512);
        assert_eq!(p.len, 4 * 512);
        let p = Pool::new(0, 1 << 30).unwrap();
        assert_eq!(p.size, 1 << 20);
        assert_eq!(p.len, 2 << 20);
    }

    #[test]
    fn take_lease_and_give_back() {
        let pool = Arc::new(Pool::new(2, 512).unwrap());
        let mut a = pool.take().unwrap();
        let mut b = pool.take().unwrap();
        assert_eq!((a.id, b.id), (0, 1), "chunk 0 is handed out first");
        assert!(pool.take().is_none(), "an empty pool gives nothing");
        assert_eq!(pool.leased(), 2);
        assert_eq!(a.buf().len(), 512);

        fill(&mut a, 0xA5, 512);
        fill(&mut b, 0x5A, 3);
        let la = a.into_recv_buf(512);
        let lb = b.into_recv_buf(3);
        assert_eq!(pool.leased(), 2, "a lease still holds its chunk");
        assert!(la.iter().all(|&x| x == 0xA5));
        assert_eq!(&lb[..], &[0x5A; 3]);
        // Leases may outlive the caller's handle on the pool.
        drop(pool);
        drop(la);
        drop(lb);
    }

    #[test]
    fn a_returned_chunk_is_reused_first_and_counts_balance() {
        let pool = Arc::new(Pool::new(4, 512).unwrap());
        let mut held = Vec::new();
        for round in 0..3u8 {
            let mut c = pool.take().unwrap();
            let id = c.id;
            fill(&mut c, round, 10);
            if round == 1 {
                // A chunk dropped without becoming a lease goes back too.
                drop(c);
            } else {
                let lease = c.into_recv_buf(10);
                assert_eq!(&lease[..], &[round; 10]);
                drop(lease);
            }
            // Most recently returned is handed out next (cache-warm).
            let again = pool.take().unwrap();
            assert_eq!(again.id, id);
            held.push(again);
        }
        assert_eq!(pool.leased(), 3);
        held.clear();
        assert_eq!(pool.leased(), 0);
        assert_eq!(pool.free.lock().unwrap().len(), 4);
    }

    #[test]
    fn a_lease_never_reads_past_its_chunk() {
        let pool = Arc::new(Pool::new(2, 512).unwrap());
        let mut c = pool.take().unwrap();
        fill(&mut c, 1, 512);
        // A length beyond the chunk (a bogus count) is clamped to it.
        let lease = c.into_recv_buf(10_000);
        assert_eq!(lease.len(), 512);
        let mut d = pool.take().unwrap();
        fill(&mut d, 2, 512);
        assert!(
            lease.iter().all(|&x| x == 1),
            "the neighbour chunk is not ours"
        );
    }

    #[test]
    fn leases_cross_threads() {
        let pool = Arc::new(Pool::new(8, 512).unwrap());
        let leases: Vec<RecvBuf> = (0..8u8)
            .map(|i| {
                let mut c = pool.take().unwrap();
                fill(&mut c, i, 64);
                c.into_recv_buf(64)
            })
            .collect();
        let t = std::thread::spawn(move || {
            for (i, l) in leases.into_iter().enumerate() {
                assert!(l.iter().all(|&x| x == i as u8));
            }
        });
        t.join().unwrap();
        assert_eq!(pool.leased(), 0);
    }
}
