//! The model's parts against plain reference implementations on random inputs, the whole
//! model's config and file round trips (gradients: tests/gradients.rs).
//!
//! Tolerances: parts in f32 against f64 references within 1e-5 (1e-4 for the MLP) relative to
//! 1 + the reference value.

mod common;
use common::{batch, tiny};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use ringmaster_model::hf::{SaveOptions, load_dir, save_dir};
use ringmaster_model::lora::{LoraConfig, load_adapter, merge, save_adapter};
use ringmaster_model::model::{Inputs, Llama, apply_rope, attention, rms_norm};
use ringmaster_model::params::Rng;
use ringmaster_model::{DType, LlamaConfig, ParamStore, rope};

type B = Flex;

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

fn close(a: &[f32], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            ((*x as f64) - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

#[test]
fn rms_norm_matches_reference() {
    let mut rng = Rng::new(1);
    let (n, h, eps) = (7, 24, 1e-6);
    let x = randn(&mut rng, n * h);
    let w = randn(&mut rng, h);
    let dev = Default::default();
    let got = rms_norm(
        Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [n, h]), &dev),
        Tensor::<B, 1>::from_data(TensorData::new(w.clone(), [h]), &dev),
        eps,
    );
    let mut want = vec![0.0f64; n * h];
    for r in 0..n {
        let row = &x[r * h..(r + 1) * h];
        let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / h as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for c in 0..h {
            want[r * h + c] = row[c] as f64 * inv * w[c] as f64;
        }
    }
    close(&to_vec(got), &want, 1e-5, "rms_norm");
}

#[test]
fn rope_matches_rotate_half_reference_and_llama3_scaling() {
    let mut cfg = LlamaConfig::tiny(16, 32, 1, 2, 2);
    cfg.rope_theta = 500_000.0;
    cfg.rope_scaling = ringmaster_model::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 64,
    };
    let inv = rope::inv_freq(&cfg);
    // transformers' llama3 rule: long wavelengths divided by factor, short ones kept.
    let base = |j: usize| 1.0 / 500_000f64.powf(2.0 * j as f64 / 16.0);
    for (j, f) in inv.iter().enumerate() {
        let wl = 2.0 * std::f64::consts::PI / base(j);
        if wl < 16.0 {
            assert_eq!(*f, base(j));
        } else if wl > 64.0 {
            assert!((f - base(j) / 8.0).abs() < 1e-15);
        } else {
            assert!(*f < base(j) && *f > base(j) / 8.0);
        }
    }
    let (h, t, d) = (3, 10, 16);
    let mut rng = Rng::new(2);
    let x = randn(&mut rng, t * h * d);
    let positions: Vec<u32> = (0..t).map(|i| (i as u32 * 7) % 50).collect();
    let (cos, sin) = rope::tables(&inv, &positions);
    let (cos_h, sin_h) = rope::head_tables(&inv, &positions, h);
    let dev = Default::default();
    let got = apply_rope(
        Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [t, h * d]), &dev),
        Tensor::<B, 2>::from_data(TensorData::new(cos_h, [t, h * d]), &dev),
        Tensor::<B, 2>::from_data(TensorData::new(sin_h, [t, h * d]), &dev),
        d,
    );
    let mut want = Vec::new();
    for ti in 0..t {
        for hi in 0..h {
            let row = &x[(ti * h + hi) * d..][..d];
            let tab = ti * d;
            let y = rope::apply_reference(row, &cos[tab..tab + d], &sin[tab..tab + d]);
            // Independent check of the reference: pairs (i, i + d/2) rotated by the angle.
            let j = 1;
            let ang = positions[ti] as f32 * inv[j] as f32;
            let (s, c) = (ang as f64).sin_cos();
            let a = row[j] as f64 * c - row[j + d / 2] as f64 * s;
            assert!((y[j] as f64 - a).abs() < 1e-5);
            want.extend(y.into_iter().map(|v| v as f64));
        }
    }
    close(&to_vec(got), &want, 1e-5, "rope");
}

