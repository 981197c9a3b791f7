//! agent exit codes for usage errors (also makes `cargo test` build the `agent` binary that
//! the workspace's integration tests in tests/ start).

use std::process::Command;

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["--bogus"],
        vec![],
        vec!["--join", "127.0.0.1:1", "--slots", "0"],
        vec!["--join", "127.0.0.1:1", "--name", "a/b"],
        vec!["--join", "no-port-here"],
        vec![
            "--join",
            "127.0.0.1:1",
            "--join-token-file",
            "/nonexistent/token",
        ],
        vec!["--join", "127.0.0.1:1", "--trainer", "/nonexistent/trainer"],
        vec!["--join", "127.0.0.1:1", "--work-dir", "Cargo.toml"],
        vec!["--join", "127.0.0.1:1", "--max-backoff", "0s"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
}
