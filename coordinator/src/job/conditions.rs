//! What a dashboard can group by: a machine-readable [`Reason`] for every failure, and
//! Kubeflow-style conditions (`Created`, `Running`, `Restarting`, `Succeeded`, `Failed`,
//! `Cancelled`), each with a reason, a message and the time its status last changed.
//! Also the job's durations, with and without the time spent recovering (SkyPilot's
//! "duration excluding recovery").
//!
//! Conditions are derived from the job by [`update`] at the end of every transition, so
//! they can never disagree with the state; only the transition times are history.

use serde::{Deserialize, Serialize};

use super::{Job, JobState};

/// Why a generation failed, or why a condition holds. The names are a stable contract
/// (PascalCase strings on the wire and in JSON); a record from a newer coordinator with a
/// reason this one does not know reads as `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Reason {
    /// A worker exited with a non-zero code of its own.
    WorkerExited,
    /// A worker was killed by a signal it did not get from the launcher.
    WorkerSignaled,
    /// The trainer refused its configuration or input (exit 2: nothing was trained).
    ConfigInvalid,
    /// A collective call timed out waiting for a peer (trainer exit 3).
    CollectiveTimeout,
    /// A collective call failed: a peer's connection lost, a mismatched call, a failed
    /// bootstrap (trainer exit 4).
    CollectiveFailed,
    /// Saving a checkpoint failed (trainer exit 5).
    CheckpointFailed,
    /// A worker could not be started (or node 0 could not allocate MASTER_PORT).
    StartFailed,
    /// A node stopped sending heartbeats, or could not be reached.
    NodeLost,
    /// A node's agent restarted (its workers are gone) or came back without them.
    AgentRestarted,
    /// Cancelled by an operator.
    Cancelled,
    /// Failed with no restarts left.
    BackoffLimitExceeded,
    /// No placement fits the job now.
    Unschedulable,
    /// An operator drained a node under the job (`ringctl drain`): it moves, which is not a
    /// failure and uses no restart.
    Drained,
    /// A record written before reasons existed, or with a reason this build does not know.
    #[default]
    #[serde(other)]
    Unknown,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::WorkerExited => "WorkerExited",
            Reason::WorkerSignaled => "WorkerSignaled",
            Reason::ConfigInvalid => "ConfigInvalid",
            Reason::CollectiveTimeout => "CollectiveTimeout",
            Reason::CollectiveFailed => "CollectiveFailed",
            Reason::CheckpointFailed => "CheckpointFailed",
            Reason::StartFailed => "StartFailed",
            Reason::NodeLost => "NodeLost",
            Reason::AgentRestarted => "AgentRestarted",
            Reason::Cancelled => "Cancelled",
            Reason::BackoffLimitExceeded => "BackoffLimitExceeded",
            Reason::Unschedulable => "Unschedulable",
            Reason::Drained => "Drained",
            Reason::Unknown => "Unknown",
        }
    }

    /// The reason of a worker's own exit. The trainer's codes (2 a bad config, 3 a collective
    /// timeout, 4 another collective failure, 5 a failed checkpoint) are read only for a
    /// `train:` job: a user's program may exit 3 for reasons of its own.
    pub fn of_exit(trainer: bool, exit_code: Option<i32>, signal: Option<i32>) -> Reason {
        match (signal, exit_code) {
            (Some(_), _) => Reason::WorkerSignaled,
            (None, Some(2)) if trainer => Reason::ConfigInvalid,
            (None, Some(3)) if trainer => Reason::CollectiveTimeout,
            (None, Some(4)) if trainer => Reason::CollectiveFailed,
            (None, Some(5)) if trainer => Reason::CheckpointFailed,
            _ => Reason::WorkerExited,
        }
    }
}

/// The kinds of condition, in the order a status lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ConditionType {
    Created,
    Running,
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Created => "Created",
            ConditionType::Running => "Running",
            ConditionType::Restarting => "Restarting",
            ConditionType::Succeeded => "Succeeded",
            ConditionType::Failed => "Failed",
            ConditionType::Cancelled => "Cancelled",
        }
    }
}

