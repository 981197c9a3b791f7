//! Helpers for the cross-crate integration tests: real binaries on 127.0.0.1.
//!
//! Layout:
//! - [`bin`] — path of a workspace binary (built by `cargo test --workspace`).
//! - [`Proc`] — a child in its own process group, killed (whole group) on drop, output kept
//!   in a log file that is printed when a test fails.
//! - [`Cluster`] — a coordinator with a hostfile and join token, agents, and `ringctl` calls.
//! - [`wait_until`] — poll a condition with a deadline, never a bare sleep.
//! - [`TwoNodes`] — two "nodes" with their own addresses: network namespaces joined by a veth
//!   pair, or loopback aliases where namespaces are refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;

/// Serializes the tests that assert time bounds (kill within grace + 2 s, loss within the
/// heartbeat timeout + 2 s): they keep their margins on a 2-core CI machine when they do not
/// share it with the other tests of their binary. A panicking holder does not block the rest.
pub fn timing_sensitive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Path of a binary of this workspace, next to the test executable's `deps/` folder.
///
/// # Panics
/// If the binary was not built (run `cargo test --workspace` or `cargo build --bins` first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target directory");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// Polls `f` every 50 ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process in its own process group; the group is SIGKILLed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    reaped: bool,
}

impl Proc {
    /// Starts `cmd` with output to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        use std::os::unix::process::CommandExt;
        let f = std::fs::File::create(&log).expect("creating a process log");
        let f2 = f.try_clone().expect("cloning a log handle");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
            reaped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.reaped = true;
                return st.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        if !self.reaped {
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- log of {} ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(s) => {
            // The state follows the parenthesised command name.
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// A coordinator, its agents and a scratch directory.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub coordinator: Option<Proc>,
    pub agents: Vec<Proc>,
    pub token_file: PathBuf,
    pub hostfile: Option<PathBuf>,
    pub heartbeat_timeout: String,
    /// The `ringctl certs init` directory when the cluster runs with TLS (the default): the
    /// coordinator presents `coordinator.pem` and requires agents' client certificates.
    pub pki: Option<PathBuf>,
    /// Extra flags for every coordinator start.
    pub coordinator_args: Vec<String>,
    /// `--store` of every coordinator start (None: the embedded store in `data`).
    pub store_url: Option<String>,
    /// The etcd members holding the state, when the cluster runs on etcd. Declared last: they
    /// stop after the processes above.
    pub etcd: Option<ringmaster_store::testing::EtcdCluster>,
}

/// Where a test cluster's coordinator keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestStore {
    /// redb in the cluster's data dir.
    Embedded,
    /// A real etcd member started for the cluster (the `etcd` binary; Debian's etcd-server).
    Etcd,
}

impl TestStore {
    /// `RINGMASTER_TEST_STORE=etcd` runs every cluster test on etcd (CI runs the control-plane
    /// suite both ways); anything else, or unset, the embedded store.
    pub fn from_env() -> TestStore {
        match std::env::var("RINGMASTER_TEST_STORE").as_deref() {
            Ok("etcd") => TestStore::Etcd,
            _ => TestStore::Embedded,
        }
    }
}

/// How [`Cluster::start_with`] sets a cluster up.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// TLS with mutual TLS for agents (default true: the secure setup is what the tests run).
    pub tls: bool,
    /// Extra coordinator flags.
    pub coordinator_args: Vec<String>,
    /// Where the coordinator keeps its state (default: [`TestStore::from_env`]).
    pub store: TestStore,
    /// With etcd: how many members its cluster has (default 1).
    pub etcd_members: usize,
}

impl Default for ClusterOpts {
    fn default() -> ClusterOpts {
        ClusterOpts {
            tls: true,
            coordinator_args: Vec::new(),
            store: TestStore::from_env(),
            etcd_members: 1,
        }
    }
}

impl ClusterOpts {
    /// The default options with the coordinator serving Prometheus metrics on a free loopback
    /// port (`--metrics-listen`), and that address.
    pub fn with_metrics() -> (ClusterOpts, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let opts = ClusterOpts {
            coordinator_args: vec!["--metrics-listen".into(), addr.clone()],
            ..ClusterOpts::default()
        };
        (opts, addr)
    }
}

