//! accelerate YAML configs (what `accelerate config` writes) and the bare `fsdp_config` mapping
//! that a training config's `fsdp_config:` may point at (the inner mapping of accelerate's
//! `fsdp_config`, keys with or without the `fsdp_` prefix as the HF Trainer reads them).
//!
//! Launcher facts (`num_processes`, `num_machines`, `mixed_precision`) are kept so that
//! [`crate::plan`] can check them against the cluster and the training config; launcher keys
//! that Ringmaster decides itself (`main_process_ip`, `main_process_port`, `machine_rank`, ...)
//! become warnings.

use serde::Serialize;
use serde_json::Value;

use crate::deepspeed::{self, DeepSpeedConfig, Offload, OffloadDevice};
use crate::reader::{Auto, Reader};
use crate::{ConfigError, Warning};

/// How accelerate files are named in messages.
pub const FILE: &str = "accelerate config";
/// How a bare FSDP mapping is named in messages.
pub const FSDP_FILE: &str = "fsdp config";

/// accelerate's `distributed_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DistributedType {
    /// One process.
    No,
    /// DDP.
    MultiGpu,
    /// DDP on CPUs.
    MultiCpu,
    DeepSpeed,
    Fsdp,
}

impl DistributedType {
    pub fn name(self) -> &'static str {
        match self {
            DistributedType::No => "NO",
            DistributedType::MultiGpu => "MULTI_GPU",
            DistributedType::MultiCpu => "MULTI_CPU",
            DistributedType::DeepSpeed => "DEEPSPEED",
            DistributedType::Fsdp => "FSDP",
        }
    }
}

/// accelerate's `mixed_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

impl MixedPrecision {
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Fp16 => "fp16",
            MixedPrecision::Bf16 => "bf16",
        }
    }
}

/// The launcher part of an accelerate config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Launcher {
    pub distributed_type: DistributedType,
    pub mixed_precision: Option<MixedPrecision>,
    pub num_machines: Option<u64>,
    pub num_processes: Option<u64>,
    pub machine_rank: Option<u64>,
    pub main_process_ip: Option<String>,
    pub main_process_port: Option<u64>,
    pub use_cpu: bool,
}

/// FSDP's `ShardingStrategy`, by name or by number (1–5) as accelerate accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ShardingStrategy {
    /// 1: parameters, gradients and optimizer state sharded (ZeRO-3).
    FullShard,
    /// 2: gradients and optimizer state sharded (ZeRO-2).
    ShardGradOp,
    /// 3: nothing sharded (DDP).
    NoShard,
    /// 4: FULL_SHARD inside a node, replicated across nodes.
    HybridShard,
    /// 5: SHARD_GRAD_OP inside a node, replicated across nodes.
    HybridShardZero2,
}

impl ShardingStrategy {
    /// The name as FSDP writes it.
    pub fn name(self) -> &'static str {
        match self {
            ShardingStrategy::FullShard => "FULL_SHARD",
            ShardingStrategy::ShardGradOp => "SHARD_GRAD_OP",
            ShardingStrategy::NoShard => "NO_SHARD",
            ShardingStrategy::HybridShard => "HYBRID_SHARD",
            ShardingStrategy::HybridShardZero2 => "_HYBRID_SHARD_ZERO2",
        }
    }

    /// FSDP's number for it (1–5).
    pub fn number(self) -> u8 {
        match self {
            ShardingStrategy::FullShard => 1,
            ShardingStrategy::ShardGradOp => 2,
            ShardingStrategy::NoShard => 3,
            ShardingStrategy::HybridShard => 4,
            ShardingStrategy::HybridShardZero2 => 5,
        }
    }

    /// Parses `FULL_SHARD` (any case, `_HYBRID_SHARD_ZERO2` with or without the underscore) or
    /// `1`–`5`.
    pub fn parse(s: &str) -> Option<ShardingStrategy> {
        let s = s.trim();
        let all = [
            ShardingStrategy::FullShard,
            ShardingStrategy::ShardGradOp,
            ShardingStrategy::NoShard,
            ShardingStrategy::HybridShard,
            ShardingStrategy::HybridShardZero2,
        ];
        if let Ok(n) = s.parse::<u8>() {
            return all.into_iter().find(|x| x.number() == n);
        }
        let up = s.to_ascii_uppercase();
        let up = up.trim_start_matches('_');
        all.into_iter()
            .find(|x| x.name().trim_start_matches('_') == up)
    }
}

/// `fsdp_auto_wrap_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AutoWrapPolicy {
    TransformerBasedWrap,
    SizeBasedWrap,
    NoWrap,
}

/// `fsdp_backward_prefetch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum BackwardPrefetch {
    BackwardPre,
    BackwardPost,
    NoPrefetch,
}

/// `fsdp_state_dict_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum StateDictType {
    FullStateDict,
    ShardedStateDict,
    LocalStateDict,
}

