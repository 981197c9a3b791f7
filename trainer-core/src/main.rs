//! `trainer CONFIG.yaml`: the worker process an agent starts per slot.
//! `trainer collective ...`: one rank of a collective benchmark or check.
//!
//! The training engine is not built yet; `trainer CONFIG.yaml` validates its config (so that
//! the control plane's `train:` path is exercised end to end) and says so.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Ringmaster trainer: trains the model a training config describes.
#[derive(Parser, Debug)]
#[command(name = "trainer", version)]
struct Args {
    /// Training config (LLaMA-Factory field names).
    config: PathBuf,
}

fn main() -> ExitCode {
    let mut argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("collective") {
        argv.remove(1);
        let args = ringmaster_trainer::collective_cli::Args::parse_from(argv);
        return match ringmaster_trainer::collective_cli::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trainer collective: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let args = Args::parse();
    match ringmaster_trainer::load_config(&args.config) {
        Err(e) => {
            eprintln!("trainer: {e:#}");
            ExitCode::from(2)
        }
        Ok(_) => {
            eprintln!(
                "trainer: {}: config is valid, but the training engine is not part of this build yet",
                args.config.display()
            );
            ExitCode::from(3)
        }
    }
}
