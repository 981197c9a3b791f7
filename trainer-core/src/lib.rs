//! Ringmaster's training engine (burn): model, data, collectives, engines, checkpoints.
//!
//! Skeleton for now: the engine lands with its own issue. What exists is the shared,
//! burn-free training-config schema in `trainer-core/config` (crate `ringmaster-config`),
//! which the coordinator already uses to validate jobs at submit time.
//!
//! Layout:
//! - [`load_config`] — reads and validates a training config file.
//! - [`collective_cli`] — `trainer collective`: one rank of a collective benchmark or check.
//! - [`rendezvous`] — the coordinator's rendezvous service as a collectives bootstrap store.
//! - [`data_cli`] — `trainer tokenizer train`, `trainer data addition`.

pub mod collective_cli;
pub mod data_cli;
pub mod device;
pub mod dist;
pub mod export;
pub mod progress;
pub mod rendezvous;
pub mod run;
pub mod signals;
pub mod train;

use std::path::Path;

pub use ringmaster_config::{ConfigError, TrainConfig};

/// Reads and validates the training config at `path`.
///
/// # Errors
/// The file cannot be read, or the config is invalid (the message names the file and field).
pub fn load_config(path: &Path) -> anyhow::Result<TrainConfig> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    TrainConfig::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
