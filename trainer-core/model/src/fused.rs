//! Fused operations of the model: softmax over the last dimension, cross-entropy, SwiGLU,
//! RMSNorm, RoPE, scaled dot-product attention and the linear layer `x·wᵀ`, each one graph
//! node with its own backward instead of burn's chain of elementwise, reduction and layout
//! nodes.
//!
//! Two traits:
//! - [`FusedKernels`] on an inner (non-autodiff) backend: forward and backward kernels on
//!   tensors. The defaults compose burn ops (any backend, any dtype); [`Flex`] runs f32
//!   through [`crate::kernels`] (one or two passes per row, vectorised `exp`) and
//!   [`crate::attention`] (per-head `gemm` on strided views, no layout copies), and every other
//!   dtype through the defaults.
//! - [`Fused`], what the model calls: on an inner backend the forward kernel; on
//!   [`Autodiff`] a tracked node whose backward is the backward kernel, keeping only what that
//!   kernel needs (softmax: its output; cross-entropy: the logits and one log-sum-exp per row;
//!   SwiGLU: both inputs; RMSNorm: input, weight and one inverse RMS per row; RoPE: its
//!   tables; attention: queries, keys, values and the probabilities; linear: the operands the
//!   wanted gradients need).
//!
//! `tests/fused.rs` checks values and gradients against the composite ops on random inputs.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

pub use crate::attention::AttnDims;
use crate::{attention, kernels};

/// Forward and backward kernels of the fused operations on an inner backend. Every method has
/// a default built from burn ops ([`composite`]); a backend overrides what it can do faster.
/// Matrices are `[rows, n]`, reductions run over the last dimension.
pub trait FusedKernels: Backend {
    /// Softmax over the last dimension.
    fn softmax_forward(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        softmax(x, 1)
    }

    /// Softmax backward from its output `y`: `y ⊙ (dy − rowsum(dy ⊙ y))`.
    fn softmax_backward(y: Tensor<Self, 2>, dy: Tensor<Self, 2>) -> Tensor<Self, 2> {
        composite::softmax_backward(y, dy)
    }

    /// Cross-entropy of `[rows, v]` logits: `Σ_counted (lse − x[target]) / max(normalizer, 1)`
    /// as a `[1]` tensor, and every row's log-sum-exp `[rows]`. A negative target carries no
    /// loss.
    fn cross_entropy_forward(
        x: Tensor<Self, 2>,
        targets: &[i64],
        normalizer: f64,
    ) -> (Tensor<Self, 1>, Tensor<Self, 1>) {
        composite::cross_entropy_forward(x, targets, normalizer)
    }

    /// Gradient of [`FusedKernels::cross_entropy_forward`]'s loss times `grad` (`[1]`) with
    /// respect to the logits.
    fn cross_entropy_backward(
        x: Tensor<Self, 2>,
        lse: Tensor<Self, 1>,
        targets: &[i64],
        normalizer: f64,
        grad: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        composite::cross_entropy_backward(x, lse, targets, normalizer, grad)
    }

    /// `silu(g) ⊙ u`.
    fn swiglu_forward(g: Tensor<Self, 2>, u: Tensor<Self, 2>) -> Tensor<Self, 2> {
        composite::swiglu_forward(g, u)
    }

    /// Gradients `(dg, du)` of `silu(g) ⊙ u` for upstream `dh`.
    fn swiglu_backward(
        g: Tensor<Self, 2>,
        u: Tensor<Self, 2>,
        dh: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        composite::swiglu_backward(g, u, dh)
    }

    /// RMSNorm of rows: `y = x · r · w` and `r = 1/sqrt(mean(x²) + eps)` (`[rows]`).
    fn rms_norm_forward(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 1>,
        eps: f64,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        composite::rms_norm_forward(x, w, eps)
    }

    /// RMSNorm backward: `(dx, dw)`.
    fn rms_norm_backward(
        x: Tensor<Self, 2>,
        w: Tensor<Self, 1>,
        r: Tensor<Self, 1>,
        dy: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 1>) {
        composite::rms_norm_backward(x, w, r, dy)
    }

    /// `x·wᵀ` for `[n, in]` rows and an `[out, in]` weight.
    fn linear_forward(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.matmul(w.transpose())
    }

    /// Gradients of `x·wᵀ` for upstream `dy`: `dx = dy·w` when `w` is given (the input needs
    /// a gradient), `dw = dyᵀ·x` when `x` is given (the weight does). `dw` comes out as a
    /// contiguous `[out, in]` matrix, the weight's own layout, so reshaping it to the flat leaf
    /// copies nothing (burn's `matmul(w.transpose())` backward yields a transposed view).
    fn linear_backward(
        x: Option<Tensor<Self, 2>>,
        w: Option<Tensor<Self, 2>>,
        dy: Tensor<Self, 2>,
    ) -> (Option<Tensor<Self, 2>>, Option<Tensor<Self, 2>>) {
        let dx = w.map(|w| dy.clone().matmul(w));
        let dw = x.map(|x| dy.transpose().matmul(x));
        (dx, dw)
    }

