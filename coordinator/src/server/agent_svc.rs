//! `AgentService`: authenticates an agent's stream and bridges it to the loop.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use ringmaster_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::server::core::{Cmd, Handle};

/// How long an agent has to send its Join after connecting.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AgentSvc {
    pub core: Handle,
    pub token: Option<String>,
}

/// Compares in time independent of where the strings differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
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
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(JOIN_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Join within 10s of connecting"))??;
        let join = match first.and_then(|m| m.msg) {
            Some(pb::agent_message::Msg::Join(j)) => j,
            _ => return Err(Status::invalid_argument("the first message must be a Join")),
        };
        if let Some(token) = &self.token {
            if join.token.is_empty() {
                tracing::warn!(node = %join.name, ?peer, "agent refused: no join token");
                return Err(Status::unauthenticated(
                    "join token required: start the agent with --join-token-file",
                ));
            }
            if !constant_time_eq(join.token.as_bytes(), token.as_bytes()) {
                tracing::warn!(node = %join.name, ?peer, "agent refused: wrong join token");
                return Err(Status::unauthenticated("wrong join token"));
            }
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
                join,
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
                                msg,
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
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_compares() {
        use super::constant_time_eq as eq;
        assert!(eq(b"abc", b"abc"));
        assert!(!eq(b"abc", b"abd"));
        assert!(!eq(b"abc", b"ab"));
        assert!(!eq(b"", b"a"));
        assert!(eq(b"", b""));
    }
}
