//! Rotary position embedding as Hugging Face's Llama applies it ("rotate half": the first and
//! second halves of each head's dimensions form the rotated pairs), with transformers' inverse
//! frequencies for default, linear and llama3 scaling. Tables are computed on the host in f64.

use crate::config::{LlamaConfig, RopeScaling};

/// `inv_freq[j]`, `j < head_dim / 2`, as transformers' `ROPE_INIT_FUNCTIONS` compute them.
pub fn inv_freq(cfg: &LlamaConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|j| 1.0 / cfg.rope_theta.powf((2 * j) as f64 / d as f64))
        .collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > low_wavelen {
                        f / factor
                    } else if wavelen < high_wavelen {
                        f
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// `(cos, sin)` tables of shape `[positions.len(), head_dim]` (row-major), entry
/// `[t][j] = cos/sin(positions[t] * inv_freq[j mod head_dim/2])`.
pub fn tables(inv_freq: &[f64], positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let d = 2 * half;
    let mut cos = vec![0.0f32; positions.len() * d];
    let mut sin = vec![0.0f32; positions.len() * d];
    // A batch repeats few positions many times (packed rows restart at 0): compute each
    // position's row once and copy it (the same bits as computing it again).
    let span = positions.iter().max().map_or(0, |&m| m as usize + 1);
    let mut first = vec![usize::MAX; span];
    for (t, &p) in positions.iter().enumerate() {
        let seen = first[p as usize];
        if seen != usize::MAX {
            cos.copy_within(seen * d..(seen + 1) * d, t * d);
            sin.copy_within(seen * d..(seen + 1) * d, t * d);
            continue;
        }
        first[p as usize] = t;
        for (j, &f) in inv_freq.iter().enumerate() {
            // transformers multiplies in f32; the angle is rounded to f32 before cos/sin.
            let angle = (p as f32 * f as f32) as f64;
            let (s, c) = angle.sin_cos();
            for k in [j, j + half] {
                cos[t * d + k] = c as f32;
                sin[t * d + k] = s as f32;
            }
        }
    }
    (cos, sin)
}

/// Tables for RoPE on `[tokens, heads · head_dim]` activations (one row per token, heads side
/// by side): `cos` repeated per head, and `sin` with rotate-half's sign folded in (negative on
/// the first half of each head), so that `x·cos + swap_halves(x)·sin` is the rotation with
/// every operand contiguous and of the same shape.
pub fn head_tables(inv_freq: &[f64], positions: &[u32], heads: usize) -> (Vec<f32>, Vec<f32>) {
    let (cos, sin) = tables(inv_freq, positions);
    let d = 2 * inv_freq.len();
    let half = d / 2;
    let width = heads * d;
    let mut c = vec![0.0f32; positions.len() * width];
    let mut s = vec![0.0f32; positions.len() * width];
    for t in 0..positions.len() {
        for h in 0..heads {
            for i in 0..d {
                c[t * width + h * d + i] = cos[t * d + i];
                let v = sin[t * d + i];
                s[t * width + h * d + i] = if i < half { -v } else { v };
            }
        }
    }
    (c, s)
}

/// Reference rotate-half RoPE of one head vector `x` (length `head_dim`) at table row `cos`,
/// `sin`: `x * cos + rotate_half(x) * sin`, `rotate_half([a, b]) = [-b, a]`.
pub fn apply_reference(x: &[f32], cos: &[f32], sin: &[f32]) -> Vec<f32> {
    let d = x.len();
    let half = d / 2;
    (0..d)
        .map(|i| {
            let rot = if i < half { -x[i + half] } else { x[i - half] };
            x[i] * cos[i] + rot * sin[i]
        })
        .collect()
}