/// One condition of a job (Kubeflow's JobCondition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: ConditionType,
    pub status: bool,
    /// Machine-readable: a [`Reason`] or one of `Submitted`, `Pending`, `Starting`,
    /// `AllRanksRunning`, `AllRanksSucceeded`, `Recovered`.
    pub reason: String,
    pub message: String,
    /// When `status` last changed (Unix ms).
    pub last_transition_unix_ms: u64,
}

/// Longest condition message kept.
pub const MAX_CONDITION_MESSAGE_BYTES: usize = 1024;

/// Sets condition `kind` to `status` with `reason` and `message`; its transition time moves
/// only when the status changes. A condition that never held is added only when it holds
/// (`Running` also when it cannot: an unschedulable job says so there).
fn set(job: &mut Job, kind: ConditionType, status: bool, reason: &str, message: String, now: u64) {
    let message = super::cap(message, MAX_CONDITION_MESSAGE_BYTES);
    match job.conditions.iter_mut().find(|c| c.kind == kind) {
        Some(c) => {
            if c.status != status {
                c.status = status;
                c.last_transition_unix_ms = now;
            }
            if c.reason != reason {
                c.reason = reason.to_owned();
            }
            if c.message != message {
                c.message = message;
            }
        }
        None if status || (kind == ConditionType::Running && reason == "Unschedulable") => {
            job.conditions.push(Condition {
                kind,
                status,
                reason: reason.to_owned(),
                message,
                last_transition_unix_ms: now,
            });
            job.conditions.sort_by_key(|c| c.kind);
        }
        None => {}
    }
}

/// Brings the conditions and the recovery clock in line with the job's state after a
/// transition at `now`.
pub fn update(job: &mut Job, now: u64) {
    if !job
        .conditions
        .iter()
        .any(|c| c.kind == ConditionType::Created)
    {
        let created = job.created_unix_ms;
        set(
            job,
            ConditionType::Created,
            true,
            "Submitted",
            "job submitted".into(),
            created,
        );
    }
    // Recovery: from a failure that restarts until the next generation runs (or the end).
    match job.state {
        // A move off a drained node is not recovery from a failure.
        JobState::Restarting if job.recovering_since_ms.is_none() && job.moving.is_none() => {
            job.recovering_since_ms = Some(now);
        }
        JobState::Running => {
            if job.first_running_ms.is_none() {
                job.first_running_ms = Some(now);
            }
            close_recovery(job, now);
        }
        s if s.is_terminal() => close_recovery(job, now),
        _ => {}
    }
    let root = job.failure.as_ref().map(|f| (f.reason, f.message.clone()));
    let (failed_reason, failed_message) = root
        .clone()
        .map(|(r, m)| (r.as_str(), m))
        .unwrap_or(("Unknown", String::new()));
    match job.state {
        JobState::Pending => {
            if job.unschedulable {
                let why = job.pending_reason.clone().unwrap_or_default();
                set(
                    job,
                    ConditionType::Running,
                    false,
                    "Unschedulable",
                    why,
                    now,
                );
            } else if job
                .conditions
                .iter()
                .any(|c| c.kind == ConditionType::Running)
            {
                set(
                    job,
                    ConditionType::Running,
                    false,
                    "Pending",
                    "waiting for placement".into(),
                    now,
                );
            }
        }
        JobState::Starting => {
            let msg = format!(
                "starting generation {} on {} nodes",
                job.generation,
                job.placement.len()
            );
            set(job, ConditionType::Running, false, "Starting", msg, now);
        }
        JobState::Running => {
            let msg = format!(
                "generation {}: {} ranks running on {} nodes",
                job.generation,
                job.ranks.len(),
                job.placement.len()
            );
            set(
                job,
                ConditionType::Running,
                true,
                "AllRanksRunning",
                msg,
                now,
            );
            if job
                .conditions
                .iter()
                .any(|c| c.kind == ConditionType::Restarting)
            {
                let msg = format!("generation {} is running", job.generation);
                set(job, ConditionType::Restarting, false, "Recovered", msg, now);
            }
        }
        JobState::Restarting => {
            // A move off a drained node is not a failure: its reason, and no restart count.
            let (failed_reason, msg) = match &job.moving {
                Some(why) => (Reason::Drained.as_str(), why.clone()),
                None => (
                    failed_reason,
                    format!(
                        "restart {} of {}: {failed_message}",
                        job.restart_count, job.spec.max_restarts
                    ),
                ),
            };
            let failed_message = job.moving.clone().unwrap_or(failed_message);
            set(
                job,
                ConditionType::Running,
                false,
                failed_reason,
                failed_message.clone(),
                now,
            );
            set(
                job,
                ConditionType::Restarting,
                true,
                failed_reason,
                msg,
                now,
            );
        }
        JobState::Succeeded => {
            set(
                job,
                ConditionType::Running,
                false,
                "AllRanksSucceeded",
                "finished".into(),
                now,
            );
            set(
                job,
                ConditionType::Restarting,
                false,
                "AllRanksSucceeded",
                "finished".into(),
                now,
            );
            let msg = format!("all {} ranks exited 0", job.ranks.len());
            set(
                job,
                ConditionType::Succeeded,
                true,
                "AllRanksSucceeded",
                msg,
                now,
            );
        }
        JobState::Failed => {
            let (reason, msg) = if job.spec.max_restarts > 0 {
                (
                    Reason::BackoffLimitExceeded.as_str(),
                    format!(
                        "{} restarts used up; last failure ({failed_reason}): {failed_message}",
                        job.spec.max_restarts
                    ),
                )
            } else {
                (failed_reason, failed_message.clone())
            };
            set(
                job,
                ConditionType::Running,
                false,
                failed_reason,
                failed_message.clone(),
                now,
            );
            set(
                job,
                ConditionType::Restarting,
                false,
                reason,
                msg.clone(),
                now,
            );
            set(job, ConditionType::Failed, true, reason, msg, now);
        }
        JobState::Cancelled => {
            let msg = "cancelled by an operator".to_owned();
            set(
                job,
                ConditionType::Running,
                false,
                "Cancelled",
                msg.clone(),
                now,
            );
            set(
                job,
                ConditionType::Restarting,
                false,
                "Cancelled",
                msg.clone(),
                now,
            );
            set(job, ConditionType::Cancelled, true, "Cancelled", msg, now);
        }
    }
}

