//! Per-step progress to the coordinator (RendezvousService.ReportProgress, one client stream
//! per trainer), which `ringctl status` shows and which names a lagging rank. Sending never
//! blocks training: reports go through a bounded channel to a background thread and are dropped
//! when it is full or the coordinator cannot be reached.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringmaster_collectives::{AbortHandle, BufMut, CommError, Communicator, ReduceOp};
use ringmaster_proto as pb;
use tokio::sync::mpsc;

/// One step's report.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    /// Optimizer steps done.
    pub step: u64,
    /// Steps of the run.
    pub total_steps: u64,
    /// Loss of the step (global mean).
    pub loss: Option<f64>,
    /// Tokens per second (all ranks).
    pub tokens_per_second: f64,
    /// Resident memory of this process.
    pub memory_bytes: u64,
    /// Collective calls issued so far.
    pub collective_seq: u64,
    /// Seconds of the step spent computing.
    pub compute_seconds: f64,
    /// Seconds of the step spent waiting in collectives.
    pub collective_wait_seconds: f64,
    /// The step's global gradient norm before clipping, when computed.
    pub grad_norm: Option<f64>,
}

/// Sends [`StepReport`]s of one rank to the coordinator. The stream reconnects (every second)
/// when the coordinator goes away, and the checkpoint and resume facts ride on every report, so
/// a coordinator restarted mid-run learns of a checkpoint committed while it was down.
pub struct ProgressReporter {
    tx: Option<mpsc::Sender<pb::Progress>>,
    scope: pb::Scope,
    rank: u32,
    last: Arc<Mutex<Option<pb::Progress>>>,
    sticky: Arc<Mutex<Sticky>>,
    done: std::sync::mpsc::Receiver<()>,
    /// Aborted when the coordinator ends this generation on a failure.
    aborts: Arc<Mutex<Vec<AbortHandle>>>,
}

/// Facts every report carries once known.
#[derive(Default, Clone)]
struct Sticky {
    committed: Option<pb::CheckpointRef>,
    resume: Option<pb::ResumeReport>,
    device: String,
    flops_per_token: f64,
    peak_flops: f64,
}

impl Sticky {
    fn apply(&self, p: &mut pb::Progress) {
        p.committed_checkpoint = self.committed.clone();
        p.resume = self.resume.clone();
        p.device.clone_from(&self.device);
        p.model_flops_per_token = self.flops_per_token;
        p.peak_flops = self.peak_flops;
    }
}

/// The receiving half of the report queue as a stream that can be handed to one RPC after
/// another: a broken stream gives the queue back.
struct Shared(Arc<Mutex<mpsc::Receiver<pb::Progress>>>);

impl tokio_stream::Stream for Shared {
    type Item = pb::Progress;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<pb::Progress>> {
        match self.0.lock() {
            Ok(mut rx) => rx.poll_recv(cx),
            Err(_) => std::task::Poll::Ready(None),
        }
    }
}

/// A communicator that publishes the sequence number of the call it is in (or last made) at
/// the start of every call, so that a heartbeat can report it while the call blocks: when one
/// rank hangs, the others are already inside the next collective and the hung rank is the one
/// whose number stays behind (the coordinator names it as the lagging rank).
pub struct Tracked {
    inner: Box<dyn Communicator>,
    seq: Arc<AtomicU64>,
}

impl Tracked {
    /// Wraps `inner`; the handle reads the published sequence number.
    pub fn new(inner: Box<dyn Communicator>) -> (Self, Arc<AtomicU64>) {
        let seq = Arc::new(AtomicU64::new(inner.seq()));
        (
            Tracked {
                inner,
                seq: seq.clone(),
            },
            seq,
        )
    }

    fn starting(&self) {
        self.seq.store(self.inner.seq() + 1, Ordering::Relaxed);
    }
}

impl Communicator for Tracked {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn seq(&self) -> u64 {
        self.inner.seq()
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.inner.set_timeout(timeout);
    }
    fn abort_handle(&self) -> AbortHandle {
        self.inner.abort_handle()
    }
    fn all_reduce(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        self.starting();
        self.inner.all_reduce(buf, op)
    }
    fn reduce_scatter(&mut self, buf: BufMut<'_>, op: ReduceOp) -> Result<Range<usize>, CommError> {
        self.starting();
        self.inner.reduce_scatter(buf, op)
    }
    fn all_gather(&mut self, buf: BufMut<'_>) -> Result<(), CommError> {
        self.starting();
        self.inner.all_gather(buf)
    }
    fn broadcast(&mut self, buf: BufMut<'_>, root: usize) -> Result<(), CommError> {
        self.starting();
        self.inner.broadcast(buf, root)
    }
    fn barrier(&mut self) -> Result<(), CommError> {
        self.starting();
        self.inner.barrier()
    }
}

