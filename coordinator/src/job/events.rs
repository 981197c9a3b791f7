//! A job's event history, `kubectl describe`-style: what happened to it, when and why
//! (submitted, placed, generation started, running, rank failed with its root cause,
//! restarting, checkpoint committed, resumed, cancel requested, finished).
//!
//! Events are derived by [`record`] from what a transition changed (like the conditions), so
//! they cannot disagree with the state. The log is bounded like the failure history: the
//! first [`KEPT_FIRST`] events and the newest [`KEPT_LAST`], with a count of those left out
//! between; sequence numbers go on across the gap so that a follower can ask for "after N".
//! It is stored as one part of the job's record (`jobparts/<id>/events@<w>`, see
//! [`super::record`]), written only when an event was added.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{Job, JobState, Reason};

/// Events kept from the start of a job.
pub const KEPT_FIRST: usize = 16;
/// Newest events kept.
pub const KEPT_LAST: usize = 240;
/// Longest message kept (bytes; longer ones are cut at a character boundary).
pub const MESSAGE_BYTES: usize = 512;

/// What kind of thing happened. PascalCase strings on the wire and in JSON; an event from a
/// newer coordinator with a kind this one does not know reads as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum EventKind {
    Submitted,
    /// No placement fits now (recorded when the reason changes).
    Unschedulable,
    /// A generation was placed and its workers are being started.
    GenerationStarted,
    /// Every rank of the generation runs.
    Running,
    /// A rank failed: the root cause of the generation's end (reason, rank, node).
    RankFailed,
    /// A node was lost under the generation (a failure with reason `NodeLost`).
    NodeLost,
    /// The job will start a new generation (restart count, backoff).
    Restarting,
    CheckpointCommitted,
    /// The generation resumed from a checkpoint.
    Resumed,
    CancelRequested,
    /// A rank's compute time per step is well above its peers' ([`crate::straggler`]).
    StragglerDetected,
    /// A flagged rank is back in line with its peers.
    StragglerCleared,
    Succeeded,
    Failed,
    Cancelled,
    #[default]
    #[serde(other)]
    Unknown,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Submitted => "Submitted",
            EventKind::Unschedulable => "Unschedulable",
            EventKind::GenerationStarted => "GenerationStarted",
            EventKind::Running => "Running",
            EventKind::RankFailed => "RankFailed",
            EventKind::NodeLost => "NodeLost",
            EventKind::Restarting => "Restarting",
            EventKind::CheckpointCommitted => "CheckpointCommitted",
            EventKind::Resumed => "Resumed",
            EventKind::CancelRequested => "CancelRequested",
            EventKind::StragglerDetected => "StragglerDetected",
            EventKind::StragglerCleared => "StragglerCleared",
            EventKind::Succeeded => "Succeeded",
            EventKind::Failed => "Failed",
            EventKind::Cancelled => "Cancelled",
            EventKind::Unknown => "Unknown",
        }
    }

    /// Whether this event is a warning (a failure or a job that cannot go on), as
    /// `kubectl describe` marks them.
    pub fn is_warning(self) -> bool {
        matches!(
            self,
            EventKind::Unschedulable
                | EventKind::RankFailed
                | EventKind::NodeLost
                | EventKind::StragglerDetected
                | EventKind::Failed
        )
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    /// 1, 2, 3, … in the order they happened (never reused, also across the omitted gap).
    pub seq: u64,
    pub unix_ms: u64,
    pub generation: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub message: String,
}

/// A job's bounded event history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventLog {
    first: Vec<JobEvent>,
    last: VecDeque<JobEvent>,
    /// Events dropped between `first` and `last`.
    omitted: u64,
    /// The sequence number the next event gets, less one (the newest event's).
    newest: u64,
}

impl EventLog {
    /// Adds an event (its message cut to [`MESSAGE_BYTES`]).
    pub fn push(&mut self, mut event: JobEvent) {
        self.newest += 1;
        event.seq = self.newest;
        event.message = super::cap(event.message, MESSAGE_BYTES);
        if self.first.len() < KEPT_FIRST {
            self.first.push(event);
            return;
        }
        if self.last.len() == KEPT_LAST {
            self.last.pop_front();
            self.omitted += 1;
        }
        self.last.push_back(event);
    }

