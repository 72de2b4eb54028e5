//! Receive buffers lent out by a port's buffer pool.
//!
//! A [`RecvBuf`] is a lease on one fixed-size chunk of a pool that the
//! kernel fills directly (on io_uring, a registered provided-buffer ring,
//! the idea of RIO in seed 004). The chunk goes back to the pool when the
//! lease is dropped, so a connection holds a receive buffer only between
//! the moment its data arrives and the moment it has been consumed: an idle
//! connection holds none.
//!
//! The pool's memory and the way a chunk is given back belong to the
//! backend; this module is the platform-free face of it.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// How a backend takes a chunk back. Implemented by each backend's pool.
pub(crate) trait Recycle: Send + Sync {
    /// The bytes of chunk `id`, first `len` of them.
    fn chunk(&self, id: u32, len: usize) -> &[u8];
    /// Give chunk `id` back to the pool.
    fn recycle(&self, id: u32);
}

/// A lease on one pooled receive buffer holding `len()` received bytes.
pub struct RecvBuf {
    pool: Option<Arc<dyn Recycle>>,
    id: u32,
    len: usize,
}

impl RecvBuf {
    pub(crate) fn new(pool: Arc<dyn Recycle>, id: u32, len: usize) -> RecvBuf {
        RecvBuf {
            pool: Some(pool),
            id,
            len,
        }
    }

    /// An empty buffer: what a receive returns at end of stream.
    pub fn eof() -> RecvBuf {
        RecvBuf {
            pool: None,
            id: 0,
            len: 0,
        }
    }
}

impl Deref for RecvBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.pool {
            Some(p) => p.chunk(self.id, self.len),
            None => &[],
        }
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        if let Some(p) = self.pool.take() {
            p.recycle(self.id);
        }
    }
}

impl fmt::Debug for RecvBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBuf")
            .field("id", &self.id)
            .field("len", &self.len)
            .finish()
    }
}
