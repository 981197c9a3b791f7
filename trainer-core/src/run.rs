//! The `trainer` subcommands that run the model: train, eval, generate.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::Parser;
use ringmaster_collectives::Communicator;
use ringmaster_data::template::Template;
use ringmaster_data::tokenizer::Tokenizer;
use ringmaster_model::{CpuBackend, Llama, hf, lora};

use crate::Recipe;
use crate::train::{self, Parallel, Setup};

/// Why a subcommand failed: bad input (exit 2) or a failure while running (exit 1).
#[derive(Debug)]
pub enum RunError {
    /// Bad config, flag or input file; nothing ran.
    Usage(anyhow::Error),
    /// Failed while running.
    Failed(anyhow::Error),
}

fn usage<E: Into<anyhow::Error>>(e: E) -> RunError {
    RunError::Usage(e.into())
}

fn failed<E: Into<anyhow::Error>>(e: E) -> RunError {
    RunError::Failed(e.into())
}

/// Reads the config and resolves the run for this process's rank and world.
pub fn setup(recipe: &Recipe) -> Result<(Setup, usize, usize), RunError> {
    let cfg = recipe.load().map_err(usage)?;
    let (rank, world, local) = crate::dist::rank_world().map_err(usage)?;
    let setup = train::resolve(cfg, &recipe.anchor(), world, local)
        .map_err(|e| usage(e.context(recipe.origin())))?;
    Ok((setup, rank, world))
}

/// Broadcasts rank 0's weights (base and adapters) so that every rank starts identical.
fn broadcast_weights(setup: &mut Setup, comm: &mut dyn Communicator) -> anyhow::Result<()> {
    for (_, data) in setup.base.iter_mut() {
        comm.broadcast((&mut data[..]).into(), 0)?;
    }
    if let Some((_, a)) = &mut setup.lora {
        for (_, data) in a.iter_mut() {
            comm.broadcast((&mut data[..]).into(), 0)?;
        }
    }
    Ok(())
}

