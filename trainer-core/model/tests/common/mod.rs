//! Fixtures shared by the model's test binaries.

use ringmaster_model::LlamaConfig;

/// A tiny config with GQA (2 query heads per KV head), tied or untied head.
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
