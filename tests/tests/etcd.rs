//! The coordinator's state in etcd (`--store etcd://...`): a real etcd member (Debian's
//! etcd-server), real coordinator, agents and ringctl on 127.0.0.1.
//!
//! Without an `etcd` binary these tests print "skipped", except under CI=true (CI installs it).
//! CI also runs the control-plane suite with `RINGMASTER_TEST_STORE=etcd`.

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ringmaster_auth::Pki;
use ringmaster_store::testing::{EtcdServer, EtcdTls};
use ringmaster_store::{EtcdOptions, EtcdStore, Precondition, StateStore};
use ringmaster_tests::{Cluster, ClusterOpts, TestStore, bin, certs_init, rank_pids, wait_until};

const HOSTFILE: &str = "w0 slots=2\nw1 slots=2\n";

fn etcd_available(test: &str) -> bool {
    // Starts and stops a member only to apply the skip rule in one place.
    EtcdServer::start_or_skip(test).is_some()
}

fn on_etcd() -> Cluster {
    let mut c = Cluster::start_with(
        Some(HOSTFILE),
        "3s",
        ClusterOpts {
            store: TestStore::Etcd,
            ..Default::default()
        },
    );
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    c
}

/// The coordinator's machine is lost with its disk: a new coordinator with an empty data dir
/// on the same etcd knows the job, its ranks and pids, the agents re-attach, nothing is
/// launched twice, and job ids go on from where they were.
#[test]
fn a_coordinator_with_an_empty_data_dir_takes_over_the_jobs_in_etcd() {
    if !etcd_available("etcd takeover") {
        return;
    }
    let _serial = ringmaster_tests::timing_sensitive();
    let mut c = on_etcd();
    let (job, _out) = c.submit_held_job("takeover.yaml");
    let before = c.wait_state(&job, &["RUNNING"], Duration::from_secs(30));
    let port: u16 = c.addr.rsplit(':').next().unwrap().parse().unwrap();
    let coordinator = c.coordinator.as_mut().unwrap();
    coordinator.signal(Signal::SIGKILL);
    coordinator.wait_exit(Duration::from_secs(5));
    // Nothing of the old coordinator's machine remains (it should have written nothing there).
    let _ = std::fs::remove_dir_all(c.path("data"));
    c.start_coordinator(Some(port));
    let after = c.wait_all_ranks_running(&job, Duration::from_secs(20));
    assert_eq!(rank_pids(&before), rank_pids(&after));
    assert!(
        !c.path("data").exists(),
        "an etcd coordinator wrote to its data dir"
    );
    c.finish_held_job(&job, 4);
    // Job ids come from etcd, not from the lost data dir: the next job gets a new one.
    let next = c.submit("next.yaml", "command: [\"true\"]\n");
    assert_ne!(next, job);
    let st = c.wait_state(&next, &["SUCCEEDED", "FAILED"], Duration::from_secs(30));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
}

/// Whether one of `procs` logged `text` after the first `marks[i]` bytes of its log.
fn logged_since(procs: &[&ringmaster_tests::Proc], marks: &[usize], text: &str) -> bool {
    procs
        .iter()
        .zip(marks)
        .any(|(p, &m)| p.log_text().get(m..).is_some_and(|l| l.contains(text)))
}

/// Two coordinators on one etcd of `etcd_members` members with a 2-second lease (the first
/// leads), two agents given both addresses, and a 2x2 job of sleep loops RUNNING. Returns the cluster (its `addr` is the
/// list), the standby and its address, and the job and its status.
fn two_coordinators_and_a_job(
    heartbeat: &str,
    etcd_members: usize,
) -> (
    Cluster,
    ringmaster_tests::Proc,
    String,
    String,
    serde_json::Value,
) {
    let mut c = Cluster::start_with(
        Some(HOSTFILE),
        heartbeat,
        ClusterOpts {
            store: TestStore::Etcd,
            etcd_members,
            coordinator_args: vec!["--leader-ttl".into(), "2s".into()],
            ..Default::default()
        },
    );
    let first = c.addr.clone();
    let (standby, second) = c.start_another_coordinator("data-b");
    c.addr = format!("{first},{second}");
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let (job, _out) = c.submit_held_job("job.yaml");
    let running = c.wait_state(&job, &["RUNNING"], Duration::from_secs(30));
    (c, standby, second, job, running)
}

