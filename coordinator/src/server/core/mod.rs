//! The coordinator's loop: one task that owns membership, jobs and agent connections.
//!
//! gRPC handlers talk to it through a [`Handle`] (each command carries a oneshot for its reply);
//! nothing else mutates state, so no lock is held across an `.await`. Decisions about a job are
//! made by the pure [`crate::job::next`]; this loop turns its actions into messages to agents,
//! persists what changed and publishes status to watchers.
//!
//! Events reach a job only through `Core::apply` (commands and timers). An action that finds
//! something to report (a node that cannot be reached) `Core::raise`s an event instead, which
//! `apply` takes up once the current event is done: no event is applied inside another.
//!
//! Layout (one `impl Core` per concern, all over the fields declared here):
//! - `mod.rs` — the commands, [`Handle`], the loop's state, [`Core::new`] (reload and reconcile
//!   what was running), [`Core::run`] and the dispatch of each command;
//! - `membership` — agents joining and re-joining, heartbeats and lost nodes, what agents report
//!   about their workers, sending to an agent;
//! - `jobs` — submission, the store's acknowledgement, worker exits, retention and removal;
//! - `schedule` — placement, restarts that are due, `apply`/`raise`/`step` and the actions;
//! - `reports` — trainers' progress, checkpoints and checkpoint requests;
//! - `logs` — log fetches from agents;
//! - `publish` — what changed goes to the store (a job's header and changed parts) and to
//!   watchers;
//! - `types` — what commands carry and what goes to agents, as the core's own types (the
//!   handlers translate from/to protobuf in `server/convert.rs`);
//! - `tests`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::server::error::CoreError;
use ringmaster_hostfile::Hostfile;
use ringmaster_proto as pb;
use tokio::sync::{mpsc, oneshot, watch};

use crate::job::{Action, CheckpointRef, Event, Job, JobState, RankState};
use crate::persist::{JobIds, Persister, WritesStopped};
use crate::placement::{self, Busy, NodeView};
use crate::server::limits::{JobLimits, show_bytes};
use crate::server::rendezvous::Rendezvous;
use crate::spec::{JobSpec, MAX_SPEC_BYTES};
use crate::status;

mod jobs;
mod logs;
mod membership;
mod publish;
mod reports;
mod schedule;
mod telemetry;
pub use telemetry::RankFacts;
pub mod types;

use types::{
    AgentEvent, FetchLog, JoinAck, JoinRequest, LogChunk, LogQuery, NodeInfo, Outbound,
    ProgressReport, RankEntry, SignalWorkers, StartTemplate, StartWorkers, StopWorkers, ToAgent,
    WorkerExited,
};

pub type AgentTx = mpsc::Sender<Result<Outbound, CoreError>>;
pub type LogTx = mpsc::Sender<Result<LogChunk, CoreError>>;

/// Log chunks an agent may send for one fetch beyond what its reader has taken: the first
/// credit granted, and the most that wait in the coordinator for a slow reader.
pub const LOG_WINDOW_CHUNKS: u32 = 16;

