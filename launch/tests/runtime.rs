//! The node launcher's runtime with two "nodes" (two launchers on loopback, as threads of the
//! test) and shell workers: the rank layout and environment, a failure on one node stopping
//! and restarting both, the restart budget, a late node, a wrong address, a node that runs
//! something else. Every worker is a short `sh` script; every test ends in seconds.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use ringmaster_launch::plan::{Dialect, LaunchPlan, Port, Program};
use ringmaster_launch::runtime::{Outcome, Runtime, run};
use ringmaster_tests::wait_until;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn runtime(host: &str) -> Runtime {
    Runtime {
        trainer: "/nonexistent/trainer".into(),
        stop_grace: Duration::from_secs(2),
        hostname: host.into(),
    }
}

/// Node `node` of 2, 2 workers each, running `script` under `sh -c`.
fn plan(node: usize, port: u16, script: &str, max_restarts: u32) -> LaunchPlan {
    let mut p = LaunchPlan::new(
        Dialect::Torchrun,
        2,
        Program::Exec(vec!["sh".into(), "-c".into(), script.into()]),
    );
    p.nnodes = 2;
    p.node_rank = node;
    p.master_port = Port::Fixed(port);
    p.run_id = "t".into();
    p.max_restarts = max_restarts;
    p.rdzv_timeout = Duration::from_secs(20);
    p
}

/// Runs both nodes' launchers to their end.
fn both(p0: LaunchPlan, p1: LaunchPlan) -> [Result<Outcome, String>; 2] {
    let h0 = thread::spawn(move || run(&p0, &runtime("n0")).map_err(|e| e.to_string()));
    let h1 = thread::spawn(move || run(&p1, &runtime("n1")).map_err(|e| e.to_string()));
    [h0.join().unwrap(), h1.join().unwrap()]
}

fn read_env(dir: &Path, rank: usize) -> std::collections::BTreeMap<String, String> {
    std::fs::read_to_string(dir.join(format!("env-{rank}")))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn two_nodes_get_the_rank_layout_and_the_contract_environment() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let script = format!("env > {}/env-$RANK", dir.path().display());
    let [a, b] = both(plan(0, port, &script, 0), plan(1, port, &script, 0));
    for r in [&a, &b] {
        assert_eq!(r.as_ref().unwrap().code, 0, "{r:?}");
    }
    for rank in 0..4 {
        let env = read_env(dir.path(), rank);
        let want = [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", (rank % 2).to_string()),
            ("WORLD_SIZE", "4".into()),
            ("LOCAL_WORLD_SIZE", "2".into()),
            ("NODE_RANK", (rank / 2).to_string()),
            ("GROUP_RANK", (rank / 2).to_string()),
            ("NNODES", "2".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
            ("TORCHELASTIC_RUN_ID", "t".into()),
            ("TORCHELASTIC_RESTART_COUNT", "0".into()),
            ("TORCHELASTIC_USE_AGENT_STORE", "True".into()),
            ("RINGMASTER_STORE_SERVED", "1".into()),
            ("RINGMASTER_GENERATION", "0".into()),
            ("ROLE_NAME", "default".into()),
        ];
        for (k, v) in want {
            assert_eq!(env.get(k), Some(&v), "rank {rank} {k}");
        }
    }
}

/// Rank 3 (node 1) fails in the first generation while every other worker would sleep 30 s:
/// both nodes stop their workers and start generation 1 together, which succeeds.
#[test]
fn a_failure_on_one_node_restarts_every_node_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let script = format!(
        "echo $RINGMASTER_GENERATION >> {d}/gens-$RANK; \
         if [ $RINGMASTER_GENERATION = 0 ]; then \
           if [ $RANK = 3 ]; then sleep 0.3; exit 3; fi; sleep 30; fi",
        d = dir.path().display()
    );
    let start = Instant::now();
    let [a, b] = both(plan(0, port, &script, 1), plan(1, port, &script, 1));
    // The sleepers of generation 0 were stopped, not waited for.
    assert!(
        start.elapsed() < Duration::from_secs(25),
        "{:?}",
        start.elapsed()
    );
    for r in [&a, &b] {
        let o = r.as_ref().unwrap();
        assert_eq!((o.code, o.restarts), (0, 1), "{o:?}");
    }
    for rank in 0..4 {
        let gens = std::fs::read_to_string(dir.path().join(format!("gens-{rank}"))).unwrap();
        assert_eq!(gens, "0\n1\n", "rank {rank}");
    }
}

