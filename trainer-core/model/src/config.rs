//! A decoder-only `config.json` of one of the supported architectures ([`Arch`]: Llama,
//! Mistral, Qwen2/Qwen2.5, Qwen3), read in both the transformers 4 form (top-level
//! `rope_theta`, `rope_scaling`, `torch_dtype`) and the transformers 5 form (`rope_parameters`
//! holding `rope_theta` and the scaling, `dtype`). Saving writes the transformers 4 form, which
//! transformers 5 reads too (checked with 5.24 and 5.25: bench/python/hf_parity.sh).
//!
//! The four share one block (RMSNorm, rotate-half RoPE, GQA, SwiGLU) and differ in a few
//! switches that [`LlamaConfig`] carries: biases on the attention projections (Qwen2: q/k/v;
//! Llama and Qwen3 with `attention_bias`: q/k/v/o), per-head RMSNorm of q and k (Qwen3), and
//! Mistral's sliding-window attention (a mask: [`crate::model::Inputs`]). Each architecture
//! keeps transformers' own defaults for absent fields (Qwen3's `head_dim` is 128, Mistral's
//! `sliding_window` is 4096).

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{ModelError, Result};

/// Storage dtype of weights in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// IEEE float32.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE float16.
    F16,
}

impl DType {
    /// The transformers spelling (`float32`, `bfloat16`, `float16`).
    pub fn hf_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// Parses a transformers spelling (also `fp32`, `bf16`, `fp16`, `float`, `half`).
    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "float32" | "fp32" | "f32" | "float" => Some(DType::F32),
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Llama 3.1's `rope_type: llama3` wavelength-dependent scaling.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_max_position_embeddings: usize,
    },
    /// `rope_type: linear`: positions divided by `factor`.
    Linear {
        /// `factor`.
        factor: f64,
    },
}

/// A supported `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama` (`LlamaForCausalLM`).
    Llama,
    /// `mistral` (`MistralForCausalLM`): Llama's block with a sliding attention window.
    Mistral,
    /// `qwen2` (`Qwen2ForCausalLM`, also Qwen2.5): biases on q/k/v.
    Qwen2,
    /// `qwen3` (`Qwen3ForCausalLM`, dense): per-head RMSNorm of q and k, explicit `head_dim`.
    Qwen3,
}

impl Arch {
    /// Every supported architecture.
    pub const ALL: [Arch; 4] = [Arch::Llama, Arch::Mistral, Arch::Qwen2, Arch::Qwen3];

    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// The transformers class (`architectures[0]`).
    pub fn class_name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// Parses a `model_type`.
    pub fn parse(model_type: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.model_type() == model_type)
    }
}

/// The largest size [`LlamaConfig::validate`] accepts for one dimension (vocabulary, hidden,
/// intermediate, layers, heads, head_dim): 2^24, far above any released model.
pub const MAX_DIM: u64 = 1 << 24;

/// The most parameters [`LlamaConfig::validate`] accepts: 2^40 (about 1.1 × 10^12, 4 TiB in
/// fp32), above the largest dense open models.
pub const MAX_PARAMETERS: u64 = 1 << 40;

