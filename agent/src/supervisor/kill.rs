//! Signals to whole process groups: a worker and everything it forked.

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Sends `sig` to the process group `pgid`. A group that no longer exists is not an error.
pub fn signal_group(pgid: u32, sig: Signal) {
    if pgid <= 1 {
        return; // never signal init's or our own group by accident
    }
    match killpg(Pid::from_raw(pgid as i32), sig) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, signal = ?sig, error = %e, "could not signal process group"),
    }
}

/// Whether any process of the group is still alive.
pub fn group_alive(pgid: u32) -> bool {
    pgid > 1 && killpg(Pid::from_raw(pgid as i32), None).is_ok()
}
