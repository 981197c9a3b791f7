//! What trainers report every step that is not job state: each rank's compute time,
//! collective wait and memory, and the straggler detector fed by them. Kept beside the jobs,
//! not in them: a job's ranks are saved when they change, and these change every step.

use crate::job::{Straggler, events};
use crate::straggler::{Change, Detector, WINDOW};

use super::*;

/// Flagged ranks a job's status lists (its header stays small).
const MAX_SHOWN: usize = 32;

/// One job generation's telemetry. Indexed by rank (the job's world bounds it): a report
/// costs no hashing beyond finding its job.
#[derive(Debug, Default)]
pub(super) struct Telemetry {
    generation: u64,
    detector: Detector,
    ranks: Vec<Option<RankFacts>>,
    /// Where each rank computes, as it said (bounded by the report's conversion).
    devices: Vec<Option<String>>,
}

/// A rank's last report.
#[derive(Debug, Default, Clone, Copy)]
pub struct RankFacts {
    pub collective_wait_seconds: f64,
    pub memory_bytes: u64,
    /// The most `memory_bytes` this generation reported.
    pub peak_memory_bytes: u64,
    /// The model FLOPs of one trained token, as the rank counted them.
    pub model_flops_per_token: Option<f64>,
    /// The rank's peak FLOP/s, as it reported it.
    pub peak_flops: Option<f64>,
}

impl Telemetry {
    /// Rank `rank`'s facts: the mean compute seconds of its window, its last collective wait
    /// and memory.
    pub(crate) fn rank(&self, rank: u32) -> Option<(Option<f64>, RankFacts)> {
        let facts = self.facts(rank)?;
        Some((self.detector.mean(rank), facts))
    }

    fn facts(&self, rank: u32) -> Option<RankFacts> {
        *self.ranks.get(rank as usize)?
    }

    /// Where rank `rank` computes, once it said.
    fn device(&self, rank: u32) -> Option<&String> {
        self.devices.get(rank as usize)?.as_ref()
    }

    /// Records rank `rank`'s facts (the caller bounds `rank` by the job's world).
    fn set(&mut self, rank: u32, facts: RankFacts) {
        let r = rank as usize;
        if r >= self.ranks.len() {
            self.ranks.resize(r + 1, None);
        }
        self.ranks[r] = Some(facts);
    }

    /// The job's MFU at `tokens_per_second` (rank 0's, of the global batch) over `world`
    /// ranks: `None` until every rank has reported its peak and rank 0 its FLOPs per token.
    pub(crate) fn mfu(&self, world: u32, tokens_per_second: Option<f64>) -> Option<f64> {
        let per_token = self.facts(0)?.model_flops_per_token?;
        let peaks = (0..world)
            .map(|r| self.facts(r).and_then(|f| f.peak_flops))
            .collect::<Option<Vec<f64>>>()?;
        mfu(tokens_per_second?, per_token, peaks.iter().sum())
    }
}

/// Model FLOPs utilisation: the model FLOPs the job does per second (`tokens_per_second` ×
/// `flops_per_token`) over what its devices could do (`peak_flops`, summed over the ranks).
/// `None` when an input is missing, not finite, or the peak is 0.
pub fn mfu(tokens_per_second: f64, flops_per_token: f64, peak_flops: f64) -> Option<f64> {
    let v = tokens_per_second * flops_per_token / peak_flops;
    (tokens_per_second >= 0.0 && peak_flops > 0.0 && v.is_finite()).then_some(v)
}

impl Core {
    /// Takes a valid report's per-step facts; flags and clears stragglers. `world` and
    /// `running` are the report's job's: its caller has the job at hand.
    pub(super) fn telemetry(&mut self, p: &ProgressReport, world: u32, running: bool) {
        // The rank is the worker's word: only the job's own ranks count (this bounds what is
        // kept per job by its world size), and only while it runs.
        if p.rank >= world || !running {
            return;
        }
        // A generation's first report: flags saved with the job (a coordinator that took it
        // over) stay clearable.
        let jobs = &self.jobs;
        let fresh = || Telemetry {
            generation: p.generation,
            detector: Detector::new(
                world,
                jobs.get(&p.job_id)
                    .into_iter()
                    .flat_map(|j| j.stragglers.iter().map(|s| s.rank)),
            ),
            ranks: vec![None; world as usize],
            devices: vec![None; world as usize],
        };
        // One lookup per report; the job's id is cloned only for its first.
        let t = match self.telemetry.get_mut(&p.job_id) {
            Some(t) if t.generation == p.generation => t,
            Some(t) => {
                *t = fresh();
                t
            }
            None => self.telemetry.entry(p.job_id.clone()).or_insert_with(fresh),
        };
        let peak = t.facts(p.rank).map_or(0, |f| f.peak_memory_bytes);
        t.set(
            p.rank,
            RankFacts {
                collective_wait_seconds: p.collective_wait_seconds,
                memory_bytes: p.memory_bytes,
                peak_memory_bytes: peak.max(p.memory_bytes),
                model_flops_per_token: p.model_flops_per_token,
                peak_flops: p.peak_flops,
            },
        );
        if !p.device.is_empty()
            && t.device(p.rank) != Some(&p.device)
            && let Some(d) = t.devices.get_mut(p.rank as usize)
        {
            *d = Some(p.device.clone());
        }
        let changes = t.detector.record(p.rank, p.step, p.compute_seconds);
        if !changes.is_empty() {
            self.stragglers_changed(&p.job_id, changes);
        }
    }

