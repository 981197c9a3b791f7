//! Leadership when the state is in etcd: several coordinators, one leader.
//!
//! A coordinator on etcd campaigns before it reads any state ([`campaign`]). While it waits it
//! is a standby: it listens, its health service says NOT_SERVING for Ringmaster's services,
//! and every Ringmaster call gets UNAVAILABLE "this coordinator is a standby; the leader is at
//! X" with the leader's address in the `ringmaster-leader` metadata, so that agents, trainers
//! and ringctl given several addresses move on to the leader. Once elected it reads the state
//! fresh and serves as the only writer, every write fenced by its leadership.
//!
//! A leader that loses its leadership (its lease not renewed in time, or a write refused by
//! the fence) stops serving and the process exits with an error: its in-memory view may be
//! stale, and a supervisor (systemd, Kubernetes) restarts it as a fresh candidate. This is
//! what Kubernetes' controller-manager and scheduler do on a lost lease.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ringmaster_proto as pb;
use ringmaster_store::Elector;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{agent_svc, job_svc, rendezvous};

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

/// Waits until `elector` leads (then `Some`), or `shutdown` (then `None`), serving as a
/// standby on `listener` meanwhile.
pub(super) async fn campaign(
    elector: &Elector,
    listener: Arc<TcpListener>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<ringmaster_store::Leadership>> {
    let stop = CancellationToken::new();
    let standby = tokio::spawn(serve_standby(elector.clone(), listener, tls, stop.clone()));
    let won = tokio::select! {
        won = elector.campaign() => Some(won),
        _ = shutdown.cancelled() => None,
    };
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(2), standby).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the standby server failed"),
        Ok(_) => {}
        Err(_) => tracing::warn!("standby connections still open 2 s after leading; dropped"),
    }
    won.transpose().context("campaigning for leadership")
}

/// The standby's answer to every Ringmaster call.
async fn refusal(elector: Elector) -> http::Response<axum::body::Body> {
    let leader = elector.leader().await.ok().flatten();
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
    tonic::Status::with_metadata(tonic::Code::Unavailable, message, md).into_http()
}

async fn serve_standby(
    elector: Elector,
    listener: Arc<TcpListener>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
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
    let fallback = axum::Router::new().fallback(move || refusal(elector.clone()));
    let routes = tonic::service::Routes::from(fallback).add_service(health);
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
