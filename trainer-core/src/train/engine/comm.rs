//! Who shards with whom ([`Groups`]), and the communication thread: it owns the groups for one
//! micro-batch and runs the collectives the compute thread queues ([`CommQueue`]) in order —
//! the same order on every rank, so the calls match — overlapped as [`Overlap`] says.
//! Collectives go in pieces of at most a bucket's elements.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use ringmaster_collectives::{CommError, Communicator, ReduceOp};
use ringmaster_config::accelerate::BackwardPrefetch;
use ringmaster_config::plan::{Plan, PlanSource};
use ringmaster_model::LlamaConfig;

use super::layout::{FlatLayout, add_unit, owned_range, pad_unit};
use super::{Engine, TrainBackend};

/// Who shards with whom and who replicates.
pub struct Groups<'c> {
    /// All ranks (loss, broadcasts, and the shard or replica group of non-hybrid plans).
    pub main: Option<&'c mut dyn Communicator>,
    /// Hybrid plans: the ranks of this node (the shard group).
    pub node: Option<Box<dyn Communicator>>,
    /// Hybrid plans: the ranks with this local rank on every node (the replica group).
    pub cross: Option<Box<dyn Communicator>>,
    /// Whether the main communicator is the shard group (ZeRO-1/2/3) or the replica group (DDP).
    pub main_shards: bool,
}

impl Groups<'_> {
    pub(super) fn shard(&mut self) -> Option<&mut dyn Communicator> {
        if let Some(n) = self.node.as_deref_mut() {
            return Some(n);
        }
        if self.main_shards
            && let Some(m) = self.main.as_deref_mut()
        {
            return Some(m);
        }
        None
    }

    /// The shard and the replica communicators at once.
    pub(super) fn split(
        &mut self,
    ) -> (Option<&mut dyn Communicator>, Option<&mut dyn Communicator>) {
        if let Some(node) = self.node.as_deref_mut() {
            // The map shortens the boxed trait object's lifetime to the borrow's.
            let cross = self
                .cross
                .as_deref_mut()
                .map(|c| c as &mut dyn Communicator);
            return (Some(node), cross);
        }
        match self.main.as_deref_mut() {
            Some(m) if self.main_shards => (Some(m), None),
            Some(m) => (None, Some(m)),
            None => (None, None),
        }
    }

    pub(super) fn replica(&mut self) -> Option<&mut dyn Communicator> {
        if self.node.is_some() {
            return match self.cross.as_deref_mut() {
                Some(c) => Some(c),
                None => None,
            };
        }
        if !self.main_shards
            && let Some(m) = self.main.as_deref_mut()
        {
            return Some(m);
        }
        None
    }
}

/// How ZeRO-3 overlaps its collectives with compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    /// Issue the next unit's all-gather before the current unit's forward.
    pub forward_prefetch: bool,
    /// When backward issues the next unit's all-gather.
    pub backward_prefetch: BackwardPrefetch,
    /// Reduce-scatter a unit's gradients while the next unit computes (otherwise the compute
    /// thread waits for each).
    pub async_reduce: bool,
}

impl Overlap {
    /// Every collective blocks the compute thread.
    pub const NONE: Overlap = Overlap {
        forward_prefetch: false,
        backward_prefetch: BackwardPrefetch::NoPrefetch,
        async_reduce: false,
    };
    /// Everything overlapped.
    pub const FULL: Overlap = Overlap {
        forward_prefetch: true,
        backward_prefetch: BackwardPrefetch::BackwardPre,
        async_reduce: true,
    };

