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

#[test]
fn addition_data_and_a_trained_tokenizer_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "data",
            "addition",
            "--train-size",
            "500",
            "--eval-size",
            "20",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let train = std::fs::read_to_string(dir.path().join("train.jsonl")).unwrap();
    assert_eq!(train.lines().count(), 500);
    let first: serde_json::Value = serde_json::from_str(train.lines().next().unwrap()).unwrap();
    let q = first["instruction"].as_str().unwrap();
    let nums: Vec<u64> = q
        .trim_start_matches("What is ")
        .trim_end_matches('?')
        .split(" + ")
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(first["output"], (nums[0] + nums[1]).to_string());

    let tok_dir = dir.path().join("tok");
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["tokenizer", "train"])
        .arg(dir.path().join("train.jsonl"))
        .args(["--template", "llama3", "--vocab-size", "300", "--out"])
        .arg(&tok_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tok = ringmaster_data::tokenizer::Tokenizer::from_dir(&tok_dir).unwrap();
    let ids = tok.encode("What is 12 + 345?").unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "What is 12 + 345?");
    assert!(tok.token_to_id("<|eot_id|>").is_some());
}

#[test]
fn bad_data_arguments_exit_2_naming_them() {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "tokenizer",
            "train",
            "/nonexistent/data.jsonl",
            "--out",
            "/tmp/unused",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/data.jsonl"));
}
