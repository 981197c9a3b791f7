//! The sharded data-parallel engine: one engine, a plan saying what is sharded.
//!
//! The trainable tensors are grouped in flat units (`ParamSpec::unit`: embeddings, one per
//! block, final norm + head), each padded to a multiple of the shard group's size `N`; rank r of
//! the group owns the contiguous slice `[r·S, (r+1)·S)` of every unit (`S` = padded / N).
//!
//! | plan            | parameters      | gradients (kept)       | AdamW state |
//! |-----------------|-----------------|------------------------|-------------|
//! | DDP (N = 1)     | full            | full                   | full        |
//! | ZeRO-1          | full            | full                   | own shard   |
//! | ZeRO-2          | full            | own shard              | own shard   |
//! | ZeRO-3          | own shard       | own shard              | own shard   |
//!
//! DDP is the same code with a shard group of one rank and every rank a replica. HYBRID_SHARD
//! is ZeRO-3 over the ranks of a node, replicated across nodes: gradients are reduce-scattered
//! inside the node and the shards all-reduced across nodes.
//!
//! Gradients: ZeRO-0/1 accumulate full gradients over the micro-batches and reduce-scatter them
//! at the step (in place: this rank's slice of the full buffer becomes the reduced shard);
//! ZeRO-2/3 reduce-scatter each unit's gradients after every micro-batch and keep only their
//! shard. Collectives go in pieces of at most `reduce_bucket_size` / `allgather_bucket_size`
//! elements (a piece takes the same sub-range of every rank's shard, so any piece size keeps
//! the layout). Clipping uses the global norm: the sum of squares of the owned shards,
//! all-reduced over the shard group. AdamW runs on the owned shard, one state per tensor
//! segment (norm weights are exempt from weight decay); ZeRO-0–2 then all-gather the updated
//! shards into every rank's full parameters.
//!
//! ZeRO-3 runs the model unit by unit ([`Pass::UnitByUnit`]): gather a unit, run it
//! on the previous unit's detached output, keep only unit inputs; backward re-gathers each unit
//! in reverse order, recomputes it with the upstream gradient injected, reduce-scatters its
//! gradients and drops it. A rank's peak is its shards, one gathered unit (two for a tied head)
//! and the unit inputs.
//!
//! Placement: the flat parameters, gradient accumulators and AdamW state live in host memory
//! on every backend; the burn backend `B` ([`TrainBackend`]: the fused CPU backend, ndarray, or
//! CUDA) runs the forward and backward of each micro-batch on its device, its leaves built from
//! the host units and its gradients read back. So `offload_optimizer` (optimizer state and
//! update on the host) holds for every plan, and `offload_param` (ZeRO-3 shards on the host
//! between uses) too; on the CPU backends the offload plans run the code of their twins.
//!
//! ZeRO-3 overlaps communication with compute ([`Overlap`]): a communication thread owns the
//! shard group for the micro-batch and runs its collectives in the order the compute thread
//! asks for them (the same order on every rank, so the ring's calls match). The next unit's
//! all-gather is issued before the current unit computes (forward, and backward with
//! BACKWARD_PRE; after its gradients with BACKWARD_POST), and a unit's reduce-scatter runs
//! while the next unit computes. At most two gathered units are alive at once, plus one unit's
//! gradients in flight.
//!
//! Stages 0–2 with overlap (DeepSpeed `overlap_comm: true`, FSDP NO_SHARD / SHARD_GRAD_OP, no
//! file) keep one forward graph per unit, each cut at a detached copy of its input
//! ([`Pass::UnitGraphs`]); backward runs from the head down, unit by unit, and
//! hands each unit's gradients to the communication thread as soon as its backward ends, so the
//! unit's all-reduce (DDP) or reduce-scatter (ZeRO-1/2) on the step's last micro-batch runs
//! while the units below it compute. Without overlap they reduce at the step, after backward.
//!
//! The engine owns the step ([`Engine::step`]): the pass chosen once at construction
//! ([`Pass`]: the whole model, one graph per unit, or unit by unit), the gradient reduction,
//! the agreement of every rank on the loss and the stop/checkpoint flags, fp16 unscaling and
//! the overflow skip, global-norm clipping and AdamW. The training loop hands it this rank's
//! micro-batches and reads a [`StepOutcome`].
//!
//! Layout:
//! - `mod.rs` — [`Engine`], [`TrainBackend`], [`Engine::step`] and its types.
//! - [`layout`] — the flat units ([`FlatLayout`]) and the ranges a rank owns.
//! - [`comm`] — who shards with whom ([`Groups`]), the communication thread and its queue,
//!   collectives in pieces, [`Overlap`].
//! - `passes` — forward and backward of one micro-batch for each [`Pass`].
//! - `state` — accumulation, reduction, clipping, AdamW, sharding of the parameters,
//!   checkpoint export/import, the memory report.

