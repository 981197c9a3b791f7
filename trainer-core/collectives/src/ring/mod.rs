//! `TcpRing`: collectives on a ring of TCP connections, for CPU training.
//!
//! Each rank sends to its right neighbour (rank+1) and receives from its left (rank-1), one
//! connection each way. `reduce_scatter` and `all_gather` take N−1 steps of one shard each, so
//! `all_reduce` (the two in a row) sends 2(N−1)/N of the buffer per rank: bandwidth-optimal.
//! Shards are cut into chunks; a dedicated thread sends while the caller's thread receives
//! and reduces, and a chunk reduced in step t is queued for step t+1 at once, so sending,
//! receiving and reducing overlap across steps (a pipeline, not N−1 round trips).
//!
//! Between ranks of one machine the connections are Unix-domain sockets (`Transport::Auto`,
//! the default), elsewhere TCP; the algorithm is the same.
//!
//! Every call starts with a 48-byte header to the right and checks the left's: same operation,
//! sequence number, element type, length and root, or the call fails naming the peer.
//!
//! Layout:
//! - `bootstrap` — listening, publishing the address, connecting, the handshake.
//! - `sender` — the send thread.
//! - `stream` — a connection: TCP or Unix socket.
//! - this file — [`TcpRing`] and the algorithms.

mod bootstrap;
mod cma;
mod sender;
mod stream;

use stream::Stream;
pub use stream::Transport;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::element::{DType, Element, ReduceOp};
use crate::store::Store;
use crate::{AbortHandle, BufMut, CommError, Communicator, Op, shard_range};

/// Settings of one ring communicator.
#[derive(Debug, Clone)]
pub struct RingConfig {
    pub job_id: String,
    pub generation: u64,
    pub rank: usize,
    pub world: usize,
    /// Address this rank listens on (the node's advertised address).
    pub bind_addr: IpAddr,
    /// Deadline of each collective call.
    pub timeout: Duration,
    /// Deadline of the bootstrap (all ranks connected).
    pub bootstrap_timeout: Duration,
    /// Bytes per pipelined chunk.
    pub chunk_bytes: usize,
    /// SO_SNDBUF / SO_RCVBUF.
    pub socket_buffer: usize,
    /// Unix sockets between ranks of one machine (`Auto`), or TCP only.
    pub transport: Transport,
    /// Over Unix sockets, let the receiver copy chunks straight from the sender's memory
    /// (`process_vm_readv`) when the system permits it.
    pub cma: bool,
}

impl RingConfig {
    /// Defaults for a rank of a job generation: loopback, 300 s call timeout, 512 KiB chunks.
    pub fn new(job_id: &str, generation: u64, rank: usize, world: usize) -> RingConfig {
        RingConfig {
            job_id: job_id.to_owned(),
            generation,
            rank,
            world,
            bind_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            timeout: Duration::from_secs(300),
            bootstrap_timeout: Duration::from_secs(300),
            chunk_bytes: 512 << 10,
            socket_buffer: 4 << 20,
            transport: Transport::Auto,
            cma: true,
        }
    }
}

/// Abort state shared with [`AbortHandle`]s.
pub struct AbortState {
    aborted: AtomicBool,
    reason: Mutex<String>,
    sockets: Mutex<Vec<Stream>>,
}

