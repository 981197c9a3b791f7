//! Log fetches: a worker's log streamed from its agent to a `ringctl logs` caller.

use super::*;

impl Core {
    pub(super) fn start_log_fetch(&mut self, req: LogQuery, tx: LogTx) -> Result<u64, CoreError> {
        let job = self
            .jobs
            .get(&req.job_id)
            .ok_or_else(|| unknown_job(&req.job_id))?;
        let generation = req.generation.unwrap_or(job.generation);
        let node = if generation == job.generation {
            job.ranks
                .get(req.rank as usize)
                .filter(|r| r.rank == req.rank)
                .map(|r| r.node.clone())
        } else {
            None
        };
        let Some(node) = node.or_else(|| {
            job.past_nodes(generation)
                .and_then(|ranks| ranks.get(req.rank as usize).cloned())
        }) else {
            return Err(CoreError::NotFound(
                job.no_rank_reason(req.rank, generation),
            ));
        };
        let rid = self.next_request;
        self.next_request += 1;
        let sent = self.send_to(
            &node,
            ToAgent::FetchLog(FetchLog {
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
                ToAgent::LogCredit {
                    request_id: rid,
                    chunks: LOG_WINDOW_CHUNKS,
                },
            );
        if !credited {
            if sent {
                self.send_to(&node, ToAgent::CancelFetch { request_id: rid });
            }
            return Err(CoreError::Unavailable(format!(
                "node {node}, which ran rank {}, is not connected",
                req.rank
            )));
        }
        self.log_requests.insert(rid, (node, tx));
        Ok(rid)
    }
}
