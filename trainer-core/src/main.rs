//! `trainer CONFIG.yaml`: the worker process an agent starts per slot.
//! `trainer collective ...`: one rank of a collective benchmark or check.
//! `trainer tokenizer train ...`, `trainer data addition ...`: data for demos, no downloads.
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
    let sub = argv.get(1).cloned();
    let result = match sub.as_deref() {
        Some("tokenizer") => {
            argv.remove(1);
            Some(ringmaster_trainer::data_cli::tokenizer(
                ringmaster_trainer::data_cli::TokenizerArgs::parse_from(argv),
            ))
        }
        Some("data") => {
            argv.remove(1);
            Some(ringmaster_trainer::data_cli::data(
                ringmaster_trainer::data_cli::DataArgs::parse_from(argv),
            ))
        }
        _ => None,
    };
    if let Some(r) = result {
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trainer: {e:#}");
                ExitCode::from(2)
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
