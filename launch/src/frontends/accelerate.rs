//! `accelerate launch` (`commands/launch.py`, `utils/launch.py`, `commands/config/config_args.py`;
//! spec §3): flags, then the config file (`--config_file`, else the default one), then NNODES,
//! NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE, then accelerate's defaults. The
//! MULTI_GPU, FSDP and single-machine (or `standard`) DeepSpeed paths are torchrun's; the
//! `nossh` DeepSpeed launcher is DeepSpeed's `--no_ssh` form; the single-process launcher runs
//! one worker. TPU, SageMaker, Megatron-LM, mpirun and the ssh fan-out launchers are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::argv::{self, Opt, Parsed, Seen};
use super::{Ctx, How, Layout, Src, Val, check_layout, read_small, torchrun};
use crate::plan::{Dialect, LaunchError, LaunchPlan, Port, Program, WorkerEnv};

/// accelerate's options (each long one in its underscore and dash spelling; no abbreviations).
pub(crate) const OPTS: &[Opt] = &[
    Opt::value("config_file"),
    Opt::flag("quiet").short("-q"),
    Opt::flag("cpu"),
    Opt::flag("multi_gpu"),
    Opt::flag("tpu"),
    Opt::value("mixed_precision"),
    Opt::value("num_processes"),
    Opt::value("num_machines"),
    Opt::value("num_cpu_threads_per_process"),
    Opt::flag("enable_cpu_affinity"),
    Opt::value("dynamo_backend"),
    Opt::value("dynamo_mode"),
    Opt::flag("dynamo_use_fullgraph"),
    Opt::flag("dynamo_use_dynamic"),
    Opt::flag("dynamo_use_regional_compilation"),
    Opt::flag("use_deepspeed"),
    Opt::flag("use_fsdp"),
    Opt::flag("use_parallelism_config"),
    Opt::flag("use_megatron_lm"),
    Opt::value("gpu_ids"),
    Opt::flag("same_network"),
    Opt::value("machine_rank"),
    Opt::value("main_process_ip"),
    Opt::value("main_process_port"),
    Opt::value("tee").short("-t"),
    Opt::value("log_dir"),
    Opt::value("role"),
    Opt::value("rdzv_backend"),
    Opt::value("rdzv_conf"),
    Opt::value("max_restarts"),
    Opt::value("monitor_interval"),
    Opt::flag("module").short("-m"),
    Opt::flag("no_python"),
    Opt::flag("tpu_cluster"),
    Opt::flag("no_tpu_cluster"),
    Opt::flag("tpu_use_sudo"),
    Opt::value("vm"),
    Opt::value("env"),
    Opt::value("main_training_function"),
    Opt::flag("downcast_bf16"),
    Opt::value("deepspeed_config_file"),
    Opt::value("zero_stage"),
    Opt::value("offload_optimizer_device"),
    Opt::value("offload_param_device"),
    Opt::value("offload_optimizer_nvme_path"),
    Opt::value("offload_param_nvme_path"),
    Opt::value("gradient_accumulation_steps"),
    Opt::value("gradient_clipping"),
    Opt::value("zero3_init_flag"),
    Opt::value("zero3_save_16bit_model"),
    Opt::value("deepspeed_hostfile"),
    Opt::value("deepspeed_exclusion_filter"),
    Opt::value("deepspeed_inclusion_filter"),
    Opt::value("deepspeed_multinode_launcher"),
    Opt::value("deepspeed_moe_layer_cls_names"),
    Opt::value("fsdp_version"),
    Opt::value("fsdp_offload_params"),
    Opt::value("fsdp_min_num_params"),
    Opt::value("fsdp_sharding_strategy"),
    Opt::value("fsdp_reshard_after_forward"),
    Opt::value("fsdp_auto_wrap_policy"),
    Opt::value("fsdp_transformer_layer_cls_to_wrap"),
    Opt::value("fsdp_backward_prefetch"),
    Opt::value("fsdp_state_dict_type"),
    Opt::value("fsdp_forward_prefetch"),
    Opt::value("fsdp_use_orig_params"),
    Opt::value("fsdp_cpu_ram_efficient_loading"),
    Opt::value("fsdp_sync_module_states"),
    Opt::value("fsdp_activation_checkpointing"),
    Opt::value("megatron_lm_tp_degree"),
    Opt::value("megatron_lm_use_custom_fsdp"),
    Opt::value("megatron_lm_no_load_optim"),
    Opt::value("megatron_lm_eod_mask_loss"),
    Opt::value("megatron_lm_overlap_cpu_optimizer_d2h_h2d"),
    Opt::value("megatron_lm_no_save_optim"),
    Opt::value("megatron_lm_optimizer_cpu_offload"),
    Opt::value("megatron_lm_use_precision_aware_optimizer"),
    Opt::value("megatron_lm_decoder_last_pipeline_num_layers"),
    Opt::value("megatron_lm_pp_degree"),
    Opt::value("megatron_lm_num_micro_batches"),
    Opt::value("megatron_lm_sequence_parallelism"),
    Opt::value("megatron_lm_recompute_activations"),
    Opt::value("megatron_lm_use_distributed_optimizer"),
    Opt::value("megatron_lm_gradient_clipping"),
    Opt::value("megatron_lm_recompute_granularity"),
    Opt::value("megatron_lm_recompute_method"),
    Opt::value("megatron_lm_recompute_num_layers"),
    Opt::value("megatron_lm_attention_backend"),
    Opt::value("megatron_lm_expert_model_parallel_size"),
    Opt::value("megatron_lm_context_parallel_size"),
    Opt::value("megatron_lm_attention_dropout"),
    Opt::value("megatron_lm_hidden_dropout"),
    Opt::value("megatron_lm_attention_softmax_in_fp32"),
    Opt::value("megatron_lm_expert_tensor_parallel_size"),
    Opt::value("megatron_lm_calculate_per_token_loss"),
    Opt::value("megatron_lm_use_rotary_position_embeddings"),
    Opt::value("fp8_backend"),
    Opt::flag("fp8_use_autocast_during_eval"),
    Opt::value("fp8_margin"),
    Opt::value("fp8_interval"),
    Opt::value("fp8_format"),
    Opt::value("fp8_amax_history_len"),
    Opt::value("fp8_amax_compute_algo"),
    Opt::value("fp8_override_linear_precision"),
    Opt::value("fp8_opt_level"),
    Opt::value("fp8_enable_fsdp_float8_all_gather"),
    Opt::value("fp8_pad_inner_dim"),
    Opt::value("aws_access_key_id"),
    Opt::value("aws_secret_access_key"),
    Opt::flag("debug"),
    Opt::value("mpirun_hostfile"),
    Opt::value("parallelism_config_dp_replicate_size"),
    Opt::value("parallelism_config_dp_shard_size"),
    Opt::value("parallelism_config_tp_size"),
    Opt::value("parallelism_config_cp_size"),
    Opt::value("parallelism_config_cp_backend"),
    Opt::value("parallelism_config_cp_comm_strategy"),
    Opt::value("parallelism_config_sp_size"),
    Opt::value("parallelism_config_sp_backend"),
    Opt::value("parallelism_config_sp_seq_length"),
    Opt::value("parallelism_config_sp_seq_length_is_variable"),
    Opt::value("parallelism_config_sp_attn_implementation"),
];