/// An FSDP config (accelerate's `fsdp_config` mapping), with accelerate's defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FsdpConfig {
    /// 1 or 2.
    pub version: u8,
    pub sharding_strategy: ShardingStrategy,
    /// Parameters and gradients on the host, the optimizer step on the host.
    pub offload_params: bool,
    pub auto_wrap_policy: Option<AutoWrapPolicy>,
    pub transformer_layer_cls_to_wrap: Vec<String>,
    pub backward_prefetch: Option<BackwardPrefetch>,
    pub forward_prefetch: bool,
    pub state_dict_type: Option<StateDictType>,
    pub use_orig_params: Option<bool>,
    pub sync_module_states: bool,
    pub cpu_ram_efficient_loading: bool,
    pub activation_checkpointing: bool,
    /// Set when the file was a whole accelerate config rather than the bare mapping.
    pub launcher: Option<Launcher>,
    /// Keys accepted without effect in Ringmaster.
    pub warnings: Vec<Warning>,
}

impl Default for FsdpConfig {
    fn default() -> FsdpConfig {
        FsdpConfig {
            version: 1,
            sharding_strategy: ShardingStrategy::FullShard,
            offload_params: false,
            auto_wrap_policy: None,
            transformer_layer_cls_to_wrap: Vec::new(),
            backward_prefetch: None,
            forward_prefetch: false,
            state_dict_type: None,
            use_orig_params: None,
            sync_module_states: true,
            cpu_ram_efficient_loading: false,
            activation_checkpointing: false,
            launcher: None,
            warnings: Vec::new(),
        }
    }
}

/// accelerate's `deepspeed_config` mapping.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AccelerateDeepSpeed {
    /// A DeepSpeed JSON file; when given, the other fields must be absent (as accelerate says).
    pub deepspeed_config_file: Option<String>,
    pub zero_stage: Option<u8>,
    pub offload_optimizer_device: Option<OffloadDevice>,
    pub offload_param_device: Option<OffloadDevice>,
    pub gradient_accumulation_steps: Option<Auto<u64>>,
    pub gradient_clipping: Option<Auto<f64>>,
    pub zero3_init_flag: Option<bool>,
    pub zero3_save_16bit_model: Option<bool>,
}

impl AccelerateDeepSpeed {
    /// The DeepSpeed config accelerate builds from these fields (batch sizes `"auto"`, precision
    /// from `mixed_precision`, `"auto"` where accelerate leaves it to the training config).
    pub fn to_deepspeed(&self, mixed_precision: Option<MixedPrecision>) -> DeepSpeedConfig {
        let precision = |want: MixedPrecision| match mixed_precision {
            None | Some(MixedPrecision::No) => Auto::Auto,
            Some(mp) => Auto::Set(mp == want),
        };
        let offload = |d: Option<OffloadDevice>| {
            d.map(|device| Offload {
                device,
                pin_memory: false,
            })
        };
        let mut ds = DeepSpeedConfig {
            train_batch_size: Some(Auto::Auto),
            train_micro_batch_size_per_gpu: Some(Auto::Auto),
            gradient_accumulation_steps: Some(
                self.gradient_accumulation_steps.unwrap_or(Auto::Auto),
            ),
            gradient_clipping: Some(self.gradient_clipping.unwrap_or(Auto::Auto)),
            zero_allow_untested_optimizer: true,
            fp16: Some(deepspeed::Fp16 {
                enabled: precision(MixedPrecision::Fp16),
                ..deepspeed::Fp16::default()
            }),
            bf16: Some(precision(MixedPrecision::Bf16)),
            ..DeepSpeedConfig::default()
        };
        let z = &mut ds.zero_optimization;
        z.stage = self.zero_stage.unwrap_or(2);
        z.offload_optimizer = offload(self.offload_optimizer_device);
        z.offload_param = offload(self.offload_param_device);
        z.reduce_bucket_size = Auto::Auto;
        z.stage3_prefetch_bucket_size = Auto::Auto;
        z.stage3_param_persistence_threshold = Auto::Auto;
        z.stage3_gather_16bit_weights_on_model_save = self.zero3_save_16bit_model.unwrap_or(false);
        ds
    }
}

/// An accelerate config file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccelerateConfig {
    pub launcher: Launcher,
    pub deepspeed: Option<AccelerateDeepSpeed>,
    pub fsdp: Option<FsdpConfig>,
    /// Keys accepted without effect in Ringmaster.
    pub warnings: Vec<Warning>,
}

/// Launcher keys read and checked, or accepted silently when they hold their default.
const LAUNCHER_NO_EFFECT: &[&str] = &[
    "compute_environment",
    "debug",
    "downcast_bf16",
    "dynamo_config",
    "enable_cpu_affinity",
    "gpu_ids",
    "main_training_function",
    "rdzv_backend",
    "same_network",
    "tpu_env",
    "tpu_use_cluster",
    "tpu_use_sudo",
];

