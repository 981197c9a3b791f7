//! Where a job may make this agent's workers write: the work dir and the operator's
//! `--allowed-root` directories, never a system directory. Checked before a generation starts,
//! for a job's `workdir:` and a `train:` job's `output_dir` (the rules themselves are
//! [`ringmaster_config::paths`], shared with the coordinator and the trainer).

use std::path::{Path, PathBuf};

use ringmaster_config::paths;

/// The directories a job may write under, canonicalised once at start.
#[derive(Debug, Clone)]
pub struct AllowedRoots {
    roots: Vec<PathBuf>,
}

/// A root given with `--allowed-root` that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--allowed-root {}: {source}", .path.display())]
pub struct RootError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl AllowedRoots {
    /// Only `work_dir` (already canonical).
    pub fn only(work_dir: &Path) -> AllowedRoots {
        AllowedRoots {
            roots: vec![work_dir.to_owned()],
        }
    }

    /// `work_dir` (already canonical) and each of `extra`, canonicalised (each must exist).
    ///
    /// # Errors
    /// A root that does not exist or cannot be resolved.
    pub fn new(work_dir: &Path, extra: &[PathBuf]) -> Result<AllowedRoots, RootError> {
        let mut roots = vec![work_dir.to_owned()];
        for r in extra {
            let c = r.canonicalize().map_err(|source| RootError {
                path: r.clone(),
                source,
            })?;
            if !c.is_dir() {
                return Err(RootError {
                    path: r.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        "not a directory",
                    ),
                });
            }
            if paths::is_system_dir(&c) {
                return Err(RootError {
                    path: r.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "{} is a system directory (or the root): jobs may never write there",
                            c.display()
                        ),
                    ),
                });
            }
            if !roots.contains(&c) {
                roots.push(c);
            }
        }
        Ok(AllowedRoots { roots })
    }

    pub fn as_slice(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Checks a path a job writes to, relative ones against `base`; returns it resolved.
    ///
    /// # Errors
    /// A one-line message naming the field, the path and the allowed roots.
    pub fn check(&self, field: &str, path: &str, base: &Path) -> Result<PathBuf, String> {
        paths::check_writable(field, path, base, &self.roots).map_err(|e| e.to_string())
    }

    /// The directory workers of a job start in: its `workdir:` when given (an existing
    /// directory inside the roots), else `gen_dir`. Also checks a `train:` job's `output_dir`
    /// (relative to that directory), so that nothing starts from a config that would write
    /// outside the roots.
    ///
    /// # Errors
    /// The first path refused, as a message for StartFailed.
    pub fn job_dirs(
        &self,
        workdir: &str,
        train_config: &str,
        gen_dir: &Path,
    ) -> Result<PathBuf, String> {
        let cwd = if workdir.is_empty() {
            gen_dir.to_owned()
        } else {
            let resolved = self.check("workdir", workdir, gen_dir)?;
            if !resolved.is_dir() {
                return Err(format!(
                    "`workdir: {workdir}` is not an existing directory on this node"
                ));
            }
            resolved
        };
        if !train_config.is_empty() {
            let cfg: serde_json::Value = serde_json::from_str(train_config)
                .map_err(|e| format!("training config from the coordinator is not JSON: {e}"))?;
            match cfg.get("output_dir") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(out)) => {
                    self.check("output_dir", out, &cwd)?;
                }
                Some(other) => return Err(format!("`output_dir: {other}` is not a path")),
            }
        }
        Ok(cwd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_dir_and_workdir_must_stay_inside_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let work = base.join("work");
        let data = base.join("data");
        std::fs::create_dir_all(work.join("job-1/gen-0")).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        let roots = AllowedRoots::new(&work, std::slice::from_ref(&data)).unwrap();
        let gen_dir = work.join("job-1/gen-0");
        let cfg = |out: &str| serde_json::json!({ "output_dir": out }).to_string();

        // No workdir: the generation's directory; relative output_dir under it.
        assert_eq!(roots.job_dirs("", &cfg("out"), &gen_dir).unwrap(), gen_dir);
        let run = data.join("run");
        assert!(
            roots
                .job_dirs("", &cfg(run.to_str().unwrap()), &gen_dir)
                .is_ok()
        );
        assert_eq!(
            roots
                .job_dirs(data.to_str().unwrap(), &cfg("run"), &gen_dir)
                .unwrap(),
            data
        );

        let e = roots.job_dirs("", &cfg("/etc/x"), &gen_dir).unwrap_err();
        assert!(
            e.contains("output_dir: /etc/x") && e.contains("system directory"),
            "{e}"
        );
        let outside = base.join("other/run");
        let e = roots
            .job_dirs("", &cfg(outside.to_str().unwrap()), &gen_dir)
            .unwrap_err();
        assert!(
            e.contains("output_dir")
                && e.contains("outside the allowed roots")
                && e.contains(data.to_str().unwrap())
                && e.contains(work.to_str().unwrap()),
            "{e}"
        );
        // A relative output_dir that climbs out of the generation dir and the work dir.
        let e = roots
            .job_dirs("", &cfg("../../../x"), &gen_dir)
            .unwrap_err();
        assert!(e.contains("outside the allowed roots"), "{e}");
        let e = roots.job_dirs("/tmp", "", &gen_dir).unwrap_err();
        assert!(e.contains("workdir: /tmp") && e.contains("outside"), "{e}");
        let missing = data.join("missing");
        let e = roots
            .job_dirs(missing.to_str().unwrap(), "", &gen_dir)
            .unwrap_err();
        assert!(e.contains("not an existing directory"), "{e}");
    }

    #[test]
    fn a_system_directory_is_no_root() {
        let dir = tempfile::tempdir().unwrap();
        for sys in ["/etc", "/usr", "/"] {
            let e = AllowedRoots::new(dir.path(), &[PathBuf::from(sys)]).unwrap_err();
            assert!(e.to_string().contains("system directory"), "{e}");
        }
    }

    #[test]
    fn a_missing_root_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let e = AllowedRoots::new(dir.path(), &[dir.path().join("nope")]).unwrap_err();
        assert!(e.to_string().starts_with("--allowed-root "), "{e}");
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
