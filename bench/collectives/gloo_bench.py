#!/usr/bin/env python3
"""PyTorch gloo (CPU) collective benchmark with nccl-tests bandwidth definitions.

Launcher:  python gloo_bench.py --world N [--ops all_reduce,reduce_scatter,all_gather]
                                [--bytes 1KiB,...,256MiB] [--iters K] [--warmup W]
  starts N copies of itself (one per rank) with RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1,
  MASTER_PORT (a free port) and OMP_NUM_THREADS=1 in the environment; rank 0 prints one JSON
  line per (op, world, bytes) on stdout:
    {"impl":"gloo","op":..,"world":..,"bytes":..,"seconds":..,"algbw_gbs":..,"busbw_gbs":..,...}

Definitions (https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md):
  bytes  = S, the whole buffer: all_reduce's tensor, reduce_scatter's full input,
           all_gather's gathered output (float32 elements, S/4 of them)
  seconds = t, average time of one iteration (the slowest rank's total / iters)
  algbw  = S / t      busbw = algbw * 2(n-1)/n (all_reduce), * (n-1)/n (reduce_scatter, all_gather)
  GB/s   = 1e9 bytes/s

API used per op (recorded in each line's "api" field):
  all_reduce:     dist.all_reduce
  reduce_scatter: dist.reduce_scatter_tensor; if the gloo backend of this torch version rejects
                  it, dist.reduce_scatter with a list of n input chunks
  all_gather:     dist.all_gather_into_tensor; if rejected, dist.all_gather into a list of n
                  output chunks (views of one buffer)
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

DEFAULT_OPS = "all_reduce,reduce_scatter,all_gather"
DEFAULT_BYTES = "1KiB,4KiB,16KiB,64KiB,256KiB,1MiB,4MiB,16MiB,64MiB,256MiB"


def parse_size(s):
    s = s.strip()
    units = {"": 1, "B": 1, "K": 1 << 10, "KiB": 1 << 10, "M": 1 << 20, "MiB": 1 << 20,
             "G": 1 << 30, "GiB": 1 << 30}
    i = 0
    while i < len(s) and s[i].isdigit():
        i += 1
    if i == 0 or s[i:] not in units:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (use e.g. 4096, 1KiB, 64MiB)")
    return int(s[:i]) * units[s[i:]]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", "2")))
    p.add_argument("--ops", default=DEFAULT_OPS)
    p.add_argument("--bytes", default=DEFAULT_BYTES)
    p.add_argument("--iters", type=int, default=None,
                   help="timed iterations per size (default clamp(2^30/bytes, 3, 50))")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="launcher: seconds for the whole run")
    return p.parse_args()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args):
    """Start one process per rank; forward rank 0's stdout; fail if any rank fails."""
    port = free_port()
    procs = []
    for r in range(args.world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.world), LOCAL_RANK=str(r),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_BENCH_CHILD="1")
        cmd = [sys.executable, os.path.abspath(__file__), "--world", str(args.world),
               "--ops", args.ops, "--bytes", args.bytes, "--warmup", str(args.warmup)]
        if args.iters is not None:
            cmd += ["--iters", str(args.iters)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=None if r == 0 else subprocess.DEVNULL))
    deadline = time.monotonic() + args.timeout
    rc = 0
    for p in procs:
        try:
            rc = rc or p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"gloo_bench: timed out after {args.timeout}s", file=sys.stderr)
            for q in procs:
                q.kill()
            return 124
    return rc


def bus_factor(op, n):
    return 2.0 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def run_rank(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    sizes = [parse_size(b) for b in args.bytes.split(",") if b.strip()]

    for op in ops:
        if op not in ("all_reduce", "reduce_scatter", "all_gather"):
            raise SystemExit(f"unknown op {op!r}")
        api = None  # decided on the first size (with a probe call), kept for the others
        for size in sizes:
            n_elem = size // 4
            if n_elem % world:
                n_elem -= n_elem % world  # whole shards per rank
            nbytes = n_elem * 4
            shard = n_elem // world

            if op == "all_reduce":
                buf = torch.ones(n_elem, dtype=torch.float32)
                api = "all_reduce"

                def step():
                    dist.all_reduce(buf)
            elif op == "reduce_scatter":
                inp = torch.ones(n_elem, dtype=torch.float32)
                out = torch.empty(shard, dtype=torch.float32)
                inp_list = list(inp.chunk(world))
                if api is None:
                    try:
                        dist.reduce_scatter_tensor(out, inp)
                        api = "reduce_scatter_tensor"
                    except (RuntimeError, NotImplementedError, AttributeError) as e:
                        print(f"rank {rank}: reduce_scatter_tensor unavailable on gloo ({e}); "
                              "using reduce_scatter(list)", file=sys.stderr)
                        api = "reduce_scatter"
                if api == "reduce_scatter_tensor":
                    def step():
                        dist.reduce_scatter_tensor(out, inp)
                else:
                    def step():
                        dist.reduce_scatter(out, inp_list)
            else:  # all_gather
                inp = torch.ones(shard, dtype=torch.float32)
                out = torch.empty(n_elem, dtype=torch.float32)
                out_list = list(out.chunk(world))
                if api is None:
                    try:
                        dist.all_gather_into_tensor(out, inp)
                        api = "all_gather_into_tensor"
                    except (RuntimeError, NotImplementedError, AttributeError) as e:
                        print(f"rank {rank}: all_gather_into_tensor unavailable on gloo ({e}); "
                              "using all_gather(list)", file=sys.stderr)
                        api = "all_gather"
                if api == "all_gather_into_tensor":
                    def step():
                        dist.all_gather_into_tensor(out, inp)
                else:
                    def step():
                        dist.all_gather(out_list, inp)

            iters = args.iters if args.iters is not None else max(3, min(50, (1 << 30) // max(1, nbytes)))
            for _ in range(args.warmup):
                step()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                step()  # gloo collectives on CPU tensors complete before returning
            elapsed = time.perf_counter() - t0
            # The slowest rank's time (all ranks started together after the barrier).
            t = torch.tensor([elapsed], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds = t.item() / iters
            if rank == 0:
                algbw = nbytes / seconds / 1e9
                print(json.dumps({
                    "impl": "gloo", "op": op, "world": world, "bytes": nbytes,
                    "dtype": "f32", "seconds": seconds, "algbw_gbs": algbw,
                    "busbw_gbs": algbw * bus_factor(op, world), "iters": iters,
                    "api": api, "torch": torch.__version__,
                }), flush=True)
            del step
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main():
    args = parse_args()
    if os.environ.get("GLOO_BENCH_CHILD") == "1":
        return run_rank(args)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
