//! The coordinator's Prometheus metrics (`--metrics-listen ADDR:PORT`, `GET /metrics`, text
//! format 0.0.4), through the `prometheus-client` crate.
//!
//! Two kinds:
//! - **Counters and histograms** that live as long as the process ([`Metrics`]): jobs
//!   submitted, failures by reason, restarts, jobs finished by state and reason, checkpoints
//!   committed, restart latency. They are counted from the job events ([`crate::job::events`])
//!   as the loop saves each changed job, so they count exactly what `ringctl events` shows.
//! - **Gauges of the moment** ([`Snapshot`]), built by the loop at each scrape and encoded into
//!   a fresh registry: jobs and nodes by state, and per job that has not finished its step,
//!   loss, tokens/s, restarts, world size and generation, with per-rank steps for jobs of at
//!   most [`MAX_RANK_SERIES`] ranks. A finished job has no series at all, so the label
//!   cardinality is bounded by the running jobs.
//!
//! Served on plain HTTP by [`ringmaster_common::metrics::serve`] (shared with the agent),
//! separate from the gRPC port, without credentials: bind it to an address only the monitoring
//! system reaches.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::job::{EventKind, Job};

/// Jobs with more ranks than this get no per-rank series.
pub const MAX_RANK_SERIES: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishedLabels {
    state: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabels {
    job: String,
    rank: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The process's counters and histograms; clones share them.
#[derive(Clone)]
pub struct Metrics {
    jobs_submitted: Counter,
    job_failures: Family<ReasonLabel, Counter>,
    job_restarts: Counter,
    jobs_finished: Family<FinishedLabels, Counter>,
    checkpoints_committed: Counter,
    restart_seconds: Histogram,
    checkpoint_save_seconds: Histogram,
    checkpoint_commit_seconds: Histogram,
    fault_detection_seconds: Family<KindLabel, Histogram>,
    /// The newest event counted, per job.
    seen: Arc<std::sync::Mutex<HashMap<String, u64>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// New counters, and the registry that encodes them.
    pub fn new() -> (Metrics, Registry) {
        let m = Metrics {
            jobs_submitted: Counter::default(),
            job_failures: Family::default(),
            job_restarts: Counter::default(),
            jobs_finished: Family::default(),
            checkpoints_committed: Counter::default(),
            // 50 ms .. ~100 s.
            restart_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            // 10 ms .. ~22 min.
            checkpoint_save_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 18)),
            checkpoint_commit_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 18)),
            // 5 ms .. ~160 s.
            fault_detection_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 16))
            }),
            seen: Arc::default(),
        };
        let mut r = Registry::with_prefix("ringmaster");
        r.register(
            "jobs_submitted",
            "Jobs submitted to this coordinator",
            m.jobs_submitted.clone(),
        );
        r.register(
            "job_failures",
            "Generations that failed, by the root cause's reason",
            m.job_failures.clone(),
        );
        r.register(
            "job_restarts",
            "Restarts of jobs (a failed generation followed by a new one)",
            m.job_restarts.clone(),
        );
        r.register(
            "jobs_finished",
            "Jobs that ended, by final state and reason",
            m.jobs_finished.clone(),
        );
        r.register(
            "checkpoints_committed",
            "Checkpoints every rank of a job committed",
            m.checkpoints_committed.clone(),
        );
        r.register(
            "restart_seconds",
            "From a generation's failure to the next generation running",
            m.restart_seconds.clone(),
        );
        r.register(
            "checkpoint_save_seconds",
            "Rank 0's time to write its shard of a committed checkpoint",
            m.checkpoint_save_seconds.clone(),
        );
        r.register(
            "checkpoint_commit_seconds",
            "Rank 0's time from its shard written to a checkpoint's commit marker (waiting for \
             every shard, manifest, marker)",
            m.checkpoint_commit_seconds.clone(),
        );
        r.register(
            "fault_detection_seconds",
            "From a fault to this coordinator acting on it: kind exit (a worker's process ended, \
             by its agent's clock) or node_lost (from the node's last heartbeat)",
            m.fault_detection_seconds.clone(),
        );
        (m, r)
    }

    /// A fault of `kind` (`exit`, `node_lost`) acted on `late_ms` after it happened; values
    /// beyond an hour (a clock far off) are not counted.
    pub fn fault_detected(&self, kind: &'static str, late_ms: u64) {
        if late_ms <= 3_600_000 {
            self.fault_detection_seconds
                .get_or_create(&KindLabel { kind })
                .observe(late_ms as f64 / 1000.0);
        }
    }

    /// A newly committed checkpoint's durations, as rank 0 reported them (each when known).
    pub fn checkpoint_durations(&self, save: Option<f64>, commit: Option<f64>) {
        if let Some(s) = save {
            self.checkpoint_save_seconds.observe(s);
        }
        if let Some(c) = commit {
            self.checkpoint_commit_seconds.observe(c);
        }
    }

    /// Marks the events `job` has now as counted (a job loaded from the store: its past is
    /// not this process's to count).
    pub fn seen(&self, job: &Job) {
        self.lock().insert(job.id.clone(), job.events.newest_seq());
    }

    /// Forgets a removed job.
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Counts the events of `job` not counted yet.
    pub fn observe(&self, job: &Job) {
        let newest = job.events.newest_seq();
        let after = {
            let mut seen = self.lock();
            let last = seen.entry(job.id.clone()).or_insert(0);
            if *last >= newest {
                return;
            }
            std::mem::replace(last, newest)
        };
        for e in job.events.after(after) {
            let reason = e.reason.map(|r| r.as_str()).unwrap_or("").to_owned();
            match e.kind {
                EventKind::Submitted => {
                    self.jobs_submitted.inc();
                }
                EventKind::RankFailed | EventKind::NodeLost => {
                    self.job_failures
                        .get_or_create(&ReasonLabel { reason })
                        .inc();
                }
                // A move off a drained node is not a restart.
                EventKind::Restarting if reason != "Drained" => {
                    self.job_restarts.inc();
                }
                EventKind::CheckpointCommitted => {
                    self.checkpoints_committed.inc();
                }
                EventKind::Running if e.generation > 0 => {
                    // The failure this generation recovers from: the newest before it.
                    // A generation that follows a drain recovers from no failure.
                    let failed = job
                        .events
                        .iter()
                        .rev()
                        .filter(|f| f.seq < e.seq)
                        .find(|f| {
                            matches!(f.kind, EventKind::RankFailed | EventKind::NodeLost)
                                || f.reason == Some(crate::job::Reason::Drained)
                        })
                        .filter(|f| f.reason != Some(crate::job::Reason::Drained));
                    if let Some(f) = failed {
                        let ms = e.unix_ms.saturating_sub(f.unix_ms);
                        self.restart_seconds.observe(ms as f64 / 1000.0);
                    }
                }
                EventKind::Succeeded | EventKind::Failed | EventKind::Cancelled => {
                    let state = job.state.as_str().to_owned();
                    self.jobs_finished
                        .get_or_create(&FinishedLabels { state, reason })
                        .inc();
                }
                _ => {}
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the loop knows at a scrape (plain data; encoded outside the loop).
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub jobs_by_state: Vec<(String, u64)>,
    pub nodes_by_state: Vec<(String, u64)>,
    pub jobs: Vec<JobSnapshot>,
    /// The trainers' rendezvous store: generations open, keys, bytes.
    pub rendezvous: crate::server::rendezvous::RendezvousSizes,
}

/// One job that has not finished.
#[derive(Debug, Default, Clone)]
pub struct JobSnapshot {
    pub id: String,
    pub generation: u64,
    pub world_size: u32,
    pub restarts: u32,
    pub step: Option<u64>,
    pub total_steps: Option<u64>,
    pub loss: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub grad_norm: Option<f64>,
    /// Model FLOPs utilisation (running jobs whose ranks all reported a peak).
    pub mfu: Option<f64>,
    /// Each rank, when the job has at most [`MAX_RANK_SERIES`] (flagged stragglers always).
    pub ranks: Vec<RankSnapshot>,
}

/// One rank of a running job.
#[derive(Debug, Default, Clone)]
pub struct RankSnapshot {
    pub rank: u32,
    pub node: String,
    pub step: Option<u64>,
    /// Mean compute seconds per step over the straggler detector's window.
    pub compute_seconds: Option<f64>,
    pub collective_wait_seconds: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub peak_memory_bytes: Option<u64>,
    pub straggler: bool,
}

impl Snapshot {
    /// The snapshot of `jobs` and of node states; `facts` gives a rank's telemetry (window
    /// mean compute seconds, last wait and memory).
    pub fn of<'a>(
        jobs: impl Iterator<Item = &'a Job>,
        nodes: Vec<(String, u64)>,
        facts: impl Fn(&Job, u32) -> Option<(Option<f64>, crate::server::core::RankFacts)>,
    ) -> Snapshot {
        let mut by_state: std::collections::BTreeMap<&'static str, u64> = [
            "PENDING",
            "STARTING",
            "RUNNING",
            "RESTARTING",
            "SUCCEEDED",
            "FAILED",
            "CANCELLED",
        ]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
        let mut out = Snapshot {
            nodes_by_state: nodes,
            ..Snapshot::default()
        };
        for j in jobs {
            *by_state.entry(j.state.as_str()).or_default() += 1;
            if j.state.is_terminal() {
                continue;
            }
            let flagged = |rank: u32| j.stragglers.iter().any(|s| s.rank == rank);
            let ranks = j
                .ranks
                .iter()
                .filter(|r| j.ranks.len() <= MAX_RANK_SERIES || flagged(r.rank))
                .map(|r| {
                    let f = facts(j, r.rank);
                    RankSnapshot {
                        rank: r.rank,
                        node: r.node.clone(),
                        step: r.step,
                        compute_seconds: f.and_then(|(c, _)| c),
                        collective_wait_seconds: f.map(|(_, x)| x.collective_wait_seconds),
                        memory_bytes: f.map(|(_, x)| x.memory_bytes),
                        peak_memory_bytes: f.map(|(_, x)| x.peak_memory_bytes),
                        straggler: flagged(r.rank),
                    }
                })
                .collect();
            out.jobs.push(JobSnapshot {
                id: j.id.clone(),
                generation: j.generation,
                world_size: j.world_size(),
                restarts: j.restart_count,
                step: j.progress.step,
                total_steps: j.progress.total_steps,
                loss: j.progress.loss,
                tokens_per_second: j.progress.tokens_per_second,
                grad_norm: j.progress.grad_norm,
                // From the ranks' telemetry, which the core fills in after.
                mfu: None,
                ranks,
            });
        }
        out.jobs_by_state = by_state
            .into_iter()
            .map(|(s, n)| (s.to_owned(), n))
            .collect();
        out
    }

    /// These gauges in a registry of their own (built per scrape).
    fn registry(&self, leading: bool) -> Registry {
        let mut r = Registry::with_prefix("ringmaster");
        let lead: Gauge = Gauge::default();
        lead.set(i64::from(leading));
        r.register(
            "leader",
            "1 when this coordinator serves (leads), 0 while it is a standby",
            lead,
        );
        let jobs: Family<StateLabel, Gauge> = Family::default();
        for (state, n) in &self.jobs_by_state {
            jobs.get_or_create(&StateLabel {
                state: state.clone(),
            })
            .set(*n as i64);
        }
        r.register("jobs", "Jobs held, by state", jobs);
        let nodes: Family<StateLabel, Gauge> = Family::default();
        for (state, n) in &self.nodes_by_state {
            nodes
                .get_or_create(&StateLabel {
                    state: state.clone(),
                })
                .set(*n as i64);
        }
        r.register("nodes", "Nodes known, by state", nodes);
        for (name, help, v) in [
            (
                "rendezvous_scopes",
                "Generations whose rendezvous store is open",
                self.rendezvous.scopes,
            ),
            (
                "rendezvous_keys",
                "Keys in the rendezvous stores of all generations",
                self.rendezvous.keys,
            ),
            (
                "rendezvous_bytes",
                "Bytes of keys and values in the rendezvous stores",
                self.rendezvous.bytes,
            ),
        ] {
            let g: Gauge = Gauge::default();
            g.set(v as i64);
            r.register(name, help, g);
        }
        let float = || Family::<JobLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let int = || Family::<JobLabel, Gauge>::default();
        let (step, total, restarts, world, generation) = (int(), int(), int(), int(), int());
        let (loss, tps, grad_norm, mfu) = (float(), float(), float(), float());
        let rank_step: Family<RankLabels, Gauge> = Family::default();
        let rank_float =
            || Family::<RankLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let (rank_compute, rank_wait) = (rank_float(), rank_float());
        let rank_memory: Family<RankLabels, Gauge> = Family::default();
        let rank_peak_memory: Family<RankLabels, Gauge> = Family::default();
        let rank_straggler: Family<RankLabels, Gauge> = Family::default();
        for j in &self.jobs {
            let l = JobLabel { job: j.id.clone() };
            if let Some(s) = j.step {
                step.get_or_create(&l).set(s as i64);
            }
            if let Some(t) = j.total_steps {
                total.get_or_create(&l).set(t as i64);
            }
            if let Some(v) = j.loss.filter(|v| v.is_finite()) {
                loss.get_or_create(&l).set(v);
            }
            if let Some(v) = j.tokens_per_second.filter(|v| v.is_finite()) {
                tps.get_or_create(&l).set(v);
            }
            if let Some(v) = j.grad_norm.filter(|v| v.is_finite()) {
                grad_norm.get_or_create(&l).set(v);
            }
            if let Some(v) = j.mfu.filter(|v| v.is_finite()) {
                mfu.get_or_create(&l).set(v);
            }
            restarts.get_or_create(&l).set(i64::from(j.restarts));
            world.get_or_create(&l).set(i64::from(j.world_size));
            generation.get_or_create(&l).set(j.generation as i64);
            for r in &j.ranks {
                let l = RankLabels {
                    job: j.id.clone(),
                    rank: r.rank.to_string(),
                    node: r.node.clone(),
                };
                if let Some(s) = r.step {
                    rank_step.get_or_create(&l).set(s as i64);
                }
                if let Some(v) = r.compute_seconds {
                    rank_compute.get_or_create(&l).set(v);
                }
                if let Some(v) = r.collective_wait_seconds {
                    rank_wait.get_or_create(&l).set(v);
                }
                if let Some(v) = r.memory_bytes {
                    rank_memory.get_or_create(&l).set(v as i64);
                }
                if let Some(v) = r.peak_memory_bytes {
                    rank_peak_memory.get_or_create(&l).set(v as i64);
                }
                rank_straggler.get_or_create(&l).set(i64::from(r.straggler));
            }
        }
        r.register("job_step", "Training step of a running job (rank 0)", step);
        r.register("job_total_steps", "Steps a running job will take", total);
        r.register("job_loss", "Training loss at the last step (rank 0)", loss);
        r.register(
            "job_grad_norm",
            "Gradient norm before clipping at the last step (rank 0)",
            grad_norm,
        );
        r.register(
            "job_mfu_ratio",
            "Model FLOPs utilisation (0..1): tokens/s x model FLOPs per token over the ranks' \
             summed peak FLOP/s",
            mfu,
        );
        r.register(
            "job_tokens_per_second",
            "Tokens per second of the whole job (global batch)",
            tps,
        );
        r.register("job_restart_count", "Restarts so far of a job", restarts);
        r.register("job_world_size", "Ranks of a job's generation", world);
        r.register("job_generation", "A job's current generation", generation);
        r.register(
            "rank_step",
            "Step each rank last reported (jobs of at most 64 ranks)",
            rank_step,
        );
        r.register(
            "rank_compute_seconds",
            "Mean compute time per step of a rank over the last 20 steps (step time less collective wait)",
            rank_compute,
        );
        r.register(
            "rank_collective_wait_seconds",
            "Time a rank's last step waited in collectives",
            rank_wait,
        );
        r.register(
            "rank_memory_bytes",
            "A rank's memory at its last report (resident, or device memory on a GPU)",
            rank_memory,
        );
        r.register(
            "rank_peak_memory_bytes",
            "The most memory a rank reported in its generation",
            rank_peak_memory,
        );
        r.register(
            "rank_straggler",
            "1 while a rank is flagged as a straggler (jobs above 64 ranks: flagged ranks only)",
            rank_straggler,
        );
        r
    }
}

