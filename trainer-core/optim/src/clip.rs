//! Gradient-norm clipping as `torch.nn.utils.clip_grad_norm_` does it (L2 norm).
//!
//! The caller sums [`sum_squares`] over every gradient buffer (and over ranks, for sharded
//! gradients), takes the square root as the total norm, asks [`clip_coef`] whether to clip,
//! and applies the coefficient with [`scale_in_place`].

/// Sum of squares in f64.
pub fn sum_squares(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| {
            let v = f64::from(v);
            v * v
        })
        .sum()
}

/// PyTorch clip_grad_norm_: coef = max_norm / (total_norm + 1e-6), applied only when < 1.
/// Returns Some(coef) when grads must be multiplied by coef, None otherwise (also None when
/// max_norm <= 0, meaning clipping is off).
///
/// An infinite total norm gives `Some(0.0)`, as PyTorch's coefficient would be 0 too; a NaN
/// total norm gives `None` (the gradients are already NaN: the loss scaler or the caller must
/// deal with them).
pub fn clip_coef(total_norm: f64, max_norm: f64) -> Option<f32> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return None;
    }
    let coef = max_norm / (total_norm + 1e-6);
    (coef < 1.0).then_some(coef as f32)
}

/// Multiplies every value by `factor`.
pub fn scale_in_place(values: &mut [f32], factor: f32) {
    for v in values {
        *v *= factor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_squares_accumulates_in_f64() {
        assert_eq!(sum_squares(&[]), 0.0);
        assert_eq!(sum_squares(&[3.0, -4.0]), 25.0);
        // 2^24 + 1 ones: an f32 accumulator would stop at 2^24.
        let ones = vec![1.0_f32; (1 << 24) + 1];
        assert_eq!(sum_squares(&ones), f64::from((1u32 << 24) + 1));
        // Squares beyond f32's range stay finite.
        let big = f64::from(1e30_f32);
        assert_eq!(sum_squares(&[1e30, -1e30]), 2.0 * big * big);
    }

    #[test]
    fn clip_coef_follows_pytorch() {
        // Norm 10, max 1: coef = 1 / (10 + 1e-6).
        let coef = clip_coef(10.0, 1.0).unwrap();
        assert_eq!(coef, (1.0 / (10.0 + 1e-6)) as f32);
        // Below the threshold, or exactly at it (coef = 1 / (1 + 1e-6) < 1 clips, barely).
        assert_eq!(clip_coef(0.5, 1.0), None);
        assert!(clip_coef(1.0, 1.0).is_some());
        assert_eq!(clip_coef(1.0 - 2e-6, 1.0), None);
        // Clipping off.
        assert_eq!(clip_coef(100.0, 0.0), None);
        assert_eq!(clip_coef(100.0, -1.0), None);
        assert_eq!(clip_coef(100.0, f64::NAN), None);
        // Non-finite norms.
        assert_eq!(clip_coef(f64::INFINITY, 1.0), Some(0.0));
        assert_eq!(clip_coef(f64::NAN, 1.0), None);
    }

    #[test]
    fn clipping_brings_the_norm_to_max_norm() {
        let mut grads = vec![3.0_f32, 4.0, 0.0, -12.0];
        let norm = sum_squares(&grads).sqrt();
        assert_eq!(norm, 13.0);
        let coef = clip_coef(norm, 1.0).unwrap();
        scale_in_place(&mut grads, coef);
        let clipped = sum_squares(&grads).sqrt();
        assert!((clipped - 1.0).abs() < 1e-6, "{clipped}");
        scale_in_place(&mut grads, 0.0);
        assert_eq!(grads, vec![0.0, 0.0, 0.0, -0.0]);
    }
}
