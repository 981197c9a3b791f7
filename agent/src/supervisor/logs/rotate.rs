//! The rank log writer: appends a worker's output and rotates the file at a size limit.
//!
//! `rank-R.log` is the current file; on rotation it becomes `rank-R.log.1`, `.1` becomes `.2`
//! and so on up to `.keep` (the oldest; what was there is replaced). Bytes keep their order
//! across files: reading `.keep` .. `.1` and then the current file gives the newest part of
//! the output exactly as written. Rotation happens between two writes (a line, or a 64 KiB
//! piece of a long one) unless one write alone is larger than the limit.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::renameat;
use nix::unistd::{UnlinkatFlags, unlinkat};

use super::open::{self, LogFileError};

/// Size limit of rank logs (`agent --log-max-bytes`, `--log-keep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Largest size of one file; 0: never rotate.
    pub max_bytes: u64,
    /// Rotated files kept besides the current one.
    pub keep: u32,
}

impl Rotation {
    pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
    pub const DEFAULT_KEEP: u32 = 3;
}

impl Default for Rotation {
    fn default() -> Rotation {
        Rotation {
            max_bytes: Rotation::DEFAULT_MAX_BYTES,
            keep: Rotation::DEFAULT_KEEP,
        }
    }
}

/// Name of the `k`-th rotated file of `current` (`k` ≥ 1: 1 is the newest).
pub fn rotated_name(current: &str, k: u32) -> String {
    format!("{current}.{k}")
}

/// One rank's log file, written by the pumps of its worker's stdout and stderr.
pub struct RankLog {
    /// The generation directory, opened without following links, so that a worker replacing
    /// that directory by a link cannot redirect rotation.
    dir: File,
    dir_path: PathBuf,
    name: String,
    /// None after a failed reopen: bytes are dropped (and counted) until one succeeds.
    file: Option<File>,
    size: u64,
    rotation: Rotation,
    /// Rotation sequence: odd while a rotation is under way, twice the completed rotations
    /// otherwise. A reader following the log tells from it which rotated file now holds
    /// what it read (see `serve`).
    rotations: Arc<AtomicU64>,
    dropped: u64,
    failing: bool,
}

impl RankLog {
    /// Opens (creating it if needed) `name` in the generation directory `dir`.
    ///
    /// # Errors
    /// `name` is a link or not a regular file, or cannot be created.
    pub fn open(
        dir: File,
        dir_path: &Path,
        name: &str,
        rotation: Rotation,
    ) -> Result<RankLog, LogFileError> {
        let path = dir_path.join(name);
        let (file, st) = open::open_append(&dir, name, &path, false)?;
        Ok(RankLog {
            dir,
            dir_path: dir_path.to_owned(),
            name: name.to_owned(),
            file: Some(file),
            size: st.st_size.max(0) as u64,
            rotation,
            rotations: Arc::new(AtomicU64::new(0)),
            dropped: 0,
            failing: false,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir_path.join(&self.name)
    }

    /// The rotation sequence, for readers that follow the log.
    pub fn rotations(&self) -> Arc<AtomicU64> {
        self.rotations.clone()
    }

    /// Appends `data`, rotating as needed; a failure is logged once (with the count of bytes
    /// lost when writing resumes), not once per line.
    pub fn write(&mut self, data: &[u8]) {
        match self.try_write(data) {
            Ok(()) => {
                if self.failing {
                    self.failing = false;
                    tracing::warn!(log = %self.path().display(), lost_bytes = self.dropped, "writing the rank log again");
                    self.dropped = 0;
                }
            }
            Err(e) => {
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(error = %e, "could not write the rank log; dropping output until it works again");
                }
            }
        }
    }

    /// Appends `data`, rotating first when it would take the file over the limit.
    ///
    /// # Errors
    /// A failed write, or no current file after a failed rotation (the bytes not written are
    /// counted as dropped).
    pub fn try_write(&mut self, mut data: &[u8]) -> Result<(), LogFileError> {
        let max = self.rotation.max_bytes;
        while !data.is_empty() {
            if max == 0 {
                return self.append(data);
            }
            let room = max.saturating_sub(self.size);
            if data.len() as u64 <= room {
                return self.append(data);
            }
            if self.size > 0 && data.len() as u64 <= max {
                // Rotate at the boundary of this piece, so a line stays in one file.
                self.rotate()
                    .inspect_err(|_| self.dropped += data.len() as u64)?;
                continue;
            }
            // A piece longer than the room left in a whole file: fill this one, go on.
            let (now, rest) = data.split_at(room as usize);
            self.append(now)?;
            data = rest;
            self.rotate()
                .inspect_err(|_| self.dropped += data.len() as u64)?;
        }
        Ok(())
    }

    fn append(&mut self, data: &[u8]) -> Result<(), LogFileError> {
        if data.is_empty() {
            return Ok(());
        }
        if self.file.is_none()
            && let Err(e) = self.reopen()
        {
            self.dropped += data.len() as u64;
            return Err(e);
        }
        let file = self.file.as_mut().expect("reopened above");
        match file.write_all(data) {
            Ok(()) => {
                self.size += data.len() as u64;
                Ok(())
            }
            Err(source) => {
                self.dropped += data.len() as u64;
                Err(LogFileError::Io {
                    path: self.path(),
                    source,
                })
            }
        }
    }

    /// Shifts `.k` to `.k+1` (the oldest kept is replaced), the current file to `.1`, and
    /// starts a new current file.
    fn rotate(&mut self) -> Result<(), LogFileError> {
        self.rotations.fetch_add(1, Ordering::AcqRel);
        self.file = None;
        self.size = 0;
        let keep = self.rotation.keep;
        let moved = if keep == 0 {
            unlinkat(
                self.dir_fd(),
                self.name.as_str(),
                UnlinkatFlags::NoRemoveDir,
            )
        } else {
            for k in (1..keep).rev() {
                self.shift(
                    &rotated_name(&self.name, k),
                    &rotated_name(&self.name, k + 1),
                );
            }
            renameat(
                self.dir_fd(),
                self.name.as_str(),
                self.dir_fd(),
                rotated_name(&self.name, 1).as_str(),
            )
        };
        if let Err(e) = moved
            && e != Errno::ENOENT
        {
            tracing::warn!(log = %self.path().display(), error = %e, "could not rotate the rank log; starting a new one anyway");
        }
        let r = self.reopen();
        // Counted even when reopening failed: the old file has moved either way.
        self.rotations.fetch_add(1, Ordering::AcqRel);
        r
    }

    fn shift(&self, from: &str, to: &str) {
        match renameat(self.dir_fd(), from, self.dir_fd(), to) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => {
                tracing::warn!(dir = %self.dir_path.display(), from, to, error = %e, "could not shift a rotated rank log");
            }
        }
    }

