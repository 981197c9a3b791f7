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
//! - [`flops`] — MFU's inputs: the model FLOPs of one trained token and this rank's peak FLOP/s
//!   (GPU table, CPU measurement, `RINGMASTER_PEAK_FLOPS`).
//! - [`progress`] — per-step reports and heartbeats to the coordinator; its ABORTED aborts the
//!   communicators.
//! - [`signals`] — SIGTERM and SIGUSR1 as flags that every rank agrees on at each step.
//! - [`train`] — the training loop (data → [`train::engine::Engine::step`] → log, checkpoint,
//!   signals), with `engine/` (layout, comm, passes, state), `checkpoint`, `resume`, `report`,
//!   `setup`, `data_cache` and `eval`.
//! - [`export`] — `trainer export`: a Hugging Face directory from a checkpoint of any layout.
//! - [`collective_cli`] — `trainer collective`: one rank of a collective benchmark or check.
//! - [`data_cli`] — `trainer tokenizer train`, `trainer data addition`.
//! - [`rows_cli`] — `trainer rows`: the rows a step trains on, and the starting weights' loss
//!   on them (checked against the logged loss and against transformers).
//! - [`load_config`] — reads and validates a training config (`ringmaster-config`).

pub mod collective_cli;
pub mod data_cli;
pub mod device;
pub mod dist;
pub mod export;
pub mod flops;
pub mod progress;
pub mod rendezvous;
pub mod rows_cli;
pub mod run;
pub mod signals;
pub mod train;

use std::path::{Path, PathBuf};

pub use ringmaster_config::{CommandLine, ConfigError, TrainConfig};

/// Reads and validates the training config at `path`.
///
/// # Errors
/// The file cannot be read, or the config is invalid (the message names the file and field).
pub fn load_config(path: &Path) -> anyhow::Result<TrainConfig> {
    Recipe::file(path).load()
}

/// Where a run's training config comes from, in LLaMA-Factory's command-line forms: a recipe
/// file (`trainer recipe.yaml`), the file with `key=value` overrides (`trainer recipe.yaml
/// output_dir=out`), or flags alone (`trainer --stage sft --model_name_or_path m --bf16 …`).
#[derive(Debug, Clone, Default)]
pub struct Recipe {
    pub path: Option<PathBuf>,
    pub command_line: CommandLine,
}

impl Recipe {
    /// A recipe file with no overrides.
    pub fn file(path: &Path) -> Recipe {
        Recipe {
            path: Some(path.to_owned()),
            command_line: CommandLine::default(),
        }
    }

    /// The arguments after `trainer [train]` (or `trainer eval`).
    ///
    /// # Errors
    /// No recipe and no override, or an override that is not a known key (named).
    pub fn from_args(args: &[String]) -> anyhow::Result<Recipe> {
        let command_line = CommandLine::parse(args)?;
        if command_line.recipe.is_none() && command_line.is_empty() {
            anyhow::bail!(
                "no training config: give a recipe file (trainer recipe.yaml [key=value ...]) \
                 or its keys as flags (trainer --stage sft --model_name_or_path DIR ...)"
            );
        }
        Ok(Recipe {
            path: command_line.recipe.as_ref().map(PathBuf::from),
            command_line,
        })
    }

    /// How messages name the config: the file, `FILE + command line`, or `command line`.
    pub fn origin(&self) -> String {
        match (&self.path, self.command_line.is_empty()) {
            (Some(p), true) => p.display().to_string(),
            (Some(p), false) => format!("{} + command line", p.display()),
            (None, _) => "command line".into(),
        }
    }

    /// A path whose directory resolves the config's relative file names: the recipe's own, or
    /// the current directory for flags alone.
    pub fn anchor(&self) -> PathBuf {
        match &self.path {
            Some(p) => p.clone(),
            None => PathBuf::from(".").join("command-line"),
        }
    }

    /// Reads the recipe (YAML or JSON), merges the overrides and validates the result.
    ///
    /// # Errors
    /// The file cannot be read, or the merged config is invalid (the message names the origin
    /// and the field).
    pub fn load(&self) -> anyhow::Result<TrainConfig> {
        let origin = self.origin();
        let mut value = match &self.path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                ringmaster_config::parse_document(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
            }
            None => serde_json::Value::Object(Default::default()),
        };
        // A non-mapping document is refused by from_value below, naming the origin.
        if let serde_json::Value::Object(map) = &mut value {
            self.command_line.apply(map);
        }
        TrainConfig::from_value(&value).map_err(|e| anyhow::anyhow!("{origin}: {e}"))
    }
}
