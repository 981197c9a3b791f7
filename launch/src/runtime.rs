//! The node's launcher: one per node, every node running the same command line.
//!
//! 1. **Meet.** Node 0's launcher serves a TCP store (PyTorch's TCPStore protocol,
//!    `ringmaster_collectives::tcpstore`) at MASTER_ADDR:MASTER_PORT; every launcher, node 0's
//!    too, is its client, retrying until the rendezvous timeout. Keys live under
//!    `ringmaster-launch/<run id>/`. In join order (torchrun's c10d without node ranks) the
//!    launcher on the machine MASTER_ADDR names serves it, whatever rank it then gets.
//! 2. **Join.** Each launcher claims `node/<node rank>` (in join order the first free one; a
//!    second claim of a rank is refused naming the host that holds it) with its worker count and a description of what it runs
//!    (program, recipe contents, nnodes, restart budget). Every launcher reads every node's
//!    entry: a node that runs something else than node 0 is refused by name on every node, and
//!    the rank layout is the prefix sum of the worker counts in node order.
//! 3. **Run a generation.** Workers start in their own process groups with the environment
//!    contract of [`crate::env`], plus `RINGMASTER_STORE_SERVED=1` and
//!    `TORCHELASTIC_USE_AGENT_STORE=True` so that trainers and torch processes use the
//!    launchers' store as clients, with keys scoped by run id and generation.
//! 4. **Watch.** A worker that exits non-zero claims `gen/<g>/failed` with its rank, node and
//!    exit status (the first claim wins). Every launcher polls that key every monitor interval
//!    (torchrun's `--monitor-interval`, 0.1 s by default): once set, each stops its workers (SIGTERM to the group, SIGKILL after the
//!    grace period), so a failure anywhere stops every node within about a second plus the
//!    grace. A node whose workers all exited 0 says so (`gen/<g>/done/<node>`); the job
//!    succeeds when every node has.
//! 5. **Restart together.** The restart budget is the job's, not a node's: generation `g` is the
//!    `g`-th restart on every node, and all nodes take the same decision from the same key.
//!    Before generation `g + 1` starts, every node says it has stopped generation `g`'s workers
//!    (`gen/<g+1>/ready/<node>`) and waits for the others.
//! 6. **Exit.** The exit code is the job's on every node: 0 when it succeeded, 1 when it failed
//!    (after the last restart), with one line naming the rank that failed first; in DeepSpeed's
//!    dialect that rank's own exit code, as DeepSpeed's launcher exits with it
//!    ([`Outcome::exit_code`]). Node 0 keeps the store until every node has read the end (or
//!    [`EXIT_WAIT`]).

use std::io::{BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use ringmaster_collectives::{TcpStoreClient, TcpStoreOptions, TcpStoreServer};
use serde::{Deserialize, Serialize};

use crate::env::{Contract, contract_env, omp_default};
use crate::plan::{Dialect, LaunchError, LaunchPlan, Port, Program, WorkerEnv};

/// Most workers a node may run (a node's entry in the store is checked against it).
pub const MAX_WORKERS_PER_NODE: usize = 4096;
/// How long node 0 keeps the store after the end, for the others to read it.
pub const EXIT_WAIT: Duration = Duration::from_secs(10);
/// The longest monitor interval a node's entry may carry (`--monitor-interval` allows 3600 s).
const MAX_MONITOR_MS: u64 = 3_600_000;

/// What the launcher needs besides the plan.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The trainer binary, for [`Program::Recipe`].
    pub trainer: PathBuf,
    /// Between SIGTERM and SIGKILL when stopping workers.
    pub stop_grace: Duration,
    /// This machine's name (in messages and `RINGMASTER_NODE`).
    pub hostname: String,
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// 0 success, 1 failure (the same on every node).
    pub code: i32,
    /// What failed, naming the rank, its node and its exit status.
    pub failure: Option<String>,
    /// Restarts taken.
    pub restarts: u64,
    /// How the rank that failed first (the job's cause, the same on every node) ended, as
    /// Python's `returncode`: its exit code, or `-N` when signal N killed it. `None` when the
    /// job did not end by a rank's failure (a signal to a launcher, a worker that could not
    /// start).
    pub rank_returncode: Option<i32>,
}

impl Outcome {
    /// The launcher's exit code in `dialect`: 0 on success; on failure DeepSpeed's launcher
    /// exits with the failing rank's code (`launch.py`'s `sys.exit(returncode)`, so signal N
    /// gives 256 - N), torchrun and accelerate with 1, as does a job stopped by a signal.
    pub fn exit_code(&self, dialect: Dialect) -> i32 {
        if self.code == 0 {
            return 0;
        }
        match (dialect, self.rank_returncode) {
            (Dialect::DeepSpeed, Some(rc)) if rc & 0xff != 0 => rc & 0xff,
            _ => self.code,
        }
    }
}

/// The value of `gen/<g>/failed`: the failing rank's returncode (empty when there is none), a
/// newline, and the line that names it.
fn cause_value(returncode: Option<i32>, why: &str) -> Vec<u8> {
    let rc = returncode.map_or_else(String::new, |c| c.to_string());
    format!("{rc}\n{why}").into_bytes()
}

/// The returncode and the line from a `gen/<g>/failed` value.
fn parse_cause(value: &[u8]) -> (Option<i32>, String) {
    let text = String::from_utf8_lossy(value);
    match text.split_once('\n') {
        Some((rc, why)) if rc.is_empty() || rc.parse::<i32>().is_ok() => {
            (rc.parse().ok(), why.to_owned())
        }
        _ => (None, text.into_owned()),
    }
}

/// What a node says about itself when it joins.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct NodeInfo {
    host: String,
    /// This launcher's process and start time: two launchers claiming one rank on one host
    /// still differ.
    nonce: String,
    nproc: usize,
    /// This launcher's monitor interval in milliseconds: a failure that only reacts to another
    /// is deferred by twice the slowest node's interval (0 in entries of older launchers).
    #[serde(default)]
    monitor_ms: u64,
    /// What must be the same on every node, field by field.
    agree: Vec<(String, String)>,
}

