//! The engine's state between passes: gradient accumulation and reduction, fp16 overflow,
//! the global norm, AdamW on the owned shard, ZeRO-3's parameter shards, checkpoint
//! export/import and the memory report.

use std::ops::Range;
use std::time::Instant;

use anyhow::{Context, Result};
use ringmaster_collectives::ReduceOp;
use ringmaster_model::ParamStore;
use ringmaster_optim::adamw::{AdamWState, adamw_step};
use ringmaster_optim::clip::{scale_in_place, sum_squares};
use ringmaster_optim::scaler::has_overflow;
use serde::Serialize;

use super::comm::{all_gather_pieces, comm_err};
use super::layout::{add_unit, owned_range, pad_unit};
use super::{Engine, TrainBackend};

/// AdamW state of one tensor's part of the owned shard.
pub(super) struct Segment {
    pub(super) tensor: usize,
    /// Range inside the tensor.
    pub(super) in_tensor: Range<usize>,
    /// Range inside the owned shard.
    pub(super) in_shard: Range<usize>,
    pub(super) decay: bool,
    pub(super) state: AdamWState,
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
    /// The burn backend the model ran on (`flex`, `ndarray`, `cuda`).
    pub backend: String,
    /// The device, as the start-up line names it (`cpu`, `cuda:0`).
    pub device: String,
    /// The most device memory the backend's allocator held after a step (CUDA: bytes reserved
    /// by its memory pool, sampled after every step, so at least the model state on the
    /// device; like `torch.cuda.max_memory_reserved`). None on the CPU backends.
    pub peak_device_bytes: Option<u64>,
}

/// One unit's part of a checkpoint shard: the owned slice of parameters and AdamW moments
/// (`shard` elements; padding is zero).
#[derive(Debug, Clone)]
pub struct UnitState {
    pub param: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

impl<B: TrainBackend> Engine<'_, B> {
    /// ZeRO-3: keeps this rank's shard of every unit and releases the full tensors of `store`
    /// (their buffers become empty until [`Engine::gather_full`]).
    pub(super) fn shard_params(&mut self, store: &mut ParamStore) {
        if self.spec.stage < 3 {
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
        if self.spec.stage < 3 {
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
        if self.spec.stage >= 3 {
            for (_, data) in store.iter_mut() {
                *data = Vec::new();
            }
        }
    }

    /// Adds one micro-batch's gradients of unit `u` (`grads[k]` for its k-th tensor): into the
    /// full accumulator (stage ≤ 1), or reduce-scattered into the owned shard (stage ≥ 2).
    pub(super) fn accumulate_unit(&mut self, u: usize, grads: &[Vec<f32>]) -> Result<()> {
        if self.spec.stage < 2 {
            add_unit(&self.layout, u, &mut self.grads[u], grads);
            return Ok(());
        }
        let full = pad_unit(&self.layout, u, grads);
        self.reduce_unit(u, full)
    }

    /// Adds a micro-batch's gradients of every trainable tensor (store order), computed by the
    /// whole model (stages 0–2).
    pub(super) fn accumulate(&mut self, grads: Vec<Vec<f32>>) -> Result<()> {
        for u in 0..self.layout.units.len() {
            let range = self.layout.units[u].tensors.clone();
            self.accumulate_unit(u, &grads[range])?;
        }
        Ok(())
    }

    /// The range of unit `u`'s gradient accumulator this rank owns.
    pub(super) fn owned(&self, u: usize) -> Range<usize> {
        owned_range(self.spec.stage, self.shard_rank, self.layout.units[u].shard)
    }

    /// Finishes the step's gradient reduction: ZeRO-0/1 reduce-scatter their full
    /// accumulators over the shard group; every plan all-reduces the owned shards over the
    /// replica group. Nothing is left to do when [`super::Pass::UnitGraphs`] finished
    /// each unit during the last micro-batch's backward.
    pub(super) fn reduce(&mut self) -> Result<()> {
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
    pub(super) fn scale_grads(&mut self, factor: f32) {
        for u in 0..self.layout.units.len() {
            let r = self.owned(u);
            scale_in_place(&mut self.grads[u][r], factor);
        }
    }

    /// Whether any rank's owned gradients hold an inf or NaN.
    pub(super) fn overflow(&mut self) -> Result<bool> {
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
    pub(super) fn grad_norm(&mut self) -> Result<f64> {
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
    pub(super) fn apply(&mut self, store: &mut ParamStore, lr: f64) -> Result<()> {
        for u in 0..self.layout.units.len() {
            let owned = self.owned(u);
            let grads = &self.grads[u][owned];
            for seg in &mut self.segments[u] {
                let wd = if seg.decay {
                    self.spec.adam.weight_decay
                } else {
                    0.0
                };
                let g = &grads[seg.in_shard.clone()];
                if self.spec.stage >= 3 {
                    let p = &mut self.param_shards[u][seg.in_shard.clone()];
                    adamw_step(&self.spec.adam, &mut seg.state, p, g, lr, wd);
                } else {
                    let p = &mut store.data_mut(seg.tensor)[seg.in_tensor.clone()];
                    adamw_step(&self.spec.adam, &mut seg.state, p, g, lr, wd);
                }
            }
        }
        if self.spec.stage < 3 && self.layout.group > 1 {
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
    pub(super) fn zero_grads(&mut self) {
        for g in &mut self.grads {
            g.fill(0.0);
        }
    }

    /// The model-state bytes this rank holds.
    pub fn memory(&self, trainable: &ParamStore, frozen: usize) -> (usize, usize, usize, usize) {
        let params = if self.spec.stage >= 3 {
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
                let param = if self.spec.stage >= 3 {
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
        if self.spec.stage >= 3 {
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
