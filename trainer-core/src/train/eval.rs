//! Generation-based evaluation: greedy answers to the held-out prompts, scored by exact match.

use anyhow::Result;
use ringmaster_data::synthetic::exact_match;
use ringmaster_model::Llama;
use ringmaster_model::fused::Fused;
use ringmaster_model::generate::greedy;
use serde::Serialize;

use super::setup::{DEFAULT_MAX_NEW_TOKENS, Setup};

/// Exact-match accuracy of greedy answers.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    /// Correct answers.
    pub correct: usize,
    /// Examples.
    pub total: usize,
    /// `correct / total`.
    pub accuracy: f64,
    /// The first few (prompt answer, prediction) pairs, for a look.
    pub samples: Vec<(String, String)>,
}

/// Evaluates the current weights of `setup` on its held-out examples, the model on `device`.
pub fn evaluate<B: Fused>(setup: &Setup, device: &B::Device) -> Result<EvalResult> {
    let lora = setup.lora.as_ref().map(|(l, a)| (l, a));
    let model = Llama::<B>::new(&setup.model, &setup.base, false, lora, device)?;
    let max_new = setup
        .cfg
        .max_new_tokens
        .map(|n| n as usize)
        .unwrap_or(DEFAULT_MAX_NEW_TOKENS);
    let batch = setup.cfg.per_device_eval_batch_size.unwrap_or(64).max(1) as usize;
    let stops = setup.template.stop_token_ids(&setup.tokenizer);
    let mut correct = 0;
    let mut samples = Vec::new();
    for chunk in setup.eval.chunks(batch) {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt.clone()).collect();
        let outs = greedy(&model, &prompts, max_new, &stops, device)?;
        for (ex, out) in chunk.iter().zip(outs) {
            let pred = setup.template.decode_response(&setup.tokenizer, &out)?;
            if exact_match(&pred, &ex.answer) {
                correct += 1;
            }
            if samples.len() < 5 {
                samples.push((ex.answer.clone(), pred));
            }
        }
    }
    let total = setup.eval.len();
    Ok(EvalResult {
        correct,
        total,
        accuracy: if total == 0 {
            0.0
        } else {
            correct as f64 / total as f64
        },
        samples,
    })
}
