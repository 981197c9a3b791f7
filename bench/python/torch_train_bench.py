#!/usr/bin/env python3
"""Tokens/s of one fp32 training step of transformers' LlamaForCausalLM (or Qwen2/Qwen3 at the
same shapes, --arch) on CPU.

A step is: zero the gradients, forward with labels = input_ids (transformers shifts them and
takes the mean cross-entropy), backward, torch.optim.AdamW step (lr 1e-4, torch's other
defaults). The model is built from a config with random init (nothing is downloaded).
Token ids are drawn from a seeded generator, one fresh batch per step.

Presets (pass the flags; there is no --preset so the command line shows the full shape):

  3.4M:   --hidden 256 --layers 4 --heads 4 --kv-heads 4 --intermediate 688 --vocab 512 \
          --batch 8 --seq 128
  124.7M: --hidden 768 --layers 12 --heads 12 --kv-heads 4 --intermediate 2048 --vocab 32000 \
          --batch 2 --seq 512

tokens_per_s = batch * seq / step_s_median, over --steps timed steps after --warmup untimed.
With --json, progress goes to stderr and stdout gets exactly one JSON line.
"""

import argparse
import json
import statistics
import sys
import time

# The two model shapes Ringmaster benchmarks (also used by torch_dist_bench.py). "batch" and
# "seq" are the per-step defaults used with each.
PRESETS = {
    "3.4M": dict(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=688, vocab=512,
                 batch=8, seq=128),
    "124.7M": dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000,
                   batch=2, seq=512),
}


def llama_config(hidden, layers, heads, kv_heads, intermediate, vocab, seq, attn="sdpa",
                 arch="llama"):
    """The config both benchmarks build: untied embeddings, rms_norm_eps 1e-6, no cache;
    `arch` qwen3 (q/k norms) or qwen2 (q/k/v biases) at the same shapes (head_dim hidden/heads)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
           "qwen2": transformers.Qwen2Config}[arch]
    extra = {"head_dim": hidden // heads} if arch == "qwen3" else {}
    config = cls(
        **extra,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max(seq, 2048),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
    )
    config._attn_implementation = attn
    return config


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Time fp32 training steps of transformers' LlamaForCausalLM on CPU."
    )
    p.add_argument("--hidden", type=int, required=True, help="hidden_size")
    p.add_argument("--layers", type=int, required=True, help="num_hidden_layers")
    p.add_argument("--heads", type=int, required=True, help="num_attention_heads")
    p.add_argument(
        "--kv-heads", type=int, default=None, help="num_key_value_heads (default: --heads)"
    )
    p.add_argument("--intermediate", type=int, required=True, help="intermediate_size")
    p.add_argument("--vocab", type=int, required=True, help="vocab_size")
    p.add_argument("--batch", type=int, required=True, help="sequences per step")
    p.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument(
        "--attn",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="attn_implementation (default sdpa, transformers' own default)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed for init and token ids")
    p.add_argument("--json", action="store_true", help="print one JSON line on stdout")
    p.add_argument("--arch", choices=["llama", "qwen2", "qwen3"], default="llama",
                   help="model class at the same shapes (default llama)")
    a = p.parse_args(argv)
    if a.kv_heads is None:
        a.kv_heads = a.heads
    if a.hidden % a.heads or a.heads % a.kv_heads:
        p.error("--heads must divide --hidden and --kv-heads must divide --heads")
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return a


def main(argv=None):
    args = parse_args(argv)
    log = (lambda *m: print(*m, file=sys.stderr, flush=True)) if args.json else (
        lambda *m: print(*m, flush=True)
    )

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)

    config = llama_config(args.hidden, args.layers, args.heads, args.kv_heads,
                          args.intermediate, args.vocab, args.seq, args.attn, args.arch)
    torch.set_default_dtype(torch.float32)
    model = AutoModelForCausalLM.from_config(config).to(dtype=torch.float32, device="cpu")
    attn_used = model.config._attn_implementation
    if attn_used != args.attn:
        sys.exit(f"error: asked for attn {args.attn}, model uses {attn_used}")
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {threads}, attn {attn_used}")
    log(f"params {params} ({params / 1e6:.1f}M), batch {args.batch}, seq {args.seq}")

    gen = torch.Generator().manual_seed(args.seed)
    tokens = args.batch * args.seq

    def step():
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, float(loss.detach())

    for i in range(args.warmup):
        dt, loss = step()
        log(f"warmup {i + 1}/{args.warmup}: {dt:.3f} s, loss {loss:.4f}")
    times = []
    for i in range(args.steps):
        dt, loss = step()
        times.append(dt)
        log(f"step {i + 1}/{args.steps}: {dt:.3f} s, {tokens / dt:.1f} tok/s, loss {loss:.4f}")

    med = statistics.median(times)
    result = {
        "impl": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "params": params,
        "batch": args.batch,
        "seq": args.seq,
        "threads": threads,
        "tokens_per_s": round(tokens / med, 2),
        "step_s_median": round(med, 6),
        "step_s_min": round(min(times), 6),
        "step_s_mean": round(statistics.fmean(times), 6),
        "steps": args.steps,
        "warmup": args.warmup,
        "attn": attn_used,
        "dtype": "float32",
        "optimizer": f"torch.optim.AdamW(lr={args.lr:g})",
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "intermediate": args.intermediate,
        "vocab": args.vocab,
        "last_loss": round(loss, 6),
        "arch": args.arch,
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        log(f"median step {med:.4f} s -> {tokens / med:.1f} tokens/s "
            f"(min {min(times):.4f} s, mean {statistics.fmean(times):.4f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
