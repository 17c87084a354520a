"""Prefix caching end to end: the same templated job with and without the cache, wall times and their ratio.

    bitnet-batch make-test-model bench-models/2b4t-i2s.gguf --preset 2b4t \
        --tokenizer-from tests/data/tokenizer/ggml-vocab-llama-bpe.gguf
    python scripts/bench_prefix.py --model bench-models/2b4t-i2s.gguf --items 16 --threads 2

Every item is a chat of one shared system instruction (``--instruction-tokens``, ~500 LLaMA-3 tokens by
default) and a distinct user document (``--document-tokens``, ~60), the shape of `pipelines/classify.toml` and
`extract.toml`; ``max_tokens`` 8, greedy. Each job runs through ``run_job`` on the already loaded model (model
load and the first kernel compile are the same for both and left out; each job's own warm-up from the kernel
cache and everything after it are in), and the two jobs' records are checked to be the same but for timings and
``cached_tokens``. ``--repeat`` alternates the two jobs so load changes on a shared machine hit both alike; the
best wall time of each is reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitnet_batch.bench import cpu_model  # noqa: E402
from bitnet_batch.engine.engine import Engine, EngineConfig  # noqa: E402
from bitnet_batch.model.model import load_model  # noqa: E402
from bitnet_batch.engine.warmup import warm_up  # noqa: E402
from bitnet_batch.jobs.run import JobConfig, run_job  # noqa: E402
from bitnet_batch.sampling.params import SamplingParams  # noqa: E402

WORDS = ("the model reads each support ticket and assigns exactly one label from the list below using the "
         "customer message only never guess when the text is unclear choose other and explain billing refund "
         "account login password delivery damaged late order invoice cancel upgrade plan price discount shipping "
         "address email phone warranty return exchange product quality feedback complaint praise question answer "
         "urgent normal low priority team escalate manager policy rule example format output json field").split()


def text_of(n_tokens: int, tok, rng) -> str:
    """Sentences of WORDS, grown until they encode to about n_tokens tokens."""
    out = []
    while len(tok.encode(" ".join(out))) < n_tokens:
        out.append(" ".join(rng.choice(WORDS, 12)).capitalize() + ".")
    return " ".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="GGUF (e.g. the 2B4T-shaped random model with the LLaMA-3 vocab)")
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--instruction-tokens", type=int, default=500)
    p.add_argument("--document-tokens", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="Numba threads (0 = all cores)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = load_model(args.model)
    warm_up(Engine(model, EngineConfig(max_batch=1, max_seq_len=8, threads=args.threads)))   # compile: untimed
    tok = model.tokenizer
    rng = np.random.default_rng(0)
    instruction = text_of(args.instruction_tokens, tok, rng)
    records = [{"id": f"doc-{i}", "messages": [{"role": "system", "content": instruction},
                                               {"role": "user", "content": text_of(args.document_tokens, tok, rng)}],
                "max_tokens": args.max_tokens} for i in range(args.items)]
    runs = {True: [], False: []}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
        for k in range(args.repeat):
            for cached in (False, True):
                out = Path(tmp) / f"out-{cached}-{k}.jsonl"
                job = JobConfig(inputs=(str(src),), output=str(out), model=args.model, sampling=SamplingParams(),
                                engine=EngineConfig(max_batch=args.max_batch, threads=args.threads,
                                                    prefix_cache=cached))
                t0 = time.perf_counter()
                summary = run_job(job, model=model, quiet=True)
                wall = time.perf_counter() - t0
                runs[cached].append({"wall_s": round(wall, 2), "run_s": summary["time_s"]["run"],
                                     "prompt_tokens": summary["tokens"]["prompt"], **summary["prefix_cache"]})
                outputs[cached] = [_comparable(json.loads(line)) for line in out.read_text().splitlines()]
    import numba

    best = {c: min(r, key=lambda x: x["wall_s"]) for c, r in runs.items()}
    result = {"model": str(model.path), "items": args.items, "threads": numba.get_num_threads(),
              "prompt_tokens_per_item": best[False]["prompt_tokens"] / args.items,
              "without_cache": best[False], "with_cache": best[True], "runs": {str(c): r for c, r in runs.items()},
              "speedup_wall": round(best[False]["wall_s"] / best[True]["wall_s"], 2),
              "prefill_token_ratio": round(best[False]["prompt_tokens_computed"]
                                           / max(1, best[True]["prompt_tokens_computed"]), 2),
              "records_identical": outputs[True] == outputs[False], "cpu": cpu_model()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.items} items x {result['prompt_tokens_per_item']:.0f} prompt tokens, max_tokens "
              f"{args.max_tokens}, {result['threads']} threads, {result['cpu']}")
        for name, key in (("without the prefix cache", False), ("with the prefix cache", True)):
            b = best[key]
            print(f"  {name:25s} {b['wall_s']:8.2f} s  ({b['prompt_tokens_computed']} prompt tokens computed, "
                  f"{b['prompt_tokens_cached']} from the cache)")
        print(f"  speed-up {result['speedup_wall']:.2f}x end to end (prefill tokens "
              f"{result['prefill_token_ratio']:.2f}x fewer); records identical: {result['records_identical']}")
    return result


def _comparable(rec: dict) -> dict:
    rec.pop("timing")
    rec["usage"].pop("cached_tokens", None)
    return rec


if __name__ == "__main__":
    main()