/// The architecture of a supported decoder-only causal LM ([`Arch`]). Named for the family's
/// first member; every architecture uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type`.
    pub arch: Arch,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (defaults to `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// `head_dim` (defaults to `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// `rope_scaling` / `rope_parameters`.
    pub rope_scaling: RopeScaling,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `tie_word_embeddings`.
    pub tie_word_embeddings: bool,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (the first, when a list).
    pub eos_token_id: Option<u32>,
    /// Every `eos_token_id` (a list in Llama 3.1 files).
    pub eos_token_ids: Vec<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
    /// `initializer_range` (std of the normal init).
    pub initializer_range: f64,
    /// `torch_dtype` / `dtype`: the dtype the weights are stored in.
    pub dtype: DType,
    /// `hidden_act` (only `silu` is supported).
    pub hidden_act: String,
    /// Biases on q_proj, k_proj and v_proj (Qwen2 always; Llama and Qwen3 with
    /// `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on o_proj (Llama and Qwen3 with `attention_bias`; never Qwen2).
    pub o_bias: bool,
    /// Per-head RMSNorm of q and k over `head_dim` before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Mistral's `sliding_window`: a query attends to the keys less than this many tokens
    /// behind it (None: full causal attention).
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// A small config for tests and the quickstart.
    pub fn tiny(
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        LlamaConfig {
            arch: Arch::Llama,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: hidden * 8 / 3,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            initializer_range: 0.02,
            dtype: DType::F32,
            hidden_act: "silu".into(),
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            sliding_window: None,
        }
    }

    /// A small config of architecture `arch` with that architecture's switches: Qwen2's q/k/v
    /// biases, Qwen3's q/k norms (and `head_dim` 2 × hidden / heads, as real Qwen3 models have
    /// it ≠ hidden / heads), no sliding window.
    pub fn tiny_arch(
        arch: Arch,
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> Self {
        let mut c = Self::tiny(vocab_size, hidden, layers, heads, kv_heads);
        c.arch = arch;
        match arch {
            Arch::Llama | Arch::Mistral => {}
            Arch::Qwen2 => c.qkv_bias = true,
            Arch::Qwen3 => {
                c.qk_norm = true;
                c.head_dim = 2 * hidden / heads;
            }
        }
        c
    }

    /// Reads `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| e.in_file(path))
    }

    /// Parses the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| ModelError::Config {
            file: None,
            field: "(json)".into(),
            problem: e.to_string(),
        })?;
        let obj = v
            .as_object()
            .ok_or_else(|| cfg_err("(top level)", "not a JSON object"))?;
        Self::from_map(obj)
    }

    fn from_map(o: &Map<String, Value>) -> Result<Self> {
        // An absent model_type reads as Llama (older hand-written configs).
        let arch = match opt_str(o, "model_type")? {
            None => Arch::Llama,
            Some(t) => Arch::parse(&t).ok_or_else(|| {
                cfg_err(
                    "model_type",
                    &format!(
                        "`{t}` is not supported (supported: {})",
                        Arch::ALL.map(Arch::model_type).join(", ")
                    ),
                )
            })?,
        };
        if opt_bool(o, "mlp_bias")? == Some(true) {
            return Err(cfg_err("mlp_bias", "biases in the MLP are not supported"));
        }
        // transformers' attention classes: Llama and Qwen3 bias all four projections when
        // attention_bias is set; Qwen2 always biases q/k/v and never o; Mistral never.
        let attention_bias = opt_bool(o, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Llama | Arch::Qwen3 => (attention_bias, attention_bias),
            Arch::Qwen2 => (true, false),
            Arch::Mistral => (false, false),
        };
        let sliding_window = match arch {
            // MistralConfig's default window is 4096 when the key is absent; null means none.
            Arch::Mistral => match o.get("sliding_window") {
                None => Some(4096),
                Some(Value::Null) => None,
                Some(_) => opt_usize(o, "sliding_window")?,
            },
            // Qwen's window applies only to layers from max_window_layers on (layer_types):
            // one mask per layer kind, which the model does not have.
            Arch::Qwen2 | Arch::Qwen3 => {
                if opt_bool(o, "use_sliding_window")? == Some(true) {
                    return Err(cfg_err(
                        "use_sliding_window",
                        &format!(
                            "sliding-window attention in {} is not supported (set it to false)",
                            arch.model_type()
                        ),
                    ));
                }
                None
            }
            Arch::Llama => None,
        };
        if sliding_window == Some(0) {
            return Err(cfg_err("sliding_window", "must be positive"));
        }
        if let Some(Value::Array(kinds)) = o.get("layer_types")
            && let Some(k) = kinds.iter().find(|k| k.as_str() != Some("full_attention"))
        {
            return Err(cfg_err(
                "layer_types",
                &format!("{k} layers are not supported (only full_attention)"),
            ));
        }
        let hidden_act = opt_str(o, "hidden_act")?.unwrap_or_else(|| "silu".into());
        if hidden_act != "silu" {
            return Err(cfg_err(
                "hidden_act",
                &format!("`{hidden_act}` is not supported (silu)"),
            ));
        }
        let hidden_size = req_usize(o, "hidden_size")?;
        let heads = req_usize(o, "num_attention_heads")?;
        let kv_heads = opt_usize(o, "num_key_value_heads")?.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(cfg_err(
                "num_key_value_heads",
                &format!("{kv_heads} does not divide num_attention_heads {heads}"),
            ));
        }
        let head_dim = match opt_usize(o, "head_dim")? {
            Some(d) => d,
            // Qwen3Config's default; the others derive it.
            None if arch == Arch::Qwen3 => 128,
            None => {
                if !hidden_size.is_multiple_of(heads) {
                    return Err(cfg_err(
                        "head_dim",
                        &format!(
                            "absent and hidden_size {hidden_size} is not a multiple of {heads} heads"
                        ),
                    ));
                }
                hidden_size / heads
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(cfg_err(
                "head_dim",
                &format!("{head_dim} is odd (RoPE rotates pairs)"),
            ));
        }
        // transformers 5: rope_parameters {rope_type, rope_theta, factor, ...}.
        let rope_params = o.get("rope_parameters").filter(|v| !v.is_null());
        let rope_theta = match (opt_f64(o, "rope_theta")?, rope_params) {
            (Some(t), _) => t,
            (None, Some(p)) => p
                .get("rope_theta")
                .map(|v| {
                    v.as_f64()
                        .ok_or_else(|| cfg_err("rope_parameters.rope_theta", "not a number"))
                })
                .transpose()?
                .unwrap_or(10_000.0),
            (None, None) => 10_000.0,
        };
        let scaling_value = o
            .get("rope_scaling")
            .filter(|v| !v.is_null())
            .or(rope_params);
        let scaling_field = if o.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            "rope_scaling"
        } else {
            "rope_parameters"
        };
        let rope_scaling = match scaling_value {
            None => RopeScaling::None,
            Some(v) => parse_scaling(v, scaling_field)?,
        };
        let dtype = match opt_str(o, "dtype")?.or(opt_str(o, "torch_dtype")?) {
            None => DType::F32,
            Some(s) => DType::parse(&s)
                .ok_or_else(|| cfg_err("torch_dtype", &format!("unknown dtype `{s}`")))?,
        };
        let eos_token_ids: Vec<u32> = match o.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|n| n as u32)
                        .ok_or_else(|| cfg_err("eos_token_id", "not a token id"))
                })
                .collect::<Result<_>>()?,
            Some(x) => vec![
                x.as_u64()
                    .ok_or_else(|| cfg_err("eos_token_id", "not a token id"))?
                    as u32,
            ],
        };
        let default_max_positions = match arch {
            Arch::Llama => 2048,
            Arch::Mistral => 4096 * 32,
            Arch::Qwen2 | Arch::Qwen3 => 32768,
        };
        let cfg = LlamaConfig {
            arch,
            vocab_size: req_usize(o, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(o, "intermediate_size")?,
            num_hidden_layers: req_usize(o, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(o, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(o, "max_position_embeddings")?
                .unwrap_or(default_max_positions),
            tie_word_embeddings: match o.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| cfg_err("tie_word_embeddings", "not a boolean"))?,
            },
            bos_token_id: opt_usize(o, "bos_token_id")?.map(|n| n as u32),
            eos_token_id: eos_token_ids.first().copied(),
            eos_token_ids,
            pad_token_id: opt_usize(o, "pad_token_id")?.map(|n| n as u32),
            initializer_range: opt_f64(o, "initializer_range")?.unwrap_or(0.02),
            dtype,
            hidden_act,
            qkv_bias,
            o_bias,
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks sizes that every part of the model relies on, and that the model is one a host
    /// could hold: every size at most [`MAX_DIM`], at most [`MAX_PARAMETERS`] parameters (so
    /// that nothing is allocated for an absurd config).
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(cfg_err(name, "must be positive"));
            }
            if v as u64 > MAX_DIM {
                return Err(cfg_err(
                    name,
                    &format!("{v} is over the limit of {MAX_DIM}"),
                ));
            }
        }
        let n = self.parameter_count();
        if n > u128::from(MAX_PARAMETERS) {
            return Err(cfg_err(
                "num_hidden_layers",
                &format!(
                    "vocab_size {}, hidden_size {}, intermediate_size {} and num_hidden_layers {} \
                     make {n} parameters ({:.0} GiB in fp32), over the limit of {MAX_PARAMETERS}",
                    self.vocab_size,
                    self.hidden_size,
                    self.intermediate_size,
                    self.num_hidden_layers,
                    n as f64 * 4.0 / f64::from(1u32 << 30),
                ),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(cfg_err(
                "num_key_value_heads",
                "must divide num_attention_heads",
            ));
        }
        // The switches must be ones the architecture's transformers class has, or a saved
        // config.json would describe another model.
        let (qkv, o) = (self.qkv_bias, self.o_bias);
        let biases_ok = match self.arch {
            Arch::Llama | Arch::Qwen3 => qkv == o,
            Arch::Qwen2 => qkv && !o,
            Arch::Mistral => !qkv && !o,
        };
        if !biases_ok {
            return Err(cfg_err(
                "attention_bias",
                &format!(
                    "q/k/v bias {qkv}, o bias {o} is not a {} attention",
                    self.arch.model_type()
                ),
            ));
        }
        if self.qk_norm != (self.arch == Arch::Qwen3) {
            return Err(cfg_err(
                "model_type",
                "per-head q/k norms belong to qwen3 and only qwen3",
            ));
        }
        if self.sliding_window.is_some() && self.arch != Arch::Mistral {
            return Err(cfg_err(
                "sliding_window",
                &format!("not supported for {}", self.arch.model_type()),
            ));
        }
        if self.rms_norm_eps.is_nan() || self.rms_norm_eps <= 0.0 {
            return Err(cfg_err("rms_norm_eps", "must be positive"));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(cfg_err("rope_theta", "must be positive"));
        }
        Ok(())
    }

    /// Parameters of the model, computed from the sizes without overflow whatever they are
    /// (equal to [`num_parameters`](Self::num_parameters) for a valid config).
    pub fn parameter_count(&self) -> u128 {
        let [v, h, i, l, heads, kv_heads, d] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        ]
        .map(|x| x as u128);
        let (q, kv) = (heads * d, kv_heads * d);
        let qkv_bias = if self.qkv_bias { q + 2 * kv } else { 0 };
        let o_bias = if self.o_bias { h } else { 0 };
        let qk_norm = if self.qk_norm { 2 * d } else { 0 };
        let block = 2 * h + qk_norm + h * (q + 2 * kv) + q * h + qkv_bias + o_bias + 3 * h * i;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + l * block + h + head
    }

    /// Parameters of the model.
    pub fn num_parameters(&self) -> usize {
        crate::params::param_specs(self)
            .iter()
            .map(|s| s.numel())
            .sum()
    }

    /// Model FLOPs of training on one token (forward and backward) at sequence length
    /// `seq_len`, the numerator of MFU (model FLOPs utilisation), counted as torchtitan does:
    ///
    /// - every parameter that multiplies an activation costs 2 FLOPs per token forward, 2 for
    ///   the input gradient and, when it trains, 2 for its own gradient: `6 N` trained, `4 N`
    ///   frozen. The embedding table is a lookup and is left out, unless it is tied to the LM
    ///   head (then it counts once, as the head). Norm weights and biases are counted too (too
    ///   few to matter).
    /// - attention's two activation-by-activation products (`Q Kᵀ` and `P V`), `2 × 2 × heads ×
    ///   head_dim × seq_len` per token and layer forward, twice that backward: `12 × layers ×
    ///   heads × head_dim × seq_len`.
    ///
    /// Causal masking (half the scores are skipped) and recomputation are not counted, so the
    /// figure is comparable across runs and implementations.
    ///
    /// `lora_adapter`: `None` trains every parameter; `Some(n)` trains `n` adapter parameters
    /// on top of the frozen base (`4 N_base + 6 n`).
    pub fn training_flops_per_token(&self, seq_len: usize, lora_adapter: Option<usize>) -> f64 {
        let embedding = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * self.hidden_size
        };
        let dense = self.num_parameters().saturating_sub(embedding) as f64;
        let params = match lora_adapter {
            None => 6.0 * dense,
            Some(adapter) => 4.0 * dense + 6.0 * adapter as f64,
        };
        let attention = 12.0
            * self.num_hidden_layers as f64
            * self.num_attention_heads as f64
            * self.head_dim as f64
            * seq_len as f64;
        params + attention
    }

    /// The `config.json` text transformers reads (both generations) for this architecture
    /// (`model_type`, `architectures` and the architecture's own keys), weights in `dtype`.
    pub fn to_json(&self, dtype: DType) -> String {
        let mut o = Map::new();
        o.insert("architectures".into(), json!([self.arch.class_name()]));
        o.insert("model_type".into(), json!(self.arch.model_type()));
        o.insert("attention_dropout".into(), json!(0.0));
        o.insert("hidden_act".into(), json!("silu"));
        match self.arch {
            Arch::Llama => {
                o.insert("attention_bias".into(), json!(self.qkv_bias));
                o.insert("mlp_bias".into(), json!(false));
                o.insert("pretraining_tp".into(), json!(1));
            }
            Arch::Mistral => {
                o.insert("sliding_window".into(), json!(self.sliding_window));
            }
            Arch::Qwen2 => {
                o.insert("use_sliding_window".into(), json!(false));
                o.insert("sliding_window".into(), Value::Null);
                o.insert("max_window_layers".into(), json!(self.num_hidden_layers));
            }
            Arch::Qwen3 => {
                o.insert("attention_bias".into(), json!(self.qkv_bias));
                o.insert("use_sliding_window".into(), json!(false));
                o.insert("sliding_window".into(), Value::Null);
                o.insert("max_window_layers".into(), json!(self.num_hidden_layers));
            }
        }
        o.insert("vocab_size".into(), json!(self.vocab_size));
        o.insert("hidden_size".into(), json!(self.hidden_size));
        o.insert("intermediate_size".into(), json!(self.intermediate_size));
        o.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        o.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        o.insert(
            "num_key_value_heads".into(),
            json!(self.num_key_value_heads),
        );
        // Qwen2Config has no head_dim field (its attention reads one if present): write it
        // only where it is not the derived hidden / heads.
        if self.arch != Arch::Qwen2 || self.head_dim * self.num_attention_heads != self.hidden_size
        {
            o.insert("head_dim".into(), json!(self.head_dim));
        }
        o.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        o.insert("rope_theta".into(), json!(self.rope_theta));
        o.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        o.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        o.insert("initializer_range".into(), json!(self.initializer_range));
        o.insert("use_cache".into(), json!(true));
        o.insert("torch_dtype".into(), json!(dtype.hf_name()));
        if let Some(b) = self.bos_token_id {
            o.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_ids.len() {
            0 => {}
            1 => {
                o.insert("eos_token_id".into(), json!(self.eos_token_ids[0]));
            }
            _ => {
                o.insert("eos_token_id".into(), json!(self.eos_token_ids));
            }
        }
        if let Some(p) = self.pad_token_id {
            o.insert("pad_token_id".into(), json!(p));
        }
        let scaling = match self.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        };
        o.insert("rope_scaling".into(), scaling);
        serde_json::to_string_pretty(&Value::Object(o)).expect("json") + "\n"
    }
}

