"""bitnet-batch next to llama.cpp on the same machine, in the same run: prefill and aggregate decode per batch size.

    # a llama.cpp build (its tools build with cmake from the llama-cpp-python sdist's vendor/llama.cpp:
    #   pip download --no-binary :all: --no-deps llama-cpp-python; tar xzf llama_cpp_python-*.tar.gz
    #   cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
    #   cmake --build build -j2 --target llama-batched-bench)
    # and the same 2B4T shapes as TQ2_0 for it (mainline llama.cpp has no I2_S):
    python -m bitnet_batch.testing.models bench-models/2b4t-tq2_0.gguf --preset 2b4t --arch bitnet --wtype tq2_0 \\
        --tokenizer-from tests/data/tokenizer/ggml-vocab-llama-bpe.gguf
    python scripts/bench_peers.py --model bench-models/2b4t-i2s.gguf --llama-bin build/bin \\
        --peer-model bench-models/2b4t-tq2_0.gguf --batch-sizes 1,8,32 --rounds 2

Both engines get the same prompt / generation lengths, batch sizes and thread count. ``--rounds N`` alternates
the engines N times and keeps each one's best run per batch size (the machine is shared: the best run is the
least disturbed one). llama.cpp's numbers come from ``llama-batched-bench`` (``S_PP``: prompt tokens of all
sequences / prefill time, ``S_TG``: generated tokens of all sequences / generation time), its peak RSS from
the child's rusage. Prints a markdown table and, with ``--json``, one JSON object.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_ours(args) -> dict:
    cmd = [sys.executable, "-m", "bitnet_batch.cli", "bench", "-m", args.model, "--batch-sizes", args.batch_sizes,
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--threads",
           str(args.threads), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return {r["batch"]: {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
                         "peak_rss_mb": r["peak_rss_mb"]} for r in out["results"]}


def run_llama(args) -> dict:
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    n_ctx = max(sizes) * (args.prompt_tokens + args.gen_tokens) + 256
    cmd = [str(Path(args.llama_bin) / "llama-batched-bench"), "-m", args.peer_model, "-c", str(n_ctx), "-b", "2048",
           "-ub", "512", "-npp", str(args.prompt_tokens), "-ntg", str(args.gen_tokens), "-npl", args.batch_sizes,
           "-t", str(args.threads), "--output-format", "jsonl"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)        # reaped here, so its own rusage (peak RSS) is ours to read
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"llama-batched-bench failed ({os.waitstatus_to_exitcode(status)}):\n{stderr[-2000:]}")
    rss = usage.ru_maxrss / 1024
    found = {}
    for line in (stdout + "\n" + stderr).splitlines():
        line = line.strip()
        if line.startswith('{"n_kv_max"'):
            r = json.loads(line)
            found[r["pl"]] = {"prefill_tok_s": round(r["speed_pp"], 2), "decode_tok_s": round(r["speed_tg"], 2),
                              "peak_rss_mb": round(rss, 1)}
    if set(found) != set(sizes):
        raise SystemExit(f"llama-batched-bench printed results for {sorted(found)}, expected {sizes}")
    return found


def best(runs: list[dict]) -> dict:
    """Per batch size: the best prefill and decode over the runs (each may come from a different run), the
    largest peak RSS."""
    out = {}
    for b in runs[0]:
        rs = [r[b] for r in runs]
        rss = [r["peak_rss_mb"] for r in rs if r["peak_rss_mb"] is not None]
        out[b] = {"prefill_tok_s": max(r["prefill_tok_s"] for r in rs),
                  "decode_tok_s": max(r["decode_tok_s"] for r in rs),
                  "peak_rss_mb": max(rss) if rss else None}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="our model (I2_S, 2B4T shapes)")
    ap.add_argument("--llama-bin", required=True, help="directory holding llama-batched-bench")
    ap.add_argument("--peer-model", required=True, help="the model for llama.cpp (TQ2_0, same shapes)")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ours, theirs = [], []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}: bitnet-batch ...", file=sys.stderr, flush=True)
        ours.append(run_ours(args))
        print(f"round {i + 1}/{args.rounds}: llama.cpp ...", file=sys.stderr, flush=True)
        theirs.append(run_llama(args))
    a, b = best(ours), best(theirs)
    rows = []
    print(f"prompt {args.prompt_tokens}, generate {args.gen_tokens}, {args.threads} threads, best of "
          f"{args.rounds} round(s)\n")
    print("| batch | bitnet-batch prefill | llama.cpp prefill | bitnet-batch decode | llama.cpp decode | decode ratio "
          "| bitnet-batch peak RSS | llama.cpp peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for size in a:
        x, y = a[size], b[size]
        ratio = x["decode_tok_s"] / y["decode_tok_s"] if y["decode_tok_s"] else float("nan")
        rows.append({"batch": size, "bitnet_batch": x, "llama_cpp": y, "decode_ratio": round(ratio, 2)})
        print(f"| {size} | {x['prefill_tok_s']:.1f} | {y['prefill_tok_s']:.1f} | {x['decode_tok_s']:.1f} | "
              f"{y['decode_tok_s']:.1f} | {ratio:.2f}x | {x['peak_rss_mb']:.0f} MB | "
              f"{'-' if y['peak_rss_mb'] is None else format(y['peak_rss_mb'], '.0f') + ' MB'} |")
    if args.json:
        print(json.dumps({"rounds": args.rounds, "threads": args.threads, "results": rows,
                          "runs": {"bitnet_batch": ours, "llama_cpp": theirs}}))


if __name__ == "__main__":
    main()