fn is_default_like(key: &str, v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b || key == "same_network",
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => matches!(
            (key, s.as_str()),
            ("compute_environment", "LOCAL_MACHINE")
                | ("downcast_bf16", "no")
                | ("gpu_ids", "all")
                | ("main_training_function", "main")
                | ("rdzv_backend", "static" | "c10d")
        ),
        Value::Number(_) => false,
    }
}

impl AccelerateConfig {
    /// Parses an accelerate YAML file.
    ///
    /// # Errors
    /// Syntax errors, bad values (naming the field) and unknown keys (all listed).
    pub fn from_yaml(text: &str) -> Result<AccelerateConfig, ConfigError> {
        let value: Value = crate::yaml::to_json(text).map_err(|e| match e {
            crate::yaml::YamlError::Syntax(message) => ConfigError::FileSyntax {
                file: FILE.into(),
                message,
            },
            crate::yaml::YamlError::NonFinite(field) => ConfigError::Invalid {
                file: FILE.into(),
                field,
                message: crate::yaml::NON_FINITE.into(),
            },
        })?;
        AccelerateConfig::from_value(&value)
    }

    /// The DeepSpeed JSON file a DEEPSPEED config names (`deepspeed_config_file`), as written.
    pub fn deepspeed_file(&self) -> Option<&str> {
        self.deepspeed
            .as_ref()
            .and_then(|d| d.deepspeed_config_file.as_deref())
    }

    /// Reads a config already parsed into a JSON value.
    ///
    /// # Errors
    /// As [`AccelerateConfig::from_yaml`].
    pub fn from_value(value: &Value) -> Result<AccelerateConfig, ConfigError> {
        let mut r = Reader::new(FILE, "", value)?;
        let mut unknown = Vec::new();
        let mut warnings = Vec::new();
        let distributed_type = match r.string("distributed_type")?.as_deref() {
            None | Some("NO") => DistributedType::No,
            Some("MULTI_GPU") => DistributedType::MultiGpu,
            Some("MULTI_CPU") => DistributedType::MultiCpu,
            Some("DEEPSPEED") => DistributedType::DeepSpeed,
            Some("FSDP") => DistributedType::Fsdp,
            Some(other) => {
                return Err(r.err(
                    "distributed_type",
                    format!("'{other}' is not supported; use NO, MULTI_GPU, MULTI_CPU, DEEPSPEED or FSDP"),
                ));
            }
        };
        let mixed_precision = match r.string("mixed_precision")?.as_deref() {
            None => None,
            Some("no") => Some(MixedPrecision::No),
            Some("fp16") => Some(MixedPrecision::Fp16),
            Some("bf16") => Some(MixedPrecision::Bf16),
            Some(other) => {
                return Err(r.err(
                    "mixed_precision",
                    format!("expected no, fp16 or bf16, got '{other}'"),
                ));
            }
        };
        let launcher = Launcher {
            distributed_type,
            mixed_precision,
            num_machines: r.u64("num_machines")?,
            num_processes: r.u64("num_processes")?,
            machine_rank: r.u64("machine_rank")?,
            main_process_ip: r.string("main_process_ip")?,
            main_process_port: r.u64("main_process_port")?,
            use_cpu: r.bool("use_cpu")?.unwrap_or(false),
        };
        for (key, v) in [
            ("num_machines", launcher.num_machines),
            ("num_processes", launcher.num_processes),
        ] {
            if v == Some(0) {
                return Err(r.err(key, "must be at least 1"));
            }
        }
        if launcher.machine_rank.is_some_and(|m| m != 0) {
            warnings.push(Warning::new(
                "machine_rank",
                "accepted, no effect in Ringmaster: the coordinator assigns node ranks",
            ));
        }
        for (key, set) in [
            ("main_process_ip", launcher.main_process_ip.is_some()),
            ("main_process_port", launcher.main_process_port.is_some()),
        ] {
            if set {
                warnings.push(Warning::new(
                    key,
                    "accepted, no effect in Ringmaster: the coordinator chooses MASTER_ADDR and \
                     MASTER_PORT",
                ));
            }
        }
        if launcher.use_cpu {
            warnings.push(Warning::new(
                "use_cpu",
                "accepted, no effect in Ringmaster: the trainer uses the devices its agent gives it",
            ));
        }
        for key in LAUNCHER_NO_EFFECT {
            if let Some(v) = r.take(key)
                && !is_default_like(key, v)
            {
                warnings.push(Warning::no_effect(*key));
            }
        }
        let deepspeed = r.nested("deepspeed_config", &mut unknown, |d, _| {
            read_accelerate_deepspeed(d, &mut warnings)
        })?;
        let fsdp = r.nested("fsdp_config", &mut unknown, |f, _| read_fsdp(f))?;
        for k in ["megatron_lm_config", "fp8_config", "parallelism_config"] {
            if let Some(v) = r.take(k)
                && !is_default_like(k, v)
            {
                return Err(r.err(k, "is not supported"));
            }
        }
        unknown.extend(r.leftover());
        if !unknown.is_empty() {
            unknown.sort();
            return Err(ConfigError::UnknownKeysIn {
                file: FILE.into(),
                keys: unknown,
            });
        }
        match distributed_type {
            DistributedType::DeepSpeed if deepspeed.is_none() => {
                // accelerate's defaults: ZeRO-2, no offload.
            }
            DistributedType::Fsdp => {}
            _ if fsdp.is_some() && !fsdp_is_empty(value) => {
                warnings.push(Warning::new(
                    "fsdp_config",
                    format!(
                        "ignored: distributed_type is {}, not FSDP",
                        distributed_type.name()
                    ),
                ));
            }
            _ => {}
        }
        let mut fsdp = fsdp;
        if let Some(f) = &mut fsdp {
            warnings.append(&mut f.warnings);
        }
        warnings.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(AccelerateConfig {
            launcher,
            deepspeed,
            fsdp,
            warnings,
        })
    }