    /// Rotate-half RoPE of `[rows, heads·head_dim]` rows with per-element tables of the same
    /// shape (`rope::head_tables`: `cos`, and `sin` with the rotation's sign folded in):
    /// `x·cos + swap_halves(x)·sin`.
    fn rope_forward(
        x: Tensor<Self, 2>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        head_dim: usize,
    ) -> Tensor<Self, 2> {
        composite::rope_forward(x, cos, sin, head_dim)
    }

    /// RoPE's adjoint for upstream `dy`: `dy·cos + swap_halves(dy·sin)`.
    fn rope_backward(
        dy: Tensor<Self, 2>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        head_dim: usize,
    ) -> Tensor<Self, 2> {
        composite::rope_backward(dy, cos, sin, head_dim)
    }

    /// Scaled dot-product attention of `[B·T, H·d]` query rows over `[B·T, KV·d]` key and
    /// value rows with an additive `[B, 1 or H, T, T]` mask (the same for every head):
    /// the output `[B·T, H·d]` and the probabilities `[B·H·T, T]` (kept for backward).
    fn attention_forward(
        q: Tensor<Self, 2>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        mask: Tensor<Self, 4>,
        dims: AttnDims,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        composite::attention_forward(q, k, v, mask, dims)
    }

    /// Attention backward: `(dq, dk, dv)` for the upstream gradient `dout` of the output.
    fn attention_backward(
        q: Tensor<Self, 2>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        p: Tensor<Self, 2>,
        dout: Tensor<Self, 2>,
        dims: AttnDims,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 2>) {
        composite::attention_backward(q, k, v, p, dout, dims)
    }
}

/// The kernels composed from burn ops: the defaults of [`FusedKernels`] and the reference the
/// fast kernels are tested against.
pub mod composite {
    use super::*;

    /// See [`FusedKernels::softmax_backward`].
    pub fn softmax_backward<B: Backend>(y: Tensor<B, 2>, dy: Tensor<B, 2>) -> Tensor<B, 2> {
        let dot = dy.clone().mul(y.clone()).sum_dim(1);
        y.mul(dy.sub(dot))
    }

    /// See [`FusedKernels::cross_entropy_forward`].
    pub fn cross_entropy_forward<B: Backend>(
        x: Tensor<B, 2>,
        targets: &[i64],
        normalizer: f64,
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let [rows, _] = x.dims();
        let device = x.device();
        let (idx, w) = target_tensors::<B>(targets, &device, x.dtype());
        let m = x.clone().max_dim(1);
        let lse = m.clone() + x.clone().sub(m).exp().sum_dim(1).log();
        let picked = x.gather(1, idx);
        let loss = lse
            .clone()
            .sub(picked)
            .mul(w)
            .sum()
            .div_scalar(normalizer.max(1.0));
        (loss, lse.reshape([rows]))
    }

    /// See [`FusedKernels::cross_entropy_backward`].
    pub fn cross_entropy_backward<B: Backend>(
        x: Tensor<B, 2>,
        lse: Tensor<B, 1>,
        targets: &[i64],
        normalizer: f64,
        grad: Tensor<B, 1>,
    ) -> Tensor<B, 2> {
        let [rows, _] = x.dims();
        let device = x.device();
        let (idx, w) = target_tensors::<B>(targets, &device, x.dtype());
        let scale = w.mul(grad.reshape([1, 1])).div_scalar(normalizer.max(1.0));
        let p = x.sub(lse.reshape([rows, 1])).exp().mul(scale.clone());
        p.scatter(1, idx, scale.neg(), IndexingUpdateOp::Add)
    }

    /// See [`FusedKernels::swiglu_forward`].
    pub fn swiglu_forward<B: Backend>(g: Tensor<B, 2>, u: Tensor<B, 2>) -> Tensor<B, 2> {
        burn::tensor::activation::silu(g).mul(u)
    }

    /// See [`FusedKernels::swiglu_backward`].
    pub fn swiglu_backward<B: Backend>(
        g: Tensor<B, 2>,
        u: Tensor<B, 2>,
        dh: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let s = burn::tensor::activation::sigmoid(g.clone());
        let du = dh.clone().mul(g.clone()).mul(s.clone());
        // d silu / dg = s · (1 + g · (1 − s))
        let ds = s
            .clone()
            .mul(g.mul(s.neg().add_scalar(1.0)).add_scalar(1.0));
        (dh.mul(u).mul(ds), du)
    }