/// `trainer [train] [RECIPE.yaml] [key=value | --key [value] ...]`.
pub fn train(recipe: &Recipe) -> Result<(), RunError> {
    crate::signals::install().map_err(failed)?;
    // The device first: on CUDA this may re-execute the process (library paths), so before the
    // data is read and before anything is printed.
    let cfg = recipe.load().map_err(usage)?;
    if !train::setup::trains(&cfg) {
        return evaluate_only(recipe);
    }
    train::check_duration(&cfg).map_err(|e| usage(e.context(recipe.origin())))?;
    let (_, world, _) = crate::dist::rank_world().map_err(usage)?;
    let placement =
        crate::device::place(&cfg, world).map_err(|e| usage(e.context(recipe.origin())))?;
    let peak_override = crate::flops::peak_override().map_err(usage)?;
    let (mut setup, rank, world) = setup(recipe)?;
    let timeout = setup
        .cfg
        .ddp_timeout
        .map(std::time::Duration::from_secs)
        .unwrap_or(crate::dist::DEFAULT_TIMEOUT);
    if rank == 0 {
        eprintln!("trainer: {placement}");
    }
    let fabric = placement.fabric();
    crate::dist::agree_on_fabric(rank, world, timeout, fabric).map_err(failed)?;
    let (mut ring, seq) = if world > 1 {
        let (r, seq) = crate::progress::Tracked::new(
            crate::dist::connect(rank, world, timeout, fabric).map_err(failed)?,
        );
        (Some(r), Some(seq))
    } else {
        (None, None)
    };
    if let Some(r) = ring.as_mut() {
        broadcast_weights(&mut setup, r).map_err(failed)?;
    }
    // Hybrid sharding across several nodes: a ring per node (the shard group) and a ring per
    // local rank across the nodes (the replica group). Ranks are numbered node by node.
    let group = setup.plan.shard_group_size();
    let hybrid = if setup.plan.hybrid && group > 1 && group < world {
        if world % group != 0 {
            return Err(usage(anyhow!(
                "HYBRID_SHARD: world size {world} is not a multiple of {group} ranks per node"
            )));
        }
        let (node, local) = (rank / group, rank % group);
        let n = crate::dist::connect_group(&format!("node{node}"), local, group, timeout, fabric)
            .map_err(failed)?;
        let c = crate::dist::connect_group(
            &format!("local{local}"),
            node,
            world / group,
            timeout,
            fabric,
        )
        .map_err(failed)?;
        Some((n, c))
    } else {
        None
    };
    let progress = crate::progress::ProgressReporter::from_env(rank);
    if let (Some(p), Some(seq)) = (progress.as_ref(), seq) {
        p.start_heartbeat(seq, std::time::Duration::from_secs(1));
    }
    if let Some(p) = progress.as_ref() {
        p.set_device(&placement.label());
        // MFU's inputs. Measured after the communicators connect, so that ranks sharing a CPU
        // host measure at about the same time (each then sees its share of the cores).
        let peak = crate::flops::peak(&placement, &setup.plan.precision, peak_override);
        p.set_flops(crate::flops::per_token(&setup), peak);
        let comms = ring.iter().map(|r| r as &dyn Communicator);
        let groups = hybrid.iter().flat_map(|(n, c)| [n.as_ref(), c.as_ref()]);
        for c in comms.chain(groups) {
            p.abort_on_generation_end(c.abort_handle());
        }
    }
    let mut par = Parallel {
        rank,
        world,
        comm: ring.as_mut().map(|r| r as &mut dyn Communicator),
        hybrid,
        progress: progress.as_ref(),
    };
    let result = crate::device::train(&placement, &mut setup, &mut par);
    drop(par);
    if let Some(p) = progress {
        // A checkpoint committed just before the exit (SIGTERM) reaches the coordinator first.
        p.finish(std::time::Duration::from_secs(5));
    }
    let summary = result.map_err(failed)?;
    if rank == 0 {
        println!(
            "trained {} steps, final loss {:.4}, {:.0} tokens/s{}; model saved to {}",
            summary.steps,
            summary.losses.last().copied().unwrap_or(f64::NAN),
            summary.tokens_per_s,
            if summary.skipped_steps > 0 {
                format!(", {} fp16 steps skipped", summary.skipped_steps)
            } else {
                String::new()
            },
            setup.output_dir.display()
        );
    }
    Ok(())
}

/// Replaces the setup's weights with the trained ones in its output_dir.
pub fn load_trained(setup: &mut Setup) -> anyhow::Result<()> {
    let dir = setup.output_dir.clone();
    match &mut setup.lora {
        Some((lc, adapters)) => {
            if dir.join(hf::CONFIG_FILE).is_file() {
                setup.base = hf::load_dir(&dir)?.params;
            }
            let (l, a) = lora::load_adapter(&dir, &setup.model)?;
            *lc = l;
            *adapters = a;
        }
        None => {
            let m = hf::load_dir(&dir)?;
            if m.config.num_parameters() != setup.model.num_parameters() {
                return Err(anyhow!(
                    "{}: the saved model does not match {}",
                    dir.display(),
                    setup.model_dir.display()
                ));
            }
            setup.base = m.params;
        }
    }
    Ok(())
}

/// `do_train: false` (LLaMA-Factory's evaluation-only run): rank 0 scores the model of
/// `model_name_or_path` on `eval_dataset` by exact match of greedy answers, on the CPU as
/// `trainer eval` does, and writes `output_dir/eval_results.json`; nothing is trained or saved.
/// Other ranks have nothing to do and exit 0.
fn evaluate_only(recipe: &Recipe) -> Result<(), RunError> {
    let (rank, _, _) = crate::dist::rank_world().map_err(usage)?;
    if rank != 0 {
        return Ok(());
    }
    let (setup, _, _) = setup(recipe)?;
    for w in &setup.warnings {
        eprintln!("trainer: warning: {w}");
    }
    if setup.cfg.do_eval == Some(true)
        || setup
            .cfg
            .eval_strategy
            .as_deref()
            .is_some_and(|s| s != "no")
    {
        eprintln!(
            "trainer: warning: do_train: false: eval_dataset is scored by exact match only; its \
             loss is computed during training runs"
        );
    }
    eprintln!(
        "trainer: do_train: false: scoring {} on {} eval_dataset examples, nothing is trained",
        setup.model_dir.display(),
        setup.eval.len()
    );
    let r = train::eval::evaluate::<CpuBackend>(&setup, &Default::default()).map_err(failed)?;
    println!(
        "eval: exact match {}/{} = {:.1}%",
        r.correct,
        r.total,
        100.0 * r.accuracy
    );
    std::fs::create_dir_all(&setup.output_dir)
        .with_context(|| format!("creating {}", setup.output_dir.display()))
        .map_err(failed)?;
    let path = setup.output_dir.join("eval_results.json");
    let text = serde_json::to_string_pretty(&r).map_err(failed)? + "\n";
    std::fs::write(&path, text)
        .with_context(|| format!("writing {}", path.display()))
        .map_err(failed)?;
    Ok(())
}

