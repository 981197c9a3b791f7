//! Test support: real etcd members started from the `etcd` binary on `PATH` (Debian's
//! `etcd-server`), on free loopback ports with their own data directories, stopped and removed
//! when dropped: one member ([`EtcdServer`]) or a cluster of several ([`EtcdCluster`]). Used by
//! this crate's tests and by the workspace's integration tests.
//!
//! Without an `etcd` binary, [`EtcdServer::start_or_skip`] prints that the test is skipped
//! and returns `None`, except under `CI=true`, where CI installs etcd and a missing binary
//! is a failure.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a member may take to answer `/health` after it starts.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// One etcd member for tests: a cluster of one, or a member of an [`EtcdCluster`].
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    /// The member's name in its cluster.
    name: String,
    client_port: u16,
    peer_port: u16,
    /// `--initial-cluster`: every member's name and peer URL.
    initial_cluster: String,
    tls: Option<EtcdTls>,
}

/// Several etcd members on loopback forming one cluster (quorum: a majority of them).
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<EtcdServer>,
}

/// TLS on the member's client endpoint, with client certificates required
/// (`--client-cert-auth`): PEM files.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA client certificates must chain to.
    pub ca: PathBuf,
    /// The member's certificate (for 127.0.0.1) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An `etcd` binary: `$RINGMASTER_TEST_ETCD`, else `etcd` on `PATH`.
fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RINGMASTER_TEST_ETCD") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl EtcdServer {
    /// Start a member for `test`, or `None` (printed as skipped) when there is no etcd
    /// binary and CI is not set. Panics when the member does not start.
    pub fn start_or_skip(test: &str) -> Option<EtcdServer> {
        if etcd_binary().is_none() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: no etcd binary on PATH (CI installs Debian's etcd-server)"
            );
            eprintln!("{test}: skipped: no etcd binary on PATH (apt install etcd-server)");
            return None;
        }
        Some(EtcdServer::start().unwrap_or_else(|e| panic!("{test}: {e}")))
    }

    /// Start a member on free loopback ports and wait until it serves.
    pub fn start() -> Result<EtcdServer, String> {
        EtcdServer::start_with(None)
    }

    /// As [`EtcdServer::start`], serving clients over TLS when `tls` is given.
    pub fn start_with(tls: Option<EtcdTls>) -> Result<EtcdServer, String> {
        on_free_ports(|| {
            let mut server = EtcdServer::new("test", tls.clone())?;
            server.initial_cluster = format!("test=http://127.0.0.1:{}", server.peer_port);
            server.spawn()?;
            Ok(server)
        })
    }

    /// A member not started yet, on free ports, with a fresh data directory.
    fn new(name: &str, tls: Option<EtcdTls>) -> Result<EtcdServer, String> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ringmaster-etcd-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(EtcdServer {
            child: None,
            dir,
            name: name.to_owned(),
            client_port: free_port(),
            peer_port: free_port(),
            initial_cluster: String::new(),
            tls,
        })
    }

    /// Start the process and wait until it serves.
    fn spawn(&mut self) -> Result<(), String> {
        let ready_before = self.launch()?;
        self.wait_ready(ready_before)
    }

    /// Start the process; returns how often its log said it was ready before (for
    /// [`Self::wait_ready`]): the members of a cluster serve only once a quorum runs.
    fn launch(&mut self) -> Result<usize, String> {
        let bin = etcd_binary().ok_or("no etcd binary on PATH")?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("etcd log: {e}"))?;
        let mut cmd = Command::new(&bin);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let ready_before = self.ready_count();
        let child = cmd
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", "ringmaster-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        self.child = Some(child);
        Ok(ready_before)
    }

    /// How often the member has said it serves clients (its log grows across restarts).
    fn ready_count(&self) -> usize {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .matches("ready to serve client requests")
            .count()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Serving: it said so (after its raft leader is known) since the start, and the port takes
    /// connections.
    fn healthy(&self, ready_before: usize) -> bool {
        self.ready_count() > ready_before
            && TcpStream::connect(("127.0.0.1", self.client_port)).is_ok()
    }

    fn wait_ready(&mut self, ready_before: usize) -> Result<(), String> {
        let start = Instant::now();
        while !self.healthy(ready_before) {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "etcd exited at start ({status}):\n{}",
                    self.log_tail()
                ));
            }
            if start.elapsed() > READY_WITHIN {
                return Err(format!(
                    "etcd did not become healthy within {READY_WITHIN:?}:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `host:port` of the member's client endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// An `etcd://` URL for this member with the key prefix `root`.
    pub fn url(&self, root: &str) -> String {
        format!("etcd://{}/{root}", self.endpoint())
    }

    /// The member's data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kill the member (SIGKILL: as a crashed machine); its data stays for [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the member again on the same ports and data, and wait until it serves.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn().unwrap_or_else(|e| panic!("etcd restart: {e}"));
    }
}

impl EtcdCluster {
    /// Start `n` members on loopback as one new cluster and wait until each serves.
    pub fn start(n: usize) -> Result<EtcdCluster, String> {
        on_free_ports(|| EtcdCluster::start_once(n))
    }

    fn start_once(n: usize) -> Result<EtcdCluster, String> {
        let mut members = (0..n)
            .map(|i| EtcdServer::new(&format!("m{i}"), None))
            .collect::<Result<Vec<_>, _>>()?;
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster.clone_from(&initial);
        }
        let mut cluster = EtcdCluster { members };
        cluster.start_all()?;
        Ok(cluster)
    }

    /// Start every member (again, on its data) and wait until each serves.
    pub fn start_all(&mut self) -> Result<(), String> {
        let ready: Vec<usize> = self
            .members
            .iter_mut()
            .map(EtcdServer::launch)
            .collect::<Result<_, _>>()?;
        for (m, before) in self.members.iter_mut().zip(ready) {
            m.wait_ready(before)?;
        }
        Ok(())
    }

    /// Kill every member at once (SIGKILL, as a power cut); their data stays for
    /// [`Self::start_all`].
    pub fn stop_all(&mut self) {
        for m in &mut self.members {
            m.stop();
        }
    }

    /// The members.
    pub fn members(&self) -> &[EtcdServer] {
        &self.members
    }

    /// An `etcd://` URL naming every member, with the key prefix `root`.
    pub fn url(&self, root: &str) -> String {
        let endpoints: Vec<String> = self.members.iter().map(EtcdServer::endpoint).collect();
        format!("etcd://{}/{root}", endpoints.join(","))
    }

    /// Kill member `i` (SIGKILL); its data stays for [`Self::start_member`].
    pub fn stop_member(&mut self, i: usize) {
        self.members[i].stop();
    }

    /// Start member `i` again on its ports and data, and wait until it serves.
    pub fn start_member(&mut self, i: usize) {
        self.members[i].restart();
    }
}

/// Runs `start` again (on new free ports: a port found free can be taken by another test
/// before etcd binds it) while etcd says an address is in use; at most 5 times.
fn on_free_ports<T>(mut start: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let mut tries = 0;
    loop {
        match start() {
            Err(e) if e.contains("address already in use") && tries < 4 => tries += 1,
            r => return r,
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
