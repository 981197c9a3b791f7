//! The fused operations (`ringmaster_model::fused`) against burn's composite ops on random
//! inputs: values and gradients, f32, through `Autodiff<Flex>` (the training path) and on bare
//! `Flex` (inference).
//!
//! Tolerance: 2e-6 · (1 + |reference|) per element for values and gradients. The fused
//! kernels sum in eight lanes and use a polynomial `exp` (≤ 2 ulp), so they differ from the
//! composite ops by f32 rounding only; a wrong backward term is off by O(1).

use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::{Int, Tensor, TensorData};
use ringmaster_model::fused::{self, Fused};
use ringmaster_model::params::Rng;

type AD = Autodiff<Flex>;

const TOL: f32 = 2e-6;

fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

fn t2<B: burn::tensor::backend::Backend>(data: &[f32], shape: [usize; 2]) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(data.to_vec(), shape), &Default::default())
}

fn t1<B: burn::tensor::backend::Backend>(data: &[f32]) -> Tensor<B, 1> {
    Tensor::from_data(
        TensorData::new(data.to_vec(), [data.len()]),
        &Default::default(),
    )
}

fn host<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOL * (1.0 + w.abs()),
            "{what}[{i}]: fused {g} vs composite {w}"
        );
    }
}

/// Shapes that exercise the eight-lane bodies, their tails and several rayon tasks.
const SHAPES: [(usize, usize); 5] = [(1, 1), (3, 7), (5, 8), (17, 203), (40, 1031)];

#[test]
fn softmax_matches_composite_forward_and_backward() {
    let mut rng = Rng::new(1);
    for (rows, n) in SHAPES {
        let mut x = random(&mut rng, rows * n, 4.0);
        // Masked entries as attention makes them (finite −1e9), and a row masked but one.
        for (i, v) in x.iter_mut().enumerate() {
            if i % 5 == 3 {
                *v = -1.0e9;
            }
        }
        for v in x.iter_mut().take(n).skip(1) {
            *v = -1.0e9;
        }
        let r = random(&mut rng, rows * n, 1.0);
        let run = |fused_op: bool| {
            let xt = t2::<AD>(&x, [rows, n]).require_grad();
            let y = if fused_op {
                fused::softmax_last(xt.clone())
            } else {
                softmax(xt.clone(), 1)
            };
            let grads = (y.clone() * t2::<AD>(&r, [rows, n])).sum().backward();
            (host(y), host(xt.grad(&grads).unwrap()))
        };
        let (y, dx) = run(true);
        let (y_ref, dx_ref) = run(false);
        close(&y, &y_ref, &format!("softmax {rows}x{n}"));
        close(&dx, &dx_ref, &format!("softmax grad {rows}x{n}"));
        let plain = host(fused::softmax_last(t2::<Flex>(&x, [rows, n])));
        close(&plain, &y_ref, "softmax on Flex");
    }
    // A 4-D input (attention scores) goes through the same rows.
    let x = random(&mut rng, 2 * 3 * 5 * 5, 2.0);
    let x4 = Tensor::<Flex, 4>::from_data(
        TensorData::new(x.clone(), [2, 3, 5, 5]),
        &Default::default(),
    );
    close(
        &host(fused::softmax_last(x4.clone())),
        &host(softmax(x4, 3)),
        "softmax 4-D",
    );
}

/// The composite cross-entropy the model used before the fused op.
fn reference_cross_entropy(
    logits: Tensor<AD, 2>,
    targets: &[i64],
    normalizer: f64,
) -> Tensor<AD, 1> {
    let n = targets.len();
    let idx: Vec<i64> = targets.iter().map(|&t| t.max(0)).collect();
    let w: Vec<f32> = targets
        .iter()
        .map(|&t| if t < 0 { 0.0 } else { 1.0 })
        .collect();
    let idx = Tensor::<AD, 2, Int>::from_data(TensorData::new(idx, [n, 1]), &Default::default());
    let w = t2::<AD>(&w, [n, 1]);
    log_softmax(logits, 1)
        .gather(1, idx)
        .mul(w)
        .sum()
        .neg()
        .div_scalar(normalizer.max(1.0))
}

