#!/usr/bin/env python3
"""Does continuous batching really batch? Runs the same job with --max-batch 1 and --max-batch 16 and
prints the summaries' decode throughput and their ratio (the runner's own numbers, from <output>.meta.json).

usage: python scripts/bench_batching.py [--model GGUF] [--items 64] [--max-tokens 32]
Without --model a small random model (hidden 256, 4 layers) is written to a temporary folder.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bitnet-batching-"))
    model = a.model
    if model is None:
        from bitnet_batch.testing.models import write_test_model
        model = str(write_test_model(tmp / "m.gguf", n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512,
                                     n_vocab=512, seed=1))
    src = tmp / "in.jsonl"
    with open(src, "w") as f:
        for i in range(a.items):
            f.write(json.dumps({"id": i, "prompt": f"item {i}: tell a story about stones and rivers",
                                "max_tokens": a.max_tokens, "ignore_eos": True}) + "\n")
    results = {}
    for b in [int(x) for x in a.batches.split(",")]:
        out = tmp / f"out{b}.jsonl"
        subprocess.run([sys.executable, "-m", "bitnet_batch.cli", "run", str(src), "-o", str(out), "-m", model,
                        "--max-batch", str(b), "--quiet", "--overwrite"], check=True)
        meta = json.loads(Path(str(out) + ".meta.json").read_text())
        results[b] = meta["throughput"]
        print(f"--max-batch {b:3d}: decode {meta['throughput']['decode_tok_s']:8.1f} tok/s, completion "
              f"{meta['throughput']['completion_tok_s']:8.1f} tok/s, prefill {meta['throughput']['prefill_tok_s']:8.1f} "
              f"tok/s, run {meta['time_s']['run']:.2f}s")
    bs = sorted(results)
    if len(bs) > 1:
        lo, hi = results[bs[0]], results[bs[-1]]
        print(f"ratio decode {hi['decode_tok_s'] / lo['decode_tok_s']:.2f}x, completion "
              f"{hi['completion_tok_s'] / lo['completion_tok_s']:.2f}x (max-batch {bs[-1]} vs {bs[0]})")


if __name__ == "__main__":
    main()
