//! Which rows of several datasets a run trains on, and in which order: LLaMA-Factory's
//! per-dataset selection (`num_samples` of `dataset_info.json`, then `max_samples`) followed by
//! its `merge_dataset` (`mix_strategy`, `interleave_probs`, `seed`), which calls Hugging Face
//! `datasets`' `concatenate_datasets` or `interleave_datasets` on map-style datasets.
//!
//! The order of operations is LLaMA-Factory's (`loader.py`, `_load_single_dataset` then
//! `_get_merged_dataset`): for each dataset, `num_samples` resamples it, then `max_samples`
//! keeps its first rows; then the datasets are merged; tokenization comes after, so rows dropped
//! by tokenization (e.g. left without a target) are dropped from the merged list.
//!
//! Everything here works on row indices ([`select_rows`], [`merge_indices`]); [`select_and_merge`]
//! applies both to the rows themselves.

use std::fmt;
use std::str::FromStr;

use crate::error::{DataError, Result};
use crate::rng::DetRng;

/// Stream tag of the `num_samples` draws (keeps them apart from the sampler's epoch streams).
const NUM_SAMPLES_STREAM: u64 = 0x6e75_6d5f_7361_6d70; // "num_samp"
/// Stream tag of the per-step source choice of interleaving with probabilities.
const INTERLEAVE_STREAM: u64 = 0x696e_7465_726c_6561; // "interlea"
/// numpy's tolerance on the sum of `p` in `Generator.choice` (`sqrt(float64 eps)`): `datasets`
/// passes `interleave_probs` to it unchanged, so a list off by more is refused, not normalised.
pub const PROBABILITY_SUM_TOLERANCE: f64 = 1.490_116_119_384_765_6e-8;

/// The rows kept of one dataset of `len` rows, as indices into it, in training order.
///
/// `num_samples` (LLaMA-Factory's `dataset_info.json` key): a random permutation of the rows
/// truncated to `num_samples`; when `num_samples` exceeds the rows, every row once (in that
/// permuted order) followed by `num_samples - len` extra rows drawn uniformly with replacement.
/// Then `max_samples` (the training config key) keeps the first `max_samples` of those.
///
/// LLaMA-Factory draws with numpy's global RNG (`np.random.permutation`, `np.random.choice`); we
/// draw with [`DetRng`] seeded by `(seed, dataset_index)`, so the rule is the same but the exact
/// rows picked differ from LLaMA-Factory's.
pub fn select_rows(
    len: usize,
    num_samples: Option<usize>,
    max_samples: Option<usize>,
    seed: u64,
    dataset_index: usize,
) -> Vec<usize> {
    let mut rows: Vec<usize> = (0..len).collect();
    if let Some(n) = num_samples {
        let mut rng = DetRng::from_seeds(&[seed, NUM_SAMPLES_STREAM, dataset_index as u64]);
        rng.shuffle(&mut rows);
        rows.truncate(n);
        if n > len && len > 0 {
            rows.extend((len..n).map(|_| rng.below(len as u64) as usize));
        }
    }
    if let Some(m) = max_samples {
        rows.truncate(m);
    }
    rows
}

/// How several datasets become one (LLaMA-Factory's `mix_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MixStrategy {
    /// One after the other, in the order listed (`concat`, the default).
    #[default]
    Concat,
    /// Interleaved, stopping when the first dataset runs out (`interleave_under`:
    /// `datasets`' `first_exhausted`).
    InterleaveUnder,
    /// Interleaved, restarting datasets that run out until every row of every dataset has been
    /// taken at least once (`interleave_over`: `all_exhausted`).
    InterleaveOver,
    /// Interleaved, every row exactly once (`interleave_once`:
    /// `all_exhausted_without_replacement`).
    InterleaveOnce,
}

/// Names accepted by `MixStrategy::from_str`.
pub const MIX_STRATEGY_NAMES: &[&str] = &[
    "concat",
    "interleave_under",
    "interleave_over",
    "interleave_once",
];

