//! Control-plane acceptance tests: real coordinator, agents and ringctl on 127.0.0.1.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ringmaster_tests::{Cluster, alive, http_get, parse_env, rank_pids, read, wait_until};

const HOSTFILE: &str = "# two nodes\nw0 slots=2\nw1 slots=2\n";

fn two_by_two(heartbeat: &str) -> Cluster {
    two_by_two_with(heartbeat, Default::default())
}

/// As [`two_by_two`], the coordinator serving Prometheus metrics; returns their address.
fn two_by_two_with_metrics(heartbeat: &str) -> (Cluster, String) {
    let (opts, addr) = ringmaster_tests::ClusterOpts::with_metrics();
    (two_by_two_with(heartbeat, opts), addr)
}

fn two_by_two_with(heartbeat: &str, opts: ringmaster_tests::ClusterOpts) -> Cluster {
    let mut c = Cluster::start_with(Some(HOSTFILE), heartbeat, opts);
    // Join in reverse hostfile order: ranks must still follow the hostfile.
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w1"]);
    c.start_agent("w0", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    c
}

fn out_dir(c: &Cluster) -> String {
    let d = c.path("out");
    std::fs::create_dir_all(&d).unwrap();
    d.to_str().unwrap().to_owned()
}

#[test]
fn environment_and_rank_order_follow_the_hostfile() {
    let c = two_by_two("10s");
    let out = out_dir(&c);
    let job = c.submit(
        "env.yaml",
        &format!(
            "name: envdump\ncommand: [sh, -c, 'env > {out}/env-$RANK.txt; echo hello from rank $RANK']\n\
             env: {{MY_FLAG: on}}\n"
        ),
    );
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(30));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    assert_eq!(st["world_size"], 4);

    let mut ranks = BTreeSet::new();
    let mut masters = BTreeSet::new();
    for r in 0..4 {
        let env = parse_env(&read(&c.path(&format!("out/env-{r}.txt"))).expect("env file"));
        ranks.insert(env["RANK"].clone());
        let node = if r < 2 { "w0" } else { "w1" };
        assert_eq!(env["RINGMASTER_NODE"], node, "rank {r}");
        assert_eq!(env["WORLD_SIZE"], "4");
        assert_eq!(env["LOCAL_RANK"], (r % 2).to_string());
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(env["NODE_RANK"], (r / 2).to_string());
        assert_eq!(env["GROUP_RANK"], (r / 2).to_string());
        assert_eq!(env["NNODES"], "2");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], "0,1");
        assert_eq!(env["TORCHELASTIC_RESTART_COUNT"], "0");
        assert_eq!(env["RINGMASTER_RESTART_COUNT"], "0");
        assert_eq!(env["TORCHELASTIC_MAX_RESTARTS"], "0");
        assert_eq!(env["TORCHELASTIC_RUN_ID"], job);
        assert_eq!(env["RINGMASTER_JOB_ID"], job);
        assert_eq!(env["RINGMASTER_GENERATION"], "0");
        assert_eq!(env["RINGMASTER_COORDINATOR"], c.addr);
        assert_eq!(env["OMP_NUM_THREADS"], "1");
        assert_eq!(env["MY_FLAG"], "on");
        masters.insert((env["MASTER_ADDR"].clone(), env["MASTER_PORT"].clone()));
    }
    assert_eq!(ranks, ["0", "1", "2", "3"].map(String::from).into());
    assert_eq!(masters.len(), 1, "{masters:?}");
    let (maddr, mport) = masters.into_iter().next().unwrap();
    assert_eq!(maddr, "127.0.0.1");
    assert!(mport.parse::<u16>().unwrap() > 0);

    // The rank's log, fetched through the coordinator from its agent.
    let logs = c.ringctl(&["logs", &job, "--rank", "3"]);
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "hello from rank 3\n");
    // And in the agent's own log with the [job rank N] prefix.
    let agent_log = c.agents[0].log_text();
    assert!(
        agent_log.contains(&format!("[{job} rank 3] hello from rank 3")),
        "{agent_log}"
    );

    // An include filter selects nodes and slots.
    let job2 = c.submit(
        "env2.yaml",
        &format!("command: [sh, -c, 'env > {out}/inc-$RANK.txt']\ninclude: 'w1:1@w0:0'\n"),
    );
    let st = c.wait_state(&job2, &["SUCCEEDED", "FAILED"], Duration::from_secs(30));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    let e0 = parse_env(&read(&c.path("out/inc-0.txt")).unwrap());
    let e1 = parse_env(&read(&c.path("out/inc-1.txt")).unwrap());
    assert_eq!(e0["WORLD_SIZE"], "2");
    assert_eq!(e0["RINGMASTER_NODE"], "w0");
    assert_eq!(e0["CUDA_VISIBLE_DEVICES"], "0");
    assert_eq!(e1["RINGMASTER_NODE"], "w1");
    assert_eq!(e1["CUDA_VISIBLE_DEVICES"], "1");
    assert_eq!(e1["LOCAL_RANK"], "0");
    assert!(read(&c.path("out/inc-2.txt")).is_none());

    // jobs --output json lists both.
    let jobs = c.ringctl(&["jobs", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
}

/// Rank 2 fails in generation 0 while the others would sleep for a minute.
/// `ringctl events JOB --output json`: the job's events, oldest first.
fn events(c: &Cluster, job: &str) -> Vec<serde_json::Value> {
    let out = c.ringctl(&["events", job, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per event"))
        .collect()
}

fn kinds(events: &[serde_json::Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap()).collect()
}

fn flaky_spec(out: &str, max_restarts: u32) -> String {
    format!(
        "name: flaky\nmax_restarts: {max_restarts}\ncommand:\n  - sh\n  - -c\n  - |\n    \
         echo \"rank $RANK restart $RINGMASTER_RESTART_COUNT\"\n    \
         if [ \"$RINGMASTER_RESTART_COUNT\" = 0 ]; then\n      \
         if [ \"$RANK\" = 2 ]; then echo boom-from-rank-2; exit 1; fi\n      \
         exec sleep 60\n    \
         fi\n    \
         env > {out}/gen1-$RANK.txt\n"
    )
}

#[test]
fn a_failed_rank_restarts_the_whole_gang() {
    let (c, metrics) = two_by_two_with_metrics("10s");
    let out = out_dir(&c);
    let started = Instant::now();
    let job = c.submit("flaky.yaml", &flaky_spec(&out, 1));
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(40));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    // The sleeping ranks of generation 0 were killed, or this would take a minute.
    assert!(started.elapsed() < Duration::from_secs(40));
    assert_eq!(st["generation"], 1);
    assert_eq!(st["restart_count"], 1);
    for r in 0..4 {
        let env = parse_env(&read(&c.path(&format!("out/gen1-{r}.txt"))).expect("gen 1 ran"));
        assert_eq!(env["RINGMASTER_RESTART_COUNT"], "1");
        assert_eq!(env["TORCHELASTIC_RESTART_COUNT"], "1");
        assert_eq!(env["RINGMASTER_GENERATION"], "1");
    }
    // The generation-0 failure is kept in the history.
    let f = &st["failures"][0];
    assert_eq!(f["rank"], 2);
    assert_eq!(f["node"], "w1");
    assert_eq!(f["exit_code"], 1);
    assert_eq!(f["reason"], "WorkerExited");
    // Conditions: it restarted and recovered, then succeeded; the recovery is timed.
    let conditions: Vec<(String, bool, String)> = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap().to_owned(),
                c["status"].as_bool().unwrap(),
                c["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("Created", true, "Submitted"),
        ("Running", false, "AllRanksSucceeded"),
        ("Restarting", false, "AllRanksSucceeded"),
        ("Succeeded", true, "AllRanksSucceeded"),
    ]
    .map(|(t, s, r)| (t.to_owned(), s, r.to_owned()));
    assert_eq!(conditions, want, "{st:#}");
    let (total, recovery) = (
        st["duration_ms"].as_u64().unwrap(),
        st["recovery_ms"].as_u64().unwrap(),
    );
    assert!(recovery > 0 && recovery <= total, "{st:#}");
    assert_eq!(
        st["duration_excluding_recovery_ms"].as_u64().unwrap(),
        total - recovery
    );
    let shown = c.ringctl(&["status", &job]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("conditions: Created=True (Submitted)"),
        "{shown}"
    );
    // Its story, as events: the failure with its root cause, the restart, the recovery.
    // (Generation 0 may fail before all its ranks run: rank 2 exits at once.)
    let ev = events(&c, &job);
    let story: Vec<&str> = ev
        .iter()
        .filter(|e| !(e["kind"] == "Running" && e["generation"] == 0))
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        story,
        [
            "Submitted",
            "GenerationStarted",
            "RankFailed",
            "Restarting",
            "GenerationStarted",
            "Running",
            "Succeeded"
        ],
        "{ev:#?}"
    );
    let failed = ev.iter().find(|e| e["kind"] == "RankFailed").unwrap();
    assert_eq!(
        (
            &failed["reason"],
            &failed["rank"],
            &failed["node"],
            &failed["warning"]
        ),
        (
            &serde_json::json!("WorkerExited"),
            &serde_json::json!(2),
            &serde_json::json!("w1"),
            &serde_json::json!(true)
        ),
        "{failed:#}"
    );
    let restarted = ev
        .iter()
        .filter(|e| e["kind"] == "GenerationStarted")
        .nth(1)
        .unwrap();
    assert_eq!(restarted["generation"], 1, "{ev:#?}");
    let seqs: Vec<u64> = ev.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=ev.len() as u64).collect::<Vec<u64>>());
    assert_eq!(st["recent_events"].as_array().unwrap().len(), 5, "{st:#}");
    assert_eq!(st["recent_events"][4]["kind"], "Succeeded", "{st:#}");
    let described = c.ringctl(&["describe", &job]);
    let text = String::from_utf8_lossy(&described.stdout);
    assert!(described.status.success(), "{described:?}");
    for want in [
        "state:    SUCCEEDED",
        "events:",
        "Warning  RankFailed",
        "WorkerExited",
    ] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }
    // The same story in Prometheus' counters; the finished job has no series of its own.
    let (status, body) = http_get(&metrics, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    let samples = ringmaster_tests::parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}"));
    assert!(samples.len() > 20, "{body}");
    for want in [
        "ringmaster_leader 1",
        "ringmaster_jobs_submitted_total 1",
        "ringmaster_job_failures_total{reason=\"WorkerExited\"} 1",
        "ringmaster_job_restarts_total 1",
        "ringmaster_restart_seconds_count 1",
        // The killed rank's exit, from its agent's clock to the coordinator acting on it.
        "ringmaster_fault_detection_seconds_count{kind=\"exit\"} 1",
        "ringmaster_jobs_finished_total{state=\"SUCCEEDED\",reason=\"\"} 1",
        "ringmaster_jobs{state=\"SUCCEEDED\"} 1",
        "ringmaster_nodes{state=\"JOINED\"} 2",
    ] {
        assert!(body.contains(want), "{want:?} in:\n{body}");
    }
    assert!(!body.contains(&format!("job=\"{job}\"")), "{body}");
    let (status, _) = http_get(&metrics, "/other");
    assert!(status.contains(" 404 "), "{status}");
}

