#!/usr/bin/env bash
# Tokens/s of every engine plan with 2 ranks (3.4M and 124.7M Llama configs, fp32, untied
# embeddings, the shapes of bench/train-step), side by side with PyTorch DDP and FSDP (gloo,
# CPU; bench/python/torch_dist_bench.py), and the peak RSS per rank of every plan with 4 ranks
# on the 124.7M config. Our side runs the real `trainer` binary: one process per rank,
# bootstrapped through a directory store, `stage: pt`, packed as LLaMA-Factory packs pt (texts
# joined and cut into full cutoff_len rows).
# One thread per rank (RAYON_NUM_THREADS / torch.set_num_threads). Run on an idle machine.
#
#   cargo build --release -p ringmaster-trainer
#   bench/engines/run.sh [small] [large] [rss] [torch] [torch_small] [torch_large]
#                          # default: small large rss torch; appends results.jsonl
#   PLANS="ddp zero3" ...  # a subset of the plans
#   TRAINER=/path/to/other/trainer LABEL=base ...   # another build, named in the results
#   SMALL_STEPS=21 ...     # timed steps + 1 of the 3.4M runs (default 8; PyTorch times one fewer
#                          # after its own warm-up step, so both sides time the same count)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$ROOT/bench/engines/results.jsonl
# TRAINER= another build of the trainer (paired comparisons); LABEL= names it in the results.
TRAINER=${TRAINER:-$ROOT/target/release/trainer}
LABEL=${LABEL:-}
PY=$ROOT/bench/.venv/bin/python
W=$(mktemp -d /tmp/rm-engines.XXXXXX)
trap 'rm -rf "$W"' EXIT
stamp=$(date -u +%FT%TZ)
what=${*:-small large rss torch}

# A random-word corpus and a small tokenizer; the model's vocabulary (512 / 32000) sets the
# cost of the embedding and the head whatever ids occur.
python3 "$ROOT/bench/python/random_corpus.py" "$W/corpus.jsonl"
"$TRAINER" tokenizer train "$W/corpus.jsonl" --format text --template default --vocab-size 400 \
  --out "$W/tok" >/dev/null

