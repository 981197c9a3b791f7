//! The `trainer` binary refuses bad configs with exit code 2, naming the file and key.

use std::process::Command;

#[test]
fn bad_config_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.yaml");
    std::fs::write(&p, "stage: sft\nlerning_rate: 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lerning_rate") && err.contains("t.yaml"),
        "{err}"
    );
}
