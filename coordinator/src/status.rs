//! Job status: the domain [`Job`] turned into the wire form, and the wire form into the JSON
//! that `ringctl --output json` prints (field names are a stable contract: add, never rename).

use ringmaster_proto as pb;
use serde_json::{Value, json};

use crate::job::{Failure, Job};

fn failure(f: &Failure) -> pb::Failure {
    pb::Failure {
        rank: f.rank,
        node: f.node.clone(),
        exit_code: f.exit_code,
        signal: f.signal,
        message: f.message.clone(),
        log_tail: f.log_tail.clone(),
        generation: f.generation,
        lagging_rank: f.lagging_rank,
        reason: f.reason.as_str().to_owned(),
    }
}

/// The wire status of a job, its durations as of now.
pub fn job_status(job: &Job) -> pb::JobStatus {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let d = job.durations(now);
    pb::JobStatus {
        id: job.id.clone(),
        name: job.name.clone(),
        state: job.state.as_str().to_owned(),
        generation: job.generation,
        restart_count: job.restart_count,
        max_restarts: job.spec.max_restarts,
        world_size: job.world_size(),
        pending_reason: job.pending_reason.clone(),
        ranks: job
            .ranks
            .iter()
            .map(|r| pb::RankStatus {
                rank: r.rank,
                node: r.node.clone(),
                local_rank: r.local_rank,
                state: r.state.as_str().to_owned(),
                step: r.step,
                pid: r.pid,
                exit_code: r.exit_code,
                signal: r.signal,
                collective_seq: r.collective_seq,
                // Filled from the rank's reports by the serving coordinator
                // (`Core::job_status`); not part of the saved job.
                ..Default::default()
            })
            .collect(),
        progress: Some(pb::JobProgress {
            step: job.progress.step,
            total_steps: job.progress.total_steps,
            loss: job.progress.loss,
            tokens_per_second: job.progress.tokens_per_second,
            grad_norm: job.progress.grad_norm,
            // From the ranks' reports, by the serving coordinator (`Core::job_status`).
            mfu: None,
        }),
        last_checkpoint: job.last_checkpoint.as_ref().map(|c| pb::CheckpointRef {
            step: c.step,
            path: c.path.clone(),
            ..Default::default()
        }),
        failure: job.failure.as_ref().map(failure),
        created_unix_ms: job.created_unix_ms,
        updated_unix_ms: job.updated_unix_ms,
        nodes: job.nodes(),
        master_addr: job.master_addr.clone(),
        master_port: job.master_port,
        failures: job.failures.iter().map(failure).collect(),
        lagging_rank: job.lagging_rank(),
        resumed_from: job.resumed_from.as_ref().map(|c| pb::CheckpointRef {
            step: c.step,
            path: c.path.clone(),
            ..Default::default()
        }),
        checkpoint_warnings: job.checkpoint_warnings.clone(),
        failures_omitted: job.failures_omitted,
        summary: false,
        conditions: job
            .conditions
            .iter()
            .map(|c| pb::Condition {
                r#type: c.kind.as_str().to_owned(),
                status: c.status,
                reason: c.reason.clone(),
                message: c.message.clone(),
                last_transition_unix_ms: c.last_transition_unix_ms,
            })
            .collect(),
        duration_ms: d.total_ms,
        queued_ms: d.queued_ms,
        recovery_ms: d.recovery_ms,
        duration_excluding_recovery_ms: d.excluding_recovery_ms,
        recent_events: job
            .events
            .newest(RECENT_EVENTS)
            .into_iter()
            .map(event)
            .collect(),
        events_omitted: job.events.omitted(),
        stragglers: job
            .stragglers
            .iter()
            .map(|s| pb::Straggler {
                rank: s.rank,
                node: s.node.clone(),
                slowdown: s.slowdown,
                since_step: s.since_step,
            })
            .collect(),
    }
}

/// Events a status carries (the newest).
pub const RECENT_EVENTS: usize = 5;

/// A job event on the wire.
pub fn event(e: &crate::job::JobEvent) -> pb::JobEvent {
    pb::JobEvent {
        seq: e.seq,
        unix_ms: e.unix_ms,
        generation: e.generation,
        kind: e.kind.as_str().to_owned(),
        reason: e.reason.map(|r| r.as_str().to_owned()).unwrap_or_default(),
        rank: e.rank,
        node: e.node.clone().unwrap_or_default(),
        message: e.message.clone(),
        warning: e.kind.is_warning(),
    }
}

/// One event as JSON (`ringctl events --output json`, and `recent_events` of a status).
pub fn event_json(e: &pb::JobEvent) -> Value {
    json!({
        "seq": e.seq,
        "unix_ms": e.unix_ms,
        "generation": e.generation,
        "kind": e.kind,
        "reason": (!e.reason.is_empty()).then_some(&e.reason),
        "rank": e.rank,
        "node": (!e.node.is_empty()).then_some(&e.node),
        "message": e.message,
        "warning": e.warning,
    })
}

