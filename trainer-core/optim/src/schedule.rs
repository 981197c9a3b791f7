//! Learning-rate schedules with the semantics of Hugging Face transformers' `get_scheduler`.
//!
//! HF wraps a `LambdaLR` whose factor is evaluated at the number of optimizer steps already
//! taken, so the optimizer step with 0-based index `s` uses [`Scheduler::lr`]`(s)`: with a
//! warmup the very first step runs at learning rate 0.

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The schedule's shape (`lr_scheduler_type` in LLaMA-Factory and HF `TrainingArguments`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// Linear warmup, then linear decay to 0 at `total_steps`.
    Linear,
    /// Linear warmup, then `num_cycles` (default 0.5: half a period) of a cosine down to 0 at
    /// `total_steps`.
    Cosine,
    /// Linear warmup, then `num_cycles` (default 1) cosine decays to 0, each restarting at the
    /// base rate; 0 from `total_steps` on.
    CosineWithRestarts,
    /// Linear warmup, then `(base - lr_end) × (1 − progress)^power + lr_end` (defaults
    /// `lr_end` 1e-7, `power` 1), `lr_end` from `total_steps` on.
    Polynomial,
    /// The base learning rate throughout; ignores the warmup, as HF's `constant` does.
    Constant,
    /// Linear warmup, then the base learning rate.
    ConstantWithWarmup,
    /// Linear warmup, then `1 / sqrt((step + timescale − warmup) / timescale)` with `timescale`
    /// = the warmup steps, or 10,000 without warmup (HF passes no kwargs to it).
    InverseSqrt,
    /// As `cosine`, but down to `min_lr_rate` × base (`min_lr_rate`, or `min_lr` / base: one
    /// of them is required, as in HF).
    CosineWithMinLr,
}

impl SchedulerKind {
    /// Every kind, in the order parse errors list them.
    pub const ALL: [SchedulerKind; 8] = [
        SchedulerKind::Linear,
        SchedulerKind::Cosine,
        SchedulerKind::CosineWithRestarts,
        SchedulerKind::Polynomial,
        SchedulerKind::Constant,
        SchedulerKind::ConstantWithWarmup,
        SchedulerKind::InverseSqrt,
        SchedulerKind::CosineWithMinLr,
    ];

    /// The name HF and LLaMA-Factory configs use (`"linear"`, `"cosine"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Linear => "linear",
            SchedulerKind::Cosine => "cosine",
            SchedulerKind::CosineWithRestarts => "cosine_with_restarts",
            SchedulerKind::Polynomial => "polynomial",
            SchedulerKind::Constant => "constant",
            SchedulerKind::ConstantWithWarmup => "constant_with_warmup",
            SchedulerKind::InverseSqrt => "inverse_sqrt",
            SchedulerKind::CosineWithMinLr => "cosine_with_min_lr",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = String;

    /// Parses a name of [`SchedulerKind::name`]; the error names the bad value and lists the
    /// known ones.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchedulerKind::ALL
            .into_iter()
            .find(|kind| kind.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = SchedulerKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown lr scheduler {s:?}; known schedulers: {}",
                    known.join(", ")
                )
            })
    }
}

/// HF: warmup_steps if > 0 else ceil(warmup_ratio * total_steps).
///
/// This is `TrainingArguments.get_warmup_steps`. A missing, negative or NaN ratio counts as 0;
/// the result is not capped at `total_steps` (HF does not cap it either).
pub fn resolve_warmup(
    warmup_steps: Option<u64>,
    warmup_ratio: Option<f64>,
    total_steps: u64,
) -> u64 {
    match warmup_steps {
        Some(steps) if steps > 0 => steps,
        _ => {
            let ratio = warmup_ratio.unwrap_or(0.0);
            let warmup = (total_steps as f64 * ratio).ceil();
            if warmup > 0.0 {
                // `as` saturates at u64::MAX for absurd ratios.
                warmup as u64
            } else {
                0
            }
        }
    }
}

/// The `lr_scheduler_kwargs` of a schedule, as transformers' `get_scheduler` passes them to the
/// schedule function (absent: its defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduleOptions {
    /// `cosine`, `cosine_with_min_lr` (default 0.5) and `cosine_with_restarts` (default 1): how
    /// many waves.
    pub num_cycles: Option<f64>,
    /// `cosine_with_min_lr`: the floor as a fraction of the base rate (HF's `min_lr_rate`, or
    /// its `min_lr` divided by the base rate).
    pub min_lr_rate: Option<f64>,
    /// `polynomial`: the rate it ends at (default 1e-7).
    pub lr_end: Option<f64>,
    /// `polynomial`: the power of the decay (default 1).
    pub power: Option<f64>,
}