    /// See [`FusedKernels::rms_norm_forward`].
    pub fn rms_norm_forward<B: Backend>(
        x: Tensor<B, 2>,
        w: Tensor<B, 1>,
        eps: f64,
    ) -> (Tensor<B, 2>, Tensor<B, 1>) {
        let [rows, n] = x.dims();
        let r = x
            .clone()
            .powi_scalar(2)
            .mean_dim(1)
            .add_scalar(eps)
            .sqrt()
            .recip();
        let y = x.mul(r.clone()).mul(w.reshape([1, n]));
        (y, r.reshape([rows]))
    }

    /// See [`FusedKernels::rms_norm_backward`].
    pub fn rms_norm_backward<B: Backend>(
        x: Tensor<B, 2>,
        w: Tensor<B, 1>,
        r: Tensor<B, 1>,
        dy: Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 1>) {
        let [rows, n] = x.dims();
        let r = r.reshape([rows, 1]);
        let a = dy.clone().mul(w.reshape([1, n]));
        // dx = r · (a − x · r² · Σ(a ⊙ x) / n)
        let s = a.clone().mul(x.clone()).sum_dim(1);
        let c = r.clone().powi_scalar(2).mul(s).div_scalar(n as f64);
        let dx = a.sub(x.clone().mul(c)).mul(r.clone());
        let dw = dy.mul(x).mul(r).sum_dim(0).reshape([n]);
        (dx, dw)
    }

    /// Each head's halves swapped: `[a, b] → [b, a]` per `head_dim` elements of every row.
    fn swap_halves<B: Backend>(x: Tensor<B, 2>, head_dim: usize) -> Tensor<B, 2> {
        let [n, width] = x.dims();
        let half = head_dim / 2;
        let pairs = x.reshape([n * width / head_dim, 2, half]);
        let x1 = pairs.clone().narrow(1, 0, 1);
        let x2 = pairs.narrow(1, 1, 1);
        Tensor::cat(vec![x2, x1], 1).reshape([n, width])
    }

    /// See [`FusedKernels::rope_forward`].
    pub fn rope_forward<B: Backend>(
        x: Tensor<B, 2>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        head_dim: usize,
    ) -> Tensor<B, 2> {
        let swapped = swap_halves(x.clone(), head_dim);
        x.mul(cos).add(swapped.mul(sin))
    }

    /// See [`FusedKernels::rope_backward`].
    pub fn rope_backward<B: Backend>(
        dy: Tensor<B, 2>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        head_dim: usize,
    ) -> Tensor<B, 2> {
        let swapped = swap_halves(dy.clone().mul(sin), head_dim);
        dy.mul(cos).add(swapped)
    }

    /// `[B·T, n·d]` rows as `[B, n, T, d]` heads.
    fn heads<B: Backend>(x: Tensor<B, 2>, n: usize, dims: AttnDims) -> Tensor<B, 4> {
        x.reshape([dims.batch, dims.seq, n, dims.head_dim])
            .swap_dims(1, 2)
    }

    /// `[B, n, T, d]` heads as `[B·T, n·d]` rows.
    fn rows<B: Backend>(x: Tensor<B, 4>, dims: AttnDims) -> Tensor<B, 2> {
        let [b, n, t, d] = x.dims();
        debug_assert_eq!((b, t, d), (dims.batch, dims.seq, dims.head_dim));
        x.swap_dims(1, 2).reshape([b * t, n * d])
    }