fn parse_scaling(v: &Value, field: &str) -> Result<RopeScaling> {
    let o = v
        .as_object()
        .ok_or_else(|| cfg_err(field, "not an object"))?;
    let kind = o
        .get("rope_type")
        .or_else(|| o.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        o.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| cfg_err(&format!("{field}.{k}"), "missing or not a number"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        other => Err(cfg_err(
            &format!("{field}.rope_type"),
            &format!("`{other}` is not supported (default, llama3, linear)"),
        )),
    }
}

fn cfg_err(field: &str, problem: &str) -> ModelError {
    ModelError::Config {
        file: None,
        field: field.into(),
        problem: problem.into(),
    }
}

fn req_usize(o: &Map<String, Value>, k: &str) -> Result<usize> {
    opt_usize(o, k)?.ok_or_else(|| cfg_err(k, "missing"))
}

fn opt_usize(o: &Map<String, Value>, k: &str) -> Result<Option<usize>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| cfg_err(k, &format!("`{v}` is not a non-negative integer"))),
    }
}

fn opt_f64(o: &Map<String, Value>, k: &str) -> Result<Option<f64>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| cfg_err(k, &format!("`{v}` is not a number"))),
    }
}

fn opt_bool(o: &Map<String, Value>, k: &str) -> Result<Option<bool>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| cfg_err(k, &format!("`{v}` is not a boolean"))),
    }
}

