//! The rendezvous store's per-generation limits over gRPC (`--rendezvous-max-keys`,
//! `--rendezvous-max-bytes`), with an in-process coordinator and agent running a real job.

use ringmaster_coordinator::server::limits::{RendezvousLimits, StateConfig};
use ringmaster_proto as pb;

mod common;

use common::{Solo, rendezvous_client};

fn set(scope: &Option<pb::Scope>, key: &str, value: Vec<u8>) -> pb::SetRequest {
    pb::SetRequest {
        scope: scope.clone(),
        key: key.into(),
        value,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_over_a_generations_limits_are_resource_exhausted() {
    let solo = Solo::start("limits", 1, |c| ringmaster_coordinator::server::Config {
        state: StateConfig {
            rendezvous: RendezvousLimits {
                max_keys: 8,
                max_bytes: 4096,
            },
            ..StateConfig::default()
        },
        ..c
    })
    .await;
    let (addr, id) = (solo.addr.clone(), solo.id.clone());
    let mut jobs = solo.jobs.clone();
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
    solo.stop().await;
}
