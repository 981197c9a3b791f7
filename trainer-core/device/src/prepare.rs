//! Making cudarc (and through it burn-cuda's cubecl) load the libraries [`crate::library`]
//! found.
//!
//! cudarc 0.19 opens each library by bare file name (`libnccl.so`, then `libnccl.so.12`, ...:
//! `cudarc::get_lib_name_candidates`), never `libnccl.so.2` or `libnvrtc.so.13`, which is what
//! NCCL and CUDA 13's NVRTC install. The dynamic loader resolves a bare name with the
//! `LD_LIBRARY_PATH` it read when the process started, so setting the variable in-process does
//! nothing. Hence: a private folder of symlinks with the names cudarc asks for, and one
//! re-execution of the binary with that folder first on `LD_LIBRARY_PATH`.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Env;
use crate::library::{
    FoundLibrary, LibraryError, LibraryKind, SearchRoots, find_cuda_headers, find_library_in,
};

/// Set (to the links folder) in the environment of the re-executed process: its presence stops
/// a second re-execution, whatever else the environment says.
pub const READY_MARKER: &str = "RINGMASTER_CUDA_LIBS_READY";

/// Folders the dynamic loader searches anyway: not worth adding to `LD_LIBRARY_PATH`.
const LOADER_DEFAULT_DIRS: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
];

/// One symlink in the links folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    /// The name cudarc opens, e.g. `libnccl.so`.
    pub name: String,
    /// The real file it points to.
    pub target: PathBuf,
}

/// What [`prepare_cuda_libraries`] made, and the environment the trainer needs to load it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prepared {
    /// `$TMPDIR/ringmaster-cuda-libs-<uid>-<hash of the targets>`, mode 0700.
    pub dir: PathBuf,
    pub libraries: Vec<FoundLibrary>,
    pub links: Vec<Link>,
    /// `LD_LIBRARY_PATH` for the re-executed process: the links folder, the real folders of the
    /// libraries (NVRTC opens `libnvrtc-builtins.so.13.x` beside itself by name; CUDA 13
    /// wheels have no `$ORIGIN` run path), then the current value.
    pub library_path: String,
    /// `CUDA_PATH` to set so that cubecl-cuda finds the CUDA headers (only when what it would
    /// use as things stand lacks them; NVRTC only).
    pub cuda_path: Option<PathBuf>,
}

impl Prepared {
    /// Whether the process must re-execute itself for cudarc to find the libraries: not when
    /// [`READY_MARKER`] is set (this is the re-executed process, or a child of one: never loop),
    /// nor when the links folder is already first on `LD_LIBRARY_PATH` and `CUDA_PATH` needs
    /// no change.
    pub fn needs_reexec(&self, env: Env<'_>) -> bool {
        if env(READY_MARKER).is_some() {
            return false;
        }
        let first = env("LD_LIBRARY_PATH")
            .unwrap_or_default()
            .split(':')
            .find(|s| !s.is_empty())
            .map(PathBuf::from);
        !(first.as_deref() == Some(self.dir.as_path()) && self.cuda_path.is_none())
    }

    /// The variables the re-executed process gets, on top of the current environment.
    pub fn reexec_env(&self) -> Vec<(String, OsString)> {
        let mut v = vec![
            (
                "LD_LIBRARY_PATH".to_owned(),
                self.library_path.clone().into(),
            ),
            (READY_MARKER.to_owned(), self.dir.clone().into_os_string()),
        ];
        if let Some(p) = &self.cuda_path {
            v.push(("CUDA_PATH".to_owned(), p.clone().into_os_string()));
        }
        v
    }
}

