"""Transformers' loss on the rows a Ringmaster step trained on, against the loss it logged.

    python recipe_loss.py MODEL_DIR ROWS.json TRAINER_LOG.jsonl [--rtol 2e-2] [--atol 1e-5]

ROWS.json is what `trainer rows --step S --loss` wrote for the run (the rows of step S, their
labels with -100 where no loss, the global batch's target count, and Ringmaster's own fp32
loss of the starting weights on them). The script loads MODEL_DIR (the run's starting weights)
in transformers' AutoModelForCausalLM in fp32, computes the summed next-token cross-entropy of
each row (labels shifted by one inside each row, -100 ignored, as transformers' causal-LM loss
does), divides by the global target count, and compares it with
  - Ringmaster's fp32 loss in ROWS.json ("loss"), within --atol (same precision, same rows);
  - the loss the run logged for step S in TRAINER_LOG.jsonl, within --rtol (relative: the run
    computes in its recipe's precision, bf16 here, under its sharding plan).
Prints one JSON line; exits 1 when either differs by more than its tolerance.
Only step 1 compares with the starting weights; a LoRA run's starting adapters are zero (B = 0),
so the base model is the starting model.
"""

import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("rows")
    ap.add_argument("trainer_log")
    ap.add_argument("--rtol", type=float, default=2e-2)
    ap.add_argument("--atol", type=float, default=1e-5)
    a = ap.parse_args()

    dump = json.load(open(a.rows))
    step = dump["step"]
    if step != 1:
        print("only step 1 is computed from the starting weights", file=sys.stderr)
        return 2
    logged = None
    for line in open(a.trainer_log):
        rec = json.loads(line)
        if rec.get("step") == step and "loss" in rec:
            logged = rec["loss"]
            break
    if logged is None:
        print(f"{a.trainer_log}: no loss logged for step {step}", file=sys.stderr)
        return 2

    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    model.eval()
    total = 0.0
    targets = 0
    with torch.no_grad():
        for row in dump["rows"]:
            if len(row["segments"]) != 1:
                print("packed rows are not compared by this script", file=sys.stderr)
                return 2
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits.float()
            shift_logits = logits[0, :-1, :]
            shift_labels = labels[0, 1:]
            total += torch.nn.functional.cross_entropy(
                shift_logits, shift_labels, ignore_index=-100, reduction="sum"
            ).item()
            targets += int((shift_labels != -100).sum())
    if targets != dump["normalizer"]:
        print(f"target count {targets} != normalizer {dump['normalizer']}", file=sys.stderr)
        return 1
    hf = total / targets
    ours = dump.get("loss")
    out = {
        "rows": len(dump["rows"]),
        "targets": targets,
        "transformers_fp32": hf,
        "ringmaster_fp32": ours,
        "logged": logged,
        "fp32_abs_diff": None if ours is None else abs(hf - ours),
        "logged_rel_diff": abs(hf - logged) / abs(hf),
    }
    print(json.dumps(out))
    ok = out["logged_rel_diff"] <= a.rtol and (ours is None or out["fp32_abs_diff"] <= a.atol)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
