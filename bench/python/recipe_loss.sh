#!/usr/bin/env bash
# Every recipe in examples/llamafactory/ on tiny random models (as tests/tests/llamafactory.rs
# makes them), trained on 2 nodes x 2 ranks with `ringctl local` and only model_name_or_path and
# output_dir overridden; then transformers' loss on the rows of step 1 (`trainer rows --step 1
# --world 4 --loss`) against the loss the run logged and Ringmaster's own fp32 loss. Not part of
# CI (it needs torch + transformers in bench/.venv; see bench/python/README.md); CI checks the
# logged loss against `trainer rows --loss` (tests/tests/llamafactory.rs).
#
#   bench/python/recipe_loss.sh [BIN_DIR]      # default target/release (trainer, ringctl, ...)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release}
PY=${PY:-bench/.venv/bin/python}
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=examples/llamafactory/data

"$BIN/trainer" tokenizer train "$data/alpaca_demo.json" "$data/identity.json" \
    --template qwen3 --vocab-size 400 --out "$work/tok" >/dev/null
cat > "$work/qwen3.json" <<'JSON'
{"model_type": "qwen3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
 "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
 "tie_word_embeddings": true, "initializer_range": 0.05}
JSON
cat > "$work/qwen2.json" <<'JSON'
{"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
 "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
 "tie_word_embeddings": true, "initializer_range": 0.05}
JSON
for m in qwen3 qwen2; do
    "$BIN/trainer" init-model --config "$work/$m.json" --out "$work/$m" --seed 1 >/dev/null
    cp "$work/tok/tokenizer.json" "$work/tok/tokenizer_config.json" "$work/$m/"
done

status=0
for pair in qwen3_full_sft_ds3.yaml:qwen3 qwen3_lora_sft.yaml:qwen3 qwen2_5_full_sft_fsdp.yaml:qwen2; do
    recipe=${pair%%:*}
    model=$work/${pair##*:}
    cluster=$work/cluster-$recipe
    out=$cluster/out
    "$BIN/ringctl" local "examples/llamafactory/$recipe" --nodes 2 --slots 2 \
        --work-dir "$cluster" "model_name_or_path=$model" "output_dir=$out" >"$work/$recipe.log" 2>&1 \
        || { cat "$work/$recipe.log"; exit 1; }
    "$BIN/trainer" rows --step 1 --world 4 --local 2 --loss --out "$work/rows.json" -- \
        "examples/llamafactory/$recipe" "model_name_or_path=$model" "output_dir=$out" >/dev/null
    printf '%s ' "$recipe"
    "$PY" bench/python/recipe_loss.py "$model" "$work/rows.json" "$out/trainer_log.jsonl" \
        || status=1
done
exit $status
