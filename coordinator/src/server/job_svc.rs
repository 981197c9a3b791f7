//! `JobService`: the operators' API, forwarded to the loop.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use ringmaster_auth::{Credentials, Role};
use ringmaster_proto as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::server::core::{Cmd, Handle, LOG_WINDOW_CHUNKS};
use crate::spec::{JobSpec, MAX_SPEC_BYTES};

/// Longest grace a cancel may give workers between SIGTERM and SIGKILL.
pub const MAX_CANCEL_GRACE_MS: u64 = 24 * 3_600_000;
/// A drain's grace when none is given: time for trainers to write a checkpoint on SIGTERM.
pub const DEFAULT_DRAIN_GRACE_MS: u64 = 30_000;

/// A request's grace between SIGTERM and SIGKILL: `default` for 0, at most
/// [`MAX_CANCEL_GRACE_MS`].
fn grace(what: &str, ms: u64, default: u64) -> Result<u64, Status> {
    let ms = if ms == 0 { default } else { ms };
    if ms > MAX_CANCEL_GRACE_MS {
        return Err(Status::invalid_argument(format!(
            "{what} grace_ms {ms}: at most {MAX_CANCEL_GRACE_MS} (24 hours) between SIGTERM \
             and SIGKILL"
        )));
    }
    Ok(ms)
}

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
            .call(|reply| Cmd::Submit {
                spec: Box::new(spec),
                files,
                reply,
            })
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
        let grace_ms = grace("cancel", r.grace_ms, 5_000)?;
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
        Ok(Response::new(pb::NodesResponse {
            nodes: nodes.into_iter().map(Into::into).collect(),
        }))
    }

    async fn cordon(
        &self,
        req: Request<pb::CordonRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        self.require_admin(&req)?;
        let r = req.into_inner();
        let node = self
            .core
            .call(|reply| Cmd::Cordon {
                node: r.node,
                cordon: r.cordon,
                reply,
            })
            .await??;
        Ok(Response::new(node.into()))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        self.require_admin(&req)?;
        let r = req.into_inner();
        let grace_ms = grace("drain", r.grace_ms, DEFAULT_DRAIN_GRACE_MS)?;
        let (node, moved) = self
            .core
            .call(|reply| Cmd::Drain {
                node: r.node,
                grace_ms,
                reply,
            })
            .await??;
        Ok(Response::new(pb::DrainResponse {
            node: Some(node.into()),
            moved_jobs: moved,
        }))
    }

    type LogsStream = BoxStream<pb::LogChunk>;

    async fn logs(
        &self,
        req: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = req.into_inner().into();
        let (tx, rx) = mpsc::channel(LOG_WINDOW_CHUNKS as usize + 2);
        let request_id = self
            .core
            .call(|reply| Cmd::Logs { req, tx, reply })
            .await??;
        let reader = LogReader {
            rx,
            taken: 0,
            done: false,
            fetch: FetchGuard {
                core: self.core.clone(),
                request_id,
            },
        };
        // tonic asks for the next chunk when the client's HTTP/2 window has room: each chunk
        // taken is a credit for the agent, so a slow client slows the agent's reading.
        let stream = futures::stream::unfold(reader, |mut r| async move {
            if r.done {
                return None;
            }
            let item = r.rx.recv().await?;
            match &item {
                Ok(c) if !c.eof => {
                    r.taken += 1;
                    if r.taken >= LOG_CREDIT_BATCH {
                        let chunks = std::mem::take(&mut r.taken);
                        r.fetch
                            .core
                            .send(Cmd::LogCredit {
                                request_id: r.fetch.request_id,
                                chunks,
                            })
                            .await;
                    }
                }
                // The agent's eof chunk or an error ends the stream.
                _ => r.done = true,
            }
            Some((item.map(pb::LogChunk::from).map_err(Status::from), r))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type EventsStream = BoxStream<pb::JobEvent>;

    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let r = req.into_inner();
        let (id, follow) = (r.job_id, r.follow);
        // Subscribed before the first read: a change between the two is then seen.
        let rx = if follow {
            Some(
                self.core
                    .call(|reply| Cmd::Watch {
                        id: id.clone(),
                        reply,
                    })
                    .await??,
            )
        } else {
            None
        };
        let (first, done) = self
            .core
            .call(|reply| Cmd::Events {
                id: id.clone(),
                after: r.after_seq,
                reply,
            })
            .await??;
        let first: Vec<Result<pb::JobEvent, Status>> =
            first.iter().map(|e| Ok(crate::status::event(e))).collect();
        let Some(rx) = rx.filter(|_| !done) else {
            return Ok(Response::new(Box::pin(futures::stream::iter(first))));
        };
        // Following: on every change of the job's status, the events since the last one
        // sent, until the job has ended and its last events are out.
        let last = first
            .last()
            .and_then(|e| e.as_ref().ok())
            .map_or(r.after_seq, |e| e.seq);
        let follow = EventFollower {
            core: self.core.clone(),
            id,
            rx,
            last,
            done: false,
        };
        let rest = futures::stream::unfold(follow, |mut f| async move {
            loop {
                if f.done {
                    return None;
                }
                if f.rx.changed().await.is_err() {
                    // The job was removed (NOT_FOUND from the read below), or the coordinator
                    // stopped serving: then the client follows on elsewhere.
                    let (after, id) = (f.last, f.id.clone());
                    let gone = match f.core.call(|reply| Cmd::Events { id, after, reply }).await {
                        Ok(Err(e)) => Status::from(e),
                        _ => Status::unavailable("the coordinator stopped serving; follow again"),
                    };
                    return Some((vec![Err(gone)], f.stop()));
                }
                let (after, id) = (f.last, f.id.clone());
                let got = match f.core.call(|reply| Cmd::Events { id, after, reply }).await {
                    Ok(got) => got,
                    Err(e) => return Some((vec![Err(Status::from(e))], f.stop())),
                };
                match got {
                    Ok((events, done)) => {
                        f.done = done;
                        if let Some(e) = events.last() {
                            f.last = e.seq;
                        }
                        if !events.is_empty() || done {
                            let out = events.iter().map(|e| Ok(crate::status::event(e))).collect();
                            return Some((out, f));
                        }
                    }
                    Err(e) => return Some((vec![Err(Status::from(e))], f.stop())),
                }
            }
        })
        .flat_map(futures::stream::iter);
        Ok(Response::new(Box::pin(
            futures::stream::iter(first).chain(rest),
        )))
    }
}

/// A follower of a job's events ([`pb::job_service_server::JobService::events`]).
struct EventFollower {
    core: Handle,
    id: String,
    rx: tokio::sync::watch::Receiver<pb::JobStatus>,
    last: u64,
    done: bool,
}

impl EventFollower {
    fn stop(mut self) -> EventFollower {
        self.done = true;
        self
    }
}

/// Chunks taken by a log reader before they are granted back to the agent, in one message.
const LOG_CREDIT_BATCH: u32 = LOG_WINDOW_CHUNKS / 2;

struct LogReader {
    rx: mpsc::Receiver<
        Result<crate::server::core::types::LogChunk, crate::server::error::CoreError>,
    >,
    taken: u32,
    done: bool,
    fetch: FetchGuard,
}

/// Ends a log fetch on the agent when its reader goes away (the client hung up, or the
/// stream ended): without it the agent would wait for credits until it reconnects.
struct FetchGuard {
    core: Handle,
    request_id: u64,
}

impl Drop for FetchGuard {
    fn drop(&mut self) {
        let core = self.core.clone();
        let request_id = self.request_id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { core.send(Cmd::LogDone { request_id }).await });
        }
    }
}
