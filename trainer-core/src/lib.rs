//! The trainer: the library behind the `trainer` binary, one process per rank. `trainer
//! CONFIG.yaml` places the rank on a device, joins its job's collectives, trains through the
//! sharded engine, writes checkpoints and reports progress to the coordinator; the other
//! subcommands evaluate, generate, merge LoRA, export, make demo data, check collectives and report
//! the device. Walls: the coordinator and the agent never depend on this crate; the engine reaches
//! collectives only as `dyn Communicator` (built in [`dist`]) and keeps the training state in host
//! flat f32 units, never in burn tensors, whatever the backend ([`train::engine::TrainBackend`]).
//!
//! Layout:
//! - [`run`] — the subcommands that run the model: train (placement, communicators, progress,
//!   then the loop), eval, generate, merge, and `init-model`/`logits` for HF parity checks.
//! - [`device`] — where a rank runs (`device: auto | cpu | cuda` through `ringmaster-device`,
//!   which may re-execute the process once for CUDA library paths), the loop instantiated for
//!   that burn backend, and `trainer device-info`.
//! - [`dist`] — rank and world from the environment, the bootstrap store, and the communicators
//!   the placement's [`dist::Fabric`] asks for (TCP ring or NCCL).
//! - [`rendezvous`] — the coordinator's RendezvousService as a collectives bootstrap store.
//! - [`progress`] — per-step reports and heartbeats to the coordinator; its ABORTED aborts the
//!   communicators.
//! - [`signals`] — SIGTERM and SIGUSR1 as flags that every rank agrees on at each step.
//! - [`train`] — the training loop (data → [`train::engine::Engine::step`] → log, checkpoint,
//!   signals), with `engine/` (layout, comm, passes, state), `checkpoint`, `resume`, `report`,
//!   `setup`, `data_cache` and `eval`.
//! - [`export`] — `trainer export`: a Hugging Face directory from a checkpoint of any layout.
//! - [`collective_cli`] — `trainer collective`: one rank of a collective benchmark or check.
//! - [`data_cli`] — `trainer tokenizer train`, `trainer data addition`.
//! - [`load_config`] — reads and validates a training config (`ringmaster-config`).

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
