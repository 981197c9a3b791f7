//! Mistral, Qwen2 and Qwen3 beside Llama: config files of each, save → load round trips,
//! LoRA, Mistral's sliding window, and the fused forward and backward (flex kernels) against
//! the burn-op defaults (ndarray) on random weights.
//!
//! Tolerances: the flex and ndarray paths agree within 2e-5 relative to 1 + |value| for logits
//! and loss and 1e-4 for gradients (f32, different summation orders); the sliding-window check
//! (RoPE is relative, so a truncated context gives the same scores) within 1e-5; bf16 compute
//! within 5e-2 of f32.

mod common;
use common::{batch, init_random, tiny_arch};

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::Tensor;
use ringmaster_model::hf::{SaveOptions, load_dir, save_dir};
use ringmaster_model::lora::{LoraConfig, load_adapter, merge, save_adapter};
use ringmaster_model::model::{Inputs, Llama, cross_entropy, leaf_grads};
use ringmaster_model::params::{ParamKind, Rng};
use ringmaster_model::{Arch, DType, LlamaConfig, ParamStore};

/// Every architecture's tiny test configs: (label, config).
fn cases() -> Vec<(&'static str, LlamaConfig)> {
    vec![
        ("llama", tiny_arch(Arch::Llama, false, false)),
        ("mistral_window3", tiny_arch(Arch::Mistral, false, false)),
        ("qwen2_tied", tiny_arch(Arch::Qwen2, true, false)),
        ("qwen3_untied", tiny_arch(Arch::Qwen3, false, false)),
        ("qwen3_tied_bias", tiny_arch(Arch::Qwen3, true, true)),
    ]
}

fn host<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn logits<B: ringmaster_model::fused::Fused>(cfg: &LlamaConfig, store: &ParamStore) -> Vec<f32> {
    let dev = Default::default();
    let (b, t, ids, pos, seg, _) = batch();
    let inp = Inputs::<B>::new(cfg, b, t, &ids, &pos, &seg, &dev).unwrap();
    host(
        Llama::<B>::new(cfg, store, false, None, &dev)
            .unwrap()
            .forward(&inp, None),
    )
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what}[{i}]: {a} vs {b}"
        );
    }
}

