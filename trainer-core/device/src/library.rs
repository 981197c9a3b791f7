//! Finding the CUDA libraries the trainer loads at run time (the driver, NCCL, NVRTC) and the
//! CUDA headers NVRTC compiles burn-cuda's kernels against, wherever a CUDA toolkit, a driver
//! install or PyTorch's pip wheels put them.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Env;

/// A library cudarc opens with `dlopen` at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LibraryKind {
    /// The NVIDIA driver's `libcuda.so.1`: installed with the kernel module, never linked by us.
    Driver,
    /// NCCL (`libnccl.so.2`; pip: `nvidia-nccl-cu13`, `site-packages/nvidia/nccl/lib`).
    Nccl,
    /// NVRTC, which compiles burn-cuda's kernels (`libnvrtc.so.13`; pip: `nvidia-cuda-nvrtc`,
    /// `site-packages/nvidia/cu13/lib`, or `nvidia/cuda_nvrtc/lib` for CUDA 12 wheels).
    Nvrtc,
}

impl LibraryKind {
    pub const ALL: [LibraryKind; 3] = [LibraryKind::Driver, LibraryKind::Nccl, LibraryKind::Nvrtc];

    /// The `X` of `libX.so`.
    pub fn stem(self) -> &'static str {
        match self {
            LibraryKind::Driver => "cuda",
            LibraryKind::Nccl => "nccl",
            LibraryKind::Nvrtc => "nvrtc",
        }
    }

    /// The variable that names the library (a file, or the folder that holds it) ahead of any
    /// search. The driver has none: it must be the one that matches the kernel module.
    pub fn override_var(self) -> Option<&'static str> {
        match self {
            LibraryKind::Driver => None,
            LibraryKind::Nccl => Some("RINGMASTER_NCCL_LIB"),
            LibraryKind::Nvrtc => Some("RINGMASTER_NVRTC_LIB"),
        }
    }

    /// The file name cudarc tries first (`cudarc::get_lib_name_candidates`): the bare
    /// `libX.so`, which NCCL and NVRTC installs (pip wheels included) usually lack.
    pub fn link_name(self) -> String {
        format!("lib{}.so", self.stem())
    }

    /// The names accepted, for messages: `libnccl.so.2 or libnccl.so`.
    pub fn names(self) -> &'static str {
        match self {
            LibraryKind::Driver => "libcuda.so.1 or libcuda.so",
            LibraryKind::Nccl => "libnccl.so.2 or libnccl.so",
            LibraryKind::Nvrtc => "libnvrtc.so.<major> (13, 12, ...) or libnvrtc.so",
        }
    }

    /// How well a file name fits: `Some(rank)`, lower first; `None` when it is not this library.
    /// Accepted: `libX.so.N` (N one number, the ABI major: highest first) and then `libX.so`.
    /// Not `libnvrtc-builtins.so.13`, `libnccl.so.2.27.3` or `libnvrtc.alt.so.12`.
    fn rank(self, file_name: &str) -> Option<(bool, std::cmp::Reverse<u32>)> {
        let base = self.link_name();
        if file_name == base {
            return Some((true, std::cmp::Reverse(0)));
        }
        let major = file_name.strip_prefix(base.as_str())?.strip_prefix('.')?;
        if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let major: u32 = major.parse().ok()?;
        Some((false, std::cmp::Reverse(major)))
    }
}

impl std::fmt::Display for LibraryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LibraryKind::Driver => "CUDA driver",
            LibraryKind::Nccl => "NCCL",
            LibraryKind::Nvrtc => "NVRTC",
        })
    }
}

/// Where a library was found, for the log and `trainer device-info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `RINGMASTER_NCCL_LIB` / `RINGMASTER_NVRTC_LIB`.
    Override,
    LdLibraryPath,
    /// `CUDA_HOME` or `CUDA_PATH`.
    CudaHome,
    /// `/usr/local/cuda` (or another default toolkit root).
    CudaDefault,
    /// The distribution's library folders.
    System,
    /// A Python `site-packages` / `dist-packages` `nvidia/*/lib` folder (pip wheels).
    Python,
}

/// A library found on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FoundLibrary {
    pub kind: LibraryKind,
    /// The path as found (often a symlink such as `libnccl.so.2`).
    pub path: PathBuf,
    /// Every symlink resolved: what a link we make points to.
    pub real: PathBuf,
    pub source: Source,
}

