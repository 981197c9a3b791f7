//! The TCP ring on threads of one process, checked against a plain f64 reference.
//!
//! Tolerances: f32 sums of N ranks within 1e-5 · (1 + Σ|x|) per element (N roundings of
//! relative size 2^-24 each, with a wide margin); bf16 within N · 2^-7 · Σ|x| (one bf16 rounding,
//! relative 2^-8, per reduction step). max is exact in both.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use half::bf16;
use rand::{Rng, SeedableRng};
use ringmaster_collectives::{
    BufMut, CommError, Communicator, MemStore, ReduceOp, RingConfig, TcpRing, Transport,
    shard_range,
};

fn ring(world: usize, job: &str, timeout: Duration) -> Vec<TcpRing> {
    ring_with(world, job, timeout, (Transport::Auto, true))
}

/// (transport, cross-memory attach)
type Mode = (Transport, bool);

fn ring_with(world: usize, job: &str, timeout: Duration, mode: Mode) -> Vec<TcpRing> {
    let (transport, cma) = mode;
    let store = MemStore::new();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let store = store.clone();
            let mut cfg = RingConfig::new(job, 0, rank, world);
            cfg.timeout = timeout;
            cfg.bootstrap_timeout = Duration::from_secs(20);
            cfg.chunk_bytes = 4096; // many chunks even for small buffers: exercises the pipeline
            cfg.transport = transport;
            cfg.cma = cma;
            std::thread::spawn(move || TcpRing::connect(cfg, &store).unwrap())
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Runs `f(rank, comm)` on every rank's thread; returns the results in rank order.
fn run<T: Send + 'static>(
    comms: Vec<TcpRing>,
    f: impl Fn(usize, &mut TcpRing) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(r, mut c)| {
            let f = f.clone();
            std::thread::spawn(move || f(r, &mut c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn data(rank: usize, len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + rank as u64);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

const LENGTHS: &[fn(usize) -> usize] = &[
    |_| 0,
    |_| 1,
    |n| n - 1,
    |n| n + 1,
    |_| 10_007,
    |_| 1_000_003,
];

fn check_f32(got: &[f32], inputs: &[Vec<f32>], op: ReduceOp, range: std::ops::Range<usize>) {
    let n = inputs.len();
    for i in range {
        let (reference, mag) = match op {
            ReduceOp::Max => (
                inputs.iter().map(|x| x[i] as f64).fold(f64::MIN, f64::max),
                0.0,
            ),
            _ => {
                let s: f64 = inputs.iter().map(|x| x[i] as f64).sum();
                let m: f64 = inputs.iter().map(|x| (x[i] as f64).abs()).sum();
                if op == ReduceOp::Avg {
                    (s / n as f64, m / n as f64)
                } else {
                    (s, m)
                }
            }
        };
        let tol = if op == ReduceOp::Max {
            0.0
        } else {
            1e-5 * (1.0 + mag)
        };
        assert!(
            (got[i] as f64 - reference).abs() <= tol,
            "element {i}: got {} want {reference} (tol {tol})",
            got[i]
        );
    }
}

#[test]
fn all_reduce_every_world_size_length_and_op() {
    for mode in [
        (Transport::Auto, true),
        (Transport::Auto, false),
        (Transport::Tcp, true),
    ] {
        all_reduce_cases(mode);
    }
}

fn all_reduce_cases(mode: Mode) {
    for world in [1usize, 2, 3, 4, 8] {
        let mut comms = ring_with(world, &format!("ar{world}"), Duration::from_secs(30), mode);
        if world > 1 {
            let want = match mode {
                (Transport::Tcp, _) => "tcp",
                (Transport::Auto, true) => "unix+cma",
                (Transport::Auto, false) => "unix",
            };
            assert_eq!(comms[0].transports(), (Some(want), Some(want)));
        }
        for (li, len_of) in LENGTHS.iter().enumerate() {
            let len = len_of(world);
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                let seed = (li * 10 + op.code() as usize) as u64;
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, len, seed)).collect();
                let ins = Arc::new(inputs.clone());
                let outs = run(std::mem::take(&mut comms), move |r, c| {
                    let mut b = ins[r].clone();
                    c.all_reduce(BufMut::F32(&mut b), op).unwrap();
                    (b, std::mem::replace(c, dummy()))
                });
                for (r, (b, _)) in outs.iter().enumerate() {
                    check_f32(b, &inputs, op, 0..len);
                    // Every rank holds bit-identical results.
                    assert_eq!(b, &outs[0].0, "rank {r} differs, world {world} len {len}");
                }
                comms = outs.into_iter().map(|(_, c)| c).collect();
            }
        }
    }
}

/// A placeholder swapped in while a communicator travels back from its thread.
fn dummy() -> TcpRing {
    TcpRing::connect(RingConfig::new("dummy", 0, 0, 1), &MemStore::new()).unwrap()
}

#[test]
fn reduce_scatter_all_gather_broadcast_barrier() {
    for world in [1usize, 2, 3, 4, 8] {
        for (li, len_of) in LENGTHS.iter().enumerate() {
            let len = len_of(world);
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, len, li as u64)).collect();
            let ins = Arc::new(inputs.clone());
            let comms = ring(world, &format!("rs{world}-{li}"), Duration::from_secs(30));
            let outs = run(comms, move |r, c| {
                // reduce_scatter: this rank's shard reduced.
                let mut b = ins[r].clone();
                let mine = c
                    .reduce_scatter(BufMut::F32(&mut b), ReduceOp::Sum)
                    .unwrap();
                assert_eq!(mine, shard_range(b.len(), c.world_size(), r));
                let rs = b[mine.clone()].to_vec();
                // all_gather: every rank contributes its own shard of a known vector.
                let n = c.world_size();
                let mut g = vec![-1.0f32; b.len()];
                for i in shard_range(g.len(), n, r) {
                    g[i] = i as f32 * 0.5;
                }
                c.all_gather(BufMut::F32(&mut g)).unwrap();
                // broadcast from the last rank.
                let root = n - 1;
                let mut bc = if r == root {
                    ins[r].clone()
                } else {
                    vec![0.0; b.len()]
                };
                c.broadcast(BufMut::F32(&mut bc), root).unwrap();
                c.barrier().unwrap();
                (mine, rs, g, bc, c.seq())
            });
            for (r, (mine, rs, g, bc, seq)) in outs.into_iter().enumerate() {
                let mut full = vec![0.0; len];
                full[mine.clone()].copy_from_slice(&rs);
                check_f32(&full, &inputs, ReduceOp::Sum, mine);
                assert!(
                    g.iter().enumerate().all(|(i, v)| *v == i as f32 * 0.5),
                    "rank {r}"
                );
                assert_eq!(bc, inputs[world - 1], "broadcast on rank {r}");
                assert_eq!(seq, 4);
            }
        }
    }
}

