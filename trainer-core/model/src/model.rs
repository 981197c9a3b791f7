//! The Llama forward pass on any burn backend, built from a [`ParamStore`].
//!
//! Every parameter enters the graph as a flat 1-D leaf (reshaped where used), so its gradient
//! comes back flat, in the store's layout. The pass is split by unit — embeddings, each block,
//! final norm + head — so that an engine can run it unit by unit.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::fused::{self, AttnDims, Fused};
use crate::lora::LoraConfig;
use crate::params::{ParamSpec, ParamStore, Rng};
use crate::rope;

/// Label value that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Additive mask value for disallowed attention (finite, so a row never becomes NaN).
const MASK_VALUE: f32 = -1.0e9;

/// One batch's inputs on the device: ids, RoPE tables and the attention mask.
#[derive(Debug, Clone)]
pub struct Inputs<B: Backend> {
    /// Rows.
    pub batch: usize,
    /// Columns.
    pub seq: usize,
    /// `[B, T]` token ids.
    pub ids: Tensor<B, 2, Int>,
    /// `[B·T, heads · head_dim]` cos table for the queries ([`rope::head_tables`]).
    pub cos_q: Tensor<B, 2>,
    /// `[B·T, heads · head_dim]` signed sin table for the queries.
    pub sin_q: Tensor<B, 2>,
    /// `[B·T, kv_heads · head_dim]` cos table for the keys.
    pub cos_k: Tensor<B, 2>,
    /// `[B·T, kv_heads · head_dim]` signed sin table for the keys.
    pub sin_k: Tensor<B, 2>,
    /// `[B, heads, T, T]` additive mask: 0 where `j ≤ i` in the same non-zero segment, and
    /// `i − j < sliding_window` where the config has a window (Mistral); expanded over heads
    /// so that adding it to the scores is a contiguous, same-shape op.
    pub mask: Tensor<B, 4>,
}

