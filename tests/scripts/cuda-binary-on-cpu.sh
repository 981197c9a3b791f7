#!/usr/bin/env bash
# The release trainer built with `--features cuda`, on a machine without a GPU (CI):
# - `device: cuda` exits 2 before reading any data, with one line naming the missing driver;
# - the quickstart config, unchanged but for its output_dir (`device` unset: auto), trains on the
#   CPU, says so in its start-up line, and learns (held-out exact match >= 90%, the figure the
#   test suite asks of the one-process run).
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

echo "== the quickstart, device auto"
sed "s|^output_dir:.*|output_dir: $tmp/out|" examples/quickstart.yaml >"$tmp/q.yaml"
start=$(date +%s)
timeout 1500 "$trainer" "$tmp/q.yaml" >"$tmp/q.out" 2>"$tmp/q.err" || {
    tail -20 "$tmp/q.err"
    fail "the quickstart failed"
}
echo "trained in $(($(date +%s) - start)) s"
grep "^trainer: device:" "$tmp/q.err"
grep -q "^trainer: device: cpu (auto" "$tmp/q.err" || fail "no 'device: cpu (auto ...)' line"
line="$(grep "^eval: exact match" "$tmp/q.out" || true)"
echo "$line"
pct="$(echo "$line" | sed -n 's/.*= \([0-9.]*\)%.*/\1/p')"
[ -n "$pct" ] || fail "no eval line"
awk -v p="$pct" 'BEGIN { exit !(p >= 90) }' || fail "exact match $pct% < 90%"
echo "cuda-binary-on-cpu: ok"
