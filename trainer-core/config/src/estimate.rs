//! Memory estimates per plan, behind `ringctl estimate`.
//!
//! Model states use DeepSpeed's estimators exactly (`deepspeed/runtime/zero/stage_1_and_2.py`
//! `estimate_zero2_model_states_mem_needs` and `stage3.py`
//! `estimate_zero3_model_states_mem_needs`, DeepSpeed master as of 2025), with the same float
//! arithmetic and truncation, so that the figures equal DeepSpeed's for the same inputs.
//! "CPU" is per node, as DeepSpeed's `per CPU` column is. Ψ = total parameters, N = all GPUs,
//! G = GPUs per node, M = nodes, f = additional_buffer_factor (1.5):
//!
//! | plan | GPU | CPU per node |
//! |---|---|---|
//! | ZeRO-2 | 2Ψ + int(18Ψ/N) | Ψ·4·G·f |
//! | ZeRO-2 + offload optimizer | 2Ψ | Ψ·max(4N, 16)·f |
//! | ZeRO-3 | 4·largest_layer + int(18Ψ/N) | zero_init: largest_layer·4·G·f, else Ψ·4·G·f |
//! | ZeRO-3 + offload optimizer | 4·largest_layer + int(2Ψ/N) | zero_init: Ψ·16/M·f, else Ψ·max(4G, 16/M)·f |
//! | ZeRO-3 + offload optimizer + params | 4·largest_layer | zero_init: Ψ·18/M·f, else Ψ·max(4G, 18/M)·f |
//!
//! (Older DeepSpeed releases wrote ZeRO-2 without offload as 4Ψ + int(16Ψ/N); the current code
//! counts 2 bytes of 16-bit parameters replicated and 18 bytes per parameter partitioned: 16-bit
//! and 32-bit gradients, fp32 master, Adam's two moments.)
//!
//! DeepSpeed has no estimator for stages 0 and 1; we use the ZeRO paper's mixed-precision
//! convention (16-bit parameters 2Ψ + 16-bit gradients 2Ψ + fp32 master and Adam moments 12Ψ):
//! DDP (ZeRO-0) 16Ψ, ZeRO-1 4Ψ + int(12Ψ/N); CPU per node as ZeRO-2 without offload (every
//! process loads the fp32 model once: Ψ·4·G·f).
//! HYBRID_SHARD (shown for several nodes) is ZeRO-3 with one node as the shard group (N = G,
//! M = 1).
//!
//! Activations (16-bit, per GPU) for micro-batch B and sequence L, from Korthikanti et al.,
//! "Reducing Activation Recomputation in Large Transformer Models" (2022), eq. 1, without
//! recomputation: per layer B·L·h·(34 + 5·a·L/h) bytes (h hidden, a attention heads), plus
//! 4·B·L·V bytes for the fp32 logits of the loss (V vocabulary). DDP and ZeRO-1/2 keep every
//! layer's activations; ZeRO-3 / HYBRID_SHARD in Ringmaster run unit by unit and recompute in
//! backward (DESIGN.md), so they keep each layer's 16-bit input (2·B·L·h) plus one layer's
//! activations and the logits.
//!
//! Products saturate at `u64::MAX` instead of overflowing, so that absurd inputs read "does not
//! fit"; [`ModelDims::from_hf_config`] also bounds each size by [`MAX_MODEL_DIM`] and the
//! total by [`MAX_TOTAL_PARAMS`].

use serde::Serialize;
use serde_json::Value;

use crate::ConfigError;
use crate::plan::Plan;

/// DeepSpeed's default `additional_buffer_factor`.
pub const ADDITIONAL_BUFFER_FACTOR: f64 = 1.5;

/// How model-config files are named in messages.
pub const MODEL_FILE: &str = "model config";

/// The largest size a model config may give for one dimension (hidden, intermediate, vocabulary,
/// layers, heads, head_dim): 2^24, far above any released model.
pub const MAX_MODEL_DIM: u64 = 1 << 24;

/// The most parameters a model config may describe: 2^50 (about 10^15).
pub const MAX_TOTAL_PARAMS: u64 = 1 << 50;

/// Bytes needed, as DeepSpeed's estimators return them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemNeeds {
    /// Per node (DeepSpeed's "per CPU").
    pub cpu: u64,
    /// Per GPU.
    pub gpu: u64,
}

/// `estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node, num_nodes,
/// cpu_offload, additional_buffer_factor)`.
pub fn zero2_model_states_mem_needs(
    total_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    cpu_offload: bool,
    additional_buffer_factor: f64,
) -> MemNeeds {
    let total_gpus = num_nodes.saturating_mul(num_gpus_per_node);
    let p = total_params as f64;
    let (gpu, cpu) = if cpu_offload {
        let gpu = total_params.saturating_mul(2);
        let cpu = total_params.saturating_mul(total_gpus.saturating_mul(4).max(16)) as f64
            * additional_buffer_factor;
        (gpu, cpu)
    } else {
        let gpu = total_params
            .saturating_mul(2)
            .saturating_add((18.0 * p / total_gpus as f64) as u64);
        let cpu = host_copies(total_params, num_gpus_per_node, additional_buffer_factor);
        (gpu, cpu as f64)
    };
    MemNeeds {
        cpu: cpu as u64,
        gpu,
    }
}

