//! Records → training samples for a stage, as LLaMA-Factory's dataset processors build them
//! (`data/processor/*.py`), `cutoff_len` being LLaMA-Factory's `data_args.cutoff_len`: the
//! recipe's, less one when packing was asked for ([`PreprocessConfig::llama_factory`]).
//!
//! - `stage: sft`: each conversation through [`Template::encode_supervised`] (responses only,
//!   `cutoff_len` as LLaMA-Factory). A row left with no target (`cutoff_len` cut every
//!   response token, or an empty answer with the `empty` template) is kept, as LLaMA-Factory
//!   keeps it: it adds no loss, and is counted in [`PreprocessStats::no_target`].
//! - `stage: pt`: each record's text (a conversation's first user message, LLaMA-Factory's
//!   `_prompt[0]`). Without packing: bos (when the tokenizer's `add_bos_token` is true), the
//!   text and eos, cut to `cutoff_len`. With packing (`PretrainDatasetProcessor`): the texts + eos of
//!   each preprocessing batch are concatenated and cut into blocks of exactly `cutoff_len`
//!   tokens, the batch's tail that fills no block being dropped; bos is written over each
//!   block's first id when `add_bos_token`; a block is one sequence (attention across the
//!   texts, positions 0..cutoff_len). Labels are the ids, except that ids equal to the pad id
//!   ([`Template::pad_id`]) carry none, as the HF `DataCollatorForLanguageModeling` that
//!   LLaMA-Factory's pt uses masks them (with pad = eos, eos is not trained).
//! - `packing: true` in sft (`PackedSupervisedDatasetProcessor`): within each preprocessing
//!   batch the rows are packed by [`crate::packing::pack`] into `cutoff_len` of room, padded
//!   to `cutoff_len + 1` (the recipe's `cutoff_len`).
//!
//! Preprocessing batches ([`preprocessing_batches`]) are those of the HF datasets `map` that
//! LLaMA-Factory runs: `preprocessing_num_workers` contiguous shards of the rows, each cut into
//! batches of `preprocessing_batch_size` rows. Packing never crosses a batch.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::IGNORE_INDEX;
use crate::batch::Sample;
use crate::dataset::{DatasetFormat, DatasetSpec, Record};
use crate::error::{DataError, Result};
use crate::mix::{DatasetRows, MixConfig, select_and_merge};
use crate::packing::pack;
use crate::template::{Encoded, SupervisedOptions, Template};
use crate::tokenizer::Tokenizer;

/// LLaMA-Factory's default `preprocessing_batch_size`.
pub const DEFAULT_PREPROCESSING_BATCH_SIZE: usize = 1000;

/// Training stage (LLaMA-Factory's `stage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Pre-training on plain text.
    Pt,
    /// Supervised fine-tuning on conversations.
    Sft,
}

/// Names accepted by `Stage::from_str`.
pub const STAGE_NAMES: &[&str] = &["pt", "sft"];

impl FromStr for Stage {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pt" => Ok(Stage::Pt),
            "sft" => Ok(Stage::Sft),
            _ => Err(DataError::UnknownName {
                kind: "stage",
                name: s.to_string(),
                known: STAGE_NAMES.join(", "),
            }),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Pt => "pt",
            Stage::Sft => "sft",
        })
    }
}

/// Data settings of a run (LLaMA-Factory's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreprocessConfig {
    /// `stage`.
    pub stage: Stage,
    /// LLaMA-Factory's `data_args.cutoff_len` as its processors read it: the maximum tokens of
    /// an unpacked row, the room of a packed sft row (padded to one more), the block length of
    /// packed pt. [`PreprocessConfig::llama_factory`] derives it from the recipe.
    pub cutoff_len: usize,
    /// `train_on_prompt` (sft).
    pub train_on_prompt: bool,
    /// `mask_history` (sft).
    pub mask_history: bool,
    /// `packing` (resolved: LLaMA-Factory's default is on for pt).
    pub packing: bool,
    /// `preprocessing_batch_size` (0: a whole shard).
    pub batch_size: usize,
    /// `preprocessing_num_workers` (HF datasets' `num_proc`: the shards; at least 1).
    pub num_proc: usize,
}

impl PreprocessConfig {
    /// A config for `stage` and `cutoff_len` (taken as is), without packing or prompt
    /// training, with LLaMA-Factory's batch size and one shard.
    pub fn new(stage: Stage, cutoff_len: usize) -> Self {
        PreprocessConfig {
            stage,
            cutoff_len,
            train_on_prompt: false,
            mask_history: false,
            packing: false,
            batch_size: DEFAULT_PREPROCESSING_BATCH_SIZE,
            num_proc: 1,
        }
    }

