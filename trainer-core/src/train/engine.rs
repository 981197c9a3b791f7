//! The sharded data-parallel engine: one engine, a plan saying what is sharded.
//!
//! The trainable tensors are grouped in flat units (`ParamSpec::unit`: embeddings, one per
//! block, final norm + head), each padded to a multiple of the shard group's size `N`; rank r of
//! the group owns the contiguous slice `[r·S, (r+1)·S)` of every unit (`S` = padded / N).
//!
//! | plan            | parameters      | gradients (kept)       | AdamW state |
//! |-----------------|-----------------|------------------------|-------------|
//! | DDP (N = 1)     | full            | full                   | full        |
//! | ZeRO-1          | full            | full                   | own shard   |
//! | ZeRO-2          | full            | own shard              | own shard   |
//! | ZeRO-3          | own shard       | own shard              | own shard   |
//!
//! DDP is the same code with a shard group of one rank and every rank a replica. HYBRID_SHARD
//! is ZeRO-3 over the ranks of a node, replicated across nodes: gradients are reduce-scattered
//! inside the node and the shards all-reduced across nodes.
//!
//! Gradients: ZeRO-0/1 accumulate full gradients over the micro-batches and reduce-scatter them
//! at the step (in place: this rank's slice of the full buffer becomes the reduced shard);
//! ZeRO-2/3 reduce-scatter each unit's gradients after every micro-batch and keep only their
//! shard. Collectives go in pieces of at most `reduce_bucket_size` / `allgather_bucket_size`
//! elements (a piece takes the same sub-range of every rank's shard, so any piece size keeps
//! the layout). Clipping uses the global norm: the sum of squares of the owned shards,
//! all-reduced over the shard group. AdamW runs on the owned shard, one state per tensor
//! segment (norm weights are exempt from weight decay); ZeRO-0–2 then all-gather the updated
//! shards into every rank's full parameters.
//!
//! ZeRO-3 runs the model unit by unit ([`Engine::sharded_micro_batch`]): gather a unit, run it
//! on the previous unit's detached output, keep only unit inputs; backward re-gathers each unit
//! in reverse order, recomputes it with the upstream gradient injected, reduce-scatters its
//! gradients and drops it. A rank's peak is its shards, one gathered unit (two for a tied head)
//! and the unit inputs.
//!
//! On the CPU backend the parameters, gradients and optimizer state already live in host
//! memory, so `offload_optimizer` / `offload_param` change no placement: offload plans run the
//! code of their twins.
//!
//! ZeRO-3 overlaps communication with compute ([`Overlap`]): a communication thread owns the
//! shard group for the micro-batch and runs its collectives in the order the compute thread
//! asks for them (the same order on every rank, so the ring's calls match). The next unit's
//! all-gather is issued before the current unit computes (forward, and backward with
//! BACKWARD_PRE; after its gradients with BACKWARD_POST), and a unit's reduce-scatter runs
//! while the next unit computes. At most two gathered units are alive at once, plus one unit's
//! gradients in flight.
//!
//! Stages 0–2 with overlap (DeepSpeed `overlap_comm: true`, FSDP NO_SHARD / SHARD_GRAD_OP, no
//! file) keep one forward graph per unit, each cut at a detached copy of its input
//! ([`Engine::unit_graph_micro_batch`]); backward runs from the head down, unit by unit, and
//! hands each unit's gradients to the communication thread as soon as its backward ends, so the
//! unit's all-reduce (DDP) or reduce-scatter (ZeRO-1/2) on the step's last micro-batch runs
//! while the units below it compute. Without overlap they reduce at the step, after backward.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{DType, Tensor, TensorData};
use ringmaster_collectives::{CommError, Communicator, ReduceOp};
use ringmaster_config::accelerate::BackwardPrefetch;
use ringmaster_config::plan::{Plan, PlanSource};
use ringmaster_model::model::{Inputs, cross_entropy, leaf_grads};
use ringmaster_model::params::{ParamKind, ParamSpec};
use ringmaster_model::{CpuAutodiff, LlamaConfig, ParamStore, UnitWeights};
use ringmaster_optim::adamw::{AdamWConfig, AdamWState, adamw_step};
use ringmaster_optim::clip::{scale_in_place, sum_squares};
use ringmaster_optim::scaler::has_overflow;
use serde::Serialize;

type AD = CpuAutodiff;

/// Default piece size of a collective when the plan sets no bucket size (DeepSpeed's 5e8).
const DEFAULT_BUCKET: u64 = 500_000_000;

/// One flat unit: consecutive tensors of the store with the same `ParamSpec::unit`.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitLayout {
    /// The unit number (`ParamSpec::unit`).
    pub unit: usize,
    /// The store indices of its tensors.
    pub tensors: Range<usize>,
    /// Flat offset of each tensor inside the unit.
    pub offsets: Vec<usize>,
    /// Elements without padding.
    pub numel: usize,
    /// Elements of one rank's shard (numel padded up to a multiple of the group, divided by it).
    pub shard: usize,
}

