//! The data-parallel group of a training run: rank and world from the torchrun-style
//! environment the agent (or torchrun) sets, the communicators bootstrapped through the
//! coordinator's store (`RINGMASTER_COORDINATOR`), a directory (`RINGMASTER_STORE_DIR`), or a
//! TCP store at `MASTER_ADDR:MASTER_PORT` on PyTorch's TCPStore protocol (torchrun's, or served
//! by rank 0): see [`Meeting`].

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ringmaster_collectives::{Communicator, DirStore, RingConfig, Store, TcpRing, Transport};

/// Default timeout of one collective call (`ddp_timeout` overrides, in seconds).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// `RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`; (0, 1, 1) when unset (a process run by hand).
pub fn rank_world() -> Result<(usize, usize, usize)> {
    let get = |k: &str| -> Result<Option<usize>> {
        match std::env::var(k) {
            Err(_) => Ok(None),
            Ok(v) => v
                .parse()
                .map(Some)
                .with_context(|| format!("{k}={v} is not a number")),
        }
    };
    let rank = get("RANK")?.unwrap_or(0);
    let world = get("WORLD_SIZE")?.unwrap_or(1);
    let local = get("LOCAL_WORLD_SIZE")?.unwrap_or(world);
    if world == 0 || rank >= world {
        bail!("RANK {rank} is not below WORLD_SIZE {world}");
    }
    Ok((rank, world, local.max(1)))
}

/// What carries a run's collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fabric {
    /// The TCP ring on host buffers (the CPU backends).
    Ring,
    /// NCCL on CUDA device `device` (the CUDA backend).
    Nccl {
        /// The CUDA device ordinal.
        device: usize,
    },
}

impl Fabric {
    /// What the fabric means for a rank, in messages.
    fn describe(self) -> &'static str {
        match self {
            Fabric::Ring => "the CPU (TCP ring)",
            Fabric::Nccl { .. } => "CUDA (NCCL)",
        }
    }
}

/// Default time to reach the `MASTER_ADDR:MASTER_PORT` store (`RINGMASTER_RDZV_TIMEOUT`,
/// seconds, overrides), as torchrun's rendezvous timeout.
pub const DEFAULT_RDZV_TIMEOUT: Duration = Duration::from_secs(600);

/// Where the ranks of a run meet, from the environment, in this order:
/// - `RINGMASTER_STORE_DIR`: a directory shared by the processes (tests, benchmarks);
/// - `RINGMASTER_COORDINATOR`: the coordinator's rendezvous (ranks an agent started);
/// - `MASTER_ADDR` + `MASTER_PORT`: a TCP store on PyTorch's TCPStore protocol. It is served
///   there by torchrun (workers see `TORCHELASTIC_USE_AGENT_STORE=True`) or by Ringmaster's own
///   launcher (`RINGMASTER_STORE_SERVED=1`); otherwise rank 0 serves it, as torch's rank 0 does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Meeting {
    Dir(String),
    Coordinator(String),
    Master {
        /// `MASTER_ADDR:MASTER_PORT`.
        addr: String,
        /// Whether this process serves the store (rank 0 when no launcher does).
        serve: bool,
        /// How long to try to reach it.
        timeout: Duration,
    },
}

