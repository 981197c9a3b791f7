//! Failure recovery end to end: real coordinator, agents, ringctl and trainers on 127.0.0.1.

use std::time::Duration;

use nix::sys::signal::Signal;
use ringmaster_tests::{Cluster, wait_until};

const HOSTFILE: &str = "w0 slots=2\nw1 slots=2\n";

/// The quickstart's model and data, 30 steps of global batch 64 on 4 ranks, ZeRO-2.
fn training_config(c: &Cluster, name: &str) -> std::path::PathBuf {
    training_config_with(c, name, "")
}

fn training_config_with(c: &Cluster, name: &str, extra: &str) -> std::path::PathBuf {
    c.quickstart_config(name, extra)
}

/// Every `step → loss` line of `trainer_log.jsonl`, the last occurrence of a step winning (a
/// resumed generation appends the steps it redoes).
fn losses(path: &std::path::Path) -> std::collections::BTreeMap<u64, f64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// The pid of the trainer of `rank` in generation `generation` of `job`, from /proc.
fn trainer_pid(job: &str, rank: u32, generation: u64) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let has = |kv: String| vars.contains(&kv.as_bytes());
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if exe.file_name().is_some_and(|n| n == "trainer")
            && has(format!("RINGMASTER_JOB_ID={job}"))
            && has(format!("RANK={rank}"))
            && has(format!("RINGMASTER_GENERATION={generation}"))
        {
            return Some(pid);
        }
    }
    None
}

