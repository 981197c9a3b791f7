//! Validation shared by the backends: every backend checks a commit the same
//! way before it writes anything.

use std::collections::BTreeSet;

use crate::{Op, StoreError, Version};

/// Reject keys the store does not accept.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".to_string()));
    }
    Ok(())
}

/// Check `ops` against the state before the commit, read through `current`
/// (a key's current version, `None` when absent).
///
/// Returns each op's current version, in order. Fails on an invalid or
/// repeated key, or on the first failed precondition; then nothing may be
/// written.
pub(crate) fn check_ops(
    ops: &[Op],
    mut current: impl FnMut(&str) -> Result<Option<Version>, StoreError>,
) -> Result<Vec<Option<Version>>, StoreError> {
    check_keys(ops)?;
    ops.iter()
        .map(|op| {
            let cur = current(op.key())?;
            let expected = op.expect();
            if expected.matches(cur) {
                Ok(cur)
            } else {
                Err(StoreError::Conflict {
                    key: op.key().to_string(),
                    expected,
                    current: cur,
                })
            }
        })
        .collect()
}

/// Reject a commit with an invalid key or a key that appears twice.
pub(crate) fn check_keys(ops: &[Op]) -> Result<(), StoreError> {
    let mut seen = BTreeSet::new();
    for op in ops {
        check_key(op.key())?;
        if !seen.insert(op.key()) {
            return Err(StoreError::Invalid(format!(
                "key {:?} appears more than once in one commit",
                op.key()
            )));
        }
    }
    Ok(())
}

/// Whether applying `ops`, whose keys have the `current` versions, changes
/// anything (and so takes a new revision).
pub(crate) fn writes_anything(ops: &[Op], current: &[Option<Version>]) -> bool {
    ops.iter().zip(current).any(|(op, cur)| match op {
        Op::Put { .. } => true,
        Op::Delete { .. } => cur.is_some(),
    })
}
