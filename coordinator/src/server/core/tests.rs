use std::sync::Arc;

use super::reports::checkpoint_path_allowed;
use super::*;
use crate::persist::RetryPolicy;
use crate::persist::testing::{Flaky, FlakyStore};
use ringmaster_store::StateStore;

fn limits() -> JobLimits {
    JobLimits {
        retain_finished: 2,
        retain_for: Duration::from_secs(24 * 3600),
        max_jobs: 4,
        max_job_bytes: 1 << 20,
    }
}

/// A loop over a shared in-memory store that fails as `store` says.
fn core(store: &Arc<Flaky>, job_limits: JobLimits) -> Core {
    core_loading(store, job_limits, &["jobs/", "jobparts/", "meta/"])
}

/// As [`core`], loading what the store holds under `prefixes`.
fn core_with_prefixes(store: &Arc<Flaky>, prefixes: &[&str]) -> Core {
    core_loading(store, limits(), prefixes)
}

fn core_loading(store: &Arc<Flaky>, job_limits: JobLimits, prefixes: &[&str]) -> Core {
    let retry = RetryPolicy {
        attempts: 2,
        first_delay: Duration::from_millis(1),
    };
    let (persist, loaded) =
        Persister::start_with(Box::new(FlakyStore(store.clone())), prefixes, retry).unwrap();
    let ids = JobIds::load(None, stored_next_job(&loaded.records)).unwrap();
    let cfg = CoreConfig {
        metrics: crate::metrics::Metrics::new().0,
        hostfile: None,
        heartbeat_timeout: Duration::from_secs(10),
        creds: Default::default(),
        job_limits,
        leading: None,
    };
    Core::new(cfg, persist, loaded.records, Rendezvous::default(), ids)
}

fn spec(name: &str) -> JobSpec {
    JobSpec {
        name: Some(name.into()),
        command: Some(vec!["sleep".into(), "60".into()]),
        ..JobSpec::default()
    }
}

async fn submit(h: &Handle, name: &str) -> Result<pb::JobStatus, CoreError> {
    h.call(|reply| Cmd::Submit {
        spec: Box::new(spec(name)),
        files: BTreeMap::new(),
        reply,
    })
    .await?
}

#[tokio::test]
async fn a_submit_is_answered_once_the_job_is_in_the_store() {
    let store = Flaky::new(0);
    let (h, _task) = spawn(core(&store, limits()), Default::default());
    let st = submit(&h, "a").await.unwrap();
    assert_eq!(st.id, "a-1");
    // Read the store the moment the reply arrives: the job and the id counter are there.
    // Header and parts in one listing: the loop goes on writing (the job is placed at once),
    // and a newer header's parts replace the older ones.
    let all = store.inner.list("job").unwrap();
    let rec = all
        .iter()
        .find(|(k, _)| k == "jobs/a-1")
        .map(|(_, v)| v.value.clone())
        .expect("job on disk");
    let parts = all
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("jobparts/a-1/")?.to_owned(), v.value)))
        .collect();
    let job = crate::job::record::decode_one(&rec, &parts).unwrap();
    assert_eq!(job.id, "a-1");
    assert_eq!(job.spec, spec("a"));
    let meta = store.inner.get("meta/coordinator").unwrap().unwrap();
    assert_eq!(meta.value, br#"{"next_job":2}"#);
}