/// Two coordinators on one etcd, a 2x2 job running: the leader is SIGKILLed; the standby
/// leads within the TTL (plus a little), the agents (given both addresses) re-attach to it,
/// ringctl given both addresses finds it, the job goes on with the same pids and no restart,
/// and nothing is launched twice. Then the new leader is stopped cleanly (SIGTERM): it resigns,
/// and a third coordinator leads at once, not after the TTL.
#[test]
fn the_standby_takes_over_when_the_leader_dies_and_the_job_goes_on() {
    if !etcd_available("etcd failover") {
        return;
    }
    let _serial = ringmaster_tests::timing_sensitive();
    let ttl = Duration::from_secs(2);
    let (mut c, standby, second, job, before) = two_coordinators_and_a_job("5s", 1);
    let first = c.addr.split(',').next().unwrap().to_owned();
    // The standby refuses what it does not serve, naming the leader.
    let both = c.addr.clone();
    c.addr = second.clone();
    let out_nodes = c.ringctl(&["nodes"]);
    let err = String::from_utf8_lossy(&out_nodes.stderr);
    assert_eq!(out_nodes.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("the leader is at {first}")), "{err}");
    c.addr = both;

    // The standby answers operators' reads from etcd (as the leader saved them), behind the
    // same credentials; writes go to the leader.
    let both = c.addr.clone();
    c.addr = second.clone();
    let read_on_standby = wait_until(Duration::from_secs(10), "the standby's read", || {
        let st = c.status(&job);
        (st["state"] == "RUNNING").then_some(st)
    });
    assert_eq!(rank_pids(&read_on_standby), rank_pids(&before));
    let listed = c.ringctl(&["jobs", "--output", "json"]);
    assert!(listed.status.success(), "{listed:?}");
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&job));
    let cancel = c.ringctl(&["cancel", &job]);
    assert_eq!(cancel.status.code(), Some(1), "{cancel:?}");
    assert!(String::from_utf8_lossy(&cancel.stderr).contains("the leader is at"));
    let mut anonymous = c.ringctl_cmd();
    anonymous
        .env_remove("RINGMASTER_TOKEN_FILE")
        .args(["status", &job]);
    let refused = anonymous.output().unwrap();
    assert_ne!(refused.status.code(), Some(0), "{refused:?}");
    c.addr = both;

    let leader = c.coordinator.as_mut().unwrap();
    leader.signal(Signal::SIGKILL);
    leader.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    wait_until(ttl + Duration::from_secs(10), "the standby to lead", || {
        std::fs::read_to_string(&standby.log)
            .ok()?
            .contains("INFO leading")
            .then_some(())
    });
    let took = killed.elapsed();
    assert!(took <= ttl + Duration::from_secs(3), "took {took:?}");
    let after = c.wait_all_ranks_running(&job, Duration::from_secs(20));
    assert_eq!(rank_pids(&before), rank_pids(&after));
    assert_eq!(after["generation"], before["generation"], "{after:#}");
    assert_eq!(after["restart_count"].as_u64().unwrap_or(0), 0, "{after:#}");
    c.finish_held_job(&job, 4);

    // A clean stop resigns: a third coordinator leads well within the TTL.
    let (third, _addr) = c.start_another_coordinator("data-c");
    wait_until(Duration::from_secs(10), "the third to campaign", || {
        std::fs::read_to_string(&third.log)
            .ok()?
            .contains("campaigning for leadership")
            .then_some(())
    });
    standby.signal(Signal::SIGTERM);
    let stopped = Instant::now();
    wait_until(ttl + Duration::from_secs(10), "the third to lead", || {
        std::fs::read_to_string(&third.log)
            .ok()?
            .contains("INFO leading")
            .then_some(())
    });
    assert!(stopped.elapsed() < ttl, "{:?}", stopped.elapsed());
}