#[test]
fn cross_entropy_matches_composite_forward_and_backward() {
    let mut rng = Rng::new(2);
    for (rows, v) in SHAPES {
        let x = random(&mut rng, rows * v, 3.0);
        let targets: Vec<i64> = (0..rows)
            .map(|i| {
                if i % 4 == 2 {
                    -100
                } else {
                    (rng.next_u64() % v as u64) as i64
                }
            })
            .collect();
        for normalizer in [0.0, 7.0] {
            let run = |fused_op: bool| {
                let xt = t2::<AD>(&x, [rows, v]).require_grad();
                let loss = if fused_op {
                    AD::cross_entropy_rows(xt.clone(), &targets, normalizer)
                } else {
                    reference_cross_entropy(xt.clone(), &targets, normalizer)
                };
                // An upstream gradient other than 1 (as a scaled loss gives).
                let grads = loss.clone().mul_scalar(1.7).backward();
                (host(loss), host(xt.grad(&grads).unwrap()))
            };
            let (loss, dx) = run(true);
            let (loss_ref, dx_ref) = run(false);
            close(&loss, &loss_ref, &format!("cross-entropy {rows}x{v}"));
            close(&dx, &dx_ref, &format!("cross-entropy grad {rows}x{v}"));
            let plain = Flex::cross_entropy_rows(t2::<Flex>(&x, [rows, v]), &targets, normalizer);
            close(&host(plain), &loss_ref, "cross-entropy on Flex");
        }
    }
}

#[test]
fn swiglu_matches_composite_forward_and_backward() {
    let mut rng = Rng::new(3);
    for (rows, n) in SHAPES {
        let mut g = random(&mut rng, rows * n, 3.0);
        // Saturated gates on both sides.
        if g.len() > 2 {
            g[0] = 95.0;
            g[1] = -95.0;
        }
        let u = random(&mut rng, rows * n, 1.0);
        let r = random(&mut rng, rows * n, 1.0);
        let run = |fused_op: bool| {
            let gt = t2::<AD>(&g, [rows, n]).require_grad();
            let ut = t2::<AD>(&u, [rows, n]).require_grad();
            let h = if fused_op {
                AD::swiglu(gt.clone(), ut.clone())
            } else {
                silu(gt.clone()) * ut.clone()
            };
            let grads = (h.clone() * t2::<AD>(&r, [rows, n])).sum().backward();
            (
                host(h),
                host(gt.grad(&grads).unwrap()),
                host(ut.grad(&grads).unwrap()),
            )
        };
        let (h, dg, du) = run(true);
        let (h_ref, dg_ref, du_ref) = run(false);
        close(&h, &h_ref, &format!("swiglu {rows}x{n}"));
        close(&dg, &dg_ref, &format!("swiglu dg {rows}x{n}"));
        close(&du, &du_ref, &format!("swiglu du {rows}x{n}"));
    }
}

#[test]
fn rms_norm_matches_composite_forward_and_backward() {
    let mut rng = Rng::new(4);
    for (rows, n) in SHAPES {
        let x = random(&mut rng, rows * n, 2.0);
        let w = random(&mut rng, n, 1.0);
        let r = random(&mut rng, rows * n, 1.0);
        let eps = 1e-5;
        let run = |fused_op: bool| {
            let xt = t2::<AD>(&x, [rows, n]).require_grad();
            let wt = t1::<AD>(&w).require_grad();
            let y = if fused_op {
                fused::rms_norm(xt.clone(), wt.clone(), eps)
            } else {
                let var = xt.clone().powi_scalar(2).mean_dim(1);
                xt.clone()
                    .div(var.add_scalar(eps).sqrt())
                    .mul(wt.clone().reshape([1, n]))
            };
            let grads = (y.clone() * t2::<AD>(&r, [rows, n])).sum().backward();
            (
                host(y),
                host(xt.grad(&grads).unwrap()),
                host(wt.grad(&grads).unwrap()),
            )
        };
        let (y, dx, dw) = run(true);
        let (y_ref, dx_ref, dw_ref) = run(false);
        close(&y, &y_ref, &format!("rms_norm {rows}x{n}"));
        close(&dx, &dx_ref, &format!("rms_norm dx {rows}x{n}"));
        // dw sums over rows: allow for the longer sum.
        for (i, (a, b)) in dw.iter().zip(&dw_ref).enumerate() {
            assert!(
                (a - b).abs() <= TOL * rows as f32 * (1.0 + b.abs()),
                "rms_norm dw[{i}] {rows}x{n}: fused {a} vs composite {b}"
            );
        }
    }
}