impl AbortState {
    pub(crate) fn new() -> AbortState {
        AbortState {
            aborted: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
            sockets: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn abort(&self, reason: &str) {
        {
            let mut r = self.reason.lock().expect("abort lock");
            if !self.aborted.swap(true, Ordering::SeqCst) {
                *r = reason.to_owned();
            }
        }
        self.close_sockets();
    }

    fn close_sockets(&self) {
        for s in self.sockets.lock().expect("abort lock").iter() {
            s.shutdown();
        }
    }

    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    pub(crate) fn reason(&self) -> String {
        self.reason.lock().expect("abort lock").clone()
    }
}

const HEADER_MAGIC: u32 = 0x524d_4331; // "RMC1"
const HEADER_BYTES: usize = 48;

/// The ring communicator.
pub struct TcpRing {
    cfg: RingConfig,
    left: Option<Stream>,
    right: Option<Stream>,
    /// The left neighbour's pid when its chunks are read from its memory.
    left_cma_pid: Option<i32>,
    right_cma: bool,
    /// The descriptor being consumed from the left (address, bytes left).
    remote: (u64, u64),
    sender: Option<sender::Sender>,
    seq: u64,
    timeout: Duration,
    abort: Arc<AbortState>,
    poisoned: Option<String>,
    /// Receive scratch, 8-byte aligned so that it can be viewed as any element type.
    scratch: Vec<u64>,
    header_out: [u8; HEADER_BYTES],
}

/// Per-call context for error messages.
#[derive(Clone, Copy)]
struct Call {
    op: Op,
    seq: u64,
    deadline: Instant,
}

impl TcpRing {
    /// Joins the ring: listens, publishes this rank's address in `store`, connects to the
    /// right neighbour and accepts the left one (refusing any peer of another job, generation
    /// or position).
    ///
    /// # Errors
    /// A peer that does not show up within the bootstrap timeout, a refused handshake, or a
    /// store error.
    pub fn connect(cfg: RingConfig, store: &dyn Store) -> Result<TcpRing, CommError> {
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(CommError::InvalidArgument(format!(
                "rank {} is not below world size {}",
                cfg.rank, cfg.world
            )));
        }
        if cfg.chunk_bytes < 64 {
            return Err(CommError::InvalidArgument(
                "chunk_bytes must be at least 64".into(),
            ));
        }
        let abort = Arc::new(AbortState::new());
        let (left, right, left_cma_pid, right_cma) = if cfg.world == 1 {
            (None, None, None, false)
        } else {
            let l = bootstrap::connect(&cfg, store)?;
            (Some(l.left), Some(l.right), l.left_cma_pid, l.right_cma)
        };
        let mut socks = Vec::new();
        for s in [&left, &right].into_iter().flatten() {
            socks.push(
                s.try_clone()
                    .map_err(|e| CommError::Bootstrap(format!("cloning a socket: {e}")))?,
            );
        }
        *abort.sockets.lock().expect("abort lock") = socks;
        let sender = match &right {
            Some(r) => Some(sender::Sender::start(
                r.try_clone()
                    .map_err(|e| CommError::Bootstrap(format!("cloning a socket: {e}")))?,
                cfg.rank,
                right_cma,
            )),
            None => None,
        };
        let scratch = vec![0u64; cfg.chunk_bytes.div_ceil(8)];
        Ok(TcpRing {
            timeout: cfg.timeout,
            cfg,
            left,
            right,
            left_cma_pid,
            right_cma,
            remote: (0, 0),
            sender,
            seq: 0,
            abort,
            poisoned: None,
            scratch,
            header_out: [0; HEADER_BYTES],
        })
    }

    /// The transports of the (left, right) connections: `"tcp"` or `"unix"`; `None` alone.
    /// `"unix+cma"` when chunks are copied straight from the peer's memory.
    pub fn transports(&self) -> (Option<&'static str>, Option<&'static str>) {
        let kind = |s: &Stream, cma: bool| if cma { "unix+cma" } else { s.kind() };
        (
            self.left
                .as_ref()
                .map(|s| kind(s, self.left_cma_pid.is_some())),
            self.right.as_ref().map(|s| kind(s, self.right_cma)),
        )
    }

    fn left_rank(&self) -> usize {
        (self.cfg.rank + self.cfg.world - 1) % self.cfg.world
    }

    fn right_rank(&self) -> usize {
        (self.cfg.rank + 1) % self.cfg.world
    }

    /// Starts a call: checks poison and abort, bumps the sequence number, sets deadlines.
    fn begin(&mut self, op: Op) -> Result<Call, CommError> {
        self.seq += 1;
        let call = Call {
            op,
            seq: self.seq,
            deadline: Instant::now() + self.timeout,
        };
        if self.abort.is_aborted() {
            return Err(CommError::Aborted {
                op,
                seq: call.seq,
                reason: self.abort.reason(),
            });
        }
        if let Some(p) = &self.poisoned {
            return Err(CommError::Poisoned(p.clone()));
        }
        let t = Some(self.timeout.max(Duration::from_millis(1)));
        for s in [&self.left, &self.right].into_iter().flatten() {
            let _ = s.set_read_timeout(t);
            let _ = s.set_write_timeout(t);
        }
        Ok(call)
    }

    /// Ends a call: on error, closes the connections (so that neighbours fail fast too) and
    /// poisons the communicator; always waits for the send thread to let go of the buffer.
    fn finish(&mut self, call: Call, result: Result<(), CommError>) -> Result<(), CommError> {
        if result.is_err() {
            self.abort.close_sockets();
        }
        let fenced = match &self.sender {
            Some(s) => s.fence(),
            None => Ok(()),
        };
        let result = result.and_then(|_| {
            fenced.map_err(|e| self.lost(call, self.right_rank(), format!("sending: {e}")))
        });
        if let Err(e) = &result {
            self.poisoned.get_or_insert_with(|| e.to_string());
        }
        result
    }

    fn lost(&self, call: Call, peer: usize, detail: String) -> CommError {
        if self.abort.is_aborted() {
            return CommError::Aborted {
                op: call.op,
                seq: call.seq,
                reason: self.abort.reason(),
            };
        }
        CommError::PeerLost {
            op: call.op,
            seq: call.seq,
            peer,
            detail,
        }
    }

    /// Receives exactly `buf.len()` bytes of data from the left neighbour: from the socket,
    /// or, with cross-memory attach, from the left's memory as its descriptors say.
    fn read_left(&mut self, call: Call, buf: &mut [u8]) -> Result<(), CommError> {
        let Some(pid) = self.left_cma_pid else {
            return self.read_left_bytes(call, buf);
        };
        let peer = self.left_rank();
        let mut filled = 0;
        while filled < buf.len() {
            if self.remote.1 == 0 {
                let mut d = [0u8; 16];
                self.read_left_bytes(call, &mut d)?;
                let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes"));
                let len = u64::from_le_bytes(d[8..].try_into().expect("8 bytes"));
                if len == 0 {
                    return Err(self.lost(call, peer, "empty chunk descriptor".into()));
                }
                self.remote = (addr, len);
            }
            let n = (buf.len() - filled).min(self.remote.1 as usize);
            if let Err(e) = cma::read(pid, self.remote.0, &mut buf[filled..filled + n]) {
                return Err(self.lost(call, peer, format!("reading its memory: {e}")));
            }
            self.remote.0 += n as u64;
            self.remote.1 -= n as u64;
            filled += n;
            if self.remote.1 == 0 {
                use std::io::Write;
                let left = self
                    .left
                    .as_mut()
                    .expect("a ring of two or more has a left peer");
                if let Err(e) = left.write_all(&[1]) {
                    return Err(self.lost(call, peer, format!("acknowledging: {e}")));
                }
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes from the left socket before the call's deadline.
    fn read_left_bytes(&mut self, call: Call, buf: &mut [u8]) -> Result<(), CommError> {
        let peer = self.left_rank();
        let left = self
            .left
            .as_mut()
            .expect("a ring of two or more has a left peer");
        let mut filled = 0;
        while filled < buf.len() {
            match left.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(self.lost(call, peer, "connection closed by the peer".into()));
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.abort.is_aborted() {
                        return Err(self.lost(call, peer, String::new()));
                    }
                    if Instant::now() >= call.deadline {
                        return Err(CommError::Timeout {
                            op: call.op,
                            seq: call.seq,
                            peer,
                            waited: self.timeout,
                        });
                    }
                }
                Err(e) => return Err(self.lost(call, peer, e.to_string())),
            }
        }
        Ok(())
    }

    /// Queues `bytes` for the right neighbour.
    ///
    /// # Safety
    /// `bytes` must stay valid and unwritten until the call's `finish` (which fences).
    unsafe fn send(&self, bytes: &[u8]) {
        if let Some(s) = &self.sender {
            // SAFETY: forwarded from the caller.
            unsafe { s.send(bytes) };
        }
    }

    /// Sends this call's header and checks the left neighbour's.
    fn exchange_header(
        &mut self,
        call: Call,
        dtype: DType,
        redop: u8,
        len: usize,
        root: usize,
    ) -> Result<(), CommError> {
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        h[4] = call.op.code();
        h[5] = dtype.code();
        h[6] = redop;
        h[8..16].copy_from_slice(&call.seq.to_le_bytes());
        h[16..24].copy_from_slice(&(len as u64).to_le_bytes());
        h[24..32].copy_from_slice(&(root as u64).to_le_bytes());
        h[32..40].copy_from_slice(&(self.cfg.world as u64).to_le_bytes());
        self.header_out = h;
        // SAFETY: header_out is not written again until finish() has fenced.
        unsafe {
            let p = self.header_out.as_ptr();
            self.send(std::slice::from_raw_parts(p, HEADER_BYTES));
        }
        let mut theirs = [0u8; HEADER_BYTES];
        self.read_left(call, &mut theirs)?;
        if theirs != h {
            let field = |b: &[u8; HEADER_BYTES], r: Range<usize>| {
                let mut x = [0u8; 8];
                x[..r.len()].copy_from_slice(&b[r]);
                u64::from_le_bytes(x)
            };
            let detail = if field(&theirs, 0..4) != HEADER_MAGIC as u64 {
                "it sent bytes that are not a call header (a protocol error)".to_owned()
            } else {
                format!(
                    "it is in call #{} (op code {}, dtype code {}, reduce code {}, length {}, root {}), this rank in #{} ({} of {len} {dtype:?}, root {root})",
                    field(&theirs, 8..16),
                    theirs[4],
                    theirs[5],
                    theirs[6],
                    field(&theirs, 16..24),
                    field(&theirs, 24..32),
                    call.seq,
                    call.op,
                )
            };
            return Err(CommError::Mismatch {
                op: call.op,
                seq: call.seq,
                peer: self.left_rank(),
                detail,
            });
        }
        Ok(())
    }

    /// The reduce-scatter phase on `[base, base+len)`; with `then_gather`, chunks of the final
    /// shard are queued for the all-gather phase as soon as they are reduced.
    ///
    /// # Safety
    /// `base` points to `len` valid elements that nothing else accesses during the call.
    unsafe fn reduce_scatter_phase<T: Element>(
        &mut self,
        call: Call,
        base: *mut T,
        len: usize,
        op: ReduceOp,
        then_gather: bool,
    ) -> Result<(), CommError> {
        let n = self.cfg.world;
        let r = self.cfg.rank;
        let esize = std::mem::size_of::<T>();
        let chunk = (self.cfg.chunk_bytes / esize).max(1);
        let seg = |s: usize| shard_range(len, n, s % n);
        // Step 0 sends shard r-1 whole.
        let first = seg(r + n - 1);
        // SAFETY: the shard is only read until the fence; nothing writes it in this phase.
        unsafe {
            let p = base.add(first.start) as *const u8;
            self.send(std::slice::from_raw_parts(p, first.len() * esize));
        }
        for t in 0..n - 1 {
            let recv = seg(r + 2 * n - 2 - t);
            let forward = t + 1 < n - 1 || then_gather;
            let mut start = recv.start;
            while start < recv.end {
                let end = (start + chunk).min(recv.end);
                let m = end - start;
                let mut scratch = std::mem::take(&mut self.scratch);
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch[..]);
                let res = self.read_left(call, &mut bytes[..m * esize]);
                if let Err(e) = res {
                    self.scratch = scratch;
                    return Err(e);
                }
                let theirs: &[T] = bytemuck::cast_slice(&bytes[..m * esize]);
                // SAFETY: [start, end) is disjoint from every range the sender may be reading
                // now (those were completed in earlier steps and are not written again).
                let mine = unsafe { std::slice::from_raw_parts_mut(base.add(start), m) };
                T::reduce(mine, theirs, op);
                self.scratch = scratch;
                if forward {
                    // SAFETY: this chunk is final for this phase; it is not written again.
                    unsafe {
                        self.send(std::slice::from_raw_parts(
                            base.add(start) as *const u8,
                            m * esize,
                        ))
                    };
                }
                start = end;
            }
        }
        Ok(())
    }

    /// The all-gather phase; with `own_queued`, this rank's shard was already queued.
    ///
    /// # Safety
    /// As [`TcpRing::reduce_scatter_phase`].
    unsafe fn all_gather_phase<T: Element>(
        &mut self,
        call: Call,
        base: *mut T,
        len: usize,
        own_queued: bool,
    ) -> Result<(), CommError> {
        let n = self.cfg.world;
        let r = self.cfg.rank;
        let esize = std::mem::size_of::<T>();
        let chunk = (self.cfg.chunk_bytes / esize).max(1);
        let seg = |s: usize| shard_range(len, n, s % n);
        if !own_queued {
            let own = seg(r);
            // SAFETY: this rank's shard is only read during this phase.
            unsafe {
                self.send(std::slice::from_raw_parts(
                    base.add(own.start) as *const u8,
                    own.len() * esize,
                ))
            };
        }
        for t in 0..n - 1 {
            let recv = seg(r + 2 * n - 1 - t);
            let forward = t + 1 < n - 1;
            let mut start = recv.start;
            while start < recv.end {
                let end = (start + chunk).min(recv.end);
                let m = end - start;
                // SAFETY: [start, end) is written once here and read by the sender only after.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(base.add(start) as *mut u8, m * esize)
                };
                self.read_left(call, dst)?;
                if forward {
                    // SAFETY: as above.
                    unsafe { self.send(dst) };
                }
                start = end;
            }
        }
        Ok(())
    }

