//! The training loop end to end on a tiny Llama and the addition task, in process.
//!
//! Bounds: gradient accumulation and a bigger micro-batch take the same steps (fp32, 1e-5
//! relative: only the summation order differs); bf16 / fp16 compute with f32 master weights
//! track the fp32 loss within 5% over a few steps.

use std::path::{Path, PathBuf};

use ringmaster_data::synthetic::{AdditionConfig, generate_addition};
use ringmaster_data::template::Template;
use ringmaster_data::tokenizer::{BpeTrainingOptions, train_bpe};
use ringmaster_model::{CpuAutodiff, hf};
use ringmaster_trainer::train::{self, Parallel, Setup};

/// Writes model/ (config.json + a tokenizer trained on the data), data/ and returns the
/// directory.
fn fixture(dir: &Path) {
    let split = generate_addition(&AdditionConfig {
        seed: 3,
        min_digits: 1,
        max_digits: 2,
        train_size: 512,
        eval_size: 16,
    })
    .unwrap();
    let data = dir.join("data");
    split.write_jsonl(&data).unwrap();
    std::fs::write(
        data.join("dataset_info.json"),
        r#"{"addition_train": {"file_name": "train.jsonl", "formatting": "alpaca"},
            "addition_eval": {"file_name": "eval.jsonl"}}"#,
    )
    .unwrap();
    let texts: Vec<String> = split
        .train
        .iter()
        .flat_map(|r| [r.instruction.clone(), r.output.clone()])
        .collect();
    let opts = BpeTrainingOptions::for_template(&Template::empty(), 270);
    let tok = train_bpe(texts.into_iter(), &opts).unwrap();
    let model = dir.join("model");
    tok.save_dir(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        format!(
            r#"{{"model_type": "llama", "vocab_size": {}, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 64, "tie_word_embeddings": false}}"#,
            tok.vocab_size()
        ),
    )
    .unwrap();
}

fn config(dir: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "model_name_or_path: {m}\ntrain_from_scratch: true\nstage: sft\nfinetuning_type: full\n\
         dataset: addition_train\neval_dataset: addition_eval\ndataset_dir: {d}\ntemplate: empty\n\
         cutoff_len: 32\noutput_dir: {o}\nper_device_train_batch_size: 8\nlearning_rate: 3.0e-3\n\
         lr_scheduler_type: constant\nmax_steps: 6\nlogging_steps: 2\nmax_new_tokens: 4\nseed: 5\n{extra}",
        m = dir.join("model").display(),
        d = dir.join("data").display(),
        o = dir.join("out").display(),
    );
    let path = dir.join("train.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn setup(dir: &Path, extra: &str) -> Setup {
    let path = config(dir, extra);
    let cfg = ringmaster_trainer::load_config(&path).unwrap();
    train::resolve(cfg, &path, 1, 1).unwrap()
}

fn rel_close(a: &[f32], b: &[f32], tol: f32) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())))
}

#[test]
fn trains_logs_saves_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let mut s = setup(dir.path(), "max_steps: 20\nplot_loss: true\n");
    let before = s.base.clone();
    let summary =
        train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default()).unwrap();
    assert_eq!(summary.steps, 20);
    let first: f64 = summary.losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = summary.losses[16..].iter().sum::<f64>() / 4.0;
    assert!(last < first * 0.8, "loss went from {first} to {last}");
    // Log: one line per 2 steps, with the fields DESIGN.md names.
    let log = std::fs::read_to_string(dir.path().join("out/trainer_log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    for k in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(
            lines[0].get(k).is_some(),
            "log line lacks {k}: {}",
            lines[0]
        );
    }
    assert_eq!(lines[9]["step"], 20);
    assert!(dir.path().join("out/training_loss.png").is_file());
    // The saved model is the trained one, bit for bit.
    let saved = hf::load_dir(&dir.path().join("out")).unwrap();
    assert!(saved.params.bit_equal(&s.base));
    assert!(!saved.params.bit_equal(&before));
    let eval = summary.eval.expect("eval_dataset was set");
    assert_eq!(eval.total, 16);
}

