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
        (
            env!("CARGO_BIN_EXE_coordinator"),
            vec!["--listen", "127.0.0.1:99999"],
        ),
        (
            env!("CARGO_BIN_EXE_coordinator"),
            vec!["--listen", "10.1.2.3.4:29500"],
        ),
        (
            env!("CARGO_BIN_EXE_coordinator"),
            vec!["--store", "foo://bar"],
        ),
        (
            env!("CARGO_BIN_EXE_coordinator"),
            vec!["--data-dir", "Cargo.toml"],
        ),
        (
            env!("CARGO_BIN_EXE_coordinator"),
            vec!["--heartbeat-timeout", "2days"],
        ),
        (
            env!("CARGO_BIN_EXE_ringctl"),
            vec!["--coordinator", "127.0.0.1:99999", "jobs"],
        ),
        (
            env!("CARGO_BIN_EXE_ringctl"),
            vec!["--coordinator", "127.0.0.1:1,", "jobs"],
        ),
        (
            env!("CARGO_BIN_EXE_ringctl"),
            vec!["submit", "x.yaml", "--nodes", "2"],
        ),
        // Refused before any worker starts.
        (
            env!("CARGO_BIN_EXE_ringctl"),
            vec!["launch", "../examples/quickstart.yaml", "learning_rate=abc"],
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

/// A TLS key that does not belong to the certificate is a usage error at start (exit 2, one
/// line naming both files), not a failure once the server is being built.
#[test]
fn a_tls_key_of_another_certificate_exits_2_naming_the_files() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["a", "b"] {
        let out = Command::new(env!("CARGO_BIN_EXE_ringctl"))
            .args(["certs", "init"])
            .arg(dir.path().join(d))
            .args(["--host", "localhost"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("--tls-cert")
        .arg(dir.path().join("a/coordinator.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("b/coordinator-key.pem"))
        .arg("--join-token-file")
        .arg(dir.path().join("a/join-token"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Waited for with a deadline: a coordinator that started anyway is killed and named.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(std::time::Duration::from_secs(20)) else {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        panic!("the coordinator started with a mismatched TLS key");
    };
    let out = out.unwrap();
    let (status, err) = (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("a/coordinator.pem") && err.contains("b/coordinator-key.pem"),
        "{err}"
    );
}