impl FromStr for MixStrategy {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "concat" => Ok(MixStrategy::Concat),
            "interleave_under" => Ok(MixStrategy::InterleaveUnder),
            "interleave_over" => Ok(MixStrategy::InterleaveOver),
            "interleave_once" => Ok(MixStrategy::InterleaveOnce),
            _ => Err(DataError::UnknownName {
                kind: "mix_strategy",
                name: s.to_string(),
                known: MIX_STRATEGY_NAMES.join(", "),
            }),
        }
    }
}

impl fmt::Display for MixStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MixStrategy::Concat => "concat",
            MixStrategy::InterleaveUnder => "interleave_under",
            MixStrategy::InterleaveOver => "interleave_over",
            MixStrategy::InterleaveOnce => "interleave_once",
        })
    }
}

/// The merge settings of a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MixConfig {
    /// `mix_strategy`.
    pub strategy: MixStrategy,
    /// `interleave_probs`: one probability per dataset, summing to 1.
    pub probs: Option<Vec<f64>>,
    /// The run's seed (`datasets` seeds the per-step choice with it).
    pub seed: u64,
}

impl MixConfig {
    /// Checks the settings against `n_datasets` datasets, as LLaMA-Factory's `DataArguments`
    /// and numpy's `Generator.choice` do: probabilities only with an interleaving strategy, one
    /// per dataset, each finite and non-negative, summing to 1 within
    /// [`PROBABILITY_SUM_TOLERANCE`] (refused, not normalised). One more check of ours: a
    /// strategy that must exhaust every dataset cannot end when a dataset has probability 0
    /// (`datasets` would loop forever), so that is refused too.
    pub fn validate(&self, n_datasets: usize) -> Result<()> {
        let Some(p) = &self.probs else {
            return Ok(());
        };
        if self.strategy == MixStrategy::Concat {
            return Err(DataError::config(
                "interleave_probs",
                "only valid with an interleaving mix_strategy (interleave_under, interleave_over \
                 or interleave_once), not concat",
            ));
        }
        if p.len() != n_datasets {
            return Err(DataError::config(
                "interleave_probs",
                format!(
                    "{} probabilities for {n_datasets} datasets; give one per dataset",
                    p.len()
                ),
            ));
        }
        if let Some(x) = p.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
            return Err(DataError::config(
                "interleave_probs",
                format!("{x} is not a probability (finite and >= 0) in {p:?}"),
            ));
        }
        let sum: f64 = p.iter().sum();
        if (sum - 1.0).abs() > PROBABILITY_SUM_TOLERANCE {
            return Err(DataError::config(
                "interleave_probs",
                format!(
                    "{p:?} sums to {sum}, not 1; they are used as given (as Hugging Face datasets \
                     does), not normalised"
                ),
            ));
        }
        let exhausts_all = matches!(
            self.strategy,
            MixStrategy::InterleaveOver | MixStrategy::InterleaveOnce
        );
        if exhausts_all
            && n_datasets > 1
            && let Some(i) = p.iter().position(|&x| x == 0.0)
        {
            return Err(DataError::config(
                "interleave_probs",
                format!(
                    "dataset {i} has probability 0, so mix_strategy {} (which runs until every \
                     dataset is exhausted) would never end",
                    self.strategy
                ),
            ));
        }
        Ok(())
    }
}