/// `GET path` over HTTP/1.1 from the server at `addr` (a metrics server): the status line and
/// the body.
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to the metrics server");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The `/metrics` text of the metrics server at `addr`, after checking it was served.
pub fn metrics_text(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains(" 200 "), "GET /metrics: {status}");
    body
}

/// Makes a CA, certificates for 127.0.0.1/localhost and tokens in `dir` with `ringctl certs init`.
pub fn certs_init(dir: &Path) {
    let out = Command::new(bin("ringctl"))
        .args(["certs", "init"])
        .arg(dir)
        .output()
        .expect("running ringctl certs init");
    assert!(
        out.status.success(),
        "ringctl certs init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// Starts a coordinator with `hostfile` (None: no hostfile), a join token and TLS.
    pub fn start(hostfile: Option<&str>, heartbeat_timeout: &str) -> Cluster {
        Cluster::start_with(hostfile, heartbeat_timeout, ClusterOpts::default())
    }

    /// As [`Cluster::start`], with options.
    pub fn start_with(
        hostfile: Option<&str>,
        heartbeat_timeout: &str,
        opts: ClusterOpts,
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ringmaster-test-")
            .tempdir()
            .expect("temp dir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "s3cret-token-0123456789\n").expect("writing the token");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
                .expect("restricting the token file");
        }
        let hostfile = hostfile.map(|text| {
            let p = dir.path().join("hostfile");
            std::fs::write(&p, text).expect("writing the hostfile");
            p
        });
        let pki = opts.tls.then(|| {
            let p = dir.path().join("pki");
            certs_init(&p);
            p
        });
        let etcd = (opts.store == TestStore::Etcd).then(|| {
            ringmaster_store::testing::EtcdCluster::start(opts.etcd_members.max(1))
                .unwrap_or_else(|e| panic!("starting etcd for the test cluster: {e}"))
        });
        let mut c = Cluster {
            addr: String::new(),
            store_url: etcd.as_ref().map(|e| e.url("ringmaster-test")),
            etcd,
            dir,
            coordinator: None,
            agents: Vec::new(),
            token_file,
            hostfile,
            heartbeat_timeout: heartbeat_timeout.to_owned(),
            pki,
            coordinator_args: opts.coordinator_args,
        };
        c.start_coordinator(None);
        c
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A coordinator command on `addr` with its data in `data` (a directory name in the
    /// cluster's dir) and the cluster's credentials, TLS, hostfile and store.
    fn coordinator_command(&self, addr: &str, data: &str) -> Command {
        let mut cmd = Command::new(bin("coordinator"));
        cmd.args(["--listen", addr, "--data-dir"])
            .arg(self.path(data))
            .arg("--join-token-file")
            .arg(&self.token_file)
            .args(["--heartbeat-timeout", &self.heartbeat_timeout]);
        if let Some(h) = &self.hostfile {
            cmd.arg("--hostfile").arg(h);
        }
        if let Some(pki) = &self.pki {
            cmd.args(ringmaster_auth::Pki::new(pki).coordinator_args());
        }
        if let Some(url) = &self.store_url {
            cmd.args(["--store", url]);
        }
        cmd.args(&self.coordinator_args);
        cmd
    }

    /// Starts a coordinator on a free port (the given one when `port` is set) and waits until
    /// its port answers; retries another port when one was taken meanwhile.
    fn spawn_coordinator(&self, port: Option<u16>, data: &str) -> (Proc, String) {
        for attempt in 0..20 {
            let port = port.unwrap_or_else(free_port);
            let addr = format!("127.0.0.1:{port}");
            let cmd = self.coordinator_command(&addr, data);
            let log = self.path(&format!("coordinator-{data}-{attempt}-{port}.log"));
            let mut p = Proc::spawn("coordinator", cmd, log);
            // Ready once the port answers.
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut up = false;
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(&addr).is_ok() {
                    up = true;
                    break;
                }
                if p.wait_exit(Duration::from_millis(50)).is_some() {
                    break;
                }
            }
            if up {
                return (p, addr);
            }
            let log = p.log_text();
            if !log.contains("Address already in use") {
                panic!("coordinator did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("no free port for the coordinator");
    }

    /// (Re)starts the coordinator on the same data dir; on the same port when given.
    pub fn start_coordinator(&mut self, port: Option<u16>) {
        let (p, addr) = self.spawn_coordinator(port, "data");
        self.addr = addr;
        self.coordinator = Some(p);
    }

    /// Starts one more coordinator on the cluster's store, with its own data dir (`data`):
    /// on etcd, a standby that leads when the leader is gone. Returns it and its address.
    pub fn start_another_coordinator(&self, data: &str) -> (Proc, String) {
        self.spawn_coordinator(None, data)
    }

    /// [`Cluster::start_another_coordinator`] on a given port.
    pub fn start_another_coordinator_at(&self, port: u16, data: &str) -> Proc {
        self.spawn_coordinator(Some(port), data).0
    }

    /// A training config `<name>.yaml` in the cluster's dir: the quickstart's model and data,
    /// 30 steps of global batch 64 on 4 ranks, ZeRO-2, a checkpoint every 10 steps into
    /// `<name>/`; `extra` appended (keys the config does not set already).
    pub fn quickstart_config(&self, name: &str, extra: &str) -> PathBuf {
        let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let ds = self.path("ds_z2.json");
        std::fs::write(
            &ds,
            r#"{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}"#,
        )
        .unwrap();
        let p = self.path(&format!("{name}.yaml"));
        std::fs::write(
            &p,
            format!(
                "model_name_or_path: {m}\ntrain_from_scratch: true\nstage: sft\nfinetuning_type: full\n\
                 dataset: addition_train\ndataset_dir: {d}\ntemplate: default\ncutoff_len: 64\n\
                 output_dir: {o}\nper_device_train_batch_size: 16\ngradient_accumulation_steps: 1\n\
                 learning_rate: 3.0e-3\nmax_steps: 30\nlogging_steps: 1\nsave_steps: 10\nseed: 3\n\
                 deepspeed: {ds}\n{extra}",
                m = ex.join("model").display(),
                d = ex.join("data").display(),
                o = self.path(name).display(),
                ds = ds.display(),
            ),
        )
        .unwrap();
        p
    }

    /// Starts an agent named `name` with `slots`; extra flags appended.
    pub fn start_agent(&mut self, name: &str, slots: u32, extra: &[&str]) -> usize {
        let mut cmd = Command::new(bin("agent"));
        cmd.args([
            "--join",
            &self.addr,
            "--name",
            name,
            "--slots",
            &slots.to_string(),
        ])
        .arg("--work-dir")
        .arg(self.path(&format!("work-{name}")))
        .arg("--allowed-root")
        .arg(self.dir.path());
        if !extra.contains(&"--join-token-file") {
            cmd.arg("--join-token-file").arg(&self.token_file);
        }
        if let Some(pki) = &self.pki
            && !extra.contains(&"--tls-ca")
        {
            cmd.args(ringmaster_auth::Pki::new(pki).agent_args("agent"));
        }
        cmd.args(["--advertise-addr", "127.0.0.1", "--max-backoff", "500ms"])
            .args(["--shutdown-grace", "2s"])
            .args(extra);
        let log = self.path(&format!("agent-{name}-{}.log", self.agents.len()));
        self.agents
            .push(Proc::spawn(&format!("agent {name}"), cmd, log));
        self.agents.len() - 1
    }

    /// Runs `ringctl --coordinator ADDR args...` with the cluster's admin credential (the join
    /// token, as no operator token file is configured).
    pub fn ringctl(&self, args: &[&str]) -> Output {
        self.ringctl_cmd()
            .args(args)
            .output()
            .expect("running ringctl")
    }

    /// A `ringctl --coordinator ADDR` command with the cluster's credential and CA.
    pub fn ringctl_cmd(&self) -> Command {
        let mut cmd = Command::new(bin("ringctl"));
        cmd.env("RINGMASTER_TOKEN_FILE", &self.token_file)
            .env_remove("RINGMASTER_TLS_CA")
            .arg("--coordinator")
            .arg(&self.addr);
        if let Some(pki) = &self.pki {
            cmd.env("RINGMASTER_TLS_CA", pki.join("ca.pem"));
        }
        cmd
    }

    /// `ringctl nodes --output json`.
    pub fn nodes(&self) -> Value {
        let out = self.ringctl(&["nodes", "--output", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Waits until these nodes are JOINED.
    pub fn wait_joined(&self, names: &[&str]) {
        wait_until(Duration::from_secs(30), "agents to join", || {
            let nodes = self.nodes();
            let arr = nodes.as_array()?;
            names
                .iter()
                .all(|n| {
                    arr.iter()
                        .any(|x| x["name"] == *n && x["state"] == "JOINED")
                })
                .then_some(())
        });
    }

    /// Submits a job whose ranks each append their pid to `out/started-$RANK` and then wait
    /// until `out/finish` exists; returns the job id and the `out` directory.
    pub fn submit_held_job(&self, file_name: &str) -> (String, String) {
        let out = self.path("out");
        std::fs::create_dir_all(&out).expect("creating the jobs' out dir");
        let out = out.display().to_string();
        let job = self.submit(
            file_name,
            &format!(
                "command: [sh, -c, 'echo $$ >> {out}/started-$RANK; while [ ! -e {out}/finish ]; do sleep 0.1; done']\n"
            ),
        );
        (job, out)
    }

    /// Lets a job of [`Cluster::submit_held_job`] finish and checks that it succeeded with
    /// each of its `ranks` launched exactly once.
    pub fn finish_held_job(&self, job: &str, ranks: u32) {
        std::fs::write(self.path("out/finish"), b"").expect("writing out/finish");
        let st = self.wait_state(job, &["SUCCEEDED", "FAILED"], Duration::from_secs(30));
        assert_eq!(st["state"], "SUCCEEDED", "{st:#}");
        for r in 0..ranks {
            let started = read(&self.path(&format!("out/started-{r}"))).unwrap_or_default();
            assert_eq!(started.lines().count(), 1, "rank {r} started: {started:?}");
        }
    }

    /// Waits until `job` is RUNNING with every rank RUNNING (e.g. re-attached after a
    /// coordinator change); returns its status.
    pub fn wait_all_ranks_running(&self, job: &str, timeout: Duration) -> Value {
        wait_until(timeout, "every rank RUNNING", || {
            let st = self.status(job);
            let ok = st["state"] == "RUNNING"
                && st["ranks"]
                    .as_array()?
                    .iter()
                    .all(|r| r["state"] == "RUNNING");
            ok.then_some(st)
        })
    }

    /// Writes a job spec file and submits it; returns the job id.
    pub fn submit(&self, file_name: &str, spec: &str) -> String {
        let p = self.path(file_name);
        std::fs::write(&p, spec).expect("writing the job spec");
        let out = self.ringctl(&[
            "submit",
            p.to_str().expect("utf-8 path"),
            "--output",
            "json",
        ]);
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("submit prints JSON");
        v["id"].as_str().expect("job id").to_owned()
    }

    /// `ringctl status JOB --output json`.
    pub fn status(&self, job: &str) -> Value {
        let out = self.ringctl(&["status", job, "--output", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Waits until the job's state is one of `states`; returns the status.
    pub fn wait_state(&self, job: &str, states: &[&str], timeout: Duration) -> Value {
        let mut last = Value::Null;
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status(job);
            if states.iter().any(|s| st["state"] == *s) {
                return st;
            }
            if !st.is_null() {
                last = st;
            }
            if Instant::now() > deadline {
                panic!("job {job} not in {states:?} after {timeout:?}; last status: {last:#}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Parses `KEY=VALUE` lines (an `env` dump) into pairs.
pub fn parse_env(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Reads a file if it exists.
/// The pid of every rank in a job status, in rank order (0 where none is known).
pub fn rank_pids(st: &Value) -> Vec<u64> {
    st["ranks"]
        .as_array()
        .map(|ranks| {
            ranks
                .iter()
                .map(|r| r["pid"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

pub fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// Two "nodes" with their own addresses, for launchers that must meet over a network.
///
/// Where this machine allows it (root and iproute2, as on CI), each node is a network namespace
/// and the two are joined by a veth pair: node 0 is 10.203.0.1, node 1 is 10.203.0.2, and
/// neither can reach the other's loopback, so anything that wrongly advertises 127.0.0.1 fails.
/// Elsewhere the nodes are the loopback aliases 127.0.0.2 and 127.0.0.3 (every 127/8 address is
/// local on Linux) and processes must be told their address; `RINGMASTER_TEST_NO_NETNS=1` picks
/// them even where namespaces work. The namespaces are deleted on drop.
pub struct TwoNodes {
    /// Node 0's and node 1's address.
    pub addrs: [String; 2],
    namespaces: Option<[String; 2]>,
}

impl TwoNodes {
    /// Sets the two nodes up; prints which kind it got.
    pub fn start() -> TwoNodes {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("{}x{n}", std::process::id() % 1_000_000);
        let ns = [format!("rmt{id}a"), format!("rmt{id}b")];
        // Interface names are at most 15 bytes: "rmv" + 6 digits + "x" + n + side.
        let veth = [format!("rmv{id}a"), format!("rmv{id}b")];
        let addrs = ["10.203.0.1", "10.203.0.2"];
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), ns[0].clone()],
            vec!["netns".into(), "add".into(), ns[1].clone()],
            vec![
                "link".into(),
                "add".into(),
                veth[0].clone(),
                "netns".into(),
                ns[0].clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                veth[1].clone(),
                "netns".into(),
                ns[1].clone(),
            ],
        ];
        let mut steps = steps;
        for side in 0..2 {
            let n = ns[side].clone();
            steps.push(vec![
                "-n".into(),
                n.clone(),
                "addr".into(),
                "add".into(),
                format!("{}/24", addrs[side]),
                "dev".into(),
                veth[side].clone(),
            ]);
            steps.push(vec![
                "-n".into(),
                n.clone(),
                "link".into(),
                "set".into(),
                veth[side].clone(),
                "up".into(),
            ]);
            steps.push(vec![
                "-n".into(),
                n,
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ]);
        }
        let mut failed = std::env::var_os("RINGMASTER_TEST_NO_NETNS")
            .is_some_and(|v| v == "1")
            .then(|| "RINGMASTER_TEST_NO_NETNS=1".to_owned());
        let todo = if failed.is_none() { &steps[..] } else { &[] };
        // The namespaces this call made: only those are deleted if a later step fails (a name
        // that already existed belongs to someone else).
        let mut made = Vec::new();
        for step in todo {
            match Command::new("ip").args(step).output() {
                Ok(o) if o.status.success() => {
                    if step[0] == "netns" && step[1] == "add" {
                        made.push(step[2].clone());
                    }
                }
                Ok(o) => {
                    failed = Some(format!(
                        "ip {}: {}",
                        step.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                    break;
                }
                Err(e) => {
                    failed = Some(format!("ip: {e}"));
                    break;
                }
            }
        }
        match failed {
            None => {
                eprintln!(
                    "two nodes: network namespaces {} ({}) and {} ({}) joined by a veth pair",
                    ns[0], addrs[0], ns[1], addrs[1]
                );
                TwoNodes {
                    addrs: addrs.map(str::to_owned),
                    namespaces: Some(ns),
                }
            }
            Some(why) => {
                for n in &made {
                    let _ = Command::new("ip").args(["netns", "del", n]).output();
                }
                eprintln!(
                    "two nodes: no network namespaces here ({why}); loopback aliases 127.0.0.2 \
                     and 127.0.0.3"
                );
                TwoNodes {
                    addrs: ["127.0.0.2".into(), "127.0.0.3".into()],
                    namespaces: None,
                }
            }
        }
    }

    /// Whether the nodes are network namespaces (else loopback aliases).
    pub fn isolated(&self) -> bool {
        self.namespaces.is_some()
    }

    /// `program` run on node `node`: inside its namespace (`ip netns exec` execs the program,
    /// so the child is the program itself).
    pub fn command(&self, node: usize, program: &Path) -> Command {
        match &self.namespaces {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns[node]]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// A port free on node `node`'s address when checked (in a fresh namespace, which listens
    /// on nothing, torch's default 29500).
    pub fn free_port(&self, node: usize) -> u16 {
        match &self.namespaces {
            Some(_) => 29_500,
            None => std::net::TcpListener::bind((self.addrs[node].as_str(), 0))
                .and_then(|l| l.local_addr())
                .expect("binding a free port")
                .port(),
        }
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        if let Some(ns) = &self.namespaces {
            // Deleting a namespace deletes its end of the veth pair, and so the pair.
            for n in ns {
                let _ = Command::new("ip").args(["netns", "del", n]).output();
            }
        }
    }
}

/// The strict Prometheus text parser, shared with the daemons' unit tests.
pub use ringmaster_common::metrics::{PromSample, parse_prometheus};