/// The last signal the launcher got (SIGINT, SIGTERM, SIGHUP, SIGQUIT), 0 for none.
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNALLED.store(sig, Ordering::SeqCst);
}

fn install_signals() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let _ = signal(sig, SigHandler::Handler(on_signal));
        }
    }
}

fn err(msg: impl Into<String>) -> LaunchError {
    LaunchError::new(msg)
}

/// Runs this node's part of the job described by `plan`.
///
/// # Errors
/// The store cannot be served or reached, the nodes do not agree, or a worker cannot start;
/// each names the node, the address or the program.
pub fn run(plan: &LaunchPlan, rt: &Runtime) -> Result<Outcome, LaunchError> {
    install_signals();
    let (client, server, port) = meet(plan, rt)?;
    for n in &plan.notices {
        eprintln!("ringctl launch: {n}");
    }
    // The node rank is known once joined (join order decides it in c10d's form).
    let mut plan = plan.clone();
    // A node that refuses the join still says it is leaving, so that node 0 keeps the store
    // until every node has read what it needs to refuse too.
    let mut claimed = false;
    let joined = join(&mut plan, rt, &client, &mut claimed);
    let result = joined.and_then(|layout| generations(&plan, rt, &client, &layout, port));
    // Only a launcher that holds its rank says it leaves: another's `exit/<k>` would let the
    // store go before node k read the end.
    if claimed {
        sign_off(&plan, port);
    }
    if let Some(server) = server {
        // Keep serving until every node has read how the job ended.
        let deadline = Instant::now() + EXIT_WAIT;
        for k in 0..plan.nnodes {
            let left = deadline.saturating_duration_since(Instant::now());
            if client.get(&format!("exit/{k}"), left).is_err() {
                break;
            }
        }
        drop(server);
    }
    result
}

/// Says this node is leaving (`exit/<node>`), through a fresh connection that gives up after a
/// few seconds: when node 0's store is gone there is nobody to tell, and the main client would
/// keep trying to reconnect for the whole rendezvous timeout.
fn sign_off(plan: &LaunchPlan, port: u16) {
    let opts = TcpStoreOptions::default()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(3))
        .with_prefix(format!("ringmaster-launch/{}", plan.run_id));
    if let Ok(c) = TcpStoreClient::connect(&endpoint(&plan.master_addr, port), opts) {
        let _ = c.set(&format!("exit/{}", plan.node_rank), b"1");
    }
}

/// `host:port`, with IPv6 literals bracketed.
fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The rank layout the nodes agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    world: usize,
    /// First global rank of this node.
    base: usize,
    /// The longest monitor interval of any node (this node's at least): how long the slowest
    /// node may take to see one of its workers end.
    slowest_monitor: Duration,
}

/// Serves the store (on node 0; in join order, on the machine MASTER_ADDR names), and
/// connects to it.
fn meet(
    plan: &LaunchPlan,
    rt: &Runtime,
) -> Result<(TcpStoreClient, Option<TcpStoreServer>, u16), LaunchError> {
    let host = plan.master_addr.as_str();
    let bracket = endpoint;
    let want = match plan.master_port {
        Port::Fixed(p) => p,
        Port::Ephemeral => 0,
    };
    // In join order every launcher on MASTER_ADDR's machine tries to serve; the first one
    // does and the others (the port taken) are its clients, as torchrun's c10d agents are.
    // Any other reason not to serve is an error, not a silent turn to a store that may not be
    // this job's.
    let local_server = if plan.join_order && is_this_machine(host, &rt.hostname) {
        match TcpStoreServer::serve_for(host, want) {
            Ok(server) => Some(server),
            Err(e) if e.to_string().contains("Address already in use") => {
                eprintln!(
                    "ringctl launch: {} is already served on this machine: joining it as a \
                     client",
                    bracket(host, want)
                );
                None
            }
            Err(e) => {
                return Err(err(format!(
                    "cannot serve the rendezvous store on MASTER_ADDR:MASTER_PORT ({}): {e}",
                    bracket(host, want)
                )));
            }
        }
    } else {
        None
    };
    let (server, port) = if let Some(server) = local_server {
        let port = server.local_addr().port();
        (Some(server), port)
    } else if !plan.join_order && plan.node_rank == 0 {
        let server = TcpStoreServer::serve_for(host, want).map_err(|e| {
            err(format!(
                "node 0 cannot serve the rendezvous store on MASTER_ADDR:MASTER_PORT \
                     ({}): {e}",
                bracket(host, want)
            ))
        })?;
        let port = server.local_addr().port();
        (Some(server), port)
    } else {
        match plan.master_port {
            Port::Fixed(p) => (None, p),
            Port::Ephemeral => {
                return Err(err(
                    "a free MASTER_PORT can only be picked for a single-node run: give \
                     --master-port (MASTER_PORT) on every node",
                ));
            }
        }
    };
    let addr = bracket(host, port);
    let who = if plan.join_order {
        "this node".to_owned()
    } else {
        format!("node {}", plan.node_rank)
    };
    let opts = TcpStoreOptions::default()
        .with_connect_timeout(plan.rdzv_timeout)
        .with_timeout(plan.rdzv_timeout)
        .with_prefix(format!("ringmaster-launch/{}", plan.run_id));
    let client = TcpStoreClient::connect(&addr, opts).map_err(|e| {
        err(format!(
            "{who}: cannot reach the rendezvous store at MASTER_ADDR:MASTER_PORT ({addr}): {e}"
        ))
    })?;
    Ok((client, server, port))
}

/// What must agree between nodes, as (what, value) pairs.
fn agreement(plan: &LaunchPlan) -> Result<Vec<(String, String)>, LaunchError> {
    let mut out = vec![
        ("nnodes".to_owned(), plan.nnodes.to_string()),
        ("max_restarts".to_owned(), plan.max_restarts.to_string()),
        ("program".to_owned(), describe(&plan.program)),
    ];
    if let Some(slots) = &plan.node_slots {
        out.push(("every node's worker count".to_owned(), format!("{slots:?}")));
    }
    if let Program::Recipe { file, .. } = &plan.program {
        let text = std::fs::read(file).map_err(|e| err(format!("training config {file}: {e}")))?;
        out.push((
            "training config contents".to_owned(),
            format!("{:016x}", fnv1a(&text)),
        ));
    }
    Ok(out)
}