/// Both nodes fail naming rank 3, and both carry its exit code: DeepSpeed's dialect exits with
/// it on every node, the others with 1.
#[test]
fn without_restarts_both_nodes_fail_naming_the_rank() {
    let port = free_port();
    let script = "if [ $RANK = 3 ]; then exit 7; fi; sleep 30";
    let [a, b] = both(plan(0, port, script, 0), plan(1, port, script, 0));
    for r in [&a, &b] {
        let o = r.as_ref().unwrap();
        assert_eq!(o.code, 1, "{o:?}");
        let why = o.failure.as_deref().unwrap();
        assert!(
            why.contains("rank 3 (node 1, local rank 1) exited with code 7"),
            "{why}"
        );
        assert_eq!(o.rank_returncode, Some(7), "{o:?}");
        assert_eq!(o.exit_code(Dialect::DeepSpeed), 7);
        assert_eq!(o.exit_code(Dialect::Torchrun), 1);
    }
}

#[test]
fn a_node_started_late_still_joins() {
    let port = free_port();
    let p0 = plan(0, port, "true", 0);
    let p1 = plan(1, port, "true", 0);
    let h0 = thread::spawn(move || run(&p0, &runtime("n0")).map_err(|e| e.to_string()));
    // The delay is the point: node 1 joins after node 0 has been waiting for it.
    thread::sleep(Duration::from_secs(2));
    let b = run(&p1, &runtime("n1")).map_err(|e| e.to_string());
    let a = h0.join().unwrap();
    assert_eq!(a.unwrap().code, 0);
    assert_eq!(b.unwrap().code, 0);
}

