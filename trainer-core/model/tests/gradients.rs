//! The whole model's gradients against central finite differences, in f64.
//!
//! This binary sets the CPU device's default float dtype to f64 (a per-process setting, hence
//! its own test binary), so that differences of step 1e-4 agree with autodiff within 1e-5
//! relative. GQA (2 query heads per KV head), packed rows and tied embeddings are covered.

use burn::backend::{Autodiff, Flex};
use burn::tensor::DType;
use ringmaster_model::model::{Inputs, Llama, cross_entropy, leaf_grads};
use ringmaster_model::params::Rng;
use ringmaster_model::{LlamaConfig, ParamStore};

type B64 = Flex;
type AD64 = Autodiff<Flex>;

fn use_f64() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        burn::tensor::set_default_dtypes::<Flex>(&Default::default(), DType::F64, DType::I64)
            .expect("f64 default before any tensor");
    });
}

fn tiny(tied: bool) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(11, 8, 2, 2, 1);
    cfg.intermediate_size = 12;
    cfg.tie_word_embeddings = tied;
    cfg.initializer_range = 0.3;
    cfg
}

fn batch() -> (usize, usize, Vec<u32>, Vec<u32>, Vec<u32>, Vec<i64>) {
    // Row 0: one sample of 5 tokens; row 1: two packed samples (3 + 2).
    let ids = vec![1, 4, 2, 9, 3, 5, 7, 10, 6, 8];
    let pos = vec![0, 1, 2, 3, 4, 0, 1, 2, 0, 1];
    let seg = vec![1, 1, 1, 1, 1, 1, 1, 1, 2, 2];
    let targets = vec![4, 2, 9, 3, -100, 7, 10, -100, 8, -100];
    (2, 5, ids, pos, seg, targets)
}

fn loss64(cfg: &LlamaConfig, store: &ParamStore) -> f64 {
    let dev = Default::default();
    let (b, t, ids, pos, seg, targets) = batch();
    let inp = Inputs::<B64>::new(cfg, b, t, &ids, &pos, &seg, &dev).unwrap();
    let m = Llama::<B64>::new(cfg, store, false, None, &dev).unwrap();
    let loss = cross_entropy(m.forward(&inp, None), &targets, 7.0);
    assert_eq!(loss.dtype(), DType::F64, "finite differences run in f64");
    loss.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0]
}

fn check_gradients(tied: bool) {
    use_f64();
    let cfg = tiny(tied);
    let store = ParamStore::init_llama(&cfg, 5);
    let dev = Default::default();
    let (b, t, ids, pos, seg, targets) = batch();
    let inp = Inputs::<AD64>::new(&cfg, b, t, &ids, &pos, &seg, &dev).unwrap();
    let m = Llama::<AD64>::new(&cfg, &store, true, None, &dev).unwrap();
    let loss = cross_entropy(m.forward(&inp, None), &targets, 7.0);
    let grads = loss.backward();
    let g = leaf_grads(m.base_leaves(), &grads);
    let mut rng = Rng::new(9);
    let mut checked = 0;
    for (ti, spec) in store.specs().iter().enumerate() {
        // A few coordinates of every tensor.
        for _ in 0..3 {
            let k = (rng.next_u64() % spec.numel() as u64) as usize;
            let h = 1e-4f32;
            let mut plus = store.clone();
            let x = plus.data(ti)[k];
            plus.data_mut(ti)[k] = x + h;
            let mut minus = store.clone();
            minus.data_mut(ti)[k] = x - h;
            let step = ((x + h) as f64) - ((x - h) as f64);
            let fd = (loss64(&cfg, &plus) - loss64(&cfg, &minus)) / step;
            let ad = g[ti][k] as f64;
            assert!(
                (fd - ad).abs() <= 1e-5 * fd.abs().max(1e-2),
                "{}[{k}]: autodiff {ad} vs finite difference {fd}",
                spec.name
            );
            checked += 1;
        }
    }
    assert!(checked >= store.len() * 3);
}

#[test]
fn gradients_match_finite_differences_gqa_untied() {
    check_gradients(false);
}

#[test]
fn gradients_match_finite_differences_tied_embeddings() {
    let cfg = tiny(true);
    assert!(
        ringmaster_model::params::param_specs(&cfg)
            .iter()
            .all(|s| s.name != "lm_head.weight")
    );
    check_gradients(true);
}