/// The merged order of datasets with `lengths` rows: `(dataset, row)` pairs, as `datasets`'
/// `concatenate_datasets` / `_interleave_map_style_datasets` select them. One dataset is
/// returned whole whatever the strategy (LLaMA-Factory's `merge_dataset`), after the settings
/// are validated ([`MixConfig::validate`]).
///
/// Without probabilities the interleavings cycle over the datasets in order, taking row `r` of
/// each in round `r`:
/// - `interleave_under`: `min(lengths)` rounds;
/// - `interleave_over`: `max(lengths)` rounds, a shorter dataset restarting from its first row;
/// - `interleave_once`: `max(lengths)` rounds, a dataset leaving the cycle once it is used up.
///
/// With probabilities each step picks a dataset at random (seeded by `seed`) and takes its next
/// row. `datasets` draws the picks with `np.random.default_rng(seed)`; we draw them with
/// [`DetRng`] by numpy's rule (a uniform draw against the cumulative probabilities), so the
/// stopping rules and shares are the same but the exact sequence differs. `interleave_under` stops right after a dataset's last row is taken; `interleave_over`
/// restarts a dataset once it is used up and stops once every dataset has been used up at least
/// once; `interleave_once` skips picks of a used-up dataset and stops once all are used up.
///
/// # Errors
/// The settings' errors, and interleaving with probabilities when a dataset has no rows (the
/// stopping rules need every dataset to have one).
pub fn merge_indices(lengths: &[usize], cfg: &MixConfig) -> Result<Vec<(usize, usize)>> {
    cfg.validate(lengths.len())?;
    if lengths.len() == 1 {
        return Ok((0..lengths[0]).map(|r| (0, r)).collect());
    }
    let Some(probs) = &cfg.probs else {
        return Ok(round_robin(lengths, cfg.strategy));
    };
    if let Some(i) = lengths.iter().position(|&n| n == 0) {
        return Err(DataError::config(
            "interleave_probs",
            format!("dataset {i} has no rows left to interleave"),
        ));
    }
    // numpy's choice: the cumulative distribution, normalised by its last value, searched with
    // a uniform draw in [0, 1) (a dataset of probability 0 is never picked).
    let mut cdf: Vec<f64> = probs
        .iter()
        .scan(0.0, |acc, &p| {
            *acc += p;
            Some(*acc)
        })
        .collect();
    let total = *cdf
        .last()
        .expect("validated: one probability per dataset, at least two");
    cdf.iter_mut().for_each(|c| *c /= total);
    let mut rng = DetRng::from_seeds(&[cfg.seed, INTERLEAVE_STREAM]);
    let mut pick = || {
        let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        cdf.iter().position(|&c| u < c).unwrap_or(cdf.len() - 1)
    };
    let once = cfg.strategy == MixStrategy::InterleaveOnce;
    let stop_when_all = cfg.strategy != MixStrategy::InterleaveUnder;
    let mut next = vec![0usize; lengths.len()];
    let mut exhausted = vec![false; lengths.len()];
    let mut out = Vec::new();
    loop {
        let done = if stop_when_all {
            exhausted.iter().all(|&e| e)
        } else {
            exhausted.iter().any(|&e| e)
        };
        if done {
            return Ok(out);
        }
        let d = pick();
        if once && exhausted[d] {
            continue;
        }
        out.push((d, next[d]));
        next[d] += 1;
        if next[d] >= lengths[d] {
            exhausted[d] = true;
            if !once {
                next[d] = 0;
            }
        }
    }
}

fn round_robin(lengths: &[usize], strategy: MixStrategy) -> Vec<(usize, usize)> {
    let rounds = match strategy {
        MixStrategy::Concat => {
            return lengths
                .iter()
                .enumerate()
                .flat_map(|(d, &n)| (0..n).map(move |r| (d, r)))
                .collect();
        }
        MixStrategy::InterleaveUnder => lengths.iter().copied().min().unwrap_or(0),
        MixStrategy::InterleaveOver | MixStrategy::InterleaveOnce => {
            lengths.iter().copied().max().unwrap_or(0)
        }
    };
    let mut out = Vec::new();
    for r in 0..rounds {
        for (d, &n) in lengths.iter().enumerate() {
            match strategy {
                MixStrategy::InterleaveOver if n > 0 => out.push((d, r % n)),
                MixStrategy::InterleaveOnce if r >= n => {}
                MixStrategy::InterleaveOver => {}
                _ => out.push((d, r)),
            }
        }
    }
    out
}

