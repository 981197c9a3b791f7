//! `ringctl launch` across two "nodes" with their own addresses ([`TwoNodes`]: network
//! namespaces joined by a veth pair, or the loopback aliases 127.0.0.2/127.0.0.3 where
//! namespaces are refused), one real launcher per node started with torchrun's flags, real
//! trainers on the quickstart's model and data (ZeRO-2, 2 nodes x 2 ranks):
//! - the same per-step losses as `ringctl local`, with node 1 started 30 s after node 0;
//! - a worker killed on node 1: every worker of both nodes is gone within 5 s, both nodes
//!   restart once and the job succeeds; with no restart left both launchers fail naming the rank;
//! - a signal to one launcher stops both nodes, and neither restarts;
//! - node 1 pointed at a wrong port fails with one line naming the address, within the
//!   rendezvous timeout; node 1 with a different recipe is refused on both nodes;
//! - the trainer started by hand per rank with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
//!   alone (rank 0 serves the store) trains to `ringctl local`'s losses;
//! - (one machine, seconds) `ringctl launch -- CMD` runs CMD as a command through the real CLI,
//!   and a DeepSpeed launch exits with its failing rank's exit code.
//!
//! The layout and environment each of the four flag families gives are table tests in
//! launch/tests/frontends.rs; the runtime's finer cases (a second node 0, the store cleared
//! between restarts) in launch/tests/runtime.rs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ringmaster_tests::{Proc, TwoNodes, alive, bin, timing_sensitive, wait_until};

/// Steps of the runs that are compared with `ringctl local`.
const STEPS: u64 = 12;
/// Steps of the runs that are interrupted: long enough that the interruption lands mid-run.
const LONG_STEPS: u64 = 150;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart")
}

/// The quickstart's model and data, `steps` steps of global batch 64 on 4 ranks under ZeRO-2,
/// a loss line per step, a checkpoint every `save_steps`; `lr` lets two recipes differ.
fn recipe(path: &Path, steps: u64, save_steps: u64, lr: &str) -> PathBuf {
    let ex = examples();
    let dir = path.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let ds = dir.join("ds_z2.json");
    std::fs::write(
        &ds,
        r#"{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}"#,
    )
    .unwrap();
    std::fs::write(
        path,
        format!(
            "model_name_or_path: {m}\ntrain_from_scratch: true\nstage: sft\nfinetuning_type: full\n\
             dataset: addition_train\ndataset_dir: {d}\ntemplate: default\ncutoff_len: 64\n\
             per_device_train_batch_size: 16\nlearning_rate: {lr}\nmax_steps: {steps}\n\
             logging_steps: 1\nsave_steps: {save_steps}\nseed: 3\ndeepspeed: {ds}\n",
            m = ex.join("model").display(),
            d = ex.join("data").display(),
            ds = ds.display(),
        ),
    )
    .unwrap();
    path.to_owned()
}

/// `step → loss` from `out`'s trainer_log.jsonl (a restarted generation's line for a step
/// replaces the earlier one).
fn losses(out: &Path) -> BTreeMap<u64, f64> {
    std::fs::read_to_string(out.join("trainer_log.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
        .collect()
}

fn assert_same_losses(what: &str, got: &BTreeMap<u64, f64>, want: &BTreeMap<u64, f64>) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: steps logged"
    );
    for (step, b) in want {
        let a = got[step];
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "{what}, step {step}: {a}, ringctl local {b}"
        );
    }
}

/// `ringctl local` on 2 nodes x 2 slots: the reference losses.
fn local_losses(dir: &Path, recipe: &Path) -> BTreeMap<u64, f64> {
    let cluster = dir.join("local");
    let out = cluster.join("out");
    let o = Command::new(bin("ringctl"))
        .arg("local")
        .arg(recipe)
        .args(["--nodes", "2", "--slots", "2", "--work-dir"])
        .arg(&cluster)
        .arg(format!("output_dir={}", out.display()))
        .env_remove("RINGMASTER_COORDINATOR")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ringctl local: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let l = losses(&out);
    assert_eq!(l.len() as u64, STEPS, "ringctl local logged {l:?}");
    l
}