    /// A config from a recipe's `stage`, `cutoff_len`, `packing` and `neat_packing`, by
    /// LLaMA-Factory's rules: `neat_packing` implies packing, and packing given as true (or
    /// implied) decrements `cutoff_len` (`DataArguments.__post_init__`); an absent `packing`
    /// is then resolved to `stage == pt` (`get_train_args`), after that decrement, so a pt
    /// recipe that leaves `packing` out packs blocks of the full `cutoff_len` and one that
    /// writes `packing: true` blocks of `cutoff_len - 1`.
    pub fn llama_factory(
        stage: Stage,
        cutoff_len: usize,
        packing: Option<bool>,
        neat_packing: bool,
    ) -> Self {
        let asked = neat_packing || packing == Some(true);
        let mut cfg = PreprocessConfig::new(stage, cutoff_len.saturating_sub(usize::from(asked)));
        cfg.packing = asked || (packing.is_none() && stage == Stage::Pt);
        cfg
    }

    fn validate(&self) -> Result<()> {
        if self.cutoff_len < 2 {
            return Err(DataError::config(
                "cutoff_len",
                format!(
                    "{} leaves no room for a target token (at least 2; packing takes one \
                     from the recipe's value)",
                    self.cutoff_len
                ),
            ));
        }
        if self.train_on_prompt && self.mask_history {
            return Err(DataError::config(
                "mask_history",
                "cannot be combined with train_on_prompt",
            ));
        }
        Ok(())
    }
}

/// The record ranges that LLaMA-Factory preprocesses together, in order: HF datasets'
/// `Dataset.map(batched=True, batch_size, num_proc)` splits the `n` rows into `num_proc`
/// contiguous shards (`Dataset.shard(contiguous=True)`: `n / num_proc` rows each, the first
/// `n % num_proc` one more; `num_proc` above `n` is lowered to `n`), and each shard into
/// batches of `batch_size` rows from its start (0: the whole shard).
pub fn preprocessing_batches(n: usize, num_proc: usize, batch_size: usize) -> Vec<Range<usize>> {
    let shards = num_proc.clamp(1, n.max(1));
    let (div, rem) = (n / shards, n % shards);
    let mut out = Vec::new();
    for index in 0..shards {
        let start = div * index + index.min(rem);
        let end = start + div + usize::from(index < rem);
        let step = if batch_size == 0 {
            end - start
        } else {
            batch_size
        };
        let mut b = start;
        while b < end {
            out.push(b..(b + step).min(end));
            b += step.max(1);
        }
    }
    out
}

/// What preprocessing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PreprocessStats {
    /// Records read.
    pub records: usize,
    /// Rows before packing (one per record).
    pub samples: usize,
    /// Rows before packing that have no label to train on (kept, as LLaMA-Factory keeps them).
    pub no_target: usize,
    /// Records shortened by `cutoff_len` (never with pt packing, which cuts no text).
    pub truncated: usize,
    /// Tokens dropped by pt packing: each preprocessing batch's tail shorter than a block.
    pub dropped_tokens: usize,
    /// Rows of the result (packed blocks when packing, else `samples`).
    pub rows: usize,
    /// Non-padding tokens of the result.
    pub tokens: usize,
    /// Positions carrying a loss in the result.
    pub target_tokens: usize,
}

/// Preprocessed training data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessedDataset {
    /// The rows, in dataset order (packed: block order).
    pub samples: Vec<Sample>,
    /// What happened on the way.
    pub stats: PreprocessStats,
}

/// Turns records into samples (see the module docs). For sft the template is checked against
/// the tokenizer first, so a missing special token fails before any work; pt only needs the
/// eos it appends (and bos when the tokenizer adds it).
pub fn preprocess(
    records: &[Record],
    template: &Template,
    tokenizer: &Tokenizer,
    cfg: &PreprocessConfig,
) -> Result<ProcessedDataset> {
    preprocess_parallel(records, template, tokenizer, cfg, 1)
}

