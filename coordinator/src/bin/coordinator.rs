//! `coordinator`: parses flags, sets up logging and signals, runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ringmaster_agent::logging::{self, LogFormat};
use ringmaster_coordinator::server::limits::{JobLimits, RendezvousLimits, StateConfig};
use ringmaster_hostfile::Hostfile;

/// Ringmaster coordinator: cluster membership, job state, rendezvous.
#[derive(Parser, Debug)]
#[command(name = "coordinator", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:29500", value_name = "ADDR:PORT")]
    listen: String,
    /// DeepSpeed-style hostfile (`NAME slots=N` per line). Default: /job/hostfile when present.
    #[arg(long, value_name = "PATH")]
    hostfile: Option<PathBuf>,
    /// Where the embedded state store lives.
    #[arg(long, default_value = "ringmaster-data", value_name = "DIR")]
    data_dir: PathBuf,
    /// State store: `embedded` (default) or `etcd://HOST:PORT`.
    #[arg(long, default_value = "embedded", value_name = "URL")]
    store: String,
    /// File holding the token agents must present to join.
    #[arg(long, value_name = "FILE")]
    join_token_file: Option<PathBuf>,
    /// A node that sends no heartbeat for this long is lost.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    state: StateArgs,
}

/// The coordinator's state: recovery from a damaged store, and limits on what it keeps
/// (docs/operator-guide.md, "Limits").
#[derive(clap::Args, Debug)]
struct StateArgs {
    /// Start even though the state store is damaged: move it aside to
    /// state.redb.damaged-<unix time> and start with an empty state (a healthy store is kept).
    #[arg(long)]
    reset_state: bool,
    /// Most keys one job generation may hold in the trainers' rendezvous store.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    rendezvous_max_keys: usize,
    /// Most bytes (keys and values) one job generation may hold in the rendezvous store.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes, value_name = "SIZE")]
    rendezvous_max_bytes: u64,
    /// Finished jobs (succeeded, failed, cancelled) kept, the newest; older ones are removed
    /// (their logs stay on the agents).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    retain_finished_jobs: usize,
    /// How long a finished job is kept.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration, value_name = "DURATION")]
    retain_finished_for: Duration,
    /// Most jobs held, unfinished and finished together: a submit beyond it removes the oldest
    /// finished job, or is refused when every job is unfinished.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    max_jobs: usize,
    /// Most bytes of job specs and their files, all jobs together.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes, value_name = "SIZE")]
    max_job_bytes: u64,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    ringmaster_coordinator::server::limits::parse_bytes(s)
}

impl StateArgs {
    fn config(&self) -> Result<StateConfig, String> {
        for (flag, v) in [
            ("--rendezvous-max-keys", self.rendezvous_max_keys as u64),
            ("--rendezvous-max-bytes", self.rendezvous_max_bytes),
            ("--max-jobs", self.max_jobs as u64),
            ("--max-job-bytes", self.max_job_bytes),
        ] {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        Ok(StateConfig {
            reset_state: self.reset_state,
            rendezvous: RendezvousLimits {
                max_keys: self.rendezvous_max_keys,
                max_bytes: self.rendezvous_max_bytes,
            },
            jobs: JobLimits {
                retain_finished: self.retain_finished_jobs,
                retain_for: self.retain_finished_for,
                max_jobs: self.max_jobs,
                max_job_bytes: self.max_job_bytes,
            },
        })
    }
}

fn usage(msg: String) -> ExitCode {
    eprintln!("coordinator: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let hostfile_path = args.hostfile.clone().or_else(|| {
        let p = PathBuf::from("/job/hostfile");
        p.exists().then_some(p)
    });
    let hostfile = match hostfile_path
        .as_ref()
        .map(|p| Hostfile::load(p))
        .transpose()
    {
        Ok(h) => h,
        Err(e) => return usage(e.to_string()),
    };
    let join_token = match &args.join_token_file {
        None => None,
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
            Ok(_) => {
                return usage(format!(
                    "--join-token-file {}: the file is empty",
                    p.display()
                ));
            }
            Err(e) => return usage(format!("--join-token-file {}: {e}", p.display())),
        },
    };
    if args.heartbeat_timeout < Duration::from_millis(200) {
        return usage(format!(
            "--heartbeat-timeout {} is below the 200ms minimum",
            humantime::format_duration(args.heartbeat_timeout)
        ));
    }
    let state = match args.state.config() {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    let config = ringmaster_coordinator::server::Config {
        hostfile,
        data_dir: args.data_dir,
        store_url: args.store,
        join_token,
        heartbeat_timeout: args.heartbeat_timeout,
        state,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&args.listen).await {
            Ok(l) => l,
            Err(e) => return usage(format!("--listen {}: {e}", args.listen)),
        };
        let shutdown = async {
            ringmaster_agent::shutdown_signal().await;
            tokio::spawn(async {
                ringmaster_agent::shutdown_signal().await;
                eprintln!("coordinator: second signal, exiting now");
                std::process::exit(130);
            });
        };
        match ringmaster_coordinator::server::run(config, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("coordinator: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}