/// The value of `series` (`name` or `name{labels}`) in a `/metrics` text.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
fn an_agent_serves_its_workers_in_its_own_metrics() {
    let mut c = Cluster::start(Some("w0 slots=2\n"), "10s");
    let metrics = format!("127.0.0.1:{}", ringmaster_tests::free_port());
    c.start_agent("w0", 2, &["--metrics-listen", &metrics]);
    c.wait_joined(&["w0"]);
    let log = c.agents[0].log_text();
    assert!(
        log.contains(&format!("Prometheus metrics at http://{metrics}/metrics")),
        "{log}"
    );
    let (status, body) = http_get(&metrics, "/metrics");
    assert!(status.contains(" 200 "), "{status}");
    ringmaster_tests::parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        sample(&body, "ringmaster_agent_connected"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "ringmaster_agent_workers{state=\"running\"}"),
        Some(0.0),
        "{body}"
    );
    // Two ranks print a line each, then wait for `out/finish`.
    let out = out_dir(&c);
    let job = c.submit(
        "chatty.yaml",
        &format!(
            "command: [sh, -c, 'echo hello from rank $RANK; while [ ! -e {out}/finish ]; do sleep 0.1; done']\n"
        ),
    );
    c.wait_all_ranks_running(&job, Duration::from_secs(30));
    // Output reaches the log pumps a moment after the ranks run.
    let body = wait_until(
        Duration::from_secs(10),
        "the agent's metrics to show two running workers and their output",
        || {
            let (_, body) = http_get(&metrics, "/metrics");
            let running = sample(&body, "ringmaster_agent_workers{state=\"running\"}")?;
            let captured = sample(&body, "ringmaster_agent_log_bytes_total")?;
            (running == 2.0 && captured >= "hello from rank 0\n".len() as f64 * 2.0).then_some(body)
        },
    );
    for series in [
        "ringmaster_agent_resident_memory_bytes",
        "ringmaster_agent_worker_resident_memory_bytes",
    ] {
        assert!(
            sample(&body, series).unwrap_or(0.0) > 0.0,
            "{series} in:\n{body}"
        );
    }
    assert!(!body.contains(&job), "no per-job series:\n{body}");
    std::fs::write(c.path("out/finish"), b"").unwrap();
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(30));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    // The agent counted each exit before reporting it, so the job's end shows at once.
    let (_, body) = http_get(&metrics, "/metrics");
    for (series, want) in [
        ("ringmaster_agent_workers{state=\"running\"}", 0.0),
        ("ringmaster_agent_workers{state=\"exited\"}", 0.0),
        (
            "ringmaster_agent_worker_exits_total{outcome=\"success\"}",
            2.0,
        ),
        ("ringmaster_agent_worker_resident_memory_bytes", 0.0),
        ("ringmaster_agent_reconnects_total", 0.0),
    ] {
        assert_eq!(sample(&body, series), Some(want), "{series} in:\n{body}");
    }
    assert!(!body.contains("_total_total"), "{body}");
    let (status, _) = http_get(&metrics, "/other");
    assert!(status.contains(" 404 "), "{status}");
    // The coordinator goes away and comes back: disconnected, then one reconnect.
    let port: u16 = c.addr.rsplit(':').next().unwrap().parse().unwrap();
    c.coordinator.as_ref().unwrap().signal(Signal::SIGKILL);
    c.coordinator
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(5));
    wait_until(Duration::from_secs(15), "the agent to notice", || {
        let (_, body) = http_get(&metrics, "/metrics");
        (sample(&body, "ringmaster_agent_connected")? == 0.0).then_some(())
    });
    c.start_coordinator(Some(port));
    wait_until(Duration::from_secs(15), "the agent to rejoin", || {
        let (_, body) = http_get(&metrics, "/metrics");
        let connected = sample(&body, "ringmaster_agent_connected")?;
        let reconnects = sample(&body, "ringmaster_agent_reconnects_total")?;
        (connected == 1.0 && reconnects == 1.0).then_some(())
    });
}

