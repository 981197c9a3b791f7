//! `store-bench`: the coordinator's state store backends side by side (issue 20).
//!
//! What the persister does, measured per backend: sequential compare-and-swap puts of one job
//! record (each waits for the previous: the latency a submit's acknowledgement waits on), and
//! atomic commits of many records (a burst of changed jobs coalesced into one commit). The
//! backends run interleaved, round by round, so that drift on the machine hits each alike.
//!
//! ```sh
//! cargo run --release -p ringmaster-bench --bin store-bench -- --rounds 5 --puts 200
//! ```
//! etcd comes from `etcd` on PATH (a fresh single member on loopback; Debian's etcd-server).

use std::time::{Duration, Instant};

use clap::Parser;
use ringmaster_store::testing::EtcdServer;
use ringmaster_store::{EtcdOptions, EtcdStore, Op, Precondition, RedbStore, StateStore};

#[derive(Parser, Debug)]
struct Args {
    /// Interleaved rounds per backend.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Sequential CAS puts per round.
    #[arg(long, default_value_t = 200)]
    puts: usize,
    /// Commits per round, each of `--ops` records.
    #[arg(long, default_value_t = 20)]
    commits: usize,
    /// Records per commit.
    #[arg(long, default_value_t = 100)]
    ops: usize,
    /// Bytes per record (a small job record is about 2 KiB).
    #[arg(long, default_value_t = 2048)]
    value_bytes: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One round on `store`: returns the put latencies and the commit latencies.
fn round(store: &dyn StateStore, args: &Args, tag: &str) -> (Vec<Duration>, Vec<Duration>) {
    let value = vec![b'x'; args.value_bytes];
    let key = format!("jobs/bench-{tag}");
    let mut version = None;
    let mut puts = Vec::with_capacity(args.puts);
    for _ in 0..args.puts {
        let expect = version.map_or(Precondition::Absent, Precondition::Version);
        let t = Instant::now();
        let v = store.put(&key, &value, expect).expect("put");
        puts.push(t.elapsed());
        version = Some(v);
    }
    let mut commits = Vec::with_capacity(args.commits);
    for c in 0..args.commits {
        let ops = (0..args.ops)
            .map(|i| {
                Op::put(
                    format!("jobs/bench-{tag}-{c}-{i}"),
                    value.clone(),
                    Precondition::Any,
                )
            })
            .collect();
        let t = Instant::now();
        store.commit(ops).expect("commit");
        commits.push(t.elapsed());
    }
    (puts, commits)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let redb = RedbStore::open(&dir.path().join("data"))?;
    let etcd_server = EtcdServer::start().map_err(anyhow::Error::msg)?;
    let etcd = EtcdStore::open(&etcd_server.url("bench"), &EtcdOptions::default())?;
    let backends: [(&str, &dyn StateStore); 2] = [("redb", &redb), ("etcd", &etcd)];
    let mut results: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); 2];
    for r in 0..args.rounds {
        for (b, (name, store)) in backends.iter().enumerate() {
            let (p, c) = round(*store, &args, &format!("{name}-{r}"));
            results[b].0.extend(p);
            results[b].1.extend(c);
        }
    }
    println!(
        "{} rounds, interleaved; {} sequential CAS puts and {} commits of {} records of {} bytes per round",
        args.rounds, args.puts, args.commits, args.ops, args.value_bytes
    );
    for ((name, _), (mut puts, mut commits)) in backends.iter().zip(results) {
        puts.sort();
        commits.sort();
        let total: Duration = puts.iter().sum();
        println!(
            "{name}: CAS put p50 {:.2} ms, p99 {:.2} ms, {:.0} puts/s; commit of {} p50 {:.2} ms, p99 {:.2} ms, {:.0} records/s",
            percentile(&puts, 0.5).as_secs_f64() * 1e3,
            percentile(&puts, 0.99).as_secs_f64() * 1e3,
            puts.len() as f64 / total.as_secs_f64(),
            args.ops,
            percentile(&commits, 0.5).as_secs_f64() * 1e3,
            percentile(&commits, 0.99).as_secs_f64() * 1e3,
            (commits.len() * args.ops) as f64 / commits.iter().sum::<Duration>().as_secs_f64(),
        );
    }
    Ok(())
}