fn describe(p: &Program) -> String {
    match p {
        Program::Recipe { file, overrides } => {
            let name = std::path::Path::new(file)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| file.clone());
            format!("trainer {name} {}", overrides.join(" "))
                .trim_end()
                .to_owned()
        }
        Program::Script { script, args, .. } => format!("{script} {}", args.join(" ")),
        Program::Module { module, args, .. } => format!("-m {module} {}", args.join(" ")),
        Program::Exec(argv) => argv.join(" "),
        Program::TrainerFlags(flags) => format!("trainer {}", flags.join(" ")),
    }
}

/// FNV-1a, 64 bits: a content fingerprint that every build computes alike.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether `host` (MASTER_ADDR) names this machine: loopback, an address of one of its
/// interfaces, its host name, or a name that resolves to one of its addresses.
fn is_this_machine(host: &str, hostname: &str) -> bool {
    use std::net::ToSocketAddrs;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "localhost" || host.eq_ignore_ascii_case(hostname) {
        return true;
    }
    let local = |ip: std::net::IpAddr| ip.is_loopback() || interface_of(&ip.to_string()).is_some();
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => local(ip),
        Err(_) => (host, 0)
            .to_socket_addrs()
            .is_ok_and(|mut addrs| addrs.any(|a| local(a.ip()))),
    }
}

/// Claims this node's rank (in join order: the first free one, which becomes `plan.node_rank`),
/// reads every node's entry, checks they agree and computes the layout.
fn join(
    plan: &mut LaunchPlan,
    rt: &Runtime,
    client: &TcpStoreClient,
    claimed: &mut bool,
) -> Result<Layout, LaunchError> {
    let me = NodeInfo {
        host: rt.hostname.clone(),
        nonce: format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
        nproc: plan.nproc,
        monitor_ms: u64::try_from(plan.monitor_interval.as_millis()).unwrap_or(u64::MAX),
        agree: agreement(plan)?,
    };
    let mine = serde_json::to_vec(&me).expect("node info serializes");
    if plan.join_order {
        let mut claimed = None;
        for k in 0..plan.nnodes {
            let held = client
                .compare_set(&format!("node/{k}"), b"", &mine)
                .map_err(|e| err(format!("joining the job: {e}")))?;
            if held == mine {
                claimed = Some(k);
                break;
            }
        }
        plan.node_rank = claimed.ok_or_else(|| {
            err(format!(
                "all {} node ranks of run {} are taken: is --nnodes right on every node, or does \
                 another job use this run id?",
                plan.nnodes, plan.run_id
            ))
        })?;
        eprintln!(
            "ringctl launch: joined run {} as node {} of {}",
            plan.run_id, plan.node_rank, plan.nnodes
        );
    }
    let key = format!("node/{}", plan.node_rank);
    let held = client
        .compare_set(&key, b"", &mine)
        .map_err(|e| err(format!("joining the job: {e}")))?;
    if held != mine {
        let other: Option<NodeInfo> = serde_json::from_slice(&held).ok();
        return Err(err(format!(
            "node rank {} is already taken by {} in run {}: give each node its own \
             --node-rank (NODE_RANK)",
            plan.node_rank,
            other
                .map(|o| o.host)
                .unwrap_or_else(|| "another launcher".into()),
            plan.run_id
        )));
    }
    *claimed = true;
    let deadline = Instant::now() + plan.rdzv_timeout;
    let mut nodes = Vec::with_capacity(plan.nnodes);
    for k in 0..plan.nnodes {
        let raw = wait_key(client, &format!("node/{k}"), deadline)?.ok_or_else(|| {
            err(format!(
                "node {}: node {k} did not join within {:?} (is its launcher started, with \
                 --nnodes {} and the same MASTER_ADDR:MASTER_PORT and run id?)",
                plan.node_rank, plan.rdzv_timeout, plan.nnodes
            ))
        })?;
        let info: NodeInfo = serde_json::from_slice(&raw).map_err(|e| {
            err(format!(
                "node {k}'s entry in the store is not readable: {e}"
            ))
        })?;
        nodes.push(info);
    }
    let first = &nodes[0];
    for (k, n) in nodes.iter().enumerate().skip(1) {
        if let Some(((what, theirs), (_, ours))) = n
            .agree
            .iter()
            .zip(&first.agree)
            .find(|((a, x), (b, y))| a != b || x != y)
        {
            return Err(err(format!(
                "node {k} ({}) does not run what node 0 ({}) runs: {what} is `{theirs}` there, \
                 `{ours}` on node 0",
                n.host, first.host
            )));
        }
        if n.agree.len() != first.agree.len() {
            return Err(err(format!(
                "node {k} ({}) does not run what node 0 ({}) runs",
                n.host, first.host
            )));
        }
    }
    // Entries come from the network: bounded before they size anything.
    if let Some((k, n)) = nodes
        .iter()
        .enumerate()
        .find(|(_, n)| n.nproc == 0 || n.nproc > MAX_WORKERS_PER_NODE)
    {
        return Err(err(format!(
            "node {k} ({}) says it runs {} workers; 1 to {MAX_WORKERS_PER_NODE} are allowed",
            n.host, n.nproc
        )));
    }
    if let Some((k, n)) = nodes
        .iter()
        .enumerate()
        .find(|(_, n)| n.monitor_ms > MAX_MONITOR_MS)
    {
        return Err(err(format!(
            "node {k} ({}) says it polls its workers every {} ms; at most {MAX_MONITOR_MS} \
             (--monitor-interval 3600) is allowed",
            n.host, n.monitor_ms
        )));
    }
    let base = nodes[..plan.node_rank].iter().map(|n| n.nproc).sum();
    let world = nodes.iter().map(|n| n.nproc).sum();
    let slowest_ms = nodes.iter().map(|n| n.monitor_ms).max().unwrap_or(0);
    let slowest_monitor = plan.monitor_interval.max(Duration::from_millis(slowest_ms));
    Ok(Layout {
        world,
        base,
        slowest_monitor,
    })
}

