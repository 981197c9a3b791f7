//! `ringctl`: the operator's CLI.
//!
//! Exit codes (DESIGN.md): 0 success, 1 the job or request failed, 2 bad usage or bad input.
//!
//! Layout:
//! - this file — flags, the client connection, and one function per subcommand.
//! - `render` — human-readable tables and status blocks.
//! - `estimate` — `ringctl estimate` (memory per plan; no coordinator).

pub mod certs;
pub mod estimate;
mod render;
pub mod view;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use ringmaster_auth::{AuthChannel, Bearer, ClientTls};
use ringmaster_common::logging::LogFormat;
use ringmaster_proto as pb;

use crate::spec;
use crate::status;

/// What `ringctl` exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failed = 1,
    Usage = 2,
}

/// An error with the exit code it maps to.
#[derive(Debug, Clone)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
}

impl CliError {
    pub fn usage(m: impl Into<String>) -> CliError {
        CliError {
            exit: Exit::Usage,
            message: m.into(),
        }
    }
    pub fn failed(m: impl Into<String>) -> CliError {
        CliError {
            exit: Exit::Failed,
            message: m.into(),
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> CliError {
        use tonic::Code;
        let exit = match s.code() {
            Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::OutOfRange => {
                Exit::Usage
            }
            Code::Unauthenticated => {
                return CliError::usage(format!("not authenticated: {}", s.message()));
            }
            Code::PermissionDenied => {
                return CliError::usage(format!("permission denied: {}", s.message()));
            }
            _ => Exit::Failed,
        };
        CliError {
            exit,
            message: s.message().to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Ringmaster operator CLI.
#[derive(Parser, Debug)]
#[command(name = "ringctl", version)]
pub struct Args {
    /// Coordinator address, or several (`a:29500,b:29500`: coordinators sharing one etcd;
    /// ringctl finds the leader). Default: $RINGMASTER_COORDINATOR, then 127.0.0.1:29500.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub coordinator: Option<String>,
    /// File holding the operator credential (a token of the coordinator's operator token file,
    /// or its join token where it has none).
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "RINGMASTER_TOKEN_FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// CA (PEM) the coordinator's certificate must chain to; enables TLS.
    #[arg(long, global = true, value_name = "FILE", env = "RINGMASTER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Name to verify in the coordinator's certificate (default: the host of --coordinator).
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        env = "RINGMASTER_TLS_DOMAIN"
    )]
    pub tls_domain: Option<String>,
    /// Log format of ringctl's own diagnostics.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Submit a job spec or a bare training config, with LLaMA-Factory's command-line
    /// overrides after it (`recipe.yaml output_dir=out`, `--bf16`) or a config given as flags
    /// alone (`--stage sft --model_name_or_path DIR ...`).
    Submit {
        /// Watch the job until it ends (exit code: 0 if it succeeded).
        #[arg(long)]
        watch: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// FILE, then `key=value` / `--key [value]` overrides of its training config.
        #[arg(
            value_name = "FILE [OVERRIDES]",
            required = true,
            num_args = 1..,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        args: Vec<String>,
    },
    /// List jobs.
    Jobs {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one job.
    Status {
        job: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show a job with its failure history and every event it kept (`kubectl describe`).
    Describe { job: String },
    /// Print a job's events (what happened, when, why), oldest first.
    Events {
        job: String,
        /// Then every new event until the job ends.
        #[arg(long, short = 'f')]
        follow: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Follow a job until it ends (exit code: 0 if it succeeded, 1 otherwise).
    Watch {
        job: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Every job that has not ended, refreshed every `--every`: a table redrawn in place on a
    /// terminal, the table again when it changes otherwise, a JSON array per update with
    /// `--output json`. Runs until Ctrl-C (or `--count` updates).
    Top {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        /// Time between two updates.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        every: Duration,
        /// Stop after this many updates (0: never).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Print a rank's log, fetched from its node's agent.
    Logs {
        job: String,
        #[arg(long, default_value_t = 0)]
        rank: u32,
        /// Generation (default: the current one).
        #[arg(long)]
        generation: Option<u64>,
        /// Keep streaming while the rank runs.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only the last BYTES bytes.
        #[arg(long, value_name = "BYTES")]
        tail: Option<u64>,
    },
    /// Cancel a job: every process of it is stopped (SIGTERM, grace, SIGKILL).
    Cancel {
        job: String,
        /// How long processes get between SIGTERM and SIGKILL [default: 5s; 10m with
        /// --checkpoint].
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<Duration>,
        /// Let the trainers checkpoint first (they do so on SIGTERM), wait until the job has
        /// ended and report the checkpoint; exit 1 if none was committed.
        #[arg(long)]
        checkpoint: bool,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Ask every rank of a running `train:` job to checkpoint after the same next step, and wait
    /// until the checkpoint is committed.
    Checkpoint {
        job: String,
        /// Return once the request is delivered instead of waiting for the commit.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting (exit 1) after this long.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List nodes.
    Nodes {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Take a node out of placement: no new generation is placed on it; what runs there goes
    /// on (Slurm's drain, `kubectl cordon`). Kept across coordinator restarts.
    Cordon {
        node: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Put a cordoned node back into placement.
    Uncordon {
        node: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Cordon a node and move every job running on it now (`kubectl drain`): each stops
    /// (SIGTERM, then SIGKILL after --grace; trainers checkpoint on SIGTERM) and is placed again
    /// on other nodes, resuming from its newest checkpoint. A move uses no restart.
    Drain {
        node: String,
        /// Between SIGTERM and SIGKILL for the moved jobs' processes.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        grace: Duration,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Run FILE on a whole cluster started on this machine, then tear it down. Overrides of
    /// the training config follow FILE as for `submit`.
    Local {
        /// FILE, then `key=value` / `--key [value]` overrides of its training config.
        #[arg(
            value_name = "FILE [OVERRIDES]",
            required = true,
            num_args = 1..,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        args: Vec<String>,
        /// Agents to start (node-0, node-1, ...).
        #[arg(long, default_value_t = 1)]
        nodes: u32,
        /// Slots per agent.
        #[arg(long, default_value_t = 1)]
        slots: u32,
        /// Keep state and logs here instead of a temporary directory.
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Start this node's workers without a daemon, from a torchrun, DeepSpeed launcher,
    /// `accelerate launch` or LLaMA-Factory command line (one `ringctl launch` per node):
    /// `ringctl launch --nnodes 2 --node-rank 0 --master-addr H --nproc-per-node 8 recipe.yaml`,
    /// `NNODES=2 NODE_RANK=1 MASTER_ADDR=H MASTER_PORT=29500 ringctl launch recipe.yaml`,
    /// `ringctl launch deepspeed --include localhost:1 train.py`, `ringctl launch accelerate
    /// launch --config_file cfg.yaml train.py`, `ringctl launch ... -- CMD ...` (CMD run as a
    /// command; after a named launcher, `torchrun ... -- train.py`, `--` only ends its options).
    Launch {
        /// The launcher's flags (any of the four dialects), then the program. A leading `--`,
        /// which clap would take as its own, is given back from the raw command line.
        #[arg(
            value_name = "[LAUNCHER FLAGS] (RECIPE [OVERRIDES] | SCRIPT [ARGS] | -- CMD ...)",
            num_args = 0..,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        args: Vec<String>,
    },
    /// Memory per GPU and per node of every plan (DeepSpeed's estimators); no coordinator needed.
    Estimate(estimate::EstimateArgs),
    /// Certificates for a small cluster: `ringctl certs init DIR --host coordinator.example`.
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// A Hugging Face directory from a sharded checkpoint (any world size and plan), written one
    /// tensor at a time; runs `trainer export` (next to ringctl, else on PATH).
    Export {
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// A LoRA checkpoint: merge the adapters into the base model.
        #[arg(long)]
        merge_lora: bool,
        /// float32 (default), bfloat16 or float16.
        #[arg(long)]
        dtype: Option<String>,
        /// Write over a model already in --out (never over the checkpoint itself).
        #[arg(long)]
        overwrite: bool,
    },
}

/// Resolves the coordinator address from the flag, the environment, or the default.
pub fn coordinator_addr(flag: Option<&str>) -> String {
    flag.map(str::to_owned)
        .or_else(|| {
            std::env::var("RINGMASTER_COORDINATOR")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "127.0.0.1:29500".to_owned())
}

/// A job-service client with the operator's credential on every call.
pub type Client = pb::job_service_client::JobServiceClient<AuthChannel>;

/// How ringctl reaches the coordinator: address, TLS, credential.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub addr: String,
    pub tls: ClientTls,
    /// The operator credential itself (read from --token-file).
    pub token: Option<String>,
}

impl Target {
    /// From the global flags (and their environment variables).
    ///
    /// # Errors
    /// An unreadable or malformed token file (exit 2).
    pub fn from_args(args: &Args) -> Result<Target, CliError> {
        let token = args
            .token_file
            .as_deref()
            .map(ringmaster_auth::credentials::read_token_file)
            .transpose()
            .map_err(|e| CliError::usage(format!("--token-file {e}")))?;
        let addr = coordinator_addr(args.coordinator.as_deref());
        for one in addr.split(',') {
            let ok = one
                .trim()
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(CliError::usage(format!(
                    "--coordinator {addr}: '{one}' is not HOST:PORT with a port of 1-65535 \
                     (several coordinators: a:29500,b:29500)"
                )));
            }
        }
        Ok(Target {
            addr,
            tls: ClientTls {
                ca: args.tls_ca.clone(),
                domain: args.tls_domain.clone(),
                identity: None,
            },
            token,
        })
    }
}

fn is_final(state: &str) -> bool {
    matches!(state, "SUCCEEDED" | "FAILED" | "CANCELLED")
}

/// How long a watch looks for a coordinator again after it lost one (a failover takes the
/// leader's lease TTL, 5 s by default, and a restart a few seconds).
const REWATCH_FOR: Duration = Duration::from_secs(60);

/// Watches `job` again on whichever coordinator answers (the leader, given several), retrying
/// every second for [`REWATCH_FOR`].
/// `ringctl events`: the job's events, and with `follow` every new one until the job ends,
/// reconnecting (after the last event printed) when the coordinator goes away, as `watch`
/// does.
async fn print_events(
    target: &Target,
    job: &str,
    follow: bool,
    output: Output,
) -> Result<Exit, CliError> {
    let mut after = 0;
    // Reconnects go on for as long as a failover takes, from the last event printed.
    let mut deadline = tokio::time::Instant::now() + REWATCH_FOR;
    loop {
        let stream = match connect(target).await {
            Ok(mut client) => client
                .events(pb::EventsRequest {
                    job_id: job.to_owned(),
                    after_seq: after,
                    follow,
                })
                .await
                .map(tonic::Response::into_inner),
            Err(e) if !follow || e.exit == Exit::Usage => return Err(e),
            // No coordinator reachable (yet): try again below.
            Err(e) => Err(tonic::Status::unavailable(e.message)),
        };
        let lost = match stream {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(e)) => {
                        deadline = tokio::time::Instant::now() + REWATCH_FOR;
                        after = e.seq;
                        match output {
                            Output::Json => print_json(&status::event_json(&e)),
                            Output::Text => println!("{}", render::event_line(&e)),
                        }
                    }
                    Ok(None) => return Ok(Exit::Ok),
                    Err(s) if follow && s.code() == tonic::Code::Unavailable => {
                        break s.message().to_owned();
                    }
                    Err(s) => return Err(s.into()),
                }
            },
            // A standby, or a coordinator going away: follow on from the next leader.
            Err(s) if follow && s.code() == tonic::Code::Unavailable => s.message().to_owned(),
            Err(s) => return Err(s.into()),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::failed(format!(
                "events: lost the coordinator and found none within {}s: {lost}",
                REWATCH_FOR.as_secs()
            )));
        }
        if output == Output::Text {
            eprintln!("events: lost the coordinator ({lost}); reconnecting");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn rewatch(target: &Target, job: &str) -> Result<tonic::Streaming<pb::JobStatus>, CliError> {
    let deadline = tokio::time::Instant::now() + REWATCH_FOR;
    loop {
        let attempt = async {
            let mut client = connect(target).await?;
            let s = client
                .watch(pb::WatchRequest {
                    job_id: job.to_owned(),
                })
                .await?;
            Ok::<_, CliError>(s.into_inner())
        };
        match attempt.await {
            Ok(s) => return Ok(s),
            Err(e) if e.exit == Exit::Usage => return Err(e),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(CliError::failed(format!(
                    "lost the coordinator and found none within {}s: {}",
                    REWATCH_FOR.as_secs(),
                    e.message
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Connects to the job service.
///
/// # Errors
/// A bad address or TLS file (exit 2) or an unreachable coordinator (exit 1).
pub async fn connect(target: &Target) -> Result<Client, CliError> {
    let bearer =
        Bearer::new(target.token.as_deref()).map_err(|e| CliError::usage(e.to_string()))?;
    let channel = ringmaster_auth::client::connect_leader(
        &target.addr,
        &target.tls,
        Duration::from_secs(5),
        "ringmaster.v1.JobService",
    )
    .await
    .map_err(|e| {
        if e.is_config() {
            CliError::usage(e.to_string())
        } else {
            CliError::failed(e.to_string())
        }
    })?;
    Ok(
        pb::job_service_client::JobServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(64 << 20),
    )
}

fn print_json(v: &serde_json::Value) {
    let _ = emit_json(v);
}

/// Prints `v` as one line; false if stdout is gone (a closed pipe: `top ... | head -1`).
fn emit_json(v: &serde_json::Value) -> bool {
    use std::io::Write;
    let text = serde_json::to_string(v).expect("JSON value serializes");
    writeln!(std::io::stdout().lock(), "{text}").is_ok()
}

/// Runs one `ringctl` command.
///
/// # Errors
/// Any failure, with the exit code it maps to.
pub async fn run(args: Args) -> Result<Exit, CliError> {
    // Read only by the commands that dial the coordinator.
    let target = Target::from_args(&args);
    let target = || target.clone();
    let log_format = args.log_format;
    match args.command {
        Command::Estimate(a) => estimate::run(&a),
        Command::Launch { args } => launch(args).await,
        Command::Certs(c) => certs::run(&c),
        Command::Export {
            checkpoint,
            out,
            merge_lora,
            dtype,
            overwrite,
        } => {
            let trainer = sibling("trainer");
            let mut cmd = std::process::Command::new(&trainer);
            cmd.arg("export").arg(&checkpoint).arg("--out").arg(&out);
            if merge_lora {
                cmd.arg("--merge-lora");
            }
            if let Some(d) = dtype {
                cmd.arg("--dtype").arg(d);
            }
            if overwrite {
                cmd.arg("--overwrite");
            }
            let status = cmd
                .status()
                .map_err(|e| CliError::failed(format!("running {}: {e}", trainer.display())))?;
            match status.code() {
                Some(0) => Ok(Exit::Ok),
                Some(2) => Err(CliError::usage("export refused its input (see above)")),
                _ => Err(CliError::failed(format!(
                    "{} export: {status}",
                    trainer.display()
                ))),
            }
        }
        Command::Local {
            mut args,
            mut nodes,
            mut slots,
            mut work_dir,
            mut output,
        } => {
            // ringctl's own flags may follow FILE too (`local job.yaml --nodes 2`).
            if let Some(v) = take_flag(&mut args, "--nodes")? {
                nodes = parse_flag("--nodes", &v)?;
            }
            if let Some(v) = take_flag(&mut args, "--slots")? {
                slots = parse_flag("--slots", &v)?;
            }
            if let Some(v) = take_flag(&mut args, "--work-dir")? {
                work_dir = Some(PathBuf::from(v));
            }
            if let Some(v) = take_flag(&mut args, "--output")? {
                output = parse_output(&v)?;
            }
            // `ringctl local`'s cluster flags, given to submit: the job spec says where to run.
            if let Some(flag) = args.iter().find_map(|a| {
                ["--nodes", "--slots"]
                    .into_iter()
                    .find(|f| a == f || a.starts_with(&format!("{f}=")))
            }) {
                return Err(CliError::usage(format!(
                    "ringctl submit has no {flag}: a job spec's `nodes:` (and `gpus_per_node:`, \
                     `include:`) says where it runs; {flag} belongs to `ringctl local`"
                )));
            }
            let sub = submission(&args)?;
            crate::local::run(sub, nodes, slots, work_dir, output, log_format).await
        }
        Command::Submit {
            mut args,
            mut watch,
            mut output,
        } => {
            if let Some(i) = args.iter().skip(1).position(|a| a == "--watch") {
                args.remove(i + 1);
                watch = true;
            }
            if let Some(v) = take_flag(&mut args, "--output")? {
                output = parse_output(&v)?;
            }
            let sub = submission(&args)?;
            let mut client = connect(&target()?).await?;
            let job = submit(&mut client, &sub).await?;
            if output == Output::Json && !watch {
                print_json(&status::to_json(&job));
            } else if output == Output::Text {
                println!("submitted {} ({})", job.id, job.state);
            }
            if watch {
                return watch_job(&mut client, &job.id, output, Some(&target()?), None, true).await;
            }
            Ok(Exit::Ok)
        }
        Command::Jobs { output } => {
            let mut client = connect(&target()?).await?;
            let jobs = client.list(pb::ListJobsRequest {}).await?.into_inner().jobs;
            match output {
                Output::Json => print_json(&serde_json::Value::Array(
                    jobs.iter().map(status::to_json).collect(),
                )),
                Output::Text => print!("{}", render::jobs_table(&jobs)),
            }
            Ok(Exit::Ok)
        }
        Command::Status { job, output } => {
            let mut client = connect(&target()?).await?;
            let st = client
                .get(pb::GetJobRequest { job_id: job })
                .await?
                .into_inner();
            match output {
                Output::Json => print_json(&status::to_json(&st)),
                Output::Text => print!("{}", render::status_block(&st)),
            }
            Ok(Exit::Ok)
        }
        Command::Describe { job } => {
            let mut client = connect(&target()?).await?;
            let st = client
                .get(pb::GetJobRequest {
                    job_id: job.clone(),
                })
                .await?
                .into_inner();
            let mut stream = client
                .events(pb::EventsRequest {
                    job_id: job,
                    after_seq: 0,
                    follow: false,
                })
                .await?
                .into_inner();
            let mut events = Vec::new();
            while let Some(e) = stream.message().await? {
                events.push(e);
            }
            print!("{}", render::describe(&st, &events));
            Ok(Exit::Ok)
        }
        Command::Events {
            job,
            follow,
            output,
        } => print_events(&target()?, &job, follow, output).await,
        Command::Watch { job, output } => {
            let target = target()?;
            let mut client = connect(&target).await?;
            watch_job(&mut client, &job, output, Some(&target), None, true).await
        }
        Command::Top {
            output,
            every,
            count,
        } => top(&target()?, output, every, count).await,
        Command::Logs {
            job,
            rank,
            generation,
            follow,
            tail,
        } => {
            let mut client = connect(&target()?).await?;
            let mut stream = client
                .logs(pb::LogsRequest {
                    job_id: job,
                    rank,
                    generation,
                    follow,
                    tail_bytes: tail.unwrap_or(0),
                })
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            // Every chunk says where its bytes belong; the whole log starts at byte 0, a
            // tail wherever its first chunk says.
            let mut next: Option<u64> = (tail.unwrap_or(0) == 0).then_some(0);
            let truncated = |at: Option<u64>, why: &str| {
                CliError::failed(format!("log truncated at byte {}: {why}", at.unwrap_or(0)))
            };
            loop {
                let chunk = match stream.next().await {
                    Some(Ok(c)) => c,
                    // Refused before any byte (unknown job, a log that is a link...).
                    Some(Err(s)) if next.is_none_or(|n| n == 0) => return Err(s.into()),
                    Some(Err(s)) => return Err(truncated(next, s.message())),
                    None => {
                        return Err(truncated(
                            next,
                            "the stream ended before the end of the log",
                        ));
                    }
                };
                if let Some(want) = next
                    && chunk.offset != want
                {
                    return Err(truncated(
                        next,
                        &format!("the next chunk starts at byte {}", chunk.offset),
                    ));
                }
                if !chunk.error.is_empty() {
                    return Err(truncated(Some(chunk.offset), &chunk.error));
                }
                out.write_all(&chunk.data)
                    .and_then(|_| out.flush())
                    .map_err(|e| CliError::failed(format!("writing to stdout: {e}")))?;
                next = Some(chunk.offset + chunk.data.len() as u64);
                if chunk.eof {
                    return Ok(Exit::Ok);
                }
            }
        }
        Command::Cancel {
            job,
            grace,
            checkpoint,
            output,
        } => {
            let mut client = connect(&target()?).await?;
            let before = if checkpoint {
                let st = client
                    .get(pb::GetJobRequest {
                        job_id: job.clone(),
                    })
                    .await?
                    .into_inner();
                Some(st.last_checkpoint)
            } else {
                None
            };
            let grace = grace.unwrap_or(if checkpoint {
                Duration::from_secs(600)
            } else {
                Duration::from_secs(5)
            });
            let st = client
                .cancel(pb::CancelRequest {
                    job_id: job.clone(),
                    grace_ms: grace.as_millis().max(1) as u64,
                })
                .await?
                .into_inner();
            let Some(before) = before else {
                match output {
                    Output::Json => print_json(&status::to_json(&st)),
                    Output::Text => println!("{} {}", st.id, st.state),
                }
                return Ok(Exit::Ok);
            };
            // Wait until every process has exited: the trainers commit their checkpoint (and
            // report it) before they exit.
            let st = wait_for(&mut client, &job, grace + Duration::from_secs(30), |s| {
                terminal(&s.state)
                    && s.ranks
                        .iter()
                        .all(|r| !matches!(r.state.as_str(), "PENDING" | "STARTING" | "RUNNING"))
            })
            .await?;
            match output {
                Output::Json => print_json(&status::to_json(&st)),
                Output::Text => match &st.last_checkpoint {
                    Some(c) if st.last_checkpoint != before => {
                        println!(
                            "{} {}; checkpoint step {} at {}",
                            st.id, st.state, c.step, c.path
                        )
                    }
                    _ => println!("{} {}; no checkpoint committed", st.id, st.state),
                },
            }
            Ok(
                if st.last_checkpoint != before && st.last_checkpoint.is_some() {
                    Exit::Ok
                } else {
                    Exit::Failed
                },
            )
        }
        Command::Checkpoint {
            job,
            no_wait,
            timeout,
            output,
        } => {
            let mut client = connect(&target()?).await?;
            let st = client
                .checkpoint(pb::CheckpointRequest {
                    job_id: job.clone(),
                })
                .await?
                .into_inner();
            let before = st.last_checkpoint.clone();
            let st = if no_wait {
                st
            } else {
                wait_for(&mut client, &job, timeout, |s| {
                    s.last_checkpoint != before || terminal(&s.state)
                })
                .await?
            };
            let new = st.last_checkpoint != before && st.last_checkpoint.is_some();
            match output {
                Output::Json => print_json(&status::to_json(&st)),
                Output::Text => match (&st.last_checkpoint, no_wait) {
                    (_, true) => println!("{} checkpoint requested", st.id),
                    (Some(c), false) if new => {
                        println!(
                            "{} checkpoint step {} committed at {}",
                            st.id, c.step, c.path
                        )
                    }
                    _ => println!(
                        "{} {} before a checkpoint was committed",
                        st.id,
                        st.state.to_lowercase()
                    ),
                },
            }
            Ok(if no_wait || new {
                Exit::Ok
            } else {
                Exit::Failed
            })
        }
        Command::Nodes { output } => {
            let mut client = connect(&target()?).await?;
            let nodes = client.nodes(pb::NodesRequest {}).await?.into_inner().nodes;
            match output {
                Output::Json => print_json(&serde_json::Value::Array(
                    nodes.iter().map(status::node_json).collect(),
                )),
                Output::Text => print!("{}", render::nodes_table(&nodes)),
            }
            Ok(Exit::Ok)
        }
        Command::Cordon { node, output } => cordon(&target()?, node, true, output).await,
        Command::Uncordon { node, output } => cordon(&target()?, node, false, output).await,
        Command::Drain {
            node,
            grace,
            output,
        } => {
            let mut client = connect(&target()?).await?;
            let r = client
                .drain(pb::DrainRequest {
                    node: node.clone(),
                    grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX).max(1),
                })
                .await?
                .into_inner();
            match output {
                Output::Json => print_json(&serde_json::json!({
                    "node": r.node.as_ref().map(status::node_json),
                    "moved_jobs": r.moved_jobs,
                })),
                Output::Text if r.moved_jobs.is_empty() => {
                    println!("{node} cordoned; no job was running there")
                }
                Output::Text => println!(
                    "{node} cordoned; moving {} (stopping with {} grace, then placed on other \
                     nodes: `ringctl status JOB`)",
                    r.moved_jobs.join(", "),
                    humantime::format_duration(grace)
                ),
            }
            Ok(Exit::Ok)
        }
    }
}

/// `ringctl cordon` and `uncordon`.
async fn cordon(
    target: &Target,
    node: String,
    cordon: bool,
    output: Output,
) -> Result<Exit, CliError> {
    let mut client = connect(target).await?;
    let n = client
        .cordon(pb::CordonRequest { node, cordon })
        .await?
        .into_inner();
    match output {
        Output::Json => print_json(&status::node_json(&n)),
        Output::Text if cordon && n.running_workers > 0 => println!(
            "{} cordoned: no new placement ({} workers still run there; `ringctl drain {}` \
             moves their jobs)",
            n.name, n.running_workers, n.name
        ),
        Output::Text if cordon => println!("{} cordoned: no new placement", n.name),
        Output::Text => println!("{} uncordoned", n.name),
    }
    Ok(Exit::Ok)
}

/// `ringctl launch`: the plan from the command line and the environment (a bad one exits 2),
/// then this node's launcher; the exit code is the job's.
async fn launch(args: Vec<String>) -> Result<Exit, CliError> {
    let raw: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let args = restore_leading_dashdash(&raw, args);
    let probe = ringmaster_launch::probe::detect();
    let env = |k: &str| std::env::var(k).ok();
    let plan = ringmaster_launch::frontends::parse(&args, &env, &probe)
        .map_err(|e| CliError::usage(format!("launch: {e}")))?;
    let dialect = plan.dialect;
    // A training config the trainer would refuse is refused here, before any worker starts
    // on any node (as `submit` does).
    check_training_config(&plan.program)?;
    let rt = ringmaster_launch::runtime::Runtime {
        trainer: sibling("trainer"),
        // torchrun's variable for the same grace; 3 s by default here (torchrun: 30 s), so
        // that a failure anywhere clears every node quickly.
        stop_grace: std::env::var("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(
                std::time::Duration::from_secs(3),
                std::time::Duration::from_secs_f64,
            ),
        hostname: probe.hostname,
    };
    let outcome = tokio::task::spawn_blocking(move || ringmaster_launch::runtime::run(&plan, &rt))
        .await
        .map_err(|e| CliError::failed(format!("launch: {e}")))?
        .map_err(|e| CliError::failed(format!("launch: {e}")))?;
    let code = outcome.exit_code(dialect);
    match outcome.failure {
        None => Ok(Exit::Ok),
        Some(why) => {
            let message = format!(
                "launch: the job failed after {} restart(s): {why}",
                outcome.restarts
            );
            if code != Exit::Failed as i32 {
                // DeepSpeed's launcher exits with the failing rank's code; `Exit` has no
                // variant for it, so this command ends here, as `main` would, with that code.
                eprintln!("ringctl: {message}");
                std::process::exit(code);
            }
            Err(CliError::failed(message))
        }
    }
}

/// The training config a launch would give the trainer, read as the trainer reads it (the
/// recipe, then the command line's overrides); a usage error naming what is wrong.
fn check_training_config(program: &ringmaster_launch::plan::Program) -> Result<(), CliError> {
    use ringmaster_launch::plan::Program;
    let (file, words) = match program {
        Program::Recipe { file, overrides } => {
            let mut words = vec![file.clone()];
            words.extend(overrides.iter().cloned());
            (Some(file.as_str()), words)
        }
        Program::TrainerFlags(flags) => (None, flags.clone()),
        _ => return Ok(()),
    };
    let origin = file.unwrap_or("the command line");
    let bad = |e: String| CliError::usage(format!("launch: {origin}: {e}"));
    let command_line =
        ringmaster_config::CommandLine::parse(&words).map_err(|e| bad(e.to_string()))?;
    let mut value = match file {
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(|e| bad(e.to_string()))?;
            ringmaster_config::parse_document(&text).map_err(|e| bad(e.to_string()))?
        }
        None => serde_json::Value::Object(Default::default()),
    };
    if let serde_json::Value::Object(map) = &mut value {
        command_line.apply(map);
    }
    ringmaster_config::TrainConfig::from_value(&value).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// clap takes a `--` before the first launcher word as its own end of options and drops it, so
/// `ringctl launch -- CMD` would reach the launcher as `CMD` (a script). When the raw command
/// line ends with `launch [ringctl's options] -- ARGS` and clap gave `ARGS`, the `--` is put
/// back; any later `--` is already among `args` (clap keeps them once the words started).
fn restore_leading_dashdash(raw: &[String], args: Vec<String>) -> Vec<String> {
    let n = args.len();
    if raw.len() >= n + 2 {
        let at = raw.len() - n;
        if raw[at..] == args[..]
            && raw[at - 1] == "--"
            && raw[1..at - 1].iter().any(|w| w == "launch")
        {
            let mut out = Vec::with_capacity(n + 1);
            out.push("--".to_owned());
            out.extend(args);
            return out;
        }
    }
    args
}

/// A binary next to ringctl, else the bare name (found on PATH).
pub(crate) fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Removes ringctl's own `FLAG VALUE` or `FLAG=VALUE` from the arguments after FILE (the
/// training config has no key of that name) and returns the value.
fn take_flag(args: &mut Vec<String>, flag: &str) -> Result<Option<String>, CliError> {
    let Some(i) = args
        .iter()
        .skip(1)
        .position(|a| a == flag || a.starts_with(&format!("{flag}=")))
        .map(|i| i + 1)
    else {
        return Ok(None);
    };
    let arg = args.remove(i);
    match arg.split_once('=') {
        Some((_, v)) => Ok(Some(v.to_owned())),
        None if i < args.len() => Ok(Some(args.remove(i))),
        None => Err(CliError::usage(format!("{flag} needs a value"))),
    }
}

fn parse_flag(flag: &str, v: &str) -> Result<u32, CliError> {
    v.parse()
        .map_err(|_| CliError::usage(format!("{flag}: expected a number, got '{v}'")))
}

fn parse_output(v: &str) -> Result<Output, CliError> {
    Output::from_str(v, true)
        .map_err(|_| CliError::usage(format!("--output: expected text or json, got '{v}'")))
}

/// The job a `submit`/`local` command line describes: FILE and the overrides of its training
/// config, or a training config given as flags alone.
fn submission(args: &[String]) -> Result<spec::Submission, CliError> {
    let cl =
        ringmaster_config::CommandLine::parse(args).map_err(|e| CliError::usage(e.to_string()))?;
    spec::load_submission_with(cl.recipe.as_deref().map(Path::new), &cl)
        .map_err(|e| CliError::usage(e.to_string()))
}

/// Sends a submission.
///
/// # Errors
/// The coordinator refused the spec (exit 2) or could not be reached (exit 1).
pub async fn submit(
    client: &mut pb::job_service_client::JobServiceClient<AuthChannel>,
    sub: &spec::Submission,
) -> Result<pb::JobStatus, CliError> {
    let resp = client
        .submit(pb::SubmitRequest {
            spec_json: serde_json::to_string(&sub.spec).expect("job spec serializes"),
            files: sub.files.clone().into_iter().collect(),
        })
        .await?
        .into_inner();
    resp.job
        .ok_or_else(|| CliError::failed("coordinator answered without a job"))
}

fn terminal(state: &str) -> bool {
    matches!(state, "SUCCEEDED" | "FAILED" | "CANCELLED")
}

/// Follows a job's status until `done` holds; an error (exit 1) after `timeout` or when the
/// stream ends first.
async fn wait_for(
    client: &mut pb::job_service_client::JobServiceClient<AuthChannel>,
    job: &str,
    timeout: Duration,
    mut done: impl FnMut(&pb::JobStatus) -> bool,
) -> Result<pb::JobStatus, CliError> {
    let mut stream = client
        .watch(pb::WatchRequest {
            job_id: job.to_owned(),
        })
        .await?
        .into_inner();
    let wait = async {
        while let Some(st) = stream.next().await {
            let st = st?;
            if done(&st) {
                return Ok(st);
            }
        }
        // The stream ends with the job; what follows (processes still exiting) is polled.
        loop {
            let st = client
                .get(pb::GetJobRequest {
                    job_id: job.to_owned(),
                })
                .await?
                .into_inner();
            if done(&st) {
                return Ok::<_, CliError>(st);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        CliError::failed(format!(
            "job {job}: gave up after {}",
            humantime::format_duration(timeout)
        ))
    })?
}

/// `ringctl top`: the jobs that have not ended, every `every`, `count` times (0: until
/// Ctrl-C). A coordinator that goes away is looked for again, as `watch` does.
async fn top(
    target: &Target,
    output: Output,
    every: Duration,
    count: u64,
) -> Result<Exit, CliError> {
    if every < Duration::from_millis(100) {
        return Err(CliError::usage("--every must be at least 100ms"));
    }
    let mut mode = view::mode(output);
    let mut top = view::TopView::default();
    let mut live: Option<view::Live> = None;
    let mut printed: Option<Vec<[String; 10]>> = None;
    let mut client: Option<Client> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost_since: Option<tokio::time::Instant> = None;
    let mut done = 0u64;
    // One handler for the whole run: a Ctrl-C while a call is out counts too.
    let mut sigint = Some(
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| CliError::failed(format!("installing the Ctrl-C handler: {e}")))?,
    );
    let list = async |client: &mut Option<Client>| {
        if client.is_none() {
            *client = Some(connect(target).await?);
        }
        let c = client.as_mut().expect("connected above");
        Ok::<_, CliError>(c.list(pb::ListJobsRequest {}).await?.into_inner().jobs)
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = interrupted(&mut sigint) => break,
        }
        let reply = tokio::select! {
            r = list(&mut client) => r,
            _ = interrupted(&mut sigint) => break,
        };
        let jobs = match reply {
            Ok(jobs) => {
                lost_since = None;
                jobs
            }
            Err(e) if e.exit == Exit::Usage => return Err(e),
            Err(e) => {
                client = None;
                let since = *lost_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= REWATCH_FOR {
                    return Err(CliError::failed(format!(
                        "top: lost the coordinator and found none within {}s: {}",
                        REWATCH_FOR.as_secs(),
                        e.message
                    )));
                }
                continue;
            }
        };
        top.update(jobs);
        if mode == view::Mode::Live && live.is_none() {
            match view::Live::on_stdout(view::TopView::height()) {
                Ok(l) => live = Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "no live view on this terminal: printing tables");
                    mode = view::Mode::Plain;
                }
            }
        }
        // A closed stdout (`top | head`) ends the run.
        let written = match mode {
            view::Mode::Json => emit_json(&serde_json::Value::Array(
                top.jobs().iter().map(status::to_json).collect(),
            )),
            view::Mode::Plain => {
                let rows = top.rows();
                // The AGE column changes every second: a change is in the other columns.
                let key: Vec<[String; 10]> = rows
                    .iter()
                    .map(|r| {
                        let mut r = r.clone();
                        r[9].clear();
                        r
                    })
                    .collect();
                if printed.as_ref() == Some(&key) {
                    true
                } else {
                    use std::io::Write;
                    let mut all = vec![view::TopView::HEADER.map(String::from).to_vec()];
                    all.extend(rows.into_iter().map(|r| r.to_vec()));
                    printed = Some(key);
                    writeln!(
                        std::io::stdout().lock(),
                        "{}",
                        render::table_aligned(&all, |_| false)
                    )
                    .is_ok()
                }
            }
            view::Mode::Live => live
                .as_mut()
                .is_some_and(|l| l.draw(|f, area| top.draw(f, area)).is_ok()),
        };
        if !written {
            break;
        }
        done += 1;
        if count > 0 && done >= count {
            break;
        }
    }
    if let Some(l) = live {
        l.finish();
    }
    Ok(Exit::Ok)
}

/// How `watch_job` shows the job: the live view, lines, or JSON objects.
enum Display {
    Live {
        view: Box<view::JobView>,
        live: Option<Box<view::Live>>,
    },
    Plain(render::WatchPrinter),
    Json,
}

impl Display {
    /// `allow_live`: false where something else writes to the terminal meanwhile (`ringctl
    /// local --log-format json` lets its agents' records through).
    fn new(output: Output, allow_live: bool) -> Display {
        match view::mode(output) {
            view::Mode::Live if !allow_live => Display::Plain(render::WatchPrinter::default()),
            view::Mode::Live => Display::Live {
                view: Box::default(),
                live: None,
            },
            view::Mode::Plain => Display::Plain(render::WatchPrinter::default()),
            view::Mode::Json => Display::Json,
        }
    }

    fn is_live(&self) -> bool {
        matches!(self, Display::Live { .. })
    }

    fn update(&mut self, st: &pb::JobStatus) {
        match self {
            Display::Json => print_json(&status::to_json(st)),
            Display::Plain(p) => p.update(st),
            Display::Live { view, .. } => {
                view.update(st.clone(), std::time::Instant::now());
                self.redraw();
            }
        }
    }

    /// Redraws the live view (the terminal is set up at the first status, sized for the
    /// job's ranks). A terminal that cannot show it turns the display into plain lines.
    fn redraw(&mut self) {
        let Display::Live { view, live } = self else {
            return;
        };
        let Some(st) = view.status() else {
            return;
        };
        let want = view::JobView::height(st.ranks.len());
        let made = match live.take() {
            None => view::Live::on_stdout(want),
            // The ranks became known (or more of them): a taller view in the same place.
            Some(l) if want > l.height() => (*l).regrow(want),
            Some(l) => Ok(*l),
        };
        match made {
            Ok(l) => *live = Some(Box::new(l)),
            Err(e) => {
                tracing::warn!(error = %e, "no live view on this terminal: printing lines");
                let st = st.clone();
                *self = Display::Plain(render::WatchPrinter::default());
                self.update(&st);
                return;
            }
        }
        if let Some(l) = live
            && l.draw(|f, area| view.draw(f, area)).is_err()
        {
            *live = None;
            *self = Display::Plain(render::WatchPrinter::default());
        }
    }

    /// A line of a worker's output (`ringctl local`): above the live view, else on stderr.
    fn line(&mut self, line: &str) {
        self.lines(&[line.to_owned()]);
    }

    /// Lines of workers' output (`ringctl local`): above the live view, else on stderr.
    fn lines(&mut self, lines: &[String]) {
        if let Display::Live { live: Some(l), .. } = self
            && l.print_above(lines).is_ok()
        {
            // The terminal cleared the view to make room: draw it again at once.
            self.redraw();
            return;
        }
        for line in lines {
            eprintln!("{line}");
        }
    }

    /// Leaves the live view's last frame on the screen.
    fn finish(mut self) {
        self.redraw();
        if let Display::Live { live: Some(l), .. } = self {
            l.finish();
        }
    }
}

/// Resolves on the next SIGINT of `sigint`; never without one.
async fn interrupted(sigint: &mut Option<tokio::signal::unix::Signal>) {
    match sigint {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Routes ringctl's log records back to stderr when dropped (if it routed them).
struct RouteLogsBack(bool);

impl Drop for RouteLogsBack {
    fn drop(&mut self) {
        if self.0 {
            view::route_logs(None);
        }
    }
}

/// Lines queued for the live view at most; a producer waits (worker lines) or writes to
/// stderr (log records) beyond.
pub const LINES_QUEUED: usize = 1024;

/// Worker lines shown above the live view in one redraw at most.
const MAX_LINES_AT_ONCE: usize = 200;

/// After the job ended, worker lines are still shown above the view until none came for
/// this long...
const LINES_QUIET: Duration = Duration::from_millis(300);
/// ...or for this long at most.
const LINES_LINGER_MAX: Duration = Duration::from_secs(2);

/// The next line from `lines`, or never when there are none.
async fn next_line(lines: &mut Option<&mut tokio::sync::mpsc::Receiver<String>>) -> String {
    match lines {
        Some(rx) => match rx.recv().await {
            Some(l) => l,
            None => {
                *lines = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Follows a job until it ends; exit 0 if it succeeded, 1 otherwise. On a terminal it shows
/// the live view ([`view`]), else a line per change (`--output json`: a JSON object per
/// update). `lines` (from `ringctl local`) are worker output lines, shown above the view.
///
/// # Errors
/// Unknown job (exit 2) or a lost connection (exit 1).
pub async fn watch_job(
    client: &mut pb::job_service_client::JobServiceClient<AuthChannel>,
    job: &str,
    output: Output,
    reconnect: Option<&Target>,
    lines: Option<&mut tokio::sync::mpsc::Receiver<String>>,
    allow_live: bool,
) -> Result<Exit, CliError> {
    let mut stream = client
        .watch(pb::WatchRequest {
            job_id: job.to_owned(),
        })
        .await?
        .into_inner();
    let mut last: Option<pb::JobStatus> = None;
    let mut display = Display::new(output, allow_live);
    // On a terminal, ringctl's own log records go above the view, not through it.
    let (log_tx, mut own_lines) = tokio::sync::mpsc::channel(LINES_QUEUED);
    let routed = lines.is_none() && display.is_live();
    let mut lines = match lines {
        Some(l) => Some(l),
        None if routed => {
            view::route_logs(Some(log_tx));
            Some(&mut own_lines)
        }
        None => None,
    };
    let _unroute = RouteLogsBack(routed);
    let mut tick = tokio::time::interval(view::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // `ringctl watch` on a terminal ends on Ctrl-C with its view left in place (`ringctl
    // local` handles Ctrl-C itself: it cancels the job and watches on).
    let interrupt = display.is_live() && reconnect.is_some();
    // One handler for the whole watch: a Ctrl-C during a reconnect counts too.
    let mut sigint = if interrupt {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| CliError::failed(format!("installing the Ctrl-C handler: {e}")))?,
        )
    } else {
        None
    };
    // Reconnects in a row that brought no status (a coordinator that keeps failing the watch).
    let mut fruitless = 0;
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            line = next_line(&mut lines) => {
                // What else is waiting goes in the same redraw.
                let mut batch = vec![line];
                while let Some(rx) = lines.as_mut()
                    && batch.len() < MAX_LINES_AT_ONCE
                    && let Ok(l) = rx.try_recv()
                {
                    batch.push(l);
                }
                display.lines(&batch);
                continue;
            }
            _ = tick.tick(), if display.is_live() => {
                display.redraw();
                continue;
            }
            _ = interrupted(&mut sigint) => {
                display.finish();
                return Err(CliError::failed("interrupted"));
            }
        };
        let lost = match next {
            Some(Ok(st)) => {
                fruitless = 0;
                display.update(&st);
                last = Some(st);
                continue;
            }
            Some(Err(e)) => e,
            None if last.as_ref().is_some_and(|s| is_final(&s.state)) => break,
            None => tonic::Status::unavailable("the coordinator ended the watch"),
        };
        // The coordinator went away (a restart, a failover to another coordinator): find the
        // one that leads now and watch on from there, for as long as a failover takes.
        let Some(target) = reconnect else {
            display.finish();
            return Err(lost.into());
        };
        fruitless += 1;
        if fruitless > 5
            || !matches!(
                lost.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::Internal
            )
        {
            display.finish();
            return Err(lost.into());
        }
        if output == Output::Text {
            display.line(&format!(
                "watch: lost the coordinator ({}); reconnecting",
                lost.message()
            ));
        }
        let again = tokio::select! {
            r = rewatch(target, job) => r,
            _ = interrupted(&mut sigint) => Err(CliError::failed("interrupted")),
        };
        stream = match again {
            Ok(s) => s,
            Err(e) => {
                display.finish();
                return Err(e);
            }
        };
    }
    // Worker lines still on their way (a rank's last output can arrive after its exit was
    // reported) go above the final frame: until they stop for a moment.
    if lines.is_some() {
        let deadline = tokio::time::Instant::now() + LINES_LINGER_MAX;
        while let Ok(Ok(line)) = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + LINES_QUIET),
            async { Ok::<_, ()>(next_line(&mut lines).await) },
        )
        .await
        {
            display.line(&line);
        }
    }
    display.finish();
    let Some(last) = last else {
        return Err(CliError::failed("watch ended without a status"));
    };
    match last.state.as_str() {
        "SUCCEEDED" => Ok(Exit::Ok),
        "FAILED" | "CANCELLED" => {
            if output == Output::Text {
                print!("{}", render::status_block(&last));
            }
            Ok(Exit::Failed)
        }
        other => Err(CliError::failed(format!(
            "lost the coordinator while the job was {other}"
        ))),
    }
}
