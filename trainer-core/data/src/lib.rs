//! Training data for Ringmaster's trainer: everything between files on disk and the
//! `(input_ids, labels, segment_ids, position_ids)` tensors a Llama-family model trains on.
//! It follows LLaMA-Factory's behaviour where one exists (dataset formats, chat templates,
//! "train on responses only" masking, `cutoff_len` truncation) and never depends on burn.
//!
//! A typical SFT pipeline:
//!
//! 1. [`tokenizer::Tokenizer::from_dir`] (a Hugging Face `tokenizer.json`, plus
//!    `tokenizer_config.json` for bos/eos/pad when present), or
//!    [`tokenizer::train_bpe`] for a byte-level BPE trained offline from a corpus;
//! 2. [`dataset::load_records`] reads an alpaca or sharegpt `.json`/`.jsonl` file (or plain
//!    text for `stage: pt`) into [`dataset::Record`]s;
//! 3. [`template::Template::by_name`] (`llama3`, `qwen`, `qwen3`, `qwen3_nothink`, `mistral`,
//!    `alpaca`, `default`, `empty`) renders
//!    each conversation into token ids with labels masked to [`IGNORE_INDEX`] on prompts;
//! 4. [`preprocess::preprocess`] applies the stage and `cutoff_len`, counts the rows left
//!    without a trainable label (kept, as LLaMA-Factory keeps them), and optionally packs
//!    them as LLaMA-Factory does ([`packing::pack`] for sft, concatenation for pt);
//! 5. [`sampler::Sampler`] gives a seeded, epoch-aware order whose global batches depend only
//!    on the seed and the global batch size, and splits each global batch over ranks and
//!    gradient-accumulation micro-steps; [`batch::collate`] pads a micro-batch.
//!
//! [`synthetic`] generates the quickstart's learnable task (multi-digit addition as alpaca
//! records) and scores exact-match accuracy.
//!
//! ```
//! use ringmaster_data::batch::collate;
//! use ringmaster_data::dataset::Record;
//! use ringmaster_data::preprocess::{PreprocessConfig, Stage, preprocess};
//! use ringmaster_data::sampler::{RankLayout, Sampler, SamplerConfig};
//! use ringmaster_data::synthetic::{AdditionConfig, generate_addition};
//! use ringmaster_data::template::Template;
//! use ringmaster_data::tokenizer::{BpeTrainingOptions, train_bpe};
//!
//! let split = generate_addition(&AdditionConfig { train_size: 64, eval_size: 8, ..Default::default() })?;
//! let records: Vec<Record> = split.train.iter().map(|r| Record::Conversation(r.to_conversation())).collect();
//! let template = Template::by_name("llama3")?;
//! let corpus: Vec<&str> = records.iter().flat_map(|r| r.texts()).collect();
//! let tokenizer = train_bpe(corpus.into_iter(), &BpeTrainingOptions::for_template(&template, 300))?;
//! let data = preprocess(&records, &template, &tokenizer, &PreprocessConfig::new(Stage::Sft, 128))?;
//! assert_eq!(data.stats.no_target, 0);
//!
//! // 2 ranks × 2 accumulation steps × 4 per device = global batch 16.
//! let sampler = Sampler::new(SamplerConfig::new(data.samples.len(), 16, 42))?;
//! let layout = RankLayout::new(4, 2, 2)?;
//! let epoch = sampler.epoch(0);
//! let mine = epoch.micro_batch(0, &layout, /* rank */ 1, /* micro-step */ 0)?;
//! let batch = collate(mine.iter().map(|&i| &data.samples[i]), tokenizer.pad_id_or_eos(), 8);
//! assert_eq!(batch.batch_size, 4);
//! assert!(batch.num_targets() > 0);
//! # Ok::<(), ringmaster_data::DataError>(())
//! ```
//!
//! # Conventions
//! - Labels are *aligned* with `input_ids` (the Hugging Face convention): the loss shifts by one,
//!   so the logits at position `t` are scored against `labels[t + 1]`. [`IGNORE_INDEX`] (-100)
//!   marks positions without loss.
//! - Segment ids: `0` is padding (attends to nothing, is attended by nothing); tokens attend
//!   causally only to earlier tokens with the same non-zero segment id. Position ids restart at
//!   0 in every segment.
//!
//! # Layout
//! - [`error`]: [`DataError`], the one error type, every variant naming its file, record, field
//!   or token.
//! - [`tokenizer`]: Hugging Face `tokenizer.json` loading and saving, encode/decode, bos/eos/pad
//!   lookup by name or id, and offline byte-level BPE training.
//! - [`dataset`]: alpaca, sharegpt and plain-text readers for `.json`, `.jsonl` and `.txt`.
//! - [`mix`]: LLaMA-Factory's per-dataset row selection (`num_samples`, `max_samples`) and
//!   dataset merging (`mix_strategy`, `interleave_probs`).
//! - [`dataset_info`]: `dataset_info.json` entries as LLaMA-Factory reads them (local files).
//! - [`template`]: chat templates and the SFT/PT encoders (masking, `cutoff_len`).
//! - [`tools`]: tool lists rendered into the system block (the qwen tool format).
//! - [`batch`]: [`batch::Sample`], [`batch::Batch`] and [`batch::collate`].
//! - [`packing`]: packing sft rows into fixed-length blocks with segment and position ids.
//! - [`preprocess`]: records → samples for a stage (pt packing included), with statistics.
//! - [`sampler`]: the deterministic, world-size independent distributed sampler and its
//!   resumable position.
//! - [`synthetic`]: the addition task generator and the exact-match helper.
//! - [`rng`]: the small, version-stable PRNG behind every seeded choice in this crate.

pub mod batch;
pub mod dataset;
pub mod dataset_info;
pub mod error;
pub mod mix;
pub mod packing;
pub mod preprocess;
pub mod rng;
pub mod sampler;
pub mod synthetic;
pub mod template;
pub mod tokenizer;
pub mod tools;

pub use error::{DataError, Location, Result};

/// The label of a position that contributes no loss (PyTorch's `CrossEntropyLoss` default, as
/// used by Hugging Face and LLaMA-Factory).
pub const IGNORE_INDEX: i64 = -100;
