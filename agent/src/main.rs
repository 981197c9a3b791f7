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
    /// Coordinator address, HOST:PORT; or several sharing one etcd, HOST:PORT,HOST:PORT,...
    /// (the agent joins whichever leads, and follows a failover).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
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
    /// Run every worker as this unprivileged user (with its groups), so that job code cannot
    /// read the agent's credentials or keys. Needs the agent to run as root.
    #[arg(long, value_name = "USER")]
    worker_user: Option<String>,
    /// CA (PEM) the coordinator's certificate must chain to; enables TLS. Workers get it too.
    #[arg(long, value_name = "FILE", env = "RINGMASTER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Name to verify in the coordinator's certificate (default: the host of --join).
    #[arg(long, value_name = "NAME")]
    tls_domain: Option<String>,
    /// This agent's certificate (PEM), for a coordinator that requires mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
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
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (plain HTTP, no credential: bind
    /// an address only the monitoring system reaches). Off by default.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Rotate a rank log when it would grow past this size (64MiB, 1GiB, bytes); 0: never.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = ringmaster_config::units::parse_size)]
    log_max_bytes: u64,
    /// Rotated rank logs kept (rank-R.log.1 newest .. rank-R.log.N oldest); older ones are deleted.
    #[arg(long, value_name = "N", default_value_t = ringmaster_agent::supervisor::logs::Rotation::DEFAULT_KEEP,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    log_keep: u32,
}

fn read_token(path: &std::path::Path) -> Result<String, String> {
    ringmaster_auth::credentials::read_token_file(path)
        .map_err(|e| format!("--join-token-file {e}"))
}

/// A regular file someone may execute (the trainer for `train:` jobs); a bare name is looked
/// up on PATH, as starting it would.
fn is_executable_file(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if p.components().count() > 1 || p.is_absolute() {
        return executable(p);
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| executable(&d.join(p))))
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let token = match args.join_token_file.as_deref().map(read_token).transpose() {
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
    if args.max_backoff < std::time::Duration::from_millis(100) {
        eprintln!(
            "agent: --max-backoff {:?} is too short: at least 100ms (reconnects would spin)",
            args.max_backoff
        );
        return ExitCode::from(2);
    }
    if args.slots == Some(0) {
        eprintln!("agent: --slots must be at least 1");
        return ExitCode::from(2);
    }
    let worker_user = match args
        .worker_user
        .as_deref()
        .map(ringmaster_agent::supervisor::spawn::WorkerUser::resolve)
        .transpose()
    {
        Ok(u) => u,
        Err(e) => {
            eprintln!("agent: {e}");
            return ExitCode::from(2);
        }
    };
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
    if let Some(t) = &args.trainer
        && !is_executable_file(t)
    {
        eprintln!(
            "agent: --trainer {}: not an executable file (nor a program on PATH)",
            t.display()
        );
        return ExitCode::from(2);
    }
    if let Some(w) = &args.work_dir
        && w.exists()
        && !w.is_dir()
    {
        eprintln!("agent: --work-dir {}: not a directory", w.display());
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
        worker_user,
        tls: ringmaster_auth::ClientTls {
            // Workers run in other directories: hand them an absolute path.
            ca: args.tls_ca.map(|p| std::path::absolute(&p).unwrap_or(p)),
            domain: args.tls_domain,
            identity: args.tls_cert.zip(args.tls_key),
        },
        advertise_addr: args.advertise_addr.unwrap_or_default(),
        trainer,
        max_backoff: args.max_backoff,
        shutdown_grace: args.shutdown_grace,
        log_rotation: ringmaster_agent::supervisor::logs::Rotation {
            max_bytes: args.log_max_bytes,
            keep: args.log_keep,
        },
        allowed_roots: args.allowed_roots,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    // Bound before anything starts, so that a taken port is an error at once.
    let metrics_listener = match args.metrics_listen {
        Some(at) => match rt.block_on(tokio::net::TcpListener::bind(at)) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("agent: --metrics-listen {at}: cannot listen: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
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
        ringmaster_agent::run_with_metrics(cfg, metrics_listener, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent: {e}");
            match e {
                ringmaster_agent::AgentError::Refused { .. }
                | ringmaster_agent::AgentError::BadAddress(_)
                | ringmaster_agent::AgentError::BadTls(_)
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