/// `trainer eval CONFIG.yaml`: exact match of the trained model in output_dir on
/// `eval_dataset`.
pub fn eval(recipe: &Recipe) -> Result<(), RunError> {
    let (mut setup, _, _) = setup(recipe)?;
    if setup.eval.is_empty() {
        return Err(usage(anyhow!(
            "{}: `eval_dataset` names no examples",
            recipe.origin()
        )));
    }
    load_trained(&mut setup).map_err(usage)?;
    let r = train::eval::evaluate::<CpuBackend>(&setup, &Default::default()).map_err(failed)?;
    println!(
        "eval: exact match {}/{} = {:.1}%",
        r.correct,
        r.total,
        100.0 * r.accuracy
    );
    for (want, got) in &r.samples {
        println!("  expected {want:?}, generated {got:?}");
    }
    Ok(())
}

/// `trainer generate`: greedy decoding of one prompt.
#[derive(Parser, Debug)]
#[command(name = "trainer generate", bin_name = "trainer generate")]
pub struct GenerateArgs {
    /// Hugging Face model directory (config.json, weights, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Chat template the prompt is wrapped in (`empty`: the raw text).
    #[arg(long, default_value = "default")]
    pub template: String,
    /// The user message (not empty).
    #[arg(long, value_parser = non_empty)]
    pub prompt: String,
    /// At most this many tokens are generated (1 or more).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_new_tokens: u32,
}

/// A flag value that must not be empty (nor only whitespace).
fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}

/// Runs `trainer generate`.
pub fn generate(args: GenerateArgs) -> Result<(), RunError> {
    let m = hf::load_dir(&args.model).map_err(usage)?;
    let tok = Tokenizer::from_dir(&args.model)
        .with_context(|| format!("{}", args.model.display()))
        .map_err(usage)?;
    let template =
        Template::by_name(&args.template).map_err(|e| usage(anyhow!("--template: {e}")))?;
    let prompt = template
        .encode_generation_prompt(&tok, None, &[], &args.prompt)
        .map_err(usage)?;
    let device = Default::default();
    let model = model_on::<CpuBackend>(&m, args.adapter.as_deref(), &device)?;
    let stops = template.stop_token_ids(&tok);
    let out = ringmaster_model::generate::greedy(
        &model,
        &[prompt],
        args.max_new_tokens as usize,
        &stops,
        &device,
    )
    .map_err(failed)?;
    let text = template.decode_response(&tok, &out[0]).map_err(failed)?;
    println!("{text}");
    Ok(())
}