/// Commands the gRPC handlers send to the loop. Every heartbeat and step report is one, moved
/// through a channel: the rare large payloads (a join, a job spec, a report) are boxed, so that
/// a command stays the size of a heartbeat's (see `a_command_is_small`).
pub enum Cmd {
    AgentJoin {
        join: Box<JoinRequest>,
        peer: Option<SocketAddr>,
        tx: AgentTx,
        reply: oneshot::Sender<Result<(u64, JoinAck), CoreError>>,
    },
    AgentMsg {
        node: String,
        conn: u64,
        msg: AgentEvent,
    },
    AgentGone {
        node: String,
        conn: u64,
    },
    Submit {
        spec: Box<JobSpec>,
        files: BTreeMap<String, Vec<u8>>,
        reply: oneshot::Sender<Result<pb::JobStatus, CoreError>>,
    },
    Get {
        id: String,
        reply: oneshot::Sender<Result<pb::JobStatus, CoreError>>,
    },
    List {
        reply: oneshot::Sender<Vec<pb::JobStatus>>,
    },
    Watch {
        id: String,
        reply: oneshot::Sender<Result<watch::Receiver<pb::JobStatus>, CoreError>>,
    },
    /// The gauges of a `/metrics` scrape.
    Metrics {
        reply: oneshot::Sender<crate::metrics::Snapshot>,
    },
    /// The job's kept events after sequence number `after`, and whether the job has ended.
    Events {
        id: String,
        after: u64,
        reply: oneshot::Sender<Result<(Vec<crate::job::JobEvent>, bool), CoreError>>,
    },
    Cancel {
        id: String,
        grace_ms: u64,
        reply: oneshot::Sender<Result<pb::JobStatus, CoreError>>,
    },
    Checkpoint {
        id: String,
        reply: oneshot::Sender<Result<pb::JobStatus, CoreError>>,
    },
    Nodes {
        reply: oneshot::Sender<Vec<NodeInfo>>,
    },
    /// Takes a node out of placement (`cordon`), or puts it back.
    Cordon {
        node: String,
        cordon: bool,
        reply: oneshot::Sender<Result<NodeInfo, CoreError>>,
    },
    /// Cordons a node and moves every running generation placed on it: the jobs moved.
    Drain {
        node: String,
        grace_ms: u64,
        reply: oneshot::Sender<Result<(NodeInfo, Vec<String>), CoreError>>,
    },
    /// Starts a log fetch; replies with its request id. `tx` must hold
    /// [`LOG_WINDOW_CHUNKS`] + 2 items (the window, the final chunk and a disconnect error).
    Logs {
        req: LogQuery,
        tx: LogTx,
        reply: oneshot::Sender<Result<u64, CoreError>>,
    },
    /// The reader of a log fetch took `chunks` more chunks: let the agent send as many.
    LogCredit {
        request_id: u64,
        chunks: u32,
    },
    /// The reader of a log fetch went away.
    LogDone {
        request_id: u64,
    },
    Progress(Box<ProgressReport>),
}

/// Cheap, cloneable access to the loop.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
}

impl Handle {
    /// Sends a command and waits for its reply.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Cmd,
    ) -> Result<T, CoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| CoreError::Unavailable("coordinator is shutting down".into()))?;
        rx.await
            .map_err(|_| CoreError::Unavailable("coordinator is shutting down".into()))
    }

    /// Sends a command that has no reply.
    pub async fn send(&self, cmd: Cmd) {
        let _ = self.tx.send(cmd).await;
    }
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub hostfile: Option<Hostfile>,
    pub heartbeat_timeout: Duration,
    /// Mints each generation's worker credential.
    pub creds: std::sync::Arc<ringmaster_auth::Credentials>,
    /// How many jobs are kept, and for how long once finished.
    pub job_limits: JobLimits,
    /// With an elected leader: whether it still leads. Nothing is sent to an agent once this
    /// says no (a paused leader that wakes after its lease ran out commands nothing).
    pub leading: Option<std::sync::Arc<ringmaster_store::Leadership>>,
    /// The process's counters, fed from the job events as changed jobs are saved.
    pub metrics: crate::metrics::Metrics,
}

/// A generation whose record reached the store (or could not): `(job, generation, result)`.
type Started = (String, u64, Result<(), WritesStopped>);

/// A submitted job's record reached the store (or could not): the submit can be answered.
struct Acked {
    id: String,
    result: Result<(), WritesStopped>,
    reply: oneshot::Sender<Result<pb::JobStatus, CoreError>>,
}

/// How often finished jobs are checked against the retention limits.
const RETENTION_EVERY: Duration = Duration::from_secs(5);
/// Most bytes of one List reply: ringctl accepts replies up to 64 MiB.
pub const LIST_BUDGET_BYTES: usize = 32 << 20;

struct AgentConn {
    id: u64,
    tx: AgentTx,
}

struct Node {
    slots: u32,
    announced_slots: u32,
    advertise_addr: String,
    hostname: String,
    version: String,
    incarnation: String,
    conn: Option<AgentConn>,
    last_seen: Instant,
    /// Ever heard from (in this coordinator's life or a previous one).
    joined: bool,
    lost: bool,
    running_workers: u32,
    /// Taken out of placement by an operator (`ringctl cordon`/`drain`); persisted as
    /// `cordons/<name>`, kept across rejoins and restarts.
    cordoned: bool,
}