/// One dataset's rows and its own selection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRows<T> {
    /// The rows, in file order.
    pub rows: Vec<T>,
    /// `num_samples` of its `dataset_info.json` entry.
    pub num_samples: Option<usize>,
}

/// [`select_rows`] on every dataset (with `max_samples` and the mix seed), then
/// [`merge_indices`]: the rows a run trains on, in order.
pub fn select_and_merge<T: Clone>(
    datasets: Vec<DatasetRows<T>>,
    max_samples: Option<usize>,
    cfg: &MixConfig,
) -> Result<Vec<T>> {
    cfg.validate(datasets.len())?;
    let selected: Vec<Vec<T>> = datasets
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            select_rows(d.rows.len(), d.num_samples, max_samples, cfg.seed, i)
                .into_iter()
                .map(|r| d.rows[r].clone())
                .collect()
        })
        .collect();
    let lengths: Vec<usize> = selected.iter().map(Vec::len).collect();
    Ok(merge_indices(&lengths, cfg)?
        .into_iter()
        .map(|(d, r)| selected[d][r].clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    }

    fn sets(lengths: &[usize], num_samples: &[Option<usize>]) -> Vec<DatasetRows<String>> {
        lengths
            .iter()
            .zip(num_samples)
            .enumerate()
            .map(|(d, (&n, &ns))| DatasetRows {
                rows: names(&((b'a' + d as u8) as char).to_string(), n),
                num_samples: ns,
            })
            .collect()
    }

    fn cfg(strategy: &str, probs: Option<&[f64]>, seed: u64) -> MixConfig {
        MixConfig {
            strategy: strategy.parse().unwrap(),
            probs: probs.map(<[f64]>::to_vec),
            seed,
        }
    }

    fn run(
        lengths: &[usize],
        max_samples: Option<usize>,
        strategy: &str,
        probs: Option<&[f64]>,
    ) -> Result<Vec<String>> {
        let none = vec![None; lengths.len()];
        select_and_merge(sets(lengths, &none), max_samples, &cfg(strategy, probs, 42))
    }

    /// Dataset lengths, `max_samples`, `mix_strategy`, the expected rows.
    type Case = (
        &'static [usize],
        Option<usize>,
        &'static str,
        &'static [&'static str],
    );

    /// Deterministic cases, expected lists worked out by hand from LLaMA-Factory's
    /// `_load_single_dataset` + `merge_dataset` and `datasets`' `_interleave_map_style_datasets`.
    #[test]
    fn deterministic_selections_match_llama_factory() {
        #[rustfmt::skip]
        let table: &[Case] = &[
            // max_samples applies per dataset, before merging.
            (&[3, 5], Some(2), "concat", &["a0", "a1", "b0", "b1"]),
            (&[3, 5], None, "concat", &["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]),
            (&[3, 5], Some(9), "concat", &["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]),
            (&[3, 5], Some(0), "concat", &[]),
            // first_exhausted: min(lengths) rounds.
            (&[2, 3], None, "interleave_under", &["a0", "b0", "a1", "b1"]),
            (&[3, 4, 5], None, "interleave_under",
                &["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]),
            (&[3, 5], Some(2), "interleave_under", &["a0", "b0", "a1", "b1"]),
            // all_exhausted: max(lengths) rounds, shorter datasets cycling (datasets' docstring:
            // [3, 4, 5] -> [0, 3, 7, 1, 4, 8, 2, 5, 9, 0, 6, 10, 1, 3, 11]).
            (&[3, 4, 5], None, "interleave_over",
                &["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2",
                  "a0", "b3", "c3", "a1", "b0", "c4"]),
            (&[2, 3], None, "interleave_over", &["a0", "b0", "a1", "b1", "a0", "b2"]),
            // all_exhausted_without_replacement ([3, 4, 3] -> [0, 3, 7, 1, 4, 8, 2, 5, 9, 6]).
            (&[3, 4, 3], None, "interleave_once",
                &["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2", "b3"]),
            // One dataset ignores the strategy.
            (&[3], None, "interleave_under", &["a0", "a1", "a2"]),
            (&[3], Some(2), "interleave_over", &["a0", "a1"]),
        ];
        for (lengths, max, strategy, want) in table {
            let got = run(lengths, *max, strategy, None).unwrap();
            assert_eq!(got, *want, "{lengths:?} max_samples={max:?} {strategy}");
        }
    }

    #[test]
    fn num_samples_permutes_truncates_and_oversamples() {
        // Fewer than the rows: distinct rows of the dataset.
        let rows = select_rows(10, Some(4), None, 42, 0);
        assert_eq!(rows.len(), 4);
        let mut u = rows.clone();
        u.sort_unstable();
        u.dedup();
        assert_eq!(u.len(), 4);
        // Exactly the rows: a permutation.
        let mut all = select_rows(10, Some(10), None, 42, 0);
        assert_ne!(all, (0..10).collect::<Vec<_>>());
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        // More than the rows: every row once first, then draws with replacement.
        let more = select_rows(5, Some(12), None, 42, 0);
        assert_eq!(more.len(), 12);
        let mut head = more[..5].to_vec();
        head.sort_unstable();
        assert_eq!(head, vec![0, 1, 2, 3, 4]);
        assert!(more[5..].iter().all(|&r| r < 5));
        // The first `min(n, len)` rows are the same permutation whatever n is.
        assert_eq!(select_rows(10, Some(4), None, 42, 0), all_prefix(10, 4));
        // max_samples comes after num_samples: the first rows of the resampled set.
        assert_eq!(select_rows(5, Some(12), Some(7), 42, 0), more[..7].to_vec());
        // Seeded: reproducible, and each dataset draws its own stream.
        assert_eq!(select_rows(10, Some(4), None, 42, 0), rows);
        assert_ne!(
            select_rows(10, Some(10), None, 42, 1),
            select_rows(10, Some(10), None, 42, 0)
        );
        assert_ne!(
            select_rows(10, Some(10), None, 7, 0),
            select_rows(10, Some(10), None, 42, 0)
        );
        assert_eq!(select_rows(3, Some(0), None, 42, 0), Vec::<usize>::new());
    }

    fn all_prefix(len: usize, n: usize) -> Vec<usize> {
        select_rows(len, Some(len), None, 42, 0)[..n].to_vec()
    }

    #[test]
    fn num_samples_per_dataset_in_a_merge() {
        let got = select_and_merge(
            sets(&[2, 3], &[Some(4), None]),
            None,
            &cfg("concat", None, 42),
        )
        .unwrap();
        assert_eq!(got.len(), 7);
        assert!(got[..4].iter().all(|r| r == "a0" || r == "a1"));
        assert!(got[..2].contains(&"a0".to_string()) && got[..2].contains(&"a1".to_string()));
        assert_eq!(got[4..], ["b0", "b1", "b2"]);
    }

    fn check_probability_run(lengths: &[usize], strategy: &str, probs: &[f64], seed: u64) {
        let idx = merge_indices(lengths, &cfg(strategy, Some(probs), seed)).unwrap();
        assert_eq!(
            idx,
            merge_indices(lengths, &cfg(strategy, Some(probs), seed)).unwrap(),
            "reproducible for a seed"
        );
        // Rows are taken in order from each dataset (cycling for interleave_over).
        let mut next = vec![0; lengths.len()];
        let mut exhausted = vec![false; lengths.len()];
        for (k, &(d, r)) in idx.iter().enumerate() {
            assert_eq!(r, next[d], "step {k}");
            next[d] += 1;
            if next[d] == lengths[d] {
                exhausted[d] = true;
                next[d] = 0;
                match strategy {
                    // Stops right after the first dataset is used up.
                    "interleave_under" => assert_eq!(k, idx.len() - 1),
                    // Stops right after the last one is.
                    _ if exhausted.iter().all(|&e| e) => assert_eq!(k, idx.len() - 1),
                    _ => {}
                }
            }
        }
        match strategy {
            "interleave_under" => assert_eq!(exhausted.iter().filter(|&&e| e).count(), 1),
            "interleave_once" => {
                assert_eq!(idx.len(), lengths.iter().sum::<usize>(), "every row once");
            }
            _ => assert!(exhausted.iter().all(|&e| e)),
        }
    }

    #[test]
    fn probabilities_follow_the_stopping_rules() {
        for seed in 0..20 {
            check_probability_run(&[5, 8, 3], "interleave_under", &[0.5, 0.3, 0.2], seed);
            check_probability_run(&[5, 8, 3], "interleave_over", &[0.5, 0.3, 0.2], seed);
            check_probability_run(&[5, 8, 3], "interleave_once", &[0.5, 0.3, 0.2], seed);
            // A dataset of probability 0 never appears (and is fine when stopping at the first).
            let idx =
                merge_indices(&[4, 4], &cfg("interleave_under", Some(&[1.0, 0.0]), seed)).unwrap();
            assert_eq!(idx, vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
        }
        assert_ne!(
            merge_indices(&[50, 50], &cfg("interleave_over", Some(&[0.5, 0.5]), 1)).unwrap(),
            merge_indices(&[50, 50], &cfg("interleave_over", Some(&[0.5, 0.5]), 2)).unwrap(),
        );
    }

    #[test]
    fn shares_are_near_the_probabilities() {
        let probs = [0.7, 0.2, 0.1];
        let idx = merge_indices(
            &[100_000, 100_000, 100_000],
            &cfg("interleave_under", Some(&probs), 42),
        )
        .unwrap();
        // Stops when dataset 0 (the likeliest) is used up: about 100000 / 0.7 steps.
        assert!(idx.len() > 130_000, "{}", idx.len());
        for (d, p) in probs.iter().enumerate() {
            let share = idx.iter().filter(|x| x.0 == d).count() as f64 / idx.len() as f64;
            assert!((share - p).abs() < 0.01, "dataset {d}: {share} vs {p}");
        }
    }

    #[test]
    fn bad_settings_are_refused_as_llama_factory_does() {
        let cases: &[(&str, &[f64], usize, &str)] = &[
            ("concat", &[0.5, 0.5], 2, "only valid with an interleaving"),
            (
                "interleave_under",
                &[1.0],
                2,
                "1 probabilities for 2 datasets",
            ),
            ("interleave_under", &[0.6, 0.6], 2, "sums to 1.2, not 1"),
            ("interleave_under", &[0.2, 0.3], 2, "not normalised"),
            (
                "interleave_under",
                &[-0.5, 1.5],
                2,
                "-0.5 is not a probability",
            ),
            (
                "interleave_over",
                &[1.0, 0.0],
                2,
                "dataset 1 has probability 0",
            ),
            (
                "interleave_once",
                &[0.0, 1.0],
                2,
                "dataset 0 has probability 0",
            ),
        ];
        for (strategy, p, n, want) in cases {
            let err = merge_indices(&vec![3; *n], &cfg(strategy, Some(p), 0))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("interleave_probs") && err.contains(want),
                "{strategy} {p:?}: {err}"
            );
        }
        // A sum off by float rounding is accepted, as numpy accepts it.
        merge_indices(
            &[3, 3, 3],
            &cfg("interleave_under", Some(&[0.7, 0.2, 0.1]), 0),
        )
        .unwrap();
        // Settings are checked even for one dataset (LLaMA-Factory's DataArguments does).
        assert!(merge_indices(&[3], &cfg("concat", Some(&[1.0]), 0)).is_err());
        let err = "interleave".parse::<MixStrategy>().unwrap_err().to_string();
        assert!(err.contains("interleave_under"), "{err}");
    }
}
