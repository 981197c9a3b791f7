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
