#!/usr/bin/env python3
"""PyTorch eager bf16 training steps of a hand-written Llama on one CUDA GPU: the baseline for
the trainer's GPU step (bench/gpu/run.sh, step "torch").

The model is plain torch, the same shape as Ringmaster's Llama: token embedding, per block
RMSNorm -> grouped-query attention (rotate-half RoPE, theta 10000, causal SDPA) -> residual,
RMSNorm -> SwiGLU MLP (down(silu(gate(x)) * up(x))) -> residual; final RMSNorm; LM head (tied to
the embedding with --tied, untied by default as bench/engines' 124.7M config). No biases.
Precision: fp32 parameters and AdamW state, compute under torch.autocast(bfloat16) (what the HF
Trainer's `bf16: true` does, and what Ringmaster does: fp32 master, bf16 compute copies);
--precision pure keeps parameters in bf16 instead. AdamW: lr 1e-4, betas 0.9/0.999, eps 1e-8,
weight decay 0, torch's default (foreach) implementation. Token ids: uniform random, one fresh
batch per step, targets = inputs shifted by one.

tokens_per_s = batch * seq / median step time over --steps timed steps after --warmup untimed
ones (each step ends with torch.cuda.synchronize()).

MFU = tokens_per_s * flops_per_token / --peak-flops, with
  flops_per_token = 6 * N + 12 * layers * hidden * seq
where N counts every parameter except the input embedding table (a lookup, not a matmul; the LM
head counts even when tied) and 12*L*d*T is causal-agnostic attention (scores and values,
forward and backward: PaLM, appendix B). --peak-flops defaults to the H100 SXM's dense bf16
figure, 989.4e12. `--print-flops` prints N and flops_per_token for the shape and exits without
importing torch (run.sh uses it for Ringmaster's MFU, so both sides share one formula).

One JSON object goes to stdout (and to --json-out): status "pass" with the figures, or "skip"
with a reason when torch or a GPU is missing (exit 0), or "fail" with the error (exit 1).
"""

import argparse
import json
import statistics
import sys
import time


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tied", action="store_true", help="tie the LM head to the embedding")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rms-eps", type=float, default=1e-6)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--precision", choices=["autocast", "pure"], default="autocast")
    p.add_argument("--peak-flops", type=float, default=989.4e12,
                   help="the GPU's dense bf16 peak, FLOP/s (H100 SXM: 989.4e12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", help="also write the JSON object here")
    p.add_argument("--print-flops", action="store_true",
                   help="print N and flops_per_token for the shape and exit (no torch)")
    return p.parse_args(argv)


def flops(a):
    """(N, flops_per_token) for the shape in `a`: see the module docstring."""
    d, L, inter, V = a.hidden, a.layers, a.intermediate, a.vocab
    kv = d // a.heads * a.kv_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d  # q,o; k,v; gate,up,down; 2 norms
    n = L * per_layer + d + V * d  # + final norm + LM head
    return n, 6 * n + 12 * L * d * a.seq


def emit(obj, a):
    line = json.dumps(obj)
    print(line, flush=True)
    if a.json_out:
        with open(a.json_out, "w") as f:
            f.write(line + "\n")