/// The whole `/metrics` text: the process's counters and the gauges of `snapshot` (absent
/// while this coordinator is a standby).
pub fn render(counters: &Registry, snapshot: Option<&Snapshot>) -> String {
    use prometheus_client::encoding::prometheus_text::encode;
    let mut out = String::new();
    if encode(&mut out, counters).is_err() {
        out.clear();
    }
    let gauges = snapshot
        .cloned()
        .unwrap_or_default()
        .registry(snapshot.is_some());
    let mut more = String::new();
    if encode(&mut more, &gauges).is_ok() {
        out.push_str(&more);
    }
    out
}

/// Where a scrape gets the gauges: the serving coordinator's loop, when it leads.
pub type SnapshotSource = tokio::sync::watch::Receiver<Option<crate::server::core::Handle>>;

/// How long a snapshot is reused: a burst of scrapes costs the loop one.
const SNAPSHOT_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// The newest snapshot and when it was taken; locked while one is being fetched.
type SnapshotCache = Arc<tokio::sync::Mutex<Option<(std::time::Instant, Snapshot)>>>;

async fn snapshot(source: &SnapshotSource, cache: &SnapshotCache) -> Option<Snapshot> {
    let handle = source.borrow().clone()?;
    let mut cached = cache.lock().await;
    if let Some((at, s)) = cached.as_ref()
        && at.elapsed() < SNAPSHOT_FOR
    {
        return Some(s.clone());
    }
    let s = handle
        .call(|reply| crate::server::core::Cmd::Metrics { reply })
        .await
        .ok()?;
    *cached = Some((std::time::Instant::now(), s.clone()));
    Some(s)
}