/// [`preprocess`] with the records encoded by `workers` threads, each taking a contiguous
/// share of them. The result is the same whatever `workers`, sample for sample; so is the
/// first error, when records fail. (What LLaMA-Factory's `preprocessing_num_workers` changes,
/// the batches that packing works within, is [`PreprocessConfig::num_proc`].)
pub fn preprocess_parallel(
    records: &[Record],
    template: &Template,
    tokenizer: &Tokenizer,
    cfg: &PreprocessConfig,
    workers: usize,
) -> Result<ProcessedDataset> {
    cfg.validate()?;
    match cfg.stage {
        Stage::Sft => template.check_tokenizer(tokenizer)?,
        // pt writes no chat markup: only the eos it appends (and bos, if added) must exist.
        Stage::Pt => {
            template.pt_eos_id(tokenizer)?;
            template.pt_bos_id(tokenizer)?;
        }
    }
    let mut stats = PreprocessStats {
        records: records.len(),
        ..PreprocessStats::default()
    };
    let encoded = encode_all(records, template, tokenizer, cfg, workers)?;
    let pad_label = template.pad_id(tokenizer);
    let samples = match (cfg.stage, cfg.packing) {
        (Stage::Pt, true) => {
            stats.samples = encoded.len();
            let bos = template.pt_bos_id(tokenizer)?;
            let mut blocks = Vec::new();
            for batch in preprocessing_batches(encoded.len(), cfg.num_proc, cfg.batch_size) {
                let ids: Vec<u32> = encoded[batch]
                    .iter()
                    .flat_map(|e| e.input_ids.iter().copied())
                    .collect();
                let whole = ids.len() / cfg.cutoff_len * cfg.cutoff_len;
                stats.dropped_tokens += ids.len() - whole;
                for chunk in ids[..whole].chunks(cfg.cutoff_len) {
                    let mut block = chunk.to_vec();
                    if let Some(b) = bos {
                        block[0] = b;
                    }
                    let labels = pt_labels(&block, pad_label);
                    blocks.push(Sample::single(block, labels));
                }
            }
            if blocks.is_empty() && !encoded.is_empty() {
                return Err(DataError::config(
                    "cutoff_len",
                    format!(
                        "stage pt packs each preprocessing batch's texts into blocks of {} \
                         tokens, and no batch has that many: no training row is left \
                         (LLaMA-Factory: \"Cannot find sufficient samples, consider increasing \
                         dataset size.\")",
                        cfg.cutoff_len
                    ),
                ));
            }
            blocks
        }
        (_, packing) => {
            stats.truncated = encoded.iter().filter(|e| e.truncated).count();
            let rows: Vec<Sample> = encoded
                .into_iter()
                .map(|e| Sample::single(e.input_ids, e.labels))
                .collect();
            stats.samples = rows.len();
            stats.no_target = rows.iter().filter(|s| s.num_targets() == 0).count();
            if packing {
                let batches = preprocessing_batches(rows.len(), cfg.num_proc, cfg.batch_size);
                let mut rows = rows.into_iter();
                let mut blocks = Vec::new();
                for batch in batches {
                    let part: Vec<Sample> = rows.by_ref().take(batch.len()).collect();
                    blocks.extend(pack(
                        part,
                        cfg.cutoff_len,
                        cfg.cutoff_len + 1,
                        tokenizer.pad_id_or_eos(),
                    )?);
                }
                blocks
            } else {
                rows
            }
        }
    };
    stats.rows = samples.len();
    stats.tokens = samples.iter().map(Sample::num_real_tokens).sum();
    stats.target_tokens = samples.iter().map(Sample::num_targets).sum();
    Ok(ProcessedDataset { samples, stats })
}

/// pt labels: the ids, except [`IGNORE_INDEX`] where an id is the pad id (the HF
/// `DataCollatorForLanguageModeling(mlm=False)` sets `labels[labels == pad_token_id] = -100`).
fn pt_labels(ids: &[u32], pad: Option<u32>) -> Vec<i64> {
    ids.iter()
        .map(|&x| {
            if Some(x) == pad {
                IGNORE_INDEX
            } else {
                i64::from(x)
            }
        })
        .collect()
}

/// Every record's encoding, in order: sft rows, pt rows (truncated to `cutoff_len`) or, for pt
/// packing, the texts + eos to concatenate (labels left empty).
fn encode_all(
    records: &[Record],
    template: &Template,
    tokenizer: &Tokenizer,
    cfg: &PreprocessConfig,
    workers: usize,
) -> Result<Vec<Encoded>> {
    let workers = workers.clamp(1, records.len().max(1));
    if workers == 1 {
        return encode_range(records, 0, template, tokenizer, cfg);
    }
    let chunk = records.len().div_ceil(workers);
    let parts: Vec<Result<Vec<Encoded>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = records
            .chunks(chunk)
            .enumerate()
            .map(|(k, part)| {
                scope.spawn(move || encode_range(part, k * chunk, template, tokenizer, cfg))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("an encoding worker does not panic"))
            .collect()
    });
    let mut out = Vec::with_capacity(records.len());
    for part in parts {
        out.extend(part?);
    }
    Ok(out)
}

/// Encodes `records`, the first being record `base` of the whole list (for errors).
fn encode_range(
    records: &[Record],
    base: usize,
    template: &Template,
    tokenizer: &Tokenizer,
    cfg: &PreprocessConfig,
) -> Result<Vec<Encoded>> {
    let sft = SupervisedOptions {
        cutoff_len: cfg.cutoff_len,
        train_on_prompt: cfg.train_on_prompt,
        mask_history: cfg.mask_history,
    };
    let pad_label = template.pad_id(tokenizer);
    let mut out = Vec::with_capacity(records.len());
    for (k, r) in records.iter().enumerate() {
        let i = base + k;
        let text = match (cfg.stage, r) {
            (Stage::Sft, Record::Conversation(c)) => {
                out.push(template.encode_supervised(tokenizer, c, &sft)?);
                continue;
            }
            (Stage::Sft, Record::Text(_)) => {
                return Err(DataError::config(
                    "stage",
                    format!(
                        "stage sft trains on conversations (alpaca or sharegpt) but record {i} is \
                         plain text"
                    ),
                ));
            }
            (Stage::Pt, Record::Text(t)) => t.as_str(),
            // LLaMA-Factory's pt reads `_prompt[0]`: the first user message.
            (Stage::Pt, Record::Conversation(c)) => match c.turns.first() {
                Some(t) => t.user.as_str(),
                None => {
                    return Err(DataError::config(
                        "stage",
                        format!(
                            "stage pt reads a conversation's first message, but record {i} has none"
                        ),
                    ));
                }
            },
        };
        out.push(if cfg.packing {
            Encoded {
                input_ids: template.encode_pretrain_for_packing(tokenizer, text)?,
                labels: Vec::new(),
                truncated: false,
            }
        } else {
            let mut ids = template.encode_pretrain(tokenizer, text)?;
            let truncated = ids.len() > cfg.cutoff_len;
            ids.truncate(cfg.cutoff_len);
            Encoded {
                labels: pt_labels(&ids, pad_label),
                input_ids: ids,
                truncated,
            }
        });
    }
    Ok(out)
}

