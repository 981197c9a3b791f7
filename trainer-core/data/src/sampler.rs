//! The distributed sampler: which samples each rank trains on at each step.
//!
//! **Global order.** Epoch `e` visits the samples in the permutation of `0..N` produced by a
//! Fisher–Yates shuffle driven by [`DetRng::from_seeds`]`(&[seed, e])` (identity when
//! `shuffle` is off). Global step `s` of the epoch takes the slice `[s·G, (s+1)·G)` of that
//! permutation, `G` being the global batch size. Nothing here depends on the world size, so a
//! run on 4 ranks sees exactly the samples, step by step, that a run on 1 rank sees.
//!
//! **Split over ranks.** With `G = per_device_batch_size × gradient_accumulation_steps ×
//! world_size`, the global batch is dealt round-robin to `A·W` chunks: chunk
//! `c = micro_step · world_size + rank` gets positions `c, c + A·W, c + 2·A·W, …` of the
//! global batch (`A` accumulation steps, `W` ranks). A full batch gives every chunk exactly
//! `per_device_batch_size` samples, and the union over ranks and micro-steps of one step is
//! always the same `G` samples, whatever `W` is.
//!
//! **drop_last.** With `drop_last: true` an epoch has `⌊N / G⌋` steps and the last `N mod G`
//! samples of each epoch's permutation are not seen in that epoch (a different set every
//! epoch when shuffling). With `drop_last: false` (the default, as Hugging Face's Trainer) an
//! epoch has `⌈N / G⌉` steps and the last global batch holds the `N mod G` remaining samples;
//! dealt round-robin, some micro-batches may then be smaller or even empty, and a rank with an
//! empty micro-batch must still take part in the step's collectives (with zero gradient).
//!
//! **Resuming.** A [`DataPosition`] (epoch, step within the epoch) says which global batch comes
//! next; [`SamplerState`] adds everything the order depends on, so that resuming under a
//! different dataset, seed or global batch is refused, while any world size may resume.

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::DetRng;

/// What the global order depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Samples in the dataset (rows after packing).
    pub num_samples: usize,
    /// Samples per optimizer step, over all ranks and accumulation steps.
    pub global_batch_size: usize,
    /// The run's seed.
    pub seed: u64,
    /// Shuffle each epoch (else dataset order).
    pub shuffle: bool,
    /// Drop each epoch's incomplete last global batch.
    pub drop_last: bool,
}

impl SamplerConfig {
    /// Shuffled, keeping the last partial batch.
    pub fn new(num_samples: usize, global_batch_size: usize, seed: u64) -> Self {
        SamplerConfig {
            num_samples,
            global_batch_size,
            seed,
            shuffle: true,
            drop_last: false,
        }
    }
}

/// How one global batch is laid out over ranks and micro-steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankLayout {
    /// `per_device_train_batch_size`.
    pub per_device_batch_size: usize,
    /// `gradient_accumulation_steps`.
    pub gradient_accumulation_steps: usize,
    /// Number of data-parallel ranks.
    pub world_size: usize,
}

impl RankLayout {
    /// A layout; every factor must be at least 1.
    pub fn new(
        per_device_batch_size: usize,
        gradient_accumulation_steps: usize,
        world_size: usize,
    ) -> Result<Self> {
        for (name, v) in [
            ("per_device_train_batch_size", per_device_batch_size),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
            ("world_size", world_size),
        ] {
            if v == 0 {
                return Err(DataError::Config {
                    setting: name,
                    problem: "must be at least 1".into(),
                });
            }
        }
        Ok(RankLayout {
            per_device_batch_size,
            gradient_accumulation_steps,
            world_size,
        })
    }

    /// `per_device_batch_size × gradient_accumulation_steps × world_size`.
    pub fn global_batch_size(&self) -> usize {
        self.per_device_batch_size * self.gradient_accumulation_steps * self.world_size
    }
}

/// Where the data order stands: the next global batch is step `step` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, PartialOrd, Ord)]
pub struct DataPosition {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Global step within the epoch, from 0.
    pub step: u64,
}

