//! Packing sft rows: several rows per fixed-length block, without attention across them.
//!
//! LLaMA-Factory's `PackedSupervisedDatasetProcessor` with its `greedy_knapsack`: each new
//! block starts with the longest remaining row, then repeatedly takes the longest remaining
//! row that still fits its room; among rows of equal length the one that came *last* is taken
//! first (`length2indexes[length].pop()`). The room is `cutoff_len` as LLaMA-Factory's
//! processors see it (the recipe's less one) and every block is padded to one more, the
//! recipe's `cutoff_len`. Each block records its segments, so that [`Sample::segment_ids`]
//! keeps rows from attending to each other and [`Sample::position_ids`] restarts at 0 in each
//! (LLaMA-Factory's `neat_packing`; its plain `packing` restarts the positions too but lets
//! rows attend to the earlier rows of their block). The first label of every segment is set to
//! [`IGNORE_INDEX`]: with labels shifted by one it could only be predicted from the *previous*
//! row's last token (LLaMA-Factory keeps it; it is a prompt token, already ignored, unless
//! `train_on_prompt`). Every other label is the row's own.

use std::collections::BTreeMap;

use crate::IGNORE_INDEX;
use crate::batch::Sample;
use crate::error::{DataError, Result};

/// Packs unpacked samples (one segment each, at most `room` tokens) into blocks holding at
/// most `room` tokens of rows, each padded with `pad_id` to exactly `block_len` (`room <=
/// block_len`).
pub fn pack(
    samples: Vec<Sample>,
    room: usize,
    block_len: usize,
    pad_id: u32,
) -> Result<Vec<Sample>> {
    if room == 0 || room > block_len {
        return Err(DataError::config(
            "cutoff_len",
            format!("packing needs 1 <= room ({room}) <= block length ({block_len})"),
        ));
    }
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        if s.segments.len() != 1 || s.segments[0] != s.len() {
            return Err(DataError::config(
                "packing",
                format!("sample {i} is already packed or padded"),
            ));
        }
        if s.len() > room {
            return Err(DataError::config(
                "packing",
                format!(
                    "sample {i} has {} tokens, more than the {room} a packed row holds",
                    s.len()
                ),
            ));
        }
        if !s.is_empty() {
            by_len.entry(s.len()).or_default().push(i);
        }
    }
    let mut blocks = Vec::new();
    while !by_len.is_empty() {
        let mut left = room;
        let mut members = Vec::new();
        while let Some((&len, _)) = by_len.range(..=left).next_back() {
            let stack = by_len.get_mut(&len).expect("key just found");
            members.push(stack.pop().expect("stacks are never left empty"));
            if stack.is_empty() {
                by_len.remove(&len);
            }
            left -= len;
        }
        blocks.push(build_block(&samples, &members, block_len, pad_id));
    }
    Ok(blocks)
}

