//! The coordinator's RendezvousService as a collectives bootstrap [`Store`]: keys are scoped to
//! the job generation named by the worker's environment (`RINGMASTER_JOB_ID`,
//! `RINGMASTER_GENERATION`), so a rank of a stale generation cannot read or overwrite a newer
//! one's addresses (the coordinator refuses its scope). Every call carries the generation's
//! worker credential (`RINGMASTER_WORKER_TOKEN`) and uses TLS when the agent gave a CA
//! (`RINGMASTER_TLS_CA`).

use std::time::Duration;

use ringmaster_auth::{AuthChannel, Bearer, ClientTls};
use ringmaster_collectives::{CommError, Store};
use ringmaster_proto as pb;

/// A blocking store client over gRPC (it owns a small runtime; the collectives are blocking).
pub struct GrpcStore {
    rt: tokio::runtime::Runtime,
    client: pb::rendezvous_service_client::RendezvousServiceClient<AuthChannel>,
    scope: pb::Scope,
}

impl GrpcStore {
    /// Connects to the coordinator at `addr` (host:port), or to the leader of a list of
    /// coordinators (`a:29500,b:29500`).
    ///
    /// # Errors
    /// The coordinator cannot be reached.
    pub fn connect(addr: &str, job_id: &str, generation: u64) -> Result<GrpcStore, CommError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CommError::Store(format!("runtime: {e}")))?;
        let tls = ClientTls::from_env();
        let client = rt
            .block_on(async {
                let ch = ringmaster_auth::client::connect_leader(
                    addr,
                    &tls,
                    Duration::from_secs(10),
                    "ringmaster.v1.RendezvousService",
                )
                .await?;
                Ok::<_, ringmaster_auth::DialError>(
                    pb::rendezvous_service_client::RendezvousServiceClient::with_interceptor(
                        ch,
                        Bearer::from_worker_env(),
                    ),
                )
            })
            .map_err(|e| CommError::Store(e.to_string()))?;
        Ok(GrpcStore {
            rt,
            client,
            scope: pb::Scope {
                job_id: job_id.to_owned(),
                generation,
            },
        })
    }
}

impl Store for GrpcStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.set(pb::SetRequest {
                scope: Some(self.scope.clone()),
                key: key.to_owned(),
                value: value.to_vec(),
            }))
            .map(|_| ())
            .map_err(|s| CommError::Store(format!("set {key}: {}", s.message())))
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, CommError> {
        let mut c = self.client.clone();
        let r = self
            .rt
            .block_on(c.get(pb::GetRequest {
                scope: Some(self.scope.clone()),
                key: key.to_owned(),
                wait_ms: timeout.as_millis() as u64,
            }))
            .map_err(|s| CommError::Store(format!("get {key}: {}", s.message())))?
            .into_inner();
        if r.found {
            Ok(r.value)
        } else {
            Err(CommError::Store(format!(
                "key '{key}' not set within {timeout:?}"
            )))
        }
    }
}
