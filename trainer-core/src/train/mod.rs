//! The training loop: one optimizer step = the global batch's micro-batches forward and
//! backward, gradients summed (and all-reduced over data-parallel ranks when a communicator is
//! given), fp16 unscale and overflow skip, global-norm clipping, AdamW on flat fp32 tensors.
//!
//! The loss of every micro-batch is divided by the number of target tokens of the whole global
//! batch, so the summed gradient is the gradient of the global mean loss whatever the split
//! over ranks and accumulation steps: a run on 4 ranks takes the steps a run on 1 rank takes.

pub mod checkpoint;
pub mod data_cache;
pub mod engine;
pub mod eval;
pub mod setup;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use burn::tensor::backend::Backend;
use ringmaster_collectives::{Communicator, ReduceOp};
use ringmaster_config::plan::{LossScale, Precision};
use ringmaster_data::batch::collate;
use ringmaster_data::sampler::{RankLayout, Sampler, SamplerConfig};
use ringmaster_model::model::{Dropout, Inputs, Llama, cross_entropy, leaf_grads};
use ringmaster_model::{CpuAutodiff, ParamStore, hf, lora};
use ringmaster_optim::adamw::AdamWConfig;
use ringmaster_optim::clip::clip_coef;
use ringmaster_optim::scaler::{DynamicLossScaler, LossScalerConfig};
use ringmaster_optim::schedule::{Scheduler, resolve_warmup};
use serde::Serialize;

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
    /// Exact-match evaluation at the end, when `eval_dataset` is set.
    pub eval: Option<eval::EvalResult>,
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

/// The run stopped on SIGTERM after committing a checkpoint at `step`.
#[derive(Debug, thiserror::Error)]
#[error("terminated by SIGTERM after step {step} (checkpoint committed)")]
pub struct Terminated {
    pub step: u64,
}

/// The loss scale of a step and what to do with its gradients.
enum Scaling {
    None,
    Static(f64),
    Dynamic(DynamicLossScaler),
}

impl Scaling {
    fn scale(&self) -> f64 {
        match self {
            Scaling::None => 1.0,
            Scaling::Static(s) => *s,
            Scaling::Dynamic(d) => d.scale(),
        }
    }
}

/// The trainable tensors: the base weights (full fine-tuning) or the adapters (LoRA).
fn trainable_mut(setup: &mut Setup) -> &mut ParamStore {
    match &mut setup.lora {
        Some((_, a)) => a,
        None => &mut setup.base,
    }
}

/// Refuses a coordinator-given resume point outside `output_dir`: the next generation would
/// otherwise read (and, through `save_total_limit`, protect) whatever directory a report named.
fn check_resume_inside(ckpt: &std::path::Path, output_dir: &std::path::Path) -> Result<()> {
    use ringmaster_config::paths::resolve;
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let resolve = |p: &std::path::Path| {
        resolve(p, &cwd).map_err(|(at, e)| anyhow!("resolving {}: {e}", at.display()))
    };
    let (c, out) = (resolve(ckpt)?, resolve(output_dir)?);
    if c == out || !c.starts_with(&out) {
        return Err(anyhow!(
            "RINGMASTER_RESUME_FROM={} ({}) is not a checkpoint inside output_dir {} ({}): \
             refusing to resume from it",
            ckpt.display(),
            c.display(),
            output_dir.display(),
            out.display()
        ));
    }
    Ok(())
}

