//! The rendezvous store's per-generation limits over gRPC (`--rendezvous-max-keys`,
//! `--rendezvous-max-bytes`), with an in-process coordinator and agent running a real job.

use std::time::Duration;

use ringmaster_coordinator::server::limits::{RendezvousLimits, StateConfig};
use ringmaster_proto as pb;
use tokio_util::sync::CancellationToken;

type RendezvousClient =
    pb::rendezvous_service_client::RendezvousServiceClient<tonic::transport::Channel>;
type JobClient = pb::job_service_client::JobServiceClient<tonic::transport::Channel>;

/// Every gRPC client of this test is made here (credentials, once required, go here).
async fn rendezvous_client(addr: &str) -> RendezvousClient {
    RendezvousClient::connect(format!("http://{addr}"))
        .await
        .expect("connecting to the rendezvous service")
}

async fn job_client(addr: &str) -> JobClient {
    JobClient::connect(format!("http://{addr}"))
        .await
        .expect("connecting to the job service")
}

fn set(scope: &Option<pb::Scope>, key: &str, value: Vec<u8>) -> pb::SetRequest {
    pb::SetRequest {
        scope: scope.clone(),
        key: key.into(),
        value,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_over_a_generations_limits_are_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let cfg = ringmaster_coordinator::server::Config {
        store_url: "memory".into(),
        state: StateConfig {
            rendezvous: RendezvousLimits {
                max_keys: 8,
                max_bytes: 4096,
            },
            ..StateConfig::default()
        },
        ..ringmaster_coordinator::server::Config::new(dir.path().join("data"))
    };
    let s = stop.clone();
    let server = tokio::spawn(ringmaster_coordinator::server::run(
        cfg,
        listener,
        async move { s.cancelled().await },
    ));
    let agent_cfg = ringmaster_agent::Config {
        join: addr.clone(),
        name: "solo".into(),
        slots: 1,
        work_dir: dir.path().join("work"),
        token: None,
        tls: Default::default(),
        log_rotation: Default::default(),
        allowed_roots: Vec::new(),
        advertise_addr: "127.0.0.1".into(),
        trainer: "trainer".into(),
        max_backoff: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(1),
    };
    let s = stop.clone();
    let agent = tokio::spawn(ringmaster_agent::run(agent_cfg, async move {
        s.cancelled().await
    }));

    let mut jobs = job_client(&addr).await;
    let spec = serde_json::json!({"name": "limits", "command": ["sleep", "30"]});
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
    let scope = Some(pb::Scope {
        job_id: id.clone(),
        generation: 0,
    });
    let mut c = rendezvous_client(&addr).await;

    // Keys: 8 fit, the 9th is refused naming the limit and its flag; replacing one is fine.
    for k in 0..8 {
        c.set(set(&scope, &format!("k{k}"), vec![1; 10]))
            .await
            .unwrap();
    }
    let err = c.set(set(&scope, "k8", vec![])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--rendezvous-max-keys 8"), "{err:?}");
    let err = c
        .add(pb::AddRequest {
            scope: scope.clone(),
            key: "counter".into(),
            delta: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    c.set(set(&scope, "k0", vec![2; 10])).await.unwrap();

    // Bytes: growing one value past 4 KiB in all is refused, and the old value stays.
    let err = c.set(set(&scope, "k1", vec![3; 4050])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("above the limit of 4KiB (--rendezvous-max-bytes)"),
        "{err:?}"
    );
    let err = c
        .compare_and_set(pb::CompareAndSetRequest {
            scope: scope.clone(),
            key: "k2".into(),
            expected: Some(vec![1; 10]),
            desired: vec![4; 4090],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    let got = c
        .get(pb::GetRequest {
            scope: scope.clone(),
            key: "k1".into(),
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value, vec![1; 10]);
    // Deleting makes room again.
    c.delete(pb::DeleteRequest {
        scope: scope.clone(),
        key: "k3".into(),
    })
    .await
    .unwrap();
    c.set(set(&scope, "k1", vec![3; 3000])).await.unwrap();

    jobs.cancel(pb::CancelRequest {
        job_id: id,
        grace_ms: 500,
    })
    .await
    .unwrap();
    stop.cancel();
    agent.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
