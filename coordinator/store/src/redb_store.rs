//! [`RedbStore`]: the embedded, durable store, one redb file in the
//! coordinator's data dir.
//!
//! Tables:
//! - `kv`: `&str -> &[u8]`, each value an 8-byte big-endian version followed
//!   by the stored bytes;
//! - `meta`: `&str -> u64`, holding `revision` (the last version handed out)
//!   and `schema` (the layout version of this file, currently 1).
//!
//! Each write is one redb write transaction, committed with redb's default
//! `Durability::Immediate` (fsynced before the call returns). redb locks the
//! file, so only one process can have the store open at a time.
//!
//! Damage is an error, never a fresh start or a panic: a new file is built
//! under a temporary name and linked into place whole, an existing one has its
//! header checked before redb reads it, and every call into redb runs under
//! [`guard`] (see `damage.rs`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{
    Database, DatabaseError, ReadableTable, ReadableTableMetadata, StorageError, TableDefinition,
};

use crate::damage::{check_header, guard};
use crate::plan::{check_key, check_ops, writes_anything};
use crate::{Op, Precondition, StateStore, StoreError, Version, Versioned};

/// The database file's name inside the data dir.
pub const DB_FILE_NAME: &str = "state.redb";

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_SCHEMA: &str = "schema";
/// The layout version written to `meta.schema`.
const SCHEMA_VERSION: u64 = 1;
const VERSION_LEN: usize = std::mem::size_of::<Version>();

