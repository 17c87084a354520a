"""`bitnet-batch bench`: prefill and batched decode throughput on random prompts, per batch size.

For each batch size B: B sequences of ``prompt_tokens`` random token ids are prefilled (chunked steps
of up to ``prefill_chunk`` rows), then decoded together for ``gen_tokens`` greedy steps (one row per
sequence per step, EOG ignored). Kernel compilation happens in a warm-up before anything is timed.
``repeat`` > 1 runs every batch size that many times and reports the run with the best total throughput
(the others' figures are kept in ``runs``): on a shared machine the best run is the one least disturbed.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .engine.engine import Engine, EngineConfig
from .runner import peak_rss_mb, warm_up


@dataclass
class BenchResult:
    batch: int
    prompt_tokens: int
    gen_tokens: int
    prefill_tok_s: float     # prompt tokens of all B sequences / prefill wall time
    decode_tok_s: float      # generated tokens of all B sequences / decode wall time (aggregate)
    ttft_s: float            # time until every sequence has its first token (prefill of the batch)
    total_tok_s: float       # (prompt + generated tokens) / total wall time
    step_ms: float           # mean wall time of one decode step
    peak_rss_mb: float


def bench_batch(model, batch: int, prompt_tokens: int, gen_tokens: int, *, prefill_chunk: int = 128,
                threads: int = 0, seed: int = 0, kv_dtype: str = "f32") -> BenchResult:
    cfg = model.config
    eng = Engine(model, EngineConfig(max_batch=batch, max_seq_len=prompt_tokens + gen_tokens + 1,
                                     prefill_chunk=max(prefill_chunk, batch), threads=threads, kv_dtype=kv_dtype))
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.n_vocab, size=(batch, prompt_tokens)).astype(np.int32)
    slots = [eng.kv.allocate() for _ in range(batch)]
    t0 = time.perf_counter()
    last = [None] * batch
    queue = [(b, 0) for b in range(batch)]
    while queue:                               # prefill: pack chunks of several sequences into each step
        parts, budget, nxt = [], eng.max_rows, []
        for b, start in queue:
            n = min(budget, prompt_tokens - start)
            if n <= 0:
                nxt.append((b, start))
                continue
            parts.append((slots[b], prompts[b, start:start + n], start, start + n == prompt_tokens))
            budget -= n
            if start + n < prompt_tokens:
                nxt.append((b, start + n))
        outs = eng.step(parts)
        for (slot, _, start, want), out in zip(parts, outs):
            if want:
                last[slots.index(slot)] = int(np.argmax(out))
        queue = nxt
    t1 = time.perf_counter()
    tokens = np.array(last, np.int32)
    for g in range(gen_tokens - 1):
        outs = eng.step([(slots[b], tokens[b:b + 1], prompt_tokens + g, True) for b in range(batch)])
        tokens = np.array([int(np.argmax(o)) for o in outs], np.int32)
    t2 = time.perf_counter()
    steps = max(gen_tokens - 1, 1)
    return BenchResult(batch=batch, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                       prefill_tok_s=round(batch * prompt_tokens / (t1 - t0), 2),
                       decode_tok_s=round(batch * (gen_tokens - 1) / (t2 - t1), 2) if gen_tokens > 1 else 0.0,
                       ttft_s=round(t1 - t0, 4),
                       total_tok_s=round(batch * (prompt_tokens + gen_tokens) / (t2 - t0), 2),
                       step_ms=round(1000 * (t2 - t1) / steps, 2), peak_rss_mb=round(peak_rss_mb(), 1))


def run_bench(model_ref, batch_sizes=(1, 8, 32), prompt_tokens=64, gen_tokens=64, threads=0, model_file=None,
              prefill_chunk=128, kv_dtype="f32", repeat=1, log=print) -> dict:
    from .model.model import load_model

    t0 = time.perf_counter()
    model = load_model(model_ref, filename=model_file)
    load_s = time.perf_counter() - t0
    rss_load = peak_rss_mb()
    compile_s = warm_up(Engine(model, EngineConfig(max_batch=1, max_seq_len=8, prefill_chunk=prefill_chunk,
                                                   threads=threads, kv_dtype=kv_dtype)))
    import numba

    out = {"model": str(model.path), "arch": model.config.arch, "n_layer": model.config.n_layer,
           "n_embd": model.config.n_embd, "threads": numba.get_num_threads(), "load_s": round(load_s, 3),
           "rss_after_load_mb": round(rss_load, 1), "compile_s": round(compile_s, 3), "kv_dtype": kv_dtype,
           "prefill_chunk": prefill_chunk, "repeat": repeat, "results": []}
    log(f"model {model.path.name}: load {load_s:.2f}s (RSS {rss_load:.0f} MB), compile {compile_s:.2f}s, "
        f"{out['threads']} threads, KV {kv_dtype}")
    for b in batch_sizes:
        runs = [bench_batch(model, b, prompt_tokens, gen_tokens, prefill_chunk=prefill_chunk, threads=threads,
                            kv_dtype=kv_dtype) for _ in range(repeat)]
        r = max(runs, key=lambda run: run.total_tok_s)
        out["results"].append(dict(asdict(r), runs=[{"prefill_tok_s": x.prefill_tok_s, "decode_tok_s": x.decode_tok_s,
                                                      "total_tok_s": x.total_tok_s} for x in runs]))
        spread = "" if repeat == 1 else (f" | decode over {repeat} runs {min(x.decode_tok_s for x in runs):.1f}-"
                                          f"{max(x.decode_tok_s for x in runs):.1f}")
        log(f"batch {r.batch:3d}: prefill {r.prefill_tok_s:8.1f} tok/s | decode {r.decode_tok_s:8.1f} tok/s "
            f"({r.step_ms:.0f} ms/step) | ttft {r.ttft_s:.3f}s | total {r.total_tok_s:8.1f} tok/s | "
            f"peak RSS {r.peak_rss_mb:.0f} MB{spread}")
    return out
