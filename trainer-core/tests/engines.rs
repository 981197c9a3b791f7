//! The engines through the real ring: trainer processes on loopback, bootstrapped through a
//! directory store, under every plan (DDP, ZeRO-1/2/3, their offload twins, HYBRID_SHARD) and
//! world sizes 1, 2 and 4, take the same steps as one process with the same global batch
//! (gradient accumulation making up the difference): per-step loss and final parameters within
//! 1e-5 relative (fp32; only the summation order of gradients differs). Every rank's reported
//! model-state bytes follow the ZeRO formulas.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ringmaster_data::synthetic::{AdditionConfig, generate_addition};
use ringmaster_data::template::Template;
use ringmaster_data::tokenizer::{BpeTrainingOptions, train_bpe};
use ringmaster_model::{ParamStore, hf};

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
            r#"{{"model_type": "llama", "vocab_size": {}, "hidden_size": 30, "intermediate_size": 49,
                "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
                "max_position_embeddings": 64}}"#,
            tok.vocab_size()
        ),
    )
    .unwrap();
}

/// A plan under test: the name, the DeepSpeed or FSDP file it is written as (None: DDP).
struct PlanCase {
    name: &'static str,
    file: Option<(&'static str, &'static str)>,
    /// Model-state bytes per rank for Ψ trainable elements on N ranks (fp32 training).
    bytes: fn(f64, f64) -> f64,
}

fn ds(stage: u8, offload_opt: bool, offload_param: bool) -> String {
    let off = |on: bool| {
        if on {
            r#"{"device": "cpu", "pin_memory": true}"#
        } else {
            r#"{"device": "none"}"#
        }
    };
    // Small buckets, so that every unit's collectives go in several pieces.
    format!(
        r#"{{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_allow_untested_optimizer": true,
            "zero_optimization": {{"stage": {stage}, "reduce_bucket_size": 1000,
            "allgather_bucket_size": 700, "offload_optimizer": {o}, "offload_param": {p}}}}}"#,
        o = off(offload_opt),
        p = off(offload_param),
    )
}

