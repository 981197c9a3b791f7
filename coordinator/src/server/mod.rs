//! The coordinator daemon: gRPC services over one loop that owns the state.
//!
//! Layout:
//! - `core` — the loop (membership, jobs, agent connections) and its [`core::Handle`].
//! - `agent_svc` — `AgentService`: join authentication and the agent stream bridge.
//! - `job_svc` — `JobService` for operators.
//! - `rendezvous` — `RendezvousService`: the trainers' store, barrier and progress.
//! - `limits` — the operator's settings for the coordinator's state and its limits.
//! - `leader` — with the state in etcd: the campaign, the standby's answers, stepping down.
//! - `convert` — protobuf ↔ the core's own types, for the handlers above.
//! - `error` — `CoreError`, and its one conversion to a gRPC status.
//!
//! Every service sits behind a [`Gate`] (credentials, `ringmaster-auth`); the handlers check
//! per-method roles (admin for Submit/Cancel/Checkpoint) and the worker credential's scope.

pub mod agent_svc;
mod convert;
pub mod core;
pub mod error;
pub mod job_svc;
pub mod leader;
pub mod limits;
pub mod rendezvous;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ringmaster_auth::credentials::{Gate, OperatorToken, Service};
use ringmaster_auth::{Credentials, ServerTls, WorkerKey};
use ringmaster_hostfile::Hostfile;
use ringmaster_proto as pb;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::persist::{JobIds, Persister};

/// Request size limit of the agent and rendezvous services.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Request size limit of the job service (a spec with its inlined files).
pub const MAX_SUBMIT_BYTES: usize = 8 << 20;

/// Everything `coordinator` needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub hostfile: Option<Hostfile>,
    pub data_dir: PathBuf,
    /// `embedded` (default), `memory`, or `etcd://host:port[,host:port...][/prefix]`.
    pub store_url: String,
    /// How to reach etcd (TLS, user) when `store_url` is `etcd://...`.
    pub etcd: ringmaster_store::EtcdOptions,
    /// With etcd: the address this coordinator publishes when it leads (None: the listen
    /// address, or the host name with its port when listening on every interface).
    pub advertise: Option<String>,
    /// With etcd: the leadership lease's TTL (a dead leader is replaced within about this).
    pub leader_ttl: Duration,
    pub join_token: Option<String>,
    /// Operator tokens with roles (`--operator-token-file`); None: the join token is the admin
    /// credential.
    pub operator_tokens: Option<Vec<OperatorToken>>,
    /// TLS on every endpoint (`--tls-cert`, `--tls-key`, `--tls-client-ca`).
    pub tls: Option<ServerTls>,
    /// Serve a non-loopback address without any credential (`--insecure`).
    pub insecure: bool,
    pub heartbeat_timeout: Duration,
    /// Where to serve Prometheus metrics (`--metrics-listen`), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The state store's recovery and the limits on what the coordinator keeps.
    pub state: limits::StateConfig,
}

/// Opens the state store and reads it. A damaged store is an error naming the file and the
/// damage, unless `--reset-state` is given: then it is moved aside, said so, and the
/// coordinator starts with an empty store.
fn open_state(
    config: &Config,
    fence: Option<ringmaster_store::Fence>,
) -> anyhow::Result<(Persister, crate::persist::Loaded)> {
    let dir = &config.data_dir;
    let open = || -> Result<_, ringmaster_store::StoreError> {
        let store = ringmaster_store::open_url_with(&config.store_url, dir, &config.etcd)?;
        Persister::start_fenced(
            store,
            &["jobs/", "jobparts/", "nodes/", core::CORDONS, "meta/"],
            crate::persist::RetryPolicy::default(),
            fence.clone(),
        )
    };
    match open() {
        Ok(opened) => {
            if config.state.reset_state {
                tracing::warn!(
                    data_dir = %dir.display(),
                    "--reset-state given, but the state store is not damaged: kept as it is"
                );
            }
            Ok(opened)
        }
        Err(e) if e.is_damage() && config.state.reset_state => {
            // The store may be open (a read failed after the open): it is dropped by now.
            let moved = ringmaster_store::RedbStore::move_aside(dir)
                .context("moving the damaged state store aside")?;
            let moved =
                moved.map_or_else(|| "nothing to move".to_owned(), |p| p.display().to_string());
            tracing::warn!(
                error = %e,
                moved_to = %moved,
                "--reset-state: moved the damaged state store aside; starting with an empty \
                 state (jobs and nodes of the old store are forgotten; job ids go on from \
                 the data dir's job-ids file)"
            );
            open().context("opening a new state store after --reset-state")
        }
        Err(e) if e.is_damage() => Err(anyhow::anyhow!(
            "{e}. The coordinator does not start on a damaged state store; start it with \
             --reset-state to move the file aside (to state.redb.damaged-<unix time>) and \
             start with an empty state"
        )),
        Err(e) if ringmaster_store::is_remote(&config.store_url) => {
            Err(anyhow::Error::new(e).context("opening the state store"))
        }
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("opening the state store in {}", dir.display())))
        }
    }
}

