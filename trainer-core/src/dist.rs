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
    let job = std::env::var("RINGMASTER_JOB_ID").unwrap_or_else(|_| "local".into());
    // The store is the job's; the group's name (its keys and socket names) is the subgroup's.
    let group_name = if name.is_empty() {
        job.clone()
    } else {
        format!("{job}.{name}")
    };
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
