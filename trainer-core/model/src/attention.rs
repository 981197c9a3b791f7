//! Scaled dot-product attention on host f32 rows, forward and backward, without reshaping the
//! activations into heads.
//!
//! The model's projections produce `[B·T, heads·d]` rows. Composed from burn ops, attention
//! reshapes them to `[B, H, T, d]`, transposes, multiplies, scales, adds the mask, takes the
//! softmax, multiplies again and transposes back; in the backward every transpose and reshape
//! becomes a strided copy (`to_contiguous` was 8% of a 1-thread step of the 3.4M model).
//! Here each `(batch, head)` pair is four `gemm` calls on strided views of the rows (a head is
//! a `T × d` matrix with row stride `heads·d`), and the scale, the mask and the softmax are one
//! pass over each `T × T` score matrix while it is in cache. Pairs run as rayon tasks.
//!
//! Grouped-query attention: query head `h` reads key/value head `h / (heads / kv_heads)`. The
//! backward runs one task per `(batch, kv head)` and accumulates the key and value gradients of
//! its query heads in order, so no two tasks write the same rows and the sums are deterministic.
//!
//! `tests/fused.rs` checks both directions against the composite ops on random inputs.

use rayon::prelude::*;

use crate::kernels;

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Sequences (`B`).
    pub batch: usize,
    /// Tokens per sequence (`T`).
    pub seq: usize,
    /// Query heads (`H`).
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Width of one head (`d`).
    pub head_dim: usize,
}

impl AttnDims {
    /// `(batch, seq, heads, kv_heads, head_dim)`.
    pub fn parts(&self) -> (usize, usize, usize, usize, usize) {
        (
            self.batch,
            self.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
        )
    }

    /// Query heads per key/value head.
    pub fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// `1 / sqrt(d)`.
    pub fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }
}

/// A pointer that rayon tasks may share; every task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: the kernels below hand each task rows/columns no other task touches.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// A strided `rows × cols` f32 matrix view: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

/// `dst = beta · lhs·rhs` (`accumulate`: `dst += beta · lhs·rhs`) for an `m × k` lhs and a
/// `k × n` rhs; `dst` is row-major with row stride `dst_rs`. Single-threaded (the callers
/// parallelise over heads).
///
/// # Safety
/// Every view must cover its matrix inside live allocations, and `dst` must not alias them.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    beta: f32,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Checks the buffer lengths against `dims` (a mismatch is a bug in the caller).
fn check(dims: &AttnDims, q: usize, k: usize, v: usize, mask: usize, mask_heads: usize) {
    let (b, t, h, kv, d) = dims.parts();
    assert!(
        kv > 0 && h % kv == 0,
        "attention: {h} heads over {kv} kv heads"
    );
    assert_eq!(q, b * t * h * d, "attention: query rows");
    assert_eq!(k, b * t * kv * d, "attention: key rows");
    assert_eq!(v, b * t * kv * d, "attention: value rows");
    assert_eq!(mask, b * mask_heads * t * t, "attention: mask");
}

/// Attention forward: `o = softmax(scale · q·kᵀ + mask) · v` per head.
///
/// `q` is `[B·T, H·d]`, `k` and `v` are `[B·T, KV·d]`, all row-major; `mask` is an additive
/// `[B, mask_heads, T, T]` mask of which only head 0 of each batch row is read (the mask is the
/// same for every head). Returns the output `[B·T, H·d]` and the probabilities `[B, H, T, T]`
/// (kept for the backward).
pub fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    mask_heads: usize,
    dims: AttnDims,
) -> (Vec<f32>, Vec<f32>) {
    check(&dims, q.len(), k.len(), v.len(), mask.len(), mask_heads);
    let (b, t, h, kv, d) = dims.parts();
    let (qw, kw) = ((h * d) as isize, (kv * d) as isize);
    let mut o = vec![0.0f32; q.len()];
    let mut p = vec![0.0f32; b * h * t * t];
    let out = Shared(o.as_mut_ptr());
    p.par_chunks_mut(t * t).enumerate().for_each(|(bh, s)| {
        let (bi, hi) = (bh / h, bh % h);
        let g = hi / dims.rep();
        let qh = View {
            // SAFETY (all offsets): bi < B, hi < H, g < KV, so each view starts inside its
            // buffer and its T rows of d columns end inside it (lengths checked above).
            ptr: unsafe { q.as_ptr().add(bi * t * h * d + hi * d) },
            rs: qw,
            cs: 1,
        };
        let kt = View {
            ptr: unsafe { k.as_ptr().add(bi * t * kv * d + g * d) },
            rs: 1,
            cs: kw,
        };
        let vh = View {
            ptr: unsafe { v.as_ptr().add(bi * t * kv * d + g * d) },
            rs: kw,
            cs: 1,
        };
        // SAFETY: `s` is this task's own T × T block; the views are the inputs.
        unsafe {
            mm(
                t,
                t,
                d,
                s.as_mut_ptr(),
                t as isize,
                false,
                qh,
                kt,
                dims.scale(),
            )
        };
        let m = &mask[bi * mask_heads * t * t..][..t * t];
        for (row, mrow) in s.chunks_exact_mut(t).zip(m.chunks_exact(t)) {
            kernels::masked_softmax_row(row, mrow);
        }
        let ph = View {
            ptr: s.as_ptr(),
            rs: t as isize,
            cs: 1,
        };
        // SAFETY: head `hi` of batch row `bi` owns columns hi·d..(hi+1)·d of rows bi·T..;
        // no other task writes them.
        let dst = unsafe { out.get().add(bi * t * h * d + hi * d) };
        unsafe { mm(t, d, t, dst, qw, false, ph, vh, 1.0) };
    });
    (o, p)
}

