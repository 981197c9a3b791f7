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
use crate::persist::Persister;
use crate::placement::{self, Busy, NodeView};
use crate::server::rendezvous::Rendezvous;
use crate::spec::{JobSpec, MAX_SPEC_BYTES};
use crate::status;

pub type AgentTx = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;
pub type LogTx = mpsc::Sender<Result<pb::LogChunk, Status>>;

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
    Logs {
        req: pb::LogsRequest,
        tx: LogTx,
        reply: oneshot::Sender<Result<(), Status>>,
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
}

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

pub struct Core {
    cfg: CoreConfig,
    persist: Persister,
    rendezvous: Rendezvous,
    nodes: BTreeMap<String, Node>,
    jobs: BTreeMap<String, Job>,
    watchers: HashMap<String, watch::Sender<pb::JobStatus>>,
    next_conn: u64,
    next_request: u64,
    next_job: u64,
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
    ) -> Core {
        let now = Instant::now();
        let mut core = Core {
            cfg,
            persist,
            rendezvous,
            nodes: BTreeMap::new(),
            jobs: BTreeMap::new(),
            watchers: HashMap::new(),
            next_conn: 1,
            next_request: 1,
            next_job: 1,
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
                        core.jobs.insert(id.to_owned(), job);
                    }
                    Err(e) => tracing::error!(key, error = %e, "unreadable job record skipped"),
                }
            } else if let Some(name) = key.strip_prefix("nodes/") {
                if let Ok(rec) = serde_json::from_slice::<NodeRecord>(&value) {
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
            } else if key == "meta/coordinator"
                && let Ok(m) = serde_json::from_slice::<Meta>(&value)
            {
                core.next_job = m.next_job.max(1);
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
        loop {
            tokio::select! {
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
                _ = tick.tick(), if !stopped => self.check_heartbeats(),
                _ = stopping.cancelled(), if !stopped => {
                    // End every long-lived stream; agents keep their workers and reconnect
                    // to the next coordinator on this data dir.
                    stopped = true;
                    for n in self.nodes.values_mut() {
                        n.conn = None;
                    }
                    self.watchers.clear();
                    self.log_requests.clear();
                    let _ = self.persist.flush().await;
                }
            }
            if self.dirty {
                self.dirty = false;
                self.schedule();
            }
            self.flush_changed();
        }
        let _ = self.persist.flush().await;
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
            Cmd::Submit { spec, files, reply } => {
                let r = self.submit(spec, files);
                let _ = reply.send(r);
            }
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
                let _ = reply.send(jobs.into_iter().map(status::job_status).collect());
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
                let r = if self.jobs.contains_key(&id) {
                    tracing::info!(job = %id, generation = self.jobs[&id].generation, "cancel requested");
                    self.apply(&id, Event::Cancel { grace_ms });
                    Ok(status::job_status(&self.jobs[&id]))
                } else {
                    Err(unknown_job(&id))
                };
                let _ = reply.send(r);
            }
            Cmd::Checkpoint { id, reply } => {
                let r = self.request_checkpoint(&id);
                let _ = reply.send(r);
            }
            Cmd::Nodes { reply } => {
                let _ = reply.send(self.node_statuses());
            }
            Cmd::Logs { req, tx, reply } => {
                let r = self.start_log_fetch(req, tx);
                let _ = reply.send(r);
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
                let eof = c.eof;
                let id = c.request_id;
                let failed = match self.log_requests.get(&id) {
                    Some((_, tx)) => {
                        let r = if c.error.is_empty() {
                            Ok(c)
                        } else {
                            Err(Status::not_found(c.error))
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
                    job.checkpoint_warnings
                        .push(format!("generation {generation}: skipped {w}"));
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

    fn submit(
        &mut self,
        spec: JobSpec,
        files: BTreeMap<String, Vec<u8>>,
    ) -> Result<pb::JobStatus, Status> {
        let train = spec
            .validate("job spec")
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(train) = &train {
            crate::spec::validate_files(train, &files, "job spec")
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let size: usize = files.values().map(Vec::len).sum();
        if size > MAX_SPEC_BYTES {
            return Err(Status::invalid_argument(format!(
                "job files total {size} bytes, above the limit of {MAX_SPEC_BYTES}"
            )));
        }
        if let Some(hf) = &self.cfg.hostfile {
            placement::check_against_hostfile(&spec, hf)
                .map_err(|e| Status::invalid_argument(format!("job spec: {e}")))?;
        }
        let base = spec.name.clone().unwrap_or_else(|| "job".to_owned());
        let base: String = base.chars().take(50).collect();
        let id = format!("{base}-{}", self.next_job);
        self.next_job += 1;
        self.persist.put(
            "meta/coordinator".into(),
            serde_json::to_vec(&Meta {
                next_job: self.next_job,
            })
            .expect("meta serializes"),
        );
        let job = Job::new(id.clone(), spec, files, now_ms());
        tracing::info!(job = %id, generation = 0, "job submitted");
        self.jobs.insert(id.clone(), job);
        self.save(&id);
        self.dirty = true;
        self.schedule();
        self.flush_changed();
        Ok(status::job_status(&self.jobs[&id]))
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
            .filter(|j| {
                j.state == JobState::Pending
                    || (j.state == JobState::Restarting
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
        let (mut job, actions) = crate::job::next(job, event);
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

    fn start_log_fetch(&mut self, req: pb::LogsRequest, tx: LogTx) -> Result<(), Status> {
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
            return Err(Status::not_found(format!(
                "job {} has no rank {} in generation {generation}",
                req.job_id, req.rank
            )));
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
        if !sent {
            return Err(Status::unavailable(format!(
                "node {node}, which ran rank {}, is not connected",
                req.rank
            )));
        }
        self.log_requests.insert(rid, (node, tx));
        Ok(())
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