    /// Key/value heads repeated for their query heads: `[B, KV, T, d]` → `[B, H, T, d]`.
    fn repeat_kv<B: Backend>(x: Tensor<B, 4>, dims: AttnDims) -> Tensor<B, 4> {
        let (b, t, h, kv, d) = dims.parts();
        if kv == h {
            return x;
        }
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, h / kv, t, d])
            .reshape([b, h, t, d])
    }

    /// Sums the gradients of repeated key/value heads: `[B, H, T, d]` → `[B, KV, T, d]`.
    fn sum_kv<B: Backend>(x: Tensor<B, 4>, dims: AttnDims) -> Tensor<B, 4> {
        let (b, t, h, kv, d) = dims.parts();
        if kv == h {
            return x;
        }
        x.reshape([b, kv, h / kv, t, d])
            .sum_dim(2)
            .reshape([b, kv, t, d])
    }

    /// Whether softmax runs upcast to f32 (bf16/f16 scores, as transformers' eager attention).
    fn upcast(dtype: DType) -> bool {
        matches!(dtype, DType::F16 | DType::BF16)
    }

    /// See [`FusedKernels::attention_forward`].
    pub fn attention_forward<B: Backend>(
        q: Tensor<B, 2>,
        k: Tensor<B, 2>,
        v: Tensor<B, 2>,
        mask: Tensor<B, 4>,
        dims: AttnDims,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (b, t, h, _, _) = dims.parts();
        let q4 = heads(q, h, dims);
        let k4 = repeat_kv(heads(k, dims.kv_heads, dims), dims);
        let v4 = repeat_kv(heads(v, dims.kv_heads, dims), dims);
        let mask = if mask.dims()[1] == h {
            mask
        } else {
            mask.expand([b, h, t, t])
        };
        let scores = q4
            .matmul(k4.swap_dims(2, 3))
            .mul_scalar(f64::from(dims.scale()))
            .add(mask);
        let dtype = scores.dtype();
        let probs = if upcast(dtype) {
            softmax(scores.cast(DType::F32), 3).cast(dtype)
        } else {
            softmax(scores, 3)
        };
        let o = rows(probs.clone().matmul(v4), dims);
        (o, probs.reshape([b * h * t, t]))
    }

    /// See [`FusedKernels::attention_backward`].
    pub fn attention_backward<B: Backend>(
        q: Tensor<B, 2>,
        k: Tensor<B, 2>,
        v: Tensor<B, 2>,
        p: Tensor<B, 2>,
        dout: Tensor<B, 2>,
        dims: AttnDims,
    ) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>) {
        let (b, t, h, _, _) = dims.parts();
        let q4 = heads(q, h, dims);
        let k4 = repeat_kv(heads(k, dims.kv_heads, dims), dims);
        let v4 = repeat_kv(heads(v, dims.kv_heads, dims), dims);
        let do4 = heads(dout, h, dims);
        let dtype = p.dtype();
        let dv = p
            .clone()
            .reshape([b, h, t, t])
            .swap_dims(2, 3)
            .matmul(do4.clone());
        let dp = do4.matmul(v4.swap_dims(2, 3)).reshape([b * h * t, t]);
        let ds = if upcast(dtype) {
            softmax_backward(p.cast(DType::F32), dp.cast(DType::F32)).cast(dtype)
        } else {
            softmax_backward(p, dp)
        };
        let ds = ds.mul_scalar(f64::from(dims.scale())).reshape([b, h, t, t]);
        let dq = ds.clone().matmul(k4);
        let dk = ds.swap_dims(2, 3).matmul(q4);
        (
            rows(dq, dims),
            rows(sum_kv(dk, dims), dims),
            rows(sum_kv(dv, dims), dims),
        )
    }
}

/// Gather indices (`[rows, 1]`, ignored targets pointing at column 0) and 0/1 weights.
fn target_tensors<B: Backend>(
    targets: &[i64],
    device: &B::Device,
    dtype: DType,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let n = targets.len();
    let idx: Vec<i64> = targets.iter().map(|&t| t.max(0)).collect();
    let w: Vec<f32> = targets
        .iter()
        .map(|&t| if t < 0 { 0.0 } else { 1.0 })
        .collect();
    (
        Tensor::from_data(TensorData::new(idx, [n, 1]), device),
        Tensor::<B, 2>::from_data(TensorData::new(w, [n, 1]), device).cast(dtype),
    )
}

/// A Flex tensor's f32 elements when it is f32 (copied only if not contiguous).
fn host_f32<const D: usize>(t: &Tensor<Flex, D>) -> Option<FlexTensor> {
    if t.dtype() != DType::F32 {
        return None;
    }
    Some(t.clone().into_primitive().tensor().to_contiguous())
}

/// A Flex tensor from f32 elements.
fn flex<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(FlexTensor::from_data(
        TensorData::new(data, shape),
    )))
}

/// The scalar of a `[1]` tensor.
fn scalar(t: Tensor<Flex, 1>) -> f32 {
    t.into_data().convert::<f32>().to_vec::<f32>().expect("f32")[0]
}

/// [`kernels::rope`] (forward, or the adjoint when `backward`) when every operand is f32.
fn rope_f32(
    x: &Tensor<Flex, 2>,
    cos: &Tensor<Flex, 2>,
    sin: &Tensor<Flex, 2>,
    head_dim: usize,
    backward: bool,
) -> Option<Tensor<Flex, 2>> {
    let (a, c, s) = (host_f32(x)?, host_f32(cos)?, host_f32(sin)?);
    let y = kernels::rope(
        a.storage::<f32>(),
        c.storage::<f32>(),
        s.storage::<f32>(),
        head_dim,
        backward,
    );
    Some(flex(y, x.dims()))
}

impl FusedKernels for Flex {
    fn softmax_forward(x: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let [rows, n] = x.dims();
        match host_f32(&x) {
            Some(h) => flex(kernels::softmax(h.storage::<f32>(), n), [rows, n]),
            None => softmax(x, 1),
        }
    }

    fn softmax_backward(y: Tensor<Flex, 2>, dy: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let [rows, n] = y.dims();
        match (host_f32(&y), host_f32(&dy)) {
            (Some(a), Some(b)) => flex(
                kernels::softmax_backward(a.storage::<f32>(), b.storage::<f32>(), n),
                [rows, n],
            ),
            _ => composite::softmax_backward(y, dy),
        }
    }