impl Node {
    /// A node known by name and slot count, not (yet) connected.
    fn new(slots: u32, now: Instant) -> Node {
        Node {
            slots,
            announced_slots: 0,
            advertise_addr: String::new(),
            hostname: String::new(),
            version: String::new(),
            incarnation: String::new(),
            conn: None,
            last_seen: now,
            joined: false,
            lost: false,
            running_workers: 0,
            cordoned: false,
        }
    }

    fn alive(&self) -> bool {
        self.conn.is_some() && !self.lost
    }
}

/// Where a cordon is persisted: `cordons/<node>` (present while the node is cordoned).
pub const CORDONS: &str = "cordons/";

/// A node record as persisted.
#[derive(serde::Serialize, serde::Deserialize)]
struct NodeRecord {
    name: String,
    slots: u32,
    advertise_addr: String,
    hostname: String,
    version: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    next_job: u64,
}

/// The job id counter as the store recorded it (`meta/coordinator`), if it did.
pub fn stored_next_job(loaded: &[(String, Vec<u8>)]) -> Option<u64> {
    loaded
        .iter()
        .find(|(k, _)| k == "meta/coordinator")
        .and_then(|(_, v)| serde_json::from_slice::<Meta>(v).ok())
        .map(|m| m.next_job)
}

/// Bytes a job's spec and files take, counted against `--max-job-bytes`.
fn job_bytes(spec: &JobSpec, files: &BTreeMap<String, Vec<u8>>) -> u64 {
    let spec_len = serde_json::to_vec(spec).map_or(0, |v| v.len());
    (spec_len + files.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()) as u64
}

