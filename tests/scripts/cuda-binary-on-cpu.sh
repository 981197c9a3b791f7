#!/usr/bin/env bash
# The release trainer built with `--features cuda`, on a machine without a GPU (CI):
# - `device: cuda` exits 2 before reading any data, with one line naming the missing driver;
# - the README's quickstart (examples/quickstart.yaml, unchanged but for its output_dir;
#   `device` unset: auto) on 4 local ranks, as `ringctl local --nodes 2 --slots 2` runs it
#   (RANK/WORLD_SIZE and a directory store instead of the daemons), trains on the CPU, says so
#   in its start-up line, and learns: held-out exact match >= 90%.
# Usage: tests/scripts/cuda-binary-on-cpu.sh [TRAINER]   (default target/release/trainer)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
trainer="${1:-target/release/trainer}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fail() {
    echo "cuda-binary-on-cpu: FAILED: $*" >&2
    exit 1
}

echo "== device-info"
"$trainer" device-info --request auto | grep '"line"'

echo "== device: cuda without a GPU"
sed "s|^output_dir:.*|output_dir: $tmp/cuda-out|" examples/quickstart.yaml >"$tmp/cuda.yaml"
echo "device: cuda" >>"$tmp/cuda.yaml"
set +e
"$trainer" "$tmp/cuda.yaml" >"$tmp/cuda.out" 2>"$tmp/cuda.err"
rc=$?
set -e
cat "$tmp/cuda.err"
[ "$rc" = 2 ] || fail "device: cuda exited $rc, expected 2"
[ "$(wc -l <"$tmp/cuda.err")" = 1 ] || fail "expected one line on stderr"
grep -q "libcuda" "$tmp/cuda.err" || fail "the line does not name the driver library"
[ ! -e "$tmp/cuda-out" ] || fail "something ran"

echo "== the quickstart on 4 ranks, device auto"
sed "s|^output_dir:.*|output_dir: $tmp/out|" examples/quickstart.yaml >"$tmp/q.yaml"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT
start=$(date +%s)
for rank in 0 1 2 3; do
    RANK=$rank WORLD_SIZE=4 LOCAL_WORLD_SIZE=4 LOCAL_RANK=$rank RINGMASTER_STORE_DIR="$tmp/store" \
        RINGMASTER_JOB_ID=quickstart timeout 1500 "$trainer" "$tmp/q.yaml" \
        >"$tmp/q$rank.out" 2>"$tmp/q$rank.err" &
    pids+=($!)
done
for rank in 0 1 2 3; do
    wait "${pids[$rank]}" || {
        tail -20 "$tmp/q$rank.err"
        fail "rank $rank of the quickstart failed"
    }
done
echo "trained in $(($(date +%s) - start)) s"
grep "^trainer: device:" "$tmp/q0.err"
grep -q "^trainer: device: cpu (auto" "$tmp/q0.err" || fail "no 'device: cpu (auto ...)' line"
line="$(grep "^eval: exact match" "$tmp/q0.out" || true)"
echo "$line"
pct="$(echo "$line" | sed -n 's/.*= \([0-9.]*\)%.*/\1/p')"
[ -n "$pct" ] || fail "no eval line"
awk -v p="$pct" 'BEGIN { exit !(p >= 90) }' || fail "exact match $pct% < 90%"
echo "cuda-binary-on-cpu: ok"