#[test]
fn a_node_pointed_at_a_wrong_port_fails_naming_the_address() {
    let port = free_port();
    let mut p1 = plan(1, port, "true", 0);
    p1.rdzv_timeout = Duration::from_secs(1);
    let e = run(&p1, &runtime("n1")).unwrap_err().to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("MASTER_ADDR:MASTER_PORT"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn a_node_running_something_else_is_refused_by_name() {
    let port = free_port();
    let mut p0 = plan(0, port, "true", 0);
    let mut p1 = plan(1, port, "echo other", 0);
    p0.rdzv_timeout = Duration::from_secs(5);
    p1.rdzv_timeout = Duration::from_secs(5);
    let [a, b] = both(p0, p1);
    for r in [a, b] {
        let e = r.unwrap_err();
        assert!(
            e.contains("node 1 (n1) does not run what node 0 (n0) runs") && e.contains("program"),
            "{e}"
        );
    }
}

#[test]
fn two_launchers_claiming_one_node_rank_are_refused() {
    let port = free_port();
    let mut p0 = plan(0, port, "sleep 1", 0);
    p0.nnodes = 1;
    let mut p0b = plan(0, port, "sleep 1", 0);
    p0b.nnodes = 1;
    // The second node-0 launcher cannot serve the port the first holds, and says so.
    let h = thread::spawn(move || run(&p0, &runtime("n0")).map_err(|e| e.to_string()));
    // Until the first launcher's store answers on the port.
    wait_until(
        Duration::from_secs(10),
        "the first launcher's store",
        || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
    );
    let e = run(&p0b, &runtime("n0b")).unwrap_err().to_string();
    assert!(e.contains("cannot serve the rendezvous store"), "{e}");
    assert_eq!(h.join().unwrap().unwrap().code, 0);
}

/// Between generations node 0 deletes what the workers wrote to the store (torch workers told
/// TORCHELASTIC_USE_AGENT_STORE expect a fresh store on each restart, as torchrun gives them)
/// and keeps the launchers' own keys.
#[test]
fn the_store_is_cleared_of_worker_keys_between_restarts() {
    use ringmaster_collectives::{TcpStoreClient, TcpStoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let port = free_port();
    let script = format!(
        "if [ $RINGMASTER_GENERATION = 0 ]; then touch {d}/gen0-$RANK; \
           until [ -e {d}/fail ]; do sleep 0.05; done; \
           if [ $RANK = 3 ]; then exit 3; fi; sleep 30; \
         else touch {d}/gen1-$RANK; until [ -e {d}/done ]; do sleep 0.05; done; fi"
    );
    let (p0, p1) = (plan(0, port, &script, 1), plan(1, port, &script, 1));
    let h0 = thread::spawn(move || run(&p0, &runtime("n0")).map_err(|e| e.to_string()));
    let h1 = thread::spawn(move || run(&p1, &runtime("n1")).map_err(|e| e.to_string()));
    let all = |g: u32| (0..4).all(|r| dir.path().join(format!("gen{g}-{r}")).exists());
    let within = Duration::from_secs(30);
    wait_until(within, "generation 0 running", || all(0).then_some(()));
    let store =
        TcpStoreClient::connect(&format!("127.0.0.1:{port}"), TcpStoreOptions::default()).unwrap();
    store.set("worker/written-in-generation-0", b"x").unwrap();
    std::fs::write(dir.path().join("fail"), "").unwrap();
    wait_until(within, "generation 1 running", || all(1).then_some(()));
    let gone = !store.check(&["worker/written-in-generation-0"]).unwrap();
    let kept = store.check(&["ringmaster-launch/t/node/0"]).unwrap();
    std::fs::write(dir.path().join("done"), "").unwrap();
    for h in [h0, h1] {
        let o = h.join().unwrap().unwrap();
        assert_eq!((o.code, o.restarts), (0, 1), "{o:?}");
    }
    assert!(gone, "a worker's key survived the restart");
    assert!(kept, "the launchers' own keys were cleared");
}

#[test]
fn the_interface_that_holds_an_address_is_found() {
    use ringmaster_launch::runtime::interface_of;
    assert_eq!(interface_of("127.0.0.1").as_deref(), Some("lo"));
    // TEST-NET-1 (RFC 5737): on no machine.
    assert_eq!(interface_of("192.0.2.77"), None);
    assert_eq!(interface_of("node-a"), None);
}

/// torchrun's c10d form without node ranks: both launchers are on MASTER_ADDR's machine, the
/// first to bind serves the store and the other is its client, and they number themselves
/// 0 and 1 as they join; the layout follows.
#[test]
fn launchers_without_node_ranks_number_themselves_as_they_join() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let script = format!("env > {}/env-$RANK", dir.path().display());
    let unranked = || {
        let mut p = plan(0, port, &script, 0);
        p.join_order = true;
        p
    };
    let [a, b] = both(unranked(), unranked());
    for r in [&a, &b] {
        assert_eq!(r.as_ref().unwrap().code, 0, "{r:?}");
    }
    let mut nodes = std::collections::BTreeSet::new();
    for rank in 0..4 {
        let env = read_env(dir.path(), rank);
        assert_eq!(env["NODE_RANK"], (rank / 2).to_string(), "rank {rank}");
        assert_eq!(env["LOCAL_RANK"], (rank % 2).to_string(), "rank {rank}");
        nodes.insert(env["RINGMASTER_NODE"].clone());
    }
    // Each launcher took one node rank.
    assert_eq!(nodes.len(), 2, "{nodes:?}");
}
