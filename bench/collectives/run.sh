#!/usr/bin/env bash
# Collective bandwidth, side by side in one session: Ringmaster's TCP ring (`trainer collective`),
# PyTorch's gloo backend on CPU, and the single-stream TCP loopback ceiling (iperf3).
# all_reduce, reduce_scatter and all_gather, float32, at 2 and 4 ranks on this machine, with
# nccl-tests' algbw/busbw definitions (GB/s = 1e9 bytes/s).
#
# Usage: bench/collectives/run.sh          (from anywhere; not part of CI)
#
# Environment:
#   WORLDS      rank counts (default "2 4")
#   OPS         ops (default "all_reduce reduce_scatter all_gather")
#   SIZES       comma-separated buffer sizes (default 1KiB,4KiB,...,256MiB, powers of 4)
#   ITERS       timed iterations per size (default: clamp(2^30/bytes, 3, 50), both sides)
#   TRAINER     our binary (default target/release/trainer; skipped with a message if missing)
#   OURS_TRANSPORT  --transport for ours when the binary has that flag (default tcp: the same
#               medium as gloo and the loopback ceiling; "auto" uses Unix sockets on one machine)
#   SKIP_GLOO=1 / SKIP_OURS=1 / SKIP_LOOPBACK=1   leave a side out
#   RESULTS     output file (default bench/collectives/results-<UTC date-time>.jsonl)
#
# Setup it does itself: a venv at bench/.venv with torch (CPU wheel from the PyTorch index if
# reachable, else plain PyPI, which pulls the CUDA dependency wheels too: several GB, minutes),
# and iperf3 from Debian (apt-get, as root) if missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/bench/.venv"
worlds="${WORLDS:-2 4}"
ops="${OPS:-all_reduce reduce_scatter all_gather}"
sizes="${SIZES:-1KiB,4KiB,16KiB,64KiB,256KiB,1MiB,4MiB,16MiB,64MiB,256MiB}"
trainer="${TRAINER:-$root/target/release/trainer}"
results="${RESULTS:-$here/results-$(date -u +%Y%m%d-%H%M%SZ).jsonl}"
logdir="$(mktemp -d "${TMPDIR:-/tmp}/ringmaster-collectives.XXXXXX")"
failed=0

log() { echo "collectives: $*" >&2; }

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# ---------------------------------------------------------------- setup
ensure_torch() {
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import torch' 2>/dev/null; then
        return 0
    fi
    if [ ! -x "$venv/bin/python" ]; then
        log "creating venv $venv"
        python3 -m venv "$venv"
    fi
    local t0=$SECONDS
    log "installing torch (CPU wheel index first)"
    if timeout 900 "$venv/bin/pip" install --retries 1 --timeout 20 torch \
        --index-url https://download.pytorch.org/whl/cpu >"$logdir/pip-cpu.log" 2>&1; then
        log "torch (CPU wheel) installed in $((SECONDS - t0)) s"
        return 0
    fi
    log "CPU wheel index not usable (see $logdir/pip-cpu.log); installing torch from PyPI (large: CUDA dependency wheels)"
    t0=$SECONDS
    "$venv/bin/pip" install torch >"$logdir/pip-pypi.log" 2>&1 || {
        tail -20 "$logdir/pip-pypi.log" >&2
        log "pip install torch failed"
        return 1
    }
    log "torch (PyPI) installed in $((SECONDS - t0)) s"
}

ensure_iperf3() {
    command -v iperf3 >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing iperf3 (apt-get)"
        if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3) \
            >"$logdir/apt.log" 2>&1; then
            return 0
        fi
        log "apt-get install iperf3 failed (see $logdir/apt.log); loopback.sh uses its python fallback"
    else
        log "iperf3 missing and not root; loopback.sh uses its python fallback"
    fi
}

# ---------------------------------------------------------------- runs
: >"$results"
python3 - >>"$results" <<'EOF'
import json, os, platform, datetime
cpu = ""
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip(); break
except OSError:
    pass
print(json.dumps({"impl": "meta", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu}))
EOF

if [ "${SKIP_LOOPBACK:-0}" != 1 ]; then
    ensure_iperf3
    log "loopback ceiling (one TCP stream)"
    if ! "$here/loopback.sh" | tee -a "$results"; then
        log "loopback measurement failed"
        failed=1
    fi
fi

if [ "${SKIP_GLOO:-0}" != 1 ]; then
    if ensure_torch; then
        gloo_ops="$(echo $ops | tr ' ' ',')"
        for n in $worlds; do
            log "gloo, world $n ($gloo_ops)"
            iters_arg=()
            [ -n "${ITERS:-}" ] && iters_arg=(--iters "$ITERS")
            if ! "$venv/bin/python" "$here/gloo_bench.py" --world "$n" --ops "$gloo_ops" \
                --bytes "$sizes" "${iters_arg[@]}" --timeout 3600 \
                2>"$logdir/gloo-$n.log" | tee -a "$results"; then
                tail -20 "$logdir/gloo-$n.log" >&2
                log "gloo world $n failed"
                failed=1
            fi
        done
    else
        log "skipping gloo: torch could not be installed"
        failed=1
    fi
fi

# One rank of ours per process, bootstrapped through a fresh directory store.
run_ours() {
    local op="$1" n="$2" store pids=() r rc=0 cli_op
    cli_op="${op//_/-}" # clap value names: all-reduce, reduce-scatter, all-gather
    store="$(mktemp -d "$logdir/store-$op-$n.XXXXXX")"
    local extra=()
    [ -n "${ITERS:-}" ] && extra+=(--iters "$ITERS")
    [ -n "$ours_transport" ] && extra+=(--transport "$ours_transport")
    for ((r = n - 1; r >= 0; r--)); do
        local out=/dev/null
        [ "$r" = 0 ] && out="$logdir/ours-$op-$n.jsonl"
        RANK=$r WORLD_SIZE=$n RINGMASTER_JOB_ID=bench RINGMASTER_GENERATION=0 \
            timeout 3600 "$trainer" collective --op "$cli_op" --bytes "$sizes" --output json \
            --store-dir "$store" "${extra[@]}" >"$out" 2>"$logdir/ours-$op-$n-rank$r.log" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do
        wait "$p" || rc=$?
    done
    if [ "$rc" != 0 ]; then
        tail -5 "$logdir"/ours-"$op"-"$n"-rank*.log >&2 || true
        log "ours: $op world $n failed (exit $rc)"
        return 1
    fi
    # Record the transport in each line (the summarizer ignores it).
    OURS_TRANSPORT_TAG="${ours_transport:-default}" python3 -c '
import json, os, sys
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        d = json.loads(line)
        d.setdefault("transport", os.environ["OURS_TRANSPORT_TAG"])
        print(json.dumps(d))
' <"$logdir/ours-$op-$n.jsonl" | tee -a "$results"
}

if [ "${SKIP_OURS:-0}" != 1 ]; then
    if [ -x "$trainer" ]; then
        ours_transport=""
        if [[ "$("$trainer" collective --help 2>&1 || true)" == *--transport* ]]; then
            ours_transport="${OURS_TRANSPORT:-tcp}"
        fi
        for n in $worlds; do
            for op in $ops; do
                log "ringmaster, $op, world $n"
                run_ours "$op" "$n" || failed=1
            done
        done
    else
        log "skipping ours: $trainer not found (build it: cargo build --release -p ringmaster-trainer)"
    fi
fi

log "results: $results (logs: $logdir)"
python3 "$here/summarize.py" "$results"
exit "$failed"
