//! The coordinator's loop: one task that owns membership, jobs and agent connections.
//!
//! gRPC handlers talk to it through a [`Handle`] (each command carries a oneshot for its reply);
//! nothing else mutates state, so no lock is held across an `.await`. Decisions about a job are
//! made by the pure [`crate::job::next`]; this loop turns its actions into messages to agents,
//! persists what changed and publishes status to watchers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ringmaster_hostfile::Hostfile;
use ringmaster_proto as pb;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use crate::job::{Action, CheckpointRef, Event, Job, JobState, RankState};
use crate::persist::{JobIds, Persister, WritesStopped};
use crate::placement::{self, Busy, NodeView};
use crate::server::limits::{JobLimits, show_bytes};
use crate::server::rendezvous::Rendezvous;
use crate::spec::{JobSpec, MAX_SPEC_BYTES};
use crate::status;

pub type AgentTx = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;
pub type LogTx = mpsc::Sender<Result<pb::LogChunk, Status>>;

/// Log chunks an agent may send for one fetch beyond what its reader has taken: the first
/// credit granted, and the most that wait in the coordinator for a slow reader.
pub const LOG_WINDOW_CHUNKS: u32 = 16;

/// Commands the gRPC handlers send to the loop.
pub enum Cmd {
    AgentJoin {
        join: pb::Join,
        peer: Option<SocketAddr>,
        tx: AgentTx,
        reply: oneshot::Sender<Result<(u64, pb::JoinAck), Status>>,
    },
    AgentMsg {
        node: String,
        conn: u64,
        msg: pb::agent_message::Msg,
    },
    AgentGone {
        node: String,
        conn: u64,
    },
    Submit {
        spec: JobSpec,
        files: BTreeMap<String, Vec<u8>>,
        reply: oneshot::Sender<Result<pb::JobStatus, Status>>,
    },
    Get {
        id: String,
        reply: oneshot::Sender<Result<pb::JobStatus, Status>>,
    },
    List {
        reply: oneshot::Sender<Vec<pb::JobStatus>>,
    },
    Watch {
        id: String,
        reply: oneshot::Sender<Result<watch::Receiver<pb::JobStatus>, Status>>,
    },
    Cancel {
        id: String,
        grace_ms: u64,
        reply: oneshot::Sender<Result<pb::JobStatus, Status>>,
    },
    Checkpoint {
        id: String,
        reply: oneshot::Sender<Result<pb::JobStatus, Status>>,
    },
    Nodes {
        reply: oneshot::Sender<Vec<pb::NodeStatus>>,
    },
    /// Starts a log fetch; replies with its request id. `tx` must hold
    /// [`LOG_WINDOW_CHUNKS`] + 2 items (the window, the final chunk and a disconnect error).
    Logs {
        req: pb::LogsRequest,
        tx: LogTx,
        reply: oneshot::Sender<Result<u64, Status>>,
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
    Progress(pb::Progress),
}

/// Cheap, cloneable access to the loop.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Cmd>,
}

impl Handle {
    /// Sends a command and waits for its reply.
    pub async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))
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
}

