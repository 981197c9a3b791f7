"""The torch side of tests/tcpstore_torch.rs (run by it, with RINGMASTER_TEST_TORCH_PYTHON).

serve LIBUV        torch serves a TCPStore; prints "PORT <port> LIBUV <bool>"; on the line
                   "check" from stdin verifies what the Rust client wrote, prints "CHECKED";
                   exits when stdin closes.
client PORT        torch is a client of the Rust server: checks the keys Rust wrote, exercises
                   every op, prints "WAITING" and waits for "late" (set by Rust), prints "DONE".
pg RANK WORLD      init_process_group("gloo", env://) under TORCHELASTIC_USE_AGENT_STORE=True
                   against the Rust server (MASTER_ADDR/MASTER_PORT), all_reduce, barrier.
"""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def say(*a):
    print(*a, flush=True)


def serve(use_libuv):
    s = dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        wait_for_workers=False,
        use_libuv=use_libuv,
        timeout=timedelta(seconds=30),
    )
    s.set("from_py", "hello from torch")
    say(f"PORT {s.port} LIBUV {s.libuvBackend}")
    for line in sys.stdin:
        if line.strip() == "check":
            assert s.get("rust_set") == b"from rust", s.get("rust_set")
            assert s.get("n") == b"3", s.get("n")
            assert dist.PrefixStore("pre", s).get("pk") == b"pv"
            assert dist.PrefixStore("b", dist.PrefixStore("a", s)).get("nested") == b"yes"
            say("CHECKED")


def client(port):
    s = dist.TCPStore(
        "127.0.0.1", port, is_master=False, timeout=timedelta(seconds=20)
    )
    # Written by Rust before starting us.
    assert s.get("rust_key") == b"hello", s.get("rust_key")
    assert s.add("counter", 2) == 7
    assert s.get("counter") == b"7"
    assert dist.PrefixStore("pre", s).get("k") == b"prefixed"
    s.set("py_key", "from python")
    assert s.check(["py_key", "rust_key"])
    assert not s.check(["nope"])
    assert s.compare_set("py_key", "from python", "swapped") == b"swapped"
    assert s.compare_set("py_key", "wrong", "x") == b"swapped"
    assert s.compare_set("cs_new", "", "v") == b"v"
    assert s.compare_set("cs_absent", "e", "d") == b"e"
    s.set("doomed", "x")
    assert s.delete_key("doomed")
    assert not s.delete_key("doomed")
    s.append("log", "ab")
    s.append("log", "cd")
    assert s.get("log") == b"abcd"
    s.multi_set(["m1", "m2"], ["x", "yy"])
    assert s.multi_get(["m1", "m2"]) == [b"x", b"yy"]
    keys = set(s.list_keys())
    assert {"rust_key", "counter", "py_key", "log", "m1"} <= keys, keys
    assert s.num_keys() == len(keys) + 0, (s.num_keys(), keys)
    s.queue_push("q", "one")
    s.queue_push("q", "two")
    assert s.queue_len("q") == 2
    assert s.queue_pop("q") == b"one"
    assert s.queue_pop("q", block=False) == b"two"
    # A wait that times out leaves the store usable (CANCEL_WAIT).
    try:
        s.wait(["never"], timedelta(milliseconds=100))
        raise AssertionError("wait did not time out")
    except dist.DistStoreError:
        pass
    assert s.get("py_key") == b"swapped"
    dist.PrefixStore("pre", s).set("from_py", "pv")
    say("WAITING")
    s.wait(["late"], timedelta(seconds=20))
    assert s.get("late") == b"set by rust"
    say("DONE")


def pg(rank, world):
    dist.init_process_group("gloo", rank=rank, world_size=world)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    dist.barrier()
    say(f"PG {rank} SUM {int(t.item())}")
    dist.destroy_process_group()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "serve":
        serve(sys.argv[2] == "1")
    elif mode == "client":
        client(int(sys.argv[2]))
    elif mode == "pg":
        pg(int(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
