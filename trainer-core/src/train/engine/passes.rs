//! Forward and backward of one micro-batch, for each [`Pass`]: the whole model as one graph,
//! one kept graph per unit with each unit's gradients handed to the communication thread as its
//! backward ends, or (ZeRO-3) unit by unit with the parameters gathered per use and each unit
//! recomputed in backward. Leaves are built on the engine's device from the host units and
//! their gradients read back to the host.

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData};
use ringmaster_data::batch::Batch;
use ringmaster_model::model::{Dropout, Inputs, Llama, cross_entropy, leaf_grads};
use ringmaster_model::{LlamaConfig, ParamStore, UnitWeights};

use super::comm::CommQueue;
use super::layout::{FlatLayout, pad_unit};
use super::{Engine, Pass, TrainBackend, Weights};

/// A leaf tensor on `device` holding `data`.
fn leaf<B: AutodiffBackend>(data: &[f32], grad: bool, device: &B::Device) -> Tensor<B, 1> {
    let t = Tensor::<B, 1>::from_data(TensorData::new(data.to_vec(), [data.len()]), device);
    if grad { t.require_grad() } else { t }
}

impl<B: TrainBackend> Engine<'_, B> {
    /// One micro-batch forward and backward through the engine's pass, its gradients
    /// accumulated (or handed to the communication thread); returns its unscaled loss.
    /// `last`: the step's last micro-batch.
    pub(super) fn micro_batch(
        &mut self,
        weights: &mut Weights<'_>,
        batch: &Batch,
        normalizer: f64,
        scale: f64,
        last: bool,
        dropout: &mut Option<Dropout>,
    ) -> Result<f64> {
        let cfg = self.spec.model.clone();
        let targets = batch.shifted_labels();
        let inp = Inputs::<B>::new(
            &cfg,
            batch.batch_size,
            batch.seq_len,
            &batch.input_ids,
            &batch.position_ids,
            &batch.segment_ids,
            &self.device,
        )?;
        let mb = MicroBatch {
            cfg: &cfg,
            inp: &inp,
            targets: &targets,
            normalizer,
            scale,
            compute: self.compute(),
            device: &self.device.clone(),
        };
        match self.pass {
            Pass::UnitByUnit => {
                self.with_comm_thread(&cfg, true, |layout, queue| unit_by_unit(layout, &mb, queue))
            }
            Pass::UnitGraphs => {
                let params: &ParamStore = weights.base;
                let value = self.with_comm_thread(&cfg, false, |layout, queue| {
                    unit_graphs(layout, params, &mb, last, queue)
                })?;
                self.reduced_in_backward = last;
                Ok(value)
            }
            Pass::WholeModel => {
                let (value, grads) = whole_model(weights, &mb, dropout.as_mut())?;
                self.accumulate(grads)?;
                Ok(value)
            }
        }
    }

    /// An empty micro-batch (a short last global batch dealt round-robin leaves some ranks
    /// without samples): takes part in every collective the other ranks' micro-batch makes,
    /// with zero gradients, so that the ring's calls still match. `last`: the step's last
    /// micro-batch. Stages 0–1 reducing after backward make none.
    pub(super) fn idle_micro_batch(&mut self, last: bool) -> Result<()> {
        let cfg = self.spec.model.clone();
        if self.pass == Pass::UnitGraphs {
            // The calls of `unit_graphs`: every unit in reverse.
            self.with_comm_thread(&cfg, false, |layout, queue| {
                for u in (0..layout.units.len()).rev() {
                    let zeros = layout.units[u]
                        .tensors
                        .clone()
                        .map(|t| vec![0.0f32; layout.sizes[t]])
                        .collect();
                    queue.unit(u, zeros, last)?;
                }
                Ok(())
            })?;
            self.reduced_in_backward = last;
            return Ok(());
        }
        match self.spec.stage {
            0 | 1 => Ok(()),
            2 => {
                for u in 0..self.layout.units.len() {
                    let zeros = vec![0.0f32; self.layout.units[u].shard * self.layout.group];
                    self.reduce_unit(u, zeros)?;
                }
                Ok(())
            }
            _ => self.with_comm_thread(&cfg, true, |layout, queue| {
                // The calls `unit_by_unit` makes, in its order, without compute.
                let last = layout.units.len() - 1;
                let zeros = |u: usize| vec![0.0f32; layout.units[u].shard * layout.group];
                for u in 0..=last {
                    queue.take(u)?;
                }
                if cfg.tie_word_embeddings {
                    queue.take(0)?;
                }
                queue.reduce(last, zeros(last))?;
                for u in (0..last).rev() {
                    queue.take(u)?;
                    queue.reduce(u, zeros(u))?;
                }
                Ok(())
            }),
        }
    }
}