pub mod comm;
pub mod layout;
mod passes;
mod state;

use anyhow::Result;
use burn::backend::Autodiff;
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use ringmaster_collectives::ReduceOp;
use ringmaster_config::plan::{LossScale, Plan, Precision};
use ringmaster_data::batch::Batch;
use ringmaster_model::fused::Fused;
use ringmaster_model::model::Dropout;
use ringmaster_model::params::ParamKind;
use ringmaster_model::{LlamaConfig, LoraConfig, ParamStore};
use ringmaster_optim::adamw::{AdamWConfig, AdamWState};
use ringmaster_optim::clip::clip_coef;
use ringmaster_optim::scaler::{DynamicLossScaler, LossScalerConfig};

pub use comm::{Groups, Overlap};
pub use layout::{FlatLayout, UnitLayout};
use state::Segment;
pub use state::{MemoryReport, UnitState};

/// Default piece size of a collective when the plan sets no bucket size (DeepSpeed's 5e8).
const DEFAULT_BUCKET: u64 = 500_000_000;

/// A burn backend the engine trains on: autodiff over an inner backend with the fused
/// operations. Implemented for the fused CPU backend (flex), ndarray (no fused kernels: the
/// composite defaults) and, with the `cuda` feature, burn-cuda.
pub trait TrainBackend: AutodiffBackend<InnerBackend: Fused> + Fused {
    /// The backend's name in logs and reports (`flex`, `ndarray`, `cuda`).
    const NAME: &'static str;

    /// Bytes the backend's allocator holds on `device` now (device memory on a GPU), when it
    /// can tell; sampled after every step for the peak in the memory report.
    fn device_memory(_device: &Self::Device) -> Option<u64> {
        None
    }

    /// The device as logs name it (`cpu`, `cuda:0`).
    fn device_name(_device: &Self::Device) -> String {
        "cpu".into()
    }
}

impl TrainBackend for Autodiff<burn::backend::Flex> {
    const NAME: &'static str = "flex";
}

impl TrainBackend for Autodiff<burn::backend::NdArray> {
    const NAME: &'static str = "ndarray";
}

#[cfg(feature = "cuda")]
impl TrainBackend for Autodiff<burn::backend::Cuda> {
    const NAME: &'static str = "cuda";

    fn device_memory(device: &Self::Device) -> Option<u64> {
        use cubecl::Runtime;
        let usage = cubecl::cuda::CudaRuntime::client(device)
            .memory_usage()
            .ok()?;
        Some(usage.bytes_reserved)
    }

    fn device_name(device: &Self::Device) -> String {
        format!("cuda:{}", device.index)
    }
}

/// How one micro-batch runs forward and backward, chosen once from the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The whole model as one graph, gradients reduced after backward (stages 0–2 without
    /// overlap, and LoRA).
    WholeModel,
    /// Stages 0–2 with overlapped reduction: one kept graph per unit, each unit's gradients
    /// reduced by the communication thread as soon as its backward ends.
    UnitGraphs,
    /// ZeRO-3: unit by unit with recompute, parameters gathered per use.
    UnitByUnit,
}

/// What the engine trains, fixed for the run.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    /// The plan (buckets, overlap, precision, clipping).
    pub plan: Plan,
    /// The stage of the trainable state (LoRA caps it at 2: the frozen base stays whole).
    pub stage: u8,
    /// The model's architecture.
    pub model: LlamaConfig,
    /// The trainable tensors are LoRA adapters (the base is frozen).
    pub lora: bool,
    /// LoRA dropout probability.
    pub lora_dropout: f64,
    /// AdamW hyper-parameters.
    pub adam: AdamWConfig,
    /// The run's seed (dropout masks).
    pub seed: u64,
    /// This process's rank in the job (dropout masks).
    pub rank: usize,
}

/// The weights the engine trains: the base model and, for LoRA, the adapters (then the
/// trainable tensors).
pub struct Weights<'a> {
    /// The base model (trainable unless `lora` is set; empty tensors at ZeRO-3 between
    /// [`Engine::gather_full`] calls).
    pub base: &'a mut ParamStore,
    /// LoRA: the adapters' config and tensors.
    pub lora: Option<(&'a LoraConfig, &'a mut ParamStore)>,
}

