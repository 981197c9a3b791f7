#!/usr/bin/env bash
# A model saved by Ringmaster loads in Hugging Face transformers' AutoModelForCausalLM (Llama,
# Mistral, Qwen2, Qwen3) and gives the same logits and loss; a LoRA adapter saved by Ringmaster
# loads in peft and gives the same logits. Not part of CI (it needs torch + transformers + peft
# from PyPI in bench/.venv; see bench/python/README.md).
#
#   bench/python/hf_parity.sh [TRAINER]        # default target/release/trainer
#
# Cases: GQA + llama3 RoPE scaling + untied head (fp32, one file); tied embeddings in bf16 split
# into shards with an index; a transformers-5-style config.json (rope_parameters, dtype); Qwen2
# (q/k/v biases, tied); Qwen3 untied with head_dim != hidden/heads, with a LoRA adapter; Qwen3
# tied in bf16 with attention_bias (transformers-5 config); Mistral whose sliding window (8) is
# shorter than the rows (16); and, if present, the trained quickstart model in
# output/quickstart. Norms and biases of the new architectures are randomised after
# init-model (transformers initialises them to ones and zeros, which would hide a mistake).
set -euo pipefail
cd "$(dirname "$0")/../.."
TRAINER=${1:-target/release/trainer}
PY=${PY:-bench/.venv/bin/python}
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

cat > "$work/qwen2_tied.json" <<'JSON'
{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 320,
 "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
 "max_position_embeddings": 1024, "tie_word_embeddings": true, "use_sliding_window": false,
 "initializer_range": 0.05, "torch_dtype": "float32"}
JSON
cat > "$work/qwen3_untied.json" <<'JSON'
{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 320,
 "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "head_dim": 32, "attention_bias": false, "rms_norm_eps": 1e-6,
 "rope_theta": 1000000.0, "max_position_embeddings": 1024, "tie_word_embeddings": false,
 "initializer_range": 0.05, "torch_dtype": "float32"}
JSON
cat > "$work/qwen3_tied_bf16.json" <<'JSON'
{"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 300,
 "hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 6,
 "num_key_value_heads": 3, "head_dim": 24, "attention_bias": true, "rms_norm_eps": 1e-6,
 "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
 "max_position_embeddings": 1024, "tie_word_embeddings": true, "initializer_range": 0.05,
 "dtype": "bfloat16"}
JSON
cat > "$work/mistral.json" <<'JSON'
{"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 320,
 "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4,
 "num_key_value_heads": 1, "head_dim": 32, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "sliding_window": 8, "max_position_embeddings": 1024, "tie_word_embeddings": false,
 "initializer_range": 0.05, "torch_dtype": "float32"}
JSON

# Norms 1 + 0.2·N(0,1), biases 0.2·N(0,1), written back in the file's dtype.
randomise() { # model_dir seed
  "$PY" - "$1" "$2" <<'PY'
import sys, glob, torch
from safetensors.torch import load_file, save_file
torch.manual_seed(int(sys.argv[2]))
for f in glob.glob(sys.argv[1] + "/*.safetensors"):
    t = load_file(f)
    for k, v in t.items():
        if k.endswith("norm.weight"):
            t[k] = (1 + 0.2 * torch.randn(v.shape)).to(v.dtype)
        elif k.endswith(".bias"):
            t[k] = (0.2 * torch.randn(v.shape)).to(v.dtype)
    save_file(t, f, metadata={"format": "pt"})
PY
}

ids='1,5,9,33,2,250,17,8,100,64,3,200,44,91,7,12;4,4,4,4,250,251,252,253,0,1,2,3,150,160,170,180'
status=0
check() { # name model_dir atol [--adapter DIR]
  echo "== $1"
  "$TRAINER" logits --model "$2" --ids "$ids" --out "$work/$1.json" --loss "${@:4}"
  "$PY" bench/python/check_hf_logits.py "$2" "$work/$1.json" --atol "$3" "${@:4}" || status=1
}
"$TRAINER" init-model --config "$work/gqa_llama3.json" --out "$work/m1" --seed 1
check gqa_llama3_fp32 "$work/m1" 1e-4
"$TRAINER" init-model --config "$work/tied_bf16.json" --out "$work/m2" --seed 2 --dtype bfloat16 --max-shard-bytes 60000
ls "$work/m2" | grep -q model.safetensors.index.json
check tied_bf16_sharded "$work/m2" 1e-4
"$TRAINER" init-model --config "$work/tf5.json" --out "$work/m3" --seed 3
check transformers5_config "$work/m3" 1e-4
"$TRAINER" init-model --config "$work/qwen2_tied.json" --out "$work/q2" --seed 4 \
  --lora-out "$work/q2-lora" --lora-rank 4 --lora-target all
randomise "$work/q2" 4
check qwen2_biases_tied "$work/q2" 1e-5
check qwen2_lora_peft "$work/q2" 1e-5 --adapter "$work/q2-lora"
"$TRAINER" init-model --config "$work/qwen3_untied.json" --out "$work/q3" --seed 5 \
  --lora-out "$work/q3-lora" --lora-rank 4 --lora-target q_proj,k_proj,v_proj,o_proj,down_proj
randomise "$work/q3" 5
check qwen3_untied_head_dim "$work/q3" 1e-5
check qwen3_lora_peft "$work/q3" 1e-5 --adapter "$work/q3-lora"
"$TRAINER" init-model --config "$work/qwen3_tied_bf16.json" --out "$work/q3b" --seed 6 \
  --dtype bfloat16
randomise "$work/q3b" 6
check qwen3_tied_bf16_bias "$work/q3b" 1e-5
"$TRAINER" init-model --config "$work/mistral.json" --out "$work/mi" --seed 7
randomise "$work/mi" 7
check mistral_window8 "$work/mi" 1e-5
if [ -f output/quickstart/config.json ]; then
  check quickstart_trained output/quickstart 1e-4
fi
exit $status
