//! The quickstart as shipped (examples/quickstart.yaml): a 1.6M-parameter Llama trained from
//! scratch on two-digit addition reaches at least 90% exact match on the 200 held-out problems
//! with greedy decoding.
//!
//! The shipped config is written for 4 ranks (`ringctl local ... --nodes 2 --slots 2`,
//! micro-batch 16 each: global batch 64). This test runs one process with micro-batch 64: the
//! same global batch and, by the data-parallel and accumulation equivalences (tests/engines.rs,
//! tests/train.rs), the same optimizer steps, at a quarter of the per-call overhead.
//!
//! Ignored by `cargo test` (8 minutes of a debug build on 2 cores): CI checks the same figure on
//! the shipped config itself, 4 ranks of the release trainer built with `--features cuda`
//! (tests/scripts/cuda-binary-on-cpu.sh). Run it with `cargo test -p ringmaster-trainer --test
//! quickstart -- --ignored`.

use std::path::PathBuf;

use ringmaster_model::CpuAutodiff;
use ringmaster_trainer::train::{self, Parallel};

#[test]
#[ignore = "8 minutes in a debug build; CI runs the 4-rank quickstart with the release trainer"]
fn quickstart_reaches_90_percent_exact_match() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("examples/quickstart.yaml");
    let mut cfg = ringmaster_trainer::load_config(&path).unwrap();
    let abs = |p: &Option<String>| Some(root.join(p.as_deref().unwrap()).display().to_string());
    cfg.model_name_or_path = abs(&cfg.model_name_or_path);
    cfg.dataset_dir = abs(&cfg.dataset_dir);
    if cfg.deepspeed.is_some() {
        cfg.deepspeed = abs(&cfg.deepspeed);
    }
    let out = tempfile::tempdir().unwrap();
    cfg.output_dir = Some(out.path().display().to_string());
    cfg.per_device_train_batch_size = Some(4 * cfg.per_device_train_batch_size.unwrap());
    cfg.save_steps = Some(0);
    let mut setup = train::resolve(cfg, &path, 1, 1).unwrap();
    assert_eq!(
        setup.plan.micro_batch as usize * setup.plan.grad_accum as usize,
        64
    );
    let summary =
        train::train::<CpuAutodiff>(&mut setup, &mut Parallel::single(), Default::default())
            .unwrap();
    let eval = summary.eval.expect("the quickstart evaluates at the end");
    assert_eq!(eval.total, 200);
    assert!(
        eval.accuracy >= 0.9,
        "exact match {}/{} after {} steps (final loss {:?})",
        eval.correct,
        eval.total,
        summary.steps,
        summary.losses.last()
    );
}