#[test]
fn only_the_inputs_that_need_gradients_get_them() {
    // A frozen RMSNorm weight (LoRA training) and a frozen up projection: the fused ops still
    // give the tracked input its gradient and nothing to the frozen one.
    let mut rng = Rng::new(5);
    let (rows, n) = (3, 9);
    let x = random(&mut rng, rows * n, 1.0);
    let w = random(&mut rng, n, 1.0);
    let xt = t2::<AD>(&x, [rows, n]).require_grad();
    let wt = t1::<AD>(&w);
    let y = fused::rms_norm(xt.clone(), wt.clone(), 1e-6);
    let u = t2::<AD>(&x, [rows, n]);
    let h = AD::swiglu(y, u.clone());
    let grads = h.sum().backward();
    assert!(xt.grad(&grads).is_some());
    assert!(wt.grad(&grads).is_none());
    assert!(u.grad(&grads).is_none());
}

#[test]
fn rms_norm_in_f16_runs_in_f32_and_keeps_gradients_finite() {
    // Activations of an initialised model are small (|x| ~ 0.01): 1 / rms is then about 100,
    // and its cube overflows f16. The f16 path must match the f32 one to f16 precision.
    let mut rng = Rng::new(6);
    let (rows, n) = (6, 64);
    let x = random(&mut rng, rows * n, 0.01);
    let w = random(&mut rng, n, 1.0);
    let r = random(&mut rng, rows * n, 1.0);
    let run = |dtype: burn::tensor::DType| {
        let xt = t2::<AD>(&x, [rows, n]).require_grad();
        let wt = t1::<AD>(&w).require_grad();
        let y = fused::rms_norm(xt.clone().cast(dtype), wt.clone().cast(dtype), 1e-6);
        assert_eq!(y.dtype(), dtype);
        let out = y.cast(burn::tensor::DType::F32);
        let grads = (out.clone() * t2::<AD>(&r, [rows, n])).sum().backward();
        (
            host(out),
            host(xt.grad(&grads).unwrap()),
            host(wt.grad(&grads).unwrap()),
        )
    };
    let want = run(burn::tensor::DType::F32);
    let got = run(burn::tensor::DType::F16);
    for (what, g, w, scale) in [
        ("y", &got.0, &want.0, 1.0),
        ("dx", &got.1, &want.1, 100.0),
        ("dw", &got.2, &want.2, rows as f32),
    ] {
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(a.is_finite(), "f16 {what}[{i}] = {a}");
            assert!(
                (a - b).abs() <= 5e-3 * (scale + b.abs()),
                "f16 {what}[{i}]: {a} vs f32 {b}"
            );
        }
    }
}

/// An additive `[B, mask_heads, T, T]` attention mask as the model builds it: causal within
/// packed segments (0 = padding, which sees only itself), −1e9 elsewhere.
fn packed_mask(b: usize, t: usize, mask_heads: usize, rng: &mut Rng) -> Vec<f32> {
    let mut mask = vec![-1.0e9f32; b * mask_heads * t * t];
    for bi in 0..b {
        // Segments of random lengths, then padding for the last sixth of the row.
        let mut seg = vec![0u32; t];
        let (mut id, mut left) = (1u32, 0usize);
        for s in seg.iter_mut().take(t - t / 6) {
            if left == 0 {
                id += 1;
                left = 1 + (rng.uniform() * 8.0) as usize;
            }
            *s = id;
            left -= 1;
        }
        for hi in 0..mask_heads {
            let m = &mut mask[(bi * mask_heads + hi) * t * t..][..t * t];
            for i in 0..t {
                for j in 0..=i {
                    if i == j || (seg[i] != 0 && seg[i] == seg[j]) {
                        m[i * t + j] = 0.0;
                    }
                }
            }
        }
    }
    mask
}

