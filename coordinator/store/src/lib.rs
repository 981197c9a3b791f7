//! The coordinator's persistent state: a small key/value [`StateStore`] with
//! versioned compare-and-swap, shaped like etcd, with an embedded backend
//! (redb) and an etcd backend.
//!
//! Every write of a key gets a new [`Version`], taken from a store-wide
//! revision counter (like etcd's `mod_revision`): versions are `> 0`, never
//! reused, and grow with every write, also across restarts. Writes carry a
//! [`Precondition`]; a failed one is a [`StoreError::Conflict`], which is
//! retryable after re-reading the key. [`StateStore::commit`] applies several
//! operations atomically; like an etcd transaction, all of its operations get
//! the same new version.
//!
//! The API is blocking; the coordinator calls it from a dedicated thread.
//!
//! # Layout
//!
//! - `lib.rs`: the shared types ([`Version`], [`Versioned`], [`Precondition`],
//!   [`Op`]), [`StoreError`], the [`StateStore`] trait and [`open_url`].
//! - `plan.rs`: validation shared by the backends (key checks, preconditions
//!   checked against the state before a commit).
//! - `memory.rs`: [`MemoryStore`], a `Mutex<BTreeMap>` for unit tests.
//! - `redb_store.rs`: [`RedbStore`], the embedded, durable store in
//!   `<data dir>/state.redb`.
//! - `etcd_store.rs`: [`EtcdStore`], the state in an etcd cluster
//!   (`etcd://h1:2379,h2:2379/prefix`), with [`EtcdOptions`] for TLS and users.
//! - `election.rs`: [`Elector`] and [`Leadership`]: leader election among coordinators on
//!   an etcd lease; the leadership is the [`Fence`] of every leader write.
//! - `testing.rs`: a real etcd member for tests ([`testing::EtcdServer`]).
//! - `damage.rs`: checks of a redb file's header before redb reads it, and
//!   the guard that turns a panic inside redb into [`StoreError::Corrupt`].
//! - `conformance.rs` (tests only): one behavioural test suite run against
//!   every backend.

use std::fmt;
use std::path::{Path, PathBuf};

mod damage;
mod election;
mod etcd_store;
mod memory;
mod plan;
mod redb_store;

pub mod testing;

#[cfg(test)]
mod conformance;

pub use election::{Elector, Leadership};
pub use etcd_store::{EtcdOptions, EtcdStore, EtcdUrl};
pub use memory::MemoryStore;
pub use redb_store::{DB_FILE_NAME, RedbStore};

/// A version `> 0` identifies one write of a key; it grows with every write of
/// that key. It is taken from a store-wide revision counter (like etcd's
/// `mod_revision`), so it also grows across keys and survives restarts.
pub type Version = u64;

/// A stored value and the version of the write that stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: Version,
}

/// What a write expects of the key's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precondition {
    /// Write unconditionally.
    Any,
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this version. Versions are `> 0`, so
    /// `Version(0)` never matches: use [`Precondition::Absent`] instead.
    Version(Version),
}

impl Precondition {
    /// Whether a key whose current version is `current` (`None`: absent)
    /// satisfies this precondition.
    pub fn matches(self, current: Option<Version>) -> bool {
        match self {
            Precondition::Any => true,
            Precondition::Absent => current.is_none(),
            Precondition::Version(v) => current == Some(v),
        }
    }
}

impl fmt::Display for Precondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Precondition::Any => f.write_str("any"),
            Precondition::Absent => f.write_str("absent"),
            Precondition::Version(v) => write!(f, "version {v}"),
        }
    }
}

/// A leadership that writes depend on: the election key (a store key) and the revision it
/// was created at. A write fenced by it lands only while that key still exists with that
/// creation revision, so a deposed leader that still runs writes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    pub key: String,
    pub created: Version,
}

/// One operation of an atomic [`StateStore::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        expect: Precondition,
    },
    Delete {
        key: String,
        expect: Precondition,
    },
}

impl Op {
    /// Shorthand for [`Op::Put`].
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>, expect: Precondition) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            expect,
        }
    }

    /// Shorthand for [`Op::Delete`].
    pub fn delete(key: impl Into<String>, expect: Precondition) -> Op {
        Op::Delete {
            key: key.into(),
            expect,
        }
    }

    /// The key this operation writes.
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key, .. } => key,
        }
    }

    /// The precondition of this operation.
    pub fn expect(&self) -> Precondition {
        match self {
            Op::Put { expect, .. } | Op::Delete { expect, .. } => *expect,
        }
    }
}

