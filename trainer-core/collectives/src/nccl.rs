//! `NcclComm`: collectives through NCCL on one CUDA device per rank, via cudarc (feature `cuda`).
//!
//! Rank 0 creates NCCL's unique id and publishes its 128 bytes in the bootstrap [`Store`] under
//! `{job_id}/{generation}/nccl-id` ([`nccl_id_key`]); the other ranks read it, and every rank
//! joins with `ncclCommInitRank` on its device. Two interfaces:
//! - [`Communicator`] over host buffers, with the same semantics as `TcpRing`: each call stages
//!   the buffer to the device, runs the NCCL collective on the communicator's stream, waits for
//!   it and copies the result back.
//! - Device buffers for the engines ([`NcclComm::all_reduce_device`] and friends): the
//!   collective is enqueued on [`NcclComm::stream`] and the call returns; cudarc's event
//!   tracking orders it after earlier work on the buffer made through the same `CudaContext`
//!   (use [`NcclComm::context`] / [`NcclComm::stream`] to allocate, or synchronize your own
//!   stream first). [`NcclComm::synchronize`] waits for it under the timeout and abort rules.
//!
//! Building and loading: cudarc is used with dynamic loading, so this builds without a CUDA
//! toolkit or NCCL on the build machine. The bindings are CUDA 12.8's (cudarc feature
//! `cuda-12080`; cudarc's build script reads `CUDARC_CUDA_VERSION` at build time only, and
//! nothing is detected at run time). At run time cudarc `dlopen`s the driver (`libcuda.so` /
//! `libcuda.so.1`) and NCCL at their first use; a driver of CUDA 12 or later has the entry
//! points used here. cudarc looks for NCCL as `libnccl.so` (and `libnccl.so.12`, `.11`, …) but
//! not as `libnccl.so.2`, the name NCCL installs (also in pip's `nvidia-nccl-cu12`/`-cu13`
//! wheels, under `site-packages/nvidia/nccl/lib/`): the trainer's `ringmaster-device` links it
//! under cudarc's name in a private folder and re-executes with that folder on
//! `LD_LIBRARY_PATH` (`bench/gpu-nccl.sh` does the same for the test binary).
//! [`NcclComm::connect`] checks that both libraries load and returns [`CommError::Bootstrap`]
//! instead of letting cudarc panic. NCCL 2.10 or later is needed (`ncclAvg`).
//!
//! Sequence numbers, timeouts, abort: every call bumps the sequence number, as in `TcpRing`,
//! but NCCL does not exchange it, so ranks in different calls hang (or compute garbage) instead
//! of failing with [`CommError::Mismatch`]. NCCL calls themselves cannot time out; this
//! communicator enforces the timeout and the [`AbortHandle`] itself by polling the completion
//! of each host-buffer call (and of [`NcclComm::synchronize`]) rather than blocking in CUDA: on
//! the deadline, or once the handle is aborted, it aborts the NCCL communicator
//! (`ncclCommAbort`, which stops its kernels) and fails with [`CommError::Aborted`] (NCCL does
//! not say which rank is late, so a timeout names no peer). An abort from another thread takes
//! effect at the next poll of a call in progress, or at the start of the next call. The
//! bootstrap (`ncclCommInitRank`) runs on a helper thread so that `connect` returns within its
//! timeout; a helper still blocked then is left behind (it ends, aborting its communicator, if
//! NCCL returns). Any error poisons the communicator, as in `TcpRing`.
//!
//! Host-buffer segmentation follows [`shard_range`] exactly although NCCL's `reduce_scatter`
//! and `all_gather` need equal shards: the device buffer is laid out as `world` blocks of
//! `ceil(len / world)` elements, block r holding host shard r followed by zero padding (one
//! element for the shards that are one shorter), so the native collectives run on the padded
//! buffer and shard r maps back exactly. When `world` divides `len` the layouts coincide and
//! nothing is padded. `Avg` is NCCL's own `ncclAvg`.

use std::ffi::{CStr, c_char};
use std::ops::Range;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DeviceRepr, DriverError, ValidAsZeroBits,
};
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, Id, NcclType};

use crate::element::{Element, ReduceOp};
use crate::store::Store;
use crate::{AbortHandle, BufMut, CommError, Communicator, Op, shard_range};

/// Size of NCCL's unique id, as published in the store.
pub const NCCL_ID_BYTES: usize = 128;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The store key under which rank 0 publishes NCCL's unique id for a job generation.
pub fn nccl_id_key(job_id: &str, generation: u64) -> String {
    format!("{job_id}/{generation}/nccl-id")
}

/// NCCL's unique id as bytes for the store.
fn encode_id(internal: &[c_char; NCCL_ID_BYTES]) -> Vec<u8> {
    internal.iter().map(|&c| c as u8).collect()
}

