//! Fused f32 row kernels on host slices: softmax, cross-entropy, SwiGLU, RMSNorm and RoPE,
//! forward and backward, each one or two passes over its rows.
//!
//! burn composes these from five to ten elementwise and reduction ops, each a pass over memory
//! with its own intermediate tensor, and its `exp` is the scalar libm call. Here every row is
//! handled while it is in cache, `exp` is a branch-free polynomial that the compiler vectorises
//! (AVX2 + FMA when the CPU has them, checked at run time), and reductions keep eight partial
//! sums so that they vectorise too. Rows are split across rayon's pool.
//!
//! Accuracy: [`exp`] is within 2 ulp of the correctly rounded result on `[-87, 88]`
//! (checked in the tests against f64). Sums are taken in eight lanes, so results differ from a
//! sequential sum by rounding only; `tests/fused.rs` checks every kernel against burn's
//! composite ops on random inputs.

use rayon::prelude::*;

/// Rows handed to one rayon task (amortises the task overhead over short rows).
const TASK_ELEMS: usize = 16 * 1024;

/// `e^x` for `x ≤ 88.3` (larger inputs give `e^88.3`); exactly 0 below `-87.3`, where the
/// true value is subnormal. Branch-free so that loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part exact in f32 and a remainder (Cody–Waite reduction).
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let c = x.clamp(-87.3, 88.3);
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    let r = c - n * LN2_HI - n * LN2_LO;
    // Minimax polynomial for e^r on [-ln2/2, ln2/2].
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from the integer in t's low bits.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    if x < -87.3 { 0.0 } else { y * scale }
}

/// Runs `f` compiled for AVX2 + FMA when the CPU has them (the same code otherwise).
macro_rules! dispatch {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// Eight-lane sum of `f(i)` over `0..n` (vectorises; differs from a sequential sum by
/// rounding only).
#[inline(always)]
fn lanes_sum(n: usize, mut f: impl FnMut(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let whole = n / 8 * 8;
    let mut i = 0;
    while i < whole {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
        i += 8;
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for j in whole..n {
        s += f(j);
    }
    s
}

/// Eight-lane maximum of a row.
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in chunks.remainder() {
        m = m.max(v);
    }
    m
}

/// Rows per rayon task for rows of `n` elements.
fn rows_per_task(n: usize) -> usize {
    (TASK_ELEMS / n.max(1)).max(1)
}

dispatch! {
    /// Softmax of one row into `y`.
    fn softmax_row(x: &[f32], y: &mut [f32]) {
        let m = row_max(x);
        for (o, &v) in y.iter_mut().zip(x) {
            *o = exp(v - m);
        }
        let s = lanes_sum(y.len(), |i| y[i]);
        let inv = 1.0 / s;
        for o in y.iter_mut() {
            *o *= inv;
        }
    }
}

dispatch! {
    /// Softmax backward of one row: `dx = y ⊙ (dy − ⟨dy, y⟩)`.
    fn softmax_backward_row(y: &[f32], dy: &[f32], dx: &mut [f32]) {
        let dot = lanes_sum(y.len(), |i| y[i] * dy[i]);
        for ((o, &a), &g) in dx.iter_mut().zip(y).zip(dy) {
            *o = a * (g - dot);
        }
    }
}

dispatch! {
    /// Softmax of `s + mask` in place (one attention score row and its additive mask row).
    fn masked_softmax_row(s: &mut [f32], mask: &[f32]) {
        for (v, &m) in s.iter_mut().zip(mask) {
            *v += m;
        }
        let m = row_max(s);
        for v in s.iter_mut() {
            *v = exp(*v - m);
        }
        let inv = 1.0 / lanes_sum(s.len(), |i| s[i]);
        for v in s.iter_mut() {
            *v *= inv;
        }
    }
}

dispatch! {
    /// Softmax backward in place: `d ← scale · y ⊙ (d − ⟨d, y⟩)`.
    fn softmax_backward_row_in_place(y: &[f32], d: &mut [f32], scale: f32) {
        let dot = lanes_sum(y.len(), |i| y[i] * d[i]);
        for (o, &a) in d.iter_mut().zip(y) {
            *o = scale * a * (*o - dot);
        }
    }
}

/// Softmax over the last dimension of `[rows, n]` row-major `x`.
pub fn softmax(x: &[f32], n: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; x.len()];
    let step = rows_per_task(n) * n;
    y.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(n).zip(xc.chunks_exact(n)) {
                softmax_row(xr, yr);
            }
        });
    y
}

/// Softmax backward over rows of `n`: `dx = y ⊙ (dy − rowsum(dy ⊙ y))`.
pub fn softmax_backward(y: &[f32], dy: &[f32], n: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; y.len()];
    let step = rows_per_task(n) * n;
    dx.par_chunks_mut(step)
        .zip(y.par_chunks(step).zip(dy.par_chunks(step)))
        .for_each(|(dc, (yc, gc))| {
            for ((dr, yr), gr) in dc
                .chunks_exact_mut(n)
                .zip(yc.chunks_exact(n))
                .zip(gc.chunks_exact(n))
            {
                softmax_backward_row(yr, gr, dr);
            }
        });
    dx
}

