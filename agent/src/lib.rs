//! Ringmaster's node agent: `agent --join coordinator:29500`.
//!
//! One agent per node. It joins the coordinator over one bidirectional gRPC stream, starts one
//! worker per slot when told, supervises them, and kills whole process trees on stop, cancel and
//! shutdown. When the coordinator is unreachable, workers keep running; the agent reconnects
//! with capped backoff and reports what runs and what exited meanwhile.
//!
//! Layout:
//! - [`env`] — the worker environment (torchrun / DeepSpeed names).
//! - [`lock`] — one agent per work dir (`<work-dir>/agent.lock`).
//! - [`metrics`] — Prometheus metrics (`--metrics-listen`): workers, exits, captured output,
//!   memory, the coordinator connection.
//! - [`paths`] — the allowed roots a job may write under (`--allowed-root`).
//! - [`supervisor`] — spawning, log capture, process-group signals.
//! - [`logging`], [`shutdown_signal`] — from `ringmaster-common`, shared with the coordinator's
//!   binaries; [`error_chain`] from `ringmaster-auth`.
//! - this file — [`Config`] and [`run`] / [`run_with_metrics`], the connection loop.

pub mod env;
pub mod lock;
pub mod metrics;
pub mod paths;
pub mod supervisor;

pub use ringmaster_common::{logging, shutdown_signal};

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ringmaster_proto as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use supervisor::Supervisor;

/// Largest message the agent accepts from the coordinator.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Most slots one agent may announce (the coordinator and the hostfile parser apply the same
/// limit, `ringmaster_hostfile::hostfile::MAX_SLOTS`).
pub const MAX_SLOTS: u32 = 1024;

/// Everything an agent needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// host:port of the coordinator, or of several sharing one etcd (`a:29500,b:29500`; the
    /// agent joins whichever leads).
    pub join: String,
    pub name: String,
    pub slots: u32,
    pub work_dir: PathBuf,
    pub token: Option<String>,
    /// How the coordinator is verified (CA, server name) and, for mutual TLS, this agent's
    /// certificate. Default: plaintext.
    pub tls: ringmaster_auth::ClientTls,
    /// The unprivileged user workers run as (`--worker-user`); None: the agent's own user.
    pub worker_user: Option<supervisor::spawn::WorkerUser>,
    /// Address other nodes reach this one at; empty: the address the coordinator sees.
    pub advertise_addr: String,
    /// The `trainer` program started for `train:` jobs.
    pub trainer: PathBuf,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// Grace between SIGTERM and SIGKILL when the agent itself shuts down.
    pub shutdown_grace: Duration,
    /// Size limit of rank logs and how many rotated files are kept.
    pub log_rotation: supervisor::logs::Rotation,
    /// Directories besides the work dir that a job's `output_dir` and `workdir:` may lie in.
    pub allowed_roots: Vec<PathBuf>,
}

/// Log fetches served at once; more are refused, so that log chunks (at most a credit
/// window per fetch) never crowd heartbeats out of the stream to the coordinator.
pub const MAX_LOG_FETCHES: usize = 32;

/// Why an agent stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the coordinator at {addr} refused this agent: {message}")]
    Refused { addr: String, message: String },
    #[error("invalid coordinator address '{0}': expected HOST:PORT")]
    BadAddress(String),
    #[error("{0}")]
    BadTls(String),
    #[error("work dir {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Another agent holds the work dir.
    #[error(transparent)]
    Locked(#[from] lock::LockError),
    #[error(transparent)]
    AllowedRoot(#[from] paths::RootError),
}

/// A log fetch being served: its stop switch and the credits the coordinator granted.
struct LogFetch {
    cancel: CancellationToken,
    credit: Arc<tokio::sync::Semaphore>,
}

enum ConnectError {
    Fatal(String),
    Retry(String),
}

struct Up {
    tx: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    heartbeat: tokio::time::Interval,
}

struct Agent {
    cfg: Config,
    incarnation: String,
    sup: Supervisor,
    metrics: metrics::Metrics,
    /// Exits not yet delivered to the coordinator.
    undelivered: Vec<pb::WorkerExited>,
    fetches: HashMap<u64, LogFetch>,
    hb_seq: u64,
    /// Which of the `--join` addresses was joined last (tried first next time).
    joined: usize,
    /// The highest coordinator leadership epoch seen (in the election `epoch_scope`): a
    /// coordinator below it was deposed, and nothing it sends is carried out.
    epoch: u64,
    epoch_scope: String,
}

/// The advertised address: the one given, else the local address of a route to the
/// coordinator (what the coordinator itself would see).
fn default_advertise(join: &str) -> String {
    use std::net::ToSocketAddrs;
    let Some(target) = join.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return String::new();
    };
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    std::net::UdpSocket::bind(bind)
        .and_then(|s| {
            s.connect(target)?;
            s.local_addr()
        })
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// Runs the agent until `shutdown` resolves (then stops every worker) or the coordinator
/// refuses it.
///
/// # Errors
/// A refusal (wrong token, unknown node...), a bad address, an unusable work dir (or one another
/// agent holds) or an unusable allowed root.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
    run_with_metrics(cfg, None, shutdown).await
}

