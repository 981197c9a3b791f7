//! DeepSpeed JSON configs, read as their users write them for DeepSpeed (LLaMA-Factory's
//! `examples/deepspeed/*.json` included): numbers as JSON numbers (`5e8` too) or `"auto"`.
//!
//! [`DeepSpeedConfig::from_json`] only parses and checks types; `"auto"` values stay [`Auto::Auto`]
//! until [`crate::plan::plan_from`] resolves them by the HF Trainer rules against the training
//! config. Unknown keys are an error that lists all of them (with their dotted paths); blocks and
//! keys our engine accepts without effect become [`Warning`]s.

use serde::Serialize;
use serde_json::Value;

use crate::reader::{Auto, Reader, show};
use crate::{ConfigError, Warning};

/// How files of this kind are named in messages.
pub const FILE: &str = "deepspeed config";

/// Top-level blocks accepted without effect (logging, monitoring, I/O tuning, profiling...).
const NO_EFFECT_TOP: &[&str] = &[
    "activation_checkpointing",
    "aio",
    "autotuning",
    "checkpoint",
    "comet",
    "comms_config",
    "comms_logger",
    "communication_data_type",
    "compile",
    "csv_monitor",
    "data_types",
    "dump_state",
    "flops_profiler",
    "gradient_predivide_factor",
    "memory_breakdown",
    "monitor_config",
    "nebula",
    "prescale_gradients",
    "steps_per_print",
    "tensorboard",
    "timers",
    "wall_clock_breakdown",
    "wandb",
    "zero_force_ds_cpu_optimizer",
];

/// Keys of `zero_optimization` accepted without effect whatever their value.
const NO_EFFECT_ZERO: &[&str] = &[
    "cpu_offload_use_pin_memory",
    "elastic_checkpoint",
    "ignore_unused_parameters",
    "legacy_stage1",
    "load_from_fp32_weights",
    "log_trace_cache_warnings",
    "memory_efficient_linear",
    "stage3_model_persistence_threshold",
    "use_multi_rank_bucket_allreduce",
];

/// Keys of an `offload_*` block accepted without effect.
const NO_EFFECT_OFFLOAD: &[&str] = &[
    "buffer_count",
    "buffer_size",
    "fast_init",
    "max_in_cpu",
    "pipeline",
    "pipeline_read",
    "pipeline_write",
    "ratio",
];

/// Where an `offload_*` block puts its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OffloadDevice {
    None,
    Cpu,
}

/// `zero_optimization.offload_optimizer` / `offload_param`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Offload {
    pub device: OffloadDevice,
    pub pin_memory: bool,
}

impl Offload {
    pub fn is_cpu(&self) -> bool {
        self.device == OffloadDevice::Cpu
    }
}

/// The `fp16` block (DeepSpeed's defaults for absent fields).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fp16 {
    pub enabled: Auto<bool>,
    /// 0: dynamic loss scaling; > 0: a static scale.
    pub loss_scale: f64,
    pub initial_scale_power: u32,
    pub loss_scale_window: u32,
    pub hysteresis: u32,
    pub consecutive_hysteresis: bool,
    pub min_loss_scale: f64,
}

impl Default for Fp16 {
    fn default() -> Fp16 {
        Fp16 {
            enabled: Auto::Set(false),
            loss_scale: 0.0,
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            consecutive_hysteresis: false,
            min_loss_scale: 1.0,
        }
    }
}

/// The `zero_optimization` block (DeepSpeed's defaults for absent fields).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ZeroOptimization {
    /// 0 (DDP) to 3.
    pub stage: u8,
    pub offload_optimizer: Option<Offload>,
    pub offload_param: Option<Offload>,
    /// `None`: DeepSpeed's default (on for stage 3, off below).
    pub overlap_comm: Option<bool>,
    pub contiguous_gradients: bool,
    pub reduce_scatter: bool,
    /// Elements.
    pub reduce_bucket_size: Auto<u64>,
    /// Elements.
    pub allgather_bucket_size: u64,
    pub allgather_partitions: bool,
    /// Elements.
    pub stage3_prefetch_bucket_size: Auto<u64>,
    /// Elements: parameters smaller than this stay unsharded.
    pub stage3_param_persistence_threshold: Auto<u64>,
    pub stage3_max_live_parameters: u64,
    pub stage3_max_reuse_distance: u64,
    pub stage3_gather_16bit_weights_on_model_save: bool,
    pub sub_group_size: u64,
    pub round_robin_gradients: bool,
}

