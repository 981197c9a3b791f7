//! Restart latency with the real binaries: a coordinator and 2 agents × 2 slots on loopback.
//!
//! Each trial is a job whose rank 2 exits 1 in generation 0 (the other ranks sleep); the
//! coordinator gang-aborts and starts generation 1. Measured: from the failing worker's last
//! timestamp before `exit 1` to the last of the 4 generation-1 workers' first timestamp
//! (wall clock, `date +%s%N` inside the workers).
//!
//! Credentials are always on (every call carries a token); `--tls` adds TLS with mutual TLS for
//! agents (certificates from `ringctl certs init`), to measure what TLS costs.
//!
//! `cargo run --release -p ringmaster-bench --bin restart-latency -- --trials 20 [--tls]`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Directory with the `coordinator`, `agent` and `ringctl` binaries (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// TLS on every connection, mutual TLS for agents.
    #[arg(long)]
    tls: bool,
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

fn read_ns(p: &Path) -> Option<u128> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
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
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::write(d.join("hostfile"), "w0 slots=2\nw1 slots=2\n")?;
    std::fs::write(d.join("token"), "bench-token-0123456789")?;
    let pki = ringmaster_auth::Pki::new(d.join("pki"));
    if args.tls {
        let st = Command::new(bin.join("ringctl"))
            .args(["certs", "init"])
            .arg(pki.dir())
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("ringctl certs init failed");
        }
    }
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
        .arg(d.join("data"));
    if args.tls {
        c.args(pki.coordinator_args());
    }
    quiet(&mut c);
    let _coord = Kill(c.spawn().context("coordinator")?);
    // Wait until it listens, so the first submit does not race its start.
    let listening = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        if listening.elapsed() > Duration::from_secs(20) {
            bail!("the coordinator did not listen on {addr} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
        if args.tls {
            a.args(pki.agent_args("agent"));
        }
        quiet(&mut a);
        agents.push(Kill(a.spawn().context("agent")?));
    }
    let out = d.join("out");
    std::fs::create_dir_all(&out)?;
    let mut lat = Vec::new();
    for t in 0..args.trials {
        let spec = d.join(format!("job-{t}.yaml"));
        // `restart_backoff: 0s`: the mechanism's latency, like torchrun's (which has no backoff).
        std::fs::write(
            &spec,
            format!(
                "name: restart{t}\nmax_restarts: 1\nrestart_backoff: 0s\ncommand:\n  - sh\n  - -c\n  - |\n    \
                 if [ \"$RINGMASTER_RESTART_COUNT\" = 1 ]; then date +%s%N > {o}/start-{t}-$RANK; exit 0; fi\n    \
                 if [ \"$RANK\" = 2 ]; then sleep 0.5; date +%s%N > {o}/exit-{t}; exit 1; fi\n    \
                 exec sleep 60\n",
                o = out.display()
            ),
        )?;
        let mut ringctl = Command::new(bin.join("ringctl"));
        ringctl.env("RINGMASTER_TOKEN_FILE", d.join("token"));
        if args.tls {
            ringctl.env("RINGMASTER_TLS_CA", pki.ca());
        }
        let res = ringctl
            .args(["--coordinator", &addr, "submit"])
            .arg(&spec)
            .arg("--watch")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if !res.status.success() {
            bail!(
                "trial {t}: job did not succeed: {}",
                String::from_utf8_lossy(&res.stderr)
            );
        }
        let exit = read_ns(&out.join(format!("exit-{t}"))).context("exit timestamp")?;
        let mut last = 0;
        for r in 0..4 {
            last =
                last.max(read_ns(&out.join(format!("start-{t}-{r}"))).context("start timestamp")?);
        }
        let ms = (last as f64 - exit as f64) / 1e6;
        lat.push(ms);
        println!("trial {t}: {ms:.1} ms");
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "restart latency over {} trials: min {:.1} ms, median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        lat.len(),
        lat[0],
        p(0.5),
        p(0.9),
        lat[lat.len() - 1]
    );
    Ok(())
}