impl Config {
    /// A configuration with no credential and no TLS (loopback tests, benchmarks).
    pub fn new(data_dir: PathBuf) -> Config {
        Config {
            hostfile: None,
            data_dir,
            store_url: "embedded".into(),
            etcd: Default::default(),
            advertise: None,
            leader_ttl: Duration::from_secs(5),
            join_token: None,
            operator_tokens: None,
            tls: None,
            insecure: false,
            heartbeat_timeout: Duration::from_secs(10),
            metrics_listen: None,
            state: Default::default(),
        }
    }
}

/// The data dir holds job specs (with their `env:`) and the key worker credentials derive from:
/// readable by the coordinator's user only.
fn private_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("restricting {} to mode {mode:o}", p.display()))
    };
    set(dir, 0o700)?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            set(&entry.path(), 0o600)?;
        }
    }
    Ok(())
}

/// Store key of the secret worker credentials are derived from.
const WORKER_KEY_RECORD: &str = "meta/worker-key";

/// Why a listen address is refused: no credential is configured and the address is reachable
/// from other machines. None: the address may be served.
pub fn insecure_listen_refusal(
    addr: &std::net::SocketAddr,
    creds: &Credentials,
    insecure: bool,
) -> Option<String> {
    if creds.required() || insecure || addr.ip().is_loopback() {
        return None;
    }
    Some(format!(
        "refusing to listen on {addr} without any credential: anyone who reaches this port could \
         run commands on every node. Give --join-token-file (and --operator-token-file), listen \
         on a loopback address, or pass --insecure to accept the risk"
    ))
}