/// The leader freezes (SIGSTOP) for three TTLs: the standby leads, the agents leave the
/// frozen one and re-attach to it with their workers; when the old leader wakes (SIGCONT) it
/// commands nothing and writes nothing, says it lost its leadership, and rejoins the election
/// as a standby in the same process: it refuses writes naming the new leader, and when that
/// leader dies it leads again from the state in etcd, the job going on with the same workers.
#[test]
fn a_leader_paused_past_its_lease_wakes_deposed_and_rejoins_as_a_standby() {
    if !etcd_available("etcd paused leader") {
        return;
    }
    let _serial = ringmaster_tests::timing_sensitive();
    let ttl = Duration::from_secs(2);
    let (mut c, mut standby, second, job, before) = two_coordinators_and_a_job("10s", 1);
    let both = c.addr.clone();
    let first = both.split(',').next().unwrap().to_owned();

    let old = c.coordinator.as_ref().unwrap();
    old.signal(Signal::SIGSTOP);
    wait_until(ttl + Duration::from_secs(10), "the standby to lead", || {
        std::fs::read_to_string(&standby.log)
            .ok()?
            .contains("INFO leading")
            .then_some(())
    });
    // ringctl is given the standby alone here: the frozen leader would cost every call its
    // connect timeout.
    c.addr = second.clone();
    let after = c.wait_all_ranks_running(&job, Duration::from_secs(30));
    assert_eq!(after["generation"], before["generation"], "{after:#}");
    // Its lease ended (the standby leads) and the agents left it: wake it now, paused past
    // its lease.
    let old = c.coordinator.as_mut().unwrap();
    let before_wake = old.log_text().len();
    old.signal(Signal::SIGCONT);
    let awake = wait_until(Duration::from_secs(30), "the old leader to rejoin", || {
        let log = old.log_text();
        let awake = log.get(before_wake..)?.to_owned();
        awake
            .contains("rejoining the election as a standby")
            .then_some(awake)
    });
    assert!(awake.contains("lost leadership"), "{awake}");
    assert!(ringmaster_tests::alive(old.pid()), "{awake}");
    // Awake, it concluded nothing from its own pause: no node lost, no job changed, nothing
    // sent or started, no rank declared gone.
    for never in [
        "job state",
        "starting workers",
        "not sent",
        "lost node",
        "node lost",
        "ranks lost",
    ] {
        assert!(!awake.contains(never), "{never:?} after waking:\n{awake}");
    }
    for a in &c.agents {
        let text = a.log_text();
        assert!(!text.contains("deposed coordinator"), "{}: {text}", a.name);
    }
    // A standby now: it answers reads and refuses writes, naming the leader.
    c.addr = first.clone();
    let read = wait_until(
        Duration::from_secs(10),
        "a read from the old leader",
        || {
            let out = c.ringctl(&["status", &job, "--output", "json"]);
            out.status.success().then(|| {
                serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("status JSON")
            })
        },
    );
    assert_eq!(rank_pids(&read), rank_pids(&before), "{read:#}");
    let nodes = c.ringctl(&["nodes"]);
    let err = String::from_utf8_lossy(&nodes.stderr);
    assert_eq!(nodes.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("the leader is at {second}")), "{err}");

    // The leader of now dies: the rejoined coordinator leads again, reading the state anew,
    // and the agents (given both addresses) bring the same workers back to it.
    standby.signal(Signal::SIGKILL);
    standby.wait_exit(Duration::from_secs(5));
    let old = c.coordinator.as_ref().unwrap();
    wait_until(
        ttl + Duration::from_secs(10),
        "the old leader to lead again",
        || {
            old.log_text()
                .get(before_wake..)?
                .contains("INFO leading")
                .then_some(())
        },
    );
    c.addr = both;
    let again = c.wait_all_ranks_running(&job, Duration::from_secs(30));
    assert_eq!(rank_pids(&again), rank_pids(&before), "{again:#}");
    assert_eq!(again["generation"], before["generation"], "{again:#}");
    assert_eq!(again["restart_count"].as_u64().unwrap_or(0), 0, "{again:#}");
    c.finish_held_job(&job, 4);
    let log = c.coordinator.as_ref().unwrap().log_text();
    assert!(
        !log[before_wake..].contains("starting workers"),
        "a worker was started twice:\n{log}"
    );
}

