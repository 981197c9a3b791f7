//! Writes the coordinator's state to its [`StateStore`] from a dedicated thread.
//!
//! The loop hands over whole records (`jobs/<id>`, `nodes/<name>`, `meta/...`) and never waits
//! for the disk. The thread coalesces what piled up (the newest record per key wins) into one
//! atomic commit, so 1,000 joins cost a handful of fsyncs, not 1,000. Every write carries the
//! version it last saw (compare-and-swap): a second coordinator writing the same store shows up
//! as a conflict, logged loudly, instead of silently overwriting.
//!
//! Whoever must know that a record is on disk (a submit, before it is acknowledged) asks for a
//! [`Durable`] after queueing it. A failed commit is retried with backoff ([`RetryPolicy`]);
//! when the retries are spent the writer stops: it drops every later write, fails every later
//! [`Durable`], and [`Persister::stopped`] says why, so that the coordinator refuses writes
//! instead of acknowledging what it cannot keep.
//!
//! Under an elected leader (etcd), every commit carries the leadership's [`Fence`]: a deposed
//! leader's write is refused by the store in the same transaction. A fenced write is never
//! retried; the writer stops and [`Persister::fenced`] resolves, so that the coordinator steps
//! down.
//!
//! [`JobIds`] keeps the job id counter's floor in a small file beside the store, so that ids
//! are never reused on a data dir, not even after a damaged store was moved aside.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use ringmaster_store::{Fence, Op, Precondition, StateStore, StoreError, Version};
use tokio::sync::{oneshot, watch};

/// Why the writer stopped: the store error after the last retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the coordinator stopped accepting writes: saving its state failed: {reason} (reads still \
     work; restart the coordinator once the state store is writable)"
)]
pub struct WritesStopped {
    pub reason: String,
}

enum Msg {
    Put(String, Vec<u8>),
    Delete(String),
    Flush(oneshot::Sender<Result<(), WritesStopped>>),
}

/// What the store held at start.
pub struct Loaded {
    pub records: Vec<(String, Vec<u8>)>,
}

/// How often and how patiently a failed commit is retried before the writer stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all (the first one included), at least 1.
    pub attempts: u32,
    /// The pause after the first failure; it doubles after each further one.
    pub first_delay: Duration,
}

impl Default for RetryPolicy {
    /// 5 tries over about 3 s (0.2 + 0.4 + 0.8 + 1.6 s of pauses): long enough to ride out a
    /// brief I/O hiccup, short enough that a submit waiting on it does not time out.
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            first_delay: Duration::from_millis(200),
        }
    }
}

/// Resolves once everything queued before it is committed, or fails when the writer stopped.
pub struct Durable(oneshot::Receiver<Result<(), WritesStopped>>);

impl Durable {
    /// Waits for the commit.
    ///
    /// # Errors
    /// [`WritesStopped`] when the writer stopped before or while writing what was queued.
    pub async fn wait(self) -> Result<(), WritesStopped> {
        self.0.await.unwrap_or_else(|_| {
            Err(WritesStopped {
                reason: "the state writer thread is gone".into(),
            })
        })
    }
}

/// Handle to the writer thread. Dropping it drains what is queued and stops the thread.
pub struct Persister {
    tx: Option<std_mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    stopped: Arc<OnceLock<WritesStopped>>,
    fenced: watch::Receiver<bool>,
    max_record_bytes: Option<usize>,
}

impl Persister {
    /// Reads everything under `prefixes`, then starts the writer thread with the default
    /// [`RetryPolicy`].
    ///
    /// # Errors
    /// A store that cannot be read.
    pub fn start(
        store: Box<dyn StateStore>,
        prefixes: &[&str],
    ) -> Result<(Persister, Loaded), StoreError> {
        Persister::start_with(store, prefixes, RetryPolicy::default())
    }

