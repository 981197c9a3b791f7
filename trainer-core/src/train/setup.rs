//! Everything a run needs, resolved from a training config: the model and tokenizer, the
//! datasets (by `dataset_info.json` name or by path), the plan and the hyper-parameters. Every
//! error names the config field or the file at fault.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail};
use ringmaster_config::{Plan, TrainConfig};
use ringmaster_data::batch::Sample;
use ringmaster_data::dataset::{DatasetSpec, Record};
use ringmaster_data::mix::{DatasetRows, MixConfig, select_and_merge};
use ringmaster_data::preprocess::{
    DEFAULT_PREPROCESSING_BATCH_SIZE, PreprocessConfig, Selection, Stage, load_and_preprocess,
    preprocess_parallel,
};
use ringmaster_data::template::Template;
use ringmaster_data::tokenizer::Tokenizer;
use ringmaster_model::hf::{self, CONFIG_FILE};
use ringmaster_model::{LlamaConfig, LoraConfig, ParamStore};
use ringmaster_optim::schedule::{ScheduleOptions, SchedulerKind};

use super::data_cache;

/// LLaMA-Factory's default `cutoff_len`.
pub const DEFAULT_CUTOFF_LEN: usize = 2048;
/// HF's default learning rate.
pub const DEFAULT_LR: f64 = 5e-5;
/// Default `max_new_tokens` for evaluation and generation.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 32;
/// Default `logging_steps` (LLaMA-Factory's recipes use 10; HF's 500 would log too rarely for
/// short runs).
pub const DEFAULT_LOGGING_STEPS: u64 = 10;
/// Default `save_steps`: HF's 500 (its `save_strategy: steps`, the only one accepted). 0 turns
/// periodic checkpoints off.
pub const DEFAULT_SAVE_STEPS: u64 = 500;

/// Steps between log lines: `logging_steps`, else [`DEFAULT_LOGGING_STEPS`] (at least 1).
pub fn logging_steps(cfg: &TrainConfig) -> u64 {
    cfg.logging_steps.unwrap_or(DEFAULT_LOGGING_STEPS).max(1)
}

/// Steps between checkpoints: `save_steps`, else [`DEFAULT_SAVE_STEPS`]; 0: none.
pub fn save_steps(cfg: &TrainConfig) -> u64 {
    cfg.save_steps.unwrap_or(DEFAULT_SAVE_STEPS)
}

/// True unless the config says `do_train: false` (then the trainer only scores `eval_dataset`).
pub fn trains(cfg: &TrainConfig) -> bool {
    cfg.do_train != Some(false)
}

/// True when `eval_dataset` is scored by exact match at the end: unless `predict_with_generate:
/// false`.
pub fn scores_by_generation(cfg: &TrainConfig) -> bool {
    cfg.predict_with_generate != Some(false)
}

/// A held-out example for generation-based evaluation.
#[derive(Debug, Clone)]
pub struct EvalExample {
    /// The prompt ids (template applied, assistant header included).
    pub prompt: Vec<u32>,
    /// The reference answer.
    pub answer: String,
}

/// A resolved run.
pub struct Setup {
    /// The training config.
    pub cfg: TrainConfig,
    /// The plan (batch, precision, clipping, sharding).
    pub plan: Plan,
    /// Start-up warnings (accepted keys without effect).
    pub warnings: Vec<String>,
    /// The model's architecture.
    pub model: LlamaConfig,
    /// Base weights (fp32).
    pub base: ParamStore,
    /// LoRA adapters, when `finetuning_type: lora`.
    pub lora: Option<(LoraConfig, ParamStore)>,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template.
    pub template: Template,
    /// Training samples (tokenised, masked, packed when asked), shared with the dataloader
    /// threads.
    pub samples: std::sync::Arc<Vec<Sample>>,
    /// Held-out examples (`eval_dataset`).
    pub eval: Vec<EvalExample>,
    /// The rows of the evaluation loss: held out of the training set by `val_size`, or
    /// `eval_dataset` preprocessed as training rows (when an eval strategy or `do_eval` asks).
    pub held_out: Vec<Sample>,
    /// Where results go.
    pub output_dir: PathBuf,
    /// The model directory (config.json, tokenizer.json, weights).
    pub model_dir: PathBuf,
    /// Learning-rate schedule kind.
    pub scheduler: SchedulerKind,
    /// Its `lr_scheduler_kwargs`.
    pub schedule_options: ScheduleOptions,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: (f64, f64),
    /// AdamW eps.
    pub eps: f64,
    /// Seed.
    pub seed: u64,
}