dispatch! {
    /// `log Σ e^x` of one row.
    fn logsumexp_row(x: &[f32]) -> f32 {
        let m = row_max(x);
        m + lanes_sum(x.len(), |i| exp(x[i] - m)).ln()
    }
}

/// Cross-entropy of `[rows, v]` logits against `targets` (`target < 0`: no loss): the sum of
/// `lse − x[target]` over counted rows, and every row's log-sum-exp (kept for backward).
pub fn cross_entropy(x: &[f32], v: usize, targets: &[i64]) -> (f64, Vec<f32>) {
    let rows = targets.len();
    assert_eq!(
        x.len(),
        rows * v,
        "cross_entropy: {rows} targets for {} logits",
        x.len()
    );
    let mut lse = vec![0.0f32; rows];
    let per = rows_per_task(v);
    let total: f64 = lse
        .par_chunks_mut(per)
        .zip(x.par_chunks(per * v).zip(targets.par_chunks(per)))
        .map(|(lc, (xc, tc))| {
            let mut s = 0.0f64;
            for ((l, xr), &t) in lc.iter_mut().zip(xc.chunks_exact(v)).zip(tc) {
                *l = logsumexp_row(xr);
                if t >= 0 {
                    s += f64::from(*l - xr[t as usize]);
                }
            }
            s
        })
        .sum();
    (total, lse)
}

dispatch! {
    /// One row of the cross-entropy gradient: `scale · (softmax(x) − onehot(t))`.
    fn cross_entropy_backward_row(x: &[f32], lse: f32, t: usize, scale: f32, d: &mut [f32]) {
        for (o, &v) in d.iter_mut().zip(x) {
            *o = exp(v - lse) * scale;
        }
        d[t] -= scale;
    }
}

/// Gradient of [`cross_entropy`]'s sum times `scale` with respect to the logits.
pub fn cross_entropy_backward(
    x: &[f32],
    v: usize,
    targets: &[i64],
    lse: &[f32],
    scale: f32,
) -> Vec<f32> {
    let mut d = vec![0.0f32; x.len()];
    let per = rows_per_task(v);
    d.par_chunks_mut(per * v)
        .zip(
            x.par_chunks(per * v)
                .zip(targets.par_chunks(per).zip(lse.par_chunks(per))),
        )
        .for_each(|(dc, (xc, (tc, lc)))| {
            for (((dr, xr), &t), &l) in dc
                .chunks_exact_mut(v)
                .zip(xc.chunks_exact(v))
                .zip(tc)
                .zip(lc)
            {
                if t >= 0 {
                    cross_entropy_backward_row(xr, l, t as usize, scale, dr);
                }
            }
        });
    d
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

dispatch! {
    /// `silu(g) ⊙ u` over a chunk.
    fn swiglu_chunk(g: &[f32], u: &[f32], h: &mut [f32]) {
        for ((o, &a), &b) in h.iter_mut().zip(g).zip(u) {
            *o = a * sigmoid(a) * b;
        }
    }
}

dispatch! {
    /// SwiGLU backward over a chunk.
    fn swiglu_backward_chunk(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len() {
            let (a, b, d) = (g[i], u[i], dh[i]);
            let s = sigmoid(a);
            du[i] = d * a * s;
            dg[i] = d * b * s * (1.0 + a * (1.0 - s));
        }
    }
}

dispatch! {
    /// Rotate-half RoPE over whole heads of `2·half` elements: forward
    /// `y = x·cos + swap_halves(x)·sin`, or its adjoint (`backward`, `x` the upstream gradient)
    /// `dx = dy·cos + swap_halves(dy·sin)`.
    fn rope_chunk(x: &[f32], cos: &[f32], sin: &[f32], half: usize, backward: bool, y: &mut [f32]) {
        let d = 2 * half;
        for (((yh, xh), ch), sh) in y
            .chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .zip(cos.chunks_exact(d))
            .zip(sin.chunks_exact(d))
        {
            let ((x1, x2), (c1, c2), (s1, s2)) =
                (xh.split_at(half), ch.split_at(half), sh.split_at(half));
            let (y1, y2) = yh.split_at_mut(half);
            // Forward pairs x2 with the first half's sin; the adjoint pairs it with its own.
            let (sa, sb) = if backward { (s2, s1) } else { (s1, s2) };
            for i in 0..half {
                y1[i] = x1[i] * c1[i] + x2[i] * sa[i];
                y2[i] = x2[i] * c2[i] + x1[i] * sb[i];
            }
        }
    }
}

/// Rotate-half RoPE of `[rows, heads·head_dim]` rows with per-element tables of the same shape
/// (`rope::head_tables`: `cos`, and `sin` with the rotation's sign folded in); `backward`
/// applies the adjoint to an upstream gradient instead.
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], head_dim: usize, backward: bool) -> Vec<f32> {
    assert!(
        head_dim.is_multiple_of(2) && x.len().is_multiple_of(head_dim),
        "rope: head_dim {head_dim}"
    );
    assert!(
        cos.len() == x.len() && sin.len() == x.len(),
        "rope tables differ in length from the rows"
    );
    let mut y = vec![0.0f32; x.len()];
    let step = (TASK_ELEMS / head_dim).max(1) * head_dim;
    y.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .zip(cos.par_chunks(step).zip(sin.par_chunks(step)))
        .for_each(|((yc, xc), (cc, sc))| rope_chunk(xc, cc, sc, head_dim / 2, backward, yc));
    y
}

