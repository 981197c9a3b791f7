//! `AgentService`: authenticates an agent's stream and bridges it to the loop.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use ringmaster_auth::Credentials;
use ringmaster_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::server::core::{Cmd, Handle};

/// How long an agent has to send its Join after connecting.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AgentSvc {
    pub core: Handle,
    pub creds: Arc<Credentials>,
    /// Mutual TLS: an agent must present a certificate that chains to `--tls-client-ca` (the
    /// TLS layer verified the chain; this checks that one was presented at all).
    pub require_client_cert: bool,
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentSvc {
    type SessionStream =
        Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send + 'static>>;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = req.remote_addr();
        // The gate let only the join token (or, with no credential configured, anyone) through.
        ringmaster_auth::credentials::caller(&req)?;
        if self.require_client_cert && req.peer_certs().is_none_or(|c| c.is_empty()) {
            tracing::warn!(?peer, "agent refused: no client certificate");
            return Err(Status::unauthenticated(
                "this coordinator requires agents to present a client certificate (mutual TLS): \
                 start the agent with --tls-cert and --tls-key",
            ));
        }
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(JOIN_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Join within 10s of connecting"))??;
        let join = match first.and_then(|m| m.msg) {
            Some(pb::agent_message::Msg::Join(j)) => j,
            _ => return Err(Status::invalid_argument("the first message must be a Join")),
        };
        // The Join repeats the token; when it does, it must be the join token too.
        if self.creds.required() && !join.token.is_empty() {
            let who = self.creds.identify_token(&join.token).inspect_err(|_| {
                tracing::warn!(node = %join.name, ?peer, "agent refused: wrong join token");
            })?;
            self.creds.require_agent(&who)?;
        }
        let major = join.version.split('.').next().unwrap_or("");
        if major != ringmaster_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent speaks protocol version '{}', this coordinator speaks {}",
                join.version,
                ringmaster_proto::PROTOCOL_VERSION
            )));
        }
        let name = join.name.clone();
        let (tx, rx) = mpsc::channel(1024);
        let (conn, _ack) = self
            .core
            .call(|reply| Cmd::AgentJoin {
                join: Box::new(join.into()),
                peer,
                tx,
                reply,
            })
            .await??;
        // The loop queued the JoinAck on the stream before anything else.
        let core = self.core.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if let Some(msg) = m.msg {
                            core.send(Cmd::AgentMsg {
                                node: name.clone(),
                                conn,
                                msg: msg.into(),
                            })
                            .await;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(node = %name, error = %e, "agent stream error");
                        break;
                    }
                }
            }
            core.send(Cmd::AgentGone { node: name, conn }).await;
        });
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            ReceiverStream::new(rx),
            |m| m.map(pb::CoordinatorMessage::from).map_err(Status::from),
        ))))
    }
}