impl Setup {
    /// The weights as the engine trains them: the base model and the LoRA adapters.
    pub fn weights(&mut self) -> super::engine::Weights<'_> {
        super::engine::Weights {
            base: &mut self.base,
            lora: self.lora.as_mut().map(|(c, a)| (&*c, a)),
        }
    }
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup")
            .field("model", &self.model)
            .field("samples", &self.samples.len())
            .field("eval", &self.eval.len())
            .field("output_dir", &self.output_dir)
            .finish_non_exhaustive()
    }
}

/// Resolves a dataset name or path: its `dataset_dir/dataset_info.json` entry, read as
/// LLaMA-Factory reads it, else a file path (see [`ringmaster_data::dataset_info`]).
pub fn resolve_dataset(item: &str, dataset_dir: &Path, stage: Stage) -> Result<DatasetSpec> {
    ringmaster_data::dataset_info::resolve_dataset(item, dataset_dir, stage)
        .map_err(|e| anyhow!("training config field `dataset`: {e}"))
}

fn items(v: &Option<ringmaster_config::StringOrList>) -> Vec<String> {
    v.as_ref().map(|s| s.items()).unwrap_or_default()
}

/// Resolves a run from a training config (read from `config_path`, whose directory resolves
/// the DeepSpeed/FSDP files), for `world` ranks with `gpus_per_node` per node.
pub fn resolve(
    cfg: TrainConfig,
    config_path: &Path,
    world: usize,
    gpus_per_node: usize,
) -> Result<Setup> {
    let model_dir = PathBuf::from(
        cfg.model_name_or_path
            .clone()
            .ok_or_else(|| anyhow!("training config field `model_name_or_path` is required"))?,
    );
    if !model_dir.join(CONFIG_FILE).is_file() {
        bail!(
            "training config field `model_name_or_path`: {} has no {CONFIG_FILE} (a Hugging Face model directory is expected; \
             hub ids cannot be downloaded here)",
            model_dir.display()
        );
    }
    let model = LlamaConfig::from_file(&model_dir.join(CONFIG_FILE))?;
    let base_dir = config_path.parent().unwrap_or(Path::new("."));
    let read = |p: &str| {
        let path = if Path::new(p).is_absolute() || Path::new(p).exists() {
            PathBuf::from(p)
        } else {
            base_dir.join(p)
        };
        std::fs::read_to_string(&path).map_err(|e| e.to_string())
    };
    let (plan, warns) = ringmaster_config::plan_from_files(
        &cfg,
        read,
        world,
        gpus_per_node,
        Some(model.hidden_size),
    )
    .map_err(|e| anyhow!("{e}"))?;
    // One start-up line names every key accepted without effect: the recipe's, then the
    // DeepSpeed / accelerate files'.
    let mut inert: Vec<ringmaster_config::Warning> = cfg
        .no_effect
        .iter()
        .map(ringmaster_config::Warning::no_effect)
        .collect();
    for (key, set) in [
        ("trust_remote_code", cfg.trust_remote_code.is_some()),
        ("overwrite_output_dir", cfg.overwrite_output_dir.is_some()),
    ] {
        if set {
            inert.push(ringmaster_config::Warning::no_effect(key));
        }
    }
    if items(&cfg.report_to)
        .iter()
        .any(|r| !["none", "None"].contains(&r.as_str()))
    {
        inert.push(ringmaster_config::Warning::no_effect("report_to"));
    }
    inert.extend(warns);
    let mut warnings = ringmaster_config::warning_lines(&inert);
    if plan.offload_optimizer || (plan.offload_param && plan.shard_params) {
        warnings.push(format!(
            "plan {}: on the CPU backend parameters, gradients and optimizer state already live \
             in host memory; offload changes no placement",
            plan.label()
        ));
    }
    // The tokenizer and the template first: their errors come before the weights are read.
    let tokenizer = Tokenizer::from_dir(&model_dir)?;
    if tokenizer.vocab_size() > model.vocab_size {
        bail!(
            "{}: tokenizer has {} tokens but config.json's vocab_size is {}",
            model_dir.display(),
            tokenizer.vocab_size(),
            model.vocab_size
        );
    }
    let mut template_name = match &cfg.template {
        Some(t) => t.clone(),
        None => default_template(&model, &tokenizer)?.to_string(),
    };
    let mut template = Template::by_name(&template_name)
        .map_err(|e| anyhow!("training config field `template`: {e}"))?;
    let seed = cfg.seed.unwrap_or(42);
    let from_scratch = cfg.train_from_scratch.unwrap_or(false);
    // fsdp_cpu_ram_efficient_loading: only rank 0 reads the weights; the others hold zeros
    // until rank 0's weights arrive by broadcast (which every run does at start).
    let (rank, _, _) = crate::dist::rank_world()?;
    let base = if from_scratch {
        ParamStore::init_llama(&model, seed)
    } else if plan.cpu_ram_efficient_loading && world > 1 && rank > 0 {
        ParamStore::zeros(ringmaster_model::params::param_specs(&model))
    } else {
        hf::load_dir(&model_dir)?.params
    };
    let lora = match cfg.finetuning_type.as_deref().unwrap_or("lora") {
        "full" => None,
        _ => {
            let rank = cfg.lora_rank.unwrap_or(8) as usize;
            let targets = match items(&cfg.lora_target) {
                t if t.is_empty() => vec!["all".to_string()],
                t => t,
            };
            let lc = LoraConfig::new(
                rank,
                cfg.lora_alpha,
                cfg.lora_dropout.unwrap_or(0.0),
                &targets,
            )
            .map_err(|e| anyhow!("training config: {e}"))?;
            let store = lc.init(&model, seed);
            Some((lc, store))
        }
    };
    // LLaMA-Factory's template options; they change the tokenized rows, so the cache key (which
    // takes the template's name) names them too.
    template.enable_thinking = cfg.enable_thinking.unwrap_or(true);
    template.preserve_thinking = cfg.preserve_thinking.unwrap_or(false);
    if let Some(system) = &cfg.default_system {
        template.default_system = system.clone();
    }
    if let Some(format) = &cfg.tool_format {
        template.tool_format = match format.as_str() {
            "qwen" => Some(ringmaster_data::tools::ToolFormat::Qwen),
            other => bail!(
                "training config field `tool_format`: '{other}' is not supported yet (qwen is)"
            ),
        };
    }
    template_name = format!(
        "{template_name};thinking={};preserve={};system={:?};tools={:?}",
        template.enable_thinking, template.preserve_thinking, cfg.default_system, cfg.tool_format
    );
    let stage: Stage = cfg
        .stage
        .as_deref()
        .unwrap_or("sft")
        .parse()
        .map_err(|e| anyhow!("training config field `stage`: {e}"))?;
    let cutoff = cfg
        .cutoff_len
        .map(|c| c as usize)
        .unwrap_or(DEFAULT_CUTOFF_LEN);
    // LLaMA-Factory's packing default (on for pt) and its cutoff_len decrement when packing is
    // asked for; sft packing always keeps the packed rows apart (`neat_packing`).
    let mut pcfg =
        PreprocessConfig::llama_factory(stage, cutoff, cfg.packing, cfg.neat_packing == Some(true));
    pcfg.train_on_prompt = cfg.train_on_prompt.unwrap_or(false);
    pcfg.mask_history = cfg.mask_history.unwrap_or(false);
    pcfg.batch_size = cfg
        .preprocessing_batch_size
        .map_or(DEFAULT_PREPROCESSING_BATCH_SIZE, |b| b as usize);
    let dataset_dir = PathBuf::from(cfg.dataset_dir.clone().unwrap_or_else(|| "data".into()));
    // `do_train: false` reads no training set (LLaMA-Factory's evaluation-only runs need none).
    let specs: Vec<DatasetSpec> = if trains(&cfg) {
        items(&cfg.dataset)
            .iter()
            .map(|d| resolve_dataset(d, &dataset_dir, stage))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    if specs.is_empty() && trains(&cfg) {
        bail!("training config field `dataset` is required");
    }
    // LLaMA-Factory's order: each dataset's num_samples then max_samples, then the merge.
    let selection = Selection {
        max_samples: cfg.max_samples.map(|m| m as usize),
        mix: MixConfig {
            strategy: cfg
                .mix_strategy
                .as_deref()
                .unwrap_or("concat")
                .parse()
                .map_err(|e| anyhow!("training config field `mix_strategy`: {e}"))?,
            probs: cfg.interleave_probs.as_ref().map(|p| p.0.clone()),
            seed,
        },
    };
    selection
        .mix
        .validate(specs.len())
        .map_err(|e| anyhow!("training config: {e}"))?;
    let workers = cfg.preprocessing_num_workers.unwrap_or(1).max(1) as usize;
    // LLaMA-Factory's `num_proc`: the shards whose batches packing stays within.
    pcfg.num_proc = workers;
    // The tokenized set is cached in output_dir: a restarted generation, and every rank after
    // the first, reads it instead of tokenizing again (see data_cache). `overwrite_cache`
    // ignores a cached set and writes a fresh one.
    let cache = cfg.output_dir.as_deref().and_then(|o| {
        data_cache::path_for(
            Path::new(o),
            &specs,
            &selection,
            &model_dir,
            &template_name,
            &pcfg,
        )
    });
    let samples = if specs.is_empty() {
        Vec::new()
    } else {
        let data = data_cache::read_or_build(
            cache.as_deref(),
            cfg.overwrite_cache.unwrap_or(false),
            || load_and_preprocess(&specs, &selection, &template, &tokenizer, &pcfg, workers),
        )?;
        if data.stats.no_target > 0 {
            warnings.push(format!(
                "{} of {} training rows have no target token (cutoff_len {} cut every answer \
                 token, or the answer is empty); they are kept, as LLaMA-Factory keeps them, \
                 and add no loss",
                data.stats.no_target, data.stats.samples, pcfg.cutoff_len
            ));
        }
        data.samples
    };
    // Evaluation sets are selected and merged as the training sets are (LLaMA-Factory loads
    // both through `_get_merged_dataset`).
    let mut eval_sets = Vec::new();
    for item in items(&cfg.eval_dataset) {
        let spec = resolve_dataset(&item, &dataset_dir, Stage::Sft)?;
        eval_sets.push(DatasetRows {
            rows: spec.load_with_origins()?,
            num_samples: spec.num_samples,
        });
    }
    let eval_rows = if eval_sets.is_empty() {
        Vec::new()
    } else {
        select_and_merge(eval_sets, selection.max_samples, &selection.mix)
            .map_err(|e| anyhow!("training config field `eval_dataset`: {e}"))?
    };
    let mut eval = Vec::new();
    for (origin, rec) in &eval_rows {
        {
            let Record::Conversation(c) = rec else {
                bail!("{origin}: evaluation needs conversations (alpaca or sharegpt)");
            };
            let Some((last, history)) = c.turns.split_last() else {
                continue;
            };
            let prompt = template.encode_generation_prompt(
                &tokenizer,
                c.system.as_deref(),
                history,
                &last.user,
            )?;
            eval.push(EvalExample {
                prompt,
                answer: last.assistant.clone(),
            });
        }
    }
    let scheduler: SchedulerKind = plan
        .lr_scheduler_type
        .clone()
        .or(cfg.lr_scheduler_type.clone())
        .unwrap_or_else(|| "linear".into())
        .parse()
        .map_err(|e: String| anyhow!("training config field `lr_scheduler_type`: {e}"))?;
    let learning_rate = plan
        .optimizer
        .lr
        .or(cfg.learning_rate)
        .unwrap_or(DEFAULT_LR);
    // The schedule's kwargs, checked against the schedule the plan resolved (a DeepSpeed
    // `scheduler` block may name it) and, for the numbers, against the learning rate.
    let kwargs_error = |e: String| anyhow!("training config field `lr_scheduler_kwargs`: {e}");
    let kwargs = cfg.scheduler_kwargs().map_err(|e| anyhow!("{e}"))?;
    if let Some(w) = ringmaster_config::check_scheduler_kwargs(scheduler.name(), &kwargs)
        .map_err(kwargs_error)?
    {
        warnings.push(w);
    }
    let schedule_options =
        ScheduleOptions::from_kwargs(scheduler, &kwargs, learning_rate).map_err(kwargs_error)?;
    let weight_decay = plan
        .optimizer
        .weight_decay
        .or(cfg.weight_decay)
        .unwrap_or(0.0);
    let betas = plan.optimizer.betas.unwrap_or((
        cfg.adam_beta1.unwrap_or(0.9),
        cfg.adam_beta2.unwrap_or(0.999),
    ));
    let eps = plan.optimizer.eps.or(cfg.adam_epsilon).unwrap_or(1e-8);
    let output_dir = PathBuf::from(
        cfg.output_dir
            .clone()
            .ok_or_else(|| anyhow!("training config field `output_dir` is required"))?,
    );
    let (samples, mut held_out) = split_held_out(samples, cfg.val_size, seed)?;
    // eval_dataset's loss (LLaMA-Factory preprocesses the evaluation set as the training set and
    // the HF Trainer computes its loss); val_size and eval_dataset never come together.
    if !eval_rows.is_empty() && evaluates_loss(&cfg) && trains(&cfg) {
        if stage == Stage::Sft {
            let records: Vec<Record> = eval_rows.iter().map(|(_, r)| r.clone()).collect();
            held_out = preprocess_parallel(&records, &template, &tokenizer, &pcfg, workers)
                .map_err(|e| anyhow!("training config field `eval_dataset`: {e}"))?
                .samples;
        } else {
            warnings.push(
                "eval_dataset: its loss is computed for stage sft only; under pt it is scored by \
                 exact match at the end"
                    .into(),
            );
        }
    }
    if !eval_rows.is_empty() && !scores_by_generation(&cfg) && held_out.is_empty() && trains(&cfg) {
        warnings.push(
            "eval_dataset is not used: predict_with_generate: false skips its exact-match \
             scoring, and without eval_strategy (steps or epoch) or do_eval: true its loss is \
             not computed"
                .into(),
        );
    }
    if !held_out.is_empty() && !evaluates_loss(&cfg) {
        warnings.push(format!(
            "val_size holds out {} rows that are never evaluated: set eval_strategy (steps or \
             epoch) or do_eval: true",
            held_out.len()
        ));
    }
    Ok(Setup {
        cfg,
        plan,
        warnings,
        model,
        base,
        lora,
        tokenizer,
        template,
        samples: std::sync::Arc::new(samples),
        eval,
        held_out,
        output_dir,
        model_dir,
        scheduler,
        schedule_options,
        learning_rate,
        weight_decay,
        betas,
        eps,
        seed,
    })
}

/// The template of a recipe without `template`, as LLaMA-Factory's
/// `get_template_and_fix_tokenizer` picks it: `empty` when the tokenizer has no chat template.
/// When it has one LLaMA-Factory parses that Jinja template, which Ringmaster cannot: an error
/// naming `template`, with the template of this build that suits the model when there is one.
///
/// # Errors
/// A tokenizer with a chat template.
pub fn default_template(model: &LlamaConfig, tokenizer: &Tokenizer) -> Result<&'static str> {
    if !tokenizer.has_chat_template() {
        return Ok("empty");
    }
    use ringmaster_model::config::Arch;
    let suggestion = match model.arch {
        Arch::Qwen2 => Some("qwen"),
        Arch::Qwen3 => Some("qwen3 (qwen3_nothink for a model without thinking)"),
        Arch::Mistral => Some("mistral"),
        Arch::Llama if tokenizer.atomic_token_id("<|eot_id|>").is_some() => Some("llama3"),
        Arch::Llama => None,
    };
    bail!(
        "training config field `template` is required: the tokenizer has a chat template, which \
         LLaMA-Factory parses when `template` is absent and Ringmaster cannot; {}",
        match suggestion {
            Some(t) => format!(
                "for this {} model write `template: {t}`",
                model.arch.model_type()
            ),
            None => format!(
                "name one of {} (`empty` for none)",
                ringmaster_data::template::TEMPLATE_NAMES.join(", ")
            ),
        }
    )
}