/// `estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, num_gpus_per_node,
/// num_nodes, cpu_offload, cpu_offload_params, zero_init, additional_buffer_factor)`.
#[allow(clippy::too_many_arguments)]
pub fn zero3_model_states_mem_needs(
    total_params: u64,
    largest_layer_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    cpu_offload: bool,
    cpu_offload_params: bool,
    zero_init: bool,
    additional_buffer_factor: f64,
) -> MemNeeds {
    let total_gpus = num_nodes.saturating_mul(num_gpus_per_node) as f64;
    let gpus_factor = 1.0 / num_nodes as f64;
    let largest_layer_memory = largest_layer_params.saturating_mul(4);
    let p = total_params as f64;
    let g4 = num_gpus_per_node.saturating_mul(4) as f64;
    let (gpu, cpu) = if cpu_offload {
        if cpu_offload_params {
            let cpu = if zero_init {
                total_params.saturating_mul(18) as f64 * gpus_factor * additional_buffer_factor
            } else {
                p * g4.max(18.0 * gpus_factor) * additional_buffer_factor
            };
            (largest_layer_memory, cpu)
        } else {
            let gpu = largest_layer_memory.saturating_add((2.0 * p / total_gpus) as u64);
            let cpu = if zero_init {
                total_params.saturating_mul(16) as f64 * gpus_factor * additional_buffer_factor
            } else {
                p * g4.max(16.0 * gpus_factor) * additional_buffer_factor
            };
            (gpu, cpu)
        }
    } else {
        let gpu = largest_layer_memory.saturating_add((18.0 * p / total_gpus) as u64);
        let cpu = if zero_init {
            host_copies(
                largest_layer_params,
                num_gpus_per_node,
                additional_buffer_factor,
            )
        } else {
            host_copies(total_params, num_gpus_per_node, additional_buffer_factor)
        };
        let cpu = cpu as f64;
        (gpu, cpu)
    };
    MemNeeds {
        cpu: cpu as u64,
        gpu,
    }
}

/// DDP (ZeRO-0): 16Ψ per GPU; CPU per node as ZeRO-2 without offload.
pub fn ddp_model_states_mem_needs(
    total_params: u64,
    num_gpus_per_node: u64,
    additional_buffer_factor: f64,
) -> MemNeeds {
    MemNeeds {
        gpu: total_params.saturating_mul(16),
        cpu: host_copies(total_params, num_gpus_per_node, additional_buffer_factor),
    }
}

/// ZeRO-1: 4Ψ + int(12Ψ/N) per GPU; CPU per node as ZeRO-2 without offload.
pub fn zero1_model_states_mem_needs(
    total_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    additional_buffer_factor: f64,
) -> MemNeeds {
    let total_gpus = num_nodes.saturating_mul(num_gpus_per_node) as f64;
    MemNeeds {
        gpu: total_params
            .saturating_mul(4)
            .saturating_add((12.0 * total_params as f64 / total_gpus) as u64),
        cpu: host_copies(total_params, num_gpus_per_node, additional_buffer_factor),
    }
}

/// `params`·4·G·f: an fp32 copy per process of a node, as DeepSpeed computes it (the integer
/// product, then the float factor, truncated).
fn host_copies(params: u64, num_gpus_per_node: u64, additional_buffer_factor: f64) -> u64 {
    (params.saturating_mul(4).saturating_mul(num_gpus_per_node) as f64 * additional_buffer_factor)
        as u64
}