#[test]
fn without_restarts_the_job_fails_with_its_root_cause() {
    let c = two_by_two("10s");
    let out = out_dir(&c);
    let job = c.submit("flaky.yaml", &flaky_spec(&out, 0));
    let st = c.wait_state(&job, &["FAILED", "SUCCEEDED"], Duration::from_secs(30));
    assert_eq!(st["state"], "FAILED", "{st:#}");
    let f = &st["failure"];
    assert_eq!(f["rank"], 2, "{st:#}");
    assert_eq!(f["node"], "w1");
    assert_eq!(f["exit_code"], 1);
    assert_eq!(f["reason"], "WorkerExited");
    assert!(f["signal"].is_null());
    let failed = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Failed")
        .unwrap_or_else(|| panic!("no Failed condition: {st:#}"));
    assert_eq!(
        (failed["status"].as_bool(), failed["reason"].as_str()),
        (Some(true), Some("WorkerExited"))
    );
    let shown = c.ringctl(&["status", &job]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("failure (generation 0, WorkerExited): rank 2 on w1 exited with code 1"),
        "{shown}"
    );
    let tail: Vec<&str> = f["log_tail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(tail, vec!["rank 2 restart 0", "boom-from-rank-2"]);
    // The other ranks were stopped by the launcher, not failed.
    wait_until(Duration::from_secs(10), "ranks stopped", || {
        let st = c.status(&job);
        let states: Vec<String> = st["ranks"]
            .as_array()?
            .iter()
            .map(|r| r["state"].as_str().unwrap_or("").to_owned())
            .collect();
        (states == ["STOPPED", "STOPPED", "FAILED", "STOPPED"]).then_some(())
    });
    // ringctl watch of a failed job exits 1 and prints the cause.
    let w = c.ringctl(&["watch", &job]);
    assert_eq!(w.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&w.stdout).contains("boom-from-rank-2"));
}