/// Node `node`'s `ringctl launch` with torchrun's flags (2 nodes, 2 ranks each), training
/// `recipe` into `out`; its workers carry `RINGMASTER_TEST_TAG=tag`, so that the test finds them.
fn launcher(
    nodes: &TwoNodes,
    node: usize,
    port: u16,
    extra: &[&str],
    recipe: &Path,
    out: &Path,
    tag: &str,
) -> Proc {
    let mut cmd = nodes.command(node, &bin("ringctl"));
    cmd.args(["launch", "--nnodes", "2", "--nproc-per-node", "2"])
        .arg(format!("--node-rank={node}"))
        .arg(format!("--master-addr={}", nodes.addrs[0]))
        .arg(format!("--master-port={port}"));
    if !nodes.isolated() {
        // Loopback aliases all route from 127.0.0.1: the address must be given.
        cmd.arg(format!("--local-addr={}", nodes.addrs[node]));
    }
    cmd.args(extra)
        .arg(recipe)
        .arg(format!("output_dir={}", out.display()))
        .env_remove("RINGMASTER_COORDINATOR")
        .env_remove("RINGMASTER_STORE_DIR")
        .env("RINGMASTER_TEST_TAG", tag);
    let log = out.parent().unwrap().join(format!("{tag}-node{node}.log"));
    Proc::spawn(&format!("{tag}: ringctl launch on node {node}"), cmd, log)
}

/// The trainers of the launchers tagged `tag` in `generation`: rank → pid.
fn trainers(tag: &str, generation: u64) -> BTreeMap<u32, u32> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let want_tag = format!("RINGMASTER_TEST_TAG={tag}");
    let want_gen = format!("RINGMASTER_GENERATION={generation}");
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let exe = std::fs::read_link(e.path().join("exe")).unwrap_or_default();
        if exe.file_name().is_none_or(|n| n != "trainer") {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let vars: Vec<String> = env
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if !vars.contains(&want_tag) || !vars.contains(&want_gen) {
            continue;
        }
        if let Some(rank) = vars
            .iter()
            .find_map(|v| v.strip_prefix("RANK="))
            .and_then(|r| r.parse().ok())
        {
            out.insert(rank, pid);
        }
    }
    out
}

/// Waits until the four trainers of generation 0 run and the job has logged a step; returns
/// their pids.
fn training(tag: &str, out: &Path, procs: &mut [&mut Proc]) -> BTreeMap<u32, u32> {
    wait_until(Duration::from_secs(120), "4 trainers logging steps", || {
        for p in procs.iter_mut() {
            if let Some(code) = p.wait_exit(Duration::ZERO) {
                panic!("{} exited {code} early:\n{}", p.name, p.log_text());
            }
        }
        let t = trainers(tag, 0);
        (t.len() == 4 && !losses(out).is_empty()).then_some(t)
    })
}

/// Waits until none of `pids` runs; how long that took.
fn all_gone(pids: &BTreeMap<u32, u32>, since: Instant) -> Duration {
    wait_until(Duration::from_secs(30), "every worker gone", || {
        pids.values().all(|p| !alive(*p)).then(Instant::now)
    })
    .duration_since(since)
}

fn wait_end(p: &mut Proc) -> (Option<i32>, String) {
    let code = p.wait_exit(Duration::from_secs(300));
    (code, p.log_text())
}

#[test]
fn two_nodes_at_their_own_addresses_train_as_local_does_with_node_1_started_30_s_late() {
    let nodes = TwoNodes::start();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let recipe = recipe(&dir.join("recipe.yaml"), STEPS, 1000, "3.0e-3");
    let out = dir.join("launch-out");
    let port = nodes.free_port(0);
    let started = Instant::now();
    let mut n0 = launcher(&nodes, 0, port, &[], &recipe, &out, "late");
    // The reference runs while node 0 waits for node 1.
    let want = local_losses(dir, &recipe);
    // Node 1 starts 30 s after node 0: this wait is the case under test, not a synchronisation.
    std::thread::sleep(Duration::from_secs(30).saturating_sub(started.elapsed()));
    assert_eq!(
        n0.wait_exit(Duration::ZERO),
        None,
        "node 0 gave up waiting:\n{}",
        n0.log_text()
    );
    assert!(
        trainers("late", 0).is_empty(),
        "workers started before every node joined"
    );
    let mut n1 = launcher(&nodes, 1, port, &[], &recipe, &out, "late");
    for p in [&mut n0, &mut n1] {
        let (code, log) = wait_end(p);
        assert_eq!(code, Some(0), "{}:\n{log}", p.name);
    }
    assert_same_losses("ringctl launch", &losses(&out), &want);
}

