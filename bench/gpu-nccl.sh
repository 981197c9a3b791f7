#!/usr/bin/env bash
# GPU smoke test of the NCCL backend of ringmaster-collectives (feature `cuda`), for a machine
# with an NVIDIA GPU. It builds nothing when given (or finding) a test binary.
#
# What it shows: WORLD SIZE 1 ONLY, on GPU 0 — cudarc loading the CUDA driver and NCCL at run
# time, NCCL init from a unique id shipped through the bootstrap store (an in-process
# MemStore), and the plumbing of each collective: all_reduce (sum, avg, max), reduce_scatter,
# all_gather, broadcast and barrier over host buffers of f32, bf16 and f16 of 0, 1 and
# 1,000,003 elements (world 1: every result equals its input), the device-buffer calls, and
# the abort handle. It is the #[ignore]d test nccl::tests::nccl_world_size_one_on_gpu0.
# It does NOT measure bandwidth, and does not run two ranks (NCCL refuses two ranks on one
# GPU), so the cross-rank arithmetic and the uneven-shard padding are covered only by the
# CPU unit tests of nccl.rs.
#
# Usage: bench/gpu-nccl.sh [TEST_BINARY]
#   TEST_BINARY  the collectives' unit-test binary built with the `cuda` feature, e.g. built
#                on another machine with
#                  cargo test -p ringmaster-collectives --features cuda --release --no-run
#                (cargo prints its path, target/release/deps/ringmaster_collectives-<hash>)
#                and carried here. Without it, the newest such binary under
#                target/release/deps is used; failing that, `cargo test` builds and runs it
#                if cargo is installed here.
#   NCCL_LIB_DIR        a folder holding libnccl.so.2 (otherwise searched for: Python
#                       site-packages' nvidia/*/lib, then the system's library folders)
#   NCCL_DEBUG          passed to NCCL (default WARN; INFO shows its init)
#   NCCL_SOCKET_IFNAME  NCCL's bootstrap interface (default lo: one process, one machine)
#   NCCL_INCLUDE_IGNORED=1  run every nccl test (--include-ignored), not only the GPU one
#
# cudarc loads NCCL as libnccl.so, not libnccl.so.2 (the name NCCL installs), so this makes a
# temporary folder with a libnccl.so symlink and puts it first in LD_LIBRARY_PATH.
# Exit status: the test's.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
else
    echo "nvidia-smi not found"
fi

echo "== CUDA driver library (cudarc loads libcuda.so or libcuda.so.1)"
if ldconfig -p 2>/dev/null | grep -E 'libcuda\.so(\.1)? ' ; then
    :
else
    echo "libcuda.so is not in the loader cache; it must be in LD_LIBRARY_PATH"
fi

# Prints the path of a libnccl.so.2 (or libnccl.so), or nothing.
find_nccl() {
    local dirs=() d f py
    if [ -n "${NCCL_LIB_DIR:-}" ]; then
        dirs+=("$NCCL_LIB_DIR")
    fi
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1; then
            while IFS= read -r d; do
                if [ -d "$d/nvidia" ]; then dirs+=("$d/nvidia"); fi
            done < <("$py" -c 'import site
for p in site.getsitepackages() + [site.getusersitepackages()]: print(p)' 2>/dev/null || true)
        fi
    done
    for d in /opt/*/.venv/lib/python3*/site-packages/nvidia /usr/local/lib/python3*/dist-packages/nvidia \
        /usr/lib/python3/dist-packages/nvidia; do
        if [ -d "$d" ]; then dirs+=("$d"); fi
    done
    dirs+=(/usr/lib/x86_64-linux-gnu /usr/local/cuda/lib64 /usr/local/nvidia/lib64 /usr/lib64 /usr/local/lib)
    for d in "${dirs[@]}"; do
        [ -d "$d" ] || continue
        f="$(find -L "$d" -maxdepth 4 \( -name 'libnccl.so.2' -o -name 'libnccl.so' \) \
            \( -type f -o -type l \) 2>/dev/null | sort | sed -n 1p)"
        if [ -n "$f" ]; then
            echo "$f"
            return 0
        fi
    done
    ldconfig -p 2>/dev/null | awk '/libnccl\.so(\.2)? /{print $NF; exit}'
}

echo "== NCCL"
nccl="$(find_nccl)"
if [ -z "$nccl" ]; then
    echo "libnccl.so.2 not found (set NCCL_LIB_DIR to the folder that holds it)" >&2
    exit 1
fi
echo "found $nccl -> $(readlink -f "$nccl")"
if command -v python3 >/dev/null 2>&1; then
    python3 -m pip list 2>/dev/null | grep -i '^nvidia-nccl' || true
fi
libdir="$(mktemp -d)"
trap 'rm -rf "$libdir"' EXIT
ln -s "$(readlink -f "$nccl")" "$libdir/libnccl.so"
nccl_dir="$(dirname "$(readlink -f "$nccl")")"
export LD_LIBRARY_PATH="$libdir:$nccl_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-lo}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
echo "NCCL_DEBUG=$NCCL_DEBUG NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME"

# NCCL_INCLUDE_IGNORED=1: every nccl test of the binary (the CPU-only ones too), not only the
# #[ignore]d GPU one.
if [ "${NCCL_INCLUDE_IGNORED:-0}" = 1 ]; then
    test_args=(--include-ignored --nocapture --test-threads=1 nccl)
else
    test_args=(--ignored --nocapture --test-threads=1 nccl)
fi

bin="${1:-}"
if [ -z "$bin" ] && [ -d target/release/deps ]; then
    bin="$(find target/release/deps -maxdepth 1 -type f -perm -u+x -name 'ringmaster_collectives-*' \
        ! -name '*.*' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -n 1 | cut -d' ' -f2-)"
fi

echo "== test"
if [ -n "$bin" ]; then
    if [ ! -x "$bin" ]; then
        echo "$bin is not an executable" >&2
        exit 1
    fi
    echo "running $bin ${test_args[*]}"
    status=0
    "$bin" "${test_args[@]}" || status=$?
    exit "$status"
elif command -v cargo >/dev/null 2>&1; then
    echo "no test binary given or found: cargo test"
    status=0
    cargo test -p ringmaster-collectives --features cuda --release -- "${test_args[@]}" || status=$?
    exit "$status"
else
    echo "no test binary given or found under target/release/deps, and no cargo here;" >&2
    echo "build one elsewhere with" >&2
    echo "  cargo test -p ringmaster-collectives --features cuda --release --no-run" >&2
    echo "and pass its path (carried to this machine) as the first argument" >&2
    exit 2
fi