    /// Every kept event, oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &JobEvent> {
        self.first.iter().chain(self.last.iter())
    }

    /// Kept events with a sequence number above `seq`, oldest first.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &JobEvent> {
        self.iter().filter(move |e| e.seq > seq)
    }

    /// The newest `n` events, oldest first.
    pub fn newest(&self, n: usize) -> Vec<&JobEvent> {
        let mut v: Vec<&JobEvent> = self.iter().rev().take(n).collect();
        v.reverse();
        v
    }

    /// The newest event's sequence number (0: none yet).
    pub fn newest_seq(&self) -> u64 {
        self.newest
    }

    /// Events left out between the first and the newest kept.
    pub fn omitted(&self) -> u64 {
        self.omitted
    }

    pub fn is_empty(&self) -> bool {
        self.newest == 0
    }
}

/// What a transition is compared on to find its events: small, taken before it.
#[derive(Debug, Clone)]
pub struct Before {
    state: JobState,
    generation: u64,
    failures: u64,
    checkpoint: Option<(u64, String)>,
    resumed: Option<(u64, String)>,
    unschedulable: Option<String>,
    stopping: bool,
}

impl Before {
    pub fn of(job: &Job) -> Before {
        Before {
            state: job.state,
            generation: job.generation,
            failures: job.failure_count(),
            checkpoint: job
                .last_checkpoint
                .as_ref()
                .map(|c| (c.step, c.path.clone())),
            resumed: job.resumed_from.as_ref().map(|c| (c.step, c.path.clone())),
            unschedulable: job
                .unschedulable
                .then(|| job.pending_reason.clone().unwrap_or_default()),
            stopping: job.stopping,
        }
    }
}

/// Records the events of a transition from `before` to `job` (at `now_ms`); `cancel` is true
/// when the transition was an operator's cancel.
pub fn record(before: &Before, job: &mut Job, cancel: bool, now_ms: u64) {
    let generation = job.generation;
    let add = |job: &mut Job, kind: EventKind, reason, rank, node, message: String| {
        job.events.push(JobEvent {
            seq: 0,
            unix_ms: now_ms,
            generation,
            kind,
            reason,
            rank,
            node,
            message,
        });
    };
    if cancel && !before.stopping && !before.state.is_terminal() && job.stopping {
        add(
            job,
            EventKind::CancelRequested,
            Some(Reason::Cancelled),
            None,
            None,
            "cancel requested: stopping every rank".into(),
        );
    }
    let unschedulable = job
        .unschedulable
        .then(|| job.pending_reason.clone().unwrap_or_default());
    if let Some(why) = &unschedulable
        && before.unschedulable.as_ref() != Some(why)
    {
        add(
            job,
            EventKind::Unschedulable,
            Some(Reason::Unschedulable),
            None,
            None,
            why.clone(),
        );
    }
    if job.failure_count() > before.failures
        && let Some(f) = job.failure.clone()
    {
        let kind = if f.reason == Reason::NodeLost {
            EventKind::NodeLost
        } else {
            EventKind::RankFailed
        };
        let mut message = f.message.clone();
        if let Some(l) = f.lagging_rank {
            message.push_str(&format!(" (rank {l} was behind the others)"));
        }
        job.events.push(JobEvent {
            seq: 0,
            unix_ms: now_ms,
            generation: f.generation,
            kind,
            reason: Some(f.reason),
            rank: f.rank,
            node: (!f.node.is_empty()).then(|| f.node.clone()),
            message,
        });
    }
    let checkpoint = job
        .last_checkpoint
        .as_ref()
        .map(|c| (c.step, c.path.clone()));
    if checkpoint != before.checkpoint
        && let Some((step, path)) = checkpoint
    {
        add(
            job,
            EventKind::CheckpointCommitted,
            None,
            None,
            None,
            format!("checkpoint of step {step} committed: {path}"),
        );
    }
    let resumed = job.resumed_from.as_ref().map(|c| (c.step, c.path.clone()));
    if resumed != before.resumed
        && let Some((step, path)) = resumed
    {
        add(
            job,
            EventKind::Resumed,
            None,
            None,
            None,
            format!("resumed from the checkpoint of step {step}: {path}"),
        );
    }
    let started = job.state == JobState::Starting
        && (before.state != JobState::Starting || before.generation != job.generation);
    if started {
        let nodes = job.placement.len();
        let world = job.world_size();
        add(
            job,
            EventKind::GenerationStarted,
            None,
            None,
            None,
            format!(
                "generation {generation}: {world} ranks on {nodes} node{}",
                if nodes == 1 { "" } else { "s" }
            ),
        );
    }
    if job.state == before.state {
        return;
    }
    match job.state {
        JobState::Running => {
            let world = job.world_size();
            add(
                job,
                EventKind::Running,
                None,
                None,
                None,
                format!("all {world} ranks running"),
            );
        }
        JobState::Restarting if job.moving.is_some() => {
            let message = job.moving.clone().unwrap_or_default();
            add(
                job,
                EventKind::Restarting,
                Some(Reason::Drained),
                None,
                None,
                message,
            );
        }
        JobState::Restarting => {
            let message = format!(
                "restart {} of {}{}",
                job.restart_count,
                job.spec.max_restarts,
                job.restart_not_before_ms
                    .filter(|&t| t > now_ms)
                    .map(|t| format!(", next generation in {}", super::wait_text(t - now_ms)))
                    .unwrap_or_default()
            );
            let reason = job.failure.as_ref().map(|f| f.reason);
            add(job, EventKind::Restarting, reason, None, None, message);
        }
        JobState::Succeeded => {
            let world = job.ranks.len();
            add(
                job,
                EventKind::Succeeded,
                None,
                None,
                None,
                format!("all {world} ranks exited 0"),
            );
        }
        JobState::Failed => {
            let (reason, message) = match &job.failure {
                Some(f) if job.spec.max_restarts > 0 => (
                    Reason::BackoffLimitExceeded,
                    format!(
                        "{} restarts used up; last failure ({}): {}",
                        job.spec.max_restarts,
                        f.reason.as_str(),
                        f.message
                    ),
                ),
                Some(f) => (f.reason, f.message.clone()),
                None => (Reason::Unknown, "failed".into()),
            };
            add(job, EventKind::Failed, Some(reason), None, None, message);
        }
        JobState::Cancelled => add(
            job,
            EventKind::Cancelled,
            Some(Reason::Cancelled),
            None,
            None,
            "cancelled".into(),
        ),
        JobState::Pending | JobState::Starting => {}
    }
}