/// Shows an optional current version as "absent" or "version N".
struct Current(Option<Version>);

impl fmt::Display for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("absent"),
            Some(v) => write!(f, "version {v}"),
        }
    }
}

/// Errors of a [`StateStore`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A precondition failed (compare-and-swap lost). Retryable after
    /// re-reading the key. In a commit, nothing was written.
    #[error("conflict on key {key:?}: expected {expected}, found {}", Current(*current))]
    Conflict {
        key: String,
        expected: Precondition,
        /// The key's version when the precondition was checked (`None`: absent).
        current: Option<Version>,
    },
    /// Opening, creating, reading or writing a file failed.
    /// (The I/O error is part of the message, not a `source()`: a chain printed with `{:#}`
    /// would show it twice.)
    #[error("state store I/O error at {}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The database file is locked by another open store.
    #[error(
        "state store {} is already open (locked); another coordinator may be using the data dir {}",
        path.display(),
        data_dir.display()
    )]
    Locked { path: PathBuf, data_dir: PathBuf },
    /// The stored data is damaged (an empty, truncated or garbled file) or not in a format
    /// this build understands. Never retried; the coordinator refuses to start on it rather
    /// than start afresh (see [`RedbStore::move_aside`]).
    #[error("state store {} is damaged: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    /// The request itself is invalid (empty key, a key twice in one commit).
    #[error("invalid state store request: {0}")]
    Invalid(String),
    /// The store URL is not one this build can open.
    #[error("state store URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    /// No etcd endpoint answered when the store was opened.
    #[error("etcd unreachable at {endpoints}: {detail}")]
    Unreachable { endpoints: String, detail: String },
    /// A fenced write found its leadership gone (the fence key deleted or created anew):
    /// nothing was written. Never retried.
    #[error("write fenced: leadership {key:?} (created at revision {created}) is gone")]
    Fenced { key: String, created: Version },
    /// The backend cannot do what was asked (e.g. fencing on a store without elections).
    #[error("state store: {0}")]
    Unsupported(String),
    /// Any other backend failure, with context.
    #[error("state store backend error: {0}")]
    Backend(String),
}

impl StoreError {
    /// Whether this is a failed precondition ([`StoreError::Conflict`]).
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    /// Whether a fenced write found its leadership gone ([`StoreError::Fenced`]).
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }

    /// Whether the stored data is damaged ([`StoreError::Corrupt`]).
    pub fn is_damage(&self) -> bool {
        matches!(self, StoreError::Corrupt { .. })
    }
}

/// A versioned key/value store with compare-and-swap writes.
///
/// Keys are non-empty strings, ordered bytewise.
pub trait StateStore: Send + Sync + 'static {
    /// The current value and version of `key`, if present.
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// All keys with the prefix, sorted by key (`""` lists everything).
    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;

    /// Put with a precondition; returns the new version.
    fn put(&self, key: &str, value: &[u8], expect: Precondition) -> Result<Version, StoreError>;

    /// Delete with a precondition; returns whether the key existed.
    /// Deleting an absent key with [`Precondition::Any`] or
    /// [`Precondition::Absent`] succeeds and returns `false`.
    fn delete(&self, key: &str, expect: Precondition) -> Result<bool, StoreError>;

    /// Apply all ops atomically: all preconditions are checked first, against
    /// the state before the commit; one conflict means nothing is written.
    /// A key may appear only once per commit. Returns the new version of each
    /// op (0 for deletes); all puts of one commit get the same version.
    fn commit(&self, ops: Vec<Op>) -> Result<Vec<Version>, StoreError>;

    /// The most operations one commit may hold, where the backend limits it (etcd refuses
    /// transactions over `--max-txn-ops`, 128 by default). Writers of many independent
    /// records split their batches to fit.
    fn max_ops_per_commit(&self) -> Option<usize> {
        None
    }

    /// The most bytes (keys and values) one commit should carry, where the backend limits it
    /// (etcd refuses requests over `--max-request-bytes`, 1.5 MiB by default).
    fn max_commit_bytes(&self) -> Option<usize> {
        None
    }

    /// [`StateStore::commit`], applied only while `fence` holds (its key exists, created at
    /// its revision); otherwise [`StoreError::Fenced`] and nothing is written. Checked in the
    /// same atomic step as the preconditions. Stores without elections do not fence.
    fn commit_fenced(&self, fence: &Fence, ops: Vec<Op>) -> Result<Vec<Version>, StoreError> {
        let _ = (fence, ops);
        Err(StoreError::Unsupported(
            "fenced writes need a store with leader election (etcd)".to_string(),
        ))
    }
}