impl Weights<'_> {
    /// The trainable tensors.
    pub fn trainable(&mut self) -> &mut ParamStore {
        match &mut self.lora {
            Some((_, a)) => a,
            None => self.base,
        }
    }
}

/// fp16 loss scaling (none for fp32 and bf16).
#[derive(Debug, Clone)]
pub enum Scaling {
    /// No scaling.
    None,
    /// A fixed scale.
    Static(f64),
    /// DeepSpeed's dynamic loss scaler.
    Dynamic(DynamicLossScaler),
}

impl Scaling {
    /// The scaling `plan`'s precision asks for.
    pub fn of(plan: &Plan) -> Scaling {
        match plan.precision {
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
        }
    }

    /// The current loss scale (1 without scaling).
    pub fn scale(&self) -> f64 {
        match self {
            Scaling::None => 1.0,
            Scaling::Static(s) => *s,
            Scaling::Dynamic(d) => d.scale(),
        }
    }

    /// The dynamic scaler's state, for a checkpoint.
    pub fn dynamic(&self) -> Option<&DynamicLossScaler> {
        match self {
            Scaling::Dynamic(d) => Some(d),
            _ => None,
        }
    }

    /// Continues from a checkpoint's dynamic scaler state.
    pub fn restore(&mut self, saved: &DynamicLossScaler) {
        if let Scaling::Dynamic(d) = self {
            d.cur_scale = saved.cur_scale;
            d.cur_iter = saved.cur_iter;
            d.last_overflow_iter = saved.last_overflow_iter;
            d.cur_hysteresis = saved.cur_hysteresis;
        }
    }
}

/// One optimizer step's input on this rank.
pub struct StepInput<'a> {
    /// The step's number (dropout masks).
    pub step: u64,
    /// This rank's micro-batches, collated; `None` where the global batch left this rank no
    /// samples (it still takes part in the collectives).
    pub micro: &'a [Option<Batch>],
    /// The global batch's target-token count: every micro-batch's loss is divided by it, so the
    /// summed gradient is the global mean loss's whatever the split over ranks.
    pub normalizer: f64,
}

/// This rank's stop and checkpoint requests (signals) before the step's agreement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepSignals {
    /// Stop after this step (SIGTERM).
    pub stop: bool,
    /// Checkpoint after this step (SIGUSR1 or the coordinator's request).
    pub checkpoint: bool,
}

/// What one step did, agreed by every rank.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// The global batch's mean loss.
    pub loss: f64,
    /// The global gradient norm before clipping (NaN for a skipped step).
    pub grad_norm: f64,
    /// fp16 overflow: the update was skipped.
    pub skipped: bool,
    /// Seconds the compute thread waited for collectives during the step.
    pub comm_wait: f64,
    /// Some rank asked to stop / to checkpoint: every rank does after this step.
    pub signals: StepSignals,
}

/// The engine of one rank.
pub struct Engine<'c, B: TrainBackend> {
    groups: Groups<'c>,
    spec: EngineSpec,
    pass: Pass,
    device: B::Device,
    layout: FlatLayout,
    /// This rank's index in the shard group.
    shard_rank: usize,
    reduce_bucket: usize,
    gather_bucket: usize,
    /// ZeRO-3: this rank's parameter shard of every unit.
    param_shards: Vec<Vec<f32>>,
    /// Gradient accumulators: the padded full unit (stage ≤ 1) or the owned shard (stage ≥ 2).
    grads: Vec<Vec<f32>>,
    segments: Vec<Vec<Segment>>,
    scratch: Vec<f32>,
    overlap: Overlap,
    /// Seconds the compute thread waited for collectives since the last step began.
    comm_seconds: f64,
    /// This step's reduction already finished unit by unit in the last micro-batch's backward.
    reduced_in_backward: bool,
    /// The most device memory seen after a step ([`TrainBackend::device_memory`]).
    peak_device: Option<u64>,
}