fn close_recovery(job: &mut Job, now: u64) {
    if let Some(since) = job.recovering_since_ms.take() {
        job.recovery_ms = job.recovery_ms.saturating_add(now.saturating_sub(since));
    }
}

/// A job's durations at `now` (Unix ms), as a status shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durations {
    /// Since submit, to the end once finished.
    pub total_ms: u64,
    /// From submit to the first generation running (to now while it never ran).
    pub queued_ms: u64,
    /// Time spent recovering: from each failure that restarts until the next generation runs.
    pub recovery_ms: u64,
    /// `total_ms` without `recovery_ms`.
    pub excluding_recovery_ms: u64,
}

impl Job {
    pub fn durations(&self, now: u64) -> Durations {
        let end = self
            .finished_unix_ms
            .unwrap_or(now)
            .max(self.created_unix_ms);
        let total_ms = end - self.created_unix_ms;
        let queued_ms = self
            .first_running_ms
            .unwrap_or(end)
            .saturating_sub(self.created_unix_ms);
        let open = self
            .recovering_since_ms
            .map_or(0, |s| end.saturating_sub(s));
        let recovery_ms = (self.recovery_ms + open).min(total_ms);
        Durations {
            total_ms,
            queued_ms,
            recovery_ms,
            excluding_recovery_ms: total_ms - recovery_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::job::testkit::{exit, placement, start};
    use crate::job::{Event, next};
    use crate::spec::JobSpec;

    fn job(max_restarts: u32, train: bool) -> Job {
        let spec = JobSpec {
            command: (!train).then(|| vec!["true".into()]),
            train: train.then(|| serde_json::json!({"output_dir": "/o"})),
            max_restarts,
            restart_backoff: Some(crate::spec::RestartBackoff {
                initial: std::time::Duration::ZERO,
                max: std::time::Duration::ZERO,
            }),
            ..JobSpec::default()
        };
        Job::new("j-1".into(), spec, BTreeMap::new(), 1_000)
    }

    /// Starts a generation at `t` and has both ranks running at `t + 10`.
    fn run(j: Job, t: u64) -> Job {
        let mut sel = placement(1, 2);
        sel[0].name = "w0".into();
        let j = start(j, sel, t, t + 10);
        assert_eq!(j.state, JobState::Running);
        j
    }

    fn cond(j: &Job, kind: ConditionType) -> Option<&Condition> {
        j.conditions.iter().find(|c| c.kind == kind)
    }

    fn summary(j: &Job) -> Vec<(&'static str, bool, String)> {
        j.conditions
            .iter()
            .map(|c| (c.kind.as_str(), c.status, c.reason.clone()))
            .collect()
    }

    #[test]
    fn exit_codes_give_reasons_and_the_trainers_codes_count_only_for_the_trainer() {
        let table = [
            (true, Some(1), None, Reason::WorkerExited),
            (true, Some(2), None, Reason::ConfigInvalid),
            (true, Some(3), None, Reason::CollectiveTimeout),
            (true, Some(4), None, Reason::CollectiveFailed),
            (true, Some(5), None, Reason::CheckpointFailed),
            (true, None, Some(9), Reason::WorkerSignaled),
            (false, Some(3), None, Reason::WorkerExited),
            (false, Some(2), None, Reason::WorkerExited),
            (false, None, Some(11), Reason::WorkerSignaled),
        ];
        for (train, code, signal, want) in table {
            assert_eq!(
                Reason::of_exit(train, code, signal),
                want,
                "{train} {code:?} {signal:?}"
            );
            let j = exit(run(job(0, train), 2_000), 1, code, signal, 3_000);
            let f = j.failure.as_ref().unwrap();
            assert_eq!(f.reason, want);
            let failed = cond(&j, ConditionType::Failed).unwrap();
            assert_eq!(
                (failed.status, failed.reason.as_str()),
                (true, want.as_str())
            );
        }
    }

    #[test]
    fn a_restart_moves_the_conditions_and_is_counted_as_recovery() {
        let mut j = job(1, true);
        assert_eq!(summary(&j), [("Created", true, "Submitted".into())]);
        assert_eq!(
            cond(&j, ConditionType::Created)
                .unwrap()
                .last_transition_unix_ms,
            1_000
        );
        j = next(
            j,
            Event::Placement(Err("needs 2 slots, 1 free".into())),
            1_500,
        )
        .0;
        let r = cond(&j, ConditionType::Running).unwrap();
        assert_eq!((r.status, r.reason.as_str()), (false, "Unschedulable"));
        assert!(r.message.contains("1 free"), "{r:?}");
        j = run(j, 2_000);
        let r = cond(&j, ConditionType::Running).unwrap();
        assert_eq!(
            (r.status, r.reason.as_str(), r.last_transition_unix_ms),
            (true, "AllRanksRunning", 2_010)
        );
        assert_eq!(j.first_running_ms, Some(2_010));

        // Rank 1 is killed at 5,000: RESTARTING, recovering from then.
        j = exit(j, 1, None, Some(9), 5_000);
        assert_eq!(j.state, JobState::Restarting);
        assert_eq!(
            summary(&j),
            [
                ("Created", true, "Submitted".into()),
                ("Running", false, "WorkerSignaled".into()),
                ("Restarting", true, "WorkerSignaled".into()),
            ]
        );
        assert_eq!(
            cond(&j, ConditionType::Running)
                .unwrap()
                .last_transition_unix_ms,
            5_000
        );
        j = exit(j, 0, None, Some(15), 5_100);
        j = next(j, Event::Tick, 5_200).0;
        // Generation 1 runs at 7,010: 2,010 ms of recovery.
        j = run(j, 7_000);
        assert_eq!(j.generation, 1);
        let rs = cond(&j, ConditionType::Restarting).unwrap();
        assert_eq!(
            (rs.status, rs.reason.as_str(), rs.last_transition_unix_ms),
            (false, "Recovered", 7_010)
        );
        assert_eq!(
            cond(&j, ConditionType::Running)
                .unwrap()
                .last_transition_unix_ms,
            7_010
        );
        assert_eq!(j.recovery_ms, 2_010);
        let d = j.durations(8_000);
        assert_eq!(
            d,
            Durations {
                total_ms: 7_000,
                queued_ms: 1_010,
                recovery_ms: 2_010,
                excluding_recovery_ms: 4_990
            }
        );

        j = exit(j, 0, Some(0), None, 9_000);
        j = exit(j, 1, Some(0), None, 9_500);
        assert_eq!(j.state, JobState::Succeeded);
        let s = cond(&j, ConditionType::Succeeded).unwrap();
        assert_eq!(
            (s.status, s.reason.as_str(), s.last_transition_unix_ms),
            (true, "AllRanksSucceeded", 9_500)
        );
        // Finished: the durations stop at the end.
        assert_eq!(j.durations(99_000).total_ms, 8_500);
    }

    #[test]
    fn no_restarts_left_is_backoff_limit_exceeded_naming_the_last_cause() {
        let mut j = run(job(1, true), 2_000);
        j = exit(j, 0, Some(3), None, 3_000);
        j = exit(j, 1, None, Some(15), 3_100);
        j = next(j, Event::Tick, 3_200).0;
        j = run(j, 4_000);
        j = exit(j, 0, Some(4), None, 5_000);
        assert_eq!(j.state, JobState::Failed);
        let f = cond(&j, ConditionType::Failed).unwrap();
        assert_eq!(f.reason, "BackoffLimitExceeded");
        assert!(f.message.contains("CollectiveFailed"), "{f:?}");
        assert_eq!(j.failures[0].reason, Reason::CollectiveTimeout);
        assert_eq!(j.failures[1].reason, Reason::CollectiveFailed);
        // Still recovering when it failed for good? No: the last generation ran.
        assert_eq!(j.durations(6_000).recovery_ms, 4_010 - 3_000);
    }

    #[test]
    fn lost_nodes_restarted_agents_failed_starts_and_cancels_have_their_reasons() {
        for reason in [Reason::NodeLost, Reason::AgentRestarted] {
            let j = run(job(0, false), 2_000);
            let e = Event::RanksLost {
                node: "w0".into(),
                ranks: vec![0, 1],
                message: "gone".into(),
                reason,
            };
            let j = next(j, e, 3_000).0;
            assert_eq!(j.failure.as_ref().unwrap().reason, reason);
            assert_eq!(
                cond(&j, ConditionType::Failed).unwrap().reason,
                reason.as_str()
            );
        }
        let mut j = next(job(0, false), Event::Placement(Ok(placement(1, 2))), 2_000).0;
        j = next(
            j,
            Event::StartFailed {
                generation: 0,
                rank: 1,
                message: "no such file".into(),
            },
            2_100,
        )
        .0;
        assert_eq!(j.failure.as_ref().unwrap().reason, Reason::StartFailed);

        let j = next(
            run(job(3, false), 2_000),
            Event::Cancel { grace_ms: 0 },
            3_000,
        )
        .0;
        assert_eq!(j.state, JobState::Cancelled);
        let c = cond(&j, ConditionType::Cancelled).unwrap();
        assert_eq!(
            (c.status, c.reason.as_str(), c.last_transition_unix_ms),
            (true, "Cancelled", 3_000)
        );
        assert!(!cond(&j, ConditionType::Running).unwrap().status);
    }

    #[test]
    fn a_record_from_before_conditions_loads_and_gains_them_at_its_next_change() {
        let j = run(job(0, true), 2_000);
        let mut v = serde_json::to_value(&j).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in [
            "conditions",
            "recovery_ms",
            "recovering_since_ms",
            "first_running_ms",
            "unschedulable",
        ] {
            o.remove(k);
        }
        o["failures"] = serde_json::json!([{"generation": 0, "rank": 1, "node": "w0", "exit_code": 1,
            "signal": null, "message": "old", "log_tail": []}]);
        let old: Job = serde_json::from_value(v).unwrap();
        assert!(old.conditions.is_empty());
        assert_eq!(old.failures[0].reason, Reason::Unknown);
        let j = exit(old, 0, Some(1), None, 3_000);
        assert_eq!(
            cond(&j, ConditionType::Created)
                .unwrap()
                .last_transition_unix_ms,
            1_000
        );
        assert_eq!(
            cond(&j, ConditionType::Failed).unwrap().reason,
            "WorkerExited"
        );
        // A reason a newer coordinator wrote reads as Unknown.
        let r: Reason = serde_json::from_str("\"SomethingNew\"").unwrap();
        assert_eq!(r, Reason::Unknown);
    }
}