#[test]
fn gradient_accumulation_equals_a_bigger_micro_batch() {
    let a_dir = tempfile::tempdir().unwrap();
    fixture(a_dir.path());
    let b_dir = tempfile::tempdir().unwrap();
    fixture(b_dir.path());
    let mut a = setup(
        a_dir.path(),
        "per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\nmax_grad_norm: 0.5\n",
    );
    let mut b = setup(
        b_dir.path(),
        "per_device_train_batch_size: 8\ngradient_accumulation_steps: 1\nmax_grad_norm: 0.5\n",
    );
    assert!(a.base.bit_equal(&b.base), "same seed, same init");
    let sa =
        train::train::<CpuAutodiff>(&mut a, &mut Parallel::single(), Default::default()).unwrap();
    let sb =
        train::train::<CpuAutodiff>(&mut b, &mut Parallel::single(), Default::default()).unwrap();
    for (x, y) in sa.losses.iter().zip(&sb.losses) {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "losses {:?} vs {:?}",
            sa.losses,
            sb.losses
        );
    }
    for ((spec, x), (_, y)) in a.base.iter().zip(b.base.iter()) {
        assert!(rel_close(x, y, 1e-5), "{} differs", spec.name);
    }
}

#[test]
fn bf16_and_fp16_compute_track_fp32() {
    let mut losses = Vec::new();
    for extra in ["", "bf16: true\n", "fp16: true\ndeepspeed: ds.json\n"] {
        let dir = tempfile::tempdir().unwrap();
        fixture(dir.path());
        // A low initial scale: no overflow, so every fp16 step is applied and comparable.
        std::fs::write(
            dir.path().join("ds.json"),
            r#"{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 0},
                "fp16": {"enabled": "auto", "initial_scale_power": 4, "hysteresis": 1}}"#,
        )
        .unwrap();
        let mut s = setup(dir.path(), extra);
        let summary =
            train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default())
                .unwrap();
        assert_eq!(summary.skipped_steps, 0, "{extra}");
        losses.push((extra, summary.losses));
    }
    let fp32 = &losses[0].1;
    for (name, l) in &losses[1..] {
        for (x, y) in l.iter().zip(fp32) {
            assert!(
                (x - y).abs() <= 0.05 * y,
                "{name}: losses {l:?} vs fp32 {fp32:?}"
            );
        }
    }
}

#[test]
fn fp16_overflow_skips_steps_and_lowers_the_scale() {
    // An initial scale of 2^24 with DeepSpeed's default hysteresis 2: the scaled gradient of
    // the logits (about 2^24 / number of targets) overflows f16 at first; those steps are
    // skipped and the scale comes down until steps apply (2^16 trains this model cleanly).
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    std::fs::write(
        dir.path().join("ds.json"),
        r#"{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 0},
            "fp16": {"enabled": true, "initial_scale_power": 24}}"#,
    )
    .unwrap();
    let mut s = setup(
        dir.path(),
        "fp16: true\ndeepspeed: ds.json\nmax_steps: 16\nlogging_steps: 1\n",
    );
    let before = s.base.clone();
    let summary =
        train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default()).unwrap();
    assert!(
        summary.skipped_steps >= 2,
        "skipped {}",
        summary.skipped_steps
    );
    assert!(summary.skipped_steps < 16, "no step was ever applied");
    assert!(!s.base.bit_equal(&before));
    let log = std::fs::read_to_string(dir.path().join("out/trainer_log.jsonl")).unwrap();
    let scales: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss_scale"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert!(
        scales[0] == 16777216.0,
        "first step: overflow absorbed by hysteresis, {scales:?}"
    );
    assert!(
        scales.windows(2).all(|w| w[1] <= w[0]),
        "scale only falls here: {scales:?}"
    );
    assert!(*scales.last().unwrap() < 16777216.0, "{scales:?}");
}

