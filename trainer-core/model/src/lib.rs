//! Ringmaster's decoder-only causal LMs — Llama, Mistral, Qwen2/Qwen2.5 and dense Qwen3, chosen
//! by `model_type` — on burn 0.21, generic over the burn backend: the
//! parameters as named flat fp32 host buffers, the forward pass and loss, fused operations
//! with their own backward, and Hugging Face and PEFT files. Walls: no crate of ours is a
//! dependency, so the model knows nothing of ranks, plans or collectives; no layout is keyed by
//! burn's `ParamId` (the burn model is built from a [`ParamStore`] for each step).
//!
//! Layout:
//! - [`config`] — `config.json` in the transformers 4 and 5 forms; [`Arch`] and the switches
//!   the architectures differ by (attention biases, Qwen3's q/k norms, Mistral's window).
//! - [`params`] — [`ParamStore`], the canonical state: flat fp32 in Hugging Face layout and
//!   order (biases and q/k norms are tensors of their block's unit).
//! - [`model`] — the forward pass on any burn backend (rotate-half RoPE, GQA, RMSNorm, SwiGLU,
//!   optional biases and per-head q/k RMSNorm, the sliding window as a mask), split by unit
//!   (embeddings, each block, final norm + head) so an engine can run it unit by unit, and the
//!   loss.
//! - [`fused`] — softmax, cross-entropy, SwiGLU, RMSNorm, RoPE, attention and linear as single
//!   graph nodes with their own backward: burn-op defaults on every backend, f32 kernels on flex.
//! - [`kernels`], [`attention`] — flex's f32 kernels on host slices: row passes, and attention
//!   with per-head `gemm` on strided views.
//! - [`rope`] — rotary tables (default, linear and llama3 scaling), computed in f64.
//! - [`hf`] — safetensors directories (single file or sharded), fp32/bf16/fp16.
//! - [`lora`] — PEFT-format LoRA adapters.
//! - [`generate`] — greedy decoding.
//! - [`host`] — process settings for CPU training: malloc tuning, the compute-pool thread.
//! - [`error`] — [`ModelError`]: errors naming the file and the field, tensor or row at fault.

pub mod attention;
pub mod config;
pub mod error;
pub mod fused;
pub mod generate;
pub mod hf;
pub mod host;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod params;
pub mod rope;

pub use config::{Arch, DType, LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use lora::LoraConfig;
pub use model::{IGNORE_INDEX, Inputs, Llama, UnitWeights};
pub use params::{ParamSpec, ParamStore};

/// The CPU backend (chosen by measurement: docs/benchmarks.md).
pub type CpuBackend = burn::backend::Flex;
/// The CPU backend with autodiff.
pub type CpuAutodiff = burn::backend::Autodiff<CpuBackend>;
