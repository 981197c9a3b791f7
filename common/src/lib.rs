//! What the coordinator, the agent and ringctl share, so that none of them links another's
//! crate for it.
//!
//! Layout:
//! - [`logging`] — the tracing setup of every binary (text or JSON lines on stderr).
//! - [`metrics`] — the daemons' Prometheus endpoint: `GET /metrics` on plain HTTP, the text
//!   rendered by the caller.
//! - [`names`] — the check on names that become one path component (nodes, jobs).
//! - [`shutdown_signal`] — the binaries' shutdown request (SIGTERM or SIGINT).

pub mod logging;
pub mod metrics;
pub mod names;

/// Resolves on the first SIGTERM or SIGINT (the binaries' shutdown request).
///
/// # Panics
/// If the signal handlers cannot be installed (no tokio runtime with signals enabled).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
