//! Collectives over flat buffers, for the trainer's engines: `all_reduce` (sum, avg, max),
//! `reduce_scatter`, `all_gather`, `broadcast`, `barrier`.
//!
//! Every call carries a sequence number and a deadline; a timeout is an error that names the
//! operation, its sequence number and the peer that did not answer. Another thread can abort a
//! communicator (the coordinator ending a generation): every pending and later call fails at
//! once. Any error poisons the communicator and closes its connections, so that the failure
//! reaches every rank of the ring promptly instead of each waiting out its timeout.
//!
//! Layout:
//! - [`element`] — element types (f32, bf16, f16) and the reduction kernels.
//! - [`store`] — the bootstrap key-value store trait, an in-process store and a directory store.
//! - [`ring`] — `TcpRing`: a chunked, pipelined, bandwidth-optimal ring over TCP.
//! - [`tcpstore`] — a client and a server of PyTorch's c10d TCPStore protocol (rendezvous from
//!   MASTER_ADDR/MASTER_PORT, shared with torch processes).
//! - `nccl` (feature `cuda`) — NCCL through cudarc, unique id shipped through the store.
//!
//! Segmentation: a buffer of `len` elements is split into `world` contiguous shards, the first
//! `len % world` one element longer ([`shard_range`]); after `reduce_scatter`, rank r holds the
//! reduced shard r; `all_gather` starts from each rank's shard r.

/// Evaluates `$e` with `$b` bound to the typed slice inside a [`BufMut`]: every backend turns
/// the dtype-erased trait calls into its generic implementation through this one match.
macro_rules! with_buf {
    ($buf:expr, $b:ident => $e:expr) => {
        match $buf {
            $crate::BufMut::F32($b) => $e,
            $crate::BufMut::Bf16($b) => $e,
            $crate::BufMut::F16($b) => $e,
        }
    };
}

pub mod element;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod ring;
pub mod store;
pub mod tcpstore;

use std::ops::Range;
use std::time::Duration;

pub use element::{DType, Element, ReduceOp};
pub use ring::{RingConfig, TcpRing, Transport};
pub use store::{DirStore, MemStore, Store};
pub use tcpstore::{StoreLimits, TcpStoreClient, TcpStoreOptions, TcpStoreServer};

/// A buffer of one of the supported element types.
pub enum BufMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [half::bf16]),
    F16(&'a mut [half::f16]),
}

impl BufMut<'_> {
    pub fn len(&self) -> usize {
        match self {
            BufMut::F32(b) => b.len(),
            BufMut::Bf16(b) => b.len(),
            BufMut::F16(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            BufMut::F32(_) => DType::F32,
            BufMut::Bf16(_) => DType::Bf16,
            BufMut::F16(_) => DType::F16,
        }
    }
}

impl<'a> From<&'a mut [f32]> for BufMut<'a> {
    fn from(b: &'a mut [f32]) -> Self {
        BufMut::F32(b)
    }
}
impl<'a> From<&'a mut [half::bf16]> for BufMut<'a> {
    fn from(b: &'a mut [half::bf16]) -> Self {
        BufMut::Bf16(b)
    }
}
impl<'a> From<&'a mut [half::f16]> for BufMut<'a> {
    fn from(b: &'a mut [half::f16]) -> Self {
        BufMut::F16(b)
    }
}

/// The elements of shard `rank` when `len` elements are split over `world` ranks: contiguous,
/// the first `len % world` shards one element longer.
pub fn shard_range(len: usize, world: usize, rank: usize) -> Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start..start + size
}