#[test]
fn grouped_query_attention_matches_reference() {
    let (b, h, kv, t, d) = (2, 4, 2, 6, 8);
    let mut rng = Rng::new(3);
    let q = randn(&mut rng, b * h * t * d);
    let k = randn(&mut rng, b * kv * t * d);
    let v = randn(&mut rng, b * kv * t * d);
    // Row 1 is packed: tokens 0..3 segment 1, 3..5 segment 2, token 5 padding.
    let seg = [1u32, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 0];
    let cfg = LlamaConfig::tiny(16, h * d, 1, h, kv);
    let dev = Default::default();
    let inp = Inputs::<B>::new(&cfg, b, t, &[0; 12], &[0; 12], &seg, &dev).unwrap();
    let got = attention(
        Tensor::<B, 4>::from_data(TensorData::new(q.clone(), [b, h, t, d]), &dev),
        Tensor::<B, 4>::from_data(TensorData::new(k.clone(), [b, kv, t, d]), &dev),
        Tensor::<B, 4>::from_data(TensorData::new(v.clone(), [b, kv, t, d]), &dev),
        inp.mask,
    );
    let mut want = vec![0.0f64; b * h * t * d];
    for bi in 0..b {
        for hi in 0..h {
            let ki = hi / (h / kv);
            for i in 0..t {
                let si = seg[bi * t + i];
                let allowed: Vec<usize> = (0..=i)
                    .filter(|&j| j == i || (si != 0 && seg[bi * t + j] == si))
                    .collect();
                let qrow = &q[((bi * h + hi) * t + i) * d..][..d];
                let scores: Vec<f64> = allowed
                    .iter()
                    .map(|&j| {
                        let krow = &k[((bi * kv + ki) * t + j) * d..][..d];
                        qrow.iter()
                            .zip(krow)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (s, &j) in scores.iter().zip(&allowed) {
                    let p = (s - m).exp() / z;
                    let vrow = &v[((bi * kv + ki) * t + j) * d..][..d];
                    for c in 0..d {
                        want[((bi * h + hi) * t + i) * d + c] += p * vrow[c] as f64;
                    }
                }
            }
        }
    }
    close(&to_vec(got), &want, 1e-5, "attention");
}

#[test]
fn swiglu_block_mlp_matches_reference() {
    // silu(x·Wgᵀ) ⊙ (x·Wuᵀ) · Wdᵀ, as the block computes it.
    let (n, h, i) = (3, 8, 12);
    let mut rng = Rng::new(4);
    let x = randn(&mut rng, n * h);
    let wg = randn(&mut rng, i * h);
    let wu = randn(&mut rng, i * h);
    let wd = randn(&mut rng, h * i);
    let dev = Default::default();
    let t = |v: &Vec<f32>, s: [usize; 2]| {
        Tensor::<B, 2>::from_data(TensorData::new(v.clone(), s), &dev)
    };
    let xt = t(&x, [n, h]);
    let g = burn::tensor::activation::silu(xt.clone().matmul(t(&wg, [i, h]).transpose()));
    let u = xt.matmul(t(&wu, [i, h]).transpose());
    let got = (g * u).matmul(t(&wd, [h, i]).transpose());
    let mut want = vec![0.0f64; n * h];
    for r in 0..n {
        let mut act = vec![0.0f64; i];
        for j in 0..i {
            let a: f64 = (0..h)
                .map(|c| x[r * h + c] as f64 * wg[j * h + c] as f64)
                .sum();
            let b: f64 = (0..h)
                .map(|c| x[r * h + c] as f64 * wu[j * h + c] as f64)
                .sum();
            act[j] = a / (1.0 + (-a).exp()) * b;
        }
        for c in 0..h {
            want[r * h + c] = (0..i).map(|j| act[j] * wd[c * i + j] as f64).sum();
        }
    }
    close(&to_vec(got), &want, 1e-4, "swiglu");
}

#[test]
fn full_model_save_load_round_trip_is_bit_exact_single_and_sharded() {
    let cfg = tiny(false);
    let store = ParamStore::init_llama(&cfg, 6);
    let dir = tempfile::tempdir().unwrap();
    save_dir(dir.path(), &cfg, &store, SaveOptions::default()).unwrap();
    let back = load_dir(dir.path()).unwrap();
    assert_eq!(back.config, cfg);
    assert!(back.params.bit_equal(&store));
    // Sharded: a tiny max shard size forces an index; the single file is removed.
    let opts = SaveOptions {
        max_shard_bytes: 400,
        ..SaveOptions::default()
    };
    save_dir(dir.path(), &cfg, &store, opts).unwrap();
    assert!(!dir.path().join("model.safetensors").exists());
    assert!(dir.path().join("model.safetensors.index.json").exists());
    let back = load_dir(dir.path()).unwrap();
    assert!(back.params.bit_equal(&store));
    // bf16 files: values already representable in bf16 round trip exactly.
    let mut b16 = store.clone();
    for (_, d) in b16.iter_mut() {
        for x in d.iter_mut() {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }
    let opts = SaveOptions {
        dtype: DType::BF16,
        ..SaveOptions::default()
    };
    save_dir(dir.path(), &cfg, &b16, opts).unwrap();
    let back = load_dir(dir.path()).unwrap();
    assert_eq!(back.stored_dtype, DType::BF16);
    assert_eq!(back.config.dtype, DType::BF16);
    assert!(back.params.bit_equal(&b16));
}

#[test]
fn lora_round_trip_and_merge_equal_adapted_model() {
    let cfg = tiny(false);
    let base = ParamStore::init_llama(&cfg, 7);
    let lora = LoraConfig::new(
        2,
        Some(8.0),
        0.0,
        &["q_proj,v_proj".into(), "down_proj".into()],
    )
    .unwrap();
    let mut adapters = lora.init(&cfg, 8);
    // Non-zero B so that the adapter changes the output.
    let mut rng = Rng::new(10);
    for (_, d) in adapters.iter_mut() {
        for x in d.iter_mut() {
            *x += rng.normal() * 0.1;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    save_adapter(dir.path(), &lora, &adapters, "base", DType::F32).unwrap();
    let (lora2, back) = load_adapter(dir.path(), &cfg).unwrap();
    assert_eq!(lora2, lora);
    assert!(back.bit_equal(&adapters));
    let dev = Default::default();
    let (b, t, ids, pos, seg, _) = batch();
    let inp = Inputs::<B>::new(&cfg, b, t, &ids, &pos, &seg, &dev).unwrap();
    let adapted = Llama::<B>::new(&cfg, &base, false, Some((&lora, &adapters)), &dev)
        .unwrap()
        .forward(&inp, None);
    let plain = Llama::<B>::new(&cfg, &base, false, None, &dev)
        .unwrap()
        .forward(&inp, None);
    let mut merged = base.clone();
    merge(&cfg, &lora, &mut merged, &adapters).unwrap();
    let merged_out = Llama::<B>::new(&cfg, &merged, false, None, &dev)
        .unwrap()
        .forward(&inp, None);
    let a = to_vec(adapted);
    let p = to_vec(plain);
    let m: Vec<f64> = to_vec(merged_out).into_iter().map(f64::from).collect();
    close(&a, &m, 1e-5, "merged vs adapted logits");
    assert!(
        a.iter().zip(&p).any(|(x, y)| (x - y).abs() > 1e-3),
        "the adapter changes the output"
    );
}

#[test]
fn config_reads_transformers_4_and_5_forms() {
    let v4 = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,
      "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,
      "rms_norm_eps":1e-5,"rope_theta":500000.0,"max_position_embeddings":131072,
      "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"},
      "tie_word_embeddings":true,"bos_token_id":128000,"eos_token_id":[128001,128008,128009],
      "torch_dtype":"bfloat16"}"#;
    let v5 = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":2048,"intermediate_size":8192,
      "num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,
      "rms_norm_eps":1e-5,"max_position_embeddings":131072,
      "rope_parameters":{"rope_theta":500000.0,"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
        "original_max_position_embeddings":8192,"rope_type":"llama3"},
      "tie_word_embeddings":true,"bos_token_id":128000,"eos_token_id":[128001,128008,128009],
      "dtype":"bfloat16"}"#;
    let a = LlamaConfig::from_json_str(v4).unwrap();
    let b = LlamaConfig::from_json_str(v5).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.rope_theta, 500000.0);
    assert_eq!(a.dtype, DType::BF16);
    assert_eq!(a.eos_token_id, Some(128001));
    assert!(matches!(
        a.rope_scaling,
        ringmaster_model::RopeScaling::Llama3 { factor: 32.0, .. }
    ));
    // Llama-3.2-1B: 1.236B parameters (tied).
    assert_eq!(a.num_parameters(), 1_235_814_400);
    // Written config reads back equal.
    let again = LlamaConfig::from_json_str(&a.to_json(DType::BF16)).unwrap();
    assert_eq!(again, a);
}

#[test]
fn malformed_config_and_truncated_weights_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("config.json");
    for (text, needle) in [
        (r#"{"hidden_size": 8"#, "(json)"),
        (
            r#"{"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
            "intermediate_size",
        ),
        (
            r#"{"vocab_size": 10, "hidden_size": "8", "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
            "hidden_size",
        ),
        (
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 3}"#,
            "num_key_value_heads",
        ),
        (
            r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}"#,
            "rope_scaling.rope_type",
        ),
    ] {
        std::fs::write(&cfg_path, text).unwrap();
        let err = LlamaConfig::from_file(&cfg_path).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains(needle), "{err}");
    }
    let cfg = tiny(false);
    let store = ParamStore::init_llama(&cfg, 1);
    save_dir(dir.path(), &cfg, &store, SaveOptions::default()).unwrap();
    let w = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // A shape that contradicts config.json names the tensor.
    let mut other = cfg.clone();
    other.intermediate_size = 16;
    save_dir(
        dir.path(),
        &other,
        &ParamStore::init_llama(&other, 1),
        SaveOptions::default(),
    )
    .unwrap();
    std::fs::write(&cfg_path, cfg.to_json(DType::F32)).unwrap();
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("mlp.down_proj.weight") && err.contains("config.json implies"),
        "{err}"
    );
}