/// The whole model as one graph (stages 0–2 reducing after backward, and LoRA): its unscaled
/// loss and the trainable tensors' gradients in store order.
fn whole_model<B: TrainBackend>(
    weights: &Weights<'_>,
    mb: &MicroBatch<'_, B>,
    dropout: Option<&mut Dropout>,
) -> Result<(f64, Vec<Vec<f32>>)> {
    // A fresh set of leaves per micro-batch: burn's autodiff frees a graph's nodes on
    // backward, and leaves reused in a second graph lose their gradients (measured:
    // accumulation then equals the first micro-batch only).
    let lora = weights.lora.as_ref().map(|(l, a)| (*l, &**a));
    let model = Llama::<B>::new_mixed(
        mb.cfg,
        weights.base,
        lora.is_none(),
        lora,
        mb.device,
        mb.compute,
    )?;
    let leaves = if weights.lora.is_some() {
        model.adapter_leaves()
    } else {
        model.base_leaves()
    };
    let logits = model.forward(mb.inp, dropout);
    let mut loss = cross_entropy(logits, mb.targets, mb.normalizer);
    if mb.scale != 1.0 {
        loss = loss.mul_scalar(mb.scale);
    }
    let g = loss.backward();
    let value = crate::train::scalar(loss.inner()) / mb.scale;
    let grads = leaf_grads(leaves, &g);
    Ok((value, grads))
}

/// The leaves of unit `u` cut from its full padded flat parameters.
fn unit_leaves<B: AutodiffBackend>(
    layout: &FlatLayout,
    u: usize,
    full: &[f32],
    grad: bool,
    device: &B::Device,
) -> Vec<Tensor<B, 1>> {
    let unit = &layout.units[u];
    unit.tensors
        .clone()
        .enumerate()
        .map(|(k, t)| {
            let off = unit.offsets[k];
            leaf::<B>(&full[off..off + layout.sizes[t]], grad, device)
        })
        .collect()
}

/// One micro-batch as the passes see it.
pub(super) struct MicroBatch<'a, B: TrainBackend> {
    pub cfg: &'a LlamaConfig,
    pub inp: &'a Inputs<B>,
    /// Next-token targets of every position.
    pub targets: &'a [i64],
    /// The loss is divided by it (the global batch's target count), like the whole-model path.
    pub normalizer: f64,
    /// Loss scale applied before backward (fp16; 1 otherwise).
    pub scale: f64,
    /// Compute dtype (`None` or F32: fp32).
    pub compute: Option<DType>,
    /// The engine's device.
    pub device: &'a B::Device,
}

impl<B: TrainBackend> MicroBatch<'_, B> {
    /// The inputs in the compute dtype (mask and RoPE tables cast for bf16/f16).
    fn compute_inputs(&self) -> Inputs<B> {
        match self.compute {
            Some(dt) if dt != DType::F32 => self.inp.cast(dt),
            _ => self.inp.clone(),
        }
    }
}