#[test]
fn cancel_kills_every_process_including_grandchildren() {
    let _serial = ringmaster_tests::timing_sensitive();
    let (c, metrics) = two_by_two_with_metrics("10s");
    let out = out_dir(&c);
    let job = c.submit(
        "cancel.yaml",
        &format!(
            "command: [sh, -c, 'sleep 1000 & echo $! > {out}/child-$RANK; echo $$ > {out}/worker-$RANK; wait']\n"
        ),
    );
    c.wait_state(&job, &["RUNNING"], Duration::from_secs(30));
    let pids: Vec<u32> = wait_until(Duration::from_secs(10), "pid files", || {
        let mut v = Vec::new();
        for r in 0..4 {
            for kind in ["child", "worker"] {
                let t = read(&c.path(&format!("out/{kind}-{r}")))?;
                v.push(t.trim().parse().ok()?);
            }
        }
        Some(v)
    });
    assert!(pids.iter().all(|p| alive(*p)));
    let t0 = Instant::now();
    let cancel = c.ringctl(&["cancel", &job, "--grace", "1s"]);
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    wait_until(
        Duration::from_secs(3),
        "every process gone (grace + 2 s)",
        || pids.iter().all(|p| !alive(*p)).then_some(()),
    );
    assert!(t0.elapsed() < Duration::from_secs(3));
    let st = c.status(&job);
    assert_eq!(st["state"], "CANCELLED");
    let cancelled = st["conditions"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(cancelled["type"], "Cancelled", "{st:#}");
    assert_eq!(cancelled["reason"], "Cancelled", "{st:#}");
    let ev = events(&c, &job);
    let k = kinds(&ev);
    assert_eq!(
        &k[k.len() - 2..],
        ["CancelRequested", "Cancelled"],
        "{ev:#?}"
    );
    let (_, body) = http_get(&metrics, "/metrics");
    ringmaster_tests::parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        body.contains("ringmaster_jobs_finished_total{state=\"CANCELLED\",reason=\"Cancelled\"} 1"),
        "{body}"
    );
}