#[test]
fn bf16_all_reduce_within_stated_bound() {
    for world in [2usize, 3, 4, 8] {
        let len = 10_007;
        let inputs: Vec<Vec<bf16>> = (0..world)
            .map(|r| data(r, len, 7).into_iter().map(bf16::from_f32).collect())
            .collect();
        let ins = Arc::new(inputs.clone());
        let comms = ring(world, &format!("bf{world}"), Duration::from_secs(30));
        let outs = run(comms, move |r, c| {
            let mut b = ins[r].clone();
            c.all_reduce(BufMut::Bf16(&mut b), ReduceOp::Sum).unwrap();
            let mut m = ins[r].clone();
            c.all_reduce(BufMut::Bf16(&mut m), ReduceOp::Max).unwrap();
            (b, m)
        });
        for (b, m) in &outs {
            assert_eq!(b, &outs[0].0);
            for i in 0..len {
                let s: f64 = inputs.iter().map(|x| x[i].to_f64()).sum();
                let mag: f64 = inputs.iter().map(|x| x[i].to_f64().abs()).sum();
                let tol = world as f64 * 2f64.powi(-7) * mag + 1e-6;
                assert!((b[i].to_f64() - s).abs() <= tol, "{i}: {} vs {s}", b[i]);
                let mx = inputs.iter().map(|x| x[i]).fold(bf16::MIN, bf16::max);
                assert_eq!(m[i], mx);
            }
        }
    }
}

#[test]
fn a_rank_that_leaves_fails_everyone_fast_and_a_silent_one_times_out() {
    // Rank 2 of 4 drops its communicator instead of calling: its neighbours see the closed
    // connection, and the failure travels the ring, long before the 30 s timeout.
    let comms = ring(4, "leave", Duration::from_secs(30));
    let t0 = Instant::now();
    let ready = Arc::new(Barrier::new(4));
    let outs = run(comms, move |r, c| {
        // Rank 2 leaves once the others are calling (or about to: either way they must fail).
        ready.wait();
        if r == 2 {
            return None;
        }
        let mut b = vec![1.0f32; 1 << 20];
        Some(c.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum))
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    for (r, o) in outs.into_iter().enumerate() {
        if r == 2 {
            continue;
        }
        let e = o.unwrap().unwrap_err();
        assert!(e.to_string().contains("all_reduce #1"), "rank {r}: {e}");
        assert!(e.peer().is_some(), "rank {r}: {e}");
    }

    // A silent rank: its right neighbour times out naming it.
    let comms = ring(3, "silent", Duration::from_millis(500));
    let gate = Arc::new(Barrier::new(3));
    // Rank 1 stays connected and silent until the other two have their answers.
    let answered = Arc::new(Barrier::new(3));
    let outs = run(comms, move |r, c| {
        gate.wait();
        if r == 1 {
            answered.wait();
            return None;
        }
        let mut b = vec![1.0f32; 1000];
        let t = Instant::now();
        let res = c.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum);
        let took = t.elapsed();
        answered.wait();
        Some((res, took))
    });
    let (res, took) = outs[2].as_ref().unwrap();
    match res {
        Err(CommError::Timeout { peer, seq, op, .. }) => {
            assert_eq!((*peer, *seq, op.name()), (1, 1, "all_reduce"));
        }
        other => panic!("rank 2: {other:?}"),
    }
    assert!(*took < Duration::from_millis(1500), "{took:?}");
    assert!(outs[0].as_ref().unwrap().0.is_err());
}

