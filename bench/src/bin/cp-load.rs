//! Control-plane load: a real `coordinator` process, N simulated agents (gRPC streams in this
//! process, one HTTP/2 connection each) and one N-node job.
//!
//! Measures
//! 1. rendezvous: from the first Join sent to every agent holding its StartWorkers;
//! 2. heartbeats: for each offered rate, the rate the coordinator absorbed and the latency of
//!    a probe RPC (`JobService.Get`) that queues behind the heartbeats in the coordinator's
//!    loop — the loop handles both in one queue, so the probe's latency is what a heartbeat
//!    waits before it is handled.
//!
//! 3. submit latency: sequential `JobService.Submit` round trips (before the agents join; each
//!    submitted job waits for nodes and is cancelled).
//!
//! `--security none|token|tls` runs the same with no credential, with tokens on every call
//! (agents: join token; the probe and submits: the admin token), and with tokens over TLS
//! with mutual TLS for the agents (certificates from `ringctl certs init`).
//!
//! `--etcd` keeps the coordinator's state in a fresh etcd member (the `etcd` on PATH) instead
//! of redb: the same load, the other `StateStore` backend.
//!
//! `cargo run --release -p ringmaster-bench --bin cp-load -- --agents 1000 [--security tls] [--etcd]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use ringmaster_auth::{AuthChannel, Bearer, ClientTls};
use ringmaster_proto as pb;
use tokio::sync::{Barrier, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser)]
struct Args {
    /// Simulated agents (= nodes of the job).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Offered heartbeat rates to try (per second, all agents together).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,5000,10000,20000,50000"
    )]
    rates: Vec<u64>,
    /// Seconds per heartbeat rate.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Directory with the `coordinator` binary (default: next to this one).
    #[arg(long)]
    bin_dir: Option<std::path::PathBuf>,
    /// Credentials and TLS.
    #[arg(long, value_enum, default_value_t = Security::Token)]
    security: Security,
    /// Sequential submits timed.
    #[arg(long, default_value_t = 50)]
    submits: usize,
    /// The coordinator's state in a fresh etcd member (`etcd` on PATH) instead of redb.
    #[arg(long)]
    etcd: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Security {
    None,
    Token,
    Tls,
}

const TOKEN: &str = "cp-load-token-0123456789";

