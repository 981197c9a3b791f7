//! The model's parameters as named, flat fp32 buffers in Hugging Face layout and order.
//!
//! [`ParamStore`] is the canonical state: the optimizer steps it, checkpoints and safetensors
//! files read and write it, the engines shard it. The burn model is built from it for each step
//! ([`crate::model`]), so no layout is ever keyed by burn's per-process `ParamId`.

use std::collections::HashMap;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

/// What a parameter is (decides its initialisation and whether LoRA can target it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `[vocab, hidden]` embedding table.
    Embedding,
    /// A linear layer's `[out, in]` weight; the string is the module name LoRA targets use.
    Linear(&'static str),
    /// An RMSNorm weight: `[hidden]`, or `[head_dim]` for Qwen3's q_norm / k_norm.
    Norm,
    /// A linear layer's `[out]` bias; the string is the module name (never a LoRA target;
    /// no weight decay).
    Bias(&'static str),
}

/// Name, shape and place of one parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Hugging Face tensor name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Shape in Hugging Face layout (linear weights `[out, in]`).
    pub shape: Vec<usize>,
    /// Kind.
    pub kind: ParamKind,
    /// Flat unit (FSDP wrap unit): 0 = embeddings, 1..=L = blocks, L + 1 = final norm and head.
    pub unit: usize,
}

impl ParamSpec {
    /// Elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The linear modules of a block, in HF order, with `(out, in)` shapes.
pub fn block_linears(cfg: &LlamaConfig) -> [(&'static str, &'static str, usize, usize); 7] {
    let h = cfg.hidden_size;
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let i = cfg.intermediate_size;
    [
        ("self_attn", "q_proj", q, h),
        ("self_attn", "k_proj", kv, h),
        ("self_attn", "v_proj", kv, h),
        ("self_attn", "o_proj", h, q),
        ("mlp", "gate_proj", i, h),
        ("mlp", "up_proj", i, h),
        ("mlp", "down_proj", h, i),
    ]
}

/// Whether a block linear (`q_proj`, ...) has a bias under `cfg`.
pub fn has_bias(cfg: &LlamaConfig, module: &str) -> bool {
    match module {
        "q_proj" | "k_proj" | "v_proj" => cfg.qkv_bias,
        "o_proj" => cfg.o_bias,
        _ => false,
    }
}

/// Every parameter in a fixed order (units in order; inside a block: the two layer norms,
/// Qwen3's q_norm and k_norm, then the linears as [`block_linears`] lists them, each weight
/// followed by its bias where it has one).
pub fn param_specs(cfg: &LlamaConfig) -> Vec<ParamSpec> {
    let h = cfg.hidden_size;
    let mut v = vec![ParamSpec {
        name: "model.embed_tokens.weight".into(),
        shape: vec![cfg.vocab_size, h],
        kind: ParamKind::Embedding,
        unit: 0,
    }];
    for l in 0..cfg.num_hidden_layers {
        let unit = l + 1;
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            v.push(ParamSpec {
                name: format!("model.layers.{l}.{norm}.weight"),
                shape: vec![h],
                kind: ParamKind::Norm,
                unit,
            });
        }
        if cfg.qk_norm {
            for norm in ["q_norm", "k_norm"] {
                v.push(ParamSpec {
                    name: format!("model.layers.{l}.self_attn.{norm}.weight"),
                    shape: vec![cfg.head_dim],
                    kind: ParamKind::Norm,
                    unit,
                });
            }
        }
        for (group, module, out, inp) in block_linears(cfg) {
            v.push(ParamSpec {
                name: format!("model.layers.{l}.{group}.{module}.weight"),
                shape: vec![out, inp],
                kind: ParamKind::Linear(module),
                unit,
            });
            if has_bias(cfg, module) {
                v.push(ParamSpec {
                    name: format!("model.layers.{l}.{group}.{module}.bias"),
                    shape: vec![out],
                    kind: ParamKind::Bias(module),
                    unit,
                });
            }
        }
    }
    let last = cfg.num_hidden_layers + 1;
    v.push(ParamSpec {
        name: "model.norm.weight".into(),
        shape: vec![h],
        kind: ParamKind::Norm,
        unit: last,
    });
    if !cfg.tie_word_embeddings {
        v.push(ParamSpec {
            name: "lm_head.weight".into(),
            shape: vec![cfg.vocab_size, h],
            kind: ParamKind::Linear("lm_head"),
            unit: last,
        });
    }
    v
}