    /// What `plan` asks for. DeepSpeed: `overlap_comm` (default true at stage 3) turns on the
    /// asynchronous reduce-scatter and, unless `stage3_prefetch_bucket_size` is 0, prefetching.
    /// FSDP: `fsdp_backward_prefetch` as written; the forward all-gather is always issued one
    /// unit ahead (on GPUs FSDP gets the same from the CPU running ahead of the device, which
    /// `fsdp_forward_prefetch` only makes explicit), reduce-scatters are always asynchronous.
    /// Neither file: everything overlapped.
    pub fn of(plan: &Plan) -> Overlap {
        match plan.source {
            PlanSource::Default => Overlap::FULL,
            PlanSource::DeepSpeed => {
                let prefetch = plan.overlap_comm && plan.prefetch_bucket_size != Some(0);
                Overlap {
                    forward_prefetch: prefetch,
                    backward_prefetch: if prefetch {
                        BackwardPrefetch::BackwardPre
                    } else {
                        BackwardPrefetch::NoPrefetch
                    },
                    async_reduce: plan.overlap_comm,
                }
            }
            PlanSource::Fsdp => Overlap {
                forward_prefetch: true,
                backward_prefetch: plan.backward_prefetch,
                async_reduce: true,
            },
        }
    }
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Overlap::NONE {
            return f.write_str("every collective blocks the compute thread");
        }
        let on = |b: bool| if b { "on" } else { "off" };
        let backward = match self.backward_prefetch {
            BackwardPrefetch::BackwardPre => "before each unit's backward",
            BackwardPrefetch::BackwardPost => "after each unit's gradients",
            BackwardPrefetch::NoPrefetch => "off",
        };
        write!(
            f,
            "forward prefetch {}, backward prefetch {backward}, reduce-scatter {}",
            on(self.forward_prefetch),
            if self.async_reduce {
                "overlapped"
            } else {
                "blocking"
            }
        )
    }
}

/// A request to the communication thread of the unit passes ([`super::Pass::UnitByUnit`],
/// [`super::Pass::UnitGraphs`]).
enum Job {
    /// All-gather unit `u`; the full padded unit comes back on the results channel.
    Gather(usize),
    /// Reduce-scatter unit `u`'s padded full gradients into its owned accumulator.
    Reduce(usize, Vec<f32>),
    /// Stages 0–2: add one micro-batch's gradients of unit `u` (one buffer per tensor) and, on
    /// the step's last micro-batch, finish the unit's reduction.
    Unit {
        u: usize,
        grads: Vec<Vec<f32>>,
        last: bool,
    },
    /// Answer (with an empty buffer) once every earlier job is done.
    Fence,
}

/// What the communication thread borrows from the engine.
pub(super) struct CommSide<'a> {
    /// The shard group.
    comm: Option<&'a mut dyn Communicator>,
    /// The replica group.
    replica: Option<&'a mut dyn Communicator>,
    stage: u8,
    shard_rank: usize,
    pub(super) layout: &'a FlatLayout,
    param_shards: &'a [Vec<f32>],
    grads: &'a mut [Vec<f32>],
    scratch: &'a mut Vec<f32>,
    gather_bucket: usize,
    reduce_bucket: usize,
}

