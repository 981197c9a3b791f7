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
    }
}

/// The wire status of a job.
pub fn job_status(job: &Job) -> pb::JobStatus {
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
            })
            .collect(),
        progress: Some(pb::JobProgress {
            step: job.progress.step,
            total_steps: job.progress.total_steps,
            loss: job.progress.loss,
            tokens_per_second: job.progress.tokens_per_second,
        }),
        last_checkpoint: job.last_checkpoint.as_ref().map(|c| pb::CheckpointRef {
            step: c.step,
            path: c.path.clone(),
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
        }),
        checkpoint_warnings: job.checkpoint_warnings.clone(),
    }
}

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
        })).collect::<Vec<_>>(),
        "progress": {
            "step": p.step,
            "total_steps": p.total_steps,
            "loss": p.loss,
            "tokens_per_second": p.tokens_per_second,
        },
        "last_checkpoint": s.last_checkpoint.as_ref().map(|c| json!({"step": c.step, "path": c.path})),
        "resumed_from": s.resumed_from.as_ref().map(|c| json!({"step": c.step, "path": c.path})),
        "checkpoint_warnings": s.checkpoint_warnings,
        "failure": s.failure.as_ref().map(failure_json),
        "lagging_rank": s.lagging_rank,
        "failures": s.failures.iter().map(failure_json).collect::<Vec<_>>(),
        "created_unix_ms": s.created_unix_ms,
        "updated_unix_ms": s.updated_unix_ms,
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
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in ["step", "total_steps", "loss", "tokens_per_second"] {
            assert!(v["progress"].get(k).unwrap().is_null(), "{k}");
        }
        assert!(v["failure"].is_null());
        assert!(v["last_checkpoint"].is_null());
        assert_eq!(v["state"], "PENDING");
    }
}
