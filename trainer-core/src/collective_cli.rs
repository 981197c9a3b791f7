//! `trainer collective`: one rank of a collective benchmark or check, as its own process.
//!
//! Started N times with `RANK` and `WORLD_SIZE` (by an agent, by `ringctl local`, or by a
//! script), it joins a TCP ring bootstrapped from the coordinator's rendezvous store
//! (`RINGMASTER_COORDINATOR`, scoped to `RINGMASTER_JOB_ID` / `RINGMASTER_GENERATION`) or from a
//! directory shared by the processes (`--store-dir`), then times or checks the operation.
//! Rank 0 prints one line per size: a table, or JSON with the nccl-tests fields
//! (`bytes`, `seconds`, `algbw_gbs`, `busbw_gbs`).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use half::bf16;
use ringmaster_collectives::{
    BufMut, Communicator, DirStore, ReduceOp, RingConfig, Store, TcpRing, Transport, shard_range,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CollectiveOp {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
}

impl CollectiveOp {
    fn name(self) -> &'static str {
        match self {
            CollectiveOp::AllReduce => "all_reduce",
            CollectiveOp::ReduceScatter => "reduce_scatter",
            CollectiveOp::AllGather => "all_gather",
            CollectiveOp::Broadcast => "broadcast",
            CollectiveOp::Barrier => "barrier",
        }
    }

    /// nccl-tests' bus bandwidth factor.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            CollectiveOp::AllReduce => 2.0 * (n - 1.0) / n,
            CollectiveOp::ReduceScatter | CollectiveOp::AllGather => (n - 1.0) / n,
            CollectiveOp::Broadcast | CollectiveOp::Barrier => 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
}