/// `trainer merge`: a PEFT adapter merged into its base model, written as a Hugging Face
/// directory.
#[derive(Parser, Debug)]
#[command(name = "trainer merge", bin_name = "trainer merge")]
pub struct MergeArgs {
    /// The base model directory.
    #[arg(long)]
    pub base: PathBuf,
    /// The adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory: not --base or --adapter; one that already holds a model only with
    /// --overwrite.
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written weights: float32, bfloat16 or float16 (default: the base's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Replace the model files an existing --out holds.
    #[arg(long)]
    pub overwrite: bool,
}

/// Runs `trainer merge`.
pub fn merge(args: MergeArgs) -> Result<(), RunError> {
    crate::export::check_out_dir(
        &args.out,
        &[("--base", &args.base), ("--adapter", &args.adapter)],
        args.overwrite,
    )
    .map_err(usage)?;
    let mut m = hf::load_dir(&args.base).map_err(usage)?;
    let (lc, adapters) = lora::load_adapter(&args.adapter, &m.config).map_err(usage)?;
    let dtype = match &args.dtype {
        None => m.stored_dtype,
        Some(d) => ringmaster_model::DType::parse(d)
            .ok_or_else(|| usage(anyhow!("--dtype: unknown dtype `{d}`")))?,
    };
    lora::merge(&m.config, &lc, &mut m.params, &adapters).map_err(failed)?;
    let opts = hf::SaveOptions {
        dtype,
        ..hf::SaveOptions::default()
    };
    hf::save_dir(&args.out, &m.config, &m.params, opts).map_err(failed)?;
    let tok_src = [args.adapter.clone(), args.base.clone()]
        .into_iter()
        .find(|d| d.join("tokenizer.json").is_file());
    if let Some(src) = tok_src {
        let tok = Tokenizer::from_dir(&src).map_err(failed)?;
        tok.save_dir(&args.out).map_err(failed)?;
    }
    println!(
        "merged {} into {}: {}",
        args.adapter.display(),
        args.base.display(),
        args.out.display()
    );
    Ok(())
}

/// `trainer logits`: the logits of token rows, as JSON (for checking against transformers:
/// bench/python/check_hf_logits.py).
#[derive(Parser, Debug)]
#[command(name = "trainer logits", bin_name = "trainer logits")]
pub struct LogitsArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A row of token ids, comma-separated; repeat for more rows (all the same length).
    #[arg(long = "ids", required = true, value_delimiter = ';')]
    pub rows: Vec<String>,
    /// Output JSON file: {"input_ids": [[..]], "logits": [[[..]]]}.
    #[arg(long)]
    pub out: PathBuf,
    /// A PEFT LoRA adapter directory to apply to the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Also compute the causal-LM loss with the ids as labels (each token predicts the next,
    /// mean over the rows' `T - 1` targets, as transformers' `labels=input_ids`): printed as
    /// `loss: X` and written as "loss" in the JSON.
    #[arg(long)]
    pub loss: bool,
}

/// Runs `trainer logits`.
pub fn logits(args: LogitsArgs) -> Result<(), RunError> {
    let m = hf::load_dir(&args.model).map_err(usage)?;
    let mut rows: Vec<Vec<u32>> = Vec::new();
    for r in &args.rows {
        let row: Vec<u32> = r
            .split(',')
            .map(|x| {
                x.trim()
                    .parse::<u32>()
                    .map_err(|e| usage(anyhow!("--ids `{r}`: {e}")))
            })
            .collect::<Result<_, _>>()?;
        rows.push(row);
    }
    let t = rows[0].len();
    if t == 0 || rows.iter().any(|r| r.len() != t) {
        return Err(usage(anyhow!(
            "--ids: every row needs the same, non-zero length"
        )));
    }
    let b = rows.len();
    let ids: Vec<u32> = rows.concat();
    let device = Default::default();
    let model = model_on::<CpuBackend>(&m, args.adapter.as_deref(), &device)?;
    let inp =
        ringmaster_model::Inputs::<CpuBackend>::causal(&m.config, b, t, &ids, &vec![t; b], &device)
            .map_err(usage)?;
    let v = m.config.vocab_size;
    let out = model.forward(&inp, None);
    let loss = if args.loss && t > 1 {
        let targets: Vec<i64> = rows
            .iter()
            .flat_map(|r| {
                r[1..]
                    .iter()
                    .map(|&x| x as i64)
                    .chain([ringmaster_model::IGNORE_INDEX])
            })
            .collect();
        let l = ringmaster_model::model::cross_entropy(out.clone(), &targets, (b * (t - 1)) as f64);
        let l = ringmaster_model::model::to_vec(l)[0];
        println!("loss: {l:.9}");
        Some(l)
    } else {
        None
    };
    let flat: Vec<f32> = out
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| failed(anyhow!("{e:?}")))?;
    let logits: Vec<Vec<Vec<f32>>> = (0..b)
        .map(|bi| {
            (0..t)
                .map(|ti| flat[(bi * t + ti) * v..(bi * t + ti + 1) * v].to_vec())
                .collect()
        })
        .collect();
    let mut json = serde_json::json!({"input_ids": rows, "logits": logits});
    if let Some(l) = loss {
        json["loss"] = serde_json::json!(l);
    }
    std::fs::write(&args.out, json.to_string())
        .with_context(|| format!("{}", args.out.display()))
        .map_err(failed)?;
    Ok(())
}