/// [`ds`] without offload and with `overlap_comm` set.
fn ds_overlap(stage: u8, on: bool) -> String {
    ds(stage, false, false).replace(
        &format!(r#""stage": {stage},"#),
        &format!(r#""stage": {stage}, "overlap_comm": {on},"#),
    )
}

fn plans() -> Vec<PlanCase> {
    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }
    vec![
        PlanCase {
            name: "ddp",
            file: None,
            bytes: |p, _| 16.0 * p,
        },
        PlanCase {
            // DeepSpeed's default below stage 3: gradients reduced after the whole backward
            // (the "ddp" case, without a file, reduces unit by unit during backward).
            name: "ddp_blocking",
            file: Some(("deepspeed", leak(ds(0, false, false)))),
            bytes: |p, _| 16.0 * p,
        },
        PlanCase {
            // Reduced unit by unit during backward.
            name: "zero1",
            file: Some(("deepspeed", leak(ds_overlap(1, true)))),
            bytes: |p, n| 8.0 * p + 8.0 * p / n,
        },
        PlanCase {
            // DeepSpeed's default for stage 1: reduced after the whole backward.
            name: "zero1_blocking",
            file: Some(("deepspeed", leak(ds(1, false, false)))),
            bytes: |p, n| 8.0 * p + 8.0 * p / n,
        },
        PlanCase {
            name: "zero2",
            file: Some(("deepspeed", leak(ds(2, false, false)))),
            bytes: |p, n| 4.0 * p + 12.0 * p / n,
        },
        PlanCase {
            // Each unit reduce-scattered as its backward ends.
            name: "zero2_overlap",
            file: Some(("deepspeed", leak(ds_overlap(2, true)))),
            bytes: |p, n| 4.0 * p + 12.0 * p / n,
        },
        PlanCase {
            name: "zero2_offload",
            file: Some(("deepspeed", leak(ds(2, true, false)))),
            bytes: |p, n| 4.0 * p + 12.0 * p / n,
        },
        PlanCase {
            name: "zero3",
            file: Some(("deepspeed", leak(ds(3, false, false)))),
            bytes: |p, n| 16.0 * p / n,
        },
        PlanCase {
            // Every collective blocking the compute thread (the overlapped path's twin).
            name: "zero3_blocking",
            file: Some(("deepspeed", leak(ds_overlap(3, false)))),
            bytes: |p, n| 16.0 * p / n,
        },
        PlanCase {
            name: "zero3_offload",
            file: Some(("deepspeed", leak(ds(3, true, true)))),
            bytes: |p, n| 16.0 * p / n,
        },
        PlanCase {
            name: "zero3_offload_optimizer",
            file: Some(("deepspeed", leak(ds(3, true, false)))),
            bytes: |p, n| 16.0 * p / n,
        },
        PlanCase {
            name: "fsdp_no_shard",
            file: Some((
                "fsdp_config",
                "fsdp_sharding_strategy: NO_SHARD\nfsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n",
            )),
            bytes: |p, _| 16.0 * p,
        },
        PlanCase {
            name: "fsdp_shard_grad_op",
            file: Some((
                "fsdp_config",
                "fsdp_sharding_strategy: SHARD_GRAD_OP\nfsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n",
            )),
            bytes: |p, n| 4.0 * p + 12.0 * p / n,
        },
        PlanCase {
            name: "fsdp_full_shard",
            file: Some((
                "fsdp_config",
                "fsdp_sharding_strategy: 1\nfsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n\
                 fsdp_backward_prefetch: BACKWARD_POST\n",
            )),
            bytes: |p, n| 16.0 * p / n,
        },
    ]
}

#[allow(clippy::too_many_arguments)]
fn write_config(
    dir: &Path,
    out: &str,
    micro: u32,
    accum: u32,
    plan: Option<(&str, &str)>,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{out}.yaml"));
    let plan_line = match plan {
        None => String::new(),
        Some((key, text)) => {
            let file = dir.join(format!("{out}.plan"));
            std::fs::write(&file, text).unwrap();
            format!("{key}: {}\n", file.display())
        }
    };
    std::fs::write(
        &path,
        format!(
            "model_name_or_path: {m}\ntrain_from_scratch: true\nstage: sft\nfinetuning_type: full\n\
             dataset: addition_train\ndataset_dir: {d}\ntemplate: empty\ncutoff_len: 32\n\
             output_dir: {o}\nper_device_train_batch_size: {micro}\ngradient_accumulation_steps: {accum}\n\
             learning_rate: 2.0e-3\nmax_grad_norm: 1.0\nweight_decay: 0.1\nmax_steps: 5\nlogging_steps: 1\nseed: 9\n\
             {plan_line}{extra}",
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

fn run(config: &Path, world: usize, local: usize, store: &Path) {
    run_env(config, world, local, store, &[]);
}

fn run_env(config: &Path, world: usize, local: usize, store: &Path, env: &[(&str, &str)]) {
    let mut procs = Procs(Vec::new());
    for rank in 0..world {
        let child = Command::new(TRAINER)
            .arg(config)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", local.to_string())
            .env("RINGMASTER_STORE_DIR", store)
            .env("RINGMASTER_JOB_ID", "ddp-test")
            .env_remove("RINGMASTER_COORDINATOR")
            .envs(env.iter().copied())
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
    log_field(dir, "loss")
}

/// One field of every line of the run's trainer_log.jsonl.
fn log_field(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("trainer_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()[key]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn assert_close(name: &str, dir: &Path, ref_losses: &[f64], reference: &ParamStore, tol: f64) {
    let got = hf::load_dir(&dir.join(name)).unwrap().params;
    let l = losses(&dir.join(name));
    assert_eq!(l.len(), ref_losses.len(), "{name}: steps");
    for (a, b) in l.iter().zip(ref_losses) {
        assert!(
            (a - b).abs() <= tol * b.abs(),
            "{name}: losses {l:?} vs {ref_losses:?}"
        );
    }
    assert_params_close(name, &got, reference, tol);
}

/// Every tensor within `tol` relative in norm (‖p − q‖ ≤ tol · ‖q‖) and every element within
/// `tol` · (1 + |q|).
fn assert_params_close(name: &str, got: &ParamStore, reference: &ParamStore, tol: f64) {
    for ((spec, x), (_, y)) in got.iter().zip(reference.iter()) {
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (p, q) in x.iter().zip(y) {
            let (p, q) = (*p as f64, *q as f64);
            assert!(
                (p - q).abs() <= tol * (1.0 + p.abs().max(q.abs())),
                "{name}: {} differs: {p} vs {q}",
                spec.name
            );
            diff += (p - q) * (p - q);
            norm += q * q;
        }
        let (diff, norm) = (diff.sqrt(), norm.sqrt());
        assert!(
            diff <= tol * norm,
            "{name}: {}: |p - q| = {diff:e} is more than {tol:e} of |q| = {norm:e}",
            spec.name
        );
    }
}

/// Model-state bytes of every rank against the ZeRO formula, within 5% plus the padding of the
/// flat units (at most N − 1 elements per unit, 16 bytes each).
fn assert_memory(name: &str, dir: &Path, world: usize, group: usize, formula: fn(f64, f64) -> f64) {
    for rank in 0..world {
        let path = dir.join(name).join(format!("memory-rank{rank}.json"));
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let psi = m["trainable_elements"].as_f64().unwrap();
        let pad = m["padding_elements"].as_f64().unwrap();
        let held = ["param_bytes", "grad_bytes", "optimizer_bytes"]
            .iter()
            .map(|k| m[k].as_f64().unwrap())
            .sum::<f64>();
        let want = formula(psi, group as f64);
        assert!(
            (held - want).abs() <= 0.05 * want + 16.0 * pad,
            "{name} rank {rank}: holds {held} bytes, formula {want} (Ψ {psi}, N {group}, padding {pad}): {m}"
        );
        assert!(
            m["peak_rss_bytes"].as_u64().unwrap() > 0,
            "{name}: peak RSS"
        );
    }
}

#[test]
fn every_plan_at_one_two_and_four_ranks_equals_one_process_with_accumulation() {
    every_plan_equals_one_process("flex");
}

/// The same on burn's ndarray backend, which has none of the fused kernels (the model runs the
/// composite defaults): an assumption of the fused CPU backend in the engine fails here.
#[test]
fn every_plan_equals_one_process_on_the_ndarray_backend_too() {
    every_plan_equals_one_process("ndarray");
}

/// Every plan at 1, 2 and 4 ranks (and the hybrid plans) on the CPU backend `backend`
/// (`RINGMASTER_CPU_BACKEND`) against one process on the same backend.
fn every_plan_equals_one_process(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let on = [("RINGMASTER_CPU_BACKEND", backend)];
    // Hidden 30 and intermediate 49: the units' sizes are not multiples of 4, so the flat units
    // of a 4-rank shard group carry padding.
    fixture(dir);
    // Global batch 8 in every run.
    let single = write_config(dir, "single", 2, 4, None, "");
    run_env(&single, 1, 1, &dir.join("store-single"), &on);
    let reference = hf::load_dir(&dir.join("single")).unwrap().params;
    let ref_losses = losses(&dir.join("single"));
    assert_eq!(ref_losses.len(), 5);
    let m = std::fs::read_to_string(dir.join("single/memory-rank0.json")).unwrap();
    assert!(m.contains(&format!("\"backend\": \"{backend}\"")), "{m}");
    // max_grad_norm 1.0 clips these steps: the global norm over all shards must be right for
    // the parameters to match.
    let ref_norms = log_field(&dir.join("single"), "grad_norm");
    assert!(
        ref_norms.iter().all(|n| *n > 1.0),
        "clipping exercised: {ref_norms:?}"
    );
    // The ring over TCP on loopback, as between machines (not Unix sockets).
    let tcp = [("RINGMASTER_TRANSPORT", "tcp"), on[0]];
    for case in plans() {
        for (world, micro, accum) in [(1usize, 2u32, 4u32), (2, 2, 2), (4, 2, 1)] {
            let name = format!("{}-{world}", case.name);
            let cfg = write_config(dir, &name, micro, accum, case.file, "");
            run_env(&cfg, world, world, &dir.join(format!("store-{name}")), &tcp);
            assert_close(&name, dir, &ref_losses, &reference, 1e-5);
            let norms = log_field(&dir.join(&name), "grad_norm");
            for (a, b) in norms.iter().zip(&ref_norms) {
                assert!(
                    (a - b).abs() <= 1e-5 * b,
                    "{name}: grad norms {norms:?} vs {ref_norms:?}"
                );
            }
            assert_memory(&name, dir, world, world, case.bytes);
            if world == 4 && case.name == "zero3" {
                let m = std::fs::read_to_string(dir.join(&name).join("memory-rank3.json")).unwrap();
                assert!(
                    !m.contains("\"padding_elements\": 0,"),
                    "padding exercised: {m}"
                );
            }
        }
    }
    // HYBRID_SHARD on 2 nodes x 2 ranks: ZeRO-3 inside a node, replicated across nodes.
    let hybrid = write_config(
        dir,
        "hybrid",
        2,
        1,
        Some((
            "fsdp_config",
            "fsdp_sharding_strategy: HYBRID_SHARD\nfsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n",
        )),
        "",
    );
    run_env(&hybrid, 4, 2, &dir.join("store-hybrid"), &tcp);
    assert_close("hybrid", dir, &ref_losses, &reference, 1e-5);
    assert_memory("hybrid", dir, 4, 2, |p, n| 16.0 * p / n);
    // _HYBRID_SHARD_ZERO2: ZeRO-2 inside a node, replicated across nodes.
    let hybrid2 = write_config(
        dir,
        "hybrid_zero2",
        2,
        1,
        Some((
            "fsdp_config",
            "fsdp_sharding_strategy: _HYBRID_SHARD_ZERO2\n\
             fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n",
        )),
        "",
    );
    run_env(&hybrid2, 4, 2, &dir.join("store-hybrid_zero2"), &tcp);
    assert_close("hybrid_zero2", dir, &ref_losses, &reference, 1e-5);
    assert_memory("hybrid_zero2", dir, 4, 2, |p, n| 4.0 * p + 12.0 * p / n);
    // HYBRID_SHARD with one rank per node: replicated only (DDP).
    let hybrid1 = write_config(
        dir,
        "hybrid_1",
        2,
        2,
        Some((
            "fsdp_config",
            "fsdp_sharding_strategy: HYBRID_SHARD\nfsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n",
        )),
        "",
    );
    run_env(&hybrid1, 2, 1, &dir.join("store-hybrid_1"), &tcp);
    assert_close("hybrid_1", dir, &ref_losses, &reference, 1e-5);
    assert_memory("hybrid_1", dir, 2, 1, |p, _| 16.0 * p);
    // Offload plans equal their twins (on a CPU host the same arithmetic: bit for bit).
    for (offload, twin) in [
        ("zero2_offload", "zero2"),
        ("zero3_offload", "zero3"),
        ("zero3_offload_optimizer", "zero3"),
    ] {
        for world in [1, 2, 4] {
            let a = hf::load_dir(&dir.join(format!("{offload}-{world}")))
                .unwrap()
                .params;
            let b = hf::load_dir(&dir.join(format!("{twin}-{world}")))
                .unwrap()
                .params;
            assert!(a.bit_equal(&b), "{offload} vs {twin} at {world} ranks");
        }
    }
}

/// A Qwen3 model (q/k norms, biases on q/k/v/o with `attention_bias`, head_dim 16 ≠ 30 / 3,
/// tied embeddings): the new per-block tensors go through the flat units of each kind of plan —
/// DDP (whole model), ZeRO-2 (per-unit graphs), ZeRO-3 on 4 ranks (unit by unit, padded units),
/// FSDP full shard — and LoRA, each against one process. One case, kept lean for CI.
#[test]
fn a_qwen3_model_trains_the_same_under_every_kind_of_plan() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    fixture(dir);
    let llama: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model/config.json")).unwrap())
            .unwrap();
    std::fs::write(
        dir.join("model/config.json"),
        format!(
            r#"{{"model_type": "qwen3", "vocab_size": {}, "hidden_size": 30, "intermediate_size": 49,
                "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
                "head_dim": 16, "attention_bias": true, "tie_word_embeddings": true,
                "max_position_embeddings": 64}}"#,
            llama["vocab_size"]
        ),
    )
    .unwrap();
    let single = write_config(dir, "single", 2, 4, None, "");
    run(&single, 1, 1, &dir.join("store-single"));
    let reference = hf::load_dir(&dir.join("single")).unwrap();
    assert_eq!(reference.config.arch, ringmaster_model::Arch::Qwen3);
    let reference = reference.params;
    assert!(
        reference
            .index_of("model.layers.1.self_attn.k_norm.weight")
            .is_some()
    );
    // Trained: the zero-initialised biases moved.
    let bias = reference
        .get("model.layers.0.self_attn.o_proj.bias")
        .unwrap();
    assert!(bias.iter().any(|b| *b != 0.0));
    let ref_losses = losses(&dir.join("single"));
    for case in plans() {
        let world = match case.name {
            "ddp" | "zero2" => 2usize,
            "zero3" | "fsdp_full_shard" => 4,
            _ => continue,
        };
        let name = format!("{}-{world}", case.name);
        let accum = 8 / (2 * world as u32);
        let cfg = write_config(dir, &name, 2, accum, case.file, "");
        run(&cfg, world, world, &dir.join(format!("store-{name}")));
        assert_close(&name, dir, &ref_losses, &reference, 1e-5);
    }
    // LoRA on every linear, one process against ZeRO-3 on 2 ranks.
    let lora = "finetuning_type: lora\nlora_target: all\nlora_rank: 4\n";
    let one = write_config(dir, "lora-1", 2, 4, None, "");
    let text = std::fs::read_to_string(&one)
        .unwrap()
        .replace("finetuning_type: full\n", lora)
        .replace("train_from_scratch: true\n", "");
    // LoRA needs base weights: the trained reference.
    let text = text.replace(
        &dir.join("model").display().to_string(),
        &dir.join("single").display().to_string(),
    );
    std::fs::write(&one, &text).unwrap();
    run(&one, 1, 1, &dir.join("store-lora-1"));
    let zero3 = plans().into_iter().find(|c| c.name == "zero3").unwrap();
    let two = write_config(dir, "lora-2", 2, 2, zero3.file, "");
    let text2 = std::fs::read_to_string(&two)
        .unwrap()
        .replace("finetuning_type: full\n", lora)
        .replace("train_from_scratch: true\n", "")
        .replace(
            &dir.join("model").display().to_string(),
            &dir.join("single").display().to_string(),
        );
    std::fs::write(&two, &text2).unwrap();
    run(&two, 2, 2, &dir.join("store-lora-2"));
    let (a, b) = (losses(&dir.join("lora-1")), losses(&dir.join("lora-2")));
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "lora: {a:?} vs {b:?}");
    }
    let adapter = dir.join("lora-2/adapter_model.safetensors");
    assert!(adapter.exists(), "{}", adapter.display());
}

/// `fsdp_cpu_ram_efficient_loading`: ranks other than 0 do not read the weights (they start
/// from zeros) and get rank 0's by the start-up broadcast, so 2 ranks from a saved model equal
/// one process from it.
#[test]
fn cpu_ram_efficient_loading_starts_every_rank_from_rank_0s_weights() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    fixture(dir);
    // A saved model to start from: 5 steps of one process.
    let init = write_config(dir, "init", 2, 4, None, "");
    run(&init, 1, 1, &dir.join("store-init"));
    let from_saved = |name: &str, micro: u32, accum: u32, plan: Option<(&str, &str)>| {
        let path = write_config(dir, name, micro, accum, plan, "");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text
            .replace(
                &format!("model_name_or_path: {}", dir.join("model").display()),
                &format!("model_name_or_path: {}", dir.join("init").display()),
            )
            .replace("train_from_scratch: true", "train_from_scratch: false");
        std::fs::write(&path, text).unwrap();
        path
    };
    let single = from_saved("saved-single", 2, 4, None);
    run(&single, 1, 1, &dir.join("store-saved-single"));
    let reference = hf::load_dir(&dir.join("saved-single")).unwrap().params;
    let ref_losses = losses(&dir.join("saved-single"));
    let efficient = from_saved(
        "saved-efficient",
        2,
        2,
        Some((
            "fsdp_config",
            "fsdp_sharding_strategy: FULL_SHARD\nfsdp_sync_module_states: true\n\
             fsdp_cpu_ram_efficient_loading: true\n",
        )),
    );
    run(&efficient, 2, 2, &dir.join("store-saved-efficient"));
    assert_close("saved-efficient", dir, &ref_losses, &reference, 1e-5);
}