pub struct Core {
    cfg: CoreConfig,
    persist: Persister,
    rendezvous: Rendezvous,
    nodes: BTreeMap<String, Node>,
    jobs: BTreeMap<String, Job>,
    watchers: HashMap<String, watch::Sender<pb::JobStatus>>,
    next_conn: u64,
    next_request: u64,
    ids: JobIds,
    /// Submitted jobs whose record is not yet known to be on disk: not scheduled, not
    /// acknowledged.
    unacked: BTreeSet<String>,
    acks_tx: mpsc::UnboundedSender<Acked>,
    acks_rx: Option<mpsc::UnboundedReceiver<Acked>>,
    /// Generations whose record was committed, to start (durable, then start).
    starts_tx: mpsc::UnboundedSender<Started>,
    starts_rx: Option<mpsc::UnboundedReceiver<Started>>,
    /// Bytes of the specs and files of every job held.
    job_bytes: u64,
    last_retention: Instant,
    port_requests: HashMap<u64, (String, u64, String)>,
    log_requests: HashMap<u64, (String, LogTx)>,
    /// Placement must be re-evaluated (membership or slots changed).
    dirty: bool,
    /// Jobs changed since the last flush (to persist and publish).
    changed: BTreeSet<String>,
    /// Jobs whose progress changed since the last flush (to publish).
    progressed: BTreeSet<String>,
    /// Events an action raised while another event was applied (a node found unreachable, a
    /// port that could not be asked for): applied in order once that one is done, so that
    /// [`Core::apply`] is never re-entered.
    raised: std::collections::VecDeque<(String, Event)>,
    /// An event is being applied (checks the rule above in debug builds).
    applying: bool,
    started: Instant,
    /// Per-step facts of each job's ranks and its straggler detector (not job state).
    telemetry: HashMap<String, telemetry::Telemetry>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Core {
    /// Builds the loop from the persisted records, reconciling jobs that were running.
    pub fn new(
        cfg: CoreConfig,
        persist: Persister,
        loaded: Vec<(String, Vec<u8>)>,
        rendezvous: Rendezvous,
        ids: JobIds,
    ) -> Core {
        let now = Instant::now();
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        let (starts_tx, starts_rx) = mpsc::unbounded_channel();
        let mut core = Core {
            cfg,
            persist,
            rendezvous,
            nodes: BTreeMap::new(),
            jobs: BTreeMap::new(),
            watchers: HashMap::new(),
            next_conn: 1,
            next_request: 1,
            ids,
            unacked: BTreeSet::new(),
            acks_tx,
            acks_rx: Some(acks_rx),
            starts_tx,
            starts_rx: Some(starts_rx),
            job_bytes: 0,
            last_retention: now,
            port_requests: HashMap::new(),
            log_requests: HashMap::new(),
            dirty: true,
            changed: BTreeSet::new(),
            progressed: BTreeSet::new(),
            raised: std::collections::VecDeque::new(),
            applying: false,
            started: now,
            telemetry: HashMap::new(),
        };
        if let Some(hf) = &core.cfg.hostfile {
            for h in &hf.hosts {
                core.nodes.insert(h.name.clone(), Node::new(h.slots, now));
            }
        }
        let (job_records, loaded): (Vec<_>, Vec<_>) = loaded.into_iter().partition(|(k, _)| {
            k.starts_with(crate::job::record::HEADERS) || k.starts_with(crate::job::record::PARTS)
        });
        let decoded = crate::job::record::decode(job_records);
        for (key, error) in &decoded.unreadable {
            tracing::error!(key, error, "unreadable job record skipped");
        }
        for key in decoded.orphans {
            tracing::info!(
                key,
                "deleting a job record part that no header names (a job removed, or a save cut short)"
            );
            core.persist.delete(key);
        }
        for mut job in decoded.jobs {
            if job.state == JobState::Starting && job.master_port.is_none() {
                // Nothing was started yet: start over cleanly.
                job.state = JobState::Pending;
                job.ranks.replace(Vec::new());
                job.placement.clear();
                job.saved.placement_changed(job.generation);
            }
            if job.state.has_workers() {
                // Agents may run them: ending the generation takes a stop.
                job.workers_sent = true;
                job.ranks.for_each_mut(|r| {
                    if !r.state.is_done() {
                        r.state = RankState::Unknown;
                    }
                });
                // What is saved stays as it was until the job changes again.
                job.ranks.take_dirty();
                core.rendezvous.open(&job.id, job.generation);
            }
            tracing::info!(job = %job.id, generation = job.generation, state = job.state.as_str(), "recovered job");
            core.job_bytes += job_bytes(&job.spec, &job.files);
            core.cfg.metrics.seen(&job);
            core.jobs.insert(job.id.clone(), job);
        }
        let cordons: Vec<String> = loaded
            .iter()
            .filter_map(|(key, _)| key.strip_prefix(CORDONS).map(str::to_owned))
            .collect();
        for (key, value) in loaded {
            if let Some(name) = key.strip_prefix("nodes/")
                && let Ok(rec) = serde_json::from_slice::<NodeRecord>(&value)
            {
                let in_hostfile = core.cfg.hostfile.is_none() || core.nodes.contains_key(name);
                if in_hostfile {
                    let n = core.nodes.entry(name.to_owned()).or_insert_with(|| Node {
                        joined: true,
                        ..Node::new(rec.slots, now)
                    });
                    n.joined = true;
                    n.advertise_addr = rec.advertise_addr;
                    n.hostname = rec.hostname;
                    n.version = rec.version;
                }
            }
        }
        for name in cordons {
            if let Some(n) = core.nodes.get_mut(&name) {
                n.cordoned = true;
            }
        }
        core
    }

    /// Whether this coordinator was elected and its leadership has lapsed (it may have been
    /// replaced): then it acts on nothing.
    fn lapsed(&self) -> bool {
        // A leader whose writes stopped (fenced, or retries spent) is deposed too, even while
        // its lease is still renewed: `serve` is ending it.
        self.cfg
            .leading
            .as_ref()
            .is_some_and(|l| !l.valid() || self.persist.stopped().is_some())
    }

    /// Runs until every [`Handle`] is dropped.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        stopping: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopped = false;
        let mut acks = self.acks_rx.take().expect("the loop runs once");
        let mut starts = self.starts_rx.take().expect("the loop runs once");
        loop {
            tokio::select! {
                Some(ack) = acks.recv() => self.acked(ack),
                Some((id, generation, result)) = starts.recv() => {
                    self.durable(&id, generation, result);
                }
                cmd = rx.recv() => match cmd {
                    // A leader whose lease lapsed decides nothing: what it would conclude
                    // (nodes silent, sends failing) is an artefact of its own pause, and the
                    // server stops it within moments. Callers see their reply dropped.
                    Some(_) if self.lapsed() => {}
                    Some(cmd) => {
                        self.handle(cmd);
                        // Handle what queued up meanwhile before re-evaluating placements, so
                        // that a burst of joins costs one scheduling pass, not one per join.
                        let mut burst = 0;
                        while burst < 1024 {
                            match rx.try_recv() {
                                Ok(cmd) => self.handle(cmd),
                                Err(_) => break,
                            }
                            burst += 1;
                        }
                    }
                    None => break,
                },
                // Checked in the branch too: the guard was evaluated before a pause, and the
                // tick may be the first thing that runs after it.
                _ = tick.tick(), if !stopped && !self.lapsed() => {
                    if !self.lapsed() {
                        self.check_heartbeats();
                        self.restarts_due();
                        if self.last_retention.elapsed() >= RETENTION_EVERY {
                            self.last_retention = Instant::now();
                            self.retire_finished();
                        }
                    }
                }
                _ = stopping.cancelled(), if !stopped => {
                    // End every long-lived stream; agents keep their workers and reconnect
                    // to the next coordinator on this data dir.
                    stopped = true;
                    for n in self.nodes.values_mut() {
                        n.conn = None;
                    }
                    self.watchers.clear();
                    self.log_requests.clear();
                    let _ = self.persist.flush().wait().await;
                }
            }
            if self.dirty && !self.lapsed() {
                self.dirty = false;
                self.schedule();
            }
            self.flush_changed();
        }
        let _ = self.persist.flush().wait().await;
        // Dropping the persister joins its writer thread, which may be retrying a commit
        // against an unreachable store for a while: not on a runtime worker.
        drop(tokio::task::spawn_blocking(move || drop(self)));
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::AgentJoin {
                join,
                peer,
                tx,
                reply,
            } => {
                let r = self.agent_join(*join, peer, tx);
                let _ = reply.send(r);
            }
            Cmd::AgentMsg { node, conn, msg } => self.agent_msg(&node, conn, msg),
            Cmd::AgentGone { node, conn } => {
                if let Some(n) = self.nodes.get_mut(&node)
                    && n.conn.as_ref().is_some_and(|c| c.id == conn)
                {
                    n.conn = None;
                    tracing::info!(
                        node,
                        "agent disconnected; its workers are presumed running until the heartbeat timeout"
                    );
                    self.dirty = true;
                }
                let dead: Vec<u64> = self
                    .log_requests
                    .iter()
                    .filter(|(_, (n, _))| *n == node)
                    .map(|(id, _)| *id)
                    .collect();
                for id in dead {
                    if let Some((_, tx)) = self.log_requests.remove(&id) {
                        let _ = tx.try_send(Err(CoreError::Unavailable(format!(
                            "node {node} disconnected while sending the log"
                        ))));
                    }
                }
            }
            Cmd::Submit { spec, files, reply } => match self.submit(*spec, files) {
                Ok(id) => {
                    // Answered once the commit holding the job (and the id counter) is on
                    // disk; the loop goes on meanwhile.
                    let durable = self.persist.flush();
                    let acks = self.acks_tx.clone();
                    tokio::spawn(async move {
                        let result = durable.wait().await;
                        let _ = acks.send(Acked { id, result, reply });
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Cmd::Get { id, reply } => {
                let r = self.job_status(&id).ok_or_else(|| unknown_job(&id));
                let _ = reply.send(r);
            }
            Cmd::List { reply } => {
                let mut jobs: Vec<&Job> = self.jobs.values().collect();
                jobs.sort_by_key(|j| (j.created_unix_ms, j.id.clone()));
                let _ = reply.send(status::list(&jobs, LIST_BUDGET_BYTES));
            }
            Cmd::Metrics { reply } => {
                let mut nodes: BTreeMap<&'static str, u64> = BTreeMap::new();
                for n in self.node_statuses() {
                    *nodes.entry(n.state).or_default() += 1;
                }
                let nodes = nodes.into_iter().map(|(s, n)| (s.to_owned(), n)).collect();
                let facts = |job: &Job, rank: u32| {
                    self.telemetry_of(&job.id, job.generation)
                        .and_then(|t| t.rank(rank))
                };
                let mut snapshot = crate::metrics::Snapshot::of(self.jobs.values(), nodes, facts);
                for j in &mut snapshot.jobs {
                    j.mfu = self.job_mfu(&j.id);
                }
                snapshot.rendezvous = self.rendezvous.sizes();
                let _ = reply.send(snapshot);
            }
            Cmd::Events { id, after, reply } => {
                let r = match self.jobs.get(&id) {
                    None => Err(unknown_job(&id)),
                    Some(job) => Ok((
                        job.events.after(after).cloned().collect(),
                        job.state.is_terminal(),
                    )),
                };
                let _ = reply.send(r);
            }
            Cmd::Watch { id, reply } => {
                let r = match self.jobs.get(&id) {
                    None => Err(unknown_job(&id)),
                    Some(_) => {
                        let st = self.job_status(&id).expect("the job exists");
                        Ok(self
                            .watchers
                            .entry(id)
                            .or_insert_with(|| watch::channel(st).0)
                            .subscribe())
                    }
                };
                let _ = reply.send(r);
            }
            Cmd::Cancel {
                id,
                grace_ms,
                reply,
            } => {
                let r = if let Err(e) = self.writable() {
                    Err(e)
                } else if self.jobs.contains_key(&id) {
                    tracing::info!(job = %id, generation = self.jobs[&id].generation, "cancel requested");
                    self.apply(&id, Event::Cancel { grace_ms });
                    Ok(status::job_status(&self.jobs[&id]))
                } else {
                    Err(unknown_job(&id))
                };
                let _ = reply.send(r);
            }
            Cmd::Checkpoint { id, reply } => {
                let r = self.writable().and_then(|()| self.request_checkpoint(&id));
                let _ = reply.send(r);
            }
            Cmd::Nodes { reply } => {
                let _ = reply.send(self.node_statuses());
            }
            Cmd::Cordon {
                node,
                cordon,
                reply,
            } => {
                let r = self.writable().and_then(|()| self.cordon(&node, cordon));
                let _ = reply.send(r);
            }
            Cmd::Drain {
                node,
                grace_ms,
                reply,
            } => {
                let r = self.writable().and_then(|()| self.drain(&node, grace_ms));
                let _ = reply.send(r);
            }
            Cmd::Logs { req, tx, reply } => {
                let r = self.start_log_fetch(req, tx);
                let _ = reply.send(r);
            }
            Cmd::LogCredit { request_id, chunks } => {
                if let Some((node, _)) = self.log_requests.get(&request_id) {
                    let node = node.clone();
                    let credit = ToAgent::LogCredit { request_id, chunks };
                    if !self.send_to(&node, credit) {
                        // Without this credit the fetch would stall for good: end it, and
                        // the reader, seeing no eof, reports the log truncated.
                        self.log_requests.remove(&request_id);
                        self.send_to(&node, ToAgent::CancelFetch { request_id });
                    }
                }
            }
            Cmd::LogDone { request_id } => {
                if let Some((node, _)) = self.log_requests.remove(&request_id) {
                    self.send_to(&node, ToAgent::CancelFetch { request_id });
                }
            }
            Cmd::Progress(p) => self.progress(*p),
        }
    }
}

fn unknown_job(id: &str) -> CoreError {
    CoreError::UnknownJob(id.to_owned())
}

/// Spawns the loop; returns its handle and the task.
pub fn spawn(
    core: Core,
    stopping: tokio_util::sync::CancellationToken,
) -> (Handle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(4096);
    let task = tokio::spawn(core.run(rx, stopping));
    (Handle { tx }, task)
}

#[cfg(test)]
mod tests;
