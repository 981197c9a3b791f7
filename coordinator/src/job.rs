//! The job state machine: a pure transition function, apart from all I/O.
//!
//! `PENDING → STARTING → RUNNING → (RESTARTING → STARTING)* → SUCCEEDED | FAILED | CANCELLED`.
//!
//! [`next`] takes a job, an [`Event`] and the time, and returns the new job and the
//! [`Action`]s the coordinator's loop must carry out (allocate a port, start or stop workers).
//! The loop owns sockets, timers and persistence; everything that decides lives here and is
//! table-tested: the restart backoff too (the failure sets `restart_not_before_ms`, the loop's
//! [`Event::Tick`] ends the wait), and the caps on what a job keeps (failure history, log
//! tails, rank placements of old generations).

use std::collections::BTreeMap;

use ringmaster_hostfile::{RankSlot, Selected};
use serde::{Deserialize, Serialize};

use crate::spec::JobSpec;

pub mod conditions;
pub mod events;
pub mod ranks;
pub mod record;
#[cfg(test)]
pub(crate) mod testkit;

pub use conditions::{Condition, ConditionType, Durations, Reason};
pub use events::{EventKind, EventLog, JobEvent};
pub use ranks::{RANK_CHUNK, RankMut, Ranks};

/// Log lines kept of a failed rank.
pub const LOG_TAIL_LINES: usize = 20;
/// Bytes of those lines kept per failure (the newest): a worker's lines can be 64 KiB each.
pub const LOG_TAIL_BYTES: usize = 4096;
/// Longest failure message kept (a start error can quote what an agent sent).
pub const MAX_FAILURE_MESSAGE_BYTES: usize = 2048;
/// Failures kept in a job's history: the first ones (the original cause) and the newest ones;
/// those in between are counted in [`Job::failures_omitted`].
pub const FAILURES_KEPT_FIRST: usize = 5;
pub const FAILURES_KEPT_LAST: usize = 20;
/// Longest checkpoint warning kept (the text comes from a trainer).
pub const MAX_WARNING_BYTES: usize = 1024;
/// Generations whose rank placement (for `ringctl logs --generation G`) a job keeps.
pub const RANK_NODE_GENERATIONS: usize = 100;
/// A generation that ran this long before it failed resets the restart backoff: its failure
/// is not part of a crash loop (Kubernetes resets CrashLoopBackOff after 10 minutes too).
pub const BACKOFF_RESET_AFTER_MS: u64 = 600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Pending,
    Starting,
    Running,
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Starting => "STARTING",
            JobState::Running => "RUNNING",
            JobState::Restarting => "RESTARTING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// States in which workers of the current generation may be alive.
    pub fn has_workers(self) -> bool {
        matches!(
            self,
            JobState::Starting | JobState::Running | JobState::Restarting
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RankState {
    /// Start sent (or about to be), no pid yet.
    Starting,
    Running,
    /// Exited 0.
    Exited,
    /// Exited non-zero or by a signal on its own.
    Failed,
    /// Ended by the launcher (gang abort, cancel).
    Stopped,
    /// Its node was lost or the worker vanished.
    Lost,
    /// After a coordinator restart, until its agent reports it.
    Unknown,
}

impl RankState {
    pub fn as_str(self) -> &'static str {
        match self {
            RankState::Starting => "STARTING",
            RankState::Running => "RUNNING",
            RankState::Exited => "EXITED",
            RankState::Failed => "FAILED",
            RankState::Stopped => "STOPPED",
            RankState::Lost => "LOST",
            RankState::Unknown => "UNKNOWN",
        }
    }

    /// The rank's process is gone.
    pub fn is_done(self) -> bool {
        matches!(
            self,
            RankState::Exited | RankState::Failed | RankState::Stopped | RankState::Lost
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankRecord {
    pub rank: u32,
    pub local_rank: u32,
    pub node_rank: u32,
    pub node: String,
    pub slot: u32,
    pub state: RankState,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub step: Option<u64>,
    pub collective_seq: Option<u64>,
    /// When the rank's trainer last reported progress (Unix ms; not persisted).
    #[serde(default, skip_serializing)]
    pub last_report_ms: Option<u64>,
}

/// Why a generation ended: the root cause, not the ranks the launcher stopped afterwards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub generation: u64,
    pub rank: Option<u32>,
    pub node: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: String,
    pub log_tail: Vec<String>,
    /// The rank whose last reported collective sequence number was behind the others' when the
    /// generation ended (a hung or slow rank), if any was.
    #[serde(default)]
    pub lagging_rank: Option<u32>,
    /// What kind of failure this was (`Unknown` in records from before reasons existed).
    #[serde(default)]
    pub reason: Reason,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub step: Option<u64>,
    pub total_steps: Option<u64>,
    pub loss: Option<f64>,
    pub tokens_per_second: Option<f64>,
    #[serde(default)]
    pub grad_norm: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRef {
    pub step: u64,
    pub path: String,
}

/// A rank of the running generation whose compute time per step is well above its peers'.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Straggler {
    pub rank: u32,
    pub node: String,
    /// Its window-mean compute time over its peers' median when flagged (1.34: 34% slower).
    pub slowdown: f64,
    /// The step (of rank 0) at which it was flagged.
    pub since_step: u64,
}

/// How many checkpoint warnings a job keeps.
pub const MAX_CHECKPOINT_WARNINGS: usize = 32;

/// Everything the coordinator knows of one job; persisted as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub spec: JobSpec,
    #[serde(default)]
    pub files: BTreeMap<String, Vec<u8>>,
    pub state: JobState,
    pub generation: u64,
    pub restart_count: u32,
    pub pending_reason: Option<String>,
    /// Nodes and slots of the current generation, in node-rank order.
    pub placement: Vec<Selected>,
    /// The current generation's ranks; changed only through [`Ranks`]' mutators.
    pub ranks: Ranks,
    pub master_addr: Option<String>,
    pub master_port: Option<u32>,
    pub failure: Option<Failure>,
    pub failures: Vec<Failure>,
    pub progress: Progress,
    /// The newest checkpoint a generation committed (every rank's shard written and verified);
    /// the next generation resumes from it (RINGMASTER_RESUME_FROM).
    pub last_checkpoint: Option<CheckpointRef>,
    /// Where the current generation started from, as its rank 0 reported it.
    #[serde(default)]
    pub resumed_from: Option<CheckpointRef>,
    /// Checkpoints a resume passed over and why, oldest first (at most
    /// [`MAX_CHECKPOINT_WARNINGS`], the newest kept).
    #[serde(default)]
    pub checkpoint_warnings: Vec<String>,
    /// Set while the current generation is being torn down (gang abort or cancel).
    pub stopping: bool,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// The node of every rank, per generation started (for logs of older generations); the
    /// newest [`RANK_NODE_GENERATIONS`].
    #[serde(default)]
    pub rank_nodes: BTreeMap<u64, Vec<String>>,
    /// Failures left out of `failures` (which keeps the first [`FAILURES_KEPT_FIRST`] and the
    /// newest [`FAILURES_KEPT_LAST`]).
    #[serde(default)]
    pub failures_omitted: u64,
    /// When the job reached a terminal state (Unix ms): retention counts from here.
    #[serde(default)]
    pub finished_unix_ms: Option<u64>,
    /// Failures in a row that count for the restart backoff (reset by a generation that ran
    /// [`BACKOFF_RESET_AFTER_MS`]).
    #[serde(default)]
    pub restart_streak: u32,
    /// While RESTARTING: no new generation starts before this time (Unix ms).
    #[serde(default)]
    pub restart_not_before_ms: Option<u64>,
    /// When the current generation reached RUNNING (Unix ms).
    #[serde(default)]
    pub running_since_ms: Option<u64>,
    /// Kubeflow-style conditions, derived from the state after every transition
    /// ([`conditions::update`]).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Time spent recovering so far (failures that restart → the next generation running).
    #[serde(default)]
    pub recovery_ms: u64,
    /// Set while recovering: since when.
    #[serde(default)]
    pub recovering_since_ms: Option<u64>,
    /// When a generation first reached RUNNING.
    #[serde(default)]
    pub first_running_ms: Option<u64>,
    /// The last placement attempt found no fit (cleared when a generation starts).
    #[serde(default)]
    pub unschedulable: bool,
    /// Ranks of the current generation flagged as stragglers ([`crate::straggler`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stragglers: Vec<Straggler>,
    /// What happened to the job, when and why ([`events`]): a part of its record, not of
    /// the header.
    #[serde(default, skip_serializing_if = "EventLog::is_empty")]
    pub events: EventLog,
    /// Whether agents were told to start the current generation's workers (its record was
    /// durable). Until then ending the generation needs no stop: nothing runs. Records from
    /// before the field read as true (a stop is then sent, as before).
    #[serde(default = "sent")]
    pub workers_sent: bool,
    /// While RESTARTING because an operator drained a node under the job (a move, not a
    /// failure: no restart used): why. Cleared when the next generation starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving: Option<String>,
    /// What of this job the store holds already (see [`record`]).
    #[serde(skip)]
    pub saved: record::Saved,
}

impl Job {
    pub fn new(id: String, spec: JobSpec, files: BTreeMap<String, Vec<u8>>, now_ms: u64) -> Job {
        Job {
            name: spec.name.clone().unwrap_or_else(|| id.clone()),
            id,
            spec,
            files,
            state: JobState::Pending,
            generation: 0,
            restart_count: 0,
            pending_reason: Some("waiting for placement".into()),
            placement: Vec::new(),
            ranks: Ranks::default(),
            master_addr: None,
            master_port: None,
            failure: None,
            failures: Vec::new(),
            progress: Progress::default(),
            last_checkpoint: None,
            resumed_from: None,
            checkpoint_warnings: Vec::new(),
            stopping: false,
            created_unix_ms: now_ms,
            updated_unix_ms: now_ms,
            rank_nodes: BTreeMap::new(),
            failures_omitted: 0,
            finished_unix_ms: None,
            restart_streak: 0,
            restart_not_before_ms: None,
            running_since_ms: None,
            conditions: Vec::new(),
            recovery_ms: 0,
            recovering_since_ms: None,
            workers_sent: false,
            moving: None,
            first_running_ms: None,
            unschedulable: false,
            stragglers: Vec::new(),
            events: EventLog::default(),
            saved: record::Saved::default(),
        }
        .with_conditions()
    }

    fn with_conditions(mut self) -> Job {
        let created = self.created_unix_ms;
        conditions::update(&mut self, created);
        let message = format!(
            "submitted: {}",
            if self.spec.train.is_some() {
                "a training job"
            } else {
                "a command job"
            }
        );
        self.events.push(JobEvent {
            seq: 0,
            unix_ms: created,
            generation: 0,
            kind: EventKind::Submitted,
            reason: None,
            rank: None,
            node: None,
            message,
        });
        self
    }

    /// The node of every rank of a generation that was started.
    pub fn past_nodes(&self, generation: u64) -> Option<&Vec<String>> {
        self.rank_nodes.get(&generation)
    }

    /// Why a rank of a generation cannot be located, for `ringctl logs`.
    pub fn no_rank_reason(&self, rank: u32, generation: u64) -> String {
        match self.rank_nodes.keys().next() {
            Some(&oldest) if generation < oldest => format!(
                "job {}: generation {generation} is older than the {RANK_NODE_GENERATIONS} \
                 generations whose placement the coordinator keeps (oldest kept: {oldest}); its \
                 logs stay on the agents under <work dir>/{}/gen-{generation}/",
                self.id, self.id
            ),
            _ => format!(
                "job {} has no rank {rank} in generation {generation}",
                self.id
            ),
        }
    }

    /// Every failure this job had: those kept in `failures` and those omitted.
    pub fn failure_count(&self) -> u64 {
        self.failures.len() as u64 + self.failures_omitted
    }

    pub fn world_size(&self) -> u32 {
        self.placement.iter().map(|s| s.slots.len() as u32).sum()
    }

    /// Nodes of the current generation, in node-rank order.
    pub fn nodes(&self) -> Vec<String> {
        self.placement.iter().map(|s| s.name.clone()).collect()
    }

    /// Every rank's process is gone (O(1): the ranks count their states).
    pub fn all_ranks_done(&self) -> bool {
        self.ranks.all_done()
    }
}

/// What happened. Events of an older generation than the job's are ignored by [`next`]
/// (the loop stops their workers).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The loop evaluated where the job could run: nodes and slots, or why it must wait.
    Placement(Result<Vec<Selected>, String>),
    PortAllocated {
        generation: u64,
        addr: String,
        port: u32,
    },
    PortFailed {
        generation: u64,
        message: String,
    },
    WorkerStarted {
        generation: u64,
        rank: u32,
        pid: u32,
    },
    StartFailed {
        generation: u64,
        rank: u32,
        message: String,
    },
    WorkerExited {
        generation: u64,
        rank: u32,
        exit_code: Option<i32>,
        signal: Option<i32>,
        log_tail: Vec<String>,
    },
    /// A node stopped heartbeating, or its agent came back without a worker it should have.
    RanksLost {
        node: String,
        ranks: Vec<u32>,
        message: String,
        /// `NodeLost` or `AgentRestarted`.
        reason: Reason,
    },
    Cancel {
        grace_ms: u64,
    },
    /// An operator drains `node` (`ringctl drain`): a generation placed on it stops
    /// (SIGTERM, then SIGKILL after `grace_ms`: trainers checkpoint on SIGTERM) and the job is
    /// placed again without the node. Not a failure: no restart is used and the backoff is
    /// not touched.
    Drain {
        node: String,
        grace_ms: u64,
    },
    /// The loop's timer: a restart backoff may have run out.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask node 0's agent for a free port (MASTER_PORT) for this generation.
    AllocatePort { generation: u64, node: String },
    /// Send StartWorkers for this generation to every node of the placement.
    StartWorkers { generation: u64 },
    /// Stop every worker of this generation on these nodes.
    StopWorkers {
        generation: u64,
        nodes: Vec<String>,
        grace_ms: u64,
    },
    /// The generation is over: the loop closes its rendezvous scope.
    CloseGeneration { generation: u64 },
    /// A restart backoff ran out: offer placements again.
    Reschedule,
}

/// Grace between SIGTERM and SIGKILL in a gang abort.
pub const ABORT_GRACE_MS: u64 = 3_000;

/// The transition function. Pure: same inputs (`now_ms` is the wall clock in Unix ms, for the
/// restart backoff and the timestamps), same outputs.
pub fn next(mut job: Job, event: Event, now_ms: u64) -> (Job, Vec<Action>) {
    let mut actions = Vec::new();
    let before = events::Before::of(&job);
    let cancel = matches!(event, Event::Cancel { .. });
    transition(&mut job, event, now_ms, &mut actions);
    if job.state.is_terminal() && job.finished_unix_ms.is_none() {
        job.finished_unix_ms = Some(now_ms);
    }
    conditions::update(&mut job, now_ms);
    events::record(&before, &mut job, cancel, now_ms);
    // Straggler flags hold for a running generation only.
    if job.state != JobState::Running {
        job.stragglers.clear();
    }
    (job, actions)
}

fn transition(job: &mut Job, event: Event, now_ms: u64, actions: &mut Vec<Action>) {
    let stale = |g: u64| g != job.generation;
    let backing_off = job.restart_not_before_ms.is_some();
    match event {
        Event::Placement(placement) => match (job.state, placement) {
            (JobState::Pending, Ok(sel)) => {
                start_generation(job, sel, actions);
            }
            (JobState::Restarting, Ok(sel)) if job.all_ranks_done() && !backing_off => {
                job.generation += 1;
                start_generation(job, sel, actions);
            }
            (JobState::Restarting, _) if backing_off => {}
            (JobState::Pending | JobState::Restarting, Err(reason)) => {
                job.pending_reason = Some(reason);
                job.unschedulable = true;
            }
            _ => {}
        },
        Event::Tick => {
            if job.state == JobState::Restarting
                && job.restart_not_before_ms.is_some_and(|t| now_ms >= t)
            {
                job.restart_not_before_ms = None;
                if !job.stopping {
                    job.pending_reason = Some("restarting".into());
                }
                actions.push(Action::Reschedule);
            }
        }
        Event::PortAllocated {
            generation,
            addr,
            port,
        } => {
            if job.state == JobState::Starting && !stale(generation) && job.master_port.is_none() {
                job.master_addr = Some(addr);
                job.master_port = Some(port);
                actions.push(Action::StartWorkers { generation });
            }
        }
        Event::PortFailed {
            generation,
            message,
        } => {
            if job.state == JobState::Starting && !stale(generation) {
                let node = job
                    .placement
                    .first()
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                let failure = Failure {
                    generation,
                    rank: None,
                    node,
                    exit_code: None,
                    signal: None,
                    message: format!("could not allocate MASTER_PORT: {message}"),
                    log_tail: Vec::new(),
                    lagging_rank: None,
                    reason: Reason::StartFailed,
                };
                fail_generation(job, failure, actions, now_ms);
            }
        }
        Event::WorkerStarted {
            generation,
            rank,
            pid,
        } => {
            if stale(generation) {
                return;
            }
            job.workers_sent = true;
            let stopping = job.stopping;
            if let Some(mut r) = job.ranks.get_mut(rank)
                && matches!(r.state, RankState::Starting | RankState::Unknown)
            {
                r.state = RankState::Running;
                r.pid = Some(pid);
            }
            if stopping {
                // Raced with an abort: the stop already sent covers this worker.
            } else if job.state == JobState::Starting
                && job.ranks.all_in(&[RankState::Running, RankState::Exited])
            {
                job.state = JobState::Running;
                job.running_since_ms = Some(now_ms);
            }
        }
        Event::StartFailed {
            generation,
            rank,
            message,
        } => {
            if stale(generation) {
                return;
            }
            job.workers_sent = true;
            let node = match job.ranks.get_mut(rank) {
                Some(mut r) => {
                    r.state = RankState::Failed;
                    r.node.clone()
                }
                None => return,
            };
            if job.state.has_workers() && !job.stopping {
                let failure = Failure {
                    generation,
                    rank: Some(rank),
                    node,
                    exit_code: None,
                    signal: None,
                    message: format!("rank {rank} could not start: {message}"),
                    log_tail: Vec::new(),
                    lagging_rank: None,
                    reason: Reason::StartFailed,
                };
                fail_generation(job, failure, actions, now_ms);
            } else {
                finish_teardown(job, now_ms);
            }
        }
        Event::WorkerExited {
            generation,
            rank,
            exit_code,
            signal,
            log_tail,
        } => {
            if stale(generation) {
                return;
            }
            job.workers_sent = true;
            let stopping = job.stopping;
            let ok = exit_code == Some(0) && signal.is_none();
            let node = match job.ranks.get_mut(rank) {
                Some(mut r) if !r.state.is_done() => {
                    r.exit_code = exit_code;
                    r.signal = signal;
                    r.state = if stopping {
                        RankState::Stopped
                    } else if ok {
                        RankState::Exited
                    } else {
                        RankState::Failed
                    };
                    r.node.clone()
                }
                _ => return,
            };
            if stopping || job.state.is_terminal() {
                finish_teardown(job, now_ms);
            } else if ok {
                if job.ranks.all_in(&[RankState::Exited]) {
                    job.state = JobState::Succeeded;
                    job.pending_reason = None;
                    actions.push(Action::CloseGeneration { generation });
                }
            } else {
                let how = match (exit_code, signal) {
                    (_, Some(s)) => format!("was killed by signal {s}"),
                    (Some(c), None) => format!("exited with code {c}"),
                    (None, None) => "exited".to_owned(),
                };
                let failure = Failure {
                    generation,
                    rank: Some(rank),
                    node: node.clone(),
                    exit_code,
                    signal,
                    message: format!("rank {rank} on {node} {how}"),
                    log_tail: tail(log_tail, LOG_TAIL_BYTES),
                    lagging_rank: None,
                    reason: Reason::of_exit(job.spec.train.is_some(), exit_code, signal),
                };
                fail_generation(job, failure, actions, now_ms);
            }
        }
        Event::RanksLost {
            node,
            ranks,
            message,
            reason,
        } => {
            let mut first = None;
            for rank in &ranks {
                if let Some(mut r) = job.ranks.get_mut(*rank)
                    && !r.state.is_done()
                {
                    r.state = RankState::Lost;
                    first.get_or_insert(*rank);
                }
            }
            let Some(first) = first else {
                return;
            };
            if job.state.has_workers() && !job.stopping {
                let failure = Failure {
                    generation: job.generation,
                    rank: Some(first),
                    node,
                    exit_code: None,
                    signal: None,
                    message,
                    log_tail: Vec::new(),
                    lagging_rank: None,
                    reason,
                };
                fail_generation(job, failure, actions, now_ms);
            } else {
                finish_teardown(job, now_ms);
            }
        }
        Event::Drain { node, grace_ms } => {
            let placed = job.placement.iter().any(|s| s.name == node);
            // A generation still starting is left to start (drain again to move it): moving
            // it would race its workers' start.
            if !placed || job.stopping || job.state != JobState::Running {
                return;
            }
            // A move ends no streak of failures, and starts none.
            let ran_steadily = job
                .running_since_ms
                .is_some_and(|t| now_ms.saturating_sub(t) >= BACKOFF_RESET_AFTER_MS);
            if ran_steadily {
                job.restart_streak = 0;
            }
            job.moving = Some(format!(
                "node {node} is drained: generation {} stops and the job is placed again \
                 without it (not a failure; no restart used)",
                job.generation
            ));
            job.state = JobState::Restarting;
            job.running_since_ms = None;
            job.restart_not_before_ms = None;
            job.pending_reason = Some(format!(
                "moving off drained node {node}: stopping generation {}",
                job.generation
            ));
            stop_generation(job, grace_ms, actions);
        }
        Event::Cancel { grace_ms } => match job.state {
            JobState::Pending => {
                job.state = JobState::Cancelled;
                job.pending_reason = None;
            }
            JobState::Starting | JobState::Running | JobState::Restarting => {
                job.state = JobState::Cancelled;
                job.pending_reason = None;
                stop_generation(job, grace_ms, actions);
            }
            _ => {}
        },
    }
    if job.state == JobState::Cancelled {
        job.restart_not_before_ms = None;
    }
}

/// A generation ended before its workers were asked to start: its ranks are stopped where
/// they stand (no agent has anything to stop, nor would it answer).
fn nothing_started(job: &mut Job) {
    if !job.workers_sent {
        job.ranks.for_each_mut(|r| {
            if !r.state.is_done() {
                r.state = RankState::Stopped;
            }
        });
    }
}

fn sent() -> bool {
    true
}

/// Stops the generation's workers that may still run (SIGTERM, SIGKILL after `grace_ms`) and
/// closes the generation: a cancel or a drain, neither a failure.
fn stop_generation(job: &mut Job, grace_ms: u64, actions: &mut Vec<Action>) {
    nothing_started(job);
    if !job.all_ranks_done() {
        job.stopping = true;
        actions.push(Action::StopWorkers {
            generation: job.generation,
            nodes: job.nodes(),
            grace_ms,
        });
    }
    actions.push(Action::CloseGeneration {
        generation: job.generation,
    });
}

/// The newest [`LOG_TAIL_LINES`] lines, within `budget` bytes: older lines that do not fit are
/// dropped, and a newest line longer than the whole budget keeps its end.
fn tail(mut lines: Vec<String>, budget: usize) -> Vec<String> {
    if lines.len() > LOG_TAIL_LINES {
        lines.drain(..lines.len() - LOG_TAIL_LINES);
    }
    let mut left = budget;
    let mut keep = 0;
    for line in lines.iter().rev() {
        if line.len() > left {
            break;
        }
        left -= line.len();
        keep += 1;
    }
    if keep == 0 {
        return lines
            .pop()
            .map(|l| vec![format!("…{}", keep_end(&l, budget.saturating_sub(3)))])
            .unwrap_or_default();
    }
    lines.drain(..lines.len() - keep);
    lines
}

/// The last at most `max` bytes of `s`, cut at a character boundary.
fn keep_end(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// `s` cut to at most `max` bytes (at a character boundary), marked with "…" when cut.
pub fn cap(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max.saturating_sub(3);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// How long until `not_before`, for a reason text: whole seconds (rounded up) from 1 s on.
pub(crate) fn wait_text(ms: u64) -> String {
    if ms >= 1000 {
        humantime::format_duration(std::time::Duration::from_secs(ms.div_ceil(1000))).to_string()
    } else {
        format!("{ms}ms")
    }
}

/// The pending reason while a restart backs off.
fn backoff_reason(job: &Job, now_ms: u64) -> String {
    match job.restart_not_before_ms {
        Some(t) if t > now_ms => format!(
            "restarting in {} (backoff after {} failure{} in a row)",
            wait_text(t - now_ms),
            job.restart_streak,
            if job.restart_streak == 1 { "" } else { "s" }
        ),
        _ => "restarting".into(),
    }
}

fn start_generation(job: &mut Job, sel: Vec<Selected>, actions: &mut Vec<Action>) {
    job.stragglers.clear();
    job.moving = None;
    job.workers_sent = false;
    let table: Vec<RankSlot> = ringmaster_hostfile::rank_table(&sel);
    job.ranks.replace(
        table
            .into_iter()
            .map(|r| RankRecord {
                rank: r.rank,
                local_rank: r.local_rank,
                node_rank: r.node_rank,
                node: r.node,
                slot: r.slot,
                state: RankState::Starting,
                pid: None,
                exit_code: None,
                signal: None,
                step: None,
                collective_seq: None,
                last_report_ms: None,
            })
            .collect(),
    );
    job.saved.placement_changed(job.generation);
    job.unschedulable = false;
    let node0 = sel[0].name.clone();
    job.rank_nodes.insert(
        job.generation,
        job.ranks.iter().map(|r| r.node.clone()).collect(),
    );
    while job.rank_nodes.len() > RANK_NODE_GENERATIONS {
        job.rank_nodes.pop_first();
    }
    job.running_since_ms = None;
    job.restart_not_before_ms = None;
    job.placement = sel;
    job.state = JobState::Starting;
    job.pending_reason = None;
    job.master_addr = None;
    job.master_port = None;
    job.stopping = false;
    actions.push(Action::AllocatePort {
        generation: job.generation,
        node: node0,
    });
}

/// Reports older than this, while other ranks reported since, mark a rank as silent (trainers
/// send a heartbeat every second).
pub const SILENT_MS: u64 = 3_000;

/// The lagging rank among `(rank, collective seq, last report ms)`: the rank whose collective
/// sequence number is behind the others' (a hung rank stays behind while the others wait
/// inside the next call), else the rank whose reports stopped while the others' go on (a
/// stopped process, whose heartbeat stopped too). Ranks that never reported are not blamed;
/// ties go to the lowest rank.
pub fn lagging_rank(
    ranks: impl IntoIterator<Item = (u32, Option<u64>, Option<u64>)>,
) -> Option<u32> {
    let seen: Vec<(u32, u64, u64)> = ranks
        .into_iter()
        .filter_map(|(r, s, t)| Some((r, s?, t.unwrap_or(0))))
        .collect();
    let max = seen.iter().map(|x| x.1).max()?;
    let (rank, min, _) = *seen.iter().min_by_key(|x| (x.1, x.0))?;
    if min < max {
        return Some(rank);
    }
    let newest = seen.iter().map(|x| x.2).max()?;
    let (rank, _, oldest) = *seen.iter().min_by_key(|x| (x.2, x.0))?;
    (newest.saturating_sub(oldest) > SILENT_MS).then_some(rank)
}

impl Job {
    /// The running rank that lags the others now, if any.
    pub fn lagging_rank(&self) -> Option<u32> {
        lagging_rank(
            self.ranks
                .iter()
                .filter(|r| r.state == RankState::Running)
                .map(|r| (r.rank, r.collective_seq, r.last_report_ms)),
        )
    }
}

/// Records the root cause and ends the generation everywhere (gang abort); with restarts left,
/// decides when the next generation may start (the restart backoff).
fn fail_generation(job: &mut Job, mut failure: Failure, actions: &mut Vec<Action>, now_ms: u64) {
    failure.lagging_rank = lagging_rank(
        job.ranks
            .iter()
            .map(|r| (r.rank, r.collective_seq, r.last_report_ms)),
    );
    if let Some(l) = failure.lagging_rank {
        failure.message.push_str(&format!(
            "; rank {l} was lagging (behind the others' collective calls)"
        ));
    }
    failure.message = cap(failure.message, MAX_FAILURE_MESSAGE_BYTES);
    // A failure during a move is a failure: its reason, not the drain's.
    job.moving = None;
    job.failure = Some(failure.clone());
    job.failures.push(failure);
    if job.failures.len() > FAILURES_KEPT_FIRST + FAILURES_KEPT_LAST {
        job.failures.remove(FAILURES_KEPT_FIRST);
        job.failures_omitted += 1;
    }
    let ran_steadily = job
        .running_since_ms
        .is_some_and(|t| now_ms.saturating_sub(t) >= BACKOFF_RESET_AFTER_MS);
    job.restart_streak = if ran_steadily {
        1
    } else {
        job.restart_streak.saturating_add(1)
    };
    job.running_since_ms = None;
    nothing_started(job);
    let alive = !job.all_ranks_done();
    if alive {
        job.stopping = true;
        actions.push(Action::StopWorkers {
            generation: job.generation,
            nodes: job.nodes(),
            grace_ms: ABORT_GRACE_MS,
        });
    }
    actions.push(Action::CloseGeneration {
        generation: job.generation,
    });
    if job.restart_count < job.spec.max_restarts {
        job.restart_count += 1;
        job.state = JobState::Restarting;
        let delay = job
            .spec
            .restart_backoff
            .unwrap_or_default()
            .delay(job.restart_streak);
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        job.restart_not_before_ms = (delay_ms > 0).then(|| now_ms.saturating_add(delay_ms));
        job.pending_reason = Some(if alive {
            "stopping the failed generation".into()
        } else {
            backoff_reason(job, now_ms)
        });
    } else {
        job.state = JobState::Failed;
        job.pending_reason = None;
    }
}

/// After a rank of a stopping generation ended: once all are gone, the teardown is over.
fn finish_teardown(job: &mut Job, now_ms: u64) {
    if job.stopping && job.all_ranks_done() {
        job.stopping = false;
        if job.state == JobState::Restarting {
            job.pending_reason = Some(backoff_reason(job, now_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transition at time 0, for the tests that do not look at the clock.
    fn next(job: Job, event: Event) -> (Job, Vec<Action>) {
        super::next(job, event, 0)
    }

    fn sel(name: &str, slots: &[u32]) -> Selected {
        Selected {
            name: name.into(),
            slots: slots.to_vec(),
        }
    }

    fn job(max_restarts: u32) -> Job {
        let spec = JobSpec {
            command: Some(vec!["true".into()]),
            max_restarts,
            ..JobSpec::default()
        };
        Job::new("j-1".into(), spec, BTreeMap::new(), 0)
    }

    fn two_by_two() -> Vec<Selected> {
        vec![sel("w0", &[0, 1]), sel("w1", &[0, 1])]
    }

    fn exited(generation: u64, rank: u32, code: i32) -> Event {
        Event::WorkerExited {
            generation,
            rank,
            exit_code: Some(code),
            signal: None,
            log_tail: vec![format!("line of rank {rank}")],
        }
    }

    /// Drives a fresh job to RUNNING on 2×2.
    fn running(max_restarts: u32) -> Job {
        let (j, a) = next(job(max_restarts), Event::Placement(Ok(two_by_two())));
        assert_eq!(
            a,
            vec![Action::AllocatePort {
                generation: 0,
                node: "w0".into()
            }]
        );
        let (mut j, a) = next(
            j,
            Event::PortAllocated {
                generation: 0,
                addr: "10.0.0.1".into(),
                port: 29400,
            },
        );
        assert_eq!(a, vec![Action::StartWorkers { generation: 0 }]);
        for r in 0..4 {
            assert_eq!(j.state, JobState::Starting);
            (j, _) = next(
                j,
                Event::WorkerStarted {
                    generation: 0,
                    rank: r,
                    pid: 100 + r,
                },
            );
        }
        assert_eq!(j.state, JobState::Running);
        j
    }

    /// A generation that ends before its workers were asked to start (the port or the
    /// durable commit still pending) leaves nothing to stop: its ranks are stopped at once,
    /// so that a cancel ends and a restart goes on instead of waiting for agents that have
    /// nothing to answer about. A drain leaves a starting generation alone.
    #[test]
    fn a_generation_ended_before_its_start_holds_nothing() {
        let starting = || next(job(1), Event::Placement(Ok(two_by_two()))).0;
        let (j, a) = next(
            starting(),
            Event::Drain {
                node: "w0".into(),
                grace_ms: 1_000,
            },
        );
        assert!(a.is_empty() && j.state == JobState::Starting, "{a:?}");
        let (j, a) = next(starting(), Event::Cancel { grace_ms: 1_000 });
        assert_eq!(j.state, JobState::Cancelled);
        assert_eq!(a, vec![Action::CloseGeneration { generation: 0 }]);
        assert!(j.all_ranks_done() && !j.stopping);
        let (j, a) = next(
            starting(),
            Event::PortFailed {
                generation: 0,
                message: "no port".into(),
            },
        );
        assert_eq!(j.state, JobState::Restarting);
        assert_eq!(a, vec![Action::CloseGeneration { generation: 0 }]);
        assert!(j.all_ranks_done() && !j.stopping);
        // Once a worker started, a cancel stops the workers.
        let (j, _) = next(
            starting(),
            Event::WorkerStarted {
                generation: 0,
                rank: 0,
                pid: 7,
            },
        );
        let (_, a) = next(j, Event::Cancel { grace_ms: 1_000 });
        assert!(matches!(a[0], Action::StopWorkers { .. }), "{a:?}");
    }

    /// A drain moves a running generation without a failure: the workers stop with the
    /// drain's grace, no restart is used, and the next placement starts generation 1.
    #[test]
    fn a_drain_moves_the_job_without_using_a_restart() {
        let j = running(0);
        let (j, a) = next(
            j,
            Event::Drain {
                node: "w9".into(),
                grace_ms: 30_000,
            },
        );
        assert!(a.is_empty(), "a node the job is not on: {a:?}");
        let (mut j, a) = next(
            j,
            Event::Drain {
                node: "w1".into(),
                grace_ms: 30_000,
            },
        );
        assert_eq!(j.state, JobState::Restarting);
        assert_eq!(
            a,
            vec![
                Action::StopWorkers {
                    generation: 0,
                    nodes: vec!["w0".into(), "w1".into()],
                    grace_ms: 30_000
                },
                Action::CloseGeneration { generation: 0 }
            ]
        );
        assert!(j.failure.is_none() && j.restart_count == 0);
        let e = j.events.iter().last().unwrap();
        assert_eq!(
            (e.kind, e.reason),
            (EventKind::Restarting, Some(Reason::Drained))
        );
        let c = j
            .conditions
            .iter()
            .find(|c| c.kind == ConditionType::Restarting)
            .unwrap();
        assert_eq!(c.reason, "Drained");
        for r in 0..4 {
            (j, _) = next(j, exited(0, r, 143));
        }
        assert!(!j.stopping && j.restart_not_before_ms.is_none());
        let (j, a) = next(j, Event::Placement(Ok(two_by_two())));
        assert_eq!((j.generation, j.state), (1, JobState::Starting));
        assert!(j.moving.is_none());
        assert_eq!(a.len(), 1);
        // A job with no restarts left can still be moved.
        assert_eq!(j.spec.max_restarts, 0);
    }

    #[test]
    fn pending_waits_with_a_reason() {
        let (j, a) = next(
            job(0),
            Event::Placement(Err("waiting for nodes: 1/2".into())),
        );
        assert_eq!(j.state, JobState::Pending);
        assert_eq!(j.pending_reason.as_deref(), Some("waiting for nodes: 1/2"));
        assert!(a.is_empty());
    }

    #[test]
    fn rank_table_follows_placement_order() {
        let j = running(0);
        let got: Vec<(u32, &str, u32, u32)> = j
            .ranks
            .iter()
            .map(|r| (r.rank, r.node.as_str(), r.local_rank, r.node_rank))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, "w0", 0, 0),
                (1, "w0", 1, 0),
                (2, "w1", 0, 1),
                (3, "w1", 1, 1)
            ]
        );
        assert_eq!(j.world_size(), 4);
    }

    #[test]
    fn all_zero_exits_succeed() {
        let mut j = running(0);
        for r in 0..4 {
            assert_eq!(j.state, JobState::Running);
            let a;
            (j, a) = next(j, exited(0, r, 0));
            if r == 3 {
                assert_eq!(a, vec![Action::CloseGeneration { generation: 0 }]);
            }
        }
        assert_eq!(j.state, JobState::Succeeded);
    }

    #[test]
    fn failure_without_restarts_fails_and_gang_aborts() {
        let j = running(0);
        let (j, a) = next(j, exited(0, 2, 1));
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(
            a,
            vec![
                Action::StopWorkers {
                    generation: 0,
                    nodes: vec!["w0".into(), "w1".into()],
                    grace_ms: ABORT_GRACE_MS
                },
                Action::CloseGeneration { generation: 0 }
            ]
        );
        let f = j.failure.clone().unwrap();
        assert_eq!(
            (f.rank, f.node.as_str(), f.exit_code),
            (Some(2), "w1", Some(1))
        );
        assert_eq!(f.log_tail, vec!["line of rank 2"]);
        // The ranks the abort kills are STOPPED, and do not replace the root cause.
        let (j, a) = next(
            j,
            Event::WorkerExited {
                generation: 0,
                rank: 0,
                exit_code: None,
                signal: Some(15),
                log_tail: vec![],
            },
        );
        assert!(a.is_empty());
        assert_eq!(j.ranks[0].state, RankState::Stopped);
        assert_eq!(j.failure.as_ref().unwrap().rank, Some(2));
        assert_eq!(j.state, JobState::Failed);
    }

    #[test]
    fn failure_with_restarts_restarts_after_teardown() {
        let j = running(1);
        let (j, _) = next(j, exited(0, 2, 1));
        assert_eq!(j.state, JobState::Restarting);
        assert_eq!(j.restart_count, 1);
        // Placement before the teardown finished does nothing.
        let (mut j, a) = next(j, Event::Placement(Ok(two_by_two())));
        assert!(a.is_empty());
        assert_eq!(j.generation, 0);
        for r in [0, 1, 3] {
            (j, _) = next(j, exited(0, r, 143));
        }
        assert!(!j.stopping);
        // The restart backoff (1 s by default) runs out on the loop's tick.
        let (j, a) = super::next(j, Event::Tick, 1_000);
        assert_eq!(a, vec![Action::Reschedule]);
        let (j, a) = next(j, Event::Placement(Ok(two_by_two())));
        assert_eq!(j.generation, 1);
        assert_eq!(j.state, JobState::Starting);
        assert_eq!(
            a,
            vec![Action::AllocatePort {
                generation: 1,
                node: "w0".into()
            }]
        );
        assert!(j.ranks.iter().all(|r| r.state == RankState::Starting));
        // A second failure exhausts the restarts.
        let (mut j, _) = next(
            j,
            Event::PortAllocated {
                generation: 1,
                addr: "a".into(),
                port: 1,
            },
        );
        for r in 0..4 {
            (j, _) = next(
                j,
                Event::WorkerStarted {
                    generation: 1,
                    rank: r,
                    pid: r,
                },
            );
        }
        let (j, _) = next(j, exited(1, 0, 3));
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.failures.len(), 2);
    }

    #[test]
    fn stale_generation_events_are_ignored() {
        let j = running(1);
        let before = j.clone();
        let (j, a) = next(j, exited(7, 0, 1));
        assert!(a.is_empty());
        assert_eq!(j, before);
    }

    #[test]
    fn node_loss_fails_the_generation_naming_the_node() {
        let j = running(0);
        let (j, a) = next(
            j,
            Event::RanksLost {
                node: "w1".into(),
                ranks: vec![2, 3],
                message: "node w1 lost: no heartbeat for 10s".into(),
                reason: Reason::NodeLost,
            },
        );
        assert_eq!(j.state, JobState::Failed);
        let f = j.failure.unwrap();
        assert_eq!(f.node, "w1");
        assert_eq!(f.rank, Some(2));
        assert!(f.message.contains("lost"));
        assert!(matches!(a[0], Action::StopWorkers { .. }));
    }

    #[test]
    fn lagging_rank_is_the_one_behind_the_others() {
        let t = Some(100_000);
        let s = |n| Some(n);
        assert_eq!(
            lagging_rank([(0, s(7), t), (1, s(7), t), (2, s(6), t), (3, s(7), t)]),
            Some(2)
        );
        // Everyone level and reporting, or nothing reported: nobody lags.
        assert_eq!(lagging_rank([(0, s(7), t), (1, s(7), t)]), None);
        assert_eq!(lagging_rank([(0, None, None), (1, None, None)]), None);
        // Ranks that never reported are not blamed; ties go to the lowest rank.
        assert_eq!(
            lagging_rank([(0, None, None), (1, s(3), t), (2, s(3), t), (3, s(5), t)]),
            Some(1)
        );
        // Level, but one rank's reports stopped (a stopped process): that one.
        let old = Some(100_000 - SILENT_MS - 1);
        assert_eq!(
            lagging_rank([(0, s(9), t), (1, s(9), old), (2, s(9), t)]),
            Some(1)
        );
        assert_eq!(
            lagging_rank([(0, s(9), t), (1, s(9), Some(100_000 - 500))]),
            None
        );
    }

    #[test]
    fn cancel_in_each_state() {
        let (j, a) = next(job(0), Event::Cancel { grace_ms: 5 });
        assert_eq!(j.state, JobState::Cancelled);
        assert!(a.is_empty());
        let (j, a) = next(running(0), Event::Cancel { grace_ms: 5 });
        assert_eq!(j.state, JobState::Cancelled);
        assert_eq!(
            a[0],
            Action::StopWorkers {
                generation: 0,
                nodes: vec!["w0".into(), "w1".into()],
                grace_ms: 5
            }
        );
        // Cancel of a finished job changes nothing.
        let (j2, a) = next(j.clone(), Event::Cancel { grace_ms: 5 });
        assert_eq!(j2, j);
        assert!(a.is_empty());
    }

    #[test]
    fn start_failure_and_port_failure_fail_the_generation() {
        let (j, _) = next(job(0), Event::Placement(Ok(two_by_two())));
        let (j, _) = next(
            j,
            Event::PortFailed {
                generation: 0,
                message: "no agent".into(),
            },
        );
        assert_eq!(j.state, JobState::Failed);
        assert!(j.failure.unwrap().message.contains("MASTER_PORT"));

        let (j, _) = next(job(0), Event::Placement(Ok(two_by_two())));
        let (j, _) = next(
            j,
            Event::StartFailed {
                generation: 0,
                rank: 1,
                message: "no such file".into(),
            },
        );
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.failure.unwrap().rank, Some(1));
    }

    #[test]
    fn log_tail_is_capped() {
        let j = running(0);
        let (j, _) = next(
            j,
            Event::WorkerExited {
                generation: 0,
                rank: 0,
                exit_code: Some(1),
                signal: None,
                log_tail: (0..50).map(|i| i.to_string()).collect(),
            },
        );
        let t = j.failure.unwrap().log_tail;
        assert_eq!(t.len(), LOG_TAIL_LINES);
        assert_eq!(t.last().unwrap(), "49");
    }

    /// A one-rank job that fails at `now` (placed, then its rank exits 3).
    fn fail_once(j: Job, now: u64) -> (Job, Vec<Action>) {
        let (j, _) = super::next(j, Event::Placement(Ok(vec![sel("w0", &[0])])), now);
        let generation = j.generation;
        super::next(j, exited(generation, 0, 3), now)
    }

    fn crashloop(backoff: Option<crate::spec::RestartBackoff>) -> Job {
        let mut j = job(10_000);
        j.spec.restart_backoff = backoff;
        j
    }

    #[test]
    fn restart_backoff_doubles_per_failure_in_a_row_up_to_max() {
        // (failure at, expected pause before the restart, reason right after the failure)
        let table: &[(u64, u64, &str)] = &[
            (
                0,
                1_000,
                "restarting in 1s (backoff after 1 failure in a row)",
            ),
            (
                10_000,
                2_000,
                "restarting in 2s (backoff after 2 failures in a row)",
            ),
            (
                20_000,
                4_000,
                "restarting in 4s (backoff after 3 failures in a row)",
            ),
            (
                30_000,
                8_000,
                "restarting in 8s (backoff after 4 failures in a row)",
            ),
            (
                40_000,
                16_000,
                "restarting in 16s (backoff after 5 failures in a row)",
            ),
            (
                60_000,
                32_000,
                "restarting in 32s (backoff after 6 failures in a row)",
            ),
            (
                100_000,
                60_000,
                "restarting in 1m (backoff after 7 failures in a row)",
            ),
            (
                200_000,
                60_000,
                "restarting in 1m (backoff after 8 failures in a row)",
            ),
        ];
        let mut j = crashloop(None);
        for &(at, pause, reason) in table {
            let a;
            (j, a) = fail_once(j, at);
            assert_eq!(j.state, JobState::Restarting);
            assert_eq!(j.pending_reason.as_deref(), Some(reason));
            assert_eq!(j.restart_not_before_ms, Some(at + pause));
            assert!(!a.contains(&Action::Reschedule));
            // A placement during the pause starts nothing; neither does an early tick.
            let g = j.generation;
            let (j2, a) = super::next(
                j.clone(),
                Event::Placement(Ok(vec![sel("w0", &[0])])),
                at + pause - 1,
            );
            assert_eq!((j2.generation, a.len()), (g, 0));
            let (j2, a) = super::next(j2, Event::Tick, at + pause - 1);
            assert_eq!(j2, j);
            assert!(a.is_empty());
            // The loop's tick at the end of the pause lets the next placement start g+1.
            (j, _) = super::next(j, Event::Tick, at + pause);
            assert_eq!(j.restart_not_before_ms, None);
            assert_eq!(j.pending_reason.as_deref(), Some("restarting"));
        }
    }

    #[test]
    fn restart_backoff_from_the_spec_and_its_reset() {
        use crate::spec::RestartBackoff;
        use std::time::Duration;
        let b = RestartBackoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(250),
        };
        let mut j = crashloop(Some(b));
        let mut pauses = Vec::new();
        for i in 0..4 {
            let at = i * 1_000;
            (j, _) = fail_once(j, at);
            pauses.push(j.restart_not_before_ms.unwrap() - at);
            (j, _) = super::next(j, Event::Tick, at + 500);
        }
        assert_eq!(pauses, [100, 200, 250, 250]);
        assert_eq!(
            j.pending_reason.as_deref(),
            Some("restarting"),
            "after the tick"
        );
        // A generation that ran for 10 minutes before failing starts the count again.
        let (jr, _) = super::next(j, Event::Placement(Ok(vec![sel("w0", &[0])])), 10_000);
        let g = jr.generation;
        let (jr, _) = super::next(
            jr,
            Event::PortAllocated {
                generation: g,
                addr: "a".into(),
                port: 1,
            },
            10_000,
        );
        let (jr, _) = super::next(
            jr,
            Event::WorkerStarted {
                generation: g,
                rank: 0,
                pid: 9,
            },
            10_000,
        );
        assert_eq!(jr.running_since_ms, Some(10_000));
        let (jr, _) = super::next(jr, exited(g, 0, 1), 10_000 + BACKOFF_RESET_AFTER_MS);
        assert_eq!(jr.restart_streak, 1);
        assert_eq!(
            jr.restart_not_before_ms,
            Some(10_000 + BACKOFF_RESET_AFTER_MS + 100)
        );
        // Zero backoff restarts at once: no timer, no wait.
        let mut z = crashloop(Some(RestartBackoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
        }));
        (z, _) = fail_once(z, 5);
        assert_eq!(z.restart_not_before_ms, None);
        assert_eq!(z.pending_reason.as_deref(), Some("restarting"));
        let (z, a) = super::next(z, Event::Placement(Ok(vec![sel("w0", &[0])])), 5);
        assert_eq!(z.generation, 1);
        assert!(matches!(a[0], Action::AllocatePort { .. }));
    }

    #[test]
    fn backoff_waits_for_the_teardown_too_and_cancel_clears_it() {
        // 2x2: rank 2 fails, the others are being stopped when the failure is recorded.
        let (j, _) = super::next(running(5), exited(0, 2, 1), 1_000);
        assert_eq!(
            j.pending_reason.as_deref(),
            Some("stopping the failed generation")
        );
        assert_eq!(j.restart_not_before_ms, Some(2_000));
        let mut j = j;
        for r in [0, 1] {
            (j, _) = super::next(j, exited(0, r, 143), 1_200);
        }
        // The last one goes 400 ms into the 1 s pause: the reason tells what is left.
        let (j, _) = super::next(j, exited(0, 3, 143), 1_400);
        assert_eq!(
            j.pending_reason.as_deref(),
            Some("restarting in 600ms (backoff after 1 failure in a row)")
        );
        let (j, a) = super::next(j, Event::Cancel { grace_ms: 5 }, 1_500);
        assert_eq!(j.state, JobState::Cancelled);
        assert_eq!(j.restart_not_before_ms, None);
        assert_eq!(a, vec![Action::CloseGeneration { generation: 0 }]);
        assert_eq!(j.finished_unix_ms, Some(1_500));
        // A tick on a cancelled job does nothing.
        let (j2, a) = super::next(j.clone(), Event::Tick, 9_999);
        assert_eq!((j2, a), (j, vec![]));
    }

    #[test]
    fn failure_history_keeps_the_first_and_the_newest() {
        let mut j = crashloop(Some(crate::spec::RestartBackoff {
            initial: std::time::Duration::ZERO,
            max: std::time::Duration::ZERO,
        }));
        for i in 0..(FAILURES_KEPT_FIRST + FAILURES_KEPT_LAST + 40) as u64 {
            (j, _) = fail_once(j, i);
        }
        assert_eq!(j.failures.len(), FAILURES_KEPT_FIRST + FAILURES_KEPT_LAST);
        assert_eq!(j.failures_omitted, 40);
        assert_eq!(j.failure_count(), 65);
        let gens: Vec<u64> = j.failures.iter().map(|f| f.generation).collect();
        let want: Vec<u64> = (0..5).chain(45..65).collect();
        assert_eq!(gens, want);
        assert_eq!(j.failure.as_ref().unwrap().generation, 64);
        // Rank placements: the newest generations only, and a clear answer for older ones.
        assert_eq!(j.rank_nodes.len(), 65);
        for i in 65..(RANK_NODE_GENERATIONS as u64 + 80) {
            (j, _) = fail_once(j, i);
        }
        assert_eq!(j.rank_nodes.len(), RANK_NODE_GENERATIONS);
        let oldest = *j.rank_nodes.keys().next().unwrap();
        assert_eq!(oldest, j.generation + 1 - RANK_NODE_GENERATIONS as u64);
        assert!(j.past_nodes(oldest - 1).is_none());
        let why = j.no_rank_reason(0, oldest - 1);
        assert!(
            why.contains("older than the 100 generations")
                && why.contains(&format!("oldest kept: {oldest}")),
            "{why}"
        );
        assert!(j.no_rank_reason(7, oldest).contains("has no rank 7"));
    }

    #[test]
    fn failure_texts_are_bounded() {
        let j = running(0);
        let long = "é".repeat(10_000);
        let (j, _) = next(
            j,
            Event::WorkerExited {
                generation: 0,
                rank: 0,
                exit_code: Some(1),
                signal: None,
                log_tail: vec!["a".repeat(3000), "b".repeat(3000), long.clone()],
            },
        );
        // The newest line alone is over the budget: its end is kept.
        let t = &j.failure.as_ref().unwrap().log_tail;
        assert_eq!(t.len(), 1);
        assert!(
            t[0].starts_with('…') && t[0].len() <= LOG_TAIL_BYTES,
            "{}",
            t[0].len()
        );
        assert_eq!(
            tail(vec!["a".repeat(3100), "b".repeat(1000), "c".into()], 4096).len(),
            2
        );
        let (j, _) = next(job(0), Event::Placement(Ok(two_by_two())));
        let (j, _) = next(
            j,
            Event::StartFailed {
                generation: 0,
                rank: 1,
                message: long,
            },
        );
        let m = &j.failure.unwrap().message;
        assert!(
            m.len() <= MAX_FAILURE_MESSAGE_BYTES && m.ends_with('…'),
            "{}",
            m.len()
        );
    }
}
