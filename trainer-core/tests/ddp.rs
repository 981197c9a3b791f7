//! Data parallelism through the real ring: trainer processes on loopback, bootstrapped through a
//! directory store, take the same steps as one process with the same global batch (gradient
//! accumulation making up the difference): per-step loss and final parameters within 1e-5
//! relative (fp32; only the summation order of gradients differs).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ringmaster_data::synthetic::{AdditionConfig, generate_addition};
use ringmaster_data::template::Template;
use ringmaster_data::tokenizer::{BpeTrainingOptions, train_bpe};
use ringmaster_model::hf;

const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");

fn fixture(dir: &Path) {
    let split = generate_addition(&AdditionConfig {
        seed: 4,
        min_digits: 1,
        max_digits: 2,
        train_size: 256,
        eval_size: 8,
    })
    .unwrap();
    split.write_jsonl(&dir.join("data")).unwrap();
    std::fs::write(
        dir.join("data/dataset_info.json"),
        r#"{"addition_train": {"file_name": "train.jsonl"}}"#,
    )
    .unwrap();
    let texts: Vec<String> = split
        .train
        .iter()
        .map(|r| r.instruction.clone() + &r.output)
        .collect();
    let tok = train_bpe(
        texts.into_iter(),
        &BpeTrainingOptions::for_template(&Template::empty(), 270),
    )
    .unwrap();
    tok.save_dir(dir.join("model")).unwrap();
    std::fs::write(
        dir.join("model/config.json"),
        format!(
            r#"{{"model_type": "llama", "vocab_size": {}, "hidden_size": 32, "intermediate_size": 48,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64}}"#,
            tok.vocab_size()
        ),
    )
    .unwrap();
}

fn write_config(dir: &Path, out: &str, micro: u32, accum: u32) -> std::path::PathBuf {
    let path = dir.join(format!("{out}.yaml"));
    std::fs::write(
        &path,
        format!(
            "model_name_or_path: {m}\ntrain_from_scratch: true\nstage: sft\nfinetuning_type: full\n\
             dataset: addition_train\ndataset_dir: {d}\ntemplate: empty\ncutoff_len: 32\n\
             output_dir: {o}\nper_device_train_batch_size: {micro}\ngradient_accumulation_steps: {accum}\n\
             learning_rate: 2.0e-3\nmax_grad_norm: 1.0\nweight_decay: 0.1\nmax_steps: 5\nlogging_steps: 1\nseed: 9\n",
            m = dir.join("model").display(),
            d = dir.join("data").display(),
            o = dir.join(out).display(),
        ),
    )
    .unwrap();
    path
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(config: &Path, world: usize, store: &Path) {
    let mut procs = Procs(Vec::new());
    for rank in 0..world {
        let child = Command::new(TRAINER)
            .arg(config)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", world.to_string())
            .env("RINGMASTER_STORE_DIR", store)
            .env("RINGMASTER_JOB_ID", "ddp-test")
            .env_remove("RINGMASTER_COORDINATOR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        procs.0.push(child);
    }
    // Watchdog: a hung rank is killed after 300 s, which ends the blocking waits below.
    let pids: Vec<i32> = procs.0.iter().map(|c| c.id() as i32).collect();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(300)).is_err() {
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::SIGKILL,
                );
            }
            return true;
        }
        false
    });
    let mut failures = Vec::new();
    for (rank, child) in procs.0.iter_mut().enumerate() {
        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        if !status.success() {
            failures.push(format!("rank {rank} of {world} failed ({status}): {err}"));
        }
    }
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap();
    assert!(
        !timed_out,
        "world {world}: killed after 300 s: {failures:?}"
    );
    assert!(failures.is_empty(), "{failures:?}");
}

fn losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("trainer_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn two_and_four_ranks_equal_one_process_with_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    // Global batch 8 in every run.
    let single = write_config(dir.path(), "single", 2, 4);
    run(&single, 1, &dir.path().join("store1"));
    let reference = hf::load_dir(&dir.path().join("single")).unwrap().params;
    let ref_losses = losses(&dir.path().join("single"));
    assert_eq!(ref_losses.len(), 5);
    for (world, micro, accum) in [(2usize, 2u32, 2u32), (4, 2, 1)] {
        let name = format!("ddp{world}");
        let cfg = write_config(dir.path(), &name, micro, accum);
        run(&cfg, world, &dir.path().join(format!("store{world}")));
        let got = hf::load_dir(&dir.path().join(&name)).unwrap().params;
        let l = losses(&dir.path().join(&name));
        for (a, b) in l.iter().zip(&ref_losses) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "world {world}: losses {l:?} vs {ref_losses:?}"
            );
        }
        for ((spec, x), (_, y)) in got.iter().zip(reference.iter()) {
            for (p, q) in x.iter().zip(y) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + p.abs().max(q.abs())),
                    "world {world}: {} differs: {p} vs {q}",
                    spec.name
                );
            }
        }
    }
}