impl<'c, B: TrainBackend> Engine<'c, B> {
    /// The engine for `trainable` under `spec`, running on `device`. ZeRO-3 keeps this rank's
    /// shard of every unit and empties `trainable`'s tensors until [`Engine::gather_full`].
    pub fn new(
        spec: EngineSpec,
        trainable: &mut ParamStore,
        groups: Groups<'c>,
        device: B::Device,
    ) -> Result<Engine<'c, B>> {
        let mut groups = groups;
        let (group, shard_rank) = match groups.shard() {
            Some(c) => (c.world_size(), c.rank()),
            None => (1, 0),
        };
        let stage = spec.stage;
        let layout = FlatLayout::new(trainable.specs(), group)?;
        let mut segments = Vec::with_capacity(layout.units.len());
        let mut grads = Vec::with_capacity(layout.units.len());
        for u in &layout.units {
            let lo = shard_rank * u.shard;
            let segs = u
                .segments(&layout.sizes, lo, lo + u.shard)
                .into_iter()
                .map(|(t, tr, fr)| Segment {
                    tensor: t,
                    // As transformers' Trainer: no weight decay on norms (q/k norms
                    // included) and biases.
                    decay: !matches!(
                        trainable.specs()[t].kind,
                        ParamKind::Norm | ParamKind::Bias(_)
                    ),
                    state: AdamWState::new(tr.len()),
                    in_tensor: tr,
                    in_shard: fr,
                })
                .collect();
            segments.push(segs);
            grads.push(vec![
                0.0f32;
                if stage >= 2 { u.shard } else { u.shard * group }
            ]);
        }
        let elems =
            |b: Option<u64>| b.unwrap_or(DEFAULT_BUCKET).clamp(1, usize::MAX as u64) as usize;
        let overlap = Overlap::of(&spec.plan);
        let pass = {
            let (shard, replica) = groups.split();
            let peers = shard.is_some() || replica.is_some();
            if stage >= 3 {
                Pass::UnitByUnit
            } else if !spec.lora && overlap.async_reduce && peers {
                Pass::UnitGraphs
            } else {
                Pass::WholeModel
            }
        };
        let mut engine = Engine {
            groups,
            pass,
            device,
            layout,
            shard_rank,
            reduce_bucket: elems(spec.plan.reduce_bucket_size),
            gather_bucket: elems(Some(spec.plan.allgather_bucket_size)),
            param_shards: Vec::new(),
            grads,
            segments,
            scratch: Vec::new(),
            overlap,
            comm_seconds: 0.0,
            reduced_in_backward: false,
            peak_device: None,
            spec,
        };
        engine.shard_params(trainable);
        Ok(engine)
    }

    /// The flat layout.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The stage of the trainable state.
    pub fn stage(&self) -> u8 {
        self.spec.stage
    }

    /// How a micro-batch runs.
    pub fn pass(&self) -> Pass {
        self.pass
    }

    /// How ZeRO-3 overlaps communication (see [`Overlap::of`]).
    pub fn overlap(&self) -> Overlap {
        self.overlap
    }

    /// One line on how the engine runs: backend and device, the pass and its communication.
    pub fn describe(&self) -> String {
        let stage = self.spec.stage;
        let pass = match self.pass {
            Pass::UnitByUnit => format!("ZeRO-3 unit by unit; communication: {}", self.overlap),
            Pass::UnitGraphs => {
                format!("gradient reduction unit by unit, overlapped with backward (stage {stage})")
            }
            Pass::WholeModel => {
                format!("whole-model graph, gradients reduced after backward (stage {stage})")
            }
        };
        let lora = if self.spec.lora && stage < self.spec.plan.stage() {
            format!(
                "; LoRA keeps the frozen base model whole on every rank, the adapters' \
                 gradients and optimizer state are sharded as ZeRO-{stage}"
            )
        } else {
            String::new()
        };
        format!(
            "backend {} on {}; {pass}{lora}",
            B::NAME,
            B::device_name(&self.device)
        )
    }

    /// The device the model runs on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The most device memory the backend's allocator held after a step (None on backends
    /// that cannot tell).
    pub fn peak_device_bytes(&self) -> Option<u64> {
        self.peak_device
    }

    /// The whole job's collective sequence number (heartbeats compare it across ranks).
    pub fn collective_seq(&self) -> u64 {
        self.groups.main.as_deref().map(|c| c.seq()).unwrap_or(0)
    }

    /// Waits for every rank of the job (a checkpoint's shards all written).
    pub fn barrier(&mut self) -> Result<()> {
        match self.groups.main.as_deref_mut() {
            Some(c) => c.barrier().map_err(anyhow::Error::new),
            None => Ok(()),
        }
    }

    /// One optimizer step: every micro-batch forward and backward (the plan's pass), the
    /// loss and this rank's `signals` (read after the micro-batches, just before the agreement,
    /// so that a signal arriving during the compute takes effect after this step) agreed by all
    /// ranks, the gradient reduction, fp16
    /// unscaling and the overflow skip (the dynamic `scaling` updated), global-norm clipping and
    /// AdamW at `lr` on the owned shard (then, below ZeRO-3, the updated shards gathered into
    /// every rank's `weights`).
    pub fn step(
        &mut self,
        weights: &mut Weights<'_>,
        input: &StepInput<'_>,
        scaling: &mut Scaling,
        lr: f64,
        signals: impl FnOnce() -> StepSignals,
    ) -> Result<StepOutcome> {
        self.comm_seconds = 0.0;
        self.zero_grads();
        let scale = scaling.scale();
        let mut dropout = (self.spec.lora_dropout > 0.0).then(|| {
            Dropout::new(
                self.spec.lora_dropout,
                self.spec.seed ^ (input.step << 16) ^ self.spec.rank as u64,
            )
        });
        let mut local_loss = 0.0f64;
        for (mi, batch) in input.micro.iter().enumerate() {
            let last = mi + 1 == input.micro.len();
            local_loss += match batch {
                Some(batch) => {
                    self.micro_batch(weights, batch, input.normalizer, scale, last, &mut dropout)?
                }
                // Sharded plans still take part in this micro-batch's collectives.
                None => {
                    self.idle_micro_batch(last)?;
                    0.0
                }
            };
        }
        let (loss, signals) = self.agree(local_loss, signals())?;
        self.reduce()?;
        if scale != 1.0 {
            self.scale_grads((1.0 / scale) as f32);
        }
        let apply = match scaling {
            Scaling::Dynamic(d) => d.update(self.overflow()?),
            _ => true,
        };
        let mut grad_norm = f64::NAN;
        if apply {
            grad_norm = self.grad_norm()?;
            if let Some(c) = clip_coef(grad_norm, self.spec.plan.clip.unwrap_or(0.0)) {
                self.scale_grads(c);
            }
            self.apply(weights.trainable(), lr)?;
        }
        if let Some(bytes) = B::device_memory(&self.device) {
            self.peak_device = Some(self.peak_device.map_or(bytes, |p| p.max(bytes)));
        }
        Ok(StepOutcome {
            loss,
            grad_norm,
            skipped: !apply,
            comm_wait: std::mem::take(&mut self.comm_seconds),
            signals,
        })
    }

    /// The loss of a held-out batch (`val_size`, `eval_dataset`) under the current weights, agreed over the
    /// job; weights, optimizer state and the loss scaler are untouched. It runs the plan's own
    /// pass (forward and backward, and the gradient collectives every rank makes in it) without
    /// dropout, then discards the gradients: one code path for every plan, at the price of a
    /// backward that evaluation does not need.
    pub fn held_out_loss(
        &mut self,
        weights: &mut Weights<'_>,
        input: &StepInput<'_>,
    ) -> Result<f64> {
        self.comm_seconds = 0.0;
        self.zero_grads();
        let mut local_loss = 0.0f64;
        for (mi, batch) in input.micro.iter().enumerate() {
            let last = mi + 1 == input.micro.len();
            local_loss += match batch {
                Some(batch) => {
                    self.micro_batch(weights, batch, input.normalizer, 1.0, last, &mut None)?
                }
                None => {
                    self.idle_micro_batch(last)?;
                    0.0
                }
            };
        }
        let (loss, _) = self.agree(local_loss, StepSignals::default())?;
        self.reduce()?;
        self.zero_grads();
        self.comm_seconds = 0.0;
        Ok(loss)
    }

    /// The global batch's loss (the sum of every rank's) and the signals of any rank, in one
    /// all-reduce over the job.
    fn agree(&mut self, local_loss: f64, signals: StepSignals) -> Result<(f64, StepSignals)> {
        let Some(comm) = self.groups.main.as_deref_mut() else {
            return Ok((local_loss, signals));
        };
        let flag = |b: bool| if b { 1.0 } else { 0.0 };
        let mut l = [
            local_loss as f32,
            flag(signals.stop),
            flag(signals.checkpoint),
        ];
        comm.all_reduce((&mut l[..]).into(), ReduceOp::Sum)
            // As text, on purpose: a rank whose collectives the coordinator aborted (the
            // generation ended elsewhere) fails here, and must exit 1, not 4 (a collective
            // failure of its own); the comm thread's errors keep their type.
            .map_err(|e| anyhow::anyhow!("agreeing on the step's loss: {e}"))?;
        Ok((
            l[0] as f64,
            StepSignals {
                stop: l[1] > 0.0,
                checkpoint: l[2] > 0.0,
            },
        ))
    }

    /// The compute dtype (`None`: fp32).
    fn compute(&self) -> Option<DType> {
        match self.spec.plan.precision {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(DType::BF16),
            Precision::Fp16(_) => Some(DType::F16),
        }
    }
}