/// Waits for `key` until `deadline` in one-second slices, so that a signal to the launcher is
/// acted on within a second; `None` when the deadline passed.
fn wait_key(
    client: &TcpStoreClient,
    key: &str,
    deadline: Instant,
) -> Result<Option<Vec<u8>>, LaunchError> {
    loop {
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            return Err(err(format!(
                "stopped by signal {sig} while waiting for `{key}`"
            )));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match client.get(key, left.min(Duration::from_secs(1))) {
            Ok(v) => return Ok(Some(v)),
            // The client's wait timing out (its error says so); the deadline decides.
            Err(e) if e.to_string().contains("not set within") => {}
            Err(e) => return Err(err(format!("waiting for `{key}` in the store: {e}"))),
        }
    }
}

/// How one generation ended.
enum GenEnd {
    Succeeded,
    /// The line naming the rank that failed first, and its returncode.
    Failed(String, Option<i32>),
    /// The launcher was told to stop (SIGINT/SIGTERM): no restart.
    Stopped(String),
}

fn generations(
    plan: &LaunchPlan,
    rt: &Runtime,
    client: &TcpStoreClient,
    layout: &Layout,
    port: u16,
) -> Result<Outcome, LaunchError> {
    let mut g: u64 = 0;
    loop {
        if g > 0
            && let Some(why) = restart_barrier(plan, client, port, g)?
        {
            return Ok(Outcome {
                code: 1,
                failure: Some(why),
                restarts: g - 1,
                rank_returncode: None,
            });
        }
        let mut workers = match spawn(plan, rt, layout, port, g) {
            Ok(w) => w,
            Err(e) => {
                // The other nodes' workers must not wait for ranks that never started.
                let _ =
                    client.compare_set(&format!("gen/{g}/failed"), b"", &cause_value(None, &e.0));
                return Err(e);
            }
        };
        match watch(plan, client, &mut workers, g, layout, rt.stop_grace) {
            Ok(GenEnd::Succeeded) => {
                return Ok(Outcome {
                    code: 0,
                    failure: None,
                    restarts: g,
                    rank_returncode: None,
                });
            }
            Ok(GenEnd::Failed(why, _)) if g < u64::from(plan.max_restarts) => {
                eprintln!(
                    "ringctl launch: node {}: {why}; restarting every node's workers (restart {} \
                     of {})",
                    plan.node_rank,
                    g + 1,
                    plan.max_restarts
                );
                g += 1;
            }
            Ok(GenEnd::Failed(why, rc)) => {
                return Ok(Outcome {
                    code: 1,
                    failure: Some(why),
                    restarts: g,
                    rank_returncode: rc,
                });
            }
            Ok(GenEnd::Stopped(why)) => {
                return Ok(Outcome {
                    code: 1,
                    failure: Some(why),
                    restarts: g,
                    rank_returncode: None,
                });
            }
            Err(e) => {
                stop(&mut workers, rt.stop_grace);
                return Err(e);
            }
        }
    }
}

/// Before generation `g` starts anywhere: every node has stopped generation `g - 1`'s workers
/// (`gen/<g>/ready/<k>`), then node 0 clears what those workers left in the store outside the
/// launchers' own keys (torch processes told `TORCHELASTIC_USE_AGENT_STORE` expect a fresh
/// store on every restart, as torchrun gives them) and says so (`gen/<g>/cleared`). A stop
/// (`stop`) ends the wait on every node: `Some(reason)`.
fn restart_barrier(
    plan: &LaunchPlan,
    client: &TcpStoreClient,
    port: u16,
    g: u64,
) -> Result<Option<String>, LaunchError> {
    client
        .set(&format!("gen/{g}/ready/{}", plan.node_rank), b"1")
        .map_err(|e| lost(plan, &e))?;
    let deadline = Instant::now() + plan.rdzv_timeout;
    let wait_for = |key: String| -> Result<Option<String>, LaunchError> {
        loop {
            if let Some(why) = signalled(plan, client) {
                return Ok(Some(why));
            }
            if let Some(why) = stopped(plan, client)? {
                return Ok(Some(why));
            }
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "node {}: the other nodes did not get ready for restart {g} within {:?} \
                     (`{key}`)",
                    plan.node_rank, plan.rdzv_timeout
                )));
            }
            // Returns as soon as the key is set; a stop is looked at between slices.
            if wait_slice(client, &key, plan.monitor_interval).map_err(|e| lost(plan, &e))? {
                return Ok(None);
            }
        }
    };
    for k in 0..plan.nnodes {
        if let Some(why) = wait_for(format!("gen/{g}/ready/{k}"))? {
            return Ok(Some(why));
        }
    }
    if plan.node_rank == 0 {
        clear_worker_keys(plan, port).map_err(|e| lost(plan, &e))?;
        client
            .set(&format!("gen/{g}/cleared"), b"1")
            .map_err(|e| lost(plan, &e))?;
    }
    wait_for(format!("gen/{g}/cleared"))
}

/// Deletes every key of the store outside `ringmaster-launch/` (what the workers wrote).
fn clear_worker_keys(
    plan: &LaunchPlan,
    port: u16,
) -> Result<(), ringmaster_collectives::CommError> {
    let opts = TcpStoreOptions::default()
        .with_connect_timeout(plan.rdzv_timeout)
        .with_timeout(plan.rdzv_timeout);
    let all = TcpStoreClient::connect(&endpoint(&plan.master_addr, port), opts)?;
    for key in all.list_keys()? {
        if !key.starts_with("ringmaster-launch/") {
            all.delete(&key)?;
        }
    }
    Ok(())
}

