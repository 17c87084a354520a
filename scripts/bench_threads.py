"""Thread scaling: ``bitnet-batch bench`` once per thread count, in a fresh process each, and a table of
throughput and speed-up over the smallest thread count.

    python scripts/bench_threads.py --model bench-models/2b4t-i2s.gguf --threads 1,2,4,8,16 \\
        --batch-sizes 1,8,32 --prompt-tokens 32 --gen-tokens 32 --out-dir scaling

The thread counts run from the largest down, so a run cut short still has the many-thread figures. Each run's
JSON (``bitnet-batch bench --json``) is written to ``--out-dir`` as soon as it ends, with the machine's CPU
model; the table is printed as markdown at the end (and with ``--json`` as one JSON object).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitnet_batch.bench import cpu_model  # noqa: E402


def run_once(args, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bitnet_batch.cli", "bench", "-m", args.model, "--batch-sizes", args.batch_sizes,
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--threads",
           str(threads), "--json"]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(max(args.thread_counts)))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"bench with {threads} threads failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(runs: dict, thread_counts: list) -> str:
    base = runs[min(runs)]
    base_by_batch = {r["batch"]: r for r in base["results"]}
    lines = ["| threads | batch | prefill tok/s | speed-up | decode tok/s | speed-up | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for n in sorted(runs):
        for r in runs[n]["results"]:
            b = base_by_batch[r["batch"]]
            lines.append(f"| {n} | {r['batch']} | {r['prefill_tok_s']:.1f} | "
                         f"{r['prefill_tok_s'] / b['prefill_tok_s']:.2f}x | {r['decode_tok_s']:.1f} | "
                         f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}x | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", default="1,2,4,8,16", help="comma-separated thread counts")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--out-dir", default=None, help="write each run's JSON here as it ends")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.thread_counts = sorted({int(t) for t in args.threads.split(",")}, reverse=True)
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    cpu = cpu_model()
    print(f"CPU: {cpu}, {os.cpu_count()} logical CPUs", flush=True)
    runs = {}
    for n in args.thread_counts:
        run = runs[n] = dict(run_once(args, n), cpu=cpu)
        if out_dir:
            (out_dir / f"threads-{n}.json").write_text(json.dumps(run, indent=1))
        print(f"{n} threads ({run.get('threading_layer')}): " + ", ".join(
            f"batch {r['batch']}: prefill {r['prefill_tok_s']:.1f} decode {r['decode_tok_s']:.1f}"
            for r in run["results"]), flush=True)
    print(table(runs, args.thread_counts))
    if args.json:
        print(json.dumps({"cpu": cpu, "runs": {str(n): runs[n] for n in sorted(runs)}}))


if __name__ == "__main__":
    main()
