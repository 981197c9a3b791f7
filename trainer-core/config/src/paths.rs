//! Path rules for the places a job may write: ringctl (resolving a config's relative paths),
//! the coordinator (submit-time checks), the agent (allowed roots) and the trainer (checkpoint
//! manifests, the resume point) apply the same functions.
//!
//! A path is judged in two steps: [`normalize`] folds `.` and `..` lexically; [`resolve`] then
//! canonicalises the deepest ancestor that exists, so that a symlink anywhere on the way is
//! followed before the path is compared with a root (a link to `/etc` inside an allowed root
//! does not pass as a path inside it). A component that does not exist yet cannot be a link.

use std::io;
use std::path::{Component, Path, PathBuf};

/// Top-level directories no job may write into, whatever root contains them. `/lib*` (lib,
/// lib32, lib64, libx32...) is matched by prefix.
pub const SYSTEM_DIRS: &[&str] = &["etc", "usr", "bin", "sbin", "boot", "proc", "sys", "dev"];

/// Why a path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("`{field}: {path}`: {why}")]
    Invalid {
        field: String,
        path: String,
        why: String,
    },
    #[error(
        "`{field}: {path}` is a system directory (/, /etc, /usr, /bin, /sbin, /lib*, /boot, /proc, /sys, /dev are refused)"
    )]
    System { field: String, path: String },
    #[error("`{field}: {path}` ({resolved}) lies outside the allowed roots ({})", roots_text(.roots))]
    OutsideRoots {
        field: String,
        path: String,
        resolved: String,
        roots: Vec<PathBuf>,
    },
    #[error("`{field}: {path}`: resolving {at}: {message}")]
    Resolve {
        field: String,
        path: String,
        at: String,
        message: String,
    },
}