/// Daemonless: ranks started with the torchrun environment alone (RANK, WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT; no coordinator, no store directory) meet at a store rank 0 serves
/// and train as the same plan does with a shared directory: same losses and weights.
#[test]
fn ranks_meet_at_master_addr_and_train_as_with_a_shared_store() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    fixture(dir);
    let zero2 = Some(("deepspeed", leak_ds(2)));
    let with_dir = write_config(dir, "z2-dir", 2, 2, zero2, "");
    run(&with_dir, 2, 2, &dir.join("store-z2"));
    let reference = hf::load_dir(&dir.join("z2-dir")).unwrap().params;
    let ref_losses = losses(&dir.join("z2-dir"));
    let with_master = write_config(dir, "z2-master", 2, 2, zero2, "");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    run_env(
        &with_master,
        2,
        2,
        &dir.join("unused"),
        &[
            ("RINGMASTER_STORE_DIR", ""),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port),
        ],
    );
    assert_close("z2-master", dir, &ref_losses, &reference, 1e-6);
}

fn leak_ds(stage: u8) -> &'static str {
    Box::leak(ds(stage, false, false).into_boxed_str())
}

/// bf16 compute: ZeRO-3's unit-by-unit recompute on 2 ranks against the whole-graph bf16 run
/// of one process, and both against fp32. bf16 rounds activations and weights to 8 bits of
/// mantissa, so the bound is looser: the same run within 1e-3 relative per step (only
/// summation order differs), and within 5% of fp32.
#[test]
fn bf16_zero3_on_two_ranks_stays_close_to_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    fixture(dir);
    let single = write_config(dir, "single", 2, 2, None, "bf16: true\n");
    run(&single, 1, 1, &dir.join("store-single"));
    let reference = hf::load_dir(&dir.join("single")).unwrap().params;
    let ref_losses = losses(&dir.join("single"));
    let z3 = write_config(
        dir,
        "z3",
        2,
        1,
        Some(("deepspeed", Box::leak(ds(3, false, false).into_boxed_str()))),
        "bf16: true\n",
    );
    run(&z3, 2, 2, &dir.join("store-z3"));
    assert_close("z3", dir, &ref_losses, &reference, 1e-3);
    let fp32 = write_config(dir, "fp32", 2, 2, None, "");
    run(&fp32, 1, 1, &dir.join("store-fp32"));
    for (a, b) in losses(&dir.join("z3"))
        .iter()
        .zip(losses(&dir.join("fp32")))
    {
        assert!((a - b).abs() <= 0.05 * b, "bf16 {a} vs fp32 {b}");
    }
}