fn opt_str(o: &Map<String, Value>, k: &str) -> Result<Option<String>> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_str()
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| cfg_err(k, &format!("`{v}` is not a string"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// vocab 10, hidden 8, 2 layers, 2 heads of 4, 1 kv head, intermediate 8 × 8 / 3 = 21.
    /// A block: 2 norms of 8; q 8×8, k 4×8, v 4×8, o 8×8; gate, up, down 21×8 each.
    fn tiny() -> LlamaConfig {
        LlamaConfig::tiny(10, 8, 2, 2, 1)
    }

    #[test]
    fn absurd_sizes_are_refused_naming_the_field() {
        let text = |hidden: u64, vocab: u64, layers: u64| {
            format!(
                r#"{{"hidden_size": {hidden}, "intermediate_size": 16, "num_hidden_layers": {layers},
                    "num_attention_heads": 2, "vocab_size": {vocab}}}"#
            )
        };
        for (t, field) in [
            (text(1 << 40, 8, 1), "hidden_size"),
            (text(8, 1 << 40, 1), "vocab_size"),
            (text(8, 8, 1 << 40), "num_hidden_layers"),
            // Each size within MAX_DIM, the parameters over MAX_PARAMETERS.
            (text(1 << 20, 1 << 20, 1), "num_hidden_layers"),
        ] {
            match LlamaConfig::from_json_str(&t) {
                Err(ModelError::Config {
                    field: f, problem, ..
                }) => {
                    assert_eq!(f, field, "{t}");
                    assert!(problem.contains("limit"), "{problem}");
                }
                other => panic!("{t}: {other:?}"),
            }
        }
        // A large but plausible model passes (nothing is allocated to validate it).
        let big = LlamaConfig::from_json_str(&text(16384, 256_000, 120)).unwrap();
        assert_eq!(big.parameter_count(), big.num_parameters() as u128);
    }

    #[test]
    fn parameter_count_equals_the_specs() {
        for arch in Arch::ALL {
            let mut c = LlamaConfig::tiny_arch(arch, 10, 8, 2, 2, 1);
            assert_eq!(c.parameter_count(), c.num_parameters() as u128, "{arch:?}");
            c.tie_word_embeddings = true;
            assert_eq!(c.parameter_count(), c.num_parameters() as u128, "{arch:?}");
        }
        let mut c = tiny();
        c.qkv_bias = true;
        c.o_bias = true;
        assert_eq!(c.parameter_count(), c.num_parameters() as u128);
    }

    #[test]
    fn flops_per_token_match_a_hand_count() {
        let c = tiny();
        let block = 2 * 8 + (64 + 32 + 32 + 64) + 3 * (21 * 8);
        let embedding = 10 * 8;
        let head = 10 * 8;
        assert_eq!(c.num_parameters(), embedding + 2 * block + 8 + head);
        let dense = (2 * block + 8 + head) as f64;
        let attention = 12.0 * 2.0 * 2.0 * 4.0 * 16.0;
        assert_eq!(
            c.training_flops_per_token(16, None),
            6.0 * dense + attention
        );
        // LoRA: the base is frozen (forward and input gradient), the adapters train.
        assert_eq!(
            c.training_flops_per_token(16, Some(100)),
            4.0 * dense + 600.0 + attention
        );
        // Tied: the table is the head, counted once; the FLOPs are the same.
        let mut t = tiny();
        t.tie_word_embeddings = true;
        assert_eq!(t.num_parameters(), embedding + 2 * block + 8);
        assert_eq!(
            t.training_flops_per_token(16, None),
            c.training_flops_per_token(16, None)
        );
        // Attention grows with the sequence, the parameter term does not.
        assert_eq!(
            c.training_flops_per_token(32, None) - c.training_flops_per_token(16, None),
            attention
        );
    }
}
