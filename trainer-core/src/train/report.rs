//! What a run writes about itself: the logging window behind `trainer_log.jsonl` and the
//! console lines, and the end of the run (memory report, saved model, loss plot, evaluation).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use ringmaster_data::sampler::RankLayout;

use super::engine::{Engine, MemoryReport, StepOutcome, TrainBackend};
use super::setup::Setup;
use super::{LogLine, eval, save_model};

/// Rank 0's start-up lines: the config's warnings, the run's shape, how the engine runs (and
/// output_dir created).
pub fn announce<B: TrainBackend>(
    setup: &Setup,
    eng: &Engine<'_, B>,
    layout: &RankLayout,
    total: u64,
) -> Result<()> {
    std::fs::create_dir_all(&setup.output_dir)
        .with_context(|| format!("creating {}", setup.output_dir.display()))?;
    for w in &setup.warnings {
        eprintln!("trainer: warning: {w}");
    }
    let trainable = eng.layout().numel();
    let frozen = if setup.lora.is_some() {
        setup.base.numel()
    } else {
        0
    };
    eprintln!(
        "trainer: {} parameters ({trainable} trainable), {} samples, global batch {} ({} x {} \
         accumulation x {} ranks), {total} steps, plan {}, {}",
        trainable + frozen,
        setup.samples.len(),
        layout.global_batch_size(),
        layout.per_device_batch_size,
        layout.gradient_accumulation_steps,
        layout.world_size,
        setup.plan.label(),
        setup.plan.precision.name(),
    );
    eprintln!("trainer: {}", eng.describe());
    Ok(())
}

/// The steps since the last log line, and rank 0's log file.
pub struct Window {
    file: Option<(std::fs::File, PathBuf)>,
    logging_steps: u64,
    steps_per_epoch: u64,
    total: u64,
    fp16: bool,
    run_start: Instant,
    start: Instant,
    tokens: usize,
    wait: f64,
    loss: f64,
    steps: u64,
    skipped: u64,
}

impl Window {
    /// Rank 0 opens `trainer_log.jsonl` in `setup`'s output_dir (appending when the run resumes
    /// at `start_step` > 0); other ranks log nothing.
    pub fn new(setup: &Setup, rank: usize, start_step: u64, spe: u64, total: u64) -> Result<Self> {
        let file = if rank == 0 {
            let path = setup.output_dir.join("trainer_log.jsonl");
            let f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(start_step > 0)
                .truncate(start_step == 0)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            Some((f, path))
        } else {
            None
        };
        Ok(Window {
            file,
            logging_steps: super::setup::logging_steps(&setup.cfg),
            steps_per_epoch: spe.max(1),
            total,
            fp16: matches!(
                setup.plan.precision,
                ringmaster_config::plan::Precision::Fp16(_)
            ),
            run_start: Instant::now(),
            start: Instant::now(),
            tokens: 0,
            wait: 0.0,
            loss: 0.0,
            steps: 0,
            skipped: 0,
        })
    }

