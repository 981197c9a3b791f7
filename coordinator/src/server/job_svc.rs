//! `JobService`: the operators' API, forwarded to the loop.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use ringmaster_auth::{Credentials, Role};
use ringmaster_proto as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::server::core::{Cmd, Handle};
use crate::spec::{JobSpec, MAX_SPEC_BYTES};

pub struct JobSvc {
    pub core: Handle,
    pub creds: Arc<Credentials>,
}

impl JobSvc {
    /// Calls that change what runs on the cluster need the admin role (the gate already let
    /// only operator credentials through).
    fn require_admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let caller = ringmaster_auth::credentials::caller(req)?;
        self.creds.require_operator(&caller, Role::Admin)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn terminal(state: &str) -> bool {
    matches!(state, "SUCCEEDED" | "FAILED" | "CANCELLED")
}

#[tonic::async_trait]
impl pb::job_service_server::JobService for JobSvc {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        self.require_admin(&req)?;
        let r = req.into_inner();
        if r.spec_json.len() > MAX_SPEC_BYTES {
            return Err(Status::invalid_argument(format!(
                "job spec is {} bytes, above the limit of {MAX_SPEC_BYTES}",
                r.spec_json.len()
            )));
        }
        let spec: JobSpec = serde_json::from_str(&r.spec_json)
            .map_err(|e| Status::invalid_argument(format!("job spec: {e}")))?;
        let files = r.files.into_iter().collect();
        let job = self
            .core
            .call(|reply| Cmd::Submit { spec, files, reply })
            .await??;
        Ok(Response::new(pb::SubmitResponse { job: Some(job) }))
    }

    async fn get(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let id = req.into_inner().job_id;
        let st = self.core.call(|reply| Cmd::Get { id, reply }).await??;
        Ok(Response::new(st))
    }

    async fn list(
        &self,
        _req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let jobs = self.core.call(|reply| Cmd::List { reply }).await?;
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    type WatchStream = BoxStream<pb::JobStatus>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = req.into_inner().job_id;
        let rx = self.core.call(|reply| Cmd::Watch { id, reply }).await??;
        // The status now, then every change, until (and including) the first terminal one.
        let stream =
            futures::stream::unfold((rx, false, true), |(mut rx, done, first)| async move {
                if done {
                    return None;
                }
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let st = rx.borrow_and_update().clone();
                let done = terminal(&st.state);
                Some((Ok(st), (rx, done, false)))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.require_admin(&req)?;
        let r = req.into_inner();
        let grace_ms = if r.grace_ms == 0 { 5_000 } else { r.grace_ms };
        let st = self
            .core
            .call(|reply| Cmd::Cancel {
                id: r.job_id,
                grace_ms,
                reply,
            })
            .await??;
        Ok(Response::new(st))
    }

    async fn checkpoint(
        &self,
        req: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.require_admin(&req)?;
        let id = req.into_inner().job_id;
        let st = self
            .core
            .call(|reply| Cmd::Checkpoint { id, reply })
            .await??;
        Ok(Response::new(st))
    }

    async fn nodes(
        &self,
        _req: Request<pb::NodesRequest>,
    ) -> Result<Response<pb::NodesResponse>, Status> {
        let nodes = self.core.call(|reply| Cmd::Nodes { reply }).await?;
        Ok(Response::new(pb::NodesResponse { nodes }))
    }

    type LogsStream = BoxStream<pb::LogChunk>;

    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        self.core
            .call(|reply| Cmd::Logs { req, tx, reply })
            .await??;
        // End the stream after the agent's eof chunk.
        let stream = ReceiverStream::new(rx).scan(false, |done, item| {
            if *done {
                return futures::future::ready(None);
            }
            *done = matches!(&item, Ok(c) if c.eof) || item.is_err();
            futures::future::ready(Some(item))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