    fn stragglers_changed(&mut self, id: &str, changes: Vec<Change>) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let step = job.progress.step.unwrap_or(0);
        let now = now_ms();
        for change in changes {
            match change {
                Change::Flagged { rank, slowdown } => {
                    let node = job
                        .ranks
                        .get(rank as usize)
                        .map(|r| r.node.clone())
                        .unwrap_or_default();
                    let pct = (slowdown - 1.0) * 100.0;
                    tracing::warn!(job = %id, generation = job.generation, rank, node = %node, slower_pct = format!("{pct:.0}"), "straggler");
                    job.stragglers.retain(|s| s.rank != rank);
                    // The status names the first few; the events and metrics name them all.
                    if job.stragglers.len() < MAX_SHOWN {
                        job.stragglers.push(Straggler {
                            rank,
                            node: node.clone(),
                            slowdown,
                            since_step: step,
                        });
                    }
                    let message = format!(
                        "rank {rank} on {node}: compute time per step {pct:.0}% above its peers' median over the last {WINDOW} steps"
                    );
                    events::straggler(job, true, rank, message, now);
                }
                Change::Cleared { rank } => {
                    tracing::info!(job = %id, generation = job.generation, rank, "straggler cleared");
                    job.stragglers.retain(|s| s.rank != rank);
                    let message = format!("rank {rank} is back in line with its peers");
                    events::straggler(job, false, rank, message, now);
                }
            }
        }
        self.save(id);
    }

    /// Job `id`'s status with each rank's telemetry of the running generation (step time,
    /// collective wait, memory, device): what `ringctl status` and `watch` show.
    pub(super) fn job_status(&self, id: &str) -> Option<pb::JobStatus> {
        let job = self.jobs.get(id)?;
        let mut st = status::job_status(job);
        if let Some(t) = self.telemetry_of(id, job.generation) {
            for r in &mut st.ranks {
                if let Some((mean, facts)) = t.rank(r.rank) {
                    r.step_seconds = mean;
                    r.collective_wait_seconds = Some(facts.collective_wait_seconds);
                    r.memory_bytes = Some(facts.memory_bytes);
                    r.peak_memory_bytes = Some(facts.peak_memory_bytes);
                }
                r.device = t.device(r.rank).cloned();
            }
        }
        if let Some(p) = st.progress.as_mut() {
            p.mfu = self.job_mfu(id);
        }
        Some(st)
    }

    /// Job `id`'s MFU while it runs and every rank of its generation reported its peak.
    pub(super) fn job_mfu(&self, id: &str) -> Option<f64> {
        let job = self.jobs.get(id)?;
        if job.state != JobState::Running {
            return None;
        }
        self.telemetry_of(id, job.generation)?
            .mfu(job.ranks.len() as u32, job.progress.tokens_per_second)
    }

    /// A job's telemetry of its current generation, if any.
    pub(super) fn telemetry_of(&self, id: &str, generation: u64) -> Option<&Telemetry> {
        self.telemetry
            .get(id)
            .filter(|t| t.generation == generation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mfu_is_model_flops_over_the_summed_peaks() {
        // 1000 tokens/s × 6e9 FLOPs/token on 2 × 989e12: 0.3%.
        let v = mfu(1000.0, 6e9, 2.0 * 989e12).unwrap();
        assert!((v - 6e12 / 1.978e15).abs() < 1e-12, "{v}");
        assert_eq!(mfu(0.0, 6e9, 1e12), Some(0.0));
        assert_eq!(mfu(1000.0, 6e9, 0.0), None);
        assert_eq!(mfu(f64::NAN, 6e9, 1e12), None);
        assert_eq!(mfu(-1.0, 6e9, 1e12), None);
    }

    #[test]
    fn mfu_waits_for_every_ranks_peak() {
        let facts = |per_token, peak| RankFacts {
            model_flops_per_token: per_token,
            peak_flops: peak,
            ..Default::default()
        };
        let mut t = Telemetry::default();
        t.set(0, facts(Some(1e9), Some(1e12)));
        assert_eq!(t.mfu(2, Some(100.0)), None, "rank 1 has not reported");
        t.set(1, facts(Some(1e9), None));
        assert_eq!(t.mfu(2, Some(100.0)), None, "rank 1 knows no peak");
        t.set(1, facts(Some(1e9), Some(3e12)));
        assert_eq!(t.mfu(2, Some(100.0)), Some(100.0 * 1e9 / 4e12));
        assert_eq!(t.mfu(2, None), None, "no tokens/s yet");
        t.set(0, facts(None, Some(1e12)));
        assert_eq!(t.mfu(2, Some(100.0)), None, "no FLOPs per token");
    }
}
