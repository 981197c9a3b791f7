//! Signals during training. The handlers only set flags; the training loop reads them at the end
//! of every step and agrees with the other ranks (the flags travel with the step's loss):
//! - SIGTERM: every rank writes a checkpoint and exits with 143 (128 + SIGTERM), so that a
//!   preempted or cancelled job resumes from that step. A second SIGTERM changes nothing (the
//!   agent's SIGKILL after its grace period ends a trainer that cannot finish in time).
//! - SIGUSR1: every rank writes a checkpoint at the end of the step and goes on training (an
//!   on-demand checkpoint: `kill -USR1` any one rank).

use std::sync::atomic::{AtomicBool, Ordering};

static TERMINATED: AtomicBool = AtomicBool::new(false);
static CHECKPOINT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: nix::libc::c_int) {
    if sig == nix::libc::SIGUSR1 {
        CHECKPOINT.store(true, Ordering::SeqCst);
    } else {
        TERMINATED.store(true, Ordering::SeqCst);
    }
}

/// Installs the SIGTERM and SIGUSR1 handlers.
///
/// # Errors
/// When the handler cannot be installed.
pub fn install() -> std::io::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGUSR1] {
        // SAFETY: the handler only stores to atomics, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Whether SIGUSR1 arrived since the last call (clears it).
pub fn take_checkpoint_request() -> bool {
    CHECKPOINT.swap(false, Ordering::SeqCst)
}

/// Whether SIGTERM has arrived.
pub fn terminated() -> bool {
    TERMINATED.load(Ordering::SeqCst)
}
