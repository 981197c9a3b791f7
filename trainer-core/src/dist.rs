//! The data-parallel group of a training run: rank and world from the torchrun-style
//! environment the agent sets, the TCP ring bootstrapped through the coordinator's store
//! (`RINGMASTER_COORDINATOR`) or, for processes started by hand, a directory
//! (`RINGMASTER_STORE_DIR`).

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

/// The job's bootstrap store, its job id and generation: the coordinator's rendezvous
/// (`RINGMASTER_COORDINATOR`) or a directory (`RINGMASTER_STORE_DIR`).
fn bootstrap_store(world: usize) -> Result<(Box<dyn Store>, String, u64)> {
    let job = std::env::var("RINGMASTER_JOB_ID").unwrap_or_else(|_| "local".into());
    let generation: u64 = std::env::var("RINGMASTER_GENERATION")
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    let store: Box<dyn Store> = match (
        std::env::var("RINGMASTER_STORE_DIR"),
        std::env::var("RINGMASTER_COORDINATOR"),
    ) {
        (Ok(d), _) if !d.is_empty() => Box::new(DirStore::new(d)?),
        (_, Ok(addr)) if !addr.is_empty() => Box::new(crate::rendezvous::GrpcStore::connect(
            &addr, &job, generation,
        )?),
        _ => bail!(
            "WORLD_SIZE is {world} but there is no bootstrap store: run under an agent \
             (RINGMASTER_COORDINATOR) or set RINGMASTER_STORE_DIR"
        ),
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
            let bind = std::env::var("RINGMASTER_NODE_ADDR")
                .ok()
                .and_then(|a| a.parse().ok())
                .unwrap_or(IpAddr::from([127, 0, 0, 1]));
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
