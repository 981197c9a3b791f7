//! Collectives as real processes on loopback (`trainer collective`), bootstrapped through a
//! shared directory: results checked for 2 and 4 ranks, and a rank killed mid-call.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_rank(rank: usize, world: usize, store: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg("collective")
        .args(args)
        .arg("--store-dir")
        .arg(store)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("RINGMASTER_JOB_ID", "proc-test")
        .env("RINGMASTER_GENERATION", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting trainer collective")
}

struct Ranks(Vec<Child>);
impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn every_op_is_correct_across_processes() {
    for world in [2usize, 4] {
        for op in [
            "all-reduce",
            "reduce-scatter",
            "all-gather",
            "broadcast",
            "barrier",
        ] {
            for dtype in ["f32", "bf16"] {
                let dir = tempfile::tempdir().unwrap();
                // 0, 1, N-1, N+1, a prime (10,007) and 1,000,003 elements.
                let esize = if dtype == "f32" { 4 } else { 2 };
                let bytes = [0, 1, world - 1, world + 1, 10_007, 1_000_003]
                    .map(|n| (n * esize).to_string())
                    .join(",");
                let bytes = bytes.as_str();
                let mut ranks = Ranks(
                    (0..world)
                        .map(|r| {
                            spawn_rank(
                                r,
                                world,
                                dir.path(),
                                &[
                                    "--op",
                                    op,
                                    "--dtype",
                                    dtype,
                                    "--bytes",
                                    bytes,
                                    "--check",
                                    "--iters",
                                    "2",
                                    "--timeout",
                                    "60s",
                                    "--output",
                                    "json",
                                    "--transport",
                                    if world == 4 { "tcp" } else { "auto" },
                                ],
                            )
                        })
                        .collect(),
                );
                let mut outs = Vec::new();
                for c in std::mem::take(&mut ranks.0) {
                    outs.push(c.wait_with_output().unwrap());
                }
                for (r, o) in outs.iter().enumerate() {
                    assert!(
                        o.status.success(),
                        "world {world} {op} {dtype} rank {r}: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                }
                let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&outs[0].stdout)
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                assert_eq!(lines.len(), 6);
                assert!(
                    lines
                        .iter()
                        .all(|l| l["checked"] == true && l["world"] == world)
                );
            }
        }
    }
}

/// Polls `f` until it is true, failing after `timeout` with `what`.
fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_rank_fails_every_other_rank_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let world = 4;
    let log = |r: usize| dir.path().join(format!("rank-{r}.err"));
    let mut ranks = Ranks(
        (0..world)
            .map(|r| {
                Command::new(env!("CARGO_BIN_EXE_trainer"))
                    .args(["collective", "--op", "all-reduce", "--bytes", "16MiB"])
                    .args(["--iters", "100000", "--timeout", "5s", "--store-dir"])
                    .arg(dir.path().join("store"))
                    .env("RANK", r.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("RINGMASTER_JOB_ID", "kill-test")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(log(r)).unwrap())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    // Every rank is in the ring (and so in its all_reduce loop).
    wait_for(Duration::from_secs(30), "every rank connected", || {
        (0..world)
            .all(|r| std::fs::read_to_string(log(r)).is_ok_and(|t| t.contains("ring connected")))
    });
    let t0 = Instant::now();
    ranks.0[2].kill().unwrap();
    let _ = ranks.0[2].wait();
    for r in [0usize, 1, 3] {
        wait_for(
            Duration::from_secs(10),
            &format!("rank {r} to fail"),
            || match ranks.0[r].try_wait().unwrap() {
                Some(st) => {
                    assert!(!st.success(), "rank {r} exited 0");
                    true
                }
                None => false,
            },
        );
    }
    let took = t0.elapsed();
    for r in [0usize, 1, 3] {
        let err = std::fs::read_to_string(log(r)).unwrap();
        assert!(err.contains("all_reduce #"), "rank {r}: {err}");
        assert!(err.contains("rank "), "rank {r}: {err}");
    }
    assert!(took < Duration::from_secs(6), "{took:?}");
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `trainer collective` ranks with the torchrun environment only: no coordinator, no store
/// directory; `env` adds to RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT=`port`.
fn spawn_master_rank(rank: usize, world: usize, port: u16, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "collective",
            "--op",
            "all-reduce",
            "--bytes",
            "40004",
            "--check",
        ])
        .args(["--iters", "2", "--timeout", "60s", "--output", "json"])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env_remove("RINGMASTER_COORDINATOR")
        .env_remove("RINGMASTER_STORE_DIR")
        .env_remove("RINGMASTER_JOB_ID")
        .env_remove("RINGMASTER_GENERATION")
        .env_remove("TORCHELASTIC_USE_AGENT_STORE")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting trainer collective")
}

fn all_succeed(ranks: &mut Ranks, what: &str) {
    for (r, c) in std::mem::take(&mut ranks.0).into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{what}: rank {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Rank 0 reports (and every rank checks its own result).
        if r == 0 {
            let out = String::from_utf8_lossy(&o.stdout);
            let line: serde_json::Value =
                serde_json::from_str(out.lines().next().unwrap_or("null")).unwrap();
            assert_eq!(line["checked"], true, "{what}: {out}");
        }
    }
}

/// Without a coordinator or a store directory, ranks meet at MASTER_ADDR:MASTER_PORT: rank 0
/// serves a TCP store there (on PyTorch's TCPStore protocol), as torch's rank 0 does, and the
/// others connect with retries, so rank 0 may start last.
#[test]
fn ranks_meet_at_master_addr_where_rank_0_serves_the_store() {
    let world = 4;
    let port = free_port();
    let mut ranks = Ranks(Vec::new());
    for r in (0..world).rev() {
        ranks.0.push(spawn_master_rank(r, world, port, &[]));
        if r == world - 1 {
            // The others try to connect before rank 0 serves.
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    ranks.0.reverse();
    all_succeed(&mut ranks, "rank 0 serving");
}

/// Under torchrun the store at MASTER_ADDR:MASTER_PORT is torchrun's own
/// (`TORCHELASTIC_USE_AGENT_STORE=True`): every rank, rank 0 too, is a client, and the keys are
/// scoped by `TORCHELASTIC_RUN_ID` and `TORCHELASTIC_RESTART_COUNT`, so a restarted group meets
/// afresh in the same store. (Our server stands in for torchrun's here; the client's interop
/// with torch's own servers is tested in ringmaster-collectives' tests/tcpstore_torch.rs.)
#[test]
fn under_torchrun_every_rank_is_a_client_of_the_agent_store() {
    let server = ringmaster_collectives::TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().port();
    for restart in ["0", "1"] {
        let env = [
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RUN_ID", "tr-run"),
            ("TORCHELASTIC_RESTART_COUNT", restart),
        ];
        let mut ranks = Ranks(
            (0..2)
                .map(|r| spawn_master_rank(r, 2, port, &env))
                .collect(),
        );
        all_succeed(&mut ranks, &format!("restart {restart}"));
    }
    // Both generations left their own keys (rank addresses) under the run id.
    let client = ringmaster_collectives::TcpStoreClient::connect(
        &format!("127.0.0.1:{port}"),
        ringmaster_collectives::TcpStoreOptions::default(),
    )
    .unwrap();
    let keys = client.list_keys().unwrap();
    for g in ["/0/", "/1/"] {
        assert!(
            keys.iter()
                .any(|k| k.starts_with("ringmaster/tr-run") && k.contains(g)),
            "{g}: {keys:?}"
        );
    }
}

/// Nothing at MASTER_ADDR:MASTER_PORT, or something that is not a store: a clear error naming
/// the address, after the rendezvous timeout (`RINGMASTER_RDZV_TIMEOUT`), not a hang.
#[test]
fn an_unreachable_or_wrong_master_store_is_a_clear_error() {
    let fails_naming = |port: u16, what: &str| {
        let out = spawn_master_rank(1, 2, port, &[("RINGMASTER_RDZV_TIMEOUT", "1")])
            .wait_with_output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains(&format!("127.0.0.1:{port}")) && err.contains(what),
            "{err}"
        );
    };
    fails_naming(free_port(), "MASTER_ADDR");
    // A listener that accepts and never answers (another service on the port).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    fails_naming(silent.local_addr().unwrap().port(), "not a");
    drop(silent);
}