impl<B: Backend> Inputs<B> {
    /// Builds the inputs of a `[batch, seq]` row-major batch. `segments` (0 = padding) confine
    /// attention to a packed sample; `positions` restart per segment.
    pub fn new(
        cfg: &LlamaConfig,
        batch: usize,
        seq: usize,
        ids: &[u32],
        positions: &[u32],
        segments: &[u32],
        device: &B::Device,
    ) -> Result<Self> {
        let n = batch * seq;
        if ids.len() != n || positions.len() != n || segments.len() != n {
            return Err(ModelError::Invalid(format!(
                "inputs of a {batch}x{seq} batch need {n} ids/positions/segments, got {}/{}/{}",
                ids.len(),
                positions.len(),
                segments.len()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(ModelError::Invalid(format!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        let inv = rope::inv_freq(cfg);
        let d = cfg.head_dim;
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let (cos_q, sin_q) = rope::head_tables(&inv, positions, nh);
        let (cos_k, sin_k) = rope::head_tables(&inv, positions, nkv);
        let mut mask = vec![MASK_VALUE; batch * nh * seq * seq];
        for b in 0..batch {
            let seg = &segments[b * seq..(b + 1) * seq];
            let first = &mut mask[b * nh * seq * seq..(b * nh + 1) * seq * seq];
            for i in 0..seq {
                let row = &mut first[i * seq..(i + 1) * seq];
                // Mistral's window: keys less than `window` tokens behind the query (as
                // transformers' `kv_idx > q_idx - sliding_window`).
                let first_key = cfg.sliding_window.map_or(0, |w| (i + 1).saturating_sub(w));
                for j in first_key..=i {
                    if (seg[i] != 0 && seg[j] == seg[i]) || i == j {
                        row[j] = 0.0;
                    }
                }
            }
            let (head0, rest) =
                mask[b * nh * seq * seq..(b + 1) * nh * seq * seq].split_at_mut(seq * seq);
            for h in rest.chunks_mut(seq * seq) {
                h.copy_from_slice(head0);
            }
        }
        let ids_i: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        Ok(Inputs {
            batch,
            seq,
            ids: Tensor::from_data(TensorData::new(ids_i, [batch, seq]), device),
            cos_q: Tensor::from_data(TensorData::new(cos_q, [n, nh * d]), device),
            sin_q: Tensor::from_data(TensorData::new(sin_q, [n, nh * d]), device),
            cos_k: Tensor::from_data(TensorData::new(cos_k, [n, nkv * d]), device),
            sin_k: Tensor::from_data(TensorData::new(sin_k, [n, nkv * d]), device),
            mask: Tensor::from_data(TensorData::new(mask, [batch, nh, seq, seq]), device),
        })
    }

    /// The float inputs (RoPE tables, mask) in `dtype`.
    pub fn cast(&self, dtype: DType) -> Self {
        Inputs {
            batch: self.batch,
            seq: self.seq,
            ids: self.ids.clone(),
            cos_q: self.cos_q.clone().cast(dtype),
            sin_q: self.sin_q.clone().cast(dtype),
            cos_k: self.cos_k.clone().cast(dtype),
            sin_k: self.sin_k.clone().cast(dtype),
            mask: self.mask.clone().cast(dtype),
        }
    }

    /// A batch of unpacked rows: positions 0.., every non-pad token in segment 1; `lens[b]`
    /// tokens are real in row `b`.
    pub fn causal(
        cfg: &LlamaConfig,
        batch: usize,
        seq: usize,
        ids: &[u32],
        lens: &[usize],
        device: &B::Device,
    ) -> Result<Self> {
        let mut pos = vec![0u32; batch * seq];
        let mut seg = vec![0u32; batch * seq];
        for b in 0..batch {
            for t in 0..lens[b].min(seq) {
                pos[b * seq + t] = t as u32;
                seg[b * seq + t] = 1;
            }
        }
        Self::new(cfg, batch, seq, ids, &pos, &seg, device)
    }
}

/// A LoRA adapter on a linear: `A` `[r, in]`, `B` `[out, r]` and the scale `alpha / r`.
type Adapter<B> = (Tensor<B, 2>, Tensor<B, 2>, f32);

/// A linear layer: frozen or trainable `[out, in]` weight, an optional `[out]` bias and an
/// optional LoRA adapter.
#[derive(Debug, Clone)]
struct Lin<B: Backend> {
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
    lora: Option<Adapter<B>>,
}

impl<B: Fused> Lin<B> {
    fn forward(&self, x: Tensor<B, 2>, dropout: Option<&mut Dropout>) -> Tensor<B, 2> {
        let mut y = B::linear_rows(x.clone(), self.w.clone());
        if let Some(b) = &self.b {
            // Broadcast over the rows; autodiff sums the rows back into the bias gradient.
            y = y + b.clone().unsqueeze::<2>();
        }
        match &self.lora {
            None => y,
            Some((a, b, scale)) => {
                let xin = match dropout {
                    Some(d) if d.p > 0.0 => d.apply(x),
                    _ => x,
                };
                y + B::linear_rows(B::linear_rows(xin, a.clone()), b.clone()).mul_scalar(*scale)
            }
        }
    }
}

/// Seeded inverted dropout with host-generated masks (deterministic across processes).
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    rng: Rng,
}

impl Dropout {
    /// Dropout with probability `p`, masks drawn from `seed`.
    pub fn new(p: f64, seed: u64) -> Self {
        Dropout {
            p,
            rng: Rng::new(seed),
        }
    }

    fn apply<B: Backend>(&mut self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, m] = x.dims();
        let keep = 1.0 / (1.0 - self.p) as f32;
        let mask: Vec<f32> = (0..n * m)
            .map(|_| {
                if self.rng.uniform() < self.p {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let device = x.device();
        let dtype = x.dtype();
        x * Tensor::<B, 2>::from_data(TensorData::new(mask, [n, m]), &device).cast(dtype)
    }
}

/// The weights of one decoder block.
#[derive(Debug, Clone)]
pub struct Block<B: Backend> {
    ln1: Tensor<B, 1>,
    ln2: Tensor<B, 1>,
    /// Qwen3's per-head RMSNorm weights of q and k (`[head_dim]`).
    qk_norm: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
    q: Lin<B>,
    k: Lin<B>,
    v: Lin<B>,
    o: Lin<B>,
    gate: Lin<B>,
    up: Lin<B>,
    down: Lin<B>,
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * w` (one fused node:
/// [`fused::rms_norm`]).
pub fn rms_norm<B: Fused, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    fused::rms_norm(x, w, eps)
}

/// Rotate-half RoPE of `[N, heads · head_dim]` activations with [`rope::head_tables`]
/// tables: `x·cos + swap_halves(x)·sin_signed`, one fused node ([`Fused::rope_rows`]).
pub fn apply_rope<B: Fused>(
    x: Tensor<B, 2>,
    cos: Tensor<B, 2>,
    sin_signed: Tensor<B, 2>,
    head_dim: usize,
) -> Tensor<B, 2> {
    B::rope_rows(x, cos, sin_signed, head_dim)
}

/// Scaled dot-product attention of `[B, H, T, d]` queries over `[B, KV, T, d]` keys/values
/// (grouped-query: each KV head serves `H / KV` query heads) with an additive `[B, H, T, T]`
/// mask. Returns `[B, H, T, d]`. The model calls [`Fused::attention_rows`] on its
/// `[B·T, heads·d]` rows directly; this is the same op on head-major tensors.
pub fn attention<B: Fused>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let [b, h, t, d] = q.dims();
    let kv = k.dims()[1];
    let dims = AttnDims {
        batch: b,
        seq: t,
        heads: h,
        kv_heads: kv,
        head_dim: d,
    };
    let rows = |x: Tensor<B, 4>, n: usize| x.swap_dims(1, 2).reshape([b * t, n * d]);
    B::attention_rows(rows(q, h), rows(k, kv), rows(v, kv), mask, dims)
        .reshape([b, t, h, d])
        .swap_dims(1, 2)
}

impl<B: Fused> Block<B> {
    /// Builds a block from its unit's tensors: `specs` and `leaves` in store order
    /// ([`crate::params::param_specs`] of one block), `adapter(k)` the LoRA adapter of the
    /// unit's k-th tensor (a linear weight) if it has one, `cast` applied to every leaf.
    fn from_unit(
        specs: &[ParamSpec],
        leaves: &[Tensor<B, 1>],
        adapter: impl Fn(usize) -> Option<Adapter<B>>,
        cast: impl Fn(Tensor<B, 1>) -> Tensor<B, 1>,
    ) -> Result<Self> {
        // The name inside the block: `model.layers.{l}.` stripped.
        let local = |s: &ParamSpec| s.name.splitn(4, '.').nth(3).unwrap_or("").to_string();
        let find = |name: &str| specs.iter().position(|s| local(s) == name);
        let need = |name: &str| {
            find(name).ok_or_else(|| {
                ModelError::Invalid(format!(
                    "block unit has no `{name}` (first tensor `{}`)",
                    specs.first().map(|s| s.name.as_str()).unwrap_or("none")
                ))
            })
        };
        let one = |name: &str| need(name).map(|k| cast(leaves[k].clone()));
        let lin = |group: &str, module: &str| -> Result<Lin<B>> {
            let k = need(&format!("{group}.{module}.weight"))?;
            let shape = &specs[k].shape;
            Ok(Lin {
                w: cast(leaves[k].clone()).reshape([shape[0], shape[1]]),
                b: find(&format!("{group}.{module}.bias")).map(|j| cast(leaves[j].clone())),
                lora: adapter(k),
            })
        };
        let qk_norm = match find("self_attn.q_norm.weight") {
            None => None,
            Some(_) => Some((
                one("self_attn.q_norm.weight")?,
                one("self_attn.k_norm.weight")?,
            )),
        };
        Ok(Block {
            ln1: one("input_layernorm.weight")?,
            ln2: one("post_attention_layernorm.weight")?,
            qk_norm,
            q: lin("self_attn", "q_proj")?,
            k: lin("self_attn", "k_proj")?,
            v: lin("self_attn", "v_proj")?,
            o: lin("self_attn", "o_proj")?,
            gate: lin("mlp", "gate_proj")?,
            up: lin("mlp", "up_proj")?,
            down: lin("mlp", "down_proj")?,
        })
    }

    /// The block on `[B·T, hidden]` activations.
    pub fn forward(
        &self,
        cfg: &LlamaConfig,
        x: Tensor<B, 2>,
        inp: &Inputs<B>,
        mut dropout: Option<&mut Dropout>,
    ) -> Tensor<B, 2> {
        let (b, t) = (inp.batch, inp.seq);
        let (nh, nkv, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let h = rms_norm(x.clone(), self.ln1.clone(), cfg.rms_norm_eps);
        let mut q = self.q.forward(h.clone(), dropout.as_deref_mut());
        let mut k = self.k.forward(h.clone(), dropout.as_deref_mut());
        if let Some((qn, kn)) = &self.qk_norm {
            // Qwen3: RMSNorm of each head's d values, after the projection, before RoPE.
            let n = b * t;
            let eps = cfg.rms_norm_eps;
            q = rms_norm(q.reshape([n, nh, d]), qn.clone(), eps).reshape([n, nh * d]);
            k = rms_norm(k.reshape([n, nkv, d]), kn.clone(), eps).reshape([n, nkv * d]);
        }
        let q = apply_rope(q, inp.cos_q.clone(), inp.sin_q.clone(), d);
        let k = apply_rope(k, inp.cos_k.clone(), inp.sin_k.clone(), d);
        let v = self.v.forward(h, dropout.as_deref_mut());
        let dims = AttnDims {
            batch: b,
            seq: t,
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
        };
        let o = B::attention_rows(q, k, v, inp.mask.clone(), dims);
        let x = x + self.o.forward(o, dropout.as_deref_mut());
        let h = rms_norm(x.clone(), self.ln2.clone(), cfg.rms_norm_eps);
        let g = self.gate.forward(h.clone(), dropout.as_deref_mut());
        let u = self.up.forward(h, dropout.as_deref_mut());
        x + self.down.forward(B::swiglu(g, u), dropout)
    }
}

/// The model on a device: its weights as graph leaves.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    cfg: LlamaConfig,
    /// Flat leaves of the base parameters, in store order.
    base: Vec<Tensor<B, 1>>,
    /// Flat leaves of the adapters, in adapter-store order.
    adapters: Vec<Tensor<B, 1>>,
    embed: Tensor<B, 2>,
    blocks: Vec<Block<B>>,
    norm: Tensor<B, 1>,
    head: Option<Tensor<B, 2>>,
    compute: Option<DType>,
}

impl<B: Fused> Llama<B> {
    /// As [`Llama::new`], computing in `compute` (bf16/f16) from the f32 leaves: each weight is
    /// a differentiable cast of its f32 leaf, so gradients arrive in f32 (mixed precision with
    /// f32 master weights). RMSNorm, softmax and the loss run in f32.
    pub fn new_mixed(
        cfg: &LlamaConfig,
        base: &ParamStore,
        train_base: bool,
        lora: Option<(&LoraConfig, &ParamStore)>,
        device: &B::Device,
        compute: Option<DType>,
    ) -> Result<Self> {
        let mut m = Self::new(cfg, base, train_base, lora, device)?;
        let Some(dt) = compute.filter(|d| *d != DType::F32) else {
            return Ok(m);
        };
        let c2 = |t: &mut Tensor<B, 2>| *t = t.clone().cast(dt);
        let c1 = |t: &mut Tensor<B, 1>| *t = t.clone().cast(dt);
        c2(&mut m.embed);
        c1(&mut m.norm);
        if let Some(h) = m.head.as_mut() {
            c2(h);
        }
        for b in &mut m.blocks {
            c1(&mut b.ln1);
            c1(&mut b.ln2);
            if let Some((qn, kn)) = b.qk_norm.as_mut() {
                c1(qn);
                c1(kn);
            }
            for lin in [
                &mut b.q,
                &mut b.k,
                &mut b.v,
                &mut b.o,
                &mut b.gate,
                &mut b.up,
                &mut b.down,
            ] {
                c2(&mut lin.w);
                if let Some(bias) = lin.b.as_mut() {
                    c1(bias);
                }
                if let Some((a, bb, _)) = lin.lora.as_mut() {
                    c2(a);
                    c2(bb);
                }
            }
        }
        m.compute = Some(dt);
        Ok(m)
    }

    /// Builds the model from `base` (trainable when `train_base`) and optional LoRA adapters
    /// (always trainable).
    pub fn new(
        cfg: &LlamaConfig,
        base: &ParamStore,
        train_base: bool,
        lora: Option<(&LoraConfig, &ParamStore)>,
        device: &B::Device,
    ) -> Result<Self> {
        let expected = crate::params::param_specs(cfg);
        if base.specs() != expected.as_slice() {
            return Err(ModelError::Invalid(
                "parameter store does not match the model config".into(),
            ));
        }
        let leaf = |data: &[f32], grad: bool| {
            let t = Tensor::<B, 1>::from_data(TensorData::new(data.to_vec(), [data.len()]), device);
            if grad { t.require_grad() } else { t }
        };
        let base_leaves: Vec<Tensor<B, 1>> =
            base.iter().map(|(_, d)| leaf(d, train_base)).collect();
        let adapter_leaves: Vec<Tensor<B, 1>> = match lora {
            Some((_, store)) => store.iter().map(|(_, d)| leaf(d, true)).collect(),
            None => Vec::new(),
        };
        // Map base tensor index → (A leaf, B leaf) position.
        let mut lora_of: Vec<Option<(usize, usize, usize)>> = vec![None; base.len()];
        let mut rank_scale = (0usize, 1.0f32);
        if let Some((lc, store)) = lora {
            let specs = lc.specs(cfg);
            if store.len() != specs.len() {
                return Err(ModelError::Invalid(
                    "adapter store does not match the LoRA config".into(),
                ));
            }
            for (j, pair) in specs.chunks(2).enumerate() {
                lora_of[pair[0].1] = Some((2 * j, 2 * j + 1, lc.rank));
            }
            rank_scale = (lc.rank, lc.scale());
        }
        let specs = base.specs();
        let take2 = |idx: usize| -> Tensor<B, 2> {
            let s = &specs[idx].shape;
            base_leaves[idx].clone().reshape([s[0], s[1]])
        };
        let adapter = |idx: usize| -> Option<Adapter<B>> {
            lora_of[idx].map(|(a, b, r)| {
                let out = specs[idx].shape[0];
                let inp = specs[idx].shape[1];
                (
                    adapter_leaves[a].clone().reshape([r, inp]),
                    adapter_leaves[b].clone().reshape([out, r]),
                    rank_scale.1,
                )
            })
        };
        let embed = take2(0);
        let mut it = 1usize;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let n = specs[it..].iter().take_while(|s| s.unit == l + 1).count();
            let lo = it;
            blocks.push(Block::from_unit(
                &specs[lo..lo + n],
                &base_leaves[lo..lo + n],
                |k| adapter(lo + k),
                |t| t,
            )?);
            it += n;
        }
        let norm = base_leaves[it].clone();
        it += 1;
        let head = (!cfg.tie_word_embeddings).then(|| take2(it));
        let _ = rank_scale.0;
        Ok(Llama {
            cfg: cfg.clone(),
            base: base_leaves,
            adapters: adapter_leaves,
            embed,
            blocks,
            norm,
            head,
            compute: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Embeddings: `[B·T, hidden]`.
    pub fn embed(&self, inp: &Inputs<B>) -> Tensor<B, 2> {
        embed_rows(self.embed.clone(), inp, self.cfg.hidden_size)
    }

    /// Block `l`.
    pub fn block(
        &self,
        l: usize,
        x: Tensor<B, 2>,
        inp: &Inputs<B>,
        dropout: Option<&mut Dropout>,
    ) -> Tensor<B, 2> {
        self.blocks[l].forward(&self.cfg, x, inp, dropout)
    }

    /// Final norm and head: logits `[B·T, vocab]`, always f32.
    pub fn head(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let w = self.head.clone().unwrap_or_else(|| self.embed.clone());
        head_logits(&self.cfg, self.norm.clone(), w, x, self.compute)
    }

    /// The compute dtype (None: f32).
    pub fn compute_dtype(&self) -> Option<DType> {
        self.compute
    }

    /// Logits `[B·T, vocab]` of the whole model.
    pub fn forward(&self, inp: &Inputs<B>, mut dropout: Option<&mut Dropout>) -> Tensor<B, 2> {
        let cast;
        let inp = match self.compute {
            Some(dt) => {
                cast = inp.cast(dt);
                &cast
            }
            None => inp,
        };
        let mut x = self.embed(inp);
        for l in 0..self.blocks.len() {
            x = self.block(l, x, inp, dropout.as_deref_mut());
        }
        self.head(x)
    }

    /// Flat base leaves (store order).
    pub fn base_leaves(&self) -> &[Tensor<B, 1>] {
        &self.base
    }

    /// Flat adapter leaves (adapter-store order).
    pub fn adapter_leaves(&self) -> &[Tensor<B, 1>] {
        &self.adapters
    }
}

/// Embedding lookup of `inp`'s ids: `[B·T, hidden]`.
fn embed_rows<B: Backend>(w: Tensor<B, 2>, inp: &Inputs<B>, hidden: usize) -> Tensor<B, 2> {
    burn::tensor::module::embedding(w, inp.ids.clone()).reshape([inp.batch * inp.seq, hidden])
}

/// Final RMSNorm and the `[vocab, hidden]` head: logits `[B·T, vocab]`, always f32.
fn head_logits<B: Fused>(
    cfg: &LlamaConfig,
    norm: Tensor<B, 1>,
    w: Tensor<B, 2>,
    x: Tensor<B, 2>,
    compute: Option<DType>,
) -> Tensor<B, 2> {
    let logits = B::linear_rows(rms_norm(x, norm, cfg.rms_norm_eps), w);
    if compute.is_some() {
        logits.cast(DType::F32)
    } else {
        logits
    }
}

/// The weights of one flat unit (embeddings, one block, or final norm + head) without the rest
/// of the model: what a fully sharded engine gathers, runs and drops one at a time.
#[derive(Debug, Clone)]
pub enum UnitWeights<B: Backend> {
    /// Unit 0: the `[vocab, hidden]` table.
    Embed(Tensor<B, 2>),
    /// Units 1..=L: a decoder block.
    Block(Box<Block<B>>),
    /// Unit L + 1: the final norm and the head (the embedding table when tied).
    Head { norm: Tensor<B, 1>, w: Tensor<B, 2> },
}

impl<B: Fused> UnitWeights<B> {
    /// Builds unit `unit` from its flat leaves in store order ([`crate::params::param_specs`]
    /// with `spec.unit == unit`). `tied` is the embedding leaf, needed by the head unit of a
    /// model with tied embeddings. `compute` casts the weights (mixed precision).
    pub fn new(
        cfg: &LlamaConfig,
        unit: usize,
        leaves: &[Tensor<B, 1>],
        tied: Option<&Tensor<B, 1>>,
        compute: Option<DType>,
    ) -> Result<Self> {
        let specs: Vec<_> = crate::params::param_specs(cfg)
            .into_iter()
            .filter(|s| s.unit == unit)
            .collect();
        if specs.is_empty() || specs.len() != leaves.len() {
            return Err(ModelError::Invalid(format!(
                "unit {unit}: {} leaves for {} parameters",
                leaves.len(),
                specs.len()
            )));
        }
        let cast = |t: Tensor<B, 1>| match compute {
            Some(dt) if dt != DType::F32 => t.cast(dt),
            _ => t,
        };
        let two = |i: usize| -> Tensor<B, 2> {
            let s = &specs[i].shape;
            cast(leaves[i].clone()).reshape([s[0], s[1]])
        };
        let last = cfg.num_hidden_layers + 1;
        Ok(if unit == 0 {
            UnitWeights::Embed(two(0))
        } else if unit < last {
            UnitWeights::Block(Box::new(Block::from_unit(&specs, leaves, |_| None, cast)?))
        } else {
            let w = if cfg.tie_word_embeddings {
                let t = tied.ok_or_else(|| {
                    ModelError::Invalid("tied head unit needs the embedding leaf".into())
                })?;
                cast(t.clone()).reshape([cfg.vocab_size, cfg.hidden_size])
            } else {
                two(1)
            };
            UnitWeights::Head {
                norm: cast(leaves[0].clone()),
                w,
            }
        })
    }

    /// Runs the unit: the embeddings of `inp` (x is ignored), a block on `x`, or the head's f32
    /// logits of `x`. `inp` must already be in the compute dtype ([`Inputs::cast`]).
    pub fn forward(
        &self,
        cfg: &LlamaConfig,
        x: Option<Tensor<B, 2>>,
        inp: &Inputs<B>,
        compute: Option<DType>,
    ) -> Tensor<B, 2> {
        match self {
            UnitWeights::Embed(w) => embed_rows(w.clone(), inp, cfg.hidden_size),
            UnitWeights::Block(b) => b.forward(cfg, x.expect("block input"), inp, None),
            UnitWeights::Head { norm, w } => head_logits(
                cfg,
                norm.clone(),
                w.clone(),
                x.expect("head input"),
                compute,
            ),
        }
    }
}

/// Summed cross-entropy of `[N, V]` logits against `targets` (next-token labels,
/// [`IGNORE_INDEX`] = no loss), divided by `normalizer` (the number of targets of the whole
/// global batch, so that gradients do not depend on how the batch is split). One fused node
/// ([`Fused::cross_entropy_rows`]): backward keeps the logits and one log-sum-exp per row.
pub fn cross_entropy<B: Fused>(
    logits: Tensor<B, 2>,
    targets: &[i64],
    normalizer: f64,
) -> Tensor<B, 1> {
    let [n, _v] = logits.dims();
    assert_eq!(n, targets.len(), "one target per logits row");
    B::cross_entropy_rows(logits, targets, normalizer)
}

/// Reads a 1-D tensor to the host as f32.
pub fn to_vec<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 tensor data")
}

/// Gradients of the leaves after `backward`, flat, in leaf order (zeros for an unused leaf).
pub fn leaf_grads<B: AutodiffBackend>(
    leaves: &[Tensor<B, 1>],
    grads: &B::Gradients,
) -> Vec<Vec<f32>> {
    leaves
        .iter()
        .map(|leaf| match leaf.grad(grads) {
            Some(g) => g
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("f32 gradient"),
            None => vec![0.0; leaf.dims()[0]],
        })
        .collect()
}
