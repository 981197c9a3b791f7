//! The whole model's gradients against central finite differences, in f64.
//!
//! This binary sets the CPU device's default float dtype to f64 (a per-process setting, hence
//! its own test binary). The f64 forward still carries about 1e-9–1e-8 absolute noise in the
//! loss (measured with steps of 1e-6; the same before and after the RoPE layout change; some
//! kernel on the way is not fully f64, not pinned down), so the difference uses steps 5e-3 and
//! 1e-2 with Richardson extrapolation (truncation O(h⁴)) and must agree with autodiff within
//! 1e-4 relative + 5e-6 absolute — a wrong gradient term is off by O(1). GQA (2 query heads per
//! KV head), packed rows and tied embeddings are covered, and Qwen3's blocks (q/k norms,
//! biases on all four attention projections, head_dim ≠ hidden / heads) with random norms and
//! biases.

mod common;
use common::{batch, init_random, tiny, tiny_arch};

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
    let cfg = tiny(tied);
    check_store(&cfg, &ParamStore::init_llama(&cfg, 5));
}

fn check_store(cfg: &LlamaConfig, store: &ParamStore) {
    use_f64();
    let cfg = cfg.clone();
    let dev = Default::default();
    let (b, t, ids, pos, seg, targets) = batch();
    let inp = Inputs::<AD64>::new(&cfg, b, t, &ids, &pos, &seg, &dev).unwrap();
    let m = Llama::<AD64>::new(&cfg, store, true, None, &dev).unwrap();
    let loss = cross_entropy(m.forward(&inp, None), &targets, 7.0);
    let grads = loss.backward();
    let g = leaf_grads(m.base_leaves(), &grads);
    let mut rng = Rng::new(9);
    let mut checked = 0;
    for (ti, spec) in store.specs().iter().enumerate() {
        // A few coordinates of every tensor.
        for _ in 0..3 {
            let k = (rng.next_u64() % spec.numel() as u64) as usize;
            let x = store.data(ti)[k];
            let central = |h: f32| {
                let mut plus = store.clone();
                plus.data_mut(ti)[k] = x + h;
                let mut minus = store.clone();
                minus.data_mut(ti)[k] = x - h;
                let step = ((x + h) as f64) - ((x - h) as f64);
                (loss64(&cfg, &plus) - loss64(&cfg, &minus)) / step
            };
            // Richardson extrapolation of two central differences cancels the h² term.
            let fd = (4.0 * central(5e-3) - central(1e-2)) / 3.0;
            let ad = g[ti][k] as f64;
            assert!(
                (fd - ad).abs() <= 1e-4 * fd.abs() + 5e-6,
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
fn gradients_match_finite_differences_qwen3_norms_and_biases() {
    let cfg = tiny_arch(ringmaster_model::Arch::Qwen3, false, true);
    check_store(&cfg, &init_random(&cfg, 5));
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

#[test]
fn rope_gradient_matches_finite_differences() {
    use burn::tensor::{Tensor, TensorData};
    use ringmaster_model::model::apply_rope;
    use_f64();
    let dev = Default::default();
    let (n, h, d) = (3usize, 2usize, 4usize);
    let mut rng = Rng::new(1);
    let x: Vec<f32> = (0..n * h * d).map(|_| rng.normal()).collect();
    let w: Vec<f32> = (0..n * h * d).map(|_| rng.normal()).collect();
    let cfg = LlamaConfig::tiny(4, h * d, 1, h, h);
    let inv = ringmaster_model::rope::inv_freq(&cfg);
    let (c, s) = ringmaster_model::rope::head_tables(&inv, &[0, 3, 7], h);
    let f = |xs: &[f32]| -> f64 {
        let xt = Tensor::<B64, 2>::from_data(TensorData::new(xs.to_vec(), [n, h * d]), &dev);
        let y = apply_rope(
            xt,
            Tensor::from_data(TensorData::new(c.clone(), [n, h * d]), &dev),
            Tensor::from_data(TensorData::new(s.clone(), [n, h * d]), &dev),
            d,
        );
        let wt = Tensor::<B64, 2>::from_data(TensorData::new(w.clone(), [n, h * d]), &dev);
        y.mul(wt)
            .sum()
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap()[0]
    };
    let xt =
        Tensor::<AD64, 2>::from_data(TensorData::new(x.clone(), [n, h * d]), &dev).require_grad();
    let y = apply_rope(
        xt.clone(),
        Tensor::from_data(TensorData::new(c.clone(), [n, h * d]), &dev),
        Tensor::from_data(TensorData::new(s.clone(), [n, h * d]), &dev),
        d,
    );
    let wt = Tensor::<AD64, 2>::from_data(TensorData::new(w.clone(), [n, h * d]), &dev);
    let g = y.mul(wt).sum().backward();
    let gx = xt
        .grad(&g)
        .unwrap()
        .into_data()
        .convert::<f64>()
        .to_vec::<f64>()
        .unwrap();
    for k in 0..x.len() {
        let mut p = x.clone();
        p[k] += 1e-6;
        let mut m = x.clone();
        m[k] -= 1e-6;
        let fd = (f(&p) - f(&m)) / ((p[k] as f64) - (m[k] as f64));
        assert!(
            (fd - gx[k]).abs() < 1e-7,
            "x[{k}]: autodiff {} vs fd {fd}",
            gx[k]
        );
    }
}