/// Why a library (or the CUDA headers) could not be found or prepared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LibraryError {
    #[error("{kind} library not found ({}); looked in {}{}", kind.names(), join(looked),
        kind.override_var().map(|v| format!("; set {v} to the file or its folder")).unwrap_or_default())]
    NotFound {
        kind: LibraryKind,
        looked: Vec<PathBuf>,
    },
    #[error("{var}={value}: no {} there (a file, or a folder that holds one)", kind.names())]
    Override {
        kind: LibraryKind,
        var: &'static str,
        value: String,
    },
    #[error(
        "CUDA headers not found (include/cuda_runtime.h, which NVRTC needs to compile \
         burn-cuda's kernels); looked in {}; set CUDA_PATH to a CUDA toolkit root",
        join(looked)
    )]
    HeadersNotFound { looked: Vec<PathBuf> },
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    /// A folder we would write in that someone else could have prepared for us.
    #[error("refusing to use {}: {why}", path.display())]
    Unsafe { path: PathBuf, why: String },
    #[error("could not re-execute {} with the CUDA libraries on LD_LIBRARY_PATH: {message}",
        exe.display())]
    Reexec { exe: PathBuf, message: String },
}

pub(crate) fn join(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nowhere".into();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The fixed folders searched after the environment's, injectable for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchRoots {
    /// Toolkit roots tried after `CUDA_HOME` / `CUDA_PATH`: their `lib64`, `lib`,
    /// `targets/*/lib` and `include`. cubecl-cuda also takes its headers from the first of these
    /// that exists when `CUDA_PATH` is unset.
    pub cuda_roots: Vec<PathBuf>,
    /// The distribution's library folders (and where container runtimes mount the driver).
    pub system_dirs: Vec<PathBuf>,
    /// Folders whose `python3*` children hold `site-packages` / `dist-packages`.
    pub python_lib_dirs: Vec<PathBuf>,
}

impl SearchRoots {
    /// This machine's folders.
    pub fn system() -> SearchRoots {
        let p = |s: &str| PathBuf::from(s);
        SearchRoots {
            cuda_roots: vec![p("/usr/local/cuda"), p("/opt/cuda")],
            system_dirs: vec![
                p("/usr/lib/x86_64-linux-gnu"),
                p("/usr/lib64"),
                p("/lib/x86_64-linux-gnu"),
                p("/usr/local/lib"),
                p("/usr/local/nvidia/lib64"),
                p("/usr/local/nvidia/lib"),
                p("/usr/lib/aarch64-linux-gnu"),
                p("/usr/lib/wsl/lib"),
            ],
            python_lib_dirs: vec![p("/usr/lib"), p("/usr/local/lib")],
        }
    }
}

