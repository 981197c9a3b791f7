//! `coordinator`: parses flags, sets up logging and signals, runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ringmaster_common::logging::{self, LogFormat};
use ringmaster_coordinator::server::limits::{JobLimits, RendezvousLimits, StateConfig};
use ringmaster_hostfile::Hostfile;

/// Ringmaster coordinator: cluster membership, job state, rendezvous.
#[derive(Parser, Debug)]
#[command(name = "coordinator", version)]
struct Args {
    /// Address to listen on. Default: 0.0.0.0:29500 when a credential is configured, else
    /// 127.0.0.1:29500 (a coordinator without credentials serves only this machine unless
    /// --insecure is given).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// DeepSpeed-style hostfile (`NAME slots=N` per line). Default: /job/hostfile when present.
    #[arg(long, value_name = "PATH")]
    hostfile: Option<PathBuf>,
    /// Where the embedded state store lives.
    #[arg(long, default_value = "ringmaster-data", value_name = "DIR")]
    data_dir: PathBuf,
    /// State store: `embedded` (default, redb in --data-dir), `memory` (nothing persists), or
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (keys under PREFIX, default `ringmaster`).
    #[arg(long, default_value = "embedded", value_name = "URL")]
    store: String,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// With --store etcd://: the address this coordinator publishes when it leads, which
    /// standbys point clients to. Default: the --listen address, or this host's name and
    /// port when listening on every interface.
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,
    /// With --store etcd://: the leadership lease's TTL. A dead leader is replaced within
    /// about this; a leader that cannot renew its lease for this long stops.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    leader_ttl: Duration,
    /// File holding the token agents must present to join. Once any credential is configured,
    /// every call needs one; without --operator-token-file this token is also the admin
    /// credential for ringctl.
    #[arg(long, value_name = "FILE")]
    join_token_file: Option<PathBuf>,
    /// Operator tokens, one `ROLE NAME TOKEN` per line (roles: admin, viewer). Needs
    /// --join-token-file (agents need their own credential).
    #[arg(long, value_name = "FILE")]
    operator_token_file: Option<PathBuf>,
    /// PEM certificate (chain) the coordinator presents; enables TLS on every endpoint.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: agents must present a certificate that chains to this CA (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve a non-loopback address with no credential at all (anyone who reaches the port can
    /// run commands on every node).
    #[arg(long)]
    insecure: bool,
    /// A node that sends no heartbeat for this long is lost.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (plain HTTP, no credential: bind
    /// an address only the monitoring system reaches). Off by default.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(flatten)]
    state: StateArgs,
}