    /// Adds step `done` (1-based) and writes a line every `logging_steps` and at the end.
    pub fn step(
        &mut self,
        done: u64,
        out: &StepOutcome,
        tokens: usize,
        lr: f64,
        loss_scale: f64,
    ) -> Result<()> {
        self.wait += out.comm_wait;
        self.loss += out.loss;
        self.steps += 1;
        self.tokens += tokens;
        self.skipped += u64::from(out.skipped);
        if !done.is_multiple_of(self.logging_steps) && done != self.total {
            return Ok(());
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let line = LogLine {
            step: done,
            total_steps: self.total,
            epoch: done as f64 / self.steps_per_epoch as f64,
            loss: self.loss / self.steps as f64,
            lr,
            grad_norm: out.grad_norm,
            tokens_per_s: self.tokens as f64 / secs,
            collective_wait_s: self.wait,
            elapsed_s: self.run_start.elapsed().as_secs_f64(),
            loss_scale: self.fp16.then_some(loss_scale),
            skipped_steps: self.fp16.then_some(self.skipped),
        };
        if let Some((f, path)) = self.file.as_mut() {
            writeln!(f, "{}", serde_json::to_string(&line)?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!(
                "step {done}/{} loss {:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0}",
                self.total, line.loss, line.lr, line.grad_norm, line.tokens_per_s
            );
        }
        self.start = Instant::now();
        (self.tokens, self.wait, self.loss, self.steps, self.skipped) = (0, 0.0, 0.0, 0, 0);
        Ok(())
    }
}

impl Window {
    /// Rank 0 writes the held-out loss after step `done`: `{"step", "epoch", "eval_loss"}` in
    /// `trainer_log.jsonl` (LLaMA-Factory's key) and one console line.
    pub fn eval(&mut self, done: u64, eval_loss: f64) -> Result<()> {
        if let Some((f, path)) = self.file.as_mut() {
            let line = serde_json::json!({
                "step": done,
                "epoch": done as f64 / self.steps_per_epoch as f64,
                "eval_loss": eval_loss,
            });
            writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
            println!("eval step {done}/{} eval_loss {eval_loss:.4}", self.total);
        }
        Ok(())
    }
}

/// The end of a run: every rank writes `memory-rank{rank}.json`; the full weights are gathered;
/// rank 0 saves the model, the loss plots (`plot_loss`: training loss, and the held-out loss
/// when there is one) and the exact-match evaluation (`eval_dataset`, unless
/// `predict_with_generate: false`).
pub fn finish<B: TrainBackend>(
    setup: &mut Setup,
    eng: &mut Engine<'_, B>,
    rank: usize,
    world: usize,
    losses: &[f64],
    eval_losses: &[(u64, f64)],
) -> Result<Option<eval::EvalResult>>
where
    <B as AutodiffBackend>::InnerBackend: ringmaster_model::fused::Fused,
{
    let frozen = if setup.lora.is_some() {
        setup.base.numel()
    } else {
        0
    };
    let trainable = eng.layout().numel();
    let (param_bytes, grad_bytes, optimizer_bytes, frozen_bytes) =
        eng.memory(setup.weights().trainable(), frozen);
    let report = MemoryReport {
        rank,
        world,
        shard_group: eng.layout().group,
        stage: eng.stage(),
        plan: setup.plan.label(),
        trainable_elements: trainable,
        padding_elements: eng.layout().padding(),
        param_bytes,
        grad_bytes,
        optimizer_bytes,
        frozen_bytes,
        peak_rss_bytes: crate::progress::rss_bytes().1,
        backend: B::NAME.to_owned(),
        device: B::device_name(eng.device()),
        peak_device_bytes: eng.peak_device_bytes(),
    };
    let mem_path = setup.output_dir.join(format!("memory-rank{rank}.json"));
    std::fs::create_dir_all(&setup.output_dir)
        .and_then(|_| std::fs::write(&mem_path, serde_json::to_string_pretty(&report)? + "\n"))
        .with_context(|| format!("writing {}", mem_path.display()))?;
    if rank == 0 {
        let mib = |b: usize| b as f64 / 1048576.0;
        let device = match report.peak_device_bytes {
            Some(b) => format!(", peak device memory {:.1} MiB", mib(b as usize)),
            None => String::new(),
        };
        eprintln!(
            "trainer: rank 0 holds {:.1} MiB of model state (params {:.1}, grads {:.1}, \
             optimizer {:.1}), peak RSS {:.1} MiB{device}",
            mib(param_bytes + grad_bytes + optimizer_bytes),
            mib(param_bytes),
            mib(grad_bytes),
            mib(optimizer_bytes),
            mib(report.peak_rss_bytes as usize),
        );
    }
    eng.gather_full(setup.weights().trainable())?;
    if rank != 0 {
        return Ok(None);
    }
    save_model(setup, &setup.output_dir.clone())?;
    if setup.cfg.plot_loss == Some(true) {
        let points: Vec<(u64, f64)> = (1..).zip(losses.iter().copied()).collect();
        let png = setup.output_dir.join("training_loss.png");
        ringmaster_optim::plot::write_loss_png(&png, &points)
            .with_context(|| format!("writing {}", png.display()))?;
        if !eval_losses.is_empty() {
            // LLaMA-Factory's name for the held-out loss plot.
            let png = setup.output_dir.join("training_eval_loss.png");
            ringmaster_optim::plot::write_loss_png(&png, eval_losses)
                .with_context(|| format!("writing {}", png.display()))?;
        }
    }
    if setup.eval.is_empty() || !super::setup::scores_by_generation(&setup.cfg) {
        return Ok(None);
    }
    let r = eval::evaluate::<B::InnerBackend>(setup, eng.device())?;
    println!(
        "eval: exact match {}/{} = {:.1}%",
        r.correct,
        r.total,
        100.0 * r.accuracy
    );
    let path = setup.output_dir.join("eval_results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&r)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Some(r))
}
