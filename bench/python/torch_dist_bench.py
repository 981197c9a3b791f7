#!/usr/bin/env python3
"""Tokens/s of data-parallel fp32 training of transformers' LlamaForCausalLM on CPU (gloo):
PyTorch DistributedDataParallel or FullyShardedDataParallel, for comparison with Ringmaster's
data-parallel engines.

  bench/.venv/bin/python bench/python/torch_dist_bench.py --mode ddp|fsdp --world 2|4 \\
      --model small|large [--steps N --warmup W --micro-batch B --seq L --threads T]

The launcher spawns --world processes itself (torch.multiprocessing.spawn; gloo backend,
MASTER_ADDR 127.0.0.1, a free port). Every rank builds the same model (seed --seed, the
configs of torch_train_bench.py: small = 3.4M, large = 124.7M), wraps it, and runs AdamW
(lr 1e-4, torch's other defaults) steps on fresh random token batches of micro-batch x seq per
rank (a different seeded generator per rank), labels = input_ids, fp32 throughout.

  ddp:  DistributedDataParallel(model)                      (CPU, gradients all-reduced)
  fsdp: FullyShardedDataParallel(model, FULL_SHARD, auto-wrap per LlamaDecoderLayer through
        transformer_auto_wrap_policy, device CPU, use_orig_params=False)

After --warmup untimed steps, all ranks meet at a barrier, run --steps timed steps and meet at
a barrier again; tokens_per_s = world * micro_batch * seq * steps / that wall time (rank 0's
clock). Rank 0 prints exactly one JSON line on stdout (progress goes to stderr) with mode,
world, model, params, tokens_per_s, peak_rss_bytes (each rank's
getrusage(RUSAGE_SELF).ru_maxrss, in bytes, indexed by rank), torch and transformers versions
and the rest of the settings.

Threads: torch.set_num_threads(--threads) in every rank (default max(1, cpu_count // world));
OMP_NUM_THREADS is set to the same in the ranks' environment.
"""

import argparse
import functools
import json
import os
import resource
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train_bench import PRESETS, llama_config  # noqa: E402