/// The shape of a Llama-family model, as a Hugging Face `config.json` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelDims {
    pub name: String,
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub head_dim: u64,
    pub vocab_size: u64,
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v (Qwen2, or Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on o (Llama's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm on q and k per head (Qwen3).
    pub qk_norm: bool,
}

/// Names accepted by [`ModelDims::preset`].
pub const PRESETS: &[&str] = &[
    "llama3-8b",
    "llama3-70b",
    "llama2-7b",
    "qwen2.5-7b",
    "tiny-3.4m",
    "small-124m",
];

impl ModelDims {
    #[allow(clippy::too_many_arguments)]
    fn llama(
        name: &str,
        hidden: u64,
        intermediate: u64,
        layers: u64,
        heads: u64,
        kv_heads: u64,
        vocab: u64,
        tie: bool,
    ) -> ModelDims {
        ModelDims {
            name: name.into(),
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            vocab_size: vocab,
            tie_word_embeddings: tie,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
        }
    }

    /// A named preset (see [`PRESETS`]); case-insensitive.
    pub fn preset(name: &str) -> Option<ModelDims> {
        let n = name.to_ascii_lowercase();
        let m = match n.as_str() {
            "llama3-8b" => ModelDims::llama(&n, 4096, 14336, 32, 32, 8, 128_256, false),
            "llama3-70b" => ModelDims::llama(&n, 8192, 28672, 80, 64, 8, 128_256, false),
            "llama2-7b" => ModelDims::llama(&n, 4096, 11008, 32, 32, 32, 32_000, false),
            "qwen2.5-7b" => ModelDims {
                qkv_bias: true,
                ..ModelDims::llama(&n, 3584, 18944, 28, 28, 4, 152_064, false)
            },
            "tiny-3.4m" => ModelDims::llama(&n, 256, 688, 4, 4, 4, 512, false),
            "small-124m" => ModelDims::llama(&n, 768, 2048, 12, 12, 4, 32_000, false),
            _ => return None,
        };
        Some(m)
    }

    /// Reads a Hugging Face `config.json` of a Llama-family model (llama, mistral, qwen2,
    /// qwen3). Keys it does not need are ignored.
    ///
    /// # Errors
    /// Syntax errors, missing or bad sizes (naming the field), mixture-of-experts configs.
    pub fn from_hf_config(name: &str, text: &str) -> Result<ModelDims, ConfigError> {
        let v: Value = serde_json::from_str(text).map_err(|e| ConfigError::FileSyntax {
            file: MODEL_FILE.into(),
            message: e.to_string(),
        })?;
        let v = match v.get("text_config") {
            Some(t) if v.get("hidden_size").is_none() && t.is_object() => t.clone(),
            _ => v,
        };
        let err = |field: &str, message: String| ConfigError::Invalid {
            file: MODEL_FILE.into(),
            field: field.into(),
            message,
        };
        for moe in ["num_local_experts", "num_experts", "n_routed_experts"] {
            if v.get(moe).and_then(Value::as_u64).is_some_and(|n| n > 1) {
                return Err(err(
                    moe,
                    "mixture-of-experts models are not supported".into(),
                ));
            }
        }
        let size = |field: &str| -> Result<Option<u64>, ConfigError> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => match x.as_u64() {
                    Some(n) if n > MAX_MODEL_DIM => Err(err(
                        field,
                        format!("{n} is over the limit of {MAX_MODEL_DIM}"),
                    )),
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => Err(err(field, format!("expected a positive integer, got {x}"))),
                },
            }
        };
        let need = |field: &str| -> Result<u64, ConfigError> {
            size(field)?.ok_or_else(|| err(field, "missing".into()))
        };
        let flag = |field: &str| v.get(field).and_then(Value::as_bool).unwrap_or(false);
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let head_dim = match size("head_dim")? {
            Some(d) => d,
            // Qwen3Config's default head_dim is 128, not hidden / heads.
            None if model_type == "qwen3" => 128,
            None if hidden.is_multiple_of(heads) => hidden / heads,
            None => {
                return Err(err(
                    "num_attention_heads",
                    format!("hidden_size {hidden} is not a multiple of {heads} heads"),
                ));
            }
        };
        let kv = size("num_key_value_heads")?.unwrap_or(heads);
        if !heads.is_multiple_of(kv) {
            return Err(err(
                "num_key_value_heads",
                format!("{heads} attention heads are not a multiple of {kv} key/value heads"),
            ));
        }
        let dims = ModelDims {
            name: name.into(),
            hidden_size: hidden,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            vocab_size: need("vocab_size")?,
            tie_word_embeddings: flag("tie_word_embeddings"),
            // As transformers' attention classes: Qwen2 always biases q/k/v and never o,
            // Mistral has no biases, Llama and Qwen3 bias all four with attention_bias; only
            // Llama reads mlp_bias.
            qkv_bias: match model_type {
                "qwen2" => true,
                "mistral" => false,
                _ => flag("attention_bias"),
            },
            o_bias: !matches!(model_type, "qwen2" | "mistral") && flag("attention_bias"),
            mlp_bias: matches!(model_type, "llama" | "") && flag("mlp_bias"),
            qk_norm: model_type == "qwen3",
        };
        let total = dims.total_params();
        if total > MAX_TOTAL_PARAMS {
            return Err(err(
                "num_hidden_layers",
                format!(
                    "hidden_size {hidden}, intermediate_size {}, num_hidden_layers {} and \
                     vocab_size {} make {total} parameters, over the limit of {MAX_TOTAL_PARAMS}",
                    dims.intermediate_size, dims.num_hidden_layers, dims.vocab_size
                ),
            ));
        }
        Ok(dims)
    }

    /// The input embedding (vocab × hidden).
    pub fn embedding_params(&self) -> u64 {
        self.vocab_size.saturating_mul(self.hidden_size)
    }

    /// A linear layer between `hidden` and `width` features, plus `bias` bias elements.
    fn linear(&self, width: u64, bias: u64) -> u64 {
        self.hidden_size.saturating_mul(width).saturating_add(bias)
    }

    fn q_params(&self) -> u64 {
        let out = self.num_attention_heads.saturating_mul(self.head_dim);
        self.linear(out, if self.qkv_bias { out } else { 0 })
    }

    fn kv_params(&self) -> u64 {
        let out = self.num_key_value_heads.saturating_mul(self.head_dim);
        self.linear(out, if self.qkv_bias { out } else { 0 })
    }

    fn o_params(&self) -> u64 {
        let width = self.num_attention_heads.saturating_mul(self.head_dim);
        self.linear(width, if self.o_bias { self.hidden_size } else { 0 })
    }

    fn mlp_linear_params(&self, out: u64) -> u64 {
        self.linear(self.intermediate_size, if self.mlp_bias { out } else { 0 })
    }

    /// One transformer block: attention, SwiGLU MLP, two RMSNorms.
    pub fn block_params(&self) -> u64 {
        let attn = self
            .q_params()
            .saturating_add(self.kv_params().saturating_mul(2))
            .saturating_add(self.o_params());
        let mlp = self
            .mlp_linear_params(self.intermediate_size)
            .saturating_mul(2)
            .saturating_add(self.mlp_linear_params(self.hidden_size));
        let qk_norm = if self.qk_norm { self.head_dim } else { 0 };
        let norms = self.hidden_size.saturating_add(qk_norm).saturating_mul(2);
        attn.saturating_add(mlp).saturating_add(norms)
    }

    /// The output projection, counted once more when not tied to the embedding.
    pub fn head_params(&self) -> u64 {
        if self.tie_word_embeddings {
            0
        } else {
            self.embedding_params()
        }
    }

    /// All parameters, tied weights counted once.
    pub fn total_params(&self) -> u64 {
        self.embedding_params()
            .saturating_add(self.num_hidden_layers.saturating_mul(self.block_params()))
            .saturating_add(self.hidden_size)
            .saturating_add(self.head_params())
    }

    /// DeepSpeed's `largest_layer_params` (`model_to_params`): the most parameters one module
    /// holds itself — the embedding / output projection, or the largest single linear.
    pub fn largest_layer_params(&self) -> u64 {
        [
            self.embedding_params(),
            self.q_params(),
            self.kv_params(),
            self.o_params(),
            self.mlp_linear_params(self.intermediate_size),
            self.mlp_linear_params(self.hidden_size),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// The largest flat unit Ringmaster gathers at once: the embedding, a block, or the head
    /// with the final norm.
    pub fn largest_unit_params(&self) -> u64 {
        self.embedding_params()
            .max(self.block_params())
            .max(self.head_params().saturating_add(self.hidden_size))
    }
}

/// Which activations a plan keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActivationMode {
    /// Every layer's activations (no recomputation).
    Full,
    /// Unit by unit with recomputation: every layer's input, one layer's activations.
    UnitRecompute,
}

