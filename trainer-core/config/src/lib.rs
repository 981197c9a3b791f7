//! The training-config schema, shared by the coordinator (validation at submit time) and the
//! trainer (which runs it). Free of burn so that the control plane builds fast and validates a job
//! with exactly the code the trainer uses.
//!
//! Layout:
//! - [`TrainConfig`] — LLaMA-Factory field names; [`TrainConfig::from_value`] rejects unknown
//!   keys (listing all of them) and bad values (naming the field).
//! - [`TrainConfig::referenced_files`] — the DeepSpeed / FSDP files a config names, which
//!   `ringctl submit` sends inline with the job.
//! - [`deepspeed`] — DeepSpeed JSON as written for DeepSpeed (`"auto"` values included).
//! - [`accelerate`] — accelerate YAML (`distributed_type`, `deepspeed_config.*`, `fsdp_config.*`)
//!   and the bare `fsdp_config` mapping.
//! - [`plan`] — the engine's [`Plan`] (what is sharded, what is offloaded, precision, batch,
//!   buckets) resolved from the training config and those files by the HF Trainer rules.
//! - [`estimate`] — DeepSpeed's memory estimators, model sizes from a Hugging Face Llama
//!   `config.json` or a preset, and the per-plan table behind `ringctl estimate`.
//! - [`paths`] — where a job may write: normalisation, allowed roots, system directories,
//!   plain file names in checkpoint manifests, and the config's relative paths made absolute.

pub mod accelerate;
pub mod deepspeed;
pub mod estimate;
pub mod keys;
pub mod overrides;
pub mod paths;
pub mod plan;
mod reader;
pub mod units;
pub mod yaml;

pub use accelerate::{AccelerateConfig, FsdpConfig, ShardingStrategy};
pub use deepspeed::DeepSpeedConfig;
pub use overrides::CommandLine;
pub use plan::{Plan, plan_from, plan_from_accelerate, plan_from_files};
pub use reader::Auto;

use serde::{Deserialize, Serialize};

/// Every key a training config may hold. Keep sorted; an unknown key is an error that lists it.
pub const KNOWN_KEYS: &[&str] = &[
    "accelerate_config",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "bf16",
    "cutoff_len",
    "dataloader_num_workers",
    "dataset",
    "dataset_dir",
    "ddp_timeout",
    "deepspeed",
    "default_system",
    "device",
    "disable_shuffling",
    "do_eval",
    "do_train",
    "enable_thinking",
    "eval_dataset",
    "eval_steps",
    "eval_strategy",
    "finetuning_type",
    "fp16",
    "fsdp_config",
    "gradient_accumulation_steps",
    "interleave_probs",
    "learning_rate",
    "logging_steps",
    "lora_alpha",
    "lora_dropout",
    "lora_rank",
    "lora_target",
    "lr_scheduler_kwargs",
    "lr_scheduler_type",
    "mask_history",
    "max_grad_norm",
    "max_new_tokens",
    "max_samples",
    "max_steps",
    "mix_strategy",
    "model_name_or_path",
    "neat_packing",
    "num_train_epochs",
    "output_dir",
    "overwrite_cache",
    "overwrite_output_dir",
    "packing",
    "per_device_eval_batch_size",
    "per_device_train_batch_size",
    "plot_loss",
    "predict_with_generate",
    "preprocessing_batch_size",
    "preprocessing_num_workers",
    "preserve_thinking",
    "quantization_bit",
    "report_to",
    "resume_from_checkpoint",
    "save_only_model",
    "save_steps",
    "save_total_limit",
    "seed",
    "stage",
    "template",
    "tool_format",
    "train_from_scratch",
    "train_on_prompt",
    "trust_remote_code",
    "val_size",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
];

