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
//! `--probe small` has the heartbeat phase's probe read a cancelled one-node job instead of the
//! N-rank job: the same queue, without the cost of encoding an N-rank status 50 times a second.
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
    /// Each rank also streams this many step reports per second (`ReportProgress`, as a
    /// trainer does; compute times with ±5% noise), from the job's start: what the straggler
    /// detector and the per-rank telemetry handle.
    #[arg(long, default_value_t = 0.0)]
    progress_rate: f64,
    /// Serve the coordinator's metrics (`--metrics-listen`) and scrape `/metrics` this often
    /// during the heartbeat phase (e.g. `1s`; needs a coordinator that has the flag).
    #[arg(long, value_parser = humantime::parse_duration)]
    scrape_every: Option<Duration>,
    /// The job the heartbeat phase's probe reads: `load`, the N-rank job under load (its
    /// status grows with N), `small`, a one-node job cancelled before the agents join (the
    /// probe then measures the queue, not the encoding of an N-rank status), or `none`: no
    /// probe, only heartbeats, reports and scrapes (for instruction counts of those alone).
    #[arg(long, value_enum, default_value_t = Probe::Load)]
    probe: Probe,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Probe {
    Load,
    Small,
    None,
}

/// User and system CPU seconds process `pid` has used so far (/proc/PID/stat).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// One `GET /metrics` over HTTP/1.0; the body's length.
fn scrape(addr: &str) -> anyhow::Result<usize> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no HTTP response");
    };
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!("scrape: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.len())
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

/// A simulated trainer rank: `rate` step reports per second on one `ReportProgress` stream,
/// compute time 100 ms ±5% (seeded by the rank), wait 10 ms, until the stream breaks.
async fn report_progress(
    ch: AuthChannel,
    job_id: String,
    generation: u64,
    rank: u32,
    rate: f64,
    sent: Arc<AtomicU64>,
) {
    let (tx, rx) = mpsc::channel(16);
    let mut client = pb::rendezvous_service_client::RendezvousServiceClient::new(ch);
    let call = tokio::spawn(async move { client.report_progress(ReceiverStream::new(rx)).await });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut noise = u64::from(rank).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for step in 1u64.. {
        tick.tick().await;
        // xorshift: a uniform number in [-1, 1).
        noise ^= noise << 13;
        noise ^= noise >> 7;
        noise ^= noise << 17;
        let u = (noise >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        let p = pb::Progress {
            scope: Some(pb::Scope {
                job_id: job_id.clone(),
                generation,
            }),
            rank,
            step,
            total_steps: 1_000_000,
            loss: Some(2.0),
            tokens_per_second: 1000.0,
            memory_bytes: 1 << 30,
            collective_seq: step,
            compute_seconds: 0.1 * (1.0 + 0.05 * u),
            collective_wait_seconds: 0.01,
            ..Default::default()
        };
        if tx.send(p).await.is_err() {
            break;
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
    drop(tx);
    let _ = call.await;
}

/// A connection as the settings say, with the token (if any) on every call.
type Jobs = pb::job_service_client::JobServiceClient<AuthChannel>;

/// Submits `spec`; the job's id.
async fn submit(jobs: &mut Jobs, spec: &serde_json::Value) -> anyhow::Result<String> {
    let job = jobs
        .submit(pb::SubmitRequest {
            spec_json: spec.to_string(),
            files: Default::default(),
        })
        .await?
        .into_inner()
        .job
        .context("job")?;
    Ok(job.id)
}

async fn cancel(jobs: &mut Jobs, job_id: String) -> anyhow::Result<()> {
    jobs.cancel(pb::CancelRequest {
        job_id,
        grace_ms: 1,
    })
    .await?;
    Ok(())
}

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
    let metrics_addr = if args.scrape_every.is_some() {
        let p = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let a = format!("127.0.0.1:{p}");
        cmd.args(["--metrics-listen", &a]);
        Some(a)
    } else {
        None
    };
    let coord = Coordinator(cmd.spawn().context("starting the coordinator")?);
    let coord_pid = coord.0.id();
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
        let id = submit(&mut jobs, &spec).await?;
        sub.push(s.elapsed().as_secs_f64() * 1e3);
        cancel(&mut jobs, id).await?;
    }
    if !sub.is_empty() {
        println!(
            "submit: {} sequential, p50 {:.2} ms, p99 {:.2} ms",
            sub.len(),
            percentile(&mut sub, 0.5),
            percentile(&mut sub, 0.99)
        );
    }
    let small = match args.probe {
        Probe::Load | Probe::None => None,
        Probe::Small => {
            let spec = serde_json::json!({"name": "probe", "command": ["true"], "nodes": 1});
            let id = submit(&mut jobs, &spec).await?;
            cancel(&mut jobs, id.clone()).await?;
            Some(id)
        }
    };
    let job_id = submit(
        &mut jobs,
        &serde_json::json!({"name": "load", "command": ["true"]}),
    )
    .await?;
    println!(
        "coordinator {addr}; job {job_id} waiting for {} nodes",
        args.agents
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
    let progress_sent = Arc::new(AtomicU64::new(0));
    let mut first_join: Option<Instant> = None;
    for (i, ch) in channels.into_iter().enumerate() {
        let ready = ready.clone();
        let done_tx = done_tx.clone();
        let hb_sent = hb_sent.clone();
        let rate = rate_per_agent.clone();
        let started = started.clone();
        let last_ack = last_ack.clone();
        let progress_rate = args.progress_rate;
        let progress_sent = progress_sent.clone();
        first_join.get_or_insert_with(Instant::now);
        tokio::spawn(async move {
            let progress_ch = ch.clone();
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
                                if progress_rate > 0.0 {
                                    tokio::spawn(report_progress(
                                        progress_ch.clone(),
                                        sw.job_id.clone(),
                                        sw.generation,
                                        i as u32,
                                        progress_rate,
                                        progress_sent.clone(),
                                    ));
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
                job_id: job_id.clone(),
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

    // Heartbeat phase (with the step reports, if any, and the scrapes, if asked).
    let scrapes = Arc::new(AtomicU64::new(0));
    let scraper = match (metrics_addr.clone(), args.scrape_every) {
        (Some(a), Some(every)) => {
            let scrapes = scrapes.clone();
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let a = a.clone();
                    match tokio::task::spawn_blocking(move || scrape(&a)).await {
                        Ok(Ok(_)) => {
                            scrapes.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => eprintln!("scrape failed: {e}"),
                        Err(_) => return,
                    }
                }
            }))
        }
        _ => None,
    };
    if let Some(a) = &metrics_addr {
        println!("metrics: one scrape is {} bytes", scrape(a)?);
    }
    println!(
        "offered hb/s | absorbed hb/s | reports/s | scrapes | coordinator cores | probe p50 ms | p99 ms | max ms"
    );
    for offered in &args.rates {
        let per_agent_milli = offered * 1000 / args.agents as u64;
        rate_per_agent.store(per_agent_milli, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await; // settle
        let sent0 = hb_sent.load(Ordering::Relaxed);
        let reports0 = progress_sent.load(Ordering::Relaxed);
        let scrapes0 = scrapes.load(Ordering::Relaxed);
        let cpu0 = cpu_seconds(coord_pid);
        let t = Instant::now();
        let mut lat = Vec::new();
        let probed = small.clone().unwrap_or_else(|| job_id.clone());
        if args.probe == Probe::None {
            // The measured window itself: heartbeats, reports and scrapes run meanwhile.
            tokio::time::sleep_until(
                tokio::time::Instant::from_std(t) + Duration::from_secs(args.seconds),
            )
            .await;
        }
        while t.elapsed() < Duration::from_secs(args.seconds) {
            let s = Instant::now();
            probe
                .get(pb::GetJobRequest {
                    job_id: probed.clone(),
                })
                .await?;
            lat.push(s.elapsed().as_secs_f64() * 1e3);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = t.elapsed().as_secs_f64();
        let cores = (cpu_seconds(coord_pid) - cpu0) / secs;
        let absorbed = (hb_sent.load(Ordering::Relaxed) - sent0) as f64 / secs;
        let reports = (progress_sent.load(Ordering::Relaxed) - reports0) as f64 / secs;
        let scraped = scrapes.load(Ordering::Relaxed) - scrapes0;
        let max = lat.iter().cloned().fold(0.0, f64::max);
        println!(
            "{offered:>12} | {absorbed:>13.0} | {reports:>9.0} | {scraped:>7} | {cores:>17.3} | {:>12.2} | {:>6.2} | {:>6.2}",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            max
        );
    }
    rate_per_agent.store(0, Ordering::Relaxed);
    if let Some(s) = scraper {
        s.abort();
    }
    drop(coord);
    Ok(())
}
