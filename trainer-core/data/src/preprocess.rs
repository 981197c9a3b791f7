//! Records → training samples for a stage.
//!
//! - `stage: sft`: each conversation through [`Template::encode_supervised`] (responses only,
//!   `cutoff_len` as LLaMA-Factory). A sample left with no target (e.g. `cutoff_len` cut every
//!   response token, or an empty answer with the `empty` template) is dropped and counted in
//!   [`PreprocessStats::dropped_no_target`], never kept silently.
//! - `stage: pt`: each text + eos ([`Template::encode_pretrain`]), labels = ids. Without
//!   packing a text longer than `cutoff_len` is truncated (as LLaMA-Factory does); with packing
//!   it is split into `cutoff_len` pieces so that no text is lost.
//! - `packing: true`: samples are then packed into `cutoff_len` blocks ([`crate::packing`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::batch::Sample;
use crate::dataset::{DatasetFormat, DatasetSpec, Record};
use crate::error::{DataError, Result};
use crate::mix::{DatasetRows, MixConfig, select_and_merge};
use crate::packing::pack;
use crate::template::{Encoded, SupervisedOptions, Template};
use crate::tokenizer::Tokenizer;

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
    /// `cutoff_len`: maximum tokens per sample, and the block length when packing.
    pub cutoff_len: usize,
    /// `train_on_prompt` (sft).
    pub train_on_prompt: bool,
    /// `mask_history` (sft).
    pub mask_history: bool,
    /// `packing`.
    pub packing: bool,
}