    fn all_reduce_t<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<(), CommError> {
        let call = self.begin(Op::AllReduce)?;
        if self.cfg.world == 1 {
            return Ok(());
        }
        let len = buf.len();
        let base = buf.as_mut_ptr();
        let res = self
            .exchange_header(call, T::DTYPE, op.code(), len, 0)
            .and_then(|_| {
                // SAFETY: `buf` is exclusively borrowed for the call; only raw pointers derived
                // from `base` touch it until finish() fences.
                unsafe {
                    self.reduce_scatter_phase(call, base, len, op, true)?;
                    self.all_gather_phase(call, base, len, true)
                }
            });
        self.finish(call, res)?;
        if op == ReduceOp::Avg {
            T::scale_down(buf, self.cfg.world);
        }
        Ok(())
    }

    fn reduce_scatter_t<T: Element>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<Range<usize>, CommError> {
        let call = self.begin(Op::ReduceScatter)?;
        let mine = shard_range(buf.len(), self.cfg.world, self.cfg.rank);
        if self.cfg.world > 1 {
            let len = buf.len();
            let base = buf.as_mut_ptr();
            let res = self
                .exchange_header(call, T::DTYPE, op.code(), len, 0)
                // SAFETY: as in all_reduce_t.
                .and_then(|_| unsafe { self.reduce_scatter_phase(call, base, len, op, false) });
            self.finish(call, res)?;
        }
        if op == ReduceOp::Avg {
            T::scale_down(&mut buf[mine.clone()], self.cfg.world);
        }
        Ok(mine)
    }