fn roots_text(roots: &[PathBuf]) -> String {
    roots
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Folds `.` and `a/..` lexically. `..` at the root of an absolute path stays at the root; a
/// relative path keeps its leading `..` (see [`has_parent_component`]).
pub fn normalize(p: &Path) -> PathBuf {
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir) | Some(Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            _ => out.push(c),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

/// Whether `p` has a `..` component.
pub fn has_parent_component(p: &Path) -> bool {
    p.components().any(|c| c == Component::ParentDir)
}

/// Whether the absolute path `p` is the filesystem root or lies in one of [`SYSTEM_DIRS`] or
/// `/lib*`. `p` should be normalised (or resolved) first.
pub fn is_system_dir(p: &Path) -> bool {
    let mut cs = p.components();
    if cs.next() != Some(Component::RootDir) {
        return false;
    }
    match cs.next() {
        None => true,
        Some(Component::Normal(top)) => {
            let top = top.to_string_lossy();
            SYSTEM_DIRS.contains(&top.as_ref()) || top.starts_with("lib")
        }
        Some(_) => false,
    }
}

/// `p` made absolute against `base`, normalised, with its deepest existing ancestor
/// canonicalised (symlinks followed) and the components that do not exist yet appended.
///
/// # Errors
/// An ancestor that exists but cannot be canonicalised (a dangling or looping symlink, no
/// permission), with that ancestor's path.
pub fn resolve(p: &Path, base: &Path) -> Result<PathBuf, (PathBuf, io::Error)> {
    let abs = normalize(&base.join(p));
    let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
    let mut cur: &Path = &abs;
    loop {
        match std::fs::symlink_metadata(cur) {
            Ok(_) => {
                let mut real = std::fs::canonicalize(cur).map_err(|e| (cur.to_owned(), e))?;
                for c in rest.iter().rev() {
                    real.push(c);
                }
                return Ok(real);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err((cur.to_owned(), e)),
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                cur = parent;
            }
            // The root always exists; reaching past it means a relative base.
            _ => return Ok(abs),
        }
    }
}

/// Checks a path a job writes to (`output_dir`, a worker's `workdir`) on the node that will
/// write it: resolved against `base` (see [`resolve`]), it must lie inside one of `roots`
/// (themselves already canonical) and outside the system directories. Returns the resolved path.
///
/// # Errors
/// Which rule the path breaks, naming `field`, the path as written and the allowed roots.
pub fn check_writable(
    field: &str,
    path: &str,
    base: &Path,
    roots: &[PathBuf],
) -> Result<PathBuf, PathError> {
    if path.is_empty() || path.contains('\0') {
        return Err(PathError::Invalid {
            field: field.into(),
            path: path.into(),
            why: "an empty path or one with a NUL byte".into(),
        });
    }
    let lexical = normalize(&base.join(path));
    if is_system_dir(&lexical) {
        return Err(PathError::System {
            field: field.into(),
            path: path.into(),
        });
    }
    let resolved = resolve(Path::new(path), base).map_err(|(at, e)| PathError::Resolve {
        field: field.into(),
        path: path.into(),
        at: at.display().to_string(),
        message: e.to_string(),
    })?;
    if is_system_dir(&resolved) {
        return Err(PathError::System {
            field: field.into(),
            path: format!("{path} ({})", resolved.display()),
        });
    }
    if !roots.iter().any(|r| resolved.starts_with(r)) {
        return Err(PathError::OutsideRoots {
            field: field.into(),
            path: path.into(),
            resolved: resolved.display().to_string(),
            roots: roots.to_vec(),
        });
    }
    Ok(resolved)
}

/// Submit-time rules for a path a job writes to, without knowledge of any node: absolute (the
/// directory a worker starts in differs per generation, so a relative path would move; ringctl
/// makes relative paths absolute before it submits), no `..` component, not a system directory.
///
/// # Errors
/// The rule broken, naming `field` and the path.
pub fn check_submitted(field: &str, path: &str) -> Result<(), PathError> {
    let invalid = |why: &str| PathError::Invalid {
        field: field.into(),
        path: path.into(),
        why: why.into(),
    };
    if path.is_empty() || path.contains('\0') {
        return Err(invalid("an empty path or one with a NUL byte"));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(invalid(
            "must be an absolute path (ringctl resolves relative paths against the directory it runs in)",
        ));
    }
    if has_parent_component(p) {
        return Err(invalid("`..` components are not allowed"));
    }
    if is_system_dir(&normalize(p)) {
        return Err(PathError::System {
            field: field.into(),
            path: path.into(),
        });
    }
    Ok(())
}

/// Whether `name` is a plain file name: one normal component, no `/`, not `.` or `..`, no NUL.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && !name.contains('\0') && name != "." && name != ".."
}

/// `dir/name` for a file name read from a file in `dir` (a checkpoint manifest's shard entry):
/// `name` must be a plain file name, and if `dir/name` exists it must resolve (symlinks
/// followed) to a path inside `dir`.
///
/// # Errors
/// Why the entry is refused, in words to follow "entry `NAME` ".
pub fn file_in_dir(dir: &Path, name: &str) -> Result<PathBuf, String> {
    if !is_plain_file_name(name) {
        return Err(
            "is not a plain file name inside the directory (no `/`, `..` or absolute paths)".into(),
        );
    }
    let path = dir.join(name);
    if std::fs::symlink_metadata(&path).is_ok() {
        let real = std::fs::canonicalize(&path).map_err(|e| format!("cannot be resolved ({e})"))?;
        let real_dir = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !real.starts_with(&real_dir) {
            return Err(format!(
                "is a symlink that leads outside the directory (to {})",
                real.display()
            ));
        }
    }
    Ok(path)
}

/// Training-config keys whose string value is a path the trainer reads or writes.
pub const PATH_KEYS: &[&str] = &[
    "model_name_or_path",
    "dataset_dir",
    "output_dir",
    "resume_from_checkpoint",
];

/// Makes a training config's relative paths absolute against `base`, the directory the job is
/// started from, as `llamafactory-cli train` reads them relative to the directory it runs in:
/// the [`PATH_KEYS`]; `dataset_dir`, when absent, becomes `base/data` (LLaMA-Factory's default)
/// if the config names a dataset; and `dataset` / `eval_dataset` items that are files under
/// `base` (not names in `dataset_info.json`). The DeepSpeed / FSDP / accelerate file keys are
/// left as written: their files travel with the job. Workers start in a per-generation
/// directory, so without this a relative path would resolve somewhere else on every restart.
pub fn absolutize_config(cfg: &mut serde_json::Map<String, serde_json::Value>, base: &Path) {
    use serde_json::Value;
    let abs = |s: &str| normalize(&base.join(s)).display().to_string();
    for key in PATH_KEYS {
        if let Some(Value::String(s)) = cfg.get_mut(*key)
            && !s.is_empty()
            && Path::new(s.as_str()).is_relative()
            && !(*key == "resume_from_checkpoint"
                && matches!(s.as_str(), "true" | "True" | "false" | "False"))
        {
            *s = abs(s);
        }
    }
    let names_data = ["dataset", "eval_dataset"]
        .iter()
        .any(|k| cfg.get(*k).is_some_and(|v| !v.is_null()));
    if names_data && cfg.get("dataset_dir").is_none_or(Value::is_null) {
        cfg.insert("dataset_dir".into(), Value::String(abs("data")));
    }
    let dataset_dir = cfg
        .get("dataset_dir")
        .and_then(Value::as_str)
        .map(PathBuf::from)
        .unwrap_or_else(|| base.join("data"));
    let info: Option<serde_json::Value> =
        std::fs::read_to_string(dataset_dir.join("dataset_info.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    for key in ["dataset", "eval_dataset"] {
        let items: Vec<String> = match cfg.get(key) {
            Some(Value::String(s)) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => continue,
        };
        let mut changed = false;
        let rewritten: Vec<Value> = items
            .into_iter()
            .map(|item| {
                let named = info.as_ref().is_some_and(|i| i.get(&item).is_some());
                if !named && Path::new(&item).is_relative() && base.join(&item).is_file() {
                    changed = true;
                    Value::String(abs(&item))
                } else {
                    Value::String(item)
                }
            })
            .collect();
        if changed {
            cfg.insert(key.into(), Value::Array(rewritten));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_folds_dots_lexically() {
        let cases = [
            ("/a/./b/../c", "/a/c"),
            ("/../etc", "/etc"),
            ("/a/b/../../..", "/"),
            ("a/../../x", "../x"),
            ("./a/", "a"),
            (".", "."),
            ("a/..", "."),
            ("/tmp//x", "/tmp/x"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(Path::new(input)), PathBuf::from(want), "{input}");
        }
        assert!(has_parent_component(&normalize(Path::new("a/../../x"))));
        assert!(!has_parent_component(&normalize(Path::new("/a/../../x"))));
    }

    #[test]
    fn system_dirs() {
        for p in [
            "/",
            "/etc",
            "/etc/x",
            "/usr/local/out",
            "/bin",
            "/sbin/a",
            "/lib",
            "/lib64/x",
            "/libx32",
            "/boot/x",
            "/proc/1",
            "/sys/x",
            "/dev/shm/x",
        ] {
            assert!(is_system_dir(Path::new(p)), "{p}");
        }
        for p in [
            "/tmp/x",
            "/home/u/etc",
            "/var/lib/x",
            "/opt/usr",
            "relative/etc",
            "/etcx",
        ] {
            assert!(!is_system_dir(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn submitted_paths() {
        assert!(check_submitted("output_dir", "/data/run-1").is_ok());
        let cases = [
            ("/etc/x", "system directory"),
            ("/usr/../etc/x", "`..`"),
            ("/a/../../etc", "`..`"),
            ("out/x", "absolute"),
            ("../x", "absolute"),
            ("", "empty"),
            ("/", "system directory"),
        ];
        for (p, want) in cases {
            let e = check_submitted("output_dir", p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("output_dir"), "{p}: {e}");
        }
    }

    #[test]
    fn roots_are_checked_after_symlinks_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let roots = [root.join("allowed")];
        std::fs::create_dir(&roots[0]).unwrap();
        std::fs::create_dir(root.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere"), roots[0].join("out-link")).unwrap();
        std::os::unix::fs::symlink("/etc", roots[0].join("etc-link")).unwrap();
        std::os::unix::fs::symlink(root.join("missing"), roots[0].join("dangling")).unwrap();

        // Inside, existing or not, absolute or relative to the base.
        let ok = check_writable("output_dir", "new/run", &roots[0], &roots).unwrap();
        assert_eq!(ok, roots[0].join("new/run"));
        let abs = roots[0].join("a/b/../c");
        let ok = check_writable("output_dir", abs.to_str().unwrap(), Path::new("/"), &roots);
        assert_eq!(ok.unwrap(), roots[0].join("a/c"));

        let err = |p: &str| {
            check_writable("output_dir", p, &roots[0], &roots)
                .unwrap_err()
                .to_string()
        };
        let e = err("out-link/x");
        assert!(
            e.contains("outside the allowed roots") && e.contains("elsewhere"),
            "{e}"
        );
        assert!(
            e.contains(roots[0].to_str().unwrap()),
            "names the roots: {e}"
        );
        assert!(err("../elsewhere").contains("outside the allowed roots"));
        assert!(err("etc-link/x").contains("system directory"));
        assert!(err("/etc/x").contains("system directory"));
        assert!(
            err("dangling/x").contains("resolving"),
            "{}",
            err("dangling/x")
        );
        // A root is matched by whole components.
        let sibling = format!("{}-2/x", roots[0].display());
        assert!(err(&sibling).contains("outside the allowed roots"));
    }

    #[test]
    fn manifest_entries_stay_in_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        let ck = dir.path().join("checkpoint-1");
        std::fs::create_dir(&ck).unwrap();
        std::fs::write(ck.join("rank-00000.safetensors"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), ck.join("escape")).unwrap();
        std::os::unix::fs::symlink("rank-00000.safetensors", ck.join("inside")).unwrap();

        assert_eq!(
            file_in_dir(&ck, "rank-00000.safetensors").unwrap(),
            ck.join("rank-00000.safetensors")
        );
        assert!(file_in_dir(&ck, "inside").is_ok());
        assert!(file_in_dir(&ck, "not-yet-there").is_ok());
        for bad in ["../../x", "../secret", "/etc/passwd", "a/b", "..", ".", ""] {
            let e = file_in_dir(&ck, bad).unwrap_err();
            assert!(e.contains("plain file name"), "{bad}: {e}");
        }
        assert!(file_in_dir(&ck, "escape").unwrap_err().contains("symlink"));
    }

    #[test]
    fn relative_config_paths_become_absolute_against_the_start_directory() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        std::fs::create_dir(base.join("data")).unwrap();
        std::fs::write(
            base.join("data/dataset_info.json"),
            r#"{"named": {"file_name": "n.json"}}"#,
        )
        .unwrap();
        std::fs::write(base.join("local.jsonl"), b"{}").unwrap();
        std::fs::write(base.join("named"), b"a file that shadows nothing").unwrap();
        let mut cfg: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"model_name_or_path": "models/m", "output_dir": "../out/./run",
                "resume_from_checkpoint": "true", "deepspeed": "ds.json",
                "dataset": "named, local.jsonl, absent", "eval_dataset": ["named"]}"#,
        )
        .unwrap();
        absolutize_config(&mut cfg, base);
        let b = base.display();
        let parent = base.parent().unwrap().display();
        assert_eq!(cfg["model_name_or_path"], format!("{b}/models/m"));
        assert_eq!(cfg["output_dir"], format!("{parent}/out/run"));
        assert_eq!(cfg["resume_from_checkpoint"], "true");
        assert_eq!(
            cfg["deepspeed"], "ds.json",
            "files travel with the job as named"
        );
        assert_eq!(cfg["dataset_dir"], format!("{b}/data"));
        assert_eq!(
            cfg["dataset"],
            serde_json::json!(["named", format!("{b}/local.jsonl"), "absent"])
        );
        assert_eq!(cfg["eval_dataset"], serde_json::json!(["named"]));
        // Absolute paths and an explicit dataset_dir are kept.
        let mut cfg: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"output_dir": "/srv/o", "dataset_dir": "/srv/d"}"#).unwrap();
        absolutize_config(&mut cfg, base);
        assert_eq!(cfg["output_dir"], "/srv/o");
        assert_eq!(cfg["dataset_dir"], "/srv/d");
    }
}