/// A job as a List reply shows it: without the failure history (`failures_omitted` counts
/// every failure then).
pub fn summary(job: &Job) -> pb::JobStatus {
    let mut st = job_status(job);
    st.failures = Vec::new();
    st.failures_omitted = job.failure_count();
    st.recent_events = Vec::new();
    st.summary = true;
    st
}

/// The statuses of a List reply: [`summary`] of each job; if these take more than
/// `budget_bytes` in all, ranks, nodes, log tails and checkpoint warnings are left out too and
/// reasons and messages shortened, so that the reply stays within what clients accept however
/// many jobs there are (10,000 jobs take about 10 MB then). Conditions keep their type,
/// status and reason then, not their message.
pub fn list(jobs: &[&Job], budget_bytes: usize) -> Vec<pb::JobStatus> {
    use prost::Message;
    let mut out: Vec<pb::JobStatus> = jobs.iter().map(|j| summary(j)).collect();
    let total: usize = out.iter().map(Message::encoded_len).sum();
    if total > budget_bytes {
        let short = |s: &mut String| *s = crate::job::cap(std::mem::take(s), LIST_TEXT_BYTES);
        for st in &mut out {
            st.ranks = Vec::new();
            st.nodes = Vec::new();
            st.checkpoint_warnings = Vec::new();
            if let Some(r) = &mut st.pending_reason {
                short(r);
            }
            if let Some(f) = &mut st.failure {
                f.log_tail = Vec::new();
                short(&mut f.message);
            }
            for c in &mut st.conditions {
                c.message = String::new();
            }
        }
    }
    out
}

/// Longest pending reason or failure message in a List reply above its budget.
const LIST_TEXT_BYTES: usize = 256;

fn failure_json(f: &pb::Failure) -> Value {
    json!({
        "rank": f.rank,
        "node": f.node,
        "exit_code": f.exit_code,
        "signal": f.signal,
        "message": f.message,
        "log_tail": f.log_tail,
        "generation": f.generation,
        "lagging_rank": f.lagging_rank,
        "reason": f.reason,
    })
}

/// The JSON object of `ringctl status --output json` (DESIGN.md's contract).
pub fn to_json(s: &pb::JobStatus) -> Value {
    let p = s.progress.unwrap_or_default();
    json!({
        "id": s.id,
        "name": s.name,
        "state": s.state,
        "generation": s.generation,
        "restart_count": s.restart_count,
        "max_restarts": s.max_restarts,
        "world_size": s.world_size,
        "pending_reason": s.pending_reason,
        "nodes": s.nodes,
        "master_addr": s.master_addr,
        "master_port": s.master_port,
        "ranks": s.ranks.iter().map(|r| json!({
            "rank": r.rank,
            "node": r.node,
            "local_rank": r.local_rank,
            "state": r.state,
            "step": r.step,
            "pid": r.pid,
            "exit_code": r.exit_code,
            "signal": r.signal,
            "collective_seq": r.collective_seq,
            "step_seconds": r.step_seconds,
            "collective_wait_seconds": r.collective_wait_seconds,
            "memory_bytes": r.memory_bytes,
            "peak_memory_bytes": r.peak_memory_bytes,
            "device": r.device,
        })).collect::<Vec<_>>(),
        "progress": {
            "step": p.step,
            "total_steps": p.total_steps,
            "loss": p.loss,
            "tokens_per_second": p.tokens_per_second,
            "grad_norm": p.grad_norm,
            "mfu": p.mfu,
        },
        "last_checkpoint": s.last_checkpoint.as_ref().map(|c| json!({"step": c.step, "path": c.path})),
        "resumed_from": s.resumed_from.as_ref().map(|c| json!({"step": c.step, "path": c.path})),
        "checkpoint_warnings": s.checkpoint_warnings,
        "failure": s.failure.as_ref().map(failure_json),
        "lagging_rank": s.lagging_rank,
        "failures": s.failures.iter().map(failure_json).collect::<Vec<_>>(),
        "failures_omitted": s.failures_omitted,
        "summary": s.summary,
        "created_unix_ms": s.created_unix_ms,
        "updated_unix_ms": s.updated_unix_ms,
        "conditions": s.conditions.iter().map(|c| json!({
            "type": c.r#type,
            "status": c.status,
            "reason": c.reason,
            "message": c.message,
            "last_transition_unix_ms": c.last_transition_unix_ms,
        })).collect::<Vec<_>>(),
        "duration_ms": s.duration_ms,
        "queued_ms": s.queued_ms,
        "recovery_ms": s.recovery_ms,
        "duration_excluding_recovery_ms": s.duration_excluding_recovery_ms,
        "recent_events": s.recent_events.iter().map(event_json).collect::<Vec<_>>(),
        "events_omitted": s.events_omitted,
        "stragglers": s.stragglers.iter().map(|x| json!({
            "rank": x.rank,
            "node": x.node,
            "slowdown": x.slowdown,
            "since_step": x.since_step,
        })).collect::<Vec<_>>(),
    })
}

