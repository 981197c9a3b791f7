//! `ringctl estimate`: per-GPU and per-node memory of every plan for a model and a cluster shape,
//! from DeepSpeed's estimators plus an activation term (`ringmaster_config::estimate`). Needs no
//! coordinator.

use std::fmt::Write;
use std::path::Path;

use ringmaster_config::estimate::{self, Estimate, EstimateInput, ModelDims, PRESETS};

use super::{CliError, Exit, Output};

/// The largest `--nodes`.
pub const MAX_NODES: u64 = 1 << 16;
/// The largest `--gpus-per-node`.
pub const MAX_GPUS_PER_NODE: u64 = 1 << 10;
/// The largest `--micro-batch`.
pub const MAX_MICRO_BATCH: u64 = 1 << 20;
/// The largest `--seq`.
pub const MAX_SEQ: u64 = 1 << 24;

/// Flags of `ringctl estimate`.
#[derive(clap::Args, Debug, Clone)]
pub struct EstimateArgs {
    /// A Hugging Face config.json (or a model directory holding one), or a preset: llama3-8b,
    /// llama3-70b, llama2-7b, qwen2.5-7b, tiny-3.4m, small-124m.
    #[arg(long, value_name = "CONFIG.json|PRESET")]
    pub model: String,
    /// Nodes (1 to 65536).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_NODES))]
    pub nodes: u64,
    /// GPUs per node (1 to 1024).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_GPUS_PER_NODE))]
    pub gpus_per_node: u64,
    /// Memory of one GPU: 80GiB, 24GB, 40G (K/M/G/T and KiB.. are powers of 1024, KB.. of 1000).
    #[arg(long, value_name = "SIZE", default_value = "80GiB", value_parser = parse_size)]
    pub gpu_memory: u64,
    /// Host memory of one node; not checked when absent.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub cpu_memory: Option<u64>,
    /// Micro-batch per GPU for the activation term (with --seq; 1 to 1048576).
    #[arg(long, value_name = "B", requires = "seq", value_parser = clap::value_parser!(u64).range(1..=MAX_MICRO_BATCH))]
    pub micro_batch: Option<u64>,
    /// Sequence length for the activation term (with --micro-batch; 1 to 16777216).
    #[arg(long, value_name = "L", requires = "micro_batch", value_parser = clap::value_parser!(u64).range(1..=MAX_SEQ))]
    pub seq: Option<u64>,
    /// ZeRO-3 rows as DeepSpeed's zero_init=False (every process loads the whole model on the
    /// host first).
    #[arg(long)]
    pub no_zero_init: bool,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

/// A memory size for `--gpu-memory` / `--cpu-memory` (see `ringmaster_config::units`); not 0.
///
/// # Errors
/// Not a size, or zero.
pub fn parse_size(s: &str) -> Result<u64, String> {
    match ringmaster_config::units::parse_size(s)? {
        0 => Err(format!("'{s}': a memory size must be above 0")),
        n => Ok(n),
    }
}

/// The model a `--model` value names: a config.json, a directory holding one, or a preset.
///
/// # Errors
/// An unreadable or invalid file, or an unknown preset (the message lists the presets); all
/// exit 2.
pub fn load_model(spec: &str) -> Result<ModelDims, CliError> {
    let path = Path::new(spec);
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_owned()
    };
    if file.is_file() || spec.ends_with(".json") || path.is_dir() {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| CliError::usage(format!("--model {}: {e}", file.display())))?;
        let name = if path.is_dir() { path } else { &file };
        let name = name
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_owned());
        return ModelDims::from_hf_config(&name, &text)
            .map_err(|e| CliError::usage(format!("--model {}: {e}", file.display())));
    }
    ModelDims::preset(spec).ok_or_else(|| {
        CliError::usage(format!(
            "--model '{spec}': not a file and not a preset; presets: {} (or give a Hugging Face \
             config.json)",
            PRESETS.join(", ")
        ))
    })
}

