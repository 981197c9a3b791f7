//! Stragglers before they hang a job: a rank whose compute time per step is well above its
//! peers' is flagged while the job still runs, and cleared when it recovers.
//!
//! The signal is each rank's *compute* seconds per step (the step's time less the time spent
//! waiting in collectives), as its trainer reports it: in synchronous data parallelism a slow
//! rank makes every other rank wait, so the healthy ranks' extra time shows up as collective
//! wait and only the slow rank's as compute.
//!
//! Per rank a window of the last [`WINDOW`] steps. An evaluation (every [`EVERY`] new steps of
//! rank 0) takes each rank's window mean `m_r`, the median `M` of those means (for two ranks,
//! the other rank's mean), and a spread `σ`: the larger of 1.4826 × the median absolute
//! deviation of the means and the pooled per-step standard deviation / √WINDOW (the standard
//! error of a window mean, which keeps a few ranks with noisy steps from being flagged; with
//! two ranks it is the only term).
//! A rank is flagged once `m_r > 1.10 M` and `m_r − M > 2σ` held at [`CONSECUTIVE`]
//! evaluations in a row, and cleared once `m_r < 1.05 M` held as often (hysteresis). The
//! median rather than the fastest rank is the reference (Megatron's detector reports min and
//! max; NVIDIA's resiliency extension scores against the best rank), so one fast outlier does
//! not flag everyone. Cost: O(1) per report, O(n) per evaluation.

use std::collections::VecDeque;

/// Steps per rank in the window.
pub const WINDOW: usize = 20;
/// A rank is judged once its window holds this many steps.
pub const MIN_SAMPLES: usize = 10;
/// New steps of rank 0 between two evaluations.
pub const EVERY: u64 = 5;
/// Evaluations in a row that flag or clear.
pub const CONSECUTIVE: u32 = 3;
/// Compute times outside these bounds (seconds) are not samples.
pub const MIN_SECONDS: f64 = 1e-6;
pub const MAX_SECONDS: f64 = 1e6;
/// Flagged above this multiple of the median...
pub const SLOWER: f64 = 1.10;
/// ...and cleared below this one.
pub const RECOVERED: f64 = 1.05;

#[derive(Debug, Clone, Default)]
struct RankWindow {
    samples: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    last_step: u64,
    flagged: bool,
    /// Evaluations in a row that found it slow (or, while flagged, recovered).
    streak: u32,
}

impl RankWindow {
    fn mean(&self) -> f64 {
        self.sum / self.samples.len() as f64
    }

    fn variance(&self) -> f64 {
        let n = self.samples.len() as f64;
        (self.sum_sq / n - self.mean().powi(2)).max(0.0)
    }
}

/// A flag that changed at an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `rank`'s compute time is `slowdown` times its peers' median (e.g. 1.34).
    Flagged {
        rank: u32,
        slowdown: f64,
    },
    Cleared {
        rank: u32,
    },
}

/// The detector of one job generation.
#[derive(Debug, Clone, Default)]
pub struct Detector {
    ranks: Vec<RankWindow>,
    /// Rank 0's step at the last evaluation.
    evaluated_at: u64,
}

impl Detector {
    /// A detector for `world` ranks that knows `flagged` as flagged already (a coordinator
    /// that took over a running job: its flags are saved with the job), so that they clear.
    pub fn new(world: u32, flagged: impl IntoIterator<Item = u32>) -> Detector {
        let mut d = Detector {
            ranks: vec![RankWindow::default(); world as usize],
            evaluated_at: 0,
        };
        for r in flagged {
            if let Some(w) = d.ranks.get_mut(r as usize) {
                w.flagged = true;
            }
        }
        d
    }