MODELS = {"small": "3.4M", "large": "124.7M"}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--mode", choices=["ddp", "fsdp"], required=True)
    p.add_argument("--world", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--model", choices=sorted(MODELS), required=True,
                   help="small = 3.4M, large = 124.7M (torch_train_bench.py's presets)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per rank per step (default: the preset's, small 8, large 2)")
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence (default: the preset's, small 128, large 512)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads per rank (default max(1, cpu_count // world))")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                   help="attn_implementation (default sdpa)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and token ids")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds a collective may wait before the process group gives up")
    a = p.parse_args(argv)
    preset = PRESETS[MODELS[a.model]]
    if a.micro_batch is None:
        a.micro_batch = preset["batch"]
    if a.seq is None:
        a.seq = preset["seq"]
    if a.threads is None:
        a.threads = max(1, (os.cpu_count() or 1) // a.world)
    if a.world < 1 or a.steps < 1 or a.warmup < 0 or a.micro_batch < 1 or a.seq < 2 \
            or a.threads < 1:
        p.error("need --world >= 1, --steps >= 1, --warmup >= 0, --micro-batch >= 1, "
                "--seq >= 2, --threads >= 1")
    return a


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(rank, *m):
    print(f"[rank {rank}]", *m, file=sys.stderr, flush=True)


def worker(rank, args, port):
    import datetime

    import torch
    import torch.distributed as dist
    import transformers
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", rank=rank, world_size=args.world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    try:
        preset = PRESETS[MODELS[args.model]]
        config = llama_config(preset["hidden"], preset["layers"], preset["heads"],
                              preset["kv_heads"], preset["intermediate"], preset["vocab"],
                              args.seq, args.attn)
        torch.set_default_dtype(torch.float32)
        torch.manual_seed(args.seed)  # same init on every rank
        model = LlamaForCausalLM(config).to(dtype=torch.float32, device="cpu")
        attn_used = model.config._attn_implementation
        if attn_used != args.attn:
            raise RuntimeError(f"asked for attn {args.attn}, model uses {attn_used}")
        model.train()
        params = sum(p.numel() for p in model.parameters())

        if args.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model)
            wrap_desc = "DistributedDataParallel(model)"
        else:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import ShardingStrategy
            from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

            policy = functools.partial(
                transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer}
            )
            wrapped = FSDP(
                model,
                sharding_strategy=ShardingStrategy.FULL_SHARD,
                auto_wrap_policy=policy,
                device_id=torch.device("cpu"),
                use_orig_params=False,
            )
            wrap_desc = ("FullyShardedDataParallel(FULL_SHARD, transformer_auto_wrap_policy"
                         "({LlamaDecoderLayer}), device_id=cpu, use_orig_params=False)")
        local_params = sum(p.numel() for p in wrapped.parameters())
        opt = torch.optim.AdamW(wrapped.parameters(), lr=args.lr)

        if rank == 0:
            log(rank, f"torch {torch.__version__}, transformers {transformers.__version__}, "
                      f"mode {args.mode}, world {args.world}, threads/rank {args.threads}, "
                      f"attn {attn_used}")
            log(rank, f"model {args.model}: params {params} ({params / 1e6:.1f}M), "
                      f"local params on rank 0 {local_params}, micro-batch {args.micro_batch}, "
                      f"seq {args.seq}")

        gen = torch.Generator().manual_seed(args.seed * 1000 + 1 + rank)
        vocab = preset["vocab"]

        def step():
            ids = torch.randint(0, vocab, (args.micro_batch, args.seq), generator=gen)
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            return time.perf_counter() - t0, float(loss.detach())

        for i in range(args.warmup):
            dt, loss = step()
            if rank == 0:
                log(rank, f"warmup {i + 1}/{args.warmup}: {dt:.3f} s, loss {loss:.4f}")
        global_tokens = args.world * args.micro_batch * args.seq
        dist.barrier()
        t_start = time.perf_counter()
        times = []
        for i in range(args.steps):
            dt, loss = step()
            times.append(dt)
            if rank == 0:
                log(rank, f"step {i + 1}/{args.steps}: {dt:.3f} s, "
                          f"{global_tokens / dt:.1f} tok/s (all ranks), loss {loss:.4f}")
        dist.barrier()
        wall = time.perf_counter() - t_start

        # Mean loss over ranks of the last step; peak RSS of every rank (ru_maxrss is KiB on
        # Linux).
        loss_t = torch.tensor([loss], dtype=torch.float64)
        dist.all_reduce(loss_t)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rss_all = [None] * args.world
        dist.all_gather_object(rss_all, rss)
        local_all = [None] * args.world
        dist.all_gather_object(local_all, local_params)

        if rank == 0:
            med = statistics.median(times)
            result = {
                "impl": f"pytorch-{args.mode}",
                "mode": args.mode,
                "world": args.world,
                "model": args.model,
                "params": params,
                "tokens_per_s": round(global_tokens * args.steps / wall, 2),
                "peak_rss_bytes": rss_all,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "backend": "gloo",
                "micro_batch": args.micro_batch,
                "seq": args.seq,
                "global_batch": args.world * args.micro_batch,
                "threads_per_rank": args.threads,
                "steps": args.steps,
                "warmup": args.warmup,
                "wall_s": round(wall, 6),
                "step_s_median_rank0": round(med, 6),
                "step_s_min_rank0": round(min(times), 6),
                "local_params": local_all,
                "wrap": wrap_desc,
                "attn": attn_used,
                "dtype": "float32",
                "optimizer": f"torch.optim.AdamW(lr={args.lr:g})",
                "last_loss_mean": round(float(loss_t.item()) / args.world, 6),
                "cpu_count": os.cpu_count(),
            }
            print(json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    import torch.multiprocessing as mp

    # Children inherit this before they import torch, so OpenMP starts with the right pool.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    mp.spawn(worker, args=(args, free_port()), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