/// Named fp32 tensors in a fixed order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParamStore {
    specs: Vec<ParamSpec>,
    data: Vec<Vec<f32>>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    /// A store of zeros for `specs`.
    pub fn zeros(specs: Vec<ParamSpec>) -> Self {
        let data = specs.iter().map(|s| vec![0.0; s.numel()]).collect();
        let index = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        ParamStore { specs, data, index }
    }

    /// [`zeros`](Self::zeros), or an error naming the tensor and the total when the allocator
    /// refuses a buffer (instead of aborting the process). Each buffer is asked for first and
    /// given back, then allocated zeroed (untouched pages, as `zeros`).
    pub fn try_zeros(specs: Vec<ParamSpec>) -> Result<Self> {
        let total: u128 = specs.iter().map(|s| s.numel() as u128).sum();
        for s in &specs {
            let mut probe: Vec<f32> = Vec::new();
            probe.try_reserve_exact(s.numel()).map_err(|_| {
                ModelError::Invalid(format!(
                    "not enough memory for tensor `{}` ({} elements) of {total} parameters \
                     ({:.1} GiB in fp32)",
                    s.name,
                    s.numel(),
                    total as f64 * 4.0 / f64::from(1u32 << 30)
                ))
            })?;
        }
        Ok(Self::zeros(specs))
    }

    /// The model's parameters initialised as transformers does: normal(0, initializer_range)
    /// for embeddings and linear weights, zeros for biases, ones for norms; deterministic in
    /// `seed`.
    pub fn init_llama(cfg: &LlamaConfig, seed: u64) -> Self {
        Self::zeros(param_specs(cfg)).init_values(cfg, seed)
    }

    /// [`init_llama`](Self::init_llama), with [`try_zeros`](Self::try_zeros)'s error when the
    /// memory is not there.
    pub fn try_init_llama(cfg: &LlamaConfig, seed: u64) -> Result<Self> {
        Ok(Self::try_zeros(param_specs(cfg))?.init_values(cfg, seed))
    }

    fn init_values(mut self, cfg: &LlamaConfig, seed: u64) -> Self {
        let store = &mut self;
        let std = cfg.initializer_range as f32;
        for (i, spec) in store.specs.iter().enumerate() {
            let buf = &mut store.data[i];
            match spec.kind {
                ParamKind::Norm => buf.fill(1.0),
                ParamKind::Bias(_) => buf.fill(0.0),
                ParamKind::Embedding | ParamKind::Linear(_) => {
                    // One stream per tensor, keyed by its name: adding a tensor never shifts
                    // another's values.
                    let mut rng = Rng::new(seed ^ fnv1a(spec.name.as_bytes()));
                    for x in buf.iter_mut() {
                        *x = rng.normal() * std;
                    }
                }
            }
        }
        self
    }

    /// Specs, in order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Total elements.
    pub fn numel(&self) -> usize {
        self.data.iter().map(Vec::len).sum()
    }

    /// Index of a tensor by name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The data of tensor `i`.
    pub fn data(&self, i: usize) -> &[f32] {
        &self.data[i]
    }

    /// The data of tensor `i`, mutable.
    pub fn data_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i]
    }

    /// The data of a tensor by name.
    pub fn get(&self, name: &str) -> Result<&[f32]> {
        self.index_of(name)
            .map(|i| self.data[i].as_slice())
            .ok_or_else(|| ModelError::Invalid(format!("no tensor `{name}`")))
    }

    /// Replaces tensor `i`'s data (same length).
    pub fn set(&mut self, i: usize, values: Vec<f32>) -> Result<()> {
        if values.len() != self.data[i].len() {
            return Err(ModelError::Invalid(format!(
                "tensor `{}` has {} elements, got {}",
                self.specs[i].name,
                self.data[i].len(),
                values.len()
            )));
        }
        self.data[i] = values;
        Ok(())
    }

    /// Iterates `(spec, data)`.
    pub fn iter(&self) -> impl Iterator<Item = (&ParamSpec, &[f32])> {
        self.specs.iter().zip(self.data.iter().map(Vec::as_slice))
    }

    /// Iterates `(spec, data)` mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&ParamSpec, &mut Vec<f32>)> {
        self.specs.iter().zip(self.data.iter_mut())
    }

    /// Bit-exact equality of names, shapes and values.
    pub fn bit_equal(&self, other: &ParamStore) -> bool {
        self.specs == other.specs
            && self.data.iter().zip(&other.data).all(|(a, b)| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
            })
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64 + Box–Muller: a small deterministic generator for initialisation and dropout.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    spare: Option<f32>,
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed,
            spare: None,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f32 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let u1 = self.uniform().max(f64::MIN_POSITIVE);
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * t.sin()) as f32);
        (r * t.cos()) as f32
    }

    /// The state, for checkpoints.
    pub fn state(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_the_allocator_refuses_is_an_error_naming_the_tensor() {
        let spec = |name: &str, shape: Vec<usize>| ParamSpec {
            name: name.into(),
            shape,
            kind: ParamKind::Embedding,
            unit: 0,
        };
        let err = ParamStore::try_zeros(vec![
            spec("small", vec![4]),
            spec("model.embed_tokens.weight", vec![1 << 31, 1 << 31]),
        ])
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`model.embed_tokens.weight`") && msg.contains("not enough memory"),
            "{msg}"
        );
        let ok = ParamStore::try_zeros(vec![spec("small", vec![2, 3])]).unwrap();
        assert_eq!(ok.numel(), 6);
        let cfg = LlamaConfig::tiny(10, 8, 2, 2, 1);
        assert_eq!(
            ParamStore::try_init_llama(&cfg, 3).unwrap(),
            ParamStore::init_llama(&cfg, 3)
        );
    }
}
