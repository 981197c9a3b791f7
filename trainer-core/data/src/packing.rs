//! Packing: several samples per fixed-length block, without attention across them.
//!
//! Samples are placed greedily (LLaMA-Factory's `greedy_knapsack`): each new block starts
//! with the longest remaining sample, then repeatedly takes the longest remaining sample that
//! still fits; ties go to the earlier sample, so the result is deterministic. Each block is
//! padded to exactly `block_len` and records its segments, so that
//! [`Sample::segment_ids`] keeps samples from attending to each other and
//! [`Sample::position_ids`] restarts at 0 in each. The first label of every segment is set to
//! [`IGNORE_INDEX`]: with labels shifted by one it could only be predicted from the *previous*
//! sample's last token. Every other label is the sample's own.

use std::collections::{BTreeMap, VecDeque};

use crate::IGNORE_INDEX;
use crate::batch::Sample;
use crate::error::{DataError, Result};

/// Packs unpacked samples (one segment each, at most `block_len` tokens) into blocks of
/// exactly `block_len` tokens.
pub fn pack(samples: Vec<Sample>, block_len: usize, pad_id: u32) -> Result<Vec<Sample>> {
    if block_len == 0 {
        return Err(DataError::config(
            "cutoff_len",
            "must be at least 1 to pack",
        ));
    }
    let mut by_len: BTreeMap<usize, VecDeque<usize>> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        if s.segments.len() != 1 || s.segments[0] != s.len() {
            return Err(DataError::config(
                "packing",
                format!("sample {i} is already packed or padded"),
            ));
        }
        if s.len() > block_len {
            return Err(DataError::config(
                "packing",
                format!(
                    "sample {i} has {} tokens, more than cutoff_len {block_len}",
                    s.len()
                ),
            ));
        }
        if !s.is_empty() {
            by_len.entry(s.len()).or_default().push_back(i);
        }
    }
    let mut blocks = Vec::new();
    while !by_len.is_empty() {
        let mut room = block_len;
        let mut members = Vec::new();
        while let Some((&len, _)) = by_len.range(..=room).next_back() {
            let queue = by_len.get_mut(&len).expect("key just found");
            members.push(queue.pop_front().expect("queues are never left empty"));
            if queue.is_empty() {
                by_len.remove(&len);
            }
            room -= len;
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
        let blocks = pack(samples.clone(), 8, 0).unwrap();
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
        let blocks = pack(vec![sample(1, 3), sample(10, 2)], 6, 7).unwrap();
        assert_eq!(blocks.len(), 1);
        let b = &blocks[0];
        assert_eq!(b.input_ids, vec![1, 2, 3, 10, 11, 7]);
        assert_eq!(b.labels, vec![I, 2, 3, I, 11, I]);
        assert_eq!(b.segment_ids(), vec![1, 1, 1, 2, 2, 0]);
        assert_eq!(b.position_ids(), vec![0, 1, 2, 0, 1, 0]);
    }

    #[test]
    fn deterministic_and_ties_by_index() {
        let samples: Vec<Sample> = (0..50)
            .map(|k| sample(k * 10, 1 + (k as usize * 7) % 9))
            .collect();
        let a = pack(samples.clone(), 16, 0).unwrap();
        let b = pack(samples, 16, 0).unwrap();
        assert_eq!(a, b);
        let two = pack(vec![sample(1, 2), sample(5, 2), sample(9, 2)], 4, 0).unwrap();
        assert_eq!(two[0].input_ids, vec![1, 2, 5, 6]);
        assert_eq!(two[1].input_ids, vec![9, 10, 0, 0]);
    }

    #[test]
    fn rejects_oversized_or_packed_input() {
        let err = pack(vec![sample(0, 9)], 8, 0).unwrap_err().to_string();
        assert!(
            err.contains("sample 0 has 9 tokens") && err.contains("cutoff_len 8"),
            "{err}"
        );
        let packed = pack(vec![sample(0, 2), sample(5, 2)], 4, 0).unwrap();
        assert!(pack(packed, 4, 0).is_err());
        assert!(pack(vec![], 4, 0).unwrap().is_empty());
        assert!(pack(vec![sample(0, 2)], 0, 0).is_err());
    }
}