#[test]
fn a_training_config_the_trainer_refuses_fails_as_config_invalid() {
    let (c, metrics) = two_by_two_with_metrics("10s");
    // Valid for the coordinator (paths are the nodes' business), refused by every trainer
    // before training: exit 2.
    let cfg = c.quickstart_config("bad", "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let missing = c.path("no-such-model");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("model_name_or_path:") {
                format!("model_name_or_path: {}\n", missing.display())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&cfg, text).unwrap();
    let out = c.ringctl(&["submit", cfg.to_str().unwrap(), "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let st = wait_until(Duration::from_secs(60), "the first failure", || {
        let st = c.status(&job);
        st["failure"].is_object().then_some(st)
    });
    assert_eq!(st["failure"]["reason"], "ConfigInvalid", "{st:#}");
    assert_eq!(st["failure"]["exit_code"], 2, "{st:#}");
    let ev = events(&c, &job);
    assert!(
        ev.iter()
            .any(|e| e["kind"] == "RankFailed" && e["reason"] == "ConfigInvalid"),
        "{ev:#?}"
    );
    let (_, body) = http_get(&metrics, "/metrics");
    ringmaster_tests::parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        body.contains("ringmaster_job_failures_total{reason=\"ConfigInvalid\"}"),
        "{body}"
    );
    let _ = c.ringctl(&["cancel", &job, "--grace", "1s"]);
}