/// Open the store named by `url` with default [`EtcdOptions`]; see [`open_url_with`].
pub fn open_url(url: &str, data_dir: &Path) -> Result<Box<dyn StateStore>, StoreError> {
    open_url_with(url, data_dir, &EtcdOptions::default())
}

/// Whether `url` names a store outside this machine (etcd), which the data dir does not hold.
pub fn is_remote(url: &str) -> bool {
    url.trim().starts_with("etcd://")
}

/// Open the store named by `url`:
///
/// - `""`, `"embedded"` or `"redb"`: a [`RedbStore`] in `data_dir`;
/// - `"memory"`: a [`MemoryStore`] (nothing persists);
/// - `"etcd://host:port[,host:port...][/prefix]"`: an [`EtcdStore`], reached with `etcd`
///   (TLS, user); fails naming each endpoint when none answers;
/// - anything else: an error naming the URL.
pub fn open_url_with(
    url: &str,
    data_dir: &Path,
    etcd: &EtcdOptions,
) -> Result<Box<dyn StateStore>, StoreError> {
    match url.trim() {
        "" | "embedded" | "redb" => Ok(Box::new(RedbStore::open(data_dir)?)),
        "memory" => Ok(Box::new(MemoryStore::new())),
        u if is_remote(u) => Ok(Box::new(EtcdStore::open(u, etcd)?)),
        _ => Err(StoreError::Url {
            url: url.to_string(),
            reason: "unknown store; expected \"embedded\", \"redb\", \"memory\" or \"etcd://...\""
                .to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_url_variants() {
        let dir = tempfile::tempdir().unwrap();

        for url in ["", "embedded", "redb"] {
            let store = open_url(url, dir.path()).unwrap();
            let v = store.put("k", b"v", Precondition::Any).unwrap();
            assert!(v > 0);
            drop(store);
            assert!(dir.path().join(DB_FILE_NAME).is_file());
        }

        let mem = open_url("memory", dir.path()).unwrap();
        assert_eq!(mem.get("k").unwrap(), None);

        let err = open_url("etcd://user@10.0.0.1:2379", dir.path())
            .err()
            .expect("credentials in an etcd URL");
        let msg = err.to_string();
        assert!(msg.contains("--etcd-password-file"), "{msg}");
        assert!(msg.contains("etcd://user@10.0.0.1:2379"), "{msg}");

        let err = open_url("postgres://db", dir.path())
            .err()
            .expect("unknown scheme");
        assert!(matches!(err, StoreError::Url { .. }));
        assert!(err.to_string().contains("postgres://db"), "{err}");
    }

    #[test]
    fn error_messages() {
        let e = StoreError::Conflict {
            key: "jobs/a".into(),
            expected: Precondition::Version(3),
            current: Some(7),
        };
        assert!(e.is_conflict());
        assert_eq!(
            e.to_string(),
            "conflict on key \"jobs/a\": expected version 3, found version 7"
        );
        let e = StoreError::Conflict {
            key: "x".into(),
            expected: Precondition::Version(3),
            current: None,
        };
        assert_eq!(
            e.to_string(),
            "conflict on key \"x\": expected version 3, found absent"
        );
        assert!(!StoreError::Backend("x".into()).is_conflict());
    }

    #[test]
    fn precondition_matches() {
        assert!(Precondition::Any.matches(None));
        assert!(Precondition::Any.matches(Some(4)));
        assert!(Precondition::Absent.matches(None));
        assert!(!Precondition::Absent.matches(Some(4)));
        assert!(Precondition::Version(4).matches(Some(4)));
        assert!(!Precondition::Version(4).matches(Some(5)));
        assert!(!Precondition::Version(4).matches(None));
        assert!(!Precondition::Version(0).matches(None));
    }

    #[test]
    fn trait_objects_are_shareable() {
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<Box<dyn StateStore>>();
        assert_send_sync::<std::sync::Arc<dyn StateStore>>();
        assert_send_sync::<MemoryStore>();
        assert_send_sync::<RedbStore>();
    }
}