/// Flags of `trainer collective`.
#[derive(Parser, Debug)]
#[command(name = "trainer collective", bin_name = "trainer collective")]
pub struct Args {
    #[arg(long, value_enum, default_value = "all-reduce")]
    pub op: CollectiveOp,
    /// Buffer sizes in bytes (whole buffer, as nccl-tests counts), e.g. `1KiB,64MiB`.
    #[arg(long, default_value = "64MiB", value_delimiter = ',', value_parser = parse_size)]
    pub bytes: Vec<u64>,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
    /// Timed iterations per size (default: enough for ~1 GiB moved, 3..=50).
    #[arg(long)]
    pub iters: Option<u64>,
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Check results against a reference instead of only timing.
    #[arg(long)]
    pub check: bool,
    /// Bootstrap through files in this directory (processes of one machine).
    #[arg(long)]
    pub store_dir: Option<std::path::PathBuf>,
    /// Timeout of each collective call.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Bytes per pipelined chunk.
    #[arg(long, default_value = "512KiB", value_parser = parse_size)]
    pub chunk: u64,
    /// `auto`: Unix sockets between ranks of one machine, TCP otherwise; `tcp`: TCP only.
    #[arg(long, value_enum, default_value = "auto")]
    pub transport: TransportArg,
    /// Do not copy chunks straight from a same-machine peer's memory (process_vm_readv).
    #[arg(long)]
    pub no_cma: bool,
    /// SO_SNDBUF / SO_RCVBUF of the ring's sockets.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub socket_buffer: u64,
    /// Address to listen on (default: $RINGMASTER_NODE_ADDR, else 127.0.0.1).
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// Print JSON lines.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    Auto,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

pub use ringmaster_config::units::parse_size;

fn env_usize(name: &str) -> anyhow::Result<usize> {
    std::env::var(name)
        .with_context(|| {
            format!("{name} is not set (start one process per rank with RANK and WORLD_SIZE)")
        })?
        .parse()
        .with_context(|| format!("{name} is not a number"))
}

/// Input value of `rank` at element `i`: small integers, so f32 and bf16 sums are exact.
fn input(rank: usize, i: usize) -> f32 {
    ((rank * 7 + i) % 13) as f32 - 6.0
}

/// Runs one rank.
///
/// # Errors
/// Bad environment, bootstrap or collective failure, or a check that found a wrong value.
pub fn run(args: Args) -> anyhow::Result<()> {
    let rank = env_usize("RANK")?;
    let world = env_usize("WORLD_SIZE")?;
    let (store, job, generation): (Box<dyn Store>, String, u64) = match &args.store_dir {
        Some(d) => {
            let job = std::env::var("RINGMASTER_JOB_ID").unwrap_or_else(|_| "local".into());
            let generation: u64 = std::env::var("RINGMASTER_GENERATION")
                .ok()
                .and_then(|g| g.parse().ok())
                .unwrap_or(0);
            (Box::new(DirStore::new(d)?), job, generation)
        }
        // The trainer's meeting points: the coordinator, RINGMASTER_STORE_DIR, or MASTER_ADDR.
        None => crate::dist::bootstrap_store(world)?,
    };
    let bind = match args.bind {
        Some(b) => b,
        None => crate::dist::node_addr()?,
    };
    let mut cfg = RingConfig::new(&job, generation, rank, world);
    cfg.bind_addr = bind;
    cfg.timeout = args.timeout;
    cfg.chunk_bytes = usize::try_from(args.chunk).context("--chunk")?;
    cfg.socket_buffer = usize::try_from(args.socket_buffer).context("--socket-buffer")?;
    cfg.cma = !args.no_cma;
    cfg.transport = match args.transport {
        TransportArg::Auto => Transport::Auto,
        TransportArg::Tcp => Transport::Tcp,
    };
    let mut comm = TcpRing::connect(cfg, store.as_ref())?;
    let (left, right) = comm.transports();
    eprintln!(
        "rank {rank}/{world}: ring connected (from the left: {}, to the right: {})",
        left.unwrap_or("-"),
        right.unwrap_or("-")
    );
    if rank == 0 && args.output == OutputFormat::Text {
        println!(
            "{:>14} {:>8} {:>12} {:>11} {:>11}",
            format!("{} ({:?})", args.op.name(), args.dtype),
            "world",
            "bytes",
            "algbw GB/s",
            "busbw GB/s"
        );
    }
    for &bytes in &args.bytes {
        let esize = match args.dtype {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        };
        let len = usize::try_from(bytes / esize).context("size")?;
        let iters = args
            .iters
            .unwrap_or_else(|| ((1u64 << 30) / bytes.max(1)).clamp(3, 50));
        let seconds = match args.dtype {
            Dtype::F32 => time_op::<f32>(&mut comm, &args, len, iters, rank, world)?,
            Dtype::Bf16 => time_op::<bf16>(&mut comm, &args, len, iters, rank, world)?,
        };
        if rank == 0 {
            let algbw = bytes as f64 / seconds / 1e9;
            let busbw = algbw * args.op.bus_factor(world);
            match args.output {
                OutputFormat::Json => println!(
                    "{}",
                    serde_json::json!({
                        "impl": "ringmaster", "op": args.op.name(), "world": world,
                        "bytes": bytes, "dtype": format!("{:?}", args.dtype).to_lowercase(),
                        "seconds": seconds, "algbw_gbs": algbw, "busbw_gbs": busbw,
                        "iters": iters, "checked": args.check,
                        "transport": format!("{:?}", args.transport).to_lowercase(),
                        "cma": !args.no_cma,
                    })
                ),
                OutputFormat::Text => println!(
                    "{:>14} {world:>8} {bytes:>12} {algbw:>11.3} {busbw:>11.3}",
                    ""
                ),
            }
        }
    }
    Ok(())
}

trait Value: Copy + Send + 'static {
    fn of(x: f32) -> Self;
    fn get(self) -> f32;
    fn buf(b: &mut [Self]) -> BufMut<'_>;
}
impl Value for f32 {
    fn of(x: f32) -> f32 {
        x
    }
    fn get(self) -> f32 {
        self
    }
    fn buf(b: &mut [f32]) -> BufMut<'_> {
        BufMut::F32(b)
    }
}
impl Value for bf16 {
    fn of(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
    fn get(self) -> f32 {
        self.to_f32()
    }
    fn buf(b: &mut [bf16]) -> BufMut<'_> {
        BufMut::Bf16(b)
    }
}

