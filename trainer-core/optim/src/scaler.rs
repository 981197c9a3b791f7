//! Dynamic loss scaling for fp16 training, with the behaviour of DeepSpeed's
//! `DynamicLossScaler.update_scale` (`deepspeed/runtime/fp16/loss_scaler.py`, as in
//! microsoft/DeepSpeed commit 03365187873a648f9292863117ac4ce1a6135fd7): DeepSpeed's config
//! `hysteresis` is the scaler's `delayed_shift`, the scale factor is 2, and an overflow both
//! skips the step and records `last_overflow_iter = cur_iter`; the scale doubles on a clean
//! step when `(cur_iter - last_overflow_iter) % scale_window == 0`.
//!
//! Two deliberate differences: DeepSpeed raises an exception on an overflow when the scale is
//! already at `min_scale` (`raise_error_at_min_scale`), whereas here the floor simply holds and
//! the step is skipped; and newer DeepSpeed releases changed the growth test to
//! `stable_interval = cur_iter - last_overflow_iter - 1 > 0 && stable_interval % window == 0`,
//! which grows one step later; this module keeps the long-standing rule above.

use serde::{Deserialize, Serialize};

/// Settings of [`DynamicLossScaler`], named as in DeepSpeed's `fp16` config section.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScalerConfig {
    /// The initial scale is `2^initial_scale_power` (DeepSpeed default 16).
    pub initial_scale_power: u32,
    /// Clean steps between two doublings of the scale (default 1000).
    pub loss_scale_window: u64,
    /// Overflows tolerated before the scale is halved (DeepSpeed's `delayed_shift`, default 2).
    pub hysteresis: u32,
    /// The scale never drops below this (default 1).
    pub min_loss_scale: f64,
    /// Refill the hysteresis on every clean step rather than only when the scale grows
    /// (default false).
    pub consecutive_hysteresis: bool,
}

impl Default for LossScalerConfig {
    /// DeepSpeed's `fp16` defaults: `2^16`, window 1000, hysteresis 2, minimum 1.
    fn default() -> Self {
        LossScalerConfig {
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            min_loss_scale: 1.0,
            consecutive_hysteresis: false,
        }
    }
}

/// DeepSpeed's dynamic loss scaler; serializable so that checkpoints resume it exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DynamicLossScaler {
    /// The settings it was built with.
    pub cfg: LossScalerConfig,
    /// The current loss scale.
    pub cur_scale: f64,
    /// Number of [`DynamicLossScaler::update`] calls so far.
    pub cur_iter: u64,
    /// `cur_iter` of the latest overflow; -1 before any.
    pub last_overflow_iter: i64,
    /// Overflows left before the next one halves the scale.
    pub cur_hysteresis: u32,
}

impl DynamicLossScaler {
    /// A scaler at `2^initial_scale_power` with a full hysteresis.
    pub fn new(cfg: LossScalerConfig) -> Self {
        DynamicLossScaler {
            cfg,
            cur_scale: 2f64.powi(i32::try_from(cfg.initial_scale_power).unwrap_or(i32::MAX)),
            cur_iter: 0,
            last_overflow_iter: -1,
            cur_hysteresis: cfg.hysteresis,
        }
    }

    /// The factor to multiply the loss by (and to divide the gradients by) this step.
    pub fn scale(&self) -> f64 {
        self.cur_scale
    }

    /// Call once per optimizer step after checking the (unscaled or scaled) gradients for
    /// inf/NaN. Returns true when the step must be applied, false when it is skipped (overflow).
    pub fn update(&mut self, overflow: bool) -> bool {
        let cfg = &self.cfg;
        if overflow {
            if cfg.hysteresis == 1 || self.cur_hysteresis == 1 {
                self.cur_scale = (self.cur_scale / 2.0).max(cfg.min_loss_scale);
            } else {
                // DeepSpeed decrements unconditionally here; with hysteresis 0 (which its
                // config rejects) Python would go negative, so saturate instead.
                self.cur_hysteresis = self.cur_hysteresis.saturating_sub(1);
            }
            self.last_overflow_iter = i64::try_from(self.cur_iter).unwrap_or(i64::MAX);
        } else {
            if cfg.consecutive_hysteresis {
                self.cur_hysteresis = cfg.hysteresis;
            }
            let since_overflow = i128::from(self.cur_iter) - i128::from(self.last_overflow_iter);
            // A window of 0 would be a division by zero in DeepSpeed; treat it as 1.
            let window = i128::from(cfg.loss_scale_window.max(1));
            if since_overflow % window == 0 {
                if !cfg.consecutive_hysteresis {
                    self.cur_hysteresis = cfg.hysteresis;
                }
                self.cur_scale *= 2.0;
            }
        }
        self.cur_iter += 1;
        !overflow
    }
}

