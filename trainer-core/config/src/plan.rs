//! The engine's plan: what is sharded, what is offloaded, the precision, the batch and the
//! communication buckets, resolved from a training config and the DeepSpeed / FSDP file it names.
//!
//! DESIGN.md: one sharded data-parallel engine; DDP = ZeRO-0 = NO_SHARD; ZeRO-1; ZeRO-2 =
//! SHARD_GRAD_OP; ZeRO-3 = FULL_SHARD; HYBRID_SHARD = FULL_SHARD inside a node, replicated
//! across nodes; offload_optimizer (fp32 master and optimizer state on the host, the step on the
//! host); offload_param (stage 3: parameter shards on the host between uses).
//!
//! `"auto"` values are resolved by the HF Trainer rules (transformers' `HfTrainerDeepSpeedConfig`):
//! micro batch = `per_device_train_batch_size`, accumulation = `gradient_accumulation_steps`,
//! train batch = world × micro × accumulation, clipping = `max_grad_norm`, fp16/bf16 from the
//! training config, `reduce_bucket_size` = hidden², and at stage 3
//! `stage3_prefetch_bucket_size` = int(0.9·hidden²) and
//! `stage3_param_persistence_threshold` = 10·hidden. An explicit value that contradicts the
//! training config is an error naming both values. Where the training config is silent, an
//! explicit DeepSpeed value is used (DeepSpeed's own batch arithmetic fills the rest), and what
//! neither gives takes the HF Trainer defaults ([`DEFAULT_MICRO_BATCH`], ...).

use serde::Serialize;

use crate::accelerate::{
    self, AccelerateConfig, BackwardPrefetch, DistributedType, FsdpConfig, Launcher,
    MixedPrecision, ShardingStrategy,
};
use crate::deepspeed::{self, DeepSpeedConfig};
use crate::reader::Auto;
use crate::{ConfigError, TrainConfig, Warning};

/// HF `TrainingArguments.per_device_train_batch_size` default.
pub const DEFAULT_MICRO_BATCH: u32 = 8;
/// HF `TrainingArguments.gradient_accumulation_steps` default.
pub const DEFAULT_GRAD_ACCUM: u32 = 1;
/// HF `TrainingArguments.max_grad_norm` default.
pub const DEFAULT_MAX_GRAD_NORM: f64 = 1.0;

/// fp16 loss scaling, as DeepSpeed does it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum LossScale {
    /// Start at 2^initial_scale_power; halve on overflow once `hysteresis` overflows are seen;
    /// double after `loss_scale_window` clean steps; never below `min_loss_scale`.
    Dynamic {
        initial_scale_power: u32,
        loss_scale_window: u32,
        hysteresis: u32,
        consecutive_hysteresis: bool,
        min_loss_scale: f64,
    },
    Static(f64),
}

impl Default for LossScale {
    /// DeepSpeed's defaults.
    fn default() -> LossScale {
        LossScale::from_block(&deepspeed::Fp16::default())
    }
}

impl LossScale {
    fn from_block(f: &deepspeed::Fp16) -> LossScale {
        if f.loss_scale > 0.0 {
            LossScale::Static(f.loss_scale)
        } else {
            LossScale::Dynamic {
                initial_scale_power: f.initial_scale_power,
                loss_scale_window: f.loss_scale_window,
                hysteresis: f.hysteresis,
                consecutive_hysteresis: f.consecutive_hysteresis,
                min_loss_scale: f.min_loss_scale,
            }
        }
    }
}

/// Compute precision; the optimizer's master weights and state are always fp32 (DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16(LossScale),
}

impl Precision {
    pub fn name(&self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16(_) => "fp16",
        }
    }
}

/// Which file the plan came from (it picks the naming of [`Plan::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PlanSource {
    /// Neither file: DDP, as torchrun with the HF Trainer.
    Default,
    DeepSpeed,
    Fsdp,
}

/// AdamW hyper-parameters a DeepSpeed `optimizer` block or the training config gives; `None`:
/// the trainer's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct OptimizerSettings {
    pub lr: Option<f64>,
    pub betas: Option<(f64, f64)>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
}

/// What the engine does.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// fp32 master weights and AdamW state sharded (ZeRO-1 and up).
    pub shard_optimizer: bool,
    /// Gradients reduce-scattered and kept sharded (ZeRO-2 and up).
    pub shard_gradients: bool,
    /// Parameters sharded, gathered unit by unit (ZeRO-3).
    pub shard_params: bool,
    /// Shard within a node, replicate across nodes (HYBRID_SHARD, _HYBRID_SHARD_ZERO2).
    pub hybrid: bool,
    /// fp32 master and optimizer state on the host, the step on the host.
    pub offload_optimizer: bool,
    /// Parameter shards on the host between uses (stage 3 only).
    pub offload_param: bool,
    /// Offload buffers in pinned memory.
    pub pin_memory: bool,
    pub precision: Precision,
    /// Global-norm clipping; `None`: off.
    pub clip: Option<f64>,
    pub micro_batch: u32,
    pub grad_accum: u32,
    /// Ranks in all.
    pub world: usize,
    /// Ranks per node (the hybrid shard group).
    pub gpus_per_node: usize,
    pub overlap_comm: bool,
    pub reduce_scatter: bool,
    /// Elements per gradient bucket; `None`: `"auto"` not resolved yet (hidden size unknown).
    pub reduce_bucket_size: Option<u64>,
    /// Elements per all-gather bucket.
    pub allgather_bucket_size: u64,
    /// Elements prefetched ahead (stage 3); `None`: `"auto"` not resolved yet.
    pub prefetch_bucket_size: Option<u64>,
    /// Parameters with fewer elements stay unsharded (stage 3); `None`: `"auto"` not resolved.
    pub param_persistence_threshold: Option<u64>,
    pub max_live_parameters: u64,
    pub max_reuse_distance: u64,
    pub forward_prefetch: bool,
    pub backward_prefetch: BackwardPrefetch,
    /// Rank 0's weights are broadcast to the others at start.
    pub sync_module_states: bool,
    /// Only rank 0 reads the weights from disk (requires `sync_module_states`).
    pub cpu_ram_efficient_loading: bool,
    pub optimizer: OptimizerSettings,
    /// A schedule named by the DeepSpeed `scheduler` block (LLaMA-Factory name) or the training
    /// config.
    pub lr_scheduler_type: Option<String>,
    pub source: PlanSource,
    /// Dotted keys left `"auto"` because the model's hidden size was not known; see
    /// [`Plan::resolve_hidden`].
    pub unresolved_auto: Vec<String>,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan::ddp()
    }
}

const PRESET_SOURCE: PlanSource = PlanSource::Default;