/// Runs the coordinator on `listener` until `shutdown` resolves.
///
/// # Errors
/// The state store cannot be opened or read, or the server fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shut = tokio_util::sync::CancellationToken::new();
    {
        let shut = shut.clone();
        tokio::spawn(async move {
            shutdown.await;
            shut.cancel();
        });
    }
    let addr = listener.local_addr()?;
    let listener = Arc::new(listener);
    let server_tls = config
        .tls
        .as_ref()
        .map(ServerTls::load)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    // Metrics for the whole process: counters that outlive a leadership, gauges from the loop
    // that serves now (`source`).
    let (metrics, counters) = crate::metrics::Metrics::new();
    let (source, source_rx) = tokio::sync::watch::channel(None);
    if let Some(at) = config.metrics_listen {
        let l = TcpListener::bind(at)
            .await
            .with_context(|| format!("--metrics-listen {at}: cannot listen"))?;
        let at = l.local_addr()?;
        tracing::info!(%at, "Prometheus metrics at http://{at}/metrics");
        tokio::spawn(crate::metrics::serve(
            l,
            Arc::new(counters),
            source_rx,
            shut.clone(),
        ));
    }
    let term = Term { metrics, source };
    if !ringmaster_store::is_remote(&config.store_url) {
        // The only coordinator on its state: serves until shutdown.
        return serve(config, addr, listener, server_tls, None, &term, shut)
            .await
            .map(|_| ());
    }
    // With etcd, several coordinators may share the state: lead before reading it.
    if let Some(why) = insecure_listen_refusal(
        &addr,
        &Credentials::new(config.join_token.clone(), config.operator_tokens.clone()),
        config.insecure,
    ) {
        anyhow::bail!(why);
    }
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| default_advertise(addr));
    let elector = ringmaster_store::Elector::connect(
        &config.store_url,
        &config.etcd,
        advertise.clone(),
        config.leader_ttl,
    )
    .await
    .context("joining the leader election")?;
    // The standby reads jobs from the same etcd for operators (opened off the async threads:
    // it checks that etcd answers).
    let store: Arc<dyn ringmaster_store::StateStore> = {
        let (url, opts) = (config.store_url.clone(), config.etcd.clone());
        Arc::new(
            tokio::task::spawn_blocking(move || ringmaster_store::EtcdStore::open(&url, &opts))
                .await
                .context("opening the state store")??,
        )
    };
    let creds = Arc::new(Credentials::new(
        config.join_token.clone(),
        config.operator_tokens.clone(),
    ));
    // Standby, leader, and standby again after a lost leadership: a deposed leader drops all
    // it knew (its view may be stale) and campaigns as a fresh candidate, reading the state
    // anew if it is elected again.
    loop {
        if shut.is_cancelled() {
            return Ok(());
        }
        let current = elector.leader().await.ok().flatten();
        tracing::info!(
            %advertise,
            leader = current.as_deref().unwrap_or("none"),
            ttl = %humantime::format_duration(config.leader_ttl),
            "campaigning for leadership (standby until elected)"
        );
        let standby = leader::Standby {
            elector: elector.clone(),
            store: store.clone(),
            creds: creds.clone(),
            tls: server_tls.clone(),
        };
        let Some(l) = leader::campaign(standby, listener.clone(), shut.clone()).await? else {
            return Ok(());
        };
        let l = Arc::new(l);
        let ended = serve(
            config.clone(),
            addr,
            listener.clone(),
            server_tls.clone(),
            Some(l.clone()),
            &term,
            shut.clone(),
        )
        .await;
        // A clean stop hands over at once. After a loss the lease may still live in etcd (a
        // leader that could not renew it in time): give it up too, so that this candidate
        // does not queue behind its own old key, but without waiting on an etcd that may be
        // gone (resigning deletes only this term's key, never a newer leader's).
        if matches!(ended, Ok(Ended::Stopped)) || l.valid() {
            l.resign().await;
        } else {
            tokio::spawn(async move { l.resign().await });
        }
        match ended {
            Ok(Ended::Stopped) => return Ok(()),
            Ok(Ended::LostLeadership { epoch }) => {
                tracing::warn!(
                    epoch,
                    "rejoining the election as a standby after losing leadership"
                );
            }
            Err(e) if shut.is_cancelled() => return Err(e),
            // Leading failed (the state could not be read just after the election: etcd lost
            // a member or its quorum in between): another coordinator, or this one a moment
            // later, takes over rather than the process ending.
            Err(e) => {
                tracing::error!(
                    error = %format!("{e:#}"),
                    "could not lead; rejoining the election as a standby"
                );
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shut.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// What each term of serving shares with the process: the metrics' counters, and where the
/// metrics server finds the loop that serves now.
struct Term {
    metrics: crate::metrics::Metrics,
    source: tokio::sync::watch::Sender<Option<core::Handle>>,
}

/// Clears the metrics server's handle to the serving loop when dropped.
struct Unpublish<'a>(&'a tokio::sync::watch::Sender<Option<core::Handle>>);

impl Drop for Unpublish<'_> {
    fn drop(&mut self) {
        self.0.send_replace(None);
    }
}

/// How [`serve`] ended without an error.
enum Ended {
    /// Shutdown was asked for.
    Stopped,
    /// The leadership of `epoch` was lost: every service stopped, the state dropped.
    LostLeadership { epoch: u64 },
}

/// This coordinator's address for others when it leads: the listen address, or the host name
/// and port when it listens on every interface.
fn default_advertise(addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Serves as the only coordinator on the state (the leader, with etcd) until `shut`, or until
/// the leadership is lost.
async fn serve(
    config: Config,
    addr: std::net::SocketAddr,
    listener: Arc<TcpListener>,
    server_tls: Option<tonic::transport::ServerTlsConfig>,
    leadership: Option<Arc<ringmaster_store::Leadership>>,
    term: &Term,
    shut: tokio_util::sync::CancellationToken,
) -> anyhow::Result<Ended> {
    let fence = leadership.as_ref().map(|l| l.fence().clone());
    // Opening etcd waits on the network: off the async threads.
    let (persist, mut loaded) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || open_state(&config, fence))
            .await
            .context("opening the state store")??
    };
    let remote = ringmaster_store::is_remote(&config.store_url);
    if config.store_url.trim() != "memory" && !remote {
        private_data_dir(&config.data_dir)?;
    }
    // The job-id floor file guards an embedded store that was reset; with etcd the ids live
    // in the store alone, so that any coordinator on it goes on from the same place.
    let local_ids = config.store_url.trim() != "memory" && !remote;
    let ids = JobIds::load(
        local_ids.then_some(config.data_dir.as_path()),
        core::stored_next_job(&loaded.records),
    )?;
    let mut creds = Credentials::new(config.join_token.clone(), config.operator_tokens.clone());
    if let Some(why) = insecure_listen_refusal(&addr, &creds, config.insecure) {
        anyhow::bail!(why);
    }
    // Worker credentials are derived from one secret kept with the state, so that a restarted
    // coordinator (or, later, another one on the same store) accepts the credentials of
    // workers that kept running.
    let key_pos = loaded
        .records
        .iter()
        .position(|(k, _)| k == WORKER_KEY_RECORD);
    let worker_key = match key_pos.map(|i| loaded.records.swap_remove(i)) {
        Some((_, v)) => WorkerKey::from_bytes(&v).with_context(|| {
            format!(
                "state store record {WORKER_KEY_RECORD} is damaged (expected 32 bytes, found {})",
                v.len()
            )
        })?,
        None => {
            let k = WorkerKey::generate();
            persist.put(WORKER_KEY_RECORD.into(), k.as_bytes().to_vec());
            persist
                .flush()
                .wait()
                .await
                .context("writing the worker credential key to the state store")?;
            k
        }
    };
    creds = creds.with_worker_key(worker_key);
    let creds = Arc::new(creds);
    let rendezvous = rendezvous::Rendezvous::new(config.state.rendezvous);
    let core_cfg = core::CoreConfig {
        hostfile: config.hostfile.clone(),
        heartbeat_timeout: config.heartbeat_timeout,
        creds: creds.clone(),
        job_limits: config.state.jobs,
        leading: leadership.clone(),
        metrics: term.metrics.clone(),
    };
    let fenced = persist.fenced();
    let stopping = tokio_util::sync::CancellationToken::new();
    let core = core::Core::new(core_cfg, persist, loaded.records, rendezvous.clone(), ids);
    let (handle, core_task) = core::spawn(core, stopping.clone());
    // Whatever way this function returns from here, the loop stops and the metrics server
    // lets go of its handle.
    let _stop_loop = stopping.clone().drop_guard();
    let _unpublish = Unpublish(&term.source);
    term.source.send_replace(Some(handle.clone()));

    // Reports are converted and boxed once, by the stream that received them: from there on a
    // report moves as a pointer.
    let (progress_tx, mut progress_rx) =
        tokio::sync::mpsc::channel::<Box<core::types::ProgressReport>>(4096);
    let h2 = handle.clone();
    let progress_task = tokio::spawn(async move {
        while let Some(p) = progress_rx.recv().await {
            h2.send(core::Cmd::Progress(p)).await;
        }
    });

    let (health_reporter, health_svc) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::agent_service_server::AgentServiceServer<agent_svc::AgentSvc>>()
        .await;
    health_reporter
        .set_serving::<pb::job_service_server::JobServiceServer<job_svc::JobSvc>>()
        .await;
    health_reporter
        .set_serving::<pb::rendezvous_service_server::RendezvousServiceServer<rendezvous::RendezvousSvc>>()
        .await;

    // Every service sits behind a gate that identifies the caller and refuses credentials the
    // service never accepts; the handlers check per-method roles and scopes.
    let agent = InterceptedService::new(
        pb::agent_service_server::AgentServiceServer::new(agent_svc::AgentSvc {
            core: handle.clone(),
            creds: creds.clone(),
            require_client_cert: config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
        Gate::new(creds.clone(), Service::Agent),
    );
    let jobs = InterceptedService::new(
        pb::job_service_server::JobServiceServer::new(job_svc::JobSvc {
            core: handle.clone(),
            creds: creds.clone(),
        })
        .max_decoding_message_size(MAX_SUBMIT_BYTES),
        Gate::new(creds.clone(), Service::Jobs),
    );
    let rdzv = InterceptedService::new(
        pb::rendezvous_service_server::RendezvousServiceServer::new(rendezvous::RendezvousSvc {
            store: rendezvous,
            progress: progress_tx,
            creds: creds.clone(),
            stopping: stopping.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
        Gate::new(creds.clone(), Service::Rendezvous),
    );

    // gRPC reflection (`grpcurl list`, `describe`), v1 and the v1alpha older clients ask for,
    // behind the operators' gate: the schema is shown to whoever may call JobService.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = InterceptedService::new(
        reflection()
            .build_v1()
            .context("the gRPC reflection service")?,
        Gate::new(creds.clone(), Service::Jobs),
    );
    let reflection_v1alpha = InterceptedService::new(
        reflection()
            .build_v1alpha()
            .context("the gRPC reflection service")?,
        Gate::new(creds.clone(), Service::Jobs),
    );

    tracing::info!(
        %addr,
        hostfile_hosts = config.hostfile.as_ref().map(|h| h.hosts.len()),
        data_dir = %config.data_dir.display(),
        tls = server_tls.is_some(),
        mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        credentials = creds.required(),
        operator_tokens = config.operator_tokens.as_ref().map(Vec::len),
        "coordinator listening"
    );
    if !creds.required() {
        tracing::warn!(
            "no credential configured: every call is accepted from whoever reaches {addr}"
        );
    }
    if server_tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!("no TLS (--tls-cert/--tls-key): credentials cross the network in clear");
    }
    // The server's own tcp_nodelay does not reach sockets of a caller-supplied listener:
    // `accept` sets it.
    let incoming = leader::accept(listener);
    // Stops the server gracefully (no new connections, GOAWAY to the open ones) and the loop
    // with it, which ends agent streams and watches so that the open calls can finish.
    let server_stop = tokio_util::sync::CancellationToken::new();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls {
        builder = builder
            .tls_config(tls)
            .context("TLS settings (--tls-cert/--tls-key/--tls-client-ca)")?;
    }
    let server = builder
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_svc)
        .add_service(agent)
        .add_service(jobs)
        .add_service(rdzv)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, server_stop.clone().cancelled_owned());
    let mut server = Box::pin(server);
    // Leadership lost (lease not renewed in time, or a write refused by the fence): stop at
    // once, serving nothing more.
    let lost = {
        let leadership = leadership.clone();
        async move {
            match leadership {
                Some(l) => {
                    // Lapsed (no renewal answered for TTL - 1 s) counts too: another
                    // coordinator may lead by now.
                    let lapsed = {
                        let l = l.clone();
                        async move {
                            while l.valid() {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    };
                    tokio::select! {
                        _ = l.lost() => {}
                        _ = lapsed => {}
                        _ = fenced => {}
                    }
                    l.epoch()
                }
                None => std::future::pending().await,
            }
        }
    };
    let mut server_ended = false;
    let ended = tokio::select! {
        r = &mut server => {
            server_ended = true;
            r.context("gRPC server").map(|()| Ended::Stopped)
        }
        _ = shut.cancelled() => {
            tracing::info!("coordinator shutting down");
            Ok(Ended::Stopped)
        }
        epoch = lost => {
            tracing::error!(epoch, "lost leadership: stopping at once (a newer coordinator leads, etcd could not renew the lease in time, or the state could not be saved)");
            Ok(Ended::LostLeadership { epoch })
        }
    };
    // Whatever ended it, everything of this term stops before `serve` returns: the loop
    // (which ends agent streams, watches and log fetches), open rendezvous waits and progress
    // streams (their `stopping`), then the server.
    server_stop.cancel();
    stopping.cancel();
    term.source.send_replace(None);
    if !server_ended {
        match tokio::time::timeout(Duration::from_secs(5), &mut server).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "the gRPC server failed while stopping"),
            Ok(Ok(())) => {}
            Err(_) => tracing::warn!("requests still open 5s after shutdown began; closing them"),
        }
    }
    drop(server);
    drop(handle);
    progress_task.abort();
    // The loop ends once every handle is gone (the services were dropped with the server);
    // one that does not is ended here, so that nothing of this leadership acts any more.
    let mut core_task = core_task;
    if tokio::time::timeout(Duration::from_secs(5), &mut core_task)
        .await
        .is_err()
    {
        core_task.abort();
    }
    ended
}