/// Serves `GET /metrics` on `listener` until `stop` (the HTTP side, shared with the agent, is
/// [`ringmaster_common::metrics::serve`]).
pub async fn serve(
    listener: TcpListener,
    counters: Arc<Registry>,
    source: SnapshotSource,
    stop: CancellationToken,
) {
    let cache: SnapshotCache = Arc::default();
    let render: ringmaster_common::metrics::Render = Arc::new(move || {
        let (counters, source, cache) = (counters.clone(), source.clone(), cache.clone());
        Box::pin(async move {
            let snapshot = snapshot(&source, &cache).await;
            render(&counters, snapshot.as_ref())
        })
    });
    ringmaster_common::metrics::serve(listener, render, stop).await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::job::testkit::{exit, placement, start};
    use crate::job::{Event, next};
    use crate::spec::JobSpec;

    #[test]
    fn events_are_counted_once_and_running_jobs_alone_have_series() {
        let (m, registry) = Metrics::new();
        let spec = JobSpec {
            command: Some(vec!["true".into()]),
            max_restarts: 1,
            ..JobSpec::default()
        };
        let mut j = Job::new("m-1".into(), spec, BTreeMap::new(), 0);
        j = start(j, placement(2, 2), 1_000, 1_000);
        m.observe(&j);
        j = exit(j, 3, Some(1), None, 2_000);
        for r in 0..3 {
            j = exit(j, r, None, Some(15), 2_100);
        }
        j.restart_not_before_ms = None;
        j = next(j, Event::Tick, 2_500).0;
        j = start(j, placement(2, 2), 3_000, 4_000);
        m.observe(&j);
        m.observe(&j);
        let running = Snapshot::of([&j].into_iter(), vec![("JOINED".into(), 2)], |_, _| None);
        let text = render(&registry, Some(&running));
        for want in [
            "ringmaster_jobs_submitted_total 1",
            "ringmaster_job_failures_total{reason=\"WorkerExited\"} 1",
            "ringmaster_job_restarts_total 1",
            "ringmaster_restart_seconds_count 1",
            "ringmaster_restart_seconds_sum 2.0",
            "ringmaster_jobs{state=\"RUNNING\"} 1",
            "ringmaster_nodes{state=\"JOINED\"} 2",
            "ringmaster_job_world_size{job=\"m-1\"} 4",
            "ringmaster_job_generation{job=\"m-1\"} 1",
            "ringmaster_leader 1",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
        for r in 0..4 {
            j = exit(j, r, Some(0), None, 5_000);
        }
        m.observe(&j);
        let done = Snapshot::of([&j].into_iter(), Vec::new(), |_, _| None);
        let text = render(&registry, Some(&done));
        assert!(
            text.contains("ringmaster_jobs_finished_total{state=\"SUCCEEDED\",reason=\"\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("job=\"m-1\""),
            "a finished job keeps series:\n{text}"
        );
        m.fault_detected("exit", 250);
        m.fault_detected("node_lost", 3_600_001);
        let text = render(&registry, Some(&done));
        assert!(
            text.contains("ringmaster_fault_detection_seconds_count{kind=\"exit\"} 1")
                && text.contains("ringmaster_fault_detection_seconds_sum{kind=\"exit\"} 0.25"),
            "{text}"
        );
        // A clock more than an hour off is not a detection latency.
        assert!(!text.contains("kind=\"node_lost\""), "{text}");
        // A standby: counters, no gauges of jobs, leader 0.
        let text = render(&registry, None);
        assert!(text.contains("ringmaster_leader 0"), "{text}");
    }

    #[test]
    fn mfu_gauge_and_checkpoint_histograms() {
        let (m, registry) = Metrics::new();
        m.checkpoint_durations(Some(1.5), Some(0.25));
        m.checkpoint_durations(Some(0.5), None);
        let snapshot = Snapshot {
            jobs: vec![
                JobSnapshot {
                    id: "f-1".into(),
                    mfu: Some(0.25),
                    ..JobSnapshot::default()
                },
                JobSnapshot {
                    id: "f-2".into(),
                    ..JobSnapshot::default()
                },
            ],
            rendezvous: crate::server::rendezvous::RendezvousSizes {
                scopes: 2,
                keys: 9,
                bytes: 4096,
            },
            ..Snapshot::default()
        };
        let text = render(&registry, Some(&snapshot));
        for want in [
            "ringmaster_rendezvous_scopes 2",
            "ringmaster_rendezvous_keys 9",
            "ringmaster_rendezvous_bytes 4096",
            "ringmaster_job_mfu_ratio{job=\"f-1\"} 0.25",
            "ringmaster_checkpoint_save_seconds_count 2",
            "ringmaster_checkpoint_save_seconds_sum 2.0",
            "ringmaster_checkpoint_commit_seconds_count 1",
            "ringmaster_checkpoint_commit_seconds_sum 0.25",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
        assert!(
            !text.contains("ringmaster_job_mfu_ratio{job=\"f-2\"}"),
            "{text}"
        );
    }

    /// Every metric the example Grafana dashboard queries is one this coordinator serves (the
    /// agents' `ringmaster_agent_*` series are checked against the agent's encoder, in
    /// agent/src/metrics.rs).
    #[test]
    fn the_dashboard_queries_metrics_that_exist() {
        let dashboard = include_str!("../../deploy/grafana/ringmaster.json");
        let (m, registry) = Metrics::new();
        let spec = JobSpec {
            command: Some(vec!["true".into()]),
            ..JobSpec::default()
        };
        let j = start(
            Job::new("d-1".into(), spec.clone(), BTreeMap::new(), 0),
            placement(1, 1),
            0,
            0,
        );
        m.observe(&j);
        let mut j = j;
        j.progress = crate::job::Progress {
            step: Some(5),
            total_steps: Some(10),
            loss: Some(1.5),
            tokens_per_second: Some(100.0),
            grad_norm: Some(0.5),
        };
        j.ranks.report(0, 5, 1, 0);
        // One that failed, so that the labelled counters have a sample.
        let failed = start(
            Job::new("d-2".into(), spec, BTreeMap::new(), 0),
            placement(1, 1),
            0,
            0,
        );
        let failed = exit(failed, 0, Some(1), None, 10);
        m.observe(&failed);
        let snapshot = Snapshot::of(
            [&j, &failed].into_iter(),
            vec![("JOINED".into(), 1)],
            |_, _| None,
        );
        let text = render(&registry, Some(&snapshot));
        assert!(
            text.contains("ringmaster_job_grad_norm{job=\"d-1\"} 0.5"),
            "{text}"
        );
        let mut names = ringmaster_common::metrics::metric_names_in(dashboard, "ringmaster_");
        names.retain(|n| !n.starts_with("ringmaster_agent_"));
        assert!(names.len() >= 10, "{names:?}");
        for name in names {
            let family = name
                .strip_suffix("_total")
                .or_else(|| name.strip_suffix("_bucket"))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {family} ")),
                "the dashboard queries {name}, which is not served:\n{text}"
            );
        }
    }
}