/// As [`run`], and serves Prometheus metrics on `metrics_listener` (`--metrics-listen`; see
/// [`metrics`]) from the moment the work dir is this agent's until the function returns.
///
/// # Errors
/// As [`run`].
pub async fn run_with_metrics(
    mut cfg: Config,
    metrics_listener: Option<tokio::net::TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let joins = ringmaster_auth::client::addresses(&cfg.join);
    if joins.is_empty() || joins.iter().any(|a| !a.contains(':')) {
        return Err(AgentError::BadAddress(cfg.join.clone()));
    }
    work_dir_private(&cfg.work_dir, cfg.worker_user.is_some()).map_err(|source| {
        AgentError::WorkDir {
            path: cfg.work_dir.clone(),
            source,
        }
    })?;
    cfg.work_dir = cfg
        .work_dir
        .canonicalize()
        .map_err(|source| AgentError::WorkDir {
            path: cfg.work_dir.clone(),
            source,
        })?;
    // Held until this function returns; the kernel drops it if the process dies first.
    let _lock = lock::acquire(&cfg.work_dir)?;
    let roots = paths::AllowedRoots::new(&cfg.work_dir, &cfg.allowed_roots)?;
    // Only now are workers marked with this work dir really orphans of a dead agent.
    let killed = supervisor::kill_leftovers(&cfg.work_dir);
    if killed > 0 {
        tracing::warn!(groups = killed, "killed workers left by an earlier agent");
    }
    if cfg.advertise_addr.is_empty() {
        cfg.advertise_addr = default_advertise(joins[0]);
    }
    // TLS files are read now, so that a wrong path is a usage error at start, not a retry loop.
    for a in &joins {
        ringmaster_auth::client::endpoint(a, &cfg.tls)
            .map_err(|e| AgentError::BadTls(e.to_string()))?;
    }
    let metrics = metrics::Metrics::new();
    // Stops the metrics server whatever way this function returns.
    let metrics_stop = CancellationToken::new();
    let _metrics_stop = metrics_stop.clone().drop_guard();
    if let Some(listener) = metrics_listener {
        if let Ok(at) = listener.local_addr() {
            tracing::info!(%at, "Prometheus metrics at http://{at}/metrics");
        }
        tokio::spawn(ringmaster_common::metrics::serve(
            listener,
            metrics.render(),
            metrics_stop,
        ));
    }
    let (exit_tx, mut exit_rx) = mpsc::channel::<pb::WorkerExited>(1024);
    let mut sup = Supervisor::new(
        cfg.work_dir.clone(),
        cfg.trainer.clone(),
        cfg.name.clone(),
        cfg.advertise_addr.clone(),
        cfg.join.clone(),
        exit_tx,
    )
    .with_log_rotation(cfg.log_rotation)
    .with_allowed_roots(roots)
    .with_worker_user(cfg.worker_user.clone())
    .with_metrics(metrics.clone());
    sup.set_tls(&cfg.tls);
    let incarnation = format!("{:016x}", rand::random::<u64>());
    let mut agent = Agent {
        cfg,
        incarnation,
        sup,
        metrics,
        undelivered: Vec::new(),
        fetches: HashMap::new(),
        hb_seq: 0,
        joined: 0,
        epoch: 0,
        epoch_scope: String::new(),
    };
    tracing::info!(name = %agent.cfg.name, slots = agent.cfg.slots, coordinator = %agent.cfg.join, work_dir = %agent.cfg.work_dir.display(), "agent starting");

    let initial_backoff = Duration::from_millis(100);
    let mut backoff = initial_backoff;
    let mut up: Option<Up> = None;
    let mut retry_at = Instant::now();
    let mut joined_before = false;
    tokio::pin!(shutdown);
    let result = loop {
        agent.metrics.set_connected(up.is_some());
        agent.metrics.set_undelivered(agent.undelivered.len());
        match up.as_mut() {
            None => {
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    Some(e) = exit_rx.recv() => agent.worker_exited(e, None).await,
                    _ = tokio::time::sleep_until(retry_at) => {
                        match agent.connect().await {
                            Ok(u) => {
                                backoff = initial_backoff;
                                up = Some(u);
                                if joined_before {
                                    agent.metrics.reconnected();
                                }
                                joined_before = true;
                            }
                            Err(ConnectError::Fatal(message)) => {
                                break Err(AgentError::Refused { addr: agent.cfg.join.clone(), message });
                            }
                            Err(ConnectError::Retry(why)) => {
                                tracing::warn!(coordinator = %agent.cfg.join, retry_in_ms = backoff.as_millis() as u64, "not joined: {why}");
                                if why.contains("standby") {
                                    // A standby answered: an election is under way and a
                                    // leader serves within its lease's TTL. Knock every 1-2 s
                                    // (jittered: thousands of agents do this at once) rather
                                    // than backing off past the takeover.
                                    let jitter = Duration::from_millis(rand::random::<u64>() % 1000);
                                    retry_at = Instant::now() + Duration::from_secs(1) + jitter;
                                } else {
                                    retry_at = Instant::now() + backoff;
                                    backoff = (backoff * 2).min(agent.cfg.max_backoff);
                                }
                            }
                        }
                    }
                }
            }
            Some(u) => {
                let tx = u.tx.clone();
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    Some(e) = exit_rx.recv() => agent.worker_exited(e, Some(&tx)).await,
                    msg = u.inbound.message() => match msg {
                        Ok(Some(m)) if m.leader_epoch < agent.epoch => {
                            tracing::warn!(epoch = m.leader_epoch, highest = agent.epoch, "a command from a deposed coordinator; ignored, reconnecting");
                            up = None;
                            retry_at = Instant::now() + initial_backoff;
                        }
                        Ok(Some(m)) => {
                            if let Some(m) = m.msg {
                                agent.handle(m, &tx).await;
                            }
                        }
                        Ok(None) => {
                            tracing::warn!("coordinator closed the stream; reconnecting (workers keep running)");
                            up = None;
                            retry_at = Instant::now() + initial_backoff;
                        }
                        Err(s) => {
                            tracing::warn!(code = ?s.code(), "lost the coordinator: {}; reconnecting (workers keep running)", s.message());
                            up = None;
                            retry_at = Instant::now() + initial_backoff;
                        }
                    },
                    _ = u.heartbeat.tick() => {
                        agent.hb_seq += 1;
                        let hb = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                            seq: agent.hb_seq,
                            running_workers: agent.sup.len() as u32,
                        }))};
                        if tx.try_send(hb).is_err() {
                            tracing::debug!("heartbeat not queued");
                        }
                    }
                }
            }
        }
    };

    // Shutdown (or refusal): stop every worker, wait for them, report if still connected.
    for f in agent.fetches.values() {
        f.cancel.cancel();
    }
    if !agent.sup.is_empty() {
        tracing::info!(workers = agent.sup.len(), "stopping all workers");
        agent.sup.stop_all(agent.cfg.shutdown_grace);
        let deadline = Instant::now() + agent.cfg.shutdown_grace + Duration::from_secs(3);
        while !agent.sup.is_empty() {
            match tokio::time::timeout_at(deadline, exit_rx.recv()).await {
                Ok(Some(e)) => {
                    let tx = up.as_ref().map(|u| u.tx.clone());
                    agent.worker_exited(e, tx.as_ref()).await;
                }
                _ => break,
            }
        }
    }
    if let Some(u) = up {
        // Give the stream a moment to carry the last exits.
        drop(u.tx);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("agent stopped");
    result
}

