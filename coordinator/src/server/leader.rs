//! Leadership when the state is in etcd: several coordinators, one leader.
//!
//! A coordinator on etcd campaigns before it reads any state ([`campaign`]). While it waits it
//! is a standby: it listens, its health service says NOT_SERVING for Ringmaster's services,
//! it answers the operators' reads (`JobService.Get`/`List`, behind the same credentials)
//! from etcd, and every other call gets UNAVAILABLE "this coordinator is a standby; the leader
//! is at X" with the leader's address in the `ringmaster-leader` metadata, so that agents,
//! trainers and ringctl given several addresses move on to the leader. A standby's reads show
//! what the leader last saved: states, ranks, restarts and checkpoints, not the step and loss
//! of the last second (progress is published, not saved, per report). Once elected it reads the state
//! fresh and serves as the only writer, every write fenced by its leadership.
//!
//! A leader that loses its leadership (its lease not renewed in time, or a write refused by
//! the fence) stops serving at once, drops everything it held in memory (its view may be
//! stale), gives its old lease up, and campaigns again as a fresh standby (`server::run`): if
//! it is elected again it reads the state anew, as any new leader does. Kubernetes'
//! controller-manager exits on a lost lease and relies on its supervisor for the restart;
//! here the process stays up, one fewer moving part for an operator without one.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ringmaster_proto as pb;
use ringmaster_store::Elector;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use ringmaster_auth::Credentials;
use ringmaster_auth::credentials::{Gate, Service};
use ringmaster_store::StateStore;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use super::{agent_svc, job_svc, rendezvous};
use crate::job::{Job, record};

/// The metadata key of a standby's refusals: the leader's address.
pub const LEADER_HINT: &str = "ringmaster-leader";

/// Accepted connections of a listener that a standby and then the leader serve in turn.
pub(super) fn accept(
    listener: Arc<TcpListener>,
) -> impl futures::Stream<Item = std::io::Result<TcpStream>> + Send + 'static {
    futures::stream::unfold(listener, |l| async move {
        let conn = l.accept().await.map(|(s, _)| {
            // Nagle's algorithm would hold small replies for a delayed ACK (~40 ms each).
            if let Err(e) = s.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
            s
        });
        Some((conn, l))
    })
}

/// What a standby serves with: its view of the cluster and the operators' credentials.
pub(super) struct Standby {
    pub elector: Elector,
    /// The shared state, read for `JobService.Get`/`List`.
    pub store: Arc<dyn StateStore>,
    pub creds: Arc<Credentials>,
    pub tls: Option<tonic::transport::ServerTlsConfig>,
}

/// Waits until the standby's elector leads (then `Some`), or `shutdown` (then `None`),
/// serving as a standby on `listener` meanwhile.
pub(super) async fn campaign(
    standby: Standby,
    listener: Arc<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<ringmaster_store::Leadership>> {
    let stop = CancellationToken::new();
    let elector = standby.elector.clone();
    let standby_addr = elector.value().to_owned();
    let mut standby = tokio::spawn(serve_standby(standby, listener, stop.clone()));
    // A failed campaign (etcd unreachable for a while, an etcd election) is tried again: a
    // standby stays one until it leads or is stopped.
    let won = async {
        let mut pause = Duration::from_millis(500);
        loop {
            match elector.campaign().await {
                Ok(l) => return l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "campaign failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    };
    let won = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        won = won => Some(won),
    };
    if let Some(l) = &won {
        // Leading from now on (logged before the standby's connections drain).
        tracing::info!(advertise = %standby_addr, epoch = l.epoch(), "leading");
    }
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(2), &mut standby).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the standby server failed"),
        Ok(_) => {}
        Err(_) => {
            standby.abort();
            tracing::warn!("standby connections still open 2 s after leading; closed");
        }
    }
    Ok(won)
}

/// The leader's address as a standby tells it: asked of etcd at most once a second (thousands
/// of agents knock during an election), with a bounded wait.
struct LeaderCache {
    elector: Elector,
    last: tokio::sync::Mutex<Option<(std::time::Instant, Option<String>)>>,
}

impl LeaderCache {
    async fn get(&self) -> Option<String> {
        let mut last = self.last.lock().await;
        if let Some((at, leader)) = last.as_ref()
            && at.elapsed() < Duration::from_secs(1)
        {
            return leader.clone();
        }
        let leader = self.elector.leader().await.ok().flatten();
        *last = Some((std::time::Instant::now(), leader.clone()));
        leader
    }
}

/// The standby's refusal: UNAVAILABLE naming the leader.
async fn not_the_leader(leader: &LeaderCache) -> Status {
    let leader = leader.get().await;
    let mut md = tonic::metadata::MetadataMap::new();
    let message = match &leader {
        Some(l) => {
            if let Ok(v) = l.parse() {
                md.insert(LEADER_HINT, v);
            }
            format!("this coordinator is a standby; the leader is at {l}")
        }
        None => "this coordinator is a standby and no leader is elected yet".to_owned(),
    };
    Status::with_metadata(tonic::Code::Unavailable, message, md)
}

/// The standby's answer to every call it does not serve.
async fn refusal(leader: Arc<LeaderCache>) -> http::Response<axum::body::Body> {
    not_the_leader(&leader).await.into_http()
}

/// The jobs as the leader last saved them.
async fn saved_jobs(store: Arc<dyn StateStore>) -> Result<Vec<Job>, Status> {
    // One listing of both prefixes (`jobs/`, `jobparts/`), read at one revision: two would
    // see a header written between them without the parts it names.
    let records = read_store(move || {
        let all = store.list("job")?;
        Ok(all
            .into_iter()
            .filter(|(k, _)| k.starts_with(record::HEADERS) || k.starts_with(record::PARTS))
            .collect::<Vec<_>>())
    })
    .await?;
    let decoded = record::decode(records.into_iter().map(|(k, v)| (k, v.value)));
    for (key, error) in &decoded.unreadable {
        tracing::warn!(key, error, "unreadable job record skipped");
    }
    let mut jobs = decoded.jobs;
    jobs.sort_by_key(|j| (j.created_unix_ms, j.id.clone()));
    Ok(jobs)
}

/// Runs a blocking store read off the async threads.
async fn read_store<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, ringmaster_store::StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| Status::internal(format!("reading the state store: {e}")))?
        .map_err(|e| Status::unavailable(format!("reading the state store: {e}")))
}

