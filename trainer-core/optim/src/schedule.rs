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
    /// Linear warmup, then half a cosine period down to 0 at `total_steps`.
    Cosine,
    /// The base learning rate throughout; ignores the warmup, as HF's `constant` does.
    Constant,
    /// Linear warmup, then the base learning rate.
    ConstantWithWarmup,
}

impl SchedulerKind {
    /// Every kind, in the order parse errors list them.
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Linear,
        SchedulerKind::Cosine,
        SchedulerKind::Constant,
        SchedulerKind::ConstantWithWarmup,
    ];

    /// The name HF and LLaMA-Factory configs use (`"linear"`, `"cosine"`, `"constant"`,
    /// `"constant_with_warmup"`).
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Linear => "linear",
            SchedulerKind::Cosine => "cosine",
            SchedulerKind::Constant => "constant",
            SchedulerKind::ConstantWithWarmup => "constant_with_warmup",
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
}

impl Scheduler {
    /// The learning rate of the optimizer step with 0-based index `step`: `base_lr` times HF's
    /// lambda factor at `step`.
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }

    /// HF's `lr_lambda(current_step)`.
    fn factor(&self, step: u64) -> f64 {
        let s = step as f64;
        let w = self.warmup_steps as f64;
        let t = self.total_steps as f64;
        let in_warmup = step < self.warmup_steps;
        let warmup = || s / w.max(1.0);
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::ConstantWithWarmup => {
                if in_warmup {
                    warmup()
                } else {
                    1.0
                }
            }
            SchedulerKind::Linear => {
                if in_warmup {
                    warmup()
                } else {
                    ((t - s) / (t - w).max(1.0)).max(0.0)
                }
            }
            SchedulerKind::Cosine => {
                if in_warmup {
                    warmup()
                } else {
                    const NUM_CYCLES: f64 = 0.5;
                    let progress = (s - w) / (t - w).max(1.0);
                    (0.5 * (1.0 + (PI * 2.0 * NUM_CYCLES * progress).cos())).max(0.0)
                }
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
        };
        check(&sched, &[(0, 0.0), (5, 0.5), (10, 0.0)]);
        let zero = Scheduler {
            kind: SchedulerKind::Cosine,
            base_lr: 1.0,
            warmup_steps: 0,
            total_steps: 0,
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
        let err = "cosine_with_restarts".parse::<SchedulerKind>().unwrap_err();
        assert!(err.contains("\"cosine_with_restarts\""), "{err}");
        for kind in SchedulerKind::ALL {
            assert!(err.contains(kind.name()), "{err}");
        }
        let sched = Scheduler {
            kind: SchedulerKind::ConstantWithWarmup,
            base_lr: 1e-4,
            warmup_steps: 3,
            total_steps: 30,
        };
        let json = serde_json::to_string(&sched).unwrap();
        assert_eq!(serde_json::from_str::<Scheduler>(&json).unwrap(), sched);
    }
}