impl Plan {
    /// DDP (ZeRO-0, NO_SHARD): one rank, HF defaults, DeepSpeed's default buckets.
    pub fn ddp() -> Plan {
        let z = deepspeed::ZeroOptimization::default();
        Plan {
            shard_optimizer: false,
            shard_gradients: false,
            shard_params: false,
            hybrid: false,
            offload_optimizer: false,
            offload_param: false,
            pin_memory: false,
            precision: Precision::Fp32,
            clip: Some(DEFAULT_MAX_GRAD_NORM),
            micro_batch: DEFAULT_MICRO_BATCH,
            grad_accum: DEFAULT_GRAD_ACCUM,
            world: 1,
            gpus_per_node: 1,
            overlap_comm: false,
            reduce_scatter: z.reduce_scatter,
            reduce_bucket_size: z.reduce_bucket_size.explicit(),
            allgather_bucket_size: z.allgather_bucket_size,
            prefetch_bucket_size: z.stage3_prefetch_bucket_size.explicit(),
            param_persistence_threshold: z.stage3_param_persistence_threshold.explicit(),
            max_live_parameters: z.stage3_max_live_parameters,
            max_reuse_distance: z.stage3_max_reuse_distance,
            forward_prefetch: false,
            backward_prefetch: BackwardPrefetch::BackwardPre,
            sync_module_states: true,
            cpu_ram_efficient_loading: false,
            optimizer: OptimizerSettings::default(),
            lr_scheduler_type: None,
            source: PRESET_SOURCE,
            unresolved_auto: Vec::new(),
        }
    }

    /// The plan of ZeRO stage 0–3 (no offload).
    pub fn zero(stage: u8) -> Plan {
        Plan {
            shard_optimizer: stage >= 1,
            shard_gradients: stage >= 2,
            shard_params: stage >= 3,
            overlap_comm: stage >= 3,
            ..Plan::ddp()
        }
    }

    /// ZeRO-1: optimizer state sharded.
    pub fn zero1() -> Plan {
        Plan::zero(1)
    }

    /// ZeRO-2 (SHARD_GRAD_OP): optimizer state and gradients sharded.
    pub fn zero2() -> Plan {
        Plan::zero(2)
    }

    /// ZeRO-3 (FULL_SHARD): everything sharded.
    pub fn zero3() -> Plan {
        Plan::zero(3)
    }

    /// The plan of an FSDP sharding strategy.
    pub fn fsdp(strategy: ShardingStrategy) -> Plan {
        let (stage, hybrid) = match strategy {
            ShardingStrategy::NoShard => (0, false),
            ShardingStrategy::ShardGradOp => (2, false),
            ShardingStrategy::FullShard => (3, false),
            ShardingStrategy::HybridShard => (3, true),
            ShardingStrategy::HybridShardZero2 => (2, true),
        };
        Plan {
            hybrid,
            source: PlanSource::Fsdp,
            ..Plan::zero(stage)
        }
    }

    /// HYBRID_SHARD: FULL_SHARD inside a node, replicated across nodes.
    pub fn hybrid_shard() -> Plan {
        Plan {
            source: PRESET_SOURCE,
            ..Plan::fsdp(ShardingStrategy::HybridShard)
        }
    }

    /// With fp32 master and optimizer state on the host.
    pub fn with_offload_optimizer(self) -> Plan {
        Plan {
            offload_optimizer: true,
            ..self
        }
    }

    /// With parameter shards on the host (meaningful at stage 3 only).
    pub fn with_offload_param(self) -> Plan {
        Plan {
            offload_param: true,
            ..self
        }
    }

    /// ZeRO stage 0–3 of the sharding.
    pub fn stage(&self) -> u8 {
        if self.shard_params {
            3
        } else if self.shard_gradients {
            2
        } else if self.shard_optimizer {
            1
        } else {
            0
        }
    }

    /// The FSDP strategy with the same sharding (ZeRO-1 has none).
    pub fn fsdp_strategy(&self) -> Option<ShardingStrategy> {
        match (self.stage(), self.hybrid) {
            (0, _) => Some(ShardingStrategy::NoShard),
            (1, _) => None,
            (2, false) => Some(ShardingStrategy::ShardGradOp),
            (2, true) => Some(ShardingStrategy::HybridShardZero2),
            (_, false) => Some(ShardingStrategy::FullShard),
            (_, true) => Some(ShardingStrategy::HybridShard),
        }
    }

    fn offload_suffix(&self) -> &'static str {
        match (
            self.offload_optimizer,
            self.offload_param && self.shard_params,
        ) {
            (false, false) => "",
            (true, false) => " + offload optimizer",
            (false, true) => " + offload params",
            (true, true) => " + offload optimizer + params",
        }
    }

    /// DeepSpeed-style name: "DDP (ZeRO-0)", "ZeRO-1", "ZeRO-2 + offload optimizer", "ZeRO-3 +
    /// offload optimizer + params", "HYBRID_SHARD", ...
    pub fn zero_label(&self) -> String {
        let base = match (self.stage(), self.hybrid) {
            (0, _) => "DDP (ZeRO-0)".to_owned(),
            (s, false) => format!("ZeRO-{s}"),
            (2, true) => "_HYBRID_SHARD_ZERO2 (ZeRO-2 within a node)".to_owned(),
            (_, true) => "HYBRID_SHARD (ZeRO-3 within a node)".to_owned(),
        };
        format!("{base}{}", self.offload_suffix())
    }

    /// The FSDP configuration with the same effect: the strategy name, with `+ offload_params`
    /// where FSDP's CPU offload matches (it keeps parameters and gradients on the host and
    /// steps there: ZeRO-3 + offload optimizer + params, or offload optimizer below stage 3).
    /// `None` where FSDP has no twin (ZeRO-1, ZeRO-3 + offload optimizer only).
    pub fn fsdp_equivalent(&self) -> Option<String> {
        let s = self.fsdp_strategy()?;
        match (
            self.offload_optimizer,
            self.offload_param && self.shard_params,
        ) {
            (false, false) => Some(s.name().to_owned()),
            (true, true) => Some(format!("{} + offload_params", s.name())),
            (true, false) if !self.shard_params => Some(format!("{} + offload_params", s.name())),
            _ => None,
        }
    }

    /// FSDP-style name: "FSDP FULL_SHARD", "FSDP FULL_SHARD + offload_params", ...
    pub fn fsdp_label(&self) -> Option<String> {
        self.fsdp_equivalent().map(|s| format!("FSDP {s}"))
    }

    /// The name users of the file it came from know it by.
    pub fn label(&self) -> String {
        match self.source {
            PlanSource::Fsdp => self.fsdp_label().unwrap_or_else(|| self.zero_label()),
            _ => self.zero_label(),
        }
    }

    /// Samples per optimizer step across all ranks.
    pub fn train_batch(&self) -> u64 {
        self.world as u64 * u64::from(self.micro_batch) * u64::from(self.grad_accum)
    }

    /// Ranks one shard group spans: the node for hybrid plans, all ranks otherwise.
    pub fn shard_group_size(&self) -> usize {
        if self.hybrid {
            self.gpus_per_node.min(self.world).max(1)
        } else {
            self.world
        }
    }

    /// Resolves the hidden-size `"auto"` values left open (HF rules).
    pub fn resolve_hidden(&mut self, hidden: usize) {
        let h = hidden as u64;
        for key in std::mem::take(&mut self.unresolved_auto) {
            match key.as_str() {
                "zero_optimization.reduce_bucket_size" => self.reduce_bucket_size = Some(h * h),
                "zero_optimization.stage3_prefetch_bucket_size" => {
                    self.prefetch_bucket_size = Some(prefetch_for_hidden(h));
                }
                "zero_optimization.stage3_param_persistence_threshold" => {
                    self.param_persistence_threshold = Some(10 * h);
                }
                _ => self.unresolved_auto.push(key),
            }
        }
    }
}

