//! AdamW with `torch.optim.AdamW` semantics on flat `f32` slices.
//!
//! The update follows PyTorch's (non-fused, non-capturable) implementation: the scalars that
//! depend on the step count (bias corrections, step size) are computed in `f64`, as Python
//! floats are, and the element-wise arithmetic is done in `f32` with those scalars rounded to
//! `f32`, as the tensor kernels do.

use serde::{Deserialize, Serialize};

/// PyTorch torch.optim.AdamW semantics (decoupled weight decay; bias correction; eps added to
/// sqrt(v_hat)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Decay rate of the first moment (`betas[0]`).
    pub beta1: f64,
    /// Decay rate of the second moment (`betas[1]`).
    pub beta2: f64,
    /// Added to the bias-corrected square root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay; [`adamw_step`] takes the value to use per call, so that callers
    /// can pass 0 for parameters excluded from decay (biases, norms).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults except `weight_decay`, which is 0 (as in Hugging Face's
    /// `TrainingArguments`) rather than PyTorch's 0.01.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimizer state of one flat parameter buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    /// Number of steps taken (PyTorch's `state["step"]`); 0 before the first step.
    pub step: u64,
    /// First moment estimate (`exp_avg`).
    pub exp_avg: Vec<f32>,
    /// Second moment estimate (`exp_avg_sq`).
    pub exp_avg_sq: Vec<f32>,
}

impl AdamWState {
    /// Zeroed state for `n` parameters.
    pub fn new(n: usize) -> Self {
        AdamWState {
            step: 0,
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
        }
    }

    /// Number of parameters this state covers.
    pub fn len(&self) -> usize {
        self.exp_avg.len()
    }

    /// Whether the state covers no parameter.
    pub fn is_empty(&self) -> bool {
        self.exp_avg.is_empty()
    }
}

/// One step on a flat slice: step += 1; p *= 1 - lr*wd (wd = weight_decay argument, so callers
/// can pass 0 for params excluded from decay); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
/// p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps).
///
/// Bias corrections are computed in `f64` and the element-wise math in `f32`, like PyTorch's
/// foreach implementation: `bias_correction2_sqrt = sqrt(1-b2^t)`;
/// `denom = sqrt(v)/bias_correction2_sqrt + eps`; `p += -(lr/bias_correction1) * m/denom`.
/// The first moment is updated as PyTorch's `lerp_(g, 1-b1)` computes it, which equals
/// `b1 m + (1-b1) g` up to rounding.
///
/// # Panics
///
/// When `params`, `grads` and `state` do not all have the same length.
pub fn adamw_step(
    cfg: &AdamWConfig,
    state: &mut AdamWState,
    params: &mut [f32],
    grads: &[f32],
    lr: f64,
    weight_decay: f64,
) {
    assert_eq!(
        params.len(),
        grads.len(),
        "adamw_step: {} parameters but {} gradients",
        params.len(),
        grads.len()
    );
    assert_eq!(
        params.len(),
        state.len(),
        "adamw_step: {} parameters but optimizer state for {}",
        params.len(),
        state.len()
    );
    assert_eq!(
        state.exp_avg.len(),
        state.exp_avg_sq.len(),
        "adamw_step: exp_avg and exp_avg_sq lengths differ"
    );

    state.step += 1;
    // Python's `beta ** step` on floats is C's `pow`, as is `f64::powf`.
    let t = state.step as f64;
    let bias_correction1 = 1.0 - cfg.beta1.powf(t);
    let bias_correction2 = 1.0 - cfg.beta2.powf(t);
    let bias_correction2_sqrt = bias_correction2.sqrt() as f32;
    let step_size = -(lr / bias_correction1) as f32;
    let decay = weight_decay != 0.0;
    let decay_factor = (1.0 - lr * weight_decay) as f32;
    let lerp_weight = (1.0 - cfg.beta1) as f32;
    let beta2 = cfg.beta2 as f32;
    let one_minus_beta2 = (1.0 - cfg.beta2) as f32;
    let eps = cfg.eps as f32;

    let moments = state.exp_avg.iter_mut().zip(state.exp_avg_sq.iter_mut());
    for ((p, &g), (m, v)) in params.iter_mut().zip(grads).zip(moments) {
        if decay {
            *p *= decay_factor;
        }
        *m = lerp(*m, g, lerp_weight);
        *v = *v * beta2 + one_minus_beta2 * g * g;
        let denom = v.sqrt() / bias_correction2_sqrt + eps;
        *p += step_size * *m / denom;
    }
}

