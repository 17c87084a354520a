"""Embedding throughput on a random model of BitNet-embedding-0.6B's shapes (or any GGUF): tokens/s and texts/s.

Writes (once, cached under --models) a random qwen3 BitNet embedding GGUF in the 0.6B shapes (28 layers, hidden
1024, 16/8 heads of 128, FFN 3072, vocab 151936, I2_S; ``bitnet_batch.testing.embedding_models`` preset ``0.6b``),
compiles the kernels (timed apart), then embeds texts of each length (random token ids ending in EOS, as prepared
texts are) with the ``Embedder`` and reports, per length, the best of ``--repeat`` runs:

    python scripts/bench_embed.py --threads 2 --lengths 128,512 --texts 32,8 --max-rows 2048

Compare: bitnet.cpp reports ~109 tokens/s per thread for this model on a Xeon (prefill, pp128, 8 threads: 870.9 t/s,
``docs/bitnet-embeddings-i2s-guide.md``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GGUF to bench (default: the random 0.6B-shaped model, written if missing)")
    ap.add_argument("--models", default="bench-models", help="where the random model is kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="128,512", help="tokens per text, comma separated")
    ap.add_argument("--texts", default="32,8", help="texts per run for each length")
    ap.add_argument("--max-rows", type=int, default=2048, help="rows (tokens) per step")
    ap.add_argument("--max-texts", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--pooling", default="last")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(a.threads))

    import numba
    import numpy as np

    import bitnet_batch
    from bitnet_batch.bench import cpu_model
    from bitnet_batch.embeddings import Embedder
    from bitnet_batch.testing.embedding_models import write_embedding_test_model

    path = Path(a.model) if a.model else Path(a.models) / "embed-0.6b-i2s.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_embedding_test_model(path, preset="0.6b")
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    numba.set_num_threads(min(a.threads, numba.config.NUMBA_NUM_THREADS))
    t0 = time.perf_counter()
    model = bitnet_batch.load_model(path)
    load_s = time.perf_counter() - t0
    lengths = [int(x) for x in a.lengths.split(",")]
    counts = [int(x) for x in a.texts.split(",")]
    max_seq = max(lengths)
    emb = Embedder(model, max_rows=a.max_rows, max_texts=a.max_texts, max_seq_len=max_seq, prefault_kv=True)
    rng = np.random.default_rng(0)
    eos = model.tokenizer.eos_id if model._tokenizer is not None and model.tokenizer.eos_id is not None else 1
    t0 = time.perf_counter()
    emb.embed([rng.integers(0, 1000, 40).tolist() + [eos]] * 3, pooling=a.pooling)      # compile / load kernels
    compile_s = time.perf_counter() - t0
    results = []
    for n_tok, n_texts in zip(lengths, counts):
        texts = [rng.integers(0, model.config.n_vocab, n_tok - 1).tolist() + [eos] for _ in range(n_texts)]
        best = None
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            emb.embed(texts, pooling=a.pooling)
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        results.append({"tokens_per_text": n_tok, "texts": n_texts, "seconds": round(best, 3),
                        "tokens_per_s": round(n_tok * n_texts / best, 1), "texts_per_s": round(n_texts / best, 2)})
    info = {"model": str(path), "config": repr(model), "cpu": cpu_model(), "threads": numba.get_num_threads(),
            "max_rows": a.max_rows, "pooling": a.pooling, "load_s": round(load_s, 1),
            "compile_s": round(compile_s, 1), "load_avg": os.getloadavg()[0], "results": results}
    if a.json:
        print(json.dumps(info))
    else:
        print(f"{info['config']}\n{info['cpu']}, {info['threads']} threads, max_rows {a.max_rows}, load average "
              f"{info['load_avg']:.1f}; compile {info['compile_s']} s")
        for r in results:
            print(f"  {r['tokens_per_text']:5d} tokens x {r['texts']:3d} texts: {r['seconds']:7.2f} s  "
                  f"{r['tokens_per_s']:8.1f} tokens/s  {r['texts_per_s']:6.2f} texts/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