/// If this launcher got a signal: tells every node (`stop`, the first reason wins) and
/// returns the reason.
fn signalled(plan: &LaunchPlan, client: &TcpStoreClient) -> Option<String> {
    let sig = SIGNALLED.load(Ordering::SeqCst);
    if sig == 0 {
        return None;
    }
    let why = format!(
        "the launcher on node {} was stopped by signal {sig}",
        plan.node_rank
    );
    let _ = client.compare_set("stop", b"", why.as_bytes());
    Some(why)
}

/// The reason a launcher stopped the job (`stop`: a signal), if one did.
fn stopped(plan: &LaunchPlan, client: &TcpStoreClient) -> Result<Option<String>, LaunchError> {
    if !client.check(&["stop"]).map_err(|e| lost(plan, &e))? {
        return Ok(None);
    }
    let why = client
        .get("stop", plan.monitor_interval)
        .map_err(|e| lost(plan, &e))?;
    Ok(Some(String::from_utf8_lossy(&why).into_owned()))
}

fn lost(plan: &LaunchPlan, e: &dyn std::fmt::Display) -> LaunchError {
    err(format!(
        "node {}: lost the rendezvous store at {} ({e}); did the launcher serving it exit?",
        plan.node_rank, plan.master_addr
    ))
}

/// One worker process and where its output goes.
struct Worker {
    local_rank: usize,
    rank: usize,
    child: Child,
    pumps: Vec<std::thread::JoinHandle<()>>,
    exit: Option<std::process::ExitStatus>,
}

/// The argv of a worker of `program`.
/// Where this node's workers sit in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Ranks in the job.
    pub world: usize,
    /// This node's first global rank.
    pub base: usize,
    /// The store's port (MASTER_PORT as served).
    pub port: u16,
    /// The address this node's workers advertise (RINGMASTER_NODE_ADDR).
    pub node_addr: String,
    /// This machine's name (RINGMASTER_NODE).
    pub hostname: String,
    /// The network interface that holds `node_addr`, when one does (GLOO_SOCKET_IFNAME).
    pub interface: Option<String>,
}

