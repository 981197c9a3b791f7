//! Writes the coordinator's state to its [`StateStore`] from a dedicated thread.
//!
//! The loop hands over whole records (`jobs/<id>`, `nodes/<name>`, `meta/...`) and never waits
//! for the disk. The thread coalesces what piled up (the newest record per key wins) into one
//! atomic commit, so 1,000 joins cost a handful of fsyncs, not 1,000. Every write carries the
//! version it last saw (compare-and-swap): a second coordinator writing the same store shows up
//! as a conflict, logged loudly, instead of silently overwriting.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use ringmaster_store::{Op, Precondition, StateStore, Version};
use tokio::sync::oneshot;

enum Msg {
    Put(String, Vec<u8>),
    Delete(String),
    Flush(oneshot::Sender<()>),
}

/// What the store held at start.
pub struct Loaded {
    pub records: Vec<(String, Vec<u8>)>,
}

/// Handle to the writer thread. Dropping it drains what is queued and stops the thread.
pub struct Persister {
    tx: Option<std_mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

impl Persister {
    /// Reads everything under `prefixes`, then starts the writer thread.
    ///
    /// # Errors
    /// A store that cannot be read.
    pub fn start(
        store: Box<dyn StateStore>,
        prefixes: &[&str],
    ) -> Result<(Persister, Loaded), ringmaster_store::StoreError> {
        let mut versions: HashMap<String, Version> = HashMap::new();
        let mut records = Vec::new();
        for p in prefixes {
            for (k, v) in store.list(p)? {
                versions.insert(k.clone(), v.version);
                records.push((k, v.value));
            }
        }
        let (tx, rx) = std_mpsc::channel::<Msg>();
        let thread = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer(store, versions, rx))
            .expect("spawning the state writer thread");
        Ok((
            Persister {
                tx: Some(tx),
                thread: Some(thread),
            },
            Loaded { records },
        ))
    }

    pub fn put(&self, key: String, value: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Put(key, value));
        }
    }

    pub fn delete(&self, key: String) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Delete(key));
        }
    }

    /// Resolves once everything queued before it is on disk.
    pub fn flush(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Some(s) = &self.tx {
            let _ = s.send(Msg::Flush(tx));
        }
        rx
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer(
    store: Box<dyn StateStore>,
    mut versions: HashMap<String, Version>,
    rx: std_mpsc::Receiver<Msg>,
) {
    while let Ok(first) = rx.recv() {
        let mut pending: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut flushes = Vec::new();
        let mut take = |m: Msg| match m {
            Msg::Put(k, v) => {
                pending.insert(k, Some(v));
            }
            Msg::Delete(k) => {
                pending.insert(k, None);
            }
            Msg::Flush(tx) => flushes.push(tx),
        };
        take(first);
        while let Ok(m) = rx.try_recv() {
            take(m);
        }
        if !pending.is_empty() {
            write_batch(store.as_ref(), &mut versions, pending);
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

fn expect_for(versions: &HashMap<String, Version>, key: &str) -> Precondition {
    match versions.get(key) {
        Some(v) => Precondition::Version(*v),
        None => Precondition::Absent,
    }
}

fn write_batch(
    store: &dyn StateStore,
    versions: &mut HashMap<String, Version>,
    pending: BTreeMap<String, Option<Vec<u8>>>,
) {
    let mut ops = Vec::with_capacity(pending.len());
    let mut keys = Vec::with_capacity(pending.len());
    for (k, v) in pending {
        let expect = expect_for(versions, &k);
        match v {
            Some(value) => ops.push(Op::Put {
                key: k.clone(),
                value,
                expect,
            }),
            None if versions.contains_key(&k) => ops.push(Op::Delete {
                key: k.clone(),
                expect,
            }),
            None => continue,
        }
        keys.push(k);
    }
    match store.commit(ops.clone()) {
        Ok(new_versions) => {
            for (k, v) in keys.into_iter().zip(new_versions) {
                if v == 0 {
                    versions.remove(&k);
                } else {
                    versions.insert(k, v);
                }
            }
        }
        Err(e) if e.is_conflict() => {
            tracing::error!(
                error = %e,
                "state store changed under this coordinator (is another coordinator using the same store?); \
                 writing this coordinator's state over it"
            );
            // Re-read the versions and write again, so that this coordinator's view lands.
            for op in ops {
                let key = op.key().to_owned();
                let current = store.get(&key).ok().flatten().map(|v| v.version);
                let expect = match current {
                    Some(v) => Precondition::Version(v),
                    None => Precondition::Absent,
                };
                let res = match op {
                    Op::Put { value, .. } => store.put(&key, &value, expect).map(Some),
                    Op::Delete { .. } => store.delete(&key, expect).map(|_| None),
                };
                match res {
                    Ok(Some(v)) => {
                        versions.insert(key, v);
                    }
                    Ok(None) => {
                        versions.remove(&key);
                    }
                    Err(e) => tracing::error!(key, error = %e, "could not persist state"),
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "could not persist coordinator state"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringmaster_store::MemoryStore;

    #[tokio::test]
    async fn coalesces_and_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = ringmaster_store::open_url("", dir.path()).unwrap();
            let (p, loaded) = Persister::start(store, &["jobs/"]).unwrap();
            assert!(loaded.records.is_empty());
            for i in 0..100 {
                p.put("jobs/a".into(), format!("v{i}").into_bytes());
            }
            p.put("jobs/b".into(), b"b".to_vec());
            p.delete("jobs/b".into());
            p.put("jobs/c".into(), b"c".to_vec());
            p.flush().await.unwrap();
        }
        let store = ringmaster_store::open_url("", dir.path()).unwrap();
        let (_p, loaded) = Persister::start(store, &["jobs/"]).unwrap();
        assert_eq!(
            loaded.records,
            vec![
                ("jobs/a".to_owned(), b"v99".to_vec()),
                ("jobs/c".to_owned(), b"c".to_vec())
            ]
        );
    }

    #[tokio::test]
    async fn a_foreign_write_is_overwritten_not_lost() {
        let store = std::sync::Arc::new(MemoryStore::new());
        struct Shared(std::sync::Arc<MemoryStore>);
        impl StateStore for Shared {
            fn get(
                &self,
                key: &str,
            ) -> Result<Option<ringmaster_store::Versioned>, ringmaster_store::StoreError>
            {
                self.0.get(key)
            }
            fn list(
                &self,
                prefix: &str,
            ) -> Result<Vec<(String, ringmaster_store::Versioned)>, ringmaster_store::StoreError>
            {
                self.0.list(prefix)
            }
            fn put(
                &self,
                key: &str,
                value: &[u8],
                expect: Precondition,
            ) -> Result<Version, ringmaster_store::StoreError> {
                self.0.put(key, value, expect)
            }
            fn delete(
                &self,
                key: &str,
                expect: Precondition,
            ) -> Result<bool, ringmaster_store::StoreError> {
                self.0.delete(key, expect)
            }
            fn commit(&self, ops: Vec<Op>) -> Result<Vec<Version>, ringmaster_store::StoreError> {
                self.0.commit(ops)
            }
        }
        let (p, _) = Persister::start(Box::new(Shared(store.clone())), &["jobs/"]).unwrap();
        p.put("jobs/a".into(), b"1".to_vec());
        p.flush().await.unwrap();
        store.put("jobs/a", b"foreign", Precondition::Any).unwrap();
        p.put("jobs/a".into(), b"2".to_vec());
        p.flush().await.unwrap();
        assert_eq!(store.get("jobs/a").unwrap().unwrap().value, b"2");
    }
}
