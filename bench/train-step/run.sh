#!/usr/bin/env bash
# Tokens/s of one training step (forward, backward, AdamW; fp32) on CPU, side by side:
# Ringmaster (burn flex backend; and the ndarray backend) against PyTorch + transformers'
# LlamaForCausalLM, same shapes, batch and thread count. Run on an otherwise idle machine
# (torch's OpenMP threads spin when cores are busy: numbers taken beside a build are invalid).
#
#   cargo build --release -p ringmaster-bench --bin train-step
#   cargo build --release -p ringmaster-bench --bin train-step --features ndarray --target-dir target/ndarray
#   bench/train-step/run.sh [THREADS]          # appends to bench/train-step/results.jsonl
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${1:-2}
OUT=bench/train-step/results.jsonl
small="--hidden 256 --layers 4 --heads 4 --kv-heads 4 --intermediate 688 --vocab 512 --batch 8 --seq 128"
large="--hidden 768 --layers 12 --heads 12 --kv-heads 4 --intermediate 2048 --vocab 32000 --batch 2 --seq 512"
stamp=$(date -u +%FT%TZ)
source bench/train-step/lib.sh
for cfg in small large; do
  flags=${!cfg}
  steps=5; [ "$cfg" = large ] && steps=3
  run "$cfg" env RAYON_NUM_THREADS=$T target/release/train-step $flags --steps $steps
  # The same without the trainer's malloc tuning (Ringmaster's host.rs), for comparison.
  run "$cfg-malloc-default" env RINGMASTER_MALLOC=default RAYON_NUM_THREADS=$T \
    target/release/train-step $flags --steps $steps
  if [ -x target/ndarray/release/train-step ]; then
    run "$cfg" env RAYON_NUM_THREADS=$T target/ndarray/release/train-step $flags --steps $steps
  fi
  run "$cfg" bench/.venv/bin/python bench/python/torch_train_bench.py $flags --threads $T --steps $steps --json
done