impl ProgressReporter {
    /// A reporter when the trainer runs under an agent (`RINGMASTER_COORDINATOR` set).
    pub fn from_env(rank: usize) -> Option<Self> {
        let addr = std::env::var("RINGMASTER_COORDINATOR")
            .ok()
            .filter(|a| !a.is_empty())?;
        let job_id = std::env::var("RINGMASTER_JOB_ID").unwrap_or_default();
        let generation = std::env::var("RINGMASTER_GENERATION")
            .ok()
            .and_then(|g| g.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::channel::<pb::Progress>(64);
        let (done_tx, done) = std::sync::mpsc::channel();
        let aborts = Arc::new(Mutex::new(Vec::new()));
        let to_abort = aborts.clone();
        std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(send_loop(addr, rx, to_abort));
                let _ = done_tx.send(());
            })
            .ok()?;
        Some(ProgressReporter {
            tx: Some(tx),
            scope: pb::Scope { job_id, generation },
            rank: rank as u32,
            last: Arc::new(Mutex::new(None)),
            sticky: Arc::new(Mutex::new(Sticky::default())),
            done,
            aborts,
        })
    }

    /// Aborts `handle` (every pending and later call fails at once) when the coordinator ends
    /// this generation on a failure elsewhere: a rank waiting on a peer that is gone stops now
    /// rather than at its collective timeout.
    pub fn abort_on_generation_end(&self, handle: AbortHandle) {
        if let Ok(mut a) = self.aborts.lock() {
            a.push(handle);
        }
    }

    /// Every `period`, re-sends the last report with the sequence number `seq` holds now (see
    /// [`Tracked`]), until the reporter is finished or dropped.
    pub fn start_heartbeat(&self, seq: Arc<AtomicU64>, period: Duration) {
        let Some(tx) = self.tx.as_ref().map(|t| t.downgrade()) else {
            return;
        };
        let last = self.last.clone();
        let sticky = self.sticky.clone();
        let base = pb::Progress {
            scope: Some(self.scope.clone()),
            rank: self.rank,
            ..Default::default()
        };
        let _ = std::thread::Builder::new()
            .name("progress-heartbeat".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    let mut p = last
                        .lock()
                        .map(|l| l.clone())
                        .unwrap_or(None)
                        .unwrap_or_else(|| base.clone());
                    p.collective_seq = seq.load(Ordering::Relaxed);
                    if let Ok(s) = sticky.lock() {
                        s.apply(&mut p);
                    }
                    let Some(tx) = tx.upgrade() else {
                        return;
                    };
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(p) {
                        return;
                    }
                }
            });
    }

    /// Queues a report (dropped if the queue is full).
    pub fn report(&self, r: StepReport) {
        let mut p = pb::Progress {
            scope: Some(self.scope.clone()),
            rank: self.rank,
            step: r.step,
            total_steps: r.total_steps,
            loss: r.loss,
            tokens_per_second: r.tokens_per_second,
            memory_bytes: r.memory_bytes,
            collective_seq: r.collective_seq,
            compute_seconds: r.compute_seconds,
            collective_wait_seconds: r.collective_wait_seconds,
            grad_norm: r.grad_norm.filter(|g| g.is_finite()),
            ..Default::default()
        };
        if let Ok(s) = self.sticky.lock() {
            s.apply(&mut p);
        }
        if let Ok(mut l) = self.last.lock() {
            *l = Some(p.clone());
        }
        self.send(p);
    }

    fn send(&self, p: pb::Progress) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(p);
        }
    }

    /// Re-sends the last report (or an empty one) with the sticky facts updated by `f`.
    fn update(&self, f: impl FnOnce(&mut Sticky)) {
        let Ok(mut s) = self.sticky.lock() else {
            return;
        };
        f(&mut s);
        let mut p = self
            .last
            .lock()
            .map(|l| l.clone())
            .unwrap_or(None)
            .unwrap_or_else(|| pb::Progress {
                scope: Some(self.scope.clone()),
                rank: self.rank,
                ..Default::default()
            });
        s.apply(&mut p);
        drop(s);
        if let Ok(mut l) = self.last.lock() {
            *l = Some(p.clone());
        }
        self.send(p);
    }

    /// Where this rank computes (`cpu`, `cuda:0`), carried by every report from now on.
    pub fn set_device(&self, label: &str) {
        let label = label.to_owned();
        if let Ok(mut s) = self.sticky.lock() {
            s.device = label;
        }
    }

    /// MFU's inputs, carried by every report from now on: the model FLOPs of one trained token
    /// and this rank's peak FLOP/s (`None`: not known, the job shows no MFU).
    pub fn set_flops(&self, per_token: f64, peak: Option<f64>) {
        if let Ok(mut s) = self.sticky.lock() {
            s.flops_per_token = per_token;
            s.peak_flops = peak.unwrap_or(0.0);
        }
    }

    /// Rank 0: every rank's shard of the checkpoint at `dir` is written and the commit marker is
    /// down, having taken `timings`. The coordinator records it as the job's last checkpoint.
    pub fn checkpoint_committed(
        &self,
        step: u64,
        dir: &std::path::Path,
        timings: crate::train::checkpoint::SaveTimings,
    ) {
        let path = std::path::absolute(dir)
            .unwrap_or_else(|_| dir.to_path_buf())
            .display()
            .to_string();
        self.update(|s| {
            s.committed = Some(pb::CheckpointRef {
                step,
                path,
                save_seconds: timings.save.as_secs_f64(),
                commit_seconds: timings.commit.as_secs_f64(),
            })
        });
    }

    /// Rank 0: where this generation started from, and the checkpoints it passed over.
    pub fn resumed(&self, from: Option<(u64, &std::path::Path)>, skipped: Vec<String>) {
        let from = from.map(|(step, dir)| pb::CheckpointRef {
            step,
            path: std::path::absolute(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
                .to_string(),
            ..Default::default()
        });
        self.update(|s| s.resume = Some(pb::ResumeReport { from, skipped }));
    }

    /// Sends what is queued and waits (at most `timeout`) until the coordinator has it: a
    /// trainer that exits right after a checkpoint does so only once the commit is recorded.
    pub fn finish(mut self, timeout: Duration) {
        self.tx = None;
        let _ = self.done.recv_timeout(timeout);
    }
}

