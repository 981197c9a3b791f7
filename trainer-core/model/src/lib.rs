//! Ringmaster's Llama-family causal LM on burn 0.21.
//!
//! - [`config`]: `config.json` in the transformers 4 and 5 forms.
//! - [`params`]: the parameters as named flat fp32 buffers in Hugging Face layout.
//! - [`hf`]: safetensors directories (single file or sharded), fp32/bf16/fp16.
//! - [`fused`], [`kernels`], [`attention`]: softmax, cross-entropy, SwiGLU, RMSNorm and
//!   attention as single graph nodes with their own backward, and their f32 CPU kernels.
//! - [`model`]: the forward pass (rotate-half RoPE, GQA, RMSNorm, SwiGLU) and the loss.
//! - [`lora`]: PEFT-format LoRA adapters.
//! - [`generate`]: greedy decoding.

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

pub use config::{DType, LlamaConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use lora::LoraConfig;
pub use model::{IGNORE_INDEX, Inputs, Llama, UnitWeights};
pub use params::{ParamSpec, ParamStore};

/// The CPU backend (chosen by measurement: docs/benchmarks.md).
pub type CpuBackend = burn::backend::Flex;
/// The CPU backend with autodiff.
pub type CpuAutodiff = burn::backend::Autodiff<CpuBackend>;