    fn all_gather_t<T: Element>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        let call = self.begin(Op::AllGather)?;
        if self.cfg.world == 1 {
            return Ok(());
        }
        let len = buf.len();
        let base = buf.as_mut_ptr();
        let res = self
            .exchange_header(call, T::DTYPE, 0, len, 0)
            // SAFETY: as in all_reduce_t.
            .and_then(|_| unsafe { self.all_gather_phase(call, base, len, false) });
        self.finish(call, res)
    }

    fn broadcast_t<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        let call = self.begin(Op::Broadcast)?;
        if root >= self.cfg.world {
            return Err(CommError::InvalidArgument(format!(
                "broadcast root {root} is not below world size {}",
                self.cfg.world
            )));
        }
        if self.cfg.world == 1 {
            return Ok(());
        }
        let esize = std::mem::size_of::<T>();
        let chunk = (self.cfg.chunk_bytes / esize).max(1);
        let len = buf.len();
        let nbytes = std::mem::size_of_val(buf);
        let base = buf.as_mut_ptr();
        let forward = self.right_rank() != root;
        let is_root = self.cfg.rank == root;
        let res = self
            .exchange_header(call, T::DTYPE, 0, len, root)
            .and_then(|_| {
                if is_root {
                    // SAFETY: the root only reads its buffer during the call.
                    unsafe { self.send(std::slice::from_raw_parts(base as *const u8, nbytes)) };
                    return Ok(());
                }
                let mut start = 0;
                while start < len {
                    let end = (start + chunk).min(len);
                    // SAFETY: each chunk is written once, then only read by the sender.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            base.add(start) as *mut u8,
                            (end - start) * esize,
                        )
                    };
                    self.read_left(call, dst)?;
                    if forward {
                        // SAFETY: as above.
                        unsafe { self.send(dst) };
                    }
                    start = end;
                }
                Ok(())
            });
        self.finish(call, res)
    }
}