    fn cross_entropy_forward(
        x: Tensor<Flex, 2>,
        targets: &[i64],
        normalizer: f64,
    ) -> (Tensor<Flex, 1>, Tensor<Flex, 1>) {
        let [rows, v] = x.dims();
        let Some(h) = host_f32(&x) else {
            return composite::cross_entropy_forward(x, targets, normalizer);
        };
        let (total, lse) = kernels::cross_entropy(h.storage::<f32>(), v, targets);
        let loss = (total / normalizer.max(1.0)) as f32;
        (flex(vec![loss], [1]), flex(lse, [rows]))
    }

    fn cross_entropy_backward(
        x: Tensor<Flex, 2>,
        lse: Tensor<Flex, 1>,
        targets: &[i64],
        normalizer: f64,
        grad: Tensor<Flex, 1>,
    ) -> Tensor<Flex, 2> {
        let [rows, v] = x.dims();
        match (host_f32(&x), host_f32(&lse)) {
            (Some(h), Some(l)) => {
                let scale = (f64::from(scalar(grad)) / normalizer.max(1.0)) as f32;
                flex(
                    kernels::cross_entropy_backward(
                        h.storage::<f32>(),
                        v,
                        targets,
                        l.storage::<f32>(),
                        scale,
                    ),
                    [rows, v],
                )
            }
            _ => composite::cross_entropy_backward(x, lse, targets, normalizer, grad),
        }
    }

    fn swiglu_forward(g: Tensor<Flex, 2>, u: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let shape = g.dims();
        match (host_f32(&g), host_f32(&u)) {
            (Some(a), Some(b)) => flex(
                kernels::swiglu(a.storage::<f32>(), b.storage::<f32>()),
                shape,
            ),
            _ => composite::swiglu_forward(g, u),
        }
    }

    fn swiglu_backward(
        g: Tensor<Flex, 2>,
        u: Tensor<Flex, 2>,
        dh: Tensor<Flex, 2>,
    ) -> (Tensor<Flex, 2>, Tensor<Flex, 2>) {
        let shape = g.dims();
        match (host_f32(&g), host_f32(&u), host_f32(&dh)) {
            (Some(a), Some(b), Some(d)) => {
                let (dg, du) = kernels::swiglu_backward(
                    a.storage::<f32>(),
                    b.storage::<f32>(),
                    d.storage::<f32>(),
                );
                (flex(dg, shape), flex(du, shape))
            }
            _ => composite::swiglu_backward(g, u, dh),
        }
    }

    fn rms_norm_forward(
        x: Tensor<Flex, 2>,
        w: Tensor<Flex, 1>,
        eps: f64,
    ) -> (Tensor<Flex, 2>, Tensor<Flex, 1>) {
        let [rows, n] = x.dims();
        match (host_f32(&x), host_f32(&w)) {
            (Some(a), Some(b)) => {
                let (y, r) = kernels::rms_norm(a.storage::<f32>(), b.storage::<f32>(), eps as f32);
                (flex(y, [rows, n]), flex(r, [rows]))
            }
            _ => composite::rms_norm_forward(x, w, eps),
        }
    }

    fn rms_norm_backward(
        x: Tensor<Flex, 2>,
        w: Tensor<Flex, 1>,
        r: Tensor<Flex, 1>,
        dy: Tensor<Flex, 2>,
    ) -> (Tensor<Flex, 2>, Tensor<Flex, 1>) {
        let [rows, n] = x.dims();
        match (host_f32(&x), host_f32(&w), host_f32(&r), host_f32(&dy)) {
            (Some(a), Some(b), Some(c), Some(d)) => {
                let (dx, dw) = kernels::rms_norm_backward(
                    a.storage::<f32>(),
                    b.storage::<f32>(),
                    c.storage::<f32>(),
                    d.storage::<f32>(),
                );
                (flex(dx, [rows, n]), flex(dw, [n]))
            }
            _ => composite::rms_norm_backward(x, w, r, dy),
        }
    }

    fn rope_forward(
        x: Tensor<Flex, 2>,
        cos: Tensor<Flex, 2>,
        sin: Tensor<Flex, 2>,
        head_dim: usize,
    ) -> Tensor<Flex, 2> {
        rope_f32(&x, &cos, &sin, head_dim, false)
            .unwrap_or_else(|| composite::rope_forward(x, cos, sin, head_dim))
    }

    fn rope_backward(
        dy: Tensor<Flex, 2>,
        cos: Tensor<Flex, 2>,
        sin: Tensor<Flex, 2>,
        head_dim: usize,
    ) -> Tensor<Flex, 2> {
        rope_f32(&dy, &cos, &sin, head_dim, true)
            .unwrap_or_else(|| composite::rope_backward(dy, cos, sin, head_dim))
    }