#[test]
fn lora_trains_only_the_adapters_and_saves_peft_files() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let mut s = setup(
        dir.path(),
        "finetuning_type: lora\nlora_rank: 4\nlora_alpha: 8\nlora_target: q_proj,v_proj\n",
    );
    let base = s.base.clone();
    let adapters = s.lora.as_ref().unwrap().1.clone();
    train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default()).unwrap();
    assert!(s.base.bit_equal(&base), "base weights are frozen");
    assert!(
        !s.lora.as_ref().unwrap().1.bit_equal(&adapters),
        "adapters were trained"
    );
    let out = dir.path().join("out");
    assert!(out.join("adapter_model.safetensors").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let (_, back) = ringmaster_model::lora::load_adapter(&out, &s.model).unwrap();
    assert!(back.bit_equal(&s.lora.as_ref().unwrap().1));
}

#[test]
fn bad_inputs_are_errors_naming_the_field_or_file() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let path = config(dir.path(), "template: nonesuch\n");
    // A duplicate key is a YAML error; write the template line only once.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("template: empty\n", "");
    std::fs::write(&path, text).unwrap();
    let cfg = ringmaster_trainer::load_config(&path).unwrap();
    let err = format!("{:#}", train::resolve(cfg, &path, 1, 1).unwrap_err());
    assert!(
        err.contains("template") && err.contains("nonesuch"),
        "{err}"
    );

    // A dataset row without its fields names the file and the row.
    let train_file = dir.path().join("data/train.jsonl");
    let mut rows = std::fs::read_to_string(&train_file).unwrap();
    rows.push_str("{\"instruction\": \"What is 1 + 1?\"}\n");
    std::fs::write(&train_file, rows).unwrap();
    let path = config(dir.path(), "");
    let cfg = ringmaster_trainer::load_config(&path).unwrap();
    let err = format!("{:#}", train::resolve(cfg, &path, 1, 1).unwrap_err());
    assert!(
        err.contains("train.jsonl") && err.contains("513") && err.contains("output"),
        "{err}"
    );

    // An unknown key is refused, listed.
    std::fs::write(&path, "model_name_or_path: x\nlerning_rate: 1\n").unwrap();
    let err = format!("{:#}", ringmaster_trainer::load_config(&path).unwrap_err());
    assert!(err.contains("lerning_rate"), "{err}");
}

#[test]
fn pretraining_on_plain_text_with_packing() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let corpus = dir.path().join("data/corpus.jsonl");
    let lines: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "{{\"text\": \"What is {} + {}? It is {}.\"}}",
                i % 17,
                i % 5,
                i % 17 + i % 5
            )
        })
        .collect();
    std::fs::write(&corpus, lines.join("\n") + "\n").unwrap();
    let path = config(dir.path(), "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("stage: sft", "stage: pt")
        .replace(
            "dataset: addition_train",
            &format!("dataset: {}", corpus.display()),
        )
        .replace("eval_dataset: addition_eval\n", "")
        .replace("max_steps: 6", "max_steps: 20\npacking: true");
    std::fs::write(&path, text).unwrap();
    let cfg = ringmaster_trainer::load_config(&path).unwrap();
    let mut s = train::resolve(cfg, &path, 1, 1).unwrap();
    // Packed as LLaMA-Factory packs pt: the texts concatenated and cut into blocks of
    // cutoff_len - 1 (31; `packing: true` decrements cutoff_len), each one sequence.
    assert!(s.samples.len() < 200, "{} rows", s.samples.len());
    assert!(
        s.samples
            .iter()
            .all(|r| r.len() == 31 && r.segments == [31])
    );
    let summary =
        train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default()).unwrap();
    let first: f64 = summary.losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = summary.losses[16..].iter().sum::<f64>() / 4.0;
    assert!(last < first * 0.8, "loss went from {first} to {last}");
}