#[test]
fn configs_of_each_architecture_read_and_write() {
    // transformers 4 form, Qwen3 with head_dim != hidden / heads.
    let q3 = LlamaConfig::from_json_str(
        r#"{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 100,
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "attention_bias": false, "rope_theta": 1000000.0, "tie_word_embeddings": true,
            "use_sliding_window": false, "sliding_window": null, "max_window_layers": 28,
            "torch_dtype": "bfloat16"}"#,
    )
    .unwrap();
    assert_eq!(q3.arch, Arch::Qwen3);
    assert!(q3.qk_norm && !q3.qkv_bias && !q3.o_bias && q3.tie_word_embeddings);
    assert_eq!((q3.head_dim, q3.rope_theta), (16, 1e6));
    assert_eq!(q3.max_position_embeddings, 32768);
    // transformers 5 form; Qwen3's head_dim defaults to 128, not hidden / heads.
    let q3b = LlamaConfig::from_json_str(
        r#"{"model_type": "qwen3", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
            "layer_types": ["full_attention", "full_attention"], "dtype": "float32"}"#,
    )
    .unwrap();
    assert_eq!((q3b.head_dim, q3b.rope_theta), (128, 5000.0));
    let q2 = LlamaConfig::from_json_str(
        r#"{"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    assert!(q2.qkv_bias && !q2.o_bias && !q2.qk_norm && q2.head_dim == 8);
    let mistral = |window: &str| {
        LlamaConfig::from_json_str(&format!(
            r#"{{"model_type": "mistral", "vocab_size": 100, "hidden_size": 32,
                "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 1, "head_dim": 16 {window}}}"#
        ))
    };
    assert_eq!(mistral("").unwrap().sliding_window, Some(4096));
    assert_eq!(
        mistral(r#", "sliding_window": null"#)
            .unwrap()
            .sliding_window,
        None
    );
    let m = mistral(r#", "sliding_window": 64"#).unwrap();
    assert_eq!(
        (m.sliding_window, m.head_dim, m.qkv_bias),
        (Some(64), 16, false)
    );

    // Refusals name the field and what is supported.
    let err = |json: &str| LlamaConfig::from_json_str(json).unwrap_err().to_string();
    let e = err(r#"{"model_type": "gemma2", "vocab_size": 10}"#);
    assert!(
        e.contains("`gemma2`") && e.contains("llama, mistral, qwen2, qwen3"),
        "{e}"
    );
    let e = err(
        r#"{"model_type": "qwen2", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "use_sliding_window": true, "sliding_window": 16}"#,
    );
    assert!(e.contains("use_sliding_window"), "{e}");
    let e = err(
        r#"{"model_type": "qwen3", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "layer_types": ["full_attention", "sliding_attention"]}"#,
    );
    assert!(e.contains("layer_types"), "{e}");

    // What we write reads back as the same config, with transformers' class name.
    for (label, cfg) in cases() {
        let text = cfg.to_json(DType::F32);
        assert!(text.contains(cfg.arch.class_name()), "{label}: {text}");
        assert_eq!(
            LlamaConfig::from_json_str(&text).unwrap(),
            cfg,
            "{label}: {text}"
        );
    }
}

#[test]
fn save_load_round_trip_is_bit_exact_with_the_same_logits() {
    for (label, cfg) in cases() {
        let store = init_random(&cfg, 3);
        if cfg.qkv_bias {
            assert!(
                store
                    .index_of("model.layers.1.self_attn.k_proj.bias")
                    .is_some()
            );
        }
        if cfg.qk_norm {
            let i = store
                .index_of("model.layers.0.self_attn.q_norm.weight")
                .unwrap();
            assert_eq!(store.specs()[i].shape, vec![cfg.head_dim], "{label}");
        }
        let dir = tempfile::tempdir().unwrap();
        save_dir(dir.path(), &cfg, &store, SaveOptions::default()).unwrap();
        let back = load_dir(dir.path()).unwrap();
        assert_eq!(back.config, cfg, "{label}");
        assert!(back.params.bit_equal(&store), "{label}");
        let a = logits::<Flex>(&cfg, &store);
        let b = logits::<Flex>(&back.config, &back.params);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{label}: logits after the round trip"
        );
    }
}

/// Loss, logits and every gradient of one forward and backward on `B`.
fn step<B: ringmaster_model::fused::Fused + burn::tensor::backend::AutodiffBackend>(
    cfg: &LlamaConfig,
    store: &ParamStore,
    lora: Option<(&LoraConfig, &ParamStore)>,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let dev = Default::default();
    let (b, t, ids, pos, seg, targets) = batch();
    let inp = Inputs::<B>::new(cfg, b, t, &ids, &pos, &seg, &dev).unwrap();
    let m = Llama::<B>::new(cfg, store, lora.is_none(), lora, &dev).unwrap();
    let out = m.forward(&inp, None);
    let loss = cross_entropy(out.clone(), &targets, 7.0);
    let mut vals = host(out.inner());
    vals.push(host(loss.clone().inner())[0]);
    let g = loss.backward();
    let grads = match lora {
        None => leaf_grads(m.base_leaves(), &g),
        Some(_) => leaf_grads(m.adapter_leaves(), &g),
    };
    (vals, grads)
}

#[test]
fn fused_flex_path_equals_burn_op_defaults_per_architecture() {
    for (label, cfg) in cases() {
        let store = init_random(&cfg, 4);
        let (fv, fg) = step::<Autodiff<Flex>>(&cfg, &store, None);
        let (nv, ng) = step::<Autodiff<NdArray>>(&cfg, &store, None);
        close(&fv, &nv, 2e-5, &format!("{label}: logits and loss"));
        for (i, spec) in store.specs().iter().enumerate() {
            close(
                &fg[i],
                &ng[i],
                1e-4,
                &format!("{label}: grad {}", spec.name),
            );
            // Biases and q/k norms take part: their gradients are not zero.
            if matches!(spec.kind, ParamKind::Bias(_)) || spec.name.contains("_norm.") {
                assert!(
                    fg[i].iter().any(|g| g.abs() > 1e-6),
                    "{label}: {} has no gradient",
                    spec.name
                );
            }
        }
    }
}

#[test]
fn lora_on_biased_and_normed_blocks_merges_and_matches_across_paths() {
    for (label, cfg) in cases() {
        let base = init_random(&cfg, 7);
        let lora = LoraConfig::new(2, Some(8.0), 0.0, &["all".into()]).unwrap();
        let mut adapters = lora.init(&cfg, 8);
        let mut rng = Rng::new(10);
        for (_, d) in adapters.iter_mut() {
            d.iter_mut().for_each(|x| *x += rng.normal() * 0.1);
        }
        let dir = tempfile::tempdir().unwrap();
        save_adapter(dir.path(), &lora, &adapters, "base", DType::F32).unwrap();
        let (lora2, back) = load_adapter(dir.path(), &cfg).unwrap();
        assert_eq!(lora2, lora, "{label}");
        assert!(back.bit_equal(&adapters), "{label}");
        // The adapted model equals the merged one, and the fused path the default one
        // (adapter gradients included).
        let (fv, fg) = step::<Autodiff<Flex>>(&cfg, &base, Some((&lora, &adapters)));
        let (nv, ng) = step::<Autodiff<NdArray>>(&cfg, &base, Some((&lora, &adapters)));
        close(&fv, &nv, 2e-5, &format!("{label}: adapted logits"));
        for (i, (a, b)) in fg.iter().zip(&ng).enumerate() {
            close(a, b, 1e-4, &format!("{label}: adapter grad {i}"));
        }
        let mut merged = base.clone();
        merge(&cfg, &lora, &mut merged, &adapters).unwrap();
        let m = logits::<Flex>(&cfg, &merged);
        close(
            &fv[..m.len()],
            &m,
            1e-5,
            &format!("{label}: merged vs adapted"),
        );
        let plain = logits::<Flex>(&cfg, &base);
        assert!(
            plain.iter().zip(&m).any(|(x, y)| (x - y).abs() > 1e-3),
            "{label}: the adapter changes the output"
        );
    }
}

#[test]
fn sliding_window_sees_only_the_last_window_tokens() {
    // One layer: the output at position i depends on tokens i-w+1..=i only, and RoPE is
    // relative, so the full row's logits at i equal the last logits of that window alone.
    let mut cfg = tiny_arch(Arch::Mistral, false, false);
    cfg.num_hidden_layers = 1;
    let w = cfg.sliding_window.unwrap();
    let store = init_random(&cfg, 11);
    let dev = Default::default();
    let ids: Vec<u32> = vec![1, 4, 2, 9, 3, 5, 7, 10];
    let t = ids.len();
    let model = Llama::<Flex>::new(&cfg, &store, false, None, &dev).unwrap();
    let run = |row: &[u32]| {
        let inp = Inputs::<Flex>::causal(&cfg, 1, row.len(), row, &[row.len()], &dev).unwrap();
        host(model.forward(&inp, None))
    };
    let full = run(&ids);
    let v = cfg.vocab_size;
    for i in w - 1..t {
        let part = run(&ids[i + 1 - w..=i]);
        close(
            &full[i * v..(i + 1) * v],
            &part[(w - 1) * v..],
            1e-5,
            &format!("position {i}"),
        );
    }
    // Without the window the far tokens do matter.
    let mut wide = cfg.clone();
    wide.sliding_window = None;
    let wide_model = Llama::<Flex>::new(&wide, &store, false, None, &dev).unwrap();
    let inp = Inputs::<Flex>::causal(&wide, 1, t, &ids, &[t], &dev).unwrap();
    let no_window = host(wide_model.forward(&inp, None));
    assert!(
        full[(t - 1) * v..]
            .iter()
            .zip(&no_window[(t - 1) * v..])
            .any(|(a, b)| (a - b).abs() > 1e-4)
    );
}

#[test]
fn bf16_compute_tracks_f32_per_architecture() {
    // Mixed precision casts every weight — biases and q/k norms included — to bf16; the
    // logits stay within bf16's rounding of the f32 ones (|logits| ≲ 3 here).
    for (label, cfg) in cases() {
        let store = init_random(&cfg, 12);
        let dev = Default::default();
        let (b, t, ids, pos, seg, targets) = batch();
        let inp = Inputs::<Autodiff<Flex>>::new(&cfg, b, t, &ids, &pos, &seg, &dev).unwrap();
        let m = Llama::<Autodiff<Flex>>::new_mixed(
            &cfg,
            &store,
            true,
            None,
            &dev,
            Some(burn::tensor::DType::BF16),
        )
        .unwrap();
        let out = m.forward(&inp, None);
        let got = host(out.clone().inner());
        close(&got, &logits::<Flex>(&cfg, &store), 5e-2, label);
        let g = cross_entropy(out, &targets, 7.0).backward();
        for (spec, grad) in store.specs().iter().zip(leaf_grads(m.base_leaves(), &g)) {
            assert!(grad.iter().all(|x| x.is_finite()), "{label}: {}", spec.name);
        }
    }
}