/// A submitted job's record reached the store (or could not): the submit can be answered.
struct Acked {
    id: String,
    result: Result<(), WritesStopped>,
    reply: oneshot::Sender<Result<pb::JobStatus, Status>>,
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
        }
    }

    fn alive(&self) -> bool {
        self.conn.is_some() && !self.lost
    }
}

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
    started: Instant,
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
            job_bytes: 0,
            last_retention: now,
            port_requests: HashMap::new(),
            log_requests: HashMap::new(),
            dirty: true,
            changed: BTreeSet::new(),
            progressed: BTreeSet::new(),
            started: now,
        };
        if let Some(hf) = &core.cfg.hostfile {
            for h in &hf.hosts {
                core.nodes.insert(h.name.clone(), Node::new(h.slots, now));
            }
        }
        for (key, value) in loaded {
            if let Some(id) = key.strip_prefix("jobs/") {
                match serde_json::from_slice::<Job>(&value) {
                    Ok(mut job) => {
                        if job.state == JobState::Starting && job.master_port.is_none() {
                            // Nothing was started yet: start over cleanly.
                            job.state = JobState::Pending;
                            job.ranks.clear();
                            job.placement.clear();
                        }
                        if job.state.has_workers() {
                            for r in &mut job.ranks {
                                if !r.state.is_done() {
                                    r.state = RankState::Unknown;
                                }
                            }
                            core.rendezvous.open(&job.id, job.generation);
                        }
                        tracing::info!(job = %job.id, generation = job.generation, state = job.state.as_str(), "recovered job");
                        core.job_bytes += job_bytes(&job.spec, &job.files);
                        core.jobs.insert(id.to_owned(), job);
                    }
                    Err(e) => tracing::error!(key, error = %e, "unreadable job record skipped"),
                }
            } else if let Some(name) = key.strip_prefix("nodes/")
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
        core
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
        loop {
            tokio::select! {
                Some(ack) = acks.recv() => self.acked(ack),
                cmd = rx.recv() => match cmd {
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
                _ = tick.tick(), if !stopped => {
                    self.check_heartbeats();
                    self.restarts_due();
                    if self.last_retention.elapsed() >= RETENTION_EVERY {
                        self.last_retention = Instant::now();
                        self.retire_finished();
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
            if self.dirty {
                self.dirty = false;
                self.schedule();
            }
            self.flush_changed();
        }
        let _ = self.persist.flush().wait().await;
    }

    fn handle(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::AgentJoin {
                join,
                peer,
                tx,
                reply,
            } => {
                let r = self.agent_join(join, peer, tx);
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
                        let _ = tx.try_send(Err(Status::unavailable(format!(
                            "node {node} disconnected while sending the log"
                        ))));
                    }
                }
            }
            Cmd::Submit { spec, files, reply } => match self.submit(spec, files) {
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
                let r = self
                    .jobs
                    .get(&id)
                    .map(status::job_status)
                    .ok_or_else(|| unknown_job(&id));
                let _ = reply.send(r);
            }
            Cmd::List { reply } => {
                let mut jobs: Vec<&Job> = self.jobs.values().collect();
                jobs.sort_by_key(|j| (j.created_unix_ms, j.id.clone()));
                let _ = reply.send(status::list(&jobs, LIST_BUDGET_BYTES));
            }
            Cmd::Watch { id, reply } => {
                let r = match self.jobs.get(&id) {
                    None => Err(unknown_job(&id)),
                    Some(job) => {
                        let st = status::job_status(job);
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
            Cmd::Logs { req, tx, reply } => {
                let r = self.start_log_fetch(req, tx);
                let _ = reply.send(r);
            }
            Cmd::LogCredit { request_id, chunks } => {
                if let Some((node, _)) = self.log_requests.get(&request_id) {
                    let node = node.clone();
                    let credit = pb::coordinator_message::Msg::LogCredit(pb::LogCredit {
                        request_id,
                        chunks,
                    });
                    if !self.send_to(&node, credit) {
                        // Without this credit the fetch would stall for good: end it, and
                        // the reader, seeing no eof, reports the log truncated.
                        self.log_requests.remove(&request_id);
                        self.send_to(
                            &node,
                            pb::coordinator_message::Msg::CancelFetch(pb::CancelFetch {
                                request_id,
                            }),
                        );
                    }
                }
            }
            Cmd::LogDone { request_id } => {
                if let Some((node, _)) = self.log_requests.remove(&request_id) {
                    self.send_to(
                        &node,
                        pb::coordinator_message::Msg::CancelFetch(pb::CancelFetch { request_id }),
                    );
                }
            }
            Cmd::Progress(p) => self.progress(p),
        }
    }

    // ───────────── membership ─────────────

    fn agent_join(
        &mut self,
        join: pb::Join,
        peer: Option<SocketAddr>,
        tx: AgentTx,
    ) -> Result<(u64, pb::JoinAck), Status> {
        let name = join.name.clone();
        if !crate::spec::is_safe_name(&name) {
            return Err(Status::invalid_argument(format!(
                "node name '{name}' is not valid: use 1-63 characters of A-Z a-z 0-9 . _ -"
            )));
        }
        // The agent refuses `--slots` above the same limit; a raw Join may not get past it.
        const _: () =
            assert!(ringmaster_agent::MAX_SLOTS == ringmaster_hostfile::hostfile::MAX_SLOTS);
        if join.slots > ringmaster_agent::MAX_SLOTS {
            return Err(Status::resource_exhausted(format!(
                "node '{}' announces {} slots, above the limit of {} slots per agent",
                name,
                join.slots,
                ringmaster_agent::MAX_SLOTS
            )));
        }
        if let Some(hf) = &self.cfg.hostfile
            && !hf.hosts.iter().any(|h| h.name == name)
        {
            let known: Vec<&str> = hf.hosts.iter().map(|h| h.name.as_str()).collect();
            return Err(Status::permission_denied(format!(
                "node '{name}' is not in the coordinator's hostfile (hosts: {})",
                known.join(", ")
            )));
        }
        let now = Instant::now();
        if let Some(n) = self.nodes.get(&name)
            && n.conn.is_some()
            && n.incarnation != join.incarnation
            && now.duration_since(n.last_seen) < self.cfg.heartbeat_timeout
        {
            return Err(Status::already_exists(format!(
                "node name '{name}' is already joined by another live agent ({}); give each agent its own --name",
                n.advertise_addr
            )));
        }
        let advertise = if join.advertise_addr.is_empty() {
            peer.map(|p| p.ip().to_string()).unwrap_or_default()
        } else {
            join.advertise_addr.clone()
        };
        let hostfile_slots = self
            .cfg
            .hostfile
            .as_ref()
            .and_then(|hf| hf.hosts.iter().find(|h| h.name == name).map(|h| h.slots));
        let slots = match hostfile_slots {
            Some(s) => {
                if s != join.slots {
                    tracing::warn!(node = %name, hostfile = s, announced = join.slots, "agent announces a different slot count; the hostfile's count rules");
                }
                s
            }
            None => join.slots.max(1),
        };
        let conn_id = self.next_conn;
        self.next_conn += 1;
        let previous_incarnation = self.nodes.get(&name).map(|n| n.incarnation.clone());
        let node = self
            .nodes
            .entry(name.clone())
            .or_insert_with(|| Node::new(slots, now));
        let rejoin = node.joined;
        node.slots = slots;
        node.announced_slots = join.slots;
        node.advertise_addr = advertise.clone();
        node.hostname = join.hostname.clone();
        node.version = join.version.clone();
        node.incarnation = join.incarnation.clone();
        node.conn = Some(AgentConn {
            id: conn_id,
            tx: tx.clone(),
        });
        node.last_seen = now;
        node.joined = true;
        node.lost = false;
        node.running_workers = join.running.len() as u32;
        tracing::info!(
            node = %name,
            slots,
            addr = %advertise,
            running = join.running.len(),
            rejoin,
            "agent joined"
        );
        let rec = NodeRecord {
            name: name.clone(),
            slots,
            advertise_addr: advertise,
            hostname: join.hostname.clone(),
            version: join.version.clone(),
        };
        self.persist.put(
            format!("nodes/{name}"),
            serde_json::to_vec(&rec).expect("node record serializes"),
        );
        self.dirty = true;

        // The JoinAck goes first on the stream, before anything reconciliation sends.
        let ack = pb::JoinAck {
            slots,
            heartbeat_interval_ms: (self.cfg.heartbeat_timeout.as_millis() as u64 / 4)
                .clamp(50, 5_000),
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            rendezvous_addr: String::new(),
        };
        let _ = tx.try_send(Ok(pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::JoinAck(ack.clone())),
        }));

        // Reconcile what the agent runs with what the jobs expect.
        let restarted =
            previous_incarnation.is_some_and(|p| !p.is_empty() && p != join.incarnation);
        self.reconcile(&name, &join, restarted);
        Ok((conn_id, ack))
    }

    fn reconcile(&mut self, node: &str, join: &pb::Join, restarted: bool) {
        let mut reported: BTreeSet<(String, u64, u32)> = BTreeSet::new();
        for w in &join.running {
            reported.insert((w.job_id.clone(), w.generation, w.rank));
            let current = self.jobs.get(&w.job_id).is_some_and(|j| {
                j.state.has_workers() && j.generation == w.generation && !j.stopping
            });
            if current {
                self.apply(
                    &w.job_id,
                    Event::WorkerStarted {
                        generation: w.generation,
                        rank: w.rank,
                        pid: w.pid,
                    },
                );
            } else {
                tracing::warn!(node, job = %w.job_id, generation = w.generation, rank = w.rank, "agent runs a worker of an ended generation; stopping it");
                self.send_to(
                    node,
                    pb::coordinator_message::Msg::StopWorkers(pb::StopWorkers {
                        job_id: w.job_id.clone(),
                        generation: w.generation,
                        grace_ms: crate::job::ABORT_GRACE_MS,
                        reason: "generation ended while the agent was away".into(),
                    }),
                );
            }
        }
        for e in &join.exited_while_away {
            reported.insert((e.job_id.clone(), e.generation, e.rank));
            self.worker_exited(e.clone());
        }
        // Ranks this node should be running that the agent does not know of are gone.
        let mut lost: Vec<(String, Vec<u32>)> = Vec::new();
        for job in self.jobs.values() {
            if !job.state.has_workers() {
                continue;
            }
            let ranks: Vec<u32> = job
                .ranks
                .iter()
                .filter(|r| r.node == node && !r.state.is_done())
                .filter(|r| r.state != RankState::Starting || restarted || r.pid.is_some())
                .filter(|r| !reported.contains(&(job.id.clone(), job.generation, r.rank)))
                .map(|r| r.rank)
                .collect();
            if !ranks.is_empty() {
                lost.push((job.id.clone(), ranks));
            }
        }
        for (id, ranks) in lost {
            let message = if restarted {
                format!("agent on {node} restarted; ranks {ranks:?} are gone")
            } else {
                format!("agent on {node} reconnected without ranks {ranks:?}")
            };
            self.apply(
                &id,
                Event::RanksLost {
                    node: node.to_owned(),
                    ranks,
                    message,
                },
            );
        }
    }

    fn check_heartbeats(&mut self) {
        let now = Instant::now();
        let timeout = self.cfg.heartbeat_timeout;
        let mut newly_lost = Vec::new();
        for (name, n) in &mut self.nodes {
            if n.lost || !n.joined {
                continue;
            }
            if now.duration_since(n.last_seen) > timeout {
                n.lost = true;
                n.conn = None;
                newly_lost.push(name.clone());
            }
        }
        for name in newly_lost {
            let since =
                humantime::format_duration(Duration::from_millis(timeout.as_millis() as u64));
            let never = self.started.elapsed() <= timeout + Duration::from_millis(500);
            tracing::warn!(node = %name, "node lost: no heartbeat for {since}");
            self.dirty = true;
            let affected: Vec<(String, Vec<u32>)> = self
                .jobs
                .values()
                .filter(|j| j.state.has_workers())
                .map(|j| {
                    (
                        j.id.clone(),
                        j.ranks
                            .iter()
                            .filter(|r| r.node == name && !r.state.is_done())
                            .map(|r| r.rank)
                            .collect::<Vec<_>>(),
                    )
                })
                .filter(|(_, r)| !r.is_empty())
                .collect();
            for (id, ranks) in affected {
                let message = if never {
                    format!(
                        "node {name} lost: its agent did not come back within {since} of the coordinator's restart"
                    )
                } else {
                    format!("node {name} lost: no heartbeat for {since}")
                };
                self.apply(
                    &id,
                    Event::RanksLost {
                        node: name.clone(),
                        ranks,
                        message,
                    },
                );
            }
        }
    }

    fn node_statuses(&self) -> Vec<pb::NodeStatus> {
        let now = Instant::now();
        let mut names: Vec<&String> = self.nodes.keys().collect();
        if self.cfg.hostfile.is_none() {
            names.sort_by(|a, b| ringmaster_hostfile::natural_cmp(a, b));
        } else if let Some(hf) = &self.cfg.hostfile {
            names = hf.hosts.iter().map(|h| &h.name).collect();
        }
        names
            .into_iter()
            .filter_map(|name| {
                let n = self.nodes.get(name)?;
                let state = if n.alive() {
                    "JOINED"
                } else if n.lost {
                    "LOST"
                } else if n.joined {
                    "DISCONNECTED"
                } else {
                    "EXPECTED"
                };
                Some(pb::NodeStatus {
                    name: name.clone(),
                    slots: n.slots,
                    state: state.into(),
                    advertise_addr: n.advertise_addr.clone(),
                    version: n.version.clone(),
                    last_heartbeat_ms_ago: n
                        .joined
                        .then(|| now.duration_since(n.last_seen).as_millis() as u64),
                    running_workers: n.running_workers,
                    hostname: n.hostname.clone(),
                })
            })
            .collect()
    }

    fn send_to(&mut self, node: &str, msg: pb::coordinator_message::Msg) -> bool {
        let Some(conn) = self.nodes.get(node).and_then(|n| n.conn.as_ref()) else {
            return false;
        };
        match conn
            .tx
            .try_send(Ok(pb::CoordinatorMessage { msg: Some(msg) }))
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(node, error = %e, "could not send to agent");
                false
            }
        }
    }

    // ───────────── agent messages ─────────────

    fn agent_msg(&mut self, node: &str, conn: u64, msg: pb::agent_message::Msg) {
        use pb::agent_message::Msg;
        match self.nodes.get_mut(node) {
            Some(n) if n.conn.as_ref().is_some_and(|c| c.id == conn) => {
                n.last_seen = Instant::now();
            }
            _ => return, // a superseded connection
        }
        match msg {
            Msg::Heartbeat(hb) => {
                if let Some(n) = self.nodes.get_mut(node) {
                    n.running_workers = hb.running_workers;
                }
            }
            Msg::WorkerStarted(w) => {
                let current = self
                    .jobs
                    .get(&w.job_id)
                    .is_some_and(|j| j.generation == w.generation && j.state.has_workers());
                if current {
                    tracing::info!(job = %w.job_id, generation = w.generation, rank = w.rank, pid = w.pid, node, "worker started");
                    self.apply(
                        &w.job_id,
                        Event::WorkerStarted {
                            generation: w.generation,
                            rank: w.rank,
                            pid: w.pid,
                        },
                    );
                } else {
                    self.send_to(
                        node,
                        pb::coordinator_message::Msg::StopWorkers(pb::StopWorkers {
                            job_id: w.job_id,
                            generation: w.generation,
                            grace_ms: 0,
                            reason: "generation already ended".into(),
                        }),
                    );
                }
            }
            Msg::WorkerExited(e) => self.worker_exited(e),
            Msg::StartFailed(f) => {
                tracing::warn!(job = %f.job_id, generation = f.generation, rank = f.rank, node, "worker failed to start: {}", f.message);
                self.apply(
                    &f.job_id.clone(),
                    Event::StartFailed {
                        generation: f.generation,
                        rank: f.rank,
                        message: f.message,
                    },
                );
            }
            Msg::PortAllocated(p) => {
                if let Some((job, generation, node0)) = self.port_requests.remove(&p.request_id) {
                    let event = if p.error.is_empty() && p.port != 0 {
                        let addr = self
                            .nodes
                            .get(&node0)
                            .map(|n| n.advertise_addr.clone())
                            .unwrap_or_default();
                        Event::PortAllocated {
                            generation,
                            addr,
                            port: p.port,
                        }
                    } else {
                        Event::PortFailed {
                            generation,
                            message: format!("agent on {node0}: {}", p.error),
                        }
                    };
                    self.apply(&job, event);
                }
            }
            Msg::LogChunk(c) => {
                // The agent sends data only against credits, and the reader's channel holds
                // the whole window: a full channel means an agent that ignores its credits.
                // The fetch then ends without eof, which its reader reports as a truncation.
                let eof = c.eof;
                let id = c.request_id;
                let failed = match self.log_requests.get(&id) {
                    Some((_, tx)) => {
                        let r = if c.error.is_empty() {
                            Ok(c)
                        } else {
                            Err(Status::failed_precondition(c.error))
                        };
                        tx.try_send(r).is_err()
                    }
                    None => true,
                };
                if eof {
                    self.log_requests.remove(&id);
                } else if failed {
                    self.log_requests.remove(&id);
                    self.send_to(
                        node,
                        pb::coordinator_message::Msg::CancelFetch(pb::CancelFetch {
                            request_id: id,
                        }),
                    );
                }
            }
            Msg::Join(_) => {
                tracing::warn!(node, "agent sent a second Join on one stream; ignored");
            }
        }
    }

    fn worker_exited(&mut self, e: pb::WorkerExited) {
        let Some(job) = self.jobs.get(&e.job_id) else {
            return;
        };
        if job.generation != e.generation {
            return;
        }
        let level_fail = e.exit_code != Some(0) || e.signal.is_some();
        if level_fail && !job.stopping && !job.state.is_terminal() {
            tracing::warn!(job = %e.job_id, generation = e.generation, rank = e.rank, exit_code = ?e.exit_code, signal = ?e.signal, "worker failed");
        } else {
            tracing::info!(job = %e.job_id, generation = e.generation, rank = e.rank, exit_code = ?e.exit_code, signal = ?e.signal, "worker exited");
        }
        self.apply(
            &e.job_id.clone(),
            Event::WorkerExited {
                generation: e.generation,
                rank: e.rank,
                exit_code: e.exit_code,
                signal: e.signal,
                log_tail: e.log_tail,
            },
        );
    }

    /// `ringctl checkpoint`: SIGUSR1 to every worker of the running generation. Each trainer
    /// raises a flag that travels with the next step's loss all-reduce, so that every rank
    /// checkpoints after the same step; the commit comes back as `last_checkpoint`.
    fn request_checkpoint(&mut self, id: &str) -> Result<pb::JobStatus, Status> {
        let Some(job) = self.jobs.get(id) else {
            return Err(unknown_job(id));
        };
        if job.spec.train.is_none() {
            return Err(Status::invalid_argument(format!(
                "job {id} runs a command, not the trainer: only `train:` jobs can be asked to                  checkpoint"
            )));
        }
        if job.state != JobState::Running || job.stopping {
            return Err(Status::failed_precondition(format!(
                "job {id} is {}{}: a checkpoint can be requested only while it is RUNNING",
                job.state.as_str(),
                if job.stopping { " (stopping)" } else { "" }
            )));
        }
        let generation = job.generation;
        let nodes = job.nodes();
        tracing::info!(job = %id, generation, "checkpoint requested");
        let mut unreachable = Vec::new();
        for node in nodes {
            let sent = self.send_to(
                &node,
                pb::coordinator_message::Msg::SignalWorkers(pb::SignalWorkers {
                    job_id: id.to_owned(),
                    generation,
                    signal: nix::sys::signal::Signal::SIGUSR1 as i32,
                    reason: "checkpoint requested".into(),
                }),
            );
            if !sent {
                unreachable.push(node);
            }
        }
        if !unreachable.is_empty() {
            return Err(Status::unavailable(format!(
                "node(s) {} not connected: the request did not reach every rank (the ranks that                  got it wait for the others at the next step, so none checkpoints alone)",
                unreachable.join(", ")
            )));
        }
        Ok(status::job_status(&self.jobs[id]))
    }

    fn progress(&mut self, p: pb::Progress) {
        let Some(scope) = p.scope.as_ref() else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&scope.job_id) else {
            return;
        };
        if job.generation != scope.generation {
            return;
        }
        // Once a finished job's processes are all gone, nothing may report for it (a leaked
        // worker credential must not move its checkpoint afterwards). Reports still count while
        // a cancelled job's ranks are exiting: they commit their last checkpoint then.
        if job.state.is_terminal() && job.ranks.iter().all(|r| r.state.is_done()) {
            return;
        }
        if let Some(r) = job.ranks.get_mut(p.rank as usize) {
            r.step = Some(p.step);
            r.collective_seq = Some(p.collective_seq);
            r.last_report_ms = Some(now_ms());
        }
        let mut persist = false;
        if p.rank == 0
            && let Some(c) = &p.committed_checkpoint
            && job
                .last_checkpoint
                .as_ref()
                .is_none_or(|l| l.path != c.path)
            && checkpoint_path_allowed(job, &c.path)
                .inspect_err(|why| {
                    tracing::warn!(job = %job.id, generation = job.generation, path = %c.path, "reported checkpoint refused: {why}");
                })
                .is_ok()
        {
            tracing::info!(job = %job.id, generation = job.generation, step = c.step, path = %c.path, "checkpoint committed");
            job.last_checkpoint = Some(CheckpointRef {
                step: c.step,
                path: c.path.clone(),
            });
            persist = true;
        }
        if p.rank == 0
            && let Some(r) = &p.resume
        {
            let from = r.from.as_ref().map(|c| CheckpointRef {
                step: c.step,
                path: c.path.clone(),
            });
            if job.resumed_from != from {
                job.resumed_from = from;
                let generation = job.generation;
                for w in &r.skipped {
                    tracing::warn!(job = %job.id, generation, "resume skipped {w}");
                    job.checkpoint_warnings.push(crate::job::cap(
                        format!("generation {generation}: skipped {w}"),
                        crate::job::MAX_WARNING_BYTES,
                    ));
                }
                let n = job.checkpoint_warnings.len();
                if n > crate::job::MAX_CHECKPOINT_WARNINGS {
                    job.checkpoint_warnings
                        .drain(..n - crate::job::MAX_CHECKPOINT_WARNINGS);
                }
                persist = true;
            }
        }
        if p.rank == 0 {
            job.progress.step = Some(p.step);
            job.progress.total_steps = (p.total_steps > 0).then_some(p.total_steps);
            job.progress.loss = p.loss;
            job.progress.tokens_per_second = Some(p.tokens_per_second);
        }
        job.updated_unix_ms = now_ms();
        let id = job.id.clone();
        // Progress is published, not persisted: it changes every step. Checkpoints are both.
        if persist {
            self.save(&id);
        } else {
            self.progressed.insert(id);
        }
    }

    // ───────────── jobs ─────────────

    /// Validates and records a job; returns its id. The job is scheduled, and the submit
    /// answered, once its record is on disk ([`Core::acked`]).
    fn submit(
        &mut self,
        spec: JobSpec,
        files: BTreeMap<String, Vec<u8>>,
    ) -> Result<String, Status> {
        self.writable()?;
        let train = spec
            .validate("job spec")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(train) = &train {
            crate::spec::validate_files(train, &files, "job spec")
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let size = job_bytes(&spec, &files);
        if size > MAX_SPEC_BYTES as u64 {
            return Err(Status::invalid_argument(format!(
                "job spec and files total {size} bytes, above the limit of {} per job",
                show_bytes(MAX_SPEC_BYTES as u64)
            )));
        }
        if let Some(hf) = &self.cfg.hostfile {
            placement::check_against_hostfile(&spec, hf)
                .map_err(|e| Status::invalid_argument(format!("job spec: {e}")))?;
        }
        self.make_room(size)?;
        let n = self.ids.take().map_err(|e| {
            tracing::error!(error = %e, "cannot hand out a job id");
            Status::unavailable(format!("cannot hand out a job id: {e}"))
        })?;
        let base = spec.name.clone().unwrap_or_else(|| "job".to_owned());
        let base: String = base.chars().take(50).collect();
        let id = format!("{base}-{n}");
        self.persist.put(
            "meta/coordinator".into(),
            serde_json::to_vec(&Meta {
                next_job: self.ids.next(),
            })
            .expect("meta serializes"),
        );
        let job = Job::new(id.clone(), spec, files, now_ms());
        tracing::info!(job = %id, generation = 0, "job submitted");
        self.job_bytes += size;
        self.jobs.insert(id.clone(), job);
        self.unacked.insert(id.clone());
        self.save(&id);
        self.flush_changed();
        Ok(id)
    }

    /// A submitted job's record is on disk, or cannot be: answer the submit. A job that could
    /// not be saved was never acknowledged, so it is dropped.
    fn acked(&mut self, ack: Acked) {
        let Acked { id, result, reply } = ack;
        self.unacked.remove(&id);
        let r = match result {
            Ok(()) => {
                self.dirty = true;
                self.jobs
                    .get(&id)
                    .map(status::job_status)
                    .ok_or_else(|| unknown_job(&id))
            }
            Err(stopped) => {
                tracing::error!(job = %id, "submit refused: {stopped}");
                self.remove_job(&id);
                Err(Status::unavailable(stopped.to_string()))
            }
        };
        let _ = reply.send(r);
    }

    /// Refuses a write (submit, cancel, checkpoint) once the state writer has stopped.
    fn writable(&self) -> Result<(), Status> {
        match self.persist.stopped() {
            Some(stopped) => Err(Status::unavailable(stopped.to_string())),
            None => Ok(()),
        }
    }

    /// Finished jobs that may be removed (no worker of theirs can be alive), oldest first.
    fn retirable(&self) -> Vec<(u64, String)> {
        let mut v: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| j.state.is_terminal() && j.ranks.iter().all(|r| r.state.is_done()))
            .map(|j| {
                (
                    j.finished_unix_ms.unwrap_or(j.updated_unix_ms),
                    j.id.clone(),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Makes room for one more job of `size` bytes under `--max-jobs` and `--max-job-bytes`,
    /// removing the oldest finished jobs if need be.
    fn make_room(&mut self, size: u64) -> Result<(), Status> {
        let limits = self.cfg.job_limits;
        let full =
            |c: &Core| c.jobs.len() >= limits.max_jobs || c.job_bytes + size > limits.max_job_bytes;
        if !full(self) {
            return Ok(());
        }
        for (_, id) in self.retirable() {
            tracing::info!(job = %id, "removing a finished job to make room for a new one");
            self.remove_job(&id);
            if !full(self) {
                return Ok(());
            }
        }
        if self.jobs.len() >= limits.max_jobs {
            return Err(Status::resource_exhausted(format!(
                "the coordinator holds {} unfinished jobs, the limit (--max-jobs {}); wait for \
                 jobs to finish or cancel some",
                self.jobs.len(),
                limits.max_jobs
            )));
        }
        Err(Status::resource_exhausted(format!(
            "job specs and files of the unfinished jobs take {}, and this job's {size} bytes \
             would go above the limit of {} (--max-job-bytes)",
            show_bytes(self.job_bytes),
            show_bytes(limits.max_job_bytes)
        )))
    }

    /// Removes finished jobs beyond `--retain-finished-jobs` or older than
    /// `--retain-finished-for`, from memory and the store. Their logs stay on the agents.
    fn retire_finished(&mut self) {
        let limits = self.cfg.job_limits;
        let now = now_ms();
        let retain_ms = u64::try_from(limits.retain_for.as_millis()).unwrap_or(u64::MAX);
        let finished = self.retirable();
        let excess = finished.len().saturating_sub(limits.retain_finished);
        for (i, (at, id)) in finished.into_iter().enumerate() {
            if i < excess || now.saturating_sub(at) > retain_ms {
                tracing::info!(job = %id, "removing a finished job (retention limits)");
                self.remove_job(&id);
            }
        }
    }

    /// Forgets a job: memory, store, watchers, rendezvous.
    fn remove_job(&mut self, id: &str) {
        if let Some(job) = self.jobs.remove(id) {
            self.job_bytes = self
                .job_bytes
                .saturating_sub(job_bytes(&job.spec, &job.files));
        }
        self.unacked.remove(id);
        self.changed.remove(id);
        self.progressed.remove(id);
        self.watchers.remove(id);
        self.rendezvous.forget(id);
        self.persist.delete(format!("jobs/{id}"));
    }

    /// Hands the jobs whose restart backoff ran out to the state machine.
    fn restarts_due(&mut self) {
        let now = now_ms();
        let due: Vec<String> = self
            .jobs
            .values()
            .filter(|j| {
                j.state == JobState::Restarting && j.restart_not_before_ms.is_some_and(|t| now >= t)
            })
            .map(|j| j.id.clone())
            .collect();
        for id in due {
            self.apply(&id, Event::Tick);
        }
    }

    fn busy(&self) -> Busy {
        let mut busy = Busy::new();
        for j in self.jobs.values() {
            // A job holds its slots while any worker of it may be alive.
            let holds = j.state.has_workers() || j.ranks.iter().any(|r| !r.state.is_done());
            if !holds {
                continue;
            }
            for s in &j.placement {
                for slot in &s.slots {
                    busy.entry(s.name.clone())
                        .or_default()
                        .insert(*slot, j.id.clone());
                }
            }
        }
        busy
    }

    /// Offers a placement to every job waiting for one, oldest first.
    fn schedule(&mut self) {
        let mut waiting: Vec<(u64, String)> = self
            .jobs
            .values()
            .filter(|j| !self.unacked.contains(&j.id))
            .filter(|j| {
                j.state == JobState::Pending
                    || (j.state == JobState::Restarting
                        && j.restart_not_before_ms.is_none()
                        && j.ranks.iter().all(|r| r.state.is_done()))
            })
            .map(|j| (j.created_unix_ms, j.id.clone()))
            .collect();
        waiting.sort();
        for (_, id) in waiting {
            let views: BTreeMap<String, NodeView> = self
                .nodes
                .iter()
                .map(|(k, n)| {
                    (
                        k.clone(),
                        NodeView {
                            slots: n.slots,
                            alive: n.alive(),
                        },
                    )
                })
                .collect();
            let mut busy = self.busy();
            // A restarting job's own old slots do not block it.
            for m in busy.values_mut() {
                m.retain(|_, j| *j != id);
            }
            let placement = placement::place(
                &self.jobs[&id].spec,
                self.cfg.hostfile.as_ref(),
                &views,
                &busy,
            );
            self.apply(&id, Event::Placement(placement));
        }
    }

    /// Feeds an event to a job's state machine and carries out the actions.
    fn apply(&mut self, id: &str, event: Event) {
        let Some(job) = self.jobs.remove(id) else {
            return;
        };
        let before = job.clone();
        let (mut job, actions) = crate::job::next(job, event, now_ms());
        let changed = job != before;
        if changed {
            job.updated_unix_ms = now_ms();
            if job.state != before.state {
                tracing::info!(
                    job = %job.id,
                    generation = job.generation,
                    from = before.state.as_str(),
                    to = job.state.as_str(),
                    reason = job.pending_reason.as_deref().unwrap_or(""),
                    "job state"
                );
                if job.state.is_terminal() || job.state == JobState::Restarting {
                    self.dirty = true;
                }
            }
            if job.stopping != before.stopping {
                self.dirty = true;
            }
        }
        self.jobs.insert(id.to_owned(), job);
        for a in actions {
            self.act(id, a);
        }
        if changed {
            self.save(id);
        }
    }

    fn act(&mut self, id: &str, action: Action) {
        match action {
            Action::AllocatePort { generation, node } => {
                let rid = self.next_request;
                self.next_request += 1;
                let sent = self.send_to(
                    &node,
                    pb::coordinator_message::Msg::AllocatePort(pb::AllocatePort {
                        request_id: rid,
                    }),
                );
                if sent {
                    self.port_requests
                        .insert(rid, (id.to_owned(), generation, node));
                } else {
                    self.apply(
                        id,
                        Event::PortFailed {
                            generation,
                            message: format!("node {node} is not connected"),
                        },
                    );
                }
            }
            Action::StartWorkers { generation } => self.start_workers(id, generation),
            Action::Reschedule => self.dirty = true,
            Action::StopWorkers {
                generation,
                nodes,
                grace_ms,
            } => {
                let mut unreachable = Vec::new();
                for node in nodes {
                    let sent = self.send_to(
                        &node,
                        pb::coordinator_message::Msg::StopWorkers(pb::StopWorkers {
                            job_id: id.to_owned(),
                            generation,
                            grace_ms,
                            reason: "generation ended".into(),
                        }),
                    );
                    if !sent {
                        unreachable.push(node);
                    }
                }
                for node in unreachable {
                    let ranks: Vec<u32> = self.jobs[id]
                        .ranks
                        .iter()
                        .filter(|r| r.node == node && !r.state.is_done())
                        .map(|r| r.rank)
                        .collect();
                    if !ranks.is_empty() {
                        self.apply(
                            id,
                            Event::RanksLost {
                                node: node.clone(),
                                ranks,
                                message: format!("node {node} unreachable during teardown"),
                            },
                        );
                    }
                }
            }
            Action::CloseGeneration { generation } => {
                // A generation ended by a failure: its trainers abort their collectives at once
                // (their progress streams end with ABORTED) instead of waiting out a timeout
                // for a peer that is gone. A cancel lets them checkpoint, a success is done.
                if let Some(j) = self.jobs.get(id)
                    && matches!(j.state, JobState::Restarting | JobState::Failed)
                    && j.generation == generation
                {
                    let reason = j
                        .failure
                        .as_ref()
                        .map(|f| f.message.clone())
                        .unwrap_or_else(|| "the job failed".into());
                    self.rendezvous.abort(id, generation, &reason);
                }
                self.rendezvous.close(id, generation);
            }
        }
    }

    fn start_workers(&mut self, id: &str, generation: u64) {
        if let Some(j) = self.jobs.get_mut(id) {
            // The new generation reports where it resumed from.
            j.resumed_from = None;
        }
        let job = &self.jobs[id];
        self.rendezvous.open(id, generation);
        let ranks: Vec<pb::RankEntry> = job
            .ranks
            .iter()
            .map(|r| pb::RankEntry {
                rank: r.rank,
                local_rank: r.local_rank,
                node_rank: r.node_rank,
                node: r.node.clone(),
                slot: r.slot,
            })
            .collect();
        let (program, train_config) = match (&job.spec.command, &job.spec.train) {
            (Some(cmd), _) => (cmd.clone(), String::new()),
            (None, Some(train)) => (
                Vec::new(),
                serde_json::to_string(train).expect("training config serializes"),
            ),
            (None, None) => (Vec::new(), String::new()),
        };
        let msg = pb::StartWorkers {
            job_id: id.to_owned(),
            generation,
            restart_count: job.restart_count,
            max_restarts: job.spec.max_restarts,
            world_size: job.world_size(),
            nnodes: job.placement.len() as u32,
            master_addr: job.master_addr.clone().unwrap_or_default(),
            master_port: job.master_port.unwrap_or_default(),
            ranks,
            program,
            env: job.spec.env.clone().into_iter().collect(),
            train_config,
            files: job.files.clone().into_iter().collect(),
            rendezvous_addr: String::new(),
            resume_from: job
                .last_checkpoint
                .as_ref()
                .map(|c| c.path.clone())
                .unwrap_or_default(),
            job_name: job.name.clone(),
            worker_token: self.cfg.creds.worker_token(id, generation),
            workdir: job.spec.workdir.clone().unwrap_or_default(),
        };
        tracing::info!(job = %id, generation, world_size = msg.world_size, master = %format!("{}:{}", msg.master_addr, msg.master_port), "starting workers");
        let nodes = job.nodes();
        let mut unreachable = Vec::new();
        // Each agent gets only its own ranks: the message stays O(local ranks), so that a
        // 1,000-node start is 1,000 small messages, not 1,000 copies of the whole table.
        let mut by_node: BTreeMap<String, Vec<pb::RankEntry>> = BTreeMap::new();
        for r in msg.ranks {
            by_node.entry(r.node.clone()).or_default().push(r);
        }
        let template = pb::StartWorkers {
            ranks: Vec::new(),
            ..msg
        };
        for node in nodes {
            let m = pb::StartWorkers {
                ranks: by_node.remove(&node).unwrap_or_default(),
                ..template.clone()
            };
            if !self.send_to(&node, pb::coordinator_message::Msg::StartWorkers(m)) {
                unreachable.push(node);
            }
        }
        for node in unreachable {
            let ranks: Vec<u32> = self.jobs[id]
                .ranks
                .iter()
                .filter(|r| r.node == node)
                .map(|r| r.rank)
                .collect();
            self.apply(
                id,
                Event::RanksLost {
                    node: node.clone(),
                    ranks,
                    message: format!("node {node} not connected when the generation started"),
                },
            );
        }
    }

    fn start_log_fetch(&mut self, req: pb::LogsRequest, tx: LogTx) -> Result<u64, Status> {
        let job = self
            .jobs
            .get(&req.job_id)
            .ok_or_else(|| unknown_job(&req.job_id))?;
        let generation = req.generation.unwrap_or(job.generation);
        let node = if generation == job.generation {
            job.ranks
                .iter()
                .find(|r| r.rank == req.rank)
                .map(|r| r.node.clone())
        } else {
            None
        };
        let Some(node) = node.or_else(|| {
            job.past_nodes(generation)
                .and_then(|ranks| ranks.get(req.rank as usize).cloned())
        }) else {
            return Err(Status::not_found(job.no_rank_reason(req.rank, generation)));
        };
        let rid = self.next_request;
        self.next_request += 1;
        let sent = self.send_to(
            &node,
            pb::coordinator_message::Msg::FetchLog(pb::FetchLog {
                request_id: rid,
                job_id: req.job_id.clone(),
                generation,
                rank: req.rank,
                tail_bytes: req.tail_bytes,
                follow: req.follow,
            }),
        );
        let credited = sent
            && self.send_to(
                &node,
                pb::coordinator_message::Msg::LogCredit(pb::LogCredit {
                    request_id: rid,
                    chunks: LOG_WINDOW_CHUNKS,
                }),
            );
        if !credited {
            if sent {
                self.send_to(
                    &node,
                    pb::coordinator_message::Msg::CancelFetch(pb::CancelFetch { request_id: rid }),
                );
            }
            return Err(Status::unavailable(format!(
                "node {node}, which ran rank {}, is not connected",
                req.rank
            )));
        }
        self.log_requests.insert(rid, (node, tx));
        Ok(rid)
    }

    /// Marks a job for persisting and publishing; done once per burst of commands by
    /// [`Core::flush_changed`], so that 1,000 WorkerStarted in a row cost one write, not 1,000.
    fn save(&mut self, id: &str) {
        self.changed.insert(id.to_owned());
    }

    fn flush_changed(&mut self) {
        for id in std::mem::take(&mut self.progressed) {
            if !self.changed.contains(&id) && self.jobs.contains_key(&id) {
                self.publish(&id);
            }
        }
        for id in std::mem::take(&mut self.changed) {
            if let Some(job) = self.jobs.get(&id) {
                self.persist.put(
                    format!("jobs/{id}"),
                    serde_json::to_vec(job).expect("job serializes"),
                );
                self.publish(&id);
            }
        }
    }

    fn publish(&mut self, id: &str) {
        if let Some(w) = self.watchers.get(id) {
            let st = status::job_status(&self.jobs[id]);
            w.send_replace(st);
            if self.jobs[id].state.is_terminal() && w.receiver_count() == 0 {
                self.watchers.remove(id);
            }
        }
    }
}

/// A reported checkpoint must lie inside the job's `output_dir` (it becomes the next generation's
/// `RINGMASTER_RESUME_FROM`): a path outside it, or with `..` in it, is refused.
///
/// An absolute `output_dir` is a plain prefix check. A relative one is resolved by each trainer
/// against its own working directory, which the coordinator does not know: the reported path
/// (always absolute) must then contain `output_dir`'s components followed by at least one more.
fn checkpoint_path_allowed(job: &Job, path: &str) -> Result<(), String> {
    use std::path::{Component, Path};
    let Some(out) = job
        .spec
        .train
        .as_ref()
        .and_then(|t| t.get("output_dir"))
        .and_then(|v| v.as_str())
    else {
        return Err("the job has no output_dir (only `train:` jobs report checkpoints)".into());
    };
    let p = Path::new(path);
    if path.len() > 4096 || !p.is_absolute() {
        return Err("not an absolute path".into());
    }
    let comps: Vec<Component> = p.components().collect();
    if comps
        .iter()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err("the path has '.' or '..' components".into());
    }
    let out_comps: Vec<Component> = Path::new(out)
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    if out_comps.iter().any(|c| matches!(c, Component::ParentDir)) || out_comps.is_empty() {
        return Err(format!("output_dir '{out}' is not a plain path"));
    }
    let inside = if Path::new(out).is_absolute() {
        comps.len() > out_comps.len() && comps[..out_comps.len()] == out_comps[..]
    } else {
        comps.len() > out_comps.len()
            && comps
                .windows(out_comps.len())
                .take(comps.len() - out_comps.len())
                .any(|w| w == &out_comps[..])
    };
    if inside {
        Ok(())
    } else {
        Err(format!("not inside the job's output_dir '{out}'"))
    }
}

fn unknown_job(id: &str) -> Status {
    Status::not_found(format!("no job '{id}'"))
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
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::persist::RetryPolicy;
    use crate::persist::testing::{Flaky, FlakyStore};
    use ringmaster_store::StateStore;

    fn limits() -> JobLimits {
        JobLimits {
            retain_finished: 2,
            retain_for: Duration::from_secs(24 * 3600),
            max_jobs: 4,
            max_job_bytes: 1 << 20,
        }
    }

    /// A loop over a shared in-memory store that fails as `store` says.
    fn core(store: &Arc<Flaky>, job_limits: JobLimits) -> Core {
        let retry = RetryPolicy {
            attempts: 2,
            first_delay: Duration::from_millis(1),
        };
        let (persist, loaded) = Persister::start_with(
            Box::new(FlakyStore(store.clone())),
            &["jobs/", "meta/"],
            retry,
        )
        .unwrap();
        let ids = JobIds::load(None, stored_next_job(&loaded.records)).unwrap();
        let cfg = CoreConfig {
            hostfile: None,
            heartbeat_timeout: Duration::from_secs(10),
            creds: Default::default(),
            job_limits,
        };
        Core::new(cfg, persist, loaded.records, Rendezvous::default(), ids)
    }

    fn spec(name: &str) -> JobSpec {
        JobSpec {
            name: Some(name.into()),
            command: Some(vec!["sleep".into(), "60".into()]),
            ..JobSpec::default()
        }
    }

    async fn submit(h: &Handle, name: &str) -> Result<pb::JobStatus, Status> {
        h.call(|reply| Cmd::Submit {
            spec: spec(name),
            files: BTreeMap::new(),
            reply,
        })
        .await?
    }

    #[tokio::test]
    async fn a_submit_is_answered_once_the_job_is_in_the_store() {
        let store = Flaky::new(0);
        let (h, _task) = spawn(core(&store, limits()), Default::default());
        let st = submit(&h, "a").await.unwrap();
        assert_eq!(st.id, "a-1");
        // Read the store the moment the reply arrives: the job and the id counter are there.
        let rec = store.inner.get("jobs/a-1").unwrap().expect("job on disk");
        let job: Job = serde_json::from_slice(&rec.value).unwrap();
        assert_eq!(job.id, "a-1");
        let meta = store.inner.get("meta/coordinator").unwrap().unwrap();
        assert_eq!(meta.value, br#"{"next_job":2}"#);
    }

    #[tokio::test]
    async fn failed_writes_refuse_submit_cancel_and_checkpoint_but_reads_work() {
        let store = Flaky::new(0);
        let (h, _task) = spawn(core(&store, limits()), Default::default());
        submit(&h, "a").await.unwrap();
        store
            .failures
            .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
        let err = submit(&h, "b").await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message().contains("stopped accepting writes"),
            "{err:?}"
        );
        assert!(err.message().contains("No space left on device"), "{err:?}");
        // The unsaved job was never acknowledged, so it is not kept either.
        let jobs = h.call(|reply| Cmd::List { reply }).await.unwrap();
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, ["a-1"]);
        for call in ["cancel", "checkpoint", "submit"] {
            let r = match call {
                "cancel" => h
                    .call(|reply| Cmd::Cancel {
                        id: "a-1".into(),
                        grace_ms: 0,
                        reply,
                    })
                    .await
                    .unwrap(),
                "checkpoint" => h
                    .call(|reply| Cmd::Checkpoint {
                        id: "a-1".into(),
                        reply,
                    })
                    .await
                    .unwrap(),
                _ => submit(&h, "c").await,
            };
            let err = r.expect_err(call);
            assert_eq!(err.code(), tonic::Code::Unavailable, "{call}: {err:?}");
        }
        let st = h
            .call(|reply| Cmd::Get {
                id: "a-1".into(),
                reply,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(st.state, "PENDING");
    }

    /// A finished job `id`, finished `ago_ms` before now.
    fn finished(c: &mut Core, id: &str, ago_ms: u64) {
        let mut j = Job::new(id.into(), spec("f"), BTreeMap::new(), 0);
        j.state = JobState::Cancelled;
        j.finished_unix_ms = Some(now_ms() - ago_ms);
        c.job_bytes += job_bytes(&j.spec, &j.files);
        c.jobs.insert(id.into(), j);
        c.save(id);
    }

    #[tokio::test]
    async fn finished_jobs_are_retired_by_count_and_age_from_memory_and_store() {
        let store = Flaky::new(0);
        let mut c = core(&store, limits());
        finished(&mut c, "old-1", 2 * 24 * 3600 * 1000);
        finished(&mut c, "f-2", 3_000);
        finished(&mut c, "f-3", 2_000);
        finished(&mut c, "f-4", 1_000);
        let live = Job::new("live-5".into(), spec("live"), BTreeMap::new(), 0);
        c.job_bytes += job_bytes(&live.spec, &live.files);
        c.jobs.insert("live-5".into(), live);
        c.save("live-5");
        c.flush_changed();
        c.persist.flush().wait().await.unwrap();
        assert_eq!(store.inner.list("jobs/").unwrap().len(), 5);

        c.retire_finished();
        let kept: Vec<&str> = c.jobs.keys().map(String::as_str).collect();
        // old-1 is past --retain-finished-for; of the rest, the newest 2 are kept.
        assert_eq!(kept, ["f-3", "f-4", "live-5"]);
        c.persist.flush().wait().await.unwrap();
        let stored: Vec<String> = store
            .inner
            .list("jobs/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(stored, ["jobs/f-3", "jobs/f-4", "jobs/live-5"]);
        assert_eq!(
            c.job_bytes,
            c.jobs
                .values()
                .map(|j| job_bytes(&j.spec, &j.files))
                .sum::<u64>()
        );
    }

    #[tokio::test]
    async fn max_jobs_removes_the_oldest_finished_job_then_refuses() {
        let store = Flaky::new(0);
        let mut c = core(&store, limits());
        finished(&mut c, "f-1", 1_000);
        for i in 2..=4 {
            c.submit(spec("p"), BTreeMap::new()).unwrap();
            assert_eq!(c.jobs.len(), i);
        }
        // Full (4): the finished job makes room.
        let id = c.submit(spec("p"), BTreeMap::new()).unwrap();
        assert!(!c.jobs.contains_key("f-1") && c.jobs.contains_key(&id));
        // Full of unfinished jobs: refused, naming the limit.
        let err = c.submit(spec("p"), BTreeMap::new()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("--max-jobs 4"), "{err:?}");
    }

    #[tokio::test]
    async fn max_job_bytes_counts_specs_and_files() {
        let store = Flaky::new(0);
        let mut c = core(
            &store,
            JobLimits {
                max_job_bytes: 40_000,
                ..limits()
            },
        );
        let files = |n| BTreeMap::from([("ds.json".to_owned(), vec![b' '; n])]);
        c.submit(spec("a"), files(30_000)).unwrap();
        let err = c.submit(spec("b"), files(20_000)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("--max-job-bytes"), "{err:?}");
        c.submit(spec("c"), files(5_000)).unwrap();
        // One job above the per-job limit is bad input, whatever the room.
        let err = c.submit(spec("d"), files(MAX_SPEC_BYTES + 1)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    fn train_job(output_dir: &str) -> Job {
        let spec = JobSpec {
            train: Some(serde_json::json!({"stage": "sft", "output_dir": output_dir})),
            ..Default::default()
        };
        Job::new("j-1".into(), spec, BTreeMap::new(), 0)
    }

    #[test]
    fn reported_checkpoints_must_lie_inside_output_dir() {
        let abs = train_job("/data/run1");
        assert!(checkpoint_path_allowed(&abs, "/data/run1/checkpoint-10").is_ok());
        assert!(checkpoint_path_allowed(&abs, "/data/run1/a/b").is_ok());
        for bad in [
            "/data/run1",
            "/data/run10/checkpoint-1",
            "/data/run1/../../etc",
            "/etc/passwd",
            "data/run1/checkpoint-1",
        ] {
            assert!(checkpoint_path_allowed(&abs, bad).is_err(), "{bad}");
        }
        let rel = train_job("output/quick");
        assert!(checkpoint_path_allowed(&rel, "/home/u/output/quick/checkpoint-5").is_ok());
        assert!(checkpoint_path_allowed(&rel, "/home/u/output/quick").is_err());
        assert!(checkpoint_path_allowed(&rel, "/home/u/output/other/checkpoint-5").is_err());
        assert!(checkpoint_path_allowed(&train_job("../x"), "/a/x/c").is_err());
        let cmd = Job::new("c-1".into(), JobSpec::default(), BTreeMap::new(), 0);
        assert!(checkpoint_path_allowed(&cmd, "/tmp/c").is_err());
    }
}