#[test]
fn abort_from_another_thread_ends_a_blocked_call_at_once() {
    let mut comms = ring(2, "abort", Duration::from_secs(60));
    let mut c0 = comms.remove(0);
    let _c1 = comms.remove(0); // never calls
    let h = c0.abort_handle();
    let t0 = Instant::now();
    // The call below blocks (rank 1 never answers); the abort ends it whenever it lands.
    let calling = Arc::new(Barrier::new(2));
    let c2 = calling.clone();
    let aborter = std::thread::spawn(move || {
        c2.wait();
        h.abort("generation ended by the coordinator");
    });
    calling.wait();
    let mut b = vec![0.0f32; 100];
    let e = c0
        .all_reduce(BufMut::F32(&mut b), ReduceOp::Sum)
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(matches!(e, CommError::Aborted { .. }), "{e}");
    assert!(e.to_string().contains("generation ended"), "{e}");
    aborter.join().unwrap();
    // Later calls fail at once.
    let t1 = Instant::now();
    assert!(c0.barrier().is_err());
    assert!(t1.elapsed() < Duration::from_millis(100));
}

#[test]
fn a_peer_from_a_stale_generation_is_refused() {
    use ringmaster_collectives::Store;
    let store = MemStore::new();
    // Generation 2, rank 1 is up and waiting for its left neighbour (rank 0).
    let s2 = store.clone();
    let rank1 = std::thread::spawn(move || {
        let mut cfg = RingConfig::new("job", 2, 1, 2);
        cfg.bootstrap_timeout = Duration::from_secs(20);
        TcpRing::connect(cfg, &s2)
    });
    let addr = store.get("job/2/ring/1", Duration::from_secs(10)).unwrap();
    // A rank 0 of generation 1 finds that address (as a stale process would) and is refused.
    let stale_store = MemStore::new();
    stale_store.set("job/1/ring/1", &addr).unwrap();
    let mut cfg = RingConfig::new("job", 1, 0, 2);
    cfg.bootstrap_timeout = Duration::from_secs(2);
    let err = TcpRing::connect(cfg, &stale_store).err().expect("refused");
    match &err {
        CommError::Refused { peer, detail } => {
            assert_eq!(*peer, 1);
            assert!(
                detail.contains("generation 1 is not this rank's generation 2"),
                "{detail}"
            );
        }
        other => panic!("{other}"),
    }
    // The real rank 0 of generation 2 still forms the ring with it.
    let s0 = store.clone();
    let rank0 = std::thread::spawn(move || {
        let mut cfg = RingConfig::new("job", 2, 0, 2);
        cfg.bootstrap_timeout = Duration::from_secs(20);
        TcpRing::connect(cfg, &s0)
    });
    let mut c0 = rank0.join().unwrap().unwrap();
    let mut c1 = rank1.join().unwrap().unwrap();
    let t = std::thread::spawn(move || {
        let mut b = vec![2.0f32; 3];
        c1.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum).unwrap();
        b
    });
    let mut b = vec![1.0f32; 3];
    c0.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum).unwrap();
    assert_eq!(b, vec![3.0; 3]);
    assert_eq!(t.join().unwrap(), vec![3.0; 3]);
}

#[test]
fn mismatched_calls_are_reported_naming_the_peer() {
    let comms = ring(2, "mismatch", Duration::from_secs(10));
    let outs = run(comms, |r, c| {
        let mut b = vec![0.0f32; if r == 0 { 10 } else { 11 }];
        c.all_reduce(BufMut::F32(&mut b), ReduceOp::Sum)
    });
    for (r, o) in outs.into_iter().enumerate() {
        let e = o.unwrap_err();
        assert!(
            matches!(e, CommError::Mismatch { .. } | CommError::PeerLost { .. }),
            "rank {r}: {e}"
        );
    }
}

#[test]
fn a_stale_address_in_a_reused_store_is_replaced_not_waited_on() {
    use ringmaster_collectives::{DirStore, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::new(dir.path()).unwrap();
    // An earlier run left the address of a rank-1 process that is gone.
    store.set("job/0/ring/1", b"tcp=127.0.0.1:1").unwrap();
    let t0 = Instant::now();
    let handles: Vec<_> = (0..2)
        .map(|rank| {
            let store = DirStore::new(dir.path()).unwrap();
            std::thread::spawn(move || {
                let mut cfg = RingConfig::new("job", 0, rank, 2);
                cfg.bootstrap_timeout = Duration::from_secs(20);
                // Rank 1 publishes only once rank 0 is up, so rank 0 reads the stale value.
                if rank == 1 {
                    store.get("job/0/ring/0", Duration::from_secs(20)).unwrap();
                }
                TcpRing::connect(cfg, &store)
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap().unwrap();
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}
