//! The seed configs in `examples/` parse as their users wrote them and map to the plans they
//! mean; contradicting explicit values are refused naming both values.

use std::path::PathBuf;

use ringmaster_config::plan::{Plan, PlanSource, Precision};
use ringmaster_config::{
    ConfigError, DeepSpeedConfig, FsdpConfig, ShardingStrategy, TrainConfig, plan_from,
    plan_from_files, warning_lines,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(root().join(path)).map_err(|e| format!("{path}: {e}"))
}

fn train(name: &str) -> TrainConfig {
    let text = read(&format!("examples/{name}")).unwrap();
    TrainConfig::from_yaml(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn plan_of(name: &str, world: usize, gpus_per_node: usize) -> (Plan, Vec<String>) {
    let (plan, warnings) = plan_from_files(&train(name), read, world, gpus_per_node, Some(4096))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (plan, warnings.iter().map(|w| w.key.clone()).collect())
}

#[test]
fn each_seed_training_config_maps_to_the_plan_it_means() {
    // (training config, label, stage, offload optimizer, offload params, source)
    let cases = [
        (
            "llama3_lora_sft_ds0.yaml",
            "DDP (ZeRO-0)",
            0,
            false,
            false,
            PlanSource::DeepSpeed,
        ),
        (
            "llama3_lora_sft_ds2.yaml",
            "ZeRO-2",
            2,
            false,
            false,
            PlanSource::DeepSpeed,
        ),
        (
            "llama3_full_sft_ds2_offload.yaml",
            "ZeRO-2 + offload optimizer",
            2,
            true,
            false,
            PlanSource::DeepSpeed,
        ),
        (
            "llama3_full_sft_ds3.yaml",
            "ZeRO-3",
            3,
            false,
            false,
            PlanSource::DeepSpeed,
        ),
        (
            "llama3_full_sft_ds3_offload.yaml",
            "ZeRO-3 + offload optimizer + params",
            3,
            true,
            true,
            PlanSource::DeepSpeed,
        ),
        (
            "llama3_full_sft_fsdp.yaml",
            "FSDP FULL_SHARD",
            3,
            false,
            false,
            PlanSource::Fsdp,
        ),
    ];
    for (name, label, stage, off_opt, off_param, source) in cases {
        let (plan, _) = plan_of(name, 4, 2);
        assert_eq!(plan.label(), label, "{name}");
        assert_eq!(plan.stage(), stage, "{name}");
        assert_eq!(plan.offload_optimizer, off_opt, "{name}");
        assert_eq!(plan.offload_param, off_param, "{name}");
        assert_eq!(plan.source, source, "{name}");
        assert!(!plan.hybrid, "{name}");
        // "auto" resolved from the training config: bf16, micro 1, accumulation 2, clip 1.0.
        assert_eq!(plan.precision, Precision::Bf16, "{name}");
        assert_eq!((plan.micro_batch, plan.grad_accum), (1, 2), "{name}");
        assert_eq!(plan.train_batch(), 8, "{name}");
        assert_eq!(plan.clip, Some(1.0), "{name}");
        assert_eq!((plan.world, plan.gpus_per_node), (4, 2), "{name}");
        assert_eq!(plan.lr_scheduler_type.as_deref(), Some("cosine"), "{name}");
        assert!(plan.unresolved_auto.is_empty(), "{name}");
    }
}

#[test]
fn each_seed_deepspeed_file_parses_to_its_stage() {
    for (file, stage, off_opt, off_param) in [
        ("ds_z0_config.json", 0, false, false),
        ("ds_z2_config.json", 2, false, false),
        ("ds_z2_offload_config.json", 2, true, false),
        ("ds_z3_config.json", 3, false, false),
        ("ds_z3_offload_config.json", 3, true, true),
    ] {
        let ds = DeepSpeedConfig::from_json(&read(&format!("examples/{file}")).unwrap())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let z = &ds.zero_optimization;
        assert_eq!(z.stage, stage, "{file}");
        assert_eq!(
            z.offload_optimizer.is_some_and(|o| o.is_cpu()),
            off_opt,
            "{file}"
        );
        assert_eq!(
            z.offload_param.is_some_and(|o| o.is_cpu()),
            off_param,
            "{file}"
        );
        assert!(ds.zero_allow_untested_optimizer, "{file}");
    }
}

#[test]
fn zero3_seed_resolves_hidden_size_autos_by_the_hf_rules() {
    let (plan, _) = plan_of("llama3_full_sft_ds3.yaml", 4, 2);
    assert_eq!(plan.reduce_bucket_size, Some(4096 * 4096));
    // int(0.9 * 4096 * 4096) = int(15099494.4)
    assert_eq!(plan.prefetch_bucket_size, Some(15_099_494));
    assert_eq!(plan.param_persistence_threshold, Some(40_960));
    assert_eq!(plan.max_live_parameters, 1_000_000_000);
    assert!(!plan.overlap_comm);

    // Without the hidden size the three stay "auto", and a warning says so.
    let (mut plan, warnings) =
        plan_from_files(&train("llama3_full_sft_ds3.yaml"), read, 4, 2, None).unwrap();
    assert_eq!(plan.reduce_bucket_size, None);
    assert_eq!(plan.prefetch_bucket_size, None);
    assert_eq!(plan.param_persistence_threshold, None);
    assert_eq!(plan.unresolved_auto.len(), 3);
    assert!(warnings.iter().any(
        |w| w.key == "zero_optimization.reduce_bucket_size" && w.message.contains("unresolved")
    ));
    plan.resolve_hidden(256);
    assert_eq!(plan.reduce_bucket_size, Some(65_536));
    assert_eq!(plan.prefetch_bucket_size, Some(58_982));
    assert_eq!(plan.param_persistence_threshold, Some(2_560));
    assert!(plan.unresolved_auto.is_empty());
}

#[test]
fn seed_files_name_their_no_effect_keys_once() {
    let (_, keys) = plan_of("llama3_full_sft_ds3.yaml", 4, 2);
    assert_eq!(
        keys,
        vec![
            "comms_config",
            "monitor_config",
            "zero_optimization.stage3_gather_16bit_weights_on_model_save",
            "zero_optimization.stage3_max_live_parameters",
            "zero_optimization.stage3_max_reuse_distance",
            "zero_optimization.stage3_param_persistence_threshold"
        ]
    );
    let (_, keys) = plan_of("llama3_lora_sft_ds2.yaml", 4, 2);
    assert_eq!(
        keys,
        vec![
            "steps_per_print",
            "wall_clock_breakdown",
            "zero_optimization.round_robin_gradients"
        ]
    );
    let ds = DeepSpeedConfig::from_json(&read("examples/ds_z2_config.json").unwrap()).unwrap();
    assert_eq!(
        warning_lines(&ds.warnings),
        vec![
            "accepted, no effect in Ringmaster: steps_per_print, wall_clock_breakdown, \
             zero_optimization.round_robin_gradients"
        ]
    );
}

#[test]
fn seed_fsdp_config_is_full_shard_for_its_two_by_two_cluster() {
    let f = FsdpConfig::from_yaml(&read("examples/fsdp_config.yaml").unwrap()).unwrap();
    assert_eq!(f.sharding_strategy, ShardingStrategy::FullShard);
    assert!(f.sync_module_states && f.cpu_ram_efficient_loading);
    assert_eq!(f.transformer_layer_cls_to_wrap, vec!["LlamaDecoderLayer"]);
    let l = f.launcher.as_ref().unwrap();
    assert_eq!((l.num_machines, l.num_processes), (Some(2), Some(4)));

    let (plan, keys) = plan_of("llama3_full_sft_fsdp.yaml", 4, 2);
    assert!(plan.cpu_ram_efficient_loading && plan.sync_module_states);
    assert_eq!(
        keys,
        vec![
            "fsdp_config.fsdp_forward_prefetch",
            "fsdp_config.fsdp_use_orig_params"
        ]
    );

    // The same file on a cluster of another size: an error naming both values.
    let err = plan_from_files(&train("llama3_full_sft_fsdp.yaml"), read, 2, 2, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("num_processes = 4") && msg.contains("world size = 2"),
        "{msg}"
    );
    let err = plan_from_files(&train("llama3_full_sft_fsdp.yaml"), read, 4, 4, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("num_machines = 2") && msg.contains("1 node"),
        "{msg}"
    );
}

#[test]
fn a_contradicting_explicit_batch_size_is_refused_naming_both_values() {
    let t = train("llama3_full_sft_ds3.yaml"); // micro 1, accumulation 2
    let base: serde_json::Value =
        serde_json::from_str(&read("examples/ds_z3_config.json").unwrap()).unwrap();
    let with = |key: &str, v: serde_json::Value| {
        let mut d = base.clone();
        d[key] = v;
        DeepSpeedConfig::from_value(&d).unwrap()
    };

    let ds = with("train_micro_batch_size_per_gpu", 4.into());
    let err = plan_from(&t, Some(&ds), None, 4, 2, Some(4096)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "deepspeed train_micro_batch_size_per_gpu = 4 but per_device_train_batch_size = 1"
    );

    let ds = with("gradient_accumulation_steps", 8.into());
    let err = plan_from(&t, Some(&ds), None, 4, 2, Some(4096)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "deepspeed gradient_accumulation_steps = 8 but gradient_accumulation_steps = 2"
    );

    let ds = with("train_batch_size", 64.into());
    let err = plan_from(&t, Some(&ds), None, 4, 2, Some(4096)).unwrap_err();
    assert!(matches!(err, ConfigError::Mismatch(_)));
    assert!(
        err.to_string()
            .starts_with("deepspeed train_batch_size 64 != world 4 × micro 1 × accum 2 = 8"),
        "{err}"
    );

    // Explicit values that agree are fine.
    let ds = with("train_batch_size", 8.into());
    let (plan, _) = plan_from(&t, Some(&ds), None, 4, 2, Some(4096)).unwrap();
    assert_eq!(plan.train_batch(), 8);
}

#[test]
fn an_accelerate_config_named_by_the_training_config_sets_the_plan() {
    // What `accelerate launch --config_file F` would take, named by `accelerate_config: F`.
    let acc = |name: &str| -> Result<String, String> {
        match name {
            "multi_gpu.yaml" => Ok("compute_environment: LOCAL_MACHINE\ndistributed_type: \
                 MULTI_GPU\nmixed_precision: bf16\nnum_machines: 2\nnum_processes: 4\n\
                 machine_rank: 0\nmain_process_ip: 10.0.0.1\nmain_process_port: 29500\n"
                .into()),
            "deepspeed.yaml" => Ok("distributed_type: DEEPSPEED\nnum_machines: 2\n\
                 num_processes: 4\ndeepspeed_config:\n  \
                 deepspeed_config_file: examples/ds_z3_config.json\n  zero3_init_flag: true\n"
                .into()),
            "deepspeed_inline.yaml" => Ok("distributed_type: DEEPSPEED\nmixed_precision: bf16\n\
                 num_machines: 2\nnum_processes: 4\ndeepspeed_config:\n  zero_stage: 2\n  \
                 offload_optimizer_device: cpu\n  gradient_accumulation_steps: 2\n"
                .into()),
            other => read(other),
        }
    };
    let with = |file: &str| {
        let mut t = train("llama3_full_sft_ds3.yaml");
        t.deepspeed = None;
        t.accelerate_config = Some(file.into());
        t
    };
    let cases = [
        ("multi_gpu.yaml", "DDP (ZeRO-0)", 0u8, false),
        ("deepspeed.yaml", "ZeRO-3", 3, false),
        ("deepspeed_inline.yaml", "ZeRO-2", 2, true),
        ("examples/fsdp_config.yaml", "FULL_SHARD", 3, false),
    ];
    for (file, label, stage, offload) in cases {
        let (plan, _) = plan_from_files(&with(file), acc, 4, 2, Some(4096))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(plan.label().contains(label), "{file}: {}", plan.label());
        assert_eq!(plan.stage(), stage, "{file}");
        assert_eq!(plan.offload_optimizer, offload, "{file}");
        assert_eq!(plan.precision, Precision::Bf16, "{file}");
    }
    // num_processes that disagrees with the cluster: both values named.
    let err = plan_from_files(&with("multi_gpu.yaml"), acc, 2, 2, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("num_processes = 4") && msg.contains("world size = 2"),
        "{msg}"
    );
    // With deepspeed: as well, the training config is refused naming both.
    let text = read("examples/llama3_full_sft_ds3.yaml").unwrap();
    let msg = TrainConfig::from_yaml(&format!("{text}\naccelerate_config: deepspeed.yaml\n"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("accelerate_config (deepspeed.yaml)")
            && msg.contains("deepspeed (examples/ds_z3_config.json)"),
        "{msg}"
    );
}