/// [`prepare_cuda_libraries_in`] on this machine: [`SearchRoots::system`], `$TMPDIR` (else
/// `/tmp`) and the effective uid.
///
/// # Errors
/// As [`prepare_cuda_libraries_in`].
pub fn prepare_cuda_libraries(
    kinds: &[LibraryKind],
    env: Env<'_>,
) -> Result<Prepared, LibraryError> {
    let tmp = env("TMPDIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    prepare_cuda_libraries_in(kinds, env, &SearchRoots::system(), &tmp, uid)
}

/// Finds each of `kinds` (all required: pass [`LibraryKind::Nccl`] only when the job needs
/// NCCL) and links it, under the name cudarc opens first, in a private folder under `tmp`.
/// [`LibraryKind::Driver`] is never linked (it must match the kernel module and is always on
/// the loader's path where a driver is installed): it is skipped. With
/// [`LibraryKind::Nvrtc`] the CUDA headers are required too.
///
/// Idempotent: the folder name hashes the link targets, an existing folder is reused when it is
/// a real directory (not a symlink) owned by `uid` with no access for others, and links are
/// replaced atomically (temp name + rename) only when they point elsewhere.
///
/// # Errors
/// A library or the headers not found; a folder that fails those checks; I/O errors, with the
/// path.
pub fn prepare_cuda_libraries_in(
    kinds: &[LibraryKind],
    env: Env<'_>,
    roots: &SearchRoots,
    tmp: &Path,
    uid: u32,
) -> Result<Prepared, LibraryError> {
    let mut libraries = Vec::new();
    let mut links = Vec::new();
    for &kind in kinds {
        if kind == LibraryKind::Driver {
            continue;
        }
        let lib = find_library_in(kind, env, roots)?;
        links.push(Link {
            name: kind.link_name(),
            target: lib.real.clone(),
        });
        libraries.push(lib);
    }
    let cuda_path = if kinds.contains(&LibraryKind::Nvrtc) {
        let h = find_cuda_headers(env, roots);
        if h.usable_root.is_none() {
            return Err(LibraryError::HeadersNotFound { looked: h.looked });
        }
        h.cuda_path_to_set().map(Path::to_path_buf)
    } else {
        None
    };

    let dir = tmp.join(format!(
        "ringmaster-cuda-libs-{uid}-{:016x}",
        fnv1a(&links_key(&links))
    ));
    make_private_dir(&dir, uid)?;
    for link in &links {
        place_link(&dir, link)?;
    }

    let mut parts: Vec<String> = vec![dir.display().to_string()];
    for lib in &libraries {
        if let Some(parent) = lib.real.parent() {
            let p = parent.display().to_string();
            if !LOADER_DEFAULT_DIRS.contains(&p.as_str()) && !parts.contains(&p) {
                parts.push(p);
            }
        }
    }
    for old in env("LD_LIBRARY_PATH").unwrap_or_default().split(':') {
        if !old.is_empty() && !parts.iter().any(|p| p == old) {
            parts.push(old.to_owned());
        }
    }
    Ok(Prepared {
        dir,
        libraries,
        links,
        library_path: parts.join(":"),
        cuda_path,
    })
}

fn links_key(links: &[Link]) -> String {
    let mut key: Vec<String> = links
        .iter()
        .map(|l| format!("{}={}", l.name, l.target.display()))
        .collect();
    key.sort();
    key.join("\n")
}

/// FNV-1a, 64 bits: a folder name that stays the same across builds and runs (std's hasher
/// makes no such promise).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LibraryError + '_ {
    move |e| LibraryError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Creates `dir` with mode 0700, or accepts an existing one only if it is a directory itself
/// (checked without following symlinks), owned by `uid`, closed to group and others. In a
/// sticky `/tmp` nobody else can then swap it or its entries.
fn make_private_dir(dir: &Path, uid: u32) -> Result<(), LibraryError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(dir)(e)),
    }
    let md = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    let unsafe_dir = |why: String| LibraryError::Unsafe {
        path: dir.to_path_buf(),
        why,
    };
    if md.file_type().is_symlink() || !md.is_dir() {
        return Err(unsafe_dir("it is not a directory (a symlink?)".into()));
    }
    if md.uid() != uid {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not {uid}",
            md.uid()
        )));
    }
    if md.mode() & 0o077 != 0 {
        return Err(unsafe_dir(format!(
            "its mode {:o} gives others access (want 700)",
            md.mode() & 0o777
        )));
    }
    Ok(())
}

fn place_link(dir: &Path, link: &Link) -> Result<(), LibraryError> {
    let path = dir.join(&link.name);
    if std::fs::read_link(&path).is_ok_and(|t| t == link.target) {
        return Ok(());
    }
    let tmp = dir.join(format!(".{}.{}.tmp", link.name, std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&link.target, &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(&path)(e)
    })
}

