#!/usr/bin/env python3
"""Failover time of Ringmaster coordinators on etcd (issue 20).

Starts one etcd member, three coordinators on it (`--store etcd://...`, `--leader-ttl TTL`) and
two agents given all three addresses, with a job running a sleep loop on both nodes. Then, per
trial: SIGKILL the leader and time
  - `leads`:    until a standby logs that it leads;
  - `serving`:  until `ringctl --coordinator A,B,C nodes` (the list) answers from the new leader;
  - `attached`: until the job's ranks are all RUNNING again on it (agents re-attached, workers
                adopted, not restarted).
The killed coordinator is started again as a standby before the next trial. At the end it checks
that the job never restarted (restart_count 0, generation 0).

Compare against the default leader election of Kubernetes' control plane (15 s lease,
`--leader-elect-lease-duration`), which bounds how fast kube-controller-manager fails over.

Usage: bench/ha/failover.py [--trials 10] [--ttl 5s] [--bin target/release]
Needs `etcd` on PATH (Debian's etcd-server) and built coordinator/agent/ringctl binaries.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, fn, timeout=60.0, every=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = fn()
        if v is not None and v is not False:
            return v
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--ttl", default="5s")
    ap.add_argument("--bin", default="target/release")
    args = ap.parse_args()
    b = os.path.abspath(args.bin)
    work = tempfile.mkdtemp(prefix="rm-failover-")
    procs = []

    def spawn(name, cmd):
        log = open(os.path.join(work, name + ".log"), "ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        cport, pport = free_port(), free_port()
        spawn("etcd", [
            "etcd", "--name", "b", "--data-dir", os.path.join(work, "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{cport}",
            "--advertise-client-urls", f"http://127.0.0.1:{cport}",
            "--listen-peer-urls", f"http://127.0.0.1:{pport}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
            "--initial-cluster", f"b=http://127.0.0.1:{pport}",
        ])
        wait("etcd", lambda: "ready to serve client requests" in open(os.path.join(work, "etcd.log")).read())
        url = f"etcd://127.0.0.1:{cport}/bench"
        ports = [free_port() for _ in range(3)]
        addrs = [f"127.0.0.1:{p}" for p in ports]
        coords = {}

        def start_coordinator(i):
            log = f"coordinator-{i}-{time.monotonic_ns()}"
            p = spawn(log, [
                f"{b}/coordinator", "--listen", addrs[i], "--store", url,
                "--data-dir", os.path.join(work, f"data-{i}"), "--leader-ttl", args.ttl,
                "--heartbeat-timeout", "10s",
            ])
            coords[i] = (p, os.path.join(work, log + ".log"))

        for i in range(3):
            start_coordinator(i)
        all_addrs = ",".join(addrs)
        for n in ("n0", "n1"):
            spawn(n, [
                f"{b}/agent", "--join", all_addrs, "--name", n, "--slots", "2",
                "--work-dir", os.path.join(work, "work-" + n), "--allowed-root", work,
            ])

        def ringctl(*a):
            r = subprocess.run([f"{b}/ringctl", "--coordinator", all_addrs, *a],
                               capture_output=True, text=True, timeout=30)
            return r

        def nodes_joined():
            r = ringctl("nodes", "--output", "json")
            if r.returncode != 0:
                return None
            try:
                ns = json.loads(r.stdout)
            except json.JSONDecodeError:
                return None
            return True if len([n for n in ns if n.get("state") == "JOINED"]) == 2 else None

        wait("agents", nodes_joined)
        spec = os.path.join(work, "job.yaml")
        with open(spec, "w") as f:
            f.write("command: [sh, -c, 'while true; do sleep 0.2; done']\n")
        r = ringctl("submit", spec, "--output", "json")
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        job = json.loads(r.stdout)["id"]

        def status():
            r = ringctl("status", job, "--output", "json")
            return json.loads(r.stdout) if r.returncode == 0 and r.stdout else None

        def running():
            st = status()
            return st if st and st["state"] == "RUNNING" and all(
                x.get("state") == "RUNNING" for x in st.get("ranks", [])) else None

        wait("job running", running)

        def leader():
            for i, (p, log) in coords.items():
                if p.poll() is None and "INFO leading" in open(log).read():
                    return i
            return None

        rows = []
        for t in range(args.trials):
            i = wait("a leader", leader)
            p, _ = coords[i]
            standby_logs = {k: v[1] for k, v in coords.items() if k != i}
            t0 = time.monotonic()
            p.send_signal(signal.SIGKILL)
            p.wait()
            wait("a new leader", lambda: any(
                "INFO leading" in open(l).read() for l in standby_logs.values()))
            leads = time.monotonic() - t0
            wait("serving", lambda: ringctl("nodes").returncode == 0)
            serving = time.monotonic() - t0
            wait("ranks re-attached", running)
            attached = time.monotonic() - t0
            rows.append((leads, serving, attached))
            print(f"trial {t + 1}: leads {leads:.2f} s, serving {serving:.2f} s, attached {attached:.2f} s",
                  flush=True)
            start_coordinator(i)
        st = status()
        print(f"job after {args.trials} failovers: state {st['state']}, generation {st.get('generation', 0)}, "
              f"restarts {st.get('restart_count', 0)}")
        for k, name in enumerate(("leads", "serving", "attached")):
            xs = [r[k] for r in rows]
            print(f"{name}: median {statistics.median(xs):.2f} s, max {max(xs):.2f} s (ttl {args.ttl})")
        if st.get("restart_count", 0) or st.get("generation", 0):
            sys.exit("the job restarted across a failover")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


if __name__ == "__main__":
    main()