/// The checkpoints to resume from, in order of preference, and whether only the first may be
/// used. `RINGMASTER_RESUME_FROM` (set by the coordinator: the job's last committed checkpoint)
/// comes first, falling back to the older committed checkpoints of `output_dir`; else the
/// config's `resume_from_checkpoint` (a directory, strict; or `true` for the newest committed
/// one in `output_dir` as the HF Trainer reads it, with fallback); else — in a restarted
/// generation (`RINGMASTER_GENERATION` > 0) — the committed checkpoints of `output_dir`, newest
/// first. A corrupt candidate falls back to the next one.
fn resume_candidates(setup: &Setup) -> Result<(Vec<std::path::PathBuf>, bool)> {
    let all = || -> Vec<(u64, std::path::PathBuf)> { checkpoint::committed(&setup.output_dir) };
    if let Ok(p) = std::env::var("RINGMASTER_RESUME_FROM")
        && !p.is_empty()
    {
        let first = std::path::PathBuf::from(&p);
        check_resume_inside(&first, &setup.output_dir)?;
        let step = checkpoint::step_of(&first);
        let same = |q: &std::path::Path| {
            std::fs::canonicalize(q).ok() == std::fs::canonicalize(&first).ok()
        };
        // A committed checkpoint newer than the coordinator's record (rank 0 committed it
        // but died, or the coordinator was down, before the report landed) passed the same
        // barrier, so it comes first; then the named one; then older ones to fall back on.
        let found = all();
        let newer = found
            .iter()
            .filter(|(s, q)| step.is_some_and(|st| *s > st) && !same(q))
            .map(|(_, q)| q.clone());
        let older = found
            .iter()
            .filter(|(s, q)| step.is_none_or(|st| *s < st) && !same(q))
            .map(|(_, q)| q.clone());
        let out = newer.chain([first.clone()]).chain(older).collect();
        return Ok((out, false));
    }
    let paths = || all().into_iter().map(|(_, p)| p).collect::<Vec<_>>();
    match setup.cfg.resume_from_checkpoint.as_deref() {
        None | Some("") | Some("false") | Some("False") => {
            let generation: u64 = std::env::var("RINGMASTER_GENERATION")
                .ok()
                .and_then(|g| g.parse().ok())
                .unwrap_or(0);
            Ok((if generation > 0 { paths() } else { Vec::new() }, false))
        }
        Some("true") | Some("True") => {
            let found = paths();
            if found.is_empty() {
                return Err(anyhow!(
                    "resume_from_checkpoint: true, but {} holds no committed checkpoint",
                    setup.output_dir.display()
                ));
            }
            Ok((found, false))
        }
        Some(p) => Ok((vec![p.into()], true)),
    }
}

/// Total optimizer steps: `max_steps` when positive, else `ceil(epochs × steps_per_epoch)`.
pub fn total_steps(setup: &Setup, steps_per_epoch: u64) -> u64 {
    match setup.cfg.max_steps {
        Some(m) if m > 0 => m as u64,
        _ => {
            let epochs = setup.cfg.num_train_epochs.unwrap_or(3.0);
            ((epochs * steps_per_epoch as f64).ceil() as u64).max(1)
        }
    }
}