/// The estimator's input for these flags.
///
/// # Errors
/// As [`load_model`].
pub fn input_of(args: &EstimateArgs) -> Result<EstimateInput, CliError> {
    let model = load_model(&args.model)?;
    let mut input = EstimateInput::new(model, args.nodes, args.gpus_per_node);
    input.gpu_memory = Some(args.gpu_memory);
    input.cpu_memory = args.cpu_memory;
    input.activations = match (args.micro_batch, args.seq) {
        (Some(b), Some(l)) => Some((b, l)),
        (None, None) => None,
        _ => {
            return Err(CliError::usage(
                "--micro-batch and --seq go together (the activation term needs both)",
            ));
        }
    };
    input.zero_init = !args.no_zero_init;
    Ok(input)
}

/// Runs `ringctl estimate`.
///
/// # Errors
/// Bad flags or model (exit 2).
pub fn run(args: &EstimateArgs) -> Result<Exit, CliError> {
    let est = estimate::estimate(&input_of(args)?);
    match args.output {
        Output::Json => super::print_json(&to_json(&est)),
        Output::Text => print!("{}", render(&est)),
    }
    Ok(Exit::Ok)
}

fn gib(bytes: u64) -> String {
    if bytes == u64::MAX {
        // The estimator saturates rather than overflow.
        return "> 16 EiB".to_owned();
    }
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn count(n: u64) -> String {
    let x = n as f64;
    if x >= 1e9 {
        format!("{:.2}B", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else {
        n.to_string()
    }
}

/// One row's verdict: `yes`, `no (GPU)`, `no (CPU)`, `no (GPU, CPU)`.
pub fn verdict(row: &estimate::EstimateRow) -> String {
    let mut short = Vec::new();
    if row.fits_gpu == Some(false) {
        short.push("GPU");
    }
    if row.fits_cpu == Some(false) {
        short.push("CPU");
    }
    if short.is_empty() {
        "yes".to_owned()
    } else {
        format!("no ({})", short.join(", "))
    }
}

/// The human-readable table.
pub fn render(est: &Estimate) -> String {
    let i = &est.input;
    let m = &i.model;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Model {}: {} parameters (largest layer {}), hidden {}, {} layers, {} heads ({} KV), vocab {}",
        m.name,
        count(est.total_params),
        count(est.largest_layer_params),
        m.hidden_size,
        m.num_hidden_layers,
        m.num_attention_heads,
        m.num_key_value_heads,
        m.vocab_size
    );
    let _ = writeln!(
        out,
        "Cluster: {} node(s) x {} GPU(s); GPU memory {}; CPU memory per node {}",
        i.nodes,
        i.gpus_per_node,
        i.gpu_memory.map_or_else(|| "not checked".to_owned(), gib),
        i.cpu_memory
            .map_or_else(|| "not checked (give --cpu-memory)".to_owned(), gib),
    );
    match i.activations {
        Some((b, l)) => {
            let _ = writeln!(
                out,
                "Activations: micro-batch {b} x sequence {l}, 16-bit (ZeRO-3 plans recompute unit by unit)"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "Activations: not counted (give --micro-batch and --seq)"
            );
        }
    }
    out.push('\n');
    let mut rows = vec![
        [
            "",
            "PLAN",
            "FSDP",
            "GPU STATES",
            "ACTIVATIONS",
            "GPU TOTAL",
            "CPU/NODE",
            "FITS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (n, r) in est.rows.iter().enumerate() {
        rows.push(vec![
            if est.recommended == Some(n) { "*" } else { "" }.to_owned(),
            r.plan.clone(),
            r.fsdp.clone().unwrap_or_else(|| "-".into()),
            gib(r.gpu_model_states_bytes),
            gib(r.gpu_activation_bytes),
            gib(r.gpu_total_bytes),
            gib(r.cpu_per_node_bytes),
            verdict(r),
        ]);
    }
    // Sizes right-aligned, names left-aligned.
    out.push_str(&super::render::table_aligned(&rows, |i| {
        (3..=6).contains(&i)
    }));
    out.push('\n');
    match est.recommended_row() {
        Some(r) => {
            let _ = writeln!(
                out,
                "Recommended: {}{} (* above): the fastest plan that fits (ZeRO-1 before 2 before 3, \
                 no offload before offload).",
                r.plan,
                r.fsdp
                    .as_ref()
                    .map(|f| format!(" = FSDP {f}"))
                    .unwrap_or_default()
            );
        }
        None => {
            let _ = writeln!(
                out,
                "Nothing fits: add GPUs or nodes, or lower --micro-batch / --seq."
            );
        }
    }
    let _ = writeln!(
        out,
        "Model states: DeepSpeed's estimate_zero2/zero3_model_states_mem_needs (additional_buffer_factor {}, \
         zero_init={}); DDP 16Ψ and ZeRO-1 4Ψ+12Ψ/N per GPU. CPU is per node.",
        i.additional_buffer_factor,
        u8::from(i.zero_init)
    );
    out
}

/// The JSON form: every figure in bytes.
pub fn to_json(est: &Estimate) -> serde_json::Value {
    let i = &est.input;
    serde_json::json!({
        "model": {
            "name": i.model.name,
            "total_params": est.total_params,
            "largest_layer_params": est.largest_layer_params,
            "hidden_size": i.model.hidden_size,
            "intermediate_size": i.model.intermediate_size,
            "num_hidden_layers": i.model.num_hidden_layers,
            "num_attention_heads": i.model.num_attention_heads,
            "num_key_value_heads": i.model.num_key_value_heads,
            "vocab_size": i.model.vocab_size,
            "tie_word_embeddings": i.model.tie_word_embeddings,
        },
        "nodes": i.nodes,
        "gpus_per_node": i.gpus_per_node,
        "gpu_memory_bytes": i.gpu_memory,
        "cpu_memory_bytes": i.cpu_memory,
        "micro_batch": i.activations.map(|a| a.0),
        "seq": i.activations.map(|a| a.1),
        "zero_init": i.zero_init,
        "additional_buffer_factor": i.additional_buffer_factor,
        "plans": est.rows.iter().map(|r| {
            let mut v = serde_json::to_value(r).expect("a row serializes");
            v["fits"] = r.fits().into();
            v
        }).collect::<Vec<_>>(),
        "recommended": est.recommended_row().map(|r| r.plan.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> EstimateArgs {
        let mut argv = vec!["ringctl", "estimate"];
        argv.extend_from_slice(extra);
        match super::super::Args::try_parse_from(argv).unwrap().command {
            super::super::Command::Estimate(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("80GiB"), Ok(80 << 30));
        assert_eq!(parse_size("80G"), Ok(80 << 30));
        assert_eq!(parse_size("80gb"), Ok(80_000_000_000));
        assert_eq!(parse_size("1.5 TiB"), Ok(3 << 39));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "GiB", "80XB", "-1G", "0"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn table_marks_what_fits_and_recommends_the_fastest() {
        let a = args(&[
            "--model",
            "llama3-8b",
            "--nodes",
            "1",
            "--gpus-per-node",
            "8",
            "--cpu-memory",
            "512GiB",
        ]);
        let est = estimate::estimate(&input_of(&a).unwrap());
        let text = render(&est);
        let line = |plan: &str| {
            text.lines()
                .find(|l| l.split("  ").any(|c| c.trim() == plan))
                .unwrap_or_else(|| panic!("no row {plan} in\n{text}"))
                .to_owned()
        };
        assert!(line("DDP (ZeRO-0)").ends_with("no (GPU)"), "{text}");
        assert!(line("ZeRO-1").starts_with('*'), "{text}");
        assert!(line("ZeRO-1").ends_with("yes"), "{text}");
        assert!(line("ZeRO-2").contains("SHARD_GRAD_OP"), "{text}");
        // DeepSpeed's figures: ZeRO-2 on 1 x 8 GPUs, 34,128,610,304 bytes per GPU and
        // 385,452,539,904 per node.
        assert!(line("ZeRO-2").contains("31.78 GiB"), "{text}");
        assert!(line("ZeRO-2").contains("358.98 GiB"), "{text}");
        assert!(text.contains("Recommended: ZeRO-1 (* above)"), "{text}");

        let v = to_json(&est);
        assert_eq!(v["recommended"], "ZeRO-1");
        assert_eq!(v["model"]["total_params"], 8_030_261_248u64);
        assert_eq!(v["plans"][2]["gpu_model_states_bytes"], 34_128_610_304u64);
        assert_eq!(v["plans"][2]["cpu_per_node_bytes"], 385_452_539_904u64);
        assert_eq!(v["plans"][0]["fits"], false);
        assert_eq!(v["gpu_memory_bytes"], 80u64 << 30);
        assert_eq!(v["micro_batch"], serde_json::Value::Null);

        // Activations push the recommendation to ZeRO-3, which recomputes unit by unit.
        let a = args(&[
            "--model",
            "llama3-8b",
            "--gpus-per-node",
            "8",
            "--micro-batch",
            "1",
            "--seq",
            "4096",
        ]);
        let est = estimate::estimate(&input_of(&a).unwrap());
        assert_eq!(est.recommended_row().unwrap().plan, "ZeRO-3");
        assert!(render(&est).contains("CPU memory per node not checked"));

        // Nothing fits: said so.
        let a = args(&["--model", "llama3-70b", "--gpu-memory", "1GiB"]);
        let est = estimate::estimate(&input_of(&a).unwrap());
        assert_eq!(est.recommended, None);
        assert!(render(&est).contains("Nothing fits"));
        assert_eq!(to_json(&est)["recommended"], serde_json::Value::Null);
    }

    #[test]
    fn model_from_a_config_json_or_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(
            &cfg,
            r#"{"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000}"#,
        )
        .unwrap();
        let m = load_model(cfg.to_str().unwrap()).unwrap();
        assert_eq!(m.total_params(), 124_668_672);
        let m = load_model(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(m.total_params(), 124_668_672);
    }

    #[test]
    fn usage_errors_exit_2() {
        let err = load_model("gpt-5").unwrap_err();
        assert_eq!(err.exit, Exit::Usage);
        for p in PRESETS {
            assert!(err.message.contains(p), "{}", err.message);
        }
        let err = load_model("/nonexistent/config.json").unwrap_err();
        assert_eq!(err.exit, Exit::Usage);
        // A config.json with a 2^40 dimension: refused naming the field, not an overflow.
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("huge.json");
        std::fs::write(
            &cfg,
            r#"{"hidden_size": 1099511627776, "intermediate_size": 2048, "num_hidden_layers": 2,
                "num_attention_heads": 1, "vocab_size": 1099511627776}"#,
        )
        .unwrap();
        let err = load_model(cfg.to_str().unwrap()).unwrap_err();
        assert_eq!(err.exit, Exit::Usage);
        assert!(
            err.message.contains("huge.json") && err.message.contains("`hidden_size`"),
            "{}",
            err.message
        );
        // The largest flags accepted give figures (saturated where past u64), no overflow.
        let a = args(&[
            "--model",
            "llama3-70b",
            "--nodes",
            "65536",
            "--gpus-per-node",
            "1024",
            "--micro-batch",
            "1048576",
            "--seq",
            "16777216",
            "--cpu-memory",
            "1TiB",
        ]);
        let est = estimate::estimate(&input_of(&a).unwrap());
        assert_eq!(est.recommended, None);
        assert!(render(&est).contains("> 16 EiB"), "{}", render(&est));
        // Flags: clap refuses them with its usage error (exit 2).
        for bad in [
            "estimate --model tiny-3.4m --micro-batch 2",
            "estimate --model tiny-3.4m --nodes 0",
            "estimate --model tiny-3.4m --nodes 100000",
            "estimate --model tiny-3.4m --gpus-per-node 100000",
            "estimate --model tiny-3.4m --micro-batch 100000000 --seq 8",
            "estimate --model tiny-3.4m --micro-batch 1 --seq 100000000",
            "estimate --model tiny-3.4m --gpu-memory lots",
            "estimate",
        ] {
            let argv = std::iter::once("ringctl").chain(bad.split(' '));
            let e = super::super::Args::try_parse_from(argv).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
    }
}