/// Children of `dir` whose names start with `prefix`, sorted; nothing when `dir` is unreadable.
fn children_starting_with(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn split_path_list(value: Option<String>) -> Vec<PathBuf> {
    value
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// `CUDA_HOME` and `CUDA_PATH`, in that order, deduplicated.
fn cuda_home_roots(env: Env<'_>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = env(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(v);
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// A toolkit root's library folders: `lib64`, `lib`, `targets/*/lib`.
fn toolkit_lib_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.join("lib64"), root.join("lib")];
    for t in children_starting_with(&root.join("targets"), "") {
        out.push(t.join("lib"));
    }
    out
}

/// Every Python `site-packages` / `dist-packages` folder that may hold NVIDIA's wheels: under
/// the roots' `python3*` children, `~/.local/lib`, `$VIRTUAL_ENV/lib`, `$CONDA_PREFIX/lib`, and
/// the prefix of each `python3*` on `PATH` (its folder's parent, and that of the file it links to).
pub fn python_site_dirs(env: Env<'_>, roots: &SearchRoots) -> Vec<PathBuf> {
    let mut lib_dirs: Vec<PathBuf> = Vec::new();
    let mut add = |p: PathBuf| {
        if !lib_dirs.contains(&p) {
            lib_dirs.push(p);
        }
    };
    if let Some(v) = env("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        add(PathBuf::from(v).join("lib"));
    }
    if let Some(v) = env("CONDA_PREFIX").filter(|v| !v.is_empty()) {
        add(PathBuf::from(v).join("lib"));
    }
    for dir in split_path_list(env("PATH")) {
        for exe in children_starting_with(&dir, "python3") {
            if let Some(prefix) = dir.parent() {
                add(prefix.join("lib"));
            }
            if let Ok(real) = std::fs::canonicalize(&exe)
                && let Some(prefix) = real.parent().and_then(Path::parent)
            {
                add(prefix.join("lib"));
            }
        }
    }
    if let Some(home) = env("HOME").filter(|v| !v.is_empty()) {
        add(PathBuf::from(home).join(".local/lib"));
    }
    for d in &roots.python_lib_dirs {
        add(d.clone());
    }
    let mut out = Vec::new();
    for lib in lib_dirs {
        for py in children_starting_with(&lib, "python3") {
            for sub in ["site-packages", "dist-packages"] {
                let d = py.join(sub);
                if d.is_dir() && !out.contains(&d) {
                    out.push(d);
                }
            }
        }
    }
    out
}

/// The folders searched for `kind`, in order, with where each comes from. Globs expand only to
/// folders that exist; fixed folders are listed even when absent, so an error shows them.
pub fn search_dirs(env: Env<'_>, roots: &SearchRoots) -> Vec<(PathBuf, Source)> {
    let mut out: Vec<(PathBuf, Source)> = Vec::new();
    let mut add = |p: PathBuf, s: Source| {
        if !out.iter().any(|(q, _)| *q == p) {
            out.push((p, s));
        }
    };
    for d in split_path_list(env("LD_LIBRARY_PATH")) {
        add(d, Source::LdLibraryPath);
    }
    for root in cuda_home_roots(env) {
        for d in toolkit_lib_dirs(&root) {
            add(d, Source::CudaHome);
        }
    }
    for root in &roots.cuda_roots {
        for d in toolkit_lib_dirs(root) {
            add(d, Source::CudaDefault);
        }
    }
    for d in &roots.system_dirs {
        add(d.clone(), Source::System);
    }
    for site in python_site_dirs(env, roots) {
        for pkg in children_starting_with(&site.join("nvidia"), "") {
            let lib = pkg.join("lib");
            if lib.is_dir() {
                add(lib, Source::Python);
            }
        }
    }
    out
}

/// The best file for `kind` in `dir` (a regular file once symlinks are followed).
fn best_in(kind: LibraryKind, dir: &Path) -> Option<PathBuf> {
    let rd = std::fs::read_dir(dir).ok()?;
    rd.filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rank = kind.rank(&name)?;
            let path = e.path();
            std::fs::metadata(&path)
                .ok()
                .filter(|m| m.is_file())
                .map(|_| (rank, path))
        })
        .min_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)))
        .map(|(_, p)| p)
}

fn found(kind: LibraryKind, path: PathBuf, source: Source) -> Result<FoundLibrary, LibraryError> {
    let real = std::fs::canonicalize(&path).map_err(|e| LibraryError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(FoundLibrary {
        kind,
        path,
        real,
        source,
    })
}

/// Finds `kind` on this machine: [`find_library_in`] with [`SearchRoots::system`].
///
/// # Errors
/// As [`find_library_in`].
pub fn find_library(kind: LibraryKind, env: Env<'_>) -> Result<FoundLibrary, LibraryError> {
    find_library_in(kind, env, &SearchRoots::system())
}

/// Finds `kind`: the override variable (a file, or a folder holding one), else the first folder
/// of [`search_dirs`] that holds one (`libnccl.so.2` / `libnvrtc.so.13` / `libcuda.so.1`
/// before the bare `.so`).
///
/// # Errors
/// [`LibraryError::Override`] when the override variable names no such library (it is not
/// silently ignored); [`LibraryError::NotFound`] listing every folder looked in.
pub fn find_library_in(
    kind: LibraryKind,
    env: Env<'_>,
    roots: &SearchRoots,
) -> Result<FoundLibrary, LibraryError> {
    if let Some(var) = kind.override_var()
        && let Some(value) = env(var).filter(|v| !v.is_empty())
    {
        let p = PathBuf::from(&value);
        let hit = if p.is_dir() {
            best_in(kind, &p)
        } else if p.is_file() {
            Some(p)
        } else {
            None
        };
        return match hit {
            Some(path) => found(kind, path, Source::Override),
            None => Err(LibraryError::Override { kind, var, value }),
        };
    }
    let dirs = search_dirs(env, roots);
    for (dir, source) in &dirs {
        if let Some(path) = best_in(kind, dir) {
            return found(kind, path, source.clone());
        }
    }
    Err(LibraryError::NotFound {
        kind,
        looked: dirs.into_iter().map(|(d, _)| d).collect(),
    })
}

/// The CUDA headers NVRTC compiles burn-cuda's kernels against.
///
/// cubecl-cuda 0.10 (`cubecl_cuda::install::cuda_path`) passes `--include-path=<root>/include`
/// (and `<root>/include/cccl` when present) with `<root>` = `$CUDA_PATH`, else the first of
/// `/usr/local/cuda`, `/opt/cuda` that exists (else `/usr` when `/usr/bin/nvcc` exists), and
/// panics when there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Headers {
    /// The root cubecl would use as things stand.
    pub cubecl_root: Option<PathBuf>,
    /// A root whose `include/cuda_runtime.h` exists: the one to use.
    pub usable_root: Option<PathBuf>,
    /// Every root looked at.
    pub looked: Vec<PathBuf>,
}

