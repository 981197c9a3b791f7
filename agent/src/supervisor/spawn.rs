//! Starting one worker: its own process group, the contract's environment, pipes for its log,
//! and death with the agent (PR_SET_PDEATHSIG), so that an agent killed by SIGKILL leaves no
//! worker behind on a node the coordinator already gave up on.

use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

/// The unprivileged user workers run as (`agent --worker-user`), resolved once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. `video`/`render` for GPU device nodes).
    pub groups: Vec<u32>,
}

impl WorkerUser {
    /// Looks `name` up in the user database.
    ///
    /// # Errors
    /// An unknown user, root, or an agent that is neither root nor that user (it could not
    /// switch).
    pub fn resolve(name: &str) -> Result<WorkerUser, String> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| format!("--worker-user {name}: {e}"))?
            .ok_or_else(|| format!("--worker-user {name}: no such user"))?;
        if user.uid.is_root() {
            return Err(format!(
                "--worker-user {name}: workers must not run as root; name an unprivileged user"
            ));
        }
        let me = nix::unistd::geteuid();
        if !me.is_root() && me != user.uid {
            return Err(format!(
                "--worker-user {name}: the agent runs as uid {me}, which cannot switch to uid {} \
                 (run the agent as root, or drop the flag)",
                user.uid
            ));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| format!("--worker-user {name:?}"))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(|e| format!("--worker-user {name}: reading its groups: {e}"))?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(WorkerUser {
            name: name.to_owned(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
        })
    }
}

/// Starts `program` with `env` added to the agent's environment, in a new process group, as
/// `user` when given.
///
/// # Errors
/// The program cannot be started (not found, not executable, the user cannot be switched to).
pub fn spawn(
    program: &[String],
    env: &[(String, String)],
    cwd: Option<&Path>,
    user: Option<&WorkerUser>,
) -> std::io::Result<Child> {
    let (exe, args) = program
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let parent = std::process::id() as libc::pid_t;
    // The groups, gid and uid are switched here rather than with Command::uid/gid, so that the
    // user's supplementary groups (GPU device access) are kept; PDEATHSIG is set after the
    // switch, which clears it.
    let creds = user.map(|u| (u.uid, u.gid, u.groups.clone()));
    if let Some(u) = user {
        cmd.env("USER", &u.name).env("LOGNAME", &u.name);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (setgroups, setgid, setuid, prctl, getppid, _exit) on data
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid, groups)) = &creds
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::_exit(137);
            }
            Ok(())
        });
    }
    cmd.spawn()
}
