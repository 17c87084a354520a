"""Overhead of structured output on decode throughput: the same job with and without a JSON schema.

    python scripts/bench_constraints.py                      # random test model, synthetic 512-token vocabulary
    python scripts/bench_constraints.py --vocab llama3       # same, with the real 128k LLaMA-3 vocabulary
    python scripts/bench_constraints.py --model some.gguf    # any model

Both jobs generate exactly ``--max-tokens`` tokens per item: the plain one with ignore_eos, the constrained one
under a schema whose array of strings cannot end that early (``minItems``). Reported from each job's summary
(meta.json): ``decode_tok_s`` (engine time of decode rows only), the sampling time per generated token (where the grammar
mask is computed and applied) and ``completion_tok_s`` (generated tokens over the whole run: what a user sees).
Jobs alternate plain/constrained ``--repeat`` times so load changes on a shared machine hit both alike.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitnet_batch.engine.engine import EngineConfig  # noqa: E402
from bitnet_batch.model.model import load_model  # noqa: E402
from bitnet_batch.jobs.run import JobConfig, run_job  # noqa: E402
from bitnet_batch.sampling.constraints import job_constraint  # noqa: E402
from bitnet_batch.sampling.params import SamplingParams  # noqa: E402
from bitnet_batch.testing.models import write_test_model  # noqa: E402

# minItems keeps the array open for longer than any --max-tokens used here: every item generates max_tokens
SCHEMA = {"type": "object", "required": ["notes"], "additionalProperties": False,
          "properties": {"notes": {"type": "array", "minItems": 200,
                                   "items": {"type": "string", "maxLength": 24}}}}
LLAMA3_VOCAB = ROOT / "tests" / "data" / "tokenizer" / "ggml-vocab-llama-bpe.gguf"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF to use (default: a random test model written to a temp dir)")
    p.add_argument("--vocab", choices=("synthetic", "llama3"), default="synthetic",
                   help="tokenizer of the random test model")
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="Numba threads (0 = all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p.parse_args(argv)


def test_model(tmp: Path, vocab: str) -> Path:
    kw = {"tokenizer_from": LLAMA3_VOCAB} if vocab == "llama3" else {"n_vocab": 512}
    return write_test_model(tmp / f"bench-{vocab}.gguf", n_embd=256, n_layer=4, n_head=4, n_head_kv=2, n_ff=512,
                            seed=3, context_length=1024, **kw)


def one_job(tmp: Path, src: Path, model, args, constrained: bool, k: int) -> dict:
    out = tmp / f"out-{'c' if constrained else 'p'}{k}.jsonl"
    job = JobConfig(inputs=(str(src),), output=str(out), model=str(model.path), overwrite=True,
                    sampling=SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=not constrained),
                    engine=EngineConfig(max_batch=args.max_batch, prefill_chunk=256, threads=args.threads),
                    constraint=job_constraint(json_schema=SCHEMA) if constrained else None)
    s = run_job(job, model=model, quiet=True)
    tokens = s["tokens"]["completion"]
    return {"decode_tok_s": s["throughput"]["decode_tok_s"], "completion_tok_s": s["throughput"]["completion_tok_s"],
            "sampling_ms_per_token": round(1e3 * s["time_s"]["sampling"] / max(1, tokens), 4),
            "completion_tokens": tokens, "incomplete": s["structured"]["incomplete"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = load_model(args.model or test_model(tmp, args.vocab))
        src = tmp / "in.jsonl"
        src.write_text("".join(json.dumps({"id": i, "prompt": f"Note {i}: write a list of short notes."}) + "\n"
                               for i in range(args.items)))
        runs = {"plain": [], "schema": []}
        for k in range(args.repeat):
            runs["plain"].append(one_job(tmp, src, model, args, False, k))
            runs["schema"].append(one_job(tmp, src, model, args, True, k))
    best = {name: max(rs, key=lambda r: r["completion_tok_s"]) for name, rs in runs.items()}
    result = {"model": str(args.model or f"random test model ({args.vocab} vocab)"),
              "vocab": model.config.n_vocab, "items": args.items, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "best": best, "runs": runs,
              "completion_overhead_pct": round(100 * (1 - best["schema"]["completion_tok_s"]
                                                      / best["plain"]["completion_tok_s"]), 1)}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['model']}, vocab {result['vocab']}, {args.items} items x {args.max_tokens} tokens, "
          f"max_batch {args.max_batch}, threads {args.threads or 'all'} (best of {args.repeat})")
    print(f"{'job':8} {'decode tok/s':>13} {'sampling ms/tok':>16} {'completion tok/s':>17}")
    for name, r in best.items():
        print(f"{name:8} {r['decode_tok_s']:>13.1f} {r['sampling_ms_per_token']:>16.4f} {r['completion_tok_s']:>17.1f}")
    print(f"end-to-end overhead of the schema: {result['completion_overhead_pct']}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
