//! Tokens per second of one training step (forward, backward, AdamW) of a Llama built from a
//! config, on the CPU backend, with the trainer's own code path (flat f32 leaves, loss over
//! next-token targets, AdamW on flat tensors). Prints one JSON line with the phase split.
//!
//! The 3.4M config: `--hidden 256 --layers 4 --heads 4 --kv-heads 4 --intermediate 688
//! --vocab 512 --batch 8 --seq 128`; the 124.7M config: `--hidden 768 --layers 12 --heads 12
//! --kv-heads 4 --intermediate 2048 --vocab 32000 --batch 2 --seq 512`. Threads: set
//! RAYON_NUM_THREADS (PyTorch side: torch.set_num_threads) to compare like with like.

use std::time::Instant;

use burn::backend::Autodiff;
use clap::Parser;
use ringmaster_model::model::{Inputs, Llama, cross_entropy, leaf_grads};
use ringmaster_model::params::Rng;
use ringmaster_model::{LlamaConfig, ParamStore};
use ringmaster_optim::adamw::{AdamWConfig, AdamWState, adamw_step};

#[cfg(not(feature = "ndarray"))]
type Cpu = burn::backend::Flex;
#[cfg(feature = "ndarray")]
type Cpu = burn::backend::NdArray;
type Ad = Autodiff<Cpu>;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 4)]
    layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    #[arg(long, default_value_t = 688)]
    intermediate: usize,
    #[arg(long, default_value_t = 512)]
    vocab: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// `llama`, or `qwen3` (per-head q/k RMSNorm) / `qwen2` (q/k/v biases) at the same shapes
    /// (`head_dim` = hidden / heads).
    #[arg(long, default_value = "llama")]
    arch: String,
}

fn main() {
    let tuned = ringmaster_model::host::tune_allocator();
    if std::env::var_os("RINGMASTER_COMPUTE_POOL").is_some_and(|v| v == "off") {
        run(tuned)
    } else {
        ringmaster_model::host::on_compute_pool(|| run(tuned))
    }
}

fn run(tuned: bool) {
    let a = Args::parse();
    let mut cfg = LlamaConfig::tiny(a.vocab, a.hidden, a.layers, a.heads, a.kv_heads);
    match a.arch.as_str() {
        "llama" => {}
        "qwen3" => {
            cfg.arch = ringmaster_model::config::Arch::Qwen3;
            cfg.qk_norm = true;
        }
        "qwen2" => {
            cfg.arch = ringmaster_model::config::Arch::Qwen2;
            cfg.qkv_bias = true;
        }
        other => {
            eprintln!("train-step: --arch {other}: expected llama, qwen2 or qwen3");
            std::process::exit(2);
        }
    }
    cfg.intermediate_size = a.intermediate;
    cfg.max_position_embeddings = a.seq.max(2048);
    let mut store = ParamStore::init_llama(&cfg, 0);
    let device = Default::default();
    let mut rng = Rng::new(1);
    let n = a.batch * a.seq;
    let ids: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % a.vocab as u64) as u32)
        .collect();
    let lens = vec![a.seq; a.batch];
    let mut targets = vec![ringmaster_model::IGNORE_INDEX; n];
    for b in 0..a.batch {
        for t in 0..a.seq - 1 {
            targets[b * a.seq + t] = ids[b * a.seq + t + 1] as i64;
        }
    }
    let adam = AdamWConfig::default();
    let mut states: Vec<AdamWState> = store
        .iter()
        .map(|(_, d)| AdamWState::new(d.len()))
        .collect();
    let (mut t_build, mut t_fwd, mut t_bwd, mut t_grads, mut t_opt) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut step_times = Vec::new();
    for step in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let model = Llama::<Ad>::new(&cfg, &store, true, None, &device).expect("model");
        let inp = Inputs::<Ad>::causal(&cfg, a.batch, a.seq, &ids, &lens, &device).expect("inputs");
        let t1 = Instant::now();
        let loss = cross_entropy(model.forward(&inp, None), &targets, (n - a.batch) as f64);
        // Force the forward to finish before timing the backward (backends may be lazy).
        let _ = loss.clone().into_data();
        let t2 = Instant::now();
        let g = loss.backward();
        let t3 = Instant::now();
        let grads = leaf_grads(model.base_leaves(), &g);
        let t4 = Instant::now();
        for (k, (_, data)) in store.iter_mut().enumerate() {
            adamw_step(&adam, &mut states[k], data, &grads[k], 1e-4, 0.0);
        }
        let t5 = Instant::now();
        if step >= a.warmup {
            t_build += (t1 - t0).as_secs_f64();
            t_fwd += (t2 - t1).as_secs_f64();
            t_bwd += (t3 - t2).as_secs_f64();
            t_grads += (t4 - t3).as_secs_f64();
            t_opt += (t5 - t4).as_secs_f64();
            step_times.push((t5 - t0).as_secs_f64());
        }
    }
    step_times.sort_by(|x, y| x.partial_cmp(y).expect("finite"));
    let median = step_times[step_times.len() / 2];
    let s = a.steps as f64;
    let backend = if cfg!(feature = "ndarray") {
        "ndarray"
    } else {
        "flex"
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": "ringmaster",
            "arch": a.arch,
            "backend": backend,
            "malloc_tuned": tuned,
            "params": store.numel(),
            "batch": a.batch,
            "seq": a.seq,
            "threads": std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into()),
            "tokens_per_s": (a.batch * a.seq) as f64 / median,
            "step_s_median": median,
            "phase_s": {
                "build": t_build / s, "forward": t_fwd / s, "backward": t_bwd / s,
                "grads_to_host": t_grads / s, "adamw": t_opt / s,
            },
        })
    );
}
