//! Samples and padded batches.
//!
//! A [`Sample`] is one training row: a single sequence, or a block of packed sequences
//! (`segments` gives their lengths). [`collate`] right-pads samples into a [`Batch`] of
//! row-major `[batch_size, seq_len]` vectors with segment and position ids.

use serde::{Deserialize, Serialize};

use crate::IGNORE_INDEX;

/// One training row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Token ids (padding included for packed blocks).
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids` ([`IGNORE_INDEX`] where no loss).
    pub labels: Vec<i64>,
    /// Lengths of the sequences in this row, in order; their sum may be less than
    /// `input_ids.len()`, the rest being padding. An unpacked sample has one segment.
    pub segments: Vec<usize>,
}

impl Sample {
    /// An unpacked sample: one segment covering everything.
    pub fn single(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        assert_eq!(
            input_ids.len(),
            labels.len(),
            "ids and labels differ in length"
        );
        let n = input_ids.len();
        Sample {
            input_ids,
            labels,
            segments: vec![n],
        }
    }

    /// Tokens in the row, padding included.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the row has no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens that are not padding.
    pub fn num_real_tokens(&self) -> usize {
        self.segments.iter().sum()
    }

    /// Segment id per token: `1, 1, .., 2, 2, ..` for the sequences, `0` for padding.
    pub fn segment_ids(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.len());
        for (k, &n) in self.segments.iter().enumerate() {
            out.extend(std::iter::repeat_n(k as u32 + 1, n));
        }
        out.resize(self.len(), 0);
        out
    }

    /// Position ids restarting at 0 in every segment (0 on padding).
    pub fn position_ids(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.len());
        for &n in &self.segments {
            out.extend(0..n as u32);
        }
        out.resize(self.len(), 0);
        out
    }

    /// Labels that contribute to the loss: not [`IGNORE_INDEX`] and not the first token of
    /// a segment (with labels shifted by one, nothing predicts a segment's first token).
    pub fn num_targets(&self) -> usize {
        let mut count = 0;
        let mut start = 0;
        for &n in &self.segments {
            count += self.labels[start..start + n]
                .iter()
                .skip(1)
                .filter(|&&l| l != IGNORE_INDEX)
                .count();
            start += n;
        }
        count
    }
}

/// A padded batch; every vector is row-major `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// Rows.
    pub batch_size: usize,
    /// Columns (the longest sample, rounded up to the requested multiple).
    pub seq_len: usize,
    /// Token ids, padding = the pad id.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids`; [`IGNORE_INDEX`] on padding.
    pub labels: Vec<i64>,
    /// Segment ids: attend causally within equal non-zero ids; 0 is padding.
    pub segment_ids: Vec<u32>,
    /// Position ids (restart per segment; 0 on padding).
    pub position_ids: Vec<u32>,
}

impl Batch {
    /// The next-token targets: `shifted[b][t] = labels[b][t + 1]` when position `t + 1` is in
    /// the same non-padding segment as `t`, else [`IGNORE_INDEX`]. Cross-entropy of the logits
    /// at `[b][t]` against this, averaged over non-ignored entries, is the causal-LM loss.
    pub fn shifted_labels(&self) -> Vec<i64> {
        let mut out = vec![IGNORE_INDEX; self.labels.len()];
        for b in 0..self.batch_size {
            let row = b * self.seq_len;
            for t in 0..self.seq_len.saturating_sub(1) {
                let (i, j) = (row + t, row + t + 1);
                let seg = self.segment_ids[i];
                if seg != 0 && self.segment_ids[j] == seg {
                    out[i] = self.labels[j];
                }
            }
        }
        out
    }

