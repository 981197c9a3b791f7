//! `agent --join HOST:PORT`: parses flags, sets up logging and signals, runs the agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ringmaster_agent::logging::{self, LogFormat};

/// Ringmaster node agent: joins a coordinator and runs one worker per slot.
#[derive(Parser, Debug)]
#[command(name = "agent", version)]
struct Args {
    /// Coordinator address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    join: String,
    /// This node's name (as in the hostfile). Default: the host name.
    #[arg(long)]
    name: Option<String>,
    /// Slots (GPUs) to announce, at most 1024. Default: CUDA_VISIBLE_DEVICES, else
    /// `nvidia-smi -L`, else 1.
    #[arg(long)]
    slots: Option<u32>,
    /// Where per-rank logs and job files go. One agent per work dir (`agent.lock` in it).
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// A directory jobs may write under (`output_dir`, `workdir:`), besides the work dir.
    /// Repeatable. System directories (/etc, /usr, /bin, /lib*...) are refused whatever the roots.
    #[arg(long = "allowed-root", value_name = "DIR")]
    allowed_roots: Vec<PathBuf>,
    /// File holding the join token the coordinator expects.
    #[arg(long, value_name = "FILE")]
    join_token_file: Option<PathBuf>,
    /// Address other nodes reach this one at (MASTER_ADDR when it hosts rank 0).
    #[arg(long, value_name = "IP")]
    advertise_addr: Option<String>,
    /// The trainer program for `train:` jobs. Default: `trainer` next to this binary, else on PATH.
    #[arg(long, value_name = "PATH")]
    trainer: Option<PathBuf>,
    /// Longest wait between reconnect attempts.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    max_backoff: Duration,
    /// Grace between SIGTERM and SIGKILL for workers when the agent shuts down.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn read_token(path: &PathBuf) -> Result<String, String> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| format!("--join-token-file {}: {e}", path.display()))?;
    let t = t.trim().to_owned();
    if t.is_empty() {
        return Err(format!(
            "--join-token-file {}: the file is empty",
            path.display()
        ));
    }
    Ok(t)
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let token = match args.join_token_file.as_ref().map(read_token).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agent: {e}");
            return ExitCode::from(2);
        }
    };
    let name = args.name.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "node".into())
    });
    if !ringmaster_agent::supervisor::is_safe_component(&name) {
        eprintln!("agent: --name '{name}': use 1-63 characters of A-Z a-z 0-9 . _ -");
        return ExitCode::from(2);
    }
    if args.slots == Some(0) {
        eprintln!("agent: --slots must be at least 1");
        return ExitCode::from(2);
    }
    let slots = args.slots.unwrap_or_else(ringmaster_agent::detect_slots);
    if slots > ringmaster_agent::MAX_SLOTS {
        let from = if args.slots.is_some() {
            "--slots"
        } else {
            "the detected slot count (CUDA_VISIBLE_DEVICES)"
        };
        eprintln!(
            "agent: {from} {slots} is above the limit of {} slots per agent",
            ringmaster_agent::MAX_SLOTS
        );
        return ExitCode::from(2);
    }
    let trainer = args.trainer.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("trainer")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("trainer"))
    });
    let work_dir = args
        .work_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ringmaster-agent-{name}")));
    let cfg = ringmaster_agent::Config {
        join: args.join,
        name,
        slots,
        work_dir,
        token,
        advertise_addr: args.advertise_addr.unwrap_or_default(),
        trainer,
        max_backoff: args.max_backoff,
        shutdown_grace: args.shutdown_grace,
        allowed_roots: args.allowed_roots,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = rt.block_on(async move {
        let shutdown = async {
            ringmaster_agent::shutdown_signal().await;
            tracing::info!("shutdown requested; stopping workers (a second signal exits at once)");
            tokio::spawn(async {
                ringmaster_agent::shutdown_signal().await;
                eprintln!("agent: second signal, exiting now");
                std::process::exit(130);
            });
        };
        ringmaster_agent::run(cfg, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: {e}");
            match e {
                ringmaster_agent::AgentError::Refused { .. }
                | ringmaster_agent::AgentError::BadAddress(_)
                | ringmaster_agent::AgentError::Locked(
                    ringmaster_agent::lock::LockError::Locked { .. },
                )
                | ringmaster_agent::AgentError::AllowedRoot(_) => ExitCode::from(2),
                ringmaster_agent::AgentError::Locked(_) => ExitCode::from(1),
                ringmaster_agent::AgentError::WorkDir { .. } => ExitCode::from(1),
            }
        }
    }
}
