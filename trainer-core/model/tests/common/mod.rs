//! Fixtures shared by the model's test binaries.

use ringmaster_model::LlamaConfig;

/// A tiny config with GQA (2 query heads per KV head), tied or untied head.
#[allow(dead_code)]
pub fn tiny(tied: bool) -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(11, 8, 2, 2, 1);
    cfg.intermediate_size = 12;
    cfg.tie_word_embeddings = tied;
    cfg.initializer_range = 0.3;
    cfg
}

/// Row 0: one sample of 5 tokens; row 1: two packed samples (3 + 2).
pub fn batch() -> (usize, usize, Vec<u32>, Vec<u32>, Vec<u32>, Vec<i64>) {
    let ids = vec![1, 4, 2, 9, 3, 5, 7, 10, 6, 8];
    let pos = vec![0, 1, 2, 3, 4, 0, 1, 2, 0, 1];
    let seg = vec![1, 1, 1, 1, 1, 1, 1, 1, 2, 2];
    let targets = vec![4, 2, 9, 3, -100, 7, 10, -100, 8, -100];
    (2, 5, ids, pos, seg, targets)
}

/// A tiny config of `arch` shaped like [`tiny`]: Qwen2 with its q/k/v biases, Qwen3 with q/k
/// norms, `head_dim` 8 ≠ hidden / heads and (when `bias`) `attention_bias`, Mistral with a
/// sliding window of 3 tokens (shorter than the 5-token rows of [`batch`]).
#[allow(dead_code)]
pub fn tiny_arch(arch: ringmaster_model::Arch, tied: bool, bias: bool) -> LlamaConfig {
    use ringmaster_model::Arch;
    let mut cfg = LlamaConfig::tiny_arch(arch, 11, 8, 2, 2, 1);
    cfg.intermediate_size = 12;
    cfg.tie_word_embeddings = tied;
    cfg.initializer_range = 0.3;
    match arch {
        Arch::Mistral => cfg.sliding_window = Some(3),
        Arch::Llama | Arch::Qwen3 if bias => {
            cfg.qkv_bias = true;
            cfg.o_bias = true;
        }
        _ => {}
    }
    cfg.validate().expect("a valid tiny config");
    cfg
}

/// transformers' initialisation with non-trivial norms (1 + 0.3·N(0,1)) and biases
/// (0.3·N(0,1)), so that tests see them act.
#[allow(dead_code)]
pub fn init_random(cfg: &LlamaConfig, seed: u64) -> ringmaster_model::ParamStore {
    use ringmaster_model::params::{ParamKind, Rng};
    let mut store = ringmaster_model::ParamStore::init_llama(cfg, seed);
    let mut rng = Rng::new(seed ^ 0x5eed);
    for (spec, data) in store.iter_mut() {
        match spec.kind {
            ParamKind::Norm => data.iter_mut().for_each(|x| *x = 1.0 + 0.3 * rng.normal()),
            ParamKind::Bias(_) => data.iter_mut().for_each(|x| *x = 0.3 * rng.normal()),
            _ => {}
        }
    }
    store
}