def build(a, torch):
    nn = torch.nn
    F = torch.nn.functional
    hd = a.hidden // a.heads

    class RMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + a.rms_eps)
            return (xf * self.weight.float()).to(x.dtype)

    def rope_tables(seq, device):
        inv = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
        t = torch.arange(seq, device=device).float()
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)  # HF's rotate-half layout
        return emb.cos(), emb.sin()

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def sdpa(q, k, v):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except TypeError:  # torch < 2.5: repeat the kv heads
            rep = a.heads // a.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            d, kv = a.hidden, hd * a.kv_heads
            self.input_layernorm = RMSNorm(d)
            self.q_proj = nn.Linear(d, d, bias=False)
            self.k_proj = nn.Linear(d, kv, bias=False)
            self.v_proj = nn.Linear(d, kv, bias=False)
            self.o_proj = nn.Linear(d, d, bias=False)
            self.post_attention_layernorm = RMSNorm(d)
            self.gate_proj = nn.Linear(d, a.intermediate, bias=False)
            self.up_proj = nn.Linear(d, a.intermediate, bias=False)
            self.down_proj = nn.Linear(a.intermediate, d, bias=False)

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            h = self.input_layernorm(x)
            q = self.q_proj(h).view(B, T, a.heads, hd).transpose(1, 2)
            k = self.k_proj(h).view(B, T, a.kv_heads, hd).transpose(1, 2)
            v = self.v_proj(h).view(B, T, a.kv_heads, hd).transpose(1, 2)
            q = (q * cos + rotate_half(q) * sin).to(v.dtype)
            k = (k * cos + rotate_half(k) * sin).to(v.dtype)
            o = sdpa(q, k, v).transpose(1, 2).reshape(B, T, a.hidden)
            x = x + self.o_proj(o)
            h = self.post_attention_layernorm(x)
            return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(a.vocab, a.hidden)
            self.layers = nn.ModuleList(Block() for _ in range(a.layers))
            self.norm = RMSNorm(a.hidden)
            self.lm_head = nn.Linear(a.hidden, a.vocab, bias=False)
            if a.tied:
                self.lm_head.weight = self.embed_tokens.weight
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, ids, cos, sin):
            x = self.embed_tokens(ids)
            for blk in self.layers:
                x = blk(x, cos, sin)
            return self.lm_head(self.norm(x))

    return Llama, rope_tables


def main(argv):
    a = parse_args(argv)
    n, fpt = flops(a)
    shape = {k: getattr(a, k) for k in
             ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tied", "batch",
              "seq")}
    if a.print_flops:
        print(json.dumps({"params_counted": n, "flops_per_token": fpt, "shape": shape}))
        return 0
    base = {"impl": "pytorch-eager", "precision": a.precision, "shape": shape,
            "params_counted": n, "flops_per_token": fpt, "peak_flops": a.peak_flops}
    try:
        import torch
    except ImportError as e:
        emit({**base, "status": "skip", "reason": f"no torch: {e}"}, a)
        return 0
    if not torch.cuda.is_available():
        emit({**base, "status": "skip", "reason": "torch sees no CUDA device",
              "torch": torch.__version__}, a)
        return 0
    try:
        torch.manual_seed(a.seed)
        dev = torch.device("cuda", 0)
        torch.backends.cuda.matmul.allow_tf32 = True
        Llama, rope_tables = build(a, torch)
        model = Llama().to(dev)
        if a.precision == "pure":
            model = model.to(torch.bfloat16)
        params_total = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0)
        cos, sin = rope_tables(a.seq, dev)
        if a.precision == "pure":
            cos, sin = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
        gen = torch.Generator(device=dev).manual_seed(a.seed)
        torch.cuda.reset_peak_memory_stats(dev)

        def step():
            ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=dev, generator=gen)
            x, y = ids[:, :-1], ids[:, 1:]
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.precision == "autocast"):
                logits = model(x, cos, sin)
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, a.vocab),
                                                     y.reshape(-1))
            loss.backward()
            opt.step()
            return loss

        for _ in range(a.warmup):
            step()
        torch.cuda.synchronize(dev)
        times, losses = [], []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            loss = step()
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss))
        step_s = statistics.median(times)
        tps = a.batch * a.seq / step_s
        emit({**base, "status": "pass", "device": torch.cuda.get_device_name(dev),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "params_total": params_total, "steps_timed": a.steps, "warmup": a.warmup,
              "step_s_median": step_s, "tokens_per_s": tps,
              "mfu": tps * fpt / a.peak_flops,
              "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(dev),
              "max_memory_reserved_bytes": torch.cuda.max_memory_reserved(dev),
              "loss_first": losses[0], "loss_last": losses[-1]}, a)
        return 0
    except Exception as e:  # noqa: BLE001 - one JSON line whatever broke
        emit({**base, "status": "fail", "reason": f"{type(e).__name__}: {e}"}, a)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