#[tokio::test]
async fn failed_writes_refuse_submit_cancel_and_checkpoint_but_reads_work() {
    let store = Flaky::new(0);
    let (h, _task) = spawn(core(&store, limits()), Default::default());
    submit(&h, "a").await.unwrap();
    store
        .failures
        .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
    let err = submit(&h, "b").await.unwrap_err();
    assert!(matches!(err, CoreError::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string().contains("stopped accepting writes"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("No space left on device"),
        "{err:?}"
    );
    // The unsaved job was never acknowledged, so it is not kept either.
    let jobs = h.call(|reply| Cmd::List { reply }).await.unwrap();
    let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, ["a-1"]);
    for call in ["cancel", "checkpoint", "submit"] {
        let r = match call {
            "cancel" => h
                .call(|reply| Cmd::Cancel {
                    id: "a-1".into(),
                    grace_ms: 0,
                    reply,
                })
                .await
                .unwrap(),
            "checkpoint" => h
                .call(|reply| Cmd::Checkpoint {
                    id: "a-1".into(),
                    reply,
                })
                .await
                .unwrap(),
            _ => submit(&h, "c").await,
        };
        let err = r.expect_err(call);
        assert!(matches!(err, CoreError::Unavailable(_)), "{call}: {err:?}");
    }
    let st = h
        .call(|reply| Cmd::Get {
            id: "a-1".into(),
            reply,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.state, "PENDING");
}

/// A finished job `id`, finished `ago_ms` before now.
fn finished(c: &mut Core, id: &str, ago_ms: u64) {
    let mut j = Job::new(id.into(), spec("f"), BTreeMap::new(), 0);
    j.state = JobState::Cancelled;
    j.finished_unix_ms = Some(now_ms() - ago_ms);
    c.job_bytes += job_bytes(&j.spec, &j.files);
    c.jobs.insert(id.into(), j);
    c.save(id);
}

#[tokio::test]
async fn finished_jobs_are_retired_by_count_and_age_from_memory_and_store() {
    let store = Flaky::new(0);
    let mut c = core(&store, limits());
    finished(&mut c, "old-1", 2 * 24 * 3600 * 1000);
    finished(&mut c, "f-2", 3_000);
    finished(&mut c, "f-3", 2_000);
    finished(&mut c, "f-4", 1_000);
    let live = Job::new("live-5".into(), spec("live"), BTreeMap::new(), 0);
    c.job_bytes += job_bytes(&live.spec, &live.files);
    c.jobs.insert("live-5".into(), live);
    c.save("live-5");
    c.flush_changed();
    c.persist.flush().wait().await.unwrap();
    assert_eq!(store.inner.list("jobs/").unwrap().len(), 5);

    c.retire_finished();
    let kept: Vec<&str> = c.jobs.keys().map(String::as_str).collect();
    // old-1 is past --retain-finished-for; of the rest, the newest 2 are kept.
    assert_eq!(kept, ["f-3", "f-4", "live-5"]);
    c.persist.flush().wait().await.unwrap();
    let stored: Vec<String> = store
        .inner
        .list("jobs/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(stored, ["jobs/f-3", "jobs/f-4", "jobs/live-5"]);
    // The removed jobs' parts went with their headers.
    let parts: BTreeSet<String> = store
        .inner
        .list("jobparts/")
        .unwrap()
        .into_iter()
        .map(|(k, _)| k.split('/').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(
        parts,
        BTreeSet::from(["f-3".into(), "f-4".into(), "live-5".into()])
    );
    assert_eq!(
        c.job_bytes,
        c.jobs
            .values()
            .map(|j| job_bytes(&j.spec, &j.files))
            .sum::<u64>()
    );
}

#[tokio::test]
async fn max_jobs_removes_the_oldest_finished_job_then_refuses() {
    let store = Flaky::new(0);
    let mut c = core(&store, limits());
    finished(&mut c, "f-1", 1_000);
    for i in 2..=4 {
        c.submit(spec("p"), BTreeMap::new()).unwrap();
        assert_eq!(c.jobs.len(), i);
    }
    // Full (4): the finished job makes room.
    let id = c.submit(spec("p"), BTreeMap::new()).unwrap();
    assert!(!c.jobs.contains_key("f-1") && c.jobs.contains_key(&id));
    // Full of unfinished jobs: refused, naming the limit.
    let err = c.submit(spec("p"), BTreeMap::new()).unwrap_err();
    assert!(matches!(err, CoreError::LimitReached(_)), "{err:?}");
    assert!(err.to_string().contains("--max-jobs 4"), "{err:?}");
}

#[tokio::test]
async fn max_job_bytes_counts_specs_and_files() {
    let store = Flaky::new(0);
    let mut c = core(
        &store,
        JobLimits {
            max_job_bytes: 40_000,
            ..limits()
        },
    );
    let files = |n| BTreeMap::from([("ds.json".to_owned(), vec![b' '; n])]);
    c.submit(spec("a"), files(30_000)).unwrap();
    let err = c.submit(spec("b"), files(20_000)).unwrap_err();
    assert!(matches!(err, CoreError::LimitReached(_)), "{err:?}");
    assert!(err.to_string().contains("--max-job-bytes"), "{err:?}");
    c.submit(spec("c"), files(5_000)).unwrap();
    // One job above the per-job limit is bad input, whatever the room.
    let err = c.submit(spec("d"), files(MAX_SPEC_BYTES + 1)).unwrap_err();
    assert!(matches!(err, CoreError::Invalid(_)), "{err:?}");
}

fn train_job(output_dir: &str) -> Job {
    let spec = JobSpec {
        train: Some(serde_json::json!({"stage": "sft", "output_dir": output_dir})),
        ..Default::default()
    };
    Job::new("j-1".into(), spec, BTreeMap::new(), 0)
}

#[test]
fn reported_checkpoints_must_lie_inside_output_dir() {
    let abs = train_job("/data/run1");
    assert!(checkpoint_path_allowed(&abs, "/data/run1/checkpoint-10").is_ok());
    assert!(checkpoint_path_allowed(&abs, "/data/run1/a/b").is_ok());
    for bad in [
        "/data/run1",
        "/data/run10/checkpoint-1",
        "/data/run1/../../etc",
        "/etc/passwd",
        "data/run1/checkpoint-1",
    ] {
        assert!(checkpoint_path_allowed(&abs, bad).is_err(), "{bad}");
    }
    let rel = train_job("output/quick");
    assert!(checkpoint_path_allowed(&rel, "/home/u/output/quick/checkpoint-5").is_ok());
    assert!(checkpoint_path_allowed(&rel, "/home/u/output/quick").is_err());
    assert!(checkpoint_path_allowed(&rel, "/home/u/output/other/checkpoint-5").is_err());
    assert!(checkpoint_path_allowed(&train_job("../x"), "/a/x/c").is_err());
    let cmd = Job::new("c-1".into(), JobSpec::default(), BTreeMap::new(), 0);
    assert!(checkpoint_path_allowed(&cmd, "/tmp/c").is_err());
}

/// An action that cannot be carried out (a port asked of a node that is not connected) raises
/// its event instead of applying it inside the one being applied: the event follows, in the
/// same `apply`, and leaves nothing queued.
#[tokio::test]
async fn an_event_raised_by_an_action_is_applied_after_the_one_that_raised_it() {
    let store = Flaky::new(0);
    let mut c = core(&store, limits());
    let spec = JobSpec {
        command: Some(vec!["true".into()]),
        ..JobSpec::default()
    };
    c.jobs.insert(
        "j-1".into(),
        Job::new("j-1".into(), spec, BTreeMap::new(), 0),
    );
    let sel = |name: &str| ringmaster_hostfile::Selected {
        name: name.into(),
        slots: vec![0, 1],
    };
    c.apply("j-1", Event::Placement(Ok(vec![sel("w0"), sel("w1")])));
    let j = &c.jobs["j-1"];
    assert_eq!(j.state, JobState::Failed);
    let why = &j.failure.as_ref().unwrap().message;
    assert!(why.contains("node w0 is not connected"), "{why}");
    assert!(c.raised.is_empty() && !c.applying);
}

/// Commands are moved through the loop's channel once per heartbeat and report: the large,
/// rare payloads are boxed, and a command is no larger than a heartbeat's.
#[test]
fn a_command_is_small() {
    let heartbeat = std::mem::size_of::<String>() + 8 + std::mem::size_of::<AgentEvent>();
    assert!(
        std::mem::size_of::<Cmd>() <= heartbeat + 8,
        "Cmd is {} bytes, a heartbeat's fields {heartbeat}",
        std::mem::size_of::<Cmd>()
    );
}

fn join_req(name: &str) -> JoinRequest {
    JoinRequest {
        name: name.into(),
        slots: 1,
        advertise_addr: "10.0.0.1".into(),
        version: "0.1.0".into(),
        hostname: name.into(),
        incarnation: "1".into(),
        running: Vec::new(),
        exited_while_away: Vec::new(),
    }
}

/// What an agent says of itself is kept and persisted: bounded, and an advertised address
/// (the workers' MASTER_ADDR) is an IP address or a host name.
#[tokio::test]
async fn a_joins_fields_are_checked_before_they_are_kept() {
    let store = Flaky::new(0);
    let mut c = core(&store, limits());
    let (tx, _rx) = mpsc::channel(1024);
    for addr in ["10.0.0.1", "fd00::1", "node-1.example.com", ""] {
        let mut j = join_req("n1");
        j.advertise_addr = addr.into();
        c.agent_join(j, None, tx.clone())
            .unwrap_or_else(|e| panic!("{addr}: {e:?}"));
    }
    let bad = |f: fn(&mut JoinRequest)| {
        let mut j = join_req("n2");
        f(&mut j);
        j
    };
    let cases: [(JoinRequest, &str); 6] = [
        (bad(|j| j.hostname = "h".repeat(300)), "hostname"),
        (bad(|j| j.version = "v".repeat(200)), "version"),
        (bad(|j| j.incarnation = "i\n".into()), "incarnation"),
        (
            bad(|j| j.advertise_addr = "10.0.0.1; rm -rf /".into()),
            "advertise address",
        ),
        (
            bad(|j| j.advertise_addr = "-host".into()),
            "advertise address",
        ),
        (
            bad(|j| j.advertise_addr = "a".repeat(300)),
            "advertise address",
        ),
    ];
    for (j, field) in cases {
        match c.agent_join(j, None, tx.clone()) {
            Err(CoreError::Invalid(m)) => assert!(m.contains(field), "{m}"),
            other => panic!("{field}: {other:?}"),
        }
    }
    assert!(!c.nodes.contains_key("n2"));
}

/// Without a hostfile every new name adds a node: at the limit the one disconnected longest
/// ago (and placed by no unfinished job) is forgotten, in memory and in the store; when every
/// node is connected a new name is refused.
#[tokio::test]
async fn the_node_table_is_bounded() {
    use super::membership::MAX_NODES;
    let store = Flaky::new(0);
    let mut c = core(&store, limits());
    let (tx, _rx) = mpsc::channel(4);
    for i in 0..MAX_NODES {
        c.agent_join(join_req(&format!("n{i}")), None, tx.clone())
            .unwrap();
    }
    // n0 and n1 disconnect, n0 first.
    for n in ["n0", "n1"] {
        let node = c.nodes.get_mut(n).unwrap();
        node.conn = None;
        node.lost = true;
        node.last_seen = Instant::now();
    }
    c.nodes.get_mut("n0").unwrap().last_seen -= Duration::from_secs(60);
    c.agent_join(join_req("new-1"), None, tx.clone()).unwrap();
    assert!(!c.nodes.contains_key("n0") && c.nodes.contains_key("n1"));
    assert_eq!(c.nodes.len(), MAX_NODES);
    c.agent_join(join_req("new-2"), None, tx.clone()).unwrap();
    assert!(!c.nodes.contains_key("n1"));
    match c.agent_join(join_req("new-3"), None, tx.clone()) {
        Err(CoreError::LimitReached(m)) => assert!(m.contains("at most 16384 nodes"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A known name rejoins at the limit.
    c.agent_join(join_req("n5"), None, tx.clone()).unwrap();
    c.persist.flush().wait().await.unwrap();
    assert!(
        store.inner.get("nodes/n0").unwrap().is_none(),
        "n0's record is deleted"
    );
    assert!(store.inner.get("nodes/n5").unwrap().is_some());
}

/// A port answer counts only from the node it was asked of, and only for a TCP port.
#[tokio::test]
async fn only_the_node_asked_answers_a_port_request() {
    let store = Flaky::new(0);
    let mut c = core(&store, limits());
    let (tx, _rx) = mpsc::channel(64);
    let (n1, _) = c.agent_join(join_req("n1"), None, tx.clone()).unwrap();
    let (n2, _) = c.agent_join(join_req("n2"), None, tx.clone()).unwrap();
    c.port_requests.insert(7, ("j-9".into(), 0, "n1".into()));
    let answer = |port| {
        AgentEvent::PortAllocated(super::types::PortAllocated {
            request_id: 7,
            port,
            error: String::new(),
        })
    };
    c.agent_msg("n2", n2, answer(29_501));
    assert!(
        c.port_requests.contains_key(&7),
        "n2 may not answer n1's request"
    );
    c.agent_msg("n1", n1, answer(70_000));
    assert!(
        !c.port_requests.contains_key(&7),
        "n1's answer is taken (as a failure)"
    );
}

/// A cordon is kept in the store (`cordons/<node>`) and read back at start; uncordon deletes
/// it. An unknown node is refused by name.
#[tokio::test]
async fn a_cordon_outlives_the_coordinator() {
    let store = Flaky::new(0);
    let mut c = core(&store, limits());
    let (tx, _rx) = mpsc::channel(64);
    c.agent_join(join_req("n1"), None, tx.clone()).unwrap();
    let n = c.cordon("n1", true).unwrap();
    assert!(n.cordoned);
    match c.cordon("n9", true) {
        Err(CoreError::NotFound(m)) => assert!(m.contains("no node 'n9'"), "{m}"),
        other => panic!("{other:?}"),
    }
    let (n, moved) = c.drain("n1", 1_000).unwrap();
    assert!(n.cordoned && moved.is_empty());
    c.persist.flush().wait().await.unwrap();
    assert!(store.inner.get("cordons/n1").unwrap().is_some());
    drop(c);
    let mut c = core_with_prefixes(&store, &["jobs/", "jobparts/", "nodes/", CORDONS, "meta/"]);
    assert!(c.nodes["n1"].cordoned, "read back at start");
    c.agent_join(join_req("n1"), None, tx.clone()).unwrap();
    assert!(c.nodes["n1"].cordoned, "kept across a rejoin");
    c.cordon("n1", false).unwrap();
    c.persist.flush().wait().await.unwrap();
    assert!(store.inner.get("cordons/n1").unwrap().is_none());
}
