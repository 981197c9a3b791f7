//! The training loop: data → [`engine::Engine::step`] → log, checkpoint, signals. The engine
//! owns the step (forward/backward of this rank's micro-batches, reduction, fp16 unscale and
//! overflow skip, clipping, AdamW); the loop picks the global batch and this rank's share of it,
//! reports progress, and checkpoints on `save_steps`, SIGTERM or a request.
//!
//! The loss of every micro-batch is divided by the number of target tokens of the whole global
//! batch, so the summed gradient is the gradient of the global mean loss whatever the split
//! over ranks and accumulation steps: a run on 4 ranks takes the steps a run on 1 rank takes.
//!
//! Layout: [`engine`] (the step), [`setup`] (config → model, data, tokenizer), [`resume`]
//! (checkpoint candidates and loading), [`checkpoint`] (sharded save/load, commit, prune),
//! [`report`] (log window, memory report, end of run), [`eval`] (exact match), [`held_out`]
//! (the `val_size` / `eval_dataset` evaluation loss), [`loader`] (batches collated ahead by
//! `dataloader_num_workers` threads), [`data_cache`] (tokenized-data cache).

pub mod checkpoint;
pub mod data_cache;
pub mod engine;
pub mod eval;
pub mod held_out;
pub mod loader;
pub mod report;
pub mod resume;
pub mod setup;
pub mod slow;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use burn::tensor::backend::Backend;
use ringmaster_collectives::Communicator;
use ringmaster_data::sampler::{RankLayout, Sampler, SamplerConfig};
use ringmaster_model::{hf, lora};
use ringmaster_optim::adamw::AdamWConfig;
use ringmaster_optim::schedule::{Scheduler, resolve_warmup};
use serde::Serialize;

use engine::{Engine, EngineSpec, Scaling, StepInput, StepSignals, TrainBackend};
pub use setup::{Setup, resolve};

/// One line of `trainer_log.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// Optimizer steps done.
    pub step: u64,
    /// Steps of the run.
    pub total_steps: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean loss over the logging window.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Global gradient norm of the last step (before clipping).
    pub grad_norm: f64,
    /// Tokens (non-padding, all ranks) per second over the window.
    pub tokens_per_s: f64,
    /// Seconds this rank's compute thread waited for collectives over the window (the rest of
    /// the window's time is compute and overlapped communication).
    pub collective_wait_s: f64,
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// fp16: the loss scale; steps skipped for overflow in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// fp16: steps skipped in the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped_steps: Option<u64>,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Optimizer steps.
    pub steps: u64,
    /// Loss of every step (mean over the global batch), in order.
    pub losses: Vec<f64>,
    /// Steps skipped for fp16 overflow.
    pub skipped_steps: u64,
    /// Tokens per second over the whole run.
    pub tokens_per_s: f64,
    /// Exact-match evaluation at the end, when `eval_dataset` is set (and `predict_with_generate`
    /// is not false).
    pub eval: Option<eval::EvalResult>,
    /// (step, eval_loss) of every held-out evaluation (`val_size` or `eval_dataset`) of this run.
    pub eval_losses: Vec<(u64, f64)>,
}

/// Data-parallel context: this process's rank and the communicator (None: one process).
pub struct Parallel<'a> {
    /// Rank.
    pub rank: usize,
    /// World size.
    pub world: usize,
    /// Communicator over all ranks.
    pub comm: Option<&'a mut dyn Communicator>,
    /// Hybrid plans on several nodes: the communicators of this node's ranks and of the ranks
    /// with this local rank on every node.
    pub hybrid: Option<(Box<dyn Communicator>, Box<dyn Communicator>)>,
    /// Per-step progress to the coordinator.
    pub progress: Option<&'a crate::progress::ProgressReporter>,
}

impl Parallel<'_> {
    /// A single process.
    pub fn single() -> Parallel<'static> {
        Parallel {
            rank: 0,
            world: 1,
            comm: None,
            hybrid: None,
            progress: None,
        }
    }
}

