//! This rank's batches of each step, collated ahead of the step by `dataloader_num_workers`
//! threads (the HF Trainer's DataLoader workers), or in the loop when it is 0 (the default).
//! Worker `w` of `N` prepares steps `start + w`, `start + w + N`, …, each into its own bounded
//! channel, so the loop receives them in order with at most `2 N` steps prepared ahead (torch's
//! default `prefetch_factor` of 2 per worker). The batches are the same whatever `N`.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use anyhow::{Result, anyhow};
use ringmaster_data::batch::{Batch, Sample, collate};
use ringmaster_data::sampler::{EpochPlan, RankLayout, Sampler};

/// Batches prepared per worker ahead of the loop (torch's default `prefetch_factor`).
pub const PREFETCH_FACTOR: usize = 2;

/// One step's data for this rank.
#[derive(Debug)]
pub struct StepData {
    /// This rank's micro-batches (`None`: the global batch left it none).
    pub micro: Vec<Option<Batch>>,
    /// Target tokens of the whole global batch.
    pub normalizer: usize,
    /// Non-padding tokens of the whole global batch.
    pub tokens: usize,
}

/// What every worker needs to prepare any step.
#[derive(Clone)]
struct Source {
    samples: Arc<Vec<Sample>>,
    sampler: Sampler,
    layout: RankLayout,
    rank: usize,
    pad_id: u32,
}

impl Source {
    fn prepare(&self, plan: &mut Option<EpochPlan>, step: u64) -> Result<StepData> {
        let pos = self.sampler.position_at(step);
        if plan.as_ref().is_none_or(|p| p.epoch() != pos.epoch) {
            *plan = Some(self.sampler.epoch(pos.epoch));
        }
        let plan = plan.as_ref().expect("set above");
        let global = plan.global_batch(pos.step);
        let normalizer = global.iter().map(|&i| self.samples[i].num_targets()).sum();
        let tokens = global
            .iter()
            .map(|&i| self.samples[i].num_real_tokens())
            .sum();
        let micro = plan
            .rank_batches(pos.step, &self.layout, self.rank)?
            .iter()
            .map(|idx| {
                (!idx.is_empty())
                    .then(|| collate(idx.iter().map(|&i| &self.samples[i]), self.pad_id, 1))
            })
            .collect();
        Ok(StepData {
            micro,
            normalizer,
            tokens,
        })
    }
}

/// The steps `start..total` of this rank, in order.
pub struct Loader {
    source: Source,
    plan: Option<EpochPlan>,
    workers: Vec<Receiver<Result<StepData>>>,
    start: u64,
}

impl Loader {
    /// Starts `workers` threads (none: [`Loader::get`] prepares each step when asked).
    pub fn new(
        samples: Arc<Vec<Sample>>,
        sampler: Sampler,
        layout: RankLayout,
        rank: usize,
        pad_id: u32,
        (start, total): (u64, u64),
        workers: usize,
    ) -> Loader {
        let source = Source {
            samples,
            sampler,
            layout,
            rank,
            pad_id,
        };
        let receivers = (0..workers as u64)
            .map(|w| {
                let (tx, rx) = sync_channel(PREFETCH_FACTOR);
                let src = source.clone();
                std::thread::Builder::new()
                    .name(format!("dataloader-{w}"))
                    .spawn(move || work(src, tx, start + w, total, workers as u64))
                    .expect("spawning a dataloader thread");
                rx
            })
            .collect();
        Loader {
            source,
            plan: None,
            workers: receivers,
            start,
        }
    }

    /// The data of `step`; with workers, steps must be asked for in order from `start`.
    ///
    /// # Errors
    /// The sampler's error for the step, or a worker that stopped.
    pub fn get(&mut self, step: u64) -> Result<StepData> {
        if self.workers.is_empty() {
            return self.source.prepare(&mut self.plan, step);
        }
        let w = ((step - self.start) % self.workers.len() as u64) as usize;
        self.workers[w]
            .recv()
            .map_err(|_| anyhow!("dataloader worker {w} stopped before step {step}"))?
    }
}

/// A worker's loop: every `stride`-th step from `first`, until the loop drops its receiver.
fn work(src: Source, tx: SyncSender<Result<StepData>>, first: u64, total: u64, stride: u64) {
    let mut plan = None;
    let mut step = first;
    while step < total {
        let data = src.prepare(&mut plan, step);
        let failed = data.is_err();
        if tx.send(data).is_err() || failed {
            return;
        }
        step += stride;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringmaster_data::sampler::SamplerConfig;

    fn sample(n: usize) -> Sample {
        let ids: Vec<u32> = (1..=n as u32).collect();
        let labels = ids.iter().map(|&i| i as i64).collect();
        Sample::single(ids, labels)
    }

    /// Any number of workers gives the loop the same batches, in order, as preparing them in
    /// the loop; a resume mid-run starts at the right step.
    #[test]
    fn workers_give_the_same_batches_in_order() {
        let samples = Arc::new((1..40).map(sample).collect::<Vec<_>>());
        let layout = RankLayout::new(2, 2, 3).unwrap();
        let sampler = Sampler::new(SamplerConfig::new(
            samples.len(),
            layout.global_batch_size(),
            7,
        ))
        .unwrap();
        let collect = |workers, start| {
            let mut l = Loader::new(
                samples.clone(),
                sampler.clone(),
                layout,
                1,
                0,
                (start, 9),
                workers,
            );
            (start..9)
                .map(|s| {
                    let d = l.get(s).unwrap();
                    (format!("{:?}", d.micro), d.normalizer, d.tokens)
                })
                .collect::<Vec<_>>()
        };
        let inline = collect(0, 0);
        assert_eq!(inline.len(), 9);
        for workers in [1, 2, 3] {
            assert_eq!(collect(workers, 0), inline, "{workers} workers");
            assert_eq!(
                collect(workers, 4)[..],
                inline[4..],
                "{workers} workers from 4"
            );
        }
    }
}