/// Attention composed from burn ops on autodiff tensors (the model's path before the fused
/// op): heads, `q·kᵀ`, scale, mask, softmax, `·v`, rows.
fn attention_reference(
    q: Tensor<AD, 2>,
    k: Tensor<AD, 2>,
    v: Tensor<AD, 2>,
    mask: Tensor<AD, 4>,
    dims: fused::AttnDims,
) -> Tensor<AD, 2> {
    let (b, t, h, kv, d) = dims.parts();
    let heads = |x: Tensor<AD, 2>, n: usize| x.reshape([b, t, n, d]).swap_dims(1, 2);
    let repeat = |x: Tensor<AD, 4>| {
        x.unsqueeze_dim::<5>(2)
            .expand([b, kv, h / kv, t, d])
            .reshape([b, h, t, d])
    };
    let (q, k, v) = (heads(q, h), repeat(heads(k, kv)), repeat(heads(v, kv)));
    let mask = mask.expand([b, h, t, t]);
    let scores = q
        .matmul(k.swap_dims(2, 3))
        .mul_scalar(1.0 / (d as f64).sqrt())
        .add(mask);
    softmax(scores, 3)
        .matmul(v)
        .swap_dims(1, 2)
        .reshape([b * t, h * d])
}

#[test]
fn attention_matches_composite_forward_and_backward() {
    // Tolerance 1e-5 · (1 + |reference|): the per-head gemm sums `d` (scores) and `T` (output,
    // gradients) products in another order than the batched matmuls of the reference.
    const ATOL: f32 = 1e-5;
    let near = |got: &[f32], want: &[f32], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= ATOL * (1.0 + w.abs()),
                "{what}[{i}]: fused {g} vs reference {w}"
            );
        }
    };
    let mut rng = Rng::new(7);
    // (batch, seq, heads, kv heads, head dim, mask heads): MHA, GQA 2:1 and 3:1, one token,
    // odd sizes, the mask per head and shared.
    for (b, t, h, kv, d, mh) in [
        (1, 1, 1, 1, 1, 1),
        (2, 6, 4, 2, 8, 4),
        (3, 17, 6, 2, 5, 1),
        (2, 40, 4, 4, 64, 4),
        (1, 33, 3, 1, 16, 3),
    ] {
        let dims = fused::AttnDims {
            batch: b,
            seq: t,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        };
        let what = format!("attention b{b} t{t} h{h} kv{kv} d{d} mask-heads {mh}");
        let q = random(&mut rng, b * t * h * d, 1.0);
        let k = random(&mut rng, b * t * kv * d, 1.0);
        let v = random(&mut rng, b * t * kv * d, 1.0);
        let mask = packed_mask(b, t, mh, &mut rng);
        let r = random(&mut rng, b * t * h * d, 1.0);
        let mask_t = || {
            Tensor::<AD, 4>::from_data(
                TensorData::new(mask.clone(), [b, mh, t, t]),
                &Default::default(),
            )
        };
        let run = |fused_op: bool| {
            let qt = t2::<AD>(&q, [b * t, h * d]).require_grad();
            let kt = t2::<AD>(&k, [b * t, kv * d]).require_grad();
            let vt = t2::<AD>(&v, [b * t, kv * d]).require_grad();
            let o = if fused_op {
                AD::attention_rows(qt.clone(), kt.clone(), vt.clone(), mask_t(), dims)
            } else {
                attention_reference(qt.clone(), kt.clone(), vt.clone(), mask_t(), dims)
            };
            let grads = (o.clone() * t2::<AD>(&r, [b * t, h * d])).sum().backward();
            [
                host(o),
                host(qt.grad(&grads).unwrap()),
                host(kt.grad(&grads).unwrap()),
                host(vt.grad(&grads).unwrap()),
            ]
        };
        let got = run(true);
        let want = run(false);
        for (name, g, w) in [
            ("out", &got[0], &want[0]),
            ("dq", &got[1], &want[1]),
            ("dk", &got[2], &want[2]),
            ("dv", &got[3], &want[3]),
        ] {
            near(g, w, &format!("{what}: {name}"));
        }
        // Inference on bare Flex: the forward kernel alone.
        let plain = Flex::attention_rows(
            t2::<Flex>(&q, [b * t, h * d]),
            t2::<Flex>(&k, [b * t, kv * d]),
            t2::<Flex>(&v, [b * t, kv * d]),
            Tensor::from_data(
                TensorData::new(mask.clone(), [b, mh, t, t]),
                &Default::default(),
            ),
            dims,
        );
        near(&host(plain), &want[0], &format!("{what}: inference"));
        // The composite kernels (what other backends and dtypes run), forward and backward.
        let (o, p) = fused::composite::attention_forward(
            t2::<Flex>(&q, [b * t, h * d]),
            t2::<Flex>(&k, [b * t, kv * d]),
            t2::<Flex>(&v, [b * t, kv * d]),
            Tensor::from_data(
                TensorData::new(mask.clone(), [b, mh, t, t]),
                &Default::default(),
            ),
            dims,
        );
        near(&host(o), &want[0], &format!("{what}: composite out"));
        let (dq, dk, dv) = fused::composite::attention_backward(
            t2::<Flex>(&q, [b * t, h * d]),
            t2::<Flex>(&k, [b * t, kv * d]),
            t2::<Flex>(&v, [b * t, kv * d]),
            p,
            t2::<Flex>(&r, [b * t, h * d]),
            dims,
        );
        near(&host(dq), &want[1], &format!("{what}: composite dq"));
        near(&host(dk), &want[2], &format!("{what}: composite dk"));
        near(&host(dv), &want[3], &format!("{what}: composite dv"));
    }
}