    /// The FSDP config of an `FSDP` accelerate file (accelerate's defaults when the
    /// `fsdp_config` mapping is absent), with the launcher facts attached.
    pub fn fsdp_config(&self) -> FsdpConfig {
        let mut f = self.fsdp.clone().unwrap_or_default();
        f.launcher = Some(self.launcher.clone());
        f.warnings = self.warnings.clone();
        f
    }
}

fn fsdp_is_empty(value: &Value) -> bool {
    value
        .get("fsdp_config")
        .is_none_or(|v| v.is_null() || v.as_object().is_some_and(|o| o.is_empty()))
}

fn read_accelerate_deepspeed(
    d: &mut Reader<'_>,
    warnings: &mut Vec<Warning>,
) -> Result<AccelerateDeepSpeed, ConfigError> {
    let device = |d: &mut Reader<'_>, key: &str| -> Result<Option<OffloadDevice>, ConfigError> {
        match d.string(key)?.as_deref() {
            None => Ok(None),
            Some("none") => Ok(Some(OffloadDevice::None)),
            Some("cpu") => Ok(Some(OffloadDevice::Cpu)),
            Some("nvme") => Err(d.err(key, "NVMe offload is not supported; use cpu or none")),
            Some(other) => Err(d.err(key, format!("expected cpu or none, got '{other}'"))),
        }
    };
    let out = AccelerateDeepSpeed {
        deepspeed_config_file: d.string("deepspeed_config_file")?,
        zero_stage: match d.u64("zero_stage")? {
            None => None,
            Some(s @ 0..=3) => Some(s as u8),
            Some(s) => {
                return Err(d.err("zero_stage", format!("expected 0, 1, 2 or 3, got {s}")));
            }
        },
        offload_optimizer_device: device(d, "offload_optimizer_device")?,
        offload_param_device: device(d, "offload_param_device")?,
        gradient_accumulation_steps: d.auto_u64("gradient_accumulation_steps")?,
        gradient_clipping: d.auto_f64("gradient_clipping")?,
        zero3_init_flag: d.bool("zero3_init_flag")?,
        zero3_save_16bit_model: d.bool("zero3_save_16bit_model")?,
    };
    if out.gradient_accumulation_steps == Some(Auto::Set(0)) {
        return Err(d.err("gradient_accumulation_steps", "must be at least 1"));
    }
    if out.deepspeed_config_file.is_some() {
        let mut set = Vec::new();
        for (k, present) in [
            ("zero_stage", out.zero_stage.is_some()),
            (
                "offload_optimizer_device",
                out.offload_optimizer_device.is_some(),
            ),
            ("offload_param_device", out.offload_param_device.is_some()),
            (
                "gradient_accumulation_steps",
                out.gradient_accumulation_steps
                    .is_some_and(|a| !a.is_auto()),
            ),
            (
                "gradient_clipping",
                out.gradient_clipping.is_some_and(|a| !a.is_auto()),
            ),
        ] {
            if present {
                set.push(d.path(k));
            }
        }
        if !set.is_empty() {
            return Err(d.err(
                "deepspeed_config_file",
                format!(
                    "give the DeepSpeed settings either in the file or here, not both (also set: {})",
                    set.join(", ")
                ),
            ));
        }
    }
    for k in [
        "deepspeed_multinode_launcher",
        "deepspeed_hostfile",
        "deepspeed_exclusion_filter",
        "deepspeed_inclusion_filter",
        "offload_optimizer_nvme_path",
        "offload_param_nvme_path",
    ] {
        if let Some(v) = d.take(k)
            && !is_default_like(k, v)
        {
            warnings.push(Warning::no_effect(d.path(k)));
        }
    }
    if out.zero3_init_flag == Some(true) {
        warnings.push(Warning::no_effect(d.path("zero3_init_flag")));
    }
    if out.zero3_save_16bit_model == Some(true) {
        warnings.push(Warning::new(
            d.path("zero3_save_16bit_model"),
            "accepted, no effect in Ringmaster: `ringctl export` writes the consolidated model",
        ));
    }
    Ok(out)
}