/// `trainer init-model`: a randomly initialised model (transformers' init) written as a
/// Hugging Face directory.
#[derive(Parser, Debug)]
#[command(name = "trainer init-model", bin_name = "trainer init-model")]
pub struct InitArgs {
    /// A config.json to take the architecture from.
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// float32, bfloat16 or float16.
    #[arg(long, default_value = "float32")]
    pub dtype: String,
    /// Split the weights into shards of at most this many bytes (with an index).
    #[arg(long)]
    pub max_shard_bytes: Option<u64>,
    /// Also write a PEFT LoRA adapter for the model into this directory (for checks against
    /// peft): A as PEFT initialises it, B drawn from normal(0, 0.02) instead of PEFT's zeros so
    /// that the adapter changes the output.
    #[arg(long)]
    pub lora_out: Option<PathBuf>,
    /// The adapter's rank.
    #[arg(long, default_value_t = 4)]
    pub lora_rank: usize,
    /// The adapter's `lora_target` (module names or `all`).
    #[arg(long, default_value = "all")]
    pub lora_target: String,
}

/// Runs `trainer init-model`.
pub fn init_model(args: InitArgs) -> Result<(), RunError> {
    let cfg = ringmaster_model::LlamaConfig::from_file(&args.config).map_err(usage)?;
    let dtype = ringmaster_model::DType::parse(&args.dtype)
        .ok_or_else(|| usage(anyhow!("--dtype: unknown `{}`", args.dtype)))?;
    let params = ringmaster_model::ParamStore::try_init_llama(&cfg, args.seed)
        .map_err(|e| usage(anyhow!("{}: {e}", args.config.display())))?;
    let mut opts = hf::SaveOptions {
        dtype,
        ..hf::SaveOptions::default()
    };
    if let Some(m) = args.max_shard_bytes {
        opts.max_shard_bytes = m;
    }
    hf::save_dir(&args.out, &cfg, &params, opts).map_err(failed)?;
    println!(
        "{} parameters written to {}",
        params.numel(),
        args.out.display()
    );
    if let Some(dir) = &args.lora_out {
        let lc = ringmaster_model::LoraConfig::new(
            args.lora_rank,
            None,
            0.0,
            std::slice::from_ref(&args.lora_target),
        )
        .map_err(usage)?;
        let mut adapters = lc.init(&cfg, args.seed);
        let mut rng = ringmaster_model::params::Rng::new(args.seed ^ 0xb0b);
        for (spec, data) in adapters.iter_mut() {
            if spec.name.ends_with("lora_B.weight") {
                data.iter_mut().for_each(|x| *x = 0.02 * rng.normal());
            }
        }
        let base = args.out.display().to_string();
        lora::save_adapter(dir, &lc, &adapters, &base, ringmaster_model::DType::F32)
            .map_err(failed)?;
        println!(
            "LoRA adapter (rank {}) written to {}",
            lc.rank,
            dir.display()
        );
    }
    Ok(())
}

/// The model of a loaded Hugging Face directory on `device`, with a PEFT adapter applied when given
/// (`trainer generate`, `trainer logits`).
fn model_on<B: ringmaster_model::fused::Fused>(
    m: &hf::HfModel,
    adapter: Option<&Path>,
    device: &B::Device,
) -> Result<Llama<B>, RunError> {
    let adapter = match adapter {
        Some(dir) => Some(lora::load_adapter(dir, &m.config).map_err(usage)?),
        None => None,
    };
    Llama::<B>::new(
        &m.config,
        &m.params,
        false,
        adapter.as_ref().map(|(l, a)| (l, a)),
        device,
    )
    .map_err(failed)
}
