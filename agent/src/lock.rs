//! One agent per work dir: an exclusive `flock` on `<work-dir>/agent.lock`, which holds the
//! holder's pid for the error a second agent prints.
//!
//! The lock is taken before the agent touches anything else in the work dir (above all before
//! it kills the workers an earlier agent left), so a second agent started by mistake exits and
//! kills nothing. The kernel drops a `flock` when the last descriptor of its open file goes,
//! i.e. when the agent process dies however it dies: a SIGKILLed agent never blocks its
//! successor, and no stale-pid guessing is needed. The descriptor is close-on-exec, so workers
//! never hold it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file's name inside the work dir.
pub const LOCK_FILE: &str = "agent.lock";

/// Why the work dir could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("work dir {} locked by {}", .path.display(), holder(*.pid))]
    Locked { path: PathBuf, pid: Option<u32> },
    #[error("locking work dir {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("pid {p}"),
        None => "another agent (its pid is not written yet)".into(),
    }
}

/// The held lock; released when dropped or when the process ends.
#[derive(Debug)]
pub struct WorkDirLock {
    _lock: Flock<File>,
}

/// Takes the work dir's lock without waiting and writes this process's pid into it.
///
/// # Errors
/// [`LockError::Locked`] with the holder's pid when another process holds it; an I/O error
/// (including a lock file replaced by a symlink, which is never followed).
pub fn acquire(work_dir: &Path) -> Result<WorkDirLock, LockError> {
    let path = work_dir.join(LOCK_FILE);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(LockError::Locked {
                path: work_dir.to_owned(),
                pid: text.trim().parse().ok(),
            });
        }
        Err((_, e)) => return Err(io(std::io::Error::from(e))),
    };
    lock.set_len(0).map_err(io)?;
    lock.rewind().map_err(io)?;
    writeln!(*lock, "{}", std::process::id()).map_err(io)?;
    Ok(WorkDirLock { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_dropped_one_frees_the_dir() {
        let dir = tempfile::tempdir().unwrap();
        let held = acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        // flock conflicts between open files even inside one process.
        let err = acquire(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "work dir {} locked by pid {}",
                dir.path().display(),
                std::process::id()
            )
        );
        drop(held);
        let again = acquire(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_symlinked_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(LOCK_FILE)).unwrap();
        assert!(matches!(acquire(dir.path()), Err(LockError::Io { .. })));
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }
}
