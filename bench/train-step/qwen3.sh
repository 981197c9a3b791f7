#!/usr/bin/env bash
# Issue 18's benchmark: tokens/s of one fp32 training step of Qwen3 at the 124.7M shape next to
# Llama's, for Ringmaster (flex) and PyTorch + transformers, in interleaved rounds (the machine
# drifts; compare within a round). Run on an otherwise idle machine.
#
#   cargo build --release -p ringmaster-bench --bin train-step
#   bench/train-step/qwen3.sh [ROUNDS] [THREADS]   # appends to bench/train-step/results.jsonl
#   (TRAIN_STEP=path overrides target/release/train-step)
set -euo pipefail
cd "$(dirname "$0")/../.."
R=${1:-2}
BIN=${TRAIN_STEP:-target/release/train-step}
T=${2:-2}
OUT=bench/train-step/results.jsonl
large="--hidden 768 --layers 12 --heads 12 --kv-heads 4 --intermediate 2048 --vocab 32000 --batch 2 --seq 512"
stamp=$(date -u +%FT%TZ)
source bench/train-step/lib.sh
for round in $(seq "$R"); do
  for arch in llama qwen3; do
    run "large-$arch-r$round" env RAYON_NUM_THREADS=$T "$BIN" $large --arch $arch --steps 3
    run "large-$arch-r$round" bench/.venv/bin/python bench/python/torch_train_bench.py $large \
      --arch $arch --threads $T --steps 3 --json
  done
done
