//! Protobuf ↔ the core's own types ([`super::core::types`]): the one place where the wire
//! format of agent messages, progress reports and log fetches meets the loop. Used by the
//! service handlers only.

use ringmaster_proto as pb;

use super::core::types::{
    AgentEvent, CheckpointSeconds, FetchLog, JoinAck, JoinRequest, LogChunk, LogQuery, NodeInfo,
    Outbound, PortAllocated, ProgressReport, RankEntry, ResumeReport, SignalWorkers, StartFailed,
    StartWorkers, StopWorkers, ToAgent, WorkerExited, WorkerStarted,
};
use super::core::types::{MAX_FLOPS, MAX_SECONDS};
use crate::job::CheckpointRef;

impl From<NodeInfo> for pb::NodeStatus {
    fn from(n: NodeInfo) -> pb::NodeStatus {
        pb::NodeStatus {
            name: n.name,
            slots: n.slots,
            state: n.state.into(),
            advertise_addr: n.advertise_addr,
            version: n.version,
            last_heartbeat_ms_ago: n.last_heartbeat_ms_ago,
            running_workers: n.running_workers,
            hostname: n.hostname,
            cordoned: n.cordoned,
        }
    }
}

impl From<pb::Join> for JoinRequest {
    fn from(j: pb::Join) -> JoinRequest {
        JoinRequest {
            name: j.name,
            slots: j.slots,
            advertise_addr: j.advertise_addr,
            version: j.version,
            hostname: j.hostname,
            incarnation: j.incarnation,
            running: j
                .running
                .into_iter()
                .map(|w| WorkerStarted {
                    job_id: w.job_id,
                    generation: w.generation,
                    rank: w.rank,
                    pid: w.pid,
                })
                .collect(),
            exited_while_away: j.exited_while_away.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::WorkerExited> for WorkerExited {
    fn from(e: pb::WorkerExited) -> WorkerExited {
        WorkerExited {
            job_id: e.job_id,
            generation: e.generation,
            rank: e.rank,
            exit_code: e.exit_code,
            signal: e.signal,
            log_tail: e.log_tail,
            exited_unix_ms: e.exited_unix_ms,
        }
    }
}

impl From<pb::LogChunk> for LogChunk {
    fn from(c: pb::LogChunk) -> LogChunk {
        LogChunk {
            request_id: c.request_id,
            data: c.data,
            eof: c.eof,
            error: c.error,
            offset: c.offset,
        }
    }
}

impl From<LogChunk> for pb::LogChunk {
    fn from(c: LogChunk) -> pb::LogChunk {
        pb::LogChunk {
            request_id: c.request_id,
            data: c.data,
            eof: c.eof,
            error: c.error,
            offset: c.offset,
        }
    }
}

impl From<pb::agent_message::Msg> for AgentEvent {
    fn from(m: pb::agent_message::Msg) -> AgentEvent {
        use pb::agent_message::Msg;
        match m {
            Msg::Join(_) => AgentEvent::Join,
            Msg::Heartbeat(h) => AgentEvent::Heartbeat {
                running_workers: h.running_workers,
            },
            Msg::WorkerStarted(w) => AgentEvent::WorkerStarted(WorkerStarted {
                job_id: w.job_id,
                generation: w.generation,
                rank: w.rank,
                pid: w.pid,
            }),
            Msg::WorkerExited(e) => AgentEvent::WorkerExited(e.into()),
            Msg::StartFailed(f) => AgentEvent::StartFailed(StartFailed {
                job_id: f.job_id,
                generation: f.generation,
                rank: f.rank,
                message: f.message,
            }),
            Msg::PortAllocated(p) => AgentEvent::PortAllocated(PortAllocated {
                request_id: p.request_id,
                port: p.port,
                error: p.error,
            }),
            Msg::LogChunk(c) => AgentEvent::LogChunk(c.into()),
        }
    }
}

impl From<JoinAck> for pb::JoinAck {
    fn from(a: JoinAck) -> pb::JoinAck {
        pb::JoinAck {
            slots: a.slots,
            heartbeat_interval_ms: a.heartbeat_interval_ms,
            coordinator_version: a.coordinator_version,
            leader_epoch: a.leader_epoch,
            leader_scope: a.leader_scope,
        }
    }
}

fn start_workers(s: StartWorkers) -> pb::StartWorkers {
    let c = &*s.common;
    pb::StartWorkers {
        job_id: c.job_id.clone(),
        generation: c.generation,
        restart_count: c.restart_count,
        max_restarts: c.max_restarts,
        world_size: c.world_size,
        nnodes: c.nnodes,
        master_addr: c.master_addr.clone(),
        master_port: c.master_port,
        ranks: s
            .ranks
            .into_iter()
            .map(|r: RankEntry| pb::RankEntry {
                rank: r.rank,
                local_rank: r.local_rank,
                node_rank: r.node_rank,
                node: r.node,
                slot: r.slot,
            })
            .collect(),
        program: c.program.clone(),
        env: c.env.clone().into_iter().collect(),
        train_config: c.train_config.clone(),
        files: c.files.clone().into_iter().collect(),
        resume_from: c.resume_from.clone(),
        job_name: c.job_name.clone(),
        worker_token: c.worker_token.clone(),
        workdir: c.workdir.clone(),
    }
}

impl From<ToAgent> for pb::coordinator_message::Msg {
    fn from(m: ToAgent) -> pb::coordinator_message::Msg {
        use pb::coordinator_message::Msg;
        match m {
            ToAgent::JoinAck(a) => Msg::JoinAck(a.into()),
            ToAgent::StartWorkers(s) => Msg::StartWorkers(start_workers(s)),
            ToAgent::StopWorkers(StopWorkers {
                job_id,
                generation,
                grace_ms,
                reason,
            }) => Msg::StopWorkers(pb::StopWorkers {
                job_id,
                generation,
                grace_ms,
                reason,
            }),
            ToAgent::AllocatePort { request_id } => {
                Msg::AllocatePort(pb::AllocatePort { request_id })
            }
            ToAgent::FetchLog(FetchLog {
                request_id,
                job_id,
                generation,
                rank,
                tail_bytes,
                follow,
            }) => Msg::FetchLog(pb::FetchLog {
                request_id,
                job_id,
                generation,
                rank,
                tail_bytes,
                follow,
            }),
            ToAgent::CancelFetch { request_id } => Msg::CancelFetch(pb::CancelFetch { request_id }),
            ToAgent::SignalWorkers(SignalWorkers {
                job_id,
                generation,
                signal,
                reason,
            }) => Msg::SignalWorkers(pb::SignalWorkers {
                job_id,
                generation,
                signal,
                reason,
            }),
            ToAgent::LogCredit { request_id, chunks } => {
                Msg::LogCredit(pb::LogCredit { request_id, chunks })
            }
        }
    }
}

impl From<Outbound> for pb::CoordinatorMessage {
    /// Built when the agent's stream takes it, so that a generation's files are copied into
    /// one node's message at a time, not into every node's at once.
    fn from(o: Outbound) -> pb::CoordinatorMessage {
        pb::CoordinatorMessage {
            msg: Some(o.msg.into()),
            leader_epoch: o.leader_epoch,
        }
    }
}

impl From<pb::LogsRequest> for LogQuery {
    fn from(r: pb::LogsRequest) -> LogQuery {
        LogQuery {
            job_id: r.job_id,
            rank: r.rank,
            generation: r.generation,
            follow: r.follow,
            tail_bytes: r.tail_bytes,
        }
    }
}

/// Longest checkpoint path a report may carry; a longer one is left out of the report.
pub const MAX_CHECKPOINT_PATH_BYTES: usize = 4096;

/// A reported checkpoint; `None` when its path is over [`MAX_CHECKPOINT_PATH_BYTES`].
fn checkpoint(c: pb::CheckpointRef) -> Option<CheckpointRef> {
    (c.path.len() <= MAX_CHECKPOINT_PATH_BYTES).then_some(CheckpointRef {
        step: c.step,
        path: c.path,
    })
}

/// A resume report, bounded: `None` when the checkpoint it names has an over-long path; at
/// most [`crate::job::MAX_CHECKPOINT_WARNINGS`] skipped entries, each cut to
/// [`crate::job::MAX_WARNING_BYTES`].
fn resume(r: pb::ResumeReport) -> Option<ResumeReport> {
    let from = match r.from {
        Some(c) => Some(checkpoint(c)?),
        None => None,
    };
    let skipped = r
        .skipped
        .into_iter()
        .take(crate::job::MAX_CHECKPOINT_WARNINGS)
        .map(|w| crate::job::cap(w, crate::job::MAX_WARNING_BYTES))
        .collect();
    Some(ResumeReport { from, skipped })
}

/// A reported FLOPs figure: finite, positive and below [`MAX_FLOPS`]; anything else (0
/// included: the trainer does not know it) is not reported.
fn flops(v: f64) -> Option<f64> {
    (v.is_finite() && v > 0.0 && v < MAX_FLOPS).then_some(v)
}

/// A reported duration in seconds: finite, positive and below
/// [`MAX_SECONDS`]; 0 is "not reported".
fn seconds(v: f64) -> Option<f64> {
    (v.is_finite() && v > 0.0 && v < MAX_SECONDS).then_some(v)
}

/// A trainer's report; `None` without a scope (the handler checked it already).
pub fn progress(p: pb::Progress) -> Option<ProgressReport> {
    let scope = p.scope?;
    Some(ProgressReport {
        job_id: scope.job_id,
        generation: scope.generation,
        rank: p.rank,
        step: p.step,
        total_steps: p.total_steps,
        loss: p.loss,
        tokens_per_second: p.tokens_per_second,
        collective_seq: p.collective_seq,
        compute_seconds: p.compute_seconds,
        collective_wait_seconds: p.collective_wait_seconds,
        memory_bytes: p.memory_bytes,
        grad_norm: p.grad_norm.filter(|g| g.is_finite() && *g >= 0.0),
        device: crate::job::cap(
            p.device.chars().filter(|c| !c.is_control()).collect(),
            crate::server::core::types::MAX_DEVICE_BYTES,
        ),
        model_flops_per_token: flops(p.model_flops_per_token),
        peak_flops: flops(p.peak_flops),
        checkpoint_seconds: p.committed_checkpoint.as_ref().map(|c| CheckpointSeconds {
            save: seconds(c.save_seconds),
            commit: seconds(c.commit_seconds),
        }),
        committed_checkpoint: p.committed_checkpoint.and_then(checkpoint),
        resume: p.resume.and_then(resume),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::server::core::types::StartTemplate;

    /// A worker's report is bounded before it is queued: an over-long checkpoint path drops
    /// the checkpoint (or the resume), and a resume's skipped list is cut.
    #[test]
    fn checkpoint_paths_and_skipped_lists_are_bounded() {
        let long = format!("/out/{}", "x".repeat(MAX_CHECKPOINT_PATH_BYTES));
        let cp = |path: &str| pb::CheckpointRef {
            step: 5,
            path: path.into(),
            ..Default::default()
        };
        let r = progress(pb::Progress {
            scope: Some(pb::Scope::default()),
            committed_checkpoint: Some(cp(&long)),
            resume: Some(pb::ResumeReport {
                from: Some(cp(&long)),
                skipped: vec![],
            }),
            ..Default::default()
        })
        .unwrap();
        assert!(r.committed_checkpoint.is_none() && r.resume.is_none());
        let r = progress(pb::Progress {
            scope: Some(pb::Scope::default()),
            committed_checkpoint: Some(cp("/out/checkpoint-5")),
            resume: Some(pb::ResumeReport {
                from: Some(cp("/out/checkpoint-5")),
                skipped: vec!["y".repeat(10_000); 1_000],
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.committed_checkpoint.unwrap().path, "/out/checkpoint-5");
        let resume = r.resume.unwrap();
        assert_eq!(resume.from.unwrap().path, "/out/checkpoint-5");
        assert_eq!(resume.skipped.len(), crate::job::MAX_CHECKPOINT_WARNINGS);
        assert!(
            resume
                .skipped
                .iter()
                .all(|w| w.len() <= crate::job::MAX_WARNING_BYTES)
        );
    }

    #[test]
    fn flops_and_checkpoint_seconds_are_bounded() {
        let report = |fpt: f64, peak: f64, save: f64, commit: f64| {
            progress(pb::Progress {
                scope: Some(pb::Scope::default()),
                model_flops_per_token: fpt,
                peak_flops: peak,
                committed_checkpoint: Some(pb::CheckpointRef {
                    step: 5,
                    path: "/out/checkpoint-5".into(),
                    save_seconds: save,
                    commit_seconds: commit,
                }),
                ..Default::default()
            })
            .expect("the report has a scope")
        };
        let ok = report(1.2e7, 989e12, 1.5, 0.25);
        assert_eq!(ok.model_flops_per_token, Some(1.2e7));
        assert_eq!(ok.peak_flops, Some(989e12));
        let s = ok.checkpoint_seconds.expect("a committed checkpoint");
        assert_eq!((s.save, s.commit), (Some(1.5), Some(0.25)));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 2e18] {
            let r = report(bad, bad, bad, bad);
            assert_eq!(
                (r.model_flops_per_token, r.peak_flops),
                (None, None),
                "{bad}"
            );
            let s = r.checkpoint_seconds.expect("a committed checkpoint");
            assert_eq!((s.save, s.commit), (None, None), "{bad}");
        }
        // A day-long save is kept; a million seconds is not.
        let s = report(1.0, 1.0, 86_400.0, 1e6).checkpoint_seconds.unwrap();
        assert_eq!((s.save, s.commit), (Some(86_400.0), None));
        // No checkpoint, no timings.
        let none = progress(pb::Progress {
            scope: Some(pb::Scope::default()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(none.checkpoint_seconds, None);
    }

    #[test]
    fn a_start_order_carries_every_field_and_only_its_ranks() {
        let common = Arc::new(StartTemplate {
            job_id: "j-1".into(),
            generation: 3,
            restart_count: 2,
            max_restarts: 5,
            world_size: 4,
            nnodes: 2,
            master_addr: "10.0.0.1".into(),
            master_port: 29400,
            program: vec!["python".into(), "x.py".into()],
            env: [("A".to_owned(), "1".to_owned())].into(),
            train_config: "{}".into(),
            files: [("ds.json".to_owned(), b"{}".to_vec())].into(),
            resume_from: "/out/ckpt-10".into(),
            job_name: "train".into(),
            worker_token: "tok".into(),
            workdir: "/w".into(),
        });
        let rank = |rank, node: &str| RankEntry {
            rank,
            local_rank: rank % 2,
            node_rank: rank / 2,
            node: node.into(),
            slot: rank % 2,
        };
        let msg: pb::CoordinatorMessage = Outbound {
            msg: ToAgent::StartWorkers(StartWorkers {
                common,
                ranks: vec![rank(2, "b"), rank(3, "b")],
            }),
            leader_epoch: 9,
        }
        .into();
        assert_eq!(msg.leader_epoch, 9);
        let Some(pb::coordinator_message::Msg::StartWorkers(s)) = msg.msg else {
            panic!("{msg:?}")
        };
        assert_eq!(
            (
                s.job_id.as_str(),
                s.generation,
                s.restart_count,
                s.max_restarts
            ),
            ("j-1", 3, 2, 5)
        );
        assert_eq!((s.world_size, s.nnodes, s.master_port), (4, 2, 29400));
        assert_eq!(s.master_addr, "10.0.0.1");
        assert_eq!(s.program, ["python", "x.py"]);
        assert_eq!(s.env["A"], "1");
        assert_eq!(s.files["ds.json"], b"{}");
        assert_eq!(
            (
                s.train_config.as_str(),
                s.resume_from.as_str(),
                s.job_name.as_str()
            ),
            ("{}", "/out/ckpt-10", "train")
        );
        assert_eq!((s.worker_token.as_str(), s.workdir.as_str()), ("tok", "/w"));
        let ranks: Vec<(u32, u32, u32, &str)> = s
            .ranks
            .iter()
            .map(|r| (r.rank, r.local_rank, r.node_rank, r.node.as_str()))
            .collect();
        assert_eq!(ranks, [(2, 0, 1, "b"), (3, 1, 1, "b")]);
    }

    #[test]
    fn a_join_keeps_its_inventory() {
        let j: JoinRequest = pb::Join {
            name: "n1".into(),
            slots: 8,
            incarnation: "i".into(),
            running: vec![pb::RunningWorker {
                job_id: "j-1".into(),
                generation: 1,
                rank: 5,
                pid: 77,
            }],
            exited_while_away: vec![pb::WorkerExited {
                job_id: "j-1".into(),
                generation: 1,
                rank: 6,
                exit_code: Some(1),
                signal: None,
                log_tail: vec!["boom".into()],
                exited_unix_ms: 1_800_000_000_000,
            }],
            ..Default::default()
        }
        .into();
        assert_eq!(
            (j.name.as_str(), j.slots, j.incarnation.as_str()),
            ("n1", 8, "i")
        );
        assert_eq!(j.running[0].pid, 77);
        assert_eq!(j.exited_while_away[0].exit_code, Some(1));
        assert_eq!(j.exited_while_away[0].log_tail, ["boom"]);
        assert_eq!(j.exited_while_away[0].exited_unix_ms, 1_800_000_000_000);
    }
}