/// Issue 6, acceptance 1: run A trains 30 steps uninterrupted; run B (save_steps 10) loses
/// rank 3 to SIGKILL mid-run, restarts as generation 1, resumes from its newest committed
/// checkpoint and finishes; B's loss at every step after the resume point and its final
/// parameters equal A's within 1e-6 relative (same world and plan: the same operations in the
/// same order).
#[test]
fn a_killed_rank_restarts_the_job_and_it_resumes_exactly() {
    let _serial = ringmaster_tests::timing_sensitive();
    let c = Cluster::start(Some(HOSTFILE), "10s");
    let mut c = c;
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let a = training_config(&c, "a");
    let job_a = c.submit("a-job.yaml", &format!("name: a\ntrain: {}\n", a.display()));
    let st = c.wait_state(&job_a, &["SUCCEEDED", "FAILED"], Duration::from_secs(600));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    let want = losses(&c.path("a/trainer_log.jsonl"));
    assert_eq!(want.len(), 30);

    let b = training_config(&c, "b");
    let job_b = c.submit(
        "b-job.yaml",
        &format!("name: b\nmax_restarts: 1\ntrain: {}\n", b.display()),
    );
    let log_b = c.path("b/trainer_log.jsonl");
    wait_until(Duration::from_secs(600), "B reaches step 13", || {
        (losses(&log_b).len() >= 13).then_some(())
    });
    let pid = wait_until(Duration::from_secs(30), "rank 3's trainer", || {
        trainer_pid(&job_b, 3, 0)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let st = c.wait_state(&job_b, &["SUCCEEDED", "FAILED"], Duration::from_secs(600));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    assert_eq!(st["generation"], 1, "{st:#}");
    assert_eq!(st["failures"][0]["rank"], 3, "{st:#}");
    let rank0 = c.ringctl(&["logs", &job_b, "--rank", "0", "--generation", "1"]);
    let text = String::from_utf8_lossy(&rank0.stdout).into_owned()
        + &String::from_utf8_lossy(&rank0.stderr);
    let resumed: u64 = text
        .lines()
        .find_map(|l| {
            let i = l.find("resumed from ")?;
            let rest = &l[i..];
            let j = rest.find(" at step ")? + " at step ".len();
            rest[j..].split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("generation 1 did not resume: {text}"));
    assert!(resumed == 10 || resumed == 20, "resumed at {resumed}");
    let got = losses(&log_b);
    assert_eq!(got.len(), 30);
    for step in resumed + 1..=30 {
        let (x, y) = (got[&step], want[&step]);
        assert!((x - y).abs() <= 1e-6 * y.abs(), "step {step}: {x} vs {y}");
    }
    let pa = ringmaster_model::hf::load_dir(&c.path("a")).unwrap().params;
    let pb = ringmaster_model::hf::load_dir(&c.path("b")).unwrap().params;
    for ((spec, x), (_, y)) in pa.iter().zip(pb.iter()) {
        for (p, q) in x.iter().zip(y) {
            assert!(
                (p - q).abs() <= 1e-6 * (1.0 + p.abs()),
                "{}: {p} vs {q}",
                spec.name
            );
        }
    }
}

/// Issue 6, acceptance 3: SIGSTOP one rank. The others fail within the collective timeout
/// (`ddp_timeout: 5`) + 5 s, the generation ends naming the stopped rank as the lagging one,
/// the job restarts, resumes from its checkpoint and completes.
#[test]
fn a_stopped_rank_times_out_the_others_and_is_named_as_lagging() {
    let _serial = ringmaster_tests::timing_sensitive();
    let (opts, metrics) = ringmaster_tests::ClusterOpts::with_metrics();
    let mut c = Cluster::start_with(Some(HOSTFILE), "30s", opts);
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let cfg = training_config_with(&c, "h", "ddp_timeout: 5\n");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_steps: 30", "max_steps: 40");
    std::fs::write(&cfg, text).unwrap();
    let job = c.submit(
        "h-job.yaml",
        &format!("name: h\nmax_restarts: 1\ntrain: {}\n", cfg.display()),
    );
    let log = c.path("h/trainer_log.jsonl");
    wait_until(Duration::from_secs(600), "step 12", || {
        (losses(&log).len() >= 12).then_some(())
    });
    let pid = wait_until(Duration::from_secs(30), "rank 2's trainer", || {
        trainer_pid(&job, 2, 0)
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    let stopped = std::time::Instant::now();
    let failure = wait_until(Duration::from_secs(60), "the generation to end", || {
        let st = c.status(&job);
        let f = st["failures"].get(0).cloned()?;
        Some(f)
    });
    let took = stopped.elapsed();
    assert!(
        took <= Duration::from_secs(5 + 5),
        "the others failed {took:?} after the stop (timeout 5 s + 5 s)"
    );
    assert_eq!(failure["lagging_rank"], 2, "{failure:#}");
    // The first rank to exit is the root cause: one whose call timed out, or one that lost its
    // connection to such a rank as it exited.
    assert!(
        failure["reason"] == "CollectiveTimeout" || failure["reason"] == "CollectiveFailed",
        "{failure:#}"
    );
    assert_ne!(
        failure["rank"], 2,
        "the root cause is a rank that timed out: {failure:#}"
    );
    // The root cause's reason is the failure counted.
    let scraped = ringmaster_tests::metrics_text(&metrics);
    let want = format!(
        "ringmaster_job_failures_total{{reason={}}} 1",
        failure["reason"]
    );
    assert!(scraped.contains(&want), "{want} in:\n{scraped}");
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(600));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    assert_eq!(st["generation"], 1);
    assert_eq!(losses(&log).len(), 40);
}

/// Issue 6, failure detection: when the coordinator ends a generation, in-flight collectives
/// abort at once. Node w1 freezes (its agent and both its trainers SIGSTOPped: no socket
/// closes, no rank exits); the collective timeout is 120 s. The coordinator declares w1 lost
/// after its 3 s heartbeat timeout and ends the generation; w0's ranks, blocked in a collective
/// on w1's, end their progress streams with ABORTED, abort the ring and exit with an error of
/// their own (code 1) — without the abort they would wait for the agent's SIGKILL after its
/// 3 s grace (the SIGTERM before it cannot interrupt a blocked collective).
#[test]
fn a_generation_the_coordinator_ends_aborts_waiting_collectives_at_once() {
    let _serial = ringmaster_tests::timing_sensitive();
    let mut c = Cluster::start(Some(HOSTFILE), "3s");
    c.start_agent("w0", 2, &[]);
    let w1 = c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let cfg = config_steps(&c, "a", 400, 0, "ddp_timeout: 120\n");
    let job = c.submit(
        "a-job.yaml",
        &format!("name: a\nmax_restarts: 0\ntrain: {}\n", cfg.display()),
    );
    let log = c.path("a/trainer_log.jsonl");
    wait_until(Duration::from_secs(300), "step 3", || {
        (losses(&log).len() >= 3).then_some(())
    });
    let frozen: Vec<i32> = [2, 3]
        .iter()
        .map(|r| {
            wait_until(Duration::from_secs(30), "w1's trainers", || {
                trainer_pid(&job, *r, 0)
            })
        })
        .collect();
    c.agents[w1].signal(Signal::SIGSTOP);
    for pid in &frozen {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGSTOP).unwrap();
    }
    let st = c.wait_state(&job, &["FAILED", "SUCCEEDED"], Duration::from_secs(60));
    assert_eq!(st["state"], "FAILED", "{st:#}");
    assert!(
        st["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("node w1 lost"),
        "{st:#}"
    );
    assert_eq!(st["failure"]["reason"], "NodeLost", "{st:#}");
    let ranks = wait_until(Duration::from_secs(30), "w0's ranks to exit", || {
        let st = c.status(&job);
        let r = st["ranks"].as_array()?.clone();
        r.iter()
            .filter(|r| r["node"] == "w0")
            .all(|r| !r["exit_code"].is_null() || !r["signal"].is_null())
            .then_some(r)
    });
    for r in ranks.iter().filter(|r| r["node"] == "w0") {
        // Exited on its own, not killed: 1 (its collective aborted) or 4 (its connection to a
        // neighbour that aborted first closed: a collective failure).
        let code = r["exit_code"].as_i64();
        assert!(
            code == Some(1) || code == Some(4),
            "aborted, not killed: {r:#}"
        );
        assert!(r["signal"].is_null(), "aborted, not killed: {r:#}");
    }
    let out = c.ringctl(&["logs", &job, "--rank", "0"]);
    assert!(
        text(&out).contains("aborting collectives"),
        "{}",
        text(&out)
    );
    for pid in frozen {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    c.agents[w1].signal(Signal::SIGKILL);
}

/// `training_config_with`, then `max_steps` and `save_steps` replaced.
fn config_steps(c: &Cluster, name: &str, max: u64, save: u64, extra: &str) -> std::path::PathBuf {
    let p = training_config_with(c, name, extra);
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("max_steps: 30", &format!("max_steps: {max}"))
        .replace("save_steps: 10", &format!("save_steps: {save}"));
    std::fs::write(&p, text).unwrap();
    p
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

fn step_of(st: &serde_json::Value, key: &str) -> Option<u64> {
    st[key]["step"].as_u64()
}

/// Issue 6, triggers and acceptance 6: `ringctl checkpoint` makes every rank checkpoint after
/// the same step and waits for the commit; `ringctl cancel --checkpoint` checkpoints, ends the
/// job and reports it; both land in the status as `last_checkpoint`. Then a byte flipped in
/// the newest one: a run resuming from the output dir detects the sha256 mismatch, resumes from
/// the previous committed checkpoint, and the status says so.
#[test]
fn ringctl_checkpoint_and_cancel_checkpoint_commit_and_a_corrupt_one_is_passed_over() {
    let _serial = ringmaster_tests::timing_sensitive();
    let mut c = Cluster::start(Some(HOSTFILE), "10s");
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let cfg = config_steps(&c, "k", 400, 0, "");
    let job = c.submit(
        "k-job.yaml",
        &format!("name: k\ntrain: {}\n", cfg.display()),
    );
    wait_until(Duration::from_secs(300), "step 3", || {
        (c.status(&job)["progress"]["step"].as_u64()? >= 3).then_some(())
    });

    let out = c.ringctl(&["checkpoint", &job]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("committed at"), "{}", text(&out));
    let st = c.status(&job);
    let n = step_of(&st, "last_checkpoint").expect("a committed checkpoint");
    let dir_n = c.path(&format!("k/checkpoint-{n}"));
    assert_eq!(st["last_checkpoint"]["path"], dir_n.display().to_string());
    assert!(dir_n.join("COMMITTED").is_file());
    for r in 0..4 {
        assert!(dir_n.join(format!("rank-{r:05}.safetensors")).is_file());
    }
    assert_eq!(
        st["state"], "RUNNING",
        "on-demand checkpoints do not stop the job"
    );

    wait_until(Duration::from_secs(300), "two more steps", || {
        (c.status(&job)["progress"]["step"].as_u64()? >= n + 2).then_some(())
    });
    let out = c.ringctl(&["cancel", &job, "--checkpoint"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("CANCELLED; checkpoint step"),
        "{}",
        text(&out)
    );
    let st = c.status(&job);
    assert_eq!(st["state"], "CANCELLED");
    let m = step_of(&st, "last_checkpoint").unwrap();
    assert!(m >= n + 2, "cancel checkpoint at {m}, on-demand one at {n}");
    assert!(c.path(&format!("k/checkpoint-{m}/COMMITTED")).is_file());

    // A command job cannot be asked to checkpoint: a usage error.
    let sleeper = c.submit("sleep.yaml", "command: [sleep, '60']\n");
    c.wait_state(&sleeper, &["RUNNING"], Duration::from_secs(30));
    let out = c.ringctl(&["checkpoint", &sleeper]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("runs a command"), "{}", text(&out));
    c.ringctl(&["cancel", &sleeper, "--grace", "0s"]);

    // Corrupt the newest checkpoint; a new job resuming from the output dir passes over it.
    let shard = c.path(&format!("k/checkpoint-{m}/rank-00002.safetensors"));
    let mut bytes = std::fs::read(&shard).unwrap();
    let i = bytes.len() - 10;
    bytes[i] ^= 0x5a;
    std::fs::write(&shard, bytes).unwrap();
    let resume_cfg = c.path("k2.yaml");
    std::fs::write(
        &resume_cfg,
        std::fs::read_to_string(&cfg).unwrap() + "resume_from_checkpoint: true\n",
    )
    .unwrap();
    let job2 = c.submit(
        "k2-job.yaml",
        &format!("name: k2\ntrain: {}\n", resume_cfg.display()),
    );
    let st = wait_until(Duration::from_secs(120), "the resume report", || {
        let st = c.status(&job2);
        step_of(&st, "resumed_from").map(|_| st)
    });
    assert_eq!(step_of(&st, "resumed_from"), Some(n), "{st:#}");
    let warnings = st["checkpoint_warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{st:#}");
    let w = warnings[0].as_str().unwrap();
    assert!(
        w.contains(&format!("checkpoint-{m}")) && w.contains("rank-00002.safetensors is corrupt"),
        "{w}"
    );
    let shown = text(&c.ringctl(&["status", &job2]));
    assert!(
        shown.contains("warning:") && shown.contains("is corrupt"),
        "{shown}"
    );
    let out = c.ringctl(&["cancel", &job2]);
    assert!(out.status.success(), "{}", text(&out));
    c.wait_state(&job2, &["CANCELLED"], Duration::from_secs(30));
}

/// Issue 6, acceptance 5: SIGKILL the coordinator mid-training and start it again. Training
/// goes on meanwhile (the ring is peer to peer); the trainers commit a checkpoint while it is
/// down (they do not wait for it), and the coordinator records it once their progress streams
/// reconnect; the job completes in generation 0.
#[test]
fn a_restarted_coordinator_learns_of_a_checkpoint_taken_while_it_was_down() {
    let _serial = ringmaster_tests::timing_sensitive();
    let mut c = Cluster::start(Some(HOSTFILE), "30s");
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let cfg = config_steps(&c, "d", 40, 10, "");
    let job = c.submit(
        "d-job.yaml",
        &format!("name: d\ntrain: {}\n", cfg.display()),
    );
    let log = c.path("d/trainer_log.jsonl");
    wait_until(Duration::from_secs(300), "step 3", || {
        (losses(&log).len() >= 3).then_some(())
    });
    let port: u16 = c.addr.rsplit(':').next().unwrap().parse().unwrap();
    c.coordinator.as_ref().unwrap().signal(Signal::SIGKILL);
    c.coordinator
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(5));
    wait_until(
        Duration::from_secs(300),
        "checkpoint-10 and step 12",
        || {
            (c.path("d/checkpoint-10/COMMITTED").is_file() && losses(&log).len() >= 12)
                .then_some(())
        },
    );
    c.start_coordinator(Some(port));
    let st = wait_until(Duration::from_secs(30), "the checkpoint recorded", || {
        let st = c.status(&job);
        (step_of(&st, "last_checkpoint")? >= 10).then_some(st)
    });
    assert!(
        st["last_checkpoint"]["path"]
            .as_str()
            .unwrap()
            .ends_with("/d/checkpoint-10")
            || step_of(&st, "last_checkpoint").unwrap() > 10,
        "{st:#}"
    );
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(300));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    assert_eq!(st["generation"], 0, "{st:#}");
    assert_eq!(losses(&log).len(), 40);
    assert_eq!(step_of(&st, "last_checkpoint"), Some(30), "{st:#}");
}

/// Issue 6, acceptances 4 and 8: SIGKILL an agent. Its ranks die with it, the generation ends,
/// the job waits for the node; when the agent comes back the job restarts and resumes from the
/// last committed checkpoint the coordinator recorded (RINGMASTER_RESUME_FROM), passing over a
/// newer directory that one rank never finished.
#[test]
fn a_killed_agent_restarts_the_job_when_the_node_rejoins_and_it_resumes() {
    let _serial = ringmaster_tests::timing_sensitive();
    let mut c = Cluster::start(Some(HOSTFILE), "3s");
    c.start_agent("w0", 2, &[]);
    let w1 = c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let cfg = config_steps(&c, "n", 30, 10, "");
    let job = c.submit(
        "n-job.yaml",
        &format!("name: n\nmax_restarts: 1\ntrain: {}\n", cfg.display()),
    );
    let committed = wait_until(Duration::from_secs(300), "a recorded checkpoint", || {
        step_of(&c.status(&job), "last_checkpoint")
    });
    c.agents[w1].signal(Signal::SIGKILL);
    c.agents[w1].wait_exit(Duration::from_secs(5));
    let st = c.wait_state(&job, &["RESTARTING", "FAILED"], Duration::from_secs(30));
    assert_eq!(st["state"], "RESTARTING", "{st:#}");
    // The first failure recorded is whichever rank noticed first: often one of w0's ranks,
    // failing on its lost peers, before the coordinator times w1's heartbeat out.
    assert!(!st["failures"].as_array().unwrap().is_empty(), "{st:#}");
    // Acceptance 8: a newer checkpoint that one rank never reported (its shard and the
    // commit marker missing, as when a rank dies mid-save) is never resumed from.
    let orphan = c.path("n/checkpoint-999");
    std::fs::create_dir_all(&orphan).unwrap();
    for e in std::fs::read_dir(c.path(&format!("n/checkpoint-{committed}"))).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name != "COMMITTED" && name != "rank-00003.safetensors" {
            std::fs::copy(e.path(), orphan.join(name)).unwrap();
        }
    }
    // The job waits for the node rather than fail.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.status(&job)["state"], "RESTARTING");
    c.start_agent("w1", 2, &[]);
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(300));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    assert_eq!(st["generation"], 1, "{st:#}");
    let resumed = step_of(&st, "resumed_from").expect("generation 1 resumed");
    assert!(
        resumed >= committed,
        "resumed at {resumed}, committed {committed}"
    );
    assert!(st["checkpoint_warnings"].as_array().unwrap().is_empty());
    assert_eq!(losses(&c.path("n/trainer_log.jsonl")).len(), 30);
}

/// Unmounts a test tmpfs on drop.
struct Mounted(std::path::PathBuf);
impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Issue 6, acceptance 7: an output dir that fills up. The output dir is a 40 MiB tmpfs (one
/// checkpoint of this model is ~26 MiB): checkpoint-5 commits, checkpoint-10 fails with ENOSPC,
/// named in the failure; the job restarts from checkpoint-5 per its max_restarts, fails the
/// same way, and ends FAILED with checkpoint-5 intact (it exports). Where the machine does not
/// allow a tmpfs mount, checkpoint-10's path is taken by a file instead (a save that cannot
/// create its directory), and the test says which it ran.
#[test]
fn a_full_output_dir_fails_the_save_and_keeps_earlier_checkpoints() {
    let _serial = ringmaster_tests::timing_sensitive();
    let mut c = Cluster::start(Some(HOSTFILE), "10s");
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let full = c.path("full");
    std::fs::create_dir_all(&full).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40m", "tmpfs"])
        .arg(&full)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _guard = mounted.then(|| Mounted(full.clone()));
    let cfg = config_steps(&c, "full/out", 12, 5, "");
    if !mounted {
        eprintln!("no tmpfs mount allowed here: checkpoint-10's path is blocked by a file");
        std::fs::create_dir_all(c.path("full/out")).unwrap();
        std::fs::write(c.path("full/out/checkpoint-10"), b"in the way").unwrap();
    }
    let job = c.submit(
        "full-job.yaml",
        &format!("name: full\nmax_restarts: 1\ntrain: {}\n", cfg.display()),
    );
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(300));
    assert_eq!(st["state"], "FAILED", "{st:#}");
    assert_eq!(st["generation"], 1, "it restarted once: {st:#}");
    assert_eq!(st["failures"].as_array().unwrap().len(), 2, "{st:#}");
    let why = if mounted {
        "No space left on device"
    } else {
        "exists"
    };
    for generation in ["0", "1"] {
        // The rank that hit the error names the checkpoint and the cause (the others fail on
        // the lost peer after it).
        let logs: Vec<String> = (0..4)
            .map(|r| {
                text(&c.ringctl(&[
                    "logs",
                    &job,
                    "--rank",
                    &r.to_string(),
                    "--generation",
                    generation,
                ]))
            })
            .collect();
        assert!(
            logs.iter()
                .any(|l| l.contains("saving the checkpoint of step 10")
                    && l.contains("checkpoint-10")
                    && l.contains(why)),
            "generation {generation}: {logs:#?}"
        );
    }
    assert_eq!(step_of(&st, "last_checkpoint"), Some(5), "{st:#}");
    assert_eq!(step_of(&st, "resumed_from"), Some(5), "{st:#}");
    assert!(c.path("full/out/checkpoint-5/COMMITTED").is_file());
    let out = c.ringctl(&[
        "export",
        c.path("full/out/checkpoint-5").to_str().unwrap(),
        "--out",
        c.path("exported").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "checkpoint-5 is intact: {}",
        text(&out)
    );
    assert!(c.path("exported/model.safetensors").is_file());
}

/// A rank that slows down (the trainer's test knob: rank 2 takes twice its own compute time
/// per step from step 20 to 60) is flagged as a straggler while the job runs, within 50
/// steps, naming its rank and node and how much slower it is: in the status, as an event and
/// as a metric. The flag clears within 50 steps once it is back in line, and the job is not
/// disturbed. Meanwhile the operator's figures: the job's MFU (in (0, 1]) in the status, the
/// text status and the metrics, and the checkpoint of step 100's save and commit durations in
/// the checkpoint histograms.
#[test]
fn a_slow_rank_is_flagged_as_a_straggler_and_cleared_when_it_recovers() {
    let _serial = ringmaster_tests::timing_sensitive();
    let (opts, metrics) = ringmaster_tests::ClusterOpts::with_metrics();
    let mut c = Cluster::start_with(Some(HOSTFILE), "30s", opts);
    c.start_agent("w0", 2, &[]);
    c.start_agent("w1", 2, &[]);
    c.wait_joined(&["w0", "w1"]);
    let cfg = config_steps(&c, "s", 130, 100, "");
    let yaml = std::fs::read_to_string(&cfg).unwrap().replace(
        "per_device_train_batch_size: 16",
        "per_device_train_batch_size: 4",
    );
    std::fs::write(&cfg, yaml).unwrap();
    let job = c.submit(
        "s-job.yaml",
        &format!(
            "name: s\nenv:\n  RINGMASTER_TEST_SLOW_STEPS: \"rank=2,factor=2,from=20,to=60\"\ntrain: {}\n",
            cfg.display()
        ),
    );
    let flagged = wait_until(Duration::from_secs(600), "rank 2 flagged", || {
        let st = c.status(&job);
        (!st["stragglers"].as_array()?.is_empty()).then_some(st)
    });
    let s = &flagged["stragglers"];
    assert_eq!(s.as_array().unwrap().len(), 1, "{flagged:#}");
    assert_eq!(
        (&s[0]["rank"], &s[0]["node"]),
        (&2.into(), &"w1".into()),
        "{flagged:#}"
    );
    let since = s[0]["since_step"].as_u64().unwrap();
    assert!((20..=70).contains(&since), "flagged at step {since}");
    // Above the flagging threshold (how far above depends on how much of the 20-step window
    // the slow steps filled when the flag was raised, and on the machine's load).
    assert!(s[0]["slowdown"].as_f64().unwrap() > 1.1, "{flagged:#}");
    let scraped = ringmaster_tests::metrics_text(&metrics);
    let want = format!("ringmaster_rank_straggler{{job=\"{job}\",rank=\"2\",node=\"w1\"}} 1");
    assert!(scraped.contains(&want), "{want} in:\n{scraped}");
    assert!(
        scraped.contains("ringmaster_rank_compute_seconds{"),
        "{scraped}"
    );
    let samples = ringmaster_tests::parse_prometheus(&scraped).unwrap_or_else(|e| panic!("{e}"));
    let peaks = samples
        .iter()
        .filter(|(n, l, v)| n == "ringmaster_rank_peak_memory_bytes" && l["job"] == job && *v > 0.0)
        .count();
    assert_eq!(peaks, 4, "{scraped}");
    // Each rank's telemetry in the status, as the live view shows it.
    for r in flagged["ranks"].as_array().unwrap() {
        assert!(r["step_seconds"].as_f64().is_some_and(|s| s > 0.0), "{r:#}");
        assert!(
            r["peak_memory_bytes"].as_u64() >= r["memory_bytes"].as_u64(),
            "{r:#}"
        );
        assert_eq!(r["device"], "cpu", "{r:#}");
    }
    let shown = text(&c.ringctl(&["status", &job]));
    assert!(shown.contains("straggler: rank 2 on w1 is"), "{shown}");
    // Every rank reported its peak (a GEMM measured at start) and the FLOPs per token: the
    // job's MFU while it runs.
    let mfu = wait_until(Duration::from_secs(60), "the job's MFU", || {
        c.status(&job)["progress"]["mfu"].as_f64()
    });
    assert!(mfu > 0.0 && mfu <= 1.0, "MFU {mfu}");
    let shown = text(&c.ringctl(&["status", &job]));
    assert!(shown.contains("   MFU "), "{shown}");
    let later = ringmaster_tests::metrics_text(&metrics);
    let want = format!("ringmaster_job_mfu_ratio{{job=\"{job}\"}} ");
    assert!(later.contains(&want), "{want} in:\n{later}");
    // The job's step moved between the two scrapes.
    let step_in = |text: &str| {
        ringmaster_tests::parse_prometheus(text)
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .find(|(n, l, _)| n == "ringmaster_job_step" && l["job"] == job)
            .map(|(_, _, v)| v)
    };
    let before = step_in(&scraped).expect("the job's step in the first scrape");
    // (A scrape reuses a snapshot for up to 1 s.)
    wait_until(Duration::from_secs(60), "job_step to move", || {
        step_in(&ringmaster_tests::metrics_text(&metrics))
            .filter(|s| *s > before)
            .map(|_| ())
    });
    // Back in line after step 60: cleared within 50 steps, while the job still runs.
    let cleared = wait_until(Duration::from_secs(600), "rank 2 cleared", || {
        let st = c.status(&job);
        st["stragglers"].as_array()?.is_empty().then_some(st)
    });
    let step = cleared["progress"]["step"].as_u64().unwrap_or(0);
    assert!(step <= 60 + 50, "cleared at step {step}: {cleared:#}");
    let st = c.wait_state(&job, &["SUCCEEDED", "FAILED"], Duration::from_secs(600));
    assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
    assert_eq!(step_of(&st, "last_checkpoint"), Some(100), "{st:#}");
    // The checkpoint of step 100, observed once in each histogram with rank 0's durations.
    let scraped = ringmaster_tests::metrics_text(&metrics);
    // A finished job has no series of its own.
    assert!(!scraped.contains(&format!("job=\"{job}\"")), "{scraped}");
    for h in ["save", "commit"] {
        let count = scraped
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ringmaster_checkpoint_{h}_seconds_count ")))
            .and_then(|n| n.trim().parse::<u64>().ok());
        assert!(
            count.is_some_and(|n| n >= 1),
            "checkpoint {h} seconds in:\n{scraped}"
        );
        let sum = scraped
            .lines()
            .find_map(|l| l.strip_prefix(&format!("ringmaster_checkpoint_{h}_seconds_sum ")))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(sum > 0.0 && sum < 600.0, "checkpoint {h}: {sum} s");
    }
    let out = c.ringctl(&["events", &job, "--output", "json"]);
    let kinds: Vec<(String, Option<u64>)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["kind"].as_str().unwrap().to_owned(), v["rank"].as_u64())
        })
        .filter(|(k, _)| k.starts_with("Straggler"))
        .collect();
    assert_eq!(
        kinds,
        [
            ("StragglerDetected".to_owned(), Some(2)),
            ("StragglerCleared".to_owned(), Some(2))
        ]
    );
}