#[test]
fn attention_in_bf16_tracks_f32() {
    // Mixed precision runs the composite kernels in bf16 with the softmax upcast to f32: the
    // output and gradients stay within bf16 precision of the f32 path.
    let mut rng = Rng::new(8);
    let (b, t, h, kv, d) = (2, 12, 4, 2, 16);
    let dims = fused::AttnDims {
        batch: b,
        seq: t,
        heads: h,
        kv_heads: kv,
        head_dim: d,
    };
    let q = random(&mut rng, b * t * h * d, 1.0);
    let k = random(&mut rng, b * t * kv * d, 1.0);
    let v = random(&mut rng, b * t * kv * d, 1.0);
    let mask = packed_mask(b, t, h, &mut rng);
    let r = random(&mut rng, b * t * h * d, 1.0);
    let run = |dtype: burn::tensor::DType| {
        let qt = t2::<AD>(&q, [b * t, h * d]).require_grad();
        let kt = t2::<AD>(&k, [b * t, kv * d]).require_grad();
        let vt = t2::<AD>(&v, [b * t, kv * d]).require_grad();
        let m = Tensor::<AD, 4>::from_data(
            TensorData::new(mask.clone(), [b, h, t, t]),
            &Default::default(),
        );
        let o = AD::attention_rows(
            qt.clone().cast(dtype),
            kt.clone().cast(dtype),
            vt.clone().cast(dtype),
            m.cast(dtype),
            dims,
        );
        assert_eq!(o.dtype(), dtype);
        let o = o.cast(burn::tensor::DType::F32);
        let grads = (o.clone() * t2::<AD>(&r, [b * t, h * d])).sum().backward();
        [
            host(o),
            host(qt.grad(&grads).unwrap()),
            host(kt.grad(&grads).unwrap()),
            host(vt.grad(&grads).unwrap()),
        ]
    };
    let want = run(burn::tensor::DType::F32);
    let got = run(burn::tensor::DType::BF16);
    for (name, g, w) in ["out", "dq", "dk", "dv"]
        .iter()
        .zip(&got)
        .zip(&want)
        .map(|((n, g), w)| (n, g, w))
    {
        let norm = w.iter().map(|x| x * x).sum::<f32>().sqrt();
        let err = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt();
        assert!(g.iter().all(|x| x.is_finite()), "bf16 {name} not finite");
        assert!(
            err <= 2e-2 * norm,
            "bf16 {name}: relative error {}",
            err / norm
        );
    }
}

