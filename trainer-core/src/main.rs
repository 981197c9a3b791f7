//! `trainer [train] [RECIPE.yaml] [key=value ...] [--key [value] ...]`: the worker process an
//! agent starts per slot, with LLaMA-Factory's command-line forms (`llamafactory-cli train
//! recipe.yaml key=value`, and the HF argument parser's `--key value` / bare `--flag`).
//! `trainer collective ...`: one rank of a collective benchmark or check.
//! `trainer tokenizer train ...`, `trainer data addition ...`: data for demos, no downloads.
//!
//! `trainer eval CONFIG.yaml`: exact-match evaluation of the trained model in output_dir.
//! `trainer generate --model DIR --prompt TEXT`: greedy decoding.
//! `trainer merge --base DIR --adapter DIR --out DIR`: a LoRA adapter merged into its base.
//! `trainer export CHECKPOINT --out DIR [--merge-lora]`: a Hugging Face directory from a
//! sharded checkpoint, streamed one tensor at a time.
//! `trainer init-model`, `trainer logits`: random HF models and their logits (HF parity checks).
//! `trainer rows --step S --world N [--loss] --out FILE -- RECIPE ...`: the rows a step trains
//! on (and the starting weights' loss on them).
//! `trainer device-info [--request auto|cpu|cuda]`: the device and CUDA libraries, as JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Ringmaster trainer: trains the model a training config describes.
///
/// The config is a recipe file in LLaMA-Factory's form, `key=value` overrides after it
/// (`trainer recipe.yaml output_dir=out/run1`), or its keys as flags (`trainer --stage sft
/// --model_name_or_path DIR --bf16 ...`, a bare `--flag` meaning true).
#[derive(Parser, Debug)]
#[command(name = "trainer", version, after_help = SUBCOMMANDS)]
// Parsed only for `--help` and `--version`: the arguments themselves are read by
// `Recipe::from_args`, which knows LLaMA-Factory's forms.
#[allow(dead_code)]
struct Args {
    /// Recipe file (YAML or JSON, LLaMA-Factory field names).
    #[arg(value_name = "RECIPE")]
    config: Option<PathBuf>,
    /// `key=value` overrides, or `--key [value]` flags.
    #[arg(
        value_name = "OVERRIDES",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    overrides: Vec<String>,
}

/// The subcommands, listed after `trainer --help` (each has its own `--help`).
const SUBCOMMANDS: &str = "\
Subcommands (each takes --help):
  train RECIPE [OVERRIDES]   train (the default: `trainer RECIPE` is the same)
  eval RECIPE [OVERRIDES]    exact match of the trained model in output_dir on eval_dataset
  generate                   greedy decoding of one prompt (--model DIR [--adapter DIR] --prompt TEXT)
  merge                      a LoRA adapter merged into its base (--base DIR --adapter DIR --out DIR)
  export                     a Hugging Face directory from a sharded checkpoint (CHECKPOINT --out DIR)
  collective                 one rank of a collective check or benchmark
  rows                       the rows a step trains on (--step S --world N --out FILE -- RECIPE)
  device-info                the device and CUDA libraries found, as JSON
  data addition              the quickstart's addition data set
  tokenizer train            a byte-level BPE tokenizer trained on a data file
  init-model                 a randomly initialised Hugging Face model
  logits                     a model's logits on token rows, as JSON

Exit codes: 0 success; 2 a bad config, flag or input (nothing trained); 3 a collective timed out;
4 another collective failure; 5 saving a checkpoint failed; 1 another failure; 143 stopped by
SIGTERM after committing a checkpoint.";

/// The training config from the arguments after `trainer [train|eval]`; `--help` and
/// `--version` (alone) are clap's.
fn recipe(argv: &[String]) -> Result<ringmaster_trainer::Recipe, ExitCode> {
    let rest = &argv[1..];
    if rest.is_empty()
        || (rest.len() == 1 && ["-h", "--help", "-V", "--version"].contains(&rest[0].as_str()))
    {
        // Prints the help or the version and exits; with no argument, falls through to the
        // "no training config" error below.
        let _ = Args::parse_from(argv);
    }
    ringmaster_trainer::Recipe::from_args(rest).map_err(|e| {
        eprintln!("trainer: {e:#}");
        ExitCode::from(2)
    })
}

/// `trainer device-info`: the device selection, the CUDA libraries and headers found, as JSON.
#[derive(Parser, Debug)]
#[command(name = "trainer device-info", bin_name = "trainer device-info")]
struct DeviceInfoArgs {
    /// The `device:` value to evaluate.
    #[arg(long, default_value = "auto", value_parser = parse_request)]
    request: ringmaster_device::DeviceRequest,
}

fn parse_request(s: &str) -> Result<ringmaster_device::DeviceRequest, String> {
    match s {
        "auto" => Ok(ringmaster_device::DeviceRequest::Auto),
        "cpu" => Ok(ringmaster_device::DeviceRequest::Cpu),
        "cuda" => Ok(ringmaster_device::DeviceRequest::Cuda),
        other => Err(format!("`{other}`: expected auto, cpu or cuda")),
    }
}

