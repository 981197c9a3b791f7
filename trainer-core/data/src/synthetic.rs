//! The quickstart's learnable task: multi-digit addition as alpaca records
//! (`{"instruction": "What is 123 + 4567?", "input": "", "output": "4690"}`), and exact-match
//! scoring of generated answers.
//!
//! Each operand's digit count is uniform in `min_digits..=max_digits`, then the operand is
//! uniform among numbers with that many digits (one digit: 0–9), so short and long problems
//! are equally common. Every `(a, b)` pair occurs at most once over both splits, so held-out
//! problems are never seen in training. The held-out split is drawn first: growing
//! `train_size` leaves it unchanged.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dataset::{AlpacaRecord, write_jsonl};
use crate::error::{DataError, Result};
use crate::rng::DetRng;

/// Settings of [`generate_addition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdditionConfig {
    /// Seed of the problems.
    pub seed: u64,
    /// Fewest digits of an operand (≥ 1).
    pub min_digits: u32,
    /// Most digits of an operand (≤ 18).
    pub max_digits: u32,
    /// Training problems.
    pub train_size: usize,
    /// Held-out problems.
    pub eval_size: usize,
}

impl Default for AdditionConfig {
    fn default() -> Self {
        AdditionConfig {
            seed: 0,
            min_digits: 1,
            max_digits: 3,
            train_size: 20_000,
            eval_size: 200,
        }
    }
}

/// The two splits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdditionSplit {
    /// Training records.
    pub train: Vec<AlpacaRecord>,
    /// Held-out records.
    pub eval: Vec<AlpacaRecord>,
}

impl AdditionSplit {
    /// Writes `train.jsonl` and `eval.jsonl` into `dir` (created if needed); returns both paths.
    pub fn write_jsonl(&self, dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let train = dir.join("train.jsonl");
        let eval = dir.join("eval.jsonl");
        write_jsonl(&train, &self.train)?;
        write_jsonl(&eval, &self.eval)?;
        Ok((train, eval))
    }
}

/// The question text of `a + b`.
pub fn addition_question(a: u64, b: u64) -> String {
    format!("What is {a} + {b}?")
}

/// The record of `a + b`.
pub fn addition_record(a: u64, b: u64) -> AlpacaRecord {
    AlpacaRecord::new(addition_question(a, b), (a + b).to_string())
}

/// Numbers with `min_digits..=max_digits` digits.
fn operand_count(min_digits: u32, max_digits: u32) -> u64 {
    let low = if min_digits == 1 {
        0
    } else {
        10u64.pow(min_digits - 1)
    };
    10u64.pow(max_digits) - low
}

fn operand(rng: &mut DetRng, cfg: &AdditionConfig) -> u64 {
    let d = rng.range_inclusive(u64::from(cfg.min_digits), u64::from(cfg.max_digits)) as u32;
    if d == 1 {
        rng.below(10)
    } else {
        rng.range_inclusive(10u64.pow(d - 1), 10u64.pow(d) - 1)
    }
}

/// The most records (train and eval together) [`generate_addition`] writes.
pub const MAX_RECORDS: usize = 100_000_000;

