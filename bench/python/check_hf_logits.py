#!/usr/bin/env python3
"""Compare Ringmaster's logits with Hugging Face transformers' on the same model directory.

Usage:
    check_hf_logits.py MODEL_DIR INPUTS.json [--atol 1e-4] [--adapter DIR] [--loss-atol 1e-5]
    check_hf_logits.py MODEL_DIR INPUTS.json --dump OUT.json

MODEL_DIR is a Hugging Face directory of any architecture transformers' AutoModelForCausalLM
loads (Ringmaster writes llama, mistral, qwen2 and qwen3): config.json plus model.safetensors or
model.safetensors.index.json with shards, e.g. one written by Ringmaster. With --adapter the
PEFT LoRA adapter in DIR is applied (peft's PeftModel.from_pretrained).

INPUTS.json is {"input_ids": [[...], ...], "logits": [[[...]]]}: a batch of equal-length rows
of token ids and the logits Ringmaster computed for them, shape [batch, seq, vocab].

The model is loaded with AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=float32) and run
on the input ids with no attention mask (plain causal attention). When INPUTS.json also has
"loss" (`trainer logits --loss`), HF's loss with labels=input_ids is compared with it too
(--loss-atol, absolute). Without --dump the script prints
the max absolute difference and the max difference relative to max |logit| (of HF's logits),
and exits 0 when the max absolute difference is <= --atol, 1 otherwise (2 on bad input).

With --dump OUT.json it does not compare (INPUTS.json needs only "input_ids") and writes HF's
logits in the same format: {"input_ids": ..., "logits": ...}, plus the versions used.
"""

import argparse
import json
import math
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Compare Ringmaster logits with transformers' AutoModelForCausalLM."
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory")
    p.add_argument(
        "inputs",
        metavar="INPUTS.json",
        help='{"input_ids": [[...]], "logits": [[[...]]]} (logits not needed with --dump)',
    )
    p.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="largest max abs diff that passes (default 1e-4)",
    )
    p.add_argument(
        "--adapter", metavar="DIR", help="apply the PEFT LoRA adapter in DIR (needs peft)"
    )
    p.add_argument(
        "--loss-atol",
        type=float,
        default=1e-5,
        help='largest |loss difference| that passes when INPUTS.json has "loss" (default 1e-5)',
    )
    p.add_argument(
        "--dump",
        metavar="OUT.json",
        help="write HF's logits for the inputs to OUT.json instead of comparing",
    )
    p.add_argument(
        "--attn",
        choices=["eager", "sdpa"],
        default="eager",
        help="transformers attention implementation (default eager)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    return p.parse_args(argv)


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    args = parse_args(argv)

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.disable_progress_bar()
    print(f"torch {torch.__version__}")
    print(f"transformers {transformers.__version__}")
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        with open(args.inputs) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{args.inputs}: {e}")
    if not isinstance(data, dict) or "input_ids" not in data:
        fail(f'{args.inputs}: expected an object with "input_ids"')
    ids = data["input_ids"]
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(r, list) and r for r in ids)
    ):
        fail(f"{args.inputs}: input_ids must be a non-empty list of non-empty rows")
    lens = {len(r) for r in ids}
    if len(lens) != 1:
        fail(f"{args.inputs}: input_ids rows have different lengths {sorted(lens)}")
    input_ids = torch.tensor(ids, dtype=torch.long)

    # transformers 4.56 renamed torch_dtype to dtype (5.x warns on the old name); older 4.x
    # would silently put an unknown `dtype` kwarg into the config, so choose by version.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, attn_implementation=args.attn, **{dtype_kw: torch.float32}
    )
    print(f"class {type(model).__name__} (model_type {model.config.model_type})")
    if args.adapter:
        import peft
        from peft import PeftModel

        print(f"peft {peft.__version__}: adapter {args.adapter}")
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    vocab = model.config.vocab_size
    if int(input_ids.max()) >= vocab or int(input_ids.min()) < 0:
        fail(f"input_ids out of range for vocab_size {vocab}")

    with torch.no_grad():
        out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
        hf = out.logits.float()
        hf_loss = float(out.loss)
    b, s, v = hf.shape
    print(f"model {args.model_dir}: params {sum(p.numel() for p in model.parameters())}")
    print(f"inputs: batch {b}, seq {s}, vocab {v}, attn {args.attn}")

    if args.dump:
        out = {
            "input_ids": ids,
            "logits": hf.tolist(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        with open(args.dump, "w") as f:
            json.dump(out, f)
        print(f"wrote HF logits [{b}, {s}, {v}] to {args.dump}")
        return 0

    if "logits" not in data:
        fail(f'{args.inputs}: no "logits" to compare (use --dump to write HF\'s)')
    try:
        ref = torch.tensor(data["logits"], dtype=torch.float64)
    except (ValueError, TypeError) as e:
        fail(f"{args.inputs}: logits are not a rectangular number array: {e}")
    if tuple(ref.shape) != (b, s, v):
        fail(f"logits shape {list(ref.shape)} differs from HF's [{b}, {s}, {v}]")
    if not torch.isfinite(ref).all():
        fail("Ringmaster logits contain NaN or infinity")

    diff = (hf.double() - ref).abs()
    max_abs = float(diff.max())
    scale = float(hf.double().abs().max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    idx = int(diff.argmax())
    bi, si, vi = idx // (s * v), (idx // v) % s, idx % v
    same_argmax = bool((hf.argmax(-1) == ref.argmax(-1)).all())

    print(f"max |logit| (HF): {scale:.6g}")
    print(f"max abs diff: {max_abs:.6e} at [batch {bi}, pos {si}, token {vi}] "
          f"(HF {float(hf[bi, si, vi]):.6g}, Ringmaster {float(ref[bi, si, vi]):.6g})")
    print(f"max rel diff (to max |logit|): {max_rel:.6e}")
    print(f"mean abs diff: {float(diff.mean()):.6e}")
    print(f"argmax agrees at every position: {same_argmax}")
    ok = max_abs <= args.atol
    print(f"{'PASS' if ok else 'FAIL'}: max abs diff {max_abs:.6e} "
          f"{'<=' if ok else '>'} atol {args.atol:g}")
    if "loss" in data:
        loss_diff = abs(hf_loss - float(data["loss"]))
        loss_ok = loss_diff <= args.loss_atol
        print(f"loss: HF {hf_loss:.9f}, Ringmaster {float(data['loss']):.9f}")
        print(f"{'PASS' if loss_ok else 'FAIL'}: loss diff {loss_diff:.6e} "
              f"{'<=' if loss_ok else '>'} loss atol {args.loss_atol:g}")
        ok = ok and loss_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