/// [`Pass::UnitByUnit`]: forward unit by unit keeping only unit
/// inputs, then backward in reverse, recomputing each unit with the upstream gradient injected
/// and handing its gradients to the communication thread.
fn unit_by_unit<B: TrainBackend>(
    layout: &FlatLayout,
    mb: &MicroBatch<'_, B>,
    queue: &mut CommQueue<'_>,
) -> Result<f64> {
    let &MicroBatch { cfg, compute, .. } = mb;
    let last = layout.units.len() - 1;
    let inp = mb.compute_inputs();
    let mut build = |u: usize, grad: bool| -> Result<Vec<Tensor<B, 1>>> {
        let full = queue.take(u)?;
        Ok(unit_leaves::<B>(layout, u, &full, grad, mb.device))
    };
    // Forward without a graph, keeping only each unit's input.
    let mut saved: Vec<Option<Tensor<B, 2>>> = Vec::with_capacity(last);
    let mut x: Option<Tensor<B, 2>> = None;
    for u in 0..last {
        let leaves = build(u, false)?;
        let w = UnitWeights::new(cfg, u, &leaves, None, compute)?;
        drop(leaves);
        saved.push(x.clone());
        x = Some(w.forward(cfg, x, &inp, compute).detach());
    }
    // The head (with the embedding table when tied) and the loss.
    let leaves = build(last, true)?;
    let tied = if cfg.tie_word_embeddings {
        Some(build(0, true)?.remove(0))
    } else {
        None
    };
    let xin = x.context("a model without units")?.require_grad();
    let HeadPass {
        value,
        grads: head_grads,
        mut pending_embed,
        mut up,
    } = head_pass(mb, &inp, last, leaves, tied, xin)?;
    queue.reduce(last, pad_unit(layout, last, &head_grads))?;
    drop(head_grads);
    // Blocks and embeddings in reverse: recompute with the upstream gradient injected.
    for u in (0..last).rev() {
        let full = queue.take(u)?;
        let leaves = unit_leaves::<B>(layout, u, &full, true, mb.device);
        drop(full);
        let w = UnitWeights::new(cfg, u, &leaves, None, compute)?;
        let xin = saved.pop().flatten().map(Tensor::require_grad);
        let out = w.forward(cfg, xin.clone(), &inp, compute);
        drop(w);
        let grads = unit_backward(u, &leaves, xin, out, &mut up, &mut pending_embed)?;
        drop(leaves);
        queue.reduce(u, pad_unit(layout, u, &grads))?;
    }
    Ok(value)
}

/// [`Pass::UnitGraphs`]: forward one kept graph per unit,
/// then backward from the loss down, unit by unit, each unit's gradients queued for the
/// communication thread before the next unit's backward runs.
fn unit_graphs<B: TrainBackend>(
    layout: &FlatLayout,
    params: &ParamStore,
    mb: &MicroBatch<'_, B>,
    last: bool,
    queue: &mut CommQueue<'_>,
) -> Result<f64> {
    let &MicroBatch { cfg, compute, .. } = mb;
    let head = layout.units.len() - 1;
    let inp = mb.compute_inputs();
    let leaves_of = |u: usize| -> Vec<Tensor<B, 1>> {
        layout.units[u]
            .tensors
            .clone()
            .map(|t| leaf::<B>(params.data(t), true, mb.device))
            .collect()
    };
    // Forward: unit u's graph starts at a fresh leaf holding unit u−1's output.
    let mut units: Vec<UnitGraph<B>> = Vec::with_capacity(head);
    let mut x: Option<Tensor<B, 2>> = None;
    for u in 0..head {
        let leaves = leaves_of(u);
        let w = UnitWeights::new(cfg, u, &leaves, None, compute)?;
        let xin = x.take().map(|t| t.detach().require_grad());
        let out = w.forward(cfg, xin.clone(), &inp, compute);
        x = Some(out.clone());
        units.push((leaves, xin, out));
    }
    // The head; a tied head gets its own leaf of the embedding table (a leaf shared by two
    // graphs would lose its gradient to the first backward).
    let leaves = leaves_of(head);
    let tied = cfg
        .tie_word_embeddings
        .then(|| leaf::<B>(params.data(layout.units[0].tensors.start), true, mb.device));
    let xin = x.context("a model without units")?.detach().require_grad();
    let HeadPass {
        value,
        grads: head_grads,
        mut pending_embed,
        mut up,
    } = head_pass(mb, &inp, head, leaves, tied, xin)?;
    queue.unit(head, head_grads, last)?;
    while let Some((leaves, xin, out)) = units.pop() {
        let u = units.len();
        let grads = unit_backward(u, &leaves, xin, out, &mut up, &mut pending_embed)?;
        drop(leaves);
        queue.unit(u, grads, last)?;
    }
    Ok(value)
}