struct Coordinator(std::process::Child);
impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// A connection as the settings say, with the token (if any) on every call.
async fn channel(addr: &str, tls: &ClientTls, token: Option<&str>) -> anyhow::Result<AuthChannel> {
    let ch = ringmaster_auth::client::connect(addr, tls, Duration::from_secs(10)).await?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        ch,
        Bearer::new(token)?,
    ))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_owned(),
    };
    let dir = tempfile::tempdir()?;
    let hostfile = dir.path().join("hostfile");
    let text: String = (0..args.agents)
        .map(|i| format!("sim-{i} slots=1\n"))
        .collect();
    std::fs::write(&hostfile, text)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = std::process::Command::new(bin_dir.join("coordinator"));
    cmd.args(["--listen", &addr, "--heartbeat-timeout", "120s"])
        .arg("--hostfile")
        .arg(&hostfile)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null());
    // Kept until the end (dropped after the coordinator, declared below): dropping it stops
    // etcd.
    let _etcd = if args.etcd {
        let server = ringmaster_store::testing::EtcdServer::start().map_err(anyhow::Error::msg)?;
        cmd.args(["--store", &server.url("cp-load")]);
        Some(server)
    } else {
        None
    };
    let token = (args.security != Security::None).then_some(TOKEN);
    if token.is_some() {
        std::fs::write(dir.path().join("token"), TOKEN)?;
        cmd.arg("--join-token-file").arg(dir.path().join("token"));
    }
    let pki = ringmaster_auth::Pki::new(dir.path().join("pki"));
    let (tls, agent_tls) = if args.security == Security::Tls {
        let st = std::process::Command::new(bin_dir.join("ringctl"))
            .args(["certs", "init"])
            .arg(pki.dir())
            .stdout(std::process::Stdio::null())
            .status()?;
        if !st.success() {
            bail!("ringctl certs init failed");
        }
        cmd.args(pki.coordinator_args());
        (pki.client_tls(), pki.agent_tls("agent"))
    } else {
        (ClientTls::default(), ClientTls::default())
    };
    let _coord = Coordinator(cmd.spawn().context("starting the coordinator")?);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        if Instant::now() > deadline {
            bail!("coordinator did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut jobs =
        pb::job_service_client::JobServiceClient::new(channel(&addr, &tls, token).await?);
    // Submit latency: jobs that wait for nodes (none joined yet), cancelled right after.
    let mut sub = Vec::with_capacity(args.submits);
    for i in 0..args.submits {
        let spec =
            serde_json::json!({"name": format!("submit{i}"), "command": ["true"], "nodes": 1});
        let s = Instant::now();
        let j = jobs
            .submit(pb::SubmitRequest {
                spec_json: spec.to_string(),
                files: Default::default(),
            })
            .await?
            .into_inner()
            .job
            .context("job")?;
        sub.push(s.elapsed().as_secs_f64() * 1e3);
        jobs.cancel(pb::CancelRequest {
            job_id: j.id,
            grace_ms: 1,
        })
        .await?;
    }
    if !sub.is_empty() {
        println!(
            "submit: {} sequential, p50 {:.2} ms, p99 {:.2} ms",
            sub.len(),
            percentile(&mut sub, 0.5),
            percentile(&mut sub, 0.99)
        );
    }
    let spec = serde_json::json!({"name": "load", "command": ["true"]});
    let job = jobs
        .submit(pb::SubmitRequest {
            spec_json: spec.to_string(),
            files: Default::default(),
        })
        .await?
        .into_inner()
        .job
        .context("job")?;
    println!(
        "coordinator {addr}; job {} waiting for {} nodes",
        job.id, args.agents
    );

    // Connect every agent first (TCP + HTTP/2), so the measured window is the protocol.
    let mut channels = Vec::with_capacity(args.agents);
    for _ in 0..args.agents {
        channels.push(channel(&addr, &agent_tls, token).await?);
    }
    let ready = Arc::new(Barrier::new(args.agents + 1));
    let started = Arc::new(AtomicU64::new(0));
    let hb_sent = Arc::new(AtomicU64::new(0));
    let rate_per_agent = Arc::new(AtomicU64::new(0)); // heartbeats per agent per 1000 s
    let t0 = Instant::now();
    let (done_tx, mut done_rx) = mpsc::channel::<Duration>(args.agents);
    let last_ack = Arc::new(AtomicU64::new(0));
    let mut first_join: Option<Instant> = None;
    for (i, ch) in channels.into_iter().enumerate() {
        let ready = ready.clone();
        let done_tx = done_tx.clone();
        let hb_sent = hb_sent.clone();
        let rate = rate_per_agent.clone();
        let started = started.clone();
        let last_ack = last_ack.clone();
        first_join.get_or_insert_with(Instant::now);
        tokio::spawn(async move {
            let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
            let (tx, rx) = mpsc::channel(64);
            tx.send(pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Join(pb::Join {
                    name: format!("sim-{i}"),
                    slots: 1,
                    advertise_addr: "127.0.0.1".into(),
                    version: "1".into(),
                    incarnation: format!("sim-{i}"),
                    ..Default::default()
                })),
            })
            .await
            .ok();
            let mut inbound = match client.session(ReceiverStream::new(rx)).await {
                Ok(r) => r.into_inner(),
                Err(e) => {
                    eprintln!("sim-{i}: {e}");
                    return;
                }
            };
            let mut got_start = false;
            let mut seq = 0u64;
            let mut next_hb = tokio::time::Instant::now();
            loop {
                let per_agent_milli = rate.load(Ordering::Relaxed);
                let hb_sleep = if per_agent_milli == 0 {
                    Duration::from_secs(3600)
                } else {
                    Duration::from_secs_f64(1000.0 / per_agent_milli as f64)
                };
                tokio::select! {
                    m = inbound.message() => {
                        let Ok(Some(m)) = m else { return };
                        match m.msg {
                            Some(pb::coordinator_message::Msg::JoinAck(_)) => {
                                last_ack.fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                            }
                            Some(pb::coordinator_message::Msg::AllocatePort(a)) => {
                                let _ = tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::PortAllocated(pb::PortAllocated {
                                    request_id: a.request_id, port: 29400, error: String::new(),
                                }))}).await;
                            }
                            Some(pb::coordinator_message::Msg::StartWorkers(sw)) if !got_start => {
                                got_start = true;
                                let _ = done_tx.send(t0.elapsed()).await;
                                started.fetch_add(1, Ordering::Relaxed);
                                let me = format!("sim-{i}");
                                for r in sw.ranks.iter().filter(|r| r.node == me) {
                                    let _ = tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::WorkerStarted(pb::WorkerStarted {
                                        job_id: sw.job_id.clone(), generation: sw.generation, rank: r.rank, pid: 1000 + r.rank,
                                    }))}).await;
                                }
                                ready.wait().await;
                                next_hb = tokio::time::Instant::now();
                            }
                            _ => {}
                        }
                    }
                    _ = tokio::time::sleep_until(next_hb), if got_start && per_agent_milli > 0 => {
                        seq += 1;
                        if tx.try_send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { seq, running_workers: 1 }))}).is_ok() {
                            hb_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        next_hb += hb_sleep;
                        if next_hb < tokio::time::Instant::now() {
                            next_hb = tokio::time::Instant::now() + hb_sleep;
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
    }
    drop(done_tx);
    let mut last = Duration::ZERO;
    for _ in 0..args.agents {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some(d)) => last = last.max(d),
            _ => bail!(
                "only {} of {} agents got StartWorkers",
                started.load(Ordering::Relaxed),
                args.agents
            ),
        }
    }
    let join_to_start = last - first_join.map(|f| f - t0).unwrap_or_default();
    println!(
        "rendezvous: {} agents joined and all got StartWorkers in {:.3} s (last JoinAck at {:.3} s)",
        args.agents,
        join_to_start.as_secs_f64(),
        last_ack.load(Ordering::Relaxed) as f64 / 1e6
    );
    ready.wait().await;

    // Right after the rendezvous, while the coordinator handles every agent's WorkerStarted:
    // how long operator calls wait, and when the job is RUNNING (no heartbeats yet).
    let mut probe =
        pb::job_service_client::JobServiceClient::new(channel(&addr, &tls, token).await?);
    let t = Instant::now();
    let mut lat = Vec::new();
    let mut running_at = None;
    while t.elapsed() < Duration::from_secs(args.seconds) || running_at.is_none() {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the job was not RUNNING 120 s after the rendezvous");
        }
        let s = Instant::now();
        let st = probe
            .get(pb::GetJobRequest {
                job_id: job.id.clone(),
            })
            .await?
            .into_inner();
        lat.push(s.elapsed().as_secs_f64() * 1e3);
        if running_at.is_none() && st.state == "RUNNING" {
            running_at = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let max = lat.iter().cloned().fold(0.0, f64::max);
    println!(
        "after rendezvous: job RUNNING {:.3} s later; {} probes over {:.1} s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        running_at.unwrap_or_default().as_secs_f64(),
        lat.len(),
        t.elapsed().as_secs_f64(),
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        max
    );

    // Heartbeat phase.
    println!("offered hb/s | absorbed hb/s | probe p50 ms | p99 ms | max ms");
    for offered in &args.rates {
        let per_agent_milli = offered * 1000 / args.agents as u64;
        rate_per_agent.store(per_agent_milli, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await; // settle
        let sent0 = hb_sent.load(Ordering::Relaxed);
        let t = Instant::now();
        let mut lat = Vec::new();
        while t.elapsed() < Duration::from_secs(args.seconds) {
            let s = Instant::now();
            probe
                .get(pb::GetJobRequest {
                    job_id: job.id.clone(),
                })
                .await?;
            lat.push(s.elapsed().as_secs_f64() * 1e3);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let absorbed = (hb_sent.load(Ordering::Relaxed) - sent0) as f64 / t.elapsed().as_secs_f64();
        let max = lat.iter().cloned().fold(0.0, f64::max);
        println!(
            "{offered:>12} | {absorbed:>13.0} | {:>12.2} | {:>6.2} | {:>6.2}",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            max
        );
    }
    rate_per_agent.store(0, Ordering::Relaxed);
    Ok(())
}
