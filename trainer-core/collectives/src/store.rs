//! The key-value store collectives bootstrap from: ranks publish their addresses (or NCCL's
//! unique id) and read the others'. The coordinator's RendezvousService implements it for
//! trainers started by agents (keys scoped to job + generation); [`MemStore`] serves threads of
//! one process and [`DirStore`] processes that share a directory (tests, benchmarks).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::CommError;

/// A bootstrap store. Keys are short ASCII strings.
pub trait Store: Send + Sync {
    /// Sets `key` (overwrites).
    ///
    /// # Errors
    /// The store cannot be reached or written.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError>;
    /// Gets `key`, waiting up to `timeout` for it to appear.
    ///
    /// # Errors
    /// The key did not appear in time (naming it), or the store failed.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, CommError>;
}

type Shared = Arc<(Mutex<HashMap<String, Vec<u8>>>, Condvar)>;

/// An in-process store for communicators on threads of one process.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Shared,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

impl Store for MemStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let (m, cv) = &*self.inner;
        m.lock()
            .expect("store lock")
            .insert(key.to_owned(), value.to_vec());
        cv.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, CommError> {
        let (m, cv) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut map = m.lock().expect("store lock");
        loop {
            if let Some(v) = map.get(key) {
                return Ok(v.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CommError::Store(format!(
                    "key '{key}' not set within {timeout:?}"
                )));
            }
            map = cv.wait_timeout(map, deadline - now).expect("store lock").0;
        }
    }
}

/// A store in a directory shared by processes of one machine: one file per key, written to a
/// temporary name and renamed, so a reader never sees half a value.
#[derive(Clone)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    /// Uses (and creates) `dir`.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(dir: impl Into<PathBuf>) -> Result<DirStore, CommError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| CommError::Store(format!("{}: {e}", dir.display())))?;
        Ok(DirStore { dir })
    }

    fn path(&self, key: &str) -> PathBuf {
        let safe: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(safe)
    }
}

impl Store for DirStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), CommError> {
        let p = self.path(key);
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, value)
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(|e| CommError::Store(format!("{}: {e}", p.display())))
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, CommError> {
        let p = self.path(key);
        let deadline = Instant::now() + timeout;
        loop {
            match std::fs::read(&p) {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CommError::Store(format!("{}: {e}", p.display()))),
            }
            if Instant::now() >= deadline {
                return Err(CommError::Store(format!(
                    "key '{key}' not set within {timeout:?} (in {})",
                    self.dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(s: &dyn Store) {
        s.set("a/b", b"1").unwrap();
        assert_eq!(s.get("a/b", Duration::ZERO).unwrap(), b"1");
        let err = s.get("missing", Duration::from_millis(20)).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn mem_and_dir_stores() {
        roundtrip(&MemStore::new());
        let d = tempfile::tempdir().unwrap();
        roundtrip(&DirStore::new(d.path()).unwrap());
        let s = MemStore::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.get("late", Duration::from_secs(5)));
        // Whether the getter is already waiting or not, it must see the value.
        s.set("late", b"x").unwrap();
        assert_eq!(t.join().unwrap().unwrap(), b"x");
    }
}