    fn attention_forward(
        q: Tensor<Flex, 2>,
        k: Tensor<Flex, 2>,
        v: Tensor<Flex, 2>,
        mask: Tensor<Flex, 4>,
        dims: AttnDims,
    ) -> (Tensor<Flex, 2>, Tensor<Flex, 2>) {
        let [b, mask_heads, t, _] = mask.dims();
        match (host_f32(&q), host_f32(&k), host_f32(&v), host_f32(&mask)) {
            (Some(qh), Some(kh), Some(vh), Some(mh)) => {
                let (o, p) = attention::forward(
                    qh.storage::<f32>(),
                    kh.storage::<f32>(),
                    vh.storage::<f32>(),
                    mh.storage::<f32>(),
                    mask_heads,
                    dims,
                );
                (flex(o, q.dims()), flex(p, [b * dims.heads * t, t]))
            }
            _ => composite::attention_forward(q, k, v, mask, dims),
        }
    }

    fn attention_backward(
        q: Tensor<Flex, 2>,
        k: Tensor<Flex, 2>,
        v: Tensor<Flex, 2>,
        p: Tensor<Flex, 2>,
        dout: Tensor<Flex, 2>,
        dims: AttnDims,
    ) -> (Tensor<Flex, 2>, Tensor<Flex, 2>, Tensor<Flex, 2>) {
        match (
            host_f32(&q),
            host_f32(&k),
            host_f32(&v),
            host_f32(&p),
            host_f32(&dout),
        ) {
            (Some(qh), Some(kh), Some(vh), Some(ph), Some(dh)) => {
                let (dq, dk, dv) = attention::backward(
                    qh.storage::<f32>(),
                    kh.storage::<f32>(),
                    vh.storage::<f32>(),
                    ph.storage::<f32>(),
                    dh.storage::<f32>(),
                    dims,
                );
                (flex(dq, q.dims()), flex(dk, k.dims()), flex(dv, v.dims()))
            }
            _ => composite::attention_backward(q, k, v, p, dout, dims),
        }
    }
}

/// The fused operations as the model calls them, on 2-D `[rows, n]` tensors (see
/// [`softmax_last`] and [`rms_norm`] for other ranks).
pub trait Fused: Backend {
    /// Softmax over the last dimension.
    fn softmax_rows(x: Tensor<Self, 2>) -> Tensor<Self, 2>;
    /// Cross-entropy of `[rows, v]` logits against one target per row (negative: no loss),
    /// summed and divided by `max(normalizer, 1)`: a `[1]` tensor.
    fn cross_entropy_rows(x: Tensor<Self, 2>, targets: &[i64], normalizer: f64) -> Tensor<Self, 1>;
    /// `silu(g) ⊙ u`.
    fn swiglu(g: Tensor<Self, 2>, u: Tensor<Self, 2>) -> Tensor<Self, 2>;
    /// RMSNorm of rows with weight `w`.
    fn rms_norm_rows(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2>;
    /// `x·wᵀ` for `[n, in]` rows and an `[out, in]` weight ([`FusedKernels::linear_forward`]).
    fn linear_rows(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2>;
    /// Rotate-half RoPE of `[rows, heads·head_dim]` rows ([`FusedKernels::rope_forward`]); the
    /// tables are constants (no gradient flows into them).
    fn rope_rows(
        x: Tensor<Self, 2>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        head_dim: usize,
    ) -> Tensor<Self, 2>;
    /// Scaled dot-product attention of `[B·T, H·d]` query rows over `[B·T, KV·d]` key/value
    /// rows with an additive `[B, 1 or H, T, T]` mask: `[B·T, H·d]`
    /// ([`FusedKernels::attention_forward`]).
    fn attention_rows(
        q: Tensor<Self, 2>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        mask: Tensor<Self, 4>,
        dims: AttnDims,
    ) -> Tensor<Self, 2>;
}

/// Softmax over the last dimension of any rank.
pub fn softmax_last<B: Fused, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let shape = x.dims();
    let n = shape[D - 1];
    let rows = shape.iter().product::<usize>() / n.max(1);
    B::softmax_rows(x.reshape([rows, n])).reshape(shape)
}

/// RMSNorm over the last dimension of any rank: `x / sqrt(mean(x²) + eps) · w`.
///
/// Runs in f32 when `x` is bf16/f16 (as transformers' `LlamaRMSNorm` does) and returns `x`'s
/// dtype: in f16, `1 / rms` of small activations is large enough that its powers in the
/// backward overflow (r > 40 gives r³ > 65504), which turned every fp16 gradient into NaN.
/// f32 and f64 run as they are.
pub fn rms_norm<B: Fused, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let shape = x.dims();
    let n = shape[D - 1];
    let rows = shape.iter().product::<usize>() / n.max(1);
    let dtype = x.dtype();
    if matches!(dtype, DType::F16 | DType::BF16) {
        let y = B::rms_norm_rows(
            x.cast(DType::F32).reshape([rows, n]),
            w.cast(DType::F32),
            eps,
        );
        return y.cast(dtype).reshape(shape);
    }
    B::rms_norm_rows(x.reshape([rows, n]), w, eps).reshape(shape)
}

