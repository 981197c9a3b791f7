#!/usr/bin/env bash
# torchrun's restart latency, measured like target/release/restart-latency measures ours:
# 4 ranks on one node, rank 2 exits 1 in the first attempt while the others sleep; from the
# failing worker's last timestamp to the last restarted worker's first one. The workers are
# the same shell script (--no-python), so only the launchers differ.
# Needs bench/.venv with torch (bench/collectives/run.sh makes it).
# Usage: bench/restart/torchrun.sh [TRIALS]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
trials="${1:-20}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for t in $(seq 1 "$trials"); do
    OUT="$out" TRIAL="$t" timeout 120 "$root/bench/.venv/bin/torchrun" --nnodes 1 --nproc-per-node 4 \
        --max-restarts 1 --no-python --master-port $((29600 + t % 100)) \
        "$root/bench/restart/torchrun-worker.sh" >"$out/log-$t" 2>&1
    e=$(cat "$out/exit-$t"); m=0
    for r in 0 1 2 3; do s=$(cat "$out/start-$t-$r"); [ "$s" -gt "$m" ] && m=$s; done
    echo "$(( (m - e) / 100000 ))"
done | sort -n | awk '{a[NR]=$1/10} END {print "torchrun restart latency over "NR" trials: min "a[1]" ms, median "a[int((NR+1)/2)]" ms, p90 "a[int(NR*0.9)]" ms, max "a[NR]" ms"}'