/// The gradient flowing down between units (no graph).
type UpGrad<B> = Tensor<<B as AutodiffBackend>::InnerBackend, 2>;

/// What the head's backward leaves for the units below it.
struct HeadPass<B: AutodiffBackend> {
    /// The micro-batch's loss (unscaled).
    value: f64,
    /// The head unit's gradients, one buffer per tensor.
    grads: Vec<Vec<f32>>,
    /// A tied head's gradient of the embedding table, for unit 0.
    pending_embed: Option<Vec<f32>>,
    /// The gradient at the head's input.
    up: UpGrad<B>,
}

/// Head unit `head` on `xin` (a leaf that needs its gradient), the loss times the fp16 scale,
/// and its backward: shared by [`unit_by_unit`] and [`unit_graphs`].
fn head_pass<B: TrainBackend>(
    mb: &MicroBatch<'_, B>,
    inp: &Inputs<B>,
    head: usize,
    leaves: Vec<Tensor<B, 1>>,
    tied: Option<Tensor<B, 1>>,
    xin: Tensor<B, 2>,
) -> Result<HeadPass<B>> {
    let w = UnitWeights::new(mb.cfg, head, &leaves, tied.as_ref(), mb.compute)?;
    let logits = w.forward(mb.cfg, Some(xin.clone()), inp, mb.compute);
    drop(w);
    let mut loss = cross_entropy(logits, mb.targets, mb.normalizer);
    if mb.scale != 1.0 {
        loss = loss.mul_scalar(mb.scale);
    }
    let value = crate::train::scalar(loss.clone().inner()) / mb.scale;
    let g = loss.backward();
    let grads = leaf_grads(&leaves, &g);
    let pending_embed = tied.map(|t| leaf_grads(std::slice::from_ref(&t), &g).remove(0));
    let up = xin
        .grad(&g)
        .context("no gradient reached the head's input")?;
    Ok(HeadPass {
        value,
        grads,
        pending_embed,
        up,
    })
}

/// Backward of unit `u`'s graph `out` with the upstream gradient `up` injected: the unit's
/// gradients (a tied head's embedding gradient added to unit 0's); `up` becomes the gradient at
/// the unit's input, where it has one.
fn unit_backward<B: TrainBackend>(
    u: usize,
    leaves: &[Tensor<B, 1>],
    xin: Option<Tensor<B, 2>>,
    out: Tensor<B, 2>,
    up: &mut UpGrad<B>,
    pending_embed: &mut Option<Vec<f32>>,
) -> Result<Vec<Vec<f32>>> {
    let g = (out * Tensor::from_inner(up.clone())).sum().backward();
    let mut grads = leaf_grads(leaves, &g);
    if u == 0
        && let Some(p) = pending_embed.take()
    {
        grads[0].iter_mut().zip(&p).for_each(|(d, s)| *d += s);
    }
    if let Some(xin) = xin {
        *up = xin
            .grad(&g)
            .with_context(|| format!("no gradient reached unit {u}'s input"))?;
    }
    Ok(grads)
}

/// One unit's kept forward graph: its parameter leaves, the detached leaf holding its input
/// (none for the embeddings) and its output.
type UnitGraph<B> = (Vec<Tensor<B, 1>>, Option<Tensor<B, 2>>, Tensor<B, 2>);