    /// Records rank `rank`'s compute seconds of `step`; reports of a step already recorded
    /// (heartbeats repeat the last report) and steps without a compute time are ignored.
    /// Returns the changes of an evaluation, when this report completed [`EVERY`] new steps
    /// of rank 0.
    pub fn record(&mut self, rank: u32, step: u64, compute_seconds: f64) -> Vec<Change> {
        let r = rank as usize;
        if r >= self.ranks.len() {
            // The caller bounds ranks by the job's world size; a default detector grows.
            if r > 1 << 20 {
                return Vec::new();
            }
            self.ranks.resize(r + 1, RankWindow::default());
        }
        let w = &mut self.ranks[r];
        // Worker input: a step's compute time between a microsecond and ~11 days, so that
        // every mean and ratio below stays finite.
        if step <= w.last_step || !(MIN_SECONDS..=MAX_SECONDS).contains(&compute_seconds) {
            return Vec::new();
        }
        w.last_step = step;
        w.samples.push_back(compute_seconds);
        w.sum += compute_seconds;
        w.sum_sq += compute_seconds * compute_seconds;
        if w.samples.len() > WINDOW {
            let old = w.samples.pop_front().unwrap_or_default();
            w.sum -= old;
            w.sum_sq -= old * old;
        }
        if rank == 0 && step >= self.evaluated_at.saturating_add(EVERY) {
            self.evaluated_at = step;
            return self.evaluate();
        }
        Vec::new()
    }

    /// The flagged ranks and how much slower each is now.
    pub fn flagged(&self) -> Vec<(u32, f64)> {
        let reference = self.reference();
        self.ranks
            .iter()
            .enumerate()
            .filter(|(_, w)| w.flagged)
            .map(|(r, w)| (r as u32, reference.map_or(1.0, |(m, _)| w.mean() / m)))
            .collect()
    }

    /// The window mean of rank `rank`'s compute seconds, once it has samples.
    pub fn mean(&self, rank: u32) -> Option<f64> {
        let w = self.ranks.get(rank as usize)?;
        (!w.samples.is_empty()).then(|| w.mean())
    }

    /// (median of the judged ranks' means, spread), when at least two ranks are judged.
    fn reference(&self) -> Option<(f64, f64)> {
        let judged: Vec<&RankWindow> = self
            .ranks
            .iter()
            .filter(|w| w.samples.len() >= MIN_SAMPLES)
            .collect();
        if judged.len() < 2 {
            return None;
        }
        let mut means: Vec<f64> = judged.iter().map(|w| w.mean()).collect();
        let median = median(&mut means);
        let mut deviations: Vec<f64> = means.iter().map(|m| (m - median).abs()).collect();
        let mad = median_of(&mut deviations);
        let pooled = (judged.iter().map(|w| w.variance()).sum::<f64>() / judged.len() as f64)
            .sqrt()
            / (WINDOW as f64).sqrt();
        // With two ranks the deviation from their midpoint is the very gap being judged:
        // only the per-step noise counts then.
        let spread = if judged.len() == 2 {
            pooled
        } else {
            (1.4826 * mad).max(pooled)
        };
        Some((median, spread))
    }

    fn evaluate(&mut self) -> Vec<Change> {
        let Some((all_median, spread)) = self.reference() else {
            return Vec::new();
        };
        let judged = self
            .ranks
            .iter()
            .filter(|w| w.samples.len() >= MIN_SAMPLES)
            .count();
        let mut changes = Vec::new();
        let means: Vec<Option<f64>> = self
            .ranks
            .iter()
            .map(|w| (w.samples.len() >= MIN_SAMPLES).then(|| w.mean()))
            .collect();
        for (r, w) in self.ranks.iter_mut().enumerate() {
            let Some(m) = means[r] else { continue };
            // With two ranks the median is halfway: compare with the other one.
            let reference = if judged == 2 {
                means
                    .iter()
                    .enumerate()
                    .find_map(|(o, v)| (o != r).then_some(*v).flatten())
                    .unwrap_or(all_median)
            } else {
                all_median
            };
            if reference <= 0.0 {
                continue;
            }
            let slow = m > SLOWER * reference && m - reference > 2.0 * spread;
            let recovered = m < RECOVERED * reference;
            let toward = if w.flagged { recovered } else { slow };
            w.streak = if toward { w.streak + 1 } else { 0 };
            if w.streak >= CONSECUTIVE {
                w.streak = 0;
                w.flagged = !w.flagged;
                changes.push(if w.flagged {
                    Change::Flagged {
                        rank: r as u32,
                        slowdown: m / reference,
                    }
                } else {
                    Change::Cleared { rank: r as u32 }
                });
            }
        }
        changes
    }
}

fn median(v: &mut [f64]) -> f64 {
    median_of(v)
}

