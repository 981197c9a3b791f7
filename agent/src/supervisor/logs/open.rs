//! Opening rank-log directories and files without following symbolic links.
//!
//! A worker can write to its generation directory (and, running as the agent's user, to the
//! job directory above it): it may replace its rank log, a rotated log or a directory with a
//! symbolic link, a FIFO, or a hard link to a file it could not otherwise read. So every step
//! is opened relative to the one before with `O_NOFOLLOW` and checked with `fstat` on the open
//! descriptor: what was checked is what gets read or written, whatever the worker does between.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, FcntlArg, OFlag, fcntl, openat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};

/// Why a rank log (or a directory above it) was not opened.
#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("{} is a symbolic link; refusing to follow it", path.display())]
    Symlink { path: PathBuf },
    #[error("{} is {kind}, not a regular file; refusing it", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} is not a directory", path.display())]
    NotDirectory { path: PathBuf },
    #[error("{} has {links} hard links; refusing a file that may be linked from elsewhere", path.display())]
    HardLinked { path: PathBuf, links: libc::nlink_t },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

impl LogFileError {
    fn io(path: &Path, e: Errno) -> LogFileError {
        LogFileError::Io {
            path: path.to_owned(),
            source: io::Error::from(e),
        }
    }

    /// The OS error behind it, when there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            LogFileError::Io { source, .. } => source.raw_os_error().map(Errno::from_raw),
            _ => None,
        }
    }
}

/// Device and inode: what a file is, whatever name it has now.
pub type FileId = (u64, u64);

pub fn file_id(st: &FileStat) -> FileId {
    (st.st_dev, st.st_ino)
}

/// Identity of the entry `name` in `dir` itself (a link is not followed); None when absent.
pub fn entry_id(dir: &File, name: &str) -> Option<FileId> {
    fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .ok()
        .map(|st| file_id(&st))
}

fn kind(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFREG => "a regular file",
        _ => "a special file",
    }
}

fn is(st: &FileStat, t: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == t.bits()
}

/// Maps a failed `openat` of `name` in `dir` to the reason a reader should see.
fn open_error(dir: &File, name: &str, path: &Path, e: Errno) -> LogFileError {
    // O_NOFOLLOW gives ELOOP on a link; with O_DIRECTORY some kernels answer ENOTDIR.
    let is_link = e == Errno::ELOOP
        || (e == Errno::ENOTDIR
            && fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
                .is_ok_and(|st| is(&st, SFlag::S_IFLNK)));
    if is_link {
        LogFileError::Symlink {
            path: path.to_owned(),
        }
    } else if e == Errno::ENOTDIR {
        LogFileError::NotDirectory {
            path: path.to_owned(),
        }
    } else {
        LogFileError::io(path, e)
    }
}

fn check_component(name: &str, path: &Path) -> Result<(), LogFileError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(LogFileError::Io {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a single path component"),
        });
    }
    Ok(())
}

/// Opens (with `create`, first makes) the directory `name` inside `parent`, refusing a link.
pub fn open_dir(
    parent: &File,
    name: &str,
    path: &Path,
    create: bool,
) -> Result<File, LogFileError> {
    check_component(name, path)?;
    if create {
        match mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(LogFileError::io(path, e)),
        }
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = openat(parent.as_fd(), name, flags, Mode::empty())
        .map_err(|e| open_error(parent, name, path, e))?;
    Ok(File::from(fd))
}

/// The directory of one generation, `<work_dir>/<job>/gen-<generation>`, opened without
/// following a link at the job or generation level (`work_dir` is the agent's own,
/// canonicalised at start). With `create`, missing directories are made.
pub fn generation_dir(
    work_dir: &Path,
    job: &str,
    generation: u64,
    create: bool,
) -> Result<File, LogFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(work_dir)
        .map_err(|source| LogFileError::Io {
            path: work_dir.to_owned(),
            source,
        })?;
    let job_path = work_dir.join(job);
    let job_dir = open_dir(&root, job, &job_path, create)?;
    let gen_name = format!("gen-{generation}");
    open_dir(&job_dir, &gen_name, &job_path.join(&gen_name), create)
}

/// Checks that an open descriptor is a regular file with no other name.
fn check_regular(file: &File, path: &Path) -> Result<FileStat, LogFileError> {
    let st = fstat(file.as_fd()).map_err(|e| LogFileError::io(path, e))?;
    if !is(&st, SFlag::S_IFREG) {
        return Err(LogFileError::NotRegular {
            path: path.to_owned(),
            kind: kind(&st),
        });
    }
    if st.st_nlink > 1 {
        return Err(LogFileError::HardLinked {
            path: path.to_owned(),
            links: st.st_nlink,
        });
    }
    Ok(st)
}

fn open_checked(
    dir: &File,
    name: &str,
    path: &Path,
    flags: OFlag,
    mode: Mode,
) -> Result<(File, FileStat), LogFileError> {
    check_component(name, path)?;
    // O_NONBLOCK: opening a FIFO a worker put there must not hang the agent; it is refused
    // below, and the flag is cleared again for the regular file that passes.
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let fd = openat(dir.as_fd(), name, flags, mode).map_err(|e| open_error(dir, name, path, e))?;
    let file = File::from(fd);
    let st = check_regular(&file, path)?;
    let cleared = fcntl(file.as_fd(), FcntlArg::F_GETFL)
        .map(|f| OFlag::from_bits_truncate(f) & !OFlag::O_NONBLOCK)
        .and_then(|f| fcntl(file.as_fd(), FcntlArg::F_SETFL(f)));
    cleared.map_err(|e| LogFileError::io(path, e))?;
    Ok((file, st))
}