/// The key as written: `fsdp_NAME` or `NAME` (the HF Trainer strips the prefix); both is an error.
fn spelled(f: &Reader<'_>, name: &str) -> Result<String, ConfigError> {
    let long = format!("fsdp_{name}");
    match (f.has(&long), f.has(name)) {
        (true, true) => Err(f.err(name, format!("given twice, as {long} and as {name}"))),
        (false, true) => Ok(name.to_owned()),
        _ => Ok(long),
    }
}

fn enum_value<T: Copy>(
    f: &mut Reader<'_>,
    key: &str,
    choices: &[(&str, T)],
) -> Result<Option<T>, ConfigError> {
    let Some(s) = f.string(key)? else {
        return Ok(None);
    };
    let up = s.trim().to_ascii_uppercase();
    if let Some((_, v)) = choices.iter().find(|(n, _)| *n == up) {
        return Ok(Some(*v));
    }
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    Err(f.err(
        key,
        format!("expected one of {}, got '{s}'", names.join(", ")),
    ))
}

/// Reads the (inner) FSDP mapping.
fn read_fsdp(f: &mut Reader<'_>) -> Result<FsdpConfig, ConfigError> {
    let d = FsdpConfig::default();
    let mut warnings = Vec::new();
    let k_version = spelled(f, "version")?;
    let version = match f.u64(&k_version)? {
        None => 1,
        Some(v @ 1..=2) => v as u8,
        Some(v) => return Err(f.err(&k_version, format!("expected 1 or 2, got {v}"))),
    };
    let strategy =
        |f: &mut Reader<'_>, key: &str| -> Result<Option<ShardingStrategy>, ConfigError> {
            match f.string(key)? {
                None => Ok(None),
                Some(s) => ShardingStrategy::parse(&s).map(Some).ok_or_else(|| {
                    f.err(
                        key,
                        format!(
                            "expected FULL_SHARD, SHARD_GRAD_OP, NO_SHARD, HYBRID_SHARD, \
                         _HYBRID_SHARD_ZERO2 or 1-5, got '{s}'"
                        ),
                    )
                }),
            }
        };
    let k_strategy = spelled(f, "sharding_strategy")?;
    let mut sharding = strategy(f, &k_strategy)?;
    // accelerate >= 1.6 spells the strategy `fsdp_reshard_after_forward`: a boolean for FSDP2
    // (true = FULL_SHARD, false = SHARD_GRAD_OP), a strategy name for FSDP1.
    let k_reshard = spelled(f, "reshard_after_forward")?;
    let reshard = match f.take(&k_reshard) {
        None => None,
        Some(Value::Bool(true)) => Some(ShardingStrategy::FullShard),
        Some(Value::Bool(false)) => Some(ShardingStrategy::ShardGradOp),
        Some(_) => strategy(f, &k_reshard)?,
    };
    if let Some(r) = reshard {
        match sharding {
            Some(s) if s != r => {
                return Err(ConfigError::Mismatch(format!(
                    "fsdp config {} = {} but {} = {}",
                    f.path(&k_strategy),
                    s.name(),
                    f.path(&k_reshard),
                    r.name()
                )));
            }
            _ => sharding = Some(r),
        }
    }
    let k_wrap = spelled(f, "auto_wrap_policy")?;
    let auto_wrap_policy = enum_value(
        f,
        &k_wrap,
        &[
            (
                "TRANSFORMER_BASED_WRAP",
                AutoWrapPolicy::TransformerBasedWrap,
            ),
            ("SIZE_BASED_WRAP", AutoWrapPolicy::SizeBasedWrap),
            ("NO_WRAP", AutoWrapPolicy::NoWrap),
        ],
    )?;
    if matches!(
        auto_wrap_policy,
        Some(AutoWrapPolicy::SizeBasedWrap | AutoWrapPolicy::NoWrap)
    ) {
        warnings.push(Warning::new(
            f.path(&k_wrap),
            "accepted, no effect in Ringmaster: one unit per transformer block, as \
             TRANSFORMER_BASED_WRAP",
        ));
    }
    let k_cls = spelled(f, "transformer_layer_cls_to_wrap")?;
    let transformer_layer_cls_to_wrap = f.string_list(&k_cls)?.unwrap_or_default();
    let k_min = spelled(f, "min_num_params")?;
    if f.u64(&k_min)?.is_some() {
        warnings.push(Warning::no_effect(f.path(&k_min)));
    }
    let prefetch_choices = [
        ("BACKWARD_PRE", BackwardPrefetch::BackwardPre),
        ("BACKWARD_POST", BackwardPrefetch::BackwardPost),
        ("NO_PREFETCH", BackwardPrefetch::NoPrefetch),
    ];
    let k_bp = spelled(f, "backward_prefetch")?;
    let mut backward_prefetch = enum_value(f, &k_bp, &prefetch_choices)?;
    if f.has("fsdp_backward_prefetch_policy") {
        // accelerate's older spelling.
        let old = enum_value(f, "fsdp_backward_prefetch_policy", &prefetch_choices)?;
        backward_prefetch = backward_prefetch.or(old);
    }
    let k_fp = spelled(f, "forward_prefetch")?;
    let k_sd = spelled(f, "state_dict_type")?;
    let k_orig = spelled(f, "use_orig_params")?;
    let k_sync = spelled(f, "sync_module_states")?;
    let k_ram = spelled(f, "cpu_ram_efficient_loading")?;
    let k_ckpt = spelled(f, "activation_checkpointing")?;
    let k_offload = spelled(f, "offload_params")?;
    let out = FsdpConfig {
        version,
        sharding_strategy: sharding.unwrap_or(d.sharding_strategy),
        offload_params: f.bool(&k_offload)?.unwrap_or(false),
        auto_wrap_policy,
        transformer_layer_cls_to_wrap,
        backward_prefetch,
        forward_prefetch: f.bool(&k_fp)?.unwrap_or(false),
        state_dict_type: enum_value(
            f,
            &k_sd,
            &[
                ("FULL_STATE_DICT", StateDictType::FullStateDict),
                ("SHARDED_STATE_DICT", StateDictType::ShardedStateDict),
                ("LOCAL_STATE_DICT", StateDictType::LocalStateDict),
            ],
        )?,
        use_orig_params: f.bool(&k_orig)?,
        sync_module_states: f.bool(&k_sync)?.unwrap_or(d.sync_module_states),
        cpu_ram_efficient_loading: f.bool(&k_ram)?.unwrap_or(false),
        activation_checkpointing: f.bool(&k_ckpt)?.unwrap_or(false),
        launcher: None,
        warnings: Vec::new(),
    };
    if out.cpu_ram_efficient_loading && !out.sync_module_states {
        return Err(f.err(
            &k_ram,
            format!(
                "true requires {} to be true (only rank 0 loads the weights; the others get \
                 them by broadcast)",
                f.path(&k_sync)
            ),
        ));
    }
    if matches!(
        out.state_dict_type,
        Some(StateDictType::FullStateDict | StateDictType::LocalStateDict)
    ) {
        warnings.push(Warning::new(
            f.path(&k_sd),
            "accepted, no effect in Ringmaster: checkpoints are always sharded and reshardable; \
             `ringctl export` writes the full model",
        ));
    }
    if out.use_orig_params.is_some() {
        warnings.push(Warning::no_effect(f.path(&k_orig)));
    }
    if f.has(&k_fp) && !out.forward_prefetch {
        warnings.push(Warning::new(
            f.path(&k_fp),
            "accepted, no effect in Ringmaster: the next unit's all-gather is always issued \
             before the current unit computes",
        ));
    }
    if !out.sync_module_states {
        warnings.push(Warning::new(
            f.path(&k_sync),
            "accepted, no effect in Ringmaster: rank 0's weights are always broadcast at start",
        ));
    }
    if out.activation_checkpointing {
        warnings.push(Warning::new(
            f.path(&k_ckpt),
            "accepted, no effect in Ringmaster: FULL_SHARD recomputes unit by unit anyway",
        ));
    }
    let k_limit = spelled(f, "limit_all_gathers")?;
    if f.take(&k_limit).is_some() {
        warnings.push(Warning::no_effect(f.path(&k_limit)));
    }
    Ok(FsdpConfig { warnings, ..out })
}