/// HF: `int(0.9 * hidden_size * hidden_size)` (float arithmetic, truncated).
pub fn prefetch_for_hidden(hidden: u64) -> u64 {
    (0.9 * hidden as f64 * hidden as f64) as u64
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} [{}; micro {} × accum {} × world {} = {}; clip {}]",
            self.label(),
            self.precision.name(),
            self.micro_batch,
            self.grad_accum,
            self.world,
            self.train_batch(),
            self.clip
                .map_or_else(|| "off".to_owned(), |c| c.to_string()),
        )
    }
}

fn mismatch(m: String) -> ConfigError {
    ConfigError::Mismatch(m)
}

/// An explicit DeepSpeed value against the training config's: both given and different is an
/// error naming both; otherwise the training config's, else DeepSpeed's.
fn agree_u(
    ds_key: &str,
    ds: Option<Auto<u64>>,
    train_key: &str,
    train: Option<u32>,
) -> Result<Option<u64>, ConfigError> {
    let d = ds.and_then(|a| a.explicit());
    match (d, train) {
        (Some(d), Some(t)) if d != u64::from(t) => Err(mismatch(format!(
            "deepspeed {ds_key} = {d} but {train_key} = {t}"
        ))),
        (d, t) => Ok(t.map(u64::from).or(d)),
    }
}

fn agree_f(
    ds_key: &str,
    ds: Option<Auto<f64>>,
    train_key: &str,
    train: Option<f64>,
) -> Result<Option<f64>, ConfigError> {
    let d = ds.and_then(|a| a.explicit());
    match (d, train) {
        (Some(d), Some(t)) if (d - t).abs() > 1e-12 * d.abs().max(t.abs()) => Err(mismatch(
            format!("deepspeed {ds_key} = {d} but {train_key} = {t}"),
        )),
        (d, t) => Ok(t.or(d)),
    }
}

fn to_u32(key: &str, v: u64) -> Result<u32, ConfigError> {
    u32::try_from(v).map_err(|_| ConfigError::Invalid {
        file: deepspeed::FILE.into(),
        field: key.into(),
        message: format!("{v} is too large"),
    })
}

/// Micro batch and accumulation by the HF rules, with DeepSpeed's batch arithmetic where the
/// training config is silent.
fn resolve_batch(
    train: &TrainConfig,
    ds: &DeepSpeedConfig,
    world: usize,
) -> Result<(u32, u32), ConfigError> {
    let micro = agree_u(
        "train_micro_batch_size_per_gpu",
        ds.train_micro_batch_size_per_gpu,
        "per_device_train_batch_size",
        train.per_device_train_batch_size,
    )?;
    let accum = agree_u(
        "gradient_accumulation_steps",
        ds.gradient_accumulation_steps,
        "gradient_accumulation_steps",
        train.gradient_accumulation_steps,
    )?;
    let w = world as u64;
    let tb = ds.train_batch_size.and_then(|a| a.explicit());
    let (micro, accum) = match (tb, micro, accum) {
        (None, m, a) => (
            m.unwrap_or(u64::from(DEFAULT_MICRO_BATCH)),
            a.unwrap_or(u64::from(DEFAULT_GRAD_ACCUM)),
        ),
        (Some(tb), Some(m), Some(a)) => {
            if tb != w * m * a {
                return Err(mismatch(format!(
                    "deepspeed train_batch_size {tb} != world {w} × micro {m} × accum {a} = {} \
                     (micro: per_device_train_batch_size, accum: gradient_accumulation_steps)",
                    w * m * a
                )));
            }
            (m, a)
        }
        (Some(tb), Some(m), None) => {
            if !tb.is_multiple_of(w * m) {
                return Err(mismatch(format!(
                    "deepspeed train_batch_size {tb} is not a multiple of world {w} × micro {m} = {}",
                    w * m
                )));
            }
            (m, tb / (w * m))
        }
        (Some(tb), None, Some(a)) => {
            if !tb.is_multiple_of(w * a) {
                return Err(mismatch(format!(
                    "deepspeed train_batch_size {tb} is not a multiple of world {w} × accum {a} = {}",
                    w * a
                )));
            }
            (tb / (w * a), a)
        }
        (Some(tb), None, None) => {
            if !tb.is_multiple_of(w) {
                return Err(mismatch(format!(
                    "deepspeed train_batch_size {tb} is not a multiple of world {w}"
                )));
            }
            (tb / w, 1)
        }
    };
    Ok((
        to_u32("train_micro_batch_size_per_gpu", micro)?,
        to_u32("gradient_accumulation_steps", accum)?,
    ))
}

fn clip_of(v: f64) -> Option<f64> {
    (v > 0.0).then_some(v)
}

fn train_precision(train: &TrainConfig) -> Precision {
    if train.bf16 == Some(true) {
        Precision::Bf16
    } else if train.fp16 == Some(true) {
        Precision::Fp16(LossScale::default())
    } else {
        Precision::Fp32
    }
}

/// `fp16.enabled` / `bf16.enabled` against the training config's `fp16` / `bf16`.
fn ds_flag(
    key: &str,
    ds: Option<Auto<bool>>,
    train_key: &str,
    train: Option<bool>,
    other_key: &str,
    other: Option<bool>,
) -> Result<Option<bool>, ConfigError> {
    match ds {
        None => Ok(None),
        Some(Auto::Auto) => Ok(Some(train == Some(true))),
        Some(Auto::Set(b)) => {
            if let Some(t) = train
                && t != b
            {
                return Err(mismatch(format!(
                    "deepspeed {key} = {b} but {train_key} = {t}"
                )));
            }
            if b && other == Some(true) {
                return Err(mismatch(format!(
                    "deepspeed {key} = true but {other_key} = true"
                )));
            }
            Ok(Some(b))
        }
    }
}