/// `silu(g) ⊙ u` elementwise.
pub fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "swiglu operands differ in length");
    let mut h = vec![0.0f32; g.len()];
    h.par_chunks_mut(TASK_ELEMS)
        .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
        .for_each(|(hc, (gc, uc))| swiglu_chunk(gc, uc, hc));
    h
}

/// Gradients of `silu(g) ⊙ u` for upstream `dh`: `(dg, du)`.
pub fn swiglu_backward(g: &[f32], u: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0.0f32; g.len()];
    let mut du = vec![0.0f32; g.len()];
    dg.par_chunks_mut(TASK_ELEMS)
        .zip(du.par_chunks_mut(TASK_ELEMS))
        .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
        .zip(dh.par_chunks(TASK_ELEMS))
        .for_each(|(((gc_out, uc_out), (gc, uc)), hc)| {
            swiglu_backward_chunk(gc, uc, hc, gc_out, uc_out)
        });
    (dg, du)
}

dispatch! {
    /// RMSNorm of one row: returns `r = 1/sqrt(mean(x²) + eps)`, writes `y = x · r · w`.
    fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> f32 {
        let ms = lanes_sum(x.len(), |i| x[i] * x[i]) / x.len() as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((o, &a), &b) in y.iter_mut().zip(x).zip(w) {
            *o = a * r * b;
        }
        r
    }
}

dispatch! {
    /// RMSNorm backward of one row: writes `dx`, adds the row's share of `dw`.
    fn rms_norm_backward_row(x: &[f32], w: &[f32], r: f32, dy: &[f32], dx: &mut [f32], dw: &mut [f32]) {
        let h = x.len() as f32;
        let s = lanes_sum(x.len(), |i| dy[i] * w[i] * x[i]);
        let c = r * r * r * s / h;
        for i in 0..x.len() {
            dx[i] = r * dy[i] * w[i] - c * x[i];
            dw[i] += dy[i] * x[i] * r;
        }
    }
}

/// RMSNorm over rows of `w.len()`: `(y, r)` with `r` one inverse root mean square per row.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let mut y = vec![0.0f32; x.len()];
    let mut r = vec![0.0f32; x.len() / n];
    let per = rows_per_task(n);
    y.par_chunks_mut(per * n)
        .zip(r.par_chunks_mut(per))
        .zip(x.par_chunks(per * n))
        .for_each(|((yc, rc), xc)| {
            for ((yr, ri), xr) in yc.chunks_exact_mut(n).zip(rc).zip(xc.chunks_exact(n)) {
                *ri = rms_norm_row(xr, w, eps, yr);
            }
        });
    (y, r)
}

/// RMSNorm backward: `(dx, dw)` for upstream `dy`, from the forward's `r`.
pub fn rms_norm_backward(x: &[f32], w: &[f32], r: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let mut dx = vec![0.0f32; x.len()];
    let per = rows_per_task(n).max(8);
    let dw = dx
        .par_chunks_mut(per * n)
        .zip(x.par_chunks(per * n).zip(dy.par_chunks(per * n)))
        .zip(r.par_chunks(per))
        .map(|((dc, (xc, gc)), rc)| {
            let mut dw = vec![0.0f32; n];
            for (((dr, xr), gr), &ri) in dc
                .chunks_exact_mut(n)
                .zip(xc.chunks_exact(n))
                .zip(gc.chunks_exact(n))
                .zip(rc)
            {
                rms_norm_backward_row(xr, w, ri, gr, dr, &mut dw);
            }
            dw
        })
        .reduce(
            || vec![0.0f32; n],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(&b) {
                    *x += y;
                }
                a
            },
        );
    (dx, dw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_f64_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let w32 = want as f32;
            let ulp = f32::from_bits(w32.to_bits() + 1) as f64 - w32 as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(-1.0e9), 0.0);
        assert_eq!(exp(-88.0), 0.0);
        assert!(exp(1.0e9).is_finite());
        assert_eq!(exp(0.0), 1.0);
    }
}