/// A durable [`StateStore`] in `<data dir>/state.redb`.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Open (creating if needed) the store in `dir`: the directory and the
    /// database file `dir/state.redb`.
    ///
    /// A new file is built under a temporary name and linked into place once
    /// initialised, so `state.redb` always holds a whole database: an empty,
    /// truncated or garbled one is damage, reported as [`StoreError::Corrupt`]
    /// naming the file (never a silent fresh start, never a panic).
    ///
    /// Fails with [`StoreError::Locked`] while another store (in this or
    /// another process) has the same file open, with [`StoreError::Io`]
    /// naming the path when the directory or file cannot be created or
    /// opened, and with [`StoreError::Corrupt`] when the file is damaged or
    /// not a store.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            error: source,
        })?;
        let path = dir.join(DB_FILE_NAME);
        match fs::symlink_metadata(&path) {
            Ok(_) => check_header(&path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_new(dir, &path)?,
            Err(source) => {
                return Err(StoreError::Io {
                    path,
                    error: source,
                });
            }
        }
        let db = guard(&path, "opening", || {
            Database::open(&path).map_err(|e| open_error(e, &path, dir))
        })?;
        let store = RedbStore { db, path };
        guard(&store.path, "initialising", || store.init())?;
        Ok(store)
    }

    /// Moves the database file of `dir` aside, to `state.redb.damaged-<unix seconds>` (with a
    /// `-N` suffix if that name is taken), so that the next [`RedbStore::open`] starts with an
    /// empty store. Returns the new path, or `None` when there was no file.
    ///
    /// # Errors
    /// [`StoreError::Io`] naming the file when it cannot be renamed.
    pub fn move_aside(dir: &Path) -> Result<Option<PathBuf>, StoreError> {
        let path = dir.join(DB_FILE_NAME);
        if fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let base = format!("{DB_FILE_NAME}.damaged-{secs}");
        let target = (0..)
            .map(|n| {
                dir.join(if n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                })
            })
            .find(|p| fs::symlink_metadata(p).is_err())
            .expect("some suffix is free");
        fs::rename(&path, &target).map_err(|source| StoreError::Io {
            path: path.clone(),
            error: source,
        })?;
        sync_dir(dir)?;
        Ok(Some(target))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create the tables on first open and check the layout version.
    fn init(&self) -> Result<(), StoreError> {
        let ctx = "initialising";
        let txn = self.db.begin_write().map_err(|e| self.err(ctx, e))?;
        {
            let kv = txn.open_table(KV).map_err(|e| self.err(ctx, e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.err(ctx, e))?;
            let schema = meta
                .get(META_SCHEMA)
                .map_err(|e| self.err(ctx, e))?
                .map(|g| g.value());
            match schema {
                Some(SCHEMA_VERSION) => {}
                Some(other) => {
                    return Err(StoreError::Corrupt {
                        path: self.path.clone(),
                        detail: format!(
                            "layout version {other}, this build reads version {SCHEMA_VERSION}"
                        ),
                    });
                }
                None => {
                    let empty = kv.is_empty().map_err(|e| self.err(ctx, e))?
                        && meta.is_empty().map_err(|e| self.err(ctx, e))?;
                    if !empty {
                        return Err(StoreError::Corrupt {
                            path: self.path.clone(),
                            detail: "data without a layout version".to_owned(),
                        });
                    }
                    meta.insert(META_SCHEMA, SCHEMA_VERSION)
                        .map_err(|e| self.err(ctx, e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.err(ctx, e))
    }

    /// Map a redb error met while `context`.
    fn err(&self, context: &str, e: impl Into<redb::Error>) -> StoreError {
        match e.into() {
            redb::Error::Io(source) => StoreError::Io {
                path: self.path.clone(),
                error: source,
            },
            redb::Error::Corrupted(msg) => StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("{context}: {msg}"),
            },
            other => StoreError::Backend(format!("{} ({context}): {other}", self.path.display())),
        }
    }

    /// Decode a stored `kv` value: 8-byte big-endian version, then the bytes.
    fn decode(&self, key: &str, raw: &[u8]) -> Result<Versioned, StoreError> {
        let corrupt = || StoreError::Corrupt {
            path: self.path.clone(),
            detail: format!(
                "key {key:?} holds {} bytes, no valid version prefix",
                raw.len()
            ),
        };
        let (head, value) = raw.split_at_checked(VERSION_LEN).ok_or_else(corrupt)?;
        let version = Version::from_be_bytes(head.try_into().map_err(|_| corrupt())?);
        if version == 0 {
            return Err(corrupt());
        }
        Ok(Versioned {
            value: value.to_vec(),
            version,
        })
    }

    /// Validate and apply `ops` in one write transaction; returns each op's
    /// current version before the commit and the new revision.
    fn apply(&self, ops: Vec<Op>) -> Result<(Vec<Option<Version>>, Version), StoreError> {
        let ctx = "writing";
        let txn = self.db.begin_write().map_err(|e| self.err(ctx, e))?;
        let (current, revision) = {
            let mut kv = txn.open_table(KV).map_err(|e| self.err(ctx, e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.err(ctx, e))?;
            let current = check_ops(&ops, |key| {
                match kv.get(key).map_err(|e| self.err(ctx, e))? {
                    Some(raw) => Ok(Some(self.decode(key, raw.value())?.version)),
                    None => Ok(None),
                }
            })?;
            let last = meta
                .get(META_REVISION)
                .map_err(|e| self.err(ctx, e))?
                .map_or(0, |g| g.value());
            if !writes_anything(&ops, &current) {
                // Nothing to write: the transaction is dropped (aborted).
                return Ok((current, last));
            }
            let revision = last.checked_add(1).ok_or_else(|| StoreError::Corrupt {
                path: self.path.clone(),
                detail: "revision counter overflow".to_owned(),
            })?;
            let mut buf = Vec::new();
            for op in &ops {
                match op {
                    Op::Put { key, value, .. } => {
                        buf.clear();
                        buf.reserve(VERSION_LEN + value.len());
                        buf.extend_from_slice(&revision.to_be_bytes());
                        buf.extend_from_slice(value);
                        kv.insert(key.as_str(), buf.as_slice())
                            .map_err(|e| self.err(ctx, e))?;
                    }
                    Op::Delete { key, .. } => {
                        kv.remove(key.as_str()).map_err(|e| self.err(ctx, e))?;
                    }
                }
            }
            meta.insert(META_REVISION, revision)
                .map_err(|e| self.err(ctx, e))?;
            (current, revision)
        };
        txn.commit().map_err(|e| self.err("committing", e))?;
        Ok((current, revision))
    }
}

impl StateStore for RedbStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        guard(&self.path, "reading", || self.read(key))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        guard(&self.path, "listing", || self.scan(prefix))
    }

    fn put(&self, key: &str, value: &[u8], expect: Precondition) -> Result<Version, StoreError> {
        let (_, revision) = self.apply_guarded(vec![Op::put(key, value, expect)])?;
        Ok(revision)
    }

    fn delete(&self, key: &str, expect: Precondition) -> Result<bool, StoreError> {
        let (current, _) = self.apply_guarded(vec![Op::delete(key, expect)])?;
        Ok(current[0].is_some())
    }

    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Version>, StoreError> {
        let kinds: Vec<bool> = ops.iter().map(|op| matches!(op, Op::Put { .. })).collect();
        let (_, revision) = self.apply_guarded(ops)?;
        Ok(kinds
            .into_iter()
            .map(|is_put| if is_put { revision } else { 0 })
            .collect())
    }
}

impl RedbStore {
    fn apply_guarded(&self, ops: Vec<Op>) -> Result<(Vec<Option<Version>>, Version), StoreError> {
        guard(&self.path, "writing", || self.apply(ops))
    }

    fn read(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let ctx = "reading";
        let txn = self.db.begin_read().map_err(|e| self.err(ctx, e))?;
        let kv = txn.open_table(KV).map_err(|e| self.err(ctx, e))?;
        match kv.get(key).map_err(|e| self.err(ctx, e))? {
            Some(raw) => Ok(Some(self.decode(key, raw.value())?)),
            None => Ok(None),
        }
    }

    fn scan(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let ctx = "listing";
        let txn = self.db.begin_read().map_err(|e| self.err(ctx, e))?;
        let kv = txn.open_table(KV).map_err(|e| self.err(ctx, e))?;
        let mut out = Vec::new();
        for entry in kv.range(prefix..).map_err(|e| self.err(ctx, e))? {
            let (k, v) = entry.map_err(|e| self.err(ctx, e))?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push((key.to_string(), self.decode(key, v.value())?));
        }
        Ok(out)
    }
}

/// Maps an error of [`Database::open`].
fn open_error(e: DatabaseError, path: &Path, dir: &Path) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
            path: path.to_path_buf(),
            data_dir: dir.to_path_buf(),
        },
        DatabaseError::Storage(StorageError::Io(source))
            if source.kind() == std::io::ErrorKind::InvalidData =>
        {
            StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: format!("not a valid redb database ({source})"),
            }
        }
        DatabaseError::Storage(StorageError::Io(source)) => StoreError::Io {
            path: path.to_path_buf(),
            error: source,
        },
        DatabaseError::Storage(StorageError::Corrupted(msg)) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: msg,
        },
        DatabaseError::UpgradeRequired(v) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("redb file format version {v} needs a manual upgrade"),
        },
        other => StoreError::Backend(format!("opening {}: {other}", path.display())),
    }
}