impl Default for ZeroOptimization {
    fn default() -> ZeroOptimization {
        ZeroOptimization {
            stage: 0,
            offload_optimizer: None,
            offload_param: None,
            overlap_comm: None,
            contiguous_gradients: true,
            reduce_scatter: true,
            reduce_bucket_size: Auto::Set(500_000_000),
            allgather_bucket_size: 500_000_000,
            allgather_partitions: true,
            stage3_prefetch_bucket_size: Auto::Set(50_000_000),
            stage3_param_persistence_threshold: Auto::Set(100_000),
            stage3_max_live_parameters: 1_000_000_000,
            stage3_max_reuse_distance: 1_000_000_000,
            stage3_gather_16bit_weights_on_model_save: false,
            sub_group_size: 1_000_000_000,
            round_robin_gradients: false,
        }
    }
}

/// The `optimizer` block: Adam/AdamW only (DeepSpeed's `Adam` is AdamW unless
/// `adam_w_mode: false`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptimizerBlock {
    /// As written (`AdamW`, `Adam`).
    pub kind: String,
    pub lr: Option<Auto<f64>>,
    pub betas: Option<Auto<(f64, f64)>>,
    pub eps: Option<Auto<f64>>,
    pub weight_decay: Option<Auto<f64>>,
}

/// The `scheduler` block, mapped to the training config's `lr_scheduler_type`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulerBlock {
    /// As written (`WarmupLR`, `WarmupDecayLR`, `WarmupCosineLR`).
    pub kind: String,
    /// The LLaMA-Factory / HF name of the same schedule.
    pub lr_scheduler_type: &'static str,
    pub warmup_max_lr: Option<Auto<f64>>,
}

/// A DeepSpeed config, parsed; `"auto"` values not yet resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DeepSpeedConfig {
    pub train_batch_size: Option<Auto<u64>>,
    pub train_micro_batch_size_per_gpu: Option<Auto<u64>>,
    pub gradient_accumulation_steps: Option<Auto<u64>>,
    /// 0 disables clipping.
    pub gradient_clipping: Option<Auto<f64>>,
    pub zero_allow_untested_optimizer: bool,
    pub fp16: Option<Fp16>,
    /// `bf16.enabled` (the block absent: `None`).
    pub bf16: Option<Auto<bool>>,
    pub zero_optimization: ZeroOptimization,
    pub optimizer: Option<OptimizerBlock>,
    pub scheduler: Option<SchedulerBlock>,
    /// Keys accepted without effect in Ringmaster, to print once at start.
    pub warnings: Vec<Warning>,
}