#[test]
fn a_killed_agent_ends_the_generation_and_is_named() {
    let _serial = ringmaster_tests::timing_sensitive();
    let (c, metrics) = two_by_two_with_metrics("2s");
    let out = out_dir(&c);
    let job = c.submit(
        "long.yaml",
        &format!("command: [sh, -c, 'echo $$ > {out}/w-$RANK; exec sleep 1000']\n"),
    );
    c.wait_state(&job, &["RUNNING"], Duration::from_secs(30));
    // A running job has its series.
    let (_, body) = http_get(&metrics, "/metrics");
    for want in [
        format!("ringmaster_job_world_size{{job=\"{job}\"}} 4"),
        format!("ringmaster_job_generation{{job=\"{job}\"}} 0"),
        "ringmaster_jobs{state=\"RUNNING\"} 1".to_owned(),
    ] {
        assert!(body.contains(&want), "{want:?} in:\n{body}");
    }
    // agents[0] is w1 (started first).
    let t0 = Instant::now();
    c.agents[0].signal(Signal::SIGKILL);
    let st = c.wait_state(&job, &["FAILED"], Duration::from_secs(4));
    assert!(t0.elapsed() < Duration::from_secs(4));
    let f = &st["failure"];
    assert_eq!(f["node"], "w1", "{st:#}");
    assert!(f["message"].as_str().unwrap().contains("w1 lost"), "{st:#}");
    assert_eq!(f["reason"], "NodeLost", "{st:#}");
    let ev = events(&c, &job);
    let k = kinds(&ev);
    assert_eq!(&k[k.len() - 2..], ["NodeLost", "Failed"], "{ev:#?}");
    assert_eq!(ev[k.len() - 2]["node"], "w1", "{ev:#?}");
    let (_, body) = http_get(&metrics, "/metrics");
    assert!(
        body.contains("ringmaster_job_failures_total{reason=\"NodeLost\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("ringmaster_fault_detection_seconds_count{kind=\"node_lost\"} 1"),
        "{body}"
    );
    // The surviving node's workers are stopped; the killed agent's died with it.
    let pids: Vec<u32> = (0..4)
        .map(|r| {
            read(&c.path(&format!("out/w-{r}")))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    wait_until(Duration::from_secs(6), "all workers gone", || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
    let nodes = c.nodes();
    let w1 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "w1")
        .unwrap();
    assert_eq!(w1["state"], "LOST");
}

#[test]
fn a_restarted_coordinator_reconciles_running_workers() {
    let _serial = ringmaster_tests::timing_sensitive();
    let mut c = two_by_two("3s");
    let (job, _out) = c.submit_held_job("reconcile.yaml");
    let before = c.wait_state(&job, &["RUNNING"], Duration::from_secs(30));
    let pids = rank_pids(&before);
    let port: u16 = c.addr.rsplit(':').next().unwrap().parse().unwrap();
    c.coordinator.as_ref().unwrap().signal(Signal::SIGKILL);
    c.coordinator
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(5));
    c.start_coordinator(Some(port));
    // The job is known again, and its ranks are running with the same pids.
    let after = c.wait_all_ranks_running(&job, Duration::from_secs(15));
    let pids_after = rank_pids(&after);
    assert_eq!(pids, pids_after);
    // Its events were saved with it; a follower sees the rest as it happens and ends with
    // the job.
    assert_eq!(
        kinds(&events(&c, &job)),
        ["Submitted", "GenerationStarted", "Running"]
    );
    let mut follow = c.ringctl_cmd();
    follow.args(["events", &job, "--follow", "--output", "json"]);
    let mut follower =
        ringmaster_tests::Proc::spawn("events --follow", follow, c.path("events.log"));
    let json_lines = |p: &ringmaster_tests::Proc| -> Vec<serde_json::Value> {
        p.log_text()
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until(Duration::from_secs(30), "the follower to print", || {
        (json_lines(&follower).len() >= 3).then_some(())
    });
    // No worker was launched twice.
    c.finish_held_job(&job, 4);
    assert_eq!(
        follower.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        follower.log_text()
    );
    let lines = json_lines(&follower);
    assert_eq!(
        kinds(&lines),
        ["Submitted", "GenerationStarted", "Running", "Succeeded"]
    );
}

#[test]
fn bad_input_is_refused_with_exit_code_2() {
    let mut c = Cluster::start(Some(HOSTFILE), "10s");

    // Wrong token: the agent exits 2 naming the token; the coordinator logs the refusal.
    let wrong = c.path("wrong-token");
    std::fs::write(&wrong, "wrong-token-0123456789").unwrap();
    let i = c.start_agent("w0", 2, &["--join-token-file", wrong.to_str().unwrap()]);
    assert_eq!(c.agents[i].wait_exit(Duration::from_secs(20)), Some(2));
    let log = c.agents[i].log_text();
    assert!(log.contains("wrong token"), "{log}");
    wait_until(
        Duration::from_secs(5),
        "coordinator logs the refusal",
        || {
            c.coordinator
                .as_ref()
                .unwrap()
                .log_text()
                .contains("wrong token")
                .then_some(())
        },
    );

    // Unknown node.
    let i = c.start_agent("w9", 1, &[]);
    assert_eq!(c.agents[i].wait_exit(Duration::from_secs(20)), Some(2));
    let log = c.agents[i].log_text();
    assert!(
        log.contains("'w9' is not in the coordinator's hostfile"),
        "{log}"
    );

    // Malformed job spec and bad training config.
    for (file, text, want) in [
        (
            "bad1.yaml",
            "command: [a]\nbogus: 1\n",
            "unknown field `bogus`",
        ),
        ("bad2.yaml", "stage: sft\nlerning_rate: 1\n", "lerning_rate"),
        ("bad3.yaml", "command: [a]\ninclude: w7\n", "w7"),
        ("bad4.yaml", "command: [a\n", "not valid YAML"),
    ] {
        let p = c.path(file);
        std::fs::write(&p, text).unwrap();
        let out = c.ringctl(&["submit", p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{file}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{file}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{file}: one line: {err}");
    }

    // Unknown job.
    let out = c.ringctl(&["status", "no-such-job"]);
    assert_eq!(out.status.code(), Some(2));

    // Malformed hostfile: the coordinator refuses to start, naming the line.
    let hf = c.path("bad-hostfile");
    std::fs::write(&hf, "w0 slots=2\nw1 slot=4\n").unwrap();
    let out = std::process::Command::new(ringmaster_tests::bin("coordinator"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--hostfile",
            hf.to_str().unwrap(),
        ])
        .arg("--data-dir")
        .arg(c.path("data-bad"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hostfile line 2"), "{err}");

    // Unknown flags.
    for b in ["coordinator", "agent", "ringctl"] {
        let out = std::process::Command::new(ringmaster_tests::bin(b))
            .arg("--no-such-flag")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{b}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    }
}

#[test]
fn ringctl_local_runs_a_job_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let spec = dir.path().join("job.yaml");
    std::fs::write(
        &spec,
        format!(
            "command: [sh, -c, 'sleep 300 & echo $! > {o}/bg-$RANK; echo $$ > {o}/w-$RANK; echo rank $RANK of $WORLD_SIZE']\n",
            o = out.display()
        ),
    )
    .unwrap();
    let res = std::process::Command::new(ringmaster_tests::bin("ringctl"))
        .args([
            "local",
            spec.to_str().unwrap(),
            "--nodes",
            "2",
            "--slots",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(0), "{stderr}");
    // Worker lines read `[rank N] …`, not tracing records.
    assert!(stderr.contains("[rank 3] rank 3 of 4"), "{stderr}");
    assert!(!stderr.contains("generation="), "{stderr}");
    let mut pids = Vec::new();
    for r in 0..4 {
        for k in ["bg", "w"] {
            let t = std::fs::read_to_string(out.join(format!("{k}-{r}"))).unwrap();
            pids.push(t.trim().parse::<u32>().unwrap());
        }
    }
    // Everything the job started is gone once ringctl returns.
    assert!(pids.iter().all(|p| !alive(*p)), "left behind: {pids:?}");
}

#[test]
fn logs_follow_streams_until_the_rank_ends() {
    let c = two_by_two("10s");
    let job = c.submit(
        "ticks.yaml",
        "command: [sh, -c, 'for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.3; done']\n",
    );
    c.wait_state(&job, &["RUNNING"], Duration::from_secs(30));
    let t0 = Instant::now();
    let out = c.ringctl(&["logs", &job, "--rank", "0", "--follow"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let want: String = (1..=6).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(text, want);
    // It followed (the job takes ~1.8 s), then ended with the rank.
    assert!(
        t0.elapsed() > Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let tail = c.ringctl(&["logs", &job, "--rank", "0", "--tail", "7"]);
    assert_eq!(String::from_utf8_lossy(&tail.stdout), "tick 6\n");
}

#[test]
fn agent_shutdown_stops_its_workers_and_json_logs_carry_job_and_generation() {
    let _serial = ringmaster_tests::timing_sensitive();
    let mut c = Cluster::start(Some("w0 slots=2\n"), "10s");
    c.start_agent("w0", 2, &["--log-format", "json"]);
    c.wait_joined(&["w0"]);
    let out = out_dir(&c);
    let job = c.submit(
        "sleepers.yaml",
        &format!("command: [sh, -c, 'sleep 1000 & echo $! > {out}/bg-$RANK; echo up; wait']\n"),
    );
    c.wait_state(&job, &["RUNNING"], Duration::from_secs(30));
    let pids: Vec<u32> = wait_until(Duration::from_secs(10), "pid files", || {
        (0..2)
            .map(|r| read(&c.path(&format!("out/bg-{r}")))?.trim().parse().ok())
            .collect()
    });
    let t0 = Instant::now();
    c.agents[0].signal(Signal::SIGTERM);
    assert_eq!(c.agents[0].wait_exit(Duration::from_secs(6)), Some(0));
    assert!(pids.iter().all(|p| !alive(*p)));
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Every line of the agent's log is JSON; lines about the job name it and its generation.
    let log = c.agents[0].log_text();
    let mut about_job = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v.get("job").is_some() {
            about_job += 1;
            assert!(v.get("generation").is_some(), "{line}");
        }
    }
    assert!(about_job >= 4, "{log}");
    assert!(log.contains(&format!("[{job} rank 1] up")), "{log}");
}

/// `ringctl drain` moves a running job off a node (it is placed again on the other, using no
/// restart); the cordon keeps new jobs off the node until `ringctl uncordon`.
#[test]
fn a_drained_node_moves_its_job_and_takes_no_new_one_until_uncordoned() {
    let _serial = ringmaster_tests::timing_sensitive();
    let c = two_by_two("3s");
    let out = out_dir(&c);
    let job = c.submit(
        "one-node.yaml",
        &format!(
            "nodes: 1\ncommand: [sh, -c, 'echo $RINGMASTER_NODE > {out}/g-$RINGMASTER_GENERATION; \
             exec sleep 1000']\n"
        ),
    );
    let st = c.wait_state(&job, &["RUNNING"], Duration::from_secs(30));
    assert_eq!(st["ranks"][0]["node"], "w0", "{st:#}");
    let d = c.ringctl(&["drain", "w0", "--grace", "2s"]);
    let said = String::from_utf8_lossy(&d.stdout);
    assert_eq!(d.status.code(), Some(0), "{d:?}");
    assert!(
        said.contains(&format!("w0 cordoned; moving {job}")),
        "{said}"
    );
    let st = wait_until(Duration::from_secs(30), "the job running on w1", || {
        let st = c.status(&job);
        (st["state"] == "RUNNING" && st["generation"] == 1).then_some(st)
    });
    assert_eq!(st["ranks"][0]["node"], "w1", "{st:#}");
    assert_eq!(st["restart_count"], 0, "a move uses no restart: {st:#}");
    assert_eq!(read(&c.path("out/g-1")).unwrap().trim(), "w1");
    let ev = events(&c, &job);
    let moved = ev
        .iter()
        .find(|e| e["kind"] == "Restarting")
        .expect("a Restarting event");
    assert_eq!(moved["reason"], "Drained", "{ev:#?}");
    // The cordon holds: a job that can only run on w0 waits, naming it.
    let w0 = |nodes: serde_json::Value| {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "w0")
            .cloned()
            .unwrap()
    };
    assert_eq!(w0(c.nodes())["cordoned"], true);
    let pinned = c.submit("pinned.yaml", "include: w0\ncommand: [sleep, '1000']\n");
    let st = wait_until(Duration::from_secs(10), "the pinned job to wait", || {
        let st = c.status(&pinned);
        st["pending_reason"]
            .as_str()
            .is_some_and(|r| r.contains("cordoned w0"))
            .then_some(st)
    });
    assert_eq!(st["state"], "PENDING", "{st:#}");
    let u = c.ringctl(&["uncordon", "w0"]);
    assert_eq!(u.status.code(), Some(0), "{u:?}");
    c.wait_state(&pinned, &["RUNNING"], Duration::from_secs(30));
    assert_eq!(w0(c.nodes())["cordoned"], false);
    // An unknown node is named (exit 2, as an unknown job is).
    let e = c.ringctl(&["cordon", "w9"]);
    assert_eq!(e.status.code(), Some(2), "{e:?}");
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("no node 'w9'"),
        "{e:?}"
    );
    for j in [&job, &pinned] {
        c.ringctl(&["cancel", j]);
    }
}