/// A standby's `JobService`: reads from the store, everything else to the leader.
struct StandbyJobs {
    leader: Arc<LeaderCache>,
    store: Arc<dyn StateStore>,
}

impl StandbyJobs {
    /// Job `id` as the leader last saved it.
    async fn saved_job(&self, id: String) -> Result<Job, Status> {
        if !ringmaster_common::names::is_safe_component(&id) {
            return Err(Status::not_found(format!("no job '{id}'")));
        }
        // The header and the parts are two reads: the leader may replace parts in between
        // (it deletes the old keys after the new header). Then the parts the header read
        // first names are gone, and a second try reads both anew.
        for _ in 0..3 {
            let store = self.store.clone();
            let (header, prefix) = (record::header_key(&id), format!("{}{id}/", record::PARTS));
            let list = prefix.clone();
            let (header, parts) = read_store(move || {
                let Some(h) = store.get(&header)? else {
                    return Ok((None, Vec::new()));
                };
                Ok((Some(h.value), store.list(&list)?))
            })
            .await?;
            let Some(header) = header else { break };
            let parts = parts
                .into_iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_owned(), v.value)))
                .collect();
            match record::decode_one(&header, &parts) {
                Ok(job) => return Ok(job),
                Err(e) => {
                    tracing::debug!(job = %id, error = %e, "job record read mid-write; reading again")
                }
            }
        }
        Err(Status::not_found(format!("no job '{id}'")))
    }
}

type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::job_service_server::JobService for StandbyJobs {
    async fn submit(
        &self,
        _: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        Err(not_the_leader(&self.leader).await)
    }

    async fn get(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let job = self.saved_job(req.into_inner().job_id).await?;
        Ok(Response::new(crate::status::job_status(&job)))
    }

    type EventsStream = BoxStream<pb::JobEvent>;

    /// The saved events; following them needs the leader (a standby sees no new ones).
    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let r = req.into_inner();
        let job = self.saved_job(r.job_id).await?;
        if r.follow && !job.state.is_terminal() {
            return Err(not_the_leader(&self.leader).await);
        }
        let events: Vec<Result<pb::JobEvent, Status>> = job
            .events
            .after(r.after_seq)
            .map(|e| Ok(crate::status::event(e)))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn list(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = saved_jobs(self.store.clone()).await?;
        let refs: Vec<&Job> = jobs.iter().collect();
        Ok(Response::new(pb::ListJobsResponse {
            jobs: crate::status::list(&refs, super::core::LIST_BUDGET_BYTES),
        }))
    }

    type WatchStream = BoxStream<pb::JobStatus>;

    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(not_the_leader(&self.leader).await)
    }

    async fn cancel(
        &self,
        _: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        Err(not_the_leader(&self.leader).await)
    }

    async fn checkpoint(
        &self,
        _: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        Err(not_the_leader(&self.leader).await)
    }

    async fn cordon(
        &self,
        _: Request<pb::CordonRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        Err(not_the_leader(&self.leader).await)
    }

    async fn drain(
        &self,
        _: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Err(not_the_leader(&self.leader).await)
    }

    async fn nodes(
        &self,
        _: Request<pb::NodesRequest>,
    ) -> Result<Response<pb::NodesResponse>, Status> {
        Err(not_the_leader(&self.leader).await)
    }

    type LogsStream = BoxStream<pb::LogChunk>;

    async fn logs(
        &self,
        _: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        Err(not_the_leader(&self.leader).await)
    }
}

async fn serve_standby(
    standby: Standby,
    listener: Arc<TcpListener>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let Standby {
        elector,
        store,
        creds,
        tls,
    } = standby;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<pb::agent_service_server::AgentServiceServer<agent_svc::AgentSvc>>()
        .await;
    reporter
        .set_not_serving::<pb::job_service_server::JobServiceServer<job_svc::JobSvc>>()
        .await;
    reporter
        .set_not_serving::<pb::rendezvous_service_server::RendezvousServiceServer<rendezvous::RendezvousSvc>>()
        .await;
    // Reads behind the operators' gate, as on the leader.
    let leader = Arc::new(LeaderCache {
        elector,
        last: Default::default(),
    });
    let jobs = InterceptedService::new(
        pb::job_service_server::JobServiceServer::new(StandbyJobs {
            leader: leader.clone(),
            store,
        }),
        Gate::new(creds, Service::Jobs),
    );
    let fallback = axum::Router::new().fallback(move || refusal(leader.clone()));
    let routes = tonic::service::Routes::from(fallback)
        .add_service(health)
        .add_service(jobs);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).context("TLS settings")?;
    }
    builder
        .tcp_nodelay(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(accept(listener), stop.cancelled_owned())
        .await
        .context("standby gRPC server")
}