/// The ZeRO stage the trainable tensors get under `plan`: LoRA keeps the frozen base whole on
/// every rank, so its adapters are sharded at most as ZeRO-2 (the unit-by-unit path runs the
/// full model's units).
pub fn trainable_stage(plan: &ringmaster_config::plan::Plan, lora: bool) -> u8 {
    if lora {
        plan.stage().min(2)
    } else {
        plan.stage()
    }
}

/// Saving the checkpoint of `step` failed (the trainer exits 5, unless a collective failure
/// caused it).
#[derive(Debug, thiserror::Error)]
#[error("saving the checkpoint of step {step} failed")]
pub struct CheckpointFailed {
    pub step: u64,
}

/// The run stopped on SIGTERM after committing a checkpoint at `step`.
#[derive(Debug, thiserror::Error)]
#[error("terminated by SIGTERM after step {step} (checkpoint committed)")]
pub struct Terminated {
    pub step: u64,
}

/// The run's length must be something: `max_steps` above 0, or else `num_train_epochs` a
/// finite number above 0 (default 3). Zero or negative epochs without `max_steps` would train
/// nothing (the HF Trainer runs no step), infinite ones forever: refused, instead of one step.
///
/// # Errors
/// Names `num_train_epochs` and `max_steps` and their values.
pub fn check_duration(cfg: &ringmaster_config::TrainConfig) -> Result<()> {
    if cfg.max_steps.is_some_and(|m| m > 0) {
        return Ok(());
    }
    let epochs = cfg.num_train_epochs.unwrap_or(3.0);
    if epochs.is_finite() && epochs > 0.0 {
        return Ok(());
    }
    let max_steps = match cfg.max_steps {
        Some(m) => m.to_string(),
        None => "unset".into(),
    };
    Err(anyhow::anyhow!(
        "`num_train_epochs` {epochs} with `max_steps` {max_steps}: num_train_epochs must be a \
         finite number above 0 unless max_steps is above 0 (this run would train nothing)"
    ))
}

/// Total optimizer steps: `max_steps` when positive, else `ceil(epochs × steps_per_epoch)`
/// (at least 1; [`check_duration`] refuses epochs that are not above 0).
pub fn total_steps(setup: &Setup, steps_per_epoch: u64) -> u64 {
    match setup.cfg.max_steps {
        Some(m) if m > 0 => m as u64,
        _ => {
            let epochs = setup.cfg.num_train_epochs.unwrap_or(3.0);
            ((epochs * steps_per_epoch as f64).ceil() as u64).max(1)
        }
    }
}

/// How `world` ranks split each global batch, and the order of the samples over the epochs:
/// together they say which rows every rank trains on at every step (`trainer rows`).
///
/// # Errors
/// A batch size of zero, or no samples.
pub fn data_order(setup: &Setup, world: usize) -> Result<(RankLayout, Sampler)> {
    let layout = RankLayout::new(
        setup.plan.micro_batch as usize,
        setup.plan.grad_accum as usize,
        world,
    )?;
    // disable_shuffling: every epoch visits the samples in the merged dataset order.
    let sampler = Sampler::new(SamplerConfig {
        shuffle: !setup.cfg.disable_shuffling.unwrap_or(false),
        ..SamplerConfig::new(setup.samples.len(), layout.global_batch_size(), setup.seed)
    })?;
    Ok((layout, sampler))
}