impl Meeting {
    /// Reads the environment through `var` (a test passes its own).
    ///
    /// # Errors
    /// No meeting point for a run of several ranks, or a malformed `MASTER_PORT` or timeout.
    pub fn from_env(
        rank: usize,
        world: usize,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Meeting> {
        let set = |k: &str| var(k).filter(|v| !v.is_empty());
        if let Some(d) = set("RINGMASTER_STORE_DIR") {
            return Ok(Meeting::Dir(d));
        }
        if let Some(a) = set("RINGMASTER_COORDINATOR") {
            return Ok(Meeting::Coordinator(a));
        }
        let Some(host) = set("MASTER_ADDR") else {
            bail!(
                "WORLD_SIZE is {world} but the ranks have nowhere to meet: set MASTER_ADDR and \
                 MASTER_PORT (rank 0 serves a store there, or torchrun does), run under an agent \
                 (RINGMASTER_COORDINATOR), or set RINGMASTER_STORE_DIR"
            );
        };
        let port = set("MASTER_PORT").unwrap_or_else(|| "29500".into());
        let port: u16 = port
            .parse()
            .with_context(|| format!("MASTER_PORT={port} is not a port number"))?;
        let timeout = match set("RINGMASTER_RDZV_TIMEOUT") {
            None => DEFAULT_RDZV_TIMEOUT,
            Some(t) => Duration::from_secs(t.parse().with_context(|| {
                format!("RINGMASTER_RDZV_TIMEOUT={t} is not a number of seconds")
            })?),
        };
        let served_elsewhere = set("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
            || set("RINGMASTER_STORE_SERVED").is_some_and(|v| v == "1");
        let addr = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Meeting::Master {
            addr,
            serve: rank == 0 && !served_elsewhere,
            timeout,
        })
    }
}

/// The TCP store this process serves (rank 0 without a launcher), alive as long as the process,
/// and the client every bootstrap shares.
static SERVED: std::sync::OnceLock<ringmaster_collectives::TcpStoreServer> =
    std::sync::OnceLock::new();
static MASTER_CLIENT: std::sync::OnceLock<std::sync::Arc<ringmaster_collectives::TcpStoreClient>> =
    std::sync::OnceLock::new();

/// A shared [`ringmaster_collectives::TcpStoreClient`] as a [`Store`].
struct SharedClient(std::sync::Arc<ringmaster_collectives::TcpStoreClient>);

impl Store for SharedClient {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), ringmaster_collectives::CommError> {
        self.0.set(key, value)
    }
    fn get(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, ringmaster_collectives::CommError> {
        self.0.get(key, timeout)
    }
}

/// Serves (once per process) and connects to the store at `addr`; keys go under `ringmaster/`
/// so that they never meet torch's own keys in torchrun's store.
fn master_store(addr: &str, serve: bool, timeout: Duration) -> Result<Box<dyn Store>> {
    if serve && SERVED.get().is_none() {
        // On loopback for a loopback MASTER_ADDR, else on every interface (`serve_for`).
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "29500"));
        let port: u16 = port.parse().unwrap_or(29500);
        let server =
            ringmaster_collectives::TcpStoreServer::serve_for(host, port).with_context(|| {
                format!("rank 0 serving the rendezvous store on MASTER_ADDR:MASTER_PORT ({addr})")
            })?;
        let _ = SERVED.set(server);
    }
    if let Some(c) = MASTER_CLIENT.get() {
        return Ok(Box::new(SharedClient(c.clone())));
    }
    let opts = ringmaster_collectives::TcpStoreOptions::default()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_prefix("ringmaster");
    let client =
        ringmaster_collectives::TcpStoreClient::connect(addr, opts).with_context(|| {
            format!("reaching the rendezvous store at MASTER_ADDR:MASTER_PORT ({addr})")
        })?;
    let client = MASTER_CLIENT.get_or_init(|| std::sync::Arc::new(client));
    Ok(Box::new(SharedClient(client.clone())))
}

/// The job's bootstrap store (see [`Meeting`]), its job id and generation. The run id is
/// `RINGMASTER_JOB_ID`, else torchrun's `TORCHELASTIC_RUN_ID`; the generation
/// `RINGMASTER_GENERATION`, else `TORCHELASTIC_RESTART_COUNT` (a restarted worker group meets
/// under new keys in a store that outlives it). Whether this process serves the store is
/// decided by its global `RANK`, whatever subgroup it is connecting.
pub fn bootstrap_store(world: usize) -> Result<(Box<dyn Store>, String, u64)> {
    let (rank, _, _) = rank_world()?;
    let var = |k: &str| std::env::var(k).ok();
    let job = var("RINGMASTER_JOB_ID")
        .or_else(|| var("TORCHELASTIC_RUN_ID"))
        .filter(|j| !j.is_empty())
        .unwrap_or_else(|| "local".into());
    let generation: u64 = var("RINGMASTER_GENERATION")
        .or_else(|| var("TORCHELASTIC_RESTART_COUNT"))
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    let store: Box<dyn Store> = match Meeting::from_env(rank, world, var)? {
        Meeting::Dir(d) => Box::new(DirStore::new(d)?),
        Meeting::Coordinator(addr) => Box::new(crate::rendezvous::GrpcStore::connect(
            &addr, &job, generation,
        )?),
        Meeting::Master {
            addr,
            serve,
            timeout,
        } => master_store(&addr, serve, timeout)?,
    };
    Ok((store, job, generation))
}

/// Checks that this rank computes where rank 0 does (`device: auto` is decided per rank: a
/// node without a GPU, or with an empty `CUDA_VISIBLE_DEVICES`, would otherwise put its ranks
/// on the TCP ring while the others wait in NCCL until the timeout). Rank 0 publishes its fabric
/// through the bootstrap store; every other rank compares and fails naming both.
pub fn agree_on_fabric(rank: usize, world: usize, timeout: Duration, fabric: Fabric) -> Result<()> {
    if world <= 1 {
        return Ok(());
    }
    let (store, job, generation) = bootstrap_store(world)?;
    let key = format!("{job}/{generation}/fabric");
    compare_fabric(store.as_ref(), &key, rank, timeout, fabric)
}