impl PreprocessConfig {
    /// A config for `stage` and `cutoff_len`, without packing or prompt training.
    pub fn new(stage: Stage, cutoff_len: usize) -> Self {
        PreprocessConfig {
            stage,
            cutoff_len,
            train_on_prompt: false,
            mask_history: false,
            packing: false,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.cutoff_len < 2 {
            return Err(DataError::config(
                "cutoff_len",
                format!(
                    "{} leaves no room for a target token (at least 2)",
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

/// What preprocessing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PreprocessStats {
    /// Records read.
    pub records: usize,
    /// Samples kept before packing (pt with packing: pieces of texts).
    pub samples: usize,
    /// Samples dropped because no label was left to train on.
    pub dropped_no_target: usize,
    /// Records shortened by `cutoff_len` (pt with packing: texts split into pieces).
    pub truncated: usize,
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
/// eos it appends.
pub fn preprocess(
    records: &[Record],
    template: &Template,
    tokenizer: &Tokenizer,
    cfg: &PreprocessConfig,
) -> Result<ProcessedDataset> {
    preprocess_parallel(records, template, tokenizer, cfg, 1)
}

/// [`preprocess`] with the records encoded by `workers` threads
/// (`preprocessing_num_workers`), each taking a contiguous share of them. The result is the
/// same as with one worker, sample for sample; so is the first error, when records fail.
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
        // pt writes no chat markup: only the eos it appends must exist.
        Stage::Pt => {
            template.pt_eos_id(tokenizer)?;
        }
    }
    let mut stats = PreprocessStats {
        records: records.len(),
        ..PreprocessStats::default()
    };
    let mut samples = Vec::with_capacity(records.len());
    for (truncated, pieces) in encode_all(records, template, tokenizer, cfg, workers)? {
        stats.truncated += usize::from(truncated);
        for e in pieces {
            if e.num_targets() == 0 {
                stats.dropped_no_target += 1;
            } else {
                samples.push(Sample::single(e.input_ids, e.labels));
            }
        }
    }
    stats.samples = samples.len();
    let samples = if cfg.packing {
        pack(samples, cfg.cutoff_len, tokenizer.pad_id_or_eos())?
    } else {
        samples
    };
    stats.rows = samples.len();
    stats.tokens = samples.iter().map(Sample::num_real_tokens).sum();
    stats.target_tokens = samples.iter().map(Sample::num_targets).sum();
    Ok(ProcessedDataset { samples, stats })
}

/// One record's encoding: whether `cutoff_len` shortened it, and its samples before the
/// no-target check (one for sft; pt with packing may split a text in several).
type EncodedRecord = (bool, Vec<Encoded>);

/// Every record's [`EncodedRecord`], in order.
fn encode_all(
    records: &[Record],
    template: &Template,
    tokenizer: &Tokenizer,
    cfg: &PreprocessConfig,
    workers: usize,
) -> Result<Vec<EncodedRecord>> {
    let workers = workers.clamp(1, records.len().max(1));
    if workers == 1 {
        return encode_range(records, 0, template, tokenizer, cfg);
    }
    let chunk = records.len().div_ceil(workers);
    let parts: Vec<Result<Vec<EncodedRecord>>> = std::thread::scope(|scope| {
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
) -> Result<Vec<EncodedRecord>> {
    let sft = SupervisedOptions {
        cutoff_len: cfg.cutoff_len,
        train_on_prompt: cfg.train_on_prompt,
        mask_history: cfg.mask_history,
    };
    let mut out = Vec::with_capacity(records.len());
    for (k, r) in records.iter().enumerate() {
        let i = base + k;
        out.push(match (cfg.stage, r) {
            (Stage::Sft, Record::Conversation(c)) => {
                let e = template.encode_supervised(tokenizer, c, &sft)?;
                (e.truncated, vec![e])
            }
            (Stage::Pt, Record::Text(t)) => {
                let ids = template.encode_pretrain(tokenizer, t)?;
                let long = ids.len() > cfg.cutoff_len;
                let pieces: Vec<&[u32]> = if cfg.packing {
                    ids.chunks(cfg.cutoff_len).collect()
                } else {
                    vec![&ids[..ids.len().min(cfg.cutoff_len)]]
                };
                let pieces = pieces
                    .into_iter()
                    .map(|p| Encoded {
                        input_ids: p.to_vec(),
                        labels: p.iter().map(|&x| i64::from(x)).collect(),
                        truncated: long,
                    })
                    .collect();
                (long, pieces)
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
            (Stage::Pt, Record::Conversation(_)) => {
                return Err(DataError::config(
                    "stage",
                    format!(
                        "stage pt trains on plain text (format `text`) but record {i} is a \
                         conversation"
                    ),
                ));
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
        let is_text = matches!(spec.format, DatasetFormat::Text(_));
        if is_text != (cfg.stage == Stage::Pt) {
            return Err(DataError::File {
                path: spec.path.clone(),
                problem: format!(
                    "format `{}` does not suit stage {} (pt reads `text`, sft reads `alpaca` or \
                     `sharegpt`)",
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
    if !template.renders_tools()
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
        assert_eq!(d.stats.dropped_no_target, 0);
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
    fn cutoff_that_leaves_no_target_drops_and_counts() {
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
        // The empty template with an empty answer has nothing to learn: dropped, counted.
        let e = Template::empty();
        let tok = tokenizer_for(&e);
        let recs = vec![
            Record::Conversation(Conversation::single("question", "")),
            Record::Conversation(Conversation::single("question", "answer")),
        ];
        let d = preprocess(&recs, &e, &tok, &PreprocessConfig::new(Stage::Sft, 64)).unwrap();
        assert_eq!(d.stats.dropped_no_target, 1);
        assert_eq!(d.samples.len(), 1);
        // A multi-turn conversation cut after the first prompt: the kept part has no target.
        let recs = vec![Record::Conversation(Conversation::single(
            "a b c d e f g h",
            "ok",
        ))];
        let d = preprocess(&recs, &e, &tok, &PreprocessConfig::new(Stage::Sft, 2)).unwrap();
        assert_eq!(d.stats.records, 1);
        assert_eq!(d.stats.dropped_no_target, 1);
        assert!(d.samples.is_empty());
        assert_eq!(d.stats.truncated, 1);
    }

    #[test]
    fn pt_truncates_or_splits() {
        let t = Template::alpaca();
        let tok = tokenizer_for(&t);
        let long = "the quick brown fox jumps over the lazy dog ".repeat(10);
        let recs = vec![
            Record::Text("hello world".into()),
            Record::Text(long.clone()),
        ];
        let d = preprocess(&recs, &t, &tok, &PreprocessConfig::new(Stage::Pt, 16)).unwrap();
        assert_eq!(d.samples.len(), 2);
        assert_eq!(d.stats.truncated, 1);
        let s0 = &d.samples[0];
        assert_eq!(*s0.input_ids.last().unwrap(), tok.eos_id().unwrap());
        let ids: Vec<i64> = s0.input_ids.iter().map(|&i| i64::from(i)).collect();
        assert_eq!(s0.labels, ids);
        assert_eq!(d.samples[1].len(), 16);
        // Packing: the long text is split, nothing is lost, blocks are cutoff_len long.
        let mut cfg = PreprocessConfig::new(Stage::Pt, 16);
        cfg.packing = true;
        let p = preprocess(&recs, &t, &tok, &cfg).unwrap();
        let total =
            tok.encode("hello world").unwrap().len() + 1 + tok.encode(&long).unwrap().len() + 1;
        assert_eq!(p.stats.tokens + p.stats.dropped_no_target, total);
        assert!(p.samples.iter().all(|s| s.len() == 16));
        assert_eq!(p.stats.rows, p.samples.len());
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

    #[test]
    fn packing_sft_keeps_targets() {
        let t = Template::llama3();
        let tok = tokenizer_for(&t);
        let plain =
            preprocess(&convs(), &t, &tok, &PreprocessConfig::new(Stage::Sft, 128)).unwrap();
        let mut cfg = PreprocessConfig::new(Stage::Sft, 128);
        cfg.packing = true;
        let packed = preprocess(&convs(), &t, &tok, &cfg).unwrap();
        assert!(packed.samples.len() < plain.samples.len());
        assert_eq!(packed.stats.target_tokens, plain.stats.target_tokens);
        assert_eq!(packed.stats.tokens, plain.stats.tokens);
        assert!(packed.samples.iter().all(|s| s.len() == 128));
        assert_eq!(
            packed.samples[0].input_ids.last(),
            Some(&tok.pad_id_or_eos())
        );
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
        let err = preprocess(&convs(), &t, &tok, &PreprocessConfig::new(Stage::Pt, 8))
            .unwrap_err()
            .to_string();
        assert!(err.contains("record 0 is a conversation"), "{err}");
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