#[test]
fn rope_matches_composite_forward_and_backward() {
    // (rows, heads, head_dim): one pair, odd head counts, widths past one rayon task.
    let mut rng = Rng::new(9);
    for (rows, heads, d) in [(1, 1, 2), (3, 3, 6), (7, 4, 64), (130, 5, 32)] {
        let width = heads * d;
        let x = random(&mut rng, rows * width, 1.0);
        let cos = random(&mut rng, rows * width, 1.0);
        let sin = random(&mut rng, rows * width, 1.0);
        let r = random(&mut rng, rows * width, 1.0);
        let run = |fused_op: bool| {
            let xt = t2::<AD>(&x, [rows, width]).require_grad();
            let (c, s) = (t2::<AD>(&cos, [rows, width]), t2::<AD>(&sin, [rows, width]));
            let y = if fused_op {
                AD::rope_rows(xt.clone(), c, s, d)
            } else {
                // The op chain the model used before the fused node.
                let pairs = xt.clone().reshape([rows * heads, 2, d / 2]);
                let swapped = Tensor::cat(
                    vec![pairs.clone().narrow(1, 1, 1), pairs.narrow(1, 0, 1)],
                    1,
                )
                .reshape([rows, width]);
                xt.clone().mul(c).add(swapped.mul(s))
            };
            let grads = (y.clone() * t2::<AD>(&r, [rows, width])).sum().backward();
            (host(y), host(xt.grad(&grads).unwrap()))
        };
        let (y, dx) = run(true);
        let (y_ref, dx_ref) = run(false);
        let what = format!("rope {rows}x{heads}x{d}");
        close(&y, &y_ref, &what);
        close(&dx, &dx_ref, &format!("{what} grad"));
        let plain = Flex::rope_rows(
            t2::<Flex>(&x, [rows, width]),
            t2::<Flex>(&cos, [rows, width]),
            t2::<Flex>(&sin, [rows, width]),
            d,
        );
        close(&host(plain), &y_ref, &format!("{what} inference"));
        let composite = fused::composite::rope_backward(
            t2::<Flex>(&r, [rows, width]),
            t2::<Flex>(&cos, [rows, width]),
            t2::<Flex>(&sin, [rows, width]),
            d,
        );
        close(&host(composite), &dx_ref, &format!("{what} composite grad"));
    }
}

#[test]
fn linear_matches_matmul_and_skips_frozen_operands() {
    let mut rng = Rng::new(10);
    for (n, inp, out) in [(1, 1, 1), (5, 7, 3), (64, 48, 130)] {
        let x = random(&mut rng, n * inp, 1.0);
        let w = random(&mut rng, out * inp, 1.0);
        let r = random(&mut rng, n * out, 1.0);
        // (input tracked, weight tracked): training, a frozen weight (LoRA), a frozen input.
        for (tx, tw) in [(true, true), (true, false), (false, true)] {
            let run = |fused_op: bool| {
                let mut xt = t2::<AD>(&x, [n, inp]);
                let mut wt = t2::<AD>(&w, [out, inp]);
                if tx {
                    xt = xt.require_grad();
                }
                if tw {
                    wt = wt.require_grad();
                }
                let y = if fused_op {
                    AD::linear_rows(xt.clone(), wt.clone())
                } else {
                    xt.clone().matmul(wt.clone().transpose())
                };
                let grads = (y.clone() * t2::<AD>(&r, [n, out])).sum().backward();
                (
                    host(y),
                    xt.grad(&grads).map(host),
                    wt.grad(&grads).map(host),
                )
            };
            let (y, dx, dw) = run(true);
            let (y_ref, dx_ref, dw_ref) = run(false);
            let what = format!("linear {n}x{inp}->{out} tracked {tx}/{tw}");
            close(&y, &y_ref, &what);
            assert_eq!(dx.is_some(), tx, "{what}: dx");
            assert_eq!(dw.is_some(), tw, "{what}: dw");
            if let (Some(a), Some(b)) = (dx, dx_ref) {
                close(&a, &b, &format!("{what} dx"));
            }
            if let (Some(a), Some(b)) = (dw, dw_ref) {
                close(&a, &b, &format!("{what} dw"));
            }
        }
    }
}