/// How to reach etcd when --store is `etcd://...`.
#[derive(clap::Args, Debug)]
struct EtcdArgs {
    /// PEM CA that signed the etcd members' certificates; enables TLS to etcd.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd's --client-cert-auth.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user (etcd's authentication); the password comes from --etcd-password-file.
    #[arg(long, value_name = "NAME", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password (first line).
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    fn given(&self) -> Option<&'static str> {
        [
            (self.etcd_ca.is_some(), "--etcd-ca"),
            (self.etcd_cert.is_some(), "--etcd-cert"),
            (self.etcd_user.is_some(), "--etcd-user"),
        ]
        .into_iter()
        .find_map(|(set, flag)| set.then_some(flag))
    }

    fn options(self) -> ringmaster_store::EtcdOptions {
        ringmaster_store::EtcdOptions {
            ca: self.etcd_ca,
            cert: self.etcd_cert,
            key: self.etcd_key,
            user: self.etcd_user,
            password_file: self.etcd_password_file,
            ..Default::default()
        }
    }
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
        // A parse error names the line; the file is named here (it may be the implicit
        // /job/hostfile).
        Err(e @ ringmaster_hostfile::HostfileError::Io { .. }) => return usage(e.to_string()),
        Err(e) => {
            let p = hostfile_path
                .as_deref()
                .unwrap_or(std::path::Path::new("?"));
            return usage(format!("{}: {e}", p.display()));
        }
    };
    let join_token = match &args.join_token_file {
        None => None,
        Some(p) => match ringmaster_auth::credentials::read_token_file(p) {
            Ok(t) => Some(t),
            Err(e) => return usage(format!("--join-token-file {e}")),
        },
    };
    let operator_tokens = match &args.operator_token_file {
        None => None,
        Some(_) if join_token.is_none() => {
            return usage(
                "--operator-token-file needs --join-token-file: agents need a credential too"
                    .into(),
            );
        }
        Some(p) => match ringmaster_auth::credentials::read_operator_tokens(p) {
            Ok(t) => {
                let join = join_token.as_deref().unwrap_or_default();
                if let Err(e) = ringmaster_auth::credentials::check_join_token_distinct(join, &t) {
                    return usage(format!("--operator-token-file {}: {e}", p.display()));
                }
                Some(t)
            }
            Err(e) => return usage(format!("--operator-token-file {e}")),
        },
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ringmaster_auth::ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        }),
        _ => None,
    };
    if let Some(t) = &tls
        && let Err(e) = t.load()
    {
        return usage(e);
    }
    let has_credentials = join_token.is_some();
    let listen = args.listen.clone().unwrap_or_else(|| {
        if has_credentials || args.insecure {
            "0.0.0.0:29500".into()
        } else {
            "127.0.0.1:29500".into()
        }
    });
    let creds = ringmaster_auth::Credentials::new(join_token.clone(), None);
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) => {
            if let Some(why) =
                ringmaster_coordinator::server::insecure_listen_refusal(&a, &creds, args.insecure)
            {
                return usage(why);
            }
        }
        // HOST:PORT with a host name (tokio resolves it when binding).
        Err(_) => {
            let Some((host, port)) = listen
                .rsplit_once(':')
                .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            else {
                return usage(format!(
                    "--listen {listen}: expected IP:PORT or HOST:PORT with a port of 0-65535 \
                     (e.g. 127.0.0.1:29500)"
                ));
            };
            if !has_credentials && !args.insecure && host != "localhost" {
                return usage(format!(
                    "--listen {listen}: without credentials the coordinator listens only on a \
                     loopback address (127.0.0.1:{port}, [::1]:{port} or localhost:{port}), and \
                     '{host}' is not one; give --join-token-file or --insecure"
                ));
            }
        }
    }
    if let Ok(meta) = std::fs::metadata(&args.data_dir)
        && !meta.is_dir()
    {
        return usage(format!(
            "--data-dir {}: not a directory",
            args.data_dir.display()
        ));
    }
    let store_kind = args.store.trim();
    if !ringmaster_store::is_remote(store_kind)
        && !matches!(store_kind, "" | "embedded" | "redb" | "memory")
    {
        return usage(format!(
            "--store {}: unknown store; expected embedded, redb, memory or etcd://HOST:PORT",
            args.store
        ));
    }
    if args.heartbeat_timeout > Duration::from_secs(3600) {
        return usage(format!(
            "--heartbeat-timeout {} is above the 1h maximum",
            humantime::format_duration(args.heartbeat_timeout)
        ));
    }
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
    if ringmaster_store::is_remote(&args.store) {
        if let Err(e) = ringmaster_store::EtcdUrl::parse(&args.store) {
            return usage(format!("--store: {e}"));
        }
        if args.leader_ttl < Duration::from_secs(2) {
            return usage(format!(
                "--leader-ttl {} is below the 2s minimum",
                humantime::format_duration(args.leader_ttl)
            ));
        }
    } else if let Some(flag) = args
        .etcd
        .given()
        .or(args.advertise.as_ref().map(|_| "--advertise"))
    {
        return usage(format!(
            "{flag} applies to an etcd store only (--store etcd://...; this is --store {})",
            args.store
        ));
    }
    let config = ringmaster_coordinator::server::Config {
        hostfile,
        data_dir: args.data_dir,
        store_url: args.store,
        etcd: args.etcd.options(),
        advertise: args.advertise,
        leader_ttl: args.leader_ttl,
        join_token,
        operator_tokens,
        tls,
        insecure: args.insecure,
        heartbeat_timeout: args.heartbeat_timeout,
        metrics_listen: args.metrics_listen,
        state,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => l,
            Err(e) => return usage(format!("--listen {listen}: {e}")),
        };
        let shutdown = async {
            ringmaster_common::shutdown_signal().await;
            tokio::spawn(async {
                ringmaster_common::shutdown_signal().await;
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