/// Opens `name` in `dir` for appending, creating it (`exclusive`: it must not exist yet).
pub fn open_append(
    dir: &File,
    name: &str,
    path: &Path,
    exclusive: bool,
) -> Result<(File, FileStat), LogFileError> {
    let mut flags = OFlag::O_WRONLY | OFlag::O_APPEND | OFlag::O_CREAT;
    if exclusive {
        flags |= OFlag::O_EXCL;
    }
    open_checked(dir, name, path, flags, Mode::from_bits_truncate(0o644))
}

/// Writes `bytes` as the whole content of `name` in `dir`: created if missing, else replaced
/// in place. Opened without following a link and checked (a regular file with one name)
/// before it is truncated, so a link, FIFO or hard link a worker put there is refused and
/// left as it was.
pub fn write_whole(dir: &File, name: &str, path: &Path, bytes: &[u8]) -> Result<(), LogFileError> {
    use std::io::Write;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT;
    let (mut file, _) = open_checked(dir, name, path, flags, Mode::from_bits_truncate(0o644))?;
    file.set_len(0)
        .and_then(|()| file.write_all(bytes))
        .map_err(|source| LogFileError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Opens `name` in `dir` for reading.
pub fn open_read(dir: &File, name: &str, path: &Path) -> Result<(File, FileStat), LogFileError> {
    open_checked(dir, name, path, OFlag::O_RDONLY, Mode::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(p: &Path) -> File {
        File::open(p).unwrap()
    }

    #[test]
    fn links_fifos_and_hard_links_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, "token").unwrap();
        let d = t.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::symlink(&secret, d.join("link.log")).unwrap();
        nix::unistd::mkfifo(&d.join("fifo.log"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::hard_link(&secret, d.join("hard.log")).unwrap();
        std::fs::write(d.join("ok.log"), "fine").unwrap();
        let df = dir(&d);
        let p = |n: &str| d.join(n);
        assert!(matches!(
            open_read(&df, "link.log", &p("link.log")),
            Err(LogFileError::Symlink { .. })
        ));
        assert!(matches!(
            open_append(&df, "link.log", &p("link.log"), false),
            Err(LogFileError::Symlink { .. })
        ));
        let e = open_read(&df, "fifo.log", &p("fifo.log")).unwrap_err();
        assert!(
            matches!(e, LogFileError::NotRegular { kind: "a FIFO", .. }),
            "{e}"
        );
        assert!(matches!(
            open_read(&df, "hard.log", &p("hard.log")),
            Err(LogFileError::HardLinked { links: 2, .. })
        ));
        let (mut f, st) = open_read(&df, "ok.log", &p("ok.log")).unwrap();
        assert_eq!(st.st_size, 4);
        let mut s = String::new();
        io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "fine");
        assert!(
            open_read(&df, "../secret", &p("../secret")).is_err(),
            "one component only"
        );
        let msg = open_read(&df, "link.log", &p("link.log"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("link.log") && msg.contains("symbolic link"),
            "{msg}"
        );
    }

    #[test]
    fn linked_job_or_generation_dirs_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let work = t.path().join("work");
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(elsewhere.join("gen-0")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, work.join("job-1")).unwrap();
        for create in [false, true] {
            let e = generation_dir(&work, "job-1", 0, create).unwrap_err();
            assert!(matches!(e, LogFileError::Symlink { .. }), "{e}");
        }
        assert!(!elsewhere.join("gen-1").exists());
        std::fs::create_dir_all(work.join("job-2")).unwrap();
        std::os::unix::fs::symlink(elsewhere.join("gen-0"), work.join("job-2/gen-0")).unwrap();
        let e = generation_dir(&work, "job-2", 0, true).unwrap_err();
        assert!(matches!(e, LogFileError::Symlink { .. }), "{e}");
        // A real one is made and opened.
        generation_dir(&work, "job-3", 4, true).unwrap();
        assert!(work.join("job-3/gen-4").is_dir());
        assert!(generation_dir(&work, "job-4", 0, false).is_err());
    }

    #[test]
    fn a_whole_write_replaces_a_file_and_leaves_links_alone() {
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, "root's").unwrap();
        let d = t.path().join("gen");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::symlink(&secret, d.join("train.yaml")).unwrap();
        std::fs::hard_link(&secret, d.join("hard.yaml")).unwrap();
        let df = dir(&d);
        let e = write_whole(&df, "train.yaml", &d.join("train.yaml"), b"{}").unwrap_err();
        assert!(matches!(e, LogFileError::Symlink { .. }), "{e}");
        let e = write_whole(&df, "hard.yaml", &d.join("hard.yaml"), b"{}").unwrap_err();
        assert!(matches!(e, LogFileError::HardLinked { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root's");
        // A new file is made, an old one replaced whole.
        write_whole(&df, "new.yaml", &d.join("new.yaml"), b"a longer text").unwrap();
        write_whole(&df, "new.yaml", &d.join("new.yaml"), b"short").unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join("new.yaml")).unwrap(),
            "short"
        );
    }
}