/// `start + weight * (end - start)`, evaluated as PyTorch's CPU `lerp` kernel does (from the
/// end point when the weight is large, which keeps `lerp(a, b, 1) == b`).
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: deterministic test inputs without a `rand` dependency.
    struct TestRng(u64);

    impl TestRng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [-scale, scale).
        fn uniform(&mut self, scale: f64) -> f64 {
            let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            (2.0 * unit - 1.0) * scale
        }
    }

    /// The textbook algorithm in f64 (Loshchilov & Hutter with PyTorch's eps placement).
    struct Reference {
        t: i32,
        p: Vec<f64>,
        m: Vec<f64>,
        v: Vec<f64>,
    }

    impl Reference {
        fn step(&mut self, cfg: &AdamWConfig, g: &[f64], lr: f64, wd: f64) {
            self.t += 1;
            let bc1 = 1.0 - cfg.beta1.powi(self.t);
            let bc2 = 1.0 - cfg.beta2.powi(self.t);
            let moments = self.m.iter_mut().zip(self.v.iter_mut());
            for ((p, &g), (m, v)) in self.p.iter_mut().zip(g).zip(moments) {
                *p *= 1.0 - lr * wd;
                *m = cfg.beta1 * *m + (1.0 - cfg.beta1) * g;
                *v = cfg.beta2 * *v + (1.0 - cfg.beta2) * g * g;
                let m_hat = *m / bc1;
                let v_hat = *v / bc2;
                *p -= lr * m_hat / (v_hat.sqrt() + cfg.eps);
            }
        }
    }

    /// `|actual - expected| <= rel * max(|expected|, scale)`: `scale` is the magnitude of the
    /// inputs, below which f32 cancellation makes a purely relative bound meaningless.
    fn assert_close_scaled(actual: f64, expected: f64, rel: f64, scale: f64, what: &str) {
        let tol = rel * expected.abs().max(scale);
        assert!(
            (actual - expected).abs() <= tol,
            "{what}: got {actual}, expected {expected} (tolerance {tol})"
        );
    }

    fn assert_close(actual: f64, expected: f64, rel: f64, what: &str) {
        assert_close_scaled(actual, expected, rel, 1e-3, what);
    }

    #[test]
    fn matches_f64_reference_over_five_steps() {
        let mut rng = TestRng(42);
        let n = 257;
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let init: Vec<f64> = (0..n).map(|_| f64::from(rng.uniform(1.0) as f32)).collect();
        let mut params: Vec<f32> = init.iter().map(|&x| x as f32).collect();
        let mut state = AdamWState::new(n);
        let mut reference = Reference {
            t: 0,
            p: init,
            m: vec![0.0; n],
            v: vec![0.0; n],
        };
        // Largest |g| seen per element: the moments are compared relative to it, since
        // `0.9 m + 0.1 g` can cancel down to far below the size of its terms.
        let mut g_max = vec![0.0_f64; n];
        for (t, lr) in [(1, 1e-3), (2, 2e-3), (3, 3e-3), (4, 2e-3), (5, 1e-3)] {
            // Gradients of varied magnitude, exactly representable in f32 so both sides see the
            // same inputs.
            let grads: Vec<f32> = (0..n)
                .map(|i| (rng.uniform(1.0) * 10f64.powi((i % 5) as i32 - 2)) as f32)
                .collect();
            let grads64: Vec<f64> = grads.iter().map(|&g| f64::from(g)).collect();
            let wd = if t == 3 { 0.0 } else { cfg.weight_decay };
            adamw_step(&cfg, &mut state, &mut params, &grads, lr, wd);
            reference.step(&cfg, &grads64, lr, wd);
            assert_eq!(state.step, t);
            for (max, g) in g_max.iter_mut().zip(&grads64) {
                *max = max.max(g.abs());
            }
            for i in 0..n {
                assert_close(
                    f64::from(params[i]),
                    reference.p[i],
                    1e-6,
                    &format!("param {i} at step {t}"),
                );
                assert_close_scaled(
                    f64::from(state.exp_avg[i]),
                    reference.m[i],
                    1e-6,
                    g_max[i],
                    &format!("exp_avg {i} at step {t}"),
                );
                assert_close_scaled(
                    f64::from(state.exp_avg_sq[i]),
                    reference.v[i],
                    1e-6,
                    g_max[i] * g_max[i],
                    &format!("exp_avg_sq {i} at step {t}"),
                );
            }
        }
    }

    #[test]
    fn first_step_by_hand() {
        // Step 1: m = 0.1 g, v = 0.001 g², m_hat = g, v_hat = g², so the update is
        // lr * g / (|g| + eps) = lr * sign(g) (up to eps), after decoupled decay.
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut params = vec![1.0_f32, -2.0, 0.5];
        let grads = vec![0.25_f32, -4.0, 0.0];
        let mut state = AdamWState::new(3);
        adamw_step(&cfg, &mut state, &mut params, &grads, 0.1, 0.5);
        // p0: 1.0 * (1 - 0.05) = 0.95, minus 0.1 * 0.25/(0.25 + 1e-8).
        let expected = [
            0.95 - 0.1 * 0.25 / (0.25 + 1e-8),
            -2.0 * 0.95 + 0.1 * 4.0 / (4.0 + 1e-8),
            0.5 * 0.95,
        ];
        for (i, (&p, &e)) in params.iter().zip(&expected).enumerate() {
            assert_close(f64::from(p), e, 1e-6, &format!("param {i}"));
        }
        assert_close(f64::from(state.exp_avg[0]), 0.025, 1e-6, "exp_avg 0");
        assert_close(f64::from(state.exp_avg[1]), -0.4, 1e-6, "exp_avg 1");
        assert_close(f64::from(state.exp_avg_sq[0]), 0.0000625, 1e-6, "v 0");
        assert_close(f64::from(state.exp_avg_sq[1]), 0.016, 1e-6, "v 1");
        assert_eq!(state.exp_avg[2], 0.0);
        assert_eq!(state.exp_avg_sq[2], 0.0);
        assert_eq!(state.step, 1);
    }

    #[test]
    fn zero_weight_decay_argument_leaves_params_undecayed() {
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut params = vec![3.0_f32];
        let mut state = AdamWState::new(1);
        adamw_step(&cfg, &mut state, &mut params, &[0.0], 1.0, 0.0);
        assert_eq!(params, vec![3.0]);
        adamw_step(&cfg, &mut state, &mut params, &[0.0], 1.0, cfg.weight_decay);
        assert_close(f64::from(params[0]), 2.7, 1e-6, "decayed");
    }

    #[test]
    fn state_helpers_and_serde_round_trip() {
        let state = AdamWState::new(4);
        assert_eq!(state.len(), 4);
        assert!(!state.is_empty());
        assert!(AdamWState::new(0).is_empty());
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<AdamWState>(&json).unwrap(), state);
        let cfg = AdamWConfig::default();
        assert_eq!(
            (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay),
            (0.9, 0.999, 1e-8, 0.0)
        );
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<AdamWConfig>(&json).unwrap(), cfg);
    }

    #[test]
    #[should_panic(expected = "gradients")]
    fn length_mismatch_panics() {
        let mut state = AdamWState::new(2);
        let mut params = vec![0.0_f32; 2];
        adamw_step(
            &AdamWConfig::default(),
            &mut state,
            &mut params,
            &[0.0],
            1e-3,
            0.0,
        );
    }
}
