//! Bad input to the `trainer` subcommands is refused with exit code 2 and one clear line that
//! names what and where, before anything is written over.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");

fn trainer(args: &[&str]) -> Output {
    Command::new(TRAINER)
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Exit 2 and a stderr containing every one of `says`, and no panic.
fn refused(o: &Output, says: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for w in says {
        assert!(err.contains(w), "expected {w:?} in: {err}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    err
}

const TINY: &str = r#"{"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
    "num_attention_heads": 2, "vocab_size": 16}"#;

#[test]
fn merge_and_export_never_write_over_their_input_or_a_model_unasked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("tiny.json"), TINY).unwrap();
    let (base, lo, merged) = (d.join("base"), d.join("lo"), d.join("merged"));
    let o = trainer(&[
        "init-model",
        "--config",
        s(&d.join("tiny.json")),
        "--out",
        s(&base),
        "--lora-out",
        s(&lo),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let weights = std::fs::read(base.join("model.safetensors")).unwrap();

    let merge = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "merge",
            "--base",
            s(&base),
            "--adapter",
            s(&lo),
            "--out",
            s(out),
        ];
        a.extend_from_slice(extra);
        trainer(&a)
    };
    // Into the base or the adapter: refused, even with --overwrite.
    for out in [&base, &lo] {
        for extra in [&[][..], &["--overwrite"]] {
            refused(&merge(out, extra), &["--out", "directory itself"]);
        }
    }
    assert_eq!(
        std::fs::read(base.join("model.safetensors")).unwrap(),
        weights
    );
    // A new directory; then the same again only with --overwrite.
    assert!(merge(&merged, &[]).status.success());
    refused(
        &merge(&merged, &[]),
        &["already holds a model", "--overwrite"],
    );
    let o = merge(&merged, &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A committed checkpoint (no tensors) under an output_dir that holds the final model.
    let out = d.join("run");
    let ckpt = out.join("checkpoint-1");
    std::fs::create_dir_all(&ckpt).unwrap();
    let manifest = serde_json::json!({
        "format": 1, "step": 1, "world": 1, "shard_group": 1, "plan": "ddp", "stage": 0,
        "global_batch": 1, "seed": 0, "trainable": "full", "adam_step": 1, "scaler": null,
        "units": [], "shards": [],
    });
    std::fs::write(ckpt.join("manifest.json"), manifest.to_string()).unwrap();
    std::fs::write(ckpt.join("COMMITTED"), "1\n").unwrap();
    std::fs::write(ckpt.join("config.json"), TINY).unwrap();
    std::fs::write(out.join("model.safetensors"), &weights).unwrap();
    let export = |to: &Path, extra: &[&str]| {
        let mut a = vec!["export", s(&ckpt), "--out", s(to)];
        a.extend_from_slice(extra);
        trainer(&a)
    };
    refused(
        &export(&out, &[]),
        &["already holds a model (model.safetensors)", "--overwrite"],
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
    for extra in [&[][..], &["--overwrite"]] {
        refused(
            &export(&ckpt, extra),
            &["is the checkpoint directory itself"],
        );
    }
    assert_eq!(
        std::fs::read(ckpt.join("config.json")).unwrap(),
        TINY.as_bytes()
    );
    let o = export(&out, &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // An --out that is a file.
    refused(
        &export(&out.join("model.safetensors"), &["--overwrite"]),
        &["not a directory"],
    );

    // A checkpoint that does not exist, or is a file: said so, not "not committed".
    let e = refused(
        &trainer(&["export", s(&d.join("nowhere")), "--out", s(&d.join("e1"))]),
        &["no such directory"],
    );
    assert!(!e.contains("COMMITTED"), "{e}");
    let e = refused(
        &trainer(&["export", s(&d.join("tiny.json")), "--out", s(&d.join("e1"))]),
        &["not a directory"],
    );
    assert!(!e.contains("COMMITTED"), "{e}");
    assert!(!d.join("e1").exists());
}

#[test]
fn a_model_too_large_to_allocate_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.json");
    std::fs::write(
        &huge,
        r#"{"hidden_size": 1099511627776, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 1099511627776}"#,
    )
    .unwrap();
    let out = dir.path().join("d");
    refused(
        &trainer(&["init-model", "--config", s(&huge), "--out", s(&out)]),
        &["huge.json", "`vocab_size`", "over the limit"],
    );
    assert!(!out.exists());
}

#[test]
fn errors_say_each_part_once_and_usage_names_the_subcommand() {
    let e = refused(
        &trainer(&["generate", "--model", "nowhere", "--prompt", "hi"]),
        &["nowhere/config.json: "],
    );
    assert_eq!(e.matches("os error 2").count(), 1, "{e}");

    for (args, says) in [
        (
            &["generate", "--model", "m", "--prompt", ""][..],
            "--prompt",
        ),
        (
            &[
                "generate",
                "--model",
                "m",
                "--prompt",
                "hi",
                "--max-new-tokens",
                "0",
            ],
            "--max-new-tokens",
        ),
        (
            &["data", "addition", "--train-size", "0", "--out", "x"],
            "--train-size",
        ),
    ] {
        refused(&trainer(args), &[says]);
    }
    for (sub, usage) in [
        ("generate", "Usage: trainer generate "),
        ("merge", "Usage: trainer merge "),
        ("export", "Usage: trainer export "),
        ("init-model", "Usage: trainer init-model "),
        ("logits", "Usage: trainer logits "),
        ("rows", "Usage: trainer rows "),
        ("device-info", "Usage: trainer device-info"),
        ("collective", "Usage: trainer collective"),
        ("data", "Usage: trainer data "),
        ("tokenizer", "Usage: trainer tokenizer "),
    ] {
        let o = trainer(&[sub, "--help"]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains(usage), "{sub}: {text}");
    }
    let o = trainer(&["data", "addition", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Usage: trainer data addition "), "{text}");
}

#[test]
fn a_run_of_no_epochs_and_no_max_steps_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    let out_dir = format!("output_dir={}", out.display());
    for epochs in ["num_train_epochs=-1", "num_train_epochs=0"] {
        refused(
            &trainer(&["examples/quickstart.yaml", "max_steps=-1", epochs, &out_dir]),
            &["quickstart.yaml", "`num_train_epochs`", "`max_steps`"],
        );
    }
    assert!(!out.exists());
}

#[test]
fn nan_infinities_and_absurd_batches_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = std::fs::read_to_string(repo_root().join("examples/quickstart.yaml")).unwrap();
    let nan = dir.path().join("nan.yaml");
    std::fs::write(&nan, recipe.replace("cutoff_len: 64", "cutoff_len: .nan")).unwrap();
    refused(
        &trainer(&[s(&nan)]),
        &["nan.yaml", "`cutoff_len`", "not a finite number"],
    );
    for (arg, key) in [
        ("learning_rate=.inf", "`learning_rate`"),
        (
            "per_device_train_batch_size=.inf",
            "`per_device_train_batch_size`",
        ),
        (
            "per_device_train_batch_size=4000000000",
            "`per_device_train_batch_size`",
        ),
    ] {
        refused(&trainer(&["examples/quickstart.yaml", arg]), &[key]);
    }
}
