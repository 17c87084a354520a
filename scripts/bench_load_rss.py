"""Peak RSS and time of loading models, each in a fresh process (the GGUF and the Hugging Face checkpoint of the
same shapes, say), alternating the models ``--rounds`` times.

    python -m bitnet_batch.testing.models bench-models/2b4t-i2s.gguf --preset 2b4t \\
        --tokenizer-from tests/data/tokenizer/ggml-vocab-llama-bpe.gguf
    python -m bitnet_batch.testing.hf_writer bench-models/2b4t-packed --preset 2b4t
    python scripts/bench_load_rss.py bench-models/2b4t-i2s.gguf bench-models/2b4t-packed --rounds 2

Per model it prints the peak resident set of the loading process (``ru_maxrss``: imports + ``load_model``), the
resident set after the load, what the imports alone had (the baseline), and the load time; the best (lowest peak)
round is kept, as the machine is shared.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys, time
import bitnet_batch
from bitnet_batch.model import model as _m          # the loader's imports, counted in the baseline
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
m = bitnet_batch.load_model(sys.argv[1])
load_s = time.perf_counter() - t0
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "after_load_mb": rss_mb(),
                  "baseline_mb": base, "load_s": load_s, "ternary_mb": m.weights.nbytes_ternary / 2**20}))
"""


def measure(path: str) -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    best = {}
    for _ in range(a.rounds):
        for path in a.models:
            r = measure(path)
            if path not in best or r["peak_mb"] < best[path]["peak_mb"]:
                best[path] = r
    first = best[a.models[0]]["peak_mb"]
    for path, r in best.items():
        print(f"{path}: peak {r['peak_mb']:.0f} MB ({r['peak_mb'] / first:.1%} of the first), after load "
              f"{r['after_load_mb']:.0f} MB, imports {r['baseline_mb']:.0f} MB, ternary weights {r['ternary_mb']:.0f} "
              f"MB, load {r['load_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