/// What the launcher adds to its own environment for this node's worker `local_rank` in
/// `generation`: the contract of [`crate::env`], the store flags that make trainers and torch
/// processes clients of the launchers' store, the dialect's own variables (ACCELERATE_*, ...),
/// which win, and defaults where neither the launcher's environment (`inherited` says whether
/// it has a variable) nor the dialect sets them. The defaults are the launcher's the plan
/// reproduces ([`WorkerEnv`]): under torchrun's rules OMP_NUM_THREADS=1 when the node runs
/// several workers, and TORCH_NCCL_ASYNC_ERROR_HANDLING=1; under DeepSpeed's neither; a single
/// plain process gets none of torchrun's variables at all. On several nodes,
/// GLOO_SOCKET_IFNAME = the interface of this node's address: without it, gloo (torch's CPU
/// backend) binds the address the host name resolves to, which is loopback on many machines
/// (Debian's /etc/hosts maps it to 127.0.1.1): the ranks of other nodes cannot connect, the
/// most common multi-node failure of torch's own launchers.
pub fn worker_env(
    plan: &LaunchPlan,
    at: &Placement,
    local_rank: usize,
    generation: u64,
    inherited: &dyn Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let sets = |k: &str| inherited(k) || plan.extra_env.iter().any(|(n, _)| n == k);
    let mut env = contract_env(&Contract {
        rank: at.base + local_rank,
        local_rank,
        world_size: at.world,
        local_world_size: plan.nproc,
        node_rank: plan.node_rank,
        nnodes: plan.nnodes,
        master_addr: &plan.master_addr,
        master_port: u32::from(at.port),
        visible_devices: plan.visible_devices.as_deref(),
        restart_count: generation,
        max_restarts: u64::from(plan.max_restarts),
        run_id: &plan.run_id,
        job_name: &plan.run_id,
        generation,
        role: &plan.role,
    });
    env.extend(
        [
            ("RINGMASTER_STORE_SERVED", "1"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("RINGMASTER_NODE", at.hostname.as_str()),
            ("RINGMASTER_NODE_ADDR", at.node_addr.as_str()),
            (
                "RINGMASTER_RDZV_TIMEOUT",
                &plan.rdzv_timeout.as_secs().max(1).to_string(),
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    match plan.worker_env {
        WorkerEnv::Torchrun => {
            // torchrun (run.py): OMP_NUM_THREADS=1 if unset and nproc-per-node > 1; its agent
            // (local_elastic_agent.py): TORCH_NCCL_ASYNC_ERROR_HANDLING, default 1.
            if plan.nproc > 1 {
                env.extend(omp_default(
                    inherited("OMP_NUM_THREADS"),
                    sets("OMP_NUM_THREADS"),
                ));
            }
            if !sets("TORCH_NCCL_ASYNC_ERROR_HANDLING") {
                env.push(("TORCH_NCCL_ASYNC_ERROR_HANDLING".to_owned(), "1".to_owned()));
            }
        }
        WorkerEnv::DeepSpeed => {}
        WorkerEnv::Single => {
            // No distributed launcher: only Ringmaster's own names (the job, the generation,
            // the node) and the devices stay; not the store flags either.
            env.retain(|(k, _)| {
                k == "CUDA_VISIBLE_DEVICES"
                    || (k.starts_with("RINGMASTER_")
                        && k != "RINGMASTER_STORE_SERVED"
                        && k != "RINGMASTER_RDZV_TIMEOUT")
            });
        }
    }
    let loopback = at
        .node_addr
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback());
    if plan.nnodes > 1
        && !loopback
        && !sets("GLOO_SOCKET_IFNAME")
        && let Some(i) = &at.interface
    {
        env.push(("GLOO_SOCKET_IFNAME".to_owned(), i.clone()));
    }
    env.extend(plan.extra_env.iter().cloned());
    env
}

/// The network interface that holds `addr` on this machine, if any.
pub fn interface_of(addr: &str) -> Option<String> {
    let ip: std::net::IpAddr = addr.trim_matches(['[', ']']).parse().ok()?;
    nix::ifaddrs::getifaddrs().ok()?.find_map(|i| {
        let a = i.address?;
        let found = match ip {
            std::net::IpAddr::V4(v4) => a.as_sockaddr_in().is_some_and(|s| s.ip() == v4),
            std::net::IpAddr::V6(v6) => a.as_sockaddr_in6().is_some_and(|s| s.ip() == v6),
        };
        found.then_some(i.interface_name)
    })
}

/// The command line of this node's worker `local_rank`: the trainer and the training config,
/// or the program, with `--local_rank=N` (DeepSpeed) or `--local-rank=N`
/// (torch.distributed.launch) after the script where the dialect passes it.
pub fn worker_argv(plan: &LaunchPlan, trainer: &std::path::Path, local_rank: usize) -> Vec<String> {
    let lr = plan
        .local_rank_arg
        .map(|flag| format!("{flag}={local_rank}"));
    let mut out: Vec<String> = Vec::new();
    match &plan.program {
        Program::Recipe { file, overrides } => {
            out.push(trainer.display().to_string());
            out.push(file.clone());
            out.extend(overrides.iter().cloned());
        }
        Program::TrainerFlags(flags) => {
            out.push(trainer.display().to_string());
            out.extend(flags.iter().cloned());
        }
        Program::Script {
            python,
            script,
            args,
        } => {
            out.extend([python.clone(), "-u".into(), script.clone()]);
            out.extend(lr);
            out.extend(args.iter().cloned());
        }
        Program::Module {
            python,
            module,
            args,
        } => {
            out.extend([python.clone(), "-u".into(), "-m".into(), module.clone()]);
            out.extend(lr);
            out.extend(args.iter().cloned());
        }
        Program::Exec(cmd) => {
            out.push(cmd[0].clone());
            out.extend(lr);
            out.extend(cmd[1..].iter().cloned());
        }
    }
    out
}

/// The address this node's workers advertise to the others: `--local-addr`, else loopback
/// for one node, else the local address of this machine's route to MASTER_ADDR (in its
/// address family).
fn node_addr(plan: &LaunchPlan, port: u16) -> Result<String, LaunchError> {
    use std::net::ToSocketAddrs;
    if let Some(a) = &plan.local_addr {
        return Ok(a.clone());
    }
    if plan.nnodes == 1 {
        return Ok("127.0.0.1".into());
    }
    let host = plan
        .master_addr
        .trim_start_matches('[')
        .trim_end_matches(']');
    let route = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .and_then(|master| {
            let any = if master.is_ipv6() {
                "[::]:0"
            } else {
                "0.0.0.0:0"
            };
            let s = std::net::UdpSocket::bind(any).ok()?;
            s.connect(master).ok()?;
            s.local_addr().ok()
        });
    route.map(|a| a.ip().to_string()).ok_or_else(|| {
        err(format!(
            "node {}: cannot tell this machine's address toward MASTER_ADDR {}; give \
             --local-addr",
            plan.node_rank, plan.master_addr
        ))
    })
}

/// Starts this node's workers; if one cannot start, those already started are stopped.
fn spawn(
    plan: &LaunchPlan,
    rt: &Runtime,
    layout: &Layout,
    port: u16,
    generation: u64,
) -> Result<Vec<Worker>, LaunchError> {
    let mut workers = Vec::with_capacity(plan.nproc);
    match spawn_into(plan, rt, layout, port, generation, &mut workers) {
        Ok(()) => Ok(workers),
        Err(e) => {
            stop(&mut workers, rt.stop_grace);
            Err(e)
        }
    }
}

fn spawn_into(
    plan: &LaunchPlan,
    rt: &Runtime,
    layout: &Layout,
    port: u16,
    generation: u64,
    workers: &mut Vec<Worker>,
) -> Result<(), LaunchError> {
    let node_addr = node_addr(plan, port)?;
    let at = Placement {
        world: layout.world,
        base: layout.base,
        port,
        interface: interface_of(&node_addr),
        node_addr,
        hostname: rt.hostname.clone(),
    };
    let inherited = |k: &str| std::env::var_os(k).is_some();
    let logs = log_root(plan, generation)?;
    for local_rank in 0..plan.nproc {
        let rank = layout.base + local_rank;
        let env = worker_env(plan, &at, local_rank, generation, &inherited);
        let argv = worker_argv(plan, &rt.trainer, local_rank);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .envs(env)
            // The launchers' own ways of meeting must not leak into the workers'.
            .env_remove("RINGMASTER_COORDINATOR")
            .env_remove("RINGMASTER_STORE_DIR")
            .stdin(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // A launcher killed outright (SIGKILL, OOM) takes its workers with it: they are in
        // their own process groups, out of reach of a signal to the launcher's group.
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let streams = streams(&plan.logs, local_rank);
        let files = match &logs {
            Some(root) => {
                let dir = root.join(local_rank.to_string());
                std::fs::create_dir_all(&dir)
                    .map_err(|e| err(format!("--log-dir {}: {e}", dir.display())))?;
                Some(dir)
            }
            None => None,
        };
        // DeepSpeed's --enable_each_rank_log: both streams of the rank to one file, not the
        // console.
        let each = match &plan.each_rank_log {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| err(format!("--enable_each_rank_log {}: {e}", dir.display())))?;
                let path = dir.join(format!("{}_rank{rank}.log", timestamp()));
                let f = std::fs::File::create(&path)
                    .map_err(|e| err(format!("--enable_each_rank_log {}: {e}", path.display())))?;
                Some(std::sync::Arc::new(std::sync::Mutex::new(f)))
            }
            None => None,
        };
        let piped =
            each.is_some() || files.is_some() || !streams.console_out || !streams.console_err;
        if piped {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = cmd.spawn().map_err(|e| {
            err(format!(
                "node {}: cannot start local rank {local_rank} (`{}`): {e}",
                plan.node_rank, argv[0]
            ))
        })?;
        let mut pumps = Vec::new();
        if piped {
            let prefix = format!("[{}{local_rank}]:", plan.role);
            let out = child.stdout.take().expect("piped");
            let errs = child.stderr.take().expect("piped");
            let file = |name: &str, to_file: bool| {
                if each.is_some() {
                    return each.clone();
                }
                files
                    .as_ref()
                    .filter(|_| to_file)
                    .and_then(|d| std::fs::File::create(d.join(name)).ok())
                    .map(|f| std::sync::Arc::new(std::sync::Mutex::new(f)))
            };
            let console = each.is_none();
            pumps.push(pump(
                out,
                file("stdout.log", streams.file_out),
                (console && streams.console_out).then(|| prefix.clone()),
                false,
            ));
            pumps.push(pump(
                errs,
                file("stderr.log", streams.file_err),
                (console && streams.console_err).then_some(prefix),
                true,
            ));
        }
        workers.push(Worker {
            local_rank,
            rank,
            child,
            pumps,
            exit: None,
        });
    }
    Ok(())
}

/// Where one worker's two streams go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Streams {
    console_out: bool,
    console_err: bool,
    file_out: bool,
    file_err: bool,
}

/// torchrun's rules: with `--log-dir`, a redirected stream goes to its file only, a teed one to
/// its file and the console; `--local-ranks-filter` keeps the others off the console.
fn streams(logs: &crate::plan::LogPolicy, local_rank: usize) -> Streams {
    let bit = |v: &[u8], b: u8| v.get(local_rank).is_some_and(|x| x & b != 0);
    let files = logs.dir.is_some();
    let shown = logs
        .console_ranks
        .as_ref()
        .is_none_or(|r| r.contains(&local_rank));
    let (r, t) = (&logs.redirects, &logs.tee);
    Streams {
        file_out: files && (bit(r, 1) || bit(t, 1)),
        file_err: files && (bit(r, 2) || bit(t, 2)),
        console_out: shown && (!(files && bit(r, 1)) || bit(t, 1)),
        console_err: shown && (!(files && bit(r, 2)) || bit(t, 2)),
    }
}

/// `<dir>/<run_id>_<pid>/attempt_<g>/` when `--log-dir` is given.
fn log_root(plan: &LaunchPlan, generation: u64) -> Result<Option<PathBuf>, LaunchError> {
    let Some(dir) = &plan.logs.dir else {
        return Ok(None);
    };
    let root = dir
        .join(format!("{}_{}", plan.run_id, std::process::id()))
        .join(format!("attempt_{generation}"));
    std::fs::create_dir_all(&root)
        .map_err(|e| err(format!("--log-dir {}: {e}", root.display())))?;
    Ok(Some(root))
}

/// Longest piece of a worker's output handled as one line (longer ones are cut into pieces).
const MAX_LINE: usize = 64 * 1024;

/// Copies a worker's stream to a file and/or the launcher's console, each line prefixed on the
/// console. Lines end at `\n` or `\r` (progress bars redraw with `\r`) and are cut at
/// [`MAX_LINE`]; a console that went away (a closed pipe) is not an error of the worker's.
fn pump(
    from: impl Read + Send + 'static,
    file: Option<std::sync::Arc<std::sync::Mutex<std::fs::File>>>,
    console: Option<String>,
    stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let emit = |line: &[u8]| {
            if let Some(f) = &file {
                let _ = f.lock().map(|mut f| f.write_all(line));
            }
            if let Some(prefix) = &console {
                let text = String::from_utf8_lossy(line);
                let text = text.trim_end_matches(['\n', '\r']);
                let _ = if stderr {
                    writeln!(std::io::stderr().lock(), "{prefix}{text}")
                } else {
                    writeln!(std::io::stdout().lock(), "{prefix}{text}")
                };
            }
        };
        let mut reader = BufReader::new(from);
        let mut line: Vec<u8> = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &b in &chunk[..n] {
                line.push(b);
                if b == b'\n' || b == b'\r' || line.len() >= MAX_LINE {
                    emit(&line);
                    line.clear();
                }
            }
        }
        if !line.is_empty() {
            emit(&line);
        }
    })
}

