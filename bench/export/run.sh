#!/usr/bin/env bash
# Peak memory of `trainer export` (what `ringctl export` runs) on a checkpoint of the 124.7M
# config of bench/engines (untied 32000 x 768 embeddings, 12 layers), saved by 2 ranks under
# ZeRO-3, against the largest tensor and the whole model. Training with
# save_steps: 1 makes the checkpoint (two steps: the last step saves the final model, not a checkpoint); `/usr/bin/time -v` gives the export's maximum RSS.
#
#   cargo build --release -p ringmaster-trainer
#   bench/export/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
TRAINER=$ROOT/target/release/trainer
W=$(mktemp -d /tmp/rm-export.XXXXXX)
trap '[ -n "${KEEP:-}" ] || rm -rf "$W"' EXIT

python3 "$ROOT/bench/python/random_corpus.py" "$W/corpus.jsonl" 2000
"$TRAINER" tokenizer train "$W/corpus.jsonl" --format text --template default --vocab-size 400 \
  --out "$W/model" >/dev/null
cat >"$W/model/config.json" <<JSON
{"model_type": "llama", "vocab_size": 32000, "hidden_size": 768, "num_hidden_layers": 12,
 "num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 2048,
 "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": false}
JSON
echo '{"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}}' >"$W/ds.json"
cat >"$W/train.yaml" <<YAML
model_name_or_path: $W/model
train_from_scratch: true
stage: pt
finetuning_type: full
dataset: $W/corpus.jsonl
template: default
cutoff_len: 64
output_dir: $W/out
per_device_train_batch_size: 1
learning_rate: 1.0e-4
max_steps: 2
save_steps: 1
logging_steps: 1
seed: 0
deepspeed: $W/ds.json
YAML
pids=()
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 RINGMASTER_STORE_DIR=$W/store RINGMASTER_JOB_ID=export \
    RAYON_NUM_THREADS=1 "$TRAINER" "$W/train.yaml" >"$W/rank$r.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { tail -5 "$W"/rank*.log; exit 1; }; done
ck=$W/out/checkpoint-1
/usr/bin/time -v "$TRAINER" export "$ck" --out "$W/hf" 2>"$W/time.log" >/dev/null
python3 - "$ck" "$W/hf" "$W/time.log" <<'PY'
import json, os, re, sys
ck, hf, timelog = sys.argv[1:]
m = json.load(open(os.path.join(ck, "manifest.json")))
shard_bytes = sum(os.path.getsize(os.path.join(ck, f)) for f in os.listdir(ck) if f.startswith("rank-"))
out_bytes = os.path.getsize(os.path.join(hf, "model.safetensors"))
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(timelog).read()).group(1))
secs = re.search(r"Elapsed \(wall clock\) time .*: (\S+)", open(timelog).read()).group(1)
largest = 32000 * 768 * 4
print(json.dumps({"export_peak_rss_mib": round(rss_kb / 1024, 1),
                  "largest_tensor_mib": round(largest / 2**20, 1),
                  "model_safetensors_mib": round(out_bytes / 2**20, 1),
                  "checkpoint_shards_mib": round(shard_bytes / 2**20, 1),
                  "wall": secs}))
PY