fn plan_from_deepspeed(
    train: &TrainConfig,
    ds: &DeepSpeedConfig,
    world: usize,
    hidden: Option<usize>,
    warnings: &mut Vec<Warning>,
) -> Result<Plan, ConfigError> {
    let z = &ds.zero_optimization;
    let stage = z.stage;
    let mut plan = Plan::zero(stage);
    plan.source = PlanSource::DeepSpeed;
    let (micro, accum) = resolve_batch(train, ds, world)?;
    plan.micro_batch = micro;
    plan.grad_accum = accum;
    let clip = agree_f(
        "gradient_clipping",
        ds.gradient_clipping,
        "max_grad_norm",
        train.max_grad_norm,
    )?;
    plan.clip = clip_of(clip.unwrap_or(DEFAULT_MAX_GRAD_NORM));

    let fp16 = ds_flag(
        "fp16.enabled",
        ds.fp16.map(|f| f.enabled),
        "fp16",
        train.fp16,
        "bf16",
        train.bf16,
    )?;
    let bf16 = ds_flag(
        "bf16.enabled",
        ds.bf16,
        "bf16",
        train.bf16,
        "fp16",
        train.fp16,
    )?;
    let fp16 = fp16.unwrap_or(train.fp16 == Some(true));
    let bf16 = bf16.unwrap_or(train.bf16 == Some(true));
    plan.precision = match (fp16, bf16) {
        (true, true) => {
            return Err(mismatch(
                "deepspeed fp16 and bf16 both resolve to enabled".to_owned(),
            ));
        }
        (true, false) => Precision::Fp16(
            ds.fp16
                .as_ref()
                .map(LossScale::from_block)
                .unwrap_or_default(),
        ),
        (false, true) => Precision::Bf16,
        (false, false) => Precision::Fp32,
    };

    plan.offload_optimizer = stage >= 1 && z.offload_optimizer.is_some_and(|o| o.is_cpu());
    plan.offload_param = stage == 3 && z.offload_param.is_some_and(|o| o.is_cpu());
    plan.pin_memory = [z.offload_optimizer, z.offload_param]
        .iter()
        .flatten()
        .any(|o| o.is_cpu() && o.pin_memory);
    plan.overlap_comm = z.overlap_comm.unwrap_or(stage == 3);
    plan.reduce_scatter = z.reduce_scatter;
    plan.allgather_bucket_size = z.allgather_bucket_size;
    plan.max_live_parameters = z.stage3_max_live_parameters;
    plan.max_reuse_distance = z.stage3_max_reuse_distance;

    let h = hidden.map(|h| h as u64);
    let unresolved = |key: &str, plan: &mut Plan| {
        plan.unresolved_auto
            .push(format!("zero_optimization.{key}"));
        None
    };
    plan.reduce_bucket_size = match (z.reduce_bucket_size, h) {
        (Auto::Set(v), _) => Some(v),
        (Auto::Auto, Some(h)) => Some(h * h),
        (Auto::Auto, None) => unresolved("reduce_bucket_size", &mut plan),
    };
    let defaults = deepspeed::ZeroOptimization::default();
    plan.prefetch_bucket_size = match (z.stage3_prefetch_bucket_size, h) {
        (Auto::Set(v), _) => Some(v),
        (Auto::Auto, _) if stage < 3 => defaults.stage3_prefetch_bucket_size.explicit(),
        (Auto::Auto, Some(h)) => Some(prefetch_for_hidden(h)),
        (Auto::Auto, None) => unresolved("stage3_prefetch_bucket_size", &mut plan),
    };
    plan.param_persistence_threshold = match (z.stage3_param_persistence_threshold, h) {
        (Auto::Set(v), _) => Some(v),
        (Auto::Auto, _) if stage < 3 => defaults.stage3_param_persistence_threshold.explicit(),
        (Auto::Auto, Some(h)) => Some(10 * h),
        (Auto::Auto, None) => unresolved("stage3_param_persistence_threshold", &mut plan),
    };
    for key in &plan.unresolved_auto {
        warnings.push(Warning::new(
            key.clone(),
            "\"auto\" left unresolved: the model's hidden_size is not known here (resolved from \
             it when the model is loaded)",
        ));
    }

    if let Some(o) = &ds.optimizer {
        plan.optimizer.lr = agree_f(
            "optimizer.params.lr",
            o.lr,
            "learning_rate",
            train.learning_rate,
        )?;
        plan.optimizer.weight_decay = agree_f(
            "optimizer.params.weight_decay",
            o.weight_decay,
            "weight_decay",
            train.weight_decay,
        )?;
        plan.optimizer.betas = o.betas.and_then(|b| b.explicit());
        plan.optimizer.eps = o.eps.and_then(|e| e.explicit());
    } else {
        plan.optimizer.lr = train.learning_rate;
        plan.optimizer.weight_decay = train.weight_decay;
    }
    plan.lr_scheduler_type = train.lr_scheduler_type.clone();
    if let Some(s) = &ds.scheduler {
        if let Some(t) = &train.lr_scheduler_type
            && t != s.lr_scheduler_type
        {
            return Err(mismatch(format!(
                "deepspeed scheduler.type = {} ({}) but lr_scheduler_type = {t}",
                s.kind, s.lr_scheduler_type
            )));
        }
        let lr = agree_f(
            "scheduler.params.warmup_max_lr",
            s.warmup_max_lr,
            "learning_rate",
            plan.optimizer.lr,
        )?;
        plan.optimizer.lr = lr;
        plan.lr_scheduler_type = Some(s.lr_scheduler_type.to_owned());
    }
    warnings.extend(ds.warnings.iter().cloned());
    Ok(plan)
}