/// Runs `config` on `world` ranks expecting every rank to fail; returns their stderr.
fn run_failing(config: &Path, world: usize, store: &Path) -> String {
    let mut procs = Procs(Vec::new());
    for rank in 0..world {
        procs.0.push(
            Command::new(TRAINER)
                .arg(config)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("RINGMASTER_STORE_DIR", store)
                .env("RINGMASTER_JOB_ID", "ckpt-test")
                .env_remove("RINGMASTER_COORDINATOR")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let mut all = String::new();
    for child in &mut procs.0 {
        let out = child.stderr.take().unwrap();
        let mut err = String::new();
        use std::io::Read;
        std::io::BufReader::new(out)
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "expected a failure: {err}");
        all += &err;
    }
    all
}

fn with_steps(path: &Path, text: &str) {
    let s = std::fs::read_to_string(path)
        .unwrap()
        .replace("max_steps: 5\n", text);
    std::fs::write(path, s).unwrap();
}

/// A checkpoint saved at step 5 by 4 ranks under ZeRO-3 resumes on 1 process (DDP), 2 ranks
/// (ZeRO-1), 3 ranks (DDP) and 4 ranks (ZeRO-3): each continues as the uninterrupted run does
/// (steps 6–10 and the final parameters within 1e-5; fp32, only summation order differs). A
/// shard with a flipped byte and a checkpoint without its commit marker are refused.
#[test]
fn checkpoints_resume_on_any_world_size_and_plan_and_refuse_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    fixture(dir);
    let z3 = ds(3, false, false);
    // Global batch 12 in every run.
    let a = write_config(dir, "a", 3, 1, Some(("deepspeed", &z3)), "");
    with_steps(&a, "max_steps: 10\nsave_steps: 5\n");
    run(&a, 4, 4, &dir.join("store-a"));
    let ckpt = dir.join("a/checkpoint-5");
    for f in [
        "manifest.json",
        "COMMITTED",
        "rank-00003.safetensors",
        "config.json",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} in {}", ckpt.display());
    }
    let full = losses(&dir.join("a"));
    assert_eq!(full.len(), 10);
    // `trainer export` streams the 4 ZeRO-3 shards into one Hugging Face file: the same
    // tensors, bit for bit, as the directory rank 0 gathered at that step.
    let exported = dir.join("exported");
    let out = Command::new(TRAINER)
        .args([
            "export",
            ckpt.to_str().unwrap(),
            "--out",
            exported.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = hf::load_dir(&exported).unwrap();
    let want = hf::load_dir(&ckpt).unwrap();
    assert!(
        got.params.bit_equal(&want.params),
        "export differs from the gathered save"
    );
    assert!(exported.join("tokenizer.json").is_file());
    assert!(
        !exported.join("manifest.json").exists()
            && !exported.join("rank-00000.safetensors").exists()
    );
    let out = Command::new(TRAINER)
        .args([
            "export",
            dir.join("a").to_str().unwrap(),
            "--out",
            exported.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "not a committed checkpoint is a usage error"
    );
    let reference = hf::load_dir(&dir.join("a")).unwrap().params;
    let z1 = ds(1, false, false);
    let resume = format!(
        "max_steps: 10\nresume_from_checkpoint: {}\n",
        ckpt.display()
    );
    for (name, world, micro, accum, plan) in [
        ("r1", 1usize, 3u32, 4u32, None),
        ("r2", 2, 3, 2, Some(("deepspeed", z1.as_str()))),
        ("r3", 3, 2, 2, None),
        ("r4", 4, 3, 1, Some(("deepspeed", z3.as_str()))),
    ] {
        let cfg = write_config(dir, name, micro, accum, plan, "");
        with_steps(&cfg, &resume);
        run(&cfg, world, world, &dir.join(format!("store-{name}")));
        assert_close(name, dir, &full[5..], &reference, 1e-5);
    }
    // A flipped byte in one shard: refused, naming the shard.
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for e in std::fs::read_dir(&ckpt).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), bad.join(e.file_name())).unwrap();
    }
    let shard = bad.join("rank-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let cfg = write_config(dir, "bad-run", 3, 4, None, "");
    with_steps(
        &cfg,
        &format!("max_steps: 10\nresume_from_checkpoint: {}\n", bad.display()),
    );
    let err = run_failing(&cfg, 1, &dir.join("store-bad"));
    assert!(err.contains("rank-00001.safetensors is corrupt"), "{err}");
    // Without the commit marker (a rank never finished): refused.
    std::fs::remove_file(bad.join("COMMITTED")).unwrap();
    let err = run_failing(&cfg, 1, &dir.join("store-bad2"));
    assert!(err.contains("not committed"), "{err}");
}