/// The unique id from the store's bytes.
fn decode_id(bytes: &[u8]) -> Result<[c_char; NCCL_ID_BYTES], String> {
    if bytes.len() != NCCL_ID_BYTES {
        return Err(format!(
            "the NCCL id in the store has {} bytes, not {NCCL_ID_BYTES}",
            bytes.len()
        ));
    }
    let mut id = [0 as c_char; NCCL_ID_BYTES];
    for (d, &b) in id.iter_mut().zip(bytes) {
        *d = b as c_char;
    }
    Ok(id)
}

fn nccl_op(op: ReduceOp) -> cudarc::nccl::ReduceOp {
    match op {
        ReduceOp::Sum => cudarc::nccl::ReduceOp::Sum,
        ReduceOp::Avg => cudarc::nccl::ReduceOp::Avg,
        ReduceOp::Max => cudarc::nccl::ReduceOp::Max,
    }
}

/// An NCCL error with NCCL's description and its last error message.
fn nccl_error_text(e: &NcclError) -> String {
    fn text(p: *const c_char) -> String {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: NCCL returns NUL-terminated strings that it owns and keeps alive (static
        // descriptions, and a per-thread last-error buffer not rewritten before we copy it).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
    let code = e.0;
    // SAFETY: both take plain values (ncclGetLastError ignores its communicator argument and
    // accepts null); they are only called after an NCCL call failed, so libnccl is loaded.
    // cudarc panics on a symbol the loaded NCCL lacks (ncclGetLastError is 2.13+): contained.
    let what =
        std::panic::catch_unwind(|| unsafe { text(cudarc::nccl::sys::ncclGetErrorString(code)) })
            .unwrap_or_default();
    let last = std::panic::catch_unwind(|| unsafe {
        text(cudarc::nccl::sys::ncclGetLastError(std::ptr::null_mut()))
    })
    .unwrap_or_default();
    let mut s = format!("{:?}", e.0);
    if !what.is_empty() {
        s.push_str(&format!(" ({what})"));
    }
    if !last.is_empty() {
        s.push_str(&format!(": {last}"));
    }
    s
}

/// Fails unless the CUDA driver and NCCL can be loaded (cudarc would panic at the first call).
fn check_libraries() -> Result<(), CommError> {
    // SAFETY: these only try to dlopen the candidate names and drop the handles.
    let (cuda, nccl) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::nccl::sys::is_culib_present(),
        )
    };
    if !cuda {
        return Err(CommError::Bootstrap(
            "the CUDA driver library (libcuda.so / libcuda.so.1) cannot be loaded: no NVIDIA \
             driver on this machine, or it is not on the loader's path"
                .into(),
        ));
    }
    if !nccl {
        return Err(CommError::Bootstrap(
            "NCCL cannot be loaded: cudarc looks for libnccl.so (not libnccl.so.2); put a \
             libnccl.so symlink to libnccl.so.2 in a folder named in LD_LIBRARY_PATH"
                .into(),
        ));
    }
    Ok(())
}

/// Device layout of a host buffer for NCCL's equal-shard `reduce_scatter` / `all_gather`:
/// `world` blocks of `block = ceil(len / world)` elements; block r holds host shard
/// `shard_range(len, world, r)` first, then zero padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PaddedShards {
    len: usize,
    world: usize,
    block: usize,
}

impl PaddedShards {
    fn new(len: usize, world: usize) -> PaddedShards {
        PaddedShards {
            len,
            world,
            block: len.div_ceil(world),
        }
    }

    fn padded_len(&self) -> usize {
        self.block * self.world
    }

    /// Whether the padded layout is the host layout itself (`world` divides `len`).
    fn is_identity(&self) -> bool {
        self.padded_len() == self.len
    }

    fn host(&self, rank: usize) -> Range<usize> {
        shard_range(self.len, self.world, rank)
    }

    fn device(&self, rank: usize) -> Range<usize> {
        let start = rank * self.block;
        start..start + self.host(rank).len()
    }

    /// The host buffer in the padded layout.
    fn pad<T: Copy + Default>(&self, host: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); self.padded_len()];
        for r in 0..self.world {
            out[self.device(r)].copy_from_slice(&host[self.host(r)]);
        }
        out
    }

    /// Copies every shard of a padded buffer back to the host layout.
    fn unpad<T: Copy>(&self, padded: &[T], host: &mut [T]) {
        for r in 0..self.world {
            host[self.host(r)].copy_from_slice(&padded[self.device(r)]);
        }
    }
}

/// An element type of the host-buffer interface, as NCCL and cudarc see it.
trait HostElement: Element + NcclType + DeviceRepr + ValidAsZeroBits + Default {}
impl<T: Element + NcclType + DeviceRepr + ValidAsZeroBits + Default> HostElement for T {}