/// The data part of a checkpoint: the order's inputs and the position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    /// The configuration the order was made with.
    pub config: SamplerConfig,
    /// The next global batch.
    pub position: DataPosition,
}

/// The deterministic, world-size independent sampler (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampler {
    cfg: SamplerConfig,
}

impl Sampler {
    /// A sampler; errors if the dataset is empty, the batch is 0, or `drop_last` leaves no
    /// full batch.
    pub fn new(cfg: SamplerConfig) -> Result<Self> {
        if cfg.num_samples == 0 {
            return Err(DataError::config("dataset", "the dataset has no samples"));
        }
        if cfg.global_batch_size == 0 {
            return Err(DataError::config("global_batch_size", "must be at least 1"));
        }
        if cfg.drop_last && cfg.num_samples < cfg.global_batch_size {
            return Err(DataError::config(
                "drop_last",
                format!(
                    "{} samples make no full global batch of {}",
                    cfg.num_samples, cfg.global_batch_size
                ),
            ));
        }
        Ok(Sampler { cfg })
    }

    /// Its configuration.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Global steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        let (n, g) = (self.cfg.num_samples, self.cfg.global_batch_size);
        (if self.cfg.drop_last {
            n / g
        } else {
            n.div_ceil(g)
        }) as u64
    }

    /// The order of epoch `epoch`.
    pub fn epoch(&self, epoch: u64) -> EpochPlan {
        let mut order: Vec<usize> = (0..self.cfg.num_samples).collect();
        if self.cfg.shuffle {
            DetRng::from_seeds(&[self.cfg.seed, epoch]).shuffle(&mut order);
        }
        EpochPlan {
            epoch,
            order,
            global_batch_size: self.cfg.global_batch_size,
            steps: self.steps_per_epoch(),
        }
    }

    /// The position after `global_step` completed optimizer steps since the start.
    pub fn position_at(&self, global_step: u64) -> DataPosition {
        let spe = self.steps_per_epoch();
        DataPosition {
            epoch: global_step / spe,
            step: global_step % spe,
        }
    }

    /// Completed optimizer steps since the start at `pos`.
    pub fn global_step_of(&self, pos: DataPosition) -> u64 {
        pos.epoch * self.steps_per_epoch() + pos.step
    }

    /// The position following `pos`.
    pub fn advance(&self, pos: DataPosition) -> DataPosition {
        if pos.step + 1 >= self.steps_per_epoch() {
            DataPosition {
                epoch: pos.epoch + 1,
                step: 0,
            }
        } else {
            DataPosition {
                epoch: pos.epoch,
                step: pos.step + 1,
            }
        }
    }

    /// What to store in a checkpoint at `position`.
    pub fn state(&self, position: DataPosition) -> SamplerState {
        SamplerState {
            config: self.cfg,
            position,
        }
    }

    /// Checks a checkpoint's state against this sampler and returns where to resume. Every
    /// input of the order must match; the world size and the per-device split may differ.
    pub fn resume(&self, state: &SamplerState) -> Result<DataPosition> {
        let (c, now) = (&state.config, &self.cfg);
        let checks: [(&'static str, String, String); 5] = [
            (
                "num_samples",
                c.num_samples.to_string(),
                now.num_samples.to_string(),
            ),
            (
                "global_batch_size",
                c.global_batch_size.to_string(),
                now.global_batch_size.to_string(),
            ),
            ("seed", c.seed.to_string(), now.seed.to_string()),
            ("shuffle", c.shuffle.to_string(), now.shuffle.to_string()),
            (
                "drop_last",
                c.drop_last.to_string(),
                now.drop_last.to_string(),
            ),
        ];
        for (field, checkpoint, current) in checks {
            if checkpoint != current {
                return Err(DataError::ResumeMismatch {
                    field,
                    checkpoint,
                    current,
                });
            }
        }
        if state.position.step >= self.steps_per_epoch() {
            return Err(DataError::ResumeMismatch {
                field: "step",
                checkpoint: state.position.step.to_string(),
                current: format!("at most {} steps per epoch", self.steps_per_epoch()),
            });
        }
        Ok(state.position)
    }
}