/// Any inf or NaN.
pub fn has_overflow(values: &[f32]) -> bool {
    values.iter().any(|v| !v.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(hysteresis: u32, window: u64) -> LossScalerConfig {
        LossScalerConfig {
            initial_scale_power: 4,
            loss_scale_window: window,
            hysteresis,
            ..Default::default()
        }
    }

    #[test]
    fn new_uses_defaults() {
        let s = DynamicLossScaler::new(LossScalerConfig::default());
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.cur_iter, 0);
        assert_eq!(s.last_overflow_iter, -1);
        assert_eq!(s.cur_hysteresis, 2);
        assert!(!s.cfg.consecutive_hysteresis);
        assert_eq!(s.cfg.min_loss_scale, 1.0);
        assert_eq!(s.cfg.loss_scale_window, 1000);
    }

    #[test]
    fn overflow_skips_and_halves_with_hysteresis_one() {
        let mut s = DynamicLossScaler::new(cfg(1, 1000));
        assert!(!s.update(true));
        assert_eq!(s.scale(), 8.0);
        assert_eq!(s.last_overflow_iter, 0);
        assert!(!s.update(true));
        assert_eq!(s.scale(), 4.0);
        assert!(s.update(false));
        assert_eq!(s.scale(), 4.0);
        assert_eq!(s.cur_iter, 3);
    }

    #[test]
    fn hysteresis_two_delays_the_first_halving() {
        let mut s = DynamicLossScaler::new(cfg(2, 1000));
        assert!(!s.update(true));
        assert_eq!(s.scale(), 16.0, "first overflow only uses up hysteresis");
        assert_eq!(s.cur_hysteresis, 1);
        assert!(!s.update(true));
        assert_eq!(s.scale(), 8.0, "second overflow halves");
        assert_eq!(s.cur_hysteresis, 1);
        assert!(!s.update(true));
        assert_eq!(
            s.scale(),
            4.0,
            "hysteresis stays spent until the scale grows"
        );
        // A clean step does not refill the hysteresis without consecutive_hysteresis...
        assert!(s.update(false));
        assert_eq!(s.cur_hysteresis, 1);
    }

    #[test]
    fn consecutive_hysteresis_refills_on_clean_steps() {
        let mut s = DynamicLossScaler::new(LossScalerConfig {
            consecutive_hysteresis: true,
            ..cfg(2, 1000)
        });
        assert!(!s.update(true));
        assert_eq!(s.cur_hysteresis, 1);
        assert!(s.update(false));
        assert_eq!(s.cur_hysteresis, 2);
        assert!(!s.update(true));
        assert_eq!(s.scale(), 16.0, "refilled hysteresis absorbs the overflow");
    }

    #[test]
    fn window_of_clean_steps_doubles() {
        let window = 5;
        let mut s = DynamicLossScaler::new(cfg(2, window));
        // From the start (last_overflow_iter = -1) the 5th clean step doubles.
        for i in 0..window - 1 {
            assert!(s.update(false));
            assert_eq!(s.scale(), 16.0, "clean step {i}");
        }
        assert!(s.update(false));
        assert_eq!(s.scale(), 32.0);
        for _ in 0..window {
            s.update(false);
        }
        assert_eq!(s.scale(), 64.0);

        // After an overflow at iter k the scale doubles at iter k + window, i.e. after
        // `window` clean steps, and the growth refills the hysteresis.
        assert!(!s.update(true));
        assert_eq!(s.scale(), 64.0);
        assert_eq!(s.cur_hysteresis, 1);
        for _ in 0..window - 1 {
            s.update(false);
        }
        assert_eq!(s.scale(), 64.0);
        assert_eq!(s.cur_hysteresis, 1);
        s.update(false);
        assert_eq!(s.scale(), 128.0);
        assert_eq!(s.cur_hysteresis, 2);
    }

    #[test]
    fn min_loss_scale_is_a_floor() {
        let mut s = DynamicLossScaler::new(LossScalerConfig {
            min_loss_scale: 3.0,
            ..cfg(1, 1000)
        });
        let expected = [8.0, 4.0, 3.0, 3.0, 3.0];
        for e in expected {
            assert!(!s.update(true));
            assert_eq!(s.scale(), e);
        }
    }

    #[test]
    fn overflow_detection_and_serde() {
        assert!(!has_overflow(&[0.0, -1.0, f32::MAX, f32::MIN_POSITIVE]));
        assert!(has_overflow(&[1.0, f32::INFINITY]));
        assert!(has_overflow(&[f32::NEG_INFINITY]));
        assert!(has_overflow(&[f32::NAN, 1.0]));
        assert!(!has_overflow(&[]));

        let mut s = DynamicLossScaler::new(LossScalerConfig::default());
        s.update(true);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<DynamicLossScaler>(&json).unwrap(), s);
    }
}