/// An inner backend's [`Fused`]: the forward kernels (no graph to record).
macro_rules! fused_from_kernels {
    ($backend:ty) => {
        impl Fused for $backend {
            fn softmax_rows(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
                <Self as FusedKernels>::softmax_forward(x)
            }
            fn cross_entropy_rows(
                x: Tensor<Self, 2>,
                targets: &[i64],
                normalizer: f64,
            ) -> Tensor<Self, 1> {
                <Self as FusedKernels>::cross_entropy_forward(x, targets, normalizer).0
            }
            fn swiglu(g: Tensor<Self, 2>, u: Tensor<Self, 2>) -> Tensor<Self, 2> {
                <Self as FusedKernels>::swiglu_forward(g, u)
            }
            fn rms_norm_rows(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
                <Self as FusedKernels>::rms_norm_forward(x, w, eps).0
            }
            fn linear_rows(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
                <Self as FusedKernels>::linear_forward(x, w)
            }
            fn rope_rows(
                x: Tensor<Self, 2>,
                cos: Tensor<Self, 2>,
                sin: Tensor<Self, 2>,
                head_dim: usize,
            ) -> Tensor<Self, 2> {
                <Self as FusedKernels>::rope_forward(x, cos, sin, head_dim)
            }
            fn attention_rows(
                q: Tensor<Self, 2>,
                k: Tensor<Self, 2>,
                v: Tensor<Self, 2>,
                mask: Tensor<Self, 4>,
                dims: AttnDims,
            ) -> Tensor<Self, 2> {
                <Self as FusedKernels>::attention_forward(q, k, v, mask, dims).0
            }
        }
    };
}

fused_from_kernels!(Flex);

#[cfg(feature = "ndarray")]
impl FusedKernels for burn::backend::NdArray {}
#[cfg(feature = "ndarray")]
fused_from_kernels!(burn::backend::NdArray);

#[cfg(feature = "cuda")]
impl FusedKernels for burn::backend::Cuda {}
#[cfg(feature = "cuda")]
fused_from_kernels!(burn::backend::Cuda);

/// A primitive as a tensor of the inner backend.
fn inner<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// A tensor's float primitive.
fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

impl<B: FusedKernels, C: CheckpointStrategy> Fused for Autodiff<B, C> {
    fn softmax_rows(x: Tensor<Self, 2>) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct SoftmaxRows;