/// UTC now as `YYYYmmddHHMMSS` (DeepSpeed's per-rank log names).
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Waits for this generation's end on this node, and for its end on every node.
fn watch(
    plan: &LaunchPlan,
    client: &TcpStoreClient,
    workers: &mut [Worker],
    g: u64,
    layout: &Layout,
    grace: Duration,
) -> Result<GenEnd, LaunchError> {
    let failed_key = format!("gen/{g}/failed");
    let mut said_done = false;
    // A rank whose collective failed or timed out (the trainer's exits 4 and 3) usually reacts
    // to another's death, on this node or another. Such a failure alone is claimed only after
    // two of the slowest node's monitor intervals in which no node claimed a cause (the node of
    // the rank that died finds it within one of its own polls, whatever this node's interval);
    // any other failure is claimed at once.
    let mut reaction: Option<(String, Option<i32>, Instant)> = None;
    loop {
        // Of the workers found failed in one poll, the root cause is claimed.
        let mut failed: Vec<(bool, String, Option<i32>)> = Vec::new();
        for w in workers.iter_mut().filter(|w| w.exit.is_none()) {
            if let Some(status) = w.child.try_wait().map_err(|e| err(e.to_string()))? {
                w.exit = Some(status);
                if !status.success() {
                    let why = format!(
                        "rank {} (node {}, local rank {}) {}",
                        w.rank,
                        plan.node_rank,
                        w.local_rank,
                        describe_exit(status)
                    );
                    failed.push((
                        matches!(status.code(), Some(3 | 4)),
                        why,
                        Some(returncode(status)),
                    ));
                }
            }
        }
        let claim = match failed.into_iter().min_by_key(|(reacted, ..)| *reacted) {
            Some((false, why, rc)) => Some((why, rc)),
            Some((true, why, rc)) => {
                reaction.get_or_insert((why, rc, Instant::now()));
                None
            }
            None => None,
        };
        let claim = claim.or_else(|| {
            reaction
                .take_if(|(.., at)| at.elapsed() >= layout.slowest_monitor * 2)
                .map(|(why, rc, _)| (why, rc))
        });
        if let Some((why, rc)) = claim {
            client
                .compare_set(&failed_key, b"", &cause_value(rc, &why))
                .map_err(|e| lost(plan, &e))?;
        }
        // A stop is not a failure: no node restarts, and every node sees it (the restart
        // barrier watches the same key), whatever failed before.
        if let Some(why) = signalled(plan, client) {
            stop(workers, grace);
            return Ok(GenEnd::Stopped(why));
        }
        if let Some(why) = stopped(plan, client)? {
            stop(workers, grace);
            return Ok(GenEnd::Stopped(why));
        }
        if client
            .check(&[failed_key.as_str()])
            .map_err(|e| lost(plan, &e))?
        {
            let (rc, why) = client
                .get(&failed_key, plan.monitor_interval)
                .map(|v| parse_cause(&v))
                .map_err(|e| lost(plan, &e))?;
            stop(workers, grace);
            return Ok(GenEnd::Failed(why, rc));
        }
        // A failure not claimed yet is no success.
        if reaction.is_none() && workers.iter().all(|w| w.exit.is_some()) {
            if !said_done {
                client
                    .set(&format!("gen/{g}/done/{}", plan.node_rank), b"1")
                    .map_err(|e| lost(plan, &e))?;
                said_done = true;
            }
            let keys: Vec<String> = (0..plan.nnodes)
                .map(|k| format!("gen/{g}/done/{k}"))
                .collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            if client.check(&keys).map_err(|e| lost(plan, &e))? {
                stop(workers, grace);
                return Ok(GenEnd::Succeeded);
            }
        }
        // The pause between polls of the workers, cut short when a node claims a failure.
        wait_slice(client, &failed_key, plan.monitor_interval).map_err(|e| lost(plan, &e))?;
    }
}