/// Starts both nodes on a long run with `max_restarts`, waits for training, SIGKILLs rank 3
/// (node 1, local rank 1) and checks that every worker of generation 0, on both nodes, is gone
/// within 5 s. Returns the launchers and the output directory.
fn kill_rank_3(
    nodes: &TwoNodes,
    dir: &Path,
    tag: &str,
    max_restarts: &str,
) -> (Proc, Proc, PathBuf) {
    let recipe = recipe(&dir.join("recipe.yaml"), LONG_STEPS, 1000, "3.0e-3");
    let out = dir.join("out");
    let port = nodes.free_port(0);
    let extra = ["--max-restarts", max_restarts];
    let mut n0 = launcher(nodes, 0, port, &extra, &recipe, &out, tag);
    let mut n1 = launcher(nodes, 1, port, &extra, &recipe, &out, tag);
    let pids = training(tag, &out, &mut [&mut n0, &mut n1]);
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[&3] as i32), Signal::SIGKILL).unwrap();
    let took = all_gone(&pids, killed);
    assert!(
        took <= Duration::from_secs(5),
        "the workers of both nodes took {took:?} to stop after rank 3 died"
    );
    eprintln!("{tag}: every worker gone {took:?} after rank 3 was killed");
    (n0, n1, out)
}

#[test]
fn a_worker_killed_on_node_1_stops_both_nodes_and_the_job_restarts_once() {
    let _serial = timing_sensitive();
    let nodes = TwoNodes::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut n0, mut n1, out) = kill_rank_3(&nodes, dir.path(), "restart", "1");
    for p in [&mut n0, &mut n1] {
        let (code, log) = wait_end(p);
        assert_eq!(code, Some(0), "{}:\n{log}", p.name);
        assert!(
            log.contains("rank 3 (node 1, local rank 1) was killed by signal 9")
                && log.contains("restart 1 of 1"),
            "{}:\n{log}",
            p.name
        );
    }
    let l = losses(&out);
    assert_eq!(l.keys().last(), Some(&LONG_STEPS), "{l:?}");
}

#[test]
fn with_no_restart_left_both_launchers_fail_naming_the_rank() {
    let _serial = timing_sensitive();
    let nodes = TwoNodes::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut n0, mut n1, _) = kill_rank_3(&nodes, dir.path(), "no-restart", "0");
    for p in [&mut n0, &mut n1] {
        let (code, log) = wait_end(p);
        assert_eq!(code, Some(1), "{}:\n{log}", p.name);
        assert!(
            log.contains("the job failed after 0 restart(s): rank 3 (node 1, local rank 1)"),
            "{}:\n{log}",
            p.name
        );
    }
}

/// A rank whose collective failed (the trainer's exit 4) only reacts to another's death: the
/// rank that died is named even when its node polls its workers far less often than the
/// reacting node does (each node's monitor interval is in the store; the reaction waits for
/// twice the slowest).
#[test]
fn the_rank_that_died_is_named_over_a_faster_nodes_reaction() {
    let _serial = timing_sensitive();
    let nodes = TwoNodes::start();
    let dir = tempfile::tempdir().unwrap();
    let port = nodes.free_port(0);
    // Rank 1 reacts at once; rank 0, the cause, ends half a second later, on a node that
    // looks at its workers every 3 s.
    let script = "if [ \"$RANK\" = 1 ]; then exit 4; fi; sleep 0.5; exit 7";
    let mut procs: Vec<Proc> = (0..2)
        .map(|node| {
            let mut cmd = nodes.command(node, &bin("ringctl"));
            cmd.args(["launch", "--nnodes=2", "--nproc-per-node=1"])
                .arg(format!("--node-rank={node}"))
                .arg(format!("--master-addr={}", nodes.addrs[0]))
                .arg(format!("--master-port={port}"))
                .arg(format!("--monitor-interval={}", ["3", "0.1"][node]));
            if !nodes.isolated() {
                cmd.arg(format!("--local-addr={}", nodes.addrs[node]));
            }
            cmd.args(["--", "sh", "-c", script])
                .env_remove("RINGMASTER_COORDINATOR")
                .env_remove("RINGMASTER_STORE_DIR");
            Proc::spawn(
                &format!("cause node {node}"),
                cmd,
                dir.path().join(format!("node{node}.log")),
            )
        })
        .collect();
    for p in &mut procs {
        let (code, log) = wait_end(p);
        assert_eq!(code, Some(1), "{}:\n{log}", p.name);
        assert!(
            log.contains("the job failed after 0 restart(s): rank 0 (node 0, local rank 0) exited with code 7"),
            "{}:\n{log}",
            p.name
        );
    }
}