/// Options parsed as `int` by accelerate (str() gives them back normalised).
const INT_OPTS: &[&str] = &[
    "num_processes",
    "num_machines",
    "num_cpu_threads_per_process",
    "machine_rank",
    "main_process_port",
    "max_restarts",
    "zero_stage",
    "gradient_accumulation_steps",
    "fsdp_min_num_params",
    "fp8_margin",
    "fp8_interval",
    "fp8_amax_history_len",
    "parallelism_config_dp_replicate_size",
    "parallelism_config_dp_shard_size",
    "parallelism_config_tp_size",
    "parallelism_config_cp_size",
    "parallelism_config_sp_size",
];

/// Options parsed as `float`.
const FLOAT_OPTS: &[&str] = &["monitor_interval", "gradient_clipping"];

/// A Python value as accelerate holds it (str() and truthiness matter for the environment).
#[derive(Debug, Clone, PartialEq)]
enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl Py {
    /// Python's `str()`.
    fn str(&self) -> String {
        match self {
            Py::None => "None".into(),
            Py::Bool(true) => "True".into(),
            Py::Bool(false) => "False".into(),
            Py::Int(i) => i.to_string(),
            Py::Float(f) if f.fract() == 0.0 && f.abs() < 1e16 => format!("{f:.1}"),
            Py::Float(f) => f.to_string(),
            Py::Str(s) => s.clone(),
        }
    }

    fn truthy(&self) -> bool {
        match self {
            Py::None => false,
            Py::Bool(b) => *b,
            Py::Int(i) => *i != 0,
            Py::Float(f) => *f != 0.0,
            Py::Str(s) => !s.is_empty(),
        }
    }

    fn from_yaml(v: &serde_yaml::Value) -> Py {
        match v {
            serde_yaml::Value::Null => Py::None,
            serde_yaml::Value::Bool(b) => Py::Bool(*b),
            serde_yaml::Value::Number(n) => match n.as_i64() {
                Some(i) => Py::Int(i),
                None => Py::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_yaml::Value::String(s) => Py::Str(s.clone()),
            other => Py::Str(serde_json::to_string(other).unwrap_or_default()),
        }
    }
}

/// Parser defaults that are not `None` (a config file never overrides these scalars).
const DEFAULTS: &[(&str, &str)] = &[
    ("dynamo_mode", "default"),
    ("tee", "0"),
    ("role", "default"),
    ("rdzv_backend", "static"),
    ("rdzv_conf", ""),
    ("fsdp_version", "1"),
    ("fsdp_offload_params", "false"),
    ("fsdp_sharding_strategy", "FULL_SHARD"),
    ("fsdp_reshard_after_forward", "true"),
    ("fsdp_forward_prefetch", "false"),
    ("fsdp_use_orig_params", "true"),
    ("fsdp_cpu_ram_efficient_loading", "true"),
    ("fsdp_sync_module_states", "true"),
    ("fsdp_activation_checkpointing", "false"),
    ("fp8_format", "HYBRID"),
    ("fp8_amax_compute_algo", "most_recent"),
    ("fp8_opt_level", "O2"),
    ("parallelism_config_cp_backend", "torch"),
    ("parallelism_config_cp_comm_strategy", "allgather"),
    ("parallelism_config_sp_backend", "deepspeed"),
    ("parallelism_config_sp_attn_implementation", "sdpa"),
];

const FALSE_DEFAULTS: &[&str] = &[
    "cpu",
    "multi_gpu",
    "tpu",
    "enable_cpu_affinity",
    "dynamo_use_fullgraph",
    "dynamo_use_dynamic",
    "dynamo_use_regional_compilation",
    "use_deepspeed",
    "use_fsdp",
    "use_parallelism_config",
    "use_megatron_lm",
    "same_network",
    "fp8_use_autocast_during_eval",
];

const INT_DEFAULTS: &[(&str, i64)] = &[
    ("max_restarts", 0),
    ("fsdp_min_num_params", 100_000_000),
    ("fp8_margin", 0),
    ("fp8_interval", 1),
    ("fp8_amax_history_len", 1024),
    // str_to_bool("true") through argparse's type conversion of string defaults.
    ("fp8_enable_fsdp_float8_all_gather", 1),
    ("fp8_pad_inner_dim", 1),
    ("parallelism_config_dp_replicate_size", 1),
    ("parallelism_config_dp_shard_size", 1),
    ("parallelism_config_tp_size", 1),
    ("parallelism_config_cp_size", 1),
    ("parallelism_config_sp_size", 1),
];

/// accelerate's argument namespace: set values only (absent = `None`).
struct Args {
    map: BTreeMap<String, (Py, Src)>,
    typed: BTreeSet<String>,
}

impl Args {
    fn get(&self, key: &str) -> Option<&Py> {
        self.map
            .get(key)
            .map(|(v, _)| v)
            .filter(|v| **v != Py::None)
    }

    fn is(&self, key: &str) -> bool {
        self.get(key).is_some_and(Py::truthy)
    }

    fn str(&self, key: &str) -> Option<String> {
        self.get(key).map(Py::str)
    }

    fn set(&mut self, key: &str, v: Py, src: Src) {
        self.map.insert(key.to_string(), (v, src));
    }

    /// The value with its source, for messages and numbers.
    fn val(&self, key: &str) -> Option<Val> {
        let (v, src) = self.map.get(key)?;
        (*v != Py::None).then(|| Val {
            v: v.str(),
            src: src.clone(),
        })
    }

    fn int(&self, key: &str) -> Result<Option<i64>, LaunchError> {
        match self.val(key) {
            Some(v) => Ok(Some(v.num("expected an integer")?)),
            None => Ok(None),
        }
    }
}

/// Reads typed options into the namespace, with accelerate's type conversions.
fn typed_args(p: &Parsed) -> Result<Args, LaunchError> {
    let mut args = Args {
        map: BTreeMap::new(),
        typed: BTreeSet::new(),
    };
    for Seen {
        key,
        spelled,
        value,
    } in &p.opts
    {
        let src = Src::Flag(spelled.clone());
        let v = match value {
            None => Py::Bool(true),
            Some(s) if INT_OPTS.contains(key) => Py::Int(s.trim().parse().map_err(|_| {
                LaunchError(format!("argument {spelled}: invalid int value: '{s}'"))
            })?),
            Some(s) if FLOAT_OPTS.contains(key) => Py::Float(s.trim().parse().map_err(|_| {
                LaunchError(format!("argument {spelled}: invalid float value: '{s}'"))
            })?),
            Some(s)
                if *key == "fp8_enable_fsdp_float8_all_gather" || *key == "fp8_pad_inner_dim" =>
            {
                Py::Int(str_to_bool(s, spelled)?)
            }
            Some(s) => Py::Str(s.clone()),
        };
        args.set(key, v, src);
        args.typed.insert(key.to_string());
    }
    for (key, v) in DEFAULTS {
        if !args.map.contains_key(*key) {
            args.set(
                key,
                Py::Str(v.to_string()),
                Src::Default(format!("--{key}")),
            );
        }
    }
    for key in FALSE_DEFAULTS {
        if !args.map.contains_key(*key) {
            args.set(key, Py::Bool(false), Src::Default(format!("--{key}")));
        }
    }
    for (key, v) in INT_DEFAULTS {
        if !args.map.contains_key(*key) {
            args.set(key, Py::Int(*v), Src::Default(format!("--{key}")));
        }
    }
    if !args.map.contains_key("monitor_interval") {
        args.set(
            "monitor_interval",
            Py::Float(0.1),
            Src::Default("--monitor_interval".into()),
        );
    }
    Ok(args)
}

/// accelerate's `str_to_bool`: 1 for y/yes/t/true/on/1, 0 for n/no/f/false/off/0.
fn str_to_bool(s: &str, flag: &str) -> Result<i64, LaunchError> {
    match s.to_ascii_lowercase().as_str() {
        "y" | "yes" | "t" | "true" | "on" | "1" => Ok(1),
        "n" | "no" | "f" | "false" | "off" | "0" => Ok(0),
        _ => Err(LaunchError(format!(
            "argument {flag}: invalid truth value '{s}'"
        ))),
    }
}

/// ClusterConfig's fields (config_args.py): a config file may hold these keys only.
const CLUSTER_KEYS: &[&str] = &[
    "compute_environment",
    "distributed_type",
    "mixed_precision",
    "use_cpu",
    "debug",
    "num_processes",
    "machine_rank",
    "num_machines",
    "gpu_ids",
    "main_process_ip",
    "main_process_port",
    "rdzv_backend",
    "same_network",
    "main_training_function",
    "enable_cpu_affinity",
    "fp8_config",
    "deepspeed_config",
    "fsdp_config",
    "parallelism_config",
    "megatron_lm_config",
    "mpirun_config",
    "downcast_bf16",
    "tpu_name",
    "tpu_zone",
    "tpu_use_cluster",
    "tpu_use_sudo",
    "command_file",
    "commands",
    "tpu_vm",
    "tpu_env",
    "dynamo_config",
];

/// The dict-valued keys, and the prefix their entries get as arguments.
const DICT_KEYS: &[(&str, &str)] = &[
    ("fp8_config", "fp8_"),
    ("deepspeed_config", ""),
    ("fsdp_config", "fsdp_"),
    ("parallelism_config", ""),
    ("megatron_lm_config", ""),
    ("mpirun_config", ""),
    ("dynamo_config", "dynamo_"),
];

const DISTRIBUTED_TYPES: &[&str] = &[
    "NO",
    "MULTI_CPU",
    "MULTI_GPU",
    "MULTI_NPU",
    "MULTI_MLU",
    "MULTI_SDAA",
    "MULTI_MUSA",
    "MULTI_XPU",
    "DEEPSPEED",
    "FSDP",
    "XLA",
    "MEGATRON_LM",
    "MULTI_HPU",
    "MULTI_NEURON",
];

/// A loaded accelerate config (ClusterConfig, LOCAL_MACHINE).
struct Config {
    path: String,
    distributed_type: String,
    mixed_precision: Option<String>,
    /// The scalar keys the file holds (after accelerate's `process_config`).
    scalars: BTreeMap<String, Py>,
    /// Each dict key's entries, in file order.
    dicts: BTreeMap<String, Vec<(String, Py)>>,
}

impl Config {
    fn src(&self, key: &str) -> Src {
        Src::File {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }
}

/// The default config path: `$HF_HOME/accelerate/default_config.yaml`, `HF_HOME` defaulting to
/// `$XDG_CACHE_HOME/huggingface`, that to `~/.cache/huggingface`.
fn default_config_path(ctx: &Ctx) -> Option<PathBuf> {
    let home = ctx.env.get("HOME");
    let expand = |p: String| -> Option<PathBuf> {
        match p.strip_prefix('~') {
            Some(rest) => home.as_ref().map(|h| PathBuf::from(format!("{h}{rest}"))),
            None => Some(PathBuf::from(p)),
        }
    };
    let hf_home = match ctx.env.get("HF_HOME") {
        Some(h) => expand(h)?,
        None => {
            let cache = ctx
                .env
                .get("XDG_CACHE_HOME")
                .unwrap_or_else(|| "~/.cache".to_string());
            expand(cache)?.join("huggingface")
        }
    };
    Some(hf_home.join("accelerate").join("default_config.yaml"))
}

fn load_config(path: &Path, explicit: bool) -> Result<Config, LaunchError> {
    let shown = path.display().to_string();
    let missing = || {
        LaunchError(format!(
            "The passed configuration file `{shown}` does not exist. Please pass an existing file \
             to `accelerate launch`, or use the default one created through `accelerate config` \
             and run `accelerate launch` without the `--config_file` argument."
        ))
    };
    if explicit && !path.is_file() {
        return Err(missing());
    }
    let text = read_small(path, "accelerate config")?.ok_or_else(missing)?;
    let value: serde_yaml::Value = if shown.ends_with(".json") {
        serde_json::from_str(&text)
            .map_err(|e| LaunchError(format!("{shown}: not valid JSON: {e}")))?
    } else {
        serde_yaml::from_str(&text)
            .map_err(|e| LaunchError(format!("{shown}: not valid YAML: {e}")))?
    };
    let serde_yaml::Value::Mapping(map) = value else {
        return Err(LaunchError(format!(
            "{shown}: expected a mapping of accelerate settings (key: value lines)"
        )));
    };
    let mut entries: BTreeMap<String, serde_yaml::Value> = BTreeMap::new();
    for (k, v) in map {
        let serde_yaml::Value::String(k) = k else {
            return Err(LaunchError(format!(
                "{shown}: every key must be a string (found {})",
                serde_json::to_string(&k).unwrap_or_default()
            )));
        };
        entries.insert(k, v);
    }
    // `path:line` of a top-level key, for messages.
    let at = |key: &str| -> String {
        let line = text.lines().position(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(&format!("\"{key}\""))
                .or_else(|| l.strip_prefix(key));
            rest.is_some_and(|r| r.trim_start().starts_with(':'))
        });
        match line {
            Some(i) => format!("{shown}:{}", i + 1),
            None => shown.clone(),
        }
    };
    // process_config
    let env_kind = entries
        .get("compute_environment")
        .map(Py::from_yaml)
        .map_or("LOCAL_MACHINE".to_string(), |v| v.str());
    if env_kind != "LOCAL_MACHINE" {
        return Err(LaunchError(format!(
            "{}: compute_environment: {env_kind} is not supported by ringctl launch (it \
             starts workers on this machine; SageMaker jobs are launched by accelerate itself)",
            at("compute_environment")
        )));
    }
    let Some(dt) = entries.get("distributed_type").map(Py::from_yaml) else {
        return Err(LaunchError(format!(
            "A `distributed_type` must be specified in the config file. ({shown})"
        )));
    };
    let distributed_type = dt.str();
    if !DISTRIBUTED_TYPES.contains(&distributed_type.as_str()) {
        return Err(LaunchError(format!(
            "{}: distributed_type: '{distributed_type}' is not a valid DistributedType",
            at("distributed_type")
        )));
    }
    if distributed_type == "NO" && !entries.contains_key("num_processes") {
        entries.insert("num_processes".into(), serde_yaml::Value::from(1));
    }
    let mixed_precision = match entries.get("mixed_precision").map(Py::from_yaml) {
        Some(Py::Bool(false)) => Some("no".to_string()),
        Some(Py::None) => None,
        Some(v) => Some(v.str()),
        None => entries
            .get("fp16")
            .map(Py::from_yaml)
            .filter(Py::truthy)
            .map(|_| "fp16".to_string()),
    };
    entries.remove("fp16");
    if let Some(backend) = entries.remove("dynamo_backend") {
        let backend = Py::from_yaml(&backend).str();
        let mut m = serde_yaml::Mapping::new();
        if backend != "NO" {
            m.insert("dynamo_backend".into(), backend.into());
        }
        entries.insert("dynamo_config".into(), serde_yaml::Value::Mapping(m));
    }
    let first_unknown = entries
        .keys()
        .find(|k| !CLUSTER_KEYS.contains(&k.as_str()))
        .map(|k| at(k));
    let unknown: Vec<String> = entries
        .keys()
        .filter(|k| !CLUSTER_KEYS.contains(&k.as_str()))
        .map(|k| format!("'{k}'"))
        .collect();
    if !unknown.is_empty() {
        return Err(LaunchError(format!(
            "The config file at {shown} had unknown keys ([{}]), please try upgrading your \
             `accelerate` version or fix (and potentially remove) these keys from your config \
             file. ({})",
            unknown.join(", "),
            first_unknown.unwrap_or_default()
        )));
    }
    let mut scalars = BTreeMap::new();
    let mut dicts = BTreeMap::new();
    for (k, v) in &entries {
        if let Some((_, prefix)) = DICT_KEYS.iter().find(|(d, _)| d == k) {
            let items = match v {
                serde_yaml::Value::Null => Vec::new(),
                serde_yaml::Value::Mapping(m) => {
                    let mut items = Vec::new();
                    for (ik, iv) in m {
                        let Some(ik) = ik.as_str() else {
                            return Err(LaunchError(format!(
                                "{}: {k}: every key must be a string",
                                at(k)
                            )));
                        };
                        let key =
                            if prefix.is_empty() || ik.starts_with(prefix.trim_end_matches('_')) {
                                ik.to_string()
                            } else {
                                format!("{prefix}{ik}")
                            };
                        items.push((key, Py::from_yaml(iv)));
                    }
                    items
                }
                _ => {
                    return Err(LaunchError(format!(
                        "{}: {k}: expected a mapping of settings",
                        at(k)
                    )));
                }
            };
            dicts.insert(k.clone(), items);
        } else if !matches!(k.as_str(), "commands" | "tpu_vm" | "tpu_env") {
            if matches!(
                v,
                serde_yaml::Value::Mapping(_) | serde_yaml::Value::Sequence(_)
            ) {
                return Err(LaunchError(format!(
                    "{}: {k}: expected a single value",
                    at(k)
                )));
            }
            scalars.insert(k.clone(), Py::from_yaml(v));
        }
    }
    for key in ["use_cpu", "debug", "enable_cpu_affinity"] {
        scalars.entry(key.to_string()).or_insert(Py::Bool(false));
    }
    Ok(Config {
        path: shown,
        distributed_type,
        mixed_precision,
        scalars,
        dicts,
    })
}

fn others() -> [(&'static str, &'static [Opt]); 2] {
    [
        ("torchrun", torchrun::OPTS),
        ("DeepSpeed", super::deepspeed::OPTS),
    ]
}

/// ClusterConfig defaults for the scalars launch reads.
fn dataclass_default(key: &str) -> Py {
    match key {
        "num_processes" => Py::Int(-1),
        "machine_rank" => Py::Int(0),
        "num_machines" => Py::Int(1),
        _ => Py::None,
    }
}

/// The layout variables standing in for accelerate's options (spec §5.5 item 1).
const LF_ENV: &[(&str, &str)] = &[
    ("num_machines", "NNODES"),
    ("machine_rank", "NODE_RANK"),
    ("main_process_ip", "MASTER_ADDR"),
    ("main_process_port", "MASTER_PORT"),
];

/// Fills `key` from NNODES & co. when it is still unset; returns whether it did.
fn fill_from_env(a: &mut Args, ctx: &Ctx, key: &str) -> Result<bool, LaunchError> {
    if a.get(key).is_some() {
        return Ok(false);
    }
    let Some((_, var)) = LF_ENV.iter().find(|(k, _)| *k == key) else {
        return Ok(false);
    };
    let Some(v) = ctx.env.val(var) else {
        return Ok(false);
    };
    let py = if key == "main_process_ip" {
        Py::Str(v.v.clone())
    } else {
        Py::Int(v.num("expected an integer")?)
    };
    a.set(key, py, v.src);
    Ok(true)
}

/// NPROC_PER_NODE × machines for `num_processes` (accelerate counts all machines).
fn nproc_from_env(a: &mut Args, ctx: &Ctx) -> Result<bool, LaunchError> {
    let Some(v) = ctx.env.val("NPROC_PER_NODE") else {
        return Ok(false);
    };
    let per: i64 = v.num("expected a number of workers")?;
    let machines = a.int("num_machines")?.unwrap_or(1).max(1);
    a.set("num_processes", Py::Int(per * machines), v.src);
    Ok(true)
}

/// `accelerate launch [options] script args...`.
pub(crate) fn plan(args: &[String], ctx: &Ctx) -> Result<LaunchPlan, LaunchError> {
    let p = argv::parse(args, OPTS, false, "accelerate", &others(), ctx.named)?;
    let mut a = typed_args(&p)?;
    let mut notices = Vec::new();

    // _validate_launch_command's sanity checks.
    let paradigms = ["multi_gpu", "cpu", "tpu", "use_deepspeed", "use_fsdp"];
    if paradigms.iter().filter(|k| a.is(k)).count() > 1 {
        return Err(LaunchError::new(
            "You can only use one of `--cpu`, `--multi_gpu`, `--tpu`, `--use_deepspeed`, \
             `--use_fsdp` at a time.",
        ));
    }
    if a.is("multi_gpu") && a.int("num_processes")?.is_some_and(|n| n < 2) {
        return Err(LaunchError::new(
            "You need to use at least 2 processes to use `--multi_gpu`.",
        ));
    }
    if a.is("use_parallelism_config") && !a.is("use_fsdp") {
        return Err(LaunchError::new(
            "You cannot use `--use_parallelism_config` without `--use_fsdp` and \
             `--fsdp_version=2`.",
        ));
    }

    // The config file.
    let config = match a.str("config_file") {
        Some(path) => Some(load_config(Path::new(&path), true)?),
        None if !a.is("cpu") => match default_config_path(ctx) {
            Some(path) if path.is_file() => Some(load_config(&path, false)?),
            _ => None,
        },
        None => None,
    };
    let mut mp_from_config = false;
    let gpus = ctx.gpu_count();
    if let Some(cfg) = &config {
        notices.push(format!("accelerate config: {}", cfg.path));
        let dt = cfg.distributed_type.as_str();
        let no_paradigm = ![
            "multi_gpu",
            "tpu",
            "use_deepspeed",
            "use_fsdp",
            "use_megatron_lm",
        ]
        .iter()
        .any(|k| a.is(k));
        if no_paradigm {
            let src = cfg.src("distributed_type");
            a.set("use_deepspeed", Py::Bool(dt == "DEEPSPEED"), src.clone());
            let multi = dt.starts_with("MULTI_") && dt != "MULTI_CPU";
            a.set("multi_gpu", Py::Bool(multi), src.clone());
            a.set("tpu", Py::Bool(dt == "XLA"), src.clone());
            a.set("use_fsdp", Py::Bool(dt == "FSDP"), src.clone());
            a.set(
                "use_megatron_lm",
                Py::Bool(dt == "MEGATRON_LM"),
                src.clone(),
            );
            let has_pc = cfg
                .dicts
                .get("parallelism_config")
                .is_some_and(|d| !d.is_empty());
            a.set("use_parallelism_config", Py::Bool(has_pc), src);
        }
        if a.get("gpu_ids").is_none() {
            match cfg.scalars.get("gpu_ids").filter(|v| **v != Py::None) {
                Some(v) => a.set("gpu_ids", Py::Str(v.str()), cfg.src("gpu_ids")),
                None => a.set(
                    "gpu_ids",
                    Py::Str("all".into()),
                    Src::Default("--gpu_ids".into()),
                ),
            }
        }
        // Scalars the command line left unset: the file, else NNODES & co., else the
        // dataclass default; dict entries unless typed.
        for (key, items) in &cfg.dicts {
            for (k, v) in items {
                if !a.typed.contains(k) {
                    a.set(k, v.clone(), cfg.src(&format!("{key}.{k}")));
                }
            }
        }
        for key in [
            "num_machines",
            "machine_rank",
            "main_process_ip",
            "main_process_port",
            "use_cpu",
            "main_training_function",
            "downcast_bf16",
            "num_processes",
        ] {
            if a.get(key).is_some() {
                continue;
            }
            if let Some(v) = cfg.scalars.get(key).filter(|v| **v != Py::None) {
                a.set(key, v.clone(), cfg.src(key));
            } else if key == "num_processes" {
                if !nproc_from_env(&mut a, ctx)? {
                    a.set(key, dataclass_default(key), cfg.src(key));
                }
            } else if !fill_from_env(&mut a, ctx, key)? {
                a.set(key, dataclass_default(key), cfg.src(key));
            }
        }
        if !a.is("debug") && cfg.scalars.get("debug").is_some_and(Py::truthy) {
            a.set("debug", Py::Bool(true), cfg.src("debug"));
        }
        let gpu_ids = a.str("gpu_ids").unwrap_or_else(|| "all".into());
        if gpu_ids != "all"
            && gpu_ids.split(',').count() < 2
            && a.is("multi_gpu")
            && a.int("num_machines")?.unwrap_or(1) <= 1
        {
            return Err(LaunchError::new(
                "Less than two GPU ids were configured and tried to run on multiple GPUs. \
                 Please ensure at least two are specified for `--gpu_ids`, or use \
                 `--gpu_ids='all'`.",
            ));
        }
        if a.get("mixed_precision").is_none() {
            match &cfg.mixed_precision {
                Some(mp) => {
                    a.set(
                        "mixed_precision",
                        Py::Str(mp.clone()),
                        cfg.src("mixed_precision"),
                    );
                    mp_from_config = true;
                }
                None => a.set(
                    "mixed_precision",
                    Py::Str("no".into()),
                    Src::Default("--mixed_precision".into()),
                ),
            }
        }
        if a.int("num_processes")? == Some(-1) {
            return Err(LaunchError(format!(
                "You need to manually pass in `--num_processes` using this config yaml. ({})",
                cfg.path
            )));
        }
        for key in ["main_training_function", "same_network", "rdzv_backend"] {
            if let Some(v) = cfg.scalars.get(key) {
                notices.push(format!(
                    "{key}: {} in {} has no effect (as in accelerate launch)",
                    v.str(),
                    cfg.path
                ));
            }
        }
    } else {
        for (key, _) in LF_ENV {
            fill_from_env(&mut a, ctx, key)?;
        }
        if a.get("num_processes").is_none() && !nproc_from_env(&mut a, ctx)? {
            a.set(
                "num_processes",
                Py::Int(i64::try_from(gpus).unwrap_or(i64::MAX)),
                Src::Default("--num_processes (the device count)".into()),
            );
        }
        if !a.is("multi_gpu") && a.int("num_processes")?.unwrap_or(0) > 1 && gpus > 1 {
            notices.push(
                "More than one GPU was found, enabling multi-GPU training. If this was \
                 unintended please pass in `--num_processes=1`."
                    .to_string(),
            );
            a.set(
                "multi_gpu",
                Py::Bool(true),
                Src::Default("--multi_gpu".into()),
            );
        }
        if a.get("num_machines").is_none() {
            a.set(
                "num_machines",
                Py::Int(1),
                Src::Default("--num_machines".into()),
            );
        }
        if a.get("mixed_precision").is_none() {
            a.set(
                "mixed_precision",
                Py::Str("no".into()),
                Src::Default("--mixed_precision".into()),
            );
        }
        let cpu = a.is("cpu");
        a.set("use_cpu", Py::Bool(cpu), Src::Default("--cpu".into()));
    }
    if a.get("dynamo_backend").is_none() {
        a.set(
            "dynamo_backend",
            Py::Str("no".into()),
            Src::Default("--dynamo_backend".into()),
        );
    }
    if a.get("num_cpu_threads_per_process").is_none() {
        let omp = ctx
            .env
            .get("OMP_NUM_THREADS")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(1);
        a.set(
            "num_cpu_threads_per_process",
            Py::Int(omp),
            Src::Default("--num_cpu_threads_per_process".into()),
        );
    }
    if a.is("same_network") {
        notices.push(
            "--same_network has no effect: every machine meets at main_process_ip:port".into(),
        );
    }

    // The program.
    let how = How::from_flags(
        a.is("module"),
        a.is("no_python"),
        "--module and --no_python cannot be used together",
    )?;
    let program = ctx.program(&p, how)?;

    let machines = a.int("num_machines")?.unwrap_or(1);
    if machines < 1 {
        return Err(LaunchError(format!(
            "{}: must be >= 1",
            a.val("num_machines").map_or_else(String::new, |v| v.show())
        )));
    }
    if machines > 1 && a.get("main_process_ip").is_none() {
        return Err(LaunchError::new(
            "When using multiple machines, you need to specify the main process IP.",
        ));
    }
    let cpu = a.is("cpu");
    let mut plan = if a.is("use_deepspeed") && !cpu {
        deepspeed_path(
            &mut a,
            &p,
            ctx,
            program,
            mp_from_config,
            config.as_ref(),
            &mut notices,
        )?
    } else if a.is("use_fsdp") && !cpu {
        let mut plan = torchrun_path(&a, program, &mut notices)?;
        plan.extra_env = multi_gpu_env(&a)?;
        plan
    } else if a.is("use_megatron_lm") && !cpu {
        return Err(LaunchError::new(
            "Megatron-LM (--use_megatron_lm, distributed_type MEGATRON_LM) is not supported by \
             ringctl launch",
        ));
    } else if a.is("multi_gpu") && !cpu {
        let mut plan = torchrun_path(&a, program, &mut notices)?;
        plan.extra_env = multi_gpu_env(&a)?;
        plan
    } else if a.is("tpu") && !cpu {
        return Err(LaunchError::new(
            "TPU training (--tpu, distributed_type XLA) is not supported by ringctl launch",
        ));
    } else {
        simple_path(&a, program, &mut notices)?
    };
    // NNODES & co. where they stood in for accelerate's values (the machine's rank and the
    // main process's address count on several machines only).
    let keys: &[&str] = if machines > 1 {
        &[
            "num_processes",
            "num_machines",
            "machine_rank",
            "main_process_ip",
            "main_process_port",
        ]
    } else {
        &["num_processes", "main_process_port"]
    };
    let used: Vec<Option<Val>> = keys.iter().map(|k| a.val(k)).collect();
    ctx.note_layout_env(
        "accelerate launch",
        None,
        used.iter().map(Option::as_ref),
        &mut notices,
    );
    plan.notices.splice(0..0, notices);
    Ok(plan)
}

/// `prepare_multi_gpu_env`'s layout: torchrun with accelerate's values.
fn torchrun_path(
    a: &Args,
    program: Program,
    notices: &mut Vec<String>,
) -> Result<LaunchPlan, LaunchError> {
    let np = a.int("num_processes")?.unwrap_or(1);
    let nm = a.int("num_machines")?.unwrap_or(1);
    let np_val = a
        .val("num_processes")
        .unwrap_or_else(|| Val::default("--num_processes", "1"));
    let nm_val = a
        .val("num_machines")
        .unwrap_or_else(|| Val::default("--num_machines", "1"));
    // accelerate's 29500 when no port is given, unless that port is taken on a single machine:
    // then torchrun's `--standalone` (a free port). A launcher's store holds the port for the
    // whole run, so on one machine a free port is always taken: a second single-machine
    // `accelerate launch` on the same machine does not collide with the first.
    let port = match a.val("main_process_port") {
        Some(v) => v.port()?,
        None if nm <= 1 => Port::Ephemeral,
        None => Port::Fixed(29500),
    };
    let (nproc, nnodes, node_rank) = if nm > 1 {
        if np % nm != 0 {
            return Err(LaunchError(format!(
                "{} is not divisible by {} (accelerate would silently start {} per machine)",
                np_val.show(),
                nm_val.show(),
                np / nm
            )));
        }
        let rank = a.int("machine_rank")?.unwrap_or(0);
        (np / nm, nm, rank)
    } else {
        (np, 1, 0)
    };
    let to_usize = |n: i64, v: &Val| {
        usize::try_from(n).map_err(|_| LaunchError(format!("{}: must be >= 0", v.show())))
    };
    let rank_val = a
        .val("machine_rank")
        .unwrap_or_else(|| Val::default("--machine_rank", "0"));
    let mut plan = LaunchPlan::new(Dialect::Accelerate, to_usize(nproc, &np_val)?, program);
    plan.nnodes = to_usize(nnodes, &nm_val)?;
    plan.node_rank = to_usize(node_rank, &rank_val)?;
    plan.master_port = port;
    if nm > 1
        && let Some(ip) = a.str("main_process_ip")
    {
        plan.master_addr = super::unbracket(&ip);
    }
    match a.str("rdzv_backend").as_deref() {
        None | Some("static") => {}
        Some("c10d") if nm > 1 => notices.push(format!(
            "--rdzv_backend c10d: node ranks come from {} (accelerate passes its machine rank \
             to torchrun)",
            rank_val.show()
        )),
        Some("c10d") => {}
        Some(other) => {
            return Err(LaunchError(format!(
                "rendezvous backend '{other}' is not supported (use static or c10d)"
            )));
        }
    }
    if let Some(ids) = a.str("gpu_ids").filter(|g| g != "all") {
        let list: Vec<String> = ids
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if list.len() < plan.nproc {
            return Err(LaunchError(format!(
                "{} workers per node but only {} device{} in --gpu_ids ({})",
                plan.nproc,
                list.len(),
                if list.len() == 1 { "" } else { "s" },
                a.val("gpu_ids").map_or(ids.clone(), |v| v.show())
            )));
        }
        plan.visible_devices = Some(list);
    }
    plan.max_restarts = torchrun::max_restarts(a.val("max_restarts").as_ref())?;
    if let Some(v) = a.val("monitor_interval") {
        plan.monitor_interval = torchrun::monitor_interval(&v)?;
    }
    if let Some(v) = a.val("role") {
        plan.role = v.v;
    }
    let mut conf_notes = Vec::new();
    if let Some(v) = a.val("rdzv_conf")
        && let Some(t) = torchrun::rdzv_conf(&v, &mut conf_notes)?
    {
        plan.rdzv_timeout = t;
    }
    notices.extend(conf_notes);
    plan.logs = torchrun::logs(a.val("log_dir"), None, a.val("tee"), None, plan.nproc)?;
    check_layout(
        &mut plan,
        &Layout {
            nnodes: nm_val,
            node_rank: rank_val,
            master_given: true,
            master_hint: "--main_process_ip (or MASTER_ADDR)",
        },
    )?;
    Ok(plan)
}

/// Variables for every worker, in the order accelerate sets them.
#[derive(Default)]
struct EnvOut(Vec<(String, String)>);

impl EnvOut {
    fn put(&mut self, k: &str, v: impl Into<String>) {
        self.0.push((k.to_string(), v.into()));
    }
}

/// `prepare_multi_gpu_env`'s variables (MULTI_GPU and FSDP).
fn multi_gpu_env(a: &Args) -> Result<Vec<(String, String)>, LaunchError> {
    let mut env = EnvOut::default();
    if a.is("debug") {
        env.put("ACCELERATE_DEBUG_MODE", "true");
    }
    env.put("ACCELERATE_MIXED_PRECISION", mixed_precision(a)?);
    fp8_env(a, &mut env)?;
    dynamo_env(a, &mut env)?;
    if a.is("use_fsdp") {
        env.put("ACCELERATE_USE_FSDP", "true");
        if a.is("fsdp_cpu_ram_efficient_loading") && !a.is("fsdp_sync_module_states") {
            return Err(LaunchError::new(
                "When using `--fsdp_cpu_ram_efficient_loading` set `--fsdp_sync_module_states` \
                 to `True`",
            ));
        }
        let s = |k: &str| a.get(k).map_or_else(|| "None".into(), Py::str);
        env.put("FSDP_VERSION", s("fsdp_version"));
        env.put("FSDP_SHARDING_STRATEGY", s("fsdp_sharding_strategy"));
        env.put(
            "FSDP_RESHARD_AFTER_FORWARD",
            s("fsdp_reshard_after_forward").to_lowercase(),
        );
        env.put(
            "FSDP_OFFLOAD_PARAMS",
            s("fsdp_offload_params").to_lowercase(),
        );
        env.put("FSDP_MIN_NUM_PARAMS", s("fsdp_min_num_params"));
        for (arg, var) in [
            ("fsdp_auto_wrap_policy", "FSDP_AUTO_WRAP_POLICY"),
            (
                "fsdp_transformer_layer_cls_to_wrap",
                "FSDP_TRANSFORMER_CLS_TO_WRAP",
            ),
            ("fsdp_backward_prefetch", "FSDP_BACKWARD_PREFETCH"),
            ("fsdp_state_dict_type", "FSDP_STATE_DICT_TYPE"),
        ] {
            if let Some(v) = a.get(arg) {
                env.put(var, v.str());
            }
        }
        for (arg, var) in [
            ("fsdp_forward_prefetch", "FSDP_FORWARD_PREFETCH"),
            ("fsdp_use_orig_params", "FSDP_USE_ORIG_PARAMS"),
            (
                "fsdp_cpu_ram_efficient_loading",
                "FSDP_CPU_RAM_EFFICIENT_LOADING",
            ),
            ("fsdp_sync_module_states", "FSDP_SYNC_MODULE_STATES"),
            (
                "fsdp_activation_checkpointing",
                "FSDP_ACTIVATION_CHECKPOINTING",
            ),
        ] {
            env.put(var, s(arg).to_lowercase());
        }
        if let Some(v) = a.get("fsdp_ignored_modules") {
            env.put("FSDP_IGNORED_MODULES", v.str());
        }
    }
    cpu_threads_env(a, &mut env);
    if a.is("use_parallelism_config") {
        parallelism_env(a, &mut env);
    }
    Ok(env.0)
}

/// `ACCELERATE_MIXED_PRECISION`: no, fp8, fp16 or bf16.
fn mixed_precision(a: &Args) -> Result<String, LaunchError> {
    let mp = a
        .str("mixed_precision")
        .unwrap_or_else(|| "no".into())
        .to_lowercase();
    if !["no", "fp8", "fp16", "bf16"].contains(&mp.as_str()) {
        return Err(LaunchError(format!(
            "Unknown mixed_precision mode: {mp}. Choose between ['no', 'fp8', 'fp16', 'bf16']."
        )));
    }
    Ok(mp)
}

/// `setup_fp8_env`: every fp8 option as `ACCELERATE_FP8_*` when the precision is fp8.
/// OMP_NUM_THREADS and ACCELERATE_CPU_AFFINITY, on every path that starts workers.
fn cpu_threads_env(a: &Args, env: &mut EnvOut) {
    env.put(
        "OMP_NUM_THREADS",
        a.str("num_cpu_threads_per_process")
            .unwrap_or_else(|| "1".into()),
    );
    if a.is("enable_cpu_affinity") {
        env.put("ACCELERATE_CPU_AFFINITY", "1");
    }
}

fn fp8_env(a: &Args, env: &mut EnvOut) -> Result<(), LaunchError> {
    if mixed_precision(a)? != "fp8" {
        return Ok(());
    }
    for (key, (v, _)) in &a.map {
        if !key.starts_with("fp8_") || *v == Py::None {
            continue;
        }
        if key == "fp8_override_linear_precision" {
            let parts: Vec<String> = match v {
                Py::Str(s) => s
                    .split(',')
                    .map(|x| {
                        str_to_bool(x.trim(), "--fp8_override_linear_precision")
                            .map(|b| b.to_string())
                    })
                    .collect::<Result<_, _>>()?,
                other => vec![other.str(); 3],
            };
            for (i, name) in ["FPROP", "DGRAD", "WGRAD"].iter().enumerate() {
                if let Some(p) = parts.get(i) {
                    env.put(&format!("ACCELERATE_FP8_OVERRIDE_{name}"), p.clone());
                }
            }
        } else {
            env.put(&format!("ACCELERATE_{}", key.to_ascii_uppercase()), v.str());
        }
    }
    if !a.map.contains_key("fp8_override_linear_precision") {
        for name in ["FPROP", "DGRAD", "WGRAD"] {
            env.put(&format!("ACCELERATE_FP8_OVERRIDE_{name}"), "False");
        }
    }
    Ok(())
}

const DYNAMO_BACKENDS: &[&str] = &[
    "NO",
    "EAGER",
    "AOT_EAGER",
    "INDUCTOR",
    "AOT_TS_NVFUSER",
    "NVPRIMS_NVFUSER",
    "CUDAGRAPHS",
    "OFI",
    "FX2TRT",
    "ONNXRT",
    "TENSORRT",
    "AOT_TORCHXLA_TRACE_ONCE",
    "TORCHXLA_TRACE_ONCE",
    "TVM",
    "HPU_BACKEND",
    "NEURON",
];

/// `ACCELERATE_DYNAMO_*`.
fn dynamo_env(a: &Args, env: &mut EnvOut) -> Result<(), LaunchError> {
    let backend = a
        .str("dynamo_backend")
        .unwrap_or_else(|| "no".into())
        .to_uppercase();
    if !DYNAMO_BACKENDS.contains(&backend.as_str()) {
        return Err(LaunchError(format!(
            "Unknown dynamo backend: {backend}. Choose between {}.",
            DYNAMO_BACKENDS.join(", ")
        )));
    }
    env.put("ACCELERATE_DYNAMO_BACKEND", backend);
    env.put(
        "ACCELERATE_DYNAMO_MODE",
        a.str("dynamo_mode").unwrap_or_else(|| "default".into()),
    );
    for (arg, var) in [
        ("dynamo_use_fullgraph", "ACCELERATE_DYNAMO_USE_FULLGRAPH"),
        ("dynamo_use_dynamic", "ACCELERATE_DYNAMO_USE_DYNAMIC"),
        (
            "dynamo_use_regional_compilation",
            "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION",
        ),
    ] {
        env.put(var, a.get(arg).map_or_else(|| "False".into(), Py::str));
    }
    Ok(())
}

/// `prepare_extend_env_parallelism_config`.
fn parallelism_env(a: &Args, env: &mut EnvOut) {
    let s = |k: &str| a.get(k).map_or_else(|| "None".into(), Py::str);
    env.put("ACCELERATE_USE_PARALLELISM_CONFIG", "true");
    for name in [
        "DP_REPLICATE_SIZE",
        "DP_SHARD_SIZE",
        "TP_SIZE",
        "CP_SIZE",
        "CP_BACKEND",
        "SP_SIZE",
        "SP_BACKEND",
    ] {
        env.put(
            &format!("PARALLELISM_CONFIG_{name}"),
            s(&format!("parallelism_config_{}", name.to_lowercase())),
        );
    }
    let size = |k: &str| {
        a.get(k)
            .and_then(|v| v.str().parse::<i64>().ok())
            .unwrap_or(1)
    };
    if size("parallelism_config_cp_size") > 1 {
        env.put(
            "PARALLELISM_CONFIG_CP_COMM_STRATEGY",
            s("parallelism_config_cp_comm_strategy"),
        );
    }
    if size("parallelism_config_sp_size") > 1 {
        env.put(
            "PARALLELISM_CONFIG_SP_SEQ_LENGTH",
            s("parallelism_config_sp_seq_length"),
        );
        env.put(
            "PARALLELISM_CONFIG_SP_SEQ_LENGTH_IS_VARIABLE",
            a.get("parallelism_config_sp_seq_length_is_variable")
                .map_or_else(|| "True".into(), Py::str),
        );
        env.put(
            "PARALLELISM_CONFIG_SP_ATTN_IMPLEMENTATION",
            s("parallelism_config_sp_attn_implementation"),
        );
    }
}

/// `prepare_deepspeed_cmd_env`: torchrun on one machine or with the `standard` launcher,
/// DeepSpeed's `--no_ssh` form with `nossh`; the fan-out launchers are refused.
fn deepspeed_path(
    a: &mut Args,
    p: &Parsed,
    ctx: &Ctx,
    program: Program,
    mp_from_config: bool,
    config: Option<&Config>,
    notices: &mut Vec<String>,
) -> Result<LaunchPlan, LaunchError> {
    let nm = a.int("num_machines")?.unwrap_or(1);
    let launcher = a
        .str("deepspeed_multinode_launcher")
        .unwrap_or_else(|| "pdsh".into());
    let mut plan = if nm > 1 && launcher != "standard" {
        if launcher != "nossh" {
            let shown = a.val("deepspeed_multinode_launcher").map_or_else(
                || "deepspeed_multinode_launcher 'pdsh' (the default)".into(),
                |v| format!("{} ", v.show()),
            );
            return Err(LaunchError(format!(
                "{} fans out over ssh/MPI from one machine; set deepspeed_multinode_launcher to \
                 'standard' or 'nossh' and run ringctl launch on every machine",
                shown.trim_end()
            )));
        }
        nossh(a, p, ctx)?
    } else {
        torchrun_path(a, program, notices)?
    };
    let mut env = EnvOut::default();
    if a.is("debug") {
        env.put("ACCELERATE_DEBUG_MODE", "true");
    }
    let cwd = ctx
        .env
        .get("PWD")
        .or_else(|| {
            std::env::current_dir()
                .ok()
                .map(|d| d.display().to_string())
        })
        .unwrap_or_else(|| ".".into());
    // env_var_path_add: the existing entries, then the working directory.
    let mut paths: Vec<String> = ctx
        .env
        .get("PYTHONPATH")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    paths.push(cwd);
    env.put("PYTHONPATH", paths.join(":"));
    env.put("ACCELERATE_MIXED_PRECISION", mixed_precision(a)?);
    fp8_env(a, &mut env)?;
    let mut fields: Vec<String> = config
        .and_then(|c| c.dicts.get("deepspeed_config"))
        .map(|d| d.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    if mp_from_config {
        fields.push("mixed_precision".into());
    }
    env.put(
        "ACCELERATE_CONFIG_DS_FIELDS",
        fields.join(",").to_lowercase(),
    );
    env.put("ACCELERATE_USE_DEEPSPEED", "true");
    for (arg, var, lower) in [
        ("zero_stage", "ACCELERATE_DEEPSPEED_ZERO_STAGE", false),
        (
            "gradient_accumulation_steps",
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
            false,
        ),
        ("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING", true),
        (
            "offload_optimizer_device",
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
            true,
        ),
        (
            "offload_param_device",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
            true,
        ),
        ("zero3_init_flag", "ACCELERATE_DEEPSPEED_ZERO3_INIT", true),
        (
            "zero3_save_16bit_model",
            "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
            true,
        ),
        (
            "deepspeed_config_file",
            "ACCELERATE_DEEPSPEED_CONFIG_FILE",
            false,
        ),
    ] {
        if let Some(v) = a.get(arg) {
            let s = v.str();
            env.put(var, if lower { s.to_lowercase() } else { s });
        }
    }
    if a.is("enable_cpu_affinity") {
        env.put("ACCELERATE_CPU_AFFINITY", "1");
    }
    if let Some(v) = a.get("deepspeed_moe_layer_cls_names") {
        env.put("ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES", v.str());
    }
    if a.is("use_parallelism_config") {
        parallelism_env(a, &mut env);
    }
    plan.extra_env.extend(env.0);
    Ok(plan)
}

/// accelerate's `nossh` DeepSpeed launcher: `deepspeed --hostfile H --node_rank R --no_ssh
/// (--exclude X | --include X | --num_gpus N) [--master_addr IP] --master_port P script args`.
fn nossh(a: &Args, p: &Parsed, ctx: &Ctx) -> Result<LaunchPlan, LaunchError> {
    let Some(hostfile) = a.val("deepspeed_hostfile") else {
        return Err(LaunchError::new(
            "deepspeed_multinode_launcher 'nossh' needs deepspeed_hostfile (the hostfile every \
             machine reads)",
        ));
    };
    let seen = |key: &'static str, spelled: &str, value: Option<String>| Seen {
        key,
        spelled: spelled.to_string(),
        value,
    };
    let mut opts = vec![
        seen("hostfile", "--deepspeed_hostfile", Some(hostfile.v.clone())),
        seen(
            "node_rank",
            "--machine_rank",
            Some(a.str("machine_rank").unwrap_or_else(|| "0".into())),
        ),
        seen("no_ssh", "--deepspeed_multinode_launcher nossh", None),
    ];
    if let Some(v) = a.str("deepspeed_exclusion_filter") {
        opts.push(seen("exclude", "--deepspeed_exclusion_filter", Some(v)));
    } else if let Some(v) = a.str("deepspeed_inclusion_filter") {
        opts.push(seen("include", "--deepspeed_inclusion_filter", Some(v)));
    } else {
        let np = a.int("num_processes")?.unwrap_or(1);
        let nm = a.int("num_machines")?.unwrap_or(1);
        if np % nm != 0 {
            return Err(LaunchError(format!(
                "--num_processes {np} is not divisible by --num_machines {nm} (accelerate would \
                 silently start {} per machine)",
                np / nm
            )));
        }
        opts.push(seen(
            "num_gpus",
            "--num_processes",
            Some((np / nm).to_string()),
        ));
    }
    if let Some(ip) = a.str("main_process_ip") {
        opts.push(seen("master_addr", "--main_process_ip", Some(ip)));
    }
    let port = a.str("main_process_port").unwrap_or_else(|| "29500".into());
    opts.push(seen("master_port", "--main_process_port", Some(port)));
    if a.is("module") {
        opts.push(seen("module", "--module", None));
    } else if a.is("no_python") {
        opts.push(seen("no_python", "--no_python", None));
    }
    let parsed = Parsed {
        opts,
        program: p.program.clone(),
        args: p.args.clone(),
        dashdash: p.dashdash,
    };
    super::deepspeed::plan_parsed(&parsed, ctx, Dialect::Accelerate)
}

/// `simple_launcher`: one process (accelerate's MULTI_CPU without mpirun, `--cpu`, NO).
fn simple_path(
    a: &Args,
    program: Program,
    notices: &mut Vec<String>,
) -> Result<LaunchPlan, LaunchError> {
    if a.get("mpirun_hostfile").is_some() {
        return Err(LaunchError::new(
            "mpirun_hostfile: accelerate's multi-CPU launcher starts the workers with mpirun, \
             which ringctl launch does not do",
        ));
    }
    let nm = a.int("num_machines")?.unwrap_or(1);
    if nm > 1 {
        if a.get("main_process_port").is_none() {
            return Err(LaunchError::new(
                "When using multiple machines, you need to specify the main process port.",
            ));
        }
        return Err(LaunchError::new(
            "accelerate's single-process launcher on several machines relies on MPI to number \
             the processes; use --multi_gpu (distributed_type MULTI_GPU) with ringctl launch",
        ));
    }
    let np = a.int("num_processes")?.unwrap_or(1);
    if np > 1 {
        notices.push(format!(
            "accelerate starts one process here (num_processes {np} without --multi_gpu or \
             mpirun)"
        ));
    }
    // One plain process (prepare_simple_launcher_cmd_env): none of torchrun's variables, so
    // accelerate's state stays non-distributed. The launcher's own store (it meets no other
    // node) takes a free port, away from the MASTER_PORT the process may be given.
    let mut plan = LaunchPlan::new(Dialect::Accelerate, 1, program);
    plan.worker_env = WorkerEnv::Single;
    plan.master_port = Port::Ephemeral;
    if let Some(ids) = a.str("gpu_ids").filter(|g| g != "all") {
        plan.visible_devices = Some(ids.split(',').map(|s| s.trim().to_string()).collect());
    }
    let cpu = a.is("cpu") || a.is("use_cpu");
    let mut env = EnvOut::default();
    env.put("ACCELERATE_USE_CPU", if cpu { "True" } else { "False" });
    if a.is("debug") {
        env.put("ACCELERATE_DEBUG_MODE", "true");
    }
    if np > 1 {
        // What accelerate sets for num_processes > 1 (one machine here).
        let port = match a.val("main_process_port") {
            Some(v) => {
                v.port()?;
                v.v
            }
            None => "29500".into(),
        };
        env.put(
            "MASTER_ADDR",
            a.str("main_process_ip")
                .unwrap_or_else(|| "127.0.0.1".into()),
        );
        env.put("MASTER_PORT", port);
    }
    if cpu {
        env.put("KMP_AFFINITY", "granularity=fine,compact,1,0");
        env.put("KMP_BLOCKTIME", "1");
    }
    env.put("ACCELERATE_MIXED_PRECISION", mixed_precision(a)?);
    fp8_env(a, &mut env)?;
    dynamo_env(a, &mut env)?;
    cpu_threads_env(a, &mut env);
    plan.extra_env = env.0;
    Ok(plan)
}