/// The cluster and the training config against an accelerate launcher section; returns the
/// precision the launcher asks for, if any.
fn check_launcher(
    l: &Launcher,
    train: &TrainConfig,
    world: usize,
    gpus_per_node: usize,
) -> Result<Option<Precision>, ConfigError> {
    if let Some(n) = l.num_processes
        && n != world as u64
    {
        return Err(mismatch(format!(
            "accelerate num_processes = {n} but the cluster's world size = {world}"
        )));
    }
    let nodes = world.div_ceil(gpus_per_node);
    if let Some(m) = l.num_machines
        && m != nodes as u64
    {
        return Err(mismatch(format!(
            "accelerate num_machines = {m} but the cluster has {nodes} node(s) \
             ({world} ranks, {gpus_per_node} per node)"
        )));
    }
    if l.distributed_type == DistributedType::No && world > 1 {
        return Err(mismatch(format!(
            "accelerate distributed_type = NO (one process) but the cluster's world size = {world}"
        )));
    }
    match l.mixed_precision {
        None | Some(MixedPrecision::No) => Ok(None),
        Some(mp) => {
            let (want_key, want, other_key, other) = match mp {
                MixedPrecision::Fp16 => ("fp16", train.fp16, "bf16", train.bf16),
                _ => ("bf16", train.bf16, "fp16", train.fp16),
            };
            if want == Some(false) {
                return Err(mismatch(format!(
                    "accelerate mixed_precision = {} but {want_key} = false",
                    mp.name()
                )));
            }
            if other == Some(true) {
                return Err(mismatch(format!(
                    "accelerate mixed_precision = {} but {other_key} = true",
                    mp.name()
                )));
            }
            Ok(Some(if mp == MixedPrecision::Fp16 {
                Precision::Fp16(LossScale::default())
            } else {
                Precision::Bf16
            }))
        }
    }
}

fn plan_from_fsdp(
    train: &TrainConfig,
    f: &FsdpConfig,
    world: usize,
    gpus_per_node: usize,
    warnings: &mut Vec<Warning>,
) -> Result<Plan, ConfigError> {
    let mut plan = Plan::fsdp(f.sharding_strategy);
    plan.precision = train_precision(train);
    if let Some(l) = &f.launcher
        && let Some(p) = check_launcher(l, train, world, gpus_per_node)?
    {
        plan.precision = p;
    }
    plan.micro_batch = train
        .per_device_train_batch_size
        .unwrap_or(DEFAULT_MICRO_BATCH);
    plan.grad_accum = train
        .gradient_accumulation_steps
        .unwrap_or(DEFAULT_GRAD_ACCUM);
    plan.clip = clip_of(train.max_grad_norm.unwrap_or(DEFAULT_MAX_GRAD_NORM));
    if f.offload_params {
        // FSDP's CPU offload keeps parameters and gradients on the host and steps there.
        plan.offload_optimizer = true;
        plan.offload_param = plan.shard_params;
        if !plan.shard_params {
            warnings.push(Warning::new(
                "fsdp_offload_params",
                format!(
                    "with {} the parameters stay on the device; the optimizer state and step \
                     are offloaded (as DeepSpeed's offload_optimizer)",
                    f.sharding_strategy.name()
                ),
            ));
        }
    }
    plan.forward_prefetch = f.forward_prefetch;
    plan.backward_prefetch = f.backward_prefetch.unwrap_or(BackwardPrefetch::BackwardPre);
    plan.sync_module_states = f.sync_module_states;
    plan.cpu_ram_efficient_loading = f.cpu_ram_efficient_loading;
    plan.optimizer.lr = train.learning_rate;
    plan.optimizer.weight_decay = train.weight_decay;
    plan.lr_scheduler_type = train.lr_scheduler_type.clone();
    warnings.extend(f.warnings.iter().cloned());
    Ok(plan)
}

fn check_cluster(world: usize, gpus_per_node: usize) -> Result<(), ConfigError> {
    if world == 0 || gpus_per_node == 0 {
        return Err(mismatch(format!(
            "world size ({world}) and ranks per node ({gpus_per_node}) must be at least 1"
        )));
    }
    Ok(())
}