/// Korthikanti et al. eq. 1: one layer's 16-bit activations, B·L·h·(34 + 5·a·L/h) bytes.
pub fn layer_activation_bytes(m: &ModelDims, micro_batch: u64, seq: u64) -> u64 {
    let attention = m.num_attention_heads.saturating_mul(5).saturating_mul(seq);
    let per_token = m.hidden_size.saturating_mul(34).saturating_add(attention);
    micro_batch.saturating_mul(seq).saturating_mul(per_token)
}

/// Activation bytes per GPU for micro-batch B and sequence L (see the module docs).
pub fn activation_bytes(m: &ModelDims, micro_batch: u64, seq: u64, mode: ActivationMode) -> u64 {
    let layer = layer_activation_bytes(m, micro_batch, seq);
    let tokens = micro_batch.saturating_mul(seq);
    let logits = tokens.saturating_mul(m.vocab_size).saturating_mul(4);
    let kept = match mode {
        ActivationMode::Full => m.num_hidden_layers.saturating_mul(layer),
        ActivationMode::UnitRecompute => m
            .num_hidden_layers
            .saturating_mul(2)
            .saturating_mul(tokens)
            .saturating_mul(m.hidden_size)
            .saturating_add(layer),
    };
    kept.saturating_add(logits)
}

/// What `ringctl estimate` is asked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EstimateInput {
    pub model: ModelDims,
    pub nodes: u64,
    pub gpus_per_node: u64,
    /// Bytes per GPU; `None`: not checked.
    pub gpu_memory: Option<u64>,
    /// Bytes per node; `None`: not checked.
    pub cpu_memory: Option<u64>,
    /// Micro-batch and sequence length for the activation term; `None`: model states only.
    pub activations: Option<(u64, u64)>,
    /// DeepSpeed's `zero_init` for the ZeRO-3 rows (its default: true).
    pub zero_init: bool,
    pub additional_buffer_factor: f64,
}