/// cudarc's `Comm` holds a raw `ncclComm_t` and is therefore not `Send`.
struct CommCell(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `NcclComm` takes `&mut self` for every call and binds its CUDA context to the
// calling thread first, and the bootstrap thread hands the communicator over exactly once.
unsafe impl Send for CommCell {}

/// Per-call context for error messages.
#[derive(Clone, Copy)]
struct Call {
    op: Op,
    seq: u64,
    deadline: Instant,
}

/// Why a call failed (turned into a [`CommError`] by `NcclComm::finish`).
enum Fault {
    Cuda(&'static str, DriverError),
    Nccl(&'static str, NcclError),
    Aborted,
    TimedOut,
    Closed,
}

fn cuda(what: &'static str) -> impl FnOnce(DriverError) -> Fault {
    move |e| Fault::Cuda(what, e)
}

fn nccl(what: &'static str) -> impl FnOnce(NcclError) -> Fault {
    move |e| Fault::Nccl(what, e)
}

fn deadline_after(t: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(t)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// A rank's NCCL communicator on one CUDA device.
pub struct NcclComm {
    /// `None` once aborted (dropping cudarc's `Comm` calls `ncclCommAbort`).
    comm: Option<CommCell>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Recorded after each collective and polled for completion.
    done: CudaEvent,
    /// The barrier's one element.
    one: CudaSlice<f32>,
    rank: usize,
    world: usize,
    device: usize,
    seq: u64,
    /// The operation of the last call (for [`NcclComm::synchronize`]'s errors).
    last_op: Op,
    timeout: Duration,
    abort: AbortHandle,
    poisoned: Option<String>,
}

impl NcclComm {
    /// Joins the NCCL communicator of `job_id`'s `generation` as `rank` of `world`, on CUDA
    /// device `device`: rank 0 publishes NCCL's unique id under [`nccl_id_key`], the others
    /// read it; then every rank runs `ncclCommInitRank`, which returns once all have joined.
    /// The whole bootstrap must end within `bootstrap_timeout`. Collective calls then time out
    /// after 300 s unless [`Communicator::set_timeout`] says otherwise.
    ///
    /// # Errors
    /// Invalid rank/world, the CUDA driver or NCCL missing, a CUDA or NCCL failure, the id not
    /// published in time, or a rank that does not join in time.
    pub fn connect(
        job_id: &str,
        generation: u64,
        rank: usize,
        world: usize,
        device: usize,
        store: &dyn Store,
        bootstrap_timeout: Duration,
    ) -> Result<NcclComm, CommError> {
        if world == 0 || rank >= world {
            return Err(CommError::InvalidArgument(format!(
                "rank {rank} is not below world size {world}"
            )));
        }
        if i32::try_from(world).is_err() {
            return Err(CommError::InvalidArgument(format!(
                "world size {world} is too large for NCCL"
            )));
        }
        let deadline = deadline_after(bootstrap_timeout);
        check_libraries()?;
        let boot = |what: &str, e: DriverError| {
            CommError::Bootstrap(format!("{what} on CUDA device {device}: {e}"))
        };
        let ctx = CudaContext::new(device).map_err(|e| boot("creating the CUDA context", e))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| boot("creating a CUDA stream", e))?;
        let done = ctx
            .new_event(None)
            .map_err(|e| boot("creating a CUDA event", e))?;
        let one = stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| boot("allocating the barrier's element", e))?;

        let key = nccl_id_key(job_id, generation);
        let id = if rank == 0 {
            let id = Id::new().map_err(|e| {
                CommError::Bootstrap(format!(
                    "ncclGetUniqueId on device {device}: {}",
                    nccl_error_text(&e)
                ))
            })?;
            store.set(&key, &encode_id(id.internal()))?;
            id
        } else {
            let wait = deadline.saturating_duration_since(Instant::now());
            let bytes = store.get(&key, wait)?;
            Id::uninit(decode_id(&bytes).map_err(|e| CommError::Bootstrap(format!("{key}: {e}")))?)
        };

        let comm = init_comm(
            &ctx,
            &stream,
            rank,
            world,
            device,
            id,
            deadline,
            bootstrap_timeout,
        )?;
        Ok(NcclComm {
            comm: Some(comm),
            ctx,
            stream,
            done,
            one,
            rank,
            world,
            device,
            seq: 0,
            last_op: Op::Barrier,
            timeout: DEFAULT_TIMEOUT,
            abort: AbortHandle::new(),
            poisoned: None,
        })
    }

    /// The stream every collective of this communicator runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CUDA context (device `device()`'s primary context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The CUDA device ordinal.
    pub fn device(&self) -> usize {
        self.device
    }

    /// The timeout of each following call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `buf` reduced across all ranks, in place, on [`NcclComm::stream`]; returns once
    /// enqueued (see [`NcclComm::synchronize`]).
    ///
    /// # Errors
    /// A buffer on another device, an abort, an earlier error, or NCCL refusing the call.
    pub fn all_reduce_device<T: NcclType>(
        &mut self,
        buf: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let call = self.begin(Op::AllReduce)?;
        self.check_device(buf.ordinal())?;
        let res = self.comm().and_then(|c| {
            c.all_reduce_in_place(buf, &nccl_op(op))
                .map(drop)
                .map_err(nccl("ncclAllReduce"))
        });
        self.finish(call, res)
    }

    /// NCCL's reduce-scatter: `send` holds `world * recv.len()` elements; this rank receives
    /// the reduced block `rank` (equal blocks: the host interface's uneven `shard_range`
    /// split is its own business). Enqueued on [`NcclComm::stream`].
    ///
    /// # Errors
    /// Mismatched lengths, a buffer on another device, an abort, an earlier error, or NCCL
    /// refusing the call.
    pub fn reduce_scatter_device<T: NcclType>(
        &mut self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let call = self.begin(Op::ReduceScatter)?;
        self.check_device(send.ordinal())?;
        self.check_device(recv.ordinal())?;
        if Some(send.len()) != recv.len().checked_mul(self.world) {
            return Err(CommError::InvalidArgument(format!(
                "reduce_scatter_device: send has {} elements, not world size {} × recv's {}",
                send.len(),
                self.world,
                recv.len()
            )));
        }
        let res = self.comm().and_then(|c| {
            c.reduce_scatter(send, recv, &nccl_op(op))
                .map(drop)
                .map_err(nccl("ncclReduceScatter"))
        });
        self.finish(call, res)
    }

    /// NCCL's all-gather: `recv` (`world * send.len()` elements) gets every rank's `send`, in
    /// rank order. Enqueued on [`NcclComm::stream`].
    ///
    /// # Errors
    /// As [`NcclComm::reduce_scatter_device`].
    pub fn all_gather_device<T: NcclType>(
        &mut self,
        send: &CudaSlice<T>,
        recv: &mut CudaSlice<T>,
    ) -> Result<(), CommError> {
        let call = self.begin(Op::AllGather)?;
        self.check_device(send.ordinal())?;
        self.check_device(recv.ordinal())?;
        if Some(recv.len()) != send.len().checked_mul(self.world) {
            return Err(CommError::InvalidArgument(format!(
                "all_gather_device: recv has {} elements, not world size {} × send's {}",
                recv.len(),
                self.world,
                send.len()
            )));
        }
        let res = self.comm().and_then(|c| {
            c.all_gather(send, recv)
                .map(drop)
                .map_err(nccl("ncclAllGather"))
        });
        self.finish(call, res)
    }

    /// `root`'s `buf` copied to every rank, in place. Enqueued on [`NcclComm::stream`].
    ///
    /// # Errors
    /// A root not below the world size, otherwise as [`NcclComm::all_reduce_device`].
    pub fn broadcast_device<T: NcclType>(
        &mut self,
        buf: &mut CudaSlice<T>,
        root: usize,
    ) -> Result<(), CommError> {
        let call = self.begin(Op::Broadcast)?;
        self.check_device(buf.ordinal())?;
        self.check_root(root)?;
        let res = self.comm().and_then(|c| {
            c.broadcast_in_place(buf, root as i32)
                .map(drop)
                .map_err(nccl("ncclBroadcast"))
        });
        self.finish(call, res)
    }

    /// Waits for everything enqueued on [`NcclComm::stream`] so far, under the timeout and the
    /// abort handle (errors name the last call).
    ///
    /// # Errors
    /// The timeout (the communicator is then aborted), an abort, an earlier error, or a CUDA
    /// error of the enqueued work.
    pub fn synchronize(&mut self) -> Result<(), CommError> {
        let op = self.last_op;
        let call = Call {
            op,
            seq: self.seq,
            deadline: deadline_after(self.timeout),
        };
        self.check_usable(call)?;
        let res = self.wait(call);
        self.finish(call, res)
    }

    /// Starts a call: bumps the sequence number, checks abort and poison, binds the context.
    fn begin(&mut self, op: Op) -> Result<Call, CommError> {
        self.seq += 1;
        self.last_op = op;
        let call = Call {
            op,
            seq: self.seq,
            deadline: deadline_after(self.timeout),
        };
        self.check_usable(call)?;
        let bound = self.ctx.bind_to_thread();
        let res = bound.map_err(cuda("binding the CUDA context to this thread"));
        self.finish(call, res)?;
        Ok(call)
    }

    fn check_usable(&mut self, call: Call) -> Result<(), CommError> {
        if self.abort.is_aborted() {
            self.kill(self.abort.reason());
            return Err(CommError::Aborted {
                op: call.op,
                seq: call.seq,
                reason: self.abort.reason(),
            });
        }
        if let Some(p) = &self.poisoned {
            return Err(CommError::Poisoned(p.clone()));
        }
        Ok(())
    }

    fn check_device(&self, ordinal: usize) -> Result<(), CommError> {
        if ordinal != self.device {
            return Err(CommError::InvalidArgument(format!(
                "a buffer on CUDA device {ordinal} given to the NCCL communicator of device {}",
                self.device
            )));
        }
        Ok(())
    }

    fn check_root(&self, root: usize) -> Result<(), CommError> {
        if root >= self.world {
            return Err(CommError::InvalidArgument(format!(
                "broadcast root {root} is not below world size {}",
                self.world
            )));
        }
        Ok(())
    }

    fn comm(&self) -> Result<&Comm, Fault> {
        self.comm.as_ref().map(|c| &c.0).ok_or(Fault::Closed)
    }

    /// Polls the completion of the work enqueued so far until the call's deadline or an abort;
    /// on either, aborts the NCCL communicator at once (before the call's device buffers are
    /// freed behind the stuck kernels).
    fn wait(&mut self, call: Call) -> Result<(), Fault> {
        self.done
            .record(&self.stream)
            .map_err(cuda("recording a completion event"))?;
        let mut polls = 0u32;
        loop {
            match self.done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(Fault::Cuda("running the collective", e)),
            }
            let fault = if self.abort.is_aborted() {
                Fault::Aborted
            } else if Instant::now() >= call.deadline {
                Fault::TimedOut
            } else {
                polls = polls.saturating_add(1);
                if polls < 256 {
                    std::hint::spin_loop();
                } else if polls < 512 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(Duration::from_micros(50));
                }
                continue;
            };
            self.kill(String::new());
            return Err(fault);
        }
    }

    /// Aborts the NCCL communicator (if not yet) and poisons this one with `reason` (if
    /// given and not yet poisoned).
    fn kill(&mut self, reason: String) {
        if !reason.is_empty() {
            self.poisoned.get_or_insert(reason);
        }
        if let Some(c) = self.comm.take() {
            // cudarc's Drop calls ncclCommAbort and panics if that fails: contain it.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(c)));
        }
    }

    /// Ends a call: a fault aborts the NCCL communicator and poisons this one.
    fn finish<R>(&mut self, call: Call, res: Result<R, Fault>) -> Result<R, CommError> {
        let fault = match res {
            Ok(r) => return Ok(r),
            Err(f) => f,
        };
        let (op, seq) = (call.op, call.seq);
        let err = match fault {
            Fault::Cuda(what, e) => CommError::Poisoned(format!(
                "{op} #{seq}: {what} on CUDA device {}: {e}",
                self.device
            )),
            Fault::Nccl(what, e) => CommError::Poisoned(format!(
                "{op} #{seq}: {what} on CUDA device {}: {}",
                self.device,
                nccl_error_text(&e)
            )),
            Fault::Aborted => CommError::Aborted {
                op,
                seq,
                reason: self.abort.reason(),
            },
            Fault::TimedOut => CommError::Aborted {
                op,
                seq,
                reason: format!(
                    "not complete within {:?} (NCCL does not say which rank is late); the NCCL \
                     communicator was aborted",
                    self.timeout
                ),
            },
            Fault::Closed => CommError::Poisoned(
                self.poisoned
                    .clone()
                    .unwrap_or_else(|| "the NCCL communicator was aborted".to_owned()),
            ),
        };
        self.kill(err.to_string());
        Err(err)
    }

    fn all_reduce_t<T: HostElement>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let call = self.begin(Op::AllReduce)?;
        if buf.is_empty() {
            return Ok(());
        }
        let res = self.all_reduce_inner(call, buf, op);
        self.finish(call, res)
    }

    fn all_reduce_inner<T: HostElement>(
        &mut self,
        call: Call,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<(), Fault> {
        let mut dev = self
            .stream
            .clone_htod(buf)
            .map_err(cuda("copying the buffer to the device"))?;
        self.comm()?
            .all_reduce_in_place(&mut dev, &nccl_op(op))
            .map_err(nccl("ncclAllReduce"))?;
        self.wait(call)?;
        self.download(&dev, buf)
    }

    fn reduce_scatter_t<T: HostElement>(
        &mut self,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<Range<usize>, CommError> {
        let call = self.begin(Op::ReduceScatter)?;
        let mine = shard_range(buf.len(), self.world, self.rank);
        if buf.is_empty() {
            return Ok(mine);
        }
        let res = self.reduce_scatter_inner(call, buf, op, mine.clone());
        self.finish(call, res)?;
        Ok(mine)
    }

    /// The rest of `buf` (outside this rank's shard) is left as it was.
    fn reduce_scatter_inner<T: HostElement>(
        &mut self,
        call: Call,
        buf: &mut [T],
        op: ReduceOp,
        mine: Range<usize>,
    ) -> Result<(), Fault> {
        let layout = PaddedShards::new(buf.len(), self.world);
        let upload = if layout.is_identity() {
            self.stream.clone_htod(buf)
        } else {
            self.stream.clone_htod(&layout.pad(buf))
        };
        let send = upload.map_err(cuda("copying the buffer to the device"))?;
        let mut recv = self
            .stream
            .alloc_zeros::<T>(layout.block)
            .map_err(cuda("allocating the received shard"))?;
        self.comm()?
            .reduce_scatter(&send, &mut recv, &nccl_op(op))
            .map_err(nccl("ncclReduceScatter"))?;
        self.wait(call)?;
        if mine.is_empty() {
            return Ok(());
        }
        self.download(&recv.slice(0..mine.len()), &mut buf[mine])
    }

    fn all_gather_t<T: HostElement>(&mut self, buf: &mut [T]) -> Result<(), CommError> {
        let call = self.begin(Op::AllGather)?;
        if buf.is_empty() {
            return Ok(());
        }
        let res = self.all_gather_inner(call, buf);
        self.finish(call, res)
    }

    fn all_gather_inner<T: HostElement>(&mut self, call: Call, buf: &mut [T]) -> Result<(), Fault> {
        let layout = PaddedShards::new(buf.len(), self.world);
        let mine = layout.host(self.rank);
        let mut send = self
            .stream
            .alloc_zeros::<T>(layout.block)
            .map_err(cuda("allocating this rank's shard"))?;
        if !mine.is_empty() {
            self.stream
                .memcpy_htod(&buf[mine.clone()], &mut send.slice_mut(0..mine.len()))
                .map_err(cuda("copying this rank's shard to the device"))?;
        }
        let mut recv = self
            .stream
            .alloc_zeros::<T>(layout.padded_len())
            .map_err(cuda("allocating the gathered buffer"))?;
        self.comm()?
            .all_gather(&send, &mut recv)
            .map_err(nccl("ncclAllGather"))?;
        self.wait(call)?;
        if layout.is_identity() {
            self.download(&recv, buf)
        } else {
            let mut padded = vec![T::default(); layout.padded_len()];
            self.download(&recv, &mut padded)?;
            layout.unpad(&padded, buf);
            Ok(())
        }
    }

    fn broadcast_t<T: HostElement>(&mut self, buf: &mut [T], root: usize) -> Result<(), CommError> {
        let call = self.begin(Op::Broadcast)?;
        self.check_root(root)?;
        if buf.is_empty() {
            return Ok(());
        }
        let res = self.broadcast_inner(call, buf, root);
        self.finish(call, res)
    }

    fn broadcast_inner<T: HostElement>(
        &mut self,
        call: Call,
        buf: &mut [T],
        root: usize,
    ) -> Result<(), Fault> {
        let upload = if self.rank == root {
            self.stream.clone_htod(buf)
        } else {
            self.stream.alloc_zeros::<T>(buf.len())
        };
        let mut dev = upload.map_err(cuda("copying the buffer to the device"))?;
        self.comm()?
            .broadcast_in_place(&mut dev, root as i32)
            .map_err(nccl("ncclBroadcast"))?;
        self.wait(call)?;
        if self.rank == root {
            return Ok(());
        }
        self.download(&dev, buf)
    }

    /// Device → host, then waits for the copy (all earlier work on the stream is complete).
    fn download<T: HostElement, S: cudarc::driver::DevicePtr<T>>(
        &self,
        src: &S,
        dst: &mut [T],
    ) -> Result<(), Fault> {
        self.stream
            .memcpy_dtoh(src, dst)
            .map_err(cuda("copying the result to the host"))?;
        self.stream
            .synchronize()
            .map_err(cuda("copying the result to the host"))
    }
}

/// `ncclCommInitRank` on a helper thread, so that a rank that never joins cannot block past
/// `deadline`.
#[allow(clippy::too_many_arguments)]
fn init_comm(
    ctx: &Arc<CudaContext>,
    stream: &Arc<CudaStream>,
    rank: usize,
    world: usize,
    device: usize,
    id: Id,
    deadline: Instant,
    bootstrap_timeout: Duration,
) -> Result<CommCell, CommError> {
    let (tx, rx) = mpsc::channel::<Result<CommCell, String>>();
    let (ctx2, stream2) = (ctx.clone(), stream.clone());
    std::thread::Builder::new()
        .name(format!("nccl-init-{rank}"))
        .spawn(move || {
            let res = match ctx2.bind_to_thread() {
                Err(e) => Err(format!("binding the CUDA context: {e}")),
                Ok(()) => Comm::from_rank(stream2, rank, world, id)
                    .map(CommCell)
                    .map_err(|e| nccl_error_text(&e)),
            };
            // If connect gave up, the communicator is dropped here (ncclCommAbort).
            let _ = tx.send(res);
        })
        .map_err(|e| CommError::Bootstrap(format!("starting the NCCL init thread: {e}")))?;
    let wait = deadline.saturating_duration_since(Instant::now());
    match rx.recv_timeout(wait) {
        Ok(Ok(comm)) => Ok(comm),
        Ok(Err(e)) => Err(CommError::Bootstrap(format!(
            "NCCL init of rank {rank} of {world} on device {device}: {e}"
        ))),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(CommError::Bootstrap(format!(
            "NCCL init of rank {rank} of {world} on device {device} did not complete within \
             {bootstrap_timeout:?} (did every rank join?)"
        ))),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(CommError::Bootstrap(format!(
            "NCCL init of rank {rank} of {world} on device {device}: the init thread panicked"
        ))),
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn seq(&self) -> u64 {
        self.seq
    }

    fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        with_buf!(buf, b => self.all_reduce_t(b, op))
    }

    /// As the trait says, except that the rest of `buf` is left as it was (not partial sums).
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
        // A one-element all-reduce on the device: nobody leaves before everybody has arrived.
        let call = self.begin(Op::Barrier)?;
        let res = match self.comm.as_ref() {
            None => Err(Fault::Closed),
            Some(c) => {
                c.0.all_reduce_in_place(&mut self.one, &cudarc::nccl::ReduceOp::Sum)
                    .map(drop)
                    .map_err(nccl("ncclAllReduce"))
            }
        }
        .and_then(|()| self.wait(call));
        self.finish(call, res)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Let work enqueued through the device interface finish (within the timeout) before
        // cudarc's Drop aborts the NCCL communicator.
        if self.poisoned.is_none() && !self.abort.is_aborted() && self.comm.is_some() {
            let call = Call {
                op: self.last_op,
                seq: self.seq,
                deadline: deadline_after(self.timeout),
            };
            let _ = self.wait(call);
        }
        self.kill(String::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    #[test]
    fn id_key_and_encoding() {
        assert_eq!(nccl_id_key("job-a", 3), "job-a/3/nccl-id");
        let mut id = [0 as c_char; NCCL_ID_BYTES];
        for (i, c) in id.iter_mut().enumerate() {
            *c = (i as u8).wrapping_mul(37) as c_char;
        }
        let bytes = encode_id(&id);
        assert_eq!(bytes.len(), NCCL_ID_BYTES);
        assert_eq!(decode_id(&bytes).unwrap(), id);
        assert!(decode_id(&bytes[..127]).unwrap_err().contains("127 bytes"));
    }

    #[test]
    fn padded_layout_maps_shard_range() {
        for len in [0usize, 1, 2, 3, 7, 8, 9, 10, 1000, 1_000_003] {
            for world in 1..=9 {
                let l = PaddedShards::new(len, world);
                assert_eq!(l.padded_len() % world, 0);
                assert!(l.padded_len() >= len && l.padded_len() < len + world);
                assert_eq!(l.is_identity(), len % world == 0);
                for r in 0..world {
                    let (h, d) = (l.host(r), l.device(r));
                    assert_eq!(h, shard_range(len, world, r));
                    assert_eq!(h.len(), d.len());
                    assert!(d.start >= r * l.block && d.end <= (r + 1) * l.block);
                    if l.is_identity() {
                        assert_eq!(h, d);
                    }
                }
                let host: Vec<u32> = (1..=len as u32).collect();
                let padded = l.pad(&host);
                // Padding is zero, every element appears once.
                assert_eq!(
                    padded.iter().filter(|&&x| x == 0).count(),
                    l.padded_len() - len
                );
                let mut back = vec![0u32; len];
                l.unpad(&padded, &mut back);
                assert_eq!(back, host);
            }
        }
    }

    /// NCCL's equal-block reduce-scatter and all-gather, simulated on the padded layout, give
    /// the host interface's `shard_range` semantics.
    #[test]
    fn padded_collectives_match_host_semantics() {
        for len in [1usize, 5, 10, 17, 64] {
            for world in 1..=6 {
                let l = PaddedShards::new(len, world);
                let inputs: Vec<Vec<f32>> = (0..world)
                    .map(|r| (0..len).map(|i| (i * 10 + r) as f32).collect())
                    .collect();
                let sum: Vec<f32> = (0..len)
                    .map(|i| inputs.iter().map(|v| v[i]).sum())
                    .collect();
                let padded: Vec<Vec<f32>> = inputs.iter().map(|v| l.pad(v)).collect();
                for r in 0..world {
                    // ncclReduceScatter: rank r receives the sum of block r.
                    let block = r * l.block..(r + 1) * l.block;
                    let recv: Vec<f32> = block.map(|j| padded.iter().map(|p| p[j]).sum()).collect();
                    let mine = shard_range(len, world, r);
                    assert_eq!(&recv[..mine.len()], &sum[mine.clone()]);
                }
                // ncclAllGather of each rank's block (its shard, then zeros).
                let mut gathered = Vec::new();
                for r in 0..world {
                    let mut send = vec![0f32; l.block];
                    let mine = l.host(r);
                    send[..mine.len()].copy_from_slice(&sum[mine]);
                    gathered.extend_from_slice(&send);
                }
                let mut out = vec![-1f32; len];
                l.unpad(&gathered, &mut out);
                assert_eq!(out, sum);
            }
        }
    }

    #[test]
    fn reduce_ops_and_abort_flag() {
        assert!(matches!(
            nccl_op(ReduceOp::Sum),
            cudarc::nccl::ReduceOp::Sum
        ));
        assert!(matches!(
            nccl_op(ReduceOp::Avg),
            cudarc::nccl::ReduceOp::Avg
        ));
        assert!(matches!(
            nccl_op(ReduceOp::Max),
            cudarc::nccl::ReduceOp::Max
        ));
        let a = AbortHandle::new();
        let b = AbortHandle::new();
        assert!(!a.is_aborted());
        a.clone().abort("test");
        assert!(a.is_aborted());
        assert!(!b.is_aborted(), "each communicator has its own flag");
    }

    #[test]
    fn connect_rejects_bad_ranks_before_touching_cuda() {
        let store = MemStore::new();
        for (rank, world) in [(0, 0), (2, 2)] {
            let err = NcclComm::connect("j", 0, rank, world, 0, &store, Duration::ZERO)
                .err()
                .unwrap();
            assert!(matches!(err, CommError::InvalidArgument(_)), "{err}");
        }
    }

    fn check_host_collectives<T>(
        comm: &mut NcclComm,
        from_f32: fn(f32) -> T,
        make: impl Fn(&mut [T]) -> BufMut<'_>,
    ) where
        T: HostElement + PartialEq + std::fmt::Debug,
    {
        for len in [0usize, 1, 1_000_003] {
            let input: Vec<T> = (0..len)
                .map(|i| from_f32((i % 2001) as f32 * 0.25 - 250.0))
                .collect();
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                let mut b = input.clone();
                comm.all_reduce(make(&mut b), op).unwrap();
                assert_eq!(b, input, "all_reduce {op:?} of {len}");
                let mut b = input.clone();
                let r = comm.reduce_scatter(make(&mut b), op).unwrap();
                assert_eq!(r, 0..len);
                assert_eq!(b, input, "reduce_scatter {op:?} of {len}");
            }
            let mut b = input.clone();
            comm.all_gather(make(&mut b)).unwrap();
            assert_eq!(b, input, "all_gather of {len}");
            let mut b = input.clone();
            comm.broadcast(make(&mut b), 0).unwrap();
            assert_eq!(b, input, "broadcast of {len}");
            let err = comm.broadcast(make(&mut b), 1).unwrap_err();
            assert!(matches!(err, CommError::InvalidArgument(_)), "{err}");
            comm.barrier().unwrap();
        }
    }

    /// World size 1 on GPU 0: cudarc loading, NCCL init from an id shipped through the store,
    /// and each collective's plumbing. Needs a GPU and libnccl.so (see bench/gpu-nccl.sh).
    #[test]
    #[ignore = "needs a CUDA GPU and NCCL"]
    fn nccl_world_size_one_on_gpu0() {
        let store = MemStore::new();
        let mut comm =
            NcclComm::connect("gpu-test", 7, 0, 1, 0, &store, Duration::from_secs(120)).unwrap();
        let id = store
            .get(&nccl_id_key("gpu-test", 7), Duration::ZERO)
            .unwrap();
        assert_eq!(id.len(), NCCL_ID_BYTES);
        assert_eq!((comm.rank(), comm.world_size(), comm.device()), (0, 1, 0));
        comm.set_timeout(Duration::from_secs(60));

        check_host_collectives::<f32>(&mut comm, |x| x, |b| BufMut::F32(b));
        check_host_collectives(&mut comm, half::bf16::from_f32, |b| BufMut::Bf16(b));
        check_host_collectives(&mut comm, half::f16::from_f32, |b| BufMut::F16(b));
        let seq = comm.seq();
        assert_eq!(seq, 3 * 3 * (6 + 4));

        // Device buffers.
        let host: Vec<f32> = (0..4099).map(|i| i as f32 - 17.0).collect();
        let stream = comm.stream().clone();
        let mut d = stream.clone_htod(&host).unwrap();
        comm.all_reduce_device(&mut d, ReduceOp::Sum).unwrap();
        comm.synchronize().unwrap();
        assert_eq!(stream.clone_dtoh(&d).unwrap(), host);
        let mut recv = stream.alloc_zeros::<f32>(host.len()).unwrap();
        comm.reduce_scatter_device(&d, &mut recv, ReduceOp::Avg)
            .unwrap();
        let mut gathered = stream.alloc_zeros::<f32>(host.len()).unwrap();
        comm.all_gather_device(&recv, &mut gathered).unwrap();
        comm.broadcast_device(&mut gathered, 0).unwrap();
        comm.synchronize().unwrap();
        assert_eq!(stream.clone_dtoh(&gathered).unwrap(), host);
        let mut short = stream.alloc_zeros::<f32>(3).unwrap();
        let err = comm.all_gather_device(&d, &mut short).unwrap_err();
        assert!(matches!(err, CommError::InvalidArgument(_)), "{err}");
        assert_eq!(comm.seq(), seq + 5);

        // Abort: later calls fail at once.
        comm.abort_handle().abort("test over");
        let mut one = [1.0f32];
        let err = comm
            .all_reduce(BufMut::F32(&mut one), ReduceOp::Sum)
            .unwrap_err();
        assert!(matches!(err, CommError::Aborted { .. }), "{err}");
        assert!(comm.barrier().is_err());
    }
}
