#!/usr/bin/env bash
# A model saved by Ringmaster loads in Hugging Face transformers' LlamaForCausalLM and gives the
# same logits. Not part of CI (it needs torch + transformers from PyPI in bench/.venv; see
# bench/python/README.md).
#
#   bench/python/hf_parity.sh [TRAINER]        # default target/release/trainer
#
# Cases: GQA + llama3 RoPE scaling + untied head (fp32, one file); tied embeddings in bf16 split
# into shards with an index; a transformers-5-style config.json (rope_parameters, dtype); and,
# if present, the trained quickstart model in output/quickstart.
set -euo pipefail
cd "$(dirname "$0")/../.."
TRAINER=${1:-target/release/trainer}
PY=bench/.venv/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat > "$work/gqa_llama3.json" <<'JSON'
{"model_type": "llama", "vocab_size": 320, "hidden_size": 128, "intermediate_size": 344,
 "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 4096,
 "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
 "tie_word_embeddings": false, "initializer_range": 0.05, "torch_dtype": "float32"}
JSON
cat > "$work/tied_bf16.json" <<'JSON'
{"model_type": "llama", "vocab_size": 300, "hidden_size": 96, "intermediate_size": 256,
 "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 3,
 "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
 "tie_word_embeddings": true, "initializer_range": 0.05, "torch_dtype": "bfloat16"}
JSON
cat > "$work/tf5.json" <<'JSON'
{"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
 "rms_norm_eps": 1e-6, "max_position_embeddings": 1024,
 "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
 "tie_word_embeddings": false, "initializer_range": 0.05, "dtype": "float32"}
JSON

ids='1,5,9,33,2,250,17,8,100,64,3,200,44,91,7,12;4,4,4,4,250,251,252,253,0,1,2,3,150,160,170,180'
status=0
check() { # name model_dir
  echo "== $1"
  "$TRAINER" logits --model "$2" --ids "$ids" --out "$work/$1.json"
  "$PY" bench/python/check_hf_logits.py "$2" "$work/$1.json" --atol 1e-4 || status=1
}
"$TRAINER" init-model --config "$work/gqa_llama3.json" --out "$work/m1" --seed 1
check gqa_llama3_fp32 "$work/m1"
"$TRAINER" init-model --config "$work/tied_bf16.json" --out "$work/m2" --seed 2 --dtype bfloat16 --max-shard-bytes 60000
ls "$work/m2" | grep -q model.safetensors.index.json
check tied_bf16_sharded "$work/m2"
"$TRAINER" init-model --config "$work/tf5.json" --out "$work/m3" --seed 3
check transformers5_config "$work/m3"
if [ -f output/quickstart/config.json ]; then
  check quickstart_trained output/quickstart
fi
exit $status