impl Agent {
    /// Joins the coordinator of `--join`, or the leader of several (`a:29500,b:29500`):
    /// starting with the one joined last, each in turn; a standby's refusal names the leader,
    /// which is tried next.
    async fn connect(&mut self) -> Result<Up, ConnectError> {
        let list = self.cfg.join.clone();
        let addrs = ringmaster_auth::client::addresses(&list);
        if addrs.len() == 1 {
            return self.connect_to(addrs[0]).await.map_err(|(e, _)| e);
        }
        let mut why = Vec::new();
        let mut i = self.joined % addrs.len();
        for _ in 0..addrs.len() {
            match self.connect_to(addrs[i]).await {
                Ok(up) => {
                    self.joined = i;
                    tracing::info!(coordinator = addrs[i], "joined the leading coordinator");
                    return Ok(up);
                }
                Err((ConnectError::Fatal(m), _)) => {
                    return Err(ConnectError::Fatal(format!("{}: {m}", addrs[i])));
                }
                Err((ConnectError::Retry(r), hint)) => {
                    why.push(format!("{}: {r}", addrs[i]));
                    i = hint
                        .and_then(|h| addrs.iter().position(|a| *a == h))
                        .unwrap_or((i + 1) % addrs.len());
                }
            }
        }
        Err(ConnectError::Retry(why.join("; ")))
    }