impl DeepSpeedConfig {
    /// Parses DeepSpeed JSON text.
    ///
    /// # Errors
    /// Syntax errors, bad values (naming the dotted field) and unknown keys (all listed).
    pub fn from_json(text: &str) -> Result<DeepSpeedConfig, ConfigError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ConfigError::FileSyntax {
            file: FILE.into(),
            message: e.to_string(),
        })?;
        DeepSpeedConfig::from_value(&value)
    }

    /// Reads a config already parsed into a JSON value.
    ///
    /// # Errors
    /// As [`DeepSpeedConfig::from_json`].
    pub fn from_value(value: &Value) -> Result<DeepSpeedConfig, ConfigError> {
        let mut r = Reader::new(FILE, "", value)?;
        let mut unknown = Vec::new();
        let mut warnings = Vec::new();
        let mut cfg = DeepSpeedConfig {
            train_batch_size: r.auto_u64("train_batch_size")?,
            train_micro_batch_size_per_gpu: r.auto_u64("train_micro_batch_size_per_gpu")?,
            gradient_accumulation_steps: r.auto_u64("gradient_accumulation_steps")?,
            gradient_clipping: r.auto_f64("gradient_clipping")?,
            zero_allow_untested_optimizer: r
                .bool("zero_allow_untested_optimizer")?
                .unwrap_or(false),
            ..DeepSpeedConfig::default()
        };
        for (key, v) in [
            ("train_batch_size", cfg.train_batch_size),
            (
                "train_micro_batch_size_per_gpu",
                cfg.train_micro_batch_size_per_gpu,
            ),
            (
                "gradient_accumulation_steps",
                cfg.gradient_accumulation_steps,
            ),
        ] {
            if v == Some(Auto::Set(0)) {
                return Err(r.err(key, "must be at least 1"));
            }
        }
        if let Some(Auto::Set(c)) = cfg.gradient_clipping
            && c < 0.0
        {
            return Err(r.err("gradient_clipping", format!("must be >= 0, got {c}")));
        }
        cfg.fp16 = r.nested("fp16", &mut unknown, |b, _| read_fp16(b, &mut warnings))?;
        let bf16_key = if r.has("bf16") { "bf16" } else { "bfloat16" };
        cfg.bf16 = r.nested(bf16_key, &mut unknown, |b, _| {
            for k in ["immediate_grad_update", "check_grad_overflow"] {
                if b.take(k).is_some() {
                    warnings.push(Warning::no_effect(b.path(k)));
                }
            }
            Ok(b.auto_bool("enabled")?.unwrap_or(Auto::Set(false)))
        })?;
        if let (Some(f), Some(Auto::Set(true))) = (&cfg.fp16, cfg.bf16)
            && f.enabled == Auto::Set(true)
        {
            return Err(r.err("fp16.enabled", "fp16 and bf16 cannot both be enabled"));
        }
        if let Some(z) = r.nested("zero_optimization", &mut unknown, |z, u| {
            read_zero(z, u, &mut warnings)
        })? {
            cfg.zero_optimization = z;
        }
        cfg.optimizer = r.nested("optimizer", &mut unknown, |o, u| {
            read_optimizer(o, u, &mut warnings)
        })?;
        cfg.scheduler = r.nested("scheduler", &mut unknown, |s, u| {
            read_scheduler(s, u, &mut warnings)
        })?;
        if let Some(amp) = r.take("amp") {
            if amp.get("enabled") == Some(&Value::Bool(true)) {
                return Err(r.err(
                    "amp.enabled",
                    "apex AMP is not supported; use the fp16 or bf16 block",
                ));
            }
            warnings.push(Warning::no_effect("amp"));
        }
        for k in NO_EFFECT_TOP {
            if r.has(k) {
                r.mark(k);
                warnings.push(Warning::no_effect(*k));
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
        warnings.sort_by(|a, b| a.key.cmp(&b.key));
        cfg.warnings = warnings;
        Ok(cfg)
    }

    /// The ZeRO stage, 0 to 3.
    pub fn stage(&self) -> u8 {
        self.zero_optimization.stage
    }
}

fn read_fp16(b: &mut Reader<'_>, warnings: &mut Vec<Warning>) -> Result<Fp16, ConfigError> {
    let d = Fp16::default();
    if b.take("auto_cast").is_some() {
        warnings.push(Warning::no_effect(b.path("auto_cast")));
    }
    let f = Fp16 {
        enabled: b.auto_bool("enabled")?.unwrap_or(Auto::Set(false)),
        loss_scale: b.f64("loss_scale")?.unwrap_or(d.loss_scale),
        initial_scale_power: small(b, "initial_scale_power", d.initial_scale_power)?,
        loss_scale_window: small(b, "loss_scale_window", d.loss_scale_window)?,
        hysteresis: small(b, "hysteresis", d.hysteresis)?,
        consecutive_hysteresis: b
            .bool("consecutive_hysteresis")?
            .unwrap_or(d.consecutive_hysteresis),
        min_loss_scale: b.f64("min_loss_scale")?.unwrap_or(d.min_loss_scale),
    };
    if f.loss_scale < 0.0 {
        return Err(b.err("loss_scale", "must be >= 0 (0: dynamic loss scaling)"));
    }
    if f.min_loss_scale <= 0.0 {
        return Err(b.err("min_loss_scale", "must be > 0"));
    }
    if f.initial_scale_power > 63 {
        return Err(b.err("initial_scale_power", "must be at most 63"));
    }
    if f.loss_scale_window == 0 || f.hysteresis == 0 {
        let k = if f.loss_scale_window == 0 {
            "loss_scale_window"
        } else {
            "hysteresis"
        };
        return Err(b.err(k, "must be at least 1"));
    }
    Ok(f)
}

fn small(b: &mut Reader<'_>, key: &str, default: u32) -> Result<u32, ConfigError> {
    match b.u64(key)? {
        None => Ok(default),
        Some(n) => u32::try_from(n).map_err(|_| b.err(key, format!("{n} is too large"))),
    }
}

fn read_offload(
    z: &mut Reader<'_>,
    key: &str,
    warnings: &mut Vec<Warning>,
    unknown: &mut Vec<String>,
) -> Result<Option<Offload>, ConfigError> {
    z.nested(key, unknown, |o, _| {
        let device = match o.string("device")?.as_deref() {
            None | Some("none") => OffloadDevice::None,
            Some("cpu") => OffloadDevice::Cpu,
            Some("nvme") => {
                return Err(o.err(
                    "device",
                    "NVMe offload is not supported; use \"cpu\" or \"none\"",
                ));
            }
            Some(other) => {
                return Err(o.err(
                    "device",
                    format!("expected \"cpu\" or \"none\", got '{other}'"),
                ));
            }
        };
        let pin_memory = o.bool("pin_memory")?.unwrap_or(false);
        if o.take("nvme_path").is_some() && device != OffloadDevice::None {
            warnings.push(Warning::no_effect(o.path("nvme_path")));
        }
        for k in NO_EFFECT_OFFLOAD {
            if o.has(k) {
                o.mark(k);
                warnings.push(Warning::no_effect(o.path(k)));
            }
        }
        Ok(Offload { device, pin_memory })
    })
}

fn read_zero(
    z: &mut Reader<'_>,
    unknown: &mut Vec<String>,
    warnings: &mut Vec<Warning>,
) -> Result<ZeroOptimization, ConfigError> {
    let d = ZeroOptimization::default();
    let stage = match z.u64("stage")? {
        None => 0,
        Some(s @ 0..=3) => s as u8,
        Some(s) => return Err(z.err("stage", format!("expected 0, 1, 2 or 3, got {s}"))),
    };
    let mut offload_optimizer = read_offload(z, "offload_optimizer", warnings, unknown)?;
    let mut offload_param = read_offload(z, "offload_param", warnings, unknown)?;
    // Deprecated spellings DeepSpeed still reads.
    if let Some(true) = z.bool("cpu_offload")? {
        if offload_optimizer.is_some() {
            return Err(z.err(
                "cpu_offload",
                "give either cpu_offload (deprecated) or offload_optimizer, not both",
            ));
        }
        offload_optimizer = Some(Offload {
            device: OffloadDevice::Cpu,
            pin_memory: false,
        });
    }
    if let Some(true) = z.bool("cpu_offload_params")? {
        if offload_param.is_some() {
            return Err(z.err(
                "cpu_offload_params",
                "give either cpu_offload_params (deprecated) or offload_param, not both",
            ));
        }
        offload_param = Some(Offload {
            device: OffloadDevice::Cpu,
            pin_memory: false,
        });
    }
    // Present in the file (whatever the value, "auto" included): warned below at stage 3.
    let stage3_unused: Vec<&str> = [
        "stage3_param_persistence_threshold",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
    ]
    .into_iter()
    .filter(|k| z.has(k))
    .collect();
    let gather_key = if z.has("stage3_gather_16bit_weights_on_model_save") {
        "stage3_gather_16bit_weights_on_model_save"
    } else {
        "stage3_gather_fp16_weights_on_model_save"
    };
    let out = ZeroOptimization {
        stage,
        offload_optimizer,
        offload_param,
        overlap_comm: z.bool("overlap_comm")?,
        contiguous_gradients: z
            .bool("contiguous_gradients")?
            .unwrap_or(d.contiguous_gradients),
        reduce_scatter: z.bool("reduce_scatter")?.unwrap_or(d.reduce_scatter),
        reduce_bucket_size: z
            .auto_u64("reduce_bucket_size")?
            .unwrap_or(d.reduce_bucket_size),
        allgather_bucket_size: z
            .u64("allgather_bucket_size")?
            .unwrap_or(d.allgather_bucket_size),
        allgather_partitions: z
            .bool("allgather_partitions")?
            .unwrap_or(d.allgather_partitions),
        stage3_prefetch_bucket_size: z
            .auto_u64("stage3_prefetch_bucket_size")?
            .unwrap_or(d.stage3_prefetch_bucket_size),
        stage3_param_persistence_threshold: z
            .auto_u64("stage3_param_persistence_threshold")?
            .unwrap_or(d.stage3_param_persistence_threshold),
        stage3_max_live_parameters: z
            .u64("stage3_max_live_parameters")?
            .unwrap_or(d.stage3_max_live_parameters),
        stage3_max_reuse_distance: z
            .u64("stage3_max_reuse_distance")?
            .unwrap_or(d.stage3_max_reuse_distance),
        stage3_gather_16bit_weights_on_model_save: z
            .bool(gather_key)?
            .unwrap_or(d.stage3_gather_16bit_weights_on_model_save),
        sub_group_size: z.u64("sub_group_size")?.unwrap_or(d.sub_group_size),
        round_robin_gradients: z
            .bool("round_robin_gradients")?
            .unwrap_or(d.round_robin_gradients),
    };
    for (key, size) in [
        ("reduce_bucket_size", out.reduce_bucket_size.explicit()),
        ("allgather_bucket_size", Some(out.allgather_bucket_size)),
    ] {
        if size == Some(0) {
            return Err(z.err(key, "must be at least 1"));
        }
    }
    if let Some(o) = &out.offload_optimizer
        && o.is_cpu()
        && stage == 0
    {
        return Err(z.err(
            "offload_optimizer",
            "offloading the optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)",
        ));
    }
    // Accepted, without effect in our engine: named once at start. Values equal to what the
    // engine always does are silent.
    if let Some(o) = &out.offload_param
        && o.is_cpu()
        && stage < 3
    {
        warnings.push(Warning::new(
            z.path("offload_param"),
            "no effect below stage 3 (as in DeepSpeed)",
        ));
    }
    for (key, no_effect) in [
        ("contiguous_gradients", !out.contiguous_gradients),
        ("allgather_partitions", !out.allgather_partitions),
        ("round_robin_gradients", out.round_robin_gradients),
        ("sub_group_size", out.sub_group_size != d.sub_group_size),
    ] {
        if no_effect {
            warnings.push(Warning::no_effect(z.path(key)));
        }
    }
    if !out.reduce_scatter && (1..=2).contains(&stage) {
        warnings.push(Warning::new(
            z.path("reduce_scatter"),
            "accepted, no effect in Ringmaster: ZeRO-1/2 always reduce-scatter the gradients",
        ));
    }
    if stage == 3 {
        for key in stage3_unused {
            let why = if key == "stage3_param_persistence_threshold" {
                "every parameter is sharded in its block's flat unit; none stays whole"
            } else {
                "at most two gathered units are live (the one computing and the one \
                 prefetched), and a unit is gathered again for its backward"
            };
            warnings.push(Warning::new(
                z.path(key),
                format!("accepted, no effect in Ringmaster: {why}"),
            ));
        }
    }
    if out.stage3_gather_16bit_weights_on_model_save {
        warnings.push(Warning::new(
            z.path(gather_key),
            "accepted, no effect in Ringmaster: `ringctl export` writes the consolidated model",
        ));
    }
    for k in NO_EFFECT_ZERO {
        if z.has(k) {
            z.mark(k);
            warnings.push(Warning::no_effect(z.path(k)));
        }
    }
    Ok(out)
}

fn read_optimizer(
    o: &mut Reader<'_>,
    unknown: &mut Vec<String>,
    warnings: &mut Vec<Warning>,
) -> Result<OptimizerBlock, ConfigError> {
    let kind = o.string("type")?.ok_or_else(|| o.err("type", "missing"))?;
    if !["adam", "adamw"].contains(&kind.to_ascii_lowercase().as_str()) {
        return Err(o.err(
            "type",
            format!("'{kind}' is not supported: Ringmaster trains with AdamW (Adam, AdamW)"),
        ));
    }
    let mut out = OptimizerBlock {
        kind,
        lr: None,
        betas: None,
        eps: None,
        weight_decay: None,
    };
    o.nested("params", unknown, |p, _| {
        out.lr = p.auto_f64("lr")?;
        out.eps = p.auto_f64("eps")?;
        out.weight_decay = p.auto_f64("weight_decay")?;
        out.betas = match p.take("betas") {
            None => None,
            Some(Value::String(s)) if s == "auto" => Some(Auto::Auto),
            Some(Value::Array(v)) if v.len() == 2 && v.iter().all(|x| x.as_f64().is_some()) => {
                Some(Auto::Set((
                    v[0].as_f64().unwrap_or_default(),
                    v[1].as_f64().unwrap_or_default(),
                )))
            }
            Some(v) => {
                return Err(p.err(
                    "betas",
                    format!("expected [beta1, beta2] or \"auto\", got {}", show(v)),
                ));
            }
        };
        if p.bool("adam_w_mode")? == Some(false) {
            return Err(p.err(
                "adam_w_mode",
                "false (Adam with L2 regularisation) is not supported: Ringmaster trains with AdamW",
            ));
        }
        if p.bool("amsgrad")? == Some(true) {
            return Err(p.err("amsgrad", "AMSGrad is not supported"));
        }
        if p.bool("bias_correction")? == Some(false) {
            return Err(p.err("bias_correction", "false is not supported"));
        }
        if p.take("torch_adam").is_some() {
            warnings.push(Warning::no_effect(p.path("torch_adam")));
        }
        Ok(())
    })?;
    Ok(out)
}

fn read_scheduler(
    s: &mut Reader<'_>,
    unknown: &mut Vec<String>,
    warnings: &mut Vec<Warning>,
) -> Result<SchedulerBlock, ConfigError> {
    let kind = s.string("type")?.ok_or_else(|| s.err("type", "missing"))?;
    let lr_scheduler_type = match kind.as_str() {
        "WarmupLR" => "constant_with_warmup",
        "WarmupDecayLR" => "linear",
        "WarmupCosineLR" => "cosine",
        other => {
            return Err(s.err(
                "type",
                format!(
                    "'{other}' is not supported; use WarmupLR, WarmupDecayLR or WarmupCosineLR \
                     (or lr_scheduler_type in the training config)"
                ),
            ));
        }
    };
    let mut out = SchedulerBlock {
        kind,
        lr_scheduler_type,
        warmup_max_lr: None,
    };
    s.nested("params", unknown, |p, _| {
        out.warmup_max_lr = p.auto_f64("warmup_max_lr")?;
        for k in [
            "warmup_min_lr",
            "warmup_num_steps",
            "total_num_steps",
            "warmup_type",
            "cos_min_ratio",
            "warmup_min_ratio",
            "last_batch_iteration",
        ] {
            if let Some(v) = p.take(k)
                && v != &Value::String("auto".into())
            {
                warnings.push(Warning::new(
                    p.path(k),
                    "accepted, no effect in Ringmaster: warmup and total steps come from the \
                     training config",
                ));
            }
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<DeepSpeedConfig, ConfigError> {
        DeepSpeedConfig::from_value(&v)
    }

    #[test]
    fn reads_numbers_autos_and_deepspeed_defaults() {
        let ds = parse(json!({
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": 0.5,
            "fp16": {"enabled": true, "loss_scale": 0, "initial_scale_power": 12},
            "zero_optimization": {
                "stage": 2, "reduce_bucket_size": 2e8, "allgather_bucket_size": 200000000,
                "overlap_comm": true, "offload_optimizer": {"device": "cpu", "pin_memory": true}
            }
        }))
        .unwrap();
        assert_eq!(ds.train_micro_batch_size_per_gpu, Some(Auto::Set(2)));
        assert_eq!(ds.gradient_accumulation_steps, Some(Auto::Auto));
        assert_eq!(ds.train_batch_size, None);
        assert_eq!(ds.gradient_clipping, Some(Auto::Set(0.5)));
        let f = ds.fp16.unwrap();
        assert_eq!(f.enabled, Auto::Set(true));
        assert_eq!(
            (f.initial_scale_power, f.loss_scale_window, f.hysteresis),
            (12, 1000, 2)
        );
        assert_eq!(ds.bf16, None);
        let z = &ds.zero_optimization;
        assert_eq!(z.stage, 2);
        assert_eq!(z.reduce_bucket_size, Auto::Set(200_000_000));
        assert_eq!(z.allgather_bucket_size, 200_000_000);
        assert_eq!(z.overlap_comm, Some(true));
        assert_eq!(
            z.offload_optimizer,
            Some(Offload {
                device: OffloadDevice::Cpu,
                pin_memory: true
            })
        );
        assert_eq!(z.stage3_prefetch_bucket_size, Auto::Set(50_000_000));
        // overlap_comm is honoured at every stage (stages 0–2: unit-by-unit reduction).
        let lines = crate::warning_lines(&ds.warnings);
        assert!(lines.is_empty(), "{lines:?}");
        // An empty mapping is DeepSpeed's defaults: stage 0.
        assert_eq!(parse(json!({})).unwrap().stage(), 0);
    }

    #[test]
    fn unknown_keys_are_all_listed_with_their_paths() {
        let err = parse(json!({
            "train_batch_sise": 8,
            "zero_optimization": {"stage": 3, "stage3_prefetch": 1, "offload_param": {"devic": "cpu"}},
            "fp16": {"enabled": "auto", "scale": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "momentum": 0.9}},
            "pipeline_parallel": {}
        }))
        .unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnknownKeysIn {
                file: FILE.into(),
                keys: vec![
                    "fp16.scale".into(),
                    "optimizer.params.momentum".into(),
                    "pipeline_parallel".into(),
                    "train_batch_sise".into(),
                    "zero_optimization.offload_param.devic".into(),
                    "zero_optimization.stage3_prefetch".into(),
                ]
            }
        );
        assert!(
            err.to_string()
                .starts_with("deepspeed config has unknown key(s): fp16.scale, ")
        );
    }

    #[test]
    fn no_effect_keys_become_warnings() {
        let ds = parse(json!({
            "steps_per_print": 10,
            "wall_clock_breakdown": false,
            "tensorboard": {"enabled": true},
            "zero_optimization": {
                "stage": 2, "contiguous_gradients": false, "round_robin_gradients": true,
                "allgather_partitions": true, "sub_group_size": 1e9, "elastic_checkpoint": true,
                "offload_param": {"device": "cpu"},
                "offload_optimizer": {"device": "cpu", "buffer_count": 4}
            },
            "bf16": {"enabled": true, "immediate_grad_update": true}
        }))
        .unwrap();
        let keys: Vec<&str> = ds.warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "bf16.immediate_grad_update",
                "steps_per_print",
                "tensorboard",
                "wall_clock_breakdown",
                "zero_optimization.contiguous_gradients",
                "zero_optimization.elastic_checkpoint",
                "zero_optimization.offload_optimizer.buffer_count",
                "zero_optimization.offload_param",
                "zero_optimization.round_robin_gradients",
            ]
        );
        let lines = crate::warning_lines(&ds.warnings);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].starts_with("zero_optimization.offload_param: no effect below stage 3"));
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                json!({"zero_optimization": {"stage": 4}}),
                "zero_optimization.stage",
            ),
            (
                json!({"zero_optimization": {"stage": "3"}}),
                "zero_optimization.stage",
            ),
            (
                json!({"zero_optimization": {"reduce_bucket_size": 1.5}}),
                "zero_optimization.reduce_bucket_size",
            ),
            (
                json!({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}),
                "zero_optimization.offload_param.device",
            ),
            (
                json!({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}),
                "zero_optimization.offload_optimizer",
            ),
            (
                json!({"train_micro_batch_size_per_gpu": 0}),
                "train_micro_batch_size_per_gpu",
            ),
            (json!({"train_batch_size": "5e8"}), "train_batch_size"),
            (json!({"gradient_clipping": -1}), "gradient_clipping"),
            (json!({"fp16": {"enabled": "yes"}}), "fp16.enabled"),
            (
                json!({"fp16": {"enabled": true}, "bf16": {"enabled": true}}),
                "fp16.enabled",
            ),
            (json!({"optimizer": {"type": "Lamb"}}), "optimizer.type"),
            (
                json!({"optimizer": {"type": "Adam", "params": {"adam_w_mode": false}}}),
                "optimizer.params.adam_w_mode",
            ),
            (json!({"scheduler": {"type": "OneCycle"}}), "scheduler.type"),
            (json!({"amp": {"enabled": true}}), "amp.enabled"),
            (json!({"zero_optimization": 3}), "zero_optimization"),
        ];
        for (v, field) in cases {
            match parse(v.clone()) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{v}"),
                other => panic!("{v}: expected an error on {field}, got {other:?}"),
            }
        }
        assert!(matches!(
            DeepSpeedConfig::from_json("{\"stage\": "),
            Err(ConfigError::FileSyntax { .. })
        ));
    }

    #[test]
    fn deprecated_offload_spellings_and_bf16_alias() {
        let ds = parse(json!({
            "bfloat16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "cpu_offload": true, "cpu_offload_params": true,
                                  "stage3_gather_fp16_weights_on_model_save": false}
        }))
        .unwrap();
        assert_eq!(ds.bf16, Some(Auto::Auto));
        assert!(ds.zero_optimization.offload_optimizer.unwrap().is_cpu());
        assert!(ds.zero_optimization.offload_param.unwrap().is_cpu());
    }
}