#[test]
fn a_signal_to_one_launcher_stops_both_nodes_without_a_restart() {
    let _serial = timing_sensitive();
    let nodes = TwoNodes::start();
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(&dir.path().join("recipe.yaml"), LONG_STEPS, 1000, "3.0e-3");
    let out = dir.path().join("out");
    let port = nodes.free_port(0);
    // A restart left: the stop must not take it.
    let extra = ["--max-restarts", "1"];
    let mut n0 = launcher(&nodes, 0, port, &extra, &recipe, &out, "stop");
    let mut n1 = launcher(&nodes, 1, port, &extra, &recipe, &out, "stop");
    let pids = training("stop", &out, &mut [&mut n0, &mut n1]);
    let signalled = Instant::now();
    n1.signal(Signal::SIGTERM);
    let took = all_gone(&pids, signalled);
    assert!(took <= Duration::from_secs(5), "{took:?}");
    for p in [&mut n0, &mut n1] {
        let (code, log) = wait_end(p);
        assert_eq!(code, Some(1), "{}:\n{log}", p.name);
        assert!(
            log.contains("the launcher on node 1 was stopped by signal 15"),
            "{}:\n{log}",
            p.name
        );
    }
    for p in [&n0, &n1] {
        let log = p.log_text();
        assert!(
            !log.contains("restarting every node's workers"),
            "{}: a stop took a restart:\n{log}",
            p.name
        );
    }
}

#[test]
fn node_1_at_a_wrong_port_fails_with_one_line_naming_the_address_within_the_timeout() {
    let nodes = TwoNodes::start();
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(&dir.path().join("recipe.yaml"), STEPS, 1000, "3.0e-3");
    let out = dir.path().join("out");
    // Nothing serves this port on node 0's address.
    let port = nodes.free_port(0);
    let started = Instant::now();
    let mut n1 = launcher(
        &nodes,
        1,
        port,
        &["--rdzv-conf", "timeout=3"],
        &recipe,
        &out,
        "wrong-port",
    );
    let code = n1.wait_exit(Duration::from_secs(60));
    let took = started.elapsed();
    let log = n1.log_text();
    assert_eq!(code, Some(1), "{log}");
    assert_eq!(log.trim_end().lines().count(), 1, "{log}");
    let addr = format!("{}:{port}", nodes.addrs[0]);
    assert!(
        log.contains(&addr) && log.contains("MASTER_ADDR:MASTER_PORT"),
        "{log}"
    );
    // The 3 s timeout, and the start of a debug build: not the default 600 s.
    assert!(took < Duration::from_secs(30), "{took:?}");
}

#[test]
fn node_1_with_a_different_recipe_is_refused_on_both_nodes() {
    let nodes = TwoNodes::start();
    let dir = tempfile::tempdir().unwrap();
    // Each node has its own copy of recipe.yaml; node 1's differs in its learning rate.
    let mine = recipe(&dir.path().join("n0/recipe.yaml"), STEPS, 1000, "3.0e-3");
    let other = recipe(&dir.path().join("n1/recipe.yaml"), STEPS, 1000, "1.0e-3");
    let out = dir.path().join("out");
    let port = nodes.free_port(0);
    let mut n0 = launcher(&nodes, 0, port, &[], &mine, &out, "differ");
    let mut n1 = launcher(&nodes, 1, port, &[], &other, &out, "differ");
    for p in [&mut n0, &mut n1] {
        let (code, log) = wait_end(p);
        assert_eq!(code, Some(1), "{}:\n{log}", p.name);
        assert!(
            log.contains("node 1 (") && log.contains("training config contents"),
            "{}:\n{log}",
            p.name
        );
    }
    assert!(!out.join("trainer_log.jsonl").exists());
}

