#!/usr/bin/env bash
# Fuzz the hostfile and host-filter parsers of ringmaster-hostfile with
# cargo-fuzz (libFuzzer), each target for a bounded time.
#
# Usage: bench/fuzz-hostfile.sh [TARGET...]      (default: hostfile filter)
#   SECONDS_PER_TARGET  seconds per target (default 60)
#   CARGO_BUILD_JOBS    build jobs, as for any cargo build
#
# cargo-fuzz needs nightly-only flags (-Z sanitizer, sancov); the machines
# only have stable Rust, so RUSTC_BOOTSTRAP=1 unlocks them on stable.
# Crashes are written under coordinator/hostfile/fuzz/artifacts/ and make
# this script exit non-zero.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/coordinator/hostfile/fuzz"
seconds="${SECONDS_PER_TARGET:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-hostfile: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(hostfile filter)
fi

cd "$fuzz_dir"

# Seed each corpus (kept out of git) with a few valid and invalid inputs so
# libFuzzer starts from the grammar rather than from nothing.
seed() {
    local target="$1" name="$2" content="$3"
    mkdir -p "corpus/$target"
    [ -e "corpus/$target/$name" ] || printf '%b' "$content" >"corpus/$target/$name"
}
seed hostfile ok 'worker-0 slots=8\nworker-1\tslots=4 # comment\n\n# only a comment\n'
seed hostfile dup 'a slots=1\nb slots=2\na slots=3\n'
seed hostfile bad 'worker-2 slot=4\nx slots=0\ny slots=-1 extra\n'
# filter inputs: two count bytes, then the filter text.
seed filter include '\x00\x00worker-0@worker-1:0,1'
seed filter localhost '\x00\x00localhost:1,0'
seed filter slots '\x00\x00node-10:7,3@worker-0:3'
seed filter counts '\x02\x02worker-0'
seed filter bad '\x00\x00a@@b:1,,1'

for target in "${targets[@]}"; do
    echo "fuzz-hostfile: $target for ${seconds}s" >&2
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- \
        -max_total_time="$seconds"
done
echo "fuzz-hostfile: all targets ran ${seconds}s without a crash" >&2
