//! The held-out loss (`val_size` rows or `eval_dataset`, with `eval_strategy` / `eval_steps` /
//! `do_eval`), as the HF Trainer computes `eval_loss`: when the strategy says, every rank runs
//! its share of the held-out rows through the engine's own pass ([`Engine::held_out_loss`]), batches of
//! `per_device_eval_batch_size` rows per rank (default: the training micro-batch, since the
//! pass keeps its backward's activations); rank 0 logs `{"step", "epoch", "eval_loss"}`
//! to `trainer_log.jsonl` and the console (`report::Window::eval`), and the points are plotted at the end
//! (`training_eval_loss.png` with `plot_loss`).
//!
//! The loss is the mean over every held-out target token (each batch weighted by its tokens;
//! the HF Trainer averages per-batch means, which differs only when batches hold different
//! token counts).

use anyhow::{Context, Result};
use ringmaster_config::TrainConfig;
use ringmaster_data::batch::{Batch, collate};

use super::engine::{Engine, StepInput, TrainBackend};
use super::setup::{Setup, evaluates_loss};

/// Steps between evaluations under `eval_strategy: steps`: `eval_steps`, or — unset or 0 —
/// `logging_steps` as given, as the HF Trainer falls back; with neither, the HF Trainer's
/// effective 500 (its `logging_steps` default), not Ringmaster's logging default of 10: an
/// evaluation pass every 10 steps would dominate a run.
pub fn eval_steps(cfg: &TrainConfig) -> u64 {
    cfg.eval_steps
        .filter(|&e| e > 0)
        .or(cfg.logging_steps.map(|l| l.max(1)))
        .unwrap_or(HF_LOGGING_STEPS)
}

/// The HF Trainer's `logging_steps` default.
const HF_LOGGING_STEPS: u64 = 500;

/// When the held-out loss is computed, and its points so far.
#[derive(Debug, Clone)]
pub struct HeldOut {
    every: Option<u64>,
    per_epoch: bool,
    at_end: bool,
    steps_per_epoch: u64,
    total: u64,
    batch: usize,
    /// (step, eval_loss) of every evaluation of this run.
    pub points: Vec<(u64, f64)>,
}

impl HeldOut {
    /// The schedule `setup`'s config asks for (nothing when no rows are held out).
    pub fn new(setup: &Setup, steps_per_epoch: u64, total: u64) -> HeldOut {
        let on = !setup.held_out.is_empty() && evaluates_loss(&setup.cfg);
        let strategy = setup.cfg.eval_strategy.as_deref().unwrap_or("no");
        let every = (on && strategy == "steps").then(|| eval_steps(&setup.cfg));
        HeldOut {
            every,
            per_epoch: on && strategy == "epoch",
            // An evaluation strategy implies `do_eval` (the HF Trainer's `__post_init__`), and
            // LLaMA-Factory evaluates once more after training when `do_eval` is set.
            at_end: on,
            steps_per_epoch: steps_per_epoch.max(1),
            total,
            // Each evaluation batch runs the plan's pass with its backward (see
            // `Engine::held_out_loss`), so by default it is no larger than a training
            // micro-batch; `per_device_eval_batch_size` sets it.
            batch: setup
                .cfg
                .per_device_eval_batch_size
                .map(|b| b as usize)
                .unwrap_or(setup.plan.micro_batch as usize)
                .max(1),
            points: Vec::new(),
        }
    }

    /// True when step `done` (1-based) ends with an evaluation: every `eval_steps`, at each
    /// epoch's end, and once after the last step (unless the last periodic one fell on it).
    pub fn due(&self, done: u64) -> bool {
        self.every.is_some_and(|e| done.is_multiple_of(e))
            || (self.per_epoch && (done.is_multiple_of(self.steps_per_epoch) || done == self.total))
            || (self.at_end && done == self.total)
    }

    /// Evaluates after step `done` on every rank (the same calls on each) and records the
    /// point; the caller logs it ([`super::report::Window::eval`]).
    pub fn evaluate<B: TrainBackend>(
        &mut self,
        setup: &mut Setup,
        eng: &mut Engine<'_, B>,
        rank: usize,
        world: usize,
        done: u64,
    ) -> Result<f64> {
        let pad_id = setup.tokenizer.pad_id_or_eos();
        let global = self.batch * world;
        let rows = setup.held_out.len();
        let (mut sum, mut tokens) = (0.0f64, 0.0f64);
        for start in (0..rows).step_by(global) {
            let end = (start + global).min(rows);
            let normalizer: usize = setup.held_out[start..end]
                .iter()
                .map(|s| s.num_targets())
                .sum();
            if normalizer == 0 {
                continue;
            }
            let mine =
                (start + rank * self.batch).min(end)..(start + (rank + 1) * self.batch).min(end);
            let micro: Vec<Option<Batch>> = vec![
                (!mine.is_empty()).then(|| collate(setup.held_out[mine.clone()].iter(), pad_id, 1)),
            ];
            let input = StepInput {
                step: done,
                micro: &micro,
                normalizer: normalizer as f64,
            };
            let loss = eng
                .held_out_loss(&mut setup.weights(), &input)
                .with_context(|| format!("held-out loss after step {done}"))?;
            sum += loss * normalizer as f64;
            tokens += normalizer as f64;
        }
        let eval_loss = if tokens > 0.0 { sum / tokens } else { f64::NAN };
        self.points.push((done, eval_loss));
        Ok(eval_loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_steps_fall_back_to_the_logging_interval() {
        let cfg = |text: &str| TrainConfig::from_yaml(text).unwrap();
        assert_eq!(eval_steps(&cfg("eval_steps: 7\nlogging_steps: 3\n")), 7);
        // Unset or 0: logging_steps, as the HF Trainer does.
        assert_eq!(eval_steps(&cfg("logging_steps: 3\n")), 3);
        assert_eq!(eval_steps(&cfg("eval_steps: 0\nlogging_steps: 4\n")), 4);
        // Neither: the HF Trainer's effective 500.
        assert_eq!(eval_steps(&cfg("stage: sft\n")), 500);
        assert_eq!(eval_steps(&cfg("logging_steps: 0\n")), 1);
    }
}