/// Waits up to `slice` for `key` (the store answers as soon as it is set): whether it is set.
fn wait_slice(
    client: &TcpStoreClient,
    key: &str,
    slice: Duration,
) -> Result<bool, ringmaster_collectives::CommError> {
    match client.wait(&[key], slice) {
        Ok(()) => Ok(true),
        Err(e) if e.to_string().contains("not set within") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Python's `returncode` of an exited worker: its exit code, or `-N` for signal N.
fn returncode(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => -s,
        _ => 1,
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
}

/// Stops every worker's process group: SIGTERM, then SIGKILL after `grace` to what is left,
/// children of exited workers included (a group that no longer exists is skipped). A group id
/// is the worker's pid, which is not reused while the launcher has not reaped it.
fn stop(workers: &mut [Worker], grace: Duration) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let group = |w: &Worker| Pid::from_raw(w.child.id() as i32);
    for w in workers.iter() {
        let _ = killpg(group(w), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let alive = |w: &Worker| killpg(group(w), None).is_ok();
    while Instant::now() < deadline && workers.iter().any(alive) {
        for w in workers.iter_mut() {
            let _ = w.child.try_wait();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in workers.iter() {
        let _ = killpg(group(w), Signal::SIGKILL);
    }
    for w in workers.iter_mut() {
        let _ = w.child.wait();
    }
    join_pumps(workers);
}

fn join_pumps(workers: &mut [Worker]) {
    for w in workers.iter_mut() {
        for p in w.pumps.drain(..) {
            let _ = p.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_code_is_deepspeeds_rank_code_or_1() {
        let failed = |rc| Outcome {
            code: 1,
            failure: Some("x".into()),
            restarts: 0,
            rank_returncode: rc,
        };
        // launch.py's sys.exit(returncode): a code as it is, signal N as 256 - N.
        assert_eq!(failed(Some(7)).exit_code(Dialect::DeepSpeed), 7);
        assert_eq!(failed(Some(-9)).exit_code(Dialect::DeepSpeed), 247);
        assert_eq!(failed(None).exit_code(Dialect::DeepSpeed), 1);
        for d in [
            Dialect::Torchrun,
            Dialect::Accelerate,
            Dialect::LlamaFactory,
        ] {
            assert_eq!(failed(Some(7)).exit_code(d), 1);
        }
        let ok = Outcome {
            code: 0,
            failure: None,
            restarts: 0,
            rank_returncode: None,
        };
        assert_eq!(ok.exit_code(Dialect::DeepSpeed), 0);
        // The cause's value in the store carries the returncode with the line.
        assert_eq!(
            parse_cause(&cause_value(Some(-9), "rank 1 was killed")),
            (Some(-9), "rank 1 was killed".to_owned())
        );
        assert_eq!(
            parse_cause(&cause_value(None, "a: b\nc")),
            (None, "a: b\nc".to_owned())
        );
        assert_eq!(parse_cause(b"plain"), (None, "plain".to_owned()));
    }

    #[test]
    fn timestamps_are_utc_civil_time() {
        // Against date(1), to the minute (a second boundary may fall between the two).
        let ours = timestamp();
        let theirs = std::process::Command::new("date")
            .args(["-u", "+%Y%m%d%H%M%S"])
            .output()
            .unwrap();
        let theirs = String::from_utf8_lossy(&theirs.stdout);
        assert_eq!(ours.len(), 14);
        assert_eq!(&ours[..12], &theirs.trim()[..12], "{ours} vs {theirs}");
    }

    #[test]
    fn redirects_and_tee_route_streams_as_torchrun_does() {
        let logs = crate::plan::LogPolicy {
            dir: Some("/tmp/l".into()),
            redirects: vec![3, 1, 0, 0],
            tee: vec![0, 2, 0, 0],
            console_ranks: Some(vec![0, 1, 2]),
        };
        let s = |r| streams(&logs, r);
        // Rank 0: both streams to files only.
        assert_eq!(
            (
                s(0).file_out,
                s(0).file_err,
                s(0).console_out,
                s(0).console_err
            ),
            (true, true, false, false)
        );
        // Rank 1: out redirected; err teed (file and console).
        assert_eq!(
            (
                s(1).file_out,
                s(1).file_err,
                s(1).console_out,
                s(1).console_err
            ),
            (true, true, false, true)
        );
        // Rank 2: console only; rank 3 filtered off the console.
        assert_eq!((s(2).file_out, s(2).console_out), (false, true));
        assert_eq!((s(3).console_out, s(3).console_err), (false, false));
    }
}