/// The median (O(n), reorders `v`); `v` is not empty.
fn median_of(v: &mut [f64]) -> f64 {
    let n = v.len();
    let mid = n / 2;
    v.select_nth_unstable_by(mid, f64::total_cmp);
    let upper = v[mid];
    if n % 2 == 1 {
        return upper;
    }
    let lower = v[..mid].iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (lower + upper) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reproducible noise source (xorshift), ±`amp` around 1.
    struct Noise(u64);
    impl Noise {
        fn next(&mut self, amp: f64) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let u = (self.0 >> 11) as f64 / (1u64 << 53) as f64;
            1.0 + amp * (2.0 * u - 1.0)
        }
    }

    /// Runs `ranks` ranks for `steps` steps of ~0.1 s (±`noise`), rank `slow` `factor` times
    /// slower over `from..to`; returns (step, change) in order.
    fn run(
        ranks: u32,
        steps: u64,
        noise: f64,
        slow: u32,
        factor: f64,
        from: u64,
        to: u64,
    ) -> Vec<(u64, Change)> {
        let mut d = Detector::default();
        let mut n = Noise(0x9E37_79B9_7F4A_7C15);
        let mut out = Vec::new();
        for step in 1..=steps {
            // Rank 0 last, as it often reports last; evaluations happen on its reports.
            for rank in (0..ranks).rev() {
                let mut t = 0.1 * n.next(noise);
                if rank == slow && (from..to).contains(&step) {
                    t *= factor;
                }
                for c in d.record(rank, step, t) {
                    out.push((step, c));
                }
            }
        }
        out
    }

    #[test]
    fn a_slow_rank_is_flagged_within_50_steps_and_cleared_after() {
        for ranks in [2, 4, 16] {
            let changes = run(ranks, 200, 0.05, 1, 1.3, 40, 120);
            assert_eq!(changes.len(), 2, "{ranks} ranks: {changes:?}");
            let (at, flag) = &changes[0];
            match flag {
                Change::Flagged { rank, slowdown } => {
                    assert_eq!(*rank, 1);
                    assert!((1.15..1.45).contains(slowdown), "{slowdown}");
                }
                other => panic!("{other:?}"),
            }
            assert!(*at <= 40 + 50, "{ranks} ranks: flagged at step {at}");
            let (at, clear) = &changes[1];
            assert_eq!(*clear, Change::Cleared { rank: 1 });
            assert!(*at <= 120 + 50, "{ranks} ranks: cleared at step {at}");
        }
    }

    #[test]
    fn noise_alone_never_flags() {
        for ranks in [2, 3, 8, 64] {
            let changes = run(ranks, 500, 0.05, 0, 1.0, 0, 0);
            assert!(changes.is_empty(), "{ranks} ranks: {changes:?}");
        }
    }

    #[test]
    fn repeated_reports_and_missing_times_are_ignored() {
        let mut d = Detector::default();
        for step in 1..=30 {
            for rank in [1, 0] {
                d.record(rank, step, if rank == 1 { 0.3 } else { 0.1 });
                // A heartbeat repeats the last report: not a new sample.
                d.record(rank, step, 5.0);
                d.record(rank, step + 1_000, 0.0);
            }
        }
        assert_eq!(d.flagged().len(), 1);
        assert!((d.mean(1).unwrap() - 0.3).abs() < 1e-9);
    }

    #[test]
    fn ten_thousand_ranks_evaluate_in_linear_time() {
        let mut d = Detector::default();
        for step in 1..=12 {
            for rank in (0..10_000u32).rev() {
                d.record(rank, step, 0.1 + f64::from(rank % 7) * 1e-4);
            }
        }
        assert!(d.flagged().is_empty());
    }

    #[test]
    fn saved_flags_clear_and_wild_reports_are_not_samples() {
        // A coordinator that took the job over knows rank 1 as flagged: it clears.
        let mut d = Detector::new(2, [1]);
        let mut changes = Vec::new();
        for step in 1..=40 {
            for rank in [1, 0] {
                changes.extend(d.record(rank, step, 0.1));
            }
        }
        assert_eq!(changes, [Change::Cleared { rank: 1 }]);
        // Times a worker cannot mean are no samples; a step at the end of the range does not
        // overflow the evaluation's schedule.
        for wild in [f64::INFINITY, f64::NAN, -1.0, 0.0, 1e300] {
            assert!(d.record(0, 1_000, wild).is_empty());
        }
        assert!((d.mean(0).unwrap() - 0.1).abs() < 1e-12);
        d.record(0, u64::MAX, 0.1);
        d.record(0, u64::MAX, 0.1);
        assert!(d.flagged().is_empty());
    }
}