/// Re-executes the running binary (`/proc/self/exe`, same arguments, `argv[0]` kept) with
/// [`Prepared::reexec_env`] added. Returns only when the exec failed.
pub fn reexec_with_library_path(prepared: &Prepared) -> LibraryError {
    use std::os::unix::process::CommandExt;
    let exe = PathBuf::from("/proc/self/exe");
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(&exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args);
    for (k, v) in prepared.reexec_env() {
        cmd.env(k, v);
    }
    let e = cmd.exec();
    LibraryError::Reexec {
        exe: std::fs::read_link(&exe).unwrap_or(exe),
        message: e.to_string(),
    }
}

/// The whole dance for `main`: prepare the libraries from the process environment and, when
/// [`Prepared::needs_reexec`], re-execute (this call then does not return). Call it first
/// thing, before anything loads a CUDA library.
///
/// # Errors
/// As [`prepare_cuda_libraries`], and [`LibraryError::Reexec`].
pub fn ensure_cuda_libraries(kinds: &[LibraryKind]) -> Result<Prepared, LibraryError> {
    let env = crate::process_env;
    let prepared = prepare_cuda_libraries(kinds, &env)?;
    if prepared.needs_reexec(&env) {
        return Err(reexec_with_library_path(&prepared));
    }
    Ok(prepared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{FakeEnv, touch};

    fn uid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        roots: SearchRoots,
        venv: String,
        nccl: PathBuf,
        nvrtc: PathBuf,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let sp = root.join("venv/lib/python3.12/site-packages/nvidia");
        let nccl = sp.join("nccl/lib/libnccl.so.2");
        let nvrtc = sp.join("cu13/lib/libnvrtc.so.13");
        touch(&nccl);
        touch(&nvrtc);
        touch(&sp.join("cu13/include/cuda_runtime.h"));
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        Fixture {
            roots: SearchRoots {
                cuda_roots: vec![root.join("usr/local/cuda")],
                system_dirs: vec![],
                python_lib_dirs: vec![],
            },
            venv: root.join("venv").display().to_string(),
            nccl,
            nvrtc,
            root,
            _tmp: tmp,
        }
    }

    #[test]
    fn links_the_names_cudarc_opens_and_builds_the_library_path() {
        let f = fixture();
        let env = FakeEnv::new(&[("VIRTUAL_ENV", &f.venv), ("LD_LIBRARY_PATH", "/old")]);
        let kinds = [LibraryKind::Driver, LibraryKind::Nccl, LibraryKind::Nvrtc];
        let p = prepare_cuda_libraries_in(&kinds, &env.f(), &f.roots, &f.root.join("tmp"), uid())
            .unwrap();
        assert!(
            p.dir
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&format!("ringmaster-cuda-libs-{}-", uid()))
        );
        let md = std::fs::symlink_metadata(&p.dir).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::read_link(p.dir.join("libnccl.so")).unwrap(),
            f.nccl.canonicalize().unwrap()
        );
        assert_eq!(
            std::fs::read_link(p.dir.join("libnvrtc.so")).unwrap(),
            f.nvrtc.canonicalize().unwrap()
        );
        let nccl_dir = f
            .nccl
            .canonicalize()
            .unwrap()
            .parent()
            .unwrap()
            .display()
            .to_string();
        let nvrtc_dir = f
            .nvrtc
            .canonicalize()
            .unwrap()
            .parent()
            .unwrap()
            .display()
            .to_string();
        assert_eq!(
            p.library_path,
            format!("{}:{nccl_dir}:{nvrtc_dir}:/old", p.dir.display())
        );
        // /usr/local/cuda is absent: cubecl would find no root; the wheel's headers are used.
        assert_eq!(
            p.cuda_path,
            Some(PathBuf::from(&f.venv).join("lib/python3.12/site-packages/nvidia/cu13"))
        );
        assert!(p.needs_reexec(&env.f()));
        let vars = p.reexec_env();
        assert!(
            vars.iter()
                .any(|(k, v)| k == READY_MARKER && *v == p.dir.as_os_str())
        );
    }

    #[test]
    fn is_idempotent_and_repairs_a_stale_link() {
        let f = fixture();
        let env = FakeEnv::new(&[("VIRTUAL_ENV", &f.venv)]);
        let tmp = f.root.join("tmp");
        let kinds = [LibraryKind::Nccl];
        let a = prepare_cuda_libraries_in(&kinds, &env.f(), &f.roots, &tmp, uid()).unwrap();
        let b = prepare_cuda_libraries_in(&kinds, &env.f(), &f.roots, &tmp, uid()).unwrap();
        assert_eq!(a, b);
        let link = a.dir.join("libnccl.so");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("/elsewhere", &link).unwrap();
        prepare_cuda_libraries_in(&kinds, &env.f(), &f.roots, &tmp, uid()).unwrap();
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            f.nccl.canonicalize().unwrap()
        );
        // No temp names left behind.
        let names: Vec<_> = std::fs::read_dir(&a.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("libnccl.so")]);
    }

    #[test]
    fn after_the_reexec_nothing_more_is_needed_and_the_marker_stops_loops() {
        let f = fixture();
        let env = FakeEnv::new(&[("VIRTUAL_ENV", &f.venv)]);
        let tmp = f.root.join("tmp");
        let kinds = [LibraryKind::Nccl];
        let p = prepare_cuda_libraries_in(&kinds, &env.f(), &f.roots, &tmp, uid()).unwrap();
        // The re-executed process's environment: the same folder comes out, first on the path.
        let mut vars: Vec<(String, String)> = p
            .reexec_env()
            .into_iter()
            .map(|(k, v)| (k, v.into_string().unwrap()))
            .collect();
        vars.push(("VIRTUAL_ENV".into(), f.venv.clone()));
        let vars_ref: Vec<(&str, &str)> =
            vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let env2 = FakeEnv::new(&vars_ref);
        let q = prepare_cuda_libraries_in(&kinds, &env2.f(), &f.roots, &tmp, uid()).unwrap();
        assert_eq!(q.dir, p.dir);
        assert!(!q.needs_reexec(&env2.f()));
        // Without the marker, the folder first on LD_LIBRARY_PATH is enough.
        let without: Vec<(&str, &str)> = vars_ref
            .iter()
            .copied()
            .filter(|(k, _)| *k != READY_MARKER)
            .collect();
        let env3 = FakeEnv::new(&without);
        assert!(!q.needs_reexec(&env3.f()));
        // With the marker, never again, even if the path was reset.
        let env4 = FakeEnv::new(&[(READY_MARKER, "/x"), ("LD_LIBRARY_PATH", "/y")]);
        assert!(!q.needs_reexec(&env4.f()));
    }

    #[test]
    fn refuses_a_folder_planted_as_a_symlink_or_open_to_others() {
        let f = fixture();
        let env = FakeEnv::new(&[("VIRTUAL_ENV", &f.venv)]);
        let tmp = f.root.join("tmp");
        let kinds = [LibraryKind::Nccl];
        let p = prepare_cuda_libraries_in(&kinds, &env.f(), &f.roots, &tmp, uid()).unwrap();
        let dir = p.dir.clone();

        std::fs::remove_dir_all(&dir).unwrap();
        let elsewhere = f.root.join("attacker");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &dir).unwrap();
        let err = prepare_cuda_libraries_in(&kinds, &env.f(), &f.roots, &tmp, uid()).unwrap_err();
        assert!(matches!(err, LibraryError::Unsafe { .. }), "{err}");
        assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());

        std::fs::remove_file(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let err = prepare_cuda_libraries_in(&kinds, &env.f(), &f.roots, &tmp, uid()).unwrap_err();
        assert!(err.to_string().contains("gives others access"), "{err}");

        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let err =
            prepare_cuda_libraries_in(&kinds, &env.f(), &f.roots, &tmp, uid() + 1).unwrap_err();
        assert!(err.to_string().contains("owned by uid"), "{err}");
    }

    #[test]
    fn missing_libraries_or_headers_are_errors() {
        let f = fixture();
        let env = FakeEnv::new(&[]);
        let tmp = f.root.join("tmp");
        let err = prepare_cuda_libraries_in(&[LibraryKind::Nccl], &env.f(), &f.roots, &tmp, 1)
            .unwrap_err();
        assert!(matches!(err, LibraryError::NotFound { .. }), "{err}");

        std::fs::remove_file(
            PathBuf::from(&f.venv)
                .join("lib/python3.12/site-packages/nvidia/cu13/include/cuda_runtime.h"),
        )
        .unwrap();
        let env = FakeEnv::new(&[("VIRTUAL_ENV", &f.venv)]);
        let err = prepare_cuda_libraries_in(&[LibraryKind::Nvrtc], &env.f(), &f.roots, &tmp, uid())
            .unwrap_err();
        assert!(matches!(err, LibraryError::HeadersNotFound { .. }), "{err}");
    }

    #[test]
    fn the_folder_name_is_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