/// One node as JSON for `ringctl nodes --output json`.
pub fn node_json(n: &pb::NodeStatus) -> Value {
    json!({
        "name": n.name,
        "slots": n.slots,
        "state": n.state,
        "address": n.advertise_addr,
        "hostname": n.hostname,
        "version": n.version,
        "last_heartbeat_ms_ago": n.last_heartbeat_ms_ago,
        "running_workers": n.running_workers,
        "cordoned": n.cordoned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobSpec;

    #[test]
    fn json_has_every_contract_field_with_nulls() {
        let job = Job::new(
            "j-1".into(),
            JobSpec {
                command: Some(vec!["x".into()]),
                ..JobSpec::default()
            },
            Default::default(),
            5,
        );
        let v = to_json(&job_status(&job));
        for k in [
            "id",
            "name",
            "state",
            "generation",
            "restart_count",
            "max_restarts",
            "world_size",
            "pending_reason",
            "ranks",
            "progress",
            "last_checkpoint",
            "resumed_from",
            "checkpoint_warnings",
            "failure",
            "failures",
            "failures_omitted",
            "conditions",
            "duration_ms",
            "queued_ms",
            "recovery_ms",
            "duration_excluding_recovery_ms",
            "recent_events",
            "events_omitted",
            "stragglers",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in [
            "step",
            "total_steps",
            "loss",
            "tokens_per_second",
            "grad_norm",
            "mfu",
        ] {
            assert!(v["progress"].get(k).unwrap().is_null(), "{k}");
        }
        assert!(v["failure"].is_null());
        assert!(v["last_checkpoint"].is_null());
        assert_eq!(v["state"], "PENDING");
    }

    fn failing_job(failures: u32, world: u32) -> Job {
        use crate::job::{Event, next};
        use ringmaster_hostfile::Selected;
        let spec = JobSpec {
            command: Some(vec!["sh".into(), "-c".into(), "exit 3".into()]),
            max_restarts: failures,
            ..JobSpec::default()
        };
        let mut j = Job::new("crashloop-1".into(), spec, Default::default(), 0);
        let mut now = 0;
        for _ in 0..failures {
            let sel = Selected {
                name: "w0".into(),
                slots: (0..world).collect(),
            };
            (j, _) = next(j, Event::Placement(Ok(vec![sel])), now);
            let generation = j.generation;
            (j, _) = next(
                j,
                Event::WorkerExited {
                    generation,
                    rank: 0,
                    exit_code: Some(3),
                    signal: None,
                    // 20 lines of 1 KiB each, some bytes JSON escapes six-fold.
                    log_tail: (0..20)
                        .map(|i| format!("{i}{}", "\u{1}x".repeat(512)))
                        .collect(),
                },
                now,
            );
            for r in 1..world {
                (j, _) = next(
                    j,
                    Event::WorkerExited {
                        generation,
                        rank: r,
                        exit_code: None,
                        signal: Some(15),
                        log_tail: Vec::new(),
                    },
                    now,
                );
            }
            now += 3_600_000;
            (j, _) = next(j, Event::Tick, now);
        }
        j
    }

    #[test]
    fn the_status_of_a_job_that_failed_900_times_stays_small() {
        let j = failing_job(900, 1);
        assert_eq!(j.failure_count(), 900);
        let st = job_status(&j);
        assert_eq!(st.failures.len(), 25);
        assert_eq!(st.failures_omitted, 875);
        // The first five (the original cause) and the newest twenty.
        let gens: Vec<u64> = st.failures.iter().map(|f| f.generation).collect();
        assert_eq!(gens[..5], [0, 1, 2, 3, 4]);
        assert_eq!(*gens.last().unwrap(), 899);
        let text = serde_json::to_string(&to_json(&st)).unwrap();
        assert!(text.len() < 1 << 20, "{} bytes", text.len());
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["failures_omitted"], 875);
        assert_eq!(v["summary"], false);
    }

    #[test]
    fn list_replies_carry_no_history_and_stay_within_their_budget() {
        use prost::Message;
        let j = failing_job(30, 64);
        let jobs: Vec<&Job> = std::iter::repeat_n(&j, 50).collect();
        let roomy = list(&jobs, usize::MAX);
        assert!(roomy.iter().all(|s| s.summary && s.failures.is_empty()));
        assert_eq!(roomy[0].failures_omitted, 30);
        assert_eq!(roomy[0].ranks.len(), 64);
        let full: usize = roomy.iter().map(Message::encoded_len).sum();
        let tight = list(&jobs, full - 1);
        let small: usize = tight.iter().map(Message::encoded_len).sum();
        assert!(small * 4 < full, "{small} of {full}");
        assert!(tight[0].ranks.is_empty() && tight[0].nodes.is_empty());
        assert!(tight[0].failure.as_ref().unwrap().log_tail.is_empty());
        assert_eq!(tight[0].world_size, 64);
        let v = to_json(&tight[0]);
        assert_eq!(v["summary"], true);
        assert!(v["failures"].as_array().unwrap().is_empty());
    }
}
