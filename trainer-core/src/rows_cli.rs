//! `trainer rows --step S --world N [--loss] --out FILE -- RECIPE [overrides]`: the rows that
//! step `S` of a run on `N` ranks trains on, exactly as the loop would pick them (the same data
//! setup, held-out split, sampler and rank layout), as JSON. With `--loss`, also the loss of the
//! run's starting weights on those rows, computed one row at a time through the plain model in
//! fp32 (no engine, no sharding, no mixed precision): for step 1 it is what the run should log,
//! and what transformers computes on the same rows (bench/python/recipe_loss.py).
//!
//! Output: `{"step", "world", "normalizer", "loss"?, "rows": [{"rank", "micro", "index",
//! "input_ids", "labels", "segments"}]}`, rows in rank-major, micro-batch, batch order;
//! `normalizer` is the global batch's target-token count that the loss is divided by, `labels`
//! are aligned with `input_ids` (-100 where no loss, as LLaMA-Factory writes them).

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Parser;
use ringmaster_data::batch::collate;
use ringmaster_model::{CpuBackend, Inputs, Llama, model};

use crate::Recipe;
use crate::run::RunError;
use crate::train;

/// `trainer rows`: which rows a step trains on.
#[derive(Parser, Debug)]
#[command(name = "trainer rows", bin_name = "trainer rows")]
pub struct RowsArgs {
    /// The optimizer step, counted from 1 as the log counts it.
    #[arg(long, default_value_t = 1)]
    pub step: u64,
    /// Ranks of the run (WORLD_SIZE).
    #[arg(long, default_value_t = 1)]
    pub world: usize,
    /// Ranks per node (LOCAL_WORLD_SIZE; matters for hybrid sharding's checks only).
    #[arg(long)]
    pub local: Option<usize>,
    /// Also compute the loss of the starting weights (`model_name_or_path`, with the LoRA
    /// adapters as the run initialises them) on the rows.
    #[arg(long)]
    pub loss: bool,
    /// Output JSON file.
    #[arg(long)]
    pub out: PathBuf,
    /// The training config after `--`: a recipe file and its overrides, or its keys as flags.
    #[arg(last = true, required = true, value_name = "RECIPE")]
    pub recipe: Vec<String>,
}

/// Runs `trainer rows`.
///
/// # Errors
/// A bad config or flag ([`RunError::Usage`]), or an unwritable output.
pub fn rows(args: RowsArgs) -> Result<(), RunError> {
    let usage = |e: anyhow::Error| RunError::Usage(e);
    if args.step == 0 || args.world == 0 {
        return Err(usage(anyhow!("--step and --world count from 1")));
    }
    let recipe = Recipe::from_args(&args.recipe).map_err(usage)?;
    let cfg = recipe.load().map_err(usage)?;
    train::check_duration(&cfg).map_err(|e| usage(e.context(recipe.origin())))?;
    let setup = train::resolve(
        cfg,
        &recipe.anchor(),
        args.world,
        args.local.unwrap_or(args.world),
    )
    .map_err(|e| usage(e.context(recipe.origin())))?;
    let (layout, sampler) = train::data_order(&setup, args.world).map_err(usage)?;
    let total = train::total_steps(&setup, sampler.steps_per_epoch());
    if args.step > total {
        return Err(usage(anyhow!(
            "--step {}: the run has {total} steps",
            args.step
        )));
    }
    let pos = sampler.position_at(args.step - 1);
    let plan = sampler.epoch(pos.epoch);
    let normalizer: usize = plan
        .global_batch(pos.step)
        .iter()
        .map(|&i| setup.samples[i].num_targets())
        .sum();
    let mut rows = Vec::new();
    for rank in 0..args.world {
        let micro = plan
            .rank_batches(pos.step, &layout, rank)
            .map_err(|e| RunError::Failed(e.into()))?;
        for (m, idx) in micro.iter().enumerate() {
            for &i in idx {
                rows.push((rank, m, i));
            }
        }
    }
    let loss = if args.loss {
        Some(
            starting_loss(&setup, rows.iter().map(|r| r.2), normalizer)
                .map_err(RunError::Failed)?,
        )
    } else {
        None
    };
    let json_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|&(rank, micro, i)| {
            let s = &setup.samples[i];
            serde_json::json!({
                "rank": rank, "micro": micro, "index": i,
                "input_ids": s.input_ids, "labels": s.labels, "segments": s.segments,
            })
        })
        .collect();
    let mut json = serde_json::json!({
        "step": args.step, "world": args.world, "normalizer": normalizer, "rows": json_rows,
    });
    if let Some(l) = loss {
        json["loss"] = serde_json::json!(l);
        println!("loss: {l:.9}");
    }
    std::fs::write(&args.out, json.to_string())
        .with_context(|| format!("{}", args.out.display()))
        .map_err(RunError::Failed)?;
    println!(
        "step {} of {total}: {} rows, {normalizer} target tokens -> {}",
        args.step,
        rows.len(),
        args.out.display()
    );
    Ok(())
}

/// The mean loss over `normalizer` targets of the starting weights on the samples `idx`.
fn starting_loss(
    setup: &train::Setup,
    idx: impl Iterator<Item = usize>,
    normalizer: usize,
) -> anyhow::Result<f64> {
    let device = Default::default();
    let net = Llama::<CpuBackend>::new(
        &setup.model,
        &setup.base,
        false,
        setup.lora.as_ref().map(|(l, a)| (l, a)),
        &device,
    )?;
    let pad = setup.tokenizer.pad_id_or_eos();
    let mut sum = 0.0f64;
    for i in idx {
        let b = collate([&setup.samples[i]], pad, 1);
        let inp = Inputs::<CpuBackend>::new(
            &setup.model,
            1,
            b.seq_len,
            &b.input_ids,
            &b.position_ids,
            &b.segment_ids,
            &device,
        )?;
        // Summed over the row's targets (normalizer 1), accumulated in f64.
        let row = model::cross_entropy(net.forward(&inp, None), &b.shifted_labels(), 1.0);
        sum += f64::from(model::to_vec(row)[0]);
    }
    Ok(sum / normalizer.max(1) as f64)
}