impl ScheduleOptions {
    /// The options of `kind` from `lr_scheduler_kwargs` pairs, for the base rate `base_lr`, with
    /// HF's checks: `cosine_with_min_lr` needs exactly one of `min_lr` / `min_lr_rate`;
    /// `polynomial` needs `lr_end` below the base rate. Keys `get_scheduler` does not pass to
    /// `kind` are left out (the config's validation refuses or reports them).
    ///
    /// # Errors
    /// The message names the kwarg and what it needs.
    pub fn from_kwargs(
        kind: SchedulerKind,
        kwargs: &[(String, f64)],
        base_lr: f64,
    ) -> Result<ScheduleOptions, String> {
        let get = |k: &str| kwargs.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        let mut o = ScheduleOptions::default();
        match kind {
            SchedulerKind::Cosine | SchedulerKind::CosineWithRestarts => {
                o.num_cycles = get("num_cycles");
            }
            SchedulerKind::CosineWithMinLr => {
                o.num_cycles = get("num_cycles");
                o.min_lr_rate = match (get("min_lr"), get("min_lr_rate")) {
                    (Some(_), Some(_)) => {
                        return Err("give one of min_lr or min_lr_rate, not both".into());
                    }
                    (Some(_), None) if base_lr <= 0.0 || base_lr.is_nan() => {
                        return Err(format!(
                            "min_lr needs a learning_rate above 0 (it is {base_lr}): the \
                             schedule is min_lr / learning_rate; give min_lr_rate instead"
                        ));
                    }
                    (Some(min_lr), None) => Some(min_lr / base_lr),
                    (None, Some(rate)) => Some(rate),
                    (None, None) => {
                        return Err("cosine_with_min_lr needs min_lr or min_lr_rate \
                                    (e.g. {min_lr_rate: 0.1}), as transformers does"
                            .into());
                    }
                };
            }
            SchedulerKind::Polynomial => {
                o.lr_end = get("lr_end");
                o.power = get("power");
                let lr_end = o.lr_end.unwrap_or(POLYNOMIAL_LR_END);
                if base_lr.partial_cmp(&lr_end) != Some(std::cmp::Ordering::Greater) {
                    return Err(format!(
                        "polynomial: lr_end ({lr_end}) must be smaller than the learning rate \
                         ({base_lr})"
                    ));
                }
            }
            SchedulerKind::Linear
            | SchedulerKind::Constant
            | SchedulerKind::ConstantWithWarmup
            | SchedulerKind::InverseSqrt => {}
        }
        Ok(o)
    }
}

/// transformers' default `lr_end` of the polynomial schedule.
pub const POLYNOMIAL_LR_END: f64 = 1e-7;

/// A learning-rate schedule: [`Scheduler::lr`] gives the rate of each optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scheduler {
    /// The schedule's shape.
    pub kind: SchedulerKind,
    /// The peak learning rate (the optimizer's `lr`).
    pub base_lr: f64,
    /// Steps of linear warmup from 0 (see [`resolve_warmup`]); ignored by
    /// [`SchedulerKind::Constant`].
    pub warmup_steps: u64,
    /// Total number of optimizer steps of the run.
    pub total_steps: u64,
    /// The schedule's `lr_scheduler_kwargs`.
    #[serde(default)]
    pub options: ScheduleOptions,
}

impl Scheduler {
    /// A schedule with transformers' default options.
    pub fn new(kind: SchedulerKind, base_lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        Scheduler {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
            options: ScheduleOptions::default(),
        }
    }

