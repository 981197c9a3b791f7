"""A random-word text corpus for the benchmarks (no downloads): LINES lines of 12 words drawn
from 3,000 random lowercase words, seed 0, as JSONL `{"text": ...}`.

Usage: python3 bench/python/random_corpus.py OUT.jsonl [LINES]   (default 40000)
"""
import json
import random
import sys

out = sys.argv[1]
lines = int(sys.argv[2]) if len(sys.argv) > 2 else 40000
random.seed(0)
words = ["".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(random.randint(2, 8)))
         for _ in range(3000)]
with open(out, "w") as f:
    for _ in range(lines):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(12))}) + "\n")