/// Streams the queue to the coordinator at `addr` until the queue closes, reconnecting every
/// second while it cannot be reached. A stream the coordinator ends with `ABORTED` (the
/// generation ended on a failure) aborts the communicators in `aborts` and ends the loop.
async fn send_loop(
    addr: String,
    rx: mpsc::Receiver<pb::Progress>,
    aborts: Arc<Mutex<Vec<AbortHandle>>>,
) {
    let rx = Arc::new(Mutex::new(rx));
    let closed = |rx: &Arc<Mutex<mpsc::Receiver<pb::Progress>>>| {
        rx.lock()
            .map(|r| r.is_closed() && r.is_empty())
            .unwrap_or(true)
    };
    let mut warned = false;
    loop {
        let tls = ringmaster_auth::ClientTls::from_env();
        // One address, or the leader of several (coordinators sharing one etcd): after a
        // failover the stream reconnects to whichever leads now.
        let connected = ringmaster_auth::client::connect_leader(
            &addr,
            &tls,
            Duration::from_secs(5),
            "ringmaster.v1.RendezvousService",
        )
        .await;
        match connected {
            Err(e @ ringmaster_auth::DialError::Config(_)) => {
                eprintln!("trainer: progress: {e}; not reporting");
                return;
            }
            Ok(ch) => {
                warned = false;
                let mut client =
                    pb::rendezvous_service_client::RendezvousServiceClient::with_interceptor(
                        ch,
                        ringmaster_auth::Bearer::from_worker_env(),
                    );
                match client.report_progress(Shared(rx.clone())).await {
                    // The queue closed and everything in it was delivered.
                    Ok(_) => return,
                    Err(e) if e.code() == tonic::Code::Aborted => {
                        let reason = format!("the coordinator ended it ({})", e.message());
                        eprintln!("trainer: aborting collectives: {reason}");
                        if let Ok(a) = aborts.lock() {
                            for h in a.iter() {
                                h.abort(&reason);
                            }
                        }
                        return;
                    }
                    Err(e) if !warned => {
                        eprintln!(
                            "trainer: progress: stream to {addr} broke ({}); reconnecting",
                            e.message()
                        );
                        warned = true;
                    }
                    Err(_) => {}
                }
            }
            Err(e) if !warned => {
                eprintln!("trainer: progress: {e}; retrying every second");
                warned = true;
            }
            Err(_) => {}
        }
        if closed(&rx) {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `(current, peak)` resident set size of this process in bytes, from /proc/self/status.
pub fn rss_bytes() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return (0, 0);
    };
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