/// A training config as LLaMA-Factory users write it. Absent fields take the trainer's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model_name_or_path: Option<String>,
    pub stage: Option<String>,
    /// Absent or true: train. `false` (LLaMA-Factory's evaluation-only runs): nothing is
    /// trained; the trainer scores `model_name_or_path` on `eval_dataset` by exact match of
    /// greedy answers, which needs `eval_dataset`.
    pub do_train: Option<bool>,
    /// Compute the held-out loss once after the last step (an `eval_strategy` implies it).
    pub do_eval: Option<bool>,
    pub dataset: Option<StringOrList>,
    pub dataset_dir: Option<String>,
    pub template: Option<String>,
    pub finetuning_type: Option<String>,
    pub lora_rank: Option<u32>,
    pub lora_alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub lora_target: Option<StringOrList>,
    pub output_dir: Option<String>,
    /// Accepted; no effect: a first generation starts at step 0 whatever `output_dir` holds
    /// (LLaMA-Factory without it resumes from `output_dir`'s last checkpoint; here
    /// `resume_from_checkpoint: true` does that).
    pub overwrite_output_dir: Option<bool>,
    pub per_device_train_batch_size: Option<u32>,
    pub gradient_accumulation_steps: Option<u32>,
    /// One of [`LR_SCHEDULERS`] (default `linear`).
    pub lr_scheduler_type: Option<String>,
    /// The schedule's own arguments, as transformers' `get_scheduler` takes them: a mapping (or
    /// its JSON text) of numbers, e.g. `{min_lr_rate: 0.1}` for `cosine_with_min_lr`
    /// ([`TrainConfig::scheduler_kwargs`], [`check_scheduler_kwargs`]).
    pub lr_scheduler_kwargs: Option<serde_json::Value>,
    pub warmup_ratio: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub learning_rate: Option<f64>,
    pub weight_decay: Option<f64>,
    pub num_train_epochs: Option<f64>,
    pub max_steps: Option<i64>,
    pub max_grad_norm: Option<f64>,
    pub max_samples: Option<u64>,
    pub logging_steps: Option<u64>,
    pub save_steps: Option<u64>,
    pub save_total_limit: Option<u32>,
    pub eval_steps: Option<u64>,
    pub val_size: Option<f64>,
    pub plot_loss: Option<bool>,
    pub bf16: Option<bool>,
    pub fp16: Option<bool>,
    pub seed: Option<u64>,
    pub cutoff_len: Option<u32>,
    /// Absent: on for `stage: pt`, off for sft (LLaMA-Factory's `get_train_args`). Set to true
    /// (or with `neat_packing`), `cutoff_len` is decremented by one as LLaMA-Factory's
    /// `DataArguments.__post_init__` does.
    pub packing: Option<bool>,
    /// Packing without attention between the packed rows (sft only); implies `packing`.
    /// Ringmaster's sft packing always keeps rows apart, so this is `packing: true`.
    pub neat_packing: Option<bool>,
    pub deepspeed: Option<String>,
    pub fsdp_config: Option<String>,
    /// An accelerate config file (what `accelerate launch --config_file` takes):
    /// `distributed_type` MULTI_GPU, DEEPSPEED (inline `deepspeed_config` or its
    /// `deepspeed_config_file`) or FSDP; `num_machines` / `num_processes` checked against the
    /// cluster. Not together with `deepspeed` or `fsdp_config`.
    pub accelerate_config: Option<String>,
    /// A checkpoint directory, or `true` for the newest committed one in `output_dir` (the HF
    /// Trainer's two forms).
    #[serde(default, deserialize_with = "bool_or_string")]
    pub resume_from_checkpoint: Option<String>,
    pub preprocessing_num_workers: Option<u32>,
    /// Rows per preprocessing batch (LLaMA-Factory's default 1000): packing (sft's knapsack,
    /// pt's concatenation) works within each batch of each `preprocessing_num_workers` shard.
    pub preprocessing_batch_size: Option<u32>,
    pub report_to: Option<StringOrList>,
    pub ddp_timeout: Option<u64>,
    /// Initialise the model's weights instead of reading them (LLaMA-Factory's
    /// `train_from_scratch`): `model_name_or_path` then needs only config.json + tokenizer.json.
    pub train_from_scratch: Option<bool>,
    /// Evaluation datasets. With `eval_strategy` (or `do_eval`) their loss is computed during
    /// training, as LLaMA-Factory does (sft: the rows preprocessed as the training rows are);
    /// either way they are also scored at the end by exact match of greedy answers.
    /// Refused together with `val_size`, as LLaMA-Factory refuses the pair.
    pub eval_dataset: Option<StringOrList>,
    /// `no`, `steps` or `epoch`: when the loss of the evaluation rows (`val_size` or
    /// `eval_dataset`) is computed (every `eval_steps`, or at each epoch's end; and once after
    /// the last step).
    pub eval_strategy: Option<String>,
    /// Absent or true: `eval_dataset` is also scored at the end by greedy generation and exact
    /// match against the reference answers; `false` skips that (the held-out loss, with an
    /// eval strategy or `do_eval`, is still computed).
    pub predict_with_generate: Option<bool>,
    /// Longest generated answer in evaluation and `trainer generate`.
    pub max_new_tokens: Option<u32>,
    /// Rows per evaluation forward pass.
    pub per_device_eval_batch_size: Option<u32>,
    /// Accepted for LLaMA-Factory compatibility; no effect (no remote code is ever run).
    pub trust_remote_code: Option<bool>,
    /// Where the trainer computes: `auto` (default: CUDA when built with it and a GPU is
    /// visible, else CPU), `cpu`, or `cuda` (an error at start when no GPU can be used).
    pub device: Option<DeviceRequest>,
    /// How several datasets are merged (LLaMA-Factory's `mix_strategy`): `concat` (default),
    /// `interleave_under` (stop when the first runs out), `interleave_over` (cycle until the
    /// last runs out) or `interleave_once` (each row once, interleaved).
    pub mix_strategy: Option<String>,
    /// Probabilities of each dataset when interleaving (`0.3,0.7` or a list).
    pub interleave_probs: Option<FloatList>,
    /// Train on the rows in their merged order instead of shuffling them each epoch.
    pub disable_shuffling: Option<bool>,
    /// Tokenize again instead of reading the cached tokenized set.
    pub overwrite_cache: Option<bool>,
    /// Threads that read and collate batches ahead of the step (0: in the training loop).
    pub dataloader_num_workers: Option<u32>,
    /// Checkpoints hold the weights only (no AdamW moments, no loss scale): a resume from one
    /// restarts the optimizer (the schedule and the data order follow from the step).
    pub save_only_model: Option<bool>,
    /// Quantized (QLoRA) training: refused, not supported yet.
    pub quantization_bit: Option<u32>,
    /// AdamW's beta1 (default 0.9; a DeepSpeed `optimizer.params.betas` wins).
    pub adam_beta1: Option<f64>,
    /// AdamW's beta2 (default 0.999).
    pub adam_beta2: Option<f64>,
    /// AdamW's epsilon (default 1e-8).
    pub adam_epsilon: Option<f64>,
    /// Compute the loss on the prompt too, not only on the answers (sft).
    pub train_on_prompt: Option<bool>,
    /// Compute the loss on the last turn's answer only (sft, multi-turn).
    pub mask_history: Option<bool>,
    /// Reasoning templates (`qwen3`): keep the thoughts and train on an empty one where an
    /// answer has none (default true, LLaMA-Factory's); false masks the empty thought.
    pub enable_thinking: Option<bool>,
    /// Reasoning templates: keep the thoughts of earlier turns too.
    pub preserve_thinking: Option<bool>,
    /// The system prompt of rows that have none (replaces the template's default).
    pub default_system: Option<String>,
    /// How tool lists are written into the prompt (`qwen`).
    pub tool_format: Option<String>,
    /// Keys of the recipe that LLaMA-Factory or transformers knows and that are accepted
    /// without effect here ([`keys::Effect::NoEffect`], or a [`keys::Effect::DefaultOnly`] key
    /// at its default), sorted; the trainer names them in one start-up line.
    #[serde(skip)]
    pub no_effect: Vec<String>,
}