fn main() -> ExitCode {
    // Before other threads exist: keep freed activation buffers for reuse (host.rs).
    ringmaster_model::host::tune_allocator();
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
                ringmaster_trainer::data_cli::TokenizerArgs::parse_from(argv.clone()),
            ))
        }
        Some("data") => {
            argv.remove(1);
            Some(ringmaster_trainer::data_cli::data(
                ringmaster_trainer::data_cli::DataArgs::parse_from(argv.clone()),
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
    if sub.as_deref() == Some("generate") {
        argv.remove(1);
        let args = ringmaster_trainer::run::GenerateArgs::parse_from(argv);
        return exit(ringmaster_trainer::run::generate(args));
    }
    if sub.as_deref() == Some("logits") {
        argv.remove(1);
        let args = ringmaster_trainer::run::LogitsArgs::parse_from(argv);
        return exit(ringmaster_trainer::run::logits(args));
    }
    if sub.as_deref() == Some("rows") {
        argv.remove(1);
        let args = ringmaster_trainer::rows_cli::RowsArgs::parse_from(argv);
        return exit(ringmaster_model::host::on_compute_pool(|| {
            ringmaster_trainer::rows_cli::rows(args)
        }));
    }
    if sub.as_deref() == Some("init-model") {
        argv.remove(1);
        let args = ringmaster_trainer::run::InitArgs::parse_from(argv);
        return exit(ringmaster_trainer::run::init_model(args));
    }
    if sub.as_deref() == Some("merge") {
        argv.remove(1);
        let args = ringmaster_trainer::run::MergeArgs::parse_from(argv);
        return exit(ringmaster_trainer::run::merge(args));
    }
    if sub.as_deref() == Some("export") {
        argv.remove(1);
        let args = ringmaster_trainer::export::ExportArgs::parse_from(argv);
        return exit(ringmaster_trainer::export::export(args));
    }
    if sub.as_deref() == Some("device-info") {
        argv.remove(1);
        let args = DeviceInfoArgs::parse_from(argv);
        println!("{}", ringmaster_trainer::device::info(args.request));
        return ExitCode::SUCCESS;
    }
    if sub.as_deref() == Some("eval") {
        argv.remove(1);
        let recipe = match recipe(&argv) {
            Ok(r) => r,
            Err(code) => return code,
        };
        return exit(ringmaster_model::host::on_compute_pool(|| {
            ringmaster_trainer::run::eval(&recipe)
        }));
    }
    if sub.as_deref() == Some("train") {
        argv.remove(1);
    }
    let recipe = match recipe(&argv) {
        Ok(r) => r,
        Err(code) => return code,
    };
    // The training loop runs on a compute-pool thread, so that parallel kernels start on it
    // instead of waking a pool worker for every call (host.rs).
    exit(ringmaster_model::host::on_compute_pool(|| {
        ringmaster_trainer::run::train(&recipe)
    }))
}

/// Exit codes: 0 success; 2 a bad config, flag or input file (nothing was trained); 3 a
/// collective call timed out waiting for a peer; 4 another collective failure (a peer's
/// connection lost, a mismatched call, a failed bootstrap); 5 saving a checkpoint failed; 1 any
/// other failure while running (a collective aborted because the coordinator ended the
/// generation included); 143 stopped by SIGTERM after committing a checkpoint. The
/// coordinator reads 2-5 as a failure's reason (ConfigInvalid, CollectiveTimeout,
/// CollectiveFailed, CheckpointFailed).
fn exit(r: Result<(), ringmaster_trainer::run::RunError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(ringmaster_trainer::run::RunError::Usage(e)) => {
            eprintln!("trainer: {e:#}");
            ExitCode::from(2)
        }
        Err(ringmaster_trainer::run::RunError::Failed(e)) => {
            eprintln!("trainer: {e:#}");
            if e.downcast_ref::<ringmaster_trainer::train::Terminated>()
                .is_some()
            {
                // 128 + SIGTERM, as a shell reports a process ended by the signal.
                return ExitCode::from(143);
            }
            ExitCode::from(failure_code(&e))
        }
    }
}

/// The exit code of a failure while running (see [`exit`]).
fn failure_code(e: &anyhow::Error) -> u8 {
    use ringmaster_collectives::CommError;
    let comm = e.chain().find_map(|c| c.downcast_ref::<CommError>());
    match comm {
        Some(CommError::Timeout { .. }) => 3,
        Some(CommError::Aborted { .. }) => 1,
        Some(_) => 4,
        None if e
            .downcast_ref::<ringmaster_trainer::train::CheckpointFailed>()
            .is_some() =>
        {
            5
        }
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ringmaster_collectives::{CommError, Op};

    use super::failure_code;

    #[test]
    fn failures_map_to_the_codes_the_coordinator_reads() {
        let timeout = || CommError::Timeout {
            op: Op::AllReduce,
            seq: 7,
            peer: 2,
            waited: Duration::from_secs(5),
        };
        let lost = CommError::PeerLost {
            op: Op::AllReduce,
            seq: 7,
            peer: 2,
            detail: "reset".into(),
        };
        let aborted = CommError::Aborted {
            op: Op::AllReduce,
            seq: 7,
            reason: "generation ended".into(),
        };
        let ckpt = ringmaster_trainer::train::CheckpointFailed { step: 10 };
        assert_eq!(
            failure_code(&anyhow::Error::new(timeout()).context("step 12")),
            3
        );
        assert_eq!(failure_code(&anyhow::Error::new(lost)), 4);
        assert_eq!(failure_code(&anyhow::Error::new(aborted)), 1);
        // A checkpoint that failed because a peer timed out in its barrier: the timeout.
        assert_eq!(
            failure_code(&anyhow::Error::new(timeout()).context(ckpt)),
            3
        );
        let disk = anyhow::anyhow!("No space left on device");
        let ckpt = ringmaster_trainer::train::CheckpointFailed { step: 10 };
        assert_eq!(failure_code(&disk.context(ckpt)), 5);
        assert_eq!(failure_code(&anyhow::anyhow!("anything else")), 1);
    }
}