/// `save_total_limit` keeps the newest committed checkpoints; a restarted generation
/// (`RINGMASTER_GENERATION` > 0) resumes from the newest committed one by itself, and when its
/// shard is corrupt falls back to the one before, saying so — and still continues as the
/// uninterrupted run did.
#[test]
fn save_total_limit_and_restarted_generation_fall_back_past_a_corrupt_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    fixture(dir);
    let z2 = ds(2, false, false);
    let cfg = write_config(dir, "run", 2, 2, Some(("deepspeed", &z2)), "");
    with_steps(&cfg, "max_steps: 10\nsave_steps: 2\nsave_total_limit: 2\n");
    run(&cfg, 2, 2, &dir.join("store-1"));
    let out = dir.join("run");
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    left.sort();
    assert_eq!(left, ["checkpoint-6", "checkpoint-8"]);
    let full = losses(&out);
    let reference = hf::load_dir(&out).unwrap().params;
    // Corrupt the newest; generation 1 of the same job resumes from checkpoint-6.
    let shard = out.join("checkpoint-8/rank-00000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    std::fs::write(&shard, bytes).unwrap();
    std::fs::rename(out.join("trainer_log.jsonl"), dir.join("first-log.jsonl")).unwrap();
    let mut procs = Procs(Vec::new());
    let store = dir.join("store-2");
    for rank in 0..2 {
        procs.0.push(
            Command::new(TRAINER)
                .arg(&cfg)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_WORLD_SIZE", "2")
                .env("RINGMASTER_STORE_DIR", &store)
                .env("RINGMASTER_JOB_ID", "gen-test")
                .env("RINGMASTER_GENERATION", "1")
                .env_remove("RINGMASTER_COORDINATOR")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let mut err0 = String::new();
    for (rank, child) in procs.0.iter_mut().enumerate() {
        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(child.wait().unwrap().success(), "rank {rank}: {err}");
        if rank == 0 {
            err0 = err;
        }
    }
    assert!(
        err0.contains("checkpoint-8/rank-00000.safetensors is corrupt")
            && err0.contains("trying the previous committed checkpoint")
            && err0.contains("resumed from")
            && err0.contains("at step 6"),
        "{err0}"
    );
    assert_close("run", dir, &full[6..], &reference, 1e-5);
}

/// SIGUSR1 to one rank of two: both commit a checkpoint at the same step and train on. SIGTERM
/// to the other: both finish the step, commit a checkpoint and exit with 143;
/// `resume_from_checkpoint: true` continues from the newest.
#[test]
fn sigterm_checkpoints_every_rank_then_exits_and_resume_continues() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    fixture(dir);
    let cfg = write_config(dir, "run", 2, 2, None, "");
    // No periodic checkpoint (save_steps defaults to 500): only the SIGTERM one is counted.
    with_steps(&cfg, "max_steps: 100000\nsave_steps: 0\n");
    let store = dir.join("store-1");
    let mut procs = Procs(Vec::new());
    for rank in 0..2 {
        procs.0.push(
            Command::new(TRAINER)
                .arg(&cfg)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_WORLD_SIZE", "2")
                .env("RINGMASTER_STORE_DIR", &store)
                .env("RINGMASTER_JOB_ID", "term-test")
                .env_remove("RINGMASTER_COORDINATOR")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    // Rank 0 prints a line per step: after the third, SIGUSR1 to rank 0 asks for a checkpoint
    // (training goes on); once it is committed, SIGTERM to rank 1 only.
    let out = procs.0[0].stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    let mut seen = 0;
    let run_dir = dir.join("run");
    let committed = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("COMMITTED").is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    while committed(&run_dir).is_empty() {
        let line = lines.next().expect("rank 0 ended early").unwrap();
        if line.starts_with("step ") {
            seen += 1;
            if seen == 3 {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(procs.0[0].id() as i32),
                    nix::sys::signal::SIGUSR1,
                )
                .unwrap();
            }
            assert!(seen < 1000, "no checkpoint after SIGUSR1");
        }
    }
    let first = committed(&run_dir);
    for _ in 0..2 {
        lines
            .next()
            .expect("training goes on after the checkpoint")
            .unwrap();
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(procs.0[1].id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    std::thread::spawn(move || for _ in lines {});
    for (rank, child) in procs.0.iter_mut().enumerate() {
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(143), "rank {rank}: {status}");
    }
    let out = dir.join("run");
    let all = committed(&out);
    assert_eq!(
        all.len(),
        2,
        "the SIGUSR1 and the SIGTERM checkpoints: {all:?}"
    );
    let step_of = |n: &str| n["checkpoint-".len()..].parse::<usize>().unwrap();
    assert!(step_of(&first[0]) >= 3, "{first:?}");
    let step = all.iter().map(|n| step_of(n)).max().unwrap();
    assert!(step > step_of(&first[0]), "{all:?}");
    assert_eq!(losses(&out).len(), step);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "max_steps: 100000\n",
        &format!("max_steps: {}\nresume_from_checkpoint: true\n", step + 2),
    );
    std::fs::write(&cfg, text).unwrap();
    run(&cfg, 2, 2, &dir.join("store-2"));
    assert_eq!(losses(&out).len(), step + 2, "the log continues");
}

/// A short last global batch (11 samples, global batch 8: the second step holds 3) leaves rank
/// 1 with an empty micro-batch while rank 0 has two: the sharded plans' per-micro-batch
/// collectives must still match (the empty micro-batch takes part with zero gradients), and
/// the run must equal one process.
#[test]
fn an_empty_micro_batch_on_one_rank_still_takes_part_in_the_collectives() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    fixture(dir);
    let extra = "max_samples: 11\n";
    let single = write_config(dir, "single", 2, 4, None, extra);
    run(&single, 1, 1, &dir.join("store-single"));
    let reference = hf::load_dir(&dir.join("single")).unwrap().params;
    let ref_losses = losses(&dir.join("single"));
    assert_eq!(ref_losses.len(), 5);
    for case in plans().into_iter().filter(|c| {
        [
            "ddp",
            "ddp_blocking",
            "zero1",
            "zero2",
            "zero2_overlap",
            "zero3",
            "zero3_blocking",
        ]
        .contains(&c.name)
    }) {
        let name = format!("{}-short", case.name);
        let cfg = write_config(dir, &name, 2, 2, case.file, extra);
        run(&cfg, 2, 2, &dir.join(format!("store-{name}")));
        assert_close(&name, dir, &ref_losses, &reference, 1e-5);
    }
    // A tied head.
    let config = dir.join("model/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let tied =
        text.trim_end().trim_end_matches('}').to_owned() + r#", "tie_word_embeddings": true}"#;
    std::fs::write(&config, tied).unwrap();
    let single = write_config(dir, "single-tied", 2, 4, None, extra);
    run(&single, 1, 1, &dir.join("store-single-tied"));
    let reference = hf::load_dir(&dir.join("single-tied")).unwrap().params;
    let ref_losses = losses(&dir.join("single-tied"));
    // ZeRO-3 gathers the embeddings a second time for the head; the unit-by-unit reduction
    // of DDP and ZeRO-2 gives the head its own leaf of the table and adds its gradient to the
    // embeddings' unit.
    for case in plans()
        .into_iter()
        .filter(|c| ["ddp", "zero2_overlap", "zero3"].contains(&c.name))
    {
        let name = format!("{}-short-tied", case.name);
        let cfg = write_config(dir, &name, 2, 2, case.file, extra);
        run(&cfg, 2, 2, &dir.join(format!("store-{name}")));
        assert_close(&name, dir, &ref_losses, &reference, 1e-5);
    }
}

/// Checkpoints do not depend on the backend that wrote them: one saved at step 5 by 2 ranks
/// under ZeRO-2 on the fused CPU backend resumes in one process on ndarray, and one saved by 2
/// ranks under ZeRO-3 on ndarray resumes on 4 ranks (DDP) on the fused backend; each continues
/// the saving run's losses (steps 6–10) and reaches its final parameters within 1e-5. (Each
/// saving run first equals one process on its own backend; the two backends' kernels differ in
/// summation order, so after 10 steps they drift apart by about 1e-5 of the parameters.)
#[test]
fn a_checkpoint_taken_on_one_backend_resumes_on_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    fixture(dir);
    let flex = [("RINGMASTER_CPU_BACKEND", "flex")];
    let ndarray = [("RINGMASTER_CPU_BACKEND", "ndarray")];
    let (z2, z3) = (ds(2, false, false), ds(3, false, false));
    // Global batch 8 in every run.
    for (saver, saver_env, plan, resumer, resumer_env, world, micro, accum) in [
        (
            "flex-z2",
            flex,
            z2.as_str(),
            "on-ndarray",
            ndarray,
            1usize,
            2u32,
            4u32,
        ),
        ("ndarray-z3", ndarray, z3.as_str(), "on-flex", flex, 4, 2, 1),
    ] {
        let single = format!("{saver}-single");
        let cfg = write_config(dir, &single, 2, 4, None, "");
        with_steps(&cfg, "max_steps: 10\n");
        run_env(&cfg, 1, 1, &dir.join(format!("store-{single}")), &saver_env);
        let cfg = write_config(dir, saver, 2, 2, Some(("deepspeed", plan)), "");
        with_steps(&cfg, "max_steps: 10\nsave_steps: 5\n");
        run_env(&cfg, 2, 2, &dir.join(format!("store-{saver}")), &saver_env);
        let single_losses = losses(&dir.join(&single));
        let single_params = hf::load_dir(&dir.join(&single)).unwrap().params;
        assert_close(saver, dir, &single_losses, &single_params, 1e-5);
        let full = losses(&dir.join(saver));
        assert_eq!(full.len(), 10);
        let reference = hf::load_dir(&dir.join(saver)).unwrap().params;
        let ckpt = dir.join(saver).join("checkpoint-5");
        assert!(ckpt.join("COMMITTED").is_file(), "{}", ckpt.display());
        let cfg = write_config(dir, resumer, micro, accum, None, "");
        with_steps(
            &cfg,
            &format!(
                "max_steps: 10\nresume_from_checkpoint: {}\n",
                ckpt.display()
            ),
        );
        run_env(
            &cfg,
            world,
            world,
            &dir.join(format!("store-{resumer}")),
            &resumer_env,
        );
        assert_close(resumer, dir, &full[5..], &reference, 1e-5);
        let m = std::fs::read_to_string(dir.join(resumer).join("memory-rank0.json")).unwrap();
        let want = if resumer == "on-flex" {
            "flex"
        } else {
            "ndarray"
        };
        assert!(m.contains(&format!("\"backend\": \"{want}\"")), "{m}");
    }
}