fn finish(
    mut plan: Plan,
    mut warnings: Vec<Warning>,
    world: usize,
    gpus_per_node: usize,
) -> Result<(Plan, Vec<Warning>), ConfigError> {
    plan.world = world;
    plan.gpus_per_node = gpus_per_node;
    if plan.hybrid && !world.is_multiple_of(gpus_per_node) {
        return Err(mismatch(format!(
            "{} shards within a node: the world size {world} must be a multiple of the ranks per \
             node {gpus_per_node}",
            plan.label()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    warnings.retain(|w| seen.insert((w.key.clone(), w.message.clone())));
    Ok((plan, warnings))
}

/// The plan for a training config and the DeepSpeed or FSDP config it names (neither: DDP), on
/// a cluster of `world` ranks with `gpus_per_node` per node. `hidden`: the model's hidden size,
/// for the `"auto"` bucket sizes (unknown: they stay unresolved and a warning says so).
///
/// # Errors
/// Both files given; a value of a file that contradicts the training config or the cluster
/// (the message names both values); a hybrid plan on a world that is not whole nodes.
pub fn plan_from(
    train: &TrainConfig,
    ds: Option<&DeepSpeedConfig>,
    fsdp: Option<&FsdpConfig>,
    world: usize,
    gpus_per_node: usize,
    hidden: Option<usize>,
) -> Result<(Plan, Vec<Warning>), ConfigError> {
    check_cluster(world, gpus_per_node)?;
    let mut warnings = Vec::new();
    let plan = match (ds, fsdp) {
        (Some(_), Some(_)) => {
            return Err(mismatch(format!(
                "give either a deepspeed config ({}) or an fsdp config ({}), not both",
                train.deepspeed.as_deref().unwrap_or("given"),
                train.fsdp_config.as_deref().unwrap_or("given"),
            )));
        }
        (Some(ds), None) => plan_from_deepspeed(train, ds, world, hidden, &mut warnings)?,
        (None, Some(f)) => plan_from_fsdp(train, f, world, gpus_per_node, &mut warnings)?,
        (None, None) => Plan {
            precision: train_precision(train),
            micro_batch: train
                .per_device_train_batch_size
                .unwrap_or(DEFAULT_MICRO_BATCH),
            grad_accum: train
                .gradient_accumulation_steps
                .unwrap_or(DEFAULT_GRAD_ACCUM),
            clip: clip_of(train.max_grad_norm.unwrap_or(DEFAULT_MAX_GRAD_NORM)),
            optimizer: OptimizerSettings {
                lr: train.learning_rate,
                weight_decay: train.weight_decay,
                ..OptimizerSettings::default()
            },
            lr_scheduler_type: train.lr_scheduler_type.clone(),
            ..Plan::ddp()
        },
    };
    finish(plan, warnings, world, gpus_per_node)
}

/// The plan for a training config launched with an accelerate config. `ds_file`: the parsed
/// `deepspeed_config.deepspeed_config_file`, when the accelerate config names one.
///
/// # Errors
/// As [`plan_from`], plus `num_processes` / `num_machines` that disagree with the cluster,
/// `mixed_precision` that contradicts the training config, and a `deepspeed_config_file` that
/// was not passed in.
pub fn plan_from_accelerate(
    train: &TrainConfig,
    acc: &AccelerateConfig,
    ds_file: Option<&DeepSpeedConfig>,
    world: usize,
    gpus_per_node: usize,
    hidden: Option<usize>,
) -> Result<(Plan, Vec<Warning>), ConfigError> {
    check_cluster(world, gpus_per_node)?;
    let l = &acc.launcher;
    match l.distributed_type {
        DistributedType::Fsdp => plan_from(
            train,
            None,
            Some(&acc.fsdp_config()),
            world,
            gpus_per_node,
            hidden,
        ),
        DistributedType::DeepSpeed => {
            check_launcher(l, train, world, gpus_per_node)?;
            let a = acc.deepspeed.clone().unwrap_or_default();
            let built;
            let ds = match (&a.deepspeed_config_file, ds_file) {
                (Some(_), Some(ds)) => ds,
                (Some(path), None) => {
                    return Err(ConfigError::Invalid {
                        file: accelerate::FILE.into(),
                        field: "deepspeed_config.deepspeed_config_file".into(),
                        message: format!("'{path}' was not read"),
                    });
                }
                (None, _) => {
                    built = a.to_deepspeed(l.mixed_precision);
                    &built
                }
            };
            let (plan, mut warnings) =
                plan_from(train, Some(ds), None, world, gpus_per_node, hidden)?;
            warnings.extend(acc.warnings.iter().cloned());
            finish(plan, warnings, world, gpus_per_node)
        }
        DistributedType::No | DistributedType::MultiGpu | DistributedType::MultiCpu => {
            let p = check_launcher(l, train, world, gpus_per_node)?;
            let (mut plan, mut warnings) =
                plan_from(train, None, None, world, gpus_per_node, hidden)?;
            if let Some(p) = p {
                plan.precision = p;
            }
            warnings.extend(acc.warnings.iter().cloned());
            finish(plan, warnings, world, gpus_per_node)
        }
    }
}

fn in_file(e: ConfigError, path: &str) -> ConfigError {
    match e {
        ConfigError::FileSyntax { file, message } => ConfigError::FileSyntax {
            file: format!("{file} {path}"),
            message,
        },
        ConfigError::UnknownKeysIn { file, keys } => ConfigError::UnknownKeysIn {
            file: format!("{file} {path}"),
            keys,
        },
        ConfigError::Invalid {
            file,
            field,
            message,
        } => ConfigError::Invalid {
            file: format!("{file} {path}"),
            field,
            message,
        },
        other => other,
    }
}

/// Reads the files a training config names (`deepspeed:`, `fsdp_config:`, or
/// `accelerate_config:` and the DeepSpeed file that one names) through `read` and resolves the
/// plan. Messages about a file name its path.
///
/// # Errors
/// A file that cannot be read or parsed, and everything [`plan_from`] refuses.
pub fn plan_from_files(
    train: &TrainConfig,
    mut read: impl FnMut(&str) -> Result<String, String>,
    world: usize,
    gpus_per_node: usize,
    hidden: Option<usize>,
) -> Result<(Plan, Vec<Warning>), ConfigError> {
    let mut load = |path: &str| {
        read(path).map_err(|message| ConfigError::Read {
            path: path.to_owned(),
            message,
        })
    };
    if let Some(p) = &train.accelerate_config {
        let acc = AccelerateConfig::from_yaml(&load(p)?).map_err(|e| in_file(e, p))?;
        let ds = match acc.deepspeed_file() {
            None => None,
            Some(f) => Some(DeepSpeedConfig::from_json(&load(f)?).map_err(|e| in_file(e, f))?),
        };
        return plan_from_accelerate(train, &acc, ds.as_ref(), world, gpus_per_node, hidden);
    }
    let ds = match &train.deepspeed {
        None => None,
        Some(p) => Some(DeepSpeedConfig::from_json(&load(p)?).map_err(|e| in_file(e, p))?),
    };
    let fsdp = match &train.fsdp_config {
        None => None,
        Some(p) => Some(FsdpConfig::from_yaml(&load(p)?).map_err(|e| in_file(e, p))?),
    };
    plan_from(
        train,
        ds.as_ref(),
        fsdp.as_ref(),
        world,
        gpus_per_node,
        hidden,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ds(v: serde_json::Value) -> DeepSpeedConfig {
        DeepSpeedConfig::from_value(&v).unwrap()
    }

    fn train(yaml: &str) -> TrainConfig {
        TrainConfig::from_yaml(yaml).unwrap()
    }

    const LF_AUTOS: &str = r#"{
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 500,
                 "initial_scale_power": 12, "hysteresis": 3, "min_loss_scale": 0.5},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}
    }"#;

    #[test]
    fn labels_of_the_named_plans() {
        let cases = [
            (Plan::ddp(), "DDP (ZeRO-0)", Some("NO_SHARD")),
            (Plan::zero1(), "ZeRO-1", None),
            (Plan::zero2(), "ZeRO-2", Some("SHARD_GRAD_OP")),
            (
                Plan::zero2().with_offload_optimizer(),
                "ZeRO-2 + offload optimizer",
                Some("SHARD_GRAD_OP + offload_params"),
            ),
            (Plan::zero3(), "ZeRO-3", Some("FULL_SHARD")),
            (
                Plan::zero3().with_offload_optimizer(),
                "ZeRO-3 + offload optimizer",
                None,
            ),
            (
                Plan::zero3().with_offload_optimizer().with_offload_param(),
                "ZeRO-3 + offload optimizer + params",
                Some("FULL_SHARD + offload_params"),
            ),
            (
                Plan::hybrid_shard(),
                "HYBRID_SHARD (ZeRO-3 within a node)",
                Some("HYBRID_SHARD"),
            ),
        ];
        for (plan, label, fsdp) in cases {
            assert_eq!(plan.label(), label);
            assert_eq!(plan.fsdp_equivalent().as_deref(), fsdp, "{label}");
        }
        assert_eq!(
            Plan::fsdp(ShardingStrategy::FullShard).label(),
            "FSDP FULL_SHARD"
        );
        assert_eq!(
            Plan::fsdp(ShardingStrategy::HybridShardZero2).zero_label(),
            "_HYBRID_SHARD_ZERO2 (ZeRO-2 within a node)"
        );
        for s in 0..=3 {
            assert_eq!(Plan::zero(s).stage(), s);
        }
    }

    #[test]
    fn autos_resolve_by_the_hf_trainer_rules() {
        let t = train(
            "per_device_train_batch_size: 2\ngradient_accumulation_steps: 4\nmax_grad_norm: 0.3\n\
             fp16: true\nlearning_rate: 2.0e-5\n",
        );
        let d = DeepSpeedConfig::from_json(LF_AUTOS).unwrap();
        let (plan, warnings) = plan_from(&t, Some(&d), None, 4, 2, Some(1024)).unwrap();
        assert_eq!(
            (plan.micro_batch, plan.grad_accum, plan.train_batch()),
            (2, 4, 32)
        );
        assert_eq!(plan.clip, Some(0.3));
        assert_eq!(
            plan.precision,
            Precision::Fp16(LossScale::Dynamic {
                initial_scale_power: 12,
                loss_scale_window: 500,
                hysteresis: 3,
                consecutive_hysteresis: false,
                min_loss_scale: 0.5
            })
        );
        assert_eq!(plan.reduce_bucket_size, Some(1024 * 1024));
        assert_eq!(plan.prefetch_bucket_size, Some(943_718)); // int(0.9 * 1024 * 1024)
        assert_eq!(plan.param_persistence_threshold, Some(10_240));
        assert!(plan.overlap_comm, "DeepSpeed's default at stage 3");
        assert_eq!(plan.optimizer.lr, Some(2e-5));
        // Resolved, and named once as without effect (no parameter stays whole here).
        let keys: Vec<&str> = warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(
            keys,
            ["zero_optimization.stage3_param_persistence_threshold"]
        );

        // bf16 from the training config; the HF defaults where it is silent.
        let (plan, _) = plan_from(&train("bf16: true"), Some(&d), None, 2, 2, Some(8)).unwrap();
        assert_eq!(plan.precision, Precision::Bf16);
        assert_eq!(
            (plan.micro_batch, plan.grad_accum),
            (DEFAULT_MICRO_BATCH, 1)
        );
        assert_eq!(plan.clip, Some(DEFAULT_MAX_GRAD_NORM));
        let (plan, _) =
            plan_from(&train("max_grad_norm: 0"), Some(&d), None, 2, 2, Some(8)).unwrap();
        assert_eq!((plan.precision, plan.clip), (Precision::Fp32, None));

        // Below stage 3 only reduce_bucket_size follows the hidden size.
        let d2 = ds(
            json!({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto",
                           "stage3_prefetch_bucket_size": "auto"}}),
        );
        let (plan, _) = plan_from(&train("{}"), Some(&d2), None, 2, 2, Some(100)).unwrap();
        assert_eq!(plan.reduce_bucket_size, Some(10_000));
        assert_eq!(plan.prefetch_bucket_size, Some(50_000_000));
        let (plan, w) = plan_from(&train("{}"), Some(&d2), None, 2, 2, None).unwrap();
        assert_eq!(
            plan.unresolved_auto,
            vec!["zero_optimization.reduce_bucket_size"]
        );
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn deepspeed_batch_arithmetic_fills_what_the_training_config_leaves_out() {
        let t = train("per_device_train_batch_size: 2");
        let (p, _) = plan_from(
            &t,
            Some(&ds(json!({"train_batch_size": 32}))),
            None,
            4,
            4,
            None,
        )
        .unwrap();
        assert_eq!((p.micro_batch, p.grad_accum), (2, 4));
        let (p, _) = plan_from(
            &train("{}"),
            Some(&ds(json!({"train_batch_size": 32}))),
            None,
            4,
            4,
            None,
        )
        .unwrap();
        assert_eq!((p.micro_batch, p.grad_accum), (8, 1));
        let d = ds(json!({"train_batch_size": 24, "gradient_accumulation_steps": 3}));
        let (p, _) = plan_from(&train("{}"), Some(&d), None, 4, 4, None).unwrap();
        assert_eq!((p.micro_batch, p.grad_accum), (2, 3));
        let d = ds(json!({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 5}));
        let (p, _) = plan_from(&train("{}"), Some(&d), None, 4, 4, None).unwrap();
        assert_eq!((p.micro_batch, p.grad_accum, p.train_batch()), (3, 5, 60));
        let err = plan_from(
            &t,
            Some(&ds(json!({"train_batch_size": 30}))),
            None,
            4,
            4,
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "deepspeed train_batch_size 30 is not a multiple of world 4 × micro 2 = 8"
        );
    }

    #[test]
    fn explicit_values_that_contradict_the_training_config_name_both() {
        let t = train(
            "per_device_train_batch_size: 2\ngradient_accumulation_steps: 4\nmax_grad_norm: 1.0\n\
             bf16: true\nlearning_rate: 1.0e-5\nlr_scheduler_type: cosine\n",
        );
        let cases = [
            (
                json!({"train_micro_batch_size_per_gpu": 4}),
                "deepspeed train_micro_batch_size_per_gpu = 4 but per_device_train_batch_size = 2",
            ),
            (
                json!({"train_batch_size": 64}),
                "deepspeed train_batch_size 64 != world 4 × micro 2 × accum 4 = 32",
            ),
            (
                json!({"gradient_clipping": 0.5}),
                "deepspeed gradient_clipping = 0.5 but max_grad_norm = 1",
            ),
            (
                json!({"bf16": {"enabled": false}}),
                "deepspeed bf16.enabled = false but bf16 = true",
            ),
            (
                json!({"fp16": {"enabled": true}}),
                "deepspeed fp16.enabled = true but bf16 = true",
            ),
            (
                json!({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}),
                "deepspeed optimizer.params.lr = 0.0003 but learning_rate = 0.00001",
            ),
            (
                json!({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": "auto"}}}),
                "deepspeed scheduler.type = WarmupDecayLR (linear) but lr_scheduler_type = cosine",
            ),
        ];
        for (v, msg) in cases {
            let err = plan_from(&t, Some(&ds(v.clone())), None, 4, 2, None).unwrap_err();
            assert!(matches!(err, ConfigError::Mismatch(_)), "{v}");
            assert!(err.to_string().starts_with(msg), "{v}: {err}");
        }
        // Consistent explicit values are accepted.
        let d = ds(
            json!({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
                          "train_batch_size": 32, "gradient_clipping": 1.0,
                          "bf16": {"enabled": true},
                          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95],
                                        "eps": 1e-8, "weight_decay": "auto"}},
                          "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": "auto"}}}),
        );
        let (plan, w) = plan_from(&t, Some(&d), None, 4, 2, None).unwrap();
        assert_eq!(plan.train_batch(), 32);
        assert_eq!(plan.optimizer.betas, Some((0.9, 0.95)));
        assert_eq!(plan.lr_scheduler_type.as_deref(), Some("cosine"));
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn both_files_or_no_whole_nodes_are_refused() {
        let t = train("deepspeed: a.json\nfsdp_config: b.yaml");
        let f = FsdpConfig::default();
        let err =
            plan_from(&t, Some(&DeepSpeedConfig::default()), Some(&f), 2, 2, None).unwrap_err();
        assert!(
            err.to_string().contains("a.json") && err.to_string().contains("b.yaml"),
            "{err}"
        );

        let hybrid = FsdpConfig {
            sharding_strategy: ShardingStrategy::HybridShard,
            ..FsdpConfig::default()
        };
        let (plan, _) = plan_from(&train("{}"), None, Some(&hybrid), 8, 4, None).unwrap();
        assert!(plan.hybrid && plan.shard_params);
        assert_eq!(plan.shard_group_size(), 4);
        let err = plan_from(&train("{}"), None, Some(&hybrid), 6, 4, None).unwrap_err();
        assert!(
            err.to_string().contains("multiple of the ranks per node 4"),
            "{err}"
        );
        assert!(plan_from(&train("{}"), None, None, 0, 1, None).is_err());
    }

    #[test]
    fn no_file_is_ddp_from_the_training_config() {
        let t = train("per_device_train_batch_size: 4\nbf16: true\nmax_grad_norm: 2.0");
        let (plan, w) = plan_from(&t, None, None, 3, 1, None).unwrap();
        assert_eq!(plan.label(), "DDP (ZeRO-0)");
        assert_eq!(plan.source, PlanSource::Default);
        assert_eq!(
            (plan.micro_batch, plan.grad_accum, plan.train_batch()),
            (4, 1, 12)
        );
        assert_eq!((plan.precision, plan.clip), (Precision::Bf16, Some(2.0)));
        assert!(w.is_empty());
        assert_eq!(
            plan.to_string(),
            "DDP (ZeRO-0) [bf16; micro 4 × accum 1 × world 3 = 12; clip 2]"
        );
    }

    #[test]
    fn fsdp_strategies_map_to_plans() {
        let t = train("fp16: true");
        for (s, stage, hybrid) in [
            (ShardingStrategy::FullShard, 3, false),
            (ShardingStrategy::ShardGradOp, 2, false),
            (ShardingStrategy::NoShard, 0, false),
            (ShardingStrategy::HybridShard, 3, true),
            (ShardingStrategy::HybridShardZero2, 2, true),
        ] {
            for offload in [false, true] {
                let f = FsdpConfig {
                    sharding_strategy: s,
                    offload_params: offload,
                    ..FsdpConfig::default()
                };
                let (plan, w) = plan_from(&t, None, Some(&f), 4, 2, None).unwrap();
                assert_eq!((plan.stage(), plan.hybrid), (stage, hybrid), "{s:?}");
                assert_eq!(plan.fsdp_strategy(), Some(s));
                assert_eq!(plan.offload_optimizer, offload);
                assert_eq!(plan.offload_param, offload && stage == 3);
                assert_eq!(w.len(), usize::from(offload && stage < 3), "{w:?}");
                assert_eq!(plan.precision, Precision::Fp16(LossScale::default()));
                let want = if offload {
                    format!("FSDP {} + offload_params", s.name())
                } else {
                    format!("FSDP {}", s.name())
                };
                assert_eq!(plan.label(), want);
            }
        }
    }

    #[test]
    fn accelerate_launcher_is_checked_against_the_cluster_and_the_training_config() {
        let acc = |yaml: &str| AccelerateConfig::from_yaml(yaml).unwrap();
        let t = train("bf16: true");
        let a = acc(
            "distributed_type: MULTI_GPU\nnum_machines: 2\nnum_processes: 8\nmixed_precision: bf16",
        );
        let (plan, _) = plan_from_accelerate(&t, &a, None, 8, 4, None).unwrap();
        assert_eq!(
            (plan.label(), plan.precision),
            ("DDP (ZeRO-0)".to_owned(), Precision::Bf16)
        );
        let err = plan_from_accelerate(&t, &a, None, 4, 4, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "accelerate num_processes = 8 but the cluster's world size = 4"
        );
        let err = plan_from_accelerate(&t, &a, None, 8, 8, None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("accelerate num_machines = 2 but the cluster has 1 node(s)")
        );
        let a16 = acc("distributed_type: MULTI_GPU\nmixed_precision: fp16");
        let err = plan_from_accelerate(&t, &a16, None, 2, 2, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "accelerate mixed_precision = fp16 but bf16 = true"
        );
        let (plan, _) = plan_from_accelerate(&train("{}"), &a16, None, 2, 2, None).unwrap();
        assert_eq!(plan.precision.name(), "fp16");
        let no = acc("distributed_type: 'NO'");
        assert!(plan_from_accelerate(&t, &no, None, 2, 2, None).is_err());
        assert!(plan_from_accelerate(&t, &no, None, 1, 1, None).is_ok());

        let z = acc(
            "distributed_type: DEEPSPEED\nmixed_precision: bf16\nnum_processes: 4\ndeepspeed_config:\n  \
             zero_stage: 3\n  offload_optimizer_device: cpu\n  offload_param_device: cpu\n  \
             gradient_accumulation_steps: 2\n",
        );
        let t2 =
            train("bf16: true\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 2");
        let (plan, _) = plan_from_accelerate(&t2, &z, None, 4, 2, Some(64)).unwrap();
        assert_eq!(plan.label(), "ZeRO-3 + offload optimizer + params");
        assert_eq!((plan.train_batch(), plan.precision), (16, Precision::Bf16));
        assert_eq!(plan.reduce_bucket_size, Some(4096));
        let t3 = train("gradient_accumulation_steps: 8");
        let err = plan_from_accelerate(&t3, &z, None, 4, 2, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "deepspeed gradient_accumulation_steps = 2 but gradient_accumulation_steps = 8"
        );

        let file =
            acc("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: z.json");
        assert!(plan_from_accelerate(&t, &file, None, 2, 2, None).is_err());
        let d = ds(json!({"zero_optimization": {"stage": 1}}));
        let (plan, _) = plan_from_accelerate(&t, &file, Some(&d), 2, 2, None).unwrap();
        assert_eq!(plan.label(), "ZeRO-1");

        let f = acc(
            "distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: 2",
        );
        let (plan, _) = plan_from_accelerate(&t, &f, None, 2, 2, None).unwrap();
        assert_eq!(plan.label(), "FSDP SHARD_GRAD_OP");
    }

    #[test]
    fn plan_from_files_names_the_file_in_errors() {
        let t = train("deepspeed: conf/ds.json");
        let err = plan_from_files(
            &t,
            |_| Ok("{\"zero_optimization\": {\"stag\": 2}}".into()),
            2,
            2,
            None,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "deepspeed config conf/ds.json has unknown key(s): zero_optimization.stag"
        );
        let err =
            plan_from_files(&t, |p| Err(format!("{p}: no such file")), 2, 2, None).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