impl EstimateInput {
    pub fn new(model: ModelDims, nodes: u64, gpus_per_node: u64) -> EstimateInput {
        EstimateInput {
            model,
            nodes,
            gpus_per_node,
            gpu_memory: None,
            cpu_memory: None,
            activations: None,
            zero_init: true,
            additional_buffer_factor: ADDITIONAL_BUFFER_FACTOR,
        }
    }
}

/// One plan's figures, in bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EstimateRow {
    /// "DDP (ZeRO-0)", "ZeRO-2 + offload optimizer", ...
    pub plan: String,
    /// The FSDP strategy with the same effect, if there is one.
    pub fsdp: Option<String>,
    pub stage: u8,
    pub hybrid: bool,
    pub offload_optimizer: bool,
    pub offload_param: bool,
    /// Parameters, gradients and optimizer state per GPU (DeepSpeed's figure).
    pub gpu_model_states_bytes: u64,
    pub gpu_activation_bytes: u64,
    pub gpu_total_bytes: u64,
    pub cpu_per_node_bytes: u64,
    /// `None`: no limit given.
    pub fits_gpu: Option<bool>,
    pub fits_cpu: Option<bool>,
}

impl EstimateRow {
    /// Fits everything that was checked.
    pub fn fits(&self) -> bool {
        self.fits_gpu != Some(false) && self.fits_cpu != Some(false)
    }
}

/// The table: plans fastest first (DeepSpeed's advice: stage 0, 1, 2, 2 + offload, 3,
/// 3 + offloads), and the first that fits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub input: EstimateInput,
    pub total_params: u64,
    pub largest_layer_params: u64,
    pub rows: Vec<EstimateRow>,
    /// Index into `rows`.
    pub recommended: Option<usize>,
}

impl Estimate {
    pub fn recommended_row(&self) -> Option<&EstimateRow> {
        self.recommended.map(|i| &self.rows[i])
    }
}

/// The plans of the table, fastest first; HYBRID_SHARD only for several nodes.
pub fn estimate_plans(nodes: u64) -> Vec<Plan> {
    let mut plans = vec![
        Plan::ddp(),
        Plan::zero1(),
        Plan::zero2(),
        Plan::zero2().with_offload_optimizer(),
    ];
    if nodes > 1 {
        plans.push(Plan::hybrid_shard());
    }
    plans.extend([
        Plan::zero3(),
        Plan::zero3().with_offload_optimizer(),
        Plan::zero3().with_offload_optimizer().with_offload_param(),
    ]);
    plans
}

/// Model-state bytes of one plan (see the module docs).
pub fn model_states(input: &EstimateInput, plan: &Plan) -> MemNeeds {
    let p = input.model.total_params();
    let largest = input.model.largest_layer_params();
    let (g, m, f) = (
        input.gpus_per_node,
        input.nodes,
        input.additional_buffer_factor,
    );
    match plan.stage() {
        0 => ddp_model_states_mem_needs(p, g, f),
        1 => zero1_model_states_mem_needs(p, g, m, f),
        2 => zero2_model_states_mem_needs(
            p,
            g,
            if plan.hybrid { 1 } else { m },
            plan.offload_optimizer,
            f,
        ),
        _ => zero3_model_states_mem_needs(
            p,
            largest,
            g,
            if plan.hybrid { 1 } else { m },
            plan.offload_optimizer,
            plan.offload_param,
            input.zero_init,
            f,
        ),
    }
}

