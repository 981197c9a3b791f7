//! [`MemoryStore`]: an in-memory store for unit tests. Nothing persists.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::plan::{check_key, check_keys, check_ops, writes_anything};
use crate::{Fence, Op, Precondition, StateStore, StoreError, Version, Versioned};

#[derive(Debug, Default)]
struct Inner {
    /// The last revision handed out; 0 before the first write.
    revision: Version,
    map: BTreeMap<String, Versioned>,
    /// The revision each present key was created at (for fences).
    created: BTreeMap<String, Version>,
}

/// An in-memory [`StateStore`] (a `Mutex<BTreeMap>`), for unit tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Writes are validated before anything is changed, so the state is
        // consistent even if a holder panicked.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Validate and apply `ops` atomically; returns each op's current version
    /// before the commit and the new revision.
    fn apply(
        &self,
        fence: Option<&Fence>,
        ops: Vec<Op>,
    ) -> Result<(Vec<Option<Version>>, Version), StoreError> {
        let mut inner = self.lock();
        if let Some(f) = fence
            && inner.created.get(&f.key) != Some(&f.created)
        {
            check_keys(&ops)?;
            return Err(StoreError::Fenced {
                key: f.key.clone(),
                created: f.created,
            });
        }
        let current = check_ops(&ops, |k| Ok(inner.map.get(k).map(|v| v.version)))?;
        if !writes_anything(&ops, &current) {
            return Ok((current, inner.revision));
        }
        let revision = inner.revision + 1;
        inner.revision = revision;
        for op in ops {
            match op {
                Op::Put { key, value, .. } => {
                    inner.created.entry(key.clone()).or_insert(revision);
                    inner.map.insert(
                        key,
                        Versioned {
                            value,
                            version: revision,
                        },
                    );
                }
                Op::Delete { key, .. } => {
                    inner.created.remove(&key);
                    inner.map.remove(&key);
                }
            }
        }
        Ok((current, revision))
    }
}

impl MemoryStore {
    fn commit_maybe_fenced(
        &self,
        fence: Option<&Fence>,
        ops: Vec<Op>,
    ) -> Result<Vec<Version>, StoreError> {
        let kinds: Vec<bool> = ops.iter().map(|op| matches!(op, Op::Put { .. })).collect();
        let (_, revision) = self.apply(fence, ops)?;
        Ok(kinds
            .into_iter()
            .map(|is_put| if is_put { revision } else { 0 })
            .collect())
    }
}

impl StateStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        Ok(self.lock().map.get(key).cloned())
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .map
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn put(&self, key: &str, value: &[u8], expect: Precondition) -> Result<Version, StoreError> {
        let (_, revision) = self.apply(None, vec![Op::put(key, value, expect)])?;
        Ok(revision)
    }

    fn delete(&self, key: &str, expect: Precondition) -> Result<bool, StoreError> {
        let (current, _) = self.apply(None, vec![Op::delete(key, expect)])?;
        Ok(current[0].is_some())
    }

    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Version>, StoreError> {
        self.commit_maybe_fenced(None, ops)
    }

    fn commit_fenced(&self, fence: &Fence, ops: Vec<Op>) -> Result<Vec<Version>, StoreError> {
        self.commit_maybe_fenced(Some(fence), ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    #[test]
    fn conformance_basic() {
        conformance::basic(&MemoryStore::new());
    }

    #[test]
    fn conformance_preconditions() {
        conformance::preconditions(&MemoryStore::new());
    }

    #[test]
    fn conformance_commit() {
        conformance::commit(&MemoryStore::new());
    }

    #[test]
    fn conformance_versions() {
        conformance::versions_increase(&MemoryStore::new());
    }

    #[test]
    fn conformance_concurrent_cas() {
        conformance::concurrent_cas(std::sync::Arc::new(MemoryStore::new()));
    }

    #[test]
    fn conformance_fencing() {
        conformance::fencing(&MemoryStore::new());
    }

    #[test]
    fn conformance_large_values_and_long_listings() {
        let store = MemoryStore::new();
        conformance::large_values(&store);
        conformance::long_listings(&store);
    }
}