/// fsyncs a directory, so that a rename or link in it is durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            error: source,
        })
}

/// Creates and initialises a new database at `path`: built under a temporary name in `dir`,
/// then hard-linked into place (which, unlike a rename, fails if another process created
/// `path` meanwhile), so that `path` never holds a partly written database.
fn create_new(dir: &Path, path: &Path) -> Result<(), StoreError> {
    let tmp = dir.join(format!(".{DB_FILE_NAME}.new-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io {
            path: p,
            error: source,
        }
    };
    {
        let db = guard(&tmp, "creating", || {
            Database::create(&tmp).map_err(|e| open_error(e, &tmp, dir))
        })?;
        let store = RedbStore {
            db,
            path: tmp.clone(),
        };
        guard(&tmp, "initialising", || store.init())?;
    }
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_dir(dir),
        // Another process created it first: open theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;
    use std::sync::Arc;

    fn fresh() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("data")).unwrap();
        (dir, store)
    }

    #[test]
    fn conformance_basic() {
        let (_dir, store) = fresh();
        conformance::basic(&store);
    }

    #[test]
    fn conformance_preconditions() {
        let (_dir, store) = fresh();
        conformance::preconditions(&store);
    }

    #[test]
    fn conformance_commit() {
        let (_dir, store) = fresh();
        conformance::commit(&store);
    }

    #[test]
    fn conformance_versions() {
        let (_dir, store) = fresh();
        conformance::versions_increase(&store);
    }

    #[test]
    fn conformance_concurrent_cas() {
        let (_dir, store) = fresh();
        conformance::concurrent_cas(Arc::new(store));
    }

    #[test]
    fn conformance_large_values_and_long_listings() {
        let (_dir, store) = fresh();
        conformance::large_values(&store);
        conformance::long_listings(&store);
    }

    #[test]
    fn creates_dir_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a").join("b");
        let store = RedbStore::open(&data).unwrap();
        assert_eq!(store.path(), data.join(DB_FILE_NAME));
        assert!(data.join(DB_FILE_NAME).is_file());
    }

    #[test]
    fn survives_reopen_and_versions_keep_growing() {
        let dir = tempfile::tempdir().unwrap();
        let (va, vb, deleted_version) = {
            let store = RedbStore::open(dir.path()).unwrap();
            let va = store.put("jobs/a", b"alpha", Precondition::Absent).unwrap();
            let vb = store.put("jobs/b", b"", Precondition::Absent).unwrap();
            let vc = store.put("jobs/c", b"gone", Precondition::Absent).unwrap();
            assert!(store.delete("jobs/c", Precondition::Version(vc)).unwrap());
            (va, vb, vc)
        };
        // Dropped: the lock is released and a reopen sees everything.
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(
            store.get("jobs/a").unwrap(),
            Some(Versioned {
                value: b"alpha".to_vec(),
                version: va
            })
        );
        assert_eq!(
            store.get("jobs/b").unwrap(),
            Some(Versioned {
                value: Vec::new(),
                version: vb
            })
        );
        assert_eq!(store.get("jobs/c").unwrap(), None);
        let keys: Vec<String> = store
            .list("jobs/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["jobs/a", "jobs/b"]);

        // CAS against a version read before the restart still works.
        let va2 = store
            .put("jobs/a", b"alpha2", Precondition::Version(va))
            .unwrap();
        assert!(va2 > deleted_version, "{va2} <= {deleted_version}");
        // A re-created key never reuses an old version.
        let vc2 = store.put("jobs/c", b"back", Precondition::Absent).unwrap();
        assert!(vc2 > va2);
        drop(store);

        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(store.get("jobs/a").unwrap().unwrap().version, va2);
        assert_eq!(store.get("jobs/c").unwrap().unwrap().version, vc2);
        let vd = store.put("jobs/d", b"d", Precondition::Any).unwrap();
        assert!(vd > vc2);
    }

    #[test]
    fn second_open_fails_while_first_is_alive() {
        let dir = tempfile::tempdir().unwrap();
        let first = RedbStore::open(dir.path()).unwrap();
        first.put("k", b"v", Precondition::Any).unwrap();

        let err = RedbStore::open(dir.path()).expect_err("file is locked");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("another coordinator may be using the data dir"),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        // Also through open_url.
        let err = crate::open_url("embedded", dir.path())
            .err()
            .expect("file is locked");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");

        // The first store is unaffected, and once it is gone the dir opens.
        assert_eq!(first.get("k").unwrap().unwrap().value, b"v");
        drop(first);
        let again = RedbStore::open(dir.path()).unwrap();
        assert_eq!(again.get("k").unwrap().unwrap().value, b"v");
    }

    #[test]
    fn unwritable_path_is_io_error_naming_it() {
        // A path under a regular file cannot be created, even by root.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let target = file.join("data");
        let err = RedbStore::open(&target).expect_err("parent is a regular file");
        match &err {
            StoreError::Io { path, .. } => assert_eq!(path, &target),
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(
            err.to_string().contains(&target.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn data_dir_that_is_a_file_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state-dir");
        fs::write(&file, b"x").unwrap();
        let err = RedbStore::open(&file).expect_err("a file, not a dir");
        assert!(
            matches!(err, StoreError::Io { ref path, .. } if path == &file),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(DB_FILE_NAME);
        fs::write(&db, vec![0xAB; 4096]).unwrap();
        let err = RedbStore::open(dir.path()).expect_err("not a redb file");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains(&db.display().to_string()), "{err}");
    }

    #[test]
    fn rejects_a_newer_layout() {
        let dir = tempfile::tempdir().unwrap();
        drop(RedbStore::open(dir.path()).unwrap());
        {
            let db = Database::create(dir.path().join(DB_FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(META_SCHEMA, SCHEMA_VERSION + 1)
                .unwrap();
            txn.commit().unwrap();
        }
        let err = RedbStore::open(dir.path()).expect_err("newer layout");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("layout version 2"), "{err}");
    }

    #[test]
    fn damaged_value_is_corrupt_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        drop(RedbStore::open(dir.path()).unwrap());
        {
            let db = Database::create(dir.path().join(DB_FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(KV)
                .unwrap()
                .insert("short", [1u8, 2, 3].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let store = RedbStore::open(dir.path()).unwrap();
        let err = store.get("short").expect_err("3-byte value");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("\"short\""), "{err}");
        let err = store.list("").expect_err("3-byte value");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    }

    /// A store with some data, dropped; returns the file's bytes.
    fn written_store(dir: &Path) -> Vec<u8> {
        let store = RedbStore::open(dir).unwrap();
        for i in 0..200 {
            store
                .put(
                    &format!("jobs/j-{i}"),
                    &vec![i as u8; 700],
                    Precondition::Any,
                )
                .unwrap();
        }
        drop(store);
        fs::read(dir.join(DB_FILE_NAME)).unwrap()
    }

    /// Opens `dir` and reads everything: the first error, which must be damage naming the
    /// file (a panic fails the test).
    fn open_and_read(dir: &Path) -> Result<(), StoreError> {
        let store = RedbStore::open(dir)?;
        store.list("")?;
        store.get("jobs/j-7")?;
        store.put("jobs/new", b"x", Precondition::Any)?;
        Ok(())
    }

    fn assert_damage(err: StoreError, dir: &Path, what: &str) {
        assert!(err.is_damage(), "{what}: {err:?}");
        let msg = err.to_string();
        let file = dir.join(DB_FILE_NAME).display().to_string();
        assert!(msg.contains(&file), "{what}: {msg}");
        assert!(msg.contains("is damaged"), "{what}: {msg}");
    }

    #[test]
    fn an_empty_file_is_damage_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        written_store(dir.path());
        let db = dir.path().join(DB_FILE_NAME);
        fs::write(&db, b"").unwrap();
        let err = RedbStore::open(dir.path()).expect_err("0 bytes");
        assert!(err.to_string().contains("empty (0 bytes)"), "{err}");
        assert_damage(err, dir.path(), "empty");
        assert_eq!(fs::metadata(&db).unwrap().len(), 0, "left as it was");
    }

    #[test]
    fn a_truncated_file_is_damage_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = written_store(dir.path());
        let db = dir.path().join(DB_FILE_NAME);
        for len in [
            5,
            100,
            4095,
            4096,
            5000,
            bytes.len() / 2,
            bytes.len() - 4096,
        ] {
            fs::write(&db, &bytes[..len]).unwrap();
            let err = open_and_read(dir.path()).expect_err("truncated");
            if len >= 4096 {
                assert!(err.to_string().contains("truncated"), "{len}: {err}");
            }
            assert_damage(err, dir.path(), &format!("truncated to {len}"));
        }
    }

    /// A deterministic byte soup (xorshift).
    fn soup(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_garbled_file_is_damage_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = written_store(dir.path());
        let db = dir.path().join(DB_FILE_NAME);
        let len = bytes.len();
        // Over the header page (after the magic number), the region headers, the data pages
        // and everything but the magic number in turn. redb panics on some of these (caught);
        // whatever it does, the answer is damage naming the file or whole data.
        let ranges = [
            (9, 4096),
            (4096, 3 * 4096),
            (len / 4, len / 2),
            (len / 2, len),
            (9, len),
        ];
        for (i, (from, to)) in ranges.into_iter().enumerate() {
            let mut b = bytes.clone();
            b[from..to].copy_from_slice(&soup(to - from, 0x9E37_79B9 + i as u64));
            fs::write(&db, &b).unwrap();
            // Garbage where redb keeps nothing live (free pages) harms nothing: Ok is fine.
            if let Err(e) = open_and_read(dir.path()) {
                assert_damage(e, dir.path(), &format!("garbled {from}..{to}"));
            }
        }
        let mut b = bytes.clone();
        b[..4096].copy_from_slice(&soup(4096, 7));
        fs::write(&db, &b).unwrap();
        let err = open_and_read(dir.path()).expect_err("garbled header");
        assert!(err.to_string().contains("not a redb database"), "{err}");
        assert_damage(err, dir.path(), "garbled header");
    }

    #[test]
    fn move_aside_keeps_the_old_file_and_the_next_open_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RedbStore::move_aside(dir.path()).unwrap(), None);
        written_store(dir.path());
        let db = dir.path().join(DB_FILE_NAME);
        fs::write(&db, b"").unwrap();
        let moved = RedbStore::move_aside(dir.path()).unwrap().expect("moved");
        let name = moved.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("state.redb.damaged-"), "{name}");
        assert!(moved.is_file());
        assert!(!db.exists());
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(store.list("").unwrap().is_empty());
        drop(store);
        // A second move in the same second takes a suffix instead of replacing the first.
        let again = RedbStore::move_aside(dir.path()).unwrap().expect("moved");
        assert_ne!(again, moved);
        assert!(moved.is_file() && again.is_file());
    }

    #[test]
    fn a_new_file_appears_whole_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().unwrap();
        drop(RedbStore::open(dir.path()).unwrap());
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [DB_FILE_NAME]);
        // Its header passes the checks.
        check_header(&dir.path().join(DB_FILE_NAME)).unwrap();
    }
}