/// Trains `setup` on this rank. Rank 0 writes the log, the plots and the saved model.
pub fn train(setup: &mut Setup, par: &mut Parallel<'_>) -> Result<Summary> {
    let device = Default::default();
    let plan = setup.plan.clone();
    let layout = RankLayout::new(
        plan.micro_batch as usize,
        plan.grad_accum as usize,
        par.world,
    )?;
    let sampler = Sampler::new(SamplerConfig::new(
        setup.samples.len(),
        layout.global_batch_size(),
        setup.seed,
    ))?;
    let spe = sampler.steps_per_epoch();
    let total = total_steps(setup, spe);
    let warmup = resolve_warmup(setup.cfg.warmup_steps, setup.cfg.warmup_ratio, total);
    let sched = Scheduler {
        kind: setup.scheduler,
        base_lr: setup.learning_rate,
        warmup_steps: warmup,
        total_steps: total,
    };
    let adam = AdamWConfig {
        beta1: setup.betas.0,
        beta2: setup.betas.1,
        eps: setup.eps,
        weight_decay: setup.weight_decay,
    };
    let mut scaling = match plan.precision {
        Precision::Fp16(LossScale::Static(s)) => Scaling::Static(s),
        Precision::Fp16(LossScale::Dynamic {
            initial_scale_power,
            loss_scale_window,
            hysteresis,
            consecutive_hysteresis,
            min_loss_scale,
        }) => Scaling::Dynamic(DynamicLossScaler::new(LossScalerConfig {
            initial_scale_power,
            loss_scale_window: loss_scale_window as u64,
            hysteresis,
            min_loss_scale,
            consecutive_hysteresis,
        })),
        _ => Scaling::None,
    };
    let max_grad_norm = plan.clip.unwrap_or(0.0);
    let compute = match plan.precision {
        Precision::Fp32 => None,
        Precision::Bf16 => Some(burn::tensor::DType::BF16),
        Precision::Fp16(_) => Some(burn::tensor::DType::F16),
    };
    let pad_id = setup.tokenizer.pad_id_or_eos();
    let logging_steps = setup.cfg.logging_steps.unwrap_or(10).max(1);
    let save_steps = setup.cfg.save_steps.unwrap_or(0);
    let lora_dropout = setup.lora.as_ref().map(|(l, _)| l.dropout).unwrap_or(0.0);
    let is_lora = setup.lora.is_some();

    let numel = trainable_mut(setup).numel();
    let stage = trainable_stage(&plan, is_lora);
    if par.rank == 0 && stage < plan.stage() {
        eprintln!(
            "trainer: warning: plan {}: LoRA keeps the frozen base model whole on every rank; \
             the adapters' gradients and optimizer state are sharded as ZeRO-{stage}",
            plan.label()
        );
    }
    let (node, cross) = match par.hybrid.take() {
        Some((n, c)) => (Some(n), Some(c)),
        None => (None, None),
    };
    let groups = engine::Groups {
        main: par.comm.take(),
        node,
        cross,
        // Hybrid on one node is ZeRO-3 over all ranks; with one rank per node it is DDP.
        main_shards: stage >= 1 && !(plan.hybrid && plan.shard_group_size() <= 1),
    };
    let mut eng = engine::Engine::new(&plan, stage, trainable_mut(setup), groups, adam)?;
    // Stages 0–2 with overlap: one graph per unit, each unit reduced as its backward ends.
    let unit_graphs = eng.overlaps_reduction(!is_lora);
    eng.shard_params(trainable_mut(setup));
    let trainable_kind = if is_lora { "lora" } else { "full" };
    let mut start_step = 0u64;
    let mut resumed_from = None;
    let (candidates, strict) = resume_candidates(setup)?;
    let mut skipped = Vec::new();
    let load_start = Instant::now();
    for (i, dir) in candidates.iter().enumerate() {
        let m = match checkpoint::load(
            dir,
            &mut eng,
            trainable_mut(setup),
            trainable_kind,
            layout.global_batch_size(),
        ) {
            Ok(m) => m,
            // A restarted generation falls back to the previous committed checkpoint when the
            // newest cannot be used (corrupt shard); an explicit path is an error.
            Err(e) if !strict && i + 1 < candidates.len() => {
                eprintln!(
                    "trainer: warning: rank {}: cannot resume from {}: {e:#}; trying the previous \
                     committed checkpoint",
                    par.rank,
                    dir.display()
                );
                skipped.push(format!("{}: {e:#}", dir.display()));
                continue;
            }
            Err(e) => return Err(e),
        };
        resumed_from = Some(dir.clone());
        start_step = m.step;
        if let (Scaling::Dynamic(d), Some(saved)) = (&mut scaling, m.scaler.clone()) {
            d.cur_scale = saved.cur_scale;
            d.cur_iter = saved.cur_iter;
            d.last_overflow_iter = saved.last_overflow_iter;
            d.cur_hysteresis = saved.cur_hysteresis;
        }
        if par.rank == 0 {
            eprintln!(
                "trainer: resumed from {} at step {} (saved by {} ranks under {}; loaded in \
                 {:.3} s)",
                dir.display(),
                m.step,
                m.world,
                m.plan,
                load_start.elapsed().as_secs_f64()
            );
        }
        break;
    }
    if let Some(p) = par.progress {
        if par.rank == 0 {
            p.resumed(
                resumed_from.as_deref().map(|d| (start_step, d)),
                skipped.clone(),
            );
        }
        // Every rank says it is ready to train (the status shows the resumed step at once; the
        // recovery benchmark times "every rank training again" from it).
        p.report(crate::progress::StepReport {
            step: start_step,
            total_steps: total,
            memory_bytes: crate::progress::rss_bytes().0,
            ..Default::default()
        });
    }
    let dir_of = |d: &std::path::PathBuf| d.display().to_string();
    if !candidates.is_empty() && resumed_from.is_none() {
        return Err(anyhow!(
            "no usable checkpoint among {}",
            candidates.iter().map(dir_of).collect::<Vec<_>>().join(", ")
        ));
    }
    let save_total_limit = setup.cfg.save_total_limit.map(|n| n as usize);
    let frozen = if is_lora { setup.base.numel() } else { 0 };
    let cfg_model = setup.model.clone();
    if par.rank == 0 {
        std::fs::create_dir_all(&setup.output_dir)
            .with_context(|| format!("creating {}", setup.output_dir.display()))?;
        for w in &setup.warnings {
            eprintln!("trainer: warning: {w}");
        }
        eprintln!(
            "trainer: {} parameters ({} trainable), {} samples, global batch {} ({} x {} accumulation x {} ranks), {} steps, plan {}, {}",
            setup.base.numel(),
            numel,
            setup.samples.len(),
            layout.global_batch_size(),
            layout.per_device_batch_size,
            layout.gradient_accumulation_steps,
            par.world,
            total,
            plan.label(),
            plan.precision.name(),
        );
        if stage >= 3 {
            eprintln!("trainer: ZeRO-3 communication: {}", eng.overlap());
        } else if unit_graphs {
            eprintln!(
                "trainer: gradient reduction: unit by unit, overlapped with backward \
                 (stage {stage})"
            );
        }
    }
    let log_path = setup.output_dir.join("trainer_log.jsonl");
    let mut log_file = if par.rank == 0 {
        // A resumed run continues the log of the run it resumes.
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(start_step > 0)
                .truncate(start_step == 0)
                .open(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?,
        )
    } else {
        None
    };

    let start = Instant::now();
    let mut window_start = Instant::now();
    let mut window_tokens = 0usize;
    let mut window_wait = 0.0f64;
    let mut window_loss = 0.0f64;
    let mut window_steps = 0u64;
    let mut window_skipped = 0u64;
    let mut all_tokens = 0usize;
    let mut losses = Vec::with_capacity(total as usize);
    let mut skipped_total = 0u64;
    let mut epoch_plan = sampler.epoch(0);

    for step in start_step..total {
        let pos = sampler.position_at(step);
        if epoch_plan.epoch() != pos.epoch {
            epoch_plan = sampler.epoch(pos.epoch);
        }
        let global = epoch_plan.global_batch(pos.step);
        let normalizer: usize = global.iter().map(|&i| setup.samples[i].num_targets()).sum();
        let step_tokens: usize = global
            .iter()
            .map(|&i| setup.samples[i].num_real_tokens())
            .sum();
        let micro = epoch_plan.rank_batches(pos.step, &layout, par.rank)?;
        let scale = scaling.scale();
        let step_start = Instant::now();
        eng.zero_grads();
        let mut local_loss = 0.0f64;
        let mut dropout = (lora_dropout > 0.0)
            .then(|| Dropout::new(lora_dropout, setup.seed ^ (step << 16) ^ par.rank as u64));
        for (mi, idx) in micro.iter().enumerate() {
            let last = mi + 1 == micro.len();
            if idx.is_empty() {
                // Sharded plans still take part in this micro-batch's collectives.
                eng.idle_micro_batch(&cfg_model, last, unit_graphs)?;
                continue;
            }
            let batch = collate(idx.iter().map(|&i| &setup.samples[i]), pad_id, 1);
            let targets = batch.shifted_labels();
            let inp = Inputs::<CpuAutodiff>::new(
                &setup.model,
                batch.batch_size,
                batch.seq_len,
                &batch.input_ids,
                &batch.position_ids,
                &batch.segment_ids,
                &device,
            )?;
            let mb = engine::MicroBatch {
                cfg: &cfg_model,
                inp: &inp,
                targets: &targets,
                normalizer: normalizer as f64,
                scale,
                compute,
            };
            if stage >= 3 {
                local_loss += eng.sharded_micro_batch(&mb)?;
                continue;
            }
            if unit_graphs {
                local_loss += eng.unit_graph_micro_batch(&mb, &setup.base, last)?;
                continue;
            }
            // A fresh set of leaves per micro-batch: burn's autodiff frees a graph's nodes on
            // backward, and leaves reused in a second graph lose their gradients (measured:
            // accumulation then equals the first micro-batch only).
            let lora_ref = setup.lora.as_ref().map(|(l, a)| (l, a));
            let model = Llama::<CpuAutodiff>::new_mixed(
                &setup.model,
                &setup.base,
                !is_lora,
                lora_ref,
                &device,
                compute,
            )?;
            let leaves = if is_lora {
                model.adapter_leaves()
            } else {
                model.base_leaves()
            };
            let logits = model.forward(&inp, dropout.as_mut());
            let loss = cross_entropy(logits, &targets, normalizer as f64);
            let loss = if scale != 1.0 {
                loss.mul_scalar(scale)
            } else {
                loss
            };
            let g = loss.backward();
            local_loss += scalar(loss.inner()) / scale;
            let grads = leaf_grads(leaves, &g);
            drop((g, model));
            eng.accumulate(grads)?;
        }
        let mut step_loss = local_loss;
        // SIGTERM on any rank stops every rank after this step, with a checkpoint: the flag
        // travels with the loss.
        let mut stop = crate::signals::terminated();
        let mut ckpt_now = crate::signals::take_checkpoint_request();
        if let Some(comm) = eng.groups.main.as_deref_mut() {
            let flag = |b: bool| if b { 1.0 } else { 0.0 };
            let mut l = [local_loss as f32, flag(stop), flag(ckpt_now)];
            comm.all_reduce((&mut l[..]).into(), ReduceOp::Sum)
                .map_err(|e| anyhow!("step {step}: {e}"))?;
            step_loss = l[0] as f64;
            stop = l[1] > 0.0;
            ckpt_now = l[2] > 0.0;
        }
        eng.reduce().with_context(|| format!("step {step}"))?;
        // fp16: unscale, then skip the step on overflow (DeepSpeed's dynamic loss scaling).
        if scale != 1.0 {
            eng.scale_grads((1.0 / scale) as f32);
        }
        let apply = match &mut scaling {
            Scaling::Dynamic(d) => d.update(eng.overflow()?),
            _ => true,
        };
        let lr = sched.lr(step);
        let mut grad_norm = f64::NAN;
        if apply {
            grad_norm = eng.grad_norm()?;
            if let Some(c) = clip_coef(grad_norm, max_grad_norm) {
                eng.scale_grads(c);
            }
            eng.apply(trainable_mut(setup), lr)
                .with_context(|| format!("step {step}"))?;
        } else {
            skipped_total += 1;
            window_skipped += 1;
        }
        let comm_wait = eng.take_comm_seconds();
        window_wait += comm_wait;
        losses.push(step_loss);
        window_loss += step_loss;
        window_steps += 1;
        window_tokens += step_tokens;
        all_tokens += step_tokens;
        let done = step + 1;
        if let Some(p) = par.progress {
            let secs = step_start.elapsed().as_secs_f64();
            p.report(crate::progress::StepReport {
                step: done,
                total_steps: total,
                loss: Some(step_loss),
                tokens_per_second: step_tokens as f64 / secs.max(1e-9),
                memory_bytes: crate::progress::rss_bytes().0,
                collective_seq: eng.groups.main.as_deref().map(|c| c.seq()).unwrap_or(0),
                compute_seconds: secs - comm_wait,
                collective_wait_seconds: comm_wait,
            });
        }
        if done % logging_steps == 0 || done == total {
            let secs = window_start.elapsed().as_secs_f64().max(1e-9);
            let line = LogLine {
                step: done,
                total_steps: total,
                epoch: done as f64 / spe as f64,
                loss: window_loss / window_steps as f64,
                lr,
                grad_norm,
                tokens_per_s: window_tokens as f64 / secs,
                collective_wait_s: window_wait,
                elapsed_s: start.elapsed().as_secs_f64(),
                loss_scale: matches!(plan.precision, Precision::Fp16(_)).then(|| scaling.scale()),
                skipped_steps: matches!(plan.precision, Precision::Fp16(_))
                    .then_some(window_skipped),
            };
            if let Some(f) = log_file.as_mut() {
                writeln!(f, "{}", serde_json::to_string(&line)?)
                    .with_context(|| format!("writing {}", log_path.display()))?;
                println!(
                    "step {done}/{total} loss {:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0}",
                    line.loss, line.lr, line.grad_norm, line.tokens_per_s
                );
            }
            window_start = Instant::now();
            window_tokens = 0;
            window_wait = 0.0;
            window_loss = 0.0;
            window_steps = 0;
            window_skipped = 0;
        }
        if (save_steps > 0 && done % save_steps == 0 || stop || ckpt_now) && done < total {
            let dir = setup.output_dir.join(format!("checkpoint-{done}"));
            let info = checkpoint::SaveInfo {
                step: done,
                world: par.world,
                plan: plan.label(),
                global_batch: layout.global_batch_size(),
                seed: setup.seed,
                trainable: trainable_kind,
                scaler: match &scaling {
                    Scaling::Dynamic(d) => Some(d.clone()),
                    _ => None,
                },
            };
            let saved = (|| -> Result<()> {
                checkpoint::begin(&dir)?;
                eng.gather_full(trainable_mut(setup))?;
                if par.rank == 0 {
                    save_model(setup, &dir)?;
                }
                eng.release_full(trainable_mut(setup));
                let t = match &setup.lora {
                    Some((_, a)) => a,
                    None => &setup.base,
                };
                checkpoint::save(&dir, &mut eng, t, par.rank, &info)
            })();
            if let Err(e) = saved {
                // A failed save (a full disk, an unwritable directory, a lost peer) leaves the
                // committed checkpoints as they were; rank 0 removes the uncommitted directory
                // so that a full disk is not left full for the next attempt.
                if par.rank == 0 {
                    checkpoint::discard(&dir);
                }
                return Err(e.context(format!(
                    "saving the checkpoint of step {done} (earlier checkpoints are untouched)"
                )));
            }
            if par.rank == 0
                && let Some(p) = par.progress
            {
                p.checkpoint_committed(done, &dir);
            }
            if par.rank == 0
                && let Some(keep) = save_total_limit
            {
                for d in checkpoint::prune(&setup.output_dir, keep, resumed_from.as_deref())? {
                    eprintln!("trainer: save_total_limit {keep}: removed {}", d.display());
                }
            }
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
    let (param_bytes, grad_bytes, optimizer_bytes, frozen_bytes) =
        eng.memory(trainable_mut(setup), frozen);
    let report = engine::MemoryReport {
        rank: par.rank,
        world: par.world,
        shard_group: eng.layout().group,
        stage,
        plan: plan.label(),
        trainable_elements: numel,
        padding_elements: eng.layout().padding(),
        param_bytes,
        grad_bytes,
        optimizer_bytes,
        frozen_bytes,
        peak_rss_bytes: crate::progress::rss_bytes().1,
    };
    let mem_path = setup
        .output_dir
        .join(format!("memory-rank{}.json", par.rank));
    std::fs::create_dir_all(&setup.output_dir)
        .and_then(|_| std::fs::write(&mem_path, serde_json::to_string_pretty(&report)? + "\n"))
        .with_context(|| format!("writing {}", mem_path.display()))?;
    if par.rank == 0 {
        eprintln!(
            "trainer: rank 0 holds {:.1} MiB of model state (params {:.1}, grads {:.1}, optimizer {:.1}), peak RSS {:.1} MiB",
            (param_bytes + grad_bytes + optimizer_bytes) as f64 / 1048576.0,
            param_bytes as f64 / 1048576.0,
            grad_bytes as f64 / 1048576.0,
            optimizer_bytes as f64 / 1048576.0,
            report.peak_rss_bytes as f64 / 1048576.0
        );
    }
    eng.gather_full(trainable_mut(setup))?;
    let tokens_per_s = all_tokens as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let mut eval_result = None;
    if par.rank == 0 {
        save_model(setup, &setup.output_dir.clone())?;
        if setup.cfg.plot_loss == Some(true) {
            let points: Vec<(u64, f64)> = losses
                .iter()
                .enumerate()
                .map(|(i, l)| (i as u64 + 1, *l))
                .collect();
            let png = setup.output_dir.join("training_loss.png");
            ringmaster_optim::plot::write_loss_png(&png, &points)
                .with_context(|| format!("writing {}", png.display()))?;
        }
        if !setup.eval.is_empty() {
            let r = eval::evaluate(setup)?;
            println!(
                "eval: exact match {}/{} = {:.1}%",
                r.correct,
                r.total,
                100.0 * r.accuracy
            );
            let path = setup.output_dir.join("eval_results.json");
            std::fs::write(&path, serde_json::to_string_pretty(&r)? + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
            eval_result = Some(r);
        }
    }
    Ok(Summary {
        steps: total,
        losses,
        skipped_steps: skipped_total,
        tokens_per_s,
        eval: eval_result,
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