    /// How many positions carry a loss (non-ignored entries of [`Self::shifted_labels`]).
    pub fn num_targets(&self) -> usize {
        self.shifted_labels()
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    /// Non-padding tokens.
    pub fn num_tokens(&self) -> usize {
        self.segment_ids.iter().filter(|&&s| s != 0).count()
    }
}

/// Right-pads `samples` to the longest one, rounded up to a multiple of `pad_to_multiple_of`
/// (1 = no rounding), with `pad_id`, label [`IGNORE_INDEX`], segment 0 and position 0.
pub fn collate<'a>(
    samples: impl IntoIterator<Item = &'a Sample>,
    pad_id: u32,
    pad_to_multiple_of: usize,
) -> Batch {
    let samples: Vec<&Sample> = samples.into_iter().collect();
    let longest = samples.iter().map(|s| s.len()).max().unwrap_or(0);
    let m = pad_to_multiple_of.max(1);
    let seq_len = longest.div_ceil(m) * m;
    let n = samples.len() * seq_len;
    let mut b = Batch {
        batch_size: samples.len(),
        seq_len,
        input_ids: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
        segment_ids: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
    };
    for s in samples {
        let pad = seq_len - s.len();
        b.input_ids.extend(&s.input_ids);
        b.input_ids.extend(std::iter::repeat_n(pad_id, pad));
        b.labels.extend(&s.labels);
        b.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        b.segment_ids.extend(s.segment_ids());
        b.segment_ids.extend(std::iter::repeat_n(0, pad));
        b.position_ids.extend(s.position_ids());
        b.position_ids.extend(std::iter::repeat_n(0, pad));
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: i64 = IGNORE_INDEX;

    #[test]
    fn single_sample_ids() {
        let s = Sample::single(vec![5, 6, 7], vec![I, 6, 7]);
        assert_eq!(s.segment_ids(), vec![1, 1, 1]);
        assert_eq!(s.position_ids(), vec![0, 1, 2]);
        assert_eq!(s.num_targets(), 2);
        // A first-position label is never a target.
        assert_eq!(Sample::single(vec![5, 6], vec![5, 6]).num_targets(), 1);
    }

    #[test]
    fn packed_sample_ids() {
        let s = Sample {
            input_ids: vec![1, 2, 3, 4, 5, 0, 0],
            labels: vec![I, 2, 3, I, 5, I, I],
            segments: vec![3, 2],
        };
        assert_eq!(s.segment_ids(), vec![1, 1, 1, 2, 2, 0, 0]);
        assert_eq!(s.position_ids(), vec![0, 1, 2, 0, 1, 0, 0]);
        assert_eq!(s.num_real_tokens(), 5);
        assert_eq!(s.num_targets(), 3);
    }

    #[test]
    fn collate_pads_and_shifts() {
        let a = Sample::single(vec![1, 2, 3], vec![I, 2, 3]);
        let b = Sample::single(vec![4, 5], vec![4, 5]);
        let batch = collate([&a, &b], 99, 4);
        assert_eq!((batch.batch_size, batch.seq_len), (2, 4));
        assert_eq!(batch.input_ids, vec![1, 2, 3, 99, 4, 5, 99, 99]);
        assert_eq!(batch.labels, vec![I, 2, 3, I, 4, 5, I, I]);
        assert_eq!(batch.segment_ids, vec![1, 1, 1, 0, 1, 1, 0, 0]);
        assert_eq!(batch.position_ids, vec![0, 1, 2, 0, 0, 1, 0, 0]);
        assert_eq!(batch.shifted_labels(), vec![2, 3, I, I, 5, I, I, I]);
        assert_eq!(batch.num_targets(), 3);
        assert_eq!(batch.num_tokens(), 5);
        let exact = collate([&a, &b], 0, 1);
        assert_eq!(exact.seq_len, 3);
        let empty = collate(std::iter::empty(), 0, 8);
        assert_eq!((empty.batch_size, empty.seq_len), (0, 0));
        assert!(empty.shifted_labels().is_empty());
    }

    #[test]
    fn shifted_labels_never_cross_segments() {
        let s = Sample {
            input_ids: vec![1, 2, 3, 4],
            labels: vec![1, 2, 3, 4],
            segments: vec![2, 2],
        };
        let b = collate([&s], 0, 1);
        assert_eq!(b.shifted_labels(), vec![2, I, 4, I]);
        assert_eq!(b.num_targets(), s.num_targets());
    }
}