#[test]
fn trainers_started_by_hand_with_master_addr_alone_train_as_local_does() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let recipe = recipe(&dir.join("recipe.yaml"), STEPS, 1000, "3.0e-3");
    let want = local_losses(dir, &recipe);
    let out = dir.join("by-hand");
    let port = ringmaster_tests::free_port().to_string();
    // Rank 0 last: the others wait for the store it serves.
    let mut ranks: Vec<Proc> = (0..4)
        .rev()
        .map(|rank| {
            let mut cmd = Command::new(bin("trainer"));
            cmd.arg(&recipe)
                .arg(format!("output_dir={}", out.display()))
                .env_clear()
                .envs([
                    ("RANK", rank.to_string()),
                    ("WORLD_SIZE", "4".to_owned()),
                    ("LOCAL_RANK", (rank % 2).to_string()),
                    ("MASTER_ADDR", "127.0.0.1".to_owned()),
                    ("MASTER_PORT", port.clone()),
                ]);
            Proc::spawn(
                &format!("rank {rank}"),
                cmd,
                dir.join(format!("rank{rank}.log")),
            )
        })
        .collect();
    for p in &mut ranks {
        let code = p.wait_exit(Duration::from_secs(300));
        assert_eq!(code, Some(0), "{}:\n{}", p.name, p.log_text());
    }
    assert_same_losses("trainers by hand", &losses(&out), &want);
}

/// `ringctl launch FLAGS -- trainer collective --check` on both nodes (node `k`'s flags from
/// `flags(k)`); every launcher must succeed. Returns their logs.
fn collective_on_two_nodes(nodes: &TwoNodes, flags: impl Fn(usize) -> Vec<String>) -> [String; 2] {
    let dir = tempfile::tempdir().unwrap();
    let mut procs: Vec<Proc> = (0..2)
        .map(|node| {
            let mut cmd = nodes.command(node, &bin("ringctl"));
            cmd.arg("launch").args(flags(node));
            if !nodes.isolated() {
                cmd.arg(format!("--local-addr={}", nodes.addrs[node]));
            }
            cmd.arg("--")
                .arg(bin("trainer"))
                .args([
                    "collective",
                    "--op",
                    "all-reduce",
                    "--bytes",
                    "1MiB",
                    "--check",
                ])
                .env_remove("RINGMASTER_COORDINATOR")
                .env_remove("RINGMASTER_STORE_DIR");
            Proc::spawn(
                &format!("collective node {node}"),
                cmd,
                dir.path().join(format!("node{node}.log")),
            )
        })
        .collect();
    for p in &mut procs {
        let (code, log) = wait_end(p);
        assert_eq!(code, Some(0), "{}:\n{log}", p.name);
    }
    [procs[0].log_text(), procs[1].log_text()]
}

/// A `--` command that uses Ringmaster's collectives (`trainer collective`) meets through the
/// launchers' store like the trainer does: an all-reduce checked against its reference across
/// the two nodes.
#[test]
fn a_command_using_ringmasters_collectives_runs_across_the_two_nodes() {
    let nodes = TwoNodes::start();
    let port = nodes.free_port(0);
    let [log, _] = collective_on_two_nodes(&nodes, |node| {
        vec![
            "--nnodes=2".into(),
            "--nproc-per-node=2".into(),
            format!("--node-rank={node}"),
            format!("--master-addr={}", nodes.addrs[0]),
            format!("--master-port={port}"),
        ]
    });
    // Rank 0's left neighbour is rank 3, on the other node: TCP between the nodes.
    assert!(
        log.contains("rank 0/4: ring connected (from the left: tcp"),
        "{log}"
    );
}

/// torchrun's c10d form with no node rank (`--rdzv-backend c10d --rdzv-endpoint`), as
/// LLaMA-Factory's RDZV_ID form gives it: the launcher on the endpoint's machine serves the
/// store, both take node ranks as they join, and the ranks meet.
#[test]
fn c10d_launchers_without_node_ranks_number_themselves_as_they_join() {
    let nodes = TwoNodes::start();
    let port = nodes.free_port(0);
    let logs = collective_on_two_nodes(&nodes, |_| {
        vec![
            "--nnodes=2".into(),
            "--nproc-per-node=2".into(),
            "--rdzv-backend=c10d".into(),
            format!("--rdzv-endpoint={}:{port}", nodes.addrs[0]),
            "--rdzv-id=join-order".into(),
        ]
    });
    let joined: Vec<bool> = (0..2)
        .map(|k| {
            logs.iter()
                .any(|l| l.contains(&format!("joined run join-order as node {k} of 2")))
        })
        .collect();
    assert_eq!(joined, [true, true], "{logs:?}");
}