/// The state on a three-member etcd cluster, two coordinators, a 2x2 job running. One etcd
/// member is killed (the other two keep the quorum; the coordinators' clients move to them):
/// a job submitted meanwhile is taken and kept. The member comes back, then the whole etcd
/// cluster is killed at once, a power cut, and started again on its data once the leader's
/// lease has lapsed: the coordinators retry (the leader steps down and campaigns again; a
/// coordinator leads once etcd is back). Nothing saved is lost, the running job goes on with
/// the same workers and completes, and the job submitted during the outage runs after it.
#[test]
fn etcd_members_and_the_whole_etcd_cluster_restart_under_a_running_job() {
    if !etcd_available("etcd cluster restarts") {
        return;
    }
    let _serial = ringmaster_tests::timing_sensitive();
    let (mut c, standby, _, job, _) = two_coordinators_and_a_job("10s", 3);
    let before = c.wait_all_ranks_running(&job, Duration::from_secs(30));

    // One member down: the cluster keeps its quorum and the coordinators work on.
    c.etcd.as_mut().unwrap().stop_member(0);
    let queued = c.submit("queued.yaml", "command: [\"true\"]\n");
    // (Polled: losing a member may cost the leader its lease, and a call its answer.)
    c.wait_state(&queued, &["PENDING"], Duration::from_secs(30));
    c.etcd.as_mut().unwrap().start_member(0);
    let during = c.wait_all_ranks_running(&job, Duration::from_secs(30));
    assert_eq!(rank_pids(&during), rank_pids(&before), "{during:#}");

    // The whole cluster down, longer than the lease: the leader cannot renew it and steps
    // down to campaign again; the standby's campaign fails and is retried.
    let marks: Vec<usize> = [c.coordinator.as_ref().unwrap(), &standby]
        .iter()
        .map(|p| p.log_text().len())
        .collect();
    c.etcd.as_mut().unwrap().stop_all();
    // Whichever leads (the member's restart may have cost the first its lease already).
    let procs = || [c.coordinator.as_ref().unwrap(), &standby];
    wait_until(Duration::from_secs(30), "the leader to step down", || {
        logged_since(&procs(), &marks, "rejoining the election as a standby").then_some(())
    });
    c.etcd
        .as_mut()
        .unwrap()
        .start_all()
        .unwrap_or_else(|e| panic!("restarting etcd: {e}"));
    wait_until(
        Duration::from_secs(30),
        "a coordinator to lead again",
        || logged_since(&procs(), &marks, "INFO leading").then_some(()),
    );
    c.wait_joined(&["w0", "w1"]);
    let after = c.wait_all_ranks_running(&job, Duration::from_secs(60));
    assert_eq!(rank_pids(&after), rank_pids(&before), "{after:#}");
    assert_eq!(after["generation"], before["generation"], "{after:#}");
    assert_eq!(after["restart_count"].as_u64().unwrap_or(0), 0, "{after:#}");
    // (Polled: losing a member may cost the leader its lease, and a call its answer.)
    c.wait_state(&queued, &["PENDING"], Duration::from_secs(30));
    c.finish_held_job(&job, 4);
    let st = c.wait_state(&queued, &["SUCCEEDED", "FAILED"], Duration::from_secs(60));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    // Both coordinators are still up: a coordinator that lost its leadership to an etcd
    // outage campaigns again rather than exiting.
    let leader = c.coordinator.as_ref().unwrap();
    for (name, p) in [("first", leader), ("second", &standby)] {
        assert!(ringmaster_tests::alive(p.pid()), "{name}: {}", p.log_text());
    }
}