/// LLaMA-Factory's `get_train_args` resolves an absent `packing` to `stage == "pt"` after
/// `DataArguments.__post_init__` (which decrements `cutoff_len` only for a given `packing:
/// true`): a pt recipe without `packing` packs blocks of the full `cutoff_len`; `packing:
/// false` truncates each text. `neat_packing: true` packs sft rows (blocks of `cutoff_len`,
/// rows truncated at `cutoff_len - 1`, each its own segment).
#[test]
fn packing_defaults_follow_llama_factory() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let corpus = dir.path().join("data/corpus.txt");
    let lines: Vec<String> = (0..50)
        .map(|i| format!("What is {i} + {i}? It is {}.", 2 * i))
        .collect();
    std::fs::write(&corpus, lines.join("\n") + "\n").unwrap();
    let pt = |extra: &str| {
        let path = config(dir.path(), extra);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("stage: sft", "stage: pt")
            .replace(
                "dataset: addition_train",
                &format!("dataset: {}", corpus.display()),
            )
            .replace("eval_dataset: addition_eval\n", "");
        std::fs::write(&path, text).unwrap();
        let cfg = ringmaster_trainer::load_config(&path).unwrap();
        train::resolve(cfg, &path, 1, 1).unwrap()
    };
    let s = pt("");
    assert!(
        s.samples
            .iter()
            .all(|r| r.len() == 32 && r.segments == [32])
    );
    let s = pt("packing: false\n");
    assert_eq!(s.samples.len(), 50);
    let s = setup(dir.path(), "neat_packing: true\n");
    assert!(s.samples.iter().all(|r| r.len() == 32));
    assert!(s.samples.iter().all(|r| r.num_real_tokens() <= 31));
    assert!(s.samples.iter().any(|r| r.segments.len() > 1));
}

/// LLaMA-Factory's `get_template_and_fix_tokenizer` without `template`: the `empty` template
/// when the tokenizer has no chat template; with one it parses the Jinja template, which
/// Ringmaster refuses, naming `template`.
#[test]
fn an_absent_template_is_empty_or_refused_when_the_tokenizer_has_a_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let path = config(dir.path(), "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("template: empty\n", "");
    std::fs::write(&path, text).unwrap();
    let cfg = ringmaster_trainer::load_config(&path).unwrap();
    let s = train::resolve(cfg.clone(), &path, 1, 1).unwrap();
    assert_eq!(s.template.name, "empty");
    let tc = dir.path().join("model/tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    v["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}".into();
    std::fs::write(&tc, v.to_string()).unwrap();
    let err = format!("{:#}", train::resolve(cfg, &path, 1, 1).unwrap_err());
    assert!(
        err.contains("`template` is required") && err.contains("chat template"),
        "{err}"
    );
}

/// `val_size` holds rows out; `eval_strategy: steps` computes their loss every `eval_steps`
/// through the engine, logs it and plots it; the last point equals a direct forward pass of the
/// trained model over the held-out rows (token mean, 1e-5 relative).
#[test]
fn val_size_holds_out_rows_and_logs_their_loss() {
    use ringmaster_data::batch::collate;
    use ringmaster_model::{CpuBackend, Inputs, Llama, model::cross_entropy};
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    // val_size and eval_dataset are refused together, as LLaMA-Factory refuses them.
    let path = config(
        dir.path(),
        "val_size: 0.25\neval_strategy: steps\neval_steps: 3\nplot_loss: true\n\
         per_device_eval_batch_size: 48\n",
    );
    let err = ringmaster_trainer::load_config(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("val_size") && err.contains("eval_dataset"),
        "{err}"
    );
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("eval_dataset: addition_eval\n", "")).unwrap();
    let cfg = ringmaster_trainer::load_config(&path).unwrap();
    let mut s = train::resolve(cfg, &path, 1, 1).unwrap();
    assert_eq!((s.samples.len(), s.held_out.len()), (384, 128));
    let summary =
        train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default()).unwrap();
    let steps: Vec<u64> = summary.eval_losses.iter().map(|p| p.0).collect();
    assert_eq!(steps, vec![3, 6]);
    let log = std::fs::read_to_string(dir.path().join("out/trainer_log.jsonl")).unwrap();
    let evals: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2);
    assert_eq!(evals[1]["step"], 6);
    assert!(dir.path().join("out/training_eval_loss.png").is_file());

    // The same loss computed directly from the trained weights.
    let device = Default::default();
    let model = Llama::<CpuBackend>::new(&s.model, &s.base, false, None, &device).unwrap();
    let pad = s.tokenizer.pad_id_or_eos();
    let batch = collate(s.held_out.iter(), pad, 1);
    let targets = batch.shifted_labels();
    let inp = Inputs::<CpuBackend>::new(
        &s.model,
        batch.batch_size,
        batch.seq_len,
        &batch.input_ids,
        &batch.position_ids,
        &batch.segment_ids,
        &device,
    )
    .unwrap();
    let n: usize = s.held_out.iter().map(|r| r.num_targets()).sum();
    let direct = cross_entropy(model.forward(&inp, None), &targets, n as f64)
        .into_data()
        .to_vec::<f32>()
        .unwrap()[0] as f64;
    let logged = summary.eval_losses[1].1;
    assert!(
        ((logged - direct) / direct).abs() < 1e-5,
        "logged {logged}, direct {direct}"
    );
}

