//! ringctl and coordinator exit codes for usage errors (also makes `cargo test` build the
//! binaries that the workspace's integration tests in tests/ start).

use std::process::Command;

#[test]
fn unknown_flags_and_bad_values_exit_2() {
    for (bin, args) in [
        (env!("CARGO_BIN_EXE_ringctl"), vec!["--bogus"]),
        (
            env!("CARGO_BIN_EXE_ringctl"),
            vec!["local", "x.yaml", "--nodes", "0"],
        ),
        (
            env!("CARGO_BIN_EXE_coordinator"),
            vec!["--heartbeat-timeout", "soon"],
        ),
        (
            env!("CARGO_BIN_EXE_coordinator"),
            vec!["--listen", "nowhere"],
        ),
    ] {
        let out = Command::new(bin).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bin} {args:?}: {out:?}");
    }
}

#[test]
fn unreachable_coordinator_exits_1() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringctl"))
        .args(["--coordinator", "127.0.0.1:1", "jobs"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the coordinator at 127.0.0.1:1"),
        "{err}"
    );
}

#[test]
fn missing_spec_file_exits_2_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringctl"))
        .args([
            "--coordinator",
            "127.0.0.1:1",
            "submit",
            "/nonexistent/job.yaml",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/job.yaml"));
}

/// The agent refuses `--slots` above the limit the coordinator enforces on a Join (the
/// hostfile's): the two crates do not depend on each other, so the test ties them.
#[test]
fn the_agent_and_the_coordinator_share_the_slot_limit() {
    assert_eq!(
        ringmaster_agent::MAX_SLOTS,
        ringmaster_hostfile::hostfile::MAX_SLOTS
    );
}