impl UnitLayout {
    /// Segments of the flat range `lo..hi`: (store index, range in the tensor, range in `lo..hi`
    /// coordinates). Padding belongs to no segment.
    fn segments(
        &self,
        sizes: &[usize],
        lo: usize,
        hi: usize,
    ) -> Vec<(usize, Range<usize>, Range<usize>)> {
        let mut out = Vec::new();
        for (k, t) in self.tensors.clone().enumerate() {
            let start = self.offsets[k];
            let end = start + sizes[t];
            let (a, b) = (start.max(lo), end.min(hi));
            if a < b {
                out.push((t, a - start..b - start, a - lo..b - lo));
            }
        }
        out
    }
}

/// The flat units of a store for a shard group of `group` ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatLayout {
    /// Units in order.
    pub units: Vec<UnitLayout>,
    /// Ranks of the shard group.
    pub group: usize,
    sizes: Vec<usize>,
}

impl FlatLayout {
    /// Groups `specs` (in store order, units non-decreasing) into units padded for `group`.
    pub fn new(specs: &[ParamSpec], group: usize) -> Result<FlatLayout> {
        let group = group.max(1);
        let mut units: Vec<UnitLayout> = Vec::new();
        for (i, s) in specs.iter().enumerate() {
            match units.last_mut() {
                Some(u) if u.unit == s.unit => {
                    u.offsets.push(u.numel);
                    u.numel += s.numel();
                    u.tensors.end = i + 1;
                }
                Some(u) if u.unit > s.unit => {
                    bail!("tensor `{}` is out of unit order", s.name)
                }
                _ => units.push(UnitLayout {
                    unit: s.unit,
                    tensors: i..i + 1,
                    offsets: vec![0],
                    numel: s.numel(),
                    shard: 0,
                }),
            }
        }
        for u in &mut units {
            u.shard = u.numel.div_ceil(group);
        }
        Ok(FlatLayout {
            units,
            group,
            sizes: specs.iter().map(ParamSpec::numel).collect(),
        })
    }

    /// Elements without padding (Ψ).
    pub fn numel(&self) -> usize {
        self.units.iter().map(|u| u.numel).sum()
    }

    /// Padding elements over all units.
    pub fn padding(&self) -> usize {
        self.units
            .iter()
            .map(|u| u.shard * self.group - u.numel)
            .sum()
    }

    /// Copies unit `u`'s flat elements `lo..hi` of `store` into `out` (padding reads 0).
    fn read(&self, store: &ParamStore, u: usize, lo: usize, hi: usize, out: &mut [f32]) {
        out.fill(0.0);
        for (t, tr, fr) in self.units[u].segments(&self.sizes, lo, hi) {
            out[fr].copy_from_slice(&store.data(t)[tr]);
        }
    }

