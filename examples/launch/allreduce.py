"""A PyTorch program under `ringctl launch`, unchanged from how it runs under torchrun.

`init_process_group` reads the environment the launcher gives every worker (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK, ...) and, told TORCHELASTIC_USE_AGENT_STORE=True, uses
the launchers' rendezvous store on MASTER_ADDR:MASTER_PORT as a client (node 0's `ringctl
launch` serves it, in torch's TCPStore protocol) instead of serving one itself.

Two nodes, two workers each (run the second line on the second machine):

    ringctl launch --nnodes 2 --nproc-per-node 2 --node-rank 0 --master-addr HOST0 \\
        --max-restarts 1 examples/launch/allreduce.py
    ringctl launch --nnodes 2 --nproc-per-node 2 --node-rank 1 --master-addr HOST0 \\
        --max-restarts 1 examples/launch/allreduce.py

`--fail-once RANK` makes that rank exit 1 in the first attempt: every node's workers are
stopped and all start again together (one restart of the job's budget), and the second attempt
meets and reduces as the first would have.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-once", type=int, default=None, metavar="RANK")
    args = parser.parse_args()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.fail_once == rank and attempt == 0:
        print(f"rank {rank}: failing on purpose in attempt 0", flush=True)
        return 1
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    want = world * (world + 1) / 2
    node = os.environ.get("NODE_RANK", "?")
    print(
        f"rank {rank}/{world} on node {node}, attempt {attempt}: "
        f"all_reduce {t.item():.0f} (want {want:.0f})",
        flush=True,
    )
    dist.destroy_process_group()
    return 0 if t.item() == want else 1


if __name__ == "__main__":
    sys.exit(main())