/// Trains `setup` on this rank with the model on `device` of backend `B`. Rank 0 writes the
/// log, the plots and the saved model.
pub fn train<B: TrainBackend>(
    setup: &mut Setup,
    par: &mut Parallel<'_>,
    device: B::Device,
) -> Result<Summary> {
    let plan = setup.plan.clone();
    let (layout, sampler) = data_order(setup, par.world)?;
    let spe = sampler.steps_per_epoch();
    let total = total_steps(setup, spe);
    let sched = Scheduler {
        kind: setup.scheduler,
        base_lr: setup.learning_rate,
        warmup_steps: resolve_warmup(setup.cfg.warmup_steps, setup.cfg.warmup_ratio, total),
        total_steps: total,
        options: setup.schedule_options,
    };
    let mut scaling = Scaling::of(&plan);
    let save_steps = self::setup::save_steps(&setup.cfg);
    let is_lora = setup.lora.is_some();
    let stage = trainable_stage(&plan, is_lora);
    let (node, cross) = par.hybrid.take().unzip();
    let groups = engine::Groups {
        main: par.comm.take(),
        node,
        cross,
        // Hybrid on one node is ZeRO-3 over all ranks; with one rank per node it is DDP.
        main_shards: stage >= 1 && !(plan.hybrid && plan.shard_group_size() <= 1),
    };
    let spec = EngineSpec {
        plan: plan.clone(),
        stage,
        model: setup.model.clone(),
        lora: is_lora,
        lora_dropout: setup.lora.as_ref().map(|(l, _)| l.dropout).unwrap_or(0.0),
        adam: AdamWConfig {
            beta1: setup.betas.0,
            beta2: setup.betas.1,
            eps: setup.eps,
            weight_decay: setup.weight_decay,
        },
        seed: setup.seed,
        rank: par.rank,
    };
    let mut eng = Engine::<B>::new(spec, setup.weights().trainable(), groups, device)?;
    let global_batch = layout.global_batch_size();
    let resumed = resume::resume(setup, &mut eng, &mut scaling, par.rank, global_batch)?;
    if let Some(p) = par.progress {
        resume::tell(p, par.rank, &resumed, total);
    }
    if par.rank == 0 {
        report::announce(setup, &eng, &layout, total)?;
    }
    let mut window = report::Window::new(setup, par.rank, resumed.step, spe, total)?;
    let mut held_out = held_out::HeldOut::new(setup, spe, total);
    let start = Instant::now();
    let mut all_tokens = 0usize;
    let mut losses = Vec::with_capacity(total as usize);
    let mut skipped_total = 0u64;
    let pad_id = setup.tokenizer.pad_id_or_eos();
    let mut loader = loader::Loader::new(
        setup.samples.clone(),
        sampler,
        layout,
        par.rank,
        pad_id,
        (resumed.step, total),
        setup.cfg.dataloader_num_workers.unwrap_or(0) as usize,
    );
    let slow = slow::SlowSteps::from_env(u32::try_from(par.rank).unwrap_or(u32::MAX));
    let mut last_compute = Duration::ZERO;
    for step in resumed.step..total {
        let data = loader.get(step)?;
        let tokens = data.tokens;
        let input = StepInput {
            step,
            micro: &data.micro,
            normalizer: data.normalizer as f64,
        };
        let lr = sched.lr(step);
        let step_start = Instant::now();
        let injected = slow.as_ref().and_then(|s| s.delay(step, last_compute));
        if let Some(d) = injected {
            std::thread::sleep(d);
        }
        let out = eng
            .step(&mut setup.weights(), &input, &mut scaling, lr, || {
                StepSignals {
                    // SIGTERM or a checkpoint request on any rank: every rank checkpoints after
                    // this step.
                    stop: crate::signals::terminated(),
                    checkpoint: crate::signals::take_checkpoint_request(),
                }
            })
            .with_context(|| format!("step {step}"))?;
        let done = step + 1;
        losses.push(out.loss);
        all_tokens += tokens;
        skipped_total += u64::from(out.skipped);
        last_compute = step_start
            .elapsed()
            .saturating_sub(injected.unwrap_or_default())
            .saturating_sub(Duration::from_secs_f64(out.comm_wait.max(0.0)));
        if let Some(p) = par.progress {
            let secs = step_start.elapsed().as_secs_f64();
            p.report(crate::progress::StepReport {
                step: done,
                total_steps: total,
                loss: Some(out.loss),
                tokens_per_second: tokens as f64 / secs.max(1e-9),
                memory_bytes: crate::progress::rss_bytes().0,
                collective_seq: eng.collective_seq(),
                compute_seconds: secs - out.comm_wait,
                collective_wait_seconds: out.comm_wait,
                grad_norm: Some(out.grad_norm),
            });
        }
        window.step(done, &out, tokens, lr, scaling.scale())?;
        // A stop request checkpoints first: an evaluation could outlast the kill grace period.
        if held_out.due(done) && !out.signals.stop {
            let eval_loss = held_out.evaluate(setup, &mut eng, par.rank, par.world, done)?;
            window.eval(done, eval_loss)?;
        }
        let StepSignals { stop, checkpoint } = out.signals;
        if (save_steps > 0 && done % save_steps == 0 || stop || checkpoint) && done < total {
            let info = checkpoint::SaveInfo {
                step: done,
                world: par.world,
                plan: plan.label(),
                global_batch,
                seed: setup.seed,
                trainable: if is_lora { "lora" } else { "full" },
                scaler: scaling.dynamic().cloned(),
                weights_only: setup.cfg.save_only_model == Some(true),
            };
            let protect = resumed.from.as_deref();
            let dir =
                checkpoint::save_step(setup, &mut eng, par.rank, &info, par.progress, protect)
                    .map_err(|e| e.context(CheckpointFailed { step: done }))?;
            if stop {
                if par.rank == 0 {
                    eprintln!(
                        "trainer: stopped by SIGTERM after step {done}; checkpoint {} committed",
                        dir.display()
                    );
                }
                return Err(anyhow::Error::new(Terminated { step: done }));
            }
        }
    }
    let tokens_per_s = all_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let eval = report::finish(
        setup,
        &mut eng,
        par.rank,
        par.world,
        &losses,
        &held_out.points,
    )?;
    Ok(Summary {
        steps: total,
        losses,
        skipped_steps: skipped_total,
        tokens_per_s,
        eval,
        eval_losses: held_out.points,
    })
}