/// Unit by unit (each unit run on a detached input, recomputed in backward with the upstream
/// gradient injected through `sum(out * grad)`), the parameter gradients equal the whole
/// graph's, tied and untied, f32 within 1e-5 relative.
#[test]
fn unit_by_unit_recompute_equals_full_graph_gradients() {
    use burn::backend::Autodiff;
    use ringmaster_model::UnitWeights;
    use ringmaster_model::model::{cross_entropy, leaf_grads};
    type AD = Autodiff<Flex>;
    for tied in [false, true] {
        let cfg = tiny(tied);
        let store = ParamStore::init_llama(&cfg, 5);
        let dev = Default::default();
        let (b, t, ids, pos, seg, targets) = batch();
        let inp = Inputs::<AD>::new(&cfg, b, t, &ids, &pos, &seg, &dev).unwrap();
        let full = Llama::<AD>::new(&cfg, &store, true, None, &dev).unwrap();
        let loss = cross_entropy(full.forward(&inp, None), &targets, 7.0);
        let want_loss = to_vec(loss.clone().inner())[0];
        let g = loss.backward();
        let want = leaf_grads(full.base_leaves(), &g);

        let leaf = |i: usize| {
            Tensor::<AD, 1>::from_data(
                TensorData::new(store.data(i).to_vec(), [store.data(i).len()]),
                &dev,
            )
            .require_grad()
        };
        let units = cfg.num_hidden_layers + 2;
        let idx_of = |u: usize| -> Vec<usize> {
            (0..store.len())
                .filter(|&i| store.specs()[i].unit == u)
                .collect()
        };
        // Forward without a graph, keeping each unit's input.
        let mut saved = Vec::new();
        let mut x: Option<Tensor<AD, 2>> = None;
        for u in 0..units - 1 {
            let leaves: Vec<_> = idx_of(u).into_iter().map(|i| leaf(i).detach()).collect();
            let w = UnitWeights::new(&cfg, u, &leaves, None, None).unwrap();
            saved.push(x.clone());
            x = Some(w.forward(&cfg, x, &inp, None).detach());
        }
        // Backward: the head, then each unit with the upstream gradient injected.
        let mut got: Vec<Vec<f32>> = vec![vec![0.0; 0]; store.len()];
        let add = |got: &mut Vec<Vec<f32>>, i: usize, gi: Vec<f32>| {
            if got[i].is_empty() {
                got[i] = gi;
            } else {
                got[i].iter_mut().zip(gi).for_each(|(a, b)| *a += b);
            }
        };
        let head_idx = idx_of(units - 1);
        let head_leaves: Vec<_> = head_idx.iter().map(|&i| leaf(i)).collect();
        let tied_leaf = tied.then(|| leaf(0));
        let w = UnitWeights::new(&cfg, units - 1, &head_leaves, tied_leaf.as_ref(), None).unwrap();
        let xin = x.unwrap().require_grad();
        let loss = cross_entropy(
            w.forward(&cfg, Some(xin.clone()), &inp, None),
            &targets,
            7.0,
        );
        assert!((to_vec(loss.clone().inner())[0] - want_loss).abs() <= 1e-6 * want_loss.abs());
        let g = loss.backward();
        for (k, gi) in leaf_grads(&head_leaves, &g).into_iter().enumerate() {
            add(&mut got, head_idx[k], gi);
        }
        if let Some(t) = &tied_leaf {
            add(
                &mut got,
                0,
                leaf_grads(std::slice::from_ref(t), &g).remove(0),
            );
        }
        let mut up = xin.grad(&g).unwrap();
        for u in (0..units - 1).rev() {
            let idx = idx_of(u);
            let leaves: Vec<_> = idx.iter().map(|&i| leaf(i)).collect();
            let w = UnitWeights::new(&cfg, u, &leaves, None, None).unwrap();
            let xin = saved[u].clone().map(|s| s.require_grad());
            let out = w.forward(&cfg, xin.clone(), &inp, None);
            let g = (out * Tensor::from_inner(up.clone())).sum().backward();
            for (k, gi) in leaf_grads(&leaves, &g).into_iter().enumerate() {
                add(&mut got, idx[k], gi);
            }
            if let Some(xin) = xin {
                up = xin.grad(&g).unwrap();
            }
        }
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            for (a, b) in w.iter().zip(g) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1e-3 + a.abs()),
                    "tied {tied}: {} gradient {a} vs unit-wise {b}",
                    store.specs()[i].name
                );
            }
        }
    }
}
