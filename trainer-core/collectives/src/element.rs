//! Element types and reduction kernels.
//!
//! Kernels are plain loops over slices of equal length, written so that the compiler
//! vectorises them (no bounds checks in the loop, no branches on the element). bf16 and f16 are
//! reduced through f32 and rounded once per step (round-to-nearest-even), as NCCL does for
//! half types on the wire.

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }

    pub fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::Bf16 => 2,
            DType::F16 => 3,
        }
    }
}

/// How values from different ranks combine. `Avg` is a sum divided by the world size at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Avg,
    Max,
}

impl ReduceOp {
    pub fn code(self) -> u8 {
        match self {
            ReduceOp::Sum => 1,
            ReduceOp::Avg => 2,
            ReduceOp::Max => 3,
        }
    }
}

/// An element type a communicator can move and reduce.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
    /// `acc[i] = acc[i] (op) other[i]`; `Avg` accumulates like `Sum`.
    fn reduce(acc: &mut [Self], other: &[Self], op: ReduceOp);
    /// `x[i] /= n` (the end of an `Avg`).
    fn scale_down(x: &mut [Self], n: usize);
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;

    fn reduce(acc: &mut [f32], other: &[f32], op: ReduceOp) {
        let n = acc.len().min(other.len());
        let (acc, other) = (&mut acc[..n], &other[..n]);
        match op {
            ReduceOp::Sum | ReduceOp::Avg => {
                for (a, b) in acc.iter_mut().zip(other) {
                    *a += *b;
                }
            }
            ReduceOp::Max => {
                for (a, b) in acc.iter_mut().zip(other) {
                    *a = a.max(*b);
                }
            }
        }
    }

    fn scale_down(x: &mut [f32], n: usize) {
        let inv = 1.0 / n as f32;
        for v in x {
            *v *= inv;
        }
    }
}

macro_rules! half_element {
    ($t:ty, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;

            fn reduce(acc: &mut [$t], other: &[$t], op: ReduceOp) {
                let n = acc.len().min(other.len());
                let (acc, other) = (&mut acc[..n], &other[..n]);
                // Convert in blocks so that the f32 loop vectorises.
                const BLOCK: usize = 256;
                let mut a32 = [0f32; BLOCK];
                let mut b32 = [0f32; BLOCK];
                for (ac, oc) in acc.chunks_mut(BLOCK).zip(other.chunks(BLOCK)) {
                    let m = ac.len();
                    for i in 0..m {
                        a32[i] = ac[i].to_f32();
                        b32[i] = oc[i].to_f32();
                    }
                    match op {
                        ReduceOp::Sum | ReduceOp::Avg => {
                            for (a, b) in a32[..m].iter_mut().zip(&b32[..m]) {
                                *a += *b;
                            }
                        }
                        ReduceOp::Max => {
                            for (a, b) in a32[..m].iter_mut().zip(&b32[..m]) {
                                *a = a.max(*b);
                            }
                        }
                    }
                    for i in 0..m {
                        ac[i] = <$t>::from_f32(a32[i]);
                    }
                }
            }

            fn scale_down(x: &mut [$t], n: usize) {
                let inv = 1.0 / n as f32;
                for v in x {
                    *v = <$t>::from_f32(v.to_f32() * inv);
                }
            }
        }
    };
}

half_element!(bf16, DType::Bf16);
half_element!(f16, DType::F16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_scalar_reference() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut s = a.clone();
        f32::reduce(&mut s, &b, ReduceOp::Sum);
        let mut m = a.clone();
        f32::reduce(&mut m, &b, ReduceOp::Max);
        for i in 0..1000 {
            assert_eq!(s[i], a[i] + b[i]);
            assert_eq!(m[i], a[i].max(b[i]));
        }
        let ah: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
        let bh: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut sh = ah.clone();
        bf16::reduce(&mut sh, &bh, ReduceOp::Sum);
        for i in 0..1000 {
            assert_eq!(sh[i], bf16::from_f32(ah[i].to_f32() + bh[i].to_f32()));
        }
        let mut x = vec![4.0f32, 8.0];
        f32::scale_down(&mut x, 4);
        assert_eq!(x, vec![1.0, 2.0]);
    }
}