    /// Joins the coordinator at `addr`. A refusal may name the leader (a standby's hint).
    async fn connect_to(&mut self, addr: &str) -> Result<Up, (ConnectError, Option<String>)> {
        let endpoint = ringmaster_auth::client::endpoint(addr, &self.cfg.tls)
            .map_err(|e| (ConnectError::Fatal(e.to_string()), None))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            // A coordinator that hangs (a paused or partitioned leader) is noticed within
            // about 5 s, well inside the heartbeat timeout a new leader gives agents to come
            // back: HTTP/2 PINGs need the process, not only its kernel, to answer.
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true);
        // Bounded as a whole: a paused coordinator's kernel accepts, then nothing answers.
        let channel = tokio::time::timeout(Duration::from_secs(5), endpoint.connect())
            .await
            .map_err(|_| {
                (
                    ConnectError::Retry(
                        "accepted the connection but did not answer within 5s".into(),
                    ),
                    None,
                )
            })?
            .map_err(|e| {
                let why = ringmaster_auth::client::explain(&e, &self.cfg.tls);
                // A coordinator whose certificate does not chain to our CA is not ours: never run
                // its commands, and do not keep knocking as if it were a network hiccup.
                let e = if ringmaster_auth::client::is_untrusted_peer(&why) {
                    ConnectError::Fatal(format!("TLS: {why}"))
                } else {
                    ConnectError::Retry(why)
                };
                (e, None)
            })?;
        let bearer = ringmaster_auth::Bearer::new(self.cfg.token.as_deref())
            .map_err(|e| (ConnectError::Fatal(e.to_string()), None))?;
        let mut client =
            pb::agent_service_client::AgentServiceClient::with_interceptor(channel, bearer)
                .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(1024);
        let join = pb::Join {
            name: self.cfg.name.clone(),
            slots: self.cfg.slots,
            advertise_addr: self.cfg.advertise_addr.clone(),
            version: ringmaster_proto::PROTOCOL_VERSION.to_owned(),
            token: self.cfg.token.clone().unwrap_or_default(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            running: self.sup.inventory(),
            exited_while_away: self.undelivered.clone(),
            incarnation: self.incarnation.clone(),
        };
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Join(join)),
        })
        .await
        .expect("the receiver is alive until the call starts");
        let classify = |s: tonic::Status| {
            use tonic::Code;
            let e = match s.code() {
                Code::Unauthenticated
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::InvalidArgument => ConnectError::Fatal(s.message().to_owned()),
                // The name is held by a session that may be ending (this agent's previous
                // process): retried until the coordinator's heartbeat timeout frees it.
                Code::AlreadyExists => ConnectError::Retry(format!(
                    "refused for now: {} (retrying: the other session ends after the \
                     coordinator's heartbeat timeout if that agent is gone)",
                    s.message()
                )),
                _ => ConnectError::Retry(format!("{:?}: {}", s.code(), s.message())),
            };
            (e, ringmaster_auth::client::leader_hint(&s))
        };
        let mut inbound = tokio::time::timeout(
            Duration::from_secs(10),
            client.session(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| {
            (
                ConnectError::Retry("no answer to Join within 10s".into()),
                None,
            )
        })?
        .map_err(classify)?
        .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| (ConnectError::Retry("no JoinAck within 10s".into()), None))?
            .map_err(classify)?;
        let ack = match first.and_then(|m| m.msg) {
            Some(pb::coordinator_message::Msg::JoinAck(a))
                if !a.leader_scope.is_empty()
                    && a.leader_scope == self.epoch_scope
                    && a.leader_epoch < self.epoch =>
            {
                return Err((
                    ConnectError::Retry(format!(
                        "a deposed coordinator (leadership epoch {} below {})",
                        a.leader_epoch, self.epoch
                    )),
                    None,
                ));
            }
            Some(pb::coordinator_message::Msg::JoinAck(a)) => a,
            other => {
                // Only the kind: a message may carry a worker credential.
                let kind = match other {
                    None => "nothing".to_owned(),
                    Some(m) => format!("{:?}", std::mem::discriminant(&m)),
                };
                return Err((
                    ConnectError::Retry(format!(
                        "expected JoinAck, got another message first ({kind})"
                    )),
                    None,
                ));
            }
        };
        self.undelivered.clear();
        // Epochs count within one election; another (a restored etcd, no election at all)
        // starts the count again.
        self.epoch = ack.leader_epoch;
        self.epoch_scope = ack.leader_scope.clone();
        tracing::info!(
            slots = ack.slots,
            leader_epoch = ack.leader_epoch,
            heartbeat_ms = ack.heartbeat_interval_ms,
            running = self.sup.len(),
            "joined the coordinator"
        );
        let mut heartbeat =
            tokio::time::interval(Duration::from_millis(ack.heartbeat_interval_ms.max(20)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Up {
            tx,
            inbound,
            heartbeat,
        })
    }

    async fn worker_exited(
        &mut self,
        e: pb::WorkerExited,
        tx: Option<&mpsc::Sender<pb::AgentMessage>>,
    ) {
        tracing::info!(job = %e.job_id, generation = e.generation, rank = e.rank, exit_code = ?e.exit_code, signal = ?e.signal, "worker exited");
        self.metrics.worker_exited(e.exit_code, e.signal);
        self.sup.reap(&(e.job_id.clone(), e.generation, e.rank));
        let msg = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::WorkerExited(e.clone())),
        };
        let delivered = match tx {
            Some(tx) => tx.send(msg).await.is_ok(),
            None => false,
        };
        if !delivered {
            self.undelivered.push(e);
        }
    }

    async fn handle(
        &mut self,
        m: pb::coordinator_message::Msg,
        tx: &mpsc::Sender<pb::AgentMessage>,
    ) {
        use pb::coordinator_message::Msg;
        match m {
            Msg::JoinAck(_) => {}
            Msg::StartWorkers(sw) => {
                tracing::info!(job = %sw.job_id, generation = sw.generation, world_size = sw.world_size, "start workers");
                for msg in self.sup.start(&sw) {
                    let _ = tx.send(pb::AgentMessage { msg: Some(msg) }).await;
                }
            }
            Msg::StopWorkers(s) => {
                tracing::info!(job = %s.job_id, generation = s.generation, reason = %s.reason, "stop workers");
                self.sup
                    .stop(&s.job_id, s.generation, Duration::from_millis(s.grace_ms));
            }
            Msg::SignalWorkers(s) => match nix::sys::signal::Signal::try_from(s.signal) {
                Ok(sig) => {
                    let n = self.sup.signal(&s.job_id, s.generation, sig);
                    tracing::info!(job = %s.job_id, generation = s.generation, signal = %sig, workers = n, reason = %s.reason, "signalled workers");
                }
                Err(_) => {
                    tracing::warn!(job = %s.job_id, signal = s.signal, "unknown signal number; ignored")
                }
            },
            Msg::AllocatePort(a) => {
                let bind = if self.cfg.advertise_addr.is_empty() {
                    "0.0.0.0:0".to_owned()
                } else if self.cfg.advertise_addr.contains(':') {
                    format!("[{}]:0", self.cfg.advertise_addr)
                } else {
                    format!("{}:0", self.cfg.advertise_addr)
                };
                let r = std::net::TcpListener::bind(&bind)
                    .or_else(|_| std::net::TcpListener::bind("0.0.0.0:0"))
                    .and_then(|l| l.local_addr());
                let (port, error) = match r {
                    Ok(a) => (a.port() as u32, String::new()),
                    Err(e) => (0, format!("binding a port on {bind}: {e}")),
                };
                let _ = tx
                    .send(pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::PortAllocated(pb::PortAllocated {
                            request_id: a.request_id,
                            port,
                            error,
                        })),
                    })
                    .await;
            }
            Msg::FetchLog(f) => self.fetch_log(f, tx).await,
            Msg::LogCredit(c) => {
                if let Some(f) = self.fetches.get(&c.request_id) {
                    let room = supervisor::logs::serve::MAX_CREDIT
                        .saturating_sub(f.credit.available_permits());
                    f.credit.add_permits((c.chunks as usize).min(room));
                }
            }
            Msg::CancelFetch(c) => {
                if let Some(f) = self.fetches.remove(&c.request_id) {
                    f.cancel.cancel();
                }
            }
        }
    }

    /// Starts serving a rank's log; data flows as the coordinator grants credits.
    async fn fetch_log(&mut self, f: pb::FetchLog, tx: &mpsc::Sender<pb::AgentMessage>) {
        self.fetches.retain(|_, x| !x.cancel.is_cancelled());
        let refused = if self.fetches.len() >= MAX_LOG_FETCHES {
            Some(format!(
                "node {} is serving {MAX_LOG_FETCHES} logs already; try again shortly",
                self.cfg.name
            ))
        } else {
            // Refuses a job id that is not one safe path component.
            self.sup.generation_dir(&f.job_id, f.generation).err()
        };
        if let Some(error) = refused {
            let _ = tx
                .send(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::LogChunk(pb::LogChunk {
                        request_id: f.request_id,
                        eof: true,
                        error,
                        ..Default::default()
                    })),
                })
                .await;
            return;
        }
        let cancel = CancellationToken::new();
        let credit = Arc::new(tokio::sync::Semaphore::new(0));
        self.fetches.insert(
            f.request_id,
            LogFetch {
                cancel: cancel.clone(),
                credit: credit.clone(),
            },
        );
        let live = self.sup.log_live(&(f.job_id.clone(), f.generation, f.rank));
        let fetch = supervisor::logs::Fetch {
            request_id: f.request_id,
            job: f.job_id,
            generation: f.generation,
            rank: f.rank,
            tail_bytes: f.tail_bytes,
            follow: f.follow,
        };
        let work_dir = self.cfg.work_dir.clone();
        let out = tx.clone();
        tokio::spawn(async move {
            supervisor::logs::serve(fetch, work_dir, live, credit, out, cancel.clone()).await;
            cancel.cancel();
        });
    }
}

/// Creates the work dir readable by this agent's user only (rank logs, job files and training
/// configs live there), or checks an existing one: it must belong to this user (a directory
/// someone else made first, say under /tmp, would let them read and replace what the agent
/// writes) and loses any group/other access. With `traverse`, workers of another user
/// (`--worker-user`) may pass through it (0711) to their own generation directories.
fn work_dir_private(dir: &std::path::Path, traverse: bool) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, not by this agent's uid {me}: choose a work dir of its own",
                meta.uid()
            ),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    let want = if traverse { 0o711 } else { mode & 0o700 };
    if mode != want {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(want))?;
    }
    Ok(())
}

pub use ringmaster_auth::client::error_chain;

/// Slots to announce when `--slots` is not given: `CUDA_VISIBLE_DEVICES` when set, else the
/// GPUs `nvidia-smi -L` lists, else 1.
pub fn detect_slots() -> u32 {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        let n = v.split(',').filter(|s| !s.trim().is_empty()).count() as u32;
        if n > 0 {
            return n;
        }
    }
    if let Ok(out) = std::process::Command::new("nvidia-smi").arg("-L").output()
        && out.status.success()
    {
        let n = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("GPU "))
            .count() as u32;
        if n > 0 {
            return n;
        }
    }
    1
}