model() { # name hidden layers heads kv inter vocab
  mkdir -p "$W/$1"
  cp "$W"/tok/* "$W/$1/"
  cat >"$W/$1/config.json" <<JSON
{"model_type": "llama", "vocab_size": $7, "hidden_size": $2, "num_hidden_layers": $3,
 "num_attention_heads": $4, "num_key_value_heads": $5, "intermediate_size": $6,
 "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": false}
JSON
}
model small 256 4 4 4 688 512
model large 768 12 12 4 2048 32000

ds() { # stage offload_optimizer offload_param
  local oo='{"device": "none"}' op='{"device": "none"}'
  [ "$2" = 1 ] && oo='{"device": "cpu", "pin_memory": true}'
  [ "$3" = 1 ] && op='{"device": "cpu", "pin_memory": true}'
  echo "{\"train_micro_batch_size_per_gpu\": \"auto\", \"gradient_accumulation_steps\": \"auto\",
   \"zero_optimization\": {\"stage\": $1, \"offload_optimizer\": $oo, \"offload_param\": $op}}"
}
PLANS=${PLANS:-"ddp zero1 zero2 zero2_offload zero3 zero3_offload"}
SMALL_STEPS=${SMALL_STEPS:-8}
plan_file() {
  case $1 in
    ddp) ds 0 0 0 ;; zero1) ds 1 0 0 ;; zero2) ds 2 0 0 ;; zero2_offload) ds 2 1 0 ;;
    zero3) ds 3 0 0 ;; zero3_offload) ds 3 1 1 ;;
    # Stages 0-2 reducing each unit's gradients during backward (overlap_comm true).
    ddp_overlap | zero1_overlap | zero2_overlap)
      local st=0
      case $1 in zero1_overlap) st=1 ;; zero2_overlap) st=2 ;; esac
      ds "$st" 0 0 | sed "s/\"stage\": $st,/\"stage\": $st, \"overlap_comm\": true,/" ;;
    # ZeRO-3 with every collective blocking the compute thread (overlap_comm false).
    zero3_blocking) ds 3 0 0 | sed 's/"stage": 3,/"stage": 3, "overlap_comm": false,/' ;;
  esac
}

ours() { # model plan world micro seq steps label
  local name="$2-$1-w$3-$7" dir="$W/run-$2-$1-w$3-$7"
  mkdir -p "$dir"
  plan_file "$2" >"$dir/ds.json"
  cat >"$dir/train.yaml" <<YAML
model_name_or_path: $W/$1
train_from_scratch: true
stage: pt
finetuning_type: full
dataset: $W/corpus.jsonl
template: default
cutoff_len: $5
output_dir: $dir/out
per_device_train_batch_size: $4
gradient_accumulation_steps: 1
learning_rate: 1.0e-4
max_steps: $6
logging_steps: 1
seed: 0
deepspeed: $dir/ds.json
YAML
  local pids=()
  for ((r = 0; r < $3; r++)); do
    RANK=$r WORLD_SIZE=$3 LOCAL_WORLD_SIZE=$3 RINGMASTER_STORE_DIR=$dir/store \
      RINGMASTER_JOB_ID=bench RAYON_NUM_THREADS=1 \
      "$TRAINER" "$dir/train.yaml" >"$dir/rank$r.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { tail -5 "$dir"/rank*.log; exit 1; }; done
  python3 - "$dir/out" "$3" "$name" "$2" "$1" "$stamp" "$LABEL" <<'PY' | tee -a "$OUT"
import json, os, statistics, sys
out, world, name, plan, model, stamp, label = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
steps = [json.loads(l) for l in open(f"{out}/trainer_log.jsonl")]
tps = [s["tokens_per_s"] for s in steps[1:]]  # the first step warms up
wait = [s.get("collective_wait_s", float("nan")) for s in steps[1:]]
mem = [json.load(open(f"{out}/memory-rank{r}.json")) for r in range(world)]
print(json.dumps({"when": stamp, "impl": "ringmaster", **({"build": label} if label else {}),
                  "plan": plan, "model": model,
                  "world": world, "tokens_per_s_median": round(statistics.median(tps), 1),
                  "timed_steps": len(tps),
                  "malloc": os.environ.get("RINGMASTER_MALLOC", "tuned"),
                  "rank0_collective_wait_s_median": round(statistics.median(wait), 3),
                  "peak_rss_bytes": [m["peak_rss_bytes"] for m in mem],
                  "model_state_bytes": [m["param_bytes"] + m["grad_bytes"] + m["optimizer_bytes"]
                                        for m in mem]}))
PY
}

torch() { # mode model world micro seq steps
  "$PY" bench/python/torch_dist_bench.py --mode "$1" --model "$2" --world "$3" \
    --micro-batch "$4" --seq "$5" --steps "$6" --warmup 1 --threads 1 |
    tail -1 | python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['when']='$stamp'; print(json.dumps(d))" |
    tee -a "$OUT"
}

for w in $what; do
  case $w in
    small) for p in $PLANS; do ours small "$p" 2 8 128 "$SMALL_STEPS" tps; done ;;
    large) for p in $PLANS; do ours large "$p" 2 2 512 4 tps; done ;;
    rss) for p in $PLANS; do ours large "$p" 4 1 128 3 rss; done ;;
    torch)
      for m in ddp fsdp; do torch "$m" small 2 8 128 $((SMALL_STEPS - 1)); done
      for m in ddp fsdp; do torch "$m" large 2 2 512 3; done
      for m in ddp fsdp; do torch "$m" large 4 1 128 2; done ;;
    torch_small) for m in ddp fsdp; do torch "$m" small 2 8 128 $((SMALL_STEPS - 1)); done ;;
    torch_large) for m in ddp fsdp; do torch "$m" large 2 2 512 3; done ;;
  esac
done
