#!/usr/bin/env bash
# Exercises bench/gpu/run.sh's plumbing on a machine without a GPU: FORCE=1 with a stub
# trainer, a stub NCCL test binary and a fake libnccl.so.2, then checks gpu-check.json (every
# step but nvidia_smi and torch passes; the comparison is absent without torch). No cargo, no
# GPU, no torch needed. Exit status 0 when the JSON is as expected.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
S=$(mktemp -d /tmp/rm-gpu-selftest.XXXXXX)
trap 'rm -rf "$S"' EXIT
mkdir -p "$S/lib" "$S/out"
: >"$S/lib/libnccl.so.2"
cat >"$S/trainer" <<'STUB'
#!/usr/bin/env bash
case $1 in
  device-info) echo '{"request":"cuda","selected":{"device":"cuda","ordinal":0,"name":"Stub"},"libraries":[]}' ;;
  tokenizer) out=${*: -1}; mkdir -p "$out"; echo '{}' >"$out/tokenizer.json" ;;
  *.yaml)
    out=$(sed -n 's/^output_dir: //p' "$1"); mkdir -p "$out"
    grep -q '^device: cuda$' "$1" || { echo "no device: cuda in $1" >&2; exit 3; }
    echo "device: cuda:0 (Stub GPU), LOCAL_RANK unset of 1 visible device (CUDA_VISIBLE_DEVICES unset)"
    for i in $(seq 1 12); do echo "{\"step\":$i,\"loss\":$((20 - i)).5,\"tokens_per_s\":$((1000 * i))}"; done >"$out/trainer_log.jsonl"
    echo '{"peak_device_bytes":123456789,"peak_rss_bytes":1000}' >"$out/memory-rank0.json"
    echo "eval: exact match 198/200 = 99.0%" ;;
esac
STUB
cat >"$S/nccl-tests" <<'STUB'
#!/usr/bin/env bash
echo "test nccl::tests::nccl_world_size_one_on_gpu0 ... ok"
echo "test result: ok. 7 passed; 0 failed; 0 ignored; 0 measured; 40 filtered out"
STUB
chmod +x "$S/trainer" "$S/nccl-tests"
FORCE=1 OUT="$S/out" TRAINER="$S/trainer" NCCL_TEST_BIN="$S/nccl-tests" NCCL_LIB_DIR="$S/lib" \
  GPU_STEPS=7 bash bench/gpu/run.sh
python3 - "$S/out/gpu-check.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
st = {k: v["status"] for k, v in d["steps"].items()}
want_pass = ["device_info", "nccl", "ours_124m", "quickstart"]
assert all(st[k] == "pass" for k in want_pass), st
assert st["nvidia_smi"] in ("skip", "pass", "fail") and st["torch"] in ("skip", "pass"), st
o = d["steps"]["ours_124m"]["detail"]
assert o["steps_timed"] == 7 and o["tokens_per_s"] == 9000, o   # steps 6..12 after 5 warm-up
assert o["peak_device_bytes"] == 123456789, o
assert abs(o["mfu"] - 9000 * o["flops_per_token"] / 989.4e12) < 1e-12, o
q = d["steps"]["quickstart"]["detail"]
assert q["exact_match_pct"] == 99.0 and q["device_line"].startswith("device: cuda:0"), q
assert d["steps"]["nccl"]["detail"]["passed"] == 7, d["steps"]["nccl"]
print("selftest ok:", st)
PY
