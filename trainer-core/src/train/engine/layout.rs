//! The flat units: the trainable tensors grouped by `ParamSpec::unit`, each padded to a
//! multiple of the shard group, and the ranges of them a rank owns.

use std::ops::Range;

use anyhow::{Result, bail};
use ringmaster_model::ParamStore;
use ringmaster_model::params::ParamSpec;

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
    pub(super) fn segments(
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
    pub(super) sizes: Vec<usize>,
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
    pub(super) fn read(&self, store: &ParamStore, u: usize, lo: usize, hi: usize, out: &mut [f32]) {
        out.fill(0.0);
        for (t, tr, fr) in self.units[u].segments(&self.sizes, lo, hi) {
            out[fr].copy_from_slice(&store.data(t)[tr]);
        }
    }

    /// Writes `src` to unit `u`'s flat elements `lo..hi` of `store` (padding is dropped).
    pub(super) fn write(&self, store: &mut ParamStore, u: usize, lo: usize, src: &[f32]) {
        let hi = lo + src.len();
        for (t, tr, fr) in self.units[u].segments(&self.sizes, lo, hi) {
            store.data_mut(t)[tr].copy_from_slice(&src[fr]);
        }
    }
}

/// The range of a unit's gradient accumulator a rank owns: the whole owned accumulator
/// (stage ≥ 2) or its shard of the full one.
pub(super) fn owned_range(stage: u8, shard_rank: usize, shard: usize) -> Range<usize> {
    if stage >= 2 {
        0..shard
    } else {
        shard_rank * shard..(shard_rank + 1) * shard
    }
}

/// Unit `u`'s tensors (`grads[k]` for its k-th) laid out as its padded full flat unit.
pub(super) fn pad_unit(layout: &FlatLayout, u: usize, grads: &[Vec<f32>]) -> Vec<f32> {
    let unit = &layout.units[u];
    let mut full = vec![0.0f32; unit.shard * layout.group];
    for (k, g) in grads.iter().enumerate() {
        let off = unit.offsets[k];
        full[off..off + g.len()].copy_from_slice(g);
    }
    full
}

/// Adds unit `u`'s tensors (`grads[k]` for its k-th) into its full flat accumulator `acc`.
pub(super) fn add_unit(layout: &FlatLayout, u: usize, acc: &mut [f32], grads: &[Vec<f32>]) {
    let unit = &layout.units[u];
    for (k, g) in grads.iter().enumerate() {
        let off = unit.offsets[k];
        acc[off..off + g.len()]
            .iter_mut()
            .zip(g)
            .for_each(|(d, s)| *d += s);
    }
}
