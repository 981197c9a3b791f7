//! Time to recover from the loss of one rank, for the quickstart job (examples/quickstart.yaml:
//! ZeRO-2, 4 ranks as 2 agents × 2 slots on loopback), split into phases.
//!
//! Each trial submits the quickstart with `save_steps: 10` and `max_restarts: 1`, waits until a
//! checkpoint is committed and two more steps are done, SIGKILLs rank 3's trainer and follows
//! the job's status stream (JobService.Watch) until every rank of generation 1 has reported
//! that it is ready to train (its first progress report comes right after the checkpoint is
//! loaded). Phases, from the SIGKILL:
//! - detection: until the coordinator has ended generation 0 (state RESTARTING);
//! - teardown: until every rank of generation 0 is gone and generation 1 is placed (STARTING);
//! - restart: process start, rendezvous and ring connection of generation 1 (the rest);
//! - load: the checkpoint load, as rank 0 of generation 1 timed it ("loaded in X s").
//!
//! `cargo build --release --bins && target/release/recovery-time --trials 5`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use ringmaster_proto as pb;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Directory with the `coordinator`, `agent`, `trainer` and `ringctl` binaries (default:
    /// next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Heartbeat timeout of the coordinator (agent loss detection; rank loss is detected from
    /// the agent's exit report, not from heartbeats).
    #[arg(long, default_value = "10s")]
    heartbeat_timeout: String,
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The quickstart config with absolute paths, its own output dir, a checkpoint every 10 steps
/// and enough steps that the job is still running when it is cancelled.
fn config(root: &Path, out: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(root.join("examples/quickstart.yaml"))
        .context("reading examples/quickstart.yaml")?;
    let ex = root.join("examples").display().to_string() + "/";
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            !["output_dir:", "save_steps:", "logging_steps:", "max_steps:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| l.replace("examples/", &ex))
        .collect();
    lines.push(format!("output_dir: {}", out.display()));
    lines.push("save_steps: 10".into());
    lines.push("logging_steps: 1".into());
    lines.push("max_steps: 100000".into());
    Ok(lines.join("\n") + "\n")
}

#[derive(Default, Debug)]
struct Trial {
    detection: f64,
    teardown: f64,
    restart: f64,
    load: f64,
    total: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_owned(),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::write(d.join("hostfile"), "w0 slots=2\nw1 slots=2\n")?;
    std::fs::write(d.join("token"), "bench-token-0123456789")?;
    // ringctl's credential (the join token is the admin credential without an operator file).
    // SAFETY: set before any thread of this program starts.
    unsafe { std::env::set_var("RINGMASTER_TOKEN_FILE", d.join("token")) };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let quiet = |c: &mut Command| {
        c.env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut c = Command::new(bin.join("coordinator"));
    c.args(["--listen", &addr, "--join-token-file"])
        .arg(d.join("token"))
        .arg("--hostfile")
        .arg(d.join("hostfile"))
        .arg("--data-dir")
        .arg(d.join("data"))
        .args(["--heartbeat-timeout", &args.heartbeat_timeout]);
    quiet(&mut c);
    let _coord = Kill(c.spawn().context("coordinator")?);
    let mut agents = Vec::new();
    for n in ["w0", "w1"] {
        let mut a = Command::new(bin.join("agent"));
        a.args([
            "--join",
            &addr,
            "--name",
            n,
            "--slots",
            "2",
            "--join-token-file",
        ])
        .arg(d.join("token"))
        .arg("--work-dir")
        .arg(d.join(n))
        .args(["--advertise-addr", "127.0.0.1"]);
        quiet(&mut a);
        agents.push(Kill(a.spawn().context("agent")?));
    }
    let rt = tokio::runtime::Runtime::new()?;
    let mut trials = Vec::new();
    for t in 0..args.trials {
        let out = d.join(format!("out-{t}"));
        let cfg = d.join(format!("train-{t}.yaml"));
        std::fs::write(&cfg, config(&root, &out)?)?;
        let spec = d.join(format!("job-{t}.yaml"));
        std::fs::write(
            &spec,
            format!(
                // No restart backoff: the recovery itself is measured.
                "name: recover{t}\nmax_restarts: 1\nrestart_backoff: 0s\ntrain: {}\n",
                cfg.display()
            ),
        )?;
        let res = Command::new(bin.join("ringctl"))
            .args(["--coordinator", &addr, "submit"])
            .arg(&spec)
            .args(["--output", "json"])
            .output()?;
        if !res.status.success() {
            bail!(
                "trial {t}: submit failed: {}",
                String::from_utf8_lossy(&res.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&res.stdout)?;
        let job = v["id"].as_str().context("job id")?.to_owned();
        let tr = rt.block_on(trial(&addr, &job))?;
        let log = Command::new(bin.join("ringctl"))
            .args(["--coordinator", &addr, "logs", &job])
            .args(["--rank", "0", "--generation", "1"])
            .output()?;
        let text = String::from_utf8_lossy(&log.stdout).into_owned()
            + &String::from_utf8_lossy(&log.stderr);
        let load = text
            .lines()
            .find_map(|l| {
                let i = l.find("loaded in ")? + "loaded in ".len();
                l[i..].split_whitespace().next()?.parse::<f64>().ok()
            })
            .with_context(|| format!("trial {t}: no load time in rank 0's log: {text}"))?;
        let _ = Command::new(bin.join("ringctl"))
            .args(["--coordinator", &addr, "cancel", &job, "--grace", "0s"])
            .output()?;
        let tr = Trial {
            load,
            restart: tr.restart - load,
            ..tr
        };
        println!(
            "trial {t}: detection {:.3} s, teardown {:.3} s, restart {:.3} s, load {:.3} s; total {:.3} s",
            tr.detection, tr.teardown, tr.restart, tr.load, tr.total
        );
        trials.push(tr);
        let _ = std::fs::remove_dir_all(&out);
    }
    let median = |f: fn(&Trial) -> f64| {
        let mut v: Vec<f64> = trials.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "recovery over {} trials (median): detection {:.3} s, teardown {:.3} s, restart {:.3} s, \
         load {:.3} s; total {:.3} s",
        trials.len(),
        median(|t| t.detection),
        median(|t| t.teardown),
        median(|t| t.restart),
        median(|t| t.load),
        median(|t| t.total)
    );
    Ok(())
}

/// One trial of `job`: waits for a checkpoint plus two steps, kills rank 3, times the phases
/// (restart still including the load).
async fn trial(addr: &str, job: &str) -> anyhow::Result<Trial> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let token = std::fs::read_to_string(std::env::var("RINGMASTER_TOKEN_FILE")?)?;
    let mut client = pb::job_service_client::JobServiceClient::with_interceptor(
        ch,
        ringmaster_auth::Bearer::new(Some(token.trim()))?,
    );
    let mut stream = client
        .watch(pb::WatchRequest {
            job_id: job.to_owned(),
        })
        .await?
        .into_inner();
    let deadline = Duration::from_secs(600);
    let ready = tokio::time::timeout(deadline, async {
        while let Some(st) = stream.next().await {
            let st = st?;
            if let (Some(c), Some(p)) = (&st.last_checkpoint, &st.progress)
                && p.step.unwrap_or(0) >= c.step + 2
                && let Some(pid) = st.ranks.get(3).and_then(|r| r.pid)
            {
                return Ok(pid);
            }
            if matches!(st.state.as_str(), "SUCCEEDED" | "FAILED" | "CANCELLED") {
                bail!("job {job} ended ({}) before the kill", st.state);
            }
        }
        bail!("status stream of {job} ended")
    })
    .await
    .context("waiting for a checkpoint")??;
    let t0 = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ready as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let (mut detected, mut placed) = (None, None);
    let secs = |t: Instant| t.duration_since(t0).as_secs_f64();
    let all = tokio::time::timeout(deadline, async {
        while let Some(st) = stream.next().await {
            let st = st?;
            let now = Instant::now();
            if detected.is_none() && (st.state == "RESTARTING" || st.generation >= 1) {
                detected = Some(now);
            }
            if placed.is_none() && st.generation >= 1 {
                placed = Some(now);
            }
            if st.generation >= 1
                && st.ranks.len() == 4
                && st.ranks.iter().all(|r| r.step.is_some())
            {
                return Ok(now);
            }
            if matches!(st.state.as_str(), "SUCCEEDED" | "FAILED" | "CANCELLED") {
                bail!("job {job} ended ({}) during the recovery", st.state);
            }
        }
        bail!("status stream of {job} ended")
    })
    .await
    .context("waiting for the recovery")??;
    let (detected, placed) = (detected.unwrap_or(all), placed.unwrap_or(all));
    Ok(Trial {
        detection: secs(detected),
        teardown: secs(placed) - secs(detected),
        restart: secs(all) - secs(placed),
        load: 0.0,
        total: secs(all),
    })
}