fn build_block(samples: &[Sample], members: &[usize], block_len: usize, pad_id: u32) -> Sample {
    let mut b = Sample {
        input_ids: Vec::with_capacity(block_len),
        labels: Vec::with_capacity(block_len),
        segments: Vec::with_capacity(members.len()),
    };
    for &i in members {
        let s = &samples[i];
        b.input_ids.extend(&s.input_ids);
        let start = b.labels.len();
        b.labels.extend(&s.labels);
        b.labels[start] = IGNORE_INDEX;
        b.segments.push(s.len());
    }
    b.input_ids.resize(block_len, pad_id);
    b.labels.resize(block_len, IGNORE_INDEX);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: i64 = IGNORE_INDEX;

    fn sample(start: u32, len: usize) -> Sample {
        let ids: Vec<u32> = (start..start + len as u32).collect();
        let labels = ids.iter().map(|&i| i64::from(i)).collect();
        Sample::single(ids, labels)
    }

    #[test]
    fn packs_greedily_and_keeps_every_token() {
        let samples: Vec<Sample> = [5usize, 3, 8, 2, 6, 1, 4]
            .iter()
            .enumerate()
            .map(|(k, &n)| sample(100 * (k as u32 + 1), n))
            .collect();
        let blocks = pack(samples.clone(), 8, 8, 0).unwrap();
        // 8 | 6+2 | 5+3 | 4+1  (longest first, then the longest that fits)
        let segs: Vec<Vec<usize>> = blocks.iter().map(|b| b.segments.clone()).collect();
        assert_eq!(segs, vec![vec![8], vec![6, 2], vec![5, 3], vec![4, 1]]);
        for b in &blocks {
            assert_eq!(b.len(), 8);
            assert_eq!(b.labels.len(), 8);
        }
        // Every sample appears exactly once, intact.
        let mut seen = Vec::new();
        for b in &blocks {
            let mut start = 0;
            for &n in &b.segments {
                let ids = &b.input_ids[start..start + n];
                let k = samples
                    .iter()
                    .position(|s| s.input_ids == ids)
                    .expect("a sample");
                seen.push(k);
                // Labels: the sample's, except its first.
                assert_eq!(b.labels[start], I);
                assert_eq!(&b.labels[start + 1..start + n], &samples[k].labels[1..]);
                start += n;
            }
            assert!(b.labels[start..].iter().all(|&l| l == I));
            assert!(b.input_ids[start..].iter().all(|&t| t == 0));
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..samples.len()).collect::<Vec<_>>());
        let targets_before: usize = samples.iter().map(Sample::num_targets).sum();
        let targets_after: usize = blocks.iter().map(Sample::num_targets).sum();
        assert_eq!(targets_before, targets_after);
    }

    #[test]
    fn segment_and_position_ids_of_a_block() {
        let blocks = pack(vec![sample(1, 3), sample(10, 2)], 6, 6, 7).unwrap();
        assert_eq!(blocks.len(), 1);
        let b = &blocks[0];
        assert_eq!(b.input_ids, vec![1, 2, 3, 10, 11, 7]);
        assert_eq!(b.labels, vec![I, 2, 3, I, 11, I]);
        assert_eq!(b.segment_ids(), vec![1, 1, 1, 2, 2, 0]);
        assert_eq!(b.position_ids(), vec![0, 1, 2, 0, 1, 0]);
    }

    #[test]
    fn deterministic() {
        let samples: Vec<Sample> = (0..50)
            .map(|k| sample(k * 10, 1 + (k as usize * 7) % 9))
            .collect();
        let a = pack(samples.clone(), 16, 16, 0).unwrap();
        let b = pack(samples, 16, 16, 0).unwrap();
        assert_eq!(a, b);
    }

    /// LLaMA-Factory's `greedy_knapsack` (data/processor/processor_utils.py) and
    /// `PackedSupervisedDatasetProcessor.preprocess_dataset`, by hand for lengths
    /// [3, 5, 3, 2, 5, 1] and `cutoff_len: 8` (room 7 after `DataArguments.__post_init__`'s
    /// decrement): knapsacks [5, 2], [5, 1], [3, 3]; `length2indexes[length].pop()` takes the
    /// last row of a length first, so the blocks hold rows (4, 3), (1, 5), (2, 0), each padded
    /// to 8 (`cutoff_len + 1` of the decremented value).
    #[test]
    fn follows_llama_factory_knapsacks_ties_and_padding() {
        let lens = [3usize, 5, 3, 2, 5, 1];
        let samples: Vec<Sample> = lens
            .iter()
            .enumerate()
            .map(|(k, &n)| sample(100 * (k as u32 + 1), n))
            .collect();
        let blocks = pack(samples.clone(), 7, 8, 0).unwrap();
        let rows: Vec<Vec<usize>> = blocks
            .iter()
            .map(|b| {
                let mut start = 0;
                b.segments
                    .iter()
                    .map(|&n| {
                        let ids = &b.input_ids[start..start + n];
                        start += n;
                        samples.iter().position(|s| s.input_ids == ids).unwrap()
                    })
                    .collect()
            })
            .collect();
        assert_eq!(rows, vec![vec![4, 3], vec![1, 5], vec![2, 0]]);
        assert!(blocks.iter().all(|b| b.len() == 8));
        // Room 7 of 8: every block has at least one pad.
        assert!(blocks.iter().all(|b| b.num_real_tokens() <= 7));
        let two = pack(vec![sample(1, 2), sample(5, 2), sample(9, 2)], 4, 4, 0).unwrap();
        assert_eq!(two[0].input_ids, vec![9, 10, 5, 6]);
        assert_eq!(two[1].input_ids, vec![1, 2, 0, 0]);
    }

    #[test]
    fn rejects_oversized_or_packed_input() {
        let err = pack(vec![sample(0, 8)], 7, 8, 0).unwrap_err().to_string();
        assert!(
            err.contains("sample 0 has 8 tokens") && err.contains("the 7 a packed row holds"),
            "{err}"
        );
        let packed = pack(vec![sample(0, 2), sample(5, 2)], 4, 4, 0).unwrap();
        assert!(pack(packed, 4, 4, 0).is_err());
        assert!(pack(vec![], 4, 4, 0).unwrap().is_empty());
        assert!(pack(vec![sample(0, 2)], 0, 0, 0).is_err());
        assert!(pack(vec![sample(0, 2)], 5, 4, 0).is_err());
    }
}