/// Attention backward from the upstream gradient `dout` (`[B·T, H·d]`) and the forward's
/// probabilities `p`: `(dq, dk, dv)` in the layouts of `q`, `k`, `v`.
///
/// Per head: `dv += pᵀ·dout`, `dp = dout·vᵀ`, `ds = scale · p ⊙ (dp − rowsum(dp ⊙ p))`,
/// `dq = ds·k`, `dk += dsᵀ·q`.
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f32],
    dout: &[f32],
    dims: AttnDims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, t, h, kv, d) = dims.parts();
    check(&dims, q.len(), k.len(), v.len(), 0, 0);
    assert_eq!(p.len(), b * h * t * t, "attention: probabilities");
    assert_eq!(dout.len(), q.len(), "attention: output gradient");
    let (qw, kw) = ((h * d) as isize, (kv * d) as isize);
    let rep = dims.rep();
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let (dq_p, dk_p, dv_p) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    (0..b * kv).into_par_iter().for_each(|bg| {
        let (bi, g) = (bg / kv, bg % kv);
        let kv_off = bi * t * kv * d + g * d;
        let mut ds = vec![0.0f32; t * t];
        for (r, hi) in (g * rep..(g + 1) * rep).enumerate() {
            let q_off = bi * t * h * d + hi * d;
            let ph = &p[(bi * h + hi) * t * t..][..t * t];
            // SAFETY (all views): offsets as in `forward`; `ds` is this task's scratch.
            let doh = View {
                ptr: unsafe { dout.as_ptr().add(q_off) },
                rs: qw,
                cs: 1,
            };
            let pt = View {
                ptr: ph.as_ptr(),
                rs: 1,
                cs: t as isize,
            };
            // dv_g (+)= pᵀ · dout_h; this task alone writes kv head g of batch row bi.
            unsafe { mm(t, d, t, dv_p.get().add(kv_off), kw, r > 0, pt, doh, 1.0) };
            let vt = View {
                ptr: unsafe { v.as_ptr().add(kv_off) },
                rs: 1,
                cs: kw,
            };
            unsafe { mm(t, t, d, ds.as_mut_ptr(), t as isize, false, doh, vt, 1.0) };
            for (drow, prow) in ds.chunks_exact_mut(t).zip(ph.chunks_exact(t)) {
                kernels::softmax_backward_row_in_place(prow, drow, dims.scale());
            }
            let dsv = View {
                ptr: ds.as_ptr(),
                rs: t as isize,
                cs: 1,
            };
            let dst_t = View {
                ptr: ds.as_ptr(),
                rs: 1,
                cs: t as isize,
            };
            let kh = View {
                ptr: unsafe { k.as_ptr().add(kv_off) },
                rs: kw,
                cs: 1,
            };
            let qh = View {
                ptr: unsafe { q.as_ptr().add(q_off) },
                rs: qw,
                cs: 1,
            };
            // dq_h = ds · k_g (query head hi belongs to this task only).
            unsafe { mm(t, d, t, dq_p.get().add(q_off), qw, false, dsv, kh, 1.0) };
            // dk_g (+)= dsᵀ · q_h.
            unsafe { mm(t, d, t, dk_p.get().add(kv_off), kw, r > 0, dst_t, qh, 1.0) };
        }
    });
    (dq, dk, dv)
}