        impl<B: FusedKernels> Backward<B, 1> for SoftmaxRows {
            /// The output.
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let y = inner::<B, 2>(ops.state);
                unary::<B, _>(ops.parents, ops.node, grads, |dy| {
                    prim(B::softmax_backward(y, inner(dy)))
                });
            }
        }

        let x = prim(x);
        let node = x.node.clone();
        let y = prim(B::softmax_forward(inner::<B, 2>(x.primitive)));
        let out = match SoftmaxRows.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        inner(out)
    }

    fn cross_entropy_rows(x: Tensor<Self, 2>, targets: &[i64], normalizer: f64) -> Tensor<Self, 1> {
        #[derive(Debug)]
        struct CrossEntropyRows;

        impl<B: FusedKernels> Backward<B, 1> for CrossEntropyRows {
            /// Logits, per-row log-sum-exp, targets, normalizer.
            type State = (FloatTensor<B>, FloatTensor<B>, Arc<[i64]>, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, lse, targets, normalizer) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    prim(B::cross_entropy_backward(
                        inner(x),
                        inner(lse),
                        &targets,
                        normalizer,
                        inner(grad),
                    ))
                });
            }
        }

        let x = prim(x);
        let node = x.node.clone();
        let logits = x.primitive;
        let (loss, lse) = B::cross_entropy_forward(inner(logits.clone()), targets, normalizer);
        let loss = prim(loss);
        let out = match CrossEntropyRows
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((logits, prim(lse), Arc::from(targets), normalizer), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(loss),
        };
        inner(out)
    }

    fn swiglu(g: Tensor<Self, 2>, u: Tensor<Self, 2>) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct Swiglu;

        impl<B: FusedKernels> Backward<B, 2> for Swiglu {
            /// Both inputs.
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (g, u) = ops.state;
                let dh = grads.consume::<B>(&ops.node);
                let (dg, du) = B::swiglu_backward(inner(g), inner(u), inner(dh));
                let [pg, pu] = ops.parents;
                if let Some(p) = pg {
                    grads.register::<B>(p.id, prim(dg));
                }
                if let Some(p) = pu {
                    grads.register::<B>(p.id, prim(du));
                }
            }
        }

        let (g, u) = (prim(g), prim(u));
        let nodes = [g.node.clone(), u.node.clone()];
        let (gp, up) = (g.primitive, u.primitive);
        let h = prim(B::swiglu_forward(inner(gp.clone()), inner(up.clone())));
        let out = match Swiglu.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((gp, up), h),
            OpsKind::UnTracked(prep) => prep.finish(h),
        };
        inner(out)
    }

    fn rms_norm_rows(x: Tensor<Self, 2>, w: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct RmsNormRows;

        impl<B: FusedKernels> Backward<B, 2> for RmsNormRows {
            /// Input, weight, inverse RMS per row.
            type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, w, r) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let (dx, dw) = B::rms_norm_backward(inner(x), inner(w), inner(r), inner(dy));
                let [px, pw] = ops.parents;
                if let Some(p) = px {
                    grads.register::<B>(p.id, prim(dx));
                }
                if let Some(p) = pw {
                    grads.register::<B>(p.id, prim(dw));
                }
            }
        }

        let (x, w) = (prim(x), prim(w));
        let nodes = [x.node.clone(), w.node.clone()];
        let (xp, wp) = (x.primitive, w.primitive);
        let (y, r) = B::rms_norm_forward(inner(xp.clone()), inner(wp.clone()), eps);
        let y = prim(y);
        let out = match RmsNormRows.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((xp, wp, prim(r)), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        inner(out)
    }

    fn attention_rows(
        q: Tensor<Self, 2>,
        k: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        mask: Tensor<Self, 4>,
        dims: AttnDims,
    ) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct AttentionRows;

        impl<B: FusedKernels> Backward<B, 3> for AttentionRows {
            /// Queries, keys, values, probabilities, shapes.
            type State = (
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                FloatTensor<B>,
                AttnDims,
            );

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (q, k, v, p, dims) = ops.state;
                let dout = grads.consume::<B>(&ops.node);
                let (dq, dk, dv) = B::attention_backward(
                    inner(q),
                    inner(k),
                    inner(v),
                    inner(p),
                    inner(dout),
                    dims,
                );
                let [pq, pk, pv] = ops.parents;
                for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, prim(grad));
                    }
                }
            }
        }

        let (q, k, v) = (prim(q), prim(k), prim(v));
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let (qp, kp, vp) = (q.primitive, k.primitive, v.primitive);
        // The mask is a constant of the batch: no gradient flows into it.
        let mask = prim(mask).primitive;
        let (o, p) = B::attention_forward(
            inner(qp.clone()),
            inner(kp.clone()),
            inner(vp.clone()),
            inner(mask),
            dims,
        );
        let o = prim(o);
        let out = match AttentionRows.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((qp, kp, vp, prim(p), dims), o),
            OpsKind::UnTracked(prep) => prep.finish(o),
        };
        inner(out)
    }

    fn rope_rows(
        x: Tensor<Self, 2>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        head_dim: usize,
    ) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct RopeRows;

        impl<B: FusedKernels> Backward<B, 1> for RopeRows {
            /// The tables and the head width.
            type State = (FloatTensor<B>, FloatTensor<B>, usize);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (cos, sin, head_dim) = ops.state;
                unary::<B, _>(ops.parents, ops.node, grads, |dy| {
                    prim(B::rope_backward(
                        inner(dy),
                        inner(cos),
                        inner(sin),
                        head_dim,
                    ))
                });
            }
        }

        let x = prim(x);
        let node = x.node.clone();
        let (cos, sin) = (prim(cos).primitive, prim(sin).primitive);
        let y = prim(B::rope_forward(
            inner(x.primitive),
            inner(cos.clone()),
            inner(sin.clone()),
            head_dim,
        ));
        let out = match RopeRows.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((cos, sin, head_dim), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        inner(out)
    }

    fn linear_rows(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct Linear;

        impl<B: FusedKernels> Backward<B, 2> for Linear {
            /// The input when the weight needs a gradient, the weight when the input does.
            type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let (x, w) = ops.state;
                let dy = grads.consume::<B>(&ops.node);
                let [px, pw] = ops.parents;
                let (dx, dw) = B::linear_backward(
                    x.filter(|_| pw.is_some()).map(inner),
                    w.filter(|_| px.is_some()).map(inner),
                    inner(dy),
                );
                if let (Some(p), Some(g)) = (px, dx) {
                    grads.register::<B>(p.id, prim(g));
                }
                if let (Some(p), Some(g)) = (pw, dw) {
                    grads.register::<B>(p.id, prim(g));
                }
            }
        }

        let (x, w) = (prim(x), prim(w));
        let (x_tracked, w_tracked) = (x.is_tracked(), w.is_tracked());
        let nodes = [x.node.clone(), w.node.clone()];
        let (xp, wp) = (x.primitive, w.primitive);
        let y = prim(B::linear_forward(inner(xp.clone()), inner(wp.clone())));
        let out = match Linear.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                prep.finish((w_tracked.then_some(xp), x_tracked.then_some(wp)), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        inner(out)
    }
}