    /// The learning rate of the optimizer step with 0-based index `step`: `base_lr` times HF's
    /// lambda factor at `step`.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    /// HF's `lr_lambda(current_step)` (transformers' `optimization.py`).
    fn factor(&self, step: u64) -> f64 {
        let s = step as f64;
        let w = self.warmup_steps as f64;
        let t = self.total_steps as f64;
        if step < self.warmup_steps && self.kind != SchedulerKind::Constant {
            return s / w.max(1.0);
        }
        let progress = || (s - w) / (t - w).max(1.0);
        let o = &self.options;
        match self.kind {
            SchedulerKind::Constant | SchedulerKind::ConstantWithWarmup => 1.0,
            SchedulerKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            SchedulerKind::Cosine => {
                let cycles = o.num_cycles.unwrap_or(0.5);
                (0.5 * (1.0 + (PI * cycles * 2.0 * progress()).cos())).max(0.0)
            }
            SchedulerKind::CosineWithMinLr => {
                let cycles = o.num_cycles.unwrap_or(0.5);
                let min = o.min_lr_rate.unwrap_or(0.0);
                let f = 0.5 * (1.0 + (PI * cycles * 2.0 * progress()).cos());
                (f * (1.0 - min) + min).max(0.0)
            }
            SchedulerKind::CosineWithRestarts => {
                let p = progress();
                if p >= 1.0 {
                    return 0.0;
                }
                let cycles = o.num_cycles.unwrap_or(1.0);
                (0.5 * (1.0 + (PI * ((cycles * p) % 1.0)).cos())).max(0.0)
            }
            SchedulerKind::Polynomial => {
                let lr_end = o.lr_end.unwrap_or(POLYNOMIAL_LR_END);
                let base = self.base_lr;
                if base <= 0.0 {
                    return 0.0;
                }
                if s > t {
                    return lr_end / base;
                }
                // HF divides by `total - warmup` unguarded; a run whose warmup is all of it
                // reaches here only at step == total, where the decay is over.
                let remaining = 1.0 - (s - w) / (t - w).max(1.0);
                ((base - lr_end) * remaining.powf(o.power.unwrap_or(1.0)) + lr_end) / base
            }
            SchedulerKind::InverseSqrt => {
                let timescale = if self.warmup_steps > 0 { w } else { 10_000.0 };
                1.0 / ((s + timescale - w) / timescale).sqrt()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    fn check(sched: &Scheduler, expected: &[(u64, f64)]) {
        for &(step, lr) in expected {
            let got = sched.lr(step);
            assert!(
                close(got, lr),
                "{} step {step}: got {got}, expected {lr}",
                sched.kind
            );
        }
    }

    #[test]
    fn linear_by_hand() {
        let sched = Scheduler {
            kind: SchedulerKind::Linear,
            base_lr: 1.0,
            warmup_steps: 4,
            total_steps: 12,
            options: ScheduleOptions::default(),
        };
        check(
            &sched,
            &[
                (0, 0.0),
                (1, 0.25),
                (3, 0.75),
                (4, 1.0),
                (6, 0.75),
                (8, 0.5),
                (11, 0.125),
                (12, 0.0),
                (20, 0.0),
            ],
        );
        let no_warmup = Scheduler {
            warmup_steps: 0,
            base_lr: 2e-3,
            ..sched
        };
        check(&no_warmup, &[(0, 2e-3), (3, 1.5e-3), (6, 1e-3), (12, 0.0)]);
    }

    #[test]
    fn cosine_by_hand() {
        let sched = Scheduler {
            kind: SchedulerKind::Cosine,
            base_lr: 1e-3,
            warmup_steps: 2,
            total_steps: 10,
            options: ScheduleOptions::default(),
        };
        // After warmup, progress = (s - 2) / 8; factor = 0.5 (1 + cos(pi progress)).
        let half_sqrt2 = std::f64::consts::FRAC_1_SQRT_2 / 2.0;
        check(
            &sched,
            &[
                (0, 0.0),
                (1, 0.5e-3),
                (2, 1e-3),
                (4, 1e-3 * (0.5 + half_sqrt2)),
                (6, 0.5e-3),
                (8, 1e-3 * (0.5 - half_sqrt2)),
                (10, 0.0),
                (11, 1e-3 * 0.5 * (1.0 + (PI * 9.0 / 8.0).cos())),
            ],
        );
        // Past the end the cosine climbs back up (HF does not clamp the step either).
        assert!(sched.lr(11) > 0.0);
    }

    #[test]
    fn constant_ignores_warmup() {
        let sched = Scheduler {
            kind: SchedulerKind::Constant,
            base_lr: 5e-5,
            warmup_steps: 10,
            total_steps: 100,
            options: ScheduleOptions::default(),
        };
        check(&sched, &[(0, 5e-5), (5, 5e-5), (99, 5e-5), (1000, 5e-5)]);
    }

    #[test]
    fn constant_with_warmup_by_hand() {
        let sched = Scheduler {
            kind: SchedulerKind::ConstantWithWarmup,
            base_lr: 1.0,
            warmup_steps: 8,
            total_steps: 100,
            options: ScheduleOptions::default(),
        };
        check(
            &sched,
            &[
                (0, 0.0),
                (2, 0.25),
                (6, 0.75),
                (8, 1.0),
                (99, 1.0),
                (500, 1.0),
            ],
        );
    }

    #[test]
    fn warmup_longer_than_run_and_degenerate_totals() {
        // T - w <= 0 uses max(1, ..), as HF does.
        let sched = Scheduler {
            kind: SchedulerKind::Linear,
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 5,
            options: ScheduleOptions::default(),
        };
        check(&sched, &[(0, 0.0), (5, 0.5), (10, 0.0)]);
        let zero = Scheduler {
            kind: SchedulerKind::Cosine,
            base_lr: 1.0,
            warmup_steps: 0,
            total_steps: 0,
            options: ScheduleOptions::default(),
        };
        check(&zero, &[(0, 1.0)]);
    }

    #[test]
    fn resolve_warmup_follows_hf() {
        assert_eq!(resolve_warmup(Some(7), Some(0.5), 100), 7);
        assert_eq!(resolve_warmup(Some(0), Some(0.1), 100), 10);
        assert_eq!(resolve_warmup(None, Some(0.1), 1000), 100);
        assert_eq!(resolve_warmup(None, Some(0.03), 101), 4); // ceil(3.03)
        assert_eq!(resolve_warmup(None, Some(0.5), 3), 2); // ceil(1.5)
        assert_eq!(resolve_warmup(None, None, 100), 0);
        assert_eq!(resolve_warmup(Some(0), None, 100), 0);
        assert_eq!(resolve_warmup(None, Some(-0.5), 100), 0);
        assert_eq!(resolve_warmup(None, Some(f64::NAN), 100), 0);
    }

    #[test]
    fn names_parse_and_round_trip() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>(), Ok(kind));
            assert_eq!(kind.to_string(), kind.name());
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.name()));
            assert_eq!(serde_json::from_str::<SchedulerKind>(&json).unwrap(), kind);
        }
        let err = "reduce_lr_on_plateau".parse::<SchedulerKind>().unwrap_err();
        assert!(err.contains("\"reduce_lr_on_plateau\""), "{err}");
        for kind in SchedulerKind::ALL {
            assert!(err.contains(kind.name()), "{err}");
        }
        let sched = Scheduler {
            kind: SchedulerKind::ConstantWithWarmup,
            base_lr: 1e-4,
            warmup_steps: 3,
            total_steps: 30,
            options: ScheduleOptions::default(),
        };
        let json = serde_json::to_string(&sched).unwrap();
        assert_eq!(serde_json::from_str::<Scheduler>(&json).unwrap(), sched);
    }

    /// A schedule of `kind` with `lr_scheduler_kwargs` pairs.
    fn with(
        kind: SchedulerKind,
        lr: f64,
        warmup: u64,
        total: u64,
        kw: &[(&str, f64)],
    ) -> Scheduler {
        let kw: Vec<(String, f64)> = kw.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        Scheduler {
            options: ScheduleOptions::from_kwargs(kind, &kw, lr).unwrap(),
            ..Scheduler::new(kind, lr, warmup, total)
        }
    }

    // Reference values: transformers' `optimization.py` lambdas (`_get_*_lr_lambda`,
    // `get_inverse_sqrt_schedule`'s timescale default, `get_cosine_with_min_lr_schedule_with_
    // warmup`'s min_lr → min_lr_rate) transcribed into Python and evaluated there, times the
    // base rate.

    #[test]
    fn cosine_with_restarts_matches_transformers() {
        check(
            &with(
                SchedulerKind::CosineWithRestarts,
                2e-3,
                4,
                24,
                &[("num_cycles", 3.0)],
            ),
            &[
                (0, 0.0),
                (2, 0.001),
                (4, 0.002),
                (5, 0.0018910065241883678),
                (9, 0.00029289321881345256),
                (10, 4.894348370484658e-05),
                (11, 0.0019876883405951376),
                (16, 0.0001909830056250529),
                (17, 1.231165940486223e-05),
                (23, 0.00010899347581163277),
                (24, 0.0),
                (30, 0.0),
            ],
        );
        // num_cycles defaults to 1: the cosine of `cosine`, but 0 from the last step on.
        check(
            &with(SchedulerKind::CosineWithRestarts, 1.0, 0, 10, &[]),
            &[
                (0, 1.0),
                (3, 0.7938926261462366),
                (5, 0.5),
                (9, 0.024471741852423234),
                (10, 0.0),
                (12, 0.0),
            ],
        );
    }

    #[test]
    fn polynomial_matches_transformers() {
        check(
            &with(SchedulerKind::Polynomial, 1e-3, 2, 12, &[]),
            &[
                (0, 0.0),
                (1, 0.0005),
                (2, 0.001),
                (5, 0.0007000299999999999),
                (11, 0.00010008999999999997),
                (12, 1e-07),
                (13, 1e-07),
            ],
        );
        check(
            &with(
                SchedulerKind::Polynomial,
                1e-3,
                2,
                12,
                &[("lr_end", 1e-5), ("power", 2.0)],
            ),
            &[
                (0, 0.0),
                (2, 0.001),
                (4, 0.0006436000000000001),
                (7, 0.0002575),
                (12, 1e-05),
                (20, 1e-05),
            ],
        );
        // lr_end must stay below the learning rate, as transformers checks.
        let err = ScheduleOptions::from_kwargs(SchedulerKind::Polynomial, &[], 1e-7).unwrap_err();
        assert!(err.contains("lr_end"), "{err}");
    }

    #[test]
    fn inverse_sqrt_matches_transformers() {
        check(
            &with(SchedulerKind::InverseSqrt, 1e-3, 4, 100, &[]),
            &[
                (0, 0.0),
                (2, 0.0005),
                (4, 0.001),
                (5, 0.0008944271909999159),
                (12, 0.0005773502691896259),
                (100, 0.0002),
            ],
        );
        // Without warmup the timescale is 10,000 steps.
        check(
            &with(SchedulerKind::InverseSqrt, 1e-3, 0, 100, &[]),
            &[
                (0, 0.001),
                (1, 0.0009999500037496877),
                (9999, 0.0007071244595190174),
                (30000, 0.0005),
            ],
        );
    }

    #[test]
    fn cosine_with_min_lr_matches_transformers() {
        check(
            &with(
                SchedulerKind::CosineWithMinLr,
                1e-3,
                2,
                12,
                &[("min_lr_rate", 0.1)],
            ),
            &[
                (0, 0.0),
                (1, 0.0005),
                (2, 0.001),
                (4, 0.0009140576474687263),
                (7, 0.00055),
                (12, 0.0001),
                (14, 0.00018594235253127363),
            ],
        );
        // min_lr is absolute: the rate is min_lr / learning_rate.
        check(
            &with(
                SchedulerKind::CosineWithMinLr,
                4e-4,
                0,
                8,
                &[("min_lr", 1e-5)],
            ),
            &[
                (0, 0.0004),
                (2, 0.00034288582233137673),
                (4, 0.000205),
                (8, 1e-05),
            ],
        );
        for kw in [
            vec![],
            vec![
                ("min_lr".to_string(), 1e-5),
                ("min_lr_rate".to_string(), 0.1),
            ],
        ] {
            let err = ScheduleOptions::from_kwargs(SchedulerKind::CosineWithMinLr, &kw, 1e-3)
                .unwrap_err();
            assert!(err.contains("min_lr"), "{err}");
        }
        // min_lr over a zero learning rate has no ratio.
        let kw = vec![("min_lr".to_string(), 1e-5)];
        let err =
            ScheduleOptions::from_kwargs(SchedulerKind::CosineWithMinLr, &kw, 0.0).unwrap_err();
        assert!(err.contains("learning_rate above 0"), "{err}");
    }

    #[test]
    fn cosine_num_cycles_matches_transformers() {
        check(
            &with(SchedulerKind::Cosine, 1.0, 0, 8, &[("num_cycles", 1.5)]),
            &[
                (0, 1.0),
                (1, 0.6913417161825449),
                (2, 0.14644660940672627),
                (4, 0.4999999999999999),
                (6, 0.8535533905932738),
                (8, 0.0),
            ],
        );
    }
}