/// The per-plan table and the recommendation.
pub fn estimate(input: &EstimateInput) -> Estimate {
    let rows: Vec<EstimateRow> = estimate_plans(input.nodes)
        .into_iter()
        .map(|plan| {
            let states = model_states(input, &plan);
            let mode = if plan.shard_params {
                ActivationMode::UnitRecompute
            } else {
                ActivationMode::Full
            };
            let act = input
                .activations
                .map_or(0, |(b, l)| activation_bytes(&input.model, b, l, mode));
            let gpu_total = states.gpu.saturating_add(act);
            EstimateRow {
                plan: plan.zero_label(),
                fsdp: plan.fsdp_equivalent(),
                stage: plan.stage(),
                hybrid: plan.hybrid,
                offload_optimizer: plan.offload_optimizer,
                offload_param: plan.offload_param,
                gpu_model_states_bytes: states.gpu,
                gpu_activation_bytes: act,
                gpu_total_bytes: gpu_total,
                cpu_per_node_bytes: states.cpu,
                fits_gpu: input.gpu_memory.map(|g| gpu_total <= g),
                fits_cpu: input.cpu_memory.map(|c| states.cpu <= c),
            }
        })
        .collect();
    let recommended = rows.iter().position(EstimateRow::fits);
    Estimate {
        input: input.clone(),
        total_params: input.model.total_params(),
        largest_layer_params: input.model.largest_layer_params(),
        rows,
        recommended,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn preset_parameter_counts() {
        let cases = [
            ("llama3-8b", 8_030_261_248, 525_336_576),
            ("llama3-70b", 70_553_706_496, 1_050_673_152),
            ("llama2-7b", 6_738_415_616, 131_072_000),
            ("qwen2.5-7b", 7_615_616_512, 544_997_376),
            ("tiny-3.4m", 3_426_560, 176_128),
            ("small-124m", 124_668_672, 24_576_000),
        ];
        for (name, total, largest) in cases {
            let m = ModelDims::preset(name).unwrap();
            assert_eq!(m.total_params(), total, "{name}");
            assert_eq!(m.largest_layer_params(), largest, "{name}");
        }
        assert_eq!(PRESETS.len(), cases.len());
        assert!(ModelDims::preset("LLaMA3-8B").is_some());
        assert!(ModelDims::preset("gpt2").is_none());
        let m = ModelDims::preset("llama3-8b").unwrap();
        assert_eq!(m.block_params(), 218_112_000);
        assert_eq!(m.largest_unit_params(), 525_340_672); // head + final norm
    }

    #[test]
    fn reads_a_hugging_face_config_json() {
        let text = r#"{
          "architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
          "tie_word_embeddings": false, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
          "rope_scaling": {"factor": 8.0, "rope_type": "llama3"}, "head_dim": null
        }"#;
        let m = ModelDims::from_hf_config("Meta-Llama-3-8B", text).unwrap();
        assert_eq!(m.total_params(), 8_030_261_248);
        assert_eq!(m.head_dim, 128);
        let qwen = r#"{"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "vocab_size": 152064, "tie_word_embeddings": false}"#;
        assert_eq!(
            ModelDims::from_hf_config("q", qwen).unwrap().total_params(),
            7_615_616_512
        );
        // Qwen3-0.6B (596,049,920 parameters: q/k norms, tied) with its head_dim left out:
        // Qwen3's default 128, not 1024 / 16.
        let qwen3 = r#"{"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
            "vocab_size": 151936, "tie_word_embeddings": true, "attention_bias": false}"#;
        assert_eq!(
            ModelDims::from_hf_config("q3", qwen3)
                .unwrap()
                .total_params(),
            596_049_920
        );
        // Mistral-7B-v0.1: 7,241,732,096; a stray attention_bias adds nothing.
        let mistral = r#"{"model_type": "mistral", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 32000, "sliding_window": 4096,
            "attention_bias": true}"#;
        assert_eq!(
            ModelDims::from_hf_config("m", mistral)
                .unwrap()
                .total_params(),
            7_241_732_096
        );
        // Tied embeddings count once (Llama 3.2 1B: 1,235,814,400 parameters).
        let tied = r#"{"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "vocab_size": 128256, "tie_word_embeddings": true}"#;
        assert_eq!(
            ModelDims::from_hf_config("t", tied).unwrap().total_params(),
            1_235_814_400
        );
        for (bad, field) in [
            (r#"{"hidden_size": 8}"#, "num_attention_heads"),
            (
                r#"{"hidden_size": 0, "num_attention_heads": 1}"#,
                "hidden_size",
            ),
            (
                r#"{"hidden_size": 8, "num_attention_heads": 2, "num_local_experts": 8}"#,
                "num_local_experts",
            ),
        ] {
            match ModelDims::from_hf_config("x", bad) {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    /// Expected figures computed once with DeepSpeed's own functions (stage_1_and_2.py
    /// `estimate_zero2_model_states_mem_needs`, stage3.py `estimate_zero3_model_states_mem_needs`,
    /// DeepSpeed master), returned as (cpu, gpu).
    #[test]
    fn figures_equal_deepspeeds_estimators() {
        let f = ADDITIONAL_BUFFER_FACTOR;
        let z2 = |p, g, n, off| {
            let m = zero2_model_states_mem_needs(p, g, n, off, f);
            (m.cpu, m.gpu)
        };
        #[allow(clippy::too_many_arguments)]
        let z3 = |p, l, g, n, off, offp, zi| {
            let m = zero3_model_states_mem_needs(p, l, g, n, off, offp, zi, f);
            (m.cpu, m.gpu)
        };
        // llama3-8b on 1 node x 8 GPUs.
        let (p, l) = (8_030_261_248, 525_336_576);
        assert_eq!(z2(p, 8, 1, false), (385_452_539_904, 34_128_610_304));
        assert_eq!(z2(p, 8, 1, true), (385_452_539_904, 16_060_522_496));
        assert_eq!(
            z3(p, l, 8, 1, false, false, true),
            (25_216_155_648, 20_169_434_112)
        );
        assert_eq!(
            z3(p, l, 8, 1, false, false, false),
            (385_452_539_904, 20_169_434_112)
        );
        assert_eq!(
            z3(p, l, 8, 1, true, false, true),
            (192_726_269_952, 4_108_911_616)
        );
        assert_eq!(
            z3(p, l, 8, 1, true, false, false),
            (385_452_539_904, 4_108_911_616)
        );
        assert_eq!(
            z3(p, l, 8, 1, true, true, true),
            (216_817_053_696, 2_101_346_304)
        );
        assert_eq!(
            z3(p, l, 8, 1, true, true, false),
            (385_452_539_904, 2_101_346_304)
        );
        // llama3-70b on 4 nodes x 8 GPUs.
        let (p, l) = (70_553_706_496, 1_050_673_152);
        assert_eq!(z2(p, 8, 4, false), (3_386_577_911_808, 180_793_872_896));
        assert_eq!(z2(p, 8, 4, true), (13_546_311_647_232, 141_107_412_992));
        assert_eq!(
            z3(p, l, 8, 4, false, false, true),
            (50_432_311_296, 43_889_152_512)
        );
        assert_eq!(
            z3(p, l, 8, 4, true, false, true),
            (423_322_238_976, 8_612_299_264)
        );
        assert_eq!(
            z3(p, l, 8, 4, true, true, true),
            (476_237_518_848, 4_202_692_608)
        );
        assert_eq!(
            z3(p, l, 8, 4, true, true, false),
            (3_386_577_911_808, 4_202_692_608)
        );
        // llama3-8b on 3 nodes x 3 GPUs: DeepSpeed's float arithmetic truncates here.
        let (p, l) = (8_030_261_248, 525_336_576);
        assert_eq!(z2(p, 3, 3, false), (144_544_702_464, 32_121_044_992));
        assert_eq!(z2(p, 3, 3, true), (433_634_107_392, 16_060_522_496));
        assert_eq!(
            z3(p, l, 3, 3, false, false, true),
            (9_456_058_368, 18_161_868_800)
        );
        assert_eq!(
            z3(p, l, 3, 3, true, false, true),
            (64_242_089_983, 3_885_848_803)
        );
        assert_eq!(
            z3(p, l, 3, 3, true, true, true),
            (72_272_351_232, 2_101_346_304)
        );
        assert_eq!(
            z3(p, l, 3, 3, true, false, false),
            (144_544_702_464, 3_885_848_803)
        );
        // small-124m on 2 nodes x 2 GPUs.
        let (p, l) = (124_668_672, 24_576_000);
        assert_eq!(z2(p, 2, 2, false), (1_496_024_064, 810_346_368));
        assert_eq!(z2(p, 2, 2, true), (2_992_048_128, 249_337_344));
        assert_eq!(
            z3(p, l, 2, 2, false, false, true),
            (294_912_000, 659_313_024)
        );
        assert_eq!(
            z3(p, l, 2, 2, true, false, true),
            (1_496_024_064, 160_638_336)
        );
        assert_eq!(
            z3(p, l, 2, 2, true, true, false),
            (1_683_027_072, 98_304_000)
        );
    }

    #[test]
    fn absurd_sizes_are_refused_or_saturate_instead_of_overflowing() {
        // A config.json with a 2^40 dimension: refused, naming the field.
        let dims = |hidden: u64, vocab: u64, layers: u64| {
            format!(
                r#"{{"hidden_size": {hidden}, "intermediate_size": 16, "num_hidden_layers": {layers},
                    "num_attention_heads": 1, "vocab_size": {vocab}}}"#
            )
        };
        for (text, field) in [
            (dims(1 << 40, 8, 1), "hidden_size"),
            (dims(8, 1 << 40, 1), "vocab_size"),
            (dims(8, 8, u64::MAX), "num_hidden_layers"),
            // Every size within bounds, the total over MAX_TOTAL_PARAMS.
            (dims(1 << 24, 1 << 24, 1), "num_hidden_layers"),
        ] {
            match ModelDims::from_hf_config("x", &text) {
                Err(e @ ConfigError::Invalid { .. }) => {
                    let ConfigError::Invalid { field: f, .. } = &e else {
                        unreachable!()
                    };
                    assert_eq!(f, field, "{text}: {e}");
                    assert!(e.to_string().contains("limit"), "{e}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        // Cluster and activation sizes far beyond any real one: figures saturate at u64::MAX
        // (nothing fits), no arithmetic overflow.
        let model = ModelDims::preset("llama3-8b").unwrap();
        let mut input = EstimateInput::new(model.clone(), 100_000, 100_000);
        input.gpu_memory = Some(80 * GIB);
        input.cpu_memory = Some(512 * GIB);
        let est = estimate(&input);
        assert!(est.recommended.is_some());
        let z2_offload = &est.rows[3];
        assert_eq!(z2_offload.cpu_per_node_bytes, u64::MAX);
        assert_eq!(z2_offload.fits_cpu, Some(false));
        input.activations = Some((100_000_000, 100_000_000));
        let est = estimate(&input);
        assert!(est.rows.iter().all(|r| r.gpu_total_bytes == u64::MAX));
        assert_eq!(est.recommended, None);
        let mut huge = model;
        huge.hidden_size = 1 << 40;
        huge.vocab_size = 1 << 40;
        assert_eq!(huge.total_params(), u64::MAX);
        let est = estimate(&EstimateInput::new(huge, 1, 8));
        assert!(est.rows.iter().all(|r| r.gpu_model_states_bytes >= 1 << 62));
    }

    #[test]
    fn table_rows_use_the_formulas_and_recommend_the_fastest_that_fits() {
        let model = ModelDims::preset("llama3-8b").unwrap();
        let p = model.total_params();
        let mut input = EstimateInput::new(model.clone(), 1, 8);
        input.gpu_memory = Some(80 * GIB);
        input.cpu_memory = Some(512 * GIB);
        let est = estimate(&input);
        let labels: Vec<&str> = est.rows.iter().map(|r| r.plan.as_str()).collect();
        assert_eq!(
            labels,
            vec![
                "DDP (ZeRO-0)",
                "ZeRO-1",
                "ZeRO-2",
                "ZeRO-2 + offload optimizer",
                "ZeRO-3",
                "ZeRO-3 + offload optimizer",
                "ZeRO-3 + offload optimizer + params",
            ]
        );
        assert_eq!(est.rows[0].gpu_model_states_bytes, 16 * p);
        assert_eq!(est.rows[1].gpu_model_states_bytes, 4 * p + 12 * p / 8);
        assert_eq!(est.rows[2].gpu_model_states_bytes, 34_128_610_304);
        assert_eq!(est.rows[2].cpu_per_node_bytes, 385_452_539_904);
        assert_eq!(est.rows[4].gpu_model_states_bytes, 20_169_434_112);
        assert_eq!(est.rows[6].cpu_per_node_bytes, 216_817_053_696);
        assert!(est.rows.iter().all(|r| r.gpu_activation_bytes == 0));
        // DDP needs 119.7 GiB: ZeRO-1 (41.1 GiB) is the fastest that fits.
        assert_eq!(est.rows[0].fits_gpu, Some(false));
        assert_eq!(est.recommended_row().unwrap().plan, "ZeRO-1");

        // With activations for 1 x 4096 tokens, only the plans that recompute fit.
        input.activations = Some((1, 4096));
        let est = estimate(&input);
        let layer = 4096 * (34 * 4096 + 5 * 32 * 4096);
        let logits = 4 * 4096 * 128_256;
        assert_eq!(est.rows[1].gpu_activation_bytes, 32 * layer + logits);
        assert_eq!(
            est.rows[4].gpu_activation_bytes,
            32 * 2 * 4096 * 4096 + layer + logits
        );
        assert_eq!(est.recommended_row().unwrap().plan, "ZeRO-3");

        // A small host: the offload plans no longer fit on the CPU side.
        input.gpu_memory = Some(8 * GIB);
        input.cpu_memory = Some(64 * GIB);
        let est = estimate(&input);
        assert_eq!(est.recommended, None);
        assert_eq!(est.rows[6].fits_gpu, Some(true)); // 7.93 GiB
        assert_eq!(est.rows[6].fits_cpu, Some(false)); // 201.9 GiB
        // Model states only, 3 GiB GPUs: only offloading the parameters fits.
        input.activations = None;
        input.gpu_memory = Some(3 * GIB);
        input.cpu_memory = Some(256 * GIB);
        let est = estimate(&input);
        assert_eq!(
            est.recommended_row().unwrap().plan,
            "ZeRO-3 + offload optimizer + params"
        );
        input.gpu_memory = Some(4 * GIB);
        let est = estimate(&input);
        assert_eq!(
            est.recommended_row().unwrap().plan,
            "ZeRO-3 + offload optimizer"
        );

        // Several nodes: a HYBRID_SHARD row, ZeRO-3 with one node as the shard group.
        let mut input = EstimateInput::new(model, 2, 8);
        input.gpu_memory = Some(80 * GIB);
        let est = estimate(&input);
        let h = est.rows.iter().position(|r| r.hybrid).unwrap();
        assert_eq!(est.rows[h].plan, "HYBRID_SHARD (ZeRO-3 within a node)");
        assert_eq!(est.rows[h].fsdp.as_deref(), Some("HYBRID_SHARD"));
        assert_eq!(est.rows[h + 1].plan, "ZeRO-3");
        assert_eq!(est.rows[h].gpu_model_states_bytes, 20_169_434_112);
        assert_eq!(
            est.rows[h + 1].gpu_model_states_bytes,
            2_101_346_304 + 18 * p / 16
        );
        assert_eq!(est.rows[h].fits_cpu, None);
    }
}
