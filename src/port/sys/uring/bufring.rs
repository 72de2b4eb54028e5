//! The provided-buffer ring: a pool of fixed-size receive buffers the kernel
//! picks from when data arrives (IORING_REGISTER_PBUF_RING).
//!
//! A receive takes no buffer when it is submitted; the kernel chooses one at
//! the moment bytes arrive and reports its id in the CQE. That chunk then
//! belongs to a [`RecvBuf`](crate::buf::RecvBuf) lease until the lease is
//! dropped, when its id is written back to the ring's tail.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;

use crate::buf::Recycle;

/// One registered ring of provided buffers.
pub(super) struct BufRing {
    /// Ring of `entries` descriptors shared with the kernel.
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    /// `entries * size` bytes of buffer memory.
    mem: *mut u8,
    mem_layout: Layout,
    entries: u16,
    size: u32,
    /// Userspace copy of the tail; the lock serialises recycling.
    tail: Mutex<u16>,
    leased: AtomicUsize,
    leak: AtomicBool,
}

// SAFETY: the raw pointers are to allocations this struct owns for its whole
// life; the kernel-shared tail is written only under `tail`, and each chunk
// is read only by the single lease that holds its id.
unsafe impl Send for BufRing {}
// SAFETY: as above.
unsafe impl Sync for BufRing {}

impl BufRing {
    pub(super) fn new(ring: &IoUring, bgid: u16, count: u32, size: u32) -> io::Result<BufRing> {
        let entries = count.clamp(2, 32768).next_power_of_two().min(32768) as u16;
        let size = size.clamp(512, 1 << 20);
        let ring_layout = Layout::from_size_align(entries as usize * 16, 4096)
            .map_err(|_| io::Error::other("bad buffer ring layout"))?;
        let mem_layout = Layout::from_size_align(entries as usize * size as usize, 4096)
            .map_err(|_| io::Error::other("bad buffer pool layout"))?;
        // SAFETY: the layout has non-zero size.
        let rptr = unsafe { alloc_zeroed(ring_layout) };
        // The pool is mapped, not allocated: its pages stay untouched (no
        // memory used) until the kernel first writes received bytes there.
        // SAFETY: an anonymous private mapping with no address hint; the
        // result is checked against MAP_FAILED.
        let mptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mem_layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let mptr = if mptr == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            mptr.cast::<u8>()
        };
        if rptr.is_null() || mptr.is_null() {
            // SAFETY: each pointer, if set, came from the call above with
            // this layout or size and is not used after this.
            unsafe {
                if !rptr.is_null() {
                    dealloc(rptr, ring_layout);
                }
                if !mptr.is_null() {
                    libc::munmap(mptr.cast(), mem_layout.size());
                }
            }
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "cannot allocate the receive buffer pool",
            ));
        }
        let this = BufRing {
            ring: rptr.cast(),
            ring_layout,
            mem: mptr,
            mem_layout,
            entries,
            size,
            tail: Mutex::new(0),
            leased: AtomicUsize::new(0),
            leak: AtomicBool::new(false),
        };
        for bid in 0..entries {
            this.put(bid, bid);
        }
        this.publish(entries);
        *this.tail.lock().unwrap_or_else(|e| e.into_inner()) = entries;
        // SAFETY: the ring memory is page aligned, `entries` long, and lives
        // until this BufRing is dropped, after the IoUring that uses it
        // (fields of the backend drop in order: ring first; and the kernel
        // pins the pages it maps from user memory).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(rptr as u64, entries, bgid, 0)?;
        }
        Ok(this)
    }

    pub(super) fn buf_size(&self) -> u32 {
        self.size
    }

    pub(super) fn leased(&self) -> usize {
        self.leased.load(Ordering::Relaxed)
    }

    /// Records that the kernel handed out a chunk (a lease is being made).
    pub(super) fn lent(&self) {
        self.leased.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps the memory alive forever: the kernel may still own some of it.
    pub(super) fn leak_on_drop(&self) {
        self.leak.store(true, Ordering::Relaxed);
    }

    /// Writes descriptor slot `slot` to point at chunk `bid`.
    fn put(&self, slot: u16, bid: u16) {
        let idx = (slot & (self.entries - 1)) as usize;
        // SAFETY: idx < entries, so the entry is inside the ring allocation;
        // the kernel reads only slots between its head and our published
        // tail, and this slot is past the tail until `publish`.
        unsafe {
            let e = &mut *self.ring.add(idx);
            e.set_addr(self.mem.add(bid as usize * self.size as usize) as u64);
            e.set_len(self.size);
            e.set_bid(bid);
        }
    }

    fn publish(&self, tail: u16) {
        // SAFETY: the tail field lives in the first ring entry, inside our
        // allocation, and is 2-byte aligned; the kernel reads it atomically.
        unsafe {
            let t = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*t).store(tail, Ordering::Release);
        }
    }
}

impl Recycle for BufRing {
    fn chunk(&self, id: u32, len: usize) -> &[u8] {
        let len = len.min(self.size as usize);
        // SAFETY: id < entries (it came from the kernel's CQE for this
        // group), the chunk is inside `mem`, and the kernel will not write it
        // again until `recycle(id)` puts it back on the ring.
        unsafe { std::slice::from_raw_parts(self.mem.add(id as usize * self.size as usize), len) }
    }

    fn recycle(&self, id: u32) {
        let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        self.put(*tail, id as u16);
        *tail = tail.wrapping_add(1);
        self.publish(*tail);
        self.leased.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.leak.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: `ring` was allocated in `new` with this layout and `mem`
        // mapped with this size; no lease is alive (each holds an Arc).
        unsafe {
            dealloc(self.ring.cast(), self.ring_layout);
            libc::munmap(self.mem.cast(), self.mem_layout.size());
        }
    }
}
