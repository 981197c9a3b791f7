"""Daemonless launch, timed: from the last node's launch to the first training step, and from a
worker's death to every node training again, for `ringctl launch`, torchrun (running the same
trainer with --no-python) and `ringctl local`, on 2 "nodes" x 2 ranks of this machine (loopback).

    bench/.venv/bin/python bench/launch/startup.py [--bin target/release] [--rounds 3]

The job: examples/llamafactory/qwen3_full_sft_ds3.yaml on a tiny random Qwen3 (made here as
tests/tests/llamafactory.rs makes it), max_steps 40 (400 for the recovery runs, whose
worker is killed at step 3; the restarted run starts again from step 1, no checkpoint; for
`ringctl local` a job file with max_restarts 1 and restart_backoff 0s wraps the recipe). Rounds
alternate the launchers (paired, interleaved). Prints one JSON line per measurement and a summary (median seconds).
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RECIPE = "examples/llamafactory/qwen3_full_sft_ds3.yaml"
STEP = re.compile(rb"step (\d+)/")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Watch:
    """Reads a process's merged output; records when each 'step N/' line is seen."""

    def __init__(self, proc):
        self.proc = proc
        self.steps = []  # (time, step)
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            m = STEP.search(line)
            if m:
                with self.cond:
                    self.steps.append((time.monotonic(), int(m.group(1))))
                    self.cond.notify_all()

    def wait(self, pred, timeout=600):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for t, s in self.steps:
                    if pred(t, s):
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no matching step line")
                self.cond.wait(left)


def make_model(trainer, work):
    data = os.path.join(ROOT, "examples/llamafactory/data")
    subprocess.run([trainer, "tokenizer", "train", f"{data}/alpaca_demo.json", f"{data}/identity.json",
                    "--template", "qwen3", "--vocab-size", "400", "--out", f"{work}/tok"],
                   check=True, capture_output=True)
    cfg = {"model_type": "qwen3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": True, "initializer_range": 0.05}
    with open(f"{work}/q.json", "w") as f:
        json.dump(cfg, f)
    subprocess.run([trainer, "init-model", "--config", f"{work}/q.json", "--out", f"{work}/q", "--seed", "1"],
                   check=True, capture_output=True)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        with open(f"{work}/tok/{name}", "rb") as a, open(f"{work}/q/{name}", "wb") as b:
            b.write(a.read())
    return f"{work}/q"


def node_cmds(kind, args, model, out, port, restarts):
    # Recovery runs last long enough for the kill to land mid-run.
    steps = 400 if restarts else 40
    over = [f"model_name_or_path={model}", f"output_dir={out}", f"max_steps={steps}", "save_steps=100000",
            "val_size=0", "eval_strategy=no"]
    if kind == "launch":
        return [([f"{args.bin}/ringctl", "launch", "--nnodes", "2", "--node-rank", str(k), "--master-addr",
                  "127.0.0.1", "--master-port", str(port), "--nproc-per-node", "2", "--max-restarts",
                  str(restarts), RECIPE] + over) for k in (1, 0)]
    if kind == "torchrun":
        return [([args.torchrun, "--nnodes", "2", "--node-rank", str(k), "--master-addr", "127.0.0.1",
                  "--master-port", str(port), "--nproc-per-node", "2", "--max-restarts", str(restarts),
                  "--no-python", f"{args.bin}/trainer", RECIPE] + over) for k in (1, 0)]
    # ringctl local: one command for the whole cluster. Restarts are a job spec's field: a job
    # file around the recipe, with no pause before the restart (the other two restart at once;
    # the default backoff is 1 s).
    job = RECIPE
    if restarts:
        job = f"{out}-job.yaml"
        with open(job, "w") as f:
            f.write(f"name: bench\nmax_restarts: {restarts}\nrestart_backoff: 0s\n"
                    f"train: {os.path.join(ROOT, RECIPE)}\n")
    return [[f"{args.bin}/ringctl", "local", job, "--nodes", "2", "--slots", "2", "--work-dir",
             out + "-cluster"] + over[:1] + [f"output_dir={out}-cluster/out"] + over[2:]]


def start(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def descendants(pid):
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    kids = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            kids.setdefault(int(parts[1]), []).append((int(parts[0]), parts[2] if len(parts) > 2 else ""))
    found, todo = [], [pid]
    while todo:
        for c, a in kids.get(todo.pop(), []):
            found.append((c, a))
            todo.append(c)
    return found


def one(kind, args, model, work, n, recovery):
    out = f"{work}/{kind}-{n}-{'rec' if recovery else 'start'}"
    port = free_port()
    cmds = node_cmds(kind, args, model, out, port, 1 if recovery else 0)
    procs = []
    try:
        for i, c in enumerate(cmds):
            if i:
                time.sleep(0.2)
            t_last = time.monotonic()
            procs.append(start(c))
        w0 = Watch(procs[-1])
        t_first = w0.wait(lambda t, s: s == 1)
        rec = {"launcher": kind, "round": n, "last_launch_to_first_step_s": round(t_first - t_last, 3)}
        if recovery:
            w0.wait(lambda t, s: s >= 3)
            # A trainer worker of the first "node" (node 1; for local, any trainer) is killed.
            victims = [p for p, a in descendants(procs[0].pid)
                       if os.path.basename(a.split(" ", 1)[0]) == "trainer"]
            if not victims:
                raise RuntimeError(f"{kind}: no trainer worker found to kill")
            t_kill = time.monotonic()
            os.kill(victims[-1], signal.SIGKILL)
            t_again = w0.wait(lambda t, s: t > t_kill and s == 1)
            rec["worker_death_to_training_again_s"] = round(t_again - t_kill, 3)
        for p in procs:
            p.wait(timeout=600)
        return rec
    finally:
        stop(procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release"))
    ap.add_argument("--torchrun", default=os.path.join(ROOT, "bench/.venv/bin/torchrun"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="launch,torchrun,local")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    work = tempfile.mkdtemp(prefix="launch-bench-")
    model = make_model(f"{args.bin}/trainer", work)
    results = []
    for recovery in (False, True):
        for n in range(args.rounds):
            for kind in kinds:
                r = one(kind, args, model, work, n, recovery)
                print(json.dumps(r), flush=True)
                results.append(r)
    summary = {}
    for key in ("last_launch_to_first_step_s", "worker_death_to_training_again_s"):
        for kind in kinds:
            xs = [r[key] for r in results if r["launcher"] == kind and key in r]
            if xs:
                summary[f"{kind}.{key}.median"] = statistics.median(xs)
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    sys.exit(main())