/// One epoch's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    epoch: u64,
    order: Vec<usize>,
    global_batch_size: usize,
    steps: u64,
}

impl EpochPlan {
    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The permutation of sample indices.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Global steps in this epoch.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The sample indices of global step `step` (empty past the end of the epoch).
    pub fn global_batch(&self, step: u64) -> &[usize] {
        if step >= self.steps {
            return &[];
        }
        let g = self.global_batch_size;
        let start = (step as usize) * g;
        let end = (start + g).min(self.order.len());
        &self.order[start..end]
    }

    fn check_layout(&self, layout: &RankLayout, step: u64, rank: usize) -> Result<()> {
        if layout.global_batch_size() != self.global_batch_size {
            return Err(DataError::config(
                "gradient_accumulation_steps",
                format!(
                    "per_device_train_batch_size {} × gradient_accumulation_steps {} × world size \
                     {} = {}, but the global batch size is {}",
                    layout.per_device_batch_size,
                    layout.gradient_accumulation_steps,
                    layout.world_size,
                    layout.global_batch_size(),
                    self.global_batch_size
                ),
            ));
        }
        if rank >= layout.world_size {
            return Err(DataError::config(
                "rank",
                format!(
                    "rank {rank} is not below the world size {}",
                    layout.world_size
                ),
            ));
        }
        if step >= self.steps {
            return Err(DataError::config(
                "step",
                format!(
                    "epoch {} has {} steps; step {step} is past it",
                    self.epoch, self.steps
                ),
            ));
        }
        Ok(())
    }

    /// The samples of `rank` at accumulation micro-step `micro_step` of global step `step`.
    pub fn micro_batch(
        &self,
        step: u64,
        layout: &RankLayout,
        rank: usize,
        micro_step: usize,
    ) -> Result<Vec<usize>> {
        self.check_layout(layout, step, rank)?;
        if micro_step >= layout.gradient_accumulation_steps {
            return Err(DataError::config(
                "gradient_accumulation_steps",
                format!(
                    "micro-step {micro_step} is not below {}",
                    layout.gradient_accumulation_steps
                ),
            ));
        }
        let chunks = layout.gradient_accumulation_steps * layout.world_size;
        let c = micro_step * layout.world_size + rank;
        Ok(self
            .global_batch(step)
            .iter()
            .skip(c)
            .step_by(chunks)
            .copied()
            .collect())
    }

    /// Every micro-batch of `rank` at global step `step`, in accumulation order.
    pub fn rank_batches(
        &self,
        step: u64,
        layout: &RankLayout,
        rank: usize,
    ) -> Result<Vec<Vec<usize>>> {
        (0..layout.gradient_accumulation_steps)
            .map(|m| self.micro_batch(step, layout, rank, m))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<usize>) -> Vec<usize> {
        v.sort_unstable();
        v
    }

    /// The union over ranks and micro-steps of one step, as a sorted multiset.
    fn step_union(plan: &EpochPlan, layout: &RankLayout, step: u64) -> Vec<usize> {
        let mut all = Vec::new();
        for r in 0..layout.world_size {
            for mb in plan.rank_batches(step, layout, r).unwrap() {
                all.extend(mb);
            }
        }
        sorted(all)
    }

    #[test]
    fn union_per_step_is_independent_of_world_size() {
        // G = 16 = 4×4×1 = 4×2×2 = 2×2×4 = 1×4×4
        let layouts = [
            RankLayout::new(4, 4, 1).unwrap(),
            RankLayout::new(16, 1, 1).unwrap(),
            RankLayout::new(4, 2, 2).unwrap(),
            RankLayout::new(2, 2, 4).unwrap(),
            RankLayout::new(1, 4, 4).unwrap(),
        ];
        for drop_last in [false, true] {
            let mut cfg = SamplerConfig::new(103, 16, 1234);
            cfg.drop_last = drop_last;
            let s = Sampler::new(cfg).unwrap();
            assert_eq!(s.steps_per_epoch(), if drop_last { 6 } else { 7 });
            for epoch in 0..3 {
                let plan = s.epoch(epoch);
                let mut seen = Vec::new();
                for step in 0..plan.steps() {
                    let want = sorted(plan.global_batch(step).to_vec());
                    for l in &layouts {
                        assert_eq!(step_union(&plan, l, step), want, "{l:?} step {step}");
                    }
                    seen.extend(want);
                }
                let seen = sorted(seen);
                if drop_last {
                    assert_eq!(seen.len(), 96);
                    seen.windows(2).for_each(|w| assert!(w[0] < w[1]));
                } else {
                    assert_eq!(seen, (0..103).collect::<Vec<_>>());
                }
            }
        }
    }