fn fill<T: Value>(buf: &mut [T], args: &Args, rank: usize, world: usize) {
    match args.op {
        CollectiveOp::AllGather => {
            for v in buf.iter_mut() {
                *v = T::of(f32::NAN);
            }
            for i in shard_range(buf.len(), world, rank) {
                buf[i] = T::of(input(0, i));
            }
        }
        CollectiveOp::Broadcast if rank != 0 => {
            for v in buf.iter_mut() {
                *v = T::of(0.0);
            }
        }
        _ => {
            for (i, v) in buf.iter_mut().enumerate() {
                *v = T::of(input(rank, i));
            }
        }
    }
}

fn verify<T: Value>(
    buf: &[T],
    args: &Args,
    rank: usize,
    world: usize,
    shard: Option<std::ops::Range<usize>>,
) -> anyhow::Result<()> {
    let check_range = shard.unwrap_or(0..buf.len());
    for i in check_range {
        let want = match args.op {
            CollectiveOp::AllReduce | CollectiveOp::ReduceScatter => {
                (0..world).map(|r| input(r, i)).sum::<f32>()
            }
            CollectiveOp::AllGather | CollectiveOp::Broadcast => input(0, i),
            CollectiveOp::Barrier => return Ok(()),
        };
        let got = buf[i].get();
        if got != want {
            bail!(
                "rank {rank}: {} element {i} is {got}, expected {want}",
                args.op.name()
            );
        }
    }
    Ok(())
}

fn once<T: Value>(
    comm: &mut TcpRing,
    op: CollectiveOp,
    buf: &mut [T],
) -> anyhow::Result<Option<std::ops::Range<usize>>> {
    Ok(match op {
        CollectiveOp::AllReduce => {
            comm.all_reduce(T::buf(buf), ReduceOp::Sum)?;
            None
        }
        CollectiveOp::ReduceScatter => Some(comm.reduce_scatter(T::buf(buf), ReduceOp::Sum)?),
        CollectiveOp::AllGather => {
            comm.all_gather(T::buf(buf))?;
            None
        }
        CollectiveOp::Broadcast => {
            comm.broadcast(T::buf(buf), 0)?;
            None
        }
        CollectiveOp::Barrier => {
            comm.barrier()?;
            None
        }
    })
}

/// Average seconds per call over `iters` timed calls (after warm-up and a barrier).
fn time_op<T: Value>(
    comm: &mut TcpRing,
    args: &Args,
    len: usize,
    iters: u64,
    rank: usize,
    world: usize,
) -> anyhow::Result<f64> {
    let mut buf = vec![T::of(0.0); len];
    for _ in 0..args.warmup {
        fill(&mut buf, args, rank, world);
        once(comm, args.op, &mut buf)?;
    }
    if args.check {
        fill(&mut buf, args, rank, world);
        let shard = once(comm, args.op, &mut buf)?;
        verify(&buf, args, rank, world, shard)?;
    }
    comm.barrier()?;
    let t0 = Instant::now();
    for _ in 0..iters {
        // Not refilled: repeated sums may grow to infinity, which costs the same time.
        once(comm, args.op, &mut buf)?;
    }
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_sum_exactly() {
        // 8 ranks of values in [-6, 6]: sums are small integers, exact in bf16 too.
        for i in 0..100 {
            let s: f32 = (0..8).map(|r| input(r, i)).sum();
            assert_eq!(bf16::from_f32(s).to_f32(), s);
        }
    }
}