/// [`agree_on_fabric`] on `store` under `key`.
fn compare_fabric(
    store: &dyn Store,
    key: &str,
    rank: usize,
    timeout: Duration,
    fabric: Fabric,
) -> Result<()> {
    let mine = fabric.describe();
    if rank == 0 {
        store.set(key, mine.as_bytes())?;
        return Ok(());
    }
    let theirs = store
        .get(key, timeout)
        .with_context(|| format!("waiting for rank 0's device ({key})"))?;
    let theirs = String::from_utf8_lossy(&theirs);
    if theirs != mine {
        bail!(
            "rank 0 computes on {theirs} but rank {rank} on {mine}: every rank must use the \
             same kind of device (set `device: cuda` or `device: cpu` instead of `auto`, or \
             give every node a GPU)"
        );
    }
    Ok(())
}

/// Connects this rank to the communicator of its job and generation.
pub fn connect(
    rank: usize,
    world: usize,
    timeout: Duration,
    fabric: Fabric,
) -> Result<Box<dyn Communicator>> {
    connect_group("", rank, world, timeout, fabric)
}

/// Connects to the communicator of a subgroup `name` of the job (for example the ranks of one
/// node), as rank `rank` of `world`. The empty name is the whole job. Every group meets through
/// the job's bootstrap store: the coordinator's rendezvous (`RINGMASTER_COORDINATOR`) or a
/// directory (`RINGMASTER_STORE_DIR`).
pub fn connect_group(
    name: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
    fabric: Fabric,
) -> Result<Box<dyn Communicator>> {
    let (store, job, generation) = bootstrap_store(world)?;
    // The store is the job's; the group's name (its keys and socket names) is the subgroup's.
    let group_name = if name.is_empty() {
        job.clone()
    } else {
        format!("{job}.{name}")
    };
    match fabric {
        Fabric::Ring => {
            let bind = node_addr()?;
            let mut cfg = RingConfig::new(&group_name, generation, rank, world);
            cfg.bind_addr = bind;
            cfg.timeout = timeout;
            (cfg.transport, cfg.cma) = ring_transport(std::env::var("RINGMASTER_TRANSPORT").ok())?;
            let mut ring = TcpRing::connect(cfg, store.as_ref())?;
            ring.set_timeout(timeout);
            Ok(Box::new(ring))
        }
        #[cfg(feature = "cuda")]
        Fabric::Nccl { device } => {
            let mut comm = ringmaster_collectives::nccl::NcclComm::connect(
                &group_name,
                generation,
                rank,
                world,
                device,
                store.as_ref(),
                timeout,
            )?;
            comm.set_timeout(timeout);
            Ok(Box::new(comm))
        }
        #[cfg(not(feature = "cuda"))]
        Fabric::Nccl { .. } => bail!("NCCL needs a trainer built with the `cuda` feature"),
    }
}

/// The address this rank's ring listens on: `RINGMASTER_NODE_ADDR` (an address, or a host
/// name resolved here, as torchrun's `--local-addr` may give), else loopback.
pub fn node_addr() -> Result<IpAddr> {
    use std::net::ToSocketAddrs;
    let Some(a) = std::env::var("RINGMASTER_NODE_ADDR")
        .ok()
        .filter(|a| !a.is_empty())
    else {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    };
    if let Ok(ip) = a.trim_start_matches('[').trim_end_matches(']').parse() {
        return Ok(ip);
    }
    (a.as_str(), 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .map(|s| s.ip())
        .with_context(|| {
            format!("RINGMASTER_NODE_ADDR={a}: neither an address nor a host name that resolves")
        })
}

/// The ring's transport from `RINGMASTER_TRANSPORT`: `auto` (the default: Unix sockets with
/// cross-memory attach between ranks of one machine, TCP between machines) or `tcp` (TCP
/// everywhere: what ranks on different machines use, also between ranks of one machine).
fn ring_transport(value: Option<String>) -> Result<(Transport, bool)> {
    match value.as_deref().map(str::trim) {
        None | Some("") | Some("auto") => Ok((Transport::Auto, true)),
        Some("tcp") => Ok((Transport::Tcp, false)),
        Some(other) => bail!("RINGMASTER_TRANSPORT={other}: expected auto or tcp"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_on_another_kind_of_device_than_rank_0_fail_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path()).unwrap();
        let t = Duration::from_secs(5);
        compare_fabric(&store, "job/0/fabric", 0, t, Fabric::Ring).unwrap();
        compare_fabric(&store, "job/0/fabric", 1, t, Fabric::Ring).unwrap();
        let err = compare_fabric(&store, "job/0/fabric", 2, t, Fabric::Nccl { device: 0 })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rank 0 computes on the CPU (TCP ring) but rank 2 on CUDA (NCCL)"),
            "{err}"
        );
    }

    #[test]
    fn transport_from_the_environment() {
        assert_eq!(ring_transport(None).unwrap(), (Transport::Auto, true));
        assert_eq!(
            ring_transport(Some("tcp".into())).unwrap(),
            (Transport::Tcp, false)
        );
        let e = ring_transport(Some("udp".into())).unwrap_err().to_string();
        assert!(e.contains("RINGMASTER_TRANSPORT=udp"), "{e}");
    }
}