/// examples/launch/allreduce.py, a torch program (gloo), under `ringctl launch` on the two
/// nodes: `init_process_group` meets through the launchers' store (torch's TCPStore protocol,
/// TORCHELASTIC_USE_AGENT_STORE), a rank that fails in the first attempt restarts both nodes
/// and the second attempt reduces. Runs where a Python with torch is named by
/// RINGMASTER_TEST_TORCH_PYTHON (bench/.venv/bin/python); CI has no torch.
#[test]
fn a_torch_program_meets_through_the_launchers_store_and_restarts() {
    let Some(python) = std::env::var_os("RINGMASTER_TEST_TORCH_PYTHON") else {
        eprintln!("skipped: RINGMASTER_TEST_TORCH_PYTHON is not set (no torch here)");
        return;
    };
    let nodes = TwoNodes::start();
    let dir = tempfile::tempdir().unwrap();
    let port = nodes.free_port(0);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/launch/allreduce.py");
    let mut procs: Vec<Proc> = (0..2)
        .map(|node| {
            let mut cmd = nodes.command(node, &bin("ringctl"));
            cmd.args(["launch", "--nnodes", "2", "--nproc-per-node", "2"])
                .arg(format!("--node-rank={node}"))
                .arg(format!("--master-addr={}", nodes.addrs[0]))
                .arg(format!("--master-port={port}"))
                .args(["--max-restarts", "1"]);
            if !nodes.isolated() {
                cmd.arg(format!("--local-addr={}", nodes.addrs[node]));
            }
            cmd.arg("--")
                .arg(&python)
                .arg(&script)
                .args(["--fail-once", "3"])
                .env_remove("RINGMASTER_COORDINATOR")
                .env_remove("RINGMASTER_STORE_DIR");
            Proc::spawn(
                &format!("torch node {node}"),
                cmd,
                dir.path().join(format!("node{node}.log")),
            )
        })
        .collect();
    let mut text = String::new();
    for p in &mut procs {
        let (code, log) = wait_end(p);
        assert_eq!(code, Some(0), "{}:\n{log}", p.name);
        text.push_str(&log);
    }
    for rank in 0..4 {
        let want = format!(
            "rank {rank}/4 on node {}, attempt 1: all_reduce 10",
            rank / 2
        );
        assert!(text.contains(&want), "no `{want}` in:\n{text}");
    }
}

/// Through the real CLI on one machine, in seconds: a `--` right after `launch` (which clap
/// would take as its own) still means "run this command", with or without flags before it; and
/// the DeepSpeed dialect exits with the failing rank's exit code, as DeepSpeed's launcher does.
#[test]
fn a_leading_dashdash_runs_a_command_and_deepspeed_exits_with_the_ranks_code() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let hostfile = dir.join("hostfile");
    std::fs::write(&hostfile, "localhost slots=1\n").unwrap();
    let port = ringmaster_tests::free_port().to_string();
    let hostfile = hostfile.display().to_string();
    let cases: [(&str, Vec<&str>, i32); 3] = [
        (
            "leading --",
            vec!["--", "sh", "-c", "echo launched-$WORLD_SIZE"],
            0,
        ),
        (
            "flags then --",
            vec![
                "--nnodes",
                "1",
                "--",
                "sh",
                "-c",
                "echo launched-$WORLD_SIZE",
            ],
            0,
        ),
        (
            "deepspeed, rank exits 5",
            vec![
                "deepspeed",
                "-H",
                &hostfile,
                "--master_port",
                &port,
                "--no_local_rank",
                "--no_python",
                "sh",
                "-c",
                "exit 5",
            ],
            5,
        ),
    ];
    for (i, (what, args, want)) in cases.iter().enumerate() {
        let mut cmd = Command::new(bin("ringctl"));
        cmd.arg("launch")
            .args(args)
            .env_remove("RINGMASTER_COORDINATOR")
            .env_remove("RINGMASTER_STORE_DIR");
        let mut p = Proc::spawn(what, cmd, dir.join(format!("case{i}.log")));
        let code = p.wait_exit(Duration::from_secs(60));
        let log = p.log_text();
        assert_eq!(code, Some(*want), "{what}:\n{log}");
        if *want == 0 {
            assert!(log.contains("launched-1"), "{what}:\n{log}");
        }
    }
}