/// Which rows of the datasets a run trains on: `max_samples` and the merge settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Selection {
    /// `max_samples`: the first rows of each dataset (after its `num_samples`).
    pub max_samples: Option<usize>,
    /// `mix_strategy`, `interleave_probs`, `seed`.
    pub mix: MixConfig,
}

/// Loads every dataset, selects and merges their rows as LLaMA-Factory does
/// ([`crate::mix::select_and_merge`]: `num_samples`, `max_samples`, `mix_strategy`) and
/// preprocesses the result with `workers` threads. A format that does not suit the stage is an
/// error naming the file; a record with tools under a template that cannot render them is an
/// error naming the dataset, the file and the record.
pub fn load_and_preprocess(
    specs: &[DatasetSpec],
    selection: &Selection,
    template: &Template,
    tokenizer: &Tokenizer,
    cfg: &PreprocessConfig,
    workers: usize,
) -> Result<ProcessedDataset> {
    if specs.is_empty() {
        return Err(DataError::config("dataset", "no dataset given"));
    }
    selection.mix.validate(specs.len())?;
    let mut sets = Vec::with_capacity(specs.len());
    for spec in specs {
        // pt reads any format (a conversation's first user message, as LLaMA-Factory).
        if matches!(spec.format, DatasetFormat::Text(_)) && cfg.stage == Stage::Sft {
            return Err(DataError::File {
                path: spec.path.clone(),
                problem: format!(
                    "format `{}` does not suit stage {} (sft reads `alpaca` or `sharegpt`)",
                    spec.format, cfg.stage
                ),
            });
        }
        sets.push(DatasetRows {
            rows: spec.load_with_origins()?,
            num_samples: spec.num_samples,
        });
    }
    let rows = select_and_merge(sets, selection.max_samples, &selection.mix)?;
    // pt reads no tools (LLaMA-Factory's pt ignores `_tools`).
    if cfg.stage == Stage::Sft
        && !template.renders_tools()
        && let Some((origin, _)) = rows
            .iter()
            .find(|(_, r)| matches!(r, Record::Conversation(c) if c.tools.is_some()))
    {
        return Err(DataError::config(
            "template",
            format!(
                "{origin}: the record has tools, which template `{}` cannot render (tool \
                 descriptions are rendered by qwen, qwen3 and qwen3_nothink)",
                template.name
            ),
        ));
    }
    let records: Vec<Record> = rows.into_iter().map(|(_, r)| r).collect();
    preprocess_parallel(&records, template, tokenizer, cfg, workers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IGNORE_INDEX;
    use crate::dataset::{Conversation, Turn};
    use crate::tokenizer::tests::tokenizer_for;

    fn convs() -> Vec<Record> {
        vec![
            Record::Conversation(Conversation::single("What is 1 + 2?", "3")),
            Record::Conversation(Conversation {
                system: Some("sys".into()),
                turns: vec![Turn::new("hello", "world"), Turn::new("again", "more")],
                tools: None,
            }),
            Record::Conversation(Conversation::single(
                "a long question about the quick brown fox and the lazy dog",
                "an answer",
            )),
        ]
    }

    #[test]
    fn sft_samples_mask_prompts() {
        let t = Template::llama3();
        let tok = tokenizer_for(&t);
        let d = preprocess(&convs(), &t, &tok, &PreprocessConfig::new(Stage::Sft, 1024)).unwrap();
        assert_eq!(d.samples.len(), 3);
        assert_eq!(d.stats.records, 3);
        assert_eq!(d.stats.no_target, 0);
        assert_eq!(d.stats.truncated, 0);
        for s in &d.samples {
            assert_eq!(s.labels[0], IGNORE_INDEX);
            assert!(s.num_targets() > 0);
        }
        assert_eq!(d.stats.rows, 3);
        assert_eq!(
            d.stats.tokens,
            d.samples.iter().map(Sample::len).sum::<usize>()
        );
    }

    #[test]
    fn cutoff_that_leaves_no_target_keeps_and_counts() {
        let t = Template::qwen();
        let tok = tokenizer_for(&t);
        // The default qwen system prompt alone is longer than 12 tokens, so with cutoff 12 the
        // first exchange keeps few tokens; long prompts lose their targets entirely.
        let recs = vec![Record::Conversation(Conversation::single(
            "x ".repeat(200),
            "y".to_string(),
        ))];
        let pairs = t
            .encode_multiturn(
                &tok,
                match &recs[0] {
                    Record::Conversation(c) => c,
                    _ => unreachable!(),
                },
            )
            .unwrap();
        assert!(pairs[0].0.len() > 100);
        let d = preprocess(&recs, &t, &tok, &PreprocessConfig::new(Stage::Sft, 64)).unwrap();
        // infer_seqlen keeps the short target, so this one is kept and truncated.
        assert_eq!(d.stats.truncated, 1);
        assert_eq!(d.samples.len(), 1);
        assert_eq!(d.samples[0].len(), 64);
        assert!(d.samples[0].num_targets() > 0);
        // The empty template with an empty answer has nothing to learn: kept (LLaMA-Factory's
        // SupervisedDatasetProcessor keeps every encoded row), counted.
        let e = Template::empty();
        let tok = tokenizer_for(&e);
        let recs = vec![
            Record::Conversation(Conversation::single("question", "")),
            Record::Conversation(Conversation::single("question", "answer")),
        ];
        let d = preprocess(&recs, &e, &tok, &PreprocessConfig::new(Stage::Sft, 64)).unwrap();
        assert_eq!(d.stats.no_target, 1);
        assert_eq!(d.samples.len(), 2);
        assert_eq!(d.samples[0].num_targets(), 0);
        assert!(d.samples[0].labels.iter().all(|&l| l == IGNORE_INDEX));
        // A multi-turn conversation cut after the first prompt: the kept part has no target.
        let recs = vec![Record::Conversation(Conversation::single(
            "a b c d e f g h",
            "ok",
        ))];
        let d = preprocess(&recs, &e, &tok, &PreprocessConfig::new(Stage::Sft, 2)).unwrap();
        assert_eq!(d.stats.records, 1);
        assert_eq!(d.stats.no_target, 1);
        assert_eq!(d.samples.len(), 1);
        assert_eq!(d.samples[0].len(), 2);
        assert_eq!(d.stats.truncated, 1);
    }

    /// LLaMA-Factory's `PretrainDatasetProcessor` without packing: `tokenizer(text + eos,
    /// truncation=True, max_length=cutoff_len)`; labels from `DataCollatorForLanguageModeling`:
    /// the ids, -100 where an id is the pad id (here pad = eos, as `fix_special_tokens` sets it
    /// for a tokenizer without pad).
    #[test]
    fn pt_without_packing_truncates_each_text() {
        let t = Template::alpaca();
        let tok = tokenizer_for(&t);
        let eos = tok.eos_id().unwrap();
        assert_eq!(tok.pad_id(), None);
        let long = "the quick brown fox jumps over the lazy dog ".repeat(10);
        let recs = vec![
            Record::Text("hello world".into()),
            Record::Text(long.clone()),
        ];
        let d = preprocess(&recs, &t, &tok, &PreprocessConfig::new(Stage::Pt, 16)).unwrap();
        assert_eq!(d.samples.len(), 2);
        assert_eq!(d.stats.truncated, 1);
        let hello = tok.encode("hello world").unwrap();
        let s0 = &d.samples[0];
        assert_eq!(s0.input_ids, [hello.clone(), vec![eos]].concat());
        let mut labels: Vec<i64> = hello.iter().map(|&i| i64::from(i)).collect();
        labels.push(IGNORE_INDEX);
        assert_eq!(s0.labels, labels);
        assert_eq!(d.samples[1].input_ids, tok.encode(&long).unwrap()[..16]);
    }

    /// LLaMA-Factory's `PretrainDatasetProcessor.preprocess_dataset` with packing, by hand: per
    /// preprocessing batch the texts + eos are concatenated, cut into `cutoff_len` blocks and
    /// the tail dropped; with `add_bos_token` every block's first id becomes bos. Batches are
    /// those of `Dataset.map(batched=True, batch_size=preprocessing_batch_size)`.
    #[test]
    fn pt_packing_concatenates_each_batch_and_drops_its_tail() {
        let t = Template::alpaca();
        let mut tok = tokenizer_for(&t);
        let eos = tok.eos_id().unwrap();
        let texts = ["hello world", "the quick brown fox", "a", "lazy dog jumps"];
        let recs: Vec<Record> = texts.iter().map(|x| Record::Text(x.to_string())).collect();
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|x| [tok.encode(x).unwrap(), vec![eos]].concat())
            .collect();
        let mut cfg = PreprocessConfig::new(Stage::Pt, 3);
        cfg.packing = true;
        cfg.batch_size = 2;
        let d = preprocess(&recs, &t, &tok, &cfg).unwrap();
        let mut expected = Vec::new();
        let mut dropped = 0;
        for batch in [&ids[0..2], &ids[2..4]] {
            let all: Vec<u32> = batch.concat();
            let whole = all.len() / 3 * 3;
            dropped += all.len() - whole;
            expected.extend(all[..whole].chunks(3).map(<[u32]>::to_vec));
        }
        let got: Vec<Vec<u32>> = d.samples.iter().map(|s| s.input_ids.clone()).collect();
        assert_eq!(got, expected);
        assert_eq!(d.stats.dropped_tokens, dropped);
        assert_eq!(d.stats.records, 4);
        for s in &d.samples {
            // One sequence: attention across the texts, positions 0..cutoff_len.
            assert_eq!(s.segments, vec![3]);
            for (&id, &l) in s.input_ids.iter().zip(&s.labels) {
                assert_eq!(
                    l,
                    if id == eos {
                        IGNORE_INDEX
                    } else {
                        i64::from(id)
                    }
                );
            }
        }
        // One batch of 1000 (LLaMA-Factory's default): one concatenation.
        let one = preprocess(
            &recs,
            &t,
            &tok,
            &PreprocessConfig {
                batch_size: 1000,
                ..cfg
            },
        )
        .unwrap();
        let all: Vec<u32> = ids.concat();
        assert_eq!(one.samples.len(), all.len() / 3);
        assert_eq!(one.stats.dropped_tokens, all.len() % 3);
        // add_bos_token: bos written over each block's first id.
        tok.set_add_bos_token(true);
        let bos = tok.bos_id().unwrap();
        let b = preprocess(&recs, &t, &tok, &cfg).unwrap();
        assert_eq!(b.samples.len(), expected.len());
        for (s, e) in b.samples.iter().zip(&expected) {
            assert_eq!(s.input_ids[0], bos);
            assert_eq!(s.input_ids[1..], e[1..]);
        }
        // Too little text for one block: LLaMA-Factory's "Cannot find sufficient samples".
        let err = preprocess(
            &recs[2..3],
            &t,
            &tok,
            &PreprocessConfig {
                cutoff_len: 64,
                ..cfg
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Cannot find sufficient samples"), "{err}");
    }

    /// `DataArguments.__post_init__` (neat_packing implies packing; packing decrements
    /// cutoff_len) then `get_train_args` (`packing = packing if not None else stage == "pt"`).
    #[test]
    fn llama_factory_packing_defaults_and_cutoff() {
        let c = |stage, packing, neat| {
            let p = PreprocessConfig::llama_factory(stage, 100, packing, neat);
            (p.packing, p.cutoff_len)
        };
        assert_eq!(c(Stage::Pt, None, false), (true, 100));
        assert_eq!(c(Stage::Pt, Some(true), false), (true, 99));
        assert_eq!(c(Stage::Pt, Some(false), false), (false, 100));
        assert_eq!(c(Stage::Sft, None, false), (false, 100));
        assert_eq!(c(Stage::Sft, Some(true), false), (true, 99));
        assert_eq!(c(Stage::Sft, Some(false), true), (true, 99));
        assert_eq!(c(Stage::Sft, None, true), (true, 99));
    }

    /// HF datasets' `Dataset.shard(num_shards, index, contiguous=True)` and `map`'s batches.
    #[test]
    fn preprocessing_batches_are_hf_shards_then_batches() {
        let b = |n, p, s| preprocessing_batches(n, p, s);
        assert_eq!(b(10, 1, 1000), vec![0..10]);
        assert_eq!(b(10, 3, 1000), vec![0..4, 4..7, 7..10]);
        assert_eq!(b(10, 3, 2), vec![0..2, 2..4, 4..6, 6..7, 7..9, 9..10]);
        assert_eq!(b(2500, 1, 1000), vec![0..1000, 1000..2000, 2000..2500]);
        assert_eq!(b(3, 8, 1000), vec![0..1, 1..2, 2..3]);
        assert_eq!(b(5, 2, 0), vec![0..3, 3..5]);
        assert!(b(0, 4, 1000).is_empty());
    }

    /// LLaMA-Factory's pt reads `_prompt[0]["content"]`: a conversation's first user message.
    #[test]
    fn pt_on_conversations_reads_the_first_user_message() {
        let t = Template::alpaca();
        let tok = tokenizer_for(&t);
        let d = preprocess(&convs(), &t, &tok, &PreprocessConfig::new(Stage::Pt, 64)).unwrap();
        let eos = tok.eos_id().unwrap();
        for (s, first) in d.samples.iter().zip([
            "What is 1 + 2?",
            "hello",
            "a long question about the quick brown fox and the lazy dog",
        ]) {
            assert_eq!(
                s.input_ids,
                [tok.encode(first).unwrap(), vec![eos]].concat()
            );
        }
    }

    #[test]
    fn pt_needs_only_the_eos() {
        // A tokenizer with <|end_of_text|> but none of llama3's chat tokens.
        let mut opts = crate::tokenizer::BpeTrainingOptions::new(400);
        opts.special_tokens = vec!["<|end_of_text|>".into()];
        opts.bos_token = None;
        opts.eos_token = Some("<|end_of_text|>".into());
        let tok = crate::tokenizer::train_bpe(crate::tokenizer::tests::corpus().into_iter(), &opts)
            .unwrap();
        let t = Template::llama3();
        let recs = vec![Record::Text("hello".into())];
        let d = preprocess(&recs, &t, &tok, &PreprocessConfig::new(Stage::Pt, 32)).unwrap();
        assert_eq!(
            d.samples[0].input_ids.last(),
            tok.token_to_id("<|end_of_text|>").as_ref()
        );
        assert!(t.check_tokenizer(&tok).is_err());
        let err = preprocess(&convs(), &t, &tok, &PreprocessConfig::new(Stage::Sft, 32))
            .unwrap_err()
            .to_string();
        assert!(err.contains("template `llama3`"), "{err}");
    }

    /// `packing: true` in sft: rows truncated at `cutoff_len - 1` (LLaMA-Factory's decrement),
    /// packed within each preprocessing batch, padded to the recipe's `cutoff_len`.
    #[test]
    fn packing_sft_keeps_targets() {
        let t = Template::llama3();
        let tok = tokenizer_for(&t);
        let plain =
            preprocess(&convs(), &t, &tok, &PreprocessConfig::new(Stage::Sft, 127)).unwrap();
        let cfg = PreprocessConfig::llama_factory(Stage::Sft, 128, Some(true), false);
        assert_eq!(cfg.cutoff_len, 127);
        let packed = preprocess(&convs(), &t, &tok, &cfg).unwrap();
        assert!(packed.samples.len() < plain.samples.len());
        assert_eq!(packed.stats.target_tokens, plain.stats.target_tokens);
        assert_eq!(packed.stats.tokens, plain.stats.tokens);
        assert!(packed.samples.iter().all(|s| s.len() == 128));
        assert_eq!(
            packed.samples[0].input_ids.last(),
            Some(&tok.pad_id_or_eos())
        );
        // Truncation at 127, not 128 (LLaMA-Factory's infer_seqlen sees the decremented value).
        let long = vec![Record::Conversation(Conversation::single(
            "x ".repeat(300),
            "y ".repeat(300),
        ))];
        let p = preprocess(&long, &t, &tok, &cfg).unwrap();
        assert_eq!(p.samples[0].num_real_tokens(), 127);
        assert_eq!(p.samples[0].len(), 128);
    }

    /// LLaMA-Factory packs within each `Dataset.map` batch (`PackedSupervisedDatasetProcessor`
    /// sees one batch at a time): no block mixes rows of two batches.
    #[test]
    fn packing_sft_stays_within_preprocessing_batches() {
        let t = Template::qwen();
        let tok = tokenizer_for(&t);
        let recs: Vec<Record> = (0..9)
            .map(|i| Record::Conversation(Conversation::single(format!("q{i}"), format!("a{i}"))))
            .collect();
        let mut cfg = PreprocessConfig::llama_factory(Stage::Sft, 512, Some(true), false);
        cfg.batch_size = 4;
        cfg.num_proc = 2;
        let d = preprocess_parallel(&recs, &t, &tok, &cfg, 3).unwrap();
        // Shards 0..5 and 5..9, batches 0..4, 4..5, 5..9, 9..9: each fits one block.
        let rows = preprocess(&recs, &t, &tok, &PreprocessConfig::new(Stage::Sft, 511)).unwrap();
        let mut expected = Vec::new();
        for r in [0..4, 4..5, 5..9] {
            expected.extend(pack(rows.samples[r].to_vec(), 511, 512, tok.pad_id_or_eos()).unwrap());
        }
        assert_eq!(d.samples, expected);
        assert_eq!(d.samples.len(), 3);
    }

    #[test]
    fn stage_and_format_mismatches_are_errors() {
        let t = Template::alpaca();
        let tok = tokenizer_for(&t);
        let err = preprocess(
            &[Record::Text("x".into())],
            &t,
            &tok,
            &PreprocessConfig::new(Stage::Sft, 8),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("record 0 is plain text"), "{err}");
        let err = preprocess(&convs(), &t, &tok, &PreprocessConfig::new(Stage::Sft, 1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cutoff_len"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.txt");
        std::fs::write(&p, "text\n").unwrap();
        let spec = DatasetSpec::new(&p, "text".parse().unwrap());
        let err = load_and_preprocess(
            std::slice::from_ref(&spec),
            &Selection::default(),
            &t,
            &tok,
            &PreprocessConfig::new(Stage::Sft, 8),
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("d.txt") && err.contains("format `text` does not suit stage sft"),
            "{err}"
        );
        let d = load_and_preprocess(
            &[spec],
            &Selection::default(),
            &t,
            &tok,
            &PreprocessConfig::new(Stage::Pt, 8),
            1,
        )
        .unwrap();
        assert_eq!(d.samples.len(), 1);
        assert!(
            "rm".parse::<Stage>()
                .unwrap_err()
                .to_string()
                .contains("pt, sft")
        );
        assert_eq!("sft".parse::<Stage>().unwrap(), Stage::Sft);
        // A template whose tokens the tokenizer lacks fails up front.
        let err = preprocess(
            &convs(),
            &Template::qwen(),
            &tok,
            &PreprocessConfig::new(Stage::Sft, 64),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("<|im_start|>"), "{err}");
    }

    #[test]
    fn load_and_preprocess_concatenates_files() {
        let t = Template::alpaca();
        let tok = tokenizer_for(&t);
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.json");
        std::fs::write(&a, "{\"instruction\": \"i1\", \"output\": \"o1\"}\n").unwrap();
        std::fs::write(
            &b,
            r#"[{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "g"}]}]"#,
        )
        .unwrap();
        let specs = [
            DatasetSpec::new(&a, "alpaca".parse().unwrap()),
            DatasetSpec::new(&b, "sharegpt".parse().unwrap()),
        ];
        let d = load_and_preprocess(
            &specs,
            &Selection::default(),
            &t,
            &tok,
            &PreprocessConfig::new(Stage::Sft, 256),
            1,
        )
        .unwrap();
        assert_eq!(d.stats.records, 2);
        assert_eq!(d.samples.len(), 2);
        let text = tok.decode(&d.samples[1].input_ids, false).unwrap();
        assert!(
            text.ends_with("### Instruction:\nu\n\n### Response:\ng</s>\n\n"),
            "{text:?}"
        );
    }

    fn alpaca_file(dir: &std::path::Path, name: &str, n: usize) -> std::path::PathBuf {
        let p = dir.join(name);
        let tag = name.split('.').next().unwrap();
        let rows: String = (0..n)
            .map(|i| format!("{{\"instruction\": \"{tag} q{i}\", \"output\": \"{tag} a{i}\"}}\n"))
            .collect();
        std::fs::write(&p, rows).unwrap();
        p
    }

    fn users(tok: &Tokenizer, d: &ProcessedDataset) -> Vec<String> {
        d.samples
            .iter()
            .map(|s| {
                let text = tok.decode(&s.input_ids, false).unwrap();
                let q = text.split("### Instruction:\n").nth(1).unwrap();
                q.split('\n').next().unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn max_samples_and_mix_strategy_select_rows_before_tokenizing() {
        let t = Template::alpaca();
        let tok = tokenizer_for(&t);
        let dir = tempfile::tempdir().unwrap();
        let specs = [
            DatasetSpec::new(
                alpaca_file(dir.path(), "a.jsonl", 3),
                "alpaca".parse().unwrap(),
            ),
            DatasetSpec::new(
                alpaca_file(dir.path(), "b.jsonl", 5),
                "alpaca".parse().unwrap(),
            ),
        ];
        let cfg = PreprocessConfig::new(Stage::Sft, 256);
        let run = |max_samples, strategy: &str| {
            let sel = Selection {
                max_samples,
                mix: MixConfig {
                    strategy: strategy.parse().unwrap(),
                    probs: None,
                    seed: 42,
                },
            };
            users(
                &tok,
                &load_and_preprocess(&specs, &sel, &t, &tok, &cfg, 2).unwrap(),
            )
        };
        assert_eq!(run(Some(2), "concat"), ["a q0", "a q1", "b q0", "b q1"]);
        assert_eq!(
            run(None, "interleave_under"),
            ["a q0", "b q0", "a q1", "b q1", "a q2", "b q2"]
        );
        assert_eq!(
            run(Some(4), "interleave_over"),
            [
                "a q0", "b q0", "a q1", "b q1", "a q2", "b q2", "a q0", "b q3"
            ]
        );
    }

    #[test]
    fn workers_give_the_same_samples_as_one() {
        let t = Template::qwen();
        let tok = tokenizer_for(&t);
        let recs: Vec<Record> = (0..37)
            .map(|i| {
                Record::Conversation(Conversation::single(
                    format!("question {i} {}", "x ".repeat(i % 7)),
                    format!("answer {i}"),
                ))
            })
            .collect();
        let mut cfg = PreprocessConfig::new(Stage::Sft, 24);
        let one = preprocess(&recs, &t, &tok, &cfg).unwrap();
        assert!(one.stats.truncated > 0);
        for workers in [2, 3, 8, 64] {
            assert_eq!(
                preprocess_parallel(&recs, &t, &tok, &cfg, workers).unwrap(),
                one
            );
        }
        cfg.packing = true;
        let one = preprocess(&recs, &t, &tok, &cfg).unwrap();
        assert_eq!(preprocess_parallel(&recs, &t, &tok, &cfg, 4).unwrap(), one);
        // The first failing record is the one reported, whichever worker meets it.
        let mut bad = recs.clone();
        bad[30] = Record::Text("t".into());
        bad[20] = Record::Text("t".into());
        let err = preprocess_parallel(&bad, &t, &tok, &cfg, 4)
            .unwrap_err()
            .to_string();
        assert!(err.contains("record 20 is plain text"), "{err}");
    }

    #[test]
    fn tools_under_a_template_without_tool_format_name_the_row() {
        let t = Template::alpaca();
        let tok = tokenizer_for(&t);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(
            &p,
            "{\"instruction\": \"i\", \"output\": \"o\"}\n{\"instruction\": \"i\", \"output\": \"o\", \"tools\": \"[]\"}\n",
        )
        .unwrap();
        let cols = crate::dataset::AlpacaColumns {
            tools: Some("tools".into()),
            ..Default::default()
        };
        let mut spec = DatasetSpec::new(&p, DatasetFormat::Alpaca(cols));
        spec.name = Some("tooly".into());
        let err = load_and_preprocess(
            &[spec],
            &Selection::default(),
            &t,
            &tok,
            &PreprocessConfig::new(Stage::Sft, 64),
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("dataset `tooly`: ")
                && err.contains("t.jsonl: line 2: the record has tools")
                && err.contains("template `alpaca`"),
            "{err}"
        );
    }
}
