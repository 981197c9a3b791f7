//! Greedy decoding (batched, no KV cache: each step runs the model over the rows so far).

use burn::tensor::{Int, Tensor, TensorData};

use crate::error::Result;
use crate::model::{Inputs, Llama};

/// Greedily extends every prompt by up to `max_new_tokens`, stopping a row at any of `eos`
/// (the eos is kept) or at `max_position_embeddings`. Returns only the generated ids.
pub fn greedy<B: crate::fused::Fused>(
    model: &Llama<B>,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    eos: &[u32],
    device: &B::Device,
) -> Result<Vec<Vec<u32>>> {
    let cfg = model.config().clone();
    let mut rows: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut done: Vec<bool> = prompts.iter().map(|p| p.is_empty()).collect();
    for _ in 0..max_new_tokens {
        let active: Vec<usize> = (0..rows.len()).filter(|&r| !done[r]).collect();
        if active.is_empty() {
            break;
        }
        let seq = active.iter().map(|&r| rows[r].len()).max().unwrap_or(1);
        let b = active.len();
        let mut ids = vec![0u32; b * seq];
        let mut lens = Vec::with_capacity(b);
        for (k, &r) in active.iter().enumerate() {
            ids[k * seq..k * seq + rows[r].len()].copy_from_slice(&rows[r]);
            lens.push(rows[r].len());
        }
        let inp = Inputs::<B>::causal(&cfg, b, seq, &ids, &lens, device)?;
        let logits = model.forward(&inp, None);
        let last: Vec<i64> = lens
            .iter()
            .enumerate()
            .map(|(k, &l)| (k * seq + l - 1) as i64)
            .collect();
        let sel = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [b]), device);
        let next = logits.select(0, sel).argmax(1);
        let next: Vec<i64> = next
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .expect("argmax ids");
        for (k, &r) in active.iter().enumerate() {
            let tok = next[k] as u32;
            rows[r].push(tok);
            out[r].push(tok);
            if eos.contains(&tok) || rows[r].len() >= cfg.max_position_embeddings {
                done[r] = true;
            }
        }
    }
    Ok(out)
}