pub(crate) fn scalar<B: Backend>(t: burn::tensor::Tensor<B, 1>) -> f64 {
    t.into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .map(|v| v[0])
        .unwrap_or(f64::NAN)
}

/// Writes the model as a Hugging Face directory (config.json, weights, tokenizer files) or,
/// for LoRA, the PEFT adapter plus the tokenizer.
pub fn save_model(setup: &Setup, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    match &setup.lora {
        Some((lc, adapters)) => {
            let base_name = setup.model_dir.display().to_string();
            lora::save_adapter(dir, lc, adapters, &base_name, ringmaster_model::DType::F32)?;
            if setup.cfg.train_from_scratch == Some(true) {
                hf::save_dir(dir, &setup.model, &setup.base, hf::SaveOptions::default())?;
            }
        }
        None => hf::save_dir(dir, &setup.model, &setup.base, hf::SaveOptions::default())?,
    }
    setup.tokenizer.save_dir(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use ringmaster_config::TrainConfig;

    use super::check_duration;

    #[test]
    fn a_run_that_would_train_nothing_is_refused() {
        for refused in [
            "num_train_epochs: 0\n",
            "num_train_epochs: -1\n",
            "num_train_epochs: -1\nmax_steps: -1\n",
            "num_train_epochs: 0\nmax_steps: 0\n",
        ] {
            let cfg = TrainConfig::from_yaml(refused).unwrap();
            let e = check_duration(&cfg).unwrap_err().to_string();
            assert!(
                e.contains("`num_train_epochs`") && e.contains("`max_steps`"),
                "{refused}: {e}"
            );
        }
        let mut cfg = TrainConfig::from_yaml("num_train_epochs: 1\n").unwrap();
        cfg.num_train_epochs = Some(f64::INFINITY);
        assert!(check_duration(&cfg).is_err());
        for ok in [
            "{}\n",
            "num_train_epochs: 0.5\n",
            "num_train_epochs: 0\nmax_steps: 10\n",
            "num_train_epochs: -1\nmax_steps: 1\n",
        ] {
            let cfg = TrainConfig::from_yaml(ok).unwrap();
            assert!(check_duration(&cfg).is_ok(), "{ok}");
        }
    }
}
