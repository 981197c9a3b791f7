//! What the in-process rendezvous tests start from: a coordinator (memory store, no credential,
//! loopback) and one agent named `solo`, with a `sleep` job RUNNING on it.

use std::time::Duration;

use ringmaster_coordinator::server::Config;
use ringmaster_proto as pb;
use tokio_util::sync::CancellationToken;

pub type JobClient = pb::job_service_client::JobServiceClient<tonic::transport::Channel>;
pub type RendezvousClient =
    pb::rendezvous_service_client::RendezvousServiceClient<tonic::transport::Channel>;

/// A running coordinator and agent; [`Solo::stop`] ends both and checks they ended cleanly.
pub struct Solo {
    pub addr: String,
    /// The running job's id (generation 0).
    pub id: String,
    pub jobs: JobClient,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    agent: tokio::task::JoinHandle<Result<(), ringmaster_agent::AgentError>>,
    _dir: tempfile::TempDir,
}

/// A rendezvous client of the test's coordinator.
pub async fn rendezvous_client(addr: &str) -> RendezvousClient {
    RendezvousClient::connect(format!("http://{addr}"))
        .await
        .expect("connecting to the rendezvous service")
}

impl Solo {
    /// Starts the coordinator (its config adjusted by `adjust`), the agent with `slots`, and a
    /// `sleep` job named `name`; returns once the job is RUNNING.
    pub async fn start(name: &str, slots: u32, adjust: impl FnOnce(Config) -> Config) -> Solo {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        let cfg = adjust(Config {
            store_url: "memory".into(),
            ..Config::new(dir.path().join("data"))
        });
        let s = stop.clone();
        let server = tokio::spawn(ringmaster_coordinator::server::run(
            cfg,
            listener,
            async move { s.cancelled().await },
        ));
        let agent_cfg = ringmaster_agent::Config {
            join: addr.clone(),
            name: "solo".into(),
            slots,
            work_dir: dir.path().join("work"),
            token: None,
            tls: Default::default(),
            worker_user: None,
            advertise_addr: "127.0.0.1".into(),
            trainer: "trainer".into(),
            max_backoff: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(1),
            log_rotation: Default::default(),
            allowed_roots: Vec::new(),
        };
        let s = stop.clone();
        let agent = tokio::spawn(ringmaster_agent::run(agent_cfg, async move {
            s.cancelled().await
        }));
        let mut jobs = JobClient::connect(format!("http://{addr}"))
            .await
            .expect("connecting to the job service");
        let spec = serde_json::json!({"name": name, "command": ["sleep", "30"]});
        let id = jobs
            .submit(pb::SubmitRequest {
                spec_json: spec.to_string(),
                files: Default::default(),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap()
            .id;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let st = jobs
                .get(pb::GetJobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if st.state == "RUNNING" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not running: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Solo {
            addr,
            id,
            jobs,
            stop,
            server,
            agent,
            _dir: dir,
        }
    }

    /// Stops the agent and the coordinator; both must end without an error.
    pub async fn stop(self) {
        self.stop.cancel();
        self.agent.await.unwrap().unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