/// The `device` key: where the trainer should compute. What it resolves to on a given machine
/// (and why) is decided at trainer start by `ringmaster-device`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceRequest {
    /// CUDA when the binary was built with it, the driver loads and a device is visible; else
    /// CPU, with the reason in the log.
    #[default]
    Auto,
    /// Always the CPU backend.
    Cpu,
    /// A CUDA device, or an error at start that names why none can be used.
    Cuda,
}

impl DeviceRequest {
    /// The values the `device` key accepts, in the order the docs list them.
    pub const ALLOWED: [&'static str; 3] = ["auto", "cpu", "cuda"];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceRequest::Auto => "auto",
            DeviceRequest::Cpu => "cpu",
            DeviceRequest::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;

    /// Exact lower-case names, as the other enum-like keys take them.
    fn from_str(s: &str) -> Result<DeviceRequest, String> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda),
            _ => Err(format!(
                "expected one of {}, got '{s}'",
                DeviceRequest::ALLOWED.join(", ")
            )),
        }
    }
}

impl TryFrom<String> for DeviceRequest {
    type Error = String;

    fn try_from(s: String) -> Result<DeviceRequest, String> {
        s.parse()
    }
}

impl From<DeviceRequest> for String {
    fn from(d: DeviceRequest) -> String {
        d.as_str().to_owned()
    }
}

/// A field that LLaMA-Factory accepts either as `a,b` or as a YAML list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    /// The items, with `a, b` split on commas.
    pub fn items(&self) -> Vec<String> {
        match self {
            StringOrList::One(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            StringOrList::Many(v) => v.clone(),
        }
    }
}

/// A list of numbers written as `0.3,0.7`, `0.5` or a YAML list (LLaMA-Factory's
/// `interleave_probs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FloatListRepr", into = "Vec<f64>")]
pub struct FloatList(pub Vec<f64>);

#[derive(Deserialize)]
#[serde(untagged)]
enum FloatListRepr {
    One(f64),
    Text(String),
    Many(Vec<f64>),
}

impl TryFrom<FloatListRepr> for FloatList {
    type Error = String;