    #[test]
    fn full_batches_give_every_rank_per_device_batch() {
        let s = Sampler::new(SamplerConfig::new(64, 16, 7)).unwrap();
        let plan = s.epoch(0);
        let l = RankLayout::new(2, 2, 4).unwrap();
        for step in 0..plan.steps() {
            for r in 0..4 {
                for mb in plan.rank_batches(step, &l, r).unwrap() {
                    assert_eq!(mb.len(), 2);
                }
            }
        }
        // The fixed dealing rule: chunk c = micro·W + rank takes positions c, c + A·W, ...
        let gb = plan.global_batch(1).to_vec();
        assert_eq!(plan.micro_batch(1, &l, 3, 1).unwrap(), vec![gb[7], gb[15]]);
        assert_eq!(plan.micro_batch(1, &l, 0, 0).unwrap(), vec![gb[0], gb[8]]);
    }

    #[test]
    fn last_partial_batch_is_dealt_round_robin() {
        let s = Sampler::new(SamplerConfig::new(21, 8, 1)).unwrap();
        let plan = s.epoch(0);
        assert_eq!(plan.steps(), 3);
        assert_eq!(plan.global_batch(2).len(), 5);
        let l = RankLayout::new(2, 2, 2).unwrap();
        let sizes: Vec<usize> = (0..2)
            .flat_map(|r| plan.rank_batches(2, &l, r).unwrap())
            .map(|mb| mb.len())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), 5);
        assert!(sizes.iter().all(|&n| n == 1 || n == 2));
        // A world larger than the remainder leaves some micro-batches empty.
        let l = RankLayout::new(1, 1, 8).unwrap();
        let empties = (0..8)
            .filter(|&r| plan.micro_batch(2, &l, r, 0).unwrap().is_empty())
            .count();
        assert_eq!(empties, 3);
        assert!(plan.global_batch(3).is_empty());
    }

    #[test]
    fn seeds_and_epochs_change_the_order_deterministically() {
        let a = Sampler::new(SamplerConfig::new(1000, 10, 1)).unwrap();
        let b = Sampler::new(SamplerConfig::new(1000, 10, 2)).unwrap();
        assert_eq!(a.epoch(0).order(), a.epoch(0).order());
        assert_ne!(a.epoch(0).order(), b.epoch(0).order());
        assert_ne!(a.epoch(0).order(), a.epoch(1).order());
        assert_eq!(
            sorted(a.epoch(3).order().to_vec()),
            (0..1000).collect::<Vec<_>>()
        );
        let mut cfg = SamplerConfig::new(10, 3, 1);
        cfg.shuffle = false;
        let c = Sampler::new(cfg).unwrap();
        assert_eq!(c.epoch(5).order(), (0..10).collect::<Vec<_>>().as_slice());
        assert_eq!(c.epoch(0).global_batch(3), &[9]);
    }

    /// `disable_shuffling: true`: every epoch is the merged order, batches are consecutive
    /// slices of it, and resuming works (and refuses a shuffled checkpoint).
    #[test]
    fn unshuffled_order_is_the_dataset_order_every_epoch_and_resumes() {
        let cfg = SamplerConfig {
            shuffle: false,
            ..SamplerConfig::new(7, 3, 42)
        };
        let s = Sampler::new(cfg).unwrap();
        for e in 0..4 {
            let plan = s.epoch(e);
            assert_eq!(plan.order(), &[0, 1, 2, 3, 4, 5, 6]);
            assert_eq!(plan.global_batch(0), &[0, 1, 2]);
            assert_eq!(plan.global_batch(2), &[6]);
        }
        let pos = s.position_at(4);
        assert_eq!(pos, DataPosition { epoch: 1, step: 1 });
        let state = s.state(pos);
        assert_eq!(s.resume(&state).unwrap(), pos);
        assert_eq!(s.epoch(pos.epoch).global_batch(pos.step), &[3, 4, 5]);
        let shuffled = Sampler::new(SamplerConfig::new(7, 3, 42)).unwrap();
        let err = shuffled.resume(&state).unwrap_err().to_string();
        assert!(err.contains("`shuffle`"), "{err}");
    }

    #[test]
    fn global_order_is_pinned() {
        // Golden: a change here breaks resuming old checkpoints.
        let s = Sampler::new(SamplerConfig::new(10, 4, 42)).unwrap();
        assert_eq!(s.epoch(0).order(), GOLDEN_EPOCH0);
    }

    const GOLDEN_EPOCH0: &[usize] = &[6, 8, 7, 4, 1, 0, 3, 2, 9, 5];

    #[test]
    fn positions_and_resume() {
        let s = Sampler::new(SamplerConfig::new(10, 4, 42)).unwrap();
        assert_eq!(s.steps_per_epoch(), 3);
        let mut pos = DataPosition::default();
        for g in 0..10 {
            assert_eq!(s.position_at(g), pos);
            assert_eq!(s.global_step_of(pos), g);
            pos = s.advance(pos);
        }
        assert_eq!(pos, DataPosition { epoch: 3, step: 1 });
        let state = s.state(pos);
        let json = serde_json::to_string(&state).unwrap();
        let back: SamplerState = serde_json::from_str(&json).unwrap();
        assert_eq!(s.resume(&back).unwrap(), pos);
        // Another world size resumes fine: the order does not involve it.
        let l1 = RankLayout::new(4, 1, 1).unwrap();
        let l2 = RankLayout::new(1, 2, 2).unwrap();
        let plan = s.epoch(pos.epoch);
        let u1 = step_union(&plan, &l1, pos.step);
        let u2 = step_union(&plan, &l2, pos.step);
        assert_eq!(u1, u2);
        // A different dataset, seed or batch is refused, naming the field.
        for (cfg, field) in [
            (SamplerConfig::new(11, 4, 42), "num_samples"),
            (SamplerConfig::new(10, 5, 42), "global_batch_size"),
            (SamplerConfig::new(10, 4, 43), "seed"),
        ] {
            let err = Sampler::new(cfg)
                .unwrap()
                .resume(&state)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{field}`")), "{err}");
        }
        let mut bad = state;
        bad.position.step = 3;
        assert!(s.resume(&bad).is_err());
    }

    #[test]
    fn invalid_settings() {
        assert!(Sampler::new(SamplerConfig::new(0, 4, 1)).is_err());
        assert!(Sampler::new(SamplerConfig::new(4, 0, 1)).is_err());
        let mut cfg = SamplerConfig::new(3, 4, 1);
        cfg.drop_last = true;
        let err = Sampler::new(cfg).unwrap_err().to_string();
        assert!(err.contains("drop_last"), "{err}");
        assert!(
            RankLayout::new(0, 1, 1)
                .unwrap_err()
                .to_string()
                .contains("per_device_train_batch_size")
        );
        let s = Sampler::new(SamplerConfig::new(16, 8, 1)).unwrap();
        let plan = s.epoch(0);
        let err = plan
            .micro_batch(0, &RankLayout::new(2, 2, 1).unwrap(), 0, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("= 4, but the global batch size is 8"), "{err}");
        let l = RankLayout::new(2, 2, 2).unwrap();
        assert!(plan.micro_batch(0, &l, 2, 0).is_err());
        assert!(plan.micro_batch(0, &l, 0, 2).is_err());
        assert!(plan.micro_batch(2, &l, 0, 0).is_err());
    }
}