impl Headers {
    /// The `CUDA_PATH` to set so that cubecl finds the headers, when what it would use lacks
    /// them and another root has them; `None` when nothing needs to change (or nothing helps).
    pub fn cuda_path_to_set(&self) -> Option<&Path> {
        match (&self.cubecl_root, &self.usable_root) {
            (Some(c), Some(u)) if c == u => None,
            (_, Some(u)) => Some(u),
            (_, None) => None,
        }
    }
}

fn has_headers(root: &Path) -> bool {
    root.join("include/cuda_runtime.h").is_file()
}

/// Finds the CUDA headers: `CUDA_PATH`, `CUDA_HOME`, the toolkit roots, then the pip wheels'
/// `site-packages/nvidia/cu13` (CUDA 13: one folder for every component), `nvidia/cuda_runtime`
/// (CUDA 12) and any other `nvidia/*` with `include/cuda_runtime.h`.
pub fn find_cuda_headers(env: Env<'_>, roots: &SearchRoots) -> Headers {
    let cuda_path = env("CUDA_PATH")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let cubecl_root = cuda_path.clone().or_else(|| {
        roots
            .cuda_roots
            .iter()
            .find(|r| r.exists())
            .cloned()
            .or_else(|| {
                Path::new("/usr/bin/nvcc")
                    .exists()
                    .then(|| PathBuf::from("/usr"))
            })
    });
    let mut looked: Vec<PathBuf> = Vec::new();
    let mut add = |p: PathBuf| {
        if !looked.contains(&p) {
            looked.push(p);
        }
    };
    if let Some(c) = &cubecl_root {
        add(c.clone());
    }
    for r in cuda_home_roots(env) {
        add(r);
    }
    for r in &roots.cuda_roots {
        add(r.clone());
    }
    for site in python_site_dirs(env, roots) {
        let nv = site.join("nvidia");
        for pref in ["cu13", "cuda_runtime"] {
            if nv.join(pref).is_dir() {
                add(nv.join(pref));
            }
        }
        for pkg in children_starting_with(&nv, "") {
            if has_headers(&pkg) {
                add(pkg);
            }
        }
    }
    let usable_root = looked.iter().find(|r| has_headers(r)).cloned();
    Headers {
        cubecl_root,
        usable_root,
        looked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{FakeEnv, touch};

    fn roots_in(tmp: &Path) -> SearchRoots {
        SearchRoots {
            cuda_roots: vec![tmp.join("usr/local/cuda")],
            system_dirs: vec![tmp.join("usr/lib/x86_64-linux-gnu")],
            python_lib_dirs: vec![tmp.join("usr/lib"), tmp.join("usr/local/lib")],
        }
    }

    #[test]
    fn names_are_ranked_versioned_first_and_lookalikes_refused() {
        let k = LibraryKind::Nvrtc;
        assert!(k.rank("libnvrtc.so.13") < k.rank("libnvrtc.so.12"));
        assert!(k.rank("libnvrtc.so.12") < k.rank("libnvrtc.so"));
        for bad in [
            "libnvrtc-builtins.so.13",
            "libnvrtc.so.13.0.88",
            "libnvrtc.alt.so.13",
            "libnvrtc.so.",
            "libnvrtc.so.x",
            "libnvrtcx.so",
        ] {
            assert_eq!(k.rank(bad), None, "{bad}");
        }
        assert!(LibraryKind::Nccl.rank("libnccl.so.2").is_some());
        assert_eq!(LibraryKind::Nccl.link_name(), "libnccl.so");
    }

    #[test]
    fn finds_nccl_in_a_pip_site_packages_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let lib = t.join("venv/lib/python3.12/site-packages/nvidia/nccl/lib");
        touch(&lib.join("libnccl.so.2"));
        let env = FakeEnv::new(&[("VIRTUAL_ENV", &t.join("venv").display().to_string())]);
        let f = find_library_in(LibraryKind::Nccl, &env.f(), &roots_in(t)).unwrap();
        assert_eq!(f.path, lib.join("libnccl.so.2"));
        assert_eq!(f.source, Source::Python);
    }

    #[test]
    fn finds_nvrtc_in_the_cu13_wheel_layout_through_python_on_path() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        // /opt/torch/.venv/bin/python3 as on the GPU machine: the prefix is the folder's parent.
        let bin = t.join("opt/torch/.venv/bin");
        touch(&bin.join("python3"));
        let lib = t.join("opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib");
        touch(&lib.join("libnvrtc.so.13"));
        touch(&lib.join("libnvrtc-builtins.so.13.0"));
        let env = FakeEnv::new(&[("PATH", &format!("/nonexistent:{}", bin.display()))]);
        let f = find_library_in(LibraryKind::Nvrtc, &env.f(), &roots_in(t)).unwrap();
        assert_eq!(f.path, lib.join("libnvrtc.so.13"));
    }

    #[test]
    fn search_order_is_override_then_ld_library_path_then_cuda_home_then_system_then_python() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let roots = roots_in(t);
        let py = t.join("usr/lib/python3.12/dist-packages/nvidia/cuda_nvrtc/lib");
        touch(&py.join("libnvrtc.so.12"));
        let sys = t.join("usr/lib/x86_64-linux-gnu");
        touch(&sys.join("libnvrtc.so.12"));
        let deflt = t.join("usr/local/cuda/targets/x86_64-linux/lib");
        touch(&deflt.join("libnvrtc.so.13"));
        let home = t.join("cuda-13.0/lib64");
        touch(&home.join("libnvrtc.so.13"));
        let ld = t.join("ld");
        touch(&ld.join("libnvrtc.so"));
        let over = t.join("mine/libnvrtc.so.13");
        touch(&over);

        let cuda_home = t.join("cuda-13.0").display().to_string();
        let ld_s = ld.display().to_string();
        let over_s = over.display().to_string();
        let mut vars = vec![
            ("RINGMASTER_NVRTC_LIB", over_s.as_str()),
            ("LD_LIBRARY_PATH", ld_s.as_str()),
            ("CUDA_HOME", cuda_home.as_str()),
        ];
        let expect = [
            (over.clone(), Source::Override),
            (ld.join("libnvrtc.so"), Source::LdLibraryPath),
            (home.join("libnvrtc.so.13"), Source::CudaHome),
            (deflt.join("libnvrtc.so.13"), Source::CudaDefault),
        ];
        for (path, source) in expect {
            let env = FakeEnv::new(&vars);
            let f = find_library_in(LibraryKind::Nvrtc, &env.f(), &roots).unwrap();
            assert_eq!((f.path, f.source), (path, source));
            if !vars.is_empty() {
                vars.remove(0);
            }
        }
        std::fs::remove_dir_all(t.join("usr/local/cuda")).unwrap();
        let env = FakeEnv::new(&[]);
        let f = find_library_in(LibraryKind::Nvrtc, &env.f(), &roots).unwrap();
        assert_eq!(
            (f.path, f.source),
            (sys.join("libnvrtc.so.12"), Source::System)
        );
        std::fs::remove_file(sys.join("libnvrtc.so.12")).unwrap();
        let f = find_library_in(LibraryKind::Nvrtc, &env.f(), &roots).unwrap();
        assert_eq!(
            (f.path, f.source),
            (py.join("libnvrtc.so.12"), Source::Python)
        );
    }

    #[test]
    fn an_override_folder_works_and_a_wrong_override_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        touch(&t.join("nccl/libnccl.so.2"));
        let dir = t.join("nccl").display().to_string();
        let env = FakeEnv::new(&[("RINGMASTER_NCCL_LIB", &dir)]);
        let f = find_library_in(LibraryKind::Nccl, &env.f(), &roots_in(t)).unwrap();
        assert_eq!(f.path, t.join("nccl/libnccl.so.2"));

        let env = FakeEnv::new(&[("RINGMASTER_NCCL_LIB", "/nonexistent/libnccl.so.2")]);
        let err = find_library_in(LibraryKind::Nccl, &env.f(), &roots_in(t)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "RINGMASTER_NCCL_LIB=/nonexistent/libnccl.so.2: no libnccl.so.2 or libnccl.so there \
             (a file, or a folder that holds one)"
        );
    }

    #[test]
    fn not_found_lists_every_place_looked_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        std::fs::create_dir_all(t.join("usr/lib/python3.11/site-packages/nvidia/cublas/lib"))
            .unwrap();
        let env = FakeEnv::new(&[("LD_LIBRARY_PATH", "/a::/b"), ("CUDA_PATH", "/c")]);
        let err = find_library_in(LibraryKind::Nccl, &env.f(), &roots_in(t)).unwrap_err();
        let LibraryError::NotFound { looked, .. } = &err else {
            panic!("{err:?}")
        };
        let want: Vec<PathBuf> = vec![
            "/a".into(),
            "/b".into(),
            "/c/lib64".into(),
            "/c/lib".into(),
            t.join("usr/local/cuda/lib64"),
            t.join("usr/local/cuda/lib"),
            t.join("usr/lib/x86_64-linux-gnu"),
            t.join("usr/lib/python3.11/site-packages/nvidia/cublas/lib"),
        ];
        assert_eq!(looked, &want);
        let text = err.to_string();
        assert!(
            text.starts_with(
                "NCCL library not found (libnccl.so.2 or libnccl.so); looked in /a, /b, /c/lib64"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("; set RINGMASTER_NCCL_LIB to the file or its folder"),
            "{text}"
        );
    }

    #[test]
    fn a_dangling_symlink_is_not_a_library() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let d = t.join("ld");
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(t.join("gone"), d.join("libnccl.so.2")).unwrap();
        touch(&d.join("libnccl.so"));
        let env = FakeEnv::new(&[("LD_LIBRARY_PATH", &d.display().to_string())]);
        let f = find_library_in(LibraryKind::Nccl, &env.f(), &roots_in(t)).unwrap();
        assert_eq!(f.path, d.join("libnccl.so"));
    }

    #[test]
    fn headers_come_from_cuda_path_or_else_a_wheel_when_cubecl_would_miss_them() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let roots = roots_in(t);
        // /usr/local/cuda exists (libraries only): cubecl would take it and miss the headers.
        std::fs::create_dir_all(t.join("usr/local/cuda/lib64")).unwrap();
        let wheel = t.join("usr/local/lib/python3.12/dist-packages/nvidia/cu13");
        touch(&wheel.join("include/cuda_runtime.h"));
        let env = FakeEnv::new(&[]);
        let h = find_cuda_headers(&env.f(), &roots);
        assert_eq!(h.cubecl_root, Some(t.join("usr/local/cuda")));
        assert_eq!(h.usable_root, Some(wheel.clone()));
        assert_eq!(h.cuda_path_to_set(), Some(wheel.as_path()));

        // A toolkit with headers: nothing to change.
        touch(&t.join("usr/local/cuda/include/cuda_runtime.h"));
        let h = find_cuda_headers(&env.f(), &roots);
        assert_eq!(h.cuda_path_to_set(), None);
        assert_eq!(h.usable_root, Some(t.join("usr/local/cuda")));

        // Nothing anywhere.
        let empty = tempfile::tempdir().unwrap();
        let h = find_cuda_headers(&env.f(), &roots_in(empty.path()));
        assert_eq!(h.usable_root, None);
        assert_eq!(h.cuda_path_to_set(), None);
    }
}