/// Records a checkpoint commit that a report brought (outside [`super::next`]).
pub fn checkpoint_committed(job: &mut Job, now_ms: u64) {
    if let Some(c) = &job.last_checkpoint {
        let message = format!("checkpoint of step {} committed: {}", c.step, c.path);
        push_now(job, EventKind::CheckpointCommitted, message, now_ms);
    }
}

/// Records where the current generation resumed from, as its rank 0 reported it.
pub fn resumed(job: &mut Job, now_ms: u64) {
    if let Some(c) = &job.resumed_from {
        let message = format!("resumed from the checkpoint of step {}: {}", c.step, c.path);
        push_now(job, EventKind::Resumed, message, now_ms);
    }
}

fn push_now(job: &mut Job, kind: EventKind, message: String, now_ms: u64) {
    push_about(job, kind, None, message, now_ms);
}

/// Records a straggler flagged or cleared (outside [`super::next`]).
pub fn straggler(job: &mut Job, detected: bool, rank: u32, message: String, now_ms: u64) {
    let kind = if detected {
        EventKind::StragglerDetected
    } else {
        EventKind::StragglerCleared
    };
    push_about(job, kind, Some(rank), message, now_ms);
}

fn push_about(job: &mut Job, kind: EventKind, rank: Option<u32>, message: String, now_ms: u64) {
    let generation = job.generation;
    let node = rank.and_then(|r| job.ranks.get(r as usize).map(|x| x.node.clone()));
    job.events.push(JobEvent {
        seq: 0,
        unix_ms: now_ms,
        generation,
        kind,
        reason: None,
        rank,
        node,
        message,
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::job::testkit::{exit, placement, start};
    use crate::job::{Event, next};
    use crate::spec::JobSpec;

    fn started(j: Job, t: u64) -> Job {
        start(j, placement(2, 2), t, t)
    }

    fn kinds(j: &Job) -> Vec<&'static str> {
        j.events.iter().map(|e| e.kind.as_str()).collect()
    }

    #[test]
    fn a_job_s_life_is_told_in_events() {
        let spec = JobSpec {
            command: Some(vec!["true".into()]),
            max_restarts: 1,
            ..JobSpec::default()
        };
        let mut j = Job::new("j-1".into(), spec, BTreeMap::new(), 1_000);
        j = started(j, 2_000);
        // Rank 1 fails; the launcher stops the others.
        j = exit(j, 1, Some(1), None, 3_000);
        for r in [0, 2, 3] {
            j = exit(j, r, None, Some(15), 3_100);
        }
        j.restart_not_before_ms = None;
        j = next(j, Event::Tick, 4_000).0;
        j = started(j, 5_000);
        for r in 0..4 {
            j = exit(j, r, Some(0), None, 6_000);
        }
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(
            kinds(&j),
            [
                "Submitted",
                "GenerationStarted",
                "Running",
                "RankFailed",
                "Restarting",
                "GenerationStarted",
                "Running",
                "Succeeded"
            ],
            "{:#?}",
            j.events
        );
        let seqs: Vec<u64> = j.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<u64>>());
        let failed = j
            .events
            .iter()
            .find(|e| e.kind == EventKind::RankFailed)
            .unwrap();
        assert_eq!(failed.reason, Some(Reason::WorkerExited));
        assert_eq!(failed.rank, Some(1));
        assert_eq!(failed.node.as_deref(), Some("node0"));
        assert_eq!((failed.generation, failed.unix_ms), (0, 3_000));
        let second = j.events.iter().nth(5).unwrap();
        assert_eq!(second.generation, 1);
        assert_eq!(second.message, "generation 1: 4 ranks on 2 nodes");
        assert_eq!(j.events.after(6).count(), 2);
    }

    #[test]
    fn cancel_and_failure_without_restarts() {
        let spec = JobSpec {
            command: Some(vec!["true".into()]),
            ..JobSpec::default()
        };
        let mut j = started(Job::new("c-1".into(), spec.clone(), BTreeMap::new(), 0), 10);
        j = next(j, Event::Cancel { grace_ms: 5_000 }, 20).0;
        for r in 0..4 {
            j = exit(j, r, None, Some(15), 30);
        }
        assert_eq!(j.state, JobState::Cancelled);
        let k = kinds(&j);
        assert_eq!(&k[k.len() - 2..], ["CancelRequested", "Cancelled"], "{k:?}");

        let mut j = started(Job::new("f-1".into(), spec, BTreeMap::new(), 0), 10);
        j = exit(j, 2, None, Some(9), 20);
        for r in [0, 1, 3] {
            j = exit(j, r, None, Some(15), 30);
        }
        assert_eq!(j.state, JobState::Failed);
        let k = kinds(&j);
        assert_eq!(&k[k.len() - 2..], ["RankFailed", "Failed"], "{k:?}");
        let last = j.events.iter().last().unwrap();
        assert_eq!(last.reason, Some(Reason::WorkerSignaled), "{last:?}");
    }

    #[test]
    fn the_log_keeps_the_first_and_the_newest_and_counts_the_rest() {
        let mut log = EventLog::default();
        for i in 0..1_000u64 {
            log.push(JobEvent {
                seq: 0,
                unix_ms: i,
                generation: 0,
                kind: EventKind::CheckpointCommitted,
                reason: None,
                rank: None,
                node: None,
                message: "x".repeat(if i == 999 { 5_000 } else { 1 }),
            });
        }
        let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
        assert_eq!(seqs.len(), KEPT_FIRST + KEPT_LAST);
        assert_eq!(seqs[..KEPT_FIRST], (1..=16).collect::<Vec<u64>>()[..]);
        assert_eq!(seqs[KEPT_FIRST], 1_000 - KEPT_LAST as u64 + 1);
        assert_eq!(log.omitted(), 1_000 - (KEPT_FIRST + KEPT_LAST) as u64);
        assert_eq!(log.newest_seq(), 1_000);
        assert_eq!(log.after(990).count(), 10);
        assert_eq!(
            log.newest(3).iter().map(|e| e.seq).collect::<Vec<_>>(),
            [998, 999, 1_000]
        );
        assert!(log.newest(1)[0].message.len() <= MESSAGE_BYTES);
        // A record written by a newer coordinator with a kind this one does not know.
        let e: JobEvent = serde_json::from_str(
            r#"{"seq":1,"unix_ms":0,"generation":0,"kind":"SomethingNew","message":""}"#,
        )
        .unwrap();
        assert_eq!(e.kind, EventKind::Unknown);
    }
}
