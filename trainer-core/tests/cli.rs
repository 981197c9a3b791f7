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

#[test]
fn model_subcommands_round_trip_and_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(
        &cfg,
        r#"{"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "torch_dtype": "bfloat16"}"#,
    )
    .unwrap();
    let trainer = env!("CARGO_BIN_EXE_trainer");
    let model = dir.path().join("m");
    let out = Command::new(trainer)
        .args(["init-model", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&model)
        .args(["--dtype", "bfloat16"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let logits = dir.path().join("l.json");
    let out = Command::new(trainer)
        .args(["logits", "--model"])
        .arg(&model)
        .args(["--ids", "1,2,3;4,5,6", "--out"])
        .arg(&logits)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&logits).unwrap()).unwrap();
    assert_eq!(v["logits"].as_array().unwrap().len(), 2);
    assert_eq!(v["logits"][0].as_array().unwrap().len(), 3);
    assert_eq!(v["logits"][0][0].as_array().unwrap().len(), 40);
    // Bad inputs: exit 2, naming what is wrong.
    for (args, needle) in [
        (
            vec![
                "logits",
                "--model",
                "/nonexistent",
                "--ids",
                "1",
                "--out",
                "x",
            ],
            "config.json",
        ),
        (
            vec![
                "logits",
                "--model",
                model.to_str().unwrap(),
                "--ids",
                "1,99",
                "--out",
                "x",
            ],
            "99",
        ),
        (
            vec![
                "logits",
                "--model",
                model.to_str().unwrap(),
                "--ids",
                "1,2;3",
                "--out",
                "x",
            ],
            "same",
        ),
        (
            vec![
                "merge",
                "--base",
                model.to_str().unwrap(),
                "--adapter",
                "/nonexistent",
                "--out",
                "x",
            ],
            "adapter_config.json",
        ),
        (
            vec![
                "generate",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "hi",
            ],
            "tokenizer.json",
        ),
    ] {
        let out = Command::new(trainer).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// `device: cuda` where it cannot be had — this binary built without the `cuda` feature, or
/// (built with it) a machine without an NVIDIA driver — exits 2 before reading any data, with
/// one line naming the cause; `device-info` says what `auto` picks and why.
#[test]
fn device_cuda_without_a_gpu_or_the_feature_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("examples/quickstart.yaml")).unwrap();
    let mut cfg = String::new();
    for line in text.lines() {
        if line.starts_with("output_dir:") {
            cfg += &format!("output_dir: {}\n", dir.path().join("out").display());
        } else {
            cfg += line;
            cfg += "\n";
        }
    }
    cfg += "device: cuda\n";
    let p = dir.path().join("q.yaml");
    std::fs::write(&p, cfg).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg(&p)
        .current_dir(&root)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    let cause = if ringmaster_device::BUILT_WITH_CUDA {
        "libcuda"
    } else {
        "built without the `cuda` feature"
    };
    assert!(err.contains(cause) && err.contains("q.yaml"), "{err}");
    assert!(!dir.path().join("out").exists(), "nothing ran");

    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["device-info", "--request", "auto"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let line = report["line"].as_str().unwrap();
    assert!(line.starts_with("device: cpu (auto"), "{line}");
}

/// LLaMA-Factory's command-line forms: `trainer recipe.yaml key=value …` overrides the recipe's
/// keys, and a config given as `--key value` flags alone (a bare `--flag` is true) trains as
/// the recipe does; a misspelt override is refused naming the argument (exit 2).
#[test]
fn recipe_overrides_and_the_flags_form_train() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let out1 = dir.path().join("overrides");
    let run = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .current_dir(&root)
        .arg("examples/quickstart.yaml")
        .arg(format!("output_dir={}", out1.display()))
        .args([
            "max_steps=2",
            "logging_steps=1",
            "eval_dataset=",
            // LLaMA-Factory refuses predict_with_generate without evaluation rows.
            "predict_with_generate=false",
            "save_steps=0",
        ])
        .args(["--report_to", "none", "--dataloader_num_workers", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    // One start-up line names the keys accepted without effect.
    assert!(err.contains("accepted, no effect in Ringmaster:"), "{err}");
    let log = std::fs::read_to_string(out1.join("trainer_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");

    let out2 = dir.path().join("flags");
    let run = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .current_dir(&root)
        .args([
            "--stage",
            "sft",
            "--do_train",
            "--model_name_or_path",
            "examples/quickstart/model",
            "--train_from_scratch",
            "--dataset",
            "addition_train",
            "--dataset_dir",
            "examples/quickstart/data",
            "--template",
            "default",
            "--finetuning_type",
            "full",
            "--cutoff_len",
            "64",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "3e-3",
            "--max_steps",
            "2",
            "--logging_steps",
            "1",
            "--plot_loss",
            "--overwrite_cache",
            "--output_dir",
        ])
        .arg(&out2)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out2.join("training_loss.png").is_file());
    assert!(out2.join("config.json").is_file());

    let run = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .current_dir(&root)
        .args(["examples/quickstart.yaml", "learning_rat=1"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("learning_rat=1") && err.contains("unknown key"),
        "{err}"
    );
}

/// `do_train: false` (LLaMA-Factory's evaluation-only run): nothing is trained or saved; the
/// model of `model_name_or_path` is scored on `eval_dataset` and `eval_results.json` written.
/// Without `eval_dataset` there is nothing to do: exit 2 naming `do_train`.
#[test]
fn do_train_false_scores_the_model_and_trains_nothing() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let run = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .current_dir(&root)
        .arg("examples/quickstart.yaml")
        .arg(format!("output_dir={}", model.display()))
        .args([
            "max_steps=1",
            "eval_dataset=",
            "predict_with_generate=false",
            "save_steps=0",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let out = dir.path().join("eval-only");
    let run = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .current_dir(&root)
        .arg("examples/quickstart.yaml")
        .arg(format!("model_name_or_path={}", model.display()))
        .arg(format!("output_dir={}", out.display()))
        .args([
            "do_train=false",
            "train_from_scratch=false",
            "max_samples=4",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("nothing is trained"), "{err}");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("eval: exact match"), "{stdout}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap())
            .unwrap();
    assert_eq!(results["total"], 4);
    assert!(!out.join("config.json").exists(), "a model was saved");
    assert!(
        !out.join("trainer_log.jsonl").exists(),
        "something was trained"
    );

    let run = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .current_dir(&root)
        .args([
            "examples/quickstart.yaml",
            "do_train=false",
            "eval_dataset=",
        ])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("`do_train`") && err.contains("eval_dataset"),
        "{err}"
    );
}
