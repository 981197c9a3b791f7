#!/usr/bin/env python3
"""Markdown table from collective benchmark JSON lines (run.sh's results-*.jsonl).

Usage: summarize.py RESULTS.jsonl [...]   (or JSON lines on stdin)

Lines: {"impl": "ringmaster"|"gloo", "op", "world", "bytes", "busbw_gbs", ...},
{"impl": "loopback", "gbs"}, {"impl": "meta", ...}; others are ignored. Where a key
(impl, op, world, bytes) appears more than once, the last line wins.
Per op / world / size: ours busbw, gloo busbw, ours/gloo, the loopback ceiling (one TCP
stream) and ours busbw as a fraction of it. All GB/s = 1e9 bytes/s.
"""

import json
import sys


def human(n):
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"


def fmt(x, digits=3):
    """Fixed decimals, but enough significant digits for the small sizes' tiny bandwidths."""
    if x is None:
        return "—"
    if x != 0 and abs(x) < 10 ** -(digits - 1):
        return f"{x:.2g}"
    return f"{x:.{digits}f}"


def main(argv):
    lines = []
    if len(argv) > 1:
        for path in argv[1:]:
            with open(path) as f:
                lines += f.readlines()
    else:
        lines = sys.stdin.readlines()

    rows = {}  # (op, world, bytes) -> {impl: record}
    loopback = None
    meta = None
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        impl = d.get("impl")
        if impl == "loopback":
            loopback = d
        elif impl == "meta":
            meta = d
        elif impl in ("ringmaster", "gloo") and "busbw_gbs" in d:
            rows.setdefault((d["op"], int(d["world"]), int(d["bytes"])), {})[impl] = d

    ceiling = loopback.get("gbs") if loopback else None
    out = []
    if meta:
        out.append(f"{meta.get('date', '')}: {meta.get('cpus', '?')} CPUs ({meta.get('cpu', '')}), "
                   f"kernel {meta.get('kernel', '')}")
    if loopback:
        out.append(f"Loopback ceiling (one TCP stream, {loopback.get('tool', '?')}): "
                   f"{ceiling:.3f} GB/s")
    if out:
        out.append("")
    out.append("| op | world | size | ours busbw GB/s | gloo busbw GB/s | ours/gloo | loopback GB/s | ours/loopback |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    op_order = {"all_reduce": 0, "reduce_scatter": 1, "all_gather": 2}
    for key in sorted(rows, key=lambda k: (op_order.get(k[0], 9), k[0], k[1], k[2])):
        op, world, nbytes = key
        ours = rows[key].get("ringmaster", {}).get("busbw_gbs")
        gloo = rows[key].get("gloo", {}).get("busbw_gbs")
        ratio = ours / gloo if ours is not None and gloo else None
        frac = ours / ceiling if ours is not None and ceiling else None
        out.append(f"| {op} | {world} | {human(nbytes)} | {fmt(ours)} | {fmt(gloo)} | "
                   f"{fmt(ratio, 2)} | {fmt(ceiling)} | {fmt(frac, 2)} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