/// True when the run computes the held-out loss at all: `eval_strategy` steps or epoch, or
/// `do_eval` (once, at the end).
pub fn evaluates_loss(cfg: &TrainConfig) -> bool {
    matches!(cfg.eval_strategy.as_deref(), Some("steps" | "epoch")) || cfg.do_eval == Some(true)
}

/// LLaMA-Factory's `val_size`: a fraction (below 1) or a count (above 1) of the training rows,
/// held out for the evaluation loss. As HF datasets' `train_test_split`, the held-out part has
/// `ceil(fraction × rows)` rows chosen by a seeded permutation (ours, not numpy's: the sizes
/// are LLaMA-Factory's, the rows differ), and both parts must keep at least one row.
///
/// # Errors
/// A `val_size` that leaves either part empty, or a count that is not a whole number.
pub fn split_held_out(
    samples: Vec<Sample>,
    val_size: Option<f64>,
    seed: u64,
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let v = match val_size {
        Some(v) if v > 1e-6 => v,
        _ => return Ok((samples, Vec::new())),
    };
    let n = samples.len();
    let held = if v < 1.0 {
        (v * n as f64).ceil() as usize
    } else if v > 1.0 && v.fract() == 0.0 {
        v as usize
    } else {
        bail!(
            "training config field `val_size`: {v} is neither a fraction below 1 nor a whole \
             number of rows above 1"
        );
    };
    if held == 0 || held >= n {
        bail!(
            "training config field `val_size`: {v} of {n} rows holds out {held}, which leaves \
             no rows to {}",
            if held == 0 { "evaluate" } else { "train on" }
        );
    }
    let mut order: Vec<usize> = (0..n).collect();
    ringmaster_data::rng::DetRng::from_seeds(&[seed, 0x7661_6c5f_7369_7a65]).shuffle(&mut order);
    let mut held_mask = vec![false; n];
    for &i in &order[..held] {
        held_mask[i] = true;
    }
    let (mut train, mut held_out) = (Vec::with_capacity(n - held), Vec::with_capacity(held));
    for (s, h) in samples.into_iter().zip(held_mask) {
        if h {
            held_out.push(s);
        } else {
            train.push(s);
        }
    }
    Ok((train, held_out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringmaster_data::tokenizer::{BpeTrainingOptions, train_bpe};
    use ringmaster_model::Arch;

    fn tokenizer(template: &str, chat_template: bool) -> Tokenizer {
        let t = Template::by_name(template).unwrap();
        let mut tok = train_bpe(
            ["hello world", "the quick brown fox"].into_iter(),
            &BpeTrainingOptions::for_template(&t, 300),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        tok.save_dir(dir.path()).unwrap();
        if chat_template {
            std::fs::write(dir.path().join("chat_template.jinja"), "{{ messages }}").unwrap();
        }
        tok = Tokenizer::from_dir(dir.path()).unwrap();
        tok
    }

    /// LLaMA-Factory's `get_template_and_fix_tokenizer` with `template: None`: `empty` without
    /// a chat template; with one (here `chat_template.jinja`, which transformers reads as
    /// `tokenizer.chat_template`) it would parse it: refused, suggesting the template of the
    /// model family.
    #[test]
    fn default_template_is_empty_or_a_suggestion() {
        let model = |arch| LlamaConfig::tiny_arch(arch, 300, 8, 1, 1, 1);
        assert_eq!(
            default_template(&model(Arch::Qwen2), &tokenizer("qwen", false)).unwrap(),
            "empty"
        );
        for (arch, tok, says) in [
            (Arch::Qwen2, "qwen", "write `template: qwen`"),
            (Arch::Qwen3, "qwen3", "write `template: qwen3 "),
            (Arch::Mistral, "mistral", "write `template: mistral`"),
            (Arch::Llama, "llama3", "write `template: llama3`"),
            (Arch::Llama, "alpaca", "name one of"),
        ] {
            let err = default_template(&model(arch), &tokenizer(tok, true))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("training config field `template`") && err.contains(says),
                "{arch:?} {tok}: {err}"
            );
        }
    }
}
