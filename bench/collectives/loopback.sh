#!/usr/bin/env bash
# Single-stream TCP loopback ceiling: one raw TCP stream between two processes on 127.0.0.1.
# Prints one JSON line: {"impl":"loopback","gbs":<GB/s, 1e9 bytes/s>,"tool":"iperf3"|"python",...}
#
# Uses iperf3 (Debian package) when present: server and client on 127.0.0.1, one stream,
# LOOPBACK_SECONDS (default 5) seconds, receiver-side throughput. Without iperf3 (or if it
# fails), falls back to a small python sender/receiver (sendall of 4 MiB blocks, recv_into).
#
#   LOOPBACK_SECONDS  duration (default 5)
#   LOOPBACK_TOOL     force "iperf3" or "python"
set -euo pipefail

secs="${LOOPBACK_SECONDS:-5}"
tool="${LOOPBACK_TOOL:-}"
py="${PYTHON:-python3}"

free_port() {
    "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

run_iperf3() {
    local port json server
    port="$(free_port)"
    iperf3 -s -B 127.0.0.1 -p "$port" >/dev/null 2>&1 &
    server=$!
    # The client retries while the server starts (a bare probe connection would upset iperf3).
    json=""
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        sleep 0.3
        if json="$(iperf3 -c 127.0.0.1 -p "$port" -t "$secs" -P 1 -J 2>/dev/null)"; then
            break
        fi
        json=""
    done
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    [ -n "$json" ] || return 1
    printf '%s' "$json" | "$py" -c '
import json, sys
d = json.load(sys.stdin)
if "error" in d:
    sys.exit("iperf3: " + d["error"])
recv = d["end"]["sum_received"]
sent = d["end"]["sum_sent"]
print(json.dumps({
    "impl": "loopback", "tool": "iperf3", "streams": 1,
    "gbs": recv["bits_per_second"] / 8 / 1e9,
    "sender_gbs": sent["bits_per_second"] / 8 / 1e9,
    "seconds": recv["seconds"], "bytes": recv["bytes"],
    "version": d.get("start", {}).get("version", ""),
}))
'
}

run_python() {
    "$py" - "$secs" <<'EOF'
import json, multiprocessing as mp, socket, sys, time

SECS = float(sys.argv[1])
BLOCK = 4 << 20

def receiver(port_q, result_q):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_q.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    t0 = None
    while True:
        n = conn.recv_into(view)
        if n == 0:
            break
        if t0 is None:
            t0 = time.perf_counter()
        total += n
    result_q.put((total, time.perf_counter() - t0))

if __name__ == "__main__":
    port_q, result_q = mp.Queue(), mp.Queue()
    p = mp.Process(target=receiver, args=(port_q, result_q))
    p.start()
    port = port_q.get()
    s = socket.create_connection(("127.0.0.1", port))
    payload = bytes(BLOCK)
    end = time.perf_counter() + SECS
    while time.perf_counter() < end:
        s.sendall(payload)
    s.close()
    total, secs = result_q.get()
    p.join()
    print(json.dumps({"impl": "loopback", "tool": "python", "streams": 1,
                      "gbs": total / secs / 1e9, "seconds": secs, "bytes": total}))
EOF
}

if [ "$tool" != "python" ] && command -v iperf3 >/dev/null 2>&1; then
    if run_iperf3; then
        exit 0
    fi
    echo "loopback: iperf3 failed; falling back to the python sender/receiver" >&2
elif [ "$tool" != "python" ]; then
    echo "loopback: iperf3 not found; using the python sender/receiver" >&2
fi
run_python