    fn try_from(r: FloatListRepr) -> Result<FloatList, String> {
        match r {
            FloatListRepr::One(x) => Ok(FloatList(vec![x])),
            FloatListRepr::Many(v) => Ok(FloatList(v)),
            FloatListRepr::Text(s) => s
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(|t| {
                    t.parse::<f64>()
                        .map_err(|_| format!("expected numbers separated by commas, got '{t}'"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(FloatList),
        }
    }
}

impl From<FloatList> for Vec<f64> {
    fn from(l: FloatList) -> Vec<f64> {
        l.0
    }
}

/// Why a training config was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("training config is not valid YAML: {0}")]
    Syntax(String),
    #[error("training config must be a mapping of keys to values, got {0}")]
    NotAMapping(&'static str),
    #[error("training config has unknown key(s): {}", .0.join(", "))]
    UnknownKeys(Vec<String>),
    #[error("training config field `{field}`: {message}")]
    Field { field: String, message: String },
    /// A DeepSpeed / accelerate / FSDP file that does not parse.
    #[error("{file} is not valid: {message}")]
    FileSyntax { file: String, message: String },
    /// Unknown keys of a DeepSpeed / accelerate / FSDP file, all of them, as dotted paths.
    #[error("{file} has unknown key(s): {}", .keys.join(", "))]
    UnknownKeysIn { file: String, keys: Vec<String> },
    /// A bad value in a DeepSpeed / accelerate / FSDP file, naming its dotted field.
    #[error("{file} field `{field}`: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
    /// Two files (or a file and the cluster) that contradict each other; the message names both
    /// values.
    #[error("{0}")]
    Mismatch(String),
    /// A referenced file could not be read.
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
}

/// The standard text of a [`Warning`] for a key our engine accepts without effect.
pub const NO_EFFECT: &str = "accepted, no effect in Ringmaster";

/// A key accepted from a DeepSpeed / accelerate / FSDP file that does not do what it does there;
/// the trainer prints all of them once at start ([`warning_lines`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Warning {
    /// Dotted path, e.g. `zero_optimization.round_robin_gradients`.
    pub key: String,
    pub message: String,
}

impl Warning {
    /// `key`: accepted, no effect in Ringmaster.
    pub fn no_effect(key: impl Into<String>) -> Warning {
        Warning {
            key: key.into(),
            message: NO_EFFECT.into(),
        }
    }

    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Warning {
        Warning {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// The lines to print once at start: every plain "no effect" key on one line
/// (`accepted, no effect in Ringmaster: a, b, c`), then one line per other warning.
pub fn warning_lines(warnings: &[Warning]) -> Vec<String> {
    let plain: Vec<&str> = warnings
        .iter()
        .filter(|w| w.message == NO_EFFECT)
        .map(|w| w.key.as_str())
        .collect();
    let mut lines = Vec::new();
    if !plain.is_empty() {
        lines.push(format!("{NO_EFFECT}: {}", plain.join(", ")));
    }
    lines.extend(
        warnings
            .iter()
            .filter(|w| w.message != NO_EFFECT)
            .map(Warning::to_string),
    );
    lines
}

/// The largest `per_device_train_batch_size` and `gradient_accumulation_steps` (2^20): rows a
/// step holds at once or accumulates, far beyond any real setting.
pub const MAX_BATCH: u32 = 1 << 20;

/// A recipe's text (YAML; JSON is YAML too) as a value, before validation.
///
/// # Errors
/// [`ConfigError::Syntax`]; a NaN or infinite number (`.nan`, `.inf`, which a JSON value
/// would hold as null: the key unset) as [`ConfigError::Field`] naming its key path.
pub fn parse_document(text: &str) -> Result<serde_json::Value, ConfigError> {
    yaml::to_json(text).map_err(|e| match e {
        yaml::YamlError::Syntax(m) => ConfigError::Syntax(m),
        yaml::YamlError::NonFinite(at) => ConfigError::Field {
            field: at,
            message: yaml::NON_FINITE.into(),
        },
    })
}

impl TrainConfig {
    /// Parses YAML text (JSON is YAML too).
    ///
    /// # Errors
    /// Syntax errors, unknown keys (all listed) and bad values (naming the field).
    pub fn from_yaml(text: &str) -> Result<TrainConfig, ConfigError> {
        TrainConfig::from_value(&parse_document(text)?)
    }

    /// Validates a config already parsed into a JSON value.
    ///
    /// # Errors
    /// As [`TrainConfig::from_yaml`].
    pub fn from_value(value: &serde_json::Value) -> Result<TrainConfig, ConfigError> {
        let map = match value {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => return Err(ConfigError::NotAMapping("an empty document")),
            serde_json::Value::Array(_) => return Err(ConfigError::NotAMapping("a list")),
            _ => return Err(ConfigError::NotAMapping("a scalar")),
        };
        // Sort the keys: modeled ones are read into the struct; catalogue keys without effect
        // are type-checked and set aside; the rest are unknown (all listed).
        let mut modeled = serde_json::Map::new();
        let mut unknown = Vec::new();
        let mut no_effect = Vec::new();
        for (k, v) in map {
            match keys::info(k) {
                Some(info) if info.effect == keys::Effect::Modeled => {
                    modeled.insert(k.clone(), v.clone());
                }
                Some(info) => {
                    keys::check_unmodeled(info, v).map_err(|message| ConfigError::Field {
                        field: k.clone(),
                        message,
                    })?;
                    no_effect.push(k.clone());
                }
                None => unknown.push(k.clone()),
            }
        }
        if !unknown.is_empty() {
            return Err(ConfigError::UnknownKeys(unknown));
        }
        // Deserialize field by field so that a bad value names its field.
        for (k, v) in &modeled {
            let mut one = serde_json::Map::new();
            one.insert(k.clone(), v.clone());
            if let Err(e) = serde_json::from_value::<TrainConfig>(serde_json::Value::Object(one)) {
                return Err(ConfigError::Field {
                    field: k.clone(),
                    message: e.to_string(),
                });
            }
        }
        let mut cfg: TrainConfig = serde_json::from_value(serde_json::Value::Object(modeled))
            .map_err(|e| ConfigError::Field {
                field: "?".into(),
                message: e.to_string(),
            })?;
        cfg.no_effect = no_effect;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let field = |f: &str, m: String| ConfigError::Field {
            field: f.into(),
            message: m,
        };
        if let Some(s) = &self.stage
            && !["sft", "pt"].contains(&s.as_str())
        {
            return Err(field("stage", format!("expected 'sft' or 'pt', got '{s}'")));
        }
        if let Some(s) = &self.finetuning_type
            && !["full", "lora"].contains(&s.as_str())
        {
            return Err(field(
                "finetuning_type",
                format!("expected 'full' or 'lora', got '{s}'"),
            ));
        }
        if let Some(s) = &self.lr_scheduler_type
            && !LR_SCHEDULERS.iter().any(|(name, _)| name == s)
        {
            let names: Vec<&str> = LR_SCHEDULERS.iter().map(|(n, _)| *n).collect();
            return Err(field(
                "lr_scheduler_type",
                format!("expected one of {}, got '{s}'", names.join(", ")),
            ));
        }
        let kwargs = self.scheduler_kwargs()?;
        // With the type given here its kwargs are checked now; a type that comes from a
        // DeepSpeed `scheduler` block is checked by the trainer once the plan is read.
        if let Some(kind) = &self.lr_scheduler_type {
            check_scheduler_kwargs(kind, &kwargs).map_err(|m| field("lr_scheduler_kwargs", m))?;
        }
        if self.do_train == Some(false) {
            let why = if self
                .eval_dataset
                .as_ref()
                .is_none_or(|d| d.items().is_empty())
            {
                Some("it needs eval_dataset")
            } else if self.predict_with_generate == Some(false) {
                Some("predict_with_generate: false leaves nothing to do")
            } else if self.train_from_scratch == Some(true) {
                Some("train_from_scratch: true would score random weights")
            } else if self.val_size.is_some_and(|v| v > 1e-6) {
                Some("val_size holds rows out of a training set that is not read")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(field(
                    "do_train",
                    format!(
                        "false means no training: the trainer then only scores \
                         model_name_or_path on eval_dataset by exact match of greedy answers, \
                         and {why}; remove do_train (or set it to true) to train"
                    ),
                ));
            }
        }
        self.validate_as_llama_factory()?;
        if self.bf16 == Some(true) && self.fp16 == Some(true) {
            return Err(field("bf16", "bf16 and fp16 cannot both be true".into()));
        }
        if let Some(acc) = &self.accelerate_config {
            for (key, other) in [
                ("deepspeed", &self.deepspeed),
                ("fsdp_config", &self.fsdp_config),
            ] {
                if let Some(o) = other {
                    return Err(field(
                        "accelerate_config",
                        format!(
                            "give either accelerate_config ({acc}) or {key} ({o}), not both \
                             (an accelerate config names its DeepSpeed or FSDP settings itself)"
                        ),
                    ));
                }
            }
        }
        for (name, v) in [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
        ] {
            if v == Some(0) {
                return Err(field(name, "must be at least 1".into()));
            }
            if let Some(n) = v
                && n > MAX_BATCH
            {
                return Err(field(name, format!("{n} is over the limit of {MAX_BATCH}")));
            }
        }
        if let Some(lr) = self.learning_rate
            && !(lr.is_finite() && lr >= 0.0)
        {
            return Err(field("learning_rate", format!("must be >= 0, got {lr}")));
        }
        if let Some(s) = &self.eval_strategy
            && !["no", "steps", "epoch"].contains(&s.as_str())
        {
            return Err(field(
                "eval_strategy",
                format!("expected 'no', 'steps' or 'epoch', got '{s}'"),
            ));
        }
        if let Some(s) = &self.mix_strategy
            && ![
                "concat",
                "interleave_under",
                "interleave_over",
                "interleave_once",
            ]
            .contains(&s.as_str())
        {
            return Err(field(
                "mix_strategy",
                format!(
                    "expected 'concat', 'interleave_under', 'interleave_over' or \
                     'interleave_once', got '{s}'"
                ),
            ));
        }
        if let Some(p) = &self.interleave_probs
            && p.0.iter().any(|x| !(x.is_finite() && *x >= 0.0))
        {
            return Err(field(
                "interleave_probs",
                format!("probabilities must be >= 0, got {:?}", p.0),
            ));
        }
        if let Some(bits) = self.quantization_bit {
            return Err(field(
                "quantization_bit",
                format!(
                    "quantized training (QLoRA, {bits}-bit; also FSDP+QLoRA) is not supported yet; \
                     remove quantization_bit to train LoRA on full-precision weights"
                ),
            ));
        }
        if let Some(r) = self.warmup_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(field("warmup_ratio", format!("must be in [0, 1], got {r}")));
        }
        // LLaMA-Factory's DataArguments refuse the pair: the evaluation rows come from one or
        // the other.
        if self.val_size.is_some_and(|v| v > 1e-6)
            && self
                .eval_dataset
                .as_ref()
                .is_some_and(|d| !d.items().is_empty())
        {
            return Err(field(
                "val_size",
                "cannot be given with eval_dataset (as in LLaMA-Factory): the evaluation rows \
                 come from one or the other"
                    .to_string(),
            ));
        }
        Ok(())
    }

    /// The checks of LLaMA-Factory's `get_train_args` (hparams/parser.py) on the keys Ringmaster
    /// models, with its messages: sft-only switches under another stage, and evaluation asked
    /// for without evaluation rows. An `eval_strategy` other than `no` counts as `do_eval`, as
    /// the HF `TrainingArguments.__post_init__` sets it before LLaMA-Factory checks.
    fn validate_as_llama_factory(&self) -> Result<(), ConfigError> {
        let field = |f: &str, m: &str| ConfigError::Field {
            field: f.into(),
            message: format!("{m} (LLaMA-Factory refuses it too)"),
        };
        if self.stage.as_deref().is_some_and(|s| s != "sft") {
            if self.predict_with_generate == Some(true) {
                return Err(field(
                    "predict_with_generate",
                    "`predict_with_generate` cannot be set as True except SFT",
                ));
            }
            if self.neat_packing == Some(true) {
                return Err(field(
                    "neat_packing",
                    "`neat_packing` cannot be set as True except SFT",
                ));
            }
            for (key, set) in [
                ("train_on_prompt", self.train_on_prompt),
                ("mask_history", self.mask_history),
            ] {
                if set == Some(true) {
                    return Err(field(
                        key,
                        "`train_on_prompt` or `mask_history` cannot be set as True except SFT",
                    ));
                }
            }
        }
        let evaluates = self.do_eval == Some(true)
            || self.predict_with_generate == Some(true)
            || self.eval_strategy.as_deref().is_some_and(|s| s != "no");
        let no_eval_rows = self
            .eval_dataset
            .as_ref()
            .is_none_or(|d| d.items().is_empty())
            && self.val_size.is_none_or(|v| v < 1e-6);
        if evaluates && no_eval_rows {
            let key = if self.do_eval == Some(true) {
                "do_eval"
            } else if self.predict_with_generate == Some(true) {
                "predict_with_generate"
            } else {
                "eval_strategy"
            };
            return Err(field(
                key,
                "Please make sure eval_dataset be provided or val_size >1e-6: evaluation is asked \
                 for (do_eval, predict_with_generate or an eval_strategy) but there are no \
                 evaluation rows",
            ));
        }
        Ok(())
    }

    /// `lr_scheduler_kwargs` as (name, number) pairs: a mapping, or its JSON text (as
    /// transformers' argument parser takes it on a command line); absent or null: none.
    ///
    /// # Errors
    /// Anything but a mapping of numbers, naming the field.
    pub fn scheduler_kwargs(&self) -> Result<Vec<(String, f64)>, ConfigError> {
        let bad = |m: String| ConfigError::Field {
            field: "lr_scheduler_kwargs".into(),
            message: m,
        };
        let parsed;
        let map = match &self.lr_scheduler_kwargs {
            None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
            Some(serde_json::Value::Object(m)) => m,
            Some(serde_json::Value::String(text)) if text.trim().is_empty() => {
                return Ok(Vec::new());
            }
            Some(serde_json::Value::String(text)) => {
                parsed = serde_json::from_str::<serde_json::Value>(text)
                    .map_err(|e| bad(format!("not a JSON object: {e}")))?;
                match &parsed {
                    serde_json::Value::Object(m) => m,
                    other => {
                        return Err(bad(format!(
                            "expected a mapping, got {}",
                            reader::show(other)
                        )));
                    }
                }
            }
            Some(other) => {
                return Err(bad(format!(
                    "expected a mapping such as {{min_lr_rate: 0.1}}, got {}",
                    reader::show(other)
                )));
            }
        };
        map.iter()
            .map(|(k, v)| match v.as_f64() {
                Some(x) if x.is_finite() => Ok((k.clone(), x)),
                _ => Err(bad(format!(
                    "`{k}`: expected a number, got {}",
                    reader::show(v)
                ))),
            })
            .collect()
    }

    /// The `device` key, `auto` when absent.
    pub fn device_request(&self) -> DeviceRequest {
        self.device.unwrap_or_default()
    }

    /// Paths of the DeepSpeed JSON, FSDP and accelerate YAML files this config names, as
    /// written. (A DeepSpeed file that an accelerate config names is one level further:
    /// [`AccelerateConfig::deepspeed_file`].)
    pub fn referenced_files(&self) -> Vec<String> {
        self.deepspeed
            .iter()
            .chain(self.fsdp_config.iter())
            .chain(self.accelerate_config.iter())
            .cloned()
            .collect()
    }
}

/// The `lr_scheduler_type` values Ringmaster runs (transformers' names and formulas), each with
/// the `lr_scheduler_kwargs` keys transformers' `get_scheduler` passes to it; `None`: it passes
/// none (`constant`, `constant_with_warmup`, `inverse_sqrt`), so any are ignored. Its other
/// types (`reduce_lr_on_plateau`, `cosine_warmup_with_min_lr`, `warmup_stable_decay`) are
/// refused.
pub const LR_SCHEDULERS: &[(&str, Option<&[&str]>)] = &[
    ("linear", Some(&[])),
    ("cosine", Some(&["num_cycles"])),
    ("cosine_with_restarts", Some(&["num_cycles"])),
    ("polynomial", Some(&["lr_end", "power"])),
    ("constant", None),
    ("constant_with_warmup", None),
    ("inverse_sqrt", None),
    (
        "cosine_with_min_lr",
        Some(&["num_cycles", "min_lr", "min_lr_rate"]),
    ),
];

/// Checks `lr_scheduler_kwargs` against the schedule `kind` as transformers' `get_scheduler`
/// would: a key the schedule function does not take is an error (transformers raises a
/// `TypeError`); for the schedules it passes no kwargs to, `Ok(Some(warning))` says they are
/// ignored.
///
/// # Errors
/// The message names the key and the ones `kind` takes.
pub fn check_scheduler_kwargs(
    kind: &str,
    kwargs: &[(String, f64)],
) -> Result<Option<String>, String> {
    let Some((_, takes)) = LR_SCHEDULERS.iter().find(|(n, _)| *n == kind) else {
        return Err(format!("unknown lr_scheduler_type '{kind}'"));
    };
    if kwargs.is_empty() {
        return Ok(None);
    }
    let names: Vec<&str> = kwargs.iter().map(|(k, _)| k.as_str()).collect();
    match takes {
        None => Ok(Some(format!(
            "lr_scheduler_kwargs: {} ignored: transformers passes no kwargs to the {kind} \
             schedule",
            names.join(", ")
        ))),
        Some(takes) => match names.iter().find(|n| !takes.contains(n)) {
            None => Ok(None),
            Some(bad) => Err(format!(
                "`{bad}` is not an argument of the {kind} schedule ({})",
                if takes.is_empty() {
                    "it takes none".to_string()
                } else {
                    format!("it takes {}", takes.join(", "))
                }
            )),
        },
    }
}

/// A YAML value that is either a boolean or a string, read as a string (`true` → "true").
fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        B(bool),
        S(String),
    }
    Ok(Option::<V>::deserialize(d)?.map(|v| match v {
        V::B(b) => b.to_string(),
        V::S(s) => s,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_are_sorted_and_match_the_struct() {
        let mut sorted = KNOWN_KEYS.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, KNOWN_KEYS);
        // Every known key deserializes into the struct (null is accepted by every Option).
        for k in KNOWN_KEYS {
            let v = serde_json::json!({ *k: null });
            serde_json::from_value::<TrainConfig>(v).unwrap_or_else(|e| panic!("{k}: {e}"));
        }
    }

    #[test]
    fn parses_a_llama_factory_config() {
        let cfg = TrainConfig::from_yaml(
            "model_name_or_path: m\nstage: sft\ndo_train: true\nfinetuning_type: lora\n\
             lora_target: all\ndataset: a,b\nlearning_rate: 1.0e-4\nbf16: true\n\
             deepspeed: examples/ds_z3_config.json\n",
        )
        .unwrap();
        assert_eq!(cfg.dataset.as_ref().unwrap().items(), vec!["a", "b"]);
        assert_eq!(cfg.learning_rate, Some(1e-4));
        assert_eq!(cfg.referenced_files(), vec!["examples/ds_z3_config.json"]);
    }

    #[test]
    fn unknown_keys_are_all_listed() {
        let err = TrainConfig::from_yaml("stage: sft\nlearning_rat: 1\nfoo: 2\n").unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnknownKeys(vec!["foo".into(), "learning_rat".into()])
        );
        assert!(err.to_string().contains("foo, learning_rat"));
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            ("learning_rate: fast", "learning_rate"),
            (
                "per_device_train_batch_size: -1",
                "per_device_train_batch_size",
            ),
            (
                "per_device_train_batch_size: 0",
                "per_device_train_batch_size",
            ),
            ("stage: dpo", "stage"),
            ("finetuning_type: qlora", "finetuning_type"),
            ("lr_scheduler_type: step", "lr_scheduler_type"),
            (
                "lr_scheduler_type: reduce_lr_on_plateau",
                "lr_scheduler_type",
            ),
            ("lr_scheduler_kwargs: 3", "lr_scheduler_kwargs"),
            ("do_train: false", "do_train"),
            ("bf16: true\nfp16: true", "bf16"),
            ("warmup_ratio: 2", "warmup_ratio"),
            ("device: gpu", "device"),
            ("device: CUDA", "device"),
            ("device: 0", "device"),
            (
                "per_device_train_batch_size: 4000000000",
                "per_device_train_batch_size",
            ),
            (
                "gradient_accumulation_steps: 2000000",
                "gradient_accumulation_steps",
            ),
            // NaN and infinities are refused by key, not read as null (the key unset).
            ("learning_rate: .inf", "learning_rate"),
            ("cutoff_len: .nan", "cutoff_len"),
            (
                "per_device_train_batch_size: .inf",
                "per_device_train_batch_size",
            ),
            (
                "lr_scheduler_kwargs: {min_lr_rate: -.inf}",
                "lr_scheduler_kwargs.min_lr_rate",
            ),
        ];
        for (text, field) in cases {
            match TrainConfig::from_yaml(text) {
                Err(ConfigError::Field { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: expected a field error, got {other:?}"),
            }
        }
    }

    #[test]
    fn non_mappings_are_refused() {
        assert!(matches!(
            TrainConfig::from_yaml(""),
            Err(ConfigError::NotAMapping(_))
        ));
        assert!(matches!(
            TrainConfig::from_yaml("- a\n- b\n"),
            Err(ConfigError::NotAMapping(_))
        ));
        assert!(matches!(
            TrainConfig::from_yaml("a: [b"),
            Err(ConfigError::Syntax(_))
        ));
    }

    #[test]
    fn device_defaults_to_auto_and_parses_each_value() {
        assert_eq!(
            TrainConfig::from_yaml("stage: sft\n")
                .unwrap()
                .device_request(),
            DeviceRequest::Auto
        );
        for (text, want) in [
            ("auto", DeviceRequest::Auto),
            ("cpu", DeviceRequest::Cpu),
            ("cuda", DeviceRequest::Cuda),
        ] {
            let cfg = TrainConfig::from_yaml(&format!("device: {text}\n")).unwrap();
            assert_eq!(cfg.device_request(), want);
            assert_eq!(want.to_string(), text);
            // It serializes back to the string users write.
            assert_eq!(serde_json::to_value(want).unwrap(), serde_json::json!(text));
        }
    }

    #[test]
    fn a_bad_device_names_the_field_and_the_allowed_values() {
        let err = TrainConfig::from_yaml("device: gpu\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`device`"), "{text}");
        assert!(text.contains("auto, cpu, cuda"), "{text}");
        assert!(text.contains("'gpu'"), "{text}");
    }

    #[test]
    fn llama_factory_keys_without_effect_are_accepted_and_listed() {
        let cfg = TrainConfig::from_yaml(
            "stage: sft\ndataloader_num_workers: 4\nflash_attn: fa2\nreport_to: none\n\
             gradient_checkpointing: true\nuse_dora: false\noptim: adamw_torch\n\
             learning_rate: 3e-6\nddp_find_unused_parameters: false\n",
        )
        .unwrap();
        assert_eq!(cfg.learning_rate, Some(3e-6));
        assert_eq!(cfg.dataloader_num_workers, Some(4));
        assert_eq!(
            cfg.no_effect,
            vec![
                "ddp_find_unused_parameters",
                "flash_attn",
                "gradient_checkpointing",
                "optim",
                "use_dora"
            ]
        );
    }

    #[test]
    fn keys_that_change_training_are_refused_unless_default() {
        for (text, field, says) in [
            ("use_dora: true", "use_dora", "set it to false"),
            (
                "neftune_noise_alpha: 5",
                "neftune_noise_alpha",
                "set it to null",
            ),
            ("optim: sgd", "optim", "adamw_torch"),
            ("quantization_bit: 4", "quantization_bit", "FSDP+QLoRA"),
            (
                "gradient_checkpointing: maybe",
                "gradient_checkpointing",
                "true or false",
            ),
            ("mix_strategy: zip", "mix_strategy", "interleave_under"),
        ] {
            match TrainConfig::from_yaml(text) {
                Err(e @ ConfigError::Field { .. }) => {
                    let ConfigError::Field { field: f, .. } = &e else {
                        unreachable!()
                    };
                    assert_eq!(f, field, "{text}");
                    assert!(e.to_string().contains(says), "{text}: {e}");
                }
                other => panic!("{text}: expected a field error, got {other:?}"),
            }
        }
        // At the default they pass.
        assert!(TrainConfig::from_yaml("use_dora: false\nneftune_noise_alpha: null\n").is_ok());
    }

    #[test]
    fn a_misspelt_key_is_still_an_error_naming_it() {
        let err = TrainConfig::from_yaml("learning_rat: 1.0e-4\nflash_attn: auto\n").unwrap_err();
        assert_eq!(err, ConfigError::UnknownKeys(vec!["learning_rat".into()]));
    }

    #[test]
    fn a_bad_scheduler_names_the_key_and_every_allowed_value() {
        let err = TrainConfig::from_yaml("lr_scheduler_type: warmup_stable_decay\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`lr_scheduler_type`"), "{err}");
        assert!(err.contains("'warmup_stable_decay'"), "{err}");
        for (name, _) in LR_SCHEDULERS {
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn scheduler_kwargs_are_read_and_checked_against_the_schedule() {
        // A mapping, or its JSON text as a command line gives it.
        for text in [
            "lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr_rate: 0.1}\n",
            "lr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: '{\"min_lr_rate\": 0.1}'\n",
        ] {
            let cfg = TrainConfig::from_yaml(text).unwrap();
            assert_eq!(
                cfg.scheduler_kwargs().unwrap(),
                vec![("min_lr_rate".to_string(), 0.1)]
            );
        }
        // A key the schedule function does not take: transformers raises, so do we.
        for (text, says) in [
            (
                "lr_scheduler_type: linear\nlr_scheduler_kwargs: {num_cycles: 2}",
                "takes none",
            ),
            (
                "lr_scheduler_type: polynomial\nlr_scheduler_kwargs: {min_lr: 1}",
                "lr_end, power",
            ),
            ("lr_scheduler_kwargs: {power: fast}", "expected a number"),
        ] {
            let err = TrainConfig::from_yaml(text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Field { field, .. } if field == "lr_scheduler_kwargs"),
                "{text}: {err}"
            );
            assert!(err.to_string().contains(says), "{text}: {err}");
        }
        // Schedules transformers passes no kwargs to ignore them, with a warning.
        let warn = check_scheduler_kwargs("inverse_sqrt", &[("timescale".into(), 5.0)]).unwrap();
        assert!(warn.unwrap().contains("timescale"));
        assert_eq!(check_scheduler_kwargs("cosine", &[]), Ok(None));
    }

    /// LLaMA-Factory's `get_train_args` checks (hparams/parser.py): sft-only switches under
    /// `stage: pt`, and `do_eval` / `predict_with_generate` (and an eval strategy, which the HF
    /// `TrainingArguments` turns into `do_eval`) without `eval_dataset` or `val_size > 1e-6`.
    #[test]
    fn llama_factory_argument_checks() {
        for (text, key, says) in [
            (
                "stage: pt\npredict_with_generate: true\neval_dataset: e\n",
                "predict_with_generate",
                "`predict_with_generate` cannot be set as True except SFT",
            ),
            (
                "stage: pt\nneat_packing: true\n",
                "neat_packing",
                "`neat_packing` cannot be set as True except SFT",
            ),
            (
                "stage: pt\ntrain_on_prompt: true\n",
                "train_on_prompt",
                "`train_on_prompt` or `mask_history` cannot be set as True except SFT",
            ),
            (
                "stage: pt\nmask_history: true\n",
                "mask_history",
                "except SFT",
            ),
            ("do_eval: true\n", "do_eval", "eval_dataset be provided"),
            (
                "predict_with_generate: true\nval_size: 0.0000001\n",
                "predict_with_generate",
                "val_size >1e-6",
            ),
            (
                "eval_strategy: steps\n",
                "eval_strategy",
                "no evaluation rows",
            ),
            (
                "eval_strategy: epoch\neval_dataset: ''\n",
                "eval_strategy",
                "1e-6",
            ),
        ] {
            let err = TrainConfig::from_yaml(text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Field { field, .. } if field == key),
                "{text}: {err}"
            );
            assert!(err.to_string().contains(says), "{text}: {err}");
        }
        for ok in [
            "stage: pt\npredict_with_generate: false\ntrain_on_prompt: false\nneat_packing: false\n",
            "stage: sft\nneat_packing: true\ntrain_on_prompt: true\n",
            "do_eval: true\nval_size: 0.1\n",
            "eval_strategy: steps\neval_dataset: e\n",
            "predict_with_generate: true\neval_dataset: e\n",
            "eval_strategy: 'no'\ndo_eval: false\n",
            // Absent predict_with_generate is false in LLaMA-Factory: no check.
            "stage: pt\neval_dataset: e\n",
        ] {
            assert!(TrainConfig::from_yaml(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn do_train_false_evaluates_only_and_needs_something_to_evaluate() {
        let ok = TrainConfig::from_yaml("do_train: false\neval_dataset: e\n").unwrap();
        assert_eq!(ok.do_train, Some(false));
        for (extra, says) in [
            ("", "needs eval_dataset"),
            (
                "eval_dataset: e\npredict_with_generate: false\n",
                "predict_with_generate",
            ),
            (
                "eval_dataset: e\ntrain_from_scratch: true\n",
                "train_from_scratch",
            ),
            ("eval_dataset: e\nval_size: 0.1\n", "val_size"),
        ] {
            let text = format!("do_train: false\n{extra}");
            let err = TrainConfig::from_yaml(&text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Field { field, .. } if field == "do_train"),
                "{text}: {err}"
            );
            assert!(err.to_string().contains(says), "{text}: {err}");
        }
    }
}
