//! `ringctl local FILE --nodes N --slots S`: the whole cluster on this machine.
//!
//! Starts a coordinator in this process (temporary data dir, free loopback port, a generated
//! hostfile naming node-0…node-N-1 and a random join token) and N `agent` processes (the binary
//! next to ringctl, else on PATH), submits FILE, watches it, and tears everything down: agents
//! stop their workers (SIGTERM, grace, SIGKILL) before the command returns. The exit code is the job's result. Ctrl-C cancels the
//! job first. Jobs may write under the directory ringctl runs in and the cluster's directory
//! (the agents' allowed roots), where a config's relative paths point.

use std::path::PathBuf;
use std::time::Duration;

use ringmaster_hostfile::{Host, Hostfile};
use tokio_util::sync::CancellationToken;

use ringmaster_common::logging::LogFormat;

use crate::cli::{self, CliError, Exit, Output};
use crate::server;
use crate::spec;

/// Upper bounds that keep a typo from forking thousands of processes.
const MAX_LOCAL_NODES: u32 = 64;
const MAX_LOCAL_SLOTS: u32 = 64;

/// Runs FILE on a local cluster.
///
/// # Errors
/// Bad arguments or spec (exit 2), or a cluster that cannot start (exit 1).
pub async fn run(
    sub: spec::Submission,
    nodes: u32,
    slots: u32,
    work_dir: Option<PathBuf>,
    output: Output,
    log_format: LogFormat,
) -> Result<Exit, CliError> {
    if nodes == 0 || nodes > MAX_LOCAL_NODES {
        return Err(CliError::usage(format!(
            "--nodes must be in 1..={MAX_LOCAL_NODES}, got {nodes}"
        )));
    }
    if slots == 0 || slots > MAX_LOCAL_SLOTS {
        return Err(CliError::usage(format!(
            "--slots must be in 1..={MAX_LOCAL_SLOTS}, got {slots}"
        )));
    }

    let (_tmp, root) = match work_dir {
        Some(d) => {
            std::fs::create_dir_all(&d)
                .map_err(|e| CliError::usage(format!("--work-dir {}: {e}", d.display())))?;
            (None, d)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("ringmaster-local-")
                .tempdir()
                .map_err(|e| CliError::failed(format!("creating a temporary directory: {e}")))?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    let names: Vec<String> = (0..nodes).map(|i| format!("node-{i}")).collect();
    let hostfile = Hostfile {
        hosts: names
            .iter()
            .map(|n| Host {
                name: n.clone(),
                slots,
            })
            .collect(),
    };
    let token = format!("{:032x}", rand::random::<u128>());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::failed(format!("binding a loopback port: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::failed(e.to_string()))?
        .to_string();

    let stop_coordinator = CancellationToken::new();
    // The local cluster makes its own credential: the join token, which (with no operator
    // token file) is also the admin credential this command submits with.
    let coord_cfg = server::Config {
        hostfile: Some(hostfile),
        join_token: Some(token.clone()),
        ..server::Config::new(root.join("coordinator"))
    };
    let stop = stop_coordinator.clone();
    let coordinator = tokio::spawn(async move {
        server::run(coord_cfg, listener, async move { stop.cancelled().await }).await
    });

    let trainer = crate::cli::sibling("trainer");
    let agent = crate::cli::sibling("agent");
    // Jobs may write under the directory ringctl runs in (where a config's relative paths
    // point, e.g. the quickstart's `output/quickstart`) and under the cluster's own directory.
    let mut allowed_roots = vec![root.clone()];
    match std::env::current_dir() {
        Ok(d) => allowed_roots.push(d),
        Err(e) => tracing::warn!(error = %e, "no current directory: it is not an allowed root"),
    }
    let token_file = root.join("join-token");
    if let Err(e) = write_private(&token_file, &token) {
        stop_coordinator.cancel();
        return Err(CliError::failed(format!(
            "writing {}: {e}",
            token_file.display()
        )));
    }
    let mut agents = Vec::new();
    let mut readers = Vec::new();
    // Worker lines go through the watch, which shows them above its live view (or on stderr).
    // Bounded: a terminal that does not keep up makes the readers, and so the agents' pipes,
    // wait, as writing to stderr directly would.
    let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<String>(cli::LINES_QUEUED);
    for name in &names {
        let mut cmd = tokio::process::Command::new(&agent);
        cmd.arg("--join")
            .arg(&addr)
            .args(["--name", name, "--slots", &slots.to_string()])
            .arg("--work-dir")
            .arg(root.join(name))
            .arg("--join-token-file")
            .arg(&token_file)
            .args(["--advertise-addr", "127.0.0.1"])
            .arg("--trainer")
            .arg(&trainer)
            .args(["--max-backoff", "1s", "--shutdown-grace", "5s"])
            // Text: the agents log JSON into a pipe and ringctl shows their workers' lines as
            // `[rank 2] …` (`show_agent_output`); JSON: their records pass through as they are.
            .args(["--log-format", "json"]);
        if log_format == LogFormat::Text {
            cmd.stderr(std::process::Stdio::piped());
        }
        for r in &allowed_roots {
            cmd.arg("--allowed-root").arg(r);
        }
        // The local coordinator speaks plaintext on loopback with its own token: another
        // cluster's CA, TLS name, token file or address must not reach the agents or, through
        // them, the workers.
        for var in [
            "RINGMASTER_TLS_CA",
            "RINGMASTER_TLS_DOMAIN",
            "RINGMASTER_TOKEN_FILE",
            "RINGMASTER_COORDINATOR",
        ] {
            cmd.env_remove(var);
        }
        cmd.stdin(std::process::Stdio::null())
            // Ctrl-C reaches ringctl alone, which cancels the job before it stops the agents.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        let parent = std::process::id();
        unsafe {
            cmd.pre_exec(move || {
                // ringctl killed outright takes its agents (and so their workers) with it; if
                // it died before the prctl, the agent must not start at all.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("ringctl exited"));
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(mut child) => {
                if let Some(err) = child.stderr.take() {
                    readers.push(tokio::spawn(show_agent_output(
                        name.clone(),
                        err,
                        line_tx.clone(),
                    )));
                }
                agents.push(child);
            }
            Err(e) => {
                stop_agents(agents).await;
                stop_coordinator.cancel();
                return Err(CliError::failed(format!(
                    "starting the agent ({}): {e}; ringctl local runs the `agent` binary next \
                     to ringctl (cargo build --release builds both) or on PATH",
                    agent.display()
                )));
            }
        }
    }
    if output == Output::Text {
        eprintln!(
            "local cluster: coordinator {addr}, {nodes} node(s) x {slots} slot(s), state in {}",
            root.display()
        );
    }

    let target = cli::Target {
        addr: addr.clone(),
        token: Some(token.clone()),
        ..Default::default()
    };
    // An agent that exits while the job runs (a wrong `agent` binary, a work dir locked by
    // another agent) would leave the job pending for ever: it ends the run, naming the agent.
    // The in-process coordinator's and ringctl's own log records go where the worker lines
    // go while the job is watched (above the live view).
    cli::view::route_logs(Some(line_tx.clone()));
    let result = tokio::select! {
        r = drive(&target, &sub, output, &mut line_rx, line_tx.clone(), log_format) => r,
        (name, status) = first_exit(&mut agents, &names) => Err(CliError::failed(format!(
            "the agent of {name} exited ({status}) while the job ran; its output is above"
        ))),
    };

    stop_agents(agents).await;
    // The agents are gone: their pipes end once the last lines are shown.
    drop(line_tx);
    // The readers end with the agents' pipes; what they and the log records queued meanwhile
    // is shown in order.
    let drain = async {
        for r in readers {
            let _ = r.await;
        }
    };
    let mut drain = std::pin::pin!(drain);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        tokio::select! {
            _ = &mut drain => break,
            Some(line) = line_rx.recv() => eprintln!("{line}"),
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    cli::view::route_logs(None);
    while let Ok(line) = line_rx.try_recv() {
        eprintln!("{line}");
    }
    stop_coordinator.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), coordinator).await;
    result
}

/// Shows what an agent logs (JSON lines on `err`) the way a user of `ringctl local` reads it:
/// a worker's line as `[rank 2] text`, the agent's warnings and errors as
/// `[node-1] WARN message key=value` (keys in name order), anything that is not a JSON record
/// as it is.
async fn show_agent_output(
    node: String,
    err: tokio::process::ChildStderr,
    lines: tokio::sync::mpsc::Sender<String>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(err);
    let mut buf = Vec::new();
    // Bytes, not `lines()`: a line that is not UTF-8 must not stop the reading (the agent
    // would block once the pipe is full).
    while matches!(reader.read_until(b'\n', &mut buf).await, Ok(n) if n > 0) {
        let line = String::from_utf8_lossy(&buf);
        if let Some(shown) = agent_line(&node, line.trim_end_matches(['\n', '\r']))
            && let Err(e) = lines.send(shown).await
        {
            // The watch is over: straight to stderr.
            eprintln!("{}", e.0);
        }
        buf.clear();
    }
}

/// What `ringctl local` shows of one line an agent logged (None: nothing).
fn agent_line(node: &str, line: &str) -> Option<String> {
    let Ok(serde_json::Value::Object(rec)) = serde_json::from_str::<serde_json::Value>(line) else {
        return Some(line.to_owned());
    };
    let text = |k: &str| rec.get(k).and_then(|v| v.as_str()).unwrap_or("");
    let message = text("message");
    let level = text("level");
    // A worker's line: "[<job> rank <n>] <text>" with the job's fields
    // (agent/src/supervisor/logs/capture.rs).
    let worker = level == "INFO" && rec.contains_key("generation");
    if let Some((head, rest)) = message.strip_prefix('[').and_then(|m| m.split_once("] "))
        && let Some((_, rank)) = head.rsplit_once(" rank ")
        && worker
        && rank.parse::<u32>().is_ok()
    {
        return Some(format!("[rank {rank}] {rest}"));
    }
    if !matches!(level, "WARN" | "ERROR") {
        return None;
    }
    let mut shown = format!("[{node}] {level} {message}");
    for (k, v) in &rec {
        if !matches!(k.as_str(), "message" | "level" | "timestamp" | "target") {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
            shown.push_str(&format!(" {k}={v}"));
        }
    }
    Some(shown)
}

/// Stops the agents: SIGTERM (each stops its workers within its shutdown grace), SIGKILL to
/// one that has not exited within 15 s.
async fn stop_agents(agents: Vec<tokio::process::Child>) {
    for a in &agents {
        if let Some(pid) = a.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for mut a in agents {
        match tokio::time::timeout(Duration::from_secs(15), a.wait()).await {
            Ok(Ok(st)) if !st.success() => tracing::warn!(status = %st, "an agent ended badly"),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("an agent did not stop within 15s: killing it");
                let _ = a.kill().await;
            }
        }
    }
}

/// Resolves when the first agent exits: its node's name and exit status.
async fn first_exit(agents: &mut [tokio::process::Child], names: &[String]) -> (String, String) {
    let waits = agents.iter_mut().map(|a| Box::pin(a.wait()));
    let (status, i, _) = futures::future::select_all(waits).await;
    let status = status.map_or_else(|e| format!("wait failed: {e}"), |st| st.to_string());
    (names[i].clone(), status)
}

/// Writes `text` to a new file only its owner may read (the join token): an old file of that
/// name goes first, and a link planted in its place is not followed.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// Submits and watches; Ctrl-C cancels the job and waits for it to end.
async fn drive(
    target: &cli::Target,
    sub: &spec::Submission,
    output: Output,
    lines: &mut tokio::sync::mpsc::Receiver<String>,
    say: tokio::sync::mpsc::Sender<String>,
    log_format: LogFormat,
) -> Result<Exit, CliError> {
    let mut client = cli::connect(target).await?;
    let job = cli::submit(&mut client, sub).await?;
    if output == Output::Text {
        eprintln!("submitted {}", job.id);
    }
    let mut watch_client = client.clone();
    let id = job.id.clone();
    // With `--log-format json` the agents' records reach the terminal directly: no live view
    // for them to run through.
    let live = log_format == LogFormat::Text;
    let watch = cli::watch_job(&mut watch_client, &id, output, None, Some(lines), live);
    tokio::pin!(watch);
    tokio::select! {
        r = &mut watch => r,
        _ = tokio::signal::ctrl_c() => {
            let _ = say.try_send(format!("interrupted: cancelling {id}"));
            let _ = client
                .cancel(ringmaster_proto::CancelRequest { job_id: id.clone(), grace_ms: 5_000 })
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(10), &mut watch).await;
            Ok(Exit::Failed)
        }
    }
}

#[cfg(test)]
mod agent_output_tests {
    use super::agent_line;

    #[test]
    fn worker_lines_read_as_rank_lines_and_the_agents_chatter_is_left_out() {
        let worker = r#"{"timestamp":"2026-12-07T04:00:00Z","level":"INFO","message":"[hello-1 rank 3] rank 3 of 4","job":"hello-1","generation":0}"#;
        assert_eq!(
            agent_line("n1", worker).as_deref(),
            Some("[rank 3] rank 3 of 4")
        );
        let info = r#"{"timestamp":"t","level":"INFO","message":"agent joined"}"#;
        assert_eq!(agent_line("n1", info), None);
        let warn = r#"{"timestamp":"t","level":"WARN","message":"reconnecting","error":"refused","attempt":3}"#;
        assert_eq!(
            agent_line("n1", warn).as_deref(),
            Some("[n1] WARN reconnecting attempt=3 error=refused")
        );
        assert_eq!(
            agent_line("n1", "agent: bad flag").as_deref(),
            Some("agent: bad flag")
        );
    }
}