impl Communicator for TcpRing {
    fn rank(&self) -> usize {
        self.cfg.rank
    }

    fn world_size(&self) -> usize {
        self.cfg.world
    }

    fn seq(&self) -> u64 {
        self.seq
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            inner: self.abort.clone(),
        }
    }

    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        with_buf!(buf, b => self.all_reduce_t(b, op))
    }

    fn reduce_scatter(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<Range<usize>, CommError> {
        with_buf!(buf, b => self.reduce_scatter_t(b, op))
    }

    fn all_gather(&mut self, buf: BufMut<'_>) -> Result<(), CommError> {
        with_buf!(buf, b => self.all_gather_t(b))
    }

    fn broadcast(&mut self, buf: BufMut<'_>, root: usize) -> Result<(), CommError> {
        with_buf!(buf, b => self.broadcast_t(b, root))
    }

    fn barrier(&mut self) -> Result<(), CommError> {
        // A one-element all-reduce: nobody leaves before everybody has arrived.
        let call = self.begin(Op::Barrier)?;
        if self.cfg.world == 1 {
            return Ok(());
        }
        let mut one = [1.0f32];
        let base = one.as_mut_ptr();
        let res = self
            .exchange_header(call, DType::F32, 0, 1, 0)
            .and_then(|_| {
                // SAFETY: `one` lives until after finish().
                unsafe {
                    self.reduce_scatter_phase(call, base, 1, ReduceOp::Sum, true)?;
                    self.all_gather_phase(call, base, 1, true)
                }
            });
        self.finish(call, res)
    }
}

impl Drop for TcpRing {
    fn drop(&mut self) {
        // Every call fenced before returning, so the send thread is idle: close and join it.
        self.abort.close_sockets();
        drop(self.sender.take());
        drop(self.right.take());
    }
}
