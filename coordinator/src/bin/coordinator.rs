//! `coordinator`: parses flags, sets up logging and signals, runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ringmaster_agent::logging::{self, LogFormat};
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
    let config = ringmaster_coordinator::server::Config {
        hostfile,
        data_dir: args.data_dir,
        store_url: args.store,
        join_token,
        heartbeat_timeout: args.heartbeat_timeout,
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