impl FsdpConfig {
    /// Parses the file a training config's `fsdp_config:` names: either a whole accelerate
    /// config (`distributed_type: FSDP` with an `fsdp_config:` mapping) or the bare mapping.
    ///
    /// # Errors
    /// Syntax errors, bad values (naming the field), unknown keys (all listed), a whole
    /// accelerate config whose `distributed_type` is not FSDP, and
    /// `fsdp_cpu_ram_efficient_loading` without `fsdp_sync_module_states`.
    pub fn from_yaml(text: &str) -> Result<FsdpConfig, ConfigError> {
        let value: Value = crate::yaml::to_json(text).map_err(|e| match e {
            crate::yaml::YamlError::Syntax(message) => ConfigError::FileSyntax {
                file: FSDP_FILE.into(),
                message,
            },
            crate::yaml::YamlError::NonFinite(field) => ConfigError::Invalid {
                file: FSDP_FILE.into(),
                field,
                message: crate::yaml::NON_FINITE.into(),
            },
        })?;
        FsdpConfig::from_value(&value)
    }

    /// Reads a config already parsed into a JSON value.
    ///
    /// # Errors
    /// As [`FsdpConfig::from_yaml`].
    pub fn from_value(value: &Value) -> Result<FsdpConfig, ConfigError> {
        let whole = value
            .as_object()
            .is_some_and(|m| m.contains_key("distributed_type") || m.contains_key("fsdp_config"));
        if whole {
            let acc = AccelerateConfig::from_value(value)?;
            if acc.launcher.distributed_type != DistributedType::Fsdp {
                return Err(ConfigError::Invalid {
                    file: FILE.into(),
                    field: "distributed_type".into(),
                    message: format!(
                        "the file named by fsdp_config must be an FSDP config, got {}",
                        acc.launcher.distributed_type.name()
                    ),
                });
            }
            return Ok(acc.fsdp_config());
        }
        let mut r = Reader::new(FSDP_FILE, "", value)?;
        let mut out = read_fsdp(&mut r)?;
        let mut unknown = r.leftover();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(ConfigError::UnknownKeysIn {
                file: FSDP_FILE.into(),
                keys: unknown,
            });
        }
        out.warnings.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharding_strategies_by_name_and_number() {
        let all = [
            ("FULL_SHARD", "1", ShardingStrategy::FullShard),
            ("SHARD_GRAD_OP", "2", ShardingStrategy::ShardGradOp),
            ("NO_SHARD", "3", ShardingStrategy::NoShard),
            ("HYBRID_SHARD", "4", ShardingStrategy::HybridShard),
            (
                "_HYBRID_SHARD_ZERO2",
                "5",
                ShardingStrategy::HybridShardZero2,
            ),
        ];
        for (name, number, s) in all {
            assert_eq!(ShardingStrategy::parse(name), Some(s));
            assert_eq!(ShardingStrategy::parse(&name.to_lowercase()), Some(s));
            assert_eq!(ShardingStrategy::parse(number), Some(s));
            assert_eq!(s.name(), name);
            assert_eq!(s.number().to_string(), number);
            // In YAML, as a name and as a number, in the bare mapping and in a whole file.
            for text in [
                format!("fsdp_sharding_strategy: {name}"),
                format!("fsdp_sharding_strategy: {number}"),
                format!("sharding_strategy: {name}"),
                format!("distributed_type: FSDP\nfsdp_config:\n  fsdp_sharding_strategy: {number}"),
            ] {
                let f = FsdpConfig::from_yaml(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
                assert_eq!(f.sharding_strategy, s, "{text}");
            }
        }
        assert_eq!(
            ShardingStrategy::parse("HYBRID_SHARD_ZERO2"),
            Some(ShardingStrategy::HybridShardZero2)
        );
        assert_eq!(ShardingStrategy::parse("0"), None);
        assert_eq!(ShardingStrategy::parse("6"), None);
        assert_eq!(ShardingStrategy::parse("SHARDED"), None);
        let err = FsdpConfig::from_yaml("fsdp_sharding_strategy: 6").unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { field, .. } if field == "fsdp_sharding_strategy"),
            "{err}"
        );
    }

    #[test]
    fn reshard_after_forward_spells_the_strategy_too() {
        let f =
            FsdpConfig::from_yaml("fsdp_version: 2\nfsdp_reshard_after_forward: false").unwrap();
        assert_eq!(
            (f.version, f.sharding_strategy),
            (2, ShardingStrategy::ShardGradOp)
        );
        let f = FsdpConfig::from_yaml("fsdp_reshard_after_forward: HYBRID_SHARD").unwrap();
        assert_eq!(f.sharding_strategy, ShardingStrategy::HybridShard);
        let err = FsdpConfig::from_yaml(
            "fsdp_sharding_strategy: NO_SHARD\nfsdp_reshard_after_forward: true",
        )
        .unwrap_err();
        assert!(err.to_string().contains("NO_SHARD") && err.to_string().contains("FULL_SHARD"));
    }

    #[test]
    fn cpu_ram_efficient_loading_requires_sync_module_states() {
        let err = FsdpConfig::from_yaml(
            "fsdp_cpu_ram_efficient_loading: true\nfsdp_sync_module_states: false",
        )
        .unwrap_err();
        match &err {
            ConfigError::Invalid { field, message, .. } => {
                assert_eq!(field, "fsdp_cpu_ram_efficient_loading");
                assert!(message.contains("fsdp_sync_module_states"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // In a whole accelerate file the path says where.
        let err = AccelerateConfig::from_yaml(
            "distributed_type: FSDP\nfsdp_config:\n  fsdp_cpu_ram_efficient_loading: true\n  \
             fsdp_sync_module_states: false\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("fsdp_config.fsdp_cpu_ram_efficient_loading"),
            "{err}"
        );
        // sync_module_states defaults to true, as in accelerate.
        let f = FsdpConfig::from_yaml("cpu_ram_efficient_loading: true").unwrap();
        assert!(f.cpu_ram_efficient_loading && f.sync_module_states);
    }

    #[test]
    fn bare_mapping_with_and_without_prefix() {
        let f = FsdpConfig::from_yaml(
            "transformer_layer_cls_to_wrap: [LlamaDecoderLayer]\nbackward_prefetch: backward_post\n\
             forward_prefetch: true\nfsdp_offload_params: true\nfsdp_state_dict_type: FULL_STATE_DICT\n\
             fsdp_auto_wrap_policy: SIZE_BASED_WRAP\nmin_num_params: 100000000\nlimit_all_gathers: true\n",
        )
        .unwrap();
        assert_eq!(f.transformer_layer_cls_to_wrap, vec!["LlamaDecoderLayer"]);
        assert_eq!(f.backward_prefetch, Some(BackwardPrefetch::BackwardPost));
        assert!(f.forward_prefetch && f.offload_params);
        assert_eq!(f.launcher, None);
        let keys: Vec<&str> = f.warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "fsdp_auto_wrap_policy",
                "fsdp_state_dict_type",
                "limit_all_gathers",
                "min_num_params"
            ]
        );
        let err = FsdpConfig::from_yaml("fsdp_forward_prefetch: true\nforward_prefetch: false")
            .unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
    }

    #[test]
    fn unknown_keys_are_all_listed() {
        let err = AccelerateConfig::from_yaml(
            "distributed_type: FSDP\nnum_procs: 2\nfsdp_config:\n  fsdp_shard: 1\n  fsdp_version: 1\n",
        )
        .unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnknownKeysIn {
                file: FILE.into(),
                keys: vec!["fsdp_config.fsdp_shard".into(), "num_procs".into()]
            }
        );
        let err = FsdpConfig::from_yaml("fsdp_sharding: FULL_SHARD\nxla: true").unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnknownKeysIn {
                file: FSDP_FILE.into(),
                keys: vec!["fsdp_sharding".into(), "xla".into()]
            }
        );
    }

    #[test]
    fn reads_an_accelerate_deepspeed_config() {
        let acc = AccelerateConfig::from_yaml(
            "compute_environment: LOCAL_MACHINE\ndebug: false\ndeepspeed_config:\n  \
             gradient_accumulation_steps: 4\n  gradient_clipping: 1.0\n  offload_optimizer_device: cpu\n  \
             offload_param_device: none\n  zero3_init_flag: false\n  zero_stage: 2\n\
             distributed_type: DEEPSPEED\ndowncast_bf16: 'no'\nmachine_rank: 0\n\
             main_process_ip: 10.0.0.1\nmain_process_port: 29500\nmain_training_function: main\n\
             mixed_precision: bf16\nnum_machines: 2\nnum_processes: 16\nrdzv_backend: static\n\
             same_network: true\ntpu_env: []\ntpu_use_cluster: false\ntpu_use_sudo: false\nuse_cpu: false\n",
        )
        .unwrap();
        let l = &acc.launcher;
        assert_eq!(l.distributed_type, DistributedType::DeepSpeed);
        assert_eq!(l.mixed_precision, Some(MixedPrecision::Bf16));
        assert_eq!((l.num_machines, l.num_processes), (Some(2), Some(16)));
        let d = acc.deepspeed.as_ref().unwrap();
        assert_eq!(d.zero_stage, Some(2));
        assert_eq!(d.offload_optimizer_device, Some(OffloadDevice::Cpu));
        assert_eq!(d.gradient_accumulation_steps, Some(Auto::Set(4)));
        let ds = d.to_deepspeed(l.mixed_precision);
        assert_eq!(ds.bf16, Some(Auto::Set(true)));
        assert_eq!(ds.fp16.unwrap().enabled, Auto::Set(false));
        assert!(ds.zero_optimization.offload_optimizer.unwrap().is_cpu());
        let keys: Vec<&str> = acc.warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, vec!["main_process_ip", "main_process_port"]);

        let err = AccelerateConfig::from_yaml(
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: ds.json\n  zero_stage: 3\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("deepspeed_config.zero_stage"),
            "{err}"
        );
        for bad in [
            "distributed_type: XLA",
            "mixed_precision: fp8",
            "num_processes: 0",
        ] {
            assert!(
                matches!(
                    AccelerateConfig::from_yaml(bad),
                    Err(ConfigError::Invalid { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_whole_file_for_fsdp_config_must_be_fsdp() {
        let err =
            FsdpConfig::from_yaml("distributed_type: MULTI_GPU\nnum_processes: 2").unwrap_err();
        assert!(err.to_string().contains("MULTI_GPU"), "{err}");
        let f = FsdpConfig::from_yaml("distributed_type: FSDP\nnum_processes: 2").unwrap();
        assert_eq!(f.sharding_strategy, ShardingStrategy::FullShard);
        assert_eq!(f.launcher.unwrap().num_processes, Some(2));
    }
}