    fn dir_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.dir.as_fd()
    }

    /// Creates a fresh current file. Only a worker puts something at that name meanwhile;
    /// whatever it put there is removed (unlink removes a link itself, not its target).
    fn reopen(&mut self) -> Result<(), LogFileError> {
        let path = self.path();
        let r = match open::open_append(&self.dir, &self.name, &path, true) {
            Err(e) if e.errno() == Some(Errno::EEXIST) => {
                let _ = unlinkat(
                    self.dir_fd(),
                    self.name.as_str(),
                    UnlinkatFlags::NoRemoveDir,
                );
                open::open_append(&self.dir, &self.name, &path, true)
            }
            r => r,
        };
        let (file, _) = r?;
        self.file = Some(file);
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(dir: &Path, max_bytes: u64, keep: u32) -> RankLog {
        RankLog::open(
            File::open(dir).unwrap(),
            dir,
            "rank-0.log",
            Rotation { max_bytes, keep },
        )
        .unwrap()
    }

    fn read(dir: &Path, name: &str) -> Option<String> {
        std::fs::read_to_string(dir.join(name)).ok()
    }

    #[test]
    fn rotates_at_line_boundaries_and_keeps_the_newest() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let mut l = log(d, 10, 2);
        for line in [
            "aaaa\n", "bbbb\n", "cccc\n", "dddd\n", "eeee\n", "ffff\n", "gg\n",
        ] {
            l.try_write(line.as_bytes()).unwrap();
        }
        // 10-byte files of two lines each; the oldest pair is gone.
        assert_eq!(read(d, "rank-0.log.2").unwrap(), "cccc\ndddd\n");
        assert_eq!(read(d, "rank-0.log.1").unwrap(), "eeee\nffff\n");
        assert_eq!(read(d, "rank-0.log").unwrap(), "gg\n");
        assert!(read(d, "rank-0.log.3").is_none());
        assert_eq!(l.rotations().load(Ordering::Acquire), 2 * 3);
    }

    #[test]
    fn a_piece_longer_than_the_limit_is_split_in_order() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let mut l = log(d, 4, 5);
        l.try_write(b"ab").unwrap();
        l.try_write(b"0123456789").unwrap();
        let whole: String = (1..=5)
            .rev()
            .filter_map(|k| read(d, &format!("rank-0.log.{k}")))
            .chain(read(d, "rank-0.log"))
            .collect();
        assert_eq!(whole, "ab0123456789");
        assert_eq!(read(d, "rank-0.log.2").unwrap(), "ab01");
        assert_eq!(read(d, "rank-0.log.1").unwrap(), "2345");
        assert_eq!(read(d, "rank-0.log").unwrap(), "6789");
    }

    #[test]
    fn no_rotation_at_zero_and_no_history_with_keep_zero() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let mut l = log(d, 0, 3);
        for _ in 0..100 {
            l.try_write(b"0123456789\n").unwrap();
        }
        assert_eq!(read(d, "rank-0.log").unwrap().len(), 1100);
        assert!(read(d, "rank-0.log.1").is_none());

        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let mut l = log(d, 8, 0);
        l.try_write(b"1234567\n").unwrap();
        l.try_write(b"abc\n").unwrap();
        assert_eq!(read(d, "rank-0.log").unwrap(), "abc\n");
        assert!(read(d, "rank-0.log.1").is_none());
    }

    #[test]
    fn appends_to_an_existing_log_counting_its_size() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::write(d.join("rank-0.log"), "12345678").unwrap();
        let mut l = log(d, 10, 1);
        l.try_write(b"abc\n").unwrap();
        assert_eq!(read(d, "rank-0.log.1").unwrap(), "12345678");
        assert_eq!(read(d, "rank-0.log").unwrap(), "abc\n");
    }

    #[test]
    fn a_link_planted_at_the_log_name_is_replaced_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("gen");
        std::fs::create_dir(&d).unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, "token").unwrap();
        let mut l = log(&d, 4, 1);
        l.try_write(b"abc\n").unwrap();
        // The worker swaps its log for a link; the next rotation moves the link aside and
        // writes a new file, and nothing is written through the link.
        std::fs::remove_file(d.join("rank-0.log")).unwrap();
        std::os::unix::fs::symlink(&secret, d.join("rank-0.log")).unwrap();
        l.try_write(b"xyz\n").unwrap();
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "token");
        assert_eq!(read(&d, "rank-0.log").unwrap(), "xyz\n");
        assert!(
            std::fs::symlink_metadata(d.join("rank-0.log"))
                .unwrap()
                .is_file()
        );
    }
}