/// Failover under a real training job (issue 20, deliver 3), in two acts, with an operator
/// watching (`ringctl watch` given all three addresses) throughout. Three coordinators on one
/// etcd, the quickstart training on 2 agents x 2 ranks (past its bootstrap): the leader is
/// SIGKILLed and a standby leads within the TTL + 2 s. Then the new leader and the last standby
/// are SIGKILLed too: with no coordinator at all the ranks go on training (their collectives
/// do not go through it) and commit a checkpoint; a coordinator started afterwards on the first
/// address with an empty data dir leads from etcd, the agents (given all three addresses)
/// re-attach, the trainers' progress streams find it, and the checkpoint committed during the
/// gap is recorded (rank 0 re-sends its newest commit with every report). The job finishes in
/// generation 0 with no restart, every step logged once, no worker started twice.
#[test]
fn a_training_job_trains_through_a_failover_and_the_gap_checkpoint_is_recorded() {
    if !etcd_available("etcd training failover") {
        return;
    }
    let _serial = ringmaster_tests::timing_sensitive();
    let ttl = Duration::from_secs(2);
    let mut c = Cluster::start_with(
        Some(HOSTFILE),
        "10s",
        ClusterOpts {
            store: TestStore::Etcd,
            coordinator_args: vec!["--leader-ttl".into(), "2s".into()],
            ..Default::default()
        },
    );
    let first = c.addr.clone();
    let port: u16 = first.rsplit(':').next().unwrap().parse().unwrap();
    let (mut b, b_addr) = c.start_another_coordinator("data-b");
    let (mut cc, c_addr) = c.start_another_coordinator("data-c");
    c.addr = format!("{first},{b_addr},{c_addr}");
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let cfg = c.quickstart_config("t", "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_steps: 30", "max_steps: 90")
        .replace("save_steps: 10", "save_steps: 50");
    std::fs::write(&cfg, text).unwrap();
    let job = c.submit(
        "t-job.yaml",
        &format!("name: t\ntrain: {}\n", cfg.display()),
    );
    let before = c.wait_all_ranks_running(&job, Duration::from_secs(60));
    // Past the bootstrap: the ranks met through the leader's rendezvous store, which a new
    // leader does not have (docs/architecture.md, "Leadership").
    wait_until(Duration::from_secs(120), "the first step", || {
        (c.status(&job)["progress"]["step"].as_u64()? >= 1).then_some(())
    });
    // An operator watching, given both addresses: the watch follows through the failover.
    let mut watch = c
        .ringctl_cmd()
        .args(["watch", &job, "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        let stdout = watch.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                lines.lock().unwrap().push(l);
            }
        })
    };
    wait_until(Duration::from_secs(10), "the watch's first status", || {
        (!lines.lock().unwrap().is_empty()).then_some(())
    });
    // Act 1: the leader dies, a standby leads within the TTL + 2 s.
    let leader = c.coordinator.as_mut().unwrap();
    leader.signal(Signal::SIGKILL);
    leader.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    wait_until(ttl + Duration::from_secs(10), "a standby to lead", || {
        [&b, &cc]
            .iter()
            .any(|p| p.log_text().contains("INFO leading"))
            .then_some(())
    });
    let took = killed.elapsed();
    assert!(
        took <= ttl + Duration::from_secs(2),
        "a standby led after {took:?}"
    );
    let moved = c.wait_all_ranks_running(&job, Duration::from_secs(30));
    assert_eq!(moved["generation"], before["generation"], "{moved:#}");
    assert_eq!(rank_pids(&moved), rank_pids(&before), "{moved:#}");

    // Act 2: no coordinator at all.
    for p in [&mut b, &mut cc] {
        p.signal(Signal::SIGKILL);
        p.wait_exit(Duration::from_secs(5));
    }
    let gap_checkpoint = c.path("t/checkpoint-50");
    assert!(
        !gap_checkpoint.exists(),
        "the job reached step 50 before the coordinators were killed: the test proves nothing"
    );
    wait_until(
        Duration::from_secs(300),
        "a checkpoint without a coordinator",
        || gap_checkpoint.join("COMMITTED").is_file().then_some(()),
    );
    let standby = c.start_another_coordinator_at(port, "data-d");
    let recorded = wait_until(
        Duration::from_secs(60),
        "the gap checkpoint recorded",
        || {
            let st = c.status(&job);
            (st["last_checkpoint"]["step"].as_u64()? >= 50).then_some(st)
        },
    );
    assert_eq!(
        recorded["last_checkpoint"]["path"],
        gap_checkpoint.display().to_string(),
        "{recorded:#}"
    );
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(300));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    assert_eq!(st["generation"], before["generation"], "{st:#}");
    assert_eq!(st["restart_count"].as_u64().unwrap_or(0), 0, "{st:#}");
    let steps: Vec<u64> = std::fs::read_to_string(c.path("t/trainer_log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert_eq!(
        steps,
        (1..=90).collect::<Vec<u64>>(),
        "each step logged once"
    );
    let exited = wait_until(Duration::from_secs(30), "the watch to end", || {
        watch.try_wait().unwrap()
    });
    reader.join().unwrap();
    let out = watch.wait_with_output().unwrap();
    let stdout = lines.lock().unwrap().join("\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(exited.success(), "watch: {stderr}\n{stdout}");
    let states: Vec<String> = stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["state"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        states.first().map(String::as_str),
        Some("RUNNING"),
        "{stdout}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("SUCCEEDED"),
        "{stdout}"
    );
    // The agents re-attached to each new leader with the workers they ran: none was started
    // twice.
    for p in [&b, &cc, &standby] {
        let log = p.log_text();
        assert!(!log.contains("starting workers"), "{log}");
    }
}

/// An etcd nobody answers at: the coordinator exits 1 within its connect and request
/// timeouts, with one error naming each endpoint.
#[test]
fn an_unreachable_etcd_stops_the_coordinator_at_start_naming_the_endpoints() {
    let dead: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("etcd://127.0.0.1:{},127.0.0.1:{}/rm", dead[0], dead[1]);
    let start = Instant::now();
    let out = Command::new(bin("coordinator"))
        .args(["--listen", "127.0.0.1:0", "--store", &url, "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for p in &dead {
        assert!(err.contains(&format!("127.0.0.1:{p}: ")), "{err}");
    }
    assert!(err.contains("etcd unreachable"), "{err}");
    // Connect (3 s) and request (5 s) timeouts bound it, twice over for the per-endpoint
    // diagnosis: generous, only to catch a hang.
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

/// Flags that make no sense are usage errors (exit 2) that name the flag.
#[test]
fn bad_etcd_flags_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (args, says) in [
        (
            vec!["--store", "etcd://u:p@h1:2379"],
            "--etcd-password-file",
        ),
        (vec!["--store", "etcd://h1:99999"], "bad port"),
        (vec!["--store", "etcd://h1/a//b"], "bad key prefix"),
        (
            vec!["--etcd-ca", "/nonexistent.pem"],
            "--etcd-ca applies to an etcd store only",
        ),
        (
            vec!["--store", "etcd://h1", "--etcd-user", "root"],
            "--etcd-password-file",
        ),
    ] {
        let out = Command::new(bin("coordinator"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// A job through a coordinator whose state is in the etcd at `url`, reached with `flags`.
fn job_through(url: &str, flags: &[String]) {
    let mut args = vec!["--store".to_string(), url.to_string()];
    args.extend_from_slice(flags);
    let mut c = Cluster::start_with(
        Some("w0 slots=1\n"),
        "10s",
        ClusterOpts {
            store: TestStore::Embedded,
            coordinator_args: args,
            ..Default::default()
        },
    );
    c.start_agent("w0", 1, &[]);
    c.wait_joined(&["w0"]);
    let job = c.submit("j.yaml", "command: [\"true\"]\n");
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(30));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
}

/// etcd over TLS with client certificates required: the store and the coordinator connect
/// with --etcd-ca/--etcd-cert/--etcd-key; without a client certificate, or without the CA,
/// opening fails naming the endpoint.
#[test]
fn etcd_over_tls_with_client_certificates() {
    if !etcd_available("etcd tls") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    certs_init(&pki_dir);
    let pki = Pki::new(&pki_dir);
    // The coordinator's certificate (127.0.0.1, server auth) serves etcd here; the agent's
    // (client auth) is the coordinator's client certificate.
    let server = EtcdServer::start_with(Some(EtcdTls {
        ca: pki.ca(),
        cert: pki.coordinator_cert(),
        key: pki.coordinator_key(),
    }))
    .unwrap();
    let url = server.url("tls");
    let good = EtcdOptions {
        ca: Some(pki.ca()),
        cert: Some(pki.agent_cert("agent")),
        key: Some(pki.agent_key("agent")),
        ..Default::default()
    };
    let store = EtcdStore::open(&url, &good).unwrap();
    store.put("k", b"v", Precondition::Absent).unwrap();
    assert_eq!(store.get("k").unwrap().unwrap().value, b"v");
    drop(store);

    let quick = EtcdOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        ..good.clone()
    };
    for (what, opts) in [
        (
            "no client certificate",
            EtcdOptions {
                cert: None,
                key: None,
                ..quick.clone()
            },
        ),
        (
            "no CA (plain text to a TLS port)",
            EtcdOptions {
                ca: None,
                cert: None,
                key: None,
                ..quick.clone()
            },
        ),
    ] {
        let err = EtcdStore::open(&url, &opts).unwrap_err().to_string();
        assert!(err.contains(&server.endpoint()), "{what}: {err}");
    }

    let p = |f: std::path::PathBuf| f.display().to_string();
    job_through(
        &url,
        &[
            "--etcd-ca".into(),
            p(pki.ca()),
            "--etcd-cert".into(),
            p(pki.agent_cert("agent")),
            "--etcd-key".into(),
            p(pki.agent_key("agent")),
        ],
    );
}

/// etcd with authentication on: the right user and password file work (store and
/// coordinator); a wrong password is refused at open, saying so, not "unreachable".
#[test]
fn etcd_with_a_user_and_password_file() {
    let Some(server) = EtcdServer::start_or_skip("etcd auth") else {
        return;
    };
    let endpoint = server.endpoint();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .unwrap();
        c.user_add("root", "root-pw", None).await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.user_add("ringmaster", "s3cret pw", None).await.unwrap();
        c.role_add("ringmaster").await.unwrap();
        c.role_grant_permission(
            "ringmaster",
            etcd_client::Permission::read_write("rm/").with_prefix(),
        )
        .await
        .unwrap();
        c.user_grant_role("ringmaster", "ringmaster").await.unwrap();
        c.auth_enable().await.unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret pw\n").unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "guess\n").unwrap();
    let opts = |file: &std::path::Path| EtcdOptions {
        user: Some("ringmaster".into()),
        password_file: Some(file.to_path_buf()),
        ..Default::default()
    };
    let url = server.url("rm");
    let store = EtcdStore::open(&url, &opts(&pw)).unwrap();
    store.put("k", b"v", Precondition::Absent).unwrap();
    assert_eq!(store.get("k").unwrap().unwrap().value, b"v");
    drop(store);

    let err = EtcdStore::open(&url, &opts(&bad)).unwrap_err().to_string();
    assert!(err.contains("refused"), "{err}");
    assert!(err.contains("authentication failed"), "{err}");
    assert!(!err.contains("unreachable"), "{err}");

    // Outside the role's prefix: refused, naming the user's role as the thing to check.
    let other = EtcdStore::open(&server.url("elsewhere"), &opts(&pw)).unwrap();
    let err = other
        .put("k", b"v", Precondition::Any)
        .unwrap_err()
        .to_string();
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains("role"), "{err}");

    job_through(
        &url,
        &[
            "--etcd-user".into(),
            "ringmaster".into(),
            "--etcd-password-file".into(),
            pw.display().to_string(),
        ],
    );
}