    /// As [`Persister::start`], with a retry policy.
    ///
    /// # Errors
    /// A store that cannot be read.
    pub fn start_with(
        store: Box<dyn StateStore>,
        prefixes: &[&str],
        retry: RetryPolicy,
    ) -> Result<(Persister, Loaded), StoreError> {
        Persister::start_fenced(store, prefixes, retry, None)
    }

    /// As [`Persister::start_with`], every commit fenced by `fence` when given (an elected
    /// leader's writes).
    ///
    /// # Errors
    /// A store that cannot be read.
    pub fn start_fenced(
        store: Box<dyn StateStore>,
        prefixes: &[&str],
        retry: RetryPolicy,
        fence: Option<Fence>,
    ) -> Result<(Persister, Loaded), StoreError> {
        let mut versions: HashMap<String, Version> = HashMap::new();
        let mut records = Vec::new();
        for p in prefixes {
            for (k, v) in store.list(p)? {
                versions.insert(k.clone(), v.version);
                records.push((k, v.value));
            }
        }
        let stopped = Arc::new(OnceLock::new());
        let (fenced_tx, fenced) = watch::channel(false);
        // A record must fit in one request, with room for its key and the transaction.
        let max_record_bytes = store.max_commit_bytes().map(|b| b.saturating_sub(4096));
        let (tx, rx) = std_mpsc::channel::<Msg>();
        let writer = Writer {
            store,
            versions,
            retry,
            stopped: stopped.clone(),
            fence,
            fenced: fenced_tx,
        };
        let thread = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || writer.run(rx))
            .expect("spawning the state writer thread");
        Ok((
            Persister {
                tx: Some(tx),
                thread: Some(thread),
                stopped,
                fenced,
                max_record_bytes,
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

    /// Resolves once everything queued before it is on disk (or the writer stopped).
    pub fn flush(&self) -> Durable {
        let (tx, rx) = oneshot::channel();
        if let Some(s) = &self.tx {
            let _ = s.send(Msg::Flush(tx));
        }
        Durable(rx)
    }

    /// Set once the writer stopped after a failed commit: nothing more reaches the store.
    pub fn stopped(&self) -> Option<&WritesStopped> {
        self.stopped.get()
    }

    /// Resolves when the writer stopped: a commit was refused by the fence (this coordinator
    /// no longer leads), or the retries of a failed commit were spent.
    pub fn fenced(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.fenced.clone();
        async move {
            // An error: the writer is gone, which ends this coordinator anyway.
            let _ = rx.wait_for(|f| *f).await;
        }
    }

    /// The most bytes one record may have in this store (etcd's request limit), if limited.
    pub fn max_record_bytes(&self) -> Option<usize> {
        self.max_record_bytes
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

struct Writer {
    store: Box<dyn StateStore>,
    versions: HashMap<String, Version>,
    retry: RetryPolicy,
    stopped: Arc<OnceLock<WritesStopped>>,
    fence: Option<Fence>,
    fenced: watch::Sender<bool>,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Msg>) {
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
            if self.stopped.get().is_none() && !pending.is_empty() {
                self.write_with_retries(&pending);
            }
            let result = match self.stopped.get() {
                Some(s) => Err(s.clone()),
                None => Ok(()),
            };
            for f in flushes {
                let _ = f.send(result.clone());
            }
        }
    }

    /// Commits `pending`, retrying per the policy; stops the writer when every try failed.
    fn write_with_retries(&mut self, pending: &BTreeMap<String, Option<Vec<u8>>>) {
        let mut delay = self.retry.first_delay;
        let attempts = self.retry.attempts.max(1);
        for attempt in 1..=attempts {
            match self.write_batch(pending) {
                Ok(()) => {
                    if attempt > 1 {
                        tracing::warn!(attempt, "state saved after retrying");
                    }
                    return;
                }
                Err(e) if e.is_fenced() => {
                    tracing::error!(
                        error = %e,
                        "lost leadership: a newer coordinator leads; this one writes nothing more"
                    );
                    let _ = self.stopped.set(WritesStopped {
                        reason: format!("{e} (this coordinator no longer leads)"),
                    });
                    let _ = self.fenced.send(true);
                    return;
                }
                Err(e) if attempt < attempts => {
                    tracing::warn!(
                        error = %e,
                        attempt,
                        retry_in = %humantime::format_duration(delay),
                        "could not save coordinator state; retrying"
                    );
                    std::thread::sleep(delay);
                    delay = delay.saturating_mul(2);
                }
                Err(e) => {
                    let stop = WritesStopped {
                        reason: e.to_string(),
                    };
                    tracing::error!(
                        error = %e,
                        attempts,
                        "COULD NOT SAVE COORDINATOR STATE: {stop}. Submit, cancel and checkpoint \
                         now answer UNAVAILABLE; running jobs go on, but what changes from now \
                         on is lost when this coordinator stops"
                    );
                    let _ = self.stopped.set(stop);
                    // An elected leader steps down on it (server::serve).
                    let _ = self.fenced.send(true);
                    return;
                }
            }
        }
    }

    fn expect_for(&self, key: &str) -> Precondition {
        match self.versions.get(key) {
            Some(v) => Precondition::Version(*v),
            None => Precondition::Absent,
        }
    }

    /// Commits `pending`: one atomic commit, or several where the store limits a commit's
    /// operations or bytes (etcd). When it takes several, they go in an order that keeps
    /// every prefix of them consistent: `meta/` records (the job id counter) first, so that
    /// an interrupted batch can skip an id but never hand one out twice; then the job parts
    /// written (`jobparts/`), then the records that name them (job headers and the rest),
    /// then the parts deleted ([`crate::job::record`]).
    fn write_batch(
        &mut self,
        pending: &BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        let max_ops = self.store.max_ops_per_commit().unwrap_or(usize::MAX).max(1);
        let max_bytes = self.store.max_commit_bytes().unwrap_or(usize::MAX);
        let order = |(k, v): &(&String, &Option<Vec<u8>>)| match (
            k.starts_with("meta/"),
            k.starts_with("jobparts/"),
            v.is_some(),
        ) {
            (true, _, _) => 0,
            (_, true, true) => 1,
            (_, false, _) => 2,
            (_, true, false) => 3,
        };
        let mut ordered: Vec<(&String, &Option<Vec<u8>>)> = pending.iter().collect();
        ordered.sort_by_key(order);
        let mut chunk = BTreeMap::new();
        let mut bytes = 0;
        for (k, v) in ordered {
            let size = k.len() + v.as_ref().map_or(0, Vec::len);
            if !chunk.is_empty() && (chunk.len() >= max_ops || bytes + size > max_bytes) {
                self.write_chunk(&std::mem::take(&mut chunk))?;
                bytes = 0;
            }
            chunk.insert(k.clone(), v.clone());
            bytes += size;
        }
        if !chunk.is_empty() {
            self.write_chunk(&chunk)?;
        }
        Ok(())
    }

    /// One atomic commit of `pending`. On a conflict (another writer on the same store) this
    /// coordinator's records are written over theirs, key by key.
    fn write_chunk(
        &mut self,
        pending: &BTreeMap<String, Option<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        let mut ops = Vec::with_capacity(pending.len());
        for (k, v) in pending {
            let expect = self.expect_for(k);
            match v {
                Some(value) => ops.push(Op::Put {
                    key: k.clone(),
                    value: value.clone(),
                    expect,
                }),
                None if self.versions.contains_key(k) => ops.push(Op::Delete {
                    key: k.clone(),
                    expect,
                }),
                None => {}
            }
        }
        if ops.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = ops.iter().map(|op| op.key().to_owned()).collect();
        match self.commit(ops.clone()) {
            Ok(new_versions) => {
                for (k, v) in keys.into_iter().zip(new_versions) {
                    self.record(k, v);
                }
                Ok(())
            }
            Err(e) if e.is_conflict() => {
                tracing::error!(
                    error = %e,
                    "state store changed under this coordinator (is another coordinator using the same store?); \
                     writing this coordinator's state over it"
                );
                for op in ops {
                    let key = op.key().to_owned();
                    let current = self.store.get(&key)?.map(|v| v.version);
                    let expect = match current {
                        Some(v) => Precondition::Version(v),
                        None => Precondition::Absent,
                    };
                    let v = match op {
                        Op::Put { value, .. } => {
                            self.commit(vec![Op::put(key.clone(), value, expect)])?[0]
                        }
                        Op::Delete { .. } => {
                            self.commit(vec![Op::delete(key.clone(), expect)])?;
                            0
                        }
                    };
                    self.record(key, v);
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// One commit, fenced when this writer writes for an elected leader.
    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Version>, StoreError> {
        match &self.fence {
            Some(f) => self.store.commit_fenced(f, ops),
            None => self.store.commit(ops),
        }
    }

    /// Notes a key's version after a write (0: deleted).
    fn record(&mut self, key: String, version: Version) {
        if version == 0 {
            self.versions.remove(&key);
        } else {
            self.versions.insert(key, version);
        }
    }
}

/// The job id counter and its floor file.
///
/// Job ids are `NAME-N` with one counter per data dir. The counter itself is the store's
/// `meta/coordinator` record, written in the same commit as the job, so it is durable before
/// a submit is acknowledged and survives the removal of old jobs. A store moved aside as
/// damaged takes that record with it, and agents keep the rank logs of the old ids
/// (`<work dir>/<job>/gen-<g>/`), so the counter also reserves blocks of ids in
/// `<data dir>/job-ids` (fsynced before the first id of a block is handed out): a fresh store
/// starts above every id ever handed out on this data dir.
#[derive(Debug)]
pub struct JobIds {
    next: u64,
    /// Ids below this are reserved in the floor file.
    reserved: u64,
    file: Option<PathBuf>,
}

/// The floor file's name inside the data dir.
pub const JOB_IDS_FILE: &str = "job-ids";
/// Ids reserved per write of the floor file.
const ID_BLOCK: u64 = 1000;

/// The floor file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("job id floor file {}: {source}", path.display())]
pub struct JobIdsError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl JobIds {
    /// The counter for a data dir (`None`: nothing persists, as with the memory store), from
    /// the store's counter (`None` when the store is new or was reset).
    ///
    /// # Errors
    /// A floor file that exists but cannot be read or does not hold a number.
    pub fn load(data_dir: Option<&Path>, stored_next: Option<u64>) -> Result<JobIds, JobIdsError> {
        let file = data_dir.map(|d| d.join(JOB_IDS_FILE));
        let floor = match &file {
            None => None,
            Some(p) => match std::fs::read_to_string(p) {
                Ok(text) => Some(text.trim().parse::<u64>().map_err(|e| JobIdsError {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("expected one number, got {:?}: {e}", text.trim()),
                    ),
                })?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => {
                    return Err(JobIdsError {
                        path: p.clone(),
                        source,
                    });
                }
            },
        };
        let next = stored_next.or(floor).unwrap_or(1).max(1);
        let mut ids = JobIds {
            next,
            reserved: floor.unwrap_or(0),
            file,
        };
        // A data dir from before the floor file existed gets one now, not at the next submit.
        ids.reserve()?;
        Ok(ids)
    }

    /// Writes a new floor when every reserved id is taken.
    fn reserve(&mut self) -> Result<(), JobIdsError> {
        if self.next < self.reserved {
            return Ok(());
        }
        if let Some(path) = &self.file {
            let reserved = self.next.saturating_add(ID_BLOCK);
            write_durably(path, format!("{reserved}\n").as_bytes()).map_err(|source| {
                JobIdsError {
                    path: path.clone(),
                    source,
                }
            })?;
            self.reserved = reserved;
        }
        Ok(())
    }

    /// The next id [`JobIds::take`] hands out (what `meta/coordinator` records).
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Hands out the next id, reserving a new block in the floor file first when needed.
    ///
    /// # Errors
    /// The floor file cannot be written; no id is handed out then.
    pub fn take(&mut self) -> Result<u64, JobIdsError> {
        self.reserve()?;
        let id = self.next;
        self.next += 1;
        Ok(id)
    }
}

/// Writes `bytes` to `path` atomically (a temporary file in the same dir, fsynced, renamed,
/// the dir fsynced).
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// A store for tests of the persister and the loop: in memory, shared with the test, and
/// failing its next commits on demand.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    use ringmaster_store::{
        MemoryStore, Op, Precondition, StateStore, StoreError, Version, Versioned,
    };

    #[derive(Default)]
    pub(crate) struct Flaky {
        pub(crate) inner: MemoryStore,
        /// How many of the next commits fail (`u32::MAX`: all).
        pub(crate) failures: AtomicU32,
        pub(crate) commits: AtomicU32,
    }

    impl Flaky {
        pub(crate) fn new(failures: u32) -> Arc<Flaky> {
            let f = Flaky::default();
            f.failures.store(failures, SeqCst);
            Arc::new(f)
        }
    }

    /// The store the persister owns; the test keeps another handle on the same [`Flaky`].
    pub(crate) struct FlakyStore(pub(crate) Arc<Flaky>);

    impl StateStore for FlakyStore {
        fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
            self.0.inner.get(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
            self.0.inner.list(prefix)
        }
        fn put(
            &self,
            key: &str,
            value: &[u8],
            expect: Precondition,
        ) -> Result<Version, StoreError> {
            self.0.inner.put(key, value, expect)
        }
        fn delete(&self, key: &str, expect: Precondition) -> Result<bool, StoreError> {
            self.0.inner.delete(key, expect)
        }
        fn commit(&self, ops: Vec<Op>) -> Result<Vec<Version>, StoreError> {
            self.0.commits.fetch_add(1, SeqCst);
            let left = self.0.failures.load(SeqCst);
            if left > 0 {
                if left != u32::MAX {
                    self.0.failures.store(left - 1, SeqCst);
                }
                return Err(StoreError::Io {
                    path: "/data/state.redb".into(),
                    error: std::io::Error::other("No space left on device"),
                });
            }
            self.0.inner.commit(ops)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Flaky, FlakyStore};
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
            p.flush().wait().await.unwrap();
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

    /// A store the test and the persister both hold; with a [`CommitLog`], it also takes at
    /// most `max_ops` operations per commit and records each commit's keys.
    struct Shared<S>(std::sync::Arc<S>, Option<std::sync::Arc<CommitLog>>);

    #[derive(Default)]
    struct CommitLog {
        max_ops: usize,
        commits: std::sync::Mutex<Vec<Vec<String>>>,
    }

    impl<S: StateStore> StateStore for Shared<S> {
        fn get(
            &self,
            key: &str,
        ) -> Result<Option<ringmaster_store::Versioned>, ringmaster_store::StoreError> {
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
            if let Some(log) = &self.1 {
                assert!(ops.len() <= log.max_ops, "{} ops in one commit", ops.len());
                log.commits
                    .lock()
                    .unwrap()
                    .push(ops.iter().map(|o| o.key().to_owned()).collect());
            }
            self.0.commit(ops)
        }
        fn commit_fenced(
            &self,
            fence: &ringmaster_store::Fence,
            ops: Vec<Op>,
        ) -> Result<Vec<Version>, ringmaster_store::StoreError> {
            self.0.commit_fenced(fence, ops)
        }
        fn max_ops_per_commit(&self) -> Option<usize> {
            match &self.1 {
                Some(log) => Some(log.max_ops),
                None => self.0.max_ops_per_commit(),
            }
        }
        fn max_commit_bytes(&self) -> Option<usize> {
            self.0.max_commit_bytes()
        }
    }

    #[tokio::test]
    async fn batches_are_split_to_the_stores_limit_with_the_id_counter_first() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let log = std::sync::Arc::new(CommitLog {
            max_ops: 3,
            ..Default::default()
        });
        let (p, _) = Persister::start(
            Box::new(Shared(store.clone(), Some(log.clone()))),
            &["jobs/", "meta/"],
        )
        .unwrap();
        for i in 0..7 {
            p.put(format!("jobs/{i}"), vec![i]);
        }
        p.put("meta/coordinator".into(), b"{}".to_vec());
        p.flush().wait().await.unwrap();
        let commits = log.commits.lock().unwrap().clone();
        let keys: Vec<&String> = commits.iter().flatten().collect();
        assert_eq!(keys.len(), 8, "{commits:?}");
        assert!(
            commits[0].contains(&"meta/coordinator".to_owned()),
            "{commits:?}"
        );
        assert!(commits.len() >= 3, "{commits:?}");
        for i in 0..7u8 {
            assert_eq!(store.get(&format!("jobs/{i}")).unwrap().unwrap().value, [i]);
        }
    }

    #[tokio::test]
    async fn a_fenced_write_stops_the_writer_and_says_leadership_is_lost() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let created = store.put("leader/me", b"a", Precondition::Absent).unwrap();
        let fence = ringmaster_store::Fence {
            key: "leader/me".into(),
            created,
        };
        let (p, _) = Persister::start_fenced(
            Box::new(Shared(store.clone(), None)),
            &["jobs/"],
            quick(3),
            Some(fence),
        )
        .unwrap();
        p.put("jobs/a".into(), b"1".to_vec());
        p.flush().wait().await.unwrap();
        assert_eq!(store.get("jobs/a").unwrap().unwrap().value, b"1");
        // Another coordinator's election replaces ours.
        store.delete("leader/me", Precondition::Any).unwrap();
        store
            .put("leader/other", b"b", Precondition::Absent)
            .unwrap();
        p.put("jobs/a".into(), b"2".to_vec());
        let err = p.flush().wait().await.expect_err("fenced");
        assert!(err.reason.contains("no longer leads"), "{err}");
        tokio::time::timeout(Duration::from_secs(5), p.fenced())
            .await
            .expect("fenced() resolves");
        assert_eq!(store.get("jobs/a").unwrap().unwrap().value, b"1");
    }

    #[tokio::test]
    async fn a_foreign_write_is_overwritten_not_lost() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let (p, _) = Persister::start(Box::new(Shared(store.clone(), None)), &["jobs/"]).unwrap();
        p.put("jobs/a".into(), b"1".to_vec());
        p.flush().wait().await.unwrap();
        store.put("jobs/a", b"foreign", Precondition::Any).unwrap();
        p.put("jobs/a".into(), b"2".to_vec());
        p.flush().wait().await.unwrap();
        assert_eq!(store.get("jobs/a").unwrap().unwrap().value, b"2");
    }

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            first_delay: Duration::from_millis(1),
        }
    }

    #[tokio::test]
    async fn a_failed_commit_is_retried_then_lands() {
        let store = Flaky::new(2);
        let (p, _) =
            Persister::start_with(Box::new(FlakyStore(store.clone())), &["jobs/"], quick(3))
                .unwrap();
        p.put("jobs/a".into(), b"1".to_vec());
        p.flush().wait().await.expect("the third try succeeds");
        assert_eq!(store.inner.get("jobs/a").unwrap().unwrap().value, b"1");
        assert_eq!(store.commits.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert!(p.stopped().is_none());
    }

    #[tokio::test]
    async fn spent_retries_stop_every_later_write_and_say_why() {
        let store = Flaky::new(u32::MAX);
        let (p, _) =
            Persister::start_with(Box::new(FlakyStore(store.clone())), &["jobs/"], quick(3))
                .unwrap();
        p.put("jobs/a".into(), b"1".to_vec());
        let err = p.flush().wait().await.expect_err("every try fails");
        assert!(err.reason.contains("No space left on device"), "{err}");
        assert!(
            err.to_string().contains("stopped accepting writes"),
            "{err}"
        );
        assert_eq!(p.stopped(), Some(&err));
        assert_eq!(store.commits.load(std::sync::atomic::Ordering::SeqCst), 3);
        // Later writes are dropped, not tried, and their flushes fail too, even once the
        // store would work again: what was lost in between would make them inconsistent.
        store.failures.store(0, std::sync::atomic::Ordering::SeqCst);
        p.put("jobs/b".into(), b"2".to_vec());
        assert_eq!(p.flush().wait().await, Err(err));
        assert_eq!(store.commits.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(store.inner.get("jobs/b").unwrap(), None);
    }

    #[tokio::test]
    async fn a_flush_waits_for_the_commit_that_holds_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = ringmaster_store::open_url("", dir.path()).unwrap();
        let (p, _) = Persister::start(store, &["jobs/"]).unwrap();
        p.put("jobs/x".into(), b"x".to_vec());
        p.flush().wait().await.unwrap();
        // Read through a second handle on the file: the record is on disk, not in a queue.
        drop(p);
        let again = ringmaster_store::open_url("", dir.path()).unwrap();
        assert_eq!(again.get("jobs/x").unwrap().unwrap().value, b"x");
    }

    #[test]
    fn job_ids_are_never_reused_on_a_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let d = Some(dir.path());
        // A fresh data dir starts at 1 and reserves a block before handing out the first id.
        let mut ids = JobIds::load(d, None).unwrap();
        assert_eq!((ids.take().unwrap(), ids.take().unwrap()), (1, 2));
        assert_eq!(ids.next(), 3);
        let floor: u64 = std::fs::read_to_string(dir.path().join(JOB_IDS_FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(floor > 2, "{floor}");
        // Restarted with its store: the store's counter rules.
        let mut ids = JobIds::load(d, Some(3)).unwrap();
        assert_eq!(ids.take().unwrap(), 3);
        // The store was reset (moved aside): the floor rules, above everything handed out.
        let mut ids = JobIds::load(d, None).unwrap();
        let id = ids.take().unwrap();
        assert!(id > 3 && id == floor, "{id} {floor}");
        // Crossing the reserved block writes a new floor first.
        let mut ids = JobIds::load(d, Some(floor + ID_BLOCK - 1)).unwrap();
        assert_eq!(ids.take().unwrap(), floor + ID_BLOCK - 1);
        assert_eq!(ids.take().unwrap(), floor + ID_BLOCK);
        let floor2: u64 = std::fs::read_to_string(dir.path().join(JOB_IDS_FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(floor2 > floor + ID_BLOCK, "{floor2}");
        // A data dir from before the floor file: one is written at load.
        let old = tempfile::tempdir().unwrap();
        JobIds::load(Some(old.path()), Some(40)).unwrap();
        assert!(old.path().join(JOB_IDS_FILE).is_file());
        assert!(
            JobIds::load(Some(old.path()), None)
                .unwrap()
                .take()
                .unwrap()
                > 40
        );
        // Nothing persists without a data dir.
        let mut mem = JobIds::load(None, None).unwrap();
        assert_eq!(mem.take().unwrap(), 1);
    }

    #[test]
    fn a_garbled_floor_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOB_IDS_FILE), "12x\n").unwrap();
        let err = JobIds::load(Some(dir.path()), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(JOB_IDS_FILE) && err.contains("12x"), "{err}");
    }
}