    /// Writes `src` to unit `u`'s flat elements `lo..hi` of `store` (padding is dropped).
    fn write(&self, store: &mut ParamStore, u: usize, lo: usize, src: &[f32]) {
        let hi = lo + src.len();
        for (t, tr, fr) in self.units[u].segments(&self.sizes, lo, hi) {
            store.data_mut(t)[tr].copy_from_slice(&src[fr]);
        }
    }
}

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
    fn shard(&mut self) -> Option<&mut dyn Communicator> {
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
    fn split(&mut self) -> (Option<&mut dyn Communicator>, Option<&mut dyn Communicator>) {
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

    fn replica(&mut self) -> Option<&mut dyn Communicator> {
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

/// AdamW state of one tensor's part of the owned shard.
struct Segment {
    tensor: usize,
    /// Range inside the tensor.
    in_tensor: Range<usize>,
    /// Range inside the owned shard.
    in_shard: Range<usize>,
    decay: bool,
    state: AdamWState,
}

/// Bytes of model state one rank holds (what the ZeRO formulas count).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MemoryReport {
    /// Rank in the job.
    pub rank: usize,
    /// World size.
    pub world: usize,
    /// Ranks of the shard group.
    pub shard_group: usize,
    /// ZeRO stage of the trainable state.
    pub stage: u8,
    /// The plan's name.
    pub plan: String,
    /// Trainable elements (Ψ).
    pub trainable_elements: usize,
    /// Padding elements of the flat units (at most shard group − 1 per unit).
    pub padding_elements: usize,
    /// fp32 trainable parameters held between steps.
    pub param_bytes: usize,
    /// fp32 gradient accumulators held.
    pub grad_bytes: usize,
    /// AdamW state (exp_avg + exp_avg_sq) held.
    pub optimizer_bytes: usize,
    /// Frozen parameters held (LoRA's base model).
    pub frozen_bytes: usize,
    /// Peak resident set size of the process during training (VmHWM).
    pub peak_rss_bytes: u64,
}

/// The engine of one rank.
pub struct Engine<'c> {
    /// Communicators.
    pub groups: Groups<'c>,
    layout: FlatLayout,
    stage: u8,
    /// This rank's index in the shard group.
    shard_rank: usize,
    reduce_bucket: usize,
    gather_bucket: usize,
    /// ZeRO-3: this rank's parameter shard of every unit.
    param_shards: Vec<Vec<f32>>,
    /// Gradient accumulators: the padded full unit (stage ≤ 1) or the owned shard (stage ≥ 2).
    grads: Vec<Vec<f32>>,
    segments: Vec<Vec<Segment>>,
    adam: AdamWConfig,
    scratch: Vec<f32>,
    overlap: Overlap,
    /// Seconds the compute thread waited for collectives since the last
    /// [`Engine::take_comm_seconds`].
    comm_seconds: f64,
    /// This step's reduction already finished unit by unit in the last micro-batch's backward.
    reduced_in_backward: bool,
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

/// A request to the communication thread of [`Engine::sharded_micro_batch`] and
/// [`Engine::unit_graph_micro_batch`].
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
struct CommSide<'a> {
    /// The shard group.
    comm: Option<&'a mut dyn Communicator>,
    /// The replica group.
    replica: Option<&'a mut dyn Communicator>,
    stage: u8,
    shard_rank: usize,
    layout: &'a FlatLayout,
    param_shards: &'a [Vec<f32>],
    grads: &'a mut [Vec<f32>],
    scratch: &'a mut Vec<f32>,
    gather_bucket: usize,
    reduce_bucket: usize,
}

impl CommSide<'_> {
    fn gather(&mut self, u: usize) -> Result<Vec<f32>> {
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

    fn reduce(&mut self, u: usize, mut full: Vec<f32>) -> Result<()> {
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
            let unit = &self.layout.units[u];
            let acc = &mut self.grads[u];
            for (k, g) in grads.iter().enumerate() {
                let off = unit.offsets[k];
                acc[off..off + g.len()]
                    .iter_mut()
                    .zip(g)
                    .for_each(|(d, s)| *d += s);
            }
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
    fn finish_unit(&mut self, u: usize) -> Result<()> {
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
struct CommQueue<'q> {
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
    fn take(&mut self, u: usize) -> Result<Vec<f32>> {
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
    fn reduce(&mut self, u: usize, full: Vec<f32>) -> Result<()> {
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
    fn unit(&mut self, u: usize, grads: Vec<Vec<f32>>, last: bool) -> Result<()> {
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

/// The range of a unit's gradient accumulator a rank owns: the whole owned accumulator
/// (stage ≥ 2) or its shard of the full one.
fn owned_range(stage: u8, shard_rank: usize, shard: usize) -> Range<usize> {
    if stage >= 2 {
        0..shard
    } else {
        shard_rank * shard..(shard_rank + 1) * shard
    }
}

fn comm_err(what: &str) -> impl FnOnce(CommError) -> anyhow::Error + '_ {
    move |e| anyhow!("{what}: {e}")
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
fn all_gather_pieces(
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

fn leaf(data: &[f32], grad: bool) -> Tensor<AD, 1> {
    let t = Tensor::<AD, 1>::from_data(
        TensorData::new(data.to_vec(), [data.len()]),
        &Default::default(),
    );
    if grad { t.require_grad() } else { t }
}

impl<'c> Engine<'c> {
    /// The engine for `trainable` under `plan`. `stage` is the plan's stage for the trainable
    /// tensors (LoRA caps it at 2: the frozen base stays whole on every rank).
    pub fn new(
        plan: &Plan,
        stage: u8,
        trainable: &ParamStore,
        groups: Groups<'c>,
        adam: AdamWConfig,
    ) -> Result<Engine<'c>> {
        let mut groups = groups;
        let (group, shard_rank) = match groups.shard() {
            Some(c) => (c.world_size(), c.rank()),
            None => (1, 0),
        };
        let layout = FlatLayout::new(trainable.specs(), group)?;
        let mut segments = Vec::with_capacity(layout.units.len());
        let mut grads = Vec::with_capacity(layout.units.len());
        for u in &layout.units {
            let lo = shard_rank * u.shard;
            let segs = u
                .segments(&layout.sizes, lo, lo + u.shard)
                .into_iter()
                .map(|(t, tr, fr)| Segment {
                    tensor: t,
                    decay: !matches!(trainable.specs()[t].kind, ParamKind::Norm),
                    state: AdamWState::new(tr.len()),
                    in_tensor: tr,
                    in_shard: fr,
                })
                .collect();
            segments.push(segs);
            grads.push(vec![
                0.0f32;
                if stage >= 2 { u.shard } else { u.shard * group }
            ]);
        }
        let elems =
            |b: Option<u64>| b.unwrap_or(DEFAULT_BUCKET).clamp(1, usize::MAX as u64) as usize;
        Ok(Engine {
            groups,
            layout,
            stage,
            shard_rank,
            reduce_bucket: elems(plan.reduce_bucket_size),
            gather_bucket: elems(Some(plan.allgather_bucket_size)),
            param_shards: Vec::new(),
            grads,
            segments,
            adam,
            scratch: Vec::new(),
            overlap: Overlap::of(plan),
            comm_seconds: 0.0,
            reduced_in_backward: false,
        })
    }

    /// The flat layout.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The stage of the trainable state.
    pub fn stage(&self) -> u8 {
        self.stage
    }

    /// How ZeRO-3 overlaps communication (see [`Overlap::of`]).
    pub fn overlap(&self) -> Overlap {
        self.overlap
    }

    /// Seconds the compute thread waited for collectives since the last call.
    pub fn take_comm_seconds(&mut self) -> f64 {
        std::mem::take(&mut self.comm_seconds)
    }

    /// ZeRO-3: keeps this rank's shard of every unit and releases the full tensors of `store`
    /// (their buffers become empty until [`Engine::gather_full`]).
    pub fn shard_params(&mut self, store: &mut ParamStore) {
        if self.stage < 3 {
            return;
        }
        self.param_shards = (0..self.layout.units.len())
            .map(|u| {
                let s = self.layout.units[u].shard;
                let lo = self.shard_rank * s;
                let mut out = vec![0.0; s];
                self.layout.read(store, u, lo, lo + s, &mut out);
                out
            })
            .collect();
        for (_, data) in store.iter_mut() {
            *data = Vec::new();
        }
    }

    /// ZeRO-3: gathers every unit back into `store`'s full tensors on every rank (for saving
    /// and evaluation). A no-op below stage 3.
    pub fn gather_full(&mut self, store: &mut ParamStore) -> Result<()> {
        if self.stage < 3 {
            return Ok(());
        }
        for (t, (spec, data)) in store.iter_mut().enumerate() {
            if data.len() != spec.numel() {
                *data = vec![0.0; self.layout.sizes[t]];
            }
        }
        for u in 0..self.layout.units.len() {
            let full = self.gather_unit(u)?;
            self.layout
                .write(store, u, 0, &full[..self.layout.units[u].numel]);
        }
        Ok(())
    }

    /// ZeRO-3: releases the full tensors again after [`Engine::gather_full`].
    pub fn release_full(&mut self, store: &mut ParamStore) {
        if self.stage >= 3 {
            for (_, data) in store.iter_mut() {
                *data = Vec::new();
            }
        }
    }

    /// The engine's communication state, as the ZeRO-3 communication thread borrows it.
    fn comm_side(&mut self) -> CommSide<'_> {
        let (comm, replica) = self.groups.split();
        CommSide {
            comm,
            replica,
            stage: self.stage,
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
    fn gather_unit(&mut self, u: usize) -> Result<Vec<f32>> {
        let t = Instant::now();
        let full = self.comm_side().gather(u);
        self.comm_seconds += t.elapsed().as_secs_f64();
        full
    }

    /// Adds one micro-batch's gradients of unit `u` (`grads[k]` for its k-th tensor): into the
    /// full accumulator (stage ≤ 1), or reduce-scattered into the owned shard (stage ≥ 2).
    fn accumulate_unit(&mut self, u: usize, grads: &[Vec<f32>]) -> Result<()> {
        let unit = &self.layout.units[u];
        if self.stage < 2 {
            let acc = &mut self.grads[u];
            for (k, g) in grads.iter().enumerate() {
                let off = unit.offsets[k];
                acc[off..off + g.len()]
                    .iter_mut()
                    .zip(g)
                    .for_each(|(d, s)| *d += s);
            }
            return Ok(());
        }
        let full = pad_unit(&self.layout, u, grads);
        self.reduce_unit(u, full)
    }

    /// Reduce-scatters unit `u`'s padded full gradients `full` into its owned accumulator on
    /// this thread (stage ≥ 2).
    fn reduce_unit(&mut self, u: usize, full: Vec<f32>) -> Result<()> {
        let t = Instant::now();
        let done = self.comm_side().reduce(u, full);
        self.comm_seconds += t.elapsed().as_secs_f64();
        done
    }

    /// Adds a micro-batch's gradients of every trainable tensor (store order), computed by the
    /// whole model (stages 0–2).
    pub fn accumulate(&mut self, grads: Vec<Vec<f32>>) -> Result<()> {
        for u in 0..self.layout.units.len() {
            let range = self.layout.units[u].tensors.clone();
            self.accumulate_unit(u, &grads[range])?;
        }
        Ok(())
    }

    /// ZeRO-3: one micro-batch unit by unit; returns its (unscaled) loss. Collectives run on a
    /// communication thread, overlapped as [`Engine::overlap`] says.
    pub fn sharded_micro_batch(&mut self, mb: &MicroBatch<'_>) -> Result<f64> {
        self.with_comm_thread(mb.cfg, true, |layout, queue| {
            unit_by_unit(layout, mb, queue)
        })
    }

    /// Whether stages 0–2 reduce each unit's gradients while backward goes on
    /// ([`Engine::unit_graph_micro_batch`]): asked for by the plan ([`Overlap::async_reduce`])
    /// and there is someone to reduce with. LoRA adapters keep the whole-model path.
    pub fn overlaps_reduction(&mut self, full_model: bool) -> bool {
        let (shard, replica) = self.groups.split();
        full_model
            && self.stage <= 2
            && self.overlap.async_reduce
            && (shard.is_some() || replica.is_some())
    }

    /// Stages 0–2 with overlapped reduction: one micro-batch of the full model `params` as one
    /// graph per unit (each cut at its input and kept, not recomputed), backward unit by unit
    /// in reverse, each unit's gradients handed to the communication thread as soon as they
    /// exist. On the step's `last` micro-batch the communication thread also finishes each
    /// unit's reduction, so that it runs while the units below compute their backward.
    /// Returns the (unscaled) loss.
    pub fn unit_graph_micro_batch(
        &mut self,
        mb: &MicroBatch<'_>,
        params: &ParamStore,
        last: bool,
    ) -> Result<f64> {
        let value = self.with_comm_thread(mb.cfg, false, |layout, queue| {
            unit_graphs(layout, params, mb, last, queue)
        })?;
        self.reduced_in_backward = last;
        Ok(value)
    }

    /// An empty micro-batch (a short last global batch dealt round-robin leaves some ranks
    /// without samples): takes part in every collective the other ranks' micro-batch makes,
    /// with zero gradients, so that the ring's calls still match. `last`: the step's last
    /// micro-batch; `unit_graphs`: the ranks run [`Engine::unit_graph_micro_batch`]. Stages
    /// 0–1 reducing after backward make none.
    pub fn idle_micro_batch(
        &mut self,
        cfg: &LlamaConfig,
        last: bool,
        unit_graphs: bool,
    ) -> Result<()> {
        if unit_graphs {
            // The calls of `unit_graphs`: every unit in reverse.
            self.with_comm_thread(cfg, false, |layout, queue| {
                for u in (0..layout.units.len()).rev() {
                    let zeros = layout.units[u]
                        .tensors
                        .clone()
                        .map(|t| vec![0.0f32; layout.sizes[t]])
                        .collect();
                    queue.unit(u, zeros, last)?;
                }
                Ok(())
            })?;
            self.reduced_in_backward = last;
            return Ok(());
        }
        match self.stage {
            0 | 1 => Ok(()),
            2 => {
                for u in 0..self.layout.units.len() {
                    let zeros = vec![0.0f32; self.layout.units[u].shard * self.layout.group];
                    self.reduce_unit(u, zeros)?;
                }
                Ok(())
            }
            _ => self.with_comm_thread(cfg, true, |layout, queue| {
                // The calls `unit_by_unit` makes, in its order, without compute.
                let last = layout.units.len() - 1;
                let zeros = |u: usize| vec![0.0f32; layout.units[u].shard * layout.group];
                for u in 0..=last {
                    queue.take(u)?;
                }
                if cfg.tie_word_embeddings {
                    queue.take(0)?;
                }
                queue.reduce(last, zeros(last))?;
                for u in (0..last).rev() {
                    queue.take(u)?;
                    queue.reduce(u, zeros(u))?;
                }
                Ok(())
            }),
        }
    }

    /// Runs `work` on this thread with a communication thread serving its [`CommQueue`] for
    /// one micro-batch (the unit schedule of `cfg`'s model).
    fn with_comm_thread<T>(
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

    /// The range of unit `u`'s gradient accumulator this rank owns.
    fn owned(&self, u: usize) -> Range<usize> {
        owned_range(self.stage, self.shard_rank, self.layout.units[u].shard)
    }

    /// Finishes the step's gradient reduction: ZeRO-0/1 reduce-scatter their full
    /// accumulators over the shard group; every plan all-reduces the owned shards over the
    /// replica group. Nothing is left to do when [`Engine::unit_graph_micro_batch`] finished
    /// each unit during the last micro-batch's backward.
    pub fn reduce(&mut self) -> Result<()> {
        if std::mem::take(&mut self.reduced_in_backward) {
            return Ok(());
        }
        let t = Instant::now();
        let mut side = self.comm_side();
        for u in 0..side.layout.units.len() {
            side.finish_unit(u)?;
        }
        self.comm_seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Multiplies the owned gradients by `factor` (fp16 unscaling, clipping).
    pub fn scale_grads(&mut self, factor: f32) {
        for u in 0..self.layout.units.len() {
            let r = self.owned(u);
            scale_in_place(&mut self.grads[u][r], factor);
        }
    }

    /// Whether any rank's owned gradients hold an inf or NaN.
    pub fn overflow(&mut self) -> Result<bool> {
        let local =
            (0..self.layout.units.len()).any(|u| has_overflow(&self.grads[u][self.owned(u)]));
        let mut flag = [if local { 1.0f32 } else { 0.0 }];
        if let Some(c) = self.groups.shard() {
            c.all_reduce((&mut flag[..]).into(), ReduceOp::Max)
                .map_err(comm_err("checking overflow"))?;
        }
        Ok(flag[0] > 0.0)
    }

    /// The global gradient norm: owned sums of squares all-reduced over the shard group.
    pub fn grad_norm(&mut self) -> Result<f64> {
        let local: f64 = (0..self.layout.units.len())
            .map(|u| sum_squares(&self.grads[u][self.owned(u)]))
            .sum();
        let mut s = [local as f32];
        if let Some(c) = self.groups.shard() {
            c.all_reduce((&mut s[..]).into(), ReduceOp::Sum)
                .map_err(comm_err("all-reducing the gradient norm"))?;
            return Ok((s[0] as f64).sqrt());
        }
        Ok(local.sqrt())
    }

    /// AdamW on the owned shard at learning rate `lr`, then (stages 0–2) the updated shards
    /// all-gathered into every rank's full parameters in `store`.
    pub fn apply(&mut self, store: &mut ParamStore, lr: f64) -> Result<()> {
        for u in 0..self.layout.units.len() {
            let owned = self.owned(u);
            let grads = &self.grads[u][owned];
            for seg in &mut self.segments[u] {
                let wd = if seg.decay {
                    self.adam.weight_decay
                } else {
                    0.0
                };
                let g = &grads[seg.in_shard.clone()];
                if self.stage >= 3 {
                    let p = &mut self.param_shards[u][seg.in_shard.clone()];
                    adamw_step(&self.adam, &mut seg.state, p, g, lr, wd);
                } else {
                    let p = &mut store.data_mut(seg.tensor)[seg.in_tensor.clone()];
                    adamw_step(&self.adam, &mut seg.state, p, g, lr, wd);
                }
            }
        }
        if self.stage < 3 && self.layout.group > 1 {
            let t = Instant::now();
            for u in 0..self.layout.units.len() {
                let s = self.layout.units[u].shard;
                let lo = self.shard_rank * s;
                let mut own = vec![0.0f32; s];
                self.layout.read(store, u, lo, lo + s, &mut own);
                let mut full = vec![0.0f32; s * self.layout.group];
                let c = self.groups.shard().context("a shard group")?;
                all_gather_pieces(c, &own, &mut full, self.gather_bucket, &mut self.scratch)
                    .map_err(comm_err("gathering updated parameters"))?;
                self.layout
                    .write(store, u, 0, &full[..self.layout.units[u].numel]);
            }
            self.comm_seconds += t.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// Zeroes the gradient accumulators for the next step.
    pub fn zero_grads(&mut self) {
        for g in &mut self.grads {
            g.fill(0.0);
        }
    }

    /// The model-state bytes this rank holds.
    pub fn memory(&self, trainable: &ParamStore, frozen: usize) -> (usize, usize, usize, usize) {
        let params = if self.stage >= 3 {
            self.param_shards.iter().map(Vec::len).sum::<usize>()
        } else {
            trainable.iter().map(|(_, d)| d.len()).sum()
        };
        let grads: usize = self.grads.iter().map(Vec::len).sum();
        let opt: usize = self
            .segments
            .iter()
            .flatten()
            .map(|s| s.state.exp_avg.len() + s.state.exp_avg_sq.len())
            .sum();
        (4 * params, 4 * grads, 4 * opt, 4 * frozen)
    }
}

/// The leaves of unit `u` cut from its full padded flat parameters.
fn unit_leaves(layout: &FlatLayout, u: usize, full: &[f32], grad: bool) -> Vec<Tensor<AD, 1>> {
    let unit = &layout.units[u];
    unit.tensors
        .clone()
        .enumerate()
        .map(|(k, t)| {
            let off = unit.offsets[k];
            leaf(&full[off..off + layout.sizes[t]], grad)
        })
        .collect()
}

/// One micro-batch of the unit-by-unit path ([`Engine::sharded_micro_batch`]).
pub struct MicroBatch<'a> {
    pub cfg: &'a LlamaConfig,
    pub inp: &'a Inputs<AD>,
    /// Next-token targets of every position.
    pub targets: &'a [i64],
    /// The loss is divided by it (the global batch's target count), like the whole-model path.
    pub normalizer: f64,
    /// Loss scale applied before backward (fp16; 1 otherwise).
    pub scale: f64,
    /// Compute dtype (`None` or F32: fp32).
    pub compute: Option<DType>,
}

impl MicroBatch<'_> {
    /// The inputs in the compute dtype (mask and RoPE tables cast for bf16/f16).
    fn compute_inputs(&self) -> Inputs<AD> {
        match self.compute {
            Some(dt) if dt != DType::F32 => self.inp.cast(dt),
            _ => self.inp.clone(),
        }
    }
}

/// The compute side of [`Engine::sharded_micro_batch`]: forward unit by unit keeping only unit
/// inputs, then backward in reverse, recomputing each unit with the upstream gradient injected
/// and handing its gradients to the communication thread.
fn unit_by_unit(
    layout: &FlatLayout,
    mb: &MicroBatch<'_>,
    queue: &mut CommQueue<'_>,
) -> Result<f64> {
    let &MicroBatch { cfg, compute, .. } = mb;
    let last = layout.units.len() - 1;
    let inp = mb.compute_inputs();
    let mut build = |u: usize, grad: bool| -> Result<Vec<Tensor<AD, 1>>> {
        let full = queue.take(u)?;
        Ok(unit_leaves(layout, u, &full, grad))
    };
    // Forward without a graph, keeping only each unit's input.
    let mut saved: Vec<Option<Tensor<AD, 2>>> = Vec::with_capacity(last);
    let mut x: Option<Tensor<AD, 2>> = None;
    for u in 0..last {
        let leaves = build(u, false)?;
        let w = UnitWeights::new(cfg, u, &leaves, None, compute)?;
        drop(leaves);
        saved.push(x.clone());
        x = Some(w.forward(cfg, x, &inp, compute).detach());
    }
    // The head (with the embedding table when tied) and the loss.
    let leaves = build(last, true)?;
    let tied = if cfg.tie_word_embeddings {
        Some(build(0, true)?.remove(0))
    } else {
        None
    };
    let xin = x.context("a model without units")?.require_grad();
    let HeadPass {
        value,
        grads: head_grads,
        mut pending_embed,
        mut up,
    } = head_pass(mb, &inp, last, leaves, tied, xin)?;
    queue.reduce(last, pad_unit(layout, last, &head_grads))?;
    drop(head_grads);
    // Blocks and embeddings in reverse: recompute with the upstream gradient injected.
    for u in (0..last).rev() {
        let full = queue.take(u)?;
        let leaves = unit_leaves(layout, u, &full, true);
        drop(full);
        let w = UnitWeights::new(cfg, u, &leaves, None, compute)?;
        let xin = saved.pop().flatten().map(Tensor::require_grad);
        let out = w.forward(cfg, xin.clone(), &inp, compute);
        drop(w);
        let grads = unit_backward(u, &leaves, xin, out, &mut up, &mut pending_embed)?;
        drop(leaves);
        queue.reduce(u, pad_unit(layout, u, &grads))?;
    }
    Ok(value)
}

/// The compute side of [`Engine::unit_graph_micro_batch`]: forward one kept graph per unit,
/// then backward from the loss down, unit by unit, each unit's gradients queued for the
/// communication thread before the next unit's backward runs.
fn unit_graphs(
    layout: &FlatLayout,
    params: &ParamStore,
    mb: &MicroBatch<'_>,
    last: bool,
    queue: &mut CommQueue<'_>,
) -> Result<f64> {
    let &MicroBatch { cfg, compute, .. } = mb;
    let head = layout.units.len() - 1;
    let inp = mb.compute_inputs();
    let leaves_of = |u: usize| -> Vec<Tensor<AD, 1>> {
        layout.units[u]
            .tensors
            .clone()
            .map(|t| leaf(params.data(t), true))
            .collect()
    };
    // Forward: unit u's graph starts at a fresh leaf holding unit u−1's output.
    let mut units: Vec<UnitGraph> = Vec::with_capacity(head);
    let mut x: Option<Tensor<AD, 2>> = None;
    for u in 0..head {
        let leaves = leaves_of(u);
        let w = UnitWeights::new(cfg, u, &leaves, None, compute)?;
        let xin = x.take().map(|t| t.detach().require_grad());
        let out = w.forward(cfg, xin.clone(), &inp, compute);
        x = Some(out.clone());
        units.push((leaves, xin, out));
    }
    // The head; a tied head gets its own leaf of the embedding table (a leaf shared by two
    // graphs would lose its gradient to the first backward).
    let leaves = leaves_of(head);
    let tied = cfg
        .tie_word_embeddings
        .then(|| leaf(params.data(layout.units[0].tensors.start), true));
    let xin = x.context("a model without units")?.detach().require_grad();
    let HeadPass {
        value,
        grads: head_grads,
        mut pending_embed,
        mut up,
    } = head_pass(mb, &inp, head, leaves, tied, xin)?;
    queue.unit(head, head_grads, last)?;
    while let Some((leaves, xin, out)) = units.pop() {
        let u = units.len();
        let grads = unit_backward(u, &leaves, xin, out, &mut up, &mut pending_embed)?;
        drop(leaves);
        queue.unit(u, grads, last)?;
    }
    Ok(value)
}

/// The gradient flowing down between units (no graph).
type UpGrad = Tensor<<AD as burn::tensor::backend::AutodiffBackend>::InnerBackend, 2>;

/// What the head's backward leaves for the units below it.
struct HeadPass {
    /// The micro-batch's loss (unscaled).
    value: f64,
    /// The head unit's gradients, one buffer per tensor.
    grads: Vec<Vec<f32>>,
    /// A tied head's gradient of the embedding table, for unit 0.
    pending_embed: Option<Vec<f32>>,
    /// The gradient at the head's input.
    up: UpGrad,
}

/// Head unit `head` on `xin` (a leaf that needs its gradient), the loss times the fp16 scale,
/// and its backward: shared by [`unit_by_unit`] and [`unit_graphs`].
fn head_pass(
    mb: &MicroBatch<'_>,
    inp: &Inputs<AD>,
    head: usize,
    leaves: Vec<Tensor<AD, 1>>,
    tied: Option<Tensor<AD, 1>>,
    xin: Tensor<AD, 2>,
) -> Result<HeadPass> {
    let w = UnitWeights::new(mb.cfg, head, &leaves, tied.as_ref(), mb.compute)?;
    let logits = w.forward(mb.cfg, Some(xin.clone()), inp, mb.compute);
    drop(w);
    let mut loss = cross_entropy(logits, mb.targets, mb.normalizer);
    if mb.scale != 1.0 {
        loss = loss.mul_scalar(mb.scale);
    }
    let value = super::scalar(loss.clone().inner()) / mb.scale;
    let g = loss.backward();
    let grads = leaf_grads(&leaves, &g);
    let pending_embed = tied.map(|t| leaf_grads(std::slice::from_ref(&t), &g).remove(0));
    let up = xin
        .grad(&g)
        .context("no gradient reached the head's input")?;
    Ok(HeadPass {
        value,
        grads,
        pending_embed,
        up,
    })
}

/// Backward of unit `u`'s graph `out` with the upstream gradient `up` injected: the unit's
/// gradients (a tied head's embedding gradient added to unit 0's); `up` becomes the gradient at
/// the unit's input, where it has one.
fn unit_backward(
    u: usize,
    leaves: &[Tensor<AD, 1>],
    xin: Option<Tensor<AD, 2>>,
    out: Tensor<AD, 2>,
    up: &mut UpGrad,
    pending_embed: &mut Option<Vec<f32>>,
) -> Result<Vec<Vec<f32>>> {
    let g = (out * Tensor::from_inner(up.clone())).sum().backward();
    let mut grads = leaf_grads(leaves, &g);
    if u == 0
        && let Some(p) = pending_embed.take()
    {
        grads[0].iter_mut().zip(&p).for_each(|(d, s)| *d += s);
    }
    if let Some(xin) = xin {
        *up = xin
            .grad(&g)
            .with_context(|| format!("no gradient reached unit {u}'s input"))?;
    }
    Ok(grads)
}

/// One unit's kept forward graph: its parameter leaves, the detached leaf holding its input
/// (none for the embeddings) and its output.
type UnitGraph = (Vec<Tensor<AD, 1>>, Option<Tensor<AD, 2>>, Tensor<AD, 2>);

/// Unit `u`'s tensors (`grads[k]` for its k-th) laid out as its padded full flat unit.
fn pad_unit(layout: &FlatLayout, u: usize, grads: &[Vec<f32>]) -> Vec<f32> {
    let unit = &layout.units[u];
    let mut full = vec![0.0f32; unit.shard * layout.group];
    for (k, g) in grads.iter().enumerate() {
        let off = unit.offsets[k];
        full[off..off + g.len()].copy_from_slice(g);
    }
    full
}

/// One unit's part of a checkpoint shard: the owned slice of parameters and AdamW moments
/// (`shard` elements; padding is zero).
#[derive(Debug, Clone)]
pub struct UnitState {
    pub param: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl Engine<'_> {
    /// This rank's index in the shard group (its shard of every unit).
    pub fn shard_rank(&self) -> usize {
        self.shard_rank
    }

    /// Whether this rank writes its shard to a checkpoint: the first replica of every shard
    /// (DDP: rank 0 alone; ZeRO: every rank; HYBRID: the ranks of the first node).
    pub fn writes_shard(&mut self) -> bool {
        self.groups.replica().is_none_or(|c| c.rank() == 0)
    }

    /// AdamW steps taken (the same for every segment).
    pub fn adam_step(&self) -> u64 {
        self.segments
            .iter()
            .flatten()
            .map(|s| s.state.step)
            .max()
            .unwrap_or(0)
    }

    /// The owned parameters and AdamW moments of every unit.
    pub fn export_state(&self, store: &ParamStore) -> Vec<UnitState> {
        (0..self.layout.units.len())
            .map(|u| {
                let s = self.layout.units[u].shard;
                let param = if self.stage >= 3 {
                    self.param_shards[u].clone()
                } else {
                    let lo = self.shard_rank * s;
                    let mut out = vec![0.0; s];
                    self.layout.read(store, u, lo, lo + s, &mut out);
                    out
                };
                let mut exp_avg = vec![0.0; s];
                let mut exp_avg_sq = vec![0.0; s];
                for seg in &self.segments[u] {
                    exp_avg[seg.in_shard.clone()].copy_from_slice(&seg.state.exp_avg);
                    exp_avg_sq[seg.in_shard.clone()].copy_from_slice(&seg.state.exp_avg_sq);
                }
                UnitState {
                    param,
                    exp_avg,
                    exp_avg_sq,
                }
            })
            .collect()
    }

    /// Loads the unit-flat elements `lo..lo + param.len()` of unit `u` from a checkpoint saved
    /// with any layout: parameters this rank holds (all of them below stage 3, its shard at
    /// stage 3) and the AdamW moments of its owned shard. Elements past the unit's size
    /// (padding) are ignored.
    pub fn import_range(
        &mut self,
        u: usize,
        lo: usize,
        state: &UnitState,
        adam_step: u64,
        store: &mut ParamStore,
    ) {
        let unit = &self.layout.units[u];
        let hi = (lo + state.param.len()).min(unit.numel);
        if lo >= hi {
            return;
        }
        let own_lo = self.shard_rank * unit.shard;
        let own_hi = own_lo + unit.shard;
        if self.stage >= 3 {
            let (a, b) = (lo.max(own_lo), hi.min(own_hi));
            if a < b {
                self.param_shards[u][a - own_lo..b - own_lo]
                    .copy_from_slice(&state.param[a - lo..b - lo]);
            }
        } else {
            self.layout.write(store, u, lo, &state.param[..hi - lo]);
        }
        for seg in &mut self.segments[u] {
            let (s0, s1) = (own_lo + seg.in_shard.start, own_lo + seg.in_shard.end);
            let (a, b) = (lo.max(s0), hi.min(s1));
            if a < b {
                seg.state.exp_avg[a - s0..b - s0].copy_from_slice(&state.exp_avg[a - lo..b - lo]);
                seg.state.exp_avg_sq[a - s0..b - s0]
                    .copy_from_slice(&state.exp_avg_sq[a - lo..b - lo]);
            }
            seg.state.step = adam_step;
        }
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
