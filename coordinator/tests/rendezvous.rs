//! The trainers' rendezvous service over gRPC, with an in-process coordinator and agent
//! running a real job: store, waits, barrier, stale-generation refusal, progress → status.

use std::time::Duration;

use ringmaster_proto as pb;

mod common;

use common::{Solo, rendezvous_client as client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_barrier_and_progress_through_grpc() {
    let solo = Solo::start("rdzv", 2, |c| c).await;
    let (addr, id) = (solo.addr.clone(), solo.id.clone());
    let mut jobs = solo.jobs.clone();
    let scope = Some(pb::Scope {
        job_id: id.clone(),
        generation: 0,
    });

    // A get that waits sees a later set.
    let mut c1 = client(&addr).await;
    let mut c2 = client(&addr).await;
    let sc = scope.clone();
    let waiter = tokio::spawn(async move {
        c2.get(pb::GetRequest {
            scope: sc,
            key: "nccl-id".into(),
            wait_ms: 10_000,
        })
        .await
        .unwrap()
        .into_inner()
    });
    // The get may start before or after the set: either way it must return the value.
    c1.set(pb::SetRequest {
        scope: scope.clone(),
        key: "nccl-id".into(),
        value: vec![7; 128],
    })
    .await
    .unwrap();
    let got = waiter.await.unwrap();
    assert!(got.found);
    assert_eq!(got.value, vec![7; 128]);

    // add and compare-and-set.
    for want in 1..=3 {
        let v = c1
            .add(pb::AddRequest {
                scope: scope.clone(),
                key: "n".into(),
                delta: 1,
            })
            .await
            .unwrap()
            .into_inner()
            .value;
        assert_eq!(v, want);
    }
    let cas = c1
        .compare_and_set(pb::CompareAndSetRequest {
            scope: scope.clone(),
            key: "leader".into(),
            expected: None,
            desired: b"rank0".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cas.swapped);

    // A barrier of two.
    let mut handles = Vec::new();
    for rank in 0..2 {
        let mut c = client(&addr).await;
        let sc = scope.clone();
        handles.push(tokio::spawn(async move {
            c.barrier(pb::BarrierRequest {
                scope: sc,
                name: "init".into(),
                rank,
                world_size: 2,
                timeout_ms: 10_000,
            })
            .await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }

    // A stale or unknown generation is refused.
    let err = c1
        .set(pb::SetRequest {
            scope: Some(pb::Scope {
                job_id: id.clone(),
                generation: 5,
            }),
            key: "x".into(),
            value: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // Progress of rank 0 shows in the job status.
    let progress = vec![pb::Progress {
        scope: scope.clone(),
        rank: 0,
        step: 12,
        total_steps: 100,
        loss: Some(2.5),
        tokens_per_second: 1234.0,
        collective_seq: 99,
        ..Default::default()
    }];
    c1.report_progress(tokio_stream::iter(progress))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let st = jobs
            .get(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let p = st.progress.unwrap();
        if p.step == Some(12) {
            assert_eq!(p.total_steps, Some(100));
            assert_eq!(p.loss, Some(2.5));
            assert_eq!(st.ranks[0].collective_seq, Some(99));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Once the job is cancelled its generation's store is closed.
    jobs.cancel(pb::CancelRequest {
        job_id: id.clone(),
        grace_ms: 500,
    })
    .await
    .unwrap();
    let err = c1
        .get(pb::GetRequest {
            scope: scope.clone(),
            key: "nccl-id".into(),
            wait_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    solo.stop().await;
}