/// Which collective a call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::ReduceScatter => "reduce_scatter",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }

    fn code(self) -> u8 {
        match self {
            Op::AllReduce => 1,
            Op::ReduceScatter => 2,
            Op::AllGather => 3,
            Op::Broadcast => 4,
            Op::Barrier => 5,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a collective or the bootstrap failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    #[error("{op} #{seq}: rank {peer} did not answer within {waited:?}")]
    Timeout {
        op: Op,
        seq: u64,
        peer: usize,
        waited: Duration,
    },
    #[error("{op} #{seq}: connection to rank {peer} lost: {detail}")]
    PeerLost {
        op: Op,
        seq: u64,
        peer: usize,
        detail: String,
    },
    #[error("{op} #{seq}: rank {peer} is not in the same call: {detail}")]
    Mismatch {
        op: Op,
        seq: u64,
        peer: usize,
        detail: String,
    },
    #[error("{op} #{seq}: aborted: {reason}")]
    Aborted { op: Op, seq: u64, reason: String },
    #[error("communicator unusable after an earlier error: {0}")]
    Poisoned(String),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("bootstrap: rank {peer} refused the connection: {detail}")]
    Refused { peer: usize, detail: String },
    #[error("store: {0}")]
    Store(String),
    #[error("{0}")]
    InvalidArgument(String),
}

impl CommError {
    /// The rank this error blames, when it names one.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CommError::Timeout { peer, .. }
            | CommError::PeerLost { peer, .. }
            | CommError::Mismatch { peer, .. }
            | CommError::Refused { peer, .. } => Some(*peer),
            _ => None,
        }
    }
}

/// Collectives over host buffers. Calls of one communicator are made by one thread at a time
/// (they take `&mut self`); [`AbortHandle`] is how another thread ends them.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sequence number of the last call started (0 before the first).
    fn seq(&self) -> u64;
    /// Timeout of each following call.
    fn set_timeout(&mut self, timeout: Duration);
    /// A handle that aborts this communicator from any thread.
    fn abort_handle(&self) -> AbortHandle;

    /// Reduces `buf` across all ranks; every rank ends with the result.
    ///
    /// # Errors
    /// Timeout, a lost peer, a peer in another call, or an abort.
    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError>;
    /// Reduces `buf` across all ranks; rank r ends with the reduced shard
    /// `shard_range(len, world, r)` (the rest of `buf` holds partial sums).
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn reduce_scatter(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<Range<usize>, CommError>;
    /// Each rank contributes its shard `shard_range(len, world, rank)` of `buf`; every rank
    /// ends with all shards.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn all_gather(&mut self, buf: BufMut<'_>) -> Result<(), CommError>;
    /// Copies `root`'s `buf` to every rank.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn broadcast(&mut self, buf: BufMut<'_>, root: usize) -> Result<(), CommError>;
    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// As [`Communicator::all_reduce`].
    fn barrier(&mut self) -> Result<(), CommError>;
}

/// Aborts a communicator from another thread: pending and later calls fail at once.
#[derive(Clone)]
pub struct AbortHandle {
    inner: std::sync::Arc<ring::AbortState>,
}

impl AbortHandle {
    /// A handle not tied to sockets (for communicators that poll it, such as NCCL's).
    pub fn new() -> AbortHandle {
        AbortHandle {
            inner: std::sync::Arc::new(ring::AbortState::new()),
        }
    }

    /// The reason given to the first [`AbortHandle::abort`].
    pub fn reason(&self) -> String {
        self.inner.reason()
    }

    pub fn abort(&self, reason: &str) {
        self.inner.abort(reason);
    }

    pub fn is_aborted(&self) -> bool {
        self.inner.is_aborted()
    }
}

impl Default for AbortHandle {
    fn default() -> Self {
        AbortHandle::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_buffer_in_order() {
        for len in [0usize, 1, 2, 3, 7, 8, 9, 1_000_003] {
            for world in 1..=9 {
                let mut next = 0;
                for r in 0..world {
                    let s = shard_range(len, world, r);
                    assert_eq!(s.start, next, "len {len} world {world} rank {r}");
                    next = s.end;
                    let size = s.len();
                    assert!(size == len / world || size == len / world + 1);
                }
                assert_eq!(next, len);
            }
        }
    }
}