/// Generates the two splits (see the module docs).
pub fn generate_addition(cfg: &AdditionConfig) -> Result<AdditionSplit> {
    if cfg.min_digits == 0 || cfg.min_digits > cfg.max_digits || cfg.max_digits > 18 {
        return Err(DataError::config(
            "digits",
            format!(
                "need 1 ≤ min_digits ≤ max_digits ≤ 18, got {}..={}",
                cfg.min_digits, cfg.max_digits
            ),
        ));
    }
    if cfg.train_size == 0 {
        return Err(DataError::config(
            "train_size",
            "must be at least 1 (an empty training file trains nothing)",
        ));
    }
    let wanted = cfg.train_size.saturating_add(cfg.eval_size);
    if wanted > MAX_RECORDS {
        return Err(DataError::config(
            "train_size",
            format!("train_size + eval_size is {wanted}, over the limit of {MAX_RECORDS} records"),
        ));
    }
    let per_operand = operand_count(cfg.min_digits, cfg.max_digits);
    let space = u128::from(per_operand) * u128::from(per_operand);
    if wanted as u128 > space {
        return Err(DataError::config(
            "train_size",
            format!(
                "{wanted} distinct problems requested but only {space} exist with {}..={} digits",
                cfg.min_digits, cfg.max_digits
            ),
        ));
    }
    let mut rng = DetRng::from_seeds(&[cfg.seed, 0xADD]);
    let mut pairs: Vec<(u64, u64)> = Vec::with_capacity(wanted);
    if (wanted as u128) * 2 > space {
        // Dense: enumerate every problem and shuffle (the space is at most 2 × wanted here).
        let low = if cfg.min_digits == 1 {
            0
        } else {
            10u64.pow(cfg.min_digits - 1)
        };
        let high = 10u64.pow(cfg.max_digits);
        let mut all: Vec<(u64, u64)> = (low..high)
            .flat_map(|a| (low..high).map(move |b| (a, b)))
            .collect();
        rng.shuffle(&mut all);
        all.truncate(wanted);
        pairs = all;
    } else {
        let mut seen = HashSet::with_capacity(wanted);
        while pairs.len() < wanted {
            let p = (operand(&mut rng, cfg), operand(&mut rng, cfg));
            if seen.insert(p) {
                pairs.push(p);
            }
        }
    }
    let records: Vec<AlpacaRecord> = pairs.iter().map(|&(a, b)| addition_record(a, b)).collect();
    let (eval, train) = records.split_at(cfg.eval_size);
    Ok(AdditionSplit {
        train: train.to_vec(),
        eval: eval.to_vec(),
    })
}

/// Whether a generated answer matches the reference: equal after trimming whitespace at both
/// ends (nothing else is normalised: "4690" ≠ "4,690" ≠ "4690.").
pub fn exact_match(prediction: &str, answer: &str) -> bool {
    prediction.trim() == answer.trim()
}

/// Exact-match counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExactMatch {
    /// Matching predictions.
    pub correct: usize,
    /// Predictions scored.
    pub total: usize,
}

impl ExactMatch {
    /// `correct / total` (0 when nothing was scored).
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }
}

