#!/usr/bin/env bash
# The prepared GPU check (issue 17): one call on a lent GPU machine, at most ~8 minutes, every
# step under its own `timeout` and recorded as pass / fail / skip in $OUT/gpu-check.json (the
# file is rewritten after each step, so a step that hangs or a call cut short loses nothing
# recorded before it). It builds nothing: the binaries come pre-built (bench/gpu/README.md).
#
# Steps (names as in the JSON):
#   nvidia_smi   the GPU, driver and memory as nvidia-smi reports them
#   device_info  `$TRAINER device-info --request cuda` (the device selection and the CUDA
#                libraries found, as JSON); skipped if the trainer has no such subcommand
#   nccl         the collectives' unit-test binary (built with --features cuda --release),
#                every nccl test including the #[ignore]d world-1 GPU test, via bench/gpu-nccl.sh
#   torch        bench/gpu/torch_step.py: PyTorch eager bf16 steps of the 124.7M Llama
#   ours_124m    the trainer on the same shape: `device: cuda`, `bf16: true`, synthetic text,
#                tokens/s from trainer_log.jsonl, peak device memory from memory-rank0.json
#   quickstart   examples/quickstart.yaml on one GPU (`device: cuda`, output_dir in a temp
#                folder); passes when its `eval: exact match` line reads >= 90%
#
# Usage (on the GPU machine, from the repository root):
#   TRAINER=path NCCL_TEST_BIN=path bench/gpu/run.sh
# Environment:
#   OUT            where gpu-check.json and the step logs go (default bench/gpu/out)
#   TRAINER        the trainer binary built with --features cuda (default target/release/trainer)
#   NCCL_TEST_BIN  the collectives' test binary (cargo test -p ringmaster-collectives
#                  --features cuda --release --no-run prints its path); unset: step skipped
#   BUDGET_S       seconds for the whole script (default 450); a step gets at most what is left
#   GPU_BATCH GPU_SEQ GPU_STEPS GPU_WARMUP   the 124.7M runs' micro-batch (8), sequence (512),
#                  steps (30) and untimed first steps (5)
#   PEAK_FLOPS     the GPU's dense bf16 peak for MFU (default 989.4e12, H100 SXM)
#   DEVICE         the `device:` value written into the configs (default cuda; empty: no key)
#   FORCE=1        run the GPU steps even where nvidia-smi is missing (a dry run of the plumbing)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/gpu/out}
mkdir -p "$OUT"
TRAINER=${TRAINER:-target/release/trainer}
[[ $TRAINER == /* ]] || TRAINER=$ROOT/$TRAINER
NCCL_TEST_BIN=${NCCL_TEST_BIN:-}
[[ -z $NCCL_TEST_BIN || $NCCL_TEST_BIN == /* ]] || NCCL_TEST_BIN=$ROOT/$NCCL_TEST_BIN
BUDGET_S=${BUDGET_S:-450}
BATCH=${GPU_BATCH:-8}
SEQ=${GPU_SEQ:-512}
STEPS=${GPU_STEPS:-30}
WARMUP=${GPU_WARMUP:-5}
PEAK_FLOPS=${PEAK_FLOPS:-989.4e12}
DEVICE=${DEVICE-cuda}
FORCE=${FORCE:-0}
# The 124.7M shape of bench/engines and bench/train-step (untied embeddings).
SHAPE=(--hidden 768 --layers 12 --heads 12 --kv-heads 4 --intermediate 2048 --vocab 32000)

W=$(mktemp -d /tmp/rm-gpu.XXXXXX)
trap 'rm -rf "$W"' EXIT
START=$SECONDS
RESULTS=$OUT/gpu-check.json
STEPS_FILE=$W/steps.jsonl
: >"$STEPS_FILE"

python3 - "$W/meta.json" <<PY
import json, sys, time, os
json.dump({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "host": os.uname().nodename, "trainer": "$TRAINER",
           "nccl_test_bin": "$NCCL_TEST_BIN" or None, "budget_s": $BUDGET_S,
           "device_key": "$DEVICE" or None, "batch": $BATCH, "seq": $SEQ, "steps": $STEPS,
           "warmup": $WARMUP, "peak_flops": float("$PEAK_FLOPS")}, open(sys.argv[1], "w"))
PY

# record NAME STATUS REASON [DETAIL_JSON_FILE] [LOG_FILE]: appends the step and rewrites
# gpu-check.json (meta, steps by name, counts, and the ours-vs-torch comparison).
record() {
    python3 - "$W/meta.json" "$STEPS_FILE" "$RESULTS" "$((SECONDS - START))" "$@" <<'PY'
import json, sys
meta_f, steps_f, results_f, elapsed, name, status, reason = sys.argv[1:8]
detail_f = sys.argv[8] if len(sys.argv) > 8 else ""
log_f = sys.argv[9] if len(sys.argv) > 9 else ""
step = {"name": name, "status": status, "reason": reason or None, "elapsed_s": int(elapsed)}
if detail_f:
    try:
        step["detail"] = json.load(open(detail_f))
    except Exception as e:  # noqa: BLE001
        step["detail_error"] = f"{type(e).__name__}: {e}"
if log_f:
    try:
        lines = open(log_f, errors="replace").read().splitlines()
        step["log"] = log_f.rsplit("/", 1)[-1]
        step["log_tail"] = lines[-15:]
    except OSError:
        pass
with open(steps_f, "a") as f:
    f.write(json.dumps(step) + "\n")
steps = {}
for line in open(steps_f):
    s = json.loads(line)
    steps[s["name"]] = s
counts = {k: sum(1 for s in steps.values() if s["status"] == k) for k in ("pass", "fail", "skip")}
out = {"meta": json.load(open(meta_f)), "counts": counts, "steps": steps}
t = steps.get("torch", {}).get("detail") or {}
o = steps.get("ours_124m", {}).get("detail") or {}
if t.get("tokens_per_s") and o.get("tokens_per_s"):
    out["comparison_124m"] = {
        "tokens_per_s": {"ours": o["tokens_per_s"], "torch": t["tokens_per_s"],
                         "ours_over_torch": o["tokens_per_s"] / t["tokens_per_s"]},
        "mfu": {"ours": o.get("mfu"), "torch": t.get("mfu")},
        "peak_device_bytes": {"ours": o.get("peak_device_bytes"),
                              "torch": t.get("max_memory_allocated_bytes")},
    }
json.dump(out, open(results_f + ".tmp", "w"), indent=1)
import os
os.replace(results_f + ".tmp", results_f)
print(f"== {name}: {status}" + (f" ({reason})" if reason else ""), flush=True)
PY
}

# limit WANT: prints the seconds a step may take (WANT, or what is left of the budget less a
# margin); 0 when under 20 s are left.
limit() {
    local left=$((BUDGET_S - (SECONDS - START) - 10))
    if ((left < 20)); then echo 0; elif ((left < $1)); then echo "$left"; else echo "$1"; fi
}

# run_timed NAME SECONDS LOG CMD...: runs CMD under timeout (SIGKILL 10 s after SIGTERM);
# sets RC (124/137: timed out). Returns 1 and records a skip when no budget is left.
run_timed() {
    local name=$1 want=$2 log=$3 t
    shift 3
    t=$(limit "$want")
    if [ "$t" = 0 ]; then
        record "$name" skip "out of budget (BUDGET_S=$BUDGET_S)"
        return 1
    fi
    echo "== $name: up to ${t}s: $*"
    RC=0
    timeout -k 10 "$t" "$@" >"$log" 2>&1 || RC=$?
    TIMEOUT_S=$t
    return 0
}

rc_reason() { # a failed command's exit status in words
    case $RC in
        124 | 137) echo "timed out after ${TIMEOUT_S}s" ;;
        *) echo "exit status $RC" ;;
    esac
}

# ---------------------------------------------------------------------------------- nvidia_smi
HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1; then
    if run_timed nvidia_smi 20 "$OUT/env.log" nvidia-smi \
        --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv,noheader; then
        if [ "$RC" = 0 ]; then
            HAVE_GPU=1
            python3 -c 'import json,sys; print(json.dumps({"gpus": [l.strip() for l in open(sys.argv[1]) if l.strip()]}))' \
                "$OUT/env.log" >"$W/smi.json"
            record nvidia_smi pass "" "$W/smi.json" "$OUT/env.log"
        else
            record nvidia_smi fail "$(rc_reason)" "" "$OUT/env.log"
        fi
    fi
else
    record nvidia_smi skip "nvidia-smi not found"
fi
NO_GPU_REASON="no GPU: nvidia-smi missing or failed (FORCE=1 runs the GPU steps anyway)"
gpu_ok() { [ "$HAVE_GPU" = 1 ] || [ "$FORCE" = 1 ]; }

# --------------------------------------------------------------------------------- device_info
# The report is read from stdout (stderr apart); the subcommand may exit non-zero when CUDA
# cannot be served, its JSON then says why.
# shellcheck disable=SC2016  # $0 and $1 expand in the inner bash, as intended
if [ ! -x "$TRAINER" ]; then
    record device_info skip "no trainer binary at $TRAINER"
elif run_timed device_info 60 "$W/device-info.json" bash -c '"$0" device-info --request cuda 2>"$1"' \
    "$TRAINER" "$W/device-info.err"; then
    verdict=$(python3 - "$W/device-info.json" "$W/devinfo-detail.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception:  # noqa: BLE001
    print("nojson")
    sys.exit()
json.dump(d, open(sys.argv[2], "w"))
print("cuda" if (d.get("selected") or {}).get("device") == "cuda" else "other")
PY
)
    case $verdict in
        cuda) record device_info pass "" "$W/devinfo-detail.json" ;;
        other) record device_info fail "device-info selected no CUDA device" "$W/devinfo-detail.json" ;;
        *) record device_info skip "no JSON from '$TRAINER device-info --request cuda' ($(rc_reason); the subcommand may not exist yet)" \
            "" "$W/device-info.err" ;;
    esac
fi

# -------------------------------------------------------------------------------------- nccl
if ! gpu_ok; then
    record nccl skip "$NO_GPU_REASON"
elif [ -z "$NCCL_TEST_BIN" ] || [ ! -x "$NCCL_TEST_BIN" ]; then
    record nccl skip "NCCL_TEST_BIN not given or not executable (${NCCL_TEST_BIN:-unset})"
elif run_timed nccl 90 "$OUT/nccl.log" env NCCL_INCLUDE_IGNORED=1 bash "$ROOT/bench/gpu-nccl.sh" \
    "$NCCL_TEST_BIN"; then
    python3 - "$OUT/nccl.log" "$W/nccl.json" <<'PY'
import json, re, sys
text = open(sys.argv[1], errors="replace").read()
m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored", text)
gpu = re.search(r"nccl_world_size_one_on_gpu0 \.\.\. (\w+)", text)
nccl = re.search(r"^found (.*)$", text, re.M)
json.dump({"result": m.group(1) if m else None,
           "passed": int(m.group(2)) if m else None, "failed": int(m.group(3)) if m else None,
           "ignored": int(m.group(4)) if m else None,
           "gpu_test": gpu.group(1) if gpu else None,
           "nccl_library": nccl.group(1) if nccl else None}, open(sys.argv[2], "w"))
PY
    if [ "$RC" = 0 ] && grep -q 'nccl_world_size_one_on_gpu0 \.\.\. ok' "$OUT/nccl.log"; then
        record nccl pass "" "$W/nccl.json" "$OUT/nccl.log"
    elif [ "$RC" = 0 ]; then
        record nccl fail "exit 0 but the GPU test nccl_world_size_one_on_gpu0 did not run" \
            "$W/nccl.json" "$OUT/nccl.log"
    else
        record nccl fail "$(rc_reason)" "$W/nccl.json" "$OUT/nccl.log"
    fi
fi

# ------------------------------------------------------------------------------------- torch
if ! gpu_ok; then
    record torch skip "$NO_GPU_REASON"
elif run_timed torch 120 "$OUT/torch.log" env PYTHONUNBUFFERED=1 python3 \
    "$ROOT/bench/gpu/torch_step.py" "${SHAPE[@]}" --batch "$BATCH" --seq "$SEQ" \
    --steps "$STEPS" --warmup "$WARMUP" --peak-flops "$PEAK_FLOPS" --json-out "$W/torch.json"; then
    st=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["status"])' \
        "$W/torch.json" 2>/dev/null || echo none)
    case $st in
        pass) record torch pass "" "$W/torch.json" "$OUT/torch.log" ;;
        skip)
            record torch skip "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["reason"])' "$W/torch.json")" \
                "$W/torch.json" "$OUT/torch.log"
            ;;
        fail) record torch fail "see detail.reason" "$W/torch.json" "$OUT/torch.log" ;;
        *) record torch fail "no JSON result; $(rc_reason)" "" "$OUT/torch.log" ;;
    esac
fi

# A text corpus and a 400-token tokenizer for the 124.7M run (the model's 32000-row embedding
# and head set the cost whatever ids occur), as bench/engines does.
make_data() {
    python3 "$ROOT/bench/python/random_corpus.py" "$W/corpus.jsonl"
    timeout -k 5 60 "$TRAINER" tokenizer train "$W/corpus.jsonl" --format text --template default \
        --vocab-size 400 --out "$W/model124m" >"$W/tokenizer.log" 2>&1 || return 1
    cat >"$W/model124m/config.json" <<'JSON'
{"model_type": "llama", "vocab_size": 32000, "hidden_size": 768, "num_hidden_layers": 12,
 "num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 2048,
 "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": false}
JSON
}

device_line() { [ -n "$DEVICE" ] && echo "device: $DEVICE"; }

# --------------------------------------------------------------------------------- ours_124m
if ! gpu_ok; then
    record ours_124m skip "$NO_GPU_REASON"
elif [ ! -x "$TRAINER" ]; then
    record ours_124m skip "no trainer binary at $TRAINER"
elif ! make_data; then
    record ours_124m fail "tokenizer training failed" "" "$W/tokenizer.log"
else
    mkdir -p "$W/ours"
    {
        cat <<YAML
model_name_or_path: $W/model124m
train_from_scratch: true
stage: pt
finetuning_type: full
dataset: $W/corpus.jsonl
template: default
cutoff_len: $SEQ
output_dir: $W/ours/out
per_device_train_batch_size: $BATCH
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
max_steps: $((STEPS + WARMUP))
logging_steps: 1
bf16: true
seed: 0
YAML
        device_line
    } >"$W/ours/train.yaml"
    if run_timed ours_124m 180 "$OUT/ours.log" "$TRAINER" "$W/ours/train.yaml"; then
        python3 "$ROOT/bench/gpu/torch_step.py" "${SHAPE[@]}" --batch "$BATCH" --seq "$SEQ" \
            --print-flops >"$W/flops.json"
        python3 - "$W/ours/out" "$OUT/ours.log" "$W/flops.json" "$WARMUP" "$PEAK_FLOPS" \
            "$W/ours.json" <<'PY'
import json, re, statistics, sys
out, log, flops_f, warmup, peak, dest = sys.argv[1:7]
warmup, peak = int(warmup), float(peak)
fl = json.load(open(flops_f))
d = {"impl": "ringmaster", "params_counted": fl["params_counted"],
     "flops_per_token": fl["flops_per_token"], "peak_flops": peak, "shape": fl["shape"]}
text = open(log, errors="replace").read()
m = re.search(r"^.*device: (cuda|cpu)\S*.*$", text, re.M)
d["device_line"] = m.group(0).strip() if m else None
d["config"] = open(f"{out}/../train.yaml").read().splitlines()
try:
    steps = [json.loads(l) for l in open(f"{out}/trainer_log.jsonl") if l.strip()]
except OSError as e:
    steps, d["trainer_log_error"] = [], str(e)
timed = [s["tokens_per_s"] for s in steps[warmup:] if s.get("tokens_per_s")]
d["steps_logged"], d["steps_timed"] = len(steps), len(timed)
if timed:
    tps = statistics.median(timed)
    d["tokens_per_s"] = tps
    d["mfu"] = tps * fl["flops_per_token"] / peak
    d["loss_first"], d["loss_last"] = steps[0].get("loss"), steps[-1].get("loss")
try:
    mem = json.load(open(f"{out}/memory-rank0.json"))
    d["peak_device_bytes"] = mem.get("peak_device_bytes")
    d["peak_rss_bytes"] = mem.get("peak_rss_bytes")
    d["memory_rank0"] = mem
except (OSError, ValueError) as e:
    d["memory_error"] = str(e)
json.dump(d, open(dest, "w"))
PY
        if [ "$RC" != 0 ]; then
            record ours_124m fail "$(rc_reason)" "$W/ours.json" "$OUT/ours.log"
        elif python3 -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("steps_timed") else 1)' "$W/ours.json"; then
            record ours_124m pass "" "$W/ours.json" "$OUT/ours.log"
        else
            record ours_124m fail "no timed step in trainer_log.jsonl" "$W/ours.json" "$OUT/ours.log"
        fi
    fi
fi

# -------------------------------------------------------------------------------- quickstart
if ! gpu_ok; then
    record quickstart skip "$NO_GPU_REASON"
elif [ ! -x "$TRAINER" ]; then
    record quickstart skip "no trainer binary at $TRAINER"
else
    # The copy keeps every key but output_dir (a temp folder), device and the micro-batch: the
    # shipped config is written for 4 ranks (global batch 64), so one GPU takes micro-batch 64,
    # the same optimizer steps (tests/quickstart.rs does the same; at micro-batch 16 one
    # process learns nothing useful in 1500 steps: 6% measured on CPU). The paths it names
    # are relative to the working directory (LLaMA-Factory's rule; deepspeed: also tries the
    # config's folder), so they are made absolute and the trainer runs from the repository root.
    mkdir -p "$W/quickstart"
    python3 - "$ROOT" "$W/quickstart" "$DEVICE" <<'PY'
import os, re, sys
root, dest, device = sys.argv[1:4]
lines = []
for line in open(os.path.join(root, "examples/quickstart.yaml")):
    m = re.match(r"^(model_name_or_path|dataset_dir|deepspeed|output_dir|device|per_device_train_batch_size):\s*(\S+)", line)
    if m and m.group(1) == "per_device_train_batch_size":
        line = f"per_device_train_batch_size: {4 * int(m.group(2))}\n"
    elif m and m.group(1) == "output_dir":
        line = f"output_dir: {dest}/out\n"
    elif m and m.group(1) == "device":
        continue
    elif m:
        line = f"{m.group(1)}: {os.path.join(root, m.group(2))}\n"
    lines.append(line)
if device:
    lines.append(f"device: {device}\n")
open(os.path.join(dest, "quickstart.yaml"), "w").writelines(lines)
PY
    if run_timed quickstart 240 "$OUT/quickstart.log" "$TRAINER" "$W/quickstart/quickstart.yaml"; then
        python3 - "$OUT/quickstart.log" "$W/quickstart/out" "$W/quickstart.json" <<'PY'
import json, re, statistics, sys
log, out, dest = sys.argv[1:4]
text = open(log, errors="replace").read()
m = re.search(r"eval: exact match (\d+)/(\d+) = ([\d.]+)%", text)
d = {"exact_match_pct": float(m.group(3)) if m else None,
     "exact_match": f"{m.group(1)}/{m.group(2)}" if m else None}
dl = re.search(r"^.*device: (cuda|cpu)\S*.*$", text, re.M)
d["device_line"] = dl.group(0).strip() if dl else None
d["config"] = open(f"{out}/../quickstart.yaml").read().splitlines()
try:
    steps = [json.loads(l) for l in open(f"{out}/trainer_log.jsonl") if l.strip()]
    tps = [s["tokens_per_s"] for s in steps[1:] if s.get("tokens_per_s")]
    d["tokens_per_s_median"] = statistics.median(tps) if tps else None
    d["loss_last"] = steps[-1].get("loss") if steps else None
except OSError:
    pass
json.dump(d, open(dest, "w"))
PY
        pct=$(python3 -c 'import json,sys; v=json.load(open(sys.argv[1]))["exact_match_pct"]; print("" if v is None else v)' "$W/quickstart.json")
        if [ "$RC" != 0 ]; then
            record quickstart fail "$(rc_reason)" "$W/quickstart.json" "$OUT/quickstart.log"
        elif [ -z "$pct" ]; then
            record quickstart fail "no 'eval: exact match' line" "$W/quickstart.json" "$OUT/quickstart.log"
        elif python3 -c "import sys; sys.exit(0 if $pct >= 90 else 1)"; then
            record quickstart pass "" "$W/quickstart.json" "$OUT/quickstart.log"
        else
            record quickstart fail "exact match $pct% < 90%" "$W/quickstart.json" "$OUT/quickstart.log"
        fi
    fi
fi

echo "== done in $((SECONDS - START))s: $RESULTS"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps(d["counts"])); print(json.dumps(d.get("comparison_124m")))' "$RESULTS"