impl CommSide<'_> {
    pub(super) fn gather(&mut self, u: usize) -> Result<Vec<f32>> {
        let unit = &self.layout.units[u];
        let mut full = vec![0.0f32; unit.shard * self.layout.group];
        match self.comm.as_deref_mut() {
            Some(c) => all_gather_pieces(
                c,
                &self.param_shards[u],
                &mut full,
                self.gather_bucket,
                self.scratch,
            )
            .map_err(comm_err("gathering parameters"))?,
            None => full.copy_from_slice(&self.param_shards[u]),
        }
        Ok(full)
    }

    pub(super) fn reduce(&mut self, u: usize, mut full: Vec<f32>) -> Result<()> {
        let shard = self.layout.units[u].shard;
        match self.comm.as_deref_mut() {
            Some(c) => reduce_scatter_pieces(
                c,
                &mut full,
                shard,
                self.reduce_bucket,
                self.scratch,
                Some(&mut self.grads[u]),
            )
            .map_err(comm_err("reducing gradients"))?,
            None => self.grads[u]
                .iter_mut()
                .zip(&full)
                .for_each(|(d, s)| *d += s),
        }
        Ok(())
    }

    /// Adds one micro-batch's gradients of unit `u` (stages 0–2): into the full accumulator
    /// (stage ≤ 1) or reduce-scattered into the owned one (stage 2). `last`: the step's last
    /// micro-batch, after which the unit's reduction is finished ([`CommSide::finish_unit`]).
    fn unit(&mut self, u: usize, grads: &[Vec<f32>], last: bool) -> Result<()> {
        if self.stage < 2 {
            add_unit(self.layout, u, &mut self.grads[u], grads);
        } else {
            self.reduce(u, pad_unit(self.layout, u, grads))?;
        }
        if last {
            self.finish_unit(u)?;
        }
        Ok(())
    }

    /// Finishes unit `u`'s reduction for the step: ZeRO-0/1 reduce-scatter the full
    /// accumulator over the shard group; every plan all-reduces the owned shard over the
    /// replica group.
    pub(super) fn finish_unit(&mut self, u: usize) -> Result<()> {
        let shard = self.layout.units[u].shard;
        if self.stage < 2
            && let Some(c) = self.comm.as_deref_mut()
        {
            reduce_scatter_pieces(
                c,
                &mut self.grads[u],
                shard,
                self.reduce_bucket,
                self.scratch,
                None,
            )
            .map_err(comm_err("reducing gradients"))?;
        }
        let owned = owned_range(self.stage, self.shard_rank, shard);
        if let Some(c) = self.replica.as_deref_mut() {
            all_reduce_pieces(c, &mut self.grads[u][owned], self.reduce_bucket)
                .map_err(comm_err("all-reducing gradients"))?;
        }
        Ok(())
    }

    /// Runs jobs until the queue closes, `cancel` is set or a collective fails. Gathers and
    /// fences answer on `results`; a failure ends the thread with its error (the compute
    /// thread then sees the results channel close).
    fn serve(
        mut self,
        jobs: mpsc::Receiver<Job>,
        results: mpsc::Sender<Vec<f32>>,
        cancel: &AtomicBool,
    ) -> Result<()> {
        for job in jobs {
            if cancel.load(Ordering::Relaxed) {
                break;
            }
            match job {
                Job::Gather(u) => {
                    let full = self.gather(u)?;
                    if results.send(full).is_err() {
                        break;
                    }
                }
                Job::Reduce(u, full) => self.reduce(u, full)?,
                Job::Unit { u, grads, last } => self.unit(u, &grads, last)?,
                Job::Fence => {
                    if results.send(Vec::new()).is_err() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The compute thread's end of the communication thread: issues the gathers of a fixed
/// schedule of units ahead of their use, as the [`Overlap`] allows.
pub(super) struct CommQueue<'q> {
    jobs: Option<mpsc::Sender<Job>>,
    results: mpsc::Receiver<Vec<f32>>,
    overlap: Overlap,
    /// The units in the order the compute thread uses them, and whether each is a forward use.
    schedule: Vec<(usize, bool)>,
    /// Gathers issued so far (a prefix of `schedule`).
    issued: usize,
    /// Gathers taken so far.
    taken: usize,
    waited: &'q mut f64,
}

impl CommQueue<'_> {
    fn send(&mut self, job: Job) -> Result<()> {
        let ok = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !ok {
            bail!("the communication thread stopped");
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Vec<f32>> {
        let t = Instant::now();
        let r = self.results.recv();
        *self.waited += t.elapsed().as_secs_f64();
        r.map_err(|_| anyhow!("the communication thread stopped"))
    }

    fn issue_next(&mut self) -> Result<()> {
        if self.issued < self.schedule.len() {
            let u = self.schedule[self.issued].0;
            self.issued += 1;
            self.send(Job::Gather(u))?;
        }
        Ok(())
    }

    /// The next scheduled unit's full padded parameters (it must be unit `u`).
    pub(super) fn take(&mut self, u: usize) -> Result<Vec<f32>> {
        let i = self.taken;
        if self.schedule.get(i).map(|s| s.0) != Some(u) {
            // The schedule and the compute order are written together; a mismatch would hand
            // a unit another unit's parameters.
            bail!("unit {u} used out of the communication schedule (use {i})");
        }
        if self.issued <= i {
            self.issue_next()?;
        }
        let full = self.recv()?;
        self.taken += 1;
        // Prefetch the use after this one now, or (BACKWARD_POST) after this unit's backward.
        if let Some(&(_, forward)) = self.schedule.get(i + 1) {
            let now = if forward {
                self.overlap.forward_prefetch
            } else {
                self.overlap.backward_prefetch == BackwardPrefetch::BackwardPre
            };
            if now {
                self.issue_next()?;
            }
        }
        Ok(full)
    }

    /// Unit `u`'s gradients of this micro-batch (padded full unit), after its backward.
    pub(super) fn reduce(&mut self, u: usize, full: Vec<f32>) -> Result<()> {
        if self.overlap.backward_prefetch == BackwardPrefetch::BackwardPost
            && self.issued == self.taken
            && self.schedule.get(self.taken).is_some_and(|s| !s.1)
        {
            self.issue_next()?;
        }
        self.send(Job::Reduce(u, full))?;
        if !self.overlap.async_reduce {
            self.send(Job::Fence)?;
            self.recv()?;
        }
        Ok(())
    }

    /// Stages 0–2: unit `u`'s gradients of this micro-batch, after its backward (see
    /// [`Job::Unit`]); the compute thread goes on with the next unit.
    pub(super) fn unit(&mut self, u: usize, grads: Vec<Vec<f32>>, last: bool) -> Result<()> {
        self.send(Job::Unit { u, grads, last })
    }

    /// Waits for every job issued so far.
    fn finish(&mut self) -> Result<()> {
        self.send(Job::Fence)?;
        self.recv()?;
        self.jobs = None;
        Ok(())
    }
}

/// Keeps the [`CommError`] itself in the chain (the trainer's exit code tells a collective
/// timeout from other collective failures by it), with `what` as context.
pub(super) fn comm_err(what: &str) -> impl FnOnce(CommError) -> anyhow::Error + '_ {
    move |e| anyhow::Error::new(e).context(what.to_owned())
}

/// Reduce-scatters the padded unit `full` (N shards of `shard` elements) in pieces of at most
/// `bucket` elements. This rank's reduced elements go to `acc` (added) or, without `acc`, back
/// into its own shard of `full`.
fn reduce_scatter_pieces(
    comm: &mut dyn Communicator,
    full: &mut [f32],
    shard: usize,
    bucket: usize,
    scratch: &mut Vec<f32>,
    mut acc: Option<&mut [f32]>,
) -> Result<(), CommError> {
    let (n, r) = (comm.world_size(), comm.rank());
    let piece = (bucket / n).max(1);
    let mut lo = 0;
    while lo < shard {
        let hi = (lo + piece).min(shard);
        let w = hi - lo;
        scratch.clear();
        for q in 0..n {
            scratch.extend_from_slice(&full[q * shard + lo..q * shard + hi]);
        }
        comm.reduce_scatter((&mut scratch[..]).into(), ReduceOp::Sum)?;
        let mine = &scratch[r * w..(r + 1) * w];
        match acc.as_deref_mut() {
            Some(a) => a[lo..hi].iter_mut().zip(mine).for_each(|(d, s)| *d += s),
            None => full[r * shard + lo..r * shard + hi].copy_from_slice(mine),
        }
        lo = hi;
    }
    Ok(())
}

/// All-gathers every rank's `shard`-element slice into `full` (N × shard) in pieces of at most
/// `bucket` elements; this rank's slice is `own`.
pub(super) fn all_gather_pieces(
    comm: &mut dyn Communicator,
    own: &[f32],
    full: &mut [f32],
    bucket: usize,
    scratch: &mut Vec<f32>,
) -> Result<(), CommError> {
    let (n, r) = (comm.world_size(), comm.rank());
    let shard = own.len();
    let piece = (bucket / n).max(1);
    let mut lo = 0;
    while lo < shard {
        let hi = (lo + piece).min(shard);
        let w = hi - lo;
        scratch.clear();
        scratch.resize(n * w, 0.0);
        scratch[r * w..(r + 1) * w].copy_from_slice(&own[lo..hi]);
        comm.all_gather((&mut scratch[..]).into())?;
        for q in 0..n {
            full[q * shard + lo..q * shard + hi].copy_from_slice(&scratch[q * w..(q + 1) * w]);
        }
        lo = hi;
    }
    Ok(())
}

/// All-reduces (sum) `buf` in place in pieces of at most `bucket` elements.
fn all_reduce_pieces(
    comm: &mut dyn Communicator,
    buf: &mut [f32],
    bucket: usize,
) -> Result<(), CommError> {
    for piece in buf.chunks_mut(bucket.max(1)) {
        comm.all_reduce(piece.into(), ReduceOp::Sum)?;
    }
    Ok(())
}

impl<B: TrainBackend> Engine<'_, B> {
    /// The engine's communication state, as the ZeRO-3 communication thread borrows it.
    pub(super) fn comm_side(&mut self) -> CommSide<'_> {
        let (comm, replica) = self.groups.split();
        CommSide {
            comm,
            replica,
            stage: self.spec.stage,
            shard_rank: self.shard_rank,
            layout: &self.layout,
            param_shards: &self.param_shards,
            grads: &mut self.grads,
            scratch: &mut self.scratch,
            gather_bucket: self.gather_bucket,
            reduce_bucket: self.reduce_bucket,
        }
    }

    /// ZeRO-3: unit `u`'s full padded flat parameters.
    pub(super) fn gather_unit(&mut self, u: usize) -> Result<Vec<f32>> {
        let t = Instant::now();
        let full = self.comm_side().gather(u);
        self.comm_seconds += t.elapsed().as_secs_f64();
        full
    }

    /// Reduce-scatters unit `u`'s padded full gradients `full` into its owned accumulator on
    /// this thread (stage ≥ 2).
    pub(super) fn reduce_unit(&mut self, u: usize, full: Vec<f32>) -> Result<()> {
        let t = Instant::now();
        let done = self.comm_side().reduce(u, full);
        self.comm_seconds += t.elapsed().as_secs_f64();
        done
    }

    /// Runs `work` on this thread with a communication thread serving its [`CommQueue`] for
    /// one micro-batch (the unit schedule of `cfg`'s model).
    pub(super) fn with_comm_thread<T>(
        &mut self,
        cfg: &LlamaConfig,
        gathers: bool,
        work: impl FnOnce(&FlatLayout, &mut CommQueue<'_>) -> Result<T>,
    ) -> Result<T> {
        let units = self.layout.units.len();
        if units != cfg.num_hidden_layers + 2 {
            bail!("the unit-by-unit path needs the full model's units (not LoRA adapters)");
        }
        let last = units - 1;
        // ZeRO-3's gathers. Forward uses: every unit, the embedding table again for a tied
        // head; backward uses: the blocks and the embeddings in reverse.
        let mut schedule: Vec<(usize, bool)> = Vec::new();
        if gathers {
            schedule.extend((0..=last).map(|u| (u, true)));
            if cfg.tie_word_embeddings {
                schedule.push((0, true));
            }
            schedule.extend((0..last).rev().map(|u| (u, false)));
        }
        let overlap = self.overlap;
        let mut waited = 0.0;
        let side = self.comm_side();
        let layout = side.layout;
        let cancel = AtomicBool::new(false);
        let out = std::thread::scope(|s| {
            let (job_tx, job_rx) = mpsc::channel();
            let (res_tx, res_rx) = mpsc::channel();
            let cancel = &cancel;
            let worker = std::thread::Builder::new()
                .name("zero3-comm".into())
                .spawn_scoped(s, move || side.serve(job_rx, res_tx, cancel))
                .context("starting the communication thread")?;
            let mut queue = CommQueue {
                jobs: Some(job_tx),
                results: res_rx,
                overlap,
                schedule,
                issued: 0,
                taken: 0,
                waited: &mut waited,
            };
            let out = work(layout, &mut queue).and_then(|v| queue.finish().map(|()| v));
            if out.is_err() {
                cancel.store(true, Ordering::Relaxed);
            }
            drop(queue);
            let served = worker
                .join()
                .map_err(|_| anyhow!("the communication thread panicked"))?;
            // A collective's own error explains a compute-side "thread stopped".
            served?;
            out
        });
        self.comm_seconds += waited;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a [`CommQueue`] through the uses of a 3-unit model (embeddings, one block, head;
    /// untied) the way [`unit_by_unit`] does, against a stand-in communication thread that
    /// answers at once. Returns the jobs in the order the thread received them and, after each
    /// use, how many gathers had been issued.
    fn drive(overlap: Overlap) -> (Vec<String>, Vec<usize>) {
        let (job_tx, job_rx) = mpsc::channel();
        let (res_tx, res_rx) = mpsc::channel();
        let server = std::thread::spawn(move || {
            let mut log = Vec::new();
            for job in job_rx {
                log.push(match job {
                    Job::Gather(u) => {
                        res_tx.send(vec![u as f32]).unwrap();
                        format!("G{u}")
                    }
                    Job::Reduce(u, _) => format!("R{u}"),
                    Job::Unit { u, .. } => format!("U{u}"),
                    Job::Fence => {
                        res_tx.send(Vec::new()).unwrap();
                        "F".into()
                    }
                });
            }
            log
        });
        let mut waited = 0.0;
        let mut q = CommQueue {
            jobs: Some(job_tx),
            results: res_rx,
            overlap,
            schedule: vec![(0, true), (1, true), (2, true), (1, false), (0, false)],
            issued: 0,
            taken: 0,
            waited: &mut waited,
        };
        let mut issued = Vec::new();
        for u in [0, 1] {
            assert_eq!(q.take(u).unwrap(), vec![u as f32]);
            issued.push(q.issued);
        }
        for u in [2, 1, 0] {
            assert_eq!(q.take(u).unwrap(), vec![u as f32]);
            issued.push(q.issued);
            q.reduce(u, Vec::new()).unwrap();
            issued.push(q.issued);
        }
        q.finish().unwrap();
        drop(q);
        (server.join().unwrap(), issued)
    }

    #[test]
    fn full_overlap_prefetches_one_use_ahead_and_never_waits_for_reductions() {
        let (log, issued) = drive(Overlap::FULL);
        assert_eq!(log, ["G0", "G1", "G2", "G1", "R2", "G0", "R1", "R0", "F"]);
        // The next use's gather is out before the current unit computes.
        assert_eq!(issued, [2, 3, 4, 4, 5, 5, 5, 5]);
    }

    #[test]
    fn backward_post_issues_the_next_gather_after_the_units_backward() {
        let overlap = Overlap {
            backward_prefetch: BackwardPrefetch::BackwardPost,
            ..Overlap::FULL
        };
        let (log, issued) = drive(overlap);
        assert_eq!(log, ["G0", "G1", "G2", "G1", "R2", "G0", "R1", "R0", "F"]);
        // Taking the head issues nothing; its reduction issues the next block's gather first.
        assert_eq!(issued, [2, 3, 3, 4, 4, 5, 5, 5]);
    }

    #[test]
    fn no_overlap_gathers_on_use_and_waits_for_every_reduction() {
        let (log, issued) = drive(Overlap::NONE);
        assert_eq!(
            log,
            [
                "G0", "G1", "G2", "R2", "F", "G1", "R1", "F", "G0", "R0", "F", "F"
            ]
        );
        assert_eq!(issued, [1, 2, 3, 3, 4, 4, 5, 5]);
    }

    #[test]
    fn plans_map_to_overlap_settings() {
        use ringmaster_config::accelerate::ShardingStrategy;
        assert_eq!(Overlap::of(&Plan::zero3()), Overlap::FULL);
        let mut ds = Plan::zero3();
        ds.source = PlanSource::DeepSpeed;
        assert_eq!(Overlap::of(&ds), Overlap::FULL);
        ds.prefetch_bucket_size = Some(0);
        let no_prefetch = Overlap::of(&ds);
        assert!(!no_prefetch.forward_prefetch && no_prefetch.async_reduce);
        ds.overlap_comm = false;
        assert_eq!(Overlap::of(&ds), Overlap::NONE);
        assert_eq!(
            Overlap::NONE.to_string(),
            "every collective blocks the compute thread"
        );
        assert_eq!(
            Overlap::FULL.to_string(),
            "forward prefetch on, backward prefetch before each unit's backward, \
             reduce-scatter overlapped"
        );
        let mut fsdp = Plan::fsdp(ShardingStrategy::FullShard);
        fsdp.backward_prefetch = BackwardPrefetch::NoPrefetch;
        let o = Overlap::of(&fsdp);
        assert!(o.forward_prefetch && o.async_reduce);
        assert_eq!(o.backward_prefetch, BackwardPrefetch::NoPrefetch);
    }
}