/// Scores `predictions` against `answers` pairwise with [`exact_match`]; the lengths must
/// agree.
pub fn exact_match_accuracy<P: AsRef<str>, A: AsRef<str>>(
    predictions: &[P],
    answers: &[A],
) -> Result<ExactMatch> {
    if predictions.len() != answers.len() {
        return Err(DataError::config(
            "predictions",
            format!(
                "{} predictions for {} answers",
                predictions.len(),
                answers.len()
            ),
        ));
    }
    let correct = predictions
        .iter()
        .zip(answers)
        .filter(|(p, a)| exact_match(p.as_ref(), a.as_ref()))
        .count();
    Ok(ExactMatch {
        correct,
        total: answers.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{DatasetFormat, Record, load_records};

    fn parse(r: &AlpacaRecord) -> (u64, u64, u64) {
        let q = r
            .instruction
            .strip_prefix("What is ")
            .and_then(|s| s.strip_suffix('?'))
            .unwrap();
        let (a, b) = q.split_once(" + ").unwrap();
        (
            a.parse().unwrap(),
            b.parse().unwrap(),
            r.output.parse().unwrap(),
        )
    }

    #[test]
    fn records_are_correct_sums_in_range() {
        let cfg = AdditionConfig {
            seed: 5,
            min_digits: 1,
            max_digits: 4,
            train_size: 3000,
            eval_size: 100,
        };
        let s = generate_addition(&cfg).unwrap();
        assert_eq!((s.train.len(), s.eval.len()), (3000, 100));
        let mut digit_counts = [0usize; 5];
        for r in s.train.iter().chain(&s.eval) {
            let (a, b, c) = parse(r);
            assert_eq!(a + b, c);
            assert_eq!(r.input, "");
            assert!(a < 10_000 && b < 10_000);
            digit_counts[a.to_string().len()] += 1;
        }
        // Digit counts are roughly uniform (≈ 775 each of 3100).
        for d in 1..=4 {
            assert!((600..950).contains(&digit_counts[d]), "{digit_counts:?}");
        }
        assert_eq!(addition_record(123, 4567).output, "4690");
        assert_eq!(
            addition_record(123, 4567).instruction,
            "What is 123 + 4567?"
        );
    }

    #[test]
    fn splits_are_disjoint_seeded_and_stable() {
        let cfg = AdditionConfig {
            seed: 9,
            train_size: 2000,
            eval_size: 300,
            ..AdditionConfig::default()
        };
        let s = generate_addition(&cfg).unwrap();
        let train: HashSet<&str> = s.train.iter().map(|r| r.instruction.as_str()).collect();
        assert_eq!(train.len(), 2000, "no duplicates");
        assert!(
            s.eval
                .iter()
                .all(|r| !train.contains(r.instruction.as_str()))
        );
        assert_eq!(generate_addition(&cfg).unwrap(), s);
        let other = generate_addition(&AdditionConfig { seed: 10, ..cfg }).unwrap();
        assert_ne!(other.eval, s.eval);
        let bigger = generate_addition(&AdditionConfig {
            train_size: 4000,
            ..cfg
        })
        .unwrap();
        assert_eq!(
            bigger.eval, s.eval,
            "the held-out set does not move with train_size"
        );
        assert_eq!(&bigger.train[..2000], s.train.as_slice());
    }

    #[test]
    fn dense_and_impossible_requests() {
        // 1-digit operands: 100 problems exist.
        let cfg = AdditionConfig {
            seed: 1,
            min_digits: 1,
            max_digits: 1,
            train_size: 90,
            eval_size: 10,
        };
        let s = generate_addition(&cfg).unwrap();
        let all: HashSet<String> = s
            .train
            .iter()
            .chain(&s.eval)
            .map(|r| r.instruction.clone())
            .collect();
        assert_eq!(all.len(), 100);
        let err = generate_addition(&AdditionConfig {
            train_size: 91,
            ..cfg
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("101 distinct problems") && err.contains("only 100"),
            "{err}"
        );
        let two = AdditionConfig {
            min_digits: 2,
            max_digits: 2,
            train_size: 50,
            eval_size: 0,
            ..cfg
        };
        for r in generate_addition(&two).unwrap().train {
            let (a, b, _) = parse(&r);
            assert!((10..100).contains(&a) && (10..100).contains(&b));
        }
        assert!(
            generate_addition(&AdditionConfig {
                min_digits: 0,
                ..cfg
            })
            .is_err()
        );
        assert!(
            generate_addition(&AdditionConfig {
                max_digits: 19,
                ..cfg
            })
            .is_err()
        );
        assert!(
            generate_addition(&AdditionConfig {
                min_digits: 3,
                max_digits: 2,
                ..cfg
            })
            .is_err()
        );
        // No training records, or a count that would overflow: refused, not an empty file.
        for (train_size, eval_size) in [(0, 10), (usize::MAX, usize::MAX)] {
            let e = generate_addition(&AdditionConfig {
                train_size,
                eval_size,
                max_digits: 18,
                ..cfg
            })
            .unwrap_err();
            assert!(e.to_string().contains("`train_size`"), "{e}");
        }
    }

    #[test]
    fn writes_loadable_jsonl() {
        let cfg = AdditionConfig {
            train_size: 20,
            eval_size: 5,
            ..AdditionConfig::default()
        };
        let s = generate_addition(&cfg).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (train, eval) = s.write_jsonl(&dir.path().join("add")).unwrap();
        let alpaca: DatasetFormat = "alpaca".parse().unwrap();
        let recs = load_records(&train, &alpaca).unwrap();
        assert_eq!(recs.len(), 20);
        assert_eq!(recs[0], Record::Conversation(s.train[0].to_conversation()));
        assert_eq!(load_records(&eval, &alpaca).unwrap().len(), 5);
        let line = std::fs::read_to_string(&eval).unwrap();
        let first = line.lines().next().unwrap();
        assert!(first.starts_with("{\"instruction\":\"What is "), "{first}");
        assert!(first.contains("\"input\":\"\",\"output\":\""), "{first}");
    }

    #[test]
    fn exact_match_scoring() {
        assert!(exact_match(" 4690\n", "4690"));
        assert!(!exact_match("4,690", "4690"));
        assert!(!exact_match("46900", "4690"));
        let m = exact_match_accuracy(&["1", "2 ", "x"], &["1", "2", "3"]).unwrap();
        assert_eq!(
            m,
            ExactMatch {
                correct: 2,
                total: 3
            }
        );
        assert!((m.accuracy() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(ExactMatch::default().accuracy(), 0.0);
        let err = exact_match_accuracy(&["1"], &["1", "2"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 predictions for 2 answers"), "{err}");
    }
}
