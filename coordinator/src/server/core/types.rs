//! What the core takes from and gives to agents, trainers and log readers, as plain Rust
//! types: the loop never sees a generated protobuf type (`server/convert.rs` translates at
//! the service handlers), so a wire change touches the handlers, not the decisions.
//!
//! Status replies are the exception on purpose: `crate::status` builds them straight from a
//! [`crate::job::Job`] in the shape docs/api.md documents, and a domain copy of that shape
//! would be a field-for-field duplicate.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::job::CheckpointRef;

/// A node as `ringctl nodes` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub slots: u32,
    /// JOINED, LOST, DISCONNECTED or EXPECTED (in the hostfile, never joined).
    pub state: &'static str,
    pub advertise_addr: String,
    pub version: String,
    pub last_heartbeat_ms_ago: Option<u64>,
    pub running_workers: u32,
    pub hostname: String,
    /// Taken out of placement by an operator.
    pub cordoned: bool,
}

/// An agent's first message on its stream (the join token was checked by the handler).
#[derive(Debug, Clone, Default)]
pub struct JoinRequest {
    pub name: String,
    pub slots: u32,
    /// Empty: the address the connection came from.
    pub advertise_addr: String,
    pub version: String,
    pub hostname: String,
    /// Changes when the agent process restarts (its workers are then gone).
    pub incarnation: String,
    /// Workers the agent runs now (after a coordinator restart or failover).
    pub running: Vec<WorkerStarted>,
    /// Workers that ended while the agent could not reach a coordinator.
    pub exited_while_away: Vec<WorkerExited>,
}

/// The coordinator's answer to a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinAck {
    pub slots: u32,
    pub heartbeat_interval_ms: u64,
    pub coordinator_version: String,
    pub leader_epoch: u64,
    pub leader_scope: String,
}

/// A worker that runs (or was started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStarted {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    pub pid: u32,
}

/// A worker that ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkerExited {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub log_tail: Vec<String>,
    /// When the agent saw it end (agent's clock, Unix ms; 0: unknown).
    pub exited_unix_ms: u64,
}

/// A worker the agent could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFailed {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    pub message: String,
}

/// The answer to [`ToAgent::AllocatePort`]: a port, or why none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortAllocated {
    pub request_id: u64,
    pub port: u32,
    pub error: String,
}

/// A piece of a worker's log, for a log fetch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogChunk {
    pub request_id: u64,
    pub data: Vec<u8>,
    pub eof: bool,
    /// Not empty: the fetch failed, and why.
    pub error: String,
    pub offset: u64,
}

/// What an agent sends after its join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    Heartbeat {
        running_workers: u32,
    },
    WorkerStarted(WorkerStarted),
    WorkerExited(WorkerExited),
    StartFailed(StartFailed),
    PortAllocated(PortAllocated),
    LogChunk(LogChunk),
    /// A second Join on one stream (ignored, logged).
    Join,
}

/// One rank of a generation, where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEntry {
    pub rank: u32,
    pub local_rank: u32,
    pub node_rank: u32,
    pub node: String,
    pub slot: u32,
}

/// What every node of a generation is told, the same for all (shared, not copied per node:
/// a generation's files go to each of its nodes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartTemplate {
    pub job_id: String,
    pub generation: u64,
    pub restart_count: u32,
    pub max_restarts: u32,
    pub world_size: u32,
    pub nnodes: u32,
    pub master_addr: String,
    pub master_port: u32,
    pub program: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The training config as JSON (empty for a `command:` job).
    pub train_config: String,
    pub files: BTreeMap<String, Vec<u8>>,
    pub resume_from: String,
    pub job_name: String,
    pub worker_token: String,
    pub workdir: String,
}

/// Start a node's ranks of a generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartWorkers {
    pub common: Arc<StartTemplate>,
    /// This node's ranks only.
    pub ranks: Vec<RankEntry>,
}

/// Stop a generation's workers on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopWorkers {
    pub job_id: String,
    pub generation: u64,
    pub grace_ms: u64,
    pub reason: String,
}

/// Send a signal to a generation's workers on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalWorkers {
    pub job_id: String,
    pub generation: u64,
    pub signal: i32,
    pub reason: String,
}

/// Read a worker's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchLog {
    pub request_id: u64,
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    pub tail_bytes: u64,
    pub follow: bool,
}

/// What the coordinator tells an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToAgent {
    JoinAck(JoinAck),
    StartWorkers(StartWorkers),
    StopWorkers(StopWorkers),
    AllocatePort { request_id: u64 },
    FetchLog(FetchLog),
    CancelFetch { request_id: u64 },
    SignalWorkers(SignalWorkers),
    LogCredit { request_id: u64, chunks: u32 },
}

/// A message to an agent, stamped with the leadership it was sent under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub msg: ToAgent,
    pub leader_epoch: u64,
}

/// `ringctl logs`: which worker's log, how much.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogQuery {
    pub job_id: String,
    pub rank: u32,
    /// None: the job's current generation.
    pub generation: Option<u64>,
    pub follow: bool,
    pub tail_bytes: u64,
}

/// Where a generation started from, as its rank 0 reports it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResumeReport {
    pub from: Option<CheckpointRef>,
    /// Checkpoints passed over, each with the reason.
    pub skipped: Vec<String>,
}

/// The longest device name a report may carry (longer ones are cut).
pub const MAX_DEVICE_BYTES: usize = 64;

/// The largest FLOPs per token or FLOP/s a report may carry (an exaFLOP): larger values, like
/// negative or non-finite ones, are dropped as not reported.
pub const MAX_FLOPS: f64 = 1e18;

/// The longest checkpoint save or commit a report may carry, seconds (~11.6 days).
pub const MAX_SECONDS: f64 = 1e6;

/// How long a committed checkpoint took on rank 0.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CheckpointSeconds {
    /// Until its shard was written.
    pub save: Option<f64>,
    /// From its shard written until the commit marker was down.
    pub commit: Option<f64>,
}

/// A trainer rank's progress report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProgressReport {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    pub step: u64,
    pub total_steps: u64,
    pub loss: Option<f64>,
    pub tokens_per_second: f64,
    pub collective_seq: u64,
    /// The step's compute time (its time less the collective wait), seconds.
    pub compute_seconds: f64,
    pub collective_wait_seconds: f64,
    /// The rank's resident memory (or device memory on a GPU), bytes.
    pub memory_bytes: u64,
    /// The step's gradient norm before clipping (finite), when the trainer computed it.
    pub grad_norm: Option<f64>,
    /// Where the rank computes (`cpu`, `cuda:0`), at most [`MAX_DEVICE_BYTES`].
    pub device: String,
    /// The model FLOPs of one trained token, when the trainer counted them (MFU's numerator).
    pub model_flops_per_token: Option<f64>,
    /// This rank's peak FLOP/s, when known (MFU's denominator is the ranks' sum).
    pub peak_flops: Option<f64>,
    /// Rank 0: the newest checkpoint the generation committed (re-sent with every report).
    pub committed_checkpoint: Option<CheckpointRef>,
    /// Rank 0: seconds that checkpoint took to save (its shard written) and to commit (the
    /// marker down after every shard), when reported (validated: finite, below [`MAX_SECONDS`]).
    pub checkpoint_seconds: Option<CheckpointSeconds>,
    /// Rank 0: where the generation started from (re-sent with every report).
    pub resume: Option<ResumeReport>,
}