/// `eval_dataset` with an eval strategy: its rows, preprocessed as training rows, give the
/// `eval_loss` during training (as in LLaMA-Factory), and the exact-match score at the end stays.
#[test]
fn eval_dataset_gives_the_eval_loss_under_an_eval_strategy() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let plain = setup(dir.path(), "");
    assert!(plain.held_out.is_empty());
    let mut s = setup(dir.path(), "eval_strategy: steps\neval_steps: 3\n");
    assert_eq!(
        s.samples.len(),
        plain.samples.len(),
        "training rows unchanged"
    );
    assert_eq!(s.held_out.len(), s.eval.len());
    assert!(!s.held_out.is_empty());
    // Each evaluation row is the eval set's conversation, encoded as a training row.
    assert!(s.held_out.iter().all(|r| r.num_targets() > 0));
    let summary =
        train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default()).unwrap();
    let steps: Vec<u64> = summary.eval_losses.iter().map(|p| p.0).collect();
    assert_eq!(steps, vec![3, 6]);
    assert!(
        summary
            .eval_losses
            .iter()
            .all(|p| p.1.is_finite() && p.1 > 0.0)
    );
    assert!(summary.eval.is_some(), "exact match still runs");
}

/// `save_only_model`: checkpoints hold the parameters only (no AdamW moments), the manifest
/// says so, and a resume from one continues from its weights: the first resumed step's loss
/// (computed before that step's update) equals the uninterrupted run's.
#[test]
fn save_only_model_checkpoints_resume_as_weights() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let mut s = setup(
        dir.path(),
        "max_steps: 4\nsave_steps: 2\nsave_only_model: true\n",
    );
    let first =
        train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default()).unwrap();
    let ckpt = dir.path().join("out/checkpoint-2");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["weights_only"], true);
    assert_eq!(manifest["adam_step"], 0);
    let shard =
        ringmaster_model::hf::read_safetensors(&ckpt.join("rank-00000.safetensors")).unwrap();
    assert!(
        shard.keys().all(|k| k.ends_with(".param")),
        "{:?}",
        shard.keys()
    );

    let mut s = setup(
        dir.path(),
        &format!(
            "max_steps: 4\nsave_steps: 2\nsave_only_model: true\nresume_from_checkpoint: {}\n",
            ckpt.display()
        ),
    );
    let resumed =
        train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default()).unwrap();
    assert_eq!(resumed.losses.len(), 2);
    assert_eq!(resumed.losses[0], first.losses[2]);
}

/// `predict_with_generate: false` skips the exact-match scoring of `eval_dataset`; under
/// `eval_strategy: steps` without `eval_steps` its loss is computed every `logging_steps`, as
/// the HF Trainer falls back; `save_steps` defaults to HF's 500.
#[test]
fn predict_with_generate_false_and_the_eval_steps_fallback() {
    let dir = tempfile::tempdir().unwrap();
    fixture(dir.path());
    let mut s = setup(
        dir.path(),
        "predict_with_generate: false\neval_strategy: steps\n",
    );
    assert_eq!(train::setup::save_steps(&s.cfg), 500);
    let summary =
        train::train::<CpuAutodiff>(&mut s, &mut Parallel::single(), Default::default()).unwrap();
    assert!(summary.eval.is_none());
    assert!(!dir.path().join("out/eval_results.json").exists());
    // logging_steps 2 (the fixture's), 6 steps: evaluations after steps 2, 4 and 6.
    let steps: Vec<u64> = summary.eval_losses.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![2, 4, 6]);
}
