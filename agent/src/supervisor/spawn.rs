//! Starting one worker: its own process group, the contract's environment, pipes for its log,
//! and death with the agent (PR_SET_PDEATHSIG), so that an agent killed by SIGKILL leaves no
//! worker behind on a node the coordinator already gave up on.

use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

/// Starts `program` with `env` added to the agent's environment, in a new process group.
///
/// # Errors
/// The program cannot be started (not found, not executable...).
pub fn spawn(
    program: &[String],
    env: &[(String, String)],
    cwd: Option<&Path>,
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
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
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
